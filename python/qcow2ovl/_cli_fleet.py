"""``qcow2ovl fleet check``: ``qcow2ovl check`` over many images, on a local process pool or a
Dask cluster (:mod:`qcow2ovl.fleet`, imported only when the command runs)."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any, TextIO

    from qcow2ovl.fleet import FleetResult

_HELP = "check many images (files, directories, globs) on a process pool or a Dask cluster"
_CHECK_HELP = (
    "check every image PATH names, one `qcow2ovl check` per image, on a local process pool or "
    "on a Dask cluster; one JSON line per image (qemu-img check's keys plus filename, "
    "exit-status and host) or a table, worst first; exits as qemu-img check would for the worst "
    "image"
)


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``fleet`` command (with ``fleet check``) to the ``qcow2ovl`` parser."""
    fleet = sub.add_parser("fleet", help=_HELP, description=_HELP)
    commands = fleet.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")
    p = commands.add_parser("check", help=_CHECK_HELP, description=_CHECK_HELP)
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="an image, a directory (every qcow2 image under it) or a glob; on a cluster "
        "HOST:/PATH is expanded and checked by a worker on HOST",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "-j", "--jobs", type=int, help="worker processes of the local pool (default: one per CPU)"
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on this Dask scheduler (tcp://host:8786); needs pip install 'qcow2ovl[fleet]'",
    )
    p.add_argument(
        "-r",
        "--repair",
        choices=("leaks", "all"),
        help="repair leaked clusters (leaks) or all errors (all), as `qemu-img check -r`",
    )
    p.add_argument("--output", choices=("human", "json"), default="human")
    from qcow2ovl._cli_options import add_force_share

    add_force_share(p)
    p.set_defaults(func=run)


class _Bar:
    """A one-line progress bar on a terminal (stderr); nothing elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bad = 0
        self.shown = False

    def __call__(self, done: int, total: int, bad: int) -> None:
        width = 30
        filled = width if total <= 0 else width * done // total
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images, {bad} with problems"
        )
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl fleet check``; returns qemu-img check's exit status for the worst image."""
    import json

    from qcow2ovl import fleet

    if args.repair and args.force_share:
        from qcow2ovl._cli_options import refuse_force_share

        args.image = args.paths[0]
        refuse_force_share(args)
    bar = _Bar(sys.stderr) if sys.stderr.isatty() else None
    total = [0]

    def progress(_done: int, n: int) -> None:
        total[0] = n

    results: list[FleetResult] = []
    bad = 0
    try:
        for result in fleet.iter_check(
            args.paths,
            client=args.scheduler,
            jobs=args.jobs,
            repair=args.repair,
            force_share=args.force_share,
            progress=progress,
        ):
            results.append(result)
            bad += result.exit_code != 0
            if args.output == "json":
                if bar is not None:
                    bar.close()
                sys.stdout.write(json.dumps(result.as_json()) + "\n")
                sys.stdout.flush()
            if bar is not None:
                bar(len(results), total[0], bad)
    finally:
        if bar is not None:
            bar.close()
    if not results:
        print("qcow2ovl: fleet check: no images found", file=sys.stderr)
        return fleet.EXIT_FAILED
    if args.output == "human":
        print(table(fleet.sort_worst_first(results), repair=bool(args.repair)))
    return fleet.worst_exit_code(results)


def table(results: Sequence[FleetResult], repair: bool = False) -> str:
    """The human form: one row per image, as given (worst first), then a summary line."""
    hosts = len({r.host for r in results}) > 1
    head = ["STATUS", "CORRUPT", "LEAKS", "ERRORS", "OVERLAPS"]
    if repair:
        head += ["FIXED"]
    if hosts:
        head += ["HOST"]
    head += ["IMAGE"]
    rows = [head]
    for r in results:
        if r.error is None:
            row = [r.status] + [str(r.count(k)) for k in ("corruptions", "leaks", "check-errors")]
            row.append(str(len(r.record.get("overlaps", ()))))
            if repair:
                row.append(str(r.count("corruptions-fixed") + r.count("leaks-fixed")))
        else:
            row = [r.status] + ["-"] * (5 if repair else 4)
        if hosts:
            row.append(r.host or "-")
        if r.error is None:
            row.append(r.filename)
        else:  # qcow2ovl's messages start with the path already
            row.append(f"{r.filename}: {r.error.removeprefix(r.filename + ': ')}")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows
    ]
    lines += ["", summary(results)]
    return "\n".join(line.rstrip() for line in lines)


def summary(results: Sequence[FleetResult]) -> str:
    """``N images: a clean, b with leaks, c corrupt, d with check errors, e not checked``."""
    from qcow2ovl.fleet import worst_exit_code

    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = [
        f"{counts[status]} {label}"
        for status, label in (
            ("clean", "clean"),
            ("leaks", "with leaks"),
            ("corrupt", "corrupt"),
            ("check-errors", "with check errors"),
            ("unsupported", "not supported"),
            ("error", "not checked"),
        )
        if counts.get(status)
    ]
    n = len(results)
    return (
        f"{n} image{'s' if n != 1 else ''}: {', '.join(parts)}; "
        f"exit status {worst_exit_code(results)}"
    )
