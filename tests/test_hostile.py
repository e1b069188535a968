"""Hostile images must open within bounded memory, and an Image is safe to share between threads.

The images are built the way a probe would build them: a real image made by qemu-img, with
bytes poked into it. Each open runs in a child process under an address-space limit of 2 GB,
so an unbounded allocation fails the test instead of the machine; a generous subprocess timeout
only guards against hangs (tests never assert on time).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import qcow2ovl
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")

LIMIT = 2 << 30
OPEN = """
with qcow2ovl.open(sys.argv[1]) as img:
    n = sum(1 for _ in img.metadata_extents())
    print(json.dumps({"extents": n, "problems": img.problem_count,
                      "snapshots": len(img.snapshots)}))
"""


def run_limited(body: str, path: Path, *, memory: int = LIMIT, cpu: int | None = None) -> Any:
    """Runs the Python *body* in a child process under an address-space limit of *memory* bytes
    (and *cpu* seconds of CPU when given), with ``json``, ``sys`` and ``qcow2ovl`` imported and
    ``sys.argv[1]`` the image; returns the JSON value it printed."""
    limits = f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
    if cpu is not None:
        limits += f"resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))\n"
    script = f"import json, resource, sys\n{limits}import qcow2ovl\n{body}"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _snapshot_entry(l1_offset: int, l1_size: int, ident: str) -> bytes:
    name = ident.encode()
    extra = struct.pack(">QQ", 0, 1 << 40)
    head = struct.pack(
        ">QIHHIIQII", l1_offset, l1_size, len(name), len(name), 0, 0, 0, 0, len(extra)
    )
    entry = head + extra + name + name
    return entry + bytes(-len(entry) % 8)


def snapshot_table_bomb(
    path: Path, *, cluster_size: int, size: str, table_at: int, tables_at: int
) -> None:
    """A qemu-img image whose snapshot table (at *table_at*) lists 2048 snapshots with 32 MiB
    L1 tables one after another from *tables_at*, all in the holes of a 1 TiB sparse file."""
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, size)
    l1_entries = (32 << 20) // 8
    entries = b"".join(
        _snapshot_entry(tables_at + i * (32 << 20), l1_entries, f"s{i}") for i in range(2048)
    )
    with open(path, "r+b") as f:
        f.seek(table_at)
        f.write(entries)
        f.truncate(1 << 40)
        f.seek(60)
        f.write(struct.pack(">IQ", 2048, table_at))


def test_snapshot_tables_in_holes_of_a_sparse_file(tmp_path: Path) -> None:
    # 2048 snapshots whose 32 MiB L1 tables lie in a hole of a 1 TiB sparse file: QEMU opens
    # it at once; the scan must not read (or allocate) gigabytes of zeros.
    path = tmp_path / "sparse.qcow2"
    snapshot_table_bomb(path, cluster_size=65536, size="1T", table_at=16 * 65536, tables_at=1 << 39)
    got = run_limited(OPEN, path)
    assert got["snapshots"] == 2048


def test_millions_of_l2_tables(tmp_path: Path) -> None:
    # An active L1 table of 4 Mi entries, every other cluster an L2 table: 4 Mi metadata
    # extents that do not merge. Open, list and print them in bounded memory.
    path = tmp_path / "l2s.qcow2"
    cs = 512
    n = 1 << 22
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", path, "1G")
    l1_at = 1 << 20
    base = 64 << 20
    table = b"".join(struct.pack(">Q", base + 2 * i * cs) for i in range(n))
    with open(path, "r+b") as f:
        f.seek(36)
        f.write(struct.pack(">IQ", n, l1_at))
        f.seek(24)
        f.write(struct.pack(">Q", n * (cs // 8) * cs))
        f.seek(l1_at)
        f.write(table)
    # The L2 tables lie past the end of the file: the map holds what its default memory bound
    # (proportional to what the file holds) allows, and the rest of them stays unchecked
    # (checked by QEMU's algorithm), never dropped.
    coverage = (
        "img = qcow2ovl.open(sys.argv[1]); cs = img.info.cluster_size\n"
        "l2 = qcow2ovl.MetadataType.ACTIVE_L2\n"
        "mapped = sum(n // cs for o, n, t in img.metadata_extents() if t & l2)\n"
        "loose = sum(n for _, n in img.unchecked_ranges()) // cs\n"
        "print(json.dumps([mapped, loose, img.map_memory_usage()]))\n"
    )
    mapped, loose, memory = run_limited(coverage, path)
    assert mapped > 0 and mapped + loose >= n and memory < 64 << 20
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT})); "
            "from qcow2ovl.cli import main; sys.exit(main(sys.argv[1:]))",
            "map",
            "--output",
            "json",
            str(path),
        ],
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(b'"offset"') >= mapped


def test_threads_and_close(tmp_path: Path) -> None:
    path = tmp_path / "t.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qi.qemu_io(path, "write -P 0x5a 0 4M")
    img = qcow2ovl.open(path)
    errors: list[BaseException] = []
    start = threading.Barrier(17)

    def worker() -> None:
        start.wait()
        for i in range(2000):
            try:
                data = img.read((i * 4096) % (4 << 20), 4096)
                assert data == b"\x5a" * 4096
                img.check_overlap(i * 512, 512)
            except ValueError as e:
                # The only error allowed: the documented one after close().
                if "closed image" not in str(e):
                    errors.append(e)
                return
            except BaseException as e:  # noqa: BLE001 - collected and reported below
                errors.append(e)
                return

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    start.wait()
    closers = [threading.Thread(target=img.close) for _ in range(8)]
    for t in closers:
        t.start()
    for t in threads + closers:
        t.join()
    assert errors == []
    assert img.closed
    with pytest.raises(ValueError, match="closed image"):
        img.read(0, 1)
    img.close()


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError) as info:
        qcow2ovl.open(tmp_path)
    assert info.value.filename == str(tmp_path)
    assert "os error" not in str(info.value)
    with pytest.raises(OSError, match="not a regular file"):
        qcow2ovl.open("/dev/zero")
    with pytest.raises(FileNotFoundError):
        qcow2ovl.open(tmp_path / "missing.qcow2")
    with pytest.raises(ValueError, match="null byte"):
        qcow2ovl.open("a\0b")
    fifo = tmp_path / "fifo"
    import os

    os.mkfifo(fifo)
    with pytest.raises(OSError, match="FIFO"):
        qcow2ovl.open(fifo)  # must not hang waiting for a writer
    good = tmp_path / "g.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", good, "1M")
    with qcow2ovl.open(os.fsencode(good)) as img:
        assert img.virtual_size == 1 << 20
    v1 = tmp_path / "v1.qcow2"
    v1.write_bytes(b"QFI\xfb\x00\x00\x00\x01" + bytes(504))
    with pytest.raises(qcow2ovl.UnsupportedError, match="older qcow format"):
        qcow2ovl.open(v1)


def test_cli_guest_map_and_convert_match_qemu(tmp_path: Path) -> None:
    from qcow2ovl.cli import main

    base = tmp_path / "base.raw"
    base.write_bytes(b"\x33" * (3 << 20))
    top = tmp_path / "top.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, "8M")
    qi.qemu_io(top, "write -P 0x44 1M 64k", "write -c -P 0x55 4M 64k", "write -z 2M 64k")
    out = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "map", "--guest", "--output", "json", str(top)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == json.loads(qi.qemu_img("map", "--output=json", top).stdout)
    raw = tmp_path / "out.raw"
    assert main(["convert", str(top), str(raw)]) == 0
    qi.qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, top)


# 1 GiB of address space: what Glance allows `qemu-img info`.
TIGHT = 1 << 30
TIGHT_OPEN_AND_CHECK = """
with qcow2ovl.open(sys.argv[1]) as img:
    extents = list(img.metadata_extents())
    unchecked = img.unchecked_ranges()
    try:
        img.check()
        check = "done"
    except OSError as exc:
        check = exc.strerror
    print(json.dumps({"extents": len(extents), "unchecked": len(unchecked),
                      "snapshots": len(img.snapshots), "map": img.map_memory_usage(),
                      "check": check}))
