"""qcow2ovl._records: the run-time stand-in for frozen dataclasses behaves like one."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
from qcow2ovl._records import dataclass


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
