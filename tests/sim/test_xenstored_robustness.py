"""Hostile and careless clients: bad input, clients that do not read, many
clients at once.  The server must answer with an error or close that one
connection, never crash, and keep serving everybody else."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import heapq
import itertools
import logging
import math
import os
import select
import selectors
import socket
import struct
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hosthelpers import (
    error_of,
    eventually,
    make_guest,
    refused_as_not_running,
    serve_one_client,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenback.sim._xenstored import Op, Quota, RawClient, XenStored, XsError, _server
from xenback.sim._xenstored._connection import Connection, Domain, WaitingEvent
from xenback.sim._xenstored._ops import Dispatcher

HEADER = struct.Struct("<IIII")


@pytest.fixture(scope="module")
def shared_xsd() -> Iterator[XenStored]:
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as server:
        yield server


@pytest.fixture
def logged_errors(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """What the server has logged at ERROR so far: the bugs it met and
    contained (the tests that make one check it left this trace, no more)."""
    caplog.set_level(logging.WARNING, logger="xenback.sim._xenstored")
    return lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
def no_internal_errors(
        request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.WARNING, logger="xenback.sim._xenstored")
    yield
    # Torn down before the test's server (asked for after it): stopped here
    # first (stop() is idempotent), what it logs in stopping counts too.
    server = request.node.funcargs.get("xsd")
    if server is not None:
        server.stop()
    # caplog.records holds the running phase's alone: here, the teardown's.
    bad = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)
           if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Read until EOF (True) or until nothing arrives for ``timeout`` (False)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def read_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection; fails if
    it keeps the connection open for ``timeout`` without a word."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # closed with some of our bytes unread: closed all the same
    except TimeoutError:
        pytest.fail(f"the server neither closed the connection nor said more than {data!r}")
    return data


def check_alive(xsd: XenStored, marker: str = "alive") -> None:
    with RawClient(xsd.path) as c:
        c.write("/health", marker)
        assert c.read("/health") == marker.encode()


# --- malformed input --------------------------------------------------------------


def test_oversized_header_closes_only_that_connection(
    xsd: XenStored, no_internal_errors: None
) -> None:
    with RawClient(xsd.path) as good, socket.socket(socket.AF_UNIX) as bad:
        bad.connect(str(xsd.path))
        bad.sendall(HEADER.pack(Op.READ, 1, 0, 4097))
        assert closed_by_server(bad)
        good.write("/still", "here")
        assert good.read("/still") == b"here"


def test_payload_of_exactly_4096_is_accepted(xsd: XenStored) -> None:
    with RawClient(xsd.path) as c:
        path = b"/p\0"
        value = b"v" * (4096 - len(path))
        c.request(Op.WRITE, path + value)
        assert c.read("/p") == value


def test_truncated_packet_does_not_block_others(xsd: XenStored, no_internal_errors: None) -> None:
    with RawClient(xsd.path) as good, RawClient(xsd.path) as slow:
        packet = HEADER.pack(Op.READ, 9, 0, 3) + b"/x\0"
        slow.send_raw(packet[:10])  # half a header
        good.write("/x", "1")
        slow.send_raw(packet[10:18])  # rest of the header, part of the payload
        assert good.read("/x") == b"1"
        slow.send_raw(packet[18:])
        assert slow.recv_message() == (Op.READ, 9, 0, b"1")


def test_truncated_packet_then_close(xsd: XenStored, no_internal_errors: None) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(xsd.path))
        s.sendall(HEADER.pack(Op.WRITE, 1, 0, 100) + b"/abc\0partial")
        # Close our side for writing only, so that we still see the server's
        # answer: no reply to the half request, and the connection closed.
        s.shutdown(socket.SHUT_WR)
        assert read_to_eof(s) == b""
    check_alive(xsd)
    with RawClient(xsd.path) as c:
        assert error_of(c.read, "/abc") == "ENOENT"  # the half write was not done


def test_a_client_that_stopped_writing_gets_every_reply_before_eof(xsd: XenStored) -> None:
    # shutdown(SHUT_WR) after its requests: the replies the kernel has not
    # taken yet when the server reads the EOF still go, and then the
    # connection closes.  (A small send buffer, as for a client that reads
    # slowly: its replies wait in the server.)  They were dropped with it.
    n = 40  # 160 KiB of replies: the client is paused on the way, too
    with RawClient(xsd.path) as c:
        c.write("/big", b"b" * 4000)
        (conn,) = xsd._call(lambda: list(xsd._dispatcher.dom0.conns))
        xsd._call(lambda: conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096))
        c.send_raw(b"".join(HEADER.pack(Op.READ, i, 0, 5) + b"/big\0" for i in range(n)))
        c.sock.shutdown(socket.SHUT_WR)
        for i in range(n):
            assert c.recv_message() == (Op.READ, i, 0, b"b" * 4000)
        with pytest.raises(ConnectionError):
            c.recv_message()
    assert xsd._call(lambda: (conn.closed, len(xsd._conns))) == (True, 0)


def test_a_client_that_stopped_writing_is_read_no_more(xsd: XenStored) -> None:
    # Its EOF read, with replies waiting that it has not read yet: the
    # server waits only to write (its socket stays readable, at EOF:
    # watching that would spin the loop until the client reads).
    n = 10  # 40 KiB of replies: fewer than pause the client
    with RawClient(xsd.path) as c:
        c.write("/big", b"b" * 4000)
        (conn,) = xsd._call(lambda: list(xsd._dispatcher.dom0.conns))
        xsd._call(lambda: conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096))
        c.send_raw(b"".join(HEADER.pack(Op.READ, i, 0, 5) + b"/big\0" for i in range(n)))
        c.sock.shutdown(socket.SHUT_WR)
        assert eventually(
            lambda: xsd._call(lambda: (conn.eof, conn.events)) == (True, selectors.EVENT_WRITE))

        def flush_unwritable() -> tuple[bool, int]:
            # A flush the kernel takes nothing of (the client reads none
            # yet): still only waiting to write, not to read the EOF again.
            real = conn.sock
            conn.sock = cast(socket.socket, _Unwritable(real))
            try:
                xsd._flush(conn)
                return conn.closed, conn.events
            finally:
                conn.sock = real

        assert xsd._call(flush_unwritable) == (False, selectors.EVENT_WRITE)
        for i in range(n):
            assert c.recv_message() == (Op.READ, i, 0, b"b" * 4000)
        with pytest.raises(ConnectionError):
            c.recv_message()


def test_byte_at_a_time_and_pipelined(xsd: XenStored) -> None:
    with RawClient(xsd.path) as c:
        packets = b"".join(
            HEADER.pack(Op.WRITE, i, 0, 8) + f"/pl{i}\0v".encode().ljust(8, b"x")
            for i in range(1, 6)
        )
        for i in range(len(packets)):
            c.send_raw(packets[i : i + 1])
        assert [c.recv_message()[1] for _ in range(5)] == [1, 2, 3, 4, 5]
        many = b"".join(HEADER.pack(Op.READ, i, 0, 2) + b"/\0" for i in range(1000))
        c.send_raw(many)
        assert [c.recv_message()[1] for _ in range(1000)] == list(range(1000))


def test_the_raw_client_waits_for_the_reply_to_its_own_request(xsd: XenStored) -> None:
    # A reply to an earlier request is passed over, not taken for it.
    with RawClient(xsd.path) as c:
        c.write("/a", "A")
        c.write("/b", "B")
        c.send(Op.READ, b"/a\0")
        rid = c.send(Op.READ, b"/b\0")
        assert c.reply(rid) == (Op.READ, 0, b"B")


def test_the_raw_client_refuses_a_reply_of_another_type(short_tmp: Path) -> None:
    # A server answering a READ with anything but a READ or an ERROR is
    # out of step with its client, whose tests must not take it for data.
    path = str(short_tmp / "xs")

    def answer_as_a_write(conn: socket.socket) -> None:
        with conn.makefile("rb") as stream:
            _op, req_id, tx_id, length = HEADER.unpack(stream.read(HEADER.size))
            stream.read(length)
        conn.sendall(HEADER.pack(Op.WRITE, req_id, tx_id, 3) + b"OK\0")

    server = serve_one_client(path, answer_as_a_write)
    with RawClient(path) as c, pytest.raises(ConnectionError, match="reply of type 11"):
        c.read("/x")
    server.join(10)
    assert not server.is_alive()


def test_the_raw_client_waiting_for_an_event_refuses_a_reply(xsd: XenStored) -> None:
    # A reply nobody waits for is a test out of step, not to be passed over.
    with RawClient(xsd.path) as c:
        c.send(Op.READ, b"/\0")
        with pytest.raises(ConnectionError, match="unexpected message of type 2"):
            c.wait_event()


def test_the_raw_client_refuses_a_watch_event_without_a_token(short_tmp: Path) -> None:
    path = str(short_tmp / "xs")

    def send_a_bad_event(conn: socket.socket) -> None:
        conn.sendall(HEADER.pack(Op.WATCH_EVENT, 0, 0, 3) + b"/x\0")

    server = serve_one_client(path, send_a_bad_event)
    with RawClient(path) as c, pytest.raises(ConnectionError, match="malformed watch event"):
        c.wait_event()
    server.join(10)
    assert not server.is_alive()


def test_garbage_gets_errors_or_a_closed_connection(
    xsd: XenStored, no_internal_errors: None
) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(xsd.path))
        s.sendall(bytes(range(256)) * 4)
        # Its first header announces 0x0f0e0d0c bytes of payload: the stream
        # is out of sync for good, and the server hangs up without a reply.
        assert read_to_eof(s) == b""
    check_alive(xsd)


def test_non_ascii_and_binary_arguments(xsd: XenStored) -> None:
    with RawClient(xsd.path) as c:
        for payload in (b"\xff\xfe\0", b"/a\xff\0", b"/\x00\x00", b"\0"):
            with pytest.raises(XsError) as info:
                c.request(Op.READ, payload)
            assert info.value.name == "EINVAL"
        with pytest.raises(XsError):
            c.request(Op.WATCH, b"/\xff\0t\0")
        c.request(Op.WRITE, b"/bin\0\xff\x00\x01")  # values are bytes
        assert c.read("/bin") == b"\xff\x00\x01"


# --- a fuzzer next to a well-behaved client -------------------------------------------

VALID = [
    (Op.READ, b"/fz\0"),
    (Op.WRITE, b"/fz/a\0value"),
    (Op.MKDIR, b"fz/rel\0"),
    (Op.RM, b"/fz/a\0"),
    (Op.DIRECTORY, b"/fz\0"),
    (Op.DIRECTORY_PART, b"/fz\0" b"0\0"),
    (Op.GET_PERMS, b"@releaseDomain\0"),
    (Op.SET_PERMS, b"/fz\0b0\0r1\0"),
    (Op.WATCH, b"/fz\0tok\0"),
    (Op.UNWATCH, b"/fz\0tok\0"),
    (Op.TRANSACTION_START, b"\0"),
    (Op.TRANSACTION_END, b"T\0"),
    (Op.GET_DOMAIN_PATH, b"3\0"),
    (Op.IS_DOMAIN_INTRODUCED, b"3\0"),
    (Op.INTRODUCE, b"3\0" b"0\0" b"1\0"),
    (Op.RELEASE, b"3\0"),
    (Op.RESUME, b"3\0"),
    (Op.SET_TARGET, b"3\0" b"0\0"),
    (Op.RESET_WATCHES, b""),
    (Op.CONTROL, b"check\0"),
]


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    op, payload = draw(st.sampled_from(VALID))
    kind = draw(st.sampled_from(["valid", "mutated", "random"]))
    if kind == "random":
        return draw(st.binary(min_size=0, max_size=64))
    tx_id = draw(st.sampled_from([0, 0, 1, 2, 0xFFFFFFFF]))
    if kind == "mutated":
        data = bytearray(payload)
        for _ in range(draw(st.integers(1, 4))):
            action = draw(st.sampled_from(["flip", "cut", "insert", "op"]))
            if action == "flip" and data:
                i = draw(st.integers(0, len(data) - 1))
                data[i] = draw(st.integers(0, 255))
            elif action == "cut" and data:
                del data[draw(st.integers(0, len(data) - 1)) :]
            elif action == "insert":
                i = draw(st.integers(0, len(data)))
                data[i:i] = draw(st.binary(min_size=1, max_size=8))
            elif action == "op":
                op = draw(st.integers(0, 40))
        payload = bytes(data)
    length = len(payload)
    if draw(st.booleans()) and kind == "mutated":
        length = draw(st.sampled_from([0, len(payload) + 1, 4096, 4097, 0xFFFFFFFF]))
    return HEADER.pack(op, 1, tx_id, length) + payload


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(stream=st.lists(packets(), min_size=1, max_size=6), as_guest=st.booleans())
def test_fuzzed_packets_never_hurt_other_clients(
    shared_xsd: XenStored, caplog: pytest.LogCaptureFixture, stream: list[bytes], as_guest: bool
) -> None:
    xsd = shared_xsd
    # Bad input gets errors, never the "internal error" of a server bug.
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="xenback.sim._xenstored")
    # The attacker is dom0 or an unprivileged guest (re-introduced if an
    # earlier example released it).
    target = xsd.introduce_domain(7) if as_guest else xsd.path
    with RawClient(xsd.path) as good, socket.socket(socket.AF_UNIX) as bad:
        bad.connect(str(target))
        try:
            bad.sendall(b"".join(stream))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already gave up on it: fine
        # The well-behaved client is served, with exact answers.
        good.write("/fz-good", "ok")
        assert good.read("/fz-good") == b"ok"
        bad.shutdown(socket.SHUT_WR)
        # The bad connection ends: it gets replies, then EOF (its own close
        # when we shut down writing is not visible to it, so read what is
        # there without waiting long).
        bad.settimeout(0.2)
        try:
            while bad.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    assert xsd._thread is not None and xsd._thread.is_alive()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --- clients that do not read -----------------------------------------------------------


def test_client_that_shut_its_reading_side_is_dropped(
        xsd: XenStored, no_internal_errors: None, caplog: pytest.LogCaptureFixture) -> None:
    """A client that will never read again (shutdown(SHUT_RD)) but sends a
    request: the reply cannot be sent (EPIPE), and the server drops that
    connection, with its watch, and serves everybody else."""
    caplog.set_level(logging.DEBUG, logger="xenback.sim._xenstored")
    with RawClient(xsd.path) as watcher, RawClient(xsd.path) as other:
        watcher.watch("/w", "tok")
        assert watcher.recv_message()[0] == Op.WATCH_EVENT  # the first event
        watcher.sock.shutdown(socket.SHUT_RD)
        watcher.send_raw(HEADER.pack(Op.READ, 1, 0, 7) + b"/local\0")
        assert eventually(lambda: any(
            "send: [Errno 32]" in r.getMessage() for r in caplog.records), 10.0)
        # Its watch went with it: a change under /w is sent to nobody, and
        # the server is not hurt by that either.
        other.write("/w/x", "1")
        assert other.read("/w/x") == b"1"
        with pytest.raises(OSError):
            for _ in range(100):  # the server closed its end: sending fails
                watcher.send_raw(HEADER.pack(Op.READ, 2, 0, 7) + b"/local\0")
    check_alive(xsd)


def _fill_socket_buffers(sock: socket.socket) -> int:
    """Bytes the kernel may hold on the way to ``sock`` (its receive buffer,
    the same again for the server's send buffer), plus a margin."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return 2 * sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) + (1 << 20)


def _server_conn(xsd: XenStored, domid: int) -> Connection:
    """The server's end of the one connection ``domid`` has."""
    (conn,) = xsd._call(lambda: list(xsd._dispatcher.domains[domid].conns))
    return conn


def _send_writes(guest: RawClient, writes: int) -> threading.Thread:
    """A thread sending ``writes`` WRITE requests of ``guest`` (to n0, n1,
    ... under its home), pipelined: it ends once the server took them all,
    whatever it answered."""
    requests = b"".join(
        HEADER.pack(Op.WRITE, i, 0, len(f"n{i}\0")) + f"n{i}\0".encode()
        for i in range(writes)
    )
    sender = threading.Thread(target=guest.send_raw, args=(requests,), daemon=True)
    sender.start()
    return sender


def test_guest_events_for_dom0_hold_the_guest_back_not_cut_dom0(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A guest writing node after node that dom0 watches, faster than dom0
    # reads the events: as cxenstored, where a request stays "outstanding"
    # until the events it caused are delivered, the guest's further
    # requests wait.  Dom0 is never cut off for it, loses no event, and
    # what waits for it stays bounded, however much the guest sends.
    caplog.set_level(logging.DEBUG, logger="xenback.sim._xenstored")
    token = "t" * 3000  # ~3 KiB per event
    quota = Quota(nodes=1 << 20, node_size=1 << 20)  # room for the writes
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), max_queued=_server.MIN_QUEUED, quota=quota
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest:
        dom0.watch("/local/domain/1", token)
        assert dom0.wait_event() == ("/local/domain/1", token)
        writes = 2 * (_server.MIN_QUEUED + _fill_socket_buffers(dom0.sock)) // 3000
        backend = _server_conn(xsd, 0)
        guest_conn = _server_conn(xsd, 1)
        sender = _send_writes(guest, writes)
        assert eventually(lambda: xsd._call(lambda: backend.closed or guest_conn.paused), 60)
        assert not backend.closed, "dom0 was cut off"
        event_size = HEADER.size + len(f"/local/domain/1/n{writes}") + 1 + len(token) + 1
        waiting = xsd._call(lambda: len(backend.out))
        assert waiting <= (quota.outstanding + 1) * event_size
        # Dom0 reads: every event reaches it, in order, and the guest goes on.
        for i in range(writes):
            assert dom0.wait_event() == (f"/local/domain/1/n{i}", token)
        sender.join(timeout=30)
        assert not sender.is_alive()
        for i in range(writes):
            assert guest.recv_message() == (Op.WRITE, i, 0, b"OK\0")
        assert dom0.read("/local/domain/1/n0") == b""
        # All read, so nothing is charged any more.
        domain = xsd._dispatcher.domains[1]
        assert xsd._call(
            lambda: (domain.outstanding, domain.queued, len(backend.waiting))) == (0, 0, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_guest_held_back_for_a_watcher_goes_on_when_it_closes() -> None:
    # The events the guest is charged for go with the connection they
    # waited for: closing it lets the guest go on at once.
    token = "t" * 3000
    quota = Quota(nodes=1 << 20, node_size=1 << 20)
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), max_queued=_server.MIN_QUEUED, quota=quota
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest:
        with RawClient(xsd.path) as backend:
            backend.watch("/local/domain/1", token)
            assert backend.wait_event() == ("/local/domain/1", token)
            writes = 2 * (_server.MIN_QUEUED + _fill_socket_buffers(backend.sock)) // 3000
            guest_conn = _server_conn(xsd, 1)
            sender = _send_writes(guest, writes)
            assert eventually(lambda: xsd._call(lambda: guest_conn.paused), 60)
        for i in range(writes):
            assert guest.recv_message() == (Op.WRITE, i, 0, b"OK\0")
        sender.join(timeout=30)
        assert not sender.is_alive()
        assert xsd._call(lambda: guest_conn.domain.outstanding) == 0


def test_dom0_not_reading_events_dom0_caused_is_not_cut() -> None:
    # Dom0 is trusted, and cxenstored lets its queue grow: a privileged
    # watcher loses neither its connection nor an event, whatever waits.
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), max_queued=_server.MIN_QUEUED
    ) as xsd:
        with RawClient(xsd.path) as deaf, RawClient(xsd.path) as writer:
            deaf.watch("/w", "tok")
            assert deaf.wait_event() == ("/w", "tok")
            path = "/w/" + "/".join(["n" * 60] * 33)  # ~2 KiB per event
            writes = 2 * (_server.MIN_QUEUED + _fill_socket_buffers(deaf.sock)) // 2000
            for i in range(writes):
                writer.write(f"{path}/{i}", "")
            # Nobody is charged for them and none goes stale: none is
            # kept a record of, however many wait.
            (conn,) = [c for c in xsd._call(lambda: list(xsd._dispatcher.dom0.conns))
                       if c.watches]
            assert xsd._call(lambda: (len(conn.out) > 0, len(conn.waiting))) == (True, 0)
            for i in range(writes):
                assert deaf.wait_event() == (f"{path}/{i}", "tok")


