"""Event channels of the simulated host: the ``xenevtchn`` handle.

A bound port is a pipe whose read end this handle keeps: bytes in it are the
port's pending bit.  The peer handle (in whatever process) holds a write end
and notifies with one non-blocking ``write``; a full pipe means the port is
already pending, so nothing is ever lost or waited for.  No service is
on the notify path, which keeps the latency that of a pipe.

All port pipes sit in one epoll instance, the handle's
:meth:`~EventChannel.fileno`.  Masking is libxenevtchn's: a port that fired
stays masked until :meth:`EventChannel.unmask`, and whatever was notified
meanwhile is reported again at that moment.  It is done lazily, as Linux
masks interrupts lazily: :meth:`~EventChannel.pending` only marks the port
masked; only if the port is notified again while masked does the handle
stop watching its pipe (it leaves the epoll set: see ``_WATCH``), and unmask
puts it back, which reports the remembered notification.  The common
cycle (fire, pending, unmask) thus costs no epoll_ctl at all.

The connection to the hypervisor service is in the same epoll set: the
service pushes a message when a peer binds to one of our unbound ports (with
the peer's write end) or unbinds from one of ours.

:meth:`~EventChannel.pending` has a fast path for the usual event loop, which
polls :meth:`~EventChannel.fileno` and then asks which port fired: the port
it returned last is the likeliest to fire again, so once that port has been
unmasked, pending first reads its pipe directly, and asks epoll only when the
pipe is empty.  That saves an ``epoll_wait`` per event.  So that a port that
fires without pause cannot starve the others (or the service connection),
every ``_HOT_STREAK`` events taken that way are followed by one taken from
epoll with that port left out, if any other is ready.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Any

from workqueue import shown
from xenback._closing import Closing
from xenback.platform import EVTCHN_PORT_MAX, EventChannelError, check_domid, check_port

from ._proto import Message, ServiceConnection, close_fds, close_taken, raise_nofile_limit

logger = logging.getLogger(__name__)

# A port's pipe is in the epoll set while it is watched, and out of it
# while ignored: epoll reports a hang-up (a pipe with no writer left) even
# for a descriptor registered for no event, and pending() would spin on it.
_WATCH = select.EPOLLIN

# Events pending() may take from the hot port in a row without asking epoll
# (a bound on how long another ready port waits), and how many ready
# descriptors it then asks epoll for to find another one.
_HOT_STREAK = 16
_FAIR_BATCH = 16


@dataclass(eq=False, slots=True)
class _LocalPort:
    port: int
    rfd: int  # read end of our pipe: readable == pending
    remote_domid: int
    remote_port: int | None = None  # None while unbound
    peer_fd: int | None = None  # write end of the peer's pipe, once connected
    masked: bool = False  # fired, not yet unmasked
    ignored: bool = False  # notified while masked: rfd is out of the epoll set
    dead: bool = False  # the host went away: never watched again
    # unbind() or close() began to forget the port: its descriptors go
    # (each taken off it before it is closed, rfd set to -1), and unbind()
    # leaves its number in the table until the service freed it (close()
    # empties the table: the service frees them all as the handle goes).
    unbound: bool = False


class EventChannel(Closing):
    """A ``xenevtchn`` handle of one domain (see :class:`xenback.platform.EventChannel`).

    Thread-safe: one thread typically waits on :meth:`fileno` and calls
    :meth:`pending`/:meth:`unmask` while others :meth:`notify`.
    """

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        # _lock protects _ports, _by_fd, _closed, _waiters and the epoll
        # registrations, and keeps a descriptor from being closed while
        # another thread uses it.  Rule: may be taken while holding the
        # service connection's lock (pushed messages are applied under it),
        # never the other way round; never held across a request to the
        # service or a blocking wait.  Always taken with ``with``, also on
        # the per-event paths, where acquire() and try/finally release()
        # would be some 70 ns cheaper: CPython may run a signal's handler
        # as acquire() returns, before the try, and a KeyboardInterrupt
        # there (Ctrl-C in a guest's main thread) would leave the lock
        # held and the handle hung; nothing can come between ``with``'s
        # acquire and its clean-up.
        self._lock = threading.Lock()
        self._ports: dict[int, _LocalPort] = {}
        self._by_fd: dict[int, _LocalPort] = {}  # read end -> its port
        # _closed: every call but close() says EBADF.  Set first by close(),
        # which sets _released only once everything is: a close() cut short
        # (Ctrl-C in the main thread) is finished by the next one.
        self._closed = False
        self._released = False
        # Set by overflow(): pending() and wait() fail until reset().
        self._overflowed = False
        # The port pending() returned last (None after its pipe was found
        # empty, or once unbound: its descriptor may be reused), and how
        # many more events pending() may read from it before asking epoll.
        self._hot: _LocalPort | None = None
        self._hot_left = 0
        # Threads inside wait()'s epoll_wait, which runs without _lock: the
        # epoll descriptor is closed only once none is left, so that none
        # can block on a closed (or reused) descriptor.
        self._waiters = 0
        # Whole or nothing.  Short of descriptors any step may fail, and a
        # Ctrl-C may land as any call returns: what the steps before had
        # opened is closed before the error goes on, or a handle never
        # returned would keep it for the life of the process.  The eventfd,
        # an int that nothing closes when it is dropped, is recorded by the
        # call that makes it (list.extend() stores what it returned before
        # control is back in Python code); an epoll or a connection dropped
        # on its way in closes its descriptor itself.  Last, so that the
        # steps which open nothing come before and no undo is needed after.
        raise_nofile_limit()
        conn: ServiceConnection | None = None
        wake: list[int] = []
        self._epoll = select.epoll()
        try:
            conn = ServiceConnection(socket_path, EventChannelError, self._on_push,
                                     on_wait=self._quiet_service)
            self._conn = conn
            self._conn_fd: int | None = conn.fileno()
            self._epoll.register(self._conn_fd, select.EPOLLIN)
            # Written by close() to wake threads blocked in wait(), and by
            # overflow() to keep the handle readable until reset().
            wake.extend(map(os.eventfd, (0,), (os.EFD_NONBLOCK | os.EFD_CLOEXEC,)))
            self._wake = wake[0]
            self._epoll.register(self._wake, select.EPOLLIN)
        except BaseException:
            close_fds(wake)
            if conn is not None:
                conn.close()
            self._epoll.close()
            raise

    def _check_open(self) -> None:
        # Called with _lock held.  EBADF for every call once closed, as the
        # xen platform says it (libxenevtchn's descriptor is gone): not
        # "port not bound", which would blame the caller's port number.
        if self._closed:
            raise EventChannelError(errno.EBADF, "the event channel handle is closed")

    def fileno(self) -> int:
        """Readable when :meth:`pending` has something to return."""
        if self._closed:
            raise EventChannelError(errno.EBADF, "the event channel handle is closed")
        return self._epoll.fileno()

    # -- binding -------------------------------------------------------------

    def bind_unbound_port(self, domid: int) -> int:
        """Allocate a port that ``domid`` may bind to; returns its number."""
        domid = check_domid(EventChannelError, domid)  # as the xen platform checks it
        return self._bind("evtchn_alloc_unbound", 1, domid, None, domid=domid)

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Connect a new local port to ``remote_port`` of ``domid``."""
        domid = check_domid(EventChannelError, domid)
        # A plain int (kept, and to the service's JSON).  Past the host's
        # own ports the service answers as for any port not unbound for us.
        remote_port = check_port(remote_port)
        return self._bind("evtchn_bind_interdomain", 2, domid, remote_port,
                          domid=domid, port=remote_port)

    def _bind(self, op: str, nfds: int, domid: int, remote_port: int | None, /,
              **args: Any) -> int:
        """Send bind request ``op``; the service answers with the new port's
        read end (and, when connected, a write end of the peer's port):
        ``nfds`` descriptors.

        The reply is taken by :meth:`_take_port`, as the connection's
        ``apply``: the port is registered before any later pushed message
        about it can be delivered, and it is the handle's or the
        connection's whatever a Ctrl-C cuts short.
        """
        with self._lock:
            if self._closed:
                raise EventChannelError(errno.EBADF, "the event channel handle is closed")
        apply = functools.partial(self._take_port, nfds, domid, remote_port)
        reply, _ = self._conn.call(op, (), apply=apply, **args)
        port: int = reply["port"]
        return port

    def _take_port(self, nfds: int, domid: int, remote_port: int | None,
                   reply: Message, fds: list[int]) -> None:
        """Make the port a bind's reply gave this handle's (the bind's
        ``apply``, under the connection's lock).

        The descriptors stay the connection's until the step that lists
        the port: refused (an error raised here) or cut short before it,
        the reply is given back by the connection, its descriptors closed.
        """
        # get(): a reply without its port is the service's fault (EPROTO),
        # not a KeyError that would pass for a bug of the handle; so is a
        # number no port has, which no call of the handle could name.
        port = reply.get("port")
        if len(fds) != nfds or type(port) is not int or not 0 < port <= EVTCHN_PORT_MAX:
            raise EventChannelError(errno.EPROTO, f"a malformed reply from the service: {reply!r}")
        lp = _LocalPort(port, fds[0], domid, remote_port, fds[1] if nfds == 2 else None)
        with self._lock:
            if self._closed:
                # Closed while the request was in flight: close() did not
                # see the port, the connection gives it back.
                raise EventChannelError(errno.EBADF, "the event channel handle is closed")
            held = self._ports.get(port)
            if held is not None and not held.unbound:
                # The number of a port the handle holds (one whose unbind
                # is under way has been freed): listed over it, that port
                # would be lost, its descriptors never closed.
                raise EventChannelError(
                    errno.EPROTO, f"the service gave port {port} again, which this handle holds")
            # Watched before it is listed: the read end is the only one
            # left (the service closed its copy as it replied), so if the
            # port is given back instead, closing it takes it out of the
            # epoll set.
            self._epoll.register(lp.rfd, _WATCH)
            # One step, as far as a signal goes (no call in between): the
            # port and its descriptors become the handle's, no longer the
            # connection's.
            self._ports[port] = lp
            self._by_fd[lp.rfd] = lp
            del fds[:]

    def unbind(self, port: int) -> None:
        """Close ``port``; its peer's port becomes unbound and fires.

        One the service refuses to unbind with another error than EINVAL
        (out of descriptors, failing, gone) stays in the table, bound for
        no call but this one and :meth:`close`, as a failed
        ``IOCTL_EVTCHN_UNBIND`` leaves Linux's port bound: the service may
        hold it still, its peer connected, and unbind() again asks it
        again.  EINVAL (the service holds no such port of ours) drops it.
        :class:`EventChannelError` ENOTCONN for a port this handle has not
        bound, EINVAL for no port number, EBADF once closed.
        """
        # EINVAL for no port (as the xen platform checks it), ENOTCONN
        # for one not bound here: Linux's IOCTL_EVTCHN_UNBIND on a FIFO
        # host, whose ports go up to the check's last one.
        port = check_port(port)
        # Forget the port before the service frees its number: a port bound
        # meanwhile by another thread may get the same number.  The port
        # stays in the table, unbound, until the service freed it: news
        # about it still queued on the connection (the peer bound or
        # unbound meanwhile: usual when both ends close at once) comes in
        # during the request, and is stale, not a confused service; and an
        # unbind() cut short by a Ctrl-C, or refused, is finished by the
        # next one, which finds the port there.  The service answers after
        # everything it sent about the port, so no stale news reaches a new
        # port of the same number.
        with self._lock:
            self._check_open()
            lp = self._ports.get(port)
            if lp is None:
                raise EventChannelError(errno.ENOTCONN, f"port {port} is not bound by this handle")
            again = lp.unbound
            self._forget(lp)
        try:
            _, fds = self._conn.call("evtchn_unbind", port=port)
            close_taken(fds)  # none are due: a malformed reply's
        except EventChannelError as e:
            if e.errno != errno.EINVAL:
                raise  # kept, for the next unbind() (see above)
            self._drop(lp)
            # To a request made again: the first one freed the port before
            # a Ctrl-C cut its caller short.
            if not again:
                raise
            return
        self._drop(lp)

    def _drop(self, lp: _LocalPort) -> None:
        """Take ``lp``, unbound and freed by the service, off the table."""
        with self._lock:
            # A port bound since may have the number already.
            if self._ports.get(lp.port) is lp:
                del self._ports[lp.port]

    def _forget(self, lp: _LocalPort) -> None:
        """Stop watching ``lp`` and close its descriptors (under _lock).

        Each step may be done again, by the next unbind() or close() after
        a Ctrl-C as any call here returned: each flag is set, and each
        descriptor taken off the port, by a step that calls nothing before
        the call it stands for, so that none is done twice (a descriptor
        closed twice may be another file's by then).
        """
        # Never watched, read or reset again (unmask() and reset() look at
        # these, pending() at _hot).
        lp.unbound = lp.dead = lp.masked = True
        if self._hot is lp:
            self._hot = None
        rfd = lp.rfd
        if rfd >= 0:
            if not lp.ignored:
                lp.ignored = True
                self._epoll.unregister(rfd)
            self._by_fd.pop(rfd, None)
            lp.rfd = -1
            os.close(rfd)
        peer_fd, lp.peer_fd = lp.peer_fd, None
        if peer_fd is not None:
            os.close(peer_fd)

    # -- events --------------------------------------------------------------

    def notify(self, port: int) -> None:
        """Fire the peer of ``port``; a no-op while it has no peer (as in Xen).
        :class:`EventChannelError` ENOTCONN for a port this handle has not
        bound (or is unbinding), EINVAL for no port number, EBADF once
        closed."""
        if type(port) is not int or not 0 < port <= EVTCHN_PORT_MAX:
            # As the xen platform checks it (a plain int in range spared
            # the call), before the table: True and 1.0 are port 1's keys
            # there.
            port = check_port(port)
        with self._lock:
            if self._closed:  # the check only: a call less per event
                self._check_open()
            lp = self._ports.get(port)
            if lp is not None:
                fd = lp.peer_fd
                if fd is not None:
                    # Under _lock: unbind and the service's messages close
                    # peer_fd under it, so fd cannot be a reused number.
                    try:
                        os.write(fd, b"\x00")
                        return
                    except BlockingIOError:
                        return  # the peer's pipe is full: the port is pending already
                    except BrokenPipeError:
                        # That peer unbound.  Another may have bound since
                        # (Xen would deliver to it): ask the service below.
                        self._lost_peer(lp)
        # Unknown port, no peer yet, or a peer gone: a peer may have bound
        # since we last heard from the service.
        self._conn.drain()
        with self._lock:
            self._check_open()
            lp = self._ports.get(port)
            if lp is None or lp.unbound:
                # Linux's IOCTL_EVTCHN_NOTIFY on a FIFO host, as unbind.
                raise EventChannelError(errno.ENOTCONN, f"port {port} is not bound by this handle")
            if lp.peer_fd is not None:
                try:
                    os.write(lp.peer_fd, b"\x00")
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    self._lost_peer(lp)

    @staticmethod
    def _lost_peer(lp: _LocalPort) -> None:
        """The peer closed its end (under _lock); the service tells us shortly."""
        # Off the port before it is closed, as in _take_news: a Ctrl-C as
        # close() returns must not leave the number to be closed again.
        peer_fd, lp.peer_fd = lp.peer_fd, None
        assert peer_fd is not None
        os.close(peer_fd)

    def pending(self) -> int | None:
        """Return one fired port, now masked, or None.
        :class:`EventChannelError` EFBIG after :meth:`overflow` until
        :meth:`reset`, EBADF once closed."""
        lock = self._lock
        while True:
            with lock:
                if self._closed:
                    raise EventChannelError(errno.EBADF, "the event channel handle is closed")
                if self._overflowed:  # the check only: a call less per event
                    self._check_overflow()
                hot = self._hot
                if hot is None or hot.masked:
                    port = self._take_ready()
                elif self._hot_left:
                    self._hot_left -= 1
                    if self._clear(hot):
                        return hot.port
                    self._hot = None  # cold again: ask epoll
                    port = self._take_ready()
                else:
                    port = self._take_other(hot)
                if port is None or port > 0:
                    return port
            if port < 0:
                self._drain_service()

    def _take_ready(self) -> int | None:
        """Take the first descriptor epoll reports (under _lock).

        Returns as :meth:`_take`, or None if none is ready.
        """
        events = self._epoll.poll(0, 1)
        if not events:
            return None
        port = self._take(events[0][0])
        if port > 0:
            self._heat(port)
        return port

    def _take_other(self, hot: _LocalPort) -> int | None:
        """The hot port had its streak: take another ready one if there is
        one, else the hot port (under _lock).  Returns as :meth:`_take_ready`.

        The hot port was read directly meanwhile, so epoll's ready list may
        still hold it first: look past it.
        """
        self._hot = None
        events = self._epoll.poll(0, _FAIR_BATCH)
        for fd, _ in events:
            if fd != hot.rfd:
                port = self._take(fd)
                if port:
                    if port > 0:
                        self._heat(port)
                    return port
        # Nobody else is ready (within the batch): the hot port may go on.
        if self._clear(hot):
            self._heat(hot.port)
            return hot.port
        return 0 if events else None

    def _heat(self, port: int) -> None:
        """Make ``port``, just taken, the hot port (under _lock)."""
        self._hot = self._ports[port]
        self._hot_left = _HOT_STREAK

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until a port fires and return it, masked; None after ``timeout``.

        Not part of the Platform protocol: :meth:`pending` on a blocking
        descriptor, as ``xenevtchn_pending`` is, for a thread that has
        nothing else to wait for.  It saves the ``poll`` of :meth:`fileno`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining = -1.0
        lock = self._lock
        while True:
            if deadline is not None:
                remaining = max(0.0, deadline - time.monotonic())
            waiting = False
            try:
                with lock:
                    if self._closed:
                        raise EventChannelError(errno.EBADF, "the event channel handle is closed")
                    self._waiters += 1
                    waiting = True
                # Not under _lock: notifiers and unmask must not wait for us.
                events = self._epoll.poll(remaining, 1)
            except BaseException:
                # Also an interrupt as the with block let go of the lock.
                if waiting:
                    with lock:
                        self._leave_wait()
                raise
            with lock:
                self._waiters -= 1
                if self._closed:
                    if not self._waiters:
                        self._release()
                    raise EventChannelError(errno.EBADF, "the event channel handle is closed")
                self._check_overflow()
                if not events:
                    return None
                port = self._take(events[0][0])
                if port > 0:
                    return port
            if port < 0:
                self._drain_service()

    def _leave_wait(self) -> None:
        """A thread left wait()'s epoll_wait (under _lock)."""
        self._waiters -= 1
        if self._closed and not self._waiters:
            self._release()

    def _take(self, fd: int) -> int:
        """Act on ``fd`` reported readable (under _lock).

        Returns the port that fired (now masked), 0 if there is nothing to
        report, or -1 if the service connection has messages.
        """
        lp = self._by_fd.get(fd)
        if lp is None:
            return -1 if fd == self._conn_fd else 0
        if lp.masked:
            # Notified while masked: remember (the bytes stay in the pipe)
            # and stop watching until unmask.  Another thread's epoll_wait
            # (wait() polls without _lock) may have reported it too.
            if not lp.ignored:
                self._epoll.unregister(fd)
                lp.ignored = True
            return 0
        return lp.port if self._clear(lp) else 0

    def _clear(self, lp: _LocalPort) -> bool:
        """Clear ``lp``'s pending bit and mask it, if it is pending (under _lock).

        Anything written after the read is reported again at unmask.
        """
        try:
            # Usually one byte: a small first read is cheaper.
            data = os.read(lp.rfd, 64)
        except BlockingIOError:
            # Not pending, or reported before a concurrent unbind reused
            # the descriptor.
            return False
        if not data:
            # No writer left, not even the service's: the host is gone.
            if not lp.ignored:
                self._epoll.unregister(lp.rfd)
            if self._hot is lp:
                self._hot = None
            lp.ignored = lp.dead = True
            return False
        if len(data) == 64:
            try:
                while os.read(lp.rfd, 65536):
                    pass
            except BlockingIOError:
                pass
        lp.masked = True
        return True

    def _quiet_service(self, quiet: bool) -> None:
        """The connection's on_wait: while a request of ours waits for its
        reply (under the connection's lock), the service connection is out
        of the epoll set (no events, though a hang-up is still reported),
        so that the reply does not wake a thread waiting in :meth:`wait`
        or on :meth:`fileno`, which would only find it taken.  Pushed
        messages that come meanwhile are taken by the request; those that
        come after its reply are reported as the connection is watched
        again (epoll_ctl checks readiness).  Watching it again twice (the
        connection makes on_wait(False) again if a Ctrl-C cut it short)
        changes nothing."""
        with self._lock:
            if self._conn_fd is not None and not self._closed:
                self._epoll.modify(self._conn_fd, 0 if quiet else select.EPOLLIN)

    def _drain_service(self) -> None:
        if not self._conn.drain():
            with self._lock:
                if self._conn_fd is not None and not self._closed:
                    self._epoll.unregister(self._conn_fd)
                    self._conn_fd = None

    def unmask(self, port: int) -> None:
        """Re-enable ``port``; it fires again at once if notified meanwhile.

        Stricter than Linux, whose evtchn device ignores an unmask of a
        port the handle does not hold: here that is EINVAL, so that a
        backend unmasking a stale port number is caught in its tests (on
        the xen platform the same call does nothing).
        """
        if type(port) is not int or not 0 < port <= EVTCHN_PORT_MAX:  # as in notify()
            port = check_port(port)
        with self._lock:
            if self._closed:  # the check only: a call less per event
                self._check_open()
            lp = self._ports.get(port)
            # One whose unbind began is stale too (its descriptors gone),
            # as notify() and remote() say; and it stays masked, so that
            # reset() reads no descriptor it no longer has.
            if lp is None or lp.unbound:
                raise EventChannelError(errno.EINVAL,
                                        f"port {shown(port)} is not bound by this handle")
            lp.masked = False
            if lp.ignored and not lp.dead:
                lp.ignored = False
                self._epoll.register(lp.rfd, _WATCH)

    def reset(self) -> None:
        """Empty the queue of fired ports and clear its overflow (Linux's
        ``IOCTL_EVTCHN_RESET``).  What the queue held is dropped: a port
        that fired and was not taken stays masked, as if taken, and what
        notifies it meanwhile is remembered until :meth:`unmask`.

        The simulated handle keeps no queue, only its ports' pipes: each
        pipe that holds a notification is read and its port masked.
        """
        with self._lock:
            self._check_open()
            if self._overflowed:
                self._overflowed = False
                os.eventfd_read(self._wake)
            for lp in self._ports.values():
                if not (lp.masked or lp.unbound):
                    self._clear(lp)

    def overflow(self) -> None:
        """Act as Linux's evtchn device once its queue of fired ports
        overflowed: :meth:`pending` and :meth:`wait` fail with EFBIG, and
        :meth:`fileno` stays readable, until :meth:`reset`.

        Not part of libxenevtchn: the simulated handle has no queue that
        could overflow, and this lets tests reach a backend's recovery.
        """
        with self._lock:
            self._check_open()
            if not self._overflowed:
                self._overflowed = True
                os.eventfd_write(self._wake, 1)

    def _check_overflow(self) -> None:
        # Called with _lock held.  Linux's read() says EFBIG, its poll()
        # POLLERR (here: _wake is readable).
        if self._overflowed:
            raise EventChannelError(
                errno.EFBIG, "the queue of fired ports overflowed: reset the handle")

    def remote(self, port: int) -> tuple[int, int] | None:
        """``(domid, port)`` of the peer of ``port``, or None while unbound.

        Not part of libxenevtchn: it lets tests and tools see a peer close.
        """
        self._conn.drain()
        with self._lock:
            self._check_open()
            lp = self._ports.get(port)
            if lp is None or lp.unbound:
                raise EventChannelError(errno.EINVAL,
                                        f"port {shown(port)} is not bound by this handle")
            if lp.remote_port is None:
                return None
            return lp.remote_domid, lp.remote_port

    def ports(self) -> list[int]:
        """The ports bound by this handle."""
        with self._lock:
            return sorted(port for port, lp in self._ports.items() if not lp.unbound)

    def close(self) -> None:
        """Unbind every port (peers see it) and release the handle.

        Idempotent; a close() cut short by a Ctrl-C is finished by the
        next one, which does every step again (each may be done twice).
        """
        with self._lock:
            if self._released:
                return
            self._closed = True
            for lp in self._ports.values():
                self._forget(lp)
            self._ports.clear()
            if self._waiters:
                os.eventfd_write(self._wake, 1)  # the last waiter releases
            else:
                self._release()
        # The service unbinds the ports when the connection closes.
        self._conn.close()
        with self._lock:
            self._released = True

    def _release(self) -> None:
        """Close the epoll set and the eventfd (under _lock); may be done
        again, as :meth:`_forget`'s steps."""
        self._epoll.close()
        wake, self._wake = self._wake, -1
        if wake >= 0:
            os.close(wake)

    # -- messages pushed by the service --------------------------------------

    def _new_pipe(self, lp: _LocalPort, fds: list[int], index: int) -> None:
        """Read ``lp``'s events from ``fds[index]`` from now on (under _lock).

        The service gave the port a new pipe as its peer went: whoever
        kept a write end of the old one can fire it no more.  The service
        fired the new one, so nothing that was pending is lost.

        The new read end and the old one trade places in one step: the
        new one the port's, the old one last in ``fds``, for the caller
        to close (which takes it out of the epoll set, if a Ctrl-C came
        before the unregister here: unregistered first, a port cut short
        there kept a pipe nobody watched, and never fired again).  What
        may fail (no room in the epoll set) comes first and changes
        nothing: the port keeps its pipe, the caller closes the new one.
        """
        rfd = fds[index]
        watch = not (lp.ignored and lp.masked)  # else set aside until unmask
        if watch:
            self._epoll.register(rfd, _WATCH)
        old, watched = lp.rfd, not lp.ignored
        # One step, as far as a signal goes (no call in between, nor
        # before append() has stored ``old``).
        del self._by_fd[old]
        self._by_fd[rfd] = lp
        lp.rfd = rfd
        lp.dead = False
        lp.ignored = not watch
        del fds[index]
        fds.append(old)
        if watched:
            self._epoll.unregister(old)

    def _on_push(self, msg: Message, fds: list[int]) -> None:
        """The connection's on_push: what the port does not take off
        ``fds`` the connection closes, also if a step failed (the news
        then dropped, logged by the connection) or a Ctrl-C cut it short."""
        event = msg.get("event")
        rfd = msg.get("rfd")
        # Not isinstance: True would name descriptor 1.
        malformed = "rfd" in msg and (type(rfd) is not int or not 0 <= rfd < len(fds))
        peer_ends = len(fds) - ("rfd" in msg)
        # Checked before anything changes: news the handle cannot take (the
        # service broke the protocol) leaves the port as it was, and the
        # message goes as a malformed packet does, logged.  A push carries
        # its event's descriptors, exactly: a "bound" its peer's write end,
        # one (without it the port would lose its peer on news that is no
        # news), an "unbound" none, and either the port's new read end if,
        # and only if, "rfd" names it.  Extras, or a "rfd" naming nothing,
        # are the service's bug, seen only if refused and logged.
        if event == "bound":
            malformed = (malformed or type(msg.get("domid")) is not int
                         or type(msg.get("remote_port")) is not int or peer_ends != 1)
        else:
            malformed = malformed or event != "unbound" or peer_ends != 0
        if malformed:
            logger.error("evtchn: a malformed message from the hypervisor service: %r (dropped)",
                         msg)
            return
        with self._lock:
            self._take_news(msg, fds, rfd)  # None unless "rfd" names one

    def _take_news(self, msg: Message, fds: list[int], rfd: int | None) -> None:
        """Apply checked news ``msg`` to its port (under _lock); the
        descriptors the port takes leave ``fds``."""
        port = msg.get("port")
        lp = self._ports.get(port) if type(port) is int else None
        if lp is None or lp.unbound:
            if self._closed or lp is not None:
                logger.debug("evtchn: news about a port we gave up: %r", msg)
            else:
                logger.warning("evtchn: message for unknown port: %r", msg)
            return
        # Before anything changes, as all that may fail: a failure leaves
        # the port as it was.
        for fd in fds:
            os.set_blocking(fd, False)
        if rfd is not None:
            self._new_pipe(lp, fds, rfd)
        # Off the port before it is closed: a Ctrl-C as close() returns
        # must leave it neither a number to close again nor a peer it
        # cannot notify.
        old_peer, lp.peer_fd = lp.peer_fd, None
        lp.remote_port = None
        if old_peer is not None:
            os.close(old_peer)
        if msg["event"] == "bound":
            # One step, as far as a signal goes: the write end is the
            # port's.  First in ``fds``: a new read end left it, and the
            # old one went last.
            lp.peer_fd = fds[0]
            del fds[0]
            lp.remote_domid = msg["domid"]
            lp.remote_port = msg["remote_port"]
