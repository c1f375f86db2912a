"""A hostile frontend never crashes the backend, never makes it touch memory
outside the pages it mapped, and never disturbs the other frontends."""

from __future__ import annotations

import logging
import random
import socket
import struct
import sys
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pvcalls_rawfront import TIMEOUT, RawFrontend, wait_until

import pvcalls
from pvcalls import _wire
from pvcalls._backend import _Frontend
from tests.xenback.xbhelpers import handed_over
from xenback.ratelimit import RateLimit
from xenback.ring import RingError

EINVAL, EBADF, ENOTSUPP = -22, -9, -524


@pytest.fixture
def bystander(make_frontend: Any, host: Any, backend: pvcalls.Backend, echo_server: Any) -> Any:
    """A well-behaved frontend with a live connection, checked after each test."""
    fe = make_frontend("bystander")
    sock_id, ring = fe.connect_socket(echo_server.address)
    yield fe, ring
    payload = b"undisturbed" * 100
    fe.echo(ring, payload)
    assert fe.release(sock_id).ret == 0


def test_garbage_requests_get_one_answer_each(raw: RawFrontend, backend: pvcalls.Backend,
                                              bystander: Any) -> None:
    rng = random.Random(1234)
    for round_ in range(6):
        pushed = []
        for _ in range(20):
            data = bytearray(rng.randbytes(_wire.REQUEST_SIZE))
            # Half of them with a plausible command number, to reach the handlers.
            if rng.random() < 0.5:
                struct.pack_into("I", data, 4, rng.randrange(7))
            req_id = raw.ring.req_prod_pvt & 31 if raw.ring else 0
            struct.pack_into("I", data, 0, req_id)
            raw.push(0, raw=bytes(data))
            pushed.append((req_id, struct.unpack_from("I", data, 4)[0],
                           struct.unpack_from("Q", data, 8)[0]))
        for req_id, cmd, sock_id in pushed:
            rsp = raw.response(req_id)
            assert (rsp.cmd, rsp.id) == (cmd, sock_id)
            assert rsp.ret <= 0
        # Clean up whatever the garbage created.
        for row in backend.stats().sockets:
            if row.domain == raw.guest.domid:
                assert raw.release(row.id).ret == 0
        assert raw.unexpected == [], round_


def test_bad_grant_refs(raw: RawFrontend, echo_server: Any, bystander: Any) -> None:
    sock_id, _ = raw.socket()
    ring = raw.new_ring()

    def connect_with(ref: int) -> int:
        return raw.response(raw.push_connect(sock_id, echo_server.address, ring, ref=ref)).ret

    # A page granted to another domain, not to the backend.
    elsewhere = raw.gntshr.share_pages(bystander[0].guest.domid, 1)
    for ref in (0xFFFFFFFF, ring.ref + 10_000, elsewhere.refs[0]):
        assert connect_with(ref) == EINVAL, ref
    # A good ring still works for the same id afterwards.
    assert raw.response(raw.push_connect(sock_id, echo_server.address, ring)).ret == 0


def test_bad_data_page_refs(raw: RawFrontend, echo_server: Any, bystander: Any) -> None:
    sock_id, _ = raw.socket()
    bad = raw.new_ring(4, refs=[0xFFFF0000 + i for i in range(16)])
    assert raw.response(raw.push_connect(sock_id, echo_server.address, bad)).ret == EINVAL


@pytest.mark.parametrize("ring_order", [0, 5, 9, 10, 0xFFFFFFFF])
def test_ring_order_out_of_range(raw: RawFrontend, echo_server: Any, bystander: Any,
                                 ring_order: int) -> None:
    sock_id, _ = raw.socket()
    ring = raw.new_ring(4, ring_order=ring_order)
    assert raw.response(raw.push_connect(sock_id, echo_server.address, ring)).ret == EINVAL


def test_bad_event_channel(raw: RawFrontend, echo_server: Any, bystander: Any) -> None:
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    assert raw.response(raw.push_connect(sock_id, echo_server.address, ring,
                                         evtchn=4000)).ret == EINVAL


