"""The overlap-check option, against QEMU's rules and iotest 137.

The rules are summed up in docs/design/architecture.md ("The overlap-check option").
"""

from __future__ import annotations

import dataclasses

import pytest
import qcow2ovl
from hypothesis import given
from hypothesis import strategies as st
from qcow2ovl.options import OverlapCheck
from qcow2ovl.types import MetadataType

# Written out by hand from docs/design/architecture.md, independently of qcow2ovl.types:
# option key -> (bit, smallest template containing it).
KEYS = {
    "main-header": (0x001, "constant"),
    "active-l1": (0x002, "constant"),
    "active-l2": (0x004, "cached"),
    "refcount-table": (0x008, "constant"),
    "refcount-block": (0x010, "cached"),
    "snapshot-table": (0x020, "constant"),
    "inactive-l1": (0x040, "cached"),
    "inactive-l2": (0x080, "all"),
    "bitmap-directory": (0x100, "constant"),
    "crypto-header": (0x200, "constant"),
    "bitmap-table": (0x400, "cached"),
}
ORDER = ["none", "constant", "cached", "all"]
TEMPLATE_MASK = {
    name: sum(bit for bit, t in KEYS.values() if ORDER.index(t) <= ORDER.index(name))
    for name in ORDER
}
TRUE_WORDS = ["on", "yes", "true", "y"]
FALSE_WORDS = ["off", "no", "false", "n"]
CONFLICT = (
    "Conflicting values for qcow2 options 'overlap-check' ('{}') and "
    "'overlap-check.template' ('{}')"
)
UNSUPPORTED = (
    "Unsupported value '{}' for qcow2 option 'overlap-check'. "
    "Allowed are any of the following: none, constant, cached, all"
)
BAD_BOOL = "Parameter 'overlap-check.{}' expects 'on' or 'off'"


def error_of(spec: object) -> str:
    with pytest.raises(ValueError) as info:
        OverlapCheck.parse(spec)
    return str(info.value)


def test_hand_written_template_masks():
    assert TEMPLATE_MASK == {"none": 0, "constant": 0x32B, "cached": 0x77F, "all": 0x7FF}


# --- defaults and simple forms ----------------------------------------------------------------


def test_default_is_all():
    for spec in (None, {}, OverlapCheck()):
        check = OverlapCheck.parse(spec)
        assert check.mask == MetadataType.ALL
        assert check.template == "all"
    assert OverlapCheck.parse() == OverlapCheck(MetadataType.ALL, "all")


def test_default_applies_when_only_overrides_given():
    check = OverlapCheck.parse("overlap-check.inactive-l2=off")
    assert check.template == "all"
    assert check.mask == TEMPLATE_MASK["all"] & ~0x080


def test_overlap_check_instance_returned_as_is():
    check = OverlapCheck(MetadataType.CONSTANT, "constant")
    assert OverlapCheck.parse(check) is check


@pytest.mark.parametrize("name", ORDER)
def test_template_string(name):
    check = OverlapCheck.parse(name)
    assert check == OverlapCheck(MetadataType(TEMPLATE_MASK[name]), name)
    assert isinstance(check.mask, MetadataType)


# --- iotest 137: "Try setting valid values for all options" (overlap-check part) --------------


@pytest.mark.parametrize("key", ["overlap-check", "overlap-check.template"])
@pytest.mark.parametrize("name", ["all", "none", "cached", "constant"])
def test_iotest137_template_spellings(key, name):
    expected = OverlapCheck(MetadataType(TEMPLATE_MASK[name]), name)
    assert OverlapCheck.parse(f"{key}={name}") == expected
    assert OverlapCheck.parse({key: name}) == expected


@pytest.mark.parametrize("name", ORDER)
def test_template_short_and_nested_spellings(name):
    expected = OverlapCheck(MetadataType(TEMPLATE_MASK[name]), name)
    assert OverlapCheck.parse(f"template={name}") == expected
    assert OverlapCheck.parse({"template": name}) == expected
    assert OverlapCheck.parse({"overlap-check": {"template": name}}) == expected


