"""`qcow2ovl rebase` against `qemu-img rebase`: every command line runs on twin copies of a
folder holding a backing chain (base <- mid <- top) and two other disks to rebase onto, one
folder changed by qemu-img, one by qcow2ovl. The exit status, stdout (progress lines aside)
and stderr must be the same; after a success the rebased image reads the same guest disk in
both (`qemu-img compare`), and as it read before, names the same backing file and format, and
`qemu-img check` is clean; after a refusal our images are byte for byte what they were. Then
the Python API: progress, and a process killed mid-rebase, which leaves the image reading as
it did, and finishes when run again."""

from __future__ import annotations

import json
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


def _folder(chain: Builder, size: int = 4 * MiB) -> Builder:
    """*chain*, and beside it ``other.qcow2`` (the base's data in its first half, other data,
    zeros and holes in the rest) and ``other.raw`` (the same bytes, shorter by a MiB)."""

    def build(d: Path) -> None:
        chain(d)
        qi.create(d / "other.qcow2", size)
        qi.qemu_io(
            d / "other.qcow2",
            f"write -P 0x11 0 {size // 2}",
            f"write -P 0x99 {size // 2} 256k",
            f"write -z {size // 2 + MiB} 64k",
        )
        qi.qemu_img("convert", "-O", "raw", d / "other.qcow2", d / "other.raw")
        qi.qemu_img("resize", "-f", "raw", "--shrink", d / "other.raw", str(size - MiB))

    return build


FOLDERS: dict[str, Builder] = {
    "v3": _folder(vt.chain()),
    "v2": _folder(vt.chain(compat="0.10")),
    "small-clusters": _folder(vt.chain(cluster_size=512)),
    "extended-l2": _folder(vt.chain(extended_l2=True)),
    "compressed-top": _folder(vt.chain(top_commands=("write -c -P 0x36 2560k 64k",))),
    "raw-base": _folder(vt.chain(raw_base=True)),
    "top-longer": _folder(vt.chain(base_size=2 * MiB, top_size=6 * MiB), 6 * MiB),
}

