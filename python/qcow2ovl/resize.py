"""Resizing images: :func:`resize`, with ``qemu-img resize``'s rules and messages.

A qcow2 image is resized through the guarded engine: growing may move the L1 table to a larger
one; shrinking first discards every whole cluster past the new end (the data there is gone, as
with ``qemu-img resize --shrink``), then shortens the disk. A raw file is truncated (or
extended, with ``falloc`` or ``full`` preallocation), under QEMU's locks for a raw resize.
"""

from __future__ import annotations

import os
import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Literal, Union

    from qcow2ovl.image import Image
    from qcow2ovl.options import OverlapCheckSpec

    PathArg = Union[str, os.PathLike[str]]
    #: Accepted ``preallocation`` values (QEMU's names).
    Preallocation = Literal["off", "metadata", "falloc", "full"]
    #: Accepted ``locking`` values (QEMU's ``file.locking``).
    Locking = Literal["auto", "on", "off"]

_PREALLOCATION = ("off", "metadata", "falloc", "full")
#: The largest length QEMU's block layer takes: INT64_MAX rounded down to a whole GiB.
MAX_LENGTH = 2**63 - 2**30
#: The largest L1 table QEMU writes (32 MiB of 8-byte entries).
_MAX_L1_ENTRIES = (32 << 20) // 8
_SECTOR = 512
#: Zeros are written in pieces of this size (preallocation=full, falloc).
_CHUNK = 8 << 20

SHRINK_REFUSED = "Use the --shrink option to perform a shrink operation."
#: qemu-img's warning after :data:`SHRINK_REFUSED`.
SHRINK_WARNING = (
    "Shrinking an image will delete all data beyond the shrunken image's end. Before "
    "performing such an operation, make sure there is no important data there."
)
SIZE_EXPECTED = (
    "Parameter 'size' expects a non-negative number below 2^64\n"
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
    "and exabytes, respectively."
)
#: qemu-img's warning when it guessed raw for a file it writes.
RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions."
)
#: Magic numbers (at offset 0) of QEMU's other formats, so that probing never takes one for
#: raw and truncates it.
_OTHER_MAGIC = {
    b"KDMV": "vmdk",
    b"# Disk DescriptorFile": "vmdk",
    b"vhdxfile": "vhdx",
    b"conectix": "vpc",
    b"QED\0": "qed",
    b"LUKS\xba\xbe": "luks",
    b"WithoutFreeSpace": "parallels",
    b"WithouFreSpacExt": "parallels",
}
#: QEMU's lock bytes: permission i is held at 100 + i and refused to others at 200 + i.
_PERM_NAMES = {0: "consistent read", 1: "write", 3: "resize"}


def _int64(n: int) -> int:
    """*n* as a C ``int64_t`` holds it (qemu-img computes the new size in one)."""
    return (n + 2**63) % 2**64 - 2**63


def parse_size(text: str) -> tuple[str, int]:
    """qemu-img resize's ``[+-]SIZE``: the sign (``""``, ``"+"`` or ``"-"``) and the amount,
    in qemu-img's size syntax (``qcow2ovl._cli_create.parse_size``). Raises ValueError with
    qemu-img's message."""
    from qcow2ovl._cli_create import parse_size as parse_amount

    sign = text[:1] if text[:1] in ("+", "-") else ""
    rest = text[len(sign) :]
    stripped = rest.lstrip()
    if stripped.startswith("-"):
        # A second minus: C's strtoull reads a bare "-N" as out of range, anything else as junk.
        if re.fullmatch(r"-\d+", stripped, re.ASCII):
            raise ValueError(f"Value '{rest}' is out of range for parameter 'size'")
        raise ValueError(SIZE_EXPECTED)
    amount = parse_amount(rest)
    if amount is None:
        raise ValueError(SIZE_EXPECTED)
    if amount < 0:
        raise ValueError(f"Value '{rest}' is out of range for parameter 'size'")
    return sign, amount


def _check_preallocation(preallocation: str | None) -> str:
    mode = "off" if preallocation is None else preallocation
    if mode not in _PREALLOCATION:
        raise ValueError(f"Invalid preallocation mode '{preallocation}'")
    return mode


def _new_size(size: int | str, current: int) -> int:
    """The new size from *size* (bytes, or qemu-img's ``[+-]SIZE`` text) and the current size,
    computed in an ``int64_t`` as qemu-img computes it."""
    if isinstance(size, str):
        sign, amount = parse_size(size)
        if sign == "+":
            return _int64(current + _int64(amount))
        if sign == "-":
            return _int64(current - _int64(amount))
        return _int64(amount)
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int or a str, not {type(size).__name__}")
    return size


