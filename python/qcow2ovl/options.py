"""The ``overlap-check`` option: which metadata types every write is checked against.

The rules are QEMU's (``qcow2_update_options_prepare`` in ``block/qcow2.c``, iotest 137), with one
difference: qcow2ovl's default template is ``all`` instead of ``cached``.

- The template comes from ``overlap-check``, else ``overlap-check.template``, else the default. Both
  given with different strings is an error, even if one of them is invalid.
- Each ``overlap-check.<key>`` boolean overrides its type's bit in the template.
- Booleans given as strings take QEMU's words (``qapi_bool_parse``, QEMU 5.2 and later):
  ``on``/``yes``/``true``/``y`` and ``off``/``no``/``false``/``n``, case-sensitive. In mappings a
  Python ``bool`` is accepted too.

Accepted spellings (see :meth:`OverlapCheck.parse`):

- ``None``: the default (template ``all``);
- an :class:`OverlapCheck` (returned as is), or a mask (:class:`MetadataType` or ``int``);
- a template name: ``"none"``, ``"constant"``, ``"cached"``, ``"all"``;
- a mapping or a comma-separated ``key=value`` string of options. Every key may be written with or
  without the ``overlap-check.`` prefix (``template`` is ``overlap-check.template``,
  ``inactive-l2`` is ``overlap-check.inactive-l2``); ``overlap-check`` itself is the template. In a
  mapping, ``overlap-check`` may also hold a nested mapping (QEMU's JSON form
  ``{"overlap-check": {"template": "all", "inactive-l2": false}}``).

Errors are ``ValueError`` (``TypeError`` for a spec of an unsupported Python type) and are raised
in QEMU's order: malformed or unknown or repeated keys, then bad booleans, then conflicting template
options, then an unsupported template name.
"""

from __future__ import annotations

from qcow2ovl.types import (
    DEFAULT_TEMPLATE,
    SINGLE_TYPES,
    TEMPLATES,
    MetadataType,
    template,
    unsupported_template,
)

# Startup time: neither typing nor collections.abc (nor dataclasses) is imported at run time;
# type checkers see them here, and the code imports Mapping where it needs it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from dataclasses import dataclass
    from typing import Any, Union

    #: Anything :meth:`OverlapCheck.parse` accepts.
    OverlapCheckSpec = Union["OverlapCheck", MetadataType, int, str, Mapping[str, object], None]
