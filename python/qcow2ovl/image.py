"""Opening qcow2 images: :func:`open` and :class:`Image`."""

from __future__ import annotations

import io
import os

from qcow2ovl import _core, _lifecycle, options
from qcow2ovl.errors import InconsistentImageError
from qcow2ovl.options import OverlapCheck
from qcow2ovl.records import Bitmap as Bitmap
from qcow2ovl.records import CheckResult, check_result, from_fields, from_rows
from qcow2ovl.records import GuestExtent as GuestExtent
from qcow2ovl.records import ImageInfo as ImageInfo
from qcow2ovl.records import Problem as Problem
from qcow2ovl.records import Snapshot as Snapshot
from qcow2ovl.types import MetadataType

# Startup time: typing and collections.abc are for type checkers only; logging, warnings,
# weakref and atexit are imported when first needed.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from types import TracebackType
    from typing import IO, Any, Literal, Union

    from typing_extensions import Buffer

    from qcow2ovl.options import OverlapCheckSpec

    PathArg = Union[str, bytes, os.PathLike[str], os.PathLike[bytes]]
    Locking = Literal["auto", "on", "off"]
    CacheMode = Literal["writeback", "writethrough", "unsafe", "none", "directsync"]
    CorruptionCallback = Callable[[str, int, int, bool], object]


class GuestStream(io.RawIOBase):
    """The guest disk of an :class:`Image` as a seekable binary stream, writable when the
    image is.

    Hand it to anything that reads files: ``shutil.copyfileobj``, ``tarfile``, a filesystem
    parser. Reads past the end of the disk return ``b""``; writes past it raise ``ValueError``
    (resize the image first). Closing the stream leaves the image open. Use
    ``io.BufferedReader(stream)`` for many small reads.
    """

    def __init__(self, image: Image) -> None:
        super().__init__()
        self._image = image
        self._size = image.virtual_size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self._image.writable

    def seekable(self) -> bool:
        return True

    def write(self, data: Buffer) -> int:
        self._check_open()
        if not self._image.writable:
            raise io.UnsupportedOperation("the image is open read-only")
        n = self._image.write(self._pos, data)
        self._pos += n
        return n

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        import operator

        offset = operator.index(offset)  # ints only, as io.BytesIO: 1.5 is a TypeError
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: Buffer) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        if n == 0:
            return 0
        self._image.readinto(self._pos, view[:n])
        self._pos += n
        return n

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed stream")


class _Reporting:
    """The context manager of :meth:`Image._reporting` (a class: ``contextlib`` would cost
    ``import qcow2ovl`` a few milliseconds)."""

    __slots__ = ("_image",)

    def __init__(self, image: Image) -> None:
        self._image = image

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, InconsistentImageError):
            self._image._tell_corruption(exc)


