"""The stateful fuzzer of :mod:`pvcalls_fuzz`, bounded: a few fixed seeds.

Beyond the single garbage requests of test_misbehaving_frontend: sequences
of commands on ids in every state (new, connecting, connected, accepting,
bound, listening, released, reused), data ring abuse while data flows,
indexes starting just before the 32-bit wrap, ``ring_order`` and ``ref[]``
changed after CONNECT, rings and ports shared between sockets, RELEASE
racing data and connects in progress, xenbus state changes and domain death
mid-traffic, with two hostile frontends and a bystander at once; the
backend's table, loads and counters are checked against the answers, and
everything is released once the frontends are gone.  Run it long by hand
(see the module's docstring).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from pvcalls_fuzz import Fuzzer, end_guests, expected_error, held, wait_released
from pvcalls_rawfront import RawFrontend

import pvcalls

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
