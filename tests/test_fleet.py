"""`qcow2ovl fleet check` and `qcow2ovl.fleet` on the local process pool, with QEMU as the oracle.

Over a directory of clean, leaking, corrupt and unreadable images (`fleet_images.py`): every
result equals `qemu-img check --output=json` for that image; the exit status is qemu-img's for
the worst image; JSON lines and the human table; files that cannot be opened (missing, not
qcow2, held by a running qemu-io) are results; a worker killed in the middle of a check costs a
retry, not a result.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qcow2ovl
import qemu_images as qi
from fleet_images import (
    assert_same_as_qemu,
    build_fleet,
    descendants,
    fleet_images,
    kill_mid_check,
)
from qcow2ovl import fleet
from test_check import CORPUS, base, damaged, qemu_check_any

__all__ = ["base"]  # the fixture, shared with test_check.py

needs_qemu = pytest.mark.skipif(not qi.HAVE_QEMU, reason="qemu-img/qemu-io not installed")

#: qemu-img check's exit status by its precedence: 1 before 2 before 3 before 0.
QEMU_RANK = {1: 3, 2: 2, 3: 1, 0: 0}


@pytest.fixture(scope="module")
def fleet_dir(base: Path, module_tmp_path: Path) -> Path:
    return build_fleet(base, module_tmp_path)


def run_cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcow2ovl", *args],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


@needs_qemu
def test_every_result_equals_qemu_img_check(fleet_dir: Path) -> None:
    proc = run_cli("fleet", "check", "--jobs", "2", "--output", "json", str(fleet_dir))
    records = json_lines(proc.stdout)
    names = [r["filename"] for r in records]
    assert sorted(names) == sorted(fleet_images(fleet_dir))  # each once; the .txt skipped
    for record in records:
        assert_same_as_qemu(record)
    statuses = {r["exit-status"] for r in records}
    assert statuses == {0, 1, 2, 3}, statuses  # the fleet has every kind of result
    worst = max(statuses, key=QEMU_RANK.__getitem__)
    assert proc.returncode == worst == 1, proc.stderr
    assert proc.stderr == ""  # no progress bar off a terminal


@needs_qemu
def test_exit_status_is_the_worst_images(fleet_dir: Path) -> None:
    d = fleet_dir / "damaged"
    cases = [
        ([d / "leaked_cluster.qcow2"], 3),
        ([d / "leaked_cluster.qcow2", d / "refcount_zeroed.qcow2"], 2),
        ([fleet_dir / "clean", d / "leaked_cluster.qcow2"], 3),
        ([fleet_dir / "clean", d / "refcount_zeroed.qcow2", fleet_dir / "not-images"], 1),
        ([fleet_dir / "clean"], 0),
    ]
    for paths, status in cases:
        proc = run_cli("fleet", "check", "-j", "2", *map(str, paths))
        assert proc.returncode == status, (paths, proc.stdout, proc.stderr)
        worst = max(
            (qemu_check_any(Path(p))["_exit"] for p in fleet.expand_paths(list(map(str, paths)))),
            key=QEMU_RANK.__getitem__,
        )
        assert proc.returncode == worst


@needs_qemu
def test_human_table_is_sorted_worst_first(fleet_dir: Path) -> None:
    proc = run_cli("fleet", "check", "-j", "2", str(fleet_dir))
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["STATUS", "CORRUPT", "LEAKS", "ERRORS", "OVERLAPS", "IMAGE"]
    rows = lines[1 : lines.index("")]
    assert len(rows) == len(fleet_images(fleet_dir))
    rank = {"error": 4, "check-errors": 4, "corrupt": 3, "leaks": 2, "clean": 0}
    statuses = [row.split()[0] for row in rows]
    assert [rank[s] for s in statuses] == sorted((rank[s] for s in statuses), reverse=True)
    # Every row agrees with qemu-img about its image.
    status_of = {0: "clean", 2: "corrupt", 3: "leaks"}
    for row in rows:
        cells = row.split()
        path = cells[5].rstrip(":")
        theirs = qemu_check_any(Path(path))
        if theirs.get("_unopened"):
            assert cells[0] == "error" and cells[1:5] == ["-"] * 4, row
            continue
        assert cells[0] == status_of.get(theirs["_exit"], "check-errors"), row
        counts = [theirs.get(k, 0) for k in ("corruptions", "leaks", "check-errors")]
        assert list(map(int, cells[1:4])) == counts, row
    counts = {s: statuses.count(s) for s in set(statuses)}
    assert lines[-1] == (
        f"{len(rows)} images: {counts['clean']} clean, {counts['leaks']} with leaks, "
        f"{counts['corrupt']} corrupt, {counts['check-errors']} with check errors, "
        f"{counts['error']} not checked; exit status 1"
    )
    assert proc.returncode == 1


@needs_qemu
def test_unreadable_files_are_results(fleet_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.qcow2"
    empty.write_bytes(b"")
    raw = tmp_path / "raw.img"
    raw.write_bytes(os.urandom(4096))
    missing = tmp_path / "missing.qcow2"
    nothing = str(tmp_path / "none-*.qcow2")
    clean = fleet_dir / "clean" / "v3" / "v3.qcow2"
    paths = [str(p) for p in (empty, raw, missing, clean)] + [nothing, str(tmp_path / "sub")]
    (tmp_path / "sub").mkdir()  # a directory with no image: contributes nothing
    proc = run_cli("fleet", "check", "--output=json", *paths)
    records = {r["filename"]: r for r in json_lines(proc.stdout)}
    assert set(records) == {str(empty), str(raw), str(missing), str(clean), nothing}
    for name in (empty, raw, missing):
        assert_same_as_qemu(records[str(name)])
        assert records[str(name)]["exit-status"] == 1
    assert "No such file or directory" in records[str(missing)]["error"]
    assert "Image is not in qcow2 format" in records[str(raw)]["error"]
    assert records[nothing]["error"] == f"Could not open '{nothing}': No such file or directory"
    assert_same_as_qemu(records[str(clean)])
    assert proc.returncode == 1
    # Nothing at all to check: an error, not a silent success.
    none = run_cli("fleet", "check", str(tmp_path / "sub"))
    assert none.returncode == 1 and "no images found" in none.stderr


@needs_qemu
def test_an_image_a_writer_holds_is_a_lock_error_result(fleet_dir: Path, tmp_path: Path) -> None:
    held = tmp_path / "held.qcow2"
    shutil.copyfile(fleet_dir / "clean" / "v3" / "v3.qcow2", held)
    free = tmp_path / "free.qcow2"
    shutil.copyfile(held, free)
    assert qi.QEMU_IO is not None
    writer = subprocess.Popen(
        [qi.QEMU_IO, "-f", "qcow2", str(held)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        # qemu-io prompts once it has the image open (and locked).
        assert writer.stdout is not None
        shown = b""
        while b"qemu-io>" not in shown:
            chunk = os.read(writer.stdout.fileno(), 4096)
            assert chunk, "qemu-io exited before it prompted"
            shown += chunk
        assert qemu_check_any(held)["_exit"] == 1
        results = {r.filename: r for r in fleet.check([str(tmp_path)], jobs=2)}
        assert results[str(free)].exit_code == 0 and results[str(free)].error is None
        locked = results[str(held)]
        assert locked.exit_code == 1 and locked.status == "error"
        assert locked.error == (
            f"Could not open '{held}': Failed to get shared \"write\" lock\n"
            f"Is another process using the image [{held}]?"
        )
        q = subprocess.run(
            [str(qi.QEMU_IMG), "check", "-f", "qcow2", str(held)], capture_output=True, text=True
        )
        assert q.returncode == 1 and 'Failed to get shared "write" lock' in q.stderr
        # -U checks it anyway, as qemu-img check -U does.
        shared = run_cli("fleet", "check", "-U", "--output=json", str(held))
        (record,) = json_lines(shared.stdout)
        assert shared.returncode == 0 and record["exit-status"] == 0 and "error" not in record
    finally:
        writer.communicate(b"quit\n", timeout=60)


@needs_qemu
def test_repair_leaks_then_all(base: Path, tmp_path: Path) -> None:
    for name in ("leaked_cluster", "refcount_raised", "refcount_zeroed", "copied_flipped_l2"):
        damaged(base, tmp_path, name, CORPUS[name])
    leaks = run_cli("fleet", "check", "-r", "leaks", "--output=json", str(tmp_path))
    records = {Path(r["filename"]).stem: r for r in json_lines(leaks.stdout)}
    assert records["leaked_cluster"]["leaks-fixed"] == 1
    assert records["refcount_raised"]["leaks-fixed"] == 1
    # A refcount of zero needs the refcount structure rebuilt: only -r all does that.
    assert records["refcount_zeroed"]["exit-status"] == 1
    assert "need to rebuild refcount structures" in records["refcount_zeroed"]["error"]
    for name in ("leaked_cluster", "refcount_raised"):
        assert qemu_check_any(tmp_path / f"{name}.qcow2")["_exit"] == 0
    assert leaks.returncode == 1
    again = run_cli("fleet", "check", "-r", "all", str(tmp_path))
    assert again.returncode == 0, again.stdout
    assert "FIXED" in again.stdout.splitlines()[0]
    for name in ("refcount_zeroed", "copied_flipped_l2"):
        assert qemu_check_any(tmp_path / f"{name}.qcow2")["_exit"] == 0
    refused = run_cli("fleet", "check", "-r", "all", "-U", str(tmp_path))
    assert refused.returncode == 1 and "force-share=on" in refused.stderr


@needs_qemu
def test_a_killed_worker_costs_a_retry_not_a_result(fleet_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcow2ovl", "fleet", "check", "-j", "2", "--output=json"]
        + [str(fleet_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        _, image = kill_mid_check(
            lambda: descendants(proc.pid), fleet_dir, lambda: proc.poll() is None
        )
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    records = json_lines(stdout)
    names = [r["filename"] for r in records]
    assert sorted(names) == sorted(fleet_images(fleet_dir)), stderr
    (retried,) = (r for r in records if r["filename"] == image)
    assert "died" not in retried.get("error", ""), retried  # checked again, not given up
    for record in records:
        assert_same_as_qemu(record)
    assert proc.returncode == 1


def test_python_api(fleet_dir: Path) -> None:
    results = fleet.check(fleet_dir / "damaged", jobs=2)
    assert [r.filename for r in results] == [
        r.filename for r in fleet.sort_worst_first(reversed(results))
    ]
    assert {Path(r.filename).stem for r in results} == set(CORPUS)
    one = qcow2ovl.check(fleet_dir / "damaged" / "leaked_cluster.qcow2")
    (leak,) = (r for r in results if r.filename.endswith("/leaked_cluster.qcow2"))
    assert leak.status == "leaks" and leak.count("leaks") == one.leaks == 1
    assert {k: v for k, v in leak.record.items() if k not in ("exit-status", "host")} == {
        **one.as_qemu_dict(),
        "filename": leak.filename,
    }
    seen: list[tuple[int, int]] = []
    streamed = list(fleet.iter_check([str(fleet_dir / "clean")], jobs=1, progress=_add(seen)))
    assert [d for d, _ in seen] == list(range(1, len(streamed) + 1))
    assert {t for _, t in seen} == {len(streamed)}
    assert fleet.worst_exit_code(results) == 1 and fleet.worst_exit_code([]) == 0
    with pytest.raises(ValueError, match="repair"):
        fleet.check([], repair="some")
    with pytest.raises(ValueError, match="jobs"):
        fleet.check([], jobs=0)


def _add(seen: list[tuple[int, int]]) -> Any:
    return lambda done, total: seen.append((done, total))


def test_paths_and_hosts(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    img = tmp_path / "a" / "b" / "disk"  # no suffix, as Glance names its images
    img.write_bytes(b"QFI\xfb" + bytes(100))
    (tmp_path / "a" / "console.log").write_text("boot\n")
    os.symlink(tmp_path / "nowhere", tmp_path / "a" / "dangling")
    os.mkfifo(tmp_path / "a" / "fifo")  # never opened by a walk
    assert fleet.expand_paths([str(tmp_path)]) == [str(img)]
    pattern = str(tmp_path / "**" / "console.*")
    assert fleet.expand_paths([pattern, str(img), str(tmp_path / "a")]) == [
        str(tmp_path / "a" / "console.log"),
        str(img),
    ]
    assert fleet.split_host("node7:/var/lib/images") == ("node7", "/var/lib/images")
    assert fleet.split_host("10.0.0.5:/x/*.qcow2") == ("10.0.0.5", "/x/*.qcow2")
    assert fleet.split_host("[fe80::1]:/x") == ("fe80::1", "/x")
    assert fleet.split_host("images/a:b.qcow2") == (None, "images/a:b.qcow2")
    assert fleet.split_host("/abs/path") == (None, "/abs/path")


def test_progress_bar_on_a_terminal(fleet_dir: Path) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "qcow2ovl", "fleet", "check", str(fleet_dir / "clean")],
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=600,
        )
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    n = len(fleet_images(fleet_dir / "clean"))
    assert f"] {n}/{n} images, 0 with problems".encode() in shown
    assert shown.endswith(b"\r\x1b[K")  # the bar is cleared before the table
    assert proc.returncode == 0 and proc.stdout.startswith("STATUS")
