"""Guest-data reads against QEMU: `Image.read`, `readinto`, `stream`, `guest_map`, `host_offset`.

QEMU is the oracle. Every image kind of `qemu_images.KINDS` and of `read_images.EXTRA_KINDS`
(backing chains three deep mixing raw and qcow2, relative names, backing files shorter, longer
and of odd size; extended L2 subcluster writes, zero writes and discards; deflate / zstd
compressed images, partly overwritten; external data files, raw or not, overwritten behind
QEMU's back; preallocation; 512 B and 2 MiB clusters; v2 images) is converted once with
`qemu-img convert -O raw`, and:

- the whole disk read through `img.stream()` with `shutil.copyfileobj`, and through `img.read`
  in odd-sized chunks, equals the raw conversion byte for byte (images with a virtual size above
  256 MiB are compared on every extent `qemu-img map` reports as data, and on windows of the
  others: their start, end and middle);
- 200 seeded random unaligned reads (`read`, `readinto` into a bytearray, into a memoryview
  slice) anchored at cluster, L2 and extent boundaries equal the same slices of the raw file;
- `guest_map()` equals `qemu-img map --output=json` (depth included, `offset` dropped when None);
- `host_offset()` agrees with qemu-img map's offsets of this image's own data, and the file
  (the external data file if any) holds the guest's bytes there;
- encrypted images open without their secret, but reads raise `EncryptionError` and never hand
  out ciphertext, also when only the backing file is encrypted.

Then the edge cases: zero-length and out-of-range reads, negative offsets, buffers of every
kind, the stream's seek/tell/EOF behaviour, reads after close, 8 threads reading one image and
threads reading while it is closed, a tiny `cache_size`, the other open options, a 40-deep
chain, relative names (backing: the image's folder; data file: the working directory, as QEMU),
backing loops and missing backing files (raised by `open` or at first use, either is fine).

Mismatch messages give the first differing guest offset and the `qemu-img map` extent there.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import random
import shutil
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qcow2ovl
import qemu_images as qi
import read_images as ri
from read_images import describe_map_diff, extent_dict, first_diff

KiB = qi.KiB
MiB = qi.MiB

BASE_KINDS = sorted(qi.KINDS)
EXTRA_KINDS = sorted(ri.EXTRA_KINDS)
ALL_KINDS = BASE_KINDS + EXTRA_KINDS
ENCRYPTED = sorted(qi.ENCRYPTED_KINDS)
READABLE = [k for k in ALL_KINDS if k not in qi.ENCRYPTED_KINDS]

# Whole-disk comparisons up to this virtual size; larger (sparse) images are compared on
# qemu-img map's data extents and windows of the rest (reading 5 TiB is not a unit test).
FULL_READ_LIMIT = 256 * MiB
CHUNK = 1 * MiB + 4097  # odd, so chunk edges fall everywhere
RANDOM_READS = 200


# ---- the oracle: QEMU's view of one image ----------------------------------------------------


class Oracle:
    """One built image with its `qemu-img convert -O raw` copy and `qemu-img map`."""

    def __init__(self, built: qi.BuiltImage, workdir: Path) -> None:
        self.built = built
        self.kind = built.kind
        self.path = built.path
        self.encrypted = built.ref.secret or built.kind in qi.ENCRYPTED_KINDS
        info = qi.qemu_info(built.ref)
        self.vsize = int(info["virtual-size"])
        self.cluster_size = int(info["cluster-size"])
        data = info.get("format-specific", {}).get("data", {})
        entry = 16 if data.get("extended-l2") else 8
        self.l2_span = self.cluster_size * (self.cluster_size // entry)
        # where this image's own data clusters are: the external data file if any
        self.data_path = Path(data.get("data-file", self.path))
        self.qmap = qi.qemu_map(built.ref)
        self.raw: Path | None = None
        self._fd: int | None = None
        if not self.encrypted:
            self.raw = workdir / f"{self.kind}.raw"
            qi.qemu_img("convert", "-f", "qcow2", "-O", "raw", self.path, self.raw)
            assert self.raw.stat().st_size == self.vsize
            self._fd = os.open(self.raw, os.O_RDONLY)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def want(self, offset: int, length: int) -> bytes:
        """The guest bytes `[offset, offset + length)` as QEMU reads them."""
        assert self._fd is not None, f"{self.kind}: no raw conversion"
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(self._fd, min(length - len(out), 64 * MiB), offset + len(out))
            assert chunk, f"{self.kind}: raw conversion shorter than {offset + length}"
            out += chunk
        return bytes(out)

    def extent_at(self, offset: int) -> dict[str, Any] | None:
        for e in self.qmap:
            if e["start"] <= offset < e["start"] + e["length"]:
                return e
        return None

    def boundaries(self) -> list[int]:
        """Guest offsets where something changes: extent starts, the end."""
        return sorted({e["start"] for e in self.qmap} | {self.vsize})

    def compare_ranges(self) -> list[tuple[int, int]]:
        """The ranges compared for an image too big to read whole: every data extent of
        qemu-img map in full (in pieces of at most 16 MiB) and, of every other extent, its
        first and last 64 KiB and 64 KiB in the middle."""
        out: list[tuple[int, int]] = []
        for e in self.qmap:
            start, length = e["start"], e["length"]
            if e["data"] or length <= 192 * KiB:
                for off in range(start, start + length, 16 * MiB):
                    out.append((off, min(16 * MiB, start + length - off)))
            else:
                mid = start + (length // 2) // 512 * 512 - 100
                for off in (start, mid, start + length - 64 * KiB):
                    out.append((off, 64 * KiB))
        return out


def mismatch(oracle: Oracle, what: str, offset: int, got: Any, want: bytes) -> str:
    got = bytes(got)
    if len(got) != len(want):
        return f"{oracle.kind}: {what} at {offset}: got {len(got)} bytes, want {len(want)}"
    i = first_diff(got, want)
    at = offset + i
    return (
        f"{oracle.kind}: {what} [{offset}, {offset + len(want)}) differs from qemu-img convert "
        f"first at guest offset {at} (cluster {at // oracle.cluster_size}, "
        f"+{at % oracle.cluster_size}); got {got[i : i + 16].hex()} want {want[i : i + 16].hex()}"
        f"{' (got zeros)' if not any(got[i : i + 4096]) else ''}; "
        f"qemu-img map extent there: {oracle.extent_at(at)}"
    )


def check_bytes(oracle: Oracle, what: str, offset: int, got: Any) -> None:
    assert isinstance(got, (bytes, bytearray, memoryview))
    want = oracle.want(offset, len(got))
    if bytes(got) != want:
        pytest.fail(mismatch(oracle, what, offset, got, want))


class Registry:
    """Builds every kind once per session (extra kinds under tmp_path_factory) and its oracle."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.oracles: dict[str, Oracle] = {}
        self._lock = threading.Lock()

    def built(self, kind: str) -> qi.BuiltImage:
        if kind in qi.KINDS:
            return qi.get_image(kind)
        return ri.build_read_image(kind, self.factory.mktemp(kind))

    def get(self, kind: str) -> Oracle:
        with self._lock:
            if kind not in self.oracles:
                self.oracles[kind] = Oracle(self.built(kind), self.factory.mktemp(f"raw-{kind}"))
            return self.oracles[kind]

    def close(self) -> None:
        for o in self.oracles.values():
            o.close()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory)
    yield reg
    reg.close()


