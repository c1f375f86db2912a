"""The one check of the public API's flags."""

from __future__ import annotations

__all__ = ["check_flag"]


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
