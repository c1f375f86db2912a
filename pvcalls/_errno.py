"""Errno values on the PV Calls wire, in Xen's numbering.

PV Calls carries negative errno values in ``ret`` of a response and in the
``in_error`` / ``out_error`` fields of a data ring.  They are Xen's numbers
(``xen/errno.h``), which are x86 Linux's.  The backend may run on a host
whose C library numbers errors differently, so host errors are always
translated **by name** (``errno.errorcode``), never by value.

Xen's ``errno.h`` stops short of several socket errors (ECONNRESET, EPIPE,
EHOSTUNREACH...); for those the table carries x86 Linux's values, which is
what a Linux guest understands.  That includes every error ``accept(2)``
passes on from the new connection (ENONET and EPROTO among them), which a
server is told to retry on: as EIO it would give up.  A host error without
a name in the table becomes ``EIO``.

``ENOTSUPP`` (524) is Linux's kernel-internal "operation not supported"
that the PV Calls specification names ENOTSUP for unknown commands; the
userspace ``ENOTSUP``/``EOPNOTSUPP`` is 95.
"""

from __future__ import annotations

import errno as _host_errno

__all__ = [
    "EACCES",
    "EADDRINUSE",
    "EAFNOSUPPORT",
    "EALREADY",
    "EAGAIN",
    "EBADF",
    "ECONNREFUSED",
    "ECONNRESET",
    "EEXIST",
    "EINPROGRESS",
    "EINTR",
    "EINVAL",
    "EIO",
    "EISCONN",
    "EMFILE",
    "ENOMEM",
    "ENOTCONN",
    "ENOTSUPP",
    "EPIPE",
    "EPROTONOSUPPORT",
    "ETIMEDOUT",
    "XEN_ERRNO",
    "from_host_errno",
    "from_oserror",
    "name_of",
]

#: Name -> positive errno value as a Xen guest understands it.
XEN_ERRNO: dict[str, int] = {
    # xen/errno.h
    "EPERM": 1,
    "ENOENT": 2,
    "ESRCH": 3,
    "EINTR": 4,
    "EIO": 5,
    "ENXIO": 6,
    "E2BIG": 7,
    "ENOEXEC": 8,
    "EBADF": 9,
    "ECHILD": 10,
    "EAGAIN": 11,
    "EWOULDBLOCK": 11,
    "ENOMEM": 12,
    "EACCES": 13,
    "EFAULT": 14,
    "EBUSY": 16,
    "EEXIST": 17,
    "EXDEV": 18,
    "ENODEV": 19,
    "ENOTDIR": 20,
    "EISDIR": 21,
    "EINVAL": 22,
    "ENFILE": 23,
    "EMFILE": 24,
    "ENOSPC": 28,
    "EROFS": 30,
    "EMLINK": 31,
    "EDOM": 33,
    "ERANGE": 34,
    "EDEADLK": 35,
    "EDEADLOCK": 35,
    "ENAMETOOLONG": 36,
    "ENOLCK": 37,
    "ENOSYS": 38,
    "ENOTEMPTY": 39,
    "ENODATA": 61,
    "ETIME": 62,
    "EBADMSG": 74,
    "EOVERFLOW": 75,
    "EILSEQ": 84,
    "ERESTART": 85,
    "ENOTSOCK": 88,
    "EMSGSIZE": 90,
    "EOPNOTSUPP": 95,
    "EADDRINUSE": 98,
    "EADDRNOTAVAIL": 99,
    "ENOBUFS": 105,
    "EISCONN": 106,
    "ENOTCONN": 107,
    "ETIMEDOUT": 110,
    "ECONNREFUSED": 111,
    # x86 Linux values (asm-generic/errno*.h) for socket errors Xen's header lacks
    "EPIPE": 32,
    "ENONET": 64,
    "EPROTO": 71,
    "EDESTADDRREQ": 89,
    "EPROTOTYPE": 91,
    "ENOPROTOOPT": 92,
    "EPROTONOSUPPORT": 93,
    "ESOCKTNOSUPPORT": 94,
    "ENOTSUP": 95,
    "EPFNOSUPPORT": 96,
    "EAFNOSUPPORT": 97,
    "ENETDOWN": 100,
    "ENETUNREACH": 101,
    "ENETRESET": 102,
    "ECONNABORTED": 103,
    "ECONNRESET": 104,
    "ESHUTDOWN": 108,
    "EHOSTDOWN": 112,
    "EHOSTUNREACH": 113,
    "EALREADY": 114,
    "EINPROGRESS": 115,
    # Linux kernel-internal, the spec's "ENOTSUP" for unknown commands
    "ENOTSUPP": 524,
}

# The values the backend uses by name (positive; negate on the wire).
EINTR = XEN_ERRNO["EINTR"]
EIO = XEN_ERRNO["EIO"]
EBADF = XEN_ERRNO["EBADF"]
EAGAIN = XEN_ERRNO["EAGAIN"]
ENOMEM = XEN_ERRNO["ENOMEM"]
EACCES = XEN_ERRNO["EACCES"]
EEXIST = XEN_ERRNO["EEXIST"]
EINVAL = XEN_ERRNO["EINVAL"]
EMFILE = XEN_ERRNO["EMFILE"]
EPIPE = XEN_ERRNO["EPIPE"]
EPROTONOSUPPORT = XEN_ERRNO["EPROTONOSUPPORT"]
EAFNOSUPPORT = XEN_ERRNO["EAFNOSUPPORT"]
EADDRINUSE = XEN_ERRNO["EADDRINUSE"]
ECONNRESET = XEN_ERRNO["ECONNRESET"]
EISCONN = XEN_ERRNO["EISCONN"]
ENOTCONN = XEN_ERRNO["ENOTCONN"]
ETIMEDOUT = XEN_ERRNO["ETIMEDOUT"]
ECONNREFUSED = XEN_ERRNO["ECONNREFUSED"]
EINPROGRESS = XEN_ERRNO["EINPROGRESS"]
EALREADY = XEN_ERRNO["EALREADY"]
ENOTSUPP = XEN_ERRNO["ENOTSUPP"]

_NAMES: dict[int, str] = {}
for _name, _value in XEN_ERRNO.items():
    _NAMES.setdefault(_value, _name)
del _name, _value


def from_host_errno(host_errno: int | None) -> int:
    """The positive Xen errno for the host's ``host_errno``, by name; EIO
    when the host number or its name is unknown."""
    if host_errno is None:
        return EIO
    name = _host_errno.errorcode.get(host_errno)
    if name is None:
        return EIO
    return XEN_ERRNO.get(name, EIO)


def from_oserror(exc: OSError) -> int:
    """The positive Xen errno describing ``exc`` (EIO if it has none)."""
    return from_host_errno(exc.errno)


def name_of(value: int) -> str:
    """The name of a Xen errno, positive or negative (for log lines)."""
    return _NAMES.get(abs(value), str(value))
