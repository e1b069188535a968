"""Corrupting a valid image in random ways: the strategy and the seeded equivalent."""

from __future__ import annotations

import random
import struct

from hypothesis import strategies as st

from qcow2ovl.testing._common import (
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    KNOWN_EXTENSIONS,
    _align,
    _Chooser,
    _DrawChooser,
    _RandomChooser,
)
from qcow2ovl.testing.images import (
    qcow2_images,
)
from qcow2ovl.testing.layout import (
    CorruptedImage,
    GeneratedImage,
)

# ---- corruption ---------------------------------------------------------------------------------

#: Fixed header fields: (name, offset, width in bytes). The version 3 ones are poked in version 2
#: images too (there they are the first bytes of the extension area).
HEADER_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("magic", 0, 4),
    ("version", 4, 4),
    ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4),
    ("cluster_bits", 20, 4),
    ("size", 24, 8),
    ("crypt_method", 32, 4),
    ("l1_size", 36, 4),
    ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8),
    ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4),
    ("snapshots_offset", 64, 8),
    ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8),
    ("autoclear_features", 88, 8),
    ("refcount_order", 96, 4),
    ("header_length", 100, 4),
    ("compression_type", 104, 1),
)

#: Snapshot table entry fields: (name, offset in the entry, width).
SNAPSHOT_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("l1_table_offset", 0, 8),
    ("l1_size", 8, 4),
    ("id_str_size", 12, 2),
    ("name_size", 14, 2),
    ("date_nsec", 20, 4),
    ("vm_state_size", 32, 4),
    ("extra_data_size", 36, 4),
    ("vm_state_size_large", 40, 8),
    ("disk_size", 48, 8),
)

#: Bitmap directory entry fields: (name, offset in the entry, width).
BITMAP_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("bitmap_table_offset", 0, 8),
    ("bitmap_table_size", 8, 4),
    ("flags", 12, 4),
    ("type", 16, 1),
    ("granularity_bits", 17, 1),
    ("name_size", 18, 2),
    ("extra_data_size", 20, 4),
)

#: Bitmaps extension fields: (name, offset in the extension data, width).
BITMAPS_EXT_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("nb_bitmaps", 0, 4),
    ("reserved", 4, 4),
    ("bitmap_directory_size", 8, 8),
    ("bitmap_directory_offset", 16, 8),
)


