"""The Rust metadata map against a plain dict-of-clusters model, and against QEMU's naive check."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from qcow2ovl import MetadataMap, MetadataType, NaiveChecker

ALL = 0x7FF
MAIN_HEADER = 0x1
MAX_HOST = 1 << 56


class ClusterModel:
    """The specification of the check ("The check" in docs/design/architecture.md), written as
    plainly as possible."""

    def __init__(self, cluster_size: int, enabled: int) -> None:
        self.cs = cluster_size
        self.enabled = enabled
        self.clusters: dict[int, int] = {}

    def enter(self, offset: int, n: int, types: int) -> None:
        types &= self.enabled
        if offset % self.cs or not types:
            return
        for c in range(offset // self.cs, offset // self.cs + n):
            self.clusters[c] = self.clusters.get(c, 0) | types

    def remove(self, offset: int, n: int, types: int) -> None:
        if n == 0:
            return
        first = offset // self.cs
        end = -(-(offset + n * self.cs) // self.cs)
        for c in range(first, end):
            left = self.clusters.get(c, 0) & ~types
            if left:
                self.clusters[c] = left
            else:
                self.clusters.pop(c, None)

    def check(self, offset: int, size: int, ignore: int) -> int:
        if size == 0:
            return 0
        first, last = offset // self.cs, (offset + size - 1) // self.cs
        found = MAIN_HEADER if first == 0 else 0
        for c, t in self.clusters.items():
            if first <= c <= last:
                found |= t
        return found & self.enabled & ~ignore

    def extents(self) -> list[tuple[int, int, int]]:
        out: list[list[int]] = []
        for c in sorted(self.clusters):
            t = self.clusters[c]
            if out and out[-1][0] + out[-1][1] == c and out[-1][2] == t:
                out[-1][1] += 1
            else:
                out.append([c, 1, t])
        return [(c * self.cs, n * self.cs, t) for c, n, t in out]


CLUSTER_SIZES = [512, 4096, 65536, 2 << 20]
types_st = st.integers(min_value=0, max_value=ALL)


class MapMachine(RuleBasedStateMachine):
    """Random enter/remove/check/extents sequences; the map must always agree with the model."""

    @initialize(
        cluster_size=st.sampled_from(CLUSTER_SIZES),
        enabled=st.sampled_from([ALL, 0x0F7F, 0x7F & ALL, 0x2B]).map(lambda m: m & ALL),
        base=st.sampled_from([0, 1 << 40, MAX_HOST - (1 << 30)]),
    )
    def setup(self, cluster_size: int, enabled: int, base: int) -> None:
        self.map = MetadataMap(cluster_size, enabled=enabled)
        self.model = ClusterModel(cluster_size, enabled)
        self.base = base
        self.cs = cluster_size

    def offset(self, cluster: int, delta: int) -> int:
        return self.base + cluster * self.cs + delta

    @rule(
        cluster=st.integers(0, 300),
        n=st.integers(0, 40),
        types=types_st,
        unaligned=st.booleans(),
    )
    def enter(self, cluster: int, n: int, types: int, unaligned: bool) -> None:
        offset = self.offset(cluster, 7 if unaligned else 0)
        if offset + n * self.cs > MAX_HOST:
            with pytest.raises(ValueError):
                self.map.enter(offset, n, types)
            return
        self.map.enter(offset, n, types)
        self.model.enter(offset, n, types)

    @rule(
        cluster=st.integers(0, 300), n=st.integers(0, 40), types=types_st, delta=st.integers(0, 600)
    )
    def remove(self, cluster: int, n: int, types: int, delta: int) -> None:
        offset = self.offset(cluster, delta % self.cs)
        self.map.remove(offset, n, types)
        self.model.remove(offset, n, types)

    @rule(
        cluster=st.integers(0, 320),
        delta=st.integers(0, 1 << 21),
        size=st.one_of(st.integers(0, 4096), st.integers(0, 1 << 24)),
        ignore=types_st,
    )
    def check(self, cluster: int, delta: int, size: int, ignore: int) -> None:
        offset = self.offset(cluster, delta % self.cs)
        assert int(self.map.check(offset, size, ignore)) == self.model.check(offset, size, ignore)

    @precondition(lambda self: self.base == 0)
    @rule(size=st.integers(1, 1 << 20), ignore=types_st)
    def check_header(self, size: int, ignore: int) -> None:
        assert int(self.map.check(0, size, ignore)) == self.model.check(0, size, ignore)

    @invariant()
    def same_extents(self) -> None:
        got = [(o, n, int(t)) for o, n, t in self.map.extents()]
        assert got == self.model.extents()
        assert len(self.map) == len(self.model.clusters)
        assert self.map.memory_usage() >= 8 * len(self.model.clusters)


TestMapMachine = MapMachine.TestCase
TestMapMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_check_returns_metadata_type() -> None:
    m = MetadataMap(65536)
    m.enter(65536, 1, MetadataType.ACTIVE_L1)
    got = m.check(65536 + 100, 10)
    assert isinstance(got, MetadataType)
    assert got == MetadataType.ACTIVE_L1
    assert m.check(0, 1) == MetadataType.MAIN_HEADER
    assert m.check(0, 1, ignore=MetadataType.MAIN_HEADER) == 0
    assert m.enabled == MetadataType.ALL


@pytest.mark.parametrize("cluster_size", [0, 1, 256, 1000, 4 << 20, 1 << 40])
def test_bad_cluster_size(cluster_size: int) -> None:
    with pytest.raises(ValueError, match="cluster size"):
        MetadataMap(cluster_size)


def test_bad_arguments_raise_value_error() -> None:
    m = MetadataMap(4096)
    with pytest.raises(ValueError):
        m.check(2**64 - 10, 100)
    with pytest.raises(ValueError):
        m.enter(MAX_HOST, 1, MetadataType.ACTIVE_L2)
    with pytest.raises(ValueError):
        m.enter(0, 1 << 40, MetadataType.ACTIVE_L2)
    with pytest.raises(ValueError, match="unknown metadata type"):
        m.enter(4096, 1, 0x800)
    for bad in (lambda: m.check(-1, 1), lambda: m.check(0, 2**64), lambda: m.enter(-4096, 1, 4)):
        with pytest.raises(ValueError, match="must be between 0 and 2"):
            bad()
    with pytest.raises(ValueError, match="total_size_limit"):
        MetadataMap(4096, total_size_limit=8)


def test_memory_limit_never_under_reports() -> None:
    cs = 65536
    m = MetadataMap(cs, total_size_limit=2048)
    clusters = [3 + 5 * i for i in range(2000)]
    for c in clusters:
        m.enter(c * cs, 1, MetadataType.REFCOUNT_BLOCK)
    assert m.memory_usage() <= 2048
    assert m.unchecked_ranges(), "the limit was hit, so some ranges are unchecked"
    exact = 0
    for c in clusters:
        got = m.check(c * cs, 512)
        assert got & MetadataType.REFCOUNT_BLOCK
        if m.is_exact(c * cs, 512):
            exact += 1
            assert got == MetadataType.REFCOUNT_BLOCK
        else:
            assert got == MetadataType.ALL
    assert exact > 0
    # A cluster between held entries that is not in an unchecked range is exactly empty.
    for off, length in m.unchecked_ranges():
        assert not m.is_exact(off, length)


@st.composite
def layouts(draw: st.DrawFn) -> dict:
    """A random, valid-looking layout: distinct aligned clusters for every structure."""
    cs = draw(st.sampled_from([512, 4096, 65536]))
    nclusters = 300
    free = iter(draw(st.randoms(use_true_random=False)).sample(range(1, nclusters), 150))

    def take() -> int:
        # Every structure starts at a distinct cluster; multi-cluster ones may run into others.
        return next(free)

    l1 = [
        0 if draw(st.booleans()) else take() * cs | (1 << 63)
        for _ in range(draw(st.integers(0, 20)))
    ]
    reft = [
        0 if draw(st.integers(0, 3)) == 0 else take() * cs for _ in range(draw(st.integers(1, 10)))
    ]
    snaps = []
    image = bytearray()
    for _ in range(draw(st.integers(0, 4))):
        off = take() * cs
        entries = [
            take() * cs if draw(st.booleans()) else 0 for _ in range(draw(st.integers(0, 6)))
        ]
        image.extend(bytes(max(0, off + 8 * len(entries) - len(image))))
        for i, e in enumerate(entries):
            image[off + 8 * i : off + 8 * i + 8] = e.to_bytes(8, "big")
        snaps.append((off, len(entries)))
    return {
        "cluster_size": cs,
        "l1_table_offset": take() * cs,
        "l1_table": l1,
        "refcount_table_offset": take() * cs,
        "refcount_table": reft,
        "snapshots_offset": take() * cs if snaps else 0,
        "snapshots_size": draw(st.integers(1, 3 * cs)) if snaps else 0,
        "snapshots": snaps,
        "bitmap_directory": (take() * cs, draw(st.integers(1, 2 * cs)))
        if draw(st.booleans())
        else None,
        "bitmap_tables": [
            (take() * cs, draw(st.integers(1, cs // 4))) for _ in range(draw(st.integers(0, 3)))
        ],
        "crypto_header": (take() * cs, draw(st.integers(1, 3 * cs)))
        if draw(st.booleans())
        else None,
        "image": bytes(image),
    }


def map_from_layout(lay: dict, enabled: int) -> MetadataMap:
    cs = lay["cluster_size"]
    m = MetadataMap(cs, enabled=enabled)

    def put(off: int, length: int, t: MetadataType) -> None:
        if length:
            m.enter(off, -(-length // cs), t)

    put(0, cs, MetadataType.MAIN_HEADER)
    put(lay["l1_table_offset"], 8 * len(lay["l1_table"]), MetadataType.ACTIVE_L1)
    for e in lay["l1_table"]:
        put(e & 0x00FFFFFFFFFFFE00, cs if e & 0x00FFFFFFFFFFFE00 else 0, MetadataType.ACTIVE_L2)
    put(lay["refcount_table_offset"], 8 * len(lay["refcount_table"]), MetadataType.REFCOUNT_TABLE)
    for e in lay["refcount_table"]:
        put(e & ~0x1FF, cs if e else 0, MetadataType.REFCOUNT_BLOCK)
    put(lay["snapshots_offset"], lay["snapshots_size"], MetadataType.SNAPSHOT_TABLE)
    for off, n in lay["snapshots"]:
        put(off, 8 * n, MetadataType.INACTIVE_L1)
        for i in range(n):
            e = (
                int.from_bytes(lay["image"][off + 8 * i : off + 8 * i + 8], "big")
                & 0x00FFFFFFFFFFFE00
            )
            put(e, cs if e else 0, MetadataType.INACTIVE_L2)
    if lay["bitmap_directory"]:
        put(*lay["bitmap_directory"], MetadataType.BITMAP_DIRECTORY)
    for off, n in lay["bitmap_tables"]:
        put(off, 8 * n, MetadataType.BITMAP_TABLE)
    if lay["crypto_header"]:
        put(*lay["crypto_header"], MetadataType.CRYPTO_HEADER)
    return m


@settings(max_examples=200, deadline=None)
@given(
    lay=layouts(),
    enabled=st.sampled_from([0x7FF, 0x77F, 0x32B, 0]),
    probes=st.lists(
        st.tuples(st.integers(0, 310), st.integers(0, 1 << 20), st.integers(0, 0x7FF)), max_size=60
    ),
)
def test_map_agrees_with_naive_checker(lay: dict, enabled: int, probes: list) -> None:
    cs = lay["cluster_size"]
    m = map_from_layout(lay, enabled)
    naive = NaiveChecker(enabled=enabled, **lay)
    # Every cluster boundary near metadata, and random ranges.
    for cluster, size, ignore in probes:
        off = cluster * cs + (size % cs)
        assert m.check(off, size, ignore) == naive.check(off, size, ignore), (off, size, ignore)
    for off, length, _t in m.extents():
        for o in (off, off + length - 1):
            assert m.check(o, 1) == naive.check(o, 1)
