"""Malformed images (in the manner of QEMU's iotest 080): `qcow2ovl.open` must refuse each with
the right exception class and a message that begins with QEMU's phrase.

Every case is a valid QEMU-made image with a few header or table bytes poked. Each case is
checked twice: `test_qemu_agrees` proves against QEMU 10 that the poked image is really broken in
the intended way (it runs without the scanner), and `test_open_rejects` checks qcow2ovl.

Snapshot L1 problems are found by QEMU only when the snapshot is loaded (`qemu-img convert -l`),
not at open; qcow2ovl reads every snapshot L1 table at open (for INACTIVE_L2), so it must refuse
such images at open with QEMU's snapshot-load phrase.

Which errors are "valid but unsupported" (UnsupportedError) rather than malformed (FormatError)
follows the format layer's `FormatError::is_unsupported` (src/format/error.rs): unknown
incompatible features, any version other than 2 and 3, cluster_bits above 21 (the spec allows
them; QEMU does not), subclusters below 512 bytes, unknown compression or encryption methods.
cluster_bits below 9 is malformed.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oracle
import pytest
import qcow2ovl
import qemu_images as qi

# QEMU is the oracle: these tests need qemu-img and qemu-io and fail without them (.ci/run
# installs qemu-utils).

# Header field offsets (docs/design/architecture.md, "On-disk facts").
BACKING_FILE_OFFSET = 8
BACKING_FILE_SIZE = 16
CLUSTER_BITS = 20
SIZE = 24
CRYPT_METHOD = 32
L1_SIZE = 36
L1_TABLE_OFFSET = 40
REFCOUNT_TABLE_OFFSET = 48
REFCOUNT_TABLE_CLUSTERS = 56
NB_SNAPSHOTS = 60
SNAPSHOTS_OFFSET = 64
INCOMPATIBLE = 72
COMPATIBLE = 80
AUTOCLEAR = 88
REFCOUNT_ORDER = 96
HEADER_LENGTH = 100
COMPRESSION_TYPE = 104

CS = 65536  # the base images use the default cluster size


def _errors() -> dict[str, Any]:
    """The package's exception classes, looked up at test time (collection must not need them)."""
    fmt = qcow2ovl.FormatError
    unsup = qcow2ovl.UnsupportedError
    return {"format": fmt, "unsupported": unsup}


# ---- base images ------------------------------------------------------------------------------


def _make_base(directory: Path, base: str) -> Path:
    """'plain': 64 MiB v3 image with one written cluster (like iotest 080);
    'snapshot': the same plus an internal snapshot 'test'; 'bitmaps': one persistent bitmap."""
    path = directory / f"{base}.qcow2"
    ref = qi.create(path, 64 * qi.MiB)
    qi.write(ref, [(0, 512, 0xAB)])
    if base == "snapshot":
        qi.snapshot_create(path, "test")
    elif base == "bitmaps":
        qi.bitmap_add(path, "b0")
        qi.write(ref, [(1 * qi.MiB, 64 * qi.KiB, 0xCD)])
    return path


_BASES: dict[str, Path] = {}