# --- guests held back for dom0 (Quota.outstanding) ------------------------------------

_LIMIT = 3  # Quota.outstanding in these tests
_PAD = "/".join(["p" * 60] * 30)  # ~2 KiB per event


@dataclasses.dataclass
class _Backlog:
    """A server, dom0, guest 1 and a backend (dom0) watching the guest's
    home with events waiting for it in the server."""

    xsd: XenStored
    dom0: RawClient
    guest: RawClient
    backend: RawClient

    def guest_conns(self) -> list[Connection]:
        return self.xsd._call(lambda: sorted(self.xsd._dispatcher.domains[1].conns,
                                             key=lambda c: int(c.name[1:])))

    def read_events_until(self, path: str) -> None:
        """The backend reads its events, up to the one naming ``path``."""
        while self.backend.wait_event()[0] != path:
            pass

    def charges(self) -> tuple[int, int, int]:
        """What is still charged: domain 1's events and bytes, dom0's bytes."""
        def get() -> tuple[int, int, int]:
            guest = self.xsd._dispatcher.domains[1]
            return guest.outstanding, guest.queued, self.xsd._dispatcher.dom0.queued
        return self.xsd._call(get)


def _fill(xsd: XenStored, writer: RawClient, watcher: Connection, under: str) -> None:
    """Make events wait in the server for ``watcher`` (watching ``under``,
    not reading, with a small receive buffer): ``writer`` writes nodes
    below ``under`` until the kernel holds no more."""
    for i in itertools.count():
        if xsd._call(lambda: len(watcher.out)):
            return
        writer.write(f"{under}/pad{i}/{_PAD}", "")


def _backed_up(xsd: XenStored, dom0: RawClient, backend: RawClient, under: str) -> Connection:
    """Make ``backend`` (a dom0 client) watch ``under`` and stop reading
    with its events waiting in the server (see :func:`_fill`); its
    connection in the server."""
    backend.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    backend.watch(under, "be")
    assert backend.wait_event() == (under, "be")
    (conn,) = [c for c in xsd._call(lambda: list(xsd._dispatcher.dom0.conns)) if c.watches]
    _fill(xsd, dom0, conn, under)
    return conn


@contextlib.contextmanager
def _dom0_backlog(watch_event_timeout: float = 20.0) -> Iterator[_Backlog]:
    """A guest whose every event for dom0 waits, held by dom0's own events:
    a backend watching the guest's home that has not read what dom0's
    writes there sent it, more than the kernel holds."""
    quota = Quota(outstanding=_LIMIT, nodes=1 << 20, node_size=1 << 20)
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), quota=quota, watch_event_timeout=watch_event_timeout
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest, RawClient(
        xsd.path
    ) as backend:
        _backed_up(xsd, dom0, backend, "/local/domain/1")
        yield _Backlog(xsd, dom0, guest, backend)


