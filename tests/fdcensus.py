"""A census of this process's descriptors, for tests that check a
failure or a Ctrl-C left none open."""

from __future__ import annotations

import contextlib
import gc
import os


def descriptors() -> frozenset[tuple[int, str]]:
    """This process's descriptors, each with what it refers to; collected
    first, so that what is only waiting for the garbage collector does
    not count as held."""
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
