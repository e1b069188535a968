"""``qcow2ovl serve`` side by side with ``qemu-nbd``: the same image, the same clients, the
same run.

The preparation makes a 1 GiB (``--size``) qcow2 image of bench_convert's mixed content with
qemu-img, and a raw file of the same content. Modes (each server started fresh on a Unix
socket, ``-e 4 -t``; qemu-nbd with ``-f qcow2`` and its default cache mode, writeback, as ours):

``copy-out``    ``nbdcopy URI null:``: the whole export read, 4 connections
``copy-in``     ``nbdcopy -C 4 data.raw URI``: the raw file written into the export (a fresh
                copy of the empty image each run), then the server stopped (flushed)
``bench-read``  ``qemu-img bench -f raw -c 200000 -d 8 -s 4k URI``: 4 KiB random-offset reads
``bench-write`` the same with ``-w``: 4 KiB writes

Runs alternate between the servers, ``--repeat`` times each (default 5); reported per mode:
best and median wall seconds of the client, the spread, and the ratios qemu-nbd / qcow2ovl
(above 1.0: qcow2ovl is faster). Usage::

    python benches/bench_nbd.py [--size BYTES] [--repeat 5] [--work-dir DIR] [MODE ...]
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from bench_convert import (
    bench_parser,
    make_mixed,
    ours_command,
    print_table,
    side_by_side,
)

MODES = ("copy-out", "copy-in", "bench-read", "bench-write")


def prepare(work: pathlib.Path, size: int) -> None:
    raw = work / "data.raw"
    if not raw.exists() or raw.stat().st_size != size:
        make_mixed(raw, size)
    if not (work / "full.qcow2").exists():
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, work / "full.qcow2"],
            check=True,
        )
    if not (work / "empty.qcow2").exists():
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", work / "empty.qcow2", str(size)],
            check=True,
        )


def start(tool: str, image: pathlib.Path, sock: pathlib.Path) -> subprocess.Popen[bytes]:
    sock.unlink(missing_ok=True)
    prefix = [*ours_command(), "serve"] if tool == "qcow2ovl" else ["qemu-nbd", "-f", "qcow2"]
    server = subprocess.Popen([*prefix, "-t", "-e", "4", "-k", str(sock), str(image)])
    for _ in range(500):
        if sock.exists():
            return server
        time.sleep(0.01)
    server.kill()
    raise RuntimeError(f"{tool} did not start")


def stop(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)


def one_run(work: pathlib.Path, mode: str, tool: str) -> float:
    sock = work / "nbd.sock"
    uri = f"nbd+unix:///?socket={sock}"
    if mode == "copy-in" or mode == "bench-write":
        image = work / "run.qcow2"
        shutil.copyfile(work / ("empty.qcow2" if mode == "copy-in" else "full.qcow2"), image)
    else:
        image = work / "full.qcow2"
    subprocess.run(["sync"], check=True)
    server = start(tool, image, sock)
    try:
        cmd = {
            "copy-out": ["nbdcopy", uri, "null:"],
            "copy-in": ["nbdcopy", "-C", "4", str(work / "data.raw"), uri],
            "bench-read": ["qemu-img", "bench", "-f", "raw", "-c", "200000", "-d", "8", "-s", "4k"],
            "bench-write": ["qemu-img", "bench", "-w", "-f", "raw", "-c", "200000", "-d", "8"],
        }[mode]
        if mode.startswith("bench"):
            cmd = [*cmd, uri]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        if mode == "copy-in":
            stop(server)  # its flush is part of writing the data
        return time.perf_counter() - started
    finally:
        if server.poll() is None:
            stop(server)


def main() -> int:
    parser = bench_parser(__doc__, list(MODES))
    args = parser.parse_args()
    for tool in ("qemu-nbd", "nbdcopy", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"{tool} is needed (nbdcopy: Debian's libnbd-bin)", file=sys.stderr)
            return 1
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    work = args.work_dir or pathlib.Path(tempfile.mkdtemp(prefix="bench-nbd-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepare(work, args.size)
    print(f"prepared in {time.perf_counter() - started:.1f} s", flush=True)
    rows = []
    for mode in args.modes or list(MODES):
        times: dict[str, list[float]] = {"qcow2ovl": [], "qemu-img": []}
        for i in range(args.repeat):
            order = ["qcow2ovl", "qemu-nbd"] if i % 2 == 0 else ["qemu-nbd", "qcow2ovl"]
            for tool in order:
                # (side_by_side names the other tool qemu-img; here it is qemu-nbd.)
                times["qcow2ovl" if tool == "qcow2ovl" else "qemu-img"].append(
                    one_run(work, mode, tool)
                )
        row = {"mode": mode, **side_by_side(times)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    gib = args.size / (1 << 30)
    print(f"\nimage {gib:.2f} GiB, {args.repeat} runs each, cores {os.cpu_count()}")
    print("(the qemu columns are qemu-nbd)")
    print_table(rows, {"mode": 14})
    return 0


if __name__ == "__main__":
    sys.exit(main())