class Image:
    """An open qcow2 image: its header facts, snapshots, bitmaps and metadata map.

    Use :func:`open`; close with :meth:`close` or a ``with`` block.

    Durability: guest data is written at once, but the tables that make it reachable (L2
    tables, refcounts, the header) reach the disk in order only at :meth:`flush` and
    :meth:`close`; after either returns, every write before it is on disk (``fdatasync``). A
    writable image that is collected, or still open at interpreter exit, is flushed and closed
    then, with a :class:`ResourceWarning`, as Python's files are.
    """

    def __init__(
        self,
        core: _core.Image,
        path: str,
        overlap_check: OverlapCheck,
        on_corruption: CorruptionCallback | None = None,
    ) -> None:
        self._core = core
        self.path = path
        self.overlap_check = overlap_check
        self._on_corruption = on_corruption
        self._corruption_reported = False
        self._writable = core.writable  # still known after close
        info = dict(core.info())
        features: Any = info["features"]
        info["features"] = tuple(features)
        #: The header facts as opened; :attr:`info` updates the ones that change.
        self._opened_info: dict[str, Any] = info
        if core.writable:
            _lifecycle.track(self)

    @property
    def info(self) -> ImageInfo:
        """The image's header facts (:class:`ImageInfo`), made at each access: the virtual size
        and file size as they are now (after :meth:`resize` or :meth:`apply_snapshot` too)."""
        info = dict(self._opened_info)
        if not self._core.closed:
            info["virtual_size"] = self._core.virtual_size
        try:
            info["file_size"] = os.stat(self.path).st_size
        except OSError:
            pass  # the file went away: its size at open
        if self._corruption_reported:
            info["corrupt"] = True
        result: ImageInfo = from_fields(ImageInfo, info)
        return result

    @property
    def writable(self) -> bool:
        """Whether the image was opened read-write."""
        return self._core.writable

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._core.closed

    def check_overlap(self, offset: int, size: int, ignore: int = 0) -> MetadataType:
        """The metadata types a write of *size* bytes at host *offset* would overwrite.

        The pre-write check, without side effects: the range is rounded out to clusters, and the
        result is the OR of every checked type in it minus *ignore* (empty means safe).
        """
        return self._core.check_overlap(offset, size, ignore)

    def metadata_extents(self) -> Sequence[tuple[int, int, MetadataType]]:
        """Every metadata extent ``(host offset, length, types)``, sorted, equal neighbours
        merged: a compact read-only sequence (held in Rust, tuples made on access)."""
        return self._core.metadata_extents()

    def map_memory_usage(self) -> int:
        """Bytes held by the metadata map."""
        return self._core.map_memory_usage()

    def unchecked_ranges(self) -> list[tuple[int, int]]:
        """Host ranges the map's memory limit kept out (checked the naive way instead)."""
        return self._core.unchecked_ranges()

    @property
    def problems(self) -> list[Problem]:
        """Inconsistencies the scan found (at most 64 listed; see :attr:`problem_count`):
        unaligned or out-of-file table pointers, metadata structures sharing clusters (which
        make a writable open fail), unusable snapshot tables."""
        return from_rows(Problem, self._core.problems()[0])

    @property
    def problem_count(self) -> int:
        """How many problems the scan found in all (more than listed when there are many)."""
        return self._core.problems()[1]

    @property
    def virtual_size(self) -> int:
        """Size of the guest disk in bytes."""
        return self._core.virtual_size

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset + length)``.

        The range must lie inside the virtual disk (else ``ValueError``). Unallocated ranges
        read from the backing chain or as zeros, compressed clusters are decompressed, data of
        images with an external data file comes from that file. Encrypted images raise
        :class:`~qcow2ovl.UnsupportedError`. Safe to call from several threads at once; the GIL
        is released during I/O.
        """
        return self._core.read(offset, length)

    def readinto(self, offset: int, buffer: Buffer) -> int:
        """Fill *buffer* (any writable, C-contiguous buffer: ``bytearray``, ``memoryview``,
        ``mmap``, ...) with guest bytes from *offset*; returns its length."""
        return self._core.readinto(offset, buffer)

    def stream(self) -> GuestStream:
        """The guest disk as a readable, seekable binary stream (:class:`GuestStream`)."""
        return GuestStream(self)

    def guest_map(self) -> list[GuestExtent]:
        """The guest disk's ranges as ``qemu-img map --output=json`` reports them, merged the
        same way (see :class:`GuestExtent`). The list is as long as the disk is fragmented
        (``MemoryError`` if it cannot be held); :meth:`iter_guest_map` needs bounded memory."""
        return from_rows(GuestExtent, self._core.guest_map())

    def iter_guest_map(self, chunk: int = 65536) -> Iterator[GuestExtent]:
        """The entries of :meth:`guest_map`, computed *chunk* at a time: memory stays bounded
        however fragmented the disk is (an image's bytes can map every cluster apart)."""
        for row in self._guest_map_rows(chunk):
            yield GuestExtent(*row)

    def _guest_map_rows(
        self, chunk: int = 65536
    ) -> Iterator[tuple[int, int, int, bool, bool, bool, bool, int | None]]:
        """The rows behind :meth:`iter_guest_map` (fields in :class:`GuestExtent` order)."""
        start, size = 0, self.virtual_size
        while start < size:
            rows, start = self._core.guest_map_chunk(start, chunk)
            yield from rows

    def host_offset(self, guest_offset: int) -> int | None:
        """Where this image stores guest byte *guest_offset*: its host offset (in the external
        data file when there is one), or ``None`` for unallocated, zero and compressed clusters.
        With :meth:`check_overlap` this answers "would a write of guest data here hit
        metadata?"."""
        return self._core.host_offset(guest_offset)

    # ---- writing (images opened with writable=True) ------------------------------------------

    def _reporting(self) -> _Reporting:
        """A ``with`` block for a write-side call: an error that marked the image corrupt (a
        refused overlapping write, or an inconsistency met while writing) is told to the
        ``qcow2ovl`` logger and the ``on_corruption`` callback, once per handle (as QEMU
        suppresses further corruption events), and raised."""
        return _Reporting(self)

    def _tell_corruption(self, e: InconsistentImageError) -> None:
        if self._corruption_reported or not self._writable:
            return
        self._corruption_reported = True
        import logging

        logging.getLogger("qcow2ovl").error(
            "qcow2: Marking image as corrupt: %s; further corruption events will be suppressed",
            e.strerror,
        )
        if self._on_corruption is not None:
            offset = getattr(e, "offset", 0)
            size = getattr(e, "size", 0)
            self._on_corruption(str(e.strerror), offset, size, True)

    def write(self, offset: int, data: Buffer) -> int:
        """Write *data* (any bytes-like object) at guest *offset*; returns its length.

        Every host write is checked against the metadata map first. A write that would land on
        metadata is refused before a byte reaches the disk: the image is marked corrupt,
        :class:`~qcow2ovl.MetadataOverlapError` is raised, the ``on_corruption`` callback and the
        ``qcow2ovl`` logger hear of it, and the handle refuses every later write.
        """
        with self._reporting():
            return self._core.write(offset, data)

    def write_compressed(self, offset: int, data: Buffer) -> bool:
        """Write one whole guest cluster (aligned; the rest of the disk for a last, partial
        cluster) compressed with the image's compression type, packed after the previous
        compressed cluster as QEMU packs them. Data that does not shrink is written plainly.
        Returns whether it was stored compressed."""
        with self._reporting():
            return self._core.write_compressed(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make ``[offset, offset + length)`` read as zeros: whole clusters by the zero flag
        (version 3; with *unmap* their clusters are freed), the rest by writing zeros."""
        with self._reporting():
            self._core.write_zeroes(offset, length, unmap)

    def discard(self, offset: int, length: int) -> None:
        """Discard the whole clusters of ``[offset, offset + length)`` and free them: they then
        read as zeros (version 3) or from the backing file (version 2), and the host clusters
        no snapshot shares give their space back to the file system (holes punched, as QEMU
        does). Partial clusters are left alone, as QEMU does."""
        with self._reporting():
            self._core.discard(offset, length)

    def resize(self, size: int) -> None:
        """Change the virtual size (a multiple of 512). Growing may move the L1 table;
        shrinking is refused while anything is allocated past the new end."""
        with self._reporting():
            self._core.resize(size)

    @property
    def bitmaps(self) -> list[Bitmap]:
        """The persistent bitmaps, in directory order (see :class:`Bitmap`)."""
        return [from_fields(Bitmap, b) for b in self._core.bitmaps()]

    def dirty_extents(
        self, name: str, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int]]:
        """The guest ranges ``(offset, length)`` that bitmap *name* marks dirty inside
        ``[offset, offset + length)`` (to the end of the disk by default), merged and in order:
        what changed since the bitmap was added or cleared, while it was enabled, at its
        granularity (a range covers whole granules, the last one cut at the disk's end).

        Raises :class:`~qcow2ovl.BitmapError` for a bitmap that is not there or is
        inconsistent. On a writable handle the answer includes this handle's own writes.
        """
        return _core.dirty_extents(self._core, name, offset, length)

    def add_bitmap(
        self, name: str, *, granularity: int | None = None, enabled: bool = True
    ) -> None:
        """Add an empty persistent bitmap *name* (as ``qemu-img bitmap --add``): *granularity*
        bytes per bit, a power of two from 512 (by default QEMU's rule: the cluster size within
        4 KiB and 64 KiB); *enabled* bitmaps are marked by every later write. Stored at
        :meth:`close`, like every bitmap change."""
        with self._reporting():
            _core.bitmap_add(self._core, name, granularity, enabled)

    def remove_bitmap(self, name: str) -> None:
        """Remove bitmap *name*, consistent or not; its clusters are freed at :meth:`close`."""
        with self._reporting():
            _core.bitmap_remove(self._core, name)

    def clear_bitmap(self, name: str) -> None:
        """Clear every bit of bitmap *name* (the start of a new incremental-backup period)."""
        with self._reporting():
            _core.bitmap_clear(self._core, name)

    def enable_bitmap(self, name: str) -> None:
        """Let later writes mark bitmap *name*."""
        with self._reporting():
            _core.bitmap_enable(self._core, name, True)

    def disable_bitmap(self, name: str) -> None:
        """Stop later writes from marking bitmap *name* (its bits stay)."""
        with self._reporting():
            _core.bitmap_enable(self._core, name, False)

    def merge_bitmap(self, target: str, source: str, *, source_image: Image | None = None) -> None:
        """Mark in bitmap *target* every range bitmap *source* marks (of *source_image* when
        given, an open image of the same disk, else of this image), as ``qemu-img bitmap
        --merge``."""
        other = None if source_image is None else source_image._core
        with self._reporting():
            _core.bitmap_merge(self._core, target, source, other)

    @property
    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots, in table order, as they are now."""
        return [from_fields(Snapshot, s) for s in self._core.snapshots()]

    def create_snapshot(
        self,
        name: str,
        *,
        id: str | None = None,  # noqa: A002 - QEMU's word for it
        vm_state_size: int = 0,
    ) -> Snapshot:
        """Take an internal snapshot of the active disk, as ``qemu-img snapshot -c`` does.

        *name* must be new among the snapshot names (1 to 255 bytes); *id* must be new among the
        ids (by default the next free number). *vm_state_size* is only recorded: no VM state is
        stored. Nothing is copied: the snapshot shares every cluster with the active disk until
        a write copies one. Raises :class:`ValueError` for a taken or invalid name or id and
        :class:`~qcow2ovl.errors.UnsupportedError` when the image cannot take snapshots (an
        external data file, or a refcount that would overflow, such as any allocated cluster
        with ``refcount_bits=1``); either way nothing changed.
        """
        return self._snapshot_op(
            "created", lambda: self._core.create_snapshot(name, id, vm_state_size)
        )

    def delete_snapshot(self, name_or_id: str) -> Snapshot:
        """Delete the snapshot with this id (else this name), as ``qemu-img snapshot -d``
        does, freeing the clusters only it used; returns the deleted entry. A missing one
        raises :class:`~qcow2ovl.SnapshotNotFoundError`."""
        return self._snapshot_op("deleted", lambda: self._core.delete_snapshot(name_or_id))

    def apply_snapshot(self, name_or_id: str) -> Snapshot:
        """Revert the active disk to the snapshot with this id (else this name), as
        ``qemu-img snapshot -a`` does: its data and its disk size. The snapshot stays; what only
        the old active disk used is freed. Returns the entry. A missing one raises
        :class:`~qcow2ovl.SnapshotNotFoundError`."""
        return self._snapshot_op("applied", lambda: self._core.apply_snapshot(name_or_id))

    def _snapshot_op(self, done: str, op: Callable[[], Mapping[str, Any]]) -> Snapshot:
        with self._reporting():
            entry: Snapshot = from_fields(Snapshot, op())
        import logging

        logging.getLogger("qcow2ovl").info(
            "%s: %s snapshot %r (id %s)", self.path, done, entry.name, entry.id
        )
        return entry

    def flush(self) -> None:
        """Write back tables and refcounts in a crash-safe order and make them durable: once
        it returns, every write before it survives a crash (a no-op for read-only images).

        When it fails (``OSError``: a full disk, ``EFBIG`` past a file size limit), nothing
        is lost from the handle: what did not reach the disk stays in memory, and calling
        :meth:`flush` again once the cause is gone writes it, in the same safe order. The
        disk meanwhile holds a consistent image (at worst with leaked clusters).
        """
        with self._reporting():
            self._core.flush()

    def check(self, progress: Callable[[int, int], object] | None = None) -> CheckResult:
        """Check the image as ``qemu-img check`` does, naming every metadata overlap (see
        :mod:`qcow2ovl.check`); *progress* is called with ``(done, total)`` as it goes."""
        return check_result(self.path, _core.check_image(self._core, progress))

    def render_layout(
        self,
        *,
        columns: int = 64,
        max_cells: int = 4096,
        cell_size: int = 12,
        check: CheckResult | None = None,
        title: str | None = None,
    ) -> str:
        """An SVG picture of the host file's clusters coloured by metadata type, with overlaps
        and problems in red (see :mod:`qcow2ovl.picture`).

        *columns* cells per row; at most *max_cells* cells (clusters are grouped per cell beyond
        that); *cell_size* pixels per cell. *check* is a :meth:`check` of this image (run now
        when not given): it tells data from free clusters and marks problems. *title* defaults
        to the image's file name.
        """
        from qcow2ovl import _layout_svg

        _layout_svg.check_options(columns, max_cells, cell_size)
        info = self.info
        return _layout_svg.draw(
            title=title or os.path.basename(self.path) or self.path,
            cluster_size=info.cluster_size,
            file_size=info.file_size,
            metadata_extents=self.metadata_extents(),
            problems=[(p.offset, p.size) for p in self.problems],
            check=check if check is not None else self.check(),
            columns=columns,
            max_cells=max_cells,
            cell_size=cell_size,
        )

    def close(self) -> None:
        """Flush (writable images), store the persistent bitmaps this handle's writes marked
        (QEMU stores them at close, not at :meth:`flush`), and release the image. Safe to call
        twice. A process that dies before ``close`` leaves those bitmaps in use on disk:
        inconsistent, as QEMU leaves them, never stale.

        If the flush fails, the error is raised and the image stays open with every change
        not yet on disk: call :meth:`close` (or :meth:`flush`) again once the cause is gone. A
        handle dropped after that loses those changes, and the ``qcow2ovl`` logger says so. A
        flush that finds corruption (a refcount the image had too low) marks the image corrupt,
        closes the handle all the same and raises :class:`InconsistentImageError`.
        """
        try:
            with self._reporting():
                self._core.close()
        except OSError as e:
            if not self._core.closed and e.strerror:
                e.strerror = (
                    f"{e.strerror} (the image is still open, with the changes not yet on "
                    "disk: fix the cause, e.g. free space, and call close() or flush() again)"
                )
            raise

    def __del__(self) -> None:
        if _lifecycle is not None:  # None late in interpreter shutdown
            _lifecycle.finalize(self, "collected while open")

    def __enter__(self) -> Image:
        if self.closed:
            raise ValueError("I/O operation on closed image")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("rw" if self.writable else "ro")
        return f"<qcow2ovl.Image {self.path!r} {state} overlap_check={self.overlap_check}>"


def open(  # noqa: A001 - mirrors the builtin on purpose, like gzip.open
    path: PathArg | IO[bytes],
    *,
    writable: bool = False,
    overlap_check: OverlapCheckSpec = "all",
    map_memory_limit: int | None = None,
    cache_size: int | None = None,
    on_corruption: CorruptionCallback | None = None,
    snapshot: str | None = None,
    force_share: bool = False,
    locking: Locking = "auto",
    cache_mode: CacheMode = "writeback",
    secret: str | bytes | None = None,
) -> Image:
    """Open the qcow2 image at *path*, validate its header and tables, and map its metadata.

    *path* may also be a seekable binary file object (an image inside an archive, an
    ``io.BytesIO``, a stream of a forensic container): one whose ``fileno()`` is a regular file
    or block device is read through a duplicate of that descriptor, as fast as a path; any other
    through its ``seek``/``read`` methods. It is read-only unless *writable* is given and the
    object is writable (not in append mode). Leave the object alone while the image is open.
    Backing files and data files named in such an image resolve against the current directory,
    and ``Image.path`` is the object's ``name`` (else its ``repr``).

    With *writable*, the image can be written (:meth:`Image.write` and friends); every host
    write is checked against the metadata map first, with every check on by default.
    *on_corruption* is called as ``on_corruption(message, offset, size, fatal)`` when a write is
    refused for landing on metadata. A writable open refuses images marked corrupt and images
    whose metadata overlaps. An image left dirty by a writer that used
    lazy refcounts is repaired first, as QEMU does at open (refcounts recomputed, the dirty bit
    cleared); if that leaves anything wrong the open fails with
    :class:`~qcow2ovl.CorruptImageError` naming ``qcow2ovl check -r all``. To repair an image
    explicitly use ``qcow2ovl.check(path, repair="all")``.

    *snapshot* (an id, else a name, as QEMU looks them up) opens a read-only view of that
    internal snapshot's disk instead of the active one, like ``qemu-img convert -l``.

    *overlap_check* takes every form :meth:`OverlapCheck.parse` accepts (default: ``"all"``);
    only the enabled types are read and tracked. *map_memory_limit* bounds the map's memory
    (default: 16 MiB plus 32 bytes per cluster the file holds, which a valid image's metadata
    never fills); ranges it cannot hold are checked with QEMU's naive algorithm instead (never
    under-reported).
    *cache_size* is the memory for L2 tables in bytes (default: 32 MiB, or less when that
    covers the whole disk; at least one table is always cached).

    Locks: the image, its backing files and its data file are locked as QEMU locks them, so
    that QEMU processes (VMs, ``qemu-img``, ``qemu-io``, ``qemu-nbd``) and other qcow2ovl
    handles refuse to write an image while it is open here, and this open is refused while
    one of them writes it (:class:`~qcow2ovl.LockError`, before anything is read or changed).
    A writable open excludes every other writer and every reader but force-share ones; a
    read-only open excludes writers. *force_share* (QEMU's ``-U``/``force-share=on``, read-only
    opens only) takes no exclusion at all: the image may change under the reader, which then
    sees inconsistent data. *locking* is QEMU's ``file.locking``: ``"auto"`` (lock where the
    system has OFD locks), ``"on"`` (fall back to process-wide POSIX locks, with QEMU's warning)
    or ``"off"`` (neither lock nor look). The locks last until :meth:`Image.close`.

    *cache_mode* is QEMU's ``cache=`` for writes to the image (and a writable data file):
    ``"writeback"`` (the default: :meth:`Image.flush` and :meth:`Image.close` make every
    earlier write durable with ``fdatasync``), ``"writethrough"`` (every write is durable when
    it returns), ``"unsafe"`` (flushes skip the ``fdatasync``: a crash of the machine, not of
    the process, can lose or reorder writes; what ``qemu-img convert`` uses for its output).
    ``"none"`` and ``"directsync"`` are accepted with the durability of ``"writeback"`` and
    ``"writethrough"``; the page cache is not bypassed. File objects take ``"writeback"`` only.

    *secret* unlocks an encrypted image's guest data (QEMU's ``encrypt.key-secret``: the
    passphrase as ``str``, encoded as UTF-8, or as ``bytes``). LUKS images are read and written
    with it; legacy AES images only read (with a warning: that cipher is insecure). Without it
    an encrypted image opens for its metadata only (``info``, ``check``, snapshots, bitmaps,
    resize), and guest reads and writes raise :class:`~qcow2ovl.EncryptionError`. A wrong
    secret raises :class:`~qcow2ovl.EncryptionError` (``Invalid password, cannot unlock any
    keyslot``) before anything is changed. The secret is not kept on the :class:`Image`, and no
    message names it. Backing files are opened without it.

    Opening reads metadata only. The backing chain and an external data file of a read-only
    image are opened (and locked) at the first guest read (or :meth:`Image.guest_map`), so an
    image can be inspected without them; missing files then raise :class:`FileNotFoundError`, a
    backing chain that loops a :class:`~qcow2ovl.FormatError`. A writable image opens them at
    once: its backing files must not change while it is written.

    Raises :class:`~qcow2ovl.FormatError` for a malformed image, :class:`~qcow2ovl.UnsupportedError`
    for a valid one using unsupported features, :class:`~qcow2ovl.CorruptImageError` for a
    read-write open of an image marked corrupt, with overlapping metadata, or left dirty by lazy
    refcounts beyond what the repair at open can fix, :class:`~qcow2ovl.EncryptionError` for a
    wrong *secret*, :class:`~qcow2ovl.SnapshotNotFoundError`
    for a *snapshot* that does not exist, :class:`~qcow2ovl.LockError` when another user's
    locks conflict, :class:`ValueError` for *force_share* with *writable* or an unknown
    *locking*, and :class:`OSError` when the file cannot be read. See :mod:`qcow2ovl.errors`
    for the whole list.
    """
    return _open(
        path,
        writable=writable,
        overlap_check=overlap_check,
        map_memory_limit=map_memory_limit,
        cache_size=cache_size,
        on_corruption=on_corruption,
        snapshot=snapshot,
        force_share=force_share,
        locking=locking,
        cache_mode=cache_mode,
        secret=secret,
    )


#: The messages about locking already logged by this process (each is said once).
_LOCK_NOTICES: set[str] = set()


def _open(
    path: PathArg | IO[bytes],
    *,
    writable: bool = False,
    overlap_check: OverlapCheckSpec = "all",
    map_memory_limit: int | None = None,
    cache_size: int | None = None,
    on_corruption: CorruptionCallback | None = None,
    snapshot: str | None = None,
    force_share: bool = False,
    locking: Locking = "auto",
    metadata_only: bool = False,
    cache_mode: CacheMode = "writeback",
    secret: str | bytes | None = None,
) -> Image:
    """:func:`open`, and for the command line *metadata_only*: an open that reads the header
    and tables only (``qemu-img info``'s locks: it holds no permission but still refuses to
    open beside a writer)."""
    check = OverlapCheck.parse(overlap_check)
    limit = options.map_memory_limit(map_memory_limit)
    notice = _core.locking_notice(locking)
    if notice is not None and notice not in _LOCK_NOTICES:
        _LOCK_NOTICES.add(notice)
        import logging

        logging.getLogger("qcow2ovl").warning("%s", notice)
    if not isinstance(path, (str, bytes, os.PathLike)):
        from qcow2ovl._fileobj import open_file_object

        if cache_mode != "writeback":
            raise ValueError("cache_mode applies to images opened by path")
        core, name = open_file_object(
            path,
            writable=writable,
            enabled=int(check.mask),
            map_memory_limit=limit,
            cache_size=cache_size,
            snapshot=snapshot,
            locking=locking,
            force_share=force_share,
            secret=secret,
        )
    else:
        fspath = os.fspath(path)
        name = os.fsdecode(fspath)
        if "\0" in name:
            raise ValueError("embedded null byte in path")
        core = _core.open_image(
            name,
            writable=writable,
            enabled=int(check.mask),
            map_memory_limit=limit,
            cache_size=cache_size,
            snapshot=snapshot,
            locking=locking,
            force_share=force_share,
            metadata_only=metadata_only,
            cache_mode=cache_mode,
            secret=secret,
        )
    image = Image(core, name, check, on_corruption)
    _log_open(image, limit, snapshot)
    if secret is not None and image.info.crypt_method == 1:
        import logging

        logging.getLogger("qcow2ovl").warning(
            "%s: legacy AES encryption is insecure (its key is the passphrase itself and its IVs "
            "are predictable); the image is read-only here: convert it to a LUKS-encrypted one",
            name,
        )
    return image


def _log_open(image: Image, limit: int | None, snapshot: str | None) -> None:
    """Records what the open chose on its own: the naive checker under the memory limit, a
    snapshot's view."""
    unchecked = image.unchecked_ranges()
    if not unchecked and snapshot is None:
        return
    import logging

    log = logging.getLogger("qcow2ovl")
    if unchecked:
        log.info(
            "%s: the metadata map's memory limit (%s) left %d host ranges out; writes "
            "there are checked with QEMU's naive algorithm",
            image.path,
            f"{limit} bytes"
            if limit is not None
            else "by default, 16 MiB plus 32 bytes per cluster the file holds",
            len(unchecked),
        )
    if snapshot is not None:
        log.debug("%s: opened the disk of snapshot %r, read-only", image.path, snapshot)
