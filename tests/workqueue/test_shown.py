"""workqueue._shown.shown(): how both packages' errors show a number."""

from __future__ import annotations

import pytest

from workqueue._shown import shown


@pytest.mark.parametrize(("value", "spec", "text"), [
    # Twenty digits are shown whole, past them the first and last eight.
    ((1 << 80) - 1, "#x", "0xffffffffffffffffffff (an int of 80 bits)"),
    (1 << 80, "#x", "0x10000000...00000000 (an int of 81 bits)"),
    # Every base of a power of two, its prefix whatever its case.
    (1 << 80, "#X", "0X10000000...00000000 (an int of 81 bits)"),
    ((1 << 70) | 5, "#o", "0o20000000...00000005 (an int of 71 bits)"),
    ((1 << 70) | 5, "#b", "0b10000000...00000101 (an int of 71 bits)"),
    ((1 << 70) | 5, "o", "20000000...00000005 (an int of 71 bits)"),
    # A sign is kept ahead of the digits, not taken for one.
    (-(1 << 80), "#x", "-0x10000000...00000000 (an int of 81 bits)"),
    (1 << 80, "+#x", "+0x10000000...00000000 (an int of 81 bits)"),
    (1 << 80, " x", " 10000000...00000000 (an int of 81 bits)"),
])
def test_a_mask_past_64_bits_shows_its_first_and_last_digits(value: int, spec: str,
                                                              text: str) -> None:
    assert shown(value, spec) == text


def test_a_power_of_ten_base_shows_the_size_only() -> None:
    assert shown(1 << 80, "d") == "about 10**24 (an int of 81 bits)"
    assert shown(1 << 64, "#x") == "0x10000000000000000 (an int of 65 bits)"  # 17 digits
    assert shown((1 << 64) - 1, "#x") == "0xffffffffffffffff"  # 64 bits: format()'s


def test_the_power_of_ten_is_the_nearest_to_the_middle_of_the_size() -> None:
    # 69 bits span 2.95e20 to 5.9e20: about 10**21, not the 10**20 that
    # rounding the lowest exponent of the range would say.
    assert shown(5 * 10**20) == "about 10**21 (an int of 69 bits)"


def test_anything_else_is_formatted_by_its_spec_or_cut_short() -> None:
    assert shown(0.25, ".0%") == "25%"
    assert shown("x" * 100) == "'" + "x" * 17 + "..." + "x" * 18 + "'"  # 40 characters
    assert shown(list(range(100))) == "[0, 1, 2, 3, 4, 5, ...]"


@pytest.mark.parametrize(("value", "spec"), [
    (["x" * 100] * 10, ""),  # reprlib cuts each string, but keeps six of them
    ({f"{key}" * 100: "v" * 100 for key in "abcde"}, ""),
    (("y" * 100, ("z" * 100, ["w" * 100])), ""),
    ("x" * 1000, "s"),  # a spec's format() has no limit of its own
    (1e300, "f"),
    (5, ">1000"),
])
def test_whatever_the_value_the_text_is_at_most_60_characters(value: object,
                                                               spec: str) -> None:
    # The README's promise: an error message quoting a value stays short.
    # The text keeps both ends of what it would have said: a container's
    # brackets still show what it was.
    whole = format(value, spec) if spec else repr(value)
    text = shown(value, spec)
    assert len(text) <= 60, text
    assert "..." in text
    assert (text[0], text[-1]) == (whole[0], whole[-1]), text


def test_a_text_of_60_characters_is_shown_whole() -> None:
    assert shown("x" * 60, "s") == "x" * 60
    assert shown("x" * 61, "s") == "x" * 28 + "..." + "x" * 29


def test_an_object_s_long_repr_is_cut_to_40_characters_as_a_str_s() -> None:
    class Long:
        def __repr__(self) -> str:
            return "<" + "r" * 48 + ">"

    assert shown(Long()) == "<" + "r" * 17 + "..." + "r" * 18 + ">"
