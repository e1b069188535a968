"""``qcow2ovl demo``: what the package does. First a guarded write: our own engine refuses a
guest write that a damaged L2 entry would send onto the L1 table, while QEMU with its checks off
destroys the image. Then a QEMU-made image's map and checks, and a synthetic 1 TiB one.

Metadata types are printed by their option keys (``active-l2``), as ``qcow2ovl map`` prints them.
Imported only when the demo runs: it needs modules the other commands do not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import struct
import subprocess
import tempfile
import textwrap
import time

import qcow2ovl
from qcow2ovl import MetadataMap, MetadataType, NaiveChecker, _cli_info, _format

MiB = 1 << 20
#: Where the demo image keeps guest data: (guest offset, length, pattern byte).
_DATA = ((0, 64 << 10, 0x2A), (1 * MiB, 64 << 10, 0x2B))
#: The guest write both writers get: 512 bytes of 0xff at guest offset 0.
_WRITE = (0, 512, 0xFF)
_ENTRY_MASK = 0x00FFFFFFFFFFFE00
_COPIED = 1 << 63


def _l2_entry_of_cluster_0(path: str) -> tuple[int, int, int]:
    """(host offset of the L2 entry that maps guest cluster 0, the entry, the L1 table's host
    offset), read from the header and tables."""
    with open(path, "rb") as f:
        header = f.read(48)
        l1_offset = struct.unpack_from(">Q", header, 40)[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & _ENTRY_MASK
        f.seek(l2_offset)
        entry = struct.unpack(">Q", f.read(8))[0]
    return l2_offset, entry, l1_offset


def _metadata_digests(
    path: str, extents: list[tuple[int, int, MetadataType]], cluster_size: int
) -> dict[int, tuple[MetadataType, bytes]]:
    """A digest of every metadata cluster; the header's incompatible-features field (where the
    corrupt bit lives) is left out so that only other changes show."""
    out: dict[int, tuple[MetadataType, bytes]] = {}
    with open(path, "rb") as f:
        for offset, length, types in extents:
            for at in range(offset, offset + length, cluster_size):
                f.seek(at)
                data = bytearray(f.read(cluster_size))
                if at == 0:
                    data[72:80] = bytes(8)
                out[at] = (types, hashlib.sha256(data).digest())
    return out


def _changed(
    before: dict[int, tuple[MetadataType, bytes]], path: str, cluster_size: int
) -> list[str]:
    extents = [(at, cluster_size, types) for at, (types, _) in before.items()]
    after = _metadata_digests(path, extents, cluster_size)
    return [
        f"{_format.types_text(types)} at {at:#x}"
        for at, (types, digest) in before.items()
        if after[at][1] != digest
    ]


def _qemu_check(qemu_img: str, path: str) -> str:
    """``qemu-img check``'s verdict in a few words."""
    proc = subprocess.run(
        [qemu_img, "check", "--output=json", path], capture_output=True, text=True, check=False
    )
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        return "cannot check: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    errors, leaks = report.get("corruptions", 0), report.get("leaks", 0)
    return f"{errors} error{'s' * (errors != 1)}, {leaks} leaked cluster{'s' * (leaks != 1)}"


def _side_by_side(rows: list[tuple[str, str, str]], left: str, right: str) -> None:
    """Rows of (what, qcow2ovl, QEMU) in three wrapped columns."""
    w0, w = 16, 39
    print(f"{'':<{w0}}  {left:<{w}}  {right}")
    print(f"{'':<{w0}}  {'-' * w}  {'-' * w}")
    for what, ours, theirs in rows:
        a = textwrap.wrap(what, w0) or [""]
        b = textwrap.wrap(ours, w) or [""]
        c = textwrap.wrap(theirs, w) or [""]
        for i in range(max(len(a), len(b), len(c))):
            cells = [col[i] if i < len(col) else "" for col in (a, b, c)]
            print(f"{cells[0]:<{w0}}  {cells[1]:<{w}}  {cells[2]}".rstrip())
    print()


