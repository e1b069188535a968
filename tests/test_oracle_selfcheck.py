"""Self-checks of the test oracle and the image factory, against QEMU alone.

These run without qcow2ovl: they prove that `oracle.py` reads QEMU's images the way QEMU does,
so that when the scan tests fail, the scanner is at fault and not the oracle.

For every image kind:
- the oracle's header facts, snapshots and bitmaps equal `qemu-img info`;
- every host cluster QEMU maps guest data to (`qemu-img map`) is a data cluster to the oracle and
  never one of its metadata clusters;
- the number of active L2 tables equals the L2 tables `qemu-img map`'s allocated ranges imply;
- `qemu-img check` is clean, and then the clusters with a non-zero refcount are exactly the
  oracle's metadata clusters plus its data clusters (so no metadata is missed and none invented),
  with `image-end-offset` and `allocated-clusters` agreeing;
- COPIED flags in L1/L2 entries agree with the refcounts the oracle decodes (proves the
  refcount-width decoding, sub-byte widths included).
"""

from __future__ import annotations

import struct

import oracle
import pytest
import qemu_images as qi
from oracle import (
    ACTIVE_L1,
    ACTIVE_L2,
    BITMAP_DIRECTORY,
    BITMAP_TABLE,
    CRYPTO_HEADER,
    INACTIVE_L1,
    INACTIVE_L2,
    MAIN_HEADER,
    REFCOUNT_BLOCK,
    SNAPSHOT_TABLE,
    Oracle,
)

# QEMU is the oracle: these tests need qemu-img and qemu-io and fail without them (.ci/run
# installs qemu-utils).

KINDS = sorted(qi.KINDS)


# Kinds some checks do not apply to; each test asserts the kind really is what it is listed as.
DATA_FILE_KINDS = frozenset({"data_file", "data_file_raw"})
STALE_REFCOUNT_KINDS = frozenset({"dirty_lazy"})


@pytest.fixture(params=KINDS)
def built(request: pytest.FixtureRequest) -> qi.BuiltImage:
    return qi.get_image(request.param)


@pytest.fixture(params=[k for k in KINDS if k not in DATA_FILE_KINDS])
def built_local_data(request: pytest.FixtureRequest) -> qi.BuiltImage:
    """Images whose guest data lives in the image file itself."""
    return qi.get_image(request.param)


@pytest.fixture(params=[k for k in KINDS if k not in STALE_REFCOUNT_KINDS])
def built_clean(request: pytest.FixtureRequest) -> qi.BuiltImage:
    """Images whose refcounts are exact (qemu-img check is clean)."""
    return qi.get_image(request.param)


def test_excluded_kinds_are_what_they_claim() -> None:
    for kind in DATA_FILE_KINDS:
        assert Oracle.from_path(qi.get_image(kind).path).external_data_file
    for kind in STALE_REFCOUNT_KINDS:
        assert not qi.get_image(kind).clean


def _oracle(built: qi.BuiltImage) -> Oracle:
    return Oracle.from_path(built.path)


# ---- facts ------------------------------------------------------------------------------------


def test_header_facts_match_qemu_info(built: qi.BuiltImage) -> None:
    o = _oracle(built)
    mine = o.info()
    theirs = oracle.info_from_qemu(qi.qemu_info(built.ref))
    for key, value in theirs.items():
        assert mine[key] == value, f"{built.kind}: {key}: oracle {mine[key]!r}, QEMU {value!r}"


def test_snapshots_match_qemu_info(built: qi.BuiltImage) -> None:
    o = _oracle(built)
    info = qi.qemu_info(built.ref)
    theirs = info.get("snapshots", [])
    assert len(o.snapshots) == len(theirs) == o.header.nb_snapshots
    for sn, q in zip(o.snapshots, theirs):
        assert sn.id == q["id"]
        assert sn.name == q["name"]
        assert sn.vm_state_size == q["vm-state-size"]
        assert sn.date_sec == q["date-sec"]
        assert sn.date_nsec == q["date-nsec"]
        assert sn.vm_clock_nsec == q["vm-clock-sec"] * 10**9 + q["vm-clock-nsec"]
        if "icount" in q:
            assert sn.icount == q["icount"]
        # QEMU writes the snapshot's guest size into the extra data (v2 images included)
        assert sn.disk_size == info["virtual-size"]
        assert sn.l1_size * o.l2_entries * o.cluster_size >= info["virtual-size"]