#: Run in every folder.
LINES = [
    ["-b", "{base}", "-F", "{base_fmt}", "top.qcow2"],
    ["-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-b", "other.raw", "-F", "raw", "top.qcow2"],
    ["-b", "", "top.qcow2"],
    ["-u", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
]

#: Run in the version 3 folder: options and refusals.
EDGE_LINES = [
    ["-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-b", "./other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-p", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-q", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-c", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-c", "-b", "", "top.qcow2"],
    ["-b", "", "-F", "qcow2", "top.qcow2"],
    ["-t", "none", "-T", "none", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-t", "unsafe", "-b", "other.raw", "-F", "raw", "top.qcow2"],
    ["-U", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-f", "qcow2", "-b", "other.qcow2", "-F", "qcow2", "mid.qcow2"],
    ["-b", "other.qcow2", "-F", "qcow2", "base.qcow2"],
    ["-u", "-b", "nothere.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-u", "-b", "", "top.qcow2"],
    ["-u", "-b", "", "-F", "qcow2", "top.qcow2"],
    ["-u", "-b", "other.vmdk", "-F", "vmdk", "top.qcow2"],
    # Refusals.
    ["top.qcow2"],
    ["-u", "top.qcow2"],
    ["-b", "other.qcow2", "top.qcow2"],
    ["-u", "-b", "other.qcow2", "top.qcow2"],
    ["-b", "other.qcow2", "-F", "foo", "top.qcow2"],
    ["-u", "-b", "other.qcow2", "-F", "foo", "top.qcow2"],
    ["-b", "nothere.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-b", "top.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-f", "raw", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-t", "foo", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-T", "foo", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-b", "other.qcow2", "-F", "qcow2"],
    ["-b", "other.qcow2", "-F", "qcow2", "top.qcow2", "mid.qcow2"],
    ["-b", "other.qcow2", "-F", "qcow2", "missing.qcow2"],
]


def _ids(lines: list[list[str]]) -> list[str]:
    return [" ".join(repr(a) if not a else a for a in line) or "(none)" for line in lines]


def _disk(image: Path, out: Path) -> bytes:
    qi.qemu_img("convert", "-U", "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


def _checks_clean(image: Path) -> bool:
    """`qemu-img check` of *image* alone (its new backing file need not exist after -u)."""
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}}
    out = qi.qemu_img("check", "--output=json", "json:" + json.dumps({**spec, "backing": None}))
    return qi.check_is_clean(json.loads(out.stdout))


def compare_line(tmp_path: Path, kind: str, line: list[str]) -> int:
    """Runs *line* on twin folders; asserts the same status and words, then the same rebased
    image (or, after a refusal, ours untouched). Returns the status."""
    with vt.twin_folders(tmp_path, FOLDERS[kind]) as (ours, theirs):
        raw_base = (ours / "base.raw").exists()
        argv = [
            a.format(
                base="base.raw" if raw_base else "base.qcow2",
                base_fmt="raw" if raw_base else "qcow2",
            )
            for a in line
        ]
        before = vt.folder_bytes(ours)
        image = ours / argv[-1]
        disk_before = _disk(image, tmp_path / "before.raw") if image.exists() else None
        ours_rc = vt.run_both("rebase", argv, ours, theirs)
        if ours_rc:
            assert vt.folder_bytes(ours) == before
            return ours_rc
        mine, other = ours / argv[-1], theirs / argv[-1]
        assert vt.backing_fields(mine) == vt.backing_fields(other)
        assert vt.virtual_size(mine) == vt.virtual_size(other)
        assert _checks_clean(mine)
        for name in sorted(before):
            if name != mine.name:
                assert (ours / name).read_bytes() == before[name], name
        if "-u" not in argv:
            assert _disk(mine, tmp_path / "after.raw") == disk_before
            vt.same_guest(mine, other)
            if "-c" not in argv:
                assert vt.map_flags(mine) == vt.map_flags(other)
        return ours_rc


@pytest.mark.parametrize("line", LINES, ids=_ids(LINES))
@pytest.mark.parametrize("kind", list(FOLDERS))
def test_rebase_as_qemu_img(tmp_path: Path, kind: str, line: list[str]) -> None:
    assert compare_line(tmp_path, kind, line) == 0


@pytest.mark.parametrize("line", EDGE_LINES, ids=_ids(EDGE_LINES))
def test_options_and_refusals_as_qemu_img(tmp_path: Path, line: list[str]) -> None:
    compare_line(tmp_path, "v3", line)


def test_a_new_backing_file_in_use_is_read_shared(tmp_path: Path) -> None:
    """Reading the new backing file needs no more than a reader's lock: a writer elsewhere
    refuses it (without -U), and nothing changes."""
    FOLDERS["v3"](tmp_path)
    before = vt.folder_bytes(tmp_path)
    with qcow2ovl.open(tmp_path / "other.qcow2", writable=True):
        with pytest.raises(qcow2ovl.LockError):
            qcow2ovl.rebase(tmp_path / "top.qcow2", "other.qcow2", backing_format="qcow2")
    assert vt.folder_bytes(tmp_path) == before


def test_python_refusals_change_nothing(tmp_path: Path) -> None:
    FOLDERS["v3"](tmp_path)
    before = vt.folder_bytes(tmp_path)
    top = tmp_path / "top.qcow2"
    with pytest.raises(ValueError, match="backing format must be specified"):
        qcow2ovl.rebase(top, "other.qcow2")
    with pytest.raises(ValueError, match="Invalid format name: 'foo'"):
        qcow2ovl.rebase(top, "other.qcow2", backing_format="foo")
    with pytest.raises(qcow2ovl.UnsupportedError, match="vmdk"):
        qcow2ovl.rebase(top, "other.qcow2", backing_format="vmdk")
    with pytest.raises(FileNotFoundError):
        qcow2ovl.rebase(top, "nothere.qcow2", backing_format="qcow2")
    assert vt.folder_bytes(tmp_path) == before


# ---- the Python API: progress, a killed rebase -----------------------------------------------


def _big_folder(d: Path) -> None:
    """A 32 MiB top over a base of data, and another disk that differs from it in every other
    MiB: a rebase onto it copies 16 MiB, in many steps."""
    qi.create(d / "base.qcow2", 32 * MiB)
    qi.write(d / "base.qcow2", [(0, 32 * MiB, 0x11)])
    qi.create(d / "top.qcow2", 32 * MiB, backing="base.qcow2")
    qi.write(d / "top.qcow2", [(i * MiB + 512 * KiB, 64 * KiB, 0x20 + i) for i in range(32)])
    qi.create(d / "other.qcow2", 32 * MiB)
    qi.write(d / "other.qcow2", [(i * MiB, MiB, 0x11 if i % 2 else 0x77) for i in range(32)])


def test_progress_rises_to_the_total(tmp_path: Path) -> None:
    _big_folder(tmp_path)
    calls: list[tuple[int, int]] = []
    result = qcow2ovl.rebase(
        tmp_path / "top.qcow2",
        "other.qcow2",
        backing_format="qcow2",
        progress=lambda d, t: calls.append((d, t)),
    )
    assert len(calls) > 2
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1][0] == calls[-1][1] == 32 * MiB
    assert result.compared == 32 * MiB - 32 * 64 * KiB
    assert result.copied == 16 * (MiB - 64 * KiB)


_KILLED = """
import os, sys
import qcow2ovl
calls = 0
def progress(done, total):
    global calls
    calls += 1
    if calls == int(sys.argv[2]):
        os._exit(9)
qcow2ovl.rebase(sys.argv[1], "other.qcow2", backing_format="qcow2", progress=progress)
"""


@pytest.mark.parametrize("at", [1, 3, 6])
def test_a_killed_rebase_reads_as_before_and_runs_again(tmp_path: Path, at: int) -> None:
    _big_folder(tmp_path)
    top = tmp_path / "top.qcow2"
    before = _disk(top, tmp_path / "before.raw")
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(top), str(at)], check=False)
    assert proc.returncode == 9
    assert qi.check_is_clean(qi.qemu_check(top))
    assert vt.backing_fields(top) == ("base.qcow2", "qcow2")
    assert _disk(top, tmp_path / "after.raw") == before
    qcow2ovl.rebase(top, "other.qcow2", backing_format="qcow2")
    assert vt.backing_fields(top) == ("other.qcow2", "qcow2")
    assert _disk(top, tmp_path / "after.raw") == before
    assert qi.check_is_clean(qi.qemu_check(top))
