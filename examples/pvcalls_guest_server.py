#!/usr/bin/env python3
"""A guest runs a TCP server that host clients reach through PV Calls.

The guest binds and listens on a PV Calls socket; the backend in domain 0
opens the real listening socket on the host.  PV Calls does not tell the
guest which port the host picked for port 0, so we ask the backend
(``backend.stats()``), as an operator would.

Run: ``.venv/bin/python examples/pvcalls_guest_server.py``
"""

import argparse
import socket
import threading

import pvcalls
from xenback.sim import SimHost

# --help, before anything starts.
argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()


def upper_case_server(listener: pvcalls.PVSocket) -> None:
    """The guest's server: answer each line in upper case, one client."""
    conn, _ = listener.accept()
    with conn, conn.makefile("rw", encoding="utf-8") as f:
        for line in f:
            f.write(line.upper())
            f.flush()


with SimHost() as host, pvcalls.Backend(host.dom0) as backend:
    guest = host.create_domain("guest1")
    with pvcalls.Frontend(guest) as fe, fe.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        server = threading.Thread(target=upper_case_server, args=(listener,))
        server.start()

        # Find the host side of the guest's listening socket.
        row = next(r for r in backend.stats().sockets if r.id == listener.id)
        address = row.address
        print(f"guest {guest.domid} listens; host clients connect to {address[0]}:{address[1]}")

        with socket.create_connection(address, timeout=10) as client:
            with client.makefile("rw", encoding="utf-8") as f:
                for word in ("hello", "from", "the host"):
                    f.write(word + "\n")
                    f.flush()
                    print(f"sent {word!r}, guest answered {f.readline().strip()!r}")
        # The client is gone: the guest's server reads end of stream and
        # closes its side.  Wait for that before the frontend goes away,
        # which would close the server's socket under it.
        server.join()
