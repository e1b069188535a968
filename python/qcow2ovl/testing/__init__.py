"""Hypothesis strategies that build qcow2 images in pure Python: valid ones, and broken ones.

Two strategies, for property-based tests of anything that reads qcow2 (qcow2ovl itself, or your
code on top of it):

- :func:`qcow2_images` builds a small **valid** image from scratch, as bytes, with no QEMU
  involved: random cluster size (512 B to 64 KiB by default, up to 2 MiB on request), version 2
  or 3, refcount widths of 1 to 64 bits, a random virtual size, optionally a backing file name
  and backing format, a feature name table and an unknown header extension, guest clusters
  (data written with a pattern, v3 zero clusters, deflate-compressed clusters, extended L2
  entries), internal snapshots whose L2 tables are shared with the active L1 table, copied from
  it or their own, and persistent bitmaps. Every table lands at a *random* free cluster.
  Refcounts are exact (every used cluster's refcount is the number of references to it) and the
  COPIED flags are exact (set iff the refcount is 1), so ``qemu-img check`` finds nothing wrong.
  The result is a :class:`GeneratedImage`: the bytes plus an :class:`ImageLayout` that says what
  was placed where, so tests can compare a reader's view with the truth.
- :func:`corrupted_images` takes such an image and breaks it in random ways: header fields set
  to boundary values, truncation, table entries made unaligned, pointing past the end of the file
  or at other metadata, snapshot table and bitmap directory fields, header extension magics and
  lengths, random bytes. The result is a :class:`CorruptedImage`: the bytes plus a readable list
  of what was done.

Usage::

    from hypothesis import given, settings
    import qcow2ovl
    from qcow2ovl.testing import GeneratedImage, qcow2_images

    @settings(max_examples=50, deadline=None)
    @given(qcow2_images())
    def test_maps_what_was_placed(image: GeneratedImage) -> None:
        path = image.write_to("/tmp/image.qcow2")
        with qcow2ovl.open(path) as img:
            assert img.metadata_extents() == image.layout.metadata_extents()

The same images can be made without hypothesis from a seed (:func:`random_image`,
:func:`random_corruption`), for reproducers and quick loops.

Only this module imports hypothesis, an optional dependency (the ``test`` extra): install it with
``pip install '.[test]'`` from a checkout of qcow2ovl, or ``pip install 'qcow2ovl[test]'`` from a
package index that has qcow2ovl (or just ``pip install hypothesis``). ``import qcow2ovl`` never
imports it. See ``docs/testing.md``.
"""

from __future__ import annotations

# _common first: it raises an ImportError that says what to install when hypothesis is missing
# (every other submodule imports hypothesis, and any of them is reached through this package).
from qcow2ovl.testing import _common  # noqa: F401  (isort: keep first)
from qcow2ovl.testing.corrupt import (
    corrupted_images,
    random_corruption,
)
from qcow2ovl.testing.images import (
    qcow2_images,
    random_image,
)
from qcow2ovl.testing.layout import (
    BitmapLayout,
    CorruptedImage,
    Extension,
    GeneratedImage,
    ImageLayout,
    SnapshotLayout,
    Structure,
    Table,
)

__all__ = [
    "BitmapLayout",
    "CorruptedImage",
    "Extension",
    "GeneratedImage",
    "ImageLayout",
    "SnapshotLayout",
    "Structure",
    "Table",
    "corrupted_images",
    "qcow2_images",
    "random_corruption",
    "random_image",
]
