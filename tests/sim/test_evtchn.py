"""Event channels of the simulated host: libxenevtchn's semantics."""

from __future__ import annotations

import enum
import errno
import fcntl
import itertools
import json
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fdcensus import numbers_held, sockets_named_under
from hosthelpers import (
    SIM_CODE,
    SIM_ROUND_TRIP,
    answering_once,
    closed_while_paused,
    descriptors,
    eventually,
    every_landing,
    handle_census,
    landings,
    readable,
    released_since,
    serve_one_client,
    service_caught_up,
    wait_pending,
)
from racewindow import TIMEOUT, Attempt, PauseAt
from stolensignal import interrupted_as_call_returns, interrupted_at

import xenback
from xenback.platform import EventChannel as EventChannelProtocol
from xenback.platform import EventChannelError
from xenback.sim import Domain, EventChannel, SimHost, _evtchn
from xenback.sim._proto import MAX_MESSAGE, close_fds, send_message


@pytest.fixture
def pair(host: SimHost, guest: Domain) -> Iterator[tuple[EventChannel, int, EventChannel, int]]:
    """(dom0 handle, dom0 port, guest handle, guest port), connected."""
    e0, e1 = host.dom0.evtchn(), guest.evtchn()
    p1 = e1.bind_unbound_port(0)
    p0 = e0.bind_interdomain(guest.domid, p1)
    yield e0, p0, e1, p1
    e0.close()
    e1.close()


def test_handle_implements_the_protocol(host: SimHost) -> None:
    with host.dom0.evtchn() as ch:
        assert isinstance(ch, EventChannelProtocol)


@pytest.mark.parametrize("name", ["notify", "pending", "unmask", "wait"])
def test_ctrl_c_as_any_call_returns_leaves_the_handle_usable(
        pair: tuple[EventChannel, int, EventChannel, int], name: str) -> None:
    """The per-event calls of a guest's main thread: CPython runs a
    signal's handler as a call returns, also the lock's acquire(), and the
    KeyboardInterrupt must not leave the handle's lock held (every later
    call would hang) or a waiter counted."""
    e0, p0, e1, p1 = pair
    call: dict[str, Callable[[], object]] = {
        "notify": lambda: e0.notify(p0),
        "pending": e0.pending,
        "unmask": lambda: e0.unmask(p0),
        "wait": lambda: e0.wait(0),
    }
    code = getattr(EventChannel, name).__code__
    for n in itertools.count():
        e1.notify(p1)  # something to take
        if not interrupted_as_call_returns(code, n, call[name]):
            break
        held = e0._lock.locked()
        if held:
            e0._lock.release()  # or the fixture's close() would hang
        assert not held, f"lock left held by an interrupt as call {n} returned"
        assert e0._waiters == 0
    assert n > 0  # there were calls to interrupt
    # Still a working handle, both ways.
    e0.unmask(p0)
    while e0.pending() is not None:
        e0.unmask(p0)
    e1.notify(p1)
    assert wait_pending(e0) == p0
    e0.notify(p0)
    assert wait_pending(e1) == p1


def test_bind_reports_the_peer(pair: tuple[EventChannel, int, EventChannel, int]) -> None:
    e0, p0, e1, p1 = pair
    assert e0.remote(p0) == (1, p1)
    assert e1.remote(p1) == (0, p0)
    assert e0.ports() == [p0] and e1.ports() == [p1]


def test_notify_wakes_the_peer_both_ways(pair: tuple[EventChannel, int, EventChannel, int]) -> None:
    e0, p0, e1, p1 = pair
    assert e0.pending() is None and not readable(e0, 0)
    e1.notify(p1)
    assert wait_pending(e0) == p0
    assert e0.pending() is None
    e0.notify(p0)
    assert wait_pending(e1) == p1


def test_port_stays_masked_until_unmask_and_remembers(
    pair: tuple[EventChannel, int, EventChannel, int],
) -> None:
    e0, p0, e1, p1 = pair
    e1.notify(p1)
    assert e0.pending() == p0
    for _ in range(3):
        e1.notify(p1)
    # Masked: nothing delivered; once pending() has seen that, the fd is
    # quiet (masking is lazy, as Linux's: one spurious wakeup at most).
    assert e0.pending() is None
    assert not readable(e0, 0.05)
    e0.unmask(p0)
    # The notifications that came while masked are delivered once.
    assert wait_pending(e0) == p0
    e0.unmask(p0)
    assert not readable(e0, 0.05)
    assert e0.pending() is None


def test_an_overflowed_handle_says_efbig_until_reset(
    pair: tuple[EventChannel, int, EventChannel, int],
) -> None:
    """As Linux's evtchn device once its queue of fired ports overflowed:
    pending() and wait() fail with EFBIG, and the descriptor stays
    readable (POLLERR), until reset().  The reset drops what the queue
    held: a port that fired and was not taken stays masked, its later
    notifications remembered, until it is unmasked."""
    e0, p0, e1, p1 = pair
    e1.notify(p1)
    assert readable(e0, TIMEOUT)
    e0.overflow()
    for _ in range(2):
        assert readable(e0, 0)
        for call in (e0.pending, lambda: e0.wait(0)):
            with pytest.raises(EventChannelError, match="overflowed") as info:
                call()
            assert info.value.errno == errno.EFBIG
    e0.reset()
    assert e0.pending() is None  # dropped with the queue
    e1.notify(p1)
    # Masked, as if taken (lazily: one spurious wake-up at most).
    assert e0.pending() is None
    assert not readable(e0, 0.05)
    e0.unmask(p0)
    assert wait_pending(e0) == p0  # what came since the reset
    e0.unmask(p0)
    e0.reset()  # with nothing queued: nothing changes
    e1.notify(p1)
    assert wait_pending(e0) == p0


def test_unmask_without_notification_stays_quiet(
    pair: tuple[EventChannel, int, EventChannel, int],
) -> None:
    e0, p0, e1, p1 = pair
    e0.unmask(p0)
    e0.unmask(p0)
    assert e0.pending() is None


def test_storm_while_masked_is_one_event(pair: tuple[EventChannel, int, EventChannel, int]) -> None:
    e0, p0, e1, p1 = pair
    e1.notify(p1)
    assert e0.pending() == p0
    for _ in range(100_000):  # far more than a pipe holds: never blocks
        e1.notify(p1)
    e0.unmask(p0)
    assert e0.pending() == p0
    e0.unmask(p0)
    assert e0.pending() is None


def test_a_port_whose_old_pipe_hung_up_lives_again_on_its_new_one(
    pair: tuple[EventChannel, int, EventChannel, int],
) -> None:
    """A peer unbinding closes the last writer of the port's pipe before
    the service's news of it (with a new pipe, fired) is taken: pending()
    finds the old pipe hung up and marks the port dead.  The new pipe
    makes it live again: once a new peer bound, what it notifies while
    the port is masked is set aside and comes at unmask, as always."""
    e0, p0, e1, p1 = pair
    # The port pending() returned last, unmasked: its pipe is the first
    # pending() reads, before the service's news is taken.
    e1.notify(p1)
    assert wait_pending(e0) == p0
    e0.unmask(p0)
    e1.unbind(p1)
    assert wait_pending(e0) == p0  # the hang-up, set aside, then the new pipe
    assert e0.remote(p0) is None
    e0.unmask(p0)
    p1 = e1.bind_interdomain(0, p0)
    assert e0.remote(p0) == (1, p1)
    e1.notify(p1)
    assert wait_pending(e0) == p0
    e1.notify(p1)
    assert e0.pending() is None  # masked: set aside
    e0.unmask(p0)
    # Watched again (pending() alone would read the pipe of the port it
    # returned last directly, and find the event anyway).
    assert readable(e0, TIMEOUT)
    assert wait_pending(e0) == p0
    e0.unmask(p0)
    assert e0.pending() is None


def test_a_storm_into_a_pipe_the_peer_enlarged_is_still_one_event(
    pair: tuple[EventChannel, int, EventChannel, int],
) -> None:
    """A guest holds a write end of its peer's pipe and may grow the pipe
    (F_SETPIPE_SZ works on either end) and fill it: taking the event must
    still empty it, or the rest comes again as a new event at unmask."""
    e0, p0, e1, p1 = pair
    assert e1.remote(p1) == (0, p0)  # it has heard of its peer: it holds a write end
    w = e1._ports[p1].peer_fd
    assert w is not None
    # Four times the default, below the unprivileged limit (1 MiB).
    assert fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 18) >= 1 << 18
    written = 0
    try:
        while True:
            written += os.write(w, bytes(65536))
    except BlockingIOError:
        pass
    assert written >= 1 << 18
    assert wait_pending(e0) == p0
    e0.unmask(p0)
    assert e0.pending() is None


def test_several_ports_on_one_handle(host: SimHost, guest: Domain) -> None:
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        remote = [e1.bind_unbound_port(0) for _ in range(4)]
        local = [e0.bind_interdomain(guest.domid, p) for p in remote]
        assert len(set(local)) == 4
        for p in remote:
            e1.notify(p)
        fired = set()
        while (port := e0.pending()) is not None:
            fired.add(port)
        assert fired == set(local)


def _hot_port(e0: Any, e1: Any, guest: Domain) -> tuple[int, int, int, int]:
    """Two ports bound from ``e1`` to ``e0``: the first fired and taken
    once (from epoll), unmasked and fired again, so that pending() reads
    it directly next.  Returns (hot, hot_remote, other, other_remote)."""
    hot_remote, other_remote = e1.bind_unbound_port(0), e1.bind_unbound_port(0)
    hot = e0.bind_interdomain(guest.domid, hot_remote)
    other = e0.bind_interdomain(guest.domid, other_remote)
    e1.notify(hot_remote)
    assert wait_pending(e0) == hot
    e0.unmask(hot)
    e1.notify(hot_remote)
    return hot, hot_remote, other, other_remote


def _hot_events_before(e0: Any, e1: Any, hot: int, hot_remote: int, other: int,
                       most: int, what: str) -> int:
    """How many events of ``hot``, fired again after each, pending() gives
    before ``other`` (at most ``most``; else "``what`` never came")."""
    hot_events = 0
    while (port := e0.pending()) != other:
        assert port == hot
        hot_events += 1
        assert hot_events <= most, f"{what} never came"
        e0.unmask(hot)
        e1.notify(hot_remote)  # the pipe write is done when notify returns
    return hot_events


def test_a_port_that_fires_without_pause_does_not_starve_the_others(
    host: SimHost, guest: Domain
) -> None:
    # pending() reads the port it returned last directly, without epoll:
    # another ready port must still come within a bounded number of events.
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        hot, hot_remote, other, other_remote = _hot_port(e0, e1, guest)
        e1.notify(other_remote)
        hot_events = _hot_events_before(e0, e1, hot, hot_remote, other,
                                        2 * _evtchn._HOT_STREAK, "the other port")
        # Exactly one streak read directly (the first event came from
        # epoll), then the pass that leaves the hot port out.
        assert hot_events == _evtchn._HOT_STREAK
        # Nothing lost: the hot port is still pending.
        assert e0.pending() == hot


def test_a_port_that_fires_without_pause_does_not_starve_the_service(
    host: SimHost, guest: Domain
) -> None:
    """News from the service (here: a peer unbinding, whose port gets a new
    pipe, fired) comes within a bounded number of events of a port that
    fires without pause: pending() reads the hot port's pipe directly, and
    the epoll pass after each streak must take the service connection too,
    not only other ports."""
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        hot, hot_remote, other, other_remote = _hot_port(e0, e1, guest)
        # The service pushed the news before it answered the unbind.
        e1.unbind(other_remote)
        _hot_events_before(e0, e1, hot, hot_remote, other,
                           3 * _evtchn._HOT_STREAK, "the service's news")
        assert e0.remote(other) is None


