"""``qcow2ovl info``: ``qemu-img info``'s object and text, key for key and value for value, with
qcow2ovl's own facts under one extra key (``"qcow2ovl"``), and ``--backing-chain``.

The key order is QEMU's: qemu-img prints its dictionaries in the order of their hash buckets
(QEMU's ``QDict``), so each object's keys are listed here in that order. The JSON text is
written as QEMU's JSON writer writes it (4-space indents, empty containers opened and closed on
two lines, ``\\u00E9`` escapes), so that the output equals qemu-img's byte for byte on an image
both read the same way (``tests/test_cli_info.py``). No :mod:`json` import: startup time.
"""

from __future__ import annotations

import os
import re

from qcow2ovl._format import size_text, size_with_bytes, snapshot_list_lines

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from qcow2ovl.image import Image

# Each object's keys in QEMU's order (the order of their QDict hash buckets).
_IMAGE_KEYS = (
    "children",
    "backing-filename-format",
    "snapshots",
    "virtual-size",
    "filename",
    "cluster-size",
    "format",
    "actual-size",
    "format-specific",
    "full-backing-filename",
    "encrypted",
    "backing-filename",
    "dirty-flag",
)
_QCOW2_DATA_KEYS = (
    "compat",
    "compression-type",
    "lazy-refcounts",
    "bitmaps",
    "refcount-bits",
    "data-file",
    "encrypt",
    "data-file-raw",
    "corrupt",
    "extended-l2",
)
_SNAPSHOT_KEYS = (
    "icount",
    "vm-clock-nsec",
    "name",
    "date-sec",
    "date-nsec",
    "vm-clock-sec",
    "id",
    "vm-state-size",
)
#: The icount QEMU records when record/replay was off (no ``icount`` key then).
_ICOUNT_OFF = (1 << 64) - 1
#: The key of qcow2ovl's own facts (QEMU has no key of this name).
OWN_KEY = "qcow2ovl"


