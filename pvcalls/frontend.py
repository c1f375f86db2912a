"""The guest side of PV Calls: a frontend and a socket-like class on top of it.

:class:`Frontend` plays the part of Linux's ``pvcalls-front`` for one guest
domain: it adds the ``pvcalls`` device as a toolstack would, does the xenbus
handshake, owns the one-page command ring, and hands out :class:`PVSocket`
objects that behave like ``socket.socket(AF_INET, SOCK_STREAM)``::

    with pvcalls.Frontend(guest) as fe:
        with fe.socket() as s:
            s.connect(("127.0.0.1", port))
            s.sendall(b"hello")
            reply = s.recv(4096)

On the wire it speaks exactly as Linux's frontend does, so that a backend
tested against this class works with real guests:

* ``req_id`` is the command ring slot index (``req_prod_pvt & (RING_SIZE-1)``)
  and one response table entry per slot waits for the answer;
* socket ids are unique pointer-sized values, never reused by one frontend;
* every active socket gets a data ring of ``ring_order`` 4 (16 pages, 32 KiB
  each way) plus its indexes page, and an event channel of its own (the
  ``ring_order`` option asks for larger rings, up to the backend's
  ``max-page-order``: not what Linux does, but allowed by the protocol and
  fewer notifications per megabyte);
* CONNECT and BIND carry ``len`` = 16 (``sizeof(struct sockaddr)``);
* accept() first sends POLL and waits for a pending connection, then sends
  ACCEPT, as a Linux program calling ``poll()`` then ``accept()`` does; at most
  one POLL or ACCEPT is in flight per listening socket (Linux's backend
  answers a second one with -EINTR);
* after RELEASE of an active socket it writes -EBADF into ``in_error``.

Unlike Linux, ``close()`` does not wait for RELEASE's answer (the requests
on the wire are the same; the ring is reused only once the answer came).

Where Linux would return -EAGAIN because every ring slot is busy, this class
waits for a free slot instead.

Threads: one event thread per frontend reads the frontend's event channel
handle and wakes whoever waits for command responses.  Each data ring has an
event channel handle of its own (as a Linux process may open
``/dev/xen/evtchn`` once per socket), and a thread blocked in ``recv`` or
``send`` waits on that handle's descriptor itself: a notification from the
backend wakes the thread that needs it, with no relay through the event
thread (one thread switch less per wake-up; the event thread is no
bottleneck for many sockets).  Only if the handle cannot be opened (the
host's limit on handles) does the ring share the frontend's handle, and its
wake-ups go through the event thread.  Sockets the program dropped without
closing them are released by a short-lived thread, which the event thread
starts when there are some (see :meth:`Frontend._collect`).  Several
threads may use different sockets of one frontend at the same time; one
socket may have one thread receiving while another sends.

Signals: a call blocked in the main thread looks again at least every half
second, so that a signal handler (Ctrl-C's) runs soon even when the kernel
gave the signal to another thread, which a plain ``socket.socket`` blocked
in the main thread would not notice until it woke.

Waiting on sockets: :meth:`PVSocket.fileno` returns an ``eventfd`` that is
readable while ``recv`` or ``accept`` would not block (data, end of stream,
an error, or a pending connection).  It never reports anything about
writability: ``select`` always finds it writable.  It is *not* a socket
descriptor; pass it only to ``select``/``poll``/``selectors``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import io
import itertools
import logging
import math
import operator
import os
import select
import socket
import struct
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Self

from workqueue._pool import wait_slice
from xenback import _barrier
from xenback._closing import Closing
from xenback.platform import Platform
from xenback.ring import FlexRing, FrontRing, RingError
from xenback.xenbus import XenbusState
from xenback.xenstore import XenStore

from . import _errno
from ._wire import (
    AF_INET,
    IN_CONS_OFFSET,
    IN_ERROR_OFFSET,
    IN_PROD_OFFSET,
    MAX_PAGE_ORDER_LIMIT,
    OUT_CONS_OFFSET,
    OUT_ERROR_OFFSET,
    OUT_PROD_OFFSET,
    PAGE_SIZE,
    PVCALLS_ACCEPT,
    PVCALLS_BIND,
    PVCALLS_COMMANDS,
    PVCALLS_CONNECT,
    PVCALLS_LISTEN,
    PVCALLS_POLL,
    PVCALLS_RELEASE,
    PVCALLS_SOCKET,
    PVCALLS_VERSIONS,
    REF_OFFSET,
    RING_ORDER_OFFSET,
    RING_SLOTS,
    SLOT_SIZE,
    SOCK_STREAM,
    SOCKADDR_IN_LEN,
    ffi,
    flex_ring_size,
    pack_sockaddr_in,
)

if TYPE_CHECKING:
    from xenback.platform import EventChannel, GrantShare, SharedPages
    from xenback.xenstore import Transaction, Watch

__all__ = ["Frontend", "PVSocket", "FRONTEND_RING_ORDER"]

logger = logging.getLogger(__name__)


# What every call says once the frontend's XenStore connection is lost: the
# backend cannot be reached either (Xen's toolstack and backends cannot run
# without XenStore), so it is the likely reason for a whole host.
_LOST_XENSTORE = "lost XenStore (is the host gone?)"

#: The default data ring order of every active socket: Linux's
#: ``PVCALLS_RING_ORDER``.  Linux's frontend also refuses a backend whose
#: ``max-page-order`` is below it.
FRONTEND_RING_ORDER = 4

_I32 = struct.Struct("=i")
#: The range of a C int: what socket.socket.listen() takes as a backlog.
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_U32 = struct.Struct("=I")
#: The longest timeout settimeout() takes (socket.socket's limit is time_t's).
_TIMEOUT_MAX = float(threading.TIMEOUT_MAX)
#: Domain ids from here up are reserved: no backend runs in one.
_DOMID_FIRST_RESERVED = 0x7FF0
_ID_BASE = 0xFFFF_8880_0000_0000  # looks like a Linux direct-map pointer
_ID_STRIDE = 0x100  # kmalloc-256, roughly sizeof(struct sock_mapping)
#: Released data rings a frontend keeps for reuse (17 pages and a port each).
_RING_POOL_MAX = 32


#: Errors that Python's callers take for "try again", not for a failure:
#: BlockingIOError's (socket.SocketIO reads EAGAIN as no data yet, a select
#: loop tries again) and InterruptedError's (PEP 475 retries).  No backend
#: may mean either: the frontend's calls wait themselves, EAGAIN is never
#: stored in a data ring, and ACCEPT is answered once a connection is in.
_RETRY_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EWOULDBLOCK, errno.EALREADY, errno.EINPROGRESS, errno.EINTR})


def _host_error(ret: int, what: str) -> OSError:
    """An :class:`OSError` in the host's numbering for the negative Xen
    errno ``ret`` (mapped by name; Linux's internal ENOTSUPP becomes
    EOPNOTSUPP, and one that would read as "try again" EPROTO: a
    blocking call retried on it forever, or took it for end of stream)."""
    name = _errno.name_of(ret)
    code = getattr(errno, name, None)
    if code is None:
        code = errno.EOPNOTSUPP if name == "ENOTSUPP" else errno.EIO
    elif code in _RETRY_ERRNOS:
        return OSError(errno.EPROTO,
                       f"{os.strerror(errno.EPROTO)} ({what}: the backend said {name})")
    return OSError(code, f"{os.strerror(code)} ({what})")


def _checked(peek: Callable[[], tuple[memoryview, ...]]) -> tuple[memoryview, ...]:
    """``peek()`` of a data ring, whose indexes the backend may have broken
    (``prod - cons > size``): that is an I/O error of this socket only."""
    try:
        return peek()
    except RingError as exc:
        raise OSError(errno.EPROTO, f"the backend broke the data ring: {exc}") from None


def _state(value: str | None) -> XenbusState:
    """A backend's state node; anything that is not a state reads as UNKNOWN."""
    try:
        return XenbusState.parse(value)
    except ValueError:
        return XenbusState.UNKNOWN


def _bad_fd() -> OSError:
    return OSError(errno.EBADF, os.strerror(errno.EBADF))


def _check_flags(flags: int, call: str) -> None:
    if operator.index(flags):
        raise OSError(errno.EOPNOTSUPP, f"{call} flags are not supported over PV Calls")


def _send_view(data: bytes | bytearray | memoryview) -> memoryview:
    """``data`` as the bytes send() takes: any C-contiguous buffer, whatever
    its format and shape.  Another one is a :class:`BufferError`, as
    socket.socket's (asking for a simple buffer) says, not cast()'s
    :class:`TypeError`."""
    view = memoryview(data)
    if not view.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return view.cast("B")


def _timeout_value(value: float | None) -> float | None:
    """``value`` checked as :meth:`socket.socket.settimeout` checks it."""
    if value is None:
        return None
    if isinstance(value, str | bytes | bytearray):
        raise TypeError(f"timeout must be a number or None, not {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError("Invalid value NaN (not a number)")
    if value < 0:
        raise ValueError("Timeout value out of range")
    if value > _TIMEOUT_MAX:
        raise OverflowError(f"timeout {value} too large (at most {_TIMEOUT_MAX:g} s)")
    return value


def _host_bytes(host: str) -> bytes:
    """The bytes :class:`socket.socket` hands the C library for ``host``:
    an ASCII name as it is, any other IDNA-encoded; :class:`TypeError` if
    it cannot be.  (socket.getaddrinfo() would IDNA-encode an ASCII str
    too, and raise UnicodeError for a malformed name such as "a..b" that
    the resolver should refuse.)"""
    try:
        return host.encode("ascii") if host.isascii() else host.encode("idna")
    except UnicodeError:
        raise TypeError("encoding of hostname failed") from None


def _resolve(address: object) -> tuple[str, int]:
    """An AF_INET ``(host, port)`` as :class:`socket.socket` takes it: the
    host a string or bytes, numeric (``inet_aton`` forms such as ``127.1``
    included) or a name resolved here, in the guest, as a Linux guest's C
    library does before it calls connect() or bind()."""
    if not isinstance(address, tuple) or len(address) != 2:
        raise TypeError(f"AF_INET address must be a (host, port) tuple, not {address!r}")
    host, port = address
    if not isinstance(host, str | bytes | bytearray):
        raise TypeError(f"str, bytes or bytearray expected, not {type(host).__name__}")
    port = operator.index(port)
    if not 0 <= port <= 0xFFFF:
        raise OverflowError("port must be 0-65535.")
    name = _host_bytes(host) if isinstance(host, str) else bytes(host)
    if b"\0" in name:
        raise TypeError("host name must not contain null character")
    if name == b"":
        return "0.0.0.0", port
    if name == b"<broadcast>":
        return "255.255.255.255", port
    if name.isascii():
        try:
            return socket.inet_ntoa(socket.inet_aton(name.decode("ascii"))), port
        except OSError:
            pass
    # Raises socket.gaierror for a name without an IPv4 address, as
    # socket.socket does.
    info = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)
    return str(info[0][4][0]), port


