"""``qcow2ovl demo``: what the package does, on a real image and on a synthetic 1 TiB one.

Metadata types are printed by their option keys (``active-l2``), as ``qcow2ovl map`` prints them.
Imported only when the demo runs: it needs modules the other commands do not.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time

import qcow2ovl
from qcow2ovl import MetadataMap, MetadataType, NaiveChecker, _format


def _demo_real_image() -> None:
    """Build a small image with QEMU (snapshots, a bitmap), scan it, show its map and checks."""
    qemu_img, qemu_io = shutil.which("qemu-img"), shutil.which("qemu-io")
    if not qemu_img or not qemu_io:
        print("(qemu-img/qemu-io not found: skipping the real-image part of the demo)\n")
        return
    with tempfile.TemporaryDirectory(prefix="qcow2ovl-demo-") as tmp:
        path = os.path.join(tmp, "demo.qcow2")

        def sh(*cmd: str) -> None:
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

        sh(qemu_img, "create", "-q", "-f", "qcow2", path, "4G")
        sh(qemu_io, "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 3G 64k", path)
        sh(qemu_img, "snapshot", "-c", "before-upgrade", path)
        sh(qemu_io, "-c", "write -P 0x11 0 64k", path)
        sh(qemu_img, "snapshot", "-c", "after-upgrade", path)
        sh(qemu_img, "bitmap", "--add", path, "backup-0")
        with qcow2ovl.open(path) as image:
            print(f"$ qcow2ovl info {path}")
            print(_format.info_text(image, _format.info_dict(image)))
            extents = image.metadata_extents()
            print(f"\n$ qcow2ovl map {path}")
            print(_format.map_text(extents))
            cs = image.info.cluster_size
            end = max(off + length for off, length, _ in extents)
            print("\npre-write checks (host offset, size -> metadata types hit):")
            for off, size in [(0, 512), (extents[-1][0] + 100, 4096), (end, cs), (end - 1, 2)]:
                hit = image.check_overlap(off, size)
                print(f"  {off:#10x} {size:>6} -> {_format.types_text(hit) or 'none (safe)'}")
        print()


def run() -> int:
    """Scan a real image (when QEMU is installed), then map a synthetic 1 TiB image with 16
    snapshots and check writes against it next to QEMU's naive algorithm."""
    _demo_real_image()
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
    print(f"{'host offset':>16} {'size':>6}  metadata types hit")
    for off, size in probes:
        hit = m.check(off, size)
        print(f"{off:#16x} {size:>6}  {_format.types_text(hit) or 'none (safe)'}")
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
