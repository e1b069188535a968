"""The records an :class:`~qcow2ovl.Image` hands out: :class:`ImageInfo`, :class:`Snapshot`,
:class:`Bitmap`, :class:`Problem`, :class:`GuestExtent` (all importable from
``qcow2ovl.image`` and ``qcow2ovl`` as well)."""

from __future__ import annotations

# Startup time: datetime, dataclasses and typing are for type checkers only (the records come
# from _records at run time; Snapshot.date imports datetime when called).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import datetime as _dt
    from dataclasses import dataclass
    from typing import Any
else:
    from qcow2ovl._records import dataclass


@dataclass(frozen=True)
class ImageInfo:
    """Facts from an image's header as it was when the image was opened (a frozen record: after
    :meth:`Image.resize` or a snapshot operation, :attr:`Image.virtual_size` and
    :attr:`Image.snapshots` give the current values; a new :func:`open` gives new facts).

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


@dataclass(frozen=True)
class Problem:
    """A problem the scan found in the image's metadata.

    ``kind`` is one of ``"unaligned"`` (a table or pointer off a cluster boundary),
    ``"beyond-end"`` (a pointer past the end of the file), ``"unmappable"`` (past 2^56),
    ``"metadata-overlap"`` (two metadata structures share a cluster) and ``"unusable-snapshot"``
    (a snapshot L1 table QEMU would refuse to use). ``offset`` and ``size`` give the host range
    concerned; ``message`` says which structures. ``str(problem)`` is the message.
    """

    kind: str
    offset: int
    size: int
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class GuestExtent:
    """A range of the guest disk, with the fields of ``qemu-img map --output=json``.

    ``depth`` is the layer of the backing chain that provides the range (0: this image);
    ``present`` whether that layer allocates it; ``zero`` whether it reads as zeros; ``data``
    whether the layer holds data for it; ``compressed`` whether that data is compressed;
    ``offset`` where the range starts in the layer's file (its external data file, if any), or
    ``None`` when there is no such place (unallocated, compressed, encrypted).
    """

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    compressed: bool
    offset: int | None

    def as_qemu_dict(self) -> dict[str, Any]:
        """The entry as ``qemu-img map --output=json`` prints it (no ``offset`` key when
        ``None``)."""
        d: dict[str, Any] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
            "compressed": self.compressed,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        return d
