"""The Image API around the scan: lifecycle, options, the memory limit and its fallback, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import oracle
import pytest
import qcow2ovl
import qemu_images as qi
from qcow2ovl import MetadataType as T
from qcow2ovl.cli import main as cli_main


@pytest.fixture(scope="module")
def snap_image(module_tmp_path: Path) -> Path:
    """A 2 GiB image with data in two L2 ranges, two snapshots and a bitmap."""
    d = module_tmp_path
    path = d / "snap.qcow2"
    qi.create(path, 2 * qi.MiB * 1024)
    qi.write(path, [(0, 65536, 0xAB), (1536 * qi.MiB, 65536, 0xCD)])
    qi.snapshot_create(path, "one")
    qi.write(path, [(0, 4096, 0x11)])
    qi.snapshot_create(path, "two")
    qi.bitmap_add(path, "b0")
    return path


def test_context_manager_and_close(snap_image: Path) -> None:
    with qcow2ovl.open(snap_image) as img:
        assert not img.closed and not img.writable
        assert "ro" in repr(img)
    assert img.closed
    img.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        img.metadata_extents()


def test_templates_decide_what_is_read_and_tracked(snap_image: Path) -> None:
    o = oracle.Oracle.from_path(snap_image)
    for spec, mask in [
        ("all", T.ALL),
        ("cached", T.CACHED),
        ("overlap-check=all,overlap-check.inactive-l2=off", T.ALL & ~T.INACTIVE_L2),
        ({"template": "constant", "active-l2": True}, T.CONSTANT | T.ACTIVE_L2),
        ("none", T.NONE),
    ]:
        with qcow2ovl.open(snap_image, overlap_check=spec) as img:
            got = [(off, n, int(t)) for off, n, t in img.metadata_extents()]
            assert got == o.metadata_extents(int(mask)), spec
            assert img.overlap_check.mask == mask


def test_snapshot_l1_tables_are_not_read_without_inactive_l2(
    snap_image: Path, tmp_path: Path
) -> None:
    # An unaligned pointer in a snapshot L1 table is a problem only the "all" scan can see.
    bad = tmp_path / "bad.qcow2"
    shutil.copyfile(snap_image, bad)
    o = oracle.Oracle.from_path(bad)
    l1 = o.snapshots[0].l1_table_offset
    qi.poke(bad, l1, ">Q", 0x10200)
    with qcow2ovl.open(bad, overlap_check="all") as img:
        assert any("not cluster-aligned" in p.message for p in img.problems)
    for spec in ("cached", "constant", "none"):
        with qcow2ovl.open(bad, overlap_check=spec) as img:
            assert img.problems == [], spec


def test_memory_limit_falls_back_to_the_naive_check(snap_image: Path) -> None:
    with (
        qcow2ovl.open(snap_image) as full,
        qcow2ovl.open(snap_image, map_memory_limit=256) as small,
    ):
        extents = full.metadata_extents()
        cs = full.info.cluster_size
        assert small.map_memory_usage() <= 256
        assert small.unchecked_ranges(), "the limit must have been hit"
        size = max(off + n for off, n, _ in extents) + 4 * cs
        for off in range(0, size, cs // 2):
            exact = small.check_overlap(off, 512)
            assert exact == full.check_overlap(off, 512), hex(off)
        for off, n, types in extents:
            assert small.check_overlap(off, n) == full.check_overlap(off, n) != 0
            assert small.check_overlap(off, n) & types == types


def test_writable_open_refuses_corrupt_images(snap_image: Path, tmp_path: Path) -> None:
    img_path = tmp_path / "corrupt.qcow2"
    shutil.copyfile(snap_image, img_path)
    (incompat,) = qi.peek(img_path, 72, ">Q")
    qi.poke(img_path, 72, ">Q", incompat | 2)
    with qcow2ovl.open(img_path) as img:
        assert img.info.corrupt and "corrupt bit" in img.info.features
    with pytest.raises(qcow2ovl.CorruptImageError, match="cannot be opened read/write"):
        qcow2ovl.open(img_path, writable=True)


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        qcow2ovl.open(tmp_path / "nope.qcow2")


def test_bad_option_is_rejected_before_io(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unsupported value 'blubb'"):
        qcow2ovl.open(tmp_path / "nope.qcow2", overlap_check="blubb")


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_map_json_matches_the_api(snap_image: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["map", str(snap_image), "--output", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    with qcow2ovl.open(snap_image) as img:
        want = img.metadata_extents()
    assert [(r["offset"], r["length"], r["types"]) for r in records] == [
        (o, n, int(t)) for o, n, t in want
    ]
    for r in records:
        assert r["names"] == [t.key for t in T(r["types"]).bits()]


def test_cli_map_human_is_aligned(snap_image: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["map", str(snap_image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["Offset", "Length", "Types"]
    assert all(line[16] != " " and line[32] != " " for line in lines[1:])
    assert any("active-l2|inactive-l2" in line for line in lines)


def test_cli_info(snap_image: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["info", str(snap_image), "--output", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    q = qi.qemu_info(snap_image)
    assert info["virtual-size"] == q["virtual-size"]
    assert [s["name"] for s in info["snapshots"]] == [s["name"] for s in q["snapshots"]]
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert [b["name"] for b in bitmaps] == ["b0"]
    assert cli_main(["info", str(snap_image)]) == 0
    human = capsys.readouterr().out
    assert "virtual size: 2 GiB (2147483648 bytes)" in human
    assert "Snapshot list:" in human


def test_cli_errors_are_one_line_and_nonzero(tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(4096))
    for args in (["map", str(raw)], ["info", str(tmp_path / "missing")]):
        proc = subprocess.run(
            [sys.executable, "-m", "qcow2ovl", *args], capture_output=True, text=True
        )
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1
        assert proc.stderr.startswith("qcow2ovl: ")


def test_invalid_bitmap_table_entry_is_refused_like_qemu(snap_image: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bitmap.qcow2"
    shutil.copyfile(snap_image, bad)
    with qcow2ovl.open(bad) as img:
        table = img.bitmaps[0].table_offset
    (entry,) = qi.peek(bad, table, ">Q")
    qi.poke(bad, table, ">Q", entry | 0x2)  # a reserved bit
    with pytest.raises(qcow2ovl.FormatError, match=r"\.qcow2: Could not read bitmap_table table"):
        qcow2ovl.open(bad)
    assert "Could not read bitmap_table table" in (qi.qemu_open_error(bad) or "")


def test_info_is_live_after_resize_and_snapshot_apply(tmp_path: Path) -> None:
    """Image.info is made at each access: after resize() and apply_snapshot() its virtual size
    is the disk's (as qemu-img info then reports it), its file size the file's."""
    path = tmp_path / "live.qcow2"
    qcow2ovl.create(path, 4 * qi.MiB)
    with qcow2ovl.open(path, writable=True) as img:
        assert img.info.virtual_size == 4 * qi.MiB
        img.create_snapshot("small")
        img.resize(64 * qi.MiB)
        assert img.info.virtual_size == img.virtual_size == 64 * qi.MiB
        img.write(32 * qi.MiB, b"\x01" * 65536)
        assert img.info.file_size == path.stat().st_size
        img.apply_snapshot("small")
        assert img.info.virtual_size == 4 * qi.MiB
        assert isinstance(img.info, qcow2ovl.ImageInfo)
        assert img.info.cluster_size == 65536
    assert qi.qemu_info(path)["virtual-size"] == 4 * qi.MiB
