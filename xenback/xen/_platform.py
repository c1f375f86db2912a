"""The real platform: Linux's Xen devices and ``libxenevtchn`` through cffi (ABI mode).

Grants are mapped and shared through the kernel's ``/dev/xen/gntdev`` and
``/dev/xen/gntalloc`` directly, with their ioctls and ``mmap``, rather than
through ``libxengnttab``: the library unmaps with ``munmap``, after which a
slice of the buffer that a caller still holds points at nothing and the next
access through it kills the backend with SIGSEGV.  Owning the address range
lets unmapping put private zero pages in place of the grant instead (see
:class:`_DevicePages`), as the simulated host does.  Event channels still go
through ``libxenevtchn``, whose handle has no such hazard.

Nothing is compiled: the declarations below are those of Debian's
``libxen-dev`` headers (``xenevtchn.h``, ``xen/sys/gntdev.h``,
``xen/sys/gntalloc.h``) and of libc, and ``tests/xenback/test_xb_xen.py``
checks them against those headers with a C compiler, so a mismatch fails a
test rather than corrupting memory.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import pyxs
from cffi import FFI

from workqueue import shown
from xenback._closing import Closing
from xenback._flags import check_flag
from xenback.platform import (
    EVTCHN_PORT_MAX,
    PAGE_SIZE,
    EventChannelError,
    GrantError,
    PlatformError,
    PlatformUnavailable,
    check_domid,
    check_grant_refs,
    check_page_count,
    check_port,
)
from xenback.xenstore import XenStore

logger = logging.getLogger(__name__)

__all__ = ["XenPlatform", "missing_pieces", "open"]

#: The C functions, shared with the test that compiles them after the real
#: headers.  ``off_t`` is ``long`` on the 64-bit Linux ABIs Xen's dom0 runs
#: on; the test's compiler rejects the typedef anywhere it is not.
CDEF = """
typedef uint32_t evtchn_port_t;
typedef int xenevtchn_port_or_error_t;
typedef struct xenevtchn_handle xenevtchn_handle;
struct xentoollog_logger;
typedef long off_t;

void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset);
int munmap(void *addr, size_t length);
int ioctl(int fd, unsigned long request, ...);

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

#: The ioctl arguments of gntdev and gntalloc, as ``xen/sys/gntdev.h`` and
#: ``xen/sys/gntalloc.h`` define them.  C forbids defining a struct twice, so
#: the test cannot compile these after the headers; it compares the type,
#: offset and size of every member, and every struct's size, instead.  The
#: trailing one-element arrays are really ``count`` elements long (see
#: :func:`_ioctl_arg`); their one element is part of ``sizeof``, and so of
#: the ioctl numbers.
KERNEL_CDEF = """
struct ioctl_gntdev_grant_ref {
    uint32_t domid;
    uint32_t ref;
};
struct ioctl_gntdev_map_grant_ref {
    uint32_t count;
    uint32_t pad;
    uint64_t index;
    struct ioctl_gntdev_grant_ref refs[1];
};
struct ioctl_gntdev_unmap_grant_ref {
    uint64_t index;
    uint32_t count;
    uint32_t pad;
};
struct ioctl_gntalloc_alloc_gref {
    uint16_t domid;
    uint16_t flags;
    uint32_t count;
    uint64_t index;
    uint32_t gref_ids[1];
};
struct ioctl_gntalloc_dealloc_gref {
    uint64_t index;
    uint32_t count;
};
"""

ffi = FFI()
ffi.cdef(CDEF)
ffi.cdef(KERNEL_CDEF)
_libc: Any = ffi.dlopen(None)


def _ioc_none(nr: int, struct: str) -> int:
    """Linux's ``_IOC(_IOC_NONE, 'G', nr, sizeof(struct))``: direction in
    bits 30-31 (none is 0), size in 16-29, type in 8-15, number in 0-7."""
    return ffi.sizeof(struct) << 16 | ord("G") << 8 | nr


