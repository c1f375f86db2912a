"""A host TCP echo server for the pvcalls tests and the fuzzer (its own
module: ``conftest`` is a name every test directory has)."""

from __future__ import annotations

import selectors
import socket
import threading

__all__ = ["EchoServer"]


class EchoServer:
    """A host TCP echo server: one thread, selectors, any number of clients."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.listener.setblocking(False)
        self.address: tuple[str, int] = self.listener.getsockname()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._pending: dict[socket.socket, bytearray] = {}
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            for key, events in self._sel.select():
                sock = key.fileobj
                if sock is self._wake_r:
                    return
                if sock is self.listener:
                    try:
                        conn, _ = self.listener.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    self.accepted += 1
                    self._pending[conn] = bytearray()
                    self._sel.register(conn, selectors.EVENT_READ)
                    continue
                assert isinstance(sock, socket.socket)
                buf = self._pending[sock]
                if events & selectors.EVENT_READ and len(buf) < 1 << 20:
                    try:
                        data = sock.recv(1 << 16)
                    except BlockingIOError:
                        data = None
                    except ConnectionError:
                        data = b""
                    if data == b"":
                        self._sel.unregister(sock)
                        sock.close()
                        del self._pending[sock]
                        continue
                    if data:
                        buf += data
                if buf:
                    try:
                        n = sock.send(buf)
                    except BlockingIOError:
                        n = 0
                    except OSError:
                        n = len(buf)
                    del buf[:n]
                mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if buf else 0)
                if len(buf) >= 1 << 20:
                    mask = selectors.EVENT_WRITE
                self._sel.modify(sock, mask)

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(10)
        for sock in list(self._pending):
            sock.close()
        self.listener.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
