"""qcow2ovl.create() and ``qcow2ovl create`` against QEMU: every image we make is checked clean
by ``qemu-img check``, reports what was asked in ``qemu-img info``, and takes qemu-io writes;
every refused combination carries the message qemu-img prints for the same options."""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import qcow2ovl
from qcow2ovl import _cli_create
from qemu_images import (
    HAVE_QEMU,
    QEMU_IMG,
    check_is_clean,
    qemu_check,
    qemu_img,
    qemu_info,
    qemu_io,
    qemu_map,
)

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-img and qemu-io")

MiB = 1 << 20
GiB = 1 << 30

#: qemu-img's option name and value text for each keyword of qcow2ovl.create().
_QEMU_NAMES = {
    "cluster_size": "cluster_size",
    "version": "compat",
    "refcount_bits": "refcount_bits",
    "extended_l2": "extended_l2",
    "lazy_refcounts": "lazy_refcounts",
    "compression_type": "compression_type",
    "backing_file": "backing_file",
    "backing_format": "backing_fmt",
    "data_file": "data_file",
    "data_file_raw": "data_file_raw",
    "preallocation": "preallocation",
}


def _qemu_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if key == "version" and value in (2, 3):
        return "0.10" if value == 2 else "1.1"
    return str(value)


def qemu_create_error(directory: Path, size: int, kwargs: dict[str, Any]) -> str:
    """What qemu-img create prints (without its ``qemu-img: PATH: `` prefix) for *kwargs*."""
    opts = ",".join(f"{_QEMU_NAMES[k]}={_qemu_value(k, v)}" for k, v in kwargs.items())
    path = directory / "qemu.qcow2"
    assert QEMU_IMG is not None
    args = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    proc = subprocess.run(
        [*args, str(path), str(size)], capture_output=True, text=True, cwd=directory, check=False
    )
    assert proc.returncode != 0, f"qemu-img accepted {kwargs}"
    if path.exists():
        path.unlink()
    return proc.stderr.strip().removeprefix(f"qemu-img: {path}: ")


