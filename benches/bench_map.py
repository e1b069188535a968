"""Metadata map vs QEMU's naive overlap checks: one JSON object per workload on stdout.

The timing loops run in Rust (``benches/map.rs``, a plain harness built by ``cargo bench``); this
script builds and runs it and re-prints its JSON lines, validated. Usage::

    python benches/bench_map.py            # all four workloads, ~1 s of timing per variant
    python benches/bench_map.py --quick    # shorter timing loops
    python benches/bench_map.py snap16-1TiB
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
REQUIRED = ("workload", "metadata_clusters", "ns_per_check", "map_bytes")


def main(argv: list[str]) -> int:
    cmd = ["cargo", "bench", "--quiet", "--bench", "map", "--", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    count = 0
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            print(f"benchmark record lacks {missing}: {line}", file=sys.stderr)
            return 1
        print(json.dumps(record), flush=True)
        count += 1
    if proc.returncode != 0 or count == 0:
        print(f"benchmark failed (exit {proc.returncode}, {count} records)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
