"""The backend against a guest that changes its shared pages at any moment,
from another CPU: each value the backend acts on is the one it checked, and
no guest can keep the backend's shared workers to itself.

A guest's concurrent store is made deterministic by wrapping the backend
step it would race with: the wrapper does what the guest's other CPU does
in between."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pvcalls_rawfront import TIMEOUT

import pvcalls
from pvcalls._backend import _Frontend

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

