"""``qcow2ovl compare``: qemu-img compare's command line over :func:`qcow2ovl.compare`.

Exit status as qemu-img's: 0 identical, 1 different (or a wrong number of files), 2 when an
image cannot be opened (or the cache mode is unknown), 4 when a read fails.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any, TextIO


class _Progress:
    """qemu-img compare's progress lines: ``    (NN.NN/100%)\\r`` at the start, whenever the
    share done has grown by more than two points, and at 100; a newline at the very end."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._last = -1.0

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 if total <= 0 else min(100.0, 100.0 * done / total)
        if pct > self._last + 2.0 or (pct == 100.0 and self._last < 100.0) or self._last < 0:
            self._last = pct
            self._out.write(f"    ({pct:.2f}/100%)\r")
            self._out.flush()

    def end(self) -> None:
        self._out.write("\n")
        self._out.flush()


def _message(kind: str, reported: int | None) -> str:
    """qemu-img compare's line for what was found."""
    if kind == "size":
        return "Strict mode: Image size mismatch!"
    if kind == "status":
        return f"Strict mode: Offset {reported} block status mismatch!"
    if kind == "identical":
        return "Images are identical."
    return f"Content mismatch at offset {reported}!"


def _size_warning() -> None:
    sys.stdout.write("Warning: Image size mismatch!\n")


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl compare``; returns qemu-img compare's exit status."""
    from qcow2ovl._cli_convert import CACHE_MODES
    from qcow2ovl.compare import CompareReadError, compare_outcome
    from qcow2ovl.errors import LockError, Qcow2Error

    if len(args.files) != 2:
        print("qcow2ovl: Expecting two image file names", file=sys.stderr)
        return 1
    quiet = args.quiet
    progress = _Progress(sys.stdout) if args.progress and not quiet else None
    try:
        if args.cache not in CACHE_MODES:
            print(f"qcow2ovl: Invalid source cache option: {args.cache}", file=sys.stderr)
            return 2
        try:
            from qcow2ovl._cli_secrets import resolve

            a, b = resolve(args, args.files[0]), resolve(args, args.files[1])
            found = compare_outcome(
                a.filename,
                b.filename,
                a_secret=a.secret,
                b_secret=b.secret,
                a_format=args.a_format,
                b_format=args.b_format,
                strict=args.strict,
                force_share=args.force_share,
                progress=progress,
                on_tail=None if quiet else _size_warning,
            )
        except CompareReadError as exc:
            print(f"qcow2ovl: {exc}", file=sys.stderr)
            return 4
        except LockError as exc:
            # qemu-img's words, naming the image the lock is on.
            print(f"qcow2ovl: Could not open '{exc.filename}': {exc}", file=sys.stderr)
            return 2
        except (Qcow2Error, OSError, ValueError) as exc:
            print(f"qcow2ovl: {exc}", file=sys.stderr)
            return 2
        if not quiet:
            sys.stdout.write(_message(found.kind, found.reported) + "\n")
        return 0 if found.kind == "identical" else 1
    finally:
        if progress is not None:
            progress.end()


HELP = (
    "Check whether two disks (qcow2 images with their backing chains, or raw files) hold the "
    "same guest bytes, as 'qemu-img compare' does: exit status 0 and 'Images are identical.', "
    "or 1 and 'Content mismatch at offset N!' (N the start of the first differing 512-byte "
    "sector); 2 when an image cannot be opened. A shorter disk compares as if it went on with "
    "zeros ('Warning: Image size mismatch!'); -s (strict) requires equal sizes and equal "
    "allocation too."
)


def add_parser(sub: Any) -> None:
    """Adds ``compare`` to the command's subparsers."""
    from qcow2ovl._cli_options import add_force_share

    p = sub.add_parser(
        "compare", help="whether two disks hold the same bytes (qemu-img compare)", description=HELP
    )
    p.add_argument("-f", "--a-format", dest="a_format", metavar="FMT", help="FILE1's format")
    p.add_argument("-F", "--b-format", dest="b_format", metavar="FMT", help="FILE2's format")
    p.add_argument(
        "-s", "--strict", action="store_true", help="also require equal sizes and allocation"
    )
    p.add_argument("-p", "--progress", action="store_true", help="show progress")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument(
        "-T",
        "--cache",
        dest="cache",
        default="writeback",
        metavar="CACHE",
        help="the images' cache mode (accepted; reads go through the page cache)",
    )
    add_force_share(p)
    from qcow2ovl._cli_secrets import add_arguments

    add_arguments(p)
    p.add_argument("files", nargs="*", metavar="FILE", help="FILE1 FILE2")
    p.set_defaults(func=run)


__all__ = ["add_parser", "run"]
