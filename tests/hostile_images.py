"""Generators of hostile images, one per way an image's bytes could choose what reading it costs.

Each starts from a real image made by qemu-img and pokes bytes into it, as a probe would. The
tests (`test_hostile.py`, `test_inspect.py`) open them under resource limits; the benchmark
`benches/bench_hostile.py` builds the big versions and times them against qemu-img.

The classes:

- tables in holes: a snapshot table listing many maximal L1 tables in the holes of a sparse
  file (`snapshot_table_bomb`), with tiny clusters too;
- huge counts: millions of L2 tables (`l2_table_flood`);
- bitmap-directory bombs: thousands of bitmaps whose tables lie in holes
  (`bitmap_directory_bomb`);
- extension bombs: a header cluster of 2 MiB packed with unknown header extensions
  (`extension_bomb`);
- many snapshots sharing tables: every snapshot names the same L1 table (`shared_snapshots`),
  and an L1 table whose every entry names the same L2 table (`shared_l2_tables`);
- deep and looping backing chains (`deep_chain`, `backing_loop`), and a wide disk over a small
  backing file (`wide_over_small_backing`).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import qemu_images as qi

# The address-space limit of a hostile open: an unbounded allocation fails the test, not the
# machine.
LIMIT = 2 << 30
SPARSE_END = 1 << 40


def run_limited(body: str, path: Path, *, memory: int = LIMIT, cpu: int | None = None) -> Any:
    """Runs the Python *body* in a child process under an address-space limit of *memory* bytes
    (and *cpu* seconds of CPU when given), with ``json``, ``sys`` and ``qcow2ovl`` imported and
    ``sys.argv[1]`` the image; returns the JSON value it printed."""
    limits = f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
    if cpu is not None:
        limits += f"resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))\n"
    script = f"import json, resource, sys\n{limits}import qcow2ovl\n{body}"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _cluster_end(path: Path, cluster_size: int) -> int:
    """The first cluster boundary at or past the end of *path*."""
    return -(-path.stat().st_size // cluster_size) * cluster_size


def _snapshot_entry(l1_offset: int, l1_size: int, ident: str) -> bytes:
    name = ident.encode()
    extra = struct.pack(">QQ", 0, 1 << 40)
    head = struct.pack(
        ">QIHHIIQII", l1_offset, l1_size, len(name), len(name), 0, 0, 0, 0, len(extra)
    )
    entry = head + extra + name + name
    return entry + bytes(-len(entry) % 8)


def _point_snapshot_table(path: Path, entries: list[bytes], table_at: int, end: int) -> None:
    """Writes the snapshot table *entries* at *table_at* and points the header at them; the
    file is then *end* bytes long, or ends with the table."""
    table = b"".join(entries)
    with open(path, "r+b") as f:
        f.seek(table_at)
        f.write(table)
        f.truncate(max(end, table_at + len(table)))
        f.seek(60)
        f.write(struct.pack(">IQ", len(entries), table_at))


def snapshot_table_bomb(
    path: Path,
    *,
    cluster_size: int,
    size: str,
    table_at: int,
    tables_at: int,
    count: int = 2048,
    end: int = SPARSE_END,
) -> None:
    """A qemu-img image whose snapshot table (at *table_at*) lists *count* snapshots with 32 MiB
    L1 tables one after another from *tables_at*, all in the holes of a sparse file of *end*
    bytes (1 TiB unless told)."""
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, size)
    l1_entries = (32 << 20) // 8
    entries = [
        _snapshot_entry(tables_at + i * (32 << 20), l1_entries, f"s{i}") for i in range(count)
    ]
    _point_snapshot_table(path, entries, table_at, end)


def shared_snapshots(path: Path, *, count: int = 65536, l2_tables: int = 64) -> None:
    """*count* snapshots (QEMU's maximum is 65,536) that all name the active L1 table, whose
    first *l2_tables* entries name real L2 tables: a scan or check that walks each snapshot's
    tables anew costs *count* times what the file holds."""
    cs = 65536
    qi.qemu_img("create", "-q", "-f", "qcow2", path, f"{l2_tables * 512}M")
    qi.qemu_io(path, *(f"write -P {i % 250 + 1} {i * 512}M 64k" for i in range(l2_tables)))
    header = path.read_bytes()[:48]
    l1_size, l1_at = struct.unpack(">IQ", header[36:48])
    entries = [_snapshot_entry(l1_at, l1_size, f"s{i}") for i in range(count)]
    _point_snapshot_table(path, entries, _cluster_end(path, cs), _cluster_end(path, cs))


def l2_table_flood(path: Path, *, count: int = 1 << 22) -> None:
    """An active L1 table of *count* entries (512-byte clusters), every other cluster from
    64 MiB an L2 table: *count* metadata extents that do not merge, past the end of the file."""
    cs = 512
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", path, "1G")
    l1_at = 1 << 20
    base = 64 << 20
    table = b"".join(struct.pack(">Q", base + 2 * i * cs) for i in range(count))
    with open(path, "r+b") as f:
        f.seek(36)
        f.write(struct.pack(">IQ", count, l1_at))
        f.seek(24)
        f.write(struct.pack(">Q", count * (cs // 8) * cs))
        f.seek(l1_at)
        f.write(table)


def shared_l2_tables(path: Path, *, size: str = "64G") -> None:
    """A disk of *size* (64 KiB clusters) whose every L1 entry names one L2 table, itself full
    of entries naming one data cluster: every guest cluster mapped by two clusters of the file.
    Every reader follows the mapping as it is; nothing may be sized by it at once."""
    cs = 65536
    qi.qemu_img("create", "-q", "-f", "qcow2", path, size)
    qi.qemu_io(path, "write -P 0x77 0 64k")
    data = path.read_bytes()
    l1_size, l1_at = struct.unpack(">IQ", data[36:48])
    (l2_entry,) = struct.unpack(">Q", data[l1_at : l1_at + 8])
    l2_at = l2_entry & 0x00FF_FFFF_FFFF_FE00
    (data_entry,) = struct.unpack(">Q", data[l2_at : l2_at + 8])
    with open(path, "r+b") as f:
        f.seek(l2_at)
        f.write(struct.pack(">Q", data_entry) * (cs // 8))
        f.seek(l1_at)
        f.write(struct.pack(">Q", l2_entry) * l1_size)


def bitmap_directory_bomb(path: Path, *, count: int = 4000, end: int = SPARSE_END) -> None:
    """*count* consistent bitmaps of a 64 GiB disk with 512-byte clusters, each table of
    256 KiB (32 Ki entries) lying from 1 GiB in the holes of a sparse file of *end* bytes."""
    cs = 512
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", path, "64G")
    qi.qemu_img("bitmap", "--add", "-g", "512", path, "seed")
    data = path.read_bytes()
    at = 112  # version 3 header length: the extensions follow
    while True:
        magic, length = struct.unpack(">II", data[at : at + 8])
        if magic == 0x23852875:
            break
        at += 8 + -(-length // 8) * 8
    _, _, dir_size, dir_at = struct.unpack(">IIQQ", data[at + 8 : at + 32])
    (table_size,) = struct.unpack(">I", data[dir_at + 8 : dir_at + 12])
    directory = b""
    for i in range(count):
        name = f"b{i}".encode()
        table_at = (1 << 30) + i * (table_size * 8 + cs)
        entry = struct.pack(">QIIBBHI", table_at, table_size, 2, 1, 9, len(name), 0) + name
        directory += entry + bytes(-len(entry) % 8)
    dir_at = _cluster_end(path, cs)
    with open(path, "r+b") as f:
        f.seek(dir_at)
        f.write(directory)
        f.seek(at + 8)
        f.write(struct.pack(">IIQQ", count, 0, len(directory), dir_at))
        f.truncate(end)


def extension_bomb(path: Path) -> None:
    """2 MiB clusters whose header cluster is packed with unknown header extensions of no
    data (262,000 of them), then a feature-name table as long as the cluster allows."""
    cs = 2 << 20
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", path, "1G")
    with open(path, "r+b") as f:
        f.seek(100)
        (header_length,) = struct.unpack(">I", f.read(4))
        unknown = struct.pack(">II", 0x1234_5678, 0) * ((cs - header_length) // 16)
        names = b"".join(struct.pack(">BB46s", 0, i % 64, b"x" * 46) for i in range(2000))
        table = struct.pack(">II", 0x6803_F857, len(names)) + names
        room = cs - header_length - len(table) - 8
        f.seek(header_length)
        f.write(unknown[: room // 8 * 8] + table + bytes(8))


def deep_chain(folder: Path, depth: int) -> Path:
    """A backing chain *depth* images deep, each adding one cluster; returns the top."""
    below: Path | None = None
    for i in range(depth):
        image = folder / f"layer{i}.qcow2"
        backing = ["-b", below.name, "-F", "qcow2"] if below is not None else []
        qi.qemu_img("create", "-q", "-f", "qcow2", *backing, image, "1G")
        below = image
    assert below is not None
    _write_cluster_per_layer(folder, depth)
    return below


def _write_cluster_per_layer(folder: Path, depth: int) -> None:
    for i in range(depth):
        qi.qemu_io(folder / f"layer{i}.qcow2", f"write -P {i % 250 + 1} {i * 64}k 64k")


def backing_loop(folder: Path) -> Path:
    """Two images that name each other as backing file; returns one of them."""
    a, b = folder / "a.qcow2", folder / "b.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", a, "1G")
    qi.qemu_img("create", "-q", "-f", "qcow2", "-b", a.name, "-F", "qcow2", b, "1G")
    qi.qemu_img("rebase", "-u", "-b", b.name, "-F", "qcow2", a)
    return a


def wide_over_small_backing(folder: Path) -> Path:
    """A 64 TiB overlay (with a few clusters of its own) over a 1 MiB backing file: reading the
    map of the whole disk must cost what is allocated, not what the size claims."""
    base = folder / "base.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qi.qemu_io(base, "write -P 0x11 0 1M")
    top = folder / "wide.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "64T")
    qi.qemu_io(top, "write -P 0x22 0 64k", "write -P 0x33 32T 64k", "write -P 0x44 63T 64k")
    return top
