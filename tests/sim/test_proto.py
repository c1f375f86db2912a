"""The wire between domains and the hypervisor service (xenback.sim._proto),
from a handle's side: its limits, and what it does with descriptors that
come with a reply it refuses."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import json
import logging
import os
import resource
import select
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fdcensus import numbers_held
from hosthelpers import SIM_CODE, descriptors, eventually, every_landing, serve_one_client
from racewindow import TIMEOUT
from stolensignal import OUTLASTS_THE_TEST, Interrupted, interrupted_as_call_returns, interrupted_at

from xenback.platform import PAGE_SIZE, EventChannelError, PlatformError
from xenback.sim import Domain, SimHost
from xenback.sim._proto import (
    MAX_MESSAGE,
    ServiceConnection,
    close_fds,
    close_taken,
    decode,
    encode,
    raise_nofile_limit,
    recv_message,
    send_message,
)


def test_a_message_may_fill_max_message_and_no_more() -> None:
    assert MAX_MESSAGE == 64 * 1024
    padding = MAX_MESSAGE - len(encode({"k": ""}))
    assert len(encode({"k": "x" * padding})) == MAX_MESSAGE
    with pytest.raises(ValueError, match=f"^message of {MAX_MESSAGE + 1} bytes exceeds"):
        encode({"k": "x" * (padding + 1)})


def test_received_descriptors_are_close_on_exec() -> None:
    # Guest memory and event channel pipes must not leak into a backend's
    # child processes.
    r, w = os.pipe()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        send_message(a, {"op": "info"}, [w])
        data, fds, truncated = recv_message(b)
    os.close(r)
    os.close(w)
    try:
        assert (data, truncated, len(fds)) == (b'{"op":"info"}', False, 1)
        assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        for fd in fds:
            os.close(fd)


def test_a_packet_one_byte_too_long_is_truncated() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.send(b" " * MAX_MESSAGE)
        assert recv_message(b)[2] is False
        a.send(b" " * (MAX_MESSAGE + 1))
        assert recv_message(b)[2] is True


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """``service(answer)``: a socket path whose one connection
    ``answer(conn)`` serves (after reading one request), then keeps open
    until the client hangs up."""
    threads: list[threading.Thread] = []

    def start(answer: Callable[[socket.socket], None]) -> str:
        path = str(tmp_path / "hypervisor")

        def handle(conn: socket.socket) -> None:
            conn.recv(MAX_MESSAGE)
            answer(conn)
            while conn.recv(MAX_MESSAGE):
                pass

        threads.append(serve_one_client(path, handle, socket.SOCK_SEQPACKET))
        return path

    yield start
    for thread in threads:
        thread.join(TIMEOUT)


def _with_pipe(
    send: Callable[[socket.socket, int], None],
) -> tuple[Callable[[socket.socket], None], int]:
    """An answer that sends the write end of a new pipe; the read end,
    which reads EOF once every copy of the write end is closed."""
    r, w = os.pipe()

    def answer(conn: socket.socket) -> None:
        try:
            send(conn, w)
        finally:
            os.close(w)

    return answer, r


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        # An error carries no descriptors: any that come are closed.
        (lambda conn, fd: send_message(conn, {"errno": errno.EINVAL, "error": "no"}, [fd]),
         errno.EINVAL),
        # An oversized reply is refused as a protocol error.
        (lambda conn, fd: socket.send_fds(conn, [b" " * (MAX_MESSAGE + 1)], [fd]), errno.EPROTO),
        # So is one that is not a message (no JSON object).
        (lambda conn, fd: socket.send_fds(conn, [b"{not json"], [fd]), errno.EPROTO),
        # A pushed event nobody listens for, then the error: both closed.
        (lambda conn, fd: (send_message(conn, {"event": "bound", "port": 1}, [fd]),
                           send_message(conn, {"errno": errno.EIO, "error": "no"})), errno.EIO),
    ],
    ids=["error", "oversized", "malformed", "unexpected-push"],
)
def test_a_handle_closes_the_descriptors_of_what_it_refuses(
    service: Callable[[Callable[[socket.socket], None]], str],
    reply: Callable[[socket.socket, int], None],
    error: int,
) -> None:
    answer, r = _with_pipe(reply)
    conn = ServiceConnection(service(answer), PlatformError)
    try:
        with pytest.raises(PlatformError) as info:
            conn.call("info")
        assert info.value.errno == error
        # No copy of the write end is left open: EOF.
        assert select.select([r], [], [], TIMEOUT)[0] == [r]
        assert os.read(r, 1) == b""
    finally:
        conn.close()
        os.close(r)


@pytest.mark.parametrize("code", ["EIO", None, True, 0, -5, 5.0, [5], 1 << 70],
                         ids=["str", "null", "bool", "zero", "negative", "float", "list", "huge"])
@pytest.mark.parametrize("kind", ["reply", "refusal"])
def test_an_errno_that_is_no_errno_is_a_protocol_error(
    service: Callable[[Callable[[socket.socket], None]], str], kind: str, code: object,
) -> None:
    """A reply or a refusal whose errno is no positive int fails the call
    with EPROTO, naming it, as any malformed message does; int() let a
    ValueError or TypeError out of call(), or made an OSError of errno 0."""
    message: dict[str, object] = {"errno": code, "error": "no"}
    if kind == "refusal":
        message["event"] = "refused"
    answer, r = _with_pipe(lambda conn, fd: send_message(conn, message, [fd]))
    conn = ServiceConnection(service(answer), PlatformError)
    try:
        with pytest.raises(PlatformError) as info:
            conn.call("info")
        assert info.value.errno == errno.EPROTO, info.value
        assert "errno" in str(info.value), info.value
        # Its descriptors are closed all the same.
        assert select.select([r], [], [], TIMEOUT)[0] == [r]
        assert os.read(r, 1) == b""
    finally:
        conn.close()
        os.close(r)


def test_close_wakes_a_call_waiting_for_its_reply(
    service: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    """A service that never answers: close() from another thread ends the
    wait at once (ENODEV) instead of queueing behind it."""
    asked = threading.Event()
    conn = ServiceConnection(service(lambda _conn: asked.set()), PlatformError)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            conn.call("info")
        except BaseException as e:
            outcome.append(e)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    assert asked.wait(TIMEOUT)
    closer = threading.Thread(target=conn.close, daemon=True)
    closer.start()
    closer.join(TIMEOUT)
    caller.join(TIMEOUT)
    assert not closer.is_alive(), "close() waits behind the call"
    (error,) = outcome
    assert isinstance(error, PlatformError) and error.errno == errno.ENODEV, error


def test_drain_delivers_what_came_and_says_whether_the_service_is_there(
    service: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    """drain() hands on the pushed messages that have arrived and returns
    at once: True while the service is there (with nothing left to read,
    too), False once it has hung up."""
    hang_up = threading.Event()

    def answer(conn: socket.socket) -> None:
        send_message(conn, {"ok": 1})  # the reply
        send_message(conn, {"event": "bound", "port": 1})  # pushed after it
        assert hang_up.wait(TIMEOUT)
        conn.shutdown(socket.SHUT_RDWR)

    pushed: list[dict[str, object]] = []
    conn = ServiceConnection(service(answer), PlatformError, lambda msg, fds: pushed.append(msg))
    try:
        assert conn.call("info") == ({"ok": 1}, [])
        assert select.select([conn], [], [], TIMEOUT)[0] == [conn]  # the push came
        assert conn.drain() is True
        assert pushed == [{"event": "bound", "port": 1}]
        assert conn.drain() is True  # nothing waiting: still there
        hang_up.set()
        assert select.select([conn], [], [], TIMEOUT)[0] == [conn]  # the hang-up came
        assert conn.drain() is False
        assert pushed == [{"event": "bound", "port": 1}]
    finally:
        hang_up.set()
        conn.close()


_REFUSAL = {"event": "refused", "errno": errno.EMFILE,
            "error": "the hypervisor service is out of descriptors"}


def _refuse(*, after_request: bool) -> Callable[[socket.socket], None]:
    """A service out of descriptors: it accepts a connection only to say
    so and close it, before its client's request arrives or with the
    request left unread."""

    def handle(conn: socket.socket) -> None:
        if after_request:
            select.select([conn], [], [], TIMEOUT)
        send_message(conn, _REFUSAL)

    return handle


@pytest.mark.parametrize("after_request", [False, True], ids=["before", "after"])
def test_a_refused_connection_says_why_whenever_its_request_went(
        tmp_path: Path, after_request: bool) -> None:
    """Closed with the request unread, the client's receive fails
    (ECONNRESET) before it reads the refusal; closed before the request,
    the send fails (EPIPE).  Either way it is the refusal's errno, not
    ENODEV (a host gone)."""
    path = str(tmp_path / "hypervisor")
    server = serve_one_client(path, _refuse(after_request=after_request), socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, PlatformError)
    try:
        if not after_request:
            server.join(TIMEOUT)  # refused and closed
        with pytest.raises(PlatformError) as info:
            conn.call("info")
        assert (info.value.errno, info.value.strerror) == (errno.EMFILE, _REFUSAL["error"])
        with pytest.raises(PlatformError) as info:  # and so on, every time
            conn.call("info")
        assert info.value.errno == errno.EMFILE
    finally:
        conn.close()
        server.join(TIMEOUT)


def test_a_refused_connection_that_only_drains_is_gone_and_says_why(tmp_path: Path) -> None:
    path = str(tmp_path / "hypervisor")
    pushed: list[dict[str, object]] = []
    server = serve_one_client(path, _refuse(after_request=False), socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, PlatformError, lambda msg, _fds: pushed.append(msg))
    try:
        server.join(TIMEOUT)
        assert not conn.drain()
        assert pushed == []  # not a message for the handle
        with pytest.raises(PlatformError) as info:
            conn.call("info")
        assert info.value.errno == errno.EMFILE
    finally:
        conn.close()


@pytest.mark.parametrize("cut", [
    "gnt_map", "gnt_share", "evtchn_alloc_unbound", "evtchn_bind_interdomain", "gnt_unmap"])
def test_a_call_cut_short_before_its_reply_leaves_the_reply_to_nobody(
        host: SimHost, guest: Domain, cut: str) -> None:
    """A Ctrl-C as a request has gone, before its reply is taken: the
    reply stays in the socket.  The next call took it for its own (an
    unmap took a map's reply, the unmap's own went to the call after, a
    map, which found no handle in it), and what it gave (a mapping, a
    share, a port, descriptors) stayed with nobody until the handle
    closed.  Now each call takes its own reply, and what an abandoned one
    gave is given back at once."""
    with guest.gntshr() as shr, host.dom0.gnttab() as tab, \
            host.dom0.evtchn() as e0, guest.evtchn() as e1:
        pages = shr.share_pages(0, 1)
        mapping = tab.map_grant_refs(guest.domid, pages.refs)
        p1 = e1.bind_unbound_port(0)
        stats, fds = host.hypervisor.stats(), descriptors()
        calls: dict[str, tuple[ServiceConnection, Callable[[], object]]] = {
            "gnt_map": (tab._conn, lambda: tab.map_grant_refs(guest.domid, pages.refs)),
            "gnt_share": (shr._conn, lambda: shr.share_pages(0, 1)),
            "evtchn_alloc_unbound": (e0._conn, lambda: e0.bind_unbound_port(guest.domid)),
            "evtchn_bind_interdomain": (e0._conn, lambda: e0.bind_interdomain(guest.domid, p1)),
            "gnt_unmap": (tab._conn, mapping.unmap),
        }
        conn, call = calls[cut]
        # As the request's send returns, in the call waiting for its reply.
        assert interrupted_as_call_returns(ServiceConnection._call.__code__, 0, call)
        # The next calls of the same connection get their own replies.
        if conn is tab._conn:
            mapping.unmap()  # again, if it was the one cut short
            with tab.map_grant_refs(guest.domid, pages.refs) as again:
                assert len(again.buffer) == PAGE_SIZE
        elif conn is shr._conn:
            with shr.share_pages(0, 2) as other:
                assert len(other.refs) == 2
        else:
            port = e0.bind_unbound_port(guest.domid)
            assert e0.ports() == [port]
            e0.unbind(port)
        mapping.unmap()
        pages.unshare()
        # Nothing the cut call got is held: no port, mapping or share in
        # the service (the pages' grant is gone), no descriptor here.
        after = host.hypervisor.stats()
        assert (after["ports"], after["grants"]) == (stats["ports"], stats["grants"] - 1)
        # The guest's port was connected to the abandoned one: unbound
        # again, it reads a new pipe (the service's, see _hypervisor.py).
        assert e1.remote(p1) is None
        # That pipe's ends aside (the guest's and the service's), none is
        # new: a count would let another thread's close hide a leak.
        renewed = os.readlink(f"/proc/self/fd/{e1._ports[p1].rfd}")

        def new() -> list[tuple[int, str]]:
            return sorted(d for d in descriptors() - fds if d[1] != renewed)

        assert eventually(lambda: not new()), new()


# Every file of the simulated host but _proto.py: a sweep of the round
# trip's own frames (stolensignal.interrupted_at).
_BESIDES_PROTO = tuple(os.path.join(SIM_CODE, name) for name in os.listdir(SIM_CODE)
                       if name != "_proto.py")


_ROUND_TRIP = {ServiceConnection.call.__code__, ServiceConnection.close.__code__,
               ServiceConnection.drain.__code__}


def _outside_the_round_trip() -> bool:
    """Whether a landing is in a helper of _proto.py's that a handle calls
    itself (close_fds(), on the reply it got), not within a call to the
    service: there it is the handle's, as one after an ioctl returned."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _ROUND_TRIP:
            return False
        frame = frame.f_back  # type: ignore[assignment]
    return True


