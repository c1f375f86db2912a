"""pvcalls Backend: the data rings (wrap-around, index wrap, errors, EOF)."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pytest
from pvcalls_rawfront import TIMEOUT, RawFrontend, resources, socket_of, wait_until, watched_fds
from racewindow import PauseAt
from scripts import helper_path

import pvcalls
from pvcalls import _errno, _socket, _wire
from pvcalls._socket import ActiveSocket
from xenback import RateLimit


def _accepted_pair(raw: RawFrontend, order: int = 4,
                   start: int = 0) -> tuple[int, Any, socket.socket]:
    """A guest socket connected to a host socket we hold, with the guest's
    ring indexes starting at ``start``."""
    server = socket.create_server(("127.0.0.1", 0))
    sock_id, _ = raw.socket()
    ring = raw.new_ring(order)
    for offset in (_wire.IN_CONS_OFFSET, _wire.IN_PROD_OFFSET,
                   _wire.OUT_CONS_OFFSET, _wire.OUT_PROD_OFFSET):
        ring.put(offset, start)
    rsp = raw.response(raw.push_connect(sock_id, server.getsockname(), ring))
    assert rsp.ret == 0
    peer, _ = server.accept()
    server.close()
    return sock_id, ring, peer


def _pump(raw: RawFrontend, ring: Any, peer: socket.socket, data: bytes) -> tuple[bytes, bytes]:
    """Send ``data`` guest->host and host->guest at once; return what arrived."""
    peer.setblocking(False)
    to_host = bytearray()
    to_guest = bytearray()
    sent_guest = sent_host = 0
    view = memoryview(data)

    def step() -> bool:
        nonlocal sent_guest, sent_host
        sent_guest += ring.write(view[sent_guest:])
        try:
            sent_host += peer.send(view[sent_host:sent_host + 65536])
        except BlockingIOError:
            pass
        try:
            to_host.extend(peer.recv(1 << 20))
        except BlockingIOError:
            pass
        to_guest.extend(ring.read())
        return len(to_host) == len(data) and len(to_guest) == len(data)

    raw.wait(step, timeout=30)
    return bytes(to_host), bytes(to_guest)


def _peek(sock: socket.socket, n: int) -> bytes:
    try:
        return sock.recv(n, socket.MSG_PEEK)
    except BlockingIOError:
        return b""


@pytest.mark.parametrize("order", [1, 4])
def test_wrap_around_two_piece_copies(raw: RawFrontend, order: int) -> None:
    _, ring, peer = _accepted_pair(raw, order)
    data = os.urandom(5 * _wire.flex_ring_size(order) + 123)
    to_host, to_guest = _pump(raw, ring, peer, data)
    assert to_host == data and to_guest == data


def test_32bit_index_wrap(raw: RawFrontend, backend: pvcalls.Backend) -> None:
    _, ring, peer = _accepted_pair(raw, order=1, start=0xFFFFFFFF - 1000)
    data = os.urandom(3 * _wire.flex_ring_size(1))
    to_host, to_guest = _pump(raw, ring, peer, data)
    assert to_host == data and to_guest == data
    # The indexes wrapped through zero.
    assert ring.get(_wire.IN_PROD_OFFSET) & 0xFFFFFFFF < 0x10000
    assert ring.get(_wire.OUT_CONS_OFFSET) & 0xFFFFFFFF < 0x10000
    # The peer may read the last bytes before the backend counts them (as
    # its send returns); it counts them before it consumes them.
    wait_until(lambda: ring.get(_wire.OUT_CONS_OFFSET) == ring.get(_wire.OUT_PROD_OFFSET))
    row, = backend.stats().sockets
    assert row.bytes_in == row.bytes_out == len(data)


def test_orderly_close_sets_enotconn_after_the_data(raw: RawFrontend) -> None:
    _, ring, peer = _accepted_pair(raw)
    peer.sendall(b"last words")
    peer.close()
    assert raw.recv_exactly(ring, 10) == b"last words"
    raw.wait(lambda: ring.in_error != 0)
    assert ring.in_error == -_errno.ENOTCONN
    assert ring.read() == b""


def test_data_and_the_end_of_the_stream_are_notified(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """A frontend that sleeps on its socket's port until there is
    something to read is woken by the data the backend produced, and then
    by in_error set at the end of the stream."""
    sock_id, ring, peer = _accepted_pair(raw)
    sock = socket_of(backend, raw, sock_id)
    raw.drain_events()
    peer.sendall(b"hello")  # one segment: one receive takes it all
    raw.wait_notified(ring.port)
    assert ring.read() == b"hello"
    assert ring.in_error == 0
    sock.flush()  # every notification of the data is out: forget them
    raw.drain_events()
    peer.close()
    raw.wait_notified(ring.port)  # for the end alone; if missing, times out
    assert ring.in_error == -_errno.ENOTCONN


def test_reset_by_the_peer_is_econnreset_not_eof(raw: RawFrontend) -> None:
    """A peer that resets the connection (RST, no FIN): the guest reads the
    reset in in_error, told apart from an orderly end of stream."""
    _, ring, peer = _accepted_pair(raw)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    raw.wait(lambda: ring.in_error != 0)
    assert ring.in_error == -_errno.ECONNRESET
    assert ring.read() == b""
    assert ring.out_error == 0  # the guest has sent nothing: no send failed


def test_a_reset_behind_data_the_guest_has_not_read_is_econnreset(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """The peer's bytes fill the in ring, some more wait in the host
    socket, then the peer resets.  Its event comes while no receive can
    run (the ring is full): the error stays the receive's to report, after
    the last byte.  Taken then as the socket's error (SO_ERROR), it would
    be gone, and the receive would say EOF: a reset read as an orderly end."""
    sock_id, ring, peer = _accepted_pair(raw, order=1)
    sock = socket_of(backend, raw, sock_id)
    size = _wire.flex_ring_size(1)
    data = os.urandom(size + 100)
    peer.sendall(data)
    raw.wait(lambda: ring.get(_wire.IN_PROD_OFFSET) == size)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # a reset
    wait_until(lambda: sock._host_hangup)  # its event came
    sock.flush()  # and the run it queued is over
    assert raw.recv_exactly(ring, len(data)) == data
    raw.wait(lambda: ring.in_error != 0)
    assert ring.in_error == -_errno.ECONNRESET
    assert ring.out_error == 0  # the guest has sent nothing: no send failed


def test_a_reset_after_the_end_of_the_stream_is_notified(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """The peer ends its stream (in_error -ENOTCONN, notified), then resets
    the connection: out_error takes the reset, and a frontend sleeping on
    its port is woken for it, as for any error the backend sets."""
    sock_id, ring, peer = _accepted_pair(raw)
    sock = socket_of(backend, raw, sock_id)
    peer.shutdown(socket.SHUT_WR)
    raw.wait(lambda: ring.in_error != 0)
    assert ring.in_error == -_errno.ENOTCONN
    sock.flush()  # the run that set in_error has notified
    raw.drain_events()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # a reset
    raw.wait_notified(ring.port)  # a missing notification times out
    assert ring.out_error == -_errno.EPIPE


def test_a_host_socket_error_after_the_end_of_the_stream_is_out_error_by_its_errno(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the peer's FIN, the error the host socket reports (a reset
    says EPIPE there; here a retransmission timeout, which SO_ERROR stands
    in for) is out_error, by its own errno, in Xen's numbering."""
    timed_out = threading.Event()

    class TimedOut(socket.socket):
        def getsockopt(self, level: int, option: int, *args: Any) -> Any:
            if (level, option) == (socket.SOL_SOCKET, socket.SO_ERROR) and timed_out.is_set():
                return errno.ETIMEDOUT
            return super().getsockopt(level, option, *args)

    _host_sockets_are(monkeypatch, TimedOut)
    sock_id, ring, peer = _accepted_pair(raw)
    sock = socket_of(backend, raw, sock_id)
    assert sock.host is not None
    peer.shutdown(socket.SHUT_WR)
    raw.wait(lambda: ring.in_error != 0)
    assert ring.in_error == -_errno.ENOTCONN
    sock.flush()
    timed_out.set()
    sock._on_host_event(sock.host.fileno(), select.EPOLLERR | select.EPOLLHUP)
    raw.wait(lambda: ring.out_error != 0)
    assert ring.out_error == -_errno.ETIMEDOUT
    peer.close()


