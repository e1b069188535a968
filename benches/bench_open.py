"""Open time with every overlap check on, against ``qemu-img check`` on the same image.

Preparation: builds a 1 TiB ``preallocation=metadata`` image (every L2 table present) with 8
internal snapshots. That takes about 4 minutes on the project's 2-core VM (qemu-img writes every
L2 table, then copies the L1 table per snapshot), so the image is cached: it is kept in
``--cache-dir`` (default ``$XDG_CACHE_HOME/qcow2ovl-bench``, else ``~/.cache/qcow2ovl-bench``)
under a name made of its parameters and QEMU's version, and reused by later runs (``--rebuild``
builds it again). The output says how long preparation took and whether the image was reused.

Then it times ``qcow2ovl.open(path, overlap_check="all")`` (header, L1, refcount table,
snapshot table and all 8 snapshot L1 tables read, every metadata cluster entered into the map)
and ``qemu-img check`` in the same run. Prints one JSON object. Usage::

    python benches/bench_open.py [--size 1T] [--snapshots 8] [--runs 20] [--cache-dir DIR]
                                 [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import time

import qcow2ovl


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "qcow2ovl-bench"


def prepare(cache_dir: pathlib.Path, size: str, snapshots: int, rebuild: bool) -> tuple[str, bool]:
    """The benchmark image, built on first use (or with *rebuild*) and reused afterwards.

    Built under a temporary name and renamed when complete, so an interrupted build is never
    reused. Returns its path and whether it was reused."""
    version = subprocess.run(
        ["qemu-img", "--version"], check=True, capture_output=True, text=True
    ).stdout.split("\n")[0]
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{size}-snap{snapshots}-{version}").strip("-")
    cache_dir.mkdir(parents=True, exist_ok=True)
    img = cache_dir / f"prealloc-metadata-{tag}.qcow2"
    if img.exists() and not rebuild:
        return str(img), True
    tmp = cache_dir / f".{img.name}.{os.getpid()}.partial"
    try:
        run(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            str(tmp),
            size,
        )
        for i in range(snapshots):
            run("qemu-img", "snapshot", "-c", f"snap{i}", str(tmp))
        tmp.replace(img)
    finally:
        tmp.unlink(missing_ok=True)
    return str(img), False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="1T")
    ap.add_argument("--snapshots", type=int, default=8)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--check-runs", type=int, default=3)
    ap.add_argument("--cache-dir", type=pathlib.Path, default=default_cache_dir())
    ap.add_argument("--rebuild", action="store_true", help="build the image even if cached")
    args = ap.parse_args()
    t0 = time.perf_counter()
    img, reused = prepare(args.cache_dir, args.size, args.snapshots, args.rebuild)
    prep_s = time.perf_counter() - t0
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
                "image": img,
                "image_reused": reused,
                "prepare_s": round(prep_s, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
