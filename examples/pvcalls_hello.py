#!/usr/bin/env python3
"""A guest talks to a host TCP server through PV Calls, in 30 lines.

Everything runs in this one process on a simulated Xen host: domain 0 runs
the PV Calls backend, a guest domain uses the frontend library, whose
sockets behave like ``socket.socket``.  The guest's bytes travel through
Xen shared memory (granted pages) to the backend, which moves them to a
real host socket.

Run: ``.venv/bin/python examples/pvcalls_hello.py``
"""

import argparse
import socket
import threading

import pvcalls
from xenback.sim import SimHost

# --help, before anything starts.
argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()

# A plain TCP server on the host: it greets whoever connects.
server = socket.create_server(("127.0.0.1", 0))
host_address = server.getsockname()


def greet() -> None:
    conn, _ = server.accept()
    with conn:
        name = conn.recv(100).decode()
        conn.sendall(f"Hello, {name}! Greetings from the host.\n".encode())


threading.Thread(target=greet, daemon=True).start()

with SimHost() as host:  # XenStore, grant tables and event channels, simulated
    with pvcalls.Backend(host.dom0):  # dom0 serves every guest's pvcalls device
        guest = host.create_domain("guest1")
        with pvcalls.Frontend(guest) as fe:  # the guest's pvcalls driver
            with fe.socket() as s:  # like socket.socket(AF_INET, SOCK_STREAM)
                s.settimeout(10)
                s.connect(host_address)
                s.sendall(b"guest1")
                print(s.makefile("r").readline(), end="")

server.close()
