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

A request may carry ``"id"``, an integer the service echoes in its reply.
:class:`ServiceConnection` numbers its requests so: a call cut short
(Ctrl-C) between its request and its reply leaves that reply in the
socket, and the next call, which waits for its own id, takes it for what
it is.  It closes the descriptors of such an abandoned reply and releases
what the reply gave (see :data:`_UNDO`), with a request of its own whose
reply it drops too.

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
import itertools
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


#: What gives back what an abandoned reply to ``op`` gave (a grant share,
#: a mapping, a bound port): ``(op, args)`` from the reply.  The other
#: requests give nothing (an end, unmap or unbind took effect all the
#: same), or go over a connection of their own that is closed after them
#: (domain control: a domain created stays, as after ``xl create``).
_UNDO: dict[str, Callable[[Message], tuple[str, dict[str, Any]]]] = {
    "gnt_share": lambda reply: ("gnt_end", {"refs": reply["refs"]}),
    "gnt_map": lambda reply: ("gnt_unmap", {"handle": reply["handle"]}),
    "evtchn_alloc_unbound": lambda reply: ("evtchn_unbind", {"port": reply["port"]}),
    "evtchn_bind_interdomain": lambda reply: ("evtchn_unbind", {"port": reply["port"]}),
}


#: A request sent whose reply was not taken yet: its op and call()'s ``done``.
_Request = tuple[str, Callable[[], None] | None]


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
        # The ids requests are numbered with, and the requests sent whose
        # replies were not taken yet, by id: op and done (under _lock).  One
        # left there by a call cut short is answered to nobody; those of
        # requests that never went, or whose replies were lost, go as a
        # later reply comes (replies come in request order).
        self._ids = itertools.count(1)
        self._unanswered: dict[int, _Request] = {}
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
        done: Callable[[], None] | None = None,
        **args: Any,
    ) -> tuple[Message, list[int]]:
        """Send one request and wait for its reply: ``(reply, fds)``.

        ``apply(reply, fds)``, if given, runs before any message pushed
        after the reply is delivered (it runs under the connection's lock).
        ``done()``, if given, runs (under the lock, before ``apply``) once
        the request succeeded, also if this call was cut short before its
        reply came: then as a later call takes it.
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
                return self._call(op, fds, apply, done, args)
            on_wait(True)
            try:
                return self._call(op, fds, apply, done, args)
            finally:
                on_wait(False)

    def _call(
        self,
        op: str,
        fds: Sequence[int],
        apply: Callable[[Message, list[int]], None] | None,
        done: Callable[[], None] | None,
        args: dict[str, Any],
    ) -> tuple[Message, list[int]]:
        # Under _lock: call()'s request and the messages up to its reply.
        request_id = self._send(op, args, fds, done)
        while True:
            msg, rfds = self._receive(0)
            if "event" in msg:
                self._push(msg, rfds)
                continue
            answered, request = self._answered(msg)
            if answered is None:
                self._unanswered.pop(request_id, None)  # ours, from a service without ids
            elif answered != request_id:
                self._abandoned(request, msg, rfds)
                continue
            if "errno" in msg:
                close_fds(rfds)
                raise self._error(int(msg["errno"]), str(msg.get("error", "")))
            if done is not None:
                done()
            if apply is not None:
                apply(msg, rfds)
            return msg, rfds

    def _send(self, op: str, args: dict[str, Any], fds: Sequence[int] = (),
              done: Callable[[], None] | None = None) -> int:
        """Send request ``op`` (under _lock); returns its id."""
        request_id = next(self._ids)
        # Recorded before it goes: a Ctrl-C as the send returns leaves it
        # known, and its reply is taken for abandoned.
        self._unanswered[request_id] = (op, done)
        try:
            send_message(self._sock, {"op": op, **args, "id": request_id}, fds)
        except OSError as e:
            self._unanswered.pop(request_id, None)
            raise self._refused() or self._gone(e) from None
        return request_id

    def _answered(self, reply: Message) -> tuple[int | None, _Request | None]:
        """The id of the request ``reply`` answers and its op and done,
        now answered, with the requests before it (under _lock).  (None, None)
        for a reply without an id: a service that numbers nothing, which
        answers the request the caller waits for (in order)."""
        request_id = reply.get("id")
        if type(request_id) is not int:
            return None, None
        for earlier in [i for i in self._unanswered if i < request_id]:
            # Never sent, or its reply lost with a call cut short: none comes.
            del self._unanswered[earlier]
        return request_id, self._unanswered.pop(request_id, None)

    def _abandoned(self, request: _Request | None, reply: Message, fds: list[int]) -> None:
        """Let go of ``reply``, to ``request`` whose call was cut short
        (None: to no request, from a confused service) (under _lock)."""
        close_fds(fds)
        if request is None:
            logger.warning("a reply from the hypervisor service to no request: %r", reply)
            return
        op, done = request
        if "errno" in reply:
            return
        if done is not None:
            done()
        undo = _UNDO.get(op)
        if undo is None:
            return
        try:
            undo_op, undo_args = undo(reply)
        except (KeyError, TypeError):
            logger.warning("a malformed reply from the hypervisor service to %s: %r", op, reply)
            return
        logger.debug("releasing what an abandoned %s gave: %s %r", op, undo_op, undo_args)
        try:
            self._send(undo_op, undo_args)  # its reply is dropped in turn
        except self._error:
            pass  # gone: the service released everything the handle held

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
                if "event" in msg:
                    self._push(msg, fds)
                else:
                    self._abandoned(self._answered(msg)[1], msg, fds)

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
