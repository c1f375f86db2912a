"""The stateful fuzzer of :mod:`pvcalls_fuzz`, bounded: a few fixed seeds.

Beyond the single garbage requests of test_misbehaving_frontend: sequences
of commands on ids in every state (new, connecting, connected, accepting,
bound, listening, released, reused), data ring abuse while data flows,
indexes starting just before the 32-bit wrap, ``ring_order`` and ``ref[]``
changed after CONNECT, rings and ports shared between sockets, RELEASE
racing data and connects in progress, xenbus state changes and domain death
mid-traffic, indexes pages given again (the backend's ring hints: same or
changed ``ref[]``, pages revoked, more pages than it keeps hints for),
with two hostile frontends and a bystander at once; the
backend's table, loads and counters are checked against the answers, and
everything is released once the frontends are gone.  Run it long by hand
(see the module's docstring).
"""

from __future__ import annotations

import argparse
import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

import pvcalls_rawfront
import pytest
from pvcalls_fuzz import Fuzzer, end_guests, expected_error, held, run_seed, wait_released
from pvcalls_rawfront import RawFrontend, threads

import pvcalls
from pvcalls import _socket

# Rarer operations made more frequent, so that a short run meets them.
_OPS = dict(Fuzzer.OPS, closing=2, death=1, shared_ring=4, unbind=2, blackhole=2)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [11, 23, 42])
def test_stateful_fuzz(seed: int, host: Any, backend: pvcalls.Backend,
                       make_frontend: Callable[..., RawFrontend], echo_server: Any,
                       caplog: pytest.LogCaptureFixture,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(Fuzzer, "OPS", _OPS)
    # Few hints, so that 400 steps outgrow them (the refs: four rings'
    # of the default order, one of the largest).
    monkeypatch.setattr(_socket, "RING_HINTS", 4)
    monkeypatch.setattr(_socket, "RING_HINT_REFS", 16)
    before = held(host)
    fz = Fuzzer(seed, host, backend, make_frontend, echo_server.address)
    fz.run(400)
    fz.close()
    end_guests(fz)
    wait_released(host, before)
    errors = [r for r in caplog.records
              if r.levelno >= logging.ERROR and not expected_error(r)
              and r.name.split(".")[0] in ("pvcalls", "xenback", "workqueue")]
    assert errors == []


@pytest.mark.timeout(60)
def test_campaign_seed_lets_go_of_its_frontends(echo_server: Any) -> None:
    """A long campaign runs hundreds of seeds in one process: each must
    leave no RawFrontend behind (their rings' pages and views made every
    later seed's gc.collect() slower, 0.6 s a seed at first, 2.5 s by the
    seven hundredth)."""
    pvcalls_rawfront.dispose_all()
    args = argparse.Namespace(steps=40, hostiles=2, max_sockets=None, max_page_order=4,
                              cpus=4, abrupt=False, ring_hints=None)
    seen: collections.Counter[str] = collections.Counter()
    run_seed(1000, args, seen, type(echo_server))
    assert seen, "the seed made no requests"
    assert pvcalls_rawfront._live == []


def test_the_process_timer_thread_is_no_thread_a_seed_left() -> None:
    """The first timer armed in a process starts its timer thread, which
    never ends: a seed that armed it has left nothing behind."""
    from workqueue._timer import add_timer, del_timer

    del_timer(add_timer(3600.0, lambda arg: None))
    assert "wq-timer" in {t.name for t in threading.enumerate()}
    assert "wq-timer" not in threads()
