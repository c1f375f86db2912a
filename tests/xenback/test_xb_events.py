"""EventDispatcher: ports and host fds dispatched by one epoll thread."""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import itertools
import logging
import os
import select
import socket
import threading
from collections.abc import Callable

import pytest

from tests.fdcensus import descriptors, sockets_named_under
from tests.sim.hosthelpers import eventually, service_caught_up
from tests.stolensignal import Interrupted, interrupt, main_thread_in, main_thread_within
from tests.xenback.xbhelpers import TIMEOUT, assert_dispatches, fails_once, leaked_threads
from xenback import EventDispatcher, events
from xenback.platform import EventChannelError
from xenback.ratelimit import RateLimit
from xenback.sim import Domain, EventChannel


@pytest.fixture
def pair(host):
    """A guest's event channel handle and a dispatcher for dom0."""
    before = {t.ident for t in threading.enumerate()}
    guest = host.create_domain("guest")
    evtchn = guest.evtchn()
    dispatcher = EventDispatcher(host.dom0)
    yield guest, evtchn, dispatcher
    dispatcher.close()
    evtchn.close()
    assert not leaked_threads(before)


def test_thread_must_be_true_or_false(host) -> None:
    """thread="no" is not read for its truth (it would start the thread a
    poll-mode owner does not expect): TypeError naming the argument, before
    any handle or thread is made."""
    threads = set(threading.enumerate())
    connections = host.hypervisor.stats()["connections"]
    with pytest.raises(TypeError, match="thread must be True or False, not str 'no'"):
        EventDispatcher(host.dom0, thread="no")  # type: ignore[arg-type]
    assert set(threading.enumerate()) == threads
    assert host.hypervisor.stats()["connections"] == connections


def test_port_callbacks_and_masking(host, pair) -> None:
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    ports_before = host.hypervisor.stats()["ports"]
    fired = threading.Semaphore(0)
    inside = threading.Event()
    release = threading.Event()
    calls = []

    def callback(port: int) -> None:
        calls.append(port)
        inside.set()
        release.wait(TIMEOUT)
        fired.release()

    local = dispatcher.bind_interdomain(guest.domid, remote, callback)
    assert dispatcher.ports == [local]
    evtchn.notify(remote)
    assert inside.wait(TIMEOUT)
    # While the callback runs the port is masked: a storm is remembered
    # as one more pending event, not queued a thousand times.
    for _ in range(1000):
        evtchn.notify(remote)
    release.set()
    assert fired.acquire(timeout=TIMEOUT)
    assert fired.acquire(timeout=TIMEOUT)  # the storm, delivered after unmask
    evtchn.notify(remote)
    assert fired.acquire(timeout=TIMEOUT)
    assert set(calls) == {local} and len(calls) <= 3 + 1

    # Backend -> guest.
    dispatcher.notify(local)
    ready, _, _ = select.select([evtchn.fileno()], [], [], TIMEOUT)
    assert ready and evtchn.pending() == remote

    dispatcher.unbind(local)
    assert dispatcher.ports == []
    assert host.hypervisor.stats()["ports"] == ports_before  # closed in the hypervisor too
    with pytest.raises(KeyError, match="not bound"):
        dispatcher.unbind(local)


def _assert_waits_for_the_callback(
        call: Callable[[], None], release: threading.Event, finished: threading.Event) -> None:
    """``call`` (an unbind() or a remove_fd()), made in a thread while a
    callback is held inside, returns only once the callback has finished,
    and is woken as it returns (the wait here is TIMEOUT, the callback's
    own wait too).  The callback is let go however this ends: held, a
    failed assertion would leave it to the fixture's close()."""
    returned = threading.Event()
    seen: list[bool] = []

    def run() -> None:
        call()
        seen.append(finished.is_set())
        returned.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert not returned.wait(0.05)  # still inside the callback
    finally:
        release.set()
    assert returned.wait(TIMEOUT), "it was not woken as the callback returned"
    assert seen == [True]
    t.join(TIMEOUT)


def test_unbind_waits_for_a_running_callback(host, pair) -> None:
    """Once unbind() has returned, the port's callback is over.  The
    callback is let go however the test ends: held, a failed assertion
    would leave it to the fixture's close(), which waits TIMEOUT for it."""
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    inside, release, finished = threading.Event(), threading.Event(), threading.Event()

    def callback(port: int) -> None:
        inside.set()
        release.wait(TIMEOUT)
        finished.set()

    local = dispatcher.bind_interdomain(guest.domid, remote, callback)
    evtchn.notify(remote)
    assert inside.wait(TIMEOUT)
    _assert_waits_for_the_callback(lambda: dispatcher.unbind(local), release, finished)


def test_remove_fd_waits_for_a_running_callback(pair) -> None:
    """As unbind() for a port: once remove_fd() has returned, the fd's
    callback is over, and the caller may close the fd.  Its wait ends as
    the callback returns (nothing else notifies it)."""
    _guest, _evtchn, dispatcher = pair
    r, w = os.pipe()
    inside, release, finished = threading.Event(), threading.Event(), threading.Event()

    def callback(fd: int, _events: int) -> None:
        inside.set()
        release.wait(TIMEOUT)
        finished.set()

    dispatcher.add_fd(r, select.EPOLLIN | select.EPOLLONESHOT, callback)
    os.write(w, b"x")
    assert inside.wait(TIMEOUT)
    _assert_waits_for_the_callback(lambda: dispatcher.remove_fd(r), release, finished)
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("kind", ["port", "fd"])
def test_ctrl_c_ends_a_wait_for_a_running_callback(pair, kind) -> None:
    """unbind() and remove_fd() in the main thread, waiting for a callback
    that does not return, are interrupted by Ctrl-C even when another
    thread took the signal (they wait in slices, as every wait of the
    library does); nothing is unbound or removed then, and once the
    callback has returned a new call does it."""
    guest, evtchn, dispatcher = pair
    inside, release, finished = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        inside.set()
        release.wait(TIMEOUT)
        finished.set()

    r, w = os.pipe()
    try:
        if kind == "port":
            remote = evtchn.bind_unbound_port(0)
            key = dispatcher.bind_interdomain(guest.domid, remote, lambda _port: hold())
            evtchn.notify(remote)
            stop, registered = dispatcher.unbind, lambda: dispatcher.ports == [key]
        else:
            key = r
            dispatcher.add_fd(r, select.EPOLLIN | select.EPOLLONESHOT,
                              lambda _fd, _events: hold())
            os.write(w, b"x")
            stop, registered = dispatcher.remove_fd, lambda: key in dispatcher._fds
        assert inside.wait(TIMEOUT)
        try:
            interrupt(lambda: main_thread_in("wait", path="threading")
                      and main_thread_within("_wait_idle", depth=3),
                      lambda: stop(key))
            assert not finished.is_set(), "interrupted only once the callback had returned"
            assert registered()
        finally:
            release.set()
        stop(key)
        assert finished.is_set() and not registered()
    finally:
        release.set()
        os.close(r)
        os.close(w)


class _RenumberedPorts:
    """A platform whose event channel handles show every port under
    another number: the first one bound is shown as ``number``."""

    def __init__(self, platform, number: int) -> None:
        self.platform, self.number = platform, number

    def evtchn(self):
        return _RenumberedHandle(self.platform.evtchn(), self.number)


class _RenumberedHandle:
    def __init__(self, real, number: int) -> None:
        self.real, self.number, self.shift = real, number, None

    def _shown(self, port: int) -> int:
        if self.shift is None:
            self.shift = self.number - port
        return port + self.shift

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        return self._shown(self.real.bind_interdomain(domid, remote_port))

    def pending(self) -> int | None:
        port = self.real.pending()
        return None if port is None else self._shown(port)

    def unbind(self, port: int) -> None:
        self.real.unbind(port - self.shift)

    def unmask(self, port: int) -> None:
        self.real.unmask(port - self.shift)

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()


def test_a_port_and_an_fd_of_one_number_are_told_apart(host) -> None:
    # remove_fd() waits for its fd's callback, not for a port's that has
    # the same number: ports and descriptors are numbered apart.
    guest = host.create_domain("guest")
    r, w = os.pipe()
    # The lowest free descriptor from 256 up, away from the low numbers
    # the host's threads take and give back meanwhile.
    number = fcntl.fcntl(r, fcntl.F_DUPFD, 256)
    os.close(r)
    inside, release = threading.Event(), threading.Event()

    def port_callback(port: int) -> None:
        inside.set()
        release.wait(2 * TIMEOUT)  # past the wait for remove_fd() below

    removed = threading.Event()
    try:
        with guest.evtchn() as evtchn, EventDispatcher(_RenumberedPorts(host.dom0, number)) as d:
            remote = evtchn.bind_unbound_port(0)
            assert d.bind_interdomain(guest.domid, remote, port_callback) == number
            d.add_fd(number, select.EPOLLIN, lambda fd, revents: None)
            evtchn.notify(remote)
            assert inside.wait(TIMEOUT)
            t = threading.Thread(target=lambda: (d.remove_fd(number), removed.set()))
            t.start()
            try:
                assert removed.wait(TIMEOUT), "remove_fd() waited for a port's callback"
            finally:
                release.set()
                t.join(TIMEOUT)
    finally:
        release.set()
        os.close(number)
        os.close(w)