IOCTL_GNTDEV_MAP_GRANT_REF = _ioc_none(0, "struct ioctl_gntdev_map_grant_ref")
IOCTL_GNTDEV_UNMAP_GRANT_REF = _ioc_none(1, "struct ioctl_gntdev_unmap_grant_ref")
IOCTL_GNTALLOC_ALLOC_GREF = _ioc_none(5, "struct ioctl_gntalloc_alloc_gref")
IOCTL_GNTALLOC_DEALLOC_GREF = _ioc_none(6, "struct ioctl_gntalloc_dealloc_gref")
#: ``xen/sys/evtchn.h``'s ``_IOC(_IOC_NONE, 'E', 5, 0)``: libxenevtchn has
#: no call for it.
IOCTL_EVTCHN_RESET = ord("E") << 8 | 5
GNTALLOC_FLAG_WRITABLE = 1

_MAP_FIXED = 0x10  # the same on every Linux architecture; Python's mmap module lacks it
_MAP_FAILED = -1  # mmap's (void *) -1, as an intptr_t
#: What a request's ``index`` says until MAP_GRANT_REF or ALLOC_GREF has
#: answered, which writes it back on success only: no offset gntdev or
#: gntalloc gives (theirs are whole pages).
_NO_INDEX = 2**64 - 1

