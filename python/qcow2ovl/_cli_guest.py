"""``qcow2ovl map --guest``: the guest disk as ``qemu-img map`` shows it."""

from __future__ import annotations

import argparse
import sys


def guest_map(args: argparse.Namespace) -> int:
    """``qcow2ovl map --guest IMAGE``: the guest disk as ``qemu-img map`` shows it."""
    from qcow2ovl.image import open as open_image

    with open_image(
        args.image,
        overlap_check=args.overlap_check,
        snapshot=getattr(args, "snapshot", None),
        force_share=args.force_share,
    ) as image:
        rows = image._guest_map_rows()
        out = sys.stdout
        if args.output == "json":
            # Written as it goes, byte for byte as qemu-img writes it: a fragmented disk has
            # millions of entries.
            out.write("[")
            sep = ""
            for start, length, depth, present, zero, data, compressed, offset in rows:
                where = "}" if offset is None else f', "offset": {offset}}}'
                out.write(
                    f'{sep}{{ "start": {start}, "length": {length}, "depth": {depth}, '
                    f'"present": {_JSON[present]}, "zero": {_JSON[zero]}, '
                    f'"data": {_JSON[data]}, "compressed": {_JSON[compressed]}{where}'
                )
                sep = ",\n"
            out.write("]\n")
            return 0
        out.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
        for start, length, depth, _, _, data, _, offset in rows:
            if data and offset is not None:
                where = args.image if depth == 0 else f"(backing file, depth {depth})"
                out.write(f"{start:<#16x}{length:<#16x}{offset:<#16x}{where}\n")
    return 0


_JSON = {True: "true", False: "false"}


__all__ = ["guest_map"]
