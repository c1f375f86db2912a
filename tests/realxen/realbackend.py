"""The project's pvcalls backend on the ``xen`` platform, as dom0.py runs it.

The backend runs in dom0.py's own process so that, once the guest is gone,
what it still holds can be checked from three independent sides: its own
statistics, the grant mappings in this process's address space
(``/proc/self/maps`` shows every gntdev mapping), and the event channels
Xen still has open in dom0 towards the dead guest (``lsevtchn``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyxs

import pvcalls
import xenback.xen

LSEVTCHN = "/usr/lib/xen-4.17/bin/lsevtchn"
BACKEND_DIR = "/local/domain/0/backend/pvcalls"


class RealBackend:
    """``pvcalls.Backend(xenback.xen.open())`` plus leak checks."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self._report = report
        self.platform = xenback.xen.open()
        self.backend = pvcalls.Backend(self.platform)
        self._xs = self.platform.xenstore()
        self._xs.connect()

    def stop(self) -> None:
        self._xs.close()
        self.backend.close()

    def describe(self) -> str:
        return repr(self.backend)

    def holdings(self, domid: int) -> dict[str, list[str]]:
        """What dom0 holds for guest ``domid``, seen from each side."""
        stats = self.backend.stats()
        return {
            "frontends": [f"{stats.frontends} frontend(s)"] if stats.frontends else [],
            "sockets": [f"{s.kind} {s.state} id={s.id:#x}" for s in stats.sockets],
            "grant mappings": [line for line in Path("/proc/self/maps").read_text().splitlines()
                               if "gntdev" in line],
            "event channels": self._ports_towards(domid),
        }

    def leftovers(self, domid: int) -> list[str]:
        """Everything dom0 still holds for guest ``domid``; empty when clean."""
        left = [f"{len(items)} {what} left: {items[:4]}"
                for what, items in self.holdings(domid).items() if items]
        return left + self._device_nodes(domid)

    def _device_nodes(self, domid: int) -> list[str]:
        """The device is removed by the toolstack or else must be Closed."""
        base = f"{BACKEND_DIR}/{domid}"
        try:
            devids = self._xs.list(base.encode())
        except pyxs.PyXSError:
            return []
        left = []
        for devid in devids:
            state = self._xs.read(f"{base}/{devid.decode()}/state".encode(), b"?")
            if state != b"6":
                left.append(f"{base}/{devid.decode()}/state is {state.decode()}, not Closed (6)")
        return left

    @staticmethod
    def _ports_towards(domid: int) -> list[str]:
        out = subprocess.run([LSEVTCHN, "0"], capture_output=True, text=True).stdout
        return [line.strip() for line in out.splitlines()
                if re.search(rf"Remote Domain {domid}\b", line)]
