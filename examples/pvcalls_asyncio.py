#!/usr/bin/env python3
"""A guest's asyncio program talks to host servers through PV Calls.

PV Calls sockets work on asyncio's default event loop.  A non-blocking
``connect()`` returns at once and completes when the backend answers, as a
TCP handshake would, so ``loop.sock_connect`` never holds up the loop; a
connected socket is then the ``sock`` of ``asyncio.open_connection``.  Here
one guest asks two host servers at once, and tries a closed port.

Run: ``.venv/bin/python examples/pvcalls_asyncio.py``
"""

import argparse
import asyncio
import socket
import socketserver
import threading

import pvcalls
from xenback.sim import SimHost

# --help, before anything starts.
argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()


class Shout(socketserver.StreamRequestHandler):
    """A host server: answers a line with the line in capitals."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline().upper())


servers = [socketserver.ThreadingTCPServer(("127.0.0.1", 0), Shout) for _ in range(2)]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
closed = socket.create_server(("127.0.0.1", 0))
closed_address = closed.getsockname()
closed.close()  # nobody listens there any more: connecting is refused


async def ask(fe: pvcalls.Frontend, address: tuple[str, int], text: str) -> str:
    loop = asyncio.get_running_loop()
    s = fe.socket()
    s.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(s, address), 10)
    except OSError as exc:
        s.close()
        return f"asked {text!r}: {type(exc).__name__}"
    reader, writer = await asyncio.open_connection(sock=s)
    writer.write(text.encode() + b"\n")
    answer = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    await writer.wait_closed()
    return f"asked {text!r}, host answered {answer.decode().strip()!r}"


async def main(fe: pvcalls.Frontend) -> None:
    answers = await asyncio.gather(
        ask(fe, servers[0].server_address, "hello"),
        ask(fe, servers[1].server_address, "from the guest"),
        ask(fe, closed_address, "anyone there?"),
    )
    print("\n".join(answers))


with SimHost() as host:
    with pvcalls.Backend(host.dom0):
        guest = host.create_domain("guest1")
        with pvcalls.Frontend(guest) as fe:
            asyncio.run(main(fe))

for server in servers:
    server.shutdown()
    server.server_close()
