"""The simulated hypervisor: grant tables and event channels of every domain.

One service thread owns all state.  Each domain has a listening socket,
``<run_dir>/domains/<domid>/hypervisor`` (next to its XenStore socket);
whatever connects there acts as that domain (see :mod:`xenback.sim._proto`).
Every request is validated against the state before anything changes, so a
hostile or buggy domain gets an errno back and never disturbs the service or
other domains.

Grants.  A share allocates a sealed memfd (it can neither shrink nor grow,
so a mapper never meets SIGBUS), returns it to the granter and enters one
grant entry per page into the granter's table.  A map request names the
granter and refs; each must be granted by that domain to the caller, and
writable if the caller wants to write.  The mapper receives descriptors to
``mmap``: a read-only grant is handed out as a descriptor opened
``O_RDONLY``, so no writable mapping of it can exist.  An entry whose
access was ended (unshare, handle closed, domain destroyed) is freed when
its last mapping is gone, as Linux's deferred ``gnttab_end_foreign_access``.

Event channels.  Each bound port is a pipe the service creates: its read
end goes to the handle that bound the port (it is the port's pending bit:
readable == pending), the service keeps a write end and, once the port is
connected, the peer handle gets a write end of its own and notifies by
writing one byte without involving the service.  Every party gets its own
open file description, so nobody can change another's O_NONBLOCK and make
it block.  Connecting, unbinding and domain death go through the service,
which tells the other end with a pushed message and fires its port.  A port
whose peer went gets a new pipe (its read end comes with that message): a
write end of the old one, kept by a dead or hostile domain's process, fires
nothing any more.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import functools
import heapq
import itertools
import logging
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workqueue import shown
from xenback.platform import (
    DOMID_FIRST_RESERVED,
    EVTCHN_PORT_MAX,
    MAX_PAGES_PER_REQUEST,
    PAGE_SIZE,
)
from xenback.ratelimit import RateLimit

from ._heldlog import EMITTER_WAIT, emit, log, records_held, records_kept
from ._proto import (
    MAX_FDS,
    MAX_MESSAGE,
    MSG_DONTWAIT,
    Message,
    close_fds,
    decode,
    raise_nofile_limit,
    recv_message,
    send_message,
)
from ._unix import listen_error

logger = logging.getLogger(__name__)


#: Xen reserves the first grant refs for the toolstack (console, xenstore).
GNTTAB_NR_RESERVED_ENTRIES = 8
#: Grant entries a domain may have at once (Xen's default max_grant_frames
#: of 64 holds 32768 v1 entries).
MAX_GRANTS_PER_DOMAIN = 32768
#: Event channel ports a domain is given, numbered 1 to this (the 2-level
#: ABI's on 64-bit guests), within what the platform takes
#: (EVTCHN_PORT_MAX, the FIFO ABI's): past it, a port is one not bound.
MAX_PORTS_PER_DOMAIN = 4095
#: The last domid of a domain.
_DOMID_MAX = DOMID_FIRST_RESERVED - 1
#: Open handles (connections) per domain, live share requests per domain
#: (each holds a descriptor in the service) and pages one handle may have
#: mapped at once: what a hostile domain can make the service hold.
MAX_HANDLES_PER_DOMAIN = 256
MAX_SHARES_PER_DOMAIN = 2048
MAX_MAPPED_PAGES_PER_HANDLE = 65536
#: Pages one domain may have mapped at once, over all its handles: Xen's
#: maptrack table, one 16-byte struct grant_mapping per mapped page, holds
#: 256 entries per 4 KiB frame, and gnttab_max_maptrack_frames (the default
#: of xl.cfg's max_maptrack_frames) is 1024 frames unless configured.  Xen
#: refuses a map beyond it (GNTST_no_space); here that is ENOSPC, as for
#: the per-handle bound.  Without it, MAX_HANDLES_PER_DOMAIN handles could
#: make the service hold 256 * 65536 mapping records for one domain.
MAX_MAPTRACK_FRAMES = 1024
MAPTRACK_ENTRIES_PER_FRAME = 256
MAX_MAPPED_PAGES_PER_DOMAIN = MAX_MAPTRACK_FRAMES * MAPTRACK_ENTRIES_PER_FRAME

_FIRE = b"\x00"
#: What running out of descriptors makes accept, pipe2, memfd_create... fail with.
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
#: How long a listener stays unwatched when not even the reserve descriptor
#: is left to refuse its backlog with (it would stay readable and spin the loop).
_ACCEPT_RETRY = 0.1
#: The longest error text a reply carries (a message holds 64 KiB).
_ERROR_TEXT_MAX = 1024
#: What a handle accepted only to be closed for want of a descriptor is
#: told (see _proto.py).
_REFUSED: Message = {
    "event": "refused",
    "errno": errno.EMFILE,
    "error": "the hypervisor service is out of descriptors",
}
#: What a handle past its domain's MAX_HANDLES_PER_DOMAIN is told: EMFILE,
#: as for one more open file past a process's limit, or one more inotify
#: instance past a user's (Linux's errno for a per-owner count of open
#: handles; ENFILE is for the whole system's).
_TOO_MANY_HANDLES: Message = {
    "event": "refused",
    "errno": errno.EMFILE,
    "error": f"the domain has {MAX_HANDLES_PER_DOMAIN} handles open, the most one may have",
}


#: ``control(op, args, reply)`` performs a dom0 request to create
#: (``args["name"]``) or destroy (``args["domid"]``) a domain.  It is called
#: on the service thread and must not block: it calls ``reply(message)``
#: later, from any thread, or raises :class:`RequestError` to refuse the
#: request at once.
ControlHandler = Callable[[str, dict[str, Any], Callable[["Message"], None]], None]


class RequestError(Exception):
    """A request was refused; carries the errno for the reply."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


# -- state ------------------------------------------------------------------
#
# Ownership: the service owns every descriptor stored below and closes it
# exactly once, when the object holding it is freed, taking it off the
# object first (-1, or None where the field may be empty): a number left
# behind could be closed again after the kernel gave it to another file.


@dataclass(eq=False)
class _Memory:
    """One shared-memory file backing the pages of one share request."""

    table: _GrantTable
    fd: int  # -1 once closed
    users: int  # grant entries still referring to this file

    def put(self) -> None:
        self.users -= 1
        if self.users == 0:
            fd, self.fd = self.fd, -1
            self.table.files -= 1
            os.close(fd)


@dataclass(eq=False)
class _Grant:
    """One grant entry.

    Invariant: it is in ``table.entries`` exactly while ``owner`` is set
    (access not ended) or ``maps`` > 0 (somebody still maps it); it is in
    ``owner.shares`` exactly while ``owner`` is set.
    """

    table: _GrantTable
    ref: int
    grantee: int
    writable: bool
    memory: _Memory
    page: int
    owner: _Conn | None  # the sharing handle; None once access was ended
    maps: int = 0


@dataclass(eq=False)
class _GrantTable:
    """The grant entries one domain created; outlives the domain while mapped."""

    domid: int
    entries: dict[int, _Grant] = field(default_factory=dict)
    free_refs: list[int] = field(default_factory=list)  # heap of reusable refs
    next_ref: int = GNTTAB_NR_RESERVED_ENTRIES
    files: int = 0  # live _Memory objects (each holds a descriptor here)

    def alloc_ref(self) -> int:
        if self.free_refs:
            return heapq.heappop(self.free_refs)
        ref = self.next_ref
        self.next_ref += 1
        return ref

    def free(self, grant: _Grant) -> None:
        del self.entries[grant.ref]
        heapq.heappush(self.free_refs, grant.ref)
        grant.memory.put()


