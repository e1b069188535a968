"""Hostile images must open within bounded memory, and an Image is safe to share between threads.

The images are built the way a probe would build them: a real image made by qemu-img, with
bytes poked into it. Each open runs in a child process under an address-space limit of 2 GB,
so an unbounded allocation fails the test instead of the machine; a generous subprocess timeout
only guards against hangs (tests never assert on time).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import hostile_images as hi
import pytest
import qcow2ovl
import qemu_images as qi
from hostile_images import LIMIT, run_limited, snapshot_table_bomb

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")

OPEN = """
with qcow2ovl.open(sys.argv[1]) as img:
    n = sum(1 for _ in img.metadata_extents())
    print(json.dumps({"extents": n, "problems": img.problem_count,
                      "snapshots": len(img.snapshots)}))
"""


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
    n = 1 << 22
    hi.l2_table_flood(path, count=n)
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


# Open, list the map, check and inspect: what each class must survive under a limit. The
# counters are compared with qemu-img check's on the same file.
SURVEY = """
with qcow2ovl.open(sys.argv[1]) as img:
    extents = sum(1 for _ in img.metadata_extents())
    r = img.check()
verdict = qcow2ovl.inspect(sys.argv[1])
print(json.dumps({"extents": extents, "corruptions": r.corruptions, "leaks": r.leaks,
                  "check-errors": r.check_errors, "safe": verdict.safe}))
