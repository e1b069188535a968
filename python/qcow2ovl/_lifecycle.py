"""Writable images nobody closed: flushed and closed when collected or at interpreter exit.

As Python's own files do, with a :class:`ResourceWarning` (shown under ``python -X dev`` or
``-W default``). Writes reach the disk only in order, at :meth:`~qcow2ovl.Image.flush` and
:meth:`~qcow2ovl.Image.close`; without this, the last changes of a handle dropped without
``close()`` (L2 tables, refcounts, the header) would be lost. If that last flush fails (a full
disk), the changes not yet on disk are lost and the ``qcow2ovl`` logger says so at ``ERROR``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import weakref

    from qcow2ovl.image import Image

# Writable images still open, held weakly (they may be collected); made at the first
# writable open, together with the exit hook, so that read-only use pays nothing.
_open: weakref.WeakSet[Image] | None = None


def track(image: Image) -> None:
    """Remember a writable image, to close it at exit if it is still open then."""
    global _open
    if _open is None:
        import atexit
        import weakref

        _open = weakref.WeakSet()
        atexit.register(_close_all)
    _open.add(image)


def _close_all() -> None:
    if _open is None:
        return
    for image in list(_open):
        finalize(image, "still open at interpreter exit")


def finalize(image: Image, why: str) -> None:
    """Flush and close *image* if it is a writable image still open, warning that it was left
    open (*why*: when that was noticed)."""
    core = image.__dict__.get("_core")  # absent when __init__ failed
    if core is None or core.closed or not core.writable:
        return
    import warnings

    warnings.warn(
        f"unclosed image {image.path!r} ({why}): flushed and closed now; close images with "
        "close() or a with block",
        ResourceWarning,
        stacklevel=2,
        source=image,
    )
    try:
        core.close()
    except Exception as e:
        core.abandon()
        import logging

        logging.getLogger("qcow2ovl").error(
            "%s: the image was %s and its last flush failed; the changes not yet on disk "
            "are lost: %s",
            image.path,
            why,
            e,
        )
