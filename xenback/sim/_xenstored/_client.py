"""A minimal synchronous XenStore wire client.

For tests, benchmarks and tools that want the raw protocol: exact replies,
error names, watch events kept in arrival order, and the ability to send
arbitrary (even malformed) bytes.  Applications should use pyxs.

Threading: a RawClient is not thread-safe; use one per thread.
"""

from __future__ import annotations

import collections
import os
import socket
import time
from pathlib import Path

from xenback._closing import Closing

from ._wire import HEADER, HEADER_SIZE, Op, XsError

__all__ = ["RawClient"]


class RawClient(Closing):
    """One connection to a XenStore socket."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(os.fspath(path))
        except BaseException:
            self.sock.close()
            raise
        self._buf = b""
        self._req_id = 0
        #: watch events received while waiting for replies: (path, token)
        self.events: collections.deque[tuple[str, str]] = collections.deque()

    def close(self) -> None:
        self.sock.close()

    # --- raw level ------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, op: int, payload: bytes, tx_id: int = 0, req_id: int | None = None) -> int:
        """Send one request; returns its req_id."""
        if req_id is None:
            self._req_id = (self._req_id + 1) & 0xFFFFFFFF
            req_id = self._req_id
        self.sock.sendall(HEADER.pack(op, req_id, tx_id, len(payload)) + payload)
        return req_id

    def recv_message(self) -> tuple[int, int, int, bytes]:
        """The next message, whatever it is: (op, req_id, tx_id, payload).

        Raises ConnectionError if the server closed the connection,
        TimeoutError (socket.timeout) past the client's ``timeout``.
        """
        while True:
            if len(self._buf) >= HEADER_SIZE:
                op, req_id, tx_id, length = HEADER.unpack_from(self._buf)
                end = HEADER_SIZE + length
                if len(self._buf) >= end:
                    payload = self._buf[HEADER_SIZE:end]
                    self._buf = self._buf[end:]
                    return op, req_id, tx_id, payload
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("xenstored closed the connection")
            self._buf += data

    def reply(self, req_id: int) -> tuple[int, int, bytes]:
        """Wait for the reply to ``req_id``; events seen meanwhile are kept."""
        while True:
            op, rid, tx_id, payload = self.recv_message()
            if op == Op.WATCH_EVENT:
                self.events.append(_event(payload))
            elif rid == req_id:
                return op, tx_id, payload

    def request(self, op: int, payload: bytes, tx_id: int = 0) -> bytes:
        """Send a request and return its reply payload; XS_ERROR raises XsError,
        a reply of another type ConnectionError (as recv_message's errors)."""
        rop, _tx, payload = self.reply(self.send(op, payload, tx_id))
        if rop == Op.ERROR:
            raise XsError(payload.rstrip(b"\0").decode("ascii", "replace"))
        if rop != op:
            raise ConnectionError(f"reply of type {rop} to request of type {op}")
        return payload

    def wait_event(self, timeout: float = 10.0) -> tuple[str, str]:
        """The next watch event (path, token); TimeoutError if none comes,
        ConnectionError if a message of another type comes first."""
        if self.events:
            return self.events.popleft()
        deadline = time.monotonic() + timeout
        old = self.sock.gettimeout()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no watch event")
                self.sock.settimeout(left)
                op, _rid, _tx, payload = self.recv_message()  # TimeoutError
                if op == Op.WATCH_EVENT:
                    return _event(payload)
                raise ConnectionError(f"unexpected message of type {op}")
        finally:
            self.sock.settimeout(old)

    # --- convenience ------------------------------------------------------------

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.request(Op.READ, path.encode() + b"\0", tx)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        if isinstance(value, str):
            value = value.encode()
        self.request(Op.WRITE, path.encode() + b"\0" + value, tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(Op.MKDIR, path.encode() + b"\0", tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self.request(Op.RM, path.encode() + b"\0", tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        payload = self.request(Op.DIRECTORY, path.encode() + b"\0", tx)
        return [c.decode() for c in payload.split(b"\0")[:-1]]

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        payload = self.request(Op.GET_PERMS, path.encode() + b"\0", tx)
        return [p.decode() for p in payload.split(b"\0")[:-1]]

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        payload = path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms)
        self.request(Op.SET_PERMS, payload, tx)

    def watch(self, path: str, token: str) -> None:
        self.request(Op.WATCH, f"{path}\0{token}\0".encode())

    def unwatch(self, path: str, token: str) -> None:
        self.request(Op.UNWATCH, f"{path}\0{token}\0".encode())

    def transaction_start(self) -> int:
        return int(self.request(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        self.request(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)


def _event(payload: bytes) -> tuple[str, str]:
    parts = payload.split(b"\0")
    if len(parts) < 3:
        raise ConnectionError(f"malformed watch event {payload!r}")
    return parts[0].decode("latin-1"), parts[1].decode("latin-1")