def test_no_data_into_an_in_ring_whose_error_the_frontend_set(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """A producer stops on in_error (Linux's frontend writes -EBADF there
    after RELEASE; any frontend may): the host's bytes stay with the host."""
    sock_id, ring, peer = _accepted_pair(raw)
    ring.put(_wire.IN_ERROR_OFFSET, -_errno.EBADF)
    # A run the CONNECT queued may have looked at in_error before the store
    # above and be about to receive: it would take the bytes sent below, as
    # any producer may that checked before the frontend wrote.  Every run
    # from now on sees the error.
    socket_of(backend, raw, sock_id).flush()
    peer.sendall(b"unwanted")  # in the backend's socket when sendall returns
    # Two guest writes: the second reaches the host only after the Work's
    # receive pass that followed the first.
    peer.setblocking(False)
    for word in (b"ping", b"pong"):
        ring.write(word)
        raw.wait(lambda w=word: _peek(peer, 4) == w)
        assert peer.recv(4) == word
    assert ring.get(_wire.IN_PROD_OFFSET) == 0
    assert ring.in_error == -_errno.EBADF


def test_send_failure_sets_out_error(raw: RawFrontend) -> None:
    _, ring, peer = _accepted_pair(raw)
    # Reset the connection: the backend's next send fails.
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    chunk = b"z" * 1000

    def failed() -> bool:
        ring.write(chunk)
        return ring.out_error != 0

    raw.wait(failed)
    assert ring.out_error in (-_errno.EPIPE, -_errno.ECONNRESET)
    assert ring.out_error != -_errno.EAGAIN
    # The receive side reports the reset too, never EAGAIN.
    raw.wait(lambda: ring.in_error != 0)
    assert ring.in_error in (-_errno.ECONNRESET, -_errno.ENOTCONN)


_SIGPIPE_CHILD = """
import signal, socket, struct, sys
sys.path[:0] = sys.argv[1:]  # for pvcalls_rawfront, and the racewindow it imports
from pvcalls_rawfront import RawFrontend
import pvcalls
from pvcalls import _errno
from xenback.sim import SimHost

# As an application that wants a shell's behaviour in pipelines does.
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
with SimHost() as host, pvcalls.Backend(host.dom0, cpus=2) as backend:
    raw = RawFrontend(host, host.create_domain("guest"))
    server = socket.create_server(("127.0.0.1", 0))
    sock_id, ring = raw.connect_socket(server.getsockname())
    peer, _ = server.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # a reset: the receive reports it, the next send is EPIPE
    raw.wait(lambda: ring.in_error == -_errno.ECONNRESET)
    ring.write(b"into a closed connection")
    raw.wait(lambda: ring.out_error != 0)
    print(ring.out_error)
    raw.close()
"""


def test_a_send_into_a_reset_connection_raises_no_sigpipe() -> None:
    """The backend's process may not ignore SIGPIPE (an embedding program
    that restored its default): a guest writing into a reset connection
    gets -EPIPE in out_error, and the backend lives on."""
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", _SIGPIPE_CHILD, *helper_path(here)],
        capture_output=True, text=True, check=False, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"{-_errno.EPIPE}\n"), result.stderr


