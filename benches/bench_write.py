"""Guarded writes against QEMU's: check cost, write throughput and convert, side by side.

Three workloads, each measured for qcow2ovl and for QEMU in the same run:

``overlap``
    4 KiB overwrites of allocated clusters in a 1 TiB image with 1, 16 and 64 internal
    snapshots (``--snapshots``), one series point per count. Preparation: ``qcow2ovl.create``
    of a 1 TiB image, one 64 KiB write every 512 MiB (so every one of the 2,048 L2 tables
    exists) and a 64 MiB region at offset 0, then N snapshots taken by qcow2ovl (which share
    every L2 table with the active L1 table; ``qemu-img check`` verifies the result), then the
    region is overwritten once with ``qemu-io`` so its clusters belong to the active table
    alone and the timed writes are pure overwrites. The image is cached (``--cache-dir``, default
    ``~/.cache/qcow2ovl-bench``; ``--rebuild``) and reused; the timed writes overwrite the
    region with constant data, so reuse does not change the image's layout. Timed: CPU seconds
    (user + system) of 16,384 sequential 4 KiB writes over the region, ours with
    ``overlap_check="all"`` and ``"none"`` (in-process ``time.process_time``), QEMU's with
    ``qemu-img bench -w -t writeback -d 1 -s 4k --image-opts
    driver=qcow2,file.filename=...,overlap-check=all|none`` (the child's rusage).

``throughput``
    Sequential 64 KiB allocating writes filling a fresh 1 GiB image, then 4 KiB overwrites at
    a 68 KiB stride (a new cluster each time, wrapping at the end of the disk as ``qemu-img
    bench -S`` does) on the filled image, against ``qemu-img bench -w -t writeback`` with the
    same sizes, offsets and count, at queue depth 1 (ours is one synchronous stream) and at
    qemu-img's default depth 64. Ours also with random 4 KiB-aligned offsets. Wall time of the
    writes alone (QEMU's "Run completed in" time; ours excludes open and close).

``convert``
    A 1 GiB raw file (half random data, a quarter zeros written out, a quarter holes) to
    qcow2: ``qcow2ovl convert -O qcow2`` against ``qemu-img convert -f raw -O qcow2`` (its
    default output cache mode) and with ``-t writeback``, whole processes, wall and CPU time,
    the source warm in the page cache.

``bitmap``
    The cost of keeping a persistent dirty bitmap: the sequential 64 KiB fill of a fresh 1 GiB
    image and then 32,768 4 KiB overwrites at a 68 KiB stride, on an image without a bitmap
    and on one with an enabled bitmap of QEMU's default granularity (``qemu-img bitmap
    --add``), for ours and for ``qemu-img bench -d 1``, alternating. Ours is timed from the
    first write to the end of ``close()`` (which stores the bitmap); QEMU's is the whole
    ``qemu-img bench`` process (it stores at exit). Reported: each tool's time with a bitmap
    over its time without.

Each measurement is repeated ``--repeat`` times, alternating ours and QEMU's; the median is
reported. Prints one JSON object per workload. Usage::

    python benches/bench_write.py [overlap] [throughput] [convert] [bitmap] [--repeat 3]
                                  [--snapshots 1,16,64] [--cache-dir DIR] [--rebuild]
                                  [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import qcow2ovl

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def cpu_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def qemu_bench(opts: str, *args: str) -> tuple[float, float]:
    """(wall seconds qemu-img reports for the requests, CPU seconds of the whole process)."""
    cpu0 = cpu_of_children()
    out = run("qemu-img", "bench", "-w", "-t", "writeback", *args, "--image-opts", opts).stdout
    cpu = cpu_of_children() - cpu0
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    assert m, out
    return float(m.group(1)), cpu


def image_opts(path: pathlib.Path, overlap: str) -> str:
    escaped = str(path).replace(",", ",,")
    return f"driver=qcow2,file.filename={escaped},overlap-check={overlap}"


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "qcow2ovl-bench"


# ---- overlap ---------------------------------------------------------------------------------

REGION = 64 * MiB
SNAPSHOT_COUNTS = (1, 16, 64)
OVERWRITES = REGION // (4 * KiB)


def prepare_overlap(
    cache_dir: pathlib.Path, rebuild: bool, snapshots: int
) -> tuple[pathlib.Path, bool]:
    version = run("qemu-img", "--version").stdout.split("\n")[0]
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"1T-snap{snapshots}-{version}").strip("-")
    cache_dir.mkdir(parents=True, exist_ok=True)
    img = cache_dir / f"write-overlap-v2-{tag}.qcow2"
    if img.exists() and not rebuild:
        return img, True
    tmp = cache_dir / f".{img.name}.{os.getpid()}.partial"
    try:
        qcow2ovl.create(tmp, TiB, overwrite=True)
        with qcow2ovl.open(tmp, writable=True) as image:
            chunk = b"\x5a" * (64 * KiB)
            for off in range(0, TiB, 512 * MiB):
                image.write(off, chunk)
            image.write(0, b"\x5b" * REGION)
            for i in range(snapshots):
                image.create_snapshot(f"snap{i}")
        check = subprocess.run(["qemu-img", "check", str(tmp)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        run("qemu-io", "-c", f"write -P 0x5c 0 {REGION}", "-f", "qcow2", str(tmp))
        tmp.replace(img)
    finally:
        tmp.unlink(missing_ok=True)
    return img, False


def ours_overwrites(img: pathlib.Path, overlap: str) -> float:
    """CPU seconds of OVERWRITES sequential 4 KiB writes over the region."""
    buf = b"\xcd" * (4 * KiB)
    with qcow2ovl.open(img, writable=True, overlap_check=overlap) as image:
        write = image.write
        t0 = time.process_time()
        for off in range(0, REGION, 4 * KiB):
            write(off, buf)
        return time.process_time() - t0


def overlap_point(args: argparse.Namespace, snapshots: int) -> dict[str, object]:
    t0 = time.perf_counter()
    img, reused = prepare_overlap(args.cache_dir, args.rebuild, snapshots)
    prep_s = time.perf_counter() - t0
    with qcow2ovl.open(img) as image:
        metadata_clusters = sum(n for _, n, _ in image.metadata_extents()) // 65536
        assert len(image.snapshots) == snapshots
        map_bytes = image.map_memory_usage()  # what the "all" runs check against
    ours_all, ours_none, qemu_all, qemu_none = [], [], [], []
    qemu_wall = {"all": [], "none": []}  # type: dict[str, list[float]]
    qargs = ("-d", "1", "-s", "4k", "-S", "4k", "-c", str(OVERWRITES), "-o", "0")
    for _ in range(args.repeat):
        ours_none.append(ours_overwrites(img, "none"))
        ours_all.append(ours_overwrites(img, "all"))
        for overlap, cpus in (("none", qemu_none), ("all", qemu_all)):
            wall, cpu = qemu_bench(image_opts(img, overlap), *qargs)
            cpus.append(cpu)
            qemu_wall[overlap].append(wall)
    med = statistics.median
    n = OVERWRITES
    return {
        "snapshots": snapshots,
        "writes": n,
        "metadata_clusters": metadata_clusters,
        "map_bytes": map_bytes,
        "ours_cpu_s_all": round(med(ours_all), 4),
        "ours_cpu_s_none": round(med(ours_none), 4),
        "ours_extra_percent": round(100 * (med(ours_all) / med(ours_none) - 1), 2),
        "ours_extra_us_per_write": round((med(ours_all) - med(ours_none)) / n * 1e6, 3),
        "qemu_cpu_s_all": round(med(qemu_all), 4),
        "qemu_cpu_s_none": round(med(qemu_none), 4),
        "qemu_extra_percent": round(100 * (med(qemu_all) / med(qemu_none) - 1), 1),
        "qemu_extra_us_per_write": round((med(qemu_all) - med(qemu_none)) / n * 1e6, 3),
        "qemu_wall_s": {k: round(med(v), 4) for k, v in qemu_wall.items()},
        "qemu_wall_extra_percent": round(
            100 * (med(qemu_wall["all"]) / med(qemu_wall["none"]) - 1), 1
        ),
        "samples": {"ours_all": ours_all, "ours_none": ours_none},
        "image": str(img),
        "image_reused": reused,
        "prepare_s": round(prep_s, 1),
    }


def bench_overlap(args: argparse.Namespace) -> dict[str, object]:
    return {
        "workload": "overlap: 4 KiB overwrites, 1 TiB image, N snapshots",
        "series": [overlap_point(args, n) for n in args.snapshots],
    }


# ---- throughput ------------------------------------------------------------------------------

DISK = 1 * GiB
STRIDE = 68 * KiB
RANDOM_WRITES = 32768


def ours_sequential(path: pathlib.Path) -> float:
    qcow2ovl.create(path, DISK, overwrite=True)
    buf = b"\xab" * (64 * KiB)
    with qcow2ovl.open(path, writable=True) as image:
        write = image.write
        t0 = time.perf_counter()
        for off in range(0, DISK, 64 * KiB):
            write(off, buf)
        return time.perf_counter() - t0


def ours_overwrite(path: pathlib.Path, offsets: list[int]) -> float:
    buf = b"\xcd" * (4 * KiB)
    with qcow2ovl.open(path, writable=True) as image:
        write = image.write
        t0 = time.perf_counter()
        for off in offsets:
            write(off, buf)
        return time.perf_counter() - t0


def qemu_sequential(path: pathlib.Path, depth: int) -> float:
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(DISK))
    count = DISK // (64 * KiB)
    return qemu_bench(
        image_opts(path, "cached"), "-d", str(depth), "-s", "64k", "-c", str(count), "-o", "0"
    )[0]


def bench_throughput(args: argparse.Namespace) -> dict[str, object]:
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-write-", dir=args.work_dir))
    try:
        ours_img, qemu_img = work / "ours.qcow2", work / "qemu.qcow2"
        strided = [(i * STRIDE) % DISK for i in range(RANDOM_WRITES)]
        rng = random.Random(1)
        randoms = [rng.randrange(DISK // (4 * KiB)) * 4 * KiB for _ in range(RANDOM_WRITES)]
        seq = {"ours": [], "qemu_d1": [], "qemu_d64": []}  # type: dict[str, list[float]]
        ovw = {"ours": [], "ours_random": [], "qemu_d1": [], "qemu_d64": []}  # type: dict[str, list[float]]
        oargs = ("-s", "4k", "-S", str(STRIDE), "-c", str(RANDOM_WRITES), "-o", "0")
        for _ in range(args.repeat):
            seq["ours"].append(ours_sequential(ours_img))
            ovw["ours"].append(ours_overwrite(ours_img, strided))
            ovw["ours_random"].append(ours_overwrite(ours_img, randoms))
            for depth in (1, 64):
                qemu_img.unlink(missing_ok=True)
                seq[f"qemu_d{depth}"].append(qemu_sequential(qemu_img, depth))
                ovw[f"qemu_d{depth}"].append(
                    qemu_bench(image_opts(qemu_img, "cached"), "-d", str(depth), *oargs)[0]
                )
        med = {k: statistics.median(v) for k, v in seq.items()}
        omed = {k: statistics.median(v) for k, v in ovw.items()}
        return {
            "workload": "throughput: 1 GiB image, default options, overlap checks at defaults "
            "(ours all, QEMU cached)",
            "seq64k_MiB_s": {k: round(DISK / MiB / v, 1) for k, v in med.items()},
            "seq64k_ratio_ours_vs_qemu_d1": round(med["qemu_d1"] / med["ours"], 3),
            "seq64k_ratio_ours_vs_qemu_d64": round(med["qemu_d64"] / med["ours"], 3),
            "overwrite4k_kiops": {k: round(RANDOM_WRITES / v / 1e3, 1) for k, v in omed.items()},
            "overwrite4k_ratio_ours_vs_qemu_d1": round(omed["qemu_d1"] / omed["ours"], 3),
            "overwrite4k_ratio_ours_vs_qemu_d64": round(omed["qemu_d64"] / omed["ours"], 3),
            "prepare_s": 0.0,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- bitmap upkeep ---------------------------------------------------------------------------


def ours_with_close(path: pathlib.Path, offsets: list[int], size: int) -> float:
    """Seconds of `size`-byte writes at `offsets`, then close() (which stores bitmaps)."""
    buf = b"\xab" * size
    t0 = time.perf_counter()
    with qcow2ovl.open(path, writable=True) as image:
        write = image.write
        for off in offsets:
            write(off, buf)
    return time.perf_counter() - t0


def qemu_whole(path: pathlib.Path, *args: str) -> float:
    """Wall seconds of a whole `qemu-img bench -w -d 1` process."""
    t0 = time.perf_counter()
    run("qemu-img", "bench", "-f", "qcow2", "-w", "-t", "writeback", "-d", "1", *args, str(path))
    return time.perf_counter() - t0


def bench_bitmap(args: argparse.Namespace) -> dict[str, object]:
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-bitmap-", dir=args.work_dir))
    try:
        seq = list(range(0, DISK, 64 * KiB))
        strided = [(i * STRIDE) % DISK for i in range(RANDOM_WRITES)]
        times: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for bitmap in (False, True):
                tag = "bitmap" if bitmap else "plain"
                for tool in ("ours", "qemu"):
                    path = work / f"{tool}-{tag}.qcow2"
                    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(DISK))
                    if bitmap:
                        run("qemu-img", "bitmap", "--add", str(path), "b0")
                    if tool == "ours":
                        fill = ours_with_close(path, seq, 64 * KiB)
                        over = ours_with_close(path, strided, 4 * KiB)
                    else:
                        fill = qemu_whole(path, "-s", "64k", "-c", str(len(seq)))
                        over = qemu_whole(
                            path, "-s", "4k", "-S", str(STRIDE), "-c", str(RANDOM_WRITES)
                        )
                    times.setdefault(f"{tool}_{tag}_fill", []).append(fill)
                    times.setdefault(f"{tool}_{tag}_overwrite", []).append(over)
                    if bitmap:
                        check = run("qemu-img", "check", str(path)).stdout
                        assert "No errors" in check, check
                    path.unlink()
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = {
            f"{tool}_{what}": round(med[f"{tool}_bitmap_{what}"] / med[f"{tool}_plain_{what}"], 3)
            for tool in ("ours", "qemu")
            for what in ("fill", "overwrite")
        }
        return {
            "workload": "bitmap upkeep: 1 GiB fill (64 KiB) and 32,768 4 KiB overwrites, with "
            "and without an enabled bitmap (ours to the end of close, qemu-img bench -d 1 whole)",
            "seconds": {k: round(v, 3) for k, v in med.items()},
            "with_over_without": ratio,
            "prepare_s": 0.0,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- convert ---------------------------------------------------------------------------------


def make_raw(path: pathlib.Path) -> None:
    """1 GiB: per 4 MiB block, 2 MiB random data, 1 MiB zeros written out, 1 MiB hole."""
    with open(path, "wb") as f:
        f.truncate(GiB)
        for block in range(0, GiB, 4 * MiB):
            f.seek(block)
            f.write(os.urandom(2 * MiB))
            f.write(bytes(MiB))


def timed(*cmd: str) -> tuple[float, float]:
    cpu0, t0 = cpu_of_children(), time.perf_counter()
    run(*cmd)
    return time.perf_counter() - t0, cpu_of_children() - cpu0


def bench_convert(args: argparse.Namespace) -> dict[str, object]:
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.work_dir))
    try:
        src = work / "src.raw"
        t0 = time.perf_counter()
        make_raw(src)
        prep_s = time.perf_counter() - t0
        out = work / "out.qcow2"
        ours_cli = [sys.executable, "-m", "qcow2ovl", "convert", "-f", "raw", "-O", "qcow2"]
        qemu_cli = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
        # Ours flushes and fdatasyncs the output on close; QEMU is timed with its default output
        # cache mode and with -t writeback.
        qemu_wb = [*qemu_cli, "-t", "writeback"]
        res = {"ours": [], "qemu": [], "qemu_t_writeback": []}  # type: dict[str, list[tuple[float, float]]]
        with open(src, "rb") as f:  # warm the page cache
            while f.read(16 * MiB):
                pass
        for _ in range(args.repeat):
            for name, cli in (
                ("ours", ours_cli),
                ("qemu", qemu_cli),
                ("qemu_t_writeback", qemu_wb),
            ):
                out.unlink(missing_ok=True)
                res[name].append(timed(*cli, str(src), str(out)))
        same = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(out))
        wall = {k: statistics.median(w for w, _ in v) for k, v in res.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in res.items()}
        return {
            "workload": "convert: 1 GiB raw (1/2 data, 1/4 zeros, 1/4 holes) to qcow2",
            "wall_s": {k: round(v, 3) for k, v in wall.items()},
            "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
            "ratio_ours_vs_qemu_wall": round(wall["qemu"] / wall["ours"], 3),
            "ratio_ours_vs_qemu_t_writeback_wall": round(
                wall["qemu_t_writeback"] / wall["ours"], 3
            ),
            "output_identical": "identical" in same.stdout,
            "prepare_s": round(prep_s, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workloads", nargs="*", default=["overlap", "throughput", "convert"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--snapshots",
        type=lambda v: [int(x) for x in v.split(",")],
        default=list(SNAPSHOT_COUNTS),
        help="snapshot counts of the overlap series (default: 1,16,64)",
    )
    ap.add_argument("--cache-dir", type=pathlib.Path, default=default_cache_dir())
    ap.add_argument("--rebuild", action="store_true", help="build the overlap image again")
    ap.add_argument(
        "--work-dir", help="where the throughput and convert files go (default: TMPDIR)"
    )
    args = ap.parse_args()
    benches = {
        "overlap": bench_overlap,
        "throughput": bench_throughput,
        "convert": bench_convert,
        "bitmap": bench_bitmap,
    }
    for name in args.workloads:
        print(json.dumps(benches[name](args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
