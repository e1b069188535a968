"""``qcow2ovl check``: ``qemu-img check``'s answers, with every metadata overlap named."""

from __future__ import annotations

import errno
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from qcow2ovl.check import CheckResult

#: Exit status for an image the command cannot check (qemu-img's "check not supported").
EXIT_NOT_SUPPORTED = 63
#: Exit status when the check did not complete.
EXIT_FAILED = 1

_HELP = "check an image's refcounts and metadata, as `qemu-img check` does, naming overlaps"


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``check`` command to the ``qcow2ovl`` parser."""
    p = sub.add_parser("check", help=_HELP, description=_HELP)
    from qcow2ovl._cli_secrets import add_metadata_arguments

    add_metadata_arguments(p)
    p.add_argument("image", help="path of the qcow2 image (opened read-only unless -r)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-p", "--progress", action="store_true", help="show progress (on a terminal)")
    p.add_argument(
        "-r",
        "--repair",
        choices=("leaks", "all"),
        help="repair leaked clusters (leaks) or all errors (all), as `qemu-img check -r`",
    )
    from qcow2ovl._cli_options import add_force_share

    add_force_share(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl check``; returns qemu-img's exit status for the result."""
    from qcow2ovl.errors import UnsupportedError
    from qcow2ovl.image import open as open_image

    if args.repair:
        from qcow2ovl._cli_options import refuse_force_share

        refuse_force_share(args)
        return _repair(args)
    from qcow2ovl._cli_progress import Progress

    progress = Progress() if args.progress and sys.stdout.isatty() else None
    # An image that cannot be opened fails like any command (status 1, as qemu-img's does);
    # one that opens but cannot be checked is "check not supported".
    with open_image(args.image, overlap_check="none", force_share=args.force_share) as image:
        try:
            result = image.check(progress)
        except UnsupportedError as exc:
            print(f"qcow2ovl: check: {exc}", file=sys.stderr)
            return EXIT_NOT_SUPPORTED
        except OSError as exc:
            if exc.errno != errno.EFBIG:
                raise
            # A file of more clusters than a check can count: qemu-img's line and status.
            print(f"qcow2ovl: Check failed: {exc.strerror}", file=sys.stderr)
            return EXIT_FAILED
    if progress is not None:
        progress.end()
    _print(args, result)
    return result.exit_code


def _print(args: argparse.Namespace, result: CheckResult) -> None:
    if args.output == "json":
        import json

        print(json.dumps(result.as_qemu_dict(), indent=4))
    else:
        err = sys.stderr
        for line in result.problem_lines():
            err.write(line + "\n")
        err.flush()
        print(result.summary())
    if result.check_errors and args.output == "human":
        print("qcow2ovl: check: the check did not complete", file=sys.stderr)


def _repair(args: argparse.Namespace) -> int:
    """``check -r leaks|all``: repair, then report the double check as qemu-img does."""
    from qcow2ovl.check import check
    from qcow2ovl.errors import LockError

    try:
        result = check(args.image, repair=args.repair)
    except LockError:
        raise  # not a failed check: the image could not be opened (reported as qemu-img does)
    except OSError as exc:
        # Includes a leaks-only repair that found a refcount structure to rebuild (qemu-img:
        # "Check failed", status 1).
        print(f"qcow2ovl: check: {exc}", file=sys.stderr)
        return EXIT_FAILED
    err = sys.stderr
    for line in result.repair_log:
        err.write(line + "\n")
    err.flush()
    if args.output == "human" and (result.corruptions_fixed or result.leaks_fixed):
        print(
            "The following inconsistencies were found and repaired:\n\n"
            f"    {result.leaks_fixed} leaked clusters\n"
            f"    {result.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now..."
        )
    _print(args, result)
    return result.exit_code
