"""xenback.hostlock: one process at a time for a job on a host."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xenback import HostLock, HostLockHeld
from xenback.sim import SimHost

TIMEOUT = 30.0


def held_elsewhere(path: Path) -> subprocess.Popen[str]:
    """A process holding the lock on ``path`` until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from xenback import HostLock; lock = HostLock(sys.argv[1]); "
         "print('held', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def reap(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(TIMEOUT)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def test_the_lock_says_who_holds_it_and_nothing_else(tmp_path: Path) -> None:
    # A lock file left by a process that was killed, with a longer pid.
    path = tmp_path / "job.lock"
    path.write_text("4194304\n" + "x" * 100)
    with HostLock(path) as lock:
        assert path.read_text() == f"{os.getpid()}\n"
        assert lock.path == path
    assert not path.exists()


def test_another_process_is_refused_by_pid_and_file(tmp_path: Path) -> None:
    path = tmp_path / "job.lock"
    holder = held_elsewhere(path)
    try:
        fds = sorted(os.listdir("/proc/self/fd"))
        with pytest.raises(HostLockHeld, match=f"^process {holder.pid} holds {path} already$") \
                as info:
            HostLock(path)
        assert (info.value.pid, info.value.path) == (holder.pid, path)
        assert isinstance(info.value, RuntimeError)
        assert sorted(os.listdir("/proc/self/fd")) == fds  # nothing left open
    finally:
        reap(holder)
    # Killed: its lock went with it, its file is taken over.
    with HostLock(path):
        assert path.read_text() == f"{os.getpid()}\n"


def test_a_holder_that_has_not_written_its_pid_is_said_unknown(tmp_path: Path) -> None:
    path = tmp_path / "job.lock"
    holder = held_elsewhere(path)
    try:
        path.write_text("")
        with pytest.raises(HostLockHeld, match=r"^process \? holds") as info:
            HostLock(path)
        assert info.value.pid is None
    finally:
        reap(holder)


def test_two_locks_in_one_process_refuse_each_other(tmp_path: Path) -> None:
    # flock locks belong to an open file, not to a process.
    path = tmp_path / "job.lock"
    with HostLock(path):
        with pytest.raises(HostLockHeld, match=f"^process {os.getpid()} holds"):
            HostLock(path)


def test_a_lock_file_that_cannot_be_made_is_said(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "job.lock"
    with pytest.raises(FileNotFoundError, match=f"cannot open the lock file {path}: "):
        HostLock(path)


def test_a_lock_file_that_cannot_be_written_is_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "job.lock"

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fds = sorted(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match=(
            rf"^\[Errno {errno.ENOSPC}\] cannot write to the lock file {path}: "
            rf"{os.strerror(errno.ENOSPC)}$")):
        HostLock(path)
    monkeypatch.undo()
    assert not path.exists()
    assert sorted(os.listdir("/proc/self/fd")) == fds


def test_the_lock_is_taken_on_the_file_there_now(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder before us removed the lock file between our open() and
    our flock(): the lock taken on the file it removed keeps nobody out,
    so it is taken again on the one there now."""
    path = tmp_path / "job.lock"
    flock = fcntl.flock
    removed = []

    def removed_first(fd: int, operation: int) -> None:
        if not removed:
            removed.append(fd)
            path.unlink()  # as close() does
        flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", removed_first)
    lock = HostLock(path)
    monkeypatch.undo()
    try:
        assert removed
        assert os.path.samestat(os.fstat(lock._fd), os.stat(path))
        with pytest.raises(HostLockHeld):
            HostLock(path)
    finally:
        lock.close()


def test_letting_go_lets_one_other_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process locking just as another lets go is the only one to get
    it: the file goes before its lock, or a third would make a new one,
    and the second and third would both hold "the" lock."""
    path = tmp_path / "job.lock"
    first = HostLock(path)
    first_fd = first._fd
    close = os.close
    second: list[HostLock] = []

    def close_then_lock(fd: int) -> None:
        close(fd)
        if fd == first_fd and not second:
            second.append(HostLock(path))  # the lock just let go of

    monkeypatch.setattr(os, "close", close_then_lock)
    first.close()
    monkeypatch.undo()
    try:
        assert second
        with pytest.raises(HostLockHeld):
            HostLock(path)  # the third
    finally:
        second[0].close()


def test_closing_a_lock_whose_file_was_replaced_keeps_the_new_one(tmp_path: Path) -> None:
    """Its file removed under it (the simulated host removing its run
    directory) and locked anew by another: closing leaves that one."""
    path = tmp_path / "job.lock"
    old = HostLock(path)
    path.unlink()
    holder = held_elsewhere(path)
    try:
        old.close()
        old.close()  # idempotent
        assert path.read_text() == f"{holder.pid}\n"
        with pytest.raises(HostLockHeld):
            HostLock(path)
    finally:
        reap(holder)


def test_a_domain_s_lock_is_in_its_host_s_run_dir_by_name_and_domid(tmp_path: Path) -> None:
    with SimHost(tmp_path / "run") as host:
        driver = host.create_domain("driver")
        with HostLock.for_domain(host.dom0, "job") as dom0_lock, \
                HostLock.for_domain(driver, "job") as driver_lock:
            assert dom0_lock.path == host.run_dir / "job.dom0.lock"
            assert driver_lock.path == host.run_dir / f"job.dom{driver.domid}.lock"
            with pytest.raises(HostLockHeld, match=(
                    rf"^domain 0 of this host has a job already, in process {os.getpid()} "
                    rf"\(it holds {dom0_lock.path}\)$")) as info:
                HostLock.for_domain(host.dom0, "job")
            assert (info.value.pid, info.value.path) == (os.getpid(), dom0_lock.path)
        assert sorted(host.run_dir.glob("*.lock")) == []



def test_the_refusal_crosses_processes_whole() -> None:
    # A process pool hands its workers' exceptions back pickled.
    import pickle

    refused = HostLockHeld(Path("/run/job.dom0.lock"), 42, "domain 0 of this host has a job")
    again = pickle.loads(pickle.dumps(refused))
    assert (type(again), again.path, again.pid, str(again)) == (
        HostLockHeld, refused.path, 42, "domain 0 of this host has a job")
