"""What the generator reports: the public description of a generated or corrupted image."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from qcow2ovl.testing._common import (
    _NO_TYPE,
    _ceil_div,
)
from qcow2ovl.types import MetadataType

# ---- what the generator reports -----------------------------------------------------------------


@dataclass(frozen=True)
class Structure:
    """One thing placed in the file.

    ``kind`` is one of ``"header"``, ``"active L1 table"``, ``"L2 table"``, ``"refcount table"``,
    ``"refcount block"``, ``"snapshot table"``, ``"snapshot L1 table"``, ``"bitmap directory"``,
    ``"bitmap table"`` (metadata) or ``"guest data"``, ``"compressed data"``, ``"bitmap data"``.
    ``length`` is the byte length of the extent (see "Metadata types" in
    docs/design/architecture.md: ``l1_size * 8`` for an L1 table, the entries' span for the
    snapshot table, ...); ``clusters`` is how many clusters it occupies.
    ``types`` is every metadata type it carries (an L2 table shared by the active L1 table and
    a snapshot is ``ACTIVE_L2 | INACTIVE_L2``); 0 for data.
    """

    kind: str
    offset: int
    length: int
    clusters: int
    types: MetadataType
    name: str

    @property
    def is_metadata(self) -> bool:
        """Whether the structure is qcow2 metadata (a type is set)."""
        return bool(self.types)


@dataclass(frozen=True)
class Table:
    """A table of 8-byte (extended L2: 16-byte) entries, for tests that poke entries.

    ``kind`` is ``"active L1"``, ``"snapshot L1"``, ``"L2"``, ``"refcount table"`` or
    ``"bitmap table"``; ``entries`` counts entries (of ``entry_size`` bytes) from ``offset``.
    """

    kind: str
    offset: int
    entries: int
    entry_size: int
    name: str


@dataclass(frozen=True)
class Extension:
    """A header extension: ``offset`` of its 8-byte (magic, length) header in cluster 0."""

    magic: int
    offset: int
    length: int


@dataclass(frozen=True)
class SnapshotLayout:
    """One snapshot table entry: where it is and what it says."""

    id: str
    name: str
    entry_offset: int
    entry_size: int
    extra_size: int
    l1_table_offset: int
    l1_size: int
    disk_size: int | None


@dataclass(frozen=True)
class BitmapLayout:
    """One bitmap directory entry: where it is and what it says."""

    name: str
    entry_offset: int
    table_offset: int
    table_size: int
    granularity_bits: int
    flags: int


@dataclass(frozen=True)
class ImageLayout:
    """What :func:`qcow2_images` placed where: header facts, every structure, exact refcounts."""

    version: int
    cluster_bits: int
    refcount_order: int
    virtual_size: int
    extended_l2: bool
    compression_type: int
    header_length: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    l1_table_offset: int
    l1_size: int
    refcount_table_offset: int
    refcount_table_clusters: int
    snapshots_offset: int
    backing_file: str | None
    backing_file_offset: int
    backing_format: str | None
    extensions: tuple[Extension, ...]
    feature_names: tuple[tuple[int, int, str], ...]
    snapshots: tuple[SnapshotLayout, ...]
    bitmaps: tuple[BitmapLayout, ...]
    bitmap_directory: tuple[int, int] | None
    structures: tuple[Structure, ...]
    tables: tuple[Table, ...]
    refcounts: Mapping[int, int]
    file_size: int

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        """Width of a refcount entry in bits."""
        return 1 << self.refcount_order

    def cluster_types(self) -> dict[int, MetadataType]:
        """Host cluster index -> every metadata type placed in it (metadata clusters only)."""
        cs = self.cluster_size
        out: dict[int, MetadataType] = {}
        for s in self.structures:
            if not s.types or s.length == 0:
                continue
            for c in range(s.offset // cs, (s.offset + s.length - 1) // cs + 1):
                out[c] = out.get(c, _NO_TYPE) | s.types
        return out

    def metadata_extents(self) -> list[tuple[int, int, MetadataType]]:
        """What :meth:`qcow2ovl.Image.metadata_extents` must return for this image (template
        ``all``): sorted ``(offset, length, types)``, whole clusters, equal neighbours merged."""
        cs = self.cluster_size
        out: list[tuple[int, int, MetadataType]] = []
        for c, types in sorted(self.cluster_types().items()):
            if out and out[-1][0] + out[-1][1] == c * cs and out[-1][2] == types:
                start, length, _ = out[-1]
                out[-1] = (start, length + cs, types)
            else:
                out.append((c * cs, cs, types))
        return out

    def data_clusters(self) -> list[int]:
        """Host cluster indices holding guest data, compressed data or bitmap data."""
        cs = self.cluster_size
        out: set[int] = set()
        for s in self.structures:
            if not s.types:
                out.update(range(s.offset // cs, s.offset // cs + s.clusters))
        return sorted(out)

    def free_clusters(self) -> list[int]:
        """Cluster indices inside the file with refcount 0."""
        n = _ceil_div(self.file_size, self.cluster_size)
        return [c for c in range(n) if not self.refcounts.get(c)]

    def summary(self) -> str:
        """One line: version, cluster size, refcount width, sizes and counts."""
        feats = []
        if self.extended_l2:
            feats.append("extended-l2")
        if self.compression_type:
            feats.append("zstd")
        if self.backing_file is not None:
            feats.append("backing")
        return (
            f"v{self.version} cluster_size={self.cluster_size} refcount_bits={self.refcount_bits}"
            f" size={self.virtual_size} l1_size={self.l1_size} file_size={self.file_size}"
            f" snapshots={len(self.snapshots)} bitmaps={len(self.bitmaps)}"
            f" structures={len(self.structures)}" + (" " + ",".join(feats) if feats else "")
        )


@dataclass(frozen=True, repr=False)
class GeneratedImage:
    """A valid qcow2 image built by :func:`qcow2_images`: its bytes and its layout."""

    data: bytes
    layout: ImageLayout

    def write_to(self, path: str | os.PathLike[str]) -> str | os.PathLike[str]:
        """Write the image to *path* (replacing the file) and return *path*."""
        with open(path, "wb") as f:
            f.write(self.data)
        return path

    def __repr__(self) -> str:
        return f"GeneratedImage(<{len(self.data)} bytes> {self.layout.summary()})"


@dataclass(frozen=True, repr=False)
class CorruptedImage:
    """An image :func:`corrupted_images` broke: the bytes, the valid image it came from, and
    one human-readable line per corruption, in the order applied."""

    data: bytes
    base: GeneratedImage
    operations: tuple[str, ...]

    @property
    def description(self) -> str:
        """The base image's summary and the operations, one per line."""
        return "\n".join([self.base.layout.summary(), *("  " + op for op in self.operations)])

    def write_to(self, path: str | os.PathLike[str]) -> str | os.PathLike[str]:
        """Write the corrupted bytes to *path* (replacing the file) and return *path*."""
        with open(path, "wb") as f:
            f.write(self.data)
        return path

    def __repr__(self) -> str:
        return f"CorruptedImage(<{len(self.data)} bytes>\n{self.description})"