class _Deadline:
    """A socket timeout turned into an absolute deadline.

    ``None`` waits forever, ``0.0`` never waits (the caller raises
    :class:`BlockingIOError`), anything else raises :class:`TimeoutError`.
    Every wait sleeps at most :meth:`nap` at a time and looks again, so
    that the main thread runs a signal's handler soon, whichever thread
    the kernel gave the signal to.
    """

    __slots__ = ("_end", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left; raises :class:`TimeoutError` once they are over."""
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def nap(self) -> float | None:
        """How long to sleep before looking again: the time left (``None``:
        no limit), in the main thread half a second at most, as the
        workqueue's waits (``workqueue._pool.wait_slice``, which says why);
        raises :class:`TimeoutError` once it is over."""
        return wait_slice(self.remaining())

    def acquire(self, lock: threading.Lock) -> None:
        """Take ``lock`` (a socket lock another thread may hold while it
        waits) within the deadline: raises :class:`BlockingIOError` at once
        in non-blocking mode, :class:`TimeoutError` when the time is over.
        A free lock is taken also once the time is over."""
        if lock.acquire(blocking=False):
            return
        if self.timeout == 0.0:
            raise BlockingIOError(errno.EAGAIN, "operation would block")
        while True:
            nap = self.nap()
            if lock.acquire(timeout=-1 if nap is None else nap):
                return


@contextlib.contextmanager
def _held(lock: threading.Lock, deadline: _Deadline) -> Iterator[None]:
    """``with lock:``, taken within ``deadline`` (:meth:`_Deadline.acquire`)."""
    deadline.acquire(lock)
    try:
        yield
    finally:
        lock.release()


class _Slot:
    """One command in flight: the response table entry of its ring slot."""

    __slots__ = ("cmd", "sock_id", "done", "ret", "abandoned", "on_done")

    def __init__(self, cmd: int, sock_id: int) -> None:
        self.cmd = cmd
        self.sock_id = sock_id
        self.done = False
        self.ret = 0
        # Nobody will collect the answer: free the slot when it arrives.
        self.abandoned = False
        # Nobody waits: the event thread frees the slot and calls this
        # with ``ret`` (outside the command lock) when the answer arrives.
        self.on_done: Callable[[int], None] | None = None


class _Release:
    """A RELEASE in flight (see :meth:`Frontend._release`): what its
    socket shared, freed once the backend answered *and* close() took it
    from the socket.  Fields under the frontend's ``_lock``."""

    __slots__ = ("sock_id", "ring", "inflight", "taken", "ret")

    def __init__(self, sock_id: int) -> None:
        self.sock_id = sock_id
        self.ring: _DataRing | None = None
        self.inflight: tuple[int, _Slot, PVSocket] | None = None
        self.taken = False  # close() has moved ring and inflight here
        self.ret: int | None = None  # the answer, once it came


#: The two callers that may block on a data ring: indexes of
#: ``_DataRing.wakefds`` and ``PVSocket._polling``.
RECV, SEND = 0, 1


class _DataRing:
    """An active socket's shared pages: the indexes page and 2**order data
    pages, granted to the backend, and the event channel that goes with
    them.  The frontend initialises them; only the frontend frees them.

    ``evtchn`` is the handle the port is bound on: one of the ring's own
    (``direct``: the socket's blocked callers poll it, see
    :meth:`PVSocket._wait`) or the frontend's shared one (its event thread
    relays the port's events).  Each of the two callers that may block on
    the ring, the receiver (:data:`RECV`) and the sender (:data:`SEND`), has
    an eventfd in ``wakefds`` polled with the handle, so that whoever else
    consumed the ring's event (the other caller, or the event thread), or
    closes the socket, can wake it.
    """

    def __init__(
        self,
        gntshr: GrantShare,
        evtchn: EventChannel,
        backend_id: int,
        order: int,
        *,
        direct: bool = False,
    ) -> None:
        npages = 1 << order
        size = flex_ring_size(order)
        self.pages: SharedPages = gntshr.share_pages(backend_id, 1 + npages)
        buf = self.pages.buffer
        self.indexes = buf[:PAGE_SIZE]
        data = buf[PAGE_SIZE:]
        refs = self.pages.refs
        _U32.pack_into(self.indexes, RING_ORDER_OFFSET, order)
        for i in range(npages):
            _U32.pack_into(self.indexes, REF_OFFSET + 4 * i, refs[1 + i])
        self.ref = refs[0]
        # in: the backend produces, we consume.  out: the other way round.
        self.inq = FlexRing(
            data[:size], self.indexes, prod_offset=IN_PROD_OFFSET, cons_offset=IN_CONS_OFFSET
        )
        self.outq = FlexRing(
            data[size : 2 * size],
            self.indexes,
            prod_offset=OUT_PROD_OFFSET,
            cons_offset=OUT_CONS_OFFSET,
        )
        self.evtchn = evtchn
        self.direct = direct
        self.relayed = False  # the frontend's event thread watches ``evtchn``
        try:
            self.port = evtchn.bind_unbound_port(backend_id)
        except BaseException:
            self.pages.unshare()
            if direct:
                evtchn.close()
            raise
        # Indexed by RECV and SEND, each used by that caller only.
        self.wakefds = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                        os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self.pollers = (select.poll(), select.poll())
        for poller, wakefd in zip(self.pollers, self.wakefds, strict=True):
            if direct:
                poller.register(evtchn.fileno(), select.POLLIN)
            poller.register(wakefd, select.POLLIN)

    def notify(self) -> None:
        """Tell the backend we produced or consumed."""
        self.evtchn.notify(self.port)

    def consume_events(self) -> bool:
        """Take (and unmask) the ring's fired port from a handle of its own;
        True if it had fired.  Any thread may call it: whoever gets the
        event wakes the others (PVSocket._on_event)."""
        # One pending() is enough: the handle has this one port, which is
        # pending at most once, and a notify that comes after the unmask
        # makes the descriptor readable again.  (Asking until None costs the
        # simulated handle two more system calls per event.)
        evtchn = self.evtchn
        if evtchn.pending() is None:
            return False
        evtchn.unmask(self.port)
        return True

    # Peeks for wait predicates and the readiness eventfd: they must not
    # disturb the FlexRing's notion of the last readable()/writable().
    def in_pending(self) -> bool:
        return _U32.unpack_from(self.indexes, IN_PROD_OFFSET) != _U32.unpack_from(
            self.indexes, IN_CONS_OFFSET
        )

    def out_has_room(self) -> bool:
        """Room in the out ring, or indexes the backend broke (``used >
        size``): either way a blocked send() must look (and raise EPROTO)."""
        # Our out_prod store before this read of out_cons (see send()).
        _barrier.lib.xb_mb()
        used = (
            _U32.unpack_from(self.indexes, OUT_PROD_OFFSET)[0]
            - _U32.unpack_from(self.indexes, OUT_CONS_OFFSET)[0]
        ) & 0xFFFFFFFF
        return used != self.outq.size

    def reset(self) -> None:
        """Make a recycled ring new: indexes and errors back to zero (the
        ring order and grant references stay)."""
        for offset in (IN_CONS_OFFSET, IN_PROD_OFFSET, IN_ERROR_OFFSET,
                       OUT_CONS_OFFSET, OUT_PROD_OFFSET, OUT_ERROR_OFFSET):
            _U32.pack_into(self.indexes, offset, 0)

    def in_was_full(self, cons: int) -> bool:
        """After a consume: was the in ring full with ``cons``, our index
        before it?  Read after our in_cons store and a full barrier (see
        PVSocket.recv_into)."""
        _barrier.lib.xb_mb()
        prod = _U32.unpack_from(self.indexes, IN_PROD_OFFSET)[0]
        return (prod - cons) & 0xFFFFFFFF >= self.inq.size

    def in_error(self) -> int:
        return int(_I32.unpack_from(self.indexes, IN_ERROR_OFFSET)[0])

    def out_error(self) -> int:
        return int(_I32.unpack_from(self.indexes, OUT_ERROR_OFFSET)[0])

    def set_in_error(self, value: int) -> None:
        _I32.pack_into(self.indexes, IN_ERROR_OFFSET, value)

    def free(self) -> None:
        if self.direct:
            # Read the service's news about our port (the backend unbinding
            # it) while the port is still ours to be told about.
            try:
                self.consume_events()
            except OSError:
                pass
        try:
            self.evtchn.unbind(self.port)
        except OSError as exc:
            logger.debug("unbinding port %d: %s", self.port, exc)
        if self.direct:
            self.evtchn.close()
        for wakefd in self.wakefds:
            os.close(wakefd)
        self.inq.release()
        self.outq.release()
        self.indexes.release()
        self.pages.unshare()


class _SocketState:
    """What the backend shares or knows of one :class:`PVSocket`: its id,
    data ring, pending ACCEPT, readiness eventfd and what it was made.

    The frontend's table of sockets holds these, and only a weak reference
    to the PVSocket (``owner``), so that a PVSocket the program dropped
    unclosed is garbage as a :class:`socket.socket` would be; its state
    stays behind for the frontend to release it (see
    :meth:`Frontend._collect`).

    While the PVSocket lives, the fields are under its locks, as said at
    each.  Once it is gone, no call can use them any more: they belong to
    whoever takes the state out of the frontend's table.
    """

    __slots__ = ("id", "owner", "ring", "accept_inflight", "readyfd", "bound", "listening")

    def __init__(self, sock: PVSocket) -> None:
        self.id = sock.id
        self.owner = weakref.ref(sock)
        # Set once active, by connect() or accept() under the socket's
        # receive and send locks; taken by close() under those and _cond.
        self.ring: _DataRing | None = None
        # An ACCEPT in flight and the socket it offers (under _accept_lock,
        # set and read under _cond too): the listener keeps that socket.
        self.accept_inflight: tuple[int, _Slot, PVSocket] | None = None
        self.readyfd: int | None = None  # the eventfd of fileno(), lazily (under _cond)
        self.bound = False
        self.listening = False

    def describe(self, *, closed: bool) -> str:
        """The socket's repr."""
        state = "closed" if closed else "active" if self.ring else (
            "listening" if self.listening else "bound" if self.bound else "new")
        return f"<PVSocket id={self.id:#x} {state}>"

    def on_event(self) -> None:
        """Event thread: the data ring's port fired on the frontend's
        shared handle: wake the socket's waiters, if it still has any."""
        sock = self.owner()
        if sock is not None:
            sock._on_event()

    def on_relayed_event(self, ring: _DataRing) -> None:
        """Event thread: the own handle of a ring whose readiness eventfd is
        in use fired (see :meth:`Frontend._relay`).  The event is taken
        also once the socket is gone, or the handle would stay readable
        and the thread spin until the socket's release."""
        try:
            fired = ring.consume_events()
        except OSError:
            return
        sock = self.owner()
        if fired and sock is not None:
            sock._on_event()


class PVSocket(Closing):
    """A TCP/IPv4 socket whose calls go to the backend domain over PV Calls.

    Create it with :meth:`Frontend.socket`.  It supports the subset of
    :class:`socket.socket` that PV Calls can express: ``connect``, ``bind``,
    ``listen``, ``accept``, ``send``, ``sendall``, ``recv``, ``recv_into``,
    ``makefile``, timeouts, ``close`` and ``with`` blocks.

    PV Calls has no shutdown and does not report addresses back, so
    ``getsockname`` returns the address given to :meth:`bind` (``("0.0.0.0",
    0)`` otherwise), ``getpeername`` the address given to :meth:`connect`,
    and :meth:`accept` returns ``("0.0.0.0", 0)`` as the peer address.
    A socket is either bound (then it may listen) or connected: CONNECT
    after BIND is refused with EINVAL, where a :class:`socket.socket`
    would connect from the bound address.

    A socket the program drops without closing it is released once it is
    garbage, as a :class:`socket.socket` closes itself, with a
    :class:`ResourceWarning` ``unclosed <PVSocket ...>``: its RELEASE goes
    out from a thread of the frontend's soon after, so that dropped sockets
    do not hold on to the domain's socket limit until the frontend closes.
    A listening socket is not garbage while a call waits in it, nor a
    socket while a :meth:`makefile` stream on it is open.
    """

    family = socket.AF_INET
    type = socket.SOCK_STREAM
    proto = 0

    def __init__(self, frontend: Frontend, sock_id: int) -> None:
        self._fe = frontend
        self.id = sock_id
        self._timeout: float | None = socket.getdefaulttimeout()
        # close() was called; the socket really closes (_closed) once no
        # makefile() stream uses it any more, as in socket.socket.
        self._close_requested = False
        self._closed = False
        self._io_refs = 0  # open makefile() streams, as in socket.socket
        # What the backend shares or knows of this socket, kept by the
        # frontend also once this object is gone: see _SocketState.
        self._st = _SocketState(self)
        self._sockname: tuple[str, int] = ("0.0.0.0", 0)
        self._peername: tuple[str, int] | None = None
        self._broken = False  # a CONNECT timed out: only close() is left
        # The id_new of an ACCEPT in flight, until accept() returns it: the
        # listener's, not yet the caller's (not in Frontend.sockets()).
        self._offered = False

        # _cond guards the socket's state flags below and is what waiters
        # sleep on; the event thread takes it (after releasing the command
        # ring lock) to wake them.  Lock order: _recv_lock / _send_lock /
        # _accept_lock, then the frontend's command lock, then _cond.  Never
        # call into the command ring while holding _cond.
        self._cond = threading.Condition(threading.Lock())
        # One receiver, one sender and one acceptor at a time, like the
        # kernel's socket lock; close() takes them to wait out copies from
        # the shared pages before unsharing them.
        self._recv_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._accept_lock = threading.Lock()

        # Passive socket state (under _cond).
        self._poll_inflight = False
        self._poll_ready = False
        self._poll_error = 0
        # accept() took the POLL's readiness and is sending its ACCEPT: no
        # POLL may go out meanwhile (a POLL and an ACCEPT in flight together
        # get the ACCEPT -EINTR from Linux's backend and ours).
        self._accepting = False
        self._armed = False  # fileno() asked for: keep a POLL in flight

        self._ready_set = False  # the level of _st.readyfd
        # Which callers (RECV, SEND) are polling the data ring's own event
        # channel handle (under _cond): whoever else consumes the ring's
        # event, or closes the socket, writes their wakefds to wake them.
        self._polling = [False, False]

        # Dropped unclosed, the socket is released as close() would, by the
        # frontend (see Frontend._collect), and says so with a
        # ResourceWarning, as socket.socket does.  close() detaches it.
        self._finalizer = weakref.finalize(self, frontend._collect, self._st)
        self._finalizer.atexit = False  # at exit the backend lets go of all

    # -- socket.socket API -------------------------------------------------

    def __repr__(self) -> str:
        return self._st.describe(closed=self._closed)

    def settimeout(self, value: float | None) -> None:
        """Like :meth:`socket.socket.settimeout`: ``None`` blocks, ``0``
        never blocks, a positive number of seconds bounds every call."""
        self._check_open()
        self._timeout = _timeout_value(value)

    def gettimeout(self) -> float | None:
        """The timeout in seconds, ``None`` if blocking, ``0.0`` if not."""
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        """``settimeout(None)`` if ``flag``, else ``settimeout(0.0)``."""
        self._check_open()
        # An integer, as socket.socket's: None or a string must not pass
        # as a truth value (setblocking(None) would make it non-blocking).
        self._timeout = None if operator.index(flag) else 0.0

    def getblocking(self) -> bool:
        """False in non-blocking mode (timeout 0.0), else True."""
        return self._timeout != 0.0

    def getsockname(self) -> tuple[str, int]:
        """The address given to :meth:`bind`, ``("0.0.0.0", 0)`` before:
        PV Calls does not tell the guest the address it got."""
        self._check_open()
        return self._sockname

    def getpeername(self) -> tuple[str, int]:
        """The address given to :meth:`connect` (``("0.0.0.0", 0)`` for an
        accepted socket); :class:`OSError` ENOTCONN if not connected."""
        self._check_open()
        if self._peername is None:
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        return self._peername

    def connect(self, address: tuple[str, int]) -> None:
        """Connect to ``address`` = (host, port) as seen from the backend
        domain; ``host`` is taken as :class:`socket.socket` takes it (a name
        is resolved here, IPv4 only).  Waits for the backend's answer,
        bounded by the timeout when one is set (also in non-blocking mode,
        which fails with :class:`BlockingIOError` only if the command ring
        has no room for the CONNECT)."""
        host, port = _resolve(address)
        self._check_open()
        self._check_unconnected()
        lock_deadline = _Deadline(self._timeout)
        lock_deadline.acquire(self._recv_lock)
        try:
            lock_deadline.acquire(self._send_lock)
        except BaseException:
            self._recv_lock.release()
            raise
        try:
            self._check_open()
            self._check_unconnected()
            ring = self._fe._new_data_ring(self)
            self._st.ring = ring
            sockaddr = pack_sockaddr_in(host, port)

            def fill(req: Any) -> None:
                req.u.connect.id = self.id
                ffi.memmove(req.u.connect.addr, sockaddr, len(sockaddr))
                req.u.connect.len = SOCKADDR_IN_LEN
                req.u.connect.flags = 0
                req.u.connect.ref = ring.ref
                req.u.connect.evtchn = ring.port

            try:
                # Non-blocking, no room on the command ring is EAGAIN (as
                # Linux's frontend says); the answer is waited for anyway.
                req_id, slot = self._fe._submit(PVCALLS_CONNECT, self.id, fill,
                                                _Deadline(self._timeout), sock=self)
            except BaseException:
                # Nothing went out (no room on the command ring in time, or
                # closed meanwhile): the ring is ours to free, and connect()
                # may be tried again.
                self._st.ring = None
                self._fe._put_data_ring(ring, reusable=True)
                raise
            deadline = _Deadline(self._timeout or None)
            try:
                # With the socket: close() must not wait (holding on to
                # this call's locks) for an answer the backend may never send.
                ret = self._fe._wait_slot(req_id, slot, deadline, self)
            except BaseException:
                self._fe._abandon(req_id, slot)
                # The answer still comes; nobody will read it.  Like Linux,
                # keep the ring until RELEASE.  Not only on a timeout: after
                # an interrupt (Ctrl-C in the main thread's wait) nobody
                # knows either whether the socket will be connected, and a
                # recv() on the ring would wait for data that may never come.
                # (Closed or frontend gone: only close() was left anyway.)
                self._broken = True
                raise
            if ret < 0:
                # The backend has let go of the ring and the id is a new
                # socket again (as in Linux's backend): free the ring, so
                # that connect() may be tried again.
                self._st.ring = None
                self._fe._put_data_ring(ring, reusable=True)
            if self._closed:
                # close() from another thread: its RELEASE may have cut the
                # CONNECT short (-EINTR), but what happened is EBADF.
                raise _bad_fd()
            if ret < 0:
                raise _host_error(ret, f"connect to {host}:{port}")
            self._peername = (host, port)
        finally:
            self._send_lock.release()
            self._recv_lock.release()

    def _check_unconnected(self) -> None:
        if self._st.ring is not None or self._st.listening or self._broken:
            raise OSError(errno.EISCONN, "socket is already connected or in use")

    def connect_ex(self, address: tuple[str, int]) -> int:
        """Like :meth:`connect` but return an errno instead of raising."""
        try:
            self.connect(address)
        except TimeoutError as exc:
            if exc.errno is not None:
                # The backend's ETIMEDOUT, not this call's timeout (which
                # has no errno, as socket.socket's).
                return exc.errno
            return errno.EAGAIN  # as socket.socket.connect_ex on a timeout
        except (socket.gaierror, socket.herror):
            # Resolving the name failed, not the connect: raised, as by
            # socket.socket's (a gaierror's errno is an EAI_* code).
            raise
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def bind(self, address: tuple[str, int]) -> None:
        """Bind to ``address`` in the backend domain (port 0 lets the
        backend's host pick one; PV Calls cannot tell the guest which)."""
        host, port = _resolve(address)
        self._check_open()
        if self._st.ring is not None or self._st.bound or self._broken:
            raise OSError(errno.EINVAL, "socket is already bound or connected")
        sockaddr = pack_sockaddr_in(host, port)

        def fill(req: Any) -> None:
            req.u.bind.id = self.id
            ffi.memmove(req.u.bind.addr, sockaddr, len(sockaddr))
            req.u.bind.len = SOCKADDR_IN_LEN

        ret = self._fe._call(PVCALLS_BIND, self.id, fill, _Deadline(self._fe.timeout))
        if ret < 0:
            raise _host_error(ret, f"bind to {host}:{port}")
        self._st.bound = True
        self._sockname = (host, port)

    def listen(self, backlog: int | None = None) -> None:
        """Start listening; ``backlog`` defaults to ``min(128, SOMAXCONN)``
        as in :meth:`socket.socket.listen`."""
        if backlog is None:
            backlog = min(128, socket.SOMAXCONN)
        # Checked as socket.socket checks it (a C int): int() would take
        # "5" and 1.5, and a backlog past 2**32 would be cut to its low bits.
        backlog = operator.index(backlog)
        if not _INT_MIN <= backlog <= _INT_MAX:
            raise OverflowError(f"backlog {backlog} does not fit a C int")
        backlog = max(0, backlog)  # as Linux's listen()
        self._check_open()
        if self._st.ring is not None or self._broken:
            # Connected (or connecting): EINVAL, as socket.socket's and as
            # bind() here.  Not the EOPNOTSUPP below, which asks for a
            # bind() that would be refused too.
            raise OSError(errno.EINVAL, "listen() on a connected socket")
        if not self._st.bound:
            # Linux's frontend: listen before bind is EOPNOTSUPP.
            raise OSError(errno.EOPNOTSUPP, "listen() needs bind() first over PV Calls")

        def fill(req: Any) -> None:
            req.u.listen.id = self.id
            req.u.listen.backlog = backlog

        ret = self._fe._call(PVCALLS_LISTEN, self.id, fill, _Deadline(self._fe.timeout))
        if ret < 0:
            raise _host_error(ret, "listen")
        self._st.listening = True
        if self._armed:
            self._arm_poll()

    def accept(self) -> tuple[PVSocket, tuple[str, int]]:
        """Wait for a connection: POLL until one is pending, then ACCEPT.

        Returns ``(socket, ("0.0.0.0", 0))``: PV Calls does not carry the
        peer address.  On timeout the POLL or ACCEPT stays in flight and the
        next call picks it up, so no connection is lost.
        """
        deadline = _Deadline(self._timeout)
        # Within the timeout, as socket.socket's: another thread may be
        # blocked in accept() with the lock.
        deadline.acquire(self._accept_lock)
        try:
            self._check_open()
            if not self._st.listening:
                raise OSError(errno.EINVAL, "accept() on a socket that is not listening")
            if self._st.accept_inflight is None:
                self._wait_pending_connection(deadline)
                self._start_accept(deadline)
            assert self._st.accept_inflight is not None
            req_id, slot, new = self._st.accept_inflight
            ret = self._fe._wait_slot(req_id, slot, deadline, self)
            self._st.accept_inflight = None
            if ret < 0:
                # The backend did not take the new id: free it without RELEASE.
                self._fe._drop_socket(new, reusable=True)
                raise _host_error(ret, "accept")
            new._peername = ("0.0.0.0", 0)
            new._timeout = socket.getdefaulttimeout()
            new._offered = False
        finally:
            self._accept_lock.release()
        if self._armed:
            self._arm_poll()
        self._update_ready()
        return new, ("0.0.0.0", 0)

    def _start_accept(self, deadline: _Deadline) -> None:
        """Send the ACCEPT for the connection a POLL said is pending (under
        _accept_lock, ``_accepting`` set), waiting for room on the command
        ring until ``deadline``.  If it cannot be sent, the connection is
        still pending: the next accept() takes it."""
        new = self._fe._new_socket(offered=True)
        try:
            ring = new._st.ring = self._fe._new_data_ring(new)

            def fill(req: Any) -> None:
                req.u.accept.id = self.id
                req.u.accept.id_new = new.id
                req.u.accept.ref = ring.ref
                req.u.accept.evtchn = ring.port

            req_id, slot = self._fe._submit(PVCALLS_ACCEPT, self.id, fill, deadline, sock=self)
        except BaseException:
            # Nothing went out: the new socket goes, without RELEASE.
            self._fe._drop_socket(new, reusable=True)
            with self._cond:
                self._accepting = False
                self._poll_ready = True
            self._update_ready()
            raise
        with self._cond:
            self._st.accept_inflight = (req_id, slot, new)
            self._accepting = False

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Copy as much of ``data`` as fits into the out ring (waiting for
        room, within the timeout) and return how many bytes were sent."""
        _check_flags(flags, "send")
        return self._send(_send_view(data), _Deadline(self._timeout))

    def _send(self, view: memoryview, deadline: _Deadline) -> int:
        if not self._send_lock.acquire(False):  # uncontended: no call more
            deadline.acquire(self._send_lock)
        try:
            ring = self._active_ring()
            while True:
                err = ring.out_error()
                if err:
                    raise _host_error(err, "send")
                if self._closed:
                    raise _bad_fd()
                # Our last out_prod store before reading out_cons: the
                # backend announces room only if it saw the ring full, and
                # one of us must see the other's store (see pvcalls._socket).
                _barrier.lib.xb_mb()
                parts = _checked(ring.outq.writable)
                if parts and len(view):
                    sent = 0
                    for part in parts:
                        n = min(len(part), len(view) - sent)
                        part[:n] = view[sent : sent + n]
                        sent += n
                        if sent == len(view):
                            break
                    ring.outq.produce(sent)
                    ring.notify()
                    return sent
                if not len(view):
                    return 0
                self._wait(SEND, deadline, lambda: ring.out_has_room() or bool(ring.out_error()))
        finally:
            self._send_lock.release()

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        """Send all of ``data``; the timeout bounds the whole call, as
        socket.socket's has since Python 3.5."""
        _check_flags(flags, "sendall")
        view = _send_view(data)
        deadline = _Deadline(self._timeout)
        # At least one _send(), as socket.socket's sendall() calls send()
        # once even for nothing: an empty ``data`` still fails on a closed
        # or unconnected socket and on the out ring's error.
        while True:
            n = self._send(view, deadline)
            view = view[n:]
            if not len(view):
                return

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Receive up to ``nbytes`` (default: ``len(buffer)``) into
        ``buffer``; returns 0 at end of stream."""
        _check_flags(flags, "recv")
        dst = memoryview(buffer).cast("B")
        if dst.readonly:
            raise TypeError("recv_into() argument 1 must be read-write bytes-like object, "
                            f"not {type(buffer).__name__}")
        # An integer, as socket.socket's: a float would pass the checks
        # below and wait for data before failing (or never, without a timeout).
        nbytes = operator.index(nbytes)
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes > len(dst):
            raise ValueError("buffer too small for requested bytes")
        if nbytes == 0:
            nbytes = len(dst)
        if nbytes == 0:
            # At once, as socket.socket's, even with another receiver blocked.
            self._active_ring()
            return 0
        deadline = _Deadline(self._timeout)
        if not self._recv_lock.acquire(False):  # uncontended: no call more
            deadline.acquire(self._recv_lock)
        try:
            ring = self._active_ring()
            while True:
                if self._closed:
                    raise _bad_fd()
                # The error first, then the data: the backend writes in_error
                # after its last byte, so data seen after the error is all
                # there is (Linux's __read_ring does the same).
                err = ring.in_error()
                _barrier.lib.xb_rmb()
                cons = _U32.unpack_from(ring.indexes, IN_CONS_OFFSET)[0]
                parts = _checked(ring.inq.readable)
                if parts:
                    got = 0
                    for part in parts:
                        n = min(len(part), nbytes - got)
                        dst[got : got + n] = part[:n]
                        got += n
                        if got == nbytes:
                            break
                    ring.inq.consume(got)
                    # The backend waits for our consume only when the ring
                    # was full (Linux's backend stops reading its socket
                    # then, ours too), so only then is it notified.  Whether
                    # it was is read after our in_cons store and a full
                    # barrier; the backend stores in_prod, then (its notify
                    # at the latest) a barrier, then reads in_cons: one of
                    # us sees the other's store, so a backend that found
                    # the ring full gets this notify.  Linux's frontend
                    # notifies after every consume; a 64-byte reply costs
                    # the backend no wake-up here.
                    if ring.in_was_full(cons):
                        ring.notify()
                    self._update_ready()
                    return got
                if err == -_errno.ENOTCONN:
                    return 0  # orderly shutdown by the peer
                if err:
                    raise _host_error(err, "recv")
                self._wait(RECV, deadline, lambda: ring.in_pending() or bool(ring.in_error()))
        finally:
            self._recv_lock.release()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Receive up to ``bufsize`` bytes; ``b""`` at end of stream."""
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        buf = bytearray(bufsize)
        n = self.recv_into(buf, bufsize, flags)
        del buf[n:]
        return bytes(buf)

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """A file object on the socket, exactly as :meth:`socket.socket.makefile`
        (modes r, w, b).  As there, :meth:`close` does not wait for the
        files: it returns at once, and the socket is released when the last
        of them is closed."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing = "w" in mode
        reading = "r" in mode or not writing
        binary = "b" in mode
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        raw = socket.SocketIO(self, rawmode)  # type: ignore[arg-type]
        self._io_refs += 1
        if buffering is None or buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: Any
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if binary:
            return buffer
        text = io.TextIOWrapper(buffer, io.text_encoding(encoding), errors, newline)
        text.mode = mode  # type: ignore[misc]
        return text

    def _decref_socketios(self) -> None:
        # Called by socket.SocketIO.close().
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._close_requested and self._io_refs <= 0:
            self._real_close()

    def fileno(self) -> int:
        """An eventfd readable while recv()/accept() would not block.

        Not a socket descriptor: use it with select/poll/selectors only.  On
        a listening socket the first call starts keeping a POLL in flight, as
        a Linux program's ``poll()`` does.  -1 once closed, as socket.socket
        (selectors then find a closed socket by the object instead).
        """
        if self._closed:
            return -1
        with self._cond:
            # Again under _cond: a close() since the check above took
            # _readyfd under it, and would not see a descriptor made now.
            if self._closed:
                return -1
            if self._st.readyfd is None:
                self._st.readyfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._ready_set = False
            fd = self._st.readyfd
            arm = not self._armed
            self._armed = True
            ring = self._st.ring
        if ring is not None:
            self._fe._relay(ring, self._st)
        if arm and self._st.listening:
            self._arm_poll()
        self._update_ready()
        return fd

    def close(self) -> None:
        """Release the socket (RELEASE) and free its shared pages.  Other
        threads blocked in this socket's calls get ``OSError(EBADF)``.
        What was sent still reaches the peer with this package's backend,
        which sends the out ring's last bytes before it closes its host
        socket (Linux's backend drops them).

        While files from :meth:`makefile` are open, the release waits for
        the last of them to close, as with :class:`socket.socket`.  A
        socket dropped unclosed is released all the same, with a
        :class:`ResourceWarning` (see the class)."""
        self._close_requested = True
        if self._io_refs <= 0:
            self._real_close()

    def shutdown(self, how: int) -> None:
        """Not in PV Calls: the protocol can only release a whole socket."""
        self._check_open()
        raise OSError(errno.EOPNOTSUPP, "PV Calls has no shutdown; close() releases the socket")

    def detach(self) -> int:
        """Not possible: :class:`OSError` EOPNOTSUPP, as the socket has no
        descriptor of its own."""
        raise OSError(errno.EOPNOTSUPP, "a PV Calls socket has no descriptor to detach")

    @property
    def closed(self) -> bool:
        """True once the socket is released."""
        return self._closed

    # -- internals ---------------------------------------------------------

    def _real_close(self) -> None:
        # Tested and set under _cond: of two threads closing at once, only
        # one may send the RELEASE.
        with self._cond:
            if self._closed:
                return
            self._closed = True
        # Released here: not again by the finaliser, and a closed socket
        # the program drops is no warning.
        self._finalizer.detach()
        # Wake this socket's waiters (on its data, or on an answer to its
        # ACCEPT): they see _closed and leave with EBADF.
        with self._fe._cmd_cond:
            self._fe._cmd_cond.notify_all()
        self._on_event()
        self._fe._release(self._st, self)

    def _check_open(self) -> None:
        if self._closed:
            raise _bad_fd()

    def _active_ring(self) -> _DataRing:
        self._check_open()
        ring = self._st.ring
        if ring is None or self._broken or self._st.listening:
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        return ring

    def _wait(self, side: int, deadline: _Deadline, ready: Callable[[], bool]) -> None:
        """Sleep until ``ready()``, the socket closes, or the deadline.

        ``side`` is the caller, RECV or SEND.  With a data ring of its own
        handle, both may block at once (a reader and a writer thread), and
        each polls the handle's descriptor itself with its own wakefd: the
        backend's notify wakes both in parallel, and the one it was for goes
        on without waiting for the other to wake it.  Whoever takes the
        event (one call only gets it) writes the wakefd of the other side if
        that one is polling, since the event may have been its.  Otherwise
        (the shared handle) the event thread notifies ``_cond``.  Either way
        ``ready`` is checked under ``_cond`` as the caller says it polls or
        sleeps, and every consumer of the event looks, under ``_cond``, who
        polls or sleeps after taking it, so no wake-up is lost.
        """
        if deadline.timeout == 0.0:
            if self._fe._dead and not ready():
                raise self._fe._gone()
            raise BlockingIOError(errno.EAGAIN, "operation would block")
        ring = self._st.ring
        polling = self._polling
        with self._cond:
            while not ready() and not self._closed and not self._fe._dead:
                timeout = deadline.nap()
                if ring is None or not ring.direct:
                    self._cond.wait(timeout)
                    continue
                polling[side] = True
                # Each release() opens its try: CPython may run a signal's
                # handler as release() returns, and the KeyboardInterrupt it
                # raises (Ctrl-C in the main thread) must find the lock taken
                # again, or the with block's exit fails to release it, with
                # a RuntimeError that hides the interrupt.  (Not before
                # release(), the try's first call: CPython runs a handler
                # only as a Python function starts, as a call returns, or
                # as a loop goes round, and release() is a C function.)
                try:
                    self._cond.release()
                    fired = self._poll_ring(ring, side, timeout)
                finally:
                    self._cond.acquire()
                    polling[side] = False
                if fired:
                    other = side ^ 1
                    if polling[other]:
                        os.eventfd_write(ring.wakefds[other], 1)
                    if self._st.readyfd is not None:
                        try:
                            self._cond.release()
                            self._update_ready()
                        finally:
                            self._cond.acquire()
        if self._fe._dead and not ready():
            raise self._fe._gone()

    @staticmethod
    def _poll_ring(ring: _DataRing, side: int, timeout: float | None) -> bool:
        """Block on ``ring``'s own handle (or ``side``'s wakefd) for up to
        ``timeout`` seconds; take the event if there is one."""
        ms = None if timeout is None else max(1, int(timeout * 1000 + 0.999))
        wakefd = ring.wakefds[side]
        try:
            events = ring.pollers[side].poll(ms)
        except InterruptedError:
            return False
        for fd, _ in events:
            if fd == wakefd:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
        try:
            return ring.consume_events()
        except OSError:
            return False  # the handle is closing: the caller sees why

    def _on_event(self) -> None:
        """The backend signalled this socket's channel (the event thread
        took the event), or the socket closes: wake the waiters."""
        with self._cond:
            self._cond.notify_all()
            # Under _cond: a poller clears its flag under it before it
            # leaves the call that keeps the ring (and wakefds) alive.
            ring = self._st.ring
            if ring is not None:
                for side in (RECV, SEND):
                    if self._polling[side]:
                        os.eventfd_write(ring.wakefds[side], 1)
        if self._st.readyfd is not None:
            self._update_ready()

    def _readable(self) -> bool:
        ring = self._st.ring
        if self._closed or self._fe._dead:
            return True  # the call fails at once
        if ring is not None and not self._st.listening:
            return ring.in_pending() or bool(ring.in_error())
        # An ACCEPT left in flight by a non-blocking or timed-out accept()
        # and since answered: the next accept() returns at once.
        inflight = self._st.accept_inflight
        return (self._poll_ready or bool(self._poll_error)
                or (inflight is not None and inflight[1].done))

    def _update_ready(self) -> None:
        """Make the eventfd's level match :meth:`_readable`."""
        with self._cond:
            fd = self._st.readyfd
            if fd is None:
                return
            want = self._readable()
            if want and not self._ready_set:
                os.eventfd_write(fd, 1)
                self._ready_set = True
            elif not want and self._ready_set:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
                self._ready_set = False

    def _arm_poll(self, deadline: _Deadline | None = None) -> None:
        """Send a POLL unless one is in flight, an ACCEPT is in flight, or a
        connection is already known to be pending.  ``deadline`` bounds the
        wait for room on the command ring (default: none; close() ends it)."""
        with self._cond:
            # An error accept() has not reported yet is the POLL's outcome
            # until it has (fileno() said accept() would not block): no new
            # POLL, and the error is not wiped.
            if (self._poll_inflight or self._poll_ready or self._poll_error
                    or self._st.accept_inflight or self._accepting):
                return
            if self._closed:
                return
            self._poll_inflight = True

        def fill(req: Any) -> None:
            req.u.poll.id = self.id

        try:
            self._fe._submit(PVCALLS_POLL, self.id, fill,
                             _Deadline(None) if deadline is None else deadline,
                             reserve=False, sock=self)
        except BaseException as exc:
            with self._cond:
                self._poll_inflight = False
            if isinstance(exc, OSError) and exc.errno == errno.EBADF and self._closed:
                return  # closed while it waited for room: no POLL wanted
            raise

    def _on_poll(self, ret: int) -> None:
        """Event thread: the backend answered this socket's POLL."""
        with self._cond:
            self._poll_inflight = False
            if ret == 0:
                self._poll_ready = True
            else:
                self._poll_error = ret
            self._cond.notify_all()
        self._update_ready()

    def _wait_pending_connection(self, deadline: _Deadline) -> None:
        """POLL (unless in flight) and wait until it says a connection is
        pending; consume that readiness (Linux's POLL_RET bit)."""
        while True:
            self._arm_poll(deadline)
            with self._cond:
                err, self._poll_error = self._poll_error, 0
                if not err:
                    if self._poll_ready:
                        self._poll_ready = False
                        self._accepting = True
                        break
                    if deadline.timeout == 0.0:
                        if self._fe._dead:
                            raise self._fe._gone()
                        raise BlockingIOError(errno.EAGAIN, "no connection pending")
                    while (not self._poll_ready and not self._poll_error
                           and not self._closed and not self._fe._dead):
                        self._cond.wait(deadline.nap())
                    if self._closed:
                        raise _bad_fd()
                    if self._fe._dead:
                        raise self._fe._gone()
                    continue
            # Reported once; fileno() needs a POLL in flight again.
            if self._armed:
                self._arm_poll()
            self._update_ready()
            raise _host_error(err, "accept (poll)")
        self._update_ready()