class _Handles:
    """A guest's share handle and event channel handle, and dom0's grant
    table and event channel handle, each one connection kept open across a
    sweep: a reply a Ctrl-C left behind meets the calls that follow."""

    def __init__(self, host: SimHost, guest: Domain) -> None:
        self.guest = guest
        self.shr, self.tab = guest.gntshr(), host.dom0.gnttab()
        self.e0, self.e1 = host.dom0.evtchn(), guest.evtchn()

    def close(self) -> None:
        for handle in (self.shr, self.tab, self.e0, self.e1):
            handle.close()

    def unbind_all(self) -> None:
        """Unbind dom0's ports: one a bind got before a Ctrl-C landed after
        the handle took it (``apply``) is the handle's, listed by ports()."""
        for port in self.e0.ports():
            self.e0.unbind(port)

    def round(self, op: str) -> tuple[Callable[[], object], Callable[[list[object]], None]]:
        """The call to interrupt, and what undoes it and checks that the
        connection still answers each call with its own reply."""
        h, domid = self, self.guest.domid
        if op in ("gnt_map", "gnt_unmap"):
            pages = h.shr.share_pages(0, 1)
            mapped = h.tab.map_grant_refs(domid, pages.refs) if op == "gnt_unmap" else None

            def after(made: list[object]) -> None:
                # Those apply took are the handle's, returned or not.
                for mapping in [*made, *h.tab._live.values()]:
                    mapping.unmap()  # type: ignore[attr-defined]
                if mapped is not None:
                    mapped.unmap()  # again, if it was the one cut short
                with h.tab.map_grant_refs(domid, pages.refs) as again:
                    assert len(again.buffer) == PAGE_SIZE
                pages.unshare()  # its grant goes once no mapping holds it

            if mapped is None:
                return lambda: h.tab.map_grant_refs(domid, pages.refs), after
            return mapped.unmap, after
        if op == "gnt_share":
            def after_share(made: list[object]) -> None:
                for shared in [*made, *h.shr._live.values()]:
                    shared.unshare()  # type: ignore[attr-defined]
                with h.shr.share_pages(0, 2) as other:
                    assert len(other.refs) == 2

            return lambda: h.shr.share_pages(0, 1), after_share
        p1 = h.e1.bind_unbound_port(0)

        def after_bind(made: list[object]) -> None:
            h.unbind_all()
            port = h.e0.bind_unbound_port(domid)
            assert h.e0.ports() == [port]
            h.e0.unbind(port)
            h.e1.unbind(p1)

        if op == "evtchn_alloc_unbound":
            return lambda: h.e0.bind_unbound_port(domid), after_bind
        if op == "evtchn_bind_interdomain":
            return lambda: h.e0.bind_interdomain(domid, p1), after_bind
        assert op == "evtchn_unbind"
        p0 = h.e0.bind_interdomain(domid, p1)

        def unbind() -> None:
            h.e0.unbind(p0)

        def after_unbind(made: list[object]) -> None:
            try:
                h.e0.unbind(p0)  # finishes one cut short
            except EventChannelError as e:
                assert e.errno == errno.ENOTCONN, e
            assert eventually(lambda: h.e1.remote(p1) is None)
            after_bind(made)

        return unbind, after_unbind


@pytest.mark.timeout(600)
@pytest.mark.parametrize("op", ["gnt_map", "gnt_share", "evtchn_alloc_unbound",
                                "evtchn_bind_interdomain", "gnt_unmap", "evtchn_unbind"])
def test_a_call_interrupted_anywhere_in_its_round_trip_leaves_nothing(
        host: SimHost, guest: Domain, op: str) -> None:
    """A Ctrl-C landing anywhere in the round trip's own frames: between
    the receive and the hand-over of a reply, or in the release of an
    abandoned one.  Nothing the call got is left to nobody (no port or
    grant at the service that the handle does not list, no descriptor
    here), nothing is released twice, and the calls that follow on the
    same connection get their own replies.  A landing after the reply left
    the socket and before call() returned lost it: its descriptors stayed
    open, and what it gave stayed until the handle closed."""
    handles = _Handles(host, guest)

    def landing(n: int) -> str:
        call, after = handles.round(op)
        made: list[object] = []
        with numbers_held() as kept:
            with kept.closing():
                where = interrupted_at(n, SIM_CODE, lambda: made.append(call()),
                                       unless=_outside_the_round_trip, besides=_BESIDES_PROTO)
            after([m for m in made if m is not None])
            kept.check(where)
        return where

    try:
        every_landing(host, landing, more_than=5)
    finally:
        handles.close()


def test_a_map_interrupted_anywhere_in_its_round_trip_is_released_by_close(
        host: SimHost, guest: Domain) -> None:
    """The same sweep, with the handle closed instead of called again: a
    reply left on its way out of call(), or in the inbox, has its
    descriptors closed with the connection (the service releases what it
    gave as it sees the connection close)."""
    with guest.gntshr() as shr:

        def landing(n: int) -> str:
            pages = shr.share_pages(0, 1)
            tab = host.dom0.gnttab()
            made: list[object] = []  # kept: close() must release it, not the collector
            where = interrupted_at(
                n, SIM_CODE, lambda: made.append(tab.map_grant_refs(guest.domid, pages.refs)),
                unless=_outside_the_round_trip, besides=_BESIDES_PROTO)
            tab.close()
            pages.unshare()
            return where

        every_landing(host, landing, more_than=5)


