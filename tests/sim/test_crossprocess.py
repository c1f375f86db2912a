"""A guest in another process shares pages and an event channel with dom0 here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from hosthelpers import eventually, wait_pending
from racewindow import TIMEOUT

from xenback.sim import SimHost

# The guest: shares two pages and an unbound port with dom0, waits for an
# event, answers by upper-casing what dom0 wrote, then waits to be told to go.
GUEST = r"""
import json, select, sys
from xenback.sim import attach

dom = attach(sys.argv[1], int(sys.argv[2]))
shr, ch = dom.gntshr(), dom.evtchn()
pages = shr.share_pages(0, 2)
pages.buffer[0:5] = b"hello"
port = ch.bind_unbound_port(0)
print(json.dumps({"refs": pages.refs, "port": port, "name": dom.name}), flush=True)
while ch.pending() != port:
    select.select([ch], [], [], 10)
pages.buffer[0:5] = bytes(pages.buffer[4096:4101]).upper()
ch.unmask(port)
ch.notify(port)
sys.stdin.readline()
"""

# A backend in another process: maps what a guest (here, in the test) shared.
BACKEND = r"""
import json, sys
from xenback.sim import attach

dom = attach(sys.argv[1], 0)
args = json.loads(sys.stdin.readline())
with dom.gnttab() as tab, tab.map_grant_refs(args["domid"], args["refs"]) as m:
    m.buffer[0:2] = b"ok"
    print(bytes(m.buffer[4096:4100]).decode(), flush=True)
"""


def spawn(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_guest_process_shares_a_page_and_a_channel(host: SimHost) -> None:
    guest = host.create_domain("remote-guest")
    proc = spawn(GUEST, host.run_dir, guest.domid)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        hello = json.loads(proc.stdout.readline())
        assert hello["name"] == "remote-guest"
        with host.dom0.gnttab() as tab, host.dom0.evtchn() as ch:
            mapping = tab.map_grant_refs(guest.domid, hello["refs"])
            assert bytes(mapping.buffer[0:5]) == b"hello"
            port = ch.bind_interdomain(guest.domid, hello["port"])
            mapping.buffer[4096:4101] = b"world"
            ch.notify(port)
            assert wait_pending(ch, 10) == port
            assert bytes(mapping.buffer[0:5]) == b"WORLD"
            ch.unmask(port)
            # The guest process exits: its handles close, dom0 sees it.
            proc.stdin.write("bye\n")
            proc.stdin.flush()
            assert proc.wait(10) == 0
            assert wait_pending(ch, 10) == port
            assert ch.remote(port) is None
            assert host.hypervisor.stats()["grants"] == 2  # still mapped here
            mapping.unmap()
            assert host.hypervisor.stats()["grants"] == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_backend_process_maps_pages_shared_here(host: SimHost) -> None:
    guest = host.create_domain("local-guest")
    with guest.gntshr() as shr:
        pages = shr.share_pages(0, 2)
        pages.buffer[4096:4100] = b"ping"
        proc = spawn(BACKEND, host.run_dir)
        out, _ = proc.communicate(json.dumps({"domid": guest.domid, "refs": pages.refs}) + "\n", 10)
        assert proc.returncode == 0
        assert out.strip() == "ping"
        assert bytes(pages.buffer[0:2]) == b"ok"
        # The backend unmapped (and exited): the refs can be ended at once.
        pages.unshare()
        assert eventually(lambda: host.hypervisor.stats()["grants"] == 0)


def test_killed_process_releases_everything(host: SimHost) -> None:
    guest = host.create_domain("killed")
    proc = spawn(GUEST, host.run_dir, guest.domid)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        hello = json.loads(proc.stdout.readline())
        with host.dom0.evtchn() as ch:
            port = ch.bind_interdomain(guest.domid, hello["port"])
            proc.kill()
            proc.wait()
            assert wait_pending(ch, 10) == port
            assert eventually(lambda: host.hypervisor.stats()["grants"] == 0)
            assert ch.remote(port) is None
    finally:
        proc.stdin.close()
        proc.stdout.close()


# A guest that shares two pages with dom0 and lets go of them when told,
# whatever became of its domain meanwhile.
SHARING_GUEST = r"""
import json, sys
from xenback.sim import attach

dom = attach(sys.argv[1], int(sys.argv[2]))
shr = dom.gntshr()
pages = shr.share_pages(0, 2)
pages.buffer[0:5] = b"hello"
print(json.dumps({"refs": pages.refs}), flush=True)
sys.stdin.readline()
pages.buffer[0:5] = b"after"  # its own mapping: still there
pages.unshare()
shr.close()
print("done", flush=True)
sys.stdin.readline()
"""


def _grant_memory(domid: int) -> tuple[int, int]:
    """(descriptors, mappings) this process holds of the shared-memory files
    of ``domid``'s grants: the service's files and the pages mapped here."""
    name = f"memfd:xenback-sim-grant-d{domid}"
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink(f"/proc/self/fd/{fd}").startswith(f"/{name}")
        except FileNotFoundError:
            pass  # the listing's own descriptor, closed by now
    with open("/proc/self/maps") as maps:
        return fds, sum(name in line for line in maps)


@pytest.mark.parametrize("end", ["killed", "destroyed", "destroyed-then-killed"])
def test_pages_of_a_guest_gone_stay_mapped_until_the_backend_unmaps(
        host: SimHost, end: str) -> None:
    """The guest's process killed, or its domain destroyed under it (which
    may let go of its pages afterwards, or be killed too): what dom0 has
    mapped stays mapped, the same memory, until dom0 unmaps it, and then
    nothing of it is left, neither in the service nor in this process."""
    guest = host.create_domain("going")
    proc = spawn(SHARING_GUEST, host.run_dir, guest.domid)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        refs = json.loads(proc.stdout.readline())["refs"]
        with host.dom0.gnttab() as tab:
            mapping = tab.map_grant_refs(guest.domid, refs)
            # The service's file, our map (once the service closed its
            # copy of the descriptor it sent us).
            assert eventually(lambda: _grant_memory(guest.domid) == (1, 1))
            if end == "killed":
                proc.kill()
                assert proc.wait(TIMEOUT) == -signal.SIGKILL
            else:
                host.destroy_domain(guest)
                if end == "destroyed":
                    # The guest lets go of pages its domain no longer has.
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                    assert proc.stdout.readline() == "done\n"
                else:
                    proc.kill()
                    assert proc.wait(TIMEOUT) == -signal.SIGKILL
            # Only our handle is left: the guest's are closed, by the end
            # of its process or of its domain.
            assert eventually(lambda: host.hypervisor.stats()["connections"] == 1)
            assert host.hypervisor.stats()["grants"] == 2  # still mapped here
            expected = b"after" if end == "destroyed" else b"hello"
            assert bytes(mapping.buffer[0:5]) == expected
            mapping.buffer[4096:4100] = b"mine"  # still writable, still there
            assert bytes(mapping.buffer[4096:4100]) == b"mine"
            stale = mapping.buffer[0:5]
            mapping.unmap()
            assert bytes(stale) == b"\0" * 5  # scrubbed, not freed memory
            assert host.hypervisor.stats()["grants"] == 0
            assert _grant_memory(guest.domid) == (0, 0)
        if end == "destroyed":
            proc.stdin.write("bye\n")
            proc.stdin.flush()
            assert proc.wait(TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
