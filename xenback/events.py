"""One event-channel handle and one epoll thread for a whole backend.

The kernel delivers an event channel as an interrupt whose handler only
schedules work; :class:`EventDispatcher` is that for user space.  It owns
one :class:`~xenback.platform.EventChannel` handle (all ports of a backend
share it, as all ports of a process share ``/dev/xen/evtchn``) and one
thread waiting in :func:`select.epoll` on it and on any host file
descriptors the backend adds (sockets, for pvcalls).  Callbacks run on that
thread and must be tiny: queue a work item and return.

A fired port stays masked until its callback has returned (libxenevtchn's
semantics): a guest hammering its port costs one callback per dispatch
round, not one per notification.  A callback that raises is logged and
the dispatching goes on; its tracebacks share one rate limit per
dispatcher (a guest may set a failing callback off at every notify), so
a driver that wants a budget per guest catches in its callbacks, as
:meth:`~xenback.BackendDevice.bind_evtchn` does for a device's.

The dispatching itself may fail: the handle's ``pending()`` or
``unmask()`` raising.  Either may have taken an event and not delivered
it, or left a port masked, and the thread would take every port and fd
of the dispatcher with it.  It logs the failure (within a rate limit of
its own) and goes on, and at once, before it waits again, hands every
event out again: every port's callback runs and the port is unmasked,
every host fd's callback runs with the readiness a level-triggered watch
would report now.  Not a ``select.EPOLLONESHOT`` fd's: one whose
callback took its event is its owner's until re-armed, and is left
alone; any other is re-armed, so that epoll reports it, once, if it is
ready.  A callback must therefore take a call that no new event caused
(queueing work that then finds nothing to do does).  A hand-out that
fails in its turn is done again after the next wake-up, not at once: an
``unmask()`` failing at every call costs one per wake-up, not a spinning
thread.  A callback's own failure is not handed out again in this mode:
its port is unmasked all the same, and one dispatcher thread serves
every guest of a backend, whose every event would then cost every
port's callback.

A ``pending()`` that raises at every call (a bug of the platform's
handle) would still spin the thread: the port it failed to take keeps
the handle's descriptor readable, and every wake-up comes at once.  So
after a second failure in a row (of rounds that waited with the handle
watched, none gone well between them) the dispatcher backs off: it
leaves the handle out of its epoll set for 10 ms, doubled at each
failure in a row up to a second, serving its fds meanwhile, then
watches it again.  Every failure is logged with its traceback (within
the rate limit); the ones that back off say so.  Backing off, not
stopping: a failure that passes costs its ports a delay, not the
dispatcher, and one that stays costs a hand-out and a traceback a
second, not a CPU.

Two failures of ``pending()`` are told apart.  EFBIG says that Linux's
queue of the handle's fired ports overflowed (sized to the ports bound
since 2015, it overflows only if a port is unmasked before it was taken,
as by the hand-out above): the ports that fired meanwhile are masked and
lost, so the dispatcher resets the handle and hands every event out
again.  Any other OSError says that the handle is dead (the hypervisor
side went away): its ports are no longer dispatched, its fds still are.

The reset empties the queue, but the hand-out after it unmasks ports
that may be in the queue again already, which then fire and are queued
twice: a storm on every port may overflow it once more.  Not for ever:
as the ports are taken, the queue drains, and a read of it that finds
it empty (``pending()`` saying None, or a wait with the handle watched
that finds it not ready) says that the overflow is over.  So an
overflow that comes before any read found the queue empty since the
last reset is a failure of the dispatching: the handle is reset all
the same (else nothing would clear the overflow), and the round fails
with EFBIG, which backs off as above.  The first two overflows in a row
cost a reset each, at once; from the third the handle is left out of
the wait, and a queue that overflows again at once after every reset
costs a reset, a hand-out and a traceback per back-off, not a CPU, its
fds served meanwhile, until an overflow no longer follows the reset.

Poll mode
---------
A callback that queues a work item hands the event to another thread: the
worker wakes, and under the GIL that hand-off costs as much as the work of a
small request.  A backend that runs its I/O on per-CPU work items can take
the events on those CPUs instead, as Linux's NAPI polls a device from the
CPU that will process its packets: made with ``thread=False``, a dispatcher
starts no thread, and whoever owns it calls :meth:`EventDispatcher.poll`,
typically from a work item that queues itself again.  The callbacks then
queue work on the pool of the very worker that polls, which runs it next,
without waking anybody.  The sleep in ``epoll_wait`` is wrapped in
:func:`workqueue.blocking`, so the pool runs other items meanwhile.

A poll that fails (the handle's ``pending()`` or ``unmask()`` raising,
or its queue overflowing again: see above) raises, and its owner polls
again: the next poll hands every event out again, before it waits, as
the thread does.  So does the next poll after one whose callback raised:
the work the callback would have queued is lost, and a poller serves the
sockets of one CPU only.  A hand-out that fails in its turn is done
again after the next wait, not at once: a callback that raises at every
call costs a hand-out or two per wake-up (one after the wait, one for
the dispatch that follows it), not a spinning poller.  A poll that fails
again backs off as the thread does: while the handle is left out of the
wait, a poll returns at the latest when the delay ends.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from types import BuiltinMethodType, MethodType
from typing import TYPE_CHECKING

from workqueue import blocking, wait_slice
from xenback._closing import Closing
from xenback._eventqueue import check_callback as _check_callback
from xenback._flags import check_flag, is_int
from xenback.ratelimit import RateLimit

if TYPE_CHECKING:
    from xenback.platform import EventChannel, Platform

logger = logging.getLogger(__name__)

__all__ = ["EventDispatcher", "FdCallback", "PortCallback"]

#: Ports the dispatcher thread takes in one round before it looks at its
#: host fds again.  A guest can notify a port again before the callback
#: has returned and the port is unmasked, every time: the handle then
#: always has a port pending, and a round that ran until it had none would
#: never end, leaving every fd (another guest's listening socket, say)
#: unserved for as long as that guest wished.
_PORT_BATCH = 64

#: The first and the longest time the handle is left out of the wait
#: after the dispatching failed twice in a row (see the module docstring):
#: doubled at each failure in a row, from the first to the longest.
_BACKOFF_FIRST = 0.01
_BACKOFF_MAX = 1.0

#: ``callback(port)``, run on the dispatcher thread (poll mode: the polling one).
PortCallback = Callable[[int], object]
#: ``callback(fd, epoll_events)``, run on the dispatcher thread (poll mode: the polling one).
FdCallback = Callable[[int, int], object]


class EventDispatcher(Closing):
    """Dispatches event-channel ports and host fds to callbacks.

    :meth:`unbind` and :meth:`remove_fd` are synchronous, like the kernel's
    ``unbind_from_irqhandler``: when they return, the callback is not
    running and will not run again (except when called from that callback
    itself), so the caller may free what the callback uses.  A Ctrl-C
    ends their wait, with nothing unbound or removed.

    With ``thread=False`` (poll mode, see the module docstring) no thread is
    started and the owner calls :meth:`poll`.
    """

    def __init__(self, platform: Platform, *, name: str = "xenback-events",
                 thread: bool = True, into: list[EventDispatcher] | None = None) -> None:
        """Whole or nothing: failing or interrupted (Ctrl-C) at any step,
        the making closes what it had opened, its thread stopped first.
        With ``into``, the dispatcher is appended to it as the last step:
        for a caller that must close it whatever interrupts its making, a
        Ctrl-C as this returns included, which would lose a running
        dispatcher to it."""
        check_flag("thread", thread)
        self.name = name
        # _lock guards _ports, _fds (with _fd_events and _fds_taken),
        # _running (which running_port() reads without it in the one
        # thread that writes it), _closed (which the dispatching thread
        # also reads without it, between callbacks: close() waits for that
        # thread, or poll, before the descriptors go) and _released, and
        # serialises evtchn bind/unbind/unmask so that a port is never
        # unmasked after it was unbound.  pending() is called only by the
        # dispatcher thread, without it.  _idle is notified whenever a
        # callback finishes while _wait_idle() waits on it (_idle_waiters,
        # under _lock: a notify_all() with no waiter is three Python calls,
        # at every event), and as a poll() leaves a closed dispatcher.
        # Never held while a callback runs.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._idle_waiters = 0
        self._ports: dict[int, PortCallback] = {}
        self._fds: dict[int, FdCallback] = {}
        self._fd_events: dict[int, int] = {}  # their epoll masks, for _resync
        # ONESHOT fds whose callback took their event (did not raise):
        # disarmed until modify_fd, and so left alone by _resync.
        self._fds_taken: set[int] = set()
        self._running: tuple[str, int] | None = None
        # _closed: no more binding or dispatching; _released: the ports
        # unbound and the descriptors closed, after the wait for the thread.
        # _release_unfinished: a close() set _released and has not yet
        # closed every descriptor (a Ctrl-C cut it short): the next one
        # does it all again.  Set with _released, cleared at the very end.
        self._closed = False
        self._released = False
        self._release_unfinished = False
        # The ident of the thread that runs the callbacks: ours, or (poll
        # mode) the one inside poll(), None between polls and once ours
        # has ended.  Written only by that thread.  An ident, not the
        # Thread: threading.current_thread() is a Python call, at every poll.
        self._dispatching: int | None = None
        # Poll mode: held by the one thread inside poll(), so that close()
        # can wait (on _idle, for it to be free) before the descriptors go.
        # Taken only by poll(): see close() for why close() never takes it.
        self._poll_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # A dispatch cut short by a failure may have taken an event and
        # not delivered it, or left a port masked, so the next round hands
        # every event out again (_resync): at once, before it waits; or,
        # when a resync failed in its turn, after its wait, so that a
        # failure that stays costs a resync per wake-up rather than a
        # thread spinning.  _lost: an event may have been lost since the
        # round began (poll mode: also a callback that raised).  Written
        # only by the thread that dispatches.
        self._resync_now = False
        self._resync_later = False
        self._lost = False
        # Callbacks called since the dispatcher was made: poll() returns
        # what a round added, also the ones a round that raised in the
        # end ran.  Written only by the thread that dispatches.
        self._ran = 0
        # A handle whose pending() raises at every call (a bug, not an
        # OSError) leaves its descriptor readable for good: each round
        # would fail at once.  _backoff: None while the last round that
        # waited with the handle watched went well; 0.0 after one that
        # failed; else the delay of the back-off that the next failure
        # doubles.  _handle_back: while the handle is left out of the
        # epoll set, when it is watched again.  Written only by the
        # thread that dispatches.
        self._backoff: float | None = None
        self._handle_back: float | None = None
        # The handle was reset after an overflow, and no read or wait has
        # found its queue empty since: another overflow is a failure (see
        # the module docstring).  Written only by the thread that
        # dispatches.
        self._overflowed = False
        # A callback that raises is a bug, but a guest may set it off at
        # every notify, as fast as it likes: its tracebacks are limited.
        self._failures = RateLimit(f"{name} callbacks")
        # And those of the dispatching itself (the handle's pending() or
        # unmask() raising), which the dispatcher survives: they may come
        # at every event too, and no callback's may silence them.
        self._breakdowns = RateLimit(name)
        # Whole or nothing.  Short of descriptors or threads, any step may
        # fail, and a Ctrl-C may land as any call returns, the thread's
        # start() included: what the steps before it made is undone, not
        # left behind the error.  Not an ExitStack's with block, whose
        # pop_all() a Ctrl-C could follow, leaving the thread running.  The
        # handle and the pipe, which nothing closes when they are dropped,
        # are recorded by the call that makes them (list.extend() stores
        # what it returned before control is back in Python code): as
        # ``self._evtchn = platform.evtchn()``, a Ctrl-C as the call
        # returned would lose it before undo had it.
        handles: list[EventChannel] = []
        pipes: list[tuple[int, int]] = []
        undo = contextlib.ExitStack()
        try:
            handles.extend(itertools.starmap(platform.evtchn, ((),)))
            self._evtchn: EventChannel = handles[0]
            self._epoll = select.epoll()
            undo.callback(self._epoll.close)
            pipes.extend(map(os.pipe2, (os.O_NONBLOCK | os.O_CLOEXEC,)))
            self._wake_r, self._wake_w = pipes[0]
            self._evtchn_fd = self._evtchn.fileno()
            self._epoll.register(self._evtchn_fd, select.EPOLLIN)
            self._epoll.register(self._wake_r, select.EPOLLIN)
            if thread:
                self._thread = threading.Thread(target=self._run, name=name, daemon=True)
                # Undone first: the thread waits on the descriptors above,
                # which must not be closed (and their numbers reused)
                # under it.
                undo.callback(self._stop_unreturned)
                self._thread.start()
            if into is not None:
                into.append(self)
        except BaseException:
            if into and into[-1] is self:
                del into[-1]  # interrupted as append() returned
            undo.close()  # the thread first: it waits on the pipe and the handle
            for fd in (fd for pipe in pipes for fd in pipe):
                os.close(fd)
            for handle in handles:
                handle.close()
            raise

    def _stop_unreturned(self) -> None:
        """Stop the thread of a dispatcher whose making failed or was
        interrupted: it was never handed out, so nothing but the thread
        uses it.  Also a thread whose start() was cut short, before or
        after it began: one that begins later finds the dispatcher
        closed, and leaves at once."""
        self._closed = True
        os.write(self._wake_w, b"x")
        assert self._thread is not None
        # In slices, for a signal's handler (see wait_slice).
        while self._thread.is_alive():
            self._thread.join(wait_slice(None))

    # Event channels.

    def bind_interdomain(self, domid: int, remote_port: int, callback: PortCallback) -> int:
        """Bind to ``remote_port`` of ``domid``; returns the local port.
        Raises :class:`~xenback.platform.EventChannelError` on failure, and
        :class:`RuntimeError` once the dispatcher is closed."""
        _check_callback(callback)
        bound: list[int] = []
        try:
            self._bind(bound, callback, self._evtchn.bind_interdomain, domid, remote_port)
        except BaseException:
            self._give_back(bound, callback)
            raise
        return bound[0]

    def bind_unbound_port(self, domid: int, callback: PortCallback) -> int:
        """Allocate a port for ``domid`` to bind to (frontend side).
        Raises as :meth:`bind_interdomain` does."""
        _check_callback(callback)
        bound: list[int] = []
        try:
            self._bind(bound, callback, self._evtchn.bind_unbound_port, domid)
        except BaseException:
            self._give_back(bound, callback)
            raise
        return bound[0]

    def _bind(self, bound: list[int], callback: PortCallback, bind: Callable[..., int],
              *args: object) -> None:
        """Bind a port by ``bind(*args)`` (a method of the handle), record
        it in ``bound`` and list it with ``callback``.

        Recorded by the call that makes it (list.extend() stores what it
        returned before control is back in Python code): as ``port =
        bind(...)``, a Ctrl-C as the call returned would lose the number
        before it was listed, and the port stay bound, unknown, for the
        life of the handle.  The caller gives back what ``bound`` holds if
        a Ctrl-C lands before it returns the port, here or as this returns
        (in its own frame, so only it can): listed, a port whose number
        no caller has is bound for the dispatcher's life too."""
        with self._lock:
            self._check_open()
            bound.extend(itertools.starmap(bind, (args,)))
            self._ports[bound[0]] = callback

    def _give_back(self, bound: list[int], callback: PortCallback) -> None:
        """Unbind the port an interrupted bind took (in ``bound`` if any),
        listed (with ``callback``) or not."""
        for port in bound:
            with self._lock:
                self._wait_idle("port", port)
                if self._closed:
                    return  # close() unbinds it, or closing the handle does
                if self._ports.get(port, callback) is not callback:
                    # Unbound meanwhile (its callback knows the number), and
                    # bound again since, by another bind: that one's now.
                    return
                # Unlisted once the handle's unbind is over, by steps that
                # call nothing, as unbind() unlists: a second Ctrl-C as a
                # call before it returned left the port bound, unlisted.
                try:
                    self._evtchn.unbind(port)
                except OSError:
                    # Not raised over the Ctrl-C: a caller's except for
                    # this error would swallow it.
                    logger.debug("giving back port %d failed", port, exc_info=True)
                finally:
                    if port in self._ports:
                        del self._ports[port]

    def notify(self, port: int) -> None:
        """Send an event on ``port``."""
        self._evtchn.notify(port)

    def unbind(self, port: int, callback: PortCallback | None = None) -> None:
        """Unbind ``port``; waits for a running callback of it to return.
        :class:`KeyError` if it is not bound here, or, with ``callback``,
        if it is bound with another callback (a bound method of the same
        function and the very same object is its: one is made anew at
        each look-up).  For an owner that keeps the number on record
        until its unbind is over: done again after a Ctrl-C cut it short,
        it unbinds the port if that was not done, and leaves alone the
        number bound since by another."""
        if not is_int(port):
            # Before the lookup: 1.0 and True find port 1's callback, which
            # would be dropped before the handle refused them.
            raise TypeError(f"port must be an int, not {type(port).__name__}")
        with self._lock:
            self._wait_idle("port", port)
            listed = self._ports.get(port)
            if listed is None or (callback is not None and not _same_callback(listed, callback)):
                raise KeyError(f"event channel port {port} is not bound here"
                               + (" with that callback" if listed is not None else ""))
            # Unlisted once the handle's unbind has returned or raised, by
            # a step that calls nothing: unlisted by a call before it, a
            # Ctrl-C as that call returned left the port bound, known to
            # nobody, until the handle closes.  One inside the handle's
            # unbind (a Python call too) still may, before its act: then
            # nobody can tell whether it was done, and listed, the port's
            # number could be unbound again under its next owner.
            try:
                self._evtchn.unbind(port)
            finally:
                del self._ports[port]

    # Host file descriptors.

    def add_fd(self, fd: int, events: int, callback: FdCallback) -> None:
        """Call ``callback(fd, revents)`` when ``fd`` is ready for ``events``
        (an epoll mask).  Level-triggered unless ``select.EPOLLET`` or
        ``select.EPOLLONESHOT`` is in ``events``; with ONESHOT, re-arm with
        :meth:`modify_fd` once the work is done.  :class:`ValueError` if
        ``fd`` is registered already, :class:`RuntimeError` once the
        dispatcher is closed."""
        _check_callback(callback)
        _check_fd(fd)
        with self._lock:
            self._check_open()
            if fd in self._fds:
                raise ValueError(f"fd {fd} is already registered")
            # Listed before epoll's register, by steps that call nothing,
            # and unlisted again only for its own failure: listed after, a
            # Ctrl-C as it returned left the fd in the epoll set with no
            # callback, and every add_fd of it refused (EEXIST).
            self._fds[fd] = callback
            self._fd_events[fd] = events
            try:
                self._epoll.register(fd, events)
            except Exception:
                # Raised by register() itself: nothing was registered.  (An
                # interrupt comes only once it has returned: it stays listed.)
                del self._fds[fd]
                del self._fd_events[fd]
                raise

    def modify_fd(self, fd: int, events: int) -> None:
        """Change the epoll mask of a registered ``fd`` (re-arms ONESHOT)."""
        if type(fd) is not int:  # the check only: a call less per re-arm
            _check_fd(fd)
        with self._lock:
            if fd not in self._fds:
                raise KeyError(f"fd {fd} is not registered")
            self._epoll.modify(fd, events)
            self._fd_events[fd] = events
            self._fds_taken.discard(fd)

    def remove_fd(self, fd: int) -> None:
        """Stop watching ``fd``; waits for a running callback of it to return.
        Call it before closing the fd."""
        # Before the lookup: 1.0 finds fd 1's callback, which would be
        # dropped before epoll refused the float.
        _check_fd(fd)
        with self._lock:
            self._wait_idle("fd", fd)
            if fd not in self._fds:
                raise KeyError(f"fd {fd} is not registered")
            # Unlisted as unbind() unlists a port: by a call before epoll's
            # unregister, a Ctrl-C as it returned left the fd in the epoll
            # set, its callback gone, and every add_fd of it refused.  Not
            # taken either, whatever ends the unregister: kept so, the next
            # fd of the number, added ONESHOT, would be left to an owner
            # that never had it by every resync (the discard, a call, last).
            try:
                self._epoll.unregister(fd)
            finally:
                del self._fds[fd]
                del self._fd_events[fd]
                self._fds_taken.discard(fd)

    # Poll mode.

    def poll(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds (None: for ever) until a port or an
        fd is ready or :meth:`wakeup` is called, then run the callbacks of
        what is ready, in the calling thread; returns how many callbacks
        it called (also those that raised, and those of a hand-out again).

        For a dispatcher made with ``thread=False``, by one thread at a time.
        The wait counts as blocking for a calling work item
        (:func:`workqueue.blocking`); the callbacks run after it, as the
        item itself.  One event-channel port is taken per call (and every
        ready fd): the next call takes the next port at once.

        A call that raised, or whose callbacks did, may have lost events:
        the next call hands every one out again, before it waits: every
        port's callback and every fd's with its present readiness (a
        ONESHOT fd's only if its event was lost; see :mod:`xenback.events`),
        so a callback must take a call that no new event caused.
        """
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: poll() is for a dispatcher made with thread=False")
        if not self._poll_lock.acquire(blocking=False):
            raise RuntimeError(f"{self.name}: poll() called by two threads at once")
        try:
            if self._closed:
                return 0
            self._dispatching = threading.get_ident()
            try:
                return self._round(-1 if timeout is None else max(0.0, timeout))
            finally:
                self._dispatching = None
        finally:
            self._poll_lock.release()
            if self._closed:  # close() may wait for this poll to leave
                with self._lock:
                    self._idle.notify_all()

    def running_port(self) -> int | None:
        """The port whose callback the calling thread is running, or None
        (also in an fd's callback, and in any thread but the one that
        runs this dispatcher's callbacks): what waits there for that port's
        :meth:`unbind` by another thread waits for itself."""
        if threading.get_ident() != self._dispatching:
            return None
        # Written only by this very thread (see _dispatch_port): no lock.
        running = self._running
        return running[1] if running is not None and running[0] == "port" else None

    def wakeup(self) -> None:
        """Make the current (or the next) :meth:`poll` return at once.  A
        no-op once the dispatcher is closed."""
        # Under _lock: close() must not close the pipe (and its number be
        # reused by another file) between the check and the write.
        with self._lock:
            if self._released:
                return
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is pending already

    # Lifetime.

    def close(self) -> None:
        """Stop the thread (or wait for a poll in progress to return),
        unbind every port, close the handle.

        Idempotent, and a close() interrupted anywhere (Ctrl-C in the
        main thread) is finished by the next one: the first call marks the
        dispatcher closed, the descriptors go only after the wait.
        """
        with self._lock:
            if self._released and not self._release_unfinished:
                return
            self._closed = True
        self.wakeup()
        if self._thread is None:
            if self._dispatching != threading.get_ident():
                # Not by taking _poll_lock in slices: the interrupt of a
                # signal another thread took during a slice is raised only
                # once the acquire has returned, with the lock taken if the
                # poll had left meanwhile, and nothing could release it
                # (see bpo-45274, the same in Thread.join()).  A poll()
                # that starts after this check sees _closed and returns.
                with self._lock:
                    while self._poll_lock.locked():
                        self._idle.wait(wait_slice(None))
        elif self._thread is not threading.current_thread():
            # In slices, for a signal's handler (see wait_slice).
            while self._thread.is_alive():
                self._thread.join(wait_slice(None))
        with self._lock:
            if self._released and not self._release_unfinished:
                return  # another close() finished meanwhile
            self._released = self._release_unfinished = True
        # The descriptors go also when an unbind (a round trip to the
        # hypervisor) is interrupted, and closing the handle unbinds the
        # ports left.  Every step below may be done again, by the next
        # close() after a Ctrl-C as any of their calls returned.
        try:
            with self._lock:
                for port in list(self._ports):
                    try:
                        self._evtchn.unbind(port)
                    except OSError:
                        logger.debug("unbinding port %d at close failed", port, exc_info=True)
        finally:
            with self._lock:
                self._ports.clear()
                self._fds.clear()
                self._fd_events.clear()
                self._fds_taken.clear()
            self._evtchn.close()
            self._epoll.close()
            # Each number forgotten by a step that calls nothing, then
            # closed: never closed twice (it may be another file's by then).
            wake_r, self._wake_r = self._wake_r, -1
            if wake_r >= 0:
                os.close(wake_r)
            wake_w, self._wake_w = self._wake_w, -1
            if wake_w >= 0:
                os.close(wake_w)
        with self._lock:
            self._release_unfinished = False
        # The failures held back since the last report: none is lost.
        self._failures.close(logger, logging.ERROR)
        self._breakdowns.close(logger, logging.ERROR)

    @property
    def closed(self) -> bool:
        """Whether close() was called: its ports are unbound, or being
        unbound, by it."""
        return self._closed

    @property
    def ports(self) -> list[int]:
        """The bound ports (for tests and introspection)."""
        with self._lock:
            return list(self._ports)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("event dispatcher is closed")

    def _wait_idle(self, kind: str, key: int) -> None:
        # Called with _lock held.
        if threading.get_ident() == self._dispatching:
            return
        while self._running == (kind, key):
            self._idle_waiters += 1
            try:
                # In slices, for a signal's handler (see wait_slice): the
                # callback waited for may take as long as it likes.
                self._idle.wait(wait_slice(None))
            finally:
                self._idle_waiters -= 1

    def _run(self) -> None:
        self._dispatching = threading.get_ident()
        try:
            while not self._closed:
                try:
                    self._round(-1)
                except Exception as exc:
                    # Given up, the thread would take every port and fd of
                    # the dispatcher with it, for good.
                    if self._handle_back is None:
                        self._breakdowns.log(
                            logger, logging.ERROR,
                            "%s: dispatching failed; every port and fd is handed out again",
                            self.name, exc_info=exc)
                    else:
                        self._breakdowns.log(
                            logger, logging.ERROR,
                            "%s: dispatching failed again; every port and fd is handed out "
                            "again, and the event channel handle waited for again in %.2f s "
                            "(backing off)", self.name, self._backoff, exc_info=exc)
        finally:
            self._dispatching = None  # its ident may go to a new thread

    def _round(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds (-1: for ever), then run the
        callbacks of what is ready; but first, and without a wait, hand
        out again what the last round may have lost.  Returns how many
        callbacks ran."""
        ready: list[tuple[int, int]] = []
        ran = self._ran
        resync, self._resync_now = self._resync_now, False
        # watched: this round waits with the handle in the epoll set, and
        # its failure or success is the handle's (see _backoff).
        watched = not resync
        if watched:
            if self._handle_back is not None:
                timeout = self._backing_off(timeout)
                watched = self._handle_back is None
            with blocking():
                try:
                    ready = self._epoll.poll(timeout)
                except InterruptedError:
                    return 0
            if self._overflowed and watched and all(fd != self._evtchn_fd for fd, _ in ready):
                # Level-triggered, and Linux's poll() says POLLIN while its
                # queue holds a port, POLLERR once it overflowed: not ready
                # is empty.  (A poller takes one port per poll, and seldom
                # reads the queue empty.  Not so if more fds were ready
                # than one wait returns, a thousand: a reset is free again
                # then, with a round of every fd between two.)
                self._overflowed = False
            resync, self._resync_later = self._resync_later, False
        self._lost = False
        try:
            if resync:
                # Failed in its turn (also by raising): again after the
                # next wait, not at once.
                self._resync_later = True
                self._resync()
                self._resync_later, self._lost = self._lost, False
            self._dispatch(ready)
        except Exception:
            self._resync_now = not self._resync_later
            if watched:
                self._back_off()
            raise
        except BaseException:
            self._resync_now = not self._resync_later
            raise
        if watched and self._backoff is not None:
            self._backoff = None
        self._resync_now = self._lost
        return self._ran - ran

    def _back_off(self) -> None:
        """A round that waited with the handle watched failed: after
        another such failure with no round gone well between them, leave
        the handle out of the epoll set for a while (see the module
        docstring)."""
        if self._backoff is None:
            self._backoff = 0.0
            return
        self._backoff = min(max(2 * self._backoff, _BACKOFF_FIRST), _BACKOFF_MAX)
        with self._lock:
            if self._closed or self._handle_back is not None:
                return
            try:
                self._epoll.unregister(self._evtchn_fd)
            except FileNotFoundError:
                return  # given up as dead: no longer watched anyway
            self._handle_back = time.monotonic() + self._backoff

    def _backing_off(self, timeout: float) -> float:
        """The handle is left out of the epoll set: watch it again if its
        time has come; the wait's timeout, cut to that time if not."""
        assert self._handle_back is not None
        left = self._handle_back - time.monotonic()
        if left > 0:
            return left if timeout < 0 else min(timeout, left)
        with self._lock:
            if not self._closed:
                self._epoll.register(self._evtchn_fd, select.EPOLLIN)
            self._handle_back = None
        return timeout

    def _dispatch(self, ready: list[tuple[int, int]]) -> None:
        for fd, revents in ready:
            if self._closed:
                break  # closed by a callback: the descriptors are going
            if fd == self._wake_r:
                _drain(fd)
            elif fd == self._evtchn_fd:
                self._dispatch_ports()
            else:
                self._dispatch_fd(fd, revents)

    def _dispatch_ports(self) -> None:
        # At most _PORT_BATCH ports, then back to the fds: the handle's
        # descriptor is level-triggered, so the next epoll round returns at
        # once if ports are still pending.
        for _ in range(_PORT_BATCH):
            # Only this thread calls pending(), so it needs no lock; a slow
            # one must not hold up bind/unbind callers either.
            try:
                port = self._evtchn.pending()
            except OSError as exc:
                if exc.errno == errno.EFBIG and self._reset(exc):
                    return
                # The handle is dead (the hypervisor side went away): stop
                # polling it rather than spin on a descriptor stuck readable.
                logger.exception("event channel handle failed; ports are no longer dispatched")
                with self._lock:
                    if not self._closed:
                        self._epoll.unregister(self._evtchn_fd)
                return
            if port is None:
                self._overflowed = False  # read empty (see _reset)
                return
            self._dispatch_port(port)
            if self._closed:
                # The callback closed us (close() does not wait for its
                # own thread): the handle is gone, pending() would fail.
                return
            if self._thread is None:
                # Poll mode: one port per poll.  The handle's descriptor
                # stays readable while others are pending, so the next poll
                # returns at once, after the work this one queued; asking
                # the handle again until it has nothing would cost a system
                # call or two on every poll, most of which find one port.
                return

    def _reset(self, overflow: OSError) -> bool:
        """The handle's queue of fired ports overflowed (pending() said
        EFBIG, ``overflow``): what it held, and the ports that fired
        since, are masked and lost.  Reset it and have every port handed
        out again; False if the reset failed.  Raises EFBIG, once the
        handle is reset, if it overflowed again before any read found its
        queue empty since the last reset: a failure, which backs off (see
        the module docstring)."""
        again = self._overflowed
        try:
            self._evtchn.reset()
        except OSError:
            logger.exception("resetting the event channel handle after its overflow failed")
            return False
        self._lost = True
        self._overflowed = True
        if again:
            # Logged as the failure it is, with the back-off it sets off.
            raise OSError(errno.EFBIG, "the event channel handle overflowed again before its "
                          "queue was found empty since its reset: reset again") from overflow
        self._breakdowns.log(
            logger, logging.WARNING,
            "event channel handle overflowed: reset; every port is handed out again")
        return True

    def _dispatch_port(self, port: int) -> None:
        """Run the callback of ``port`` (masked: taken from the handle, or
        by a resync), then unmask it."""
        with self._lock:
            if self._closed:
                return
            callback = self._ports.get(port)
            self._running = ("port", port)
        returned = False
        try:
            if callback is not None:
                # Counted as called: the unmask after it may fail, and a
                # resync goes on past that.
                self._ran += 1
                try:
                    callback(port)
                except Exception as exc:
                    if self._thread is None:  # see the module docstring
                        self._lost = True
                    self._failures.log(logger, logging.ERROR,
                                       "event channel port %d: callback failed", port,
                                       exc_info=exc)
            returned = True
        finally:
            with self._lock:
                self._running = None
                if self._idle_waiters:
                    self._idle.notify_all()
                # Masked still after a BaseException (an unmask failing
                # would hide it): the resync that it sets off unmasks.
                if returned and not self._closed and port in self._ports:
                    self._evtchn.unmask(port)

    def _dispatch_fd(self, fd: int, revents: int) -> None:
        with self._lock:
            callback = self._fds.get(fd)
            if callback is None or self._closed:
                return
            self._running = ("fd", fd)
            # Taken before the call: the callback may re-arm the fd itself.
            if self._fd_events[fd] & select.EPOLLONESHOT:
                self._fds_taken.add(fd)
        self._ran += 1
        try:
            callback(fd, revents)
        except Exception as exc:
            if self._thread is None:  # see the module docstring
                self._lost = True
            with self._lock:
                self._fds_taken.discard(fd)  # lost: for a resync
            self._failures.log(logger, logging.ERROR, "fd %d: callback failed", fd, exc_info=exc)
        finally:
            with self._lock:
                self._running = None
                if self._idle_waiters:
                    self._idle.notify_all()

    def _resync(self) -> None:
        """After a dispatch that failed: hand out again whatever it may
        have lost.  Which port the handle had taken is not known
        (it may fail inside pending()), nor which edges of the host fds
        were in the epoll set's answer: so every port's callback runs and
        the port is unmasked, and every fd's with the readiness a level-
        triggered watch would report now.  Not a ONESHOT fd's, which may
        be armed still: one not taken is re-armed instead, and epoll
        reports it if it is ready (epoll_ctl looks), once whether its
        event was lost or not.  A failure is logged and leaves
        :attr:`_lost` set, as in a dispatch."""
        with self._lock:
            ports = list(self._ports)
        for port in ports:
            try:
                self._dispatch_port(port)
            except Exception as exc:
                self._lost = True
                self._failures.log(logger, logging.ERROR,
                                   "event channel port %d: unmask failed", port, exc_info=exc)
        with self._lock:
            if self._closed:
                return
            # Under _lock: no fd is removed, closed and its number reused
            # meanwhile.  The poll(2) bits are epoll's low 16; its flags
            # (EPOLLET, EPOLLONESHOT...) are above them.
            levels = select.poll()
            failed: list[tuple[int, OSError]] = []
            for fd, events in self._fd_events.items():
                if not events & select.EPOLLONESHOT:
                    levels.register(fd, events & 0xFFFF)
                elif fd not in self._fds_taken:
                    try:
                        self._epoll.modify(fd, events)
                    except OSError as exc:
                        failed.append((fd, exc))
            ready = levels.poll(0)
        for fd, error in failed:
            self._lost = True
            self._failures.log(logger, logging.ERROR, "fd %d: re-arming failed", fd,
                               exc_info=error)
        for fd, revents in ready:
            self._dispatch_fd(fd, revents)


#: Callables whose equality is CPython's, by the identity of their object.
_METHODS = (MethodType, BuiltinMethodType)


def _same_callback(listed: object, callback: object) -> bool:
    """Whether ``callback`` is the callback ``listed``: the very object, or
    a bound method (Python's or a builtin's) of the same function and the
    very same object.  Not by equality as such: two owners' callables may
    be equal (a dataclass's that is called, say), and their __eq__ would
    run under the dispatcher's lock.  The methods' own, CPython's, compares
    their objects by identity."""
    return listed is callback or (type(listed) in _METHODS
                                  and type(callback) is type(listed) and listed == callback)


def _check_fd(fd: int) -> None:
    if not is_int(fd):
        # epoll would take a socket (anything with fileno()), but it
        # reports the number, and the callback is looked up by it.
        raise TypeError(f"fd must be an int (a descriptor number), not "
                        f"{type(fd).__name__}: pass its fileno()")


def _drain(fd: int) -> None:
    """Empty the wake-up pipe (non-blocking)."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
