"""`qcow2ovl convert`'s modes and options side by side with `qemu-img convert`: each output is
compared with qemu-img's own output of the same command (`qemu-img compare`), checked clean,
and where the option shapes the layout (`-S 0`, `-B`, `-n`), the layout is qemu-img's too.
Progress lines, the Python progress callback, cancellation and qemu-img's refusals."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img and qemu-io")

KiB, MiB = 1024, 1 << 20
#: How KubeVirt CDI reads qemu-img's progress.
PROGRESS = re.compile(r"\((\d?\d\.\d\d)\/100%\)")


def ours(*args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcow2ovl", "convert", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def theirs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "convert", *map(str, args)], capture_output=True, text=True, check=False
    )


def identical(a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "qcow2") -> bool:
    proc = qi.qemu_img("compare", "-f", fmt_a, "-F", fmt_b, a, b, ok=(0, 1))
    return proc.returncode == 0


def allocation(path: Path) -> list[tuple[int, int, bool, bool, int]]:
    """(start, length, data, zero, depth) of `qemu-img map`, merged as qemu-img merges."""
    return [(e["start"], e["length"], e["data"], e["zero"], e["depth"]) for e in qi.qemu_map(path)]


def mixed_raw(path: Path, size: int = 24 * MiB) -> Path:
    """Incompressible, zero, text-like and patterned 64 KiB pieces, with holes; a length that
    is not a multiple of a cluster."""
    rng = random.Random(17)
    text = (b"the quick brown fox jumps over the lazy dog " * 2000)[: 64 * KiB]
    pattern = bytes(range(256)) * 256
    with open(path, "wb") as f:
        f.truncate(size + 1536)
        for i in range(size // (64 * KiB)):
            kind = rng.randrange(5)
            f.seek(i * 64 * KiB)
            if kind == 0:
                f.write(rng.randbytes(64 * KiB))
            elif kind == 1:
                f.write(bytes(64 * KiB))
            elif kind == 2:
                f.write(text)
            elif kind == 3:
                f.write(pattern)
            # kind 4: a hole
        f.seek(size + 512)
        f.write(b"\x07" * 700)
    return path


@pytest.fixture(scope="module")
def sources(module_tmp_path: Path) -> dict[str, Path]:
    """A mixed raw file, and qcow2 sources made by qemu-img from it: plain, compressed,
    extended L2 with 4 KiB subclusters, and the top of a backing chain."""
    d = module_tmp_path
    raw = mixed_raw(d / "mixed.raw")
    out = {"raw": raw}
    qi.qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, d / "plain.qcow2")
    out["plain"] = d / "plain.qcow2"
    qi.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, d / "compressed.qcow2")
    out["compressed"] = d / "compressed.qcow2"
    qi.qemu_img(
        "convert", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k", raw,
        d / "extl2.qcow2",
    )  # fmt: skip
    out["extl2"] = d / "extl2.qcow2"
    base = d / "base.qcow2"
    qi.qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, base)
    top = d / "top.qcow2"
    qi.create(top, 24 * MiB + 1536, backing=base)
    qi.qemu_io(top, "write -P 0x5a 1M 3M", "write -z 8M 2M", "discard 12M 1M", "write -P 1 20M 4k")
    out["top"] = top
    return out


@pytest.mark.parametrize("source", ["raw", "plain", "compressed", "extl2", "top"])
@pytest.mark.parametrize(
    "opts",
    [
        [],
        ["-o", "cluster_size=4k"],
        ["-o", "cluster_size=2M"],
        ["-o", "extended_l2=on"],
        ["-c"],
        ["-c", "-o", "compression_type=zstd,cluster_size=16k"],
    ],
    ids=["default", "4k", "2M", "extl2", "c-zlib", "c-zstd-16k"],
)
def test_to_qcow2_as_qemu_img(
    sources: dict[str, Path], source: str, opts: list[str], tmp_path: Path
) -> None:
    src = sources[source]
    mine, qemu = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    proc = ours("-O", "qcow2", *opts, src, mine)
    assert proc.returncode == 0, proc.stderr
    assert theirs("-O", "qcow2", *opts, src, qemu).returncode == 0
    fmt = "raw" if source == "raw" else "qcow2"
    assert identical(src, mine, fmt)
    assert identical(qemu, mine)
    assert qi.check_is_clean(qi.qemu_check(mine))
    info = qi.qemu_info(mine)
    assert info["virtual-size"] == qi.qemu_info(qemu)["virtual-size"]
    if "-c" in opts:
        assert info["format-specific"]["data"].get("compression-type") == qi.qemu_info(qemu)[
            "format-specific"
        ]["data"].get("compression-type")
        assert mine.stat().st_size <= qemu.stat().st_size * 1.1


@pytest.mark.parametrize("source", ["raw", "plain", "compressed", "top"])
def test_to_raw_as_qemu_img(sources: dict[str, Path], source: str, tmp_path: Path) -> None:
    src = sources[source]
    mine, qemu = tmp_path / "ours.raw", tmp_path / "qemu.raw"
    assert ours(src, mine).returncode == 0
    assert theirs(src, qemu).returncode == 0
    assert mine.read_bytes() == qemu.read_bytes()
    # Zeros are holes, as in qemu-img's output (-S 4k).
    assert mine.stat().st_blocks <= qemu.stat().st_blocks + 8


def test_sparse_size_0_allocates_everything(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["raw"]
    mine, qemu = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    assert ours("-S", "0", "-O", "qcow2", src, mine).returncode == 0
    assert theirs("-S", "0", "-O", "qcow2", src, qemu).returncode == 0
    assert identical(mine, qemu)
    assert [e[:4] for e in allocation(mine)] == [e[:4] for e in allocation(qemu)]
    assert all(e[2] for e in allocation(mine))


def test_default_layout_is_qemu_imgs(sources: dict[str, Path], tmp_path: Path) -> None:
    """Which guest ranges hold data, which are left out: the same as qemu-img's output."""
    for source in ("raw", "plain", "compressed"):
        mine, qemu = tmp_path / f"{source}.ours.qcow2", tmp_path / f"{source}.qemu.qcow2"
        assert ours("-O", "qcow2", sources[source], mine).returncode == 0
        assert theirs("-O", "qcow2", sources[source], qemu).returncode == 0
        assert [e[:3] for e in allocation(mine)] == [e[:3] for e in allocation(qemu)], source