def _write(i: int, name: str = "g") -> bytes:
    """A WRITE request (id 1000 + i) of node ``name``<i> in domain 1's home."""
    path = f"/local/domain/1/{name}{i}\0".encode()
    return HEADER.pack(Op.WRITE, 1000 + i, 0, len(path)) + path


def test_a_guest_is_held_back_once_its_quota_of_events_waits_for_dom0() -> None:
    # The request that brings the count to the quota is served, the next
    # waits (in the kernel, not in the server: the connection is out of
    # the selector) until the backend reads, and then nothing is charged.
    with _dom0_backlog() as b:
        b.guest.send_raw(b"".join(_write(i) for i in range(_LIMIT + 1)))
        for i in range(_LIMIT):
            assert b.guest.recv_message()[:2] == (Op.WRITE, 1000 + i)
        (conn,) = b.guest_conns()
        assert eventually(lambda: b.xsd._call(lambda: (conn.paused, conn.events)) == (True, 0))
        assert b.xsd._call(lambda: (conn.domain.outstanding, conn.inbuf)) == (
            _LIMIT, _write(_LIMIT))
        b.read_events_until(f"/local/domain/1/g{_LIMIT}")
        assert b.guest.recv_message()[:2] == (Op.WRITE, 1000 + _LIMIT)
        assert eventually(lambda: b.charges() == (0, 0, 0)), b.charges()


def test_every_connection_of_a_held_back_guest_goes_on() -> None:
    with _dom0_backlog() as b, RawClient(b.xsd.introduce_path(1)) as other:
        other.read("/local/domain/1")  # accepted
        b.guest.send_raw(b"".join(_write(i) for i in range(_LIMIT + 2)))
        first, second = b.guest_conns()
        assert eventually(lambda: b.xsd._call(lambda: first.paused))
        other.send_raw(_write(50, "h"))
        # Out of the selector too: its requests wait in the kernel, not
        # read into the server over and over.
        assert eventually(lambda: b.xsd._call(lambda: (second.paused, second.events)) == (True, 0))
        b.read_events_until("/local/domain/1/h50")
        for i in range(_LIMIT + 2):
            assert b.guest.recv_message()[:2] == (Op.WRITE, 1000 + i)
        assert other.recv_message()[:2] == (Op.WRITE, 1050)
        assert eventually(lambda: b.charges() == (0, 0, 0)), b.charges()


@pytest.mark.parametrize("first", ["guest reads", "backend reads"])
def test_a_guest_held_back_with_replies_waiting_goes_on(first: str) -> None:
    # One connection paused for its replies (PAUSE_OUTPUT) and the guest
    # held back for the backend: it goes on once both have read, in
    # either order.
    with _dom0_backlog() as b, RawClient(b.xsd.introduce_path(1)) as reader:
        reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        b.dom0.write("/local/domain/1/big", "x" * 1500)
        reads = 2 * (_server.PAUSE_OUTPUT + (1 << 20)) // 1500
        request = HEADER.pack(Op.READ, 0, 0, 20) + b"/local/domain/1/big\0"
        reader.read("/local/domain/1")  # accepted
        _guest_conn, conn = b.guest_conns()
        sender = threading.Thread(target=reader.send_raw,
                                  args=(request * reads + _write(99),), daemon=True)
        sender.start()
        assert eventually(lambda: b.xsd._call(lambda: conn.paused), 30)
        b.guest.send_raw(b"".join(_write(i) for i in range(_LIMIT + 1)))
        assert eventually(lambda: b.xsd._call(lambda: conn.domain.outstanding) >= _LIMIT)
        done = 0
        if first == "guest reads":
            # All its replies are sent, but it stays held back.
            assert eventually(lambda: b.xsd._call(lambda: len(conn.out)) > 0)
            while b.xsd._call(lambda: (len(conn.out), conn.events)) != (0, 0):
                assert reader.recv_message()[:2] == (Op.READ, 0)
                done += 1
            assert b.xsd._call(lambda: conn.paused)
        b.read_events_until(f"/local/domain/1/g{_LIMIT - 1}")
        for _ in range(done, reads):
            assert reader.recv_message()[:2] == (Op.READ, 0)
        assert reader.recv_message()[:2] == (Op.WRITE, 1099)
        sender.join(timeout=30)
        assert not sender.is_alive()
        b.read_events_until("/local/domain/1/g99")
        assert eventually(lambda: b.charges() == (0, 0, 0)), b.charges()


def test_an_event_for_dom0_dropped_as_a_duplicate_is_not_charged() -> None:
    # The backend gets nothing more for it, so it holds nobody back: a
    # guest rewriting one node goes on however slow the backend is.
    with _dom0_backlog() as b:
        for i in range(_LIMIT + 2):
            b.guest.write("/local/domain/1/state", str(i))
        assert b.charges()[0] == 1
        b.read_events_until("/local/domain/1/state")
        assert eventually(lambda: b.charges() == (0, 0, 0)), b.charges()


@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_a_held_back_connection_whose_client_left_is_closed_at_once(how: str) -> None:
    # Held back, its requests stay unread, yet its hang-up is noticed while
    # the backend still reads nothing: its watches and transaction go at
    # once.  The events it caused still wait for the backend, charged to
    # the guest until read, and its requests left unread are not served.
    with _dom0_backlog() as b:
        domain = b.xsd._dispatcher.domains[1]
        leaving = RawClient(b.xsd.introduce_path(1))
        with contextlib.closing(leaving):
            leaving.watch("/local/domain/1/data", "mine")
            assert leaving.wait_event() == ("/local/domain/1/data", "mine")
            leaving.transaction_start()
            _guest_conn, conn = b.guest_conns()
            leaving.send_raw(b"".join(_write(i) for i in range(_LIMIT + 2)))
            assert eventually(lambda: b.xsd._call(lambda: (conn.paused, conn.events)) == (True, 0))
            if how == "shutdown":
                leaving.sock.shutdown(socket.SHUT_RDWR)
        assert eventually(lambda: b.xsd._call(lambda: conn.closed))
        assert b.xsd._call(lambda: (domain.nwatches, domain.ntransactions, domain.outstanding)) == (
            0, 0, _LIMIT)
        b.read_events_until(f"/local/domain/1/g{_LIMIT - 1}")
        assert eventually(lambda: b.charges() == (0, 0, 0)), b.charges()
        assert b.dom0.request(Op.DIRECTORY, b"/local/domain/1\0").count(b"g") == _LIMIT


def test_a_bug_met_unwatching_a_held_back_connection_still_closes_it(
    logged_errors: Callable[[], list[str]],
) -> None:
    # The epoll set of held-back connections refusing to let one go: its
    # socket is closed all the same (the kernel drops a closed descriptor
    # from epoll sets), and it is no longer among the held-back ones,
    # where a hang-up of the next socket given its number would find it.
    class BuggyHup:
        def __init__(self, hup: select.epoll) -> None:
            self.hup = hup

        def __getattr__(self, name: str) -> Any:
            return getattr(self.hup, name)

        def unregister(self, fd: int) -> None:
            raise RuntimeError("a bug unwatching a connection")

    with _dom0_backlog() as b:
        leaving = RawClient(b.xsd.introduce_path(1))
        with contextlib.closing(leaving):
            leaving.read("/local/domain/1")  # accepted
            _guest_conn, conn = b.guest_conns()
            leaving.send_raw(b"".join(_write(i) for i in range(_LIMIT + 2)))
            assert eventually(lambda: b.xsd._call(lambda: (conn.paused, conn.events)) == (True, 0))
            hup = b.xsd._hup
            assert hup is not None
            b.xsd._call(lambda: setattr(b.xsd, "_hup", BuggyHup(hup)))
        try:
            assert eventually(lambda: b.xsd._call(lambda: conn.closed))
            assert b.xsd._call(lambda: (dict(b.xsd._held), conn.sock.fileno(), conn in b.xsd._conns)
                               ) == ({}, -1, False)
        finally:
            b.xsd._call(lambda: setattr(b.xsd, "_hup", hup))
        b.read_events_until(f"/local/domain/1/g{_LIMIT - 1}")
        assert eventually(lambda: b.charges() == (0, 0, 0)), b.charges()
    assert logged_errors() == [f"internal error closing {conn!r}"]


def test_a_held_back_client_that_only_stopped_writing_still_gets_its_replies() -> None:
    # shutdown(SHUT_WR) is no hang-up: the client may still read.  Its
    # requests sent before are served once the backend reads.
    with _dom0_backlog() as b, RawClient(b.xsd.introduce_path(1)) as half:
        half.read("/local/domain/1")  # accepted
        _guest_conn, conn = b.guest_conns()
        half.send_raw(b"".join(_write(i) for i in range(_LIMIT + 2)))
        assert eventually(lambda: b.xsd._call(lambda: (conn.paused, conn.events)) == (True, 0))
        half.sock.shutdown(socket.SHUT_WR)
        b.read_events_until(f"/local/domain/1/g{_LIMIT + 1}")
        for i in range(_LIMIT + 2):
            assert half.recv_message()[:2] == (Op.WRITE, 1000 + i)


def test_a_guest_released_while_held_back_leaves_nothing_charged() -> None:
    with _dom0_backlog() as b:
        b.guest.send_raw(b"".join(_write(i) for i in range(_LIMIT + 2)))
        (conn,) = b.guest_conns()
        assert eventually(lambda: b.xsd._call(lambda: (conn.paused, conn.events)) == (True, 0))
        assert b.xsd._call(lambda: conn.inbuf)  # the requests read, not served
        # Released while held back (the backend has read nothing yet): its
        # descriptor is no longer listened to for a hang-up, nor are its
        # requests kept.
        b.xsd.release_domain(1)
        assert b.xsd._call(lambda: (conn.closed, dict(b.xsd._held), conn.inbuf)) == (
            True, {}, b"")
        # A new watch's first event comes after all that waits.
        b.backend.watch("@releaseDomain", "gone")
        while b.backend.wait_event() != ("@releaseDomain", "gone"):
            pass
        domain, dom0 = conn.domain, b.xsd._dispatcher.dom0
        assert eventually(lambda: b.xsd._call(
            lambda: (domain.outstanding, domain.queued, dom0.queued)) == (0, 0, 0))


def test_a_guest_introduced_again_while_held_back_goes_on() -> None:
    # INTRODUCE resets the guest's connections (watches, transactions):
    # the events it caused still wait for the backend, and still hold it.
    with _dom0_backlog() as b:
        b.guest.send_raw(b"".join(_write(i) for i in range(_LIMIT + 2)))
        (conn,) = b.guest_conns()
        assert eventually(lambda: b.xsd._call(lambda: conn.paused))
        b.dom0.request(Op.INTRODUCE, b"1\0" b"4096\0" b"5\0")
        assert b.xsd._call(lambda: (conn.paused, conn.domain.outstanding)) == (True, _LIMIT)
        b.read_events_until(f"/local/domain/1/g{_LIMIT + 1}")
        for i in range(_LIMIT + 2):
            assert b.guest.recv_message()[:2] == (Op.WRITE, 1000 + i)
        assert eventually(lambda: b.charges() == (0, 0, 0)), b.charges()


