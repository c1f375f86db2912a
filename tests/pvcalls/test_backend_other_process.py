"""pvcalls Backend: one backend per domain across the processes of a host.

A backend in another process on the same host would answer every
frontend's handshake too, and the two would fight over its devices: the
second is refused, whoever started the first (``pvcalls-backend serve``
or a script of its own).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pvcalls_rawfront import TIMEOUT

import pvcalls
from xenback import HostLockHeld
from xenback.sim import SimHost

# A backend in a child process: serves domain argv[2] of the host in
# argv[1] until a line on stdin, then closes and says so.
_CHILD = """
import sys
import pvcalls
from xenback.sim import attach

with pvcalls.Backend(attach(sys.argv[1], int(sys.argv[2])), cpus=1):
    print("serving", flush=True)
    sys.stdin.readline()
print("closed", flush=True)
"""


@pytest.fixture
def child_backend(host: SimHost) -> Iterator[Any]:
    """child_backend(domid=0): a pvcalls Backend in another process, serving."""
    started: list[subprocess.Popen[str]] = []

    def start(domid: int = 0) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(host.run_dir), str(domid)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "serving\n"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def close_child(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "closed\n"
    assert proc.wait(TIMEOUT) == 0


def test_a_backend_in_another_process_is_refused(host: SimHost, child_backend: Any) -> None:
    first = child_backend()
    before = set(threading.enumerate())
    lock = host.run_dir / "xenback-pvcalls.dom0.lock"
    with pytest.raises(HostLockHeld, match=(
            rf"^domain 0 of this host has a xenback-pvcalls already, in process {first.pid} "
            rf"\(it holds {lock}\)$")) as info:
        pvcalls.Backend(host.dom0, cpus=1)
    assert (info.value.pid, info.value.path) == (first.pid, lock)
    # Nothing left running (its driver, refused, started nothing; what
    # the Backend made before it is released), but the workqueue's pool
    # workers and timer, which are the process's.
    started = set(threading.enumerate()) - before
    assert [t.name for t in started if not t.name.startswith(("kworker/", "wq-"))] == []
    close_child(first)
    # Its claim went with its close().
    with pvcalls.Backend(host.dom0, cpus=1):
        pass


def test_a_killed_backend_leaves_no_claim_behind(host: SimHost, child_backend: Any) -> None:
    first = child_backend()
    first.send_signal(signal.SIGKILL)
    first.wait(TIMEOUT)
    with pvcalls.Backend(host.dom0, cpus=1):
        # Its file is taken over, saying who holds it now.
        lock = host.run_dir / "xenback-pvcalls.dom0.lock"
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()


def test_a_driver_domain_in_another_process_is_another_backend(
        host: SimHost, child_backend: Any) -> None:
    driver = host.create_domain("driver")
    other = child_backend(driver.domid)
    with pvcalls.Backend(host.dom0, cpus=1):
        pass
    # And the other way round: dom0's backend elsewhere, the driver
    # domain's here.
    close_child(other)
    other = child_backend(0)
    with pvcalls.Backend(driver, cpus=1):
        pass
    close_child(other)


def test_a_backend_started_here_refuses_one_elsewhere(host: SimHost) -> None:
    with pvcalls.Backend(host.dom0, cpus=1):
        done = subprocess.run([sys.executable, "-c", _CHILD, str(host.run_dir), "0"],
                              input="", capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"xenback.hostlock.HostLockHeld: domain 0 of this host has a xenback-pvcalls "
        f"already, in process {os.getpid()} (it holds {host.run_dir}/xenback-pvcalls.dom0.lock)")


@pytest.mark.parametrize("where", ["pollers", "driver"])
def test_a_failed_start_holds_no_claim(
        host: SimHost, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A start that fails half-way lets the next backend in, in any
    process: before its driver took the domain's lock (making its
    pollers), or after (once the driver started)."""
    from pvcalls import _backend

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(f"no {where} today")

    if where == "pollers":
        monkeypatch.setattr(_backend, "CpuPoller", fail)
    else:
        start = _backend._PvcallsDriver.start

        def start_then_fail(driver: Any) -> None:
            start(driver)
            fail()

        monkeypatch.setattr(_backend._PvcallsDriver, "start", start_then_fail)
    lock = host.run_dir / "xenback-pvcalls.dom0.lock"
    with pytest.raises(OSError, match=f"no {where} today"):
        pvcalls.Backend(host.dom0, cpus=1)
    monkeypatch.undo()
    assert not lock.exists()
    assert str(lock) not in " ".join(open_files())
    with pvcalls.Backend(host.dom0, cpus=1):  # nor in this process
        assert lock.exists()


def open_files() -> list[str]:
    """What this process's descriptors are open on."""
    files = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            files.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # listdir()'s own
            pass
    return files


@pytest.mark.parametrize("first", ["host", "backend"])
def test_host_and_backend_close_in_either_order_leaving_nothing(
        tmp_path: Path, first: str, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    host = SimHost(run_dir).start()
    backend = pvcalls.Backend(host.dom0, cpus=1)
    assert (run_dir / "xenback-pvcalls.dom0.lock").exists()
    with caplog.at_level(logging.WARNING, logger="xenback"):
        if first == "host":
            host.close()
            backend.close()
        else:
            backend.close()
            host.close()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("xenback.hostlock")] == []
    assert not run_dir.exists() or list(run_dir.iterdir()) == []


def test_a_backend_on_an_own_run_dir_host_closed_first_is_quiet(
        caplog: pytest.LogCaptureFixture) -> None:
    # The host removes its run directory, lock file and all.
    host = SimHost().start()
    backend = pvcalls.Backend(host.dom0, cpus=1)
    with caplog.at_level(logging.WARNING, logger="xenback"):
        host.close()
        backend.close()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("xenback.hostlock")] == []
    assert not host.run_dir.exists()