def _check_common(total: int, current: int, shrink: bool, mode: str) -> None:
    """qemu-img's checks of the new size, in its order, before the format's own."""
    if total <= 0:
        raise ValueError("New image size must be positive")
    if mode != "off" and total <= current:
        raise ValueError("Preallocation can only be used for growing images")
    if total < current and not shrink:
        raise ValueError(SHRINK_REFUSED)
    if total > MAX_LENGTH:
        raise ValueError(f"offset({total}) exceeds maximum({MAX_LENGTH})")


def _probe(path: str) -> str:
    """qemu-img's format probe for what qcow2ovl resizes: ``qcow2``, ``raw``, or the name of
    another QEMU format (refused)."""
    from qcow2ovl._format import QCOW2_MAGIC

    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] == QCOW2_MAGIC:
        return "qcow2"
    for magic, name in _OTHER_MAGIC.items():
        if head.startswith(magic):
            return name
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "vdi"
    return "raw"


def _check_format(fmt: str) -> None:
    if fmt in ("qcow2", "raw"):
        return
    from qcow2ovl.convert import _OTHER_FORMATS

    if fmt in _OTHER_FORMATS:
        raise ValueError(f"format '{fmt}' is not supported by qcow2ovl resize (qcow2 and raw are)")
    raise ValueError(f"Unknown driver '{fmt}'")


class _Target:
    """An image opened for :func:`resize`: a writable qcow2 handle, or a raw file's descriptor
    with QEMU's raw-resize locks. ``probed`` is whether the format was guessed."""

    def __init__(self, path: str, fmt: str, probed: bool) -> None:
        self.path = path
        self.format = fmt
        self.probed = probed
        self.image: Image | None = None
        self.fd = -1

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
            self.image = None
        if self.fd >= 0:
            os.close(self.fd)  # drops the locks
            self.fd = -1

    def __enter__(self) -> _Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock_raw(fd: int, path: str, locking: str) -> None:
    """QEMU's locks of a raw file being resized: it holds consistent read, write and resize
    (bytes 100, 101, 103) and refuses nothing to others, so it fails only where another open
    refuses one of those (byte 200, 201 or 203). Where the system has no OFD locks, ``auto``
    goes without and ``on`` takes process-wide POSIX locks."""
    import fcntl
    import struct

    from qcow2ovl.errors import LockError

    if locking == "off":
        return
    ofd = getattr(fcntl, "F_OFD_SETLK", None)
    setlk, getlk = (ofd, getattr(fcntl, "F_OFD_GETLK", None)) if ofd else (None, None)
    if setlk is None or getlk is None:
        if locking != "on":
            return
        setlk, getlk = fcntl.F_SETLK, fcntl.F_GETLK

    def flock(kind: int, byte: int) -> bytes:
        return struct.pack("hhqqi4x", kind, os.SEEK_SET, byte, 1, 0)

    for i in _PERM_NAMES:
        fcntl.fcntl(fd, setlk, flock(fcntl.F_RDLCK, 100 + i))
    for i, name in _PERM_NAMES.items():
        answer = fcntl.fcntl(fd, getlk, flock(fcntl.F_WRLCK, 200 + i))
        if struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK:
            for j in _PERM_NAMES:
                fcntl.fcntl(fd, setlk, flock(fcntl.F_UNLCK, 100 + j))
            raise LockError(
                f'Failed to get "{name}" lock\nIs another process using the image [{path}]?', path
            )


