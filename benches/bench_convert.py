"""Every convert mode side by side with ``qemu-img convert``, as a user runs them.

The source is a raw file of mixed content (``--size``, default 1 GiB): 64 KiB pieces that are
incompressible, zeros written out, text-like, patterned, or holes, in a fixed random order.
From it the preparation makes the qcow2 sources with qemu-img (plain and compressed). Modes:

``raw-qcow2``         raw → qcow2
``qcow2-qcow2``       qcow2 → qcow2
``qcow2-raw``         qcow2 → raw
``compressed-raw``    compressed qcow2 → raw
``compress``          raw → compressed qcow2 (``-c``)

Each mode is timed two ways, whole processes (``qcow2ovl convert`` is the installed script, not
a shim), each tool with its default options:

``default``   the command alone, as a user waits for it. Both tools default to cache mode
              ``unsafe`` for the output: neither syncs it.
``synced``    the command and then ``sync`` inside the timing: the output on disk.

Before every run ``sync`` flushes what earlier runs left dirty (outside the timing), and the
output file is removed. Runs alternate between the tools, ``--repeat`` times each (default 5).
Reported per mode and way: best and median wall seconds of each tool, the spread
(max − min) / median, and the ratios qemu-img / qcow2ovl (above 1.0: qcow2ovl is faster) for
the best and the median. Prints one JSON object per line and a table at the end. Usage::

    python benches/bench_convert.py [--size BYTES] [--repeat 5] [--work-dir DIR] [MODE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

MODES: dict[str, tuple[str, str, list[str]]] = {
    # mode: (source, output format, extra options)
    "raw-qcow2": ("mixed.raw", "qcow2", []),
    "qcow2-qcow2": ("plain.qcow2", "qcow2", []),
    "qcow2-raw": ("plain.qcow2", "raw", []),
    "compressed-raw": ("compressed.qcow2", "raw", []),
    "compress": ("mixed.raw", "qcow2", ["-c"]),
}


def ours_command() -> list[str]:
    """The installed ``qcow2ovl`` script next to this Python (a pyenv shim would add a
    process chain of its own to every run)."""
    script = pathlib.Path(sysconfig.get_path("scripts")) / "qcow2ovl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "qcow2ovl"]


def make_mixed(path: pathlib.Path, size: int) -> None:
    rng = random.Random(2026)
    piece = 64 * KiB
    text = (b"the quick brown fox jumps over the lazy dog; lorem ipsum dolor sit\n" * 1200)[:piece]
    pattern = bytes(range(256)) * (piece // 256)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // piece):
            kind = rng.randrange(5)
            if kind == 4:
                continue  # a hole
            f.seek(i * piece)
            if kind == 0:
                f.write(rng.randbytes(piece))
            elif kind == 1:
                f.write(bytes(piece))
            elif kind == 2:
                f.write(text)
            else:
                f.write(pattern)


def prepare(work: pathlib.Path, size: int) -> None:
    raw = work / "mixed.raw"
    if not raw.exists() or raw.stat().st_size != size:
        make_mixed(raw, size)
    for name, flags in (("plain.qcow2", []), ("compressed.qcow2", ["-c"])):
        path = work / name
        if not path.exists():
            subprocess.run(
                ["qemu-img", "convert", *flags, "-f", "raw", "-O", "qcow2", raw, path], check=True
            )


def timed(cmd: list[str], synced: bool) -> float:
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if synced:
        subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def summary(times: list[float]) -> dict[str, float]:
    med = statistics.median(times)
    return {
        "best": round(min(times), 3),
        "median": round(med, 3),
        "spread": round((max(times) - min(times)) / med, 3),
    }


def bench_mode(work: pathlib.Path, mode: str, way: str, repeat: int) -> dict[str, object]:
    source, fmt, extra = MODES[mode]
    out = work / f"out.{fmt}"
    cmds = {
        "qcow2ovl": [*ours_command(), "convert", "-O", fmt, *extra, str(work / source), str(out)],
        "qemu-img": ["qemu-img", "convert", "-O", fmt, *extra, str(work / source), str(out)],
    }
    times: dict[str, list[float]] = {"qcow2ovl": [], "qemu-img": []}
    for i in range(repeat):
        order = ["qcow2ovl", "qemu-img"] if i % 2 == 0 else ["qemu-img", "qcow2ovl"]
        for tool in order:
            out.unlink(missing_ok=True)
            times[tool].append(timed(cmds[tool], way == "synced"))
    # The last output is qemu-img's or ours; both are checked against the source elsewhere.
    return {"mode": mode, "way": way, **side_by_side(times)}


def side_by_side(times: dict[str, list[float]]) -> dict[str, object]:
    """Both tools' summaries and the ratios qemu-img / qcow2ovl of their best and median."""
    ours, qemu = summary(times["qcow2ovl"]), summary(times["qemu-img"])
    return {
        "qcow2ovl": ours,
        "qemu-img": qemu,
        "ratio_best": round(qemu["best"] / ours["best"], 2),
        "ratio_median": round(qemu["median"] / ours["median"], 2),
    }


def bench_parser(doc: str, modes: list[str]) -> argparse.ArgumentParser:
    """The options every side-by-side bench takes: modes, ``--size``, ``--repeat``,
    ``--work-dir``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("modes", nargs="*", metavar="MODE", help=" ".join(modes))
    parser.add_argument("--size", type=int, default=GiB)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--work-dir", type=pathlib.Path)
    return parser


def bench_start(
    doc: str, modes: list[str], tools: tuple[str, ...], prefix: str
) -> tuple[argparse.Namespace, pathlib.Path] | None:
    """A side-by-side bench's start: its options parsed (unknown modes refused), the *tools* it
    runs found on PATH (else None, with a message), and its work directory (``--work-dir``, or
    a new one under /var/tmp named *prefix*)."""
    parser = bench_parser(doc, modes)
    args = parser.parse_args()
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"{', '.join(missing)} needed", file=sys.stderr)
        return None
    unknown = [m for m in args.modes if m not in modes]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {modes}")
    work = args.work_dir or pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    return args, work


def main() -> int:
    parser = bench_parser(__doc__, list(MODES))
    args = parser.parse_args()
    if shutil.which("qemu-img") is None:
        print("qemu-img is needed", file=sys.stderr)
        return 1
    work = args.work_dir or pathlib.Path(tempfile.mkdtemp(prefix="bench-convert-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.size)
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    rows = []
    for mode in args.modes or list(MODES):
        for way in ("default", "synced"):
            row = bench_mode(work, mode, way, args.repeat)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"\nsource {args.size / GiB:.2f} GiB mixed, {args.repeat} runs each, cores {os.cpu_count()}"
    )
    print_table(rows, {"mode": 16, "way": 9})
    return 0


def print_table(rows: list[dict[str, object]], labels: dict[str, int]) -> None:
    """The rows' best and median times of both tools and their ratios, after the *labels*
    (each key's column width)."""
    head = "".join(f"{k:<{w}}" for k, w in labels.items())
    print(f"{head}{'ours best/med':>16}{'qemu best/med':>16}{'ratio best/med':>16}")
    for r in rows:
        o, q = r["qcow2ovl"], r["qemu-img"]
        assert isinstance(o, dict) and isinstance(q, dict)
        label = "".join(f"{r[k]!s:<{w}}" for k, w in labels.items())
        print(
            f"{label}{o['best']:>8.2f}/{o['median']:<7.2f}"
            f"{q['best']:>8.2f}/{q['median']:<7.2f}{r['ratio_best']:>8.2f}/{r['ratio_median']:<7.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