@pytest.mark.parametrize("which", ["in_cons", "out_prod", "both"])
def test_indexes_pointing_outside_the_ring(raw: RawFrontend, echo_server: Any,
                                           bystander: Any, which: str) -> None:
    sock_id, ring = raw.connect_socket(echo_server.address, order=1)
    raw.echo(ring, b"a" * 100)
    if which in ("in_cons", "both"):
        ring.put(_wire.IN_CONS_OFFSET, 0x80000000)
    if which in ("out_prod", "both"):
        ring.put(_wire.OUT_PROD_OFFSET, 0x7FFFFFF0)
    raw.evtchn.notify(ring.port)
    raw.wait(lambda: ring.in_error == EINVAL and ring.out_error == EINVAL)
    # Still answerable, and released cleanly.
    assert raw.release(sock_id).ret == 0


def test_index_chaos_while_data_flows(raw: RawFrontend, echo_server: Any,
                                      bystander: Any) -> None:
    """Random index values written at random moments: the socket may break,
    the backend may not."""
    rng = random.Random(99)
    for _ in range(5):
        sock_id, ring = raw.connect_socket(echo_server.address, order=1)
        for _ in range(20):
            try:
                ring.write(rng.randbytes(rng.randrange(1, 3000)))
            except RingError:
                pass  # our own view of the indexes is broken too
            ring.put(rng.choice([_wire.IN_CONS_OFFSET, _wire.IN_PROD_OFFSET,
                                 _wire.OUT_CONS_OFFSET, _wire.OUT_PROD_OFFSET]),
                     rng.getrandbits(32))
            raw.evtchn.notify(ring.port)
            ring_read_safely(ring)
        assert raw.release(sock_id).ret == 0


def ring_read_safely(ring: Any) -> None:
    try:
        ring.read()
    except RingError:
        pass