"""
# Generous CPU: a resource limit that stops a runaway, not a timing assertion.
CPU = 60


def qemu_counters(path: Path) -> dict[str, int]:
    report = json.loads(qi.qemu_img("check", "--output=json", path, ok=(0, 1, 2, 3)).stdout)
    return {k: report.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}


def survey(path: Path, memory: int = 1 << 30) -> dict[str, Any]:
    got = run_limited(SURVEY, path, memory=memory, cpu=CPU)
    assert {k: got[k] for k in ("corruptions", "leaks", "check-errors")} == qemu_counters(path)
    return dict(got)


def test_bitmap_tables_in_holes_are_not_read(tmp_path: Path) -> None:
    """1,000 consistent bitmaps whose 256 KiB tables lie in the holes of a 2 GiB sparse file:
    the tables' zeros are valid entries and are not read (qemu-img info reads them all, and
    under a 4 GiB limit it aborts on the bigger versions)."""
    path = tmp_path / "bitmaps.qcow2"
    hi.bitmap_directory_bomb(path, count=1000, end=2 << 30)
    got = survey(path)
    assert got["safe"] is False  # no refcounts cover the tables: corruptions, as qemu-img counts
    with qcow2ovl.open(path) as img:
        assert len(img.bitmaps) == 1000


def test_a_header_cluster_packed_with_extensions(tmp_path: Path) -> None:
    path = tmp_path / "ext.qcow2"
    hi.extension_bomb(path)
    got = survey(path, memory=512 << 20)
    assert got["corruptions"] == 0
    info = json.loads(qi.qemu_img("info", "--output=json", path).stdout)
    assert qcow2ovl.inspect(path).facts["virtual-size"] == info["virtual-size"]


@pytest.mark.parametrize("count", [1000, 65536])
def test_every_snapshot_naming_one_l1_table(count: int, tmp_path: Path) -> None:
    """Snapshots (65,536 is QEMU's maximum) sharing the active L1 table: a table at one place
    is read and walked once, and the check counts each reference as qemu-img check does
    (compared at 1,000: qemu-img check walks the table once per snapshot and needs minutes
    for 65,536)."""
    path = tmp_path / "shared.qcow2"
    hi.shared_snapshots(path, count=count)
    got = survey(path) if count <= 1000 else run_limited(SURVEY, path, memory=1 << 30, cpu=CPU)
    assert got["corruptions"] > 0 and got["safe"] is False
    with qcow2ovl.open(path) as img:
        snapshots = img.snapshots
        assert len(snapshots) == count and snapshots[-1].name == f"s{count - 1}"
        assert {s.l1_table_offset for s in snapshots} == {img.info.l1_table_offset}


def test_a_million_l2_tables_past_the_end_are_counted_as_qemu_counts(tmp_path: Path) -> None:
    """An L1 table naming a million L2 tables past the end of the file: no table is read (all
    zeros) and none costs an owner record, and the counters equal qemu-img check's."""
    path = tmp_path / "flood.qcow2"
    hi.l2_table_flood(path, count=1 << 20)
    got = survey(path)
    assert got["corruptions"] >= 1 << 20


def test_one_l2_table_named_by_every_l1_entry(tmp_path: Path) -> None:
    """Every guest cluster of a 64 GiB disk mapped through one L2 table to one data cluster:
    a million map entries that do not merge. The CLI streams them byte for byte as qemu-img
    map prints them, in bounded memory; the check counts what qemu-img check counts."""
    path = tmp_path / "sharedl2.qcow2"
    hi.shared_l2_tables(path, size="64G")
    survey(path)
    limited = (
        "import resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_AS, ({256 << 20}, {256 << 20})); "
        "from qcow2ovl.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    ours = subprocess.run(
        [sys.executable, "-c", limited, "map", "--guest", "--output", "json", str(path)],
        capture_output=True,
        timeout=600,
    )
    assert ours.returncode == 0, ours.stderr[-2000:]
    theirs = subprocess.run(
        [str(qi.QEMU_IMG), "map", "--output=json", str(path)], capture_output=True, check=True
    )
    assert ours.stdout == theirs.stdout
    assert ours.stdout.count(b"\n") == 1 << 20


def test_guest_map_in_chunks_is_the_whole_map(tmp_path: Path) -> None:
    path = tmp_path / "frag.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "1M")
    qi.qemu_io(path, *(f"write -P {i + 1} {i * 12288} 4k" for i in range(80)), "write -z 0 8k")
    with qcow2ovl.open(path) as img:
        whole = img.guest_map()
        assert len(whole) > 100
        for chunk in (1, 2, 3, 64, 1 << 16):
            assert list(img.iter_guest_map(chunk)) == whole


def test_a_deep_backing_chain(tmp_path: Path) -> None:
    """200 images deep, each layer adding one cluster: reads and the map follow the whole
    chain in bounded memory, equal to qemu-img's."""
    top = hi.deep_chain(tmp_path, 200)
    body = (
        "img = qcow2ovl.open(sys.argv[1])\n"
        "m = [e.as_qemu_dict() for e in img.iter_guest_map()]\n"
        "print(json.dumps({'map': m, 'data': img.read(0, 200 * 65536).hex()}))\n"
    )
    got = run_limited(body, top, memory=1 << 30, cpu=CPU)
    assert got["map"] == json.loads(qi.qemu_img("map", "--output=json", top).stdout)
    raw = tmp_path / "top.raw"
    qi.qemu_img("convert", "-O", "raw", top, raw)
    assert bytes.fromhex(got["data"]) == raw.read_bytes()[: 200 * 65536]


def test_a_backing_loop_is_refused_in_qemus_words(tmp_path: Path) -> None:
    """Two images naming each other: QEMU's map and check never finish on them; ours refuse
    the chain at once, and info --backing-chain says what qemu-img says."""
    a = hi.backing_loop(tmp_path)
    with pytest.raises(qcow2ovl.Qcow2Error, match="loop"), qcow2ovl.open(a) as img:
        img.read(0, 1)
    ours = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "info", "--backing-chain", str(a)],
        capture_output=True,
        text=True,
    )
    theirs = qi.qemu_img("info", "--backing-chain", a, ok=(1,))
    assert ours.returncode == 1
    assert ours.stderr.splitlines()[-1] == theirs.stderr.strip().replace("qemu-img", "qcow2ovl")


def test_a_wide_disk_over_a_small_backing_file(tmp_path: Path) -> None:
    """A 64 TiB overlay with three clusters of its own over a 1 MiB backing file: the map costs
    what is allocated, and equals qemu-img's."""
    top = hi.wide_over_small_backing(tmp_path)
    body = "print(json.dumps([e.as_qemu_dict() for e in qcow2ovl.open(sys.argv[1]).guest_map()]))\n"
    got = run_limited(body, top, memory=512 << 20, cpu=CPU)
    assert got == json.loads(qi.qemu_img("map", "--output=json", top).stdout)