class _Wakeup:
    """The eventfd that wakes a frontend's event thread: to stop it, or to
    have it release sockets dropped unclosed (see :meth:`Frontend._collect`).

    A finaliser may write it at any moment, in any thread, with no lock to
    keep the frontend from closing meanwhile.  So it is closed only once
    nobody holds this object any more, which CPython does the moment the
    last reference goes: whoever still holds it cannot write into a
    descriptor number the process has reused since.
    """

    __slots__ = ("fd", "__weakref__")

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        weakref.finalize(self, os.close, self.fd)

    def set(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass  # the counter is at its maximum: set anyway

    def clear(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass


class Frontend(Closing):
    """The ``pvcalls`` frontend of one guest domain.

    ``domain`` is the guest's :class:`~xenback.platform.Platform` with a
    ``toolstack`` (a :class:`xenback.sim.Domain`, also one joined with
    :func:`xenback.sim.attach`).  Entering the ``with`` block adds the device
    through the toolstack and connects; leaving it releases every socket,
    closes the device and removes it.
    """

    def __init__(
        self,
        domain: Any,
        *,
        backend_id: int = 0,
        devid: int = 0,
        timeout: float = 10.0,
        ring_order: int = FRONTEND_RING_ORDER,
    ) -> None:
        """``timeout`` bounds every handshake step and every command the
        backend should answer at once (SOCKET, BIND, LISTEN, RELEASE).

        ``ring_order``: every active socket's data ring has ``2**ring_order``
        pages, half of them each way.  The default 4 is Linux's, and with it
        the frontend behaves exactly as Linux's; a larger order (up to the
        backend's ``max-page-order``, checked at the handshake) means fewer
        notifications and wake-ups per megabyte.
        """
        # All checked here, not at open(): there the toolstack refused a
        # wrong type as a ValueError, and a domain that is none failed as a
        # missing attribute.
        if not isinstance(domain, Platform) or not hasattr(domain, "toolstack"):
            raise TypeError("domain must be a guest's Platform with a toolstack "
                            f"(a xenback.sim.Domain), not {type(domain).__name__}")
        for name, value in (("backend_id", backend_id), ("devid", devid)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if not 0 <= backend_id < _DOMID_FIRST_RESERVED:
            raise ValueError(f"backend_id must be a domain id (0 to {_DOMID_FIRST_RESERVED - 1}), "
                             f"got {backend_id}")
        if devid < 0:
            raise ValueError(f"devid must be at least 0, got {devid}")
        if isinstance(ring_order, bool) or not isinstance(ring_order, int):
            raise TypeError(f"ring_order must be an int, not {type(ring_order).__name__}")
        if not 1 <= ring_order <= MAX_PAGE_ORDER_LIMIT:
            raise ValueError(f"ring_order must be 1..{MAX_PAGE_ORDER_LIMIT}, got {ring_order}")
        # Here, not at open(): there None or a string failed deep inside,
        # and 0 or less made the handshake "time out" at once, blaming the
        # backend (and 0 would make every command non-blocking).
        if timeout is None:
            raise TypeError("timeout must be a number of seconds, not NoneType")
        try:
            checked = _timeout_value(timeout)  # as settimeout() checks it
        except ValueError:  # negative or NaN: said below, as 0 is
            checked = 0.0
        if not checked:
            raise ValueError(f"timeout must be more than 0 seconds, got {timeout}")
        self.ring_order = ring_order
        self.domain = domain
        self.backend_id = backend_id
        self.devid = devid
        self.timeout = checked
        self.device: Any = None
        self._toolstack: Any = None
        self._xs: XenStore | None = None
        # The watch on the backend's state once Connected, and the lock that
        # its callback holds while it acts (close() takes it to know that no
        # callback is acting any more, or will).
        self._backend_watch: Watch | None = None
        self._watch_lock = threading.Lock()
        self._gntshr: GrantShare | None = None
        self._evtchn: EventChannel | None = None
        self._cmd_pages: SharedPages | None = None
        self._ring: FrontRing | None = None
        self._port = -1
        # The ring-ref and port this frontend published for its device (None
        # until it has): what tells, at close(), whether the device is still
        # its own or was added again for another frontend since.
        self._published: tuple[str, str] | None = None
        self._ids = itertools.count()

        # _lock guards the command ring's producer side (the ring, the
        # private producer index), the response table, the id -> socket
        # state and port -> handler maps and _reaper; waiters for responses
        # and for free slots sleep on _cmd_cond.  The event thread holds it
        # while consuming responses but runs socket callbacks after
        # releasing it.
        self._lock = threading.Lock()
        self._cmd_cond = threading.Condition(self._lock)
        self._req_prod_pvt = 0
        self._slots: list[_Slot | None] = [None] * RING_SLOTS
        # The backend published an impossible rsp_prod: the ring is dead.
        self._ring_broken = False
        # Every socket not yet released, by id: its state, which refers to
        # the PVSocket only weakly (see _SocketState).
        self._sockets: dict[int, _SocketState] = {}
        # The states of sockets dropped unclosed, for the reaper thread to
        # release.  Their finalisers append to it with no lock (they take
        # none, see _collect): a deque's append and popleft are atomic.
        self._dropped: collections.deque[_SocketState] = collections.deque()
        # The reaper thread while it runs (under _lock): the event thread
        # starts it when _dropped has states, it ends once it is empty.
        self._reaper: threading.Thread | None = None
        self._handlers: dict[int, Callable[[], None]] = {}
        # The event thread's epoll set: the shared handle, the stop pipe and
        # the own handles of rings being relayed (descriptor -> callback).
        self._event_epoll: select.epoll | None = None
        self._relays: dict[int, Callable[[], None]] = {}
        # Data rings the backend let go of, kept for the next sockets: a
        # connect then costs no page sharing and no event channel set-up.
        self._ring_pool: list[_DataRing] = []
        # RELEASEs in flight, until answered and finished (_release).
        self._releases: set[_Release] = set()

        self._thread: threading.Thread | None = None
        self._wakeup: _Wakeup | None = None  # the event thread's, while it runs
        self._stopping = False
        # Set once the backend is gone (its state left Connected), the
        # XenStore connection is lost or the frontend closes: every waiter
        # gives up with ENOTCONN and _why_dead.
        self._dead = False
        self._why_dead = ""  # set with _dead, by _die()
        # Why XenStore dropped the connection; None while it is up.
        self._xs_lost: str | None = None
        self._connected = False

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> Self:
        self.open()
        return self

    def open(self) -> None:
        """Add the device and do the frontend handshake (up to Connected)."""
        if self.device is not None:
            raise RuntimeError("frontend already open")
        # What an interrupted close() left (its thread, its handles) goes
        # first: the new connection's would take their places.
        self._release_handles()
        self._reset_connection()
        domain = self.domain
        self._toolstack = domain.toolstack
        self.device = self._toolstack.add_device(
            "pvcalls", frontend_id=domain.domid, backend_id=self.backend_id, devid=self.devid
        )
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _reset_connection(self) -> None:
        """Forget the last connection's end: a close(), also the one that a
        failed open() does, leaves the frontend dead (every call fails), and
        an open() after it (a retry once the backend runs) starts afresh.
        Socket ids go on counting: one frontend never reuses them."""
        self._dead = False
        self._why_dead = ""
        self._xs_lost = None
        self._ring_broken = False
        self._req_prod_pvt = 0
        self._slots = [None] * RING_SLOTS
        self._handlers.clear()
        self._dropped.clear()  # released by the close() before
        self._port = -1
        self._published = None

    def _connect(self) -> None:
        domain = self.domain
        fe_path = self.device.frontend_path
        be_path = self.device.backend_path
        self._xs = XenStore(domain.xenstore(), on_lost=self._lost_xenstore)
        self._xs.open()

        state = self._wait_backend(
            lambda s: s >= XenbusState.INIT_WAIT,
            f"InitWait (is a pvcalls backend serving domain {self.backend_id}?)",
        )
        if state != XenbusState.INIT_WAIT:
            raise OSError(errno.EPROTO, f"backend went to state {state} instead of InitWait")
        versions = self._xs.read(f"{be_path}/versions")
        if PVCALLS_VERSIONS not in (versions or "").split(","):
            raise OSError(errno.EPROTONOSUPPORT, f"backend offers versions {versions!r}, need 1")
        order = self._xs.read(f"{be_path}/max-page-order")
        # ASCII digits only: str.isdigit() takes others ("\u00b2") that int()
        # refuses with a ValueError.  ascii(): the value is the backend's.
        if (order is None or not (order.isascii() and order.isdigit())
                or int(order) < self.ring_order):
            raise OSError(
                errno.EPROTONOSUPPORT,
                f"backend max-page-order {ascii(order)} is below the ring order {self.ring_order}",
            )
        if self._xs.read(f"{be_path}/function-calls") != "1":
            raise OSError(errno.EPROTONOSUPPORT, "backend does not offer function-calls 1")

        self._gntshr = domain.gntshr()
        self._evtchn = domain.evtchn()
        self._cmd_pages = self._gntshr.share_pages(self.backend_id, 1)
        self._ring = FrontRing(self._cmd_pages.buffer, SLOT_SIZE, init=True)
        self._port = self._evtchn.bind_unbound_port(self.backend_id)
        self._handlers[self._port] = self._on_command_event

        self._wakeup = _Wakeup()
        self._event_epoll = select.epoll()
        self._event_epoll.register(self._evtchn.fileno(), select.EPOLLIN)
        self._event_epoll.register(self._wakeup.fd, select.EPOLLIN)
        # Every close() stops the thread, also one before open() (when
        # there is none): the flag it left must not stop this one at once.
        self._stopping = False
        self._thread = threading.Thread(
            target=self._event_loop, name=f"pvcalls-front-{domain.domid}", daemon=True
        )
        self._thread.start()

        self._published = (str(self._cmd_pages.refs[0]), str(self._port))
        self._write_nodes(
            fe_path,
            {
                "version": PVCALLS_VERSIONS,
                "ring-ref": self._published[0],
                "port": self._published[1],
                "state": str(XenbusState.INITIALISED.value),
            },
        )
        state = self._wait_backend(lambda s: s >= XenbusState.CONNECTED, "Connected")
        if state != XenbusState.CONNECTED:
            raise OSError(errno.ECONNREFUSED, f"backend went to state {state} instead of Connected")
        self._write_nodes(fe_path, {"state": str(XenbusState.CONNECTED.value)})
        self._connected = True
        self._backend_watch = self._xs.watch(f"{be_path}/state", self._on_backend_state)
        logger.info("pvcalls frontend of domain %d connected", domain.domid)

    def _on_backend_state(self, _path: str) -> None:
        """XenStore's watch thread, on a change of the backend's state once
        Connected: if the backend left Connected (it closed, or the device
        was removed), fail every waiter with ENOTCONN instead of letting it
        wait for answers that never come; as Linux's frontend, go Closed."""
        with self._watch_lock:
            if self._backend_watch is None or self._dead:
                return  # close() is under way, or it is over already
            try:
                state = self._backend_state()
            except ConnectionError:
                return  # _lost_xenstore fails the waiters, and says why
            except OSError as exc:
                # Not ours to read any more (the simulated host destroyed
                # our domain, say): for us the backend is gone as surely.
                logger.debug("reading the backend's state: %s", exc)
                state = XenbusState.UNKNOWN
            if state == XenbusState.CONNECTED:
                return
            # Info: every call of ours says so now, with ENOTCONN.
            logger.info("pvcalls backend of domain %d went to state %d: disconnecting",
                        self.domain.domid, state)
            self._die("the PV Calls backend went away")
            self._wake_everyone()
            try:
                self._write_own_nodes({"state": str(XenbusState.CLOSED.value)})
            except OSError as exc:
                logger.debug("frontend Closed after the backend left: %s", exc)

    def _lost_xenstore(self, exc: Exception) -> None:
        """pyxs's router thread, when XenStore ended the connection: the
        host (or its XenStore) is gone and with it the backend: fail every
        waiter.  A handshake waiting for the backend fails too, as
        :meth:`XenStore.wait_for` does when the connection goes."""
        self._xs_lost = str(exc) or type(exc).__name__
        logger.info("domain %d lost its XenStore connection: %s",
                    self.domain.domid, self._xs_lost)
        if self._die(_LOST_XENSTORE):
            self._wake_everyone()

    def _die(self, why: str) -> bool:
        """From now on every call fails with ENOTCONN and ``why``; the
        first reason given stays.  Whether the frontend was alive."""
        if self._dead:
            return False
        self._why_dead = why
        self._dead = True
        return True

    def _gone(self) -> OSError:
        """The error of a call that can no longer be answered."""
        return OSError(errno.ENOTCONN, self._why_dead)

    def close(self) -> None:
        """Release every socket (also those dropped unclosed whose release
        has not gone out yet), go Closing then Closed, remove the device
        and free the command ring.

        Idempotent, and a close() interrupted in one of its waits (Ctrl-C in
        the main thread) is finished by the next one: that one closes and
        removes the device again unless it is gone already, then stops the
        frontend's own thread and closes the handles that are left.
        """
        if self.device is not None:
            self._close_device()
        self._release_handles()

    def _close_device(self) -> None:
        if self._backend_watch is not None:
            with self._watch_lock:
                watch, self._backend_watch = self._backend_watch, None
            try:
                watch.unwatch()
            except OSError as exc:  # XenStore is gone: so is the watch
                logger.debug("removing the backend state watch: %s", exc)
        self._release_sockets()
        self._wait_releases()
        self._die("the PV Calls frontend is closed")
        self._wake_everyone()
        # Again, dead now: a socket another thread made meanwhile (after
        # the look above) is freed too, with no RELEASE.  Not left to its
        # finaliser: with the event thread gone nobody would release it,
        # and open() forgets the queue of dropped sockets.  Any socket made
        # later finds the frontend dead before its SOCKET goes out.
        self._release_sockets()
        with self._lock:
            pool, self._ring_pool = self._ring_pool, []
        for ring in pool:
            ring.free()
        owned = self._owns_device()
        if not owned:
            # A frontend opened after this one died added the device again
            # (it is that one's now), or the host removed it: only this
            # one's own resources go.
            logger.info("pvcalls device %d of domain %d is no longer this frontend's "
                        "(added again, or removed): leaving it alone",
                        self.devid, self.domain.domid)
        elif self._xs is not None and self._connected and self._xs_lost is None:
            try:
                owned = self._write_own_nodes({"state": str(XenbusState.CLOSING.value)})
                if owned:
                    self._wait_backend(
                        lambda s: s >= XenbusState.CLOSING or s == XenbusState.UNKNOWN, "Closing"
                    )
                    owned = self._write_own_nodes({"state": str(XenbusState.CLOSED.value)})
            except (OSError, TimeoutError) as exc:
                logger.warning("closing frontend of domain %d: %s", self.domain.domid, exc)
        # A backend that never connected may not be there at all: do not
        # wait the full timeout for it to close.
        wait = self.timeout if self._connected else min(self.timeout, 2.0)
        was_connected, self._connected = self._connected, False
        if owned and self._xs_lost is None:
            try:
                if not was_connected and self._backend_state() in (
                        XenbusState.UNKNOWN, XenbusState.INITIALISING):
                    # No backend ever took the device up (none runs, say):
                    # there is nobody to ask to close, or to wait for.
                    self._toolstack.destroy_device(self.device)
                else:
                    self._toolstack.remove_device(self.device, timeout=wait)
            except Exception as exc:
                logger.warning("removing pvcalls device of domain %d: %s", self.domain.domid, exc)
        elif owned:
            # The toolstack works through the same XenStore: with it gone,
            # so is (most likely) the whole host and the device with it.
            logger.info("not removing pvcalls device of domain %d: XenStore is gone",
                        self.domain.domid)
        close_toolstack = getattr(self._toolstack, "close", None)
        if close_toolstack is not None:
            close_toolstack()
        self.device = self._toolstack = None

    def _owns_device(self) -> bool:
        """Whether the device's frontend directory still holds the ring-ref
        and port this frontend published: once dead, it may have been added
        again for another frontend, whose device close() must not touch (or
        removed by the host, as for a dying domain: nothing left to do).
        True when it cannot tell (nothing published yet, or XenStore is
        gone, and with it the host)."""
        if self._published is None or self._xs is None or self._xs_lost is not None:
            return True
        fe_path = self.device.frontend_path
        try:
            nodes = (self._xs.read(f"{fe_path}/ring-ref"), self._xs.read(f"{fe_path}/port"))
        except OSError as exc:
            logger.debug("reading the frontend nodes of domain %d: %s", self.domain.domid, exc)
            return True
        return nodes == self._published

    def _release_sockets(self) -> None:
        """Release every socket in the table (for close())."""
        with self._lock:
            states = list(self._sockets.values())
        for st in states:
            sock = st.owner()
            if sock is not None and sock._offered:
                # The id_new of an ACCEPT in flight (or answered, not yet
                # taken): its listener's RELEASE, here or in flight, ends
                # it (see _finish_release).  A RELEASE of its own would
                # come after the listener's, find the id gone (EBADF), or
                # cancel the ACCEPT that the listener's handling expects.
                continue
            try:
                if sock is None:
                    # Dropped unclosed, and the reaper has not come to it.
                    self._release(st)
                else:
                    # Not close(): a makefile() stream left open must not
                    # keep the socket (its ring, its event channel) past
                    # the device.
                    sock._close_requested = True
                    sock._real_close()
            except OSError as exc:
                logger.warning("releasing socket %#x: %s", st.id, exc)

    def _release_handles(self) -> None:
        self._stop_thread()
        if self._evtchn is not None:
            if self._port >= 0:
                try:
                    self._evtchn.unbind(self._port)
                except OSError as exc:  # the host is gone, and the port with it
                    logger.debug("unbinding port %d: %s", self._port, exc)
            self._evtchn.close()
            self._evtchn = None
        if self._ring is not None:
            self._ring.release()
            self._ring = None
        if self._cmd_pages is not None:
            self._cmd_pages.unshare()
            self._cmd_pages = None
        if self._gntshr is not None:
            self._gntshr.close()
            self._gntshr = None
        if self._xs is not None:
            self._xs.close()
            self._xs = None

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> PVSocket:
        """A new socket (sends SOCKET).  Only AF_INET / SOCK_STREAM exist in
        PV Calls."""
        if family != socket.AF_INET or type != socket.SOCK_STREAM or proto not in (0, 6):
            raise OSError(errno.EAFNOSUPPORT, "PV Calls only carries AF_INET SOCK_STREAM sockets")
        if not self._connected:
            raise OSError(errno.ENOTCONN, "frontend is not connected")
        sock = self._new_socket()

        def fill(req: Any) -> None:
            req.u.socket.id = sock.id
            req.u.socket.domain = AF_INET
            req.u.socket.type = SOCK_STREAM
            req.u.socket.protocol = 0

        def late(ret: int) -> None:
            # The SOCKET the caller gave up on (timeout, Ctrl-C) was
            # answered after all: a socket the backend made for nobody
            # would count against the domain's limit until the frontend
            # goes, so it is released.
            if ret == 0:
                self._release(sock._st, sock)

        try:
            ret = self._call(PVCALLS_SOCKET, sock.id, fill, _Deadline(self.timeout),
                             on_late=late)
        except BaseException:
            self._forget(sock)
            raise
        if ret < 0:
            self._forget(sock)
            raise _host_error(ret, "socket")
        return sock

    def sockets(self) -> list[PVSocket]:
        """The sockets not yet closed (not those an ACCEPT in flight offers
        the backend: no caller has them yet)."""
        with self._lock:
            socks = [st.owner() for st in self._sockets.values()]
        return [sock for sock in socks if sock is not None and not sock._offered]

    # -- XenStore ------------------------------------------------------------

    def _write_nodes(self, base: str, nodes: dict[str, str]) -> None:
        """Write ``nodes`` under ``base`` in one transaction."""
        assert self._xs is not None

        def write(t: Transaction) -> None:
            for key, value in nodes.items():
                t.write(f"{base}/{key}", value)

        self._xs.transaction(write)

    def _write_own_nodes(self, nodes: dict[str, str]) -> bool:
        """Write ``nodes`` under the frontend directory in one transaction,
        as :meth:`_write_nodes`, if it still holds what this frontend
        published (see :meth:`_owns_device`): checked in the transaction,
        so that a frontend adding the device again meanwhile is not
        overwritten.  Whether it wrote them."""
        assert self._xs is not None
        base = self.device.frontend_path
        published = self._published

        def write(t: Transaction) -> bool:
            if published is not None and (
                    t.read(f"{base}/ring-ref"), t.read(f"{base}/port")) != published:
                return False
            for key, value in nodes.items():
                t.write(f"{base}/{key}", value)
            return True

        return self._xs.transaction(write)

    def _backend_state(self) -> XenbusState:
        assert self._xs is not None
        return _state(self._xs.read(f"{self.device.backend_path}/state"))

    def _wait_backend(self, done: Callable[[XenbusState], bool], what: str) -> XenbusState:
        """Wait until the backend's state satisfies ``done``; return it."""
        assert self._xs is not None
        path = f"{self.device.backend_path}/state"
        try:
            return _state(self._xs.wait_for(path, lambda v: done(_state(v)), timeout=self.timeout))
        except TimeoutError:
            state = self._backend_state()
            raise TimeoutError(
                f"backend {self.device.backend_path} did not reach {what} "
                f"within {self.timeout} s (state {state.value})"
            ) from None

    # -- event channel -------------------------------------------------------

    def _notify(self, port: int) -> None:
        evtchn = self._evtchn
        if evtchn is None:
            raise OSError(errno.ENOTCONN, "frontend is closed")
        evtchn.notify(port)

    def _event_loop(self) -> None:
        """One thread per frontend: read fired ports, run their handlers,
        unmask.  Handlers only copy responses and wake waiters.  Also runs
        the relays of rings with handles of their own (see :meth:`_relay`),
        and starts the reaper when sockets were dropped (see :meth:`_collect`)."""
        evtchn = self._evtchn
        epoll = self._event_epoll
        wakeup = self._wakeup
        assert evtchn is not None and epoll is not None and wakeup is not None
        shared_fd = evtchn.fileno()
        while not self._stopping:
            try:
                events = epoll.poll()
            except InterruptedError:
                continue
            relays = []
            woken = False
            with self._lock:
                for fd, _ in events:
                    relay = self._relays.get(fd)
                    if relay is not None:
                        relays.append(relay)
                    woken = woken or fd == wakeup.fd
            if woken:
                # Cleared before looking: a finaliser appends, then sets.
                wakeup.clear()
                self._start_reaper()
            for relay in relays:
                try:
                    relay()
                except Exception:
                    logger.exception("pvcalls frontend relay")
            if not any(fd == shared_fd for fd, _ in events):
                continue
            while True:
                try:
                    port = evtchn.pending()
                except OSError as exc:
                    if self._stopping:
                        return
                    logger.error("event channel failed: %s", exc)
                    return
                if port is None:
                    break
                handler = self._handlers.get(port)
                try:
                    if handler is not None:
                        handler()
                except Exception:
                    logger.exception("pvcalls frontend event handler for port %d", port)
                finally:
                    try:
                        evtchn.unmask(port)
                    except OSError:
                        pass  # unbound meanwhile

    def _stop_thread(self) -> None:
        """Stop the event thread, then wait for the reaper: it frees what
        it releases with the handles that are closed next."""
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()
        deadline = _Deadline(10.0)
        with self._lock:
            reaper = self._reaper
        for thread in (self._thread, reaper):
            if thread is None or thread is threading.current_thread():
                continue
            try:
                while thread.is_alive():
                    thread.join(deadline.nap())
            except TimeoutError:
                logger.warning("%s of domain %d did not stop", thread.name, self.domain.domid)
        self._thread = None
        with self._lock:
            epoll, self._event_epoll = self._event_epoll, None
            self._relays.clear()
        if epoll is not None:
            epoll.close()
        # Closed once a finaliser that read it is done with it (see _Wakeup).
        self._wakeup = None

    def _wake_everyone(self) -> None:
        with self._cmd_cond:
            self._cmd_cond.notify_all()
        for st in list(self._sockets.values()):
            sock = st.owner()
            if sock is not None:
                sock._on_event()

    # -- command ring ----------------------------------------------------------

    def _new_socket(self, *, offered: bool = False) -> PVSocket:
        sock_id = _ID_BASE + _ID_STRIDE * next(self._ids)
        sock = PVSocket(self, sock_id)
        sock._offered = offered
        with self._lock:
            self._sockets[sock_id] = sock._st
        return sock

    def _forget(self, sock: PVSocket) -> None:
        sock._closed = True
        sock._finalizer.detach()  # nothing left to release
        with self._lock:
            self._sockets.pop(sock.id, None)

    def _new_data_ring(self, sock: PVSocket) -> _DataRing:
        """A data ring for ``sock``: a recycled one if the pool has one."""
        if self._gntshr is None or self._evtchn is None:
            raise OSError(errno.ENOTCONN, "frontend is closed")
        with self._lock:
            ring = self._ring_pool.pop() if self._ring_pool else None
        if ring is None:
            ring = self._make_data_ring()
        else:
            ring.reset()
            if ring.direct:
                # Nobody read the idle handle: take the stale event and the
                # service's news that the old peer unbound (it came before
                # the RELEASE answer), so that the new peer's port is the
                # one notified.
                ring.consume_events()
        if not ring.direct:
            with self._lock:
                self._handlers[ring.port] = sock._st.on_event
        elif sock._st.readyfd is not None:
            self._relay(ring, sock._st)
        return ring

    def _make_data_ring(self) -> _DataRing:
        """A new data ring, on an event channel handle of its own if the
        host lets us open one more."""
        assert self._gntshr is not None and self._evtchn is not None
        try:
            handle = self.domain.evtchn()
        except OSError as exc:
            logger.debug("no event channel handle of its own for a data ring: %s", exc)
        else:
            return _DataRing(self._gntshr, handle, self.backend_id, self.ring_order, direct=True)
        return _DataRing(self._gntshr, self._evtchn, self.backend_id, self.ring_order)

    def _relay(self, ring: _DataRing, st: _SocketState) -> None:
        """Have the event thread watch ``ring``'s own handle, so that the
        readiness eventfd of ``st``'s socket follows the ring with no
        caller blocked in it."""
        if not ring.direct:
            return
        with self._lock:
            if ring.relayed or self._event_epoll is None:
                return
            ring.relayed = True
            fd = ring.evtchn.fileno()
            self._relays[fd] = functools.partial(st.on_relayed_event, ring)
            self._event_epoll.register(fd, select.EPOLLIN)

    def _unrelay(self, ring: _DataRing) -> None:
        """Stop watching ``ring``'s handle (under _lock)."""
        if ring.relayed:
            ring.relayed = False
            fd = ring.evtchn.fileno()
            self._relays.pop(fd, None)
            if self._event_epoll is not None:
                try:
                    self._event_epoll.unregister(fd)
                except OSError:
                    pass

    def _put_data_ring(self, ring: _DataRing, *, reusable: bool) -> None:
        """Take back a ring no socket uses.  ``reusable``: the backend said
        it let go of it (answered RELEASE, or refused the CONNECT or ACCEPT
        that offered it), so its pages and port may serve the next socket."""
        with self._lock:
            self._handlers.pop(ring.port, None)
            self._unrelay(ring)
            if reusable and not self._dead and len(self._ring_pool) < _RING_POOL_MAX:
                self._ring_pool.append(ring)
                return
        ring.free()

    def _drop_socket(self, sock: PVSocket, *, reusable: bool) -> None:
        """Free a socket the backend never made (a failed ACCEPT's id_new)."""
        self._forget(sock)
        ring, sock._st.ring = sock._st.ring, None
        if ring is not None:
            self._put_data_ring(ring, reusable=reusable)

    def _submit(
        self,
        cmd: int,
        sock_id: int,
        fill: Callable[[Any], None],
        deadline: _Deadline,
        *,
        reserve: bool = True,
        on_done: Callable[[int], None] | None = None,
        sock: PVSocket | None = None,
    ) -> tuple[int, _Slot]:
        """Put one request on the command ring and notify the backend.

        ``req_id`` is the slot index, as in Linux.  A request waits (within
        ``deadline``, and while ``sock``, the socket it is for, stays open)
        for the ring to have room and its response table entry to be free.
        POLL does not reserve the entry: its answer is matched by command and
        id (Linux does the same).
        """
        req = ffi.new("struct xen_pvcalls_request *")
        req.cmd = cmd
        fill(req)
        slot = _Slot(cmd, sock_id)
        slot.on_done = on_done
        with self._cmd_cond:
            while True:
                if self._dead:
                    raise self._gone()
                if self._ring is None:
                    raise OSError(errno.ENOTCONN, "the PV Calls frontend is not connected")
                if sock is not None and sock._closed:
                    raise _bad_fd()
                req_id = self._req_prod_pvt & (RING_SLOTS - 1)
                if self._ring.free_slots > 0 and self._slots[req_id] is None:
                    break
                if deadline.timeout == 0.0:
                    raise BlockingIOError(errno.EAGAIN, "the command ring is full")
                self._cmd_cond.wait(deadline.nap())
            req.req_id = req_id
            if reserve:
                self._slots[req_id] = slot
            self._ring.push_request(bytes(ffi.buffer(req)))
            self._req_prod_pvt = (self._req_prod_pvt + 1) & 0xFFFFFFFF
            notify = self._ring.push_requests()
        logger.debug("-> %s req_id=%d id=%#x", PVCALLS_COMMANDS[cmd], req_id, sock_id)
        if notify:
            self._notify(self._port)
        return req_id, slot

    def _wait_slot(
        self, req_id: int, slot: _Slot, deadline: _Deadline, sock: PVSocket | None = None
    ) -> int:
        """Wait for the answer in ``slot``; free it and return ``ret``.

        On timeout (or when ``sock`` gets closed) the slot stays reserved and
        the request in flight; the caller either waits again later or
        abandons it.
        """
        with self._cmd_cond:
            while not slot.done:
                if self._dead:
                    raise self._gone()
                if sock is not None and sock._closed:
                    raise _bad_fd()
                if deadline.timeout == 0.0:
                    raise BlockingIOError(errno.EAGAIN, "operation would block")
                self._cmd_cond.wait(deadline.nap())
            if self._slots[req_id] is slot:
                self._slots[req_id] = None
                self._cmd_cond.notify_all()  # a submitter may wait for this entry
            return slot.ret

    def _abandon(self, req_id: int, slot: _Slot,
                 on_late: Callable[[int], None] | None = None) -> None:
        """Nobody will wait for ``slot``: free it now if answered, else when
        the answer comes.  ``on_late(ret)`` is called with the answer, now
        or by the event thread when it comes."""
        with self._cmd_cond:
            answered = slot.done
            if answered:
                if self._slots[req_id] is slot:
                    self._slots[req_id] = None
                    self._cmd_cond.notify_all()
            elif on_late is not None:
                slot.on_done = on_late
            else:
                slot.abandoned = True
        if answered and on_late is not None:
            on_late(slot.ret)

    def _call(self, cmd: int, sock_id: int, fill: Callable[[Any], None], deadline: _Deadline,
              sock: PVSocket | None = None, on_late: Callable[[int], None] | None = None) -> int:
        """Submit one command and wait for its ``ret``; abandon it on timeout
        (or when ``sock`` gets closed, or an interrupt), with ``on_late``
        to take the answer (see :meth:`_abandon`)."""
        req_id, slot = self._submit(cmd, sock_id, fill, deadline)
        try:
            return self._wait_slot(req_id, slot, deadline, sock)
        except BaseException:
            self._abandon(req_id, slot, on_late)
            raise

    def _on_command_event(self) -> None:
        """Event thread: consume every response on the command ring."""
        polls: list[tuple[PVSocket, int]] = []
        accepts: list[PVSocket] = []
        done: list[tuple[Callable[[int], None], int]] = []
        broken: RingError | None = None
        with self._cmd_cond:
            ring = self._ring
            if ring is None or self._ring_broken:
                return
            try:
                self._consume_responses(ring, polls, accepts, done)
            except RingError as exc:
                # Nothing on this ring can be trusted any more (and it
                # raises again on every event): fail every waiter, as if
                # the backend had left.
                broken = exc
                self._ring_broken = True
                self._die("the PV Calls backend broke the command ring")
            self._cmd_cond.notify_all()
        if broken is not None:
            logger.error("pvcalls backend of domain %d broke the command ring: %s",
                         self.domain.domid, broken)
            self._wake_everyone()
        for sock, ret in polls:
            sock._on_poll(ret)
        for sock in accepts:
            sock._update_ready()  # see _readable()
        for callback, ret in done:
            try:
                callback(ret)
            except Exception:
                logger.exception("pvcalls frontend: completing a command")

    def _owner(self, sock_id: int) -> PVSocket | None:
        """Under _lock: the socket ``sock_id``, unless released or dropped."""
        st = self._sockets.get(sock_id)
        return None if st is None else st.owner()

    def _consume_responses(self, ring: FrontRing, polls: list[tuple[PVSocket, int]],
                           accepts: list[PVSocket],
                           done: list[tuple[Callable[[int], None], int]]) -> None:
        """Under _lock: match every response on ``ring`` with its slot; what
        is to be done outside the lock goes to the lists.  Raises
        :class:`RingError` if the backend's ``rsp_prod`` is impossible."""
        while True:
            for raw in ring.responses():
                rsp = ffi.from_buffer("struct xen_pvcalls_response *", raw)
                req_id, cmd, ret, sock_id = rsp.req_id, rsp.cmd, rsp.ret, rsp.u.poll.id
                logger.debug("<- %s req_id=%d id=%#x ret=%d",
                             PVCALLS_COMMANDS.get(cmd, cmd), req_id, sock_id, ret)
                if ret > 0:
                    # Only 0 or a negative errno may be.  Read as success,
                    # as Linux's frontend and accept() here read it (ret <
                    # 0 fails), so that every reader of it agrees: one that
                    # tested ret == 0 took an accepted connection for none.
                    logger.warning("response req_id=%d cmd=%d id=%#x has a positive ret %d: "
                                   "read as 0", req_id, cmd, sock_id, ret)
                    ret = 0
                if cmd == PVCALLS_POLL:
                    # Not for a socket dropped meanwhile: its release is coming.
                    sock = self._owner(sock_id)
                    if sock is not None:
                        polls.append((sock, ret))
                    continue
                slot = self._slots[req_id] if req_id < RING_SLOTS else None
                if slot is None or slot.done or slot.cmd != cmd or slot.sock_id != sock_id:
                    logger.warning(
                        "dropping unexpected response req_id=%d cmd=%d id=%#x", req_id, cmd, sock_id
                    )
                    continue
                slot.ret = ret
                slot.done = True
                if slot.on_done is not None:
                    done.append((slot.on_done, ret))
                    self._slots[req_id] = None
                elif slot.abandoned:
                    self._slots[req_id] = None
                elif cmd == PVCALLS_ACCEPT:
                    sock = self._owner(sock_id)
                    if sock is not None:
                        accepts.append(sock)
            if not ring.final_check_for_responses():
                break

    def _release(self, st: _SocketState, sock: PVSocket | None = None) -> None:
        """RELEASE the socket of ``st`` and free what it shared: called by
        close() (``sock`` the socket), and for a socket dropped unclosed
        (``sock`` None, see :meth:`_collect`) by the reaper or, if it has
        not come to it, by Frontend.close().

        close() does not wait for the answer (one command round trip less
        per socket): the socket is unusable from now on, and its data ring
        (and an ACCEPT's reserved socket) goes back to the pool, with
        -EBADF in ``in_error`` as Linux writes it, only once the backend
        answered, that is, let go of it.  Commands are processed in ring
        order, so whatever the guest sends next (a SOCKET counted against a
        policy limit, a BIND to the same port) finds the socket released.
        """
        rel: _Release | None = None
        interrupted: BaseException | None = None
        with self._lock:
            if sock is None:
                # A dropped socket's state is released by whoever takes it
                # out of the table: the reaper or Frontend.close(), not both.
                if self._sockets.get(st.id) is not st:
                    return
                del self._sockets[st.id]
            if not self._dead and self._ring is not None:
                # Registered with the claim: a Frontend.close() that found
                # the state gone waits for this RELEASE (_wait_releases).
                rel = pending = _Release(st.id)
                self._releases.add(rel)
        if rel is not None:

            def fill(req: Any) -> None:
                req.u.release.id = st.id
                req.u.release.reuse = 0

            # The event thread (releasing an accepted socket, see
            # _finish_release) must not wait for a slot only it can free.
            timeout = 0.0 if threading.current_thread() is self._thread else self.timeout
            try:
                self._submit(PVCALLS_RELEASE, st.id, fill, _Deadline(timeout),
                             on_done=lambda ret: self._released(pending, ret))
            except BaseException as exc:
                # Not sent.  Also when the wait for room was interrupted
                # (Ctrl-C in the main thread): the socket is closed already
                # (a second close() does nothing), so what it shared is
                # freed here, not left for an answer that will never come;
                # the interrupt goes on once that is done.
                if isinstance(exc, OSError | TimeoutError):
                    logger.warning("RELEASE of %#x failed: %s", st.id, exc)
                else:
                    interrupted = exc
                with self._lock:
                    self._releases.discard(rel)
                    self._cmd_cond.notify_all()  # close() may wait for the last one
                rel = None
        inflight = ring = None
        if sock is None:
            # Dropped: no call of the socket is left to wait out, and
            # nobody else can reach its state any more.
            inflight, st.accept_inflight = st.accept_inflight, None
            ring, st.ring = st.ring, None
            fd, st.readyfd = st.readyfd, None
        else:
            # The socket's own calls have seen _closed and left (or, a
            # CONNECT cut short by this RELEASE, gave its ring back): take
            # the ring under their locks so that exactly one party frees it.
            # Within the timeout: a lock still held then was left behind by
            # a call that an interrupt cut short as it took the lock
            # (CPython runs a signal's handler as the acquire returns,
            # before the call's try), and what it guards is left alone
            # rather than freed under a possible user.
            deadline = _Deadline(self.timeout)
            try:
                with _held(sock._accept_lock, deadline):
                    inflight, st.accept_inflight = st.accept_inflight, None
            except (TimeoutError, BlockingIOError):
                logger.warning("socket %#x: its accept lock is still held; a pending ACCEPT "
                               "is not freed", st.id)
            try:
                with (_held(sock._recv_lock, deadline), _held(sock._send_lock, deadline),
                      sock._cond):
                    ring, st.ring = st.ring, None
            except (TimeoutError, BlockingIOError):
                logger.warning("socket %#x: a call's lock is still held; its ring is not freed",
                               st.id)
            with self._lock:
                self._sockets.pop(st.id, None)
            with sock._cond:
                fd, st.readyfd = st.readyfd, None
        if fd is not None:
            os.close(fd)
        if rel is None:
            self._finish_release(ring, inflight, released=False)
            if interrupted is not None:
                raise interrupted
            return
        with self._lock:
            rel.ring, rel.inflight, rel.taken = ring, inflight, True
            finish = rel.ret is not None and rel in self._releases
            if finish:
                self._releases.discard(rel)
                self._cmd_cond.notify_all()  # close() may wait for the last one
        if finish:
            self._finish_release(ring, inflight, released=rel.ret == 0)

    def _collect(self, st: _SocketState) -> None:
        """The finaliser of a PVSocket dropped unclosed (see PVSocket's
        ``_finalizer``): have it released as close() would, and say so with
        a ResourceWarning, as socket.socket does.

        It runs wherever the last reference to the socket went: in any
        thread, at any allocation, also in one that holds this frontend's
        or a socket's locks, or that is in the middle of the command ring's
        code.  So it takes no lock and calls into nothing: it queues the
        state (an atomic append) and wakes the event thread, which starts
        the reaper (:meth:`_reap`) to send the RELEASE.  Once the frontend
        is closed nothing reads the queue, and nothing is left to release:
        its close() released every socket.
        """
        # What it was, before the reaper takes its ring.
        message = f"unclosed {st.describe(closed=False)}"
        self._dropped.append(st)
        wakeup = self._wakeup  # once: _stop_thread may drop it meanwhile
        if wakeup is not None:
            wakeup.set()
        # Last, as a warning filter may turn it into an exception.  Without
        # socket.socket's ``source``: the socket is gone.  stacklevel 3 is
        # the code that dropped it (under _collect, weakref.finalize).
        warnings.warn(message, ResourceWarning, stacklevel=3)

    def _start_reaper(self) -> None:
        """Event thread: start the reaper if sockets were dropped and it is
        not running.  Not the event thread itself: a RELEASE may have to
        wait for room on the command ring, which only the event thread
        makes."""
        with self._lock:
            if not self._dropped or self._reaper is not None or self._stopping:
                return
            self._reaper = reaper = threading.Thread(
                target=self._reap, name=f"pvcalls-reap-{self.domain.domid}", daemon=True)
        try:
            reaper.start()
        except RuntimeError as exc:  # no thread to be had: at the next drop, maybe
            logger.error("pvcalls frontend cannot release dropped sockets: %s", exc)
            with self._lock:
                self._reaper = None

    def _reap(self) -> None:
        """The reaper thread: release the sockets dropped unclosed until
        none is left.  It ends under _lock once the queue is empty: a state
        queued later finds it gone, and the wake-up that follows the append
        starts another."""
        while True:
            with self._lock:
                if not self._dropped:
                    self._reaper = None
                    return
                st = self._dropped.popleft()
            try:
                self._release(st)
            except Exception:
                logger.exception("pvcalls frontend: releasing dropped socket %#x", st.id)

    def _released(self, rel: _Release, ret: int) -> None:
        """Event thread: the backend answered ``rel``'s RELEASE."""
        if ret < 0:
            logger.warning("RELEASE of %#x: %s", rel.sock_id, _errno.name_of(ret))
        with self._lock:
            rel.ret = ret
            if not rel.taken or rel not in self._releases:
                return  # close() is still taking it, or gave up waiting
            self._releases.discard(rel)
            self._cmd_cond.notify_all()
        self._finish_release(rel.ring, rel.inflight, released=ret == 0)

    def _finish_release(self, ring: _DataRing | None,
                        inflight: tuple[int, _Slot, PVSocket] | None, *, released: bool) -> None:
        """Free a released socket's ring and pending ACCEPT.  ``released``:
        the backend answered RELEASE, so they may be reused."""
        if ring is not None:
            # As Linux: after RELEASE the frontend writes -EBADF into in_error.
            ring.set_in_error(-_errno.EBADF)
            self._put_data_ring(ring, reusable=released)
        if inflight is not None:
            req_id, slot, new = inflight
            self._abandon(req_id, slot)
            if released and slot.done and slot.ret == 0:
                # The backend accepted a connection into the new socket
                # before the RELEASE (it answers in ring order): that socket
                # is not the listener's, and is released in turn (its ring
                # comes back with that answer, not before).
                new.close()  # never handed out: no makefile() stream holds it
            else:
                # The backend released the listening socket, and with it
                # the pending ACCEPT's new socket.
                self._drop_socket(new, reusable=released)

    def _wait_releases(self) -> None:
        """Wait (up to ``timeout``) for the RELEASEs in flight; free what
        the unanswered ones hold without reusing it."""
        deadline = _Deadline(self.timeout)
        with self._cmd_cond:
            while self._releases and not self._dead:
                try:
                    self._cmd_cond.wait(deadline.nap())
                except TimeoutError:
                    break
            left = [rel for rel in self._releases if rel.taken]
            self._releases.difference_update(left)
        for rel in left:
            logger.warning("RELEASE of %#x not answered", rel.sock_id)
            self._finish_release(rel.ring, rel.inflight, released=False)
