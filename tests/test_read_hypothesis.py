"""Random qemu-io operation sequences, read back through qcow2ovl and judged by QEMU.

Each example makes a fresh small image (variants: plain, over a backing file holding data,
extended L2 with or without a backing file, deflate / zstd compressed clusters written first, and
a chain of two fresh images with random operations at both levels and differing geometry;
cluster sizes from 512 B to 64 KiB), runs 5-20 random `write -P`, `write -z`, `write -z -u` and
`discard` commands with one qemu-io process per image, and then checks that the whole disk read
by `Image.read`, random ranges read by `read` / `readinto`, and `guest_map()` equal
`qemu-img convert -O raw` and `qemu-img map --output=json`. The image is opened with the default
cache or a tiny one (one or three clusters' worth).

`QCOW2OVL_READ_EXAMPLES` sets the number of examples per variant (default 25).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import qcow2ovl
import qemu_images as qi
import read_images as ri
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from read_images import describe_map_diff, extent_dict, first_diff

KiB = qi.KiB
MiB = qi.MiB
SIZE = 4 * MiB
EXAMPLES = int(os.environ.get("QCOW2OVL_READ_EXAMPLES", "25"))

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass(frozen=True)
class Backings:
    qcow2: Path  # 4 MiB, 64 KiB clusters: a constant pattern everywhere, random bytes in places
    raw: Path  # 3 MiB of random bytes: shorter than the images above it


@pytest.fixture(scope="session")
def backings(tmp_path_factory: pytest.TempPathFactory) -> Backings:
    d = tmp_path_factory.mktemp("hyp-backing")
    base = qi.create(d / "base.qcow2", SIZE)
    ri.Ops(d, 7).pattern(0, SIZE, 0x5A).data(100 * KiB, 300 * KiB).data(3 * MiB - 5, 10).run(base)
    raw = ri.raw_file(d / "base.raw", 3 * MiB, [(0, 3 * MiB)], seed=8)
    return Backings(base.path.resolve(), raw.resolve())


@dataclass(frozen=True)
class Setup:
    cluster_size: int
    extended_l2: bool
    compat: str
    backing: str | None  # "qcow2", "raw" or None
    compression: str | None = None  # compression_type, for the compressed variant
    size: int = SIZE

    def create(self, path: Path, backings: Backings, backing: str | None = None) -> qi.ImageRef:
        """The image; over `backing` (a qcow2 file name) if given, else per `self.backing`."""
        opts: dict[str, object] = {"cluster_size": self.cluster_size, "compat": self.compat}
        if self.extended_l2:
            opts["extended_l2"] = True
        if self.compression:
            opts["compression_type"] = self.compression
        if backing is not None:
            return qi.create(path, self.size, opts=opts, backing=backing)
        if self.backing == "qcow2":
            return qi.create(path, self.size, opts=opts, backing=backings.qcow2)
        if self.backing == "raw":
            return qi.create(path, self.size, opts=opts, backing=backings.raw, backing_fmt="raw")
        return qi.create(path, self.size, opts=opts)


def setups(
    *,
    cluster_sizes: list[int],
    extended_l2: bool,
    backing: list[str | None],
    compat: list[str] | None = None,
    compression: list[str] | None = None,
    sizes: list[int] | None = None,
) -> st.SearchStrategy[Setup]:
    return st.builds(
        Setup,
        cluster_size=st.sampled_from(cluster_sizes),
        extended_l2=st.just(extended_l2),
        compat=st.sampled_from(compat or ["1.1"]),
        backing=st.sampled_from(backing),
        compression=st.sampled_from(compression) if compression else st.none(),
        size=st.sampled_from(sizes or [SIZE]),
    )


# extended L2 needs clusters of at least 16 KiB
SETUPS: dict[str, st.SearchStrategy[Setup]] = {
    "plain": setups(
        cluster_sizes=[512, 4096, 65536],
        extended_l2=False,
        backing=[None],
        compat=["1.1", "0.10"],
    ),
    "backing": setups(
        cluster_sizes=[512, 4096, 65536],
        extended_l2=False,
        backing=["qcow2", "raw"],
        compat=["1.1", "0.10"],
    ),
    "extended_l2": setups(
        cluster_sizes=[16384, 65536], extended_l2=True, backing=[None, "qcow2", "raw"]
    ),
    # compressed clusters first (`write -c` only goes to unallocated clusters), then the ops
    "compressed": st.one_of(
        setups(
            cluster_sizes=[4096, 65536],
            extended_l2=False,
            backing=[None, "qcow2", "raw"],
            compression=["zlib", "zstd"],
        ),
        setups(
            cluster_sizes=[16384, 65536],
            extended_l2=True,
            backing=[None, "qcow2", "raw"],
            compression=["zlib", "zstd"],
        ),
    ),
}

# the two levels of the chain variant: the lower one may have a backing file of its own (three
# levels then), the upper one is smaller, as large or larger than it
CHAIN_BASE = st.one_of(
    setups(
        cluster_sizes=[512, 4096, 65536],
        extended_l2=False,
        backing=[None, "qcow2", "raw"],
        compat=["1.1", "0.10"],
        sizes=[3 * MiB, SIZE],
    ),
    setups(cluster_sizes=[16384, 65536], extended_l2=True, backing=[None, "raw"]),
)
CHAIN_TOP = st.one_of(
    setups(
        cluster_sizes=[512, 4096, 65536, 2 * MiB],
        extended_l2=False,
        backing=[None],
        compat=["1.1", "0.10"],
        sizes=[3 * MiB + 512, SIZE, 5 * MiB],
    ),
    setups(cluster_sizes=[16384, 65536], extended_l2=True, backing=[None], sizes=[SIZE, 5 * MiB]),
)


@st.composite
def offsets(draw: Any, cluster_size: int, size: int) -> int:
    """Anywhere, or near a subcluster / cluster / L2 boundary or the end."""
    if draw(st.booleans()):
        return int(draw(st.integers(0, size - 1)))
    units = [512, cluster_size // 32 or 512, cluster_size, cluster_size**2 // 8]
    unit = draw(st.sampled_from(units))
    anchor = draw(st.integers(0, size // unit)) * unit
    return int(min(max(anchor + draw(st.integers(-700, 700)), 0), size - 1))


@st.composite
def operations(draw: Any, cluster_size: int, size: int) -> list[str]:
    ops = []
    for _ in range(draw(st.integers(5, 20))):
        off = draw(offsets(cluster_size, size))
        length = draw(
            st.one_of(
                st.integers(1, 4096), st.integers(1, 3 * cluster_size), st.integers(1, 1 * MiB)
            )
        )
        length = min(length, size - off)
        what = draw(st.sampled_from(["write", "zero", "unmap", "discard"]))
        pattern = draw(st.integers(1, 255)) if what == "write" else 0
        ops.append(qi.io_command(what, off, length, pattern))
    return ops


@st.composite
def compressed_writes(draw: Any, cluster_size: int, size: int) -> list[str]:
    """`write -c` of 1-8 distinct whole clusters, each with its own pattern."""
    clusters = draw(st.sets(st.integers(0, size // cluster_size - 1), min_size=1, max_size=8))
    return [
        f"write -c -P {draw(st.integers(1, 255)):#x} {c * cluster_size} {cluster_size}"
        for c in sorted(clusters)
    ]


def qemu_map_now(ref: qi.ImageRef, img: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """Our guest_map and a qemu-img map taken around it that did not change meanwhile (the
    host file's hole layout, which qemu-img map reports, may change as the kernel writes back)."""
    for _attempt in range(5):
        before = qi.qemu_map(ref)
        ours = img.guest_map()
        after = qi.qemu_map(ref)
        if before == after:
            break
    return after, ours


def check_example(
    tmp_root: Path, build: Callable[[Path], qi.ImageRef], context: str, setup: Setup, data: Any
) -> None:
    """Build the image with `build(directory)`, then compare everything with QEMU."""
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        d = Path(tmp)
        ref = build(d)
        size = setup.size
        raw = d / "img.raw"
        qi.qemu_img("convert", "-f", "qcow2", "-O", "raw", ref.path, raw)
        want_all = raw.read_bytes()
        assert len(want_all) == size
        cs = setup.cluster_size
        cache_size = data.draw(st.sampled_from([None, cs, 3 * cs]), label="cache_size")
        context += f"\ncache_size={cache_size}"
        with qcow2ovl.open(ref.path, cache_size=cache_size) as img:
            got_all = img.read(0, size)
            if got_all != want_all:
                i = first_diff(got_all, want_all)
                qmap = qi.qemu_map(ref)
                at = next((e for e in qmap if e["start"] <= i < e["start"] + e["length"]), None)
                pytest.fail(
                    f"whole-disk read differs first at guest offset {i}: got "
                    f"{got_all[i : i + 16].hex()} want {want_all[i : i + 16].hex()}; "
                    f"qemu-img map extent: {at}\n{context}"
                )
            for _ in range(10):
                off = data.draw(offsets(cs, size), label="read offset")
                n = data.draw(st.integers(0, min(size - off, 3 * cs + 5000)), label="read length")
                if data.draw(st.booleans(), label="readinto"):
                    buf = bytearray(n + 8)
                    assert img.readinto(off, memoryview(buf)[4 : 4 + n]) == n
                    got = bytes(buf[4 : 4 + n])
                else:
                    got = img.read(off, n)
                assert got == want_all[off : off + n], f"read({off}, {n}) differs\n{context}"
            want_map, ours = qemu_map_now(ref, img)
            got_map = [extent_dict(e) for e in ours]
            assert got_map == want_map, describe_map_diff(got_map, want_map) + "\n" + context


def _test_for(variant: str) -> Any:
    @SETTINGS
    @given(setup=SETUPS[variant], data=st.data())
    def test(
        setup: Setup,
        data: Any,
        backings: Backings,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> None:
        cs, size = setup.cluster_size, setup.size
        ops = []
        if setup.compression:
            ops += data.draw(compressed_writes(cs, size), label="compressed writes")
        ops += data.draw(operations(cs, size), label="qemu-io commands")

        def build(d: Path) -> qi.ImageRef:
            ref = setup.create(d / "img.qcow2", backings)
            qi.qemu_io(ref, *ops)
            return ref

        context = f"{setup}\nqemu-io commands: {ops}"
        check_example(tmp_path_factory.getbasetemp(), build, context, setup, data)

    test.__name__ = f"test_random_ops_{variant}"
    return test


test_random_ops_plain = _test_for("plain")
test_random_ops_backing = _test_for("backing")
test_random_ops_extended_l2 = _test_for("extended_l2")
test_random_ops_compressed = _test_for("compressed")


@SETTINGS
@given(base=CHAIN_BASE, top=CHAIN_TOP, data=st.data())
def test_random_ops_chain(
    base: Setup,
    top: Setup,
    data: Any,
    backings: Backings,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base_ops = data.draw(operations(base.cluster_size, base.size), label="base commands")
    top_ops = data.draw(operations(top.cluster_size, top.size), label="top commands")

    def build(d: Path) -> qi.ImageRef:
        lower = base.create(d / "base.qcow2", backings)
        qi.qemu_io(lower, *base_ops)
        upper = top.create(d / "top.qcow2", backings, backing="base.qcow2")
        qi.qemu_io(upper, *top_ops)
        return upper

    context = f"base {base}: {base_ops}\ntop {top}: {top_ops}"
    check_example(tmp_path_factory.getbasetemp(), build, context, top, data)
