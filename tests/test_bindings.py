"""The Rust classes as Python sees them: help() text, signatures, and ValueError (never
OverflowError or OSError) for any int out of range, whatever its size."""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

import pytest
from qcow2ovl import MetadataMap, MetadataType, NaiveChecker

CLASSES = [MetadataMap, NaiveChecker]
METHODS = [
    (cls, name)
    for cls in CLASSES
    for name, value in vars(cls).items()
    if not name.startswith("_") and callable(value)
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_class_doc_and_signature(cls: type) -> None:
    doc = cls.__doc__ or ""
    assert len(doc.split()) > 20, doc
    assert f"qcow2ovl.{cls.__name__}" not in doc  # describes itself, does not point at itself
    assert "cluster_size" in doc and "enabled" in doc
    if sys.version_info < (3, 10):
        # The abi3 extension cannot give a class a text signature on 3.9 (PyO3 emits it only
        # for 3.10+); the methods keep theirs, and the docstring names the arguments.
        return
    sig = inspect.signature(cls)
    assert "cluster_size" in sig.parameters
    for p in sig.parameters.values():
        assert p.default is not Ellipsis, f"{cls.__name__}: {p.name} has no real default"


@pytest.mark.parametrize("cls,name", METHODS, ids=lambda x: getattr(x, "__name__", x))
def test_method_doc_and_signature(cls: type, name: str) -> None:
    method = getattr(cls, name)
    assert method.__doc__ and len(method.__doc__.split()) >= 5, f"{cls.__name__}.{name}"
    sig = inspect.signature(method)
    for p in sig.parameters.values():
        assert p.default is not Ellipsis, f"{cls.__name__}.{name}: {p.name}"


@pytest.mark.skipif(sys.version_info < (3, 10), reason="no class text signature on 3.9 (abi3)")
def test_real_defaults() -> None:
    naive = inspect.signature(NaiveChecker).parameters
    assert naive["l1_table"].default == ()
    assert naive["enabled"].default == int(MetadataType.ALL)
    assert inspect.signature(MetadataMap.check).parameters["ignore"].default == 0


def test_help_shows_docs() -> None:
    text = pydoc_text(MetadataMap)
    assert "rounds a range out to whole clusters" in text
    assert "check(self, /, offset, size, ignore=0)" in text


def pydoc_text(obj: Any) -> str:
    import pydoc

    return pydoc.render_doc(obj, renderer=pydoc.plaintext)


def _map() -> MetadataMap:
    m = MetadataMap(65536)
    m.enter(0x30000, 1, MetadataType.ACTIVE_L1)
    return m


BIG = 2**200
BAD_CALLS: list[tuple[str, Callable[[], object], str]] = [
    ("check offset 2**200", lambda: _map().check(BIG, 1), "offset"),
    ("check size 2**200", lambda: _map().check(0, BIG), "size"),
    ("check offset -1", lambda: _map().check(-1, 1), "offset"),
    ("check offset -2**200", lambda: _map().check(-BIG, 1), "offset"),
    ("check ignore 2**200", lambda: _map().check(0, 1, ignore=BIG), "ignore"),
    ("check ignore -1", lambda: _map().check(0, 1, ignore=-1), "ignore"),
    ("check past 2^56", lambda: _map().check(2**64 - 1, 1), "2^56"),
    ("enter types 2**200", lambda: _map().enter(0, 1, BIG), "types"),
    ("enter nb_clusters -1", lambda: _map().enter(0, -1, 4), "nb_clusters"),
    ("remove offset 2**200", lambda: _map().remove(BIG, 1, 4), "offset"),
    ("is_exact size -1", lambda: _map().is_exact(0, -1), "size"),
    ("cluster_size -1", lambda: MetadataMap(-1), "cluster size"),
    ("cluster_size 2**64", lambda: MetadataMap(2**64), "cluster size"),
    ("cluster_size 2**200", lambda: MetadataMap(BIG), "cluster size"),
    ("enabled -1", lambda: MetadataMap(4096, enabled=-1), "enabled"),
    ("total_size_limit -1", lambda: MetadataMap(4096, total_size_limit=-1), "total_size_limit"),
    ("total_size_limit 2**200", lambda: MetadataMap(4096, total_size_limit=BIG), "total_size"),
    ("naive cluster_size -1", lambda: NaiveChecker(-1), "cluster size"),
    ("naive l1_table entry -1", lambda: NaiveChecker(4096, l1_table=[0, -1]), "l1_table[1]"),
    ("naive refcount entry 2**64", lambda: NaiveChecker(4096, refcount_table=[2**64]), "refcount"),
    ("naive snapshot size", lambda: NaiveChecker(4096, snapshots=[(0, 2**32)]), "snapshots[0]"),
    ("naive crypto header -1", lambda: NaiveChecker(4096, crypto_header=(-1, 1)), "crypto_header"),
    ("naive l1 offset 2**200", lambda: NaiveChecker(4096, l1_table_offset=BIG), "l1_table_offset"),
    ("naive check overflow", lambda: NaiveChecker(4096).check(2**64 - 1, 1), "2**64"),
    ("naive check offset -1", lambda: NaiveChecker(4096).check(-1, 1), "offset"),
    ("naive check ignore 2**200", lambda: NaiveChecker(4096).check(0, 1, ignore=BIG), "ignore"),
]  # fmt: skip


@pytest.mark.parametrize(
    "call,needle", [(c, n) for _, c, n in BAD_CALLS], ids=[i for i, _, _ in BAD_CALLS]
)
def test_out_of_range_ints_are_value_errors(call: Callable[[], object], needle: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert type(info.value) is ValueError
    message = str(info.value)
    assert needle in message
    assert "f" * 16 not in message  # no 128-bit two's complement hex for negative values


def test_ints_like_objects_are_accepted() -> None:
    m = MetadataMap(4096, enabled=MetadataType.CACHED)
    m.enter(True * 4096, 1, MetadataType.ACTIVE_L2)
    assert m.check(4096, 1) == MetadataType.ACTIVE_L2
    with pytest.raises(TypeError, match="offset"):
        m.check("0", 1)  # type: ignore[arg-type]