def test_failing_callback_is_logged_and_dispatch_goes_on(host, pair, caplog) -> None:
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    ok = threading.Event()
    state = {"n": 0}

    def callback(port: int) -> None:
        state["n"] += 1
        if state["n"] == 1:
            raise RuntimeError("boom")
        ok.set()

    dispatcher.bind_interdomain(guest.domid, remote, callback)
    evtchn.notify(remote)
    a, b = socket.socketpair()
    seen = threading.Event()
    dispatcher.add_fd(a.fileno(), select.EPOLLIN | select.EPOLLONESHOT, lambda fd, ev: seen.set())
    b.send(b"x")
    assert seen.wait(TIMEOUT)
    evtchn.notify(remote)
    assert ok.wait(TIMEOUT)
    assert "boom" in caplog.text
    dispatcher.remove_fd(a.fileno())
    a.close()
    b.close()


def test_a_failing_callback_is_not_handed_out_again_by_the_thread(
        host, pair, caplog) -> None:
    """One thread serves every guest of a backend: a callback's failure
    costs its own event, not a call of every port's callback (as a poll's
    does, which serves one CPU's sockets only)."""
    guest, evtchn, dispatcher = pair
    failing, other = evtchn.bind_unbound_port(0), evtchn.bind_unbound_port(0)
    failed = threading.Event()
    calls: list[str] = []

    def fail(_port: int) -> None:
        calls.append("failing")
        failed.set()
        raise RuntimeError("boom")

    dispatcher.bind_interdomain(guest.domid, failing, fail)
    dispatcher.bind_interdomain(guest.domid, other, lambda _port: calls.append("other"))
    evtchn.notify(failing)
    assert failed.wait(TIMEOUT)
    _a_round_went_by(dispatcher)  # after the one that failed: a resync came first
    assert calls == ["failing"]
    assert "boom" in caplog.text


def test_host_fds(pair) -> None:
    _guest, _evtchn, dispatcher = pair
    r, w = os.pipe()
    got = []
    cond = threading.Condition()

    def on_ready(fd: int, events: int) -> None:
        with cond:
            got.append(os.read(fd, 100))
            cond.notify_all()

    dispatcher.add_fd(r, select.EPOLLIN, on_ready)
    with pytest.raises(ValueError, match="already registered"):
        dispatcher.add_fd(r, select.EPOLLIN, on_ready)
    os.write(w, b"one")
    with cond:
        assert cond.wait_for(lambda: got == [b"one"], TIMEOUT)
    dispatcher.modify_fd(r, 0)  # no events wanted
    dispatcher.modify_fd(r, select.EPOLLIN)
    os.write(w, b"two")
    with cond:
        assert cond.wait_for(lambda: got == [b"one", b"two"], TIMEOUT)
    dispatcher.remove_fd(r)
    with pytest.raises(KeyError):
        dispatcher.modify_fd(r, select.EPOLLIN)
    os.close(r)
    os.close(w)


def test_a_closed_dispatcher_refuses_to_bind_or_add(host, pair) -> None:
    """bind_interdomain(), bind_unbound_port() and add_fd() of a closed
    dispatcher raise RuntimeError, as their docstrings say, before the
    handle is asked: the guest's port stays unbound, for another to bind."""
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    dispatcher.close()
    with pytest.raises(RuntimeError, match="event dispatcher is closed"):
        dispatcher.bind_interdomain(guest.domid, remote, lambda port: None)
    with pytest.raises(RuntimeError, match="event dispatcher is closed"):
        dispatcher.bind_unbound_port(guest.domid, lambda port: None)
    r, w = os.pipe()
    try:
        with pytest.raises(RuntimeError, match="event dispatcher is closed"):
            dispatcher.add_fd(r, select.EPOLLIN, lambda fd, events: None)
    finally:
        os.close(r)
        os.close(w)
    other = EventDispatcher(host.dom0)
    try:
        assert other.bind_interdomain(guest.domid, remote, lambda port: None) in other.ports
    finally:
        other.close()


def test_running_port_is_the_port_whose_callback_the_caller_runs(host, pair) -> None:
    """What stop() asks before it waits for ports to be unbound: the port
    in its own callback, and None in an fd's callback (whose unbind
    nobody waits for), in any other thread while a callback runs, and
    once the dispatcher is closed."""
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    seen: list[tuple[str, int | None]] = []
    inside = threading.Event()
    release = threading.Event()

    def on_port(_port: int) -> None:
        seen.append(("port", dispatcher.running_port()))
        inside.set()
        release.wait(TIMEOUT)

    def on_fd(fd: int, _events: int) -> None:
        os.read(fd, 1)
        seen.append(("fd", dispatcher.running_port()))
        inside.set()

    local = dispatcher.bind_interdomain(guest.domid, remote, on_port)
    assert dispatcher.running_port() is None
    evtchn.notify(remote)
    assert inside.wait(TIMEOUT)
    assert dispatcher.running_port() is None  # not this thread's callback
    assert seen == [("port", local)]
    inside.clear()
    release.set()
    r, w = os.pipe()
    try:
        dispatcher.add_fd(r, select.EPOLLIN, on_fd)
        os.write(w, b"x")
        assert inside.wait(TIMEOUT)
        dispatcher.remove_fd(r)  # waits for on_fd to return
    finally:
        os.close(r)
        os.close(w)
    assert seen == [("port", local), ("fd", None)]
    dispatcher.close()
    assert dispatcher.running_port() is None


def test_an_fd_must_be_a_number(pair) -> None:
    """epoll takes any object with fileno(), so add_fd(sock, ...) was
    registered, but the callback was looked up by the number epoll
    reports, found nothing, and never ran: the socket went unserved
    without a word.  It is refused, naming what to pass."""
    _guest, _evtchn, dispatcher = pair
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(TypeError,
                           match=r"fd must be an int .* not socket: pass its fileno\(\)"):
            dispatcher.add_fd(a, select.EPOLLIN, lambda fd, events: None)  # type: ignore[arg-type]
        # Nothing was registered: the number itself can be added.
        ready = threading.Semaphore(0)
        dispatcher.add_fd(a.fileno(), select.EPOLLIN | select.EPOLLONESHOT,
                          lambda fd, events: ready.release())
        # Nor changed or removed by what only equals the number: remove_fd()
        # dropped the callback, then epoll refused the float, leaving the
        # fd registered there with no callback, and the number unusable.
        for call in (lambda fd: dispatcher.modify_fd(fd, select.EPOLLIN),
                     dispatcher.remove_fd):
            with pytest.raises(TypeError, match="fd must be an int .* not float"):
                call(float(a.fileno()))  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="fd must be an int .* not bool"):
                call(True)  # fd 1 to a dict, refused by add_fd() too
        b.send(b"x")
        assert ready.acquire(timeout=TIMEOUT)  # still served
        dispatcher.remove_fd(a.fileno())


def test_a_port_or_fd_number_may_be_an_int_subclass(host, pair) -> None:
    """An IntEnum is an int, and is one to the xen platform (a uint32_t):
    unbind() refused it (only an exact int passed), while add_fd() took
    it.  Every call taking a port or an fd takes what the xen platform
    takes, so a backend's numbering works on both."""
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    fired = threading.Semaphore(0)
    local = dispatcher.bind_interdomain(guest.domid, remote, lambda _port: fired.release())
    Port = enum.IntEnum("Port", {"LOCAL": local, "REMOTE": remote})
    evtchn.notify(Port.REMOTE)
    assert fired.acquire(timeout=TIMEOUT)
    dispatcher.notify(Port.LOCAL)
    ready, _, _ = select.select([evtchn.fileno()], [], [], TIMEOUT)
    assert ready and evtchn.pending() == remote
    dispatcher.unbind(Port.LOCAL)
    assert dispatcher.ports == []
    a, b = socket.socketpair()
    with a, b:
        Fd = enum.IntEnum("Fd", {"A": a.fileno()})
        ready = threading.Semaphore(0)
        dispatcher.add_fd(Fd.A, select.EPOLLIN | select.EPOLLONESHOT,
                          lambda fd, events: ready.release())
        b.send(b"x")
        assert ready.acquire(timeout=TIMEOUT)
        a.recv(1)
        dispatcher.modify_fd(Fd.A, select.EPOLLIN | select.EPOLLONESHOT)
        b.send(b"x")
        assert ready.acquire(timeout=TIMEOUT)
        dispatcher.remove_fd(Fd.A)


