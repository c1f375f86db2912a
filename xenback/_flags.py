"""The one check of the public API's flags, the one rule of its port and
descriptor numbers, and the one of XenStore's domids."""

from __future__ import annotations

__all__ = ["XENSTORE_DOMID_MAX", "check_flag", "check_xenstore_domid", "is_int"]

#: The largest domid XenStore takes (a domid_t, uint16_t), in a request
#: or a permission; past it, xenstored answers a bare EINVAL.  Not Xen's
#: DOMID_FIRST_RESERVED (0x7FF0): xenstored knows DOMID_SELF, and a
#: permission may name any domid_t.
XENSTORE_DOMID_MAX = 0xFFFF


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


def check_xenstore_domid(domid: int) -> int:
    """``domid`` as a plain int, if XenStore takes it: by the rule of
    ports (:func:`is_int`, else TypeError), and 0 to
    :data:`XENSTORE_DOMID_MAX` (else ValueError), both naming ``domid``.
    The one check of xenback.XenStore's domain queries and of the
    simulated server's domain calls."""
    if not is_int(domid):
        raise TypeError(f"domid must be an int, not {type(domid).__name__}")
    if not 0 <= domid <= XENSTORE_DOMID_MAX:
        raise ValueError(f"domid must be 0 to {XENSTORE_DOMID_MAX} (a domid_t), not {domid}")
    # An int subclass's str() may be its name (IntFlag, a class of one's own).
    return int(domid)
