"""``commit`` and ``rebase`` side by side with ``qemu-img``, as a user runs them.

The preparation makes, with qemu-img, a chain over a disk of mixed content (``--size``, default
1 GiB; bench_convert.py's mixed pieces): ``base.qcow2`` holds it all, ``top.qcow2`` over it
rewrites every other MiB with other data (half the disk), and ``other.qcow2`` is the base with
every fourth MiB changed. Modes:

``commit``          ``commit top.qcow2``: half the disk into the base, the top emptied
``commit-d``        ``commit -d top.qcow2``: the same, the top kept
``rebase``          ``rebase -b other.qcow2 -F qcow2 top.qcow2``: every range the top leaves
                    to its base compared, the quarter that differs copied
``rebase-flatten``  ``rebase -b "" top.qcow2``: the base's half copied in

Every run starts from a fresh copy of the prepared images (made, and ``sync``-ed, outside the
timing). Both tools run with their default options (cache mode ``writeback``: both sync what
they wrote before they exit), whole processes, runs alternating, ``--repeat`` times each
(default 5). Reported per mode: best and median wall seconds of each tool, the spread
(max − min) / median, and the ratios qemu-img / qcow2ovl (above 1.0: qcow2ovl is faster).
Prints one JSON object per line and a table at the end. Usage::

    python benches/bench_chain.py [--size BYTES] [--repeat 5] [--work-dir DIR] [MODE ...]
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from bench_convert import (
    GiB,
    MiB,
    bench_parser,
    make_mixed,
    ours_command,
    print_table,
    side_by_side,
)

MODES: dict[str, list[str]] = {
    "commit": ["commit", "top.qcow2"],
    "commit-d": ["commit", "-d", "top.qcow2"],
    "rebase": ["rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    "rebase-flatten": ["rebase", "-b", "", "top.qcow2"],
}
IMAGES = ("base.qcow2", "top.qcow2", "other.qcow2")


def qemu_io_writes(image: pathlib.Path, writes: list[str]) -> None:
    """Runs qemu-io ``write`` commands in batches (a command line has a length limit)."""
    for i in range(0, len(writes), 256):
        args = ["qemu-io", "-f", "qcow2"]
        for w in writes[i : i + 256]:
            args += ["-c", w]
        subprocess.run([*args, str(image)], check=True, stdout=subprocess.DEVNULL)


def prepare(prepared: pathlib.Path, size: int) -> None:
    if all((prepared / name).exists() for name in IMAGES):
        return
    raw = prepared / "mixed.raw"
    make_mixed(raw, size)
    img = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
    subprocess.run([*img, raw, prepared / "base.qcow2"], check=True)
    subprocess.run([*img, raw, prepared / "other.qcow2"], check=True)
    raw.unlink()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"]
        + [str(prepared / "top.qcow2"), str(size)],
        check=True,
    )
    mibs = size // MiB
    qemu_io_writes(
        prepared / "top.qcow2",
        [f"write -P {0x40 + i % 64} {i * MiB} {MiB}" for i in range(0, mibs, 2)],
    )
    qemu_io_writes(
        prepared / "other.qcow2",
        [f"write -P {0x80 + i % 64} {i * MiB} {MiB}" for i in range(1, mibs, 4)],
    )


def fresh_copy(prepared: pathlib.Path, run: pathlib.Path) -> None:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    for name in IMAGES:
        subprocess.run(["cp", "--sparse=always", prepared / name, run / name], check=True)
    subprocess.run(["sync"], check=True)


def timed(cmd: list[str], cwd: pathlib.Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=cwd)
    return time.perf_counter() - start


def bench_mode(work: pathlib.Path, mode: str, repeat: int) -> dict[str, object]:
    cmds = {"qcow2ovl": [*ours_command(), *MODES[mode]], "qemu-img": ["qemu-img", *MODES[mode]]}
    times: dict[str, list[float]] = {"qcow2ovl": [], "qemu-img": []}
    run = work / "run"
    for i in range(repeat):
        order = ["qcow2ovl", "qemu-img"] if i % 2 == 0 else ["qemu-img", "qcow2ovl"]
        for tool in order:
            fresh_copy(work / "prepared", run)
            times[tool].append(timed(cmds[tool], run))
    return {"mode": mode, **side_by_side(times)}


def main() -> int:
    parser = bench_parser(__doc__, list(MODES))
    args = parser.parse_args()
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        print("qemu-img and qemu-io are needed", file=sys.stderr)
        return 1
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    work = args.work_dir or pathlib.Path(tempfile.mkdtemp(prefix="bench-chain-", dir="/var/tmp"))
    (work / "prepared").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepare(work / "prepared", args.size)
    print(f"prepared in {time.perf_counter() - started:.1f} s", flush=True)
    rows = []
    for mode in args.modes or list(MODES):
        row = bench_mode(work, mode, args.repeat)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\ndisk {args.size / GiB:.2f} GiB, {args.repeat} runs each, cores {os.cpu_count()}")
    print_table(rows, {"mode": 16})
    return 0


if __name__ == "__main__":
    sys.exit(main())
