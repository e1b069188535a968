"""Internal snapshots, with QEMU as the oracle both ways: snapshots we create are listed,
read, applied and deleted by qemu-img with the data we expect, and snapshots qemu-img creates
are handled by us exactly as qemu-img handles them. After every operation `qemu-img check`
finds the image clean and the live metadata map equals a fresh scan of the file."""

from __future__ import annotations

import logging
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qcow2ovl
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")

KiB, MiB = 1024, 1 << 20
COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00

#: name -> (qemu-img create options, virtual size)
CONFIGS: dict[str, tuple[dict[str, object], int]] = {
    "default": ({}, 32 * MiB),
    "512": ({"cluster_size": 512}, 2 * MiB),
    "2M": ({"cluster_size": 2 * MiB}, 64 * MiB),
    "extended-l2": ({"extended_l2": True}, 32 * MiB),
    "v2": ({"compat": "0.10"}, 32 * MiB),
    "refcount-64": ({"refcount_bits": 64}, 32 * MiB),
    "lazy": ({"lazy_refcounts": True}, 32 * MiB),
    "zstd": ({"compression_type": "zstd"}, 32 * MiB),
}


def assert_map_matches_scan(img: qcow2ovl.Image, path: Path) -> None:
    """The map the writer kept up to date equals the one a fresh open builds from the file."""
    img.flush()
    # Beside our own writer: force-share, as a reader that knows the writer flushed.
    with qcow2ovl.open(path, force_share=True) as fresh:
        assert list(img.metadata_extents()) == list(fresh.metadata_extents())


def assert_clean(path: Path, beside_our_writer: bool = False) -> None:
    report = qi.qemu_check(path, force_share=beside_our_writer)
    assert qi.check_is_clean(report), report


