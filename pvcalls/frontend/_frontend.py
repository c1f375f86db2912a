"""The frontend of one guest domain: the device and its handshake, the
command ring and its event thread, and the release of sockets."""

from __future__ import annotations

import collections
import errno
import functools
import itertools
import logging
import operator
import os
import select
import socket
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

from xenback import Closing
from xenback.platform import DOMID_FIRST_RESERVED, check_platform
from xenback.ratelimit import RateLimit
from xenback.ring import FrontRing, RingError
from xenback.xenbus import XenbusState
from xenback.xenstore import XenStore

from .. import _errno
from .._wire import (
    AF_INET,
    MAX_PAGE_ORDER_LIMIT,
    PVCALLS_ACCEPT,
    PVCALLS_COMMANDS,
    PVCALLS_CONNECT,
    PVCALLS_POLL,
    PVCALLS_RELEASE,
    PVCALLS_SOCKET,
    PVCALLS_VERSIONS,
    RING_SLOTS,
    SLOT_SIZE,
    SOCK_STREAM,
    ffi,
)
from ._common import (
    FRONTEND_RING_ORDER,
    RESETS_IN_A_ROW,
    Deadline,
    Slot,
    bad_fd,
    held,
    host_error,
    timeout_value,
)
from ._ring import DataRing
from ._socket import PVSocket, SocketState

if TYPE_CHECKING:
    from xenback.platform import EventChannel, GrantShare, SharedPages
    from xenback.xenstore import Transaction, Watch


class _Claim(Protocol):
    """What Frontend._finish_each() claims: set under the frontend's
    ``_lock`` while a thread takes the item's step; given back without it,
    by that thread alone, as a Ctrl-C stops the step."""

    claimed: bool


_Claimable = TypeVar("_Claimable", bound=_Claim)


class _Fatal(Exception):
    """A failure that the event thread does not survive: ``error``, which
    the frontend then fails with (see :meth:`Frontend._event_loop`)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class _ClosingElsewhere(Exception):
    """A close() of a thread that close() joins found another one under
    way (see Frontend.close)."""


class _AnswersLost(_Fatal):
    """The command ring's handler failed with ``error``: the answers it
    took off the ring are lost to their callers."""


# One logger for the whole frontend library, as concurrent.futures has.
logger = logging.getLogger("pvcalls.frontend")


# What every call says once the frontend's XenStore connection is lost: the
# backend cannot be reached either (Xen's toolstack and backends cannot run
# without XenStore), so it is the likely reason for a whole host.
_LOST_XENSTORE = "lost XenStore (is the host gone?)"

_ID_BASE = 0xFFFF_8880_0000_0000  # looks like a Linux direct-map pointer


_ID_STRIDE = 0x100  # kmalloc-256, roughly sizeof(struct sock_mapping)


#: Ports the event thread takes off the shared handle in one round before it
#: looks at its other descriptors again (the wake-up, the relays of rings
#: with handles of their own).  A backend can fire a port again while each
#: of its events is handled, every time: the handle's queue then never reads
#: empty, and a round that ran until it did would never end, close() left
#: waiting for the thread.  The handle's descriptor is level-triggered: the
#: next wait returns at once while ports are pending.
_PORT_BATCH = 64

#: How often a close() on the event thread (a finaliser of its closing the
#: frontend) looks at the command ring for the answers to its RELEASEs:
#: nobody else takes them off, and no wake-up would come.
_OWN_ANSWERS_POLL = 0.005

#: Released data rings a frontend keeps for reuse (``2**ring_order`` data
#: pages, an indexes page and a port each).
_RING_POOL_MAX = 32

#: Seconds a close() waits for the event thread and the reaper to end
#: before it says that one did not stop, and goes on without it.
_THREAD_STOP_WAIT = 10.0


#: Commands that stay in flight as long as the network makes them wait (a
#: peer that does not answer a SYN, a listener nobody connects to).  They
#: never take the last free ring slot or response table entry: the RELEASE
#: that cuts them short must always be able to go out.
_LONG_LIVED = frozenset({PVCALLS_CONNECT, PVCALLS_ACCEPT, PVCALLS_POLL})


def _state(value: str | None) -> XenbusState:
    """A backend's state node; anything that is not a state reads as UNKNOWN."""
    try:
        return XenbusState.parse(value)
    except ValueError:
        return XenbusState.UNKNOWN


class _HoldsRing(Protocol):
    """What holds a data ring on its way back (see Frontend._give_back)."""

    ring: DataRing | None


class _Release:
    """A socket's release (see :meth:`Frontend._release`), from its claim
    on: what the socket shared, moved here from its state and freed once
    the backend answered the RELEASE (or will not), by whoever comes last
    of the answer and the release.

    ``ring`` and ``inflight`` are moved in and out by steps that call
    nothing (see :meth:`Frontend._give_back`), so that exactly one party
    takes each; ``ret`` is under the frontend's ``_lock``, and
    ``settled`` is written by the thread that claimed the release alone,
    read by the others under ``_lock``."""

    __slots__ = ("sock_id", "ring", "inflight", "settled", "ret")

    def __init__(self, sock_id: int) -> None:
        self.sock_id = sock_id
        self.ring: DataRing | None = None
        self.inflight: tuple[int, Slot, PVSocket] | None = None
        # The RELEASE went out, or will not (the frontend is dead, or
        # sending it failed): from then on any release of the socket
        # finishes taking what it shared.  Until then only the thread
        # sending it does.
        self.settled = False
        self.ret: int | None = None  # the answer, once it came


class _EndingAccept:
    """The ACCEPT a released listener had in flight, on its way to be
    ended (see :meth:`Frontend._end_accepts`): ``inflight`` as the
    listener's state held it, and whether the backend answered the
    listener's RELEASE.  ``claimed``: a thread is ending it (see
    :class:`_Claim`)."""

    __slots__ = ("inflight", "released", "claimed")

    def __init__(self, inflight: tuple[int, Slot, PVSocket], released: bool) -> None:
        self.inflight = inflight
        self.released = released
        self.claimed = False


