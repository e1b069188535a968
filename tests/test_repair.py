"""Repair (`check -r leaks|all`) against `qemu-img check -r`, with QEMU as the oracle.

Every image of the damaged corpus of `test_check.py` is copied twice; ours repairs one copy,
qemu-img the other. Then:

- `qemu-img check` of our copy says exactly what our final report says is left (so what we
  report as not repaired is what QEMU still sees);
- where the repair is the same, the fixed counters and what remains equal qemu-img's;
- the guest reads the same as before the repair (`qemu-img compare` against a raw copy made
  before).

By-design differences (`docs/design/check.md`, "Repair"), each tested here:

- a cluster that two structures use (a named overlap) is left as it is: qemu-img raises its
  refcount and calls it repaired; we leave it and it stays a corruption;
- an unaligned refcount table entry or one with reserved bits: qemu-img's rebuild fails
  ("Check failed"); ours rebuilds the refcount structure and the image checks clean.

Also: dirty lazy-refcount images are repaired at a writable open, a killed writer's image is
repaired, and repair of randomly corrupted images never panics or hangs (in a subprocess under
a memory limit).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qcow2ovl
import qemu_images as qi
from test_check import CORPUS, CS, MiB, base, damaged, qemu_check_any, refblock0, run_cli

__all__ = ["base"]  # the fixture, shared with test_check.py

needs_qemu = pytest.mark.skipif(not qi.HAVE_QEMU, reason="qemu-img/qemu-io not installed")

#: Corpus images where a cluster is used by two structures: left alone on purpose.
LEFT_SHARED = {"l2_entry_on_l1", "compressed_on_header", "two_l1_entries_one_l2"}
LEFT_SHARED |= {"snapshot_l1_into_data"}
#: Corpus images whose refcount structure qemu-img cannot rebuild (its repair fails).
QEMU_CANNOT_REBUILD = {"unaligned_refblock", "reftable_reserved_bits"}
#: Corpus images that need the refcount structure rebuilt (a leaks-only repair refuses).
NEEDS_REBUILD = QEMU_CANNOT_REBUILD | {
    "refcount_zeroed",
    "reftable_entry_cleared",
    "l2_entry_on_refblock",
    "l1_entry_on_refblock",
    "refblock_on_l2_table",
}


def qemu_repair(path: Path, mode: str) -> dict[str, Any]:
    assert qi.QEMU_IMG is not None
    proc = subprocess.run(
        [qi.QEMU_IMG, "check", "-r", mode, "--output=json", "-f", "qcow2", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    try:
        report = dict(json.loads(proc.stdout))
    except json.JSONDecodeError:  # "Check failed"
        report = {}
    report["_exit"] = proc.returncode
    return report


def counters(r: qcow2ovl.CheckResult) -> tuple[int, int, int, int]:
    return (r.corruptions, r.leaks, r.check_errors, r.exit_code)


def qemu_counters(q: dict[str, Any]) -> tuple[int, int, int, int]:
    return (q.get("corruptions", 0), q.get("leaks", 0), q.get("check-errors", 0), q["_exit"])


def raw_copy(path: Path) -> Path | None:
    """The guest disk as a raw file, or None when QEMU cannot read all of it."""
    raw = path.with_suffix(".raw")
    assert qi.QEMU_IMG is not None
    proc = subprocess.run(
        [qi.QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)],
        capture_output=True,
        timeout=120,
    )
    return raw if proc.returncode == 0 else None


def same_guest(path: Path, raw: Path) -> bool:
    assert qi.QEMU_IMG is not None
    proc = subprocess.run(
        [qi.QEMU_IMG, "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw)],
        capture_output=True,
        timeout=120,
    )
    return proc.returncode == 0


def twins(base: Path, tmp: Path, name: str) -> tuple[Path, Path, Path | None]:
    ours = damaged(base, tmp, name, CORPUS[name])
    theirs = tmp / f"{name}-qemu.qcow2"
    shutil.copyfile(ours, theirs)
    return ours, theirs, raw_copy(ours)


@needs_qemu
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_repair_all_matches_qemu(base: Path, tmp_path: Path, name: str) -> None:
    ours, theirs, raw = twins(base, tmp_path, name)
    before = qcow2ovl.check(ours)
    r = qcow2ovl.check(ours, repair="all")
    q = qemu_repair(theirs, "all")
    # What we say is left is what QEMU sees.
    assert counters(r) == qemu_counters(qemu_check_any(ours)), (name, r.repair_log)
    if name in LEFT_SHARED:
        assert r.overlaps and r.corruptions > 0
        assert any(line.startswith("Not repairing the cluster at") for line in r.repair_log)
        # The shared clusters keep their refcounts, and their wrong refcounts stay reported.
        shared = {o.cluster_offset // CS for o in r.overlaps}
        assert shared == {o.cluster_offset // CS for o in before.overlaps}
        assert not {f"Repairing cluster {k} " for k in shared} & {
            " ".join(line.split()[:3]) + " " for line in r.repair_log
        }
        wrong = {f.offset // CS for f in before.findings if f.kind == "refcount-too-low"}
        still = {f.offset // CS for f in r.findings if f.kind == "refcount-too-low"}
        assert shared & wrong <= still
        # qemu-img raised their refcounts instead, and calls its copy repaired.
        assert q.get("corruptions", 0) < r.corruptions
    elif name in QEMU_CANNOT_REBUILD:
        assert q["_exit"] == 1 and "corruptions-fixed" not in q
        assert counters(r) == (0, 0, 0, 0) and r.corruptions_fixed > 0
        assert "Rebuilding refcount structure" in r.repair_log
    else:
        assert (r.corruptions_fixed, r.leaks_fixed) == (
            q.get("corruptions-fixed", 0),
            q.get("leaks-fixed", 0),
        ), (name, r.repair_log, q)
        assert counters(r) == qemu_counters(qemu_check_any(theirs))
    if raw is not None:
        assert same_guest(ours, raw), f"{name}: the repair changed what the guest reads"


@needs_qemu
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_repair_leaks_matches_qemu(base: Path, tmp_path: Path, name: str) -> None:
    ours, theirs, raw = twins(base, tmp_path, name)
    q = qemu_repair(theirs, "leaks")
    if name in NEEDS_REBUILD:
        # Neither tool patches a refcount structure that must be rebuilt; nothing is written.
        unchanged = ours.read_bytes()
        with pytest.raises(OSError, match="need to rebuild refcount structures") as e:
            qcow2ovl.check(ours, repair="leaks")
        assert str(ours) in str(e.value)
        assert ours.read_bytes() == unchanged
        assert q["_exit"] == 1 and "leaks-fixed" not in q
        return
    before = qcow2ovl.check(ours)
    r = qcow2ovl.check(ours, repair="leaks")
    assert r.leaks == 0
    # Corruptions are left alone: every refcount that was too low still is.
    too_low = {(f.offset, f.kind) for f in before.findings if f.kind == "refcount-too-low"}
    assert too_low <= {(f.offset, f.kind) for f in r.findings}
    assert not any(line.startswith("Rebuilding") for line in r.repair_log)
    assert (r.corruptions_fixed, r.leaks_fixed) == (
        q.get("corruptions-fixed", 0),
        q.get("leaks-fixed", 0),
    ), (name, r.repair_log, q)
    assert (
        counters(r) == qemu_counters(qemu_check_any(ours)) == qemu_counters(qemu_check_any(theirs))
    )
    if raw is not None:
        assert same_guest(ours, raw)


@needs_qemu
@pytest.mark.parametrize("kind", sorted(qi.KINDS))
def test_repair_of_qemu_made_kinds(tmp_path: Path, kind: str) -> None:
    """Clean images of every kind QEMU makes: a repair writes nothing. The dirty one is
    repaired as qemu-img repairs it; encrypted ones need no secret for it."""
    built = qi.get_image(kind)
    p = tmp_path / f"{kind}.qcow2"
    shutil.copyfile(built.path, p)
    # A repair opens the image writable, and so its backing file too (as qemu-img does).
    for extra in built.extra_files:
        shutil.copyfile(extra, tmp_path / Path(extra).name)
    before = p.read_bytes()
    if kind == "dirty_lazy":
        assert qcow2ovl.check(p).exit_code == 2
        twin = tmp_path / "twin.qcow2"
        shutil.copyfile(p, twin)
        r = qcow2ovl.check(p, repair="all")
        q = qemu_repair(twin, "all")
        assert counters(r) == (0, 0, 0, 0)
        assert (r.corruptions_fixed, r.leaks_fixed) == (
            q.get("corruptions-fixed", 0),
            q.get("leaks-fixed", 0),
        )
        return
    # Encrypted images too: a repair changes metadata only, which needs no secret.
    r = qcow2ovl.check(p, repair="all")
    assert counters(r) == (0, 0, 0, 0)
    assert (r.corruptions_fixed, r.leaks_fixed) == (0, 0)
    assert p.read_bytes() == before


@needs_qemu
def test_cli_repair_output_and_exit_codes(base: Path, tmp_path: Path) -> None:
    leak = damaged(base, tmp_path, "cli_leak", CORPUS["leaked_cluster"])
    proc = run_cli("check", "-r", "leaks", str(leak))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(
        "The following inconsistencies were found and repaired:\n\n"
        "    1 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\n"
        "No errors were found on the image.\n"
    ), proc.stdout
    assert "Repairing cluster" in proc.stderr
    # Nothing left to repair: just the check.
    again = run_cli("check", "-r", "all", str(leak))
    assert again.returncode == 0 and "repaired" not in again.stdout

    zeroed = damaged(base, tmp_path, "cli_zeroed", CORPUS["refcount_zeroed"])
    failed = run_cli("check", "-r", "leaks", str(zeroed))
    assert failed.returncode == 1 and "need to rebuild" in failed.stderr
    js = run_cli("check", "-r", "all", "--output=json", str(zeroed))
    assert js.returncode == 0, js.stderr
    d = json.loads(js.stdout)
    twin = damaged(base, tmp_path, "cli_zeroed_qemu", CORPUS["refcount_zeroed"])
    q = qemu_repair(twin, "all")
    # The new refcount structure goes elsewhere: the image end differs, nothing else.
    skip = ("overlaps", "filename", "image-end-offset", "_exit")
    assert {k: v for k, v in d.items() if k not in skip} == {
        k: v for k, v in q.items() if k not in skip
    }
    assert d["corruptions-fixed"] == 1 and "Rebuilding refcount structure" in js.stderr

    shared = damaged(base, tmp_path, "cli_shared", CORPUS["l2_entry_on_l1"])
    left = run_cli("check", "-r", "all", str(shared))
    assert left.returncode == 2 == qemu_check_any(shared)["_exit"]
    assert "Not repairing the cluster at" in left.stderr and "OVERLAP" in left.stderr
    assert "1 errors were found on the image." in left.stdout


@needs_qemu
def test_repair_clears_the_corrupt_bit(base: Path, tmp_path: Path) -> None:
    p = damaged(base, tmp_path, "corrupt_bit", CORPUS["refcount_raised"])
    qi.poke(p, 72, ">Q", 2)  # incompatible features: corrupt
    with pytest.raises(qcow2ovl.CorruptImageError):
        qcow2ovl.open(p, writable=True)
    r = qcow2ovl.check(p, repair="all")
    assert counters(r) == (0, 0, 0, 0) and r.leaks_fixed == 1
    assert not qi.qemu_info(p)["format-specific"]["data"]["corrupt"]
    with qcow2ovl.open(p, writable=True) as img:
        assert not img.info.corrupt


def _dirty_image(tmp: Path) -> tuple[Path, Path]:
    """A lazy-refcounts image written by qemu-io killed before a clean close, and the raw
    guest disk it holds."""
    ref = qi.create(tmp / "dirty.qcow2", 64 * MiB, opts={"lazy_refcounts": True})
    assert qi.QEMU_IO is not None
    proc = subprocess.run(
        [
            qi.QEMU_IO,
            *("-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 8M 512k", "-c", "abort"),
            str(ref.path),
        ],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode != 0  # aborted
    raw = raw_copy(ref.path)
    assert raw is not None
    return ref.path, raw


@needs_qemu
def test_killed_lazy_writer_repair_matches_qemu(tmp_path: Path) -> None:
    p, raw = _dirty_image(tmp_path)
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(p, twin)
    assert qemu_check_any(p)["_exit"] == 2
    r = qcow2ovl.check(p, repair="all")
    q = qemu_repair(twin, "all")
    assert counters(r) == (0, 0, 0, 0) == qemu_counters(qemu_check_any(p))
    assert (r.corruptions_fixed, r.leaks_fixed) == (
        q.get("corruptions-fixed", 0),
        q.get("leaks-fixed", 0),
    )
    assert not qi.qemu_info(p)["dirty-flag"]
    assert same_guest(p, raw)


@needs_qemu
def test_writable_open_repairs_a_dirty_image(tmp_path: Path) -> None:
    """As QEMU does at open: a dirty lazy-refcounts image gets its refcounts repaired and the
    dirty bit cleared, then opens for writing."""
    p, raw = _dirty_image(tmp_path)
    assert qi.qemu_info(p)["dirty-flag"]
    with qcow2ovl.open(p, writable=True) as img:
        assert not img.info.dirty
        assert img.read(8 * MiB, 4) == b"\xa5" * 4
    assert qi.check_is_clean(qi.qemu_check(p))
    assert not qi.qemu_info(p)["dirty-flag"]
    assert same_guest(p, raw)


@needs_qemu
def test_writable_open_repairs_poked_dirty_image(tmp_path: Path) -> None:
    """The iotest way: set the dirty bit and zero refcounts by hand."""
    ref = qi.create(tmp_path / "poked.qcow2", 64 * MiB, opts={"lazy_refcounts": True})
    qi.write(ref, [(0, 1 * MiB, 0x33)])
    p = ref.path
    raw = raw_copy(p)
    assert raw is not None
    rb = refblock0(p)
    for cluster in range(5, 10):  # data clusters of the write
        qi.poke(p, rb + 2 * cluster, ">H", 0)
    (incompat,) = struct.unpack(">Q", p.read_bytes()[72:80])
    qi.poke(p, 72, ">Q", incompat | 1)
    assert qemu_check_any(p)["_exit"] == 2
    # A read-only open leaves it alone.
    with qcow2ovl.open(p) as img:
        assert img.info.dirty
    with qcow2ovl.open(p, writable=True) as img:
        img.write(2 * MiB, b"\x44" * 4096)
    assert qi.check_is_clean(qi.qemu_check(p))
    with qcow2ovl.open(p) as img:
        assert not img.info.dirty
        assert img.read(0, 16) == b"\x33" * 16
        assert img.read(2 * MiB, 16) == b"\x44" * 16


@needs_qemu
def test_writable_open_of_dirty_image_with_overlaps_is_refused(base: Path, tmp_path: Path) -> None:
    p = damaged(base, tmp_path, "dirty_shared", CORPUS["l2_entry_on_l1"])
    (incompat,) = struct.unpack(">Q", p.read_bytes()[72:80])
    qi.poke(p, 72, ">Q", incompat | 1)
    # The repair at open cannot fix a cluster two structures use: the open fails, naming the
    # way out, and the image stays dirty.
    with pytest.raises(OSError, match="Could not repair dirty image.*check -r all") as e:
        qcow2ovl.open(p, writable=True)
    assert str(p) in str(e.value)
    assert qi.qemu_info(p)["dirty-flag"]


# ---- random corruptions: same answers as QEMU, and no panic or hang --------------------------

_WORKER = r"""
import json, shutil, sys
import qcow2ovl
from qcow2ovl.testing import random_corruption, random_image
out, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for seed in range(first, last):
    path = f"{out}/case-{seed}.qcow2"
    random_corruption(random_image(seed, max_bytes=1 << 20), seed).write_to(path)
    shutil.copyfile(path, f"{out}/case-{seed}-qemu.qcow2")
    shutil.copyfile(path, f"{out}/case-{seed}-leaks.qcow2")
    try:
        qcow2ovl.check(f"{out}/case-{seed}-leaks.qcow2", repair="leaks")
    except (qcow2ovl.Qcow2Error, ValueError, OSError):
        pass
    try:
        b = qcow2ovl.check(path)
        r = qcow2ovl.check(path, repair="all")
        line = {"seed": seed, "before": [b.corruptions, b.leaks],
                "kinds": sorted({f.kind for f in b.findings}),
                "counters": [r.corruptions, r.leaks, r.check_errors, r.exit_code],
                "fixed": [r.corruptions_fixed, r.leaks_fixed], "overlaps": r.overlap_count,
                "rebuilt": "Rebuilding refcount structure" in r.repair_log,
                "left": sorted({f.kind for f in r.findings})}
    except (qcow2ovl.Qcow2Error, ValueError, OSError) as exc:
        line = {"seed": seed, "error": type(exc).__name__}
    print(json.dumps(line), flush=True)
