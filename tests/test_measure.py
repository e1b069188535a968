"""`qcow2ovl measure` against `qemu-img measure`, run on the same command lines: the same
numbers, the same human and JSON output, the same messages and exit statuses."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img and qemu-io")

KiB, MiB, GiB = 1024, 1 << 20, 1 << 30


def theirs(args: list[str]) -> subprocess.CompletedProcess[str]:
    assert qi.QEMU_IMG is not None
    return subprocess.run(
        [qi.QEMU_IMG, "measure", *args], capture_output=True, text=True, check=False
    )


def ours(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, str, int]:
    from qcow2ovl.cli import main

    capsys.readouterr()
    code = main(["measure", *args])
    out, err = capsys.readouterr()
    return out, err, code


def same_as_qemu(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Runs both; asserts the same stdout, exit status and (prefix aside) stderr."""
    q = theirs(args)
    out, err, code = ours(args, capsys)
    assert (out, code) == (q.stdout, q.returncode), (args, q.stderr, err)
    assert err.replace("qcow2ovl: ", "qemu-img: ") == q.stderr, args
    return out


SIZES = [0, 1, 512, 64 * KiB - 1, 64 * KiB, 100 * MiB + 3, GiB, 2 * GiB + 512, 1 << 40]
CLUSTERS = ["512", "4k", "64k", "2M"]


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("size", SIZES)
def test_size_qcow2(size: int, cluster: str, capsys: pytest.CaptureFixture[str]) -> None:
    same_as_qemu(["-O", "qcow2", "-o", f"cluster_size={cluster}", "--size", str(size)], capsys)


