"""More image kinds for the guest-data read tests, built by qemu-img / qemu-io.

`qemu_images.KINDS` covers the metadata side; the kinds here add what matters when guest data is
read: backing chains three deep mixing raw and qcow2 (relative names, backing files shorter and
longer than the image, a raw backing file of odd size, a raw backing file whose bytes look like
qcow2, a compressed backing file), extended L2 subcluster writes / zero writes / discards,
deflate and zstd compressed images from `qemu-img convert -c` (also partly overwritten
afterwards, and compressed writes over a backing file), external data files with and without
`data_file_raw` (also overwritten by another program afterwards), preallocation (metadata,
falloc, full), 512 B and 2 MiB clusters, virtual sizes that end inside a cluster or just past an
L2 table, and v2 images with zero writes and discards.

Guest data is mostly random bytes (`qemu-io write -s file`), not constant patterns: a read from
the wrong place of a constant-pattern write would still look right.

Also builders for a deep chain, a plain image over an encrypted one, and broken chains: backing
loops (made with `qemu-img rebase -u`) and missing backing files; and the helpers that compare
qcow2ovl's guest map with qemu-img's.

Nothing here imports qcow2ovl.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import qemu_images as qi

KiB = qi.KiB
MiB = qi.MiB


# ---- writing guest data -------------------------------------------------------------------------


class Ops:
    """A batch of qemu-io commands for one image, run by one qemu-io process.

    `data` writes random bytes (from a source file made here, removed after the run), `pattern`
    a constant byte, `zero` zeroes (`write -z`, with `unmap` `write -z -u`), `discard` discards,
    `compressed` writes random-but-compressible bytes with `write -c` (whole clusters only).
    """

    def __init__(self, directory: Path, seed: int) -> None:
        self.dir = directory
        self.rng = random.Random(seed)
        self.cmds: list[str] = []
        self.sources: list[Path] = []

    def _source(self, data: bytes) -> Path:
        path = self.dir / f"src-{os.getpid()}-{len(self.sources)}-{id(self)}.bin"
        path.write_bytes(data)
        self.sources.append(path)
        return path

    def data(self, offset: int, length: int) -> Ops:
        src = self._source(self.rng.randbytes(length))
        self.cmds.append(f"write -s {src} {offset} {length}")
        return self

    def pattern(self, offset: int, length: int, pattern: int) -> Ops:
        self.cmds.append(f"write -P {pattern:#x} {offset} {length}")
        return self

    def zero(self, offset: int, length: int, *, unmap: bool = False) -> Ops:
        self.cmds.append(f"write -z {'-u ' if unmap else ''}{offset} {length}")
        return self

    def discard(self, offset: int, length: int) -> Ops:
        self.cmds.append(f"discard {offset} {length}")
        return self

    def compressed(self, offset: int, length: int) -> Ops:
        src = self._source(compressible(self.rng, length))
        self.cmds.append(f"write -c -s {src} {offset} {length}")
        return self

    def run(self, image: Path | qi.ImageRef, fmt: str = "qcow2", open_opts: str = "") -> None:
        """Run the commands on `image`; `open_opts` (e.g. "discard-no-unref=on") are extra
        qcow2 driver options, passed with --image-opts."""
        try:
            if not self.cmds:
                return
            path = Path(str(qi.as_ref(image).path))
            if open_opts:
                escaped = str(path).replace(",", ",,")
                qemu_io_args(
                    ["--image-opts", f"driver={fmt},{open_opts},file.filename={escaped}"],
                    *self.cmds,
                )
            elif fmt == "qcow2":
                qi.qemu_io(image, *self.cmds)
            else:
                qemu_io_args(["-f", fmt, str(path)], *self.cmds)
        finally:
            for src in self.sources:
                src.unlink(missing_ok=True)
            self.sources.clear()
            self.cmds.clear()


def qemu_io_args(image_args: list[str], *commands: str) -> str:
    """qemu-io with `image_args` naming the image; fails on any failed command."""
    assert qi.QEMU_IO is not None, "qemu-io is not installed"
    args: list[qi.StrPath] = [qi.QEMU_IO]
    for cmd in commands:
        args += ["-c", cmd]
    args += image_args
    proc = qi.run(args)
    out = proc.stdout + proc.stderr
    for bad in ("failed", "error", "Error", "can't open"):
        if bad in out:
            raise qi.QemuError([str(a) for a in args], proc.returncode, proc.stdout, proc.stderr)
    return out


def compressible(rng: random.Random, length: int) -> bytes:
    """Bytes that compress to about half but are not constant: random nibbles."""
    return rng.randbytes(length).translate(_NIBBLES)


_NIBBLES = bytes(i & 0x0F for i in range(256))


def mixed_raw(path: Path, size: int, seed: int) -> Path:
    """A raw file of `size` bytes holding, per 64 KiB stretch, random (incompressible) bytes,
    compressible bytes, zeros (left as holes) or a constant pattern: the source for the
    compressed images, where QEMU stores incompressible clusters uncompressed."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 64 * KiB):
            n = min(64 * KiB, size - off)
            kind = rng.randrange(5)
            if kind == 0:
                continue  # zeros
            f.seek(off)
            if kind == 1:
                f.write(rng.randbytes(n))
            elif kind == 2:
                f.write(bytes([rng.randrange(1, 256)]) * n)
            else:
                f.write(compressible(rng, n))
    return path


