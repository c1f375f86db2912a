"""One process at a time for a job on a host: a lock file naming its holder.

Two backends serving one domain's devices would both answer every
frontend's handshake and fight over its devices.  Within a process a
backend can see the others; across processes it takes a
:class:`HostLock` (``HostLock.for_domain(platform, "my-backend")``): the
second process is refused with :class:`HostLockHeld`, which says which
process holds which file.

The lock is an ``flock`` on a file in the platform's ``run_dir`` (a real
host's ``/run``, the simulated host's run directory), so it goes with its
process however that ends: a crash leaves no stale lock, only a file the
next holder takes over.  A clean release removes the file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

from xenback._closing import Closing
from xenback.platform import Platform

__all__ = ["HostLock", "HostLockHeld"]

logger = logging.getLogger(__name__)


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


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``fd`` is the file at ``path`` now."""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    return os.path.samestat(there, os.fstat(fd))


class HostLock(Closing):
    """An exclusive lock on ``path`` for this process, until :meth:`close`.

    Raises :class:`HostLockHeld` if another process holds it (or another
    :class:`HostLock` of this one: locks belong to an open file, not to a
    process), :class:`OSError` naming the file if it cannot be opened or
    written.  The holder's pid is written in the file, for the refusal to
    name it.

    :meth:`close` removes the file and only then unlocks it, so that
    nobody can lock it in between; a process that opened the file before
    it was removed finds, once it has the lock, that the file it locked is
    not the one at ``path`` any more, and tries again with that one.  A
    lock on a removed file keeps nobody out.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._guard = threading.Lock()
        self._fd = self._lock(self._path)

    @staticmethod
    def _lock(path: Path) -> int:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot open the lock file {path}: {exc.strerror}"
                              ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise HostLockHeld(path, int(holder) if holder.isdecimal() else None) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(path, fd):
                break
            # Removed by the holder before us between our open and our
            # flock (see close()): lock the file there now.
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            HostLock._release(path, fd)
            raise OSError(exc.errno, f"cannot write to the lock file {path}: {exc.strerror}"
                          ) from None
        except BaseException:
            HostLock._release(path, fd)
            raise
        return fd

    @classmethod
    def for_domain(cls, platform: Platform, name: str) -> HostLock:
        """The lock of job ``name`` (a file name's stem: ``"my-backend"``)
        for ``platform``'s domain on its host: the file
        ``<run_dir>/<name>.dom<domid>.lock``.

        The domain's id is in its name because the domains of a simulated
        host share its run directory: the backend of a driver domain is no
        second backend of dom0's.  :class:`HostLockHeld` says which domain
        and job are taken, and by which process.
        """
        domid = platform.domid
        try:
            return cls(Path(platform.run_dir) / f"{name}.dom{domid}.lock")
        except HostLockHeld as exc:
            raise HostLockHeld(exc.path, exc.pid, (
                f"domain {domid} of this host has a {name} already, in process "
                f"{_pid_text(exc.pid)} (it holds {exc.path})")) from None

    @property
    def path(self) -> Path:
        """The lock file."""
        return self._path

    def close(self) -> None:
        """Remove the lock file and unlock it; idempotent."""
        with self._guard:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                self._release(self._path, fd)

    @staticmethod
    def _release(path: Path, fd: int) -> None:
        try:
            # Only the file we hold: whoever removed ours (the simulated
            # host removing its run directory) may have let another
            # process lock a new one there, which is not ours to remove.
            if _same_file(path, fd):
                os.unlink(path)
        except OSError as exc:
            logger.warning("cannot remove the lock file %s: %s", path, exc.strerror)
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        state = "released" if self._fd < 0 else "held"
        return f"<HostLock {self._path} {state}>"
