"""Released sockets with the guest's data still to send: orphaned sockets.

A program that sends and then closes a socket expects its data to arrive:
``close()`` of a host socket returns at once, and the kernel goes on
sending what the socket buffer holds before it sends FIN.  Over PV Calls the
socket buffer is the out ring, in the guest's memory, and RELEASE may come
while it still holds bytes the backend has not sent (a guest's ``sendall()``
returns once its data is in the ring).  Linux's backend drops them.  This
backend sends, at RELEASE, what the host socket takes at once, straight from
the ring; if some is left (the peer reads slowly), it copies that rest, at
most one ring's worth, and hands the host socket to a :class:`Lingerer`,
which sends it as the peer makes room and then closes the socket, as the
kernel does with the socket of a process that closed it.  The ring is
unmapped and RELEASE answered at once, as before.

Bounds, since a guest decides how much lingers: each domain may have at
most ``max_bytes`` lingering, in at most ``max_sockets`` sockets (beyond
that, what is left is dropped, as by Linux's backend, with a rate-limited
warning), and a socket whose peer has not taken everything within
``timeout`` seconds is closed with the rest.  The bound on sockets is the
one on host descriptors: a guest can leave a byte or two in each socket it
releases, and the domain's socket limit no longer counts them.  So a
domain whose policy sets a lower ``max_sockets`` lingers at most that
many: it holds at most twice its limit in host sockets, not its limit
plus ``max_sockets``.  What is logged of a domain's released sockets
(dropped, or closed with data unsent) goes through its frontend's rate
limit: a guest whose peers reset each connection ends its lingering
sockets as fast as it releases them.  So does a bug of ours in sending
(logged with its traceback): it ends that socket with what it holds.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from dataclasses import dataclass

from workqueue import DelayedWork, Workqueue
from xenback.events import EventDispatcher
from xenback.ratelimit import RateLimit

__all__ = ["Lingerer", "LINGER_TIMEOUT", "LINGER_MAX_BYTES", "LINGER_MAX_SOCKETS"]

logger = logging.getLogger(__name__)

#: How long a released socket may take to send what it still holds.
LINGER_TIMEOUT = 60.0
#: How many bytes the released sockets of one domain may hold at a time:
#: 32 sockets' worth of Linux's order-4 out rings.
LINGER_MAX_BYTES = 1 << 20
#: How many released sockets of one domain may linger at a time: as many
#: full order-4 rings as LINGER_MAX_BYTES holds.
LINGER_MAX_SOCKETS = 32


@dataclass(eq=False)
class _Orphan:
    host: socket.socket
    domid: int
    size: int  # bytes adopted, counted against the domain until the end
    # What the peer has yet to take: only the sender touches it, until
    # whoever ends the orphan has taken it out of the table.
    rest: memoryview
    # The releasing frontend's (it outlives the frontend): a guest whose
    # peers reset every connection ends orphans as fast as it releases them.
    ratelimit: RateLimit
    timer: DelayedWork | None = None


class Lingerer:
    """Host sockets released with data to send: sent when writable, then closed.

    Sends run on ``dispatcher``'s thread; the timeouts are delayed work on
    ``wq``.
    """

    def __init__(self, dispatcher: EventDispatcher, wq: Workqueue, *,
                 timeout: float = LINGER_TIMEOUT, max_bytes: int = LINGER_MAX_BYTES,
                 max_sockets: int = LINGER_MAX_SOCKETS) -> None:
        self._dispatcher = dispatcher
        self._wq = wq
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_sockets = max_sockets
        # _lock guards _orphans (by descriptor), _bytes and _count (per
        # domain) and _closed.  Never held while waiting for the
        # dispatcher (remove_fd waits for a running callback, which takes
        # _lock; add_fd, which adopt() calls under it, waits for nothing):
        # an orphan popped from _orphans under it belongs to whoever popped it.
        self._lock = threading.Lock()
        self._orphans: dict[int, _Orphan] = {}
        self._bytes: dict[int, int] = {}
        self._count: dict[int, int] = {}
        self._closed = False

    def __len__(self) -> int:
        """Sockets lingering now."""
        with self._lock:
            return len(self._orphans)

    def adopt(self, host: socket.socket, domid: int, data: bytes,
              ratelimit: RateLimit, *, limit: int | None = None) -> bool:
        """Send ``data`` on the non-blocking ``host`` as it becomes writable,
        then close it.  False if not taken (one of the domain's bounds
        reached, the lingerer closed, its workqueue destroyed, or ``host``
        cannot be watched): the caller closes ``host``, and ``data`` is lost.

        ``ratelimit``: the releasing frontend's, through which what is
        logged of this socket goes (now, or when it ends), so that one
        guest's flood of them does not reach the log nor silence another's.
        ``limit``: the domain's own socket limit (its policy's
        ``max_sockets``), which bounds its lingering sockets too."""
        fd = host.fileno()
        failed: Exception | None = None
        with self._lock:
            if self._closed:
                return False
            held = self._bytes.get(domid, 0)
            count = self._count.get(domid, 0)
            max_sockets = self.max_sockets if limit is None else min(limit, self.max_sockets)
            taken = held + len(data) <= self.max_bytes and count < max_sockets
            if taken:
                orphan = _Orphan(host, domid, len(data), memoryview(data), ratelimit)
                # This orphan's, not the descriptor's: the number may be
                # another orphan's by the time a late timer runs.
                orphan.timer = timer = DelayedWork(
                    lambda _work: self._finish(fd, "timed out", only=orphan))
                # Ours from here on, before the steps a Ctrl-C may cut
                # short: the caller then leaves ``host`` to us (holds()),
                # and _finish ends it whether it was watched or not.
                self._account(fd, orphan, +1)
                # Timer and watch both under _lock, which the timer's
                # _finish and the sender take first: neither may end the
                # orphan, and close its descriptor, before it is watched
                # (add_fd would then watch a number that may be another
                # file's by then).  Neither call waits for a callback.
                step = "cannot time it"
                try:
                    self._wq.queue_delayed_work(timer, self.timeout)  # destroyed
                    step = "cannot watch it"
                    self._dispatcher.add_fd(fd, select.EPOLLOUT, self._on_writable)
                except (OSError, RuntimeError) as exc:  # out of epoll watches, or closed
                    self._account(fd, orphan, -1)
                    timer.cancel()
                    failed = exc
        if not taken:
            ratelimit.log(logger, logging.WARNING,
                          "dom%d: a released socket's last %d bytes dropped: the domain's "
                          "%d released sockets hold %d bytes already (at most %d in %d)",
                          domid, len(data), count, held, self.max_bytes, max_sockets)
            return False
        if failed is not None:
            ratelimit.log(logger, logging.INFO,
                          "dom%d: a released socket's last %d bytes dropped: %s: %s",
                          domid, len(data), step, failed)
            orphan.rest.release()
            return False
        return True

    def _on_writable(self, fd: int, _events: int) -> None:
        with self._lock:
            orphan = self._orphans.get(fd)
        if orphan is None:
            return  # finished meanwhile
        try:
            self._send(fd, orphan)
        except Exception as exc:
            # A bug of ours.  Left to the dispatcher, it would come again
            # at every turn of the thread that serves every guest's
            # commands (the socket stays writable), a traceback each time,
            # until the timeout: the socket ends here.
            orphan.ratelimit.log(logger, logging.ERROR,
                                 "dom%d: sending what a released socket holds failed",
                                 orphan.domid, exc_info=exc)
            self._finish(fd, "sending failed", only=orphan)

    def _send(self, fd: int, orphan: _Orphan) -> None:
        try:
            sent = orphan.host.send(orphan.rest, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return
        except OSError as exc:  # the peer reset the connection, or went
            self._finish(fd, f"send failed: {exc}")
            return
        orphan.rest = orphan.rest[sent:]
        if not orphan.rest:
            self._finish(fd, None)

    def holds(self, host: socket.socket) -> bool:
        """Whether ``host`` is lingering here: adopt() took it, even if a
        Ctrl-C cut that call short, and nothing has closed it yet."""
        fd = host.fileno()
        with self._lock:
            orphan = self._orphans.get(fd)
        return orphan is not None and orphan.host is host

    def _account(self, fd: int, orphan: _Orphan, sign: int) -> None:
        """Record ``orphan`` under ``fd`` and count it in its domain's
        bounds (+1), or forget and count it out (-1).  Called with _lock
        held.  No call and no loop: a Ctrl-C lands before or after, never
        between the table and the counts."""
        domid = orphan.domid
        if sign > 0:
            self._orphans[fd] = orphan
        else:
            del self._orphans[fd]
        size = orphan.size * sign
        if domid in self._bytes:
            size += self._bytes[domid]
        count = sign
        if domid in self._count:
            count += self._count[domid]
        if count:
            self._bytes[domid] = size
            self._count[domid] = count
        else:
            del self._bytes[domid]
            del self._count[domid]

    def _finish(self, fd: int, why: str | None, *, only: _Orphan | None = None) -> None:
        taken: _Orphan | None = None
        try:
            with self._lock:
                orphan = self._orphans.get(fd)
                if orphan is None or (only is not None and orphan is not only):
                    return
                taken = orphan
                self._account(fd, orphan, -1)
            try:
                self._dispatcher.remove_fd(fd)  # waits for a send in progress
            except (KeyError, OSError, RuntimeError):
                pass  # not watched (adopt() cut short), or the dispatcher closed
            if orphan.timer is not None:
                orphan.timer.cancel()
            orphan.host.close()
        except BaseException:
            # Interrupted (Ctrl-C in close()) before the descriptor was
            # closed: it is still the orphan's, and goes back (unwatched,
            # perhaps), for the next close() (or its timer) to finish.
            if taken is not None and taken.host.fileno() != -1:
                with self._lock:
                    if fd not in self._orphans:
                        self._account(fd, taken, +1)
            raise
        if why is not None and orphan.rest:
            orphan.ratelimit.log(logger, logging.INFO,
                                 "dom%d: released socket closed with %d bytes unsent: %s",
                                 orphan.domid, len(orphan.rest), why)
        orphan.rest.release()

    def close(self) -> None:
        """Close every lingering socket with what it holds, and take no more."""
        with self._lock:
            self._closed = True
            fds = list(self._orphans)
        for fd in fds:
            self._finish(fd, "the backend is closing")