@dataclass(eq=False)
class _Port:
    """One bound port.  Invariant: ``a.remote is b`` iff ``b.remote is a``."""

    domid: int
    port: int
    owner: _Conn
    wfd: int  # the service's write end of the port's pipe: a byte fires the port; -1 once freed
    remote_domid: int
    remote: _Port | None = None  # the connected peer, None while unbound
    # The read end of a new pipe (wfd's) not yet sent to the owner: made
    # when the peer went, so that write ends the peer kept fire nothing.
    fresh_r: int | None = None


@dataclass(eq=False)
class _Domain:
    domid: int
    name: str
    xenstore_path: str
    listener: socket.socket
    socket_path: Path
    grants: _GrantTable
    ports: dict[int, _Port] = field(default_factory=dict)
    conns: set[_Conn] = field(default_factory=set)
    mapped: int = 0  # pages in the maps of all its handles (its maptrack)
    # What the domain can make the service log at will (handles refused).
    warnings: RateLimit = field(init=False)

    def __post_init__(self) -> None:
        self.warnings = RateLimit(f"hypervisor: domain {self.domid}")


@dataclass(eq=False)
class _Conn:
    domain: _Domain
    sock: socket.socket
    shares: set[_Grant] = field(default_factory=set)
    maps: dict[int, list[_Grant]] = field(default_factory=dict)
    mapped: int = 0  # pages in maps
    ports: set[_Port] = field(default_factory=set)
    # Ports of this handle whose news (bound, unbound) waits for room in
    # the socket, in order; the socket is watched for writing meanwhile.
    stale: dict[_Port, None] = field(default_factory=dict)
    closed: bool = False


# -- request argument checks --------------------------------------------------


def _int_arg(msg: Message, key: str, lo: int, hi: int) -> int:
    value = msg.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise RequestError(errno.EINVAL, f"{key!r} must be an integer in [{lo}, {hi}]")
    return value


def _bool_arg(msg: Message, key: str) -> bool:
    value = msg.get(key)
    if type(value) is not bool:
        raise RequestError(errno.EINVAL, f"{key!r} must be true or false")
    return value


def _refs_arg(msg: Message) -> list[int]:
    refs = msg.get("refs")
    if not isinstance(refs, list) or not 1 <= len(refs) <= MAX_PAGES_PER_REQUEST:
        raise RequestError(
            errno.EINVAL, f"'refs' must be a list of 1..{MAX_PAGES_PER_REQUEST} grant refs"
        )
    if any(type(r) is not int or r < 0 for r in refs):
        raise RequestError(errno.EINVAL, "grant refs must be non-negative integers")
    return refs


