"""Writing into a damaged image is never worse than QEMU doing the same.

A mutation fuzzer with QEMU as the comparison: random bytes of the metadata clusters of
QEMU-made images are changed; then a writable open and a dozen random writes, zeroes,
discards, snapshots and resizes, once through qcow2ovl and once, on a copy, through qemu-io
and qemu-img. `qemu-img check` then judges both results against the mutant itself:

- qcow2ovl never crashes or raises anything but its documented errors (a refusal);
- where the image qcow2ovl leaves has more corruptions than the mutant had, QEMU's has at
  least as many (or QEMU's replay left an image qemu-img cannot open);
- an image that qemu-img could open before, it can open after qcow2ovl wrote.

``QCOW2OVL_DAMAGED_EXAMPLES`` sets the number of mutants (CI runs a few dozen; the closing
notes quote runs of thousands). Each failure names its seed: ``QCOW2OVL_DAMAGED_SEED=N``
replays one mutant.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")

EXAMPLES = int(os.environ.get("QCOW2OVL_DAMAGED_EXAMPLES", "60"))
ONE_SEED = os.environ.get("QCOW2OVL_DAMAGED_SEED")
# Mutants that once found a difference, run on every pass: 824 (a corrupt bit read through a
# bogus L1 entry), 1468 (an L1 entry with reserved bits set, carried into a snapshot's copy).
REGRESSIONS = [824, 1468]
REFUSALS = (qcow2ovl.Qcow2Error, OSError, ValueError)
MUTABLE = ~qcow2ovl.MetadataType.MAIN_HEADER

# The templates: images with tables of every kind, shared clusters (snapshots), compressed
# clusters and zero clusters, so that a changed byte lands in something a write follows.
TEMPLATES = {
    "64k": (["-o", "cluster_size=65536"], "64M"),
    "512": (["-o", "cluster_size=512"], "4M"),
    "extended-l2": (["-o", "extended_l2=on,cluster_size=65536"], "64M"),
    "4k-refcount-bits-8": (["-o", "cluster_size=4096,refcount_bits=8"], "8M"),
}


def _fill(path: Path, size: int) -> None:
    q = size // 16
    qi.qemu_io(path, f"write -P 0x11 0 {q}", f"write -c -P 0x22 {4 * q} 65536")
    qi.qemu_img("snapshot", "-c", "before", path)
    qi.qemu_io(path, f"write -P 0x33 {q // 2} {q}", f"write -z {6 * q} {q}")
    qi.qemu_img("snapshot", "-c", "after", path)
    qi.qemu_io(path, f"write -P 0x44 {8 * q} {2 * q}", f"discard {q // 4} {q // 4}")


@pytest.fixture(scope="module")
def templates(module_tmp_path: Path) -> dict[str, Path]:
    folder = module_tmp_path
    made = {}
    for name, (opts, size) in TEMPLATES.items():
        path = folder / f"{name}.qcow2"
        qi.qemu_img("create", "-q", "-f", "qcow2", *opts, path, size)
        _fill(path, _size(size))
        made[name] = path
    return made


def _size(text: str) -> int:
    return int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]]


@dataclass
class Damage:
    """What `qemu-img check` says of an image: None when it cannot open it."""

    corruptions: int | None

    @classmethod
    def of(cls, path: Path) -> Damage:
        """Judged with the corrupt bit cleared (and set back after): the bit is a writer's
        refusal, not damage, and a mutant whose L1 table names the header cluster as an L2
        table would otherwise count the bit as an entry with reserved bits set. (No copy: a
        damaged image can be a sparse file of terabytes.)"""
        (version,) = qi.peek(path, 4, ">I")
        incompatible = qi.peek(path, 72, ">Q")[0] if version >= 3 else 0
        if incompatible & 2:
            qi.poke(path, 72, ">Q", incompatible & ~2)
        try:
            proc = qi.qemu_img("check", "--output=json", path, ok=(0, 1, 2, 3))
        finally:
            if incompatible & 2:
                qi.poke(path, 72, ">Q", incompatible)
        try:
            report = json.loads(proc.stdout)
        except json.JSONDecodeError:
            return cls(None)
        return cls(report.get("corruptions", 0) + report.get("check-errors", 0))


@dataclass
class Case:
    """One mutant and the operations both tools run on it."""

    seed: int
    template: str
    mutations: list[tuple[int, int]] = field(default_factory=list)
    ops: list[tuple[str, int, int]] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"seed {self.seed} ({self.template}): bytes {self.mutations}, "
            f"then {self.ops}; QCOW2OVL_DAMAGED_SEED={self.seed} replays it"
        )


def make_case(seed: int, templates: dict[str, Path], work: Path) -> tuple[Case, Path]:
    """Builds mutant *seed* at *work*: 1 to 4 bytes changed in metadata clusters (not the
    header: a broken header is only an open's refusal), and 12 operations for it."""
    rng = random.Random(seed)
    name = rng.choice(sorted(templates))
    case = Case(seed, name)
    shutil.copyfile(templates[name], work)
    with qcow2ovl.open(work) as img:
        extents = [(o, n) for o, n, t in img.metadata_extents() if t & MUTABLE]
        size = img.virtual_size
        cluster = img.info.cluster_size
    data = bytearray(work.read_bytes())
    for _ in range(rng.randint(1, 4)):
        offset, length = rng.choice(extents)
        at = offset + rng.randrange(min(length, len(data) - offset))
        value = rng.choice([rng.randrange(256), data[at] ^ (1 << rng.randrange(8)), 0, 0xFF])
        data[at] = value
        case.mutations.append((at, value))
    work.write_bytes(bytes(data))
    lengths = [1, 512, 4096, cluster, 3 * cluster + 7, 100_000]
    for _ in range(12):
        kind = rng.choice(["write", "write", "write", "zero", "unmap", "discard", "snap", "grow"])
        length = rng.choice(lengths)
        offset = rng.randrange(0, max(1, size - length))
        if kind == "grow":
            offset, length = 0, cluster * rng.randint(1, 64)
            size += length
        case.ops.append((kind, offset, min(length, size - offset)))
    return case, work


def run_ours(case: Case, path: Path) -> None:
    """The operations through qcow2ovl: any refusal is fine, anything else is a bug."""
    try:
        img = qcow2ovl.open(path, writable=True)
    except REFUSALS:
        return
    for i, (kind, offset, length) in enumerate(case.ops):
        try:
            if kind == "write":
                img.write(offset, bytes([0x60 + i]) * length)
            elif kind in ("zero", "unmap"):
                img.write_zeroes(offset, length, unmap=kind == "unmap")
            elif kind == "discard":
                img.discard(offset, length)
            elif kind == "snap":
                img.create_snapshot(f"fuzz{i}")
            else:
                img.resize(img.virtual_size + length)
        except REFUSALS:
            pass
    try:
        img.close()
    except REFUSALS:
        # The last flush may meet the damage (a refcount already 0): the handle is closed
        # all the same, having written nothing more.
        assert img.closed


def run_qemu(case: Case, path: Path) -> None:
    """The same operations through qemu-io and qemu-img (their failures are ignored: a refusal
    is their answer too)."""
    pending: list[str] = []

    def flush_io() -> None:
        if pending:
            argv = [str(qi.QEMU_IO), "-f", "qcow2"]
            for cmd in pending:
                argv += ["-c", cmd]
            subprocess.run([*argv, str(path)], capture_output=True, timeout=120)
            pending.clear()

    for i, (kind, offset, length) in enumerate(case.ops):
        if kind in ("write", "zero", "unmap", "discard"):
            pending.append(qi.io_command(kind, offset, length, 0x60 + i))
        else:
            flush_io()
            if kind == "snap":
                args = ["snapshot", "-c", f"fuzz{i}", str(path)]
            else:
                args = ["resize", "-f", "qcow2", str(path), f"+{length}"]
            subprocess.run([str(qi.QEMU_IMG), *args], capture_output=True, timeout=120)
    flush_io()


def judge(case: Case, before: Damage, ours: Damage, qemu: Damage) -> str | None:
    """Why qcow2ovl did worse than QEMU on this mutant, or None."""
    if before.corruptions is None:
        return None  # qemu-img cannot open the mutant: nothing to compare against
    if ours.corruptions is None:
        if qemu.corruptions is not None:
            return "qemu-img cannot open what qcow2ovl left; QEMU's replay it can"
        return None
    if ours.corruptions > before.corruptions:
        if qemu.corruptions is not None and ours.corruptions > qemu.corruptions:
            return (
                f"qcow2ovl left {ours.corruptions} corruptions, QEMU {qemu.corruptions}, "
                f"the mutant had {before.corruptions}"
            )
    return None


def test_writing_into_damaged_images_is_never_worse_than_qemu(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    seeds = [int(ONE_SEED)] if ONE_SEED else [*range(EXAMPLES), *REGRESSIONS]
    worse = []
    added = 0
    for seed in seeds:
        case, mutant = make_case(seed, templates, tmp_path / "mutant.qcow2")
        before = Damage.of(mutant)
        theirs = tmp_path / "qemu.qcow2"
        shutil.copyfile(mutant, theirs)
        try:
            run_ours(case, mutant)
        except BaseException as exc:  # noqa: BLE001 - a stray exception is the finding
            pytest.fail(f"{type(exc).__name__}: {exc}; {case.describe()}")
        run_qemu(case, theirs)
        ours, qemu = Damage.of(mutant), Damage.of(theirs)
        if (ours.corruptions or 0) > (before.corruptions or 0):
            added += 1
        why = judge(case, before, ours, qemu)
        if why:
            worse.append(f"{why}; {case.describe()}")
    print(f"{len(seeds)} mutants, {added} with corruptions added, {len(worse)} worse than QEMU")
    assert worse == [], "\n".join(worse)