def test_what_a_reply_gave_goes_back_when_apply_refuses_it(host: SimHost, guest: Domain) -> None:
    """An ``apply`` that raises took nothing (an unexpected number of
    descriptors, say): the port the reply gave is unbound at once, not
    left to the service until the handle closes, and the descriptors it
    left in its list are closed."""
    with host.dom0.evtchn() as e0:
        ports, fds = host.hypervisor.stats()["ports"], descriptors()

        def refuse(reply: dict[str, object], fds: list[int]) -> None:
            raise PlatformError(errno.EPROTO, "not this one")  # fds left to the connection

        with pytest.raises(PlatformError, match="not this one"):
            e0._conn.call("evtchn_alloc_unbound", apply=refuse, domid=guest.domid)
        assert eventually(lambda: host.hypervisor.stats()["ports"] == ports)
        assert descriptors() <= fds, sorted(descriptors() - fds)
        port = e0.bind_unbound_port(guest.domid)  # and the next call gets its own reply
        assert e0.ports() == [port]


def test_a_reply_too_long_to_name_back_is_kept_by_the_service_not_the_connection(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What a refused reply gave goes back with a request that names it
    (gnt_end of its refs); a reply that fits a packet but whose request
    back would not (the service's fault) leaves it to the service, said
    as an error, and the connection serves on.  encode()'s ValueError
    came out of the call, and again out of every later call and drain
    that tried to release it."""
    path = str(tmp_path / "hypervisor")
    count = (MAX_MESSAGE - len(encode({"id": 1, "refs": []}))) // 2
    assert len(encode({"id": 1, "refs": [0] * count})) <= MAX_MESSAGE
    with pytest.raises(ValueError):
        encode({"op": "gnt_end", "refs": [0] * count, "id": 2})
    requests: list[str] = []

    def handle(conn: socket.socket) -> None:
        first = json.loads(conn.recv(MAX_MESSAGE))
        send_message(conn, {"id": first["id"], "refs": [0] * count})
        while data := conn.recv(MAX_MESSAGE):
            request = json.loads(data)
            requests.append(request["op"])
            send_message(conn, {"id": request["id"], "domid": 0})

    def refuse(reply: dict[str, object], fds: list[int]) -> None:
        raise PlatformError(errno.EPROTO, "not this one")

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, PlatformError)
    try:
        with caplog.at_level(logging.ERROR, "xenback.sim._proto"), \
                pytest.raises(PlatformError, match="not this one"):
            conn.call("gnt_share", apply=refuse, domid=0, count=1)
        assert "gnt_end" in caplog.text, caplog.text
        assert conn.call("info")[0]["domid"] == 0
        assert requests == ["info"]
    finally:
        conn.close()
        server.join(TIMEOUT)


def test_a_call_interrupted_anywhere_after_a_pushed_message_leaves_nothing(
        host: SimHost, guest: Domain) -> None:
    """The sweep of a call whose reply comes after a message the service
    pushed (the peer bound the port: a pipe to write to comes with it): a
    Ctrl-C anywhere in the round trip loses neither.  The push reaches the
    handle, by the next call at the latest, before anything that came after
    it, and its descriptor is the handle's or closed."""
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:

        def landing(n: int) -> str:
            p1 = e1.bind_unbound_port(0)
            p0 = e0.bind_interdomain(guest.domid, p1)  # pushes "bound" to e1
            where = interrupted_at(n, SIM_CODE, lambda: e1.bind_unbound_port(0),
                                   unless=_outside_the_round_trip, besides=_BESIDES_PROTO)
            assert e1.remote(p1) == (0, p0), where
            e1.notify(p1)
            assert select.select([e0], [], [], TIMEOUT)[0] == [e0], where
            assert e0.pending() == p0, where
            for port in e1.ports():
                e1.unbind(port)
            e0.unbind(p0)
            return where

        every_landing(host, landing, more_than=5)


def test_a_reply_to_no_request_is_dropped_by_drain_and_by_the_next_call(tmp_path: Path) -> None:
    """A reply whose id no request of ours has (a confused service): drain()
    and the call after it drop it, closing its descriptors, and go on to
    what follows it.  (One of a later id than a request's: below.)"""
    path = str(tmp_path / "hypervisor")
    r, w = os.pipe()

    def serve(conn: socket.socket) -> None:
        conn.recv(MAX_MESSAGE)
        send_message(conn, {"id": 1, "ok": 1})
        send_message(conn, {"id": 0, "ok": 2}, [w])  # to nobody
        send_message(conn, {"event": "bound", "port": 1})
        os.close(w)
        conn.recv(MAX_MESSAGE)
        send_message(conn, {"id": 0, "ok": 3})  # to nobody, then the reply
        send_message(conn, {"id": 2, "ok": 4})
        while conn.recv(MAX_MESSAGE):
            pass

    server = serve_one_client(path, serve, socket.SOCK_SEQPACKET)
    pushed: list[dict[str, object]] = []
    conn = ServiceConnection(path, PlatformError, lambda msg, fds: pushed.append(msg))
    try:
        assert conn.call("info") == ({"id": 1, "ok": 1}, [])
        assert eventually(lambda: bool(conn.drain() and pushed))
        assert pushed == [{"event": "bound", "port": 1}]
        assert select.select([r], [], [], TIMEOUT)[0] == [r]
        assert os.read(r, 1) == b""  # the stray reply's descriptor is closed
        assert conn.call("info") == ({"id": 2, "ok": 4}, [])
    finally:
        conn.close()
        os.close(r)
        server.join(TIMEOUT)


@pytest.mark.timeout(600)
def test_a_reply_left_on_its_way_out_is_released_whatever_cuts_its_release_short(
        host: SimHost, guest: Domain) -> None:
    """Two Ctrl-Cs: one as a map's call lets go of the lock (the reply left
    on its way out), one anywhere in the next call, which releases it.  The
    call after that finishes the release: the mapping's descriptor is closed
    once and the service's mapping released."""
    landed: list[str] = []
    with guest.gntshr() as shr, host.dom0.gnttab() as tab:
        pages = shr.share_pages(0, 1)
        for n in itertools.count():
            stats, fds = host.hypervisor.stats(), descriptors()
            for k in itertools.count():
                assert interrupted_as_call_returns(
                    ServiceConnection.call.__code__, k,
                    lambda: tab.map_grant_refs(guest.domid, pages.refs)), "never left"
                if tab._conn._delivering:
                    break
                for handle in list(tab._live.values()):
                    handle.unmap()
                tab.map_grant_refs(guest.domid, pages.refs).unmap()  # flush
            made: list[object] = []
            with numbers_held() as kept:
                with kept.closing():
                    where = interrupted_at(
                        n, SIM_CODE,
                        lambda made=made: made.append(tab.map_grant_refs(guest.domid, pages.refs)),
                        unless=_outside_the_round_trip, besides=_BESIDES_PROTO)
                for mapping in [*made, *tab._live.values()]:
                    mapping.unmap()  # type: ignore[attr-defined]
                with tab.map_grant_refs(guest.domid, pages.refs) as again:
                    assert len(again.buffer) == PAGE_SIZE
                kept.check(where)
            assert not tab._conn._delivering, where
            # A release cut short as its request was about to go left it
            # to the next call, and no request listed that never went.
            assert not tab._conn._unanswered, (where, tab._conn._unanswered)
            assert eventually(lambda stats=stats: host.hypervisor.stats() == stats), where
            assert eventually(lambda fds=fds: descriptors() <= fds), (
                where, sorted(descriptors() - fds))
            if not where:
                break
            landed.append(where)
        pages.unshare()
    assert len(landed) > 5, landed


def test_done_runs_once_also_for_a_reply_left_on_its_way_out(host: SimHost) -> None:
    """A Ctrl-C as call() lets go of the lock, its reply's done() run: the
    thread's next drain(), which releases that reply, does not run it
    again."""
    with host.dom0.evtchn() as e0:
        conn = e0._conn
        ran: list[int] = []
        for k in itertools.count():
            ran.clear()
            assert interrupted_as_call_returns(
                ServiceConnection.call.__code__, k,
                lambda: conn.call("info", done=functools.partial(ran.append, 1))), "never left"
            if conn._delivering:
                break
        assert ran == [1]
        assert conn.drain()
        assert not conn._delivering
        assert conn.call("info")[0]["domid"] == 0
        assert ran == [1]


def test_done_is_not_run_for_an_abandoned_reply_that_failed(host: SimHost) -> None:
    """done() is for a request that succeeded: a call cut short before its
    error reply came leaves done() unrun when a later call takes that
    reply."""
    with host.dom0.evtchn() as e0:
        ran: list[int] = []
        assert interrupted_as_call_returns(
            ServiceConnection._call.__code__, 0,
            lambda: e0._conn.call("evtchn_unbind", port=1, done=functools.partial(ran.append, 1)))
        assert e0._conn.call("info")[0]["domid"] == 0
        assert ran == []


def test_a_push_left_by_a_drain_cut_short_wakes_the_handles_waiters(
        host: SimHost, guest: Domain) -> None:
    """A Ctrl-C in the drain of a pushed message, after the receive took it
    off the socket and before it was handed on: the message waits in the
    inbox, and a thread waiting on the handle's fileno() (or in wait())
    must still be woken for it.  It was not: the socket it watches had
    nothing left to read, so the news (the peer bound the port) waited
    for the next drain of some other cause, or for ever."""
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:

        def landing(n: int) -> str:
            p1 = e1.bind_unbound_port(0)
            p0 = e0.bind_interdomain(guest.domid, p1)  # pushes "bound" to e1
            assert select.select([e1._conn], [], [], TIMEOUT)[0], "no push came"
            where = interrupted_at(n, SIM_CODE, e1.pending, besides=_BESIDES_PROTO)
            if e1._ports[p1].remote_port is None:  # not handed on yet
                assert select.select([e1], [], [], TIMEOUT)[0] == [e1], where
                assert e1.pending() is None, where
            assert e1._ports[p1].remote_port == p0, where
            # A push stays in the inbox until released, after on_push too
            # (see _dispatch): one handed on is let go by the next drain,
            # which the request made as the drain was cut short wakes.
            assert eventually(lambda: e1.pending() is None and not e1._conn._inbox), where
            e1.unbind(p1)
            e0.unbind(p0)
            return where

        every_landing(host, landing, more_than=10)


def _serve(path: str, answer: Callable[[socket.socket, int], None]) -> threading.Thread:
    """A service whose one connection ``answer(conn, request_id)`` serves
    after reading one request, and which then hangs up once the client did."""

    def handle(conn: socket.socket) -> None:
        request = conn.recv(MAX_MESSAGE)
        answer(conn, json.loads(request)["id"])
        try:
            while conn.recv(MAX_MESSAGE):
                pass
        except ConnectionResetError:
            pass  # a client that closed with packets unread hangs up so

    return serve_one_client(path, handle, socket.SOCK_SEQPACKET)


_MALFORMED = {
    "not-json": b"{not json",
    "not-an-object": b"[1]",
    "oversized": b" " * (MAX_MESSAGE + 1),
}


@pytest.mark.parametrize("packet", list(_MALFORMED.values()), ids=list(_MALFORMED))
def test_a_malformed_push_is_logged_and_the_handle_keeps_listening(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, packet: bytes) -> None:
    """A packet that is no message, where no call waits for a reply: the
    service broke the protocol, which is logged as an error, and the packet
    (its descriptors closed) is dropped; drain() goes on to what follows and
    says the service is there.  It said it had gone (False), and the
    event channel handle, which then stops watching the connection, never
    heard from the service again."""
    path = str(tmp_path / "hypervisor")
    r, w = os.pipe()
    sent = threading.Event()

    def answer(conn: socket.socket, request_id: int) -> None:
        send_message(conn, {"id": request_id, "ok": 1})
        socket.send_fds(conn, [packet], [w])
        os.close(w)
        send_message(conn, {"event": "bound", "port": 1})
        sent.set()

    server = _serve(path, answer)
    pushed: list[dict[str, object]] = []
    conn = ServiceConnection(path, PlatformError, lambda msg, fds: pushed.append(msg))
    try:
        assert conn.call("info") == ({"id": 1, "ok": 1}, [])
        assert sent.wait(TIMEOUT)
        with caplog.at_level("ERROR", logger="xenback.sim._proto"):
            assert conn.drain() is True
        assert pushed == [{"event": "bound", "port": 1}]
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "hypervisor service" in record.getMessage()
        assert select.select([r], [], [], TIMEOUT)[0] == [r]
        assert os.read(r, 1) == b""  # its descriptor is closed
        assert conn.drain() is True
    finally:
        conn.close()
        os.close(r)
        server.join(TIMEOUT)


@pytest.mark.parametrize("raised", [PlatformError(errno.EINVAL, "bad news"), KeyError("domid")],
                         ids=["the-handles-error", "a-bug"])
def test_a_push_the_handle_cannot_take_is_logged_and_the_handle_keeps_listening(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, raised: Exception) -> None:
    """on_push raising for a message it cannot take (news the service
    should not have sent): the push is logged as an error and dropped, as
    a malformed packet is, and neither the call that met it on the way to
    its reply nor the drain fails for it.  The handle's own error made
    drain() say that the service had gone (and the event channel handle
    stop watching it for good), and failed the call, its reply left
    behind for nobody."""
    path = str(tmp_path / "hypervisor")
    pushes = [{"event": "bound", "port": 1}, {"event": "unbound", "port": 2},
              {"event": "bound", "port": 3}, {"event": "unbound", "port": 4}]

    def answer(conn: socket.socket, request_id: int) -> None:
        send_message(conn, pushes[0])  # met by the call, before its reply
        send_message(conn, {"id": request_id, "ok": 1})
        for push in pushes[1:]:
            send_message(conn, push)

    server = _serve(path, answer)
    pushed: list[dict[str, object]] = []

    def on_push(msg: dict[str, object], fds: list[int]) -> None:
        pushed.append(msg)
        if msg["event"] == "bound":
            raise raised

    conn = ServiceConnection(path, PlatformError, on_push)
    try:
        with caplog.at_level("ERROR", logger="xenback.sim._proto"):
            assert conn.call("info") == ({"id": 1, "ok": 1}, [])
            assert eventually(lambda: conn.drain() and len(pushed) == len(pushes)), pushed
        assert pushed == pushes
        assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 2
        assert conn.drain() is True
    finally:
        conn.close()
        server.join(TIMEOUT)


def test_a_malformed_packet_fails_the_call_waiting_and_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Where a call waits, a malformed packet may have been its reply: the
    call fails (EPROTO), and the violation is logged as well, since the
    caller may take an EPROTO for its own fault."""
    path = str(tmp_path / "hypervisor")
    server = _serve(path, lambda conn, _id: conn.send(b"{not json"))
    conn = ServiceConnection(path, PlatformError)
    try:
        with caplog.at_level("ERROR", logger="xenback.sim._proto"), \
                pytest.raises(PlatformError) as info:
            conn.call("info")
        assert info.value.errno == errno.EPROTO
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "malformed" in record.getMessage()
    finally:
        conn.close()
        server.join(TIMEOUT)


def test_a_stray_reply_with_a_later_id_leaves_the_waiting_request_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reply whose id no request has, higher than that of the request a
    call waits for: it is dropped (logged, its descriptors closed) and the
    call gets its own reply.  It was taken to mean that the requests before
    it were answered: the call's own reply then went to nobody and the call
    waited on (here the service hangs up after it: ENODEV)."""
    path = str(tmp_path / "hypervisor")
    r, w = os.pipe()

    def answer(conn: socket.socket, request_id: int) -> None:
        send_message(conn, {"id": request_id + 5, "ok": "stray"}, [w])
        os.close(w)
        send_message(conn, {"id": request_id, "ok": "mine"})
        conn.shutdown(socket.SHUT_WR)

    server = _serve(path, answer)
    conn = ServiceConnection(path, PlatformError)
    try:
        with caplog.at_level("WARNING", logger="xenback.sim._proto"):
            assert conn.call("info") == ({"id": 1, "ok": "mine"}, [])
        assert [r for r in caplog.records if "no request" in r.getMessage()]
        assert select.select([r], [], [], TIMEOUT)[0] == [r]
        assert os.read(r, 1) == b""  # the stray reply's descriptor is closed
    finally:
        conn.close()
        os.close(r)
        server.join(TIMEOUT)


def test_a_stray_reply_leaves_a_reply_left_to_nobody_to_be_released(
        host: SimHost, guest: Domain) -> None:
    """A call cut short before its reply came, then a stray reply of a
    later id: the abandoned reply, when it comes, is still known for what
    it is, and what it gave (a port) is given back at once.  The stray
    reply made it a reply to no request, dropped with its port bound."""
    with host.dom0.evtchn() as e0:
        conn = e0._conn
        ports = host.hypervisor.stats()["ports"]
        assert interrupted_as_call_returns(
            ServiceConnection._call.__code__, 0, lambda: e0.bind_unbound_port(guest.domid))
        (cut,) = conn._unanswered
        # The stray reply comes first (as if the service sent it before).
        with conn._lock:
            stray = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with stray[0], stray[1]:
                send_message(stray[0], {"id": cut + 10, "port": 99})
                conn._inbox.appendleft(stray[1].recvmsg(MAX_MESSAGE + 1, 1024))
        assert conn.call("info")[0]["domid"] == 0
        assert eventually(lambda: host.hypervisor.stats()["ports"] == ports)
        # The unbind that gave the port back is answered in turn.
        assert eventually(lambda: conn.drain() and not conn._unanswered), conn._unanswered


def test_no_request_is_left_unanswered_by_a_call_cut_short_anywhere(
        host: SimHost, guest: Domain) -> None:
    """A Ctrl-C anywhere in a call, one more call after it: every request
    is answered, none is left waiting for a reply that never comes (one
    recorded and never sent, say), now that a reply answers its own
    request only."""
    with guest.evtchn() as e1:
        conn = e1._conn

        def landing(n: int) -> str:
            where = interrupted_at(n, SIM_CODE, lambda: conn.call("info"),
                                   unless=_outside_the_round_trip, besides=_BESIDES_PROTO)
            assert conn.call("info")[0]["domid"] == guest.domid, where
            assert eventually(lambda: not conn.drain() or not conn._unanswered), where
            assert not conn._unanswered, (where, conn._unanswered)
            return where

        every_landing(host, landing, more_than=5)


def test_a_ctrl_c_in_the_wake_up_request_leaves_no_request_waiting(guest: Domain) -> None:
    """A second Ctrl-C, in the request a drain cut short makes to
    wake the handle's waiters (ServiceConnection._cut_short), as any call
    it makes returns: the request is listed as waiting for its reply only
    if it went.  It was listed before it was encoded, so a Ctrl-C as the
    encoding returned left a request that never went waiting for ever."""
    with guest.evtchn() as e1:
        conn = e1._conn
        for k in itertools.count():
            with conn._lock:
                # A push a first Ctrl-C left in the inbox (for no port of ours).
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                with a, b:
                    send_message(a, {"event": "unbound", "port": 4000})
                    conn._inbox.append(b.recvmsg(MAX_MESSAGE + 1, 1024))
                cut = interrupted_as_call_returns(
                    ServiceConnection._cut_short.__code__, k, conn._cut_short)
            assert conn.call("info")[0]["domid"] == guest.domid, k
            assert eventually(lambda: conn.drain() and not conn._unanswered), (k, conn._unanswered)
            if not cut:
                break
        assert k > 2, k


@contextlib.contextmanager
def _no_descriptor_at_all() -> Iterator[None]:
    """In the block, this process can open no descriptor (EMFILE): its
    soft RLIMIT_NOFILE is 0.  Not a limit just past the highest number
    in use, with every free one below taken: another thread of the
    process (the simulated host's service thread, the garbage collector
    closing a socket) may close a descriptor meanwhile, and the next open
    would take its number.  At 0, no number is free to any open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_descriptors_of_a_request_the_service_got_in_part_are_closed(
        host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given only some of a request's descriptors, the kernel says so
    (MSG_CTRUNC): the request is refused as the service out of descriptors
    is, and the ones it got are closed, not kept for good.

    The kernel installs what fits, then flags the rest as dropped, alike
    whether the process ran out of numbers or the receive buffer out of
    room: here, room for one in the service's buffer.  Not one number left
    free below a lowered limit: another thread of this process (the
    host's, the collector closing a socket) closing a descriptor meanwhile
    gave the service both."""
    from xenback.sim import _proto
    from xenback.sim._hypervisor import domain_socket

    pipes = [os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) for _ in range(2)]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(os.fspath(domain_socket(host.run_dir, guest.domid)))
            sock.send(b'{"op": "info", "id": 1}')
            assert json.loads(sock.recv(70000))["domid"] == guest.domid  # accepted
            # Room for one descriptor; read by recv_message() at each call, in
            # the service's thread.
            monkeypatch.setattr(_proto, "_ANCILLARY_SPACE", socket.CMSG_LEN(4))
            socket.send_fds(sock, [b'{"op": "info", "id": 2}'], [w for _, w in pipes])
            data, fds, _, _ = socket.recv_fds(sock, 70000, 4)
            monkeypatch.undo()
            assert (json.loads(data)["errno"], fds) == (errno.EMFILE, [])
        for r, w in pipes:
            os.close(w)
            assert os.read(r, 1) == b""  # no write end left in the service
    finally:
        for r, w in pipes:
            os.close(r)
            with contextlib.suppress(OSError):
                os.close(w)


def test_a_reply_whose_descriptors_find_no_room_fails_its_call_and_is_given_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reply whose descriptors this process has no number left for (the
    kernel drops them and says MSG_CTRUNC): the call fails with EMFILE,
    and the reply still answers its request, so what it gave (a port) is
    given back at once, and no request is left waiting for ever.  It was
    taken for an oversized packet, blamed on the service (EPROTO, logged
    as an error), and its request stayed listed for the connection's life,
    and its port bound."""
    path = str(tmp_path / "hypervisor")
    r, w = os.pipe()
    unbound: list[dict[str, object]] = []

    def handle(conn: socket.socket) -> None:
        while data := conn.recv(MAX_MESSAGE):
            request = json.loads(data)
            if request["op"] == "evtchn_alloc_unbound":
                send_message(conn, {"id": request["id"], "port": 7}, [w])
                continue
            if request["op"] == "evtchn_unbind":
                unbound.append(request)
                unbinding.set()
            send_message(conn, {"id": request["id"]})

    unbinding = threading.Event()
    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, EventChannelError, lambda msg, fds: None)
    try:
        conn.call("info")  # the service is serving (it accepted already)
        with caplog.at_level("ERROR", logger="xenback.sim._proto"), _no_descriptor_at_all(), \
                pytest.raises(EventChannelError) as info:
            conn.call("evtchn_alloc_unbound", domid=0)
        assert info.value.errno == errno.EMFILE, info.value
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        # Given back by the call that failed, not left to the next one.
        assert unbinding.wait(TIMEOUT), "the port stays bound until the next call"
        assert eventually(lambda: conn.drain() and not conn._unanswered), conn._unanswered
        assert [m["port"] for m in unbound] == [7]
        assert conn.call("info")[0] == {"id": unbound[0]["id"] + 1}  # type: ignore[operator]
    finally:
        conn.close()
        os.close(w)
        os.close(r)
        server.join(TIMEOUT)


def test_a_request_whose_descriptors_find_no_room_at_the_service_is_answered_as_its_own(
        guest: Domain) -> None:
    """The service out of descriptor numbers as a request carrying one
    comes (the kernel drops it, MSG_CTRUNC): the request is whole, and its
    error reply (EMFILE, the service is out of descriptors) carries its
    id.  It was taken for an oversized one and answered E2BIG without an
    id, which a call took for its own reply whatever request it answered:
    after a call cut short, the next call failed with the error of the
    one before, and its own reply went to nobody."""
    with guest.evtchn() as e1:
        conn = e1._conn
        r, w = os.pipe()
        try:
            conn.call("info")  # the service is serving (it accepted already)
            with _no_descriptor_at_all():
                with pytest.raises(EventChannelError) as info:
                    conn.call("info", [w])
                assert info.value.errno == errno.EMFILE, info.value
                assert interrupted_as_call_returns(
                    ServiceConnection._call.__code__, 0, lambda: conn.call("info", [w]))
                assert conn.call("info")[0]["domid"] == guest.domid
            assert eventually(lambda: conn.drain() and not conn._unanswered), conn._unanswered
        finally:
            os.close(r)
            os.close(w)


def test_a_push_short_of_its_descriptors_is_dropped_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A pushed message whose descriptors found no room in this process:
    news whose pipe ends are lost would mislead the handle, so it is not
    handed on; it is logged as an error, and the drain goes on."""
    path = str(tmp_path / "hypervisor")
    r, w = os.pipe()

    def answer(conn: socket.socket, request_id: int) -> None:
        send_message(conn, {"id": request_id})
        assert conn.recv(MAX_MESSAGE)  # the next request, made out of descriptors
        send_message(conn, {"event": "bound", "port": 1, "domid": 0, "remote_port": 2}, [w])
        send_message(conn, {"event": "unbound", "port": 3})

    server = _serve(path, answer)
    pushed: list[dict[str, object]] = []
    conn = ServiceConnection(path, EventChannelError, lambda msg, fds: pushed.append(msg))
    try:
        conn.call("info")
        with caplog.at_level("ERROR", logger="xenback.sim._proto"), _no_descriptor_at_all():
            conn._sock.send(encode({"op": "info"}))  # the service pushes as it reads it
            assert eventually(lambda: conn.drain() and bool(pushed))
        assert pushed == [{"event": "unbound", "port": 3}]
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "no descriptor left" in record.getMessage()
    finally:
        conn.close()
        os.close(w)
        os.close(r)
        server.join(TIMEOUT)


def test_a_reply_left_to_nobody_is_known_whenever_it_comes(tmp_path: Path) -> None:
    """Each reply answers its own request, whatever came before it (the
    service answers domain control later than requests made after it): a
    reply to a call cut short that comes after the reply to a later
    request is still known, and what it gave (a port) is given back.
    Taking a reply for a sign that the requests before it were answered
    made it a reply to nobody, and its port stayed bound."""
    path = str(tmp_path / "hypervisor")
    r, w = os.pipe()
    unbound: list[object] = []

    def handle(conn: socket.socket) -> None:
        cut = json.loads(conn.recv(MAX_MESSAGE))
        later = json.loads(conn.recv(MAX_MESSAGE))
        send_message(conn, {"id": later["id"], "domid": 0})
        send_message(conn, {"id": cut["id"], "port": 7}, [w])
        while data := conn.recv(MAX_MESSAGE):
            request = json.loads(data)
            if request["op"] == "evtchn_unbind":
                unbound.append(request["port"])
            send_message(conn, {"id": request["id"]})

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, EventChannelError, lambda msg, fds: None)
    try:
        assert interrupted_as_call_returns(
            ServiceConnection._call.__code__, 0,
            lambda: conn.call("evtchn_alloc_unbound", domid=0))
        assert conn.call("info")[0]["domid"] == 0
        assert eventually(lambda: conn.drain() and unbound == [7] and not conn._unanswered), \
            (unbound, conn._unanswered)
    finally:
        conn.close()
        os.close(w)
        os.close(r)
        server.join(TIMEOUT)


