"""`qcow2ovl resize` against `qemu-img resize`: every command line runs on twin copies of an
image, one resized by qemu-img, one by qcow2ovl. The exit status, stdout and stderr (with the
program's name swapped) must be the same; after a success both have the same virtual size, the
same guest data (`qemu-img compare`), the same guest map (allocation, zero and backing flags,
host offsets aside) and a clean `qemu-img check`; after a refusal our copy is byte for byte
what it was."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi
import verb_twins
from verb_twins import map_flags, snapshot_disks, virtual_size

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img and qemu-io")

KiB, MiB = 1024, 1 << 20
NAME = "disk.img"

Builder = Callable[[Path, Path], None]


# ---- images ----------------------------------------------------------------------------------


def _qcow2(
    compat: str = "1.1", size: int = 4 * MiB, **opts: object
) -> Callable[[Path, Path], None]:
    """A qcow2 image with data at the start and in its last MiB (what a shrink discards)."""

    def build(path: Path, shared: Path) -> None:
        qi.create(path, size, opts={"compat": compat, **opts})
        qi.write(path, [(0, MiB, 0x11), (size - MiB, MiB, 0x22)])

    return build


def _snapshots(compat: str) -> Builder:
    def build(path: Path, shared: Path) -> None:
        _qcow2(compat)(path, shared)
        qi.snapshot_create(path, "snap1")
        qi.write(path, [(3 * MiB + 4096, 8192, 0x33)])

    return build


def _bitmaps(path: Path, shared: Path) -> None:
    _qcow2()(path, shared)
    qi.bitmap_add(path, "en")
    qi.bitmap_add(path, "dis", disabled=True)
    qi.bitmap_add(path, "fine", 512)
    qi.write(path, [(2 * MiB, 70000, 0x44), (4 * MiB - 4096, 4096, 0x45)])


def _with_bitmaps(build: Builder, granularity: int | None = None) -> Builder:
    def with_bitmaps(path: Path, shared: Path) -> None:
        build(path, shared)
        qi.bitmap_add(path, "en", granularity)
        qi.bitmap_add(path, "dis", granularity, disabled=True)
        qi.write(path, [(2 * MiB, 4096, 0x47)])

    return with_bitmaps


def _compressed(path: Path, shared: Path) -> None:
    qi.create(path, 4 * MiB)
    qi.qemu_io(path, "write -c -P 0x55 3M 1M", "write -P 0x11 0 64k")


def _overlay(compat: str, size: int) -> Builder:
    """An image over a 10 MiB backing file that is data everywhere (so what the overlay does
    not cover shows through)."""

    def build(path: Path, shared: Path) -> None:
        base = shared / "base.qcow2"
        if not base.exists():
            qi.create(base, 10 * MiB)
            qi.write(base, [(0, 10 * MiB, 0x5A)])
        qi.create(path, size, opts={"compat": compat}, backing=base)
        qi.write(path, [(MiB, 64 * KiB, 0x66)])

    return build


IMAGES: dict[str, Builder] = {
    "v3": _qcow2(),
    "v2": _qcow2("0.10"),
    "v3-snapshot": _snapshots("1.1"),
    "v2-snapshot": _snapshots("0.10"),
    "bitmaps": _bitmaps,
    "extended-l2": _qcow2(extended_l2=True, cluster_size=32 * KiB),
    "small-clusters": _qcow2(cluster_size=512),
    "compressed": _compressed,
    "overlay-v3": _overlay("1.1", 5 * MiB),
    "overlay-v3-unaligned": _overlay("1.1", 5 * MiB + 512),
    "overlay-v2": _overlay("0.10", 5 * MiB),
    "overlay-v3-longer": _overlay("1.1", 12 * MiB),
    "overlay-bitmaps": _with_bitmaps(_overlay("1.1", 5 * MiB + 512)),
    "bitmaps-coarse": _with_bitmaps(_qcow2(size=4 * MiB + 512), 1 << 20),
}

#: Command lines run on every image.
LINES = [
    ["{img}", "+1M"],
    ["{img}", "9M"],
    ["{img}", "-1M"],
    ["--shrink", "{img}", "-1M"],
    ["--shrink", "{img}", "1M"],
    ["--shrink", "{img}", "3146240"],  # 3 MiB + 512: a partial last cluster is kept
    ["{img}", "+0"],
    ["--shrink", "{img}", "-0"],
    ["{img}", "+1000"],
    ["--preallocation=full", "{img}", "+1M"],
    ["--preallocation=falloc", "{img}", "+3M"],
]

#: Command lines run on the plain version 3 image only: parsing, options and limits.
EDGE_LINES = [
    ["-q", "{img}", "+1M"],
    ["--quiet", "--shrink", "{img}", "-1M"],
    ["{img}", "-1M", "--shrink"],
    ["-f", "qcow2", "{img}", "+1M"],
    ["--format=qcow2", "{img}", "5M"],
    ["--shr", "{img}", "2M"],
    ["--preallocation", "off", "{img}", "+64k"],
    ["--preallocation=off", "--shrink", "{img}", "-1M"],
    ["--preallocation=full", "{img}", "-1M"],
    ["--preallocation=full", "--shrink", "{img}", "-1M"],
    ["--preallocation=falloc", "{img}", "+0"],
    ["--preallocation=full", "{img}", "0"],
    ["--preallocation=bogus", "{img}", "+1M"],
    ["--preallocation=bogus", "{img}"],
    ["{img}"],
    [],
    ["{img}", "1M", "2M"],
    ["{img}", "0"],
    ["--shrink", "{img}", "0"],
    ["--shrink", "{img}", "-4M"],
    ["--shrink", "{img}", "-5M"],
    ["--shrink", "{img}", "512"],
    ["--shrink", "{img}", "1000"],
    ["{img}", "1000"],
    ["{img}", "4.5M"],
    ["{img}", "4.5m"],
    ["{img}", "1g"],
    ["{img}", "+0.5k"],
    ["{img}", " 5M"],
    ["{img}", "+ 1M"],
    ["{img}", "5M "],
    ["{img}", ""],
    ["{img}", "+"],
    ["{img}", "abc"],
    ["{img}", "1.5"],
    ["{img}", "1.5b"],
    ["{img}", "1e3"],
    ["{img}", "0x600000"],
    ["{img}", "+0x200"],
    ["{img}", "+0x5b"],
    ["{img}", "0x5M"],
    ["{img}", "+-4M"],
    ["{img}", "+-4"],
    ["{img}", "+-00"],
    ["{img}", "--", "-1M"],
    ["{img}", "-0x1000"],
    ["{img}", "16E"],
    ["{img}", "-16E"],
    ["{img}", "18446744073709551616"],
    ["{img}", "18446744073709551615"],
    ["{img}", "0xffffffffffffffff"],
    ["{img}", "8E"],
    ["{img}", "+8E"],
    ["{img}", "9E"],
    ["{img}", "-9E"],
    ["{img}", "4P"],
    ["{img}", "2251799813685760"],  # 2 PiB + 512: one L1 entry too many
    ["{img}", "9223372035781033984"],
    ["{img}", "9223372035781034496"],
    ["{img}", "9223372036854775807"],
    ["-f", "foo", "{img}", "+1M"],
    ["-f", "foo", "{img}", "abc"],
    ["-f", "raw", "{img}", "+1M"],
    ["{missing}", "+1M"],
    ["{missing}", "abc"],
    ["-f", "raw", "{missing}", "1M"],
]

#: Raw files (a 1000000-byte file of random bytes, or an empty one).
RAW_LINES = [
    ["-f", "raw", "{img}", "+1M"],
    ["-f", "raw", "{img}", "+1"],
    ["-f", "raw", "{img}", "+0"],
    ["-f", "raw", "{img}", "2000000"],
    ["-f", "raw", "{img}", "1001"],
    ["-f", "raw", "--shrink", "{img}", "1001"],
    ["-f", "raw", "--shrink", "{img}", "-1"],
    ["-f", "raw", "--shrink", "{img}", "-1000000"],
    ["-f", "raw", "{img}", "0"],
    ["{img}", "+1M"],
    ["{img}", "1000"],
    ["--shrink", "{img}", "1000"],
    ["-f", "raw", "--preallocation=falloc", "{img}", "2000000"],
    ["-f", "raw", "--preallocation=full", "{img}", "3000000"],
    ["-f", "raw", "--preallocation=metadata", "{img}", "2000000"],
    ["-f", "raw", "--preallocation=full", "--shrink", "{img}", "1000"],
    ["-f", "raw", "--preallocation=off", "--shrink", "{img}", "1000"],
    ["-f", "raw", "{img}", "1E"],
    ["-f", "raw", "{img}", "9223372036854775807"],
    ["-f", "qcow2", "{img}", "2M"],
]
EMPTY_RAW_LINES = [
    ["-f", "raw", "{img}", "1"],
    ["-f", "raw", "{img}", "100"],
    ["-f", "raw", "{img}", "513"],
    ["-f", "raw", "{img}", "1M"],
    ["-f", "raw", "--preallocation=falloc", "{img}", "100"],
    ["-f", "raw", "--preallocation=full", "{img}", "8000"],
    ["{img}", "1M"],
    ["-f", "qcow2", "{img}", "1M"],
]


# ---- running both ----------------------------------------------------------------------------


def run_ours(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``qcow2ovl resize ARGV`` in this process, in *cwd*."""
    return verb_twins.run_ours("resize", argv, cwd)


