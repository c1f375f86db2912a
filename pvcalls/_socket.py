"""The sockets of one frontend: new, active (connected) and passive (listening).

A frontend names its sockets with 64-bit ids of its own choosing (Linux uses
kernel pointers).  The backend keeps one object per id:

* :class:`NewSocket` after SOCKET: nothing but the id, until CONNECT or BIND
  says what it becomes (the host socket is created then);
* :class:`ActiveSocket` after CONNECT, or reserved by ACCEPT for ``id_new``:
  a host TCP socket, the frontend's data ring (indexes page and
  ``2**ring_order`` data pages) and an event channel;
* :class:`PassiveSocket` after BIND: a host listening socket and at most one
  ACCEPT or POLL waiting for a connection.

The I/O model
-------------
Every active socket is one :class:`workqueue.Work` (the object itself), homed
on one CPU of the backend's bound workqueue by a :class:`workqueue.LoadIndex`
when it is connected or accepted, and queued only there
(``queue_work_on(sock.cpu, sock)``).  Readiness (host socket readable or
writable, the frontend's event channel) only queues that Work, and is taken
by the poller of that CPU (:mod:`pvcalls._poller`), whose worker runs the
Work next without waking another thread; the Work then
moves bytes in both directions until there is nothing left to move, with
non-blocking ``recvmsg_into`` / ``sendmsg`` straight between the host socket
and memoryviews of the mapped ring pages.  A Work never runs concurrently
with itself, so the socket's ring indexes and counters have exactly one
writer and need no lock.  When its CPU goes offline the load index moves the
socket and :meth:`ActiveSocket.rehome` changes ``cpu``; the next queueing
goes to the new CPU, and non-reentrancy keeps the bytes in order.

Host sockets are registered edge-triggered: an edge queues the Work, and the
Work runs until the host socket is drained (EAGAIN, or a short read before
any hang-up) or the ring is full or empty; in the latter cases the
frontend's notification (after it consumed or produced) queues it again.
Write space (EPOLLOUT) is watched only while a send is blocked, since on
loopback every ACK would otherwise wake the Work.

Notifications: the frontend is notified after every run that produced into
the in ring or changed an error, as Linux's backend does.  Room made in the
out ring is announced only if the ring was full before: a frontend waits
for room only then (Linux's sleeps in poll() only on a full ring; ours only
when it cannot write a byte).  Whether it was full is decided after our
``out_cons`` store and a full barrier, by re-reading ``out_prod``: against
the frontend's store of ``out_prod`` followed by a barrier (its notify, a
hypercall or system call, at the latest) and its load of ``out_cons``, one
of the two sides sees the other's store, so a frontend that found the ring
full is always notified.  A 64-byte request thus costs the frontend no
wake-up for the room it freed.  Each run moves at most
:data:`IO_BUDGET` bytes before re-queueing itself behind the other sockets
of its CPU.

A bug of ours
-------------
An exception escaping a socket's Work is no fault of the guest's but ours
(or the host's), and it fails that socket alone, as a connection that
failed: -EIO in ``in_error`` and ``out_error``, a notification, the host
socket closed, the Work disabled.  The socket is FAILED until the guest
releases it, as any socket, which frees the rest; a CONNECT still in
progress is answered -EIO instead.  A listening socket's Work failing
answers the ACCEPT or POLL it served -EIO, closes the host socket, and
leaves the socket FAILED: every later ACCEPT, POLL or LISTEN gets -EIO.
Either way the traceback goes to the log once, through the guest's rate
limit.
"""

from __future__ import annotations

import enum
import errno as _host_errno
import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from workqueue import Work
from xenback.events import EventDispatcher, PortCallback
from xenback.platform import GrantMapping, GrantTable
from xenback.ring import FlexRing, RingError, mb, wmb

from . import _errno
from ._wire import (
    DEFAULT_MAX_PAGE_ORDER,
    IN_CONS_OFFSET,
    IN_ERROR_OFFSET,
    IN_PROD_OFFSET,
    OUT_CONS_OFFSET,
    OUT_ERROR_OFFSET,
    OUT_PROD_OFFSET,
    PAGE_SIZE,
    PVCALLS_COMMANDS,
    REF_OFFSET,
    RING_ORDER_OFFSET,
    flex_ring_size,
)

if TYPE_CHECKING:
    from ._backend import _Frontend