@pytest.mark.parametrize("name", ORDER)
def test_both_template_spellings_equal_is_fine(name):
    expected = OverlapCheck(MetadataType(TEMPLATE_MASK[name]), name)
    assert OverlapCheck.parse(f"overlap-check={name},overlap-check.template={name}") == expected
    assert OverlapCheck.parse({"overlap-check": name, "template": name}) == expected


@pytest.mark.parametrize("start", [None, *ORDER])
@pytest.mark.parametrize("state", ["on", "off"])
@pytest.mark.parametrize("key", list(KEYS))
def test_iotest137_per_type_key(start, state, key):
    """Every per-type key switched on and off, from the default and from every template."""
    bit = KEYS[key][0]
    base = TEMPLATE_MASK[start or "all"]
    want = base | bit if state == "on" else base & ~bit
    expected = OverlapCheck(MetadataType(want), start or "all")

    flat = {f"overlap-check.{key}": state}
    if start is not None:
        flat["overlap-check"] = start
    assert OverlapCheck.parse(flat) == expected
    assert OverlapCheck.parse(",".join(f"{k}={v}" for k, v in flat.items())) == expected

    short: dict[str, object] = {key: state == "on"}
    if start is not None:
        short["template"] = start
    assert OverlapCheck.parse(short) == expected
    assert OverlapCheck.parse({"overlap-check": short}) == expected


def test_iotest137_sequence_of_reopens():
    """Each reopen in 137 is parsed on its own: nothing carries over from the previous one."""
    specs = [
        "overlap-check=all",
        "overlap-check=none",
        "overlap-check=cached",
        "overlap-check=constant",
        "overlap-check.template=all",
        "overlap-check.template=none",
        "overlap-check.template=cached",
        "overlap-check.template=constant",
    ]
    specs += [f"overlap-check.{key}={state}" for key in KEYS for state in ("on", "off")]
    for spec in specs:
        check = OverlapCheck.parse(spec)
        assert OverlapCheck.parse(str(check)) == check


# --- iotest 137: "Try setting some invalid values" --------------------------------------------


def test_iotest137_conflict():
    assert error_of("overlap-check=constant,overlap-check.template=all") == CONFLICT.format(
        "constant", "all"
    )


@pytest.mark.parametrize(
    "spec",
    [
        {"overlap-check": "constant", "overlap-check.template": "all"},
        {"overlap-check.template": "all", "overlap-check": "constant"},
        {"overlap-check": "constant", "template": "all"},
        "overlap-check.template=all,overlap-check=constant",
    ],
)
def test_conflict_other_spellings(spec):
    assert error_of(spec) == CONFLICT.format("constant", "all")


def test_conflict_is_checked_before_validity():
    # QEMU compares the two strings before looking at either.
    assert error_of("overlap-check=blubb,overlap-check.template=all") == CONFLICT.format(
        "blubb", "all"
    )
    assert error_of("overlap-check=all,overlap-check.template=ALL") == CONFLICT.format("all", "ALL")


def test_same_invalid_template_twice_is_unsupported():
    assert error_of("overlap-check=blubb,overlap-check.template=blubb") == UNSUPPORTED.format(
        "blubb"
    )


@pytest.mark.parametrize("key", ["overlap-check", "overlap-check.template", "template"])
def test_iotest137_unsupported_value(key):
    # The message names 'overlap-check' for either spelling, as QEMU's does.
    assert error_of(f"{key}=blubb") == UNSUPPORTED.format("blubb")
    assert error_of({key: "blubb"}) == UNSUPPORTED.format("blubb")


@pytest.mark.parametrize("bad", ["blubb", "ALL", "Cached", " all", "all ", "", "on"])
def test_unsupported_template_strings(bad):
    assert error_of(bad) == UNSUPPORTED.format(bad)
    assert error_of({"overlap-check": bad}) == UNSUPPORTED.format(bad)


@pytest.mark.parametrize("bad", [None, True, 0x7FF, MetadataType.ALL, ["all"]])
def test_non_string_template_value(bad):
    assert error_of({"template": bad}) == UNSUPPORTED.format(bad)


def test_iotest137_style_bad_boolean():
    # 137 uses lazy-refcounts=42; the same parser handles overlap-check.<key>.
    assert error_of("overlap-check.inactive-l2=42") == BAD_BOOL.format("inactive-l2")