def assert_like_asked(path: Path, size: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """qemu-img check is clean and qemu-img info shows what *kwargs* asked for."""
    report = qemu_check(path)
    assert check_is_clean(report), report
    info = qemu_info(path)
    data = info["format-specific"]["data"]
    assert info["virtual-size"] == -(-size // 512) * 512
    assert info["cluster-size"] == kwargs.get("cluster_size", 65536)
    version = {2: 2, 3: 3, "0.10": 2, "1.1": 3}[kwargs.get("version", 3)]
    assert data["compat"] == ("1.1" if version == 3 else "0.10")
    assert data["refcount-bits"] == kwargs.get("refcount_bits", 16)
    if version == 3:
        ctype = {"deflate": "zlib"}.get(kwargs.get("compression_type", "zlib"))
        assert data["compression-type"] == (ctype or kwargs.get("compression_type", "zlib"))
        assert data["lazy-refcounts"] is kwargs.get("lazy_refcounts", False)
        assert data["extended-l2"] is kwargs.get("extended_l2", False)
        assert data.get("data-file") == kwargs.get("data_file")
        if "data_file" in kwargs:
            assert data["data-file-raw"] is kwargs.get("data_file_raw", False)
    assert info.get("backing-filename") == kwargs.get("backing_file")
    assert info.get("backing-filename-format") == kwargs.get("backing_format")
    return info


def write_and_read_back(path: Path, size: int) -> None:
    """qemu-io writes a pattern at both ends of the disk and reads it back."""
    last = max(0, size - 4096)
    qemu_io(
        path,
        "write -P 0x5a 0 4k",
        f"write -P 0xa5 {last} 4k",
        "read -P 0x5a 0 4k",
        f"read -P 0xa5 {last} 4k",
    )
    assert check_is_clean(qemu_check(path))


CASES: list[tuple[str, int, dict[str, Any]]] = [
    ("default", 64 * MiB, {}),
    ("unaligned-size", 100_000, {}),
    ("zero-size", 0, {}),
    ("cluster-512", 8 * MiB, {"cluster_size": 512}),
    ("cluster-4k", 8 * MiB, {"cluster_size": 4096}),
    ("cluster-2M-extl2", 64 * MiB, {"cluster_size": 2 * MiB, "extended_l2": True}),
    ("v2", 16 * MiB, {"version": 2}),
    ("compat-0.10", 16 * MiB, {"version": "0.10"}),
    ("compat-1.1", 16 * MiB, {"version": "1.1"}),
    ("refcount-1", 16 * MiB, {"refcount_bits": 1}),
    ("refcount-8", 16 * MiB, {"refcount_bits": 8}),
    ("refcount-64", 16 * MiB, {"refcount_bits": 64}),
    ("extended-l2", 16 * MiB, {"extended_l2": True}),
    ("lazy", 16 * MiB, {"lazy_refcounts": True}),
    ("zstd", 16 * MiB, {"compression_type": "zstd"}),
    ("deflate", 16 * MiB, {"compression_type": "deflate"}),
    ("data-file", 16 * MiB, {"data_file": "data.raw"}),
    ("data-file-raw", 16 * MiB, {"data_file": "data.raw", "data_file_raw": True}),
    ("prealloc-metadata", 16 * MiB, {"preallocation": "metadata"}),
    ("prealloc-falloc", 16 * MiB, {"preallocation": "falloc"}),
    ("prealloc-full", 16 * MiB, {"preallocation": "full"}),
    ("v2-metadata", 16 * MiB, {"version": 2, "preallocation": "metadata"}),
    ("extl2-metadata", 16 * MiB, {"extended_l2": True, "preallocation": "metadata"}),
    ("data-file-falloc", 16 * MiB, {"data_file": "data.raw", "preallocation": "full"}),
    (
        "small-clusters-wide-refcounts-metadata",
        8 * MiB,
        {"cluster_size": 512, "refcount_bits": 64, "preallocation": "metadata"},
    ),
    (
        "everything-v3",
        32 * MiB,
        {
            "cluster_size": 16384,
            "extended_l2": True,
            "lazy_refcounts": True,
            "compression_type": "zstd",
            "refcount_bits": 32,
            "data_file": "data.raw",
            "data_file_raw": True,
            "preallocation": "falloc",
        },
    ),
]


@pytest.mark.parametrize(("size", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_created_image_is_what_qemu_expects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, kwargs: dict[str, Any]
) -> None:
    # QEMU finds a relative data file in its working directory (and creates it there).
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "new.qcow2"
    qcow2ovl.create(path, size, **kwargs)
    assert_like_asked(path, size, kwargs)
    if "data_file" in kwargs:
        assert (tmp_path / kwargs["data_file"]).stat().st_size == -(-size // 512) * 512
    if kwargs.get("preallocation") in ("falloc", "full"):
        # The space is really allocated, in the data file when there is one.
        holder = tmp_path / kwargs.get("data_file", "new.qcow2")
        assert holder.stat().st_blocks * 512 >= size
    if size:
        write_and_read_back(path, size)
    with qcow2ovl.open(path) as image:
        assert image.problems == []


def test_backing_files_give_their_size(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "24M")
    qemu_io(base, "write -P 0x11 0 64k")
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x22" * 70_000)
    sub = tmp_path / "sub"
    sub.mkdir()
    top = sub / "top.qcow2"
    # Relative names are relative to the new image's folder.
    qcow2ovl.create(top, backing_file="../base.qcow2", backing_format="qcow2")
    assert_like_asked(top, 24 * MiB, {"backing_file": "../base.qcow2", "backing_format": "qcow2"})
    qemu_io(top, "read -P 0x11 0 64k", "read -P 0 64k 64k")
    top_raw = tmp_path / "raw-top.qcow2"
    qcow2ovl.create(top_raw, backing_file="base.raw", backing_format="raw")
    assert qemu_info(top_raw)["virtual-size"] == 70_144  # raw length rounded up to sectors
    qemu_io(top_raw, "read -P 0x22 0 68k")
    prealloc = tmp_path / "prealloc.qcow2"
    kwargs: dict[str, Any] = {
        "backing_file": "base.qcow2",
        "backing_format": "qcow2",
        "extended_l2": True,
        "preallocation": "metadata",
    }
    qcow2ovl.create(prealloc, 8 * MiB, **kwargs)
    assert_like_asked(prealloc, 8 * MiB, kwargs)
    # Preallocated subclusters stay unallocated: the backing file still shows through.
    qemu_io(prealloc, "read -P 0x11 0 64k")
    write_and_read_back(prealloc, 8 * MiB)


def head(path: Path, n: int) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def qemu_img_create(path: Path, size: int | None, kwargs: dict[str, Any]) -> None:
    """``qemu-img create`` with the options that *kwargs* gives qcow2ovl.create()."""
    kw = dict(kwargs)
    backing = (
        ["-b", kw.pop("backing_file"), "-F", kw.pop("backing_format")]
        if "backing_file" in kw
        else []
    )
    o = ",".join(f"{_QEMU_NAMES[k]}={_qemu_value(k, v)}" for k, v in kw.items())
    tail = [] if size is None else [str(size)]
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", o] if o else []), *backing, path, *tail)


SAME_AS_QEMU: list[tuple[int | None, dict[str, Any]]] = [
    (GiB, {}),
    (0, {}),
    (100_000, {}),
    (5 * GiB, {"cluster_size": 4096, "refcount_bits": 1, "lazy_refcounts": True}),
    (8 * MiB, {"cluster_size": 512, "refcount_bits": 64}),
    (GiB, {"cluster_size": 2 * MiB, "extended_l2": True, "compression_type": "zstd"}),
    (None, {"version": 2, "backing_file": "base.qcow2", "backing_format": "qcow2"}),
    (GiB, {"backing_file": "base.qcow2", "backing_format": "qcow2", "extended_l2": True}),
    (GiB, {"data_file": "data.raw"}),
    (64 * MiB, {"data_file": "data.raw", "data_file_raw": True}),
    (64 * MiB, {"preallocation": "metadata", "refcount_bits": 8}),
    (64 * MiB, {"preallocation": "metadata", "extended_l2": True, "cluster_size": 16384}),
]


@pytest.mark.parametrize(("size", "kwargs"), SAME_AS_QEMU)
def test_byte_identical_to_qemu_img(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int | None, kwargs: dict[str, Any]
) -> None:
    """While one refcount block covers the whole file (QEMU adds more where it runs out, we
    put them all at the front), the file is exactly the one qemu-img writes."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "3G")
    qemu_img_create(tmp_path / "theirs.qcow2", size, kwargs)
    if "data_file" in kwargs:
        os.rename(kwargs["data_file"], "theirs-data.raw")
    qcow2ovl.create(tmp_path / "ours.qcow2", size, **kwargs)
    assert (tmp_path / "ours.qcow2").stat().st_size == (tmp_path / "theirs.qcow2").stat().st_size
    assert filecmp.cmp(tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2", shallow=False)


def test_metadata_preallocation_maps_like_qemu(tmp_path: Path) -> None:
    """1 GiB with preallocation=metadata: same layout as QEMU's, block for block."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qcow2ovl.create(ours, GiB, preallocation="metadata")
    qemu_img_create(theirs, GiB, {"preallocation": "metadata"})
    assert head(ours, 6 * 65536) == head(theirs, 6 * 65536)
    assert ours.stat().st_size == theirs.stat().st_size
    assert qemu_map(ours) == qemu_map(theirs)


@pytest.mark.parametrize("size", [64 * GiB, 1 << 40])
def test_large_metadata_preallocation(tmp_path: Path, size: int) -> None:
    path = tmp_path / "big.qcow2"
    qcow2ovl.create(path, size, preallocation="metadata")
    report = qemu_check(path)
    assert check_is_clean(report), report
    assert report["allocated-clusters"] == size // 65536
    qemu_io(path, f"write -P 0x33 {size - 65536} 64k", f"read -P 0x33 {size - 65536} 64k")


INVALID: list[tuple[str, dict[str, Any]]] = [
    ("extl2-v2", {"version": 2, "extended_l2": True}),
    ("cluster-not-pow2", {"cluster_size": 1000}),
    ("cluster-too-small", {"cluster_size": 256}),
    ("cluster-too-large", {"cluster_size": 4 * MiB}),
    ("extl2-small-clusters", {"extended_l2": True, "cluster_size": 8192}),
    ("extl2-v2-first", {"version": 2, "extended_l2": True, "cluster_size": 1000}),
    (
        "backing-prealloc",
        {"backing_file": "b.qcow2", "backing_format": "qcow2", "preallocation": "metadata"},
    ),
    ("backing-fmt-alone", {"backing_format": "qcow2"}),
    ("lazy-v2", {"version": 2, "lazy_refcounts": True}),
    ("refcount-3", {"refcount_bits": 3}),
    ("refcount-128", {"refcount_bits": 128}),
    ("refcount-0", {"refcount_bits": 0}),
    ("refcount-v2", {"version": 2, "refcount_bits": 8}),
    ("raw-without-file", {"data_file_raw": True}),
    (
        "raw-with-backing",
        {
            "data_file": "d.raw",
            "data_file_raw": True,
            "backing_file": "b.qcow2",
            "backing_format": "qcow2",
        },
    ),
    ("data-file-v2", {"version": 2, "data_file": "d.raw"}),
    ("zstd-v2", {"version": 2, "compression_type": "zstd"}),
    ("compression-unknown", {"compression_type": "lz4"}),
    ("compat-unknown", {"version": "1.0"}),
    ("prealloc-unknown", {"preallocation": "bogus"}),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_options_get_qemus_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any]
) -> None:
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "b.qcow2", "1G")
    expected = qemu_create_error(tmp_path, GiB, kwargs)
    path = tmp_path / "ours.qcow2"
    with pytest.raises(ValueError) as exc:
        qcow2ovl.create(path, GiB, **kwargs)
    assert str(exc.value) == expected
    assert not path.exists()
    assert not (tmp_path / "d.raw").exists()


@pytest.mark.parametrize(
    ("size", "kwargs"),
    [
        (3 << 50, {}),
        (1 << 60, {}),
        ((2 << 50) + 512, {}),
        ((1 << 50) + 512, {"extended_l2": True}),
        ((1 << 40) + 512, {"cluster_size": 512}),
        ((1 << 63) - 512, {"cluster_size": 2 * MiB}),
    ],
)
def test_too_large_gets_qemus_message(tmp_path: Path, size: int, kwargs: dict[str, Any]) -> None:
    expected = qemu_create_error(tmp_path, size, kwargs)
    with pytest.raises(ValueError) as exc:
        qcow2ovl.create(tmp_path / "x.qcow2", size, **kwargs)
    assert str(exc.value) == expected


def test_largest_sizes_are_accepted(tmp_path: Path) -> None:
    for size, kwargs in [(2 << 50, {}), (1 << 50, {"extended_l2": True})]:
        path = tmp_path / "max.qcow2"
        qcow2ovl.create(path, size, overwrite=True, **kwargs)  # type: ignore[arg-type]
        assert qemu_info(path)["virtual-size"] == size
        assert check_is_clean(qemu_check(path))


def test_size_rules(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Must be between 0 and 9223372036854775807"):
        qcow2ovl.create(tmp_path / "neg.qcow2", -1)
    with pytest.raises(ValueError, match="^Image creation needs a size parameter$"):
        qcow2ovl.create(tmp_path / "nosize.qcow2")
    with pytest.raises(ValueError, match="^Backing file specified without backing format$"):
        qcow2ovl.create(tmp_path / "nofmt.qcow2", backing_file="b.qcow2")
    with pytest.raises(FileNotFoundError):
        qcow2ovl.create(tmp_path / "nobase.qcow2", 1, backing_file="no", backing_format="raw")
    assert not list(tmp_path.iterdir())


def test_existing_files_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "x.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        qcow2ovl.create(path, MiB)
    assert path.read_bytes() == b"precious"
    data = tmp_path / "d.raw"
    data.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        qcow2ovl.create(tmp_path / "y.qcow2", MiB, data_file="d.raw")
    assert data.read_bytes() == b"precious"
    assert not (tmp_path / "y.qcow2").exists()
    qcow2ovl.create(path, MiB, overwrite=True)
    assert check_is_clean(qemu_check(path))


# ---- the command line ---------------------------------------------------------------------


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="qcow2ovl")
    _cli_create.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["create", *argv])
    return int(args.func(args))


@pytest.mark.parametrize(
    ("options", "size"),
    [
        ([], "1G"),
        (["-o", "cluster_size=64k,lazy_refcounts=true"], "1.5G"),
        (["-o", "compat=0.10", "-o", "refcount_bits=16"], "0x100000"),
        (["-o", "preallocation=metadata,compression_type=zstd,extended_l2=on"], "100000"),
        (["-o", "data_file=d.raw,data_file_raw=on,compat=1.1"], "2M"),
        (["-o", "data_file=a,,b.raw"], "1M"),
        (["-b", "base.qcow2", "-F", "qcow2"], None),
        (["-o", "size=3M"], None),
        (["-f", "qcow2", "-o", "cluster_size=2M,extended_l2=on"], "1T"),
    ],
)
def test_cli_prints_and_creates_like_qemu_img(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    size: str | None,
) -> None:
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "5M")
    tail = [size] if size is not None else []
    theirs = qemu_img("create", "-f", "qcow2", *options, "theirs.qcow2", *tail)
    for data in ("d.raw", "a,b.raw"):
        if Path(data).exists():
            Path(data).unlink()
    assert cli(*options, "ours.qcow2", *tail) == 0
    out = capsys.readouterr().out
    assert out.replace("ours.qcow2", "theirs.qcow2") == theirs.stdout
    ours_info, theirs_info = qemu_info("ours.qcow2"), qemu_info("theirs.qcow2")
    for key in ("virtual-size", "cluster-size", "format-specific", "backing-filename"):
        assert ours_info.get(key) == theirs_info.get(key)
    assert check_is_clean(qemu_check("ours.qcow2"))