def test_a_port_notified_again_in_every_callback_does_not_starve_the_fds(host, pair) -> None:
    """A guest can notify its port again before each callback has returned,
    so that the port is pending again at every unmask: the dispatcher
    takes a bounded batch of ports per round, and the fds are served."""
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    stormed, served = threading.Semaphore(0), threading.Event()

    def hammered(port: int) -> None:
        stormed.release()
        if not served.is_set():
            evtchn.notify(remote)  # the guest, again and again

    dispatcher.bind_interdomain(guest.domid, remote, hammered)
    r, w = os.pipe()
    dispatcher.add_fd(r, select.EPOLLIN, lambda fd, _events: (os.read(fd, 100), served.set()))
    evtchn.notify(remote)
    for _ in range(200):  # well into the storm: more than one round of ports
        assert stormed.acquire(timeout=TIMEOUT)
    os.write(w, b"x")
    assert served.wait(TIMEOUT)
    dispatcher.remove_fd(r)
    os.close(r)
    os.close(w)


def test_closed_dispatcher_refuses_work(host) -> None:
    dispatcher = EventDispatcher(host.dom0)
    dispatcher.close()
    dispatcher.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        dispatcher.add_fd(0, select.EPOLLIN, lambda fd, ev: None)


def test_a_callback_that_cannot_be_called_is_refused_at_once(host, pair) -> None:
    # Not on the dispatcher thread at every event, and nothing is bound.
    guest, evtchn, dispatcher = pair
    ports = host.hypervisor.stats()["ports"]
    with pytest.raises(TypeError, match="callback must be callable, not NoneType"):
        dispatcher.bind_unbound_port(guest.domid, None)
    remote = evtchn.bind_unbound_port(0)
    with pytest.raises(TypeError, match="not str"):
        dispatcher.bind_interdomain(guest.domid, remote, "handler")
    r, w = os.pipe()
    with pytest.raises(TypeError, match="not int"):
        dispatcher.add_fd(r, select.EPOLLIN, 5)
    dispatcher.add_fd(r, select.EPOLLIN, lambda fd, ev: None)  # r was not registered
    dispatcher.remove_fd(r)
    evtchn.unbind(remote)
    assert host.hypervisor.stats()["ports"] == ports
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("failing", ["epoll", "thread"])
def test_a_dispatcher_that_fails_to_start_keeps_nothing(host, monkeypatch, failing) -> None:
    # Out of descriptors or threads: the event channel handle, epoll set
    # and pipe opened before must not stay open behind the error (each
    # try would hold more of what is short already).
    import types

    import xenback.events

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError(24, "Too many open files")

    if failing == "epoll":
        fake = types.SimpleNamespace(epoll=refuse, EPOLLIN=select.EPOLLIN)
        monkeypatch.setattr(xenback.events, "select", fake)
    else:
        class Unstartable(threading.Thread):
            start = refuse  # type: ignore[assignment]

        monkeypatch.setattr(xenback.events, "threading", types.SimpleNamespace(
            Lock=threading.Lock, Condition=threading.Condition, Thread=Unstartable))

    def handles() -> int:
        return host.hypervisor.stats()["connections"]

    def made() -> frozenset[tuple[int, str]]:
        """Descriptors of the kinds the making opens, not a count of the
        process's, which other threads change."""
        return frozenset(d for d in descriptors()
                         if d[1].startswith("pipe:") or d[1] == "anon_inode:[eventpoll]")

    before = handles(), made(), sockets_named_under(host.run_dir)
    with pytest.raises(OSError, match="Too many open files") as refused:
        EventDispatcher(host.dom0)
    monkeypatch.undo()
    # Looked at with the error held, as its caller holds it: its traceback
    # keeps the dispatcher, which would keep an epoll it did not close.
    assert made() <= before[1]
    del refused
    # The host (in this process) forgets a closed handle on its service
    # thread, after close() returned: poll, once the service has seen it.
    service_caught_up(host.dom0)
    assert eventually(lambda: handles() == before[0], TIMEOUT)
    assert eventually(lambda: sockets_named_under(host.run_dir) <= before[2], TIMEOUT)


def test_a_dispatcher_that_fails_to_start_leaves_what_into_held(host, monkeypatch) -> None:
    """With ``into``, a making that fails appends nothing, and takes off
    nothing that the list held before: here, another dispatcher, which
    its caller would then lose, running."""
    import types

    import xenback.events

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError(24, "Too many open files")

    first = EventDispatcher(host.dom0, thread=False)
    try:
        made = [first]
        fake = types.SimpleNamespace(epoll=refuse, EPOLLIN=select.EPOLLIN)
        monkeypatch.setattr(xenback.events, "select", fake)
        with pytest.raises(OSError, match="Too many open files"):
            EventDispatcher(host.dom0, into=made)
        monkeypatch.undo()
        assert made == [first]
    finally:
        first.close()


@pytest.mark.parametrize("into", [False, True])
def test_a_dispatcher_interrupted_anywhere_in_its_making_is_whole_or_nothing(
        host, caplog, into: bool) -> None:
    """A Ctrl-C landing as any call of EventDispatcher() returns, or as any
    of its frames starts: either the dispatcher is handed back running,
    or nothing of it is left.  Landing as its thread's start() returned,
    it closed the descriptors that thread waits on and left it running,
    for ever and unknown to anybody, on closed (and then reused) ones.
    With ``into``, the dispatcher is found there if and only if it runs,
    also after a Ctrl-C as the constructor returns."""
    from tests.stolensignal import interrupted_at

    within = os.path.dirname(events.__file__)
    caplog.set_level(logging.DEBUG, logger="xenback.events")
    landed: list[str] = []
    for n in itertools.count():
        before = {t.ident for t in threading.enumerate()}
        made: list[EventDispatcher] = []
        if into:
            where = interrupted_at(
                n, within, lambda made=made: EventDispatcher(host.dom0, into=made))
        else:
            where = interrupted_at(
                n, within, lambda made=made: made.append(EventDispatcher(host.dom0)))
        if made:
            (dispatcher,) = made
            try:
                assert_dispatches(dispatcher, where)
            finally:
                dispatcher.close()
        assert not leaked_threads(before), f"interrupted {where}: {leaked_threads(before)}"
        # Nor did the thread meet a closed descriptor on its way out.
        assert [rec.getMessage() for rec in caplog.records
                if rec.name == "xenback.events"] == [], f"interrupted {where}"
        if not where:
            break
        landed.append(where)
    assert any("EventDispatcher.__init__" in where for where in landed), landed


def test_close_from_a_port_callback_stops_quietly(host, caplog) -> None:
    # close() from a callback skips joining its own thread; the dispatcher
    # must then stop without touching the handle close() just closed.
    guest = host.create_domain("guest")
    evtchn = guest.evtchn()
    dispatcher = EventDispatcher(host.dom0, name="xb-close-in-callback")
    (thread,) = [t for t in threading.enumerate() if t.name == "xb-close-in-callback"]
    remote = evtchn.bind_unbound_port(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: dispatcher.close())
    try:
        evtchn.notify(remote)
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        with pytest.raises(RuntimeError, match="closed"):
            dispatcher.bind_unbound_port(guest.domid, lambda _port: None)
    finally:
        evtchn.close()


def test_a_close_interrupted_in_its_wait_is_finished_by_the_next(host) -> None:
    """Ctrl-C while close() waits for a callback to return: the handle must
    stay open under the callback, and the next close() must release it
    instead of returning at once."""
    guest = host.create_domain("guest")
    evtchn = guest.evtchn()
    dispatcher = EventDispatcher(host.dom0)
    remote = evtchn.bind_unbound_port(0)
    inside = threading.Event()
    release = threading.Event()

    def callback(port: int) -> None:
        inside.set()
        assert release.wait(TIMEOUT)

    local = dispatcher.bind_interdomain(guest.domid, remote, callback)
    try:
        evtchn.notify(remote)
        assert inside.wait(TIMEOUT)

        def main_waits() -> bool:
            return main_thread_in("_wait_for_tstate_lock", path="threading")

        try:
            interrupt(main_waits, dispatcher.close)
            # Not unbound, not closed under the callback.
            assert dispatcher.ports == [local] and not dispatcher._epoll.closed
            with pytest.raises(RuntimeError, match="closed"):
                dispatcher.bind_unbound_port(guest.domid, callback)
        finally:
            release.set()
        dispatcher.close()
        assert dispatcher.ports == [] and dispatcher._epoll.closed
        dispatcher.wakeup()  # a no-op now, not a write to a stale descriptor
        dispatcher.close()
    finally:
        release.set()
        dispatcher.close()
        evtchn.close()