def _read_u64(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def _demo_guarded_write() -> bool:
    """Create an image with our engine, damage one L2 entry so that the next guest write would
    land on the L1 table, and send that write to our engine and to QEMU with checks off.
    Returns whether our side behaved as it must (write refused, image marked corrupt, no
    metadata changed, the other data readable)."""
    qemu_img, qemu_io = shutil.which("qemu-img"), shutil.which("qemu-io")
    print("=" * 100)
    print("1. A guarded write: what happens when a damaged table sends guest data onto metadata")
    print("=" * 100)
    with tempfile.TemporaryDirectory(prefix="qcow2ovl-demo-") as tmp:
        path = os.path.join(tmp, "guarded.qcow2")
        qcow2ovl.create(path, 64 * MiB)
        with qcow2ovl.open(path, writable=True) as image:
            for offset, length, byte in _DATA:
                image.write(offset, bytes([byte]) * length)
        print(f"qcow2ovl.create({os.path.basename(path)!r}, 64 MiB), then Image.write:")
        for offset, length, byte in _DATA:
            print(f"  {length >> 10} KiB of {byte:#04x} at guest offset {offset:#x}")
        with qcow2ovl.open(path) as image:
            extents = list(image.metadata_extents())
            cs = image.info.cluster_size
        print(f"\n$ qcow2ovl map {os.path.basename(path)}     (every metadata cluster of the file)")
        print(_format.map_text(extents))
        print()

        entry_at, entry, l1 = _l2_entry_of_cluster_0(path)
        bad = _COPIED | l1
        with open(path, "r+b") as rw:
            rw.seek(entry_at)
            rw.write(struct.pack(">Q", bad))
        print(
            textwrap.fill(
                f"Now we damage the image the way QEMU's iotest 060 does. The L2 entry that maps "
                f"guest cluster 0 (8 bytes at host {entry_at:#x}) said {entry:#018x}: 'guest "
                f"cluster 0 is at host {entry & _ENTRY_MASK:#x}'. We rewrite it to {bad:#018x}: "
                f"'guest cluster 0 is at host {l1:#x}, and only this table uses it, so write it "
                f"in place'. But {l1:#x} is the L1 table, the root that leads to every "
                f"guest cluster. The next guest write to cluster 0 goes right on top of it, "
                f"unless the writer checks every host write against the metadata first.",
                100,
            )
        )
        print()
        copy = os.path.join(tmp, "qemu-copy.qcow2")
        shutil.copyfile(path, copy)
        l1_entry_before = _read_u64(path, l1)
        digests = _metadata_digests(path, extents, cs)
        if qemu_img:
            print(f"qemu-img check right after the damage: {_qemu_check(qemu_img, path)}")
            print(
                "(the damaged entry itself: a cluster referenced twice, the old data cluster lost)"
            )
            print()

        w_off, w_len, w_byte = _WRITE
        print(
            f"The same guest write goes to both: {w_len} bytes of {w_byte:#04x} at guest offset 0."
        )
        print(f'  qcow2ovl: image.write({w_off}, b"\\x{w_byte:02x}" * {w_len})', end="")
        print('   (overlap_check="all", the default)')
        opts = f"driver=qcow2,file.filename={copy.replace(',', ',,')},overlap-check=none"
        print(f'  QEMU:     qemu-io -c "write -P {w_byte:#04x} {w_off} {w_len}" --image-opts \\')
        print(
            f"              driver=qcow2,file.filename={os.path.basename(copy)},overlap-check=none"
        )
        print()

        events: list[tuple[str, int, int, bool]] = []
        logged: list[str] = []
        logger = logging.getLogger("qcow2ovl")

        class _Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                logged.append(record.getMessage())

        keep = _Keep()
        logger.addHandler(keep)
        propagate, logger.propagate = logger.propagate, False
        refused: qcow2ovl.MetadataOverlapError | None = None
        try:
            with qcow2ovl.open(
                path, writable=True, on_corruption=lambda *a: events.append(a)
            ) as image:
                try:
                    image.write(w_off, bytes([w_byte]) * w_len)
                except qcow2ovl.MetadataOverlapError as exc:
                    refused = exc
                try:
                    image.write(2 * MiB, b"later write")
                    later = "accepted (!)"
                except OSError as exc:
                    later = f"refused too ({type(exc).__name__}, errno {exc.errno})"
        finally:
            logger.removeHandler(keep)
            logger.propagate = propagate
        if refused is None:
            print("qcow2ovl: the write was NOT refused -- this is a bug, please report it")
            return False
        print(f"qcow2ovl raised {type(refused).__name__} (an OSError, errno EIO):")
        print(f"  {refused}")
        print(
            f"  .types={_format.types_text(MetadataType(refused.types))} "
            f".offset={refused.offset:#x} .size={refused.size}; "
            f"on_corruption called {len(events)}x; the 'qcow2ovl' logger said:"
        )
        for message in logged:
            print(f"  {message}")
        print(f"  a later write to another cluster: {later}")
        print()

        with qcow2ovl.open(path) as image:
            corrupt = image.info.corrupt
            data_ok = all(
                image.read(offset, length) == bytes([byte]) * length
                for offset, length, byte in _DATA[1:]
            )
        try:
            qcow2ovl.open(path, writable=True).close()
            reopen = "allowed (!)"
        except qcow2ovl.CorruptImageError:
            reopen = "refused"
        ours_changed = _changed(digests, path, cs)
        ours_l1 = _read_u64(path, l1)
        ok = (
            corrupt
            and reopen == "refused"
            and not ours_changed
            and data_ok
            and ours_l1 == l1_entry_before
        )
        rows = [
            ("the write", "refused before a byte reached the disk", ""),
            (
                "corrupt bit",
                f"{'set' if corrupt else 'NOT set'}; writable opens {reopen}",
                "",
            ),
            (
                "metadata clusters changed",
                f"{len(ours_changed)} of {len(digests)}"
                + (
                    ": " + ", ".join(ours_changed)
                    if ours_changed
                    else " (the header: only the corrupt bit)"
                ),
                "",
            ),
            (
                "L1 entry 0",
                f"{ours_l1:#018x} ({'intact' if ours_l1 == l1_entry_before else 'CHANGED'})",
                "",
            ),
            (
                f"data at {_DATA[1][0] // MiB} MiB",
                f"reads back {_DATA[1][2]:#04x} x 64 KiB" if data_ok else "LOST",
                "",
            ),
        ]
        if qemu_img:
            rows.append(
                (
                    "qemu-img check",
                    _qemu_check(qemu_img, path) + " (the damage we made, nothing more)",
                    "",
                )
            )
        if not (qemu_img and qemu_io):
            _side_by_side(
                [(a, b, "(qemu-img/qemu-io not installed)") for a, b, _ in rows], "qcow2ovl", "QEMU"
            )
            return ok

        proc = subprocess.run(
            [qemu_io, "-c", f"write -P {w_byte:#04x} {w_off} {w_len}", "--image-opts", opts],
            capture_output=True,
            text=True,
            check=False,
        )
        print("qemu-io (overlap-check=none) printed:")
        for line in (proc.stdout + proc.stderr).strip().splitlines():
            print(f"  {line}")
        print()
        theirs_changed = _changed(digests, copy, cs)
        with open(copy, "rb") as f:
            header = f.read(80)
            f.seek(l1)
            theirs_l1 = struct.unpack(">Q", f.read(8))[0]
        theirs_corrupt = bool(struct.unpack_from(">Q", header, 72)[0] & 2)
        offset, length, byte = _DATA[1]
        read = subprocess.run(
            [qemu_io, "-c", f"read -P {byte:#04x} {offset} {length}", "-f", "qcow2", copy],
            capture_output=True,
            text=True,
            check=False,
        )
        first = (read.stdout + read.stderr).strip().splitlines()[:1] or [""]
        theirs_data = (
            f"reads back {byte:#04x} x 64 KiB"
            if read.returncode == 0
            else f"qemu-io says: {first[0]}"
        )
        theirs_rows = [
            f"done: {w_len} bytes of {w_byte:#04x} landed on the L1 table"
            if proc.returncode == 0 and theirs_l1 != l1_entry_before
            else f"qemu-io exit status {proc.returncode}, L1 entry 0 {theirs_l1:#x}",
            f"{'set' if theirs_corrupt else 'not set'}: nothing warns the next user",
            f"{len(theirs_changed)} of {len(digests)}: " + ", ".join(theirs_changed),
            f"{theirs_l1:#018x} (was {l1_entry_before:#x})",
            theirs_data,
            _qemu_check(qemu_img, copy),
        ]
        rows = [(a, b, c) for (a, b, _), c in zip(rows, theirs_rows)]
        _side_by_side(rows, 'qcow2ovl (overlap_check="all")', "QEMU (overlap-check=none)")
    print(
        textwrap.fill(
            "Why it matters: the L1 table is the root of the guest disk. QEMU with its checks "
            "off wrote guest data over it, and every guest cluster behind L1 entry 0 (the first "
            "512 MiB of the disk) is now unreachable; the image still opens and nothing marks it "
            "corrupt, so the next writer builds on the damage. QEMU has the same checks, but its "
            "thorough ones walk the tables on every write, so its default skips some and many "
            "setups turn them off for speed. qcow2ovl checks every host write of its engine "
            "against a metadata map in constant time, all checks on: the write is refused, the "
            "image is marked corrupt, and the data that was still good stays readable.",
            100,
        )
    )
    print()
    return ok


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
            print(_cli_info.info_text(_cli_info.image_info(image), image))
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
    """Show a guarded write next to QEMU's unguarded one, scan a real image (when QEMU is
    installed), then map a synthetic 1 TiB image with 16 snapshots and check writes against it
    next to QEMU's naive algorithm."""
    guarded_ok = _demo_guarded_write()
    print("=" * 100)
    print("2. The metadata map of a QEMU-made image, and pre-write checks against it")
    print("=" * 100)
    _demo_real_image()
    print("=" * 100)
    print("3. A synthetic 1 TiB image with 16 snapshots: the map next to QEMU's naive check")
    print("=" * 100)
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
    if not guarded_ok:
        print("\nqcow2ovl demo: the guarded write did not behave as it must (see part 1)")
        return 1
    return 0
