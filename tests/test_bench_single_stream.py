"""bench/pvcalls_bench.py's single-stream measurement ends even when the
reader takes the last echo before the writer gets to run again."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from scripts import load_script

BENCH = Path(__file__).resolve().parents[1] / "bench" / "pvcalls_bench.py"


def _bench() -> ModuleType:
    return load_script(BENCH, "pvcalls_bench")


class _LaggingWriter:
    """A socket whose sendall returns only once the reader has received the
    echo of everything sent: the interleaving that hung the benchmark."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._cond = threading.Condition()
        self._sent = self._received = 0

    def sendall(self, data: Any) -> None:
        self._sock.sendall(data)
        with self._cond:
            self._sent += len(data)
            assert self._cond.wait_for(lambda: self._received >= self._sent, 10)

    def recv_into(self, view: memoryview) -> int:
        n = self._sock.recv_into(view)  # raises TimeoutError instead of hanging
        with self._cond:
            self._received += n
            self._cond.notify_all()
        return n

    def close(self) -> None:
        self._sock.close()


def test_single_stream_ends_when_the_reader_is_ahead() -> None:
    bench = _bench()
    with socket.create_server(("127.0.0.1", 0)) as server:
        def echo() -> None:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

        echoer = threading.Thread(target=echo, daemon=True)
        echoer.start()
        client = socket.create_connection(server.getsockname())
        client.settimeout(10)
        rate = bench.single_stream(lambda: _LaggingWriter(client), 0.05)
        echoer.join(10)
    assert rate > 0
