"""A stand-in for the pvcalls backend: the xenbus handshake and nothing else.

It proves the harness without the project's backend: it answers a new
``backend/pvcalls/<domid>/<devid>`` device the way a backend's probe does
(``versions``, ``max-page-order``, ``function-calls``, then InitWait), which
is all Linux's pvcalls-front needs to probe, and reports the nodes the
frontend then writes.  It never maps anything and never goes Connected, so
the guest's scenario stops at its ``connected`` step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pyxs

INITIALISING, INIT_WAIT, INITIALISED = 1, 2, 3


class StandinBackend:
    """Handshake-only pvcalls backend on a real xenstored.

    ``report(line)`` receives one line per observation; :attr:`frontends`
    maps each device's backend path to the frontend nodes seen once it was
    Initialised.
    """

    def __init__(self, xenstore_path: str, report: Callable[[str], None]) -> None:
        self._client = pyxs.Client(unix_socket_path=xenstore_path)
        self._report = report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="standin", daemon=True)
        self.frontends: dict[str, dict[str, str]] = {}

    def start(self) -> None:
        self._client.connect()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._client.close()

    def holdings(self, domid: int) -> dict[str, list[str]]:
        return {}

    def leftovers(self, domid: int) -> list[str]:
        return []

    def _read(self, path: str) -> str | None:
        try:
            value = self._client.read(path.encode(), None)
        except pyxs.PyXSError:  # gone already: the toolstack removed it
            return None
        return None if value is None else value.decode()

    def _run(self) -> None:
        base = "/local/domain/0/backend/pvcalls"
        seen: set[str] = set()
        with self._client.monitor() as monitor:
            monitor.watch(base.encode(), b"pvcalls")
            for wpath, _token in monitor.wait():
                if self._stop.is_set():
                    return
                path = wpath.decode()
                parts = path[len(base):].strip("/").split("/")
                if len(parts) < 2:
                    continue
                dev = f"{base}/{parts[0]}/{parts[1]}"
                state = self._read(f"{dev}/state")
                if dev not in seen and state == str(INITIALISING):
                    seen.add(dev)
                    self._probe(dev, monitor)
                frontend = self._read(f"{dev}/frontend")
                if frontend and path == f"{frontend}/state":
                    self._frontend_changed(dev, frontend)

    def _probe(self, dev: str, monitor: pyxs.client.Monitor) -> None:
        committed = False
        while not committed:  # commit fails (EAGAIN) if the toolstack raced us
            self._client.transaction()
            self._client.write(f"{dev}/versions".encode(), b"1")
            self._client.write(f"{dev}/max-page-order".encode(), b"4")
            self._client.write(f"{dev}/function-calls".encode(), b"1")
            committed = self._client.commit()
        self._client.write(f"{dev}/state".encode(), str(INIT_WAIT).encode())
        self._report(f"standin: {dev} InitWait")
        frontend = self._read(f"{dev}/frontend")
        if frontend:
            monitor.watch(f"{frontend}/state".encode(), b"frontend")

    def _frontend_changed(self, dev: str, frontend: str) -> None:
        state = self._read(f"{frontend}/state")
        self._report(f"standin: frontend {frontend} state={state}")
        if state == str(INITIALISED) and dev not in self.frontends:
            nodes = {k: self._read(f"{frontend}/{k}") or ""
                     for k in ("version", "ring-ref", "port")}
            self.frontends[dev] = nodes
            self._report(
                "standin: frontend nodes " + " ".join(f"{k}={v}" for k, v in nodes.items())
            )