def test_cli_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for argv, message in [
        (["x.qcow2", "1.5"], "qcow2ovl: Invalid image size specified: '1.5'."),
        (["x.qcow2", "16E"], "qcow2ovl: Invalid image size specified. Must be between 0"),
        (["-o", "foo=1", "x.qcow2", "1M"], "qcow2ovl: x.qcow2: Invalid parameter 'foo'"),
        (
            ["-o", "lazy_refcounts=maybe", "x.qcow2", "1M"],
            "qcow2ovl: x.qcow2: Parameter 'lazy_refcounts' expects 'on' or 'off'",
        ),
        (
            ["-o", "size=2M", "x.qcow2", "1M"],
            "qcow2ovl: x.qcow2: The image size must be specified only once",
        ),
        (["x.qcow2"], "qcow2ovl: x.qcow2: Image creation needs a size parameter"),
        (["-f", "vmdk", "x.qcow2", "1M"], "qcow2ovl: x.qcow2: Unknown file format 'vmdk'"),
        (
            ["-q", "-o", "cluster_size=1000", "x.qcow2", "1M"],
            "qcow2ovl: x.qcow2: Cluster size must be a power of two between 512 and 2048k",
        ),
    ]:
        assert cli(*argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(message), (argv, err)
        assert not Path("x.qcow2").exists()
    # What qemu-img cannot create, with its words.
    Path("dir.qcow2").mkdir()
    os.symlink("missing/x", "dangling.qcow2")
    for name in ("dir.qcow2", "dangling.qcow2"):
        theirs = qemu_img("create", "-q", "-f", "qcow2", name, "1M", ok=(1,))
        assert cli("-q", name, "1M") == 1
        assert capsys.readouterr().err == theirs.stderr.replace("qemu-img: ", "qcow2ovl: ")


@pytest.mark.parametrize(
    "options", [[], ["-o", "data_file=d.raw"], ["-o", "compat=0.10,cluster_size=4k"]]
)
def test_cli_replaces_an_existing_file_as_qemu_img_does(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
) -> None:
    """qemu-img create over an existing image (and data file) replaces them; so does ours.
    The Python function keeps refusing without overwrite=True."""
    monkeypatch.chdir(tmp_path)
    for who in ("theirs", "ours"):
        qemu_img("create", "-q", "-f", "qcow2", f"{who}.qcow2", "8M")
        qemu_io(f"{who}.qcow2", "write -P 0x5a 0 1M")
    Path("d.raw").write_bytes(b"\x77" * MiB)
    theirs = qemu_img("create", "-f", "qcow2", *options, "theirs.qcow2", "2M")
    theirs_data = Path("d.raw").read_bytes()
    Path("d.raw").write_bytes(b"\x77" * MiB)
    assert cli(*options, "ours.qcow2", "2M") == 0
    assert capsys.readouterr() == (theirs.stdout.replace("theirs.qcow2", "ours.qcow2"), "")
    ours_info, theirs_info = qemu_info("ours.qcow2"), qemu_info("theirs.qcow2")
    for key in ("virtual-size", "cluster-size", "format-specific"):
        assert ours_info[key] == theirs_info[key]
    assert "identical" in qemu_img("compare", "ours.qcow2", "theirs.qcow2").stdout
    assert Path("d.raw").read_bytes() == theirs_data
    assert check_is_clean(qemu_check("ours.qcow2"))
    with pytest.raises(FileExistsError):
        qcow2ovl.create("ours.qcow2", MiB)


def test_size_parser() -> None:
    parse = _cli_create.parse_size
    assert parse("1") == 1
    assert parse("1b") == 1
    assert parse("2k") == parse("2K") == 2048
    assert parse("1.5G") == 3 << 29
    assert parse("1.5k") == 1536
    assert parse("1.0") == 1
    assert parse("0x1000") == 4096
    assert parse(" 1m") == MiB
    assert parse("1E") == 1 << 60
    assert parse("16E") == -1
    assert parse("-5") == -1
    for bad in ("1.5", "abc", "", "1KiB", "1kb", ".", "k"):
        assert parse(bad) is None, bad