"""


def test_huge_snapshot_l1_tables_in_holes_with_tiny_clusters(tmp_path: Path) -> None:
    """2048 snapshots, each with a 32 MiB L1 table (65,536 clusters of 512 bytes) in the holes
    of a 1 TiB sparse file of a few hundred KB: the tables claim 134 million clusters. The map
    holds what its default bound (proportional to what the file holds) allows and leaves the
    rest to QEMU's algorithm; nothing allocates by what the bytes claim; the check refuses the
    file as qemu-img does (more than INT_MAX clusters)."""
    path = tmp_path / "tiny.qcow2"
    snapshot_table_bomb(path, cluster_size=512, size="64M", table_at=64 << 10, tables_at=1 << 30)
    got = run_limited(TIGHT_OPEN_AND_CHECK, path, memory=TIGHT)
    assert got["snapshots"] == 2048 and got["unchecked"] >= 1
    assert got["map"] <= 17 << 20
    qemu = qi.qemu_img("check", path, ok=(1,))
    assert qemu.stderr.strip() == f"qemu-img: Check failed: {got['check']}"
    with qcow2ovl.open(path) as img:
        # A write into the tables is still refused: the unchecked part goes to QEMU's algorithm.
        assert img.check_overlap((1 << 30) + (40 << 20), 512).names() == ["INACTIVE_L1"]
    cli = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "check", str(path)], capture_output=True, text=True
    )
    assert (cli.returncode, cli.stderr) == (1, qemu.stderr.replace("qemu-img:", "qcow2ovl:"))
