"""``qcow2ovl io IMAGE -c CMD [-c CMD ...]``: qemu-io's commands on our own engine.

``read``, ``write`` (``-c`` compressed, ``-z [-u] [-n]`` zeros, ``-P`` pattern, ``-s`` file,
``-f`` FUA, ``-C`` statistics), ``discard``, ``flush`` and ``aio_flush`` are here; ``readv``,
``writev``, ``aio_read``, ``aio_write``, ``alloc``, ``map``, ``length``, ``info`` and
``truncate`` in ``_cli_io_more``. Numbers take qemu-io's size suffixes ``b k M G T P E`` and
``0x`` hex.

Each command prints the lines qemu-io prints (``wrote 65536/65536 bytes at offset 0`` and a
timing line). A command that fails prints why and the next command still runs; the exit status
is 1 if any command failed. The image is opened writable only when a command writes to it. A
write that would land on metadata is refused: the message QEMU prints for it goes to stderr,
the image is marked corrupt and every later write fails; reads keep working (QEMU stops all I/O
on the image at that point).
"""

from __future__ import annotations

import functools
import re
import shlex
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any

    from qcow2ovl.image import Image

#: The largest request qemu-io takes (its block layer's limit: INT_MAX rounded down to 512).
MAX_REQUEST = 2147483136
#: The byte ``write`` writes without ``-P``, as in qemu-io.
DEFAULT_PATTERN = 0xCD

_UNITS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_NUMBER = re.compile(
    r"(?P<hex>0[xX][0-9a-fA-F]+)|(?P<int>[0-9]*)(?:\.(?P<frac>[0-9]*))?(?P<unit>[bkmgtpeBKMGTPE]?)",
    re.ASCII,
)
_WRITING = ("write", "discard", "writev", "aio_write", "truncate")
#: qemu-io's usage line of each command (printed after a bad option, as qemu-io prints it).
_USAGE = {
    "read": "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes "
    "at a specified offset",
    "write": "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of "
    "bytes at a specified offset",
    "readv": "readv [-Cqrv] [-P pattern] off len [len..] -- reads a number of bytes at a "
    "specified offset",
    "writev": "writev [-Cfqr] [-P pattern] off len [len..] -- writes a number of bytes at a "
    "specified offset",
    "aio_read": "aio_read [-Ciqrv] [-P pattern] off len [len..] -- asynchronously reads a number "
    "of bytes",
    "aio_write": "aio_write [-Cfiqruz] [-P pattern] off len [len..] -- asynchronously writes a "
    "number of bytes",
    "discard": "discard [-Cq] off len -- discards a number of bytes at a specified offset",
    "truncate": "truncate [-m prealloc_mode] off -- truncates the current file at the given offset",
    "flush": "flush -- flush all in-core file state to disk",
    "aio_flush": "aio_flush -- completes all outstanding aio requests",
    "alloc": "alloc offset [count] -- checks if offset is allocated in the file",
    "map": "map  -- prints the allocated areas of a file",
    "length": "length -- gets the length of the current file",
    "info": "info -- prints information about the current file",
}


class CommandError(Exception):
    """A command that cannot run; ``to_stderr`` says where qemu-io prints the message."""

    def __init__(self, message: str, *, to_stderr: bool = False, usage: str | None = None) -> None:
        super().__init__(message)
        self.to_stderr = to_stderr
        #: The command's usage line, printed to stdout after the message.
        self.usage = usage


def parse_number(text: str) -> int:
    """A byte count or offset in qemu-io's syntax: decimal, ``0x`` hex (no suffix), or a
    decimal fraction with a suffix (``1.5k``). Raises :class:`CommandError` with qemu-io's
    message."""
    m = _NUMBER.fullmatch(text)
    bad = CommandError(
        f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}"
    )
    if m is None:
        raise bad
    if m.group("hex"):
        value = int(m.group("hex"), 16)
    else:
        whole, frac, unit = m.group("int"), m.group("frac"), m.group("unit").lower()
        if not whole and not frac:
            raise bad
        if frac is not None and not unit:
            raise bad  # a fraction needs a unit
        shift = _UNITS.get(unit, 0)
        digits = frac or ""
        value = (int(whole or "0") << shift) + (int(digits or "0") << shift) // 10 ** len(digits)
    if value >= 2**63:
        raise CommandError(f"Parsing error: argument too large -- {text}")
    return value


