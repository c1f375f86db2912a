"""The code a user copies first: the README's Python blocks and the example
at the top of each package's docstring run as written.

Each is taken from its document, so that an edit of the documentation (or
of an API it uses) that breaks it fails here.  The few names a snippet
leaves to the reader (``port``, ``data``, ``handle``...) are given to it;
the rest must come from its own imports.
"""

from __future__ import annotations

import importlib
import re
import socket
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xenback.sim import SimHost

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_block(first_line: str) -> str:
    """The README's ```python block that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    found = [block for block in blocks if block.startswith(first_line)]
    assert len(found) == 1, f"no single README python block starts with {first_line!r}"
    return str(found[0])


def docstring_example(module: str) -> str:
    """The first indented block of ``module``'s docstring, dedented."""
    doc = importlib.import_module(module).__doc__ or ""
    lines: list[str] = []
    for line in doc.splitlines():
        if line.startswith("    ") or (lines and not line.strip()):
            lines.append(line)
        elif lines:
            break
    assert lines, f"{module}'s docstring has no example"
    return textwrap.dedent("\n".join(lines))


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A host echo server's port: what the pvcalls snippets connect to."""
    server = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # shut down: the test is over
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    # shutdown() wakes the accept(); close() alone would leave it waiting.
    server.shutdown(socket.SHUT_RDWR)
    thread.join(10)
    server.close()


def run(code: str, **names: Any) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "snippet", **names}
    exec(compile(code, "<snippet>", "exec"), namespace)
    return namespace


def test_readme_workqueue(capsys: pytest.CaptureFixture[str]) -> None:
    handled = threading.Event()
    ran = threading.Event()
    ns = run(readme_block("from workqueue import"),
             handle=lambda work: handled.set(), key="socket-1", f=ran.set)
    assert handled.is_set() and ran.is_set()
    assert ns["fut"].result(10) == 1024
    assert "workqueue events:" in capsys.readouterr().out


def test_readme_simulated_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing serves the snippet's console device: destroy_domain() waits
    # its 10 s for a backend to close it, as the README says.  A shorter
    # wait shows the same.
    destroy = SimHost.destroy_domain
    monkeypatch.setattr(SimHost, "destroy_domain",
                        lambda self, domain, timeout=0.2: destroy(self, domain, timeout))
    ns = run(readme_block("from xenback.sim import SimHost\n\nwith SimHost()"))
    assert ns["dev"].device_type == "console"
    assert ns["dev"].frontend_id == ns["guest"].domid == 1
    assert not ns["host"].run_dir.exists()  # "torn down on exit"


def test_readme_pvcalls(echo_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    ns = run(readme_block("from xenback.sim import SimHost\nimport pvcalls"),
             port=echo_port, data=b"ping")
    assert ns["s"].closed
    assert "BackendStats(" in capsys.readouterr().out


def test_workqueue_docstring(capsys: pytest.CaptureFixture[str]) -> None:
    run(docstring_example("workqueue"))
    assert capsys.readouterr().out.startswith("ran <Work")


def test_xenback_sim_docstring() -> None:
    ns = run(docstring_example("xenback.sim"))
    assert ns["device"].device_type == "pvcalls"


def test_frontend_device_docstring(tmp_path: Path) -> None:
    from tests.scripts import load_script

    console = load_script(ROOT / "examples" / "console_backend.py", "console_backend")
    with SimHost() as host, console.ConsoleBackend(host.dom0, tmp_path):
        guest = host.create_domain("guest1")
        ns = run(docstring_example("xenback.sim._frontend"), guest=guest)
        assert host.toolstack.devices(guest.domid) == []  # closed, and removed
    assert repr(ns["fe"]) == "<FrontendDevice /local/domain/1/device/console/0 closed>"


def test_pvcalls_docstring(echo_port: int) -> None:
    ns = run(docstring_example("pvcalls"), port=echo_port)
    assert ns["s"].closed


def test_pvcalls_frontend_docstring(echo_port: int) -> None:
    import pvcalls

    with SimHost() as host, pvcalls.Backend(host.dom0):
        guest = host.create_domain("guest1")
        ns = run(docstring_example("pvcalls.frontend"),
                 pvcalls=pvcalls, guest=guest, port=echo_port)
    assert ns["reply"] == b"hello"
