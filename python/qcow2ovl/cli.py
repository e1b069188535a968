"""The ``qcow2ovl`` command line (also ``python -m qcow2ovl``)."""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence

from qcow2ovl import MetadataMap, MetadataType, NaiveChecker, Qcow2Error


def _demo(_args: argparse.Namespace) -> int:
    """Map a synthetic 1 TiB image with 16 snapshots and check writes against it."""
    cs = 65536
    rng = random.Random(2015)
    data_clusters = 1 << 24  # 1 TiB of guest data
    host_clusters = data_clusters + 16384
    used: set[int] = {0, 1, 2}
    l2s = rng.sample(range(3, host_clusters), 2048)
    used.update(l2s)
    free = (c for c in iter(lambda: rng.randrange(3, host_clusters), None) if c not in used)
    refblocks = [next(free) for _ in range(512)]
    m = MetadataMap(cs)
    m.enter(0, 1, MetadataType.MAIN_HEADER)
    m.enter(1 * cs, 1, MetadataType.REFCOUNT_TABLE)
    m.enter(2 * cs, 1, MetadataType.ACTIVE_L1)
    for c in l2s:
        m.enter(c * cs, 1, MetadataType.ACTIVE_L2)
    for c in refblocks:
        m.enter(c * cs, 1, MetadataType.REFCOUNT_BLOCK)
    image = bytearray()
    snapshots = []
    for _ in range(16):
        l1 = next(free)
        m.enter(l1 * cs, 1, MetadataType.INACTIVE_L1)
        table = [c * cs for c in l2s]
        for i in range(0, 2048, 4):
            table[i] = next(free) * cs
        for entry in table:
            m.enter(entry, 1, MetadataType.INACTIVE_L2)
        snapshots.append((len(image), 2048))
        image += b"".join(e.to_bytes(8, "big") for e in table)
    # The naive checker reads snapshot L1 tables from "the image": here a buffer at offset 0..
    naive = NaiveChecker(
        cs,
        l1_table_offset=2 * cs,
        l1_table=[c * cs for c in l2s],
        refcount_table_offset=cs,
        refcount_table=[c * cs for c in refblocks],
        snapshots=snapshots,
        image=bytes(image),
    )
    print(f"synthetic 1 TiB image, 64 KiB clusters, 16 snapshots: {len(m)} metadata clusters")
    print(f"metadata map: {m.memory_usage()} bytes ({m.memory_usage() / len(m):.1f} per cluster)")
    print()
    probes = [(0, 512), (2 * cs + 8, 8), (l2s[0] * cs, 4096), (refblocks[7] * cs + 100, 4096)]
    probes += [(rng.randrange(host_clusters) * cs, 65536) for _ in range(4)]
    print(f"{'offset':>16} {'size':>6}  hits")
    for off, size in probes:
        hit = m.check(off, size)
        names = "|".join(t.name or "" for t in MetadataType.ALL.bits() if t & hit) or "-"
        print(f"{off:#16x} {size:>6}  {names}")
    offsets = [rng.randrange(host_clusters) * cs for _ in range(2000)]
    t0 = time.perf_counter()
    for off in offsets:
        m.check(off, 4096)
    t1 = time.perf_counter()
    for off in offsets[:200]:
        naive.check(off, 4096)
    t2 = time.perf_counter()
    print()
    print(
        f"from Python (call overhead included): map {(t1 - t0) / 2000 * 1e9:.0f} ns/check, "
        f"naive 'all' {(t2 - t1) / 200 * 1e9:.0f} ns/check"
    )
    print("Rust-side numbers: python benches/bench_map.py")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qcow2ovl`` command."""
    parser = argparse.ArgumentParser(
        prog="qcow2ovl", description="qcow2 metadata maps and overlap checks"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="map a synthetic image and check writes against it")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (Qcow2Error, OSError, ValueError) as exc:
        print(f"qcow2ovl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
