"""``qcow2ovl inspect [--output human|json] [--max-virtual-size SIZE] ... IMAGE``: the verdict
of :func:`qcow2ovl.inspect` on an untrusted file; exit status 0 safe, 1 unsafe, 2 unreadable."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

_HELP = "judge an untrusted file without opening what it points to (0 safe, 1 unsafe, 2 unreadable)"


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``inspect`` command to the ``qcow2ovl`` parser."""
    p = sub.add_parser("inspect", help=_HELP, description=_HELP)
    p.add_argument("image", help="the file to judge")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--max-virtual-size", metavar="SIZE", help="a larger virtual disk is unsafe")
    p.add_argument("--max-snapshots", type=int, metavar="N", help="more snapshots are unsafe")
    p.add_argument("--max-bitmaps", type=int, metavar="N", help="more bitmaps are unsafe")
    p.add_argument(
        "--max-check-clusters",
        type=int,
        metavar="N",
        help="a file of more clusters is not checked, and unsafe (default 2^24)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the verdict; return its exit status."""
    from qcow2ovl._inspect import CHECK_CLUSTERS, inspect

    limit = None
    if args.max_virtual_size is not None:
        from qcow2ovl._cli_create import parse_size

        limit = parse_size(args.max_virtual_size)
        if limit is None or limit < 0:
            raise ValueError(f"Invalid size specified: '{args.max_virtual_size}'")
    verdict = inspect(
        args.image,
        max_virtual_size=limit,
        max_snapshots=args.max_snapshots,
        max_bitmaps=args.max_bitmaps,
        max_check_clusters=(
            CHECK_CLUSTERS if args.max_check_clusters is None else args.max_check_clusters
        ),
    )
    if args.output == "json":
        from qcow2ovl._cli_info import to_json

        print(to_json(verdict.as_json()))
    else:
        state = "safe" if verdict.safe else "unsafe" if verdict.readable else "unreadable"
        print(f"{verdict.filename}: {state}")
        for reason in verdict.reasons:
            print(f"  {reason}")
        facts = verdict.facts
        for key in ("format", "virtual-size", "actual-size", "cluster-size"):
            if key in facts:
                print(f"{key}: {facts[key]}")
    sys.stdout.flush()
    return verdict.exit_code
