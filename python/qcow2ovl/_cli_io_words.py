"""qemu-io's words, shared by every ``qcow2ovl io`` command: its numbers (size suffixes
``b k M G T P E``, ``0x`` hex), patterns, option letters and usage lines, the sizes, times and
hex dumps it prints, and :class:`CommandError`, a failed command's message.
"""

from __future__ import annotations

import re

#: The largest request qemu-io takes (its block layer's limit: INT_MAX rounded down to 512).
MAX_REQUEST = 2147483136
#: The byte ``write`` writes without ``-P``, as in qemu-io.
DEFAULT_PATTERN = 0xCD

_UNITS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_NUMBER = re.compile(
    r"(?P<hex>0[xX][0-9a-fA-F]+)|(?P<int>[0-9]*)(?:\.(?P<frac>[0-9]*))?(?P<unit>[bkmgtpeBKMGTPE]?)",
    re.ASCII,
)
WRITING = ("write", "discard", "writev", "aio_write", "truncate")
#: qemu-io's usage line of each command (printed after a bad option, as qemu-io prints it).
USAGE = {
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


def parse_options(name: str, words: list[str], flags: str) -> tuple[dict[str, str], list[str]]:
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
                    f"{name}: invalid option -- '{letter}'", to_stderr=True, usage=USAGE[name]
                )
            if flags[at + 1 : at + 2] == ":":
                value = word[j + 1 :]
                if not value:
                    if i >= len(words):
                        raise CommandError(
                            f"{name}: option requires an argument -- '{letter}'",
                            to_stderr=True,
                            usage=USAGE[name],
                        )
                    value = words[i]
                    i += 1
                opts[letter] = value
                break
            opts[letter] = ""
            j += 1
    return opts, rest


def parse_operands(name: str, rest: list[str]) -> tuple[int, int]:
    if len(rest) != 2:
        if len(rest) < 2:
            raise CommandError(
                f"bad argument count {len(rest)} to {name}, expected at least 2 arguments",
                to_stderr=True,
            )
        raise CommandError(USAGE[name])  # qemu-io prints only the usage line here
    offset = parse_number(rest[0])
    length = parse_number(rest[1])
    if length > MAX_REQUEST:
        raise CommandError(f"length cannot exceed {MAX_REQUEST}, given {rest[1]}")
    return offset, length


def io_failure(what: str, exc: BaseException) -> CommandError:
    """qemu-io's ``read failed: <strerror>``; out-of-range requests fail with EIO there too."""
    import errno
    import os

    code = getattr(exc, "errno", None) or errno.EIO
    return CommandError(f"{what} failed: {os.strerror(code)}")
