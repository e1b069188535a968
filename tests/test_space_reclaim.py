"""Freed clusters give their space back to the host file where QEMU's do: after a guest discard
or a zero write with unmap (QEMU's `pass-discard-request`), a snapshot deletion or revert and a
commit's emptying of the top image (`pass-discard-snapshot`), holes are punched; the clusters
other changes free keep their blocks (`pass-discard-other` is off), to be reused.

Twin images get the same steps through qemu-io and qemu-img and through ours; the space each
file really holds afterwards (its allocated blocks) must match."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")

MiB = 1 << 20

#: One step: the verb (`io`, `snapshot`, `commit`) and its arguments, the image last.
Step = tuple[str, list[str]]


def run_qemu(step: Step, image: Path) -> None:
    verb, args = step
    if verb == "io":
        qi.qemu_io(image, *args)
    else:
        qi.qemu_img(verb, *args, image)


def run_ours(step: Step, image: Path) -> None:
    verb, args = step
    argv = [c for a in args for c in ("-c", a)] if verb == "io" else args
    proc = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", verb, *argv, str(image)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def written(pattern: int) -> Step:
    return ("io", [f"write -P {pattern:#x} 0 4M"])


#: name: (steps that make the image, through qemu-io/qemu-img; the step under test;
#: whether QEMU gives the 4 MiB back).
CASES: dict[str, tuple[list[Step], Step, bool]] = {
    "discard": ([written(0x11)], ("io", ["discard 0 4M"]), True),
    "discard-partly": ([written(0x11)], ("io", ["discard 1M 2M"]), True),
    "zero-unmap": ([written(0x11)], ("io", ["write -z -u 0 4M"]), True),
    # Without unmap the clusters stay allocated, reading as zeros: nothing is freed.
    "zero-keep": ([written(0x11)], ("io", ["write -z 0 4M"]), False),
    "snapshot-delete": (
        [written(0x11), ("snapshot", ["-c", "s"]), written(0x22)],
        ("snapshot", ["-d", "s"]),
        True,
    ),
    "snapshot-apply": (
        [written(0x11), ("snapshot", ["-c", "s"]), written(0x22)],
        ("snapshot", ["-a", "s"]),
        True,
    ),
    # An overwrite frees the compressed clusters it replaces: QEMU keeps their blocks.
    "rewrite-compressed": (
        [("io", ["write -c -P 0x11 0 4M"])],
        written(0x22),
        False,
    ),
}


def make_twins(tmp_path: Path, steps: list[Step]) -> tuple[Path, Path]:
    """Two images made alike by QEMU (built twice, not copied: a copy would fill the holes)."""
    twins = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    for image in twins:
        qi.create(image, 64 * MiB)
        for step in steps:
            run_qemu(step, image)
    assert qi.allocated_clusters(twins[0]) == qi.allocated_clusters(twins[1])
    return twins


def compare_step(
    tmp_path: Path,
    steps: list[Step],
    step: Step,
    gives_back: bool,
    qemu: Callable[[Step, Path], None] = run_qemu,
) -> None:
    theirs, ours = make_twins(tmp_path, steps)
    before = qi.allocated_clusters(theirs)
    qemu(step, theirs)
    run_ours(step, ours)
    if gives_back and len(qi.allocated_clusters(theirs)) > len(before) - 16:
        pytest.skip(f"the file system under {tmp_path} punches no holes (QEMU's image kept them)")
    assert (len(qi.allocated_clusters(theirs)) < len(before) - 16) == gives_back
    assert qi.allocated_clusters(ours) == qi.allocated_clusters(theirs)
    assert "identical" in qi.qemu_img("compare", ours, theirs).stdout
    assert qi.check_is_clean(qi.qemu_check(ours))


@pytest.mark.parametrize("name", list(CASES))
def test_freed_space_goes_back_as_in_qemu(name: str, tmp_path: Path) -> None:
    steps, step, gives_back = CASES[name]
    compare_step(tmp_path, steps, step, gives_back)


def test_commit_empties_the_top_image_as_qemu_img(tmp_path: Path) -> None:
    """`commit` leaves the top image empty; its data clusters are punched out of it."""
    base = tmp_path / "base.qcow2"
    qi.create(base, 64 * MiB)
    tops = []
    for name in ("theirs", "ours"):
        top = tmp_path / f"{name}.qcow2"
        qi.create(top, 64 * MiB, backing=base)
        qi.qemu_io(top, "write -P 0x33 0 4M")
        tops.append(top)
    theirs, ours = tops
    before = qi.allocated_clusters(theirs)
    qi.qemu_img("commit", "-d", theirs)
    run_ours(("commit", ["-d"]), ours)
    # -d keeps the top image as it was; without it, both empty it.
    assert qi.allocated_clusters(ours) == qi.allocated_clusters(theirs) == before
    qi.qemu_img("commit", theirs)
    run_ours(("commit", []), ours)
    if len(qi.allocated_clusters(theirs)) > len(before) - 16:
        pytest.skip(f"the file system under {tmp_path} punches no holes (QEMU's image kept them)")
    # QEMU also rebuilds an emptied image's tables from scratch and truncates it: its L1 table
    # is a hole and its L2 table gone. Ours keeps both: two clusters more, the data punched out.
    assert len(qi.allocated_clusters(ours)) == len(qi.allocated_clusters(theirs)) + 2
    assert "identical" in qi.qemu_img("compare", ours, theirs).stdout
    assert qi.check_is_clean(qi.qemu_check(ours))
