"""pvcalls Backend: the per-CPU pollers that take active sockets' events
(pvcalls._poller).  One ioworker CPU here, so that the poller and the
sockets share one pool."""

from __future__ import annotations

import logging
import queue
import socket
import threading
from typing import Any

import pytest
from pvcalls_rawfront import TIMEOUT, RawFrontend, socket_of, wait_until

import pvcalls
from pvcalls._poller import CpuPoller
from pvcalls._socket import ActiveSocket
from workqueue import Topology
from xenback.ratelimit import RateLimit

WATCHDOG = 0.2


@pytest.fixture
def topology() -> Topology:
    # A short watchdog threshold: an idle poller must not look stalled.
    return Topology(1, watchdog_thresh=WATCHDOG)


def test_a_socket_is_polled_by_its_cpus_poller(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any) -> None:
    sock_id, ring = raw.connect_socket(echo_server.address)
    sock = socket_of(backend, raw, sock_id)
    poller = backend._pollers[sock.cpu]
    assert sock.events is poller.events
    assert sock.port in poller.events.ports
    assert sock.port not in backend.dispatcher.ports  # the command rings' thread
    raw.echo(ring, b"ping")
    assert raw.release(sock_id).ret == 0
    assert poller.events.ports == []


def test_the_polling_worker_runs_the_socket_it_woke(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any) -> None:
    """No hand-off: the socket's Work runs on the thread that took its event."""
    lock = threading.Lock()
    last_poller_thread: list[threading.Thread | None] = [None]
    same = other = 0

    def hook(event: str, work: Any, cpu: int | None) -> None:
        nonlocal same, other
        if event != "execute_start":
            return
        with lock:
            if isinstance(work, CpuPoller):
                last_poller_thread[0] = threading.current_thread()
            elif isinstance(work, ActiveSocket):
                if threading.current_thread() is last_poller_thread[0]:
                    same += 1
                else:
                    other += 1

    # A socket's run that lasts past cpu_intensive_thresh (10 ms: a loaded
    # machine, a slow host socket) stops counting for concurrency
    # management, and another worker takes the poller over, as the kernel's
    # would: the claim is about runs that do not.
    backend.topology.cpu_intensive_thresh = TIMEOUT
    sock_id, ring = raw.connect_socket(echo_server.address)
    backend.io_wq.add_trace_hook(hook)
    try:
        for i in range(50):
            message = b"%03d" % i
            raw.echo(ring, message)
    finally:
        backend.io_wq.remove_trace_hook(hook)
    # Every round trip wakes the socket twice (the guest's notify, the echo's
    # data); only kicks from other threads may run it elsewhere.
    assert same >= 50, (same, other)
    assert same > 4 * other, (same, other)


