"""Persistent dirty bitmaps stay true through our writes, with QEMU as the oracle.

Images and bitmaps are made by qemu-img; our engine writes, zeroes, discards and writes
compressed clusters; then `qemu-img info` must show the bitmaps consistent with their flags,
`qemu-img check` must find nothing (no leaked bitmap clusters), and the dirty ranges QEMU
exports (`qemu-nbd -B NAME`, read back by `qemu-img map` with `x-dirty-bitmap`) must equal our
`dirty_extents()` and a model of dirty granules. Also: QEMU's and our writes in turn, a writer
killed before close (the bitmaps are left in use, as QEMU leaves them), a snapshot revert (we
mark what it changes; QEMU does not), resize, and the other autoclear bits.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi

SIZE = 32 << 20


class DirtyModel:
    """Which granules of one bitmap must be dirty."""

    def __init__(self, size: int, granularity: int) -> None:
        self.size = size
        self.g = granularity
        self.bits: set[int] = set()

    def mark(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        if length > 0 and offset < end:
            self.bits.update(range(offset // self.g, -(-end // self.g)))

    def resize(self, size: int) -> None:
        self.size = size
        last = -(-size // self.g)
        self.bits = {b for b in self.bits if b < last}

    def runs(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for b in sorted(self.bits):
            start, end = b * self.g, min((b + 1) * self.g, self.size)
            if out and sum(out[-1]) == start:
                out[-1] = (out[-1][0], out[-1][1] + end - start)
            else:
                out.append((start, end - start))
        return out


def qemu_bitmaps(path: Path) -> list[dict[str, object]]:
    info = qi.qemu_info(path)
    return list(info["format-specific"]["data"].get("bitmaps", []))


def make_image(path: Path, cluster_size: int) -> None:
    """A qemu-img image with some data and three bitmaps: `en` (default granularity), `dis`
    (disabled) and `fine` (512-byte granularity)."""
    qi.create(path, SIZE, opts={"cluster_size": cluster_size})
    qi.write(path, [(0, 1 << 20, 0x11), (SIZE - 65536, 65536, 0x22)])
    qi.bitmap_add(path, "en")
    qi.bitmap_add(path, "dis", disabled=True)
    qi.bitmap_add(path, "fine", 512)


def models_for(path: Path) -> dict[str, DirtyModel]:
    with qcow2ovl.open(path) as img:
        return {b.name: DirtyModel(img.virtual_size, b.granularity) for b in img.bitmaps}


def random_changes(img: qcow2ovl.Image, rng: random.Random, models: dict[str, DirtyModel]) -> None:
    """Writes, zeroes, discards and compressed writes, each marked in the enabled models."""
    cs = img.info.cluster_size
    size = img.virtual_size
    for _ in range(30):
        kind = rng.choice(["write", "write", "zeroes", "discard", "compressed"])
        offset = rng.randrange(0, size)
        length = min(rng.choice([1, 511, 512, 4096, 70000, 1 << 20]), size - offset)
        if kind == "write":
            img.write(offset, bytes([rng.randrange(1, 256)]) * length)
        elif kind == "zeroes":
            img.write_zeroes(offset, length, unmap=rng.random() < 0.5)
        elif kind == "discard":
            img.discard(offset, length)
        else:
            offset = offset // cs * cs
            length = cs
            img.write_compressed(offset, os.urandom(cs // 2) + bytes(cs // 2))
        for name, model in models.items():
            if name != "dis":
                model.mark(offset, length)


def assert_bitmaps_true(path: Path, models: dict[str, DirtyModel]) -> None:
    listed = {b["name"]: b for b in qemu_bitmaps(path)}
    assert set(listed) == set(models)
    for name, b in listed.items():
        assert b["flags"] == ([] if name == "dis" else ["auto"]), b
    check = qi.qemu_check(path)
    assert qi.check_is_clean(check) and check.get("leaks", 0) == 0, check
    with qcow2ovl.open(path) as img:
        for name, model in models.items():
            ours = img.dirty_extents(name)
            assert ours == model.runs(), name
            assert qi.qemu_dirty(path, name) == ours, name


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 << 20])
def test_our_writes_keep_every_bitmap_true(tmp_path: Path, cluster_size: int) -> None:
    path = tmp_path / "disk.qcow2"
    make_image(path, cluster_size)
    models = models_for(path)
    rng = random.Random(cluster_size)
    for _session in range(2):  # a second session stores over what the first stored
        with qcow2ovl.open(path, writable=True) as img:
            random_changes(img, rng, models)
            # The handle answers from memory before anything is stored.
            assert img.dirty_extents("en") == models["en"].runs()
        assert_bitmaps_true(path, models)


def test_qemu_and_our_writes_in_turn(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make_image(path, 65536)
    models = models_for(path)
    rng = random.Random(7)
    for turn in range(4):
        if turn % 2 == 0:
            writes = [(rng.randrange(0, SIZE - 9000), rng.randrange(1, 9000), 0x33)]
            qi.write(path, writes)
            for offset, length, _ in writes:
                for name, m in models.items():
                    if name != "dis":
                        m.mark(offset, length)
        else:
            with qcow2ovl.open(path, writable=True) as img:
                random_changes(img, rng, models)
    assert_bitmaps_true(path, models)


KILLED_WRITER = """
import os, sys, qcow2ovl
img = qcow2ovl.open(sys.argv[1], writable=True)
img.write(4096, b"k" * 4096)
img.flush()
os._exit(0)
"""


def test_a_killed_writer_leaves_the_bitmaps_in_use(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make_image(path, 65536)
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], check=True)
    for b in qemu_bitmaps(path):
        assert "in-use" in b["flags"], b
    with qcow2ovl.open(path) as img:
        assert all(b.inconsistent for b in img.bitmaps)
        with pytest.raises(qcow2ovl.BitmapError, match="Bitmap 'en' is inconsistent"):
            img.dirty_extents("en")
    # A writable handle keeps them as they are, and refuses to resize, as QEMU does.
    with qcow2ovl.open(path, writable=True) as img:
        img.write(0, b"x")
        with pytest.raises(qcow2ovl.BitmapError, match="Bitmap 'en' is inconsistent"):
            img.resize(2 * SIZE)
    assert all("in-use" in b["flags"] for b in qemu_bitmaps(path))
    assert qi.check_is_clean(qi.qemu_check(path))
    qi.qemu_img("bitmap", "--remove", str(path), "en")
    assert [b["name"] for b in qemu_bitmaps(path)] == ["dis", "fine"]
    assert qi.check_is_clean(qi.qemu_check(path))


def test_info_lists_bitmaps_as_qemu_img_info(tmp_path: Path) -> None:
    """`qcow2ovl info` (human and JSON) shows the bitmaps and their flags as qemu-img info does,
    consistent ones and ones a killed writer left in use."""
    path = tmp_path / "disk.qcow2"
    make_image(path, 65536)
    for _ in range(2):
        for fmt in ("human", "json"):
            ours = subprocess.run(
                [sys.executable, "-m", "qcow2ovl", "info", "--output", fmt, str(path)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            theirs = qi.qemu_img("info", "--output", fmt, str(path)).stdout
            if fmt == "json":
                mine = json.loads(ours)
                mine.pop("qcow2ovl", None)
                assert mine == json.loads(theirs)
            else:
                # Our own facts are one block of our own ("qcow2ovl:" and its indented lines).
                assert re.sub(r"qcow2ovl:\n(?:    .*\n)*", "", ours) == theirs
        subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], check=True)
    assert all("in-use" in b["flags"] for b in qemu_bitmaps(path))


def test_a_writable_open_that_writes_nothing_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make_image(path, 65536)
    before = path.read_bytes()
    with qcow2ovl.open(path, writable=True) as img:
        assert img.dirty_extents("en") == []
    assert path.read_bytes() == before


def test_snapshot_revert_marks_what_it_changes(tmp_path: Path) -> None:
    """QEMU leaves the bitmaps alone when it applies a snapshot; we mark every cluster whose
    mapping the revert changes, so a backup that trusts the bitmap copies the reverted data."""
    path = tmp_path / "disk.qcow2"
    make_image(path, 65536)
    models = models_for(path)
    with qcow2ovl.open(path, writable=True) as img:
        img.create_snapshot("before")
        img.write(8 << 20, b"a" * 100)  # a new cluster after the snapshot
        img.write(0, b"b" * 100)  # a copy-on-write of a shared cluster
        img.apply_snapshot("before")
    for name, m in models.items():
        if name != "dis":
            m.mark(8 << 20, 65536)
            m.mark(0, 65536)
    # The writes marked their granules; the revert marked the two whole clusters it remapped.
    assert_bitmaps_true(path, models)


def test_resize_carries_the_bitmaps(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make_image(path, 65536)
    models = models_for(path)
    with qcow2ovl.open(path, writable=True) as img:
        img.write(SIZE - 100, b"e" * 100)
        img.resize(2 * SIZE)
        img.write(2 * SIZE - 1, b"f")
    for name, m in models.items():
        if name != "dis":
            m.mark(SIZE - 100, 100)
        m.resize(2 * SIZE)
        if name != "dis":
            m.mark(2 * SIZE - 1, 1)
    assert_bitmaps_true(path, models)
    end = SIZE // 2 + 65536
    with qcow2ovl.open(path, writable=True) as img:
        img.discard(end, 2 * SIZE - end)
        img.resize(end)
    for name, m in models.items():
        if name != "dis":
            m.mark(end, 2 * SIZE - end)
        m.resize(end)
    assert_bitmaps_true(path, models)


def test_unknown_autoclear_bits_are_still_cleared(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make_image(path, 65536)
    (autoclear,) = qi.peek(path, 88, ">Q")
    assert autoclear == 1
    qi.poke(path, 88, ">Q", autoclear | 1 << 40)
    with qcow2ovl.open(path, writable=True) as img:
        img.write(0, b"z")
    assert qi.peek(path, 88, ">Q") == (1,)
    assert all(b["flags"] in (["auto"], []) for b in qemu_bitmaps(path))


def test_the_cli_io_command_keeps_the_bitmaps(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make_image(path, 65536)
    models = models_for(path)
    subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "io", "-c", "write -P 5 1M 4k", str(path)],
        check=True,
        capture_output=True,
    )
    for name, m in models.items():
        if name != "dis":
            m.mark(1 << 20, 4096)
    assert_bitmaps_true(path, models)


def test_a_leak_repair_keeps_the_bitmaps(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make_image(path, 65536)
    qi.write(path, [(5 << 20, 4096, 0x44)])
    before = {name: qi.qemu_dirty(path, name) for name in ("en", "fine")}
    assert before["en"] == [(5 << 20, 65536)]
    (table,) = qi.peek(path, 48, ">Q")
    (block,) = qi.peek(path, table, ">Q")
    qi.poke(path, block, ">H", 2)  # cluster 0 (the header) counted twice: a leak
    assert qi.qemu_check(path)["leaks"] == 1
    result = qcow2ovl.check(path, repair="leaks")
    assert result.leaks_fixed == 1 and result.clean
    assert all(b["flags"] in (["auto"], []) for b in qemu_bitmaps(path))
    assert {name: qi.qemu_dirty(path, name) for name in ("en", "fine")} == before
    assert qi.check_is_clean(qi.qemu_check(path))


# ---- the bitmap operations, against qemu-img bitmap on a twin -----------------------------


def twins(tmp_path: Path) -> tuple[Path, Path]:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    make_image(ours, 65536)
    theirs.write_bytes(ours.read_bytes())
    return ours, theirs


def assert_same_bitmaps(ours: Path, theirs: Path) -> None:
    assert qemu_bitmaps(ours) == qemu_bitmaps(theirs)
    for b in qemu_bitmaps(ours):
        name = str(b["name"])
        assert qi.qemu_dirty(ours, name) == qi.qemu_dirty(theirs, name), name
    check = qi.qemu_check(ours)
    assert qi.check_is_clean(check) and check.get("leaks", 0) == 0, check


def test_add_remove_clear_enable_disable_merge_as_qemu_img(tmp_path: Path) -> None:
    ours, theirs = twins(tmp_path)
    steps: list[tuple[list[str], object]] = [
        (["--add", "-g", "8192", "new"], lambda i: i.add_bitmap("new", granularity=8192)),
        (["--add", "--disable", "off"], lambda i: i.add_bitmap("off", enabled=False)),
        (["--add", "plain"], lambda i: i.add_bitmap("plain")),
        (["--remove", "fine"], lambda i: i.remove_bitmap("fine")),
        (["--disable", "en"], lambda i: i.disable_bitmap("en")),
        (["--enable", "dis"], lambda i: i.enable_bitmap("dis")),
        (["--merge", "new", "off"], lambda i: i.merge_bitmap("off", "new")),
        (["--clear", "plain"], lambda i: i.clear_bitmap("plain")),
    ]
    writes = [(1 << 20, 5000, 0x55), (9 << 20, 70000, 0x66)]
    for args, op in steps:
        qi.qemu_img("bitmap", *args[:-1], str(theirs), args[-1])
        qi.write(theirs, writes)
        with qcow2ovl.open(ours, writable=True) as img:
            op(img)  # type: ignore[operator]
            for offset, length, pattern in writes:
                img.write(offset, bytes([pattern]) * length)
        assert_same_bitmaps(ours, theirs)
        writes = [(o + (3 << 20), n, p) for o, n, p in writes]


def test_the_first_bitmap_and_the_last(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qi.create(path, SIZE)
    with qcow2ovl.open(path, writable=True) as img:
        img.add_bitmap("b")
        img.write(0, b"x")
        assert img.dirty_extents("b") == [(0, 65536)]
    assert qemu_bitmaps(path) == [{"flags": ["auto"], "name": "b", "granularity": 65536}]
    assert qi.qemu_dirty(path, "b") == [(0, 65536)]
    assert qi.peek(path, 88, ">Q") == (1,)
    with qcow2ovl.open(path, writable=True) as img:
        img.remove_bitmap("b")
    assert qemu_bitmaps(path) == []
    assert qi.peek(path, 88, ">Q") == (0,)
    check = qi.qemu_check(path)
    assert qi.check_is_clean(check) and check.get("leaks", 0) == 0, check


def test_merge_from_another_image(tmp_path: Path) -> None:
    ours, other = twins(tmp_path)
    qi.write(other, [(12 << 20, 100, 1)])
    with qcow2ovl.open(other) as src, qcow2ovl.open(ours, writable=True) as img:
        img.merge_bitmap("dis", "en", source_image=src)
    assert qi.qemu_dirty(ours, "dis") == [(12 << 20, 65536)]


def test_refusals_in_qemu_img_words(tmp_path: Path) -> None:
    ours, theirs = twins(tmp_path)
    cases: list[tuple[list[str], object]] = [
        (["--add", "en"], lambda i: i.add_bitmap("en")),
        (["--add", "-g", "1000", "x"], lambda i: i.add_bitmap("x", granularity=1000)),
        (["--add", "-g", "256", "x"], lambda i: i.add_bitmap("x", granularity=256)),
        (["--add", ""], lambda i: i.add_bitmap("")),
        (["--remove", "nope"], lambda i: i.remove_bitmap("nope")),
        (["--clear", "nope"], lambda i: i.clear_bitmap("nope")),
        (["--merge", "nope", "en"], lambda i: i.merge_bitmap("en", "nope")),
    ]
    before = ours.read_bytes()
    for args, op in cases:
        proc = qi.qemu_img("bitmap", *args[:-1], str(theirs), args[-1], ok=(1,))
        qemu_says = proc.stderr.strip().split(" failed: ", 1)[1]
        with qcow2ovl.open(ours, writable=True) as img:
            with pytest.raises(qcow2ovl.BitmapError) as caught:
                op(img)  # type: ignore[operator]
        assert str(caught.value) == qemu_says
    assert ours.read_bytes() == before


def test_incremental_backup_recipe(tmp_path: Path) -> None:
    """The README's recipe, with QEMU and us writing between backups: each incremental
    backup, restored, equals the disk."""
    import shutil

    disk_path, backup_path = tmp_path / "vm.qcow2", tmp_path / "backup.raw"
    qcow2ovl.create(disk_path, SIZE)
    with qcow2ovl.open(disk_path, writable=True) as disk, open(backup_path, "wb") as backup:
        disk.add_bitmap("since-backup")
        shutil.copyfileobj(disk.stream(), backup)
    rng = random.Random(3)
    for period in range(3):
        qi.write(disk_path, [(rng.randrange(0, SIZE - 4096), 4096, 0x70 + period)])
        with qcow2ovl.open(disk_path, writable=True) as disk:
            random_changes(disk, rng, {})
        with qcow2ovl.open(disk_path, writable=True) as disk, open(backup_path, "r+b") as backup:
            extents = disk.dirty_extents("since-backup")
            assert extents and sum(n for _, n in extents) < SIZE
            for offset, length in extents:
                backup.seek(offset)
                backup.write(disk.read(offset, length))
            disk.clear_bitmap("since-backup")
            assert disk.dirty_extents("since-backup") == []
        qi.qemu_img("compare", "-f", "qcow2", "-F", "raw", str(disk_path), str(backup_path))
    assert qi.check_is_clean(qi.qemu_check(disk_path))