def test_events_a_guests_transaction_fires_are_charged_to_it_once() -> None:
    # Fired by its TRANSACTION_END: that one request is outstanding until
    # the last of them is read, whichever connection they wait for.
    with _dom0_backlog() as b:
        (conn,) = b.guest_conns()
        for n in range(_LIMIT):
            tx = b.guest.transaction_start()
            for i in range(_LIMIT + 2):
                b.guest.write(f"/local/domain/1/t{n}-{i}", "", tx)
            b.guest.transaction_end(tx)
            assert b.xsd._call(lambda: conn.domain.outstanding) == n + 1
        rid = b.guest.send(Op.READ, b"/local/domain/1/t0-0\0")
        assert eventually(lambda: b.xsd._call(lambda: conn.paused))
        b.read_events_until(f"/local/domain/1/t0-{_LIMIT + 1}")
        assert b.guest.reply(rid) == (Op.READ, 0, b"")
        b.read_events_until(f"/local/domain/1/t{_LIMIT - 1}-{_LIMIT + 1}")
        assert eventually(lambda: b.charges() == (0, 0, 0)), b.charges()


def _write_at(path: str, i: int) -> bytes:
    """A WRITE request (id 1000 + i) of ``path``/g<i>."""
    node = f"{path}/g{i}\0".encode()
    return HEADER.pack(Op.WRITE, 1000 + i, 0, len(node)) + node


@contextlib.contextmanager
def _deaf_guest(
    watch_event_timeout: float, outstanding: int = _LIMIT
) -> Iterator[tuple[XenStored, RawClient, RawClient]]:
    """Guest 1 (the writer) owns /shared, which guest 2 (deaf) watches
    with events waiting for it in the server, more than the kernel holds."""
    quota = Quota(outstanding=outstanding, nodes=1 << 20, node_size=1 << 20)
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), quota=quota, watch_event_timeout=watch_event_timeout
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as writer, make_guest(
        xsd, dom0, 2
    ) as deaf:
        dom0.mkdir("/shared")
        dom0.set_perms("/shared", ["n1", "r2"])
        deaf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deaf.watch("/shared", "deaf")
        assert deaf.wait_event() == ("/shared", "deaf")
        _fill(xsd, dom0, _server_conn(xsd, 2), "/shared")
        yield xsd, writer, deaf


def test_one_request_firing_many_events_for_a_deaf_guest_is_charged_once() -> None:
    # As cxenstored, the charge is per request: a write that fires more
    # events than Quota.outstanding (one per watch of a guest that does
    # not read) is one request outstanding, not one per event, so the
    # writer is not held back after one write for watch_event_timeout.
    with _deaf_guest(60.0) as (xsd, writer, deaf), RawClient(xsd.path) as dom0:
        for i in range(_LIMIT + 2):
            deaf.watch("/shared/many", f"w{i}")
        conn = _server_conn(xsd, 2)
        _fill(xsd, dom0, conn, "/shared")  # what deaf read meanwhile
        writer_domain = xsd._dispatcher.domains[1]
        waiting = xsd._call(lambda: len(conn.waiting))
        writer.write("/shared/many", "")
        # One event per watch of deaf's on it (and one for its watch on /shared).
        assert xsd._call(lambda: (len(conn.waiting) - waiting, writer_domain.outstanding)) == (
            _LIMIT + 3, 1)
        # Held back only once _LIMIT requests are outstanding.
        writer.send_raw(b"".join(_write_at("/shared", i) for i in range(_LIMIT)))
        for i in range(_LIMIT - 1):
            assert writer.recv_message()[:2] == (Op.WRITE, 1000 + i)
        (writer_conn,) = xsd._call(lambda: list(writer_domain.conns))
        assert eventually(lambda: xsd._call(lambda: writer_conn.paused))
        assert xsd._call(lambda: writer_domain.outstanding) == _LIMIT


def test_a_request_is_charged_until_the_last_of_its_events_is_sent() -> None:
    # Its events for dom0 and for the deaf guest: those for dom0 read,
    # the request stays outstanding while the deaf guest's wait, and
    # is released once they go stale.
    with _deaf_guest(1.0) as (xsd, writer, _deaf), RawClient(xsd.path) as backend:
        backend.watch("/shared/both", "be")
        assert backend.wait_event() == ("/shared/both", "be")
        writer_domain = xsd._dispatcher.domains[1]
        writer.write("/shared/both", "")
        assert backend.wait_event() == ("/shared/both", "be")
        assert xsd._call(lambda: writer_domain.outstanding) == 1
        assert eventually(lambda: xsd._call(lambda: writer_domain.outstanding) == 0)


def test_a_guest_is_held_back_for_a_guest_that_does_not_read_until_its_events_go_stale() -> None:
    # As cxenstored: the writer is charged for the events waiting for
    # another guest too, and held back at its quota; the deaf guest cannot
    # stall it for good: unsent after watch_event_timeout, the events are
    # dropped, oldest first, and the writer goes on.
    timeout = 1.0
    with _deaf_guest(timeout) as (xsd, writer, deaf):
        writer_domain = xsd._dispatcher.domains[1]
        began = time.monotonic()
        writer.send_raw(b"".join(_write_at("/shared", i) for i in range(_LIMIT + 2)))
        for i in range(_LIMIT):
            assert writer.recv_message()[:2] == (Op.WRITE, 1000 + i)
        # Served only once an event of the first ones went stale.
        assert writer.recv_message()[:2] == (Op.WRITE, 1000 + _LIMIT)
        assert time.monotonic() - began >= timeout
        assert writer.recv_message()[:2] == (Op.WRITE, 1000 + _LIMIT + 1)
        # The deaf guest reads at last: whole events, the stale ones gone.
        rid = deaf.send(Op.READ, b"/shared/g0\0")
        assert deaf.reply(rid) == (Op.READ, 0, b"")
        got = [path for path, token in deaf.events if token == "deaf"]
        assert len(got) == len(deaf.events)
        assert "/shared/g0" not in got and "/shared/g1" not in got
        assert all(path.startswith(("/shared/pad", "/shared/g")) for path in got)
        assert eventually(lambda: xsd._call(
            lambda: (writer_domain.outstanding, xsd._dispatcher.domains[2].queued)) == (0, 0))


def test_stale_events_free_the_deaf_guests_share() -> None:
    # Nobody caused them but dom0, yet they go stale all the same and
    # leave nothing waiting, but for one the kernel took part of.
    with _deaf_guest(0.5) as (xsd, _writer, _deaf):
        conn = _server_conn(xsd, 2)
        # Many events wait, yet the server looks at the connection once.
        assert xsd._call(lambda: [c for _deadline, _seq, c in xsd._expiry]) == [conn]

        def begun_only() -> bool:
            return all(event.start < conn.out_base for event in conn.waiting)

        assert eventually(lambda: xsd._call(begun_only))
        waiting, queued, left = xsd._call(lambda: (list(conn.waiting), conn.domain.queued,
                                                   len(conn.out)))
        assert len(waiting) <= 1 and queued == left
        assert left <= sum(event.end - event.start for event in waiting)


def _begin_an_event(xsd: XenStored, writer: RawClient, deaf: RawClient) -> WaitingEvent:
    """Make the kernel take part of an event for ``deaf`` (from the
    _deaf_guest set-up), that ``writer`` caused: the server has more queued
    than one send takes, and ``deaf`` reads just enough for it to send."""
    conn = _server_conn(xsd, 2)
    for i in range(100):  # ~190 KB: more than the kernel takes at once
        writer.write(f"/shared/more{i}/{_PAD}", "")

    def begun() -> WaitingEvent | None:
        waiting = conn.waiting
        return waiting[0] if waiting and waiting[0].start < conn.out_base else None

    deaf.sock.setblocking(False)
    try:
        while (event := xsd._call(begun)) is None:
            try:
                deaf.sock.recv(4096)
            except BlockingIOError:
                time.sleep(0.005)
    finally:
        deaf.sock.settimeout(10.0)
    return event


def test_events_are_stale_at_their_deadline_not_only_after_it() -> None:
    # _expire_due looks at a connection once its entry's deadline is at
    # or before now: were an event not stale at exactly its deadline, the
    # entry would be armed again at it, due still, and the loop would go
    # round in _expire_due for good.  The one begun is found stale too.
    with _deaf_guest(60.0, outstanding=1000) as (xsd, writer, deaf):
        conn = _server_conn(xsd, 2)
        writer_domain = xsd._dispatcher.domains[1]
        begun = _begin_an_event(xsd, writer, deaf)

        def expire_at_the_deadline() -> tuple[list[WaitingEvent], float, int]:
            deadline = time.monotonic()
            for event in conn.waiting:
                event.deadline = deadline
            xsd._expire(conn, deadline)
            return list(conn.waiting), begun.deadline, writer_domain.outstanding

        assert xsd._call(expire_at_the_deadline) == ([begun], math.inf, 0)


def test_an_event_begun_keeps_going_but_later_ones_still_go_stale() -> None:
    # Once the kernel took part of the oldest event, it goes on whole;
    # events queued after it was found stale still go stale in turn (the
    # server once spun on them, serving nobody), and the writer is not
    # charged for good for the one begun.
    with _deaf_guest(2.0, outstanding=1000) as (xsd, writer, deaf):
        conn = _server_conn(xsd, 2)
        writer_domain = xsd._dispatcher.domains[1]
        begun = _begin_an_event(xsd, writer, deaf)
        assert begun.cause is not None and begun.cause.domain is writer_domain
        # Queued before the begun one goes stale (unless this machine is
        # very slow), so it is still fresh when that one is found stale.
        writer.write("/shared/late", "")
        assert eventually(lambda: xsd._call(lambda: list(conn.waiting) == [begun]), 10.0)
        assert xsd._call(lambda: writer_domain.outstanding) == 0
        # Queued once the begun one was found stale.
        writer.write("/shared/later", "")
        assert xsd._call(lambda: len(conn.waiting)) == 2
        assert eventually(lambda: xsd._call(lambda: list(conn.waiting) == [begun]), 10.0)
        assert writer.read("/shared/later") == b""
        assert xsd._call(lambda: (writer_domain.outstanding, conn.domain.queued,
                                  len(conn.out))) == (0, len(conn.out), begun.end - conn.out_base)
        # Its connection gone, the begun one is not uncharged twice.
        deaf.close()
        assert eventually(lambda: xsd._call(lambda: conn.closed))
        assert xsd._call(lambda: writer_domain.outstanding) == 0


def test_a_begun_event_nobody_is_charged_for_goes_stale_quietly(
    no_internal_errors: None,
) -> None:
    # dom0's doing, it counts no request: found stale, it goes on whole
    # all the same, with nothing to count down, and its connection too.
    with _deaf_guest(2.0) as (xsd, _writer, deaf), RawClient(xsd.path) as dom0:
        conn = _server_conn(xsd, 2)
        begun = _begin_an_event(xsd, dom0, deaf)
        assert begun.cause is None
        assert eventually(lambda: xsd._call(
            lambda: conn.closed or (list(conn.waiting), begun.deadline) == ([begun], math.inf)
        ), 10.0)
        assert not xsd._call(lambda: conn.closed)


def test_a_begun_event_found_stale_counts_its_request_down_once() -> None:
    # The request that fired the begun event also has one waiting for a
    # backend that does not read: found stale, the begun one counts the
    # request down; it must not again when it leaves with its connection,
    # or the request is no longer outstanding while its event for the
    # backend still waits.
    with _deaf_guest(2.0, outstanding=1000) as (xsd, writer, deaf), RawClient(
        xsd.path
    ) as dom0, RawClient(xsd.path) as backend:
        _backed_up(xsd, dom0, backend, "/shared")
        conn = _server_conn(xsd, 2)
        writer_domain = xsd._dispatcher.domains[1]
        begun = _begin_an_event(xsd, writer, deaf)
        assert begun.cause is not None and begun.cause.domain is writer_domain
        assert eventually(lambda: xsd._call(lambda: begun.deadline == math.inf), 10.0)
        before = xsd._call(lambda: writer_domain.outstanding)
        assert before > 0
        deaf.close()
        assert eventually(lambda: xsd._call(lambda: conn.closed))
        assert xsd._call(lambda: writer_domain.outstanding) == before


