"""Encoding the placed image: L1 and L2 entries, guest and bitmap data, compressed clusters, the
snapshot table, the bitmap directory and tables, refcounts of every width, and the header with
its extensions."""

from __future__ import annotations

import random
import struct

from qcow2ovl.testing._common import (
    AUTOCLEAR_BITMAPS,
    COMPAT_LAZY_REFCOUNTS,
    EXT_BITMAPS,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    QCOW2_MAGIC,
    _align,
    _ceil_div,
)
from qcow2ovl.testing._model import _L2, _Alloc, _Entry, _State
from qcow2ovl.testing.layout import (
    Extension,
)


class _Encoder(_State):
    """Writes the bytes of a placed image."""

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
