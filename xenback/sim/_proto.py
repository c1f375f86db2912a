"""The wire between domains and the simulated hypervisor.

Every grant table, grant share and event channel handle is one
``SOCK_SEQPACKET`` connection to the hypervisor service of the host
(:mod:`xenback.sim._hypervisor`).  The socket a handle connects to decides
which domain it acts as: the service listens on one socket per domain, the
way a real hypervisor knows which domain issued a hypercall.

A message is one packet: a JSON object of at most :data:`MAX_MESSAGE` bytes,
optionally carrying file descriptors (``SCM_RIGHTS``): shared-memory files
for grants, pipe ends for event channels.  Requests carry ``"op"``; replies
carry either the result or ``"errno"`` and ``"error"``; the service may also
push unsolicited messages carrying ``"event"`` to event channel handles (a
peer bound or unbound one of their ports).  Replies are sent in request
order, so a client only has to skip pushed messages while it waits.

=========================  ==============================  ==========================
request                    arguments (descriptors)         reply (descriptors)
=========================  ==============================  ==========================
info                       -                               domid, name, xenstore_path
gnt_share                  domid, count, writable          refs (the pages, writable)
gnt_end                    refs                            -
gnt_map                    domid, refs, writable           handle, segments (files)
gnt_unmap                  handle                          -
evtchn_alloc_unbound       domid (write end of port pipe)  port
evtchn_bind_interdomain    domid, port (write end)         port (peer's write end)
evtchn_unbind              port                            -
domain_create (dom0 only)  name                            domid, name, xenstore_path
domain_destroy (dom0)      domid                           -
=========================  ==============================  ==========================

Pushed: ``{"event": "bound", "port", "domid", "remote_port"}`` with the
peer's write end, and ``{"event": "unbound", "port"}``.  Either may carry
``"rfd"``, the index of a descriptor that is the port's new read end: the
service gives a port a new pipe when its peer goes, so that write ends of
the old one kept by the peer's process fire nothing.
``{"event": "refused", "errno", "error"}`` is the only message of a
connection the service accepted only to close it, for want of a descriptor
or past its domain's limit on handles: its requests fail with that errno
(EMFILE either way), not as if the host were gone.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import resource
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

#: Largest packet either side accepts.  A map request for the largest allowed
#: number of refs fits comfortably.
MAX_MESSAGE = 64 * 1024

#: Most descriptors one packet may carry (the kernel's SCM_MAX_FD).
MAX_FDS = 253

Message = dict[str, Any]

_FDS = array.array("i")

# Plain ints: socket's flags are IntFlag members, and each | or & of them
# makes a new member through the enum machinery, some microseconds in
# Python 3.11, three times per message received.
#: ``MSG_DONTWAIT``, as an int, for callers of :func:`recv_message`.
MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * _FDS.itemsize)


def raise_nofile_limit() -> None:
    """Lift this process's soft descriptor limit to the hard one.

    Every event channel is a pipe whose ends live in both domains' handles
    and in the service, so a few hundred channels outgrow the usual soft
    limit of 1024, as in any server that holds many connections.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as e:
            logger.debug("cannot raise RLIMIT_NOFILE to %d: %s", target, e)


def encode(msg: Message) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> Message:
    """Parse one packet; raises :class:`ValueError` for anything but an object."""
    try:
        msg = json.loads(data.decode())
    except RecursionError:
        # A hostile packet of 64 KiB of "[" nests deeper than the parser can.
        raise ValueError("a message nests too deeply") from None
    if not isinstance(msg, dict):
        raise ValueError("a message must be a JSON object")
    return msg


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_message(sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int], bool]:
    """Receive one packet: ``(data, fds, truncated)``.

    ``data`` is empty at end of stream.  The caller owns the descriptors,
    also when the packet turns out to be invalid.
    """
    # Not socket.recv_fds: Python 3.11's ignores its flags argument.
    data, ancdata, msg_flags, _ = sock.recvmsg(
        MAX_MESSAGE + 1, _ANCILLARY_SPACE, flags | _MSG_CMSG_CLOEXEC
    )
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    truncated = bool(msg_flags & _TRUNCATED) or len(data) > MAX_MESSAGE
    return data, list(fds), truncated


def send_message(
    sock: socket.socket, msg: Message, fds: Sequence[int] = (), flags: int = 0
) -> None:
    data = encode(msg)
    if fds:
        socket.send_fds(sock, [data], list(fds), flags)
    else:
        sock.send(data, flags)