"""


#: Findings qemu-img's repair handles its own way (docs/design/check.md, "Repair"): it also
#: fixes the snapshot table, and grows the file over a refcount block past its end.
OTHER_REPAIR_KINDS = {
    "snapshot-entry-incomplete",
    "snapshot-l1-unaligned",
    "snapshot-l1-too-large",
    "refblock-outside-image",
}


def _limit_memory() -> None:
    limit = 4 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@needs_qemu
def test_random_corruptions_repair_like_qemu(tmp_path: Path) -> None:
    """Random valid images with random corruptions, repaired by a worker process under a
    memory limit (a panic or a hang fails the test): QEMU's check of our repaired copy agrees
    with our final report, and where neither tool met a shared cluster or a structure only we
    can rebuild, the fixed counters agree with `qemu-img check -r all`."""
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(tmp_path), "2000", "2060"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_memory,
        env={**os.environ, "RUST_BACKTRACE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "panicked" not in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 60
    compared = agreed = 0
    for line in lines:
        if "error" in line:
            continue
        seed = line["seed"]
        ours = tmp_path / f"case-{seed}.qcow2"
        after = qemu_check_any(ours)
        if after.get("_unopened"):
            continue  # QEMU cannot open it at all
        assert tuple(line["counters"]) == qemu_counters(after), (seed, line, after)
        compared += 1
        q = qemu_repair(tmp_path / f"case-{seed}-qemu.qcow2", "all")
        fixed = [q.get("corruptions-fixed", 0), q.get("leaks-fixed", 0)]
        corruptions, leaks = line["before"]
        # The same repair: no shared cluster, qemu-img's repair did not fail, and it fixed only
        # what the plain check saw (its read-write open also repairs the snapshot table and
        # drops bitmaps, which shows as new leaks or corruptions; out of scope here).
        same = (
            line["overlaps"] == 0
            and not OTHER_REPAIR_KINDS & set(line["kinds"])
            # Entries of snapshot L2 tables are not zeroed (only active tables are rewritten).
            and "preallocated-unaligned" not in line["left"]
            # A rebuild grows the file over references past its end, which then count as
            # corruptions; qemu-img leaves those out of its fixed counter's arithmetic.
            and not (line["rebuilt"] and "past-end-of-file" in line["kinds"])
            and q["_exit"] != 1
            and fixed[1] <= leaks
            and (corruptions > 0 or fixed[0] == 0)
        )
        if same:
            assert line["fixed"] == fixed, (seed, line, q)
            agreed += 1
    assert compared >= 20, lines
    assert agreed >= 10, lines


@needs_qemu
def test_copied_flag_on_a_snapshot_shared_cluster_is_cleared(tmp_path: Path) -> None:
    # The dangerous direction of a COPIED error: an entry of an L2 table a snapshot shares
    # claims its (shared) data cluster is the image's alone, so a writer trusting it would
    # overwrite the snapshot's data in place. `-r all` clears it, as qemu-img's does.
    ours = tmp_path / "shared.qcow2"
    qi.create(ours, 8 * MiB)
    qi.write(ours, [(0, 64 * 1024, 0x41)])
    qi.snapshot_create(ours, "s")
    (l1_offset,) = qi.peek(ours, 40, ">Q")
    (l1_entry,) = qi.peek(ours, l1_offset, ">Q")
    l2 = l1_entry & 0x00FFFFFFFFFFFE00
    (entry,) = qi.peek(ours, l2, ">Q")
    assert entry & (1 << 63) == 0
    qi.poke(ours, l2, ">Q", entry | (1 << 63))
    theirs = tmp_path / "shared-qemu.qcow2"
    shutil.copyfile(ours, theirs)
    before = qi.qemu_check(ours)
    assert before["corruptions"] == 1
    result = qcow2ovl.check(ours, repair="all")
    q = qemu_repair(theirs, "all")
    assert counters(result) == qemu_counters(q) == (0, 0, 0, 0)
    assert result.corruptions_fixed == q["corruptions-fixed"] == 1
    assert qi.check_is_clean(qi.qemu_check(ours))
    assert qi.peek(ours, l2, ">Q")[0] == entry
    out = qi.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, theirs).stdout
    assert "identical" in out
