"""Images per second of `qcow2ovl.fleet.check` on the local process pool and on a two-worker
Dask cluster (a scheduler and two one-thread workers started here as processes on this
machine), for the same directory of images; a serial loop of `qcow2ovl.check` for reference.

The images are written by qcow2ovl's own engine (no QEMU needed): one 1 GiB image with data in
several L2 ranges, an internal snapshot and more writes after it, copied N times. Each timing is
one `fleet.check` call over the directory, from the call to the last result (the pool's worker
start-up and the client's connection included; the cluster's start-up not: a fleet's cluster
runs all the time). Median of --runs runs. Prints measured numbers (each run's results are
only checked to be all clean).

    python benches/bench_fleet.py [--images N] [--runs R] [--jobs J] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import qcow2ovl
from qcow2ovl import fleet

MiB = 1 << 20


def build(directory: Path, count: int) -> int:
    first = directory / "img-0000.qcow2"
    qcow2ovl.create(first, 1 << 30)
    with qcow2ovl.open(first, writable=True) as img:
        for i in range(8):
            img.write(i * 120 * MiB, bytes([i + 1]) * (512 << 10))
        img.create_snapshot("base")
        for i in range(8):
            img.write(i * 120 * MiB + 64 * MiB, bytes([i + 0x40]) * (256 << 10))
    for i in range(1, count):
        shutil.copyfile(first, directory / f"img-{i:04d}.qcow2")
    return first.stat().st_size


def timed(label: str, runs: int, count: int, call: Callable[[], list]) -> None:
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        results = call()
        seconds.append(time.perf_counter() - start)
        assert len(results) == count and all(r.exit_code == 0 for r in results), results[:3]
    median = statistics.median(seconds)
    print(
        f"{label:<34} {median:7.3f} s  {count / median:8.1f} images/s"
        f"  (runs: {', '.join(f'{s:.3f}' for s in seconds)})"
    )


def start_cluster(tmp: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    dask = str(Path(sys.executable).parent / "dask")
    sched = tmp / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
            + ["--scheduler-file", str(sched)],
            **quiet,
        )
    ]
    for i in range(2):
        procs.append(
            subprocess.Popen(
                [dask, "worker", "--scheduler-file", str(sched), "--host", "127.0.0.1"]
                + ["--nthreads", "1", "--no-dashboard", "--name", f"bench-{i}"]
                + ["--local-directory", str(tmp / f"w{i}")],
                **quiet,
            )
        )
    import distributed

    with distributed.Client(
        scheduler_file=str(sched), timeout="120s", set_as_default=False
    ) as client:
        client.wait_for_workers(2, timeout=120)
    return json.loads(sched.read_text())["address"], procs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="local pool size (default 2)")
    parser.add_argument("--quick", action="store_true", help="20 images, one run (CI smoke)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.runs = 20, 1
    with tempfile.TemporaryDirectory(prefix="qcow2ovl-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        images = tmp / "images"
        images.mkdir()
        start = time.perf_counter()
        size = build(images, args.images)
        print(
            f"{args.images} images of 1 GiB (1 snapshot, {size / MiB:.1f} MiB each) built in "
            f"{time.perf_counter() - start:.1f} s"
        )
        paths = sorted(str(p) for p in images.iterdir())
        timed(
            "serial qcow2ovl.check loop",
            args.runs,
            args.images,
            lambda: [qcow2ovl.check(p) for p in paths],
        )
        timed(
            f"local pool, {args.jobs} jobs",
            args.runs,
            args.images,
            lambda: fleet.check([str(images)], jobs=args.jobs),
        )
        address, procs = start_cluster(tmp)
        try:
            import distributed

            with distributed.Client(address, set_as_default=False) as client:
                timed(
                    "dask, 2 workers x 1 thread",
                    args.runs,
                    args.images,
                    lambda: fleet.check([str(images)], client=client),
                )
        finally:
            for proc in reversed(procs):
                proc.kill()
                proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
