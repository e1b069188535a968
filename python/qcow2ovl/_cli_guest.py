"""The guest-data commands of the ``qcow2ovl`` command line: ``map --guest`` and ``convert``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

#: Bytes read and written per step of ``convert``.
CHUNK = 2 << 20


def guest_map(args: argparse.Namespace) -> int:
    """``qcow2ovl map --guest IMAGE``: the guest disk as ``qemu-img map`` shows it."""
    from qcow2ovl.image import open as open_image

    with open_image(args.image, overlap_check=args.overlap_check) as image:
        extents = image.guest_map()
    out = sys.stdout
    if args.output == "json":
        # One entry per line, written as it goes (a fragmented disk has millions of entries).
        out.write("[")
        for i, e in enumerate(extents):
            out.write((",\n" if i else "") + json.dumps(e.as_qemu_dict()))
        out.write("]\n")
        return 0
    out.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
    for e in extents:
        if e.data and e.offset is not None:
            where = args.image if e.depth == 0 else f"(backing file, depth {e.depth})"
            out.write(f"{e.start:<#16x}{e.length:<#16x}{e.offset:<#16x}{where}\n")
    return 0


def _progress(done: int, total: int) -> None:
    pct = 100.0 if total == 0 else 100.0 * done / total
    sys.stdout.write(f"    ({pct:.2f}/100%)\r")
    sys.stdout.flush()


def convert(args: argparse.Namespace) -> int:
    """``qcow2ovl convert [-p] IMAGE OUTPUT``: the guest disk as a sparse raw file.

    Ranges that read as zeros (zero clusters, unallocated clusters without a backing file, and
    all-zero data) become holes in the output, as with ``qemu-img convert -O raw``.
    """
    from qcow2ovl.image import open as open_image

    if args.output_format != "raw":
        raise ValueError(f"convert: output format '{args.output_format}' is not supported yet")
    with open_image(args.image, overlap_check="none") as image:
        size = image.virtual_size
        extents = image.guest_map()
        zeros = bytes(CHUNK)
        buf = bytearray(CHUNK)
        done = 0
        with open(args.output, "wb") as out:
            out.truncate(size)
            for e in extents:
                if e.zero and not e.data:
                    done += e.length
                    continue
                pos, end = e.start, e.start + e.length
                while pos < end:
                    n = min(CHUNK, end - pos)
                    view = memoryview(buf)[:n]
                    image.readinto(pos, view)
                    if view != zeros[:n]:
                        out.seek(pos)
                        out.write(view)
                    pos += n
                    done += n
                    if args.progress:
                        _progress(done, size)
        if args.progress:
            _progress(size, size)
            sys.stdout.write("\n")
    return 0


def add_parsers(sub: Any) -> None:
    """Adds ``convert`` to the command's subparsers."""
    p = sub.add_parser(
        "convert",
        help="write the guest disk of a qcow2 image to a sparse raw file",
        description=convert.__doc__,
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-O", dest="output_format", default="raw", help="output format (raw)")
    p.add_argument("image", help="the qcow2 image to read")
    p.add_argument("output", help="the raw file to write (replaced if it exists)")
    p.set_defaults(func=convert)


__all__ = ["CHUNK", "add_parsers", "convert", "guest_map"]
