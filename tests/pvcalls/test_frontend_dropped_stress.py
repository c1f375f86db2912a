"""Sockets dropped unclosed by many threads while the frontend closes and
opens again: every one is released, and nothing stays behind (in the
backend, in the frontend's tables, or shared with the hypervisor)."""

from __future__ import annotations

import errno
import threading
import time
from collections import Counter
from typing import Any

import pytest
from pvcalls_rawfront import wait_until

import pvcalls
from pvcalls._policy import Policy
from xenback.sim import SimHost

TIMEOUT = 10.0
THREADS = 8
SOCKETS = 200
LIMIT = 12
POLICY = f"""
[default]
max_sockets = {LIMIT}
"""


def held(backend: pvcalls.Backend, fe: pvcalls.Frontend) -> list[Any]:
    return [row for row in backend.stats().sockets if row.domain == fe.domain.domid]


def settled(fe: pvcalls.Frontend) -> bool:
    with fe._lock:
        return (not fe._sockets and not fe._releases and not fe._dropped
                and fe._reaper is None)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("reopen", [False, True])
def test_many_threads_drop_sockets_while_the_frontend_reopens(
        echo_server: Any, reopen: bool) -> None:
    with SimHost() as host, pvcalls.Backend(
            host.dom0, max_ioworkers=2, policy=Policy.from_toml(POLICY)) as backend:
        fe = pvcalls.Frontend(host.create_domain("stress"), timeout=TIMEOUT)
        start = host.hypervisor.stats()
        fe.open()
        made = 0
        made_lock = threading.Lock()
        errors: Counter[str] = Counter()
        unexpected: list[BaseException] = []
        stop = threading.Event()

        def work(n: int) -> None:
            nonlocal made
            while not stop.is_set():
                with made_lock:
                    if made >= SOCKETS:
                        return
                try:
                    s = fe.socket()
                except OSError as exc:
                    errors[errno.errorcode.get(exc.errno or 0, "?")] += 1
                    if exc.errno == errno.EMFILE:
                        # The reaper is behind: let it catch up (bounded).
                        wait_until(lambda: len(fe._dropped) == 0, TIMEOUT)
                    elif exc.errno == errno.ENOTCONN:
                        wait_until(lambda: (fe._connected and not fe._dead)
                                   or stop.is_set(), TIMEOUT)
                    continue
                with made_lock:
                    made += 1
                try:
                    s.settimeout(TIMEOUT)
                    s.connect(echo_server.address)
                    payload = b"%d" % n
                    s.sendall(payload)
                    got = b""
                    while len(got) < len(payload):
                        chunk = s.recv(len(payload) - len(got))
                        if not chunk:
                            break
                        got += chunk
                    if made % 7 == 0:
                        s.close()
                except OSError as exc:
                    errors[errno.errorcode.get(exc.errno or 0, "?")] += 1
                except BaseException as exc:  # pragma: no cover - reported below
                    unexpected.append(exc)
                    return
                del s  # dropped (unless closed above): the reaper releases it

        threads = [threading.Thread(target=work, args=(i,), daemon=True)
                   for i in range(THREADS)]
        for t in threads:
            t.start()
        cycles = 0
        try:
            if reopen:
                last = 0
                deadline = time.monotonic() + 60
                while any(t.is_alive() for t in threads):
                    # Wait for some progress, then close and open again.
                    wait_until(lambda last=last: made >= min(SOCKETS, last + 8)
                               or not any(t.is_alive() for t in threads), TIMEOUT)
                    last = made
                    fe.close()
                    fe.open()
                    cycles += 1
                    assert time.monotonic() < deadline
            for t in threads:
                t.join(60)
                assert not t.is_alive()
        finally:
            stop.set()
        assert unexpected == []
        assert made >= SOCKETS
        # Whatever was dropped is released, with no gc.collect(): reference
        # counting alone frees a PVSocket.
        wait_until(lambda: settled(fe), TIMEOUT)
        wait_until(lambda: not held(backend, fe), TIMEOUT)
        # Every place under the limit is free again.
        socks = [fe.socket() for _ in range(LIMIT)]
        for s in socks:
            s.close()
        fe.close()
        assert settled(fe), (fe._sockets, fe._releases, fe._dropped)
        wait_until(lambda: not held(backend, fe), TIMEOUT)
        wait_until(lambda: all(host.hypervisor.stats()[k] <= start[k]
                               for k in ("grants", "ports")), TIMEOUT)
        assert cycles or not reopen
