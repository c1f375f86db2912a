"""A guest in another process shares pages and an event channel with dom0 here."""

from __future__ import annotations

import json
import subprocess
import sys

from hosthelpers import eventually, wait_pending

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
