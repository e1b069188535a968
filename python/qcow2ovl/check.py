"""Checking images: :func:`check` and :class:`CheckResult` (``qemu-img check``'s answers).

The Rust core recomputes every cluster's refcount from the metadata and compares it with the
refcount structures on disk (see ``docs/design/check.md``). Its counters mean what qemu-img's
mean; on top of them it names every metadata overlap by pair.
"""

from __future__ import annotations

import os

from qcow2ovl import _core
from qcow2ovl.records import CheckFinding as CheckFinding
from qcow2ovl.records import CheckOverlap as CheckOverlap
from qcow2ovl.records import CheckResult as CheckResult
from qcow2ovl.records import check_result

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Union

    PathArg = Union[str, bytes, os.PathLike[str], os.PathLike[bytes]]


def check(
    path: PathArg,
    repair: str | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> CheckResult:
    """Check the image at *path* as ``qemu-img check`` does (opened read-only).

    With *repair* (``"leaks"`` or ``"all"``, as ``qemu-img check -r``) the image is opened for
    repair instead (writable, even when marked corrupt, dirty or with overlapping metadata;
    every write is still checked against the metadata map), repaired, and checked again: the
    result is that final check, with ``corruptions_fixed`` and ``leaks_fixed`` set. Clusters
    that two metadata structures use are never repaired: they stay in ``corruptions`` and in
    ``overlaps``. ``"leaks"`` raises :class:`OSError` (``EIO``) when the refcount structure is
    damaged and must be rebuilt, which only ``"all"`` does. See ``docs/design/check.md``.

    *progress*, if given, is called with ``(done, total)`` L2 table references as the check
    walks them (a plain check only).
    """
    from qcow2ovl.image import open as open_image

    if repair is not None:
        name = os.fsdecode(path)
        return check_result(name, _core.repair_image(name, repair))
    with open_image(path, overlap_check="none") as image:
        return image.check(progress)


__all__ = ["CheckFinding", "CheckOverlap", "CheckResult", "check"]