def test_a_close_interrupted_in_an_unbind_still_closes_the_descriptors(
        host, monkeypatch) -> None:
    """Ctrl-C while close() unbinds the ports (a round trip to the
    hypervisor each): no later close() would close the handle, the epoll
    and the wake-up pipe, so that one does; the handle takes the ports
    left with it."""
    guest = host.create_domain("guest")
    evtchn = guest.evtchn()
    dispatcher = EventDispatcher(host.dom0)
    try:
        for _ in range(2):
            dispatcher.bind_interdomain(
                guest.domid, evtchn.bind_unbound_port(0), lambda port: None)
        handle = dispatcher._evtchn
        unbind = handle.unbind

        def interrupted_unbind(port: int) -> None:
            unbind(port)
            raise Interrupted

        monkeypatch.setattr(handle, "unbind", interrupted_unbind)
        with pytest.raises(Interrupted):
            dispatcher.close()
        assert dispatcher._epoll.closed and handle._closed and dispatcher.ports == []
        dispatcher.close()  # nothing left to do
    finally:
        dispatcher.close()
        evtchn.close()


@pytest.mark.parametrize("which", ["bind_interdomain", "bind_unbound_port"])
def test_a_bind_interrupted_anywhere_leaves_no_port_the_dispatcher_does_not_hold(
        host, pair, which: str) -> None:
    """A Ctrl-C landing as any call of a bind returns, or as any of its
    frames starts: the bind raises and nothing is bound, or it returns
    the port, listed.  Landing as the handle's bind returned, the number
    was lost before it was listed; as the lock's release returned, it was
    listed but its number known to no caller: either way the port stayed
    bound until the dispatcher's handle closed (the backend's life)."""
    from tests.stolensignal import interrupted_at

    guest, evtchn, dispatcher = pair
    within = os.path.dirname(events.__file__)
    baseline = host.hypervisor.stats()["ports"]
    landed: list[str] = []
    for n in itertools.count():
        remote = evtchn.bind_unbound_port(0)
        if which == "bind_interdomain":
            def bind(remote: int = remote) -> object:
                return dispatcher.bind_interdomain(guest.domid, remote, lambda _port: None)
        else:
            def bind(remote: int = remote) -> object:
                return dispatcher.bind_unbound_port(guest.domid, lambda _port: None)
        # Not the simulated host's frames: its handle is the platform.
        where = interrupted_at(n, within, bind, besides=os.path.join(within, "sim"))
        # The guest's port, plus the dispatcher's if the bind returned it:
        # no other.  One listed by a bind that raised would be bound for
        # the dispatcher's life, its number known to no caller.
        assert len(dispatcher.ports) == (0 if where else 1), where
        assert host.hypervisor.stats()["ports"] == baseline + 1 + len(dispatcher.ports), where
        for port in dispatcher.ports:
            dispatcher.unbind(port)
        evtchn.unbind(remote)
        assert host.hypervisor.stats()["ports"] == baseline, where
        if not where:
            break
        landed.append(where)
    assert any(f"EventDispatcher.{which}" in where for where in landed), landed


@pytest.mark.parametrize("call", ["unbind", "give-back"])
def test_an_unbind_interrupted_anywhere_leaves_its_port_listed_if_and_only_if_bound(
        host, pair, call: str) -> None:
    """A Ctrl-C landing as any call of an unbind, or of the give-back of a
    bind that a first Ctrl-C cut short, returns, or as any of its frames
    starts: the port is still bound and listed (the unbind done again
    unbinds it), or neither.  Unlisted by a call before the handle's
    unbind, one landing as that call returned left the port bound, known
    to no caller, until the dispatcher's handle closed.  Not in the
    handle's own frames: cut short there, its unbind may or may not have
    been done, and the port is unlisted all the same (listed, an unbind
    done again could take the number from its next owner)."""
    from tests.stolensignal import interrupted_at

    guest, evtchn, dispatcher = pair
    within = os.path.dirname(events.__file__)
    baseline = host.hypervisor.stats()["ports"]

    def callback(_port: int) -> None:
        pass

    def unbind(port: int) -> None:
        if call == "unbind":
            dispatcher.unbind(port)
        else:
            dispatcher._give_back([port], callback)

    landed = 0
    for n in itertools.count():
        remote = evtchn.bind_unbound_port(0)
        port = dispatcher.bind_interdomain(guest.domid, remote, callback)
        # Not the handle's frames: the simulated host's, and the checks
        # of the platform module that it calls.
        where = interrupted_at(n, within, lambda port=port: unbind(port),
                               besides=(os.path.join(within, "sim"),
                                        os.path.join(within, "platform.py")))
        listed = dispatcher.ports
        assert listed in ([], [port]), where
        assert host.hypervisor.stats()["ports"] == baseline + 1 + len(listed), where
        for port in listed:
            dispatcher.unbind(port)
        evtchn.unbind(remote)
        assert host.hypervisor.stats()["ports"] == baseline, where
        if not where:
            break
        landed += 1
    assert landed >= 3


def test_an_unbind_naming_a_callback_leaves_alone_a_port_bound_with_another(host, pair) -> None:
    """unbind(port, callback) unbinds a port bound with that callback (or
    one equal to it: a bound method is made anew at each look-up), and
    refuses one bound with another, which stays bound and listed: the
    number an owner kept on record, bound since by someone else."""
    guest, evtchn, dispatcher = pair

    class Owner:
        def on_event(self, port: int) -> None:
            pass

    owner, other = Owner(), Owner()
    baseline = host.hypervisor.stats()["ports"]
    remote = evtchn.bind_unbound_port(0)
    port = dispatcher.bind_interdomain(guest.domid, remote, other.on_event)
    with pytest.raises(KeyError, match=f"port {port} is not bound here with that callback"):
        dispatcher.unbind(port, owner.on_event)
    assert dispatcher.ports == [port]
    assert host.hypervisor.stats()["ports"] == baseline + 2
    dispatcher.unbind(port, other.on_event)
    assert dispatcher.ports == []
    with pytest.raises(KeyError, match=f"port {port} is not bound here'$"):
        dispatcher.unbind(port, other.on_event)
    evtchn.unbind(remote)
    assert host.hypervisor.stats()["ports"] == baseline


def test_an_unbind_naming_a_callback_tells_owners_apart_by_identity(host, pair) -> None:
    """Two owners' callbacks may be equal (a dataclass's that is called,
    say, of equal fields): the port bound with one is not unbound by an
    unbind naming the other, and no callback's own __eq__ runs (it would
    run under the dispatcher's lock).  A bound method names its port
    still, made anew or not, and a builtin one too."""
    guest, evtchn, dispatcher = pair
    compared: list[object] = []

    class Kick:
        def __init__(self, what: str) -> None:
            self.what = what

        def __call__(self, port: int) -> None:
            pass

        def __eq__(self, other: object) -> bool:
            compared.append(other)
            return isinstance(other, Kick) and other.what == self.what

        __hash__ = object.__hash__

    baseline = host.hypervisor.stats()["ports"]
    remote = evtchn.bind_unbound_port(0)
    mine, theirs = Kick("socket"), Kick("socket")
    port = dispatcher.bind_interdomain(guest.domid, remote, theirs)
    with pytest.raises(KeyError, match="with that callback"):
        dispatcher.unbind(port, mine)
    assert dispatcher.ports == [port] and not compared
    assert host.hypervisor.stats()["ports"] == baseline + 2
    dispatcher.unbind(port, theirs)
    seen: list[int] = []
    port = dispatcher.bind_interdomain(guest.domid, remote, seen.append)
    dispatcher.unbind(port, seen.append)
    assert dispatcher.ports == []
    evtchn.unbind(remote)
    assert host.hypervisor.stats()["ports"] == baseline


@pytest.mark.parametrize("call", ["add_fd", "remove_fd"])
def test_an_fd_call_interrupted_anywhere_leaves_the_fd_listed_if_and_only_if_watched(
        pair, call: str) -> None:
    """A Ctrl-C landing as any call of an add_fd or a remove_fd returns, or
    as any of its frames starts: the fd is watched and listed (remove_fd
    takes it out), or neither, and may be added again.  Listed after
    epoll's register, or unlisted before its unregister, one landing
    between left the fd in the epoll set with no callback, and every
    add_fd of it refused (EEXIST): a listener's LISTEN done again after
    its undo was cut short so."""
    from tests.stolensignal import interrupted_at

    _guest, _evtchn, dispatcher = pair
    within = os.path.dirname(events.__file__)
    r, w = os.pipe()

    def add() -> None:
        dispatcher.add_fd(r, select.EPOLLIN, lambda _fd, _events: None)

    landed = 0
    try:
        for n in itertools.count():
            if call == "add_fd":
                where = interrupted_at(n, within, add)
            else:
                add()
                where = interrupted_at(n, within, lambda: dispatcher.remove_fd(r))
            with contextlib.suppress(KeyError):
                dispatcher.remove_fd(r)
            try:
                add()
            except FileExistsError:
                pytest.fail(f"{where}: the fd stayed in the epoll set, unlisted")
            dispatcher.remove_fd(r)
            if not where:
                break
            landed += 1
    finally:
        os.close(r)
        os.close(w)
    assert landed >= 3