else:
    from qcow2ovl._frozen import dataclass

    def __getattr__(name: str) -> object:
        """``OverlapCheckSpec``, built with :mod:`typing` only when asked for at run time."""
        if name == "OverlapCheckSpec":
            from collections.abc import Mapping
            from typing import Union

            spec = Union["OverlapCheck", MetadataType, int, str, Mapping[str, object], None]
            globals()[name] = spec
            return spec
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The option holding the template (QEMU's ``QCOW2_OPT_OVERLAP``).
OPTION = "overlap-check"
#: Prefix of the template key and of every per-type key.
PREFIX = OPTION + "."
#: The short key of ``overlap-check.template``.
TEMPLATE_KEY = "template"

# QEMU's qapi_bool_parse words; case-sensitive.
_TRUE_WORDS = frozenset({"on", "yes", "true", "y"})
_FALSE_WORDS = frozenset({"off", "no", "false", "n"})

# Per-type option keys (short form) and every flat option name, for lookups and error messages.
_KEYS: dict[str, MetadataType] = {member.key: member for member in SINGLE_TYPES}
_ALLOWED_OPTIONS: tuple[str, ...] = (OPTION, PREFIX + TEMPLATE_KEY) + tuple(
    PREFIX + key for key in _KEYS
)


def _parse_bool(name: str, value: object) -> bool:
    """Parse the value of the boolean option *name* the way QEMU does (plus Python bools)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _TRUE_WORDS:
            return True
        if value in _FALSE_WORDS:
            return False
    raise ValueError(f"Parameter '{name}' expects 'on' or 'off'")


def _split_options(spec: str) -> dict[str, str]:
    """Split ``"k1=v1,k2=v2"`` into a dict, rejecting items without ``=`` and repeated keys."""
    options: dict[str, str] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(
                f"Invalid overlap-check option {item!r} in {spec!r}: expected key=value"
            )
        if key in options:
            raise ValueError(f"Option '{key}' is given more than once in {spec!r}")
        options[key] = value
    return options


def _flatten(options: Mapping[str, object]) -> list[tuple[str, object]]:
    """Expand a nested ``{"overlap-check": {...}}`` into flat ``overlap-check.<key>`` items."""
    from collections.abc import Mapping

    items: list[tuple[str, object]] = []
    for key, value in options.items():
        if not isinstance(key, str):
            raise ValueError(f"overlap-check option keys must be strings, not {key!r}")
        if key == OPTION and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                if not isinstance(sub_key, str):
                    raise ValueError(f"overlap-check option keys must be strings, not {sub_key!r}")
                items.append((PREFIX + sub_key, sub_value))
        else:
            items.append((key, value))
    return items


def _normalize(options: Mapping[str, object]) -> dict[str, tuple[str, object]]:
    """Map every option to its short key (``""`` for ``overlap-check`` itself).

    The values keep the spelling the caller used, for error messages. Unknown keys and keys given
    twice (e.g. ``inactive-l2`` and ``overlap-check.inactive-l2``) raise ``ValueError``.
    """
    normalized: dict[str, tuple[str, object]] = {}
    for key, value in _flatten(options):
        short = "" if key == OPTION else _strip(key)
        if key != OPTION and short != TEMPLATE_KEY and short not in _KEYS:
            raise ValueError(
                f"Unknown overlap-check option '{key}'. Allowed are any of the following: "
                + ", ".join(_ALLOWED_OPTIONS)
            )
        if short in normalized:
            raise ValueError(
                f"Option '{_full_name(short)}' is given more than once "
                f"(as '{normalized[short][0]}' and '{key}')"
            )
        normalized[short] = (key, value)
    return normalized


def _strip(key: str) -> str:
    """Short key of an option key: drop the ``overlap-check.`` prefix if present."""
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def _full_name(short: str) -> str:
    """QEMU's flat name of a short key (``""`` is ``overlap-check`` itself)."""
    return PREFIX + short if short else OPTION


@dataclass(frozen=True)
class OverlapCheck:
    """A parsed ``overlap-check`` setting.

    ``mask`` is what matters: the types every write is checked against. ``template`` records the
    template the mask was derived from, so that :meth:`__str__` can say what was asked for; two
    settings are equal only if both fields are.
    """

    #: The metadata types to check; always within ``MetadataType.ALL``.
    mask: MetadataType = TEMPLATES[DEFAULT_TEMPLATE]
    #: Name of the template ``mask`` was built from: ``none``, ``constant``, ``cached`` or ``all``.
    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        """Validate both fields and store ``mask`` as a :class:`MetadataType`."""
        template(self.template)
        mask = self.mask
        if isinstance(mask, bool) or not isinstance(mask, int):
            raise TypeError(f"overlap-check mask must be an int or MetadataType, not {mask!r}")
        if mask < 0 or mask & ~int(MetadataType.ALL):
            raise ValueError(
                f"overlap-check mask {int(mask):#x} has bits outside MetadataType.ALL "
                f"({int(MetadataType.ALL):#x})"
            )
        object.__setattr__(self, "mask", MetadataType(int(mask)))

    @classmethod
    def parse(cls, spec: OverlapCheckSpec = None) -> OverlapCheck:
        """Parse any accepted spelling of the option (see the module docstring).

        A plain string without ``=`` is a template name; with ``=`` it is a comma-separated list of
        ``key=value`` options (``"overlap-check=all,overlap-check.inactive-l2=off"``, or with the
        prefix left out: ``"template=cached,inactive-l2=off"``).
        """
        if spec is None:
            return cls()
        if isinstance(spec, OverlapCheck):
            return spec
        if isinstance(spec, bool):
            raise TypeError(f"Unsupported overlap-check specification {spec!r}")
        if isinstance(spec, int):
            return cls.from_mask(spec)
        if isinstance(spec, str):
            if "=" not in spec:
                return cls(template(spec), spec)
            return cls._from_options(_split_options(spec))
        from collections.abc import Mapping

        if isinstance(spec, Mapping):
            return cls._from_options(spec)
        raise TypeError(f"Unsupported overlap-check specification of type {type(spec).__name__}")

    @classmethod
    def from_mask(cls, mask: int) -> OverlapCheck:
        """A setting for an explicit mask, recorded against the template closest to it.

        Closest means fewest differing bits; ties go to the earlier template in
        none, constant, cached, all order.
        """
        if isinstance(mask, bool) or not isinstance(mask, int):
            raise TypeError(f"overlap-check mask must be an int or MetadataType, not {mask!r}")
        name = min(TEMPLATES, key=lambda t: bin(int(mask) ^ int(TEMPLATES[t])).count("1"))
        # __post_init__ validates the mask and makes it a MetadataType.
        unchecked: Any = mask
        return cls(unchecked, name)

    @classmethod
    def _from_options(cls, options: Mapping[str, object]) -> OverlapCheck:
        """Apply QEMU's rules to a flat or nested option mapping."""
        normalized = _normalize(options)
        overrides: dict[MetadataType, bool] = {}
        for short, (_, value) in normalized.items():
            if short in _KEYS:
                overrides[_KEYS[short]] = _parse_bool(_full_name(short), value)

        mode = normalized.get("")
        tmpl = normalized.get(TEMPLATE_KEY)
        # QEMU compares the two strings before it looks at either.
        if mode is not None and tmpl is not None and mode[1] != tmpl[1]:
            raise ValueError(
                f"Conflicting values for qcow2 options '{OPTION}' ('{mode[1]}') and "
                f"'{PREFIX}{TEMPLATE_KEY}' ('{tmpl[1]}')"
            )
        chosen = mode if mode is not None else tmpl
        name = DEFAULT_TEMPLATE if chosen is None else chosen[1]
        if not isinstance(name, str):
            raise unsupported_template(name)
        mask = template(name)
        for member, enabled in overrides.items():
            mask = mask | member if enabled else mask & ~member
        return cls(mask, name)

    @property
    def overrides(self) -> dict[str, bool]:
        """Per-type keys whose bit differs from the template, lowest bit first."""
        base = TEMPLATES[self.template]
        return {
            member.key: bool(self.mask & member)
            for member in SINGLE_TYPES
            if bool(self.mask & member) != bool(base & member)
        }

    def to_options(self) -> dict[str, str]:
        """QEMU's flat option dict: ``overlap-check`` plus one ``on``/``off`` per override."""
        options = {OPTION: self.template}
        for key, enabled in self.overrides.items():
            options[PREFIX + key] = "on" if enabled else "off"
        return options

    def __str__(self) -> str:
        """Canonical flat string, e.g. ``overlap-check=all,overlap-check.inactive-l2=off``.

        ``OverlapCheck.parse(str(x)) == x`` for every ``x``.
        """
        return ",".join(f"{key}={value}" for key, value in self.to_options().items())


def map_memory_limit(value: object, name: str = "map_memory_limit") -> int | None:
    """Validate the ``map_memory_limit`` option of :func:`qcow2ovl.open` (bytes, or ``None``).

    Errors name the option as the caller wrote it: ``TypeError`` for a non-int, ``ValueError``
    for a negative value, one beyond 2**64 - 1, or one below what the smallest metadata map
    needs.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int (bytes) or None, not {type(value).__name__}")
    limit = int(value.__index__())
    if not 0 <= limit < 1 << 64:
        raise ValueError(f"{name} must be between 0 and 2**64 - 1 bytes, not {limit}")
    from qcow2ovl._core import MetadataMap

    try:  # the smallest map there is: the same lower bound every image's map has
        MetadataMap(512, enabled=0, total_size_limit=limit)
    except ValueError as exc:
        raise ValueError(str(exc).replace("total_size_limit", name, 1)) from None
    return limit


__all__ = ["OPTION", "OverlapCheck", "OverlapCheckSpec", "map_memory_limit"]
