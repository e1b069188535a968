"""`qcow2ovl.inspect` and `qcow2ovl inspect`: verdicts on untrusted files.

Clean qemu-img images are safe and their facts equal `qemu-img info --output=json`; each kind
of trick an upload can play is named, without opening the file it points to (a data file that
is a FIFO would block an open forever); a hostile file is judged under 2 s of CPU and 1 GiB of
address space (resource limits, not a clock).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hostile_images as hi
import pytest
import qcow2ovl
import qemu_images as qi
from hostile_images import run_limited, snapshot_table_bomb

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")


def qemu_info(path: Path) -> dict[str, object]:
    return dict(json.loads(qi.qemu_img("info", "--output=json", path).stdout))


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"cluster_size": 512},
        {"compat": "0.10"},
        {"extended_l2": True},
        {"lazy_refcounts": True},
    ],
)
def test_clean_images_are_safe_and_their_facts_are_qemu_img_infos(
    tmp_path: Path, opts: dict[str, object]
) -> None:
    path = tmp_path / "clean.qcow2"
    qi.create(path, 64 << 20, opts=opts)
    qi.write(path, [(0, 70000, 0x11)])
    qi.snapshot_create(path, "s")
    if opts.get("compat") != "0.10":
        qi.bitmap_add(path, "b")
    verdict = qcow2ovl.inspect(path)
    assert verdict.safe and verdict.reasons == () and verdict.exit_code == 0, verdict
    assert dict(verdict.facts) == qemu_info(path)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_backing_file_is_a_reason(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qi.create(base, 1 << 20)
    path = tmp_path / "top.qcow2"
    qi.create(path, 1 << 20, backing=base)
    verdict = qcow2ovl.inspect(path)
    assert verdict.reasons == (f"backing file: {base}",)
    assert verdict.facts["backing-filename"] == str(base)
    assert dict(verdict.facts) == qemu_info(path)
    json_backing = 'json:{"driver": "raw", "file": {"driver": "file", "filename": "/etc/passwd"}}'
    sneaky = tmp_path / "sneaky.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", json_backing, "-F", "raw", sneaky, "1M")
    assert qcow2ovl.inspect(sneaky).reasons == (f"backing file: {json_backing}",)


def test_a_data_file_is_named_and_never_opened(tmp_path: Path) -> None:
    """CVE-2024-32498's trick: an external data file pointing at a host file. Here it is a FIFO,
    which an open would block on."""
    fifo = tmp_path / "fifo1"
    os.mkfifo(fifo)
    path = tmp_path / "data.qcow2"
    qi.create(path, 1 << 20, opts={"data_file": tmp_path / "d.raw"})
    # Point the data file extension at the FIFO: same length of name, poked in place.
    raw = path.read_bytes()
    old = str(tmp_path / "d.raw").encode()
    new = str(fifo).encode()
    assert len(old) == len(new) and raw.count(old) == 1
    path.write_bytes(raw.replace(old, new))
    proc = _run_cli("--output", "json", str(path))
    assert proc.returncode == 1, proc.stderr
    got = json.loads(proc.stdout)
    assert got["safe"] is False and f"external data file: {fifo}" in got["reasons"]


def test_files_that_are_not_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "disk.qcow2"
    raw.write_bytes(b"\x00" * 4096)
    verdict = qcow2ovl.inspect(raw)
    assert verdict.reasons == ("not a qcow2 image (its first bytes say raw)",)
    assert verdict.exit_code == 1
    assert dict(verdict.facts) == {**qemu_info(raw), "format": "raw"}
    for magic, fmt in ((b"KDMV", "vmdk"), (b"conectix", "vpc"), (b"vhdxfile", "vhdx")):
        other = tmp_path / f"{fmt}.qcow2"
        other.write_bytes(magic + bytes(4096 - len(magic)))
        reasons = qcow2ovl.inspect(other).reasons
        assert reasons == (f"not a qcow2 image (its first bytes say {fmt})",)


def test_bits_problems_and_refusals_are_reasons(tmp_path: Path) -> None:
    path = tmp_path / "bits.qcow2"
    qi.create(path, 1 << 20)
    qi.write(path, [(0, 4096, 1)])
    (incompatible,) = qi.peek(path, 72, ">Q")
    qi.poke(path, 72, ">Q", incompatible | 2)  # the corrupt bit
    assert "the corrupt bit is set" in qcow2ovl.inspect(path).reasons
    qi.poke(path, 72, ">Q", incompatible | 1 << 40)  # an unknown incompatible feature
    verdict = qcow2ovl.inspect(path)
    assert not verdict.safe and verdict.readable and len(verdict.reasons) == 1
    assert "Unsupported qcow2 feature(s)" in verdict.reasons[0]
    qi.poke(path, 72, ">Q", incompatible)
    # The L2 pointer of L1 entry 0 aimed at the L1 table itself: metadata on metadata.
    (l1,) = qi.peek(path, 40, ">Q")
    qi.poke(path, l1, ">Q", l1 | 1 << 63)
    reasons = qcow2ovl.inspect(path).reasons
    assert any(r.startswith("metadata-overlap: ") for r in reasons), reasons
    assert any(r.startswith("check: ") for r in reasons), reasons
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(path.read_bytes()[:50])
    verdict = qcow2ovl.inspect(cut)
    assert verdict.exit_code == 1 and len(verdict.reasons) == 1


def test_limits(tmp_path: Path) -> None:
    path = tmp_path / "big.qcow2"
    qi.create(path, 10 << 30)
    qi.snapshot_create(path, "a")
    qi.snapshot_create(path, "b")
    verdict = qcow2ovl.inspect(path, max_virtual_size=1 << 30, max_snapshots=1)
    assert verdict.reasons == (
        f"virtual size {10 << 30} exceeds the limit {1 << 30}",
        "snapshots 2 exceeds the limit 1",
    )
    proc = _run_cli("--max-virtual-size", "20G", "--max-snapshots", "2", str(path))
    assert (proc.returncode, proc.stdout.splitlines()[0]) == (0, f"{path}: safe")


JUDGE = "print(json.dumps(qcow2ovl.inspect(sys.argv[1]).as_json()))\n"


def test_a_hostile_file_within_two_cpu_seconds_and_one_gib(tmp_path: Path) -> None:
    """2,048 snapshots with 32 MiB L1 tables in the holes of a 1 TiB sparse file with 512-byte
    clusters: judged (unsafe) under Glance's limits for `qemu-img info`."""
    path = tmp_path / "bomb.qcow2"
    snapshot_table_bomb(path, cluster_size=512, size="64M", table_at=64 << 10, tables_at=1 << 30)
    got = run_limited(JUDGE, path, memory=1 << 30, cpu=2)
    assert got["safe"] is False
    assert any(r.startswith("not checked: the file spans") for r in got["reasons"])


