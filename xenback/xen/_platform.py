"""The real platform: Xen's own dom0 libraries through cffi (ABI mode).

Nothing is compiled: the prototypes below are those of Debian's
``libxen-dev`` headers (``xengnttab.h``, ``xenevtchn.h``), and
``tests/xenback/test_xb_xen.py`` compiles them against those headers so a
mismatch fails the build of a C program rather than corrupting memory.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pyxs
from cffi import FFI

from xenback.platform import (
    PAGE_SIZE,
    EventChannelError,
    GrantError,
    PlatformError,
    PlatformUnavailable,
)

logger = logging.getLogger(__name__)

__all__ = ["XenPlatform", "missing_pieces", "open"]

#: The C declarations, shared with the test that checks them against the
#: real headers.
CDEF = """
typedef uint32_t evtchn_port_t;
typedef int xenevtchn_port_or_error_t;
typedef struct xengntdev_handle xengnttab_handle;
typedef struct xengntdev_handle xengntshr_handle;
typedef struct xenevtchn_handle xenevtchn_handle;
struct xentoollog_logger;

xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags);
int xengnttab_close(xengnttab_handle *xgt);
void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                      uint32_t *refs, int prot);
int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count);

xengntshr_handle *xengntshr_open(struct xentoollog_logger *logger, unsigned open_flags);
int xengntshr_close(xengntshr_handle *xgs);
void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count, uint32_t *refs,
                            int writable);
int xengntshr_unshare(xengntshr_handle *xgs, void *start_address, uint32_t count);

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid);
xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port);
int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port);
"""

ffi = FFI()
ffi.cdef(CDEF)

#: Shared objects, as Debian's ``libxengnttab1`` and ``libxenevtchn1`` ship
#: them (libxengntshr lives in libxengnttab).
GNTTAB_LIBRARY = "libxengnttab.so.1"
EVTCHN_LIBRARY = "libxenevtchn.so.1"
#: Device nodes the libraries open.
GNTDEV = Path("/dev/xen/gntdev")
EVTCHN_DEVICE = Path("/dev/xen/evtchn")


def xenstored_socket() -> Path:
    """The socket pyxs and libxenstore connect to: ``$XENSTORED_PATH``, else
    ``$XENSTORED_RUNDIR/socket``, else ``/var/run/xenstored/socket``."""
    if os.environ.get("XENSTORED_PATH"):
        return Path(os.environ["XENSTORED_PATH"])
    return Path(os.environ.get("XENSTORED_RUNDIR", "/var/run/xenstored")) / "socket"


@functools.cache
def _load(name: str) -> Any:
    return ffi.dlopen(name)


def _loadable(name: str) -> bool:
    try:
        _load(name)
    except OSError:
        return False
    return True


def missing_pieces() -> list[str]:
    """Everything this machine lacks to run a backend on real Xen, as
    human-readable items ([] if nothing is missing)."""
    missing = []
    for library, package in ((GNTTAB_LIBRARY, "libxengnttab1"), (EVTCHN_LIBRARY, "libxenevtchn1")):
        if not _loadable(library):
            missing.append(f"library {library} (Debian package {package})")
    for device, what in ((GNTDEV, "grant device"), (EVTCHN_DEVICE, "event channel device")):
        if not device.exists():
            missing.append(f"{what} {device} (not running on Xen, or xen-gntdev/xen-evtchn not loaded)")
    sock = xenstored_socket()
    if not sock.exists():
        missing.append(f"xenstored socket {sock} (xenstored not running; set XENSTORED_PATH)")
    return missing


def _u32(cls: type[PlatformError], value: int, what: str) -> int:
    """``value`` checked to fit the C library's ``uint32_t`` (a frontend's
    numbers come from XenStore): else ``cls`` with EINVAL, as the
    simulated host raises, rather than cffi's OverflowError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise cls(errno.EINVAL, f"{what} {value!r} is not a 32-bit unsigned integer")
    return value


def _error(cls: type[PlatformError], what: str) -> PlatformError:
    code = ffi.errno or errno.EIO
    return cls(code, f"{what}: {os.strerror(code)}")


