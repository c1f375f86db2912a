"""Telling systemd how a Type=notify service is doing, as sd_notify(3) does,
without libsystemd.

The service manager names a datagram socket in ``$NOTIFY_SOCKET``: a path,
or with a leading '@' a name in the abstract namespace.  Each message is
one datagram of ``KEY=value`` lines (``READY=1``, ``STOPPING=1``,
``STATUS=...``); the manager learns the sender from the socket's
credentials, so a message must come from the service's main process (the
default ``NotifyAccess=main``).

NOTIFY_SOCKET stays in the environment (sd_notify's ``unset_environment``
is not done): ``pvcalls-backend serve`` starts no programs that could take
it for their own, the manager drops what other processes send anyway, and
os.environ is the whole process's, not ours to change for a caller of
``main()``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

__all__ = ["Notifier"]

logger = logging.getLogger(__name__)

#: How long a message may wait for room in the manager's socket.  systemd
#: reads it at once; one that does not must not keep serve from stopping.
SEND_TIMEOUT = 5.0


class Notifier:
    """Sends messages to the service manager at ``notify_socket`` (the
    value of ``$NOTIFY_SOCKET``); none or empty: not run by one, and
    :meth:`notify` does nothing.

    A socket that cannot be reached does not stop the service: the first
    failure is logged, saying what was wrong, and nothing more is sent.
    """

    def __init__(self, notify_socket: str | None) -> None:
        self._name = notify_socket or None
        self._address: str | None = None
        if self._name is None:
            return
        if self._name.startswith("@"):
            self._address = "\0" + self._name[1:]
        elif self._name.startswith("/"):
            self._address = self._name
        else:
            self._give_up("neither an absolute path nor '@' and an abstract name")

    def notify(self, *fields: str) -> None:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one message."""
        if self._address is None:
            return
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(message, self._address)
        except OSError as exc:
            self._give_up(_why(self._address, exc))

    def _give_up(self, why: str) -> None:
        self._address = None
        logger.warning("cannot tell the service manager how we are doing through "
                       "NOTIFY_SOCKET=%s: %s; going on without it", self._name, why)


def _why(address: str, exc: OSError) -> str:
    """What ``exc``, raised sending to ``address``, says was wrong."""
    # A file that is no socket refuses a datagram as a socket nobody
    # reads does: say which.
    if exc.errno == errno.ECONNREFUSED and not address.startswith("\0"):
        try:
            if not stat.S_ISSOCK(os.stat(address).st_mode):
                return "not a socket"
        except OSError:
            pass
    return str(exc)
