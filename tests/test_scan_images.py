"""qcow2ovl's scanner against QEMU-made images of every kind, with QEMU and the independent
oracle (`oracle.py`) as the judges.

For each image kind of `qemu_images.KINDS` (v2/v3; 512 B–2 MiB clusters; refcount widths 1, 2,
16, 64; extended L2; deflate and zstd compressed clusters; a backing file; external data files;
LUKS and AES encryption; persistent bitmaps; internal snapshots with diverged L2 tables;
metadata preallocation; a dirty lazy-refcounts image):

- `metadata_extents()` equals the oracle's extents (types compared as ints, and they must be
  `MetadataType`);
- `info` equals `qemu-img info`; `snapshots` and `bitmaps` equal `qemu-img info` and the oracle;
- `check_overlap` gives each extent's types, 0 on QEMU's data clusters, and the naive answer on
  a deterministic sample of random ranges;
- `overlap_check="cached"`/`"constant"`/`"none"` restrict the extents as
  docs/design/architecture.md says;
- opening and closing leaves the file byte-for-byte unchanged and `qemu-img check` as it was.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import oracle
import pytest
import qcow2ovl
import qemu_images as qi

# QEMU is the oracle: these tests need qemu-img and qemu-io and fail without them (.ci/run
# installs qemu-utils).

KINDS = sorted(qi.KINDS)


@pytest.fixture(params=KINDS)
def built(request: pytest.FixtureRequest) -> qi.BuiltImage:
    return qi.get_image(request.param)


@contextmanager
def opened(built: qi.BuiltImage, **kwargs: Any) -> Iterator[Any]:
    """Open read-only and prove afterwards that the file did not change."""
    before = qi.sha256_file(built.path)
    with qcow2ovl.open(built.path, **kwargs) as img:
        yield img
    assert qi.sha256_file(built.path) == before, f"{built.kind}: opening changed the file"


def _expected(built: qi.BuiltImage, template: str = "all") -> list[oracle.Extent]:
    return oracle.Oracle.from_path(built.path).metadata_extents(oracle.TEMPLATES[template])


def _diff(got: list[oracle.Extent], want: list[oracle.Extent]) -> str:
    return f"\nqcow2ovl:\n{oracle.describe(got)}\noracle:\n{oracle.describe(want)}"


# ---- the package's constants agree with the oracle's ---------------------------------------


def test_metadata_type_bits_match_oracle() -> None:
    mt = qcow2ovl.MetadataType
    for bit, name in oracle.TYPE_NAMES.items():
        assert int(getattr(mt, name)) == bit


# ---- extents ------------------------------------------------------------------------------------


def test_metadata_extents_match_oracle(built: qi.BuiltImage) -> None:
    want = _expected(built)
    with opened(built) as img:
        raw = img.metadata_extents()
    got = oracle.normalize_extents(raw)
    assert got == want, _diff(got, want)
    for off, length, types in raw:
        assert isinstance(off, int) and isinstance(length, int)
        assert isinstance(types, qcow2ovl.MetadataType)


@pytest.mark.parametrize("template", ["cached", "constant", "none"])
def test_overlap_templates(built: qi.BuiltImage, template: str) -> None:
    want = _expected(built, template)
    with opened(built, overlap_check=template) as img:
        got = oracle.normalize_extents(img.metadata_extents())
    assert got == want, _diff(got, want)
    if template == "cached":
        assert not any(t & oracle.INACTIVE_L2 for _o, _n, t in got)
    if template == "none":
        assert got == []


def test_close_method_and_unchanged_file(built: qi.BuiltImage) -> None:
    before = qi.sha256_file(built.path)
    check_before = qi.qemu_check(built.ref)
    img = qcow2ovl.open(built.path)
    try:
        assert img.metadata_extents()
    finally:
        img.close()
    assert qi.sha256_file(built.path) == before
    for path in built.extra_files:  # backing file, external data file
        assert path.exists()
    check_after = qi.qemu_check(built.ref)
    check_before.pop("filename", None)
    check_after.pop("filename", None)
    assert check_after == check_before
    assert qi.check_is_clean(check_after) == built.clean


# ---- check_overlap ------------------------------------------------------------------------------


def test_check_overlap_on_every_extent(built: qi.BuiltImage) -> None:
    want = _expected(built)
    cs = qi.qemu_info(built.ref)["cluster-size"]
    with opened(built) as img:
        assert int(img.check_overlap(0, 0)) == 0
        for off, length, types in want:
            assert int(img.check_overlap(off, length)) == types, hex(off)
            assert int(img.check_overlap(off, 1)) == types, hex(off)
            assert int(img.check_overlap(off + length - 1, 1)) == types, hex(off)
            assert int(img.check_overlap(off, length, ignore=types)) == 0, hex(off)
            assert int(img.check_overlap(off, length, ignore=types & -types)) == types & ~(
                types & -types
            )
            # a range one byte into the next cluster also picks up that cluster's types
            nxt = oracle.expected_overlap(want, cs, off + length, 1)
            assert int(img.check_overlap(off, length + 1)) == types | nxt, hex(off)
        # past the end of everything: nothing
        end = max(o + n for o, n, _t in want)
        assert int(img.check_overlap(end + 16 * cs, cs)) == 0


def test_check_overlap_on_data_clusters(built: qi.BuiltImage) -> None:
    o = oracle.Oracle.from_path(built.path)
    cs = o.cluster_size
    ranges = [] if o.external_data_file else oracle.host_data_ranges(qi.qemu_map(built.ref))
    data = o.data_clusters()
    with opened(built) as img:
        for off, length in ranges:
            assert int(img.check_overlap(off, length)) == 0, f"QEMU data at {off:#x}"
        # clusters QEMU does not show in its map (compressed, encrypted, bitmap data, snapshots)
        for c in sorted(data)[:500]:
            assert int(img.check_overlap(c * cs, cs)) == 0, f"{data[c]} cluster {c:#x}"


def test_check_overlap_random_ranges(built: qi.BuiltImage) -> None:
    want = _expected(built)
    o = oracle.Oracle.from_path(built.path)
    cs = o.cluster_size
    span = max(len(o.data), max(off + n for off, n, _t in want)) + 4 * cs
    rng = random.Random(built.kind)
    all_bits = sum(oracle.TYPE_NAMES)
    with opened(built) as img:
        for _ in range(300):
            off = rng.randrange(span)
            size = rng.choice([1, 512, cs, 3 * cs, rng.randrange(1, 8 * cs)])
            ignore = rng.choice([0, 0, rng.randrange(all_bits + 1)])
            got = int(img.check_overlap(off, size, ignore))
            assert got == oracle.expected_overlap(want, cs, off, size, ignore), (off, size, ignore)


# ---- info, snapshots, bitmaps ------------------------------------------------------------------


def test_info_matches_qemu(built: qi.BuiltImage) -> None:
    want = oracle.info_from_qemu(qi.qemu_info(built.ref))
    o = oracle.Oracle.from_path(built.path)
    with opened(built) as img:
        info = img.info
        for key, value in want.items():
            assert getattr(info, key) == value, f"info.{key}"
        # facts QEMU does not print
        assert info.crypt_method == o.header.crypt_method
        features = info.features  # names of the set feature bits; any sequence will do
        assert isinstance(features, (list, tuple)) and all(isinstance(f, str) for f in features)
        assert len(features) == len(o.info()["feature_bits"]), features


def _date_matches(value: Any, sec: int, nsec: int) -> bool:
    """`date` may be seconds, (sec, nsec), float seconds, or a datetime."""
    if isinstance(value, datetime.datetime):
        return abs(value.timestamp() - (sec + nsec / 1e9)) < 1e-3
    if isinstance(value, tuple):
        return tuple(value) == (sec, nsec)
    if isinstance(value, float):
        return abs(value - (sec + nsec / 1e9)) < 1e-3
    return bool(value == sec)


def test_snapshots_match_qemu(built: qi.BuiltImage) -> None:
    qemu_snaps = qi.qemu_info(built.ref).get("snapshots", [])
    o = oracle.Oracle.from_path(built.path)
    with opened(built) as img:
        snaps = list(img.snapshots)
    assert [s.name for s in snaps] == [q["name"] for q in qemu_snaps]
    for s, q, mine in zip(snaps, qemu_snaps, o.snapshots):
        assert str(s.id) == q["id"]
        assert s.vm_state_size == q["vm-state-size"]
        assert _date_matches(s.date, q["date-sec"], q["date-nsec"]), s.date
        assert s.l1_table_offset == mine.l1_table_offset
        assert s.l1_size == mine.l1_size
        assert s.disk_size == mine.disk_size


def _flags_match(value: Any, raw: int, names: list[str]) -> bool:
    """`flags` may be the raw int (or an IntFlag) or QEMU's list of names."""
    if isinstance(value, int):
        return int(value) == raw
    return sorted(str(v) for v in value) == sorted(names)


def test_bitmaps_match_qemu(built: qi.BuiltImage) -> None:
    data = qi.qemu_info(built.ref)["format-specific"]["data"]
    qemu_bitmaps = data.get("bitmaps", [])
    o = oracle.Oracle.from_path(built.path)
    with opened(built) as img:
        bitmaps = list(img.bitmaps)
    assert [b.name for b in bitmaps] == [q["name"] for q in qemu_bitmaps]
    for b, q, mine in zip(bitmaps, qemu_bitmaps, o.bitmaps):
        assert b.granularity == q["granularity"]
        assert _flags_match(b.flags, mine.flags, q["flags"]), b.flags
        assert b.table_offset == mine.table_offset
        assert b.table_size == mine.table_size
