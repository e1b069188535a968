"""Planning an image: the geometry, the header pieces, the guest clusters and their L2 entries,
the active tables, snapshots (sharing, copying or replacing L2 tables), bitmaps and the snapshot
table, each wanted as a run of clusters with its reference counts, not placed yet."""

from __future__ import annotations

import random
import struct
import zlib

from qcow2ovl.testing._common import (
    _NO_TYPE,
    ALL_ALLOC,
    BITMAP_FLAG_AUTO,
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    KNOWN_EXTENSIONS,
    KNOWN_FEATURE_NAMES,
    _align,
    _ceil_div,
)
from qcow2ovl.testing._model import (
    _L2,
    _Alloc,
    _Bitmap,
    _Blob,
    _compressed_clusters,
    _Entry,
    _Snap,
    _State,
)
from qcow2ovl.types import MetadataType


class _Planner(_State):
    """Decides what the image holds."""

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
        self.ext_pieces = []
        self.backing_file = None
        self.backing_format = None
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
        self.feature_names = ()
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
        self.l1_alloc = None
        if self.l1_size:
            n = _ceil_div(self.l1_size * 8, self.cs)
            self.l1_alloc = self.alloc(
                "active L1 table", "active L1 table", n, MetadataType.ACTIVE_L1
            )
            self.l1_alloc.refs = [1] * n
            self.l1_alloc.length = self.l1_size * 8
        self.active_tables = {}
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
        self.snaps = []
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
        self.bms = []
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
        self.snap_entries = []
        self.snap_table = None
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
