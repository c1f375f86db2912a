"""What a thread's signal mask holds, as the kernel sees it."""

from __future__ import annotations

import threading
from pathlib import Path


def blocked_signals(thread: threading.Thread) -> set[int]:
    """The signals ``thread`` (a started thread of this process) blocks."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("SigBlk:"))
               .split()[1], 16)
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}
