"""Open time with every overlap check on, against ``qemu-img check`` on the same image.

Builds a 1 TiB ``preallocation=metadata`` image (every L2 table present) with 8 internal
snapshots, then times ``qcow2ovl.open(path, overlap_check="all")`` (header, L1, refcount table,
snapshot table and all 8 snapshot L1 tables read, every metadata cluster entered into the map)
and ``qemu-img check`` in the same run. Prints one JSON object. Usage::

    python benches/bench_open.py [--size 1T] [--snapshots 8] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import tempfile
import time

import qcow2ovl


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="1T")
    ap.add_argument("--snapshots", type=int, default=8)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--check-runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qcow2ovl-bench-") as tmp:
        img = str(pathlib.Path(tmp) / "bench.qcow2")
        t0 = time.perf_counter()
        run(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            img,
            args.size,
        )
        for i in range(args.snapshots):
            run("qemu-img", "snapshot", "-c", f"snap{i}", img)
        build_s = time.perf_counter() - t0

        open_times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            with qcow2ovl.open(img, overlap_check="all") as image:
                pass
            open_times.append(time.perf_counter() - t)
        with qcow2ovl.open(img) as image:
            extents = image.metadata_extents()
            map_bytes = image.map_memory_usage()
            clusters = sum(length for _, length, _ in extents) // image.info.cluster_size
            file_size = image.info.file_size

        check_times = []
        for _ in range(args.check_runs):
            t = time.perf_counter()
            subprocess.run(["qemu-img", "check", img], check=True, stdout=subprocess.DEVNULL)
            check_times.append(time.perf_counter() - t)

    open_s = statistics.median(open_times)
    check_s = statistics.median(check_times)
    print(
        json.dumps(
            {
                "workload": f"prealloc-metadata-{args.size}-snap{args.snapshots}",
                "file_bytes": file_size,
                "metadata_clusters": clusters,
                "map_bytes": map_bytes,
                "open_ms_median": round(open_s * 1e3, 3),
                "open_ms_min": round(min(open_times) * 1e3, 3),
                "qemu_img_check_ms_median": round(check_s * 1e3, 1),
                "open_percent_of_check": round(100 * open_s / check_s, 3),
                "build_s": round(build_s, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
