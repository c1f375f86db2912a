"""A typed XenStore helper over :mod:`pyxs`.

:class:`XenStore` wraps one :class:`pyxs.Client` (from
:meth:`xenback.platform.Platform.xenstore`) with ``str`` paths and values,
:class:`OSError` errors (``FileNotFoundError`` for ENOENT,
``PermissionError`` for EACCES, ``filename`` set to the path), transactions
that are retried on EAGAIN, watches delivered in order on a workqueue
(:class:`~xenback._eventqueue.EventQueue`), and :meth:`XenStore.wait_for`.

Values written by another domain are hostile: :meth:`read` decodes them
leniently (undecodable bytes become U+FFFD) and :meth:`read_int` raises
:class:`ValueError` naming the node and the value when it is not a number.
Values we write must be what pyxs sends: printable ASCII, DEL (0x7f) and
NUL (which C readers, the kernel's xenbus among them, take as the end of
the value); anything else is a :class:`ValueError` naming the node and the
character.  Paths are checked against xenstored's rules before anything is
sent, and a :class:`ValueError` says which one a path breaks: those of
xenstore.txt (``[A-Za-z0-9-/_@]``, no empty component, no trailing
slash, 3072 bytes at most, 2048 for a relative path), and a special path
(``@releaseDomain``) only in :meth:`XenStore.watch` and the permission
calls.  A xenstored's own stricter limits (Xen 4.17's cxenstored, as the
simulated one, takes 2048 bytes at most below ``/local/domain/<domid>/``,
and 2048 in all elsewhere, from dom0 too) still come back as
:class:`OSError` EINVAL.  A :class:`Transaction` works only inside the
function given to :meth:`XenStore.transaction`.

pyxs notes this module works around: a :class:`pyxs.Client` has a single
transaction id, so each transaction runs on a copy of the client sharing its
connection; pyxs's ``Monitor.wait`` can spin forever on an event for an
absolute path it no longer watches, so events are taken straight from the
monitor's queue; and a request whose reply never comes because the
connection died would wait forever, so the router thread, as it ends,
answers every request still waiting with ENOTCONN, and new requests check
the connection first and raise :class:`ConnectionError` (both
:class:`OSError`); pyxs's router waits in ``select()``, which refuses a
descriptor numbered FD_SETSIZE (1024) or more, so the router thread runs a
loop of ours that waits in ``poll()`` instead.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import itertools
import logging
import math
import os
import queue
import re
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeVar, overload

import pyxs
from pyxs._internal import Event, Op, Packet
from pyxs.client import RVar
from pyxs.exceptions import ConnectionError as XSConnectionError
from pyxs.exceptions import (
    InvalidPath,
    InvalidPayload,
    InvalidPermission,
    PyXSError,
    UnexpectedPacket,
)
from pyxs.helpers import check_path, error

from workqueue import shown, wait_slice
from xenback._closing import Closing
from xenback._eventqueue import EventQueue, check_callback
from xenback._flags import XENSTORE_DOMID_MAX, check_xenstore_domid
from xenback._wire import XENSTORE_PAYLOAD_MAX
from xenback.platform import check_platform

if TYPE_CHECKING:
    from xenback.platform import Platform

logger = logging.getLogger(__name__)

__all__ = [
    "EventQueue",
    "Transaction",
    "Watch",
    "XenStore",
    "adopt_router",
    "close_client",
    "route_until_lost",
]

T = TypeVar("T")

#: How often a transaction is re-run after EAGAIN before giving up.  The
#: kernel retries forever; a bound turns a livelock into an error.
TRANSACTION_ATTEMPTS = 1000

#: How long a transaction's start is tried again while the domain's quota
#: of open transactions is full (see ``_begin_within_quota``); then ENOSPC.
TRANSACTION_QUOTA_WAIT = 5.0


#: Longest path XenStore takes (``XENSTORE_ABS_PATH_MAX``); pyxs applies
#: it to relative paths too.
XENSTORE_ABS_PATH_MAX = 3072

#: Longest relative path (``XENSTORE_REL_PATH_MAX``): xenstore.txt asks
#: clients to keep to it, and xenstored refuses longer ones (EINVAL).
XENSTORE_REL_PATH_MAX = 2048

#: The special watch paths pyxs sends (xenstored takes any "@" path in a
#: WATCH, but fires only these).
_SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")

#: A character xenstored refuses in a node's name (its is_valid_nodename).
_NOT_PATH_CHAR = re.compile("[^A-Za-z0-9/_@-]")


def _path(path: str, *, special: bool = False) -> bytes:
    """``path`` as sent, or :class:`ValueError` saying what is wrong with it;
    a special watch path (``@releaseDomain``) only with ``special``.

    pyxs's own check says only "invalid", lets a trailing NUL through
    (which then ends the path early inside the request: a WRITE to
    "/a\\0" would write "\\0<value>" to /a) and, its regex ending in
    ``$``, a trailing newline (which pyxs then refuses with a bare
    ValueError of the payload).
    """
    if not isinstance(path, str):
        raise TypeError(f"XenStore paths are str, not {type(path).__name__}")
    reason = _path_problem(path)
    if reason is None and path.startswith("@"):
        # xenstored refuses any "@" path but in a WATCH and, since XSA-115
        # gave them permissions (who may watch them), GET_PERMS and
        # SET_PERMS: EINVAL.  pyxs sends no other than these, the only
        # ones xenstored fires or keeps permissions of.
        if not special:
            reason = ("a special watch path (starts with '@'), which only watch(), "
                      "get_perms() and set_perms() take")
        elif path not in _SPECIAL_WATCHES:
            reason = "the special watch paths are " + " and ".join(_SPECIAL_WATCHES)
    if reason is not None:
        shown = repr(path) if len(path) <= 64 else f"{path[:64]!r}..."
        raise ValueError(f"invalid XenStore path {shown}: {reason}")
    return path.encode("ascii")


def _path_problem(path: str) -> str | None:
    if not path:
        return "empty"
    bad = _NOT_PATH_CHAR.search(path)
    if bad is not None:
        char, at = bad.group(), bad.start()
        if char == "\0":
            return f"contains NUL at offset {at}"
        if not char.isascii():
            return f"{ascii(char)} at offset {at} is not ASCII"
        return f"{char!r} at offset {at} is not a letter, a digit or one of - / _ @"
    if len(path) > 1 and path.endswith("/"):
        return "ends with '/'"
    empty = path.find("//")
    if empty >= 0:
        return f"an empty component ('//') at offset {empty}"
    if len(path) > XENSTORE_ABS_PATH_MAX:
        return f"{len(path)} bytes long, over XenStore's limit of {XENSTORE_ABS_PATH_MAX}"
    if len(path) > XENSTORE_REL_PATH_MAX and path[0] not in "/@":
        return (f"{len(path)} bytes long, over XenStore's limit of "
                f"{XENSTORE_REL_PATH_MAX} for a relative path")
    return None


#: What pyxs lets through in a request: NUL and printable 7-bit ASCII.
#: XenStore itself stores any bytes, but pyxs refuses anything else with a
#: bare ValueError that names neither the node nor the offending character.
_SENDABLE = re.compile("[\0\x20-\x7f]*")


#: A permission as xenstore.txt spells it: w (write), r (read), b
#: (both) or n (none), then a domid in ASCII decimal digits, with no
#: leading zero: cxenstored reads the domid with strtol() in base 0, so
#: "r010" would give domain 8, not 10.
_PERMISSION = re.compile("[wrbn](0|[1-9][0-9]*)")


def _value(value: str | int, path: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError(f"XenStore values are str or int, not {type(value).__name__}")
    # int(): the number, as wait_for() and the domain queries take it; an
    # int subclass's str() may be its name.
    text = value if isinstance(value, str) else str(int(value))
    if not _SENDABLE.fullmatch(text):
        at = next(i for i, c in enumerate(text) if not _SENDABLE.fullmatch(c))
        what = "is not ASCII" if not text[at].isascii() else "is a control character"
        raise ValueError(
            f"XenStore value for {path!r} must be printable ASCII: "
            f"{ascii(text[at])} at offset {at} {what}"
        )
    data = text.encode("ascii")
    # A WRITE carries "<path>\0<value>": what fits depends on the path.
    room = XENSTORE_PAYLOAD_MAX - len(_path(path)) - 1
    if len(data) > room:
        raise ValueError(
            f"XenStore value for {path!r} is too long: {len(data)} bytes, but a WRITE "
            f"to this node has room for {room} in its {XENSTORE_PAYLOAD_MAX}-byte payload"
        )
    return data


#: Why a connection may end before XenStore said a word on it.  xenstored
#: has no message to refuse one with: it closes the socket as it accepts
#: it, cxenstored when it cannot allocate the connection, the simulated
#: host's past a guest's limit of connections (xenstored's socket is
#: root's alone, and so has none).  The client sees its connect() succeed
#: (or pyxs's router die as it starts) and the first request fail.  Nor
#: has it one for the end of a domain: the simulated host closes a
#: destroyed guest's connections, whose code lives on in the process,
#: just so, and an idle one, never answered, looks refused.  Nothing on
#: the wire tells them apart, so the message names each.
_REFUSED = ("XenStore closed the connection before its first reply: it refused it "
            "(too many connections of this domain?), or it stopped, or this domain "
            "was destroyed")


def _unanswered(router: Any) -> bool:
    """Whether the connection of ``router`` ended with nothing ever
    answered: as a refused one does (see _REFUSED).  With a request sent
    or not: the router may see the end before the first request goes,
    and that request fails for the same reason."""
    return not router.replied


def _connection_lost(router: Any, path: str, what: str = "XenStore connection lost"
                     ) -> ConnectionError:
    """The error of a request on the connection of ``router``, lost (or
    never made: a router that no open() adopted has no ``refused``)."""
    refused = getattr(router, "refused", False)
    return ConnectionError(errno.ENOTCONN, _REFUSED if refused else what, path)


def _oserror(exc: PyXSError, path: str) -> OSError:
    if isinstance(exc, XSConnectionError):
        # The socket failed under pyxs before its router thread noticed (so
        # the connection does not count as lost yet): the same loss.
        code = errno.ENOTCONN
    elif exc.args and isinstance(exc.args[0], int) and exc.args[0]:
        code = exc.args[0]
    else:
        code = errno.EIO
    if code == errno.ENOTCONN:  # also the answer route_until_lost gives
        return ConnectionError(code, "XenStore connection lost", path)
    return OSError(code, os.strerror(code), path)


def _exists(value: str | None) -> bool:
    return value is not None


def adopt_router(router: Any, on_lost: Callable[[Exception], None], *, name: str) -> None:
    """Make pyxs's ``router``, of a client not yet connected, route on a
    thread named ``name`` running :func:`route_until_lost`, and close its
    connection only under its ``send_lock``.

    pyxs's senders hold ``send_lock`` while they test that the connection
    is up and then write a request's header and payload to its transport,
    which closing the connection sets to None; the router thread closes it
    without the lock (a read finding it reset, or as the router ends).
    Closed between a sender's test and its writes, the request failed with
    AttributeError rather than as a lost connection.  The lock becomes
    reentrant because a sender closes the connection itself, under it,
    when a write finds it broken.

    A sender closing it also wakes the router through the terminator pair:
    the router polls a duplicate of the connection's descriptor, on which
    XenBus's close() (a bare os.close(), no shutdown()) shows nothing.

    Requests are sent by our ``router.send(packet, rvar=None)``:
    numbered by the router (see :func:`_next_rq_id`), their reply handed
    to ``rvar`` (a new one by default), and written in one buffer whose
    writes are counted.  pyxs writes a header and then a payload, and a
    Ctrl-C (or a write failing) between the two, or within either, left
    part of a request on a connection that stayed up, whose stream
    xenstored could no longer frame.  Such a connection is lost now, ``on_lost`` told
    why; one on which nothing of the request went stays up.
    """
    if router.thread.ident is not None:
        raise RuntimeError("the router has run already: adopt a new client's router")
    router.thread = threading.Thread(target=route_until_lost, args=(router, on_lost),
                                     name=name, daemon=True)
    connection = router.connection
    if "close" in vars(connection):
        # Adopted already, by a connect that failed (open() retried until
        # xenstored comes): wrapped once more at every attempt, close()
        # would end up past the recursion limit.
        return
    router.send_lock = send_lock = threading.RLock()
    close = connection.close

    def close_under_send_lock(silent: bool = True) -> None:
        with send_lock:
            was_connected = connection.is_connected
            if was_connected and threading.current_thread() is router.thread:
                # The router's close: pyxs's recv() finding the connection
                # reset, or _route() ending.  Whether it was refused is
                # decided before the close, as a sender's close decides it
                # (_unsent): a request failing on the closed connection
                # reads it at once, before the router has unwound.
                router.refused = not router.terminating and _unanswered(router)
            try:
                close(silent)
            finally:
                # The router closes the terminator pair only after the
                # connection, under send_lock: still open here.
                if was_connected and threading.current_thread() is not router.thread:
                    router.w_terminator.sendall(b"\0")

    connection.close = close_under_send_lock
    router.lost_cause = None
    # Whether XenStore has said anything on the connection, and whether
    # it ended the connection before it answered the first request (see
    # _REFUSED).  ``refused`` is set under send_lock by whoever closes
    # the connection first, before the close: a sender whose write
    # failed (_unsent) or the router (above), which is not refused when
    # it ends because terminate() asked (``terminating``).
    router.replied = False
    router.refused = False
    router.terminating = False
    router.last_rq_id = -1

    def send(packet: Packet, rvar: RVar | None = None) -> RVar:
        # A caller's own rvar (a _Reply) is made before the call, so that
        # a Ctrl-C as this returns does not lose it with the request gone.
        if rvar is None:
            rvar = RVar()
        sent: list[int] = []
        with send_lock:
            try:
                if not connection.is_connected:
                    raise XSConnectionError("not connected")
                packet = packet._replace(rq_id=_next_rq_id(router))
                # Before the write: the reply may come before it returns.
                router.rvars[packet.rq_id] = rvar
                _write(connection.fileno(), _wire(packet), sent)
                return rvar
            except BaseException as exc:
                _unsent(router, packet, rvar, sum(sent), exc)
                raise

    router.send = send


def _next_rq_id(router: Any) -> int:
    """The id of the next request, called under ``send_lock``.

    pyxs's ids come from one counter of the process, which has no lock
    (two threads could be given one id, and take each other's replies)
    and wraps at sys.maxsize, far past the u32 that xenstored echoes
    (the 2**32nd request failed to pack).  Ours are the router's, and
    skip the ids of requests still waiting for their replies.
    """
    rq_id = router.last_rq_id
    while True:  # ends: there are far fewer than 2**32 requests waiting
        rq_id = (rq_id + 1) & 0xFFFFFFFF
        if rq_id not in router.rvars:
            break
    router.last_rq_id = rq_id
    return rq_id


def _wire(packet: Packet) -> bytes:
    """``packet`` as sent: header and payload in one buffer, one write."""
    header = Packet._struct.pack(packet.op, packet.rq_id, packet.tx_id, packet.size)
    return header + packet.payload


def _write(fd: int, data: bytes, sent: list[int]) -> None:
    """Write ``data`` to ``fd``, appending to ``sent`` what each write took.

    Counted so that a request cut short (a Ctrl-C, a failing write) can
    tell a connection with part of a request on it, which can no longer
    be framed, from one on which nothing went.  list.extend() stores
    what os.write() returns before a signal handler can run: CPython
    runs handlers when a call returns to Python code, and ``n =
    os.write(...)`` would lose n to a KeyboardInterrupt raised there.
    """
    view = memoryview(data)
    done = 0
    while done < len(data):
        sent.extend(map(os.write, (fd,), (view[done:],)))
        done += sent[-1]


def _unsent(router: Any, packet: Packet, rvar: RVar, sent: int, exc: BaseException) -> None:
    """Clean up after a request whose sending ``exc`` ended, ``sent`` bytes
    of it written; called under ``send_lock``.  Unless none or all of the
    request went, the stream can no longer be framed (xenstored would
    take the next request's bytes for the rest of this one): the
    connection is lost."""
    size = Packet._struct.size + packet.size
    if sent == size:
        return  # interrupted as the write returned: its reply will come
    if sent == 0:
        if router.rvars.get(packet.rq_id) is rvar:
            del router.rvars[packet.rq_id]
        if not isinstance(exc, OSError):
            return
        if exc.errno not in _CONNECTION_GONE:
            # Still framed, and maybe a passing failure: this request's
            # error (its errno, as XenStore's are), not pyxs's
            # ConnectionError, which callers are told is a lost connection.
            raise PyXSError(exc.errno, f"writing to XenStore failed: {exc.strerror}") from exc
        cause = XSConnectionError(f"writing to XenStore failed: {exc.strerror}")
    elif isinstance(exc, OSError):
        cause = XSConnectionError(f"writing to XenStore failed after {sent} of {size} "
                                  f"bytes of a request: {exc.strerror}")
    else:
        cause = XSConnectionError(f"a write to XenStore was interrupted after {sent} of "
                                  f"{size} bytes of a request ({type(exc).__name__}): "
                                  f"the rest will never follow")
    if isinstance(exc, OSError):
        cause.__cause__ = exc  # before on_lost may be given it
    if router.connection.is_connected:
        # For on_lost: the router finds only that the connection is closed.
        router.lost_cause = cause
        # For our caller's error too.  A first write failing is how a
        # refusal shows; one our own Ctrl-C cut short is no refusal: we
        # end the connection, XenStore did not.
        router.refused = isinstance(exc, OSError) and _unanswered(router)
        router.connection.close()  # wakes the router (see adopt_router)
    if isinstance(exc, OSError):
        raise cause from exc


class _Reply(RVar):
    """A reply variable that acts on its reply on the router thread.

    ``taken(packet)`` runs as the reply comes, before the requester is
    woken: CPython runs signal handlers in the main thread only, so no
    Ctrl-C lands between the reply and what it must leave behind (a
    transaction's id where the requester's clean-up finds it), as one
    would in the requester.  A requester that stops waiting
    (:meth:`abandon`) before the reply comes leaves it to
    ``orphaned(packet)`` instead.  Both are called on the router thread,
    where an exception would end the connection: they raise none.  They
    are also given the ENOTCONN that :func:`route_until_lost` answers
    with as the connection ends.
    """

    def __init__(self, taken: Callable[[Packet], None],
                 orphaned: Callable[[Packet], None]) -> None:
        super().__init__()
        self._taken = taken
        self._orphaned = orphaned
        # Under condition: set() and abandon() agree on which of the two
        # runs.
        self._abandoned = False

    def set(self, target: Packet) -> None:
        with self.condition:
            if not self._abandoned:
                self._taken(target)
                self.target = target
                self.condition.notify_all()
                return
        self._orphaned(target)

    def abandon(self) -> None:
        """Stop waiting: a reply that has not come yet goes to ``orphaned``
        (one never sent, to nobody)."""
        with self.condition:
            self._abandoned = self.target is None

    def outstanding(self, router: Any) -> bool:
        """Whether the request went and its reply is still to come: the
        router answers it (ENOTCONN if the connection ends first).
        Sound because _dispatch unregisters a reply variable only once
        it is set: one neither registered nor set was never sent."""
        registered = any(rvar is self for rvar in list(router.rvars.values()))
        return registered and self.target is None


def _begin_within_quota(client: pyxs.Client) -> None:
    """:func:`_begin`, started again for up to :data:`TRANSACTION_QUOTA_WAIT`
    seconds while XenStore refuses it with ENOSPC: the domain holds as many
    transactions open as its quota lets it (10 in cxenstored, for all its
    processes together: ``/dev/xen/xenbus`` shares the kernel's connection),
    which their ends soon make room in.  A driver's devices each write in
    their own, in parallel, so a driver domain serving many fills it at
    times; failing a write then would fail the device for nothing."""
    deadline: float | None = None
    pause = 0.001
    while True:
        try:
            _begin(client)
            return
        except PyXSError as exc:
            err = _oserror(exc, "@transaction")
        if err.errno != errno.ENOSPC:
            raise err from None
        now = time.monotonic()
        if deadline is None:
            deadline = now + TRANSACTION_QUOTA_WAIT
        if now >= deadline:
            raise err from None
        # Nothing is open meanwhile: a Ctrl-C here leaves nothing behind.
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, 0.05)


def _begin(client: pyxs.Client) -> None:
    """Start a transaction on ``client``, as pyxs's ``transaction()``, but
    leaving none at XenStore that nobody knows of, whatever cuts it short.

    pyxs learns the transaction's id from the reply, in the requester: a
    Ctrl-C while the request was in flight, or as the reply was read,
    lost it, and the transaction stayed open for the life of the
    connection, counted against the domain's quota (10 in cxenstored).
    Here the router sets ``client.tx_id`` as the reply comes, where a
    caller that is interrupted afterwards ends it; and for a caller that
    gave up before the reply came, the router ends it itself.
    """
    router = client.router

    def taken(packet: Packet) -> None:
        client.tx_id = _started_id(packet)

    def orphaned(packet: Packet) -> None:
        tx_id = _started_id(packet)
        if not tx_id:
            return
        try:
            # Its reply, to nobody, is dropped as it comes.
            router.send(Packet(Op.TRANSACTION_END, b"F\0", rq_id=0, tx_id=tx_id))
        except (PyXSError, OSError) as exc:
            # Lost, and the transaction with it.
            logger.debug("ending abandoned transaction %d failed: %s", tx_id, exc)

    if client.tx_id:
        raise PyXSError(errno.EALREADY, os.strerror(errno.EALREADY))
    reply = _Reply(taken, orphaned)
    try:
        router.send(Packet(Op.TRANSACTION_START, b"\0", rq_id=0), reply)
        packet = reply.get()
    except BaseException:
        reply.abandon()
        raise
    if packet.op == Op.ERROR:
        raise error(packet.payload[:-1])
    if not client.tx_id:
        raise UnexpectedPacket(packet)


def _commit(client: pyxs.Client, committed: Callable[[], None]) -> bool:
    """Commit ``client``'s transaction as pyxs's ``commit()`` does (False
    if it conflicted, EAGAIN), and call ``committed()`` on the router
    thread as the reply says it went.

    For a caller that must know whatever cuts this short whether the
    transaction's writes are in the store (the toolstack's add_device(),
    whose caller removes a device it added, and only one it added):
    ``committed()`` runs where no Ctrl-C lands, between the reply and
    the caller; and a Ctrl-C once the request went waits for the reply
    before it goes on, as the connection, closed on the way out, would
    drop the reply unread.  (A second Ctrl-C in that wait leaves the
    outcome unknown: that window stays.)
    """
    router = client.router
    tx_id = client.tx_id

    def taken(packet: Packet) -> None:
        if packet.op != Op.TRANSACTION_END:
            return  # refused (EAGAIN), or the connection ended first
        try:
            committed()
        except Exception:  # on the router thread: it must go on
            logger.exception("XenStore commit: the commit's callback failed")

    # Taken whether its requester still waits or not: the commit went.
    reply = _Reply(taken, taken)
    try:
        router.send(Packet(Op.TRANSACTION_END, b"T\0", rq_id=0, tx_id=tx_id), reply)
        packet = reply.get()
    except BaseException:
        if reply.outstanding(router):
            reply.get()
        raise
    finally:
        client.tx_id = 0  # ended, committed or not (as pyxs's commit())
    if packet.op == Op.ERROR:
        exc = error(packet.payload[:-1])
        if exc.args[0] == errno.EAGAIN:
            return False
        raise exc
    if packet.op != Op.TRANSACTION_END:
        raise UnexpectedPacket(packet)
    return True


def _started_id(packet: Packet) -> int:
    """The id of the transaction a reply to TRANSACTION_START began; 0 if
    none (an error, or a reply that is no such answer)."""
    if packet.op != Op.TRANSACTION_START:
        return 0
    digits = packet.payload.rstrip(b"\0")
    if not (digits.isdigit() and len(digits) <= 10):
        return 0
    tx_id = int(digits)
    return tx_id if tx_id <= 0xFFFFFFFF else 0


#: The errors of a write that pyxs's send() takes for the end of the
#: connection.
_CONNECTION_GONE = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE})


def close_client(client: pyxs.Client) -> None:
    """Close ``client``, whose router :func:`adopt_router` set up: its
    router thread has ended when this returns.

    pyxs's ``terminate()`` tests that the connection is up and then writes
    to the router's terminator pair, which the router closes as it ends:
    XenStore hanging up between the two failed the write (EBADF, or EPIPE)
    although the connection is over all the same.
    """
    router = client.router
    if router.thread is threading.current_thread():
        # on_lost, the router's last act (a daemon closing as XenStore goes
        # away): it has closed everything, and terminate() would join this
        # very thread.
        return
    if router.thread.ident is None:
        # No router ever ran to close what it would have: a connect that
        # failed, or one interrupted (Ctrl-C) after pyxs had connected the
        # socket but before it started the thread.
        router.connection.close()
        router.r_terminator.close()
        router.w_terminator.close()
        return
    try:
        client.close()
    except OSError:
        if router.is_connected:
            raise
        router.thread.join()


def route_until_lost(router: Any, on_lost: Callable[[Exception], None]) -> None:
    """Do the work of pyxs's ``router`` (as its thread's target) so that
    its end leaves nobody waiting.

    pyxs's router thread ends when XenStore drops the connection (or the
    client is closed), and tells nobody: requests wait for ever for their
    replies.  Here the requests left waiting are answered ENOTCONN, and
    ``on_lost(exc)`` is called when it was XenStore (or anything but
    close()) that ended the connection: with ``router.lost_cause``, the
    error of the sender that closed it, if one did so before the router
    ended (the router sees only a closed connection).
    :func:`adopt_router` sets it up.
    """
    lost: Exception | None = None
    try:
        _route(router)
    except Exception as exc:  # pyxs's ConnectionError, or whatever broke it
        # Whoever closed the connection said already whether it was
        # refused (see adopt_router()).
        lost = exc
    finally:
        # The router closed the connection before we get here, so a request
        # sent after we take send_lock fails in send(); one sent before has
        # its reply variable registered, and is answered now.
        with router.send_lock:
            waiting = list(router.rvars.values())
            router.rvars.clear()
        for rvar in waiting:
            rvar.set(Packet(Op.ERROR, b"ENOTCONN\x00", rq_id=0))
    if lost is not None:
        if router.refused:
            refused = XSConnectionError(f"{_REFUSED} ({lost})")
            # The system's error, if one ended it, stays the cause.
            refused.__cause__ = lost.__cause__ if lost.__cause__ is not None else lost
            lost = refused
        on_lost(lost)


def _route(router: Any) -> None:
    """What pyxs's ``Router.__call__`` does, waiting in poll().

    pyxs waits in select.select(), which raises ValueError for a
    descriptor numbered FD_SETSIZE (1024) or more: in a process that
    already holds that many (a backend serving hundreds of sockets) the
    router would die before its first packet.  poll() has no such limit.

    Returns when router.terminate() writes to the terminator pair; raises
    when the connection fails or XenStore sends a packet nobody asked for.
    Either way the connection and the terminator pair end up closed, as
    pyxs's router leaves them.
    """
    connection = router.connection
    watched = -1
    try:
        terminator = router.r_terminator.fileno()
        poller = select.poll()
        poller.register(terminator, select.POLLIN)
        # A sender closes the connection when a write finds it broken
        # (pyxs's send() on EPIPE), which frees its number for the next
        # file anyone opens: closed just before our poll(), that number
        # could have us wait on that file for ever.  A duplicate stays
        # ours; the sender wakes us through the terminator pair (see
        # adopt_router()).
        watched = os.dup(connection.fileno())
        poller.register(watched, select.POLLIN)
        while True:
            if not connection.is_connected:
                # Closed under us by a sender, as above.
                raise XSConnectionError("not connected")
            ready = {fd for fd, _events in poller.poll()}
            if terminator in ready:
                if not connection.is_connected:
                    # A sender closed it, and woke us: as above.
                    raise XSConnectionError("not connected")
                router.terminating = True  # for our close below
                return  # terminate() wins over packets still unread
            # Readable, hung up or failed: recv() returns the packet or
            # raises pyxs's ConnectionError.
            try:
                packet = connection.recv()
            except XSConnectionError as exc:
                raise XSConnectionError(_read_failure(exc)) from exc
            except AttributeError:
                # recv() tests that the connection is up and then reads
                # its transport, which a sender closing it sets to None
                # (we cannot take send_lock for a read that may wait).
                if connection.is_connected:
                    raise
                raise XSConnectionError("not connected") from None
            _dispatch(router, packet)
    except Exception:
        # A sender that closes the connection says why first (_unsent):
        # if one has, what we met is that close.  One that says so only
        # later met our shutdown below, as the consequence of ours.
        cause = router.lost_cause
        if cause is None:
            raise
        raise cause from cause.__cause__  # the OSError, if a write failed
    finally:
        if watched >= 0:
            # A sender blocked in a write (a xenstored that reads nothing)
            # holds send_lock, which the close() below waits for: shut
            # down, the socket fails that write.
            _shut_down(watched)
        connection.close()  # under send_lock: see adopt_router()
        if watched >= 0:
            os.close(watched)
        router.r_terminator.close()
        router.w_terminator.close()


def _shut_down(fd: int) -> None:
    """Shut down the socket of descriptor ``fd``, which stays open; nothing
    if it is no socket (XenBus's device, whose writes wait for nobody)."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # nothing left to shut down
    finally:
        sock.detach()


def _read_failure(exc: XSConnectionError) -> str:
    """What pyxs's ``exc`` from reading a packet means, in words.

    pyxs says "error while reading from '<path>': (104,)": its own
    ECONNRESET, without text, for an end of file, or an OSError's args.
    """
    cause = exc.__context__
    if isinstance(cause, OSError):
        if cause.strerror:
            return f"reading from XenStore failed: {cause.strerror}"
        if cause.args == (errno.ECONNRESET,):  # pyxs's own
            return "XenStore closed the connection"
    return str(exc)


def _dispatch(router: Any, packet: Packet) -> None:
    """Hand ``packet`` to the monitors of its watch token, or to the request
    waiting for it, as pyxs's router does."""
    router.replied = True
    if packet.op == Op.WATCH_EVENT:
        fields = packet.payload.split(b"\0")
        if len(fields) != 3:  # "<path>\0<token>\0"
            raise UnexpectedPacket(packet)
        event = Event(fields[0], fields[1])
        # A copy, and no defaultdict entry: monitors (un)subscribe from
        # other threads.
        for monitor in list(router.monitors.get(event.token, ())):
            monitor.events.put(event)
        return
    rvar = router.rvars.get(packet.rq_id)
    if rvar is None:
        raise UnexpectedPacket(packet)
    try:
        rvar.set(packet)
    finally:
        # Only now (see _Reply.outstanding).  Its id is not given out
        # again meanwhile: _next_rq_id skips ids still listed.
        router.rvars.pop(packet.rq_id, None)


class _Ops:
    """The node operations, on a plain client or inside a transaction."""

    _client: pyxs.Client

    def _do(self, fn: Callable[..., Any], path: str, *args: Any, special: bool = False) -> Any:
        """``fn(path, *args)`` with ``path`` checked (a special watch path
        only with ``special``) and pyxs's errors made ours."""
        # pyxs waits forever for the reply to a request sent on a connection
        # its router thread has given up on; fail fast instead.
        if not self._client.router.is_connected:
            raise _connection_lost(self._client.router, path, "not connected to XenStore")
        try:
            return fn(_path(path, special=special), *args)
        except InvalidPath:
            raise ValueError(f"invalid XenStore path {path!r}") from None
        except InvalidPermission as exc:
            raise ValueError(f"invalid XenStore permission {exc.args[0]!r} for {path!r}") from None
        except InvalidPayload as exc:
            raise ValueError(
                f"XenStore request for {path!r} is too long: {len(exc.args[0])} bytes, "
                f"over the {XENSTORE_PAYLOAD_MAX}-byte payload"
            ) from None
        except PyXSError as exc:
            if isinstance(exc, ValueError):  # anything else pyxs will not send
                raise ValueError(f"pyxs refused the request for {path!r}: {exc!r}") from None
            if not self._client.router.is_connected:
                # Whatever the reply said, the cause is the lost connection.
                raise _connection_lost(self._client.router, path) from None
            raise _oserror(exc, path) from None

    def read(self, path: str, default: str | None = None) -> str | None:
        """The value of ``path``, or ``default`` if it does not exist."""
        try:
            raw = self._do(self._client.read, path)
        except FileNotFoundError:
            return default
        return raw.decode("utf-8", errors="replace")

    @overload
    def read_int(self, path: str, default: int) -> int: ...

    @overload
    def read_int(self, path: str, default: int | None = None) -> int | None: ...

    def read_int(self, path: str, default: int | None = None) -> int | None:
        """The value of ``path`` as an integer; ``default`` if missing.
        Raises :class:`ValueError` if it is not a decimal integer: ASCII
        digits after one ``-`` at most, white space around them allowed
        (as the kernel's ``xenbus_scanf("%d")`` skips it before), no
        ``+``."""
        value = self.read(path)
        if value is None:
            return default
        text = value.strip()
        # One sign at most: lstrip("-") would let "--5" through to int().
        if not (text.isascii() and text.removeprefix("-").isdigit()):
            # ascii(): the value is another domain's, and may be anything.
            raise ValueError(f"{path}: expected an integer, found {ascii(value[:64])}")
        return int(text)

    def write(self, path: str, value: str | int) -> None:
        """Write ``value`` (parents are created with empty values)."""
        data = _value(value, path)
        self._do(self._client.write if data else self._write_empty, path, data)

    def _write_empty(self, path: bytes, _value: bytes) -> None:
        # pyxs wants every argument of a request to be at least one byte
        # long, so its write() refuses b"" with a bare ValueError; the same
        # WRITE without the empty argument is the identical payload.
        check_path(path)
        self._client.ack(Op.WRITE, path + b"\0")

    def mkdir(self, path: str) -> None:
        """Create ``path`` (and its parents) with an empty value."""
        self._do(self._client.mkdir, path)

    def rm(self, path: str) -> None:
        """Remove ``path`` and everything under it; a missing node is fine."""
        try:
            self._do(self._client.delete, path)
        except FileNotFoundError:
            pass

    def exists(self, path: str) -> bool:
        """Whether the node ``path`` exists.  :class:`PermissionError` if
        we may not look (Linux's ``xenbus_exists`` says no to any error;
        a driver domain must tell "gone" from "not ours to see")."""
        try:
            self._do(self._client.list, path)
        except FileNotFoundError:
            return False
        return True

    def ls(self, path: str) -> list[str]:
        """Names of the children of ``path``; [] if it does not exist,
        :class:`PermissionError` if we may not list it."""
        try:
            names = self._do(self._client.list, path)
        except FileNotFoundError:
            return []
        return [n.decode("utf-8", errors="replace") for n in names]

    def get_perms(self, path: str) -> list[str]:
        """``path``'s permissions, like ``["n0", "r5"]``: owner/default first.
        Also of a special watch path (``@releaseDomain``), as xenstored
        keeps since XSA-115."""
        return [p.decode() for p in self._do(self._client.get_perms, path, special=True)]

    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        """``perms`` like ``["n0", "r5"]``: owner/default first.  Also of a
        special watch path: ``r<domid>`` lets that domain watch it."""
        if isinstance(perms, str | bytes):
            # Each letter would be taken for a permission.
            raise TypeError(
                f"permissions must be a sequence of str like ['n0', 'r5'], "
                f"not {type(perms).__name__}"
            )
        encoded = []
        for perm in perms:
            if not isinstance(perm, str):
                raise TypeError(f"permission {perm!r} must be a str")
            # Not left to pyxs: its check lets a trailing newline through
            # to a bare ValueError of the payload, and quotes bytes.
            if not _PERMISSION.fullmatch(perm):
                raise ValueError(f"invalid XenStore permission {ascii(perm)} for {path!r}: "
                                 f"one of the letters w r b n and a domid, like 'r5'")
            # Six digits or more, with no leading zero, are past it (and
            # int() of thousands of them would fail on its own limit).
            if len(perm) > 6 or int(perm[1:]) > XENSTORE_DOMID_MAX:
                domid = perm[1:] if len(perm) <= 21 else f"of {len(perm) - 1} digits"
                raise ValueError(f"invalid XenStore permission {shown(perm)} for {path!r}: "
                                 f"domid {domid} is past {XENSTORE_DOMID_MAX} (a domid_t)")
            encoded.append(perm.encode())
        if not encoded:
            raise ValueError(
                f"no permissions for {path!r}: the first one, the owner's, is needed"
            )
        self._do(self._client.set_perms, path, encoded, special=True)


class Transaction(_Ops):
    """The operations of one transaction attempt (see :meth:`XenStore.transaction`).

    Usable only until the function it was given to returns: after that,
    every operation raises :class:`RuntimeError`.
    """

    def __init__(self, client: pyxs.Client) -> None:
        self._client = client
        self._ended = False

    def _do(self, fn: Callable[..., Any], path: str, *args: Any, special: bool = False) -> Any:
        # pyxs resets the client's transaction id when the transaction ends:
        # an operation now would go straight to the store, unchecked.
        if self._ended:
            raise RuntimeError(f"the transaction has ended: {path!r} was not touched")
        return super()._do(fn, path, *args, special=special)


class Watch:
    """A registered watch; :meth:`unwatch` removes it.

    Calls already queued when :meth:`unwatch` returns may still run.
    """

    def __init__(
        self,
        xs: XenStore,
        path: str,
        token: str,
        callback: Callable[[str], object],
        events: EventQueue | None,
    ) -> None:
        self.path = path
        self.token = token
        self.callback = callback
        self.events = events
        self._xs = xs

    def __repr__(self) -> str:
        return f"<Watch {self.path!r} token={self.token!r}>"

    def _deliver(self, path: str) -> None:
        # Runs on the watch thread of every watch of the connection: nothing
        # may escape, or all of them would fall silent.
        try:
            if self.events is None:
                self.callback(path)
            else:
                self.events.call(self.callback, path)
        except Exception:
            logger.exception("watch %s: callback failed", self.path)

    def unwatch(self) -> None:
        """Remove the watch; idempotent."""
        self._xs._unwatch(self)


class _Removal:
    """The watches of a wait_for() for the watch thread to remove, and an
    event set once they are gone (or the connection closed)."""

    __slots__ = ("watches", "done")

    def __init__(self, watches: list[Watch]) -> None:
        self.watches = watches
        self.done = threading.Event()


def _predicate_name(predicate: Callable[..., object]) -> str:
    """How a timeout names what a waiter's function waited for: its name,
    or "the predicate" for a lambda (whose name says nothing)."""
    name = getattr(predicate, "__name__", "<lambda>")
    return "the predicate" if name == "<lambda>" else name


class XenStore(_Ops, Closing):
    """One XenStore connection with typed operations and watches.

    ``client`` is an unconnected :class:`pyxs.Client`; :meth:`open` (or
    ``with``) connects it.  The object is safe to use from many threads:
    pyxs multiplexes requests over its connection, and transactions use
    their own client copies.
    """

    def __init__(
        self, client: pyxs.Client, *, on_lost: Callable[[Exception], None] | None = None
    ) -> None:
        """``on_lost(exc)`` is called once, on pyxs's router thread, if
        XenStore ends the connection (it may :meth:`close` this); without
        it the loss is logged as a warning.  Either way
        :attr:`connection_lost` is set first."""
        self._client = client
        self._on_lost = on_lost
        # _lock guards _watches, _waiters, _removals and the creation of
        # the monitor thread.
        self._lock = threading.Lock()
        self._watches: dict[str, Watch] = {}
        # The events wait_for() callers sleep on: set when the connection
        # is lost as well, so that they fail at once, not at their timeout,
        # and by wake_waiters().
        self._waiters: set[threading.Event] = set()
        # Those of wait_for() callers that may hand their watch to the
        # watch thread to remove: close() ends their wait for it.
        self._removals: set[_Removal] = set()
        self._tokens = itertools.count()
        self._monitor: Any = None
        # Held by open() and close() (see there).
        self._closing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._closed = False
        #: Set when XenStore ends the connection (not when :meth:`close`
        #: does): every request fails from then on, and no watch fires.
        #: A daemon that has nothing left to serve waits for it.
        self.connection_lost = threading.Event()

    @classmethod
    def connect_to(
        cls, platform: Platform, *, on_lost: Callable[[Exception], None] | None = None
    ) -> XenStore:
        """Connect to ``platform``'s XenStore (``on_lost`` as for the constructor)."""
        check_platform(platform)
        xs = cls(platform.xenstore(), on_lost=on_lost)
        try:
            xs.open()
        except BaseException:
            # Nobody else has it to close: open() may have got as far as
            # starting the router thread (a Ctrl-C as it connected).
            xs.close()
            raise
        return xs

    def open(self) -> None:
        """Connect (pyxs starts its router thread); nothing to do if
        connected.  A connection closed or lost cannot be opened again
        (pyxs's client cannot reconnect): make a new :class:`XenStore`.
        Nor one closed while it connects: :class:`RuntimeError`.  A
        second open() at once waits for the first, and finds it done.
        From a watch callback or ``on_lost``, which a close() may be
        waiting for, it waits for nothing: :class:`RuntimeError` at once
        if the connection is closing or lost."""
        me = threading.current_thread()
        if me is self._thread or me is self._client.router.thread:
            # A close() on another thread holds _closing while it waits for
            # this very thread.  Nothing to connect here anyway: the watch
            # thread runs only once connected, on_lost only once lost.
            self._refuse_reopening(closing=True)
            return
        # Two at once would both adopt the router and both connect: the
        # second socket replaced the first under a router still polling
        # the first.  close() waits for it too (see there).
        with self._closing:
            self._open()

    def on_own_thread(self) -> bool:
        """Whether the calling thread is one of the connection's own: the
        watch thread (a callback) or pyxs's router thread (``on_lost``),
        which :meth:`close` waits for to end.  Code run on them (a
        finaliser too) must not wait for a thread that may be closing
        the connection."""
        me = threading.current_thread()
        return me is self._thread or me is self._client.router.thread

    def _refuse_reopening(self, *, closing: bool = False) -> None:
        """:class:`RuntimeError` if the connection was closed (or, with
        ``closing``, is being closed) or lost: pyxs's client cannot
        connect again (its router thread has run, and a thread runs once)."""
        router = self._client.router
        if self._closed:
            state = "is closing" if closing else "was closed"
        elif router.thread.ident is not None and not router.is_connected:
            state = "was lost"
        else:
            return
        raise RuntimeError(
            f"this XenStore connection {state}: make a new XenStore to connect again"
        )

    def _open(self) -> None:
        self._refuse_reopening()
        router = self._client.router
        if router.thread.ident is None:  # not started: route through route_until_lost
            adopt_router(router, self._lost, name="xenstore-router")
        try:
            self._client.connect()
        except PyXSError as exc:
            # pyxs's "router died": XenStore closed the connection as it
            # was made, which is how it refuses one.
            died = router.thread.ident is not None and not router.thread.is_alive()
            message = f"cannot connect to XenStore: {_REFUSED if died else exc}"
            # pyxs's error keeps the system's only as its context: its
            # errno tells a host short of descriptors from one without
            # xenstored.
            cause = exc.__context__
            if isinstance(cause, OSError) and cause.errno is not None:
                raise ConnectionError(cause.errno, message) from exc
            raise ConnectionError(message) from exc
        with self._lock:  # with close()'s setting of _closed
            self._connected = not self._closed
        if not self._connected:
            # close() came as we connected: too early to find anything to
            # close, so ours to do.
            close_client(self._client)
            raise RuntimeError("this XenStore connection was closed as it opened")

    @property
    def connected(self) -> bool:
        """Whether requests can still be answered: False from the moment
        XenStore ends the connection (already while the requests it left
        waiting fail with ENOTCONN, before :attr:`connection_lost` is set)
        and after :meth:`close`."""
        return self._connected and bool(self._client.router.is_connected)

    def _lost(self, exc: Exception) -> None:
        self.connection_lost.set()
        with self._lock:
            waiters = list(self._waiters)
        for changed in waiters:
            changed.set()
        if self._on_lost is None:
            logger.warning("XenStore connection lost: %s", exc)
        else:
            self._on_lost(exc)

    def close(self) -> None:
        """Drop every watch, stop the watch thread, disconnect.  Once it
        returns no callback runs on the watch thread, also when another
        thread's close() did the work; except when called from a watch
        callback or from ``on_lost``, which such a close() may be waiting
        for."""
        me = threading.current_thread()
        ours = me is self._thread or me is self._client.router.thread
        # A second close() waits for the first, which may be waiting for
        # the watch or router thread; and pyxs has a close() on the watch
        # thread wait for the router thread: a close() on either thread
        # waits for neither the lock nor the watch thread.  An open() in
        # progress holds the lock too: told first that we close, it undoes
        # what it made, before we return.
        with self._lock:
            self._closed = True
        with contextlib.nullcontext() if ours else self._closing:
            with self._lock:  # with watch()'s test of it
                self._closed = True
                watches = list(self._watches.values())
                # Kept: watch() starts no other thread once _closed is set.
                thread = self._thread
            for w in watches:
                try:
                    self._unwatch(w)
                except OSError:
                    pass
            if thread is not None:
                self._monitor.events.put(None)  # wakes the watch thread up to exit
                if not ours:
                    thread.join()
            # Not only when open() said it connected: one interrupted (a
            # Ctrl-C as pyxs connected) may have started the router thread
            # and not got to say so.  Closing a client again does nothing.
            self._connected = False
            close_client(self._client)
        # wait_for() callers in other threads: their next read fails now,
        # rather than after their whole timeout; and their watches, which
        # the watch thread may no longer remove, are gone.
        with self._lock:
            waiters = list(self._waiters)
            removals = list(self._removals)
        for changed in waiters:
            changed.set()
        for removal in removals:
            removal.done.set()

    def wake_waiters(self) -> None:
        """Have every :meth:`wait_for` under way read its node again and
        test its predicate now, as a change of the node would: for a
        predicate that looks at more than the node (a flag that another
        thread sets, then wakes the waits, to give one up).  A wait whose
        predicate holds returns the node's value, as ever; the others
        wait on.  Takes this connection's lock (a plain Lock) a moment:
        not for a signal's handler or a finaliser, which may run on a
        thread that holds it."""
        with self._lock:
            waiters = list(self._waiters)
        for changed in waiters:
            changed.set()

    def __enter__(self) -> Self:
        if not self._connected:
            try:
                self.open()
            except BaseException:
                # ``with`` calls no __exit__ for an __enter__ that raised:
                # what open() started before a Ctrl-C (the router thread,
                # the socket) is closed here.  Nothing started (XenStore
                # not there yet), it stays openable, to be tried again.
                router = self._client.router
                if router.thread.ident is not None or router.is_connected:
                    self.close()
                raise
        return self

    # Domains.

    def get_domain_path(self, domid: int) -> str:
        """``/local/domain/<domid>`` as XenStore reports it."""
        path: bytes = self._ask_about(self._client.get_domain_path, domid)
        return path.decode()

    def is_domain_introduced(self, domid: int) -> bool:
        """Whether XenStore knows ``domid`` as a live domain."""
        return bool(self._ask_about(self._client.is_domain_introduced, domid))

    def _ask_about(self, query: Callable[[int], Any], domid: int) -> Any:
        """``query(domid)``, its errors as :meth:`_do`'s: a connection
        never made, or closed, is "not connected", not "lost"."""
        # pyxs sends str(domid): "1" would pass for 1, and True or None
        # reach XenStore as "True" or "None".
        domid = check_xenstore_domid(domid)
        where = f"@domain/{domid}"
        if not self._client.router.is_connected:
            raise _connection_lost(self._client.router, where, "not connected to XenStore")
        try:
            return query(domid)
        except PyXSError as exc:
            raise _oserror(exc, where) from None

    # Transactions.

    def transaction(self, fn: Callable[[Transaction], T], *,
                    attempts: int = TRANSACTION_ATTEMPTS) -> T:
        """Run ``fn(t)`` inside a transaction and commit it, re-running
        ``fn`` from scratch while the commit fails with EAGAIN (or ``fn``
        raises an :class:`OSError` EAGAIN, as a request inside a
        transaction may).

        ``fn`` must be safe to run more than once (it should only touch
        XenStore through ``t``).  Any other exception from ``fn`` aborts
        the transaction and propagates.  After ``attempts`` runs that all
        ended in EAGAIN, raises :class:`OSError` EAGAIN.  A start refused
        for the domain's quota of open transactions is tried again for up
        to :data:`TRANSACTION_QUOTA_WAIT` seconds, then ENOSPC.

        XenStore nests no transactions: a :meth:`transaction` called
        inside ``fn`` is another one, committed on its own, kept if this
        one is aborted, and run again each time ``fn`` is (pyxs refuses
        one client a second transaction, EALREADY; libxenstore's
        ``xs_transaction_start`` makes an independent one, as here).
        """
        # Before a transaction starts: calling it would only fail then,
        # with a TypeError that names no argument.
        check_callback(fn, "fn")
        # Not left to range(): 0 would report a conflict that never was.
        if type(attempts) is not int:
            raise TypeError(f"attempts must be an int, not {type(attempts).__name__}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        for _ in range(attempts):
            if not self._client.router.is_connected:
                raise ConnectionError(errno.ENOTCONN, "not connected to XenStore", "@transaction")
            client = copy.copy(self._client)  # own tx_id, shared connection
            t = Transaction(client)
            # Whatever ends the attempt early, a Ctrl-C landing as any call
            # returns included, ends the transaction too: one left open
            # counts against the domain's quota of them (10 in cxenstored)
            # for as long as the connection lives.  One whose start is
            # still in flight is ended by the router (see _begin).
            try:
                _begin_within_quota(client)
                try:
                    result = fn(t)
                finally:
                    t._ended = True
                tx_id = client.tx_id
                try:
                    committed = client.commit()
                except PyXSError as exc:
                    raise _oserror(exc, "@transaction") from None
                except BaseException:
                    # pyxs forgets the id whether the commit went or not (a
                    # Ctrl-C before it did): ended below, which XenStore
                    # refuses, harmlessly, if the commit went.
                    client.tx_id = tx_id
                    raise
            except OSError as exc:
                self._abort(client)
                if exc.errno == errno.EAGAIN:
                    continue
                raise
            except BaseException:
                self._abort(client)
                raise
            if committed:
                return result
        raise OSError(errno.EAGAIN, f"transaction still conflicting after {attempts} attempts")

    @staticmethod
    def _abort(client: pyxs.Client) -> None:
        if not client.tx_id:
            return  # none begun (or its start's reply still to come: _begin), or ended
        try:
            client.rollback()
        except PyXSError:
            pass

    # Watches.

    def watch(
        self,
        path: str,
        callback: Callable[[str], object],
        *,
        events: EventQueue | None = None,
    ) -> Watch:
        """Call ``callback(event_path)`` on every change under ``path``
        (and once right away, as XenStore fires each new watch once).

        With ``events``, calls go through that :class:`EventQueue`, so they
        are ordered with everything else queued there (a device's queue);
        without, ``callback`` runs on the watch thread and must be brief.
        ``path`` may also be ``@releaseDomain`` or ``@introduceDomain``.
        """
        return self._watch(path, callback, events, [])

    def _watch(self, path: str, callback: Callable[[str], object], events: EventQueue | None,
               into: list[Watch], *, undo: bool = True) -> Watch:
        """:meth:`watch`, the watch appended to ``into`` before it is set:
        a caller that must remove it whatever interrupts the call has it
        (a Ctrl-C as this returns would otherwise lose it to it).  Without
        ``undo``, what an exception leaves is that caller's to remove."""
        check_callback(callback)
        if events is not None and not isinstance(events, EventQueue):
            raise TypeError(f"events must be an EventQueue, not {type(events).__name__}")
        # Before the monitor and the watch thread, as the check below: a
        # path refused as the WATCH is sent would leave them made for
        # nothing to watch.
        _path(path, special=True)
        if not self._client.router.is_connected:
            # Before the watch thread is started: nobody would stop it.
            raise ConnectionError(errno.ENOTCONN, "not connected to XenStore", path)
        token = f"xb{next(self._tokens)}"
        w = Watch(self, path, token, callback, events)
        into.append(w)
        try:
            with self._lock:
                if self._closed:
                    # close() may have taken the watch thread to stop already:
                    # one started now would run for ever.
                    raise ConnectionError(errno.ENOTCONN, "not connected to XenStore", path)
                # The monitor and the thread before the watch is listed: a
                # Ctrl-C as either call returns left a watch that close()
                # could not remove (no monitor to unwatch with).
                if self._monitor is None:
                    monitor = self._client.monitor()
                    # pyxs's queue.Queue, whose put() is Python code, and
                    # wait_for() puts to it where a Ctrl-C must not land
                    # halfway (see there).
                    monitor.events = queue.SimpleQueue()
                    self._monitor = monitor
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run_watches, name="xenstore-watch", daemon=True
                    )
                    self._thread.start()
                self._watches[token] = w
            self._do(lambda p: self._monitor.watch(p, token.encode()), path, special=True)
        except BaseException as exc:
            if not undo:
                raise
            with self._lock:
                listed = self._watches.pop(token, None) is not None
            if listed and not isinstance(exc, Exception):
                # Interrupted (Ctrl-C) once the WATCH may have gone:
                # XenStore would keep it, counted against the domain's
                # quota of watches, for the life of the connection.
                # Removed there too (refused if it never got there).
                with contextlib.suppress(OSError, ValueError):
                    self._do(lambda p: self._monitor.unwatch(p, token.encode()), path,
                             special=True)
            self._unsubscribe(token)
            raise
        return w

    def _unsubscribe(self, token: str) -> None:
        # pyxs subscribes a token before it sends the WATCH, which leaves
        # the subscription of a watch refused, and its unwatch leaves the
        # token's empty list: for as long as the connection lives, one
        # more with every wait_for().  The token is ours alone.
        self._client.router.monitors.pop(token.encode(), None)

    def _unwatch(self, w: Watch) -> None:
        with self._lock:
            if self._watches.pop(w.token, None) is None:
                return
        # A pyxs request on a dead connection would wait forever for its reply.
        try:
            if self._connected and self._client.router.is_connected:
                try:
                    self._do(lambda p: self._monitor.unwatch(p, w.token.encode()), w.path,
                             special=True)
                except ConnectionError:
                    # Lost since the test above: the watch went with the
                    # connection, as it does when lost before.
                    pass
        finally:
            self._unsubscribe(w.token)

    def _run_watches(self) -> None:
        events: queue.SimpleQueue[Any] = self._monitor.events
        while True:
            event = events.get()
            if event is None:
                return
            if isinstance(event, _Removal):
                self._remove(event)
                continue
            path, token = event
            with self._lock:
                w = self._watches.get(token.decode(errors="replace"))
            if w is not None:
                w._deliver(path.decode("utf-8", errors="replace"))

    def _remove(self, removal: _Removal) -> None:
        """Remove the watches of a wait_for() that has ended, on the watch
        thread (see wait_for).  Nothing may escape, as from a watch's
        delivery: the thread would end, and with it every watch and the
        wait_for() waiting for this."""
        try:
            for w in removal.watches:
                try:
                    self._unwatch(w)
                except (OSError, ValueError) as exc:
                    # Refused if its WATCH never went (or failed): gone.
                    logger.debug("removing watch %s after wait_for(): %s", w.path, exc)
                except Exception:
                    logger.exception("removing watch %s after wait_for() failed", w.path)
        finally:
            removal.done.set()

    def wait_for(
        self,
        path: str,
        predicate: Callable[[str | None], bool] | str | int | None = None,
        *,
        timeout: float,
    ) -> str | None:
        """Wait until ``path``'s value satisfies ``predicate`` and return it.

        ``predicate`` is a function of the value (``None`` when the node is
        missing), or a string the value must equal, or an int whose decimal
        text it must equal (as :meth:`write` writes it); by default, wait
        for the node to exist.  Raises :class:`TimeoutError` saying what
        it waited for and the last value seen, and
        :class:`ConnectionError` as soon as the connection is lost or
        :meth:`close` is called.  Not from a watch callback run
        on the watch thread (one without an :class:`EventQueue`):
        :class:`RuntimeError`.  Its watch is gone from XenStore when it
        returns or raises; cut short by a Ctrl-C (a second one during
        its clean-up included), it leaves the removal to the watch
        thread, which may finish it a moment later.  The watch thread
        removes it, after the callbacks queued before: so a caller must
        not hold, while it waits, what a watch callback without an
        EventQueue waits for (the rule for such callbacks anyway: they
        are brief and block on nothing).
        """
        # Checked first: a NaN deadline is never reached nor passed, and
        # the loop below would re-read the node for ever.
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        if math.isnan(timeout):
            raise ValueError(f"timeout must be a number of seconds, not {timeout}")
        if threading.current_thread() is self._thread:
            # The change would be told by a watch, on this very thread.
            raise RuntimeError(
                "wait_for() from a watch callback run on the watch thread would never "
                "see the change: give the watch an EventQueue"
            )
        check: Callable[[str | None], bool]
        # What a timeout says was awaited: the last value alone does not
        # tell a reader which one the caller wanted.
        awaited: str
        if predicate is None:
            check, awaited = _exists, "appear"
        elif isinstance(predicate, str | int) and not isinstance(predicate, bool):
            # int(): an IntEnum's str() may be its name.
            expected = predicate if isinstance(predicate, str) else str(int(predicate))
            awaited = f"become {expected!r}"

            def check(value: str | None) -> bool:
                # Not expected.__eq__: that is NotImplemented, which is
                # true, for a missing node (None).
                return value == expected

        elif callable(predicate):
            check = predicate
            awaited = "satisfy " + _predicate_name(predicate)
        else:
            raise TypeError(f"predicate must be a function, a str, an int or None, "
                            f"not {type(predicate).__name__}")
        # Before the watch: a path that cannot be read (a special watch
        # path) must not cost a watch first.
        _path(path)
        changed = threading.Event()
        # Listed before it is set (see _watch): a Ctrl-C as the watch is
        # made must not leave it behind, firing for nobody.
        watches: list[Watch] = []
        removal = _Removal(watches)
        with self._lock:
            self._waiters.add(changed)
            self._removals.add(removal)
        deadline = time.monotonic() + timeout
        try:
            self._watch(path, lambda _p: changed.set(), None, watches, undo=False)
            while True:
                changed.clear()
                value = self.read(path)
                if check(value):
                    return value
                # In slices: in the main thread, a signal another thread
                # took runs its handler at the next one (see wait_slice).
                remaining = deadline - time.monotonic()
                while remaining > 0 and not changed.wait(wait_slice(remaining)):
                    remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{path} did not {awaited} within {timeout} s "
                        f"(last value {value!r})"
                    )
        finally:
            # The watch is removed by the watch thread, where no Ctrl-C
            # lands: here a second one (the first, or a timeout, having
            # brought us here) would leave it at XenStore, forgotten, as
            # the removal's requests went or not.  Handed over first, in
            # one C call (SimpleQueue.put): a signal's handler runs only
            # as a call returns.  Nothing to hand over without a monitor,
            # nor to wait for without a watch thread running: a watch is
            # listed only once it runs.  (A thread started later, by
            # another watch, finds nothing to do.)  close() ends the wait
            # if it stops the thread first.
            if watches and self._monitor is not None:
                self._monitor.events.put(removal)
                # Removed when we return, as callers expect of a wait
                # that is over.  A Ctrl-C here leaves it to finish.
                thread = self._thread
                if thread is not None and thread.is_alive():
                    while not removal.done.wait(wait_slice(None)):
                        pass
            with self._lock:
                self._waiters.discard(changed)
                self._removals.discard(removal)