def _ordered(d: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    """*d*'s keys in *order* (keys *d* lacks are left out)."""
    return {k: d[k] for k in order if k in d}


# ---- QEMU's JSON text ----------------------------------------------------------------------


#: Text QEMU writes as it is (printable ASCII but the quote and the backslash): most keys
#: and values, and the fast path of :func:`_quote` (65,536 snapshots print in 0.3 s, not 3 s).
_PLAIN = re.compile(r"[ !#-\[\]-~]*")


def _quote(text: str) -> str:
    """A JSON string as QEMU writes it: ``\\uXXXX`` (upper case) below 0x20 and from 0x7F."""
    if _PLAIN.fullmatch(text):
        return f'"{text}"'
    out = ['"']
    for ch in text:
        cp = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif 0xD800 <= cp < 0xE000:
            out.append("\\uFFFD")  # a lone surrogate (undecodable byte): QEMU's replacement
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_json(value: Any, depth: int = 0) -> str:
    """*value* as ``qemu-img --output=json`` prints it (without the final newline)."""
    kind = type(value)
    if kind is dict:
        items = [
            f"{_KEYS.get(k) or _key(k)}: "
            f"{to_json(v, depth + 1) if type(v) in _NESTED else _scalar(v)}"
            for k, v in value.items()
        ]
        return _container("{", "}", items, depth)
    if kind is list:
        return _container("[", "]", [to_json(v, depth + 1) for v in value], depth)
    return _scalar(value)


#: The types :func:`to_json` descends into; everything else is a scalar.
_NESTED = (dict, list)
#: Keys as quoted, for the few keys that repeat in every snapshot and bitmap entry.
_KEYS: dict[str, str] = {}


def _key(key: str) -> str:
    quoted = _quote(key)
    if len(_KEYS) < 1024:
        _KEYS[key] = quoted
    return quoted


def _scalar(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    return _quote(str(value))


def _container(start: str, end: str, items: list[str], depth: int) -> str:
    inner = "\n" + " " * (4 * (depth + 1))
    return start + ",".join(inner + item for item in items) + "\n" + " " * (4 * depth) + end


# ---- the objects ---------------------------------------------------------------------------


def _allocated(st: os.stat_result) -> int:
    """Bytes the file occupies on disk (QEMU's ``actual-size``)."""
    return int(st.st_blocks) * 512


def _length(st: os.stat_result) -> int:
    """The file's length as QEMU's block layer has it: whole 512-byte sectors."""
    return -(-st.st_size // 512) * 512


def _file_node(path: str, st: os.stat_result) -> dict[str, Any]:
    """The ``file`` child: the host file as QEMU's file driver reports it."""
    return {
        "children": [],
        "virtual-size": _length(st),
        "filename": path,
        "format": "file",
        "actual-size": _allocated(st),
        "format-specific": {"type": "file", "data": {}},
        "dirty-flag": False,
    }


def full_backing_filename(path: str, backing: str) -> str:
    """Where QEMU looks for *backing*: a relative name joined to the image's folder, as given
    (``dir/top.qcow2`` and ``base.qcow2`` make ``dir/base.qcow2``)."""
    if backing.startswith("/"):
        return backing
    return path[: path.rfind("/") + 1] + backing


def image_info(image: Image) -> dict[str, Any]:
    """``qemu-img info --output=json``'s object for *image*, plus ``"qcow2ovl"``: our own facts
    (``docs/cli.md``)."""
    i = image.info
    path = image.path
    st = os.stat(path)
    data: dict[str, Any] = {
        "compat": "1.1" if i.version == 3 else "0.10",
        "compression-type": i.compression_type,
        "refcount-bits": i.refcount_bits,
    }
    if i.version == 3:
        data["lazy-refcounts"] = i.lazy_refcounts
        data["corrupt"] = i.corrupt
        data["extended-l2"] = i.extended_l2
    bitmaps = image.bitmaps
    if bitmaps:
        data["bitmaps"] = [
            {
                "flags": [f for f, on in (("in-use", b.in_use), ("auto", b.auto)) if on],
                "name": b.name,
                "granularity": b.granularity,
            }
            for b in bitmaps
        ]
    if i.data_file is not None:
        data["data-file"] = i.data_file
        data["data-file-raw"] = "raw external data" in i.features
    if i.crypt_method == 1:
        data["encrypt"] = {"format": "aes"}
    elif (luks := image._core.luks_info()) is not None:
        data["encrypt"] = luks
    snapshots = image.snapshots
    d: dict[str, Any] = {
        "children": [{"name": "file", "info": _file_node(path, st)}],
        "virtual-size": i.virtual_size,
        "filename": path,
        "cluster-size": i.cluster_size,
        "format": "qcow2",
        "actual-size": _allocated(st),
        "format-specific": {"type": "qcow2", "data": _ordered(data, _QCOW2_DATA_KEYS)},
        "dirty-flag": i.dirty,
    }
    if snapshots:
        d["snapshots"] = [
            _ordered(
                {
                    "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                    "name": s.name,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
                    "id": s.id,
                    "vm-state-size": s.vm_state_size,
                    **({} if s.icount is None or s.icount == _ICOUNT_OFF else {"icount": s.icount}),
                },
                _SNAPSHOT_KEYS,
            )
            for s in snapshots
        ]
    if i.backing_file:
        d["backing-filename"] = i.backing_file
        d["full-backing-filename"] = full_backing_filename(path, i.backing_file)
        if i.backing_format:
            d["backing-filename-format"] = i.backing_format
    if i.encrypted:
        d["encrypted"] = True
    d = _ordered(d, _IMAGE_KEYS)
    d[OWN_KEY] = {
        "version": i.version,
        "crypt-method": i.crypt_method,
        "features": list(i.features),
        "snapshots": [
            {
                "id": s.id,
                "disk-size": s.disk_size,
                "l1-table-offset": s.l1_table_offset,
                "l1-size": s.l1_size,
            }
            for s in snapshots
        ],
        "bitmaps": [
            {"name": b.name, "table-offset": b.table_offset, "table-size": b.table_size}
            for b in bitmaps
        ],
        "overlap-check": str(image.overlap_check),
        "metadata-map-bytes": image.map_memory_usage(),
        "problems": [
            {"kind": p.kind, "offset": p.offset, "size": p.size, "message": p.message}
            for p in image.problems
        ],
    }
    return d


def raw_info(path: str) -> dict[str, Any]:
    """qemu-img's object for a raw image (a raw file in a backing chain)."""
    st = os.stat(path)
    return {
        "children": [{"name": "file", "info": _file_node(path, st)}],
        "virtual-size": _length(st),
        "filename": path,
        "format": "raw",
        "actual-size": _allocated(st),
        "dirty-flag": False,
    }


# ---- the text ------------------------------------------------------------------------------


def _dump(value: Any, depth: int, lines: list[str]) -> None:
    """QEMU's dump of a format-specific object: ``key: value`` lines (dashes in keys as
    spaces), nested objects and lists indented by 4, list items as ``[i]:``."""
    pad = " " * (4 * depth)
    pairs = (
        [(k.replace("-", " "), v) for k, v in value.items()]
        if isinstance(value, dict)
        else [(f"[{n}]", v) for n, v in enumerate(value)]
    )
    for key, v in pairs:
        if isinstance(v, (dict, list)):
            lines.append(f"{pad}{key}:")
            _dump(v, depth + 1, lines)
        else:
            text = str(v).lower() if isinstance(v, bool) else str(v)
            lines.append(f"{pad}{key}: {text}")


def info_text(d: dict[str, Any], image: Image | None) -> str:
    """``qemu-img info``'s text for one object of :func:`image_info` or :func:`raw_info`, then
    our own facts under ``qcow2ovl:``."""
    lines = [
        f"image: {d['filename']}",
        f"file format: {d['format']}",
        f"virtual size: {size_with_bytes(d['virtual-size'])}",
        f"disk size: {size_text(d['actual-size'])}",
    ]
    if d.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in d:
        lines.append(f"cluster_size: {d['cluster-size']}")
    if d["dirty-flag"]:
        lines.append("cleanly shut down: no")
    if "backing-filename" in d:
        line = f"backing file: {d['backing-filename']}"
        if d["full-backing-filename"] != d["backing-filename"]:
            line += f" (actual path: {d['full-backing-filename']})"
        lines.append(line)
    if "backing-filename-format" in d:
        lines.append(f"backing file format: {d['backing-filename-format']}")
    if image is not None and d.get("snapshots"):
        lines.extend(snapshot_list_lines(image.snapshots))
    if d.get("format-specific"):
        lines.append("Format specific information:")
        _dump(d["format-specific"]["data"], 1, lines)
    child = d["children"][0]["info"]
    lines += [
        "Child node '/file':",
        f"    filename: {child['filename']}",
        "    protocol type: file",
        f"    file length: {size_with_bytes(child['virtual-size'])}",
        f"    disk size: {size_text(child['actual-size'])}",
    ]
    own = d.get(OWN_KEY)
    if own is not None:
        lines.append("qcow2ovl:")
        if own["features"]:
            lines.append(f"    features: {', '.join(own['features'])}")
        lines.append(f"    overlap checks: {own['overlap-check']}")
        lines.append(f"    metadata map: {own['metadata-map-bytes']} bytes")
        for p in own["problems"]:
            lines.append(f"    problem: {p['message']}")
    return "\n".join(lines)


# ---- the command ---------------------------------------------------------------------------


def _backing_format(path: str) -> str:
    """qemu-img's probe of a backing file without a stored format: qcow2 by its magic, else raw."""
    from qcow2ovl._format import probe_format

    return probe_format(path)


def run(args: argparse.Namespace) -> int:
    """``qcow2ovl info [--output human|json] [--backing-chain] IMAGE``."""
    from qcow2ovl.image import _open

    chain = bool(getattr(args, "backing_chain", False))
    force_share = bool(getattr(args, "force_share", False))
    snapshot = getattr(args, "snapshot", None)
    blocks: list[str] = []
    objects: list[dict[str, Any]] = []
    seen: set[str] = set()
    path, fmt = args.image, "qcow2"
    while True:
        key = os.path.realpath(path)
        if key in seen:
            raise ValueError(f"Backing file '{path}' creates an infinite loop.")
        seen.add(key)
        if fmt == "qcow2":
            # qemu-img info's locks: the header and tables only (no permission held), refused
            # beside a writer unless -U; each image of the chain is opened on its own.
            with _open(
                path,
                overlap_check=args.overlap_check,
                snapshot=snapshot,
                force_share=force_share,
                metadata_only=True,
            ) as image:
                d = image_info(image)
                text = info_text(d, image) if args.output != "json" else ""
        else:
            d, text = raw_info(path), ""
            if args.output != "json":
                text = info_text(d, None)
        objects.append(d)
        blocks.append(text)
        snapshot = None  # a snapshot of the top image only
        backing = d.get("full-backing-filename")
        if not chain or backing is None:
            break
        path = backing
        fmt = d.get("backing-filename-format") or _backing_format(path)
        if fmt not in ("qcow2", "raw"):
            raise ValueError(f"Unknown backing file format '{fmt}'")
    if args.output == "json":
        print(to_json(objects if chain else objects[0]))
    else:
        print("\n\n".join(blocks))
    return 0


__all__ = [
    "OWN_KEY",
    "full_backing_filename",
    "image_info",
    "info_text",
    "raw_info",
    "run",
    "to_json",
]