def test_ports_set_aside_in_a_fair_pass_do_not_hide_a_ready_port(
    host: SimHost, guest: Domain
) -> None:
    """The pass after a hot port's streak asks epoll for a batch: if the
    batch holds only masked ports (set aside, nothing to report) and the
    hot port has no event left, pending() must look again, not say None
    while another port is pending."""
    batch = _evtchn._FAIR_BATCH
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        remotes = [e1.bind_unbound_port(0) for _ in range(batch + 2)]
        ports = [e0.bind_interdomain(guest.domid, r) for r in remotes]
        (hot_remote, *masked_remotes, other_remote) = remotes
        hot, other = ports[0], ports[-1]
        for r in masked_remotes:
            e1.notify(r)
        assert {wait_pending(e0) for _ in masked_remotes} == set(ports[1:-1])
        e1.notify(hot_remote)
        assert wait_pending(e0) == hot
        # Notified while masked: ready in epoll, not set aside yet (the
        # hot port's streak asks epoll nothing).
        for r in masked_remotes:
            e1.notify(r)
        for _ in range(_evtchn._HOT_STREAK):
            e0.unmask(hot)
            e1.notify(hot_remote)
            assert e0.pending() == hot
        e1.notify(other_remote)
        e0.unmask(hot)  # not notified: its streak is over, its pipe empty
        assert e0.pending() == other
        assert e0.pending() is None


def test_a_reused_descriptor_of_the_last_port_is_not_taken_for_it(
    host: SimHost, guest: Domain
) -> None:
    """The port pending() returned last, unmasked (its pipe read first
    next time), is unbound: the numbers it closed are another file's
    then, here one that reads as an event pending, which must not be
    taken for the port's.  (A new port of ours never got the number: the
    service, a thread of this process, makes its pipe first.)"""
    with host.dom0.evtchn() as e0, guest.evtchn() as e1, numbers_held(b"!") as held:
        remote = e1.bind_unbound_port(0)
        first = e0.bind_interdomain(guest.domid, remote)
        e1.notify(remote)
        assert wait_pending(e0) == first
        e0.unmask(first)
        with held.closing():
            e0.unbind(first)
        assert held.numbers
        # A new port, notified: reported as itself, once.
        remote = e1.bind_unbound_port(0)
        second = e0.bind_interdomain(guest.domid, remote)
        e1.notify(remote)
        assert wait_pending(e0) == second
        assert e0.pending() is None
        e0.unmask(second)
        assert e0.pending() is None
        e1.notify(remote)
        assert wait_pending(e0) == second
        held.check("unbind")


def test_an_unbound_port_that_fired_last_is_not_read_again(host: SimHost, guest: Domain) -> None:
    """pending() reads the pipe of the port it returned last directly: once
    that port is unbound its descriptor is closed (and may be reused by
    anything), so the next event must come from another port's pipe."""
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        ra, rb = e1.bind_unbound_port(0), e1.bind_unbound_port(0)
        a, b = e0.bind_interdomain(guest.domid, ra), e0.bind_interdomain(guest.domid, rb)
        e1.notify(ra)
        assert wait_pending(e0) == a
        e0.unmask(a)
        e0.unbind(a)
        e1.notify(rb)
        assert wait_pending(e0) == b
        assert e0.pending() is None


def test_loopback_within_one_domain(host: SimHost) -> None:
    with host.dom0.evtchn() as a, host.dom0.evtchn() as b:
        pa = a.bind_unbound_port(0)
        pb = b.bind_interdomain(0, pa)
        b.notify(pb)
        assert wait_pending(a) == pa


def test_notify_on_unbound_port_is_a_noop(host: SimHost, guest: Domain) -> None:
    with guest.evtchn() as e1:
        port = e1.bind_unbound_port(0)
        e1.notify(port)
        assert e1.remote(port) is None
        assert e1.pending() is None


def test_unbind_is_seen_by_the_peer(pair: tuple[EventChannel, int, EventChannel, int]) -> None:
    e0, p0, e1, p1 = pair
    e0.unbind(p0)
    # The peer's port fires and becomes unbound; notifying it is a no-op.
    assert wait_pending(e1) == p1
    assert e1.remote(p1) is None
    e1.notify(p1)
    with pytest.raises(EventChannelError) as info:
        e0.notify(p0)
    assert info.value.errno == errno.ENOTCONN  # as Linux's evtchn driver


def test_peer_may_bind_again_after_unbind(
    pair: tuple[EventChannel, int, EventChannel, int], guest: Domain
) -> None:
    e0, p0, e1, p1 = pair
    e0.unbind(p0)
    p0 = e0.bind_interdomain(guest.domid, p1)
    e1.unmask(p1)
    e0.notify(p0)
    assert readable(e1, TIMEOUT)
    assert e1.remote(p1) == (0, p0)


def test_a_peer_binding_again_and_again_leaks_no_descriptor(
    pair: tuple[EventChannel, int, EventChannel, int], guest: Domain
) -> None:
    """Each "bound" news brings a write end of the new peer's pipe, which
    replaces the old peer's: the old one must be closed, or a guest that
    rebinds in a loop runs the backend's process out of descriptors."""
    e0, p0, e1, p1 = pair

    def rebind(p0: int) -> int:
        e0.unbind(p0)
        assert e1.remote(p1) is None  # drains the "unbound" news
        p0 = e0.bind_interdomain(guest.domid, p1)
        assert e1.remote(p1) == (0, p0)  # and the "bound" one
        return p0

    def pipe(ch: EventChannel, port: int) -> str:
        return os.readlink(f"/proc/self/fd/{ch._ports[port].rfd}")

    p0 = rebind(p0)
    before = _pipes()
    for _ in range(40):
        p0 = rebind(p0)
    # Each by number and pipe: a count would let another thread's close
    # hide a leak.  Of what is new, all is on the two ports' pipes now
    # (each round makes dom0's port a new one, and the guest's as its peer
    # goes); a leak is an end of a pipe of a binding gone, one a round.
    # (The service may close its ends of the last pipes after its answer.)
    live = {pipe(e0, p0), pipe(e1, p1)}

    def left() -> list[tuple[int, str]]:
        return sorted(d for d in _pipes() - before if d[1] not in live)

    assert eventually(lambda: not left()), left()


def test_notify_reaches_a_peer_that_bound_again_before_we_heard(
    pair: tuple[EventChannel, int, EventChannel, int], guest: Domain
) -> None:
    """The guest's handle still holds the old peer's descriptor when dom0
    unbinds and binds again (it has not read the service's news: nobody
    called pending()).  Its notify must reach the new binding, as Xen's
    would, not vanish into the old one's closed pipe."""
    e0, p0, e1, p1 = pair
    e1.notify(p1)  # the guest's handle uses (and keeps) its peer's descriptor
    assert wait_pending(e0) == p0
    e0.unmask(p0)
    e0.unbind(p0)
    p0 = e0.bind_interdomain(guest.domid, p1)
    e1.notify(p1)  # before e1 has drained "unbound" and "bound"
    assert wait_pending(e0) == p0


def test_both_ends_unbinding_at_once_is_not_a_warning(
    pair: tuple[EventChannel, int, EventChannel, int], caplog: pytest.LogCaptureFixture
) -> None:
    """The guest unbinds its port before it has read the service's news that
    dom0 unbound the peer: that news arrives during the guest's own unbind,
    about a port it has just given up.  That is the usual end of a
    connection (both sides close), not a sign of a confused service."""
    e0, p0, e1, p1 = pair
    e0.unbind(p0)  # the service tells e1 before it answers e0
    with caplog.at_level("DEBUG", logger=_evtchn.__name__):
        e1.unbind(p1)
    mine = [r for r in caplog.records if r.name == _evtchn.__name__]
    assert any("unbound" in r.getMessage() for r in mine), "the news was not read during unbind"
    assert all(r.levelno < logging.WARNING for r in mine), [r.getMessage() for r in mine]
    assert e1.ports() == []


def test_close_is_seen_by_the_peer(host: SimHost, guest: Domain) -> None:
    e0, e1 = host.dom0.evtchn(), guest.evtchn()
    p1 = e1.bind_unbound_port(0)
    e0.bind_interdomain(guest.domid, p1)
    e0.close()
    assert wait_pending(e1) == p1
    assert e1.remote(p1) is None
    e1.close()
    assert eventually(lambda: host.hypervisor.stats()["ports"] == 0)


def test_notify_from_another_thread(pair: tuple[EventChannel, int, EventChannel, int]) -> None:
    e0, p0, e1, p1 = pair
    got = []

    def waiter() -> None:
        for _ in range(100):
            got.append(wait_pending(e0))
            e0.unmask(p0)
            e0.notify(p0)

    t = threading.Thread(target=waiter)
    t.start()
    for _ in range(100):
        e1.notify(p1)
        assert wait_pending(e1) == p1
        e1.unmask(p1)
    t.join(TIMEOUT)
    assert got == [p0] * 100


@pytest.mark.parametrize(
    "call, err",
    [
        # A port this handle has not bound: ENOTCONN from Linux's evtchn
        # driver (IOCTL_EVTCHN_NOTIFY and _UNBIND), so from the xen platform;
        # a number that is no port (0 included: reserved, never bound) is
        # EINVAL on both (xenback.platform.check_port).
        (lambda ch: ch.notify(99), errno.ENOTCONN),
        (lambda ch: ch.notify(0), errno.EINVAL),
        (lambda ch: ch.notify(1 << 20), errno.EINVAL),  # past the last port, as unbind
        (lambda ch: ch.notify(-1), errno.EINVAL),
        (lambda ch: ch.unmask(99), errno.EINVAL),
        (lambda ch: ch.unbind(99), errno.ENOTCONN),
        (lambda ch: ch.unbind(0), errno.EINVAL),
        (lambda ch: ch.unbind(1 << 20), errno.EINVAL),  # past the last port
        (lambda ch: ch.unbind(-1), errno.EINVAL),
        (lambda ch: ch.bind_unbound_port(-1), errno.EINVAL),
        (lambda ch: ch.bind_unbound_port("0"), errno.EINVAL),
        (lambda ch: ch.bind_unbound_port(77), errno.ESRCH),
        (lambda ch: ch.bind_interdomain(77, 1), errno.ESRCH),
        (lambda ch: ch.bind_interdomain(0, 1 << 20), errno.EINVAL),
        (lambda ch: ch.bind_interdomain(0, 5), errno.EINVAL),
    ],
)
def test_bad_requests_get_errno(  # type: ignore[no-untyped-def]
    host: SimHost, call, err: int
) -> None:
    with host.dom0.evtchn() as ch:
        with pytest.raises(EventChannelError) as info:
            call(ch)
        assert info.value.errno == err
        # The handle still works afterwards.
        assert ch.bind_unbound_port(0) >= 1


def test_only_the_named_domain_may_bind(host: SimHost, guest: Domain) -> None:
    other = host.create_domain("other")
    with host.dom0.evtchn() as e0, guest.evtchn() as e1, other.evtchn() as e2:
        port = e1.bind_unbound_port(0)  # for dom0, not for "other"
        with pytest.raises(EventChannelError) as info:
            e2.bind_interdomain(guest.domid, port)
        assert info.value.errno == errno.EINVAL
        e0.bind_interdomain(guest.domid, port)
        with pytest.raises(EventChannelError):  # already bound
            e0.bind_interdomain(guest.domid, port)


def test_ports_belong_to_their_handle(host: SimHost, guest: Domain) -> None:
    with guest.evtchn() as a, guest.evtchn() as b:
        port = a.bind_unbound_port(0)
        for call, err in ((b.notify, errno.ENOTCONN), (b.unmask, errno.EINVAL),
                          (b.unbind, errno.ENOTCONN)):
            with pytest.raises(EventChannelError) as info:
                call(port)
            assert info.value.errno == err


