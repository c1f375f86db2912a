"""The compiled barrier helper emits the fences ring.py's comments promise."""

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


@pytest.mark.skipif(platform.machine() not in EXPECTED, reason="fences documented for x86-64 and arm64")
def test_fences_match_the_documented_reasoning() -> None:
    bodies = _disassembly()
    for name, pattern in EXPECTED[platform.machine()].items():
        body = bodies[name]
        if pattern is None:
            assert not re.search(r"\b(lock|mfence|lfence|sfence)\b", body), body
        else:
            assert re.search(pattern, body), f"{name}:\n{body}"