@pytest.mark.parametrize("key", list(KEYS))
@pytest.mark.parametrize(
    "bad", ["42", "", "ON", "Off", "True", "1", "0", "enable", " on", 1, 0, None, 1.0]
)
def test_bad_boolean_values(key, bad):
    expected = BAD_BOOL.format(key)
    assert error_of({f"overlap-check.{key}": bad}) == expected
    assert error_of({key: bad}) == expected  # short spelling reports the full name
    if isinstance(bad, str):
        assert error_of(f"overlap-check.{key}={bad}") == expected
        assert error_of(f"{key}={bad}") == expected


@pytest.mark.parametrize("word", TRUE_WORDS)
def test_qemu_true_words(word):
    check = OverlapCheck.parse(f"overlap-check=none,overlap-check.active-l2={word}")
    assert check.mask == MetadataType.ACTIVE_L2


@pytest.mark.parametrize("word", FALSE_WORDS)
def test_qemu_false_words(word):
    check = OverlapCheck.parse(f"overlap-check=all,overlap-check.active-l2={word}")
    assert check.mask == TEMPLATE_MASK["all"] & ~0x004


def test_python_bools_in_dicts():
    check = OverlapCheck.parse({"template": "cached", "inactive-l2": True, "active-l1": False})
    assert check.mask == (TEMPLATE_MASK["cached"] | 0x080) & ~0x002
    flat = {"overlap-check": "cached", "overlap-check.inactive-l2": True}
    assert OverlapCheck.parse(flat).mask == TEMPLATE_MASK["all"]


def test_bad_boolean_reported_before_conflict_and_template():
    # QEMU parses booleans while absorbing the options, before the template checks.
    spec = "overlap-check=constant,overlap-check.template=all,overlap-check.active-l1=42"
    assert error_of(spec) == BAD_BOOL.format("active-l1")
    assert error_of("overlap-check=blubb,overlap-check.active-l1=42") == BAD_BOOL.format(
        "active-l1"
    )


# --- unknown, repeated and malformed options --------------------------------------------------


@pytest.mark.parametrize(
    "spec,name",
    [
        ("overlap-check.foo=on", "overlap-check.foo"),
        ("foo=on", "foo"),
        ("overlap-check=all,lazy-refcounts=on", "lazy-refcounts"),
        ({"overlap-check.inactive_l2": "off"}, "overlap-check.inactive_l2"),
        ({"overlap-check.": "on"}, "overlap-check."),
        ({"": "on"}, ""),
        ({"Overlap-Check": "all"}, "Overlap-Check"),
        ({"overlap-check": {"blubb": True}}, "overlap-check.blubb"),
        ({"overlap-check": {"overlap-check": "all"}}, "overlap-check.overlap-check"),
        ({"overlap-check.overlap-check.template": "all"}, "overlap-check.overlap-check.template"),
    ],
)
def test_unknown_key(spec, name):
    message = error_of(spec)
    assert message.startswith(f"Unknown overlap-check option '{name}'.")
    assert "overlap-check.inactive-l2" in message  # lists what is allowed


def test_unknown_key_reported_before_bad_template():
    assert error_of("overlap-check=blubb,foo=on").startswith("Unknown overlap-check option 'foo'")


@pytest.mark.parametrize(
    "spec",
    [
        {"inactive-l2": "on", "overlap-check.inactive-l2": "off"},
        {"template": "all", "overlap-check.template": "all"},
        {"overlap-check": {"template": "all"}, "overlap-check.template": "all"},
        {"overlap-check": {"active-l1": True}, "active-l1": True},
        "inactive-l2=on,overlap-check.inactive-l2=on",
        "overlap-check=all,overlap-check=all",
        "overlap-check=all,overlap-check=none",
    ],
)
def test_repeated_option(spec):
    assert "given more than once" in error_of(spec)


@pytest.mark.parametrize(
    "spec", ["all,inactive-l2=off", "overlap-check=all,", ",overlap-check=all", "=all", "a=b,,c=d"]
)
def test_malformed_string(spec):
    assert "expected key=value" in error_of(spec)


def test_non_string_keys():
    assert "keys must be strings" in error_of({1: "on"})
    assert "keys must be strings" in error_of({"overlap-check": {1: "on"}})


