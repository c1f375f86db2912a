"""The project's pvcalls backend on the ``xen`` platform, as dom0.py runs it.

The backend runs in dom0.py's own process so that, once the guest is gone,
what it still holds can be checked from three independent sides: its own
statistics, the grant mappings in this process's address space
(``/proc/self/maps`` shows every gntdev mapping), and the event channels
Xen still has open in dom0 towards the dead guest (``lsevtchn``).

It also checks, on a grant of the live guest, that unmapping while a slice
of the mapping is still held leaves that slice harmless rather than
pointing at unmapped memory (:meth:`RealBackend.check_unmap_with_view`),
and the same of unsharing a page dom0 shares
(:meth:`RealBackend.check_unshare_with_view`).
"""

from __future__ import annotations

import ctypes
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

    def check_unmap_with_view(self, domid: int) -> str:
        """Map the guest's pvcalls command ring once more, keep a slice of
        the mapping, unmap, then use the slice.

        It must read zeros, take a write that reaches neither the guest's
        page nor anything else, and hold no gntdev mapping; the range must
        go with the slice.  (Had unmapping just munmapped the range, as
        ``xengnttab_unmap`` does, the first read would kill this process,
        the backend's, with SIGSEGV.)  Returns what was seen; raises
        AssertionError saying what differs.
        """
        ring_ref = int(self._xs.read(f"{self._frontend(domid)}/ring-ref".encode()))
        gnttab = self.platform.gnttab()
        try:
            mapping = gnttab.map_grant_refs(domid, [ring_ref])
            # req_prod, req_event, rsp_prod, rsp_event: the guest has sent
            # commands, so req_prod is not zero while the grant is mapped.
            view = mapping.buffer[:16]
            address = ctypes.addressof(ctypes.c_char.from_buffer(view))
            before = bytes(view)
            mapping.unmap()
            after = bytes(view)
            held = _maps_line(address)
            # Written only once the guest's page is out of sight, so that a
            # broken unmap cannot corrupt the guest's ring.
            if after == bytes(16):
                view[:] = b"\xa5" * 16
            written = bytes(view)
            with gnttab.map_grant_refs(domid, [ring_ref]) as again:
                guest = bytes(again.buffer[:16])
            del view
            left = _maps_line(address)
        finally:
            gnttab.close()
        seen = (f"ring-ref {ring_ref}: {before.hex()} mapped, {after.hex()} after unmap, "
                f"held by [{held}], guest page {guest.hex()}")
        assert before != bytes(16), f"the guest's ring header read as zeros: {seen}"
        assert after == bytes(16), f"the slice still sees the guest's page: {seen}"
        assert held is not None and "gntdev" not in held, f"gntdev mapping left: {seen}"
        assert written == b"\xa5" * 16, f"the write through the slice was lost: {seen}"
        assert guest != written, f"the write through the slice reached the guest: {seen}"
        assert left != held, f"the zero pages outlived the slice: [{left}]"
        return seen

    def check_unshare_with_view(self) -> str:
        """The same for pages this domain shares (gntalloc): dom0 shares a
        page with itself, maps it back through gntdev, then unshares while
        a slice of the shared buffer is held.  The slice must read zeros
        and take a write; the mapping keeps the page as it was (a grantee
        keeps what it mapped until it unmaps)."""
        gntshr, gnttab = self.platform.gntshr(), self.platform.gnttab()
        try:
            pages = gntshr.share_pages(self.platform.domid, 1)
            pages.buffer[:6] = b"shared"
            view = pages.buffer[:16]
            with gnttab.map_grant_refs(self.platform.domid, pages.refs) as mapping:
                before = bytes(mapping.buffer[:16])
                pages.unshare()
                after = bytes(view)
                if after == bytes(16):
                    view[:] = b"\xa5" * 16
                written = bytes(view)
                mapped = bytes(mapping.buffer[:16])
        finally:
            gntshr.close()
            gnttab.close()
        seen = (f"ref {pages.refs[0]}: {before.hex()} mapped, {after.hex()} after unshare, "
                f"mapping still {mapped.hex()}")
        assert before[:6] == b"shared", f"the mapping does not show the page: {seen}"
        assert after == bytes(16), f"the slice still sees the shared page: {seen}"
        assert written == b"\xa5" * 16, f"the write through the slice was lost: {seen}"
        assert mapped == before, f"unsharing changed what the grantee maps: {seen}"
        return seen

    def _frontend(self, domid: int) -> str:
        """The frontend directory of the guest's (only) pvcalls device."""
        base = f"{BACKEND_DIR}/{domid}"
        (devid,) = self._xs.list(base.encode())
        return self._xs.read(f"{base}/{devid.decode()}/frontend".encode()).decode()

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
        proc = subprocess.run([LSEVTCHN, "0"], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            # An empty listing from a failing lsevtchn would pass for "no
            # port left": fail the run instead.
            raise RuntimeError(f"lsevtchn 0 exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
        out = proc.stdout
        return [line.strip() for line in out.splitlines()
                if re.search(rf"Remote Domain {domid}\b", line)]


def _maps_line(address: int) -> str | None:
    """The ``/proc/self/maps`` line of the range holding ``address``, if any."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        if low <= address < high:
            return line.rstrip()
    return None
