"""The generator's working model: allocation, tables, refcounts, serialization."""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass

from qcow2ovl.testing._common import (
    _NAME_CHARS,
    _NO_TYPE,
    ALL_ALLOC,
    AUTOCLEAR_BITMAPS,
    BITMAP_FLAG_AUTO,
    COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    KNOWN_EXTENSIONS,
    KNOWN_FEATURE_NAMES,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    QCOW2_MAGIC,
    _align,
    _ceil_div,
    _Chooser,
)
from qcow2ovl.testing.layout import (
    BitmapLayout,
    Extension,
    GeneratedImage,
    ImageLayout,
    SnapshotLayout,
    Structure,
    Table,
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


def _free_starts(used: list[bool], n: int) -> list[int]:
    """Every index where `n` free clusters start."""
    out: list[int] = []
    run = 0
    for i, u in enumerate(used):
        run = 0 if u else run + 1
        if run >= n:
            out.append(i - n + 1)
    return out


class _Builder:
    """Builds one valid image from a chooser's decisions."""

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

    # -- geometry and header pieces -----------------------------------------------------------

    def geometry(self) -> None:
        c, o = self.c, self.o
        self.version = c.choice(o.versions)
        self.cluster_bits = c.integer(o.min_cluster_bits, o.max_cluster_bits)
        cs = self.cs = 1 << self.cluster_bits
        if self.version == 2:
            self.refcount_order = 4
        else:
            orders = o.refcount_orders or (4, 0, 1, 2, 3, 5, 6)
            self.refcount_order = c.choice(orders)
        self.max_ref = (1 << (1 << self.refcount_order)) - 1
        self.extended_l2 = (
            self.version == 3 and o.extended_l2 and self.cluster_bits >= 14 and c.rarely()
        )
        self.zstd = self.version == 3 and c.rarely()
        self.header_length = 72
        if self.version == 3:
            self.header_length = 112 if self.zstd or c.boolean() else 104
            if c.rarely():
                self.header_length += 8 * c.integer(1, 3)
        self.lazy_refcounts = self.version == 3 and c.rarely()
        self.budget = max(10, min(400, o.max_bytes // cs))
        self.l2_entries = cs // (16 if self.extended_l2 else 8)
        self.span = self.l2_entries * cs  # guest bytes per L2 table
        if c.rarely() and c.rarely():
            self.size = 0
            n1 = 0
        else:
            n1 = c.integer(1, 4)
            self.size = (n1 - 1) * self.span + 512 * c.integer(1, self.span // 512)
        self.l1_size = n1 + (c.integer(1, 2) if c.rarely() else 0)
        self.guest_clusters = _ceil_div(self.size, cs)
        self.fill_salt = c.integer(0, 255)
        self.fill_full = c.boolean()

    def header_pieces(self) -> None:
        """Backing file, backing format, feature names, unknown extension: whatever fits."""
        c, o, cs = self.c, self.o, self.cs
        self.with_bitmaps = self.version == 3 and o.bitmaps > 0 and self.size > 0 and c.boolean()
        room = cs - self.header_length - 8 - (32 if self.with_bitmaps else 0)
        self.ext_pieces: list[tuple[int, bytes]] = []
        self.backing_file: str | None = None
        self.backing_format: str | None = None
        self.backing_gap = 0
        if o.backing and c.boolean():
            name = self.name(40, "base-") + c.choice([".img", ".qcow2", ""])
            gap = c.integer(0, 16) if c.rarely() else 0
            if len(name) + gap <= min(room, 1023):
                self.backing_file, self.backing_gap = name, gap
                room -= len(name) + gap
                if c.boolean():
                    fmt = c.choice(["qcow2", "raw"])
                    if room >= 8 + 8:
                        self.backing_format = fmt
                        self.ext_pieces.append((EXT_BACKING_FORMAT, fmt.encode()))
                        room -= 16
        self.feature_names: tuple[tuple[int, int, str], ...] = ()
        if o.extensions and c.boolean():
            names = [f for f in KNOWN_FEATURE_NAMES if not c.rarely()]
            if c.rarely():
                bit = c.integer(5, 63)
                names.append((c.integer(0, 2), bit, self.name(46, "future feature ")[:46]))
            while names and 8 + 48 * len(names) > room:
                names.pop()
            if names:
                self.feature_names = tuple(names)
                raw = b"".join(
                    struct.pack(">BB46s", t, bit, n.encode()) for t, bit, n in self.feature_names
                )
                self.ext_pieces.append((EXT_FEATURE_TABLE, raw))
                room -= 8 + len(raw)
        if o.extensions and c.rarely():
            magic = c.integer(1, 0xFFFFFFFF)
            if magic not in KNOWN_EXTENSIONS:
                data = random.Random(magic).randbytes(c.integer(0, 40))
                if 8 + _align(len(data), 8) <= room:
                    self.ext_pieces.append((magic, data))
                    room -= 8 + _align(len(data), 8)
        # shuffle the extensions (Fisher-Yates); the bitmaps extension goes in at a random place
        for i in range(len(self.ext_pieces) - 1, 0, -1):
            j = self.c.integer(0, i)
            self.ext_pieces[i], self.ext_pieces[j] = self.ext_pieces[j], self.ext_pieces[i]
        self.bitmaps_ext_index = c.integer(0, len(self.ext_pieces)) if self.with_bitmaps else -1

    # -- guest clusters -------------------------------------------------------------------------

    def new_data(self, guest_cluster: int, layer: int, name: str) -> _Alloc:
        a = self.alloc("guest data", name, 1, _NO_TYPE)
        fill = (guest_cluster * 7 + layer * 61 + self.fill_salt) % 255 + 1
        a.payload = ("guest", guest_cluster * self.cs, layer, fill)
        return a

    def new_blob(self, guest_cluster: int, layer: int) -> _Blob | None:
        cs = self.cs
        fill = (guest_cluster * 7 + layer * 61 + self.fill_salt) % 255 + 1
        plain = struct.pack(">QQ", guest_cluster * cs, layer) + bytes([fill]) * (cs - 16)
        z = zlib.compressobj(9, zlib.DEFLATED, -12)
        data = z.compress(plain) + z.flush()
        gap = self.c.choice([0, 1, 7, 100, 511])
        area = self.area
        if area is not None:
            at = self.area_pos + gap
            rng = _compressed_clusters(at, len(data), cs)
            grow = max(0, rng.stop - area.clusters)
            ok = all(i >= area.clusters or area.refs[i] < self.max_ref for i in rng)
            if ok and self.room(grow):
                area.refs.extend([0] * grow)
                self.used += grow
                self.area_pos = at + len(data)
                for i in rng:
                    area.refs[i] += 1
                return _Blob(area, at, data)
        rng = _compressed_clusters(gap, len(data), cs)
        if not self.room(rng.stop):
            return None
        area = self.area = self.alloc("compressed data", "compressed clusters", rng.stop, _NO_TYPE)
        self.area_pos = gap + len(data)
        for i in rng:
            area.refs[i] += 1
        return _Blob(area, gap, data)

    def new_entry(self, guest_cluster: int, layer: int, where: str) -> _Entry | None:
        """A fresh L2 entry for `guest_cluster`, its clusters referenced once (by its table)."""
        c = self.c
        kinds = ["data"]
        if self.version == 3:
            kinds += ["zero", "zero_alloc"]
        if self.o.compressed and not self.zstd:
            kinds.append("compressed")
        kind = c.choice(kinds)
        if kind in ("data", "zero_alloc") and not self.room():
            kind = "zero" if self.version == 3 else "none"
        if kind == "compressed":
            blob = self.new_blob(guest_cluster, layer)
            if blob is not None:
                return _Entry("compressed", blob=blob)
            kind = "zero" if self.version == 3 else "none"
        if kind == "none":
            return None
        if kind == "zero":
            bitmap = (c.integer(1, ALL_ALLOC) << 32) if self.extended_l2 else 0
            return _Entry("zero", bitmap=bitmap)
        data = self.new_data(guest_cluster, layer, f"guest cluster {guest_cluster} ({where})")
        data.refs[0] = 1
        if kind == "zero_alloc":
            data.payload = None  # preallocated: contents do not matter
            bitmap = (c.integer(1, ALL_ALLOC) << 32) if self.extended_l2 else 0
            return _Entry("zero_alloc", data=data, bitmap=bitmap)
        bitmap = 0
        if self.extended_l2:
            alloc = ALL_ALLOC if not c.boolean() else c.integer(1, ALL_ALLOC)
            zero = (c.integer(0, ALL_ALLOC) & ~alloc) if c.rarely() else 0
            bitmap = alloc | (zero << 32)
        return _Entry("data", data=data, bitmap=bitmap)

    def guest_indices(self, l1_index: int, guest_limit: int) -> list[int]:
        """Distinct L2 indices (at most a handful) within the guest size."""
        first = l1_index * self.l2_entries
        avail = min(self.l2_entries, guest_limit - first)
        if avail <= 0:
            return []
        n = self.c.integer(0, min(6, avail))
        out: list[int] = []
        for _ in range(n):
            j = self.c.integer(0, avail - 1)
            if j not in out:
                out.append(j)
        return out

    def fresh_l2(self, l1_index: int, guest_limit: int, layer: int, where: str) -> _L2 | None:
        if not self.room():
            return None
        t = _L2(
            self.alloc("L2 table", f"L2 table ({where}, L1 index {l1_index})", 1, _NO_TYPE),
            l1_index,
        )
        t.alloc.refs[0] = 1
        for j in self.guest_indices(l1_index, guest_limit):
            e = self.new_entry(l1_index * self.l2_entries + j, layer, where)
            if e is not None:
                t.entries[j] = e
        return t

    def active(self) -> None:
        self.l1_alloc: _Alloc | None = None
        if self.l1_size:
            n = _ceil_div(self.l1_size * 8, self.cs)
            self.l1_alloc = self.alloc(
                "active L1 table", "active L1 table", n, MetadataType.ACTIVE_L1
            )
            self.l1_alloc.refs = [1] * n
            self.l1_alloc.length = self.l1_size * 8
        self.active_tables: dict[int, _L2] = {}
        n1 = _ceil_div(self.guest_clusters, self.l2_entries)
        for i in range(n1):
            if self.c.integer(0, 3) == 0:
                continue
            t = self.fresh_l2(i, self.guest_clusters, 0, "active")
            if t is None:
                break
            t.alloc.types |= MetadataType.ACTIVE_L2
            self.active_tables[i] = t

    # -- snapshots ------------------------------------------------------------------------------

    def snapshots(self) -> None:
        c, cs = self.c, self.cs
        self.snaps: list[_Snap] = []
        if self.o.snapshots <= 0 or self.size == 0:
            return
        count = c.integer(0, self.o.snapshots)
        for k in range(count):
            disk = self.size
            if c.rarely():
                disk = 512 * c.integer(1, self.size // 512)
            needed = _ceil_div(_ceil_div(disk, cs), self.l2_entries)
            l1_size = needed + (1 if c.rarely() else 0)
            n = _ceil_div(l1_size * 8, cs)
            if not self.room(n + 1):
                break
            sid = str(k + 1) if not c.rarely() else self.name(8, "id")
            name = self.name(12, "snap") if not c.rarely() else "snäp-ü" + str(k)
            if any(s.id == sid for s in self.snaps):
                sid = f"{sid}.{k}"
            l1 = self.alloc(
                "snapshot L1 table", f"L1 table of snapshot '{sid}'", n, MetadataType.INACTIVE_L1
            )
            l1.refs = [1] * n
            l1.length = l1_size * 8
            snap = _Snap(sid, name, disk, l1_size, l1)
            self.snap_extra(snap)
            self.snaps.append(snap)
            guest_limit = _ceil_div(disk, cs)
            for i in range(needed):
                t = self.snapshot_table(snap, i, guest_limit, k + 1)
                if t is not None:
                    t.alloc.types |= MetadataType.INACTIVE_L2
                    snap.tables[i] = t

    def snap_extra(self, snap: _Snap) -> None:
        c = self.c
        if self.version == 2:
            extra_size = c.choice([0, 16, 24, 8])
        else:
            extra_size = c.choice([16, 24, 24 + c.integer(1, 24)])
        icount = (1 << 64) - 1 if not c.boolean() else c.integer(0, 1 << 40)
        extra = struct.pack(">QQQ", 0, snap.disk_size, icount)
        extra += random.Random(extra_size).randbytes(max(0, extra_size - 24))
        snap.extra = extra[:extra_size]
        snap.fields = (c.integer(0, 0xFFFFFFFF), c.integer(0, 999_999_999), c.integer(0, 1 << 50))

    def existing_tables(self, l1_index: int) -> list[_L2]:
        out = []
        if l1_index in self.active_tables:
            out.append(self.active_tables[l1_index])
        for s in self.snaps:
            t = s.tables.get(l1_index)
            if t is not None and t not in out:
                out.append(t)
        return out

    def snapshot_table(self, snap: _Snap, i: int, guest_limit: int, layer: int) -> _L2 | None:
        c = self.c
        how = c.choice(["share", "copy", "fresh", "empty"])
        sources = [
            t
            for t in self.existing_tables(i)
            if all(i * self.l2_entries + j < guest_limit for j in t.entries)
        ]
        where = f"snapshot '{snap.id}'"
        if how == "empty":
            return None
        if how in ("share", "copy") and sources:
            src = c.choice(sources)
            if how == "share":
                shared = self.table_incs(src)
                if self.fits(shared):
                    self.apply(shared)
                    return src
            if self.room():
                t = _L2(self.alloc("L2 table", f"L2 table ({where}, L1 index {i})", 1, _NO_TYPE), i)
                t.alloc.refs[0] = 1
                for j, e in src.entries.items():
                    keep = c.integer(0, 3)
                    if keep == 3:  # dropped in the snapshot
                        continue
                    if keep == 2:  # diverged: the snapshot has its own cluster there
                        own = self.new_entry(i * self.l2_entries + j, layer, where)
                        if own is not None:
                            t.entries[j] = own
                        continue
                    incs: dict[tuple[int, int], tuple[_Alloc, int]] = {}
                    self.entry_incs(e, incs)
                    if self.fits(incs):
                        self.apply(incs)
                        t.entries[j] = _Entry(e.kind, e.data, e.blob, e.bitmap)
                return t
        return self.fresh_l2(i, guest_limit, layer, where)

    # -- bitmaps --------------------------------------------------------------------------------

    def bitmaps(self) -> None:
        c, cs = self.c, self.cs
        self.bms: list[_Bitmap] = []
        if not self.with_bitmaps:
            return
        count = c.integer(1, self.o.bitmaps)
        names: set[str] = set()
        for k in range(count):
            g_min = 9
            while g_min < 31 and self.bitmap_table_size(g_min) > 4:
                g_min += 1
            g = c.integer(g_min, min(31, g_min + 6))
            table_size = self.bitmap_table_size(g)
            n = _ceil_div(table_size * 8, cs)
            if not self.room(n + 1):
                break
            name = self.name(16, f"bitmap{k}")
            if name in names:
                continue
            names.add(name)
            bm = _Bitmap(name, g, BITMAP_FLAG_AUTO if c.boolean() else 0, table_size)
            bm.table = self.alloc(
                "bitmap table", f"table of bitmap '{name}'", n, MetadataType.BITMAP_TABLE
            )
            bm.table.refs = [1] * n
            bm.table.length = table_size * 8
            nbits = _ceil_div(self.size, 1 << g)
            for j in range(table_size):
                full = (j + 1) * cs * 8 <= nbits
                how = c.choice(["zeros", "data", "ones"] if full else ["zeros", "data"])
                if how == "data" and self.room():
                    d = self.alloc("bitmap data", f"data of bitmap '{name}' ({j})", 1, _NO_TYPE)
                    d.refs[0] = 1
                    valid = min(cs * 8, nbits - j * cs * 8)
                    d.payload = ("bitmap", valid, c.integer(0, 1 << 16))
                    bm.entries.append(d)
                else:
                    bm.entries.append(1 if how == "ones" else 0)
            self.bms.append(bm)
        if not self.bms:
            self.with_bitmaps = False
            return
        self.dir_bytes = sum(_align(24 + len(b.name.encode()), 8) for b in self.bms)
        n = _ceil_div(self.dir_bytes, cs)
        self.bm_dir = self.alloc(
            "bitmap directory", "bitmap directory", n, MetadataType.BITMAP_DIRECTORY
        )
        self.bm_dir.refs = [1] * n
        self.bm_dir.length = self.dir_bytes

    def bitmap_table_size(self, granularity_bits: int) -> int:
        nbits = _ceil_div(self.size, 1 << granularity_bits)
        return _ceil_div(_ceil_div(nbits, 8), self.cs)

    def snapshot_table_alloc(self) -> None:
        self.snap_entries: list[tuple[int, int]] = []  # (offset, size) of each table entry
        self.snap_table: _Alloc | None = None
        if not self.snaps:
            return
        total = 0
        for s in self.snaps:
            size = 40 + len(s.extra) + len(s.id.encode()) + len(s.name.encode())
            total = _align(total, 8) + size
        n = _ceil_div(total, self.cs)
        self.snap_table = self.alloc(
            "snapshot table", "snapshot table", n, MetadataType.SNAPSHOT_TABLE
        )
        self.snap_table.refs = [1] * n
        self.snap_table.length = total

    # -- placement ------------------------------------------------------------------------------

    def place(self) -> None:
        c, cs = self.c, self.cs
        epb = cs * 8 // (1 << self.refcount_order)
        gaps = c.integer(0, 4)
        if c.rarely():  # enough free clusters to need several refcount blocks, some empty
            gaps += c.integer(0, max(0, min(3 * epb, self.budget - self.used - 2)))
        extra_rt = 1 if c.rarely() else 0
        base = 1 + sum(a.clusters for a in self.allocs)
        rb, rt = 1, 1
        while True:
            total = base + rb + rt + gaps
            nrb = _ceil_div(total, epb)
            nrt = _ceil_div(nrb * 8, cs) + extra_rt
            if nrb <= rb and nrt <= rt:
                break
            rb, rt = max(rb, nrb), max(rt, nrt)
        self.reftable = _Alloc("refcount table", "refcount table", rt, MetadataType.REFCOUNT_TABLE)
        self.reftable.refs = [1] * rt
        self.refblocks = [
            _Alloc("refcount block", f"refcount block {i}", 1, MetadataType.REFCOUNT_BLOCK)
            for i in range(rb)
        ]
        for b in self.refblocks:
            b.refs[0] = 1
        everything = [*self.allocs, self.reftable, *self.refblocks]
        self.host_clusters = total
        used = [False] * total
        used[0] = True
        # sometimes keep one whole refcount block's range free (a hole in the refcount table)
        hole = range(0)
        if gaps >= epb and c.boolean():
            block = c.integer(1, max(1, total // epb - 1))
            if (block + 1) * epb <= total:
                hole = range(block * epb, (block + 1) * epb)
                for i in hole:
                    used[i] = True
        order = sorted(everything, key=lambda a: -a.clusters)
        for a in order:
            n = a.clusters
            starts = _free_starts(used, n)
            if starts:
                a.start = starts[c.integer(0, len(starts) - 1)]
            else:  # fragmented: append at the end
                a.start = len(used)
                used.extend([False] * n)
            for i in range(a.start, a.start + n):
                used[i] = True
        # the file grew past what the refcount blocks cover: add blocks at the end
        while len(used) > len(self.refblocks) * epb:
            b = _Alloc(
                "refcount block",
                f"refcount block {len(self.refblocks)}",
                1,
                MetadataType.REFCOUNT_BLOCK,
            )
            b.refs[0] = 1
            b.start = len(used)
            used.append(True)
            self.refblocks.append(b)
        if len(self.refblocks) * 8 > rt * cs:
            # not at the sizes generated: one refcount table cluster covers 64+ blocks
            raise AssertionError("refcount table too small")
        for i in hole:
            used[i] = False
        self.host_clusters = len(used)
        # refcount blocks whose range holds nothing are left out (a hole in the refcount table),
        # unless the image keeps them all
        keep_all = c.boolean()
        needed = {0}
        for a in [*self.allocs, self.reftable]:
            needed.update((a.start + i) // epb for i in range(a.clusters))
        if keep_all:
            needed.update(range(len(self.refblocks)))
        while True:
            more = {self.refblocks[i].start // epb for i in needed} - needed
            if not more:
                break
            needed |= more
        self.refblock_at: dict[int, _Alloc] = {i: self.refblocks[i] for i in sorted(needed)}

    # -- serialization --------------------------------------------------------------------------

    def off(self, a: _Alloc) -> int:
        return a.start * self.cs

    def l2_entry(self, e: _Entry) -> tuple[int, int]:
        if e.kind == "compressed" and e.blob is not None:
            x = 62 - (self.cluster_bits - 8)
            host = self.off(e.blob.area) + e.blob.offset
            return OFLAG_COMPRESSED | (e.blob.sectors << x) | host, 0
        if e.kind == "zero":
            return (0 if self.extended_l2 else OFLAG_ZERO), e.bitmap
        assert e.data is not None
        word = self.off(e.data)
        if e.data.refs[0] == 1:
            word |= OFLAG_COPIED
        if e.kind == "zero_alloc" and not self.extended_l2:
            word |= OFLAG_ZERO
        return word, e.bitmap

    def write(self) -> tuple[bytes, list[Extension], dict[int, int]]:
        cs = self.cs
        img = bytearray(self.host_clusters * cs)
        header, exts = self.header_bytes()
        img[: len(header)] = header

        def put_l1(a: _Alloc, tables: dict[int, _L2]) -> None:
            base = self.off(a)
            for i, t in tables.items():
                word = self.off(t.alloc) | (OFLAG_COPIED if t.alloc.refs[0] == 1 else 0)
                struct.pack_into(">Q", img, base + 8 * i, word)

        seen: set[int] = set()

        def put_l2(t: _L2) -> None:
            if id(t) in seen:
                return
            seen.add(id(t))
            base = self.off(t.alloc)
            for j, e in t.entries.items():
                w0, w1 = self.l2_entry(e)
                if self.extended_l2:
                    struct.pack_into(">QQ", img, base + 16 * j, w0, w1)
                else:
                    struct.pack_into(">Q", img, base + 8 * j, w0)

        if self.l1_alloc is not None:
            put_l1(self.l1_alloc, self.active_tables)
        for t in self.active_tables.values():
            put_l2(t)
        for s in self.snaps:
            put_l1(s.l1, s.tables)
            for t in s.tables.values():
                put_l2(t)
        for a in self.allocs:
            if a.kind == "guest data" and isinstance(a.payload, tuple):
                _, guest, layer, fill = a.payload
                chunk = struct.pack(">QQ", guest, layer) + bytes([fill]) * (
                    cs - 16 if self.fill_full else 496
                )
                img[self.off(a) : self.off(a) + len(chunk)] = chunk
            elif a.kind == "bitmap data" and isinstance(a.payload, tuple):
                _, valid, seed = a.payload
                raw = bytearray(_ceil_div(valid, 8))
                rng = random.Random(seed)
                for _ in range(min(len(raw), 16)):
                    raw[rng.randrange(len(raw))] = rng.randrange(256)
                if valid % 8:
                    raw[-1] &= (1 << (valid % 8)) - 1
                img[self.off(a) : self.off(a) + len(raw)] = raw
        for t in [
            *self.active_tables.values(),
            *(t for s in self.snaps for t in s.tables.values()),
        ]:
            for e in t.entries.values():
                if e.blob is not None:
                    at = self.off(e.blob.area) + e.blob.offset
                    img[at : at + len(e.blob.data)] = e.blob.data
        # snapshot table
        if self.snap_table is not None:
            pos = self.off(self.snap_table)
            for s in self.snaps:
                pos = _align(pos, 8)
                sid, name = s.id.encode(), s.name.encode()
                date_sec, date_nsec, vm_clock = s.fields
                fixed = struct.pack(
                    ">QIHHIIQII",
                    self.off(s.l1),
                    s.l1_size,
                    len(sid),
                    len(name),
                    date_sec,
                    date_nsec,
                    vm_clock,
                    0,
                    len(s.extra),
                )
                entry = fixed + s.extra + sid + name
                img[pos : pos + len(entry)] = entry
                s_pos = pos
                pos += len(entry)
                self.snap_entries.append((s_pos, len(entry)))
        # bitmaps
        if self.with_bitmaps:
            pos = self.off(self.bm_dir)
            for b in self.bms:
                assert b.table is not None
                name = b.name.encode()
                entry = (
                    struct.pack(
                        ">QIIBBHI",
                        self.off(b.table),
                        b.table_size,
                        b.flags,
                        1,
                        b.granularity_bits,
                        len(name),
                        0,
                    )
                    + name
                )
                img[pos : pos + len(entry)] = entry
                pos += _align(len(entry), 8)
                tpos = self.off(b.table)
                for j, bitmap_entry in enumerate(b.entries):
                    word = (
                        self.off(bitmap_entry) if isinstance(bitmap_entry, _Alloc) else bitmap_entry
                    )
                    struct.pack_into(">Q", img, tpos + 8 * j, word)
        # refcounts
        refcounts: dict[int, int] = {0: 1}
        for a in [*self.allocs, self.reftable, *self.refblock_at.values()]:
            for i, r in enumerate(a.refs):
                if r:
                    if r > self.max_ref:
                        raise AssertionError(f"{a.name}: refcount {r} > {self.max_ref}")
                    refcounts[a.start + i] = r
        bits = 1 << self.refcount_order
        epb = cs * 8 // bits
        for i, block in self.refblock_at.items():
            struct.pack_into(">Q", img, self.off(self.reftable) + 8 * i, self.off(block))
            base = self.off(block)
            for cl in range(i * epb, (i + 1) * epb):
                r = refcounts.get(cl, 0)
                if not r:
                    continue
                k = cl - i * epb
                if bits >= 8:
                    w = bits // 8
                    img[base + k * w : base + (k + 1) * w] = r.to_bytes(w, "big")
                else:
                    img[base + k * bits // 8] |= r << (k * bits % 8)
        return bytes(img), exts, refcounts

    def header_bytes(self) -> tuple[bytes, list[Extension]]:
        cs = self.cs
        h = bytearray(self.header_length)
        incompat = (INCOMPAT_COMPRESSION if self.zstd else 0) | (
            INCOMPAT_EXTL2 if self.extended_l2 else 0
        )
        compat = COMPAT_LAZY_REFCOUNTS if self.lazy_refcounts else 0
        autoclear = AUTOCLEAR_BITMAPS if self.with_bitmaps else 0
        self.features = (incompat, compat, autoclear)
        pieces = list(self.ext_pieces)
        if self.with_bitmaps:
            raw = struct.pack(">IIQQ", len(self.bms), 0, self.dir_bytes, self.off(self.bm_dir))
            pieces.insert(self.bitmaps_ext_index, (EXT_BITMAPS, raw))
        exts: list[Extension] = []
        for magic, data in pieces:
            exts.append(Extension(magic, len(h), len(data)))
            h += (
                struct.pack(">II", magic, len(data))
                + data
                + bytes(_align(len(data), 8) - len(data))
            )
        h += bytes(8)  # end of extensions
        self.backing_offset = 0
        if self.backing_file is not None:
            h += bytes(self.backing_gap)
            self.backing_offset = len(h)
            h += self.backing_file.encode()
        if len(h) > cs:
            raise AssertionError("header does not fit in cluster 0")
        struct.pack_into(
            ">IIQIIQIIQQIIQ",
            h,
            0,
            QCOW2_MAGIC,
            self.version,
            self.backing_offset,
            len(self.backing_file.encode()) if self.backing_file is not None else 0,
            self.cluster_bits,
            self.size,
            0,
            self.l1_size,
            self.off(self.l1_alloc) if self.l1_alloc is not None else 0,
            self.off(self.reftable),
            self.reftable.clusters,
            len(self.snaps),
            self.off(self.snap_table) if self.snap_table is not None else 0,
        )
        if self.version == 3:
            struct.pack_into(
                ">QQQII",
                h,
                72,
                incompat,
                compat,
                autoclear,
                self.refcount_order,
                self.header_length,
            )
            if self.header_length > 104:
                h[104] = 1 if self.zstd else 0
        return bytes(h), exts

    # -- the whole thing ------------------------------------------------------------------------

    def build(self) -> GeneratedImage:
        self.geometry()
        self.header_pieces()
        self.active()
        self.snapshots()
        self.bitmaps()
        self.snapshot_table_alloc()
        self.place()
        data, exts, refcounts = self.write()
        data = self.trim(data, refcounts)
        return GeneratedImage(data, self.layout(exts, refcounts, len(data)))

    def trim(self, data: bytes, refcounts: dict[int, int]) -> bytes:
        """Cut the file after its last used cluster's last non-zero byte (sector-rounded), or
        keep whole clusters."""
        cs = self.cs
        last = max(refcounts)
        if self.cs > 65536 or self.c.boolean():
            end = len(data.rstrip(b"\0"))
            end = max(_align(end, 512), last * cs + 512)
            return data[:end]
        return data[: (last + 1) * cs]

    def layout(self, exts: list[Extension], refcounts: dict[int, int], size: int) -> ImageLayout:
        cs = self.cs
        structs = [Structure("header", 0, cs, 1, MetadataType.MAIN_HEADER, "header")]
        for a in [*self.allocs, self.reftable, *self.refblock_at.values()]:
            length = a.clusters * cs if a.length is None else a.length
            structs.append(Structure(a.kind, self.off(a), length, a.clusters, a.types, a.name))
        structs.sort(key=lambda s: s.offset)
        esize = 16 if self.extended_l2 else 8
        tables = [
            Table(
                "refcount table",
                self.off(self.reftable),
                self.reftable.clusters * cs // 8,
                8,
                "refcount table",
            )
        ]
        if self.l1_alloc is not None:
            tables.append(
                Table("active L1", self.off(self.l1_alloc), self.l1_size, 8, "active L1 table")
            )
        l2s = {id(t): t for t in self.active_tables.values()}
        for s in self.snaps:
            tables.append(Table("snapshot L1", self.off(s.l1), s.l1_size, 8, s.l1.name))
            l2s.update({id(t): t for t in s.tables.values()})
        for t in l2s.values():
            tables.append(Table("L2", self.off(t.alloc), cs // esize, esize, t.alloc.name))
        for b in self.bms:
            assert b.table is not None
            tables.append(Table("bitmap table", self.off(b.table), b.table_size, 8, b.table.name))
        snaps = []
        for s, (entry_offset, entry_size) in zip(self.snaps, self.snap_entries):
            snaps.append(
                SnapshotLayout(
                    s.id,
                    s.name,
                    entry_offset,
                    entry_size,
                    len(s.extra),
                    self.off(s.l1),
                    s.l1_size,
                    s.disk_size if len(s.extra) >= 16 else None,
                )
            )
        bms = []
        pos = self.off(self.bm_dir) if self.with_bitmaps else 0
        for b in self.bms:
            assert b.table is not None
            bms.append(
                BitmapLayout(
                    b.name, pos, self.off(b.table), b.table_size, b.granularity_bits, b.flags
                )
            )
            pos += _align(24 + len(b.name.encode()), 8)
        incompat, compat, autoclear = self.features
        return ImageLayout(
            version=self.version,
            cluster_bits=self.cluster_bits,
            refcount_order=self.refcount_order,
            virtual_size=self.size,
            extended_l2=self.extended_l2,
            compression_type=1 if self.zstd else 0,
            header_length=self.header_length,
            incompatible_features=incompat,
            compatible_features=compat,
            autoclear_features=autoclear,
            l1_table_offset=self.off(self.l1_alloc) if self.l1_alloc is not None else 0,
            l1_size=self.l1_size,
            refcount_table_offset=self.off(self.reftable),
            refcount_table_clusters=self.reftable.clusters,
            snapshots_offset=self.off(self.snap_table) if self.snap_table is not None else 0,
            backing_file=self.backing_file,
            backing_file_offset=self.backing_offset,
            backing_format=self.backing_format,
            extensions=tuple(exts),
            feature_names=self.feature_names,
            snapshots=tuple(snaps),
            bitmaps=tuple(bms),
            bitmap_directory=(self.off(self.bm_dir), self.dir_bytes) if self.with_bitmaps else None,
            structures=tuple(structs),
            tables=tuple(tables),
            refcounts=dict(sorted(refcounts.items())),
            file_size=size,
        )
