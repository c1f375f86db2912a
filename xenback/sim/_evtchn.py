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
stop watching its pipe (``EPOLL_CTL_MOD`` with no events), and unmask
resumes watching it, which reports the remembered notification.  The common
cycle (fire, pending, unmask) thus costs no epoll_ctl at all.

The connection to the hypervisor service is in the same epoll set: the
service pushes a message when a peer binds to one of our unbound ports (with
the peer's write end) or unbinds from one of ours.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from xenback.platform import EventChannelError

from ._hypervisor import MAX_EVTCHN_PORT
from ._proto import Message, ServiceConnection, close_fds, raise_nofile_limit

logger = logging.getLogger(__name__)

_WATCH = select.EPOLLIN
_IGNORE = 0


@dataclass(eq=False, slots=True)
class _LocalPort:
    port: int
    rfd: int  # read end of our pipe: readable == pending
    remote_domid: int
    remote_port: int | None = None  # None while unbound
    peer_fd: int | None = None  # write end of the peer's pipe, once connected
    masked: bool = False  # fired, not yet unmasked
    ignored: bool = False  # notified while masked: epoll stopped watching rfd
    dead: bool = False  # the host went away: never watched again


def _expect_fds(fds: list[int], count: int) -> None:
    if len(fds) != count:
        close_fds(fds)
        raise EventChannelError(errno.EPROTO, f"expected {count} descriptors from the service")


def _check_domid(domid: int) -> None:
    if type(domid) is not int or not 0 <= domid < 0x7FF0:
        raise EventChannelError(errno.EINVAL, f"invalid domain id {domid!r}")


def _check_port(port: int) -> None:
    if type(port) is not int or not 1 <= port <= MAX_EVTCHN_PORT:
        raise EventChannelError(errno.EINVAL, f"invalid event channel port {port!r}")


class EventChannel:
    """A ``xenevtchn`` handle of one domain (see :class:`xenback.platform.EventChannel`).

    Thread-safe: one thread typically waits on :meth:`fileno` and calls
    :meth:`pending`/:meth:`unmask` while others :meth:`notify`.
    """

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        raise_nofile_limit()
        self._epoll = select.epoll()
        try:
            self._conn = ServiceConnection(socket_path, EventChannelError, self._on_push)
        except BaseException:
            self._epoll.close()
            raise
        self._conn_fd: int | None = self._conn.fileno()
        self._epoll.register(self._conn_fd, select.EPOLLIN)
        # Written by close() to wake threads blocked in wait().
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        # _lock protects _ports, _by_fd, _closed, _waiters and the epoll
        # registrations, and keeps a descriptor from being closed while
        # another thread uses it.  Rule: may be taken while holding the
        # service connection's lock (pushed messages are applied under it),
        # never the other way round; never held across a request to the
        # service or a blocking wait.
        self._lock = threading.Lock()
        self._ports: dict[int, _LocalPort] = {}
        self._by_fd: dict[int, _LocalPort] = {}  # read end -> its port
        self._closed = False
        # Threads inside wait()'s epoll_wait, which runs without _lock: the
        # epoll descriptor is closed only once none is left, so that none
        # can block on a closed (or reused) descriptor.
        self._waiters = 0

    def fileno(self) -> int:
        """Readable when :meth:`pending` has something to return."""
        if self._closed:
            raise EventChannelError(errno.EBADF, "the event channel handle is closed")
        return self._epoll.fileno()

    # -- binding -------------------------------------------------------------

    def bind_unbound_port(self, domid: int) -> int:
        """Allocate a port that ``domid`` may bind to; returns its number."""
        _check_domid(domid)

        def apply(reply: Message, fds: list[int]) -> None:
            _expect_fds(fds, 1)
            self._add(_LocalPort(reply["port"], fds[0], domid))

        return self._bind("evtchn_alloc_unbound", apply, domid=domid)

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Connect a new local port to ``remote_port`` of ``domid``."""
        _check_domid(domid)
        _check_port(remote_port)

        def apply(reply: Message, fds: list[int]) -> None:
            _expect_fds(fds, 2)
            self._add(_LocalPort(reply["port"], fds[0], domid, remote_port, fds[1]))

        return self._bind("evtchn_bind_interdomain", apply, domid=domid, port=remote_port)

    def _bind(self, op: str, apply: Callable[[Message, list[int]], None], **args: int) -> int:
        """Send bind request ``op``; the service answers with the new port's
        read end (and, when connected, a write end of the peer's port).

        ``apply`` registers the port before any later pushed message about
        it can be delivered.
        """
        with self._lock:
            if self._closed:
                raise EventChannelError(errno.EBADF, "the event channel handle is closed")
        reply, _ = self._conn.call(op, (), apply=apply, **args)
        port: int = reply["port"]
        return port

    def _add(self, lp: _LocalPort) -> None:
        with self._lock:
            if self._closed:
                # Closed while the request was in flight: the service frees
                # the port when it sees the connection close.
                os.close(lp.rfd)
                if lp.peer_fd is not None:
                    os.close(lp.peer_fd)
                return
            self._ports[lp.port] = lp
            self._by_fd[lp.rfd] = lp
            self._epoll.register(lp.rfd, _WATCH)

    def unbind(self, port: int) -> None:
        """Close ``port``; its peer's port becomes unbound and fires."""
        _check_port(port)
        # Forget the port before the service frees its number: a port bound
        # meanwhile by another thread may get the same number.
        with self._lock:
            lp = self._ports.pop(port, None)
            if lp is None:
                raise EventChannelError(errno.EINVAL, f"port {port} is not bound by this handle")
            self._forget(lp)
        self._conn.call("evtchn_unbind", port=port)

    def _forget(self, lp: _LocalPort) -> None:
        del self._by_fd[lp.rfd]
        self._epoll.unregister(lp.rfd)
        os.close(lp.rfd)
        if lp.peer_fd is not None:
            os.close(lp.peer_fd)

    # -- events --------------------------------------------------------------

    def notify(self, port: int) -> None:
        """Fire the peer of ``port``; a no-op while it has no peer (as in Xen)."""
        with self._lock:
            lp = self._ports.get(port)
            if lp is not None and lp.peer_fd is not None:
                self._fire(lp)
                return
        # Unknown port, or no peer yet: a peer may have bound since we last
        # heard from the service.
        self._conn.drain()
        with self._lock:
            lp = self._ports.get(port)
            if lp is None:
                raise EventChannelError(errno.EINVAL, f"port {port!r} is not bound by this handle")
            if lp.peer_fd is not None:
                self._fire(lp)

    @staticmethod
    def _fire(lp: _LocalPort) -> None:
        """Write the peer's pending bit (under _lock)."""
        assert lp.peer_fd is not None
        try:
            os.write(lp.peer_fd, b"\x00")
        except BlockingIOError:
            pass  # the peer's pipe is full: the port is pending already
        except BrokenPipeError:
            # The peer closed its end; the service tells us shortly.
            os.close(lp.peer_fd)
            lp.peer_fd = None

    def pending(self) -> int | None:
        """Return one fired port, now masked, or None."""
        while True:
            with self._lock:
                if self._closed:
                    raise EventChannelError(errno.EBADF, "the event channel handle is closed")
                events = self._epoll.poll(0, 1)
                if not events:
                    return None
                port = self._take(events[0][0])
            if port is None:
                continue
            if port < 0:
                self._drain_service()
                continue
            return port

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until a port fires and return it, masked; None after ``timeout``.

        Not part of the Platform protocol: :meth:`pending` on a blocking
        descriptor, as ``xenevtchn_pending`` is, for a thread that has
        nothing else to wait for.  It saves the ``poll`` of :meth:`fileno`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            with self._lock:
                if self._closed:
                    raise EventChannelError(errno.EBADF, "the event channel handle is closed")
                self._waiters += 1
            try:
                # Not under _lock: notifiers and unmask must not wait for us.
                events = self._epoll.poll(remaining, 1)
            except BaseException:
                with self._lock:
                    self._leave_wait()
                raise
            with self._lock:
                self._leave_wait()
                if self._closed:
                    raise EventChannelError(errno.EBADF, "the event channel handle is closed")
                port = self._take(events[0][0]) if events else None
            if not events:
                return None
            if port is None:
                continue
            if port < 0:
                self._drain_service()
                continue
            return port

    def _leave_wait(self) -> None:
        """A thread left wait()'s epoll_wait (under _lock)."""
        self._waiters -= 1
        if self._closed and not self._waiters:
            self._release()

    def _take(self, fd: int) -> int | None:
        """Act on ``fd`` reported readable (under _lock).

        Returns the port that fired (now masked), None if there is nothing
        to report, or -1 if the service connection has messages.
        """
        lp = self._by_fd.get(fd)
        if lp is None:
            return -1 if fd == self._conn_fd else None
        if lp.masked:
            # Notified while masked: remember (the bytes stay in the pipe)
            # and stop watching until unmask.
            self._epoll.modify(fd, _IGNORE)
            lp.ignored = True
            return None
        # Clear the pending bit and mask.  Anything written after this read
        # is reported again at unmask.  Usually one byte: a small first
        # read is cheaper.
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return None  # reported before a concurrent unbind reused the fd
        if not data:
            # No writer left, not even the service's: the host is gone.
            self._epoll.modify(fd, _IGNORE)
            lp.ignored = lp.dead = True
            return None
        if len(data) == 64:
            try:
                while os.read(fd, 65536):
                    pass
            except BlockingIOError:
                pass
        lp.masked = True
        return lp.port

    def _drain_service(self) -> None:
        if not self._conn.drain():
            with self._lock:
                if self._conn_fd is not None and not self._closed:
                    self._epoll.unregister(self._conn_fd)
                    self._conn_fd = None

    def unmask(self, port: int) -> None:
        """Re-enable ``port``; it fires again at once if notified meanwhile."""
        with self._lock:
            lp = self._ports.get(port)
            if lp is None:
                raise EventChannelError(errno.EINVAL, f"port {port!r} is not bound by this handle")
            lp.masked = False
            if lp.ignored and not lp.dead:
                lp.ignored = False
                self._epoll.modify(lp.rfd, _WATCH)

    def remote(self, port: int) -> tuple[int, int] | None:
        """``(domid, port)`` of the peer of ``port``, or None while unbound.

        Not part of libxenevtchn: it lets tests and tools see a peer close.
        """
        self._conn.drain()
        with self._lock:
            lp = self._ports.get(port)
            if lp is None:
                raise EventChannelError(errno.EINVAL, f"port {port!r} is not bound by this handle")
            if lp.remote_port is None:
                return None
            return lp.remote_domid, lp.remote_port

    def ports(self) -> list[int]:
        """The ports bound by this handle."""
        with self._lock:
            return sorted(self._ports)

    def close(self) -> None:
        """Unbind every port (peers see it) and release the handle."""
        with self._lock:
            if self._closed:
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

    def _release(self) -> None:
        self._epoll.close()
        os.close(self._wake)

    def __enter__(self) -> EventChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- messages pushed by the service --------------------------------------

    def _on_push(self, msg: Message, fds: list[int]) -> None:
        event, port = msg.get("event"), msg.get("port")
        with self._lock:
            lp = self._ports.get(port) if type(port) is int else None
            if lp is None:
                close_fds(fds)
                if not self._closed:
                    logger.warning("evtchn: message for unknown port: %r", msg)
                return
            if lp.peer_fd is not None:
                os.close(lp.peer_fd)
                lp.peer_fd = None
            lp.remote_port = None
            if event == "bound" and len(fds) == 1:
                os.set_blocking(fds[0], False)
                lp.peer_fd = fds[0]
                lp.remote_domid = msg["domid"]
                lp.remote_port = msg["remote_port"]
            else:
                close_fds(fds)