def test_the_service_refuses_to_unbind_another_handles_port(
    host: SimHost, guest: Domain, pair: tuple[EventChannel, int, EventChannel, int]
) -> None:
    """The client-side check above is not the guard: a guest speaking the
    wire itself may name any port of its domain, and must not be able to
    cut a connection another of its handles (another process) made."""
    import json
    import os
    import socket

    from xenback.sim._hypervisor import domain_socket

    e0, p0, e1, p1 = pair
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(os.fspath(domain_socket(host.run_dir, guest.domid)))
        sock.send(json.dumps({"op": "evtchn_unbind", "port": p1}).encode())
        data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
        assert not fds
        assert json.loads(data)["errno"] == errno.EINVAL
    assert e1.remote(p1) == (0, p0)
    assert e0.remote(p0) == (guest.domid, p1)
    e0.notify(p0)
    assert wait_pending(e1) == p1


def test_domain_death_unbinds_its_ports(host: SimHost) -> None:
    guest = host.create_domain("doomed")
    e1 = guest.evtchn()
    with host.dom0.evtchn() as e0:
        p0 = e0.bind_interdomain(guest.domid, e1.bind_unbound_port(0))
        host.destroy_domain(guest)
        assert wait_pending(e0) == p0
        assert e0.remote(p0) is None
        e0.notify(p0)  # a no-op, as in Xen
        with pytest.raises(EventChannelError) as info:
            e1.bind_unbound_port(0)
        assert info.value.errno == errno.ENODEV
    e1.close()


def test_closed_handle_refuses_work(host: SimHost) -> None:
    ch = host.dom0.evtchn()
    ch.close()
    ch.close()
    # Every call, port calls included, as the xen platform (and libxenevtchn,
    # whose descriptor is gone) says it: code written for one works on both.
    for call in (ch.fileno, ch.pending, lambda: ch.bind_unbound_port(0),
                 lambda: ch.notify(1), lambda: ch.unmask(1), lambda: ch.unbind(1),
                 lambda: ch.remote(1)):
        with pytest.raises(EventChannelError) as info:
            call()
        assert info.value.errno == errno.EBADF
        assert "closed" in str(info.value)


def test_a_closed_handle_has_no_ports_left(
    pair: tuple[EventChannel, int, EventChannel, int]
) -> None:
    """close() closes every port's descriptors: a port still listed would
    have notify() write to a closed (or reused) descriptor number."""
    e0, p0, e1, p1 = pair
    e0.close()
    assert e0.ports() == []
    for call in (e0.notify, e0.unbind, e0.unmask, e0.remote):
        with pytest.raises(EventChannelError) as info:
            call(p0)
        assert info.value.errno == errno.EBADF  # the handle is closed