def test_the_wake_up_request_never_blocks_and_is_forgotten_if_it_did_not_go(
        tmp_path: Path) -> None:
    """The request a Ctrl-C's cleanup makes to wake the handle's waiters,
    with the socket's send buffer full (a service that reads nothing for
    now): it does not go, and does not wait for room either, under the
    lock that every call and drain of the handle takes (the replies to the
    requests that fill the buffer wake the waiters); nor is it listed as
    waiting for a reply."""
    path = str(tmp_path / "hypervisor")
    read = threading.Event()

    def handle(conn: socket.socket) -> None:
        read.wait(OUTLASTS_THE_TEST)  # set by the test, whatever happens
        while conn.recv(MAX_MESSAGE):
            pass

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, EventChannelError, lambda msg, fds: None)
    try:
        with contextlib.suppress(BlockingIOError):
            while True:
                conn._sock.send(b"{}", socket.MSG_DONTWAIT)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            send_message(a, {"event": "unbound", "port": 1})
            left = b.recvmsg(MAX_MESSAGE + 1, 1024)

        def cut_short() -> None:
            with conn._lock:
                conn._inbox.append(left)  # a push a Ctrl-C left there
                conn._cut_short()

        thread = threading.Thread(target=cut_short, daemon=True)
        thread.start()
        thread.join(TIMEOUT)
        blocked = thread.is_alive()
        read.set()
        thread.join(TIMEOUT)
        assert not blocked, "waits for room under the lock"
        assert not conn._unanswered
    finally:
        read.set()
        conn.close()
        server.join(TIMEOUT)