def parse_pattern(text: str) -> int:
    """A pattern byte (``0xab``, ``171``, ``0253``) as qemu-io takes it."""
    try:
        value = (
            int(text, 16) if text[:2] in ("0x", "0X") else int(text, 8 if text[:1] == "0" else 10)
        )
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        raise CommandError(f"{text} is not a valid pattern byte")
    return value


_BINARY_UNITS = ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"))


def size_text(value: float) -> str:
    """A number of bytes the way qemu-io prints it: ``512 bytes``, ``1.500 KiB``, ``64 KiB``."""
    text, unit = f"{value:f}", "bytes"
    for shift, name in _BINARY_UNITS:
        if value >= 1 << shift:
            text, unit = f"{value / (1 << shift):.3f}", name
            break
    # A ".000" anywhere ends the number (so whole values print without decimals).
    cut = text.find(".000")
    return f"{text[:cut] if cut >= 0 else text} {unit}"


def time_text(seconds: float) -> str:
    """Elapsed time as qemu-io prints it: ``00.01 sec`` below a minute."""
    centis = int(seconds * 100)
    secs, cs = divmod(centis, 100)
    mins, secs = divmod(secs, 60)
    hours, mins = divmod(mins, 60)
    if hours:
        return f"{hours}:{mins:02d}:{secs:02d}.{cs:02d}"
    if mins:
        return f"{mins:02d}:{secs:02d}.{cs:02d}"
    return f"{secs:02d}.{cs:02d} sec"


def report_line(total: int, seconds: float, ops: int = 1) -> str:
    """qemu-io's timing line: ``64 KiB, 1 ops; 00.00 sec (55.421 MiB/sec and 886.7339 ops/sec)``."""
    t = max(seconds, 1e-9)
    return (
        f"{size_text(total)}, {ops} ops; {time_text(seconds)} "
        f"({size_text(total / t)}/sec and {ops / t:.4f} ops/sec)"
    )


def report_line_c(total: int, seconds: float, ops: int = 1) -> str:
    """qemu-io's ``-C`` line: bytes, ops, time, bytes/sec and ops/sec
    (``512,1,0:00:00.00,2942562.558,5747.192``)."""
    t = max(seconds, 1e-9)
    centis = int(seconds * 100)
    secs, cs = divmod(centis, 100)
    mins, secs = divmod(secs, 60)
    hours, mins = divmod(mins, 60)
    return f"{total},{ops},{hours}:{mins:02d}:{secs:02d}.{cs:02d},{total / t:.3f},{ops / t:.3f}"


def dump(data: bytes, offset: int) -> str:
    """``read -v``'s hex dump: 16 bytes a line, the guest offset, hex, then printable ASCII."""
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        # Letters and digits as they are, every other byte as '.' (qemu-io's isalnum test).
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in chunk)
        lines.append(f"{offset + i:08x}:  {' '.join(f'{b:02x}' for b in chunk)}  {text}")
    return "\n".join(lines)


def _options(name: str, words: list[str], flags: str) -> tuple[dict[str, str], list[str]]:
    """getopt-style parse of a command's words (options may follow operands, as with GNU
    getopt); *flags* lists the option letters, ``P:`` one that takes a value."""
    opts: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            rest += words[i:]
            break
        if not word.startswith("-") or word == "-":
            rest.append(word)
            continue
        j = 1
        while j < len(word):
            letter = word[j]
            at = flags.find(letter)
            if at < 0 or letter == ":":
                raise CommandError(
                    f"{name}: invalid option -- '{letter}'", to_stderr=True, usage=_USAGE[name]
                )
            if flags[at + 1 : at + 2] == ":":
                value = word[j + 1 :]
                if not value:
                    if i >= len(words):
                        raise CommandError(
                            f"{name}: option requires an argument -- '{letter}'",
                            to_stderr=True,
                            usage=_USAGE[name],
                        )
                    value = words[i]
                    i += 1
                opts[letter] = value
                break
            opts[letter] = ""
            j += 1
    return opts, rest


