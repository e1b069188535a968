"""Exceptions raised by qcow2ovl.

Every error about an image is a :class:`Qcow2Error`, and also an instance of the builtin class
that fits it, so generic handlers keep working:

- :class:`FormatError` (a ``ValueError``): the image breaks the qcow2 format;
- :class:`UnsupportedError`: valid qcow2 that uses a feature qcow2ovl does not support;
- :class:`CorruptImageError` (a ``PermissionError``): a writable open of an image marked
  corrupt, with overlapping metadata, or left dirty beyond what the repair at open can fix;
- :class:`MetadataOverlapError` (an ``OSError``, ``EIO``): a write would have overwritten
  metadata, so nothing was written;
- :class:`ReadOnlyImageError` (an ``OSError``, ``EBADF``): a write-side method on a handle
  opened read-only;
- :class:`SnapshotNotFoundError` (a ``LookupError``): no internal snapshot has that id or name.

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


class MetadataOverlapError(Qcow2Error, OSError):
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


class ReadOnlyImageError(Qcow2Error, OSError):
    """A write-side method (``write``, ``discard``, ``resize``, a snapshot operation, ...) was
    called on an image opened read-only: nothing was written. ``errno`` is ``EBADF``, as for a
    write to a descriptor opened for reading; ``filename`` names the image. Open it with
    ``qcow2ovl.open(path, writable=True)`` to write.
    """


class SnapshotNotFoundError(Qcow2Error, LookupError):
    """No internal snapshot has the id or name asked for (``open(..., snapshot=)``,
    :meth:`~qcow2ovl.Image.delete_snapshot`, :meth:`~qcow2ovl.Image.apply_snapshot`)."""


__all__ = [
    "CorruptImageError",
    "FormatError",
    "MetadataOverlapError",
    "Qcow2Error",
    "ReadOnlyImageError",
    "SnapshotNotFoundError",
    "UnsupportedError",
]