def test_a_call_cut_short_anywhere_leaves_the_handle_listening_for_pushes(
        host: SimHost, guest: Domain) -> None:
    """A Ctrl-C anywhere in a call of an event channel handle with a pushed
    message waiting: a thread waiting on the handle is woken for it.  One
    landing as the handle's on_wait(True) returned (the connection taken
    out of its epoll set while the request waits) skipped on_wait(False),
    and the handle heard no push until its next call."""
    with host.dom0.evtchn() as e0, guest.evtchn() as e1:

        def landing(n: int) -> str:
            p1 = e1.bind_unbound_port(0)
            p0 = e0.bind_interdomain(guest.domid, p1)  # pushes "bound" to e1
            assert select.select([e1._conn], [], [], TIMEOUT)[0], "no push came"
            where = interrupted_at(n, SIM_CODE, lambda: e1._conn.call("info"),
                                   unless=_outside_the_round_trip, besides=_BESIDES_PROTO)
            if e1._ports[p1].remote_port is None:  # not handed on yet
                assert select.select([e1], [], [], TIMEOUT)[0] == [e1], where
                assert e1.pending() is None, where
            assert e1._ports[p1].remote_port == p0, where
            e1.unbind(p1)
            e0.unbind(p0)
            return where

        every_landing(host, landing, more_than=10)


