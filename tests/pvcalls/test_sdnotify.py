"""pvcalls._sdnotify: telling systemd how serve is doing, in this process
(test_cli_lifecycle runs serve under a service manager of its own)."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from pathlib import Path

import pytest

from pvcalls import _sdnotify
from pvcalls._sdnotify import Notifier

TIMEOUT = 10.0


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pvcalls._sdnotify"]


def test_an_empty_notify_socket_is_no_service_manager(caplog: pytest.LogCaptureFixture) -> None:
    """NOTIFY_SOCKET set but empty is not being run by a service manager, as
    sd_notify(3) has it: nothing is sent, and nothing is said of it."""
    caplog.set_level(logging.DEBUG)
    Notifier("").notify("READY=1")
    assert _warnings(caplog) == []


def test_an_abstract_name_nobody_listens_on_is_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    """A name in the abstract namespace that nobody has bound: refused, said
    so once (there is no file to look at for why), and nothing more is
    sent."""
    caplog.set_level(logging.WARNING)
    notifier = Notifier(f"@xenback-test-nobody-{secrets.token_hex(8)}")
    notifier.notify("READY=1")
    notifier.notify("STOPPING=1")
    warning, = _warnings(caplog)
    assert "Connection refused" in warning, warning


def test_a_manager_that_reads_nothing_does_not_hold_up_the_service(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A service manager whose socket is full (it reads nothing): the
    message is given up after SEND_TIMEOUT, said so, and serve goes on,
    to stop say."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(_sdnotify, "SEND_TIMEOUT", 0.1)
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        manager.bind(path)
        filler.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:
                filler.sendto(b"x", path)
        notifier = Notifier(path)
        sender = threading.Thread(target=notifier.notify, args=("STOPPING=1",), daemon=True)
        sender.start()
        sender.join(TIMEOUT)
        assert not sender.is_alive()
    warning, = _warnings(caplog)
    assert "timed out" in warning, warning
