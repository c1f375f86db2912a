"""The one check of the public API's flags, the one rule of its port and
descriptor numbers, the one of XenStore's domids and the one of the ids
of domains (what the simulated host and its toolstack take).

As Python's own calls do, a value of the wrong type is a TypeError and a
wrong value of the right type a ValueError, each naming the argument."""

from __future__ import annotations

from workqueue import shown

__all__ = [
    "DOMID_FIRST_RESERVED",
    "XENSTORE_DOMID_MAX",
    "check_domain_id",
    "check_flag",
    "check_xenstore_domid",
    "is_int",
]

#: Xen's DOMID_FIRST_RESERVED: the ids from it on (DOMID_SELF, DOMID_IO...)
#: name no domain; a domain's id is 0 to 0x7FEF.
DOMID_FIRST_RESERVED = 0x7FF0

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

    Nor an object that is only an index (``__index__``: a numpy integer),
    which the stdlib's socket and os calls take, on both platforms and
    in every check of xenback alike (a TypeError saying "an int", or
    the C library's EINVAL where a platform call says so for any wrong
    number).  Kept so, one rule, rather than taken through
    operator.index(): the numbers a backend passes come from XenStore
    (read with int()) and from the platform's own returns, never from
    numpy; accepting indexes would take a conversion at each of these
    checks, of both platforms and of the simulated host's wire (JSON has
    no numpy integer), and operator.index() takes True and False, which
    each check would refuse again on its own.  The pvcalls frontend's
    sockets are the exception: they stand in for the stdlib's, and take
    what it takes.
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


def check_domain_id(domid: int, name: str = "domid") -> int:
    """``domid`` as a plain int, if it is the id of a domain: by the rule
    of ports (:func:`is_int`, else TypeError), and 0 to 0x7FEF, below
    :data:`DOMID_FIRST_RESERVED` (else ValueError), both naming ``name``
    and showing a huge number by its size (:func:`workqueue.shown`).

    The one check of the simulated host's and its toolstack's domain ids.
    """
    if not is_int(domid):
        raise TypeError(f"{name} must be an int (a domain id), "
                        f"not {type(domid).__name__} {shown(domid)}")
    if not 0 <= domid < DOMID_FIRST_RESERVED:
        raise ValueError(f"{name} must be a domain id (0 to {DOMID_FIRST_RESERVED - 1}), "
                         f"not {shown(domid)}")
    # An int subclass's str() may be its name (IntFlag, a class of one's own).
    return int(domid)
