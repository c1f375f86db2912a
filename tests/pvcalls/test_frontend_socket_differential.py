r"""A PVSocket against a TCP socket.socket, differentially (hypothesis,
stateful): random steps run in lockstep in two worlds, and every outcome
(value, bytes, exception type and errno) must be the same in both.

World "real" is a loopback TCP client socket, world "pv" a PVSocket of a
frontend on the simulated host, connected through the backend; each is
connected to a peer that is a plain host socket accepted from a listener
of its own.  The test drives the peers itself, step by step (no thread
races the steps), and keeps a model of what is in flight each way, so
that it compares only what is well defined:

* Before a receive, each client is made to hold all that its peer sent
  (and the end of the stream, once sent), by a blocking peek: how much a
  receive returns then does not depend on timing.  A receive that would
  block for good is not made; one that would block a while is made only
  with the short timeout.
* Each world's peer must receive exactly what its client's sends said
  they took.  Once the peer has read it, the test waits until the client
  holds none of it either (the real socket's send queue, the pv world's
  out ring, which the backend empties after its peer may have read the
  bytes): a send that fits in the room left then takes all, in both
  worlds; one of more takes all only in blocking mode, else what fits,
  which differs (the buffers do).
* The peer's end (a FIN or a reset) comes only once the peer has read all
  the client sent: unread data would make it a reset, racing the data.

Where a PVSocket differs on purpose, as the frontend's docstring says, is
in :data:`DOCUMENTED`, each with its reason: there the pv world's outcome
must be the documented one.  What the walk does not do, and why, is in
:data:`NOT_DRIVEN`.

The suite runs a few derandomized walks.  Long campaigns (they shrink a
failure, unless PV_PARITY_SHRINK=0):
    PV_PARITY_EXAMPLES=2000 PV_PARITY_SEED=7 \
        pytest tests/pvcalls/test_frontend_socket_differential.py
(``PV_PARITY_STEPS`` sets the walk's length.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import selectors
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pvcalls_rawfront import Call
from test_frontend import recv_exactly

import pvcalls
from pvcalls._wire import OUT_CONS_OFFSET, OUT_PROD_OFFSET, flex_ring_size
from pvcalls.frontend import FRONTEND_RING_ORDER
from pvcalls.frontend._common import U32
from xenback.sim import SimHost

TIMEOUT = 10.0
#: The timeout of calls that are to time out: short, as the walk waits it out.
SHORT = 0.01
#: One direction of a PVSocket's data ring.
RING = flex_ring_size(FRONTEND_RING_ORDER)

PEEK, DONTWAIT, WAITALL = int(socket.MSG_PEEK), int(socket.MSG_DONTWAIT), int(socket.MSG_WAITALL)

#: Data sent either way: slices of one random block, so that a byte out of
#: place shows.
PATTERN = random.Random(0).randbytes(1 << 18)

TIMEOUTS = st.sampled_from([None, 0.0, SHORT, TIMEOUT])
#: Sizes around the ring's and a TCP segment's, and any up to twice a ring.
SIZES = st.one_of(st.sampled_from([0, 1, 2, RING - 1, RING, RING + 1, 65536]),
                  st.integers(0, 2 * RING + 100))
BUFSIZES = st.one_of(st.sampled_from([0, 1, 3, RING, RING + 1]), st.integers(0, RING + 100))
RECV_FLAGS = st.sets(st.sampled_from([PEEK, DONTWAIT, WAITALL])).map(sum)
SEND_FLAGS = st.sampled_from([0, DONTWAIT, int(socket.MSG_NOSIGNAL), int(socket.MSG_MORE)])


@dataclass(frozen=True)
class Outcome:
    """What a call did: its value, or its exception's type and errno."""

    value: Any = None
    error: type[BaseException] | None = None
    errno: int | None = None

    def __repr__(self) -> str:
        if self.error is None:
            return f"-> {self.value!r}"
        name = errno.errorcode.get(self.errno or 0, self.errno)
        return f"raises {self.error.__name__}({name})"


