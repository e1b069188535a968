"""Hostile images: time and peak memory of each class, qcow2ovl beside qemu-img, in one run.

    python benches/bench_hostile.py [--only NAME ...] [--timeout SECONDS]

Builds each class of `tests/hostile_images.py` at full size in a temporary folder and runs,
each in its own process under a 4 GiB address-space limit and a timeout:

- `open`: qcow2ovl open and list every metadata extent; qemu-img `info`;
- `check`: qcow2ovl `check()`; qemu-img `check`;
- `map`: qcow2ovl `qcow2ovl map --guest --output json`; qemu-img `map --output=json`;
- `inspect`: qcow2ovl `inspect()` (qemu-img has none: its row repeats `info -U`);
- `glance`: what an upload screen runs, under Glance's limits (2 s of CPU, 1 GiB of address
  space) instead of the 4 GiB above: `qcow2ovl inspect --output json` beside
  `qemu-img info --output=json`, with the exit status (qcow2ovl: 0 safe, 1 unsafe).

Prints wall time, CPU time (user + system) and peak resident memory (`/usr/bin/time`) for
each, or what stopped it (timeout, memory limit, exit status).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import hostile_images as hi  # noqa: E402

MEMORY = 4 << 30
GLANCE = ["--cpu=2", f"--as={1 << 30}"]
OPS = ("open", "check", "map", "inspect", "glance")

OURS = {
    "open": "img = qcow2ovl.open(p); sum(1 for _ in img.metadata_extents())",
    "check": "qcow2ovl.open(p).check()",
    "inspect": "qcow2ovl.inspect(p)",
}
QEMU = {
    "open": ["info", "-U"],
    "check": ["check"],
    "map": ["map", "--output=json"],
    "inspect": ["info", "-U", "--output=json"],
    "glance": ["info", "--output=json"],
}


def _sparse_bomb(cluster_size: int) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / "bomb.qcow2"
        size = "64M" if cluster_size == 512 else "1T"
        table_at = 64 << 10 if cluster_size == 512 else 16 * cluster_size
        tables_at = 1 << 30 if cluster_size == 512 else 1 << 39
        hi.snapshot_table_bomb(
            path, cluster_size=cluster_size, size=size, table_at=table_at, tables_at=tables_at
        )
        return path

    return build


def _file(make: Callable[[Path], None], name: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        make(path)
        return path

    return build


CLASSES: dict[str, Callable[[Path], Path]] = {
    "snapshot-tables-in-holes-64k": _sparse_bomb(65536),
    "snapshot-tables-in-holes-512": _sparse_bomb(512),
    "l2-table-flood": _file(hi.l2_table_flood, "l2s.qcow2"),
    "bitmap-directory-bomb": _file(hi.bitmap_directory_bomb, "bitmaps.qcow2"),
    "extension-bomb": _file(hi.extension_bomb, "ext.qcow2"),
    "shared-snapshots": _file(hi.shared_snapshots, "shared.qcow2"),
    "shared-l2-tables": _file(lambda p: hi.shared_l2_tables(p, size="1T"), "sharedl2.qcow2"),
    "deep-chain-500": lambda folder: hi.deep_chain(folder, 500),
    "backing-loop": hi.backing_loop,
    "wide-over-small-backing": hi.wide_over_small_backing,
}


def measure(cmd: list[str], timeout: float, limits: list[str], *, status: bool = False) -> str:
    """Runs *cmd* under *limits*; "1.23 s (cpu 1.10) 45 MB" or what stopped it (with *status*,
    always the exit status)."""
    limited = ["prlimit", *limits, "/usr/bin/time", "-f", "%e %U %S %M", *cmd]
    try:
        proc = subprocess.run(
            limited, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"> {timeout:.0f} s (timeout)"
    seconds, user, system, kib = proc.stderr.strip().splitlines()[-1].split()[-4:]
    cpu = float(user) + float(system)
    result = f"{float(seconds):.2f} s (cpu {cpu:.2f}) {int(kib) // 1024} MB"
    if status:
        result += f" exit {proc.returncode}"
    elif proc.returncode not in (0, 1, 2, 3):
        tail = proc.stderr.strip().splitlines()
        result += f" (exit {proc.returncode}: {tail[-2][:60] if len(tail) > 1 else ''})"
    return result


def ours(op: str, path: Path) -> list[str]:
    if op == "map":
        return [sys.executable, "-m", "qcow2ovl", "map", "--guest", "--output", "json", str(path)]
    if op == "glance":
        return [sys.executable, "-m", "qcow2ovl", "inspect", "--output", "json", str(path)]
    code = f"import sys, qcow2ovl; p = sys.argv[1]\n{OURS[op]}"
    return [sys.executable, "-c", code, str(path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CLASSES), default=sorted(CLASSES))
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    print(f"{'class':30} {'op':8} {'qcow2ovl':>34} {'qemu-img':>34}")
    for name in args.only:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            path = CLASSES[name](Path(tmp))
            for op in OPS:
                glance = op == "glance"
                limits = GLANCE if glance else [f"--as={MEMORY}"]
                mine = measure(ours(op, path), args.timeout, limits, status=glance)
                qemu = ["qemu-img", *QEMU[op], str(path)]
                theirs = measure(qemu, args.timeout, limits, status=glance)
                print(f"{name:30} {op:8} {mine:>34} {theirs:>34}", flush=True)


if __name__ == "__main__":
    main()