def run_qemu(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    return verb_twins.run_qemu("resize", argv, cwd)


@contextlib.contextmanager
def twins(tmp_path: Path, build: Callable[[Path, Path], None]) -> Iterator[tuple[Path, Path]]:
    shared = tmp_path / "shared"
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for d in (shared, ours, theirs):
        d.mkdir()
    build(ours / NAME, shared)
    (theirs / NAME).write_bytes((ours / NAME).read_bytes())
    yield ours, theirs


def compare_line(
    tmp_path: Path,
    build: Callable[[Path, Path], None],
    line: list[str],
    fmt: str = "qcow2",
    *,
    deep: bool = True,
) -> tuple[int, Path, Path]:
    """Runs *line* on twins built by *build*; asserts the same status and output, and
    afterwards the same disk (or, after a refusal, our file untouched). Returns the status
    and the two images. Without *deep*, the disks are not read (petabyte sizes)."""
    with twins(tmp_path, build) as (ours, theirs):
        before = (ours / NAME).read_bytes()
        argv = [a.format(img=NAME, missing="missing.img") for a in line]
        theirs_rc, theirs_out, theirs_err = run_qemu(argv, theirs)
        ours_rc, ours_out, ours_err = run_ours(argv, ours)
        assert (ours_rc, ours_out, ours_err) == (theirs_rc, theirs_out, theirs_err)
        mine, other = ours / NAME, theirs / NAME
        if not mine.exists():
            return ours_rc, mine, other
        if ours_rc:
            assert mine.read_bytes() == before
            return ours_rc, mine, other
        assert virtual_size(mine, fmt) == virtual_size(other, fmt)
        if not deep:
            assert qi.check_is_clean(qi.qemu_check(mine))
            return ours_rc, mine, other
        preallocated = any(a.startswith("--preallocation=f") for a in line)
        upto = None
        if (
            preallocated
            and fmt == "qcow2"
            and qi.qemu_info(mine)["format-specific"]["data"].get("extended-l2")
        ):
            # QEMU preallocates extended L2 clusters with every subcluster unallocated (the
            # map says not present, no data); ours are written with zeros (data): the maps
            # agree up to the old end.
            upto = int.from_bytes(before[24:32], "big")
        assert map_flags(mine, fmt, upto) == map_flags(other, fmt, upto)
        proc = subprocess.run(
            ["qemu-img", "compare", "-f", fmt, "-F", fmt, str(mine), str(other)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if fmt == "qcow2":
            check = qi.qemu_check(mine)
            assert qi.check_is_clean(check), check
            assert snapshot_disks(mine, tmp_path) == snapshot_disks(other, tmp_path)
            ours_bitmaps = qi.qemu_info(mine)["format-specific"]["data"].get("bitmaps", [])
            theirs_bitmaps = qi.qemu_info(other)["format-specific"]["data"].get("bitmaps", [])
            assert ours_bitmaps == theirs_bitmaps
            for b in ours_bitmaps:
                assert qi.qemu_dirty(mine, b["name"]) == qi.qemu_dirty(other, b["name"])
        return ours_rc, mine, other


def _ids(lines: list[list[str]]) -> list[str]:
    return [
        " ".join(repr(a) if not a or " " in a else a for a in line) or "(none)" for line in lines
    ]


# ---- the command lines -----------------------------------------------------------------------


@pytest.mark.parametrize("line", LINES, ids=_ids(LINES))
@pytest.mark.parametrize("kind", list(IMAGES))
def test_resize_as_qemu_img(tmp_path: Path, kind: str, line: list[str]) -> None:
    compare_line(tmp_path, IMAGES[kind], line)


@pytest.mark.parametrize("line", EDGE_LINES, ids=_ids(EDGE_LINES))
def test_options_and_sizes_as_qemu_img(tmp_path: Path, line: list[str]) -> None:
    compare_line(tmp_path, IMAGES["v3"], line)


def test_the_largest_l1_table(tmp_path: Path) -> None:
    """2 PiB takes QEMU's largest L1 table (32 MiB) with 64 KiB clusters: both grow to it."""
    compare_line(tmp_path, IMAGES["v3"], ["{img}", "2P"], deep=False)


def _raw(size: int) -> Builder:
    def build(path: Path, shared: Path) -> None:
        path.write_bytes(os.urandom(size))

    return build


@pytest.mark.parametrize("line", RAW_LINES, ids=_ids(RAW_LINES))
def test_raw_as_qemu_img(tmp_path: Path, line: list[str]) -> None:
    rc, mine, other = compare_line(tmp_path, _raw(1_000_000), line, fmt="raw")
    assert mine.read_bytes() == other.read_bytes()
    if rc == 0 and any("prealloc" in a and "off" not in a for a in line):
        # The new part is allocated, as qemu-img allocates it.
        assert mine.stat().st_blocks * 512 >= mine.stat().st_size - 4096


@pytest.mark.parametrize("line", EMPTY_RAW_LINES, ids=_ids(EMPTY_RAW_LINES))
def test_empty_raw_as_qemu_img(tmp_path: Path, line: list[str]) -> None:
    _rc, mine, other = compare_line(tmp_path, _raw(0), line, fmt="raw")
    # Growing a file from nothing writes its first block, as QEMU's file driver does.
    assert mine.stat().st_size == other.stat().st_size
    assert mine.read_bytes() == other.read_bytes()


def test_shrink_discards_the_data_past_the_end(tmp_path: Path) -> None:
    """`--shrink` over data: both lose it, and what grows back reads as zeros, except the tail
    of the cluster the end fell in, which QEMU keeps (and so do we).

    One difference in the map: QEMU's shrink clears the L2 entries past the end, ours leaves
    them zero clusters (the engine's discard), so the part that grows back is "present" in
    our map and not in QEMU's; the guest reads zeros from both."""
    with twins(tmp_path, _qcow2()) as (ours, theirs):
        for cwd, run in ((ours, run_ours), (theirs, run_qemu)):
            assert run(["--shrink", NAME, "3146240"], cwd)[0] == 0
            assert run([NAME, "4M"], cwd)[0] == 0
        mine, other = ours / NAME, theirs / NAME
        assert qi.qemu_img("compare", mine, other).returncode == 0
        tail = (3 * MiB + 64 * KiB, 4 * MiB)
        assert [m[2:] for m in map_flags(mine) if m[:2] == tail] == [(True, True, False, 0, False)]
        assert [m[2:] for m in map_flags(other) if m[:2] == tail] == [
            (False, True, False, 0, False)
        ]
        assert [m for m in map_flags(mine) if m[:2] != tail] == [
            m for m in map_flags(other) if m[:2] != tail
        ]
        with qcow2ovl.open(mine) as img:
            assert img.read(3 * MiB, 64 * KiB) == b"\x22" * 64 * KiB  # the kept cluster
            assert img.read(3 * MiB + 64 * KiB, MiB - 64 * KiB) == bytes(MiB - 64 * KiB)
        assert qi.check_is_clean(qi.qemu_check(mine))


KILLED_WRITER = """
import os, sys
import qcow2ovl
img = qcow2ovl.open(sys.argv[1], writable=True)
img.write(4096, b"k" * 4096)
img.flush()
os._exit(0)
"""


@pytest.mark.parametrize(
    "line",
    [[NAME, "+1M"], ["--shrink", NAME, "-1M"], [NAME, "+0"], [NAME, "+1000"]],
    ids=lambda line: " ".join(line),
)
def test_an_inconsistent_bitmap_refuses_as_in_qemu_img(tmp_path: Path, line: list[str]) -> None:
    def build(path: Path, shared: Path) -> None:
        _bitmaps(path, shared)
        subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], check=True)

    with twins(tmp_path, build) as (ours, theirs):
        before = (ours / NAME).read_bytes()
        assert run_ours(line, ours) == run_qemu(line, theirs)
        assert (ours / NAME).read_bytes() == before == (theirs / NAME).read_bytes()


def test_data_file_images(tmp_path: Path) -> None:
    """An image with an external data file grows and shrinks with the same guest data (QEMU
    also truncates the data file to the new size; qcow2ovl leaves its length)."""

    def build(path: Path, shared: Path) -> None:
        # QEMU resolves a relative data file name against the working directory.
        old = os.getcwd()
        os.chdir(path.parent)
        try:
            qi.create(path, 4 * MiB, opts={"data_file": "disk.data"})
            qi.write(path, [(0, 4 * MiB, 0x77)])
        finally:
            os.chdir(old)

    with twins(tmp_path, build) as (ours, theirs):
        (theirs / "disk.data").write_bytes((ours / "disk.data").read_bytes())
        for line in ([NAME, "+2M"], ["--shrink", NAME, "3M"], [NAME, "5M"]):
            assert run_ours(line, ours) == run_qemu(line, theirs)
        # Each image's data file is found from its own folder: read each from there.
        disks = []
        old = os.getcwd()
        try:
            for folder in (ours, theirs):
                os.chdir(folder)
                qi.qemu_img("convert", "-O", "raw", NAME, "disk.raw")
                disks.append((folder / "disk.raw").read_bytes())
            os.chdir(ours)
            assert qi.check_is_clean(qi.qemu_check(NAME))
        finally:
            os.chdir(old)
        assert disks[0] == disks[1]


# ---- locks -----------------------------------------------------------------------------------


def test_an_image_in_use_is_refused_as_by_qemu_img(tmp_path: Path) -> None:
    from test_locking import QemuIo, wait_locked

    image = tmp_path / NAME
    qi.create(image, 4 * MiB)
    before = image.read_bytes()
    for holder, refused in ((["-f", "qcow2"], True), (["-r"], True), (["-r", "-U"], False)):
        io_ = QemuIo([*holder, str(image)])
        try:
            wait_locked(image, io_.proc)
            theirs = run_qemu([NAME, "+0"], tmp_path)
            ours = subprocess.run(
                [sys.executable, "-m", "qcow2ovl", "resize", NAME, "+0"],
                capture_output=True,
                text=True,
                cwd=tmp_path,
                check=False,
            )
            assert (ours.returncode, ours.stdout, ours.stderr) == theirs
            assert (theirs[0] == 1) == refused, theirs
            assert image.read_bytes() == before
        finally:
            io_.quit()


def test_a_raw_file_in_use_is_refused_as_by_qemu_img(tmp_path: Path) -> None:
    """A raw resize holds read, write and resize and refuses nothing to others: a writer
    that lets others resize (qemu-io) lets it in, one that does not (qemu-nbd) keeps it out,
    with QEMU's message."""
    from test_locking import QemuIo, wait_locked

    image = tmp_path / NAME
    image.write_bytes(b"\x01" * 4096)
    io_ = QemuIo(["-f", "raw", str(image)])
    try:
        wait_locked(image, io_.proc)
        assert run_ours(["-f", "raw", NAME, "+512"], tmp_path)[0] == 0
        assert run_qemu(["-f", "raw", NAME, "+512"], tmp_path)[0] == 0
    finally:
        io_.quit()
    assert image.stat().st_size == 5120
    sock = tmp_path / "nbd.sock"
    nbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), str(image)])
    try:
        wait_locked(image, nbd)  # type: ignore[arg-type]
        theirs = run_qemu(["-f", "raw", NAME, "+512"], tmp_path)
        assert theirs[0] == 1 and 'Failed to get "resize" lock' in theirs[2], theirs
        assert run_ours(["-f", "raw", NAME, "+512"], tmp_path) == theirs
    finally:
        nbd.terminate()
        nbd.wait(timeout=60)
    assert image.stat().st_size == 5120


