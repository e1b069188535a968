"""The generator's working model: the runs of host clusters it wants (`_Alloc`), compressed
data, L2 entries and tables, snapshots, bitmaps and the options; and the builder's state over
them (`_State`) with the bookkeeping of allocations and reference counts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from qcow2ovl.testing._common import (
    _NAME_CHARS,
    _Chooser,
)
from qcow2ovl.types import MetadataType

# ---- the generator's working model ------------------------------------------------------------


class _Alloc:
    """A run of contiguous host clusters wanted by the generator, with a reference count per
    cluster, before and after it is placed."""

    __slots__ = ("kind", "name", "types", "refs", "start", "payload", "length")

    def __init__(self, kind: str, name: str, clusters: int, types: MetadataType) -> None:
        self.kind = kind
        self.name = name
        self.types = types
        self.refs = [0] * clusters
        self.start = -1
        self.payload: object = None
        # byte length of the extent when it is not whole clusters (L1 and bitmap tables,
        # snapshot table, bitmap directory)
        self.length: int | None = None

    @property
    def clusters(self) -> int:
        return len(self.refs)


def _compressed_clusters(offset: int, length: int, cs: int) -> range:
    """Clusters (relative to the area) that QEMU counts for compressed data at `offset`: every
    cluster touched by the 512-byte sectors holding it."""
    end = (offset + length - 1) // 512 * 512 + 512
    return range(offset // cs, (end - 1) // cs + 1)


class _Blob:
    """Compressed data for one guest cluster, at byte `offset` of a compressed-data area."""

    __slots__ = ("area", "offset", "data", "sectors")

    def __init__(self, area: _Alloc, offset: int, data: bytes) -> None:
        self.area = area
        self.offset = offset
        self.data = data
        # additional 512-byte sectors beyond the one holding the first byte
        self.sectors = (offset + len(data) - 1) // 512 - offset // 512

    def cluster_range(self, cs: int) -> range:
        return _compressed_clusters(self.offset, len(self.data), cs)


class _Entry:
    """One L2 entry: ``data`` (allocated), ``zero`` (v3: reads as zeros, nothing allocated),
    ``zero_alloc`` (v3: allocated, reads as zeros) or ``compressed``."""

    __slots__ = ("kind", "data", "blob", "bitmap")

    def __init__(
        self, kind: str, data: _Alloc | None = None, blob: _Blob | None = None, bitmap: int = 0
    ) -> None:
        self.kind = kind
        self.data = data
        self.blob = blob
        self.bitmap = bitmap


class _L2:
    __slots__ = ("alloc", "entries", "l1_index")

    def __init__(self, alloc: _Alloc, l1_index: int) -> None:
        self.alloc = alloc
        self.entries: dict[int, _Entry] = {}
        self.l1_index = l1_index


class _Snap:
    __slots__ = ("id", "name", "disk_size", "l1_size", "l1", "tables", "extra", "fields")

    def __init__(self, sid: str, name: str, disk_size: int, l1_size: int, l1: _Alloc) -> None:
        self.id = sid
        self.name = name
        self.disk_size = disk_size
        self.l1_size = l1_size
        self.l1 = l1
        self.tables: dict[int, _L2] = {}
        self.extra = b""
        self.fields: tuple[int, int, int] = (0, 0, 0)


class _Bitmap:
    __slots__ = ("name", "granularity_bits", "flags", "table_size", "table", "entries")

    def __init__(self, name: str, granularity_bits: int, flags: int, table_size: int) -> None:
        self.name = name
        self.granularity_bits = granularity_bits
        self.flags = flags
        self.table_size = table_size
        self.table: _Alloc | None = None
        self.entries: list[int | _Alloc] = []


@dataclass(frozen=True)
class _Options:
    versions: tuple[int, ...]
    min_cluster_bits: int
    max_cluster_bits: int
    refcount_orders: tuple[int, ...] | None
    snapshots: int
    bitmaps: int
    compressed: bool
    extended_l2: bool
    backing: bool
    extensions: bool
    max_bytes: int


class _State:
    """The builder's state, shared by its parts (planning, placement, encoding, the layout), and
    the bookkeeping of allocations and reference counts they all use."""

    # the geometry (`_Planner.geometry`)
    version: int
    cluster_bits: int
    cs: int
    refcount_order: int
    max_ref: int
    extended_l2: bool
    zstd: bool
    header_length: int
    lazy_refcounts: bool
    budget: int
    l2_entries: int
    span: int
    size: int
    l1_size: int
    guest_clusters: int
    fill_salt: int
    fill_full: bool
    # the header pieces (`_Planner.header_pieces`)
    with_bitmaps: bool
    ext_pieces: list[tuple[int, bytes]]
    backing_file: str | None
    backing_format: str | None
    backing_gap: int
    feature_names: tuple[tuple[int, int, str], ...]
    bitmaps_ext_index: int
    # the tables (`_Planner`)
    l1_alloc: _Alloc | None
    active_tables: dict[int, _L2]
    snaps: list[_Snap]
    bms: list[_Bitmap]
    dir_bytes: int
    bm_dir: _Alloc
    snap_entries: list[tuple[int, int]]  # (offset, size) of each table entry
    snap_table: _Alloc | None
    # the placement (`_Placer.place`)
    reftable: _Alloc
    refblocks: list[_Alloc]
    host_clusters: int
    refblock_at: dict[int, _Alloc]
    # the header as written (`_Encoder.header_bytes`)
    features: tuple[int, int, int]
    backing_offset: int

    def __init__(self, c: _Chooser, opts: _Options) -> None:
        self.c = c
        self.o = opts
        self.allocs: list[_Alloc] = []
        self.used = 1  # the header cluster
        self.area: _Alloc | None = None  # where compressed clusters are being packed
        self.area_pos = 0

    # -- helpers ---------------------------------------------------------------------------

    def name(self, max_len: int, prefix: str = "") -> str:
        n = self.c.integer(0, max_len)
        seed = self.c.integer(0, 1 << 16)
        rng = random.Random(seed)
        return prefix + "".join(rng.choice(_NAME_CHARS) for _ in range(n))

    def alloc(self, kind: str, name: str, clusters: int, types: MetadataType) -> _Alloc:
        a = _Alloc(kind, name, clusters, types)
        self.allocs.append(a)
        self.used += clusters
        return a

    def room(self, clusters: int = 1) -> bool:
        # two clusters stay reserved for the refcount table and one refcount block
        return self.used + clusters + 2 <= self.budget

    def fits(self, incs: dict[tuple[int, int], tuple[_Alloc, int]]) -> bool:
        return all(a.refs[i] + n <= self.max_ref for (_, i), (a, n) in incs.items())

    @staticmethod
    def apply(incs: dict[tuple[int, int], tuple[_Alloc, int]]) -> None:
        for (_, i), (a, n) in incs.items():
            a.refs[i] += n

    def entry_incs(self, e: _Entry, incs: dict[tuple[int, int], tuple[_Alloc, int]]) -> None:
        if e.data is not None:
            key = (id(e.data), 0)
            incs[key] = (e.data, incs.get(key, (e.data, 0))[1] + 1)
        if e.blob is not None:
            for i in e.blob.cluster_range(self.cs):
                key = (id(e.blob.area), i)
                incs[key] = (e.blob.area, incs.get(key, (e.blob.area, 0))[1] + 1)

    def table_incs(self, t: _L2) -> dict[tuple[int, int], tuple[_Alloc, int]]:
        incs: dict[tuple[int, int], tuple[_Alloc, int]] = {(id(t.alloc), 0): (t.alloc, 1)}
        for e in t.entries.values():
            self.entry_incs(e, incs)
        return incs