@pytest.mark.parametrize("spec", [True, False, 1.5, b"all", ["all"], ("template", "all")])
def test_unsupported_spec_types(spec):
    with pytest.raises(TypeError):
        OverlapCheck.parse(spec)  # type: ignore[arg-type]


# --- masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ORDER)
def test_template_masks_parse_to_their_template(name):
    for spec in (TEMPLATE_MASK[name], MetadataType(TEMPLATE_MASK[name])):
        check = OverlapCheck.parse(spec)
        assert check == OverlapCheck(MetadataType(TEMPLATE_MASK[name]), name)
        assert str(check) == f"overlap-check={name}"


def test_mask_records_closest_template():
    check = OverlapCheck.parse(MetadataType.CONSTANT | MetadataType.ACTIVE_L2)
    assert check.template == "constant"
    assert str(check) == "overlap-check=constant,overlap-check.active-l2=on"
    check = OverlapCheck.parse(TEMPLATE_MASK["all"] & ~0x080 & ~0x004)
    assert check.template == "cached"
    assert str(check) == "overlap-check=cached,overlap-check.active-l2=off"


def test_mask_tie_goes_to_earlier_template():
    assert OverlapCheck.parse(0x080).template == "none"  # 1 bit from none, 7 from constant
    # constant | active-l2 | refcount-block: 2 bits from constant and from cached -> constant.
    assert OverlapCheck.parse(TEMPLATE_MASK["constant"] | 0x004 | 0x010).template == "constant"
    ties = 0
    for mask in range(0x800):
        chosen = OverlapCheck.from_mask(mask).template
        dist = {name: bin(mask ^ TEMPLATE_MASK[name]).count("1") for name in ORDER}
        best = min(dist.values())
        assert dist[chosen] == best
        assert all(dist[name] > best for name in ORDER[: ORDER.index(chosen)])
        ties += list(dist.values()).count(best) > 1
    assert ties > 0


@pytest.mark.parametrize("mask", [-1, 0x800, 0xFFF, 1 << 40])
def test_mask_out_of_range(mask):
    assert "outside MetadataType.ALL" in error_of(mask)


def test_from_mask_rejects_non_int():
    with pytest.raises(TypeError):
        OverlapCheck.from_mask(True)
    with pytest.raises(TypeError):
        OverlapCheck.from_mask("all")  # type: ignore[arg-type]


# --- the dataclass ----------------------------------------------------------------------------


def test_constructor_validates_and_coerces():
    check = OverlapCheck(0x32B, "constant")  # type: ignore[arg-type]
    assert isinstance(check.mask, MetadataType)
    assert check == OverlapCheck(MetadataType.CONSTANT, "constant")
    assert hash(check) == hash(OverlapCheck(MetadataType.CONSTANT, "constant"))
    with pytest.raises(ValueError, match="Unsupported value 'blubb'"):
        OverlapCheck(MetadataType.ALL, "blubb")
    with pytest.raises(ValueError, match="outside"):
        OverlapCheck(MetadataType(0x800), "all")
    with pytest.raises(TypeError):
        OverlapCheck(True, "all")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        OverlapCheck("all", "all")  # type: ignore[arg-type]


def test_frozen():
    check = OverlapCheck()
    with pytest.raises(dataclasses.FrozenInstanceError):
        check.mask = MetadataType.NONE  # type: ignore[misc]


def test_equality_includes_template():
    # The same mask reached from two templates: equal effect, different settings.
    constant_keys = [key for key, (_, t) in KEYS.items() if t == "constant"]
    a = OverlapCheck.parse("none")
    b = OverlapCheck.parse({"template": "constant", **{key: False for key in constant_keys}})
    assert a.mask == b.mask == MetadataType.NONE
    assert a != b
    assert b.template == "constant"


def test_str_and_to_options_are_canonical():
    check = OverlapCheck.parse(
        {"inactive-l2": "off", "template": "all", "crypto-header": "no", "main-header": "on"}
    )
    # Keys in bit order; overrides that match the template are dropped.
    assert check.overrides == {"inactive-l2": False, "crypto-header": False}
    assert check.to_options() == {
        "overlap-check": "all",
        "overlap-check.inactive-l2": "off",
        "overlap-check.crypto-header": "off",
    }
    assert str(check) == (
        "overlap-check=all,overlap-check.inactive-l2=off,overlap-check.crypto-header=off"
    )
    assert str(OverlapCheck()) == "overlap-check=all"


