"""`qcow2ovl commit` against `qemu-img commit`: every command line runs on twin copies of a
backing chain, one committed by qemu-img, one by qcow2ovl. The exit status, stdout (progress
lines aside) and stderr must be the same; after a success every image of both chains holds the
same guest disk (`qemu-img compare`), the same virtual size, the same backing fields and the
same guest map (host offsets aside), with a clean `qemu-img check`; after a refusal our images
are byte for byte what they were. Then the Python API: progress, a cancel, and a process
killed mid-commit, which leaves both images consistent and finishes when run again."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi
import verb_twins as vt

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img and qemu-io")

KiB, MiB = 1024, 1 << 20

Builder = Callable[[Path], None]


# ---- chains: base.* <- mid.qcow2 <- top.qcow2 (vt.chain) -----------------------------------


def _with_snapshot(build: Builder) -> Builder:
    def snapshotted(d: Path) -> None:
        build(d)
        qi.snapshot_create(d / "top.qcow2", "before")
        qi.write(d / "top.qcow2", [(0, 64 * KiB, 0x44)])

    return snapshotted


def _with_bitmap(build: Builder) -> Builder:
    def with_bitmap(d: Path) -> None:
        build(d)
        qi.bitmap_add(d / "top.qcow2", "b0")
        qi.write(d / "top.qcow2", [(128 * KiB, 64 * KiB, 0x45)])

    return with_bitmap


CHAINS: dict[str, Builder] = {
    "v3": vt.chain(),
    "v2": vt.chain(compat="0.10"),
    "small-clusters": vt.chain(cluster_size=512),
    "2M-clusters": vt.chain(cluster_size=2 * MiB, base_size=8 * MiB),
    "extended-l2": vt.chain(extended_l2=True, cluster_size=64 * KiB),
    "compressed-top": vt.chain(top_commands=("write -c -P 0x36 2560k 64k",)),
    "raw-base": vt.chain(raw_base=True),
    "top-longer": vt.chain(base_size=2 * MiB, top_size=6 * MiB),
    "snapshot-in-top": _with_snapshot(vt.chain()),
    "bitmap-in-top": _with_bitmap(vt.chain()),
}

#: Chains whose top allocates less than QEMU's unit of copy: QEMU's commit copies 4 KiB where
#: the top allocates 1 KiB of 512-byte clusters, and a whole cluster where an extended L2 top
#: allocates one subcluster (the rest read through the chain, so the disk is the same); ours
#: copies only what the top allocates, so the base allocates a subset of what QEMU's does.
FINER = {"small-clusters", "extended-l2"}

#: Run on every chain.
LINES = [
    ["top.qcow2"],
    ["-d", "top.qcow2"],
    ["-b", "mid.qcow2", "top.qcow2"],
    ["-b", "{base}", "top.qcow2"],
    ["-p", "top.qcow2"],
    ["mid.qcow2"],
]

#: Run on the version 3 chain: options and refusals.
EDGE_LINES = [
    ["-q", "top.qcow2"],
    ["-p", "-q", "top.qcow2"],
    ["-t", "none", "top.qcow2"],
    ["-t", "unsafe", "-d", "top.qcow2"],
    ["-t", "writethrough", "top.qcow2"],
    ["-f", "qcow2", "top.qcow2"],
    ["-b", "./base.qcow2", "top.qcow2"],
    ["-b", "mid.qcow2", "-d", "top.qcow2"],
    ["--drop", "top.qcow2"],
    ["base.qcow2"],
    ["-b", "nope.qcow2", "top.qcow2"],
    ["-b", "top.qcow2", "top.qcow2"],
    ["missing.qcow2"],
    [],
    ["top.qcow2", "mid.qcow2"],
    ["-t", "foo", "top.qcow2"],
    ["-f", "raw", "top.qcow2"],
]


def _ids(lines: list[list[str]]) -> list[str]:
    return [" ".join(line) or "(none)" for line in lines]


def compare_line(tmp_path: Path, kind: str, line: list[str]) -> int:
    """Runs *line* on twin chains; asserts the same status and words, then the same images
    (or, after a refusal, ours untouched). Returns the status."""
    with vt.twin_folders(tmp_path, CHAINS[kind]) as (ours, theirs):
        base = "base.raw" if (ours / "base.raw").exists() else "base.qcow2"
        argv = [a.format(base=base) for a in line]
        before = vt.folder_bytes(ours)
        ours_rc = vt.run_both("commit", argv, ours, theirs)
        if ours_rc:
            assert vt.folder_bytes(ours) == before
            return ours_rc
        for name in sorted(before):
            mine, other = ours / name, theirs / name
            fmt = vt.image_format(other)
            assert vt.image_format(mine) == fmt
            assert vt.virtual_size(mine, fmt) == vt.virtual_size(other, fmt)
            vt.same_guest(mine, other, fmt)
            if fmt != "qcow2":
                assert mine.read_bytes() == other.read_bytes()
                continue
            assert vt.backing_fields(mine) == vt.backing_fields(other)
            if kind in FINER:
                assert vt.covered(vt.own_ranges(mine), vt.own_ranges(other)), name
            else:
                assert vt.map_flags(mine) == vt.map_flags(other), name
            check = qi.qemu_check(mine)
            assert qi.check_is_clean(check), (name, check)
            assert vt.snapshot_disks(mine, tmp_path) == vt.snapshot_disks(other, tmp_path)
            bitmaps = qi.qemu_info(mine)["format-specific"]["data"].get("bitmaps", [])
            assert bitmaps == qi.qemu_info(other)["format-specific"]["data"].get("bitmaps", [])
            for b in bitmaps:
                assert qi.qemu_dirty(mine, b["name"]) == qi.qemu_dirty(other, b["name"])
        return ours_rc


@pytest.mark.parametrize("line", LINES, ids=_ids(LINES))
@pytest.mark.parametrize("kind", list(CHAINS))
def test_commit_as_qemu_img(tmp_path: Path, kind: str, line: list[str]) -> None:
    assert compare_line(tmp_path, kind, line) == 0


@pytest.mark.parametrize("line", EDGE_LINES, ids=_ids(EDGE_LINES))
def test_options_and_refusals_as_qemu_img(tmp_path: Path, line: list[str]) -> None:
    compare_line(tmp_path, "v3", line)


def test_committing_into_a_file_in_use_is_refused(tmp_path: Path) -> None:
    vt.chain()(tmp_path)
    before = vt.folder_bytes(tmp_path)
    with qcow2ovl.open(tmp_path / "mid.qcow2", writable=True):
        with pytest.raises(qcow2ovl.LockError):
            qcow2ovl.commit(tmp_path / "top.qcow2")
    assert vt.folder_bytes(tmp_path) == before


# ---- the Python API --------------------------------------------------------------------------


def _big_chain(d: Path) -> None:
    """A 32 MiB top full of data over a base of other data: a commit takes many steps."""
    qi.create(d / "base.qcow2", 32 * MiB)
    qi.write(d / "base.qcow2", [(0, 32 * MiB, 0x11)])
    qi.create(d / "top.qcow2", 32 * MiB, backing="base.qcow2")
    qi.write(d / "top.qcow2", [(i * MiB, 512 * KiB, 0x20 + i) for i in range(32)])


def test_progress_rises_to_the_total(tmp_path: Path) -> None:
    _big_chain(tmp_path)
    calls: list[tuple[int, int]] = []
    result = qcow2ovl.commit(tmp_path / "top.qcow2", progress=lambda d, t: calls.append((d, t)))
    assert len(calls) > 2
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert {t for _, t in calls} == {32 * MiB}
    assert calls[-1] == (32 * MiB, 32 * MiB)
    assert result.emptied and result.total == 32 * MiB
    assert result.written == 16 * MiB
    assert Path(result.base).name == "base.qcow2"


def test_an_exception_from_progress_stops_with_the_top_whole(tmp_path: Path) -> None:
    _big_chain(tmp_path)
    reference = tmp_path / "reference.raw"
    _to_raw(tmp_path / "top.qcow2", reference)
    calls = 0

    def stop(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qcow2ovl.commit(tmp_path / "top.qcow2", progress=stop)
    for name in ("top.qcow2", "base.qcow2"):
        assert qi.check_is_clean(qi.qemu_check(tmp_path / name))
    _same_as_raw(tmp_path / "top.qcow2", reference)


def _to_raw(image: Path, raw: Path) -> None:
    qi.qemu_img("convert", "-f", "qcow2", "-O", "raw", image, raw)


def _same_as_raw(image: Path, raw: Path) -> None:
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(raw)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


_KILLED = """
import os, sys
import qcow2ovl
calls = 0
def progress(done, total):
    global calls
    calls += 1
    if calls == int(sys.argv[2]):
        os._exit(9)
qcow2ovl.commit(sys.argv[1], progress=progress)
"""


@pytest.mark.parametrize("at", [1, 2, 5])
def test_a_killed_commit_leaves_both_consistent_and_runs_again(tmp_path: Path, at: int) -> None:
    _big_chain(tmp_path)
    reference = tmp_path / "reference.raw"
    _to_raw(tmp_path / "top.qcow2", reference)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED, str(tmp_path / "top.qcow2"), str(at)], check=False
    )
    assert proc.returncode == 9
    for name in ("top.qcow2", "base.qcow2"):
        assert qi.check_is_clean(qi.qemu_check(tmp_path / name))
    _same_as_raw(tmp_path / "top.qcow2", reference)
    qcow2ovl.commit(tmp_path / "top.qcow2")
    _same_as_raw(tmp_path / "base.qcow2", reference)
    _same_as_raw(tmp_path / "top.qcow2", reference)
    assert not any(e["data"] and e["depth"] == 0 for e in qi.qemu_map(tmp_path / "top.qcow2"))
