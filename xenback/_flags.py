"""The one check of the public API's flags, and the one rule of its
port and descriptor numbers."""

from __future__ import annotations

__all__ = ["check_flag", "is_int"]


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is True or False; TypeError naming ``name`` otherwise.

    A flag is never read for its truth: ``writable="no"`` would map pages
    writable, ``init="false"`` wipe a live ring's header.  0 and 1 are
    refused too: one spelling per meaning, and none that a reader could
    take for the other.
    """
    if type(value) is not bool:
        raise TypeError(f"{name} must be True or False, not {type(value).__name__} {value!r}")
    return value


def is_int(value: object) -> bool:
    """Whether ``value`` may stand for a port or descriptor number: an
    int or an int subclass (an IntEnum), as the xen platform's uint32_t
    takes it, but not a bool or a float.

    Those two are looked up as the number they equal (True and 1.0 are
    dict keys of 1), so each call checks before its first lookup or side
    effect.  On a hot path, ``type(n) is not int and not is_int(n)`` spares
    a plain int the call of this function.
    """
    return isinstance(value, int) and not isinstance(value, bool)
