"""What the commands on a simulated host check of their standard streams
before they start anything, and do with one whose reader is gone."""

from __future__ import annotations

import fcntl
import os
from typing import IO, Any


def stdio_problem(stream: IO[Any] | None, *, writing: bool) -> str | None:
    """What keeps a standard stream from being written (or, ``writing``
    false, read), for an error message: ``"it is closed"``, ``"it is open
    only for reading"`` (``"...for writing"``); None if nothing does.

    Python leaves ``sys.stdin``/``sys.stdout`` None when descriptor 0 or 1
    is closed (``>&-``), and then print() quietly writes nothing; and it
    opens the descriptor as that stream whatever its mode (``1</dev/null``),
    so that only the first read or write fails, with EBADF, by when a
    command has started what it came to do.
    """
    if stream is None:
        return "it is closed"
    try:
        flags = fcntl.fcntl(stream.fileno(), fcntl.F_GETFL)
    except (OSError, ValueError):
        # No descriptor (a test's stream; io.UnsupportedOperation is a
        # ValueError): its reads or writes will say what is wrong.
        return None
    if flags & os.O_ACCMODE == (os.O_RDONLY if writing else os.O_WRONLY):
        return f"it is open only for {'reading' if writing else 'writing'}"
    return None


def stdio_to_devnull(stream: IO[Any]) -> None:
    """Point ``stream``'s descriptor at /dev/null, for a command whose
    output failed (its reader gone, EPIPE): what is left in the stream's
    buffer would fail again as Python flushes it at exit, and say so in a
    traceback after the command's own message."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)
