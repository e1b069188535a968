"""Whether two guest disks hold the same bytes: :func:`compare`, ``qemu-img compare``'s work.

Each disk is a qcow2 image (with its backing chain) or a raw file. Ranges both sides know to
read as zeros (holes, zero and unallocated clusters) are not read; the rest is read in chunks
of 2 MiB and compared. A disk shorter than the other reads as zeros past its end.

Strict mode (``qemu-img compare -s``) also requires equal sizes and equal block status: at each
offset both disks must report the same allocation flags (allocated, zero, data, host offset
known, compressed) and agree on whether that range reaches the end of the disk, as QEMU's
block-status queries report them; the ranges are derived from the guest map
(:meth:`Image.iter_guest_map`) split where QEMU's queries stop (the end of each L2 table, each
compressed cluster).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from dataclasses import dataclass
    from typing import Literal

    from qcow2ovl.image import Image

    Kind = Literal["identical", "content", "size", "status"]
else:
    from qcow2ovl._frozen import dataclass

#: Formats compared.
FORMATS = ("qcow2", "raw")
#: Bytes read from each side at a time (qemu-img's buffer size).
CHUNK = 2 << 20
#: Raw disks are whole sectors: a raw file reads as zeros up to the next multiple of 512.
_SECTOR = 512

# Block-status flags (strict mode), in the sense of QEMU's.
_ALLOCATED, _ZERO, _DATA, _OFFSET, _COMPRESSED = 1, 2, 4, 8, 16


@dataclass(frozen=True)
class CompareOutcome:
    """What :func:`compare` found, in detail (for the command line): ``kind`` is
    ``"identical"``, ``"content"`` (the disks differ at ``offset``, the first byte that
    differs), ``"size"`` (strict mode: the sizes differ) or ``"status"`` (strict mode: the
    block status differs at ``offset``); ``size_a`` and ``size_b`` are the disks' sizes.
    ``reported`` is the offset ``qemu-img compare`` prints: for a content difference the start
    of the 512-byte sector holding ``offset`` (sectors counted from where the read began, a
    multiple of 512 except after the unaligned end of a raw file), else ``offset``."""

    kind: str
    offset: int | None
    size_a: int
    size_b: int
    reported: int | None


class CompareReadError(OSError):
    """A read of one of the disks failed during the comparison (qemu-img's exit status 4)."""

    def __init__(self, filename: str, offset: int, cause: BaseException) -> None:
        reason = getattr(cause, "strerror", None) or str(cause)
        super().__init__(f"Error while reading offset {offset} of {filename}: {reason}")
        # (Not OSError's ``filename``, which would replace the message in str().)
        self.path = filename
        self.offset = offset


class _Disk:
    """One side of the comparison: reads, zero facts and (strict mode) block status."""

    def __init__(
        self, path: str, fmt: str | None, force_share: bool, secret: str | bytes | None = None
    ) -> None:
        if fmt is None:
            from qcow2ovl._format import probe_format

            fmt = probe_format(path)
        if fmt not in FORMATS:
            raise _unknown_format(fmt, path)
        self.path = path
        self.fmt = fmt
        self.image: Image | None = None
        self.fd: int | None = None
        if fmt == "qcow2":
            from qcow2ovl.image import open as open_image

            self.image = open_image(
                path, overlap_check="none", force_share=force_share, secret=secret
            )
            if self.image.info.encrypted and secret is None:
                from qcow2ovl._core import KEY_SECRET_REQUIRED
                from qcow2ovl.errors import EncryptionError

                self.image.close()
                # qemu-img's words: it cannot open an encrypted image without its secret.
                raise EncryptionError(f"Could not open '{path}': {KEY_SECRET_REQUIRED}")
            self.size = self.image.virtual_size
            self.file_size = self.size
        else:
            self.fd = os.open(path, os.O_RDONLY)
            self.file_size = os.fstat(self.fd).st_size
            self.size = -(-self.file_size // _SECTOR) * _SECTOR

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
        if self.fd is not None:
            os.close(self.fd)

    def read(self, offset: int, view: memoryview) -> None:
        """Fill *view* with guest bytes from *offset* (zeros past the end of a raw file)."""
        try:
            if self.image is not None:
                self.image.readinto(offset, view)
                return
            assert self.fd is not None
            done = 0
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n == 0:
                    view[done:] = bytes(len(view) - done)
                    return
                done += n
        except OSError as exc:  # an image that cannot be read at all fails otherwise
            raise CompareReadError(self.path, offset, exc) from exc

    def zero_runs(self) -> Iterator[tuple[int, int, bool]]:
        """``(start, end, reads as zeros)`` runs covering the disk, in order."""
        if self.image is not None:
            for start, length, _, _, zero, _, _, _ in self.image._guest_map_rows():
                yield start, start + length, zero
            return
        for start, end, data in _raw_runs(self.fd, self.file_size, self.size):
            yield start, end, not data

    def status_runs(self) -> Iterator[tuple[int, int, int, bool]]:
        """``(start, end, flags, reaches the end)``: the block status QEMU reports, range by
        range (strict mode)."""
        if self.image is None:
            for start, end, data in _raw_runs(self.fd, self.file_size, self.size):
                flags = _ALLOCATED | _OFFSET | (_DATA if data else _ZERO)
                yield start, end, flags, end == self.size
            return
        yield from _qcow2_status_runs(self.image)


def _unknown_format(fmt: str, path: str) -> ValueError:
    from qcow2ovl.measure import _OTHER_FORMATS

    if fmt in _OTHER_FORMATS:
        return ValueError(f"compare: format '{fmt}' is not supported (qcow2 and raw are)")
    return ValueError(f"Could not open '{path}': Unknown driver '{fmt}'")


def _raw_runs(fd: int | None, file_size: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, holds data)`` runs of a raw file read as a disk of *size* bytes: its data
    ranges and holes (SEEK_DATA/SEEK_HOLE), and zeros from its end to the disk's."""
    import errno

    assert fd is not None
    offset = 0
    while offset < file_size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                yield offset, file_size, True
                offset = file_size
                break
            raise
        if data > offset:
            yield offset, min(data, file_size), False
        if data >= file_size:
            offset = file_size
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), file_size)
        yield data, hole, True
        offset = hole
    if offset < size:
        yield offset, size, False


