"""Frontend(ring_order=...): data rings larger than Linux's order 4."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pvcalls_rawfront import echo_through

import pvcalls
from pvcalls import _wire
from pvcalls.frontend import FRONTEND_RING_ORDER
from xenback.sim import SimHost

TIMEOUT = 10.0
BACKEND_ORDER = 6


@pytest.fixture(scope="module")
def host() -> Iterator[SimHost]:
    with SimHost() as h:
        yield h


@pytest.fixture(scope="module")
def backend(host: SimHost) -> Iterator[Any]:
    with pvcalls.Backend(host.dom0, max_ioworkers=2, max_page_order=BACKEND_ORDER) as b:
        yield b


@pytest.fixture(scope="module")
def guest(host: SimHost, backend: Any) -> Any:
    return host.create_domain("guest")


@pytest.fixture
def echo_address() -> Iterator[tuple[str, int]]:
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield lsock.getsockname()
    lsock.close()
    t.join(TIMEOUT)


def test_default_is_linux_order(guest: Any) -> None:
    assert FRONTEND_RING_ORDER == 4
    assert pvcalls.Frontend(guest).ring_order == 4


@pytest.mark.parametrize("order", [1, BACKEND_ORDER])
def test_ring_of_the_order_asked_for_carries_data(
        host: SimHost, guest: Any, echo_address: tuple[str, int], order: int) -> None:
    size = _wire.flex_ring_size(order)
    data = os.urandom(5 * size + 123)  # wraps the ring several times
    with pvcalls.Frontend(guest, ring_order=order) as fe, fe.socket() as s:
        s.settimeout(TIMEOUT)
        grants = host.hypervisor.stats()["grants"]
        s.connect(echo_address)
        # The indexes page and 2**order data pages: no page more.
        assert host.hypervisor.stats()["grants"] - grants == 1 + (1 << order)
        ring = s._st.ring
        assert ring is not None
        intf = _wire.ffi.from_buffer("struct pvcalls_data_intf *", ring.indexes)
        assert intf.ring_order == order
        _wire.ffi.release(intf)  # the ring's pages are unshared at close
        assert ring.inq.size == ring.outq.size == size
        echo_through(s, data)


def test_order_above_backend_max_page_order_is_refused(guest: Any) -> None:
    fe = pvcalls.Frontend(guest, ring_order=BACKEND_ORDER + 1, timeout=TIMEOUT)
    with pytest.raises(OSError) as info:
        fe.open()
    assert info.value.errno == errno.EPROTONOSUPPORT
    assert "max-page-order" in str(info.value)
    assert fe.device is None  # cleaned up: the device can be added again
    with pvcalls.Frontend(guest, ring_order=BACKEND_ORDER) as again:
        with again.socket() as s:
            assert not s.closed


@pytest.mark.parametrize("order, exc", [
    (0, ValueError), (_wire.MAX_PAGE_ORDER_LIMIT + 1, ValueError), (-1, ValueError),
    (True, TypeError), (4.0, TypeError), ("4", TypeError),
])
def test_bad_ring_order_is_rejected(guest: Any, order: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="ring_order"):
        pvcalls.Frontend(guest, ring_order=order)
