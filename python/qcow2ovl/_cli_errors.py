"""Failures of ``qcow2ovl`` commands in qemu-img's words: ``qcow2ovl: MESSAGE`` on stderr and
exit status 1, and why a file could not be opened."""

from __future__ import annotations

import os
import sys


def fail(message: str) -> int:
    """Prints ``qcow2ovl: MESSAGE`` on stderr; returns qemu-img's failure status, 1."""
    print(f"qcow2ovl: {message}", file=sys.stderr)
    return 1


def open_reason(image: str, exc: BaseException) -> str:
    """Why the image could not be opened, in qemu-img's words (after ``Could not open``)."""
    from qcow2ovl.errors import CorruptImageError, LockError, Qcow2Error

    if isinstance(exc, LockError):
        return str(exc)
    if isinstance(exc, Qcow2Error):
        from qcow2ovl._format import QCOW2_MAGIC

        text = str(exc).removeprefix(f"{image}: ")
        try:
            with open(image, "rb") as f:
                magic = f.read(4)
        except OSError:
            magic = QCOW2_MAGIC
        if magic != QCOW2_MAGIC:
            return "Image is not in qcow2 format"  # (an empty file too, as QEMU reads it)
        return f"qcow2: {text}" if isinstance(exc, CorruptImageError) else text
    if isinstance(exc, OSError) and exc.strerror:
        return f"Could not open '{image}': {exc.strerror}"
    return str(exc)


def missing_file(image: str, exc: OSError, new_backing: str | None = None) -> str:
    """A file of *image*'s chain that does not exist, as qemu-img says it: the image itself,
    the new backing file of a rebase (*new_backing*, as the command line names it), or a
    backing file below the image."""
    missing = exc.filename if isinstance(exc.filename, str) else image
    inner = f"Could not open '{missing}': {exc.strerror}"
    if os.path.abspath(missing) == os.path.abspath(image):
        return f"Could not open '{image}': {inner}"
    if new_backing is not None and os.path.abspath(missing) == os.path.abspath(
        os.path.join(os.path.dirname(image), new_backing)
    ):
        return f"Could not open new backing file '{new_backing}': {inner}"
    return f"Could not open '{image}': Could not open backing file: {inner}"
