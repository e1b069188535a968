"""Stateful property test of persistent bitmaps: random writes, zeroes, discards, compressed
writes, resizes and reopens mixed with bitmap operations (add, remove, clear, enable, disable,
merge), mirrored to a model of dirty granules per bitmap. Every step our `dirty_extents()` must
equal the model; at the end QEMU must agree: `qemu-img info` lists the same bitmaps with the same
flags, the dirty ranges `qemu-nbd -B` exports equal the model, and `qemu-img check` is clean. CI
runs a few examples per configuration; `QCOW2OVL_BITMAP_EXAMPLES=200` runs more."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_bitmaps import DirtyModel, qemu_bitmaps

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")

MiB = 1 << 20
SIZE = 4 * MiB
EXAMPLES = int(os.environ.get("QCOW2OVL_BITMAP_EXAMPLES", "8"))
NAMES = ["a", "b", "c"]

CONFIGS = [
    {"cluster_size": 512},
    {"cluster_size": 65536},
    {"cluster_size": 2 * MiB},
    {"extended_l2": True},
    {"lazy_refcounts": True},
]


class BitmapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="qcow2ovl-bitmaps-"))
        self.img: qcow2ovl.Image | None = None
        self.models: dict[str, DirtyModel] = {}
        self.enabled: dict[str, bool] = {}

    @initialize(config=st.sampled_from(CONFIGS))
    def setup(self, config: dict[str, object]) -> None:
        self.path = self.dir / "img.qcow2"
        qcow2ovl.create(self.path, SIZE, **config)  # type: ignore[arg-type]
        self.cs = int(config.get("cluster_size", 65536))  # type: ignore[call-overload]
        self.size = SIZE
        self.img = qcow2ovl.open(self.path, writable=True)

    def _mark(self, offset: int, length: int) -> None:
        for name, model in self.models.items():
            if self.enabled[name]:
                model.mark(offset, length)

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        off = data.draw(st.integers(0, self.size - 1))
        n = data.draw(st.sampled_from([1, 512, 4096, self.cs, 3 * self.cs + 5, 200_000]))
        return off, min(n, self.size - off)

    # ---- changes of guest data ----------------------------------------------------------------

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data(), byte=st.integers(0, 255))
    def write(self, data: st.DataObject, byte: int) -> None:
        assert self.img is not None
        off, n = self._range(data)
        self.img.write(off, bytes([byte]) * n)
        self._mark(off, n)

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
        assert self.img is not None
        off, n = self._range(data)
        self.img.write_zeroes(off, n, unmap=unmap)
        self._mark(off, n)

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        assert self.img is not None
        off, n = self._range(data)
        self.img.discard(off, n)
        self._mark(off, n)

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def write_compressed(self, data: st.DataObject) -> None:
        assert self.img is not None
        off = data.draw(st.integers(0, self.size // self.cs - 1)) * self.cs
        self.img.write_compressed(off, b"\x07" * (self.cs // 2) + bytes(self.cs // 2))
        self._mark(off, self.cs)

    @precondition(lambda self: self.img is not None and self.size < 3 * SIZE)
    @rule(grow=st.sampled_from([512, 64 * 1024, MiB + 512]))
    def resize(self, grow: int) -> None:
        assert self.img is not None
        self.size += grow
        self.img.resize(self.size)
        for model in self.models.values():
            model.resize(self.size)

    @precondition(lambda self: self.img is not None)
    @rule()
    def reopen(self) -> None:
        assert self.img is not None
        self.img.close()
        self.img = qcow2ovl.open(self.path, writable=True)

    # ---- bitmap operations ----------------------------------------------------------------

    @precondition(lambda self: self.img is not None and len(self.models) < len(NAMES))
    @rule(data=st.data(), enabled=st.booleans())
    def add(self, data: st.DataObject, enabled: bool) -> None:
        assert self.img is not None
        name = data.draw(st.sampled_from([n for n in NAMES if n not in self.models]))
        granularity = data.draw(st.sampled_from([None, 512, 4096, 65536, 1 << 20]))
        self.img.add_bitmap(name, granularity=granularity, enabled=enabled)
        g = granularity or min(max(self.cs, 4096), 65536)
        self.models[name] = DirtyModel(self.size, g)
        self.enabled[name] = enabled

    @precondition(lambda self: self.img is not None and self.models)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        assert self.img is not None
        name = data.draw(st.sampled_from(sorted(self.models)))
        self.img.remove_bitmap(name)
        del self.models[name], self.enabled[name]

    @precondition(lambda self: self.img is not None and self.models)
    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        assert self.img is not None
        name = data.draw(st.sampled_from(sorted(self.models)))
        self.img.clear_bitmap(name)
        self.models[name].bits.clear()

    @precondition(lambda self: self.img is not None and self.models)
    @rule(data=st.data(), enabled=st.booleans())
    def toggle(self, data: st.DataObject, enabled: bool) -> None:
        assert self.img is not None
        name = data.draw(st.sampled_from(sorted(self.models)))
        if enabled:
            self.img.enable_bitmap(name)
        else:
            self.img.disable_bitmap(name)
        self.enabled[name] = enabled

    @precondition(lambda self: self.img is not None and self.models)
    @rule(data=st.data())
    def merge(self, data: st.DataObject) -> None:
        assert self.img is not None
        target = data.draw(st.sampled_from(sorted(self.models)))
        source = data.draw(st.sampled_from(sorted(self.models)))
        self.img.merge_bitmap(target, source)
        for offset, length in self.models[source].runs():
            self.models[target].mark(offset, length)

    # ---- what must hold ---------------------------------------------------------------------

    @invariant()
    def dirty_extents_match(self) -> None:
        if self.img is None:
            return
        assert sorted(b.name for b in self.img.bitmaps) == sorted(self.models)
        for name, model in self.models.items():
            assert self.img.dirty_extents(name) == model.runs(), name

    def teardown(self) -> None:
        try:
            if self.img is not None:
                self.img.close()
                self._final_check()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _final_check(self) -> None:
        listed = {str(b["name"]): b for b in qemu_bitmaps(self.path)}
        assert set(listed) == set(self.models)
        for name, model in self.models.items():
            assert listed[name]["flags"] == (["auto"] if self.enabled[name] else []), name
            assert listed[name]["granularity"] == model.g, name
            assert qi.qemu_dirty(self.path, name) == model.runs(), name
        check = qi.qemu_check(self.path)
        assert qi.check_is_clean(check) and check.get("leaks", 0) == 0, check


TestBitmaps = BitmapMachine.TestCase
TestBitmaps.settings = settings(
    max_examples=EXAMPLES * len(CONFIGS),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
