"""A census of this process's descriptors, for tests that check a
failure or a Ctrl-C left none open."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Iterator


def descriptors(*, collect: bool = True) -> frozenset[tuple[int, str]]:
    """This process's descriptors, each with what it refers to; collected
    first, so that what is only waiting for the garbage collector does
    not count as held.  Not with ``collect`` false: for a check that a
    descriptor lost to a reference cycle counts as held (the baseline it
    is compared with collected, so that earlier garbage is not closed
    meanwhile, its numbers free for others)."""
    if collect:
        gc.collect()
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            fds.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
        except FileNotFoundError:
            pass  # listdir()'s own, or closed meanwhile
    return frozenset(fds)


def open_sockets() -> set[int]:
    """This process's descriptors that are sockets, as they stand: not
    collected first, so that a socket lost to a reference cycle counts
    as held."""
    sockets = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (listdir's own, say)
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                sockets.add(int(fd))
    return sockets


def sockets_named_under(directory: str | os.PathLike[str]) -> frozenset[tuple[int, str]]:
    """This process's descriptors that are Unix sockets bound to a path
    under ``directory``, or accepted on a listener bound there (an accepted
    socket carries its listener's name), each with what it refers to;
    collected first, as :func:`descriptors`.

    A service's listeners and connections, told apart by their names from
    what other threads of the process (routers, event threads, one left
    by an earlier test, the collector) open and close meanwhile: a census
    of the whole process fails when any of them does."""
    gc.collect()
    under = os.path.join(os.fspath(directory), "")
    named = set()
    # The kernel's own list: inode and name of every Unix socket (of this
    # network namespace), named or not, the name kept once its file is gone.
    with open("/proc/net/unix") as table:
        next(table)  # the heading
        for line in table:
            fields = line.split(maxsplit=7)
            if len(fields) == 8 and fields[7].rstrip("\n").startswith(under):
                named.add(f"socket:[{fields[6]}]")
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue  # listdir()'s own, or closed meanwhile
        if target in named:
            fds.add((int(name), target))
    return frozenset(fds)


class HeldNumbers:
    """Descriptor numbers the test's thread closed within :meth:`closing`,
    each held since by a file of the test's own: a second close of one (a
    bug that left the number stored after closing it) closes that file,
    and :meth:`check` says so.  Other threads of the process (a simulated
    host's service thread, routers, the garbage collector closing a
    socket) open and close descriptors at any time: a test that closes a
    number and then opens a file expecting to get it back may find
    another thread's file there instead, and prove nothing."""

    def __init__(self, content: bytes = b"") -> None:
        """``content``: what a read of a held number finds (once: the
        duplicates share one offset), for a test of code that would still
        read a number it closed (a byte in a pipe is an event pending)."""
        self.numbers: list[int] = []
        # One memfd, whose duplicates hold the numbers: no other file of
        # the process has its inode.
        self._file = os.memfd_create("held-number", os.MFD_CLOEXEC)
        if content:
            os.pwrite(self._file, content, 0)
        self._identity = os.fstat(self._file)

    @contextlib.contextmanager
    def closing(self) -> Iterator[None]:
        """Within: os.close() of this thread puts the test's file at the
        number instead, in one step (dup2), so that no other thread can
        take the number; other threads' calls close as ever."""
        close, tid = os.close, threading.get_ident()

        def held(fd: int) -> None:
            if threading.get_ident() != tid or fd in self.numbers:
                close(fd)  # for a held number: closed again, as check() says
                return
            os.fstat(fd)  # EBADF for a number not open, as close() would say
            os.dup2(self._file, fd)
            self.numbers.append(fd)

        os.close = held
        try:
            yield
        finally:
            os.close = close

    def _kept(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), self._identity)
        except OSError:
            return False

    def check(self, where: str) -> None:
        """Assert that nothing closed a held number again."""
        again = [fd for fd in self.numbers if not self._kept(fd)]
        assert not again, (where, f"descriptors {again} closed twice")

    def release(self) -> None:
        """Close the numbers still held (one closed again may be another
        thread's file by now), and the test's file."""
        numbers, self.numbers = self.numbers, []
        for fd in numbers:
            if self._kept(fd):
                os.close(fd)
        if self._file >= 0:
            file, self._file = self._file, -1
            os.close(file)


@contextlib.contextmanager
def numbers_held(content: bytes = b"") -> Iterator[HeldNumbers]:
    """A :class:`HeldNumbers`, released on the way out."""
    held = HeldNumbers(content)
    try:
        yield held
    finally:
        held.release()
