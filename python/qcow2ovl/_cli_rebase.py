"""``qcow2ovl rebase``: qemu-img's ``rebase`` command over :func:`qcow2ovl.rebase`.

``qcow2ovl rebase [-f FMT] [-t CACHE] [-T CACHE] [-p] [-u] [-c] [-U] [-q] -b BACKING [-F FMT]
IMAGE`` points IMAGE at BACKING (``-b ""``: at nothing) with its guest disk unchanged, or with
``-u`` only rewrites the header. It prints nothing on success; errors are qemu-img's words with
exit status 1.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

_HELP = "point an image at another backing file (qemu-img rebase syntax)"
_DESCRIPTION = (
    "Make IMAGE name BACKING (format -F) as its backing file. A safe rebase (the default) first "
    "copies into IMAGE, through the guarded engine, every cluster it leaves to its backing chain "
    'that BACKING reads differently, so the guest disk stays the same; -b "" copies all of '
    "the old chain in and leaves IMAGE standalone. -u only rewrites the header (BACKING need "
    "not exist). A crash or Ctrl-C before the end leaves IMAGE reading as it did."
)
_USAGE_HINT = "Try 'qcow2ovl rebase --help' for more info"


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``rebase`` command to the ``qcow2ovl`` parser."""
    from qcow2ovl._cli_convert import CACHE_MODES

    modes = ", ".join(CACHE_MODES)
    p = sub.add_parser("rebase", help=_HELP, description=_DESCRIPTION)
    p.add_argument("-f", "--format", dest="fmt", metavar="FMT", help="IMAGE's format: qcow2")
    p.add_argument(
        "-t",
        "--cache",
        dest="cache",
        default="writeback",
        metavar="CACHE",
        help=f"IMAGE's cache mode ({modes}; default writeback)",
    )
    p.add_argument(
        "-T",
        "--source-cache",
        dest="backing_cache",
        default="writeback",
        metavar="CACHE",
        help="the backing files' cache mode (default writeback)",
    )
    p.add_argument(
        "-b", "--backing", dest="backing", metavar="BACKING", help="the new backing file"
    )
    p.add_argument(
        "-F", "--backing-format", dest="backing_format", metavar="FMT", help="its format"
    )
    p.add_argument("-u", "--unsafe", action="store_true", help="only rewrite the header")
    p.add_argument(
        "-c", "--compress", action="store_true", help="write the copied clusters compressed"
    )
    from qcow2ovl import _cli_options

    _cli_options.add_force_share(p)
    p.add_argument("-p", "--progress", action="store_true", help="show progress")
    p.add_argument("-q", "--quiet", action="store_true", help="quiet operation")
    p.add_argument("operands", nargs="*", metavar="IMAGE")
    from qcow2ovl._cli_secrets import add_metadata_arguments

    add_metadata_arguments(p, "operands")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl rebase``; 0 on success, 1 on failure (as qemu-img)."""
    from qcow2ovl._cli_convert import CACHE_MODES, _cache
    from qcow2ovl._cli_errors import fail, missing_file
    from qcow2ovl._cli_progress import Progress
    from qcow2ovl.errors import LockError, Qcow2Error
    from qcow2ovl.rebase import rebase

    if len(args.operands) != 1:
        return fail(f"Expecting one image file name\n{_USAGE_HINT}")
    (image,) = args.operands
    if args.backing is None and not args.unsafe:
        return fail(f"Must specify backing file (-b) or use unsafe mode (-u)\n{_USAGE_HINT}")
    cache = _cache(args.cache)
    if args.backing_cache not in CACHE_MODES:
        return fail(f"Invalid source cache option: {args.backing_cache}")
    backing_cache = args.backing_cache
    if args.fmt == "raw":
        return fail(
            f"Could not change the backing file to '{args.backing}': Operation not supported"
        )
    if args.fmt not in (None, "qcow2"):
        return fail(f"rebase: format '{args.fmt}' is not supported (qcow2 is)")
    progress = Progress() if args.progress and not args.quiet else None
    if progress is not None:
        progress.start()
    try:
        rebase(
            image,
            args.backing,
            backing_format=args.backing_format,
            unsafe=args.unsafe,
            compress=args.compress,
            cache_mode=cache,  # type: ignore[arg-type]  # checked by _cache
            backing_cache_mode=backing_cache,
            force_share=args.force_share,
            progress=progress,
        )
    except FileNotFoundError as exc:
        return fail(missing_file(image, exc, args.backing))
    except (LockError, Qcow2Error, OSError, ValueError) as exc:
        return fail(str(exc))
    if progress is not None:
        progress.end()
    return 0
