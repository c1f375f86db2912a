"""One process at a time for a job on a host: a lock file naming its holder.

Two backends serving one domain's devices would both answer every
frontend's handshake and fight over its devices.  So every
:class:`~xenback.xenbus.BackendDriver` holds one while it is started
(``xenback-<device type>``), and a second one, in this process or
another, is refused with :class:`HostLockHeld`, which says which process
holds which file.  A job of another kind takes its own with
``HostLock.for_domain(platform, "my-job")``.

The lock is an ``flock`` on a file in the platform's ``run_dir`` (a real
host's ``/run``, the simulated host's run directory), so it goes with its
process however that ends: a crash leaves no stale lock, only a file the
next holder takes over.  A clean release removes the file.  It is the
process's alone: the programs it starts and the children it forks do not
hold it, or one of them living on would keep it after its holder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
from pathlib import Path

from xenback._closing import Closing
from xenback.platform import Platform, check_platform

__all__ = ["HostLock", "HostLockHeld"]

logger = logging.getLogger(__name__)

# A job's name is the stem of its lock file's name in a directory others
# share: nothing that would make it a path, a hidden file or an option.
_JOB_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class HostLockHeld(RuntimeError):
    """Another process (or another :class:`HostLock` of this one) holds the
    lock: the file it holds is ``path``, its process ``pid`` (``None`` if
    it has not written it yet)."""

    def __init__(self, path: Path, pid: int | None, message: str | None = None) -> None:
        self.path = path
        self.pid = pid
        super().__init__(message or f"process {_pid_text(pid)} holds {path} already")

    def __reduce__(self) -> tuple[type[HostLockHeld], tuple[Path, int | None, str]]:
        # As it was made: pickle's default would call us with the message
        # alone (a process pool handing it back to its caller).
        return type(self), (self.path, self.pid, str(self))


def _pid_text(pid: int | None) -> str:
    return "?" if pid is None else str(pid)


_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``fd`` is the file at ``path`` now."""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    return os.path.samestat(there, os.fstat(fd))


# Every HostLock's descriptor is opened and entered in _held, and taken out
# and closed, under _fork_lock, which os.fork() takes too: a child is forked
# with each lock of this process open and in _held, or not open at all,
# never in between (and then kept by the child unknown to _forget_in_child).
# Reentrant, for a signal handler that takes or lets go of a lock while the
# main thread is doing so, and for __init__'s close() of a lock it could not
# write to (or was interrupted in).
_fork_lock = threading.RLock()
# The locks this process holds, for a forked child to let go of.  Strong
# references: a lock dropped without close() still holds its file, and must
# not be passed on to children any more than a kept one.  close() takes a
# lock out, so that nothing keeps a closed lock alive.
_held: set[HostLock] = set()


def _forget_in_child() -> None:
    """In a child just forked: close its copy of each descriptor its
    parent's locks hold, leaving the file and the lock to the parent.

    The copy shares the parent's open file, and an flock belongs to the
    open file, not to a descriptor or a process: kept, it would hold the
    lock after the parent let go of it or died, keeping every next holder
    out for as long as the child lives.  Closing the copy drops the child's
    share only; unlocking (flock's LOCK_UN acts on the shared open file)
    or removing the file would take the lock from under the parent.  The
    child's HostLock is left released, its close() doing nothing.

    A close() that fails goes on with the next lock: Linux frees the
    descriptor whatever close() reports (EIO, EINTR), and stopping would
    leave the next locks' descriptors to the child, with their files.
    """
    try:
        for lock in _held:
            fd, lock._fd = lock._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass  # freed all the same: nothing to do, nor to log in a fork
    finally:
        _held.clear()
        _fork_lock.release()


def _before_fork() -> None:
    # A function of ours rather than _fork_lock.acquire itself: a fork that
    # waits here shows where in a thread's Python stack.
    _fork_lock.acquire()


os.register_at_fork(before=_before_fork, after_in_parent=_fork_lock.release,
                    after_in_child=_forget_in_child)


