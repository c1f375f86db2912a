"""The simulated host: XenStore, hypervisor and toolstack in one object."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

import pyxs

from workqueue import shown
from xenback._closing import Closing
from xenback._flags import DOMID_FIRST_RESERVED, check_domain_id, is_int

from ._domain import Domain, run_dir_path
from ._heldlog import EMITTER_WAIT, emit, keeping, log, records_held, records_kept
from ._hypervisor import Hypervisor, RequestError
from ._toolstack import REMOVE_TIMEOUT, Toolstack, check_timeout
from ._xenstored import XenStored
from ._xenstored._server import MAX_QUEUED, WATCH_EVENT_TIMEOUT, check_limits

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The nodes libxl__domain_make (tools/libs/light/libxl_create.c) makes in a
#: PV guest's home, in its order, and whose they are: False for its roperm
#: (dom0's, readable by the guest), True for its rwperm (the guest's own).
#: The home itself is roperm, so a guest can neither delete it nor create
#: nodes directly under it: it writes where these let it, and in the
#: device directories the toolstack makes for it.  device/suspend is not in
#: the list: writing event-channel makes it, with its parent's permissions.
_LIBXL_HOME_NODES = (
    ("cpu", False),
    ("memory", False),
    ("device", False),
    ("device/suspend/event-channel", True),
    ("control", False),
    ("control/shutdown", True),
    ("control/feature-poweroff", True),
    ("control/feature-reboot", True),
    ("control/feature-suspend", True),
    ("control/sysrq", True),
    ("data", True),
    ("drivers", True),
    ("feature", True),
    ("attr", True),
    ("error", True),
)

#: What libxl tells the guest of its platform in control/: "1" each, in
#: nodes that take control's permissions (the guest reads them only).
_LIBXL_PLATFORM_FEATURES = (
    "control/platform-feature-multiprocessor-suspend",
    "control/platform-feature-xs_reset_watches",
)


def check_domain_name(name: str) -> str:
    """Return ``name`` if it can name a guest; TypeError if it is no str,
    ValueError if it is not such a name.

    ASCII only: pyxs, which the host and most clients speak XenStore with,
    sends nothing else, so another name could not even be written.
    """
    if not isinstance(name, str):
        raise TypeError(f"a domain name must be a str, not {type(name).__name__} {shown(name)}")
    if (
        not 0 < len(name) <= 64
        or not name.isascii()
        or not name.isprintable()
        or "/" in name
    ):
        raise ValueError(
            f"a domain name must be 1..64 printable ASCII characters, no '/', not {name!r}"
        )
    return name


def _same_dir(a: Path, b: Path | None) -> bool:
    """Whether ``a`` and ``b`` name one directory (a symlink may name it too)."""
    if b is None:
        return False
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False


def _remove_stale_sockets(run_dir: Path) -> None:
    """Remove the domain sockets a host killed in ``run_dir`` left behind.

    They would pass for domains that are no more (``attach`` would get
    ECONNREFUSED, not ENOENT) and outlive this host's clean close.  Only
    sockets by the names a host makes are removed, then their directories
    if that empties them; anything else stays.
    """
    domains = run_dir / "domains"
    if not domains.is_dir():
        return
    for directory in domains.iterdir():
        if not directory.name.isdecimal() or directory.is_symlink() or not directory.is_dir():
            continue
        for name in ("hypervisor", "xenstore"):
            path = directory / name
            if path.is_socket():
                log(logger).info("removing %s, left by a host that is gone", path)
                path.unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:
            pass


#: How often a destroy_domain() waiting for another one of the same
#: domain looks whether the host closed meanwhile (seconds).
_DESTROY_WAIT_SLICE = 0.1


class _Destroy:
    """One destroy_domain() call, for the others of the same domain.

    ``running`` is held from its making until the call sets ``over`` and
    releases it in its ``finally``, however it ends: another destroy waits
    for it with ``with running``.  Both are done there with no Python
    frame before them, which a signal's handler could cut short as it
    starts (release() is a C call: a handler runs only as it returns).
    ``deadline`` (time.monotonic()) is when its timeout ends: another
    destroy, of a timeout that ends sooner, waits for it only so long.
    """

    __slots__ = ("thread", "deadline", "running", "over")

    def __init__(self, deadline: float) -> None:
        self.thread = threading.get_ident()
        self.deadline = deadline
        self.over = False
        self.running = threading.Lock()
        self.running.acquire()


def _wait_slice(other: _Destroy, deadline: float) -> float:
    """How long a destroy with ``deadline`` waits at once for ``other``
    (see destroy_domain): a slice, cut at the deadline if ``other`` may
    outlast it."""
    if other.deadline <= deadline:
        return _DESTROY_WAIT_SLICE
    return min(_DESTROY_WAIT_SLICE, max(0.0, deadline - time.monotonic()))


class SimHost(Closing):
    """A simulated Xen host, embedded in this process.

    ::

        with SimHost() as host:
            guest = host.create_domain("guest")
            ...

    Serves XenStore on ``run_dir/xenstored/socket`` and the hypervisor on
    ``run_dir/domains/<domid>/hypervisor``; other processes join it with
    :func:`xenback.sim.attach`.  Without ``run_dir`` a fresh temporary
    directory is used and removed on exit.  ``max_queued`` and
    ``watch_event_timeout`` go to its XenStore server (see XenStored;
    TypeError or ValueError at once if it would refuse them).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        max_queued: int = MAX_QUEUED,
        watch_event_timeout: float | None = WATCH_EVENT_TIMEOUT,
    ) -> None:
        check_limits(max_queued, watch_event_timeout)
        # For the XenStore server, which start() makes.
        self._max_queued = max_queued
        self._watch_event_timeout = watch_event_timeout
        # A temporary run directory is made by start(), so that a host that
        # is never started leaves nothing behind.
        self._own_run_dir = run_dir is None
        self._run_dir = None if run_dir is None else run_dir_path(run_dir)
        # The directories start() made for a caller's run_dir, deepest first:
        # close() removes them again (if empty), as it removes the rest.
        self._made_dirs: list[Path] = []
        self._xenstored: XenStored | None = None
        self._hypervisor: Hypervisor | None = None
        self._toolstack: Toolstack | None = None
        # _lock protects _domains, _dying, _undoing, _domids, _state, and makes
        # creating and destroying a domain atomic: a domain is listed only
        # once XenStore and the hypervisor both know it, and unlisted only
        # once both forgot it.  Rule: held for the whole of create/close and
        # for the hypervisor and XenStore part of destroy (they talk to our own
        # servers, which never call back into the host); never while
        # waiting for a backend to close a device; no record emitted under
        # it but by the main thread (see _locked).  Taken only by
        # _locked(), which refuses the calls that would wait for it for ever.
        self._lock = threading.Lock()
        # (thread id, method) of the call holding _lock, for _locked().
        self._holder: tuple[int, str] | None = None
        self._domains: dict[int, Domain] = {}
        # The domains whose destroy began, each with the last destroy that
        # claimed it (``over`` once that one returned or was cut short).  A
        # dying domain stays in _domains, its name taken, until the destroy
        # that ends it drops it from both; domains() and domain() leave it out.
        self._dying: dict[int, _Destroy] = {}
        # The domids whose failed create_domain() did not finish undoing
        # itself (a XenStore loop stuck, a Ctrl-C in the undo): the next
        # create_domain() finishes each first (the domids are not reused).
        # A create's own domid is here from before its first step until it
        # is listed (both under _lock), so that no interrupt falls between.
        self._undoing: set[int] = set()
        self._domids = itertools.count(1)
        self._state = "new"
        # _control_lock protects _control_threads: the threads serving dom0's
        # create/destroy requests from other processes (they block on _lock,
        # which the service thread must never do).  Rule: never held while
        # joining or while taking _lock.  Reentrant: a close() from a
        # signal's handler may come while this thread holds it (in close()),
        # and what it guards is only copied, added to and discarded from.
        self._control_lock = threading.RLock()
        self._control_threads: set[threading.Thread] = set()
        # Those threads keep what they log (they hold _lock, and the main
        # thread may hold a handler's lock meanwhile, see _heldlog).  As
        # one ends, it hands it to close() if that is joining them
        # (_control_joining), which emits it past the joins from
        # _control_unsaid; else it emits it itself, moved from
        # _control_threads to _control_emitting, which close() waits for
        # EMITTER_WAIT at most: it may be a signal's handler come in as
        # the main thread held the lock of a handler they emit to.  Not
        # handed to a close() cut short, which may be the last.  All
        # under _control_lock.
        self._control_joining = False
        self._control_unsaid: list[logging.LogRecord] = []
        self._control_emitting: set[threading.Thread] = set()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> SimHost:
        """Start XenStore and the hypervisor and create dom0; returns the
        host.  ``with`` calls it; a host starts once (RuntimeError after).
        One failing is undone, its error raised; if the undo fails too,
        the host is left closing, as the error's note says, for close()."""
        self._locked("start", self._start)
        log(logger).info("simulated host running in %s", self._run_dir)
        return self

    def _start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"SimHost is {self._state}")
        self._state = "starting"
        try:
            if self._run_dir is None:
                self._run_dir = Path(tempfile.mkdtemp(prefix="xenback-sim-"))
            run_dir = self._run_dir
            missing = run_dir
            while not self._own_run_dir and not missing.exists():
                self._made_dirs.append(missing)
                missing = missing.parent
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                # mkdir()'s word for a path that is something else.
                raise NotADirectoryError(
                    errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fspath(run_dir)) from None
            self._xenstored = XenStored(run_dir, max_queued=self._max_queued,
                                        watch_event_timeout=self._watch_event_timeout)
            self._hypervisor = Hypervisor(run_dir)
            self._toolstack = Toolstack(self._xenstored.path)
            self._xenstored.start()
            # Served by us now, so no live host uses the directory:
            # whatever sockets it holds are a killed one's.
            _remove_stale_sockets(run_dir)
            self._hypervisor.set_control(self._control)
            self._hypervisor.start()
            self._hypervisor.add_domain(0, "Domain-0")
            self._hypervisor.set_xenstore_path(0, os.fspath(self._xenstored.path))
            self._populate(0, "Domain-0")
            self._domains[0] = Domain(run_dir, 0, "Domain-0", self._xenstored.path)
        except BaseException as exc:
            # start()'s own error comes out, as a create's does (see
            # _create_domain), also if the undo fails (no thread to be had
            # to remove dom0 in, XenStore's loop stuck): the host is left
            # closing, for close() to finish.  The error says so: a caller
            # of ``with SimHost() as host`` has no host to close otherwise,
            # nor a word that one is left.
            try:
                self._teardown()
            except Exception as e:
                log(logger).warning("undoing the host's start after %s failed: %s",
                                    type(exc).__name__, e, exc_info=e)  # as a create's
                exc.add_note(f"the simulated host in {self._run_dir} is left closing:"
                             " close() it to finish")
            raise
        self._state = "running"

    def close(self) -> None:
        """Destroy every domain and stop everything; idempotent, and a
        close() interrupted (Ctrl-C) is finished by the next one.

        From a signal's handler that interrupted this thread in another
        call of the host that holds its lock (create_domain(), say), it is a
        :class:`RuntimeError`, where it would wait for ever for that call,
        which waits for the handler to return.  A XenStore server whose
        loop thread is stuck (a bug) makes it a :class:`TimeoutError`
        naming that thread (see :meth:`XenStored.stop`), after 10 s, not a
        hang; the host stays closing, and the next close() tries again.
        So it does after a :class:`RuntimeError` saying no thread was to
        be had to remove the domains in (see :meth:`Hypervisor.stop`).
        """
        self._locked("close", self._close)
        # The service has stopped: no control request can start a thread
        # any more, and those still running fail fast on the closed host.
        try:
            while True:
                with self._control_lock:
                    self._control_joining = True
                    threads = list(self._control_threads)
                if not threads:
                    break
                for thread in threads:
                    thread.join()
            with self._control_lock:
                emitting = list(self._control_emitting)
            for thread in emitting:
                thread.join(EMITTER_WAIT)
        finally:
            # Past their joins: emitted by the threads, they could keep a
            # join waiting for a handler's lock this thread holds.  Also
            # on the way out of a close() cut short, there too as the lock
            # is let go.
            try:
                with self._control_lock:
                    self._control_joining = False
            finally:
                emit(self._control_unsaid)

    def _close(self) -> None:
        if self._state in ("closed", "new"):
            self._state = "closed"
            self._cleanup_run_dir()
        else:
            self._teardown()

    def _teardown(self) -> None:
        # "closing" until every part has stopped: a close() interrupted in
        # one of the joins (Ctrl-C) leaves the rest to the next close().
        self._state = "closing"
        if self._hypervisor is not None:
            self._hypervisor.stop()
        if self._xenstored is not None:
            self._xenstored.stop()
        self._domains.clear()
        self._dying.clear()
        self._undoing.clear()  # gone with XenStore and the hypervisor
        self._cleanup_run_dir()
        self._state = "closed"

    def _cleanup_run_dir(self) -> None:
        if self._run_dir is None:
            return
        if self._own_run_dir:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            return
        # A caller's directory: remove only what we created, if empty.
        domains = self._run_dir / "domains"
        for path in [*sorted(domains.glob("*")), domains, self._run_dir / "xenstored",
                     *self._made_dirs]:
            try:
                path.rmdir()
            except OSError:
                pass

    def __enter__(self) -> Self:
        """start(): one failing that could not undo itself says so (the host
        is left closing), for the caller to close() the host it holds."""
        self.start()
        return self

    # -- public face ---------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        """The run directory (RuntimeError before :meth:`start` made it)."""
        if self._run_dir is None:
            raise RuntimeError("the run directory is made when the host starts")
        return self._run_dir

    @property
    def xenstore_path(self) -> Path:
        """The dom0 XenStore socket (what ``XENSTORED_PATH`` should name)."""
        return self.xenstored.path

    @property
    def dom0(self) -> Domain:
        """Domain 0, where backends run."""

        def dom0() -> Domain:
            self._check_running()
            return self._domains[0]

        return self._locked("dom0", dom0)

    @property
    def toolstack(self) -> Toolstack:
        """The host's :class:`Toolstack`, which adds and removes devices."""
        if self._toolstack is None:
            raise RuntimeError("SimHost is not started")
        return self._toolstack

    @property
    def xenstored(self) -> XenStored:
        """The XenStore server (:class:`~xenback.sim._xenstored.XenStored`)."""
        if self._xenstored is None:
            raise RuntimeError("SimHost is not started")
        return self._xenstored

    @property
    def hypervisor(self) -> Hypervisor:
        """The hypervisor service; ``hypervisor.stats()`` counts live objects."""
        if self._hypervisor is None:
            raise RuntimeError("SimHost is not started")
        return self._hypervisor

    def domains(self) -> list[Domain]:
        """Live domains, dom0 first (not those being destroyed)."""
        return self._locked("domains", lambda: [
            self._domains[d] for d in sorted(self._domains) if d not in self._dying])

    def domain(self, domid: int) -> Domain:
        """The live domain ``domid``; :class:`LookupError` if there is none
        (or it is being destroyed); :class:`TypeError` for anything but an
        int (by the rule of ports: True and 1.0 hash as 1 and would find
        domain 1) and :class:`ValueError` for an int that is no domain id,
        0 to 0x7FEF (:func:`xenback._flags.check_domain_id`, as the
        toolstack's calls and :func:`xenback.sim.attach`)."""
        domid = check_domain_id(domid)

        def domain() -> Domain:
            if domid in self._dying:
                raise LookupError(f"domain {shown(domid)} is being destroyed")
            try:
                return self._domains[domid]
            except KeyError:
                raise LookupError(f"no domain {shown(domid)}") from None

        return self._locked("domain", domain)

    def create_domain(self, name: str) -> Domain:
        """Create a guest: XenStore home populated, then @introduceDomain.

        Raises :class:`TypeError` for a name that is not a str,
        :class:`ValueError` for a bad or taken one (a domain being
        destroyed keeps its name until it is gone, as in libxl), and
        :class:`OSError` ``ENOMEM`` once every guest domid (1 to 0x7FEF)
        has been given out (domids are not reused).

        A create that fails undoes what it did.  What XenStore's loop,
        stuck (a bug: introducing and releasing the domain there fail with
        :class:`TimeoutError` after 10 s), kept it from undoing (the
        domain's home, and the domain itself if the loop was stuck
        introducing it and came back to finish that) is undone by the next
        create_domain() before it creates anything (and fails it the same
        way while the loop is still stuck), or goes with :meth:`close`.
        Meanwhile that domain is none of the host's:
        :meth:`destroy_domain` does not know it.  A Ctrl-C comes out as
        itself, also if the stuck loop fails the undo (whose failure is
        logged).

        Not bounded: the writes of the domain's home, requests of the
        toolstack's XenStore connection, wait for their replies for good
        (pyxs has no timeout): a loop stuck then hangs the create until a
        Ctrl-C (or pytest-timeout) ends it.  A watchdog per request was
        judged not worth a thread per toolstack operation.
        """
        check_domain_name(name)
        domain = self._locked("create_domain", lambda: self._create_domain(name))
        log(logger).info("created domain %d (%s)", domain.domid, name)
        return domain

    def _create_domain(self, name: str) -> Domain:
        self._check_running()
        if any(d.name == name for d in self._domains.values()):
            raise ValueError(f"a domain named {name!r} exists already")
        for domid in sorted(self._undoing):
            self._undo_create(domid)
        domid = next(self._domids)
        if domid >= DOMID_FIRST_RESERVED:
            # Xen's XEN_DOMCTL_createdomain with no free domid: ENOMEM.
            raise OSError(errno.ENOMEM, "out of domain ids")
        # Counted as one to undo before its first step, not as the undo
        # starts: a Ctrl-C there (as _undo_create() starts) left the
        # domain made for good.  No longer once listed, in the try: an
        # interrupt as that returns undoes it all the same.
        self._undoing.add(domid)
        try:
            # As libxl: the domain's home first, then introduce it; the
            # hypervisor knows the domain before anyone hears of it.
            self._populate(domid, name)
            self.hypervisor.add_domain(domid, name)
            xs_path = self.xenstored.introduce_domain(domid)
            self.hypervisor.set_xenstore_path(domid, os.fspath(xs_path))
            domain = Domain(self.run_dir, domid, name, xs_path)
            self._domains[domid] = domain
            self._undoing.discard(domid)
        except BaseException as exc:
            # The create's own error comes out, a Ctrl-C as itself, also if
            # the undo fails (XenStore's loop stuck: TimeoutError; no thread
            # to be had to remove the domain in: RuntimeError), whose error
            # would take its place: a caller's except OSError would hide a
            # Ctrl-C, and "no thread" would hide why the create failed.
            # The rest of the undo is the next create's then (_undoing).
            try:
                self._undo_create(domid)
            except Exception as e:
                # With where it failed: a bug in the undo, not a refusal,
                # is told by nothing else.
                log(logger).warning("domain %d: undoing its create after %s failed: %s",
                                    domid, type(exc).__name__, e, exc_info=e)
            raise
        return domain

    def _undo_create(self, domid: int) -> None:
        """Undo what _create_domain() did of ``domid``, wherever it stopped.

        Not step by step as each fails: an exception may also come as a
        step has just returned (a signal's handler raising there, see
        _locked), so every undo is tried and takes a step not done for done.
        An undo that did not end is the next create's to finish: ``domid``
        stays in _undoing, where _create_domain() put it (or this).
        """
        # Put there again: an interrupt as the create's discard returned
        # (its last step) undoes a create no longer listed, and a failed
        # undo of it would leave its home and introduce to nobody.
        self._undoing.add(domid)
        self._domains.pop(domid, None)
        try:
            self.xenstored.release_domain(domid)
        except KeyError:
            pass  # never introduced
        finally:
            # Also if XenStore's loop is stuck (TimeoutError): the domain
            # is not the host's, and nothing else would ever remove it.
            # Not its home then, which only that loop can forget: the
            # next create's (_undoing), or close()'s.
            try:
                self.hypervisor.remove_domain(domid)
            except ValueError:
                pass  # never added
        self._forget_home(domid)
        try:  # the directory its sockets were to be made in
            (self.run_dir / "domains" / str(domid)).rmdir()
        except OSError:
            pass
        self._undoing.discard(domid)

    def destroy_domain(self, domain: Domain | int, timeout: float = REMOVE_TIMEOUT) -> None:
        """Destroy a guest in libxl's order (``libxl__destroy_domid``).

        First its devices: each frontend directory is deleted, each backend
        asked to close (``online`` = 0, Closing unless Closed) and given up
        to ``timeout`` seconds (libxl's 10 by default) before its
        directories are deleted anyway, with the parents this empties;
        devices it served as a driver domain are deleted at once.  Then its
        XenStore home goes, and last the domain itself: its event channels
        close (peers see their ports unbound and fire), its grants are
        revoked once nobody maps them, and @releaseDomain fires.

        From the start the domain is dying: no longer among
        :meth:`domains`, but its name still taken, until the destroy ends
        it.  A destroy cut short (Ctrl-C) or failed (XenStore's loop stuck
        as the domain is released there: :class:`TimeoutError` after 10 s)
        leaves it dying, and the next destroy_domain() of it, or
        :meth:`close`, finishes it (once that loop is back).  Not bounded:
        the removal of its devices and home, requests of the toolstack's
        XenStore connection, wait for their replies for good (pyxs has no
        timeout; a watchdog per request was judged not worth a thread per
        toolstack operation): a loop stuck then hangs the destroy until a
        Ctrl-C (or pytest-timeout) ends it, the domain left dying.
        Asked for by another process (:func:`~xenback.sim.destroy_domain`),
        its log lines come out at its end, with the times they were made at
        (the thread serving the request keeps them, see _heldlog).
        One of a domain that another thread is destroying waits for that
        destroy to end, or the host to close, and finishes it (in what is
        left of ``timeout``) if it was cut short; it returns once the
        domain is gone, as the other does.  If the other gives its backends
        longer, this one raises :class:`TimeoutError` (ETIMEDOUT) once its
        own ``timeout`` is over, the domain still dying and the other
        destroy going on; else it waits for the other's forced removal,
        as its own would have been.

        ``domain`` is one of this host's Domains or a domain id (an int, by
        the rule of ports); anything else is a :class:`TypeError`, dom0,
        another host's Domain or an int that is no domain id (0 to 0x7FEF,
        as :meth:`domain` checks it) a :class:`ValueError`, and a domain id
        of no live or dying domain a :class:`LookupError`.  A
        ``timeout`` that is no number is a :class:`TypeError`, a negative
        or NaN one a :class:`ValueError`.
        """
        if isinstance(domain, Domain):
            domid = domain.domid
        elif is_int(domain):
            domid = check_domain_id(domain, "domain")
        else:
            # As a port: True and 1.0 hash as 1 and would reach domain 1.
            raise TypeError(f"domain must be a Domain or a domain id (an int), "
                            f"not {type(domain).__name__} {shown(domain)}")
        if domid == 0:
            raise ValueError("dom0 cannot be destroyed")
        check_timeout(timeout)
        deadline = time.monotonic() + timeout
        mine = _Destroy(deadline)
        waited = False

        def claim() -> _Destroy | None:
            """Mark the domain dying, destroyed by ``mine``; else the other
            destroy to wait for (None: ours, or gone with the host)."""
            if waited and self._state != "running":
                return None  # the destroy we waited for found the host closing
            self._check_running()
            if isinstance(domain, Domain) and not _same_dir(domain.run_dir, self._run_dir):
                # Another host's Domain has a domid too, perhaps one of ours.
                raise ValueError(
                    f"{domain!r} is not a domain of the host in {self._run_dir}"
                    f" (it lives in {domain.run_dir})"
                )
            if domid not in self._domains:
                if waited:
                    return None  # the destroy we waited for ended it
                raise LookupError(f"no domain {shown(domid)}")
            other = self._dying.get(domid)
            # An earlier destroy of this thread is over, or suspended under
            # us (this call came from a signal's handler): ours goes on
            # with what it left (each step may be done twice), as one cut
            # short by the interrupt would.
            if other is not None and not other.over and other.thread != mine.thread:
                return other
            self._dying[domid] = mine
            return None

        def finish() -> None:
            if domid not in self._dying:
                return  # gone with the host, or ended by a destroy under ours
            # One step after the other, each taking one done before (by a
            # destroy cut short) for done; unlisted last, both with no call
            # between: until then a retry finds the domain to finish.
            if self._state == "running":
                try:
                    self.hypervisor.remove_domain(domid)
                except ValueError:
                    pass  # done before
                try:
                    self.xenstored.release_domain(domid)
                except KeyError:
                    pass  # dom0 sent RELEASE over the wire, or done before
            try:
                (self.run_dir / "domains" / str(domid)).rmdir()
            except OSError:
                pass
            del self._domains[domid]
            del self._dying[domid]

        # Everything after mine is made is in the try: however it ends, a
        # destroy waiting for this one is let go (see _Destroy).
        try:
            while (other := self._locked("destroy_domain", claim)) is not None:
                waited = True
                # Held until that destroy ends; waited for in slices, to
                # stop once the host closes: a close() from a signal's
                # handler that came in that destroy joins this thread (if
                # it serves dom0), and that destroy cannot end before the
                # handler returns.
                # Its over too: a waiter cut short between acquiring and
                # releasing leaves the lock held.
                while not other.running.acquire(timeout=_wait_slice(other, deadline)):
                    if self._state != "running" or other.over:  # (claim() reads again)
                        break
                    if other.deadline > deadline and time.monotonic() >= deadline:
                        # Not the other's to end sooner: its wait for the
                        # backends began with its own deadline.
                        raise TimeoutError(
                            errno.ETIMEDOUT,
                            f"domain {domid} is still being destroyed by another call,"
                            f" which gives its backends longer than this one's {timeout} s",
                        )
                else:
                    other.running.release()
            # Without _lock (a test, no change): whatever takes the domain
            # out of _dying meanwhile (a close(), a destroy under ours from
            # a signal's handler), the steps below take one done for done,
            # and finish() looks again under the lock.
            if domid not in self._dying:
                return  # gone with the host meanwhile, or by the one we waited for
            try:
                for dev in self.toolstack.devices():
                    if dev.backend_id == domid:
                        self.toolstack.destroy_device(dev)
                self.toolstack.destroy_devices(domid, max(0.0, deadline - time.monotonic()))
                self._forget_home(domid)
            except Exception as e:
                if self._locked("destroy_domain", lambda: self._state == "running"):
                    raise
                # XenStore went away under the toolstack: the host closed
                # meanwhile, and took the domain down with it.
                log(logger).debug("domain %d went down with the host: %s", domid, e)
            self._locked("destroy_domain", finish)
        finally:
            mine.over = True
            mine.running.release()
        log(logger).info("destroyed domain %d", domid)

    # -- internals -----------------------------------------------------------

    def _locked(self, method: str, body: Callable[[], T]) -> T:
        """``body()`` under _lock, for the public ``method``.

        A signal's handler runs in the main thread wherever that is, and so
        perhaps inside another call of the host that holds the lock (a
        create_domain() writing to XenStore).  A call of the host from the
        handler would wait for the lock for ever, since the call that holds
        it cannot go on until the handler returns: it is refused with a
        :class:`RuntimeError` instead, before it changes anything.  Carrying
        it out in the middle of the other (closing the host under a
        create_domain()) would leave that one to fail in ways of its own;
        refused, the error goes out through the call it interrupted, which
        undoes what it did as it would for Ctrl-C.

        No function is called between taking the lock and the ``try``, nor
        in the ``finally`` before it is released: CPython runs a handler
        as a call returns (or a function starts, or a loop goes round), and
        one run there would find the lock held but not marked as ours.  And
        what ``body()`` returns is stored inside the ``try``, so that an
        exception coming just after it, too, clears the mark.

        In another thread, what ``body()`` logs (the hypervisor's records
        and those of XenStore's loop running its calls too, see _heldlog)
        is emitted once the lock is let go: the handler that closes the
        host may have come in as the main thread emitted a record, the
        handler's lock held, and would wait for the lock for ever.
        """
        if threading.current_thread() is not threading.main_thread() and not keeping():
            with records_held():  # (see above)
                return self._locked(method, body)
        me = threading.get_ident()
        holder = self._holder
        if holder is not None and holder[0] == me:
            raise RuntimeError(
                f"SimHost.{method}() called while this thread is inside "
                f"SimHost.{holder[1]}() (from a signal handler?), which holds the "
                f"host's lock: it would wait for itself.  Raise from the handler "
                f"instead and call {method}() once {holder[1]}() is over (leaving "
                f"a with block closes the host)"
            )
        with self._lock:
            self._holder = (me, method)
            try:
                result = body()  # (not returned from here: see above)
            finally:
                self._holder = None
        return result

    def _control(
        self, op: str, args: dict[str, Any], reply: Callable[[dict[str, Any]], None]
    ) -> None:
        """Serve dom0's create/destroy request from another process."""

        def run() -> None:
            # What it logs, kept for its whole life: close() may join it
            # (see _control_unsaid).
            said: list[logging.LogRecord] = []
            try:
                with records_kept(said):
                    msg = serve()
                    reply(msg)
            finally:
                me = threading.current_thread()
                with self._control_lock:
                    self._control_threads.discard(me)
                    if self._control_joining:
                        self._control_unsaid += said
                        said.clear()
                    elif said:
                        self._control_emitting.add(me)
                if said:
                    try:
                        emit(said)
                    finally:
                        with self._control_lock:
                            self._control_emitting.discard(me)

        def serve() -> dict[str, Any]:
            try:
                if op == "domain_create":
                    domain = self.create_domain(args["name"])
                    msg: dict[str, Any] = {
                        "domid": domain.domid,
                        "name": domain.name,
                        "xenstore_path": os.fspath(domain.xenstore_path),
                    }
                else:
                    self.destroy_domain(args["domid"])
                    msg = {}
            except (TypeError, ValueError) as e:  # a request's wrong type or value
                msg = {"errno": errno.EINVAL, "error": str(e)}
            except LookupError as e:
                msg = {"errno": errno.ESRCH, "error": str(e)}
            except RuntimeError as e:  # the host is stopping
                msg = {"errno": errno.ESHUTDOWN, "error": str(e)}
            except OSError as e:  # its errno says it (ENOMEM: no domid left)
                log(logger).warning("domain control request %s %r failed: %s", op, args, e)
                msg = {"errno": e.errno or errno.EIO, "error": e.strerror or str(e)}
            except Exception as e:
                log(logger).exception("domain control request %s %r failed", op, args)
                msg = {"errno": errno.EIO, "error": f"{type(e).__name__}: {e}"}
            return msg

        thread = threading.Thread(target=run, name=f"xenback-sim-control:{op}")
        # Known before it runs, which forgets it as it ends.
        with self._control_lock:
            self._control_threads.add(thread)
        try:
            thread.start()
        except RuntimeError as e:  # "can't start new thread": try again later
            with self._control_lock:
                self._control_threads.discard(thread)  # close() cannot join it
            log(logger).warning("domain control request %s %r refused: %s", op, args, e)
            raise RequestError(errno.EAGAIN, f"no thread to serve it: {e}") from None

    def _check_running(self) -> None:
        # Called under _lock, which _start() holds throughout: "starting"
        # with dom0 listed is never seen here (dom0 is listed last in its
        # try, and no signal's handler can run before "running" follows).
        if self._state != "running":
            state = "not started (start() or with)" if self._state == "new" else self._state
            raise RuntimeError(f"SimHost is {state}")

    def _forget_home(self, domid: int) -> None:
        def body(c: pyxs.Client) -> None:
            for path in (f"/local/domain/{domid}", f"/libxl/{domid}"):
                if c.exists(path.encode()):
                    c.delete(path.encode())

        self.toolstack.transaction(body)

    def _populate(self, domid: int, name: str) -> None:
        """Write the domain's home as its toolstack would.

        A guest's is made as libxl__domain_make makes a PV guest's: the
        home and most of what is in it are dom0's, readable by the guest,
        which owns only the nodes libxl gives it (_LIBXL_HOME_NODES).  So
        a guest can neither rename itself nor delete its home nor create
        nodes directly under it.  ``name`` and ``domid``, like any node
        written without permissions of its own, take their parent's.
        (libxl writes ``domid`` later, in libxl__build_post; here the
        whole home is one transaction.)

        Dom0's home is what xen-init-dom0 writes: ``domid`` and ``name``.
        """
        home = f"/local/domain/{domid}".encode()
        roperm = [b"n0", f"r{domid}".encode()]
        rwperm = [f"n{domid}".encode()]

        def body(c: pyxs.Client) -> None:
            if c.exists(home):
                c.delete(home)
            c.mkdir(home)
            if domid == 0:
                c.write(home + b"/domid", b"0")
                c.write(home + b"/name", name.encode())
                return
            c.set_perms(home, roperm)
            c.write(home + b"/name", name.encode())
            for node, guest_owned in _LIBXL_HOME_NODES:
                path = home + b"/" + node.encode()
                c.mkdir(path)  # libxl__xs_mknod: an empty value
                c.set_perms(path, rwperm if guest_owned else roperm)
            for node in _LIBXL_PLATFORM_FEATURES:
                c.write(home + b"/" + node.encode(), b"1")
            c.write(home + b"/domid", str(domid).encode())

        self.toolstack.transaction(body)
