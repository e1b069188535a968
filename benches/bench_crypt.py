"""Encrypted (LUKS) images read and written side by side with ``qemu-img``, as a user runs them.

The preparation makes a raw disk of random data (``--size``, default 1 GiB: random, so that no
zero detection skips any of it) and, from it with ``qemu-img convert``, a LUKS-encrypted qcow2
image for each cipher (QEMU's default aes-256-xts-plain64, and aes-128-cbc-essiv; key
derivation ``iter-time=10`` so that unlocking costs nothing measurable). Modes:

``read-xts``    ``convert`` of the aes-256-xts image to raw: every cluster deciphered
``read-cbc``    the same for the aes-128-cbc-essiv image
``write-xts``   ``convert`` of the raw disk into a new aes-256-xts image: every cluster ciphered
``write-cbc``   the same with aes-128-cbc-essiv

Both tools get the secret as ``--object secret,id=sec0,data=...`` and the image as
``--image-opts`` (reads) or ``-o encrypt.*`` (writes), and run with their default options
(qemu-img convert's cache mode ``unsafe``: neither syncs); the output is deleted before each run,
and every run is preceded by a ``sync``. Runs alternate, ``--repeat`` times each (default 5).
Reported per mode: best and median wall seconds of each tool, the spread (max − min) / median,
and the ratios qemu-img / qcow2ovl (above 1.0: qcow2ovl is faster). Usage::

    python benches/bench_crypt.py [--size BYTES] [--repeat 5] [--work-dir DIR] [MODE ...]
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from bench_convert import GiB, MiB, bench_start, ours_command, print_table, side_by_side

SECRET = ["--object", "secret,id=sec0,data=bench-secret"]
CIPHERS = {
    "xts": "",
    "cbc": ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
}
MODES = [f"{way}-{c}" for way in ("read", "write") for c in CIPHERS]


def luks_options(cipher: str) -> str:
    return "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10" + CIPHERS[cipher]


def image_opts(path: pathlib.Path) -> str:
    return f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"


def prepare(work: pathlib.Path, size: int) -> None:
    raw = work / "random.raw"
    if not raw.exists():
        with open(raw, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
    for cipher in CIPHERS:
        img = work / f"{cipher}.qcow2"
        if not img.exists():
            subprocess.run(
                ["qemu-img", "convert", *SECRET, "-O", "qcow2", "-o", luks_options(cipher)]
                + [str(raw), str(img)],
                check=True,
            )


def commands(work: pathlib.Path, mode: str, tool: list[str]) -> tuple[list[str], pathlib.Path]:
    way, cipher = mode.split("-")
    if way == "read":
        out = work / "out.raw"
        src = ["--image-opts", image_opts(work / f"{cipher}.qcow2")]
        return [*tool, "convert", *SECRET, "-O", "raw", *src, str(out)], out
    out = work / "out.qcow2"
    opts = ["-O", "qcow2", "-o", luks_options(cipher)]
    return [*tool, "convert", *SECRET, *opts, str(work / "random.raw"), str(out)], out


def timed(cmd: list[str]) -> float:
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def bench_mode(work: pathlib.Path, mode: str, repeat: int) -> dict[str, object]:
    tools = {"qcow2ovl": ours_command(), "qemu-img": ["qemu-img"]}
    times: dict[str, list[float]] = {"qcow2ovl": [], "qemu-img": []}
    for i in range(repeat):
        order = ["qcow2ovl", "qemu-img"] if i % 2 == 0 else ["qemu-img", "qcow2ovl"]
        for name in order:
            cmd, out = commands(work, mode, tools[name])
            out.unlink(missing_ok=True)
            times[name].append(timed(cmd))
    return {"mode": mode, **side_by_side(times)}


def check_outputs(work: pathlib.Path) -> None:
    """What both tools wrote reads back as the source (outside the timing)."""
    for cipher in CIPHERS:
        for name, tool in (("qcow2ovl", ours_command()), ("qemu-img", ["qemu-img"])):
            cmd, out = commands(work, f"write-{cipher}", tool)
            out.unlink(missing_ok=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            subprocess.run(
                ["qemu-img", "compare", *SECRET, "--image-opts", image_opts(out)]
                + [f"driver=raw,file.filename={work / 'random.raw'}"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            print(f"checked: {name}'s {cipher} image reads back as the source", flush=True)


def main() -> int:
    start = bench_start(__doc__, MODES, ("qemu-img",), "bench-crypt-")
    if start is None:
        return 1
    args, work = start
    started = time.perf_counter()
    prepare(work, args.size)
    print(f"prepared in {time.perf_counter() - started:.1f} s", flush=True)
    check_outputs(work)
    rows = []
    for mode in args.modes or MODES:
        row = bench_mode(work, mode, args.repeat)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"\ndisk {args.size / GiB:.2f} GiB random, {args.repeat} runs each, cores {os.cpu_count()}"
    )
    print_table(rows, {"mode": 12})
    return 0


if __name__ == "__main__":
    sys.exit(main())