# ---- the Python function ---------------------------------------------------------------------


def test_python_resize(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qcow2ovl.create(path, 4 * MiB)
    with qcow2ovl.open(path, writable=True) as img:
        img.write(3 * MiB, b"\x99" * MiB)
    assert qcow2ovl.resize(path, 8 * MiB) == 8 * MiB
    assert qcow2ovl.resize(path, "+1G") == 8 * MiB + (1 << 30)
    assert qcow2ovl.resize(str(path), "-1G", shrink=True) == 8 * MiB
    before = path.read_bytes()
    with pytest.raises(ValueError, match="Use the --shrink option"):
        qcow2ovl.resize(path, 2 * MiB)
    with pytest.raises(ValueError, match="multiple of 512"):
        qcow2ovl.resize(path, 8 * MiB + 1)
    with pytest.raises(ValueError, match="New image size must be positive"):
        qcow2ovl.resize(path, 0)
    with pytest.raises(ValueError, match="Invalid preallocation mode 'fast'"):
        qcow2ovl.resize(path, "+1M", preallocation="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expects a non-negative number"):
        qcow2ovl.resize(tmp_path / "missing", "1 M")
    with pytest.raises(qcow2ovl.UnsupportedError, match="preallocation=metadata"):
        qcow2ovl.resize(path, "+1M", preallocation="metadata")
    with pytest.raises(TypeError):
        qcow2ovl.resize(path, 1.5e6)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        qcow2ovl.resize(tmp_path / "missing", "1M")
    assert path.read_bytes() == before
    assert qcow2ovl.resize(path, 3 * MiB + 512, shrink=True) == 3 * MiB + 512
    with qcow2ovl.open(path) as img:
        assert img.virtual_size == 3 * MiB + 512
        assert img.read(3 * MiB, 512) == b"\x99" * 512
    assert qi.check_is_clean(qi.qemu_check(path))


def test_python_preallocation_progress(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qcow2ovl.create(path, MiB)
    seen: list[tuple[int, int]] = []
    qcow2ovl.resize(path, 20 * MiB, preallocation="full", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (19 * MiB, 19 * MiB)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert all(e["data"] for e in qi.qemu_map(path) if e["start"] >= MiB)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"")
    seen.clear()
    qcow2ovl.resize(
        raw, 20 * MiB, format="raw", preallocation="full", progress=lambda d, t: seen.append((d, t))
    )
    assert seen[-1] == (20 * MiB, 20 * MiB)
    assert raw.stat().st_size == 20 * MiB


def test_python_probed_raw_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\x01" * 1000)
    with caplog.at_level(logging.WARNING, logger="qcow2ovl"):
        assert qcow2ovl.resize(raw, "+1") == 1025
    assert "probing guessed raw" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qcow2ovl"):
        qcow2ovl.resize(raw, 2048, format="raw")
    assert caplog.text == ""


def test_other_formats_are_not_taken_for_raw(tmp_path: Path) -> None:
    """A probe that does not know a format would call it raw and truncate it: a file with
    another QEMU format's magic is refused instead."""
    path = tmp_path / "disk.vmdk"
    qi.qemu_img("create", "-f", "vmdk", path, "1M")
    before = path.read_bytes()
    rc, out, err = run_ours([path.name, "+1M"], tmp_path)
    assert (rc, out) == (1, "")
    assert "format 'vmdk' is not supported by qcow2ovl resize" in err
    assert path.read_bytes() == before


def test_metadata_preallocation_is_refused_for_qcow2(tmp_path: Path) -> None:
    """Not in the engine yet: refused with our own words, the image unchanged."""
    path = tmp_path / NAME
    qi.create(path, MiB)
    before = path.read_bytes()
    rc, out, err = run_ours(["--preallocation=metadata", NAME, "+1M"], tmp_path)
    assert (rc, out) == (1, "")
    assert err == (
        "qcow2ovl: qcow2ovl cannot resize a qcow2 image with preallocation=metadata yet (off, "
        "falloc and full are supported)\n"
    )
    assert path.read_bytes() == before


def test_cli_runs_as_a_program(tmp_path: Path) -> None:
    path = tmp_path / NAME
    qi.create(path, MiB)
    proc = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "resize", str(path), "+1M"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "Image resized.\n", "")
    assert virtual_size(path) == 2 * MiB
    help_ = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "resize", "--help"], capture_output=True, text=True
    )
    assert help_.returncode == 0 and help_.stdout.startswith("usage: qcow2ovl resize")
