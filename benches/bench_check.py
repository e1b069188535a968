"""``qcow2ovl check`` against ``qemu-img check`` on big images, whole process, same run.

Preparation: a 1 TiB ``preallocation=metadata`` image (every L2 table and every data cluster
allocated: 16 million L2 entries) with 8 and with 64 internal snapshots. qemu-img takes minutes
to build them (each snapshot raises every refcount), so they are cached in ``--cache-dir``
(default ``$XDG_CACHE_HOME/qcow2ovl-bench``, else ``~/.cache/qcow2ovl-bench``) under names made
of their parameters and QEMU's version, shared with ``bench_open.py``; the 64-snapshot image is
made from a copy of the 8-snapshot one. ``--rebuild`` builds them again.

Each run times the whole process (start, open, check, print, exit) of
``qcow2ovl check --output json IMAGE`` and ``qemu-img check --output=json IMAGE``, alternating,
and reads each child's peak RSS from ``wait4``. Both must report the same counters. Prints one
JSON object. Usage::

    python benches/bench_check.py [--size 1T] [--snapshots 8 64] [--runs 5] [--cache-dir DIR]
                                  [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "qcow2ovl-bench"


def image_name(cache_dir: pathlib.Path, size: str, snapshots: int) -> pathlib.Path:
    version = subprocess.run(
        ["qemu-img", "--version"], check=True, capture_output=True, text=True
    ).stdout.split("\n")[0]
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{size}-snap{snapshots}-{version}").strip("-")
    return cache_dir / f"prealloc-metadata-{tag}.qcow2"


def prepare(cache_dir: pathlib.Path, size: str, snapshots: int, rebuild: bool) -> tuple[str, bool]:
    """The image with *snapshots* snapshots, reused when cached. Starts from the cached image
    with the most snapshots below *snapshots* when there is one. Built under a temporary name
    and renamed when complete."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    img = image_name(cache_dir, size, snapshots)
    if img.exists() and not rebuild:
        return str(img), True
    tmp = cache_dir / f".{img.name}.{os.getpid()}.partial"
    try:
        start = 0
        for fewer in range(snapshots - 1, 0, -1):
            base = image_name(cache_dir, size, fewer)
            if base.exists() and not rebuild:
                # A sparse copy: the file is 1 TiB long but holds a few hundred MiB.
                run("cp", "--sparse=always", str(base), str(tmp))
                start = fewer
                break
        else:
            run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
                str(tmp), size)  # fmt: skip
        for i in range(start, snapshots):
            run("qemu-img", "snapshot", "-c", f"snap{i}", str(tmp))
        tmp.replace(img)
    finally:
        tmp.unlink(missing_ok=True)
    return str(img), False


def timed(cmd: list[str]) -> tuple[float, int, str, int]:
    """(seconds, peak RSS in KiB, stdout, exit status) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, usage.ru_maxrss, out, proc.returncode


def counters(report: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in report.items() if k not in ("filename", "overlaps")}


def bench(img: str, runs: int) -> dict[str, object]:
    ours_cmd = [sys.executable, "-m", "qcow2ovl", "check", "--output", "json", img]
    qemu_cmd = ["qemu-img", "check", "--output=json", "-f", "qcow2", img]
    # Warm the page cache (both tools read the same tables) and compare the answers.
    _, _, out_ours, rc_ours = timed(ours_cmd)
    _, _, out_qemu, rc_qemu = timed(qemu_cmd)
    same = counters(json.loads(out_ours)) == counters(json.loads(out_qemu)) and rc_ours == rc_qemu
    t_ours: list[float] = []
    t_qemu: list[float] = []
    rss_ours = rss_qemu = 0
    for _ in range(runs):
        t, rss, _, _ = timed(ours_cmd)
        t_ours.append(t)
        rss_ours = max(rss_ours, rss)
        t, rss, _, _ = timed(qemu_cmd)
        t_qemu.append(t)
        rss_qemu = max(rss_qemu, rss)
    mo, mq = statistics.median(t_ours), statistics.median(t_qemu)
    return {
        "image_bytes": os.path.getsize(img),
        "same_counters_as_qemu": same,
        "qemu_report": counters(json.loads(out_qemu)),
        "qcow2ovl_s": {"median": round(mo, 3), "min": round(min(t_ours), 3)},
        "qemu_img_s": {"median": round(mq, 3), "min": round(min(t_qemu), 3)},
        "speedup_median": round(mq / mo, 1),
        "peak_rss_MiB": {
            "qcow2ovl": round(rss_ours / 1024, 1),
            "qemu_img": round(rss_qemu / 1024, 1),
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="1T")
    ap.add_argument("--snapshots", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cache-dir", type=pathlib.Path, default=default_cache_dir())
    ap.add_argument("--rebuild", action="store_true", help="build the images even if cached")
    ap.add_argument("--prepare-only", action="store_true", help="build the images and stop")
    args = ap.parse_args()
    result: dict[str, object] = {"size": args.size, "runs": args.runs}
    for n in sorted(args.snapshots):
        t0 = time.perf_counter()
        img, reused = prepare(args.cache_dir, args.size, n, args.rebuild)
        prep = {"seconds": round(time.perf_counter() - t0, 1), "reused": reused}
        if args.prepare_only:
            result[f"snapshots_{n}"] = {"preparation": prep}
            continue
        result[f"snapshots_{n}"] = {"preparation": prep, **bench(img, args.runs)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