def test_a_request_with_descriptors_cut_short_anywhere_keeps_its_reply_known(
        host: SimHost, guest: Domain, caplog: pytest.LogCaptureFixture) -> None:
    """The sweep of a call whose request carries a descriptor (sent with
    sendmsg(), the others with send()): one cut short once it went is
    still listed, so its reply is taken for abandoned, not for a stray
    reply to no request, and none is left listed that never went."""
    with guest.evtchn() as e1:
        conn = e1._conn
        r, w = os.pipe()

        def landing(n: int) -> str:
            caplog.clear()
            with caplog.at_level("WARNING", logger="xenback.sim._proto"):
                with contextlib.suppress(EventChannelError):  # it takes no descriptors
                    where = ""
                    where = interrupted_at(n, SIM_CODE, lambda: conn.call("info", [w]),
                                           unless=_outside_the_round_trip,
                                           besides=_BESIDES_PROTO)
                assert conn.call("info")[0]["domid"] == guest.domid, where
            assert not [r for r in caplog.records if "no request" in r.getMessage()], where
            assert not conn._unanswered, (where, conn._unanswered)
            return where

        try:
            every_landing(host, landing, more_than=3)
        finally:
            os.close(r)
            os.close(w)


def test_a_ctrl_c_in_on_push_ends_the_call_and_is_not_taken_for_bad_news(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Ctrl-C landing in the owner's on_push as the call that met the
    push hands it on: it ends the call, as anywhere else.  Only an
    Exception is news the owner cannot take; caught as one, the Ctrl-C
    was logged as a dropped message and the call went on for its reply."""
    path = str(tmp_path / "hypervisor")

    def answer(conn: socket.socket, request_id: int) -> None:
        send_message(conn, {"event": "bound", "port": 1})
        # The call may have ended at the push and closed the handle.
        with contextlib.suppress(BrokenPipeError):
            send_message(conn, {"id": request_id, "ok": 1})

    server = _serve(path, answer)

    def on_push(msg: dict[str, object], fds: list[int]) -> None:
        raise Interrupted

    conn = ServiceConnection(path, PlatformError, on_push)
    try:
        with caplog.at_level("ERROR", logger="xenback.sim._proto"), \
                pytest.raises(Interrupted):
            conn.call("info")
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        conn.close()
        server.join(TIMEOUT)


def test_a_ctrl_c_in_on_wait_false_is_made_good_and_still_ends_the_call(
        tmp_path: Path) -> None:
    """A Ctrl-C as the owner's on_wait(False) starts: it is made again,
    so that the owner listens for pushes, and the Ctrl-C still ends the
    call rather than being swallowed by the retry."""
    path = str(tmp_path / "hypervisor")
    server = _serve(path, lambda conn, request_id: send_message(conn, {"id": request_id}))
    waits: list[bool] = []

    def on_wait(waiting: bool) -> None:
        waits.append(waiting)
        if waits == [True, False]:
            raise Interrupted

    conn = ServiceConnection(path, PlatformError, on_wait=on_wait)
    try:
        with pytest.raises(Interrupted):
            conn.call("info")
        assert waits == [True, False, False]
    finally:
        conn.close()
        server.join(TIMEOUT)


def test_a_request_filling_max_message_is_served(guest: Domain) -> None:
    """The service takes a request of exactly MAX_MESSAGE bytes, as the
    client may send one (encode()); only a longer packet is E2BIG."""
    with guest.evtchn() as e1:
        sock = e1._conn._sock
        request = {"op": "info", "id": 1000, "pad": ""}
        request["pad"] = "x" * (MAX_MESSAGE - len(encode(request)))
        send_message(sock, request)
        data, fds, _ = recv_message(sock)
        reply = json.loads(data)
        assert (reply.get("errno"), reply["id"], fds) == (None, 1000, [])
        request["pad"] += "x"
        sock.send(json.dumps(request, separators=(",", ":")).encode())
        reply = json.loads(recv_message(sock)[0])
        assert reply["errno"] == errno.E2BIG


def test_a_push_cut_short_as_on_push_starts_keeps_no_descriptor(tmp_path: Path) -> None:
    """A Ctrl-C as the owner's on_push starts, before it can close or
    keep anything: the push's descriptors were the owner's from the call
    on, and were lost for good.  They stay the connection's until on_push
    takes them off the list; what it leaves, then or cut short, the
    connection closes (the next drain here), and the news cut short is
    dropped, never handed on twice."""
    path = str(tmp_path / "hypervisor")
    r, w = os.pipe()

    def answer(conn: socket.socket, request_id: int) -> None:
        send_message(conn, {"id": request_id, "ok": 1})
        send_message(conn, {"event": "bound", "port": 1}, [w])
        send_message(conn, {"event": "unbound", "port": 2})
        os.close(w)

    server = _serve(path, answer)
    pushed: list[dict[str, object]] = []

    def on_push(msg: dict[str, object], fds: list[int]) -> None:
        pushed.append(msg)
        if len(pushed) == 1:
            raise Interrupted  # as it starts, as far as the descriptors go

    conn = ServiceConnection(path, PlatformError, on_push)
    try:
        conn.call("info")
        with pytest.raises(Interrupted):
            assert eventually(lambda: bool(conn.drain() and pushed))
        assert eventually(lambda: conn.drain() and len(pushed) == 2), pushed
        assert [msg["event"] for msg in pushed] == ["bound", "unbound"]
        assert select.select([r], [], [], TIMEOUT)[0] == [r]
        assert os.read(r, 1) == b""  # no copy of the write end is left
    finally:
        conn.close()
        os.close(r)
        server.join(TIMEOUT)


@pytest.mark.parametrize("data", [b"1", b'"x"', b"null", b"true", b"[" * 60000],
                         ids=["number", "string", "null", "bool", "nested"])
def test_decode_takes_an_object_and_nothing_else(data: bytes) -> None:
    """Any JSON value but an object, and a nesting deeper than the parser
    goes (a hostile packet), is a ValueError: what a connection counts as
    a malformed packet, never another exception escaping it."""
    with pytest.raises(ValueError):
        decode(data)
    assert decode(b'{"a":[1]}') == {"a": [1]}


def test_close_taken_closes_every_one_and_empties_the_list() -> None:
    """A descriptor that is closed already (EBADF) stops neither the
    others' closing nor the emptying of the list."""
    r, w = os.pipe()
    bad = os.open(os.devnull, os.O_RDONLY)
    os.close(bad)
    fds = [r, bad, w]
    close_taken(fds)
    assert fds == []
    for fd in (r, w):
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF


def test_a_service_out_of_reach_is_said_with_the_connects_errno_and_keeps_no_descriptor(
        tmp_path: Path) -> None:
    fds = descriptors()
    with pytest.raises(PlatformError) as info:
        ServiceConnection(str(tmp_path / "nobody"), PlatformError)
    assert info.value.errno == errno.ENOENT, info.value
    assert descriptors() <= fds, sorted(descriptors() - fds)


@pytest.mark.timeout(600)
def test_a_reply_left_on_its_way_out_is_released_by_the_next_call_cut_short_anywhere(
        host: SimHost, guest: Domain) -> None:
    """A Ctrl-C as call() lets go of the lock, with a reply no apply took
    (a port and its read end), then one anywhere in the thread's next
    call, which releases it: the call after that finishes the release.
    The port is unbound, the descriptor closed once; the next call, not
    only the next drain, does it, before its own reply takes the
    thread's place on the way out (where it would be lost)."""
    with host.dom0.evtchn() as e0:
        conn = e0._conn

        def landing(n: int) -> str:
            for k in itertools.count():
                assert interrupted_as_call_returns(
                    ServiceConnection.call.__code__, k,
                    lambda: conn.call("evtchn_alloc_unbound", domid=guest.domid)), "never left"
                if conn._delivering:
                    break
                # Released already (by drain: the handle lists no port of a raw call).
                assert eventually(lambda: conn.drain() and not conn._unanswered)
            with numbers_held() as kept:
                with kept.closing():
                    where = interrupted_at(n, SIM_CODE, lambda: conn.call("info"),
                                           unless=_outside_the_round_trip,
                                           besides=_BESIDES_PROTO)
                assert conn.call("info")[0]["domid"] == 0, where
                assert not conn._delivering, where
                kept.check(where)
            return where

        every_landing(host, landing, more_than=5)


def test_a_malformed_packet_left_in_the_inbox_fails_no_later_call(
        guest: Domain, caplog: pytest.LogCaptureFixture) -> None:
    """A packet that is no message, left in the inbox by a call cut short
    (it may have been that call's reply): the next call drops it, logged,
    and gets its own reply; it does not fail for a packet received before
    its request went."""
    with guest.evtchn() as e1:
        conn = e1._conn
        with conn._lock:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with a, b:
                a.send(b"{not json")
                conn._inbox.append(b.recvmsg(MAX_MESSAGE + 1, 1024))
        with caplog.at_level("ERROR", logger="xenback.sim._proto"):
            assert conn.call("info")[0]["domid"] == guest.domid
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "malformed" in record.getMessage()


def test_an_error_reply_needs_no_text(tmp_path: Path) -> None:
    """A reply carrying "errno" alone is an error all the same (its text,
    as any reply's, is optional): the call fails with that errno."""
    path = str(tmp_path / "hypervisor")
    server = _serve(path, lambda conn, request_id: send_message(
        conn, {"id": request_id, "errno": errno.EINVAL}))
    conn = ServiceConnection(path, PlatformError)
    try:
        with pytest.raises(PlatformError) as info:
            conn.call("info")
        assert (info.value.errno, info.value.strerror) == (errno.EINVAL, "")
    finally:
        conn.close()
        server.join(TIMEOUT)


def test_what_a_reply_without_descriptors_gave_goes_back_when_apply_refuses_it(
        tmp_path: Path) -> None:
    """A reply without descriptors (a share's refs) is never taken by
    apply, whatever apply did: refused, its grant is ended at once."""
    path = str(tmp_path / "hypervisor")
    ended = threading.Event()
    requests: list[dict[str, object]] = []

    def handle(conn: socket.socket) -> None:
        # The client may hang up with the last reply unread: a reset.
        with contextlib.suppress(ConnectionResetError):
            while data := conn.recv(MAX_MESSAGE):
                request = json.loads(data)
                requests.append(request)
                send_message(conn, {"id": request["id"], "refs": [8]})
                if request["op"] == "gnt_end":
                    ended.set()

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)

    def refuse(reply: dict[str, object], fds: list[int]) -> None:
        raise PlatformError(errno.EPROTO, "not this one")

    conn = ServiceConnection(path, PlatformError)
    try:
        with pytest.raises(PlatformError, match="not this one"):
            conn.call("gnt_share", apply=refuse, domid=0, count=1, writable=True)
        assert ended.wait(TIMEOUT), requests
        assert [(r["op"], r.get("refs")) for r in requests] == [
            ("gnt_share", None), ("gnt_end", [8])]
    finally:
        conn.close()
        server.join(TIMEOUT)