# --- properties -------------------------------------------------------------------------------

templates = st.sampled_from(ORDER)
word = st.sampled_from(TRUE_WORDS + FALSE_WORDS)


@st.composite
def option_specs(draw: st.DrawFn) -> tuple[object, str, int]:
    """A random spec in a random form, with the template and mask it must give."""
    name = draw(st.none() | templates)
    overrides = draw(st.dictionaries(st.sampled_from(list(KEYS)), st.booleans()))
    form = draw(
        st.sampled_from(["flat-string", "short-string", "flat-dict", "short-dict", "nested"])
    )
    template_keys = draw(st.sampled_from(["overlap-check", "overlap-check.template", "both"]))
    strings = form.endswith("string")
    short = form.startswith("short") or form == "nested"

    items: list[tuple[str, object]] = []
    if name is not None:
        if template_keys in ("overlap-check", "both"):
            items.append(("overlap-check", name))
        if template_keys in ("overlap-check.template", "both"):
            items.append(("template" if short else "overlap-check.template", name))
    for key, enabled in overrides.items():
        if strings or draw(st.booleans()):
            words = TRUE_WORDS if enabled else FALSE_WORDS
            value: object = draw(st.sampled_from(words))
        else:
            value = enabled
        items.append((key if short else f"overlap-check.{key}", value))
    items = draw(st.permutations(items))

    if form == "nested":
        inner = {k: v for k, v in items if k != "overlap-check"}
        # The nested form carries the template inside; a bare "overlap-check" string cannot
        # coexist with the nested mapping, so fold it into "template".
        if any(k == "overlap-check" for k, _ in items):
            inner["template"] = name
        spec: object = {"overlap-check": inner}
    elif strings and items:
        spec = ",".join(f"{k}={v}" for k, v in items)
    else:
        spec = dict(items)

    expected_template = name or "all"
    mask = TEMPLATE_MASK[expected_template]
    for key, enabled in overrides.items():
        bit = KEYS[key][0]
        mask = mask | bit if enabled else mask & ~bit
    return spec, expected_template, mask


@given(option_specs())
def test_parse_property(case):
    spec, expected_template, expected_mask = case
    check = OverlapCheck.parse(spec)
    assert int(check.mask) == expected_mask
    assert check.template == expected_template
    assert OverlapCheck.parse(str(check)) == check
    assert OverlapCheck.parse(check.to_options()) == check
    assert OverlapCheck.parse(check) is check


@given(st.integers(min_value=0, max_value=0x7FF))
def test_mask_round_trip_property(mask):
    check = OverlapCheck.parse(mask)
    assert int(check.mask) == mask
    assert OverlapCheck.parse(str(check)) == check
    # Canonical: the string lists exactly the bits that differ from the template.
    differing = mask ^ TEMPLATE_MASK[check.template]
    assert str(check).count(",") == bin(differing).count("1")


# --- map_memory_limit ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 2**64, 2**200, 8])
def test_map_memory_limit_errors_name_the_option(tmp_path, value) -> None:
    path = tmp_path / "i.qcow2"
    path.write_bytes(b"")
    with pytest.raises(ValueError) as info:
        qcow2ovl.open(path, map_memory_limit=value)
    assert type(info.value) is ValueError
    assert "map_memory_limit" in str(info.value)
    assert "total_size_limit" not in str(info.value)


@pytest.mark.parametrize("value", ["1M", 1.5, True])
def test_map_memory_limit_type_errors(tmp_path, value) -> None:
    with pytest.raises(TypeError, match="map_memory_limit"):
        qcow2ovl.open(tmp_path / "i.qcow2", map_memory_limit=value)


def test_map_memory_limit_accepts_none_and_ints() -> None:
    from qcow2ovl.options import map_memory_limit

    assert map_memory_limit(None) is None
    assert map_memory_limit(1 << 20) == 1 << 20
    assert map_memory_limit(MetadataType.ALL) == 0x7FF
