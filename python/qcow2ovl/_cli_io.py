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
import shlex
import sys
import time

from qcow2ovl._cli_io_words import (
    DEFAULT_PATTERN,
    MAX_REQUEST,
    USAGE,
    WRITING,
    CommandError,
    dump,
    io_failure,
    parse_number,
    parse_operands,
    parse_options,
    parse_pattern,
    report_line,
    report_line_c,
    size_text,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any

    from qcow2ovl.image import Image


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
        opts, rest = parse_options("read", words, "bCpqrvP:s:l:")
        if "b" in opts:
            raise CommandError("read failed: Operation not supported")  # no VM state here
        pattern = parse_pattern(opts["P"]) if "P" in opts else None
        if ("s" in opts or "l" in opts) and pattern is None:
            raise CommandError(USAGE["read"])
        offset, length = parse_operands("read", rest)
        start = parse_number(opts["s"]) if "s" in opts else 0
        count = parse_number(opts["l"]) if "l" in opts else length - start
        if start + count > length:
            raise CommandError("pattern verification range exceeds end of read data")
        t0 = time.perf_counter()
        try:
            data = self.image.read(offset, length)
        except (OSError, ValueError) as exc:
            raise io_failure("read", exc) from None
        seconds = time.perf_counter() - t0
        ok = self.check_pattern(data[start : start + count], pattern, offset + start)
        if "v" in opts and "q" not in opts and data:
            print(dump(data, offset), file=self.out)
        self.done("read", length, offset, seconds, opts)
        return ok

    def _write(self, words: list[str]) -> bool:
        opts, rest = parse_options("write", words, "bcCfnpqruzP:s:")
        if sum(k in opts for k in "zPs") > 1:
            raise CommandError("Only one of -z, -P, and -s can be specified at the same time")
        if "u" in opts and "z" not in opts:
            raise CommandError("-u requires -z to be specified")
        if "n" in opts and "z" not in opts:
            raise CommandError("-n requires -z to be specified")
        if "b" in opts:
            raise CommandError("write failed: Operation not supported")  # no VM state here
        pattern = parse_pattern(opts["P"]) if "P" in opts else DEFAULT_PATTERN
        offset, length = parse_operands("write", rest)
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
            raise io_failure("write", exc) from None
        self.done("wrote", length, offset, time.perf_counter() - t0, opts)
        return True

    def _write_compressed(self, offset: int, data: bytes) -> None:
        """``write -c``: whole clusters (the last one may end at the end of the disk), each
        compressed as QEMU's compressed writes store it; anything else is EINVAL there."""
        cs = self.image.info.cluster_size
        end = offset + len(data)
        if offset % cs or (end % cs and end != self.image.virtual_size):
            raise OSError(22, "compressed writes need whole clusters")
        for e in self.image.iter_guest_map():
            if e.start < end and offset < e.start + e.length and e.depth == 0 and e.present:
                if e.data or e.offset is not None:
                    # QEMU writes compressed clusters only where nothing is allocated.
                    raise OSError(5, "the cluster is allocated")
        for at in range(0, len(data), cs):
            self.image.write_compressed(offset + at, data[at : at + cs])

    def _discard(self, words: list[str]) -> bool:
        opts, rest = parse_options("discard", words, "Cq")
        offset, length = parse_operands("discard", rest)
        t0 = time.perf_counter()
        try:
            self.end_check(offset, length)
            self.image.discard(offset, length)
        except (OSError, ValueError) as exc:
            raise io_failure("discard", exc) from None
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
                raise io_failure("flush", exc) from None
        return True


def needs_writable(commands: Sequence[str]) -> bool:
    """Whether any of the command lines writes (``write``, ``writev``, ``aio_write``,
    ``discard``, ``truncate``)."""
    return any(line.split()[:1] and line.split()[0] in WRITING for line in commands)


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl io``; returns 0 when every command succeeded, else 1."""
    from qcow2ovl._cli_secrets import ImageOpts, OptionsError, image_opts, secrets
    from qcow2ovl.errors import CorruptImageError, Qcow2Error
    from qcow2ovl.image import open as open_image

    if args.fmt != "qcow2":
        print(f"qcow2ovl: Unknown driver '{args.fmt}'", file=sys.stderr)
        return 1
    # qemu-io names the device in its open errors, but not one given by --image-opts.
    device = "" if args.image_opts else f" device {args.image}"
    try:
        found = secrets(args.objects)
    except OptionsError as exc:
        print(f"qcow2ovl: {exc}", file=sys.stderr)
        return 1
    try:
        target = image_opts(args.image, found) if args.image_opts else ImageOpts(args.image)
    except OptionsError as exc:
        print(f"qcow2ovl: can't open{device}: {exc}", file=sys.stderr)
        return 1
    if args.force_share and not args.read_only:
        # qemu-io opens read-write without -r, and -U cannot share a writer's image.
        print(
            f"qcow2ovl: can't open{device}: force-share=on can only be used with read-only images",
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
            target.filename,
            writable=writable,
            overlap_check=args.overlap_check,
            force_share=args.force_share,
            secret=target.secret,
        )
    except (Qcow2Error, OSError, ValueError) as exc:
        text = str(exc)
        if isinstance(exc, Qcow2Error):
            text = text.removeprefix(f"{target.filename}: ")
            if isinstance(exc, CorruptImageError):
                text = f"qcow2: {text}"  # the driver's name, as QEMU prefixes this one
        elif isinstance(exc, OSError) and exc.strerror:
            text = f"Could not open '{target.filename}': {exc.strerror}"
        print(f"qcow2ovl: can't open{device}: {text}", file=sys.stderr)
        return 1
    if image.info.encrypted and target.secret is None:
        from qcow2ovl._core import KEY_SECRET_REQUIRED

        # qemu-io opens no encrypted image without its secret.
        image.close()
        print(f"qcow2ovl: can't open{device}: {KEY_SECRET_REQUIRED}", file=sys.stderr)
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
    from qcow2ovl._cli_secrets import add_arguments

    add_arguments(p)
    p.add_argument(
        "--overlap-check",
        default="all",
        help="metadata types writes are checked against (QEMU's syntax; default: all)",
    )
    p.add_argument("image", help="path of the qcow2 image (an options string with --image-opts)")
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
