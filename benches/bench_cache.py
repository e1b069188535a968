"""The L2 table cache under misses: random small reads before and after the cache is full.

The image is 4 GiB, ``preallocation=metadata``, 512-byte clusters: 131,072 L2 tables, twice what
the default cache (32 MiB of tables: 65,536) holds. Random 512-byte reads are made in rounds of
``--round`` reads; each round is timed on its own. The first rounds fill the cache (every read a
miss, no eviction); once it is full every miss evicts. An eviction that scanned every slot made
the full-cache rate fall to a tenth of the filling rate; an O(1) LRU keeps them alike.

Prints one JSON object: reads per second while filling and when full, their ratio, and QEMU's
rate for the same kind of reads (``qemu-img bench`` has no random mode: sequential 512-byte reads
over the same image, with its default 32 MiB L2 cache, as a yardstick, not a like-for-like).

Usage::

    python benches/bench_cache.py [--dir DIR] [--round 16384] [--rounds 16]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import qcow2ovl

GiB = 1 << 30


def build(d: Path) -> Path:
    img = d / "prealloc-4G-512.qcow2"
    if not img.exists():
        qcow2ovl.create(img, 4 * GiB, cluster_size=512, preallocation="metadata")
    return img


def our_rounds(img: Path, per_round: int, rounds: int, seed: int) -> list[float]:
    """Reads per second of each round of random 512-byte reads, from a fresh open."""
    rng = random.Random(seed)
    buf = bytearray(512)
    rates = []
    with qcow2ovl.open(img) as image:
        sectors = image.virtual_size // 512
        for _ in range(rounds):
            offsets = [rng.randrange(sectors) * 512 for _ in range(per_round)]
            t0 = time.perf_counter()
            for off in offsets:
                image.readinto(off, buf)
            rates.append(per_round / (time.perf_counter() - t0))
    return rates


def qemu_rate(img: Path, count: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [
            "qemu-img",
            "bench",
            "-f",
            "qcow2",
            "-c",
            str(count),
            "-s",
            "512",
            "-S",
            "262144",
            "-t",
            "writeback",
            str(img),
        ],
        check=True,
        capture_output=True,
    )
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="where the image is kept")
    ap.add_argument("--round", type=int, default=16384, help="reads per timed round")
    ap.add_argument("--rounds", type=int, default=16, help="rounds (4 fill the cache at 16384)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = args.dir or Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        img = build(d)
        with qcow2ovl.open(img) as image:
            capacity = image._core.cache_tables
        rates = our_rounds(img, args.round, args.rounds, args.seed)
        # Distinct tables touched grows with the reads; the cache is full once about
        # `capacity` distinct tables were loaded (the first rounds), surely by twice that.
        fill_rounds = max(1, capacity // args.round // 2)
        filling = statistics.median(rates[:fill_rounds])
        full_from = min(len(rates) - 1, 2 * capacity // args.round + 1)
        full = statistics.median(rates[full_from:])
        qemu = qemu_rate(img, args.round * 4)
    print(
        json.dumps(
            {
                "workload": "rand-512-4G-prealloc-512B-clusters",
                "cache_tables": capacity,
                "rounds_per_s": [round(r) for r in rates],
                "filling_per_s": round(filling),
                "full_per_s": round(full),
                "full_over_filling": round(full / filling, 3),
                "qemu_seq_512_per_s": round(qemu),
            }
        )
    )


if __name__ == "__main__":
    main()
