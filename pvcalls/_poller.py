"""Per-CPU event polling: where an active socket's readiness is taken.

An event handed from one thread to another costs a wake-up and a GIL
hand-off, about as much as moving a small request through the rings.  So
the events of active sockets are not taken by the backend's event thread:
every ioworker CPU has a :class:`CpuPoller`, a work item on that CPU's pool
of the backend's bound workqueue that polls an event dispatcher of its own
(an event-channel handle and an epoll set, :class:`xenback.events.EventDispatcher`
in poll mode).  A socket binds its event channel and registers its host
socket with the poller of its CPU: CONNECT homes the socket first, and the
socket an ACCEPT reserves, homed only when a connection comes, takes the
poller of the CPU the load index would pick at the time of the ACCEPT.  The
poller's callbacks queue the socket's Work on that same CPU, where the
poller's worker runs it next, with no thread woken; then the poller queues
itself again, behind the sockets it queued (a NAPI-like loop of one poll,
then the work it found).

While nothing is ready the poller sleeps in ``epoll_wait`` inside
:func:`workqueue.blocking`, so the pool runs whatever else is queued there on
another worker.  It wakes at least every half watchdog threshold, so that
the workqueue watchdog never takes a poller idle for a long time for a
stalled item.

A socket keeps its poller for life.  A socket that the load index places on
another CPU than its poller's (an accepted one, when other sockets were
placed meanwhile) or moves off an offline CPU still works: the poller
queues it on the socket's CPU, at the price of the wake-up this module
otherwise saves.  The poller of an offline CPU keeps running, unbound, like
every item of that CPU's pool.

A poll that raises (a bug of ours, or an event channel handle failing as
a port is unmasked) is logged and the poller queues itself again all the
same: given up, it would leave every socket of its CPU, of every guest,
waiting for ever.  Nor is what it was dispatching lost (a port the handle
had taken, a port left masked, an edge of a host socket): the next poll
hands every event of the dispatcher out again, before it waits (see
:mod:`xenback.events`), which queues each socket of the CPU once.  A
socket's Work woken so for nothing finds nothing to do: it skips the
receive unless the host socket signalled (or may hold more), its send
finds the out ring empty, and it notifies the guest only of what it
moved; a connect in progress is still in progress, a listening socket
with nothing waiting returns.  A poll failing at every turn does not keep
the poller's worker busy: the dispatcher leaves its failing handle out
of the wait for a while (see :mod:`xenback.events`); its tracebacks are
rate-limited.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from workqueue import Work
from xenback.events import EventDispatcher
from xenback.ratelimit import RateLimit

if TYPE_CHECKING:
    from workqueue import Workqueue
    from xenback.platform import Platform

__all__ = ["CpuPoller"]

logger = logging.getLogger(__name__)


class CpuPoller(Work):
    """The event poller of one CPU of a bound workqueue."""

    def __init__(self, platform: Platform, wq: Workqueue, cpu: int) -> None:
        super().__init__(CpuPoller._run)
        self.wq = wq
        self.cpu = cpu
        self._timeout = wq.topology.watchdog_thresh / 2
        self._ratelimit = RateLimit(f"the poller of CPU {cpu}")
        # Last, and handed back through a list by its own last step: a
        # Ctrl-C as the constructor returned here would lose it, and its
        # descriptors, to the Backend() that makes us and undoes us.
        made: list[EventDispatcher] = []
        try:
            EventDispatcher(platform, name=f"pvcalls-cpu{cpu}", thread=False, into=made)
            self.events = made[0]
        except BaseException:
            for events in made:
                events.close()
            raise

    def __repr__(self) -> str:
        return f"<CpuPoller cpu={self.cpu}>"

    def start(self) -> None:
        self.wq.queue_work_on(self.cpu, self)

    def _run(self) -> None:
        try:
            self.events.poll(self._timeout)
        except Exception as exc:
            self._ratelimit.log(logger, logging.ERROR, "%r: poll failed", self, exc_info=exc)
        # Behind what the callbacks queued: this worker runs those first.
        self.wq.queue_work_on(self.cpu, self)

    def close(self) -> None:
        """Stop polling (waiting for a poll in progress) and close the
        dispatcher.  Its sockets must have gone first."""
        self.disable()  # it will not queue itself again
        self.events.wakeup()
        self.cancel_sync()
        self.events.close()
        self._ratelimit.close(logger)