def test_command_ring_overflow_stops_only_that_frontend(dom0_xs: Any, make_frontend: Any,
        host: Any, backend: pvcalls.Backend, bystander: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    fe = make_frontend("flooder")
    assert fe.ring is not None
    # req_prod far beyond the slots the ring has.
    fe.ring._idx[0] = 1000
    fe.evtchn.notify(fe.port)
    fe.wait_backend_state(5)
    error = dom0_xs.read(f"/local/domain/0/error/backend/pvcalls/{fe.guest.domid}/0/error")
    assert error is not None and error.startswith("22 ")
    assert backend.stats().frontends == 2  # resources held until the frontend closes
    # Notified again, the broken ring is not read again: no second error.
    front = backend._frontends[(fe.guest.domid, 0)]
    fe.evtchn.notify(fe.port)
    front._on_event()  # what the notification does, then wait for that run
    front._work.flush()
    assert len([r for r in caplog.records if "command ring protocol error" in r.getMessage()]) == 1
    fe.close()
    wait_until(lambda: backend.stats().frontends == 1)  # only the bystander
    fe.xs.close()


def test_a_frontend_notifying_without_pause_does_not_stop_the_listeners(
        make_frontend: Any, backend: pvcalls.Backend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest on another CPU can notify its command port again before the
    backend's event thread has unmasked it, every time: the port is then
    always pending.  The listening sockets of every frontend (and the
    released sockets still sending) are watched by that same thread, and
    their ACCEPTs must still be answered."""
    storming: dict[int, RawFrontend] = {}
    notified: list[int] = []
    under_way = threading.Event()
    on_event = _Frontend._on_event

    def notified_again(self: _Frontend, *args: object) -> None:
        on_event(self, *args)
        guest = storming.get(self.domid)
        if guest is not None:
            # What the guest does meanwhile: the port is pending at unmask.
            guest.evtchn.notify(guest.port)
            notified.append(1)
            if len(notified) == 100:
                under_way.set()

    monkeypatch.setattr(_Frontend, "_on_event", notified_again)
    fe = make_frontend("bystander")
    listener, address = fe.listening(backend)
    accept = fe.push_accept(listener, fe.new_id(), fe.new_ring())
    stormer = make_frontend("stormer")
    storming[stormer.guest.domid] = stormer
    try:
        stormer.evtchn.notify(stormer.port)
        assert under_way.wait(TIMEOUT)
        with socket.create_connection(address, timeout=TIMEOUT):
            assert fe.response(accept, timeout=TIMEOUT).ret == 0
    finally:
        storming.clear()


def test_requests_with_released_rings_and_reused_ids(
        raw: RawFrontend, echo_server: Any, bystander: Any) -> None:
    """ACCEPT/CONNECT reusing an active id, RELEASE twice, requests after release."""
    sock_id, ring = raw.connect_socket(echo_server.address)
    assert raw.response(raw.push_connect(sock_id, echo_server.address, raw.new_ring())).ret != 0
    _, rsp = raw.socket(sock_id)
    assert rsp.ret == -17
    assert raw.release(sock_id).ret == 0
    assert raw.release(sock_id).ret == EBADF
    # The guest keeps writing into a ring the backend no longer maps.
    ring.write(b"after release")
    raw.evtchn.notify(ring.port)
    _, rsp = raw.socket(sock_id)
    assert rsp.ret == 0


# -- fuzzing -------------------------------------------------------------------------

_POOL = [0xFFFF888000AA0000 + 0x40 * i for i in range(4)]
_MARKER = 0x7FFF0000  # an unknown command
# Bodies that make sense for some command, so that sockets of the pool get
# created, bound and listened on, and the later requests meet real state.
_SENSIBLE = {
    _wire.PVCALLS_SOCKET: struct.pack("=III", _wire.AF_INET, _wire.SOCK_STREAM, 0),
    _wire.PVCALLS_BIND: _wire.pack_sockaddr_in("127.0.0.1", 0).ljust(28, b"\0")
    + struct.pack("=I", 16),
    _wire.PVCALLS_LISTEN: struct.pack("=I", 5),
}


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cmd=st.one_of(st.sampled_from(range(8)), st.sampled_from(range(8)),
                  st.integers(0, 2**32 - 1)),
    sock_id=st.one_of(st.sampled_from(_POOL), st.sampled_from(_POOL),
                      st.integers(0, 2**64 - 1)),
    garbage=st.integers(0, 3),
    body=st.binary(min_size=48, max_size=48),
)
def test_fuzzed_requests_get_exactly_one_answer(raw: RawFrontend, backend: pvcalls.Backend,
                                                cmd: int, sock_id: int, garbage: int,
                                                body: bytes) -> None:
    """Arbitrary requests on ids that may or may not exist: each is answered
    once with req_id, cmd and id echoed; an ACCEPT or POLL left waiting (on
    a listening socket: nothing connects to it) is answered -EINTR when its
    socket is released."""
    assert raw.ring is not None
    listening = {r.id for r in backend.stats().sockets
                 if r.domain == raw.guest.domid and r.state == "listening"}
    req_id = raw.ring.req_prod_pvt & 31
    if garbage != 3 and cmd in _SENSIBLE:  # most of the time
        body = _SENSIBLE[cmd].ljust(48, b"\0")
    data = struct.pack("=IIQ", req_id, cmd, sock_id) + body
    raw.push(0, raw=data)
    # Commands are handled in ring order, and one answered at once is
    # answered before the next is handled: once this unknown command (no
    # effect, answered at once) has its answer, so has ours unless it waits.
    marker = raw.push(_MARKER)
    raw.wait(lambda: marker in raw.responses)
    assert raw.responses.pop(marker).ret == ENOTSUPP
    if req_id not in raw.responses:
        assert cmd in (_wire.PVCALLS_ACCEPT, _wire.PVCALLS_POLL) and sock_id in listening, (
            f"{_wire.PVCALLS_COMMANDS.get(cmd, cmd)} on {sock_id:#x} left unanswered")
        release = raw.push_release(sock_id)
        raw.wait(lambda: release in raw.responses)
        rsp = raw.responses.pop(req_id)
        assert rsp.ret == -4  # EINTR
        assert raw.responses.pop(release).ret == 0
    else:
        rsp = raw.responses.pop(req_id)
    assert (rsp.req_id, rsp.cmd, rsp.id) == (req_id, cmd, sock_id)
    assert rsp.ret <= 0
    assert raw.responses == {} and raw.unexpected == []  # no second answer
    event(f"{_wire.PVCALLS_COMMANDS.get(cmd, 'unknown')} -> {rsp.ret}")
    # Keep at most a few sockets between examples.
    rows = [r for r in backend.stats().sockets if r.domain == raw.guest.domid]
    if len(rows) > 8:
        for row in rows:
            assert raw.release(row.id).ret in (0, -9)


@pytest.fixture
def one_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every RateLimit made from now on sees the clock stand still: the
    whole test is one interval of the limit, so a burst of lines is all
    the log may get, however slowly the machine runs the test.  (Asked for
    before the frontend, so that its device's limit is made after.)"""
    monkeypatch.setitem(RateLimit.__init__.__kwdefaults__, "clock", lambda: 0.0)


def test_a_frontend_failing_again_and_again_does_not_flood_the_log(
        one_interval: None, raw: RawFrontend, dom0_xs: Any, backend: pvcalls.Backend,
        caplog: pytest.LogCaptureFixture) -> None:
    """A guest that writes a state no frontend may write, restarts
    (Initialising) and does it again, as fast as XenStore lets it: each time
    the device fails (error node, Closing) and may be restarted, but the
    host's log gets at most a burst of lines per interval (10 per 5 s), as
    for whatever else a guest can make the backend say."""
    cycles = 40
    state = f"{raw.fe_path}/state"
    error_node = f"/local/domain/0/error/backend/pvcalls/{raw.guest.domid}/0/error"
    for i in range(cycles):
        raw.xs.write(state, "7")
        raw.wait_backend_state(5)
        # Reported to the frontend every time.
        assert dom0_xs.read(error_node) == "22 saw state 7 at frontend", i
        dom0_xs.write(error_node, "")
        raw.xs.write(state, "1")
        raw.wait_backend_state(2)
    lines = [r for r in caplog.records
             if r.name == "xenback.xenbus" and r.levelno >= logging.ERROR
             and "saw state 7" in r.getMessage()]
    assert len(lines) == 10
    # And the device still works once the frontend behaves.
    assert raw.ring is not None
    raw.ring.release()
    raw.connect()
    _, rsp = raw.socket()
    assert rsp.ret == 0


def test_a_frontend_breaking_its_command_ring_again_and_again_does_not_flood_the_log(
        one_interval: None, raw: RawFrontend, backend: pvcalls.Backend,
        caplog: pytest.LogCaptureFixture) -> None:
    """Each connection's broken command ring is logged, through the
    device's rate limit: reconnecting (Initialising, a new ring) and
    breaking the ring again does not get the guest a new line each time."""
    cycles = 30
    for _ in range(cycles):
        assert raw.ring is not None
        raw.ring._idx[0] = 1000  # req_prod far beyond the slots the ring has
        raw.evtchn.notify(raw.port)
        raw.wait_backend_state(5)
        raw.ring.release()
        raw.xs.write(f"{raw.fe_path}/state", "1")
        raw.connect()
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR
             and "command ring protocol error" in r.getMessage()]
    # The budget is shared with the device error each break causes.
    assert 1 <= len(lines) <= 10
    _, rsp = raw.socket()
    assert rsp.ret == 0


def test_restarting_the_device_does_not_renew_the_log_budget(
        one_interval: None, make_frontend: Any, host: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """What a guest makes the backend log (here CONNECTs refused by
    policy) is rate-limited per device, not per connection: a guest that
    restarts its device (Initialising, connect again) whenever its budget
    is spent gets no more lines for it."""
    deny_all = pvcalls.AccessList(deny=(pvcalls.Rule.parse("*"),))
    policy = pvcalls.Policy(pvcalls.DomainPolicy(connect=deny_all))
    with pvcalls.Backend(host.dom0, cpus=2, policy=policy):
        fe = make_frontend("g")
        # Many per connection, then one per connection: the count of
        # those suppressed is no new line at each restart either.
        for per_connection in [12] * 5 + [1] * 20:
            sock_id, _ = fe.socket()
            ring = fe.new_ring()
            for _ in range(per_connection):
                assert fe.response(fe.push_connect(sock_id, ("127.0.0.1", 9), ring)).ret == -13
            assert fe.ring is not None
            fe.ring.release()
            fe.xs.write(f"{fe.fe_path}/state", "1")
            fe.connect()
        lines = [r for r in caplog.records if "refused by policy" in r.getMessage()]
        assert len(lines) == 10
        counts = [r for r in caplog.records if "suppressed" in r.getMessage()]
        assert counts == []


def test_a_broken_command_ring_fails_its_device_on_the_device_queue(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device's state changes on its queue only (xenback's rule): a
    Closing written from the command Work's thread could land after the
    frontend's Closed was answered, and stay."""
    fe = make_frontend("breaker")
    assert fe.ring is not None
    dev = backend._frontends[(fe.guest.domid, 0)].dev
    where: list[bool] = []
    fatal = dev.fatal

    def recorded(err: int, message: str) -> bool:
        where.append(dev.events.in_queue())
        return fatal(err, message)

    monkeypatch.setattr(dev, "fatal", recorded)
    fe.ring._idx[0] = 1000  # req_prod far beyond the slots the ring has
    fe.evtchn.notify(fe.port)
    fe.wait_backend_state(5)
    assert where == [True]
    fe.close()
    fe.xs.close()


def test_a_broken_command_ring_fails_its_device_though_an_interrupt_cuts_its_log_line_short(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C in the log line the command Work writes of a broken ring
    (the longest call of that branch): the device is failed all the same
    (Closing, the error node written).  Queued after the log line, the
    failure was lost with the interrupt, and the guest, whose ring is
    served no more, was never told."""
    fe = make_frontend("breaker")
    assert fe.ring is not None
    front = backend._frontends[(fe.guest.domid, 0)]
    cut = threading.Event()
    log = front.ratelimit.log

    def cut_log(*args: Any, **kwargs: Any) -> bool:
        if sys._getframe(1).f_code is _Frontend._process_commands.__code__ and not cut.is_set():
            cut.set()
            raise KeyboardInterrupt
        return log(*args, **kwargs)

    monkeypatch.setattr(front.ratelimit, "log", cut_log)
    fe.ring._idx[0] = 1000  # req_prod far beyond the slots the ring has
    fe.evtchn.notify(fe.port)
    assert cut.wait(TIMEOUT)
    front._work.flush(timeout=TIMEOUT)  # the run cut short is over
    front.dev.events.flush()  # and what it queued on the device's queue has run
    assert front._broken
    assert fe.backend_state() == 5
    error = front.dev.xenstore.read(
        f"/local/domain/0/error/backend/pvcalls/{fe.guest.domid}/0/error")
    assert error is not None and error.startswith("22 ")
    fe.close()
    fe.xs.close()


@pytest.mark.parametrize("stored", [False, True])
def test_a_broken_command_ring_fails_its_device_once_though_an_interrupt_cuts_its_queueing_short(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        stored: bool) -> None:
    """A Ctrl-C in the device's queue() that the command Work calls with
    the failure of a broken ring, before that failure is stored there, or
    as queue() returns: the device is failed all the same, and once.  Cut
    short before the store, the failure was lost, the ring marked broken
    already (no later run looked at it again): the guest, whose ring is
    served no more, was never told."""
    fe = make_frontend("breaker")
    assert fe.ring is not None
    front = backend._frontends[(fe.guest.domid, 0)]
    cut = threading.Event()
    queue = front.dev.queue
    failed = []

    def cut_queue(fn: Any, *args: Any) -> bool:
        if getattr(fn, "__func__", None) is not _Frontend._fail_broken_ring:
            return queue(fn, *args)
        if not cut.is_set():
            cut.set()
            if stored:
                queue(fn, *args)
            raise KeyboardInterrupt
        return queue(fn, *args)

    fatal = front.dev.fatal
    monkeypatch.setattr(front.dev, "queue", cut_queue)
    monkeypatch.setattr(front.dev, "fatal", lambda *args: failed.append(args) or fatal(*args))
    fe.ring._idx[0] = 1000  # req_prod far beyond the slots the ring has
    fe.evtchn.notify(fe.port)
    assert cut.wait(TIMEOUT)
    wait_until(lambda: front._broken)
    front._work.flush(timeout=TIMEOUT)  # the runs are over
    front.dev.events.flush()  # and what they queued on the device's queue has run
    assert fe.backend_state() == 5
    assert len(failed) == 1
    fe.close()
    fe.xs.close()


def test_a_broken_ring_s_failure_cut_short_on_the_device_s_queue_is_done_by_the_one_queued_again(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C as the command Work's queueing of a broken ring's failure
    returns (stored: the run done again queues it a second time), and a
    second one in the first failure's fatal(), before it wrote anything:
    the second failure queued fails the device.  Counted as done before
    fatal() was, the first left the device unfailed, and the second,
    taking it as done, did nothing: the guest, whose ring is served no
    more, was never told."""
    fe = make_frontend("breaker")
    assert fe.ring is not None
    front = backend._frontends[(fe.guest.domid, 0)]
    queue = front.dev.queue
    queued: list[object] = []  # the failures queued, once queue() returned

    def cut_queue(fn: Any, *args: Any) -> bool:
        if getattr(fn, "__func__", None) is not _Frontend._fail_broken_ring:
            return queue(fn, *args)
        stored = queue(fn, *args)
        queued.append(fn)
        if len(queued) == 1:
            raise KeyboardInterrupt
        return stored

    fatal = front.dev.fatal
    attempts: list[object] = []

    def cut_fatal(*args: Any) -> bool:
        attempts.append(args)
        if len(attempts) == 1:
            raise KeyboardInterrupt
        return fatal(*args)

    monkeypatch.setattr(front.dev, "queue", cut_queue)
    monkeypatch.setattr(front.dev, "fatal", cut_fatal)
    fe.ring._idx[0] = 1000  # req_prod far beyond the slots the ring has
    fe.evtchn.notify(fe.port)
    # The run done again queued it too, and the device's queue ran both.
    wait_until(lambda: len(queued) == 2)
    fe.wait_backend_state(5)
    assert len(attempts) == 2
    fe.close()
    fe.xs.close()


def test_a_bug_in_queueing_a_broken_ring_s_failure_fails_the_device_without_running_again(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception (a bug of ours, not an interrupt) out of the device's
    queue() that the command Work calls with the failure of a broken
    ring: the device is failed for it (DeviceWork), and the Work meets
    the broken ring no more.  Taken as an interrupt is, the ring marked
    unbroken and the Work queued again, each run met the ring, raised
    again and queued itself again: a loop on the command workqueue,
    until the failure, behind a busy device queue, disabled the Work."""
    fe = make_frontend("breaker")
    assert fe.ring is not None
    front = backend._frontends[(fe.guest.domid, 0)]
    queue = front.dev.queue
    hold = threading.Event()  # the device's queue busy until then
    calls: list[object] = []

    def buggy_queue(fn: Any, *args: Any) -> bool:
        if getattr(fn, "__func__", None) is not _Frontend._fail_broken_ring:
            return queue(fn, *args)
        calls.append(fn)
        if len(calls) == 1:
            queue(hold.wait, TIMEOUT)
            raise RuntimeError("a bug of ours")
        return queue(fn, *args)  # a second run (the bug): the loop ends here

    monkeypatch.setattr(front.dev, "queue", buggy_queue)
    fe.ring._idx[0] = 1000  # req_prod far beyond the slots the ring has
    fe.evtchn.notify(fe.port)
    wait_until(lambda: calls)
    # Until no run is left, queued again by a run too (the device's
    # queue, held, has not failed the device and disabled the Work yet).
    backend.cmd_wq.drain(timeout=TIMEOUT)
    hold.set()
    assert len(calls) == 1
    assert front._broken
    front.dev.events.flush()  # the failure handed over has run
    assert fe.backend_state() == 5
    fe.close()
    fe.xs.close()


def test_a_command_ring_broken_as_the_frontend_closes_leaves_the_device_closed(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command Work meets the broken ring as the frontend goes Closed,
    and disconnect() waits for it: the failure it queues comes after the
    Closed was answered, and must not write Closing over it for a guest
    that has left."""
    fe = make_frontend("leaver")
    assert fe.ring is not None
    front = backend._frontends[(fe.guest.domid, 0)]
    dev = front.dev
    disconnecting = threading.Event()
    close, queue = front.close, dev.queue

    def close_seen() -> None:
        disconnecting.set()
        close()  # waits for the command Work

    def queue_late(fn: Any, *args: object) -> bool:
        if not dev.events.in_queue():  # the command Work's
            assert disconnecting.wait(TIMEOUT)
        return queue(fn, *args)

    monkeypatch.setattr(front, "close", close_seen)
    monkeypatch.setattr(dev, "queue", queue_late)
    fe.ring._idx[0] = 1000  # req_prod far beyond the slots the ring has
    fe.evtchn.notify(fe.port)
    fe.xs.write(f"{fe.fe_path}/state", "6")
    fe.wait_backend_state(6)
    dev.events.flush()
    assert fe.backend_state() == 6
    assert dev.xenstore.read(
        f"/local/domain/0/error/backend/pvcalls/{fe.guest.domid}/0/error") is None


@pytest.mark.parametrize("toolstack", ["deleted", "made again"])
def test_a_command_ring_broken_as_the_toolstack_replaces_the_device_writes_nothing_there(
        make_frontend: Any, host: Any, backend: pvcalls.Backend, dom0_xs: Any,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        toolstack: str) -> None:
    """The command ring breaks while the toolstack deletes the device (a
    forced removal), and maybe makes it again at the same path, before
    the failure runs on the device's queue: fatal() finds the directory
    no longer the device's and says so (False), writing nothing.  The
    failure is the old connection's: no error node and no Closing for a
    new device that did nothing, nor a directory made again for one
    deleted.  The events of the deletion, behind the failure, drop the
    old device, and the new one is served as any other."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    fe = make_frontend("breaker")
    assert fe.ring is not None
    front = backend._frontends[(fe.guest.domid, 0)]
    reported: list[bool] = []
    fatal = front.dev.fatal
    monkeypatch.setattr(front.dev, "fatal", lambda *args: reported.append(fatal(*args)))
    # The frontend's Connected handled first: a frontend event still
    # waiting in the queue would read the state after the deletion
    # (Unknown), and drop the device before the failure ran.
    handed_over(front.dev.xenstore, "connected")
    front.dev.events.flush()
    stalled, go = threading.Event(), threading.Event()
    front.dev.queue(lambda: (stalled.set(), go.wait(TIMEOUT)))  # its events wait
    assert stalled.wait(TIMEOUT)
    fe.ring._idx[0] = 1000  # req_prod far beyond the slots the ring has
    fe.evtchn.notify(fe.port)
    wait_until(lambda: front._broken)
    front._work.flush()  # the failure is queued, behind the stall
    host.toolstack.destroy_device(fe.device)
    again = None
    if toolstack == "made again":
        again = RawFrontend(host, fe.guest, connect=False)
    go.set()
    error = f"/local/domain/0/error/backend/pvcalls/{fe.guest.domid}/0/error"
    if again is None:
        wait_until(lambda: backend.stats().frontends == 0)
        assert dom0_xs.read(fe.be_path) is None
    else:
        again.connect()  # InitWait, then Connected: never Closing
        sock_id, rsp = again.socket()
        assert rsp.ret == 0
        assert again.release(sock_id).ret == 0
        assert backend._frontends[(fe.guest.domid, 0)] is not front
        assert backend.stats().frontends == 1
    front.dev.events.flush()
    assert front.dev.gone
    assert reported == [False]
    assert dom0_xs.read(error) is None
    said = [r for r in caplog.records if "pvcalls command ring" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and "command ring protocol error" not in r.getMessage()]