def test_a_reply_of_valid_json_longer_than_max_message_is_malformed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A packet one byte over MAX_MESSAGE is no message even if it parses
    (the receive's buffer holds it whole, with room for that one byte)."""
    path = str(tmp_path / "hypervisor")

    def answer(conn: socket.socket, request_id: int) -> None:
        reply = {"id": request_id, "pad": ""}
        reply["pad"] = "x" * (MAX_MESSAGE + 1 - len(json.dumps(reply, separators=(",", ":"))))
        data = json.dumps(reply, separators=(",", ":")).encode()
        assert len(data) == MAX_MESSAGE + 1
        conn.send(data)

    server = _serve(path, answer)
    conn = ServiceConnection(path, PlatformError)
    try:
        with caplog.at_level("ERROR", logger="xenback.sim._proto"), \
                pytest.raises(PlatformError) as info:
            conn.call("info")
        assert info.value.errno == errno.EPROTO
    finally:
        conn.close()
        server.join(TIMEOUT)


def test_descriptors_a_reply_brings_are_close_on_exec(
        service: Callable[[Callable[[socket.socket], None]], str]) -> None:
    answer, r = _with_pipe(lambda conn, fd: send_message(conn, {"ok": 1}, [fd]))
    conn = ServiceConnection(service(answer), PlatformError)
    try:
        reply, fds = conn.call("info")
        try:
            assert (reply, len(fds)) == ({"ok": 1}, 1)
            assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            close_fds(fds)
    finally:
        conn.close()
        os.close(r)


def test_a_request_that_could_not_go_is_not_listed(tmp_path: Path) -> None:
    """The service gone before the request: the send fails (ENODEV), and
    the request is not left waiting for a reply (only one that went is)."""
    path = str(tmp_path / "hypervisor")
    server = serve_one_client(path, lambda conn: None, socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, PlatformError)
    try:
        server.join(TIMEOUT)  # accepted and closed
        with pytest.raises(PlatformError) as info:
            conn.call("info")
        assert info.value.errno == errno.ENODEV, info.value
        assert not conn._unanswered, conn._unanswered
    finally:
        conn.close()


def test_raise_nofile_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = len(descriptors()) + 16
    if soft != resource.RLIM_INFINITY and soft <= lowered:
        pytest.skip(f"the soft limit ({soft}) leaves no room to lower it")
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        raise_nofile_limit()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert now == (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_refusal_that_says_no_errno_is_enodev(tmp_path: Path) -> None:
    path = str(tmp_path / "hypervisor")
    server = serve_one_client(path, lambda conn: send_message(conn, {"event": "refused"}),
                              socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, PlatformError)
    try:
        server.join(TIMEOUT)  # refused and closed
        with pytest.raises(PlatformError) as info:
            conn.call("info")
        assert info.value.errno == errno.ENODEV, info.value
    finally:
        conn.close()


def test_a_reply_short_of_what_undoes_it_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A share's reply without its refs: nothing could give back what it
    gave, were it abandoned, which is the service's fault and logged so;
    the call still gets it, to refuse as it sees fit."""
    path = str(tmp_path / "hypervisor")
    server = _serve(path, lambda conn, request_id: send_message(conn, {"id": request_id}))
    conn = ServiceConnection(path, PlatformError)
    try:
        with caplog.at_level("WARNING", logger="xenback.sim._proto"):
            assert conn.call("gnt_share", domid=0, count=1, writable=True) == ({"id": 1}, [])
        (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert "malformed reply" in record.getMessage() and "gnt_share" in record.getMessage()
    finally:
        conn.close()
        server.join(TIMEOUT)


def test_a_refusal_drained_before_the_service_hangs_up_still_fails_the_next_call(
        tmp_path: Path) -> None:
    """The refusal read by a drain while the service has not closed the
    connection yet: the next call fails with its errno at once.  Were its
    request sent, it would go, and the hang-up that answers it would say
    ENODEV (a host gone) instead."""
    path = str(tmp_path / "hypervisor")

    def handle(conn: socket.socket) -> None:
        send_message(conn, _REFUSAL)
        conn.recv(MAX_MESSAGE)  # a request, or the client's hang-up

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, PlatformError, lambda msg, _fds: None)
    try:
        assert select.select([conn], [], [], TIMEOUT)[0] == [conn]
        assert conn.drain() is False
        with pytest.raises(PlatformError) as info:
            conn.call("info")
        assert info.value.errno == errno.EMFILE, info.value
    finally:
        conn.close()
        server.join(TIMEOUT)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("left", ["in-apply", "before-its-reply"])
def test_the_release_of_an_abandoned_reply_cut_short_anywhere_is_finished_once(
        host: SimHost, guest: Domain, left: str) -> None:
    """A reply with a descriptor left to nobody (its call cut short in
    apply, before it took anything, or before the reply came), then a
    Ctrl-C anywhere in the next call, which releases it: the call after
    that finishes the release.  Its descriptor is closed once (not again,
    closing whatever file has its number by then), and its port unbound
    (not forgotten because its descriptors are gone by then, as if apply
    had taken them), and its done() run once."""
    with host.dom0.evtchn() as e0:
        conn = e0._conn

        def cut(reply: dict[str, object], fds: list[int]) -> None:
            raise Interrupted  # as apply starts

        def landing(n: int) -> str:
            ran: list[int] = []
            done = functools.partial(ran.append, 1)
            if left == "in-apply":
                with pytest.raises(Interrupted):
                    conn.call("evtchn_alloc_unbound", apply=cut, done=done, domid=guest.domid)
            else:
                assert interrupted_as_call_returns(
                    ServiceConnection._call.__code__, 0,
                    lambda: conn.call("evtchn_alloc_unbound", done=done, domid=guest.domid))
            with numbers_held() as kept:
                with kept.closing():
                    where = interrupted_at(n, SIM_CODE, lambda: conn.call("info"),
                                           unless=_outside_the_round_trip,
                                           besides=_BESIDES_PROTO)
                assert conn.call("info")[0]["domid"] == 0, where
                assert eventually(lambda: conn.drain() and not conn._unanswered), where
                kept.check(where)
            assert ran == [1], where
            return where

        every_landing(host, landing, more_than=5)


def test_the_undo_of_an_abandoned_reply_goes_once_whatever_cuts_its_call_short(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reply (a port) left to nobody, then a Ctrl-C anywhere in the call
    that releases it, then a call that finishes: the port is unbound
    exactly once (a second unbind of its number would unbind the port
    that took the number meanwhile), and the unbind's reply is known (no
    reply to no request)."""
    path = str(tmp_path / "hypervisor")
    r, w = os.pipe()
    unbound: list[int] = []

    def handle(conn: socket.socket) -> None:
        while data := conn.recv(MAX_MESSAGE):
            request = json.loads(data)
            if request["op"] == "evtchn_alloc_unbound":
                send_message(conn, {"id": request["id"], "port": 7}, [w])
                continue
            if request["op"] == "evtchn_unbind":
                unbound.append(request["port"])
            send_message(conn, {"id": request["id"]})

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, EventChannelError, lambda msg, fds: None)
    landed: list[str] = []
    try:
        for n in itertools.count():
            caplog.clear()
            with caplog.at_level("WARNING", logger="xenback.sim._proto"):
                assert interrupted_as_call_returns(
                    ServiceConnection._call.__code__, 0,
                    lambda: conn.call("evtchn_alloc_unbound", domid=0))
                where = interrupted_at(n, SIM_CODE, lambda: conn.call("info"),
                                       unless=_outside_the_round_trip, besides=_BESIDES_PROTO)
                conn.call("info")
                assert eventually(lambda: conn.drain() and not conn._unanswered), \
                    (where, conn._unanswered)
            assert unbound == [7], where
            assert not [r for r in caplog.records if "no request" in r.getMessage()], where
            unbound.clear()
            if not where:
                break
            landed.append(where)
        assert len(landed) > 5, landed
    finally:
        conn.close()
        os.close(w)
        os.close(r)
        server.join(TIMEOUT)


def test_an_undo_that_cannot_go_is_not_listed(tmp_path: Path) -> None:
    """The service gone as an abandoned reply (a port) is released: the
    unbind's send fails, and it is not left listed as waiting for a reply
    (the service released the port with the connection)."""
    path = str(tmp_path / "hypervisor")
    r, w = os.pipe()

    def handle(conn: socket.socket) -> None:
        request = json.loads(conn.recv(MAX_MESSAGE))
        send_message(conn, {"id": request["id"], "port": 7}, [w])

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, EventChannelError, lambda msg, fds: None)
    try:
        assert interrupted_as_call_returns(
            ServiceConnection._call.__code__, 0,
            lambda: conn.call("evtchn_alloc_unbound", domid=0))
        server.join(TIMEOUT)  # replied and closed
        assert conn.drain() is False
        assert not conn._unanswered, conn._unanswered
    finally:
        conn.close()
        os.close(w)
        os.close(r)