class ServiceConnection:
    """The client end of one handle's connection to the hypervisor service.

    ``on_push(msg, fds)`` receives the messages the service pushes; it owns
    the descriptors.  ``error`` is the :class:`OSError` subclass raised for a
    failed request (GrantError or EventChannelError).

    ``on_wait(True)`` is called before a request goes out and
    ``on_wait(False)`` once it is over, both under the connection's lock.
    An owner that watches the connection for pushed messages in an epoll
    set, where another thread may be waiting, stops watching it meanwhile:
    the caller takes every message until its reply itself, and the reply
    would otherwise wake that thread for nothing (a context switch and a
    pass of its loop per request).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        error: type[OSError],
        on_push: Callable[[Message, list[int]], None] | None = None,
        *,
        on_wait: Callable[[bool], None] | None = None,
    ) -> None:
        self._error = error
        self._on_push = on_push
        self._on_wait = on_wait
        # (errno, text): why the service refused this connection, once it
        # said so.
        self._refusal: tuple[int, str] | None = None
        # _lock serialises the use of the socket: one request and its reply
        # at a time, and no draining of pushed messages in between.  Rule:
        # taken before any lock of the handle that owns this connection.
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(os.fspath(path))
        except OSError as e:
            self._sock.close()
            raise error(
                e.errno or errno.ENODEV,
                f"cannot reach the simulated hypervisor at {os.fspath(path)}: {e.strerror or e}",
            ) from None

    def fileno(self) -> int:
        return self._sock.fileno()

    def call(
        self,
        op: str,
        fds: Sequence[int] = (),
        *,
        apply: Callable[[Message, list[int]], None] | None = None,
        **args: Any,
    ) -> tuple[Message, list[int]]:
        """Send one request and wait for its reply: ``(reply, fds)``.

        ``apply(reply, fds)``, if given, runs before any message pushed
        after the reply is delivered (it runs under the connection's lock).
        Raises ``error`` with the errno the service answered, with the one
        it refused the connection with (EMFILE: it had no descriptor for
        it, or the domain has as many handles open as it may), or
        ``ENODEV`` once the service has gone (host stopped, domain
        destroyed).
        """
        with self._lock:
            if self._refusal is not None:
                raise self._error(*self._refusal)
            on_wait = self._on_wait
            if on_wait is None:
                return self._call(op, fds, apply, args)
            on_wait(True)
            try:
                return self._call(op, fds, apply, args)
            finally:
                on_wait(False)

    def _call(
        self,
        op: str,
        fds: Sequence[int],
        apply: Callable[[Message, list[int]], None] | None,
        args: dict[str, Any],
    ) -> tuple[Message, list[int]]:
        # Under _lock: call()'s request and the messages up to its reply.
        try:
            send_message(self._sock, {"op": op, **args}, fds)
        except OSError as e:
            raise self._refused() or self._gone(e) from None
        while True:
            msg, rfds = self._receive(0)
            if "event" in msg:
                self._push(msg, rfds)
                continue
            if "errno" in msg:
                close_fds(rfds)
                raise self._error(int(msg["errno"]), str(msg.get("error", "")))
            if apply is not None:
                apply(msg, rfds)
            return msg, rfds

    def drain(self) -> bool:
        """Deliver the pushed messages that already arrived, without waiting.

        Returns False once the service has gone (the next call reports it).
        """
        with self._lock:
            while True:
                try:
                    msg, fds = self._receive(MSG_DONTWAIT)
                except BlockingIOError:
                    return True
                except self._error:
                    return False
                self._push(msg, fds)

    def close(self) -> None:
        # Shut down first, without the lock: a thread waiting in call() (or
        # in an epoll that watches this socket) wakes up and lets go.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            self._sock.close()

    def _receive(self, flags: int) -> tuple[Message, list[int]]:
        try:
            data, fds, truncated = recv_message(self._sock, flags)
        except BlockingIOError:
            raise
        except OSError as e:
            raise self._refused() or self._gone(e) from None
        if not data:
            close_fds(fds)
            raise self._gone(None)
        if truncated:
            close_fds(fds)
            raise self._error(errno.EPROTO, "oversized message from the hypervisor service")
        msg = decode(data)
        if msg.get("event") == "refused":
            close_fds(fds)
            raise self._error(*self._refuse(msg))
        return msg, fds

    def _refuse(self, msg: Message) -> tuple[int, str]:
        self._refusal = (int(msg.get("errno", errno.ENODEV)), str(msg.get("error", "")))
        return self._refusal

    def _refused(self) -> OSError | None:
        """Why the service refused this connection, if it said so (caller
        holds _lock).  Its message may wait in the socket behind an error:
        a send after the service closed the connection fails (EPIPE), and
        so does the first receive once it closed it with our request
        unread (ECONNRESET comes before the messages that are queued)."""
        if self._refusal is None:
            try:
                data, fds, _ = recv_message(self._sock, MSG_DONTWAIT)
            except OSError:
                return None  # nothing there, or the error again
            close_fds(fds)
            try:
                msg = decode(data)
            except ValueError:
                return None  # the end (b""), or garbage: gone all the same
            if msg.get("event") != "refused":
                return None
            self._refuse(msg)
        assert self._refusal is not None
        return self._error(*self._refusal)

    def _push(self, msg: Message, fds: list[int]) -> None:
        if self._on_push is None:
            close_fds(fds)
            logger.warning("unexpected message from the hypervisor service: %r", msg)
        else:
            self._on_push(msg, fds)

    def _gone(self, cause: OSError | None) -> OSError:
        detail = f": {cause.strerror or cause}" if cause is not None else ""
        return self._error(
            errno.ENODEV,
            "the simulated hypervisor closed the connection "
            f"(host stopped or domain destroyed){detail}",
        )
