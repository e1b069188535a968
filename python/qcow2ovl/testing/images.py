"""Public strategies and seeded builders for valid images."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from qcow2ovl.testing._builder import (
    _Builder,
    _Options,
)
from qcow2ovl.testing._common import (
    _DrawChooser,
    _RandomChooser,
)
from qcow2ovl.testing.layout import (
    GeneratedImage,
)

# ---- public API: valid images -------------------------------------------------------------------


def _options(
    versions: Sequence[int],
    min_cluster_bits: int,
    max_cluster_bits: int,
    refcount_orders: Sequence[int] | None,
    max_snapshots: int,
    max_bitmaps: int,
    compressed: bool,
    extended_l2: bool,
    backing: bool,
    extensions: bool,
    max_bytes: int,
) -> _Options:
    versions = tuple(versions)
    if not versions or any(v not in (2, 3) for v in versions):
        raise ValueError(f"versions must be a non-empty subset of (2, 3), not {versions!r}")
    if not 9 <= min_cluster_bits <= max_cluster_bits <= 21:
        raise ValueError(
            "cluster bits must satisfy 9 <= min_cluster_bits <= max_cluster_bits <= 21"
        )
    orders = None if refcount_orders is None else tuple(refcount_orders)
    if orders is not None and (not orders or any(not 0 <= o <= 6 for o in orders)):
        raise ValueError(f"refcount_orders must be a non-empty subset of 0..6, not {orders!r}")
    if max_snapshots < 0 or max_bitmaps < 0 or max_bytes <= 0:
        raise ValueError("max_snapshots, max_bitmaps must be >= 0 and max_bytes > 0")
    return _Options(
        versions=versions,
        min_cluster_bits=min_cluster_bits,
        max_cluster_bits=max_cluster_bits,
        refcount_orders=orders,
        snapshots=max_snapshots,
        bitmaps=max_bitmaps,
        compressed=compressed,
        extended_l2=extended_l2,
        backing=backing,
        extensions=extensions,
        max_bytes=max_bytes,
    )


@st.composite
def qcow2_images(
    draw: st.DrawFn,
    *,
    versions: Sequence[int] = (2, 3),
    min_cluster_bits: int = 9,
    max_cluster_bits: int = 16,
    refcount_orders: Sequence[int] | None = None,
    max_snapshots: int = 3,
    max_bitmaps: int = 2,
    compressed: bool = True,
    extended_l2: bool = True,
    backing: bool = True,
    extensions: bool = True,
    max_bytes: int = 2 << 20,
) -> GeneratedImage:
    """A hypothesis strategy for valid qcow2 images, as :class:`GeneratedImage`.

    Every image passes ``qemu-img check`` with no errors and no leaks: each used cluster's
    refcount equals its number of references (shared L2 tables and data clusters included) and
    COPIED flags are set exactly where the refcount is 1.

    Parameters narrow what is generated:

    - *versions*: qcow2 versions to pick from (2 and/or 3);
    - *min_cluster_bits*, *max_cluster_bits*: cluster sizes ``2**bits``, 9..21 (default up to
      64 KiB; larger clusters make files of several clusters, i.e. megabytes);
    - *refcount_orders*: refcount widths ``2**order`` bits for version 3 (default: all of 0..6;
      version 2 always uses 4);
    - *max_snapshots*, *max_bitmaps*: upper bounds (0 disables);
    - *compressed*, *extended_l2*, *backing*, *extensions*: allow deflate-compressed clusters,
      extended L2 entries (version 3, clusters of 16 KiB or more), a backing file name (with an
      optional backing format extension), a feature name table and an unknown extension;
    - *max_bytes*: rough upper bound of the image size; fewer clusters get allocated as it fills.
    """
    opts = _options(
        versions,
        min_cluster_bits,
        max_cluster_bits,
        refcount_orders,
        max_snapshots,
        max_bitmaps,
        compressed,
        extended_l2,
        backing,
        extensions,
        max_bytes,
    )
    return _Builder(_DrawChooser(draw), opts).build()


def random_image(
    seed: int,
    *,
    versions: Sequence[int] = (2, 3),
    min_cluster_bits: int = 9,
    max_cluster_bits: int = 16,
    refcount_orders: Sequence[int] | None = None,
    max_snapshots: int = 3,
    max_bitmaps: int = 2,
    compressed: bool = True,
    extended_l2: bool = True,
    backing: bool = True,
    extensions: bool = True,
    max_bytes: int = 2 << 20,
) -> GeneratedImage:
    """The same images as :func:`qcow2_images`, made from *seed* without hypothesis.

    Deterministic: the same seed and options give the same bytes (for reproducers and loops).
    """
    opts = _options(
        versions,
        min_cluster_bits,
        max_cluster_bits,
        refcount_orders,
        max_snapshots,
        max_bitmaps,
        compressed,
        extended_l2,
        backing,
        extensions,
        max_bytes,
    )
    return _Builder(_RandomChooser(seed), opts).build()
