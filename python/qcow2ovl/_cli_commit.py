"""``qcow2ovl commit``: qemu-img's ``commit`` command over :func:`qcow2ovl.commit`.

``qcow2ovl commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] IMAGE`` folds IMAGE into its
backing file (or into BASE further down its chain) and prints ``Image committed.``; errors are
qemu-img's words with exit status 1.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

_HELP = "fold an overlay into its backing file (qemu-img commit syntax)"
_DESCRIPTION = (
    "Write every cluster IMAGE allocates into its backing file (or, with -b, every cluster the "
    "images above BASE allocate into BASE), through the guarded engine, then empty IMAGE so "
    "that it reads its backing file again (-d keeps it; -b implies -d). The base grows to "
    "IMAGE's size if it is smaller. A crash or Ctrl-C leaves both images consistent; running "
    "the command again finishes it."
)
_USAGE_HINT = "Try 'qcow2ovl commit --help' for more info"


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``commit`` command to the ``qcow2ovl`` parser."""
    from qcow2ovl._cli_convert import CACHE_MODES

    p = sub.add_parser("commit", help=_HELP, description=_DESCRIPTION)
    p.add_argument("-f", "--format", dest="fmt", metavar="FMT", help="IMAGE's format: qcow2")
    p.add_argument(
        "-t",
        "--cache",
        dest="cache",
        default="writeback",
        metavar="CACHE",
        help=f"cache mode of both images ({', '.join(CACHE_MODES)}; default writeback, as "
        "qemu-img: the base is synced before IMAGE is emptied)",
    )
    p.add_argument(
        "-b",
        "--base",
        dest="base",
        metavar="BASE",
        help="commit into this image of the backing chain (a name as the chain spells it, or "
        "a path); implies -d",
    )
    p.add_argument("-d", "--drop", action="store_true", help="leave IMAGE as it is")
    p.add_argument("-p", "--progress", action="store_true", help="show progress")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("operands", nargs="*", metavar="IMAGE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl commit``; 0 on success, 1 on failure (as qemu-img)."""
    from qcow2ovl._cli_convert import _cache
    from qcow2ovl._cli_errors import fail, missing_file
    from qcow2ovl._cli_progress import Progress
    from qcow2ovl.commit import commit
    from qcow2ovl.errors import LockError, Qcow2Error

    if len(args.operands) != 1:
        return fail(f"Expecting one image file name\n{_USAGE_HINT}")
    (image,) = args.operands
    cache = _cache(args.cache)
    if args.fmt == "raw":
        return fail("Image does not have a backing file")
    if args.fmt not in (None, "qcow2"):
        return fail(f"commit: format '{args.fmt}' is not supported (qcow2 is)")
    progress = Progress() if args.progress and not args.quiet else None
    if progress is not None:
        progress.start()
    try:
        commit(
            image,
            base=args.base,
            drop=args.drop,
            cache_mode=cache,  # type: ignore[arg-type]  # checked by _cache
            progress=progress,
        )
    except FileNotFoundError as exc:
        return fail(missing_file(image, exc))
    except (LockError, Qcow2Error, OSError, ValueError) as exc:
        return fail(str(exc))
    if progress is not None:
        progress.end()
    if not args.quiet:
        print("Image committed.")
    return 0
