"""Running a qemu-img verb and ours side by side on twin copies of a folder of images, and
comparing what both leave: shared by the tests of ``resize``, ``commit`` and ``rebase``.

A folder is built once (``ours``) and copied (``theirs``); the same command line runs in each,
qemu-img in ``theirs`` and qcow2ovl in ``ours``; the exit status, stdout and stderr (with the
program's name swapped, progress lines aside) must match, and then the images must too."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import qemu_images as qi
from qcow2ovl.cli import main

#: One line of ``-p`` output, as qemu-img prints it.
PROGRESS_LINE = re.compile(r"    \((\d?\d?\d\.\d\d)/100%\)\r")


KiB, MiB = 1024, 1 << 20


def chain(
    *,
    base_size: int = 4 * MiB,
    top_size: int | None = None,
    raw_base: bool = False,
    top_commands: tuple[str, ...] = (),
    **opts: object,
) -> Callable[[Path], None]:
    """A three-image chain: the base full of data, a middle layer with data and zeros, a top
    with data, zeros, an unaligned write and a discard (and *top_commands*)."""

    def build(d: Path) -> None:
        base = d / ("base.raw" if raw_base else "base.qcow2")
        if raw_base:
            base.write_bytes(b"\x11" * base_size)
        else:
            qi.create(base, base_size, opts=dict(opts))
            qi.write(base, [(0, base_size, 0x11)])
        mid_size = top_size or base_size
        qi.create(
            d / "mid.qcow2",
            mid_size,
            opts=dict(opts),
            backing=base.name,
            backing_fmt="raw" if raw_base else "qcow2",
        )
        qi.qemu_io(d / "mid.qcow2", "write -P 0x22 512k 1M", "write -z 1536k 256k")
        qi.create(d / "top.qcow2", mid_size, opts=dict(opts), backing="mid.qcow2")
        qi.qemu_io(
            d / "top.qcow2",
            "write -P 0x33 1028k 8k",
            "write -z 2M 64k",
            "write -P 0x34 3145728 1000",
            "discard 1M 4k",
            f"write -P 0x35 {mid_size - 64 * KiB} 64k",
            *top_commands,
        )

    return build


def run_ours(verb: str, argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``qcow2ovl VERB ARGV`` in this process, in *cwd*."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([verb, *argv])
            except SystemExit as e:  # argparse
                rc = int(e.code or 0)
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def run_qemu(verb: str, argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``qemu-img VERB ARGV`` in *cwd*, its name in stderr said as ours."""
    # Bytes, decoded here: text mode would turn the progress lines' ``\r`` into newlines.
    proc = subprocess.run(["qemu-img", verb, *argv], capture_output=True, cwd=cwd, check=False)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    return proc.returncode, out, err.replace("qemu-img", "qcow2ovl")


def run_both(verb: str, argv: list[str], ours: Path, theirs: Path) -> int:
    """Runs ``VERB ARGV`` with qemu-img in *theirs* and with ours in *ours*; asserts the same
    exit status, stdout (progress lines aside: both print them or neither) and stderr.
    Returns the status."""
    theirs_rc, theirs_out, theirs_err = run_qemu(verb, argv, theirs)
    ours_rc, ours_out, ours_err = run_ours(verb, argv, ours)
    theirs_shares, theirs_rest = split_progress(theirs_out)
    ours_shares, ours_rest = split_progress(ours_out)
    assert (ours_rc, ours_rest, ours_err) == (theirs_rc, theirs_rest, theirs_err)
    assert bool(ours_shares) == bool(theirs_shares)
    return ours_rc


def split_progress(out: str) -> tuple[list[float], str]:
    """The percentages of the ``-p`` lines at the start of *out* (which must end with
    ``(100.00/100%)`` and a newline when there are any), and the rest of *out*."""
    shares: list[float] = []
    pos = 0
    while m := PROGRESS_LINE.match(out, pos):
        shares.append(float(m.group(1)))
        pos = m.end()
    if shares:
        assert out[pos] == "\n", repr(out)
        assert shares[-1] == 100.0 and shares == sorted(shares), shares
        pos += 1
    return shares, out[pos:]


