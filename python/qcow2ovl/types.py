"""Metadata types of a qcow2 image, as bits of :class:`MetadataType`.

The table of types, keys, names and templates is in ``docs/design/architecture.md``.

Every fact about a type lives in exactly one place:

- its bit: the member definitions of :class:`MetadataType`;
- its templates: the pseudo-members ``NONE``, ``CONSTANT``, ``CACHED`` and ``ALL`` (cumulative);
- its option key and QEMU message name: the table ``_INFO`` below the class.

Templates as pseudo-members
---------------------------
``NONE`` (0) and the multi-bit ``CONSTANT``, ``CACHED`` and ``ALL`` are defined in the class body so
that ``MetadataType.ALL`` etc. work and are visible to type checkers. On Python 3.11+ an ``IntFlag``
treats zero and multi-bit values as aliases, so ``list(MetadataType)`` yields only the 11 single-bit
types. On Python 3.9/3.10 class iteration also yields the four templates; portable code uses
:data:`SINGLE_TYPES` or ``MetadataType.ALL.bits()`` instead.
"""

from __future__ import annotations

import enum


class MetadataType(enum.IntFlag):
    """One bit per kind of qcow2 metadata; a value is a set of kinds.

    Bits 0-8 are QEMU's ``QCow2MetadataOverlap``; bits 9 and 10 are qcow2ovl's own.
    """

    MAIN_HEADER = 0x001
    ACTIVE_L1 = 0x002
    ACTIVE_L2 = 0x004
    REFCOUNT_TABLE = 0x008
    REFCOUNT_BLOCK = 0x010
    SNAPSHOT_TABLE = 0x020
    INACTIVE_L1 = 0x040
    INACTIVE_L2 = 0x080
    BITMAP_DIRECTORY = 0x100
    CRYPTO_HEADER = 0x200
    BITMAP_TABLE = 0x400

    # Templates (cumulative). Inside the class body the names above are still plain ints.
    #: template ``none``: nothing is checked.
    NONE = 0
    #: template ``constant``: structures whose location is known without walking tables.
    CONSTANT = (
        MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY | CRYPTO_HEADER
    )
    #: template ``cached``: ``constant`` plus what QEMU finds in its in-memory tables.
    CACHED = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1 | BITMAP_TABLE
    #: template ``all``: every type (``cached`` plus inactive L2 tables).
    ALL = CACHED | INACTIVE_L2

    @classmethod
    def from_key(cls, key: str) -> MetadataType:
        """Return the single type whose option key is *key* (e.g. ``"inactive-l2"``).

        Raises ``ValueError`` naming the key and the allowed keys if *key* is unknown.
        """
        member = _BY_KEY.get(key) if isinstance(key, str) else None
        if member is None:
            raise ValueError(
                f"Unknown metadata type key {key!r}. Allowed are any of the following: "
                + ", ".join(_BY_KEY)
            )
        return member

    @property
    def key(self) -> str:
        """Option key of a single type (``"inactive-l2"``).

        A key names exactly one type, so a value with zero or several bits set (or an unknown bit)
        raises ``ValueError``; use :meth:`keys` for those.
        """
        info = _INFO.get(int(self))
        if info is None:
            raise ValueError(f"{self!r} is not a single metadata type and has no option key")
        return info.key

    @property
    def message_name(self) -> str | None:
        """QEMU's name of the lowest set bit (``"active L1 table"``), as in overlap messages.

        ``None`` if no bit is set (or the lowest set bit is not a known type).
        """
        value = int(self)
        info = _INFO.get(value & -value)
        return None if info is None else info.message_name

    @property
    def min_template(self) -> str:
        """Name of the smallest template that contains every set bit.

        (The last column of the table of types in ``docs/design/architecture.md``.)

        ``"none"`` for 0; raises ``ValueError`` if a bit outside :attr:`ALL` is set.
        """
        for name, mask in TEMPLATES.items():
            if int(self) & ~int(mask) == 0:
                return name
        raise ValueError(f"{self!r} has bits outside MetadataType.ALL")

    def bits(self) -> list[MetadataType]:
        """The known single types set in this value, lowest bit first (works on Python 3.9+)."""
        return [member for member in SINGLE_TYPES if int(self) & int(member)]

    def keys(self) -> list[str]:
        """Option keys of :meth:`bits`, lowest bit first."""
        return [_INFO[int(member)].key for member in self.bits()]

    def names(self) -> list[str]:
        """Member names (``"ACTIVE_L1"``) of :meth:`bits`, lowest bit first."""
        return [_INFO[int(member)].member_name for member in self.bits()]


