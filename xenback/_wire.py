"""The one set of C declarations for Xen's shared-memory and wire layouts.

Every size and offset the framework uses comes from :data:`ffi`, and
``tests/xenback/test_xb_layout.py`` compiles the real headers from Debian's
``libxen-dev`` with gcc and compares them field by field (``pvcalls.h`` is
checked the same way by ``tests/pvcalls/test_wire.py``).  Nothing is
compiled here: cffi only computes the layouts (natural alignment, which is
what Xen's public headers are written for on x86-64 and arm64).

Declared:

* ``struct xen_sring_header``: the fixed head of every ``ring.h`` shared
  ring (``DEFINE_RING_TYPES``); the slots start at ``SRING_HEADER_SIZE``.
* ``struct xsd_sockmsg``: the XenStore wire header of ``xs_wire.h``, with the
  operation numbers in :data:`XS_OPS` and the error names in
  :data:`XSD_ERRORS` (in ``xs_wire.h``'s order).
* ``struct xencons_interface``: the PV console page of ``io/console.h``.
"""

from __future__ import annotations

import errno

from cffi import FFI

__all__ = [
    "SRING_HEADER_SIZE",
    "XENCONS_IN_SIZE",
    "XENCONS_OUT_SIZE",
    "XENSTORE_PAYLOAD_MAX",
    "XSD_ERRORS",
    "XS_OPS",
    "ffi",
]

ffi = FFI()
ffi.cdef(
    """
    typedef uint32_t RING_IDX;

    /* ring.h: struct __name##_sring up to (not including) ring[]. */
    union xen_sring_pvt {
        struct { uint8_t smartpoll_active; } netif;
        struct { uint8_t msg; } tapif_user;
        uint8_t pvt_pad[4];
    };
    struct xen_sring_header {
        RING_IDX req_prod, req_event;
        RING_IDX rsp_prod, rsp_event;
        union xen_sring_pvt pvt;
        uint8_t __pad[44];
    };

    /* xs_wire.h */
    struct xsd_sockmsg {
        uint32_t type;
        uint32_t req_id;
        uint32_t tx_id;
        uint32_t len;
    };

    /* io/console.h */
    typedef uint32_t XENCONS_RING_IDX;
    struct xencons_interface {
        char in[1024];
        char out[2048];
        XENCONS_RING_IDX in_cons, in_prod;
        XENCONS_RING_IDX out_cons, out_prod;
    };
    """
)

#: Offset of ``ring[0]`` in a ``ring.h`` shared ring.  Every union of ring
#: entries in Xen's protocols is at most 8-byte aligned, so the 64-byte
#: header is never padded further.
SRING_HEADER_SIZE: int = ffi.sizeof("struct xen_sring_header")

XENCONS_IN_SIZE: int = ffi.sizeof(ffi.typeof("struct xencons_interface").fields[0][1].type)
XENCONS_OUT_SIZE: int = ffi.sizeof(ffi.typeof("struct xencons_interface").fields[1][1].type)

#: Largest XenStore payload (``XENSTORE_PAYLOAD_MAX``).
XENSTORE_PAYLOAD_MAX = 4096

#: XenStore operations (``enum xsd_sockmsg_type``).
XS_OPS: dict[str, int] = {
    "CONTROL": 0,
    "DIRECTORY": 1,
    "READ": 2,
    "GET_PERMS": 3,
    "WATCH": 4,
    "UNWATCH": 5,
    "TRANSACTION_START": 6,
    "TRANSACTION_END": 7,
    "INTRODUCE": 8,
    "RELEASE": 9,
    "GET_DOMAIN_PATH": 10,
    "WRITE": 11,
    "MKDIR": 12,
    "RM": 13,
    "SET_PERMS": 14,
    "WATCH_EVENT": 15,
    "ERROR": 16,
    "IS_DOMAIN_INTRODUCED": 17,
    "RESUME": 18,
    "SET_TARGET": 19,
    "RESET_WATCHES": 21,
    "DIRECTORY_PART": 22,
}

#: ``xsd_errors[]``: the names XenStore sends back, with this host's errno
#: values (Xen uses the Linux numbering on the wire by name, not by number).
XSD_ERRORS: dict[str, int] = {
    name: getattr(errno, name)
    for name in (
        "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
        "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
    )
}
