"""`qcow2ovl bitmap` against `qemu-img bitmap`: each command line runs on twin images, ours
through qcow2ovl and the other through qemu-img; the exit status, the message (with the
program's name swapped), `qemu-img info`'s bitmaps, the dirty ranges QEMU exports and `qemu-img
check` must agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import qemu_images as qi
from test_bitmaps import assert_same_bitmaps, make_image, qemu_bitmaps

LINES = [
    ["--add", "{img}", "new"],
    ["--add", "-g", "8k", "{img}", "new"],
    ["--add", "--disable", "{img}", "new"],
    ["--add", "--disable", "--enable", "{img}", "new"],
    ["--add", "-g", "4096", "--remove", "{img}", "new"],
    ["--remove", "{img}", "fine"],
    ["--remove", "--remove", "{img}", "en"],
    ["--clear", "{img}", "en"],
    ["--disable", "{img}", "en"],
    ["--enable", "{img}", "dis"],
    ["--merge", "en", "{img}", "dis"],
    ["--merge", "en", "-b", "{src}", "{img}", "fine"],
    ["--merge", "en", "-b", "{src}", "-F", "qcow2", "{img}", "dis"],
    ["--merge", "en", "-b", "{src}", "-F", "raw", "{img}", "dis"],
    ["--merge", "nope", "--add", "{img}", "x"],
    ["--add", "{img}", "en"],
    ["--add", "-g", "1000", "{img}", "x"],
    ["--add", "-g", "abc", "{img}", "x"],
    ["--clear", "{img}", "nope"],
    [],
    ["{img}", "x"],
    ["--add", "{img}"],
    ["--add", "{img}", "x", "y"],
    ["-g", "4096", "--remove", "{img}", "en"],
    ["-b", "{src}", "--add", "{img}", "x"],
    ["-F", "qcow2", "--merge", "en", "{img}", "x"],
]


def run_ours(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "bitmap", *args], capture_output=True, text=True
    )


@pytest.mark.parametrize("line", LINES, ids=[" ".join(a) or "(none)" for a in LINES])
def test_bitmap_command_as_qemu_img(tmp_path: Path, line: list[str]) -> None:
    ours, theirs, src = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2", tmp_path / "src.qcow2"
    make_image(ours, 65536)
    qi.write(ours, [(3 << 20, 5000, 0x12)])
    theirs.write_bytes(ours.read_bytes())
    make_image(src, 65536)
    qi.write(src, [(7 << 20, 100, 0x34)])

    def fill(img: Path) -> list[str]:
        return [a.format(img=img, src=src) for a in line]

    qemu = subprocess.run(["qemu-img", "bitmap", *fill(theirs)], capture_output=True, text=True)
    mine = run_ours(fill(ours))
    assert mine.returncode == qemu.returncode, (mine.stderr, qemu.stderr)
    if qemu.returncode:
        first = qemu.stderr.splitlines()[0].replace(str(theirs), str(ours))
        assert mine.stderr.splitlines()[0] == first.replace("qemu-img:", "qcow2ovl:", 1)
    assert_same_bitmaps(ours, theirs)


@pytest.mark.parametrize(
    "flags", [["--bitmaps"], ["--bitmaps", "--skip-broken-bitmaps"], ["--skip-broken-bitmaps"]]
)
@pytest.mark.parametrize("broken", [False, True])
def test_convert_bitmaps_as_qemu_img(tmp_path: Path, flags: list[str], broken: bool) -> None:
    src = tmp_path / "src.qcow2"
    make_image(src, 65536)
    qi.write(src, [(3 << 20, 5000, 0x12), (20 << 20, 70000, 0x13)])
    if broken:  # a writer killed before it stored the bitmaps
        qi.qemu_io(src, "write 0 4k", "abort", ok=(0, 134, -6))
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    args = [*flags, "-O", "qcow2", str(src)]
    qemu = subprocess.run(
        ["qemu-img", "convert", *args, str(theirs)], capture_output=True, text=True
    )
    mine = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "convert", *args, str(ours)],
        capture_output=True,
        text=True,
    )
    assert mine.returncode == qemu.returncode, (mine.stderr, qemu.stderr)
    assert mine.stderr.replace("qcow2ovl:", "qemu-img:") == qemu.stderr
    if qemu.returncode:
        return
    assert qemu_bitmaps(ours) == qemu_bitmaps(theirs)
    for b in qemu_bitmaps(ours):
        name = str(b["name"])
        assert qi.qemu_dirty(ours, name) == qi.qemu_dirty(theirs, name) == qi.qemu_dirty(src, name)
    qi.qemu_img("compare", str(ours), str(theirs))
    check = qi.qemu_check(ours)
    assert qi.check_is_clean(check) and check.get("leaks", 0) == 0, check


def test_convert_bitmaps_to_raw_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    make_image(src, 65536)
    args = ["--bitmaps", "-O", "raw", str(src)]
    qemu = subprocess.run(
        ["qemu-img", "convert", *args, str(tmp_path / "q.raw")], capture_output=True, text=True
    )
    mine = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "convert", *args, str(tmp_path / "o.raw")],
        capture_output=True,
        text=True,
    )
    assert mine.returncode == qemu.returncode == 1
    assert mine.stderr.replace("qcow2ovl:", "qemu-img:") == qemu.stderr