def _open_target(
    path: PathArg,
    fmt: str | None,
    *,
    overlap_check: OverlapCheckSpec = "all",
    locking: Locking = "auto",
) -> _Target:
    """Opens *path* for resizing (probing the format when *fmt* is None), with its locks."""
    name = os.fsdecode(os.fspath(path))
    probed = fmt is None
    chosen = _probe(name) if fmt is None else fmt
    _check_format(chosen)
    target = _Target(name, chosen, probed)
    if chosen == "qcow2":
        from qcow2ovl.image import open as open_image

        target.image = open_image(name, writable=True, overlap_check=overlap_check, locking=locking)
        return target
    if locking not in ("auto", "on", "off"):
        raise ValueError(f"invalid parameter value: {locking}")
    target.fd = os.open(name, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        _lock_raw(target.fd, name, locking)
    except BaseException:
        target.close()
        raise
    return target


def _zero_pieces(start: int, end: int) -> Iterator[tuple[int, int]]:
    at = start
    while at < end:
        n = min(_CHUNK, end - at)
        yield at, n
        at += n


def _resize_raw(
    fd: int,
    size: int | str,
    shrink: bool,
    mode: str,
    progress: Callable[[int, int], object] | None,
) -> int:
    length = os.lseek(fd, 0, os.SEEK_END)
    current = -(-length // _SECTOR) * _SECTOR  # QEMU sees whole sectors
    total = _new_size(size, current)
    _check_common(total, current, shrink, mode)
    if mode == "metadata":
        raise ValueError("Unsupported preallocation mode: metadata")
    try:
        if mode == "falloc" and total > length:
            os.posix_fallocate(fd, length, total - length)
        elif mode == "full" and total > length:
            zeros = bytes(min(_CHUNK, total - length))
            for at, n in _zero_pieces(length, total):
                os.pwrite(fd, zeros[:n], at)
                if progress is not None:
                    progress(at + n - length, total - length)
        else:
            os.ftruncate(fd, total)
        if length == 0:
            # As QEMU's file driver does for a file it grows from nothing: its first block is
            # written (and so allocated): 512 bytes under 4 KiB, else 4 KiB.
            os.pwrite(fd, bytes(_SECTOR if total < 4096 else 4096), 0)
        os.fdatasync(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"Could not resize file: {exc.strerror}") from exc
    return total


def _backing_length(image: Image) -> int | None:
    """The length of the image's backing file as QEMU sees it (a qcow2 backing file's virtual
    size, a raw one's whole sectors), or None without one."""
    info = image.info
    if info.backing_file is None:
        return None
    from qcow2ovl.create import _backing_size, _resolve

    backing = _resolve(image.path, info.backing_file)
    fmt = info.backing_format or _probe(backing)
    return _backing_size(backing, fmt)


def _resize_qcow2(
    image: Image,
    size: int | str,
    shrink: bool,
    mode: str,
    progress: Callable[[int, int], object] | None,
) -> int:
    from qcow2ovl.errors import BitmapError, UnsupportedError

    current = image.virtual_size
    total = _new_size(size, current)
    _check_common(total, current, shrink, mode)
    # The qcow2 driver's refusals, in its order; each before anything changes.
    if total % _SECTOR:
        raise ValueError("The new size must be a multiple of 512")
    info = image.info
    if info.version < 3 and image.snapshots:
        raise UnsupportedError("Can't resize a v2 image which has snapshots")
    for bitmap in image.bitmaps:
        if bitmap.inconsistent:
            raise BitmapError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")
    cluster = info.cluster_size
    per_l1_entry = cluster * (cluster // (16 if info.extended_l2 else 8))
    entries = -(-total // per_l1_entry)
    if entries > info.l1_size and entries > _MAX_L1_ENTRIES:
        raise UnsupportedError("Failed to grow the L1 table: File too large")
    # Growing over a backing file that is longer than the disk: QEMU zeroes the new part, lest
    # the backing file's data show through. Version 2 has no zero clusters for that.
    zero_fill = False
    if total > current and mode in ("off", "metadata"):
        backing = _backing_length(image)
        zero_fill = backing is not None and backing > current
        if zero_fill and info.version < 3:
            raise UnsupportedError("Failed to zero out new clusters: Operation not supported")
    if mode == "metadata":
        raise UnsupportedError(
            "qcow2ovl cannot resize a qcow2 image with preallocation=metadata yet (off, falloc "
            "and full are supported)"
        )
    if total == current:
        return total
    # What is discarded past the new end, preallocated or zeroed is no guest write: no bitmap
    # marks it in QEMU, so the enabled ones are paused meanwhile.
    paused = [b.name for b in image.bitmaps if b.auto]
    for name in paused:
        image.disable_bitmap(name)
    try:
        if total < current:
            # Every whole cluster past the new end is discarded and freed (the cluster the new
            # end falls in stays, as in QEMU); then the disk is shortened.
            start = min(current, -(-total // cluster) * cluster)
            if start < current:
                image.discard(start, current - start)
            image.resize(total)
        else:
            image.resize(total)
            if mode in ("falloc", "full") or zero_fill:
                _fill(image, current, total, cluster, mode == "off", progress)
    finally:
        for name in paused:
            image.enable_bitmap(name)
    image.flush()
    return total


def _fill(
    image: Image,
    current: int,
    total: int,
    cluster: int,
    zero_clusters: bool,
    progress: Callable[[int, int], object] | None,
) -> None:
    """Fills the new part ``[current, total)``: zero clusters, or zeros written."""
    if not zero_clusters:
        # The new part allocated and written with zeros (falloc too: the engine has no way to
        # reserve clusters without writing them).
        zeros = bytes(min(_CHUNK, total - current))
        for at, n in _zero_pieces(current, total):
            image.write(at, memoryview(zeros)[:n])
            if progress is not None:
                progress(at + n - current, total - current)
        return
    # Zero clusters up to the end, the last one too when the end falls inside it (QEMU zeroes
    # that whole cluster; a write of zeros into its head would allocate it): the disk is grown
    # to the cluster boundary for the zero write, then set to its size.
    aligned = -(-total // cluster) * cluster
    if aligned != total:
        image.resize(aligned)
    image.write_zeroes(current, aligned - current)
    if aligned != total:
        image.resize(total)


def resize(
    path: PathArg,
    size: int | str,
    *,
    shrink: bool = False,
    preallocation: Preallocation | None = None,
    format: str | None = None,  # noqa: A002 - qemu-img's name (-f)
    progress: Callable[[int, int], object] | None = None,
    overlap_check: OverlapCheckSpec = "all",
    locking: Locking = "auto",
) -> int:
    """Resize the image at *path* as ``qemu-img resize`` does; returns the new virtual size.

    *size* is the new size in bytes, or a string in qemu-img's syntax: ``"10G"``, or relative
    to the current size, ``"+1G"`` or ``"-512M"`` (suffixes ``b k M G T P E``, case-insensitive,
    1024-based). A size below the current one is refused unless *shrink* (qemu-img's
    ``--shrink``): shrinking a qcow2 image discards every whole cluster past the new end, so
    the data there is gone; the cluster the new end falls in is kept (its tail reads again if
    the image grows back), as in QEMU.

    *format* is ``"qcow2"`` or ``"raw"``, probed by default (a file that does not start with
    the qcow2 magic is raw, as qemu-img guesses; the ``qcow2ovl`` logger warns then). A qcow2
    image is opened writable through the guarded engine (*overlap_check*, *locking* as for
    :func:`qcow2ovl.open`); its new size must be a multiple of 512. Growing a qcow2 image
    whose backing file is longer than the disk makes the new part read as zeros (zero
    clusters), as QEMU does. A raw file is truncated to the new size (any byte count).

    *preallocation* is for growing only: ``"off"`` (the default), ``"falloc"`` or ``"full"``
    (the new part allocated; for qcow2 both write zeros through the engine, for raw ``falloc``
    reserves the space and ``full`` writes zeros), ``"metadata"`` (raw: refused, as qemu-img
    refuses it; qcow2: not supported yet, :class:`~qcow2ovl.UnsupportedError`). *progress*, if
    given, is called with ``(done, total)`` bytes as preallocation writes the new part.

    Refusals leave the file as it was, with qemu-img's words: :class:`ValueError` (``Use the
    --shrink option to perform a shrink operation.``, ``New image size must be positive``,
    ``The new size must be a multiple of 512``, ``Preallocation can only be used for growing
    images``, a size that does not parse), :class:`~qcow2ovl.UnsupportedError` (``Can't resize
    a v2 image which has snapshots``, ``Failed to grow the L1 table: File too large``, ``Failed
    to zero out new clusters: Operation not supported`` for a version 2 image over a longer
    backing file), :class:`~qcow2ovl.BitmapError` (an inconsistent bitmap),
    :class:`~qcow2ovl.LockError` (the image is in use), :class:`OSError` (the file cannot be
    opened; a raw file that cannot be resized: ``Could not resize file: ...``).
    """
    mode = _check_preallocation(preallocation)
    if isinstance(size, str):
        parse_size(size)  # a size that does not parse is refused before the file is opened
    with _open_target(path, format, overlap_check=overlap_check, locking=locking) as target:
        if target.probed and target.format == "raw":
            import logging

            logging.getLogger("qcow2ovl").warning(
                "%s: the format was not given and probing guessed raw; resizing it as raw",
                target.path,
            )
        return _apply(target, size, shrink=shrink, preallocation=mode, progress=progress)


def _apply(
    target: _Target,
    size: int | str,
    *,
    shrink: bool,
    preallocation: str,
    progress: Callable[[int, int], object] | None,
) -> int:
    """The resize proper, on an opened target (the command line opens it first to word open
    errors as qemu-img does)."""
    if target.image is not None:
        return _resize_qcow2(target.image, size, shrink, preallocation, progress)
    return _resize_raw(target.fd, size, shrink, preallocation, progress)


__all__ = ["resize"]
