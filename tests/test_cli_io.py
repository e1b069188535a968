"""`qcow2ovl io` against qemu-io: the same command lines on two copies of one image give the same
output (timing numbers aside), the same exit status and images `qemu-img compare` finds
identical; a write onto metadata is refused with QEMU's words."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import qemu_images as qi
from qcow2ovl import _cli_io_words

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img and qemu-io")

MiB = 1 << 20
# qemu-io's timing line; the numbers after the op count differ from run to run.
TIMING = re.compile(
    r"^(?P<head>[0-9.]+ (?:bytes|KiB|MiB|GiB|TiB|PiB|EiB), \d+ ops); "
    r"(?:\d+:)?\d\d(?::\d\d)?\.\d\d(?: sec)? \([0-9.]+ (?:bytes|KiB|MiB|GiB|TiB|PiB|EiB)/sec "
    r"and [0-9.]+ ops/sec\)$"
)


def ours(image: Path, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcow2ovl", "io"]
    for c in commands:
        argv += ["-c", c]
    return subprocess.run([*argv, str(image)], capture_output=True, text=True, check=False)


def theirs(
    image: Path | str, *commands: str, opts: str | None = None
) -> subprocess.CompletedProcess[str]:
    assert qi.QEMU_IO is not None
    argv = [qi.QEMU_IO]
    for c in commands:
        argv += ["-c", c]
    argv += ["--image-opts", opts] if opts else ["-f", "qcow2", str(image)]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


# qemu-io's -C line: bytes,ops,time,bytes/sec,ops/sec.
TIMING_C = re.compile(r"^(?P<head>\d+,\d+),\d+:\d\d:\d\d\.\d\d,[0-9.]+,[0-9.]+$")


def normalized(stdout: str) -> list[str]:
    """stdout with every timing line's numbers cut off (each such line must have the form)."""
    lines = []
    for line in stdout.splitlines():
        c = TIMING_C.match(line)
        if c:
            line = c.group("head")
        elif ", 1 ops; " in line:
            m = TIMING.match(line)
            assert m, f"not a qemu-io timing line: {line!r}"
            line = m.group("head")
        lines.append(line)
    return lines


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two copies of one qemu-made image with data in a few clusters."""
    a = tmp_path / "qemu.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", a, "64M")
    qi.qemu_io(a, "write -P 0x11 0 192k", "write -P 0x22 5M 4k")
    b = tmp_path / "ours.qcow2"
    shutil.copyfile(a, b)
    return a, b


SEQUENCES = {
    "writes": [
        "write -P 0xab 0 64k",
        "write 1M 4k",  # default pattern 0xcd
        "write -P 171 3M 1.5k",
        "write -P 0x5 0x10001 70000",
        "read -P 0xab 0 64k",
        "read -P 0xcd 1M 4k",
        "read -P 0xab 3M 0.5k",
        "flush",
    ],
    "zeroes_and_discard": [
        "write -z 64k 64k",
        "write -z -u 128k 64k",
        "write -z 5M 100",
        "discard 8M 128k",
        "write -P 0x33 8M 4k",
        "discard 8M 64k",
        "read -P 0 64k 128k",
        "read -P 0 8M 64k",
        "read -v 5M 40",
    ],
    "pattern_mismatch": ["read -P 0x12 0 512", "read -P 0x11 0 512", "read -v 0x20000 17"],
    "suffixes": [
        "write -P 1 1k 2k",
        "write -P 2 .5k 0.5k",
        "write -P 3 2M 1M",
        "write -P 4 0X3000 0x200",
        "read -P 3 2M 1M",
        "read 0 0",
        "write -P 010 48M 1b",
        "read -P 8 48M 1",
        "write -q -P 9 4k 4k",
        "read -q -P 9 4k 4k",
        "read -qv 4k 16",
        "discard -q 32M 64k",
    ],
    "errors": [
        "read 0 1G",
        "write 64M 1",
        "discard 0 1G",
        "write 0 1x",
        "write -P 300 0 1",
        "write -P xx 0 1",
        "write -z -P 1 0 512",
        "write -u 0 512",
        "read 0 1E",
        "read 0 99999999999999999999",
        "write 0 1.5",
        "read 0 0x1k",
        "bogus",
        "write 0",
        "flush x",
        "write -P 0x77 4M 4k",  # still runs after the failures
        "read -P 0x77 4M 4k",
    ],
    "compressed": [
        "write -c -P 0x41 2M 64k",
        "write -c 3M 128k",
        "write -c -q -P 0x42 0x3ff0000 64k",  # the last cluster
        "write -c 0 4k",  # not a whole cluster: EINVAL
        "write -c 64M 64k",
        "write -c -z 0 64k",
        "read -P 0x41 2M 64k",
        "read -P 0xcd 3M 128k",
    ],
    "vectors_and_aio": [
        "writev -P 7 3M 1k 1k",
        "readv -P 7 3M 1k 1k",
        "readv -v 64k 8 8",
        "readv -P 8 3M 2k",
        "writev -q 6M 512 512",
        "readv 64M 1",
        "writev 64M 1",
        "readv 0",
        "aio_write -P 8 4M 4k",
        "aio_flush",
        "aio_read -P 8 4M 4k",
        "aio_flush",
        "aio_read -P 9 4M 4k",  # a mismatch, yet aio_read succeeds as submitted
        "aio_flush",
        "aio_write -z -P 1 7M 64k",
        "aio_flush",
        "aio_write -z -u 8M 64k",
        "aio_flush",
        "aio_write -u 0 1",
        "aio_read 64M 1",
        "aio_flush",
        "aio_write 64M 1",
        "aio_flush",
        "aio_read -i 0 1",
    ],
    "allocation": [
        "alloc 0",
        "alloc 0 1M",
        "alloc 64k 256k",
        "alloc 5M 1",
        "alloc 63M 2M",
        "alloc 100M",
        "alloc",
        "alloc 0 1 2",
        "write -z 1M 64k",
        "map",
        "length",
        "info",
        "map x",
        "length 1",
    ],
    "stats_and_options": [
        "write -C 0 512",
        "read -C 0 512",
        "discard -C 8M 64k",
        "write -f -P 3 9M 4k",
        "write -n 0 512",
        "write -n -z 10M 64k",
        "read -P 0x11 -s 0 -l 64k 0 128k",
        "read -P 0x11 -s 64k -l 128k 0 128k",
        "read -s 1 0 1",
        "write -s /dev/null 0 1",  # an empty file
        "write -s /nonexistent 0 1",
    ],
    "truncate": [
        "truncate 1000",
        "truncate 128M",
        "length",
        "write -P 0x44 100M 4k",
        "read -P 0x44 100M 4k",
        "truncate",
        "map",
        "info",
    ],
}


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_same_output_and_same_image_as_qemu_io(name: str, pair: tuple[Path, Path]) -> None:
    a, b = pair
    commands = SEQUENCES[name]
    q = theirs(a, *commands)
    o = ours(b, *commands)
    assert normalized(o.stdout) == normalized(q.stdout)
    assert o.stderr.replace("qcow2ovl: ", "qemu-io: ") == q.stderr
    assert o.returncode == q.returncode
    assert "identical" in qi.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", a, b).stdout
    assert qi.check_is_clean(qi.qemu_check(b))


def test_each_command_alone_exits_like_qemu_io(pair: tuple[Path, Path]) -> None:
    a, b = pair
    for commands in SEQUENCES.values():
        for command in commands:
            q, o = theirs(a, command), ours(b, command)
            mine = o.stderr.replace("qcow2ovl: ", "qemu-io: ")
            assert (o.returncode, mine) == (q.returncode, q.stderr), command


def test_usage_line_follows_a_bad_option(pair: tuple[Path, Path]) -> None:
    a, b = pair
    for command in ("read -x 0 1", "read 0 -5", "read 0 1 2"):
        q, o = theirs(a, command), ours(b, command)
        assert (o.returncode, o.stderr) == (q.returncode, q.stderr), command
        # Our usage line lists the options we take; qemu-io's lists its own.
        assert o.stdout.startswith("read [") and q.stdout.startswith("read [")


def test_timing_line_words() -> None:
    assert _cli_io_words.report_line(65536, 0.0).startswith("64 KiB, 1 ops; 00.00 sec (")
    assert (
        _cli_io_words.report_line(512, 2.5)
        == "512 bytes, 1 ops; 02.50 sec (204.800000 bytes/sec and 0.4000 ops/sec)"
    )
    assert _cli_io_words.size_text(1536) == "1.500 KiB"
    assert _cli_io_words.size_text(0) == "0 bytes"
    assert _cli_io_words.size_text(3 << 30) == "3 GiB"
    assert _cli_io_words.time_text(75.5) == "01:15.50"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("010", 10),
        ("0x10", 16),
        ("1.5k", 1536),
        (".5k", 512),
        ("1.k", 1024),
        ("1B", 1),
        ("2M", 2 * MiB),
        ("1E", 1 << 60),
    ],
)
def test_numbers(text: str, value: int) -> None:
    assert _cli_io_words.parse_number(text) == value


@pytest.mark.parametrize("text", ["", ".", "1x", "1kb", "1e3", "0x", "0x1k", "1.5", "-1", "8E"])
def test_bad_numbers(text: str) -> None:
    with pytest.raises(_cli_io_words.CommandError, match="Parsing error"):
        _cli_io_words.parse_number(text)


def _corrupted(tmp_path: Path) -> tuple[Path, int]:
    """A qemu-made image whose first L2 entry points at the active L1 table (COPIED set): the
    next write of guest cluster 0 would land on the L1 table."""
    path = tmp_path / "c.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qi.qemu_io(path, "write -P 0x2a 0 64k", "write -P 0x2b 1M 64k")
    (l1,) = qi.peek(path, 40, ">Q")
    (l1_entry,) = qi.peek(path, l1, ">Q")
    qi.poke(path, l1_entry & 0x00FFFFFFFFFFFE00, ">Q", (1 << 63) | l1)
    return path, l1


def test_write_onto_metadata_refused_like_qemu(tmp_path: Path) -> None:
    path, l1 = _corrupted(tmp_path)
    copy = tmp_path / "qemu.qcow2"
    shutil.copyfile(path, copy)
    before = path.read_bytes()
    o = ours(path, "write -P 0xff 0 512", "write -P 0xff 1M 512", "read -P 0x2b 1M 64k")
    q = theirs(copy, "write -P 0xff 0 512")
    marking = (
        "qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with "
        "active L1 table); further corruption events will be suppressed\n"
    )
    assert q.stderr == marking and o.stderr == marking
    assert q.stdout == "write failed: Input/output error\n"
    lines = normalized(o.stdout)
    # Later writes are refused too; reads still work (QEMU stops all I/O on the image instead).
    assert lines[:2] == ["write failed: Input/output error"] * 2
    assert lines[2:] == ["read 65536/65536 bytes at offset 1048576", "64 KiB, 1 ops"]
    assert o.returncode == q.returncode == 1
    after = path.read_bytes()
    assert after[:72] == before[:72] and after[80:] == before[80:]
    assert qi.peek(path, 72, ">Q")[0] & 2  # the corrupt bit
    assert after[l1 : l1 + 8] == before[l1 : l1 + 8]
    # A corrupt image cannot be opened for writing, by either tool; reading needs no write.
    o2, q2 = ours(path, "write 2M 1"), theirs(copy, "write 2M 1")
    assert o2.returncode == q2.returncode == 1
    assert o2.stderr.replace("qcow2ovl: ", "qemu-io: ").replace("c.qcow2", "qemu.qcow2") == (
        q2.stderr
    )
    assert ours(path, "read -P 0x2b 1M 64k").returncode == 0


def test_read_commands_open_read_only(pair: tuple[Path, Path]) -> None:
    _, b = pair
    # With the corrupt bit set a writable open is refused, so reads that work opened read-only.
    (incompat,) = qi.peek(b, 72, ">Q")
    qi.poke(b, 72, ">Q", incompat | 2)
    before = b.read_bytes()
    o = ours(b, "read -P 0x11 0 192k", "flush")
    assert o.returncode == 0, o.stderr
    assert b.read_bytes() == before
    assert "cannot be opened read/write" in ours(b, "read 0 1", "discard 0 64k").stderr


def test_missing_image(tmp_path: Path) -> None:
    o = ours(tmp_path / "none.qcow2", "read 0 1")
    q = theirs(tmp_path / "none.qcow2", "read 0 1")
    assert o.returncode == q.returncode == 1
    assert o.stderr.replace("qcow2ovl: ", "qemu-io: ") == q.stderr
