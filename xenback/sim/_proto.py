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
peer bound or unbound one of their ports).  Replies do not always come in
request order: the service answers grant and event channel requests at
once, but domain control once the host has done it, in another thread,
possibly after the replies to requests made after it on the same
connection (:func:`~xenback.sim._domain.create_domain` makes it over a
connection of its own, but nothing in the protocol says a client must).
So a client matches replies by id (below), never by order, skipping
pushed messages while it waits, and drops a reply of an id it never
sent, logged: a stray reply answers no other request.
A packet that is no message (no JSON object, or too long) breaks the
protocol: it is logged as an error and dropped, and fails the call that
waits for a reply, if any (EPROTO); a drain goes on past it.  A message
whose descriptors this process had no room for (the kernel drops them,
``MSG_CTRUNC``) is whole: as a reply it answers its request, whose call
fails (EMFILE) and what it gave is given back; pushed, it is logged as
an error and dropped.  The service answers a request whose descriptors
it had no room for likewise: EMFILE, with the request's id.

A request may carry ``"id"``, an integer the service echoes in its reply.
:class:`ServiceConnection` numbers its requests so: a call cut short
(Ctrl-C) between its request and its reply leaves that reply in the
socket, and the next call, which waits for its own id, takes it for what
it is.  It closes the descriptors of such an abandoned reply and releases
what the reply gave (see :data:`_UNDO`), with a request of its own whose
reply it drops too.  So does one cut short after its reply was received:
a packet is part of the connection's state from the receive until it is
handed on (see :class:`ServiceConnection`).