def test_an_event_dropped_as_stale_counts_its_request_down_once() -> None:
    # The request that fired it also has an event waiting for a backend
    # that does not read: dropped, the stale one counts the request down
    # once, and it stays outstanding until the backend reads its event.
    with _deaf_guest(0.5, outstanding=1000) as (xsd, writer, _deaf), RawClient(
        xsd.path
    ) as dom0, RawClient(xsd.path) as backend:
        _backed_up(xsd, dom0, backend, "/shared")
        conn = _server_conn(xsd, 2)
        writer_domain = xsd._dispatcher.domains[1]
        writer.write("/shared/both", "")
        assert xsd._call(lambda: writer_domain.outstanding) == 1
        assert eventually(lambda: xsd._call(
            lambda: all(e.start < conn.out_base for e in conn.waiting)), 10.0)
        assert xsd._call(lambda: writer_domain.outstanding) == 1
        while backend.wait_event() != ("/shared/both", "be"):
            pass
        assert eventually(lambda: xsd._call(lambda: writer_domain.outstanding) == 0)


def test_an_event_dropped_as_stale_does_not_hide_the_next_one_alike() -> None:
    # The stale event no longer waits: the same change again is news.
    with _deaf_guest(0.3) as (xsd, writer, _deaf):
        conn = _server_conn(xsd, 2)
        writer.write("/shared/again", "")
        assert eventually(lambda: xsd._call(lambda: not conn.waiting))
        writer.write("/shared/again", "")
        assert xsd._call(lambda: len(conn.waiting)) == 1


def test_a_deaf_guest_paused_for_its_replies_goes_on_once_its_events_go_stale() -> None:
    # Its own request waited for room in its output; the stale events made
    # room, so the request is served without the guest reading anything.
    with _deaf_guest(0.5) as (xsd, _writer, deaf):
        conn = _server_conn(xsd, 2)
        dom0 = RawClient(xsd.path)
        with contextlib.closing(dom0):
            for i in range(40):  # ~75 KB: over PAUSE_OUTPUT
                dom0.write(f"/shared/more{i}/{_PAD}", "")
            assert xsd._call(lambda: len(conn.out)) > _server.PAUSE_OUTPUT
            node = b"/local/domain/2/data/spoke\0"
            deaf.send_raw(HEADER.pack(Op.WRITE, 7, 0, len(node)) + node)
            assert eventually(lambda: xsd._call(lambda: conn.paused))

            def spoke() -> bool:
                try:
                    return dom0.read("/local/domain/2/data/spoke") == b""
                except XsError:
                    return False

            assert eventually(spoke)


def test_a_bug_met_expiring_events_costs_that_connection_only(
    monkeypatch: pytest.MonkeyPatch, logged_errors: Callable[[], list[str]],
) -> None:
    # As a bug met serving a client: the loop and the other guests' stale
    # events go on, and the connection the bug was met for is closed.
    expire = XenStored._expire

    def buggy(self: XenStored, conn: Connection, now: float) -> None:
        if conn.domid == 3:
            raise RuntimeError("a bug expiring events")
        expire(self, conn, now)

    monkeypatch.setattr(XenStored, "_expire", buggy)
    with _deaf_guest(0.5) as (xsd, writer, _deaf), RawClient(xsd.path) as dom0, make_guest(
        xsd, dom0, 3
    ) as buggy_guest:
        dom0.set_perms("/shared", ["n1", "r2", "r3"])
        buggy_guest.watch("/shared", "buggy")
        assert buggy_guest.wait_event() == ("/shared", "buggy")
        conn2, conn3 = _server_conn(xsd, 2), _server_conn(xsd, 3)
        writer.write("/shared/late", "")  # a fresh event for both

        def both_done() -> bool:
            return conn3.closed and all(e.start < conn2.out_base for e in conn2.waiting)

        assert eventually(lambda: xsd._call(both_done))
        assert xsd._thread is not None and xsd._thread.is_alive()
        check_alive(xsd)
        assert writer.read("/shared/late") == b""
        # The stale events of deaf still go, once it is over the bug.
        writer.write("/shared/later", "")
        assert eventually(lambda: xsd._call(
            lambda: all(e.start < conn2.out_base for e in conn2.waiting)))
        assert not xsd._call(lambda: conn2.closed)
    assert logged_errors() == [f"internal error expiring the events of {conn3!r}"]


def test_a_bug_met_expiring_events_leaves_no_request_outstanding(
    monkeypatch: pytest.MonkeyPatch, logged_errors: Callable[[], list[str]],
) -> None:
    # The bug is met once _expire has taken the stale events out of the
    # connection's waiting ones and dropped them (where it logs them): the
    # connection is closed, and the requests that caused them are counted
    # down all the same.  They once stayed outstanding for good, and the
    # writer held back with them.
    with _deaf_guest(0.5, outstanding=1) as (xsd, writer, _deaf):
        conn = _server_conn(xsd, 2)
        writer_domain = xsd._dispatcher.domains[1]
        # dom0's events for the deaf guest go stale first, as they should.
        assert eventually(lambda: xsd._call(
            lambda: all(e.start < conn.out_base for e in conn.waiting)), 10.0)

        logs = _server._log

        class Buggy:
            """The loop's logger, but for debug(), where it drops them."""

            def __getattr__(self, name: str) -> Any:
                return getattr(logs(), name)

            def debug(self, *_args: object, **_kwargs: object) -> None:
                raise RuntimeError("a bug dropping stale events")

        # The loop's logger keeps its records (see _server._say): made anew
        # for each record, so patched where it is made.
        monkeypatch.setattr(_server, "_log", Buggy)
        # The first write's event waits, for the deaf guest only: one
        # request outstanding, the quota, so the second write waits.
        writer.send_raw(b"".join(_write_at("/shared", i) for i in range(2)))
        assert writer.recv_message()[:2] == (Op.WRITE, 1000)
        assert eventually(lambda: xsd._call(lambda: conn.closed), 10.0)
        assert xsd._call(lambda: writer_domain.outstanding) == 0
        assert writer.recv_message()[:2] == (Op.WRITE, 1001)
        check_alive(xsd)
    assert logged_errors() == [f"internal error expiring the events of {conn!r}"]


def test_a_bug_met_dropping_stale_events_bytes_leaves_the_guests_share_right(
    monkeypatch: pytest.MonkeyPatch, logged_errors: Callable[[], list[str]],
) -> None:
    # The bug is met once the bytes of one stale event are out of the
    # connection's output, before the next: the connection is closed,
    # and every byte it had queued leaves the guest's share (max_queued)
    # with it.  Those dropped before the bug once stayed counted for
    # good, and the guest got fewer events for them ever after.
    with _deaf_guest(60.0) as (xsd, writer, _deaf):
        conn = _server_conn(xsd, 2)
        writer_domain = xsd._dispatcher.domains[1]
        for i in range(2):
            writer.write(f"/shared/g{i}", "")
        calls = itertools.count()

        def buggy(data: bytearray) -> bytes:
            # _expire copies each stale event's bytes out, newest first.
            if next(calls) == 1:
                raise RuntimeError("a bug dropping stale events")
            return bytes(data)

        def all_stale_now() -> None:
            # Every event waiting goes stale at once: early entries in
            # _expiry are allowed, and the loop looks at due ones only.
            for event in conn.waiting:
                event.deadline = min(event.deadline, 0.0)
            xsd._expiry[:] = [(0.0, seq, c) for _deadline, seq, c in xsd._expiry]
            heapq.heapify(xsd._expiry)
            xsd._expire_due()

        with monkeypatch.context() as patched:
            patched.setattr(_server, "bytes", buggy, raising=False)
            xsd._call(all_stale_now)
        assert next(calls) == 2
        assert xsd._call(lambda: (conn.closed, conn.domain.queued, writer_domain.outstanding)) == (
            True, 0, 0)
        check_alive(xsd)
    assert logged_errors() == [f"internal error expiring the events of {conn!r}"]


@pytest.mark.parametrize("first_bug", ["serving it", "expiring its events", None])
def test_a_bug_met_closing_a_connection_costs_that_connection_only(
    first_bug: str | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    logged_errors: Callable[[], list[str]],
) -> None:
    # Closing is how the server contains a bug met serving a connection or
    # expiring its events: a bug met closing it then stopped the loop.  A
    # bug met closing a connection the client closed cut the closing short:
    # the requests of the writer its events waited for stayed outstanding
    # for good.  Either way, the rest of the closing must go on.
    victims: list[Connection] = []
    drop_connection_state = Dispatcher.drop_connection_state

    def buggy_drop(self: Dispatcher, conn: Connection) -> None:
        if conn in victims:
            raise RuntimeError("a bug closing a connection")
        drop_connection_state(self, conn)

    def buggy(*_args: object) -> None:
        raise RuntimeError("a first bug")

    monkeypatch.setattr(Dispatcher, "drop_connection_state", buggy_drop)
    if first_bug == "expiring its events":
        monkeypatch.setattr(XenStored, "_expire", buggy)
    timeout = 0.5 if first_bug == "expiring its events" else 60.0
    with _deaf_guest(timeout) as (xsd, writer, deaf):
        conn = _server_conn(xsd, 2)
        writer_domain = xsd._dispatcher.domains[1]
        victims.append(conn)
        writer.write("/shared/charged", "")  # waits for deaf, charged to writer
        if first_bug == "serving it":
            assert xsd._call(lambda: writer_domain.outstanding) == 1
            read = xsd._dispatcher._handlers[Op.READ]
            assert read is not None

            def buggy_read(who: Connection, *args: Any) -> bytes:
                if who is conn:
                    raise RuntimeError("a first bug")
                return read(who, *args)

            xsd._dispatcher._handlers[Op.READ] = buggy_read
            deaf.send_raw(HEADER.pack(Op.READ, 1, 0, 8) + b"/shared\0")
        elif first_bug is None:
            assert xsd._call(lambda: writer_domain.outstanding) == 1
            deaf.close()
        assert eventually(lambda: xsd._call(lambda: conn.closed), 10.0)

        def forgotten() -> tuple[object, ...]:
            assert xsd._selector is not None
            watched = [key for key in xsd._selector.get_map().values() if key.data[1] is conn]
            return (writer_domain.outstanding, conn.domain.queued, conn in xsd._conns,
                    watched, conn.sock.fileno())

        assert xsd._call(forgotten) == (0, 0, False, [], -1)
        assert xsd._thread is not None and xsd._thread.is_alive()
        writer.write("/shared/after", "")
        check_alive(xsd)
    expected = [f"internal error closing {conn!r}"]
    if first_bug == "serving it":
        expected.insert(0, f"internal error serving {conn!r}")
    elif first_bug == "expiring its events":
        expected.insert(0, f"internal error expiring the events of {conn!r}")
    assert logged_errors() == expected
    assert all(r.exc_info for r in caplog.records if r.levelno >= logging.ERROR)