def map_flags(path: Path, fmt: str = "qcow2", upto: int | None = None) -> list[tuple[Any, ...]]:
    """`qemu-img map` without host offsets: (start, end, present, zero, data, depth,
    compressed), neighbours with equal flags merged (before *upto* only, if given); "zero"
    only where there is no data."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", fmt, str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    merged: list[list[Any]] = []
    for e in json.loads(out):
        # A data cluster is "zero" when its host bytes are a hole, which depends on how the
        # file system stored zeros written to it (unwritten extents, page cache): only
        # zeros without data (zero clusters, holes of raw files) count.
        zero = e["zero"] and not e["data"]
        flags = [e["present"], zero, e["data"], e["depth"], e["compressed"]]
        start, end = e["start"], e["start"] + e["length"]
        if upto is not None:
            if start >= upto:
                break
            end = min(end, upto)
        if merged and merged[-1][2:] == flags and merged[-1][1] == start:
            merged[-1][1] = end
        else:
            merged.append([start, end, *flags])
    return [tuple(m) for m in merged]


def own_ranges(path: Path, fmt: str = "qcow2") -> list[tuple[int, int]]:
    """The guest ranges *path* itself allocates (depth 0: data or zeros), merged."""
    ranges: list[tuple[int, int]] = []
    for e in json.loads(qi.qemu_img("map", "-U", "--output=json", "-f", fmt, path).stdout):
        if e["present"] and e["depth"] == 0:
            start, end = e["start"], e["start"] + e["length"]
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
    return ranges


def covered(inner: list[tuple[int, int]], outer: list[tuple[int, int]]) -> bool:
    """Whether every range of *inner* lies within a range of *outer* (both merged)."""
    return all(any(s <= a and b <= e for s, e in outer) for a, b in inner)


def virtual_size(path: Path, fmt: str = "qcow2") -> int:
    out = qi.qemu_img("info", "--output=json", "-f", fmt, path).stdout
    return int(json.loads(out)["virtual-size"])


def snapshot_disks(path: Path, tmp: Path) -> list[bytes]:
    """The guest disk of every internal snapshot."""
    disks = []
    for s in qi.qemu_info(path).get("snapshots", []):
        out = tmp / f"snap-{s['id']}.raw"
        qi.qemu_img("convert", "-l", f"snapshot.id={s['id']}", "-O", "raw", path, out)
        disks.append(out.read_bytes())
        out.unlink()
    return disks


def same_guest(a: Path, b: Path, fmt: str = "qcow2") -> None:
    """`qemu-img compare` says *a* and *b* (with their chains) hold the same guest disk."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", fmt, "-F", fmt, str(a), str(b)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def image_format(path: Path) -> str:
    """The format qemu-img probes (without opening the backing chain)."""
    info = json.loads(qi.qemu_img("info", "-U", "--output=json", "--backing-chain", path).stdout)[0]
    return str(info["format"])


def backing_fields(path: Path) -> tuple[str | None, str | None]:
    """The backing file name and format the header stores."""
    info = json.loads(qi.qemu_img("info", "-U", "--output=json", path).stdout)
    return info.get("backing-filename"), info.get("backing-filename-format")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def copy_holes_and_all(source: Path, target: Path) -> None:
    """A copy of *source* with its holes where they are, and nowhere else: `qemu-img map`
    reports holes in a file as zeros, so a twin must have the same ones (shutil fills every
    hole in; cp makes new holes of runs of zeros)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(src.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(src.fileno(), data, os.SEEK_HOLE)
            src.seek(data)
            dst.seek(data)
            dst.write(src.read(hole - data))
            pos = hole
        dst.truncate(size)


@contextlib.contextmanager
def twin_folders(tmp_path: Path, build: Callable[[Path], None]) -> Iterator[tuple[Path, Path]]:
    """Two folders holding the same images: *build* fills ``ours``, which is then copied."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    build(ours)
    theirs.mkdir()
    for path in sorted(ours.iterdir()):
        copy_holes_and_all(path, theirs / path.name)
    yield ours, theirs
