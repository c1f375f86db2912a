"""The hypervisor service's own side (xenback.sim._hypervisor): what it
does out of descriptors, what it sends a handle and when, what it closes.

Running a real process out of descriptors is test_daemon.py's; here one
domain's listener fails its accept() with EMFILE on demand, which is what
the service sees then, and the rest of the host goes on as usual."""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hosthelpers import eventually, handle_census, released_since, service_caught_up, wait_pending
from racewindow import TIMEOUT

from xenback.sim import Domain, SimHost, _hypervisor
from xenback.sim._hypervisor import domain_socket


class ShortListener:
    """Stands for a domain's listener: its next ``failures`` accept()
    calls fail as they do when the process has no descriptor left."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failures = 0

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short(host: SimHost, guest: Domain) -> Iterator[ShortListener]:
    """The guest's listener, made to run short of descriptors at will."""
    hv = host.hypervisor
    with hv._lock:
        dom = hv._domains[guest.domid]
        listener = ShortListener(dom.listener)
        dom.listener = listener  # type: ignore[assignment]
    yield listener
    listener.failures = 0


def connect(host: SimHost, domid: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(TIMEOUT)
    sock.connect(os.fspath(domain_socket(host.run_dir, domid)))
    return sock


def received(sock: socket.socket) -> dict[str, Any]:
    data, fds, _, _ = socket.recv_fds(sock, 70000, 4)
    assert not fds
    return json.loads(data)


def refusal(sock: socket.socket) -> tuple[str, int]:
    """What the service tells a handle it refuses, asked nothing (a request
    it closed unread would make the first receive fail, ECONNRESET)."""
    said = received(sock)
    assert sock.recv(1) == b""  # and closed
    return said["event"], said["errno"]


def info(sock: socket.socket) -> dict[str, Any]:
    sock.send(b'{"op": "info", "id": 1}')
    return received(sock)


def test_a_handle_accepted_with_the_reserve_is_told_emfile_each_time(
    host: SimHost, guest: Domain, short: ShortListener
) -> None:
    """Each time accept() finds no descriptor, the service closes its spare
    one to take the handle off the backlog and tell it why, then opens the
    spare again for the next time: every such handle hears EMFILE at once."""
    for _ in range(3):
        short.failures = 1
        with connect(host, guest.domid) as sock:
            assert refusal(sock) == ("refused", errno.EMFILE)
    with connect(host, guest.domid) as sock:
        assert info(sock)["domid"] == guest.domid


def _pause(host: SimHost, guest: Domain, short: ShortListener,
           monkeypatch: pytest.MonkeyPatch, *, hold: bool = True) -> socket.socket:
    """Runs the guest's listener out of descriptors, the spare one too:
    the service stops watching it (for good if ``hold``, until _resume;
    else it retries as it would, and stops again, while short).  Returns
    the handle left waiting."""
    hv = host.hypervisor
    monkeypatch.setattr(_hypervisor, "_open_reserve", lambda: -1)
    with hv._lock:
        reserve, hv._reserve = hv._reserve, -1
        os.close(reserve)
        short.failures = 1 << 30
    sock = connect(host, guest.domid)
    sock.send(b'{"op": "info", "id": 1}')
    dom = hv._domains[guest.domid]

    def paused() -> bool:
        with hv._lock:
            if dom not in hv._accept_paused:
                return False
            if hold:
                hv._accept_retry_at = time.monotonic() + 3600
            return True

    assert eventually(paused, TIMEOUT), "the listener was never paused"
    return sock


def _resume(host: SimHost, short: ShortListener, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gives descriptors back and lets the service retry at once."""
    hv = host.hypervisor
    monkeypatch.undo()
    with hv._lock:
        short.failures = 0
        hv._accept_retry_at = 0.0
    os.write(hv._wake_w, b"x")


def test_a_handle_waiting_on_a_paused_listener_is_served_once_descriptors_return(
    host: SimHost, guest: Domain, short: ShortListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With not even the spare descriptor left, the listener is unwatched
    for a while (it would keep the loop spinning), then watched again: the
    handle waiting in its backlog is served, and the spare is back, so
    that the next shortage is told to its handle at once again."""
    with _pause(host, guest, short, monkeypatch) as waiting:
        _resume(host, short, monkeypatch)
        assert received(waiting)["domid"] == guest.domid
    assert host.hypervisor._reserve >= 0
    short.failures = 1
    with connect(host, guest.domid) as sock:
        assert refusal(sock) == ("refused", errno.EMFILE)


def test_a_paused_listener_is_retried_without_any_other_event(
    host: SimHost, guest: Domain, short: ShortListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing else happens on the host: the service wakes up by itself
    to retry the listener it stopped watching."""
    hv = host.hypervisor
    with _pause(host, guest, short, monkeypatch, hold=False) as waiting:
        with hv._lock:
            monkeypatch.undo()
            short.failures = 0
        assert received(waiting)["domid"] == guest.domid


def test_stats_and_destroy_while_a_listener_is_paused(
    host: SimHost, guest: Domain, short: ShortListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener the service does not watch for now is neither accepted
    from by stats() (it would fail again, and unwatch it twice) nor
    unwatched again when its domain goes, nor watched again after."""
    hv = host.hypervisor
    with _pause(host, guest, short, monkeypatch) as waiting:
        before = hv.stats()
        assert before["domains"] == 2
        host.destroy_domain(guest)
        assert hv._accept_paused == []
        _resume(host, short, monkeypatch)
        with pytest.raises(ConnectionResetError):  # closed with the domain, its request unread
            waiting.recv(1)
    after = hv.stats()
    assert (after["domains"], after["connections"]) == (1, before["connections"])
    with host.dom0.evtchn():  # the service still serves
        pass


def test_a_bug_serving_a_handle_drops_that_handle_only(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure that is no errno (a bug) while serving one handle is
    logged, and that handle closed (its state may be anything by then);
    the service goes on serving the others."""
    real = _hypervisor.recv_message
    failed = threading.Event()

    def buggy(sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int], bool]:
        packet = real(sock, flags)
        if not failed.is_set():
            failed.set()
            raise RuntimeError("a bug")
        return packet

    with connect(host, guest.domid) as doomed, connect(host, 0) as other:
        assert info(other)["domid"] == 0  # accepted before the bug is armed
        monkeypatch.setattr(_hypervisor, "recv_message", buggy)
        doomed.send(b'{"op": "info", "id": 1}')
        assert doomed.recv(1) == b""  # closed, not answered
        assert failed.is_set()
        assert info(other)["domid"] == 0
    assert "hypervisor: failure serving" in caplog.text


def test_descriptors_with_an_empty_packet_are_closed_with_the_handle(
    host: SimHost, guest: Domain
) -> None:
    """An empty packet reads as the end of the connection; descriptors it
    carried are the service's all the same, and closed, not kept."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with connect(host, guest.domid) as sock:
            socket.send_fds(sock, [b""], [w])
            os.close(w)
            w = -1
            assert sock.recv(1) == b""  # the service took it for the end
        assert os.read(r, 1) == b""  # and no write end is left open anywhere
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_default_socket_timeout_in_the_process_does_not_make_the_service_wait(
    host: SimHost, guest: Domain, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever socket.setdefaulttimeout() the process hosting the service
    set (its sockets are made with it), a handle that reads no replies
    is dropped once its socket is full, not waited for: Python waits for
    room before sending on a socket with a timeout, MSG_DONTWAIT or not,
    and would hold up every other domain meanwhile."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(3600)
    try:
        hostile = connect(host, guest.domid)  # accepted under that default
        assert info(hostile)["domid"] == guest.domid
    finally:
        socket.setdefaulttimeout(previous)
    with hostile, connect(host, 0) as other:
        with pytest.raises(OSError) as dropped:
            for _ in range(1 << 20):
                hostile.send(b'{"op": "info"}')
        assert isinstance(dropped.value, (BrokenPipeError, ConnectionResetError)), dropped.value
        assert info(other)["domid"] == 0
    # A handle that takes no messages is worth a warning (one gone is not).
    assert [r.levelname for r in caplog.records
            if "dropping a handle of domain" in r.getMessage()] == ["WARNING"]


@pytest.mark.parametrize("bug", [OSError(errno.ENOSPC, "No space left on device"),
                                 RuntimeError("a bug")])
def test_a_request_failing_of_a_bug_is_answered_eio_and_its_descriptors_closed(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, bug: Exception,
) -> None:
    """A failure that is none of the request's doing (not out of
    descriptors either) is the service's: logged, and answered EIO, not
    with its own errno, which would blame the request; the handle stays."""

    def failing(*args: object) -> None:
        raise bug

    monkeypatch.setitem(_hypervisor.Hypervisor._ops, "info", failing)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with connect(host, guest.domid) as sock:
            socket.send_fds(sock, [b'{"op": "info", "id": 7}'], [w])
            os.close(w)
            w = -1
            assert received(sock) == {"errno": errno.EIO, "error": "internal error", "id": 7}
            assert os.read(r, 1) == b""  # the service kept no write end
            sock.send(b'{"op": "evtchn_unbind", "port": 1, "id": 8}')
            assert received(sock)["errno"] == errno.EINVAL  # served still
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert "hypervisor: request 'info' from domain 1 failed" in caplog.text


def _room_switch(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event that, while set, makes every handle's socket have no room
    for news (as a handle that reads nothing), so the service holds it."""
    full = threading.Event()
    real = _hypervisor._has_room
    monkeypatch.setattr(_hypervisor, "_has_room", lambda sock: not full.is_set() and real(sock))
    return full


def test_news_held_back_for_a_port_unbound_since_is_not_told_of_its_successor(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """News waiting for room in a handle's socket is of a port object: if
    the handle unbinds that port and binds another that gets its number,
    the old news (unbound) must not go out as the new port's."""
    full = _room_switch(monkeypatch)
    before = handle_census(host)
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        p1 = e1.bind_unbound_port(0)
        p0 = e0.bind_interdomain(guest.domid, p1)
        assert eventually(lambda: e1.remote(p1) == (0, p0))
        full.set()
        e0.unbind(p0)  # news for e1's p1, held back
        e1.unbind(p1)
        q0 = e0.bind_unbound_port(guest.domid)
        assert e1.bind_interdomain(0, q0) == p1  # the number again
        full.clear()
        e1.bind_unbound_port(0)  # after any news (sent first: see _dispatch)
        assert e1.remote(p1) == (0, q0)
        assert eventually(lambda: e0.remote(q0) == (guest.domid, p1))
        e0.notify(q0)
        assert wait_pending(e1) == p1
        # All told: no socket is watched for room any more (it would be
        # reported writable round after round, the service spinning).
        hv = host.hypervisor
        with hv._lock:
            assert not [k for k in hv._selector.get_map().values()
                        if k.events & selectors.EVENT_WRITE]
    released_since(host, before, "the test")


def test_a_handle_closed_with_its_domain_in_the_round_its_event_came_is_left_alone(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The service takes a round's events, then removes the domains asked
    for, then serves the events: one for a handle closed with its domain
    by then is skipped, not served on a closed socket (a bug, logged)."""
    hv = host.hypervisor
    full = _room_switch(monkeypatch)
    select = hv._selector.select
    paused, resume = threading.Event(), threading.Event()

    def stalled_select(timeout: float | None = None) -> list[Any]:
        paused.set()
        assert resume.wait(TIMEOUT)
        return select(timeout)

    e0 = host.dom0.evtchn()
    e1 = guest.evtchn()
    destroyer = threading.Thread(target=host.destroy_domain, args=(guest,))
    try:
        p0 = e0.bind_interdomain(guest.domid, e1.bind_unbound_port(0))
        full.set()
        e0.unbind(p0)  # e1's handle is watched for room now: an event each round
        hv._selector.select = stalled_select  # type: ignore[method-assign]
        os.write(hv._wake_w, b"x")
        assert paused.wait(TIMEOUT)
        destroyer.start()
        assert eventually(lambda: bool(hv._removals), TIMEOUT)
    finally:
        hv._selector.select = select  # type: ignore[method-assign]
        resume.set()
        destroyer.join(TIMEOUT)
        full.clear()
        e1.close()
        e0.close()
    assert not destroyer.is_alive()
    # The removal let destroy_domain() return before the round served its
    # events: a round trip begun now is answered only after them.
    service_caught_up(host.dom0)
    assert "failure serving" not in caplog.text


def test_a_port_bound_again_before_its_unbound_news_went_gets_its_new_pipe_with_the_bound(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The peer unbinds (the port gets a new pipe) and binds again while
    the news waits for room: the one news sent is "bound", carrying both
    the new peer's write end and the port's new read end, each where the
    message says, and the port fires on the new pipe."""
    full = _room_switch(monkeypatch)
    before = handle_census(host)
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        p1 = e1.bind_unbound_port(0)
        p0 = e0.bind_interdomain(guest.domid, p1)
        assert eventually(lambda: e1.remote(p1) == (0, p0))
        full.set()
        e0.unbind(p0)
        spare = e1.bind_unbound_port(0)  # a round trip: no news came with it
        e1.unbind(spare)
        assert e1.remote(p1) == (0, p0)
        q0 = e0.bind_interdomain(guest.domid, p1)
        full.clear()
        e1.bind_unbound_port(0)  # after the news (sent first: see _dispatch)
        assert e1.remote(p1) == (0, q0)
        e0.notify(q0)
        assert wait_pending(e1) == p1
        e1.unmask(p1)
        e1.notify(p1)
        assert wait_pending(e0) == q0
    assert "malformed" not in caplog.text
    released_since(host, before, "the test")


def test_a_bind_failing_as_its_own_port_is_made_keeps_nothing(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors as the binder's side is being made (its peer's
    write end of the new port's pipe): the bind fails EMFILE, and the new
    port, its pipe and the write end made for the other side are all
    given back; the port offered stays offered."""
    real = _hypervisor._writer
    calls: list[int] = []

    def writer(port: Any) -> int | None:
        calls.append(port.port)
        if len(calls) == 2:  # the remote's end came first; then the binder's
            raise OSError(errno.EMFILE, "Too many open files")
        return real(port)

    with host.dom0.evtchn() as e0:
        offered = e0.bind_unbound_port(guest.domid)
        before = handle_census(host)
        monkeypatch.setattr(_hypervisor, "_writer", writer)
        with connect(host, guest.domid) as sock:
            sock.send(json.dumps({"op": "evtchn_bind_interdomain", "domid": 0,
                                  "port": offered, "id": 1}).encode())
            assert received(sock)["errno"] == errno.EMFILE
            # Not even left to the handle (whose close would free it).
            assert host.hypervisor.stats()["ports"] == before[0]["ports"]
        assert len(calls) == 2
        monkeypatch.undo()
        released_since(host, before, "a bind that failed")
        with guest.evtchn() as e1:
            p1 = e1.bind_interdomain(0, offered)
            assert eventually(lambda: e0.remote(offered) == (guest.domid, p1))


def test_an_id_that_is_no_integer_is_not_echoed(host: SimHost, guest: Domain) -> None:
    """A reply carries back its request's id only if it is an integer, as
    the handles number theirs: JSON's true is none, though Python's True
    == 1 would answer request 1."""
    with connect(host, guest.domid) as sock:
        sock.send(b'{"op": "info", "id": true}')
        assert "id" not in received(sock)


class _FailingOs:
    """The os module as _hypervisor sees it, whose ``n``-th call of
    ``name`` from now fails for want of a descriptor."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def __getattr__(self, name: str) -> Any:
        call = getattr(os, name)
        if name != self.name:
            return call

        def failing(*args: Any, **kwargs: Any) -> Any:
            self.n -= 1
            if self.n == 0:
                raise OSError(errno.EMFILE, "Too many open files")
            return call(*args, **kwargs)

        return failing


def test_a_map_failing_halfway_through_its_descriptors_keeps_none(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of two shares make two descriptors in a map's reply; out of
    descriptors at the second, the map fails EMFILE and the first is
    closed, not kept, nor anything counted as mapped."""
    from xenback.platform import GrantError

    with guest.gntshr() as shr, host.dom0.gnttab() as tab:
        one, two = shr.share_pages(0, 1), shr.share_pages(0, 1)
        before = handle_census(host)
        monkeypatch.setattr(_hypervisor, "os", _FailingOs("dup", 2))
        with pytest.raises(GrantError) as info:
            tab.map_grant_refs(guest.domid, [*one.refs, *two.refs])
        assert info.value.errno == errno.EMFILE
        monkeypatch.undo()
        released_since(host, before, "a map that failed")
        with tab.map_grant_refs(guest.domid, [*one.refs, *two.refs]):
            pass


def test_a_bug_removing_a_domain_is_raised_to_the_caller(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The service thread removes the domain; a bug it meets doing so is
    logged there and raised to the caller waiting, not taken for done."""
    hv = host.hypervisor

    def failing(domid: int) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(hv, "_remove_domain", failing)
    with pytest.raises(RuntimeError, match="^a bug$"):
        hv.remove_domain(guest.domid)
    monkeypatch.undo()
    assert f"hypervisor: failure removing domain {guest.domid}" in caplog.text
    with connect(host, 0) as sock:  # still serving
        assert info(sock)["domid"] == 0


def test_a_late_reply_a_handle_cannot_take_closes_it_at_once(
    host: SimHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A domain control request is answered later, from another thread;
    if its handle cannot take the reply, the handle is closed there and
    then, not left open until some other event wakes the service."""
    hv = host.hypervisor
    replies: list[Any] = []
    asked = threading.Event()

    def control(op: str, args: dict[str, Any], reply: Any) -> None:
        replies.append(reply)  # answered from the test's thread, not here (under the lock)
        asked.set()

    def full(*args: object) -> None:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    previous = hv._control
    hv.set_control(control)
    try:
        before = hv.stats()["connections"]
        with connect(host, 0) as sock:
            sock.send(b'{"op": "domain_create", "name": "late", "id": 3}')
            assert asked.wait(TIMEOUT)
            assert hv.stats()["connections"] == before + 1
            monkeypatch.setattr(_hypervisor, "send_message", full)
            replies[0]({"domid": 99})
            monkeypatch.undo()
            assert hv.stats()["connections"] == before
            assert sock.recv(1) == b""
    finally:
        hv.set_control(previous)


def test_a_bind_out_of_descriptors_says_so(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No descriptor left for the write end of the offered port's pipe:
    EMFILE, as for any request the service is short for, not EINVAL (the
    offered port is fine, its owner is not going away)."""
    with host.dom0.evtchn() as e0:
        offered = e0.bind_unbound_port(guest.domid)
        monkeypatch.setattr(_hypervisor, "os", _FailingOs("open", 1))
        with connect(host, guest.domid) as sock:
            sock.send(json.dumps({"op": "evtchn_bind_interdomain", "domid": 0,
                                  "port": offered, "id": 1}).encode())
            assert received(sock)["errno"] == errno.EMFILE
        monkeypatch.undo()
        with guest.evtchn() as e1:
            p1 = e1.bind_interdomain(0, offered)
            assert eventually(lambda: e0.remote(offered) == (guest.domid, p1))


def test_a_new_pipe_never_sent_is_closed_when_a_newer_one_replaces_it(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer goes twice while the port's news waits for room: each time
    the port gets a new pipe; the read end of the first, never sent, is
    closed as the second replaces it, and the port fires on the last."""
    full = _room_switch(monkeypatch)
    before = handle_census(host)
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:
        p1 = e1.bind_unbound_port(0)
        p0 = e0.bind_interdomain(guest.domid, p1)
        assert eventually(lambda: e1.remote(p1) == (0, p0))
        full.set()
        e0.unbind(p0)
        e0.unbind(e0.bind_interdomain(guest.domid, p1))
        q0 = e0.bind_interdomain(guest.domid, p1)
        full.clear()
        e1.bind_unbound_port(0)  # after the news (sent first: see _dispatch)
        assert e1.remote(p1) == (0, q0)
        e0.notify(q0)
        assert wait_pending(e1) == p1
    released_since(host, before, "the test")


def test_a_late_reply_carries_its_request_id(host: SimHost) -> None:
    """A domain control request answered later, from another thread, is
    answered with its own id, as any other: the handle may have other
    requests in flight by then (see _proto.py)."""
    with connect(host, 0) as sock:
        sock.send(b'{"op": "domain_destroy", "domid": 999, "id": 5}')
        reply = received(sock)
    assert (reply["errno"], reply["id"]) == (errno.ESRCH, 5)


def test_a_handle_dropped_while_its_domain_goes_is_closed_once(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Closing one handle of a dying domain tells its peer, another handle
    of the domain, which cannot take the news and is dropped (to be closed
    later), then closed with its domain: the later close finds it closed."""
    a, b = guest.evtchn(), guest.evtchn()
    try:
        b.bind_interdomain(guest.domid, a.bind_unbound_port(guest.domid))

        def full(*args: object) -> None:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

        monkeypatch.setattr(_hypervisor, "send_message", full)
        host.destroy_domain(guest)
        monkeypatch.undo()
    finally:
        a.close()
        b.close()
    assert "failure" not in caplog.text
    assert host.hypervisor.stats()["domains"] == 1


def test_a_domain_added_where_a_killed_host_left_its_socket_takes_the_path(
        short_tmp: Path) -> None:
    """A hypervisor run without a SimHost (which clears a killed host's
    sockets as it starts) finds the socket file of a domain of a host that
    was killed at the path of the domain it adds: the file is removed, and
    the path leads to the new listener.  Left there, bind() refused the
    domain (EADDRINUSE) for as long as the file stayed."""
    path = domain_socket(short_tmp, 3)
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as killed:
        killed.bind(os.fspath(path))  # closed unremoved, as by a kill
    hv = _hypervisor.Hypervisor(short_tmp)
    hv.start()
    try:
        assert hv.add_domain(3, "guest") == path
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(os.fspath(path))  # ECONNREFUSED at a dead socket's file
            sock.send(b'{"op": "info", "id": 1}')
            assert received(sock)["domid"] == 3
    finally:
        hv.stop()
    assert not path.exists()