def test_a_bug_met_queueing_a_requests_events_leaves_its_count_right(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bug cutting short the queueing of one request's events costs the
    # requester's connection; the events queued before it still count
    # that request as outstanding, no more and no less, once they go out.
    send_event = XenStored._send_event
    calls = itertools.count()

    def buggy(self: XenStored, conn: Connection, event: bytes, charge: Any = None) -> None:
        if charge is not None and next(calls) == 1:
            raise RuntimeError("a bug queueing an event")
        send_event(self, conn, event, charge)

    monkeypatch.setattr(XenStored, "_send_event", buggy)
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as xsd, RawClient(
        xsd.path
    ) as dom0, make_guest(xsd, dom0, 1) as guest:
        for token in ("a", "b"):
            dom0.watch("/local/domain/1/x0", token)
            assert dom0.wait_event() == ("/local/domain/1/x0", token)
        domain = xsd._dispatcher.domains[1]
        guest.send_raw(_write(0, "x"))
        assert closed_by_server(guest.sock)
        assert dom0.wait_event() == ("/local/domain/1/x0", "a")
        assert xsd._call(lambda: domain.outstanding) == 0
        check_alive(xsd)


def test_closed_connections_do_not_pile_up_waiting_to_expire() -> None:
    # Each guest connection here has had an event (its watch's first),
    # so it has an entry in the expiry heap; closed, it is of no more use
    # there, and a guest opening and closing connections must not grow
    # the heap (and keep every Connection) for watch_event_timeout.
    quota = Quota()
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), watch_event_timeout=60.0
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest:
        domain = xsd._dispatcher.domains[1]
        for i in range(3 * quota.connections):
            with RawClient(xsd.introduce_path(1)) as c:
                c.watch("/local/domain/1", f"w{i}")
                assert c.wait_event() == ("/local/domain/1", f"w{i}")
            assert eventually(lambda: xsd._call(lambda: len(domain.conns)) == 1)
        assert xsd._call(lambda: len(xsd._expiry)) <= 2
        assert xsd._call(lambda: xsd._expiry_dead == sum(c.closed for _d, _s, c in xsd._expiry))
        guest.watch("/local/domain/1", "still")
        assert guest.wait_event() == ("/local/domain/1", "still")
        assert xsd._call(lambda: [c.domid for _d, _s, c in xsd._expiry if not c.closed]) == [1]


def test_the_closed_connections_in_the_expiry_heap_stay_counted_as_they_leave() -> None:
    # Entries of closed connections leave the heap at their deadline as
    # well as by a purge: either way, _expiry_dead follows.
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), watch_event_timeout=0.3
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest, RawClient(
        xsd.introduce_path(1)
    ) as other:
        for i, client in enumerate((guest, other)):
            client.watch("/local/domain/1", f"w{i}")
            assert client.wait_event() == ("/local/domain/1", f"w{i}")
        with RawClient(xsd.introduce_path(1)) as short:
            short.watch("/local/domain/1", "short")
            assert short.wait_event() == ("/local/domain/1", "short")
        domain = xsd._dispatcher.domains[1]
        assert eventually(lambda: xsd._call(lambda: len(domain.conns)) == 2)
        # Not purged: one dead entry of three.
        assert xsd._call(lambda: (len(xsd._expiry), xsd._expiry_dead)) == (3, 1)
        assert eventually(lambda: xsd._call(lambda: not xsd._expiry))
        assert xsd._call(lambda: xsd._expiry_dead) == 0


def test_purging_the_expiry_heap_keeps_it_a_heap() -> None:
    # Dropping entries from a heap's list does not leave a heap: the loop
    # would then miss the earliest deadline behind a later one.
    xsd = XenStored(Path("/nonexistent"))
    deadlines = [0.0, 1.0, 4.0, 2.0, 3.0, 5.0, 7.0]  # a heap
    closed = {0.0, 1.0, 2.0, 5.0}  # leaving [4, 3, 7] in list order
    xsd._expiry[:] = [(t, i, types.SimpleNamespace(closed=t in closed))
                      for i, t in enumerate(deadlines)]
    xsd._expiry_dead = len(closed) - 1
    xsd._forget_expiry()  # the last of them closes: half are dead
    assert xsd._expiry_dead == 0
    assert sorted(e[0] for e in xsd._expiry) == [3.0, 4.0, 7.0]
    assert xsd._expiry[0][0] == 3.0


def test_a_watch_event_timeout_of_weeks_does_not_stop_the_server(
    no_internal_errors: None,
) -> None:
    # cxenstored takes any -w watch-event=SECONDS; the loop's wait for the
    # first deadline must not outgrow what the selector accepts (epoll's
    # is about 24.8 days in milliseconds).
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), watch_event_timeout=30 * 86400.0
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest:
        guest.watch("/local/domain/1", "w")
        assert guest.wait_event() == ("/local/domain/1", "w")
        check_alive(xsd)
        assert xsd._thread is not None and xsd._thread.is_alive()


def test_the_watch_event_timeout_is_fixed_once_the_server_runs() -> None:
    # The events waiting keep the deadline they were queued with, and the
    # loop looks for stale ones at the earliest it knows of: a timeout
    # changed under them stalled their expiry (shortened, the new events
    # waited behind the old deadline; from None, they were never looked
    # at).  Refused, where it once went unnoticed.
    with tempfile.TemporaryDirectory(prefix="xs") as d:
        xsd = XenStored(Path(d), watch_event_timeout=60.0)
        xsd.watch_event_timeout = None  # not started: nothing waits yet
        with pytest.raises(ValueError, match="watch_event_timeout"):
            xsd.watch_event_timeout = 0.0
        with xsd:
            with pytest.raises(AttributeError, match="watch_event_timeout .* started"):
                xsd.watch_event_timeout = 0.5
            assert xsd.watch_event_timeout is None
        with pytest.raises(AttributeError, match="watch_event_timeout .* started"):
            xsd.watch_event_timeout = 0.5


def test_max_queued_may_change_at_run_time_checked_as_at_start() -> None:
    # The constructor refused a share too small for a paused guest to get
    # the reply that paused it; set later, any value went unchecked.  It
    # is checked the same way, and may change while the server runs (as
    # cxenstored's quotas may, through xenstore-control): each event is
    # checked against it as it is queued, nothing queued depends on it.
    with tempfile.TemporaryDirectory(prefix="xs") as d:
        xsd = XenStored(Path(d))
        with pytest.raises(ValueError, match="max_queued"):
            xsd.max_queued = _server.MIN_QUEUED - 1
        with xsd:
            with pytest.raises(ValueError, match="max_queued"):
                xsd.max_queued = 1
            assert xsd.max_queued == _server.MAX_QUEUED
            xsd.max_queued = _server.MIN_QUEUED
            assert xsd.max_queued == _server.MIN_QUEUED


def test_events_for_dom0_never_go_stale() -> None:
    # Dom0 is trusted to read: the guest stays held back past the timeout.
    # The sign the timeout passed: an event for a guest queued after the
    # guest's went stale.
    with _dom0_backlog(watch_event_timeout=0.3) as b, RawClient(
        b.xsd.introduce_path(1)
    ) as deaf:
        deaf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deaf.watch("/local/domain/1/data", "deaf")
        assert deaf.wait_event() == ("/local/domain/1/data", "deaf")
        _guest_conn, deaf_conn = b.guest_conns()
        _fill(b.xsd, b.dom0, deaf_conn, "/local/domain/1/data")
        b.guest.send_raw(b"".join(_write(i) for i in range(_LIMIT + 1)))
        for i in range(_LIMIT):
            assert b.guest.recv_message()[:2] == (Op.WRITE, 1000 + i)
        b.dom0.write("/local/domain/1/data/late", "")
        late = b.xsd._call(lambda: deaf_conn.waiting[-1])
        assert eventually(lambda: b.xsd._call(lambda: late not in deaf_conn.waiting))
        guest_conn = b.guest_conns()[0]
        assert b.xsd._call(lambda: (guest_conn.paused, guest_conn.domain.outstanding)) == (
            True, _LIMIT)
        b.read_events_until(f"/local/domain/1/g{_LIMIT}")
        assert b.guest.recv_message()[:2] == (Op.WRITE, 1000 + _LIMIT)


def test_watch_event_timeout_must_be_positive_or_none() -> None:
    with tempfile.TemporaryDirectory(prefix="xs") as d:
        with pytest.raises(ValueError, match="watch_event_timeout"):
            XenStored(Path(d), watch_event_timeout=0)
        XenStored(Path(d), watch_event_timeout=None)


def test_a_guests_share_is_freed_with_a_connection_closed_with_events_waiting() -> None:
    token = "t" * 1000
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), max_queued=_server.MIN_QUEUED
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest:
        with RawClient(xsd.introduce_path(1)) as deaf:
            deaf.watch("/local/domain/1", token)
            assert deaf.wait_event() == ("/local/domain/1", token)
            domain = xsd._dispatcher.domains[1]
            for i in itertools.count():
                if xsd._call(lambda: domain.queued):
                    break
                dom0.write(f"/local/domain/1/n{i}/{_PAD}", "")
        guest.read("/local/domain/1")  # after the close
        assert eventually(lambda: xsd._call(lambda: (len(domain.conns), domain.queued)) == (1, 0))


def test_events_a_guest_does_not_read_are_dropped_not_the_guest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As cxenstored's send_event() over the guest's memory quota: once
    # ``max_queued`` bytes wait for a guest, further events for it are
    # dropped, with one warning; the guest stays connected.
    caplog.set_level(logging.DEBUG, logger="xenback.sim._xenstored")
    token = "t" * 1000  # ~1 KiB per event
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), max_queued=_server.MIN_QUEUED
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest:
        guest.watch("/local/domain/1", token)
        assert guest.wait_event() == ("/local/domain/1", token)
        deaf = _server_conn(xsd, 1)
        writes = 2 * (_server.MIN_QUEUED + _fill_socket_buffers(guest.sock)) // 1000
        for i in range(writes):
            dom0.write(f"/local/domain/1/n{i}", "")
        assert not deaf.closed
        assert xsd._call(lambda: len(deaf.out)) <= _server.MIN_QUEUED
        # Still served, and the events it gets are the oldest ones, intact.
        rid = guest.send(Op.READ, b"/local/domain/1/n0\0")
        assert guest.reply(rid) == (Op.READ, 0, b"")
        got = list(guest.events)
        assert got[0] == ("/local/domain/1/n0", token)
        assert 0 < len(got) < writes
        assert all(path.startswith("/local/domain/1/n") and t == token for path, t in got)
        assert xsd._call(lambda: deaf.domain.queued) == 0  # all read
    drops = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert drops, "no drop logged"
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and warned[0] is drops[0], [r.getMessage() for r in warned]


@pytest.mark.parametrize("over", [0, 1])
def test_an_event_that_just_fits_in_a_guests_share_is_queued(over: int) -> None:
    # Dropped only past ``max_queued``, as cxenstored's quota check: an
    # event bringing what waits for the guest to exactly the share still
    # goes, one a byte more does not.
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), max_queued=_server.MIN_QUEUED
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest:
        guest.read("/local/domain/1")  # accepted
        conn = _server_conn(xsd, 1)
        path = b"/local/domain/1/x\0t\0"
        event = HEADER.pack(Op.WATCH_EVENT, 0, 0, len(path)) + path

        def fill_then_send() -> int:
            # In one call: the loop sends nothing meanwhile.
            xsd._send(conn, bytes(_server.MIN_QUEUED - len(event) - conn.domain.queued + over))
            before = len(conn.out)
            xsd._send_event(conn, event)
            return len(conn.out) - before

        assert xsd._call(fill_then_send) == (0 if over else len(event))


