"""What the host's listening Unix sockets share: how one that cannot
listen on its path says so."""

from __future__ import annotations

import errno
import os
from pathlib import Path

#: The longest path a Unix socket is bound to: sockaddr_un's sun_path
#: holds 108 bytes, its terminating NUL included.
SUN_PATH_MAX = 107
#: How much of each end of a path an error shows, when it cuts out the
#: middle: enough to tell the directory and the socket's name by, where
#: the whole may be thousands of characters long.
_PATH_END_SHOWN = 100


def listen_error(e: OSError, path: Path) -> OSError:
    """The error for a socket that could not listen on ``path`` for ``e``.

    It names the path: "AF_UNIX path too long" alone does not say which,
    nor by how much.  Python says that one itself, with no errno (nor
    strerror): it becomes ENAMETOOLONG, as the kernel would say, with the
    path's size in bytes (as the kernel counts) and the limit.  A path
    longer than 203 characters is shown by its first and last 100.
    """
    name = os.fspath(path)
    if len(name) > 2 * _PATH_END_SHOWN + 3:
        name = f"{name[:_PATH_END_SHOWN]}...{name[-_PATH_END_SHOWN:]}"
    why = f"cannot listen on {name}: {e.strerror or e}"
    if e.errno is None:
        why += f" ({len(os.fsencode(path))} bytes, at most {SUN_PATH_MAX})"
    return OSError(e.errno or errno.ENAMETOOLONG, why)
