"""pvcalls Backend: the I/O model under load -- integrity and order on 100
sockets while a CPU goes offline and comes back, and even placement."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import socket
from typing import Any

import pytest
from pvcalls_rawfront import TIMEOUT, RawFrontend

import pvcalls
from pvcalls import _wire
from workqueue import Topology

SOCKETS = 100
PER_SOCKET = 48 * 1024  # each way: 4.8 MB in all, each way


def _spread(backend: pvcalls.Backend) -> dict[int, int]:
    return {c.cpu: c.sockets for c in backend.stats().cpus if c.online}


def test_integrity_and_order_across_cpu_hotplug(
        raw: RawFrontend, backend: pvcalls.Backend, topology: Topology,
        echo_server: Any) -> None:
    rng = random.Random(5)
    socks = []
    for _ in range(SOCKETS):
        sock_id, ring = raw.connect_socket(echo_server.address, order=2)
        data = rng.randbytes(PER_SOCKET)
        socks.append({"id": sock_id, "ring": ring, "data": data, "sent": 0,
                      "got": hashlib.sha256(), "received": 0})
    spread = _spread(backend)
    assert sum(spread.values()) == SOCKETS and max(spread.values()) - min(spread.values()) <= 1

    victim = 2
    total = SOCKETS * PER_SOCKET
    phase = {"down": False, "up": False, "moved": 0}

    def step() -> bool:
        received = 0
        for s in socks:
            ring = s["ring"]
            if s["sent"] < PER_SOCKET:
                s["sent"] += ring.write(memoryview(s["data"])[s["sent"]:])
            chunk = ring.read()
            if chunk:
                s["got"].update(chunk)
                s["received"] += chunk.__len__()
            assert ring.in_error == 0 and ring.out_error == 0
            received += s["received"]
        if not phase["down"] and received > total // 3:
            before = {r.id: r.cpu for r in backend.stats().sockets}
            topology.cpu_down(victim)  # synchronous: sockets re-homed on return
            after = {r.id: r.cpu for r in backend.stats().sockets}
            phase["moved"] = sum(1 for k in before if before[k] == victim)
            assert all(cpu != victim for cpu in after.values())
            assert all(after[k] == before[k] for k in before if before[k] != victim)
            spread = _spread(backend)
            assert victim not in spread
            assert max(spread.values()) - min(spread.values()) <= 1
            phase["down"] = True
        elif phase["down"] and not phase["up"] and received > 2 * total // 3:
            topology.cpu_up(victim)
            phase["up"] = True
        return received == total

    raw.wait(step, timeout=60)
    assert phase["up"] and phase["moved"] >= SOCKETS // 4 - 1
    for s in socks:
        assert s["got"].digest() == hashlib.sha256(s["data"]).digest()
    rows = {r.id: r for r in backend.stats().sockets}
    for s in socks:
        assert rows[s["id"]].bytes_out == rows[s["id"]].bytes_in == PER_SOCKET
    # New sockets fill the CPU that came back first.
    new_ids = [raw.connect_socket(echo_server.address, order=1)[0] for _ in range(5)]
    new_cpus = {r.cpu for r in backend.stats().sockets if r.id in new_ids}
    assert new_cpus == {victim}
    for s in socks:
        assert raw.release(s["id"]).ret == 0
    for sock_id in new_ids:
        assert raw.release(sock_id).ret == 0
    assert sum(_spread(backend).values()) == 0


def test_stats_are_frozen_snapshots(raw: RawFrontend, backend: pvcalls.Backend,
                                    echo_server: Any) -> None:
    sock_id, ring = raw.connect_socket(echo_server.address)
    stats = backend.stats()
    assert stats.nr_ioworkers == 4 and stats.frontends == 1
    row, = stats.sockets
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.cpu = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.cpus[0].sockets = 9  # type: ignore[misc]
    plain = stats.as_dict()
    assert plain["sockets"][0]["id"] == sock_id
    assert sum(plain["cpus"].values()) == 1
    raw.send_all(ring, b"12345")
    raw.recv_exactly(ring, 5)
    assert row.bytes_out == 0  # the snapshot did not change
    assert backend.stats().sockets[0].bytes_out == 5


def test_plain_stats_list_the_online_cpus_only(raw: RawFrontend, backend: pvcalls.Backend,
                                               topology: Topology, echo_server: Any) -> None:
    """as_dict()'s cpus: the online CPUs' active sockets; stats() itself
    keeps the offline CPU, marked so."""
    raw.connect_socket(echo_server.address)
    topology.cpu_down(3)
    try:
        stats = backend.stats()
        assert [(c.cpu, c.online) for c in stats.cpus] == [
            (0, True), (1, True), (2, True), (3, False)]
        cpus = stats.as_dict()["cpus"]
        assert sorted(cpus) == [0, 1, 2] and sum(cpus.values()) == 1
    finally:
        topology.cpu_up(3)


def test_stats_count_each_direction_apart(raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """bytes_out is guest -> host, bytes_in host -> guest: different
    amounts each way, so that swapped counters show."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        _, ring = raw.connect_socket(server.getsockname())
        peer, _ = server.accept()
    with peer:
        raw.send_all(ring, b"guest to host")
        peer.settimeout(TIMEOUT)
        got = b""
        while len(got) < 13:
            got += peer.recv(13)
        peer.sendall(b"hi")
        assert raw.recv_exactly(ring, 2) == b"hi"
        # The peer may take the bytes before the backend has counted them
        # (as its send returns); it has once it consumed them.
        raw.wait(lambda: ring.get(_wire.OUT_CONS_OFFSET) == ring.get(_wire.OUT_PROD_OFFSET))
        row, = backend.stats().sockets
        assert (row.bytes_out, row.bytes_in) == (13, 2)


