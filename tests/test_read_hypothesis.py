"""Random qemu-io operation sequences, read back through qcow2ovl and judged by QEMU.

Each example makes a fresh small image (variants: plain, over a backing file holding data,
extended L2 with or without a backing file, deflate / zstd compressed clusters written first;
cluster sizes from 512 B to 64 KiB), runs 5-20 random `write -P`, `write -z`, `write -z -u` and
`discard` commands with one qemu-io process, and then
checks that the whole disk read by `Image.read`, random ranges read by `read` / `readinto`, and
`guest_map()` equal `qemu-img convert -O raw` and `qemu-img map --output=json`.

`QCOW2OVL_READ_EXAMPLES` sets the number of examples per variant (default 25).
"""

from __future__ import annotations

import os
import tempfile
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

    def create(self, path: Path, backings: Backings) -> qi.ImageRef:
        opts: dict[str, object] = {"cluster_size": self.cluster_size, "compat": self.compat}
        if self.extended_l2:
            opts["extended_l2"] = True
        if self.compression:
            opts["compression_type"] = self.compression
        if self.backing == "qcow2":
            return qi.create(path, SIZE, opts=opts, backing=backings.qcow2)
        if self.backing == "raw":
            return qi.create(path, SIZE, opts=opts, backing=backings.raw, backing_fmt="raw")
        return qi.create(path, SIZE, opts=opts)


SETUPS: dict[str, st.SearchStrategy[Setup]] = {
    "plain": st.builds(
        Setup,
        cluster_size=st.sampled_from([512, 4096, 65536]),
        extended_l2=st.just(False),
        compat=st.sampled_from(["1.1", "0.10"]),
        backing=st.none(),
    ),
    "backing": st.builds(
        Setup,
        cluster_size=st.sampled_from([512, 4096, 65536]),
        extended_l2=st.just(False),
        compat=st.sampled_from(["1.1", "0.10"]),
        backing=st.sampled_from(["qcow2", "raw"]),
    ),
    "extended_l2": st.builds(
        Setup,
        cluster_size=st.sampled_from([16384, 65536]),
        extended_l2=st.just(True),
        compat=st.just("1.1"),
        backing=st.sampled_from([None, "qcow2", "raw"]),
    ),
    # compressed clusters first (`write -c` only goes to unallocated clusters), then the ops
    "compressed": st.one_of(
        st.builds(
            Setup,
            cluster_size=st.sampled_from([4096, 65536]),
            extended_l2=st.just(False),
            compat=st.just("1.1"),
            backing=st.sampled_from([None, "qcow2", "raw"]),
            compression=st.sampled_from(["zlib", "zstd"]),
        ),
        st.builds(
            Setup,
            cluster_size=st.sampled_from([16384, 65536]),  # extended L2 needs >= 16 KiB
            extended_l2=st.just(True),
            compat=st.just("1.1"),
            backing=st.sampled_from([None, "qcow2", "raw"]),
            compression=st.sampled_from(["zlib", "zstd"]),
        ),
    ),
}


@st.composite
def offsets(draw: Any, cluster_size: int) -> int:
    """Anywhere, or near a subcluster / cluster / L2 boundary or the end."""
    if draw(st.booleans()):
        return int(draw(st.integers(0, SIZE - 1)))
    units = [512, cluster_size // 32 or 512, cluster_size, cluster_size**2 // 8]
    unit = draw(st.sampled_from(units))
    anchor = draw(st.integers(0, SIZE // unit)) * unit
    return int(min(max(anchor + draw(st.integers(-700, 700)), 0), SIZE - 1))


@st.composite
def operations(draw: Any, cluster_size: int) -> list[str]:
    ops = []
    for _ in range(draw(st.integers(5, 20))):
        off = draw(offsets(cluster_size))
        length = draw(
            st.one_of(
                st.integers(1, 4096), st.integers(1, 3 * cluster_size), st.integers(1, 1 * MiB)
            )
        )
        length = min(length, SIZE - off)
        what = draw(st.sampled_from(["write", "zero", "zero_unmap", "discard"]))
        if what == "write":
            ops.append(f"write -P {draw(st.integers(1, 255)):#x} {off} {length}")
        elif what == "zero":
            ops.append(f"write -z {off} {length}")
        elif what == "zero_unmap":
            ops.append(f"write -z -u {off} {length}")
        else:
            ops.append(f"discard {off} {length}")
    return ops


@st.composite
def compressed_writes(draw: Any, cluster_size: int) -> list[str]:
    """`write -c` of 1-8 distinct whole clusters, each with its own pattern."""
    clusters = draw(st.sets(st.integers(0, SIZE // cluster_size - 1), min_size=1, max_size=8))
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
    tmp_root: Path, backings: Backings, setup: Setup, ops: list[str], data: Any
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        d = Path(tmp)
        ref = setup.create(d / "img.qcow2", backings)
        qi.qemu_io(ref, *ops)
        raw = d / "img.raw"
        qi.qemu_img("convert", "-f", "qcow2", "-O", "raw", ref.path, raw)
        want_all = raw.read_bytes()
        context = f"{setup}\nqemu-io commands: {ops}"
        with qcow2ovl.open(ref.path) as img:
            got_all = img.read(0, SIZE)
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
                off = data.draw(offsets(setup.cluster_size), label="read offset")
                n = data.draw(st.integers(0, min(SIZE - off, 3 * setup.cluster_size + 5000)))
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
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(setup=SETUPS[variant], data=st.data())
    def test(
        setup: Setup,
        data: Any,
        backings: Backings,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> None:
        ops = []
        if setup.compression:
            ops += data.draw(compressed_writes(setup.cluster_size), label="compressed writes")
        ops += data.draw(operations(setup.cluster_size), label="qemu-io commands")
        check_example(tmp_path_factory.getbasetemp(), backings, setup, ops, data)

    test.__name__ = f"test_random_ops_{variant}"
    return test


test_random_ops_plain = _test_for("plain")
test_random_ops_backing = _test_for("backing")
test_random_ops_extended_l2 = _test_for("extended_l2")
test_random_ops_compressed = _test_for("compressed")
