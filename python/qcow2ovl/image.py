"""Opening qcow2 images: :func:`open` and :class:`Image`."""

from __future__ import annotations

import os

from qcow2ovl import _core, options
from qcow2ovl.options import OverlapCheck
from qcow2ovl.types import MetadataType

# Startup time: datetime, dataclasses, typing and collections.abc are for type checkers only
# (the records come from _records at run time; Snapshot.date imports datetime when called).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import datetime as _dt
    from collections.abc import Mapping
    from dataclasses import dataclass
    from types import TracebackType
    from typing import Any

    from qcow2ovl.options import OverlapCheckSpec
else:
    from qcow2ovl._records import dataclass


@dataclass(frozen=True)
class ImageInfo:
    """Facts from an image's header.

    ``crypt_method`` is 0 (none), 1 (legacy AES) or 2 (LUKS). ``features`` names every set feature
    bit in QEMU's words (``"dirty bit"``, ``"corrupt bit"``, ``"external data file"``,
    ``"compression type"``, ``"extended L2 entries"``, ``"lazy refcounts"``, ``"bitmaps"``,
    ``"raw external data"``), unknown bits from the feature name table or by number.
    """

    version: int
    virtual_size: int
    cluster_size: int
    refcount_bits: int
    compression_type: str
    extended_l2: bool
    crypt_method: int
    lazy_refcounts: bool
    dirty: bool
    corrupt: bool
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    features: tuple[str, ...]
    l1_table_offset: int
    l1_size: int
    refcount_table_offset: int
    refcount_table_clusters: int
    snapshots_offset: int
    crypto_header: tuple[int, int] | None
    file_size: int

    @property
    def encrypted(self) -> bool:
        """Whether guest data is encrypted (AES or LUKS)."""
        return self.crypt_method != 0


@dataclass(frozen=True)
class Snapshot:
    """An internal snapshot. ``vm_state_size`` is in bytes; ``disk_size`` is None for v2 entries
    without the extra data; ``date`` is the creation time in UTC."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    disk_size: int | None
    icount: int | None

    @property
    def date(self) -> _dt.datetime:
        """Creation time (UTC)."""
        import datetime as _dt

        return _dt.datetime.fromtimestamp(self.date_sec + self.date_nsec / 1e9, tz=_dt.timezone.utc)


@dataclass(frozen=True)
class Bitmap:
    """A persistent dirty bitmap. ``flags``: bit 0 in use, bit 1 auto."""

    name: str
    granularity: int
    flags: int
    table_offset: int
    table_size: int

    @property
    def in_use(self) -> bool:
        """Whether the bitmap was in use (possibly inconsistent)."""
        return bool(self.flags & 1)

    @property
    def auto(self) -> bool:
        """Whether the bitmap tracks every write automatically."""
        return bool(self.flags & 2)


def _build(cls: type[Any], fields: Mapping[str, Any]) -> Any:
    return cls(**fields)


class Image:
    """An open qcow2 image: its header facts, snapshots, bitmaps and metadata map.

    Use :func:`open`; close with :meth:`close` or a ``with`` block.
    """

    def __init__(self, core: _core.Image, path: str, overlap_check: OverlapCheck) -> None:
        self._core = core
        self.path = path
        self.overlap_check = overlap_check
        info = dict(core.info())
        features: Any = info["features"]
        info["features"] = tuple(features)
        if info["compression_type"] == "deflate":  # QEMU's name for compression type 0
            info["compression_type"] = "zlib"
        self.info: ImageInfo = _build(ImageInfo, info)
        self.snapshots: list[Snapshot] = [_build(Snapshot, s) for s in core.snapshots()]
        self.bitmaps: list[Bitmap] = [_build(Bitmap, b) for b in core.bitmaps()]

    @property
    def writable(self) -> bool:
        """Whether the image was opened read-write."""
        return self._core.writable

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._core.closed

    def check_overlap(self, offset: int, size: int, ignore: int = 0) -> MetadataType:
        """The metadata types a write of *size* bytes at host *offset* would overwrite.

        The pre-write check, without side effects: the range is rounded out to clusters, and the
        result is the OR of every checked type in it minus *ignore* (empty means safe).
        """
        return self._core.check_overlap(offset, size, ignore)

    def metadata_extents(self) -> list[tuple[int, int, MetadataType]]:
        """Every metadata extent ``(host offset, length, types)``, sorted, equal neighbours
        merged."""
        return self._core.metadata_extents()

    def map_memory_usage(self) -> int:
        """Bytes held by the metadata map."""
        return self._core.map_memory_usage()

    def unchecked_ranges(self) -> list[tuple[int, int]]:
        """Host ranges the map's memory limit kept out (checked the naive way instead)."""
        return self._core.unchecked_ranges()

    @property
    def problems(self) -> list[str]:
        """Non-fatal inconsistencies the scan found (unaligned or out-of-file table pointers)."""
        return self._core.problems()[0]

    def close(self) -> None:
        """Release the image. Safe to call twice."""
        self._core.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("rw" if self.writable else "ro")
        return f"<qcow2ovl.Image {self.path!r} {state} overlap_check={self.overlap_check}>"


def open(  # noqa: A001 - mirrors the builtin on purpose, like gzip.open
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    overlap_check: OverlapCheckSpec = "all",
    map_memory_limit: int | None = None,
) -> Image:
    """Open the qcow2 image at *path*, validate its header and tables, and map its metadata.

    *overlap_check* takes every form :meth:`OverlapCheck.parse` accepts (default: ``"all"``);
    only the enabled types are read and tracked. *map_memory_limit* bounds the map's memory;
    ranges it cannot hold are checked with QEMU's naive algorithm instead (never under-reported).

    Raises :class:`~qcow2ovl.FormatError` for a malformed image, :class:`~qcow2ovl.UnsupportedError`
    for a valid one using unsupported features, :class:`~qcow2ovl.CorruptImageError` for a
    read-write open of an image marked corrupt, and :class:`OSError` when the file cannot be read.
    """
    check = OverlapCheck.parse(overlap_check)
    fspath = os.fspath(path)
    limit = options.map_memory_limit(map_memory_limit)
    core = _core.open_image(
        fspath, writable=writable, enabled=int(check.mask), map_memory_limit=limit
    )
    return Image(core, fspath, check)
