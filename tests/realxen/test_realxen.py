"""Linux's own pvcalls-front, in a real domU on a real Xen, against our backend.

Xen 4.17, a Debian dom0 and a Debian domU boot under QEMU (TCG); dom0 runs
Debian's xenstored and the project's ``pvcalls.Backend`` on the ``xen``
platform; the domU's pvshim module drives pvcalls-front through SOCKET,
CONNECT (1 MiB each way), BIND, LISTEN, POLL, ACCEPT (1 MiB each way) and
RELEASE, then powers off, and dom0 checks that the backend released every
socket, grant mapping and event channel.  See README.md beside this file.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from scripts import load_script

HERE = Path(__file__).resolve().parent
TOTAL_BUDGET = 570.0  # seconds, under the 600 s timeout below
PREPARE_BUDGET = 300.0
ATTEMPT_BUDGET = 240.0


harness = load_script(HERE / "harness.py", "realxen_harness")


def _describe(result: Any) -> str:
    console = [line for line in result.lines if " xs| " not in line]
    tail = "\n".join(console[-40:])
    return (f"failing step: {result.step}: {result.details} ({result.seconds:.0f} s)\n"
            f"full console log: {result.log}\nlast console lines:\n{tail}")


@pytest.mark.realxen
@pytest.mark.timeout(600)
def test_linux_pvcalls_front_against_backend_on_real_xen() -> None:
    start = time.monotonic()
    try:
        # Its own process group, killed whole on timeout: apt-get or make
        # must not run on (holding the dpkg lock) after the test gave up.
        prep = harness.run_bounded([sys.executable, str(HERE / "prepare.py")], PREPARE_BUDGET)
    except subprocess.TimeoutExpired:
        pytest.fail(f"prepare.py took more than {PREPARE_BUDGET:.0f} s")
    if prep.returncode == 2:
        lines = prep.stderr.strip().splitlines()
        pytest.skip(lines[-1] if lines else "prepare.py: unavailable (it said nothing more)")
    assert prep.returncode == 0, f"prepare.py failed:\n{prep.stderr[-3000:]}"

    logs = HERE / "cache" / "logs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    failures = []
    for attempt in (1, 2):
        remaining = TOTAL_BUDGET - (time.monotonic() - start)
        if remaining < 60:
            break
        result = harness.boot(
            backend="pvcalls", python=sys.executable,
            timeout=min(ATTEMPT_BUDGET, remaining),
            log=logs / f"pytest-{stamp}-{attempt}.log",
        )
        if result.passed:
            # Every step dom0 runs must pass for PASS; these dom0 skips for
            # other backends, so make sure they ran.
            for step in ("unmap-with-view", "unshare-with-view"):
                assert any(f"REALXEN STEP {step} OK" in line for line in result.lines), (
                    f"dom0 passed without step {step}:\n" + _describe(result))
            if failures:
                # One stall in a few boots was measured on TCG (see README);
                # passing on the retry is accepted, but said out loud.
                warnings.warn(f"real-Xen test passed on retry; first attempt: {failures[0]}",
                              stacklevel=1)
            return
        failures.append(_describe(result))
    pytest.fail("\n\n".join(f"attempt {i}: {f}" for i, f in enumerate(failures, 1)))
