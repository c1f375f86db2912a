"""Values as the engine's error messages show them: short, however large.

An error that prints the number it refuses helps, until the number is
10**400 and the message is its 401 digits -- or 10**5000, whose str()
raises ValueError of its own (Python prints no int beyond 4300 digits,
sys.set_int_max_str_digits), so the caller reads about that instead.
"""

from __future__ import annotations

import math
import reprlib

__all__ = ["shown"]

#: Ints up to this many bits are shown whole: 2**64 has 20 digits.
_WHOLE_BITS = 64

_LOG10_2 = math.log10(2)

_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40


def shown(value: object, spec: str = "") -> str:
    """*value* for an error message, at most some 60 characters.

    An int of more than 64 bits is shown by its size, as "about 10**400
    (an int of 1329 bits)"; a smaller one as format(value, spec).
    Anything else as format(value, spec) if a spec is given, else as a
    repr cut short (reprlib), so a long str or list does not fill the
    message either.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        bits = value.bit_length()
        if bits <= _WHOLE_BITS:
            return format(value, spec)
        # |value| is in [2**(bits-1), 2**bits): the middle of that range
        # of exponents, rounded, is within one of its true power of ten.
        power = round((bits - 0.5) * _LOG10_2)
        return f"about {'-' if value < 0 else ''}10**{power} (an int of {bits} bits)"
    if spec:
        return format(value, spec)
    return _repr.repr(value)