def qemu_raw(path: Path, tmp: Path, snapshot: str | None = None) -> bytes:
    """The guest disk (or a snapshot's) as qemu-img converts it to raw."""
    out = tmp / f"view-{random.getrandbits(32):08x}.raw"
    args: list[Any] = ["convert", "-f", "qcow2"]
    if snapshot is not None:
        key = "snapshot.id" if snapshot.isdigit() else "snapshot.name"
        args += ["-l", f"{key}={snapshot}"]
    qi.qemu_img(*args, "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_snapshots(path: Path) -> list[tuple[str, str]]:
    return [(s["id"], s["name"]) for s in qi.qemu_info(path).get("snapshots", [])]


def random_writes(img: qcow2ovl.Image, model: bytearray, rng: random.Random, n: int) -> None:
    size = len(model)
    cs = img.info.cluster_size
    for _ in range(n):
        off = rng.randrange(size)
        length = min(size - off, rng.choice([1, 512, 4096, cs, 2 * cs + 7, 200 * KiB]))
        kind = rng.choice(["write", "write", "write", "zero", "discard", "compressed"])
        if kind == "write":
            data = bytes([rng.randrange(1, 256)]) * length
            img.write(off, data)
            model[off : off + length] = data
        elif kind == "zero":
            img.write_zeroes(off, length)
            model[off : off + length] = bytes(length)
        elif kind == "discard" and img.info.version == 3:
            start, end = -(-off // cs) * cs, (off + length) // cs * cs
            if off + length == size:
                end = size
            if end > start:
                img.discard(start, end - start)
                model[start:end] = bytes(end - start)
        elif kind == "compressed" and not img.info.extended_l2:
            c = off // cs * cs
            n_bytes = min(cs, size - c)
            data = bytes([rng.randrange(256)]) * (n_bytes // 2) + bytes(n_bytes - n_bytes // 2)
            if n_bytes == cs and img.write_compressed(c, data):
                model[c : c + n_bytes] = data


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_our_snapshots_work_in_qemu(name: str, tmp_path: Path) -> None:
    opts, size = CONFIGS[name]
    path = tmp_path / "ours.qcow2"
    qi.create(path, size, opts=opts)
    rng = random.Random(name)
    model = bytearray(size)
    views: dict[str, bytes] = {}
    with qcow2ovl.open(path, writable=True) as img:
        for snap in ("one", "two", "three"):
            random_writes(img, model, rng, 12)
            entry = img.create_snapshot(snap)
            assert entry.name == snap and entry.disk_size == size
            views[snap] = bytes(model)
            assert_map_matches_scan(img, path)
        random_writes(img, model, rng, 12)
        assert [s.name for s in img.snapshots] == ["one", "two", "three"]
        assert_map_matches_scan(img, path)
        assert img.read(0, size) == model
    assert_clean(path)
    assert qemu_snapshots(path) == [("1", "one"), ("2", "two"), ("3", "three")]
    for snap, data in views.items():
        assert qemu_raw(path, tmp_path, snap) == data, snap
    assert qemu_raw(path, tmp_path) == model
    # qemu-img applies and deletes them with the data we expect.
    applied = tmp_path / "applied.qcow2"
    shutil.copy(path, applied)
    qi.qemu_img("snapshot", "-a", "two", applied)
    assert_clean(applied)
    assert qemu_raw(applied, tmp_path) == views["two"]
    deleted = tmp_path / "deleted.qcow2"
    shutil.copy(path, deleted)
    for snap in ("two", "one", "three"):
        qi.qemu_img("snapshot", "-d", snap, deleted)
        assert_clean(deleted)
    assert qemu_raw(deleted, tmp_path) == model


@pytest.mark.parametrize("name", ["default", "512", "extended-l2", "v2"])
def test_qemu_snapshots_work_here(name: str, tmp_path: Path) -> None:
    opts, size = CONFIGS[name]
    path = tmp_path / "qemu.qcow2"
    qi.create(path, size, opts=opts)
    qi.write(path, [(0, size // 2, 0x11), (size // 4, 3 * 4096, 0x12)])
    qi.snapshot_create(path, "a")
    qi.write(path, [(size // 8, 70 * KiB, 0x21), (size - 4096, 4096, 0x22)])
    qi.snapshot_create(path, "b")
    qi.qemu_io(path, f"write -z {size // 4} 128k", f"write -P 0x33 {size // 3} 5k")
    expected = {s: qemu_raw(path, tmp_path, s) for s in ("a", "b")}
    active = qemu_raw(path, tmp_path)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(path, ours)
    shutil.copy(path, theirs)
    with qcow2ovl.open(ours, writable=True) as img:
        assert [(s.id, s.name) for s in img.snapshots] == [("1", "a"), ("2", "b")]
        assert img.read(0, size) == active
        img.apply_snapshot("a")
        assert img.read(0, size) == expected["a"]
        assert_map_matches_scan(img, ours)
        assert_clean(ours, beside_our_writer=True)
        img.delete_snapshot("b")
        assert_map_matches_scan(img, ours)
        assert_clean(ours, beside_our_writer=True)
        img.delete_snapshot("1")
        assert img.snapshots == []
        assert_map_matches_scan(img, ours)
        assert img.read(0, size) == expected["a"]
    assert_clean(ours)
    qi.qemu_img("snapshot", "-a", "a", theirs)
    qi.qemu_img("snapshot", "-d", "b", theirs)
    qi.qemu_img("snapshot", "-d", "a", theirs)  # qemu-img -d takes names only
    out = qi.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, theirs).stdout
    assert "identical" in out
    # Both images hold the same clusters once the snapshots are gone.
    ours_check, theirs_check = qi.qemu_check(ours), qi.qemu_check(theirs)
    assert ours_check["allocated-clusters"] == theirs_check["allocated-clusters"]


def test_apply_restores_the_snapshot_disk_size(tmp_path: Path) -> None:
    path = tmp_path / "size.qcow2"
    qi.create(path, 8 * MiB)
    with qcow2ovl.open(path, writable=True) as img:
        img.write(0, b"\x01" * MiB)
        img.create_snapshot("small")
        img.resize(600 * MiB)  # the L1 table grows and moves
        img.write(500 * MiB, b"\x02" * 4096)
        img.create_snapshot("big")
        img.apply_snapshot("small")
        assert img.virtual_size == 8 * MiB
        assert img.read(0, MiB) == b"\x01" * MiB
        assert_map_matches_scan(img, path)
        img.apply_snapshot("big")
        assert img.virtual_size == 600 * MiB
        assert img.read(500 * MiB, 4096) == b"\x02" * 4096
        assert_map_matches_scan(img, path)
    assert_clean(path)
    assert qi.qemu_info(path)["virtual-size"] == 600 * MiB


def _snapshot_entries(path: Path) -> dict[str, tuple[bytes, bytes]]:
    """Each snapshot's name -> (its fixed 40 bytes, its extra data), from the file."""
    data = path.read_bytes()
    count, offset = struct.unpack_from(">IQ", data, 60)
    entries = {}
    for _ in range(count):
        id_len, name_len = struct.unpack_from(">HH", data, offset + 12)
        (extra_len,) = struct.unpack_from(">I", data, offset + 36)
        extra = data[offset + 40 : offset + 40 + extra_len]
        name_at = offset + 40 + extra_len + id_len
        name = data[name_at : name_at + name_len].decode()
        entries[name] = (data[offset : offset + 40], extra)
        offset = (name_at + name_len + 7) & ~7
    return entries


def test_a_table_rewrite_completes_old_entries_as_qemu_does(tmp_path: Path) -> None:
    """An entry written by an old QEMU (no extra data: no disk size, no icount) is completed
    when the table is rewritten, with the same bytes QEMU writes: the disk size at open, and
    an icount of -1."""
    path = tmp_path / "old.qcow2"
    qi.create(path, 8 * MiB)
    qi.snapshot_create(path, "old")
    data = bytearray(path.read_bytes())
    (offset,) = struct.unpack_from(">Q", data, 64)
    id_len, name_len = struct.unpack_from(">HH", data, offset + 12)
    (extra_len,) = struct.unpack_from(">I", data, offset + 36)
    strings = data[offset + 40 + extra_len : offset + 40 + extra_len + id_len + name_len]
    entry = data[offset : offset + 36] + bytes(4) + strings
    data[offset : offset + len(entry) + 8] = entry + bytes(8)
    path.write_bytes(bytes(data))
    assert _snapshot_entries(path)["old"][1] == b""
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(path, theirs)

    # The disk size recorded is the one at open (QEMU completes entries as it reads them):
    # a resize first, in its own process, shows which.
    with qcow2ovl.open(path, writable=True) as img:
        img.resize(16 * MiB)
    with qcow2ovl.open(path, writable=True) as img:
        img.create_snapshot("new")
    qi.qemu_img("resize", "-q", theirs, str(16 * MiB))
    qi.snapshot_create(theirs, "new")

    ours, qemus = _snapshot_entries(path)["old"], _snapshot_entries(theirs)["old"]
    assert ours == qemus
    vm_state_large, disk_size, icount = struct.unpack(">QQq", ours[1])
    assert (vm_state_large, disk_size, icount) == (0, 16 * MiB, -1)
    assert_clean(path)


def test_backing_file_and_snapshots(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qi.create(base, 4 * MiB)
    qi.write(base, [(0, 4 * MiB, 0x5A)])
    top = tmp_path / "top.qcow2"
    qi.create(top, 4 * MiB, backing=base)
    with qcow2ovl.open(top, writable=True) as img:
        img.write(100, b"top")
        img.create_snapshot("s")
        img.write(MiB, b"later")
        img.apply_snapshot("s")
        expected = bytearray(b"\x5a" * 4 * MiB)
        expected[100:103] = b"top"
        assert img.read(0, 4 * MiB) == expected
    assert_clean(top)
    assert qemu_raw(top, tmp_path, "s") == expected


# -- refusals: nothing changes ----------------------------------------------------------------


def test_bad_names_ids_and_images_are_refused_before_any_change(tmp_path: Path) -> None:
    path = tmp_path / "names.qcow2"
    qi.create(path, 8 * MiB)
    qi.write(path, [(0, 64 * KiB, 1)])
    with qcow2ovl.open(path, writable=True) as img:
        img.create_snapshot("taken", id="7")
    before = path.read_bytes()
    with qcow2ovl.open(path, writable=True) as img:
        for kwargs, words in [
            ({"name": "taken"}, "already exists"),
            ({"name": "new", "id": "7"}, "ID '7' already exists"),
            ({"name": "n" * 256}, "too long"),
            ({"name": "x", "id": "1" * 128}, "too long"),
            ({"name": ""}, "must not be empty"),
            ({"name": "a\0b"}, "NUL"),
        ]:
            with pytest.raises(ValueError, match=words):
                img.create_snapshot(**kwargs)
        with pytest.raises(ValueError, match="vm_state_size"):
            img.create_snapshot("neg", vm_state_size=-1)
        with pytest.raises(qcow2ovl.SnapshotNotFoundError, match="Can't find snapshot 'nope'"):
            img.apply_snapshot("nope")
        with pytest.raises(qcow2ovl.SnapshotNotFoundError):
            img.delete_snapshot("nope")
    assert path.read_bytes() == before
    with qcow2ovl.open(path) as ro, pytest.raises(OSError):
        ro.create_snapshot("read-only")
    # The next free id follows the largest numeric one, as QEMU picks them.
    with qcow2ovl.open(path, writable=True) as img:
        assert img.create_snapshot("next", vm_state_size=5 << 32).id == "8"
    assert qi.qemu_info(path)["snapshots"][1]["vm-state-size"] == 5 << 32


def test_one_bit_refcounts_cannot_share_clusters(tmp_path: Path) -> None:
    path = tmp_path / "one-bit.qcow2"
    qi.create(path, 8 * MiB, opts={"refcount_bits": 1})
    qi.write(path, [(0, 64 * KiB, 1)])
    before = path.read_bytes()
    with qcow2ovl.open(path, writable=True) as img:
        with pytest.raises(qcow2ovl.UnsupportedError, match="largest 1-bit refcount"):
            img.create_snapshot("s")
        assert img.snapshots == []
        img.write(0, b"still fine")
    assert_clean(path)
    assert path.read_bytes()[:0x10000] == before[:0x10000]


def test_external_data_files_have_no_internal_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "df.qcow2"
    qi.create(path, 8 * MiB, opts={"data_file": str(tmp_path / "df.raw")})
    with (
        qcow2ovl.open(path, writable=True) as img,
        pytest.raises(qcow2ovl.UnsupportedError, match="external data file"),
    ):
        img.create_snapshot("s")


# -- iotest 060: writes onto snapshot metadata --------------------------------------------------


def _inactive_l2_setup(tmp_path: Path) -> tuple[Path, int, int]:
    """iotest 060's "cluster data reference into inactive L2 table": write, snapshot, write
    again (the active L2 table is copied), then point the active L2 entry of guest cluster 0 at
    the old L2 table, which only the snapshot uses now. Returns (image, entry offset, table)."""
    path = tmp_path / "inactive-l2.qcow2"
    qi.create(path, 64 * MiB)
    qi.write(path, [(0, 512, 1)])
    qi.snapshot_create(path, "foo")
    qi.write(path, [(0, 512, 2)])
    (sn_l1,) = qi.peek(path, _snapshot_l1(path), ">Q")
    old_l2 = sn_l1 & OFFSET_MASK
    (l1_offset,) = qi.peek(path, 40, ">Q")
    (active_l1,) = qi.peek(path, l1_offset, ">Q")
    assert active_l1 & OFFSET_MASK != old_l2, "the write should have copied the L2 table"
    entry_at = active_l1 & OFFSET_MASK
    qi.poke(path, entry_at, ">Q", COPIED | old_l2)
    return path, entry_at, old_l2


def _snapshot_l1(path: Path) -> int:
    """Offset of the first snapshot's L1 table (from its snapshot table entry)."""
    (snapshots_offset,) = qi.peek(path, 64, ">Q")
    (l1,) = qi.peek(path, snapshots_offset, ">Q")
    return int(l1)


def test_data_write_into_an_inactive_l2_table_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, _, old_l2 = _inactive_l2_setup(tmp_path)
    qemu_copy = tmp_path / "qemu-default.qcow2"
    shutil.copy(path, qemu_copy)
    table_before = path.read_bytes()[old_l2 : old_l2 + 65536]
    with caplog.at_level(logging.ERROR, logger="qcow2ovl"):
        img = qcow2ovl.open(path, writable=True)
        with pytest.raises(qcow2ovl.MetadataOverlapError, match="inactive L2 table") as info:
            img.write(0, b"\x03" * 512)
        img.close()
    assert info.value.offset == old_l2
    assert sum("Marking image as corrupt" in r.message for r in caplog.records) == 1
    assert qi.peek(path, 72, ">Q")[0] & 2, "corrupt bit not set"
    assert path.read_bytes()[old_l2 : old_l2 + 65536] == table_before
    # QEMU with its default overlap checks (no inactive L2 tables) lets the write through and
    # destroys the snapshot's L2 table.
    qi.qemu_io(qemu_copy, "write -P 3 0 512")
    assert qemu_copy.read_bytes()[old_l2 : old_l2 + 65536] != table_before
    damaged = qi.qemu_check(qemu_copy)
    assert damaged["corruptions"] > 0, damaged


@pytest.mark.parametrize(
    ("target", "name"), [("inactive-l1", "inactive L1 table"), ("table", "snapshot table")]
)
def test_data_write_onto_snapshot_metadata_is_refused(
    target: str, name: str, tmp_path: Path
) -> None:
    path = tmp_path / "snap-meta.qcow2"
    qi.create(path, 64 * MiB)
    qi.write(path, [(0, 512, 1)])
    with qcow2ovl.open(path, writable=True) as img:
        img.create_snapshot("mine")
        img.write(0, b"\x02" * 512)  # the active L2 table is our own again
    (l1_offset,) = qi.peek(path, 40, ">Q")
    (l2,) = qi.peek(path, l1_offset, ">Q")
    where = _snapshot_l1(path) if target == "inactive-l1" else qi.peek(path, 64, ">Q")[0]
    qi.poke(path, l2 & OFFSET_MASK, ">Q", COPIED | where)
    before = path.read_bytes()
    with qcow2ovl.open(path, writable=True) as img:
        with pytest.raises(qcow2ovl.MetadataOverlapError, match=name) as info:
            img.write(0, b"\x03" * 512)
        assert info.value.types
    after = path.read_bytes()
    assert after[:72] == before[:72] and after[80:] == before[80:]


def test_snapshots_under_a_map_memory_limit(tmp_path: Path) -> None:
    # Past the map's memory limit QEMU's naive algorithm checks the rest; it must see every new
    # snapshot table and snapshot L1 table at once, and still protect inactive L2 tables.
    path = tmp_path / "limit.qcow2"
    qi.create(path, 16 * MiB, opts={"cluster_size": 4096})
    model = bytearray(16 * MiB)
    rng = random.Random(7)
    with qcow2ovl.open(path, writable=True, map_memory_limit=256) as img:
        assert img.unchecked_ranges()
        random_writes(img, model, rng, 20)
        img.create_snapshot("s")
        saved = bytes(model)
        random_writes(img, model, rng, 20)
        img.flush()
        # The writes copied, never overwrote (a view beside our own writer: force-share).
        with qcow2ovl.open(path, snapshot="s", force_share=True) as view:
            assert view.read(0, len(saved)) == saved
        img.create_snapshot("t")
        img.delete_snapshot("s")
        img.apply_snapshot("t")
        img.create_snapshot("s")
        assert img.read(0, len(model)) == model
    assert_clean(path)
    assert qemu_raw(path, tmp_path, "s") == model
    assert saved != model
    # iotest 060's inactive-L2 write, caught by the naive checker this time.
    qi.write(path, [(0, 512, 9)])  # the active L2 table is copied away from the snapshots'
    (sn_l1,) = qi.peek(path, _snapshot_l1(path), ">Q")
    (l1_offset,) = qi.peek(path, 40, ">Q")
    (active,) = qi.peek(path, l1_offset, ">Q")
    assert active & OFFSET_MASK != sn_l1 & OFFSET_MASK
    qi.poke(path, active & OFFSET_MASK, ">Q", COPIED | (sn_l1 & OFFSET_MASK))
    with qcow2ovl.open(path, writable=True, map_memory_limit=256) as img:
        with pytest.raises(qcow2ovl.MetadataOverlapError, match="inactive L2 table"):
            img.write(0, b"x" * 512)


# -- the command line ---------------------------------------------------------------------------


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "snapshot", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_matches_qemu_img_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "cli.qcow2"
    qi.create(path, 16 * MiB)
    qi.write(path, [(0, MiB, 7)])
    assert cli("-l", path).stdout == qi.qemu_img("snapshot", "-l", path).stdout == ""
    assert cli("-c", "first", path).returncode == 0
    qi.qemu_img("snapshot", "-c", "second by qemu", path)
    qi.write(path, [(0, MiB, 8)])
    assert cli("-c", "third " + "x" * 40, path).returncode == 0
    listing = qi.qemu_img("snapshot", "-l", path).stdout
    assert cli("-l", path).stdout == listing
    assert cli(path).stdout == listing  # listing is the default
    assert re.search(r"^3 +third x+ +0 B ", listing, re.M), listing
    # The info listing is the same table.
    ours_info = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "info", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert listing.strip() in ours_info
    assert cli("-a", "first", path).returncode == 0
    assert qemu_raw(path, tmp_path)[:MiB] == b"\x07" * MiB
    assert cli("-d", "second by qemu", path).returncode == 0
    assert "snapshot not found" in cli("-d", "1", path).stderr  # -d takes names, as qemu-img
    assert_clean(path)
    assert [n for _, n in qemu_snapshots(path)] == ["first", "third " + "x" * 40]
    bad = cli("-a", "nope", path)
    assert bad.returncode == 1
    assert "Could not apply snapshot 'nope': snapshot not found" in bad.stderr
    assert (
        cli("-c", "first", path)
        .stderr.strip()
        .endswith("Could not create snapshot 'first': Snapshot 'first' already exists")
    )
    assert "Cannot mix" in cli("-l", "-c", "x", path).stderr
    assert cli("-q", "-l", path).stdout == ""