def test_an_fd_that_epoll_refuses_is_not_listed(pair) -> None:
    """Refused by epoll itself (a regular file): add_fd lists the fd
    before the register, and takes it back."""
    _guest, _evtchn, dispatcher = pair
    with open(__file__) as f:
        with pytest.raises(PermissionError):
            dispatcher.add_fd(f.fileno(), select.EPOLLIN, lambda _fd, _events: None)
        with pytest.raises(KeyError):
            dispatcher.remove_fd(f.fileno())


def test_an_interrupted_bind_leaves_alone_its_port_number_rebound_meanwhile(
        host, pair, monkeypatch) -> None:
    """A bind interrupted once it had listed its port, which another thread
    unbound (its callback may, knowing the number) and another bind got the
    number of again before the give-back took the lock: that port is the
    other bind's, listed with its callback, and stays so."""
    from tests.racewindow import Attempt, PauseAt

    guest, evtchn, dispatcher = pair
    real_bind = dispatcher._bind

    def interrupted(*args: object) -> None:
        real_bind(*args)
        raise KeyboardInterrupt  # as the lock's release returned, say

    monkeypatch.setattr(dispatcher, "_bind", interrupted)
    pause = PauseAt.in_method(monkeypatch, EventDispatcher, "_give_back", "with self._lock")
    attempt = Attempt(lambda: dispatcher.bind_unbound_port(guest.domid, lambda _port: None))
    assert pause.reached.wait(TIMEOUT)
    (port,) = dispatcher.ports
    dispatcher.unbind(port)
    monkeypatch.setattr(dispatcher, "_bind", real_bind)

    def other(_port: int) -> None:
        pass

    assert dispatcher.bind_unbound_port(guest.domid, other) == port  # the number again
    ports = host.hypervisor.stats()["ports"]
    pause.resume()
    assert isinstance(attempt.result(), KeyboardInterrupt)
    assert dispatcher._ports == {port: other}
    assert host.hypervisor.stats()["ports"] == ports


def _interrupt_binds(monkeypatch, dispatcher: EventDispatcher,
                     then: Callable[[], object] = lambda: None) -> None:
    """Make the dispatcher's binds interrupted once they listed their port
    (as the lock's release returned, say), after ``then()``."""
    real_bind = dispatcher._bind

    def interrupted(*args: object) -> None:
        real_bind(*args)
        then()
        raise KeyboardInterrupt

    monkeypatch.setattr(dispatcher, "_bind", interrupted)


def test_an_interrupted_bind_s_give_back_after_a_racing_close_calls_nothing_on_the_handle(
        host, pair, monkeypatch) -> None:
    """The dispatcher closed by another thread before the give-back took the
    lock: close() unbound the port (or closing the handle did), and the
    give-back leaves the closed handle alone."""
    from tests.racewindow import Attempt, PauseAt

    guest, evtchn, dispatcher = pair
    _interrupt_binds(monkeypatch, dispatcher)
    pause = PauseAt.in_method(monkeypatch, EventDispatcher, "_give_back", "with self._lock")
    attempt = Attempt(lambda: dispatcher.bind_unbound_port(guest.domid, lambda _port: None))
    assert pause.reached.wait(TIMEOUT)
    dispatcher.close()
    unbound: list[int] = []
    monkeypatch.setattr(dispatcher._evtchn, "unbind", unbound.append)
    pause.resume()
    assert isinstance(attempt.result(), KeyboardInterrupt)
    assert unbound == []


def test_an_interrupted_bind_s_give_back_that_fails_raises_the_interrupt(
        host, pair, monkeypatch, caplog) -> None:
    """The handle refusing to unbind the port an interrupted bind gives
    back: the caller gets the Ctrl-C, not that error (an except of its own
    for it would swallow the Ctrl-C), and the failure is logged."""
    guest, evtchn, dispatcher = pair
    _interrupt_binds(monkeypatch, dispatcher)

    def refuse(port: int) -> None:
        raise EventChannelError(errno.ENOMEM, f"unbinding port {port}: out of memory")

    monkeypatch.setattr(dispatcher._evtchn, "unbind", refuse)
    with caplog.at_level(logging.DEBUG, logger="xenback.events"):
        with pytest.raises(KeyboardInterrupt):
            dispatcher.bind_unbound_port(guest.domid, lambda _port: None)
    assert dispatcher.ports == []
    assert "giving back port" in caplog.text and "out of memory" in caplog.text


def test_an_interrupted_bind_gives_back_its_port_once_its_running_callback_returned(
        host, pair, monkeypatch) -> None:
    """The port an interrupted bind listed fired, its callback running on
    the dispatcher thread: the give-back waits for the callback to return
    before it unbinds, as unbind() does, so that the caller, which gets the
    Ctrl-C, may free what the callback uses."""
    from tests.racewindow import Attempt, stands_at

    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    inside, release = threading.Event(), threading.Event()
    order: list[str] = []

    def callback(_port: int) -> None:
        inside.set()
        release.wait(TIMEOUT)
        order.append("callback returned")

    def fire() -> None:
        evtchn.notify(remote)
        assert inside.wait(TIMEOUT)

    _interrupt_binds(monkeypatch, dispatcher, fire)
    real_unbind = dispatcher._evtchn.unbind

    def unbind(port: int) -> None:
        order.append("unbound")
        real_unbind(port)

    monkeypatch.setattr(dispatcher._evtchn, "unbind", unbind)
    attempt = Attempt(lambda: dispatcher.bind_interdomain(guest.domid, remote, callback))
    assert inside.wait(TIMEOUT)
    # Until the give-back waits (or, wrongly, has unbound already and ended).
    assert eventually(lambda: not attempt.thread.is_alive() or stands_at(
        attempt.thread.ident or 0, EventDispatcher._wait_idle, "self._idle.wait("))
    release.set()
    assert isinstance(attempt.result(), KeyboardInterrupt)
    assert order == ["callback returned", "unbound"]
    assert dispatcher.ports == []
    evtchn.unbind(remote)


def test_frontend_side_port_from_bind_unbound_port(host, pair) -> None:
    """The dispatcher may offer a port (a frontend's side): the guest binds
    to it, and its notifications reach the callback."""
    guest, evtchn, dispatcher = pair
    fired = threading.Semaphore(0)
    calls: list[int] = []

    def callback(port: int) -> None:
        calls.append(port)
        fired.release()

    local = dispatcher.bind_unbound_port(guest.domid, callback)
    assert dispatcher.ports == [local]
    remote = evtchn.bind_interdomain(0, local)
    evtchn.notify(remote)
    assert fired.acquire(timeout=TIMEOUT)
    assert calls == [local]
    dispatcher.notify(local)  # and back to the guest
    ready, _, _ = select.select([evtchn.fileno()], [], [], TIMEOUT)
    assert ready and evtchn.pending() == remote
    dispatcher.unbind(local)
    assert dispatcher.ports == []


def test_failing_fd_callback_is_logged_and_dispatch_goes_on(pair, caplog) -> None:
    _guest, _evtchn, dispatcher = pair
    bad_r, bad_w = os.pipe()
    good_r, good_w = os.pipe()
    got = threading.Semaphore(0)

    def bad(fd: int, events: int) -> None:
        os.read(fd, 100)
        raise RuntimeError(f"fd callback of {fd} broke")

    dispatcher.add_fd(bad_r, select.EPOLLIN, bad)
    dispatcher.add_fd(good_r, select.EPOLLIN, lambda fd, ev: (os.read(fd, 100), got.release()))
    try:
        for _ in range(2):
            os.write(bad_w, b"x")
            os.write(good_w, b"x")
            assert got.acquire(timeout=TIMEOUT)
        # The failing fd stays registered and is dispatched each time.
        with pytest.raises(ValueError, match="already registered"):
            dispatcher.add_fd(bad_r, select.EPOLLIN, bad)
        failures = [r for r in caplog.records if r.getMessage() == f"fd {bad_r}: callback failed"]
        assert len(failures) >= 1
        assert all(r.exc_info and str(r.exc_info[1]) == f"fd callback of {bad_r} broke"
                   for r in failures)
    finally:
        dispatcher.remove_fd(bad_r)
        dispatcher.remove_fd(good_r)
        for fd in (bad_r, bad_w, good_r, good_w):
            os.close(fd)
    with pytest.raises(KeyError, match=f"fd {bad_r} is not registered"):
        dispatcher.remove_fd(bad_r)