@pytest.fixture(params=READABLE)
def readable(request: pytest.FixtureRequest, registry: Registry) -> Oracle:
    return registry.get(request.param)


@pytest.fixture(params=ALL_KINDS)
def any_kind(request: pytest.FixtureRequest, registry: Registry) -> Oracle:
    return registry.get(request.param)


def seed_of(kind: str, salt: str = "") -> int:
    return zlib.crc32(f"{kind}/{salt}".encode())


def random_ranges(oracle: Oracle, rng: random.Random, count: int) -> list[tuple[int, int]]:
    """Unaligned `(offset, length)` ranges anchored at cluster, L2-table and extent boundaries
    (crossing them), at the end of the disk, and anywhere."""
    cs, l2, vsize = oracle.cluster_size, oracle.l2_span, oracle.vsize
    edges = oracle.boundaries()
    out: list[tuple[int, int]] = []
    for _ in range(count):
        how = rng.randrange(6)
        if how == 0:
            anchor = rng.randrange(vsize // cs + 1) * cs
        elif how == 1:
            anchor = rng.randrange(vsize // l2 + 1) * l2
        elif how in (2, 3):
            anchor = rng.choice(edges)
        elif how == 4:
            anchor = vsize
        else:
            anchor = rng.randrange(vsize)
        offset = anchor + rng.randint(-2 * cs, cs) + rng.randint(-600, 600)
        offset = min(max(offset, 0), vsize)
        size = rng.choice(
            (1, rng.randint(1, 4096), rng.randint(1, 3 * cs), rng.randint(1, 3 * MiB))
        )
        size = min(size, vsize - offset)
        out.append((offset, size))
    return out


# ---- whole disk ---------------------------------------------------------------------------------


class CompareSink:
    """A file-like `write` target comparing what it gets, in order, with the raw conversion."""

    def __init__(self, oracle: Oracle) -> None:
        self.oracle = oracle
        self.pos = 0
        self.error: str | None = None

    def write(self, data: Any) -> int:
        n = len(data)
        if self.error is None:
            want = self.oracle.want(self.pos, min(n, self.oracle.vsize - self.pos))
            if bytes(data) != want:
                self.error = mismatch(self.oracle, "stream", self.pos, data, want)
        self.pos += n
        return n


def read_fully(stream: Any, size: int) -> bytes:
    """`size` bytes from a raw stream (a raw read may return fewer than asked)."""
    out = bytearray()
    while len(out) < size:
        chunk = stream.read(size - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_stream_whole_disk(readable: Oracle) -> None:
    o = readable
    with qcow2ovl.open(o.path) as img:
        stream = img.stream()
        assert isinstance(stream, io.RawIOBase)
        assert isinstance(stream, qcow2ovl.GuestStream)
        assert stream.readable() and stream.seekable()
        assert not stream.writable()
        assert stream.tell() == 0
        if o.vsize <= FULL_READ_LIMIT:
            sink = CompareSink(o)
            shutil.copyfileobj(stream, sink)
            assert sink.error is None, sink.error
            assert sink.pos == o.vsize, f"{o.kind}: stream gave {sink.pos} bytes of {o.vsize}"
            assert stream.tell() == o.vsize
            assert stream.read(4096) == b""
        else:
            for off, n in o.compare_ranges():
                assert stream.seek(off) == off
                check_bytes(o, "stream", off, read_fully(stream, n))
                assert stream.tell() == off + n
        stream.close()


def test_read_whole_disk_in_chunks(readable: Oracle) -> None:
    o = readable
    ranges = (
        [(off, min(CHUNK, o.vsize - off)) for off in range(0, o.vsize, CHUNK)]
        if o.vsize <= FULL_READ_LIMIT
        else o.compare_ranges()
    )
    with qcow2ovl.open(o.path) as img:
        for off, n in ranges:
            got = img.read(off, n)
            assert type(got) is bytes
            check_bytes(o, "read", off, got)


# ---- random reads -------------------------------------------------------------------------------


def test_random_reads(readable: Oracle) -> None:
    o = readable
    rng = random.Random(seed_of(o.kind, "random"))
    with qcow2ovl.open(o.path) as img:
        for i, (off, n) in enumerate(random_ranges(o, rng, RANDOM_READS)):
            how = i % 4
            if how < 2:
                got: Any = img.read(off, n)
                assert len(got) == n
            elif how == 2:
                buf = bytearray(b"\xee" * n)
                assert img.readinto(off, buf) == n
                got = buf
            else:
                # a memoryview slice of a bigger buffer: the guard bytes must stay untouched
                whole = bytearray(b"\xee" * (n + 64))
                assert img.readinto(off, memoryview(whole)[31 : 31 + n]) == n
                assert whole[:31] == b"\xee" * 31 and whole[31 + n :] == b"\xee" * 33, (
                    f"{o.kind}: readinto({off}, {n}) wrote outside its memoryview slice"
                )
                got = whole[31 : 31 + n]
            check_bytes(o, f"read #{i} ({'read' if how < 2 else 'readinto'})", off, got)


# ---- guest_map and host_offset ------------------------------------------------------------------


def test_guest_map(any_kind: Oracle) -> None:
    """qemu-img map marks the parts of data clusters that are holes in the host file as zero
    (lseek SEEK_DATA/SEEK_HOLE), and what ext4 reports there changes as the kernel writes back
    (seen here: a map of 12 extents became 9 some 40 s after the image was made, with no write
    in between). So qemu-img map runs right before and after our guest_map, until the two
    agree, and ours is compared with that."""
    o = any_kind
    with qcow2ovl.open(o.path) as img:
        for _attempt in range(5):
            before = qi.qemu_map(o.built.ref)
            extents = img.guest_map()
            want = qi.qemu_map(o.built.ref)
            if before == want:
                break
    assert isinstance(extents, list)
    for e in extents:
        assert isinstance(e, qcow2ovl.GuestExtent)
    got = [extent_dict(e) for e in extents]
    assert got == want, f"{o.kind}: " + describe_map_diff(got, want)


@pytest.mark.parametrize("kind", READABLE)
def test_host_offset(kind: str, registry: Registry) -> None:
    """host_offset is qemu-img map's offset for this image's own data (depth 0; in the external
    data file when there is one), None elsewhere; and that file holds the guest bytes there."""
    o = registry.get(kind)
    rng = random.Random(seed_of(kind, "host"))
    with qcow2ovl.open(o.path) as img, open(o.data_path, "rb") as f:
        for e in o.qmap:
            start, length = e["start"], e["length"]
            ours = e["depth"] == 0 and e["data"] and "offset" in e
            picks = {start, start + length - 1, start + rng.randrange(length)}
            for g in sorted(picks):
                want = e["offset"] + (g - start) if ours else None
                got = img.host_offset(g)
                assert got == want, f"{kind}: host_offset({g}) = {got}, want {want}; extent {e}"
                if ours:
                    n = min(512, start + length - g)
                    data = os.pread(f.fileno(), n, got)
                    check_bytes(o, f"file bytes at host offset {got}", g, data)


# ---- encrypted images ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ENCRYPTED)
def test_encrypted_read_without_secret(kind: str, registry: Registry) -> None:
    o = registry.get(kind)
    with qcow2ovl.open(o.path) as img:
        assert img.info.encrypted
        for off, n in ((0, 4096), (5 * MiB + 1536, 100), (20 * MiB, 512), (o.vsize - 1, 1)):
            with pytest.raises(qcow2ovl.EncryptionError, match="needs its secret"):
                img.read(off, n)
            buf = bytearray(b"\xee" * n)
            with pytest.raises(qcow2ovl.EncryptionError):
                img.readinto(off, buf)
            assert set(buf) <= {0xEE, 0}, f"{kind}: a failed readinto left file bytes in the buffer"
        with pytest.raises(qcow2ovl.EncryptionError):
            stream = img.stream()
            stream.read(4096)


def test_plain_image_over_encrypted_backing(tmp_path: Path) -> None:
    """The top's own clusters read as QEMU reads them; whatever comes from the encrypted backing
    file raises EncryptionError (never its ciphertext); guest_map equals qemu-img map."""
    top, opts = ri.build_plain_over_encrypted(tmp_path)
    raw = tmp_path / "top.raw"
    secret = ["--object", qi.SECRET_OBJECT, "--image-opts", opts]
    qi.qemu_img("convert", *secret, "-O", "raw", raw)
    want = raw.read_bytes()
    want_map = json.loads(qi.qemu_img("map", "--output=json", *secret).stdout)
    with qcow2ovl.open(top) as img:
        assert img.read(512 * KiB, 64 * KiB) == want[512 * KiB : 576 * KiB]
        assert img.read(520 * KiB, 100) == want[520 * KiB : 520 * KiB + 100]
        for off, n in ((0, 4096), (500 * KiB, 30 * KiB), (570 * KiB, 10 * KiB), (1 * MiB - 1, 1)):
            with pytest.raises(qcow2ovl.EncryptionError):
                img.read(off, n)
        got_map = [extent_dict(e) for e in img.guest_map()]
    assert got_map == want_map, describe_map_diff(got_map, want_map)


# ---- edge cases ---------------------------------------------------------------------------------

EDGE_KIND = "chain3_raw_base"


@pytest.fixture
def edge(registry: Registry) -> Oracle:
    return registry.get(EDGE_KIND)


def test_zero_length_reads(edge: Oracle) -> None:
    with qcow2ovl.open(edge.path) as img:
        assert img.read(edge.vsize, 0) == b""
        assert img.read(0, 0) == b""
        assert img.read(12345, 0) == b""
        assert img.readinto(edge.vsize, bytearray()) == 0
        assert img.readinto(0, memoryview(bytearray(10))[5:5]) == 0
        check_bytes(edge, "last byte", edge.vsize - 1, img.read(edge.vsize - 1, 1))


@pytest.mark.parametrize(
    "offset, length",
    [
        ("vsize", 1),
        ("vsize-1", 2),
        ("vsize+1", 0),
        (0, "vsize+1"),
        (1, "vsize"),
        (2**63, 1),
        (2**64 + 1, 0),
        (1, 2**64 - 1),
        (2**64 - 1, 2),
    ],
)
def test_read_past_end(edge: Oracle, offset: Any, length: Any) -> None:
    def value(v: Any) -> int:
        if isinstance(v, int):
            return v
        return edge.vsize + int(v[5:] or 0)

    off, n = value(offset), value(length)
    with qcow2ovl.open(edge.path) as img:
        with pytest.raises(ValueError):
            img.read(off, n)
        if n < 1 << 24:
            with pytest.raises(ValueError):
                img.readinto(off, bytearray(n))


def test_negative_offset_or_length(edge: Oracle) -> None:
    with qcow2ovl.open(edge.path) as img:
        for off, n in ((-1, 1), (-1, 0), (-(2**63), 1), (-(2**70), 1)):
            with pytest.raises(ValueError):
                img.read(off, n)
            with pytest.raises(ValueError):
                img.readinto(off, bytearray(max(n, 0)))
        with pytest.raises(ValueError):
            img.read(0, -1)
        with pytest.raises(ValueError):
            img.read(100, -100)


def test_readinto_buffers(edge: Oracle) -> None:
    o = edge
    cs = o.cluster_size
    off = 3 * MiB - 1000  # base data, crossing a cluster boundary
    with qcow2ovl.open(o.path) as img:
        # memoryview slices of a bytearray, at several places and lengths
        whole = bytearray(b"\xee" * (4 * cs))
        for a, b in ((0, 1), (1, cs + 1), (100, 3 * cs), (4 * cs - 7, 4 * cs)):
            whole[:] = b"\xee" * len(whole)
            assert img.readinto(off, memoryview(whole)[a:b]) == b - a
            check_bytes(o, f"readinto slice [{a}:{b}]", off, whole[a:b])
            assert whole[:a] == b"\xee" * a and whole[b:] == b"\xee" * (len(whole) - b)
        # an anonymous mmap, whole and sliced
        with mmap.mmap(-1, 2 * cs) as m:
            assert img.readinto(off, m) == 2 * cs
            check_bytes(o, "readinto mmap", off, m[:])
            assert img.readinto(off + 1, memoryview(m)[10:20]) == 10
            check_bytes(o, "readinto mmap slice", off + 1, m[10:20])
        # a memoryview cast to bytes of a bigger item type
        words = memoryview(bytearray(64)).cast("I")
        assert img.readinto(off, words.cast("B")) == 64
        check_bytes(o, "readinto cast", off, words.cast("B").tobytes())


def test_readinto_rejects_read_only_buffers(edge: Oracle) -> None:
    with qcow2ovl.open(edge.path) as img:
        for buf in (b"\0" * 16, memoryview(b"\0" * 16), memoryview(bytearray(16)).toreadonly()):
            with pytest.raises((TypeError, BufferError, ValueError)):
                img.readinto(0, buf)


def test_readinto_non_contiguous(edge: Oracle) -> None:
    """A strided memoryview is either refused or filled correctly; never garbled."""
    with qcow2ovl.open(edge.path) as img:
        whole = bytearray(b"\xee" * 64)
        view = memoryview(whole)[::2]
        try:
            n = img.readinto(1000, view)
        except (TypeError, BufferError, ValueError):
            assert whole == b"\xee" * 64
            return
        assert n == 32
        check_bytes(edge, "readinto strided", 1000, bytes(view))
        assert whole[1::2] == b"\xee" * 32


def test_stream_seek_tell(edge: Oracle) -> None:
    o = edge
    with qcow2ovl.open(o.path) as img, img.stream() as s:
        assert s.seek(0, io.SEEK_END) == o.vsize
        assert s.tell() == o.vsize
        assert s.read(100) == b""
        assert s.readinto(bytearray(10)) == 0
        assert s.seek(-100, io.SEEK_END) == o.vsize - 100
        check_bytes(o, "stream tail", o.vsize - 100, read_fully(s, 1000))
        assert s.tell() == o.vsize
        assert s.seek(24 * MiB - 50) == 24 * MiB - 50
        assert s.seek(10, io.SEEK_CUR) == 24 * MiB - 40
        assert s.tell() == 24 * MiB - 40
        buf = bytearray(100)
        n = s.readinto(buf)
        assert 0 < n <= 100
        check_bytes(o, "stream readinto", 24 * MiB - 40, buf[:n])
        assert s.tell() == 24 * MiB - 40 + n
        s.seek(o.vsize - 5000)
        check_bytes(o, "stream readall", o.vsize - 5000, s.read())
        s.seek(o.vsize - 3000)
        check_bytes(o, "stream readall()", o.vsize - 3000, s.readall())
        # two streams keep their own positions
        with img.stream() as t:
            assert t.tell() == 0
            t.seek(1000)
            s.seek(2000)
            check_bytes(o, "stream t", 1000, read_fully(t, 10))
            check_bytes(o, "stream s", 2000, read_fully(s, 10))
        # io.BufferedReader on top works
        s.seek(0)
        reader = io.BufferedReader(s, buffer_size=10000)
        check_bytes(o, "buffered", 0, reader.read(123457))
    assert s.closed
    with pytest.raises(ValueError):
        s.read(10)


def test_stream_seek_rejects_non_integers(edge: Oracle) -> None:
    """Like io.BytesIO and FileIO: a float position is a TypeError at seek (not a position
    that breaks the next read); a negative one a ValueError; past the end reads b""."""
    with qcow2ovl.open(edge.path) as img, img.stream() as s:
        with pytest.raises(TypeError):
            s.seek(1.5)
        with pytest.raises(TypeError):
            s.seek("1")  # type: ignore[arg-type]
        with pytest.raises((ValueError, OSError)):
            s.seek(-1)
        assert s.seek(edge.vsize + 10) == edge.vsize + 10
        assert s.read(10) == b""


def test_reads_after_close(edge: Oracle) -> None:
    img = qcow2ovl.open(edge.path)
    stream = img.stream()
    img.close()
    with pytest.raises(ValueError):
        img.read(0, 10)
    with pytest.raises(ValueError):
        img.read(0, 0)
    with pytest.raises(ValueError):
        img.readinto(0, bytearray(10))
    with pytest.raises(ValueError):
        stream.read(10)
    with pytest.raises(ValueError):
        img.stream()


THREAD_KINDS = ["convert_zstd_partial", "chain3_raw_base", "extl2_ops_backing", "convert_zlib_512"]


@pytest.mark.parametrize("kind", THREAD_KINDS)
def test_threads_read_concurrently(kind: str, registry: Registry) -> None:
    o = registry.get(kind)
    threads_n, per_thread = 8, 40
    plans = [
        random_ranges(o, random.Random(seed_of(kind, f"thread{t}")), per_thread)
        for t in range(threads_n)
    ]
    results: list[list[bytes]] = [[] for _ in range(threads_n)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads_n)

    with qcow2ovl.open(o.path) as img:

        def work(t: int) -> None:
            try:
                barrier.wait()
                for off, n in plans[t]:
                    results[t].append(img.read(off, n))
            except BaseException as exc:  # reported below, with the thread's number
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors, f"{kind}: a reading thread raised {errors[0]!r}"
    for t in range(threads_n):
        for (off, _n), got in zip(plans[t], results[t]):
            check_bytes(o, f"thread {t} read", off, got)


CACHE_KINDS = [
    "convert_zlib_partial",
    "convert_zstd_2m",
    "chain3_relative",
    "extl2_ops_backing",
    "cluster_512_ops",
    "data_file_ops",
    "snapshots_cluster_512",
]


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_small_cache_size(kind: str, registry: Registry) -> None:
    o = registry.get(kind)
    rng = random.Random(seed_of(kind, "cache"))
    with qcow2ovl.open(o.path, cache_size=o.cluster_size) as img:
        for off, n in random_ranges(o, rng, RANDOM_READS):
            check_bytes(o, "read (cache_size = 1 cluster)", off, img.read(off, n))
        for off in range(0, o.vsize, CHUNK):
            n = min(CHUNK, o.vsize - off)
            check_bytes(o, "chunked read (cache_size = 1 cluster)", off, img.read(off, n))


def test_reads_leave_every_file_unchanged(registry: Registry) -> None:
    for kind in ("chain3_raw_base", "data_file_ops", "convert_zstd_partial"):
        o = registry.get(kind)
        files = [o.path, *o.built.extra_files]
        before = [qi.sha256_file(f) for f in files]
        with qcow2ovl.open(o.path) as img:
            img.read(0, min(o.vsize, 8 * MiB))
            img.guest_map()
        assert [qi.sha256_file(f) for f in files] == before, f"{kind}: reading changed a file"


def test_open_relative_path_from_other_cwd(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backing names resolve against the image's folder, not the working directory."""
    o = registry.get("chain3_relative")
    top = o.path.resolve()
    monkeypatch.chdir(top.parent.parent)
    rel = Path(top.parent.name) / top.name
    with qcow2ovl.open(rel) as img:
        for off, n in ((0, 64 * KiB), (5 * MiB, 1 * MiB), (48 * MiB - 4096, 8192)):
            check_bytes(o, "read via relative path", off, img.read(off, n))


@pytest.mark.parametrize(
    "kwargs", [{"overlap_check": "none"}, {"overlap_check": "cached"}, {"map_memory_limit": 4096}]
)
def test_open_options_do_not_change_reads(kwargs: dict[str, Any], registry: Registry) -> None:
    o = registry.get("snapshots_cluster_512")
    rng = random.Random(seed_of(o.kind, str(kwargs)))
    with qcow2ovl.open(o.path, **kwargs) as img:
        for off, n in random_ranges(o, rng, 50):
            check_bytes(o, f"read with {kwargs}", off, img.read(off, n))


def test_read_through_writable_open(registry: Registry, tmp_path: Path) -> None:
    o = registry.get("convert_zstd_partial")
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(o.path, copy)
    with qcow2ovl.open(copy, writable=True) as img:
        for off in range(0, o.vsize, CHUNK):
            check_bytes(o, "read (writable open)", off, img.read(off, min(CHUNK, o.vsize - off)))
    assert qi.check_is_clean(qi.qemu_check(copy))


def test_deep_chain(tmp_path: Path) -> None:
    """40 qcow2 images stacked: reads go through every level (also from a Python thread, whose
    stack may be smaller than the main thread's) and guest_map's depths go to 39."""
    top = ri.build_deep_chain(tmp_path, 40)
    raw = tmp_path / "top.raw"
    qi.qemu_img("convert", "-f", "qcow2", "-O", "raw", top, raw)
    want = raw.read_bytes()
    with qcow2ovl.open(top) as img:
        got: list[bytes] = []
        th = threading.Thread(target=lambda: got.append(img.read(0, len(want))))
        th.start()
        th.join()
        assert got and got[0] == want, "40-deep chain: read from a thread differs"
        assert img.read(0, len(want)) == want
        extents = img.guest_map()
    ref = qi.ImageRef(top)
    want_map = qi.qemu_map(ref)
    got_map = [extent_dict(e) for e in extents]
    assert got_map == want_map, describe_map_diff(got_map, want_map)
    assert max(e["depth"] for e in want_map) == 39


def test_close_while_reading(registry: Registry) -> None:
    """Closing an image while threads read it: every read returns the right bytes or raises
    ValueError (closed); nothing else happens."""
    o = registry.get("convert_zstd_partial")
    img = qcow2ovl.open(o.path)
    started = threading.Barrier(5)
    outcomes: list[tuple[int, int, Any]] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        rng = random.Random(seed_of(o.kind, f"close{t}"))
        started.wait()
        for _ in range(400):
            off, n = random_ranges(o, rng, 1)[0]
            try:
                result: Any = img.read(off, n)
            except BaseException as exc:  # ValueError expected once closed; others reported
                result = exc
            with lock:
                outcomes.append((off, n, result))
            if isinstance(result, BaseException):
                return

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    started.wait()
    while any(th.is_alive() for th in threads):
        with lock:
            if len(outcomes) >= 20:
                break
    img.close()
    for th in threads:
        th.join()
    for off, _n, result in outcomes:
        if isinstance(result, ValueError):
            continue
        assert not isinstance(result, BaseException), f"read raised {result!r} during close"
        check_bytes(o, "read racing close", off, result)
    assert img.closed


def test_relative_data_file_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU opens an external data file by the name as stored: a relative name is relative to
    the working directory (not the image's folder). Reads follow QEMU both ways."""
    d = tmp_path / "img"
    d.mkdir()
    assert qi.QEMU_IMG is not None and qi.QEMU_IO is not None

    def qemu(*args: str, cwd: Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
        assert proc.returncode in ok, proc.stderr
        return proc

    qemu(
        qi.QEMU_IMG,
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=rel.data",
        "rel.qcow2",
        "8M",
        cwd=d,
    )
    qemu(qi.QEMU_IO, "-f", "qcow2", "-c", "write -P 0x77 100 200000", "rel.qcow2", cwd=d)
    qemu(qi.QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", "rel.qcow2", "rel.raw", cwd=d)
    want = (d / "rel.raw").read_bytes()
    # elsewhere, QEMU cannot find the data file, and neither may we
    proc = qemu(
        qi.QEMU_IMG,
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        str(d / "rel.qcow2"),
        "x.raw",
        cwd=tmp_path,
        ok=(1,),
    )
    assert "rel.data" in proc.stderr
    with pytest.raises(FileNotFoundError):
        with qcow2ovl.open(d / "rel.qcow2") as img:
            img.read(0, 4096)
    monkeypatch.chdir(d)
    with qcow2ovl.open("rel.qcow2") as img:
        assert img.read(0, len(want)) == want


# ---- broken chains ------------------------------------------------------------------------------


def qemu_chain_error(path: Path) -> str:
    """QEMU's verdict on the backing chain (`qemu-img info --backing-chain`; `qemu-img map`
    does not terminate on a loop)."""
    assert qi.QEMU_IMG is not None
    proc = qi.run(
        [qi.QEMU_IMG, "info", "--backing-chain", "-f", "qcow2", path], ok=(0, 1), timeout=30
    )
    assert proc.returncode == 1, f"QEMU opened the broken chain at {path}"
    return proc.stderr


def first_use(img: Any, how: str) -> None:
    """Whatever needs the backing chain: a read (of unallocated space) or the guest map."""
    if how == "read":
        img.read(0, 512)
    else:
        img.guest_map()


# The chain may be opened by `open` or at first use (read / guest_map): either is fine, as long
# as the error comes before any data.
@pytest.mark.parametrize("how", ["read", "guest_map"])
@pytest.mark.parametrize("builder", [ri.build_loop, ri.build_self_loop, ri.build_long_loop])
def test_backing_loop(builder: Any, how: str, tmp_path: Path) -> None:
    path = builder(tmp_path)
    assert "infinite loop" in qemu_chain_error(path)
    with pytest.raises(qcow2ovl.Qcow2Error) as info:
        with qcow2ovl.open(path) as img:
            first_use(img, how)
    assert "loop" in str(info.value), f"message without 'loop': {info.value}"


@pytest.mark.parametrize("how", ["read", "guest_map"])
@pytest.mark.parametrize("builder", [ri.build_missing_backing, ri.build_missing_deeper])
def test_missing_backing(builder: Any, how: str, tmp_path: Path) -> None:
    path = builder(tmp_path)
    assert "No such file or directory" in qemu_chain_error(path)
    with pytest.raises(FileNotFoundError):
        with qcow2ovl.open(path) as img:
            first_use(img, how)


def test_long_reads_work_in_a_forked_child(tmp_path: Path) -> None:
    """The second reader thread of long reads belongs to the process that started it: a child
    forked afterwards reads alone (a fork has no copy of that thread) and does not hang."""
    import multiprocessing

    path = tmp_path / "fork.qcow2"
    qcow2ovl.create(path, 8 << 20)
    data = bytes(range(256)) * (4 << 12)
    with qcow2ovl.open(path, writable=True) as img:
        img.write(0, data)
    with qcow2ovl.open(path) as img:
        assert img.read(0, len(data)) == data  # starts the reader thread in this process
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_read_in_child, args=(str(path), data))
    child.start()
    child.join(60)
    assert child.exitcode == 0, "the forked child failed or hung"


def _read_in_child(path: str, data: bytes) -> None:
    with qcow2ovl.open(path) as img:
        if img.read(0, len(data)) != data:
            raise SystemExit(1)
