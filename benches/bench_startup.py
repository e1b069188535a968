"""CLI startup: `qcow2ovl info IMAGE` as a whole process, next to `python -c pass` and
`qemu-img info IMAGE`, plus the time of `import qcow2ovl` inside a fresh interpreter.

Usage: python benches/bench_startup.py [--runs N]

Preparation: qemu-img builds one 1 GiB image with a snapshot and a dirty bitmap in a temporary
directory (well under a second). Each command then runs N times (default 20), interleaved so that
machine noise hits all of them alike; the medians are printed with their ratio to `python -c pass`.
`qcow2ovl` is run through its installed console script (the one next to this interpreter, not a
shim such as pyenv's), which is what a user's shell runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

IMPORT_PROBE = (
    "import time; t = time.perf_counter(); import qcow2ovl; print(time.perf_counter() - t)"
)


def wall(argv: list[str]) -> float:
    """Seconds from spawn to exit of one process, output discarded."""
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    qemu_img = shutil.which("qemu-img")
    script = os.path.join(sysconfig.get_path("scripts"), "qcow2ovl")
    if not qemu_img or not os.access(script, os.X_OK):
        print(f"needs qemu-img and the installed script {script}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="qcow2ovl-startup-") as tmp:
        image = os.path.join(tmp, "disk.qcow2")
        t0 = time.perf_counter()
        for cmd in (
            ["create", "-q", "-f", "qcow2", image, "1G"],
            ["snapshot", "-c", "s1", image],
            ["bitmap", "--add", image, "b0"],
        ):
            subprocess.run([qemu_img, *cmd], check=True)
        print(f"prepared {image} in {time.perf_counter() - t0:.2f} s")
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "qcow2ovl info IMAGE": [script, "info", image],
            "qcow2ovl info --output json IMAGE": [script, "info", "--output", "json", image],
            "qemu-img info IMAGE": [qemu_img, "info", image],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        imports: list[float] = []
        for _ in range(args.runs):
            for name, argv in commands.items():
                times[name].append(wall(argv))
            out = subprocess.run(
                [sys.executable, "-c", IMPORT_PROBE], check=True, capture_output=True, text=True
            ).stdout
            imports.append(float(out))
    base = statistics.median(times["python -c pass"])
    print(f"{sys.executable} ({sys.version.split()[0]}), median of {args.runs} runs each:")
    print(f"{'command':<36}{'median':>10}{'x python -c pass':>18}")
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"{name:<36}{med * 1e3:>8.1f} ms{med / base:>18.2f}")
    print(f"{'import qcow2ovl (in process)':<36}{statistics.median(imports) * 1e3:>8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