@pytest.mark.parametrize(
    "opts",
    [
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "extended_l2=on,cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64,cluster_size=512",
        "compat=0.10",
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full,cluster_size=4k",
        "lazy_refcounts=on,compression_type=zstd,data_file=x,data_file_raw=on",
        "backing_file=nothing.qcow2,backing_fmt=qcow2",
        "nocow=on,extent_size_hint=1M",
        "size=5G",
    ],
)
@pytest.mark.parametrize("output", ["human", "json"])
def test_size_qcow2_options(opts: str, output: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = same_as_qemu([f"--output={output}", "-O", "qcow2", "-o", opts, "--size", "3G"], capsys)
    if output == "json":
        assert "bitmaps" not in json.loads(out)


@pytest.mark.parametrize("size", ["0", "1", "1000", "1M", "1.5G", "0x1000"])
@pytest.mark.parametrize("output", ["human", "json"])
def test_size_raw(size: str, output: str, capsys: pytest.CaptureFixture[str]) -> None:
    same_as_qemu(["--output", output, "--size", size], capsys)
    same_as_qemu(["-O", "raw", "-o", "preallocation=full", "--size", size], capsys)


IMAGE_KINDS = [
    "v2",
    "v3",
    "cluster_512",
    "cluster_4k",
    "cluster_2m",
    "refcount_64_cluster_512",
    "extended_l2",
    "extended_l2_32k",
    "compressed",
    "compressed_4k",
    "backing",
    "data_file",
    "data_file_raw",
    "bitmaps",
    "history",
    "snapshots",
    "snapshots_v2",
    "prealloc_metadata",
    "zero_discard",
    "resized",
    "huge_virtual",
]
OUTPUTS = [
    ["-O", "raw"],
    ["-O", "qcow2"],
    ["-O", "qcow2", "--output=json"],
    ["-O", "qcow2", "-o", "cluster_size=512"],
    ["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=8"],
    ["-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on", "--output=json"],
    ["-O", "qcow2", "-o", "compat=0.10"],
    ["-O", "qcow2", "-o", "backing_file=base.qcow2"],
    ["-O", "qcow2", "-o", "preallocation=falloc"],
]


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_qcow2_sources(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(qi.get_image(kind).ref.path)
    for output in OUTPUTS:
        if kind == "huge_virtual" and "cluster_size=512" in output[-1]:
            continue  # the L1 table of 5 TiB in 512-byte clusters: measured all the same
        same_as_qemu([*output, path], capsys)
    same_as_qemu(["-f", "qcow2", "-U", "-O", "qcow2", path], capsys)


def test_bitmaps_size_follows_names_granularities_and_cluster_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "b.qcow2"
    qi.create(path, 3 * GiB + 512)
    for i, g in enumerate(["512", "4k", "64k", "2M", "1k"]):
        qi.qemu_img("bitmap", "--add", "-g", g, path, "b" * (1 + 9 * i))
    qi.qemu_img("bitmap", "--add", "--disable", path, "disabled")
    for cluster in CLUSTERS:
        out = same_as_qemu(["-O", "qcow2", "-o", f"cluster_size={cluster}", str(path)], capsys)
        assert "bitmaps size: 0" not in out
    same_as_qemu(["-O", "qcow2", "-o", "compat=0.10", str(path)], capsys)  # no bitmaps line
    same_as_qemu(["-O", "raw", str(path)], capsys)


def test_snapshots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.qcow2"
    qi.create(path, 100 * MiB)
    qi.write(path, [(0, MiB, 1), (50 * MiB, 100 * KiB, 2)])
    qi.snapshot_create(path, "s1")
    qi.write(path, [(10 * MiB, 3 * MiB, 3)])
    qi.qemu_img("resize", path, "200M")
    for line in (
        ["-O", "qcow2", str(path)],
        ["-O", "qcow2", "-l", "s1", str(path)],
        ["-O", "qcow2", "-l", "snapshot.name=s1", str(path)],
        ["-O", "qcow2", "-l", "snapshot.id=1", str(path)],
        ["-l", "s1", str(path)],
        ["-O", "qcow2", "-l", "nope", str(path)],
        ["-l", "s1", "-f", "raw", str(path)],
    ):
        same_as_qemu(line, capsys)


def sparse_raw(path: Path, size: int, seed: int) -> None:
    """A sparse raw file of *size* bytes with data at random, unaligned places."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(6):
            off = rng.randrange(size)
            f.seek(off)
            f.write(rng.randbytes(min(size - off, rng.randrange(1, 300 * KiB))))


@pytest.mark.parametrize("size", [1000, 64 * KiB, 10 * MiB + 3, 40 * MiB + 1536])
def test_raw_sources(size: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "src.raw"
    sparse_raw(path, size, size)
    for output in OUTPUTS:
        same_as_qemu([*output, str(path)], capsys)
    same_as_qemu(["-f", "raw", "-O", "qcow2", str(path)], capsys)


def test_backing_chains_with_raw_and_short_backing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "base.raw"
    sparse_raw(raw, 8 * MiB, 1)
    mid = tmp_path / "mid.qcow2"
    qi.create(mid, 12 * MiB, backing=raw, backing_fmt="raw", opts={"cluster_size": 4096})
    qi.write(mid, [(9 * MiB, 64 * KiB, 5)])
    top = tmp_path / "top.qcow2"
    qi.create(top, 32 * MiB, backing=mid, opts={"extended_l2": True})
    qi.qemu_io(top, "write -P 6 1M 4k", "write -z 2M 1M", "write -P 7 20M 1k")
    for image in (mid, top):
        for output in OUTPUTS:
            same_as_qemu([*output, str(image)], capsys)


@pytest.mark.parametrize(
    "line",
    [
        [],
        ["-O", "qcow2"],
        ["--size", "1G", "IMG"],
        ["IMG", "IMG"],
        ["--size", "1G", "IMG", "IMG"],
        ["-f", "raw"],
        ["-l", "s", "--size", "1G"],
        ["--size", "abc"],
        ["--size", "-5"],
        ["--size", "1k", "--size", "2k"],
        ["-O", "foo", "--size", "1"],
        ["-O", "foo", "IMG"],
        ["-f", "foo", "IMG"],
        ["-O", "qcow2", "-o", "foo=bar", "--size", "1G"],
        ["-O", "qcow2", "-o", "foo", "--size", "1G"],
        ["-O", "qcow2", "-o", "help", "--size", "1G"],
        ["-O", "raw", "-o", "cluster_size=64k", "--size", "1G"],
        ["-O", "raw", "-o", "size=abc", "--size", "1G"],
        ["-O", "raw", "-o", "size=5000"],
        ["-O", "qcow2", "-o", "cluster_size=3k", "--size", "1G"],
        ["-O", "qcow2", "-o", "cluster_size=4M", "--size", "1G"],
        ["-O", "qcow2", "-o", "cluster_size=abc", "--size", "1G"],
        ["-O", "qcow2", "-o", "cluster_size=4k,,", "--size", "1G"],
        ["-O", "qcow2", "-o", "cluster_size=64k", "-o", "cluster_size=4k", "--size", "1G"],
        ["-O", "qcow2", "-o", "compat=v2", "--size", "1G"],
        ["-O", "qcow2", "-o", "compat=foo,cluster_size=3k", "--size", "1"],
        ["-O", "qcow2", "-o", "compat=foo,refcount_bits=3", "--size", "1"],
        ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
        ["-O", "qcow2", "-o", "refcount_bits=0", "--size", "1G"],
        ["-O", "qcow2", "-o", "refcount_bits=abc", "--size", "1G"],
        ["-O", "qcow2", "-o", "refcount_bits=8,compat=0.10", "--size", "1G"],
        ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=8k", "--size", "1G"],
        ["-O", "qcow2", "-o", "extended_l2=maybe", "--size", "1G"],
        ["-O", "qcow2", "-o", "preallocation=bogus,refcount_bits=3", "--size", "1"],
        ["-O", "qcow2", "-o", "preallocation=bogus", "--size", "1"],
        ["-O", "qcow2", "-o", "lazy_refcounts=x,cluster_size=y", "--size", "1"],
        ["-O", "qcow2", "-o", "cluster_size=y,lazy_refcounts=x", "--size", "1"],
        ["-O", "qcow2", "-o", "nocow=maybe", "--size", "1G"],
        ["-O", "qcow2", "-o", "cluster_size=512", "--size", "100T"],
        ["-O", "qcow2", "-o", "cluster_size=512", "--size", str(512 * 64 * (4 << 20))],
        ["-O", "qcow2", "-o", "cluster_size=512", "--size", str(512 * 64 * (4 << 20) + 1)],
    ],
)
def test_errors_as_qemu_img(line: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    path = str(qi.get_image("v3").ref.path)
    same_as_qemu([path if a == "IMG" else a for a in line], capsys)


def test_where_messages_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A file that cannot be opened: the message of every qcow2ovl command.
    missing = str(tmp_path / "missing.qcow2")
    assert theirs([missing]).returncode == 1
    assert ours([missing], capsys)[1:] == (
        f"qcow2ovl: [Errno 2] No such file or directory: '{missing}'\n",
        1,
    )
    # Encryption is not supported.
    out, err, code = ours(["-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"], capsys)
    assert (out, code) == ("", 1)
    assert "not supported" in err


def test_python_api(tmp_path: Path) -> None:
    import qcow2ovl
    from qcow2ovl.measure import MeasureResult

    r = qcow2ovl.measure(size=GiB, output_format="qcow2")
    assert r == MeasureResult(393216, 1074135040, None)
    assert r.as_json() == {"required": 393216, "fully-allocated": 1074135040}
    path = qi.get_image("bitmaps").ref.path
    m = qcow2ovl.measure(path, output_format="qcow2", options={"cluster_size": 4096})
    q = json.loads(
        qi.qemu_img("measure", "--output=json", "-O", "qcow2", "-o", "cluster_size=4k", path).stdout
    )
    assert m.as_json() == q
    assert list(m.as_json()) == ["bitmaps", "required", "fully-allocated"]
    assert qcow2ovl.measure(path) == MeasureResult(64 * MiB, 64 * MiB)
    with pytest.raises(ValueError, match="Either --size N or one filename"):
        qcow2ovl.measure()
    with pytest.raises(ValueError, match="Either --size N or one filename"):
        qcow2ovl.measure(path, size=1)
    with pytest.raises(ValueError, match="Cluster size must be a power of two"):
        qcow2ovl.measure(size=1, output_format="qcow2", options={"cluster_size": 3000})
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        qcow2ovl.measure(size=1, output_format="qcow2", options={"colour": "red"})
    with pytest.raises(ValueError, match="Invalid parameter 'cluster_size'"):
        qcow2ovl.measure(size=1, options={"cluster_size": 4096})
    with pytest.raises(ValueError, match="Unknown file format 'foo'"):
        qcow2ovl.measure(size=1, output_format="foo")
    with pytest.raises(qcow2ovl.SnapshotNotFoundError):
        qcow2ovl.measure(path, snapshot="nope")