class XenGrantMapping:
    """Pages mapped by ``xengnttab_map_domain_grant_refs``."""

    def __init__(self, table: XenGrantTable, addr: Any, refs: tuple[int, ...], writable: bool) -> None:
        self._table = table
        self._addr = addr
        self._refs = refs
        view = memoryview(ffi.buffer(addr, PAGE_SIZE * len(refs)))
        self._buffer: memoryview | None = view if writable else view.toreadonly()

    @property
    def buffer(self) -> memoryview:
        if self._buffer is None:
            raise ValueError("grant mapping was unmapped")
        return self._buffer

    @property
    def refs(self) -> tuple[int, ...]:
        return self._refs

    def unmap(self) -> None:
        if self._buffer is None:
            return
        try:
            self._buffer.release()
        except BufferError:
            logger.warning("unmapping grants %s while views of them are exported", self._refs)
        self._buffer = None
        if self._table._lib.xengnttab_unmap(self._table._handle, self._addr, len(self._refs)) < 0:
            raise _error(GrantError, f"unmapping grants {self._refs}")

    def __enter__(self) -> XenGrantMapping:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unmap()


class XenGrantTable:
    """A ``xengnttab`` handle."""

    def __init__(self) -> None:
        self._lib = _load(GNTTAB_LIBRARY)
        self._handle = self._lib.xengnttab_open(ffi.NULL, 0)
        if self._handle == ffi.NULL:
            raise _error(PlatformUnavailable, f"xengnttab_open ({GNTDEV})")

    def map_grant_refs(self, domid: int, refs: Sequence[int], *, writable: bool = True) -> XenGrantMapping:
        refs = tuple(_u32(GrantError, ref, "grant reference") for ref in refs)
        if not refs:
            raise ValueError("no grant references to map")
        _u32(GrantError, domid, "domain id")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        array = ffi.new("uint32_t[]", refs)
        addr = self._lib.xengnttab_map_domain_grant_refs(self._handle, len(refs), domid, array, prot)
        if addr == ffi.NULL:
            raise _error(GrantError, f"mapping grants {refs} of domain {domid}")
        return XenGrantMapping(self, addr, refs, writable)

    def close(self) -> None:
        if self._handle is not None:
            self._lib.xengnttab_close(self._handle)
            self._handle = None


class XenSharedPages:
    """Pages shared by ``xengntshr_share_pages``."""

    def __init__(self, share: XenGrantShare, addr: Any, refs: tuple[int, ...]) -> None:
        self._share = share
        self._addr = addr
        self._refs = refs
        self._buffer: memoryview | None = memoryview(ffi.buffer(addr, PAGE_SIZE * len(refs)))

    @property
    def refs(self) -> tuple[int, ...]:
        return self._refs

    @property
    def buffer(self) -> memoryview:
        if self._buffer is None:
            raise ValueError("pages were unshared")
        return self._buffer

    def unshare(self) -> None:
        if self._buffer is None:
            return
        self._buffer.release()
        self._buffer = None
        if self._share._lib.xengntshr_unshare(self._share._handle, self._addr, len(self._refs)) < 0:
            raise _error(GrantError, f"unsharing grants {self._refs}")


class XenGrantShare:
    """A ``xengntshr`` handle."""

    def __init__(self) -> None:
        self._lib = _load(GNTTAB_LIBRARY)
        self._handle = self._lib.xengntshr_open(ffi.NULL, 0)
        if self._handle == ffi.NULL:
            raise _error(PlatformUnavailable, "xengntshr_open (/dev/xen/gntalloc)")

    def share_pages(self, domid: int, count: int, *, writable: bool = True) -> XenSharedPages:
        if count < 1:
            raise ValueError(f"cannot share {count} pages")
        refs = ffi.new("uint32_t[]", count)
        addr = self._lib.xengntshr_share_pages(self._handle, domid, count, refs, int(writable))
        if addr == ffi.NULL:
            raise _error(GrantError, f"sharing {count} pages with domain {domid}")
        return XenSharedPages(self, addr, tuple(refs))

    def close(self) -> None:
        if self._handle is not None:
            self._lib.xengntshr_close(self._handle)
            self._handle = None


