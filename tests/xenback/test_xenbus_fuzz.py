"""The stateful fuzzer of :mod:`tests.xenback.xenbus_fuzz`, bounded: a few
fixed seeds with few steps.

Hostile frontends (every state, good and bad rings, nodes and whole
directories deleted, writes into the backend's directory, watches), a busy
toolstack (devices added, re-added, removed twice, destroyed, domains
destroyed, a device's own nodes taken from its backend) and driver hooks
that raise or dawdle, over a backend in dom0 and one in a driver domain,
while a bystander goes round its lifecycle;
the backend states, the order of the hooks and the xenbus table at rest
are checked as it goes, and nothing may be left once every guest is gone.
Run it long by hand (see the module's docstring).
"""

from __future__ import annotations

import pytest

from tests.xenback.xenbus_fuzz import Run


@pytest.mark.timeout(60)
# 2030 takes a driver domain's device's state and online (op_take).
@pytest.mark.parametrize("seed", [7, 19, 2030])
def test_xenbus_fuzz(seed: int) -> None:
    with Run(seed) as run:
        fz = run.fuzz(150)
    # The run met what it is there for.
    for op in ("publish", "state", "remove", "intrusion refused", "take"):
        assert fz.seen[op] > 0, f"seed {seed} never did {op}: {fz.seen}"