class Hypervisor:
    """Grant tables and event channels for the domains of one host.

    The host adds and removes domains (:meth:`add_domain`,
    :meth:`remove_domain`); domains, in this process or any other, reach
    the service through :func:`domain_socket`.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        # _lock protects every field below and all the state reachable from
        # them.  Rule: the service thread holds it while it handles one event;
        # host calls hold it while they touch the state, and let go of it
        # before they wait for the service thread (stop()'s join,
        # remove_domain()'s future) or a removal's (_uninterrupted), which
        # need it.  Nothing blocks under it: sockets are non-blocking, and
        # a peer that cannot take a message is dropped instead of waited
        # for; the service thread emits no record under it (see _serve).
        self._lock = threading.Lock()
        self._domains: dict[int, _Domain] = {}
        # An object that closes its epoll when dropped: a Hypervisor lost
        # as it is made (a Ctrl-C as it returns) leaves nothing open.  The
        # plain descriptors, which nobody would close then, start() makes.
        self._selector = selectors.DefaultSelector()
        # The wake-up pipe (start() makes it, -1 until then and once closed).
        self._wake_r = self._wake_w = -1
        self._handles = itertools.count(1)
        self._doomed: list[_Conn] = []
        # remove_domain()'s requests for the service thread, with the
        # future each caller waits on (see remove_domain).  By domain, not
        # domid: one removed and added again before its turn is not it.
        self._removals: list[tuple[_Domain, concurrent.futures.Future[None]]] = []
        self._control: ControlHandler | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Whether the service thread serves (under _lock): set as it
        # starts, cleared as it ends, of a bug too.  remove_domain() asks it
        # only then; a dead one would leave its caller waiting for ever.
        self._serving = False
        # Whether the service thread emits records (under _lock): it is
        # past _lock then, and may wait for a lock of logging's that the
        # main thread holds (see stop).  Set for good once it is ending so.
        self._emitting = False
        # The service thread's last records, for stop() that joined it to
        # emit (see _serve): emitted by that thread, its join would wait
        # for them.  So are a removal's thread's (see _uninterrupted), and
        # those its caller was cut short emitting.
        self._unsaid: list[logging.LogRecord] = []
        # Whether a stop() was cut short joining the service thread (under
        # _lock): that thread emits its last records itself then, as
        # nobody may join it again.  Cleared by the next stop().
        self._join_cut_short = False
        # Out of descriptors, accept() fails and leaves the connection in
        # the backlog: the listener stays readable (the loop would spin)
        # and the client waits forever for its first reply.  Closing this
        # spare descriptor lets the service accept such a connection, tell
        # it why and close it at once, so that the client fails instead
        # (EMFILE: the host is there, only short for now).  start() opens
        # it; -1 while there is none.
        self._reserve = -1
        # Listeners unwatched because even the reserve is gone; watched
        # again at _accept_retry_at.
        self._accept_paused: list[_Domain] = []
        self._accept_retry_at = 0.0
        # A hostile domain can run the service out of descriptors at will:
        # say so, but not once per request.
        self._fd_warnings = RateLimit("hypervisor")
        # Removals' threads whose caller a Ctrl-C took out of its wait (see
        # _uninterrupted), for stop() to join.  Not under _lock, which they
        # may hold: added to by +=, taken off by stop(), steps no call
        # splits.
        self._removers_left: list[threading.Thread] = []
        # Whether such a thread emits what it logged itself (True), or
        # hands it to stop(), which joins it (False): decided under
        # _removers_lock by whichever of the two comes first (see stop),
        # given back (True) by a stop() cut short in the join, and dropped
        # by stop() once it is done with the thread.  Not under _lock,
        # which a removal holds as long as it runs: a stop() cut short
        # would wait for it on its way out.  Rule: nothing is waited for
        # under _removers_lock, and it is taken last.
        self._removers_emit: dict[threading.Thread, bool] = {}
        self._removers_lock = threading.Lock()

    # -- host interface ------------------------------------------------------

    def start(self) -> None:
        """Make the service's descriptors and start its thread.

        Failing (out of descriptors) or cut short (a Ctrl-C) before it
        launches the thread, it takes back what it made and may be called
        again; from there on stop() takes everything back, whether that
        thread ever runs or not (see _serve).  RuntimeError once stopping
        or started.
        """
        with self._lock:
            if self._stopping:
                raise RuntimeError("the host is stopping")
            if self._thread is not None:
                raise RuntimeError("the hypervisor service is started already")
        # What an undo cut short by a second Ctrl-C left (stop() takes it
        # back too): made again below, it was lost.
        self._unmake()
        raise_nofile_limit()
        # Each descriptor is recorded by the call that makes it (list.extend()
        # stores what map() got before control is back in Python code):
        # with ``r, w = os.pipe2()``, a Ctrl-C as pipe2 returned would lose it.
        pipes: list[tuple[int, int]] = []
        reserves: list[int] = []
        try:
            pipes.extend(map(os.pipe2, (os.O_NONBLOCK | os.O_CLOEXEC,)))
            self._wake_r, self._wake_w = pipes[0]
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
            try:
                reserves.extend(map(os.open, (os.devnull,), (os.O_RDONLY | os.O_CLOEXEC,)))
            except OSError:
                pass  # none to spare: the service does without until one is free
            self._reserve = reserves[0] if reserves else -1
            thread = threading.Thread(
                target=self._serve, name=f"xenback-sim-hypervisor:{self.run_dir}", daemon=True
            )
        except BaseException:
            # Held by the attributes first, with no call in between (nothing
            # can land there), as stop() expects: an undo cut short by a
            # second Ctrl-C leaves the rest to stop() or the next start().
            if pipes and self._wake_r < 0:
                self._wake_r, self._wake_w = pipes[0]
            if reserves and self._reserve < 0:
                self._reserve = reserves[0]
            self._unmake()
            raise
        self._thread = thread
        # Marked serving inside the try: a Ctrl-C as the lock is let go
        # left it serving with no thread, and remove_domain() waiting for
        # one for ever.
        try:
            with self._lock:
                self._serving = True
            thread.start()
        except BaseException:
            with self._lock:
                self._serving = False
            # Asked for while it was marked serving: the thread may never
            # run, and stop() may never come; their callers wait.  Cut
            # short before, they wait for stop() or that thread after all;
            # and with no thread to be had for them (as for the service's
            # perhaps), for stop().
            try:
                self._uninterrupted(self._run_queued_removals,
                                    refused="answer the removals asked for")
            except RuntimeError:
                pass  # nothing done: stop() answers them
            raise

    def _run_queued_removals(self) -> None:
        with self._lock:
            self._run_removals()

    def _unmake(self) -> None:
        """Take back what a start() cut short before its thread made; may
        be cut short and done again."""
        if self._wake_r >= 0:
            try:
                self._selector.unregister(self._wake_r)
            except KeyError:
                pass  # not watched (yet, or any more)
        self._close_descriptors()

    def _close_descriptors(self) -> None:
        """Close the wake-up pipe and the reserve, once: a call cut short
        is made again, and the numbers of closed descriptors may belong to
        other files by then.  So each leaves its attribute in a step that
        calls nothing, then is closed."""
        wake_r, self._wake_r = self._wake_r, -1
        if wake_r >= 0:
            os.close(wake_r)
        wake_w, self._wake_w = self._wake_w, -1
        if wake_w >= 0:
            os.close(wake_w)
        reserve, self._reserve = self._reserve, -1
        if reserve >= 0:
            os.close(reserve)

    def stop(self) -> None:
        """Join the service thread, destroy every domain, free everything.

        One emitting records is waited for :data:`EMITTER_WAIT` at most:
        the caller may be a signal's handler come in where the main thread
        held the lock of a handler those go to, which the thread then
        waits for as long as stop() would wait for it.  It touches nothing
        but _lock from there on, and ends once they are emitted, after
        stop() returns then; otherwise (all but that deadlock) within the
        wait, so that no thread of the service outlives stop().

        RuntimeError if the main thread has no thread to be had to remove
        the domains in (see _uninterrupted): they are left whole, and the
        next stop() goes on.

        Cut short (a Ctrl-C), it emits on its way out what those threads
        handed it, and the service thread what it has left itself: nothing
        says stop() will be called again.  Left to the next, they were
        lost without one.  The next goes on with what is left."""
        # Whether this stop() told the service thread it joins it: only
        # then need a stop() cut short tell it otherwise (see below).
        told = False
        try:
            with self._lock:
                self._stopping = True  # the thread serves nothing more from here
                self._join_cut_short = False
                told = True
                joined = not self._emitting
            if self._thread is not None:
                try:
                    os.write(self._wake_w, b"x")
                except BlockingIOError:
                    pass  # the pipe is full of wake-ups the thread has yet to read
                # Not if a start() cut short never started it (join() refuses
                # one not started), or its start() has not got it going yet:
                # it sees _stopping then, and ends without serving (_serve).
                if self._thread.is_alive():
                    self._thread.join(None if joined else EMITTER_WAIT)
                self._thread = None
            self._uninterrupted(self._remove_all, refused="remove the domains")
            # None outlives stop(); each has found its domains gone, or
            # removed them, by the time _remove_all had the lock.  But one
            # emitting what it logged, its caller gone, may wait for a lock
            # of logging's this thread holds, as the service thread may: not
            # waited for past EMITTER_WAIT then.
            while self._removers_left:
                worker = self._removers_left[0]
                with self._removers_lock:
                    joined = not self._removers_emit.setdefault(worker, False)
                if worker.is_alive():  # not if a Ctrl-C cut short its start()
                    worker.join(None if joined else EMITTER_WAIT)
                del self._removers_left[0]
                # Decided: neither reads it again (a Ctrl-C before this
                # leaves one entry, not a thread to wait for).
                self._removers_emit.pop(worker, None)
            self._selector.close()  # may be done again
            self._close_descriptors()
        except BaseException:
            # The service thread, if not decided yet, emits them itself,
            # unless a stop() comes again first.  Only if this stop() told
            # it otherwise, and was cut short before it joined it: _lock
            # may be held by a removal's thread (_uninterrupted) a Ctrl-C
            # left, which it would wait for.  Past the join, that thread
            # may be this Ctrl-C's; before the telling, an earlier one's in
            # remove_domain(), the wait for it what this one cut short.
            # Not told, it emits its own already: a stop() cut short
            # leaves _join_cut_short set, or the thread joined.
            if told and self._thread is not None:
                with self._lock:
                    self._join_cut_short = True
            # So do the removals' threads it claimed: nothing says stop()
            # is called again.  One that handed them over already left
            # them to the finally below.
            with self._removers_lock:
                for worker in self._removers_left:
                    self._removers_emit[worker] = True
            raise
        finally:
            # In place, one at a time: a Ctrl-C landing here leaves the
            # rest to the next stop(), none emitted twice (see emit).
            # Kept instead by a caller that keeps its own (the host's
            # close() in another thread, under the host's lock).
            emit(self._unsaid)

    def _remove_all(self) -> None:
        with self._lock:
            for domid in list(self._domains):
                self._remove_domain(domid)
            # Asked for as the thread stopped: answered, their domains gone.
            self._run_removals()

    def add_domain(self, domid: int, name: str, xenstore_path: str = "") -> Path:
        """Make ``domid`` known and listen for its handles; returns its socket."""
        path = domain_socket(self.run_dir, domid)
        # What its undo logs, past _lock: a toolstack's thread serving
        # dom0's domain_create calls it (see _heldlog).
        with records_held(), self._lock:
            if self._stopping:
                raise RuntimeError("the host is stopping")
            if domid in self._domains:
                raise ValueError(f"domain {domid} already exists")
            # Held by the list as socket() returns it (list.extend() stores
            # what map() got before control is back in Python code): with
            # ``listener = socket.socket()``, a Ctrl-C as it returned left
            # the socket to the collector (a ResourceWarning).
            made: list[socket.socket] = []
            added = False
            try:
                made.extend(map(socket.socket, (socket.AF_UNIX,),
                                (socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC,)))
                listener = made[0]
                # Whoever connects acts as the domain: the user's alone,
                # whatever the umask (bind gives the socket file this mode).
                os.fchmod(listener.fileno(), 0o600)
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                listener.bind(os.fspath(path))
                listener.listen(64)
                listener.setblocking(False)
                dom = _Domain(domid, name, xenstore_path, listener, path, _GrantTable(domid))
                # Watched before it is listed: listed with its listener
                # unwatched (epoll out of memory or of watches, a Ctrl-C in
                # the register), stop() and remove_domain() failed on it.
                self._selector.register(listener, selectors.EVENT_READ, dom)
                self._domains[domid] = dom
                added = True
            except OSError as e:
                raise listen_error(e, path) from e
            finally:
                if not added and made:
                    listener = made[0]
                    # Taken back: unwatched, its socket file gone (nobody
                    # would ever accept on it), closed.  Here, not in a
                    # function a (second) Ctrl-C could cut short as it
                    # starts, and each step in a finally of the one before,
                    # so that one landing as a step returns still lets the
                    # others run.  Left watched, the listener stayed open
                    # until stop(), and the loop found it readable for good
                    # once somebody connected; its file stayed in the run
                    # directory, for attach() to take for a domain.
                    try:
                        try:
                            self._selector.unregister(listener)
                        except KeyError:
                            pass  # not watched yet
                    finally:
                        try:
                            # One call: a Ctrl-C between reading the socket's
                            # name and removing its file would keep the file.
                            # The domid is not listed, so what is at its path
                            # is this listener's, or a killed host's (removed
                            # before binding anyway).
                            os.unlink(path)
                        except OSError as e:
                            # Not bound: not yet, or the path is too long,
                            # its parent no directory...: nothing to remove.
                            if e.errno != errno.ENOENT and listener.getsockname():
                                log(logger).exception(
                                    "hypervisor: cannot remove the socket of a domain not added"
                                )
                        finally:
                            listener.close()
        return path

    def set_control(self, control: ControlHandler | None) -> None:
        """Let dom0 create and destroy domains through ``control``."""
        with self._lock:
            self._control = control

    def set_xenstore_path(self, domid: int, xenstore_path: str) -> None:
        """Record where ``domid`` reaches XenStore (told to attaching processes)."""
        with self._lock:
            self._domains[domid].xenstore_path = xenstore_path

    def remove_domain(self, domid: int) -> None:
        """Destroy ``domid``: close its handles, unbind its ports (peers see
        it), end its grants (freed once nobody maps them).

        Done by the service thread, as any change of its state, while the
        caller waits: a hypercall, which no signal cuts in half.  By the
        caller itself if that thread does not serve, is emitting records,
        or is the caller; in a thread of its own if the caller is the main
        thread (see _uninterrupted), which waits for _lock then, never for
        the service thread: a signal's handler calling, that thread may be
        emitting records to a handler whose lock the main thread holds.
        :class:`ValueError` if there is no such domain; RuntimeError if
        the main thread has no thread to be had for it, the domain left
        whole.  A KeyboardInterrupt in the wait leaves the removal to
        finish without the caller, whose next remove_domain() finds the
        domain gone (ValueError) or waits for the removal again.  It
        removes the domain it found, not whatever has its domid by its
        turn: one removed meanwhile (by stop() or another caller) and
        added again under ``domid`` is spared, and the call returns
        although ``domid`` names a domain.
        """
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            dom = self._domains.get(domid)
            if dom is None:
                raise ValueError(f"no domain {domid}")
            # Not by thread ident: a dead thread's is given to the next one.
            me = threading.current_thread()
            # Not while it emits a round's records either: it may wait
            # for a handler's lock the main thread holds, which then waits
            # for a lock our caller holds (the host's, destroying).  Not
            # emitting now, it runs the removal first thing next round.
            if (self._serving and not self._emitting and me is not self._thread
                    and me is not threading.main_thread()):
                self._removals.append((dom, future))
                # Under _lock: stop() closes the pipe under it, after the thread ended.
                try:
                    os.write(self._wake_w, b"x")
                except BlockingIOError:
                    pass  # a wake-up is pending already
                dom = None
        if dom is not None:
            self._uninterrupted(functools.partial(self._remove_listed, dom, future),
                                refused=f"remove domain {domid}")
        future.result()

    def _remove_listed(self, dom: _Domain, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._run_removal(dom, future)

    def _uninterrupted(self, work: Callable[[], None], refused: str) -> None:
        """``work()``, which takes _lock, where no Ctrl-C cuts it short.

        A signal's handler runs in the main thread only: there a Ctrl-C
        landing inside _remove_domain left the domain half removed, off
        the list with its listener, socket file and handles still there,
        for good.  So the main thread runs it in a thread of its own, and
        waits: a Ctrl-C lands in the wait, and the work goes on without
        it, as the service thread's would.  With no thread to be had, a
        RuntimeError saying it could not ``refused``, nothing done: the
        caller asks again later (stop() and start()'s undo too, which did
        it here all the same, where a Ctrl-C left a domain half removed
        for good).  What it logs is emitted, and its failure raised, in
        the caller, as if done there; by its thread once the caller has
        gone (that thread keeps them until then, see _heldlog), or by the
        caller on its way out if the work ended first, the failure logged
        then.  What a Ctrl-C landing as the caller emits leaves, stop()
        emits.  In another thread, where no signal's handler runs, it is
        done in place, what it logs emitted once _lock is let go."""
        if threading.current_thread() is not threading.main_thread():
            with records_held():
                work()
            return
        said: list[logging.LogRecord] = []
        failure: list[BaseException] = []
        # What a caller gone must be told besides: the failure it would
        # have raised.  Made before the work counts as ended, so that the
        # main thread, telling it, makes no call before it is out of reach
        # of a second Ctrl-C (see the except below).
        late: list[logging.LogRecord] = []
        # In which order the work ended (True) and its caller left its wait
        # (False): whichever comes second tells what the work said, once,
        # never lost for a caller gone (list.append() and += are atomic).
        ended: list[bool] = []

        def run() -> None:
            try:
                with records_kept(said):
                    work()
            except BaseException as e:
                failure.append(e)
                with records_kept(late):
                    log(logger).error("hypervisor: failure removing domains", exc_info=e)
            ended.append(True)
            if not ended[0]:
                said.extend(late)
                with self._removers_lock:
                    emits = self._removers_emit.setdefault(worker, True)
                    if not emits:
                        self._unsaid += said  # for stop(), which joins it
                if emits:
                    emit(said)

        worker = threading.Thread(target=run, name=f"xenback-sim-removal:{self.run_dir}",
                                  daemon=True)
        no_thread: list[RuntimeError] = []
        try:
            try:
                worker.start()
            except RuntimeError as e:  # can't start new thread
                no_thread.append(e)
            else:
                # Joined, not just waited for: once stop() returns, no
                # thread of the service's is left.
                worker.join()
        except BaseException:
            # No call before the check (none can land in between).
            ended += [False]
            self._removers_left += [worker]
            if ended[0]:
                # Its thread left them to us: emitted as below, with its
                # failure, as nobody is left to raise it.
                self._unsaid += said + late
                emit(self._unsaid)
            raise
        if no_thread:
            raise RuntimeError(f"no thread to {refused} in, where no Ctrl-C cuts it short"
                               f" ({no_thread[0]})") from no_thread[0]
        # Where stop() finds them before any call a Ctrl-C could land in
        # (one landing in emit() leaves the rest there too): in a list of
        # this call's own, they were lost.
        self._unsaid += said
        emit(self._unsaid)
        if failure:
            raise failure[0]

    def _run_removals(self) -> None:
        """remove_domain()'s requests (under _lock); a domain asked for
        twice (by a call cut short, then again) is removed once.

        Worked through in place, each left queued until it is answered:
        start()'s undo and stop() run this in the thread a Ctrl-C lands
        in when no thread is to be had for it (see _uninterrupted).  Taken
        whole first, the rest were lost to one landing here, their callers
        waiting for ever; answered and left queued, the next call answered
        one again (InvalidStateError).
        """
        while self._removals:
            dom, future = self._removals[0]
            if not future.done():
                self._run_removal(dom, future)
            del self._removals[0]

    def _run_removal(self, dom: _Domain, future: concurrent.futures.Future[None]) -> None:
        """Remove ``dom`` unless it was meanwhile (a domain added since under
        its domid is not it); answer ``future`` (under _lock)."""
        try:
            if self._domains.get(dom.domid) is dom:
                self._remove_domain(dom.domid)
        except Exception as e:
            # A bug: its caller hears of it, the others still go.
            log(logger).exception("hypervisor: failure removing domain %d", dom.domid)
            future.set_exception(e)
        else:
            future.set_result(None)

    def _serve(self) -> None:
        # What it logs under _lock is emitted past it: a signal's handler
        # that came in as the main thread emitted a record, the lock of a
        # handler held, may wait for _lock (or for this thread to end),
        # and this thread for that handler's lock.  So a round's records
        # come out after its replies: a handle refused may hear so before
        # the line saying it is in the log.  What it keeps, it keeps here.
        records: list[logging.LogRecord] = []
        try:
            with self._lock:
                if self._stopping:
                    return  # stopped before it ran (a start() cut short): see stop()
            self._serve_loop(records)
        except BaseException:
            with records_kept(records):
                log(logger).exception("hypervisor: the service thread died")
            raise
        finally:
            with records_kept(records), self._lock:
                self._serving = False
                # Asked for before it died: nobody else would do them.  Not
                # one answered already: a start() whose undo a second
                # Ctrl-C cut short (see _run_removals) may have launched
                # this thread all the same.  Not by _run_removals, which
                # may be the bug it died of.
                removals, self._removals = self._removals, []
                for dom, future in removals:
                    if not future.done():
                        self._run_removal(dom, future)
                said = records.copy()
                records.clear()
                if self._stopping and not self._emitting and not self._join_cut_short:
                    # stop() joins it: emitted here, they could keep the
                    # join waiting for a lock its caller holds.
                    self._unsaid += said
                    said = []
                else:
                    self._emitting = True  # none joins it from here
            emit(said)

    def stats(self) -> dict[str, int]:
        """Counts of live objects, for leak tests: ``domains``, handles
        (``connections``), bound event channel ``ports``, ``grants`` in
        the grant tables (shared, or ended but still mapped), and
        ``mappings``, the grant mappings not unmapped yet (one per
        :meth:`~xenback.platform.GrantTable.map_grant_refs`, whatever
        its number of pages): what a backend that leaks none leaves at 0
        once its devices are gone, while its frontends' grants stay."""
        with records_held(), self._lock:
            # Opening a handle returns once its connection is in the
            # backlog, before the service accepts it: a count (and the
            # service's descriptors) taken right after handles were opened
            # must include them, or they look leaked once accepted.
            for dom in list(self._domains.values()):
                if dom not in self._accept_paused:
                    while self._accept(dom):
                        pass
            tables = {d.grants for d in self._domains.values()}
            conns = self._all_conns()
            tables.update(g.table for c in conns for gs in c.maps.values() for g in gs)
            return {
                "domains": len(self._domains),
                "connections": len(conns),
                "ports": sum(len(d.ports) for d in self._domains.values()),
                "grants": sum(len(t.entries) for t in tables),
                "mappings": sum(len(c.maps) for c in conns),
            }

    # -- service thread ------------------------------------------------------

    def _serve_loop(self, records: list[logging.LogRecord]) -> None:
        while True:
            timeout = None
            if self._accept_paused:
                timeout = max(0.0, self._accept_retry_at - time.monotonic())
            events = self._selector.select(timeout)
            # Kept, the host's control handler's too (which logs through
            # _heldlog as well), to be emitted past _lock (see _serve).
            with records_kept(records), self._lock:
                if self._stopping:
                    return
                if self._accept_paused and time.monotonic() >= self._accept_retry_at:
                    self._resume_accepting()
                if self._removals:
                    self._run_removals()
                for key, mask in events:
                    try:
                        self._dispatch(key.data, mask)
                    except Exception:
                        # A bug, not bad input (that gets an errno).  Drop
                        # what caused it and keep serving everybody else.
                        log(logger).exception("hypervisor: failure serving %r", key.data)
                        if isinstance(key.data, _Conn):
                            self._doomed.append(key.data)
                try:
                    self._reap()
                except Exception:
                    log(logger).exception("hypervisor: failure closing a handle")
                    self._doomed.clear()
                said = records.copy()
                records.clear()
                self._emitting = bool(said)
            if said:
                emit(said)
                with self._lock:
                    if self._stopping:
                        return  # emitting, it was not joined: see stop()
                    self._emitting = False

    def _dispatch(self, data: _Domain | _Conn | None, mask: int) -> None:
        if data is None:
            os.read(self._wake_r, 4096)
        elif isinstance(data, _Domain):
            if data.domid in self._domains:  # not removed earlier in this round
                self._accept(data)
        else:
            if mask & selectors.EVENT_WRITE and not data.closed:
                self._flush(data)
            if mask & selectors.EVENT_READ and not data.closed:
                self._receive(data)

    def _all_conns(self) -> list[_Conn]:
        return [c for d in self._domains.values() for c in d.conns]

    def _accept(self, dom: _Domain) -> bool:
        """Take one connection off ``dom``'s backlog; False if none was taken."""
        try:
            sock, _ = dom.listener.accept()
        except OSError as e:
            if e.errno in _OUT_OF_FDS:
                self._refuse_for_want_of_fds(dom)
            return False  # BlockingIOError after a racing close, ECONNABORTED...
        if len(dom.conns) >= MAX_HANDLES_PER_DOMAIN:
            # The domain decides how often: its own rate limit, so that it
            # neither floods the log nor silences what others cause.
            dom.warnings.log(
                log(logger),
                logging.WARNING,
                "hypervisor: domain %d has %d handles open; refusing another",
                dom.domid,
                len(dom.conns),
            )
            _refuse(sock, _TOO_MANY_HANDLES)
            return True
        sock.setblocking(False)
        conn = _Conn(dom, sock)
        dom.conns.add(conn)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        return True

    def _refuse_for_want_of_fds(self, dom: _Domain) -> None:
        """accept() failed for want of a descriptor: close the connection
        waiting in the backlog, with the reserve's descriptor, rather than
        leave its client waiting and the listener readable."""
        self._warn_fds("refusing a handle of domain %d", dom.domid)
        reserve, self._reserve = self._reserve, -1
        if reserve >= 0:
            os.close(reserve)
            try:
                sock, _ = dom.listener.accept()
            except OSError:
                pass
            else:
                _refuse(sock, _REFUSED)
            self._reserve = _open_reserve()
            return
        # Not even that: stop watching the listener for a while.
        self._selector.unregister(dom.listener)
        if not self._accept_paused:
            self._accept_retry_at = time.monotonic() + _ACCEPT_RETRY
        self._accept_paused.append(dom)

    def _resume_accepting(self) -> None:
        paused, self._accept_paused = self._accept_paused, []
        if self._reserve < 0:
            self._reserve = _open_reserve()
        # (_remove_domain takes a removed domain off the list, under _lock.)
        for dom in paused:
            self._selector.register(dom.listener, selectors.EVENT_READ, dom)

    def _warn_fds(self, what: str, *args: object) -> None:
        self._fd_warnings.log(log(logger), logging.WARNING,
                              "hypervisor: out of descriptors: " + what, *args)

    def _receive(self, conn: _Conn) -> None:
        try:
            data, fds, truncated = recv_message(conn.sock, MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            self._close_conn(conn)
            return
        if not data:
            close_fds(fds)
            self._close_conn(conn)
            return
        op: object = "?"
        # The request's id, echoed in its reply (see _proto.py); none for
        # a packet that is no request.
        request_id: int | None = None
        try:
            if len(data) > MAX_MESSAGE:
                raise RequestError(errno.E2BIG, "message too long")
            try:
                msg = decode(data)
            except ValueError:
                raise RequestError(errno.EINVAL, "a request must be a JSON object") from None
            request_id = _request_id(msg)
            op = msg.get("op")
            if truncated:
                # Whole, but the kernel dropped its descriptors for want of
                # a number here (MSG_CTRUNC): refused as the service out of
                # descriptors is, its id echoed, so that the error answers
                # this request and no other.
                raise OSError(errno.EMFILE, "no descriptor left for those the request carried")
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise RequestError(errno.ENOSYS, f"unknown operation {op!r}")
            result = handler(self, conn, msg, fds)
        except RequestError as e:
            close_fds(fds)
            # Cut: a message may quote the request, which may be as long
            # as a message, and the reply must fit in one.
            self._send(conn, _reply_to(request_id,
                                       {"errno": e.errno, "error": str(e)[:_ERROR_TEXT_MAX]}))
            return
        except OSError as e:
            close_fds(fds)
            if e.errno not in _OUT_OF_FDS:
                log(logger).exception("hypervisor: request %r from domain %d failed",
                                 op, conn.domain.domid)
                self._send(conn, _reply_to(request_id,
                                           {"errno": errno.EIO, "error": "internal error"}))
                return
            # What a domain can cause (ports and shares hold descriptors
            # here), not a bug: an errno, as Linux gives for a full table.
            self._warn_fds("request %r from domain %d refused", op, conn.domain.domid)
            self._send(conn, _reply_to(request_id, {
                "errno": e.errno, "error": "the hypervisor service is out of descriptors"}))
            return
        except Exception:
            close_fds(fds)
            log(logger).exception("hypervisor: request %r from domain %d failed",
                             op, conn.domain.domid)
            self._send(conn, _reply_to(request_id, {"errno": errno.EIO, "error": "internal error"}))
            return
        if result is None:
            return  # answered later (see _reply_later)
        reply, rfds = result
        # Reply descriptors are the service's copies made for this reply.
        try:
            self._send(conn, _reply_to(request_id, reply), rfds)
        finally:
            close_fds(rfds)

    def _send(self, conn: _Conn, msg: Message, fds: list[int] | None = None) -> None:
        """Send without blocking; a connection that cannot take it is dropped."""
        if conn.closed:
            return
        try:
            send_message(conn.sock, msg, fds or (), MSG_DONTWAIT)
        except OSError as e:
            # A handle that does not take its messages is dropped; one that
            # is already gone (EPIPE) just has not been reaped yet.
            level = logging.WARNING if isinstance(e, BlockingIOError) else logging.DEBUG
            log(logger).log(level, "hypervisor: dropping a handle of domain %d: %s",
                       conn.domain.domid, e)
            conn.closed = True
            self._doomed.append(conn)

    def _push(self, port: _Port, peer_w: int | None = None) -> None:
        """Tell ``port``'s owner that its peer changed (``peer_w``: a write
        end of the new peer's pipe, ours to close).

        Its handle reads such news whenever it gets round to it, and any
        other domain can make them, binding and unbinding in a loop: sent
        at once, they would fill the socket and get the handle dropped with
        all its ports.  So news is sent only while the socket polls
        writable (a quarter of its buffer or less unread: a reply always
        has room); otherwise the port is marked stale and its state as it
        then is goes out once there is room (_flush), so a port waits with
        one message at most, however often it changes.
        """
        conn = port.owner
        try:
            if conn.closed:
                return
            if not conn.stale and _has_room(conn.sock):
                self._send_state(port, peer_w)
                return
            if not conn.stale:
                self._selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
            conn.stale[port] = None
        finally:
            if peer_w is not None:
                os.close(peer_w)

    def _flush(self, conn: _Conn) -> None:
        """Send the news of ``conn``'s stale ports while there is room."""
        while conn.stale:
            if not _has_room(conn.sock):
                return
            port = next(iter(conn.stale))
            del conn.stale[port]
            if port in conn.ports:  # else unbound by now: no news for anyone
                self._send_state(port, None)
            if conn.closed:
                return
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _send_state(self, port: _Port, peer_w: int | None) -> None:
        """Send ``port``'s owner whether and to what it is connected, and
        the read end of its new pipe if it has one (``"rfd"``: its index)."""
        fresh = port.fresh_r
        if self._send_news(port, peer_w, fresh) and fresh is not None:
            port.fresh_r = None
            os.close(fresh)

    def _send_news(self, port: _Port, peer_w: int | None, fresh: int | None) -> bool:
        """False if nothing was sent: ``fresh`` waits for the next news."""
        peer = port.remote
        if peer is None:
            msg: Message = {"event": "unbound", "port": port.port}
            if fresh is not None:
                msg["rfd"] = 0
            self._send(port.owner, msg, [] if fresh is None else [fresh])
            return True
        own = None
        if peer_w is None:
            try:
                peer_w = own = _writer(peer)
            except OSError as e:
                # Out of descriptors: the owner cannot notify the peer, as
                # if it had not bound.  The peer's notifications still
                # arrive, unless a new pipe (``fresh``) waits to go with
                # this news: the peer writes to it, unread until the port's
                # next news (not retried: that would spin while descriptors
                # are short).
                self._warn_fds("news of port %d of domain %d lost: %s", port.port, port.domid, e)
                return False
            if peer_w is None:
                return False  # the peer is going away: its unbind will be news
        msg = {"event": "bound", "port": port.port, "domid": peer.domid, "remote_port": peer.port}
        if fresh is not None:
            msg["rfd"] = 1
        try:
            self._send(port.owner, msg, [peer_w] if fresh is None else [peer_w, fresh])
        finally:
            if own is not None:
                os.close(own)
        return True

    def _reap(self) -> None:
        # A loop, not a recursion: closing one handle can doom the next one
        # (its peer, already gone too), and so on along a chain of handles
        # a domain built, deeper than the stack.
        while self._doomed:
            self._close_conn(self._doomed.pop())

    def _close_conn(self, conn: _Conn) -> None:
        """Release everything a handle held, as closing /dev/xen/* does."""
        conn.closed = True
        if conn not in conn.domain.conns:
            return
        conn.domain.conns.discard(conn)
        conn.stale.clear()
        self._selector.unregister(conn.sock)
        conn.sock.close()
        for port in list(conn.ports):
            self._unbind(port)
        for handle in list(conn.maps):
            self._unmap(conn, handle)
        for grant in list(conn.shares):
            self._end_access(grant)
        # What this doomed is closed by the caller's _reap.

    def _remove_domain(self, domid: int) -> None:
        dom = self._domains.pop(domid)
        if dom in self._accept_paused:
            self._accept_paused.remove(dom)  # not watched at the moment
        else:
            self._selector.unregister(dom.listener)
        dom.listener.close()
        try:
            dom.socket_path.unlink()
        except FileNotFoundError:
            pass
        for conn in list(dom.conns):
            self._close_conn(conn)
        self._reap()
        dom.warnings.close(log(logger))  # the count of refusals it was not warned of
        # Unbound ports the domain allocated stay with their handles; those
        # handles were closed above, so nothing is left.
        assert not dom.ports, dom.ports

    # -- grant operations ------------------------------------------------------

    def _op_info(self, conn: _Conn, msg: Message, fds: list[int]) -> tuple[Message, list[int]]:
        _no_fds(fds)
        dom = conn.domain
        return {"domid": dom.domid, "name": dom.name, "xenstore_path": dom.xenstore_path}, []

    def _op_gnt_share(
        self, conn: _Conn, msg: Message, fds: list[int]
    ) -> tuple[Message, list[int]]:
        _no_fds(fds)
        grantee = _int_arg(msg, "domid", 0, _DOMID_MAX)
        count = _int_arg(msg, "count", 1, MAX_PAGES_PER_REQUEST)
        writable = _bool_arg(msg, "writable")
        table = conn.domain.grants
        if len(table.entries) + count > MAX_GRANTS_PER_DOMAIN:
            raise RequestError(errno.ENOSPC, "grant table full")
        if table.files >= MAX_SHARES_PER_DOMAIN:
            raise RequestError(errno.ENOSPC, "too many separate shares; share more pages at once")
        fd = os.memfd_create(
            f"xenback-sim-grant-d{conn.domain.domid}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        )
        # A read-only share stays open to one more seal: the granter adds
        # F_SEAL_FUTURE_WRITE once it has mapped the pages (see _grant.py).
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | (fcntl.F_SEAL_SEAL if writable else 0)
        try:
            os.ftruncate(fd, count * PAGE_SIZE)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            # The granter's own writable descriptor of the pages, made before
            # any grant is entered: out of descriptors, the request fails
            # whole, not with grants left that the granter never heard of.
            granter_fd = os.dup(fd)
        except OSError:
            os.close(fd)
            raise
        memory = _Memory(table, fd, users=count)
        table.files += 1
        refs = []
        for page in range(count):
            ref = table.alloc_ref()
            grant = _Grant(table, ref, grantee, writable, memory, page, conn)
            table.entries[ref] = grant
            conn.shares.add(grant)
            refs.append(ref)
        return {"refs": refs}, [granter_fd]

    def _op_gnt_end(self, conn: _Conn, msg: Message, fds: list[int]) -> tuple[Message, list[int]]:
        _no_fds(fds)
        refs = _refs_arg(msg)
        # All checked before any is ended: a request fails whole or not at all.
        if len(set(refs)) != len(refs):
            raise RequestError(errno.EINVAL, "a grant ref is given more than once")
        grants = []
        for ref in refs:
            grant = conn.domain.grants.entries.get(ref)
            if grant is None or grant.owner is not conn:
                raise RequestError(errno.EINVAL, f"grant ref {ref} was not shared by this handle")
            grants.append(grant)
        for grant in grants:
            self._end_access(grant)
        return {}, []

    def _op_gnt_map(self, conn: _Conn, msg: Message, fds: list[int]) -> tuple[Message, list[int]]:
        _no_fds(fds)
        granter = _int_arg(msg, "domid", 0, _DOMID_MAX)
        refs = _refs_arg(msg)
        writable = _bool_arg(msg, "writable")
        dom = self._domains.get(granter)
        if dom is None:
            raise RequestError(errno.ESRCH, f"no domain {granter}")
        if conn.mapped + len(refs) > MAX_MAPPED_PAGES_PER_HANDLE:
            raise RequestError(errno.ENOSPC, "too many pages mapped through this handle")
        if conn.domain.mapped + len(refs) > MAX_MAPPED_PAGES_PER_DOMAIN:
            raise RequestError(
                errno.ENOSPC,
                f"domain {conn.domain.domid}'s maptrack table is full"
                f" ({MAX_MAPPED_PAGES_PER_DOMAIN} pages mapped over all its handles)",
            )
        me = conn.domain.domid
        grants = []
        for i, ref in enumerate(refs):
            grant = dom.grants.entries.get(ref)
            # The first bad ref, and where among how many (up to 1024):
            # what a caller needs to find it, without the whole list.
            if grant is None or grant.owner is None or grant.grantee != me:
                raise RequestError(errno.EINVAL, f"grant ref {shown(ref)} (refs[{i}] of "
                                                 f"{len(refs)}) of domain {granter} is not "
                                                 f"granted to {me}")
            if writable and not grant.writable:
                raise RequestError(errno.EACCES, f"grant ref {ref} (refs[{i}] of {len(refs)}) "
                                                 f"of domain {granter} is read-only")
            grants.append(grant)
        # One descriptor per distinct file; runs of consecutive pages of one
        # file become one segment [descriptor index, first page, page count].
        index: dict[int, int] = {}
        segments: list[list[int]] = []
        for grant in grants:
            i = index.setdefault(id(grant.memory), len(index))
            last = segments[-1] if segments else None
            if last is not None and last[0] == i and last[1] + last[2] == grant.page:
                last[2] += 1
            else:
                segments.append([i, grant.page, 1])
        if len(index) > MAX_FDS:
            raise RequestError(errno.E2BIG, "refs come from too many separate shares")
        memories = {id(g.memory): g.memory for g in grants}
        out: list[int] = []
        try:
            for key in index:
                mfd = memories[key].fd
                if writable:
                    out.append(os.dup(mfd))
                else:
                    # A descriptor opened read-only: mmap(PROT_WRITE) of it
                    # fails with EACCES, so read-only stays read-only.
                    out.append(os.open(f"/proc/self/fd/{mfd}", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            close_fds(out)
            raise
        handle = next(self._handles)
        for grant in grants:
            grant.maps += 1
        conn.maps[handle] = grants
        conn.mapped += len(grants)
        conn.domain.mapped += len(grants)
        # The reply owns ``out``; it is closed after sending.
        return {"handle": handle, "segments": segments}, out

    def _op_gnt_unmap(
        self, conn: _Conn, msg: Message, fds: list[int]
    ) -> tuple[Message, list[int]]:
        _no_fds(fds)
        handle = _int_arg(msg, "handle", 1, 2**63)
        if handle not in conn.maps:
            raise RequestError(errno.EINVAL, f"no mapping {handle} on this handle")
        self._unmap(conn, handle)
        return {}, []

    def _unmap(self, conn: _Conn, handle: int) -> None:
        grants = conn.maps.pop(handle)
        conn.mapped -= len(grants)
        # Every unmap comes here: an explicit one, or the handle's close
        # (also when its domain goes away), so the count never leaks.
        conn.domain.mapped -= len(grants)
        for grant in grants:
            grant.maps -= 1
            if grant.maps == 0 and grant.owner is None:
                grant.table.free(grant)

    def _end_access(self, grant: _Grant) -> None:
        if grant.owner is not None:
            grant.owner.shares.discard(grant)
            grant.owner = None
        if grant.maps == 0:
            grant.table.free(grant)

    # -- event channel operations --------------------------------------------

    def _alloc_port(self, conn: _Conn, remote_domid: int) -> tuple[_Port, int]:
        """A new port of ``conn``'s domain and the read end of its pipe."""
        dom = conn.domain
        port = next((p for p in range(1, MAX_PORTS_PER_DOMAIN + 1) if p not in dom.ports), None)
        if port is None:
            raise RequestError(errno.ENOSPC, "no free event channel port")
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        obj = _Port(dom.domid, port, conn, w, remote_domid)
        dom.ports[port] = obj
        conn.ports.add(obj)
        return obj, r

    def _op_evtchn_alloc_unbound(
        self, conn: _Conn, msg: Message, fds: list[int]
    ) -> tuple[Message, list[int]]:
        _no_fds(fds)
        remote = _int_arg(msg, "domid", 0, _DOMID_MAX)
        if remote not in self._domains:
            raise RequestError(errno.ESRCH, f"no domain {remote}")
        port, r = self._alloc_port(conn, remote)
        return {"port": port.port}, [r]

    def _op_evtchn_bind_interdomain(
        self, conn: _Conn, msg: Message, fds: list[int]
    ) -> tuple[Message, list[int]]:
        _no_fds(fds)
        remote_domid = _int_arg(msg, "domid", 0, _DOMID_MAX)
        remote_port = _int_arg(msg, "port", 1, EVTCHN_PORT_MAX)
        rdom = self._domains.get(remote_domid)
        if rdom is None:
            raise RequestError(errno.ESRCH, f"no domain {remote_domid}")
        # A port past the domain's own is one not unbound for us (EINVAL
        # below), as Xen says it.
        remote = rdom.ports.get(remote_port)
        me = conn.domain.domid
        if remote is None or remote.remote is not None or remote.remote_domid != me:
            raise RequestError(
                errno.EINVAL,
                f"port {remote_port} of domain {remote_domid} is not an unbound port for {me}",
            )
        to_remote = _writer(remote)
        if to_remote is None:
            raise RequestError(
                errno.EINVAL, f"port {remote_port} of domain {remote_domid} is closing"
            )
        # Each step may fail (no free port, out of descriptors): undo what
        # the earlier ones made, or the service keeps it for good.
        try:
            local, r = self._alloc_port(conn, remote_domid)
            try:
                to_local = _writer(local)
            except BaseException:
                os.close(r)
                self._free_port(local)
                raise
        except BaseException:
            os.close(to_remote)
            raise
        assert to_local is not None  # its read end is r, still ours
        local.remote, remote.remote = remote, local
        # The peer learns its port is connected before we reply (unless its
        # handle lags behind with its news): anything the binder does after
        # the reply finds the peer ready to notify.
        self._push(remote, to_local)
        return {"port": local.port, "remote_port": remote.port}, [r, to_remote]

    def _op_evtchn_unbind(
        self, conn: _Conn, msg: Message, fds: list[int]
    ) -> tuple[Message, list[int]]:
        _no_fds(fds)
        number = _int_arg(msg, "port", 1, MAX_PORTS_PER_DOMAIN)
        port = conn.domain.ports.get(number)
        if port is None or port.owner is not conn:
            raise RequestError(errno.EINVAL, f"port {number} is not bound by this handle")
        self._unbind(port)
        return {}, []

    def _unbind(self, port: _Port) -> None:
        peer = port.remote
        if peer is not None:
            # Xen semantics: the peer's port becomes unbound, waiting for
            # this domain again.  Fire it so that its owner notices.
            peer.remote = None
            self._renew_pipe(peer)
            self._push(peer)
            _fire(peer.wfd)
        self._free_port(port)

    def _renew_pipe(self, port: _Port) -> None:
        """Give ``port`` a new pipe: its peer's process (dead, or hostile)
        may keep a write end of the old one, and must not fire it any more.
        The owner gets the new read end with its next news of the port."""
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            self._warn_fds("port %d of domain %d keeps its pipe: %s", port.port, port.domid, e)
            return
        old_w, port.wfd = port.wfd, w
        os.close(old_w)
        old_r, port.fresh_r = port.fresh_r, r
        if old_r is not None:
            os.close(old_r)  # never sent: the owner still reads the old one

    def _free_port(self, port: _Port) -> None:
        """Forget ``port`` (unconnected, or its peer already told, see
        _unbind) and close the service's write end."""
        del port.owner.domain.ports[port.port]
        port.owner.ports.discard(port)
        wfd, port.wfd = port.wfd, -1
        os.close(wfd)
        fresh, port.fresh_r = port.fresh_r, None
        if fresh is not None:
            os.close(fresh)

    # -- domain control (dom0 only) ------------------------------------------

    def _op_domain_control(
        self, conn: _Conn, msg: Message, fds: list[int]
    ) -> tuple[Message, list[int]] | None:
        _no_fds(fds)
        if conn.domain.domid != 0:
            raise RequestError(errno.EPERM, "only dom0 may create or destroy domains")
        if self._control is None:
            raise RequestError(errno.ENOSYS, "this host takes no domain control requests")
        op = msg["op"]
        if op == "domain_create":
            name = msg.get("name")
            if not isinstance(name, str):
                raise RequestError(errno.EINVAL, "'name' must be a string")
            args: dict[str, Any] = {"name": name}
        else:
            args = {"domid": _int_arg(msg, "domid", 1, _DOMID_MAX)}
        self._control(op, args, functools.partial(self._reply_later, conn, _request_id(msg)))
        return None

    def _reply_later(self, conn: _Conn, request_id: int | None, msg: Message) -> None:
        with records_held(), self._lock:
            self._send(conn, _reply_to(request_id, msg))
            self._reap()

    _ops: dict[
        str,
        Callable[[Hypervisor, _Conn, Message, list[int]], tuple[Message, list[int]] | None],
    ] = {
        "info": _op_info,
        "gnt_share": _op_gnt_share,
        "gnt_end": _op_gnt_end,
        "gnt_map": _op_gnt_map,
        "gnt_unmap": _op_gnt_unmap,
        "evtchn_alloc_unbound": _op_evtchn_alloc_unbound,
        "evtchn_bind_interdomain": _op_evtchn_bind_interdomain,
        "evtchn_unbind": _op_evtchn_unbind,
        "domain_create": _op_domain_control,
        "domain_destroy": _op_domain_control,
    }


def _request_id(msg: Message) -> int | None:
    """A request's ``"id"``, if it is one a reply can carry back."""
    request_id = msg.get("id")
    return request_id if type(request_id) is int else None


def _reply_to(request_id: int | None, reply: Message) -> Message:
    """``reply``, carrying the id of the request it answers (if it had one)."""
    if request_id is not None:
        reply["id"] = request_id
    return reply


def _no_fds(fds: list[int]) -> None:
    if fds:
        raise RequestError(errno.EINVAL, "this request carries no descriptors")


def _refuse(sock: socket.socket, why: Message) -> None:
    """Tell a connection just accepted why it is refused, and close it.

    Said before the close, or the client would take it for a host gone
    (ENODEV).  The message waits in its socket: the client reads it
    before the end, whenever its first request went."""
    try:
        send_message(sock, why, (), socket.MSG_DONTWAIT)
    except OSError:
        pass  # the client is gone already
    sock.close()


def _open_reserve() -> int:
    """A spare descriptor (see Hypervisor._reserve), or -1 if none is left."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _has_room(sock: socket.socket) -> bool:
    """Whether ``sock`` polls writable: little enough of what was sent to
    it is still unread (for a Unix socket, a quarter of its buffer)."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


def _writer(port: _Port) -> int | None:
    """A write end of ``port``'s pipe for its peer, or None if nobody reads it.

    A new open file description (reopened through /proc), non-blocking:
    were it a dup of ours, the peer could clear O_NONBLOCK on the shared
    description and make the service's own writes block.
    """
    try:
        return os.open(
            f"/proc/self/fd/{port.wfd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
        )
    except OSError as e:
        if e.errno == errno.ENXIO:  # no reader left: the owner is going away
            return None
        raise


def _fire(wfd: int) -> None:
    try:
        os.write(wfd, _FIRE)
    except (BlockingIOError, BrokenPipeError):
        pass  # already pending, or nobody left to tell


def domain_socket(run_dir: Path, domid: int) -> Path:
    """The socket through which ``domid``'s handles reach the hypervisor."""
    return Path(run_dir) / "domains" / str(domid) / "hypervisor"
