"""What ``qcow2ovl info`` and ``qcow2ovl map`` print: sizes as qemu-img writes them, the JSON
objects (keys documented in ``docs/cli.md``), and the human-readable text.

Where ``qemu-img info --output=json`` has a key for the same fact, the JSON uses QEMU's key and
QEMU's meaning (``tests/test_cli.py`` compares them key by key); keys of our own have names QEMU
does not use.
"""

from __future__ import annotations

import math

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from qcow2ovl.image import Image, Snapshot
    from qcow2ovl.types import MetadataType

_UNITS = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")

#: Compression type names as QEMU prints them, and the other spelling accepted on input.
COMPRESSION_TYPES: dict[str, int] = {"zlib": 0, "deflate": 0, "zstd": 1}


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


def info_dict(image: Image) -> dict[str, Any]:
    """The JSON form of ``qcow2ovl info`` (see ``docs/cli.md``)."""
    i = image.info
    d: dict[str, Any] = {
        "filename": image.path,
        "format": "qcow2",
        "virtual-size": i.virtual_size,
        "cluster-size": i.cluster_size,
        "dirty-flag": i.dirty,
        "encrypted": i.encrypted,
        "backing-filename": i.backing_file,
        "backing-filename-format": i.backing_format,
        # QEMU's format-specific keys, flat.
        "compat": "1.1" if i.version == 3 else "0.10",
        "compression-type": i.compression_type,
        "lazy-refcounts": i.lazy_refcounts,
        "refcount-bits": i.refcount_bits,
        "corrupt": i.corrupt,
        "extended-l2": i.extended_l2,
        "data-file": i.data_file,
        "data-file-raw": "raw external data" in i.features,
        # Our own keys.
        "version": i.version,
        "file-size": i.file_size,
        "crypt-method": i.crypt_method,
        "features": list(i.features),
        "snapshots": [
            {
                "id": s.id,
                "name": s.name,
                "vm-state-size": s.vm_state_size,
                "date-sec": s.date_sec,
                "date-nsec": s.date_nsec,
                "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
                "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                **({} if s.icount is None else {"icount": s.icount}),
                "disk-size": s.disk_size,
                "l1-table-offset": s.l1_table_offset,
                "l1-size": s.l1_size,
            }
            for s in image.snapshots
        ],
        "bitmaps": [
            {
                "name": b.name,
                "granularity": b.granularity,
                "flags": [f for f, on in (("in-use", b.in_use), ("auto", b.auto)) if on],
                "table-offset": b.table_offset,
                "table-size": b.table_size,
            }
            for b in image.bitmaps
        ],
        "overlap-check": str(image.overlap_check),
        "metadata-map-bytes": image.map_memory_usage(),
        "problems": [
            {"kind": p.kind, "offset": p.offset, "size": p.size, "message": p.message}
            for p in image.problems
        ],
    }
    return d


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
    row = "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}"
    lines = ["Snapshot list:", row.format("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")]
    for s in snapshots:
        date = _dt.datetime.fromtimestamp(s.date_sec).strftime("%Y-%m-%d %H:%M:%S")
        icount = "" if s.icount is None or s.icount == _ICOUNT_OFF else str(s.icount)
        lines.append(
            row.format(
                s.id,
                s.name,
                size_text(s.vm_state_size),
                date,
                _clock_text(s.vm_clock_nsec),
                icount,
            )
        )
    return lines


#: The icount QEMU records when record/replay was off (shown blank).
_ICOUNT_OFF = (1 << 64) - 1


def info_text(image: Image, d: dict[str, Any]) -> str:
    """The human form of ``qcow2ovl info``, following ``qemu-img info``."""
    lines = [
        f"image: {d['filename']}",
        "file format: qcow2",
        f"virtual size: {size_with_bytes(d['virtual-size'])}",
        f"file size: {size_text(d['file-size'])}",
        f"cluster_size: {d['cluster-size']}",
    ]
    if d["backing-filename"]:
        lines.append(f"backing file: {d['backing-filename']}")
        if d["backing-filename-format"]:
            lines.append(f"backing file format: {d['backing-filename-format']}")
    if d["snapshots"]:
        lines.extend(snapshot_list_lines(image.snapshots))
    lines.append("Format specific information:")
    lines.append(f"    compat: {d['compat']}")
    lines.append(f"    compression type: {d['compression-type']}")
    lines.append(f"    lazy refcounts: {str(d['lazy-refcounts']).lower()}")
    lines.append(f"    refcount bits: {d['refcount-bits']}")
    lines.append(f"    corrupt: {str(d['corrupt']).lower()}")
    lines.append(f"    extended l2: {str(d['extended-l2']).lower()}")
    if d["encrypted"]:
        lines.append(f"    encrypt method: {'luks' if d['crypt-method'] == 2 else 'aes'}")
    if d["data-file"]:
        lines.append(f"    data file: {d['data-file']}")
        lines.append(f"    data file raw: {str(d['data-file-raw']).lower()}")
    if d["features"]:
        lines.append(f"    features: {', '.join(d['features'])}")
    for b in d["bitmaps"]:
        lines.append(
            f"    bitmap: {b['name']} (granularity {b['granularity']}, "
            f"flags [{', '.join(b['flags'])}])"
        )
    lines.append(f"overlap checks: {d['overlap-check']}")
    lines.append(f"metadata map: {d['metadata-map-bytes']} bytes")
    for p in d["problems"]:
        lines.append(f"problem: {p['message']}")
    return "\n".join(lines)


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
