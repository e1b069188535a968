"""The generator's builder: the steps that make one valid image from a chooser's decisions
(planning in `_plan`, placement in `_place`, bytes in `_encode`, the working model in
`_model`), the file trimmed, and the layout the image is described by."""

from __future__ import annotations

from qcow2ovl.testing._common import (
    _align,
)
from qcow2ovl.testing._encode import _Encoder
from qcow2ovl.testing._model import _Options as _Options  # re-exported for `images`
from qcow2ovl.testing._place import _Placer
from qcow2ovl.testing._plan import _Planner
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


class _Builder(_Planner, _Placer, _Encoder):
    """Builds one valid image from a chooser's decisions."""

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
