"""The XenStore server: Unix sockets, one selector loop, many clients.

Design
------
One thread (the *loop thread*) owns everything: the listening sockets, the
client connections, the store, the watches.  It waits in a selector, reads
whatever a ready client sent, processes every complete request in it and
queues the replies, then tries to send all queued output without blocking.
No request ever waits for another client, so a slow or dead client cannot
stall the others:

* a client that stops reading its replies is paused: once more than
  ``PAUSE_OUTPUT`` bytes wait for it, its further requests stay unread in
  the kernel until it catches up;
* watch events are queued regardless (they are caused by other clients),
  except one identical to an event still waiting (cxenstored's rule);
* no client is disconnected for what waits for it.  As in cxenstored since
  XSA-326, the server's memory stays bounded by charging the events:

  - an event for a guest is dropped when queuing it would put more than
    ``max_queued`` bytes waiting for that guest's connections
    (cxenstored's memory quota, which its send_event() checks);
  - a guest is held back while ``Quota.outstanding`` of its requests
    are outstanding: its further requests wait in the kernel, as
    cxenstored stops reading the guest's ring.  As in cxenstored, a
    request is outstanding from the moment it fires an event that waits
    (for whichever client) until the last of the events it fired is sent
    or dropped, however many it fired: one write watched 20 times is one
    request, not 20.  cxenstored counts the request while its reply
    waits too; here a client's own replies are bounded by
    ``PAUSE_OUTPUT`` instead, so only requests with events waiting count;
  - an event for a guest that waits ``watch_event_timeout`` seconds with
    none of it sent is dropped (cxenstored's watch-event timeout, 20 s):
    a guest that never reads can stall a guest whose writes it watches
    for that long, never for good.  One the kernel took part of goes on
    whole, but stale, it no longer keeps the request that caused it
    outstanding;
  - an event for a privileged client (dom0, which the backends use) is
    never dropped.  Only dom0's own doings can grow dom0's queue without
    bound: dom0 is trusted, and cxenstored lets its queue grow too.  A
    dom0 that never reads therefore stalls the guests whose events wait
    for it, for good, as in cxenstored.

A held-back connection with nothing to send is out of the selector (its
requests wait in the kernel), but in ``_hup``, an epoll set listening for
nothing, which epoll reports hang-ups on all the same: a guest that closes
its socket, or dies, while held back is forgotten at once (its watches and
transactions with it), not once dom0 reads.  A client that only shut its
writing side still gets the replies to what it sent, and the watch events
queued meanwhile; it is closed once nothing waits to be sent (cxenstored
drops what waits at once).

A header announcing more than XENSTORE_PAYLOAD_MAX bytes means the stream is
out of sync for good: the client is disconnected (cxenstored does the
same).  Every other malformed request gets an error reply.

Threading rules
---------------
* Only the loop thread touches connections, domains, the store and the
  watches.  There are no locks around them.  (A stop() that comes before
  the loop began closes what start() made itself: the loop then never
  runs, see ``_entered``.)
* Other threads (the public methods of :class:`XenStored`) hand work to the
  loop thread with :meth:`XenStored._call`: the callable goes on a deque,
  one byte on the wake socket makes the loop run it, and the caller waits
  on a Future.  ``_calls_lock`` makes "append unless the loop has ended"
  and "end the loop, cancel what is queued" exclusive, so no caller can
  wait for a loop that is gone.  Nor for one that is stuck: a caller
  waits ``STOP_TIMEOUT`` at most, as stop() does.
* The loop thread emits no record where a stop() may wait for it: it
  keeps what it logs and emits it once its callbacks ran, before the
  replies go out, one record at a time, none while a stop() joins it
  (see ``_say``).  Emitting takes the
  handlers' locks, and a stop() from a signal's handler come in where the
  main thread held one would wait for the loop, the loop for it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import functools
import heapq
import itertools
import logging
import math
import os
import select
import selectors
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from xenback._flags import DOMID_FIRST_RESERVED, check_xenstore_domid

from .._heldlog import EMITTER_WAIT, emit, log, records_kept
from .._unix import listen_error
from ._connection import Connection, Domain, Outstanding, WaitingEvent
from ._ops import Dispatcher, Quota
from ._wire import HEADER, HEADER_SIZE, PAYLOAD_MAX, XsError

__all__ = ["XenStored"]

logger = logging.getLogger(__name__)


def _log() -> logging.Logger:
    """The logger, or one keeping its records: the loop's (see _say), or
    a caller's (see _call)."""
    return log(logger)


T = TypeVar("T")

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_RECV_SIZE = 65536
# How long a listener whose accept() failed for want of a descriptor goes
# unwatched (seconds), unless a connection closes first.
_ACCEPT_RETRY = 0.1
# The longest the loop waits in select() (seconds): epoll takes at most
# INT_MAX milliseconds (about 24.8 days), and watch_event_timeout may be
# longer.  Waking early costs nothing: an expiry entry may be early.
_MAX_WAIT = 86400.0
_unpack_header = HEADER.unpack_from

#: Stop reading a client's requests while this many reply bytes wait for it.
PAUSE_OUTPUT = 64 * 1024
#: The least ``max_queued`` that lets a paused client still get the reply
#: that paused it and some events.
MIN_QUEUED = PAUSE_OUTPUT + 4 * (HEADER_SIZE + PAYLOAD_MAX)
#: XenStored's default ``max_queued`` (bytes).
MAX_QUEUED = 1 << 20
#: XenStored's default ``watch_event_timeout`` (seconds): cxenstored's.
WATCH_EVENT_TIMEOUT = 20.0
#: How long :meth:`XenStored.stop` waits for the loop thread by default,
#: and a call from another thread for the loop to run it (seconds).
#: Stopping closes sockets and forgets state, and a call (introducing or
#: releasing a domain) waits for one pass of the loop and runs as one:
#: far less, even on a loaded machine; a loop not done by then is stuck.
STOP_TIMEOUT = 10.0


def _each(steps: Iterable[Callable[[], object]], doing: str) -> None:
    """Run every step whatever the one before met: a failure (a bug of
    ours) is logged with its traceback, never raised, when what follows
    must still be done (closing a connection, stopping the server)."""
    for step in steps:
        try:
            step()
        except Exception:
            _log().exception("internal error %s", doing)


def _stuck_at(thread: threading.Thread) -> str:
    """Where ``thread`` is, as a traceback's lines, for an error saying it is stuck."""
    frame = sys._current_frames().get(thread.ident or 0)
    where = "".join(traceback.format_stack(frame)) if frame is not None else "?\n"
    return where.rstrip()


def _as_float(seconds: float) -> float:
    try:
        return float(seconds)
    except OverflowError:  # an int
        return math.inf