def raw_file(path: Path, size: int, writes: Sequence[tuple[int, int]], seed: int) -> Path:
    """A sparse raw file of `size` bytes with random bytes at `(offset, length)` ranges."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in writes:
            f.seek(off)
            f.write(rng.randbytes(length))
    return path


def convert_from_raw(
    src: Path, dst: Path, *, compress: bool, opts: dict[str, object]
) -> qi.ImageRef:
    args: list[qi.StrPath] = ["convert", "-f", "raw", "-O", "qcow2"]
    if compress:
        args.append("-c")
    if opts:
        args += ["-o", ",".join(f"{k}={qi._opt(v)}" for k, v in opts.items())]
    qi.qemu_img(*args, src, dst)
    return qi.ImageRef(dst)


# ---- the kinds ----------------------------------------------------------------------------------


def _chain3_raw_base(d: Path) -> qi.BuiltImage:
    """raw base (24 MiB, sparse) <- qcow2 middle (40 MiB, absolute backing name, in a
    subdirectory) <- qcow2 top (48 MiB, relative backing name "sub/mid.qcow2").
    Both backing files are shorter than the image above them; writes cross their ends."""
    base = raw_file(
        d / "base.raw",
        24 * MiB,
        [
            (0, 1 * MiB),
            (3 * MiB + 17, 2 * MiB + 5),
            (12 * MiB, 4 * MiB),
            (24 * MiB - 100 * KiB, 100 * KiB),
        ],
        seed=101,
    )
    (d / "sub").mkdir()
    mid = qi.create(d / "sub" / "mid.qcow2", 40 * MiB, backing=base.resolve(), backing_fmt="raw")
    (
        Ops(d, 102)
        .data(1000, 5000)  # partial cluster over base data: COW from the raw file
        .data(24 * MiB - 40 * KiB, 80 * KiB)  # across the base's end
        .zero(12 * MiB + 64 * KiB, 128 * KiB)  # hides base data
        .discard(13 * MiB, 64 * KiB)  # hides base data too (v3 with backing: zero flag)
        .zero(14 * MiB + 3000, 70000, unmap=True)
        .data(30 * MiB + 7, 300 * KiB)
        .pattern(39 * MiB, 1 * MiB, 0x6D)
        .run(mid)
    )
    top = qi.create(d / "top.qcow2", 48 * MiB, backing="sub/mid.qcow2")
    (
        Ops(d, 103)
        .data(100, 200)  # a tiny write into a cluster whose data lies two levels down
        .data(3 * MiB, 64 * KiB)  # exactly one cluster over base data
        .discard(12 * MiB, 64 * KiB)
        .zero(30 * MiB, 64 * KiB)  # over middle data
        .zero(31 * MiB, 64 * KiB, unmap=True)
        .data(40 * MiB - 5000, 10000)  # across the middle's end
        .data(47 * MiB, 1 * MiB)  # the last MiB, beyond every backing file
        .run(top)
    )
    return qi.BuiltImage("chain3_raw_base", top, extra_files=[base, mid.path])


def _chain3_relative(d: Path) -> qi.BuiltImage:
    """qcow2 v2 base (4 KiB clusters, 32 MiB) <- extended-L2 middle (32 KiB clusters, 48 MiB,
    backing "../base/base.qcow2", relative to the middle's own folder) <- 512 B cluster top
    (64 MiB, backing "mid/mid.qcow2")."""
    (d / "base").mkdir()
    (d / "mid").mkdir()
    base = qi.create(
        d / "base" / "base.qcow2", 32 * MiB, opts={"compat": "0.10", "cluster_size": 4096}
    )
    Ops(d, 201).data(0, 2 * MiB).data(5 * MiB + 123, 1 * MiB).data(32 * MiB - 8 * KiB, 8 * KiB).run(
        base
    )
    mid = qi.create(
        d / "mid" / "mid.qcow2",
        48 * MiB,
        opts={"extended_l2": True, "cluster_size": 32 * KiB},
        backing="../base/base.qcow2",
    )
    (
        Ops(d, 202)
        .data(4096, 1024)  # one subcluster
        .data(40 * KiB + 100, 3000)  # inside subclusters of another cluster
        .zero(64 * KiB, 2 * KiB)  # a zero subcluster over base data
        .discard(96 * KiB, 4 * KiB)
        .zero(5 * MiB + 32 * KiB, 40 * KiB, unmap=True)
        .data(32 * MiB - 3 * KiB, 6 * KiB)  # across the base's end
        .run(mid)
    )
    top = qi.create(d / "top.qcow2", 64 * MiB, opts={"cluster_size": 512}, backing="mid/mid.qcow2")
    (
        Ops(d, 203)
        .data(511, 2)  # across a 512 B cluster boundary
        .data(32 * KiB - 700, 1400)  # across an L2 boundary (an L2 covers 32 KiB here)
        .zero(4096, 512)
        .discard(5 * MiB, 4096)
        .data(48 * MiB - 1000, 2000)  # across the middle's end
        .data(64 * MiB - 512, 512)
        .run(top)
    )
    return qi.BuiltImage("chain3_relative", top, extra_files=[base.path, mid.path])


def _raw_backing_qcow2_bytes(d: Path) -> qi.BuiltImage:
    """A raw backing file (backing_fmt=raw) whose bytes are a qcow2 image: it must be read as
    raw, not probed."""
    inner = qi.create(d / "inner.qcow2", 8 * MiB)
    Ops(d, 301).data(0, 100 * KiB).run(inner)
    base = d / "base.raw"
    shutil.copyfile(inner.path, base)
    inner.path.unlink()
    top = qi.create(d / "top.qcow2", 4 * MiB, backing=base.name, backing_fmt="raw")
    Ops(d, 302).data(64 * KiB + 10, 100).run(top)
    return qi.BuiltImage("raw_backing_qcow2_bytes", top, extra_files=[base])


def _backing_raw_odd_size(d: Path) -> qi.BuiltImage:
    """A fully written raw backing file of 5 MiB + 1234 bytes (not a multiple of 512) under an
    8 MiB qcow2: QEMU reads zeros past the raw file's end."""
    size = 5 * MiB + 1234
    base = raw_file(d / "odd.raw", size, [(0, size)], seed=401)
    top = qi.create(d / "top.qcow2", 8 * MiB, backing="odd.raw", backing_fmt="raw")
    Ops(d, 402).data(5 * MiB - 100, 50).data(7 * MiB, 4096).run(top)
    return qi.BuiltImage("backing_raw_odd_size", top, extra_files=[base])


def _extl2_ops(ops: Ops) -> Ops:
    """Subcluster writes, zero writes (with and without unmap) and discards on 64 KiB clusters
    (2 KiB subclusters); some of them on the same clusters."""
    return (
        ops.data(0, 2 * KiB)  # subcluster 0 only
        .data(64 * KiB + 3 * KiB, 1000)  # inside subcluster 1 of cluster 1
        .data(128 * KiB + 1, 10 * KiB)  # unaligned, over several subclusters
        .zero(128 * KiB + 4 * KiB, 2 * KiB)  # a zero subcluster in an allocated cluster
        .zero(256 * KiB, 6 * KiB)  # zero subclusters of an unallocated cluster
        .zero(320 * KiB + 2 * KiB, 4 * KiB, unmap=True)
        .data(384 * KiB, 64 * KiB)
        .discard(384 * KiB + 10 * KiB, 4 * KiB)  # discard subclusters of an allocated cluster
        .discard(384 * KiB + 60 * KiB, 8 * KiB)  # across the cluster's end
        .data(1 * MiB - 1, 2)  # across a cluster boundary
        .pattern(2 * MiB, 1 * MiB, 0x3E)
        .zero(2 * MiB + 100 * KiB, 300 * KiB, unmap=True)
        .discard(2 * MiB + 512 * KiB, 256 * KiB)
        .data(8 * MiB + 60 * KiB, 8 * KiB)  # across an L2 slice boundary region
        .data(16 * MiB - 2 * KiB, 2 * KiB)  # the last subcluster
    )


def _extl2_ops_plain(d: Path) -> qi.BuiltImage:
    ref = qi.create(d / "extl2_ops.qcow2", 16 * MiB, opts={"extended_l2": True})
    _extl2_ops(Ops(d, 501)).run(ref)
    return qi.BuiltImage("extl2_ops", ref)


def _extl2_ops_backing(d: Path) -> qi.BuiltImage:
    """The same operations over a qcow2 backing file full of data (pattern and random)."""
    base = qi.create(d / "base.qcow2", 16 * MiB)
    Ops(d, 511).pattern(0, 16 * MiB, 0x5C).data(64 * KiB, 512 * KiB).data(2 * MiB, 1 * MiB).run(
        base
    )
    ref = qi.create(
        d / "extl2_ops_backing.qcow2", 16 * MiB, opts={"extended_l2": True}, backing="base.qcow2"
    )
    _extl2_ops(Ops(d, 512)).run(ref)
    return qi.BuiltImage("extl2_ops_backing", ref, extra_files=[base.path])


def _extl2_16k_raw_backing(d: Path) -> qi.BuiltImage:
    """Extended L2 with 16 KiB clusters (512 B subclusters) over a shorter raw backing file."""
    base = raw_file(d / "base.raw", 3 * MiB, [(0, 3 * MiB)], seed=521)
    ref = qi.create(
        d / "extl2_16k.qcow2",
        8 * MiB,
        opts={"extended_l2": True, "cluster_size": 16 * KiB},
        backing="base.raw",
        backing_fmt="raw",
    )
    (
        Ops(d, 522)
        .data(512, 512)
        .data(16 * KiB - 100, 200)
        .zero(32 * KiB + 512, 1024)
        .discard(48 * KiB, 512)
        .zero(64 * KiB, 16 * KiB, unmap=True)
        .data(3 * MiB - 700, 1400)  # across the backing file's end
        .zero(3 * MiB + 16 * KiB, 2048)
        .data(8 * MiB - 512, 512)
        .run(ref)
    )
    return qi.BuiltImage("extl2_16k_raw_backing", ref, extra_files=[base])


def _compressed(
    kind: str, opts: dict[str, object], size: int = 12 * MiB, partial: bool = False
) -> qi.Builder:
    """`qemu-img convert -c` of a raw file mixing random, compressible, constant and zero
    stretches. With `partial`, some clusters are then overwritten uncompressed: whole
    clusters, parts of clusters (COW from the compressed cluster), zero writes and discards."""

    def build(d: Path) -> qi.BuiltImage:
        src = mixed_raw(d / "src.raw", size, seed=zlib.crc32(kind.encode()))
        ref = convert_from_raw(src, d / f"{kind}.qcow2", compress=True, opts=opts)
        src.unlink()
        if partial:
            cs = int(str(opts.get("cluster_size", 64 * KiB)))
            (
                Ops(d, 601)
                .data(cs, cs)  # a whole cluster
                .data(3 * cs + 100, 200)  # part of a cluster
                .data(5 * cs - 10, 20)  # across a cluster boundary
                .zero(7 * cs, cs)
                .zero(9 * cs + 1, 100, unmap=True)
                .discard(11 * cs, cs)
                .data(size // 2 - 5, 3 * cs)
                .run(ref)
            )
        return qi.BuiltImage(kind, ref)

    return build


def _compressed_backing(d: Path) -> qi.BuiltImage:
    """Compressed writes (`qemu-io write -c`) into an image over a backing file."""
    base = qi.create(d / "base.qcow2", 16 * MiB)
    Ops(d, 701).data(0, 4 * MiB).pattern(8 * MiB, 4 * MiB, 0x42).run(base)
    top = qi.create(d / "compressed_backing.qcow2", 16 * MiB, backing="base.qcow2")
    (
        Ops(d, 702)
        .compressed(0, 64 * KiB)
        .compressed(1 * MiB, 256 * KiB)
        .compressed(9 * MiB, 64 * KiB)
        .compressed(14 * MiB, 128 * KiB)
        .data(1 * MiB + 100, 50)  # partial overwrite of a compressed cluster
        .run(top)
    )
    return qi.BuiltImage("compressed_backing", top, extra_files=[base.path])


def _data_file(kind: str, raw: bool, opts: dict[str, object], backing: bool = False) -> qi.Builder:
    def build(d: Path) -> qi.BuiltImage:
        extra: list[Path] = []
        backing_name = None
        if backing:
            base = qi.create(d / "base.qcow2", 16 * MiB)
            Ops(d, 801).data(0, 16 * MiB).run(base)
            backing_name = "base.qcow2"
            extra.append(base.path)
        # absolute: QEMU resolves a relative data file name against its working directory
        data = (d / f"{kind}.data").resolve()
        ref = qi.create(
            d / f"{kind}.qcow2",
            16 * MiB,
            opts={"data_file": data, "data_file_raw": raw, **opts},
            backing=backing_name,
        )
        (
            Ops(d, 802)
            .data(0, 64 * KiB)
            .data(100 * KiB + 3, 10000)
            .data(1 * MiB, 1 * MiB)
            .zero(1 * MiB + 64 * KiB, 64 * KiB)
            .zero(1 * MiB + 200 * KiB, 3000, unmap=True)
            .discard(1 * MiB + 512 * KiB, 128 * KiB)
            .zero(4 * MiB, 256 * KiB)
            .data(16 * MiB - 4096, 4096)
            .run(ref)
        )
        extra.append(data)
        return qi.BuiltImage(kind, ref, extra_files=extra)

    return build


def _cluster_512_ops(d: Path) -> qi.BuiltImage:
    """512 B clusters (an L2 table covers 32 KiB): writes, zero writes and discards that cross
    L2 boundaries."""
    ref = qi.create(d / "cluster_512_ops.qcow2", 8 * MiB, opts={"cluster_size": 512})
    (
        Ops(d, 901)
        .data(0, 100 * KiB)
        .data(32 * KiB - 1, 2)
        .zero(64 * KiB - 512, 1024)
        .discard(96 * KiB - 300, 700)
        .zero(1 * MiB + 5, 40 * KiB, unmap=True)
        .data(2 * MiB + 31 * KiB, 3 * KiB)
        .data(8 * MiB - 33 * KiB, 33 * KiB)
        .run(ref)
    )
    return qi.BuiltImage("cluster_512_ops", ref)


def _cluster_2m_backing(d: Path) -> qi.BuiltImage:
    """2 MiB clusters over a 64 KiB-cluster backing file: partial writes copy the rest of each
    2 MiB cluster from the backing file."""
    base = qi.create(d / "base.qcow2", 32 * MiB)
    Ops(d, 1001).data(0, 8 * MiB).pattern(16 * MiB, 16 * MiB, 0x2B).run(base)
    top = qi.create(
        d / "cluster_2m_backing.qcow2",
        32 * MiB,
        opts={"cluster_size": 2 * MiB},
        backing="base.qcow2",
    )
    (
        Ops(d, 1002)
        .data(100, 1000)
        .data(4 * MiB - 10, 20)
        .zero(6 * MiB, 2 * MiB)
        .discard(8 * MiB, 2 * MiB)
        .zero(18 * MiB + 4096, 4096, unmap=True)
        .data(32 * MiB - 1, 1)
        .run(top)
    )
    return qi.BuiltImage("cluster_2m_backing", top, extra_files=[base.path])


def _v2_ops(kind: str, backing: bool) -> qi.Builder:
    """compat=0.10 (no zero flag): zero writes and discards over data and over a backing file."""

    def build(d: Path) -> qi.BuiltImage:
        extra: list[Path] = []
        backing_name = None
        if backing:
            base = qi.create(d / "base.qcow2", 16 * MiB, opts={"compat": "0.10"})
            Ops(d, 1101).data(0, 8 * MiB).run(base)
            backing_name = "base.qcow2"
            extra.append(base.path)
        ref = qi.create(
            d / f"{kind}.qcow2", 16 * MiB, opts={"compat": "0.10"}, backing=backing_name
        )
        (
            Ops(d, 1102)
            .data(0, 256 * KiB)
            .zero(64 * KiB, 64 * KiB)
            .zero(1 * MiB, 64 * KiB)
            .zero(2 * MiB + 10, 100, unmap=True)
            .discard(128 * KiB, 64 * KiB)
            .discard(3 * MiB, 64 * KiB)
            .data(16 * MiB - 70 * KiB, 70 * KiB)
            .run(ref)
        )
        return qi.BuiltImage(kind, ref, extra_files=extra)

    return build


def _backing_larger_odd_end(d: Path) -> qi.BuiltImage:
    """A backing file larger than the image, whose virtual size (8 MiB + 1536) ends inside a
    cluster; writes reach the last byte."""
    base = qi.create(d / "base.qcow2", 16 * MiB)
    Ops(d, 1201).data(0, 16 * MiB).run(base)
    size = 8 * MiB + 1536
    top = qi.create(d / "top.qcow2", size, backing="base.qcow2")
    Ops(d, 1202).data(8 * MiB - 100, 200).data(size - 700, 700).zero(4 * MiB, 64 * KiB).run(top)
    return qi.BuiltImage("backing_larger_odd_end", top, extra_files=[base.path])


def _l2_edge(d: Path) -> qi.BuiltImage:
    """4 KiB clusters (an L2 table covers 2 MiB) and a virtual size one 512 B sector past three
    L2 tables: the last L2 table maps one partial cluster."""
    size = 6 * MiB + 512
    ref = qi.create(d / "l2_edge.qcow2", size, opts={"cluster_size": 4096})
    Ops(d, 1301).data(2 * MiB - 3000, 6000).data(6 * MiB - 1000, 1512).zero(
        4 * MiB - 4096, 8192
    ).run(ref)
    return qi.BuiltImage("l2_edge", ref)


def _chain_compressed_base(d: Path) -> qi.BuiltImage:
    """A zstd-compressed base (from convert -c) under an extended-L2 top with subcluster writes:
    the untouched subclusters still read from the compressed backing clusters."""
    src = mixed_raw(d / "src.raw", 4 * MiB, seed=1401)
    base = convert_from_raw(src, d / "base.qcow2", compress=True, opts={"compression_type": "zstd"})
    src.unlink()
    top = qi.create(d / "top.qcow2", 6 * MiB, opts={"extended_l2": True}, backing="base.qcow2")
    (
        Ops(d, 1402)
        .data(100, 1000)
        .data(64 * KiB + 30 * KiB, 4 * KiB)
        .zero(128 * KiB + 2 * KiB, 2 * KiB)
        .discard(192 * KiB, 64 * KiB)
        .data(4 * MiB - 3 * KiB, 6 * KiB)
        .run(top)
    )
    return qi.BuiltImage("chain_compressed_base", top, extra_files=[base.path])


def _prealloc(kind: str, opts: dict[str, object], size: int = 8 * MiB) -> qi.Builder:
    """Preallocated images (metadata, falloc, full) with writes, zero writes and discards: data
    clusters that were never written, and (metadata) holes qemu-img map reports as zero."""

    def build(d: Path) -> qi.BuiltImage:
        ref = qi.create(d / f"{kind}.qcow2", size, opts=opts)
        (
            Ops(d, 1501)
            .data(100, 5000)
            .data(size * 5 // 8 - 3, 70000)
            .zero(size // 8, 64 * KiB)
            .discard(size // 4, 64 * KiB)
            .zero(size * 3 // 8 + 512, 100 * KiB, unmap=True)
            .run(ref)
        )
        return qi.BuiltImage(kind, ref)

    return build


def _data_file_overwritten(kind: str, raw: bool) -> qi.Builder:
    """An external data file that another program then overwrote with random bytes, all of it
    (grown to the full disk size): what the L2 tables say is unallocated or zero must still
    read as QEMU reads it (zeros), whatever the data file holds there."""

    def build(d: Path) -> qi.BuiltImage:
        data = (d / f"{kind}.data").resolve()
        ref = qi.create(
            d / f"{kind}.qcow2", 8 * MiB, opts={"data_file": data, "data_file_raw": raw}
        )
        (
            Ops(d, 1601)
            .data(0, 64 * KiB)
            .data(1 * MiB + 5, 100 * KiB)
            .zero(1 * MiB + 64 * KiB, 64 * KiB)
            .zero(2 * MiB, 64 * KiB, unmap=True)
            .discard(3 * MiB, 128 * KiB)
            .data(8 * MiB - 4096, 4096)
            .run(ref)
        )
        raw_file_noise = random.Random(1602).randbytes(8 * MiB)
        with open(data, "r+b") as f:
            f.write(raw_file_noise)
        return qi.BuiltImage(kind, ref, extra_files=[data])

    return build


def _discard_no_unref(kind: str, opts: dict[str, object]) -> qi.Builder:
    """Discards and unmapping zero writes with `discard-no-unref=on`: the clusters keep their
    host offsets (zero clusters with an allocation; with extended L2, subclusters unallocated in
    an allocated cluster, which read from the backing file)."""

    def build(d: Path) -> qi.BuiltImage:
        base = qi.create(d / "base.qcow2", 4 * MiB)
        Ops(d, 1701).data(0, 4 * MiB).run(base)
        ref = qi.create(d / f"{kind}.qcow2", 4 * MiB, opts=opts, backing="base.qcow2")
        (
            Ops(d, 1702)
            .data(0, 1 * MiB)
            .discard(0, 128 * KiB)
            .zero(256 * KiB, 64 * KiB, unmap=True)
            .discard(512 * KiB + 2 * KiB, 100 * KiB)
            .data(2 * MiB, 256 * KiB)
            .discard(2 * MiB + 64 * KiB, 64 * KiB)
            .run(ref, open_opts="discard-no-unref=on")
        )
        return qi.BuiltImage(kind, ref, extra_files=[base.path])

    return build


EXTRA_KINDS: dict[str, qi.Builder] = {
    "chain3_raw_base": _chain3_raw_base,
    "chain3_relative": _chain3_relative,
    "raw_backing_qcow2_bytes": _raw_backing_qcow2_bytes,
    "backing_raw_odd_size": _backing_raw_odd_size,
    "extl2_ops": _extl2_ops_plain,
    "extl2_ops_backing": _extl2_ops_backing,
    "extl2_16k_raw_backing": _extl2_16k_raw_backing,
    "convert_zlib": _compressed("convert_zlib", {"compression_type": "zlib"}),
    "convert_zstd": _compressed("convert_zstd", {"compression_type": "zstd"}),
    "convert_zlib_partial": _compressed(
        "convert_zlib_partial", {"compression_type": "zlib"}, partial=True
    ),
    "convert_zstd_partial": _compressed(
        "convert_zstd_partial", {"compression_type": "zstd"}, partial=True
    ),
    "convert_zstd_extl2_partial": _compressed(
        "convert_zstd_extl2_partial",
        {"compression_type": "zstd", "extended_l2": True},
        partial=True,
    ),
    "convert_zlib_512": _compressed(
        "convert_zlib_512",
        {"compression_type": "zlib", "cluster_size": 512},
        size=2 * MiB,
        partial=True,
    ),
    "convert_zstd_2m": _compressed(
        "convert_zstd_2m",
        {"compression_type": "zstd", "cluster_size": 2 * MiB},
        size=24 * MiB,
        partial=True,
    ),
    "convert_v2": _compressed("convert_v2", {"compat": "0.10"}, partial=True),
    "compressed_backing": _compressed_backing,
    "data_file_ops": _data_file("data_file_ops", raw=False, opts={}),
    "data_file_raw_ops": _data_file("data_file_raw_ops", raw=True, opts={}),
    "data_file_extl2": _data_file("data_file_extl2", raw=False, opts={"extended_l2": True}),
    "data_file_backing": _data_file("data_file_backing", raw=False, opts={}, backing=True),
    "cluster_512_ops": _cluster_512_ops,
    "cluster_2m_backing": _cluster_2m_backing,
    "v2_ops": _v2_ops("v2_ops", backing=False),
    "v2_backing_ops": _v2_ops("v2_backing_ops", backing=True),
    "backing_larger_odd_end": _backing_larger_odd_end,
    "l2_edge": _l2_edge,
    "chain_compressed_base": _chain_compressed_base,
    "data_file_overwritten": _data_file_overwritten("data_file_overwritten", raw=False),
    "data_file_raw_overwritten": _data_file_overwritten("data_file_raw_overwritten", raw=True),
    "discard_no_unref": _discard_no_unref("discard_no_unref", {}),
    "discard_no_unref_extl2": _discard_no_unref("discard_no_unref_extl2", {"extended_l2": True}),
    "prealloc_falloc": _prealloc("prealloc_falloc", {"preallocation": "falloc"}),
    "prealloc_full": _prealloc("prealloc_full", {"preallocation": "full"}),
    "prealloc_metadata_extl2": _prealloc(
        "prealloc_metadata_extl2", {"preallocation": "metadata", "extended_l2": True}
    ),
    "prealloc_metadata_512": _prealloc(
        "prealloc_metadata_512", {"preallocation": "metadata", "cluster_size": 512}, size=2 * MiB
    ),
}


def build_read_image(kind: str, directory: qi.StrPath) -> qi.BuiltImage:
    """A fresh image of extra `kind` in `directory/kind`."""
    d = Path(directory) / kind
    d.mkdir(parents=True, exist_ok=True)
    return EXTRA_KINDS[kind](d)


def build_deep_chain(d: Path, depth: int) -> Path:
    """`depth` qcow2 images each over the one before (relative names), each writing its own
    512 bytes at a different place plus one common place. Returns the top."""
    prev: str | None = None
    for i in range(depth):
        name = f"l{i:04d}.qcow2"
        ref = qi.create(d / name, 4 * MiB, backing=prev)
        qi.qemu_io(
            ref,
            f"write -P {i % 255 + 1:#x} {i * 4096 % (4 * MiB)} 512",
            f"write -P {i % 251 + 1:#x} 1M 100",
        )
        prev = name
    return d / str(prev)


def build_plain_over_encrypted(d: Path) -> tuple[Path, str]:
    """A plain qcow2 top over an AES-encrypted qcow2 base (data in its first MiB; the top writes
    64 KiB at 512 KiB). Returns the top and the --image-opts string that lets QEMU read the
    chain (the base's secret). AES rather than LUKS: LUKS's key derivation costs seconds at
    every open."""
    base = qi.create(
        d / "aes-base.qcow2",
        4 * MiB,
        opts={"encrypt.format": "aes", "encrypt.key-secret": qi.SECRET_ID},
        secret=True,
    )
    qi.write(base, [(0, 1 * MiB, 0x44)])
    top = qi.create(d / "top.qcow2", 4 * MiB, backing=base.path.name)
    escaped = str(top.path).replace(",", ",,")
    opts = f"driver=qcow2,file.filename={escaped},backing.encrypt.key-secret={qi.SECRET_ID}"
    assert qi.QEMU_IO is not None
    qi.run(
        [qi.QEMU_IO, "--object", qi.SECRET_OBJECT, "--image-opts", opts]
        + ["-c", "write -s /dev/urandom 512k 64k"]
    )
    return top.path, opts


# ---- broken chains ------------------------------------------------------------------------------


def build_loop(d: Path) -> Path:
    """a.qcow2 -> b.qcow2 -> a.qcow2 (rewired with `qemu-img rebase -u`). Returns a.qcow2."""
    a = qi.create(d / "a.qcow2", 4 * MiB)
    b = qi.create(d / "b.qcow2", 4 * MiB, backing="a.qcow2")
    qi.qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a.path)
    assert b.path.exists()
    return a.path


def build_self_loop(d: Path) -> Path:
    """self.qcow2 -> self.qcow2."""
    a = qi.create(d / "self.qcow2", 4 * MiB)
    qi.qemu_img("rebase", "-u", "-f", "qcow2", "-b", "self.qcow2", "-F", "qcow2", a.path)
    return a.path


def build_long_loop(d: Path) -> Path:
    """top -> mid -> base -> mid: the loop starts below the top."""
    base = qi.create(d / "base.qcow2", 4 * MiB)
    qi.create(d / "mid.qcow2", 4 * MiB, backing="base.qcow2")
    top = qi.create(d / "top.qcow2", 4 * MiB, backing="mid.qcow2")
    qi.qemu_img("rebase", "-u", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", base.path)
    return top.path


def build_missing_backing(d: Path) -> Path:
    """top.qcow2 whose backing file "gone.qcow2" was deleted."""
    base = qi.create(d / "gone.qcow2", 4 * MiB)
    top = qi.create(d / "top.qcow2", 4 * MiB, backing="gone.qcow2")
    base.path.unlink()
    return top.path


def build_missing_deeper(d: Path) -> Path:
    """top -> mid -> (deleted) base: the missing file is two levels down."""
    base = qi.create(d / "base.qcow2", 4 * MiB)
    qi.create(d / "mid.qcow2", 4 * MiB, backing="base.qcow2")
    top = qi.create(d / "top.qcow2", 4 * MiB, backing="mid.qcow2")
    base.path.unlink()
    return top.path


# ---- comparing with QEMU ------------------------------------------------------------------------

GUEST_EXTENT_FIELDS = (
    "start",
    "length",
    "depth",
    "present",
    "zero",
    "data",
    "compressed",
    "offset",
)


def extent_dict(extent: Any) -> dict[str, Any]:
    """A GuestExtent as qemu-img map's JSON object (`offset` left out when None)."""
    if dataclasses.is_dataclass(extent) and not isinstance(extent, type):
        fields = dataclasses.asdict(extent)
        d = {name: fields[name] for name in GUEST_EXTENT_FIELDS}
    else:
        d = {name: getattr(extent, name) for name in GUEST_EXTENT_FIELDS}
    if d["offset"] is None:
        del d["offset"]
    return d


def first_diff(got: bytes | bytearray | memoryview, want: bytes) -> int:
    n = min(len(got), len(want))
    for i in range(0, n, 4096):
        if got[i : i + 4096] != want[i : i + 4096]:
            for j in range(i, min(i + 4096, n)):
                if got[j] != want[j]:
                    return j
    return n


def describe_map_diff(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    lines = [f"{len(got)} extents, qemu-img map has {len(want)}; first difference at #{i}:"]
    for k in range(max(0, i - 1), min(max(len(got), len(want)), i + 3)):
        lines.append(f"  qcow2ovl #{k}: {got[k] if k < len(got) else '-'}")
        lines.append(f"  qemu-img #{k}: {want[k] if k < len(want) else '-'}")
    return "\n".join(lines)
