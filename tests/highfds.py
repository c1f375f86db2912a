"""A process that already holds FD_SETSIZE (1024) descriptors: every one it
opens next is out of range for ``select.select``, as in a backend that
serves hundreds of sockets."""

from __future__ import annotations

import contextlib
import gc
import os
import resource
from collections.abc import Iterator

import pytest

#: ``select.select`` refuses any descriptor from this one on.
FD_SETSIZE = 1024

#: Room the test needs above FD_SETSIZE for what it opens afterwards.
_HEADROOM = 200


class Filled:
    """Every descriptor below FD_SETSIZE taken (see
    :func:`descriptors_past_fd_setsize`)."""

    def __init__(self) -> None:
        self.fds = [os.open(os.devnull, os.O_RDONLY)]
        self.refill()

    def refill(self) -> None:
        """Take again what other threads closed meanwhile below FD_SETSIZE
        (a server thread of the simulated host closing its end of a
        connection a test made before): dup() takes the lowest free
        number, so once it hands out FD_SETSIZE or more, none is left."""
        while True:
            fd = os.dup(self.fds[0])
            if fd >= FD_SETSIZE:
                os.close(fd)
                return
            self.fds.append(fd)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


@contextlib.contextmanager
def descriptors_past_fd_setsize() -> Iterator[Filled]:
    """Fill every descriptor below FD_SETSIZE (with duplicates of
    /dev/null), so that what the body opens gets numbers from FD_SETSIZE
    on; raise the soft RLIMIT_NOFILE for that, and undo both on the way
    out.  Skips the test when the hard limit leaves no room.  Another
    thread may still close a low descriptor meanwhile: the body can take
    it again with :meth:`Filled.refill`.  Nor can a number be taken that
    a thread waiting in accept() holds already: Linux reserves the one of
    the socket it returns as the call starts, the lowest free then (a
    test's server started before gets a connection below FD_SETSIZE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FD_SETSIZE + _HEADROOM
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}: cannot pass FD_SETSIZE")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    filled: Filled | None = None
    # Garbage (an earlier test's sockets) closed now, not by a collection
    # within, which would free low numbers for the body's files.
    gc.collect()
    try:
        filled = Filled()
        yield filled
    finally:
        if filled is not None:
            filled.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def past_fd_setsize(*fds: int) -> bool:
    """Whether every one of ``fds`` is out of ``select.select``'s range
    (so that the test exercises what it means to)."""
    return all(fd >= FD_SETSIZE for fd in fds)
