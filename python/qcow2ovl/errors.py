"""Exceptions raised by qcow2ovl.

Every error about an image is a :class:`Qcow2Error`, and also an instance of the builtin class
that fits it, so generic handlers keep working:

- :class:`FormatError` (a ``ValueError``): the image breaks the qcow2 format;
- :class:`UnsupportedError`: valid qcow2 that uses a feature qcow2ovl does not support;
- :class:`CorruptImageError` (a ``PermissionError``): a writable open of an image marked
  corrupt, with overlapping metadata, or left dirty beyond what the repair at open can fix;
- :class:`InconsistentImageError` (an ``OSError``, ``EIO``): metadata met during I/O is
  inconsistent; a writable image was marked corrupt;
- :class:`MetadataOverlapError` (an :class:`InconsistentImageError`): a write would have
  overwritten metadata, so nothing was written; its ``types`` are never empty;
- :class:`LockError` (an ``OSError``, ``EAGAIN``): another process (or handle) holds the image
  in a way that conflicts with this open, by QEMU's image locks;
- :class:`ReadOnlyImageError` (an ``OSError``, ``EBADF``): a write-side method on a handle
  opened read-only;
- :class:`SnapshotNotFoundError` (a ``LookupError``): no internal snapshot has that id or name;
- :class:`BitmapError`: a persistent bitmap cannot do what was asked (it is not there, or it
  is inconsistent: found in use at open, so its bits cannot be trusted).

Errors of the operating system are plain :class:`OSError` (``FileNotFoundError``,
``ENOSPC`` ...) with ``filename`` set to the file concerned; arguments out of range are
``ValueError``; calls on a closed image are ``ValueError``. Messages start with QEMU's wording
where QEMU has one, so they can be matched against ``qemu-img`` output.
"""

from __future__ import annotations

import errno


class Qcow2Error(Exception):
    """Base class of every qcow2ovl error about an image."""


class FormatError(Qcow2Error, ValueError):
    """The image is malformed: a header field, table or entry breaks the qcow2 format."""


class UnsupportedError(Qcow2Error):
    """The image is valid qcow2 but uses a feature qcow2ovl does not support."""


class CorruptImageError(Qcow2Error, PermissionError):
    """The image's corrupt bit is set, so it may only be opened read-only."""


class InconsistentImageError(Qcow2Error, OSError):
    """The image's metadata was found inconsistent while it was read or written (an L2 table
    or data cluster offset off a cluster boundary, an extended L2 entry both allocated and
    zero, a cluster in use whose refcount is 0, ...); errno ``EIO``, ``filename`` the image.

    On a handle opened for writing the image was marked corrupt (QEMU's ``qcow2: Marking image
    as corrupt: ...``), the ``on_corruption`` callback and the ``qcow2ovl`` logger were told,
    and the handle refuses every later write. :class:`MetadataOverlapError` is the kind that
    would have overwritten metadata.
    """


class MetadataOverlapError(InconsistentImageError):
    """A write would have overwritten qcow2 metadata; nothing was written (errno ``EIO``).

    ``types`` holds the metadata types it would have hit (a ``MetadataType`` value), ``offset``
    and ``size`` the refused host range. The image was marked corrupt, and the handle refuses
    every later write.
    """

    def __init__(self, message: str, types: int = 0, offset: int = 0, size: int = 0) -> None:
        super().__init__(errno.EIO, message)
        self.types = types
        self.offset = offset
        self.size = size

    def __str__(self) -> str:
        return str(self.strerror)


class LockError(Qcow2Error, OSError):
    """Another process (or another open handle in this one) uses the image in a way that
    conflicts with this open, by QEMU's image locks; nothing was read or changed (errno
    ``EAGAIN``).

    The message is QEMU's: ``Failed to get "write" lock`` (someone refuses to share what this
    open needs) or ``Failed to get shared "write" lock`` (someone holds what this open refuses
    to share), then ``Is another process using the image [PATH]?``. ``filename`` is the locked
    file: the image itself, or the backing or data file that is held.
    """

    def __init__(self, message: str, filename: str = "") -> None:
        super().__init__(errno.EAGAIN, message, filename)

    def __str__(self) -> str:
        return str(self.strerror)


class ReadOnlyImageError(Qcow2Error, OSError):
    """A write-side method (``write``, ``discard``, ``resize``, a snapshot operation, ...) was
    called on an image opened read-only: nothing was written. ``errno`` is ``EBADF``, as for a
    write to a descriptor opened for reading; ``filename`` names the image. Open it with
    ``qcow2ovl.open(path, writable=True)`` to write.
    """


class SnapshotNotFoundError(Qcow2Error, LookupError):
    """No internal snapshot has the id or name asked for (``open(..., snapshot=)``,
    :meth:`~qcow2ovl.Image.delete_snapshot`, :meth:`~qcow2ovl.Image.apply_snapshot`)."""


class BitmapError(Qcow2Error):
    """A persistent bitmap cannot do what was asked: it is not there, or it is inconsistent
    (in use when the image was opened: a writer stopped without storing it)."""


class EncryptionError(Qcow2Error):
    """An encrypted image's secret is wrong (``Invalid password, cannot unlock any keyslot``)
    or missing (its guest data was read or written without one; metadata needs none), or its
    encryption cannot be used as asked. The message never holds the secret."""


__all__ = [
    "BitmapError",
    "CorruptImageError",
    "EncryptionError",
    "FormatError",
    "InconsistentImageError",
    "LockError",
    "MetadataOverlapError",
    "Qcow2Error",
    "ReadOnlyImageError",
    "SnapshotNotFoundError",
    "UnsupportedError",
]