@pytest.fixture
def base_copy(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Callable[[str], Path]:
    """Returns a function giving a fresh copy of a base image (built once per session)."""

    def get(base: str) -> Path:
        if base not in _BASES:
            _BASES[base] = _make_base(tmp_path_factory.mktemp(f"base-{base}"), base)
        dst = tmp_path / f"{base}.qcow2"
        shutil.copyfile(_BASES[base], dst)
        return dst

    return get


def _ext_offset(path: Path, magic: int) -> int:
    """File offset of the header extension `magic` (its 8-byte header), found by the oracle."""
    o = oracle.Oracle.from_path(path)
    for ext in o.extensions:
        if ext.magic == magic:
            return ext.offset - 8
    raise AssertionError(f"no extension {magic:#x} in {path}")


def _ext_end(path: Path) -> int:
    """File offset of the end-of-extensions marker."""
    o = oracle.Oracle.from_path(path)
    if not o.extensions:
        return o.header.header_length
    last = o.extensions[-1]
    return last.offset + (len(last.data) + 7) // 8 * 8


def _snapshot_entry(path: Path) -> int:
    return int(qi.peek(path, SNAPSHOTS_OFFSET, ">Q")[0])


def _feature_entry(path: Path, index: int) -> int:
    """File offset of entry `index` of the feature name table (48 bytes each)."""
    return _ext_offset(path, oracle.EXT_FEATURE_TABLE) + 8 + 48 * index


# ---- pokes ------------------------------------------------------------------------------------

Poke = Callable[[Path], None]


def p(offset: int, fmt: str, *values: object) -> Poke:
    """A poke of a fixed header field."""

    def do(path: Path) -> None:
        qi.poke(path, offset, fmt, *values)

    return do


def seq(*pokes: Poke) -> Poke:
    def do(path: Path) -> None:
        for one in pokes:
            one(path)

    return do


def ext_too_large(length: int, with_backing_offset: bool) -> Poke:
    """Turn the first extension into an unknown one with a huge length. With
    `with_backing_offset`, the extension area also ends right after its length field
    (backing_file_offset points there), as in iotest 080."""

    def do(path: Path) -> None:
        start = oracle.Oracle.from_path(path).header.header_length
        qi.poke(path, start, ">II", 0x12345678, length)
        if with_backing_offset:
            qi.poke(path, BACKING_FILE_OFFSET, ">Q", start + 8)

    return do


def name_feature(index: int, ftype: int, bit: int, name: bytes) -> Poke:
    """Rewrite entry `index` of the feature name table as (type, bit, name)."""

    def do(path: Path) -> None:
        entry = _feature_entry(path, index)
        qi.poke(path, entry, ">BB46s", ftype, bit, name)

    return do


def hide_feature_table(path: Path) -> None:
    """Give the feature name table an unknown magic: QEMU then skips it like any unknown one."""
    qi.poke(path, _ext_offset(path, oracle.EXT_FEATURE_TABLE), ">I", 0x12345678)


def snapshot_entry(field_offset: int, fmt: str, *values: object) -> Poke:
    def do(path: Path) -> None:
        qi.poke(path, _snapshot_entry(path) + field_offset, fmt, *values)

    return do


def add_unknown_extension(path: Path) -> None:
    end = _ext_end(path)
    qi.poke(path, end, ">II8sII", 0x12345678, 5, b"hello\0\0\0", 0, 0)


# ---- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    poke: Poke
    error: str  # "format" | "unsupported"
    phrase: str  # regex qcow2ovl's message must match from its start
    qemu: str | None  # what QEMU 10 says at open (prefix); None: QEMU opens the image
    qemu_snapshot: str | None = None  # what QEMU says loading snapshot 'test' (prefix)


def lit(phrase: str) -> str:
    return "^" + re.escape(phrase)


UNSUPPORTED_FEATURE = r"^Unsupported qcow2 feature\(s\):"

# fmt: off
CASES = [
    # -- header size and backing file offset
    Case("header_length_ffffffff", "plain", p(HEADER_LENGTH, ">I", 0xFFFFFFFF), "format",
         lit("qcow2 header exceeds cluster size"), "qcow2 header exceeds cluster size"),
    Case("header_length_7fffffff", "plain", p(HEADER_LENGTH, ">I", 0x7FFFFFFF), "format",
         lit("qcow2 header exceeds cluster size"), "qcow2 header exceeds cluster size"),
    Case("header_length_cluster_plus_8", "plain", p(HEADER_LENGTH, ">I", CS + 8), "format",
         lit("qcow2 header exceeds cluster size"), "qcow2 header exceeds cluster size"),
    Case("header_length_96", "plain", p(HEADER_LENGTH, ">I", 96), "format",
         lit("qcow2 header too short"), "qcow2 header too short"),
    Case("backing_offset_all_ones", "plain", p(BACKING_FILE_OFFSET, ">Q", 2**64 - 1), "format",
         lit("Invalid backing file offset"), "Invalid backing file offset"),
    Case("backing_offset_past_cluster", "plain", p(BACKING_FILE_OFFSET, ">Q", CS + 512),
         "format", lit("Invalid backing file offset"), "Invalid backing file offset"),
    # -- header extensions
    Case("extension_7fffffff", "plain", ext_too_large(0x7FFFFFFF, False), "format",
         lit("Header extension too large"), "Header extension too large"),
    Case("extension_ffffffff", "plain", ext_too_large(0xFFFFFFFF, False), "format",
         lit("Header extension too large"), "Header extension too large"),
    Case("extension_past_backing_offset", "plain", ext_too_large(0x7FFFFFFF, True), "format",
         lit("Header extension too large"), "Header extension too large"),
    Case("extension_one_past_cluster", "plain", ext_too_large(CS - 112 - 8 + 1, False),
         "format", lit("Header extension too large"), "Header extension too large"),
    # -- refcount table
    Case("reftable_clusters_ffffffff", "plain", p(REFCOUNT_TABLE_CLUSTERS, ">I", 0xFFFFFFFF),
         "format", lit("Reference count table too large"), "Reference count table too large"),
    Case("reftable_clusters_129", "plain", p(REFCOUNT_TABLE_CLUSTERS, ">I", 129), "format",
         lit("Reference count table too large"), "Reference count table too large"),
    Case("reftable_offset_unaligned", "plain",
         p(REFCOUNT_TABLE_OFFSET, ">Q", 0x1234567890ABCDEF), "format",
         lit("Reference count table offset invalid"), "Reference count table offset invalid"),
    Case("reftable_offset_overflow", "plain",
         seq(p(REFCOUNT_TABLE_OFFSET, ">Q", 0xFFFFFFFFFFFF0000),
             p(REFCOUNT_TABLE_CLUSTERS, ">I", 0x7F)), "format",
         lit("Reference count table offset invalid"), "Reference count table offset invalid"),
    Case("no_reftable", "plain", p(REFCOUNT_TABLE_CLUSTERS, ">I", 0), "format",
         lit("Image does not contain a reference count table"),
         "Image does not contain a reference count table"),
    Case("refcount_order_7", "plain", p(REFCOUNT_ORDER, ">I", 7), "format",
         lit("Reference count entry width too large; may not exceed 64 bits"),
         "Reference count entry width too large; may not exceed 64 bits"),
    # -- snapshot table
    Case("nb_snapshots_ffffffff", "plain", p(NB_SNAPSHOTS, ">I", 0xFFFFFFFF), "format",
         lit("Snapshot table too large"), "Snapshot table too large"),
    Case("nb_snapshots_7fffffff", "plain", p(NB_SNAPSHOTS, ">I", 0x7FFFFFFF), "format",
         lit("Snapshot table too large"), "Snapshot table too large"),
    Case("nb_snapshots_65537", "plain", p(NB_SNAPSHOTS, ">I", 65537), "format",
         lit("Snapshot table too large"), "Snapshot table too large"),
    Case("snapshots_offset_overflow", "plain",
         seq(p(SNAPSHOTS_OFFSET, ">Q", 0xFFFFFFFFFFFF0000), p(NB_SNAPSHOTS, ">I", 0xFFFF)),
         "format", lit("Snapshot table offset invalid"), "Snapshot table offset invalid"),
    Case("snapshots_offset_unaligned_none", "plain",
         p(SNAPSHOTS_OFFSET, ">Q", 0x1234567890ABCDEF), "format",
         lit("Snapshot table offset invalid"), "Snapshot table offset invalid"),
    Case("snapshots_offset_unaligned_one", "snapshot",
         p(SNAPSHOTS_OFFSET, ">Q", 0x70200), "format",
         lit("Snapshot table offset invalid"), "Snapshot table offset invalid"),
    # -- active L1 table
    Case("l1_size_ffffffff", "plain", p(L1_SIZE, ">I", 0xFFFFFFFF), "format",
         lit("Active L1 table too large"), "Active L1 table too large"),
    Case("l1_size_7fffffff", "plain", p(L1_SIZE, ">I", 0x7FFFFFFF), "format",
         lit("Active L1 table too large"), "Active L1 table too large"),
    Case("l1_size_400001", "plain", p(L1_SIZE, ">I", 0x400001), "format",
         lit("Active L1 table too large"), "Active L1 table too large"),
    Case("l1_offset_overflow", "plain",
         seq(p(L1_TABLE_OFFSET, ">Q", 0x7FFFFFFFFFFF0000), p(L1_SIZE, ">I", 0xFFFF)), "format",
         lit("Active L1 table offset invalid"), "Active L1 table offset invalid"),
    Case("l1_offset_unaligned", "plain",
         seq(p(L1_TABLE_OFFSET, ">Q", 0x1234567890ABCDEF), p(L1_SIZE, ">I", 1)), "format",
         lit("Active L1 table offset invalid"), "Active L1 table offset invalid"),
    Case("l1_size_0", "plain", p(L1_SIZE, ">I", 0), "format",
         lit("L1 table is too small"), "L1 table is too small"),
    Case("l1_size_0_with_snapshot", "snapshot", p(L1_SIZE, ">I", 0), "format",
         lit("L1 table is too small"), "L1 table is too small"),
    Case("l1_too_small_for_size", "plain", p(SIZE, ">Q", (512 << 20) + 1), "format",
         lit("L1 table is too small"), "L1 table is too small"),
    # -- backing file name
    Case("backing_name_ffffffff", "plain",
         seq(p(BACKING_FILE_OFFSET, ">Q", 0x1000), p(BACKING_FILE_SIZE, ">I", 0xFFFFFFFF)),
         "format", lit("Backing file name too long"), "Backing file name too long"),
    Case("backing_name_1024", "plain",
         seq(p(BACKING_FILE_OFFSET, ">Q", 0x1000), p(BACKING_FILE_SIZE, ">I", 1024)),
         "format", lit("Backing file name too long"), "Backing file name too long"),
    Case("backing_name_past_cluster", "plain",
         seq(p(BACKING_FILE_OFFSET, ">Q", CS - 256), p(BACKING_FILE_SIZE, ">I", 512)),
         "format", lit("Backing file name too long"), "Backing file name too long"),
    # -- snapshot L1 tables (QEMU: at snapshot load; qcow2ovl: at open)
    Case("snapshot_l1_size_400001", "snapshot", snapshot_entry(8, ">I", 0x400001), "format",
         lit("Snapshot L1 table too large"), None,
         "Failed to load snapshot: Snapshot L1 table too large"),
    Case("snapshot_l1_size_10000000", "snapshot", snapshot_entry(8, ">I", 0x10000000),
         "format", lit("Snapshot L1 table too large"), None,
         "Failed to load snapshot: Snapshot L1 table too large"),
    Case("snapshot_l1_offset_unaligned", "snapshot", snapshot_entry(0, ">Q", 0x400200),
         "format", lit("Snapshot L1 table offset invalid"), None,
         "Failed to load snapshot: Snapshot L1 table offset invalid"),
    Case("snapshot_l1_offset_overflow", "snapshot",
         seq(snapshot_entry(0, ">Q", 0x7FFFFFFFFFFF0000), snapshot_entry(8, ">I", 0xFFFF)),
         "format", lit("Snapshot L1 table offset invalid"), None,
         "Failed to load snapshot: Snapshot L1 table offset invalid"),
    # -- magic, version, cluster size
    Case("bad_magic", "plain", p(0, ">I", 0x12345678), "format",
         lit("Image is not in qcow2 format"), "Image is not in qcow2 format"),
    Case("version_0", "plain", p(4, ">I", 0), "unsupported",
         lit("Unsupported qcow2 version 0"), "Unsupported qcow2 version 0"),
    Case("version_1", "plain", p(4, ">I", 1), "unsupported",
         lit("Unsupported qcow2 version 1"), "Unsupported qcow2 version 1"),
    Case("version_4", "plain", p(4, ">I", 4), "unsupported",
         lit("Unsupported qcow2 version 4"), "Unsupported qcow2 version 4"),
    Case("cluster_bits_8", "plain", p(CLUSTER_BITS, ">I", 8), "format",
         lit("Unsupported cluster size: 2^8"), "Unsupported cluster size: 2^8"),
    Case("cluster_bits_22", "plain", p(CLUSTER_BITS, ">I", 22), "unsupported",
         lit("Unsupported cluster size: 2^22"), "Unsupported cluster size: 2^22"),
    Case("extended_l2_cluster_512", "plain",
         seq(p(INCOMPATIBLE, ">Q", 1 << 4), p(CLUSTER_BITS, ">I", 9)), "unsupported",
         lit("Unsupported subcluster size: 16"), "Unsupported subcluster size: 16"),
    # -- feature bits
    Case("incompatible_bit5_unnamed", "plain",
         seq(hide_feature_table, p(INCOMPATIBLE, ">Q", 1 << 5)), "unsupported",
         UNSUPPORTED_FEATURE + r".*Unknown incompatible feature: (0x)?20\b",
         "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"),
    Case("incompatible_bit63_unnamed", "plain", p(INCOMPATIBLE, ">Q", 1 << 63), "unsupported",
         UNSUPPORTED_FEATURE + r".*Unknown incompatible feature: (0x)?8000000000000000\b",
         "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000"),
    Case("incompatible_bit5_named", "plain",
         seq(name_feature(7, 0, 5, b"my magic feature"), p(INCOMPATIBLE, ">Q", 1 << 5)),
         "unsupported", UNSUPPORTED_FEATURE + r".*my magic feature",
         "Unsupported qcow2 feature(s): my magic feature"),
    Case("incompatible_bits56_one_named", "plain",
         seq(name_feature(7, 0, 5, b"my magic feature"), p(INCOMPATIBLE, ">Q", 3 << 5)),
         "unsupported",
         UNSUPPORTED_FEATURE + r".*my magic feature.*Unknown incompatible feature: (0x)?40\b",
         "Unsupported qcow2 feature(s): my magic feature, Unknown incompatible feature: 40"),
    Case("incompatible_bit5_named_as_compatible", "plain",
         seq(name_feature(7, 1, 5, b"my magic feature"), p(INCOMPATIBLE, ">Q", 1 << 5)),
         "unsupported", UNSUPPORTED_FEATURE + r".*Unknown incompatible feature: (0x)?20\b",
         "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"),
    # -- compression type and encryption
    Case("compression_type_2", "plain",
         seq(p(INCOMPATIBLE, ">Q", 1 << 3), p(COMPRESSION_TYPE, ">B", 2)), "unsupported",
         r"^(qcow2: )?[Uu]nknown compression type", "qcow2: unknown compression type: 2"),
    Case("compression_type_without_bit", "plain", p(COMPRESSION_TYPE, ">B", 1), "format",
         r"^(qcow2: )?Compression type incompatible feature bit must be set",
         "qcow2: Compression type incompatible feature bit must be set"),
    Case("compression_bit_without_type", "plain", p(INCOMPATIBLE, ">Q", 1 << 3), "format",
         r"^(qcow2: )?Compression type incompatible feature bit must not be set",
         "qcow2: Compression type incompatible feature bit must not be set"),
    Case("crypt_method_3", "plain", p(CRYPT_METHOD, ">I", 3), "unsupported",
         lit("Unsupported encryption method"), "Unsupported encryption method 3"),
    Case("luks_without_crypto_header", "plain", p(CRYPT_METHOD, ">I", 2), "format",
         lit("Missing CRYPTO header for crypt method 2"),
         "Missing CRYPTO header for crypt method 2"),
]
# fmt: on

_IDS = [c.id for c in CASES]
assert len(set(_IDS)) == len(_IDS)


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_qemu_agrees(case: Case, base_copy: Callable[[str], Path]) -> None:
    """The poked image is broken the intended way, according to QEMU 10 itself."""
    path = base_copy(case.base)
    case.poke(path)
    got = qi.qemu_open_error(path)
    if case.qemu is None:
        assert got is None, f"QEMU refuses to open: {got}"
    else:
        assert got is not None and got.startswith(case.qemu), got
        # the phrase we demand from qcow2ovl matches QEMU's own words
        assert re.search(case.phrase, got), (case.phrase, got)
    if case.qemu_snapshot is not None:
        snap = qi.qemu_snapshot_load_error(path, "test")
        assert snap is not None and snap.startswith(case.qemu_snapshot), snap
        assert re.search(case.phrase, snap.removeprefix("Failed to load snapshot: "))


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_open_rejects(case: Case, base_copy: Callable[[str], Path]) -> None:
    path = base_copy(case.base)
    case.poke(path)
    before = qi.sha256_file(path)
    expected = _errors()[case.error]
    if case.qemu is None:
        # QEMU opens the image and fails only when the snapshot is used: so do we, read-only,
        # with the problem reported; a writer must stay away (its tables cannot be protected).
        with qcow2ovl.open(path) as img:
            problems = [p for p in img.problems if p.kind == "unusable-snapshot"]
            assert problems, img.problems
            assert re.search(case.phrase[1:], problems[0].message), problems[0].message
        with pytest.raises(qcow2ovl.CorruptImageError, match="cannot be opened read/write"):
            qcow2ovl.open(path, writable=True)
        assert qi.sha256_file(path) == before, "an open changed the file"
        return
    with pytest.raises(expected) as info:
        qcow2ovl.open(path)
    # Messages name the file first, as qemu-img's do; QEMU's phrase follows.
    message = str(info.value)
    prefix = f"{path}: "
    assert message.startswith(prefix), message
    assert re.search(case.phrase, message[len(prefix) :]), (case.phrase, message)
    assert isinstance(info.value, qcow2ovl.Qcow2Error)
    if case.error == "format":
        assert isinstance(info.value, ValueError)
    assert qi.sha256_file(path) == before, "a failed open changed the file"


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_inspect_calls_it_unsafe(case: Case, base_copy: Callable[[str], Path]) -> None:
    """Every malformed header or table an upload could carry gets a verdict, unsafe, with the
    refusal (or the scan's problem) as its reason; the file is not changed."""
    path = base_copy(case.base)
    case.poke(path)
    before = qi.sha256_file(path)
    verdict = qcow2ovl.inspect(path)
    assert not verdict.safe and verdict.readable, verdict
    # Without its magic the file is not judged as qcow2 at all.
    phrase = "^not a qcow2 image" if case.id == "bad_magic" else case.phrase
    assert any(re.search(phrase.removeprefix("^"), r) for r in verdict.reasons), verdict.reasons
    assert qi.sha256_file(path) == before


# ---- files that are not qcow2 at all ----------------------------------------------------------


def _garbage(kind: str, directory: Path, base_copy: Callable[[str], Path]) -> Path:
    path = directory / f"{kind}.img"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "zeros_1m":
        path.write_bytes(bytes(1 << 20))
    elif kind == "random_1m":
        path.write_bytes(random.Random(20150901).randbytes(1 << 20))
    elif kind == "random_with_magic":
        data = bytearray(random.Random(7).randbytes(1 << 20))
        # magic, version 3, no backing file, 64 KiB clusters, no encryption, no incompatible
        # features (so nothing is merely unsupported); every other field random
        data[0:24] = struct.pack(">IIQII", oracle.QCOW_MAGIC, 3, 0, 0, 16)
        data[CRYPT_METHOD : CRYPT_METHOD + 4] = bytes(4)
        data[INCOMPATIBLE : INCOMPATIBLE + 8] = bytes(8)
        path.write_bytes(bytes(data))
    elif kind.startswith("truncated_"):
        n = int(kind.split("_")[1])
        path.write_bytes(base_copy("plain").read_bytes()[:n])
    else:
        raise AssertionError(kind)
    return path


GARBAGE = [
    # (kind, phrase qcow2ovl must give or None for any, what QEMU 10 says)
    ("empty", None, "Image is not in qcow2 format"),
    ("zeros_1m", lit("Image is not in qcow2 format"), "Image is not in qcow2 format"),
    ("random_1m", lit("Image is not in qcow2 format"), "Image is not in qcow2 format"),
    ("random_with_magic", None, "qcow2 header exceeds cluster size"),
    ("truncated_50", None, "qcow2 header too short"),
    ("truncated_100", None, "qcow2 header too short"),
]


@pytest.mark.parametrize(("kind", "phrase", "qemu"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_qemu_refuses_garbage(
    kind: str,
    phrase: str | None,
    qemu: str | None,
    tmp_path: Path,
    base_copy: Callable[[str], Path],
) -> None:
    path = _garbage(kind, tmp_path, base_copy)
    got = qi.qemu_open_error(path)
    assert got is not None, "QEMU opened garbage"
    if qemu is not None:
        assert got.startswith(qemu), got


@pytest.mark.parametrize(("kind", "phrase", "qemu"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_open_rejects_garbage(
    kind: str,
    phrase: str | None,
    qemu: str | None,
    tmp_path: Path,
    base_copy: Callable[[str], Path],
) -> None:
    path = _garbage(kind, tmp_path, base_copy)
    with pytest.raises(qcow2ovl.FormatError) as info:
        qcow2ovl.open(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    if phrase is not None:
        assert re.search(phrase, message.removeprefix(f"{path}: ")), (phrase, message)


# ---- odd but valid: QEMU opens these, and so must qcow2ovl -------------------------------------


def clear_autoclear(path: Path) -> None:
    qi.poke(path, AUTOCLEAR, ">Q", 0)


ACCEPTED = [
    ("corrupt_bit", "plain", p(INCOMPATIBLE, ">Q", 1 << 1)),
    ("unknown_compatible_bit", "plain", p(COMPATIBLE, ">Q", 1 << 5)),
    ("unknown_autoclear_bit", "plain", p(AUTOCLEAR, ">Q", 1 << 5)),
    ("unknown_extension", "plain", add_unknown_extension),
    ("header_length_104", "plain", p(HEADER_LENGTH, ">I", 104)),
    ("l1_size_larger_than_needed", "plain", p(L1_SIZE, ">I", 2)),
    # bitmaps extension with autoclear bit 0 clear: stale, so directory and tables are no
    # metadata any more (BITMAP_DIRECTORY / BITMAP_TABLE vanish from the map)
    ("bitmaps_autoclear_clear", "bitmaps", clear_autoclear),
]


@pytest.mark.parametrize(("name", "base", "poke"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_qemu_accepts(name: str, base: str, poke: Poke, base_copy: Callable[[str], Path]) -> None:
    path = base_copy(base)
    poke(path)
    assert qi.qemu_open_error(path) is None
    o = oracle.Oracle.from_path(path)
    if name == "bitmaps_autoclear_clear":
        assert o.bitmaps_ext is not None and not o.bitmaps_active
        assert not any(
            t & (oracle.BITMAP_DIRECTORY | oracle.BITMAP_TABLE)
            for _o, _n, t in o.metadata_extents()
        )
    if name == "unknown_extension":
        assert 0x12345678 in [e.magic for e in o.extensions]


@pytest.mark.parametrize(("name", "base", "poke"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_open_accepts(name: str, base: str, poke: Poke, base_copy: Callable[[str], Path]) -> None:
    path = base_copy(base)
    poke(path)
    before = qi.sha256_file(path)
    expected = oracle.Oracle.from_path(path).metadata_extents()
    with qcow2ovl.open(path) as img:
        got = oracle.normalize_extents(img.metadata_extents())
        assert got == expected, (
            f"qcow2ovl:\n{oracle.describe(got)}\noracle:\n{oracle.describe(expected)}"
        )
        if name == "corrupt_bit":
            assert img.info.corrupt is True
    assert qi.sha256_file(path) == before


def test_qemu_opens_corrupt_image_read_only_only(base_copy: Callable[[str], Path]) -> None:
    path = base_copy("plain")
    qi.poke(path, INCOMPATIBLE, ">Q", 1 << 1)
    assert qi.qemu_open_error(path) is None  # qemu-img info opens read-only
    out = qi.run([str(qi.QEMU_IO), "-c", "read 0 512", "-f", "qcow2", str(path)], ok=(0, 1))
    assert "Image is corrupt; cannot be opened read/write" in out.stdout + out.stderr


def test_open_corrupt_image_writable_refused(base_copy: Callable[[str], Path]) -> None:
    """A corrupt image opens read-only but not read/write ("Corrupt images" in
    docs/design/architecture.md)."""
    path = base_copy("plain")
    qi.poke(path, INCOMPATIBLE, ">Q", 1 << 1)
    before = qi.sha256_file(path)
    with pytest.raises(qcow2ovl.Qcow2Error, match=r"Image is corrupt; cannot be opened read/write"):
        qcow2ovl.open(path, writable=True)
    assert qi.sha256_file(path) == before
