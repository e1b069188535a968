"""Image factory for the QEMU-oracle tests: build qcow2 images with qemu-img / qemu-io.

Every image kind the scanner must handle is built here by QEMU itself, so the tests compare
qcow2ovl against images that the reference implementation wrote. Images are small (virtual
sizes ≤ 256 MiB, sparse) and each kind is built once per test process (see `get_image`).

Nothing here imports qcow2ovl.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

StrPath = Union[str, Path]

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
QEMU_NBD = shutil.which("qemu-nbd")
HAVE_QEMU = QEMU_IMG is not None and QEMU_IO is not None

SECRET_ID = "sec0"
SECRET_DATA = "123456"
SECRET_OBJECT = f"secret,id={SECRET_ID},data={SECRET_DATA}"

KiB = 1024
MiB = 1024 * KiB


class QemuError(AssertionError):
    """A QEMU tool failed; the message carries the command line, exit code and output."""

    def __init__(self, args: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.args_list = list(args)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command failed (exit {returncode}): {' '.join(args)}\n"
            f"--- stdout ---\n{stdout.strip()}\n--- stderr ---\n{stderr.strip()}"
        )


def run(
    args: Sequence[StrPath], *, ok: Iterable[int] = (0,), timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command; raise `QemuError` (an AssertionError) unless its exit code is in `ok`."""
    argv = [str(a) for a in args]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if proc.returncode not in tuple(ok):
        raise QemuError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


# ---- addressing an image (plain file or LUKS with a secret) ---------------------------------


@dataclass(frozen=True)
class ImageRef:
    """How QEMU tools must name an image: a path, plus the LUKS secret when encrypted."""

    path: Path
    secret: bool = False

    def qemu_img_args(self) -> list[str]:
        """Arguments naming the image for qemu-img subcommands that accept --image-opts."""
        if self.secret:
            return ["--object", SECRET_OBJECT, "--image-opts", self.image_opts()]
        return ["-f", "qcow2", str(self.path)]

    def qemu_io_args(self) -> list[str]:
        if self.secret:
            return ["--object", SECRET_OBJECT, "--image-opts", self.image_opts()]
        return ["-f", "qcow2", str(self.path)]

    def image_opts(self) -> str:
        escaped = str(self.path).replace(",", ",,")
        return f"driver=qcow2,file.filename={escaped},encrypt.key-secret={SECRET_ID}"


def as_ref(image: StrPath | ImageRef) -> ImageRef:
    return image if isinstance(image, ImageRef) else ImageRef(Path(image))


# ---- qemu-img / qemu-io wrappers ------------------------------------------------------------


def qemu_img(*args: StrPath, ok: Iterable[int] = (0,)) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None, "qemu-img is not installed"
    return run([QEMU_IMG, *args], ok=ok)


def create(
    path: StrPath,
    size: int,
    *,
    opts: dict[str, object] | None = None,
    backing: StrPath | None = None,
    backing_fmt: str = "qcow2",
    secret: bool = False,
) -> ImageRef:
    """`qemu-img create -f qcow2 [-o opts] [-b backing -F fmt] path size`."""
    args: list[StrPath] = ["create", "-q", "-f", "qcow2"]
    if secret:
        args += ["--object", SECRET_OBJECT]
    if opts:
        args += ["-o", ",".join(f"{k}={_opt(v)}" for k, v in opts.items())]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt]
    args += [path, str(size)]
    qemu_img(*args)
    return ImageRef(Path(path), secret=secret)


