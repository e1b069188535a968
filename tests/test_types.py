"""MetadataType: bits, option keys, QEMU message names and templates.

The reference table is "Metadata types" in docs/design/architecture.md.
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from qcow2ovl.types import (
    DEFAULT_TEMPLATE,
    SINGLE_TYPES,
    TEMPLATES,
    MetadataType,
    template,
    unsupported_template,
)

# Written out by hand from docs/design/architecture.md, independently of the module's own table:
# (member name, bit, option key, message name, smallest template containing it).
DESIGN_TABLE = [
    ("MAIN_HEADER", 0x001, "main-header", "qcow2_header", "constant"),
    ("ACTIVE_L1", 0x002, "active-l1", "active L1 table", "constant"),
    ("ACTIVE_L2", 0x004, "active-l2", "active L2 table", "cached"),
    ("REFCOUNT_TABLE", 0x008, "refcount-table", "refcount table", "constant"),
    ("REFCOUNT_BLOCK", 0x010, "refcount-block", "refcount block", "cached"),
    ("SNAPSHOT_TABLE", 0x020, "snapshot-table", "snapshot table", "constant"),
    ("INACTIVE_L1", 0x040, "inactive-l1", "inactive L1 table", "cached"),
    ("INACTIVE_L2", 0x080, "inactive-l2", "inactive L2 table", "all"),
    ("BITMAP_DIRECTORY", 0x100, "bitmap-directory", "bitmap directory", "constant"),
    ("CRYPTO_HEADER", 0x200, "crypto-header", "encryption header", "constant"),
    ("BITMAP_TABLE", 0x400, "bitmap-table", "bitmap table", "cached"),
]
TEMPLATE_ORDER = ["none", "constant", "cached", "all"]


def expected_template_mask(name: str) -> int:
    """Cumulative template mask computed from DESIGN_TABLE alone."""
    rank = TEMPLATE_ORDER.index(name)
    return sum(bit for _, bit, _, _, t in DESIGN_TABLE if TEMPLATE_ORDER.index(t) <= rank)


ROWS = pytest.mark.parametrize("name,bit,key,message,tmpl", DESIGN_TABLE)
masks = st.integers(min_value=0, max_value=0x7FF)


@ROWS
def test_member_bit(name, bit, key, message, tmpl):
    member = MetadataType[name]
    assert member.value == bit
    assert int(member) == bit
    assert MetadataType(bit) is member


@ROWS
def test_member_key_and_message_name(name, bit, key, message, tmpl):
    member = MetadataType[name]
    assert member.key == key
    assert member.message_name == message


@ROWS
def test_from_key_round_trip(name, bit, key, message, tmpl):
    member = MetadataType.from_key(key)
    assert member is MetadataType[name]
    assert MetadataType.from_key(member.key) is member


@ROWS
def test_member_min_template(name, bit, key, message, tmpl):
    assert MetadataType[name].min_template == tmpl


def test_single_types_in_bit_order():
    assert [m.name for m in SINGLE_TYPES] == [row[0] for row in DESIGN_TABLE]
    assert [int(m) for m in SINGLE_TYPES] == [1 << i for i in range(11)]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="IntFlag aliases iterate from 3.11 on")
def test_class_iteration_yields_only_single_bits():
    assert list(MetadataType) == list(SINGLE_TYPES)
    assert len(MetadataType) == 11


def test_members_mapping_has_types_and_templates():
    names = set(MetadataType.__members__)
    assert {row[0] for row in DESIGN_TABLE} | {"NONE", "CONSTANT", "CACHED", "ALL"} == names


def test_template_pseudo_members():
    assert MetadataType.NONE == 0
    assert MetadataType.CONSTANT == 0x32B
    assert MetadataType.CACHED == 0x77F
    assert MetadataType.ALL == 0x7FF
    for name in TEMPLATE_ORDER:
        assert int(getattr(MetadataType, name.upper())) == expected_template_mask(name)
        assert isinstance(getattr(MetadataType, name.upper()), MetadataType)


def test_templates_dict_order_and_values():
    assert list(TEMPLATES) == TEMPLATE_ORDER
    for name in TEMPLATE_ORDER:
        assert int(TEMPLATES[name]) == expected_template_mask(name)
        assert template(name) == TEMPLATES[name]
    assert TEMPLATES["all"] == MetadataType.ALL
    assert DEFAULT_TEMPLATE == "all"


def test_templates_are_cumulative():
    masks_in_order = [int(TEMPLATES[name]) for name in TEMPLATE_ORDER]
    for smaller, larger in zip(masks_in_order, masks_in_order[1:]):
        assert smaller & ~larger == 0
        assert smaller != larger
    assert masks_in_order[0] == 0
    assert masks_in_order[-1] == sum(row[1] for row in DESIGN_TABLE)


@pytest.mark.parametrize("name", TEMPLATE_ORDER)
def test_template_min_template(name):
    assert TEMPLATES[name].min_template == name


@pytest.mark.parametrize("bad", ["blubb", "", "ALL", "Cached", " all", None, 3])
def test_template_unknown(bad):
    message = (
        f"Unsupported value '{bad}' for qcow2 option 'overlap-check'. "
        "Allowed are any of the following: none, constant, cached, all"
    )
    with pytest.raises(ValueError) as info:
        template(bad)
    assert str(info.value) == message
    assert str(unsupported_template(bad)) == message


@pytest.mark.parametrize(
    "bad",
    ["", "blubb", "INACTIVE-L2", "inactive_l2", "overlap-check.inactive-l2", "template", "all"],
)
def test_from_key_unknown(bad):
    with pytest.raises(ValueError, match="Unknown metadata type key") as info:
        MetadataType.from_key(bad)
    assert repr(bad) in str(info.value)
    assert "inactive-l2" in str(info.value)  # lists the allowed keys


def test_from_key_non_string():
    with pytest.raises(ValueError, match="Unknown metadata type key"):
        MetadataType.from_key(0x80)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [MetadataType.NONE, MetadataType.ALL, MetadataType.CONSTANT, MetadataType(0x81)],
)
def test_key_of_non_single_value_raises(value):
    with pytest.raises(ValueError, match="not a single metadata type"):
        _ = value.key


def test_message_name_of_zero_is_none():
    assert MetadataType.NONE.message_name is None
    assert MetadataType(0).message_name is None


def test_message_name_uses_lowest_bit():
    assert (MetadataType.INACTIVE_L2 | MetadataType.ACTIVE_L1).message_name == "active L1 table"
    assert MetadataType.ALL.message_name == "qcow2_header"
    assert (MetadataType.BITMAP_TABLE | MetadataType.CRYPTO_HEADER).message_name == (
        "encryption header"
    )


@given(masks)
def test_message_name_property(mask):
    value = MetadataType(mask)
    if mask == 0:
        assert value.message_name is None
    else:
        lowest = (mask & -mask).bit_length() - 1
        assert value.message_name == DESIGN_TABLE[lowest][3]


@given(masks)
def test_bits_keys_names(mask):
    value = MetadataType(mask)
    expected_rows = [row for row in DESIGN_TABLE if row[1] & mask]
    assert [int(m) for m in value.bits()] == [row[1] for row in expected_rows]
    assert all(isinstance(m, MetadataType) for m in value.bits())
    assert value.keys() == [row[2] for row in expected_rows]
    assert value.names() == [row[0] for row in expected_rows]
    total = MetadataType.NONE
    for member in value.bits():
        total |= member
    assert total == value


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Flag value iteration from 3.11 on")
@given(masks)
def test_bits_matches_flag_iteration(mask):
    value = MetadataType(mask)
    assert list(value) == value.bits()


@given(masks)
def test_min_template_is_smallest_containing(mask):
    name = MetadataType(mask).min_template
    assert mask & ~expected_template_mask(name) == 0
    rank = TEMPLATE_ORDER.index(name)
    if rank > 0:
        assert mask & ~expected_template_mask(TEMPLATE_ORDER[rank - 1]) != 0


def test_min_template_outside_all_raises():
    with pytest.raises(ValueError, match="outside"):
        _ = MetadataType(0x800).min_template


def test_set_operations_stay_metadata_type():
    value = MetadataType.CACHED & ~MetadataType.ACTIVE_L2
    assert isinstance(value, MetadataType)
    assert MetadataType.ACTIVE_L2 not in value
    assert MetadataType.ACTIVE_L1 in value
    assert value | MetadataType.INACTIVE_L2 | MetadataType.ACTIVE_L2 == MetadataType.ALL