def test_an_idle_poller_is_no_lockup(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A poller waits at most half the watchdog threshold, then queues itself
    again: the watchdog never sees it running that long.  Its waits are
    looked at, not the watchdog's log: on a loaded machine a wait of half
    the threshold may well overrun the other half before its thread runs
    again (once 0.209 s against 0.2), and a lockup said then is right."""
    raw.connect_socket(echo_server.address)
    poller, = backend._pollers.values()
    poll = poller.events.poll
    waits: queue.SimpleQueue[float | None] = queue.SimpleQueue()

    def watched(timeout: float | None = None) -> int:
        waits.put(timeout)
        return poll(timeout)

    monkeypatch.setattr(poller.events, "poll", watched)
    # Each wait is a run of its own: the poller queued itself again.
    for _ in range(4):  # two watchdog thresholds of idleness at least
        assert waits.get(timeout=TIMEOUT) == WATCHDOG / 2


def test_a_failing_poll_does_not_stop_its_cpus_sockets(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Polls that raise (a bug of ours, or an event channel handle failing
    as a port is unmasked): the poller polls again, and the sockets of its
    CPU, every guest's, are still served.  A poll failing at every turn
    is logged through a rate limit, 10 tracebacks per interval.  (The
    poller did not queue itself again, and every socket of its CPU waited
    for ever.)"""
    caplog.set_level(logging.ERROR)
    sock_id, ring = raw.connect_socket(echo_server.address)
    poller, = backend._pollers.values()
    poller._ratelimit = RateLimit("the poller", clock=lambda: 0.0)  # one interval
    poll = poller.events.poll
    failures = threading.Semaphore(0)
    to_fail = 30

    def buggy(timeout: float | None = None) -> int:
        nonlocal to_fail
        if to_fail:
            to_fail -= 1
            failures.release()
            raise RuntimeError("a bug")
        return poll(timeout)

    monkeypatch.setattr(poller.events, "poll", buggy)
    poller.events.wakeup()  # the poll under way returns; the next ones fail
    for _ in range(30):
        assert failures.acquire(timeout=TIMEOUT)
    raw.echo(ring, b"ping")
    bugs = [r for r in caplog.records if r.name.startswith("pvcalls") and r.exc_info]
    assert len(bugs) == 10
    assert all(isinstance(r.exc_info[1], RuntimeError) for r in bugs if r.exc_info)
    assert raw.release(sock_id).ret == 0
    # The 20 left out are counted as the poller closes, with the backend.
    caplog.set_level(logging.WARNING)
    backend.close()
    assert "the poller: 20 messages suppressed" in [r.getMessage() for r in caplog.records]


def test_close_stops_the_pollers(host: Any, topology: Topology) -> None:
    before = {t.ident for t in threading.enumerate()}
    backend = pvcalls.Backend(host.dom0, topology=topology)
    pollers = list(backend._pollers.values())
    assert [p.cpu for p in pollers] == topology.possible()
    wait_until(lambda: all(p.running or p.pending for p in pollers))
    backend.close()
    assert backend._pollers == {}
    assert all(not p.running and not p.pending for p in pollers)
    # The workqueue's timer thread is the process's, started by the first
    # timer armed (here, when this test runs first) and never stopped.
    wait_until(lambda: not ({t.ident for t in threading.enumerate()
                             if t.is_alive() and t.name != "wq-timer"} - before))


def test_each_poller_polls_on_its_own_cpu(host: Any) -> None:
    """Started on its CPU, not the constructor's: a poller queues itself
    again on the pool it runs on, so one started elsewhere would stay there
    and every socket it wakes would cost the wake-up it is there to save."""
    topology = Topology(4, watchdog_thresh=WATCHDOG)
    lock = threading.Lock()
    ran_on: dict[int, set[int | None]] = {}

    def hook(event: str, work: Any, cpu: int | None) -> None:
        if event == "execute_start" and isinstance(work, CpuPoller):
            with lock:
                ran_on.setdefault(work.cpu, set()).add(cpu)

    with pvcalls.Backend(host.dom0, topology=topology) as backend:
        backend.io_wq.add_trace_hook(hook)
        try:
            wait_until(lambda: len(ran_on) == 4)
        finally:
            backend.io_wq.remove_trace_hook(hook)
    assert ran_on == {cpu: {cpu} for cpu in topology.possible()}


def test_close_does_not_wait_for_an_idle_poll_to_time_out(host: Any) -> None:
    """close() wakes a poller sleeping in its poll (half the watchdog
    threshold, an hour here) rather than wait for it to time out."""
    topology = Topology(1, watchdog_thresh=7200.0)
    backend = pvcalls.Backend(host.dom0, topology=topology)
    (poller,) = backend._pollers.values()
    wait_until(lambda: poller.running)
    closer = threading.Thread(target=backend.close, daemon=True)
    closer.start()
    closer.join(TIMEOUT)
    assert not closer.is_alive(), "close() waited for the poll to time out"
    assert backend._pollers == {}


def test_connected_sockets_are_polled_on_their_own_cpus(
        host: Any, make_frontend: Any, echo_server: Any) -> None:
    """CONNECT homes the socket before binding its channel, so that even
    connects racing from several frontends land on their own CPU's poller."""
    with pvcalls.Backend(host.dom0, topology=Topology(4)) as backend:
        fes = [make_frontend(f"g{i}") for i in range(3)]
        done: list[tuple[RawFrontend, int]] = []
        lock = threading.Lock()

        def connect(fe: RawFrontend) -> None:
            for _ in range(6):
                sock_id, _ring = fe.connect_socket(echo_server.address)
                with lock:
                    done.append((fe, sock_id))

        threads = [threading.Thread(target=connect, args=(fe,)) for fe in fes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert len(done) == 18
        for fe, sock_id in done:
            sock = socket_of(backend, fe, sock_id)
            assert sock.events is backend._pollers[sock.cpu].events, sock
        counts = [c.sockets for c in backend.stats().cpus]
        assert max(counts) - min(counts) <= 1


def test_accepted_sockets_are_polled_on_their_own_cpus(
        host: Any, make_frontend: Any, echo_server: Any) -> None:
    """ACCEPT binds its id_new's channel before the socket has a CPU: on
    the poller of the CPU it will get (the least loaded), not any one."""
    with pvcalls.Backend(host.dom0, topology=Topology(4)) as backend:
        raw = make_frontend("g")
        # Load CPUs 0 and 1, so that the next socket goes to CPU 2.
        for _ in range(2):
            raw.connect_socket(echo_server.address)
        assert [c.sockets for c in backend.stats().cpus] == [1, 1, 0, 0]
        listener, address = raw.listening(backend)
        id_new = raw.new_id()
        accept = raw.push_accept(listener, id_new, raw.new_ring())
        with socket.create_connection(address, timeout=TIMEOUT):
            assert raw.response(accept).ret == 0
            sock = socket_of(backend, raw, id_new)
            assert sock.cpu == 2
            assert sock.events is backend._pollers[2].events


def test_a_socket_keeps_its_poller_when_its_cpu_goes_offline(
        host: Any, make_frontend: Any, echo_server: Any) -> None:
    """The offline CPU's poller runs unbound and queues the socket on its
    new CPU; the backend closes cleanly with the CPU still offline."""
    topology = Topology(2)
    backend = pvcalls.Backend(host.dom0, topology=topology)
    try:
        fe = make_frontend("hotplug")
        socks = [fe.connect_socket(echo_server.address) for _ in range(2)]
        victim = socket_of(backend, fe, socks[0][0]).cpu
        topology.cpu_down(victim)
        for sock_id, ring in socks:
            sock = socket_of(backend, fe, sock_id)
            assert sock.cpu != victim
            raw_message = b"after cpu_down %d" % sock_id
            fe.echo(ring, raw_message)
    finally:
        backend.close()  # with the CPU offline
    assert backend._pollers == {}


def _failing_once(fn: Any, failed: threading.Event, *, after: bool = False) -> Any:
    """``fn``, but its first call raises (``after``: once ``fn`` has done
    its part, as a handle failing after it took a port)."""
    def wrapper(*args: Any) -> Any:
        if failed.is_set():
            return fn(*args)
        if after:
            result = fn(*args)
            if result is None:  # pending() found nothing: nothing taken yet
                return result
        failed.set()
        raise RuntimeError("a bug")
    return wrapper


@pytest.mark.parametrize("where", ["pending", "port callback", "unmask", "fd callback"])
def test_a_failed_poll_loses_no_event(
        where: str, raw: RawFrontend, backend: pvcalls.Backend,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A poll that fails with an event in hand (a port the handle took, a
    callback that raised, a port left masked, a host socket's edge) hands
    it out again: the socket's data still moves, both ways, with nothing
    else to wake it.  (It waited until the guest released it.)

    One direction at a time: the Work of either direction's event moves
    both, and would cover up the loss of the other's."""
    caplog.set_level(logging.CRITICAL)  # the failure's traceback is expected
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock_id, ring = raw.connect_socket(listener.getsockname())
        peer, _ = listener.accept()
    peer.settimeout(TIMEOUT)
    sock = socket_of(backend, raw, sock_id)
    events = backend._pollers[sock.cpu].events
    assert sock.port is not None and sock.host is not None
    failed = threading.Event()
    if where == "pending":
        monkeypatch.setattr(events._evtchn, "pending",
                            _failing_once(events._evtchn.pending, failed, after=True))
    elif where == "unmask":
        monkeypatch.setattr(events._evtchn, "unmask", _failing_once(events._evtchn.unmask, failed))
    elif where == "port callback":
        events._ports[sock.port] = _failing_once(events._ports[sock.port], failed)
    else:
        fd = sock.host.fileno()
        events._fds[fd] = _failing_once(events._fds[fd], failed)
    with peer:
        # Two rounds: the second finds whatever the first left masked.
        for i in range(2):
            message = b"to the host %d" % i
            # Idle first, or a run still going could take the write.
            wait_until(lambda: not (sock.running or sock.pending))
            assert ring.write(message) == len(message)  # and one notification
            got = b""
            while len(got) < len(message):
                got += peer.recv(len(message) - len(got))
            assert got == message
            message = b"to the guest %d" % i
            peer.sendall(message)
            assert raw.recv_exactly(ring, len(message)) == message
            assert failed.wait(TIMEOUT)  # in the first round
    assert raw.release(sock_id).ret == 0