def outcome(call: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(call())
    except OSError as exc:
        return Outcome(error=type(exc), errno=exc.errno)
    except (TypeError, ValueError, OverflowError) as exc:
        return Outcome(error=type(exc))


def fails(exc: type[BaseException], err: int | None = None) -> Outcome:
    return Outcome(error=exc, errno=err)


_NO_ADDRESS = "the backend does not tell the guest the address it got"
_NO_DESCRIPTOR = "the socket has no descriptor of its own"

#: Where a PVSocket differs from a TCP socket, each as pvcalls.frontend's
#: docstring says: (call, state) -> the PVSocket's outcome, and why.
#: There the real world is not asked (a shutdown() would leave the two
#: worlds different), and the pv world's outcome must be the documented one.
DOCUMENTED: dict[tuple[str, str], tuple[Outcome, str]] = {
    ("shutdown", "connected"): (
        fails(OSError, errno.EOPNOTSUPP),
        "the protocol releases whole sockets only: no half-close"),
    ("shutdown", "unconnected"): (
        fails(OSError, errno.ENOTCONN),
        "Linux's TCP refuses it too, but shuts the socket down all the same (a "
        "recv() then returns b'', a send() after connect() fails with EPIPE), "
        "which a PVSocket could not carry over a connection made later"),
    ("send", "unconnected"): (
        fails(OSError, errno.ENOTCONN),
        "as Linux's frontend: ENOTCONN where a TCP socket says EPIPE"),
    ("getsockname", "connected"): (Outcome(("0.0.0.0", 0)), _NO_ADDRESS),
    ("getsockname", "reset"): (Outcome(("0.0.0.0", 0)), _NO_ADDRESS),
    ("detach", "unconnected"): (fails(OSError, errno.EOPNOTSUPP), _NO_DESCRIPTOR),
    ("detach", "connected"): (fails(OSError, errno.EOPNOTSUPP), _NO_DESCRIPTOR),
    ("detach", "reset"): (fails(OSError, errno.EOPNOTSUPP), _NO_DESCRIPTOR),
    ("bind", "reset"): (
        fails(OSError, errno.EINVAL),
        "Linux lets go of a reset connection's port, so that bind() succeeds (though "
        "the socket can then neither listen nor connect); the PV Calls socket stays "
        "the connection's until close()"),
    ("accept with a timeout", "connected"): (
        fails(OSError, errno.EINVAL),
        "not listening: EINVAL at once, where CPython first waits, with a timeout, "
        "for the socket to poll readable (and times out if nothing comes)"),
    ("the peer's end", "closed with data unread"): (
        Outcome(b""),
        "a TCP socket closed with received data unread resets the connection; of "
        "a PVSocket's, only data still in the backend's host socket does: the "
        "backend (as Linux's) closes that socket, which sees nothing of the ring"),
}

#: What the walk does not do, as the worlds would differ for reasons that
#: are no PVSocket's, or only by timing.
NOT_DRIVEN = {
    "the client's send after the peer closed": (
        "the peer's stack answers with a reset, which races the client's next call"),
    "the peer's reset with data in flight to the client": (
        "the reset races the data"),
    "connect() once the connection was reset, but for the one that completes a "
    "connect() with a timeout (test_frontend_socket_parity)": (
        "Linux's socket can connect anew then, or says EINVAL after a shutdown(), "
        "depending on how it connected; a PV Calls socket is the failed "
        "connection's until close()"),
}


@dataclass
class World:
    """One side of the comparison: a client socket, the host listener it
    connects to, the peer that listener accepted, and what the client's
    sends took that the peer has not read yet."""

    name: str
    sock: Any
    listener: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    peer: socket.socket | None = None
    outbound: bytearray = field(default_factory=bytearray)
    #: makefile() streams still open (raw ones for reading, buffered for writing).
    streams: list[Any] = field(default_factory=list)

    def accept(self) -> None:
        self.listener.settimeout(TIMEOUT)
        self.peer, _ = self.listener.accept()
        self.peer.settimeout(TIMEOUT)

    def drain(self) -> None:
        """The peer reads all the client sent: exactly what its sends took.
        Then the client's side holds none of it either: all its buffer
        is room again."""
        assert self.peer is not None
        want, self.outbound = bytes(self.outbound), bytearray()
        got = recv_exactly(self.peer, len(want))
        assert got == want, f"{self.name}: the peer received other bytes than were sent"
        self.handed_on()

    def handed_on(self) -> None:
        """Wait until the client's side holds nothing of what the peer read."""
        wait_for(f"{self.name} has handed on all it sent", lambda: not self.unsent())

    def unsent(self) -> int:
        """What the client's side holds of what its sends took.  The pv
        world's out ring is emptied by the backend, which may tell only
        after the peer read the bytes: there is no call to ask, so the
        indexes are read."""
        if self.sock.fileno() < 0:
            return 0
        if isinstance(self.sock, socket.socket):
            queued = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, bytes(4))
            return int(struct.unpack("i", queued)[0])
        ring = self.sock._st.ring
        if ring is None:
            return 0
        prod, cons = (U32.unpack_from(ring.indexes, offset)[0]
                      for offset in (OUT_PROD_OFFSET, OUT_CONS_OFFSET))
        return (prod - cons) & 0xFFFFFFFF

    def close(self) -> None:
        for stream in self.streams:
            # A buffered writer whose flush failed still holds its data.
            with contextlib.suppress(OSError):
                stream.close()
        self.sock.close()
        if self.peer is not None:
            self.peer.close()
        self.listener.close()


