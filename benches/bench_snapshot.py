"""Snapshot create and delete against qemu-img's, side by side in one run.

The image: ``qemu-img create -o preallocation=metadata`` of 1 TiB (64 KiB clusters): 2,048 L2
tables mapping all 16,777,216 clusters, so taking a snapshot adds a reference to every one
of them and deleting it drops them all again. It is built once and cached (``--cache-dir``,
default ``~/.cache/qcow2ovl-bench``); each repetition works on fresh sparse copies.

Timed, whole processes (wall and CPU of the child): ``qemu-img snapshot -c s`` against
``qcow2ovl snapshot -c s`` on identical copies, then ``-d s`` on each. Both results are
checked with ``qemu-img check`` once. Ours is also timed in process, split into open (the
scan that builds the metadata map), the operation and close, to say where the time goes.

Usage::

    python benches/bench_snapshot.py [--repeat 3] [--cache-dir DIR] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import qcow2ovl

TiB = 1 << 40


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "qcow2ovl-bench"


def prepare(cache_dir: pathlib.Path) -> pathlib.Path:
    version = subprocess.run(
        ["qemu-img", "--version"], capture_output=True, text=True, check=True
    ).stdout.split("\n")[0]
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", version).strip("-")
    cache_dir.mkdir(parents=True, exist_ok=True)
    img = cache_dir / f"snapshot-prealloc-1T-{tag}.qcow2"
    if not img.exists():
        tmp = img.with_suffix(f".{os.getpid()}.partial")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", tmp, "1T"],
            check=True,
        )
        tmp.replace(img)
    return img


def timed(*cmd: str | pathlib.Path) -> tuple[float, float]:
    """(wall, CPU) seconds of a child process."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def fresh_copy(src: pathlib.Path, dst: pathlib.Path) -> None:
    dst.unlink(missing_ok=True)
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


def check_clean(path: pathlib.Path) -> bool:
    return subprocess.run(["qemu-img", "check", path], capture_output=True).returncode == 0


def in_process(path: pathlib.Path, op: str) -> dict[str, float]:
    """Our time split into open, the operation and close (in-process wall seconds)."""
    t0 = time.perf_counter()
    image = qcow2ovl.open(path, writable=True)
    t1 = time.perf_counter()
    if op == "create":
        image.create_snapshot("s")
    else:
        image.delete_snapshot("s")
    t2 = time.perf_counter()
    image.close()
    t3 = time.perf_counter()
    return {"open_s": t1 - t0, "op_s": t2 - t1, "close_s": t3 - t2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache-dir", type=pathlib.Path, default=default_cache_dir())
    ap.add_argument("--work-dir", help="where the copies go (default: TMPDIR)")
    args = ap.parse_args()
    base = prepare(args.cache_dir)
    work = pathlib.Path(tempfile.mkdtemp(prefix="qcow2ovl-snap-bench-", dir=args.work_dir))
    ours_cli = [sys.executable, "-m", "qcow2ovl", "snapshot"]
    times: dict[str, list[float]] = {
        k: [] for k in ("qemu_create", "ours_create", "qemu_delete", "ours_delete")
    }
    cpu: dict[str, list[float]] = {k: [] for k in times}
    split: dict[str, list[dict[str, float]]] = {"create": [], "delete": []}
    clean = True
    try:
        q, o = work / "qemu.qcow2", work / "ours.qcow2"
        for i in range(args.repeat):
            fresh_copy(base, q)
            fresh_copy(base, o)
            for op, flag in (("create", "-c"), ("delete", "-d")):
                for who, cmd, path in (
                    ("qemu", ["qemu-img", "snapshot"], q),
                    ("ours", ours_cli, o),
                ):
                    wall, c = timed(*cmd, flag, "s", path)
                    times[f"{who}_{op}"].append(wall)
                    cpu[f"{who}_{op}"].append(c)
                if i == 0:
                    clean = clean and check_clean(q) and check_clean(o)
        # Where our time goes, on one more pair of copies.
        fresh_copy(base, o)
        split["create"].append(in_process(o, "create"))
        split["delete"].append(in_process(o, "delete"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    result = {
        "workload": "snapshot create and delete, 1 TiB preallocation=metadata image",
        "clusters_referenced": 16_777_216 + 2_048,
        "wall_s": {k: round(med(v), 3) for k, v in times.items()},
        "cpu_s": {k: round(med(v), 3) for k, v in cpu.items()},
        "ratio_create": round(med(times["qemu_create"]) / med(times["ours_create"]), 2),
        "ratio_delete": round(med(times["qemu_delete"]) / med(times["ours_delete"]), 2),
        "ours_in_process_s": {
            op: {k: round(v, 3) for k, v in parts[0].items()} for op, parts in split.items()
        },
        "qemu_img_check_clean": clean,
        "samples": times,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