def check_limits(max_queued: int, watch_event_timeout: float | None) -> None:
    """Raise TypeError or ValueError unless XenStored takes these (for its
    users that make one later, so that they can say so at once).  The one
    place that says which limits are good: xenback-sim asks it too."""
    # Types first: compared unchecked, a string raises a TypeError naming
    # no argument, and a float or a bool would pass for a count or seconds.
    if isinstance(max_queued, bool) or not isinstance(max_queued, int):
        raise TypeError(f"max_queued must be an int, not {type(max_queued).__name__}")
    if watch_event_timeout is not None and (isinstance(watch_event_timeout, bool)
                                            or not isinstance(watch_event_timeout, int | float)):
        raise TypeError(f"watch_event_timeout must be a number of seconds or None, "
                        f"not {type(watch_event_timeout).__name__}")
    if max_queued < MIN_QUEUED:
        raise ValueError(f"max_queued must be at least {MIN_QUEUED}, not {max_queued}")
    # Never has one spelling, None (0 on xenback-sim's command line, as
    # cxenstored's -w): inf would be a second.  The deadline of an event
    # is a float, so an int past a float's range is refused here, not by
    # the loop at the first event.  Any other size is taken as given (no
    # C int to wrap): a limit past what the host lives is never reached.
    if watch_event_timeout is not None and not 0 < _as_float(watch_event_timeout) < math.inf:
        raise ValueError(f"watch_event_timeout must be positive and finite seconds, "
                         f"or None (never), not {watch_event_timeout}")