def _opt(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def io_command(kind: str, offset: int, length: int, pattern: int = 0) -> str:
    """The qemu-io command for a guest operation: ``write`` (of *pattern*), ``zero``,
    ``unmap`` (zero, unmapping) or ``discard``."""
    head = {
        "write": f"write -P {pattern:#x}",
        "zero": "write -z",
        "unmap": "write -z -u",
        "discard": "discard",
    }[kind]
    return f"{head} {offset} {length}"


def qemu_io(image: StrPath | ImageRef, *commands: str, ok: Iterable[int] = (0,)) -> str:
    """Run qemu-io commands (`-c` each) on an image; qemu-io exits 0 even when a command fails,
    so the output is also checked for the usual failure words."""
    assert QEMU_IO is not None, "qemu-io is not installed"
    ref = as_ref(image)
    args: list[StrPath] = [QEMU_IO]
    for cmd in commands:
        args += ["-c", cmd]
    args += ref.qemu_io_args()
    proc = run(args, ok=ok)
    out = proc.stdout + proc.stderr
    for bad in ("failed", "error", "Error", "can't open"):
        if bad in out and "abort" not in commands:
            raise QemuError([str(a) for a in args], proc.returncode, proc.stdout, proc.stderr)
    return out


def write(image: StrPath | ImageRef, writes: Iterable[tuple[int, int, int]]) -> None:
    """Write `(offset, length, pattern byte)` ranges with one qemu-io process."""
    cmds = [f"write -P {pattern:#x} {offset} {length}" for offset, length, pattern in writes]
    if cmds:
        qemu_io(image, *cmds)


def snapshot_create(image: StrPath, name: str) -> None:
    qemu_img("snapshot", "-f", "qcow2", "-c", name, image)


def bitmap_add(
    image: StrPath, name: str, granularity: int | None = None, *, disabled: bool = False
) -> None:
    args: list[StrPath] = ["bitmap", "-f", "qcow2", "--add"]
    if granularity is not None:
        args += ["-g", str(granularity)]
    if disabled:
        args += ["--disable"]
    qemu_img(*args, image, name)


def qemu_dirty(image: StrPath, name: str) -> list[tuple[int, int]]:
    """The dirty ranges of bitmap *name* as QEMU sees them, merged: `qemu-nbd -B NAME` exports
    the bitmap as the `qemu:dirty-bitmap:NAME` context, and `qemu-img map` over NBD with
    `x-dirty-bitmap` reports dirty ranges as `"data": false`."""
    assert QEMU_NBD is not None, "qemu-nbd is not installed"
    with tempfile.TemporaryDirectory(prefix="qcow2ovl-nbd-") as d:
        sock = os.path.join(d, "sock")
        server = subprocess.Popen(
            [QEMU_NBD, "-r", "-f", "qcow2", "-B", name, "-k", sock, "-t", str(image)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            for _ in range(1000):
                if os.path.exists(sock) or server.poll() is not None:
                    break
                time.sleep(0.01)
            if server.poll() is not None:
                raise QemuError(
                    [QEMU_NBD],
                    server.returncode,
                    "",
                    server.stderr.read().decode() if server.stderr else "",
                )
            opts = (
                f"driver=nbd,server.type=unix,server.path={sock},"
                f"x-dirty-bitmap=qemu:dirty-bitmap:{name}"
            )
            out = qemu_img("map", "--output=json", "--image-opts", opts).stdout
        finally:
            server.kill()
            server.wait()
            if server.stderr:
                server.stderr.close()
    runs: list[tuple[int, int]] = []
    for e in json.loads(out):
        if e["data"]:
            continue
        if runs and sum(runs[-1]) == e["start"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"])
        else:
            runs.append((e["start"], e["length"]))
    return runs


def convert(
    src: StrPath, dst: StrPath, *, compress: bool = False, opts: dict[str, object] | None = None
) -> ImageRef:
    """`qemu-img convert [-c] -O qcow2 [-o opts] src dst`."""
    args: list[StrPath] = ["convert", "-f", "qcow2", "-O", "qcow2"]
    if compress:
        args.append("-c")
    if opts:
        args += ["-o", ",".join(f"{k}={_opt(v)}" for k, v in opts.items())]
    qemu_img(*args, src, dst)
    return ImageRef(Path(dst))


def qemu_info(image: StrPath | ImageRef) -> dict[str, Any]:
    """`qemu-img info --output=json` (works on LUKS images without the secret)."""
    ref = as_ref(image)
    out = qemu_img("info", "--output=json", "-f", "qcow2", ref.path).stdout
    return dict(json.loads(out))


def qemu_map(image: StrPath | ImageRef, force_share: bool = False) -> list[dict[str, Any]]:
    """`qemu-img map --output=json`: guest ranges with depth, data/zero flags, host offsets
    (with `-U` for *force_share*, beside a qcow2ovl writer that flushed)."""
    ref = as_ref(image)
    shared = ["-U"] if force_share else []
    out = qemu_img("map", "--output=json", *shared, *ref.qemu_img_args()).stdout
    return list(json.loads(out))


def qemu_check(image: StrPath | ImageRef, force_share: bool = False) -> dict[str, Any]:
    """`qemu-img check --output=json`. Exit 2 (corruptions) and 3 (leaks) still return the
    report; look at `check-errors`, `corruptions` and `leaks` keys. *force_share* (`-U`) checks
    an image that a qcow2ovl handle still has open for writing (flush it first)."""
    ref = as_ref(image)
    shared = ["-U"] if force_share else []
    proc = qemu_img("check", "--output=json", *shared, *ref.qemu_img_args(), ok=(0, 2, 3))
    report = dict(json.loads(proc.stdout))
    report["_exit"] = proc.returncode
    return report


def check_is_clean(report: dict[str, Any]) -> bool:
    return (
        report.get("_exit", 0) == 0
        and report.get("check-errors", 0) == 0
        and report.get("corruptions", 0) == 0
        and report.get("leaks", 0) == 0
    )


def qemu_open_error(path: StrPath) -> str | None:
    """The error QEMU prints when opening `path` as qcow2 (`qemu-img info -f qcow2`), or None
    when QEMU opens it fine. The 'qemu-img: Could not open ...: ' prefix is stripped."""
    proc = qemu_img("info", "-f", "qcow2", path, ok=(0, 1))
    if proc.returncode == 0:
        return None
    msg = proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else ""
    marker = f"Could not open '{path}': "
    return msg.split(marker, 1)[1] if marker in msg else msg


def qemu_snapshot_load_error(path: StrPath, snapshot: str) -> str | None:
    """The error QEMU gives when loading internal snapshot `snapshot` (via convert -l), or None."""
    with tempfile.TemporaryDirectory(prefix="qcow2ovl-snapload-") as tmp:
        proc = qemu_img(
            "convert",
            "-f",
            "qcow2",
            "-l",
            f"snapshot.name={snapshot}",
            "-O",
            "raw",
            path,
            Path(tmp) / "out.raw",
            ok=(0, 1),
        )
    if proc.returncode == 0:
        return None
    msg = proc.stderr.strip().splitlines()[0]
    return msg.removeprefix("qemu-img: ")


# ---- bytes on disk ----------------------------------------------------------------------------


def allocated_clusters(path: StrPath, cluster: int = 64 * 1024) -> set[int]:
    """The clusters of `path` that hold data by the file system's holes (SEEK_DATA): which
    space the file really holds. (`st_blocks` is no measure to compare: it varies by a block
    between two files written alike.)"""
    clusters: set[int] = set()
    with open(path, "rb") as f:
        fd, at, size = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole follows
                break
            at = os.lseek(fd, start, os.SEEK_HOLE)
            clusters.update(range(start // cluster, (at - 1) // cluster + 1))
    return clusters


def sha256_file(path: StrPath) -> str:
    """sha256 of a file's bytes (to prove an open/close left the image untouched)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def poke(path: StrPath, offset: int, fmt: str, *values: object) -> None:
    """`struct.pack_into(fmt, file, offset, *values)` on a file, in place."""
    data = struct.pack(fmt, *values)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def peek(path: StrPath, offset: int, fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(size))


# ---- image kinds ------------------------------------------------------------------------------


@dataclass
class BuiltImage:
    """An image a kind builder made, and what the tests need to know about it."""

    kind: str
    ref: ImageRef
    # qemu-img check is expected clean (no leaks, no corruptions).
    clean: bool = True
    # other files the image needs (backing file, external data file)
    extra_files: list[Path] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.ref.path


def varied_writes(size: int, pattern: int = 0xAB) -> list[tuple[int, int, int]]:
    """Writes in varied places: the start, an unaligned small write, one straddling the middle,
    one near the end. Distinct patterns keep compression from folding clusters together."""
    return [
        (0, 64 * KiB, pattern),
        (5 * MiB + 1536, 3 * KiB, (pattern + 1) & 0xFF),
        (size // 2 - 32 * KiB, 128 * KiB, (pattern + 2) & 0xFF),
        (size - 64 * KiB, 64 * KiB, (pattern + 3) & 0xFF),
    ]


SIZE = 64 * MiB

Builder = Callable[[Path], BuiltImage]


def _plain(
    kind: str,
    opts: dict[str, object],
    size: int = SIZE,
    extra: Sequence[tuple[int, int, int]] = (),
) -> Builder:
    def build(d: Path) -> BuiltImage:
        ref = create(d / f"{kind}.qcow2", size, opts=opts)
        write(ref, varied_writes(size) + list(extra))
        return BuiltImage(kind, ref)

    return build


def _build_compressed(kind: str, opts: dict[str, object]) -> Builder:
    def build(d: Path) -> BuiltImage:
        src = create(d / f"{kind}-src.qcow2", SIZE)
        write(src, varied_writes(SIZE) + [(20 * MiB, 1 * MiB, 0x5A)])
        dst = convert(src.path, d / f"{kind}.qcow2", compress=True, opts=opts)
        # a plain (uncompressed) write after conversion mixes both kinds of clusters
        write(dst, [(40 * MiB, 64 * KiB, 0x77)])
        return BuiltImage(kind, dst)

    return build


def _build_backing(d: Path) -> BuiltImage:
    base = create(d / "backing-base.qcow2", SIZE)
    write(base, varied_writes(SIZE, 0x10) + [(30 * MiB, 1 * MiB, 0x20)])
    # a relative backing name, as stored in the header
    top = create(d / "backing.qcow2", SIZE, backing="backing-base.qcow2")
    write(top, [(0, 4 * KiB, 0x30), (30 * MiB + 512 * KiB, 1 * MiB, 0x31)])
    return BuiltImage("backing", top, extra_files=[base.path])


def _build_data_file(kind: str, raw: bool) -> Builder:
    def build(d: Path) -> BuiltImage:
        # QEMU resolves a relative data file name against its working directory (not the
        # image's directory, unlike backing files), so store an absolute name.
        data = (d / f"{kind}.data").resolve()
        ref = create(d / f"{kind}.qcow2", SIZE, opts={"data_file": data, "data_file_raw": raw})
        write(ref, varied_writes(SIZE))
        return BuiltImage(kind, ref, extra_files=[data])

    return build


def _build_luks(kind: str, opts: dict[str, object]) -> Builder:
    def build(d: Path) -> BuiltImage:
        all_opts: dict[str, object] = {
            "encrypt.format": "luks",
            "encrypt.key-secret": SECRET_ID,
            "encrypt.iter-time": 10,
            **opts,
        }
        ref = create(d / f"{kind}.qcow2", SIZE, opts=all_opts, secret=True)
        write(ref, varied_writes(SIZE))
        return BuiltImage(kind, ref)

    return build


def _build_bitmaps(d: Path) -> BuiltImage:
    path = d / "bitmaps.qcow2"
    ref = create(path, SIZE, opts={"cluster_size": 4096})
    write(ref, [(0, 64 * KiB, 0x01)])
    bitmap_add(path, "b0", granularity=512)
    # written while b0 exists: b0 gets dirty bits, so its table has non-zero entries
    write(ref, [(1 * MiB, 64 * KiB, 0x02), (33 * MiB, 8 * KiB, 0x03), (SIZE - 4096, 4096, 0x04)])
    bitmap_add(path, "b1")
    return BuiltImage("bitmaps", ref)


def _build_snapshots(
    kind: str, opts: dict[str, object], count: int = 3, size: int = 2 * 1024 * MiB
) -> Builder:
    """Snapshots with writes in between. The default 2 GiB (sparse) spans several L2 tables even
    with 64 KiB clusters, so some L2 tables stay shared with the snapshots and some diverge."""

    def build(d: Path) -> BuiltImage:
        path = d / f"{kind}.qcow2"
        ref = create(path, size, opts=opts)
        write(ref, varied_writes(size))
        for i in range(count):
            snapshot_create(path, f"snap-{i}")
            # rewrite one old place (COW of a shared L2) and touch a new L2 range
            write(
                ref,
                [(i * 4 * KiB, 4 * KiB, 0x40 + i), ((10 + 7 * i) % 60 * MiB, 64 * KiB, 0x50 + i)],
            )
        return BuiltImage(kind, ref)

    return build


def _build_prealloc(d: Path) -> BuiltImage:
    ref = create(d / "prealloc.qcow2", 32 * MiB, opts={"preallocation": "metadata"})
    write(ref, [(0, 64 * KiB, 0x61), (17 * MiB, 4 * KiB, 0x62)])
    return BuiltImage("prealloc_metadata", ref)


def _build_dirty(d: Path) -> BuiltImage:
    """lazy_refcounts=on and qemu-io killed by `abort`: the dirty bit stays set and refcounts of
    the new clusters were never written (check reports corruptions until repaired)."""
    ref = create(d / "dirty.qcow2", SIZE, opts={"lazy_refcounts": True})
    qemu_io(ref, "write -P 0x71 0 64k", "write -P 0x72 10M 64k", "abort", ok=(0, -6, 134))
    return BuiltImage("dirty_lazy", ref, clean=False)


def _build_aes(d: Path) -> BuiltImage:
    ref = create(
        d / "aes.qcow2",
        SIZE,
        opts={"encrypt.format": "aes", "encrypt.key-secret": SECRET_ID},
        secret=True,
    )
    write(ref, varied_writes(SIZE))
    return BuiltImage("aes", ref)


def _build_history(d: Path) -> BuiltImage:
    """4 KiB clusters with a history: snapshots made and one deleted, bitmaps added and one
    removed, so freed snapshot tables, L1 copies and bitmap tables lie around as free clusters."""
    path = d / "history.qcow2"
    ref = create(path, SIZE, opts={"cluster_size": 4096})
    write(ref, varied_writes(SIZE))
    bitmap_add(path, "keep", granularity=4096)
    bitmap_add(path, "gone")
    for i in range(3):
        snapshot_create(path, f"s{i}")
        write(ref, [(i * 2 * MiB, 64 * KiB, 0x90 + i), (40 * MiB + i * 4096, 4096, 0xA0 + i)])
    qemu_img("snapshot", "-f", "qcow2", "-d", "s1", path)
    qemu_img("bitmap", "-f", "qcow2", "--remove", path, "gone")
    write(ref, [(50 * MiB, 64 * KiB, 0xB0)])
    return BuiltImage("history", ref)


def _build_amended(d: Path) -> BuiltImage:
    """Made as v2 with a snapshot, then `qemu-img amend` to v3 and to 4-bit refcounts (which
    rewrites the refcount structures elsewhere)."""
    path = d / "amended.qcow2"
    ref = create(path, SIZE, opts={"compat": "0.10"})
    write(ref, varied_writes(SIZE))
    snapshot_create(path, "before-amend")
    write(ref, [(0, 4096, 0x11)])
    qemu_img("amend", "-f", "qcow2", "-o", "compat=1.1", path)
    qemu_img("amend", "-f", "qcow2", "-o", "refcount_bits=4", path)
    write(ref, [(3 * MiB, 64 * KiB, 0x12)])
    return BuiltImage("amended", ref)


def _build_resized(d: Path) -> BuiltImage:
    """Grown from 64 MiB to 8 GiB after writing, which moves the L1 table."""
    path = d / "resized.qcow2"
    ref = create(path, SIZE)
    write(ref, varied_writes(SIZE))
    qemu_img("resize", "-f", "qcow2", path, str(8 * 1024 * MiB))
    write(ref, [(7 * 1024 * MiB, 64 * KiB, 0x13)])
    return BuiltImage("resized", ref)


def _build_huge(d: Path) -> BuiltImage:
    """5 TiB virtual (sparse; a few hundred KiB on disk): the L1 spans two 64 KiB clusters."""
    size = 5 * 1024 * 1024 * MiB
    ref = create(d / "huge.qcow2", size)
    write(ref, [(0, 64 * KiB, 0x14), (4600 * 1024 * MiB, 64 * KiB, 0x15), (size - 4096, 4096, 1)])
    return BuiltImage("huge_virtual", ref)


def _build_zero_discard(d: Path) -> BuiltImage:
    """Zero clusters (with and without an allocation) and discards: L2 tables whose entries are
    zero flags or nothing, which qemu-img map shows as present zero ranges."""
    ref = create(d / "zero_discard.qcow2", SIZE)
    qemu_io(
        ref,
        "write -P 0x21 0 1M",
        "discard 0 512k",
        "write -z 10M 128k",
        "write -z -u 20M 64k",
        "write -P 0x22 30M 64k",
        "discard 30M 64k",
        "write -P 0x23 40M 64k",
        "write -z 40M 64k",
    )
    return BuiltImage("zero_discard", ref)


KINDS: dict[str, Builder] = {
    "v2": _plain("v2", {"compat": "0.10"}),
    "v3": _plain("v3", {"compat": "1.1"}),
    "cluster_512": _plain("cluster_512", {"cluster_size": 512}),
    "cluster_4k": _plain("cluster_4k", {"cluster_size": 4096}),
    "cluster_64k": _plain("cluster_64k", {"cluster_size": 65536}),
    "cluster_2m": _plain("cluster_2m", {"cluster_size": 2 * MiB}, size=256 * MiB),
    "refcount_1": _plain("refcount_1", {"refcount_bits": 1}),
    "refcount_16": _plain("refcount_16", {"refcount_bits": 16}),
    "refcount_64": _plain("refcount_64", {"refcount_bits": 64}),
    # 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters (32 KiB),
    # one reftable cluster 2 MiB of file; with 3 MiB more data the reftable spans clusters.
    # The L1 spans clusters too (64 MiB / 32 KiB per L2 = 2048 entries).
    "refcount_64_cluster_512": _plain(
        "refcount_64_cluster_512",
        {"cluster_size": 512, "refcount_bits": 64},
        extra=[(8 * MiB, 3 * MiB, 0x3C)],
    ),
    "refcount_2_cluster_512": _plain(
        "refcount_2_cluster_512", {"cluster_size": 512, "refcount_bits": 2}
    ),
    "extended_l2": _plain("extended_l2", {"extended_l2": True}),
    "extended_l2_32k": _plain("extended_l2_32k", {"extended_l2": True, "cluster_size": 32 * KiB}),
    "lazy_refcounts": _plain("lazy_refcounts", {"lazy_refcounts": True}),
    "compressed": _build_compressed("compressed", {}),
    "compressed_zstd": _build_compressed("compressed_zstd", {"compression_type": "zstd"}),
    "compressed_4k": _build_compressed("compressed_4k", {"cluster_size": 4096}),
    "backing": _build_backing,
    "data_file": _build_data_file("data_file", raw=False),
    "data_file_raw": _build_data_file("data_file_raw", raw=True),
    "luks": _build_luks("luks", {}),
    "luks_cluster_512": _build_luks("luks_cluster_512", {"cluster_size": 512}),
    "aes": _build_aes,
    "bitmaps": _build_bitmaps,
    "snapshots": _build_snapshots("snapshots", {}),
    "snapshots_v2": _build_snapshots("snapshots_v2", {"compat": "0.10"}),
    # snapshot table spans several 512-byte clusters
    "snapshots_cluster_512": _build_snapshots(
        "snapshots_cluster_512", {"cluster_size": 512}, count=9, size=SIZE
    ),
    "snapshots_extended_l2": _build_snapshots("snapshots_extended_l2", {"extended_l2": True}),
    "prealloc_metadata": _build_prealloc,
    "dirty_lazy": _build_dirty,
    "history": _build_history,
    "amended": _build_amended,
    "resized": _build_resized,
    "huge_virtual": _build_huge,
    "zero_discard": _build_zero_discard,
}

# Kinds whose images carry facts qcow2ovl tests care about beyond the defaults.
ENCRYPTED_KINDS = frozenset({"luks", "luks_cluster_512", "aes"})


class _ImageCache:
    """Builds each kind once per process into a private temporary directory."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._built: dict[str, BuiltImage] = {}

    def directory(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="qcow2ovl-images-"))
            atexit.register(shutil.rmtree, self._dir, True)
        return self._dir

    def get(self, kind: str) -> BuiltImage:
        if kind not in self._built:
            d = self.directory() / kind
            d.mkdir()
            self._built[kind] = KINDS[kind](d)
        return self._built[kind]


_CACHE = _ImageCache()


def get_image(kind: str) -> BuiltImage:
    """The image of `kind`, built on first use and shared by every test in this process.
    Tests must not modify it (the scan tests assert its sha256 is unchanged)."""
    return _CACHE.get(kind)


def build_image(kind: str, directory: StrPath) -> BuiltImage:
    """A fresh image of `kind` in `directory` (for tests that modify it)."""
    d = Path(directory) / kind
    d.mkdir(parents=True, exist_ok=True)
    return KINDS[kind](d)


def env_has_qemu() -> bool:
    return HAVE_QEMU and os.access(str(QEMU_IMG), os.X_OK)