def test_a_socket_placed_as_its_cpu_goes_down_follows_the_move(
        raw: RawFrontend, backend: pvcalls.Backend, topology: Topology, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cpu_down between the load index's assign() and the socket's store
    of its CPU: the move (and its rehome) came first, and must win."""
    index = backend.load_index
    assign = index.assign
    downed: list[int] = []

    def assign_then_cpu_down(key: Any, weight: int = 1) -> int:
        cpu = assign(key, weight)
        topology.cpu_down(cpu)  # moves the key, and rehomes the socket
        downed.append(cpu)
        return cpu  # stale already

    monkeypatch.setattr(index, "assign", assign_then_cpu_down)
    sock_id, ring = raw.connect_socket(echo_server.address)
    monkeypatch.undo()
    stats = backend.stats()
    (row,) = stats.sockets
    assert row.cpu != downed[0] and row.cpu in topology.online()
    # Where the socket says it is, the index counts it (stats' per-CPU counts).
    assert {c.cpu: c.sockets for c in stats.cpus}[row.cpu] == 1
    raw.echo(ring, b"still echoed")
    assert raw.release(sock_id).ret == 0


@pytest.mark.parametrize(("cmd", "where"), [
    (_wire.PVCALLS_CONNECT, "sock.attach_ring("),  # homed, not yet in the table
    (_wire.PVCALLS_RELEASE, "entry.teardown(into=ended)"),  # out of the table, still homed
])
def test_a_snapshot_s_cpu_counts_are_its_rows(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, cmd: int, where: str) -> None:
    """Each CPU's count is the snapshot's active rows homed there.  It used
    to come from the load index, read apart from the rows, which counts a
    socket from its placement to its teardown: under churn the counts and
    the rows disagreed (most of the time, with four threads connecting)."""
    from racewindow import PauseAt

    from pvcalls import _backend

    sock_id, _ = raw.connect_socket(echo_server.address)
    real = _backend._HANDLERS[cmd]
    pause = PauseAt(real, where)
    monkeypatch.setitem(_backend._HANDLERS, cmd,
                        lambda fe, request, req: pause.run(lambda: real(fe, request, req)))
    if cmd == _wire.PVCALLS_CONNECT:
        other, rsp = raw.socket()
        assert rsp.ret == 0
        req_id = raw.push_connect(other, echo_server.address, raw.new_ring())
    else:
        req_id = raw.push_release(sock_id)
    assert pause.reached.wait(TIMEOUT)
    try:
        stats = backend.stats()
    finally:
        pause.resume()
    assert raw.response(req_id).ret == 0
    homed = [row.cpu for row in stats.sockets if row.cpu is not None]
    assert sum(c.sockets for c in stats.cpus) == len(homed)
    for cpu in stats.cpus:
        assert cpu.sockets == homed.count(cpu.cpu)


def test_stats_tell_apart_the_sockets_of_a_domain_s_devices(
        host: Any, backend: pvcalls.Backend) -> None:
    """Socket ids are each frontend's: two pvcalls devices of one domain
    (two pvcalls-nc in one guest, say) use the same ids.  Each row says
    which device its socket is of, or two rows could not be told apart."""
    guest = host.create_domain("two-devices")
    first = RawFrontend(host, guest, devid=0)
    second = RawFrontend(host, guest, devid=1)
    assert backend.stats().frontends == 2  # devices, not sockets (none yet)
    assert first.socket(0x42)[1].ret == 0
    assert second.socket(0x42)[1].ret == 0
    assert second.bind(0x42, ("127.0.0.1", 0)).ret == 0
    rows = {(r.domain, r.device, r.id): r.kind for r in backend.stats().sockets}
    assert rows == {(guest.domid, 0, 0x42): "new", (guest.domid, 1, 0x42): "passive"}
    assert [s["device"] for s in backend.stats().as_dict()["sockets"]].count(1) == 1
    first.close()
    second.close()


def test_stats_of_a_closed_backend_hold_no_socket(host: Any, topology: Topology,
                                                  echo_server: Any) -> None:
    backend = pvcalls.Backend(host.dom0, topology=topology)
    raw = RawFrontend(host, host.create_domain("closing"))
    raw.connect_socket(echo_server.address)
    assert len(backend.stats().sockets) == 1
    backend.close()
    stats = backend.stats()
    assert (stats.frontends, stats.sockets) == (0, ())
    assert [(c.cpu, c.sockets) for c in stats.cpus] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    raw.dispose()
