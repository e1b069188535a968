"""How large a new image would be: :func:`measure`, ``qemu-img measure``'s numbers.

For a qcow2 output the file holds a header cluster, L2 tables for every guest cluster, the L1
table, refcount blocks and a refcount table that also count themselves, and the data clusters.
``fully_allocated`` is all of that with every guest cluster allocated; ``required`` leaves out
the data clusters a copy of the source would not allocate (those that read as zeros), but keeps
every table the fully allocated file needs, as qemu-img does (an overestimate by design).
``bitmaps`` is the room the source's persistent bitmaps would take in the new image, every
bitmap cluster counted as allocated.

For a raw output both numbers are the disk's size.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping
    from dataclasses import dataclass
    from typing import Any

    from qcow2ovl.image import Image
else:
    from qcow2ovl._frozen import dataclass

#: Formats measured (as outputs) and read (as sources).
FORMATS = ("qcow2", "raw")
#: QEMU's other image formats: known, but not measured here.
_OTHER_FORMATS = frozenset(
    "bochs cloop dmg luks parallels qcow qed vdi vhdx vmdk vpc vvfat".split()
)
#: Raw disks and qcow2 virtual sizes are whole sectors.
_SECTOR = 512
#: The largest L1 table QEMU accepts, in bytes.
_MAX_L1_BYTES = 32 << 20
#: Bytes of a bitmap directory entry before its name (QEMU's fixed part).
_BITMAP_ENTRY_HEAD = 24
#: qcow2 option keywords (:func:`qcow2ovl.create`'s names) that :func:`measure` takes.
QCOW2_OPTIONS = frozenset(
    {
        "cluster_size",
        "version",
        "refcount_bits",
        "extended_l2",
        "preallocation",
        "backing_file",
        "backing_format",
        "lazy_refcounts",
        "compression_type",
        "data_file",
        "data_file_raw",
    }
)
_PREALLOCATION = ("off", "metadata", "falloc", "full")
#: qemu-img measure takes the compat names only (not create's "v2" and "v3").
_VERSIONS: dict[object, int] = {2: 2, 3: 3, "0.10": 2, "1.1": 3}


@dataclass(frozen=True)
class MeasureResult:
    """What :func:`measure` found, in bytes: the file size a copy of the source needs
    (``required``), the size with every guest cluster allocated (``fully_allocated``), and the
    extra room for the source's persistent bitmaps (``bitmaps``; None where qemu-img leaves it
    out: a raw output, a v2 output, no source image, or a source without bitmap support)."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None

    def as_json(self) -> dict[str, int]:
        """The object of ``qemu-img measure --output=json``, keys in its order."""
        d: dict[str, int] = {}
        if self.bitmaps is not None:
            d["bitmaps"] = self.bitmaps
        d["required"] = self.required
        d["fully-allocated"] = self.fully_allocated
        return d

    def human(self) -> str:
        """The lines of ``qemu-img measure``'s human output (without the final newline)."""
        lines = [f"required size: {self.required}", f"fully allocated size: {self.fully_allocated}"]
        if self.bitmaps is not None:
            lines.append(f"bitmaps size: {self.bitmaps}")
        return "\n".join(lines)


def _div_up(n: int, unit: int) -> int:
    return -(-n // unit)


def _round_up(n: int, unit: int) -> int:
    return _div_up(n, unit) * unit


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_bits: int) -> int:
    """Bytes of refcount blocks and refcount table that count *clusters* clusters and
    themselves: the smallest numbers of blocks and table clusters that cover everything,
    found by growing both until they stop changing."""
    per_block = cluster_size * 8 // refcount_bits
    per_table_cluster = cluster_size // 8
    blocks = table = 0
    while True:
        new_blocks = _div_up(clusters + blocks + table, per_block)
        new_table = _div_up(new_blocks, per_table_cluster)
        if (new_blocks, new_table) == (blocks, table):
            return (blocks + table) * cluster_size
        blocks, table = new_blocks, new_table


