"""Pointing an image at another backing file: :func:`rebase`, ``qemu-img rebase``'s work done by
the Rust core (``_core.rebase_image``), without the GIL.

A safe rebase reads every cluster the image leaves to its backing chain through both the old
chain and the new backing file, and copies into the image (through its guarded engine) those
that differ; everything is flushed, and only then does one header write name the new backing
file, so that a crash or a cancel at any point leaves the image reading as it did. ``unsafe``
(``-u``) only rewrites the header.
"""

from __future__ import annotations

import os

from qcow2ovl import _core

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from dataclasses import dataclass
    from typing import Literal

    CacheMode = Literal["writeback", "writethrough", "unsafe", "none", "directsync"]
    Locking = Literal["auto", "on", "off"]
else:
    from qcow2ovl._frozen import dataclass

#: Formats a safe rebase reads the new backing file in.
FORMATS = ("qcow2", "raw")
#: Every format name QEMU knows: the header may name any of them (``unsafe``).
KNOWN_FORMATS = frozenset(
    "bochs cloop dmg luks parallels qcow qcow2 qed raw vdi vhdx vmdk vpc vvfat".split()
)


@dataclass(frozen=True)
class RebaseResult:
    """What :func:`rebase` did: guest bytes compared between the old chain and the new backing
    file (``compared``: those the image leaves to its backing chain) and copied into the image
    because they differ (``copied``). Both are 0 for an unsafe rebase."""

    compared: int
    copied: int


def rebase(
    image: str | os.PathLike[str],
    backing: str | os.PathLike[str] | None,
    *,
    backing_format: str | None = None,
    unsafe: bool = False,
    compress: bool = False,
    cache_mode: CacheMode = "writeback",
    backing_cache_mode: CacheMode = "writeback",
    force_share: bool = False,
    locking: Locking = "auto",
    progress: Callable[[int, int], object] | None = None,
) -> RebaseResult:
    """Make the qcow2 image *image* name *backing* as its backing file (``None`` or ``""``: no
    backing file), as ``qemu-img rebase -b`` does, with its guest disk unchanged.

    *backing* is stored as given; a relative name is relative to the image's folder.
    *backing_format* (``-F``) is required with a backing file, and stored too. A safe rebase
    (the default) reads the new backing file in that format (``"qcow2"`` or ``"raw"``) and first
    copies into the image every cluster that it reads differently from the old chain
    (*compress*: compressed, ``-c``); with ``b""`` everything the old chain holds is copied.
    *unsafe* (``-u``) only rewrites the header: the new backing file need not exist, and any
    format QEMU knows may be named.

    *cache_mode* and *backing_cache_mode* are QEMU's cache modes of the image and the new
    backing file (``-t``, ``-T``); *force_share* (``-U``) opens the new backing file shared
    with writers. *progress* is called with ``(done, total)`` guest bytes as the comparison
    goes; an exception it raises (or Ctrl-C) stops the rebase before the header changes.

    Raises ``ValueError`` in qemu-img's words for a bad or missing format,
    :class:`~qcow2ovl.errors.LockError` when a file is in use, and the errors of
    :func:`qcow2ovl.open`, each naming its file.
    """
    name = None if backing is None or os.fspath(backing) == "" else os.fspath(backing)
    if backing_format is not None and backing_format not in KNOWN_FORMATS:
        raise ValueError(f"Invalid format name: '{backing_format}'")
    if name is not None and backing_format is None:
        raise ValueError(
            f"Could not change the backing file to '{name}': backing format must be specified"
        )
    if name is not None and not unsafe and backing_format not in FORMATS:
        from qcow2ovl.errors import UnsupportedError

        raise UnsupportedError(
            f"rebase: backing format '{backing_format}' is not supported for a safe rebase "
            "(qcow2 and raw are; -u only rewrites the header)"
        )
    stats = _core.rebase_image(
        os.fspath(image),
        name,
        backing_format=backing_format if name is not None else None,
        header_only=unsafe,
        compress=compress,
        cache=cache_mode,
        backing_cache=backing_cache_mode,
        force_share=force_share,
        locking=locking,
        progress=progress,
    )
    return RebaseResult(compared=stats["compared"], copied=stats["copied"])