def _chain_layers(image: Image) -> list[tuple[int | None, int]]:
    """``(L2 table coverage or None for raw, virtual size)`` of each layer of *image*'s
    backing chain, the image first (each backing file opened to read its header)."""
    from qcow2ovl.create import _resolve
    from qcow2ovl.image import open as open_image

    def coverage(info_cluster: int, extended: bool) -> int:
        return info_cluster * (info_cluster // (16 if extended else 8))

    info = image.info
    layers: list[tuple[int | None, int]] = [
        (coverage(info.cluster_size, info.extended_l2), image.virtual_size)
    ]
    path, backing, fmt = image.path, info.backing_file, info.backing_format
    while backing is not None and len(layers) < 64:
        path = _resolve(path, backing)
        if fmt == "raw":
            layers.append((None, -(-os.path.getsize(path) // _SECTOR) * _SECTOR))
            break
        with open_image(path, overlap_check="none", force_share=True) as layer:
            li = layer.info
            layers.append((coverage(li.cluster_size, li.extended_l2), layer.virtual_size))
            backing, fmt = li.backing_file, li.backing_format
    return layers


def _qcow2_status_runs(image: Image) -> Iterator[tuple[int, int, int, bool]]:
    """QEMU's block status of a qcow2 disk, range by range: the guest map's entries cut where
    a query stops (the end of an L2 table of each layer consulted, each compressed cluster),
    with the flags and end-of-disk bit a query from inside the range returns."""
    layers = _chain_layers(image)
    size = layers[0][1]
    has_backing = len(layers) > 1
    cluster = image.info.cluster_size
    for start, length, depth, present, zero, data, compressed, offset in image._guest_map_rows():
        end = start + length
        if depth == 0 and not present and zero and has_backing:
            # Past the end of a shorter backing file: QEMU's zeros "allocated" at this layer.
            flags = _ZERO | _ALLOCATED
        else:
            flags = (
                (_ALLOCATED if present else 0)
                | (_ZERO if zero else 0)
                | (_DATA if data else 0)
                | (_OFFSET if offset is not None else 0)
                | (_COMPRESSED if compressed else 0)
            )
        steps = [c for c, _ in layers[: depth + 1] if c is not None]
        if compressed and depth == 0:
            steps.append(cluster)
        bottom = layers[min(depth, len(layers) - 1)][1]
        pos = start
        while pos < end:
            cut = min([end] + [(pos // s + 1) * s for s in steps])
            eof = cut == size or (not present and depth > 0 and cut == bottom)
            yield pos, cut, flags, eof
            pos = cut


def _first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """The index of the first byte where *a* and *b* (of one length, known to differ)
    differ."""
    lo, hi = 0, len(a)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(i for i in range(lo, hi) if a[i] != b[i])


def _first_nonzero(buf: bytes | bytearray) -> int:
    """The index of the first non-zero byte of *buf*, or -1."""
    rest = len(buf.lstrip(b"\0"))
    return -1 if rest == 0 else len(buf) - rest


def _runs_together(
    a: Iterator[tuple[int, int, bool]], b: Iterator[tuple[int, int, bool]], end: int
) -> Iterator[tuple[int, int, bool, bool]]:
    """``(start, stop, a zero, b zero)`` over ``[0, end)``, where both sides' runs agree."""
    ra, rb = next(a, None), next(b, None)
    pos = 0
    while pos < end and ra is not None and rb is not None:
        stop = min(ra[1], rb[1], end)
        yield pos, stop, ra[2], rb[2]
        pos = stop
        if ra[1] <= pos:
            ra = next(a, None)
        if rb[1] <= pos:
            rb = next(b, None)
    if pos < end:  # a map shorter than its disk (cannot happen): compare what is left
        yield pos, end, False, False


def _first_status_difference(a: _Disk, b: _Disk, end: int) -> int | None:
    """The first offset below *end* where the block status of *a* and *b* differ."""
    ia, ib = a.status_runs(), b.status_runs()
    ra, rb = next(ia, None), next(ib, None)
    pos = 0
    while pos < end and ra is not None and rb is not None:
        if ra[2:] != rb[2:]:
            return pos
        pos = min(ra[1], rb[1])
        if ra[1] <= pos:
            ra = next(ia, None)
        if rb[1] <= pos:
            rb = next(ib, None)
    return None


def _compare_disks(
    a: _Disk,
    b: _Disk,
    strict: bool,
    progress: Callable[[int, int], object] | None,
    on_tail: Callable[[], object] | None = None,
) -> CompareOutcome:
    total = max(a.size, b.size)
    common = min(a.size, b.size)

    def tell(done: int) -> None:
        if progress is not None:
            progress(done, total)

    def outcome(kind: str, offset: int | None, read_from: int | None = None) -> CompareOutcome:
        reported = offset
        if offset is not None and read_from is not None:
            reported = offset - (offset - read_from) % _SECTOR
        return CompareOutcome(kind, offset, a.size, b.size, reported)

    tell(0)
    limit = common
    status_at = None
    if strict:
        if a.size != b.size:
            return outcome("size", common)
        status_at = _first_status_difference(a, b, common)
        if status_at is not None:
            limit = status_at
    buf_a, buf_b = bytearray(CHUNK), bytearray(CHUNK)
    view_a, view_b = memoryview(buf_a), memoryview(buf_b)
    for start, stop, zero_a, zero_b in _runs_together(a.zero_runs(), b.zero_runs(), limit):
        if zero_a and zero_b:
            tell(stop)
            continue
        pos = start
        while pos < stop:
            n = min(CHUNK, stop - pos)
            if zero_b:
                a.read(pos, view_a[:n])
                i = _first_nonzero(buf_a[:n] if n < CHUNK else buf_a)
            elif zero_a:
                b.read(pos, view_b[:n])
                i = _first_nonzero(buf_b[:n] if n < CHUNK else buf_b)
            else:
                a.read(pos, view_a[:n])
                b.read(pos, view_b[:n])
                if n == CHUNK:
                    i = -1 if buf_a == buf_b else _first_difference(buf_a, buf_b)
                else:
                    x, y = buf_a[:n], buf_b[:n]
                    i = -1 if x == y else _first_difference(x, y)
            if i >= 0:
                return outcome("content", pos + i, pos)
            pos += n
            tell(pos)
    if status_at is not None:
        return outcome("status", status_at)
    longer = a if a.size > b.size else b
    if longer.size > common:
        if on_tail is not None:
            on_tail()
        pos = common
        for start, stop, zero in longer.zero_runs():
            if stop <= common:
                continue
            start = max(start, common)
            pos = start
            while not zero and pos < stop:
                n = min(CHUNK, stop - pos)
                longer.read(pos, (view_a if longer is a else view_b)[:n])
                i = _first_nonzero((buf_a if longer is a else buf_b)[:n])
                if i >= 0:
                    return outcome("content", pos + i, pos)
                pos += n
                tell(pos)
            tell(stop)
    tell(total)
    return outcome("identical", None)


def compare_outcome(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    a_format: str | None = None,
    b_format: str | None = None,
    strict: bool = False,
    force_share: bool = False,
    progress: Callable[[int, int], object] | None = None,
    on_tail: Callable[[], object] | None = None,
    a_secret: str | bytes | None = None,
    b_secret: str | bytes | None = None,
) -> CompareOutcome:
    """:func:`compare`, with what was found in detail (:class:`CompareOutcome`). *on_tail* is
    called when the disks' sizes differ and their common part compared equal, before the
    rest of the longer disk is checked for zeros (where qemu-img prints its size warning)."""
    disk_a = _Disk(os.fspath(a), a_format, force_share, a_secret)
    try:
        disk_b = _Disk(os.fspath(b), b_format, force_share, b_secret)
        try:
            return _compare_disks(disk_a, disk_b, strict, progress, on_tail)
        finally:
            disk_b.close()
    finally:
        disk_a.close()


def compare(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    a_format: str | None = None,
    b_format: str | None = None,
    strict: bool = False,
    force_share: bool = False,
    progress: Callable[[int, int], object] | None = None,
    a_secret: str | bytes | None = None,
    b_secret: str | bytes | None = None,
) -> int | None:
    """Compare the guest disks of *a* and *b* (qcow2 images with their backing chains, or raw
    files; *a_format* and *b_format* ``"qcow2"`` or ``"raw"``, probed by default), as
    ``qemu-img compare`` does.

    Returns None when they hold the same bytes, else the offset of the first byte that differs
    (``qemu-img compare`` prints the start of that byte's 512-byte sector). A disk shorter than
    the other compares as if it went on with zeros (a raw file reads as zeros up to a whole
    sector). With *strict* (``-s``), disks of different sizes differ at the smaller size, and
    so do disks whose block status differs (one allocates a range the other leaves
    unallocated, or one reads a range as zeros the other holds as data, ...): at the first
    offset where it does, unless their bytes differ before it.

    *a_secret* and *b_secret* unlock encrypted images (see :func:`qcow2ovl.open`).
    *force_share* (``-U``) opens them beside a writer. *progress* is called as
    ``progress(done, total)`` with rising guest byte counts, *total* being the larger size,
    from 0, ending at *total* when the disks were compared to the end (a difference stops the
    comparison where it is found).

    Raises :class:`ValueError` for an unknown format, :class:`OSError` (and the errors of
    :func:`qcow2ovl.open`) if a disk cannot be opened, and :class:`CompareReadError` (an
    ``OSError``) if a read fails during the comparison.
    """
    found = compare_outcome(
        a,
        b,
        a_format=a_format,
        b_format=b_format,
        strict=strict,
        force_share=force_share,
        progress=progress,
        a_secret=a_secret,
        b_secret=b_secret,
    )
    return found.offset


__all__ = ["CHUNK", "FORMATS", "CompareOutcome", "CompareReadError", "compare", "compare_outcome"]
