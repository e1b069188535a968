"""`qcow2ovl convert` against qemu-img: what we write, `qemu-img compare` finds identical to the
source and `qemu-img check` finds clean; zero ranges stay unallocated as in `qemu-img convert`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img and qemu-io")

KiB, MiB = 1024, 1 << 20


def ours(*args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcow2ovl", "convert", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def identical(a: Path, fmt_a: str, b: Path, fmt_b: str) -> bool:
    out = qi.qemu_img("compare", "-f", fmt_a, "-F", fmt_b, a, b, ok=(0, 1)).stdout
    return "identical" in out


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """Guest ranges the image allocates data for, merged."""
    out: list[tuple[int, int]] = []
    for e in qi.qemu_map(path):
        if e["data"]:
            if out and out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], e["start"] + e["length"])
            else:
                out.append((e["start"], e["start"] + e["length"]))
    return out


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """A sparse raw file: random data at cluster-aligned and unaligned places, an explicit run
    of zero bytes, holes, and a size that is not a multiple of a cluster."""
    path = tmp_path / "src.raw"
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(40 * MiB + 3 * 512)
        for off, n in [(0, 100_000), (5 * MiB + 70_000, 200_000), (20 * MiB, 64 * KiB)]:
            f.seek(off)
            f.write(rng.randbytes(n))
        f.seek(10 * MiB)
        f.write(bytes(2 * MiB))  # zeros written out: no hole, but nothing to copy
        f.seek(40 * MiB + 512)
        f.write(b"\x01" * 1024)
    return path


def test_raw_to_qcow2_matches_qemu_img_convert(raw: Path, tmp_path: Path) -> None:
    mine, theirs = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    proc = ours("-O", "qcow2", raw, mine)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    qi.qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, theirs)
    assert identical(raw, "raw", mine, "qcow2")
    assert qi.check_is_clean(qi.qemu_check(mine))
    assert qi.qemu_info(mine)["virtual-size"] == qi.qemu_info(theirs)["virtual-size"]
    # Zero ranges stay unallocated: the data we allocate is what qemu-img allocates.
    assert data_ranges(mine) == data_ranges(theirs)


@pytest.mark.parametrize(
    "opts",
    [
        "cluster_size=4k,refcount_bits=1",
        "compat=0.10",
        "extended_l2=on,cluster_size=128k",
        "lazy_refcounts=on,compression_type=zstd",
        "cluster_size=2M,preallocation=metadata",
    ],
)
def test_options(opts: str, raw: Path, tmp_path: Path) -> None:
    mine = tmp_path / "ours.qcow2"
    proc = ours("-f", "raw", "-O", "qcow2", "-o", opts, raw, mine)
    assert proc.returncode == 0, proc.stderr
    assert identical(raw, "raw", mine, "qcow2")
    assert qi.check_is_clean(qi.qemu_check(mine))
    data = qi.qemu_info(mine)["format-specific"]["data"]
    want = dict(kv.split("=") for kv in opts.split(","))
    if "cluster_size" in want:
        size = int(want["cluster_size"][:-1]) * (KiB if want["cluster_size"][-1] == "k" else MiB)
        assert qi.qemu_info(mine)["cluster-size"] == size
    if "refcount_bits" in want:
        assert data["refcount-bits"] == int(want["refcount_bits"])
    if "compat" in want:
        assert data["compat"] == want["compat"]
    if "extended_l2" in want:
        assert data["extended-l2"] is True
    if "compression_type" in want:
        assert data["compression-type"] == want["compression_type"]


@pytest.mark.parametrize(
    "kind", ["snapshots", "convert_zstd_partial", "chain3_raw_base", "extl2_ops_backing"]
)
def test_qcow2_to_qcow2_and_raw(kind: str, tmp_path: Path) -> None:
    """QEMU-made sources (internal snapshots, compressed clusters, backing chains, extended L2):
    the output is the guest disk as QEMU reads it."""
    if kind in qi.KINDS:
        src = qi.build_image(kind, tmp_path / "src").ref.path
    else:
        from read_images import build_read_image

        src = build_read_image(kind, tmp_path / "src").ref.path
    mine = tmp_path / "ours.qcow2"
    proc = ours("-O", "qcow2", src, mine)
    assert proc.returncode == 0, proc.stderr
    assert identical(src, "qcow2", mine, "qcow2")
    assert qi.check_is_clean(qi.qemu_check(mine))
    assert qi.qemu_info(mine).get("backing-filename") is None
    raw = tmp_path / "ours.raw"
    assert ours("-p", src, raw).returncode == 0  # raw is the default output format, as in qemu-img
    assert identical(src, "qcow2", raw, "raw")


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * 1024 * 1024])
def test_compressed_output(raw: Path, tmp_path: Path, compression: str, cluster_size: int) -> None:
    out = tmp_path / "c.qcow2"
    opts = f"compression_type={compression},cluster_size={cluster_size}"
    proc = ours("-c", "-O", "qcow2", "-o", opts, raw, out)
    assert proc.returncode == 0, proc.stderr
    assert qi.check_is_clean(qi.qemu_check(out))
    assert identical(raw, "raw", out, "qcow2")
    info = qi.qemu_info(out)
    assert info["format-specific"]["data"]["compression-type"] == compression
    # QEMU itself sees the clusters as compressed, and reads them back.
    assert any(e["compressed"] for e in qi.qemu_map(out))
    out_raw = tmp_path / "back.raw"
    qi.qemu_img("convert", "-O", "raw", out, out_raw)
    assert out_raw.read_bytes() == raw.read_bytes()[: out_raw.stat().st_size]
    # And what we compressed is smaller than the data: it was packed, not given a cluster each.
    assert out.stat().st_size < raw.stat().st_size


def test_compressed_output_needs_qcow2(raw: Path, tmp_path: Path) -> None:
    proc = ours("-c", raw, tmp_path / "c.raw")
    assert proc.returncode == 1
    assert "Compression not supported for this file format" in proc.stderr


def test_compressed_clusters_overwritten_and_freed(tmp_path: Path) -> None:
    import qcow2ovl

    path = tmp_path / "cw.qcow2"
    qcow2ovl.create(path, 1024 * 1024)
    with qcow2ovl.open(path, writable=True) as img:
        for i in range(16):
            assert img.write_compressed(i * 65536, bytes([i + 1]) * 65536)
        # Random data does not shrink: stored plainly.
        assert not img.write_compressed(16 * 65536 - 65536, random.Random(1).randbytes(65536))
        img.write(3 * 65536 + 5, b"plain")
        img.discard(4 * 65536, 65536)
    assert qi.check_is_clean(qi.qemu_check(path))
    out = qi.qemu_io(path, "read -P 0x1 0 64k", "read -P 0x3 131072 64k")
    assert "verification failed" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-O", "vmdk"], "output format 'vmdk' is not supported"),
        (["-O", "qcow2", "-o", "bogus=1"], "Invalid parameter 'bogus'"),
        (["-O", "qcow2", "-o", "data_file=x"], "option 'data_file' is not supported yet"),
        (["-O", "raw", "-o", "cluster_size=4k"], "-o applies to -O qcow2 only"),
        (["-f", "foo", "-O", "qcow2"], "Unknown file format 'foo'"),
        (["-f", "vmdk", "-O", "qcow2"], "source format 'vmdk' is not supported"),
    ],
)
def test_usage_errors(args: list[str], message: str, raw: Path, tmp_path: Path) -> None:
    proc = ours(*args, raw, tmp_path / "out")
    assert proc.returncode == 1
    assert message in proc.stderr


def test_replaces_an_existing_output(raw: Path, tmp_path: Path) -> None:
    mine = tmp_path / "ours.qcow2"
    mine.write_bytes(b"old" * 1000)
    assert ours("-O", "qcow2", raw, mine).returncode == 0
    assert identical(raw, "raw", mine, "qcow2")


def test_engine_writes_into_a_short_last_cluster(tmp_path: Path) -> None:
    import qcow2ovl

    path = tmp_path / "short.qcow2"
    qcow2ovl.create(path, 64 * KiB + 1536)
    with qcow2ovl.open(path, writable=True) as image:
        image.write(64 * KiB + 512, b"\x01" * 1024)
    assert qi.check_is_clean(qi.qemu_check(path))
    qi.qemu_io(path, f"read -P 1 {64 * KiB + 512} 1024")


def test_snapshot_views_from_the_command_line(tmp_path: Path) -> None:
    from qcow2ovl.cli import main

    path = tmp_path / "s.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qi.qemu_io(path, "write -P 0x11 0 1M")
    qi.qemu_img("snapshot", "-c", "first", path)
    qi.qemu_io(path, "write -P 0x22 0 512k")
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    assert main(["convert", "-l", "snapshot.name=first", str(path), str(ours)]) == 0
    qi.qemu_img("convert", "-l", "snapshot.name=first", "-O", "raw", path, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qcow2ovl",
            "map",
            "--guest",
            "--snapshot",
            "1",
            "--output",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    got = json.loads(out)
    assert got[0]["start"] == 0 and got[0]["data"] and got[0]["length"] == 1 << 20