def test_a_share_lowered_at_run_time_holds_the_next_events() -> None:
    # max_queued set while the server runs: the events queued after it are
    # held against the new share, whatever the server started with.
    token = "t" * 1000  # ~1 KiB per event
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d)
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest:
        assert xsd.max_queued == _server.MAX_QUEUED
        guest.watch("/local/domain/1", token)
        assert guest.wait_event() == ("/local/domain/1", token)
        deaf = _server_conn(xsd, 1)
        xsd.max_queued = _server.MIN_QUEUED
        writes = 2 * (_server.MIN_QUEUED + _fill_socket_buffers(guest.sock)) // 1000
        for i in range(writes):
            dom0.write(f"/local/domain/1/n{i}", "")
        assert not deaf.closed
        assert 0 < xsd._call(lambda: deaf.domain.queued) <= _server.MIN_QUEUED
        rid = guest.send(Op.READ, b"/local/domain/1/n0\0")
        assert guest.reply(rid) == (Op.READ, 0, b"")
        assert 0 < len(guest.events) < writes


def test_identical_events_waiting_for_a_slow_watcher_are_queued_once() -> None:
    # As cxenstored's send_event() (XSA-326): an event identical to one still
    # waiting for the watcher is dropped, so that another client rewriting a
    # node the watcher follows cannot pile up events until it is cut off.
    # Special events ("@...") are exempt: each one may matter on its own.
    token = "t" * 1000  # ~1 KiB per event
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), max_queued=_server.MIN_QUEUED
    ) as xsd:
        with RawClient(xsd.path) as slow, RawClient(xsd.path) as writer:
            slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.watch("/n", token)
            slow.watch("@introduceDomain", token)
            sndbuf = slow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            rcvbuf = slow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            # Without coalescing, far more than every buffer on the way holds.
            writes = 2 * (_server.MIN_QUEUED + sndbuf + rcvbuf + (1 << 20)) // 1000
            for i in range(writes):
                writer.write("/n", str(i))
            slow.sock.settimeout(30)
            assert slow.read("/n") == str(writes - 1).encode()  # still connected
            events = list(slow.events)
            assert 2 <= len(events) < writes
            assert set(events) == {("/n", token), ("@introduceDomain", token)}
            slow.events.clear()
            # Special events are all queued, however alike.
            specials = _server.MIN_QUEUED // 2 // (len(token) + 40)
            for _ in range(specials):
                writer.set_perms("@introduceDomain", ["n0"])
            assert slow.read("/n") == str(writes - 1).encode()
            assert list(slow.events) == [("@introduceDomain", token)] * specials


class _Kernel:
    """The socket of a connection whose kernel takes ``room`` bytes more."""

    def __init__(self) -> None:
        self.room = 0

    def fileno(self) -> int:
        return -1

    def send(self, data: bytes) -> int:
        n = min(self.room, len(data))
        self.room -= n
        return n

    def close(self) -> None:
        pass


def _event(path: str, token: str = "t") -> bytes:
    payload = f"{path}\0{token}\0".encode()
    return HEADER.pack(Op.WATCH_EVENT, 0, 0, len(payload)) + payload


def test_identical_events_are_coalesced_only_while_one_waits_in_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An event the kernel took whole may have been read and acted on
    # already: an identical one must be queued again, whatever else waits.
    # One the kernel took in part has not reached the watcher whole yet.
    # The table of waiting events follows the output it describes, and a
    # closed connection keeps none.  (The loop thread's work, done here.)
    with tempfile.TemporaryDirectory(prefix="xs") as d, selectors.DefaultSelector() as sel:
        xsd = XenStored(Path(d))
        xsd._selector = sel  # which the connection is not registered with
        monkeypatch.setattr(xsd, "_set_events", lambda conn, events: None)
        kernel = _Kernel()
        conn = Connection(kernel, Domain(0, True), "#1")  # type: ignore[arg-type]
        a, b, special = _event("/a"), _event("/b"), _event("@releaseDomain")
        xsd._send_event(conn, a)
        xsd._send_event(conn, a)
        xsd._send_event(conn, special)
        xsd._send_event(conn, special)
        assert bytes(conn.out) == a + special + special
        kernel.room = len(a)  # a sent whole; the specials wait
        xsd._flush(conn)
        assert list(conn.queued_events) == []
        xsd._send_event(conn, a)
        xsd._send_event(conn, b)
        kernel.room = 2 * len(special) + 1  # a sent in part
        xsd._flush(conn)
        xsd._send_event(conn, a)
        xsd._send_event(conn, b)
        assert bytes(conn.out) == (a + b)[1:]
        kernel.room = len(a) - 1  # a sent whole, b waits
        xsd._flush(conn)
        assert list(conn.queued_events) == [b]
        kernel.room = len(b)
        xsd._flush(conn)
        assert not conn.out and not conn.queued_events
        xsd._send_event(conn, b)
        xsd._close(conn, "test")
        assert not conn.queued_events
        xsd._send_event(conn, a)
        assert not conn.queued_events


def test_client_not_reading_replies_is_paused_not_dropped(xsd: XenStored) -> None:
    big = b"b" * 4000
    n = 3000  # ~12 MB of replies: far more than any buffer on the way
    with RawClient(xsd.path) as lazy, RawClient(xsd.path) as other:
        lazy.write("/big", big)
        request = HEADER.pack(Op.READ, 0, 0, 5) + b"/big\0"
        sender = threading.Thread(target=lazy.send_raw, args=(request * n,), daemon=True)
        sender.start()
        for i in range(20):  # meanwhile everybody else is served
            other.write("/other", str(i))
            assert other.read("/other") == str(i).encode()
        for _ in range(n):
            assert lazy.recv_message() == (Op.READ, 0, 0, big)
        sender.join(timeout=30)
        assert not sender.is_alive()


@pytest.mark.parametrize("waiting", [_server.PAUSE_OUTPUT, _server.PAUSE_OUTPUT + 1])
def test_a_client_is_paused_once_more_than_pause_output_bytes_wait(
        xsd: XenStored, waiting: int) -> None:
    # "More than": at PAUSE_OUTPUT bytes its next request is served, as
    # _flush resumes a paused client at that much.  Pausing there too
    # would have the two undo each other, round after round, while the
    # client does not read.
    with RawClient(xsd.path) as c:
        c.read("/")  # accepted
        (conn,) = xsd._call(lambda: list(xsd._dispatcher.dom0.conns))

        def queue_then_process() -> tuple[bool, bool]:
            # In one call: the loop sends nothing meanwhile.
            xsd._send(conn, bytes(waiting))
            before = len(conn.out)
            xsd._process(conn, HEADER.pack(Op.READ, 7, 0, 2) + b"/\0")
            return conn.paused, len(conn.out) > before

        paused = waiting > _server.PAUSE_OUTPUT
        assert xsd._call(queue_then_process) == (paused, not paused)


