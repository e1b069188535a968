"""Records: the run-time stand-in for frozen dataclasses (``qcow2ovl._frozen``) behaves like
one, and every record the Rust core hands over names the fields of the record built from it."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi
from qcow2ovl import _core
from qcow2ovl._frozen import dataclass
from qcow2ovl.records import (
    Bitmap,
    CheckFinding,
    CheckResult,
    GuestExtent,
    ImageInfo,
    Problem,
    Snapshot,
    from_fields,
    from_rows,
    record_fields,
)


@dataclass(frozen=True)
class Point:
    x: int
    y: int = 0

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError("x < 0")


@dataclass(frozen=True)
class Point3(Point):
    z: int = 5


def test_fields_defaults_and_post_init() -> None:
    assert Point(1).y == 0
    assert Point(1, 2) == Point(x=1, y=2)
    assert Point(1, 2) != Point(2, 1)
    assert Point(1, 2) != (1, 2)
    with pytest.raises(ValueError):
        Point(-1)
    assert Point3(1, 2, 3).z == 3
    assert Point3(1) == Point3(1, 0, 5)
    assert Point3(1) != Point(1)


def test_argument_errors() -> None:
    with pytest.raises(TypeError, match="missing"):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected"):
        Point(1, w=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple"):
        Point(1, x=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="positional"):
        Point(1, 2, 3)  # type: ignore[call-arg]


def test_frozen_hash_repr_copy_pickle() -> None:
    p = Point(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del p.x  # type: ignore[misc]
    assert hash(p) == hash(Point(1, 2))
    assert len({p, Point(1, 2), Point(2, 2)}) == 2
    assert repr(p) == "Point(x=1, y=2)"
    assert copy.copy(p) == p
    assert pickle.loads(pickle.dumps(p)) == p
    assert Point.__match_args__ == ("x", "y")  # type: ignore[attr-defined]


def test_only_frozen_records() -> None:
    with pytest.raises(TypeError):
        dataclass(frozen=False)


# ---- records from the Rust core, by name --------------------------------------------------


def test_rows_must_name_the_record_fields() -> None:
    assert from_rows(Problem, (["kind", "offset", "size", "message"], [("k", 1, 2, "m")])) == [
        Problem("k", 1, 2, "m")
    ]
    with pytest.raises(TypeError, match="Problem fields .* do not match"):
        from_rows(Problem, (["kind", "offset", "length", "message"], [("k", 1, 2, "m")]))
    with pytest.raises(TypeError):
        from_fields(Snapshot, {"id": "1"})


def _image_with_every_record(d: Path) -> Path:
    """A qemu-img image with data, a snapshot and a bitmap, whose snapshot's L1 entry 0 then
    points off a cluster boundary (a scan problem and a check finding)."""
    img = d / "records.qcow2"
    qi.create(img, 4 << 20)
    qi.write(img, [(0, 65536, 0x11)])
    qi.snapshot_create(img, "s1")
    qi.bitmap_add(img, "b0")
    with qcow2ovl.open(img) as image:
        l1_offset = image.snapshots[0].l1_table_offset
    (entry,) = qi.peek(img, l1_offset, ">Q")
    qi.poke(img, l1_offset, ">Q", entry | 0x200)
    return img


def test_every_record_from_the_core_carries_its_field_names(tmp_path: Path) -> None:
    """What the core returns names exactly the fields of the record built from it, so that a
    field renamed on one side fails here rather than shifting values silently."""
    path = _image_with_every_record(tmp_path)
    with qcow2ovl.open(path) as img:
        core = img._core
        assert set(core.info()) == set(record_fields(ImageInfo))
        assert all(set(s) == set(record_fields(Snapshot)) for s in core.snapshots())
        assert core.bitmaps() and all(set(b) == set(record_fields(Bitmap)) for b in core.bitmaps())
        (names, rows), count = core.problems()
        assert tuple(names) == record_fields(Problem) and rows and count == len(rows)
        names, rows = core.guest_map()
        assert tuple(names) == record_fields(GuestExtent) and rows
        report = _core.check_image(core)
        assert set(report) | {"filename"} == set(record_fields(CheckResult))
        names, rows = report["findings"]
        assert tuple(names) == record_fields(CheckFinding) and rows
        # And the records themselves come out whole.
        assert img.problems[0].kind == "unaligned"
        assert img.guest_map()[0].start == 0
        result = img.check()
    assert result.findings and result.findings[0].severity == "corruption"
    # exit_code comes from the core and agrees with qemu-img check's exit status.
    assert result.exit_code == qi.qemu_check(path)["_exit"] == 2