def fully_allocated_size(
    virtual_size: int, cluster_size: int, refcount_bits: int, extended_l2: bool
) -> int:
    """The file size of a qcow2 image of *virtual_size* with every guest cluster allocated:
    header, L2 tables, L1 table, refcount structures and data, each in whole clusters."""
    data = _round_up(virtual_size, cluster_size)
    entry = 16 if extended_l2 else 8
    l2_entries = _round_up(data // cluster_size, cluster_size // entry)
    l1_entries = _round_up(l2_entries * entry // cluster_size, cluster_size // 8)
    meta = cluster_size + l2_entries * entry + l1_entries * 8
    meta += refcount_metadata_size((meta + data) // cluster_size, cluster_size, refcount_bits)
    return meta + data


def bitmaps_size(bitmaps: Iterable[tuple[str, int]], virtual_size: int, cluster_size: int) -> int:
    """Room for *bitmaps* (``(name, granularity)`` pairs) over a disk of *virtual_size* in an
    image of *cluster_size*: every bitmap cluster, each bitmap's table, and the directory."""
    total = directory = 0
    for name, granularity in bitmaps:
        nbytes = _div_up(_div_up(virtual_size, granularity), 8)  # one bit per granule
        clusters = _div_up(nbytes, cluster_size)
        total += clusters * cluster_size + _round_up(clusters * 8, cluster_size)
        directory += _round_up(_BITMAP_ENTRY_HEAD + len(name.encode("utf-8")), 8)
    return total + _round_up(directory, cluster_size)


def _unknown_format(fmt: str, what: str) -> ValueError:
    if fmt in _OTHER_FORMATS:
        return ValueError(f"measure: {what} format '{fmt}' is not supported (qcow2 and raw are)")
    return ValueError(f"Unknown file format '{fmt}'")


def _qcow2_settings(options: Mapping[str, Any]) -> tuple[int, int, int, bool, str]:
    """``(cluster size, version, refcount bits, extended L2, preallocation)`` from *options*,
    checked in qemu-img's order and words."""
    unknown = sorted(set(options) - QCOW2_OPTIONS)
    if unknown:
        raise ValueError(f"measure: unknown option '{unknown[0]}'")
    extended_l2 = bool(options.get("extended_l2", False))
    cluster_size = options.get("cluster_size", 65536)
    if (
        isinstance(cluster_size, bool)
        or not isinstance(cluster_size, int)
        or not 512 <= cluster_size <= 2 << 20
        or cluster_size & (cluster_size - 1)
    ):
        raise ValueError("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 16384:
        raise ValueError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )
    version_spec = options.get("version", 3)
    if isinstance(version_spec, bool) or version_spec not in _VERSIONS:
        raise ValueError(f"Invalid compatibility level: '{version_spec}'")
    version = _VERSIONS[version_spec]
    refcount_bits = options.get("refcount_bits", 16)
    if (
        isinstance(refcount_bits, bool)
        or not isinstance(refcount_bits, int)
        or not 0 < refcount_bits <= 64
        or refcount_bits & (refcount_bits - 1)
    ):
        raise ValueError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise ValueError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            "(use compat=1.1 or greater)"
        )
    preallocation = options.get("preallocation", "off")
    if preallocation not in _PREALLOCATION:
        raise ValueError(f"invalid parameter value: {preallocation}")
    return cluster_size, version, refcount_bits, extended_l2, preallocation


def _raw_data_ranges(path: str, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of the data ranges of the file at *path* (SEEK_DATA/SEEK_HOLE; the
    whole file where the system cannot tell)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                import errno

                if exc.errno == errno.ENXIO:
                    return
                if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    yield offset, size
                    return
                raise
            if start >= size:
                return
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            yield start, end
            offset = end
    finally:
        os.close(fd)


def _qcow2_data_ranges(image: Image) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of the guest ranges of *image* (and its backing chain) that hold
    data that does not read as zeros."""
    for start, length, _, _, zero, data, _, _ in image._guest_map_rows():
        if data and not zero:
            yield start, start + length


def _clusters_touched(ranges: Iterable[tuple[int, int]], cluster_size: int) -> int:
    """How many clusters of *cluster_size* the sorted *ranges* touch."""
    count, last = 0, -1
    for start, end in ranges:
        first, final = start // cluster_size, (end - 1) // cluster_size
        first = max(first, last + 1)
        if final >= first:
            count += final - first + 1
            last = final
    return count


def measure(
    source: str | os.PathLike[str] | None = None,
    *,
    size: int | None = None,
    source_format: str | None = None,
    output_format: str = "raw",
    options: Mapping[str, Any] | None = None,
    snapshot: str | None = None,
    force_share: bool = False,
) -> MeasureResult:
    """The file size a new image of *output_format* (``"raw"``, the default as in qemu-img, or
    ``"qcow2"``) needs, as ``qemu-img measure`` computes it: for a disk of *size* bytes, or to
    hold a copy of the guest disk of *source* (a qcow2 image with its backing chain, or a raw
    file; *source_format* ``"qcow2"`` or ``"raw"``, probed by default). Exactly one of
    *source* and *size* is given.

    *options* take :func:`qcow2ovl.create`'s keyword names (qcow2 output only). Those that
    change the numbers are ``cluster_size``, ``refcount_bits``, ``extended_l2``, ``version``
    (2 or 3, or ``"0.10"`` and ``"1.1"``; a v2 output has no bitmaps), ``preallocation``
    (``"full"`` and ``"falloc"`` count every data cluster as required) and ``backing_file``
    (with a *source*, every data cluster is required: the new image's backing file may share
    nothing with it); the others are accepted and, as in qemu-img, change nothing.
    *snapshot* measures that internal snapshot's disk of a qcow2 source; *force_share*
    (``-U``) opens the source beside a writer.

    Raises :class:`ValueError` with qemu-img's message for an invalid option or combination,
    :class:`OSError` if the source cannot be read, and the errors of :func:`qcow2ovl.open`.
    """
    if (source is None) == (size is None):
        raise ValueError("Either --size N or one filename must be specified.")
    if output_format not in FORMATS:
        raise _unknown_format(output_format, "output")
    if size is not None and (isinstance(size, bool) or not 0 <= size <= 2**63 - 1):
        raise ValueError(f"Invalid image size specified. Must be between 0 and {2**63 - 1}.")
    opts = dict(options or {})
    if output_format == "raw" and opts:
        raise ValueError(f"Invalid parameter '{sorted(opts)[0]}'")
    settings = _qcow2_settings(opts) if output_format == "qcow2" else None

    image: Image | None = None
    path: str | None = None
    if source is not None:
        path = os.fspath(source)
        fmt = source_format
        if fmt is None:
            from qcow2ovl._format import probe_format

            fmt = probe_format(path)
        if fmt not in FORMATS:
            raise _unknown_format(fmt, "source")
        if fmt == "raw" and snapshot is not None:
            os.stat(path)  # a missing file is the first error, as in qemu-img
            raise ValueError(
                "Failed to load snapshot: Block format 'raw' used by device '' does not "
                "support temporarily loading internal snapshots"
            )
        if fmt == "qcow2":
            from qcow2ovl.image import open as open_image

            image = open_image(
                path, overlap_check="none", snapshot=snapshot, force_share=force_share
            )
    try:
        return _measure(image, path, size, settings, opts)
    finally:
        if image is not None:
            image.close()


def _measure(
    image: Image | None,
    path: str | None,
    size: int | None,
    settings: tuple[int, int, int, bool, str] | None,
    opts: Mapping[str, Any],
) -> MeasureResult:
    raw_length = None
    if path is not None and image is None:
        raw_length = _round_up(os.path.getsize(path), _SECTOR)
    source_size = image.virtual_size if image is not None else raw_length
    if settings is None:  # raw output
        n = source_size if source_size is not None else _round_up(size or 0, _SECTOR)
        return MeasureResult(n, n)

    cluster_size, version, refcount_bits, extended_l2, preallocation = settings
    virtual_size = _round_up(size or 0, cluster_size)
    entry = 16 if extended_l2 else 8
    l2_tables = _div_up(virtual_size // cluster_size, cluster_size // entry)
    if l2_tables * 8 > _MAX_L1_BYTES:
        raise ValueError("The image size is too large (try using a larger cluster size)")
    required = 0
    if source_size is not None:
        virtual_size = _round_up(source_size, cluster_size)
        if opts.get("backing_file") is not None:
            required = virtual_size
        else:
            ranges = (
                _qcow2_data_ranges(image)
                if image is not None
                else _raw_data_ranges(str(path), source_size)
            )
            required = _clusters_touched(ranges, cluster_size) * cluster_size
    if preallocation in ("full", "falloc"):
        required = virtual_size
    full = fully_allocated_size(virtual_size, cluster_size, refcount_bits, extended_l2)
    bitmaps = None
    if version >= 3 and image is not None and image.info.version >= 3:
        bitmaps = bitmaps_size(
            ((b.name, b.granularity) for b in image.bitmaps), image.virtual_size, cluster_size
        )
    return MeasureResult(full - virtual_size + required, full, bitmaps)


__all__ = [
    "FORMATS",
    "QCOW2_OPTIONS",
    "MeasureResult",
    "bitmaps_size",
    "fully_allocated_size",
    "measure",
    "refcount_metadata_size",
]
