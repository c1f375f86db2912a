"""The PV Calls wire format: cffi declarations matching ``xen/io/pvcalls.h``.

This module is the single place where the layout of the protocol lives; the
backend and the frontend both use it, and ``tests/pvcalls/test_wire.py``
checks every size and offset declared here against the real header compiled
by gcc.

Everything is declared in cffi's ABI mode (no compilation): the structures
are plain fixed-width integers with natural alignment, exactly as the Xen
public headers define them for every architecture.

Three kinds of shared memory exist:

* the **command ring**: one page, ``DEFINE_RING_TYPES(xen_pvcalls, ...)``,
  a 64-byte shared header followed by :data:`RING_SLOTS` slots of
  :data:`SLOT_SIZE` bytes (``union xen_pvcalls_sring_entry``);
* the **indexes page** of each active socket: ``struct pvcalls_data_intf``;
* the **data ring** of each active socket: ``2**ring_order`` pages, the
  first half the ``in`` ring (backend produces), the second half the ``out``
  ring (frontend produces), each :func:`flex_ring_size` bytes.

Integers on the wire are in the guest's native byte order, which is the
host's (a backend and its frontends share the machine); a sockaddr's port
and address are in network byte order, its family in native order, as in C.
"""

from __future__ import annotations

import ipaddress
import struct

from cffi import FFI

__all__ = [
    "AF_INET",
    "DEFAULT_MAX_PAGE_ORDER",
    "AddressFamilyError",
    "INDEXES_HEADER_SIZE",
    "IN_CONS_OFFSET",
    "IN_ERROR_OFFSET",
    "IN_PROD_OFFSET",
    "MAX_PAGE_ORDER_LIMIT",
    "MAX_REFS_PER_INDEXES_PAGE",
    "OUT_CONS_OFFSET",
    "OUT_ERROR_OFFSET",
    "OUT_PROD_OFFSET",
    "PAGE_SIZE",
    "PVCALLS_ACCEPT",
    "PVCALLS_BIND",
    "PVCALLS_COMMANDS",
    "PVCALLS_CONNECT",
    "PVCALLS_LISTEN",
    "PVCALLS_POLL",
    "PVCALLS_RELEASE",
    "PVCALLS_SOCKET",
    "PVCALLS_VERSIONS",
    "REF_OFFSET",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "RING_ORDER_OFFSET",
    "RING_SLOTS",
    "SLOT_SIZE",
    "SOCKADDR_IN_LEN",
    "SOCK_STREAM",
    "SRING_HEADER_SIZE",
    "ffi",
    "flex_ring_size",
    "max_page_order_limit",
    "pack_sockaddr_in",
    "unpack_sockaddr_in",
]

ffi = FFI()
ffi.cdef(
    """
    typedef uint32_t RING_IDX;
    typedef uint32_t grant_ref_t;

    /* The indexes page of one active socket. */
    struct pvcalls_data_intf {
        RING_IDX in_cons, in_prod, in_error;
        uint8_t pad1[52];
        RING_IDX out_cons, out_prod, out_error;
        uint8_t pad2[52];
        RING_IDX ring_order;
        grant_ref_t ref[];
    };

    struct xen_pvcalls_request {
        uint32_t req_id;
        uint32_t cmd;
        union {
            struct xen_pvcalls_socket {
                uint64_t id;
                uint32_t domain;
                uint32_t type;
                uint32_t protocol;
                uint8_t pad[4];
            } socket;
            struct xen_pvcalls_connect {
                uint64_t id;
                uint8_t addr[28];
                uint32_t len;
                uint32_t flags;
                grant_ref_t ref;
                uint32_t evtchn;
                uint8_t pad[4];
            } connect;
            struct xen_pvcalls_release {
                uint64_t id;
                uint8_t reuse;
                uint8_t pad[7];
            } release;
            struct xen_pvcalls_bind {
                uint64_t id;
                uint8_t addr[28];
                uint32_t len;
            } bind;
            struct xen_pvcalls_listen {
                uint64_t id;
                uint32_t backlog;
                uint8_t pad[4];
            } listen;
            struct xen_pvcalls_accept {
                uint64_t id;
                uint64_t id_new;
                grant_ref_t ref;
                uint32_t evtchn;
            } accept;
            struct xen_pvcalls_poll {
                uint64_t id;
            } poll;
            struct xen_pvcalls_dummy {
                uint8_t dummy[56];
            } dummy;
        } u;
    };

    struct xen_pvcalls_response {
        uint32_t req_id;
        uint32_t cmd;
        int32_t ret;
        uint32_t pad;
        union {
            struct _xen_pvcalls_socket { uint64_t id; } socket;
            struct _xen_pvcalls_connect { uint64_t id; } connect;
            struct _xen_pvcalls_release { uint64_t id; } release;
            struct _xen_pvcalls_bind { uint64_t id; } bind;
            struct _xen_pvcalls_listen { uint64_t id; } listen;
            struct _xen_pvcalls_accept { uint64_t id; } accept;
            struct _xen_pvcalls_poll { uint64_t id; } poll;
            struct _xen_pvcalls_dummy { uint8_t dummy[8]; } dummy;
        } u;
    };

    /* DEFINE_RING_TYPES(xen_pvcalls, ...): one slot of the command ring. */
    union xen_pvcalls_sring_entry {
        struct xen_pvcalls_request req;
        struct xen_pvcalls_response rsp;
    };
    """
)

#: Xen's grant page size (the ABI unit on every architecture).
PAGE_SIZE = 4096

# Commands (``PVCALLS_*`` in pvcalls.h).
PVCALLS_SOCKET = 0
PVCALLS_CONNECT = 1
PVCALLS_RELEASE = 2
PVCALLS_BIND = 3
PVCALLS_LISTEN = 4
PVCALLS_ACCEPT = 5
PVCALLS_POLL = 6

