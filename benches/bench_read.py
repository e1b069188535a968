"""Guest read throughput against QEMU on the same images, in the same run.

Workloads (page cache warm; images cached in ``--dir`` between runs, so only the first run pays
for building them — about 30 s for the 1 GiB image and its compressed copy on the project VM):

- ``seq-1M``: the whole 1 GiB fully allocated image in 1 MiB reads. qcow2ovl: ``Image.readinto``
  into one reused buffer from Python. QEMU: ``qemu-img bench -c 1024 -s 1M -S 1M -t writeback``.
- ``seq-4K``: the first 256 MiB in 4 KiB reads (``qemu-img bench -s 4K -S 4K``); qemu-img bench
  has no random mode, so ``rand-4K`` (ours only: 65536 random 4 KiB reads) is reported beside it.
- ``compressed``: the whole disk of a zlib-compressed copy, ``qcow2ovl convert`` against
  ``qemu-img convert -O raw`` to the same file system.
- ``memory``: peak RSS of a child process reading a ``--big`` (default 64 GiB)
  ``preallocation=metadata`` image end to end in 1 MiB reads, against its RSS after open.

Prints one JSON object per workload. Usage::

    python benches/bench_read.py [--dir DIR] [--runs 5] [--big 64G] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import qcow2ovl

GiB = 1 << 30
MiB = 1 << 20


def sh(*cmd: str | Path) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True).stdout


def build(d: Path) -> tuple[Path, Path]:
    """A fully allocated 1 GiB qcow2 image with varied data, and a zlib-compressed copy."""
    img, comp = d / "full-1G.qcow2", d / "full-1G-zlib.qcow2"
    if img.exists() and comp.exists():
        return img, comp
    raw = d / "src.raw"
    rng = random.Random(1)
    block = bytes(rng.getrandbits(8) for _ in range(MiB // 8)) * 8  # compressible, not zero
    with open(raw, "wb") as f:
        for i in range(1024):
            f.write(block[i % 97 :] + block[: i % 97])
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
    sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, comp)
    raw.unlink()
    return img, comp


def qemu_bench(img: Path, count: int, size: str) -> float:
    out = sh(
        "qemu-img",
        "bench",
        "-f",
        "qcow2",
        "-t",
        "writeback",
        "-c",
        str(count),
        "-s",
        size,
        "-S",
        size,
        img,
    )
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    assert m, out
    return float(m.group(1))


def ours_seq(img: Path, total: int, chunk: int) -> float:
    with qcow2ovl.open(img, overlap_check="none") as image:
        buf = bytearray(chunk)
        t0 = time.perf_counter()
        for off in range(0, total, chunk):
            image.readinto(off, buf)
        return time.perf_counter() - t0


def ours_rand(img: Path, count: int, chunk: int) -> float:
    rng = random.Random(2)
    with qcow2ovl.open(img, overlap_check="none") as image:
        offsets = [rng.randrange(image.virtual_size // chunk) * chunk for _ in range(count)]
        buf = bytearray(chunk)
        t0 = time.perf_counter()
        for off in offsets:
            image.readinto(off, buf)
        return time.perf_counter() - t0


def median(f, runs: int) -> float:  # noqa: ANN001
    return statistics.median(f() for _ in range(runs))


MEMORY_CHILD = """
import resource, sys, qcow2ovl
img = qcow2ovl.open(sys.argv[1], overlap_check="none")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
buf = bytearray(1 << 20)
for off in range(0, img.virtual_size, 1 << 20):
    img.readinto(off, buf)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, img._core.cache_tables, img.info.cluster_size)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "qcow2ovl-bench-read"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--big", default="64G")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    img, comp = build(d)
    prep = time.perf_counter() - t0
    for p in (img, comp):
        # Warm the page cache in chunks (a child inherits the parent's peak RSS on Linux, so the
        # parent must stay small for the memory workload).
        with open(p, "rb") as f:
            while f.read(8 * MiB):
                pass

    q = median(lambda: qemu_bench(img, 1024, "1M"), args.runs)
    o = median(lambda: ours_seq(img, GiB, MiB), args.runs)
    print(
        json.dumps(
            {
                "workload": "seq-1M",
                "prep_s": round(prep, 1),
                "qemu_s": q,
                "ours_s": round(o, 4),
                "ours_GiB_s": round(1 / o, 2),
                "ratio_qemu_over_ours": round(q / o, 2),
            }
        )
    )
    n = 65536
    q = median(lambda: qemu_bench(img, n, "4K"), args.runs)
    o = median(lambda: ours_seq(img, n * 4096, 4096), args.runs)
    r = median(lambda: ours_rand(img, n, 4096), args.runs)
    print(
        json.dumps(
            {
                "workload": "seq-4K",
                "reads": n,
                "qemu_s": q,
                "ours_s": round(o, 4),
                "ratio_qemu_over_ours": round(q / o, 2),
                "ours_rand_4K_s": round(r, 4),
                "ratio_qemu_seq_over_ours_rand": round(q / r, 2),
            }
        )
    )

    out = d / "out.raw"

    def qconv() -> float:
        t = time.perf_counter()
        sh("qemu-img", "convert", "-O", "raw", comp, out)
        return time.perf_counter() - t

    def oconv() -> float:
        t = time.perf_counter()
        sh(sys.executable, "-m", "qcow2ovl", "convert", comp, out)
        return time.perf_counter() - t

    q = median(qconv, args.runs)
    o = median(oconv, args.runs)
    out.unlink()
    print(
        json.dumps(
            {
                "workload": "compressed",
                "qemu_convert_s": round(q, 3),
                "ours_convert_s": round(o, 3),
                "ratio_qemu_over_ours": round(q / o, 2),
            }
        )
    )

    if not args.skip_memory:
        big = d / f"prealloc-{args.big}.qcow2"
        if not big.exists():
            sh("qemu-img", "create", "-f", "qcow2", "-o", "preallocation=metadata", big, args.big)
            sh("qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 7G 1M", big)
        t = time.perf_counter()
        res = sh(sys.executable, "-c", MEMORY_CHILD, big).split()
        before, after, tables, cs = (int(x) for x in res)
        print(
            json.dumps(
                {
                    "workload": "memory",
                    "image": args.big,
                    "read_s": round(time.perf_counter() - t, 1),
                    "rss_after_open_KiB": before,
                    "peak_rss_KiB": after,
                    "growth_KiB": after - before,
                    "cache_bytes_KiB": tables * cs // 1024,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