def test_bitmaps_match_qemu_info(built: qi.BuiltImage) -> None:
    o = _oracle(built)
    data = qi.qemu_info(built.ref)["format-specific"]["data"]
    theirs = data.get("bitmaps", [])
    assert [b.name for b in o.bitmaps] == [q["name"] for q in theirs]
    for b, q in zip(o.bitmaps, theirs):
        assert b.granularity == q["granularity"]
        assert b.flag_names == q["flags"]
        assert b.type == 1
        # one table entry per bitmap cluster: ceil(virtual size / granularity / bits per cluster)
        bits = -(-o.header.size // b.granularity)
        assert b.table_size == -(-bits // (o.cluster_size * 8))


# ---- extents ------------------------------------------------------------------------------------


def test_extents_well_formed(built: qi.BuiltImage) -> None:
    o = _oracle(built)
    cs = o.cluster_size
    ext = o.metadata_extents()
    assert ext[0][0] == 0 and ext[0][2] & MAIN_HEADER
    prev_end = -1
    prev_types = -1
    for off, length, types in ext:
        assert off % cs == 0 and length % cs == 0 and length > 0
        assert off >= prev_end, "extents overlap or are unsorted"
        assert not (off == prev_end and types == prev_types), "adjacent equal extents not merged"
        assert types != 0
        prev_end, prev_types = off + length, types
    # only cluster 0 is the header
    assert [e for e in ext if e[2] & MAIN_HEADER] == [(0, cs, ext[0][2])]
    # every metadata cluster lies inside the file (QEMU never leaves metadata past EOF)
    assert prev_end <= -(-len(o.data) // cs) * cs


def test_templates_restrict_types(built: qi.BuiltImage) -> None:
    o = _oracle(built)
    full = o.cluster_types()
    cached = o.cluster_types(oracle.TEMPLATES["cached"])
    assert o.metadata_extents(oracle.TEMPLATES["none"]) == []
    assert cached == {c: t & ~INACTIVE_L2 for c, t in full.items() if t & ~INACTIVE_L2}


def test_map_data_never_overlaps_metadata(built_local_data: qi.BuiltImage) -> None:
    built = built_local_data
    o = _oracle(built)
    assert not o.external_data_file
    cs = o.cluster_size
    meta = o.cluster_types()
    data = o.data_clusters()
    ranges = oracle.host_data_ranges(qi.qemu_map(built.ref))
    if built.kind in qi.ENCRYPTED_KINDS:
        assert ranges == [], "QEMU hides host offsets of encrypted images"
    for off, length in ranges:
        for c in range(off // cs, (off + length - 1) // cs + 1):
            assert c not in meta, f"QEMU data cluster {c:#x} is oracle metadata {meta[c]:#x}"
            assert data.get(c) == "data", f"QEMU data cluster {c:#x} unknown to the oracle"


def test_active_l2_count_matches_map(built: qi.BuiltImage) -> None:
    o = _oracle(built)
    implied = oracle.l2_indices_from_map(qi.qemu_map(built.ref), o.cluster_size, o.l2_entries)
    l1 = o.active_l1()
    present = {i for i, e in enumerate(l1) if e & oracle.L1E_OFFSET_MASK}
    assert present == implied
    n_active_l2 = sum(1 for t in o.cluster_types().values() if t & ACTIVE_L2)
    assert n_active_l2 == len(implied)


# ---- accounting against refcounts and qemu-img check -----------------------------------------


def test_qemu_check(built: qi.BuiltImage) -> None:
    report = qi.qemu_check(built.ref)
    assert qi.check_is_clean(report) == built.clean, report


def test_refcounted_clusters_are_metadata_or_data(built_clean: qi.BuiltImage) -> None:
    built = built_clean
    assert built.clean
    o = _oracle(built)
    refcounted = set(o.refcounts())
    meta = set(o.cluster_types())
    data = set(o.data_clusters())
    assert not meta & data, f"clusters both metadata and data: {sorted(meta & data)}"
    assert meta | data == refcounted, (
        f"allocated but unexplained: {sorted(refcounted - meta - data)}; "
        f"explained but free: {sorted((meta | data) - refcounted)}"
    )
    report = qi.qemu_check(built.ref)
    assert report["image-end-offset"] == (max(refcounted) + 1) * o.cluster_size
    assert report.get("allocated-clusters", 0) == o.allocated_guest_clusters()


def test_copied_flags_match_refcounts(built_clean: qi.BuiltImage) -> None:
    built = built_clean
    assert built.clean
    o = _oracle(built)
    rc = o.refcounts()
    cs = o.cluster_size
    for e in o.active_l1():
        l2 = e & oracle.L1E_OFFSET_MASK
        if not l2:
            continue
        assert bool(e >> 63) == (rc.get(l2 // cs) == 1), f"L1 entry {e:#x}"
        for _g, le in o.guest_l2_entries([e]):
            if le & oracle.L2E_COMPRESSED or o.external_data_file:
                continue
            host = le & oracle.L2E_OFFSET_MASK
            if host:
                assert bool(le >> 63) == (rc.get(host // cs) == 1), f"L2 entry {le:#x}"


# ---- what each kind is for --------------------------------------------------------------------


def _types_present(o: Oracle) -> set[int]:
    out = set()
    for t in o.cluster_types().values():
        out.update(bit for bit in oracle.TYPE_NAMES if t & bit)
    return out


def test_kind_exercises_what_it_should(built: qi.BuiltImage) -> None:
    """Each kind really contains the structures it was built for (guards the factory)."""
    o = _oracle(built)
    kind = built.kind
    types = _types_present(o)
    ext = o.metadata_extents()
    cs = o.cluster_size
    assert {MAIN_HEADER, ACTIVE_L1, ACTIVE_L2, oracle.REFCOUNT_TABLE, REFCOUNT_BLOCK} <= types
    if kind.startswith("v2") or kind == "snapshots_v2":
        assert o.header.version == 2 and o.header.header_length == 72
    if kind.startswith("refcount_"):
        bits = int(kind.split("_")[1])
        assert o.refcount_bits == bits
    if kind == "refcount_64_cluster_512":
        assert o.header.l1_size * 8 > cs, "L1 should span several clusters"
        assert sum(1 for t in o.cluster_types().values() if t & REFCOUNT_BLOCK) > 5
        assert o.header.refcount_table_clusters > 1, "reftable should span several clusters"
    if kind.startswith("extended_l2") or kind == "snapshots_extended_l2":
        assert o.extended_l2
    if kind.startswith("compressed"):
        assert "compressed" in o.data_clusters().values()
        assert o.header.compression_type == (1 if kind.endswith("zstd") else 0)
    if kind.startswith("luks"):
        assert o.header.crypt_method == 2 and CRYPTO_HEADER in types
        assert o.crypto_header is not None
        enc = qi.qemu_info(built.ref)["format-specific"]["data"]["encrypt"]
        assert o.crypto_header[1] == enc["payload-offset"]
        assert o.crypto_header[0] % cs == 0
    if kind == "aes":
        assert o.header.crypt_method == 1 and o.crypto_header is None
    if kind == "bitmaps":
        assert {BITMAP_DIRECTORY, BITMAP_TABLE} <= types
        assert len(o.bitmaps) == 2
        assert any(
            e & oracle.BME_OFFSET_MASK for e in o.read_table(o.bitmaps[0].table_offset, 4)
        ), "b0 should have dirty bits stored in data clusters"
        assert "bitmap-data" in o.data_clusters().values()
    if kind.startswith("snapshots"):
        assert {SNAPSHOT_TABLE, INACTIVE_L1, INACTIVE_L2} <= types
        # some L2 tables are shared with the active L1, some diverged (COW)
        both = ACTIVE_L2 | INACTIVE_L2
        assert any(t & both == both for t in o.cluster_types().values())
        assert any(t & both == INACTIVE_L2 for t in o.cluster_types().values())
    if kind == "snapshots_cluster_512":
        table = [e for e in ext if e[2] & SNAPSHOT_TABLE]
        assert sum(e[1] for e in table) > cs, "snapshot table should span several clusters"
    if kind == "backing":
        assert o.backing_file == "backing-base.qcow2" and o.backing_format == "qcow2"
    if kind.startswith("data_file"):
        assert o.external_data_file and o.data_file == str(built.extra_files[0])
        raw = bool(o.header.autoclear_features & oracle.AUTOCLEAR_DATA_FILE_RAW)
        assert raw == kind.endswith("raw")
    if kind == "dirty_lazy":
        assert o.info()["dirty"] and o.info()["lazy_refcounts"]
    if kind == "history":
        assert [b.name for b in o.bitmaps] == ["keep"]
        assert [s.name for s in o.snapshots] == ["s0", "s2"]
    if kind == "amended":
        assert o.header.version == 3 and o.refcount_bits == 4 and len(o.snapshots) == 1
    if kind == "resized":
        assert o.header.size == 8 << 30 and o.header.l1_size == 16
        assert o.header.l1_table_offset != 3 * cs, "growing the L1 should have moved it"
    if kind == "huge_virtual":
        assert o.header.l1_size * 8 > cs, "L1 should span several clusters"
    if kind == "zero_discard":
        entries = [e for _g, e in o.guest_l2_entries(o.active_l1())]
        assert any(e & 1 and not e & oracle.L2E_OFFSET_MASK for e in entries)
        assert any(e & 1 and e & oracle.L2E_OFFSET_MASK for e in entries)


# ---- the oracle's own pieces on synthetic input ---------------------------------------------


def test_merge_clusters() -> None:
    cs = 512
    types = {0: 1, 1: 2, 2: 2, 4: 2, 5: 4 | 2, 6: 0, 7: 8}
    assert oracle.merge_clusters(types, cs) == [
        (0, 512, 1),
        (512, 1024, 2),
        (2048, 512, 2),
        (2560, 512, 6),
        (3584, 512, 8),
    ]
    assert oracle.merge_clusters({}, cs) == []


def test_expected_overlap() -> None:
    ext = [(0, 512, 1), (1024, 1024, 4), (2048, 512, 0x80)]
    assert oracle.expected_overlap(ext, 512, 0, 0) == 0
    assert oracle.expected_overlap(ext, 512, 100, 1) == 1
    assert oracle.expected_overlap(ext, 512, 512, 512) == 0
    assert oracle.expected_overlap(ext, 512, 1023, 2) == 4
    assert oracle.expected_overlap(ext, 512, 1500, 600) == 0x84
    assert oracle.expected_overlap(ext, 512, 1500, 600, ignore=4) == 0x80


def _synthetic(cluster_bits: int, refcount_order: int, block: bytes) -> Oracle:
    """A tiny v3 image: header in cluster 0, reftable in cluster 1, one refcount block in 2."""
    cs = 1 << cluster_bits
    data = bytearray(3 * cs)
    struct.pack_into(
        ">IIQIIQIIQQIIQQQQII",
        data,
        0,
        oracle.QCOW_MAGIC,
        3,
        0,
        0,
        cluster_bits,
        1 << 20,
        0,
        0,
        0,
        cs,
        1,
        0,
        0,
        0,
        0,
        0,
        refcount_order,
        104,
    )
    struct.pack_into(">Q", data, cs, 2 * cs)
    data[2 * cs : 2 * cs + len(block)] = block
    return Oracle.from_bytes(bytes(data))


@pytest.mark.parametrize(
    ("order", "block", "expected"),
    [
        (0, bytes([0b00000101]), {0: 1, 2: 1}),  # 1-bit entries, LSB first
        (1, bytes([0b11100100]), {1: 1, 2: 2, 3: 3}),  # 2-bit entries
        (2, bytes([0x21, 0x0F]), {0: 1, 1: 2, 2: 15}),  # 4-bit entries
        (3, bytes([7, 0, 255]), {0: 7, 2: 255}),
        (4, bytes([0, 1, 1, 0]), {0: 1, 1: 256}),
        (5, bytes([0, 0, 1, 0]), {0: 256}),
        (6, bytes([1] + [0] * 6 + [2]), {0: (1 << 56) | 2}),
    ],
)
def test_refcount_widths(order: int, block: bytes, expected: dict[int, int]) -> None:
    o = _synthetic(9, order, block)
    assert o.refcounts() == expected
    assert o.metadata_extents() == [(0, 512, MAIN_HEADER), (512, 512, 8), (1024, 512, 0x10)]


def test_compressed_descriptor() -> None:
    o = _synthetic(16, 4, b"")
    # cluster_bits 16: x = 54; offset bits 0..53, sector count - 1 in bits 54..61
    entry = (1 << 62) | (3 << 54) | 0x12345
    assert o.compressed_range(entry) == (0x12345, (0x12345 & ~511) + 4 * 512 - 0x12345)
