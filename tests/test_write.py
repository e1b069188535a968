"""Guarded writes, with QEMU as the oracle: after every workload `qemu-img check` finds the image
clean and `qemu-img compare` finds it identical to a raw mirror of the same writes."""

from __future__ import annotations

import errno
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qcow2ovl
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")

KiB, MiB = 1024, 1 << 20


def assert_clean_and_equal(image: Path, mirror: Path, fmt: str = "qcow2") -> None:
    report = qi.qemu_check(image)
    assert qi.check_is_clean(report), report
    out = qi.qemu_img("compare", "-f", fmt, "-F", "raw", image, mirror).stdout
    assert "identical" in out, out


class Mirror:
    """A raw file receiving the same writes as the image."""

    def __init__(
        self, path: Path, size: int, initial: bytes | None = None, keep: bool = False
    ) -> None:
        self.path = path
        if keep:
            return
        with open(path, "wb") as f:
            f.truncate(size)
            if initial:
                f.write(initial)

    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def resize(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)


def workload(img: qcow2ovl.Image, mirror: Mirror, seed: int, ops: int, size: int) -> None:
    rng = random.Random(seed)
    cs = img.info.cluster_size
    v3 = img.info.version == 3
    for i in range(ops):
        kind = rng.choice(["write", "write", "write", "zero", "discard", "flush"])
        off = rng.randrange(size)
        n = min(size - off, rng.choice([1, 511, 4096, cs, cs + 17, 3 * cs, 300 * KiB]))
        if kind == "write":
            data = rng.randbytes(n)
            img.write(off, data)
            mirror.write(off, data)
        elif kind == "zero":
            unmap = rng.random() < 0.5
            img.write_zeroes(off, n, unmap=unmap)
            mirror.zero(off, n)
        elif kind == "discard":
            # Only whole clusters are discarded; they read as zeros on v3 (no backing here).
            start = -(-off // cs) * cs
            end = (off + n) // cs * cs
            img.discard(off, n)
            if end > start and v3:
                mirror.zero(start, end - start)
            elif end > start:
                mirror.zero(start, end - start)  # v2 without backing: unallocated reads zeros
        else:
            img.flush()
        if i % 7 == 0:
            assert img.read(off, n) == open(mirror.path, "rb").read()[off : off + n]


CONFIGS = {
    "default": {},
    "cluster_512": {"cluster_size": 512},
    "cluster_4k_refcount_1": {"cluster_size": 4096, "refcount_bits": 1},
    "cluster_2m": {"cluster_size": 2 * MiB},
    "refcount_64": {"refcount_bits": 64},
    "extended_l2": {"extended_l2": True},
    "lazy_refcounts": {"lazy_refcounts": True},
    "v2": {"version": 2},
    "zstd": {"compression_type": "zstd"},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_workload_is_clean_and_equal(name: str, tmp_path: Path) -> None:
    size = 24 * MiB
    path = tmp_path / "img.qcow2"
    qcow2ovl.create(path, size, **CONFIGS[name])
    mirror = Mirror(tmp_path / "mirror.raw", size)
    with qcow2ovl.open(path, writable=True) as img:
        workload(img, mirror, seed=hash(name) & 0xFFFF, ops=120, size=size)
    assert_clean_and_equal(path, mirror.path)
    # Reopened, the data reads the same through our reader too.
    with qcow2ovl.open(path) as img:
        assert img.read(0, size) == mirror.path.read_bytes()


def test_lazy_refcounts_dirty_bit(tmp_path: Path) -> None:
    path = tmp_path / "lazy.qcow2"
    qcow2ovl.create(path, 8 * MiB, lazy_refcounts=True)
    img = qcow2ovl.open(path, writable=True)
    img.write(0, b"x" * 4096)
    # While refcounts on disk may be behind, the dirty bit says so.
    assert qi.peek(path, 72, ">Q")[0] & 1
    img.close()
    assert qi.peek(path, 72, ">Q")[0] & 1 == 0
    assert qi.check_is_clean(qi.qemu_check(path))


def test_backing_file_copy_on_write(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    rng = random.Random(5)
    content = rng.randbytes(4 * MiB)
    base.write_bytes(content)
    top = tmp_path / "top.qcow2"
    qcow2ovl.create(top, 8 * MiB, backing_file=str(base), backing_format="raw")
    mirror = Mirror(tmp_path / "mirror.raw", 8 * MiB, content)
    with qcow2ovl.open(top, writable=True) as img:
        for off, n in [(100, 10), (65536 + 7, 200), (3 * MiB - 5, 70000), (6 * MiB, 4096)]:
            data = rng.randbytes(n)
            img.write(off, data)
            mirror.write(off, data)
        # Discard on v3 makes clusters read zeros, not the backing file (as QEMU does).
        img.discard(2 * MiB, 64 * KiB)
        mirror.zero(2 * MiB, 64 * KiB)
    assert_clean_and_equal(top, mirror.path)


def test_extended_l2_subclusters_stay_exact(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x11" * (4 * MiB))
    top = tmp_path / "top.qcow2"
    qcow2ovl.create(top, 4 * MiB, extended_l2=True, backing_file=str(base), backing_format="raw")
    with qcow2ovl.open(top, writable=True) as img:
        img.write(2048, b"\x22" * 2048)  # exactly subcluster 1 of cluster 0
        img.write(5000, b"\x33" * 10)  # inside subcluster 2: copied up from the backing file
    qmap = qi.qemu_map(top)
    allocated = [(e["start"], e["length"]) for e in qmap if e["depth"] == 0 and e["data"]]
    assert allocated == [(2048, 4096)], qmap
    data = qi.run(
        [
            qi.QEMU_IO,
            "-c",
            "read -P 0x11 0 2048",
            "-c",
            "read -P 0x22 2048 2048",
            "-c",
            "read -P 0x11 4096 904",
            "-c",
            "read -P 0x33 5000 10",
            "-c",
            "read -P 0x11 5010 1134",
            str(top),
        ]
    ).stdout
    assert "Pattern verification failed" not in data, data
    assert qi.check_is_clean(qi.qemu_check(top))


def test_external_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # data file names are relative to the working directory (QEMU)
    path = tmp_path / "img.qcow2"
    qcow2ovl.create(path, 8 * MiB, data_file="img.data", data_file_raw=True)
    mirror = Mirror(tmp_path / "mirror.raw", 8 * MiB)
    with qcow2ovl.open(path, writable=True) as img:
        workload(img, mirror, seed=9, ops=40, size=8 * MiB)
    assert_clean_and_equal(path, mirror.path)
    # data_file_raw: the data file itself is the disk.
    assert (tmp_path / "img.data").read_bytes()[: 8 * MiB] == mirror.path.read_bytes()


def test_overwrite_qemu_made_images(tmp_path: Path) -> None:
    # Compressed (zlib, zstd), extended L2 and snapshotted images written by QEMU: our writes
    # copy shared and compressed clusters, and the snapshot keeps its data.
    rng = random.Random(11)
    for name, opts, comp in [
        ("zlib", "", True),
        ("zstd", "compression_type=zstd", True),
        ("ext", "extended_l2=on", False),
        ("snap", "", False),
    ]:
        path = tmp_path / f"{name}.qcow2"
        args = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + [path, "8M"]
        qi.qemu_img(*args)
        flag = "-c " if comp else ""
        qi.qemu_io(path, f"write {flag}-P 0x41 0 1M", f"write {flag}-P 0x42 2M 512k")
        if name == "snap":
            qi.qemu_img("snapshot", "-c", "s1", path)
        mirror = tmp_path / f"{name}.raw"
        qi.qemu_img("convert", "-O", "raw", path, mirror)
        before = mirror.read_bytes()
        m = Mirror(mirror, 8 * MiB, keep=True)
        with qcow2ovl.open(path, writable=True) as img:
            for off, n in [(1000, 5000), (65536, 65536), (2 * MiB + 12345, 100000), (7 * MiB, 9)]:
                d = rng.randbytes(n)
                img.write(off, d)
                m.write(off, d)
        assert_clean_and_equal(path, mirror)
        if name == "snap":
            snap = tmp_path / "snap-s1.raw"
            qi.qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", path, snap)
            assert snap.read_bytes() == before


def test_resize(tmp_path: Path) -> None:
    path = tmp_path / "r.qcow2"
    qcow2ovl.create(path, 1 * MiB, cluster_size=512)  # a tiny L1: growing must move it
    with qcow2ovl.open(path, writable=True) as img:
        img.write(0, b"a" * 1000)
        img.resize(64 * MiB)
        img.write(60 * MiB, b"b" * 3000)
        assert img.virtual_size == 64 * MiB
        with pytest.raises(qcow2ovl.UnsupportedError, match="allocated"):
            img.resize(32 * MiB)
        img.discard(60 * MiB - 512 * 8, 512 * 16)
        img.resize(32 * MiB)
    info = qi.qemu_info(path)
    assert info["virtual-size"] == 32 * MiB
    assert qi.check_is_clean(qi.qemu_check(path))
    out = qi.qemu_io(path, "read -P 0x61 0 1000")
    assert "verification failed" not in out


def test_writable_stream(tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    qcow2ovl.create(path, 4 * MiB)
    with qcow2ovl.open(path, writable=True) as img:
        s = img.stream()
        assert s.writable()
        s.seek(100)
        s.write(b"hello")
        s.seek(100)
        assert s.read(5) == b"hello"
    with qcow2ovl.open(path) as img:
        assert not img.stream().writable()
        assert img.read(100, 5) == b"hello"


def test_read_only_images_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "ro.qcow2"
    qcow2ovl.create(path, 1 * MiB)
    with qcow2ovl.open(path) as img, pytest.raises(OSError):
        img.write(0, b"x")


# ---- corruption: the iotest 060 scenarios that apply without a VM ----------------------------


def _l2_entry_offset(path: Path, guest: int) -> tuple[int, int]:
    """(host offset of the L2 entry for `guest`, cluster size) of a plain v3 image."""
    (cluster_bits,) = qi.peek(path, 20, ">I")
    (l1_offset,) = qi.peek(path, 40, ">Q")
    cs = 1 << cluster_bits
    l2_bits = cluster_bits - 3
    l1_index = guest >> (cluster_bits + l2_bits)
    (l1_entry,) = qi.peek(path, l1_offset + 8 * l1_index, ">Q")
    l2 = l1_entry & 0x00FFFFFFFFFFFE00
    return l2 + 8 * ((guest >> cluster_bits) & ((1 << l2_bits) - 1)), cs


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("l1", "active L1 table"),
        ("reftable", "refcount table"),
        ("refblock", "refcount block"),
    ],
)
def test_write_onto_metadata_is_refused(
    target: str, name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qi.qemu_io(path, "write -P 0x2a 0 64k")
    entry_at, cs = _l2_entry_offset(path, 0)
    (l1,) = qi.peek(path, 40, ">Q")
    (reftable,) = qi.peek(path, 48, ">Q")
    (refblock,) = qi.peek(path, reftable, ">Q")
    where = {"l1": l1, "reftable": reftable, "refblock": refblock}[target]
    # The guest's cluster 0 now claims to live on the metadata (COPIED: write in place).
    qi.poke(path, entry_at, ">Q", (1 << 63) | where)
    before = path.read_bytes()
    events: list[tuple[str, int, int, bool]] = []
    img = qcow2ovl.open(path, writable=True, on_corruption=lambda *a: events.append(a))
    with (
        caplog.at_level(logging.ERROR, logger="qcow2ovl"),
        pytest.raises(qcow2ovl.MetadataOverlapError, match=f"overlaps with {name}") as info,
    ):
        img.write(0, b"\xff" * 512)
    assert info.value.errno == 5 and info.value.offset == where
    # An overlap always names what it would have hit, and is an inconsistency too.
    assert info.value.types and isinstance(info.value, qcow2ovl.InconsistentImageError)
    assert events == [(info.value.strerror, where, 512, True)]
    assert sum("Marking image as corrupt" in r.message for r in caplog.records) == 1
    # The handle refuses everything from now on.
    with pytest.raises(OSError):
        img.write(1 << 20, b"x")
    img.close()
    after = path.read_bytes()
    # Not one byte changed but the corrupt bit.
    (incompat,) = qi.peek(path, 72, ">Q")
    assert incompat & 2
    assert after[:72] == before[:72] and after[80:] == before[80:]
    with pytest.raises(qcow2ovl.CorruptImageError, match="cannot be opened read/write"):
        qcow2ovl.open(path, writable=True)
    with qcow2ovl.open(path) as ro:
        assert ro.info.corrupt


def test_overlapping_metadata_refuses_writable_open(tmp_path: Path) -> None:
    path = tmp_path / "o.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qi.qemu_io(path, "write 0 64k")
    (l1,) = qi.peek(path, 40, ">Q")
    (reftable,) = qi.peek(path, 48, ">Q")
    qi.poke(path, l1, ">Q", (1 << 63) | reftable)  # L2 table on the refcount table
    with pytest.raises(qcow2ovl.CorruptImageError, match="refcount table"):
        qcow2ovl.open(path, writable=True)
    with qcow2ovl.open(path) as ro:
        assert any(p.kind == "metadata-overlap" for p in ro.problems)


def test_refcount_zero_on_a_table_is_refused(tmp_path: Path) -> None:
    # The L2 table's refcount is 0: the allocator may hand its cluster out for data, and the
    # guard refuses the write that would land there.
    path = tmp_path / "z.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qi.qemu_io(path, "write 0 64k")
    (l1,) = qi.peek(path, 40, ">Q")
    (l1e,) = qi.peek(path, l1, ">Q")
    l2 = l1e & 0x00FFFFFFFFFFFE00
    (reftable,) = qi.peek(path, 48, ">Q")
    (refblock,) = qi.peek(path, reftable, ">Q")
    qi.poke(path, refblock + 2 * (l2 >> 16), ">H", 0)
    img = qcow2ovl.open(path, writable=True)
    with pytest.raises(qcow2ovl.MetadataOverlapError, match="active L2 table"):
        for i in range(1, 64):
            img.write(i << 20, b"y" * 65536)
    img.close()
    assert qi.peek(path, 72, ">Q")[0] & 2


@pytest.mark.parametrize("what", ["l1", "l2"])
def test_unaligned_entries_are_fatal(what: str, tmp_path: Path) -> None:
    path = tmp_path / "u.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qi.qemu_io(path, "write 0 64k")
    (l1,) = qi.peek(path, 40, ">Q")
    (l1e,) = qi.peek(path, l1, ">Q")
    if what == "l1":
        qi.poke(path, l1, ">Q", l1e + 512)  # the L2 table pointer is off a cluster boundary
        phrase = "L2 table offset .* unaligned"
    else:
        entry_at, _ = _l2_entry_offset(path, 0)
        (l2e,) = qi.peek(path, entry_at, ">Q")
        qi.poke(path, entry_at, ">Q", l2e + 512)
        phrase = "unaligned"
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(path, twin)
    assert_inconsistency_is_fatal(path, twin, phrase, lambda img: img.write(100, b"z" * 100))


def assert_inconsistency_is_fatal(path: Path, twin: Path, phrase: str, write: Any) -> None:
    """An inconsistency met by a write is its own error (not an overlap, which would name the
    types it hit), in QEMU's words; the image is marked corrupt, the callback and the logger
    told, and the handle refuses later writes. QEMU, on a copy, says the same."""
    told: list[tuple[str, int, int, bool]] = []
    img = qcow2ovl.open(path, writable=True, on_corruption=lambda *a: told.append(a))
    with pytest.raises(qcow2ovl.InconsistentImageError, match=phrase) as exc:
        write(img)
    assert not isinstance(exc.value, qcow2ovl.MetadataOverlapError)
    assert isinstance(exc.value, OSError) and exc.value.errno == errno.EIO
    assert exc.value.filename == str(path)
    assert [t[0] for t in told] == [exc.value.strerror] and told[0][3] is True
    with pytest.raises(qcow2ovl.InconsistentImageError):
        img.write(0, b"again")
    img.close()
    assert qi.peek(path, 72, ">Q")[0] & 2
    qemu = subprocess.run(
        ["qemu-io", "-c", "write 100 100", "-c", "write 8M 512", str(twin)],
        capture_output=True,
        text=True,
    )
    expected = f"qcow2: Marking image as corrupt: {exc.value.strerror}; further corruption"
    assert expected in qemu.stderr, (qemu.stderr, exc.value.strerror)


def test_writes_under_a_map_memory_limit_use_the_naive_check(tmp_path: Path) -> None:
    # With the map too small to hold everything, QEMU's algorithm checks the rest, against the
    # live tables: writes still work, and a write onto metadata is still refused.
    path = tmp_path / "limit.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "64M")
    mirror = Mirror(tmp_path / "m.raw", 64 * MiB)
    with qcow2ovl.open(path, writable=True, map_memory_limit=256) as img:
        assert img.unchecked_ranges()
        img.write(0, b"a" * 4096)
        mirror.write(0, b"a" * 4096)
        workload(img, mirror, seed=3, ops=60, size=64 * MiB)
    assert_clean_and_equal(path, mirror.path)
    entry_at, _ = _l2_entry_offset(path, 0)
    (l1,) = qi.peek(path, 40, ">Q")
    qi.poke(path, entry_at, ">Q", (1 << 63) | l1)
    with qcow2ovl.open(path, writable=True, map_memory_limit=256) as img:
        with pytest.raises(qcow2ovl.MetadataOverlapError, match="active L1 table"):
            img.write(0, b"q" * 10)


def test_snapshot_views_read_like_qemu_img_convert_l(tmp_path: Path) -> None:
    path = tmp_path / "snaps.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qi.qemu_io(path, "write -P 0x11 0 1M")
    qi.qemu_img("snapshot", "-c", "one", path)
    qi.qemu_img("resize", path, "12M")
    qi.qemu_io(path, "write -P 0x22 512k 1M", "write -P 0x33 9M 64k")
    qi.qemu_img("snapshot", "-c", "two", path)
    qi.qemu_io(path, "write -z 0 4M")
    for snap in ("one", "two", "1", "2"):
        expected = tmp_path / f"{snap}.raw"
        key = "snapshot.id" if snap.isdigit() else "snapshot.name"
        qi.qemu_img("convert", "-l", f"{key}={snap}", "-O", "raw", path, expected)
        with qcow2ovl.open(path, snapshot=snap) as img:
            assert img.virtual_size == expected.stat().st_size
            assert img.read(0, img.virtual_size) == expected.read_bytes(), snap
    with pytest.raises(qcow2ovl.SnapshotNotFoundError, match="Can't find snapshot"):
        qcow2ovl.open(path, snapshot="three")
    with pytest.raises(qcow2ovl.UnsupportedError, match="read-only"):
        qcow2ovl.open(path, snapshot="one", writable=True)


def _refblock0(path: Path) -> int:
    (reftable,) = qi.peek(path, 48, ">Q")
    (refblock,) = qi.peek(path, reftable, ">Q")
    return refblock


def test_write_onto_the_snapshot_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "snap.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qi.qemu_io(path, "write 0 64k")
    qi.qemu_img("snapshot", "-c", "s", path)
    (snapshots_offset,) = qi.peek(path, 64, ">Q")
    entry_at, _ = _l2_entry_offset(path, 0)
    # The (shared) L2 table claims guest cluster 0 is ours alone, on the snapshot table.
    qi.poke(path, entry_at, ">Q", (1 << 63) | snapshots_offset)
    with qcow2ovl.open(path, writable=True) as img:
        with pytest.raises(qcow2ovl.MetadataOverlapError, match="snapshot table"):
            img.write(0, b"s" * 512)
    assert qi.peek(path, 72, ">Q")[0] & 2
    with qcow2ovl.open(path) as ro:
        assert [s.name for s in ro.snapshots] == ["s"]


def test_emptied_refcount_table_is_refused(tmp_path: Path) -> None:
    # With refcount table entry 0 cleared, every cluster looks free: the allocator finds the
    # first refcount block missing (it would have to sit on the header) and refuses, marking
    # the image corrupt, before any allocation could land on metadata.
    path = tmp_path / "empty-rt.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qi.qemu_io(path, "write 0 64k")
    (reftable,) = qi.peek(path, 48, ">Q")
    qi.poke(path, reftable, ">Q", 0)
    with qcow2ovl.open(path, writable=True) as img:
        with pytest.raises(qcow2ovl.InconsistentImageError, match="Refcount block .* missing") as e:
            img.write(8 << 20, b"e" * 512)
        assert not isinstance(e.value, qcow2ovl.MetadataOverlapError)
    assert qi.peek(path, 72, ">Q")[0] & 2


def test_unaligned_refcount_table_entry_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "rt-unaligned.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qi.qemu_io(path, "write 0 64k")
    (reftable,) = qi.peek(path, 48, ">Q")
    qi.poke(path, reftable, ">Q", _refblock0(path) + 512)
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(path, twin)
    assert_inconsistency_is_fatal(
        path, twin, "Refblock offset .* unaligned", lambda img: img.write(8 << 20, b"u" * 512)
    )


def test_l1_growth_onto_the_refcount_table_is_refused(tmp_path: Path) -> None:
    # The refcount table's own refcount is 0: growing the L1 table may allocate it, and the
    # write of the new L1 table is refused.
    path = tmp_path / "grow.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "1M")
    (reftable,) = qi.peek(path, 48, ">Q")
    qi.poke(path, _refblock0(path) + 2 * (reftable // 512), ">H", 0)
    img = qcow2ovl.open(path, writable=True)
    with pytest.raises(qcow2ovl.MetadataOverlapError, match="refcount table"):
        img.resize(2 * MiB)  # the new L1 table is one cluster: the first "free" one
    img.close()
    assert qi.peek(path, 72, ">Q")[0] & 2


def test_refcount_table_growth_with_64_bit_refcounts(tmp_path: Path) -> None:
    # 512-byte clusters and 64-bit refcounts: one refcount block describes 64 clusters and the
    # first refcount table 4096; writing 6 MiB makes the table grow (and move).
    path = tmp_path / "rt-grow.qcow2"
    qcow2ovl.create(path, 16 * MiB, cluster_size=512, refcount_bits=64)
    (clusters_before,) = qi.peek(path, 56, ">I")
    mirror = Mirror(tmp_path / "m.raw", 16 * MiB)
    rng = random.Random(7)
    with qcow2ovl.open(path, writable=True) as img:
        for i in range(96):
            data = rng.randbytes(64 * 1024)
            img.write(i * 64 * 1024, data)
            mirror.write(i * 64 * 1024, data)
        # Checked and mapped through the writable handle, after its tables moved: what the
        # handle reports is what QEMU sees on disk.
        report = img.check()
        assert (report.corruptions, report.leaks, report.check_errors) == (0, 0, 0)
        ours = [e.as_qemu_dict() for e in img.guest_map()]
        img.flush()
        assert ours == qi.qemu_map(path, force_share=True)
    (clusters_after,) = qi.peek(path, 56, ">I")
    assert clusters_after > clusters_before
    assert_clean_and_equal(path, mirror.path)


#: qemu-io command lines whose effect on allocation QEMU decides cluster by cluster.
ZERO_AND_DISCARD_LINES = [
    "write -P 0x11 0 64k",
    "discard 64k 64k",  # unallocated, nothing behind it: left alone
    "discard 0 64k",  # data: the zero flag
    "write -z 3M 100",  # part of an unallocated cluster: the whole one zeroed by its flag
    "write -z 600M 64k",  # a whole cluster in an L2 table not yet there: allocated, zero flag
    "write -z 700M 100",  # both
    "write -P 0x22 800M 64k",
    "write -z 800M 100",  # part of a data cluster: zeros written
    "write -z -u 3M 100",  # part of a zero cluster: stays zero
    "write -P 0x33 900M 64k",
    "write -z 900M 64k",  # a whole data cluster: v3 keeps it as zeros, v2 discards it
]


@pytest.mark.parametrize(
    "opts", [{}, {"cluster_size": 4096}, {"compat": "0.10"}], ids=["v3", "v3-4k", "v2"]
)
def test_zeroes_and_discards_allocate_as_qemu_io(opts: dict[str, object], tmp_path: Path) -> None:
    """The same zero writes and discards through qemu-io and through ours, on twin images
    without a backing file: `qemu-img map` shows the same clusters allocated, zero or left
    alone (host offsets aside: allocation order differs), and the disks are the same. (Version
    2 has no zero flag: QEMU zeroes whole clusters there by discarding them.)"""
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    qi.create(theirs, 1 << 30, opts=opts)
    shutil.copyfile(theirs, ours)
    qi.qemu_io(theirs, *ZERO_AND_DISCARD_LINES)
    args = [c for line in ZERO_AND_DISCARD_LINES for c in ("-c", line)]
    proc = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "io", *args, str(ours)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr

    def flags(path: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "offset"} for e in qi.qemu_map(path)]

    assert flags(ours) == flags(theirs)
    assert "identical" in qi.qemu_img("compare", ours, theirs).stdout
    assert qi.check_is_clean(qi.qemu_check(ours))
