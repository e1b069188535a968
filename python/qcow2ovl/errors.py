"""Exceptions raised by qcow2ovl.

Every error that comes from an image's bytes is a :class:`Qcow2Error`. Malformed images raise
:class:`FormatError` (also a :class:`ValueError`); valid images that use something qcow2ovl does
not support raise :class:`UnsupportedError`. Messages start with QEMU's wording where QEMU has one,
so they can be matched against ``qemu-img`` output.
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


__all__ = [
    "CorruptImageError",
    "FormatError",
    "LockError",
    "MetadataOverlapError",
    "Qcow2Error",
    "UnsupportedError",
]
