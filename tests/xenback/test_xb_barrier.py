"""The compiled barrier helper emits the fences ring.py's comments promise,
and every ring step puts them where the kernel's ring macros do."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from xenback import _barrier

EXPECTED = {
    # mb must order a store before a later load: a locked op or mfence.
    # rmb/wmb are compiler barriers only (TSO keeps load/load, store/store).
    "x86_64": {"xb_mb": r"\b(lock|mfence)\b", "xb_rmb": None, "xb_wmb": None},
    "aarch64": {"xb_mb": r"dmb\s+ish\b", "xb_rmb": r"dmb\s+ishld", "xb_wmb": r"dmb\s+ishst"},
}


def _disassembly() -> dict[str, str]:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    text = subprocess.run(
        [objdump, "-d", _barrier.__file__], capture_output=True, text=True, check=True
    ).stdout
    bodies = {}
    for name in ("xb_mb", "xb_rmb", "xb_wmb"):
        # cffi's direct-call entry point is the bare function body.
        match = re.search(rf"<_cffi_d_{name}>:\n(.*?)\n\n", text, re.S)
        assert match, f"{name} not found in {_barrier.__file__}"
        bodies[name] = match.group(1)
    return bodies


def test_barriers_are_callable() -> None:
    for fn in (_barrier.lib.xb_mb, _barrier.lib.xb_rmb, _barrier.lib.xb_wmb):
        fn()


@pytest.mark.skipif(platform.machine() not in EXPECTED,
                    reason="fences documented for x86-64 and arm64")
def test_fences_match_the_documented_reasoning() -> None:
    bodies = _disassembly()
    for name, pattern in EXPECTED[platform.machine()].items():
        body = bodies[name]
        if pattern is None:
            assert not re.search(r"\b(lock|mfence|lfence|sfence)\b", body), body
        else:
            assert re.search(pattern, body), f"{name}:\n{body}"


# Where the barriers stand: each ring step's shared-index accesses and
# barriers, in program order, against the kernel's ring.h macros and the
# pvcalls data ring rules of the protocol reference.


class _Trace:
    """A u32 view that logs every access to ``log`` by the field's name."""

    def __init__(self, view: memoryview, names: dict[int, str], log: list[str]) -> None:
        self._view, self._names, self._log = view, names, log

    def __getitem__(self, i: int) -> int:
        self._log.append(f"load {self._names[i]}")
        return self._view[i]

    def __setitem__(self, i: int, value: int) -> None:
        self._log.append(f"store {self._names[i]}")
        self._view[i] = value

    def release(self) -> None:
        self._view.release()


@pytest.fixture
def trace(monkeypatch) -> list[str]:
    from xenback import ring

    log: list[str] = []
    for name in ("mb", "rmb", "wmb"):
        monkeypatch.setattr(ring, f"_{name}", lambda name=name: log.append(name))
    return log


def _traced_rings(log: list[str]):
    from xenback.ring import BackRing, FrontRing

    buf = bytearray(4096)
    front, back = FrontRing(buf, 64), BackRing(buf, 64)
    names = {0: "req_prod", 1: "req_event", 2: "rsp_prod", 3: "rsp_event"}
    for r in (front, back):
        r._idx = _Trace(r._idx, names, log)  # type: ignore[assignment]
    return front, back


def test_back_ring_barriers(trace) -> None:
    front, back = _traced_rings(trace)
    front.push_request(b"r")
    front.push_requests()
    # RING_PUSH_REQUESTS_AND_CHECK_NOTIFY (the frontend's half).
    assert trace == ["wmb", "store req_prod", "mb", "load req_event"]
    trace.clear()
    (req,) = back.requests()
    # Slots are read only after req_prod, behind a read barrier.
    assert trace == ["load req_prod", "rmb"]
    trace.clear()
    back.push_response(req)
    assert back.push_responses() is True
    # RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: slots before rsp_prod (wmb),
    # rsp_prod before rsp_event (mb: the store->load order x86 also breaks).
    assert trace == ["wmb", "store rsp_prod", "mb", "load rsp_event"]
    trace.clear()
    assert back.final_check_for_requests() is False
    # RING_FINAL_CHECK_FOR_REQUESTS: req_event before the second req_prod.
    assert trace == ["load req_prod", "store req_event", "mb", "load req_prod"]
    trace.clear()
    list(front.responses())
    assert trace == ["load rsp_prod", "rmb"]
    trace.clear()
    assert front.final_check_for_responses() is False
    assert trace == ["load rsp_prod", "store rsp_event", "mb", "load rsp_prod"]


def test_flex_ring_barriers(trace) -> None:
    from xenback.ring import FlexRing

    data, idx = bytearray(16), bytearray(8)
    producer = FlexRing(data, idx, prod_offset=0, cons_offset=4)
    consumer = FlexRing(data, idx, prod_offset=0, cons_offset=4)
    for r in (producer, consumer):
        r._prod = _Trace(r._prod, {0: "prod"}, trace)  # type: ignore[assignment]
        r._cons = _Trace(r._cons, {0: "cons"}, trace)  # type: ignore[assignment]
    producer.writable()[0][:3] = b"abc"
    producer.produce(3)
    # Producer: indexes, full barrier, copy; write barrier, advance prod.
    assert trace == ["load prod", "load cons", "mb", "wmb", "store prod"]
    trace.clear()
    assert bytes(consumer.readable()[0]) == b"abc"
    consumer.consume(3)
    # Consumer: indexes, read barrier, copy; full barrier, advance cons.
    assert trace == ["load prod", "load cons", "rmb", "mb", "store cons"]
