"""A stateful fuzzer of the PV Calls backend, from hostile frontends.

One seeded random driver (single-threaded, like :class:`RawFrontend`)
interleaves, over several hostile frontends of one backend, valid and
invalid commands on existing, released, reused and random ids, data ring
abuse while data flows, RELEASE racing data and connects in progress,
event channel storms and xenbus state changes (Closing mid-traffic, then
a reconnect), indexes pages given again as a recycling frontend gives them
and as a hostile one abuses that (the backend's ring hints: see
op_recycle), while a well-behaved bystander's echoed traffic must stay
byte-exact.  Invariants checked as it goes and at the end:

* every request is answered exactly once, ``req_id``, ``cmd`` and id echoed,
  ``ret <= 0``; at a quiescent point the backend's socket table
  (``stats()``) holds exactly the ids the answers say it holds;
* a data ring the driver did not abuse carries bytes exactly, also through
  the 32-bit wrap of its indexes and after its ``ring_order`` and ``ref[]``
  words were scribbled over after CONNECT (read once, then ignored);
* a ring given again carries bytes through the pages its CONNECT named
  (not those of an earlier ring on the same indexes page), in one map
  request when they are those of the hint; one naming a page not granted
  is refused with EINVAL; pages no ring maps any more are not written;
  the hints the backend keeps stay within RING_HINTS and RING_HINT_REFS;
* once every frontend is gone: no frontend, socket, bound port, CPU load,
  grant mapping or new descriptor is left.

Used by the suite with a fixed seed and few steps, and run long by hand::

    python tests/pvcalls/pvcalls_fuzz.py --seeds 0-200 --steps 300
    python tests/pvcalls/pvcalls_fuzz.py --seeds 0-200 --ring-hints 4  # few hints: outgrown
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

if __name__ == "__main__":  # run by hand: the paths pytest sets (pyproject.toml)
    import sys
    _tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # tools/ last, for its toolargs: nothing there hides a package.
    sys.path[:0] = [os.path.dirname(_tests), _tests]
    sys.path.append(os.path.join(os.path.dirname(_tests), "tools"))

from pvcalls_rawfront import (
    TIMEOUT,
    DataRing,
    Pages,
    RawFrontend,
    bound_ports,
    dispose_all,
    threads,
    wait_until,
)

import pvcalls
from pvcalls import _socket, _wire
from xenback.ring import RingError

EINTR, EBADF, EEXIST, EINVAL, EMFILE = -4, -9, -17, -22, -24
ENOTSUPP = -524
_MARKER = 0x7FFF0001  # an unknown command: answered at once, in ring order


class FuzzFailure(AssertionError):
    pass


@cache
def _canary(page: int) -> bytes:
    """What a pool page no ring maps holds (see Hostile.check_rings)."""
    return struct.pack("<I", 0xC0FFEE00 | page & 0xFF) * (_wire.PAGE_SIZE // 4)


def check(cond: bool, what: str) -> None:
    if not cond:
        raise FuzzFailure(what)


@dataclass
class Conn:
    """The guest side of one active socket (CONNECT or ACCEPT)."""

    ring: DataRing
    clean: bool = True           # not abused: its bytes must come back exactly
    echo: bool = True            # its peer is the echo server
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)


class Hostile:
    """One hostile frontend and the driver's model of its backend state."""

    def __init__(self, fz: Fuzzer, name: str) -> None:
        self.fz = fz
        self.fe = fz.make_frontend(name)
        self.rng = fz.rng
        self.pool = [RawFrontend.new_id() for _ in range(6)]
        self._req_ids = itertools.count(self.rng.randrange(1 << 31))
        # Pages the guest keeps to give again, as a thrifty frontend keeps
        # its rings, across RELEASE and reconnects (see op_recycle):
        # indexes pages given before, and a pool of data pages that rings
        # are laid out on in windows, overlapping or not.
        self.spares: list[Any] = []
        self.data_pool: Any = None
        self.canary: set[int] = set()   # pool pages no ring has mapped since we filled them
        self.gone: list[int] = []       # refs of pages unshared (maybe granted again since)
        self.readonly: Any = None       # a page granted read-only
        self.reconnected = False        # since op_recycle last looked
        self.reset()

    def reset(self) -> None:
        # req_id -> (cmd, id, extra): requests not answered yet.
        self.pending: dict[int, tuple[int, int, int]] = {}
        self.model: dict[int, str] = {}       # id -> "new", "active", "passive", "listening"
        self.conns: dict[int, Conn] = {}      # id -> its ring, once CONNECT/ACCEPT answered 0
        self.rings_of: dict[int, Conn] = {}   # req_id of CONNECT/ACCEPT -> the ring it gave
        self.addresses: dict[int, tuple[str, int]] = {}  # listening id -> address
        # req_id of a CONNECT or ACCEPT -> the answers its ring allows
        # (EINVAL alone for a page not granted, 0 alone for a good ring
        # connecting to the echo server).
        self.expected: dict[int, frozenset[int]] = {}
        self.watched: dict[int, int | None] = {}  # req_id -> its answer's ret, once come

    @property
    def domid(self) -> int:
        return int(self.fe.guest.domid)

    # -- requests ----------------------------------------------------------

    def next_req_id(self) -> int:
        return next(self._req_ids) & 0xFFFFFFFF

    def push(self, cmd: int, sock_id: int, body: bytes = b"", extra: int = 0,
             notify: bool = True) -> int:
        ring = self.fe.ring
        assert ring is not None
        if ring.free_slots == 0:
            self.collect()
            self.fe.wait(lambda: ring.free_slots > 0)
        req_id = self.next_req_id()
        while req_id in self.pending:
            req_id = self.next_req_id()
        raw = struct.pack("=IIQ", req_id, cmd, sock_id) + body.ljust(48, b"\0")[:48]
        ring.push_request(raw)
        self.pending[req_id] = (cmd, sock_id, extra)
        if ring.push_requests() and notify:
            self.fe.evtchn.notify(self.fe.port)
        return req_id

    def collect(self) -> None:
        """Take every response that came, check it, update the model."""
        fe = self.fe
        fe.poll_responses()
        check(fe.unexpected == [], f"dom{self.domid}: second answers {fe.unexpected}")
        for req_id in list(fe.responses):
            rsp = fe.responses.pop(req_id)
            check(req_id in self.pending,
                  f"dom{self.domid}: answer to no pending request: {rsp}")
            cmd, sock_id, extra = self.pending.pop(req_id)
            check((rsp.cmd, rsp.id) == (cmd, sock_id),
                  f"dom{self.domid}: {rsp} does not echo cmd {cmd} id {sock_id:#x}")
            check(rsp.ret <= 0, f"dom{self.domid}: positive ret {rsp}")
            self.apply(req_id, cmd, sock_id, extra, rsp.ret)

    def apply(self, req_id: int, cmd: int, sock_id: int, extra: int, ret: int) -> None:
        self.fz.seen[f"{_wire.PVCALLS_COMMANDS.get(cmd, 'other')} {ret}"] += 1
        conn = self.rings_of.pop(req_id, None)
        expected = self.expected.pop(req_id, None)
        if req_id in self.watched:
            self.watched[req_id] = ret
        check(expected is None or ret in expected,
              f"dom{self.domid}: {_wire.PVCALLS_COMMANDS.get(cmd)} of a ring laid out "
              f"{conn and (conn.ring.ring_order, conn.ring.refs)} answered {ret}, "
              f"not one of {expected}")
        if cmd == _MARKER:
            check(ret == ENOTSUPP, f"marker answered {ret}")
        elif ret != 0:
            if cmd == _wire.PVCALLS_ACCEPT and conn is not None:
                conn.ring.close()
            elif cmd == _wire.PVCALLS_CONNECT and conn is not None:
                conn.ring.close()
        elif cmd == _wire.PVCALLS_SOCKET:
            self.model[sock_id] = "new"
        elif cmd == _wire.PVCALLS_CONNECT:
            self.model[sock_id] = "active"
            if conn is not None:
                self.conns[sock_id] = conn
        elif cmd == _wire.PVCALLS_BIND:
            self.model[sock_id] = "passive"
        elif cmd == _wire.PVCALLS_LISTEN:
            self.model[sock_id] = "listening"
        elif cmd == _wire.PVCALLS_ACCEPT:
            self.model[extra] = "active"
            if conn is not None:
                conn.echo = False
                self.conns[extra] = conn
        elif cmd == _wire.PVCALLS_RELEASE:
            self.model.pop(sock_id, None)
            self.addresses.pop(sock_id, None)
            gone = self.conns.pop(sock_id, None)
            if gone is not None:
                self.fz.retired.append(gone)

    def quiesce(self) -> None:
        """Wait until every request pushed so far that is answered at once
        is answered (commands are handled in ring order), then check the
        backend's table against the model."""
        marker = self.push(_MARKER, 0)
        self.fe.wait(lambda: marker in self.fe.responses or self._collected(marker))
        self.collect()
        expected = set(self.model)
        for cmd, _, extra in self.pending.values():
            if cmd == _wire.PVCALLS_ACCEPT:
                expected.add(extra)
        held = {r.id for r in self.fz.backend.stats().sockets if r.domain == self.domid}
        check(held == expected, f"dom{self.domid}: backend holds {sorted(map(hex, held))}, "
              f"answers say {sorted(map(hex, expected))}")
        front = self.fz.backend._frontends.get((self.domid, 0))
        check(front is not None and front._reserved == 0,
              f"dom{self.domid}: {front and front._reserved} sockets still reserved")
        # The CPUs' loads, ports and mapped pages are those of the sockets
        # held (eventually: an ACCEPT's socket is placed as its connection
        # comes, a connect that fails late gives its ring back).
        try:
            wait_until(self.fz.consistent)
        except TimeoutError:
            raise FuzzFailure(f"loads, ports or mappings are not those of "
                              f"{self.fz.backend.stats()}") from None

    def _collected(self, req_id: int) -> bool:
        self.collect()
        return req_id not in self.pending

    # -- bodies --------------------------------------------------------------

    def any_id(self) -> int:
        r = self.rng.random()
        if r < 0.75:
            return self.rng.choice(self.pool)
        if r < 0.9 and self.model:
            return self.rng.choice(sorted(self.model))
        return self.rng.getrandbits(64)

    def pick(self, *kinds: str) -> int:
        """Mostly an id in one of ``kinds`` (the command fits it), else any."""
        fits = [i for i, k in self.model.items() if k in kinds]
        if fits and self.rng.random() < 0.75:
            return self.rng.choice(sorted(fits))
        return self.any_id()

    def address(self) -> tuple[str, int]:
        r = self.rng.random()
        if r < 0.7:
            return self.fz.echo_address
        if r < 0.8:
            return self.fz.blackhole_address    # stays in progress
        if r < 0.9:
            return self.fz.refused_address      # refused at once
        if self.addresses and r < 0.95:
            return self.rng.choice(list(self.addresses.values()))
        host = self.rng.choice(["0.0.0.0", "255.255.255.255", "224.0.0.1", "127.1.2.3",
                                "192.0.2.1", "127.0.0.1"])
        return (host, self.rng.choice([0, 1, self.rng.randrange(1, 65536)]))

    def new_ring(self) -> tuple[DataRing, bool]:
        """A guest data ring; bad in some way with a small probability
        (returned False then: the CONNECT or ACCEPT must fail)."""
        rng = self.rng
        order = rng.randint(1, 4)
        r = rng.random()
        if r < 0.05:
            return self.fe.new_ring(order, ring_order=rng.choice([0, 5, 0xFFFFFFFF])), False
        if r < 0.1:
            return self.fe.new_ring(order, refs=[0xFFFF0000 + i for i in range(1 << order)]), False
        ring = self.fe.new_ring(order)
        if rng.random() < 0.3:
            # Free-running indexes may start anywhere: just before the wrap.
            start = (1 << 32) - rng.randrange(1, 2 * ring.size)
            for off in (_wire.IN_CONS_OFFSET, _wire.IN_PROD_OFFSET,
                        _wire.OUT_CONS_OFFSET, _wire.OUT_PROD_OFFSET):
                ring.put(off, start)
        return ring, True

    # -- operations ------------------------------------------------------------

    def op_socket(self) -> None:
        sock_id = self.any_id()
        args = (_wire.AF_INET, _wire.SOCK_STREAM, 0)
        if self.rng.random() < 0.1:
            args = (self.rng.choice([2, 10, 1]), self.rng.choice([1, 2, 5]),
                    self.rng.choice([0, 6]))
        self.push(_wire.PVCALLS_SOCKET, sock_id, struct.pack("=III", *args))

    def op_connect(self) -> None:
        sock_id = self.pick("new")
        ring, _ = self.new_ring()
        address = self.address()
        addr = _wire.pack_sockaddr_in(*address).ljust(28, b"\0")
        length = 16 if self.rng.random() < 0.95 else self.rng.choice([0, 8, 28, 0xFFFFFFFF])
        port = ring.port if self.rng.random() < 0.97 else 4000
        body = addr + struct.pack("=IIII", length, 0, ring.ref, port)
        req_id = self.push(_wire.PVCALLS_CONNECT, sock_id, body)
        self.rings_of[req_id] = Conn(ring, echo=address == self.fz.echo_address)

    def op_bind(self) -> None:
        sock_id = self.pick("new")
        address = ("127.0.0.1", 0)
        if self.rng.random() < 0.15:
            # In use, not ours, not local, any.
            address = self.rng.choice([self.fz.echo_address, ("192.0.2.1", 0), ("0.0.0.0", 0),
                                       ("224.0.0.1", 0), ("127.0.0.1", 1)])
        addr = _wire.pack_sockaddr_in(*address).ljust(28, b"\0")
        self.push(_wire.PVCALLS_BIND, sock_id, addr + struct.pack("=I", 16))

    def op_listen(self) -> None:
        sock_id = self.pick("passive")
        backlog = self.rng.choice([0, 1, 16, 0xFFFFFFFF])
        self.push(_wire.PVCALLS_LISTEN, sock_id, struct.pack("=I", backlog))

    def op_accept(self) -> None:
        sock_id = self.pick("listening")
        id_new = self.any_id() if self.rng.random() < 0.3 else RawFrontend.new_id()
        ring, _ = self.new_ring()
        body = struct.pack("=QII", id_new, ring.ref, ring.port)
        req_id = self.push(_wire.PVCALLS_ACCEPT, sock_id, body, extra=id_new)
        self.rings_of[req_id] = Conn(ring)
        if self.rng.random() < 0.5:
            # Someone connects: the ACCEPT may be answered.
            self.op_quiesce()
            if sock_id in self.addresses:
                self.connect_to(self.addresses[sock_id])

    def op_poll(self) -> None:
        sock_id = self.pick("listening")
        self.push(_wire.PVCALLS_POLL, sock_id)

    def op_listener(self) -> None:
        """SOCKET, BIND and LISTEN in one batch, as a guest server does."""
        sock_id = self.rng.choice(self.pool) if self.rng.random() < 0.5 else RawFrontend.new_id()
        self.push(_wire.PVCALLS_SOCKET, sock_id, struct.pack("=III", _wire.AF_INET,
                                                             _wire.SOCK_STREAM, 0))
        addr = _wire.pack_sockaddr_in("127.0.0.1", 0).ljust(28, b"\0")
        self.push(_wire.PVCALLS_BIND, sock_id, addr + struct.pack("=I", 16))
        self.push(_wire.PVCALLS_LISTEN, sock_id, struct.pack("=I", self.rng.choice([0, 1, 8])))
        self.op_quiesce()

    def op_wait_release(self) -> None:
        """ACCEPT or POLL on a listener, maybe a connection coming, then at
        once RELEASE of the listener or of the ACCEPT's id_new."""
        listening = sorted(i for i, k in self.model.items() if k == "listening")
        if not listening:
            self.op_quiesce()
            return
        sock_id = self.rng.choice(listening)
        id_new = RawFrontend.new_id()
        if self.rng.random() < 0.6:
            ring, _ = self.new_ring()
            body = struct.pack("=QII", id_new, ring.ref, ring.port)
            req_id = self.push(_wire.PVCALLS_ACCEPT, sock_id, body, extra=id_new)
            self.rings_of[req_id] = Conn(ring)
        else:
            self.push(_wire.PVCALLS_POLL, sock_id)
        if self.rng.random() < 0.5 and sock_id in self.addresses:
            self.connect_to(self.addresses[sock_id])
        victim = sock_id if self.rng.random() < 0.6 else id_new
        self.push(_wire.PVCALLS_RELEASE, victim)

    def op_release(self) -> None:
        if self.model and self.rng.random() < 0.7:
            sock_id = self.rng.choice(sorted(self.model))
        else:
            sock_id = self.any_id()
        self.push(_wire.PVCALLS_RELEASE, sock_id, bytes([self.rng.randrange(256)]))

    def op_garbage(self) -> None:
        cmd = self.rng.choice([self.rng.randrange(8), self.rng.getrandbits(32)])
        self.push(cmd, self.any_id(), self.rng.randbytes(48))

    def op_host_connect(self) -> None:
        """A host client connects to one of the guest's listeners."""
        if not self.addresses:
            return
        self.connect_to(self.rng.choice(list(self.addresses.values())))

    def connect_to(self, address: tuple[str, int]) -> None:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setblocking(False)
        if self.rng.random() < 0.5:
            # A peer that takes little: what the guest writes stays in its
            # out ring, and lingers after RELEASE.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        client.connect_ex(address)
        self.fz.clients.append(client)
        if self.rng.random() < 0.5:
            with contextlib.suppress(OSError):
                client.send(self.rng.randbytes(self.rng.randrange(1, 2000)))

    def op_data(self) -> None:
        if not self.conns:
            return
        conn = self.conns[self.rng.choice(sorted(self.conns))]
        ring = conn.ring
        try:
            if self.rng.random() < 0.6:
                payload = self.rng.randbytes(self.rng.randrange(1, 3 * ring.size // 2))
                n = ring.write(payload)
                conn.sent += payload[:n]
            conn.received += ring.read(only_if_full=self.rng.random() < 0.5)
        except (RingError, ValueError, OSError):  # OSError: a port we unbound
            conn.clean = False  # our own view of indexes we scribbled over

    def op_abuse(self) -> None:
        if not self.conns:
            return
        conn = self.conns[self.rng.choice(sorted(self.conns))]
        ring = conn.ring
        what = self.rng.randrange(6)
        if what == 0:
            # Read once at CONNECT: changing them now changes nothing.
            ring.put(_wire.RING_ORDER_OFFSET, self.rng.getrandbits(32))
            ring.put(_wire.REF_OFFSET + 4 * self.rng.randrange(16), self.rng.getrandbits(32))
        elif what == 4:
            # The pads: nobody reads them.
            ring.put(self.rng.choice([12, 60, 76, 124]), self.rng.getrandbits(32))
        else:
            conn.clean = False
            if what == 1:
                off = self.rng.choice([_wire.IN_CONS_OFFSET, _wire.IN_PROD_OFFSET,
                                       _wire.OUT_CONS_OFFSET, _wire.OUT_PROD_OFFSET])
                ring.put(off, self.rng.getrandbits(32))
            elif what == 2:
                # prod - cons > size, by a little
                cons = ring.get(_wire.OUT_CONS_OFFSET)
                ring.put(_wire.OUT_PROD_OFFSET, cons + ring.size + self.rng.randrange(1, 64))
            elif what == 3:
                ring.put(self.rng.choice([_wire.IN_ERROR_OFFSET, _wire.OUT_ERROR_OFFSET]),
                         self.rng.choice([0, -9, -107, -11, 1, self.rng.getrandbits(32)]))
            else:
                cons = ring.get(_wire.IN_CONS_OFFSET)
                ring.put(_wire.IN_CONS_OFFSET, cons - self.rng.randrange(1, 100))
        self.fe.evtchn.notify(ring.port)

    def op_shared_ring(self) -> None:
        """CONNECT or ACCEPT with a ring or port already in use: another
        socket's indexes page or event channel, the command ring's page or
        port."""
        rng = self.rng
        fe = self.fe
        assert fe.ring is not None
        owners: list[Conn | None] = [None, *self.conns.values()]
        ports = [fe.port] + [c.ring.port for c in self.conns.values()]
        spare, _ = self.new_ring()
        if rng.random() < 0.7:
            owner = rng.choice(owners)
            ref = fe.page.refs[0] if owner is None else owner.ring.ref
            # What the page names now (laid out again since, maybe) may be
            # mapped: no longer pages nobody maps.
            self.give(self.names(ref))
            if owner is not None:
                # Its pages may now carry a second socket's bytes too: its
                # echo and counters are no longer its own to check.
                owner.clean = False
        else:
            ref = spare.ref
        port = rng.choice(ports) if rng.random() < 0.7 else spare.port
        if rng.random() < 0.5:
            addr = _wire.pack_sockaddr_in(*self.fz.echo_address).ljust(28, b"\0")
            body = addr + struct.pack("=IIII", 16, 0, ref, port)
            req_id = self.push(_wire.PVCALLS_CONNECT, self.pick("new"), body)
        else:
            id_new = RawFrontend.new_id()
            body = struct.pack("=QII", id_new, ref, port)
            req_id = self.push(_wire.PVCALLS_ACCEPT, self.pick("listening"), body, extra=id_new)
        # Not ours to check: it may share its pages with another socket.
        self.rings_of[req_id] = Conn(spare, clean=False)

    def op_unbind(self) -> None:
        """The guest closes a data ring's event channel under the backend."""
        if not self.conns:
            return
        # Out of conns: the guest touches it no more (each of its notifies
        # would fail); still the backend's, until released.
        conn = self.conns.pop(self.rng.choice(sorted(self.conns)))
        self.fz.retired.append(conn)
        conn.ring.unbind()

    def op_death(self) -> None:
        """The domain dies mid-traffic; a new one takes its place."""
        index = self.fz.hostiles.index(self)
        self.fz.dead.append(self.fe)
        self.fe.dispose()
        self.fz.host.destroy_domain(self.fe.guest)
        self.fz.hostiles[index] = Hostile(self.fz, f"{self.fe.guest.name}+")

    def op_client_close(self) -> None:
        """A host peer goes: FIN, or RST (unread data, or SO_LINGER 0)."""
        if len(self.fz.clients) < 2:
            return
        client = self.fz.clients.pop(self.rng.randrange(1, len(self.fz.clients)))
        if self.rng.random() < 0.5:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

    def op_blackhole(self) -> None:
        """Connects in progress to the blackhole complete (its queue is
        drained: the next SYN is taken) or fail (it is closed: the next SYN
        is reset), about a second later, when the SYN is sent again."""
        self.fz.drain_blackhole(reset=self.rng.random() < 0.5)

    def op_hotplug(self) -> None:
        """A CPU of the ioworkers goes offline or comes back (the host's
        doing, not the guest's, interleaved with the guests' traffic)."""
        topology = self.fz.backend.topology
        cpu = self.rng.choice(topology.possible())
        if cpu in topology.online():
            if len(topology.online()) > 1:
                topology.cpu_down(cpu)
        else:
            topology.cpu_up(cpu)

    # -- rings given again (the backend's ring hints) ------------------------------

    def pool_pages(self) -> Any:
        """The guest's pool of data pages, twice the largest ring, shared
        once (and again after op_recycle revoked it)."""
        if self.data_pool is None:
            self.data_pool = self.fe.gntshr.share_pages(0, 2 << self.fz.backend.max_page_order)
            self.canary.clear()
        return self.data_pool

    def granted(self) -> dict[int, bool]:
        """Every ref the guest grants now, and whether writably."""
        with self.fe.gntshr._lock:
            shares = list(self.fe.gntshr._live.values())
        refs = {ref: True for share in shares for ref in share.refs}
        if self.readonly is not None:
            refs[self.readonly.refs[0]] = False
        return refs

    def held_refs(self) -> set[int]:
        """The refs of every ring the backend's table holds for us (the
        indexes page and the data pages each maps)."""
        front = self.fz.backend._frontends.get((self.domid, 0))
        if front is None:
            return set()
        with front._lock:
            sockets = list(front._sockets.values())
        refs: set[int] = set()
        for sock in sockets:
            for pages in getattr(getattr(sock, "ring", None), "_maps", ()):
                refs.update(pages.refs)
        return refs

    def check_rings(self) -> None:
        """At a quiescent point of ours: no pool page a ring of ours no
        longer maps was written since we filled it (a stale mapping would
        write there), and the hints stay within their bounds; then the
        pool pages no ring maps are filled anew."""
        front = self.fz.backend._frontends.get((self.domid, 0))
        if front is not None:
            # The command Work's, and ours is idle: nothing pushed since the
            # quiesce.
            hints = dict(front.ring_hints)
            kept = sum(map(len, hints.values()))
            check(len(hints) <= _socket.RING_HINTS and kept <= _socket.RING_HINT_REFS
                  and front.ring_hint_refs == kept,
                  f"dom{self.domid}: {len(hints)} hints of {kept} refs, counted "
                  f"{front.ring_hint_refs}, bounds {_socket.RING_HINTS}, "
                  f"{_socket.RING_HINT_REFS}")
        if self.data_pool is None:
            return
        # And the pages we write through our rings: a ring laid out with
        # a ref[] word changed has pages we write and the backend does not
        # map.
        held = self.held_refs()
        for conn in [*self.conns.values(), *self.rings_of.values()]:
            held.update(conn.ring.data.refs)
        buffer, refs = self.data_pool.buffer, self.data_pool.refs
        for page in range(len(refs)):
            chunk = buffer[page * _wire.PAGE_SIZE : (page + 1) * _wire.PAGE_SIZE]
            if refs[page] in held:
                self.canary.discard(page)  # given again since: a ring's
            elif page in self.canary:
                check(chunk == _canary(page),
                      f"dom{self.domid}: pool page {page} (ref {refs[page]}) written "
                      f"while no ring held it")
            else:
                chunk[:] = _canary(page)
                self.canary.add(page)

    def give(self, refs: Iterable[int]) -> None:
        """Pages about to be named in a ring: no longer canaries."""
        if self.data_pool is not None:
            index = {ref: page for page, ref in enumerate(self.data_pool.refs)}
            self.canary.difference_update(index[r] for r in refs if r in index)

    def names(self, ref: int) -> tuple[int, ...]:
        """The data pages the page granted as ``ref`` names, as the backend
        would read them if it were given as an indexes page now (none if
        the guest does not grant it, or its ring_order is out of range)."""
        with self.fe.gntshr._lock:
            shares = list(self.fe.gntshr._live.values())
        for share in shares:
            if ref in share.refs:
                offset = share.refs.index(ref) * _wire.PAGE_SIZE
                with share.buffer[offset : offset + _wire.PAGE_SIZE] as page:
                    order = struct.unpack_from("=I", page, _wire.RING_ORDER_OFFSET)[0]
                    if not 1 <= order <= _wire.MAX_PAGE_ORDER_LIMIT:
                        return ()
                    return struct.unpack_from(f"={1 << order}I", page, _wire.REF_OFFSET)
        return ()

    def forget_rings(self, refs: Iterable[int]) -> None:
        """Close the guest's views of the rings laid out on ``refs`` (pages
        it is about to unshare), but for those of live sockets."""
        refs = set(refs)
        live = {id(c.ring) for c in [*self.conns.values(), *self.rings_of.values()]}
        for ring in [r for r in self.fe.rings if id(r) not in live
                     and refs & {r.ref, *r.data.refs, *r.indexes.refs}]:
            ring.close()
            self.fe.rings.remove(ring)

    def spare(self, *, new: bool = False) -> Any:
        """An indexes page given before (maybe now in use), or a new one."""
        if self.spares and not new and self.rng.random() < 0.85:
            return self.rng.choice(self.spares)
        page = self.fe.gntshr.share_pages(0, 1)
        self.spares.append(page)
        if len(self.spares) > 6:
            self.revoke(self.spares[0])
        return page

    def revoke(self, share: Any) -> bool:
        """End the guest's grant of ``share`` (an indexes page or the pool)
        if no ring of the backend's table maps it; its refs go to
        ``gone``, to be named again (the hypervisor may grant them anew)."""
        if set(share.refs) & self.held_refs():
            return False
        self.forget_rings(share.refs)
        share.unshare()
        self.gone = (self.gone + list(share.refs))[-64:]
        if share in self.spares:
            self.spares.remove(share)
        if share is self.data_pool:
            self.data_pool = None
        return True

    def layout(self, indexes: Any) -> tuple[DataRing, bool]:
        """A guest ring on ``indexes`` and a window of the pool, laid out
        as a thrifty frontend does (the window it named last) or a hostile
        one (some refs changed, another ring_order, a ref not granted, read
        only or another ring's); and whether the ring must map."""
        rng = self.rng
        max_order = self.fz.backend.max_page_order
        pool = self.pool_pages()
        last = getattr(indexes, "last_window", None)
        order, first = last if last is not None else (rng.randint(1, max_order), 0)
        what = rng.randrange(8)
        if what == 1:    # some refs changed: the window slides
            first += rng.choice([-2, -1, 1, 2])
        elif what == 2:  # another order, the same first page
            order = max(1, min(max_order, order + rng.choice([-1, 1])))
        elif what == 3 or last is None:
            order, first = rng.randint(1, max_order), rng.randrange(len(pool.refs))
        first = max(0, min(first, len(pool.refs) - (1 << order)))
        window = Pages.window(pool, first, 1 << order)
        refs = list(window.refs)
        ring_order = order
        if what == 4:    # out of range, the refs a larger ring would name
            ring_order = rng.choice([0, max_order + 1, 9, 0xFFFFFFFF])
            refs = list(pool.refs)
        elif what == 5:  # a word naming a page not granted, read only, or another ring's
            others = [r for c in self.conns.values() for r in c.ring.data.refs]
            if self.readonly is None:
                self.readonly = self.fe.gntshr.share_pages(0, 1, writable=False)
            choices = [*self.gone, self.readonly.refs[0], 0xFFFFFFF0, *others[:8]]
            refs[rng.randrange(len(refs))] = rng.choice(choices)
        indexes.last_window = (order, first)
        ring = self.fe.new_ring(order, refs=refs, ring_order=ring_order,
                                indexes=indexes, data=window)
        granted = self.granted()
        good = (indexes.refs[0] in granted and 1 <= ring_order <= max_order
                and all(granted.get(r, False) for r in refs[: 1 << ring_order]))
        return ring, good

    def op_recycle(self) -> None:
        """CONNECT (or ACCEPT) with an indexes page given before: with the
        same ref[] (one map request, on the backend's hint), or changed,
        or naming pages not granted; maybe in use by a live socket at
        once; maybe revoked first, and granted again with other contents.
        A ring that maps must carry bytes through its own pages, one that
        cannot must be refused with EINVAL."""
        rng = self.rng
        self.quiesce()  # what we pushed before is handled: its map requests are done
        self.check_rings()
        if rng.random() < 0.2:
            # Revoked; then maybe granted again: the same refs, most likely
            # (the hypervisor hands the lowest free ones out), other contents.
            if self.spares and rng.random() < 0.7:
                if self.revoke(rng.choice(self.spares)) and rng.random() < 0.7:
                    again = self.spare(new=True).refs[0] in self.gone
                    self.fz.seen["recycle indexes page granted again, "
                                 f"{'same' if again else 'other'} ref"] += 1
            elif self.data_pool is not None and self.revoke(self.data_pool):
                self.pool_pages()
        listener = self._idle_listener() if rng.random() < 0.25 else None
        accept = listener is not None
        if not accept:
            sock_id = RawFrontend.new_id()
            self.push(_wire.PVCALLS_SOCKET, sock_id, struct.pack(
                "=III", _wire.AF_INET, _wire.SOCK_STREAM, 0))
            self.quiesce()
            if self.model.get(sock_id) != "new":
                return  # over the limit
        if rng.random() < 0.1 and self.gone:
            # An indexes page no longer granted: refused, unless it was
            # granted again since, as some other page (what it holds then
            # decides).
            ring, good = self.fe.new_ring(1), False
            ring.ref = rng.choice(self.gone)
            unknown = ring.ref in self.granted()
        else:
            ring, good = self.layout(self.spare())
            unknown = False
        held = self.held_refs()
        named = {ring.ref, *self.names(ring.ref)}
        # The guest sees the window it laid out: a ref[] word naming a
        # page outside it (or a page a live ring has too) spoils the echo.
        clean = good and ring.refs == ring.data.refs and not named & held
        # A live ring of ours on the same pages is no longer ours alone
        # (its indexes page was laid out anew even if this one is refused).
        spoiled = named if good or unknown else {ring.ref}
        for conn in [*self.conns.values(), *self.rings_of.values()]:
            if spoiled & {conn.ring.ref, *conn.ring.refs}:
                conn.clean = False
        self.give(named | set(ring.data.refs))
        front = self.fz.backend._frontends.get((self.domid, 0))
        hinted = front is not None and front.ring_hints.get(ring.ref) == ring.refs
        mark = len(self.fz.maps)
        if ring.ref in held:
            self.fz.seen["recycle indexes page in use"] += 1
        if self.reconnected:
            self.reconnected = False
            self.fz.seen["recycle after a reconnect"] += 1
        self.fz.seen[f"recycle {'accept' if accept else 'connect'} "
                     f"{'unknown' if unknown else 'good' if good else 'bad'}"
                     f"{' hinted' if hinted else ''}{' clean' if clean else ''}"] += 1
        if listener is not None:
            id_new = RawFrontend.new_id()
            req_id = self.push(_wire.PVCALLS_ACCEPT, listener,
                               struct.pack("=QII", id_new, ring.ref, ring.port), extra=id_new)
            self.rings_of[req_id] = Conn(ring, clean=clean, echo=False)
            if not good and not unknown:
                self.expected[req_id] = frozenset({EINVAL, EMFILE})
            self.quiesce()
            if good and listener in self.addresses and rng.random() < 0.7:
                self.connect_to(self.addresses[listener])
            return
        addr = _wire.pack_sockaddr_in(*self.fz.echo_address).ljust(28, b"\0")
        req_id = self.push(_wire.PVCALLS_CONNECT, sock_id,
                           addr + struct.pack("=IIII", 16, 0, ring.ref, ring.port))
        self.rings_of[req_id] = conn = Conn(ring, clean=clean)
        if not unknown:
            self.expected[req_id] = frozenset({0 if good else EINVAL})
        self.fe.wait(lambda: self._collected(req_id))
        maps = [n for domid, n in self.fz.maps[mark:] if domid == self.domid]
        if good:
            whole = 1 + (1 << ring.order)
            # On the hint the ring is mapped at once; else the indexes page
            # (or a hint it contradicts, or one refused), then the ring.
            check(maps == [whole] if hinted else (maps[-1:] == [whole] and 2 <= len(maps) <= 3),
                  f"dom{self.domid}: map requests {maps} for a ring of {whole} pages"
                  f"{' given again with the same refs' if hinted else ''}")
            check(self._newest_hint() == (ring.ref, ring.refs),
                  f"dom{self.domid}: the hint of the ring just given is not the newest")
        if clean:
            # Through the pages this CONNECT named, whatever came before.
            self.roundtrip(sock_id, conn)
        if rng.random() < 0.5:
            self.push(_wire.PVCALLS_RELEASE, sock_id)
            self.quiesce()
            self.check_rings()

    def _newest_hint(self) -> tuple[int, tuple[int, ...]] | None:
        front = self.fz.backend._frontends.get((self.domid, 0))
        if front is None or not front.ring_hints:
            return None
        ref = next(reversed(front.ring_hints))
        return ref, front.ring_hints[ref]

    def _idle_listener(self) -> int | None:
        """A listener of ours with no ACCEPT or POLL in flight."""
        busy = {sock_id for cmd, sock_id, _ in self.pending.values()
                if cmd in (_wire.PVCALLS_ACCEPT, _wire.PVCALLS_POLL, _wire.PVCALLS_RELEASE)}
        idle = sorted(i for i, k in self.model.items() if k == "listening" and i not in busy)
        return self.rng.choice(idle) if idle else None

    def roundtrip(self, sock_id: int, conn: Conn) -> None:
        """Bytes through a clean ring to the echo server and back, exactly."""
        ring = conn.ring
        payload = self.rng.randbytes(self.rng.randrange(1, ring.size))
        sent = 0
        got = bytearray()

        def echoed() -> bool:
            nonlocal sent
            sent += ring.write(payload[sent:])
            got.extend(ring.read())
            return len(got) >= len(payload) or ring.in_error != 0

        try:
            self.fe.wait(echoed)
        except TimeoutError:
            raise FuzzFailure(f"dom{self.domid} socket {sock_id:#x}: {len(got)} of "
                              f"{len(payload)} bytes came back through the pages "
                              f"{ring.refs[: 1 << ring.order]}") from None
        check(bytes(got) == payload and ring.in_error == 0,
              f"dom{self.domid} socket {sock_id:#x}: the echo through the pages "
              f"{ring.refs[: 1 << ring.order]} differs (in_error {ring.in_error})")
        conn.sent += payload
        conn.received += got

    def op_hint_flood(self) -> None:
        """More indexes pages than the backend keeps hints for, of rings
        of every order (more refs than it keeps too), each given once
        and released: its hints stay bounded, the newest kept."""
        bound = min(_socket.RING_HINTS, 64)
        pages = self.fe.gntshr.share_pages(0, bound + self.rng.randint(1, 3))
        pool = self.pool_pages()
        last: tuple[int, tuple[int, ...]] | None = None
        socket_req = 0
        for page in range(len(pages.refs)):
            indexes = Pages.window(pages, page, 1)
            order = self.rng.randint(1, self.fz.backend.max_page_order)
            window = Pages.window(pool, self.rng.randrange(len(pool.refs) - (1 << order) + 1),
                                  1 << order)
            self.give(window.refs)
            ring = self.fe.new_ring(order, indexes=indexes, data=window)
            sock_id = RawFrontend.new_id()
            socket_req = self.push(_wire.PVCALLS_SOCKET, sock_id, struct.pack(
                "=III", _wire.AF_INET, _wire.SOCK_STREAM, 0))
            addr = _wire.pack_sockaddr_in(*self.fz.echo_address).ljust(28, b"\0")
            req_id = self.push(_wire.PVCALLS_CONNECT, sock_id,
                               addr + struct.pack("=IIII", 16, 0, ring.ref, ring.port))
            self.rings_of[req_id] = Conn(ring, clean=False)
            self.push(_wire.PVCALLS_RELEASE, sock_id)
            last = (ring.ref, ring.refs)
        self.watched[socket_req] = None
        self.quiesce()
        self.check_rings()
        self.fz.seen[f"hint flood {len(pages.refs)}"] += 1
        if self.watched.pop(socket_req) == 0:  # its CONNECT was handled
            check(self._newest_hint() == last,
                  f"dom{self.domid}: the newest hint is {self._newest_hint()}, "
                  f"the last ring given {last}")
        self.revoke(pages)

    def op_storm(self) -> None:
        ports = [self.fe.port] + [c.ring.port for c in self.conns.values()]
        for _ in range(self.rng.randrange(50, 500)):
            with contextlib.suppress(OSError):
                self.fe.evtchn.notify(self.rng.choice(ports))

    def op_release_racing(self) -> None:
        """Data written, then RELEASE at once, without waiting."""
        if not self.conns:
            return
        sock_id = self.rng.choice(sorted(self.conns))
        conn = self.conns[sock_id]
        with contextlib.suppress(RingError, ValueError):
            conn.ring.write(self.rng.randbytes(self.rng.randrange(1, conn.ring.size)))
        conn.clean = False
        self.push(_wire.PVCALLS_RELEASE, sock_id)

    def op_batch(self) -> None:
        """Several requests in one push: handled back to back."""
        ops = [self.op_socket, self.op_connect, self.op_bind, self.op_listen,
               self.op_release, self.op_accept, self.op_poll]
        ring = self.fe.ring
        assert ring is not None
        for _ in range(self.rng.randrange(2, 8)):
            if ring.free_slots < 2:
                break
            self.rng.choice(ops)()

    def op_quiesce(self) -> None:
        self.quiesce()
        # Remember the listeners' addresses, for host clients.
        for row in self.fz.backend.stats().sockets:
            if row.domain == self.domid and row.state == "listening" and row.address:
                self.addresses[row.id] = row.address

    def op_check_echo(self) -> None:
        """Every clean echoed ring: what was sent comes back, byte-exact."""
        self.quiesce()  # a RELEASE pushed is answered: its ring is not ours
        for sock_id, conn in list(self.conns.items()):
            if not (conn.clean and conn.echo):
                continue
            ring = conn.ring

            def echoed(ring: DataRing = ring, conn: Conn = conn) -> bool:
                err = ring.in_error
                try:
                    conn.received += ring.read()
                except RingError:
                    return True
                return len(conn.received) >= len(conn.sent) or err != 0

            try:
                self.fe.wait(echoed)
            except TimeoutError:
                raise FuzzFailure(
                    f"dom{self.domid} socket {sock_id:#x}: {len(conn.received)} of "
                    f"{len(conn.sent)} bytes echoed; indexes "
                    f"{[ring.get(o) & 0xFFFFFFFF for o in (0, 4, 8, 64, 68, 72)]}, size "
                    f"{ring.size}; backend {self.fz.backend.stats().sockets}") from None
            if ring.in_error == 0 and ring.out_error == 0:
                check(bytes(conn.received) == bytes(conn.sent),
                      f"dom{self.domid} socket {sock_id:#x}: {len(conn.received)} bytes "
                      f"echoed of {len(conn.sent)}, or different")
                row = [r for r in self.fz.backend.stats().sockets
                       if r.domain == self.domid and r.id == sock_id]
                check(len(row) == 1 and (row[0].bytes_out, row[0].bytes_in)
                      == (len(conn.sent), len(conn.received)),
                      f"dom{self.domid} socket {sock_id:#x}: stats {row} after "
                      f"{len(conn.sent)} bytes echoed")
            else:
                check(bytes(conn.sent).startswith(bytes(conn.received)),
                      f"dom{self.domid} socket {sock_id:#x}: corrupted echo")

    def op_closing(self) -> None:
        """A xenbus state change mid-traffic, then a reconnect: an orderly
        close, a restart without closing (Initialising while Connected), a
        state no frontend may write, or Closing, Closed and Initialising
        written back to back."""
        fe = self.fe
        state = f"{fe.fe_path}/state"
        be_state = f"{fe.be_path}/state"
        how = self.rng.randrange(4)
        # Requests on the ring now may or may not be handled: no answer due.
        if how == 0:
            fe.xs.write(state, "5")
            if self.rng.random() < 0.5:
                fe.xs.wait_for(be_state, lambda v: v in ("5", "6"), timeout=TIMEOUT)
            fe.xs.write(state, "6")
            fe.xs.wait_for(be_state, "6", timeout=TIMEOUT)
        elif how == 2:
            fe.xs.write(state, self.rng.choice(["7", "8", "9", "x", ""]))
            fe.xs.wait_for(be_state, "5", timeout=TIMEOUT)
        elif how == 3:
            for value in ("5", "6"):  # then "1": each write may be seen or not
                fe.xs.write(state, value)
        self.fz.retired.extend(self.conns.values())
        self.fz.retired.extend(self.rings_of.values())
        if fe.ring is not None:
            fe.ring.release()
        self.reset()
        self.reconnected = True
        fe.responses.clear()
        fe.xs.write(state, "1")
        fe.connect()
        check(not any(r.domain == self.domid for r in self.fz.backend.stats().sockets),
              f"dom{self.domid}: sockets survived a reconnect")

    def finish(self) -> None:
        """Release everything; every pending request must be answered."""
        self.quiesce()
        for sock_id in sorted(self.model):
            self.push(_wire.PVCALLS_RELEASE, sock_id)
        for cmd, _, extra in list(self.pending.values()):
            if cmd == _wire.PVCALLS_ACCEPT:
                self.push(_wire.PVCALLS_RELEASE, extra)
        self.fe.wait(lambda: self._all_answered())
        check(self.model == {}, f"dom{self.domid}: left {self.model}")
        self.quiesce()

    def _all_answered(self) -> bool:
        self.collect()
        return not self.pending


class Fuzzer:
    """One run: a backend's hostile frontends and a bystander, one seed."""

    OPS = {
        "socket": 10, "connect": 10, "bind": 5, "listen": 5, "accept": 6, "poll": 4,
        "release": 8, "garbage": 3, "host_connect": 8, "data": 20, "abuse": 4,
        "storm": 2, "release_racing": 3, "batch": 5, "quiesce": 6, "check_echo": 3,
        "closing": 1, "shared_ring": 2, "unbind": 1, "death": 1, "client_close": 2,
        "blackhole": 1, "wait_release": 3, "listener": 3,
        "hotplug": 1, "recycle": 6, "hint_flood": 1,
    }

    def __init__(self, seed: int, host: Any, backend: pvcalls.Backend,
                 make_frontend: Callable[..., RawFrontend], echo_address: tuple[str, int],
                 *, hostiles: int = 2) -> None:
        self.rng = random.Random(seed)
        self.seen: collections.Counter[str] = collections.Counter()
        self.host = host
        self.backend = backend
        self.make_frontend = make_frontend
        self.echo_address = echo_address
        self.clients: list[socket.socket] = []
        self.retired: list[Conn] = []
        # (domid, refs) of each grant map request of the backend, in order:
        # a ring given again with its hint is mapped in one.
        self.maps: list[tuple[int, int]] = []
        real_map = backend.gnttab.map_grant_refs

        def counted(domid: int, refs: Any, **kwargs: Any) -> Any:
            self.maps.append((domid, len(refs)))
            return real_map(domid, refs, **kwargs)

        backend.gnttab.map_grant_refs = counted  # type: ignore[method-assign]
        self.dead: list[RawFrontend] = []
        self._blackhole = self._new_blackhole(None)
        refused = socket.socket()
        refused.bind(("127.0.0.1", 0))
        self.refused_address = refused.getsockname()
        refused.close()
        self.bystander = make_frontend(f"bystander{seed}")
        self.by_id, self.by_ring = self.bystander.connect_socket(
            echo_address, order=min(4, backend.max_page_order))
        self.hostiles = [Hostile(self, f"hostile{seed}-{i}") for i in range(hostiles)]
        names = list(self.OPS)
        self._ops = names
        self._weights = [self.OPS[n] for n in names]

    def _new_blackhole(self, address: tuple[str, int] | None) -> socket.socket:
        """A listener whose accept queue is full: connects to it stay in
        progress."""
        blackhole = socket.socket()
        blackhole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blackhole.bind(address or ("127.0.0.1", 0))
        blackhole.listen(0)
        blackhole.setblocking(False)
        self.blackhole_address = blackhole.getsockname()
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(self.blackhole_address)
        self.clients.append(filler)
        return blackhole

    def drain_blackhole(self, reset: bool) -> None:
        if reset:
            self._blackhole.close()
            self._blackhole = self._new_blackhole(None)
            return
        with contextlib.suppress(BlockingIOError):
            while True:
                conn, _ = self._blackhole.accept()
                self.clients.append(conn)

    def consistent(self) -> bool:
        stats = self.backend.stats()
        online = {c.cpu for c in stats.cpus if c.online}
        for r in stats.sockets:
            # Placed once connecting or accepted, on an online CPU; the
            # others are not (an accept places its socket just before it
            # is connected: eventually).
            if (r.cpu is not None) != (r.state in ("connecting", "connected")):
                return False
            if r.cpu is not None and r.cpu not in online:
                return False
        placed = sum(1 for r in stats.sockets if r.cpu is not None)
        if placed != sum(c.sockets for c in stats.cpus):
            return False
        # One port per command ring and per attached data ring: none kept
        # by what failed or went.
        rings = sum(1 for r in stats.sockets if r.kind == "active")
        if len(bound_ports(self.backend)) != stats.frontends + rings:
            return False
        # Mapped pages: a command ring's, an indexes page and 2**order data
        # pages per attached ring (the simulated hypervisor counts them).
        pages = 0
        for front in list(self.backend._frontends.values()):
            pages += 1
            with front._lock:
                sockets = list(front._sockets.values())
            for sock in sockets:
                ring = getattr(sock, "ring", None)
                if ring is not None and getattr(ring, "ring_order", None) is not None:
                    pages += 1 + (1 << ring.ring_order)
        hv = self.host.hypervisor
        with hv._lock:
            mapped = hv._domains[self.backend.platform.domid].mapped
        return bool(mapped == pages)

    def bystander_roundtrip(self) -> None:
        payload = self.rng.randbytes(self.rng.randrange(1, 40000))
        fe, ring = self.bystander, self.by_ring
        got = bytearray()
        view = memoryview(payload)
        sent = 0

        def progress() -> bool:
            nonlocal sent
            sent += ring.write(view[sent:])
            got.extend(ring.read())
            return len(got) >= len(payload)

        fe.wait(progress)
        check(bytes(got) == payload, "the bystander's echo differs")

    def step(self) -> str:
        name = self.rng.choices(self._ops, self._weights)[0]
        hostile = self.rng.choice(self.hostiles)
        getattr(hostile, f"op_{name}")()
        return name

    def run(self, steps: int, *, finish: bool = True) -> None:
        for i in range(steps):
            self.step()
            if i % 10 == 0:
                for h in self.hostiles:
                    h.collect()
            if i % 25 == 0:
                self.bystander_roundtrip()
        if not finish:
            return
        for h in self.hostiles:
            h.op_check_echo()
            h.finish()
        self.bystander_roundtrip()

    def close(self) -> None:
        """Every frontend goes (Closing, or domain death for some)."""
        topology = self.backend.topology
        for cpu in topology.possible():
            topology.cpu_up(cpu)
        for h in self.hostiles:
            h.fe.close()
        check(self.bystander.release(self.by_id).ret == 0, "bystander release")
        self.bystander.close()
        wait_until(lambda: self.backend.stats().frontends == 0)
        stats = self.backend.stats()
        check(stats.sockets == (), f"sockets left: {stats.sockets}")
        check(all(c.sockets == 0 for c in stats.cpus), f"CPU load left: {stats.cpus}")
        check(bound_ports(self.backend) == [], f"ports left: {bound_ports(self.backend)}")
        self.close_clients()

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self._blackhole.close()


def held(host: Any) -> tuple[int, int, frozenset[tuple[int, str]]]:
    """Grant entries, ports, and this process's descriptors (see
    test_backend_handshake._held)."""
    gc.collect()
    hv = host.hypervisor.stats()
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            fds.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
    return hv["grants"], hv["ports"], frozenset(fds)


def wait_released(host: Any, before: tuple[int, int, frozenset[tuple[int, str]]],
                  margin: int = 0) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        grants, ports, fds = held(host)
        if (grants, ports) == before[:2] and len(fds - before[2]) <= margin:
            return
        if time.monotonic() > deadline:
            raise FuzzFailure(f"still held: grants {grants} (was {before[0]}), ports {ports} "
                              f"(was {before[1]}), new descriptors "
                              f"{[describe_fd(fd, link) for fd, link in sorted(fds - before[2])]}")
        threading.Event().wait(0.01)


def describe_fd(fd: int, link: str) -> str:
    """A descriptor left over, for the failure message: its socket's
    addresses and TCP state (from /proc/net), and the Python objects that
    hold it."""
    what = [f"{fd} {link}"]
    if link.startswith("socket:["):
        inode = link[len("socket:["):-1]
        for table in ("tcp", "tcp6", "unix"):
            with contextlib.suppress(OSError), open(f"/proc/self/net/{table}") as f:
                for line in f:
                    cols = line.split()
                    if table == "unix" and len(cols) > 6 and cols[6] == inode:
                        what.append(f"unix type {cols[4]} state {cols[5]} "
                                    f"{cols[7] if len(cols) > 7 else '(unnamed)'}")
                    elif table != "unix" and len(cols) > 9 and cols[9] == inode:
                        what.append(f"{table} {cols[1]} -> {cols[2]} state {cols[3]}")
    objects = gc.get_objects()
    for obj in objects:
        if isinstance(obj, socket.socket) and obj.fileno() == fd:
            holders = [type(r).__qualname__ for r in gc.get_referrers(obj) if r is not objects]
            what.append(f"{obj!r} held by {holders[:5]}")
    return "; ".join(what)


def end_guests(fz: Fuzzer) -> None:
    """Close the guests' own handles and destroy them, so that only what the
    backend holds is counted."""
    fes = [h.fe for h in fz.hostiles] + [fz.bystander]
    for fe in fes:
        for ring in fe.rings:
            with contextlib.suppress(OSError, ValueError, BufferError):
                ring.close()
        fe.dispose()
        fz.host.destroy_domain(fe.guest)


def expected_error(record: Any) -> bool:
    """The one error the fuzzer asks for: a frontend state no frontend may
    write is a fatal device error (error node, Closing), logged as such."""
    message = record.getMessage()
    return record.name == "xenback.xenbus" and (
        "saw state" in message or "invalid xenbus state" in message)


# -- the long campaign, outside the suite ----------------------------------------

def run_seed(seed: int, args: Any, seen: collections.Counter[str],
             make_echo: Callable[[], Any]) -> None:
    """One seed of the campaign: its own host, backend and echo server
    (``make_echo()``: echoserver.EchoServer), the frontends' steps, then
    everything must be released (FuzzFailure if not).  ``args`` has
    main()'s options as attributes."""
    from workqueue import Topology
    from xenback.sim import SimHost

    def no_new_threads(was: collections.Counter[str]) -> bool:
        return not collections.Counter(threads()) - was

    hint_bounds = _socket.RING_HINTS, _socket.RING_HINT_REFS
    if args.ring_hints is not None:
        # Few, so that a run of a few hundred steps outgrows them.
        _socket.RING_HINTS = args.ring_hints
        _socket.RING_HINT_REFS = max(args.ring_hints << 2, 1 << args.max_page_order)
    with contextlib.ExitStack() as restore, SimHost() as host, pvcalls.Backend(
            host.dom0, topology=Topology(args.cpus), max_page_order=args.max_page_order,
            policy=pvcalls.Policy(pvcalls.DomainPolicy(max_sockets=args.max_sockets)),
    ) as backend:
        restore.callback(setattr, _socket, "RING_HINTS", hint_bounds[0])
        restore.callback(setattr, _socket, "RING_HINT_REFS", hint_bounds[1])
        echo = make_echo()
        try:
            before = held(host)
            threads_before = threads()
            made: list[RawFrontend] = []

            def make(name: str, _made: list[RawFrontend] = made) -> RawFrontend:
                fe = RawFrontend(host, host.create_domain(name))
                _made.append(fe)
                return fe

            fz = Fuzzer(seed, host, backend, make, echo.address, hostiles=args.hostiles)
            try:
                fz.run(args.steps, finish=not args.abrupt)
            finally:
                seen.update(fz.seen)
            if args.abrupt:
                backend.close()  # with peers still there: lingering sockets
                fz.close_clients()
                check(bound_ports(backend) == [], "ports left after close()")
                for fe in [h.fe for h in fz.hostiles] + [fz.bystander]:
                    check(fe.backend_state() == 6, f"dom{fe.guest.domid} not Closed")
            else:
                fz.close()
            end_guests(fz)
            for fe in made:
                with contextlib.suppress(OSError):
                    fe.xs.close()
            wait_released(host, before, margin=0)
            try:
                # None more (after close() of the backend: fewer).
                wait_until(partial(no_new_threads, collections.Counter(threads_before)))
            except TimeoutError:
                raise FuzzFailure(f"threads {threads()}, were {threads_before}") from None
        finally:
            echo.close()
            # The frontends are disposed of above, but still listed for the
            # suite's dispose_all(): each seed would otherwise keep its
            # rings' pages and views alive, and every later seed's
            # gc.collect() (in held()) would walk them, slower and slower.
            dispose_all()


def main() -> None:
    import argparse
    import logging
    import sys
    import traceback

    from echoserver import EchoServer
    from toolargs import seed_range, whole

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=seed_range, default=range(10),
                        help="N or N-M (default 0-9)")
    parser.add_argument("--steps", type=whole(1), default=300)
    parser.add_argument("--hostiles", type=whole(0), default=2)
    parser.add_argument("--max-sockets", type=whole(0), default=None)
    parser.add_argument("--max-page-order", type=whole(1), default=4)
    parser.add_argument("--cpus", type=whole(1), default=4)
    parser.add_argument("--ring-hints", type=whole(1), default=None,
                        help="the backend's RING_HINTS (and 4 refs each) for the run")
    parser.add_argument("--abrupt", action="store_true",
                        help="end each run by closing the backend mid-traffic")
    args = parser.parse_args()
    seeds = args.seeds

    errors: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR and not expected_error(record):
                errors.append(record)

    logging.getLogger().addHandler(Catch())
    logging.getLogger().setLevel(logging.WARNING)
    crashed: list[str] = []
    threading.excepthook = lambda a: crashed.append(f"{a.thread}: {a.exc_value!r}")

    failures = 0
    seen: collections.Counter[str] = collections.Counter()
    for seed in seeds:
        errors.clear()
        crashed.clear()
        started = time.monotonic()
        try:
            run_seed(seed, args, seen, EchoServer)
            check(not crashed, f"thread exceptions: {crashed}")
            check(not errors, "error logs: " + "; ".join(
                f"{r.name}: {r.getMessage()}" for r in errors))
            print(f"seed {seed}: ok ({time.monotonic() - started:.1f} s)", flush=True)
        except Exception:
            failures += 1
            print(f"seed {seed}: FAILED", flush=True)
            traceback.print_exc()
            for r in errors:
                print("  log:", r.name, r.getMessage(), r.exc_text or "")
    print(sorted(seen.items()))
    print(f"{failures} of {len(seeds)} seeds failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
