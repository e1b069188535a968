"""`qcow2ovl compare` against `qemu-img compare`, run on the same pairs of disks: the same
message, offset and exit status (and, with -p, the same progress lines where the chunks agree);
`qcow2ovl.compare()` returns the first differing byte."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img and qemu-io")

KiB, MiB = 1024, 1 << 20


def theirs(args: list[str | Path]) -> subprocess.CompletedProcess[str]:
    """qemu-img compare's output, its ``\\r`` kept."""
    assert qi.QEMU_IMG is not None
    p = subprocess.run([qi.QEMU_IMG, "compare", *map(str, args)], capture_output=True, check=False)
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(), p.stderr.decode())


def ours(args: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[str, str, int]:
    from qcow2ovl.cli import main

    capsys.readouterr()
    code = main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return out, err, code


def same_as_qemu(args: list[str | Path], capsys: pytest.CaptureFixture[str]) -> str:
    q = theirs(args)
    out, err, code = ours(args, capsys)
    assert (out, code) == (q.stdout, q.returncode), (args, q.stderr, err)
    assert err.replace("qcow2ovl: ", "qemu-img: ") == q.stderr, args
    return out


def both_modes(a: Path, b: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> list[str]:
    """qemu-img's and our output for a b, b a, and each strict, all the same."""
    return [
        same_as_qemu([*extra, *flags, x, y], capsys)
        for flags in ([], ["-s"])
        for x, y in ((a, b), (b, a))
    ]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two copies of a 16 MiB image with data in several clusters (the second made by
    `qemu-img convert`, so allocated alike but laid out afresh)."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qi.create(a, 16 * MiB)
    qi.write(a, [(0, 300 * KiB, 1), (3 * MiB + 512, 5 * MiB, 2), (15 * MiB, MiB, 3)])
    qi.qemu_img("convert", "-O", "qcow2", a, b)
    return a, b


def test_identical(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pair
    assert both_modes(a, b, capsys) == ["Images are identical.\n"] * 4
    assert both_modes(a, a, capsys) == ["Images are identical.\n"] * 4
    import qcow2ovl

    assert qcow2ovl.compare(a, b) is None
    assert qcow2ovl.compare(a, b, strict=True) is None


OFFSETS = [0, 1, 511, 512, 1000, 64 * KiB - 1, 64 * KiB + 17, 2 * MiB - 1, 2 * MiB, 5 * MiB + 300]


@pytest.mark.parametrize("where", OFFSETS)
@pytest.mark.parametrize("value", [0, 0x55])
def test_one_byte_differs(
    where: int, value: int, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A byte changed in the middle of a sector: qemu-img names the sector's start; the
    function returns the byte. Where the byte was zero and is written as zero nothing
    differs."""
    import qcow2ovl

    a, b = pair
    before = qcow2ovl.open(b).read(where, 1)
    qi.qemu_io(b, f"write -P {value:#x} {where} 1")
    outs = both_modes(a, b, capsys)
    differs = before != bytes([value])
    if differs:
        assert outs[0] == f"Content mismatch at offset {where - where % 512}!\n"
        assert qcow2ovl.compare(a, b) == where
    else:
        assert outs[0] == "Images are identical.\n"
        assert qcow2ovl.compare(a, b) is None


def test_several_differences_report_the_first(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import qcow2ovl

    a, b = pair
    qi.qemu_io(b, "write -P 9 9000000 3", "write -P 9 4000123 1", "write -P 9 14000000 10")
    assert both_modes(a, b, capsys)[0] == f"Content mismatch at offset {4000123 // 512 * 512}!\n"
    assert qcow2ovl.compare(a, b) == 4000123


def test_sizes_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import qcow2ovl

    short, long = tmp_path / "short.qcow2", tmp_path / "long.qcow2"
    qi.create(short, 10 * MiB)
    qi.create(long, 20 * MiB)
    for img in (short, long):
        qi.write(img, [(1000, 1, 1)])
    outs = both_modes(short, long, capsys)
    assert outs[0] == "Warning: Image size mismatch!\nImages are identical.\n"
    assert outs[2] == "Strict mode: Image size mismatch!\n"
    assert qcow2ovl.compare(short, long) is None
    assert qcow2ovl.compare(short, long, strict=True) == 10 * MiB
    # Zeros written past the shorter end still read as zeros.
    qi.qemu_io(long, "write -P 0 12M 64k", "write -z 13M 1M")
    assert both_modes(short, long, capsys)[0].endswith("Images are identical.\n")
    # Data there is a mismatch, after the warning.
    qi.qemu_io(long, "write -P 5 15000001 1")
    outs = both_modes(short, long, capsys)
    assert outs[0] == "Warning: Image size mismatch!\nContent mismatch at offset 14999552!\n"
    assert qcow2ovl.compare(long, short) == 15000001
    # A difference in the common part comes first, without the warning.
    qi.qemu_io(long, "write -P 6 5000 1")
    assert both_modes(short, long, capsys)[0] == "Content mismatch at offset 4608!\n"


def test_allocation_differs_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Equal bytes, different allocation: identical, but not in strict mode (where qemu-img
    also compares block status, down to whether a range reaches the end of the disk)."""
    one, two, zero, compressed = (tmp_path / f"{n}.qcow2" for n in ("1", "2", "z", "c"))
    qi.create(one, MiB)
    qi.create(two, MiB)
    qi.qemu_io(one, "write -P 1 0 1M")
    qi.qemu_io(two, "write -P 1 512k 512k", "write -P 1 0 512k")  # two host runs
    outs = both_modes(one, two, capsys)
    assert outs[0] == "Images are identical.\n"
    assert outs[2] == "Strict mode: Offset 0 block status mismatch!\n"
    qi.create(zero, MiB)
    qi.qemu_io(zero, "write -P 1 0 1M", "write -z 64k 64k")
    qi.qemu_io(one, "write -P 0 64k 64k")
    outs = both_modes(one, zero, capsys)
    assert outs[0] == "Images are identical.\n"
    assert outs[2] == "Strict mode: Offset 0 block status mismatch!\n"  # one run to the end
    three = tmp_path / "3.qcow2"  # the first 64 KiB a host run of their own
    qi.create(three, MiB)
    qi.qemu_io(three, "write -P 1 0 64k", "write -P 1 128k 896k", "write -P 0 64k 64k")
    assert same_as_qemu(["-s", zero, three], capsys) == (
        "Strict mode: Offset 65536 block status mismatch!\n"
    )
    qi.qemu_img("convert", "-c", "-O", "qcow2", one, compressed)
    both_modes(one, compressed, capsys)
    import qcow2ovl

    assert qcow2ovl.compare(one, two, strict=True) == 0


def test_raw_and_qcow2(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = pair
    raw = tmp_path / "a.raw"
    qi.qemu_img("convert", "-O", "raw", a, raw)
    both_modes(a, raw, capsys)
    both_modes(raw, raw, capsys)
    same_as_qemu(["-f", "qcow2", "-F", "raw", a, raw], capsys)
    same_as_qemu(["-f", "raw", "-F", "raw", a, raw], capsys)  # a qcow2 file read as raw
    with open(raw, "r+b") as f:
        f.seek(7 * MiB + 3)
        f.write(b"\x01")
    assert both_modes(a, raw, capsys)[0] == f"Content mismatch at offset {7 * MiB}!\n"
    # A raw file whose length is not whole sectors reads as zeros to the next sector.
    odd, even = tmp_path / "odd.raw", tmp_path / "even.raw"
    data = random.Random(1).randbytes(1000)
    odd.write_bytes(data)
    even.write_bytes(data + bytes(24))
    both_modes(odd, even, capsys)


def test_backing_chains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, top, flat = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "flat.qcow2"
    qi.create(base, 8 * MiB, opts={"cluster_size": 4096})
    qi.write(base, [(0, 8 * MiB, 1)])
    qi.create(top, 16 * MiB, backing=base)
    qi.qemu_io(top, "write -P 2 1M 4k", "write -z 2M 64k", "write -P 3 12M 512")
    qi.qemu_img("convert", "-O", "qcow2", top, flat)
    assert both_modes(top, flat, capsys)[0] == "Images are identical.\n"
    both_modes(top, top, capsys)
    both_modes(base, top, capsys)
    qi.qemu_io(flat, "write -P 1 2M 1")
    assert both_modes(top, flat, capsys)[0] == f"Content mismatch at offset {2 * MiB}!\n"


def test_images_of_every_kind_against_their_raw_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for kind in ("compressed", "extended_l2", "zero_discard", "prealloc_metadata", "snapshots"):
        src = qi.get_image(kind).ref.path
        raw = tmp_path / f"{kind}.raw"
        qi.qemu_img("convert", "-O", "raw", src, raw)
        same_as_qemu([src, raw], capsys)
        same_as_qemu(["-s", src, raw], capsys)
        same_as_qemu(["-s", src, src], capsys)


def random_image(rng: random.Random, path: Path, size: int, backing: Path | None) -> None:
    cluster = rng.choice([512, 4096, 16384, 65536])
    opts: dict[str, object] = {"cluster_size": cluster}
    if cluster >= 16384 and rng.random() < 0.3:
        opts["extended_l2"] = True
    qi.create(path, size, opts=opts, backing=backing)
    cmds = []
    for _ in range(rng.randint(0, 8)):
        unit = rng.choice([512, 4096, cluster])
        off = rng.randrange(size // unit) * unit
        n = min(size - off, unit * rng.randint(1, 40))
        kind = rng.choice(["write", "write", "zero", "unmap", "discard", "zeros"])
        if kind == "zeros":
            cmds.append(f"write -P 0 {off} {n}")
        else:
            cmds.append(qi.io_command(kind, off, n, rng.randint(1, 3)))
    if cmds:
        qi.qemu_io(path, *cmds)


@pytest.mark.parametrize("seed", range(6))
def test_random_pairs(seed: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Random images (cluster sizes, subclusters, zero clusters, discards, backing files of
    other sizes) against random others and against their own copies, in both modes."""
    rng = random.Random(seed)
    for i in range(4):
        size = rng.choice([1, 2, 3]) * MiB
        base = None
        if rng.random() < 0.5:
            base = tmp_path / f"base{i}.qcow2"
            random_image(rng, base, rng.choice([size, size // 2, size * 2]), None)
        a = tmp_path / f"a{i}.qcow2"
        random_image(rng, a, size, base)
        b = tmp_path / f"b{i}.qcow2"
        if rng.random() < 0.5:
            qi.qemu_img("convert", "-O", "qcow2", a, b)
            if rng.random() < 0.5:
                qi.qemu_io(b, f"write -P 7 {rng.randrange(size)} 1")
        else:
            random_image(
                rng, b, rng.choice([size, size + MiB]), base if rng.random() < 0.5 else None
            )
        both_modes(a, b, capsys)


def test_progress_lines(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pair
    out = same_as_qemu(["-p", a, b], capsys)
    assert out.startswith("    (0.00/100%)\r")
    assert out.endswith("    (100.00/100%)\rImages are identical.\n\n")
    qi.qemu_io(b, "write -P 9 9M 1")
    out = same_as_qemu(["-p", a, b], capsys)
    assert out.endswith(f"\rContent mismatch at offset {9 * MiB}!\n\n")
    assert same_as_qemu(["-p", "-q", a, b], capsys) == ""
    # The function's callback: rising counts ending at the larger size.
    import qcow2ovl

    seen: list[tuple[int, int]] = []
    qcow2ovl.compare(a, a, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 16 * MiB) and seen[-1] == (16 * MiB, 16 * MiB)
    assert all(x[0] <= y[0] for x, y in zip(seen, seen[1:]))


def test_errors(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = pair
    missing = tmp_path / "missing.qcow2"
    for line in ([a, missing], [missing, a]):
        assert theirs(line).returncode == 2
        out, err, code = ours(line, capsys)
        assert (out, code) == ("", 2)
        assert err == f"qcow2ovl: [Errno 2] No such file or directory: '{missing}'\n"
    # With -p the progress newline still ends the output, as qemu-img's does.
    assert ours(["-p", a, missing], capsys)[0] == "\n" == theirs(["-p", a, missing]).stdout
    same_as_qemu(["-T", "bogus", a, b], capsys)  # exit 2
    same_as_qemu(["-F", "foo", a, b], capsys)  # exit 2
    q = theirs([a])
    out, err, code = ours([a], capsys)
    assert (out, code) == (q.stdout, q.returncode) == ("", 1)
    assert err == "qcow2ovl: Expecting two image file names\n"
    # Encrypted images need their secret (qemu-img cannot open them without it either).
    enc = qi.get_image("luks").ref.path
    q = theirs([enc, a])
    out, err, code = ours([enc, a], capsys)
    assert (out, err.replace("qcow2ovl:", "qemu-img:"), code) == ("", q.stderr, q.returncode)
    import qcow2ovl

    with pytest.raises(FileNotFoundError):
        qcow2ovl.compare(a, missing)
    with pytest.raises(ValueError, match="Unknown driver 'foo'"):
        qcow2ovl.compare(a, b, b_format="foo")


def test_read_error_is_status_4(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A read that fails during the comparison: qemu-img's message and exit status 4."""
    import qcow2ovl.image
    from qcow2ovl.compare import CompareReadError, compare

    def failing(self: object, offset: int, buffer: object) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(qcow2ovl.image.Image, "readinto", failing)
    a, b = pair
    with pytest.raises(CompareReadError, match=f"Error while reading offset 0 of {a}"):
        compare(a, b)
    out, err, code = ours([a, b], capsys)
    assert (out, code) == ("", 4)
    assert err == f"qcow2ovl: Error while reading offset 0 of {a}: Input/output error\n"
