"""The XenStore wire format: message header, operation numbers, error names.

Everything here mirrors /usr/include/xen/io/xs_wire.h.  A message is a
16-byte little-endian header ``{u32 type, req_id, tx_id, len}`` followed by
``len`` bytes of payload, at most XENSTORE_PAYLOAD_MAX.  Errors travel as the
*name* of the errno ("ENOENT\\0"), never as a number, so only the names in
xs_wire.h's ``xsd_errors`` table may appear on the wire.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "PAYLOAD_MAX",
    "ABS_PATH_MAX",
    "REL_PATH_MAX",
    "ERRORS",
    "Op",
    "XsError",
]

#: struct xsd_sockmsg
HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size

#: XENSTORE_PAYLOAD_MAX: "violating this is very bad" - a peer announcing a
#: longer payload is out of sync for good and gets disconnected.
PAYLOAD_MAX = 4096
#: XENSTORE_ABS_PATH_MAX and XENSTORE_REL_PATH_MAX ("just gets you an error").
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048


class Op(enum.IntEnum):
    """enum xsd_sockmsg_type."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed from the protocol.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


#: The xsd_errors table, in its order.  Only these names go on the wire.
ERRORS = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)
_ERROR_SET = frozenset(ERRORS)


class XsError(Exception):
    """A request failed; the reply is an XS_ERROR carrying ``name``.

    Raised by the operation handlers and turned into a reply by the
    dispatcher; it never escapes the server.
    """

    def __init__(self, name: str, detail: str = "") -> None:
        if name not in _ERROR_SET:
            raise ValueError(f"{name!r} is not an error name of xs_wire.h")
        super().__init__(name, detail)
        self.name = name
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}" if self.detail else self.name