@pytest.mark.parametrize(
    "flags", [["-m", "1"], ["-m", "16", "-W"], ["-t", "writeback", "-T", "none"]]
)
def test_parallelism_and_cache_modes(
    sources: dict[str, Path], flags: list[str], tmp_path: Path
) -> None:
    mine = tmp_path / "ours.qcow2"
    assert ours("-O", "qcow2", *flags, sources["compressed"], mine).returncode == 0
    assert identical(sources["compressed"], mine)
    assert qi.check_is_clean(qi.qemu_check(mine))


def test_backing_overlay_as_qemu_img(sources: dict[str, Path], tmp_path: Path) -> None:
    """-B: only the top layer is copied; the output names the backing file as qemu-img's."""
    top, base = sources["top"], sources["top"].parent / "base.qcow2"
    mine, qemu = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    args = ["-O", "qcow2", "-B", str(base), "-F", "qcow2"]
    proc = ours(*args, top, mine)
    assert proc.returncode == 0, proc.stderr
    assert theirs(*args, top, qemu).returncode == 0
    assert identical(top, mine)
    assert identical(qemu, mine)
    for key in ("backing-filename", "backing-filename-format"):
        assert qi.qemu_info(mine)[key] == qi.qemu_info(qemu)[key]
    assert allocation(mine) == allocation(qemu)
    assert qi.check_is_clean(qi.qemu_check(mine))