def test_the_host_going_away_leaves_fds_served_and_close_working(caplog) -> None:
    from xenback.sim import SimHost

    host = SimHost()
    host.start()
    try:
        guest = host.create_domain("guest")
        evtchn = guest.evtchn()
        dispatcher = EventDispatcher(host.dom0)
        remote = evtchn.bind_unbound_port(0)
        local = dispatcher.bind_interdomain(guest.domid, remote, lambda _port: None)
    finally:
        host.close()
    r, w = os.pipe()
    got = threading.Event()
    dispatcher.add_fd(r, select.EPOLLIN, lambda fd, ev: (os.read(fd, 10), got.set()))
    os.write(w, b"x")
    assert got.wait(TIMEOUT)
    caplog.set_level(logging.DEBUG, logger="xenback.events")
    dispatcher.close()  # the port cannot be unbound any more: no error
    assert [r.getMessage() for r in caplog.records if r.name == "xenback.events"] == [
        f"unbinding port {local} at close failed"
    ]
    assert dispatcher.ports == []
    evtchn.close()
    os.close(r)
    os.close(w)


def test_a_failing_handle_is_reported_once_and_polled_no_more(pair, monkeypatch, caplog) -> None:
    """A handle whose pending() fails (the hypervisor side went away) while
    its descriptor stays readable: reported once and dropped from the
    poll, so that the thread does not spin on it; the fds are still served."""
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: None)
    failures: list[int] = []
    failed = threading.Event()

    def pending() -> int | None:
        failures.append(1)
        failed.set()
        raise OSError(errno.EIO, "the handle died")

    monkeypatch.setattr(dispatcher._evtchn, "pending", pending)
    evtchn.notify(remote)  # the handle's descriptor turns readable, for good
    assert failed.wait(TIMEOUT)
    r, w = os.pipe()
    served = threading.Semaphore(0)
    dispatcher.add_fd(r, select.EPOLLIN, lambda fd, _events: (os.read(fd, 10), served.release()))
    for _ in range(3):  # three more rounds of the dispatcher thread at least
        os.write(w, b"x")
        assert served.acquire(timeout=TIMEOUT)
    assert len(failures) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "xenback.events"] == [
        "event channel handle failed; ports are no longer dispatched"
    ]
    dispatcher.remove_fd(r)
    os.close(r)
    os.close(w)


def test_a_port_callback_failing_at_every_event_is_logged_within_a_rate_limit(
        pair, caplog) -> None:
    """A guest notifies as often as it likes: a callback that raises at
    every event must not put a traceback in the host's log for each one.
    The first few go out, the rest are counted (xenback.RateLimit)."""
    _guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    ran = threading.Semaphore(0)

    def broken(port: int) -> None:
        ran.release()
        raise RuntimeError("broken callback")

    local = dispatcher.bind_interdomain(_guest.domid, remote, broken)
    caplog.set_level(logging.ERROR, logger="xenback.events")
    for _ in range(50):
        evtchn.notify(remote)
        assert ran.acquire(timeout=TIMEOUT)  # one run per event: masked until it returned
    dispatcher.unbind(local)
    failures = [r for r in caplog.records
                if r.getMessage() == f"event channel port {local}: callback failed"]
    assert 1 <= len(failures) <= 10, len(failures)
    assert all(r.exc_info and str(r.exc_info[1]) == "broken callback" for r in failures)
    # What was held back is counted, at the latest when the dispatcher closes.
    dispatcher.close()
    suppressed = [int(r.getMessage().split(": ")[1].split()[0]) for r in caplog.records
                  if r.getMessage().startswith("xenback-events callbacks: ")]
    assert len(failures) + sum(suppressed) == 50


def test_an_fd_callback_failing_at_every_event_is_logged_within_the_same_limit(
        pair, caplog) -> None:
    """As a port's: an fd's callback that raises whenever its descriptor
    is ready goes through the dispatcher's rate limit, and what was held
    back is counted when the dispatcher closes."""
    _guest, _evtchn, dispatcher = pair
    r, w = os.pipe()
    ran = threading.Semaphore(0)

    def broken(fd: int, _revents: int) -> None:
        os.read(fd, 1)
        ran.release()
        raise RuntimeError("broken fd callback")

    caplog.set_level(logging.ERROR, logger="xenback.events")
    dispatcher.add_fd(r, select.EPOLLIN, broken)
    try:
        for _ in range(50):
            os.write(w, b"x")
            assert ran.acquire(timeout=TIMEOUT)
        dispatcher.remove_fd(r)
    finally:
        os.close(r)
        os.close(w)
    failures = [rec for rec in caplog.records if rec.getMessage() == f"fd {r}: callback failed"]
    assert 1 <= len(failures) <= 10, len(failures)
    assert all(rec.exc_info and str(rec.exc_info[1]) == "broken fd callback" for rec in failures)
    dispatcher.close()
    suppressed = [int(rec.getMessage().split(": ")[1].split()[0]) for rec in caplog.records
                  if rec.getMessage().startswith("xenback-events callbacks: ")]
    assert len(failures) + sum(suppressed) == 50


@pytest.mark.parametrize("step, exc, after", [
    # pending() took a port, masked now, and raised: only a resync finds it.
    ("pending", RuntimeError("a bug"), True),
    ("pending", RuntimeError("a bug"), False),
    # The port was left masked.
    ("unmask", EventChannelError(errno.EIO, "a transient failure"), False),
    ("unmask", RuntimeError("a bug"), False),
], ids=["pending-took-a-port", "pending", "unmask-oserror", "unmask-bug"])
def test_the_thread_survives_a_failing_handle_and_loses_no_event(
        pair, monkeypatch, caplog, step: str, exc: Exception, after: bool) -> None:
    """A pending() or unmask() that raises once (other than pending()'s
    OSError: see below) ended the dispatcher's thread, and with it every
    port and fd of the dispatcher (a pvcalls backend's command rings,
    listening sockets and lingerer).  The thread logs it and hands every
    event out again: the port's callback runs and the port is unmasked."""
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    fired = threading.Semaphore(0)
    local = dispatcher.bind_interdomain(guest.domid, remote, lambda _port: fired.release())
    handle = dispatcher._evtchn
    monkeypatch.setattr(handle, step, fails_once(getattr(handle, step), exc, after=after))
    caplog.set_level(logging.ERROR, logger="xenback.events")
    evtchn.notify(remote)
    if step == "unmask":
        assert fired.acquire(timeout=TIMEOUT)  # before the unmask failed
    assert fired.acquire(timeout=TIMEOUT), "the event was lost"
    # The port is unmasked and the thread alive: events come through.
    for _ in range(3):
        evtchn.notify(remote)
        assert fired.acquire(timeout=TIMEOUT)
    assert dispatcher._thread is not None and dispatcher._thread.is_alive()
    failures = [r for r in caplog.records if r.name == "xenback.events"]
    assert [r.getMessage() for r in failures] == [
        "xenback-events: dispatching failed; every port and fd is handed out again"]
    assert failures[0].exc_info and failures[0].exc_info[1] is exc
    assert dispatcher.ports == [local]


def test_an_unmask_failing_at_every_call_costs_a_resync_per_wakeup(pair, monkeypatch) -> None:
    """A failure that stays does not make the thread spin: the resync that
    fails in its turn is done again after the next wake-up, not at once."""
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    fired = threading.Semaphore(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: fired.release())

    def unmask(port: int) -> None:
        raise EventChannelError(errno.EIO, "a failure that stays")

    monkeypatch.setattr(dispatcher._evtchn, "unmask", unmask)
    evtchn.notify(remote)
    assert fired.acquire(timeout=TIMEOUT)  # the event
    assert fired.acquire(timeout=TIMEOUT)  # the resync, at once; failed again
    assert not fired.acquire(timeout=0.2), "the thread resyncs without a wake-up"
    r, w = os.pipe2(os.O_NONBLOCK)
    woken = threading.Semaphore(0)

    def drain(fd: int, _events: int) -> None:
        # Called twice for the one byte: by the resync, then as ready.
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 1)
        woken.release()

    try:
        dispatcher.add_fd(r, select.EPOLLIN, drain)
        os.write(w, b"x")
        assert woken.acquire(timeout=TIMEOUT)
        assert fired.acquire(timeout=TIMEOUT)  # one resync for the wake-up
        assert not fired.acquire(timeout=0.2), "the thread resyncs without a wake-up"
    finally:
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