def _host_sockets_are(monkeypatch: pytest.MonkeyPatch, cls: type[socket.socket]) -> None:
    """The host sockets CONNECT makes from now on are ``cls``: for
    pvcalls._socket's name of the module only, the rest of the process
    (the simulated hypervisor, the test's servers) keeps its sockets."""
    module = types.SimpleNamespace(**vars(socket))
    module.socket = cls
    monkeypatch.setattr(_socket, "socket", module)


def test_no_send_after_one_failed(raw: RawFrontend, backend: pvcalls.Backend,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a send failed and out_error says so, the socket sends no more:
    the error the guest read stays, whatever the guest writes next."""
    sends: list[int] = []

    class FailingSends(socket.socket):
        def sendmsg(self, *args: Any) -> int:
            sends.append(1)
            if len(sends) == 1:
                raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    _host_sockets_are(monkeypatch, FailingSends)
    sock_id, ring, _peer = _accepted_pair(raw)
    ring.write(b"first")
    raw.wait(lambda: ring.out_error != 0)
    assert ring.out_error == -_errno.ECONNRESET
    ring.write(b"second")  # notifies: the Work runs again
    sock = socket_of(backend, raw, sock_id)
    sock.kick()
    sock.flush()
    assert (ring.out_error, len(sends)) == (-_errno.ECONNRESET, 1)
    assert ring.get(_wire.OUT_CONS_OFFSET) == 0



def test_a_send_failing_at_release_leaves_nothing_to_linger(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """RELEASE sends what the out ring still holds; if that send fails, the
    rest is not handed to the lingerer, whose sends on the failed
    connection would only fail again (or, worse, go through after the
    error): the host socket is closed with it."""
    sends: list[int] = []

    class FailingSends(socket.socket):
        def sendmsg(self, *args: Any) -> int:
            sends.append(1)
            raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))

    _host_sockets_are(monkeypatch, FailingSends)
    adopted: list[bytes] = []
    adopt = backend.lingerer.adopt

    def adopt_seen(host: socket.socket, domid: int, data: bytes, *args: Any,
                   **kwargs: Any) -> bool:
        adopted.append(data)
        return adopt(host, domid, data, *args, **kwargs)

    monkeypatch.setattr(backend.lingerer, "adopt", adopt_seen)
    sock_id, ring, peer = _accepted_pair(raw)
    assert ring.write(b"unsent", notify=False) == 6  # the Work does not look
    assert raw.release(sock_id).ret == 0
    assert (len(sends), adopted) == (1, [])
    peer.settimeout(TIMEOUT)
    assert peer.recv(16) == b""


def _receives_counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the receive system calls of the host sockets CONNECT makes
    from now on: one item in the list returned per call."""
    receives: list[int] = []

    class CountedReceives(socket.socket):
        def recv_into(self, *args: Any) -> int:
            receives.append(1)
            return super().recv_into(*args)

        def recvmsg_into(self, *args: Any) -> Any:
            receives.append(1)
            return super().recvmsg_into(*args)

    _host_sockets_are(monkeypatch, CountedReceives)
    return receives


def _guest_writes(ring: Any, peer: socket.socket, sock: ActiveSocket, *words: bytes) -> None:
    """The guest writes each of ``words`` into ``ring`` in turn; each
    reaches ``peer`` whole, and ``sock``'s Work is done with it (the
    flush) before the next: each write is a run of the Work of its own."""
    for word in words:
        ring.write(word)
        assert peer.recv(16) == word
        sock.flush()


def test_a_work_woken_by_the_frontend_alone_does_not_receive(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """No receive system call unless the host socket signalled since the
    last one drained it: a guest that only sends costs no recv per write."""
    receives = _receives_counted(monkeypatch)
    sock_id, ring, peer = _accepted_pair(raw)
    sock = socket_of(backend, raw, sock_id)
    sock.flush()  # not run yet: connected at once, it waits for an event
    before = len(receives)
    peer.settimeout(TIMEOUT)
    _guest_writes(ring, peer, sock, b"one", b"two", b"three")
    assert len(receives) == before
    peer.sendall(b"back")  # the host socket signals: one receive takes it
    assert raw.recv_exactly(ring, 4) == b"back"


def test_a_host_signal_is_taken_by_one_receive(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host socket's signal is used up by the receive it caused: once
    the data it announced is in the ring, the guest's writes after it cost
    no receive again (each would find the socket empty), until the next."""
    receives = _receives_counted(monkeypatch)
    sock_id, ring, peer = _accepted_pair(raw)
    sock = socket_of(backend, raw, sock_id)
    peer.settimeout(TIMEOUT)
    peer.sendall(b"first")
    assert raw.recv_exactly(ring, 5) == b"first"
    sock.flush()
    before = len(receives)
    assert before >= 1
    _guest_writes(ring, peer, sock, b"one", b"two", b"three")
    assert len(receives) == before
    peer.sendall(b"back")
    assert raw.recv_exactly(ring, 4) == b"back"


def test_a_host_signal_with_nothing_to_read_is_used_up_too(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edge of the host socket with nothing to read behind it (write
    space, while a send was blocked) costs the receive that finds the
    socket empty (EAGAIN), and no more: the guest's writes after it cost
    none, until the next signal."""
    receives = _receives_counted(monkeypatch)
    sock_id, ring, peer = _accepted_pair(raw)
    sock = socket_of(backend, raw, sock_id)
    assert sock.host is not None
    sock.flush()
    before = len(receives)
    sock._on_host_event(sock.host.fileno(), select.EPOLLOUT)
    sock.flush()
    assert len(receives) == before + 1
    peer.settimeout(TIMEOUT)
    _guest_writes(ring, peer, sock, b"one", b"two", b"three")
    assert len(receives) == before + 1
    peer.sendall(b"back")
    assert raw.recv_exactly(ring, 4) == b"back"


def test_a_short_send_consumes_only_what_was_sent(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A send that takes part of what the out ring holds (the host's send
    buffer nearly full) consumes that part only, and counts that part
    only in the socket's stats: the rest goes with the next sends, in
    order."""
    class ShortSends(socket.socket):
        def sendmsg(self, buffers: Any, *args: Any) -> int:
            # At most 7 bytes of the first buffer.
            return super().sendmsg([bytes(memoryview(buffers[0])[:7])], *args)

    _host_sockets_are(monkeypatch, ShortSends)
    sock_id, ring, peer = _accepted_pair(raw)
    data = bytes(range(256)) * 4
    assert ring.write(data) == len(data)
    peer.settimeout(TIMEOUT)
    got = bytearray()
    while len(got) < len(data):
        got += peer.recv(len(data))
    assert bytes(got) == data
    raw.wait(lambda: ring.get(_wire.OUT_CONS_OFFSET) == len(data))
    row, = (r for r in backend.stats().sockets if r.id == sock_id)
    assert row.bytes_out == len(data)


def test_full_in_ring_is_resumed_when_the_guest_reads(raw: RawFrontend) -> None:
    """Flow control: the host sends more than the ring holds; nothing is
    lost while the guest reads slowly, and EAGAIN never reaches in_error."""
    _, ring, peer = _accepted_pair(raw, order=1)
    data = os.urandom(20 * _wire.flex_ring_size(1))
    peer.setblocking(True)
    import threading

    sender = threading.Thread(target=peer.sendall, args=(data,))
    sender.start()
    got = bytearray()

    def slow() -> bool:
        got.extend(ring.read(1000))
        assert ring.in_error == 0
        return len(got) == len(data)

    raw.wait(slow, timeout=60)
    sender.join(10)
    assert bytes(got) == data


def test_a_run_out_of_budget_goes_on_by_itself(raw: RawFrontend,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket's Work that used up IO_BUDGET with more to move queues
    itself again: nobody else would when the frontend consumed, without
    notifying, from an in ring it did not see full (pvcalls.frontend
    notifies only after consuming from a full ring).  Here the guest takes
    what the ring held while the Work is between finding room and
    receiving; the ring is not full after that receive, and the host
    socket still holds data."""
    monkeypatch.setattr(_socket, "IO_BUDGET", 1)  # every run that moves a byte is out of budget
    _, ring, peer = _accepted_pair(raw, order=1)
    peer.sendall(b"a" * 100)
    raw.wait(lambda: ring.get(_wire.IN_PROD_OFFSET) == 100)
    receiving = PauseAt.in_method(monkeypatch, ActiveSocket, "_rx", "if len(views) == 1:")
    data = b"b" * (ring.size + 100)
    peer.sendall(data)
    assert receiving.reached.wait(TIMEOUT)  # room for size - 100 bytes found
    try:
        got = ring.read(notify=False)
    finally:
        receiving.resume()
    assert got == b"a" * 100
    got = b""
    while len(got) < len(data):
        raw.wait_notified(ring.port)  # as a frontend sleeping for data
        got += ring.read(only_if_full=True)
    assert got == data


def test_bytes_received_count_against_the_budget(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stops once it has moved IO_BUDGET bytes, received ones too
    (the guest's writes wait for the next run, behind the other sockets of
    the CPU): a socket busy receiving does not keep its CPU."""
    monkeypatch.setattr(_socket, "IO_BUDGET", 1)
    sock_id, ring, peer = _accepted_pair(raw)
    sock = socket_of(backend, raw, sock_id)
    sock.flush()
    runs: list[list[tuple[int, int]]] = []  # per run: (sent, received) per iteration
    real_run, real_tx, real_rx = sock.func, ActiveSocket._tx, ActiveSocket._rx
    receiving = PauseAt(real_rx, "if len(views) == 1:")

    def run(self: ActiveSocket) -> None:
        runs.append([])
        real_run(self)

    def tx(self: ActiveSocket, data_ring: Any, host: socket.socket) -> int:
        sent = real_tx(self, data_ring, host)
        runs[-1].append((sent, 0))
        return sent

    def rx(self: ActiveSocket, data_ring: Any, host: socket.socket) -> int:
        received: int = receiving.run(lambda: real_rx(self, data_ring, host))
        runs[-1][-1] = (runs[-1][-1][0], received)
        return received

    monkeypatch.setattr(sock, "func", run)  # what the Work calls: _run, taken at creation
    monkeypatch.setattr(ActiveSocket, "_tx", tx)
    monkeypatch.setattr(ActiveSocket, "_rx", rx)
    peer.sendall(b"x" * 100)
    assert receiving.reached.wait(TIMEOUT)  # a run found data to receive
    try:
        assert ring.write(b"y" * 50, notify=False) == 50  # for that run's next iteration
    finally:
        receiving.resume()
    peer.settimeout(TIMEOUT)
    got = b""
    while len(got) < 50:
        got += peer.recv(64)
    assert got == b"y" * 50 and raw.recv_exactly(ring, 100) == b"x" * 100
    sock.flush()
    receiving_run = next(r for r in runs if any(received for _, received in r))
    assert receiving_run == [(0, 100)]  # and the send came with another run


def test_a_run_that_drains_both_ways_makes_one_pass(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that sent the whole out ring and read the host socket short
    stops after that pass: what comes next is announced (the guest's
    notify after it writes, the host socket's next edge), and a pass that
    finds nothing costs the backend as much as one that moves a small
    request.  So each event of a round trip is one pass."""
    sock_id, ring, peer = _accepted_pair(raw)
    sock = socket_of(backend, raw, sock_id)
    sock.flush()
    passes: list[int] = []  # per run, once it has ended
    # The run in progress: the guest's last read notifies, and the run it
    # queues may start after the flush below, and be read half done.
    current = [0]
    real_run, real_tx = sock.func, ActiveSocket._tx

    def run(self: ActiveSocket) -> None:
        current[0] = 0
        real_run(self)
        passes.append(current[0])

    def tx(self: ActiveSocket, data_ring: Any, host: socket.socket) -> int:
        current[0] += 1
        sent: int = real_tx(self, data_ring, host)
        return sent

    monkeypatch.setattr(sock, "func", run)  # what the Work calls: _run, taken at creation
    monkeypatch.setattr(ActiveSocket, "_tx", tx)
    peer.settimeout(TIMEOUT)
    for _ in range(3):
        assert ring.write(b"q" * 64) == 64
        got = b""
        while len(got) < 64:
            got += peer.recv(64)
        peer.sendall(b"r" * 64)
        assert raw.recv_exactly(ring, 64) == b"r" * 64
    sock.flush()
    assert passes and passes == [1] * len(passes)


def test_ring_overflow_is_an_error_of_that_socket_only(raw: RawFrontend,
                                                       echo_server: Any) -> None:
    good_id, good = raw.connect_socket(echo_server.address)
    _, bad, peer = _accepted_pair(raw)
    # out_prod claims far more than the ring holds.
    bad.put(_wire.OUT_PROD_OFFSET, bad.get(_wire.OUT_CONS_OFFSET) + bad.size + 1)
    raw.evtchn.notify(bad.port)
    raw.wait(lambda: bad.in_error != 0 and bad.out_error != 0)
    assert bad.in_error == bad.out_error == -_errno.EINVAL
    peer.settimeout(TIMEOUT)  # a connection left open fails, not hangs
    assert peer.recv(10) == b""  # the host connection was shut down
    # The other socket carries on.
    raw.echo(good, b"still fine")
    assert raw.release(good_id).ret == 0


def test_data_ring_protocol_errors_are_logged_through_the_rate_limit(
        raw: RawFrontend, backend: pvcalls.Backend, caplog: pytest.LogCaptureFixture) -> None:
    """A guest breaking one data ring after another gets 10 log lines per
    interval, not one per socket."""
    caplog.set_level(logging.WARNING, logger="pvcalls")
    fe = backend._frontends[(raw.guest.domid, 0)]
    fe.ratelimit = RateLimit(f"dom{raw.guest.domid}", clock=lambda: 0.0)  # one interval
    for _ in range(12):
        _, ring, peer = _accepted_pair(raw, order=1)
        ring.put(_wire.OUT_PROD_OFFSET, ring.get(_wire.OUT_CONS_OFFSET) + ring.size + 1)
        raw.evtchn.notify(ring.port)
        raw.wait(lambda r=ring: r.out_error != 0)
        peer.close()
    broken = [r for r in caplog.records if "data ring protocol error" in r.getMessage()]
    assert len(broken) == 10


def test_a_socket_stopped_by_a_protocol_error_stays_stopped(raw: RawFrontend,
                                                           backend: pvcalls.Backend) -> None:
    """After a data ring protocol error the socket moves nothing more, even
    if the guest then repairs its indexes and clears the errors."""
    sock_id, ring, _peer = _accepted_pair(raw)
    cons = ring.get(_wire.OUT_CONS_OFFSET)
    ring.put(_wire.OUT_PROD_OFFSET, cons + ring.size + 1)
    raw.evtchn.notify(ring.port)
    raw.wait(lambda: ring.in_error != 0 and ring.out_error != 0)
    ring.put(_wire.OUT_PROD_OFFSET, cons)
    ring.put(_wire.IN_ERROR_OFFSET, 0)
    ring.put(_wire.OUT_ERROR_OFFSET, 0)
    assert ring.write(b"after the error") == 15
    sock = socket_of(backend, raw, sock_id)
    sock.kick()
    sock.flush()  # the socket's Work has run since the guest's write
    assert ring.get(_wire.OUT_CONS_OFFSET) == cons
    assert ring.get(_wire.IN_PROD_OFFSET) == 0
    assert (ring.in_error, ring.out_error) == (0, 0)



def test_a_reset_after_a_protocol_error_keeps_the_errors_the_guest_read(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket stopped by a data ring protocol error keeps -EINVAL in both
    error fields, the ones the guest was given, even when the peer then
    resets the connection and the host socket reports the error: nothing
    is taken from a socket that stopped."""
    errored = threading.Event()
    on_host_event = ActiveSocket._on_host_event

    def on_host_event_seen(self: ActiveSocket, fd: int, events: int) -> None:
        on_host_event(self, fd, events)  # queues the Work
        if events & select.EPOLLERR:
            errored.set()

    monkeypatch.setattr(ActiveSocket, "_on_host_event", on_host_event_seen)
    sock_id, ring, peer = _accepted_pair(raw)
    sock = socket_of(backend, raw, sock_id)
    ring.put(_wire.OUT_PROD_OFFSET, ring.get(_wire.OUT_CONS_OFFSET) + ring.size + 1)
    raw.evtchn.notify(ring.port)
    raw.wait(lambda: ring.in_error != 0 and ring.out_error != 0)
    peer.settimeout(TIMEOUT)
    assert peer.recv(10) == b""  # the host connection was shut down
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # a reset
    assert errored.wait(TIMEOUT)
    sock.flush()  # the Work that event queued has run
    assert (ring.in_error, ring.out_error) == (-_errno.EINVAL, -_errno.EINVAL)


@pytest.mark.parametrize("order", [6, _wire.MAX_PAGE_ORDER_LIMIT])
def test_rings_up_to_the_largest_page_order(make_frontend: Any, host: Any, order: int) -> None:
    """A backend offering a larger max-page-order serves rings that large
    (order 9: 512 grant references in the indexes page, 1 MiB each way)."""
    from workqueue import Topology

    with pvcalls.Backend(host.dom0, max_page_order=order, topology=Topology(2)):
        fe = make_frontend("big")
        assert fe.xs.read(f"{fe.be_path}/max-page-order") == str(order)
        _, ring, peer = _accepted_pair(fe, order)
        data = os.urandom(2 * _wire.flex_ring_size(order) + 4321)
        to_host, to_guest = _pump(fe, ring, peer, data)
        assert to_host == data and to_guest == data
        # One order more than offered is refused.
        if order < _wire.MAX_PAGE_ORDER_LIMIT:
            sock_id, _ = fe.socket()
            too_big = fe.new_ring(order + 1)
            server = socket.create_server(("127.0.0.1", 0))
            rsp = fe.response(fe.push_connect(sock_id, server.getsockname(), too_big))
            assert rsp.ret == -22
            server.close()
        fe.close()


@pytest.mark.parametrize("start", [0, 0xFFFFFFFF - 100])
def test_room_made_in_a_full_out_ring_is_notified(raw: RawFrontend, start: int) -> None:
    """A frontend that filled the out ring sleeps until told of room: the
    backend's consume of a full ring notifies (nothing else would wake it,
    the peer sends nothing back), also when out_prod wrapped through 2**32."""
    _, ring, peer = _accepted_pair(raw, order=1, start=start)
    raw.drain_events()
    assert ring.write(b"f" * ring.size) == ring.size  # full, in one produce
    raw.wait_notified(ring.port)
    peer.settimeout(TIMEOUT)
    got = bytearray()
    while len(got) < ring.size:
        got.extend(peer.recv(ring.size))
    assert bytes(got) == b"f" * ring.size
    assert ring.get(_wire.OUT_CONS_OFFSET) & 0xFFFFFFFF == (start + ring.size) & 0xFFFFFFFF


def test_room_made_in_an_out_ring_not_full_is_not_notified(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """The other half of that rule: room freed in an out ring that was not
    full (here one byte short) costs the frontend no wake-up.  (The
    simulated event channel is a pipe written by notify(): once the Work
    has run, a notification would be pending.)"""
    sock_id, ring, peer = _accepted_pair(raw, order=1)
    sock = socket_of(backend, raw, sock_id)
    sock.flush()
    raw.drain_events()
    assert ring.write(b"f" * (ring.size - 1)) == ring.size - 1
    peer.settimeout(TIMEOUT)
    got = 0
    while got < ring.size - 1:
        got += len(peer.recv(ring.size))
    wait_until(lambda: ring.get(_wire.OUT_CONS_OFFSET) == ring.size - 1)
    sock.flush()
    fired = []
    while (port := raw.evtchn.pending()) is not None:
        raw.evtchn.unmask(port)
        fired.append(port)
    assert ring.port not in fired


@pytest.mark.parametrize("broken", ["out", "in"])
def test_a_data_ring_protocol_error_is_notified(raw: RawFrontend, broken: str) -> None:
    """Impossible indexes, of the out ring (we consume) or of the in ring
    (we produce): the frontend learns of the error by its event channel,
    not only by looking at the indexes page."""
    _, ring, _peer = _accepted_pair(raw)
    raw.drain_events()
    if broken == "out":
        ring.put(_wire.OUT_PROD_OFFSET, ring.get(_wire.OUT_CONS_OFFSET) + ring.size + 1)
    else:  # a consumer more than a ring behind the producer
        ring.put(_wire.IN_CONS_OFFSET,
                 ring.get(_wire.IN_PROD_OFFSET) - ring.size - 1)
    raw.evtchn.notify(ring.port)
    raw.wait_notified(ring.port)
    assert ring.in_error == ring.out_error == -_errno.EINVAL


def test_a_send_failure_is_notified(raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """out_error set by a failed send is announced on the event channel,
    even when the receive side changes nothing (here: in_error was set by
    the frontend, so the backend does not receive).

    The socket's Work is let finish first: a connect the host completed
    late is answered by a run that goes on to receive, and if it read
    in_error before the frontend set it and received after the reset, it
    would write the reset's error over the frontend's (as Linux's backend
    would: in_error has two writers, and no store of either can be
    conditional on the other's)."""
    sock_id, ring, peer = _accepted_pair(raw)
    socket_of(backend, raw, sock_id).flush()
    ring.put(_wire.IN_ERROR_OFFSET, -_errno.EBADF)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # a reset: the backend's next send fails
    raw.drain_events()
    deadline = time.monotonic() + TIMEOUT
    while ring.out_error == 0:
        assert time.monotonic() < deadline, "the send never failed"
        ring.write(b"x")  # one byte per notification: the ring never fills
        raw.wait_notified(ring.port)
    assert ring.out_error in (-_errno.EPIPE, -_errno.ECONNRESET)
    assert ring.in_error == -_errno.EBADF


def test_data_and_fin_in_one_epoll_event_end_the_stream(
        raw: RawFrontend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data and the peer's FIN reported by one (edge-triggered) event: the
    data comes as a short read, and the end of stream only with one more
    receive, which the hang-up in that event calls for (nothing will
    report the FIN again)."""
    held: list[tuple[ActiveSocket, int, int]] = []
    deliver = ActiveSocket._on_host_event

    def hold(self: ActiveSocket, fd: int, events: int) -> None:
        held.append((self, fd, events))

    monkeypatch.setattr(ActiveSocket, "_on_host_event", hold)  # bound at add_fd
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock_id, ring = raw.connect_socket(server.getsockname())
        peer, _ = server.accept()
        peer.sendall(b"last words")
        peer.close()
        wait_until(lambda: any(events & select.EPOLLRDHUP for _, _, events in held))
    sock, fd, _ = held[0]
    merged = 0
    for _, _, events in held:
        merged |= events
    deliver(sock, fd, merged)  # as one event
    raw.wait(lambda: ring.in_error != 0)
    assert ring.read() == b"last words"
    assert ring.in_error == -_errno.ENOTCONN
    assert raw.release(sock_id).ret == 0


def _bug_in(monkeypatch: pytest.MonkeyPatch, method: str,
            victims: Callable[[ActiveSocket], bool]) -> None:
    """ActiveSocket.<method> raises RuntimeError("a bug") for the sockets
    ``victims`` says: a bug of ours in serving them."""
    real = getattr(ActiveSocket, method)

    def buggy(self: ActiveSocket, *args: Any) -> Any:
        if victims(self):
            raise RuntimeError("a bug")
        return real(self, *args)

    monkeypatch.setattr(ActiveSocket, method, buggy)


def _bugs_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The tracebacks of our bugs that pvcalls logged (not the workqueue)."""
    return [r for r in caplog.records if r.name.startswith("pvcalls")
            and r.exc_info and isinstance(r.exc_info[1], RuntimeError)]


@pytest.mark.parametrize("method", ["_tx", "_rx"])
def test_a_bug_moving_data_fails_that_socket_only(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any, echo_server: Any,
        make_frontend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, method: str) -> None:
    """An exception escaping a socket's Work (a bug of ours, here as it
    sends or receives): that socket fails, -EIO in in_error and out_error,
    notified, its host connection closed, and it is served no more; the
    traceback is logged once.  The guest releases it as any socket, which
    frees everything.  Its other sockets and the other guests' carry on.
    (The exception used to reach only the workqueue's log, at every
    notification, and the guest waited for ever.)"""
    caplog.set_level(logging.ERROR)
    good_id, good = raw.connect_socket(echo_server.address)
    other = make_frontend("other")
    other_id, other_ring = other.connect_socket(echo_server.address)
    server = socket.create_server(("127.0.0.1", 0))
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    before = resources(backend, host)
    watched = watched_fds(backend)
    assert raw.response(raw.push_connect(sock_id, server.getsockname(), ring)).ret == 0
    peer, _ = server.accept()
    server.close()
    bad = socket_of(backend, raw, sock_id)
    bad.flush()  # the run its CONNECT queued is over
    _bug_in(monkeypatch, method, lambda sock: sock is bad)
    raw.drain_events()
    if method == "_tx":
        assert ring.write(b"never sent") == 10
    else:
        peer.sendall(b"never received")
    raw.wait_notified(ring.port)
    assert (ring.in_error, ring.out_error) == (-_errno.EIO, -_errno.EIO)
    peer.settimeout(TIMEOUT)
    try:
        assert peer.recv(16) == b""  # the host connection was closed
    except ConnectionResetError:
        assert method == "_rx"  # closed with what the peer sent unread
    for _ in range(3):  # woken again: it is not served any more
        raw.evtchn.notify(ring.port)
        bad.kick()
    bad.flush()
    assert bad.disabled and not bad.pending
    assert ring.get(_wire.OUT_CONS_OFFSET) == 0 and ring.get(_wire.IN_PROD_OFFSET) == 0
    bugs = _bugs_logged(caplog)
    assert len(bugs) == 1, [r.getMessage() for r in bugs]
    assert f"dom{raw.guest.domid} socket {sock_id:#x}" in bugs[0].getMessage()
    row, = (r for r in backend.stats().sockets if r.id == sock_id)
    assert row.state == "failed"
    raw.echo(good, b"still fine")
    other.echo(other_ring, b"so is this")
    assert raw.release(sock_id).ret == 0
    assert resources(backend, host) == before
    assert watched_fds(backend) == watched
    assert raw.unexpected == []
    peer.close()
    assert raw.release(good_id).ret == 0 and other.release(other_id).ret == 0


@pytest.mark.parametrize("before", ["in", "in-reset", "out"])
def test_a_bug_keeps_the_error_the_guest_was_given(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        before: str) -> None:
    """A socket failing for a bug of ours after one direction of it had
    ended (the peer's FIN: in_error -ENOTCONN; its reset met by a receive:
    in_error -ECONNRESET; its reset met by a send: out_error): that error
    stays, which the guest may have read already, and only the other
    direction's says EIO."""
    sock_id, ring, peer = _accepted_pair(raw)
    bad = socket_of(backend, raw, sock_id)
    bad.flush()  # the run its CONNECT queued is over
    if before != "out":
        ended = -_errno.ENOTCONN
        if before == "in-reset":
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ended = -_errno.ECONNRESET
        peer.close()  # FIN, or a reset
        raw.wait(lambda: ring.in_error != 0)
        assert ring.in_error == ended
        _bug_in(monkeypatch, "_tx", lambda sock: sock is bad)
        ring.write(b"x")
        raw.wait(lambda: ring.out_error != 0)
        assert (ring.in_error, ring.out_error) == (ended, -_errno.EIO)
    else:
        # Before the peer resets, so that the run it sets off sends, fails,
        # then receives: the bug.
        _bug_in(monkeypatch, "_rx", lambda sock: sock is bad)
        assert ring.write(b"x", notify=False) == 1
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset
        raw.wait(lambda: ring.in_error != 0)
        assert ring.in_error == -_errno.EIO
        assert ring.out_error in (-_errno.ECONNRESET, -_errno.EPIPE)
    assert raw.release(sock_id).ret == 0


def test_bugs_moving_data_are_logged_through_the_rate_limit(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Each socket's failure is logged through its guest's rate limit: a
    guest that can set a bug of ours off, socket after socket, gets 10
    lines per interval, not one per socket."""
    caplog.set_level(logging.ERROR)
    fe = backend._frontends[(raw.guest.domid, 0)]
    fe.ratelimit = RateLimit(f"dom{raw.guest.domid}", clock=lambda: 0.0)  # one interval
    _bug_in(monkeypatch, "_tx", lambda sock: True)
    for _ in range(12):
        _, ring, peer = _accepted_pair(raw, order=1)
        ring.write(b"x")
        raw.wait(lambda r=ring: r.out_error != 0)
        assert ring.out_error == -_errno.EIO
        peer.close()
    assert len(_bugs_logged(caplog)) == 10