class _Unwritable:
    """A connection's socket whose client has read nothing for a while:
    the kernel takes no byte of what is sent to it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, _data: bytes) -> int:
        raise BlockingIOError(errno.EAGAIN, "the kernel's buffers are full")

    def fileno(self) -> int:
        return self._sock.fileno()


@pytest.mark.parametrize("waiting", [_server.PAUSE_OUTPUT, _server.PAUSE_OUTPUT + 1])
def test_a_paused_client_is_served_again_once_no_more_than_pause_output_bytes_wait(
        xsd: XenStored, waiting: int) -> None:
    # The other side of the bound above: a client paused goes on once
    # PAUSE_OUTPUT bytes wait for it, however few the kernel took.
    with RawClient(xsd.path) as c:
        c.read("/")  # accepted
        (conn,) = xsd._call(lambda: list(xsd._dispatcher.dom0.conns))

        def pause_then_flush() -> tuple[bool, bool]:
            real = conn.sock
            conn.sock = cast(socket.socket, _Unwritable(real))
            try:
                xsd._send(conn, bytes(waiting))
                conn.paused = True
                conn.inbuf = HEADER.pack(Op.READ, 7, 0, 2) + b"/\0"
                xsd._flush(conn)
                return conn.paused, len(conn.out) > waiting
            finally:
                conn.sock = real

        resumed = waiting <= _server.PAUSE_OUTPUT
        assert xsd._call(pause_then_flush) == (not resumed, resumed)


def test_many_concurrent_clients(xsd: XenStored) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with RawClient(xsd.path) as c:
                c.watch(f"/mc/{k}", "t")
                assert c.wait_event() == (f"/mc/{k}", "t")
                for i in range(50):
                    c.write(f"/mc/{k}/v", str(i))
                    assert c.read(f"/mc/{k}/v") == str(i).encode()
                    while True:
                        tx = c.transaction_start()
                        counter = int(c.read("/mc/counter", tx))
                        c.write("/mc/counter", str(counter + 1), tx)
                        try:
                            c.transaction_end(tx)
                            break
                        except XsError as e:
                            assert e.name == "EAGAIN"
                seen = 0
                while seen < 50:
                    path, _token = c.wait_event()
                    assert path == f"/mc/{k}/v"
                    seen += 1
        except BaseException as e:
            errors.append(e)

    with RawClient(xsd.path) as c:
        c.write("/mc/counter", "0")
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert c.read("/mc/counter") == b"800"  # no lost update


def test_client_reset_by_peer_is_dropped_quietly(
        xsd: XenStored, no_internal_errors: None, caplog: pytest.LogCaptureFixture) -> None:
    """A client that closes with a reply unread makes the server's next recv
    fail with ECONNRESET: that connection, with its watch, is dropped at
    DEBUG level, and the others are served."""
    caplog.set_level(logging.DEBUG, logger="xenback.sim._xenstored")
    with RawClient(xsd.path) as other:
        resetter = RawClient(xsd.path)
        resetter.watch("/r", "tok")
        assert resetter.recv_message()[0] == Op.WATCH_EVENT  # the first event
        resetter.send_raw(HEADER.pack(Op.READ, 1, 0, 7) + b"/local\0")
        # Wait for the reply to be in our receive queue, and leave it unread.
        resetter.sock.settimeout(10.0)
        assert resetter.sock.recv(1, socket.MSG_PEEK)
        resetter.sock.close()
        assert eventually(lambda: any(
            "recv: [Errno 104] Connection reset by peer" in r.getMessage()
            for r in caplog.records), 10.0)
        (closing,) = [r for r in caplog.records if "Connection reset by peer" in r.getMessage()]
        assert closing.levelno == logging.DEBUG
        assert closing.getMessage().startswith("closing ")
        # Its watch went with it: a change under /r fires for nobody.
        other.write("/r/x", "1")
        assert other.read("/r/x") == b"1"
    check_alive(xsd)


def test_connect_to_a_domain_released_in_the_same_round(
        xsd: XenStored, no_internal_errors: None) -> None:
    """A guest connects to its domain's socket while dom0 releases that
    domain: when the loop wakes up to both at once and serves the RELEASE
    first, the listener the connection waited on is gone."""
    guest_socket = xsd.introduce_domain(5)
    entered, gate = threading.Event(), threading.Event()

    def hold_the_loop() -> None:
        entered.set()
        assert gate.wait(10)

    with RawClient(xsd.path) as dom0, socket.socket(socket.AF_UNIX) as guest:
        dom0.request(Op.GET_DOMAIN_PATH, b"0\0")  # accepted and served
        holder = threading.Thread(target=xsd._call, args=(hold_the_loop,))
        holder.start()
        try:
            assert entered.wait(10)
            # Both become ready while the loop is held, in this order.
            rid = dom0.send(Op.RELEASE, b"5\0")
            guest.connect(str(guest_socket))
        finally:
            gate.set()
            holder.join(10)
        assert dom0.reply(rid) == (Op.RELEASE, 0, b"OK\0")
        assert closed_by_server(guest)
    assert not xsd.is_introduced(5)
    check_alive(xsd)


def test_a_bug_met_resuming_a_paused_client_costs_that_connection_only(
        xsd: XenStored, logged_errors: Callable[[], list[str]]) -> None:
    """Requests held back while a client was paused are served once its
    replies are sent, which can happen right after they were queued (the
    kernel takes them all).  A server bug met there must cost that one
    connection, as anywhere else, not the loop thread."""

    def buggy(*_args: object) -> bytes:
        raise RuntimeError("a bug in a handler")

    xsd._dispatcher._handlers[Op.CONTROL] = buggy
    with RawClient(xsd.path) as c, RawClient(xsd.path) as other:
        c.write("/big", b"b" * 4000)
        # 17 replies of 4 KiB pause the client; the kernel takes them at once.
        c.send_raw(b"".join(HEADER.pack(Op.READ, i, 0, 5) + b"/big\0" for i in range(20))
                   + HEADER.pack(Op.CONTROL, 20, 0, 6) + b"check\0")
        # Replies in order, as many as were sent before the bug, then EOF.
        replies = []
        with pytest.raises(ConnectionError):
            while True:
                replies.append(c.recv_message()[:2])
        assert replies == [(Op.READ, i) for i in range(len(replies))]
        other.write("/still", "served")
        assert other.read("/still") == b"served"
    assert xsd._thread is not None and xsd._thread.is_alive()
    assert logged_errors() == ["internal error serving Connection(#1, dom0)"]


def test_a_bug_met_accepting_a_connection_costs_that_connection_only(
    monkeypatch: pytest.MonkeyPatch, logged_errors: Callable[[], list[str]],
) -> None:
    # Accepting is the loop's too: a bug met setting up one connection
    # (or an epoll set refusing it) must not stop the loop, nor the
    # connections waiting behind it in the backlog.
    made = itertools.count()

    def buggy(*args: Any) -> Connection:
        if next(made) == 1:
            raise RuntimeError("a bug accepting a connection")
        return Connection(*args)

    monkeypatch.setattr(_server, "Connection", buggy)
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as xsd, RawClient(
        xsd.path
    ) as first, socket.socket(socket.AF_UNIX) as refused:
        first.write("/first", "")
        refused.connect(str(xsd.path))
        assert closed_by_server(refused)
        assert xsd._thread is not None and xsd._thread.is_alive()
        check_alive(xsd)
        assert first.read("/health") == b"alive"
        assert xsd._call(lambda: len(xsd._conns)) == 1
    assert logged_errors() == ["internal error accepting a connection of Domain(0)"]


def test_a_bug_met_after_watching_an_accepted_connection_leaves_nothing_of_it(
    logged_errors: Callable[[], list[str]],
) -> None:
    # A bug met once the new socket is in the selector: the socket, closed,
    # once stayed there (and in its guest's connections).  The next
    # connection, given the same descriptor number, was then refused as
    # already watched, and so was every one after it.
    class FailingOnce(set[Connection]):
        armed = False

        def add(self, conn: Connection) -> None:
            if self.armed:
                self.armed = False
                raise RuntimeError("a bug accepting a connection")
            super().add(conn)

    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as xsd:
        conns = FailingOnce()
        xsd._call(lambda: setattr(xsd, "_conns", conns))
        conns.armed = True
        with socket.socket(socket.AF_UNIX) as refused:
            refused.connect(str(xsd.path))
            assert closed_by_server(refused)
        with RawClient(xsd.path) as after:
            after.write("/after", "served")
            assert after.read("/after") == b"served"
            dom0 = xsd._dispatcher.dom0
            assert xsd._call(lambda: (len(xsd._conns), len(dom0.conns))) == (1, 1)
    assert logged_errors() == ["internal error accepting a connection of Domain(0)"]


@pytest.mark.parametrize("bug", ["removing its socket", "closing a connection"])
def test_a_bug_met_stopping_leaves_no_caller_waiting_for_the_loop(
    bug: str, monkeypatch: pytest.MonkeyPatch, logged_errors: Callable[[], list[str]],
) -> None:
    # The loop once ended without saying it had (the calls of other
    # threads still queued for it, and taken), and every later call
    # waited for it for good.  (Closing a connection never raises: one
    # that did, a bug, must not keep the loop's descriptors open either.)
    with tempfile.TemporaryDirectory(prefix="xs") as d, contextlib.ExitStack() as stack:
        xsd = XenStored(Path(d))
        xsd.start()
        if bug == "removing its socket":
            unlink = XenStored._unlink

            def buggy(path: Path) -> None:
                if path == xsd.path:
                    raise PermissionError(errno.EACCES, "a run directory made read-only",
                                          str(path))
                unlink(path)

            monkeypatch.setattr(XenStored, "_unlink", staticmethod(buggy))
        else:
            stack.enter_context(RawClient(xsd.path)).read("/")  # accepted

            def buggy_close(*_args: object) -> None:
                raise RuntimeError("a bug closing a connection")

            monkeypatch.setattr(XenStored, "_close", buggy_close)
        xsd.stop()
        assert (xsd._wake_r.fileno(), xsd._wake_w.fileno()) == (-1, -1)
        refused_as_not_running(xsd)
    assert logged_errors() == ["internal error stopping xenstored"]


def test_a_bug_met_stopping_leaves_no_other_socket_open(
    monkeypatch: pytest.MonkeyPatch, logged_errors: Callable[[], list[str]],
) -> None:
    # One domain's socket file that cannot be removed once cut the
    # stopping short: the other domains' sockets and the main one stayed
    # open and in place (a server started again on the run directory
    # found it served), with the selector's descriptors.
    with tempfile.TemporaryDirectory(prefix="xs") as d:
        xsd = XenStored(Path(d))
        xsd.start()
        stuck, other = xsd.introduce_domain(1), xsd.introduce_domain(2)
        listeners = [xsd._dispatcher.domains[domid].listener for domid in (1, 2)]
        unlink = XenStored._unlink

        def buggy(path: Path) -> None:
            if path == stuck:
                raise PermissionError(errno.EACCES, "a directory made read-only", str(path))
            unlink(path)

        monkeypatch.setattr(XenStored, "_unlink", staticmethod(buggy))
        xsd.stop()
        assert stuck.exists() and not other.exists() and not xsd.path.exists()
        assert xsd._listener is not None and xsd._listener.fileno() == -1
        assert [s is not None and s.fileno() for s in listeners] == [-1, -1]
        assert xsd._selector is not None and xsd._selector.get_map() is None
        monkeypatch.undo()
        with XenStored(Path(d)):  # the run directory is free again
            pass
    assert logged_errors() == ["internal error stopping xenstored"]


def test_events_of_a_request_a_bug_cut_short_are_sent_at_once(
        xsd: XenStored, caplog: pytest.LogCaptureFixture) -> None:
    """A request that changed the store before a server bug cost its
    connection has fired its watches: the watchers hear of the change
    then, not after whatever request comes next."""
    caplog.set_level(logging.CRITICAL, logger="xenback.sim._xenstored")
    write = xsd._dispatcher._handlers[Op.WRITE]
    assert write is not None

    def buggy(*args: Any) -> bytes:
        write(*args)
        raise RuntimeError("a bug in a handler, after the write")

    with RawClient(xsd.path) as watcher, RawClient(xsd.path) as c:
        watcher.watch("/w", "tok")
        assert watcher.wait_event() == ("/w", "tok")
        xsd._call(xsd._dispatcher._handlers.__setitem__, Op.WRITE, buggy)
        c.send(Op.WRITE, b"/w/x\0v")
        assert closed_by_server(c.sock)
        assert watcher.wait_event() == ("/w/x", "tok")


class _OutOfDescriptors:
    """Stands for the dom0 listener: accept() fails with EMFILE, as when the
    process has no descriptor left, while ``full`` is set."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.full = True
        self.failures = 0
        self.failed = threading.Event()

    def fileno(self) -> int:
        return self.listener.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        if self.full:
            self.failures += 1
            self.failed.set()
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return self.listener.accept()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("retry", ["a connection closes", "after a while"])
def test_out_of_descriptors_the_server_waits_without_spinning(
        xsd: XenStored, monkeypatch: pytest.MonkeyPatch, retry: str) -> None:
    """accept() failing with EMFILE leaves the listener readable: the
    server stops watching it, so the loop does not spin, until a
    connection closes (freeing a descriptor) or a short while has passed;
    the client waiting meanwhile is then served."""
    if retry == "a connection closes":
        monkeypatch.setattr(_server, "_ACCEPT_RETRY", 3600.0)
    stand_in = _OutOfDescriptors(xsd._listener)
    with RawClient(xsd.path) as other:
        other.write("/x", "1")  # accepted before descriptors run out
        xsd._call(setattr, xsd, "_listener", stand_in)
        with RawClient(xsd.path) as waiting:  # in the backlog
            assert stand_in.failed.wait(10)
            if retry == "a connection closes":
                for _ in range(2):  # two more turns of the loop at least
                    watched = xsd._call(lambda: stand_in.fileno() in xsd._selector.get_map())
                assert not watched
                assert stand_in.failures == 1
            stand_in.full = False
            if retry == "a connection closes":
                other.close()
            assert waiting.read("/x") == b"1"
    xsd._call(setattr, xsd, "_listener", stand_in.listener)
    check_alive(xsd)


def test_a_guest_cannot_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    # Each connection a guest opens over its limit, or ruins with a bad
    # header, is its own fault, and it can open any number of them: one
    # warning per domain says what is going on, the rest go to DEBUG.
    caplog.set_level(logging.DEBUG, logger="xenback.sim._xenstored")
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), quota=Quota(connections=1)
    ) as xsd, RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest:
        guest.write("here", "")  # the one connection it may have is open
        for _ in range(5):
            with socket.socket(socket.AF_UNIX) as extra:
                extra.connect(str(xsd.introduce_path(1)))
                assert closed_by_server(extra)
        guest.close()
        domain = xsd._dispatcher.domains[1]
        assert eventually(lambda: xsd._call(lambda: not domain.conns))
        for _ in range(5):
            with socket.socket(socket.AF_UNIX) as bad:
                bad.connect(str(xsd.introduce_path(1)))
                bad.sendall(HEADER.pack(Op.READ, 1, 0, 4097))
                assert closed_by_server(bad)
        # Dom0's misbehaviour is not the guest's: warned as before.
        with socket.socket(socket.AF_UNIX) as bad:
            bad.connect(str(xsd.path))
            bad.sendall(HEADER.pack(Op.READ, 1, 0, 4097))
            assert closed_by_server(bad)
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 2, [r.getMessage() for r in warned]
    assert "too many connections" in warned[0].getMessage()
    assert "dom0" in warned[1].getMessage()
    assert sum("too many connections" in r.getMessage() for r in caplog.records) == 5
    assert sum("announces 4097" in r.getMessage() for r in caplog.records) == 6


def test_a_guest_cannot_flood_the_log_with_watches_too_long_to_fire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An event too long to send is dropped with a warning once per watch,
    # and a guest can set up any number of watches in turn: one warning per
    # guest, the rest at DEBUG.
    caplog.set_level(logging.DEBUG, logger="xenback.sim._xenstored")
    token = "t" * 4000
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as xsd, \
            RawClient(xsd.path) as dom0, make_guest(xsd, dom0, 1) as guest:
        for i in range(5):
            guest.watch("w", token)
            assert guest.wait_event() == ("w", token)
            guest.write(f"w/{'c' * 100}{i}", "")  # path and token: over 4096 bytes
            guest.unwatch("w", token)
    drops = [r for r in caplog.records if "XENSTORE_PAYLOAD_MAX" in r.getMessage()]
    assert [r.levelno for r in drops] == [logging.WARNING] + [logging.DEBUG] * 4
