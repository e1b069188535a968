"""Constants, small helpers and the decision sources shared by the generator and the corrupter."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "qcow2ovl.testing needs hypothesis, which is not installed. Install it with "
        "`pip install hypothesis`, or with qcow2ovl's test extra: `pip install '.[test]'` from a "
        "checkout of qcow2ovl, `pip install 'qcow2ovl[test]'` from a package index.",
        name=exc.name,
    ) from exc


from qcow2ovl.types import MetadataType

T = TypeVar("T")

# ---- on-disk constants (docs/design/architecture.md, "On-disk facts") ------------------------

QCOW2_MAGIC = 0x514649FB
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
KNOWN_EXTENSIONS = (
    EXT_END,
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_DATA_FILE,
)

INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
ALL_ALLOC = 0xFFFFFFFF
BITMAP_FLAG_AUTO = 1 << 1

#: Names QEMU writes into the feature name table: (type, bit, name).
KNOWN_FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

_NO_TYPE = MetadataType(0)
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_."


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- where the generator's decisions come from ------------------------------------------------


class _Chooser:
    """Source of every decision: hypothesis draws (shrinkable) or a seeded PRNG.

    Every method's smallest answer (``lo``, ``False``, the first element) is the simplest
    image, so hypothesis shrinks towards plain layouts.
    """

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def boolean(self) -> bool:
        return self.integer(0, 1) == 1

    def rarely(self) -> bool:
        """True about one time in eight."""
        return self.integer(0, 7) == 7

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.integer(0, len(seq) - 1)]


class _DrawChooser(_Chooser):
    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return int(self._draw(st.integers(lo, hi)))

    def boolean(self) -> bool:
        return bool(self._draw(st.booleans()))

    def choice(self, seq: Sequence[T]) -> T:
        return self._draw(st.sampled_from(seq))


class _RandomChooser(_Chooser):
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self._rng.randint(lo, hi)