class HostLock(Closing):
    """An exclusive lock on ``path`` for this process, until :meth:`close`.

    Raises :class:`HostLockHeld` if another process holds it (or another
    :class:`HostLock` of this one: locks belong to an open file, not to a
    process), :class:`OSError` naming the file if it cannot be opened or
    written.  The holder's pid is written in the file, for the refusal to
    name it.

    The lock is this process's alone: a program it starts does not get its
    descriptor (close-on-exec), and a child it forks (``os.fork()``,
    :mod:`multiprocessing`'s fork) closes its copy at once, its HostLock
    released, so that neither outlives the holder with the lock.

    :meth:`close` removes the file and only then unlocks it, so that
    nobody can lock it in between; a process that opened the file before
    it was removed finds, once it has the lock, that the file it locked is
    not the one at ``path`` any more, and tries again with that one.  A
    lock on a removed file keeps nobody out.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 into: list[HostLock] | None = None) -> None:
        """Lock ``path``.  With ``into``, the lock is appended to it before
        the file is locked: for a caller that must release it whatever
        interrupts its making, a Ctrl-C as this returns included, which
        would lose a held lock to it (closing one not locked does nothing)."""
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"a lock file's path must be a str or an os.PathLike, "
                            f"not {type(path).__name__}")
        self._path = Path(path)
        self._fd = -1  # set by _lock() once the file is locked
        if into is not None:
            into.append(self)
        with _fork_lock:
            try:
                self._lock()
                _held.add(self)
                try:
                    os.ftruncate(self._fd, 0)
                    os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot write to the lock file {path}: "
                                             f"{exc.strerror}") from None
            except BaseException:
                self.close()
                raise

    def _lock(self) -> None:
        """Lock the file at our path, as ``self._fd``.  Recorded there as
        soon as it is locked, and the descriptor closed on every way out
        until then: whatever interrupts us after (Ctrl-C) finds it for
        close(), not left open and locked for the life of the process."""
        path = self._path
        while True:
            # Opened through list.extend(), which stores the descriptor
            # before control is back in Python code: as ``fd = os.open()``,
            # a Ctrl-C as the call returned would leave it open for good.
            opened: list[int] = []
            try:
                try:
                    opened.extend(map(os.open, (path,), (_OPEN_FLAGS,), (0o644,)))
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot open the lock file {path}: "
                                             f"{exc.strerror}") from None
                fd = opened[0]
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    raise HostLockHeld(path, int(holder) if holder.isdecimal() else None
                                       ) from None
            except BaseException:
                for fd in opened:
                    os.close(fd)
                raise
            self._fd = fd
            if _same_file(path, fd):
                return
            # Removed by the holder before us between our open and our
            # flock (see close()): lock the file there now.
            self._fd = -1
            os.close(fd)

    @classmethod
    def for_domain(cls, platform: Platform, name: str, *,
                   into: list[HostLock] | None = None) -> HostLock:
        """The lock of job ``name`` (a file name's stem: ``"my-backend"``)
        for ``platform``'s domain on its host: the file
        ``<run_dir>/<name>.dom<domid>.lock``.  A name that cannot be such
        a stem (a ``/``, a hidden file's leading ``.``, an option's ``-``)
        is a ValueError, one not a str a TypeError.

        The domain's id is in its name because the domains of a simulated
        host share its run directory: the backend of a driver domain is no
        second backend of dom0's.  :class:`HostLockHeld` says which domain
        and job are taken, and by which process.  ``into`` as for the
        constructor.
        """
        check_platform(platform)
        if not isinstance(name, str):
            raise TypeError(f"a job name must be a str, not {type(name).__name__}")
        if not _JOB_NAME.fullmatch(name):
            raise ValueError("a job name must be ASCII letters, digits, '.', '-' and '_', not "
                             f"starting with '.' or '-'; got {name!r}")
        domid = platform.domid
        try:
            return cls(Path(platform.run_dir) / f"{name}.dom{domid}.lock", into=into)
        except HostLockHeld as exc:
            raise HostLockHeld(exc.path, exc.pid, (
                f"domain {domid} of this host has a {name} already, in process "
                f"{_pid_text(exc.pid)} (it holds {exc.path})")) from None

    @property
    def path(self) -> Path:
        """The lock file."""
        return self._path

    def close(self) -> None:
        """Remove the lock file and unlock it; idempotent.  Does nothing in
        a forked child (see the class)."""
        unlinked: OSError | None = None
        with _fork_lock:
            fd, self._fd = self._fd, -1
            if fd < 0:
                return
            try:
                _held.discard(self)
                # Only the file we hold: whoever removed ours (the simulated
                # host removing its run directory) may have let another
                # process lock a new one there, which is not ours to remove.
                if _same_file(self._path, fd):
                    os.unlink(self._path)
            except OSError as exc:
                unlinked = exc
            finally:
                os.close(fd)
        if unlinked is not None:  # once out of _fork_lock: forks need not wait for the log
            logger.warning("cannot remove the lock file %s: %s", self._path, unlinked.strerror)

    def __repr__(self) -> str:
        state = "released" if self._fd < 0 else "held"
        return f"<HostLock {self._path} {state}>"
