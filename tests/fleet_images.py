"""A fleet of images for the `fleet check` tests, QEMU's answers for them, and the tools that
kill a worker in the middle of a run.

The fleet: clean images of several kinds made by qemu-img/qemu-io, the damaged corpus of
`test_check.py` (leaks and corruptions made by poking bytes, as QEMU's iotests do), an image a
killed lazy-refcounts writer left dirty, two files that start with the qcow2 magic but are not
images, and a text file that a directory walk must skip.

A worker is killed while it is known to be in the middle of a check: the test watches the
workers' open files (/proc/PID/fd), stops a worker that has an image of the fleet open, and
kills it if it still has the image open once stopped.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import qemu_images as qi
from test_check import CORPUS, damaged, qemu_check_any

CLEAN_KINDS = ("v3", "compressed_zstd", "snapshots_cluster_512", "bitmaps", "extended_l2")
#: Keys a fleet record has beyond qemu-img check's JSON object.
OWN_KEYS = {"exit-status", "host", "overlaps", "error"}


def build_fleet(base: Path, root: Path) -> Path:
    """The fleet directory (see the module docstring); returns it."""
    fleet = root / "fleet"
    (fleet / "damaged").mkdir(parents=True)
    for kind in CLEAN_KINDS:
        qi.build_image(kind, fleet / "clean")
    qi.build_image("dirty_lazy", fleet / "dirty")
    for name, poke in CORPUS.items():
        damaged(base, fleet / "damaged", name, poke)
    bad = fleet / "not-images"
    bad.mkdir()
    (bad / "garbage.qcow2").write_bytes(b"QFI\xfb" + bytes(range(256)) * 4)
    (bad / "header-only.qcow2").write_bytes(base.read_bytes()[:512])
    (bad / "notes.txt").write_text("not an image\n")
    return fleet


def fleet_images(fleet: Path) -> set[str]:
    """Every file of the fleet directory that a walk must find (all but the text file)."""
    return {
        os.path.join(root, name)
        for root, _, files in os.walk(fleet)
        for name in files
        if not name.endswith(".txt")
    }


def assert_same_as_qemu(record: dict[str, Any]) -> None:
    """The fleet's record of one image says what `qemu-img check --output=json` says."""
    path = record["filename"]
    theirs = qemu_check_any(Path(path))
    assert record["exit-status"] == theirs["_exit"], (record, theirs)
    if theirs.get("_unopened"):
        assert "error" in record, record
        return
    assert "error" not in record, (record, theirs)
    want = {k: v for k, v in theirs.items() if not k.startswith("_")}
    got = {k: v for k, v in record.items() if k not in OWN_KEYS}
    assert got == want, path


# ---- a worker killed in the middle of a check ---------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live descendant process of *pid* (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def open_image(pid: int, under: Path) -> str | None:
    """The file under *under* that process *pid* has open, if any (a check in progress)."""
    prefix = str(under) + os.sep
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            return target
    return None


def gone(pid: int) -> bool:
    """Whether *pid* has exited (a zombie has released its files too)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_until(predicate: Any, what: str, limit: float = 300.0) -> Any:
    """Poll *predicate* until it returns something true; a guard against a hang, not a timing
    assertion (the limit is far above any run's duration)."""
    stop = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > stop:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.001)


def kill_mid_check(candidates: Any, under: Path, running: Any) -> tuple[int, str]:
    """SIGKILL a process among `candidates()` (re-read while waiting) while it has an image
    under *under* open, that is in the middle of checking it: the process is stopped first, and
    killed only if it still holds the image once stopped (else let go and watched again).
    Returns its pid and the image it was checking. `running()` says whether the run still
    goes on: a run that ended before a worker was caught fails the test."""

    def catch() -> tuple[int, str] | None:
        if not running():
            raise AssertionError("the run ended before a worker was caught in a check")
        for pid in candidates():
            if open_image(pid, under) is None:
                continue
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            held = open_image(pid, under)
            if held is not None:
                os.kill(pid, signal.SIGKILL)
                return pid, held
            os.kill(pid, signal.SIGCONT)
        return None

    pid, image = wait_until(catch, "a worker in the middle of a check")
    wait_until(lambda: gone(pid), f"process {pid} to die")
    return int(pid), str(image)