class _Wakeup:
    """The eventfd that wakes a frontend's event thread: to stop it, to
    have it release sockets dropped unclosed (see :meth:`Frontend._collect`),
    or to tell sockets that there is room on the command ring again (see
    :meth:`Frontend._want_room`).

    A finaliser may write it at any moment, in any thread, with no lock to
    keep the frontend from closing meanwhile.  So it is closed only once
    nobody holds this object any more, which CPython does the moment the
    last reference goes: whoever still holds it cannot write into a
    descriptor number the process has reused since.

    ``stopping`` tells the thread it wakes to stop.  Each thread has its
    own: one that outlived close()'s wait for it (still in a handler)
    stops all the same once it is back, while the next open()'s runs.
    """

    __slots__ = ("fd", "stopping", "__weakref__")

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.stopping = False
        weakref.finalize(self, os.close, self.fd)

    def stop(self) -> None:
        self.stopping = True
        self.set()

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

    ``backend_id`` is the domain whose backend serves the device (0, or a
    driver domain); ``devid`` the device's number among the domain's
    ``pvcalls`` devices, for more than one frontend in a domain at once.
    A wrong argument is a :class:`TypeError` or :class:`ValueError` here.

    :meth:`open` (entering the ``with`` block) raises
    :class:`TimeoutError` if no backend answers within ``timeout`` (none
    serves ``backend_id``), and :class:`OSError` if the backend's answer
    will not do: EPROTONOSUPPORT (no protocol version 1, no
    ``function-calls`` 1, or its ``max-page-order`` is below
    ``ring_order``), EPROTO or ECONNREFUSED
    (it went to a state other than the one expected), ECANCELED (a
    close() was made meanwhile); it closes what it had opened first.
    Once the backend goes away (its state leaves Connected), every call
    of the frontend and its sockets fails with :class:`OSError` ENOTCONN.

    The arguments stay readable as attributes (``domain``, ``backend_id``,
    ``devid``, ``ring_order``, and ``timeout`` as a float); ``device`` is
    the :class:`xenback.sim.Device` the toolstack added (its frontend and
    backend paths in XenStore), None before :meth:`open` and after
    :meth:`close`.
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
        try:
            # Not isinstance(): Python 3.11's reads every property of the
            # Protocol (see check_platform).
            check_platform(domain)
            guest = hasattr(domain, "toolstack")
        except TypeError:
            guest = False
        if not guest:
            raise TypeError("domain must be a guest's Platform with a toolstack "
                            f"(a xenback.sim.Domain), not {type(domain).__name__}")
        for name, value in (("backend_id", backend_id), ("devid", devid)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if not 0 <= backend_id < DOMID_FIRST_RESERVED:
            raise ValueError(f"backend_id must be a domain id (0 to {DOMID_FIRST_RESERVED - 1}), "
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
        # Checked as settimeout() checks it, but a wrong type is not told
        # settimeout()'s message, which offers None (None is checked too:
        # timeout_value() returns it).
        try:
            checked = timeout_value(timeout)
        except TypeError:
            checked = None
        except ValueError:  # negative or NaN: said below, as 0 is
            checked = 0.0
        if checked is None:
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
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
        # callback is acting any more, or will).  An RLock: a close() run
        # inside the callback (a logging handler, a finaliser) takes it
        # again, and the callback, finding the watch gone, acts no more.
        self._backend_watch: Watch | None = None
        self._watch_lock = threading.RLock()
        # close() runs in one thread at a time: held for the whole of it,
        # and _closer is the thread that runs it (set and cleared under
        # it); open() holds it too, for the whole of it, and _opener is
        # its thread.  Not taken by a thread close() joins (the event
        # thread, the reaper, XenStore's), which would keep the holder in
        # its join for good.  An RLock: a close() of the holder's own (a
        # signal's handler) takes it again, as the holder may not have
        # said yet that it closes or opens (before _closer or _opener is
        # set); see close().
        self._close_lock = threading.RLock()
        self._closer: threading.Thread | None = None
        self._opener: threading.Thread | None = None
        # A close() was made since the open() under way began (it clears
        # it first): that open() fails once done.  Set by every close()
        # before it takes the lock, read by open() once it let go of it.
        self._close_asked = False
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
        # releasing it.  A socket's _cond nests inside it (_want_room sets
        # the socket's _no_room with its registration), never the other
        # way: no code holding a socket's _cond calls into the command
        # ring (the order PVSocket's locks say).
        self._lock = threading.Lock()
        # Waited on only; blocks take _lock itself (see PVSocket's _mutex
        # in _socket.py: a signal's handler cannot leave it held).
        self._cmd_cond = threading.Condition(self._lock)
        # The command ring's req_prod up to which the backend was notified,
        # or needed no notify: a submitter interrupted between its push and
        # its notify leaves it behind, and whoever checks next (see
        # _kick_owed) sends the notify that the backend still waits for.
        # Written under _lock, and by a notifier after its notify without
        # it: that may set it back (another one notified further
        # meanwhile), which costs a notify more, never one less.
        self._kicked_to = 0
        self._slots: list[Slot | None] = [None] * RING_SLOTS
        # The answers taken off the command ring, each to be handed to its
        # caller (a callback and its arguments), in ring order.  Appended
        # under _lock; each taken off by the one popleft() that gets it,
        # so that a close() run on the event thread as it hands them over
        # (a finaliser) hands over the rest itself, and its waits for
        # RELEASE answers find those already taken (see
        # _take_own_answers).  Only the event thread takes from it.
        self._handover: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = (
            collections.deque())
        # Listeners that found no room for a POLL or ACCEPT they would not
        # wait for (fileno()'s POLL, a non-blocking accept()'s ACCEPT; a
        # non-blocking connect() that finds none fails with ENOBUFS): the
        # event thread tells them once there is room (see _want_room).
        # Under _lock.
        self._room_waiters: list[PVSocket] = []
        # The backend published an impossible rsp_prod: the ring is dead.
        self._ring_broken = False
        # Every socket not yet released, by id: its state, which refers to
        # the PVSocket only weakly (see SocketState).
        self._sockets: dict[int, SocketState] = {}
        # The states of sockets dropped unclosed, for the reaper thread to
        # release.  Their finalisers append to it with no lock (they take
        # none, see _collect): a deque's append and popleft are atomic.
        self._dropped: collections.deque[SocketState] = collections.deque()
        # The reaper thread while it runs (under _lock): the event thread
        # starts it when _dropped has states, it ends once it is empty.
        self._reaper: threading.Thread | None = None
        self._handlers: dict[int, Callable[[], None]] = {}
        # The event thread's epoll set: the shared handle, the wake-up
        # eventfd (_Wakeup) and the own handles of rings being relayed
        # (descriptor -> callback).
        self._event_epoll: select.epoll | None = None
        self._relays: dict[int, Callable[[], None]] = {}
        # Data rings the backend let go of, kept for the next sockets: a
        # connect then costs no page sharing and no event channel set-up.
        self._ring_pool: list[DataRing] = []
        # Where a ring given up goes on its way to the pool or to be freed
        # (see _give_back), with whether it may be reused; appended to with
        # no lock, emptied under _lock.  And the rings to free, each by the
        # one thread that claims it (DataRing.claimed, under _lock).  A
        # ring whose way a Ctrl-C cut short waits in one of them for the
        # next ring given back, or handed out, or Frontend.close().
        self._given_back: list[tuple[DataRing, bool]] = []
        self._rings_to_free: list[DataRing] = []
        # RELEASEs in flight, until answered and finished (_release).
        self._releases: set[_Release] = set()
        # The ACCEPTs of released listeners, from their release to the end
        # of the socket each offered: moved here by a step that calls
        # nothing (see _finish_release), appended to under _lock, each
        # ended by the one thread that claims it and dropped once ended.
        # One a Ctrl-C cut short waits here for the next release finished,
        # or Frontend.close().
        self._accepts_to_end: list[_EndingAccept] = []

        # The event thread; after a close() it ran itself (a handler's),
        # kept until the next open() or close() has waited for it to end.
        self._thread: threading.Thread | None = None
        self._wakeup: _Wakeup | None = None  # the event thread's, while it runs
        # The resets of the shared handle since its queue of fired ports
        # was last read empty (see _event_loop).  Written only by the
        # event thread.
        self._resets = 0
        # The handle may overflow again and again, each time after its
        # queue was read empty: a reset is worth a line, not every one.
        # For the life of the frontend: an open() again gets no new budget.
        self._overflows = RateLimit(f"pvcalls frontend of domain {domain.domid}")
        # Set once the backend is gone (its state left Connected), the
        # XenStore connection is lost, the frontend closes or fails (see
        # _fail): every waiter gives up with _death, (errno, why), one
        # object so that a reader never pairs one death's errno with
        # another's reason.  _death_lock makes _die()'s test and set one
        # step: the threads that may find the frontend dead (the event
        # thread, XenStore's, the backend state watch's) can do so at once,
        # and the first reason must stay.  Nothing is taken while it is
        # held (it is taken under _lock and _watch_lock).
        self._dead = False
        self._death: tuple[int, str] = (errno.ENOTCONN, "")  # set with _dead, by _die()
        self._death_lock = threading.Lock()
        # Why XenStore dropped the connection; None while it is up.
        self._xs_lost: str | None = None
        self._connected = False
        # The backend left Connected and we answered (went Closed): under
        # _watch_lock.  Not _dead: a frontend dead for a reason of its own
        # (the command ring broken, a failure) still answers the backend's
        # leaving, which waits in Closing for it.
        self._backend_left = False

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> Self:
        self.open()
        return self

    def open(self) -> None:
        """Add the device and do the frontend handshake (up to Connected).

        Calls of open() and close() take turns: one made while another
        thread's close() runs waits for it to end, and a close() made
        while it runs waits for it (or returns at once, if it cannot wait:
        see close()).  Any close() made while it runs makes it fail with
        :class:`OSError` ECANCELED once it is done, having closed what it
        opened."""
        # Before the lock is taken: a close() made as it is (this thread
        # yet to say it opens) fails this open() too.
        self._close_asked = False
        # Under close()'s lock: else a close() under way would close the
        # handles made next, and this one those it closes; and a close()
        # made meanwhile would close those of the handshake under it.
        with held(self._close_lock, Deadline(None)):
            if self.device is not None:
                raise RuntimeError("frontend already open")
            self._opener = threading.current_thread()
            try:
                # What an interrupted close() left (its thread, its handles)
                # goes first: the new connection's would take their places.
                self._release_handles()
                self._reset_connection()
                domain = self.domain
                self._toolstack = domain.toolstack
                # replace: a stale frontend of the same devid, its backend
                # gone, may not have closed yet; the new one's device takes
                # its place.
                self.device = self._toolstack.add_device(
                    "pvcalls", frontend_id=domain.domid, backend_id=self.backend_id,
                    devid=self.devid, replace=True,
                )
                self._connect()
            except BaseException:
                self._opener = None
                self.close()
                raise
            finally:
                self._opener = None
        # Once the lock is let go of: a close() that found it held asked
        # before it tried (see close()).
        if self._close_asked:
            self.close()
            raise OSError(errno.ECANCELED, "the frontend was closed while it opened")

    def _reset_connection(self) -> None:
        """Forget the last connection's end: a close(), also the one that a
        failed open() does, leaves the frontend dead (every call fails), and
        an open() after it (a retry once the backend runs) starts afresh.
        Socket ids go on counting: one frontend never reuses them."""
        self._dead = False
        self._death = (errno.ENOTCONN, "")
        self._xs_lost = None
        self._backend_left = False
        self._ring_broken = False
        self._kicked_to = 0
        self._slots = [None] * RING_SLOTS
        self._room_waiters.clear()
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

        # Stored by the calls that make them (list.extend() keeps what a
        # call returned before control is back in Python code): as
        # ``self._evtchn = domain.evtchn()``, a Ctrl-C as the factory
        # returned lost the handle before close() could see it, and an
        # event channel's eventfd with it, for good.
        handles: list[Any] = []
        try:
            handles.extend(map(operator.call, (domain.gntshr, domain.evtchn)))
        except BaseException:
            for handle in handles:
                handle.close()
            raise
        self._gntshr, self._evtchn = handles
        self._cmd_pages = self._gntshr.share_pages(self.backend_id, 1)
        self._ring = FrontRing(self._cmd_pages.buffer, SLOT_SIZE, init=True)
        self._port = self._evtchn.bind_unbound_port(self.backend_id)
        self._handlers[self._port] = self._on_command_event

        self._wakeup = _Wakeup()
        self._event_epoll = select.epoll()
        self._event_epoll.register(self._evtchn.fileno(), select.EPOLLIN)
        self._event_epoll.register(self._wakeup.fd, select.EPOLLIN)
        self._thread = threading.Thread(
            target=self._event_loop, args=(self._wakeup,),
            name=f"pvcalls-front-{domain.domid}", daemon=True,
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
        try:
            self._backend_state_changed()
        except Exception as exc:
            # Whether the backend is still there is unknown now.
            self._fail("watching the backend's state", exc)

    def _backend_state_changed(self) -> None:
        with self._watch_lock:
            if self._backend_watch is None or self._backend_left:
                return  # close() is under way or over, or the leaving was answered
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
            self._backend_left = True
            # Info: every call of ours says so now, with ENOTCONN (or
            # what killed the frontend before).
            logger.info("pvcalls backend of domain %d went to state %d: disconnecting",
                        self.domain.domid, state)
            if self._die("the PV Calls backend went away"):
                self._wake_everyone()
            if self._backend_watch is None:
                # A close() that the logging or the waking ran (a handler,
                # a finaliser) went Closed, and closed the connection.
                return
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

    def _die(self, why: str, err: int = errno.ENOTCONN) -> bool:
        """From now on every call fails with ``err`` and ``why``; the
        first reason given stays.  Whether the frontend was alive."""
        with self._death_lock:
            if self._dead:
                return False
            self._death = (err, why)
            self._dead = True
        return True

    def _gone(self) -> OSError:
        """The error of a call that can no longer be answered."""
        return OSError(*self._death)

    def _fail(self, what: str, exc: Exception) -> None:
        """``exc`` escaped ``what``, the frontend's own code on a thread of
        its own (a bug of ours, or its event channel handle failing):
        whatever that was doing for the program's calls is lost, an answer
        taken off the command ring or the backend's departure, and they
        would wait for it for ever.  So every call fails from now on, the
        waiting ones at once, with EIO saying so; close() still closes the
        device with the backend, which releases what the guest held."""
        logger.error("pvcalls frontend of domain %d: %s failed", self.domain.domid, what,
                     exc_info=exc)
        if self._die(f"the PV Calls frontend failed ({what}: {type(exc).__name__}: {exc})",
                     errno.EIO):
            self._wake_everyone()

    def close(self) -> None:
        """Release every socket (also those dropped unclosed whose release
        has not gone out yet), go Closing then Closed, remove the device
        and free the command ring.

        Idempotent, and a close() interrupted in one of its waits (Ctrl-C in
        the main thread) is finished by the next one: that one closes and
        removes the device again unless it is gone already, then stops the
        frontend's own thread and closes the handles that are left.

        Calls at once take turns, with open() too: one made while another
        thread's close() or open() runs waits for it to end (and finishes
        a close() cut short; an open() fails, see there).  Not so one that
        cannot wait for it, which returns at once and leaves the closing
        to the close() or open() under way: one inside that very call (a
        signal's handler that closes the frontend), or one of a thread
        that close() waits for to end (a finaliser that the event thread,
        the reaper or XenStore's threads run), when another thread's
        close() or open() runs.
        """
        # Before the lock is tried: an open() that holds it looks once it
        # let go of it (see there).
        self._close_asked = True
        me = threading.current_thread()
        xs = self._xs  # once: the close() under way drops it once closed
        joined = (me is self._thread or me is self._reaper
                  or (xs is not None and xs.on_own_thread()))
        opener = self._opener
        if xs is not None and opener is not None and opener is not me and not joined:
            # An open() would keep the lock through its waits for the
            # backend, each up to the timeout (one that never answers):
            # woken, they find the flag set and give up.  Not from the
            # opener's own thread (a handler), nor one of XenStore's,
            # which may hold the lock that the waking takes.
            xs.wake_waiters()
        try:
            with held(self._close_lock, Deadline(0.0 if joined else None), _ClosingElsewhere):
                if self._closer is me or self._opener is me:
                    # Inside this thread's close(), which goes on, or
                    # open(), which fails once done.
                    return
                # One of this thread's that ran before this line (a
                # handler, as the lock's taking returned) ran whole: this
                # one finds the frontend closed.
                self._closer = me
                try:
                    if self.device is not None:
                        self._close_device()
                    self._release_handles()
                finally:
                    self._closer = None
        except _ClosingElsewhere:
            pass

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
        self._free_every_ring()
        owned = self._owns_device()
        if not owned:
            # A frontend opened after this one died added the device again
            # (it is that one's now), or the host removed it: only this
            # one's own resources go.
            logger.info("pvcalls device %d of domain %d is no longer this frontend's "
                        "(added again, or removed): leaving it alone",
                        self.devid, self.domain.domid)
        elif (self._xs is not None and (self._connected or self._published is not None)
              and not self._xenstore_gone()):
            # Also a handshake cut short once it published its ring (a
            # close() made meanwhile): the backend may be Connected, and
            # goes Closed only once we are.
            try:
                owned = self._write_own_nodes({"state": str(XenbusState.CLOSING.value)})
                # Not on XenStore's watch thread (a finaliser run there):
                # the watch that would tell it the backend's state runs on
                # that very thread.  The toolstack's removal still waits
                # for the backend to close.  Nor for a backend that may
                # never have answered.
                if owned and self._connected and not self._xs.on_own_thread():
                    self._wait_backend(
                        lambda s: s >= XenbusState.CLOSING or s == XenbusState.UNKNOWN, "Closing"
                    )
                if owned:
                    owned = self._write_own_nodes({"state": str(XenbusState.CLOSED.value)})
            except (OSError, TimeoutError) as exc:
                logger.warning("closing frontend of domain %d: %s", self.domain.domid, exc)
        # A backend that never connected may not be there at all: do not
        # wait the full timeout for it to close.
        wait = self.timeout if self._connected else min(self.timeout, 2.0)
        was_connected, self._connected = self._connected, False
        if owned and not self._xenstore_gone():
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

    def _xenstore_gone(self) -> bool:
        """Whether XenStore ended our connection.  Not _xs_lost alone:
        XenStore fails the requests it left waiting, and ends the waits of
        wait_for() (the handshake's, close()'s for Closing), before it
        calls on_lost (_lost_xenstore), which records it.  A close() that
        those failures sent here would find nothing recorded yet, ask the
        XenStore that is gone, and warn of what failed.  ``connected`` is
        False from the first of them on (xenbus's _connection_gone reads
        it too), and for a connection never made, which has nothing to
        tell us either."""
        xs = self._xs
        return self._xs_lost is not None or (xs is not None and not xs.connected)

    def _owns_device(self) -> bool:
        """Whether the device's frontend directory still holds the ring-ref
        and port this frontend published: once dead, it may have been added
        again for another frontend, whose device close() must not touch (or
        removed by the host, as for a dying domain: nothing left to do).
        True when it cannot tell (nothing published yet, or XenStore is
        gone, and with it the host)."""
        if self._published is None or self._xs is None or self._xenstore_gone():
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
        # No answer is taken off the command ring any more: a RELEASE
        # still in flight now is never answered.  One claimed after
        # _wait_releases and before the frontend died (another thread's
        # close()) would keep its ring for the life of the process.  Freed
        # while the backend may still map it (it went away, or the device's
        # removal failed) as _wait_releases frees one: a grantee keeps
        # what it mapped until it unmaps (Linux's gntalloc defers ending
        # such a grant, and the page's reuse, to the unmap; so does the
        # simulated host), so no page the backend still maps is reused.
        self._give_up_releases()
        # Before the handles they were made through: what a close() that a
        # Ctrl-C cut short left, or what the device part was not run for.
        self._free_every_ring()
        # The overflows not said since the last report: none goes unmentioned.
        self._overflows.close(logger)
        # No answer is matched any more: drop what the table still holds
        # (what a backend that went away left unanswered), and with it the
        # callbacks and what they hold (an unanswered RELEASE's pages), not
        # kept until the next open().
        with self._lock:
            self._slots = [None] * RING_SLOTS
            self._room_waiters.clear()
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
        PV Calls: others fail with :class:`OSError` EAFNOSUPPORT.

        Also :class:`OSError` ENOTCONN before :meth:`open` or once the
        backend went away (EIO once the frontend itself failed),
        :class:`TimeoutError` if the backend does not answer within the
        frontend's ``timeout``, or the backend's refusal as a host
        socket's error (EMFILE: the domain is at its ``max_sockets``).
        """
        if family != socket.AF_INET or type != socket.SOCK_STREAM or proto not in (0, 6):
            raise OSError(errno.EAFNOSUPPORT, "PV Calls only carries AF_INET SOCK_STREAM sockets")
        if self.device is None:
            # Never opened, or closed: say how to open it, rather than a
            # "not connected" that reads as the backend's doing.
            raise OSError(errno.ENOTCONN, "the frontend is not open: use it in a with block, "
                                          "or open() it first")
        if not self._connected:
            raise OSError(errno.ENOTCONN, "frontend is not connected")
        # The socket, once made, is in ``made`` before it is in the table
        # (see _new_socket): a Ctrl-C as that returns leaves it to the
        # except below, not in the table with no caller (the finaliser
        # warned of an "unclosed" socket the program never had, and the
        # reaper sent a RELEASE the backend refused).
        made: list[PVSocket] = []

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
                with self._lock:  # forgotten by the caller: in the table again
                    self._sockets.setdefault(sock.id, sock._st)
                self._release(sock._st, sock)

        # Not _call(): a Ctrl-C landing as its wait returned the answer,
        # before ``ret`` was stored, forgot a socket the backend had made,
        # with no RELEASE.  The slot here says whether the SOCKET went
        # out, and an answered one is released (``late``) as one answered
        # after a timeout is.
        slots: list[Slot] = []
        deadline = Deadline(self.timeout)
        try:
            sock = self._new_socket(into=made)
            slots.append(Slot(PVCALLS_SOCKET, sock.id))
            ret = self._wait_slot(self._submit(slots[0], fill, deadline), slots[0], deadline)
        except BaseException:
            if made:
                self._forget(made[0])
            if slots and slots[0].sent:
                self._abandon(slots[0].req_id, slots[0], late)
            raise
        if ret < 0:
            # Out of the table before anything that calls, where a Ctrl-C
            # may land: as _forget() started, it left the socket in the
            # table, listed, for its finaliser to warn of as unclosed and
            # the reaper to RELEASE; and as its detach() returned, in the
            # table until the frontend closed.  What _forget() does then
            # is only for the socket object, which nobody has.
            with self._lock:
                sock._st.listed = False
                self._sockets.pop(sock.id, None)
            self._forget(sock)
            raise host_error(ret, "socket")
        return sock

    def sockets(self) -> list[PVSocket]:
        """The sockets not yet closed (not those an ACCEPT in flight offers
        the backend: no caller has them yet)."""
        with self._lock:
            socks = [st.owner() for st in self._sockets.values()]
        # Not one whose release a Ctrl-C cut short: closed, if in the table.
        return [sock for sock in socks
                if sock is not None and not sock._offered and not sock._closed]

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
        """Wait until the backend's state satisfies ``done``; return it.
        In open(), a close() made meanwhile fails it with ECANCELED: cut
        short if another thread's (it wakes the wait, see close()), once
        it ends if this thread's own (a handler's); not in close()'s own."""
        assert self._xs is not None
        path = f"{self.device.backend_path}/state"
        opening = self._opener is threading.current_thread()

        def check(value: str | None) -> bool:
            return (opening and self._close_asked) or done(_state(value))

        try:
            state = _state(self._xs.wait_for(path, check, timeout=self.timeout))
            if opening and self._close_asked:
                raise OSError(errno.ECANCELED, "the frontend was closed while it opened")
            return state
        except TimeoutError as exc:
            if opening and self._close_asked:
                raise OSError(errno.ECANCELED,
                              "the frontend was closed while it opened") from exc
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

    def _event_loop(self, wakeup: _Wakeup) -> None:
        """One thread per frontend: read fired ports, run their handlers,
        unmask.  Handlers only copy responses and wake waiters.  Also runs
        the relays of rings with handles of their own (see :meth:`_relay`),
        and starts the reaper when sockets were dropped (see :meth:`_collect`).

        A failure of the event channel handle's pending() or unmask() may
        have taken a port's event, or left the port masked: it is logged,
        and every port's handler runs once more and the port is unmasked,
        before the next wait.  A failure in that hand-out, or in the round
        right after it, is one that stays: it escapes the loop, as does a
        failure of the command ring's handler (the answers it took off
        the ring are lost).  What escapes the loop ends it, and with
        nobody left to take the backend's answers, fails the frontend (see
        :meth:`_fail`).

        pending() failing with EFBIG is no such failure: Linux's queue of
        the handle's fired ports overflowed (it can when a port is
        unmasked before it was taken, as by the hand-out above), and the
        ports that fired meanwhile are masked, their events lost.  The
        handle is reset and every port handed out again, as after a
        failure; a reset that fails is a failure.  But the reset empties
        the queue, and the hand-out after it unmasks each port once: a
        queue that overflows again before it was found empty (by a read,
        or by a round that took the last port: see _serve_round), after
        ``RESETS_IN_A_ROW`` resets in a row, says that the handle is
        broken.  That failure stays (a steady overflow would otherwise
        spin the thread, a reset and a hand-out of every port per round,
        for ever)."""
        try:
            self._serve_events(wakeup)
        except Exception as exc:
            if isinstance(exc, _Fatal):
                exc = exc.error
            if wakeup.stopping:
                # close() took the handles from under it: nothing waits.
                logger.debug("pvcalls frontend event thread stopping: %s", exc)
                return
            self._fail("its event thread", exc)

    def _serve_events(self, wakeup: _Wakeup) -> None:
        evtchn = self._evtchn
        epoll = self._event_epoll
        assert evtchn is not None and epoll is not None
        shared_fd = evtchn.fileno()
        self._resets = 0
        # failed: a failure that no round has gone well since.  resync:
        # every port is to be handed out again before the next wait (also
        # after the handle was reset: see _serve_round).
        failed = resync = False
        while not wakeup.stopping:
            try:
                if resync:
                    resync = False
                    with self._lock:
                        ports = list(self._handlers)
                    for port in ports:
                        self._handle_port(evtchn, port, wakeup)
                try:
                    events = epoll.poll()
                except InterruptedError:
                    continue
                resync = self._serve_round(evtchn, wakeup, shared_fd, events)
            except _Fatal:
                raise
            except Exception as exc:
                if failed:
                    raise  # it stays
                failed = resync = True
                logger.warning("pvcalls frontend of domain %d: its event thread failed; "
                               "every port is handed out again", self.domain.domid,
                               exc_info=exc)
            else:
                failed = False

    def _serve_round(self, evtchn: EventChannel, wakeup: _Wakeup, shared_fd: int,
                     events: list[tuple[int, int]]) -> bool:
        """Serve what one wait of the event thread found ready.  True if
        the handle overflowed and was reset: every port is to be handed
        out again."""
        if events:
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
                self._kick_owed()
                self._start_reaper(wakeup)
                self._tell_room_waiters()
            for relay in relays:
                try:
                    relay()
                except Exception:
                    logger.exception("pvcalls frontend relay")
        if not any(fd == shared_fd for fd, _ in events):
            return False
        for _ in range(_PORT_BATCH):
            if wakeup.stopping:
                # Stopped by a close() that a relay or handler ran here (a
                # finaliser), which closed the handle: nothing to serve.
                return False
            try:
                port = evtchn.pending()
            except OSError as exc:
                if exc.errno != errno.EFBIG:
                    raise
                self._reset(evtchn, exc)
                return True
            if port is None:
                self._resets = 0
                return False
            self._handle_port(evtchn, port, wakeup)
        # More are pending, and the next wait says so at once; or the batch
        # took the last one, and the next wait blocks: then the queue is
        # empty as surely as a read finding it so, which ends the resets in
        # a row (see _reset).  Level-triggered: not ready is empty (Linux's
        # poll says POLLERR once it overflowed).
        ready = select.poll()
        ready.register(shared_fd, select.POLLIN)
        if not ready.poll(0):
            self._resets = 0
        return False

    def _reset(self, evtchn: EventChannel, overflow: OSError) -> None:
        """The shared handle's pending() said EFBIG, ``overflow``: reset
        the handle, unless it overflowed again after too many resets in a
        row (see :meth:`_event_loop`)."""
        if self._resets >= RESETS_IN_A_ROW:
            broken = OSError(
                errno.EFBIG,
                f"its event channel handle overflowed again after {self._resets} resets "
                f"in a row, its queue of fired ports never read empty between them "
                f"(a reset empties it): the handle is broken")
            # On the error the frontend fails with, not on _Fatal.
            broken.__cause__ = overflow
            raise _Fatal(broken)
        # Counted before it is tried: a reset that fails counts too.
        self._resets += 1
        evtchn.reset()
        self._overflows.log(logger, logging.WARNING,
                            "pvcalls frontend of domain %d: its event channel handle "
                            "overflowed: reset; every port is handed out again",
                            self.domain.domid)

    def _handle_port(self, evtchn: EventChannel, port: int, wakeup: _Wakeup) -> None:
        """Run the handler of ``port`` (masked), then unmask it."""
        # Without _lock, once per event: a data ring's handler is set
        # before its socket's CONNECT or ACCEPT goes out, so an event of the
        # port's present user finds it; a stale one only wakes a socket.
        handler = self._handlers.get(port)
        lost = None
        try:
            if handler is not None:
                handler()
        except Exception as exc:
            if port != self._port:
                # A data ring's handler only wakes its socket's callers.
                logger.exception("pvcalls frontend event handler for port %d", port)
            else:
                lost = exc  # the answers taken off the command ring
        try:
            evtchn.unmask(port)
        except OSError:
            with self._lock:
                if port in self._handlers and lost is None and not wakeup.stopping:
                    raise  # still bound, and left masked
            # Unbound meanwhile, or the handle closed by a close() that the
            # handler ran (a finaliser), or the frontend fails anyway.
        if lost is not None:
            raise _AnswersLost(lost) from lost

    def _stop_thread(self) -> None:
        """Stop the event thread, then wait for the reaper: it frees what
        it releases with the handles that are closed next."""
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.stop()
        deadline = Deadline(_THREAD_STOP_WAIT)
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
        # Not the event thread's own close() (a handler's): the thread is
        # on its way out, and the next open() or close() waits for it to
        # end, so that no two ever run at once.
        if self._thread is not threading.current_thread():
            self._thread = None
        with self._lock:
            epoll, self._event_epoll = self._event_epoll, None
            self._relays.clear()
        if epoll is not None:
            epoll.close()
        # Closed once a finaliser that read it is done with it (see _Wakeup).
        self._wakeup = None

    def _wake_everyone(self) -> None:
        with self._lock:
            self._cmd_cond.notify_all()
            states = list(self._sockets.values())
        for st in states:
            sock = st.owner()
            if sock is None:
                continue
            # The sockets after one that fails here are woken all the
            # same: nothing else would wake them.  (Its fileno() descriptor
            # that cannot be brought up to date is no failure: logged by
            # _on_event, once.)
            try:
                sock._on_event()
            except Exception:
                logger.exception("pvcalls frontend: waking %r failed", sock)

    # -- command ring ----------------------------------------------------------

    def _new_socket(self, *, offered: bool = False,
                    into: list[PVSocket] | None = None) -> PVSocket:
        """A new socket, in the table; also appended to ``into`` first, so
        that a caller that must drop it again (an ACCEPT's id_new that did
        not go out, a socket() cut short) has it whatever interrupts this
        as it returns."""
        sock_id = _ID_BASE + _ID_STRIDE * next(self._ids)
        sock = PVSocket(self, sock_id)
        sock._offered = offered
        if into is not None:
            into.append(sock)
        with self._lock:
            self._sockets[sock_id] = sock._st
            sock._st.listed = True
        return sock

    def _forget(self, sock: PVSocket) -> None:
        """Drop ``sock``, which the backend never made, from the table:
        nothing to release.  May be taken again after a Ctrl-C."""
        sock._closed = True
        with self._lock:
            # Before the pop, with no call between: the finaliser of a
            # socket out of the table (a Ctrl-C as the pop returned,
            # before the detach) warned of it as unclosed.
            sock._st.listed = False
            self._sockets.pop(sock.id, None)
        sock._finalizer.detach()  # nothing left to release

    def _new_data_ring(self, sock: PVSocket) -> DataRing:
        """Give ``sock`` a data ring, a recycled one if the pool has one,
        and return it.

        Whole or nothing, a Ctrl-C included: whatever interrupts it, the
        ring is the pool's or the socket's, whose close() frees it.  As
        ``ring = pool.pop()`` or ``= DataRing()``, a signal's handler run
        as the call returned lost it, with its granted pages, its port
        and (one of its own) its event channel handle.  So it is moved by
        steps that call nothing (where CPython could run the handler)
        into ``rings``, given back from there if it does not get to the
        socket, and moved on to the socket's state likewise."""
        if self._gntshr is None or self._evtchn is None:
            raise OSError(errno.ENOTCONN, "frontend is closed")
        if self._given_back:
            self._return_rings()  # left by a Ctrl-C: maybe one for the pool
        st = sock._st
        rings: list[DataRing] = []
        try:
            with self._lock:
                rings[:] = self._ring_pool[-1:]
                del self._ring_pool[-1:]
                if rings:
                    # A second guard: _return_rings unrelayed it on its way
                    # here, and a fileno() racing with that relays it for
                    # its old socket no more (see _relay).
                    self._unrelay(rings[0])
            if not rings:
                self._make_data_ring(rings)
            else:
                rings[0].reset()
                if rings[0].direct:
                    # Nobody read the idle handle: take the stale event and
                    # the service's news that the old peer unbound (it
                    # came before the RELEASE answer), so that the new
                    # peer's port is the one notified.
                    rings[0].consume_events()
            # The socket's before it is relayed for it (see _relay).  Under
            # its receive and send locks (connect()), or not handed out yet
            # (an ACCEPT's id_new).
            ring = st.ring = rings[0]
            del rings[:]
        except BaseException:
            if rings:
                # One step, from a list that is dropped (see _give_back).
                self._given_back.append((rings[0], True))
            self._return_rings()
            raise
        if not ring.direct:
            with self._lock:
                self._handlers[ring.port] = st.on_event
        elif st.readyfd is not None:
            self._relay(ring, st)
        return ring

    def _make_data_ring(self, into: list[DataRing]) -> None:
        """Append a new data ring to ``into``: on an event channel handle
        of its own if the host lets us open one more.  Whole or nothing,
        as DataRing(): the handle is recorded by the call that opens it,
        and closed unless the ring got it."""
        assert self._gntshr is not None and self._evtchn is not None
        own: list[EventChannel] = []
        try:
            try:
                own.extend(map(operator.call, (self.domain.evtchn,)))
            except OSError as exc:
                logger.debug("no event channel handle of its own for a data ring: %s", exc)
            if own:
                DataRing(self._gntshr, own[0], self.backend_id, self.ring_order, direct=True,
                         into=into)
            else:
                DataRing(self._gntshr, self._evtchn, self.backend_id, self.ring_order,
                         into=into)
        except BaseException:
            # Unless the ring has it: interrupted as DataRing() returned.
            if own and not (into and into[-1].evtchn is own[0]):
                own[0].close()
            raise

    def _relay(self, ring: DataRing, st: SocketState) -> None:
        """Have the event thread watch ``ring``'s own handle, so that the
        readiness descriptor of ``st``'s socket follows the ring with no
        caller blocked in it.

        Not once ``st`` no longer has the ring: a fileno() reads the ring
        under the socket's ``_cond`` but relays it after letting go (the
        lock order), and meanwhile the ring may have gone back to the pool
        (a refused non-blocking connect, a close()) and on to another
        socket, whose readiness descriptor would then never hear of its
        data (its own relay finds the ring relayed).  Whoever takes the
        ring from ``st`` clears ``st.ring`` before it unrelays the ring
        under ``_lock`` (_return_rings): a relay that saw ``st.ring`` here
        is undone there."""
        if not ring.direct:
            return
        with self._lock:
            if (ring.relayed or self._event_epoll is None or st.ring is not ring
                    or ring.failure is not None):
                return
            ring.relayed = True
            fd = ring.evtchn.fileno()
            self._relays[fd] = functools.partial(self._relayed, ring, st)
            self._event_epoll.register(fd, select.EPOLLIN)

    def _relayed(self, ring: DataRing, st: SocketState) -> None:
        """Event thread: the own handle of ``ring``, relayed for ``st``,
        is readable (see :meth:`_relay`)."""
        st.on_relayed_event(ring)
        if ring.failure is not None:
            # Its handle is broken, and left readable (see
            # DataRing.consume_events): watched, it would spin the thread.
            with self._lock:
                self._unrelay(ring)

    def _unrelay(self, ring: DataRing) -> None:
        """Stop watching ``ring``'s handle (under _lock).  The mark goes
        last: cleared first, a Ctrl-C landing before the unregister left
        the handle in the epoll with nothing to say so, the retry of
        _return_rings skipped it, and the next socket the ring served
        failed to relay it (EEXIST) in every connect() or accept()."""
        if ring.relayed:
            fd = ring.evtchn.fileno()
            self._relays.pop(fd, None)
            if self._event_epoll is not None:
                try:
                    self._event_epoll.unregister(fd)
                except OSError:
                    pass  # not registered (done before a Ctrl-C), or closing
            ring.relayed = False

    def _put_data_ring(self, holder: _HoldsRing, *, reusable: bool) -> None:
        """Take back the ring of ``holder`` (a socket's state, or a
        release), if it still has one.  ``reusable``: the backend said it
        let go of it (answered RELEASE, or refused the CONNECT or ACCEPT
        that offered it), so its pages and port may serve the next socket.
        Under the locks that guard ``holder.ring``, and not under a
        socket's ``_cond`` (see :meth:`_give_back`)."""
        self._give_back(holder, reusable=reusable)
        self._return_rings()

    def _give_back(self, holder: _HoldsRing, *, reusable: bool) -> None:
        """Move the ring of ``holder``, if it still has one, to
        ``_given_back``, for :meth:`_return_rings`.  Takes no lock: under
        any, a socket's ``_cond`` included.

        By steps that call nothing, where CPython runs no signal's
        handler, nor switches threads: those run only as a function
        starts, as a loop goes round and as a call returns.  So a Ctrl-C
        finds the ring in the holder or in ``_given_back``, never in
        neither (lost: its pages, port and eventfds for the life of the
        process) nor in both (freed twice), and of two threads giving back
        the same holder's ring one takes it."""
        ring = holder.ring
        if ring is not None:
            holder.ring = None
            self._given_back.append((ring, reusable))

    def _return_rings(self) -> None:
        """Move the rings given back to the pool, or to be freed, and free
        those (see :meth:`_give_back`)."""
        with self._lock:
            given = self._given_back
            while given:
                # From the front: others append meanwhile (see _give_back).
                ring, reusable = given[0]
                # Both again for a ring a Ctrl-C left here after them.
                self._handlers.pop(ring.port, None)
                self._unrelay(ring)
                to = (self._ring_pool if reusable and not self._dead and ring.failure is None
                      and len(self._ring_pool) < _RING_POOL_MAX else self._rings_to_free)
                del given[0]
                to.append(ring)
        if self._rings_to_free:
            self._free_rings()

    def _free_rings(self) -> None:
        """Free the rings in ``_rings_to_free`` that nobody is freeing
        (DataRing.free() is resumable)."""
        self._finish_each(self._rings_to_free, DataRing.free)

    def _finish_each(self, todo: list[_Claimable], step: Callable[[_Claimable], None]) -> None:
        """Take ``step`` for each item of ``todo`` (rings to free, ACCEPTs
        to end) that no thread is taking it for, and drop the item once
        done.  Each is claimed under ``_lock`` and its step taken outside
        it; a Ctrl-C gives the claim back, and whoever comes next takes
        the step again: each must be resumable."""
        mine: _Claimable | None = None
        try:
            while True:
                with self._lock:
                    for item in todo:
                        if not item.claimed:
                            item.claimed = True
                            mine = item
                            break
                    else:
                        return
                step(mine)
                with self._lock:
                    todo.remove(mine)
                mine = None
        except BaseException:
            if mine is not None:
                mine.claimed = False  # first: nothing runs a handler before it
            raise

    def _free_every_ring(self) -> None:
        """Free the pool's rings and those on their way (for close()),
        those of the sockets that released listeners' ACCEPTs offered
        included."""
        if self._accepts_to_end:
            self._end_accepts()  # their rings on their way first
        with self._lock:
            pool = self._ring_pool
            self._ring_pool = []
            self._rings_to_free.extend(pool)  # no handler runs since the line above
            for i, (ring, _) in enumerate(self._given_back):
                self._given_back[i] = (ring, False)
        self._return_rings()

    def _drop_socket(self, sock: PVSocket, *, reusable: bool) -> None:
        """Free a socket the backend never made (a failed ACCEPT's id_new).

        May be taken again, whole or after a Ctrl-C cut it short: each
        step takes what is left (see _give_back).  So a caller keeps the
        socket where the next caller finds it (a listener's
        ``accept_inflight``, ``_accepts_to_end``) until this returns."""
        # The ring first: the socket's state, left in the table by a
        # Ctrl-C, keeps it until then.
        self._put_data_ring(sock._st, reusable=reusable)
        self._forget(sock)

    def _drop_unsent(self, st: SocketState) -> None:
        """Drop the socket in a listener's ``st.unsent`` (see SocketState),
        if any: one whose ACCEPT did not go out.  Under the listener's
        ``_accept_lock``, or once nobody has the listener.  May be taken
        again after a Ctrl-C, as _drop_socket."""
        if st.unsent:
            self._drop_socket(st.unsent[0], reusable=True)  # never the backend's
            del st.unsent[:]

    def _submit(
        self,
        slot: Slot,
        fill: Callable[[Any], None],
        deadline: Deadline,
        *,
        reserve: bool = True,
        sock: PVSocket | None = None,
    ) -> int:
        """Put the request of ``slot`` (its command, for its socket) on the
        command ring, notify the backend, and return its ``req_id``.

        ``req_id`` is the slot index, as in Linux, unless that response
        table entry is still taken (see :meth:`_free_entry`).  A request
        waits (within ``deadline``, and while ``sock``, the socket it is
        for, stays open) for the ring to have room and an entry to be free.
        POLL does not reserve the entry: its answer is matched by command and
        id (Linux does the same).  A CONNECT, ACCEPT or POLL leaves the last
        free slot and entry to others (see ``_LONG_LIVED``): with 32
        non-blocking connects to silent peers in flight, no close() could
        send its RELEASE (it timed out, and left the socket in the backend).

        Whatever it raises, ``slot.sent`` says whether the request went
        out, and ``slot.req_id`` is then its entry: a Ctrl-C between the
        push and the notify leaves a request that the backend will answer
        (the notify it owes is sent by whoever looks next: see
        :meth:`_kick_owed`), and its caller must treat it as it treats an
        interrupted wait for the answer.
        """
        req = ffi.new("struct xen_pvcalls_request *")
        req.cmd = slot.cmd
        fill(req)
        spare = 1 if slot.cmd in _LONG_LIVED else 0
        try:
            with self._lock:
                while True:
                    if self._dead:
                        raise self._gone()
                    ring = self._ring
                    if ring is None:
                        raise OSError(errno.ENOTCONN, "the PV Calls frontend is not connected")
                    if sock is not None and sock._closed:
                        raise bad_fd()
                    req_id = self._free_entry()
                    if req_id is not None and self._has_room(spare):
                        break
                    if deadline.timeout == 0.0:
                        raise BlockingIOError(errno.EAGAIN, "the command ring is full")
                    # Bounded (see Deadline.recheck): the wake-up of room
                    # made, or of sock's close(), is lost to a Ctrl-C
                    # landing in the main thread as its notify_all() starts.
                    self._cmd_cond.wait(deadline.recheck())
                req.req_id = slot.req_id = req_id
                raw = bytes(ffi.buffer(req))
                prod = ring.req_prod_pvt
                if reserve:
                    self._slots[req_id] = slot
                try:
                    ring.push_request(raw)
                finally:
                    # No call in here, so no signal's handler runs in it:
                    # the request is on the ring once the index moved (the
                    # next push_requests() publishes it, if this one does
                    # not get to).
                    slot.sent = ring.req_prod_pvt != prod
                    if reserve and not slot.sent:
                        self._slots[req_id] = None
                # Since the last notify, not the last push: one that an
                # interrupt cut off is asked for again.
                notify = ring.push_requests(self._kicked_to)
                pushed = ring.req_prod_pvt
                if not notify:
                    self._kicked_to = pushed
            logger.debug("-> %s req_id=%d id=%#x", PVCALLS_COMMANDS[slot.cmd], req_id,
                         slot.sock_id)
            if notify:
                self._notify(self._port)
                self._kicked_to = pushed
        except BaseException:
            if slot.sent:
                # Perhaps with its notify owed: the event thread sends it,
                # if nobody submits or waits before.
                wakeup = self._wakeup
                if wakeup is not None:
                    wakeup.set()
            raise
        return req_id

    def _kick_owed(self) -> None:
        """Notify the backend if a submitter was interrupted between its
        push and its notify (see :meth:`_submit`), and nobody notified
        since: its request, and every one after it, would wait for the
        next command's push.  Called by waiters and the event thread."""
        ring = self._ring
        if ring is None or self._kicked_to == ring.req_prod_pvt:
            return  # read without the lock: nothing pushed since the last kick
        with self._lock:
            ring = self._ring
            if ring is None or self._dead:
                return
            notify = ring.push_requests(self._kicked_to)
            pushed = ring.req_prod_pvt
            if not notify:
                self._kicked_to = pushed
                return
        self._notify(self._port)
        self._kicked_to = pushed

    def _has_room(self, spare: int) -> bool:
        """Under _lock: whether the command ring and the response table
        have room for a request that leaves ``spare`` of each to others."""
        assert self._ring is not None
        return self._ring.free_slots > spare and self._slots.count(None) > spare

    def _want_room(self, sock: PVSocket) -> bool:
        """Listener ``sock`` found no room for a POLL or ACCEPT and will
        not wait for it: True if there is room now (try again); else the
        event thread calls ``sock._on_room()`` once answers make room.

        Registered under _lock, where room is made (answers consumed,
        entries freed: see _room_made): either the caller sees the room,
        or the one who makes it sees the caller.  ``sock._no_room`` (which
        keeps its fileno() unreadable) is set after the registration, with
        no call between: a Ctrl-C leaves it set only with an _on_room to
        come, and at worst unset with one, which costs a wakeup."""
        with self._lock:
            room = self._dead or self._ring is None or self._has_room(1)
            if not room and sock not in self._room_waiters:
                self._room_waiters.append(sock)
            with sock._mutex:
                sock._no_room = not room
            return room

    def _poll_later(self, sock: PVSocket) -> None:
        """Have the event thread send the POLL that listener ``sock``'s
        fileno() needs (through ``sock._on_room()``, as once there is
        room): a call that marked it in flight failed to send it, and
        another that saw the mark meanwhile (fileno(), _on_room) returned,
        counting on it.  Never waits, and raises nothing: it runs as a
        Ctrl-C or an error goes by, which must come out as it came."""
        with self._lock:
            if sock not in self._room_waiters:
                self._room_waiters.append(sock)
            wakeup = self._wakeup
        if wakeup is not None:
            wakeup.set()  # never closed under a holder (see _Wakeup)

    def _room_made(self) -> None:
        """Under _lock: an answer freed a ring slot or a response table
        entry.  Wake submitters waiting for room, and have the event
        thread tell the sockets that would not wait (_tell_room_waiters)."""
        self._cmd_cond.notify_all()
        if self._room_waiters and self._wakeup is not None:
            self._wakeup.set()

    def _tell_room_waiters(self) -> None:
        """Event thread: if there is room, call ``_on_room()`` of every
        socket waiting for it (see _want_room); a socket that finds none
        left registers again."""
        if not self._room_waiters:
            # Read without the lock, once per command event: a socket
            # registers only after seeing no room under it, and whoever
            # makes room outside this thread wakes it (_room_made).
            return
        with self._lock:
            if (not self._room_waiters or self._ring is None
                    or not self._has_room(1)):
                return
            waiters, self._room_waiters = self._room_waiters, []
        for sock in waiters:
            try:
                sock._on_room()
            except Exception:
                logger.exception("pvcalls frontend: telling %r of room", sock)

    def _free_entry(self) -> int | None:
        """Under _lock: the response table entry for the next request: the
        slot index (``req_prod_pvt``'s, as Linux's req_id), or if that
        entry still waits for its answer, the next free one after it; None
        if all are taken.

        Not the slot index alone, as Linux: a CONNECT left in flight by a
        non-blocking connect() keeps its entry until the peer answers (a
        host's SYN retries last minutes, and a dropped SYN for ever), and
        every request coming round to it, the RELEASE that would cut it
        short among them, would wait for it: the whole frontend stalled 31
        commands after one connect to a slow peer.  The backend only echoes
        req_id, so any free entry serves."""
        assert self._ring is not None
        first = self._ring.req_prod_pvt & (RING_SLOTS - 1)
        for i in range(RING_SLOTS):
            req_id = (first + i) & (RING_SLOTS - 1)
            if self._slots[req_id] is None:
                return req_id
        return None

    def _wait_slot(
        self, req_id: int, slot: Slot, deadline: Deadline, sock: PVSocket | None = None
    ) -> int:
        """Wait for the answer in ``slot``; free it and return ``ret``.

        On timeout (or when ``sock`` gets closed) the slot stays reserved and
        the request in flight; the caller either waits again later or
        abandons it.
        """
        self._kick_owed()
        with self._lock:
            while not slot.done:
                # The socket first: Frontend.close() closes its sockets
                # before it marks itself dead, and a call that looks only
                # after that says what happened to it, as one looking at
                # once does, not what came after.
                if sock is not None and sock._closed:
                    raise bad_fd()
                if self._dead:
                    raise self._gone()
                if deadline.timeout == 0.0:
                    raise BlockingIOError(errno.EAGAIN, "operation would block")
                # Bounded (see Deadline.recheck): sock's close(), or the
                # frontend's, woke this, and a Ctrl-C landing in the main
                # thread as its notify_all() starts lost the wake-up.
                self._cmd_cond.wait(deadline.recheck())
            if self._slots[req_id] is slot:
                self._slots[req_id] = None
                self._room_made()  # a submitter may wait for this entry
            return slot.ret

    def _abandon(self, req_id: int, slot: Slot,
                 on_late: Callable[[int], None] | None = None) -> None:
        """Nobody will wait for ``slot``: free it now if answered, else when
        the answer comes.  ``on_late(ret)`` is called with the answer, now
        or by the event thread when it comes."""
        with self._lock:
            answered = slot.done
            if answered:
                if self._slots[req_id] is slot:
                    self._slots[req_id] = None
                    self._room_made()
            elif on_late is not None:
                slot.on_done = on_late
            else:
                slot.abandoned = True
        if answered and on_late is not None:
            on_late(slot.ret)

    def _call(self, cmd: int, sock_id: int, fill: Callable[[Any], None], deadline: Deadline,
              sock: PVSocket | None = None, on_late: Callable[[int], None] | None = None,
              on_done: Callable[[int], None] | None = None) -> int:
        """Submit one command and wait for its ``ret``; abandon it on timeout
        (or when ``sock`` gets closed, or an interrupt), with ``on_late``
        to take the answer (see :meth:`_abandon`), also when an interrupt
        cut the submit short after the request went out.  ``on_done``
        (not with ``on_late``): called with the answer by the event thread
        as it comes, whether this call waits for it or not."""
        slot = Slot(cmd, sock_id)
        slot.on_done = on_done
        try:
            req_id = self._submit(slot, fill, deadline, sock=sock)
            return self._wait_slot(req_id, slot, deadline, sock)
        except BaseException:
            if slot.sent:
                self._abandon(slot.req_id, slot, on_late)
            raise

    def _on_command_event(self) -> None:
        """Event thread: consume every response on the command ring."""
        polls: list[tuple[PVSocket, int]] = []
        accepts: list[PVSocket] = []
        done: list[tuple[Callable[[int], None], int]] = []
        broken: RingError | None = None
        with self._lock:
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
            handover = self._handover
            handover.extend((sock._on_poll, (ret,)) for sock, ret in polls)
            # See _readable().
            handover.extend((sock._update_ready_or_log, ()) for sock in accepts)
            handover.extend((callback, (ret,)) for callback, ret in done)
            self._cmd_cond.notify_all()
        if broken is not None:
            logger.error("pvcalls backend of domain %d broke the command ring: %s",
                         self.domain.domid, broken)
            self._wake_everyone()
        while handover:
            try:
                fn, args = handover.popleft()
            except IndexError:
                break  # a close() run by the last one handed over the rest
            self._complete(fn, *args)
        self._tell_room_waiters()

    @staticmethod
    def _complete(fn: Callable[..., None], *args: Any) -> None:
        """Event thread: ``fn(*args)``, one socket's part of an answer.  What
        it raises is that socket's (its fileno() descriptor closed by the
        program, say), not the command ring's: logged, and the answers
        after it are still handed over."""
        try:
            fn(*args)
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

    def _release(self, st: SocketState, sock: PVSocket | None = None) -> None:
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
        # Resumable, as close() must be under Ctrl-C.  The release is
        # claimed under _lock (st.release), the state staying in the table
        # until the release is done.  Until the RELEASE went out an
        # interrupt gives the claim back, the socket whole, for the next
        # close(), the reaper (a socket then dropped) or Frontend.close()
        # to release; once it went out any of them finishes the rest.
        # Before a close() that marked the socket closed and was cut short
        # there returned at once the next time, the socket left in the
        # backend for good.
        rel = _Release(st.id)  # made before it may be the claim
        slot = Slot(PVCALLS_RELEASE, st.id)
        claimed = False
        interrupted: BaseException | None = None
        try:
            with self._lock:
                if self._sockets.get(st.id) is not st:
                    return  # released
                # Read once: the claimer gives an unsettled claim back
                # without the lock (see SocketState.release).
                claim = st.release
                if claim is not None:
                    if not claim.settled:
                        return  # another thread is sending the RELEASE
                    rel = claim  # a release a Ctrl-C cut short
                else:
                    st.release = rel
                    claimed = True
                    if self._dead or self._ring is None:
                        rel.settled = True  # no RELEASE to send
                    else:
                        # Registered with the claim: a Frontend.close()
                        # that found it claimed waits for this RELEASE
                        # (_wait_releases).
                        self._releases.add(rel)
            if claimed and not rel.settled:
                self._send_release(rel, slot)
        except BaseException as exc:
            if not claimed or rel.settled:
                raise
            if not slot.sent:
                # Not sent: the claim goes back, and with it the release.
                st.release = None  # first: nothing runs a handler before it
                with self._lock:
                    self._releases.discard(rel)
                    self._cmd_cond.notify_all()  # close() may wait for the last one
                raise
            # Interrupted between the push and the notify (see _submit):
            # sent, and finished here.
            rel.settled = True
            interrupted = exc
        if sock is None:
            # Dropped: no call of the socket is left to wait out, and
            # nobody else can reach its state but another release.
            self._take(st, rel)
            self._drop_unsent(st)
            with self._lock:  # which another release may be at too
                fd_error = self._close_readyfd(st)
        else:
            # The socket's own calls have seen _closed and left (or, a
            # CONNECT cut short by this RELEASE, gave its ring back): take
            # the ring under their locks so that exactly one party frees it.
            # Within the timeout: a lock still held then is a call's that
            # does not leave (an interrupt leaves none held: see held()
            # and taken_if_free()), and what it guards is left alone
            # rather than freed under a possible user.
            deadline = Deadline(self.timeout)
            try:
                with held(sock._accept_lock, deadline):
                    self._take(st, rel, ring=False)
                    self._drop_unsent(st)
            except (TimeoutError, BlockingIOError):
                logger.warning("socket %#x: its accept lock is still held; a pending ACCEPT "
                               "is not freed", st.id)
            try:
                with (held(sock._recv_lock, deadline), held(sock._send_lock, deadline),
                      sock._mutex):
                    self._take(st, rel, inflight=False)
            except (TimeoutError, BlockingIOError):
                logger.warning("socket %#x: a call's lock is still held; its ring is not freed",
                               st.id)
            with sock._mutex:  # under which the event thread's updates use it
                fd_error = self._close_readyfd(st)
        with self._lock:
            # Answered, or no answer is waited for (never sent, or given
            # up on by Frontend.close()): what rel holds is ours to free.
            # Else the answer frees it.
            finish = rel.ret is not None or rel not in self._releases
            released = rel.ret == 0
        if finish:
            self._finish_release(rel, released=released)
        # Last: until here a release cut short is found in the table.
        with self._lock:
            self._sockets.pop(st.id, None)
        if sock is not None:
            # Not by the finaliser too; a closed socket the program drops
            # is no warning.
            sock._finalizer.detach()
        if interrupted is not None:
            raise interrupted
        if fd_error is not None:
            raise fd_error

    @staticmethod
    def _close_readyfd(st: SocketState) -> OSError | None:
        """Close the readiness pair of ``st``, if it has one (under a lock
        that keeps whoever else may use it out).  Returns the EBADF of a
        descriptor the program closed, for the release to raise once the
        rest is freed, as socket.socket's close() says it.

        Taken out of the state once closed, by a store: a Ctrl-C landing
        anywhere before leaves it there for the next release to close
        (ReadyFd.close may be taken again).  Taken out first, one landing
        before the close (as the lock it was taken under was let go of,
        or as ReadyFd.close started) left both ends to the collector."""
        fd = st.readyfd
        if fd is None:
            return None
        try:
            fd.close()
        except OSError as exc:
            st.readyfd = None
            return exc
        st.readyfd = None
        return None

    def _send_release(self, rel: _Release, slot: Slot) -> None:
        """Send ``rel``'s RELEASE (not waiting for the answer), claimed by
        _release; settle it, also if it cannot be sent."""

        def fill(req: Any) -> None:
            req.u.release.id = rel.sock_id
            req.u.release.reuse = 0

        # The event thread (releasing the socket of a SOCKET answered after
        # its caller gave up, see socket(), or one a released listener's
        # ACCEPT accepted, see _end_accept) must not wait for a slot only
        # it can free.
        timeout = 0.0 if threading.current_thread() is self._thread else self.timeout
        slot.on_done = functools.partial(self._released, rel)
        try:
            self._submit(slot, fill, Deadline(timeout))
        except (OSError, TimeoutError) as exc:
            # Moot if the backend went away meanwhile: the socket went
            # with it (every call says so, with ENOTCONN).  Else what it
            # shared is freed with no answer to wait for.
            level = logging.DEBUG if self._dead else logging.WARNING
            logger.log(level, "RELEASE of %#x failed: %s", rel.sock_id, exc)
            if not slot.sent:  # sent, its notify failed: the answer may come
                with self._lock:
                    self._releases.discard(rel)
                    self._cmd_cond.notify_all()  # close() may wait for the last one
        rel.settled = True

    @staticmethod
    def _take(st: SocketState, rel: _Release, *, ring: bool = True,
              inflight: bool = True) -> None:
        """Move what ``st`` shares to ``rel``, by steps that call nothing
        (see _give_back): a release cut short and taken up again finds
        each piece in one place."""
        if ring and st.ring is not None:
            rel.ring = st.ring
            st.ring = None
        if inflight and st.accept_inflight is not None:
            rel.inflight = st.accept_inflight
            st.accept_inflight = None

    def _collect(self, st: SocketState) -> None:
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

        A socket whose close() a Ctrl-C cut short was closed by the
        program all the same: the reaper finishes its release, with no
        warning.
        """
        if not st.listed:
            # Dropped as it was made (a Ctrl-C in _new_socket, or in
            # accept() before the ACCEPT's new socket was in its list):
            # nothing to release, and no socket the program had.
            return
        # What it was, before the reaper takes its ring.
        message = f"unclosed {st.describe(closed=False)}"
        self._dropped.append(st)
        wakeup = self._wakeup  # once: _stop_thread may drop it meanwhile
        if wakeup is not None:
            wakeup.set()
        if st.close_called:
            return
        # Last, as a warning filter may turn it into an exception.  Without
        # socket.socket's ``source``: the socket is gone.  stacklevel 3 is
        # the code that dropped it (under _collect, weakref.finalize).
        warnings.warn(message, ResourceWarning, stacklevel=3)

    def _start_reaper(self, wakeup: _Wakeup) -> None:
        """Event thread: start the reaper if sockets were dropped and it is
        not running.  Not the event thread itself: a RELEASE may have to
        wait for room on the command ring, which only the event thread
        makes."""
        with self._lock:
            if not self._dropped or self._reaper is not None or wakeup.stopping:
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
            if rel not in self._releases:
                return  # Frontend.close() gave up waiting, and freed it
            self._releases.discard(rel)
            self._cmd_cond.notify_all()
        # What the release has moved here so far; it frees what it moves
        # after this (see _release).
        self._finish_release(rel, released=ret == 0)

    def _finish_release(self, rel: _Release, *, released: bool) -> None:
        """Free what ``rel`` holds of a released socket: its ring and
        pending ACCEPT.  ``released``: the backend answered RELEASE, so
        they may be reused.  Whoever else finishes ``rel`` meanwhile takes
        none of what this takes (see _give_back)."""
        with self._lock:  # the one place that takes from rel: one party at a time
            ring = rel.ring
            if ring is not None:
                # As Linux: after RELEASE the frontend writes -EBADF into
                # in_error.  Before the ring leaves rel: once it has, it
                # may be on its way to the next socket.
                ring.set_in_error(-_errno.EBADF)
                self._give_back(rel, reusable=released)
            if rel.inflight is not None:
                # Made while rel still holds it; then moved by steps that
                # call nothing, as _give_back moves a ring: held in a local
                # variable instead, a Ctrl-C lost the socket the ACCEPT
                # offers, its ring with it.
                ending = _EndingAccept(rel.inflight, released)
                rel.inflight = None
                self._accepts_to_end.append(ending)
        self._return_rings()
        if self._accepts_to_end:
            self._end_accepts()

    def _end_accepts(self) -> None:
        """End the ACCEPTs in ``_accepts_to_end`` that nobody is ending
        (each step of :meth:`_end_accept` may be taken again)."""
        self._finish_each(self._accepts_to_end, self._end_accept)

    def _end_accept(self, ending: _EndingAccept) -> None:
        """Free the slot of a released listener's ACCEPT and the socket it
        offered."""
        req_id, slot, new = ending.inflight
        self._abandon(req_id, slot)
        # Read after the abandon, and the same every time: the listener's
        # RELEASE was answered after the ACCEPT (ring order), and one not
        # answered makes the socket go whatever the ACCEPT's answer says.
        if ending.released and slot.done and slot.ret == 0:
            # The backend accepted a connection into the new socket
            # before the RELEASE (it answers in ring order): that socket
            # is not the listener's, and is released in turn (its ring
            # comes back with that answer, not before).
            new.close()  # never handed out: no makefile() stream holds it
        else:
            # The backend released the listening socket, and with it
            # the pending ACCEPT's new socket.
            self._drop_socket(new, reusable=ending.released)

    def _wait_releases(self) -> None:
        """Wait (up to ``timeout``) for the RELEASEs in flight; free what
        the unanswered ones hold without reusing it.  Each is given up on
        once freed: a Ctrl-C meanwhile leaves the rest to the next close()."""
        deadline = Deadline(self.timeout)
        if threading.current_thread() is self._thread:
            self._take_own_answers(deadline)
        with self._lock:
            while self._releases and not self._dead:
                try:
                    self._cmd_cond.wait(deadline.nap())
                except TimeoutError:
                    break
        self._give_up_releases()

    def _take_own_answers(self, deadline: Deadline) -> None:
        """The event thread in close(): take the RELEASEs' answers off the
        command ring itself, within ``deadline``, for waiting for them
        would wait for itself (the whole timeout, then give them up).
        Those it took already, as it handed over an answer before them
        that led here, it hands over too (see ``_handover``)."""
        while True:
            self._on_command_event()
            with self._lock:
                if not self._releases or self._dead:
                    return
                try:
                    nap = deadline.nap()
                except TimeoutError:
                    return
                self._cmd_cond.wait(_OWN_ANSWERS_POLL if nap is None
                                    else min(nap, _OWN_ANSWERS_POLL))

    def _give_up_releases(self) -> None:
        """Free what the RELEASEs in flight hold, without reusing it: for
        close(), which waits no longer for their answers."""
        with self._lock:
            left = list(self._releases)
        for rel in left:
            logger.warning("RELEASE of %#x not answered", rel.sock_id)
            # Given up on only once found empty, under _lock: a close()
            # still taking what its socket shared frees it itself if it
            # finds rel given up, and leaves it to us if not (_release),
            # so what it moved here before we gave up is ours to free.
            given_up = False
            while not given_up:
                self._finish_release(rel, released=False)
                with self._lock:
                    given_up = rel.ring is None and rel.inflight is None
                    if given_up:
                        self._releases.discard(rel)
