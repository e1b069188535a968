"""What ``qcow2ovl map`` prints and what the commands share: sizes as qemu-img writes them,
compression type names, the snapshot listing. ``qcow2ovl info``'s objects and text are in
``_cli_info``.
"""

from __future__ import annotations

import math

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from qcow2ovl.image import Snapshot
    from qcow2ovl.types import MetadataType

_UNITS = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")

#: Compression type names as QEMU prints them, and the other spelling accepted on input.
COMPRESSION_TYPES: dict[str, int] = {"zlib": 0, "deflate": 0, "zstd": 1}


#: The first bytes of every qcow2 file.
QCOW2_MAGIC = b"QFI\xfb"


def probe_format(path: str) -> str:
    """qemu-img's probe for the two formats qcow2ovl reads: ``qcow2`` when the file starts with
    the qcow2 magic, else ``raw``."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


def compression_type_code(name: str) -> int:
    """The header's compression type code for *name* (QEMU's ``zlib`` or ``zstd``; the
    format specification's ``deflate`` is accepted for ``zlib``). ``ValueError`` otherwise."""
    code = COMPRESSION_TYPES.get(name) if isinstance(name, str) else None
    if code is None:
        raise ValueError(
            f"Unsupported compression type {name!r}. Allowed are any of the following: zlib, zstd"
        )
    return code


def size_text(n: int) -> str:
    """A byte count as qemu-img prints it: three significant digits in the largest binary unit
    that keeps the number below 1000 (``1000 GiB`` is ``0.977 TiB``; ``999 B`` stays in bytes).

    qemu-img picks the unit from the binary exponent of ``n * 1.024`` in double precision and
    prints with C's ``%0.3g``; this does the same arithmetic, so values near a unit boundary and
    beyond 2^53 round exactly as there.
    """
    _, exponent = math.frexp(n / (1000.0 / 1024.0))
    unit = max(0, exponent - 1) // 10
    return "%0.3g %sB" % (n / float(1 << (10 * unit)), _UNITS[unit])  # noqa: UP031 - C's %g


def size_with_bytes(n: int) -> str:
    """``1 GiB (1073741824 bytes)``, as qemu-img prints the virtual size."""
    return f"{size_text(n)} ({n} bytes)"


def types_text(types: MetadataType) -> str:
    """Option keys of the set bits joined by ``|`` (``active-l2|inactive-l2``)."""
    return "|".join(types.keys())


def _clock_text(nsec: int) -> str:
    """A snapshot's VM clock as qemu-img's list shows it (``0000:00:00.000``)."""
    secs, ms = divmod(nsec // 1_000_000, 1000)
    minutes, s = divmod(secs, 60)
    hours, m = divmod(minutes, 60)
    return f"{hours:04d}:{m:02d}:{s:02d}.{ms:03d}"


def snapshot_list_lines(snapshots: Sequence[Snapshot]) -> list[str]:
    """``qemu-img snapshot -l``'s listing (also in ``qemu-img info``): a title, a header and one
    line per snapshot, the date in local time as QEMU prints it; nothing without snapshots."""
    import datetime as _dt

    if not snapshots:
        return []
    row = "{} {} {:>8} {:>19} {:>15} {:>10}"  # ID and TAG padded by _padded
    lines = [
        "Snapshot list:",
        row.format(_padded("ID", 7), _padded("TAG", 16), "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"),
    ]
    for s in snapshots:
        date = _dt.datetime.fromtimestamp(s.date_sec).strftime("%Y-%m-%d %H:%M:%S")
        icount = "" if s.icount is None or s.icount == _ICOUNT_OFF else str(s.icount)
        lines.append(
            row.format(
                _padded(s.id, 7),
                _padded(s.name, 16),
                size_text(s.vm_state_size),
                date,
                _clock_text(s.vm_clock_nsec),
                icount,
            )
        )
    return lines


def _padded(text: str, width: int) -> str:
    """*text* padded to *width* bytes of UTF-8, as C's ``%-16s`` pads (by bytes, not
    characters)."""
    return text + " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))


#: The icount QEMU records when record/replay was off (shown blank).
_ICOUNT_OFF = (1 << 64) - 1


def map_records(extents: Sequence[tuple[int, int, MetadataType]]) -> list[dict[str, Any]]:
    """The JSON form of ``qcow2ovl map``."""
    return [
        {"offset": off, "length": length, "types": int(types), "names": types.keys()}
        for off, length, types in extents
    ]


def map_text(extents: Sequence[tuple[int, int, MetadataType]]) -> str:
    """The human form of ``qcow2ovl map``, aligned like ``qemu-img map``."""
    lines = [f"{'Offset':<16}{'Length':<16}Types"]
    lines += [f"{off:<#16x}{length:<#16x}{types_text(types)}" for off, length, types in extents]
    return "\n".join(lines)