def test_an_overflowed_handle_is_reset_and_every_port_handed_out_again(
        pair, caplog) -> None:
    """pending() failing with EFBIG is Linux's evtchn device saying that
    its queue of fired ports overflowed, not that the handle died: the
    ports that fired since are masked and queued no more.  The dispatcher
    resets the handle and hands every port out again (it stopped
    dispatching ports for good)."""
    guest, evtchn, dispatcher = pair
    holding, held = threading.Event(), threading.Event()
    fired = threading.Semaphore(0)

    def hold(_port: int) -> None:
        holding.set()
        assert held.wait(TIMEOUT)

    remotes = [evtchn.bind_unbound_port(0) for _ in range(2)]
    dispatcher.bind_interdomain(guest.domid, remotes[0], hold)
    dispatcher.bind_interdomain(guest.domid, remotes[1], lambda _port: fired.release())
    caplog.set_level(logging.WARNING, logger="xenback.events")
    evtchn.notify(remotes[0])
    assert holding.wait(TIMEOUT)
    try:
        # Fired while the thread is busy, and lost in the overflow.
        evtchn.notify(remotes[1])
        assert select.select([dispatcher._evtchn_fd], [], [], TIMEOUT)[0]
        dispatcher._evtchn.overflow()
    finally:
        held.set()
    assert fired.acquire(timeout=TIMEOUT), "the port lost in the overflow was not handed out"
    for _ in range(3):  # unmasked, and the handle dispatched still
        evtchn.notify(remotes[1])
        assert fired.acquire(timeout=TIMEOUT)
    assert [r.getMessage() for r in caplog.records if r.name == "xenback.events"] == [
        "event channel handle overflowed: reset; every port is handed out again"]


def _a_round_went_by(dispatcher: EventDispatcher) -> None:
    """Return once the dispatcher thread has served an fd: any round it
    was in, a pending() call begun before now included, is over."""
    r, w = os.pipe()
    served = threading.Event()
    dispatcher.add_fd(r, select.EPOLLIN, lambda _fd, _events: served.set())
    try:
        os.write(w, b"x")
        assert served.wait(TIMEOUT)
    finally:
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


def test_a_handle_whose_reset_fails_is_given_up_and_its_fds_served(
        pair, monkeypatch, caplog) -> None:
    """An overflow whose reset fails leaves the handle overflowed, its
    descriptor readable and its pending() failing, for good: it is given
    up as dead, as one whose pending() fails otherwise (not a failure of
    the dispatching, handed out and backed off from again and again),
    and the fds are served still."""
    _guest, _evtchn, dispatcher = pair

    def reset() -> None:
        raise OSError(errno.EIO, "the handle failed")

    monkeypatch.setattr(dispatcher._evtchn, "reset", reset)
    caplog.set_level(logging.WARNING, logger="xenback.events")
    dispatcher._evtchn.overflow()
    _a_round_went_by(dispatcher)
    _a_round_went_by(dispatcher)
    assert [rec.getMessage() for rec in caplog.records if rec.name == "xenback.events"] == [
        "resetting the event channel handle after its overflow failed",
        "event channel handle failed; ports are no longer dispatched"]


def test_a_pending_failing_at_every_call_backs_off_and_serves_the_fds(
        pair, monkeypatch, caplog) -> None:
    """A handle whose pending() raises at every call (a bug of the
    platform's handle, not an OSError) leaves its descriptor readable for
    good: the thread took it, failed, handed every event out, took it
    again at once, and so on, a CPU burnt for as long as the bug lasts.
    It backs off instead: after a second failure in a row the handle is
    left out of the wait for a delay that doubles up to a bound, its fds
    served meanwhile; each failure is logged with its traceback.  Once
    the handle works again, its ports are dispatched again."""
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    fired = threading.Semaphore(0)
    local = dispatcher.bind_interdomain(guest.domid, remote, lambda _port: fired.release())
    real = dispatcher._evtchn.pending
    bug = RuntimeError("a bug in the handle")
    calls = itertools.count()
    taken: list[int] = []
    broken = True

    def pending() -> int | None:
        next(calls)
        if broken:
            raise bug
        port = real()
        if port is not None:
            taken.append(port)
        return port

    monkeypatch.setattr(dispatcher._evtchn, "pending", pending)
    # A pending() of the real handle still under way (the handle woke the
    # thread for news of the service) took the notify below one run in
    # fifteen: the handle was not readable, and the thread did not back off.
    _a_round_went_by(dispatcher)
    caplog.set_level(logging.ERROR, logger="xenback.events")
    evtchn.notify(remote)  # never taken while the bug lasts: readable for good
    assert fired.acquire(timeout=TIMEOUT)  # the hand-out after the first failure
    r, w = os.pipe()
    served = threading.Semaphore(0)
    dispatcher.add_fd(r, select.EPOLLIN, lambda fd, _events: (os.read(fd, 1), served.release()))
    try:
        before = next(calls)
        for _ in range(3):  # served while the handle fails
            os.write(w, b"x")
            assert served.acquire(timeout=TIMEOUT)
        threading.Event().wait(0.5)  # what a spinning thread does meanwhile
        # Backing off from 10 ms, doubling: some 7 calls in the half second
        # (a spinning thread made tens of thousands).
        assert next(calls) - before < 30
        failures = [rec for rec in caplog.records if rec.name == "xenback.events"]
        assert failures and all(rec.exc_info and rec.exc_info[1] is bug for rec in failures)
        assert any("backing off" in rec.getMessage() for rec in failures)
        broken = False
        # The port is taken from the handle again, at the latest when the
        # back-off ends (a second at most).
        assert eventually(lambda: taken == [local], TIMEOUT)
        while fired.acquire(timeout=0):
            pass
        evtchn.notify(remote)
        assert fired.acquire(timeout=TIMEOUT)
        assert eventually(lambda: taken == [local, local], TIMEOUT)
    finally:
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


def test_the_back_off_doubles_up_to_its_bound_and_no_further(pair, monkeypatch, caplog) -> None:
    """The handle is left out of the wait for a delay doubled at each
    failure in a row, from the first up to the longest (a second, here
    shortened), which it then keeps: each failure that backs off says
    for how long."""
    monkeypatch.setattr(events, "_BACKOFF_FIRST", 0.001)
    monkeypatch.setattr(events, "_BACKOFF_MAX", 0.004)
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: None)

    def pending() -> int | None:
        evtchn.notify(remote)  # the handle readable again, for the next round
        raise RuntimeError("a bug in the handle")

    monkeypatch.setattr(dispatcher._evtchn, "pending", pending)
    caplog.set_level(logging.ERROR, logger="xenback.events")

    def backing_off() -> list[logging.LogRecord]:
        return [rec for rec in list(caplog.records) if "backing off" in rec.msg]

    evtchn.notify(remote)
    assert eventually(lambda: len(backing_off()) >= 6, TIMEOUT)
    assert [rec.args[-1] for rec in backing_off()[:6]] == [  # type: ignore[index]
        0.001, 0.002, 0.004, 0.004, 0.004, 0.004]


