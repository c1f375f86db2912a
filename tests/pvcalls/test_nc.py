"""pvcalls-nc as a guest of a xenback-sim daemon served by pvcalls-backend:
how it ends (the other side closes, the backend or the host goes away, a
signal, a broken stdout) and what it says then."""

from __future__ import annotations

import dataclasses
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cli import TIMEOUT, Lines, run_daemon, script


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if a failed test left it running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@dataclasses.dataclass
class Guest:
    """A simulated host with one guest, and a backend serving it."""

    run_dir: Path
    domid: int
    host: subprocess.Popen[bytes]  # xenback-sim
    backend: subprocess.Popen[bytes]  # pvcalls-backend serve
    log: Lines  # the backend's stderr

    def nc(self, *args: str, **popen: Any) -> subprocess.Popen[bytes]:
        """Start pvcalls-nc as this guest; stdio are pipes unless given."""
        for stream in ("stdin", "stdout", "stderr"):
            popen.setdefault(stream, subprocess.PIPE)
        return subprocess.Popen(
            [*script("pvcalls-nc"), "--run-dir", str(self.run_dir), "--domid", str(self.domid),
             *args],
            **popen,
        )


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    run_dir = tmp_path / "run"
    with run_daemon(run_dir) as (host, domid):
        backend = subprocess.Popen(
            [*script("pvcalls-backend"), "serve", "--platform", "sim", "--run-dir", str(run_dir),
             "--log-level", "INFO"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            log = Lines(backend.stderr)
            log.wait_for("serving")
            yield Guest(run_dir, domid, host, backend, log)
        finally:
            backend.send_signal(signal.SIGTERM)
            try:
                backend.wait(TIMEOUT)
            finally:
                reap(backend)


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A host TCP server for the guest to connect to."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(TIMEOUT)
        yield sock


def address(sock: socket.socket) -> list[str]:
    host, port = sock.getsockname()
    return [host, str(port)]


def test_unknown_host_is_named(guest: Guest) -> None:
    nc = guest.nc("-w", "10", "no-such-host.invalid", "80", stdin=subprocess.DEVNULL)
    status, _, err = finish(nc)
    assert status == 1
    assert err.decode().startswith("pvcalls-nc: no-such-host.invalid:80: ")
    assert err.count(b"\n") == 1



def finish(nc: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    """Wait for ``nc`` to exit: its status, stdout and stderr."""
    try:
        out, err = nc.communicate(timeout=TIMEOUT)
    finally:
        reap(nc)
    return nc.returncode, out, err


def test_host_going_away_is_reported(guest: Guest, server: socket.socket) -> None:
    nc = guest.nc(*address(server), stdin=subprocess.DEVNULL)
    try:
        conn, _ = server.accept()
    except BaseException:
        reap(nc)
        raise
    with conn:
        guest.host.send_signal(signal.SIGTERM)
        assert guest.host.wait(TIMEOUT) == 0
        _, _, err = finish(nc)
    assert b"lost XenStore" in err
    assert b"Traceback" not in err