def test_no_create_writes_into_an_existing_image(sources: dict[str, Path], tmp_path: Path) -> None:
    """-n into an image full of other data: zeros of the source are written as zeros."""
    src = sources["plain"]
    for target_fmt in ("qcow2", "raw"):
        mine, qemu = tmp_path / f"ours.{target_fmt}", tmp_path / f"qemu.{target_fmt}"
        for path in (mine, qemu):
            qi.qemu_img("create", "-q", "-f", target_fmt, path, str(32 * MiB))
            cmd = ["qemu-io", "-f", target_fmt, "-c", "write -P 0xee 0 32M", str(path)]
            subprocess.run(cmd, check=True, capture_output=True)
        proc = ours("-n", "-O", target_fmt, src, mine)
        assert proc.returncode == 0, proc.stderr
        assert theirs("-n", "-O", target_fmt, src, qemu).returncode == 0
        assert identical(mine, qemu, target_fmt, target_fmt)
        if target_fmt == "qcow2":
            assert qi.check_is_clean(qi.qemu_check(mine))
    # --target-is-zero: zeros are trusted to be there (a fresh image), not written.
    fresh = tmp_path / "fresh.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", fresh, str(32 * MiB))
    assert ours("-n", "--target-is-zero", "-O", "qcow2", src, fresh).returncode == 0
    assert qi.qemu_img("compare", src, fresh, ok=(0, 1)).returncode == 0
    data = [e[0] for e in allocation(fresh) if e[2]]
    assert data == [e[0] for e in allocation(src) if e[2]]


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "0"],
        ["-m", "17"],
        ["-S", "foo"],
        ["-S", "-1"],
        ["-c"],
        ["-B", "x.qcow2"],
        ["--target-is-zero"],
        ["-t", "fast"],
        ["-O", "qcow2", "-B", "x.qcow2"],
        ["-O", "qcow2", "-F", "qcow2"],
    ],
)
def test_refusals_in_qemu_img_words(sources: dict[str, Path], args: list[str], tmp_path: Path):
    mine, qemu = tmp_path / "ours.out", tmp_path / "qemu.out"
    a, b = ours(*args, sources["raw"], mine), theirs(*args, sources["raw"], qemu)
    assert a.returncode == b.returncode == 1, (a.stderr, b.stderr)
    said = a.stderr.replace("qcow2ovl: ", "", 1).replace(str(mine), "OUT")
    assert said == b.stderr.replace("qemu-img: ", "", 1).replace(str(qemu), "OUT")
    assert not mine.exists()


def test_no_create_refuses_a_smaller_target(sources: dict[str, Path], tmp_path: Path) -> None:
    small = tmp_path / "small.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", small, "1M")
    before = qi.sha256_file(small)
    a = ours("-n", "-O", "qcow2", sources["raw"], small)
    b = theirs("-n", "-O", "qcow2", sources["raw"], small)
    assert a.returncode == b.returncode == 1
    assert a.stderr.replace("qcow2ovl: ", "", 1) == b.stderr.replace("qemu-img: ", "", 1)
    assert qi.sha256_file(small) == before


def test_progress_lines_as_qemu_img(sources: dict[str, Path], tmp_path: Path) -> None:
    def stdout(argv: list[str | Path]) -> str:
        # Bytes, so that the line ends stay as written (text mode turns \r into \n).
        proc = subprocess.run([str(a) for a in argv], capture_output=True, check=True)
        return proc.stdout.decode()

    mine = stdout([sys.executable, "-m", "qcow2ovl", "convert", "-p", "-O", "qcow2",
                   sources["compressed"], tmp_path / "p.qcow2"])  # fmt: skip
    qemu = stdout(["qemu-img", "convert", "-p", "-O", "qcow2", sources["compressed"],
                   tmp_path / "q.qcow2"])  # fmt: skip
    for out in (mine, qemu):
        lines = re.split(r"[\r\n]", out)
        assert lines[0] == "    (0.00/100%)" and out.endswith("    (100.00/100%)\r\n")
        # The pattern reads up to 99.99 (not the final 100.00 lines).
        values = [float(m) for m in PROGRESS.findall(out)]
        assert values == sorted(values) and values[0] == 0.0 and values[-1] >= 90
        assert all(re.fullmatch(r"    \(\d+\.\d\d/100%\)", line) for line in lines if line)
    assert ours("-p", "-q", sources["raw"], tmp_path / "quiet.raw").stdout == ""


def test_python_progress_and_result(sources: dict[str, Path], tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    result = qcow2ovl.convert(
        sources["top"],
        tmp_path / "out.qcow2",
        output_format="qcow2",
        options={"cluster_size": 16384},
        progress=lambda done, total: seen.append((done, total)),
    )
    size = qi.qemu_info(sources["top"])["virtual-size"]
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert result.total == size and 0 < result.written <= result.read <= size
    assert result.compressed_clusters == 0
    assert identical(sources["top"], tmp_path / "out.qcow2")


def test_a_cancelled_convert_leaves_a_consistent_image(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "half.qcow2"

    def stop(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qcow2ovl.convert(sources["plain"], out, output_format="qcow2", progress=stop)
    assert qi.check_is_clean(qi.qemu_check(out))
    # What was copied is the source's.
    first = tmp_path / "first.raw"
    qi.qemu_img("convert", "-O", "raw", out, first)
    src = sources["raw"].read_bytes()
    assert first.read_bytes()[: 4 * MiB] == src[: 4 * MiB]