class XenStored:
    """A XenStore daemon serving Unix sockets below ``run_dir``.

    ``run_dir/"xenstored"/"socket"`` is the main socket; its connections are
    dom0, privileged (as with cxenstored's socket).  :meth:`introduce_domain`
    adds ``run_dir/"domains"/<domid>/"xenstore"``, whose connections are that
    domain, unprivileged, subject to permissions and quotas.

    ``max_queued`` bounds the bytes waiting for one guest, over all its
    connections: watch events past it are dropped (see the module's
    docstring for dom0's queue).  A watch event for a guest that waits
    ``watch_event_timeout`` seconds (finite) unsent is dropped (None:
    never, and a guest that never reads then stalls for good the guests
    whose writes it watches).  ``quota`` replaces cxenstored's default limits for
    unprivileged domains.

    ``watch_event_timeout`` is fixed once the server has started (as
    cxenstored's ``-w``): a waiting event keeps the deadline it was queued
    with, and the loop looks for stale ones at the earliest deadline it
    knows of, so a new timeout would apply only to new events, behind the
    old ones.  Setting it then is an AttributeError.  ``max_queued`` may
    change at any time, checked as the constructor checks it (as
    cxenstored's quotas may, through ``xenstore-control quota set``):
    each event is held against it as it is queued, and nothing queued
    depends on it.  Lowered below what waits for a guest, it drops that
    guest's new events until its queue is under it again; what waits
    stays.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        max_queued: int = MAX_QUEUED,
        quota: Quota | None = None,
        watch_event_timeout: float | None = WATCH_EVENT_TIMEOUT,
    ) -> None:
        check_limits(max_queued, watch_event_timeout)
        self.run_dir = Path(run_dir)
        # Set by any thread, read by the loop thread for each event it
        # queues: one int, replaced whole, needs no lock.
        self._max_queued = max_queued
        self._watch_event_timeout = watch_event_timeout
        self._max_outstanding = (quota or Quota()).outstanding
        self._dispatcher = Dispatcher(
            self._send, self._send_events, self._introduce, self._release, quota
        )
        self._selector: selectors.BaseSelector | None = None
        #: hang-ups of the held-back connections (see the module's
        #: docstring); its own descriptor is in _selector.  Loop thread
        #: only, once started.
        self._hup: select.epoll | None = None
        #: fd -> the held-back connection registered in _hup under it
        #: (exactly those whose ``events`` is 0).  Loop thread only.
        self._held: dict[int, Connection] = {}
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        #: Whether _thread began (the loop its loop, a closer its closing:
        #: it closes the server itself then), or stop() came first (and
        #: makes a closer, see _closer): under _entry_lock.  None once a
        #: stop() closed it itself, with no thread to be had.
        self._entered: bool | None = False
        self._entry_lock = threading.Lock()
        # Cross-thread call queue; see "Threading rules" above.
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._calls = collections.deque()
        #: guards _calls_closed and the final drain of _calls (not the loop's
        #: popleft: a deque is safe for one appender and one popper)
        self._calls_lock = threading.Lock()
        self._calls_closed = False
        # The loop's wake-up pair, created by start().
        self._wake_r: socket.socket
        self._wake_w: socket.socket
        self._stopping = False
        #: What the loop logged and has not emitted: it keeps its records
        #: (see _say).  Loop thread only, but for a stop() taking it over.
        self._said: list[logging.LogRecord] = []
        #: What the loop logged, for stop() to emit once it joined it (or
        #: took it over): emitted by the loop, the join could wait for a
        #: handler's lock stop()'s caller holds (see _heldlog).  Handed
        #: over under _calls_lock while a stop() joins it (_joining), else
        #: emitted by the loop: a stop() that gave up on it (a Ctrl-C, or
        #: the loop stuck) may be the last.  stop() emits them one at a time.
        self._unsaid: list[logging.LogRecord] = []
        self._joining = False
        #: Under _calls_lock: _thread is emitting a record (_say), and
        #: touches nothing else until it takes the lock again: a stop()
        #: may take the server from it then (see _take_over).
        self._emitting = False
        #: connections with freshly queued output (loop thread only)
        self._dirty: set[Connection] = set()
        self._conns: set[Connection] = set()
        self._nconn = 0
        #: domains whose listener is unwatched since accept() failed for
        #: want of a descriptor (EMFILE): the listener stays readable, and
        #: watching it would spin the loop.  Watched again when a connection
        #: closes or at _accept_retry_at (monotonic), whichever comes first.
        #: Loop thread only.
        self._accept_paused: list[Domain] = []
        self._accept_retry_at = 0.0
        #: heap of (deadline, tie-breaker, guest connection): when to look
        #: for stale events in that connection's ``waiting``.  At most one
        #: entry per connection (Connection.expiry_armed); an entry may be
        #: early (its event was sent since) or dead (its connection closed
        #: since), never late.  Loop thread only.
        self._expiry: list[tuple[float, int, Connection]] = []
        self._expiry_seq = itertools.count()
        #: entries of _expiry whose connection is closed: purged once they
        #: are half of it (see _forget_expiry).  Loop thread only.
        self._expiry_dead = 0

    # --- public face ---------------------------------------------------------

    @property
    def max_queued(self) -> int:
        """Bytes that may wait for one guest over all its connections
        before its watch events are dropped (its replies never are)."""
        return self._max_queued

    @max_queued.setter
    def max_queued(self, value: int) -> None:
        check_limits(value, self._watch_event_timeout)
        self._max_queued = value

    @property
    def watch_event_timeout(self) -> float | None:
        """Seconds a watch event for a guest may wait unsent (None: for ever)."""
        return self._watch_event_timeout

    @watch_event_timeout.setter
    def watch_event_timeout(self, value: float | None) -> None:
        # Not on a running server: the deadlines in its queues, and the
        # loop's wait for the earliest, are the old timeout's (see the
        # class docstring).
        if self._thread is not None:
            raise AttributeError("watch_event_timeout cannot change once XenStored has started")
        check_limits(self._max_queued, value)
        self._watch_event_timeout = value

    @property
    def path(self) -> Path:
        """The dom0 socket (what XENSTORED_PATH should name)."""
        return self.run_dir / "xenstored" / "socket"

    def start(self) -> None:
        """Bind the main socket and start serving; returns once listening.

        Cut short (a Ctrl-C) before its thread, it takes back what it made
        and may be called again; in starting the thread, stop() takes it
        back (whether that thread ever runs or not: see _loop).
        """
        if self._thread is not None:
            raise RuntimeError("XenStored already started")
        try:
            self._selector = selector = selectors.DefaultSelector()
            # Kept by _watch_main, inside _bind: a Ctrl-C as _bind returns
            # would else leave the socket and its file with nobody to close.
            self._bind(self.path, self._watch_main)
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            selector.register(self._wake_r, _READ, (self._run_calls, None))
            self._hup = select.epoll()
            selector.register(self._hup, _READ, (self._on_hangup, None))
            thread = threading.Thread(target=self._loop, name="xenstored", daemon=True)
        except BaseException:
            self._unmake()
            raise
        self._thread = thread
        thread.start()
        _log().info("xenstored listening on %s", self.path)

    def _watch_main(self, sock: socket.socket) -> None:
        assert self._selector is not None
        self._selector.register(sock, _READ, (self._accept, self._dispatcher.dom0))
        # Kept once watched: if the register fails, _bind takes it back.
        self._listener = sock

    def _unmake(self) -> None:
        """Take back what a start() cut short before its thread made."""
        listener, self._listener = self._listener, None
        hup, self._hup = self._hup, None
        selector, self._selector = self._selector, None
        made = [listener, hup, selector, *(getattr(self, name, None)
                                          for name in ("_wake_r", "_wake_w"))]
        steps: list[Callable[[], object]] = [each.close for each in made if each is not None]
        if listener is not None:
            steps.append(functools.partial(self._unlink, self.path))
        _each(steps, "taking back a start() cut short")

    def stop(self, timeout: float | None = None) -> None:
        """Close every connection and socket and stop the loop thread.

        Idempotent; a stopped server cannot be started again.  Waits for
        the loop thread ``timeout`` seconds at most (:data:`STOP_TIMEOUT`
        if None).  A loop still running then is stuck (a bug: something
        it called has not returned), and waiting longer would hang the
        caller for good: TimeoutError names the thread and where it is.
        The server is then half stopped (its loop ends if it ever comes
        back, and calls are refused meanwhile); stop() again waits for it
        again.

        A loop emitting a record is waited for :data:`EMITTER_WAIT` at
        most (``timeout`` if less): the caller may be a signal's handler
        come in where the main thread held the lock of a handler the
        record goes to.  The server
        is then stopped in a thread of its own, and stop() emits what the
        loop had not; the loop ends once its record is out, after stop()
        returns (that one record then comes after stop()'s own).
        """
        thread = self._thread
        if thread is None:
            return
        if thread is threading.current_thread():
            raise RuntimeError("XenStored.stop() called from its own loop")
        self._stopping = True
        if timeout is None:
            timeout = STOP_TIMEOUT
        with self._entry_lock:
            entered = self._entered
        starting: threading.Thread | None = None
        if not entered:
            # Its start() cut short in starting the thread, or it has not
            # got going yet: it never runs, or ends as it begins (_loop).
            # Or a stop() taking the server from an emitting loop was cut
            # short starting its closer, which then ends as it begins too
            # (_finish).  No thread joined that was never started (join()
            # refuses it).  What start() made, and what the loop served,
            # is closed by a closer of our own (see _take_over), none
            # once closed: a stop() again would say "xenstored stopped"
            # again.
            if thread.is_alive():
                thread.join(timeout)
            with self._calls_lock, self._entry_lock:
                if self._entered is False:
                    thread = starting = self._closer(thread.name)
                closed = self._entered is None
            if closed:
                emit(self._unsaid)  # what a stop() cut short left
                return
        # Marked joining inside the try, and emitted past a Ctrl-C as the
        # lock is let go: either way, one landing there left the loop
        # handing its records to a stop() gone.
        try:
            with self._calls_lock:
                if not self._calls_closed:
                    self._wake()
                self._joining = True
                emitting = self._emitting
            if starting is not None:
                # Once joined: it hands what it logs over (see _say).
                self._start_closer(starting)
            # One not emitting now begins no record (see _say).  One
            # emitting may wait for a handler's lock our caller holds (a
            # signal's handler come in as the main thread emitted): waited
            # for EMITTER_WAIT at most, nor past what the caller allows.
            if thread.is_alive():  # not a closer no thread was to be had for
                thread.join(min(EMITTER_WAIT, timeout) if emitting else timeout)
            if emitting:
                thread = self._take_over(thread, timeout)
        finally:
            try:
                with self._calls_lock:
                    self._joining = False
            finally:
                emit(self._unsaid)
        if thread.is_alive():
            raise TimeoutError(
                f"the XenStore loop thread {thread.name!r} did not stop within {timeout:g} s;"
                f" it is stuck at:\n{_stuck_at(thread)}")

    def _take_over(self, thread: threading.Thread, timeout: float) -> threading.Thread:
        """The thread stop() waits for once ``thread`` was given
        EMITTER_WAIT to emit a record: ``thread``, done emitting and
        stopping, or a closer, which stops the server in its place.

        The closer takes the records ``thread`` had not emitted, and is
        joined as the loop is: stop()'s caller could wait for ``thread``
        for good, which waits for it.  A thread of its own, not stop()'s:
        a Ctrl-C landing in stop() then lands in the wait, and the server
        is closed all the same (one landing in stop()'s own closing left
        it half closed for good, the next stop() finding it closed).
        ``thread`` ends once its record is out, touching nothing (see
        _say)."""
        with self._calls_lock, self._entry_lock:
            closer = thread
            if self._emitting:
                # Before ours: what the loop logged before it stopped.
                self._unsaid += self._said
                # No call in between: taken whole or not at all.
                self._emitting = False
                self._said.clear()
                closer = self._closer(thread.name)
        if closer is not thread:
            self._start_closer(closer)
        if closer.is_alive():
            closer.join(timeout)
        return closer

    def _closer(self, name: str) -> threading.Thread:
        """A closer for stop() to start, made the server's thread: the one
        _finish lets close it.  Under _calls_lock (see _say) and
        _entry_lock (see _finish)."""
        closer = threading.Thread(target=self._finish, name=name, daemon=True)
        self._entered = False
        self._thread = closer
        return closer

    def _start_closer(self, closer: threading.Thread) -> None:
        """Start ``closer``, or close the server here if no thread is to be
        had.  A Ctrl-C as it starts leaves it the server's thread: it
        runs, or the next stop() makes another, which it lets close (see
        _finish)."""
        try:
            closer.start()
        except RuntimeError:
            with self._entry_lock:
                self._entered = None
            with records_kept(self._unsaid):
                self._shutdown()

    def _finish(self) -> None:
        """Stop the server for a stop() that took it from an emitting loop
        (see _take_over), or came before its loop began, unless it was
        done (see _start_closer)."""
        with self._entry_lock:
            # Not if it is no longer the server's thread: one whose start
            # a Ctrl-C cut short, replaced by the next stop()'s.
            if self._entered is not False or self._thread is not threading.current_thread():
                return
            self._entered = True
        if not self._calls_closed:
            with records_kept(self._said):
                self._shutdown()
        self._say()

    def introduce_path(self, domid: int) -> Path:
        """The socket :meth:`introduce_domain` creates for ``domid`` (no side effect)."""
        domid = check_xenstore_domid(domid)
        if domid == 0:
            return self.path
        return self.run_dir / "domains" / str(domid) / "xenstore"

    def introduce_domain(self, domid: int) -> Path:
        """Introduce ``domid`` and return the socket its connections use.

        Fires @introduceDomain.  Idempotent: a domain already introduced
        keeps its socket.  (Dom0 is always introduced; its socket is
        :attr:`path`.)

        ``domid`` is checked as xenback.XenStore's domain queries check
        it (TypeError or ValueError naming it), before anything changes.
        OSError if its socket cannot be made (a run_dir too long for a
        socket's path, say); RuntimeError unless the server is running,
        TimeoutError if its loop is stuck (see :meth:`_call`).  A domid
        from DOMID_FIRST_RESERVED (0x7FF0) on is a ValueError too: no
        domain has it (cxenstored's INTRODUCE of it fails, EINVAL).
        """
        domid = check_xenstore_domid(domid)
        if domid >= DOMID_FIRST_RESERVED:
            raise ValueError(f"domid {domid} is reserved (0x{DOMID_FIRST_RESERVED:X} on): "
                             "no domain has it")
        if domid == 0:
            return self.path
        domain = self._call(self._introduce_and_flush, domid)
        assert domain.socket_path is not None
        return domain.socket_path

    def release_domain(self, domid: int) -> None:
        """Release ``domid``: close its socket and connections, fire @releaseDomain.

        As cxenstored does since XSA-322, the nodes the domain owns are
        removed with their subtrees (watches fire) and permission entries
        naming it are dropped everywhere.

        Raises KeyError if the domain is not introduced (a reserved domid
        included: none is), ValueError for dom0; ``domid`` is checked as
        xenback.XenStore's domain queries check it (TypeError or
        ValueError naming it).  RuntimeError unless the server is running,
        TimeoutError if its loop is stuck (see :meth:`_call`).
        """
        domid = check_xenstore_domid(domid)
        if domid == 0:
            raise ValueError("dom0 cannot be released")
        self._call(self._release_and_flush, domid)

    def is_introduced(self, domid: int) -> bool:
        """Whether ``domid`` is introduced (dom0 always is, as IS_DOMAIN_INTRODUCED says);
        ``domid`` checked as xenback.XenStore's domain queries check it: True
        was domain 1.  A reserved domid is not introduced (False), not the
        ValueError :meth:`introduce_domain` raises for it."""
        domid = check_xenstore_domid(domid)
        return self._call(lambda: domid in self._dispatcher.domains)

    def __enter__(self) -> XenStored:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- cross-thread calls ---------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop thread and return what it returns.

        Waits :data:`STOP_TIMEOUT` at most, as stop() does, and for the
        same reason: a loop that has not run the call by then is stuck (a
        bug), and waiting longer would hang the caller for good.
        TimeoutError then names the thread and where it is.  A call the
        loop had not begun is withdrawn (it never runs); one it is running
        (where it is stuck, then) may yet finish, which the error says.

        So is one whose caller a Ctrl-C (any BaseException) cuts short, as
        it queues the call or waits for it: the interrupt comes out as
        itself, and the call does not run later for a caller that gave up
        on it (one the loop has begun runs to its end, as the loop runs
        it whole).

        What the loop logs running the call is emitted by the caller, as
        if it had logged it (see _heldlog): the caller may hold a lock the
        main thread waits for (a toolstack's thread creating a domain for
        dom0 holds the host's), and the main thread may hold a handler's
        lock the loop would wait for.  By the loop once the caller has
        gone (with its own, see _say), which of the two ends second
        emitting them.
        """
        thread = self._thread
        if thread is threading.current_thread():
            return fn(*args)
        if thread is None:
            raise RuntimeError("XenStored is not running")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        timeout = STOP_TIMEOUT
        said: list[logging.LogRecord] = []
        # In which order the call ended (True) and its caller gave up on
        # it (False): whichever comes second emits what it logged, once
        # (list.append() and += are atomic).
        ended: list[bool] = []

        def run() -> T:
            try:
                with records_kept(said):
                    return fn(*args)
            finally:
                ended.append(True)
                if not ended[0]:
                    emit(said)

        # From before the append: an interrupt as it returns must withdraw
        # the call too (cancel() of one never queued changes nothing).  And
        # around the handling of the timeout: an interrupt as its cancel()
        # starts (in the Future's code) left the call queued.  A cancel()
        # of a call cancelled, or finished, changes nothing either.
        try:
            with self._calls_lock:
                # Once stop() began, too: a loop stop() found stuck may
                # never come back to run the call, nor to cancel it.
                if self._calls_closed or self._stopping:
                    raise RuntimeError("XenStored is not running")
                self._calls.append((run, future))
            self._wake()
            try:
                # exception(), not result(timeout): a TimeoutError fn
                # raised is the call's answer, not the loop's delay.  Nor
                # wait(), which the loop ending does not wake: it cancels
                # the calls it left (CancelledError here), and cancel()
                # wakes only these waits.
                future.exception(timeout)
            except TimeoutError:
                # Withdrawn unless the loop has begun it (cancel() is
                # False), and then perhaps finished it just now.
                if future.cancel():
                    what = "did not come to the call"
                elif not future.done():
                    what = "has not finished the call (it may yet)"
                else:
                    what = ""  # finished just now: answered below
                if what:
                    raise TimeoutError(
                        f"the XenStore loop thread {thread.name!r} {what} within"
                        f" {timeout:g} s; it is stuck at:\n{_stuck_at(thread)}") from None
        except BaseException:
            future.cancel()  # withdrawn unless the loop has begun it
            # No call before the check (none can land in between).
            ended += [False]
            if ended[0]:
                emit(said)
            raise
        emit(said)
        return future.result()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # a wakeup is already pending
        except OSError:
            pass  # the loop is gone and closed it; nobody to wake

    def _run_calls(self, _mask: int, _data: Any) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._calls:
            if self._said:
                # What a call given up on logged (see _call): emitted
                # before the next call's caller hears back (see _serve),
                # the rest of the calls run next round.
                self._wake()
                return
            fn, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

    # --- the loop ----------------------------------------------------------------

    def _loop(self) -> None:
        with self._entry_lock:
            if self._stopping:
                return  # stopped before it ran: stop() closed everything (see stop)
            self._entered = True
        said = self._said
        try:
            with records_kept(said):
                try:
                    self._serve()
                except BaseException:
                    # Not if a stop() took the server from it (see
                    # _take_over): the record it was emitting raised, and
                    # the server lives on in the closer, whose _said it is.
                    if self._thread is threading.current_thread():
                        _log().exception("xenstored loop died")
                    raise
        finally:
            # What it logged serving (its death too) before what follows
            # (a call cancelled), unless a stop() took the server over.
            if self._say():
                with records_kept(said):
                    self._shutdown()
                self._say()

    def _serve(self) -> None:
        """Serve until stop(), or until a stop() took the server over (see _say)."""
        selector = self._selector
        assert selector is not None
        dirty = self._dirty
        expiry = self._expiry
        said = self._said
        while not self._stopping:
            timeout = None
            if self._accept_paused:
                timeout = max(0.0, self._accept_retry_at - time.monotonic())
            if expiry:
                wait = min(_MAX_WAIT, max(0.0, expiry[0][0] - time.monotonic()))
                timeout = wait if timeout is None else min(timeout, wait)
            for key, mask in selector.select(timeout):
                callback, data = key.data
                callback(mask, data)
            if self._accept_paused and time.monotonic() >= self._accept_retry_at:
                self._resume_accept()
            if expiry and expiry[0][0] <= time.monotonic():
                self._expire_due()
            while dirty:
                # What was logged goes out before the replies to the
                # requests that logged it, as when the loop emitted as it
                # logged (and before a call's caller hears back, see
                # _run_calls).  Not before each callback: one flushing a
                # client's backlog may send a watch event queued after a
                # record by an earlier one, but no reply to what logged it.
                if said and not self._say():
                    return
                # Through _on_event(): a flush may serve requests held
                # back by a pause, and a bug met there must cost that
                # connection only.  (Not being writable is fine.)
                self._on_event(_WRITE, dirty.pop())
            if said and not self._say():
                return

    def _say(self) -> bool:
        """Emit what the loop logged, or hand it to the stop() that joins
        the loop; False once a stop() has taken the server from it.

        Emitting takes the locks of the handlers a record goes to (see
        _heldlog), and a stop() may come meanwhile: from a signal's
        handler, say, come in as the main thread held one of them, which
        the loop then waits for.  So none is begun while a stop() joins
        the loop, and a stop() that finds it emitting waits
        EMITTER_WAIT at most, then takes the server from it, with the
        records not emitted yet: each is taken off under _calls_lock.
        The one being emitted goes out when it goes, after stop()'s own
        if the lock was its caller's: the price of not waiting for it."""
        said = self._said
        while True:
            with self._calls_lock:
                if self._thread is not threading.current_thread():
                    return False  # a stop() took the server from it
                if self._joining:
                    self._unsaid += said
                    said.clear()
                if not said:
                    self._emitting = False
                    return True
                self._emitting = True
                record = said.pop(0)
            try:
                with records_kept(None):
                    emit([record])
            except Exception:
                # A handler's bug costs its record, never the server (nor
                # a connection now: the record is no longer its request's).
                # Told as logging tells of a handler failing, not logged
                # through the handlers again: they may fail every record.
                if logging.raiseExceptions and sys.stderr:
                    traceback.print_exc()

    def _shutdown(self) -> None:
        try:
            for conn in list(self._conns):
                self._close(conn, "server stopping")  # never raises
            assert self._selector is not None and self._listener is not None
            assert self._hup is not None
            steps: list[Callable[[], None]] = [
                functools.partial(self._teardown_domain, domid)
                for domid in self._dispatcher.domains if domid != 0]
            steps += [self._selector.close, self._hup.close, self._listener.close,
                      functools.partial(self._unlink, self.path)]
            # A socket file that cannot go must not leave the others open
            # and in place.
            _each(steps, "stopping xenstored")
        except Exception:
            # Logged, not raised (nor above): the loop thread is ending,
            # and nobody would read it there (stop() too runs this, for a
            # loop that never began, and treats it alike).
            _log().exception("internal error stopping xenstored")
        finally:
            # Whatever is left behind, no caller may wait for a loop that
            # is gone (see _call).
            with self._calls_lock:
                self._calls_closed = True
                self._wake_r.close()
                self._wake_w.close()
                while self._calls:
                    _fn, future = self._calls.popleft()
                    future.cancel()
        _log().info("xenstored stopped")

    # --- sockets -----------------------------------------------------------------

    def _bind(self, path: Path,
              watch: Callable[[socket.socket], object] | None = None) -> socket.socket:
        """A listening socket on ``path``, its directories made as needed,
        handed to ``watch`` (a selector's register) before it is returned.

        If the socket cannot be made or watched, everything made for it
        goes again: its file and the directories made (they were left
        behind, and a socket nobody accepts on with them).
        """
        # The directories mkdir is to make, deepest first.  Its own failure
        # too takes back those it made (the upper ones, before a deeper
        # one failed), and a Ctrl-C as it returns all of them.
        made: list[Path] = []
        directory = path.parent
        while not directory.exists():
            made.append(directory)
            directory = directory.parent
        # Made here and handed to _listen(), so that whatever comes after
        # it is made (a Ctrl-C as _listen() returns, too) finds it to take back.
        sock: socket.socket | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if self._served(path):
                raise OSError(errno.EADDRINUSE, f"{path} is served by someone else already")
            self._unlink(path)  # a stale socket of a dead server
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listen(sock, path)
            if watch is not None:
                watch(sock)
            return sock
        except BaseException:
            # Here, not in a function of its own: a Ctrl-C as that started
            # would leave the socket accepting on its file.  Failures are
            # logged, not raised: the error being handled says what went
            # wrong, these only what it left behind.
            if sock is not None:
                bound = ""
                try:
                    bound = sock.getsockname()  # "" for a socket not bound
                except OSError:
                    _log().exception("cannot tell whether %s was bound", path)
                finally:
                    # First: a Ctrl-C in what follows leaves a stale file at
                    # most (the next _bind() removes it), no socket on it.
                    try:
                        sock.close()
                    except OSError:
                        _log().exception("cannot close the socket for %s", path)
                if bound:
                    try:
                        self._unlink(path)
                    except Exception:
                        _log().exception("cannot take back %s, a socket not handed out", path)
            for directory in made:
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    pass  # never made: mkdir failed below it
                except OSError:
                    break  # not empty: someone else's by now, and so are those above
            raise

    @staticmethod
    def _listen(sock: socket.socket, path: Path) -> None:
        try:
            # Whoever connects acts as the socket's domain: the user's
            # alone, as a real xenstored's socket is root's, whatever the
            # umask (bind gives the socket file this mode).
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(os.fspath(path))
            sock.listen(64)
            sock.setblocking(False)
        except OSError as e:
            raise listen_error(e, path) from e

    @staticmethod
    def _served(path: Path) -> bool:
        """Does something accept connections on ``path``?"""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(os.fspath(path))
            except OSError:
                return False
        return True

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def _accept(self, _mask: int, domain: Domain) -> None:
        listener = self._listener if domain.domid == 0 else domain.listener
        if listener is None:
            # Released by an earlier callback of the same select() round:
            # its socket is closed, and the connections waiting on it with it.
            return
        assert self._selector is not None
        while True:
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and friends: the backlog waits in the kernel.
                if not self._accept_paused:
                    _log().warning("accept on %s: %s; retrying when a descriptor frees", domain, e)
                    self._accept_retry_at = time.monotonic() + _ACCEPT_RETRY
                self._selector.unregister(listener)
                self._accept_paused.append(domain)
                return
            if not domain.privileged and len(domain.conns) >= self._dispatcher.quota.connections:
                _log().log(domain.fault_level(), "%r: too many connections, refusing one",
                           domain)
                sock.close()
                continue
            try:
                self._add_connection(sock, domain)
            except Exception:
                # As a bug met serving a connection: it costs that one
                # only, and the rest of the backlog is still accepted.
                _log().exception("internal error accepting a connection of %r", domain)
                sock.close()

    def _add_connection(self, sock: socket.socket, domain: Domain) -> None:
        """Serve ``sock`` as a connection of ``domain``.  A failure leaves
        nothing to undo but the socket: a closed socket left in the
        selector would have the next connection given its descriptor
        number refused as watched already, and one left in its guest's
        connections would count in its quota for good."""
        assert self._selector is not None
        sock.setblocking(False)
        self._nconn += 1
        conn = Connection(sock, domain, f"#{self._nconn}")
        conn.events = _READ
        self._selector.register(sock, _READ, (self._on_event, conn))
        try:
            domain.conns.add(conn)
            self._conns.add(conn)
        except BaseException:
            domain.conns.discard(conn)  # (a set that refuses adds nothing)
            self._selector.unregister(sock)
            raise

    def _resume_accept(self) -> None:
        """Watch the listeners _accept() gave up on again (loop thread)."""
        assert self._selector is not None
        paused, self._accept_paused = self._accept_paused, []
        for domain in paused:
            listener = self._listener if domain.domid == 0 else domain.listener
            if listener is not None:
                self._selector.register(listener, _READ, (self._accept, domain))

    def _on_event(self, mask: int, conn: Connection) -> None:
        try:
            if mask & _WRITE:
                self._flush(conn)
            if mask & _READ and not conn.closed:
                self._on_readable(conn)
        except Exception:
            # A bug must cost one connection, never the server.
            _log().exception("internal error serving %r", conn)
            self._close(conn, "internal error")

    def _on_readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._close(conn, f"recv: {e}")
            return
        if not data:
            # Perhaps only its writing side: what it sent and has not read
            # yet still goes (a part request left over never will).
            if not conn.out:
                self._close(conn, "closed by peer")
                return
            conn.eof = True
            conn.inbuf = b""
            self._set_events(conn, _WRITE)
            return
        if conn.inbuf:
            data = conn.inbuf + data
        self._process(conn, data)

    def _process(self, conn: Connection, data: bytes) -> None:
        """Handle every complete request in ``data``; keep the rest.

        Stops early, pausing the connection, while too many replies wait
        for the client or too many of its guest's requests are outstanding
        (``Quota.outstanding``): the rest stays in ``conn.inbuf`` (and
        further requests in the kernel) until :meth:`_flush` finds room
        again.
        """
        handle = self._dispatcher.handle
        out = conn.out
        off = 0
        size = len(data)
        domain = conn.domain
        max_outstanding = self._max_outstanding
        while size - off >= HEADER_SIZE:
            if len(out) > PAUSE_OUTPUT or domain.outstanding >= max_outstanding:
                conn.paused = True
                self._dirty.add(conn)
                break
            op, req_id, tx_id, length = _unpack_header(data, off)
            if length > PAYLOAD_MAX:
                self._close(
                    conn, f"header announces {length} bytes (max {PAYLOAD_MAX})",
                    conn.domain.fault_level(),
                )
                return
            end = off + HEADER_SIZE + length
            if end > size:
                break
            handle(conn, op, req_id, tx_id, data[off + HEADER_SIZE : end])
            if conn.closed:
                return
            off = end
        conn.inbuf = data[off:] if off else data

    def _send(self, conn: Connection, data: bytes) -> None:
        """Queue ``data`` for ``conn`` (the dispatcher's output hook)."""
        if conn.closed:
            return
        conn.out += data
        conn.domain.queued += len(data)
        self._dirty.add(conn)

    def _send_events(self, events: list[tuple[Connection, bytes]], cause: Domain | None) -> None:
        """Queue the watch events one request of ``cause`` fired (None: the
        server's own doing, as @introduceDomain), each ``(conn, message)``.

        A guest's request is outstanding while any of them waits (see the
        module's docstring): one Outstanding record counts them down.
        """
        charge = Outstanding(cause) if cause is not None and not cause.privileged else None
        for conn, event in events:
            self._send_event(conn, event, charge)

    def _send_event(self, conn: Connection, event: bytes,
                    charge: Outstanding | None = None) -> None:
        """Queue the watch event ``event`` (a whole message) for ``conn``;
        ``charge`` is the guest's request that fired it, if it is charged.

        As cxenstored's send_event() since XSA-326, the event is dropped

        * if an identical one still waits in ``conn.out``: otherwise a client
          that reads slowly gets one event per change of a node it watches,
          and another client rewriting that node piles them up.  The event
          waiting already says all the dropped one would have: it reaches
          the watcher after the change, so what the watcher reads then is at
          least as new.  Special events ("@releaseDomain") are queued every
          time: some handlers count on each one;
        * if ``conn`` is a guest's and queuing it would put more than
          ``max_queued`` bytes waiting for that guest (cxenstored's memory
          quota): it does not read, and nothing else bounds what other
          clients' changes make it owe.

        A privileged client gets every other event, however many wait; a
        guest gets it unless it goes stale (see the module's docstring).
        One queued counts in ``charge`` until it is sent or dropped as
        stale; one dropped here never does (cxenstored counts it only once
        queued, too).
        """
        if conn.closed:
            return
        domain = conn.domain
        limit = self._max_queued  # once: another thread may set it meanwhile
        if not domain.privileged and domain.queued + len(event) > limit:
            # Warn once per guest: it chooses how many events it gets.
            _log().log(domain.fault_level(),
                       "%r: dropped a watch event: %d bytes wait for %r already (max %d)",
                       conn, domain.queued, domain, limit)
            return
        if event.startswith(b"@", HEADER_SIZE):
            self._send(conn, event)
        elif event in conn.queued_events:
            return  # still waiting, wholly or in part
        else:
            self._send(conn, event)
            conn.queued_events[event] = conn.out_base + len(conn.out)
        deadline = math.inf
        if not domain.privileged and self._watch_event_timeout is not None:
            deadline = time.monotonic() + self._watch_event_timeout
        elif charge is None:
            return
        end = conn.out_base + len(conn.out)
        conn.waiting.append(WaitingEvent(end - len(event), end, charge, deadline))
        if charge is not None:
            # Counted with its first event, not after the loop in
            # _send_events: a bug cutting that loop short must not leave
            # events queued whose sending uncounts a request never counted.
            if not charge.events:
                charge.domain.outstanding += 1
            charge.events += 1
        if deadline != math.inf and not conn.expiry_armed:
            self._arm_expiry(conn, deadline)

    @staticmethod
    def _forget_sent_events(conn: Connection) -> None:
        """Drop the entries of ``conn.queued_events`` the kernel has taken
        whole (oldest first: their offsets only grow), so that the table
        stays as small as the events waiting in ``conn.out``."""
        queued = conn.queued_events
        if not conn.out:
            queued.clear()
            return
        base = conn.out_base
        while queued:
            event, end = next(iter(queued.items()))
            if end > base:
                break
            del queued[event]

    def _release_waiting(self, conn: Connection, upto: int | None) -> None:
        """Forget the events of ``conn`` the kernel has taken (those ending
        at or before offset ``upto``; all of them if None), counting down
        the requests that caused them."""
        waiting = conn.waiting
        while waiting and (upto is None or waiting[0].end <= upto):
            charge = waiting.popleft().cause
            if charge is not None:
                self._uncharge(charge)

    def _uncharge(self, charge: Outstanding) -> None:
        """One event of ``charge``'s request is sent or dropped: once it was
        the last, the request is no longer outstanding; wake the guest's
        connections if they were held back for it."""
        charge.events -= 1
        if charge.events:
            return
        guest = charge.domain
        guest.outstanding -= 1
        if guest.outstanding == self._max_outstanding - 1:
            for other in guest.conns:
                if other.paused:
                    self._dirty.add(other)  # _flush resumes it

    def _arm_expiry(self, conn: Connection, deadline: float) -> None:
        heapq.heappush(self._expiry, (deadline, next(self._expiry_seq), conn))
        conn.expiry_armed = True

    def _forget_expiry(self) -> None:
        """A connection with an entry in _expiry is closed: purge the
        entries of closed connections once they are half the heap.  A
        guest opening and closing connections must not grow it, nor keep
        them all, for watch_event_timeout; purging each at once would cost
        a heap rebuild per close."""
        self._expiry_dead += 1
        expiry = self._expiry
        if 2 * self._expiry_dead > len(expiry):
            # In place: the loop holds this list.
            expiry[:] = [entry for entry in expiry if not entry[2].closed]
            heapq.heapify(expiry)
            self._expiry_dead = 0

    def _expire_due(self) -> None:
        """Drop the stale events of the connections whose time has come,
        and look again when their next event goes stale."""
        expiry = self._expiry
        now = time.monotonic()
        while expiry and expiry[0][0] <= now:
            _deadline, _seq, conn = heapq.heappop(expiry)
            conn.expiry_armed = False
            if conn.closed:
                self._expiry_dead -= 1
                continue
            try:
                self._expire(conn, now)
            except Exception:
                # As in _on_event: a bug must cost one connection, never
                # the server (nor the other guests their stale events).
                _log().exception("internal error expiring the events of %r", conn)
                self._close(conn, "internal error")
                continue
            # The oldest is inf only if sending it has begun (see _expire);
            # the next is the earliest deadline left, the timeout being
            # fixed (see watch_event_timeout).
            for event in itertools.islice(conn.waiting, 2):
                if event.deadline != math.inf:
                    self._arm_expiry(conn, event.deadline)
                    break

    def _expire(self, conn: Connection, now: float) -> None:
        """Drop the events of guest ``conn`` stale at ``now`` (cxenstored's
        watch-event timeout): a guest that does not read must not hold
        back for long the guests whose writes it watches.

        An event the kernel has taken part of goes on whole (the client
        would lose its framing otherwise), as in cxenstored; only the
        oldest can be.  Stale, it no longer keeps the request that caused
        it outstanding (cxenstored's does, until it is written): a guest
        that reads part of an event and stops must not hold a writer
        back for good (with a connection per event, up to
        Quota.connections, it could otherwise use up the writer's quota).
        Its bytes still count in ``max_queued``, which bounds them.

        Each stale event counts its request down as it leaves ``waiting``,
        before its bytes go: a bug met after that closes the connection
        (see _expire_due), which counts down only what is still in
        ``waiting``, and the request must not stay outstanding for good.
        """
        waiting = conn.waiting
        base = conn.out_base
        # The one begun stays first in waiting, where _close finds it; the
        # events behind it still go stale in turn.
        first = 0
        if waiting and waiting[0].start < base:
            first = 1
            begun = waiting[0]
            if begun.deadline <= now:
                begun.deadline = math.inf
                charge, begun.cause = begun.cause, None
                if charge is not None:
                    self._uncharge(charge)
        stale: list[WaitingEvent] = []
        while len(waiting) > first and waiting[first].deadline <= now:
            event = waiting[first]
            del waiting[first]  # O(1) so near the head
            stale.append(event)
            if event.cause is not None:
                self._uncharge(event.cause)
        if not stale:
            return
        out = conn.out
        queued = conn.queued_events
        domain = conn.domain
        for event in reversed(stale):
            chunk = bytes(out[event.start - base : event.end - base])
            if queued.get(chunk) == event.end:
                del queued[chunk]
            # Uncounted with its bytes, not after the loop: a bug met in
            # it closes the connection, which uncounts only what is left.
            del out[event.start - base : event.end - base]
            domain.queued -= event.end - event.start
        dropped = sum(event.end - event.start for event in stale)
        # Whatever waits is either older than every stale event (the one
        # begun) or newer than all of them: it moves back by all they took.
        last = stale[-1].end
        for event in waiting:
            if event.start >= last:
                event.start -= dropped
                event.end -= dropped
        for chunk, end in queued.items():
            if end > last:
                queued[chunk] = end - dropped
        _log().debug("%r: dropped %d stale watch events (%d bytes)", conn, len(stale), dropped)
        self._dirty.add(conn)  # less to send: a pause may end, or all is sent

    def _flush(self, conn: Connection) -> None:
        """Send what the kernel takes; wait for writability if not all."""
        if conn.closed:
            return
        out = conn.out
        if out:
            try:
                sent = conn.sock.send(out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._close(conn, f"send: {e}")
                return
            del out[:sent]
            conn.out_base += sent
            conn.domain.queued -= sent
            if conn.queued_events:
                self._forget_sent_events(conn)
            if conn.waiting:
                self._release_waiting(conn, conn.out_base)
        if conn.eof:
            if not out:
                self._close(conn, "closed by peer, all sent")
                return
            self._set_events(conn, _WRITE)
            return
        if (conn.paused and len(out) <= PAUSE_OUTPUT
                and conn.domain.outstanding < self._max_outstanding):
            # Room again: serve the requests read before pausing.  This may
            # queue output (the connection is then dirty again) or pause anew.
            conn.paused = False
            data, conn.inbuf = conn.inbuf, b""
            self._process(conn, data)
            if conn.closed:
                return
        self._set_events(conn, (_WRITE if out else 0) | (0 if conn.paused else _READ))

    def _set_events(self, conn: Connection, events: int) -> None:
        # 0 for a guest held back with nothing to send: out of the selector
        # until _uncharge wakes it, in _hup meanwhile.
        if events == conn.events or conn.closed:
            return
        assert self._selector is not None and self._hup is not None
        if not events:
            self._selector.unregister(conn.sock)
            self._hup.register(conn.fd, 0)
            self._held[conn.fd] = conn
        elif not conn.events:
            self._hup.unregister(conn.fd)
            del self._held[conn.fd]
            self._selector.register(conn.sock, events, (self._on_event, conn))
        else:
            self._selector.modify(conn.sock, events, (self._on_event, conn))
        conn.events = events

    def _on_hangup(self, _mask: int, _data: Any) -> None:
        """Close the held-back connections whose client is gone."""
        assert self._hup is not None
        for fd, _events in self._hup.poll(0):
            conn = self._held.get(fd)
            if conn is not None:
                self._close(conn, "hung up while held back")

    def _close(self, conn: Connection, why: str, level: int = logging.DEBUG) -> None:
        """Forget ``conn``: a normal end (DEBUG) or the client's fault (WARNING).

        Never raises: closing is how a bug met serving a connection or
        expiring its events is contained (see _on_event), so a bug met in
        it must not reach the loop.  Nor may it cut the closing short:
        each step runs whatever the one before it met (logged with its
        traceback).  A closed connection left in the selector would spin
        the loop; its events left counted would hold back for good the
        guests whose requests fired them.
        """
        if conn.closed:
            return
        _log().log(level, "closing %r: %s", conn, why)
        conn.closed = True
        _each((functools.partial(step, conn) for step in
               (self._unwatch, self._dispatcher.drop_connection_state, self._forget)),
              f"closing {conn!r}")

    def _unwatch(self, conn: Connection) -> None:
        """Take closed ``conn`` out of the selector (or _hup) and close its socket."""
        assert self._selector is not None
        try:
            if self._held.get(conn.fd) is conn:
                assert self._hup is not None
                del self._held[conn.fd]
                self._hup.unregister(conn.fd)
            else:
                try:
                    self._selector.unregister(conn.sock)
                except (KeyError, ValueError):
                    # Not registered.  Nothing else can leave a stale key:
                    # the stdlib selectors forget the key first, and take
                    # the kernel's own failure to forget it for done.
                    pass
        finally:
            # Whatever the unregistering met: the kernel drops a closed
            # descriptor from epoll sets itself.
            try:
                conn.sock.close()
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise

    def _forget(self, conn: Connection) -> None:
        """Drop what closed ``conn`` holds of the server's: its place in the
        sets, its share of its guest's queue, the requests its events count."""
        conn.domain.conns.discard(conn)
        self._conns.discard(conn)
        self._dirty.discard(conn)
        conn.domain.queued -= len(conn.out)
        conn.out.clear()
        conn.inbuf = b""
        conn.queued_events.clear()
        self._release_waiting(conn, None)
        if conn.expiry_armed:
            self._forget_expiry()
        if self._accept_paused:
            self._resume_accept()  # a descriptor is free now

    # --- domains -------------------------------------------------------------------

    def _introduce(self, domid: int) -> Domain:
        """Create ``domid``'s socket and fire @introduceDomain (loop thread)."""
        domains = self._dispatcher.domains
        domain = domains.get(domid)
        if domain is not None:
            return domain
        domain = Domain(domid, privileged=False)
        domain.socket_path = self.introduce_path(domid)
        selector = self._selector
        assert selector is not None
        try:
            # epoll may refuse it (out of memory or of watches:
            # max_user_watches); _bind then takes back what it made.
            domain.listener = self._bind(
                domain.socket_path,
                lambda sock: selector.register(sock, _READ, (self._accept, domain)))
        except OSError as e:
            # strerror, not str(e): the host's OSError gives the errno again
            # (_introduce_and_flush).  But with the file it names, which
            # strerror leaves out: mkdir's says "File exists", not where.
            why = e.strerror or str(e)
            if e.filename is not None:
                why = f"{e.filename}: {why}"
            raise XsError("EIO", f"cannot create socket for domain {domid}: {why}") from e
        domains[domid] = domain
        self._dispatcher.store.note_introduce(domid)
        self._dispatcher.fire_special("@introduceDomain")
        _log().info("introduced domain %d at %s", domid, domain.socket_path)
        return domain

    def _introduce_and_flush(self, domid: int) -> Domain:
        try:
            return self._introduce(domid)
        except XsError as e:
            # The host's caller hears why (a run_dir too long for the
            # socket's path: ENAMETOOLONG), not the reply's EIO.
            cause = e.__cause__
            code = (cause.errno if isinstance(cause, OSError) and cause.errno
                    else getattr(errno, e.name, errno.EIO))
            raise OSError(code, e.detail or e.name) from e
        finally:
            self._dispatcher.flush_deferred()

    def _release(self, domid: int) -> None:
        """Close ``domid``'s socket and connections, remove the nodes it owns
        (cxenstored does, since XSA-322), fire @releaseDomain."""
        if domid not in self._dispatcher.domains or domid == 0:
            raise KeyError(domid)
        self._teardown_domain(domid)
        self._dispatcher.remove_domain_nodes(domid)
        self._dispatcher.fire_special("@releaseDomain")
        _log().info("released domain %d", domid)

    def _release_and_flush(self, domid: int) -> None:
        try:
            self._release(domid)
        finally:
            self._dispatcher.flush_deferred()

    def _teardown_domain(self, domid: int) -> None:
        domain = self._dispatcher.domains.pop(domid)
        for conn in list(domain.conns):
            self._close(conn, f"domain {domid} released")
        for other in self._dispatcher.domains.values():
            if other.target == domid:
                other.target = None
        if domain.listener is not None:
            assert self._selector is not None
            if domain in self._accept_paused:
                self._accept_paused.remove(domain)
            else:
                self._selector.unregister(domain.listener)
        self._remove_socket(domain)

    def _remove_socket(self, domain: Domain) -> None:
        """Close ``domain``'s listener (unwatched) and remove its socket."""
        if domain.listener is not None:
            domain.listener.close()
            domain.listener = None
        if domain.socket_path is not None:
            self._unlink(domain.socket_path)
            try:
                domain.socket_path.parent.rmdir()  # ours, unless someone else uses it
            except OSError:
                pass
