"""The backend against a guest that changes its shared pages at any moment,
from another CPU: each value the backend acts on is the one it checked, and
no guest can keep the backend's shared workers to itself.

A guest's concurrent store is made deterministic by wrapping the backend
step it would race with: the wrapper does what the guest's other CPU does
in between."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from pvcalls_rawfront import TIMEOUT, RawFrontend

import pvcalls
from pvcalls import _wire
from pvcalls._backend import _Frontend
from pvcalls._socket import ActiveSocket
from xenback.ring import FlexRing

ENOTSUPP = -524
_UNKNOWN = 0x7FFF0000  # a command no backend knows: answered at once, no effect


def test_a_frontend_producing_requests_without_end_does_not_starve_another(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest that takes each answer and asks again at once, on another
    CPU, always has a request waiting when the backend looks: its command
    Work must still give way, or the other frontends' command Works (and the
    listening sockets', on the same workqueue) wait for as long as it goes
    on once the workqueue runs as many items as it may (``max_active``,
    here 1 so that one flooder suffices)."""
    flooder = make_frontend("flooder")
    other = make_frontend("other")
    backend.cmd_wq.set_max_active(1)
    limit = 5000  # where the flood stops by itself, so that the test ends
    flooding = threading.Event()
    other_handled = threading.Event()
    pushed = 0
    pushed_when_other_handled: list[int] = []
    handle = _Frontend._handle

    def handle_and_ask_again(self: _Frontend, raw: bytes) -> None:
        nonlocal pushed
        handle(self, raw)
        if self.domid == other.guest.domid:
            pushed_when_other_handled.append(pushed)
            other_handled.set()
        elif self.domid == flooder.guest.domid and not other_handled.is_set() and pushed < limit:
            # The guest, meanwhile: takes the answer, pushes a new request.
            flooder.poll_responses()
            flooder.push(_UNKNOWN)
            pushed += 1
            if pushed == 10:
                flooding.set()

    monkeypatch.setattr(_Frontend, "_handle", handle_and_ask_again)
    flooder.push(_UNKNOWN)
    assert flooding.wait(TIMEOUT)
    _, rsp = other.socket()
    assert rsp.ret == 0
    assert other_handled.wait(TIMEOUT)  # the answer is out before the wrapper records
    # Answered while the flood went on, not once it stopped by itself.
    assert pushed_when_other_handled and pushed_when_other_handled[0] < limit, pushed
    # And the flooder is still served: its last request gets its answer.
    flooder.wait(lambda: flooder.ring is not None and flooder.ring.rsp_cons == pushed + 1)
    assert set(r.ret for r in flooder.responses.values()) == {ENOTSUPP}


def test_room_is_announced_by_the_index_the_backend_consumed_from(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the out ring was full before a consume (and the guest is
    waiting to be told of room) is decided on the ``out_cons`` the consume
    started from, not on the word read from the page once more: a guest
    that rewrites it in between, on another CPU, does not make the backend
    judge one value and act on another."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock_id, ring = raw.connect_socket(server.getsockname(), order=1)
        conn, _ = server.accept()  # a peer that only takes (no echo, no notify for data)
        with conn:
            front = backend._frontends[(raw.guest.domid, 0)]
            sock = front._sockets[sock_id]
            assert isinstance(sock, ActiveSocket) and sock.ring is not None
            out_ring = sock.ring.out_ring
            readable = FlexRing.readable

            def readable_then_guest_stores(self: FlexRing) -> tuple[memoryview, ...]:
                views = readable(self)
                if self is out_ring and views:
                    # The guest, now: "nothing was pending" (out_cons = out_prod).
                    ring.put(_wire.OUT_CONS_OFFSET, ring.get(_wire.OUT_PROD_OFFSET))
                return views

            monkeypatch.setattr(FlexRing, "readable", readable_then_guest_stores)
            raw.drain_events()
            data = bytes(range(256)) * (ring.size // 256)
            assert ring.write(data, notify=False) == ring.size  # full: the guest waits for room
            raw.evtchn.notify(ring.port)
            raw.wait_notified(ring.port)
            conn.settimeout(TIMEOUT)
            got = b""
            while len(got) < len(data):
                got += conn.recv(len(data) - len(got))
            assert got == data
            # The backend's own index, written back from what it consumed.
            assert ring.get(_wire.OUT_CONS_OFFSET) & 0xFFFFFFFF == ring.size
        assert raw.release(sock_id).ret == 0