class _TypeInfo:
    """What the outside world calls one metadata type.

    (A plain class rather than a ``NamedTuple``: importing :mod:`typing` would cost several
    milliseconds of every ``import qcow2ovl``.)
    """

    __slots__ = ("key", "member_name", "message_name")

    def __init__(self, member_name: str, key: str, message_name: str) -> None:
        #: Python member name, e.g. ``"ACTIVE_L1"``.
        self.member_name = member_name
        #: option key, used as ``overlap-check.<key>``.
        self.key = key
        #: QEMU's name in ``Preventing invalid write on metadata (overlaps with <name>)``.
        self.message_name = message_name


# The one table of keys and names, in bit order.
_TABLE: tuple[tuple[MetadataType, str, str], ...] = (
    (MetadataType.MAIN_HEADER, "main-header", "qcow2_header"),
    (MetadataType.ACTIVE_L1, "active-l1", "active L1 table"),
    (MetadataType.ACTIVE_L2, "active-l2", "active L2 table"),
    (MetadataType.REFCOUNT_TABLE, "refcount-table", "refcount table"),
    (MetadataType.REFCOUNT_BLOCK, "refcount-block", "refcount block"),
    (MetadataType.SNAPSHOT_TABLE, "snapshot-table", "snapshot table"),
    (MetadataType.INACTIVE_L1, "inactive-l1", "inactive L1 table"),
    (MetadataType.INACTIVE_L2, "inactive-l2", "inactive L2 table"),
    (MetadataType.BITMAP_DIRECTORY, "bitmap-directory", "bitmap directory"),
    (MetadataType.CRYPTO_HEADER, "crypto-header", "encryption header"),
    (MetadataType.BITMAP_TABLE, "bitmap-table", "bitmap table"),
)

#: The 11 single-bit types, lowest bit first (portable replacement for ``list(MetadataType)``).
SINGLE_TYPES: tuple[MetadataType, ...] = tuple(member for member, _, _ in _TABLE)

_INFO: dict[int, _TypeInfo] = {
    int(member): _TypeInfo(str(member.name), key, message) for member, key, message in _TABLE
}
_BY_KEY: dict[str, MetadataType] = {key: member for member, key, _ in _TABLE}

#: Template names and masks, in QEMU's order (none, constant, cached, all); each contains the last.
TEMPLATES: dict[str, MetadataType] = {
    "none": MetadataType.NONE,
    "constant": MetadataType.CONSTANT,
    "cached": MetadataType.CACHED,
    "all": MetadataType.ALL,
}

#: qcow2ovl's default template (QEMU's is ``cached``; with a metadata map ``all`` costs nothing).
DEFAULT_TEMPLATE = "all"


def template(name: str) -> MetadataType:
    """Mask of the template *name* (``none``, ``constant``, ``cached`` or ``all``).

    Raises ``ValueError`` with QEMU's message for an unsupported name.
    """
    mask = TEMPLATES.get(name) if isinstance(name, str) else None
    if mask is None:
        raise unsupported_template(name)
    return mask


def unsupported_template(value: object) -> ValueError:
    """QEMU's error for a template value that is not one of :data:`TEMPLATES` (to be raised)."""
    return ValueError(
        f"Unsupported value '{value}' for qcow2 option 'overlap-check'. "
        "Allowed are any of the following: " + ", ".join(TEMPLATES)
    )


__all__ = [
    "DEFAULT_TEMPLATE",
    "SINGLE_TYPES",
    "TEMPLATES",
    "MetadataType",
    "template",
    "unsupported_template",
]
