"""A cheap stand-in for ``@dataclass(frozen=True)``, so that ``import qcow2ovl`` stays fast.

Importing :mod:`dataclasses` pulls in :mod:`inspect` (about 9 ms on the project's machine) and each
decorated class compiles generated code (about 1 ms each); ``qcow2ovl info`` paid both on every
run. Type checkers see the real :func:`dataclasses.dataclass` (the modules that use this one
import it under ``TYPE_CHECKING``); at run time this decorator adds the same ``__init__``,
``__repr__``, ``__eq__``, ``__hash__`` and frozen ``__setattr__`` from the class annotations,
without generating code.

Supported: ``frozen=True`` (required), ``repr=False``, fields with plain default values, and
``__post_init__``. Not supported, and refused: anything else (``field()``, ``order``, ...).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, TypeVar

    _T = TypeVar("_T", bound=type)
_MISSING = object()


def _frozen_error(cls_name: str, name: str) -> AttributeError:
    """The error ``dataclasses`` raises for an assignment to a frozen field (imported lazily)."""
    import dataclasses

    return dataclasses.FrozenInstanceError(f"cannot assign to field {name!r} of {cls_name}")


def dataclass(*, frozen: bool, repr: bool = True) -> Callable[[_T], _T]:  # noqa: A002
    """Make *cls* a frozen record of its annotated fields (see the module docstring)."""
    if not frozen:
        raise TypeError("qcow2ovl._frozen.dataclass supports frozen records only")

    def decorate(cls: _T) -> _T:
        names: list[str] = []
        for base in reversed(cls.__mro__[1:]):
            names += [n for n in getattr(base, "__record_fields__", ()) if n not in names]
        names += [n for n in cls.__dict__.get("__annotations__", {}) if n not in names]
        fields = tuple(names)
        defaults: dict[str, object] = {}
        for base in reversed(cls.__mro__[1:]):
            defaults.update(getattr(base, "__record_defaults__", {}))
        defaults.update({n: cls.__dict__[n] for n in fields if n in cls.__dict__})
        post_init = getattr(cls, "__post_init__", None)
        cls_name = cls.__qualname__

        def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
            """Every field's value, in order, from a call's arguments and the defaults."""
            if len(args) > len(fields):
                raise TypeError(
                    f"{cls_name}() takes {len(fields)} positional arguments but {len(args)} "
                    "were given"
                )
            values = dict(zip(fields, args))
            for key, value in kwargs.items():
                if key not in fields:
                    raise TypeError(f"{cls_name}() got an unexpected keyword argument {key!r}")
                if key in values:
                    raise TypeError(f"{cls_name}() got multiple values for argument {key!r}")
                values[key] = value
            bound = []
            for name in fields:
                value = values.get(name, defaults.get(name, _MISSING))
                if value is _MISSING:
                    raise TypeError(f"{cls_name}() missing required argument: {name!r}")
                bound.append(value)
            return tuple(bound)

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            # Every field given by position or every one by name (records made from the
            # core's rows and dicts, by the tens of thousands for a big snapshot table) needs
            # no binding.
            if kwargs:
                try:
                    if args or len(kwargs) != len(fields):
                        raise KeyError
                    args = tuple([kwargs[n] for n in fields])
                except KeyError:
                    args = bind(args, kwargs)
            elif len(args) != len(fields):
                args = bind(args, kwargs)
            # Straight into the instance dict: the frozen __setattr__ is not involved.
            self.__dict__.update(zip(fields, args))
            if post_init is not None:
                post_init(self)

        def __setattr__(self: Any, name: str, value: object) -> None:
            raise _frozen_error(cls_name, name)

        def __delattr__(self: Any, name: str) -> None:
            raise _frozen_error(cls_name, name)

        def _key(self: Any) -> tuple[Any, ...]:
            return tuple(getattr(self, n) for n in fields)

        def __eq__(self: Any, other: object) -> bool:
            if other.__class__ is not self.__class__:
                return NotImplemented
            return bool(_key(self) == _key(other))

        def __hash__(self: Any) -> int:
            return hash(_key(self))

        def __repr__(self: Any) -> str:
            inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in fields)
            return f"{cls_name}({inner})"

        methods: dict[str, Any] = {
            "__init__": __init__,
            "__setattr__": __setattr__,
            "__delattr__": __delattr__,
            "__eq__": __eq__,
            "__hash__": __hash__,
        }
        if repr:
            methods["__repr__"] = __repr__
        for name, method in methods.items():
            method.__qualname__ = f"{cls_name}.{name}"
            setattr(cls, name, method)
        cls.__record_fields__ = fields  # type: ignore[attr-defined]
        cls.__record_defaults__ = defaults  # type: ignore[attr-defined]
        setattr(cls, "__match_args__", fields)  # noqa: B010 - mypy refuses the plain assignment
        return cls

    return decorate


__all__ = ["dataclass"]
