"""The PV Calls backend: a xenbus driver for ``pvcalls`` devices and the
processing of each frontend's command ring.

Structure
---------
:class:`Backend` owns what all frontends share:

* ``io_wq``, one bound workqueue over a :class:`workqueue.Topology` of
  ``nr_ioworkers = min(max_ioworkers, online CPUs)`` CPUs, on which every
  active socket's Work runs (see :mod:`pvcalls._socket`);
* ``load_index``, the :class:`workqueue.LoadIndex` that homes each active
  socket on one of those CPUs and re-homes it when its CPU goes offline;
* ``cmd_wq``, an unbound workqueue for command rings and listening sockets;
* one :class:`xenback.events.EventDispatcher`, an epoll thread for the
  command rings' event channels and the listening sockets, and per ioworker
  CPU a :class:`pvcalls._poller.CpuPoller` that takes the events of the
  active sockets on that CPU (no thread per socket);
* the xenbus driver (:class:`_PvcallsDriver`) that handshakes with frontends.

Each connected frontend is a :class:`_Frontend`: the mapped command ring, its
event channel, its sockets by id, and one Work that processes the command
ring (a Work never runs concurrently with itself, so commands are handled one
at a time, in ring order).  Commands never block: CONNECT starts a
non-blocking connect, answered at once if it completed within the call (as on
loopback), else by the socket's Work when it completes; ACCEPT
and POLL are answered by the listening socket's Work when a connection is
there.  Every response of a frontend goes through :meth:`_Frontend.respond`,
one producer under one lock.

Protocol choices left open by the specification
-----------------------------------------------
* SOCKET records the id only; the host socket is created by CONNECT or BIND.
  Anything but AF_INET/SOCK_STREAM/0 gets ``-EAFNOSUPPORT`` (as Linux).
* An id the backend does not know gets ``-EBADF`` for every command, RELEASE
  included (Linux answers 0); an id already in use for SOCKET or as ACCEPT's
  ``id_new`` gets ``-EEXIST``; a command on a socket in the wrong state gets
  ``-EINVAL`` (CONNECT on a connected socket ``-EISCONN``, on one still
  connecting ``-EALREADY``, as POSIX says).
* RELEASE's ``reuse`` hint is ignored: every socket is closed at once.
  What its out ring still holds is sent first, as a host socket's buffer
  is at close() (Linux drops it): what the host socket takes at once from
  the ring, the rest (one ring at most) as the peer reads, by
  :mod:`pvcalls._linger` within bounds; the RELEASE is answered at once.
  So are the sockets of a frontend that disconnects or dies.
* One ACCEPT or POLL in flight per listening socket; another one gets
  ``-EINTR``, like Linux's backend.
* A CONNECT, ACCEPT or POLL still in flight when its socket is released is
  answered ``-EINTR`` before the RELEASE is answered.
* Bad grant references, a ``ring_order`` outside ``1..max-page-order`` and an
  unbindable event channel get ``-EINVAL``.
* Unknown commands get ``-ENOTSUPP`` (-524) with the id echoed.
* The listening socket of BIND has SO_REUSEADDR set (the guest cannot set
  options through PV Calls, and a restarted guest server should be able to
  bind its port again while old connections linger in TIME_WAIT).
* Policy (:class:`Policy`, whose docstring is the file format): a
  refused CONNECT/BIND gets ``-EACCES``, a SOCKET/ACCEPT beyond
  ``max_sockets`` gets ``-EMFILE``.
* A bug of ours fails no more than what it was serving, and never leaves
  the guest waiting: an exception escaping a command's handler answers
  that command ``-EIO``; one escaping a socket's Work fails that socket
  (``-EIO`` in its data ring's errors, or as the answer of the CONNECT,
  ACCEPT or POLL it served: see :mod:`pvcalls._socket`); one escaping the
  command Work elsewhere fails the device, as a connect that failed does
  (the frontend may connect again).  Each is logged with its traceback
  through the guest's rate limit.
"""

from __future__ import annotations

import collections
import errno
import functools
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from workqueue import WQ_UNBOUND, LoadIndex, Topology, Work, Workqueue
from xenback import BackendDevice, BackendDriver, Closing, DeviceWork, XenbusState
from xenback.events import EventDispatcher
from xenback.platform import Platform, check_platform
from xenback.ratelimit import RateLimit
from xenback.ring import BackRing, RingError

from . import _errno
from ._linger import Lingerer
from ._policy import DENIED_ERRNO, LIMIT_ERRNO, DomainPolicy, Policy, connect_destination
from ._poller import CpuPoller
from ._socket import (
    ActiveSocket,
    CommandError,
    NewSocket,
    PassiveSocket,
    Request,
    SockState,
    unbind_quietly,
)
from ._wire import (
    AF_INET,
    DEFAULT_MAX_PAGE_ORDER,
    MAX_PAGE_ORDER_LIMIT,
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
    SLOT_SIZE,
    SOCK_STREAM,
    AddressFamilyError,
    ffi,
    unpack_sockaddr_in,
)

if TYPE_CHECKING:
    from xenback.platform import GrantMapping, GrantTable

    _Made = Workqueue | LoadIndex | GrantTable | EventDispatcher | CpuPoller

__all__ = ["DEFAULT_MAX_IOWORKERS", "Backend", "BackendStats", "CpuStats", "SocketStats"]

logger = logging.getLogger(__name__)

#: The review thread's cap on ioworkers for hosts with hundreds of CPUs.
DEFAULT_MAX_IOWORKERS = 64

#: Requests one run of a frontend's command Work may handle before it
#: re-queues itself behind the other items of the command workqueue (two
#: rings' worth: a guest that keeps its ring full still moves at full speed).
COMMAND_BUDGET = 64

Socket = NewSocket | ActiveSocket | PassiveSocket

# The backends of this process, each from its start until its close() is
# over: a second one for an equal platform (the same domain) is refused.
# Those of other processes are kept out by our driver's HostLock (see
# xenback.BackendDriver), which would refuse this process's second one
# too, but only once it had made its workqueues, pollers and their
# threads, and naming this process where this names the backend.
# A list, not a dict: a Platform need not be hashable.
_serving_lock = threading.Lock()
_serving: list[Backend] = []


# -- statistics ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SocketStats:
    """One socket of one frontend.

    ``domain``: the frontend's domid; ``device``: its pvcalls device's
    devid (a domain may have several, each with ids of its own: two
    ``pvcalls-nc`` in one guest use the same ids); ``id``: the socket's
    id, the guest's (``(domain, device, id)`` is unique); ``kind``:
    ``"new"`` (only SOCKET so far), ``"active"`` (connecting, connected,
    or made by an ACCEPT) or ``"passive"`` (bound, listening); ``state``:
    ``"new"``, ``"accepting"``, ``"connecting"``, ``"connected"``,
    ``"bound"``, ``"listening"``, ``"closed"`` or ``"failed"`` (a bug of
    ours stopped it); ``cpu``: the ioworker CPU an
    active socket is homed on, else None; ``bytes_in``: host to guest,
    ``bytes_out``: guest to host; ``address``: an active socket's peer, a
    passive one's bound address, else None.
    """

    domain: int
    device: int
    id: int
    kind: str
    state: str
    cpu: int | None
    bytes_in: int
    bytes_out: int
    address: tuple[str, int] | None