def test_a_handle_that_fails_to_open_keeps_nothing(
        host: SimHost, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its last descriptor is the one most likely refused (EMFILE): the
    # service connection and epoll set opened before must not stay open.
    import os
    import types

    def refuse(*_args: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    fake_os = types.SimpleNamespace(**{**vars(os), "eventfd": refuse})

    def epolls() -> frozenset[tuple[int, str]]:
        return frozenset(d for d in descriptors() if d[1] == "anon_inode:[eventpoll]")

    # Not a count of the whole process's, which other threads change.
    before = host.hypervisor.stats()["connections"], sockets_named_under(host.run_dir), epolls()
    monkeypatch.setattr(_evtchn, "os", fake_os)
    with pytest.raises(OSError, match="Too many open files") as refused:
        host.dom0.evtchn()
    monkeypatch.undo()
    # Looked at with the error held, as its caller holds it: its traceback
    # keeps the handle, which would keep an epoll it did not close.
    assert epolls() <= before[2]
    del refused
    service_caught_up(host.dom0)
    assert eventually(lambda: host.hypervisor.stats()["connections"] == before[0])
    # The service's end of the connection is closed by its thread, which
    # may do so just after the count went down: waited for too.
    assert eventually(lambda: sockets_named_under(host.run_dir) <= before[1])



def test_a_refused_request_leaves_the_handle_watching_its_service(
        pair: tuple[EventChannel, int, EventChannel, int]) -> None:
    """The service connection is out of the handle's wait only while a
    request waits for its reply, a refused one's included: after it, what
    the service pushes (a peer's unbinding) wakes the handle again."""
    e0, p0, e1, p1 = pair
    with pytest.raises(EventChannelError):
        e0.bind_interdomain(77, 1)  # ESRCH
    e1.unbind(p1)  # pushed to e0 by the service: its port fires
    assert readable(e0, TIMEOUT)
    assert e0.wait(TIMEOUT) == p0


def test_wait_blocks_until_a_port_fires(pair: tuple[EventChannel, int, EventChannel, int]) -> None:
    e0, p0, e1, p1 = pair
    assert e0.wait(0.02) is None
    got: list[int | None] = []
    waiter = threading.Thread(target=lambda: got.append(e0.wait(TIMEOUT)), daemon=True)
    waiter.start()
    # Notify only once the waiter is inside wait() (counted before its epoll_wait).
    assert eventually(lambda: e0._waiters == 1)
    waiter.join(0.1)
    assert waiter.is_alive() and got == [], "wait() returned with nothing fired"
    e1.notify(p1)
    waiter.join(TIMEOUT)
    assert not waiter.is_alive() and got == [p0]
    e1.notify(p1)  # masked: remembered, not delivered
    assert e0.wait(0.05) is None
    e0.unmask(p0)
    assert e0.wait(TIMEOUT) == p0


@pytest.mark.parametrize("request_kind", ["bind", "unbind"])
def test_the_reply_to_a_request_does_not_wake_the_handles_waiters(
        host: SimHost, guest: Domain, request_kind: str) -> None:
    """A request of the handle takes its own reply: a thread waiting on
    fileno() (or in wait()) would only find it taken, so the reply must
    not make the handle readable meanwhile (a pvcalls poller was woken
    twice per connect so)."""
    e1 = guest.evtchn()
    with host.dom0.evtchn() as e0:
        gone, kept = (e0.bind_interdomain(guest.domid, e1.bind_unbound_port(0))
                      for _ in range(2))
        remote = e1.bind_unbound_port(0)
        # The reply is in the socket (the connection polls readable) when
        # the handle is looked at: at the receive, before taking it.
        seen: list[bool] = []
        conn = e0._conn
        receive = conn._receive

        def look_then_receive(flags: int) -> tuple[dict[str, object], list[int]]:
            assert readable(conn.fileno(), TIMEOUT)
            seen.append(readable(e0.fileno(), 0))
            return receive(flags)

        conn._receive = look_then_receive  # type: ignore[method-assign]
        if request_kind == "bind":
            e0.bind_interdomain(guest.domid, remote)
        else:
            e0.unbind(gone)
        conn._receive = receive  # type: ignore[method-assign]
        assert seen == [False]
        # Watched again once the request is over: pushed news still wakes
        # the handle's waiters (the guest unbinding its end of our port).
        e1.close()
        assert readable(e0.fileno(), TIMEOUT)
        assert eventually(lambda: e0.remote(kept) is None)


def test_handles_go_quiet_when_the_host_stops() -> None:
    host = SimHost()
    host.start()
    guest = host.create_domain("guest")
    e0, e1 = host.dom0.evtchn(), guest.evtchn()
    try:
        e0.bind_interdomain(guest.domid, e1.bind_unbound_port(0))
        host.close()
        for ch in (e0, e1):
            while ch.pending() is not None:
                pass
            assert not readable(ch, 0.05)
            with pytest.raises(EventChannelError) as info:
                ch.bind_unbound_port(0)
            assert info.value.errno == errno.ENODEV
    finally:
        e0.close()
        e1.close()


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_a_pipe_left_without_writers_is_not_reported_for_ever(masked: bool) -> None:
    """The host and the peer's process gone, nobody holds the write end of
    our pipe: epoll reports its hang-up whatever events it was asked for,
    and pending() must not keep taking it."""
    host = SimHost()
    host.start()
    guest = host.create_domain("guest")
    e0, e1 = host.dom0.evtchn(), guest.evtchn()
    try:
        p1 = e1.bind_unbound_port(0)
        p0 = e0.bind_interdomain(guest.domid, p1)
        if masked:
            e0.notify(p0)
            assert wait_pending(e1) == p1  # taken, so masked
            e0.notify(p0)  # remembered while masked
        host.close()
        e0.close()  # the last writer of e1's pipe
        taken: list[int | None] = []

        def take_all() -> None:
            # As an event loop does: every port taken is unmasked, which
            # must not make the hang-up a new event each time.
            while taken[-1:] != [None]:
                taken.append(e1.pending())
                if taken[-1] is not None:
                    e1.unmask(taken[-1])

        taker = threading.Thread(target=take_all, daemon=True)
        taker.start()
        taker.join(TIMEOUT)
        assert not taker.is_alive(), "pending() spins on the hang-up"
        assert taken[:-1] in ([], [p1])  # at most the port's last event, once
        assert not readable(e1, 0.05)
        e1.unmask(p1)
        if masked:
            assert wait_pending(e1) == p1  # what was remembered while masked
            e1.unmask(p1)
            assert e1.pending() is None  # then the hang-up, found and set aside
            e1.unmask(p1)
        # Dead, the port stays unwatched however often it is unmasked.
        assert not readable(e1, 0.05)
    finally:
        e1.close()


def test_a_masked_port_reported_to_two_waiters_is_set_aside_once(
        pair: tuple[EventChannel, int, EventChannel, int]) -> None:
    """wait() polls epoll without the handle's lock, so two waiting threads
    may both be handed a masked port's descriptor."""
    e0, p0, e1, p1 = pair
    e0.notify(p0)
    assert wait_pending(e1) == p1  # taken: masked
    e0.notify(p0)
    rfd = e1._ports[p1].rfd
    with e1._lock:
        assert e1._take(rfd) == 0
        assert e1._take(rfd) == 0  # the second waiter's report
    e1.unmask(p1)
    assert wait_pending(e1) == p1  # the notification while masked is kept


def test_close_wakes_a_waiting_thread(host: SimHost) -> None:
    # No port bound: only close()'s own wake-up can end the wait.
    ch = host.dom0.evtchn()
    errors: list[int] = []

    def waiter() -> None:
        try:
            ch.wait()
        except EventChannelError as e:
            errors.append(e.errno)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    # Close only once the waiter is inside wait(): a close() before it
    # would just be refused at wait()'s entry.
    assert eventually(lambda: ch._waiters == 1)
    ch.close()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "close() left a thread waiting"
    assert errors == [errno.EBADF]
    assert ch._waiters == 0  # the waiter released the descriptors on its way out
    with pytest.raises(ValueError):
        ch._epoll.fileno()  # closed by the last waiter


class _EpollHoldingOneWaiter:
    """A handle's epoll set whose poll() holds the thread named ``held``
    before the real one until ``go`` is set, and raises KeyboardInterrupt
    in any other thread as the real one returns if ``interrupt`` (a
    Ctrl-C landing there); the rest is the real one's."""

    def __init__(self, real: select.epoll, interrupt: bool) -> None:
        self._real = real
        self._interrupt = interrupt
        self.held = ""
        self.reached = threading.Event()
        self.go = threading.Event()

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        if threading.current_thread().name == self.held:
            self.reached.set()
            assert self.go.wait(TIMEOUT)
            return self._real.poll(timeout, maxevents)
        events = self._real.poll(timeout, maxevents)
        if self._interrupt:
            raise KeyboardInterrupt
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.parametrize("first_leaves", ["woken", "interrupted"])
def test_close_with_two_waiters_keeps_the_descriptors_until_the_last_leaves(
        host: SimHost, first_leaves: str) -> None:
    """close() wakes every thread in wait(); the last one to leave closes
    the epoll set.  The first to leave, woken or cut short by a Ctrl-C,
    must not close it while another is still on its way into epoll_wait,
    which would then poll a closed set (ValueError, not EBADF)."""
    ch = host.dom0.evtchn()
    epoll = _EpollHoldingOneWaiter(ch._epoll, first_leaves == "interrupted")
    ch._epoll = epoll  # type: ignore[assignment]
    ended: dict[str, BaseException] = {}

    def waiter() -> None:
        try:
            ch.wait()
        except BaseException as e:  # KeyboardInterrupt is one of the outcomes
            ended[threading.current_thread().name] = e

    first = threading.Thread(target=waiter, name="first", daemon=True)
    second = threading.Thread(target=waiter, name="second", daemon=True)
    epoll.held = second.name
    first.start()
    assert eventually(lambda: ch._waiters == 1)
    second.start()
    assert epoll.reached.wait(TIMEOUT)
    assert ch._waiters == 2
    ch.close()
    first.join(TIMEOUT)
    assert not first.is_alive()
    epoll.go.set()
    second.join(TIMEOUT)
    assert not second.is_alive(), "close() left a thread waiting"
    assert isinstance(ended["first"],
                      KeyboardInterrupt if first_leaves == "interrupted" else EventChannelError)
    error = ended["second"]
    assert isinstance(error, EventChannelError) and error.errno == errno.EBADF, error
    assert ch._waiters == 0
    with pytest.raises(ValueError):
        epoll.fileno()  # closed by the last waiter


def test_concurrent_binds_notifies_and_unbinds(host: SimHost, guest: Domain) -> None:
    """Threads hammering one pair of handles: nothing breaks, no thread
    hangs, and every port is given back."""
    e0, e1 = host.dom0.evtchn(), guest.evtchn()
    errors: list[BaseException] = []
    rounds = 40

    def worker() -> None:
        try:
            for _ in range(rounds):
                p1 = e1.bind_unbound_port(0)
                p0 = e0.bind_interdomain(guest.domid, p1)
                for _ in range(5):
                    e0.notify(p0)
                    e1.notify(p1)
                if p1 % 2:
                    e1.unbind(p1)
                    e0.unbind(p0)
                else:
                    e0.unbind(p0)
                    e1.unbind(p1)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def drainer(ch: EventChannel, stop: threading.Event) -> None:
        # One side blocks in wait(), the other polls and takes pending()'s
        # fast path (the pipe of the port it returned last).
        while not stop.is_set():
            try:
                if ch is e0:
                    port = ch.wait(0.01)
                else:
                    readable(ch, 0.01)
                    port = ch.pending()
                if port is not None:
                    ch.unmask(port)
            except EventChannelError as e:
                if e.errno != errno.EINVAL:  # unbound between wait and unmask
                    errors.append(e)

    stop = threading.Event()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    threads += [threading.Thread(target=drainer, args=(ch, stop)) for ch in (e0, e1)]
    for t in threads:
        t.start()
    for t in threads[:4]:
        t.join(60)
    stop.set()
    for t in threads[4:]:
        t.join(10)
    hung = [t.name for t in threads if t.is_alive()]
    e0.close()
    e1.close()
    assert hung == []
    assert errors == []
    assert eventually(lambda: host.hypervisor.stats()["ports"] == 0)


def test_a_hostile_peer_cannot_make_anyone_block(host: SimHost, guest: Domain) -> None:
    """The guest speaks the wire itself, sets every descriptor it gets to
    blocking and fills every pipe it can: dom0 and the service carry on."""
    import json
    import os
    import socket

    from xenback.sim._hypervisor import domain_socket

    def recv(sock: socket.socket) -> tuple[dict, list[int]]:  # type: ignore[type-arg]
        data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
        return json.loads(data), list(fds)

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock, host.dom0.evtchn() as e0:
        sock.settimeout(TIMEOUT)
        sock.connect(os.fspath(domain_socket(host.run_dir, guest.domid)))
        sock.send(json.dumps({"op": "evtchn_alloc_unbound", "domid": 0}).encode())
        reply, fds = recv(sock)
        p0 = e0.bind_interdomain(guest.domid, reply["port"])
        push, pushed = recv(sock)
        assert push["event"] == "bound" and len(pushed) == 1
        fds += pushed
        for fd in fds:  # fill what we can write to, then block everything
            try:
                while True:
                    os.write(fd, b"x" * 4096)
            except (BlockingIOError, OSError):
                pass
            os.set_blocking(fd, True)

        done = threading.Event()

        def dom0_side() -> None:
            for _ in range(100_000):  # more than the guest's pipe holds
                e0.notify(p0)
            done.set()

        thread = threading.Thread(target=dom0_side)
        thread.start()
        thread.join(10)
        assert done.is_set(), "dom0's notify blocked"
        # The guest goes away: the service fires dom0's port, whose pipe is
        # full and whose write end the guest set blocking.
        sock.close()
        for fd in fds:
            os.close(fd)
        served = threading.Event()

        def guest_again() -> None:
            with guest.evtchn() as e1:
                e1.bind_unbound_port(0)
            served.set()

        thread = threading.Thread(target=guest_again, daemon=True)
        thread.start()
        thread.join(10)
        assert served.is_set(), "the service blocked"
        assert eventually(lambda: e0.remote(p0) is None)
        assert wait_pending(e0) == p0


def test_a_domain_runs_out_of_ports_not_the_host(host: SimHost, guest: Domain) -> None:
    from xenback.sim._hypervisor import MAX_PORTS_PER_DOMAIN

    with guest.evtchn() as ch:
        ports = [ch.bind_unbound_port(0) for _ in range(MAX_PORTS_PER_DOMAIN)]
        assert sorted(ports) == list(range(1, MAX_PORTS_PER_DOMAIN + 1))
        with pytest.raises(EventChannelError) as info:
            ch.bind_unbound_port(0)
        assert info.value.errno == errno.ENOSPC
        ch.unbind(ports[100])
        assert ch.bind_unbound_port(0) == ports[100]
    assert eventually(lambda: host.hypervisor.stats()["ports"] == 0)


def _pipes() -> frozenset[tuple[int, str]]:
    """This process's pipe descriptors, each with its pipe's inode."""
    return frozenset(d for d in descriptors() if d[1].startswith("pipe:"))


def test_a_bind_refused_for_want_of_ports_keeps_no_descriptor(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service opens the peer's write end before it allocates the new
    port; a refusal must close it (the service's descriptors are all here)."""
    from xenback.sim import _hypervisor

    monkeypatch.setattr(_hypervisor, "MAX_PORTS_PER_DOMAIN", 4)
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        for _ in range(4):
            e1.bind_unbound_port(0)
        offered = e0.bind_unbound_port(guest.domid)
        # Pipes alone, each by number and inode: the write end the service
        # opened is a new number on the offered port's pipe.  Not a count
        # of the process's descriptors, which other threads change.
        pipes = _pipes()
        for _ in range(3):
            with pytest.raises(EventChannelError) as info:
                e1.bind_interdomain(0, offered)
            assert info.value.errno == errno.ENOSPC
            # The service has answered, so it is done with all before.
            assert _pipes() <= pipes


def test_a_peer_binding_and_unbinding_in_a_loop_cannot_get_a_handle_dropped(
    host: SimHost, guest: Domain
) -> None:
    """Every bind and unbind of a port pushes a message to its owner's
    handle.  A busy owner (a backend serving other guests) reads them late:
    a hostile guest must not fill its socket until the service drops the
    handle and with it the owner's channels to everybody else."""
    import json
    import os
    import socket

    from xenback.sim._hypervisor import domain_socket

    other = host.create_domain("other")
    with host.dom0.evtchn() as e0, other.evtchn() as e2:
        offered = e0.bind_unbound_port(guest.domid)
        p0 = e0.bind_unbound_port(other.domid)
        p2 = e2.bind_interdomain(0, p0)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(os.fspath(domain_socket(host.run_dir, guest.domid)))

            def ask(**msg: object) -> dict:  # type: ignore[type-arg]
                sock.send(json.dumps(msg).encode())
                data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
                for fd in fds:
                    os.close(fd)
                return json.loads(data)  # type: ignore[no-any-return]

            # Far more than a socket buffer's worth of pushes to dom0, which
            # reads none meanwhile.
            for _ in range(1000):
                reply = ask(op="evtchn_bind_interdomain", domid=0, port=offered)
                assert "port" in reply, reply
                assert ask(op="evtchn_unbind", port=reply["port"]) == {}
            assert "port" in ask(op="evtchn_bind_interdomain", domid=0, port=offered)
        # dom0's handle survived, its channel to "other" too, and it ends
        # up with the guest's last word (the guest went away: unbound).
        assert eventually(lambda: e0.remote(offered) is None)
        assert e0.remote(p0) == (other.domid, p2)
        e2.notify(p2)
        while (port := wait_pending(e0)) != p0:  # the guest fired ``offered``
            e0.unmask(port)
        e0.notify(p0)
        assert wait_pending(e2) == p2
        assert e0.bind_unbound_port(guest.domid) >= 1


def test_a_long_chain_of_dead_handles_is_closed_without_recursion(
    host: SimHost, caplog: pytest.LogCaptureFixture
) -> None:
    """Guests chain their handles by event channels (each handle bound to
    the next) and all go away at once: closing one unbinds its port, telling
    the next handle fails (it is gone too) and closes that one, and so on.
    The service must do that in a loop, not nest one close in the other,
    or it runs out of stack with handles half closed: their ports and
    descriptors would stay for good."""
    import json
    import os
    import socket

    from xenback.sim._hypervisor import MAX_HANDLES_PER_DOMAIN, domain_socket

    guests = [host.create_domain(f"chain{i}") for i in range(3)]
    socks: list[socket.socket] = []
    fds: list[int] = []

    def ask(sock: socket.socket, **msg: object) -> dict:  # type: ignore[type-arg]
        sock.send(json.dumps(msg).encode())
        data, rfds, _, _ = socket.recv_fds(sock, 65536, 4)
        fds.extend(rfds)  # kept open: a port whose reader is gone is refused
        reply = json.loads(data)
        assert "errno" not in reply, reply
        return reply  # type: ignore[no-any-return]

    try:
        previous: tuple[int, int] | None = None  # (domid, port) offered to the next
        # Deeper than the stack: 600 handles, 200 a domain.
        chain = [g.domid for g in guests for _ in range(MAX_HANDLES_PER_DOMAIN - 56)]
        for domid, nxt in zip(chain, chain[1:] + chain[-1:], strict=True):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            socks.append(sock)
            sock.settimeout(TIMEOUT)
            sock.connect(os.fspath(domain_socket(host.run_dir, domid)))
            if previous is not None:
                ask(sock, op="evtchn_bind_interdomain", domid=previous[0], port=previous[1])
            port = ask(sock, op="evtchn_alloc_unbound", domid=nxt)["port"]
            previous = (domid, port)
        assert host.hypervisor.stats()["ports"] > 1000
        with host.hypervisor._lock:  # all gone before the service sees any
            for sock in socks:
                sock.close()
    finally:
        for sock in socks:
            sock.close()
        for fd in fds:
            os.close(fd)
    assert eventually(lambda: host.hypervisor.stats()["connections"] == 0)
    assert host.hypervisor.stats()["ports"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    for guest in guests:
        host.destroy_domain(guest)


def test_an_event_channel_handle_past_the_domains_limit_says_why(
    host: SimHost, guest: Domain
) -> None:
    """Refused for the domain's limit on handles, the handle's calls fail
    with EMFILE (too many open), not ENODEV (the host gone), also once
    its wait for events has met the end of the connection."""
    from xenback.sim._hypervisor import MAX_HANDLES_PER_DOMAIN

    handles = [guest.gnttab() for _ in range(MAX_HANDLES_PER_DOMAIN)]
    try:
        with guest.evtchn() as extra:
            # Connected after extra's: refused once extra's was.
            with guest.gnttab() as later, pytest.raises(OSError):
                later.map_grant_refs(0, [8])
            assert extra.wait(0) is None  # takes the refusal as a hang-up
            with pytest.raises(EventChannelError) as info:
                extra.bind_unbound_port(0)
            assert info.value.errno == errno.EMFILE
            assert f"{MAX_HANDLES_PER_DOMAIN} handles" in str(info.value.strerror)
    finally:
        for handle in handles:
            handle.close()


def test_the_first_handle_past_the_domains_limit_is_logged_at_once(
        host: SimHost, guest: Domain, caplog: pytest.LogCaptureFixture) -> None:
    """Someone debugging a guest that hits its limit finds a line in the
    log as the first handle is refused, not only a count of refusals when
    the domain goes (those past the domain's rate limit are counted)."""
    from xenback.sim._hypervisor import MAX_HANDLES_PER_DOMAIN

    handles = [guest.gnttab() for _ in range(MAX_HANDLES_PER_DOMAIN)]
    try:
        with caplog.at_level(logging.WARNING, logger="xenback.sim._hypervisor"):
            with guest.evtchn() as extra, pytest.raises(EventChannelError):
                extra.bind_unbound_port(0)
            # The service thread emits what it logged once past its lock,
            # after the round's replies: the refusal may come first.
            assert eventually(lambda: caplog.records != [])
        assert [r.getMessage() for r in caplog.records] == [
            f"hypervisor: domain {guest.domid} has {MAX_HANDLES_PER_DOMAIN} handles open; "
            "refusing another"]
    finally:
        for handle in handles:
            handle.close()


def test_a_dead_domain_cannot_fire_its_former_peer(host: SimHost) -> None:
    """Its process may live on with the handle: the write end it holds of
    the peer's pipe must not reach the peer's port any more (Xen runs no
    dead domain), though the port stays bound until its owner unbinds it."""
    guest = host.create_domain("doomed")
    e1 = guest.evtchn()
    with host.dom0.evtchn() as e0:
        p1 = e1.bind_unbound_port(0)
        p0 = e0.bind_interdomain(guest.domid, p1)
        host.destroy_domain(guest)
        assert wait_pending(e0) == p0
        assert e0.remote(p0) is None
        e0.unmask(p0)
        e1.notify(p1)
        assert e0.pending() is None  # a byte written to its pipe would be there now
    e1.close()


def test_a_write_end_kept_past_an_unbind_fires_nothing(
    pair: tuple[EventChannel, int, EventChannel, int],
) -> None:
    """A hostile guest keeps a copy of its peer's write end and unbinds:
    the copy must not fire the peer's port, which is unbound now."""
    e0, p0, e1, p1 = pair
    assert e1.remote(p1) == (0, p0)  # it has heard of its peer: it holds a write end
    kept = os.dup(e1._ports[p1].peer_fd)  # type: ignore[arg-type]
    try:
        e1.unbind(p1)
        assert wait_pending(e0) == p0
        assert e0.remote(p0) is None
        e0.unmask(p0)
        try:
            os.write(kept, b"\x00")
        except BrokenPipeError:
            pass  # nobody reads that pipe any more: as good
        assert e0.pending() is None  # a byte written to its pipe would be there now
    finally:
        os.close(kept)


def test_a_port_set_aside_while_masked_keeps_its_event_across_a_new_pipe(
    pair: tuple[EventChannel, int, EventChannel, int],
) -> None:
    e0, p0, e1, p1 = pair
    e1.notify(p1)
    assert wait_pending(e0) == p0  # masked now
    e1.notify(p1)
    assert e0.pending() is None  # notified while masked: set aside
    e1.unbind(p1)  # p0 reads from a new pipe from the next news on
    assert e0.remote(p0) is None
    assert e0.pending() is None  # still masked
    e0.unmask(p0)
    assert wait_pending(e0) == p0
    e0.unmask(p0)
    assert e0.pending() is None


@pytest.mark.timeout(600)
def test_a_handle_interrupted_anywhere_in_its_making_leaves_nothing(
        host: SimHost, guest: Domain) -> None:
    """A Ctrl-C landing as any call of Domain.evtchn() returns, the
    handle's constructor included: the factory raises having closed all
    it opened, or returns a handle that works.  As ``return
    EventChannel()``, one as the constructor returned lost the handle, its
    eventfd open for good and its connection counted against the domain's
    handles until the garbage collector found it."""
    within = os.path.dirname(xenback.__file__)

    def landing(n: int) -> str:
        made: list[EventChannel] = []
        # This lambda is no place of xenback's: a Ctrl-C lands in
        # evtchn() or not at all.
        where = interrupted_at(n, within, lambda: made.append(guest.evtchn()))
        if where:
            assert made == [], where
        else:
            (ch,) = made
            with ch:
                assert ch.bind_unbound_port(0) > 0
        return where

    every_landing(host, landing, more_than=5)



def _connected_pair(host: SimHost, guest: Domain) -> tuple[EventChannel, EventChannel, int, int]:
    """A dom0 handle and a guest handle, and the two ends of a channel
    between them: (dom0's handle, the guest's, dom0's port, the guest's)."""
    e0, e1 = host.dom0.evtchn(), guest.evtchn()
    p1 = e1.bind_unbound_port(0)
    return e0, e1, e0.bind_interdomain(guest.domid, p1), p1


def test_an_unbind_interrupted_anywhere_is_finished_when_called_again(
        host: SimHost, guest: Domain) -> None:
    """A Ctrl-C landing anywhere in unbind(), then unbind() again: the
    peer sees the port go and, once both handles are closed, nothing is
    held.  One landing as the port was taken off the table, before its
    descriptors were closed, lost them (the handle's close() never saw the
    port again) and left the retry nothing to unbind, the peer still bound."""
    def landing(n: int) -> str:
        e0, e1, p0, p1 = _connected_pair(host, guest)
        where = interrupted_at(n, SIM_CODE, lambda: e0.unbind(p0), besides=SIM_ROUND_TRIP)
        try:
            e0.unbind(p0)
        except EventChannelError as e:
            # The first one got through before the signal landed.
            assert e.errno == errno.ENOTCONN, (where, e)
        assert e0.ports() == [], where
        assert e1.remote(p1) is None, where
        e0.close()
        e1.close()
        return where

    every_landing(host, landing, more_than=5)


def _unbind_refused_once(ch: EventChannel, monkeypatch: pytest.MonkeyPatch,
                         error: BaseException) -> None:
    """Make ``ch``'s next request to unbind fail with ``error`` before it
    reaches the service (a Ctrl-C, say), as ``unbind`` sends it."""
    real = ch._conn.call

    def call(op: str, *args: Any, **kwargs: Any) -> Any:
        if op == "evtchn_unbind":
            monkeypatch.setattr(ch._conn, "call", real)
            raise error
        return real(op, *args, **kwargs)

    monkeypatch.setattr(ch._conn, "call", call)


def test_a_port_whose_unbind_was_cut_short_is_bound_for_no_call(
        host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unbind() cut short before the service answered leaves the port
    in the table, its descriptors gone, for the next unbind() to finish.
    Meanwhile it is a stale number to every call, as to ports(): unmask()
    said nothing and unmasked it, though notify() and remote() said it
    was not bound."""
    e0, e1, p0, p1 = _connected_pair(host, guest)
    try:
        _unbind_refused_once(e0, monkeypatch, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            e0.unbind(p0)
        assert e0.ports() == []
        for call, err in ((e0.notify, errno.ENOTCONN), (e0.remote, errno.EINVAL),
                          (e0.unmask, errno.EINVAL)):
            with pytest.raises(EventChannelError) as info:
                call(p0)
            assert info.value.errno == err, call
        e0.reset()  # nothing of the port's to read
        assert e0.pending() is None
        e0.unbind(p0)  # finishes it
        assert e1.remote(p1) is None
        with pytest.raises(EventChannelError) as info:
            e0.unbind(p0)
        assert info.value.errno == errno.ENOTCONN
    finally:
        e0.close()
        e1.close()


def test_an_unbind_finished_again_says_why_it_failed(
        host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unbind() called again after one cut short takes EINVAL from the
    service as "the first one got through"; any other error (the host
    gone) is the caller's to hear, and the port stays for the next
    unbind() to finish, as after any refusal (see below)."""
    e0, e1, p0, p1 = _connected_pair(host, guest)
    try:
        _unbind_refused_once(e0, monkeypatch, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            e0.unbind(p0)
        _unbind_refused_once(e0, monkeypatch,
                             EventChannelError(errno.ENODEV, "the host is gone"))
        with pytest.raises(EventChannelError) as info:
            e0.unbind(p0)
        assert info.value.errno == errno.ENODEV
        assert e1.remote(p1) == (0, p0)  # never reached the service
        e0.unbind(p0)
        assert e1.remote(p1) is None
        with pytest.raises(EventChannelError) as info:
            e0.unbind(p0)
        assert info.value.errno == errno.ENOTCONN
    finally:
        e0.close()
        e1.close()


@pytest.mark.parametrize("refusal", [errno.EMFILE, errno.EIO, errno.ENODEV])
def test_an_unbind_the_service_refused_stays_for_the_next_one(
        host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch, refusal: int) -> None:
    """An unbind() that fails with another error than EINVAL (the service
    out of descriptors, failing, or out of reach) may leave the port bound
    there, its peer connected to it: the port stays in the handle's table,
    bound for no call but unbind() and close(), and unbind() again asks
    the service again, as a failed IOCTL_EVTCHN_UNBIND leaves Linux's port
    bound.  It was dropped: the next unbind() said ENOTCONN, and the peer
    stayed connected to a port nobody read until the handle closed."""
    e0, e1, p0, p1 = _connected_pair(host, guest)
    try:
        _unbind_refused_once(e0, monkeypatch, EventChannelError(refusal, "refused"))
        with pytest.raises(EventChannelError) as info:
            e0.unbind(p0)
        assert info.value.errno == refusal
        assert e0.ports() == []
        with pytest.raises(EventChannelError) as info:
            e0.notify(p0)
        assert info.value.errno == errno.ENOTCONN
        assert e1.remote(p1) == (0, p0)
        e0.unbind(p0)
        assert e1.remote(p1) is None
        with pytest.raises(EventChannelError) as info:
            e0.unbind(p0)
        assert info.value.errno == errno.ENOTCONN
    finally:
        e0.close()
        e1.close()



def test_news_of_a_port_whose_unbind_was_refused_is_no_warning_and_fires_nothing(
        host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The peer unbinds from, then binds again to, a port whose unbind the
    service refused: the handle, which gave the port up, takes the news as
    stale (no warning, no event, its descriptors given back), and unbind()
    again still finishes it, the peer seeing it go."""
    e0, e1, p0, p1 = _connected_pair(host, guest)
    try:
        _unbind_refused_once(e0, monkeypatch, EventChannelError(errno.EIO, "refused"))
        with pytest.raises(EventChannelError):
            e0.unbind(p0)
        with caplog.at_level(logging.DEBUG, logger=_evtchn.__name__):
            e1.unbind(p1)  # "unbound" news for p0
            p1 = e1.bind_interdomain(0, p0)  # "bound" news, a write end with it
            e1.notify(p1)
            with pytest.raises(EventChannelError) as info:
                e0.remote(p0)  # drains the news
            assert info.value.errno == errno.EINVAL
            assert e0.pending() is None
        mine = [r.getMessage() for r in caplog.records if r.name == _evtchn.__name__]
        assert all(r.levelno < logging.WARNING for r in caplog.records), mine
        assert any("'unbound'" in m for m in mine) and any("'domid': 1" in m for m in mine), mine
        assert e1.remote(p1) == (0, p0)
        e0.unbind(p0)
        assert e1.remote(p1) is None
    finally:
        e0.close()
        e1.close()
    assert eventually(lambda: host.hypervisor.stats()["ports"] == 0)


def test_closing_a_handle_with_a_port_whose_unbind_was_refused_unbinds_it(
        host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() after a refused unbind(): the service unbinds the port with
    the connection, its peer sees it go, nothing is held."""
    e0, e1, p0, p1 = _connected_pair(host, guest)
    try:
        _unbind_refused_once(e0, monkeypatch, EventChannelError(errno.EMFILE, "refused"))
        with pytest.raises(EventChannelError):
            e0.unbind(p0)
        e0.close()
        assert wait_pending(e1) == p1
        assert e1.remote(p1) is None
        with pytest.raises(EventChannelError) as info:
            e0.unbind(p0)
        assert info.value.errno == errno.EBADF
    finally:
        e0.close()
        e1.close()
    assert eventually(lambda: host.hypervisor.stats()["ports"] == 0)


def test_an_unbind_of_a_port_the_service_does_not_hold_drops_it(
        host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    """EINVAL from the service on a first unbind(): it holds no such port
    of this handle's, so there is nothing to retry: the error is the
    caller's, and the port is gone from the handle too."""
    e0, e1, p0, p1 = _connected_pair(host, guest)
    try:
        _unbind_refused_once(e0, monkeypatch, EventChannelError(errno.EINVAL, "not bound"))
        with pytest.raises(EventChannelError) as info:
            e0.unbind(p0)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(EventChannelError) as info:
            e0.unbind(p0)
        assert info.value.errno == errno.ENOTCONN
    finally:
        e0.close()
        e1.close()


def test_a_close_interrupted_anywhere_is_finished_when_called_again(
        host: SimHost, guest: Domain) -> None:
    """A Ctrl-C landing anywhere in close(), then close() again: every
    port, descriptor and connection is released.  close() marked the
    handle closed first and returned at once when it was, so one cut short
    was never finished."""
    def landing(n: int) -> str:
        e0, e1, _, p1 = _connected_pair(host, guest)
        e0.bind_unbound_port(guest.domid)
        where = interrupted_at(n, SIM_CODE, e0.close, besides=SIM_ROUND_TRIP)
        e0.close()
        with pytest.raises(EventChannelError) as info:
            e0.notify(1)
        assert info.value.errno == errno.EBADF, where
        assert eventually(lambda: e1.remote(p1) is None), where
        e1.close()
        return where

    every_landing(host, landing, more_than=5)


@pytest.mark.parametrize("op", ["bind_unbound_port", "bind_interdomain"])
def test_a_bind_interrupted_anywhere_leaves_its_port_to_the_handle_or_to_nobody(
        host: SimHost, guest: Domain, op: str) -> None:
    """A Ctrl-C landing anywhere in a bind, the reply's ``apply`` included:
    the port the service made is either the handle's (listed by ports(),
    its descriptors kept to be closed by unbind) or given back by the
    next call.  One landing as apply started, before it stored the reply,
    lost the port's read end for good and left the port at the service
    until the handle closed.  And the handle hears the service's news at
    once, before any call of its own: one landing as the bind's end of
    its wait for the reply started (_quiet_service(False)) left the
    service connection out of the handle's epoll set until the next
    request, and a thread waiting on the handle deaf to it."""
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:

        def landing(n: int) -> str:
            p1 = e1.bind_unbound_port(0)
            bind: Callable[[], object] = {
                "bind_unbound_port": lambda: e0.bind_unbound_port(guest.domid),
                "bind_interdomain": lambda: e0.bind_interdomain(guest.domid, p1),
            }[op]
            ports = host.hypervisor.stats()["ports"]
            news = e0.bind_unbound_port(guest.domid)
            where = interrupted_at(n, SIM_CODE, bind, besides=SIM_ROUND_TRIP)
            peer = e1.bind_interdomain(0, news)  # pushed to e0
            assert readable(e0, TIMEOUT), where
            assert e0.remote(news) == (guest.domid, peer), where
            e1.unbind(peer)
            e0.unbind(news)
            # The next call gives back what the cut one left to the connection.
            extra = e0.bind_unbound_port(guest.domid)
            held = e0.ports()
            assert extra in held, where
            assert eventually(lambda: host.hypervisor.stats()["ports"] == ports + len(held)), (
                where, held, host.hypervisor.stats())
            for port in held:
                e0.unbind(port)
            e1.unbind(p1)
            return where

        every_landing(host, landing, more_than=5)




@pytest.mark.parametrize("waiter", [False, True], ids=["alone", "while-a-thread-waits"])
def test_a_bind_answered_after_the_handle_closed_keeps_nothing(
        host: SimHost, guest: Domain, waiter: bool) -> None:
    """A bind whose reply comes after another thread's close() marked the
    handle closed: close() did not see that port, so the bind fails with
    EBADF and keeps none of its descriptors (the connection closes them
    and gives the port back).  Also while a thread in wait() keeps the
    epoll set open: the port must not be watched and listed there, in a
    handle nobody closes again."""
    before = handle_census(host)
    e0 = host.dom0.evtchn()
    # A waiter stopped as it is about to poll: counted, so close() leaves
    # the epoll set open for it.
    woken = PauseAt(EventChannel.wait, "events = self._epoll.poll(remaining, 1)")
    waiting = Attempt(lambda: woken.run(e0.wait)) if waiter else None
    if waiting is not None:
        assert woken.reached.wait(TIMEOUT) and e0._waiters == 1
    error = closed_while_paused(e0, PauseAt(EventChannel._take_port, "with self._lock"),
                                lambda: e0.bind_unbound_port(guest.domid))
    woken.resume()
    if waiting is not None:
        assert isinstance(waiting.result(), EventChannelError)
    assert isinstance(error, EventChannelError) and error.errno == errno.EBADF, error
    released_since(host, before, "a bind answered after close()")


def _bind_answered_then(path: str, port_r: int,
                        pushes: list[tuple[dict[str, Any], int | tuple[int, ...]]]
                        ) -> tuple[threading.Thread, threading.Event]:
    """A fake service at ``path``: answers the first request (a bind) with
    port 7 and ``port_r``, then pushes each message of ``pushes`` with its
    descriptor (or tuple of them), and closes every descriptor it sent.
    Returns the server thread and an Event set once everything went."""
    sent = threading.Event()
    carried = [(fd,) if isinstance(fd, int) else fd for _, fd in pushes]

    def handle(conn: socket.socket) -> None:
        request = json.loads(conn.recv(MAX_MESSAGE))
        send_message(conn, {"id": request["id"], "port": 7}, [port_r])
        for (msg, _), fds in zip(pushes, carried, strict=True):
            send_message(conn, msg, list(fds))
        for fd in (port_r, *itertools.chain.from_iterable(carried)):
            os.close(fd)
        sent.set()
        while conn.recv(MAX_MESSAGE):
            pass

    return serve_one_client(path, handle, socket.SOCK_SEQPACKET), sent


def _error_logged_by_the_drain(ch: EventChannel, caplog: pytest.LogCaptureFixture) -> str:
    """The one error logged while remote() takes the pushes: a bad one
    among them is dropped, the port left with its good peer, (1, 5)."""
    with caplog.at_level(logging.ERROR):
        assert ch.remote(7) == (1, 5)
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    return record.getMessage()


@pytest.mark.parametrize("bad", [
    {"event": "bound", "port": 7, "remote_port": 5},
    {"event": "bound", "port": 7, "domid": "one", "remote_port": 5},
    {"event": "bound", "port": 7, "domid": 1, "remote_port": None},
    {"event": "moved", "port": 7},
], ids=["no-domid", "domid-not-int", "remote-port-not-int", "unknown-event"])
def test_a_malformed_push_about_a_port_is_logged_and_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: dict[str, object]) -> None:
    """A push about a port of ours that is no news the handle knows (a
    "bound" short of the peer's domain or port, an event it never heard
    of) is the service breaking the protocol: it is logged as an error and
    dropped, its descriptor closed and the port left as it was, and the
    handle goes on hearing the service.  A "bound" without its domid let
    a KeyError out of the drain (remote() here, pending() in an event
    loop), the port already marked unbound and the peer's write end never
    closed."""
    path = str(tmp_path / "hypervisor")
    port_r, port_w = os.pipe()
    bad_r, bad_w = os.pipe()
    good_r, good_w = os.pipe()
    server, sent = _bind_answered_then(path, port_r, [
        (bad, bad_w), ({"event": "bound", "port": 7, "domid": 1, "remote_port": 5}, good_w)])
    ch = EventChannel(path)
    try:
        assert ch.bind_unbound_port(1) == 7
        assert sent.wait(TIMEOUT)
        message = _error_logged_by_the_drain(ch, caplog)
        assert "moved" in message or "bound" in message
        assert select.select([bad_r], [], [], TIMEOUT)[0] == [bad_r]
        assert os.read(bad_r, 1) == b""  # no copy of its write end is left
        ch.notify(7)
        assert os.read(good_r, 1) == b"\x00"  # the good news was taken
    finally:
        ch.close()
        for fd in (port_w, bad_r, good_r):
            os.close(fd)
        server.join(TIMEOUT)


def _closed_by_all_but(r: int | None = None, w: int | None = None) -> bool:
    """Whether the handle kept no copy of a pipe's far end: ``r`` reads
    end of file (no write end left), or ``w`` writes into no read end."""
    if r is not None:
        return select.select([r], [], [], TIMEOUT)[0] == [r] and os.read(r, 1) == b""
    assert w is not None
    try:
        os.write(w, b"\0")
    except BrokenPipeError:
        return True
    return False


@pytest.mark.parametrize("carried", ["nothing", "new-read-end-only", "two-write-ends"])
def test_a_bound_push_without_its_one_write_end_is_logged_and_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, carried: str) -> None:
    """A "bound" must carry the peer's write end, one (besides the new
    read end it names): short of it, it was taken as an "unbound", the
    port's peer dropped on news that broke the protocol.  It is dropped
    as the other malformed pushes are, logged, every descriptor it
    carried closed, the port left connected as it was."""
    path = str(tmp_path / "hypervisor")
    port_r, port_w = os.pipe()
    good_r, good_w = os.pipe()
    new_r, new_w = os.pipe()
    extra_r, extra_w = os.pipe()
    bad: dict[str, Any] = {"event": "bound", "port": 7, "domid": 2, "remote_port": 9}
    fds: tuple[int, ...] = ()
    if carried == "new-read-end-only":
        bad["rfd"], fds = 0, (new_r,)
    elif carried == "two-write-ends":
        fds = (new_w, extra_w)
    server, sent = _bind_answered_then(path, port_r, [
        ({"event": "bound", "port": 7, "domid": 1, "remote_port": 5}, good_w), (bad, fds)])
    ch = EventChannel(path)
    try:
        assert ch.bind_unbound_port(1) == 7
        assert sent.wait(TIMEOUT)
        message = _error_logged_by_the_drain(ch, caplog)
        assert "malformed" in message
        if carried == "new-read-end-only":
            assert _closed_by_all_but(w=new_w)
        elif carried == "two-write-ends":
            assert _closed_by_all_but(r=new_r) and _closed_by_all_but(r=extra_r)
        ch.notify(7)
        assert os.read(good_r, 1) == b"\x00"  # still the first peer's
        os.write(port_w, b"\0")
        assert wait_pending(ch) == 7  # and still its own pipe
    finally:
        ch.close()
        for fd in (port_w, good_r, new_r, new_w, extra_r, extra_w):
            try:
                os.close(fd)
            except OSError:
                pass  # sent, and closed by the fake service
        server.join(TIMEOUT)


class _EpollRefusingRegister:
    """A handle's epoll set whose next register() fails, as one past
    fs.epoll.max_user_watches does (ENOSPC); the rest is the real one's."""

    def __init__(self, real: select.epoll) -> None:
        self._real = real
        self.refused: list[int] = []

    def register(self, fd: int, mask: int = select.EPOLLIN) -> None:
        if not self.refused:
            self.refused.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._real.register(fd, mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_a_new_pipe_the_handle_cannot_watch_leaves_the_port_as_it_was(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """News of a peer that brings the port a new pipe, which the handle
    cannot watch (its epoll set full): the old read end was closed before
    the new one failed, the port left on a descriptor it no longer had,
    and the peer's write end leaked.  The news is dropped whole, logged,
    the port left on its pipe, every descriptor the news brought closed."""
    path = str(tmp_path / "hypervisor")
    port_r, port_w = os.pipe()
    peer_r, peer_w = os.pipe()
    new_r, new_w = os.pipe()
    server, sent = _bind_answered_then(path, port_r, [
        ({"event": "bound", "port": 7, "domid": 1, "remote_port": 5, "rfd": 1},
         (peer_w, new_r))])
    ch = EventChannel(path)
    try:
        assert ch.bind_unbound_port(1) == 7
        full = _EpollRefusingRegister(ch._epoll)
        ch._epoll = full  # type: ignore[assignment]
        assert sent.wait(TIMEOUT)
        with caplog.at_level(logging.ERROR):
            assert ch.remote(7) is None  # the news was not taken
        assert full.refused
        assert [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert _closed_by_all_but(r=peer_r)
        assert _closed_by_all_but(w=new_w)
        os.write(port_w, b"\0")
        assert wait_pending(ch) == 7  # the port's own pipe still fires it
        ch.unmask(7)
    finally:
        ch.close()
        for fd in (port_w, peer_r, new_w):
            os.close(fd)
        server.join(TIMEOUT)


def test_news_for_a_port_being_unbound_keeps_nothing(tmp_path: Path) -> None:
    """A peer bound the port as unbind() asked the service to free it:
    the news comes during the request, for a port the handle gave up
    already.  It is dropped, the peer's write end closed, not given to a
    port that nothing will close again."""
    path = str(tmp_path / "hypervisor")
    port_r, port_w = os.pipe()
    peer_r, peer_w = os.pipe()

    def handle(conn: socket.socket) -> None:
        bind = json.loads(conn.recv(MAX_MESSAGE))
        send_message(conn, {"id": bind["id"], "port": 7}, [port_r])
        unbind = json.loads(conn.recv(MAX_MESSAGE))
        send_message(conn, {"event": "bound", "port": 7, "domid": 1, "remote_port": 5},
                     [peer_w])
        send_message(conn, {"id": unbind["id"]})
        os.close(port_r)
        os.close(peer_w)
        while conn.recv(MAX_MESSAGE):
            pass

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    ch = EventChannel(path)
    try:
        assert ch.bind_unbound_port(1) == 7
        ch.unbind(7)
        assert ch.ports() == []
        assert _closed_by_all_but(r=peer_r)
        assert _closed_by_all_but(w=port_w)
    finally:
        ch.close()
        server.join(TIMEOUT)
        close_fds([port_w, peer_r])


def _no_descriptors_since(before: frozenset[tuple[int, str]], where: str) -> None:
    assert eventually(lambda: descriptors() <= before), (
        f"interrupted {where}: new descriptors {sorted(descriptors() - before)}")


@pytest.mark.timeout(600)
def test_news_of_a_peer_interrupted_anywhere_leaks_nothing(tmp_path: Path) -> None:
    """A Ctrl-C landing anywhere in the handle's taking of two pushes (a
    peer bound; then another, with a new pipe for the port), which a
    drain (remote() here) makes: the news cut short is lost, but every
    descriptor the pushes brought is the port's or closed, none twice,
    and the port goes on with the pipe it holds."""
    def landing(n: int) -> str:
        before = descriptors()
        path = str(tmp_path / f"hypervisor-{n}")
        # The service's pipes are non-blocking; these others are not, and
        # the handle must make them so (a read of an empty pipe would block).
        port_r, port_w = os.pipe2(os.O_NONBLOCK)
        peer1_r, peer1_w = os.pipe()
        peer2_r, peer2_w = os.pipe()
        new_r, new_w = os.pipe()
        server, sent = _bind_answered_then(path, port_r, [
            ({"event": "bound", "port": 7, "domid": 1, "remote_port": 5}, peer1_w),
            ({"event": "bound", "port": 7, "domid": 2, "remote_port": 6, "rfd": 1},
             (peer2_w, new_r))])
        ch = EventChannel(path)
        try:
            assert ch.bind_unbound_port(1) == 7
            assert sent.wait(TIMEOUT)
            where = interrupted_at(n, SIM_CODE, lambda: ch.remote(7), besides=SIM_ROUND_TRIP)
            remote = ch.remote(7)  # whatever news is left
            lp = ch._ports[7]
            assert ch._by_fd == {lp.rfd: lp}, where
            assert not any(map(os.get_blocking, filter(None, (lp.rfd, lp.peer_fd)))), where
            # The port fires through the pipe it holds, and notifies the
            # peer it names through the write end it holds.
            pipe = os.fstat(lp.rfd).st_ino  # both ends of a pipe share it
            (w,) = [w for w in (port_w, new_w) if os.fstat(w).st_ino == pipe]
            os.write(w, b"\0")
            assert readable(ch, TIMEOUT) and ch.pending() == 7, where
            ch.unmask(7)
            if remote is not None:
                ch.notify(7)
                fired = {(1, 5): peer1_r, (2, 6): peer2_r}[remote]
                assert os.read(fired, 1) == b"\0", where
        finally:
            ch.close()
            server.join(TIMEOUT)
        for r in (peer1_r, peer2_r):
            assert _closed_by_all_but(r=r), where
        for w in (port_w, new_w):
            assert _closed_by_all_but(w=w), where
        close_fds([port_w, peer1_r, peer2_r, new_w])
        _no_descriptors_since(before, where)
        return where

    landed = landings(landing)
    assert len(landed) > 10, landed


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def test_a_notify_finding_its_peer_gone_interrupted_anywhere_closes_nothing_twice(
        tmp_path: Path) -> None:
    """A Ctrl-C landing anywhere in a notify() whose write finds the
    peer's pipe closed (the peer unbound, its news not here yet): the
    port's write end is closed once and forgotten.  One landing as its
    close returned left the closed number on the port, for close() to
    close again: by then the number of a file of someone else's (the
    test's, which holds every number notify() closed: see HeldNumbers)."""
    def landing(n: int) -> str:
        before = descriptors()
        path = str(tmp_path / f"hypervisor-{n}")
        port_r, port_w = os.pipe2(os.O_NONBLOCK)
        peer_r, peer_w = os.pipe()
        server, sent = _bind_answered_then(path, port_r, [
            ({"event": "bound", "port": 7, "domid": 1, "remote_port": 5}, peer_w)])
        ch = EventChannel(path)
        with numbers_held() as kept:
            try:
                assert ch.bind_unbound_port(1) == 7
                assert sent.wait(TIMEOUT)
                assert ch.remote(7) == (1, 5)  # the news taken: the port has the write end
                os.close(peer_r)  # the peer went: its read end with it
                with kept.closing():
                    where = interrupted_at(n, SIM_CODE, lambda: ch.notify(7),
                                           besides=SIM_ROUND_TRIP)
                held = ch._ports[7].peer_fd
                # Still the port's, it was never closed.
                held_open = held is None or _is_pipe(held)
                ch.notify(7)
            finally:
                ch.close()
                server.join(TIMEOUT)
            assert held_open, f"interrupted {where}: the port holds {held}, closed"
            kept.check(f"interrupted {where}: the handle closed a file not its own")
        close_fds([port_w])
        _no_descriptors_since(before, where)
        return where

    landed = landings(landing)
    assert any("_lost_peer" in where for where in landed), landed


@pytest.mark.parametrize(("op", "count", "port"), [
    ("bind_unbound_port", 0, 7), ("bind_unbound_port", 2, 7),
    ("bind_interdomain", 1, 7), ("bind_interdomain", 3, 7),
    ("bind_unbound_port", 1, None), ("bind_interdomain", 2, None),
])
def test_a_bind_reply_with_other_descriptors_than_the_port_needs_is_given_back(
        tmp_path: Path, op: str, count: int, port: int | None) -> None:
    """A service answering a bind with more or fewer descriptors than the
    port needs, or with no port number, breaks the protocol: the bind
    fails (EPROTO), every descriptor that came is closed and the port,
    if it has a number, is unbound at once, rather than listed with a
    descriptor lost or missing.  A reply without its port let apply's
    KeyError through, as if the handle had a bug."""
    path = str(tmp_path / "hypervisor")
    pipes = [os.pipe() for _ in range(count)]
    server, later = answering_once(path, {} if port is None else {"port": port},
                                   [w for _, w in pipes])
    ch = EventChannel(path)
    try:
        with pytest.raises(EventChannelError) as info:
            if op == "bind_unbound_port":
                ch.bind_unbound_port(1)
            else:
                ch.bind_interdomain(1, 5)
        assert info.value.errno == errno.EPROTO
        assert ch.ports() == []
        for r, _ in pipes:
            assert select.select([r], [], [], TIMEOUT)[0] == [r]
            assert os.read(r, 1) == b""  # no copy of its write end is left
        if port is not None:
            assert eventually(lambda: [(m["op"], m.get("port")) for m in later]
                              == [("evtchn_unbind", port)]), later
    finally:
        ch.close()
        for r, _ in pipes:
            os.close(r)
        server.join(TIMEOUT)


@pytest.mark.parametrize("port", [0, -1, xenback.platform.EVTCHN_PORT_MAX + 1, 1 << 70, True],
                         ids=["zero", "negative", "past-the-last", "huge", "bool"])
def test_a_bind_reply_naming_no_port_is_given_back(tmp_path: Path, port: object) -> None:
    """A port number no port has (as check_port() says) is the service's
    protocol error (EPROTO), given back as any malformed reply is: not a
    port listed that no call of the handle can name."""
    path = str(tmp_path / "hypervisor")
    r, w = os.pipe()
    server, later = answering_once(path, {"port": port}, [w])
    ch = EventChannel(path)
    try:
        with pytest.raises(EventChannelError) as info:
            ch.bind_unbound_port(1)
        assert info.value.errno == errno.EPROTO
        assert ch.ports() == []
        assert select.select([r], [], [], TIMEOUT)[0] == [r]
        assert os.read(r, 1) == b""
    finally:
        ch.close()
        os.close(r)
        server.join(TIMEOUT)


def test_descriptors_an_unbind_reply_carries_are_closed(tmp_path: Path) -> None:
    """An unbind's reply gives nothing: descriptors it carries all the
    same (the service's bug) are closed, not left open for the life of
    the process."""
    path = str(tmp_path / "hypervisor")
    (r1, w1), (r2, w2) = os.pipe(), os.pipe()

    def handle(conn: socket.socket) -> None:
        for w in (w1, w2):  # the bind's, then the unbind's
            request = json.loads(conn.recv(MAX_MESSAGE))
            send_message(conn, {"id": request["id"], "port": 7}, [w])
            os.close(w)
        while conn.recv(MAX_MESSAGE):
            pass

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    ch = EventChannel(path)
    try:
        assert ch.bind_unbound_port(1) == 7
        ch.unbind(7)
        assert ch.ports() == []
        assert select.select([r2], [], [], TIMEOUT)[0] == [r2]
        assert os.read(r2, 1) == b""  # no copy of its write end is left
    finally:
        ch.close()
        os.close(r1)
        os.close(r2)
        server.join(TIMEOUT)


def test_a_bind_reply_naming_a_port_the_handle_has_is_given_back(tmp_path: Path) -> None:
    """A second bind answered with the number of a port the handle holds
    (the service's bug) fails with EPROTO, and the first port stays the
    handle's, its descriptor open: listing the new one over it lost the
    first (its descriptors left open by close(), its peer never told)."""
    path = str(tmp_path / "hypervisor")
    pipes = [os.pipe() for _ in range(2)]
    later: list[dict[str, Any]] = []

    def handle(conn: socket.socket) -> None:
        for _, w in pipes:
            request = json.loads(conn.recv(MAX_MESSAGE))
            send_message(conn, {"id": request["id"], "port": 7}, [w])
            os.close(w)
        while data := conn.recv(MAX_MESSAGE):
            later.append(json.loads(data))

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    ch = EventChannel(path)
    try:
        assert ch.bind_unbound_port(1) == 7
        with pytest.raises(EventChannelError) as info:
            ch.bind_unbound_port(1)
        assert info.value.errno == errno.EPROTO
        assert ch.ports() == [7]
        (second_r, _), (first_r, _) = pipes[1], pipes[0]
        assert select.select([second_r], [], [], TIMEOUT)[0] == [second_r]
        assert os.read(second_r, 1) == b""  # the second reply's descriptor closed
        assert select.select([first_r], [], [], 0)[0] == []  # the first port's still open
    finally:
        ch.close()
        for r, _ in pipes:
            os.close(r)
        server.join(TIMEOUT)


def test_a_port_number_given_again_as_its_unbind_finishes_is_the_new_ports(
        tmp_path: Path) -> None:
    """The service frees an unbound port's number as it answers the
    unbind, and may give it to a bind of another thread before the
    unbind's caller took the old port off the table: the new port is
    listed (not refused as one the handle holds), and stays."""
    path = str(tmp_path / "hypervisor")
    pipes = [os.pipe() for _ in range(2)]
    read_ends = [r for r, _ in pipes]

    def handle(conn: socket.socket) -> None:
        answers = iter([{"port": 7}, {}, {"port": 7}])
        while data := conn.recv(MAX_MESSAGE):
            request = json.loads(data)
            reply = next(answers, {})
            fds = [pipes.pop(0)[1]] if "port" in reply else []
            send_message(conn, {"id": request["id"], **reply}, fds)
            close_fds(fds)

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    ch = EventChannel(path)
    bound_again = threading.Event()
    drop = ch._drop

    def late_drop(lp: Any) -> None:
        assert bound_again.wait(TIMEOUT)
        drop(lp)

    ch._drop = late_drop  # type: ignore[method-assign]
    try:
        assert ch.bind_unbound_port(1) == 7
        unbinding = threading.Thread(target=ch.unbind, args=(7,))
        unbinding.start()
        assert eventually(lambda: ch.ports() == [])  # the old port forgotten, not yet dropped
        assert ch.bind_unbound_port(1) == 7
        bound_again.set()
        unbinding.join(TIMEOUT)
        assert ch.ports() == [7]
    finally:
        bound_again.set()
        ch.close()
        close_fds(read_ends + [w for _, w in pipes])  # what the service did not send
        server.join(TIMEOUT)


def test_a_refused_bind_reply_cut_short_anywhere_is_given_back(
        host: SimHost, guest: Domain) -> None:
    """A Ctrl-C landing anywhere in a call whose apply refuses the reply
    (raises before it took the descriptors), the connection's release
    of it included: the port is unbound by the call or by the next one,
    also when the Ctrl-C landed between the descriptors' close and the
    unbind's send."""
    with host.dom0.evtchn() as e0:

        def refuse(reply: dict[str, object], fds: list[int]) -> None:
            raise EventChannelError(errno.EPROTO, "not this one")

        def refused() -> None:
            with pytest.raises(EventChannelError, match="not this one"):
                e0._conn.call("evtchn_alloc_unbound", apply=refuse, domid=guest.domid)

        def landing(n: int) -> str:
            ports = host.hypervisor.stats()["ports"]
            where = interrupted_at(n, SIM_CODE, refused)
            e0.unbind(e0.bind_unbound_port(guest.domid))  # the next call finishes
            assert eventually(lambda: host.hypervisor.stats()["ports"] == ports), (
                where, host.hypervisor.stats())
            return where

        every_landing(host, landing, more_than=5)


@pytest.mark.parametrize("bad, carried", [
    ({"event": "unbound", "port": 7}, "w"),
    ({"event": "unbound", "port": 7, "rfd": 0}, "rw"),
    ({"event": "unbound", "port": 7, "rfd": "0"}, "r"),
    ({"event": "unbound", "port": 7, "rfd": True}, "r"),
    ({"event": "bound", "port": 7, "domid": 2, "remote_port": 9, "rfd": 1}, "w"),
    ({"event": "bound", "port": 7, "domid": 2, "remote_port": 9, "rfd": 2}, "wr"),
    ({"event": "bound", "port": 7, "domid": 2, "remote_port": 9, "rfd": -1}, "wr"),
    ({"event": "bound", "port": 7, "domid": 2, "remote_port": 9, "rfd": True}, "wr"),
    ({"event": "bound", "port": 7, "domid": 2, "remote_port": 9}, "ww"),
    ({"event": "moved", "port": 7}, ""),
], ids=["unbound-with-a-write-end", "unbound-with-a-write-end-too", "rfd-not-int",
        "rfd-bool", "bound-rfd-one-past-the-end", "bound-rfd-past-the-end", "rfd-negative",
        "bound-rfd-bool-naming-one", "bound-with-two-write-ends",
        "unknown-event-carrying-nothing"])
def test_a_push_carrying_other_descriptors_than_its_events_is_logged_and_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: dict[str, Any],
        carried: str) -> None:
    """A push carries exactly its event's descriptors: a "bound" its
    peer's write end, an "unbound" none, either the port's new read end
    besides if, and only if, its "rfd" names it (an index into what it
    carries).  Anything else is the service breaking the protocol, as a
    "bound" short of its write end is: logged as malformed and dropped,
    every descriptor it carried closed, the port left as it was.  An
    "unbound" with write ends was taken, the extras silently closed, and
    an "rfd" naming nothing taken as no new read end (a test required it,
    to catch an off-by-one in the bound, which dropped the news as one the
    handle could not take: that bound is still caught, below, by the
    error being "malformed").  Silent, the service's bug went unseen."""
    path = str(tmp_path / "hypervisor")
    port_r, port_w = os.pipe()
    good_r, good_w = os.pipe()
    pipes = [os.pipe() for _ in carried]
    fds = tuple(w if kind == "w" else r for kind, (r, w) in zip(carried, pipes, strict=True))
    server, sent = _bind_answered_then(path, port_r, [
        ({"event": "bound", "port": 7, "domid": 1, "remote_port": 5}, good_w), (bad, fds)])
    ch = EventChannel(path)
    try:
        assert ch.bind_unbound_port(1) == 7
        assert sent.wait(TIMEOUT)
        assert "malformed" in _error_logged_by_the_drain(ch, caplog)
        for kind, (r, w) in zip(carried, pipes, strict=True):
            assert _closed_by_all_but(r=r) if kind == "w" else _closed_by_all_but(w=w)
        ch.notify(7)
        assert os.read(good_r, 1) == b"\x00"  # still the first peer's
        os.write(port_w, b"\0")
        assert wait_pending(ch) == 7  # and still its own pipe
    finally:
        ch.close()
        for fd in (port_w, good_r, *itertools.chain.from_iterable(pipes)):
            try:
                os.close(fd)
            except OSError:
                pass  # sent, and closed by the fake service
        server.join(TIMEOUT)


def test_a_port_freed_keeps_no_descriptor_number(host: SimHost, guest: Domain) -> None:
    """The service's write end of a freed port's pipe (and a new read end
    never sent) is closed, and the port keeps no number then: a second
    close (a bug) would else close whatever descriptor reused it."""
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        p0 = e0.bind_interdomain(guest.domid, e1.bind_unbound_port(0))
        with host.hypervisor._lock:
            mine = host.hypervisor._domains[0].ports[p0]
            peer = mine.remote
            assert peer is not None and mine.wfd >= 0
        e1.unbind(peer.port)  # the peer is freed, and mine given a new pipe
        assert eventually(lambda: e0.remote(p0) is None)
        with host.hypervisor._lock:
            assert peer.wfd == -1 and peer.fresh_r is None
            assert mine.fresh_r is not None or mine.wfd >= 0
        e0.unbind(p0)
        with host.hypervisor._lock:
            assert mine.wfd == -1 and mine.fresh_r is None


@pytest.mark.parametrize("port", [True, 1.0], ids=["bool", "float"])
def test_a_port_number_that_only_equals_an_int_is_refused(
    pair: tuple[EventChannel, int, EventChannel, int], port: object
) -> None:
    """True and 1.0 equal port 1 as dict keys, so notify() and unmask()
    took them for port 1 where the xen platform refuses them (EINVAL, no
    port: xenback.platform.check_port): a backend's slip passed its tests
    here and failed on Xen."""
    e0, p0, e1, p1 = pair
    assert p1 == 1  # the guest's first port: what True and 1.0 would hit
    for call in (e1.notify, e1.unmask, e1.unbind):
        with pytest.raises(EventChannelError, match=f"invalid event channel port {port!r}") as info:
            call(port)  # type: ignore[arg-type]
        assert info.value.errno == errno.EINVAL
    assert not readable(e0, 0.05) and e0.pending() is None  # nothing fired
    e1.notify(p1)  # the handle still works
    assert wait_pending(e0) == p0


def test_a_port_number_may_be_an_int_subclass(host: SimHost, guest: Domain) -> None:
    """An IntEnum is an int, and one to the xen platform (a uint32_t):
    notify() and unmask() refused it here, so a backend numbering its
    ports so failed its tests and worked on Xen."""
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        p1 = e1.bind_unbound_port(0)
        p0 = e0.bind_interdomain(guest.domid, enum.IntEnum("Guest", {"PORT": p1}).PORT)
        Port = enum.IntEnum("Port", {"DOM0": p0, "GUEST": p1})
        e1.notify(Port.GUEST)
        assert wait_pending(e0) == p0
        e0.unmask(Port.DOM0)
        e0.notify(Port.DOM0)
        assert wait_pending(e1) == p1
        e1.unmask(Port.GUEST)
        e0.unbind(Port.DOM0)
        assert wait_pending(e1) == p1  # its peer gone
        with pytest.raises(EventChannelError) as info:
            e0.notify(Port.DOM0)
        assert info.value.errno == errno.ENOTCONN  # unbound, not an invalid number


def test_a_bound_remote_port_is_kept_as_a_plain_int(host: SimHost, guest: Domain) -> None:
    """bind_interdomain() takes a domid and a port by the rule of ports
    (an IntEnum is the number it stands for), and keeps the numbers:
    remote() answered the caller's own IntEnum port until the service's
    news replaced it."""
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        p1 = e1.bind_unbound_port(0)
        Port = enum.IntEnum("Port", {"RING": p1})
        Dom = enum.IntEnum("Dom", {"GUEST": guest.domid})
        p0 = e0.bind_interdomain(Dom.GUEST, Port.RING)
        domid, port = e0.remote(p0)
        assert (domid, port) == (guest.domid, p1)
        assert (type(domid), type(port)) == (int, int)


@pytest.mark.parametrize("huge", [10**5000, -(10**5000)], ids=["1e5000", "-1e5000"])
def test_a_huge_port_is_einval_not_a_digit_limit_error(
        pair: tuple[EventChannel, int, EventChannel, int], huge: int) -> None:
    """{port!r} of a 5000-digit int raised Python's own ValueError of its
    4300-digit limit instead of the EINVAL the xen platform raises (its
    message shows such a number by its size, as here)."""
    e0, p0, _e1, _p1 = pair
    for call in (lambda: e0.bind_interdomain(1, huge), lambda: e0.notify(huge),
                 lambda: e0.unmask(huge), lambda: e0.unbind(huge), lambda: e0.remote(huge)):
        with pytest.raises(EventChannelError, match=r"an int of 16610 bits") as info:
            call()
        assert info.value.errno == errno.EINVAL
    e0.notify(p0)  # the handle still works
