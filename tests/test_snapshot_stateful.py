"""Stateful property test of internal snapshots: the writer's random writes, zero writes,
discards, compressed writes, resizes and reopens mixed with snapshot create, apply and delete,
against a model of the active disk and of every snapshot's disk. After every step the live
metadata map equals a fresh scan of the file; after every run `qemu-img check` finds the image
clean and qemu-img reads the active disk and every snapshot as the model says. CI runs a few
examples per configuration; `QCOW2OVL_SNAPSHOT_EXAMPLES=100` runs more."""

from __future__ import annotations

import os

import pytest
import qcow2ovl
import qemu_images as qi
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule
from test_write_stateful import MiB, WriterMachine

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")

EXAMPLES = int(os.environ.get("QCOW2OVL_SNAPSHOT_EXAMPLES", "6"))
NAMES = ["a", "b", "c", "1"]

# Snapshots need refcounts that can count to 2 and clusters in the image file.
CONFIGS = [
    {"cluster_size": 512},
    {"cluster_size": 65536},
    {"cluster_size": 2 * MiB},
    {"cluster_size": 4096, "refcount_bits": 2},
    {"refcount_bits": 64},
    {"extended_l2": True},
    {"extended_l2": True, "backing": True},
    {"lazy_refcounts": True},
    {"version": 2},
    {"version": 2, "backing": True},
]


class SnapshotMachine(WriterMachine):
    @initialize(config=st.sampled_from(CONFIGS), seed=st.integers(0, 2**16))
    def setup(self, config: dict[str, object], seed: int) -> None:
        super().setup(config, seed)
        self.refcount_bits = int(config.get("refcount_bits", 16))  # type: ignore[call-overload]
        #: name -> (disk contents, disk size) at snapshot time
        self.snaps: dict[str, tuple[bytes, int]] = {}
        self.ids: dict[str, str] = {}

    @precondition(lambda self: self.img is not None)
    @rule(name=st.sampled_from(NAMES))
    def create_snapshot(self, name: str) -> None:
        assert self.img is not None
        if name in self.snaps:
            with pytest.raises(ValueError, match="already exists"):
                self.img.create_snapshot(name)
            return
        if self.refcount_bits < 16:
            # Narrow refcounts run out after a few snapshots: refused, nothing changed.
            try:
                entry = self.img.create_snapshot(name)
            except qcow2ovl.UnsupportedError as e:
                assert "largest" in str(e)
                assert name not in [s.name for s in self.img.snapshots]
                return
        else:
            entry = self.img.create_snapshot(name)
        assert entry.disk_size == self.size
        self.snaps[name] = (bytes(self.model), self.size)
        self.ids[name] = entry.id

    @precondition(lambda self: self.img is not None)
    @rule(name=st.sampled_from(NAMES))
    def apply_snapshot(self, name: str) -> None:
        assert self.img is not None
        if name not in self.snaps and name not in self.ids.values():
            with pytest.raises(qcow2ovl.SnapshotNotFoundError):
                self.img.apply_snapshot(name)
            return
        try:
            entry = self.img.apply_snapshot(name)
        except qcow2ovl.UnsupportedError as e:
            # Applying adds a reference to everything the snapshot holds: narrow refcounts may
            # be full. Refused, nothing changed (the invariants read the old disk).
            assert self.refcount_bits < 16 and "largest" in str(e), e
            return
        data, size = self.snaps[entry.name]
        self.model = bytearray(data)
        self.size = size
        assert self.img.virtual_size == size

    @precondition(lambda self: self.img is not None)
    @rule(name=st.sampled_from(NAMES))
    def delete_snapshot(self, name: str) -> None:
        assert self.img is not None
        if name not in self.snaps and name not in self.ids.values():
            with pytest.raises(qcow2ovl.SnapshotNotFoundError):
                self.img.delete_snapshot(name)
            return
        entry = self.img.delete_snapshot(name)
        del self.snaps[entry.name]
        del self.ids[entry.name]

    @invariant()
    def map_matches_a_fresh_scan(self) -> None:
        if self.img is None:
            return
        self.img.flush()
        with qcow2ovl.open(self.path, force_share=True) as fresh:
            assert list(self.img.metadata_extents()) == list(fresh.metadata_extents())
        assert [s.name for s in self.img.snapshots] == list(self.snaps)

    def _final_check(self) -> None:
        super()._final_check()
        for name, (data, size) in self.snaps.items():
            raw = self.dir / f"snap-{name}.raw"
            qi.qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", self.path, raw)
            got = raw.read_bytes()
            # qemu-img shows a snapshot at the image's current size.
            assert len(got) == self.size, name
            n = min(size, self.size)
            assert got[:n] == data[:n], name


TestSnapshots = SnapshotMachine.TestCase
TestSnapshots.settings = settings(
    max_examples=EXAMPLES * len(CONFIGS),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
