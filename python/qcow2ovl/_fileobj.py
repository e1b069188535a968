"""``qcow2ovl.open(fileobj)``: images held by binary file objects.

A file object whose ``fileno()`` is a regular file or a block device is read through a
duplicate of that descriptor, with positioned reads that release the GIL (as fast as a path);
any other seekable binary object (``io.BytesIO``, a member of a zip or tar archive, a forensic
container's stream) is called through its ``seek``/``read``/``write``/``flush`` methods, with
the GIL held. Either way there is no path, so backing files and external data files named in
the image resolve against the current directory.
"""

from __future__ import annotations

import os

from qcow2ovl import _core

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def name_of(file: Any) -> str:
    """What errors and ``Image.path`` call the object: its ``name`` when that is a path, else
    its ``repr``."""
    name = getattr(file, "name", None)
    if isinstance(name, (str, bytes)):
        return os.fsdecode(name)
    return repr(file)


def _real_fd(file: Any) -> int | None:
    """The object's descriptor when it is a regular file or a block device, else None."""
    fileno = getattr(file, "fileno", None)
    if fileno is None:
        return None
    try:
        fd = fileno()
        import stat

        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if isinstance(fd, int) and (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        return fd
    return None


def open_file_object(file: Any, *, writable: bool, **options: Any) -> tuple[_core.Image, str]:
    """Opens the image in *file*; returns the core image and the name it goes by."""
    for method in ("read", "seek"):
        if not callable(getattr(file, method, None)):
            raise TypeError(
                f"open() takes a path or a seekable binary file object, not {type(file).__name__!r}"
            )
    import io

    if isinstance(file, io.TextIOBase):
        raise TypeError("open() needs a binary file object (mode 'rb'), not a text one")
    if getattr(file, "closed", False):
        raise ValueError("I/O operation on closed file")
    seekable = getattr(file, "seekable", None)
    if callable(seekable) and not seekable():
        raise ValueError("the file object is not seekable")
    if writable:
        can_write = getattr(file, "writable", None)
        if not callable(can_write) or not can_write():
            raise ValueError("writable=True needs a file object open for writing (mode 'r+b')")
    name = name_of(file)
    fd = _real_fd(file)
    if fd is not None:
        if writable:
            file.flush()  # the object's own buffered writes go first
        return _core.open_image_fd(fd, name, writable=writable, **options), name
    return _core.open_image_fileobj(file, name, writable=writable, **options), name