def test_a_drain_that_meets_a_reset_says_the_service_is_gone(tmp_path: Path) -> None:
    """The service closed the connection with a request of ours unread:
    the receive fails (ECONNRESET) rather than reading the end, and the
    drain says the service is gone all the same."""
    path = str(tmp_path / "hypervisor")

    def handle(conn: socket.socket) -> None:
        select.select([conn], [], [], TIMEOUT)  # the request came: closed unread

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, PlatformError, lambda msg, _fds: None)
    try:
        conn._sock.send(encode({"op": "info", "id": 1000}))
        server.join(TIMEOUT)
        assert conn.drain() is False
    finally:
        conn.close()


def test_close_releases_a_reply_left_on_its_way_out_and_the_socket(
        host: SimHost, guest: Domain) -> None:
    """A Ctrl-C as call() lets go of the lock, with a reply no apply took
    (a port and its read end), then close(): the read end is closed, and
    so is the connection's socket, while the handle is still referenced."""
    with host.dom0.evtchn() as e0:
        conn = e0._conn
        for k in itertools.count():
            fds = descriptors()
            assert interrupted_as_call_returns(
                ServiceConnection.call.__code__, k,
                lambda: conn.call("evtchn_alloc_unbound", domid=guest.domid)), "never left"
            if conn._delivering:
                break
            assert eventually(lambda: conn.drain() and not conn._unanswered)
        conn.close()
        assert conn.fileno() == -1  # the socket closed
        assert eventually(lambda: descriptors() <= fds), sorted(descriptors() - fds)


def test_the_wake_up_requests_reply_is_known_and_dropped_quietly(
        guest: Domain, caplog: pytest.LogCaptureFixture) -> None:
    """The request a drain cut short makes to wake the handle's waiters:
    its reply makes the socket readable, and the drain it wakes drops it
    as the reply to a request of ours, not as a stray reply (a warning
    that the service is confused)."""
    with guest.evtchn() as e1:
        conn = e1._conn
        with conn._lock:
            # A push a Ctrl-C left in the inbox (for no port of ours).
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with a, b:
                send_message(a, {"event": "unbound", "port": 4000})
                conn._inbox.append(b.recvmsg(MAX_MESSAGE + 1, 1024))
            conn._cut_short()
        with caplog.at_level("WARNING", logger="xenback.sim._proto"):
            assert select.select([conn], [], [], TIMEOUT)[0] == [conn]
            assert eventually(lambda: conn.drain() and not conn._unanswered and not conn._inbox)
        assert not [r for r in caplog.records if "no request" in r.getMessage()]


def test_a_drain_cut_short_without_an_owner_of_pushes_asks_nothing(tmp_path: Path) -> None:
    """A connection nobody watches for pushes (a grant handle's) with a
    packet a Ctrl-C left in its inbox: no thread waits on its socket, and
    the next call or drain takes the packet, so _cut_short sends no
    wake-up request (which would stay unanswered, its reply unread)."""
    path = str(tmp_path / "hypervisor")
    got: list[bytes] = []
    done = threading.Event()

    def handle(conn: socket.socket) -> None:
        try:
            while data := conn.recv(MAX_MESSAGE):
                got.append(data)
        finally:
            done.set()

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, PlatformError)  # no on_push
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            send_message(a, {"event": "unbound", "port": 1})
            left = b.recvmsg(MAX_MESSAGE + 1, 1024)
        with conn._lock:
            conn._inbox.append(left)  # a packet a Ctrl-C left there
            conn._cut_short()
        assert not conn._unanswered
    finally:
        conn.close()
        assert done.wait(TIMEOUT)
        server.join(TIMEOUT)
    assert got == []


@pytest.mark.parametrize("bad", ["closed", "too-many"])
def test_a_request_whose_descriptors_the_kernel_refuses_fails_with_its_errno(
        tmp_path: Path, bad: str) -> None:
    """A request carrying a descriptor that is not open (EBADF), or more
    than a packet may carry (EINVAL): the send fails for the caller's
    descriptors, not for the connection, which still serves the next call.
    It failed ENODEV, saying that the hypervisor had closed the connection."""
    path = str(tmp_path / "hypervisor")

    def handle(conn: socket.socket) -> None:
        while data := conn.recv(MAX_MESSAGE):
            send_message(conn, {"id": json.loads(data)["id"], "domid": 0})

    server = serve_one_client(path, handle, socket.SOCK_SEQPACKET)
    conn = ServiceConnection(path, PlatformError)
    r, w = os.pipe()
    os.close(r)
    try:
        fds, err = ([r], errno.EBADF) if bad == "closed" else ([w] * 254, errno.EINVAL)
        with pytest.raises(PlatformError) as info:
            conn.call("info", fds)
        assert info.value.errno == err, info.value
        assert not conn._unanswered, conn._unanswered
        assert conn.call("info")[0]["domid"] == 0
    finally:
        conn.close()
        os.close(w)
        server.join(TIMEOUT)


def test_a_call_after_close_is_enodev(
        service: Callable[[Callable[[socket.socket], None]], str]) -> None:
    """The socket closed by close(): the send fails (EBADF, as Python
    says of a closed socket), which is the connection's end, not the
    caller's descriptors."""
    r, w = os.pipe()
    conn = ServiceConnection(service(lambda _conn: None), PlatformError)
    conn.close()
    try:
        for fds in ([], [w]):
            with pytest.raises(PlatformError) as info:
                conn.call("info", fds)
            assert info.value.errno == errno.ENODEV, (fds, info.value)
    finally:
        os.close(r)
        os.close(w)