def test_a_file_too_long_to_check_is_not_called_safe(tmp_path: Path) -> None:
    """A check counts every cluster of the file: past `max_check_clusters` it is not run."""
    path = tmp_path / "long.qcow2"
    qi.create(path, 1 << 20, opts={"cluster_size": 512})
    clusters = -(-path.stat().st_size // 512)
    assert qcow2ovl.inspect(path, max_check_clusters=clusters).safe
    verdict = qcow2ovl.inspect(path, max_check_clusters=clusters - 1)
    assert verdict.reasons == (
        f"not checked: the file spans {clusters} clusters, more than "
        f"max_check_clusters={clusters - 1}",
    )
    proc = _run_cli("--max-check-clusters", str(clusters - 1), str(path))
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[1].strip() == verdict.reasons[0]


def _classes() -> dict[str, tuple[Callable[[Path], Path], str]]:
    """Each hostile class of `hostile_images` at full size (the bitmap bomb at 2 GiB), and a
    reason its verdict must give."""

    def file(make: Callable[..., None], **kwargs: Any) -> Callable[[Path], Path]:
        def build(folder: Path) -> Path:
            path = folder / "hostile.qcow2"
            make(path, **kwargs)
            return path

        return build

    def tables_in_holes(**kwargs: Any) -> Callable[[Path], Path]:
        """Snapshot L1 tables of 32 MiB in the holes of a sparse file of 512-byte clusters."""
        return file(snapshot_table_bomb, cluster_size=512, size="64M", table_at=64 << 10, **kwargs)

    return {
        "bitmap-directory-bomb": (
            file(hi.bitmap_directory_bomb, count=1000, end=2 << 30),
            "corruptions",
        ),
        "extension-bomb": (file(hi.extension_bomb), ""),
        # 2,048 tables of 32 MiB in the holes of a 66 GiB file of 512-byte clusters: under
        # QEMU's INT_MAX-cluster refusal, so only inspect's own bound keeps the check away.
        "sparse-length": (
            tables_in_holes(tables_at=1 << 30, end=66 << 30),
            "not checked: the file spans",
        ),
        # The worst file the check still runs on: 2^24 clusters, all snapshot L1 tables.
        "at-the-check-limit": (
            tables_in_holes(tables_at=64 << 20, count=254, end=8 << 30),
            "corruptions",
        ),
        "shared-snapshots": (file(hi.shared_snapshots), "metadata-overlap: "),
        "shared-l2-tables": (file(hi.shared_l2_tables), "metadata overlaps"),
        "l2-table-flood": (file(hi.l2_table_flood), "beyond-end: "),
        "deep-chain": (lambda d: hi.deep_chain(d, 50), "backing file: layer48.qcow2"),
        "backing-loop": (hi.backing_loop, "backing file: b.qcow2"),
        "wide-over-small-backing": (hi.wide_over_small_backing, "backing file: base.qcow2"),
    }


@pytest.mark.parametrize("name", sorted(_classes()))
def test_every_hostile_class_within_two_cpu_seconds_and_one_gib(name: str, tmp_path: Path) -> None:
    """Each class of hostile image gets its verdict under Glance's limits for `qemu-img info`.
    The extension bomb is a valid image (QEMU ignores unknown extensions) and is safe."""
    build, reason = _classes()[name]
    got = run_limited(JUDGE, build(tmp_path), memory=1 << 30, cpu=2)
    if not reason:
        assert (got["safe"], got["reasons"]) == (True, [])
    else:
        assert got["safe"] is False
        assert any(reason in r for r in got["reasons"]), got["reasons"]


INSPECT_EXAMPLES = int(os.environ.get("QCOW2OVL_INSPECT_EXAMPLES", "150"))


def test_corrupted_images_always_get_a_verdict(tmp_path: Path) -> None:
    """The hypothesis corruption strategies feed inspect: no crash, no abort, no exception, a
    verdict every time, and a corruption that QEMU's check or open notices is never safe."""
    from hypothesis import HealthCheck, given, settings
    from qcow2ovl.testing import CorruptedImage, corrupted_images

    path = tmp_path / "case.qcow2"
    unsafe = 0

    @settings(
        max_examples=INSPECT_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(corrupted_images())
    def run(case: CorruptedImage) -> None:
        nonlocal unsafe
        case.write_to(path)
        verdict = qcow2ovl.inspect(path)
        assert verdict.safe == (verdict.reasons == ())
        assert verdict.exit_code in (0, 1)
        unsafe += not verdict.safe
        if verdict.safe:
            # What we call safe, QEMU opens and checks clean (leaks aside).
            check = qi.qemu_img("check", "--output=json", path, ok=(0, 1, 2, 3))
            assert check.returncode in (0, 3), (case.description, check.stderr)

    run()
    assert unsafe > 0