def _operands(name: str, rest: list[str]) -> tuple[int, int]:
    if len(rest) != 2:
        if len(rest) < 2:
            raise CommandError(
                f"bad argument count {len(rest)} to {name}, expected at least 2 arguments",
                to_stderr=True,
            )
        raise CommandError(_USAGE[name])  # qemu-io prints only the usage line here
    offset = parse_number(rest[0])
    length = parse_number(rest[1])
    if length > MAX_REQUEST:
        raise CommandError(f"length cannot exceed {MAX_REQUEST}, given {rest[1]}")
    return offset, length


def _failure(what: str, exc: BaseException) -> CommandError:
    """qemu-io's ``read failed: <strerror>``; out-of-range requests fail with EIO there too."""
    import errno
    import os

    code = getattr(exc, "errno", None) or errno.EIO
    return CommandError(f"{what} failed: {os.strerror(code)}")


class Session:
    """Runs qemu-io commands against one open image, printing as qemu-io does."""

    def __init__(self, image: Image, out: Any = None, err: Any = None) -> None:
        self.image = image
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr

    def run(self, line: str) -> bool:
        """Runs one command line; returns whether it succeeded."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            print(f"{exc}", file=self.err)
            return False
        if not words:
            return True
        from qcow2ovl import _cli_io_more as more

        handlers: dict[str, Callable[[list[str]], bool]] = {
            "read": self._read,
            "write": self._write,
            "discard": self._discard,
            "flush": self._flush,
            "aio_flush": self._flush,  # every request here completes before the next command
        }
        for name, func in more.COMMANDS.items():
            handlers[name] = functools.partial(func, self)
        handler = handlers.get(words[0])
        if handler is None:
            print(f'command "{words[0]}" not found', file=self.err)
            return False
        try:
            return handler(words[1:])
        except CommandError as exc:
            print(str(exc), file=self.err if exc.to_stderr else self.out)
            if exc.usage:
                print(exc.usage, file=self.out)
            return False

    def done(
        self, verb: str, total: int, offset: int, seconds: float, opts: dict[str, str], ops: int = 1
    ) -> None:
        """The lines qemu-io prints after a request: none with ``-q``, the ``-C`` line, or
        ``wrote N/N bytes at offset X`` and the timing line."""
        if "q" in opts:
            return
        if "C" in opts:
            print(report_line_c(total, seconds, ops), file=self.out)
            return
        print(f"{verb} {total}/{total} bytes at offset {offset}", file=self.out)
        print(report_line(total, seconds, ops), file=self.out)

    def check_pattern(self, data: bytes, pattern: int | None, offset: int) -> bool:
        """``-P``: every byte of *data* is *pattern*, else qemu-io's line."""
        if pattern is not None and data != bytes([pattern]) * len(data):
            print(
                f"Pattern verification failed at offset {offset}, {len(data)} bytes",
                file=self.out,
            )
            return False
        return True

    def end_check(self, offset: int, length: int) -> None:
        """A request past the end of the disk fails with EIO, as in qemu-io."""
        if offset + length > self.image.virtual_size:
            raise OSError(5, "beyond the end of the disk")

    def _read(self, words: list[str]) -> bool:
        opts, rest = _options("read", words, "bCpqrvP:s:l:")
        if "b" in opts:
            raise CommandError("read failed: Operation not supported")  # no VM state here
        pattern = parse_pattern(opts["P"]) if "P" in opts else None
        if ("s" in opts or "l" in opts) and pattern is None:
            raise CommandError(_USAGE["read"])
        offset, length = _operands("read", rest)
        start = parse_number(opts["s"]) if "s" in opts else 0
        count = parse_number(opts["l"]) if "l" in opts else length - start
        if start + count > length:
            raise CommandError("pattern verification range exceeds end of read data")
        t0 = time.perf_counter()
        try:
            data = self.image.read(offset, length)
        except (OSError, ValueError) as exc:
            raise _failure("read", exc) from None
        seconds = time.perf_counter() - t0
        ok = self.check_pattern(data[start : start + count], pattern, offset + start)
        if "v" in opts and "q" not in opts and data:
            print(dump(data, offset), file=self.out)
        self.done("read", length, offset, seconds, opts)
        return ok

    def _write(self, words: list[str]) -> bool:
        opts, rest = _options("write", words, "bcCfnpqruzP:s:")
        if sum(k in opts for k in "zPs") > 1:
            raise CommandError("Only one of -z, -P, and -s can be specified at the same time")
        if "u" in opts and "z" not in opts:
            raise CommandError("-u requires -z to be specified")
        if "n" in opts and "z" not in opts:
            raise CommandError("-n requires -z to be specified")
        if "b" in opts:
            raise CommandError("write failed: Operation not supported")  # no VM state here
        pattern = parse_pattern(opts["P"]) if "P" in opts else DEFAULT_PATTERN
        offset, length = _operands("write", rest)
        data: bytes | None
        if "s" in opts:
            # The file's bytes, repeated to fill the buffer, as qemu-io fills it.
            try:
                with open(opts["s"], "rb") as f:
                    source = f.read(length)
            except OSError as exc:
                raise CommandError(f"{opts['s']}: {exc.strerror}", to_stderr=True) from None
            if not source:
                raise CommandError(f"{opts['s']}: file is empty", to_stderr=True)
            data = (source * -(-length // len(source)))[:length]
        else:
            data = None if "z" in opts else bytes([pattern]) * length
        t0 = time.perf_counter()
        try:
            self.end_check(offset, length)
            if data is None:
                cs = self.image.info.cluster_size
                if "n" in opts and (offset % cs or (offset + length) % cs):
                    raise OSError(95, "no fast zeroing of partial clusters")
                self.image.write_zeroes(offset, length, unmap="u" in opts)
            elif "c" in opts:
                self._write_compressed(offset, data)
            else:
                self.image.write(offset, data)
            if "f" in opts:
                self.image.flush()  # Force Unit Access: on disk before the command ends
        except (OSError, ValueError) as exc:
            raise _failure("write", exc) from None
        self.done("wrote", length, offset, time.perf_counter() - t0, opts)
        return True

    def _write_compressed(self, offset: int, data: bytes) -> None:
        """``write -c``: whole clusters (the last one may end at the end of the disk), each
        compressed as QEMU's compressed writes store it; anything else is EINVAL there."""
        cs = self.image.info.cluster_size
        end = offset + len(data)
        if offset % cs or (end % cs and end != self.image.virtual_size):
            raise OSError(22, "compressed writes need whole clusters")
        for e in self.image.guest_map():
            if e.start < end and offset < e.start + e.length and e.depth == 0 and e.present:
                if e.data or e.offset is not None:
                    # QEMU writes compressed clusters only where nothing is allocated.
                    raise OSError(5, "the cluster is allocated")
        for at in range(0, len(data), cs):
            self.image.write_compressed(offset + at, data[at : at + cs])

    def _discard(self, words: list[str]) -> bool:
        opts, rest = _options("discard", words, "Cq")
        offset, length = _operands("discard", rest)
        t0 = time.perf_counter()
        try:
            self.end_check(offset, length)
            self.image.discard(offset, length)
        except (OSError, ValueError) as exc:
            raise _failure("discard", exc) from None
        self.done("discard", length, offset, time.perf_counter() - t0, opts)
        return True

    def _flush(self, words: list[str]) -> bool:
        if words:
            raise CommandError(
                f"bad argument count {len(words)} to flush, expected 0 arguments", to_stderr=True
            )
        if self.image.writable:
            try:
                self.image.flush()
            except OSError as exc:
                raise _failure("flush", exc) from None
        return True


def needs_writable(commands: Sequence[str]) -> bool:
    """Whether any of the command lines writes (``write``, ``writev``, ``aio_write``,
    ``discard``, ``truncate``)."""
    return any(line.split()[:1] and line.split()[0] in _WRITING for line in commands)


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl io``; returns 0 when every command succeeded, else 1."""
    from qcow2ovl.errors import CorruptImageError, Qcow2Error
    from qcow2ovl.image import open as open_image

    if args.fmt != "qcow2":
        print(f"qcow2ovl: Unknown driver '{args.fmt}'", file=sys.stderr)
        return 1
    if args.force_share and not args.read_only:
        # qemu-io opens read-write without -r, and -U cannot share a writer's image.
        print(
            f"qcow2ovl: can't open device {args.image}: force-share=on can only be used with "
            "read-only images",
            file=sys.stderr,
        )
        return 1
    writable = needs_writable(args.commands) and not args.read_only
    if writable:
        import logging

        # QEMU's corruption message, on stderr as qemu-io prints it.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("qcow2ovl")
        logger.addHandler(handler)
        logger.propagate = False
    try:
        image = open_image(
            args.image,
            writable=writable,
            overlap_check=args.overlap_check,
            force_share=args.force_share,
        )
    except (Qcow2Error, OSError, ValueError) as exc:
        text = str(exc)
        if isinstance(exc, Qcow2Error):
            text = text.removeprefix(f"{args.image}: ")
            if isinstance(exc, CorruptImageError):
                text = f"qcow2: {text}"  # the driver's name, as QEMU prefixes this one
        elif isinstance(exc, OSError) and exc.strerror:
            text = f"Could not open '{args.image}': {exc.strerror}"
        print(f"qcow2ovl: can't open device {args.image}: {text}", file=sys.stderr)
        return 1
    ok = True
    with image:
        session = Session(image)
        for line in args.commands:
            ok = session.run(line) and ok
            sys.stdout.flush()
    return 0 if ok else 1


#: ``io --help``'s description (plain text).
IO_HELP = """\
Run qemu-io's commands, in qemu-io's syntax and with its output, on one qcow2 image through
qcow2ovl's guarded engine (numbers with qemu-io's suffixes b k M G T P E, 0x hex):

  read [-bCqrv] [-P pattern [-s off] [-l len]] off len
  write [-bcCfnqruz] [-P pattern | -s source_file] off len
  readv [-Cqrv] [-P pattern] off len [len..]
  writev [-Cfqr] [-P pattern] off len [len..]
  aio_read [-Ciqrv] [-P pattern] off len [len..]
  aio_write [-Cfiqruz] [-P pattern] off len [len..]
  aio_flush, flush
  discard [-Cq] off len
  alloc offset [count]; map; length; info
  truncate off

Each command prints what qemu-io prints (-C: the machine-parsable line). aio requests complete
before the next command. A failed command does not stop the next one; the exit status is 1 if
any failed. The image is opened writable only when a command writes to it. A write that would
land on metadata is refused with QEMU's message on stderr, the image is marked corrupt and every
later write fails.
"""


def add_parser(subparsers: Any) -> None:
    """Add the ``io`` subcommand to an ``argparse`` subparsers object."""
    import argparse

    p = subparsers.add_parser(
        "io",
        help="run qemu-io's commands (read, write, readv, aio_write, alloc, map, ...) on a qcow2 "
        "image",
        description=IO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-c",
        dest="commands",
        action="append",
        required=True,
        metavar="CMD",
        help="a command to run (repeatable; run in order)",
    )
    p.add_argument("-f", dest="fmt", default="qcow2", help="image format (only qcow2)")
    p.add_argument(
        "-r",
        "--read-only",
        dest="read_only",
        action="store_true",
        help="open the image read-only (writing commands fail)",
    )
    from qcow2ovl._cli_options import add_force_share

    add_force_share(p)
    p.add_argument(
        "--overlap-check",
        default="all",
        help="metadata types writes are checked against (QEMU's syntax; default: all)",
    )
    p.add_argument("image", help="path of the qcow2 image")
    p.set_defaults(func=run)


__all__ = [
    "DEFAULT_PATTERN",
    "MAX_REQUEST",
    "CommandError",
    "Session",
    "add_parser",
    "dump",
    "needs_writable",
    "parse_number",
    "parse_pattern",
    "report_line",
    "run",
    "size_text",
]