@dataclass(frozen=True, slots=True)
class CpuStats:
    """One CPU of the ioworker topology: its number ``cpu``, whether it
    is ``online``, and ``sockets``, the snapshot's active sockets homed
    on it."""

    cpu: int
    online: bool
    sockets: int


@dataclass(frozen=True, slots=True)
class BackendStats:
    """A snapshot of :meth:`Backend.stats`: ``nr_ioworkers`` (as the
    backend's), ``frontends`` (connected devices), ``sockets`` (a
    :class:`SocketStats` each) and ``cpus`` (a :class:`CpuStats` each):
    each CPU's ``sockets`` counts its active rows in ``sockets``.  Each
    frontend's sockets are read at once, one frontend after the other."""

    nr_ioworkers: int
    frontends: int
    sockets: tuple[SocketStats, ...]
    cpus: tuple[CpuStats, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain data: ``sockets`` a list of dicts, ``cpus`` {cpu: active
        sockets} of the online CPUs (for printing and JSON)."""
        return {
            "nr_ioworkers": self.nr_ioworkers,
            "frontends": self.frontends,
            "sockets": [
                {f: getattr(s, f) for f in SocketStats.__dataclass_fields__}
                for s in self.sockets
            ],
            "cpus": {c.cpu: c.sockets for c in self.cpus if c.online},
        }


# -- the backend ------------------------------------------------------------------

class Backend(Closing):
    """Serves every ``pvcalls`` device whose backend is ``platform``'s domain.

    ``max_ioworkers`` caps the CPUs the ioworkers use (default 64);
    ``max_page_order`` is offered to frontends as ``max-page-order``
    (default 4, the order Linux's frontend uses; 1 to
    :data:`pvcalls._wire.MAX_PAGE_ORDER_LIMIT`, 9, what one indexes page
    can reference); ``policy``, a :class:`Policy`, restricts what guests
    may do (default: anything).  A wrong argument is a :class:`TypeError`
    or :class:`ValueError` saying which, before anything starts.

    The ioworker CPUs are this process's CPUs, at most ``max_ioworkers`` of
    them.  ``cpus=N`` models N logical CPUs instead (capped the same way;
    logical CPUs beyond the machine's share its real CPUs), and
    ``topology`` gives a ready :class:`workqueue.Topology` (with at most
    ``max_ioworkers`` CPUs), whose CPU hotplug the backend follows.

    Starts serving on construction; :meth:`close` (or leaving the ``with``
    block) closes every frontend and releases everything.  One domain has
    one backend: a second for an equal platform in this process raises
    :exc:`RuntimeError` (two would both answer every frontend's handshake)
    until the first is closed; in another process on the same host,
    :exc:`xenback.HostLockHeld` (a RuntimeError too), naming the process
    that serves it and the lock file it holds
    (``xenback-pvcalls.dom<domid>.lock`` in the platform's ``run_dir``:
    that of its :class:`xenback.BackendDriver`).  That lock goes with its
    process however it ends.

    Public attributes (read-only): ``platform``, ``topology`` (CPU hotplug
    on it re-homes sockets), ``nr_ioworkers``, ``max_page_order``,
    ``policy`` (there is no policy reload: each frontend takes its rules
    as it connects).  The others are shared with the frontends' sockets
    and not meant for users.
    """

    def __init__(
        self,
        platform: Platform,
        max_ioworkers: int = DEFAULT_MAX_IOWORKERS,
        max_page_order: int = DEFAULT_MAX_PAGE_ORDER,
        policy: Policy | None = None,
        *,
        cpus: int | None = None,
        topology: Topology | None = None,
    ) -> None:
        # Every argument is checked before anything starts: a wrong one found
        # later would surface as a missing attribute, or under another name.
        check_platform(platform)
        if isinstance(max_ioworkers, bool) or not isinstance(max_ioworkers, int):
            raise TypeError(f"max_ioworkers must be an int, not {type(max_ioworkers).__name__}")
        if max_ioworkers < 1:
            raise ValueError(f"max_ioworkers must be at least 1, got {max_ioworkers}")
        if isinstance(max_page_order, bool) or not isinstance(max_page_order, int):
            raise TypeError(f"max_page_order must be an int, not {type(max_page_order).__name__}")
        if not 1 <= max_page_order <= MAX_PAGE_ORDER_LIMIT:
            raise ValueError(
                f"max_page_order must be 1..{MAX_PAGE_ORDER_LIMIT} (2**order grant references "
                f"must fit one indexes page), got {max_page_order}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a pvcalls.Policy, not {type(policy).__name__}"
                            f"{_policy_hint(policy)}")
        if topology is not None and cpus is not None:
            raise TypeError("give either cpus or topology, not both")
        if cpus is not None:
            # Here, not by Topology: min() below would compare it first.
            if isinstance(cpus, bool) or not isinstance(cpus, int):
                raise TypeError(f"cpus must be an int, not {type(cpus).__name__}")
            if cpus < 1:
                raise ValueError(f"cpus must be at least 1, got {cpus}")
        if topology is not None and not isinstance(topology, Topology):
            raise TypeError(f"topology must be a workqueue.Topology, not {type(topology).__name__}")
        if topology is None:
            if cpus is None:
                host = sorted(os.sched_getaffinity(0))
                topology = Topology(cpus=host[:max_ioworkers])
            else:
                topology = Topology(min(cpus, max_ioworkers))
        elif len(topology.possible()) > max_ioworkers:
            raise ValueError(f"topology has {len(topology.possible())} CPUs, more than "
                             f"max_ioworkers={max_ioworkers}")

        self._platform = platform
        self._max_page_order = max_page_order
        self._policy = policy if policy is not None else Policy()
        self._topology = topology
        self._nr_ioworkers = len(topology.online())

        # _lock guards _frontends (the connected frontends, by device),
        # _closed and _close_unfinished.  Never held while a frontend is set
        # up or torn down.
        self._lock = threading.Lock()
        self._frontends: dict[tuple[int, int], _Frontend] = {}
        self._closed = False
        # Held by close() from start to end: a second one, from another
        # thread, returns only once everything is released.
        self._close_lock = threading.Lock()
        # A close() started and has not finished (Ctrl-C in one of the
        # driver's waits, or anywhere else in it): the next close()
        # finishes it.  Set as _closed is, cleared only at the very end,
        # so that no place in between can leave a backend counted as
        # closed that holds anything.
        self._close_unfinished = False
        # limit_lock makes checking a domain's socket limit and adding the
        # socket one step across all the domain's frontends (devices):
        # taken by a frontend under its own _lock, around both.  Sockets
        # going need not take it: they only make the count smaller.
        self.limit_lock = threading.Lock()

        # Whole or nothing.  A Ctrl-C may land as any call returns, a
        # constructor's included: ``self.x = Make()`` would lose what Make()
        # made (a workqueue and its rescuer, the load index's notifier on
        # the topology, a handle's descriptors) before anything could undo
        # it.  So each is recorded in `made` by the call that makes it (see
        # _keep), and the undo releases whatever is there.  Not an
        # ExitStack's with block, whose pop_all() a Ctrl-C could follow.
        made: list[_Made] = []
        try:
            self._claim()
            # Not through alloc_workqueue(), which a Ctrl-C could leave as
            # the constructor returns to it.
            self.io_wq = _keep(made, Workqueue, "pvcalls_io", 0, 0, topology)
            self.cmd_wq = _keep(made, Workqueue, "pvcalls_cmd", WQ_UNBOUND, 0, topology)
            self.load_index = _keep(made, LoadIndex, topology, _rehome)
            self.gnttab: GrantTable = _keep(made, platform.gnttab)
            self.dispatcher = _keep(made, functools.partial(EventDispatcher, name="pvcalls-events"),
                                    platform)
            # Released sockets still sending what their guest wrote.  It
            # holds nothing until one does.
            self.lingerer = Lingerer(self.dispatcher, self.cmd_wq)
            self._pollers: dict[int, CpuPoller] = {}
            for cpu in topology.possible():
                self._pollers[cpu] = _keep(made, CpuPoller, platform, self.io_wq, cpu)
                self._pollers[cpu].start()
            # Holds nothing until started.
            self._driver = _PvcallsDriver(self, platform)
        except BaseException:
            try:
                _release(made)
            finally:
                self._unclaim()
            raise
        # From here on the backend is whole, and close() releases it: the
        # driver's start() undoes itself, and after it frontends may have
        # connected, which only close() knows how to let go.
        try:
            self._driver.start()
            # Kept: the driver's connection, which has it, goes at close().
            self._connection_lost = self._driver.xenstore.connection_lost
            logger.info("pvcalls backend in domain %d: %d ioworker CPUs, max-page-order %d",
                        platform.domid, self.nr_ioworkers, max_page_order)
        except BaseException:
            self._undo_start()
            raise

    def _undo_start(self) -> None:
        """Close a Backend() that failed, or was interrupted, once its
        driver was starting: to the end, however often a Ctrl-C cuts the
        close short.

        A user who pressed Ctrl-C once presses it again while the devices
        close.  close() leaves what it could not do to a later close(),
        which nobody can call on a Backend() that raised: so it is called
        again here, each time taking up where the last was cut short.  As
        in _release(), a failure is logged, the error that cut Backend()
        short being the one raised, and the first Ctrl-C met is raised at
        the end.  The claim goes last, whatever happened: left, it would
        refuse every later Backend for the domain."""
        try:
            # Not before the try: the loop must not be the first thing in it.
            # CPython 3.11 looks up the handler of a signal's exception raised
            # as a loop goes round at the code unit before the loop's top,
            # here the try's own NOP, which the exception table leaves out:
            # a Ctrl-C as the loop went round skipped the finally, and the
            # domain stayed claimed.
            interrupt: BaseException | None = None
            while True:
                try:
                    self.close()
                except Exception:
                    # Not tried again: it would most likely fail again.
                    logger.exception("closing %r after a failed start failed", self)
                except BaseException as exc:
                    interrupt = interrupt or exc
                    continue
                break
        finally:
            self._unclaim()
        if interrupt is not None:
            raise interrupt

    # -- public -----------------------------------------------------------------

    # Read-only: each frontend takes its rules from the policy as it
    # connects, and max-page-order is written at probe, so a new value
    # would apply to some frontends and not to others.

    @property
    def platform(self) -> Platform:
        """The platform whose domain this backend serves."""
        return self._platform

    @property
    def topology(self) -> Topology:
        """The ioworker CPUs; CPU hotplug on it re-homes sockets."""
        return self._topology

    @property
    def nr_ioworkers(self) -> int:
        """The ioworker CPUs online when the backend started."""
        return self._nr_ioworkers

    @property
    def max_page_order(self) -> int:
        """The ``max-page-order`` offered to frontends."""
        return self._max_page_order

    @property
    def policy(self) -> Policy:
        """The policy, fixed for the backend's life: there is no reload
        (a new policy takes a new Backend)."""
        return self._policy

    def stats(self) -> BackendStats:
        """Per socket: domain, device, id, CPU, bytes each way; per CPU: active
        sockets.  A snapshot (:class:`BackendStats`), from any thread, at
        any time: once the backend is closed, one with no frontends and no
        sockets (as a closed trio object's ``statistics()`` still answers)."""
        with self._lock:
            frontends = list(self._frontends.values())
        sockets = [s for fe in frontends for s in fe.socket_stats()]
        # Counted from the rows, not taken from the load index: that one
        # counts a socket from its placement (before its CONNECT puts it in
        # its frontend's table) to its teardown (after RELEASE took it
        # out), and read apart from the rows it would disagree with them.
        homed = collections.Counter(s.cpu for s in sockets if s.cpu is not None)
        online = set(self.topology.online())
        cpus = tuple(
            CpuStats(cpu, cpu in online, homed[cpu]) for cpu in self.topology.possible()
        )
        return BackendStats(self.nr_ioworkers, len(frontends), tuple(sockets), cpus)

    @property
    def connection_lost(self) -> threading.Event:
        """Set when XenStore ends the backend's connection (the host went
        away): from then on it serves nobody, and only :meth:`close` is left.
        Not set by :meth:`close` itself."""
        return self._connection_lost

    def close(self) -> None:
        """Close every frontend (Closing, Closed) and release everything.

        Idempotent.  A close() while another thread's is under way returns
        when that one is over (or finishes it, if it was interrupted).
        """
        with self._close_lock:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed and not self._close_unfinished:
                return
            again, self._closed, self._close_unfinished = self._closed, True, True
        # A Ctrl-C may end this anywhere (the main thread's waits in stop(),
        # or any call as it returns): before stop() returned, the devices'
        # callbacks may still run and use what is shared, so nothing is
        # released under them.  Every step below may be done again, and
        # the next close() does them all again.
        if not again:
            # Each device goes Closing after its sockets are released
            # (ordered with its other xenbus callbacks); stop() then
            # writes Closed.  Not done again: a device left out here
            # is dropped by stop() alone, straight to Closed.
            for dev in self._driver.devices():
                dev.queue(self._close_device, dev)
        self._driver.stop()
        self._close_frontends()
        self._release_shared()
        self._unclaim()
        with self._lock:
            self._close_unfinished = False
        logger.info("pvcalls backend in domain %d closed", self.platform.domid)

    def _close_frontends(self) -> None:
        """Close the frontends their devices' disconnect left (one cut
        short, or failed).  One at a time, each taken off the list once
        closed, as _close_pollers does: a close() interrupted in the
        middle leaves the rest to the next one."""
        with self._lock:
            left = list(self._frontends.items())
        for key, fe in left:
            fe.close()
            with self._lock:
                if self._frontends.get(key) is fe:
                    del self._frontends[key]

    def __repr__(self) -> str:
        return (f"<pvcalls.Backend dom{self.platform.domid} ioworkers={self.nr_ioworkers} "
                f"frontends={len(self._frontends)}>")

    def _claim(self) -> None:
        """Become the backend of our platform's domain in this process (on
        its host: our driver's start())."""
        with _serving_lock:
            for other in _serving:
                if other.platform == self.platform:
                    raise RuntimeError(
                        f"domain {self.platform.domid} of this host is served by {other!r} "
                        "already: close it first")
            _serving.append(self)

    def _unclaim(self) -> None:
        with _serving_lock:
            if self in _serving:
                _serving.remove(self)

    # -- xenbus callbacks (ordered per device by the driver) ----------------------

    def _connect(self, dev: BackendDevice) -> None:
        old = dev.driver_data
        if isinstance(old, _Frontend):
            self._disconnect(dev)
        version = dev.read_otherend("version")
        if version not in PVCALLS_VERSIONS.split(","):
            # ascii(), and a prefix, as read_otherend_u32() quotes a node:
            # the value is the guest's, kilobytes of it for every line.
            shown = ascii(version if version is None else version[:32])
            raise ValueError(f"frontend protocol version {shown} is not one of "
                             f"{PVCALLS_VERSIONS!r}")
        ring_ref = dev.read_otherend_u32("ring-ref")
        port = dev.read_otherend_u32("port")
        key = (dev.frontend_id, dev.devid)
        # Recorded by the call that makes it (see _keep), and closed here
        # until driver_data has it, where the device's disconnect finds it:
        # an interrupt as _Frontend() returned, or before that store, left
        # its ring mapped and its port bound for the life of the backend.
        made: list[_Frontend] = []
        try:
            fe = _keep(made, _Frontend, self, dev, ring_ref, port)
            with self._lock:
                closing = self._closed
                if not closing:
                    self._frontends[key] = fe
            if closing:
                raise RuntimeError("backend is closing")
            dev.driver_data = fe
        except BaseException:
            for unrecorded in made:
                # In driver_data first (a store, no call): a close() cut
                # short there too is done again by the device's next
                # disconnect or connect, which find it there.
                dev.driver_data = unrecorded
                self._forget(dev, unrecorded)
            raise
        fe.start()
        logger.info("dom%d: pvcalls frontend connected (ring-ref %d, port %d)",
                    dev.frontend_id, ring_ref, port)

    def _disconnect(self, dev: BackendDevice) -> None:
        fe = dev.driver_data
        if not isinstance(fe, _Frontend):
            return
        self._forget(dev, fe)
        logger.info("dom%d: pvcalls frontend disconnected", dev.frontend_id)

    def _forget(self, dev: BackendDevice, fe: _Frontend) -> None:
        """Close ``fe``, ``dev``'s driver_data, and let go of it.  Let go
        of only once closed: a close() cut short (Ctrl-C) is done again by
        the device's next disconnect or connect, which find it there.  (Let
        go of first, as it was, a frontend whose close() was cut short was
        in no place they look, and the device's next connect replaced it
        among our frontends: its ring and port held for good.)"""
        fe.close()  # not under _lock (see there); before it leaves stats()
        dev.driver_data = None
        with self._lock:
            if self._frontends.get((dev.frontend_id, dev.devid)) is fe:
                del self._frontends[(dev.frontend_id, dev.devid)]

    def _close_device(self, dev: BackendDevice) -> None:
        self._disconnect(dev)
        if not dev.gone:
            dev.switch_state(XenbusState.CLOSING)

    def domain_sockets(self, domid: int) -> int:
        """The sockets the frontends of ``domid`` hold, all devices together."""
        with self._lock:
            frontends = [fe for (d, _), fe in self._frontends.items() if d == domid]
        return sum(fe.nr_sockets for fe in frontends)

    def _events_of(self, cpu: int) -> EventDispatcher:
        """The event dispatcher of ``cpu``'s poller."""
        return self._pollers[cpu].events

    def _events_for_next_socket(self) -> EventDispatcher:
        """The event dispatcher of the CPU the load index would give a socket
        placed now: a socket's event channel and host socket go to the
        poller of the CPU it will most likely run on."""
        return self._events_of(self.load_index.least_loaded())

    def _close_pollers(self) -> None:
        # One at a time, so that a close() interrupted here does not close
        # one twice (its dispatcher's wake-up pipe is gone then).
        for cpu in list(self._pollers):
            self._pollers[cpu].close()
            del self._pollers[cpu]

    def _release_shared(self) -> None:
        """Release what the frontends share.  Every step may be done again,
        by the close() after an interrupted one: the handles' close() is
        idempotent, and shutdown() (not destroy(), which raises once the
        workqueue is destroyed) returns, or waits for a destruction under
        way."""
        self._close_pollers()
        self.lingerer.close()
        self.dispatcher.close()
        self.gnttab.close()
        self.load_index.close()
        self.cmd_wq.shutdown()
        self.io_wq.shutdown()


_T = TypeVar("_T")


def _keep(made: list[Any], make: Callable[..., _T], *args: Any) -> _T:
    """``make(*args)``, appended to ``made`` before control is back in
    Python code, where a Ctrl-C could land and lose it: list.extend()
    stores what the call returned itself (the idiom of
    workqueue._pool.lock_take_contended)."""
    made.extend(itertools.starmap(make, (args,)))
    return made[-1]


def _release(made: list[_Made]) -> None:
    """Release, last made first, what a Backend() cut short had made.

    Each, whatever the release of another raised, as an ExitStack's
    callbacks are: a second Ctrl-C, which lands in these waits as the
    user loses patience, must not leave the workqueues and the handles
    after it.  A failure is logged, the error that cut Backend() short
    being the one it raises; the first Ctrl-C met is raised at the end."""
    interrupt: BaseException | None = None
    for thing in reversed(made):
        try:
            if isinstance(thing, Workqueue):
                thing.shutdown()
            else:
                thing.close()
        except Exception:
            logger.exception("releasing %r after a failed start failed", thing)
        except BaseException as exc:
            interrupt = interrupt or exc
    if interrupt is not None:
        raise interrupt


def _policy_hint(wrong: object) -> str:
    """What makes a Policy of ``wrong``, given where one was wanted."""
    if isinstance(wrong, (str, os.PathLike)):
        return " (Policy.from_file() reads a file)"
    if isinstance(wrong, DomainPolicy):
        return " (Policy(default=rules) applies it to every domain)"
    if isinstance(wrong, Mapping):
        return " (Policy.from_dict() reads parsed TOML)"
    return ""


def _rehome(key: object, old_cpu: int, new_cpu: int) -> None:
    """LoadIndex on_move: a socket's CPU went offline."""
    if isinstance(key, ActiveSocket):
        key.rehome(new_cpu)
        logger.debug("%r moved from CPU %d to CPU %d", key, old_cpu, new_cpu)


def _domain_name(dev: BackendDevice, policy: Policy) -> str | None:
    """The frontend domain's ``name`` node (written by the toolstack, not
    by the guest), for name sections of the policy; None if it has none.

    Raises :class:`OSError` if the node cannot be read (a driver domain
    may not read other domains' homes) and a name section could apply:
    the domain would get ``[default]``'s rules, which may be laxer than
    its own, without a word."""
    path = f"/local/domain/{dev.frontend_id}/name"
    try:
        return dev.xenstore.read(path)
    except OSError as exc:
        if not policy.needs_name(dev.frontend_id):
            return None
        # The guest may reconnect at will: through the device's budget.
        dev.ratelimit.log(logger, logging.ERROR,
                          "dom%d: pvcalls device refused: the policy has sections by domain "
                          "name, and its name cannot be read: %s: %s",
                          dev.frontend_id, path, exc.strerror or exc)
        raise OSError(exc.errno or errno.EIO,
                      f"the policy needs the domain's name, which cannot be read: "
                      f"{exc.strerror or exc}") from None


class _PvcallsDriver(BackendDriver):
    """The xenbus side: features, then connect/disconnect to the Backend."""

    device_type = "pvcalls"

    def __init__(self, backend: Backend, platform: Platform) -> None:
        super().__init__(platform)
        self._backend = backend

    def probe(self, dev: BackendDevice) -> None:
        dev.write_nodes({
            "versions": PVCALLS_VERSIONS,
            "max-page-order": str(self._backend.max_page_order),
            "function-calls": "1",
        })

    def connect(self, dev: BackendDevice) -> None:
        self._backend._connect(dev)

    def disconnect(self, dev: BackendDevice) -> None:
        self._backend._disconnect(dev)

    def remove(self, dev: BackendDevice) -> None:
        self._backend._disconnect(dev)


# -- one frontend -----------------------------------------------------------------

Handler = Callable[["_Frontend", Request, Any], int | None]


class _Frontend:
    """A connected frontend: command ring, event channel, sockets."""

    def __init__(self, backend: Backend, dev: BackendDevice, ring_ref: int,
                 remote_port: int) -> None:
        self.backend = backend
        self.dev = dev
        self.domid = dev.frontend_id
        self.gnttab = backend.gnttab
        self.dispatcher = backend.dispatcher
        self.name = _domain_name(dev, backend.policy)
        self.policy = backend.policy.for_domain(self.domid, self.name)
        # What this guest's requests make us log (refusals, broken data
        # rings), at most 10 lines per 5 s: a guest cannot flood the host's
        # log, nor silence what another guest causes.  The device's, which
        # outlives this connection: a guest restarting its device whenever
        # its budget is spent must not get a new one each time.
        self.ratelimit: RateLimit = dev.ratelimit

        # _rsp_lock: the one producer of responses.  It serialises
        # push_response/push_responses/notify and guards _closed and
        # _released; taken last (no other lock of the backend's is
        # acquired under it).
        self._rsp_lock = threading.Lock()
        self._closed = False
        # close() ran to its end; until then (one cut short by a Ctrl-C)
        # the next close() does every step again.
        self._released = False
        # _lock guards the sockets table.  Never held across socket set-up or
        # teardown (they may wait for Work items).
        self._lock = threading.Lock()
        self._sockets: dict[int, Socket] = {}
        self._reserved = 0  # see _accept
        # Sockets in no table: a CONNECT's or ACCEPT's, from before it holds
        # anything until it is stored, or until _undo has given back what it
        # held; close() tears down what a Ctrl-C left here.
        self._undone: list[ActiveSocket] = []
        # Indexes page grant -> the data refs of the last ring given with
        # it (see pvcalls._socket.DataRing), oldest first (see
        # ActiveSocket.attach_ring).  The command Work's alone.
        self.ring_hints: dict[int, tuple[int, ...]] = {}

        self._broken = False
        # The device was failed for the broken ring (on its queue alone).
        self._ring_failed = False
        # Set by start(), once the frontend is set up and counted among the
        # backend's: the guest may notify its port the moment it is bound,
        # and the command Work must not run before (on a half-built
        # frontend, or one whose sockets no limit check counts yet).
        self._started = False
        # A DeviceWork: an exception escaping it (a bug of ours outside the
        # handlers, which answer their own -EIO) fails the device, as a
        # connect that failed does; the requests it took off the ring can
        # no longer be answered.
        self._work = DeviceWork(dev, self._process_commands)
        # Each resource recorded by the call that makes it (list.extend()
        # stores it before control is back here, as pvcalls.frontend's
        # rings do): one kept from us by an interrupt as its call returned
        # would be held for the life of the backend by a frontend that
        # nobody has, this one never made.
        mappings: list[GrantMapping] = []
        ports: list[int] = []
        ring = None
        try:
            mappings.extend(map(self.gnttab.map_grant_refs, (self.domid,), ([ring_ref],)))
            ring = BackRing(mappings[0].buffer[:PAGE_SIZE], SLOT_SIZE)
            ports.extend(map(self.dispatcher.bind_interdomain, (self.domid,), (remote_port,),
                             (self._on_event,)))
        except BaseException:
            for port in ports:
                unbind_quietly(self.dispatcher, port, self._on_event)
            if ring is not None:
                ring.release()
            for mapping in mappings:
                # Logged, not raised: raised, its error replaced the one
                # that says what failed (or the Ctrl-C).
                self._unmap_ring(mapping)
            raise
        # No call from here on, so no interrupt: the records are taken over.
        self._mapping = mappings[0]
        self.port = ports[0]
        # Whether close() has still to unbind the port (see there).
        self._port_bound = True
        self.ring = ring

    def __repr__(self) -> str:
        return f"<pvcalls frontend dom{self.domid} sockets={len(self._sockets)}>"

    def _unmap_ring(self, mapping: GrantMapping) -> None:
        try:
            mapping.unmap()
        except (OSError, BufferError):
            logger.exception("dom%d: unmapping the command ring failed", self.domid)

    @property
    def ring_hint_refs(self) -> int:
        """The refs the ring hints hold in all.  Counted, at most RING_HINTS
        arrays, not kept beside them: a Ctrl-C between a hint's change and
        its count's left the count off for good, and attach_ring's bound,
        with a count too high, dropped every hint, then found none to drop."""
        return sum(map(len, self.ring_hints.values()))

    def start(self) -> None:
        # Requests may already be waiting, notified before we started.
        self._started = True
        self.backend.cmd_wq.queue_work(self._work)

    def _on_event(self, *_: object) -> None:
        if self._started:
            self.backend.cmd_wq.queue_work(self._work)

    # -- responses -------------------------------------------------------------------

    def respond(self, request: Request, ret: int) -> None:
        """Answer ``request`` with ``ret`` (0 or a negative Xen errno)."""
        rsp = ffi.new("struct xen_pvcalls_response *")
        rsp.req_id = request.req_id
        rsp.cmd = request.cmd
        rsp.ret = ret
        rsp.u.socket.id = request.id
        data = ffi.buffer(rsp)[:]
        with self._rsp_lock:
            if self._closed:
                return
            try:
                self.ring.push_response(data)
            except RingError:
                logger.exception("dom%d: no slot for the response to %s", self.domid, request)
                return
            if self.ring.push_responses():
                self.dispatcher.notify(self.port)

    # -- the command Work -----------------------------------------------------------------

    def _process_commands(self, work: Work) -> None:
        if self._broken:
            return
        ring = self.ring
        budget = COMMAND_BUDGET
        try:
            while True:
                for raw in ring.requests():
                    self._handle(raw)
                    budget -= 1
                    if not budget:
                        # A guest that asks again as fast as it is answered
                        # would keep this run going for ever: give way to
                        # the other items of the workqueue, and go on after
                        # them (requests() takes only what was yielded).
                        self.backend.cmd_wq.queue_work(work)
                        return
                if not ring.final_check_for_requests():
                    return
        except RingError as exc:
            # The frontend broke the ring: it gets no more service, the
            # other frontends are not affected.
            self._broken = True
            # On the device's queue, where everything about its state is
            # done: from here, our Closing could land after the frontend's
            # Closed was answered, and stay.  Queued before the log line,
            # and with the exception, not its str() (a call): an interrupt
            # landing before the queueing would lose the failure, and no
            # later run, the ring broken, would queue it.
            try:
                self.dev.queue(self._fail_broken_ring, exc)
            except BaseException as queue_exc:
                # Cut short, maybe before the failure was stored: the run
                # queued again meets the broken ring and queues it again
                # (_fail_broken_ring does it once).  Not after a bug of
                # ours in the queueing: that fails the device (DeviceWork),
                # and a run queued again would meet it again, and again.
                if not isinstance(queue_exc, Exception):
                    self._broken = False
                    self.backend.cmd_wq.queue_work(work)
                raise
            # Rate-limited (the device's budget): the guest can reconnect
            # and break its ring again at will.
            self.ratelimit.log(logger, logging.ERROR,
                               "dom%d: command ring protocol error, frontend stopped: %s",
                               self.domid, exc)
        except BaseException as exc:
            # An interrupt (DeviceWork lets it through, to the workqueue's
            # log; a bug of ours fails the device) ends the run before the
            # ring is found empty, which alone moves req_event on: the
            # requests behind the one it cut short would wait for a
            # notification that the frontend, past req_event, never sends.
            if not isinstance(exc, Exception):
                self.backend.cmd_wq.queue_work(work)
            raise

    def _fail_broken_ring(self, why: RingError) -> None:
        # On the device's queue.  Not once we are disconnected: the
        # frontend closed or started over as the Work met its broken ring
        # (disconnect() waited for the Work, which queued this behind it),
        # and a Closing now would outlive its Closed, or fail its next
        # connection.  Once: a queueing cut short may have stored it, and
        # the run done again queued it too.
        with self._rsp_lock:
            closed = self._closed
        if not closed and not self._ring_failed:
            # False (the directory deleted, or made again for a new device,
            # meanwhile) asks nothing more of us: nothing was written, the
            # failure was logged as information, and the deletion's events,
            # queued behind this, drop the device, which disconnects it.
            self.dev.fatal(_errno.EINVAL, f"pvcalls command ring: {why}")
            self._ring_failed = True

    def _handle(self, raw: bytes) -> None:
        req = ffi.from_buffer("struct xen_pvcalls_request *", raw)
        request = Request(int(req.req_id), int(req.cmd), int(req.u.socket.id))
        handler = _HANDLERS.get(request.cmd)
        if handler is None:
            logger.debug("dom%d: unknown command %d", self.domid, request.cmd)
            self.respond(request, -_errno.ENOTSUPP)
            return
        try:
            ret = handler(self, request, req)
        except CommandError as exc:
            ret = -exc.errno
            logger.debug("dom%d: %s id %#x: %s: %s", self.domid, PVCALLS_COMMANDS[request.cmd],
                         request.id, _errno.name_of(exc.errno), exc)
        except Exception as exc:
            # A bug of ours, but the guest decides how often it is set off.
            self.ratelimit.log(logger, logging.ERROR, "dom%d: %s id %#x failed", self.domid,
                               PVCALLS_COMMANDS[request.cmd], request.id, exc_info=exc)
            ret = -_errno.EIO
        if ret is not None:
            self.respond(request, ret)

    # -- table helpers ---------------------------------------------------------------------

    def _lookup(self, sock_id: int) -> Socket:
        with self._lock:
            sock = self._sockets.get(sock_id)
        if sock is None:
            raise CommandError(_errno.EBADF, f"no socket {sock_id:#x}")
        return sock

    @property
    def nr_sockets(self) -> int:
        """Sockets held, and reserved by an ACCEPT being set up."""
        return len(self._sockets) + self._reserved

    def _check_limit(self, what: str, sock_id: int) -> None:
        # Called with _lock and the backend's limit_lock held.  The limit is
        # the domain's: a domain with several devices shares it.
        limit = self.policy.max_sockets
        if limit is not None and self.backend.domain_sockets(self.domid) >= limit:
            self.ratelimit.log(logger, logging.WARNING,
                               "dom%d: %s %#x refused by policy: socket limit %d reached",
                               self.domid, what, sock_id, limit)
            raise CommandError(LIMIT_ERRNO, f"socket limit {limit} reached")

    def _address(self, raw_addr: Any, length: int, what: str) -> tuple[str, int]:
        try:
            return unpack_sockaddr_in(bytes(raw_addr), int(length))
        except AddressFamilyError as exc:
            raise CommandError(_errno.EAFNOSUPPORT, f"{what} address: {exc}") from None
        except ValueError as exc:
            raise CommandError(_errno.EINVAL, f"{what} address: {exc}") from None

    # -- commands ----------------------------------------------------------------------------

    def _socket(self, request: Request, req: Any) -> int:
        args = req.u.socket
        if (args.domain, args.type, args.protocol) != (AF_INET, SOCK_STREAM, 0):
            raise CommandError(
                _errno.EAFNOSUPPORT, f"socket({args.domain}, {args.type}, {args.protocol}) "
                "is not AF_INET/SOCK_STREAM/0")
        with self._lock, self.backend.limit_lock:
            if request.id in self._sockets:
                raise CommandError(_errno.EEXIST, f"socket id {request.id:#x} in use")
            self._check_limit("SOCKET", request.id)
            self._sockets[request.id] = NewSocket(request.id)
        return 0

    def _connect(self, request: Request, req: Any) -> int | None:
        args = req.u.connect
        entry = self._lookup(request.id)
        if not isinstance(entry, NewSocket):
            if entry.state is SockState.CONNECTING:
                errno = _errno.EALREADY
            elif isinstance(entry, ActiveSocket):
                errno = _errno.EISCONN
            else:
                errno = _errno.EINVAL
            raise CommandError(errno, f"socket {request.id:#x} is {entry.state.value}")
        host, port = self._address(args.addr, args.len, "CONNECT")
        host = connect_destination(host)
        if not self.policy.connect.permits(host, port):
            self.ratelimit.log(logger, logging.WARNING,
                               "dom%d: CONNECT %#x to %s:%d refused by policy", self.domid,
                               request.id, host, port)
            raise CommandError(DENIED_ERRNO, f"connect to {host}:{port} denied")
        sock = ActiveSocket(self, request.id)
        try:
            # Recorded before it holds anything, and off the record only as
            # it goes into the table (see _undo): an interrupt anywhere
            # between, the table's lock being taken included, leaves it
            # where close() finds it.
            self._undone.append(sock)
            # Homed first, so that its event channel goes to its CPU's poller.
            sock.place()
            sock.attach_ring(int(args.ref), int(args.evtchn))
            with self._lock:
                self._sockets[request.id] = sock
                self._undone.remove(sock)
        except BaseException:
            # An interrupt too: the socket in no table yet gives back at
            # once what it holds (its CPU, its pages).  One in the table
            # (an interrupt as the lock was let go) is RELEASE's to free.
            if sock in self._undone:
                self._undo(sock)
            raise
        try:
            connected = sock.start_connect(request, (host, port))
        except (CommandError, OSError) as exc:
            sock.teardown()
            with self._lock:
                if self._sockets.get(request.id) is sock:
                    self._sockets[request.id] = entry
            if isinstance(exc, CommandError):
                raise
            raise CommandError(_errno.from_oserror(exc), f"connect: {exc}") from None
        return 0 if connected else None  # None: answered by the socket's Work

    def _undo(self, sock: ActiveSocket) -> None:
        """Tear down ``sock``, which is in no table but in ``_undone``,
        where it was recorded before it held anything: close() tears it
        down again, as a teardown cut short (Ctrl-C) left what it held (its
        pages, its port, its CPU slot) to nobody else.  Idempotent, so that
        close() does it again."""
        sock.teardown()
        self._undone.remove(sock)

    def connect_failed(self, sock: ActiveSocket, request: Request | None, ret: int) -> None:
        """From the socket's Work: the CONNECT failed.  Answer ``request``
        (unless a RELEASE took it) with ``ret``; the id is NEW again."""
        sock.teardown(from_work=True)
        # Both under _lock, where commands look the id up: a RELEASE that
        # finds the id NEW comes after the answer (one that found the
        # socket still active waits for this Work in teardown), and a
        # CONNECT retried once the answer is out finds the id NEW.
        with self._lock:
            if request is not None:
                self.respond(request, ret)
            if self._sockets.get(sock.id) is sock:
                self._sockets[sock.id] = NewSocket(sock.id)

    def _bind(self, request: Request, req: Any) -> int:
        args = req.u.bind
        entry = self._lookup(request.id)
        if not isinstance(entry, NewSocket):
            raise CommandError(_errno.EINVAL, f"socket {request.id:#x} is {entry.state.value}")
        host, port = self._address(args.addr, args.len, "BIND")
        if not self.policy.bind.permits(host, port):
            self.ratelimit.log(logger, logging.WARNING,
                               "dom%d: BIND %#x to %s:%d refused by policy", self.domid,
                               request.id, host, port)
            raise CommandError(DENIED_ERRNO, f"bind to {host}:{port} denied")
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:  # the host is out of descriptors (EMFILE, ENFILE)
            raise CommandError(_errno.from_oserror(exc), f"bind: socket: {exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise CommandError(_errno.from_oserror(exc), f"bind {host}:{port}: {exc}") from None
        with self._lock:
            self._sockets[request.id] = PassiveSocket(self, request.id, sock)
        return 0

    def _listen(self, request: Request, req: Any) -> int:
        entry = self._lookup(request.id)
        if not isinstance(entry, PassiveSocket):
            raise CommandError(_errno.EINVAL, f"socket {request.id:#x} is not bound")
        try:
            entry.listen(int(req.u.listen.backlog))
        except OSError as exc:
            raise CommandError(_errno.from_oserror(exc), f"listen: {exc}") from None
        return 0

    def _listening(self, sock_id: int) -> PassiveSocket:
        entry = self._lookup(sock_id)
        if entry.state is SockState.FAILED:
            raise CommandError(_errno.EIO, f"socket {sock_id:#x} failed")
        if not isinstance(entry, PassiveSocket) or entry.state is not SockState.LISTENING:
            raise CommandError(_errno.EINVAL, f"socket {sock_id:#x} is not listening")
        return entry

    def _accept(self, request: Request, req: Any) -> int | None:
        args = req.u.accept
        passive = self._listening(request.id)
        if passive.waiting is not None:  # checked again by wait(), under its lock
            raise CommandError(_errno.EINTR, f"ACCEPT or POLL already in flight on {request.id:#x}")
        id_new = int(args.id_new)
        new = ActiveSocket(self, id_new)
        # Whether the reservation is ours to give back: set and cleared
        # with the count, with no call between, so that an interrupt as any
        # lock is let go leaves the two agreeing.
        reserved = False
        try:
            # Recorded before it holds anything, off the record as it goes
            # into the table (as _connect).
            self._undone.append(new)
            with self._lock, self.backend.limit_lock:
                if id_new in self._sockets:
                    raise CommandError(_errno.EEXIST, f"id_new {id_new:#x} in use")
                self._check_limit("ACCEPT", id_new)
                # Counted from the check on, for the domain's other devices
                # too; in the table once its ring is attached.
                self._reserved += 1
                reserved = True
            new.state = SockState.ACCEPTING
            new.parent = passive
            new.attach_ring(int(args.ref), int(args.evtchn))
            # Under limit_lock too: another device of the domain counts our
            # sockets (nr_sockets, without our _lock) under it only, and
            # must not see the socket neither reserved nor in the table.
            with self._lock, self.backend.limit_lock:
                self._reserved -= 1
                reserved = False
                self._sockets[id_new] = new
                self._undone.remove(new)
        except BaseException:
            if reserved:
                # Not under _lock: a second interrupt as it was taken kept
                # the count, the domain's limit one lower for good.  None is
                # needed: the command Work (us) alone changes the count, and
                # a device of the domain counting meanwhile misses a socket
                # that goes into no table.
                self._reserved -= 1
            if new in self._undone:
                # An interrupt as the pages are mapped too (as _connect).
                self._undo(new)
            raise
        try:
            passive.wait(request, new)
        except CommandError:
            self.accept_failed(new)
            raise
        return None  # answered by the passive socket's Work

    def accept_failed(self, new: ActiveSocket) -> None:
        """Give up the socket reserved for an ACCEPT's id_new."""
        new.teardown()
        with self._lock:
            if self._sockets.get(new.id) is new:
                del self._sockets[new.id]

    def _poll(self, request: Request, req: Any) -> int | None:
        passive = self._listening(request.id)
        passive.wait(request, None)
        return None  # answered by the passive socket's Work

    def _release(self, request: Request, req: Any) -> int:
        """RELEASE: tear the socket down, then answer 0; first -EINTR to
        the ACCEPT or POLL it cancels.  A step of the teardown that fails
        is logged (see the sockets' teardown()), and the RELEASE answered 0
        all the same.  One that raises (an interrupt, or a bug of ours:
        -EIO) leaves the socket in the table, for a RELEASE again or the
        frontend's close() to finish what it left held.  The kick of an
        id_new's listener refused afterwards: -EIO, the socket released;
        after a teardown that raised, logged, what the teardown raised
        going on."""
        # Taken out of the table once torn down, not before (as close()
        # does): taken out first, a Ctrl-C as pop() returned lost it, and
        # one in the putting back after a teardown cut short (a second
        # Ctrl-C) left it in no place anyone looks, all it held held for
        # good.
        entry = self._lookup(request.id)
        if isinstance(entry, NewSocket):
            entry.release()
            self._take_out(request.id)
        elif isinstance(entry, ActiveSocket):
            parent = entry.parent
            # The request the RELEASE ends: the ACCEPT _cancel_accept takes
            # (an id_new's), or the CONNECT the teardown takes (never both).
            # Filled as each is taken, not from what they return: an
            # interrupt as they return (or as the listener's lock is let
            # go) would lose it.
            ended: list[Request] = []
            raised = False
            try:
                if parent is not None:
                    self._cancel_accept(parent, entry, ended)
                entry.teardown(into=ended)
                self._take_out(request.id)
            except BaseException:
                raised = True
                raise
            finally:
                # Answered only now: a cancelled ACCEPT's answer tells the
                # frontend id_new's ring is ours no more (as a listener's
                # RELEASE does).  Whatever the teardown raised: the guest
                # must not wait for ever.
                for ended_request in ended:
                    self.respond(ended_request, -_errno.EINTR)
                if parent is not None:
                    # _cancel_accept's disable() took back a queued run,
                    # and kicks meanwhile were refused: the next ACCEPT
                    # or POLL may already wait, its connection's edge gone.
                    # Run once more (a spare run is harmless), after the
                    # answer: a kick refused (a destroyed workqueue) must
                    # not lose it.
                    try:
                        parent.kick()
                    except Exception as exc:
                        if not raised:
                            raise
                        # What the teardown raised goes on: replaced, an
                        # interrupt's socket, left in the table, was
                        # answered -EIO.
                        self.ratelimit.log(logger, logging.ERROR,
                                           "dom%d: RELEASE id %#x: the listener's run failed",
                                           self.domid, request.id, exc_info=exc)
        else:
            # The ACCEPT or POLL the teardown takes, once it is done: not
            # from what it returns, which an interrupt as it returns loses.
            taken: list[tuple[Request, ActiveSocket | None]] = []
            try:
                entry.teardown(taken)
                self._take_out(request.id)
            finally:
                for waiting_request, new in taken:
                    try:
                        if new is not None:
                            self.accept_failed(new)
                    finally:
                        # As for a RELEASE of the id_new: answered whatever its
                        # teardown raised, or the guest waits for ever.
                        self.respond(waiting_request, -_errno.EINTR)
        return 0

    def _take_out(self, sock_id: int) -> None:
        # Whatever is there: the socket, or the NEW id that its connect,
        # failing meanwhile, put in its place (connect_failed), which the
        # RELEASE releases too.  Nothing else adds ids but the command
        # Work, which is us.
        with self._lock:
            self._sockets.pop(sock_id, None)

    def _cancel_accept(self, parent: PassiveSocket, new: ActiveSocket,
                       into: list[Request]) -> None:
        """RELEASE of an ACCEPT's id_new: take that ACCEPT off its listener,
        unless the connection was accepted already, and append it to
        ``into``, for the caller to answer -EINTR (once ``new`` is torn
        down, or whatever raised).  The caller kicks ``parent`` once done
        (see _release)."""
        # disable_sync() as two calls: its wait cut short (Ctrl-C) keeps its
        # disable, the caller's, which the finally must then give back.
        # disable() does not wait.
        parent.disable()
        try:
            parent.flush()  # an accept in progress has finished with `new`
            with parent._lock:
                waiting = parent.waiting
                if waiting is not None and waiting[1] is new:
                    # Taken off first: an interrupt as append() returns
                    # must not leave it to the listener's run too.
                    parent.waiting = None
                    into.append(waiting[0])
        finally:
            parent.enable()

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop the command Work and release every socket and the ring.
        Idempotent; a close() cut short (Ctrl-C) is finished by the next,
        as every step may be done again."""
        # No response (and no notification on the port) from here on: the
        # frontend is going away and the port is about to be unbound.
        with self._rsp_lock:
            if self._released:
                return
            self._closed = True
        # The record goes once the unbind is over (see unbind_quietly): the
        # number may be another frontend's command port on the shared
        # dispatcher by the time a close() cut short is done again.
        if self._port_bound:
            unbind_quietly(self.dispatcher, self.port, self._on_event)
            self._port_bound = False
        self._work.disable_sync()
        with self._lock:
            sockets = list(self._sockets.items())
        # Listening sockets first: they may hold ACCEPT sockets.  Each is
        # taken out of the table once torn down, not before: a close() cut
        # short leaves the rest to the next one.
        for listening in (True, False):
            for sock_id, sock in sockets:
                if isinstance(sock, PassiveSocket) is not listening:
                    continue
                if isinstance(sock, PassiveSocket | ActiveSocket):
                    # No into: the CONNECT, ACCEPT or POLL a teardown
                    # takes goes unanswered (respond() sends nothing once
                    # _closed); an ACCEPT's id_new is in the table too.
                    sock.teardown()
                else:
                    sock.release()
                with self._lock:
                    if self._sockets.get(sock_id) is sock:
                        del self._sockets[sock_id]
        # The Work, which adds to them, stopped above.
        for undone in list(self._undone):
            undone.teardown()
            self._undone.remove(undone)
        self.ring.release()
        self._unmap_ring(self._mapping)
        with self._rsp_lock:
            self._released = True
        # No count of suppressed lines here: the limit is the device's, and
        # a guest restarting it would get one line per restart.  The count
        # comes with the next line let through, or when the device goes.

    # -- statistics ---------------------------------------------------------------------

    def socket_stats(self) -> list[SocketStats]:
        with self._lock:
            sockets = list(self._sockets.values())
        rows = []
        devid = self.dev.devid
        for sock in sockets:
            if isinstance(sock, ActiveSocket):
                rows.append(SocketStats(self.domid, devid, sock.id, "active", sock.state.value,
                                        sock.cpu if sock.cpu >= 0 else None,
                                        sock.bytes_in, sock.bytes_out, sock.remote))
            elif isinstance(sock, PassiveSocket):
                rows.append(SocketStats(self.domid, devid, sock.id, "passive", sock.state.value,
                                        None, 0, 0, sock.local))
            else:
                rows.append(SocketStats(self.domid, devid, sock.id, "new", sock.state.value,
                                        None, 0, 0, None))
        return rows


_HANDLERS: Mapping[int, Handler] = {
    PVCALLS_SOCKET: _Frontend._socket,
    PVCALLS_CONNECT: _Frontend._connect,
    PVCALLS_RELEASE: _Frontend._release,
    PVCALLS_BIND: _Frontend._bind,
    PVCALLS_LISTEN: _Frontend._listen,
    PVCALLS_ACCEPT: _Frontend._accept,
    PVCALLS_POLL: _Frontend._poll,
}
