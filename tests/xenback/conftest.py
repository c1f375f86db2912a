"""Shared fixtures of the xenback tests."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ccheck.py and the helpers are imported as ``tests.…``: make the
# repository root importable also when pytest runs as a script.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.racewindow import Attempt  # noqa: E402
from tests.xenback.xbhelpers import (  # noqa: E402
    TIMEOUT,
    RecordingDriver,
    SimFrontend,
    leaked_threads,
)
from xenback import XenStore  # noqa: E402


@pytest.fixture
def host() -> Iterator[Any]:
    from xenback.sim import SimHost

    with SimHost() as sim:
        yield sim


@pytest.fixture
def dom0_xs(host: Any) -> Iterator[XenStore]:
    """The toolstack's (privileged) view of XenStore, for test checks."""
    xs = XenStore.connect_to(host.dom0)
    try:
        # Its watch thread starts with its first watch and lives until the
        # fixture ends; start it now, so that thread counts taken by a test
        # (tests.xenback.xbhelpers.Census) see only the backend's threads.
        xs.watch("@introduceDomain", lambda _path: None)
        yield xs
    finally:
        # Within a bound: a close() that waits for ever (for a watch thread
        # it did not stop) fails the test now, not at the harness' timeout.
        outcome = Attempt(xs.close).result(TIMEOUT, msg="dom0_xs: close() did not return")
        if isinstance(outcome, BaseException):
            raise outcome


@pytest.fixture
def frontends() -> Iterator[Any]:
    """Factory of :class:`SimFrontend` objects, all closed at the end."""
    made: list[SimFrontend] = []

    def make(guest: Any, device: Any) -> SimFrontend:
        fe = SimFrontend(guest, device)
        made.append(fe)
        return fe

    yield make
    for fe in made:
        fe.close()


@pytest.fixture
def driver(host: Any) -> Iterator[RecordingDriver]:
    """A started RecordingDriver; stopping it must leave no thread behind."""
    before = {t.ident for t in threading.enumerate()}
    drv = RecordingDriver(host.dom0)
    drv.start()
    try:
        yield drv
    finally:
        drv.stop()
    assert not leaked_threads(before), f"threads left behind: {leaked_threads(before)}"
    assert drv.unordered == [], "hooks ran outside their device's queue"
