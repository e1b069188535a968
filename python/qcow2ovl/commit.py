"""Folding an overlay into its backing file: :func:`commit`, ``qemu-img commit``'s work done by
the Rust core (``_core.commit_image``), without the GIL.

Every range the layers above the base allocate (data or zeros) is written into the base through
its guarded engine (a raw base is written directly); the base is flushed; then the top is
emptied, so that it reads the base again. A crash or a cancel at any point leaves both images
consistent and the top reading as it did; committing again finishes the work.
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


@dataclass(frozen=True)
class CommitResult:
    """What :func:`commit` did: the image committed into (``base``, as the chain names it,
    resolved), whether the top was emptied (``emptied``), the guest bytes of the top
    (``total``), and those written into the base as data (``written``) and as zeros
    (``zeroed``)."""

    base: str
    emptied: bool
    total: int
    written: int
    zeroed: int


def commit(
    image: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    drop: bool = False,
    cache_mode: CacheMode = "writeback",
    locking: Locking = "auto",
    progress: Callable[[int, int], object] | None = None,
) -> CommitResult:
    """Commit the qcow2 image *image* into its backing file (qcow2 or raw), as ``qemu-img
    commit`` does, then empty it, unless *drop* (``-d``) keeps it as it is.

    *base* (``-b``) commits into an image further down the chain instead: every layer above it
    is copied in, and the top is kept (as with qemu-img, the images between no longer read as
    they did). A relative *base* is looked for beside each image of the chain in turn, as
    qemu-img looks for it. The base grows to the top's size if it is smaller.

    *cache_mode* is QEMU's cache mode for both images (qemu-img's default for commit,
    ``writeback``, syncs the base before the top is emptied). *progress* is called with
    ``(done, total)`` guest bytes as the copy goes; an exception it raises (or Ctrl-C) stops
    the commit with both images consistent and the top whole.

    Raises ``ValueError`` (qemu-img's words) when the image has no backing file or *base* is
    not in its chain, :class:`~qcow2ovl.errors.LockError` when an image is in use, and the
    errors of :func:`qcow2ovl.open`, each naming its file.
    """
    stats = _core.commit_image(
        os.fspath(image),
        base=None if base is None else os.fspath(base),
        keep_top=drop,
        cache=cache_mode,
        locking=locking,
        progress=progress,
    )
    return CommitResult(
        base=str(stats["base"]),
        emptied=bool(stats["emptied"]),
        total=int(stats["total"]),
        written=int(stats["written"]),
        zeroed=int(stats["zeroed"]),
    )
