"""Linux's own pvcalls-back in dom0: the reference backend.

Debian does not build ``pvcalls-back`` either; prepare.py compiles it from
the matching kernel source.  Running the same guest scenario against it
tells whether a failure belongs to the harness and the guest shim or to the
project's backend (``harness.py --backend linux``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable


class LinuxBackend:
    """Loads pvcalls-back.ko; it then serves every pvcalls device by itself."""

    def __init__(self, module: str, report: Callable[[str], None]) -> None:
        # The host has no kmod, but busybox-static is there for the initramfs.
        load = subprocess.run(["busybox", "insmod", module], capture_output=True, text=True)
        if load.returncode != 0:
            raise RuntimeError(f"insmod {module}: {load.stderr.strip()}")
        report(f"linux pvcalls-back loaded from {module}")

    def stop(self) -> None:
        pass

    def holdings(self, domid: int) -> dict[str, list[str]]:
        return {}

    def leftovers(self, domid: int) -> list[str]:
        # What the kernel module holds is not visible from here.
        return []
