"""A process that already holds FD_SETSIZE (1024) descriptors: every one it
opens next is out of range for ``select.select``, as in a backend that
serves hundreds of sockets."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator

import pytest

#: ``select.select`` refuses any descriptor from this one on.
FD_SETSIZE = 1024

#: Room the test needs above FD_SETSIZE for what it opens afterwards.
_HEADROOM = 200


@contextlib.contextmanager
def descriptors_past_fd_setsize() -> Iterator[None]:
    """Fill every descriptor below FD_SETSIZE (with duplicates of
    /dev/null), so that what the body opens gets numbers from FD_SETSIZE
    on; raise the soft RLIMIT_NOFILE for that, and undo both on the way
    out.  Skips the test when the hard limit leaves no room."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FD_SETSIZE + _HEADROOM
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}: cannot pass FD_SETSIZE")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fillers: list[int] = []
    try:
        fillers.append(os.open(os.devnull, os.O_RDONLY))
        # dup() takes the lowest free number: once it hands out
        # FD_SETSIZE - 1, nothing below FD_SETSIZE is left.
        while fillers[-1] < FD_SETSIZE - 1:
            fillers.append(os.dup(fillers[0]))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def past_fd_setsize(*fds: int) -> bool:
    """Whether every one of ``fds`` is out of ``select.select``'s range
    (so that the test exercises what it means to)."""
    return all(fd >= FD_SETSIZE for fd in fds)