class _Corrupter:
    """Applies random corruptions to an image's bytes and describes each one."""

    def __init__(self, c: _Chooser, image: GeneratedImage) -> None:
        self.c = c
        self.image = image
        self.layout = image.layout
        self.data = bytearray(image.data)
        self.ops: list[str] = []

    # -- values --------------------------------------------------------------------------------

    def metadata_offsets(self) -> list[int]:
        return [s.offset for s in self.layout.structures if s.types] or [0]

    def value(self, width: int, current: int) -> int:
        """A boundary, pointer-like or random value for a field of `width` bytes."""
        c, cs = self.c, self.layout.cluster_size
        size = len(self.data)
        kind = c.integer(0, 5)
        if kind == 0:
            v = c.choice(
                [0, 1, 2, 3, 7, 8, 9, 16, 21, 22, 64, 0x1FF, 0x200, 1023, 1024, 0xFFFF, 0x10000]
                + [0x10001, 0x400000, 0x400001, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**55]
                + [2**56 - cs, 2**56, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
            )
        elif kind == 1:
            v = c.choice([cs - 1, cs, cs + 1, cs + 512, 2 * cs, cs // 2, size, size - 1])
            v = c.choice([v, _align(size, cs), _align(size, cs) + cs * c.integer(1, 4)])
        elif kind == 2:
            v = c.choice(self.metadata_offsets())
        elif kind == 3:
            v = c.choice(
                [current + 1, current - 1, current * 2, current + cs, current | 0x200]
                + [current ^ (1 << c.integer(0, 8 * width - 1)), current >> 1]
            )
        elif kind == 4:
            v = c.integer(0, (1 << (8 * width)) - 1)
        else:
            v = current + c.integer(-8, 8)
        return v % (1 << (8 * width))

    def entry_value(self, current: int) -> int:
        """A corrupt table entry: unaligned, past the end of the file, at other metadata or at
        the header, reserved or compressed bits set, or anything."""
        c, cs = self.c, self.layout.cluster_size
        offset = current & 0x00FFFFFFFFFFFE00
        how = c.integer(0, 8)
        if how == 0:
            v = current | c.integer(1, 0x1FF)
        elif how == 1:
            v = current + c.choice([512, cs // 2, -512])
        elif how == 2:
            v = (current & ~0x00FFFFFFFFFFFE00) | (
                _align(len(self.data), cs) + cs * c.integer(0, 3)
            )
        elif how == 3:
            v = c.choice(self.metadata_offsets()) | (current & (1 << 63))
        elif how == 4:
            v = c.choice([0x200, cs // 2, 1 << 63, (1 << 63) | 0x200, 0])
        elif how == 5:
            v = current | (1 << c.choice([1, 2, 8, 56, 57, 60, 61, 62]))
        elif how == 6:
            v = offset | c.choice([2**56 - cs, 2**55, 2**48, 0x00FFFFFFFFFFFE00])
        elif how == 7:
            v = c.choice([2**64 - 1, 2**63 - 1, 0x00FFFFFFFFFFFE00, 2**56 - cs])
        else:
            v = c.integer(0, 2**64 - 1)
        return v % (1 << 64)

    # -- poking --------------------------------------------------------------------------------

    def read(self, offset: int, width: int) -> int:
        chunk = bytes(self.data[offset : offset + width])
        return int.from_bytes(chunk + bytes(width - len(chunk)), "big")

    def poke(self, what: str, offset: int, width: int, value: int) -> None:
        if offset < 0:
            return
        old = self.read(offset, width)
        end = offset + width
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = value.to_bytes(width, "big")
        self.ops.append(f"{what} @{offset:#x} ({width} bytes): {old:#x} -> {value:#x}")

    # -- operations ----------------------------------------------------------------------------

    def header_field(self) -> None:
        name, offset, width = self.c.choice(HEADER_FIELDS)
        self.poke(f"header.{name}", offset, width, self.value(width, self.read(offset, width)))

    def header_bytes(self) -> None:
        c = self.c
        end = min(self.layout.cluster_size, len(self.data))
        exts_end = max(
            [e.offset + 8 + e.length for e in self.layout.extensions]
            + [112, self.layout.backing_file_offset + len(self.layout.backing_file or "")]
        )
        offset = c.integer(0, max(0, min(end, exts_end + 64) - 1))
        n = c.integer(1, 8)
        self.poke("header bytes", offset, n, c.integer(0, (1 << (8 * n)) - 1))

    def feature_bit(self) -> None:
        """Flip a feature bit: a known one (dirty, corrupt, external data file, compression
        type, extended L2, lazy refcounts, bitmaps, raw external data) or any other."""
        c = self.c
        name, offset = c.choice(
            [("incompatible_features", 72), ("compatible_features", 80), ("autoclear_features", 88)]
        )
        bit = c.choice([0, 1, 2, 3, 4, c.integer(0, 63)])
        old = self.read(offset, 8)
        self.poke(f"header.{name} bit {bit}", offset, 8, old ^ (1 << bit))

    def add_extension(self) -> None:
        """Write one more header extension where the end marker was: a crypto header (and
        crypt_method 2), an external data file name, a second bitmaps extension, a backing format,
        a feature name table, or a copy of an existing extension; bytes are partly random."""
        c, layout = self.c, self.layout
        cs = layout.cluster_size
        pos = layout.header_length if layout.version == 3 else 72
        for e in layout.extensions:
            pos = max(pos, e.offset + 8 + _align(e.length, 8))
        magic = c.choice(
            [EXT_CRYPTO, EXT_DATA_FILE, EXT_BITMAPS, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, 0]
        )
        rng = random.Random(c.integer(0, 1 << 16))
        if magic == EXT_CRYPTO:
            offset = c.choice([cs, _align(len(self.data), cs), 0, self.value(8, cs)])
            length = c.choice([0, 1, 592, cs, 2 * cs + 1, 2**40, 2**63, self.value(8, cs)])
            data = struct.pack(">QQ", offset, length)[: c.choice([16, 16, 8, 24])]
            if c.boolean():
                self.poke("header.crypt_method", 32, 4, 2)
        elif magic == EXT_BITMAPS:
            data = struct.pack(
                ">IIQQ",
                c.choice([1, 2, 0, 65536]),
                0,
                c.choice([24, 32, 0, cs]),
                c.choice(self.metadata_offsets() + [cs, _align(len(self.data), cs)]),
            )
            if c.boolean():
                self.poke("header.autoclear_features", 88, 8, self.read(88, 8) | 1)
        elif magic in (EXT_DATA_FILE, EXT_BACKING_FORMAT):
            data = rng.randbytes(c.choice([0, 1, 15, 16, 17, 100]))
            if magic == EXT_DATA_FILE and c.boolean():
                self.poke("header.incompatible_features", 72, 8, self.read(72, 8) | 4)
        elif magic == EXT_FEATURE_TABLE:
            data = rng.randbytes(c.choice([48, 96, 47, 49, 0]))
        else:
            exts = layout.extensions
            if not exts:
                return self.header_bytes()
            e = c.choice(exts)
            magic = e.magic
            data = bytes(self.data[e.offset + 8 : e.offset + 8 + e.length])
        record = struct.pack(">II", magic, len(data)) + data + bytes(-len(data) % 8) + bytes(8)
        if pos + len(record) > min(cs, len(self.data)):
            return self.header_field()
        self.data[pos : pos + len(record)] = record
        self.ops.append(f"add extension {magic:#x} ({len(data)} bytes) @{pos:#x}: {data.hex()}")

    def truncate(self) -> None:
        c, cs = self.c, self.layout.cluster_size
        size = len(self.data)
        how = c.integer(0, 3)
        if how == 0:
            new = c.integer(0, max(0, size - 1))
        elif how == 1:
            new = cs * c.integer(0, max(0, (size - 1) // cs))
        elif how == 2:
            new = c.choice([0, 7, 8, 71, 72, 103, 104, 111, 112, 511, 512])
        else:
            new = max(0, size - c.choice([1, 512, cs, cs + 1]))
        new = min(new, size)
        del self.data[new:]
        self.ops.append(f"truncate the file from {size:#x} to {new:#x} bytes")

    def extend(self) -> None:
        c = self.c
        n = c.integer(1, 2 * self.layout.cluster_size)
        fill = bytes(n) if c.boolean() else random.Random(n).randbytes(n)
        self.data += fill
        self.ops.append(f"append {n:#x} {'zero' if not any(fill) else 'random'} bytes")

    def table_entry(self) -> None:
        c = self.c
        tables = [t for t in self.layout.tables if t.entries]
        if not tables:
            return self.header_field()
        t = c.choice(tables)
        used = [i for i in range(min(t.entries, 4096)) if self.read(t.offset + i * t.entry_size, 8)]
        i = c.choice(used) if used and not c.rarely() else c.integer(0, t.entries - 1)
        at = t.offset + i * t.entry_size
        if t.entry_size == 16 and c.rarely():
            self.poke(f"{t.name}[{i}] bitmap", at + 8, 8, c.integer(0, 2**64 - 1))
        else:
            self.poke(f"{t.name}[{i}]", at, 8, self.entry_value(self.read(at, 8)))

    def snapshot_field(self) -> None:
        c = self.c
        if not self.layout.snapshots:
            return self.table_entry()
        s = c.choice(self.layout.snapshots)
        name, offset, width = c.choice(SNAPSHOT_FIELDS)
        at = s.entry_offset + offset
        self.poke(f"snapshot '{s.id}'.{name}", at, width, self.value(width, self.read(at, width)))

    def bitmap_field(self) -> None:
        c = self.c
        ext = [e for e in self.layout.extensions if e.magic == EXT_BITMAPS]
        if not self.layout.bitmaps or not ext:
            return self.extension_field()
        if c.boolean():
            name, offset, width = c.choice(BITMAPS_EXT_FIELDS)
            at = ext[0].offset + 8 + offset
            what = f"bitmaps extension.{name}"
        else:
            b = c.choice(self.layout.bitmaps)
            name, offset, width = c.choice(BITMAP_FIELDS)
            at = b.entry_offset + offset
            what = f"bitmap '{b.name}'.{name}"
        self.poke(what, at, width, self.value(width, self.read(at, width)))

    def extension_field(self) -> None:
        c = self.c
        exts = self.layout.extensions
        if not exts:
            return self.header_bytes()
        e = c.choice(exts)
        if c.boolean():
            magic = c.choice([*KNOWN_EXTENSIONS, c.integer(0, 0xFFFFFFFF)])
            self.poke(f"extension {e.magic:#x} magic", e.offset, 4, magic)
        else:
            cs = self.layout.cluster_size
            length = c.choice(
                [0, 1, e.length - 1, e.length + 1, e.length + 8, cs, cs - e.offset - 8]
                + [cs - e.offset - 7, 0x7FFFFFFF, 0xFFFFFFFF, c.integer(0, 0xFFFFFFFF)]
            )
            self.poke(f"extension {e.magic:#x} length", e.offset + 4, 4, length % (1 << 32))

    def metadata_bytes(self) -> None:
        c = self.c
        meta = [s for s in self.layout.structures if s.types and s.length]
        s = c.choice(meta)
        offset = s.offset + c.integer(0, min(s.length, s.clusters * self.layout.cluster_size) - 1)
        n = c.integer(1, 8)
        self.poke(f"bytes of the {s.name}", offset, n, c.integer(0, (1 << (8 * n)) - 1))

    def run(self) -> CorruptedImage:
        ops = [
            self.header_field,
            self.table_entry,
            self.snapshot_field,
            self.bitmap_field,
            self.extension_field,
            self.feature_bit,
            self.add_extension,
            self.metadata_bytes,
            self.header_bytes,
            self.truncate,
            self.extend,
        ]
        for _ in range(self.c.integer(1, 3)):
            self.c.choice(ops)()
        return CorruptedImage(bytes(self.data), self.image, tuple(self.ops))


@st.composite
def corrupted_images(
    draw: st.DrawFn, base: st.SearchStrategy[GeneratedImage] | None = None
) -> CorruptedImage:
    """A hypothesis strategy for broken qcow2 images, as :class:`CorruptedImage`.

    Draws a valid image from *base* (default: :func:`qcow2_images` with its defaults) and
    applies one to three corruptions, each described in :attr:`CorruptedImage.operations`:

    - a header field set to a boundary value (0, 1, 2^31, 2^63, all ones, ...), a pointer-like
      value (the file size, past its end, the offset of other metadata), a neighbour of its
      value or a random one; or random bytes anywhere in the header and extension area;
    - an entry of the active or a snapshot L1 table, an L2 table, the refcount table or a
      bitmap table made unaligned, pointing past the end of the file, at the header or at other
      metadata, with reserved or the compressed bit set, or random;
    - a snapshot table field (L1 offset and size, ID and name lengths, extra data size, ...);
    - a bitmap directory field or a bitmaps extension field;
    - a header extension's magic (turned into another known one, the end marker, or random) or
      length (0, off by one, to the end of the cluster, huge);
    - random bytes inside any metadata structure (refcount blocks included);
    - truncation of the file (anywhere, at a cluster boundary, inside the header) or appended
      zeros or garbage.

    The result may still be a valid image (a corruption can be harmless); readers must either
    open it or refuse it cleanly.
    """
    image = draw(base if base is not None else qcow2_images())
    return _Corrupter(_DrawChooser(draw), image).run()


def random_corruption(image: GeneratedImage, seed: int) -> CorruptedImage:
    """The corruptions of :func:`corrupted_images`, applied to *image* from *seed* without
    hypothesis (deterministic)."""
    return _Corrupter(_RandomChooser(seed), image).run()
