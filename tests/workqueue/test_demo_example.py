"""examples/workqueue_demo.py, which the README points to as the tour of the
package: it runs to the end and each section shows what its title says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "examples" / "workqueue_demo.py"
TIMEOUT = 60

# In order; each must match a whole line.  Worker names and the CPU a key
# lands on vary from run to run, what the demo demonstrates does not.
EXPECTED = [
    r"  queue_work_on\(0, ring\) -> True",
    r"  hello ring, from CPU 0 \(kworker/cpu0:\d+\)",
    r"  hello socket, from CPU 1 \(kworker/cpu1:\d+\)",
    r"  hello device, from CPU 2 \(kworker/cpu2:\d+\)",
    # A pending item is not queued twice; a running one once more.
    r"  while it runs, queue_work x5 -> \[True, False, False, False, False\]",
    r"  it ran 2 times in all",
    r"  queue_delayed_work\(1\.0 s\) -> True",
    r"  mod_delayed_work\(0\.1 s\)   -> True",
    r"  fired after \d+\.\d\d s",
    r"  sock-a on CPU [0-3]: ran \[0, 1, 2, 3, 4\]",
    r"  sock-b on CPU [0-3]: ran \[0, 1, 2, 3, 4\]",
    r"  sock-c on CPU [0-3]: ran \[0, 1, 2, 3, 4\]",
    r"  loads: \{0: 2, 1: 2, 2: 2, 3: 2\}",
    r"  on_move: sock2 CPU 2 -> CPU [013]",
    r"  on_move: sock6 CPU 2 -> CPU [013]",
    # Re-homed evenly, and before cpu_down() returned.
    r"  loads: \{0: 3, 1: 3, 3: 2\}  \(cpu_down has returned\)",
    r"  the workqueue's own keys moved too: sock-c is now on CPU [013], "
    r"and still runs in order: ok",
    r"  cpu_up\(2\); a new key goes to the emptiest CPU: 2",
    r"    pending: <Greeting Greeting\.run pending>, <Greeting Greeting\.run pending>",
    r"  hello late, from CPU 0 \(kworker/cpu0:\d+\)",
    r"  hello later, from CPU 0 \(kworker/cpu0:\d+\)",
    r"  pool cpu0: queued=\d+ completed=\d+ failed=0 workers=\d+",
]


def test_the_workqueue_demo_shows_what_it_says() -> None:
    result = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = iter(result.stdout.splitlines())
    for pattern in EXPECTED:
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, result.stdout)
    # The timer was moved forward, and no timer fires early.
    fired = re.search(r"fired after (\d+\.\d+) s", result.stdout)
    assert fired is not None and float(fired[1]) >= 0.1
    # Every item queued ran, on every pool.
    for queued, completed in re.findall(r"queued=(\d+) completed=(\d+)", result.stdout):
        assert queued == completed