#: Debian's ``libxenevtchn1`` ships it.
EVTCHN_LIBRARY = "libxenevtchn.so.1"
#: Device nodes of the grant and event channel drivers.
GNTDEV = Path("/dev/xen/gntdev")
GNTALLOC = Path("/dev/xen/gntalloc")
EVTCHN_DEVICE = Path("/dev/xen/evtchn")
#: Where the processes of a host keep what they share while it runs (the FHS's).
RUN_DIR = Path("/run")


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
    human-readable items ([] if nothing is missing).

    ``/dev/xen/gntalloc`` is not among them: only a frontend shares pages.
    """
    missing = []
    if not _loadable(EVTCHN_LIBRARY):
        missing.append(f"library {EVTCHN_LIBRARY} (Debian package libxenevtchn1)")
    for device, what in ((GNTDEV, "grant device"), (EVTCHN_DEVICE, "event channel device")):
        if not device.exists():
            missing.append(f"{what} {device} "
                           "(not running on Xen, or xen-gntdev/xen-evtchn not loaded)")
    sock = xenstored_socket()
    if not sock.exists():
        missing.append(f"xenstored socket {sock} (xenstored not running; set XENSTORED_PATH)")
    return missing


def _error(cls: type[PlatformError], what: str) -> PlatformError:
    code = ffi.errno or errno.EIO
    return cls(code, f"{what}: {os.strerror(code)}")


def _grants(refs: tuple[int, ...]) -> str:
    """``refs`` for a message: how many, and the first few (:func:`shown`).

    Not the one that failed: gntdev's ioctl and mmap fail for the whole
    request, and up to MAX_PAGES_PER_REQUEST refs in full made a message
    of some 7 KB."""
    if len(refs) == 1:
        return f"grant {refs[0]}"
    return f"{len(refs)} grants {shown(refs)}"


def _ioctl_arg(struct: str, count: int) -> Any:
    """A zeroed ``struct`` whose trailing one-element array has room for
    ``count`` elements (the buffer lives as long as the returned pointer)."""
    *_, (_, tail) = ffi.typeof(struct).fields
    size = ffi.sizeof(struct) + (count - 1) * ffi.sizeof(tail.type.item)
    return ffi.from_buffer(f"{struct} *", bytearray(size))


def _ioctl(fd: int, request: int, arg: Any, what: str, answers: list[int] | None = None) -> None:
    """The ioctl; ``answers``, if given, gets what it returned, stored by C
    code (list.extend() over map()) before control is back in Python code:
    a Ctrl-C landing as it returns leaves a caller's undoing knowing
    whether it was done (see _Device.__init__)."""
    answers = [] if answers is None else answers
    answers.extend(map(_libc.ioctl, (fd,), (request,), (arg,)))
    if answers[-1] < 0:
        raise _error(GrantError, what)


def _left_over(undoing: str, code: int | None, request: str, handle: str) -> None:
    """Log that ``undoing`` what ``request`` left failed (with errno
    ``code``), and that those leftovers stay until ``handle`` is closed.
    Logged, not raised: the caller's answer stays what stopped the request
    (a frontend's bad grant, ENOMEM, a Ctrl-C)."""
    logger.warning("%s failed: %s; they stay until the %s is closed (%s did not complete)",
                   undoing, os.strerror(code or errno.EIO), handle, request)


def _undo(undo: Callable[[], None], undoing: str, request: str, handle: str) -> None:
    """``undo()``, logging its failure (see _left_over)."""
    try:
        undo()
    except GrantError as exc:
        _left_over(undoing, exc.errno, request, handle)


def _mmap(addr: Any, npages: int, prot: int, flags: int, fd: int, offset: int, what: str) -> Any:
    addr = _libc.mmap(addr, npages * PAGE_SIZE, prot, flags, fd, offset)
    if int(ffi.cast("intptr_t", addr)) == _MAP_FAILED:
        raise _error(GrantError, what)
    return addr


def _map_device(
    mapped: list[Any], fd: int, index: int, npages: int, writable: bool, what: str
) -> None:
    """Map ``npages`` of a grant device at its offset ``index`` (the pages
    of one ``MAP_GRANT_REF`` or ``ALLOC_GREF``) into ``mapped``, for a
    :class:`_DevicePages` to take.  The address is stored by C code as mmap
    returns it, as :func:`_ioctl` stores its answer: wherever a Ctrl-C
    lands from then on, the caller finds what to unmap there
    (:func:`_unmap_untaken`), where a return value would have been lost
    with the range for the life of the process."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    mapped.extend(map(_libc.mmap, (ffi.NULL,), (npages * PAGE_SIZE,), (prot,),
                      (mmap.MAP_SHARED,), (fd,), (index,)))
    if int(ffi.cast("intptr_t", mapped[-1])) == _MAP_FAILED:
        raise _error(GrantError, what)


def _unmap_untaken(mapped: list[Any], npages: int) -> None:
    """Unmap what :func:`_map_device` put in ``mapped`` unless a
    :class:`_DevicePages` has taken it, which empties the list."""
    for addr in mapped:
        if int(ffi.cast("intptr_t", addr)) != _MAP_FAILED:
            _libc.munmap(addr, npages * PAGE_SIZE)


class _DevicePages:
    """Pages of a grant device mapped into this process: what a grant
    mapping and a share have in common.

    The address range is owned by a cdata pointer that unmaps it when it is
    collected; :attr:`buffer`, and every view sliced from it, keep that
    pointer alive.  :meth:`_scrub` ends the device's mapping by mapping
    private zero pages over it in place, so that views a caller still holds
    read zeros and write to memory nobody else sees, instead of faulting;
    the range itself goes when the last of them does.  With none held,
    :meth:`_scrub` unmaps it itself: the pointer's destructor, a callback
    of cffi's that drops what it raises (a Ctrl-C too), is the last resort.

    Python's :class:`mmap.mmap` would do the same for us but for two
    things: before Python 3.13 it keeps a duplicate of the device's
    descriptor for every mapping (each data ring would cost a descriptor),
    and its ``close()`` refuses while views exist, which would make the zero
    pages a rarely taken error path.  Here every end takes that one path.
    """

    _ended = "the pages are gone"  # ValueError of buffer once scrubbed

    def __init__(self, mapped: list[Any], refs: tuple[int, ...], writable: bool) -> None:
        """Take the range that :func:`_map_device` put in ``mapped``.

        It is this object's once ``mapped`` is empty, which the last call
        here makes it: a Ctrl-C landing before leaves the range to the
        caller's undoing (:func:`_unmap_untaken`), and the pointer made
        here, dropped with this object, leaves it alone then: a second
        munmap could unmap what has been mapped at that address since.
        """
        size = PAGE_SIZE * len(refs)
        (addr,) = mapped
        self._base: Any = ffi.gc(ffi.cast("char *", addr),
                                 lambda base: mapped or _libc.munmap(base, size))
        self._refs = refs
        whole = ffi.buffer(self._base, size)
        # What every view of the range holds, and holds the pointer by.
        # Taken here: :attr:`buffer` released by its caller (``with
        # mapping.buffer as b:``) no longer says what it viewed.
        self._views = weakref.ref(whole)
        view = memoryview(whole)
        self._buffer: memoryview | None = view if writable else view.toreadonly()
        self._lock = threading.Lock()  # one scrub, even if ended twice at once
        mapped.clear()

    def _end(self) -> None:
        """What leaving a ``with`` block does: unmap, or unshare."""
        raise NotImplementedError

    # ``with`` ends the pages, as it does the simulated host's.
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._end()

    @property
    def buffer(self) -> memoryview:
        if self._buffer is None:
            raise ValueError(self._ended)
        return self._buffer

    @property
    def refs(self) -> tuple[int, ...]:
        return self._refs

    def _scrub(self) -> bool:
        """Replace the device's pages by zero pages; False if done before.

        Raises :class:`GrantError`, with the pages still in place, if the
        kernel refuses (ENOMEM): then ending them may be tried again.
        """
        with self._lock:
            base, buffer = self._base, self._buffer
            if base is None:
                return False
            # One mmap call: the device's mapping is never absent without
            # the zero pages present, not even for another thread.
            _mmap(
                base,
                len(self._refs),
                mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED,
                -1,
                0,
                f"replacing {_grants(self._refs)} by zero pages",
            )
            self._base = self._buffer = None
        assert buffer is not None
        try:
            buffer.release()
        except BufferError:
            pass  # re-exported (memoryview(view), numpy...): it sees zeros now
        del buffer
        if self._views() is not None:
            logger.warning(
                "%s ended while views of their pages are held: those read zeros from now on",
                _grants(self._refs),
            )
            return True  # the range goes with the last of them
        # Unmapped here, not by the pointer's destructor as we drop it: a
        # callback of cffi's, which prints and drops what it raises, so a
        # Ctrl-C landing as it started was lost, and the range with it.
        # The size first: the finally calls nothing a Ctrl-C can land after
        # before munmap.
        size = PAGE_SIZE * len(self._refs)
        try:
            ffi.gc(base, None)  # no destructor left to run
        finally:
            _libc.munmap(base, size)
        return True

    def __repr__(self) -> str:
        state = "ended" if self._base is None else "live"
        return f"<{type(self).__name__} refs={list(self._refs)} {state}>"


class XenGrantMapping(_DevicePages):
    """Pages of another domain mapped through gntdev (see
    :class:`xenback.platform.GrantMapping`)."""

    _ended = "grant mapping was unmapped"

    def __init__(
        self,
        table: XenGrantTable,
        index: int,
        mapped: list[Any],
        refs: tuple[int, ...],
        writable: bool,
    ) -> None:
        self._table = table
        self._index = index  # gntdev's offset of the grants' slots
        # UNMAP_GRANT_REF's answer, once asked (see _ioctl).
        self._released: list[int] = []
        super().__init__(mapped, refs, writable)  # last: it takes the range

    def unmap(self) -> None:
        """Unmap the pages and release gntdev's slots; idempotent.

        :attr:`buffer` is released; slices of it that a caller still holds
        see zero pages from now on, never the grants.

        Refused the zero pages (ENOMEM), it raises with the grants still
        mapped, and the next unmap() tries again.  Refused the slots'
        release, it raises once, and the next unmap() does nothing:
        gntdev refuses only slots it does not hold at that index (ENOENT)
        or an argument it cannot read, and asked again, it could release
        the slots of a mapping given that index since.
        """
        self._scrub()
        # By whichever unmap() finds them held once the pages are gone, not
        # only by the one whose _scrub() ended them: a Ctrl-C in between
        # left them held until the device was closed, and the next unmap()
        # did nothing.  Held until the ioctl's answer is recorded (by C
        # code, see _ioctl), so never released twice: their index may be
        # another mapping's by then.
        with self._lock:
            if not self._released:
                self._table._release_slots(self._index, self._refs, self._released)

    def _end(self) -> None:
        self.unmap()


class _Device(Closing):
    """An open grant device: the descriptor and the lock held around every
    use of it, so that :meth:`close` cannot let another open reuse its
    number under an ioctl or mmap in flight.  ``with`` closes it, as it
    does the simulated host's handles.

    Pages mapped from the device stay valid after :meth:`close` until they
    are ended, as with ``xengnttab_close``: their address ranges hold the
    device open, and it frees what is left of them when it is closed last.
    """

    _kind = "device"

    # Which device: looked up as the handle opens (the tests point it at
    # files of their own).  Not a constructor argument passed on by
    # subclasses: a Ctrl-C landing as super().__init__() returned would
    # drop the handle, its descriptor open.
    @property
    def _path(self) -> Path:
        raise NotImplementedError

    def __init__(self) -> None:
        self._lock = threading.Lock()
        path = self._path
        # Whole or nothing, a Ctrl-C landing as any call returns included:
        # the descriptor, an int that nothing closes when it is dropped, is
        # recorded by the call that opens it (list.extend() stores what it
        # returned before control is back in Python code), or one landing
        # as os.open() returned would leave the device open for the life
        # of the process.
        opened: list[int] = []
        try:
            opened.extend(map(os.open, (path,), (os.O_RDWR | os.O_CLOEXEC,)))
        except OSError as exc:  # from os.open(): nothing is open
            raise PlatformUnavailable(exc.errno, f"cannot open {path}: {exc.strerror}") from None
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        self._fd: int | None = opened[0]

    def _open_fd(self, what: str) -> int:
        """The descriptor (under _lock); GrantError EBADF once closed.

        Not a contextmanager taking the lock: a Ctrl-C landing as its
        __enter__ had the generator's value (as next() returned) left the
        generator suspended with the lock held, no __exit__ to let go of
        it, until the traceback went: a close() meanwhile, in ``with``'s
        exit or an ``except``, hung.  ``with self._lock`` lets nothing come
        between the acquire and its clean-up."""
        if self._fd is None:
            raise GrantError(errno.EBADF, f"{what}: the {self._kind} is closed")
        return self._fd

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class XenGrantTable(_Device):
    """A grant table handle: ``/dev/xen/gntdev``, opened once."""

    _kind = "grant table"

    @property
    def _path(self) -> Path:
        return GNTDEV

    def map_grant_refs(self, domid: int, refs: Sequence[int], *,
                       writable: bool = True) -> XenGrantMapping:
        check_flag("writable", writable)
        # As the simulated host checks them, in its order; plain ints (an
        # int subclass's str() may be its name in a message).
        domid = check_domid(GrantError, domid)
        refs = check_grant_refs(refs)
        op = _ioctl_arg("struct ioctl_gntdev_map_grant_ref", len(refs))
        op.count = len(refs)
        grants = ffi.cast("struct ioctl_gntdev_grant_ref *", op.refs)
        for i, ref in enumerate(refs):
            grants[i].domid = domid
            grants[i].ref = ref
        what = f"mapping {_grants(refs)} of domain {domid}"
        op.index = _NO_INDEX
        mapped: list[Any] = []
        # Until the caller has the mapping, whatever stops the request (the
        # mmap's error, a Ctrl-C landing anywhere) undoes what it got.
        try:
            with self._lock:
                fd = self._open_fd(what)
                _ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, op, what)
                # The grants are mapped by mmap, which fails if one is bad.
                _map_device(mapped, fd, op.index, len(refs), writable, what)
            return XenGrantMapping(self, op.index, mapped, refs, writable)
        except BaseException:
            if op.index != _NO_INDEX:
                _unmap_untaken(mapped, len(refs))
                _undo(functools.partial(self._release_slots, op.index, refs),
                      f"releasing gntdev's slots of {_grants(refs)}", what, self._kind)
            raise

    def _release_slots(self, index: int, refs: tuple[int, ...],
                       answers: list[int] | None = None) -> None:
        with self._lock:
            # Closed: the device frees the slots when the last mapping goes.
            if self._fd is not None:
                what = f"releasing gntdev's slots of {_grants(refs)}"
                self._unmap_grant_ref(self._fd, index, len(refs), what, answers)

    @staticmethod
    def _unmap_grant_ref(fd: int, index: int, count: int, what: str,
                         answers: list[int] | None = None) -> None:
        op = ffi.new("struct ioctl_gntdev_unmap_grant_ref *", {"index": index, "count": count})
        _ioctl(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, op, what, answers)


class XenSharedPages(_DevicePages):
    """Zeroed pages this domain granted to another one through gntalloc."""

    _ended = "pages were unshared"

    def unshare(self) -> None:
        """End the grants and free the pages; idempotent.

        The grantee keeps what it already mapped until it unmaps.  Slices of
        :attr:`buffer` that a caller still holds see zero pages from now on.
        """
        # The mapping holds the grants' only reference (see share_pages).
        self._scrub()

    def _end(self) -> None:
        self.unshare()


class XenGrantShare(_Device):
    """A grant share handle: ``/dev/xen/gntalloc``, opened once."""

    _kind = "grant share handle"

    @property
    def _path(self) -> Path:
        return GNTALLOC

    def share_pages(self, domid: int, count: int, *, writable: bool = True) -> XenSharedPages:
        check_flag("writable", writable)
        domid = check_domid(GrantError, domid)  # first, as the simulated host
        # A plain int, as map_grant_refs() keeps them: a subclass's str()
        # may be its name in a message.
        count = check_page_count(count)
        op = _ioctl_arg("struct ioctl_gntalloc_alloc_gref", count)
        op.domid = domid
        op.flags = GNTALLOC_FLAG_WRITABLE if writable else 0
        op.count = count
        what = f"sharing {count} pages with domain {domid}"
        op.index = _NO_INDEX
        mapped: list[Any] = []
        dropped: list[int] = []  # DEALLOC_GREF's answer, once asked
        # Until the caller has the pages, whatever stops the request (the
        # mmap's error, a Ctrl-C landing anywhere) undoes what it got.
        try:
            with self._lock:
                fd = self._open_fd(what)
                _ioctl(fd, IOCTL_GNTALLOC_ALLOC_GREF, op, what)
                # Writable whatever the grantee may do, as with xengntshr.
                _map_device(mapped, fd, op.index, count, True, what)
                # The device's own reference to the grants is dropped: from
                # now on the mapping alone holds them, so that replacing it
                # (unshare), or exiting, ends them.
                self._dealloc_gref(fd, op.index, count, what, dropped)
            return XenSharedPages(mapped, self._refs(op, count), True)
        except BaseException as exc:
            if op.index != _NO_INDEX:
                undoing = f"dropping gntalloc's reference to {_grants(self._refs(op, count))}"
                if not dropped:
                    _undo(functools.partial(self._drop_reference, op.index, count),
                          undoing, what, self._kind)
                elif dropped[0] < 0:
                    # Its error is the one raised, unless a Ctrl-C landed
                    # first: then no cffi call since has changed ffi.errno.
                    code = exc.errno if isinstance(exc, GrantError) else ffi.errno
                    _left_over(undoing, code, what, self._kind)
                _unmap_untaken(mapped, count)
            raise

    @staticmethod
    def _refs(op: Any, count: int) -> tuple[int, ...]:
        """The grant refs that ALLOC_GREF made, as ``op`` has them."""
        return tuple(ffi.unpack(ffi.cast("uint32_t *", op.gref_ids), count))

    def _drop_reference(self, index: int, count: int) -> None:
        with self._lock:
            # Closed: the device drops its references itself.
            if self._fd is not None:
                what = f"dropping gntalloc's reference to {count} pages"
                self._dealloc_gref(self._fd, index, count, what)

    @staticmethod
    def _dealloc_gref(
        fd: int, index: int, count: int, what: str, answers: list[int] | None = None
    ) -> None:
        op = ffi.new("struct ioctl_gntalloc_dealloc_gref *", {"index": index, "count": count})
        _ioctl(fd, IOCTL_GNTALLOC_DEALLOC_GREF, op, what, answers)


class XenEventChannel(Closing):
    """A ``xenevtchn`` handle whose descriptor is non-blocking, so that
    :meth:`pending` returns None instead of blocking when nothing fired.
    ``with`` closes it, as it does the simulated host's handle."""

    def __init__(self) -> None:
        # Held around every call that uses the handle: xenevtchn_close frees
        # it and closes its descriptor, whose number another open may then
        # reuse, so a call in flight in another thread (a worker's notify
        # while the backend closes) must finish first.  The calls are short
        # and never block: the descriptor is non-blocking.
        self._lock = threading.Lock()
        self._lib = _load(EVTCHN_LIBRARY)
        # Whole or nothing, a Ctrl-C landing as any call returns included:
        # the handle, which nothing frees when it is dropped, is recorded
        # by the call that opens it (list.extend() stores what it returned
        # before control is back in Python code) and closed again if the
        # rest fails, or it would stay open for the life of the process.
        opened: list[Any] = []
        try:
            opened.extend(map(self._lib.xenevtchn_open, (ffi.NULL,), (0,)))
            if opened[0] == ffi.NULL:
                raise _error(PlatformUnavailable, f"xenevtchn_open ({EVTCHN_DEVICE})")
            self._fd = self._lib.xenevtchn_fd(opened[0])
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        except BaseException:
            for handle in opened:
                if handle != ffi.NULL:
                    self._lib.xenevtchn_close(handle)
            raise
        self._handle = opened[0]

    def fileno(self) -> int:
        with self._lock:
            if self._handle is None:
                raise EventChannelError(errno.EBADF, "the event channel handle is closed")
            return int(self._fd)

    def _call(self, function: Any, *args: int) -> int:
        """``function(handle, *args)``, under the lock; EBADF once closed
        (as on the simulated host) rather than cffi's TypeError for None."""
        with self._lock:
            if self._handle is None:
                raise EventChannelError(errno.EBADF, "the event channel handle is closed")
            return int(function(self._handle, *args))

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        domid = check_domid(EventChannelError, domid)
        remote_port = check_port(remote_port)
        bound: list[int] = []
        try:
            self._bind(
                bound,
                f"binding port {remote_port} of domain {domid}",
                self._lib.xenevtchn_bind_interdomain,
                domid,
                remote_port,
            )
        except BaseException:
            self._give_back(bound)
            raise
        return bound[0]

    def bind_unbound_port(self, domid: int) -> int:
        domid = check_domid(EventChannelError, domid)
        bound: list[int] = []
        try:
            self._bind(
                bound,
                f"allocating a port for domain {domid}",
                self._lib.xenevtchn_bind_unbound_port,
                domid,
            )
        except BaseException:
            self._give_back(bound)
            raise
        return bound[0]

    def _bind(self, bound: list[int], what: str, function: Any, *args: int) -> None:
        """``function(handle, *args)``, a bind, its port recorded in
        ``bound``; :class:`EventChannelError` if it failed.

        Recorded by the call that makes it (list.extend() stores what it
        returned before control is back in Python code): as ``port =
        function(...)``, a Ctrl-C as the call returned would lose the
        number, the port bound until the handle closed.  The caller gives
        back what ``bound`` holds if a Ctrl-C lands before it returns the
        port, here or as this returns (in its own frame, so only it can).
        """
        with self._lock:
            if self._handle is None:
                raise EventChannelError(errno.EBADF, "the event channel handle is closed")
            bound.extend(itertools.starmap(function, ((self._handle, *args),)))
        if bound[0] < 0:
            raise _error(EventChannelError, what)

    def _give_back(self, bound: list[int]) -> None:
        """Unbind the port an interrupted bind made (in ``bound`` if any)."""
        for port in bound:
            with self._lock:
                # Closed: closing the handle unbound it.
                if port >= 0 and self._handle is not None:
                    # Its failure is not raised over the Ctrl-C (a caller's
                    # except for it would swallow that): nothing else to do.
                    self._lib.xenevtchn_unbind(self._handle, port)

    def notify(self, port: int) -> None:
        # A plain int in range spared the call (notify and unmask are per
        # event); check_port() passes an int subclass on as a plain int.
        if type(port) is not int or not 0 < port <= EVTCHN_PORT_MAX:
            port = check_port(port)
        if self._call(self._lib.xenevtchn_notify, port) < 0:
            raise _error(EventChannelError, f"notifying port {port}")

    def pending(self) -> int | None:
        port = self._call(self._lib.xenevtchn_pending)
        if port < 0:
            if ffi.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise _error(EventChannelError, "reading pending ports")
        return int(port)

    def unmask(self, port: int) -> None:
        # A plain int in range spared the call (notify and unmask are per
        # event); check_port() passes an int subclass on as a plain int.
        if type(port) is not int or not 0 < port <= EVTCHN_PORT_MAX:
            port = check_port(port)
        if self._call(self._lib.xenevtchn_unmask, port) < 0:
            raise _error(EventChannelError, f"unmasking port {port}")

    def unbind(self, port: int) -> None:
        port = check_port(port)  # not per event: no inline check to spare the call
        if self._call(self._lib.xenevtchn_unbind, port) < 0:
            raise _error(EventChannelError, f"unbinding port {port}")

    def reset(self) -> None:
        # On the handle's descriptor: libxenevtchn has no call for it, and
        # its Linux backend reads and writes that descriptor directly too.
        with self._lock:
            if self._handle is None:
                raise EventChannelError(errno.EBADF, "the event channel handle is closed")
            if _libc.ioctl(self._fd, IOCTL_EVTCHN_RESET) < 0:
                raise _error(EventChannelError, "resetting the event channel handle")

    def close(self) -> None:
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            self._lib.xenevtchn_close(handle)


class XenPlatform:
    """A :class:`~xenback.platform.Platform` on a real Xen host."""

    def __init__(self, domid: int, socket_path: Path) -> None:
        self._domid = domid
        self._socket_path = socket_path

    def __repr__(self) -> str:
        return f"<XenPlatform domid={self._domid} xenstore={self._socket_path}>"

    # Two handles on one domain are one platform, as the simulated host's
    # domains are: a backend may serve each domain once.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, XenPlatform):
            return NotImplemented
        return (self._domid, self._socket_path) == (other._domid, other._socket_path)

    def __hash__(self) -> int:
        return hash((self._domid, self._socket_path))

    @property
    def domid(self) -> int:
        """This domain's id."""
        return self._domid

    @property
    def run_dir(self) -> Path:
        """``/run`` (of this domain's own system: a driver domain has its own)."""
        return RUN_DIR

    def xenstore(self) -> pyxs.Client:
        """A new, not yet connected :class:`pyxs.Client` on the xenstored socket."""
        return pyxs.Client(unix_socket_path=str(self._socket_path))

    def gnttab(self) -> XenGrantTable:
        """A new grant table handle on ``/dev/xen/gntdev``."""
        # Made through list.extend(), as evtchn()'s handle is.
        made: list[XenGrantTable] = []
        try:
            made.extend(itertools.starmap(XenGrantTable, ((),)))
        except BaseException:
            for handle in made:
                handle.close()
            raise
        return made[0]

    def gntshr(self) -> XenGrantShare:
        """A new grant share handle on ``/dev/xen/gntalloc``."""
        # Made through list.extend(), as evtchn()'s handle is.
        made: list[XenGrantShare] = []
        try:
            made.extend(itertools.starmap(XenGrantShare, ((),)))
        except BaseException:
            for handle in made:
                handle.close()
            raise
        return made[0]

    def evtchn(self) -> XenEventChannel:
        """A new event channel handle (``libxenevtchn``)."""
        # Made through list.extend(), as the handle is in its constructor:
        # as ``return XenEventChannel()``, a Ctrl-C as the constructor
        # returned would lose it before our caller had it.
        made: list[XenEventChannel] = []
        try:
            made.extend(itertools.starmap(XenEventChannel, ((),)))
        except BaseException:
            for handle in made:
                handle.close()
            raise
        return made[0]


def _lost_in_open(exc: Exception) -> None:
    # The read fails with the loss, and open() says so.
    logger.debug("xenstored hung up as we read our domid: %s", exc)


def open() -> XenPlatform:  # noqa: A001 - the module's verb, like io.open
    """Open the real Xen platform of this domain.

    Raises :class:`~xenback.platform.PlatformUnavailable` naming every
    missing piece (library, ``/dev/xen/gntdev``, ``/dev/xen/evtchn``,
    xenstored socket) when this machine cannot run a backend on Xen, and
    when our ``domid`` cannot be read from xenstored (its errno kept: a
    host short of descriptors is EMFILE; EIO for a malformed domid).
    """
    missing = missing_pieces()
    if missing:
        raise PlatformUnavailable(
            errno.ENODEV, "Xen is not available here; missing: " + "; ".join(missing)
        )
    sock = xenstored_socket()
    # Through XenStore, not a bare pyxs client: whose read would wait for
    # ever for its reply should xenstored hang up under it.
    xs = XenStore(pyxs.Client(unix_socket_path=str(sock)), on_lost=_lost_in_open)
    try:
        with xs:
            domid = xs.read_int("domid", 0)  # none: dom0
    except (OSError, ValueError) as exc:
        # The errno kept: a host short of descriptors is no host without Xen.
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        raise PlatformUnavailable(
            code, f"cannot read our domid from xenstored at {sock}: {exc}") from exc
    return XenPlatform(domid, sock)