=========================  ==============================  ==========================
request                    arguments (descriptors)         reply (descriptors)
=========================  ==============================  ==========================
info                       -                               domid, name, xenstore_path
gnt_share                  domid, count, writable          refs (the pages, writable)
gnt_end                    refs                            -
gnt_map                    domid, refs, writable           handle, segments (files)
gnt_unmap                  handle                          -
evtchn_alloc_unbound       domid                           port (its read end)
evtchn_bind_interdomain    domid, port                     port (read end, peer's write end)
evtchn_unbind              port                            -
domain_create (dom0 only)  name                            domid, name, xenstore_path
domain_destroy (dom0)      domid                           -
=========================  ==============================  ==========================

Pushed: ``{"event": "bound", "port", "domid", "remote_port"}`` with the
peer's write end, and ``{"event": "unbound", "port"}`` with no descriptor.
Either may carry ``"rfd"``, the index of one more descriptor, the port's
new read end: the service gives a port a new pipe when its peer goes, so
that write ends of the old one kept by the peer's process fire nothing.
A push carrying other descriptors, or whose ``"rfd"`` names none of them,
is malformed: the handle logs and drops it.
``{"event": "refused", "errno", "error"}`` is the only message of a
connection the service accepted only to close it, for want of a descriptor
or past its domain's limit on handles: its requests fail with that errno
(EMFILE either way), not as if the host were gone.
"""

from __future__ import annotations

import array
import collections
import errno
import functools
import itertools
import json
import logging
import os
import reprlib
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
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * _FDS.itemsize)
#: Linux's errnos are below it (include/linux/err.h's MAX_ERRNO, 4095).
_MAX_ERRNO = 4096


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


def _reported(msg: Message, default: int) -> tuple[int, str]:
    """The errno and text of a reply's or a refusal's error (``default``
    if it says no errno).  An errno that is no errno (not an int, or not
    within Linux's 1-4095) is the service's protocol error, EPROTO, not a
    ValueError out of int() or an OSError of errno 0."""
    code = msg.get("errno", default)
    text = str(msg.get("error", ""))
    if type(code) is not int or not 0 < code < _MAX_ERRNO:
        return errno.EPROTO, (f"malformed errno {reprlib.repr(code)} from the hypervisor "
                              f"service ({text!r})")
    return code, text


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def close_taken(fds: list[int]) -> None:
    """Close ``fds``, emptying the list: each leaves it before it is
    closed, with no call in between, so that one cut short by a Ctrl-C
    and made again closes every one once.  For descriptors a caller's
    state holds (a reply's, pages'); :func:`close_fds` for a throw-away
    sequence."""
    while fds:
        fd = fds[-1]
        del fds[-1]
        try:
            os.close(fd)
        except OSError:
            pass


def recv_message(sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int], bool]:
    """Receive one packet: ``(data, fds, truncated)``.

    ``data`` is empty at end of stream.  ``truncated``: the packet was
    longer than :data:`MAX_MESSAGE` (then so is ``data``), or the kernel
    dropped descriptors it carried for want of a number in this process
    (``MSG_CTRUNC``; ``data`` is whole).  The caller owns the descriptors,
    also when the packet turns out to be invalid.
    """
    # Not socket.recv_fds: Python 3.11's ignores its flags argument.
    return _unpack(sock.recvmsg(MAX_MESSAGE + 1, _ANCILLARY_SPACE, flags | _MSG_CMSG_CLOEXEC))


#: What socket.recvmsg returns.
_Packet = tuple[bytes, list[tuple[int, int, bytes]], int, Any]


def _unpack(packet: _Packet) -> tuple[bytes, list[int], bool]:
    """A packet :meth:`socket.socket.recvmsg` returned, as :func:`recv_message`'s."""
    data, ancdata, msg_flags, _ = packet
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


class _Taken:
    """A packet taken off the socket, and what is left to do with it.

    It lives in the connection's state from the receive on (see
    :class:`ServiceConnection`), so that the next call, or close(),
    finishes what a Ctrl-C cut short.  Each step that gives something away
    (a descriptor closed, ``done`` called, an undo sent, the reply handed
    on) first takes it out of here, with no call in between where a signal
    handler could run: so a step is done once, and one not done yet is
    still here.
    """

    __slots__ = ("msg", "error", "malformed", "short", "fds", "out", "applying",
                 "pushed", "classified", "request_id", "done", "undo")

    def __init__(self, msg: Message, fds: list[int], error: OSError | None,
                 malformed: bool = False, short: bool = False) -> None:
        self.msg = msg
        # Why the packet fails the call that meets it (the service gone or
        # refusing, a malformed packet), or None.
        self.error = error
        # The packet is no message (EPROTO): it fails only a call that
        # waits for a reply, which it may have been (see _dispatch).
        self.malformed = malformed
        # A message whose descriptors this process had no room for (the
        # kernel dropped them, MSG_CTRUNC): ``error`` (EMFILE) fails only
        # the call it answers, and as a reply it still answers its request.
        self.short = short
        # The descriptors that are still the connection's to close.
        self.fds = fds
        # The descriptors call() returns: the same list, emptied if apply
        # took them.
        self.out = fds
        # Set as apply is given a reply with descriptors: once it emptied
        # them, it took them and what the reply gave (see _settle).
        self.applying = False
        # Set as a pushed message is handed to on_push, which takes the
        # descriptors its owner keeps off ``fds``.
        self.pushed = False
        # Once set, a reply's request is known (request_id, done, undo).
        self.classified = False
        self.request_id: int | None = None
        self.done: Callable[[], None] | None = None
        # The request that gives back what the reply gave, if nobody takes it.
        self.undo: tuple[str, dict[str, Any]] | None = None


class ServiceConnection:
    """The client end of one handle's connection to the hypervisor service.

    ``on_push(msg, fds)`` receives the messages the service pushes; it
    takes the descriptors its owner keeps off ``fds`` (each in a step with
    no call between it and the step that makes it the owner's), and the
    connection closes those left, also if it raises or a Ctrl-C cuts it
    short (then by the next call or drain, or close()).  An
    :class:`Exception` it raises (news it cannot take) is logged as an
    error and the message dropped, as a malformed packet is: no call or
    drain fails for it.  ``error`` is the :class:`OSError` subclass raised
    for a failed request (GrantError or EventChannelError).

    ``on_wait(True)`` is called before a request goes out and
    ``on_wait(False)`` once it is over, both under the connection's lock;
    a Ctrl-C may make the second come without the first, or after only
    part of it, and the second comes again if it raised (a Ctrl-C in it):
    it must be harmless to make twice.
    An owner that watches the connection for pushed messages in an epoll
    set, where another thread may be waiting, stops watching it meanwhile:
    the caller takes every message until its reply itself, and the reply
    would otherwise wake that thread for nothing (a context switch and a
    pass of its loop per request).

    A Ctrl-C (a signal handler's exception, which CPython raises after any
    call returns) may land anywhere in here.  As the blocking receive
    waits it gets EINTR before anything is taken; after that, every packet
    received is in the connection's state until it is dealt with (see
    :class:`_Taken`): the receive appends it there in one C-level step
    (``deque.extend(map(recvmsg, ...))``, as no bytecode runs between
    them), and each step after it is recorded before it happens.  A reply
    whose call was cut short is released by the next call or drain() (its
    descriptors closed, ``done`` called, what it gave undone) or by
    close().  A packet a Ctrl-C leaves in the inbox is no longer in the
    socket, which the owner watches for pushes: a drain cut short makes
    the socket readable again (see :meth:`_cut_short`), a call's own
    reply does.  One whose ``apply`` took it is the handle's, however the
    call ends (as a file keeps what an ioctl interrupted after it
    returned gave).
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
        # left there by a call cut short is answered to nobody.  Only a
        # request that went is here (see _send), and only its own reply
        # takes it off: a stray reply of a later id is no sign that the
        # replies before it are lost, they come all the same.
        self._ids = itertools.count(1)
        self._unanswered: dict[int, _Request] = {}
        # The packets received and not dealt with yet, oldest first: raw
        # (recvmsg's tuples) until parsed, then _Taken (under _lock).
        self._inbox: collections.deque[_Packet | _Taken] = collections.deque()
        # The replies on their way out of call(), by thread: put here under
        # _lock, taken by the call once it let go of the lock (it has to,
        # and no reply may be in its hands only as it does).  One left
        # here by a call cut short there is released by the next call or
        # drain() of the same thread, or by close(): only they know that
        # this thread is not about to take it (no lock rule: a thread
        # touches its own entry only, but under _lock).
        self._delivering: dict[int, _Taken] = {}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._recvmsg = functools.partial(self._sock.recvmsg, MAX_MESSAGE + 1, _ANCILLARY_SPACE)
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
        It takes the descriptors, and with them what the reply gave, by
        emptying ``fds`` (``del fds[:]``) in the step that records them
        where its owner finds them, with no call in between, so that a
        Ctrl-C finds them in one place or the other.  Until then they are
        the connection's: if apply raises (an :class:`Exception`, refusing
        the reply, or a Ctrl-C) before it took them, they are closed and
        what the reply gave is released, as for a call cut short.  A reply
        without descriptors is never taken by apply.
        ``done()``, if given, runs (under the lock, before ``apply``) once
        the request succeeded, also if this call was cut short before its
        reply came: then as a later call takes it.
        Raises ``error`` with the errno the service answered, with the one
        it refused the connection with (EMFILE: it had no descriptor for
        it, or the domain has as many handles open as it may), or
        ``ENODEV`` once the service has gone (host stopped, domain
        destroyed) or the connection was closed during the call; the
        kernel's errno if it will not send ``fds`` (EBADF: one is not
        open; EINVAL: more than :data:`MAX_FDS`); EPROTO for a packet
        from the service that is no message, met as the call waits, or a
        reply whose errno is malformed; EMFILE for a reply whose descriptors
        this process had no room for.  :class:`ValueError` for a request
        past :data:`MAX_MESSAGE`, which is not sent.
        """
        me = threading.get_ident()
        # No wake-up request (see _cut_short) for a call cut short: the
        # inbox holds one packet at most (a receive waits for it to be
        # empty), so a push the call leaves there came either as its
        # request waited, whose reply is still to be received, or before
        # the request went, from a call or drain cut short earlier whose
        # reply or wake-up is still to be received.  Either makes the
        # socket readable.  A reply it leaves (a Ctrl-C after the receive)
        # wakes nobody: the next call, drain or close() releases it.
        with self._lock:
            if self._delivering:  # a test, not a call, on the common path
                self._settle_delivering(me)
            if self._refusal is not None:
                raise self._error(*self._refusal)
            on_wait = self._on_wait
            if on_wait is None:
                self._call(me, op, fds, apply, done, args)
            else:
                # Both in the try: a Ctrl-C as on_wait(True) returns
                # left the owner deaf to pushes until its next call.
                # on_wait(False) alone is harmless (the usual state),
                # and so is one made twice: once more if the first
                # was cut short (a Ctrl-C as it started), which left
                # the owner deaf all the same.
                try:
                    on_wait(True)
                    self._call(me, op, fds, apply, done, args)
                finally:
                    try:
                        on_wait(False)
                    except BaseException:
                        on_wait(False)
                        raise
        # No call from here on: a signal's handler runs after one returns,
        # and the reply would be lost there, out of _delivering and not
        # returned yet.
        try:
            taken = self._delivering[me]
        except KeyError:
            # Released meanwhile, by a close() from another thread (or a
            # call made by a signal's handler in this one).
            raise self._error(
                errno.ENODEV, "the connection to the simulated hypervisor was closed") from None
        del self._delivering[me]
        return taken.msg, taken.out

    def _call(
        self,
        me: int,
        op: str,
        fds: Sequence[int],
        apply: Callable[[Message, list[int]], None] | None,
        done: Callable[[], None] | None,
        args: dict[str, Any],
    ) -> None:
        # Under _lock: call()'s request and the messages up to its reply,
        # which it leaves in _delivering[me].  First what earlier calls,
        # cut short, left: their replies are not this one's.
        while self._inbox:
            self._dispatch(None)
        request_id = self._send(op, args, fds, done)
        while True:
            if not self._inbox:
                self._receive(0)
            taken = self._dispatch(request_id)
            if taken is not None:
                break
        msg = taken.msg
        if "errno" in msg:
            error = self._error(*_reported(msg, errno.EIO))
            self._release_head(taken)
            raise error
        done = taken.done
        taken.done = None
        if done is not None:
            done()
        if apply is not None:
            # The reply stays the connection's until apply takes it, in a
            # step of its own (see call()): apply is Python code, and a
            # Ctrl-C as it starts would lose a reply already given to it.
            taken.applying = bool(taken.fds)
            try:
                apply(msg, taken.fds)
            except Exception:
                # Refused (a reply short of descriptors, say): what apply
                # did not take goes back.
                self._release_head(taken)
                raise
        # One step, as far as a signal goes: no call in between.
        self._delivering[me] = taken
        del self._inbox[0]

    def _send(self, op: str, args: dict[str, Any], fds: Sequence[int] = (),
              done: Callable[[], None] | None = None) -> int:
        """Send request ``op`` (under _lock); returns its id."""
        request_id = next(self._ids)
        data = encode({"op": op, **args, "id": request_id})
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        # Recorded before it goes: a Ctrl-C as the send returns leaves it
        # known, and its reply is taken for abandoned.  One that did not go
        # is forgotten, or it would wait for ever (only its own reply
        # answers a request): list.extend() stores what sendmsg returned
        # before a signal's handler can run, so whether it went is known.
        self._unanswered[request_id] = (op, done)
        sent: list[int] = []
        try:
            if fds:
                sent.extend(map(self._sock.sendmsg, ([data],), (ancillary,)))
            else:  # most requests: send() is cheaper than sendmsg()
                sent.extend(map(self._sock.send, (data,)))
        except OSError as e:
            self._unanswered.pop(request_id, None)
            if fds and e.errno in (errno.EBADF, errno.EINVAL) and self._sock.fileno() != -1:
                # The caller's descriptors (one not open, or more than a
                # packet carries), not the connection: it serves on.
                raise self._error(e.errno,
                                  f"cannot send {op}'s descriptors: {e.strerror}") from None
            raise self._refused() or self._gone(e) from None
        except BaseException:
            if not sent:
                self._unanswered.pop(request_id, None)
            raise
        return request_id

    def _dispatch(self, request_id: int | None) -> _Taken | None:
        """Deal with the packet at the head of the inbox (under _lock):
        raise the error it means, hand a pushed message on, release a reply
        to another request than ``request_id`` (None: to none).  The reply
        to ``request_id`` is returned, left at the head.

        A malformed packet is the service breaking the protocol (a bug of
        the host, not of the handle): it is logged as an error and
        dropped, and fails the call waiting for ``request_id`` (EPROTO),
        as it may have been its reply; if it was not, that reply comes
        after it and is released as abandoned (if it was, the request
        stays listed as unanswered, and what the reply gave, unknown,
        stays with the service until the handle closes).  Where no call
        waits (a drain), nobody is failed, and the connection goes on: a
        handle that stopped listening at the first bad packet would miss
        every later push without a word.  A message short of its
        descriptors (this process had no room for them) fails only the
        call it answers (EMFILE), released as any reply nobody takes."""
        taken = self._head()
        error = taken.error
        if error is not None and not taken.short:
            if taken.malformed:
                # Before the release: logged twice after a Ctrl-C, never not at all.
                logger.error("%s (dropped)", error.strerror)
                if request_id is None:
                    self._release_head(taken)
                    return None
            self._release_head(taken)
            raise error
        msg = taken.msg
        if "event" in msg:
            on_push = self._on_push
            if error is not None:
                # News whose pipe ends are lost would mislead the handle.
                logger.error("%s: %r (dropped)", error.strerror, msg)
                self._release_head(taken)
            elif on_push is None:
                logger.warning("unexpected message from the hypervisor service: %r", msg)
                self._release_head(taken)
            elif not taken.pushed:
                # The descriptors stay the connection's while on_push
                # runs, as a reply's do while apply runs: a Ctrl-C as
                # on_push starts would lose any it had been given.  Marked
                # first, with no call in between: news cut short is
                # dropped by the next call or drain, never handed on twice.
                taken.pushed = True
                try:
                    on_push(msg, taken.fds)
                except Exception:
                    # News the owner cannot take: dropped as a malformed
                    # packet is, logged.  Neither the call that met it on
                    # the way to its reply nor a drain fails for it (a
                    # drain would take the owner's error for the service's
                    # end, and its owner stop listening for good).
                    logger.exception("a message from the hypervisor service its handle "
                                     "could not take: %r (dropped)", msg)
                self._release_head(taken)  # what on_push did not take
            else:
                self._release_head(taken)
            return None
        if not taken.classified:
            self._classify(taken, request_id)
        if taken.request_id is None or taken.request_id != request_id:
            self._release_head(taken)
            return None
        if error is not None:
            self._release_head(taken)  # what it gave goes back
            raise error
        return taken

    def _head(self) -> _Taken:
        """The packet at the head of the inbox, parsed (under _lock)."""
        head = self._inbox[0]
        if isinstance(head, _Taken):
            return head
        data, fds, _ = _unpack(head)
        error: OSError | None = None
        malformed = short = False
        msg: Message = {}
        if not data:
            error = self._gone(None)
        elif head[2] & _MSG_TRUNC or len(data) > MAX_MESSAGE:
            error = self._error(errno.EPROTO, "oversized message from the hypervisor service")
            malformed = True
        else:
            try:
                msg = decode(data)
            except ValueError as e:
                error = self._error(errno.EPROTO,
                                    f"malformed message from the hypervisor service: {e}")
                malformed = True
            else:
                if msg.get("event") == "refused":
                    error = self._error(*self._refuse(msg))
                elif head[2] & _MSG_CTRUNC:
                    # The descriptors found no room in this process (the
                    # ancillary space holds all a packet can carry): not the
                    # service's fault, and the message is whole.
                    error = self._error(
                        errno.EMFILE,
                        "no descriptor left for those the hypervisor service sent")
                    short = True
        taken = _Taken(msg, fds, error, malformed, short)
        # Parsing again after a Ctrl-C above costs nothing: nothing was
        # given away yet.
        self._inbox[0] = taken
        return taken

    def _classify(self, taken: _Taken, waiting: int | None) -> None:
        """Find the request ``taken``, a reply, answers (under _lock): the
        one of its id, or without one (a service that numbers nothing)
        ``waiting``, the one a call waits for; and what releasing it
        involves.  That request, and only that one, is then answered: a
        reply of an id no request has (a confused service) is dropped and
        leaves the requests that wait alone, whatever its id."""
        reply = taken.msg
        request_id = reply.get("id")
        if type(request_id) is not int:
            request_id = waiting
        request = self._unanswered.get(request_id) if request_id is not None else None
        if request is None:
            logger.warning("a reply from the hypervisor service to no request: %r", reply)
        elif "errno" not in reply:
            op, taken.done = request
            undo = _UNDO.get(op)
            if undo is not None:
                try:
                    taken.undo = undo(reply)
                except (KeyError, TypeError):
                    logger.warning("a malformed reply from the hypervisor service to %s: %r",
                                   op, reply)
        if request is None:
            request_id = None
        taken.request_id = request_id
        taken.classified = True
        if request_id is not None:
            del self._unanswered[request_id]

    def _release_head(self, taken: _Taken) -> None:
        """Let go of ``taken``, at the head of the inbox (under _lock)."""
        self._settle(taken)
        del self._inbox[0]

    def _settle(self, taken: _Taken) -> None:
        """Give back all ``taken`` holds, to a request whose call was cut
        short (under _lock): close its descriptors, call its ``done`` and
        release what it gave.  Called again after a Ctrl-C, it finishes."""
        if taken.applying:
            # One step: an apply that emptied the descriptors took them,
            # and what the reply gave with them.
            taken.applying = False
            if not taken.fds:
                taken.undo = None
        close_taken(taken.fds)
        done = taken.done
        taken.done = None
        if done is not None:
            done()
        undo = taken.undo
        if undo is None:
            return
        undo_op, undo_args = undo
        logger.debug("releasing what an abandoned reply gave: %s %r", undo_op, undo_args)
        request_id = next(self._ids)
        try:
            data = encode({"op": undo_op, **undo_args, "id": request_id})
        except ValueError:
            # A reply that filled its packet names more than a request
            # can (the service's fault): what it gave stays the service's
            # until the handle closes.  Raised, it would come out of every
            # call that tried the release again.
            taken.undo = None
            logger.error("cannot give back what a reply from the hypervisor service gave: "
                         "%s of it exceeds a message (left to the service)", undo_op)
            return
        self._unanswered[request_id] = (undo_op, None)  # its reply is dropped in turn
        sent: list[int] = []
        taken.undo = None
        try:
            # list.extend: whether it went is known also when a signal's
            # handler raises as the send returns.
            sent.extend(map(self._sock.send, (data,)))
        except OSError:
            # Gone: the service released everything the handle held.
            self._unanswered.pop(request_id, None)
        except BaseException:
            if not sent:  # EINTR: to be sent by the next one, with an id of its own
                taken.undo = undo
                self._unanswered.pop(request_id, None)
            raise

    def _settle_delivering(self, me: int) -> None:
        """Release the reply a call of this thread, cut short as it
        returned, left in _delivering (under _lock)."""
        if me in self._delivering:
            self._settle(self._delivering[me])
            del self._delivering[me]

    def drain(self) -> bool:
        """Deliver the pushed messages that already arrived, without waiting.

        Returns False once the service has gone or refused the connection
        (the next call reports it), and only then: its owner stops
        watching the connection for good (EventChannel does).  A malformed
        packet, or a push its owner cannot take, is the service's fault,
        not its end: it is logged as an error and dropped, and the drain
        goes on to what follows it.
        """
        me = threading.get_ident()
        with self._lock:
            try:
                if self._delivering:
                    self._settle_delivering(me)
                while True:
                    if not self._inbox:
                        try:
                            self._receive(MSG_DONTWAIT)
                        except BlockingIOError:
                            return True
                        except self._error:
                            return False
                    try:
                        self._dispatch(None)
                    except self._error:
                        return False
            except BaseException:
                self._cut_short()
                raise

    def _cut_short(self) -> None:
        """A drain ends with an exception (under _lock): if it left
        a packet in the inbox (a Ctrl-C after the receive took it), make
        the socket readable again, or a thread waiting for pushed messages
        on it (as EventChannel's do, in an epoll set) would not wake for
        it: it is no longer in the socket, and what the thread watches
        cannot see the inbox.  The service is asked for something (its
        info), so that its reply, which is dropped, wakes that thread, and
        the drain it makes then delivers what waits in the inbox first.

        The normal path pays nothing for it (a drain that raises pays a
        test of the inbox): making the inbox itself watchable (an eventfd that
        says it is not empty, joined to the socket in an epoll of its own
        as the descriptor owners watch) would cost every handle two more
        descriptors, and every wake-up a nested epoll, for the rare
        Ctrl-C.  Only for an owner of pushes: nobody else watches the
        socket, and the next call takes what waits.  Not for a call (see
        call()): a reply still to come wakes the thread.  A second Ctrl-C
        landing in here leaves the packet to the next call or drain."""
        if not self._inbox or self._on_push is None or self._refusal is not None:
            return
        request_id = next(self._ids)
        data = encode({"op": "info", "id": request_id})
        # Listed last before the send, with no call in between: a Ctrl-C
        # after a call here would leave it listed and never sent.
        self._unanswered[request_id] = ("info", None)  # its reply is dropped
        sent: list[int] = []
        try:
            sent.extend(map(self._sock.send, (data,), (MSG_DONTWAIT,)))
        except OSError:
            # Full: replies to come wake the thread; gone: the end does.
            self._unanswered.pop(request_id, None)
        except BaseException:
            if not sent:
                self._unanswered.pop(request_id, None)
            raise

    def close(self) -> None:
        # Shut down first, without the lock: a thread waiting in call() (or
        # in an epoll that watches this socket) wakes up and lets go.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            # What no call took: the service releases what it gave as the
            # connection closes, the descriptors are ours to close.  A
            # reply on its way out of call() moves to the inbox in one
            # step, or not at all if its thread took it meanwhile (it does
            # without the lock): never both.
            for thread in list(self._delivering):
                try:
                    self._inbox.extend(map(self._delivering.pop, (thread,)))
                except KeyError:
                    pass
            while self._inbox:
                close_taken(self._head().fds)
                del self._inbox[0]
            self._sock.close()

    def _receive(self, flags: int) -> None:
        """Append the next packet to the inbox (under _lock)."""
        try:
            # One C-level step from the kernel's hands to the inbox: the
            # packet's descriptors are never in a frame only.
            self._inbox.extend(map(self._recvmsg, (flags | _MSG_CMSG_CLOEXEC,)))
        except BlockingIOError:
            raise
        except OSError as e:
            raise self._refused() or self._gone(e) from None

    def _refuse(self, msg: Message) -> tuple[int, str]:
        self._refusal = _reported(msg, errno.ENODEV)
        return self._refusal

    def _refused(self) -> OSError | None:
        """Why the service refused this connection, if it said so (caller
        holds _lock, the inbox is empty).  Its message may wait in the
        socket behind an error: a send after the service closed the
        connection fails (EPIPE), and so does the first receive once it
        closed it with our request unread (ECONNRESET comes before the
        messages that are queued).  Another message read here stays in
        the inbox, for the next call."""
        if self._refusal is None and not self._inbox:
            try:
                self._inbox.extend(map(self._recvmsg, (MSG_DONTWAIT | _MSG_CMSG_CLOEXEC,)))
            except OSError:
                return None  # nothing there, or the error again
            if self._head().error is None or self._refusal is None:
                return None  # the end, garbage or a reply: gone all the same
            self._release_head(self._head())
        if self._refusal is None:
            return None
        return self._error(*self._refusal)

    def _gone(self, cause: OSError | None) -> OSError:
        detail = f": {cause.strerror or cause}" if cause is not None else ""
        return self._error(
            errno.ENODEV,
            "the simulated hypervisor closed the connection "
            f"(host stopped or domain destroyed){detail}",
        )