class SteadyOverflow:
    """The dispatcher's simulated handle made to overflow again as soon
    as each reset has emptied its queue, while ``on``: Linux's queue of
    fired ports overflowing as fast as the handle is reset.  Counts the
    resets, and the ports that pending() took."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, dispatcher: EventDispatcher) -> None:
        self.on = True
        self.resets = self.taken = 0
        handle = dispatcher._evtchn
        real_reset, real_pending = handle.reset, handle.pending

        def reset() -> None:
            real_reset()
            self.resets += 1
            if self.on:
                handle.overflow()

        def pending() -> int | None:
            port = real_pending()
            if port is not None:
                self.taken += 1
            return port

        monkeypatch.setattr(handle, "reset", reset)
        monkeypatch.setattr(handle, "pending", pending)
        self._handle = handle

    def start(self) -> None:
        self._handle.overflow()


def test_a_handle_overflowing_after_every_reset_does_not_spin_the_thread(
        pair, monkeypatch, caplog) -> None:
    """A handle whose queue overflows again at once after each reset had
    the thread reset it, hand every port out and reset it again, as fast
    as it could (a hundred thousand resets a second).  An overflow before
    a read found the queue empty since the reset is a failure of the
    dispatching, and backs off as one: the handle is left out of the
    wait, here for longer than the test, and the thread's fds are served
    meanwhile with no reset.  Counted over a window of fd events, not of
    time."""
    monkeypatch.setattr(events, "_BACKOFF_FIRST", 3600.0)
    monkeypatch.setattr(events, "_BACKOFF_MAX", 3600.0)
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: None)
    overflow = SteadyOverflow(monkeypatch, dispatcher)
    r, w = os.pipe()
    served = threading.Semaphore(0)
    dispatcher.add_fd(r, select.EPOLLIN, lambda fd, _events: (os.read(fd, 1), served.release()))
    caplog.set_level(logging.WARNING, logger="xenback.events")
    try:
        overflow.start()
        assert eventually(lambda: overflow.resets >= 1, TIMEOUT)
        before = overflow.resets
        for _ in range(100):
            os.write(w, b"x")
            assert served.acquire(timeout=TIMEOUT), "an fd went unserved"
        # Two overflows in a row may be the hand-out's (see events.py),
        # the third backs off.
        assert overflow.resets - before <= 2, "the thread resets the handle as it overflows"
        failures = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
        assert failures and all(
            rec.exc_info and isinstance(rec.exc_info[1], OSError)
            and rec.exc_info[1].errno == errno.EFBIG for rec in failures)
        assert "backing off" in failures[-1].getMessage()
    finally:
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


def test_a_handle_that_stops_overflowing_is_dispatched_again(pair, monkeypatch, caplog) -> None:
    """Once the overflow stops, the back-off ends and the ports are
    dispatched again; a read that finds the queue empty clears the
    count, so that a single overflow later is only reset, as ever."""
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    fired = threading.Semaphore(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: fired.release())
    overflow = SteadyOverflow(monkeypatch, dispatcher)
    # Every failure told: none held back by the rate limit.
    monkeypatch.setattr(dispatcher, "_breakdowns", RateLimit("test", burst=1000))
    caplog.set_level(logging.WARNING, logger="xenback.events")
    overflow.start()
    # The fourth reset comes after the handle was left out of the wait.
    assert eventually(lambda: overflow.resets >= 4, TIMEOUT)
    assert "backing off" in caplog.records[-1].getMessage()
    overflow.on = False

    def taken() -> bool:
        # A notify may go to the reset of an overflow left from before,
        # and its port to the hand-out after it: notified until taken.
        evtchn.notify(remote)
        return overflow.taken > 0

    # Taken from the handle, the back-off over: so is the overflow (the
    # dispatcher thread made the last one before it asked the handle).
    assert eventually(taken, TIMEOUT)
    _a_round_went_by(dispatcher)
    while fired.acquire(timeout=0):
        pass
    # The queue was read empty since: one overflow is a reset, not a failure.
    caplog.clear()
    resets = overflow.resets
    dispatcher._evtchn.overflow()
    assert fired.acquire(timeout=TIMEOUT)  # handed out again
    assert overflow.resets == resets + 1
    evtchn.notify(remote)
    assert fired.acquire(timeout=TIMEOUT)
    assert [rec.getMessage() for rec in caplog.records] == [
        "event channel handle overflowed: reset; every port is handed out again"]


class _EndingOverflows:
    """A guest port bound on ``pair``'s dispatcher, whose simulated handle
    is made to overflow, each overflow ending as a read finds the queue
    empty (pending() says None).  Failures go through ``breakdowns``;
    the dispatcher's warnings are captured."""

    def __init__(self, pair: tuple[Domain, EventChannel, EventDispatcher],
                 monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                 breakdowns: RateLimit) -> None:
        guest, self._evtchn, self._dispatcher = pair
        self._remote = self._evtchn.bind_unbound_port(0)
        self._fired = threading.Semaphore(0)
        self._dispatcher.bind_interdomain(
            guest.domid, self._remote, lambda _port: self._fired.release())
        real = self._dispatcher._evtchn.pending
        self._empty = threading.Event()

        def pending() -> int | None:
            port = real()
            if port is None:
                self._empty.set()
            return port

        monkeypatch.setattr(self._dispatcher._evtchn, "pending", pending)
        monkeypatch.setattr(self._dispatcher, "_breakdowns", breakdowns)
        caplog.set_level(logging.WARNING, logger="xenback.events")

    def overflow(self) -> None:
        """Overflow the handle; return once it is reset and the port
        handed out again."""
        self._dispatcher._evtchn.overflow()
        assert self._fired.acquire(timeout=TIMEOUT)

    def fire_until_read_empty(self) -> None:
        """Fire the port; return once its callback ran and a read found
        the queue empty after it."""
        self._empty.clear()
        self._evtchn.notify(self._remote)
        assert self._fired.acquire(timeout=TIMEOUT)
        assert self._empty.wait(TIMEOUT)


def test_a_read_that_finds_the_queue_empty_ends_an_overflow(pair, monkeypatch, caplog) -> None:
    """The handle ready at every wait since a reset (its ports firing
    again and again) does not make the next overflow a failure: the
    thread reads the queue until pending() says None, which says, as a
    wait that finds the handle not ready, that the overflow is over."""
    overflows = _EndingOverflows(pair, monkeypatch, caplog, RateLimit("test", burst=1000))
    overflows.overflow()
    # Woken by the handle only (no other fd, which a wait not finding the
    # handle would be): the port, then the queue read empty.
    overflows.fire_until_read_empty()
    overflows.overflow()
    assert [rec.getMessage() for rec in caplog.records] == [
        "event channel handle overflowed: reset; every port is handed out again"] * 2


def test_overflows_are_said_within_the_dispatcher_s_rate_limit(
        pair, monkeypatch, caplog) -> None:
    """Guests' ports firing in a storm may overflow the handle again and
    again, each overflow over before the next (a read found the queue
    empty): each is a warning of the dispatcher's rate limit, not a
    line each."""
    overflows = _EndingOverflows(pair, monkeypatch, caplog, RateLimit("test", clock=lambda: 0.0))
    for _ in range(12):
        overflows.overflow()
        overflows.fire_until_read_empty()  # the overflow is over
    assert [rec.getMessage() for rec in caplog.records] == [
        "event channel handle overflowed: reset; every port is handed out again"] * 10


@pytest.mark.parametrize("where", ["port", "fd"])
def test_no_callback_of_a_hand_out_runs_once_close_has_begun(pair, where) -> None:
    """close() from another thread waits for the thread, which may be
    handing every event out again (here after an overflow): once close()
    has begun, no callback runs after the one in progress, a port's or
    an fd's, as in a dispatch."""
    guest, evtchn, dispatcher = pair
    remotes = [evtchn.bind_unbound_port(0) for _ in range(2)]
    hold, held, in_hand_out = threading.Event(), threading.Event(), threading.Event()
    calls: list[str] = []

    def wait_for_close() -> None:
        in_hand_out.set()
        assert eventually(lambda: dispatcher._closed, TIMEOUT)

    def first_port(_port: int) -> None:
        calls.append("port1")
        if len(calls) == 1:  # the event: the hand-out is set up meanwhile
            held.set()
            assert hold.wait(TIMEOUT)
        elif where == "port":
            wait_for_close()

    def on_fd(name: str) -> Callable[[int, int], None]:
        def callback(fd: int, _events: int) -> None:
            os.read(fd, 100)
            calls.append(name)
            if name == "fd1" and where == "fd":
                wait_for_close()
        return callback

    dispatcher.bind_interdomain(guest.domid, remotes[0], first_port)
    dispatcher.bind_interdomain(guest.domid, remotes[1], lambda _port: calls.append("port2"))
    pipes = [os.pipe() for _ in range(2)]
    try:
        for (r, _w), name in zip(pipes, ["fd1", "fd2"], strict=True):
            dispatcher.add_fd(r, select.EPOLLIN, on_fd(name))
        evtchn.notify(remotes[0])
        assert held.wait(TIMEOUT)
        try:
            for _r, w in pipes:  # ready for the hand-out, not the round held
                os.write(w, b"x")
            dispatcher._evtchn.overflow()
        finally:
            hold.set()
        assert in_hand_out.wait(TIMEOUT)
        closer = threading.Thread(target=dispatcher.close, daemon=True)
        closer.start()
        closer.join(TIMEOUT)
        assert not closer.is_alive()
        assert calls == (["port1", "port1"] if where == "port"
                         else ["port1", "port1", "port2", "fd1"])
    finally:
        dispatcher.close()
        for fd in (fd for pipe in pipes for fd in pipe):
            os.close(fd)


def test_unbind_of_a_port_that_only_equals_an_int_keeps_the_port(host, pair) -> None:
    """unbind(1.0) found port 1's callback (1.0 == 1 as a dict key) and
    dropped it, then the handle refused 1.0: the port stayed bound, its
    events went to no callback, and unbind(1) said it was not bound."""
    guest, evtchn, dispatcher = pair
    remote = evtchn.bind_unbound_port(0)
    fired = threading.Semaphore(0)
    local = dispatcher.bind_interdomain(guest.domid, remote, lambda _port: fired.release())
    wrong = [float(local)] + ([True] if local == 1 else [])
    for port in wrong:
        with pytest.raises(TypeError, match=f"port must be an int, not {type(port).__name__}"):
            dispatcher.unbind(port)
    assert dispatcher.ports == [local]
    evtchn.notify(remote)
    assert fired.acquire(timeout=TIMEOUT)  # still dispatched
    dispatcher.unbind(local)
    assert dispatcher.ports == []