def writable(s: Any) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_WRITE)
        assert sel.select(TIMEOUT), "never writable"


def wait_for(what: str, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


class SocketParity(RuleBasedStateMachine):
    """The two worlds, and what the peers sent and the clients did not
    receive yet (the same in both)."""

    def __init__(self, fe: pvcalls.Frontend) -> None:
        super().__init__()
        self.real = World("real", socket.socket())
        self.pv = World("pv", fe.socket())
        self.worlds = (self.real, self.pv)
        self.timeout: float | None = socket.getdefaulttimeout()
        self.connected = False
        self.close_requested = False
        self.closed = False         # for good: close() and no makefile() stream left
        self.inbound = bytearray()  # the peers sent, the clients have not received
        self.peer_eof = False       # the peers shut down their sending side
        self.peer_gone = False      # the peers closed: nothing more reaches them
        self.reset = False          # ... with a reset
        self.sent = 0               # offset in PATTERN of the next data

    def teardown(self) -> None:
        for w in self.worlds:
            w.close()

    # -- helpers ---------------------------------------------------------------------

    def state(self) -> str:
        if self.closed:
            return "closed"
        if self.reset:
            return "reset"
        return "connected" if self.connected else "unconnected"

    def close_if_last(self) -> None:
        if self.close_requested and not self.real.streams:
            self.closed = True

    def data(self, n: int) -> bytes:
        start = self.sent % (len(PATTERN) - n)
        self.sent += n
        return PATTERN[start : start + n]

    def both(self, name: str, call: Callable[[Any], Any]) -> Outcome:
        """``call(sock)`` in both worlds: the same outcome, or the pv world's
        documented one.  Returns the real world's (the pv world's if the
        real world is not asked)."""
        documented = DOCUMENTED.get((name, self.state()))
        if documented is not None:
            got = outcome(lambda: call(self.pv.sock))
            assert got == documented[0], f"{name}: pv {got}, documented {documented[0]}"
            return got
        real = outcome(lambda: call(self.real.sock))
        pv = outcome(lambda: call(self.pv.sock))
        assert real == pv, f"{name} ({self.state()}): real {real}, pv {pv}"
        return real

    def each(self, call: Callable[[World], Any]) -> tuple[Outcome, Outcome]:
        """``call(world)`` in each world, for the caller to compare."""
        return outcome(lambda: call(self.real)), outcome(lambda: call(self.pv))

    def settle(self) -> None:
        """Wait until each client holds all its peer sent, and the end of
        the stream once sent (as far as a data ring holds): then how much
        a receive returns does not depend on timing."""
        if not self.connected or self.closed or self.reset:
            return
        n = min(len(self.inbound) + self.peer_eof, RING)
        if n == 0:
            return
        for w in self.worlds:
            s = w.sock
            s.settimeout(None)
            try:
                got = s.recv(n, PEEK | WAITALL)
            finally:
                s.settimeout(self.timeout)
            assert got == self.inbound[:n], f"{w.name}: the peek saw other bytes"

    def effective_timeout(self, flags: int) -> float | None:
        """One call's timeout: MSG_DONTWAIT makes a blocking socket's call
        non-blocking; with a timeout CPython waits for readiness anyway."""
        return 0.0 if flags & DONTWAIT and self.timeout is None else self.timeout

    # -- connecting ------------------------------------------------------------------

    @initialize(first=st.sampled_from(["connect", "connect", "connect", "none"]))
    def start(self, first: str) -> None:
        if first == "connect":
            self.connect()

    @precondition(lambda self: self.timeout != SHORT and not self.reset)
    @rule()
    def connect(self) -> None:
        """connect() to the world's listener.  Not with the short timeout:
        the pv world's CONNECT answer may take longer."""
        results = []
        for w in self.worlds:
            results.append(outcome(lambda w=w: w.sock.connect(w.listener.getsockname())))
        real, pv = results
        assert real == pv, f"connect ({self.state()}): real {real}, pv {pv}"
        if self.connected or self.closed:
            return
        if real.errno == errno.EINPROGRESS:
            for w in self.worlds:
                writable(w.sock)  # the handshake is over: both say so alike
        else:
            assert real == Outcome(None), real
        for w in self.worlds:
            w.accept()
        self.connected = True

    # -- the socket's mode -----------------------------------------------------------

    @rule(value=TIMEOUTS)
    def settimeout(self, value: float | None) -> None:
        # On a closed socket too, with EBADF: CPython sets the timeout
        # before it fails to set the descriptor's mode.
        if self.both("settimeout", lambda s: s.settimeout(value)).errno in (None, errno.EBADF):
            self.timeout = value

    @rule(flag=st.booleans())
    def setblocking(self, flag: bool) -> None:
        if self.both("setblocking", lambda s: s.setblocking(flag)).errno in (None, errno.EBADF):
            self.timeout = None if flag else 0.0

    @invariant()
    def same_mode(self) -> None:
        for w in self.worlds:
            assert w.sock.gettimeout() == self.timeout, w.name
            assert w.sock.timeout == self.timeout, w.name
            assert w.sock.getblocking() == (self.timeout != 0.0), w.name

    # -- sending ---------------------------------------------------------------------

    @rule(how=st.sampled_from(["send", "sendall", "sendto", "sendmsg"]), size=SIZES,
          flags=SEND_FLAGS)
    def send(self, how: str, size: int, flags: int) -> None:
        timeout = self.effective_timeout(flags)
        connected = self.connected and not self.closed
        if connected and self.peer_gone and not self.reset:
            return  # what the peer's stack does with it races our next call
        if connected and not self.reset:
            if how == "sendall" and size > RING and timeout in (0.0, SHORT):
                # A sendall() that fails part way does not say how much it
                # sent: well defined only while the ring is sure to hold it.
                size = RING
            if max(len(w.outbound) for w in self.worlds) + size > RING:
                for w in self.worlds:
                    w.drain()
        data = self.data(size)
        reader = size > RING and (timeout is None or how == "sendall" and timeout == TIMEOUT)

        def call(s: Any) -> Any:
            if how == "send":
                return s.send(data, flags)
            if how == "sendall":
                return s.sendall(data, flags)
            if how == "sendto":
                return s.sendto(data, flags, ("127.0.0.1", 9))
            return s.sendmsg([data[: size // 2], data[size // 2 :]], [], flags)

        if not connected or self.reset:
            self.both("send", call)
            return

        def sending(w: World) -> int:
            # A send of more than the buffers hold, which is to take all:
            # the peer reads meanwhile (exactly as much as the send is to take).
            assert w.peer is not None
            peer = w.peer
            if reader:
                expected = len(w.outbound) + size  # not in the thread: that may start late
                reading = Call(lambda: recv_exactly(peer, expected))
            ret = call(w.sock)
            n = size if how == "sendall" else ret
            w.outbound += data[:n]
            if reader:
                reading.join(TIMEOUT + 1)
                assert reading.error is None, f"{w.name}: the peer's read: {reading.error!r}"
                got = reading.result
                assert got == bytes(w.outbound), f"{w.name}: the peer received other bytes"
                w.outbound.clear()
                w.handed_on()
            return n

        # Room for all of it (the peer reads when it did not fit): a send
        # of more takes all in blocking mode, else what fits, which differs.
        fits = size <= RING - max(len(w.outbound) for w in self.worlds)
        real, pv = self.each(sending)
        if how == "sendall":
            assert real == pv == Outcome(size), f"{how}: real {real}, pv {pv}"
            return
        if fits or timeout is None:
            assert real == pv == Outcome(size), f"{how} of {size}: real {real}, pv {pv}"
        else:
            assert real.error is None and pv.error is None, f"{how}: real {real}, pv {pv}"
            assert 0 < real.value <= size and 0 < pv.value <= size, (real, pv)

    @precondition(lambda self: self.connected and not self.closed and not self.peer_gone)
    @rule()
    def peer_reads(self) -> None:
        for w in self.worlds:
            w.drain()

    # -- receiving -------------------------------------------------------------------

    @rule(how=st.sampled_from(["recv", "recv_into", "recvfrom", "recvfrom_into",
                               "recvmsg", "recvmsg_into"]),
          bufsize=BUFSIZES, flags=RECV_FLAGS, whole_buffer=st.booleans())
    def recv(self, how: str, bufsize: int, flags: int, whole_buffer: bool) -> None:
        """A receive of ``bufsize`` bytes: into a buffer that size, or
        (``whole_buffer`` false) into a larger one with ``nbytes``, which
        asks for the whole buffer if 0."""
        into = how in ("recv_into", "recvfrom_into")
        asked = bufsize + 5 if into and not whole_buffer and not bufsize else bufsize
        # CPython's recv() and recv_into() of nothing return before the
        # kernel; the others' wait as a receive of a byte, and take nothing.
        at_once = not asked and how in ("recv", "recv_into")
        timeout = self.effective_timeout(flags)
        live = self.connected and not self.closed and not self.reset and not at_once
        if live:
            self.settle()
            if not self.inbound and not self.peer_eof and timeout in (None, TIMEOUT):
                return  # would block for good (or for long)
            if (flags & WAITALL and timeout is None and asked > len(self.inbound)
                    and not self.peer_eof):
                return  # waits for more than will come

        def call(s: Any) -> Any:
            if how == "recv":
                return s.recv(bufsize, flags)
            if how == "recvfrom":
                return s.recvfrom(bufsize, flags)
            if how == "recvmsg":
                return s.recvmsg(bufsize, 0, flags)
            # Into a buffer larger than asked for: the rest must stay as it was.
            buf = bytearray(b"\xee" * (bufsize + 5))
            view = memoryview(buf)
            if how == "recvmsg_into":
                half = bufsize // 2
                n, *rest = s.recvmsg_into([view[:half], view[half:bufsize]], 0, flags)
            elif how == "recv_into":
                n = s.recv_into(view[:bufsize] if whole_buffer else view,
                                0 if whole_buffer else bufsize, flags)
                rest = []
            else:
                n, *rest = s.recvfrom_into(view[:bufsize] if whole_buffer else view,
                                           0 if whole_buffer else bufsize, flags)
            assert buf[n:] == b"\xee" * (len(buf) - n), "written past what it returned"
            return bytes(buf[:n]), *rest

        got = self.both(how, call)
        if not live or got.error is not None:
            return
        data = got.value if how == "recv" else got.value[0]
        expected = min(asked, len(self.inbound))
        assert data == self.inbound[:expected], \
            f"{how}({asked}): {len(data)} bytes, the first {expected} expected"
        if not flags & PEEK:
            del self.inbound[:expected]

    @precondition(lambda self: self.connected and not self.closed and not self.peer_eof
                  and not self.inbound and self.timeout in (None, TIMEOUT))
    @rule(size=st.integers(1, 512), flags=st.sampled_from([0, WAITALL]))
    def recv_woken_by_the_peer(self, size: int, flags: int) -> None:
        """A receive that blocks until the peer sends: one segment, which
        arrives whole."""
        data = self.data(size)

        def receiving(w: World) -> bytes:
            assert w.peer is not None
            call = Call(lambda: w.sock.recv(size, flags))
            w.peer.sendall(data)
            call.join()
            if call.error is not None:
                raise call.error
            return call.result

        real, pv = self.each(receiving)
        assert real == pv == Outcome(data), f"recv woken: real {real}, pv {pv}"

    # -- the peer --------------------------------------------------------------------

    @precondition(lambda self: self.connected and not self.closed and not self.peer_eof)
    @rule(size=st.one_of(st.sampled_from([1, RING]), st.integers(1, RING)))
    def peer_sends(self, size: int) -> None:
        size = min(size, RING - len(self.inbound))
        data = self.data(size)
        for w in self.worlds:
            assert w.peer is not None
            w.peer.sendall(data)
        self.inbound += data

    @precondition(lambda self: self.connected and not self.closed and not self.peer_eof)
    @rule()
    def peer_shuts_down_sending(self) -> None:
        for w in self.worlds:
            assert w.peer is not None
            w.peer.shutdown(socket.SHUT_WR)
        self.peer_eof = True

    @precondition(lambda self: self.connected and not self.closed and not self.peer_gone)
    @rule(reset=st.booleans())
    def peer_closes(self, reset: bool) -> None:
        """The peer closes once it has read all the client sent (unread
        data would make it a reset, racing the data), with a reset if
        asked and not in :data:`NOT_DRIVEN`: also after the peer's FIN,
        once the clients have received all that came before it."""
        if reset and self.inbound:
            reset = False
        for w in self.worlds:
            w.drain()
            assert w.peer is not None
            if reset:
                w.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.peer.close()
        self.peer_eof = self.peer_gone = True
        if reset:
            self.reset = True
            for w in self.worlds:
                # Public and harmless: getpeername() fails once the reset came.
                wait_for(f"{w.name} sees the reset", lambda s=w.sock: not connected(s))

    # -- shutting down and closing ---------------------------------------------------

    @rule(how=st.sampled_from([socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR, -1, 3]))
    def shutdown(self, how: int) -> None:
        name = "shutdown" if how in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR) \
            else "shutdown(bad how)"
        self.both(name, lambda s: s.shutdown(how))

    @rule()
    def close(self) -> None:
        # The data the peer sent all in the ring (see DOCUMENTED), unless
        # more than it holds.
        self.settle()
        self.both("close", lambda s: s.close())
        self.close_requested = True
        self.close_if_last()

    @precondition(lambda self: self.closed and self.connected and not self.peer_gone)
    @rule()
    def peer_sees_the_end(self) -> None:
        """Once the client closed, its peer receives what it sent, then the
        end: a FIN, or a reset if the client left data unread."""
        def end(w: World) -> bytes:
            w.drain()
            assert w.peer is not None
            return w.peer.recv(1)

        real, pv = self.each(end)
        documented = DOCUMENTED.get(("the peer's end", "closed with data unread"))
        if self.inbound and documented is not None:
            assert real == fails(ConnectionResetError, errno.ECONNRESET), real
            assert pv == documented[0], f"the peer's end: pv {pv}"
        else:
            assert real == pv, f"the peer's end: real {real}, pv {pv}"
        for w in self.worlds:
            assert w.peer is not None
            w.peer.close()
        self.peer_eof = self.peer_gone = True

    # -- makefile() ------------------------------------------------------------------

    @precondition(lambda self: len(self.real.streams) < 3)
    @rule(mode=st.sampled_from(["rb", "wb"]))
    def makefile(self, mode: str) -> None:
        buffering = 0 if mode == "rb" else None  # raw for reading: no read-ahead
        real, pv = self.each(lambda w: w.streams.append(
            w.sock.makefile(mode, buffering=buffering)))
        assert real == pv, f"makefile: real {real}, pv {pv}"

    @precondition(lambda self: self.real.streams)
    @rule(index=st.integers(0, 2), size=st.integers(0, RING + 1))
    def stream_io(self, index: int, size: int) -> None:
        index %= len(self.real.streams)
        reading = self.real.streams[index].mode == "rb"
        if reading:
            live = self.connected and not self.reset
            if live:
                self.settle()
                if not self.inbound and not self.peer_eof and self.timeout in (None, TIMEOUT):
                    return
            real, pv = self.each(lambda w: w.streams[index].read(size))
            assert real == pv, f"stream read({size}): real {real}, pv {pv}"
            if live and real.error is None and real.value:
                assert real.value == self.inbound[: len(real.value)]
                del self.inbound[: len(real.value)]
            return
        if self.closed:
            real, pv = self.each(lambda w: (w.streams[index].write(b"x"),
                                            w.streams[index].flush()))
            assert real == pv, f"stream write (closed): real {real}, pv {pv}"
            return
        if (not self.connected or self.reset or self.peer_gone
                or self.timeout not in (None, TIMEOUT)):
            return  # a buffered writer's errors are its own, and not what is tested here
        size = min(size, RING)
        if max(len(w.outbound) for w in self.worlds) + size > RING:
            for w in self.worlds:
                w.drain()
        data = self.data(size)

        def write(w: World) -> None:
            stream = w.streams[index]
            assert stream.write(data) == size
            stream.flush()
            w.outbound += data

        real, pv = self.each(write)
        assert real == pv, f"stream write({size}): real {real}, pv {pv}"

    @precondition(lambda self: self.real.streams)
    @rule(index=st.integers(0, 2))
    def stream_close(self, index: int) -> None:
        index %= len(self.real.streams)
        real, pv = self.each(lambda w: w.streams.pop(index).close())
        assert real == pv, f"stream close: real {real}, pv {pv}"
        self.close_if_last()

    # -- everything else -------------------------------------------------------------

    @rule(call=st.sampled_from([
        "fileno", "getpeername", "getsockname", "so_error", "so_type", "get_inheritable",
        "recv0", "send0", "sendall0", "listen", "bind", "accept", "connect_ex", "detach",
    ]))
    def other(self, call: str) -> None:
        listener = self.real.listener.getsockname()
        calls: dict[str, Callable[[Any], Any]] = {
            # Not the same number: open or not.
            "fileno": lambda s: s.fileno() >= 0,
            # Each world's listener has a port of its own.
            "getpeername": lambda s: s.getpeername() in (self.real.listener.getsockname(),
                                                         self.pv.listener.getsockname()),
            "getsockname": lambda s: s.getsockname(),
            "so_error": lambda s: s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR),
            "so_type": lambda s: s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
            "get_inheritable": lambda s: s.get_inheritable(),
            "recv0": lambda s: s.recv(0),
            "send0": lambda s: s.send(b""),
            "sendall0": lambda s: s.sendall(b""),
            "listen": lambda s: s.listen(),
            "bind": lambda s: s.bind(("127.0.0.1", 0)),
            "accept": lambda s: s.accept(),
            "connect_ex": lambda s: s.connect_ex(listener),
            "detach": lambda s: s.detach(),
        }
        if call in ("listen", "bind", "accept", "connect_ex") and self.state() == "unconnected":
            return  # would make the socket a listener, or connect it
        if call == "connect_ex" and self.reset:
            return  # see NOT_DRIVEN
        name = {"send0": "send", "sendall0": "send"}.get(call, call)
        if call == "accept" and self.timeout:
            name = "accept with a timeout"
        self.both(name, calls[call])


def connected(s: Any) -> bool:
    try:
        s.getpeername()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def host() -> Iterator[SimHost]:
    with SimHost() as h:
        yield h


@pytest.fixture(scope="module")
def fe(host: SimHost) -> Iterator[pvcalls.Frontend]:
    with pvcalls.Backend(host.dom0, max_ioworkers=1), \
            pvcalls.Frontend(host.create_domain("differential"), timeout=TIMEOUT) as f:
        yield f


CAMPAIGN = "PV_PARITY_SEED" in os.environ
#: Shrinking replays a failure: one that timing made is reported as flaky.
SHRINK = CAMPAIGN and os.environ.get("PV_PARITY_SHRINK") != "0"


@pytest.mark.timeout(0 if CAMPAIGN else 60)
def test_pvsocket_behaves_as_a_tcp_socket(fe: pvcalls.Frontend) -> None:
    def machine() -> SocketParity:
        return SocketParity(fe)

    if CAMPAIGN:
        machine = seed(int(os.environ["PV_PARITY_SEED"]))(machine)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=int(os.environ.get("PV_PARITY_EXAMPLES", "50")),
        stateful_step_count=int(os.environ.get("PV_PARITY_STEPS", "40")),
        derandomize=not CAMPAIGN,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        # In the suite, no shrinking: a failure is reported as generated,
        # well inside the test's timeout; campaigns shrink.
        phases=[Phase.generate, Phase.shrink] if SHRINK else [Phase.generate],
    ))
