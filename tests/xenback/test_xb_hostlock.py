"""xenback.hostlock: one process at a time for a job on a host."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from racewindow import PauseAt, stands_at

from xenback import HostLock, HostLockHeld, hostlock
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
        there = os.stat(path)
        with pytest.raises(HostLockHeld, match=f"^process {holder.pid} holds {path} already$") \
                as info:
            HostLock(path)
        assert (info.value.pid, info.value.path) == (holder.pid, path)
        assert isinstance(info.value, RuntimeError)
        # The lock file's descriptors alone: other threads (one an earlier
        # test left, say) may open and close theirs meanwhile.
        assert opened_on(there) == []  # nothing left open
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

    written: list[os.stat_result] = []  # the file it could not write

    def full(fd: int, data: bytes, offset: int) -> int:
        written.append(os.fstat(fd))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match=(
            rf"^\[Errno {errno.ENOSPC}\] cannot write to the lock file {path}: "
            rf"{os.strerror(errno.ENOSPC)}$")):
        HostLock(path)
    monkeypatch.undo()
    assert not path.exists()
    assert len(written) == 1 and opened_on(written[0]) == []


@pytest.mark.parametrize("step", ["flock", "_same_file", "pread"])
def test_an_interrupted_lock_leaves_no_descriptor_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """Ctrl-C in the main thread as HostLock()'s flock() returns, while it
    checks the file it has just locked, or while it reads who holds it:
    the descriptor goes with the KeyboardInterrupt.  Kept, it would hold
    the lock for the life of the process, its own next HostLock refused,
    and be inherited by every child it forks, unknown to the fork hook."""
    path = tmp_path / "job.lock"
    other = HostLock(path) if step == "pread" else None  # refused: reads the holder
    there = os.stat(path) if other else None

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    flock = fcntl.flock

    def locked_then_interrupted(fd: int, operation: int) -> None:
        flock(fd, operation)
        raise KeyboardInterrupt

    if step == "pread":
        monkeypatch.setattr(os, "pread", interrupted)
    elif step == "flock":
        monkeypatch.setattr(fcntl, "flock", locked_then_interrupted)
    else:
        monkeypatch.setattr(hostlock, "_same_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        HostLock(path)
    monkeypatch.undo()
    if other is not None:
        assert there is not None and opened_on(there) == [other._fd]
        other.close()
    else:
        assert opened_on(os.stat(path)) == []
    with HostLock(path):  # nobody holds it
        pass


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


def test_a_lock_whose_retry_fails_closes_no_descriptor_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file we locked was removed under us, and opening the one there
    now fails: the descriptor already closed is not closed again, which
    would close whatever the process opened since under its number."""
    path = tmp_path / "job.lock"
    flock, open_, close = fcntl.flock, os.open, os.close
    locked: list[int] = []
    spare: list[int] = []
    # The patches are the process's: other threads' calls go through.
    test_thread = threading.get_ident()

    def removed_first(fd: int, operation: int) -> None:
        flock(fd, operation)
        if threading.get_ident() != test_thread:
            return
        locked.append(fd)
        path.unlink()  # as the holder before us did

    def taken_at_once(fd: int) -> None:
        if locked == [fd] and not spare and threading.get_ident() == test_thread:
            # Closed, and the number another file's at once: dup2 does
            # both in one step, so that no other thread's file gets it.
            readonly = open_(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.dup2(readonly, fd)
            finally:
                close(readonly)
            spare.append(fd)
        else:
            close(fd)

    def open_once(*args: Any) -> int:
        if locked and threading.get_ident() == test_thread:  # the retry
            raise PermissionError(errno.EACCES, "Permission denied")
        return open_(*args)

    monkeypatch.setattr(fcntl, "flock", removed_first)
    monkeypatch.setattr(os, "open", open_once)
    monkeypatch.setattr(os, "close", taken_at_once)
    with pytest.raises(PermissionError, match=f"cannot open the lock file {path}"):
        HostLock(path)
    monkeypatch.undo()
    assert spare == locked  # closed once, by the retry
    try:
        kept = os.path.samestat(os.fstat(spare[0]), os.stat(os.devnull))
    except OSError:
        kept = False  # closed again: the number may be any thread's file by now
    if kept:
        os.close(spare[0])
    assert kept, "the descriptor closed before was closed again"


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


def opened_on(there: os.stat_result, pid: int | str = "self") -> list[int]:
    """The descriptors of process ``pid`` open on the file ``there`` (an
    ``os.stat()`` of it: it may have been removed since)."""
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.path.samestat(os.stat(f"/proc/{pid}/fd/{fd}"), there):
                fds.append(int(fd))
        except FileNotFoundError:  # closed meanwhile (listdir()'s own)
            pass
    return fds


def test_a_lock_file_that_cannot_be_removed_is_said_and_let_go_of(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """close() unlocks all the same (the next holder takes the file over),
    and says which file it left behind and why."""
    path = tmp_path / "job.lock"
    lock = HostLock(path)

    def refused(*args: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "unlink", refused)
    lock.close()
    monkeypatch.undo()
    assert repr(lock) == f"<HostLock {path} released>"
    assert [r.getMessage() for r in caplog.records if r.name == "xenback.hostlock"] == [
        f"cannot remove the lock file {path}: Permission denied"]
    with HostLock(path):
        assert path.read_text() == f"{os.getpid()}\n"


def test_a_started_program_gets_no_descriptor_of_the_lock(tmp_path: Path) -> None:
    # Started without fork()'s hooks (subprocess forks in C): it is the
    # descriptor's close-on-exec that keeps it out.
    path = tmp_path / "job.lock"
    with HostLock(path):
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('started', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, close_fds=False)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "started\n"
            assert opened_on(os.stat(path), proc.pid) == []
        finally:
            reap(proc)


def test_a_forked_child_leaves_its_parent_s_lock_alone(tmp_path: Path) -> None:
    """The child shares the parent's open lock file, and the flock with it:
    it lets go of its descriptor without unlocking the file (that would
    unlock the parent's) or removing it, and its lock is released; its
    close() does nothing."""
    path = tmp_path / "job.lock"
    with HostLock(path) as lock:
        seen_r, seen_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: what it sees goes back through the pipe
            try:
                os.close(seen_r)
                os.write(seen_w, f"{lock!r} {opened_on(os.stat(path))}".encode())
                lock.close()
            finally:
                os._exit(0)
        os.close(seen_w)
        with os.fdopen(seen_r) as seen:
            assert seen.read() == f"<HostLock {path} released> []"
        assert os.waitpid(pid, 0)[1] == 0
        # Still the parent's, file and lock.
        assert path.read_text() == f"{os.getpid()}\n"
        assert repr(lock) == f"<HostLock {path} held>"
        with pytest.raises(HostLockHeld):
            HostLock(path)
    assert not path.exists()


def test_a_forked_child_locks_and_forks_as_any_process(tmp_path: Path) -> None:
    """Having let go of its parent's lock, a child is a process like any
    other: any of its threads takes a lock of its own, and a child it
    forks in turn lets go of that one, nothing failing in the fork's
    hook."""
    with HostLock(tmp_path / "parent.lock"):
        seen_r, seen_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: what it found goes back through the pipe
            try:
                os.close(seen_r)
                failed: list[Any] = []
                sys.unraisablehook = failed.append  # an exception in a fork hook
                taken: list[HostLock] = []
                taker = threading.Thread(
                    target=lambda: taken.append(HostLock(tmp_path / "child.lock")))
                taker.start()
                taker.join(10)
                said = "the thread could not lock" if not taken else ""
                for mine in taken:
                    grandchild = os.fork()
                    if grandchild == 0:
                        os._exit(0 if not failed and repr(mine).endswith(" released>")
                                 and opened_on(os.stat(mine.path)) == [] else 1)
                    code = os.waitstatus_to_exitcode(os.waitpid(grandchild, 0)[1])
                    said += f"its child: {code}"
                    mine.close()
                os.write(seen_w, said.encode())
            finally:
                os._exit(0)
        os.close(seen_w)
        with os.fdopen(seen_r) as seen:
            assert seen.read() == "its child: 0"
        assert os.waitpid(pid, 0)[1] == 0


def test_a_forked_child_lets_go_of_every_lock_though_a_close_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() may report an error (EIO, say) having freed the descriptor
    all the same, as Linux's does: the child goes on with the next lock's,
    not keeping that one's file locked for as long as it lives."""
    parent = os.getpid()
    close = os.close
    failed: list[int] = []

    def close_failing_once_in_the_child(fd: int) -> None:
        close(fd)
        if os.getpid() != parent and not failed:
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    with HostLock(tmp_path / "a.lock") as a, HostLock(tmp_path / "b.lock") as b:
        there = [os.stat(a.path), os.stat(b.path)]
        seen_r, seen_w = os.pipe()
        monkeypatch.setattr(os, "close", close_failing_once_in_the_child)
        pid = os.fork()
        if pid == 0:  # the child: what it kept goes back through the pipe
            try:
                os.write(seen_w, f"{len(failed)} {[opened_on(t) for t in there]}".encode())
            finally:
                os._exit(0)
        monkeypatch.undo()
        os.close(seen_w)
        with os.fdopen(seen_r) as seen:
            assert seen.read() == "1 [[], []]"
        assert os.waitpid(pid, 0)[1] == 0


def _wait_for(started: Any, release: Any) -> None:
    started.set()
    release.wait(TIMEOUT)


def test_a_child_forked_by_multiprocessing_keeps_nobody_out(tmp_path: Path) -> None:
    """The parent lets go while its child lives on: the next holder is let
    in at once, and the child never had the lock file open."""
    context = multiprocessing.get_context("fork")
    started, release = context.Event(), context.Event()
    path = tmp_path / "job.lock"
    lock = HostLock(path)
    child = context.Process(target=_wait_for, args=(started, release))
    child.start()
    try:
        assert started.wait(TIMEOUT)
        assert child.pid is not None and opened_on(os.stat(path), child.pid) == []
        lock.close()
        with HostLock(path):
            assert path.read_text() == f"{os.getpid()}\n"
        assert child.is_alive()
    finally:
        lock.close()
        release.set()
        child.join(TIMEOUT)
    assert child.exitcode == 0


@pytest.mark.parametrize(("method", "line"), [
    ("__init__", "_held.add(self)"),  # opened, not yet known as held
    ("close", "os.close(fd)"),  # no longer known as held, not yet closed
])
def test_a_fork_waits_for_a_lock_being_taken_or_let_go_of(
        tmp_path: Path, method: str, line: str) -> None:
    """A child forked just then would keep a descriptor that its hook does
    not know of: the fork waits until the lock is held or let go of."""
    path = tmp_path / "job.lock"
    locks = [] if method == "__init__" else [HostLock(path)]
    there = [os.stat(path)] if locks else []  # the file, removed or not
    pause = PauseAt(getattr(HostLock, method), line)
    lock_or_unlock = threading.Thread(target=pause.run, args=(
        (lambda: locks.append(HostLock(path))) if method == "__init__" else locks[0].close,))
    seen_r, seen_w = os.pipe()
    forked: list[int] = []

    def fork() -> None:
        pid = os.fork()
        if pid == 0:  # the child: its descriptors on the lock file
            try:
                os.write(seen_w, str(opened_on(there[0])).encode())
            finally:
                os._exit(0)
        forked.append(pid)

    forker = threading.Thread(target=fork)
    lock_or_unlock.start()
    try:
        assert pause.reached.wait(TIMEOUT)
        there = there or [os.stat(path)]
        forker.start()
        deadline = time.monotonic() + TIMEOUT
        while not stands_at(forker.ident or 0, hostlock._before_fork, "_fork_lock.acquire()"):
            assert forker.is_alive() and time.monotonic() < deadline, "the fork did not wait"
            time.sleep(0.005)
    finally:
        pause.resume()
        lock_or_unlock.join(TIMEOUT)
        forker.join(TIMEOUT)
        os.close(seen_w)
        for pid in forked:
            assert os.waitpid(pid, 0)[1] == 0
        for lock in locks:
            lock.close()
    with os.fdopen(seen_r) as seen:
        assert seen.read() == "[]"


def test_a_closed_lock_is_kept_by_nothing(tmp_path: Path) -> None:
    # Forks take the held ones in hand, the closed ones are let go.
    import gc
    import weakref

    lock = HostLock(tmp_path / "job.lock")
    lock.close()
    gone = weakref.ref(lock)
    del lock
    gc.collect()
    assert gone() is None


# Takes the lock, forks a child that says it runs on the descriptor argv[3]
# and lives (holding argv[3] open) until the descriptor argv[2] reads EOF;
# says so and waits.
_FORKS_AND_WAITS = """
import os, sys
from xenback import HostLock

lock = HostLock(sys.argv[1])
release, alive = int(sys.argv[2]), int(sys.argv[3])
if os.fork() == 0:
    os.write(alive, b"r")
    os.read(release, 1)
    os._exit(0)
os.close(alive)
print("forked", flush=True)
sys.stdin.read()
"""


def test_a_crashed_holder_s_child_keeps_nobody_out(tmp_path: Path) -> None:
    """The holder dies (killed) before its child: its lock goes with it,
    the child being no holder."""
    path = tmp_path / "job.lock"
    release_r, release_w = os.pipe()  # the child lives until release_w closes
    alive_r, alive_w = os.pipe()  # "r": the child runs; then EOF: it has gone
    holder = subprocess.Popen(
        [sys.executable, "-c", _FORKS_AND_WAITS, str(path), str(release_r), str(alive_w)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        pass_fds=(release_r, alive_w))
    os.close(release_r)
    os.close(alive_w)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "forked\n"
        # Out of fork(): a child just forked holds the lock until its
        # fork() returns, as every descriptor of its parent's.
        assert select.select([alive_r], [], [], TIMEOUT)[0] == [alive_r]
        assert os.read(alive_r, 1) == b"r"
        reap(holder)  # killed, its lock file left behind
        assert path.exists()
        with HostLock(path):
            assert path.read_text() == f"{os.getpid()}\n"
        assert select.select([alive_r], [], [], 0)[0] == [], "the child has gone already"
    finally:
        reap(holder)
        os.close(release_w)
        assert select.select([alive_r], [], [], TIMEOUT)[0] == [alive_r]
        assert os.read(alive_r, 1) == b""
        os.close(alive_r)


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



@pytest.mark.parametrize(("name", "error", "message"), [
    ("", ValueError, "^a job name must be ASCII letters, digits, '.', '-' and '_', not "
                     "starting with '.' or '-'; got ''$"),
    # ü is a letter: the rule must say which letters it means.
    ("über", ValueError, "^a job name must be ASCII letters, .*; got 'über'$"),
    ("a/b", ValueError, "^a job name must be .*; got 'a/b'$"),
    (".hidden", ValueError, "^a job name must be .*; got '.hidden'$"),
    ("..", ValueError, "^a job name must be .*; got '..'$"),
    ("-rf", ValueError, "^a job name must be .*; got '-rf'$"),
    (3, TypeError, "^a job name must be a str, not int$"),
], ids=["empty", "non-ASCII", "slash", "hidden", "dotdot", "option", "int"])
def test_a_job_name_that_cannot_name_a_lock_file_is_refused(
        tmp_path: Path, name: object, error: type[Exception], message: str) -> None:
    # Taken as it came, "" made a hidden ".dom0.lock", "a/b" looked for a
    # directory a, and 3 made "3.dom0.lock".
    with SimHost(tmp_path / "run") as host:
        with pytest.raises(error, match=message):
            HostLock.for_domain(host.dom0, name)  # type: ignore[arg-type]
        assert sorted(p.name for p in host.run_dir.iterdir()) == ["domains", "xenstored"]


def test_a_lock_on_descriptor_0_is_held(tmp_path: Path) -> None:
    """A process started with stdin closed (a daemon's way) gets descriptor
    0 for its lock file: a lock as any other, held until closed."""
    path = tmp_path / "job.lock"
    script = ("import os, sys; from xenback import HostLock; os.close(0); "
              "lock = HostLock(sys.argv[1]); print(lock._fd, repr(lock)); lock.close(); "
              "print(repr(lock), os.path.exists(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", script, str(path)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.stdout == (f"0 <HostLock {path} held>\n"
                           f"<HostLock {path} released> False\n"), done.stderr


@pytest.mark.parametrize("path", [3, None], ids=["int", "None"])
def test_a_lock_path_of_the_wrong_type_is_named(path: object) -> None:
    # os.fspath()'s "expected str, bytes or os.PathLike object" named no argument.
    with pytest.raises(TypeError, match=f"^a lock file's path must be a str or an os.PathLike, "
                                        f"not {type(path).__name__}$"):
        HostLock(path)  # type: ignore[arg-type]


def test_a_lock_s_platform_of_the_wrong_type_is_named() -> None:
    with pytest.raises(TypeError, match="^platform must be a xenback.platform.Platform, "
                                        "not NoneType$"):
        HostLock.for_domain(None, "job")  # type: ignore[arg-type]


def test_the_refusal_crosses_processes_whole() -> None:
    # A process pool hands its workers' exceptions back pickled.
    import pickle

    refused = HostLockHeld(Path("/run/job.dom0.lock"), 42, "domain 0 of this host has a job")
    again = pickle.loads(pickle.dumps(refused))
    assert (type(again), again.path, again.pid, str(again)) == (
        HostLockHeld, refused.path, 42, "domain 0 of this host has a job")


def test_a_lock_made_into_a_list_is_found_there_whatever_interrupts_it(tmp_path: Path) -> None:
    """A Ctrl-C landing as any call of the making returns, the last one
    (as the constructor returns) included: a lock taken but never handed
    back stayed held (and listed for forks) for the life of the process.
    With ``into``, the caller has it to close, and closing frees it."""
    import itertools

    from stolensignal import interrupted_at

    within = os.path.dirname(hostlock.__file__)
    path = tmp_path / "job.lock"
    landed: list[str] = []
    for n in itertools.count():
        locks: list[HostLock] = []
        where = interrupted_at(n, within, lambda locks=locks: HostLock(path, into=locks))
        for lock in locks:
            lock.close()
        HostLock(path).close()  # free again, whatever happened
        assert not path.exists(), where
        if not where:
            break
        landed.append(where)
    assert any("HostLock.__init__" in where for where in landed), landed
