"""Independent pure-Python qcow2 reader: the test oracle for the metadata map.

It shares no code with qcow2ovl. It reads an image's bytes with `struct` (big-endian) and computes:

- the expected `metadata_extents()` list (docs/design/architecture.md, "Metadata types"), in
  the same format: sorted
  `(host offset, length, types)` tuples, every extent whole clusters, per-cluster types OR-ed,
  adjacent clusters with equal types merged;
- header facts (the fields `Image.info` reports), the snapshot list and the bitmap list;
- for self-checks only: the refcount of every host cluster and the host clusters holding guest
  data, compressed data and bitmap data, so that "metadata + data == allocated" can be proven.

It deliberately validates very little: it is meant for images QEMU itself wrote (or that a test
poked on purpose). Like QEMU's file driver, it reads bytes past the end of the file as zeros; it
raises `OracleError` only where it cannot go on (bad magic, short header, an extension running
past its area, a bitmap directory whose entries disagree with its size).

Facts it relies on, checked against QEMU 10 by test_oracle_selfcheck.py:
- v3 images from QEMU 10 have header_length 112 (104 + compression type byte + padding); the
  extensions start there; v2 images have none of the v3 fields and extensions start at 72;
- QEMU writes 24 bytes of snapshot extra data (vm_state_size_large, disk_size, icount) in v2
  images too, so every snapshot entry is 40 + 24 + id + name bytes, 8-aligned;
- a LUKS header lies in whole clusters right after the L1 table when the image is created, and
  its extension length equals LUKS's payload offset (0x1f9000 for QEMU's defaults);
- with an external data file, an L2 entry with offset 0 and COPIED set is allocated (data at
  offset 0 of the data file).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# MetadataType bits (docs/design/architecture.md, "Metadata types"); kept as plain ints so the
# oracle never imports qcow2ovl.
MAIN_HEADER = 0x1
ACTIVE_L1 = 0x2
ACTIVE_L2 = 0x4
REFCOUNT_TABLE = 0x8
REFCOUNT_BLOCK = 0x10
SNAPSHOT_TABLE = 0x20
INACTIVE_L1 = 0x40
INACTIVE_L2 = 0x80
BITMAP_DIRECTORY = 0x100
CRYPTO_HEADER = 0x200
BITMAP_TABLE = 0x400

TYPE_NAMES: dict[int, str] = {
    MAIN_HEADER: "MAIN_HEADER",
    ACTIVE_L1: "ACTIVE_L1",
    ACTIVE_L2: "ACTIVE_L2",
    REFCOUNT_TABLE: "REFCOUNT_TABLE",
    REFCOUNT_BLOCK: "REFCOUNT_BLOCK",
    SNAPSHOT_TABLE: "SNAPSHOT_TABLE",
    INACTIVE_L1: "INACTIVE_L1",
    INACTIVE_L2: "INACTIVE_L2",
    BITMAP_DIRECTORY: "BITMAP_DIRECTORY",
    CRYPTO_HEADER: "CRYPTO_HEADER",
    BITMAP_TABLE: "BITMAP_TABLE",
}

# Overlap-check templates (docs/design/architecture.md, "Metadata types": cumulative).
TEMPLATE_NONE = 0
TEMPLATE_CONSTANT = (
    MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY | CRYPTO_HEADER
)
TEMPLATE_CACHED = TEMPLATE_CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1 | BITMAP_TABLE
TEMPLATE_ALL = TEMPLATE_CACHED | INACTIVE_L2
TEMPLATES: dict[str, int] = {
    "none": TEMPLATE_NONE,
    "constant": TEMPLATE_CONSTANT,
    "cached": TEMPLATE_CACHED,
    "all": TEMPLATE_ALL,
}

QCOW_MAGIC = 0x514649FB
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_COMPRESSED = 1 << 62

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

Extent = tuple[int, int, int]


class OracleError(Exception):
    """The oracle cannot make sense of the image (it is not meant for broken images)."""


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass
class Header:
    """The fixed header fields (v2 fields get their v3 defaults)."""

    magic: int
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


@dataclass
class HeaderExtension:
    """One header extension: where its data lies in cluster 0 and the data bytes."""

    magic: int
    offset: int
    data: bytes


@dataclass
class Snapshot:
    """One snapshot table entry as found on disk."""

    entry_offset: int
    entry_size: int
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size_small: int
    extra: bytes
    vm_state_size: int
    disk_size: int | None
    icount: int | None


@dataclass
class Bitmap:
    """One bitmap directory entry as found on disk."""

    entry_offset: int
    entry_size: int
    name: str
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra: bytes

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def flag_names(self) -> list[str]:
        names = []
        if self.flags & 1:
            names.append("in-use")
        if self.flags & 2:
            names.append("auto")
        return names


@dataclass
class Oracle:
    """An image read from its bytes; every field is derived without qcow2ovl."""

    data: bytes
    header: Header
    extensions: list[HeaderExtension] = field(default_factory=list)
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    crypto_header: tuple[int, int] | None = None
    bitmaps_ext: tuple[int, int, int] | None = None  # nb_bitmaps, dir_size, dir_offset
    snapshots: list[Snapshot] = field(default_factory=list)
    bitmaps: list[Bitmap] = field(default_factory=list)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | Path) -> Oracle:
        return cls.from_bytes(Path(path).read_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> Oracle:
        header = parse_header(data)
        oracle = cls(data=data, header=header)
        oracle._read_extensions()
        oracle._read_backing_file()
        oracle._read_snapshots()
        oracle._read_bitmaps()
        return oracle

    def _u64(self, offset: int) -> int:
        return int(struct.unpack_from(">Q", self._bytes(offset, 8))[0])

    def _bytes(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; past the end of the file reads as zeros (sparse tail)."""
        if offset < 0 or length < 0:
            raise OracleError(f"bad range {offset:#x}+{length:#x}")
        chunk = self.data[offset : offset + length]
        return chunk + bytes(length - len(chunk))

    def _read_extensions(self) -> None:
        h = self.header
        end = h.backing_file_offset if h.backing_file_offset else h.cluster_size
        off = h.header_length
        while off + 8 <= end:
            magic, length = struct.unpack_from(">II", self.data, off)
            if magic == EXT_END:
                break
            if off + 8 + length > end:
                raise OracleError(f"header extension {magic:#x} at {off:#x} too large")
            ext = HeaderExtension(magic, off + 8, self.data[off + 8 : off + 8 + length])
            self.extensions.append(ext)
            off += 8 + _align_up(length, 8)
        for ext in self.extensions:
            if ext.magic == EXT_BACKING_FORMAT:
                self.backing_format = ext.data.decode()
            elif ext.magic == EXT_DATA_FILE:
                self.data_file = ext.data.decode()
            elif ext.magic == EXT_CRYPTO:
                self.crypto_header = struct.unpack_from(">QQ", ext.data)
            elif ext.magic == EXT_BITMAPS:
                nb, _reserved, dir_size, dir_offset = struct.unpack_from(">IIQQ", ext.data)
                self.bitmaps_ext = (nb, dir_size, dir_offset)
            elif ext.magic == EXT_FEATURE_TABLE:
                for i in range(len(ext.data) // 48):
                    ftype, bit = struct.unpack_from(">BB", ext.data, i * 48)
                    raw = ext.data[i * 48 + 2 : i * 48 + 48]
                    self.feature_names[(ftype, bit)] = raw.split(b"\0", 1)[0].decode()

    def _read_backing_file(self) -> None:
        h = self.header
        if h.backing_file_offset:
            raw = self.data[h.backing_file_offset : h.backing_file_offset + h.backing_file_size]
            self.backing_file = raw.decode()

    def _read_snapshots(self) -> None:
        h = self.header
        off = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            off = _align_up(off, 8)
            (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate, extra_size) = (
                struct.unpack_from(">QIHHIIQII", self._bytes(off, 40))
            )
            extra = self._bytes(off + 40, extra_size)
            id_start = off + 40 + extra_size
            sn_id = self._bytes(id_start, id_len).decode()
            name = self._bytes(id_start + id_len, name_len).decode()
            size = 40 + extra_size + id_len + name_len
            vm_state = vmstate
            disk_size: int | None = None
            icount: int | None = None
            if extra_size >= 8:
                vm_state = int(struct.unpack_from(">Q", extra, 0)[0])
            if extra_size >= 16:
                disk_size = int(struct.unpack_from(">Q", extra, 8)[0])
            if extra_size >= 24:
                icount = int(struct.unpack_from(">Q", extra, 16)[0])
            self.snapshots.append(
                Snapshot(
                    entry_offset=off,
                    entry_size=size,
                    l1_table_offset=l1_off,
                    l1_size=l1_size,
                    id=sn_id,
                    name=name,
                    date_sec=dsec,
                    date_nsec=dnsec,
                    vm_clock_nsec=vmclock,
                    vm_state_size_small=vmstate,
                    extra=extra,
                    vm_state_size=vm_state,
                    disk_size=disk_size,
                    icount=icount,
                )
            )
            off += size

    @property
    def bitmaps_active(self) -> bool:
        """The bitmaps extension counts only while autoclear bit 0 is set."""
        return (
            self.bitmaps_ext is not None
            and self.header.version >= 3
            and bool(self.header.autoclear_features & AUTOCLEAR_BITMAPS)
        )

    def _read_bitmaps(self) -> None:
        if not self.bitmaps_active or self.bitmaps_ext is None:
            return
        nb, dir_size, dir_offset = self.bitmaps_ext
        off = dir_offset
        for _ in range(nb):
            table_offset, table_size, flags, btype, gran, name_size, extra_size = (
                struct.unpack_from(">QIIBBHI", self._bytes(off, 24))
            )
            extra = self._bytes(off + 24, extra_size)
            name = self._bytes(off + 24 + extra_size, name_size).decode()
            size = _align_up(24 + extra_size + name_size, 8)
            self.bitmaps.append(
                Bitmap(off, size, name, table_offset, table_size, flags, btype, gran, extra)
            )
            off += size
        if off - dir_offset != dir_size:
            raise OracleError(
                f"bitmap directory is {off - dir_offset} bytes, header says {dir_size}"
            )

    # ---- simple facts -------------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def extended_l2(self) -> bool:
        return bool(self.header.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        return 1 << self.header.refcount_order

    @property
    def external_data_file(self) -> bool:
        return bool(self.header.incompatible_features & INCOMPAT_DATA_FILE)

    def info(self) -> dict[str, object]:
        """The fields `Image.info` must report, by the contract's names."""
        h = self.header
        set_bits = (
            [(0, bit) for bit in range(64) if h.incompatible_features >> bit & 1]
            + [(1, bit) for bit in range(64) if h.compatible_features >> bit & 1]
            + [(2, bit) for bit in range(64) if h.autoclear_features >> bit & 1]
        )
        return {
            "version": h.version,
            "virtual_size": h.size,
            "cluster_size": h.cluster_size,
            "refcount_bits": self.refcount_bits,
            "compression_type": "zstd" if h.compression_type == 1 else "zlib",
            "extended_l2": self.extended_l2,
            "crypt_method": h.crypt_method,
            "encrypted": h.crypt_method != 0,
            "lazy_refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "dirty": bool(h.incompatible_features & INCOMPAT_DIRTY),
            "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
            "backing_file": self.backing_file,
            "backing_format": self.backing_format,
            "data_file": self.data_file,
            "feature_bits": set_bits,
        }

    # ---- tables -------------------------------------------------------------------------

    def read_table(self, offset: int, entries: int) -> list[int]:
        """`entries` big-endian u64 words at `offset`."""
        if entries == 0:
            return []
        raw = self._bytes(offset, entries * 8)
        return list(struct.unpack(f">{entries}Q", raw))

    def active_l1(self) -> list[int]:
        return self.read_table(self.header.l1_table_offset, self.header.l1_size)

    def reftable(self) -> list[int]:
        h = self.header
        return self.read_table(
            h.refcount_table_offset, h.refcount_table_clusters * h.cluster_size // 8
        )

    def snapshot_l1(self, snapshot: Snapshot) -> list[int]:
        return self.read_table(snapshot.l1_table_offset, snapshot.l1_size)

    def l2_offsets(self, l1: Iterable[int]) -> list[int]:
        return [e & L1E_OFFSET_MASK for e in l1 if e & L1E_OFFSET_MASK]

    def l2_table(self, offset: int) -> list[int]:
        """The first word of every L2 entry of the table at `offset`."""
        words = self.read_table(offset, self.cluster_size // 8)
        return words[:: self.l2_entry_size // 8]

    # ---- metadata extents ---------------------------------------------------------------

    def metadata_ranges(self) -> Iterator[tuple[int, int, int]]:
        """Every metadata range `(offset, length, type)` as entered (before rounding)."""
        h = self.header
        cs = h.cluster_size
        yield 0, cs, MAIN_HEADER
        if h.l1_size:
            yield h.l1_table_offset, h.l1_size * 8, ACTIVE_L1
        for l2 in self.l2_offsets(self.active_l1()):
            yield l2, cs, ACTIVE_L2
        if h.refcount_table_clusters:
            yield h.refcount_table_offset, h.refcount_table_clusters * cs, REFCOUNT_TABLE
        for e in self.reftable():
            if e & REFT_OFFSET_MASK:
                yield e & REFT_OFFSET_MASK, cs, REFCOUNT_BLOCK
        if self.snapshots:
            end = max(s.entry_offset + s.entry_size for s in self.snapshots)
            yield h.snapshots_offset, end - h.snapshots_offset, SNAPSHOT_TABLE
        for sn in self.snapshots:
            if sn.l1_size:
                yield sn.l1_table_offset, sn.l1_size * 8, INACTIVE_L1
                for l2 in self.l2_offsets(self.snapshot_l1(sn)):
                    yield l2, cs, INACTIVE_L2
        if self.bitmaps_active and self.bitmaps_ext is not None:
            _nb, dir_size, dir_offset = self.bitmaps_ext
            if dir_size:
                yield dir_offset, dir_size, BITMAP_DIRECTORY
            for bm in self.bitmaps:
                if bm.table_size:
                    yield bm.table_offset, bm.table_size * 8, BITMAP_TABLE
        if self.crypto_header is not None:
            offset, length = self.crypto_header
            if length:
                yield offset, length, CRYPTO_HEADER

    def cluster_types(self, mask: int = TEMPLATE_ALL) -> dict[int, int]:
        """Host cluster index -> OR of the metadata types (restricted to `mask`) it carries."""
        cs = self.cluster_size
        types: dict[int, int] = {}
        for offset, length, mtype in self.metadata_ranges():
            mtype &= mask
            if not mtype or length <= 0:
                continue
            for c in range(offset // cs, (offset + length - 1) // cs + 1):
                types[c] = types.get(c, 0) | mtype
        return types

    def metadata_extents(self, mask: int = TEMPLATE_ALL) -> list[Extent]:
        """What `Image.metadata_extents()` must return for an image opened with `mask`."""
        return merge_clusters(self.cluster_types(mask), self.cluster_size)

    # ---- data and refcounts (self-checks) -----------------------------------------------

    def guest_l2_entries(self, l1: list[int]) -> Iterator[tuple[int, int]]:
        """(guest cluster index, first L2 word) for every non-zero L2 entry under `l1`."""
        for i, l1e in enumerate(l1):
            l2 = l1e & L1E_OFFSET_MASK
            if not l2:
                continue
            for j, e in enumerate(self.l2_table(l2)):
                if e:
                    yield i * self.l2_entries + j, e

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """Host byte range `(offset, length)` of a compressed cluster descriptor."""
        cb = self.header.cluster_bits
        x = 62 - (cb - 8)
        offset = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (cb - 8)) - 1)) + 1
        return offset, (offset & ~511) + sectors * 512 - offset

    def data_clusters(self) -> dict[int, str]:
        """Host clusters holding guest data (all L1s), compressed data or bitmap data."""
        cs = self.cluster_size
        out: dict[int, str] = {}
        l1s = [self.active_l1()] + [self.snapshot_l1(s) for s in self.snapshots]
        for l1 in l1s:
            for _guest, e in self.guest_l2_entries(l1):
                if e & L2E_COMPRESSED:
                    off, length = self.compressed_range(e)
                    for c in range(off // cs, (off + length - 1) // cs + 1):
                        out[c] = "compressed"
                elif e & L2E_OFFSET_MASK and not self.external_data_file:
                    out[(e & L2E_OFFSET_MASK) // cs] = "data"
        for bm in self.bitmaps:
            for e in self.read_table(bm.table_offset, bm.table_size):
                if e & BME_OFFSET_MASK:
                    out[(e & BME_OFFSET_MASK) // cs] = "bitmap-data"
        return out

    def allocated_guest_clusters(self) -> int:
        """Guest clusters with an allocation in the active L2 tables (qemu-img check's count)."""
        n = 0
        for _guest, e in self.guest_l2_entries(self.active_l1()):
            if self.l2_entry_allocated(e):
                n += 1
        return n

    def l2_entry_allocated(self, entry: int) -> bool:
        """Whether an L2 entry maps its guest cluster to host data. With an external data file,
        offset 0 is a valid data offset: there the COPIED flag tells an allocated entry."""
        if entry & L2E_COMPRESSED or entry & L2E_OFFSET_MASK:
            return True
        return self.external_data_file and bool(entry >> 63)

    def refcounts(self) -> dict[int, int]:
        """Host cluster index -> refcount, for every cluster with a non-zero refcount."""
        bits = self.refcount_bits
        per_block = self.cluster_size * 8 // bits
        out: dict[int, int] = {}
        for i, e in enumerate(self.reftable()):
            block = e & REFT_OFFSET_MASK
            if not block:
                continue
            raw = self._bytes(block, self.cluster_size)
            if bits >= 8:
                width = bits // 8
                for j in range(per_block):
                    v = int.from_bytes(raw[j * width : (j + 1) * width], "big")
                    if v:
                        out[i * per_block + j] = v
            else:
                for j in range(per_block):
                    bit = j * bits
                    v = raw[bit // 8] >> (bit % 8) & ((1 << bits) - 1)
                    if v:
                        out[i * per_block + j] = v
        return out


def parse_header(data: bytes) -> Header:
    """The fixed header of an image (v2 gets v3 defaults)."""
    if len(data) < 72:
        raise OracleError("file shorter than a qcow2 v2 header")
    fields = struct.unpack_from(">IIQIIQIIQQIIQ", data, 0)
    header = Header(*fields)
    if header.magic != QCOW_MAGIC:
        raise OracleError("bad magic")
    if header.version >= 3:
        if len(data) < 104:
            raise OracleError("file shorter than a qcow2 v3 header")
        (
            header.incompatible_features,
            header.compatible_features,
            header.autoclear_features,
            header.refcount_order,
            header.header_length,
        ) = struct.unpack_from(">QQQII", data, 72)
        if header.header_length > 104:
            header.compression_type = data[104]
    return header


def merge_clusters(types: dict[int, int], cluster_size: int) -> list[Extent]:
    """Per-cluster type map -> sorted extents, adjacent clusters with equal types merged."""
    out: list[Extent] = []
    run_start = run_end = run_types = -1
    for c in sorted(types):
        t = types[c]
        if t == 0:
            continue
        if c == run_end and t == run_types:
            run_end += 1
            continue
        if run_types >= 0:
            out.append((run_start * cluster_size, (run_end - run_start) * cluster_size, run_types))
        run_start, run_end, run_types = c, c + 1, t
    if run_types >= 0:
        out.append((run_start * cluster_size, (run_end - run_start) * cluster_size, run_types))
    return out


def normalize_extents(extents: Iterable[tuple[int, int, object]]) -> list[Extent]:
    """Extents as plain int triples (accepts MetadataType or int types)."""
    return [(int(o), int(n), int(t)) for o, n, t in extents]  # type: ignore[call-overload]


def expected_overlap(
    extents: list[Extent], cluster_size: int, offset: int, size: int, ignore: int = 0
) -> int:
    """The naive answer for `check_overlap(offset, size, ignore)` given the extents."""
    if size <= 0:
        return 0
    first = offset // cluster_size * cluster_size
    last = _align_up(offset + size, cluster_size)
    hit = 0
    for ext_off, ext_len, ext_types in extents:
        if ext_off < last and first < ext_off + ext_len:
            hit |= ext_types
    return hit & ~ignore


def describe(extents: Iterable[tuple[int, int, int]]) -> str:
    """Human-readable extents, one per line, for assertion messages."""
    lines = []
    for off, length, types in extents:
        names = "|".join(n for bit, n in TYPE_NAMES.items() if types & bit) or "0"
        lines.append(f"  {off:#012x} +{length:#x} {names}")
    return "\n".join(lines)


def expected_extents(path: str | Path, template: str = "all") -> list[Extent]:
    """Convenience: the oracle's extents for the image at `path` under an overlap template."""
    return Oracle.from_path(path).metadata_extents(TEMPLATES[template])


# ---- translating QEMU's view ----------------------------------------------------------------


def info_from_qemu(info: dict[str, object]) -> dict[str, object]:
    """`qemu-img info --output=json` translated to the contract's `Image.info` field names.

    Compression types keep QEMU's names (``zlib``, ``zstd``); compat "0.10" is version 2 and "1.1"
    version 3.
    """
    fmt = info.get("format-specific")
    data: dict[str, object] = {}
    if isinstance(fmt, dict) and isinstance(fmt.get("data"), dict):
        data = fmt["data"]
    encrypt = data.get("encrypt")
    crypt_format = encrypt.get("format") if isinstance(encrypt, dict) else None
    compression = data.get("compression-type", "zlib")
    return {
        "version": {"0.10": 2, "1.1": 3}[str(data["compat"])],
        "virtual_size": info["virtual-size"],
        "cluster_size": info["cluster-size"],
        "refcount_bits": data["refcount-bits"],
        "compression_type": compression,
        "extended_l2": bool(data.get("extended-l2", False)),
        "crypt_method": {None: 0, "aes": 1, "luks": 2}[crypt_format],  # type: ignore[index]
        "encrypted": bool(info.get("encrypted", False)),
        "lazy_refcounts": bool(data.get("lazy-refcounts", False)),
        "dirty": bool(info.get("dirty-flag", False)),
        "corrupt": bool(data.get("corrupt", False)),
        "backing_file": info.get("backing-filename"),
        "backing_format": info.get("backing-filename-format"),
        "data_file": data.get("data-file"),
    }


def host_data_ranges(qemu_map: list[dict[str, object]]) -> list[tuple[int, int]]:
    """Host `(offset, length)` of the guest data `qemu-img map` places in this image's own file:
    depth 0, data, not compressed, with an offset. (Callers skip images with an external data
    file, whose offsets are in the other file.)"""
    out = []
    for r in qemu_map:
        if r.get("depth") == 0 and r.get("data") and not r.get("compressed") and "offset" in r:
            out.append((int(r["offset"]), int(r["length"])))  # type: ignore[call-overload]
    return out


def l2_indices_from_map(
    qemu_map: list[dict[str, object]], cluster_size: int, l2_entries: int
) -> set[int]:
    """Indices of the active L1 entries that must have an L2 table, from the depth-0 ranges of
    `qemu-img map` that are present in this layer (data or zero clusters, both live in L2 tables
    of this layer; an unallocated range is `present: false` at depth 0, or comes from a backing
    file at depth > 0)."""
    span = cluster_size * l2_entries
    out: set[int] = set()
    for r in qemu_map:
        if r.get("depth") == 0 and r.get("present", r.get("data")):
            start = int(r["start"])  # type: ignore[call-overload]
            length = int(r["length"])  # type: ignore[call-overload]
            out.update(range(start // span, (start + length - 1) // span + 1))
    return out
