"""The ``qcow2ovl`` command line (also ``python -m qcow2ovl``)."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from qcow2ovl import MetadataMap, MetadataType, NaiveChecker, Qcow2Error, _cli_create, _cli_guest
from qcow2ovl.image import Image
from qcow2ovl.image import open as open_image


def _demo_real_image() -> None:
    """Build a small image with QEMU (snapshots, a bitmap), scan it, show its map and checks."""
    qemu_img, qemu_io = shutil.which("qemu-img"), shutil.which("qemu-io")
    if not qemu_img or not qemu_io:
        print("(qemu-img/qemu-io not found: skipping the real-image part of the demo)\n")
        return
    with tempfile.TemporaryDirectory(prefix="qcow2ovl-demo-") as tmp:
        path = os.path.join(tmp, "demo.qcow2")

        def run(*cmd: str) -> None:
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

        run(qemu_img, "create", "-q", "-f", "qcow2", path, "4G")
        run(qemu_io, "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 3G 64k", path)
        run(qemu_img, "snapshot", "-c", "before-upgrade", path)
        run(qemu_io, "-c", "write -P 0x11 0 64k", path)
        run(qemu_img, "snapshot", "-c", "after-upgrade", path)
        run(qemu_img, "bitmap", "--add", path, "backup-0")
        print(f"$ qcow2ovl info {path}")
        _info(argparse.Namespace(image=path, output="human", overlap_check="all"))
        print(f"\n$ qcow2ovl map {path}")
        _map(argparse.Namespace(image=path, output="human", overlap_check="all"))
        with open_image(path) as image:
            cs = image.info.cluster_size
            extents = image.metadata_extents()
            end = max(off + length for off, length, _ in extents)
            print("\npre-write checks (host offset, size -> metadata hit):")
            for off, size in [(0, 512), (extents[-1][0] + 100, 4096), (end, cs), (end - 1, 2)]:
                hit = image.check_overlap(off, size)
                print(f"  {off:#10x} {size:>6} -> {_types_text(hit) or 'nothing (safe)'}")
        print()


def _demo(_args: argparse.Namespace) -> int:
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


def _size(n: int) -> str:
    """A byte count the way qemu-img prints it: ``1 GiB (1073741824 bytes)``."""
    value, unit = float(n), "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    text = f"{value:.3g}" if unit != "B" else str(n)
    return f"{text} {unit} ({n} bytes)" if unit != "B" else f"{n} B"


def _types_text(types: int) -> str:
    return "|".join(t.key for t in MetadataType(types).bits())


def info_dict(image: Image) -> dict[str, Any]:
    """The JSON form of ``qcow2ovl info`` (stable; see docs/cli.md)."""
    i = image.info
    return {
        "filename": image.path,
        "format": "qcow2",
        "version": i.version,
        "virtual-size": i.virtual_size,
        "file-size": i.file_size,
        "cluster-size": i.cluster_size,
        "refcount-bits": i.refcount_bits,
        "compression-type": i.compression_type,
        "extended-l2": i.extended_l2,
        "encrypted": i.encrypted,
        "crypt-method": i.crypt_method,
        "lazy-refcounts": i.lazy_refcounts,
        "dirty": i.dirty,
        "corrupt": i.corrupt,
        "backing-filename": i.backing_file,
        "backing-filename-format": i.backing_format,
        "data-file": i.data_file,
        "features": list(i.features),
        "snapshots": [
            {
                "id": s.id,
                "name": s.name,
                "vm-state-size": s.vm_state_size,
                "date-sec": s.date_sec,
                "date-nsec": s.date_nsec,
                "vm-clock-nsec": s.vm_clock_nsec,
                "disk-size": s.disk_size,
                "l1-table-offset": s.l1_table_offset,
                "l1-size": s.l1_size,
            }
            for s in image.snapshots
        ],
        "bitmaps": [
            {
                "name": b.name,
                "granularity": b.granularity,
                "flags": [f for f, on in (("in-use", b.in_use), ("auto", b.auto)) if on],
                "table-offset": b.table_offset,
                "table-size": b.table_size,
            }
            for b in image.bitmaps
        ],
        "overlap-check": str(image.overlap_check),
        "metadata-map-bytes": image.map_memory_usage(),
        "problems": [
            {"kind": p.kind, "offset": p.offset, "size": p.size, "message": p.message}
            for p in image.problems
        ],
    }


def _info(args: argparse.Namespace) -> int:
    with open_image(args.image, overlap_check=args.overlap_check) as image:
        d = info_dict(image)
    if args.output == "json":
        print(json.dumps(d, indent=4))
        return 0
    lines = [
        f"image: {d['filename']}",
        "file format: qcow2",
        f"virtual size: {_size(d['virtual-size'])}",
        f"file size: {_size(d['file-size'])}",
        f"cluster_size: {d['cluster-size']}",
    ]
    if d["backing-filename"]:
        lines.append(f"backing file: {d['backing-filename']}")
        if d["backing-filename-format"]:
            lines.append(f"backing file format: {d['backing-filename-format']}")
    if d["snapshots"]:
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<4} {'TAG':<16} {'VM SIZE':>10} {'DATE':<19} {'L1 TABLE':>12}")
        for s in image.snapshots:
            date = s.date.strftime("%Y-%m-%d %H:%M:%S")
            lines.append(
                f"{s.id:<4} {s.name:<16} {s.vm_state_size:>10} {date:<19} {s.l1_table_offset:>#12x}"
            )
    lines.append("Format specific information:")
    lines.append(f"    compat: {'1.1' if d['version'] == 3 else '0.10'}")
    lines.append(f"    compression type: {d['compression-type']}")
    lines.append(f"    lazy refcounts: {str(d['lazy-refcounts']).lower()}")
    lines.append(f"    refcount bits: {d['refcount-bits']}")
    lines.append(f"    corrupt: {str(d['corrupt']).lower()}")
    lines.append(f"    extended l2: {str(d['extended-l2']).lower()}")
    if d["encrypted"]:
        lines.append(f"    encrypt method: {'luks' if d['crypt-method'] == 2 else 'aes'}")
    if d["data-file"]:
        lines.append(f"    data file: {d['data-file']}")
    if d["features"]:
        lines.append(f"    features: {', '.join(d['features'])}")
    for b in d["bitmaps"]:
        lines.append(
            f"    bitmap: {b['name']} (granularity {b['granularity']}, "
            f"flags [{', '.join(b['flags'])}])"
        )
    lines.append(f"overlap checks: {d['overlap-check']}")
    lines.append(f"metadata map: {d['metadata-map-bytes']} bytes")
    for p in d["problems"]:
        lines.append(f"problem: {p['message']}")
    print("\n".join(lines))
    return 0


def _map(args: argparse.Namespace) -> int:
    if args.guest:
        return _cli_guest.guest_map(args)
    with open_image(args.image, overlap_check=args.overlap_check) as image:
        extents = image.metadata_extents()
    if args.output == "json":
        # Streamed one record at a time: an image can have millions of metadata extents.
        out = sys.stdout
        out.write("[")
        for i, (off, length, types) in enumerate(extents):
            record = {
                "offset": off,
                "length": length,
                "types": int(types),
                "names": [t.key for t in MetadataType(types).bits()],
            }
            out.write((",\n" if i else "\n") + json.dumps(record))
        out.write("\n]\n" if len(extents) else "]\n")
        return 0
    print(f"{'Offset':<16}{'Length':<16}Types")
    for off, length, types in extents:
        print(f"{off:<#16x}{length:<#16x}{_types_text(types)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qcow2ovl`` command."""
    parser = argparse.ArgumentParser(
        prog="qcow2ovl", description="qcow2 metadata maps and overlap checks"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="map a synthetic image and check writes against it")
    demo.set_defaults(func=_demo)
    for name, func, text in (
        ("info", _info, "show header facts, snapshots and bitmaps"),
        ("map", _map, "list every metadata extent of the host file"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("image", help="path of the qcow2 image (opened read-only)")
        p.add_argument("--output", choices=("human", "json"), default="human")
        p.add_argument(
            "--overlap-check",
            default="all",
            help="which metadata types to map (QEMU's overlap-check syntax; default: all)",
        )
        if name == "map":
            p.add_argument(
                "--guest",
                action="store_true",
                help="map the guest disk instead, as `qemu-img map` does",
            )
        p.set_defaults(func=func)
    _cli_create.add_parser(sub)
    _cli_guest.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (``| head``): not an error worth a message.
        sys.stderr.close()
        return 0
    except (Qcow2Error, OSError, ValueError) as exc:
        print(f"qcow2ovl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