class XenEventChannel:
    """A ``xenevtchn`` handle whose descriptor is non-blocking, so that
    :meth:`pending` returns None instead of blocking when nothing fired."""

    def __init__(self) -> None:
        self._lib = _load(EVTCHN_LIBRARY)
        self._handle = self._lib.xenevtchn_open(ffi.NULL, 0)
        if self._handle == ffi.NULL:
            raise _error(PlatformUnavailable, f"xenevtchn_open ({EVTCHN_DEVICE})")
        self._fd = self._lib.xenevtchn_fd(self._handle)
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    def fileno(self) -> int:
        return int(self._fd)

    def _port(self, result: int, what: str) -> int:
        if result < 0:
            raise _error(EventChannelError, what)
        return int(result)

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        _u32(EventChannelError, domid, "domain id")
        _u32(EventChannelError, remote_port, "event channel port")
        return self._port(
            self._lib.xenevtchn_bind_interdomain(self._handle, domid, remote_port),
            f"binding port {remote_port} of domain {domid}",
        )

    def bind_unbound_port(self, domid: int) -> int:
        return self._port(
            self._lib.xenevtchn_bind_unbound_port(self._handle, domid),
            f"allocating a port for domain {domid}",
        )

    def notify(self, port: int) -> None:
        if self._lib.xenevtchn_notify(self._handle, port) < 0:
            raise _error(EventChannelError, f"notifying port {port}")

    def pending(self) -> int | None:
        port = self._lib.xenevtchn_pending(self._handle)
        if port < 0:
            if ffi.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise _error(EventChannelError, "reading pending ports")
        return int(port)

    def unmask(self, port: int) -> None:
        if self._lib.xenevtchn_unmask(self._handle, port) < 0:
            raise _error(EventChannelError, f"unmasking port {port}")

    def unbind(self, port: int) -> None:
        if self._lib.xenevtchn_unbind(self._handle, port) < 0:
            raise _error(EventChannelError, f"unbinding port {port}")

    def close(self) -> None:
        if self._handle is not None:
            self._lib.xenevtchn_close(self._handle)
            self._handle = None


class XenPlatform:
    """A :class:`~xenback.platform.Platform` on a real Xen host."""

    def __init__(self, domid: int, socket_path: Path) -> None:
        self._domid = domid
        self._socket_path = socket_path

    def __repr__(self) -> str:
        return f"<XenPlatform domid={self._domid} xenstore={self._socket_path}>"

    @property
    def domid(self) -> int:
        return self._domid

    def xenstore(self) -> pyxs.Client:
        return pyxs.Client(unix_socket_path=str(self._socket_path))

    def gnttab(self) -> XenGrantTable:
        return XenGrantTable()

    def gntshr(self) -> XenGrantShare:
        return XenGrantShare()

    def evtchn(self) -> XenEventChannel:
        return XenEventChannel()


def open() -> XenPlatform:  # noqa: A001 - the module's verb, like io.open
    """Open the real Xen platform of this domain.

    Raises :class:`~xenback.platform.PlatformUnavailable` naming every
    missing piece (library, ``/dev/xen/gntdev``, ``/dev/xen/evtchn``,
    xenstored socket) when this machine cannot run a backend on Xen.
    """
    missing = missing_pieces()
    if missing:
        raise PlatformUnavailable(
            errno.ENODEV, "Xen is not available here; missing: " + "; ".join(missing)
        )
    sock = xenstored_socket()
    client = pyxs.Client(unix_socket_path=str(sock))
    try:
        with client:
            domid = int(client.read(b"domid", b"0"))
    except (pyxs.PyXSError, ValueError) as exc:
        raise PlatformUnavailable(errno.EIO, f"cannot read our domid from xenstored at {sock}: {exc}") from exc
    return XenPlatform(domid, sock)
