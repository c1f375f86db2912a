"""Helpers shared by the simulated-host tests (tests/sim/test_{host,grants,evtchn,...}.py)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fdcensus import descriptors  # noqa: F401  (re-exported for the sim tests)
from racewindow import TIMEOUT, Attempt, PauseAt
from stolensignal import Interrupted

import xenback.sim
from xenback.sim import Domain, EventChannel, GrantShare, GrantTable, SimHost
from xenback.sim._proto import MAX_MESSAGE, send_message
from xenback.sim._xenstored import RawClient, XenStored, XsError

# For the interrupt sweeps (stolensignal.interrupted_at): the simulated
# host's code, and in it the round trip of a request to the service, which
# stands for the ioctl it simulates: no signal cuts one in half, so a
# sweep lands nowhere in it.  (One cut between its request and its reply,
# where a call waits, is test_proto.py's: the next call sorts it out.)
SIM_CODE = os.path.dirname(xenback.sim.__file__)
SIM_ROUND_TRIP = os.path.join(SIM_CODE, "_proto.py")


def readable(ch: EventChannel, timeout: float) -> bool:
    r, _, _ = select.select([ch], [], [], timeout)
    return bool(r)


def wait_pending(ch: EventChannel, timeout: float = TIMEOUT) -> int:
    """The next fired port; fails after ``timeout`` seconds without one."""
    deadline = time.monotonic() + timeout
    while True:
        port = ch.pending()
        if port is not None:
            return port
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no event"
        readable(ch, remaining)


def service_caught_up(domain: Domain) -> None:
    """Return once the hypervisor service has accepted every handle of
    ``domain`` opened so far.

    It may accept a handle after its client closed it, which counts it as
    open until it reads the hang-up: a count that is back to where it was
    may not have gone up yet.  The domain's listener queue is first in,
    first out, so a handle opened now is answered only after every one
    before it was accepted; after that, waiting for the count is enough.
    """
    with domain.evtchn() as probe:
        probe.bind_unbound_port(domain.domid)  # one round trip


def eventually(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Wait for a condition the service reaches asynchronously (it has no
    completion event to wait on), polling until ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def cut_short_in_its_join(thread: threading.Thread, stop: Callable[[], object],
                          first: Callable[[], object] = lambda: None) -> None:
    """``stop()`` cut short by a Ctrl-C in its join of ``thread`` (which
    calls ``first()``, then raises without waiting); ``thread``, which
    goes on, joined then: it has ended."""
    join = thread.join

    def cut_short(timeout: float | None = None) -> None:
        first()
        raise Interrupted

    thread.join = cut_short  # type: ignore[method-assign]
    try:
        with pytest.raises(Interrupted):
            stop()
    finally:
        del thread.join
    join(TIMEOUT)
    assert not thread.is_alive()


def refused_as_not_running(xsd: XenStored) -> None:
    """A call of ``xsd``'s from another thread is refused at once: not
    left waiting for a loop that has ended or is stuck (for good, if it
    never comes back)."""
    answer: list[BaseException] = []

    def call() -> None:
        try:
            xsd.is_introduced(0)
        except BaseException as e:
            answer.append(e)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(10.0)
    assert not caller.is_alive(), "a call waits for a loop that is not running"
    assert [type(e) for e in answer] == [RuntimeError]
    assert "not running" in str(answer[0])


@contextlib.contextmanager
def records_made() -> Iterator[list[logging.LogRecord]]:
    """Every record made within, by any thread, emitted or not (logging's
    record factory lists them): for the tests of records not made at a
    level nobody listens to."""
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def listed(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        made.append(record)
        return record

    logging.setLogRecordFactory(listed)
    try:
        yield made
    finally:
        logging.setLogRecordFactory(factory)


def make_guest(xsd: XenStored, dom0: RawClient, domid: int) -> RawClient:
    """Introduce a domain to a bare XenStore server the way a toolstack
    does, and connect as it."""
    home = f"/local/domain/{domid}"
    dom0.mkdir(home)
    dom0.set_perms(home, [f"n{domid}", "r0"])
    return RawClient(xsd.introduce_domain(domid))


def error_of(fn: Callable[..., object], *args: object) -> str:
    """The name of the XenStore error ``fn(*args)`` fails with."""
    with pytest.raises(XsError) as info:
        fn(*args)
    return info.value.name


def serve_one_client(path: str, handle: Callable[[socket.socket], object],
                     kind: socket.SocketKind = socket.SOCK_STREAM) -> threading.Thread:
    """A Unix socket of ``kind`` at ``path`` whose one client
    ``handle(conn)`` serves; the thread serving it, to join."""
    listener = socket.socket(socket.AF_UNIX, kind)
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
        with conn:
            handle(conn)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    return server


def answering_once(path: str, reply: dict[str, Any], fds: list[int]
                   ) -> tuple[threading.Thread, list[dict[str, Any]]]:
    """A fake hypervisor service at ``path``: answers the first request
    with ``reply`` (the request's id added) carrying ``fds`` (closed here
    once sent), then records what the client sends after it.  Returns
    the server thread and that record."""
    later: list[dict[str, Any]] = []

    def handle(conn: socket.socket) -> None:
        request = json.loads(conn.recv(MAX_MESSAGE))
        send_message(conn, {"id": request["id"], **reply}, fds)
        for fd in fds:
            os.close(fd)
        while data := conn.recv(MAX_MESSAGE):
            later.append(json.loads(data))

    return serve_one_client(path, handle, socket.SOCK_SEQPACKET), later


def _read_request(conn: socket.socket) -> tuple[int, int]:
    """Read one whole XenStore request: its ``(rq_id, tx_id)``."""
    header = conn.recv(16, socket.MSG_WAITALL)
    _op, rq_id, tx_id, size = struct.unpack("<4I", header)
    conn.recv(size, socket.MSG_WAITALL)
    return rq_id, tx_id


def hang_up_after_one_request(path: str) -> threading.Thread:
    """A XenStore socket at ``path`` that reads one whole request from its
    one client and hangs up instead of replying (a host going away under a
    request); the thread serving it, to join."""
    return serve_one_client(path, _read_request)


def answer_one_request(path: str, answer: Callable[[int, int], bytes]) -> threading.Thread:
    """A XenStore socket at ``path`` that reads one whole request from its
    one client, sends ``answer(rq_id, tx_id)`` (raw bytes, header
    included) and then waits for the client to hang up; the thread
    serving it, to join."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(answer(*_read_request(conn)))
        while conn.recv(4096):
            pass

    return serve_one_client(path, handle)


