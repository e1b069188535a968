"""``qcow2ovl resize``: qemu-img's ``resize`` command for qcow2 images and raw files.

``qcow2ovl resize [-f FMT] [--shrink] [--preallocation PREALLOC] [-q] IMAGE [+|-]SIZE`` prints
``Image resized.``, or qemu-img's message and exit status 1 with the image unchanged. As in
qemu-img, a negative SIZE right after IMAGE is a size, not an option. The work is done by
:func:`qcow2ovl.resize`.
"""

from __future__ import annotations

import re
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

_HELP = "grow or shrink a qcow2 image or a raw file (qemu-img resize syntax)"
_DESCRIPTION = (
    "Resize IMAGE to SIZE bytes, or by +SIZE or -SIZE (suffixes b k M G T P E, 1024-based), "
    "as qemu-img resize does. Shrinking needs --shrink, and discards the data past the new "
    "end. A qcow2 image is resized through the guarded engine (its size a multiple of 512); "
    "a raw file is truncated."
)
_USAGE_HINT = "Try 'qcow2ovl resize --help' for more info"
_BITMAP_HINT = "Try block-dirty-bitmap-remove to delete this bitmap from disk"


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``resize`` command to the ``qcow2ovl`` parser."""
    p = sub.add_parser("resize", help=_HELP, description=_DESCRIPTION)
    p.add_argument(
        "-f", "--format", dest="fmt", metavar="FMT", help="qcow2 or raw (default: probed)"
    )
    p.add_argument(
        "--shrink",
        action="store_true",
        help="allow a size below the current one (the data past the new end is lost)",
    )
    p.add_argument(
        "--preallocation",
        metavar="PREALLOC",
        help="for the new part: off (default), falloc or full (metadata: refused for raw, not "
        "supported yet for qcow2)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument(
        "--overlap-check",
        default="all",
        help="which metadata types guard the writes (QEMU's overlap-check syntax; default: all)",
    )
    p.add_argument("operands", nargs="*", metavar="IMAGE SIZE")
    from qcow2ovl._cli_secrets import add_metadata_arguments

    add_metadata_arguments(p, "operands")
    # qemu-img takes "-1G" after the image as a size: so does this parser (any word starting
    # with a minus and a digit is an operand).
    p._negative_number_matcher = re.compile(r"-\d")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl resize``; 0 on success, 1 on failure (as qemu-img)."""
    from qcow2ovl._cli_errors import fail as _fail
    from qcow2ovl._cli_errors import open_reason as _open_reason
    from qcow2ovl.errors import BitmapError, Qcow2Error
    from qcow2ovl.resize import (
        RAW_PROBE_WARNING,
        SHRINK_REFUSED,
        SHRINK_WARNING,
        _apply,
        _check_preallocation,
        _open_target,
        parse_size,
    )

    try:
        mode = _check_preallocation(args.preallocation)
    except ValueError as exc:
        return _fail(str(exc))
    if len(args.operands) < 2:
        return _fail(f"Expecting image file name and size\n{_USAGE_HINT}")
    if len(args.operands) > 2:
        return _fail(f"Extra argument(s) in command line\n{_USAGE_HINT}")
    image, size = args.operands
    try:
        parse_size(size)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        target = _open_target(image, args.fmt, overlap_check=args.overlap_check)
    except (Qcow2Error, OSError, ValueError) as exc:
        return _fail(f"Could not open '{image}': {_open_reason(image, exc)}")
    with target:
        if target.probed and target.format == "raw":
            print(RAW_PROBE_WARNING.format(image), file=sys.stderr)
        try:
            _apply(target, size, shrink=args.shrink, preallocation=mode, progress=None)
        except (Qcow2Error, OSError, ValueError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if text == SHRINK_REFUSED:
                text += f"\nqcow2ovl: warning: {SHRINK_WARNING}"
            elif isinstance(exc, BitmapError) and text.endswith(
                "is inconsistent and cannot be used"
            ):
                text += f"\n{_BITMAP_HINT}"
            return _fail(text)
    if not args.quiet:
        print("Image resized.")
    return 0