__all__ = [
    "ActiveSocket", "CommandError", "DataRing", "NewSocket", "PassiveSocket", "Request",
    "SockState",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Bytes one run of an active socket's Work may move before it re-queues
#: itself behind the other sockets of its CPU (fairness, like NAPI's budget).
IO_BUDGET = 1 << 20

#: Indexes pages of a frontend whose last ``ref[]`` array is kept, to map
#: a ring it gives again in one request (see :class:`DataRing`): a
#: frontend recycling more rings than that only loses the shortcut.
RING_HINTS = 256

#: And the refs those arrays hold in all: as many as RING_HINTS rings of
#: the default order have.  The length of an array is the frontend's
#: choice, up to 512 refs, and 256 of those would keep some 5 MB of ours
#: for a few hundred grants of a guest.  More than the largest ring has:
#: the newest array always stays.
RING_HINT_REFS = RING_HINTS << DEFAULT_MAX_PAGE_ORDER

#: Host socket events an active socket waits for (edge-triggered).  Write
#: space is only watched while a send is blocked (or a connect in progress):
#: on loopback every ACK would otherwise wake the Work for nothing.
ACTIVE_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
ACTIVE_EVENTS_OUT = ACTIVE_EVENTS | select.EPOLLOUT
_HANGUP_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
#: Host socket events a listening socket waits for (edge-triggered).
PASSIVE_EVENTS = select.EPOLLIN | select.EPOLLET


class Request(NamedTuple):
    """What a response echoes of its request."""

    req_id: int
    cmd: int
    id: int


class CommandError(Exception):
    """A request that fails with a (positive, Xen-numbered) errno."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class SockState(enum.Enum):
    NEW = "new"                  # SOCKET done, nothing else yet
    ACCEPTING = "accepting"      # id_new of an ACCEPT in flight: ring mapped, no host socket
    CONNECTING = "connecting"    # CONNECT in flight: non-blocking connect under way
    CONNECTED = "connected"      # data flows
    BOUND = "bound"              # passive, after BIND
    LISTENING = "listening"      # passive, after LISTEN
    CLOSED = "closed"            # released (or a failed CONNECT): inert
    FAILED = "failed"            # a bug of ours stopped it: only RELEASE is left


class NewSocket:
    """An id the frontend created with SOCKET and has not used yet."""

    state = SockState.NEW

    def __init__(self, sock_id: int) -> None:
        self.id = sock_id

    def release(self) -> None:
        self.state = SockState.CLOSED


class DataRing:
    """The data ring of one active socket, mapped from the frontend.

    Maps the indexes page, reads ``ring_order`` and the ``ref[]`` array out of
    it once, validates them, and maps the indexes page and the data pages
    again as one contiguous mapping (the indexes page first), which is the
    ring's for its life; the first mapping goes.  The first half of the
    data is the ``in`` ring (we produce), the second half the ``out`` ring
    (we consume).  Every access goes through
    :class:`xenback.ring.FlexRing`, which masks positions, so nothing the
    frontend writes can make us touch memory outside the mapped pages.

    ``hint`` is the ``ref[]`` array of the last ring the frontend gave with
    this indexes page (ours recycles its rings, pages, grants and all):
    the whole ring is then mapped at once, and if the array read from it
    is the hint, that is all, one request to the hypervisor where there
    are two, and one to unmap where there would be two.  A hint the
    hypervisor refuses (the grants ended) or that the page contradicts
    costs what it saved: the long way follows, from the page just read.
    Only the copy read from the page decides what is mapped, and the
    hypervisor checks every ref, whatever the hint was.
    """

    def __init__(self, gnttab: GrantTable, domid: int, ref: int, max_page_order: int,
                 hint: tuple[int, ...] | None = None) -> None:
        # Every mapping held, the ring's last, each recorded by the call
        # that makes it (list.extend() stores it before control is back
        # here, as ActiveSocket.attach_ring does): one assigned from what
        # the map call returned was lost to an interrupt as it returned,
        # held for the life of the backend.  close() unmaps them all.
        self._maps: list[GrantMapping] = []
        self._page: memoryview | None = None
        self._errors: memoryview | None = None
        self._words: memoryview | None = None
        self._rings: list[FlexRing] = []
        try:
            if hint is not None:
                try:
                    self._maps.extend(map(gnttab.map_grant_refs, (domid,), ((ref, *hint),)))
                except (OSError, ValueError):
                    pass  # the long way
            if not self._maps:
                self._maps.extend(map(_map_ring, (gnttab,), (domid,), ((ref,),),
                                      (f"indexes page grant {ref}",)))
            first = self._maps[0]
            order, refs = _read_layout(first.buffer, max_page_order)
            if first.refs[1:] != refs:
                # The whole ring, as the page says it is; then the first
                # mapping goes, its record once it is unmapped (held until
                # then, for close() on failure).
                self._maps.extend(map(_map_ring, (gnttab,), (domid,), ((ref, *refs),),
                                      (f"{len(refs)} data ring pages",)))
                _unmap(first)
                self._maps.remove(first)
            self.refs = refs
            self.ring_order = order
            self.size = size = flex_ring_size(order)
            buffer = self._maps[-1].buffer
            self._page = page = buffer[:PAGE_SIZE]
            self.in_ring = FlexRing(buffer[PAGE_SIZE : PAGE_SIZE + size], page,
                                    prod_offset=IN_PROD_OFFSET, cons_offset=IN_CONS_OFFSET)
            self._rings.append(self.in_ring)
            self.out_ring = FlexRing(buffer[PAGE_SIZE + size : PAGE_SIZE + 2 * size], page,
                                     prod_offset=OUT_PROD_OFFSET, cons_offset=OUT_CONS_OFFSET)
            self._rings.append(self.out_ring)
            # Signed views of the two error fields, unsigned of the indexes.
            self._errors = page[:128].cast("i")
            self._words = page[:128].cast("I")
        except BaseException:
            self.close()
            raise

    @property
    def in_error(self) -> int:
        assert self._errors is not None
        return self._errors[IN_ERROR_OFFSET // 4]

    def set_in_error(self, value: int) -> None:
        """Publish ``in_error`` after every byte produced before it."""
        assert self._errors is not None
        wmb()
        self._errors[IN_ERROR_OFFSET // 4] = value

    @property
    def out_cons(self) -> int:
        """Our (the consumer's) index of the out ring, as the page holds it
        now: the guest may have rewritten it (the data path goes by
        ``out_ring.position``)."""
        assert self._words is not None
        return self._words[OUT_CONS_OFFSET // 4]

    def out_pending(self) -> bool:
        """Whether the out ring holds bytes, going by its indexes on the
        page as they are now: a hint only, for whether to run the Work,
        which reads them again and checks them."""
        assert self._words is not None
        words = self._words
        return words[OUT_PROD_OFFSET // 4] != words[OUT_CONS_OFFSET // 4]

    def out_was_full(self, cons: int) -> bool:
        """After a consume: was the out ring full with ``cons``, our index
        before it?  (See the module docstring for why this read of
        ``out_prod`` after a full barrier may decide whether to notify.)"""
        assert self._words is not None
        mb()
        prod = self._words[OUT_PROD_OFFSET // 4]
        return (prod - cons) & 0xFFFFFFFF >= self.size

    @property
    def out_error(self) -> int:
        assert self._errors is not None
        return self._errors[OUT_ERROR_OFFSET // 4]

    def set_out_error(self, value: int) -> None:
        assert self._errors is not None
        wmb()
        self._errors[OUT_ERROR_OFFSET // 4] = value

    def close(self) -> None:
        """Drop every view, then unmap the pages."""
        for ring in self._rings:
            ring.release()
        self._rings = []
        for view in (self._errors, self._words, self._page):
            if view is not None:
                view.release()
        self._errors = self._words = self._page = None
        # Each record goes once its pages are unmapped, not before: gone
        # first, an interrupt as the unmapping started held the pages for
        # good.  Unmapped twice (one as unmap() returned), no harm: it is
        # idempotent, and a mapping is no number another may hold by then.
        while self._maps:
            _unmap(self._maps[-1])
            del self._maps[-1]


def _map_ring(gnttab: GrantTable, domid: int, refs: tuple[int, ...], what: str) -> GrantMapping:
    try:
        return gnttab.map_grant_refs(domid, refs)
    except (OSError, ValueError) as exc:
        raise CommandError(_errno.EINVAL, f"cannot map {what}: {exc}") from None


def _unmap(pages: GrantMapping) -> None:
    try:
        pages.unmap()
    except (OSError, BufferError):
        logger.exception("unmapping a data ring failed")


def unbind_quietly(events: EventDispatcher, port: int, callback: PortCallback) -> None:
    """Unbind ``port``, if it is still bound with ``callback``; a failure
    (unbound already, bound since by another, the dispatcher closed) is
    logged, not raised: the callers, a socket's or a frontend's, are
    giving it up, with more to release.  ``callback``: the one bound, or
    the same method of the same object made anew (EventDispatcher.unbind
    knows it as such).  They keep the number on record until this is
    over: taken off first, a Ctrl-C as this started left the port bound,
    known to nobody, until the dispatcher closed; kept by one as this
    returned, the unbind done again leaves alone the number bound since
    by another (see EventDispatcher.unbind, whose handle's own frames
    keep a window of the first kind)."""
    try:
        events.unbind(port, callback)
    except (OSError, KeyError, ValueError, RuntimeError):
        logger.debug("unbinding port %s failed", port, exc_info=True)


def _read_layout(buffer: memoryview, max_page_order: int) -> tuple[int, tuple[int, ...]]:
    """``ring_order`` and the ``ref[]`` array of the indexes page at the
    start of ``buffer``, copied out once (the frontend may change the page
    under us) and checked."""
    with buffer[:PAGE_SIZE] as page, page.cast("I") as words:
        order = words[RING_ORDER_OFFSET // 4]
        if not 1 <= order <= max_page_order:
            raise CommandError(_errno.EINVAL, f"ring_order {order} not in 1..{max_page_order}")
        first = REF_OFFSET // 4
        return order, tuple(words[first : first + (1 << order)])


class _Steps:
    """The steps of a teardown, each tried whatever became of the ones
    before: one that raises is logged with its traceback (on behalf of
    ``owner``) and the next one runs.  An interrupt (a BaseException that
    is not an Exception, such as KeyboardInterrupt) is kept, and the first
    one re-raised by :meth:`done` once every step has been tried."""

    def __init__(self, owner: object) -> None:
        self._owner = owner
        self._interrupt: BaseException | None = None

    @property
    def interrupted(self) -> bool:
        return self._interrupt is not None

    def run(self, what: str, step: Callable[..., _T], *args: Any) -> _T | None:
        """``step(*args)``, or None if it raised."""
        try:
            return step(*args)
        except Exception:
            logger.exception("%r: teardown: %s failed", self._owner, what)
        except BaseException as exc:
            if self._interrupt is None:
                self._interrupt = exc
        return None

    def done(self) -> None:
        if self._interrupt is not None:
            raise self._interrupt


class ActiveSocket(Work):
    """A connected (or connecting, or being accepted) socket: one Work.

    Fields written before the socket is published to its Work (``ring``,
    ``port``, ``host``: by the command processing, or ``host`` of an
    ACCEPT's socket by the listening socket's Work while the state is
    ACCEPTING, in which the Work does nothing) are not changed afterwards
    until the Work has been disabled and cancelled (:meth:`teardown`), so the
    Work reads them without a lock.  ``_lock`` protects ``state`` and
    ``connect_request`` (the CONNECT awaiting its answer), which the command
    processing and the Work both change; whoever takes ``connect_request`` answers
    it, so it is answered exactly once.
    """

    def __init__(self, frontend: _Frontend, sock_id: int) -> None:
        super().__init__(ActiveSocket._run)
        self.frontend = frontend
        self.id = sock_id
        self.state = SockState.NEW
        self.cpu = -1                       # set by the load index
        self.host: socket.socket | None = None
        self.ring: DataRing | None = None
        self.port: int | None = None        # our local event channel port
        # The dispatcher of our CPU's poller, with our port and host socket
        # (see pvcalls._poller); chosen when the ring is attached.
        self.events: EventDispatcher | None = None
        self.remote: tuple[str, int] | None = None
        self.bytes_in = 0                   # host -> guest (in ring)
        self.bytes_out = 0                  # guest -> host (out ring)
        self._lock = threading.Lock()
        self.connect_request: Request | None = None
        # The listening socket whose ACCEPT reserved us, until accepted.
        self.parent: PassiveSocket | None = None
        self._rx_done = False               # in_error set: we produce no more
        self._tx_done = False               # out_error set: we consume no more
        self._placed = False
        # The Work ran while NEW (under _lock): an event came before
        # start_connect() was done with the socket, for it to run the Work
        # once more.
        self._missed = False
        # The host socket was closed or handed to the lingerer (teardown).
        self._host_released = False
        # A teardown found us CONNECTED: what the out ring holds is to be
        # sent before the host socket goes, by a teardown done again too
        # (one cut short leaves us CLOSED).  Cleared once a flush ran
        # whole, ``_rest`` then what it left for the lingerer.  Set only
        # while the host socket is ours (see teardown).
        self._flush_due = False
        self._rest = b""
        self._out_armed = False             # EPOLLOUT in the host socket's mask
        self._room_made = False             # _tx freed room in a full out ring
        # Whether a receive may find data: the host socket signalled since
        # our last receive (_host_ready, set by the epoll callback), or our
        # last receive may have left data behind (_rx_more: the ring was full
        # or the read filled all the space).  A short read or EAGAIN drains
        # the socket, and the next arrival is a new epoll edge, so a Work
        # woken by the frontend alone skips the system call.  Not so once
        # the peer shut down or failed (_host_hangup): the data before a FIN
        # or an error comes as a short read, and the EOF or the error only
        # with the next receive, announced by the same (merged) epoll event.
        self._host_ready = False
        self._rx_more = True
        # Our last send took less than the out ring held: the next one
        # sends the rest or finds the host socket full (and arms EPOLLOUT).
        self._tx_more = False
        self._host_hangup = False
        # The host socket reported an error (EPOLLERR): a receive takes
        # it, but once the peer's FIN was received, Linux's recv() says
        # EOF for ever before it looks at the error (a reset after the
        # FIN), so that one is asked for with SO_ERROR (_host_failed).
        self._host_error = False

    def __repr__(self) -> str:
        return (f"<ActiveSocket dom{self.frontend.domid} id={self.id:#x} "
                f"{self.state.value} cpu={self.cpu}>")

    # -- set-up, from the command processing --------------------------------

    def attach_ring(self, ref: int, remote_port: int) -> None:
        """Map the data ring at ``ref`` and bind the frontend's ``remote_port``."""
        fe = self.frontend
        # Each recorded by the call that makes it (list.extend() stores it
        # before control is back here, as _Frontend.__init__ does), and
        # given up here on the way out: one kept from us by an interrupt
        # as its call returned would be held for the life of the backend,
        # the teardown of our caller's except clause finding no record.
        rings: list[DataRing] = []
        ports: list[int] = []
        events = None
        try:
            # The hints are the command Work's, which makes every ring of
            # its frontend (CONNECT, ACCEPT), one command at a time: no lock.
            hints = fe.ring_hints
            hint = hints.pop(ref, None)
            rings.extend(map(DataRing, (fe.gnttab,), (fe.domid,), (ref,),
                             (fe.backend.max_page_order,), (hint,)))
            hints[ref] = rings[0].refs  # the newest last
            # The oldest go, for as many refs as rings (see RING_HINT_REFS),
            # counted here, not kept beside them: see ring_hint_refs.
            kept = fe.ring_hint_refs
            while len(hints) > RING_HINTS or kept > RING_HINT_REFS:
                kept -= len(hints.pop(next(iter(hints))))
            # Our CPU's poller if we have a CPU (CONNECT), else the one of
            # the CPU we will most likely get (ACCEPT, placed when a
            # connection comes).
            backend = fe.backend
            events = (backend._events_of(self.cpu) if self._placed
                      else backend._events_for_next_socket())
            try:
                ports.extend(map(events.bind_interdomain, (fe.domid,), (remote_port,),
                                 (self._on_event,)))
            except (OSError, ValueError) as exc:
                raise CommandError(_errno.EINVAL, f"cannot bind event channel {remote_port}: "
                                   f"{exc}") from None
        except BaseException:
            for port in ports:
                assert events is not None, "bound through it"
                unbind_quietly(events, port, self._on_event)
            for ring in rings:
                ring.close()
            raise
        # No call from here on, so no interrupt: the records are taken over.
        self.ring = rings[0]
        self.events = events
        self.port = ports[0]

    def place(self) -> None:
        """Home the socket on the least loaded CPU (once)."""
        if not self._placed:
            index = self.frontend.backend.load_index
            self.cpu = index.assign(self)
            # A cpu_down between assign() and that store moved us, and its
            # rehome() may have stored the new CPU before ours: settle on
            # what the index says.  A move after the last look stores its
            # CPU after ours.
            while (cpu := index.cpu_of(self)) != self.cpu:
                self.cpu = cpu
            self._placed = True

    def rehome(self, cpu: int) -> None:
        """The load index moved us off an offline CPU: queue on ``cpu`` from now on."""
        self.cpu = cpu

    def start_connect(self, request: Request, address: tuple[str, int]) -> bool:
        """Begin a non-blocking connect.  True if it completed within the
        call (usual on loopback, where the handshake runs inside
        ``connect``): the caller answers ``request`` at once, which saves
        EPOLLOUT an arm and a disarm.  Otherwise the Work answers it when
        the connect completes.

        The frontend may notify our event channel meanwhile, and so run
        our Work: it does nothing while the state is NEW, and the state
        becomes CONNECTING, together with ``connect_request``, only once
        everything here is done.  So exactly one of us answers.

        Likewise CONNECTED, only once the host socket is watched: a
        failure before (epoll out of memory) leaves a socket that has
        moved no byte, which the caller tears down and answers with the
        error.  (CONNECTED first, the Work could send what the guest
        wrote early, or the teardown's flush would, on a connection the
        guest is told failed.)"""
        host = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        host.setblocking(False)
        self.host = host
        self.remote = address
        err = host.connect_ex(address)
        if err not in (0, _host_errno.EINPROGRESS):
            raise CommandError(_errno.from_host_errno(err),
                               f"connect to {address[0]}:{address[1]} failed at once")
        self.place()
        if err == 0 or _connected(host):
            # Watched from here: whatever arrives is an edge, and what came
            # before is reported as one (epoll_ctl checks readiness), so no
            # receive is due until one comes.
            self._rx_more = False
            self._events().add_fd(host.fileno(), ACTIVE_EVENTS, self._on_host_event)
            with self._lock:
                self.state = SockState.CONNECTED
                missed, self._missed = self._missed, False
            # An edge since add_fd (data that came already: epoll_ctl
            # checks readiness) or a notification of the frontend ran the
            # Work while NEW, which only noted it; or the guest wrote into
            # the out ring before, its notification gone to nobody (a
            # connect that failed, or none given): one run now.  Else the
            # Work waits for the first event, as a connected socket's
            # always does (a run for nothing cost a worker's wake-up per
            # connect).
            ring = self.ring
            if missed or (ring is not None and ring.out_pending()):
                self.kick()
            return True
        self._out_armed = True
        self._events().add_fd(host.fileno(), ACTIVE_EVENTS_OUT, self._on_host_event)
        with self._lock:
            self.connect_request = request
            self.state = SockState.CONNECTING
            self._missed = False  # the kick below runs it anyway
        # Also covers a connect that completed before we were CONNECTING
        # (its event ran the Work, which then did nothing).
        self.kick()
        return False

    def start_accepted(self, host: socket.socket, address: tuple[str, int]) -> None:
        """Take over an accepted connection (from the passive socket's Work,
        which clears ``parent`` once it has answered the ACCEPT)."""
        host.setblocking(False)
        self.host = host
        self.remote = address
        self.place()
        # CONNECTED only once watched, as in start_connect: if add_fd
        # fails, the ACCEPT fails with no byte moved.  Meanwhile the Work
        # does nothing (ACCEPTING); the kick after the answer covers the
        # edges it let go.
        self._events().add_fd(host.fileno(), ACTIVE_EVENTS, self._on_host_event)
        with self._lock:
            self.state = SockState.CONNECTED

    # -- readiness ------------------------------------------------------------

    def _events(self) -> EventDispatcher:
        events = self.events
        assert events is not None, "the ring is attached before the host socket is watched"
        return events

    def _notify(self) -> None:
        """Kick the frontend on our event channel."""
        port = self.port
        if port is not None:
            events = self.events  # not _events(): a call less per notify
            assert events is not None, "bound through the dispatcher"
            try:
                events.notify(port)
            except OSError:
                logger.debug("%r: notify on port %d failed", self, port, exc_info=True)

    def _on_event(self, *_: object) -> None:
        self.kick()

    def _on_host_event(self, fd: int, events: int) -> None:
        # Set before queueing: a Work that misses the flags is queued again.
        if events & _HANGUP_EVENTS:
            self._host_hangup = True
        if events & select.EPOLLERR:
            self._host_error = True
        self._host_ready = True
        self.kick()

    def kick(self) -> None:
        """Queue the Work on the socket's CPU (a no-op until it has one)."""
        cpu = self.cpu
        if cpu >= 0:
            self.frontend.backend.io_wq.queue_work_on(cpu, self)

    # -- the Work -------------------------------------------------------------

    def _run(self) -> None:
        # One try around the whole run, none per pass: what escapes it is
        # a bug of ours (or the host's), and fails this socket (_fail)
        # rather than reach only the workqueue's log, at every event, while
        # the guest waits for ever.
        try:
            state = self.state
            if state is SockState.CONNECTING:
                if not self._finish_connect():
                    return
            elif state is not SockState.CONNECTED:
                if state is SockState.NEW:
                    self._missed_run()
                return
            ring = self.ring
            host = self.host
            if ring is None or host is None:
                return
            budget = IO_BUDGET
            while budget > 0:
                changed = False
                sent = self._tx(ring, host)
                if sent < 0:
                    changed, sent = True, 0
                received = self._rx(ring, host)
                if received < 0:
                    changed, received = True, 0
                if self._host_error and self._rx_done and self._host_failed(ring, host):
                    changed = True
                if received or self._room_made:
                    changed, self._room_made = True, False
                if changed:
                    self._notify()
                if not (sent or received):
                    return
                budget -= sent + received
                # Another pass only if this one may have left bytes behind
                # that no event will announce: a short send (the next one
                # sends more or arms EPOLLOUT) or a receive that filled the
                # ring or met a hang-up (_rx_more).  An out ring sent whole
                # is announced again by the frontend's notify after it
                # produces more, a short read by the host socket's next
                # edge; a pass finding nothing costs as much Python as one
                # that moves a 64-byte request (a round trip made two).
                if budget > 0 and not (self._tx_more or self._rx_more):
                    return
            # Out of budget (more to do or not): let the other sockets of this CPU in.
            self.kick()
        except Exception as exc:
            self._fail(exc)

    def _missed_run(self) -> None:
        """The Work ran while NEW: an event came while the CONNECT is set
        up.  Noted under ``_lock``, where start_connect() changes the state
        and looks at the note, so that it runs the Work once more; if the
        state changed meanwhile, the Work runs again now."""
        with self._lock:
            if self.state is SockState.NEW:
                self._missed = True
                return
        self.kick()

    def _fail(self, exc: Exception) -> None:
        """The Work raised ``exc``: nothing it does for this socket can be
        trusted any more.  The socket stops as a connection that failed
        does, the Work disabled and the host socket closed (its peer sees
        the end of the stream), and the guest is told as it is of one:
        -EIO in both error fields (but for an error set already, which the
        guest may have read), and a notification.  The socket stays in its
        frontend's table, FAILED, until the guest's RELEASE, which frees
        the rest as for any socket.  A CONNECT still in progress is
        answered -EIO instead, and the id is NEW again, as after any
        connect that failed.  Logged with the traceback, through the
        guest's rate limit: a guest may set the bug off socket after
        socket."""
        fe = self.frontend
        self.disable()  # not _sync: this is the Work
        fe.ratelimit.log(logger, logging.ERROR,
                         "dom%d socket %#x: serving it failed, socket stopped (EIO)",
                         fe.domid, self.id, exc_info=exc)
        with self._lock:
            request, self.connect_request = self.connect_request, None
            torn_down = self.state is SockState.CLOSED  # by a connect that failed
            if request is None and not torn_down:
                self.state = SockState.FAILED
        if request is not None:
            fe.connect_failed(self, request, -_errno.EIO)
            return
        if torn_down:
            return
        # The guest is told last, of a socket that is stopped already.
        steps = _Steps(self)
        host = self.host
        if host is not None and not self._host_released:
            steps.run("unwatching the host socket", self._unwatch, host)
            if not steps.interrupted:
                steps.run("closing the host socket", host.close)
                self._host_released = True
        ring = self.ring
        if ring is not None:
            if not self._rx_done:
                self._rx_done = True
                steps.run("setting in_error", ring.set_in_error, -_errno.EIO)
            if not self._tx_done:
                self._tx_done = True
                steps.run("setting out_error", ring.set_out_error, -_errno.EIO)
            steps.run("notifying the guest", self._notify)
        steps.done()

    def _tx(self, ring: DataRing, host: socket.socket) -> int:
        """Guest -> host.  Bytes moved, or -1 if only the error state changed."""
        if self._tx_done:
            return 0
        try:
            views = ring.out_ring.readable()
        except RingError as exc:
            self._protocol_error(ring, host, exc)
            return -1
        if not views:
            self._tx_more = False
            return 0
        available = sum(map(len, views))
        # The index this consume starts from, as readable() read it: the
        # word on the page is the guest's to overwrite at any moment.
        cons = ring.out_ring.position
        try:
            # MSG_NOSIGNAL: EPIPE is the guest's out_error, not a SIGPIPE
            # that kills the backend in a process that does not ignore it.
            sent = host.sendmsg(views, (), socket.MSG_NOSIGNAL)
        except BlockingIOError:
            self._tx_more = False  # EPOLLOUT announces the room
            self._watch_write_space(host, True)
            return 0
        except OSError as exc:
            self._tx_more = False
            self._tx_done = True
            ring.set_out_error(-_errno.from_oserror(exc))
            logger.debug("%r: send failed: %s", self, exc)
            return -1
        finally:
            del views
        self._tx_more = sent < available
        self.bytes_out += sent  # before the frontend may see them gone
        ring.out_ring.consume(sent)
        if sent and ring.out_was_full(cons):
            self._room_made = True
        if self._out_armed and sent == available:
            self._watch_write_space(host, False)
        return sent

    def _watch_write_space(self, host: socket.socket, on: bool) -> None:
        """Add or drop EPOLLOUT.  Re-arming reports write space that freed up
        meanwhile (epoll_ctl re-checks readiness), so no wake-up is lost."""
        if self._out_armed != on:
            self._out_armed = on
            self._events().modify_fd(host.fileno(), ACTIVE_EVENTS_OUT if on else ACTIVE_EVENTS)

    def _rx(self, ring: DataRing, host: socket.socket) -> int:
        """Host -> guest.  Bytes moved, or -1 if only the error state changed."""
        if self._rx_done:
            return 0
        # Our last in_prod store before this read of in_cons: the frontend
        # skips its notify after consuming unless it saw the ring full (see
        # pvcalls.frontend), and one of us must see the other's store.
        mb()
        if ring.in_error:
            # Set by us (then _rx_done is set too) or by the frontend, which
            # wants no more data (Linux's frontend writes -EBADF after
            # RELEASE): a producer stops on an error, as Linux's does.
            return 0
        try:
            views = ring.in_ring.writable()
        except RingError as exc:
            self._protocol_error(ring, host, exc)
            return -1
        if not views:
            self._rx_more = True
            return 0
        if not (self._host_ready or self._rx_more):
            return 0
        self._host_ready = False
        space = sum(map(len, views))
        try:
            if len(views) == 1:
                received = host.recv_into(views[0])
            else:
                received = host.recvmsg_into(views)[0]
        except BlockingIOError:
            self._rx_more = False
            return 0
        except OSError as exc:
            self._rx_done = True
            ring.set_in_error(-_errno.from_oserror(exc))
            logger.debug("%r: receive failed: %s", self, exc)
            return -1
        finally:
            del views
        self._rx_more = received == space or self._host_hangup
        if received == 0:
            # Orderly shutdown by the peer: EOF for the frontend.
            self._rx_done = True
            ring.set_in_error(-_errno.ENOTCONN)
            return -1
        # Counted before the frontend may see the bytes: whoever has read
        # them finds them in stats().
        self.bytes_in += received
        ring.in_ring.produce(received)
        return received

    def _host_failed(self, ring: DataRing, host: socket.socket) -> bool:
        """The host socket reported an error after the receive side
        ended: take it, and stop the send side with it (True), as a TCP
        socket fails its next send.  A reset after the peer's FIN is one
        (EPIPE: the guest sees it at once, as on Linux, not only once a
        send of ours failed).  Only once the receive side ended: before,
        the receive reports the error (as in_error), and SO_ERROR taking
        it first would make a reset look like an orderly end."""
        self._host_error = False
        if self._tx_done:
            return False
        err = host.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            return False
        self._tx_done = True
        ring.set_out_error(-_errno.from_host_errno(err))
        logger.debug("%r: host socket failed after the end of the stream: %s",
                     self, _errno.name_of(_errno.from_host_errno(err)))
        return True

    def _protocol_error(self, ring: DataRing, host: socket.socket, exc: Exception) -> None:
        """Impossible indexes: this socket stops, the others carry on."""
        self.frontend.ratelimit.log(
            logger, logging.WARNING, "dom%d socket %#x: data ring protocol error, socket "
            "stopped: %s", self.frontend.domid, self.id, exc)
        self._rx_done = self._tx_done = True
        ring.set_in_error(-_errno.EINVAL)
        ring.set_out_error(-_errno.EINVAL)
        try:
            host.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _finish_connect(self) -> bool:
        """Called by the Work while CONNECTING: True once connected."""
        host = self.host
        assert host is not None
        err = host.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            try:
                host.getpeername()
            except OSError:
                return False  # still in progress (woken by something else)
            # Before the CONNECT is taken: if epoll_ctl fails, _fail
            # finds it still to be answered.
            self._watch_write_space(host, False)
            with self._lock:
                # Always CONNECTING today (teardown waits for us): kept against a future caller.
                if self.state is not SockState.CONNECTING:
                    return False
                self.state = SockState.CONNECTED
                request, self.connect_request = self.connect_request, None
            if request is not None:
                self.frontend.respond(request, 0)
            return True
        # Failed: answer, and give the id back to the NEW state so that the
        # frontend may retry or release it.
        with self._lock:
            request, self.connect_request = self.connect_request, None
        ret = _errno.from_host_errno(err)
        logger.debug("%r: connect to %s failed: %s", self, self.remote, _errno.name_of(ret))
        self.frontend.connect_failed(self, request, -ret)
        return False

    # -- teardown ---------------------------------------------------------------

    def _flush_out(self, host: socket.socket) -> bytes:
        """At teardown, with the Work stopped: send what the out ring still
        holds, as far as the host socket takes it at once, and return a
        copy of the rest for the lingerer (see :mod:`pvcalls._linger`): the
        ring is unmapped next.  Nothing once sending failed."""
        ring = self.ring
        if ring is None or self._tx_done:
            return b""
        try:
            self._tx(ring, host)
        except (OSError, KeyError, ValueError):
            # Not the send (_tx takes its errors): the watch for room a
            # full host socket asks for (or its end), of no use now, and
            # refused (KeyError) to the flush a teardown cut short left,
            # the host socket unwatched by then.  The lingerer still gets
            # the rest.
            logger.debug("%r: watching for room at release failed", self, exc_info=True)
        if self._tx_done:
            return b""
        try:
            views = ring.out_ring.readable()
        except RingError as exc:
            # Broken since _tx read them: said as any other time.
            self._protocol_error(ring, host, exc)
            return b""
        try:
            return b"".join(views)  # the one copy, of at most a ring
        finally:
            del views

    def teardown(self, *, from_work: bool = False, into: list[Request] | None = None) -> None:
        """Stop the Work and release everything: host socket, event channel,
        data ring, CPU slot.  The CONNECT still waiting for its answer, if
        any, is appended to ``into`` (the caller answers it) as it is taken:
        returned, it would be lost to an interrupt as this returns.  Without
        ``into`` it is dropped: for callers that know there is none (the
        Work's connect_failed took it first, an id_new has none) or that
        answer nothing (the frontend's close()).  Idempotent.

        From the command processing: the Work is disabled and cancelled
        first, so that it is neither running nor queued while the pages go.
        From the Work itself (``from_work``): it cannot wait for itself, and
        is disabled so that it will not run again.  So two teardowns never
        overlap: one from the command processing waits for the Work, and
        with it for a teardown the Work is doing.

        Every step is tried whatever became of the ones before it: a step
        that fails (the flush's send or epoll_ctl, say) must not keep the
        ring mapped, the port bound or the CPU slot taken for good.  A
        failure is logged, not raised, as DataRing.close() does with its
        unmapping: every caller still has requests to answer and a table to
        fix.  An interrupt (Ctrl-C in a wait for a callback) is re-raised
        once every step has been tried; what it left held is still recorded
        here, for the next teardown to release, and so is the CONNECT still
        waiting, for the next teardown to hand on.
        """
        # CLOSED after the wait, unlike a listener's: nothing sent to an active id waits for
        # its Work, and one put back by a wait cut short must stay CONNECTED for the next flush.
        if from_work:
            self.disable()
        else:
            self.disable_sync()
        with self._lock:
            # CONNECTED only with the host socket ours: _fail, which
            # releases it otherwise, makes us FAILED.
            if self.state is SockState.CONNECTED:
                self._flush_due = True
            self.state = SockState.CLOSED
        steps = _Steps(self)
        host = self.host
        if host is not None and not self._host_released:
            if self._flush_due:
                rest = steps.run("sending what the out ring holds", self._flush_out, host)
                # Cut short, the flush is done again by the next teardown,
                # from the ring kept mapped for it (what was sent is gone
                # from it, the rest only copied: nothing goes twice, but
                # what an interrupt between _tx's send and its consume()
                # left in the ring).
                # Done, the rest is kept for the teardown that hands the
                # host socket on.
                if not steps.interrupted:
                    self._rest, self._flush_due = rest or b"", False
            steps.run("unwatching the host socket", self._unwatch, host)
            # Not after an interrupted unwatch: the descriptor may still be
            # watched, and its number must not be another file's by then.
            if not steps.interrupted:
                steps.run("closing the host socket", self._release_host, host, self._rest)
                # Not after a step cut short, which may have left it open:
                # the next teardown closes it (or sees the lingerer has it).
                self._host_released = not steps.interrupted
        if self.port is not None:
            steps.run("unbinding the event channel", self._unbind)
        # Not while a flush is due: the ring holds what the next teardown sends.
        if self.ring is not None and not self._flush_due:
            steps.run("unmapping the data ring", self.ring.close)
        if self._placed:
            steps.run("leaving its CPU", self._unplace)
        steps.done()
        # Only now, the Work stopped (nobody else takes it), as a
        # listener's teardown does: taken before a step cut short, the
        # CONNECT was lost with the interrupt, never answered.
        with self._lock:
            request, self.connect_request = self.connect_request, None
            if request is not None and into is not None:
                into.append(request)

    # The steps of teardown; each gives up one resource, or leaves it
    # recorded if interrupted.

    def _unwatch(self, host: socket.socket) -> None:
        if self.events is not None:
            try:
                self.events.remove_fd(host.fileno())
            except (OSError, KeyError, ValueError):
                pass  # not watched: its add_fd failed

    def _release_host(self, host: socket.socket, rest: bytes) -> None:
        """Hand ``host`` to the lingerer with ``rest`` to send, or close it.
        Done again after a Ctrl-C, which may have landed as adopt() took it
        (returned, or not), or as close() returned: the lingerer's is
        neither closed under it nor given it again (``rest`` is kept for
        the teardown done again: see _flush_due), a closed one left alone."""
        fe = self.frontend
        lingerer = fe.backend.lingerer
        if host.fileno() == -1 or lingerer.holds(host):
            return
        try:
            adopted = bool(rest) and lingerer.adopt(
                host, fe.domid, rest, fe.ratelimit, limit=fe.policy.max_sockets)
        except Exception:
            # A bug of ours: the step counts as done (see teardown), so
            # the socket goes now.  Not so after an interrupt, whose
            # teardown done again gives it to adopt() again: closed, it
            # went with the rest, and nobody said so.
            if not lingerer.holds(host):
                host.close()
            raise
        if not adopted:  # refused: not the lingerer's (it held none above)
            host.close()

    def _unbind(self) -> None:
        # The record goes once the unbind is over (see unbind_quietly).
        if self.port is not None and self.events is not None:
            unbind_quietly(self.events, self.port, self._on_event)
        self.port = None

    def _unplace(self) -> None:
        try:
            self.frontend.backend.load_index.release(self)
        except KeyError:
            pass
        self._placed = False


class PassiveSocket(Work):
    """A bound or listening socket; its Work answers ACCEPT and POLL.

    ``_lock`` protects ``waiting`` (the one ACCEPT or POLL in flight, with the
    ActiveSocket reserved for an ACCEPT's ``id_new``) and ``state``.  The
    Work runs on the backend's command workqueue (it maps no data and moves
    no bytes) whenever the listening socket becomes readable or a request
    arrives.  An exception escaping it (a bug of ours) fails the socket:
    see :meth:`_fail`.
    """

    def __init__(self, frontend: _Frontend, sock_id: int, host: socket.socket) -> None:
        super().__init__(PassiveSocket._run)
        self.frontend = frontend
        self.id = sock_id
        self.host = host
        self.state = SockState.BOUND
        self._lock = threading.Lock()
        self.waiting: tuple[Request, ActiveSocket | None] | None = None
        # Whether the host socket may be in the dispatcher's epoll set:
        # set by LISTEN before add_fd, cleared once remove_fd says it is
        # not.  Set on a socket that is still BOUND, it may be stale (an
        # undo cut short as remove_fd returned, or by a Ctrl-C inside it),
        # and the next LISTEN asks the dispatcher.  Changed by LISTEN (and
        # its undo), read by teardown, both from the command processing,
        # one at a time (no lock), and cleared by the Work failing, which
        # runs only once LISTEN has set it (ACCEPT and POLL wait for
        # LISTENING).
        self._registered = False
        self._torn_down = False

    def __repr__(self) -> str:
        return f"<PassiveSocket dom{self.frontend.domid} id={self.id:#x} {self.state.value}>"

    @property
    def local(self) -> tuple[str, int] | None:
        try:
            address: tuple[str, int] = self.host.getsockname()
        except OSError:
            return None
        return address

    def listen(self, backlog: int) -> None:
        """LISTEN: watch the host socket, then have it listen.  A failure
        leaves the socket as it was (bound, or listening if it was): a
        host socket's listen() cannot be undone, so it comes last, after
        the step that may fail (epoll out of memory or of watches), and
        its own failure (EADDRINUSE) takes back the watch added here.
        Only then LISTENING, which lets ACCEPT and POLL wait for edges.
        A FAILED socket is refused with EIO, a CLOSED one (a teardown cut
        short) with EINVAL: LISTENING again, it would take ACCEPTs and
        POLLs that its disabled Work never answers."""
        self._check_failed()
        if self.state is SockState.CLOSED:
            raise CommandError(_errno.EINVAL, f"socket {self.id:#x} is closed")
        added = False
        try:
            if self._registered and self.state is SockState.BOUND:
                # A LISTEN that failed set it, and its undo did not clear
                # it: watched or not, only the dispatcher knows.  A Ctrl-C
                # on either side of the answer leaves the record true.
                try:
                    self.frontend.dispatcher.modify_fd(self.host.fileno(), PASSIVE_EVENTS)
                except KeyError:
                    self._registered = False
            if not self._registered:
                # Watched before it listens: the edge of a connection
                # arriving once it does is not missed.  Until then nothing
                # is waiting (ACCEPT and POLL need LISTENING), and an edge
                # runs the Work for nothing.  Recorded before add_fd(), not
                # after: an interrupt as it returned left the descriptor
                # watched with nobody to unwatch it, its number refused to
                # the next socket that got it, this LISTEN's too.  Whether
                # it was watched, _unregister() finds out.
                self._registered = added = True
                self.frontend.dispatcher.add_fd(self.host.fileno(), PASSIVE_EVENTS,
                                                self._on_event)
            self.host.listen(max(0, min(backlog, socket.SOMAXCONN)))
        except BaseException:
            if added:
                self._unregister()
            raise
        with self._lock:
            # Once more under the lock: the Work may have failed meanwhile
            # (a second LISTEN while an ACCEPT waits).
            self._check_failed()
            self.state = SockState.LISTENING

    def _check_failed(self) -> None:
        if self.state is SockState.FAILED:
            raise CommandError(_errno.EIO, f"socket {self.id:#x} failed")

    def _unregister(self) -> None:
        """Stop watching the host socket (before it is closed).  If that
        fails, ``_registered`` stays set and teardown tries again."""
        try:
            self.frontend.dispatcher.remove_fd(self.host.fileno())
        except KeyError:
            pass  # not watched: the add_fd() that LISTEN recorded failed
        except (OSError, ValueError):
            logger.exception("%r: cannot stop watching the host socket", self)
            return
        self._registered = False

    def wait(self, request: Request, new: ActiveSocket | None) -> None:
        """Make ``request`` (ACCEPT with ``new``, or POLL) the one in flight.

        Raises CommandError(EINTR) if one is already in flight: like Linux's
        backend, one ACCEPT or POLL at a time per passive socket, which bounds
        what a frontend can pin (mapped rings) per socket to one; EIO once
        the socket failed.
        """
        with self._lock:
            self._check_failed()
            if self.waiting is not None:
                raise CommandError(
                    _errno.EINTR,
                    f"{PVCALLS_COMMANDS[self.waiting[0].cmd]} already in flight on {self.id:#x}")
            self.waiting = (request, new)
        self.kick()

    def _on_event(self, *_: object) -> None:
        self.kick()

    def kick(self) -> None:
        self.frontend.backend.cmd_wq.queue_work(self)

    def _run(self) -> None:
        with self._lock:
            waiting = self.waiting
        if waiting is None:
            return
        request, new = waiting
        try:
            ret = self._serve(request, new)
        except Exception as exc:
            self._fail(request, new, exc)
            return
        if ret is None:
            return
        self.frontend.respond(request, ret)
        if ret == 0 and new is not None:
            # Only now: a RELEASE of ``new`` that finds ``parent`` set
            # waits for this run to end (see _Frontend._cancel_accept), so
            # it neither tears ``new`` down under start_accepted nor is
            # answered before the ACCEPT.
            new.parent = None
            new.kick()  # data may have arrived before we were watching

    def _serve(self, request: Request, new: ActiveSocket | None) -> int | None:
        """The POLL (``new`` None) or ACCEPT in flight: its answer, once it
        is taken from ``waiting``; None while there is nothing to answer,
        or if someone else took it."""
        if self.state is SockState.FAILED:
            # Taken in while the run before this one was failing (from
            # then on they are refused): the host socket is closed, and
            # its accept() would say EBADF.
            if not self._take(request):
                return None
            if new is not None:
                self.frontend.accept_failed(new)
            return -_errno.EIO
        if new is None:  # POLL
            if not _readable(self.host) or not self._take(request):
                return None
            return 0
        try:
            conn, address = self.host.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if not self._take(request):
                return None
            logger.debug("%r: accept failed: %s", self, exc)
            self.frontend.accept_failed(new)
            return -_errno.from_oserror(exc)
        if not self._take(request):  # never today: see _take
            conn.close()
            return None
        try:
            new.start_accepted(conn, address)
        except OSError as exc:
            # Not watchable (epoll out of memory or of watches): the ACCEPT
            # fails as one whose accept() failed, rather than go unanswered.
            logger.debug("%r: cannot take over an accepted connection: %s", self, exc)
            self.frontend.accept_failed(new)
            conn.close()  # if start_accepted failed before new held it
            return -_errno.from_oserror(exc)
        except BaseException:
            if new.host is not conn:  # else new's teardown closes it
                conn.close()
            raise
        return 0

    def _fail(self, request: Request, new: ActiveSocket | None, exc: Exception) -> None:
        """The Work raised ``exc`` serving ``request``: a bug of ours (or
        the host's), after which the socket cannot be trusted to answer
        ACCEPT or POLL.  The request is answered -EIO, whether or not this
        run took it from ``waiting`` already (only a run of this Work takes
        it while the Work is enabled), an ACCEPT's ``new`` is given up, and
        the host socket closed; from now on the socket is FAILED and ACCEPT,
        POLL and LISTEN get EIO, until the guest releases it as any socket.
        Logged with the traceback, through the guest's rate limit."""
        fe = self.frontend
        fe.ratelimit.log(logger, logging.ERROR,
                         "dom%d socket %#x: serving the listening socket failed, socket "
                         "stopped (EIO)", fe.domid, self.id, exc_info=exc)
        with self._lock:
            self.state = SockState.FAILED
            if self.waiting is not None and self.waiting[0] is request:
                self.waiting = None
        # The guest is told last, of a socket that is stopped already.
        steps = _Steps(self)
        if new is not None:
            steps.run("giving up the ACCEPT's socket", fe.accept_failed, new)
        if self._registered:
            steps.run("unwatching the host socket", self._unregister)
        steps.run("closing the host socket", self.host.close)
        steps.run("answering the request", fe.respond, request, -_errno.EIO)
        steps.done()

    def _take(self, request: Request) -> bool:
        with self._lock:
            # Never false today (whoever else takes `waiting` waits for us): kept for later callers.
            if self.waiting is None or self.waiting[0] is not request:
                return False
            self.waiting = None
            return True

    def teardown(self, into: list[tuple[Request, ActiveSocket | None]] | None = None) -> None:
        """Stop the Work, close the host socket.  The ACCEPT/POLL still in
        flight, if any, is appended to ``into`` (the caller answers it and
        releases its socket) as it is taken: returned, it would be lost to
        an interrupt as this returns.  Without ``into`` it is dropped, for
        the frontend's close(), which answers nothing.  Idempotent.

        As ActiveSocket.teardown: a step that fails (the host socket's
        close(), which lets go of the descriptor all the same) is logged,
        not raised, and the one in flight is still handed on, for the guest
        to be answered; an interrupt is re-raised once every step has been
        tried, and leaves the one in flight here, for the next teardown.
        """
        # CLOSED before the wait: one cut short (Ctrl-C) keeps its disable
        # (the caller's), and the socket is put back, where an ACCEPT or
        # POLL taken as LISTENING would wait for a run that never comes.
        # (A run failing meanwhile makes it FAILED: refused too.)
        with self._lock:
            self.state = SockState.CLOSED
        self.disable_sync()
        # Torn down once the host socket is closed, not before: a teardown
        # cut short (Ctrl-C) is done again by the next.  Closed, its
        # fileno() is -1, which no remove_fd() finds.
        if not self._torn_down:
            steps = _Steps(self)
            if self._registered:
                steps.run("unwatching the host socket", self._unwatch)
            # Not after an interrupted unwatch: the descriptor may still be
            # watched, and its number must not be another file's by then.
            if not steps.interrupted:
                steps.run("closing the host socket", self.host.close)
                self._torn_down = not steps.interrupted
            steps.done()
        # Only now, the Work disabled (nobody else takes it): a teardown cut
        # short leaves it to the next.
        with self._lock:
            waiting, self.waiting = self.waiting, None
            if waiting is not None and into is not None:
                into.append(waiting)

    def _unwatch(self) -> None:
        try:
            self.frontend.dispatcher.remove_fd(self.host.fileno())
        except (OSError, KeyError, ValueError):
            pass  # not watched


def _connected(sock: socket.socket) -> bool:
    """Whether a non-blocking connect in progress has completed: the socket
    has a peer (a failed connect has none).

    Not SO_ERROR: reading it takes the socket's pending error.  A reset
    arriving just after the connect completed would be taken here, leaving
    a socket with no peer and no error, which no later event reports: its
    CONNECT would never be answered (and its data path would see an EOF,
    not the reset).
    """
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))