HandleCensus = tuple[dict[str, int], frozenset[tuple[int, str]]]


def handle_census(host: SimHost) -> HandleCensus:
    """The simulated hypervisor's counts (domains, handle connections,
    ports, grants, mappings) and this process's descriptors, for
    :func:`released_since`."""
    return host.hypervisor.stats(), descriptors()


def released_since(host: SimHost, before: HandleCensus, where: str) -> None:
    """Wait until every domain, handle, port, grant, mapping and descriptor made
    since ``before`` is gone; else fail saying what is left after
    ``where``."""
    stats, fds = before
    assert eventually(lambda: host.hypervisor.stats() == stats and descriptors() <= fds), (
        f"interrupted {where}: still held: {host.hypervisor.stats()} (was {stats}), "
        f"new descriptors {sorted(descriptors() - fds)}")


def every_landing(host: SimHost, landing: Callable[[int], str], more_than: int) -> list[str]:
    """Drive a Ctrl-C sweep: ``landing(n)`` for n = 0, 1, 2, ..., each
    making what it needs, landing a Ctrl-C at the n-th place of the call
    under test (stolensignal.interrupted_at, whose answer it returns) and
    checking what that call must have done; after each, everything made
    since it began must be released (see :func:`released_since`).  Ends with the first
    that ran undisturbed (''), having checked it too; fails unless more
    than ``more_than`` landed (a sweep that lands nowhere checks nothing).
    Returns where they landed."""
    landed: list[str] = []
    for n in itertools.count():
        before = handle_census(host)
        where = landing(n)
        released_since(host, before, where)
        if not where:
            break
        landed.append(where)
    assert len(landed) > more_than, landed
    return landed


def landings(landing: Callable[[int], str]) -> list[str]:
    """Where ``landing(n)`` landed its Ctrl-C, for n = 0, 1, 2, ... up to
    the first that ran undisturbed (''), which is run and checked too:
    for sweeps with no host to count (every_landing counts a host's
    objects), each ``landing`` checking what it made itself."""
    landed: list[str] = []
    for n in itertools.count():
        where = landing(n)
        if not where:
            break
        landed.append(where)
    return landed


def closed_while_paused(handle: EventChannel | GrantShare | GrantTable, pause: PauseAt,
                        call: Callable[[], object], *, close_returns_first: bool = False,
                        ) -> object:
    """What ``call()`` returned or raised, run in a thread of its own and
    stopped at ``pause``'s line while another thread closes ``handle``:
    until close() has marked the handle closed (then it waits for the
    round trip the call is in to end before it closes the connection),
    or, with ``close_returns_first``, until close() has returned (the
    call stopped past its round trip, where close() waits for nothing of
    it).  close() itself must succeed."""
    calling = Attempt(lambda: pause.run(call))
    try:
        assert pause.reached.wait(TIMEOUT)
        closing = Attempt(handle.close)
        if close_returns_first:
            assert closing.result() is None
        else:
            assert eventually(lambda: handle._closed)
    finally:
        pause.resume()
    outcome = calling.result()
    assert closing.result() is None
    return outcome
