"""Values as the engine's error messages show them: short, however large.

An error that prints the number it refuses helps, until the number is
10**400 and the message is its 401 digits -- or 10**5000, whose str()
raises ValueError of its own (Python prints no int beyond 4300 digits,
sys.set_int_max_str_digits), so the caller reads about that instead.

:func:`shown` is public as ``workqueue.shown``: xenback's errors show
numbers by it too, and a layer above uses only the public names of the
one below (tests/test_architecture.py).
"""

from __future__ import annotations

import math
import reprlib

__all__ = ["shown"]

#: Ints up to this many bits are shown whole: 2**64 has 20 digits.
_WHOLE_BITS = 64

_LOG10_2 = math.log10(2)

#: Format types whose digits stand for bits (a mask's, say): printing
#: them has no limit and takes linear time, and their first and last
#: digits say which bits are set at either end, which a power of ten
#: does not.
_POWER_OF_TWO_BASES = "xXob"

#: How many digits of such a base are shown whole; past it, the first
#: and last _CUT_KEEP of them.
_CUT_WHOLE = 20
_CUT_KEEP = 8

#: The longest text shown() returns.  reprlib bounds each string of a
#: container, and how many items it shows, but not their sum (six cut
#: strings of a list are some 250 characters), and a spec's format() has
#: no bound at all: past it, the middle is cut out, both ends kept.
_MAX_CHARS = 60

_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40


def shown(value: object, spec: str = "") -> str:
    """*value* for an error message, at most 60 characters.

    An int of more than 64 bits is shown by its size, as "about 10**400
    (an int of 1329 bits)", or, for a spec in a base of a power of two
    (x, X, o, b: a mask's bits), by its first and last digits and its
    size, as "0x1a2b3c4d...00000040 (an int of 1335 bits)"; a smaller one
    as format(value, spec).
    Anything else as format(value, spec) if a spec is given, else as a
    repr cut short (reprlib), so a long str or list does not fill the
    message either.  Whatever it is, a text longer than 60 characters
    keeps only its first and last ones, with "..." between.
    """
    return _bounded(_shown(value, spec))


def _shown(value: object, spec: str) -> str:
    """shown(), before the cut to _MAX_CHARS."""
    if isinstance(value, int) and not isinstance(value, bool):
        bits = value.bit_length()
        if bits <= _WHOLE_BITS:
            return format(value, spec)
        if spec and spec[-1] in _POWER_OF_TWO_BASES:
            return f"{_cut(format(value, spec))} (an int of {bits} bits)"
        # |value| is in [2**(bits-1), 2**bits): the middle of that range
        # of exponents, rounded, is within one of its true power of ten.
        power = round((bits - 0.5) * _LOG10_2)
        return f"about {'-' if value < 0 else ''}10**{power} (an int of {bits} bits)"
    if spec:
        return format(value, spec)
    return _repr.repr(value)


def _bounded(text: str) -> str:
    """``text``, or its ends around "..." if it is longer than _MAX_CHARS."""
    if len(text) <= _MAX_CHARS:
        return text
    head = (_MAX_CHARS - 3) // 2
    return f"{text[:head]}...{text[-(_MAX_CHARS - 3 - head):]}"


def _cut(text: str) -> str:
    """``text``, a formatted int, with the middle of its digits cut out
    if it has more than _CUT_WHOLE of them; its sign and prefix kept."""
    digits = text.lstrip("-+ ")
    if digits[:2].lower() in ("0x", "0o", "0b"):
        digits = digits[2:]
    if len(digits) <= _CUT_WHOLE:
        return text
    start = len(text) - len(digits)
    return f"{text[:start + _CUT_KEEP]}...{text[-_CUT_KEEP:]}"