#: Command number -> name, for logs and error messages.
PVCALLS_COMMANDS: dict[int, str] = {
    PVCALLS_SOCKET: "SOCKET",
    PVCALLS_CONNECT: "CONNECT",
    PVCALLS_RELEASE: "RELEASE",
    PVCALLS_BIND: "BIND",
    PVCALLS_LISTEN: "LISTEN",
    PVCALLS_ACCEPT: "ACCEPT",
    PVCALLS_POLL: "POLL",
}

#: The protocol versions a backend offers (XenStore ``versions`` node); a
#: frontend answers with one of them in ``version``.
PVCALLS_VERSIONS = "1"

# Socket parameters in the guest's (Linux) numbering; the only combination
# PV Calls defines is AF_INET / SOCK_STREAM / protocol 0.
AF_INET = 2
SOCK_STREAM = 1
#: ``sizeof(struct sockaddr_in)`` (Linux's frontend sends ``sizeof(struct
#: sockaddr)``, also 16).
SOCKADDR_IN_LEN = 16

REQUEST_SIZE: int = ffi.sizeof("struct xen_pvcalls_request")
RESPONSE_SIZE: int = ffi.sizeof("struct xen_pvcalls_response")
#: Size of one command ring slot (the request/response union).
SLOT_SIZE: int = ffi.sizeof("union xen_pvcalls_sring_entry")
#: ``req_prod``, ``req_event``, ``rsp_prod``, ``rsp_event`` and padding.
SRING_HEADER_SIZE = 64
#: Slots in the one-page command ring: ``__RING_SIZE`` rounds down to a
#: power of two.
RING_SLOTS: int = 1 << ((PAGE_SIZE - SRING_HEADER_SIZE) // SLOT_SIZE).bit_length() - 1

# Offsets inside the indexes page.
IN_CONS_OFFSET: int = ffi.offsetof("struct pvcalls_data_intf", "in_cons")
IN_PROD_OFFSET: int = ffi.offsetof("struct pvcalls_data_intf", "in_prod")
IN_ERROR_OFFSET: int = ffi.offsetof("struct pvcalls_data_intf", "in_error")
OUT_CONS_OFFSET: int = ffi.offsetof("struct pvcalls_data_intf", "out_cons")
OUT_PROD_OFFSET: int = ffi.offsetof("struct pvcalls_data_intf", "out_prod")
OUT_ERROR_OFFSET: int = ffi.offsetof("struct pvcalls_data_intf", "out_error")
RING_ORDER_OFFSET: int = ffi.offsetof("struct pvcalls_data_intf", "ring_order")
REF_OFFSET: int = ffi.offsetof("struct pvcalls_data_intf", "ref")
#: Bytes of the indexes page before the ``ref[]`` array.
INDEXES_HEADER_SIZE: int = REF_OFFSET
#: How many grant references one indexes page can hold.
MAX_REFS_PER_INDEXES_PAGE: int = (PAGE_SIZE - REF_OFFSET) // ffi.sizeof("grant_ref_t")

#: The ``max-page-order`` a backend offers by default (Linux's frontend
#: requires at least 4 and always uses 4).
DEFAULT_MAX_PAGE_ORDER = 4


def max_page_order_limit() -> int:
    """The largest ``max-page-order`` whose ``2**order`` grant references
    still fit in one indexes page (9: 512 of at most 991 refs)."""
    return MAX_REFS_PER_INDEXES_PAGE.bit_length() - 1


#: See :func:`max_page_order_limit`.
MAX_PAGE_ORDER_LIMIT: int = max_page_order_limit()


def flex_ring_size(ring_order: int) -> int:
    """Bytes of one direction of a data ring: ``XEN_FLEX_RING_SIZE(order)``,
    half of the ``2**ring_order`` pages."""
    return 1 << (ring_order + 12 - 1)


class AddressFamilyError(ValueError):
    """A sockaddr whose family is not AF_INET."""


_SOCKADDR_IN = struct.Struct("=H2s4s8x")  # family (native), port (BE), addr
_PORT = struct.Struct("!H")


def pack_sockaddr_in(host: str, port: int) -> bytes:
    """A 16-byte Linux ``struct sockaddr_in`` for ``host`` (dotted IPv4
    address, no name resolution) and ``port``."""
    if not isinstance(host, str):
        # IPv4Address would also take an int or 4 packed bytes.
        raise TypeError(f"host must be a dotted IPv4 address string, not {type(host).__name__}")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range 0..65535")
    addr = ipaddress.IPv4Address(host)
    return _SOCKADDR_IN.pack(AF_INET, _PORT.pack(port), addr.packed)


def unpack_sockaddr_in(raw: bytes, length: int = SOCKADDR_IN_LEN) -> tuple[str, int]:
    """Parse the first ``length`` bytes of ``raw`` as a ``struct sockaddr_in``.

    ``length`` is the guest-supplied ``len``; it must be at least the 8 bytes
    that carry family, port and address and at most 28 (the wire field).
    Raises :class:`ValueError` saying what is wrong, the subclass
    :class:`AddressFamilyError` for a family other than AF_INET.
    """
    if not 8 <= length <= 28:
        raise ValueError(f"sockaddr length {length} not in 8..28")
    head = bytes(raw[: min(length, SOCKADDR_IN_LEN)]).ljust(SOCKADDR_IN_LEN, b"\0")
    family, port, addr = _SOCKADDR_IN.unpack(head)
    if family != AF_INET:
        raise AddressFamilyError(f"address family {family} is not AF_INET ({AF_INET})")
    return str(ipaddress.IPv4Address(addr)), _PORT.unpack(port)[0]
