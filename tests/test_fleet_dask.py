"""`qcow2ovl fleet check` on a real Dask cluster: a scheduler and two workers started here as
separate processes (`dask scheduler`, `dask worker`, from the `distributed` package that the
`fleet` extra installs; CI installs it, and these tests fail without it rather than skip).

One worker is killed in the middle of a check: every result still arrives, equal to
`qemu-img check --output=json`'s for its image.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import distributed
import pytest
import qemu_images as qi
from fleet_images import assert_same_as_qemu, build_fleet, fleet_images, kill_mid_check
from qcow2ovl import fleet
from test_check import base

__all__ = ["base"]  # the fixture, shared with test_check.py

needs_qemu = pytest.mark.skipif(not qi.HAVE_QEMU, reason="qemu-img/qemu-io not installed")


def dask_command() -> str:
    beside = Path(sys.executable).parent / "dask"
    found = str(beside) if beside.exists() else shutil.which("dask")
    assert found, "the dask command (pip install 'qcow2ovl[fleet]') is not installed"
    return found


@dataclass
class Cluster:
    address: str
    workers: list[subprocess.Popen[bytes]]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    dask = dask_command()
    scheduler_file = tmp_path / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
            + ["--scheduler-file", str(scheduler_file)],
            stdin=subprocess.DEVNULL,
            **quiet,
        )
    ]
    try:
        workers = [
            subprocess.Popen(
                [dask, "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1"]
                + ["--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", f"w{i}"]
                + ["--local-directory", str(tmp_path / f"w{i}"), "--death-timeout", "120"],
                stdin=subprocess.DEVNULL,
                **quiet,
            )
            for i in range(2)
        ]
        procs += workers
        with distributed.Client(
            scheduler_file=str(scheduler_file), timeout="120s", set_as_default=False
        ) as client:
            client.wait_for_workers(2, timeout=120)
        address = json.loads(scheduler_file.read_text())["address"]
        yield Cluster(address, workers)
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def fleet_dir(base: Path, module_tmp_path: Path) -> Path:
    return build_fleet(base, module_tmp_path)


@needs_qemu
def test_a_killed_worker_costs_a_retry_not_a_result(cluster: Cluster, fleet_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcow2ovl", "fleet", "check", "--output=json"]
        + ["--scheduler", cluster.address, str(fleet_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        killed, image = kill_mid_check(
            lambda: [w.pid for w in cluster.workers], fleet_dir, lambda: proc.poll() is None
        )
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert killed in [w.pid for w in cluster.workers]
    records = [json.loads(line) for line in stdout.splitlines()]
    names = [r["filename"] for r in records]
    assert sorted(names) == sorted(fleet_images(fleet_dir)), stderr
    (retried,) = (r for r in records if r["filename"] == image)
    assert "error" not in retried or "KilledWorker" not in retried["error"], retried
    for record in records:
        assert_same_as_qemu(record)
    assert proc.returncode == 1


@needs_qemu
def test_python_api_with_a_client_and_host_paths(cluster: Cluster, fleet_dir: Path) -> None:
    damaged = fleet_dir / "damaged"
    with distributed.Client(cluster.address, set_as_default=False) as client:
        # Expanded and checked by a worker on that host: both workers are on 127.0.0.1.
        results = fleet.check([f"127.0.0.1:{damaged}", "elsewhere:/images"], client=client)
        # The client is the caller's: still open.
        assert client.status == "running"
    by_name = {r.filename: r for r in results}
    assert set(by_name) == fleet_images(damaged) | {"/images"}
    assert by_name["/images"].error == "no Dask worker on host 'elsewhere' to check it on"
    for r in results:
        if r.filename != "/images":
            assert_same_as_qemu(r.as_json())
    assert [r.filename for r in results] == [r.filename for r in fleet.sort_worst_first(results)]
    assert fleet.worst_exit_code(results) == 1


@needs_qemu
def test_cli_human_output_on_the_cluster(cluster: Cluster, fleet_dir: Path) -> None:
    clean = fleet_dir / "clean"
    leak = fleet_dir / "damaged" / "leaked_cluster.qcow2"
    proc = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "fleet", "check", "--scheduler", cluster.address]
        + [str(clean), str(leak)],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["leaks", "0", "1", "0", "0", str(leak)]
    assert all(line.startswith("clean ") for line in lines[2 : lines.index("")])
    n = len(fleet_images(clean)) + 1
    assert lines[-1] == f"{n} images: {n - 1} clean, 1 with leaks; exit status 3"
    assert proc.returncode == 3, proc.stderr
