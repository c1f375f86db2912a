"""The socket-like class, and what the frontend keeps of each socket."""

from __future__ import annotations

import _socket
import contextlib
import errno
import functools
import io
import logging
import operator
import os
import socket
import stat
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xenback import Closing
from xenback.ring import RingError, mb, rmb

from .. import _errno
from .._wire import (
    PVCALLS_ACCEPT,
    PVCALLS_BIND,
    PVCALLS_CONNECT,
    PVCALLS_LISTEN,
    PVCALLS_POLL,
    SOCKADDR_IN_LEN,
    ffi,
    pack_sockaddr_in,
)
from ._common import (
    RECV,
    SEND,
    Deadline,
    Slot,
    bad_fd,
    held,
    host_error,
    resolve,
    taken_if_free,
    timeout_value,
)
from ._ring import DataRing

if TYPE_CHECKING:
    from ._frontend import Frontend, _Release

# One logger for the whole frontend library, as concurrent.futures has.
logger = logging.getLogger("pvcalls.frontend")

#: The range of a C int: what socket.socket.listen() takes as a backlog.
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1

#: An option value as getsockopt() with a ``buflen`` returns it.
_INT = struct.Struct("=i")

#: The errors a TCP handshake in flight meets (see PVSocket._failed_in_time),
#: as opposed to those Linux's connect() raises before it sends a SYN.
#: EHOSTUNREACH is both: a neighbour that does not answer ARP, or a
#: router's ICMP host unreachable, ends the handshake (tcp_v4_err makes
#: any unreachable in SYN_SENT fatal), and was measured so: the timed
#: connect() fails with it after ARP's 3 s, the next with ECONNABORTED; a
#: route of type unreachable fails connect() at once, before any
#: handshake, and the next starts over.  The backend's answer does not
#: say which, and the first is the one a guest meets (a host down on the
#: backend's network; the second is a rule someone wrote): counted as a
#: handshake's.  ENETUNREACH is the other way round (no route: at once,
#: the common case; a router's ICMP net unreachable, rare): not counted.
_HANDSHAKE_ERRORS = frozenset({errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH})

#: How long a readiness update's error, once logged, stays unsaid when it
#: comes back after an update that went through (see
#: PVSocket._update_ready_or_log): an error that comes and goes at every
#: event would log a line at each.
_RETELL_AFTER = 60.0

#: No error of a readiness update failing now: one object for every socket.
_NO_ERRORS: frozenset[int | None] = frozenset()

#: SOL_SOCKET options whose value every PV Calls socket has: plain ints,
#: as the kernel's getsockopt() gives them, not the socket module's enums.
_FIXED_OPTIONS = {socket.SO_TYPE: int(socket.SOCK_STREAM), socket.SO_DOMAIN: int(socket.AF_INET)}


class ReadyFd:
    """The descriptor :meth:`PVSocket.fileno` hands out, and how the socket
    sets whether it polls readable and writable.

    The two must be set independently, as a TCP socket's are: a socket
    with nothing to read and a full send buffer is neither.  An eventfd
    cannot say that (it is writable unless its counter is at its maximum,
    where it is readable too), so the descriptor is one end of a Unix
    socket pair, whose other end the socket keeps.  Readable: that end
    sends the user's end a byte, which the socket reads back to clear it.
    Writable: Linux's Unix sockets poll writable while what they sent and
    the peer has not read takes at most a quarter of their send buffer;
    the user's end sent 2 KiB once (never read), so raising its send
    buffer makes it writable and lowering it to the minimum not.  (Raising
    it wakes pollers, as a peer reading would.)  The user's end is shut
    down for writing, so that a program taking it for the connection
    (``os.sendfile`` to it, as asyncio's ``sock_sendfile`` tries first)
    fails with EPIPE instead of sending into it, and falls back to
    ``send()``.  The cost: two descriptors and a few KiB of kernel memory
    for each socket whose fileno() was asked for.
    """

    __slots__ = ("user", "ours", "readable", "writable", "_sndbuf", "_inode")

    # Charged with its overhead (skb truesize), more than a quarter of the
    # minimum send buffer (SOCK_MIN_SNDBUF, about 4.5 KiB), far less than a
    # quarter of the writable one, at least 64 KiB (what is set, doubled).
    _BALLAST = 2048
    _MIN_WRITABLE_SNDBUF = 32 * 1024

    def __init__(self, into: SocketState | None = None) -> None:
        """``into``: the state whose ``readyfd`` it is to be, set here as
        the last step, with no call after it where a signal's handler
        could run: set by the caller, a Ctrl-C as this returned dropped
        the pair for the collector to close ("unclosed socket")."""
        # Made and kept by C code (map, list.extend), where no signal's
        # handler runs, for the same reason: a Ctrl-C as socketpair()
        # returned here dropped the pair before it was in user and ours.
        # _socket's, not socket.socketpair(): that is Python code, which
        # detaches the descriptors from the pair it made to wrap them in
        # socket.socket objects, and a Ctrl-C landing as a detach()
        # returned left a descriptor that nothing would ever close.
        pair: list[tuple[_socket.socket, _socket.socket]] = []
        try:
            pair.extend(map(_socket.socketpair, (socket.AF_UNIX,)))
            user, ours = pair[0]
            user.setblocking(False)
            ours.setblocking(False)
            user.sendall(bytes(self._BALLAST))
            user.shutdown(socket.SHUT_WR)
            # Linux doubles what SO_SNDBUF is set to, and reports that: the
            # default, unless a tiny one (net.core.wmem_default) would leave
            # the descriptor never writable.
            self._sndbuf = max(user.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2,
                               self._MIN_WRITABLE_SNDBUF)
            user.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
            made = os.fstat(user.fileno())
            self._inode = (made.st_dev, made.st_ino)
        except BaseException:
            if pair:
                pair[0][0].close()
                pair[0][1].close()
            raise
        self.user, self.ours = user, ours
        self.readable = False
        self.writable = True
        if into is not None:
            into.readyfd = self

    def fileno(self) -> int:
        return self.user.fileno()

    def _check_user(self) -> None:
        """OSError EBADF unless the user's end still has its number.  The
        program may have closed it and another file taken the number: a
        regular file's said ENOTSOCK, and another socket's would have
        lost up to 16 bytes to the recv() that clears readability (or
        blocked it, that socket blocking), and had its send buffer set."""
        now = os.fstat(self.user.fileno())  # EBADF if nothing has it
        if (now.st_dev, now.st_ino) != self._inode:
            raise bad_fd()

    def set(self, readable: bool, writable: bool) -> None:
        """Make the descriptor poll as said (under the socket's _cond).
        OSError EBADF if the program closed it, whether or not another
        file took its number since.

        Each record is stored before the call that makes it true: CPython
        runs a signal's handler as a call returns, not before it starts,
        so a Ctrl-C finds record and descriptor alike.  Stored after, one
        landing as recv() returned left the record readable and the
        descriptor not, and every later set() left it so: a selector
        waited for good for the connection accept() would return.  A call
        that fails puts its record back, as before: the descriptor is as
        it was."""
        if (readable != self.readable and not readable) or writable != self.writable:
            # Before any record is stored: a Ctrl-C as it returns finds
            # both as they were.
            self._check_user()
        if readable != self.readable:
            self.readable = readable
            if readable:
                try:
                    self.ours.send(b"\0")
                except OSError as exc:
                    # Not made readable: every set() tries again.
                    self.readable = False
                    if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                        # Our end's peer is gone: the program closed it,
                        # which every set() says again, before it would
                        # touch the descriptor's number (see below).
                        raise bad_fd() from None
                    raise
            else:
                try:
                    self.user.recv(16)
                except BlockingIOError:
                    pass  # the program read it
                except OSError:
                    self.readable = True  # not cleared: tried again next time
                    raise
        if writable != self.writable:
            self.writable = writable
            try:
                self.user.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                     self._sndbuf if writable else 0)
            except OSError:
                self.writable = not writable  # not set: tried again next time
                raise

    def close(self) -> None:
        """Close both ends; OSError EBADF, once ours is closed, if the
        program closed the one fileno() gave it.  That one is then left
        alone: the file that took its number since is the program's.

        It may be taken again (a release cut short by a Ctrl-C, taken up
        again: see Frontend._close_readyfd), and goes on where it was cut
        short: an end closed (or, the program's, let go of) is not looked
        at again.  Cut short anywhere past its start, it closes ours, and
        the user's end if a check made after the interrupt passes: the
        one cut short may not have looked, or its answer was lost, and
        closed unchecked, a file of the program's that took the number
        went with it.  An end that fails that check is left for the next
        release to let go of, and to say EBADF of."""
        try:
            self._close_user()
        except OSError:
            raise  # the check's answer: the end is let go of
        except BaseException:
            self._close_user_if_checked()
            raise
        finally:
            self.ours.close()

    def _close_user(self) -> None:
        if self.user.fileno() != -1:
            try:
                self._check_user()
            except OSError:
                # Closed, the program's other file would go with it (or,
                # none there, one opened meanwhile).
                self.user.detach()
                raise
            self.user.close()

    def _close_user_if_checked(self) -> None:
        """:meth:`close`'s, cut short: the user's end closed only if its
        number passes the check now; as it was if not."""
        try:
            if self.user.fileno() != -1:
                self._check_user()
                self.user.close()
        except OSError:
            pass


def _checked(peek: Callable[[], tuple[memoryview, ...]]) -> tuple[memoryview, ...]:
    """``peek()`` of a data ring, whose indexes the backend may have broken
    (``prod - cons > size``): that is an I/O error of this socket only."""
    try:
        return peek()
    except RingError as exc:
        raise OSError(errno.EPROTO, f"the backend broke the data ring: {exc}") from None


#: The flags recv() and send() take: what the frontend does by itself.
#: The others ask for what PV Calls cannot carry (MSG_OOB's urgent data)
#: or what does not apply to a TCP stream.
_RECV_FLAGS = int(socket.MSG_PEEK | socket.MSG_DONTWAIT | socket.MSG_WAITALL)
#: MSG_NOSIGNAL: Python ignores SIGPIPE anyway; MSG_MORE is a hint that
#: more comes, which the kernel may follow or not.
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL | socket.MSG_MORE)
#: Plain ints, as the two above: the socket module's are IntFlag members,
#: whose operators cost a microsecond each, on every send() and recv().
_MSG_PEEK = int(socket.MSG_PEEK)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_MSG_WAITALL = int(socket.MSG_WAITALL)
#: What CPython's recvmsg() and recvmsg_into() say of a negative ancbufsize.
_NEGATIVE_ANCILLARY = "invalid ancillary data buffer length"


def _check_flags(flags: int, supported: int, call: str) -> int:
    """``flags`` as an int, if only ``supported`` ones are set."""
    flags = operator.index(flags)
    unsupported = flags & ~supported
    if unsupported:
        name = socket.MsgFlag(unsupported).name if unsupported > 0 else None
        allowed = socket.MsgFlag(supported).name
        raise OSError(errno.EOPNOTSUPP,
                      f"{call} flags {name or hex(unsupported)} are not supported "
                      f"over PV Calls (only {allowed})")
    return flags


def _failure(in_error: int) -> int:
    """``in_error`` if it says the connection failed (a reset, a timeout):
    0 for none, and for the peer's orderly end (-ENOTCONN)."""
    return 0 if in_error == -_errno.ENOTCONN else in_error


def _connection_error(ring: DataRing) -> int:
    """The negative errno that the connection failed with (the backend's
    out_error, or an in_error that is no orderly end), 0 if none: send()
    fails at once on it.

    An out_error of EPIPE gives way to a failure in in_error: the host
    socket reset, the backend's reader took its pending error
    (ECONNRESET) and its sender was left EPIPE, where a TCP socket's
    first call after a reset says the reset."""
    out = ring.out_error()
    failure = _failure(ring.in_error())
    if failure and out == -_errno.EPIPE:
        return failure
    return out or failure


def _copy_out(parts: tuple[memoryview, ...], dst: memoryview, nbytes: int) -> int:
    """Copy up to ``nbytes`` of a ring's readable ``parts`` into ``dst``."""
    got = 0
    for part in parts:
        n = min(len(part), nbytes - got)
        dst[got : got + n] = part[:n]
        got += n
        if got == nbytes:
            break
    return got


#: What sendfile() reads at a time: a few of send()'s ring-fulls.
_SENDFILE_CHUNK = 1 << 17


def _regular_size(file: Any) -> int | None:
    """The size of ``file`` if it is a regular file (socket.socket.sendfile()
    gives one to os.sendfile(), which sends from the offset it is given),
    else None."""
    try:
        st = os.fstat(file.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _seekable(file: Any) -> bool:
    try:
        return bool(file.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _send_view(data: bytes | bytearray | memoryview) -> memoryview:
    """``data`` as the bytes send() takes: any C-contiguous buffer, whatever
    its format and shape.  Another one is a :class:`BufferError`, as
    socket.socket's (asking for a simple buffer) says, not cast()'s
    :class:`TypeError`; no buffer at all, its TypeError."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not '{type(data).__name__}'") from None
    if not view.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return view.cast("B")


def _ssize(n: Any) -> int:
    """``n`` as CPython's socket methods take a size, a C ssize_t: so an
    int past one fails with its OverflowError, not bytearray()'s."""
    n = operator.index(n)
    if not -sys.maxsize - 1 <= n <= sys.maxsize:
        raise OverflowError("Python int too large to convert to C ssize_t")
    return n


def _writable_view(buffer: Any) -> memoryview | None:
    """``buffer`` as bytes to receive into; None if it is no writable
    C-contiguous buffer (the caller says so as CPython's call does)."""
    try:
        dst = memoryview(buffer)
    except TypeError:
        return None
    if dst.readonly or not dst.c_contiguous:
        return None
    return dst.cast("B")


class SocketState:
    """What the backend shares or knows of one :class:`PVSocket`: its id,
    data ring, pending ACCEPT, readiness descriptor and what it was made.

    The frontend's table of sockets holds these, and only a weak reference
    to the PVSocket (``owner``), so that a PVSocket the program dropped
    unclosed is garbage as a :class:`socket.socket` would be; its state
    stays behind for the frontend to release it (see
    :meth:`Frontend._collect`).

    While the PVSocket lives, the fields are under its locks, as said at
    each.  Once it is gone, no call can use them any more: they belong to
    whoever takes the state out of the frontend's table.
    """

    __slots__ = ("id", "owner", "ring", "accept_inflight", "unsent", "readyfd", "bound",
                 "listening", "connecting", "release", "close_called", "listed")

    def __init__(self, sock: PVSocket) -> None:
        self.id = sock.id
        self.owner = weakref.ref(sock)
        # Set once active: by connect() under the socket's receive and send
        # locks, or for an ACCEPT's socket before accept() hands it out.
        # Taken back by steps that call nothing (Frontend._give_back,
        # Frontend._take), so that one party gets it: by close() under
        # those locks and _cond, by a connect() refused or cut short under
        # those locks, and by the event thread under _cond alone for a
        # non-blocking connect() refused (no call uses the ring while it
        # is in flight).
        self.ring: DataRing | None = None
        # An ACCEPT in flight and the socket it offers (under _accept_lock,
        # most stores under _cond too): the listener keeps that socket.
        # accept()'s hand-over to its caller and Frontend._take clear it
        # without _cond, by stores that call nothing (no handler between
        # them and what goes with them).  A reader under _cond alone may
        # see it a moment late: accept() brings the descriptor and the POLL
        # up to date after its store, and after _take the socket is closed.
        self.accept_inflight: tuple[int, Slot, PVSocket] | None = None
        # The socket an ACCEPT being sent offers (under _accept_lock): in
        # this list before it is in the frontend's table, until the ACCEPT
        # is in flight (then accept_inflight's) or the socket dropped.  A
        # drop that a Ctrl-C cut short leaves it here, for the next
        # accept() or the listener's release to finish (Frontend._drop_unsent);
        # held nowhere else, it stayed in the table until the frontend closed.
        self.unsent: list[PVSocket] = []
        # The descriptor of fileno(), made lazily (under _cond).
        self.readyfd: ReadyFd | None = None
        self.bound = False
        self.listening = False
        # A non-blocking connect()'s CONNECT is in flight (under _cond):
        # here, not in the PVSocket, so that the warning of a socket
        # dropped meanwhile says so, as its repr did.
        self.connecting = False
        # The socket's release once claimed (see Frontend._release): set and
        # read under the frontend's _lock.  Given back (None again) without
        # the lock, by the claiming thread alone, whose RELEASE a Ctrl-C
        # stopped before it went out: taking the lock first would be a call
        # where another handler could run and leave the claim held for
        # good.  The others read it once, under the lock, and leave an
        # unsettled claim alone: a give-back racing them leaves the socket
        # to the next release, as one just after them would.
        self.release: _Release | None = None
        # The program called close(): dropped with that close() cut short,
        # the socket is no "unclosed" one (see Frontend._collect).
        self.close_called = False
        # Put in the frontend's table (under its _lock): a socket dropped
        # before then, its making cut short by a Ctrl-C, is none the
        # backend or the program had (see Frontend._collect); nor is one
        # the frontend took out again as never made (Frontend._forget).
        self.listed = False

    def describe(self, *, closed: bool) -> str:
        """The socket's repr."""
        state = "closed" if closed else "connecting" if self.connecting else (
            "active" if self.ring else
            "listening" if self.listening else "bound" if self.bound else "new")
        return f"<PVSocket id={self.id:#x} {state}>"

    def on_event(self) -> None:
        """Event thread: the data ring's port fired on the frontend's
        shared handle: wake the socket's waiters, if it still has any."""
        sock = self.owner()
        if sock is not None:
            sock._on_event()

    def on_relayed_event(self, ring: DataRing) -> None:
        """Event thread: the own handle of a ring whose readiness descriptor is
        in use fired (see :meth:`Frontend._relay`).  The event is taken
        also once the socket is gone, or the handle would stay readable
        and the thread spin until the socket's release."""
        try:
            fired = ring.consume_events()
        except OSError:
            # Closing; or failed, which its waiters and fileno() are to
            # see (and the event thread watches the ring no more).
            fired = ring.failure is not None
        sock = self.owner()
        if fired and sock is not None:
            sock._on_event()


class PVSocket(Closing):
    """A TCP/IPv4 socket whose calls go to the backend domain over PV Calls.

    Create it with :meth:`Frontend.socket`.  It supports the subset of
    :class:`socket.socket` that PV Calls can express: ``connect``, ``bind``,
    ``listen``, ``accept``, ``send``, ``sendall``, ``recv``, ``recv_into``,
    the ``sendto``, ``sendmsg``, ``recvfrom`` and ``recvmsg`` families as a
    TCP socket has them (no ancillary data), ``sendfile``, ``makefile``,
    timeouts, ``close`` and ``with`` blocks.  The flags ``MSG_PEEK``,
    ``MSG_DONTWAIT`` and ``MSG_WAITALL`` of ``recv`` and ``MSG_DONTWAIT``,
    ``MSG_NOSIGNAL`` and ``MSG_MORE`` of ``send`` work as on a TCP socket
    (the frontend does them itself); any other, such as ``MSG_OOB`` (PV
    Calls has no urgent data), fails with EOPNOTSUPP.  PV Calls carries no
    socket options: :meth:`getsockopt` knows only what the frontend
    knows itself (``SO_ERROR`` of a non-blocking :meth:`connect` above
    all), and :meth:`setsockopt` fails with ENOPROTOOPT.

    PV Calls has no shutdown and does not report addresses back, so
    ``getsockname`` returns the address given to :meth:`bind` (``("0.0.0.0",
    0)`` otherwise), ``getpeername`` the address given to :meth:`connect`,
    and :meth:`accept` returns ``("0.0.0.0", 0)`` as the peer address.
    A socket is either bound (then it may listen) or connected: CONNECT
    after BIND is refused with EINVAL, where a :class:`socket.socket`
    would connect from the bound address.

    Errors are a host socket's: :class:`OSError` with the errno the
    backend met (:class:`ConnectionRefusedError`, EADDRINUSE...; EACCES
    for a CONNECT or BIND the backend's policy refuses),
    :class:`socket.gaierror` for a host name that does not resolve,
    :class:`TimeoutError` once a timeout passes, EBADF once closed,
    ENOTCONN for every call once the backend went away (EIO once the
    frontend itself failed), and EIO for a call that would wait for a
    data ring whose event channel handle broke (one of its own that kept
    overflowing).

    A socket the program drops without closing it is released once it is
    garbage, as a :class:`socket.socket` closes itself, with a
    :class:`ResourceWarning` ``unclosed <PVSocket ...>``: its RELEASE goes
    out from a thread of the frontend's soon after, so that dropped sockets
    do not hold on to the domain's socket limit until the frontend closes.
    A listening socket is not garbage while a call waits in it, nor a
    socket while a :meth:`makefile` stream on it is open.
    """

    family = socket.AF_INET
    type = socket.SOCK_STREAM
    proto = 0

    # Take the lock if free, and say so, with no signal's handler run in
    # between (see taken_if_free): the data path's first try.
    _recv_lock_taken = taken_if_free("_try_recv_lock")
    _send_lock_taken = taken_if_free("_try_send_lock")

    def __init__(self, frontend: Frontend, sock_id: int) -> None:
        self._fe = frontend
        self.id = sock_id
        self._timeout: float | None = socket.getdefaulttimeout()
        # close() was called; the socket really closes (_closed) once no
        # makefile() stream uses it any more, as in socket.socket.
        self._close_requested = False
        self._closed = False
        self._io_refs = 0  # open makefile() streams, as in socket.socket
        # What the backend shares or knows of this socket, kept by the
        # frontend also once this object is gone: see SocketState.
        self._st = SocketState(self)
        self._sockname: tuple[str, int] = ("0.0.0.0", 0)
        self._peername: tuple[str, int] | None = None
        # A connect() gave up on its CONNECT before the answer came (its
        # timeout, a Ctrl-C, a close()): only close() is left.  Also set
        # for a moment while a connect() puts the socket back after
        # sending nothing or a refusal (see _putting_back).
        self._broken = False
        # A non-blocking or timed connect() (under _cond; its CONNECT in
        # flight is SocketState.connecting): it failed and connect() has
        # not said so yet; it succeeded and connect() has not said so yet.
        # SO_ERROR: a non-blocking one's failure errno, until a call takes
        # it (getsockopt(), connect(), or a recv() or send() that waited).
        self._connect_failed = False
        self._connect_unreported = False
        self._so_error = 0
        # The id_new of an ACCEPT in flight, until accept() returns it: the
        # listener's, not yet the caller's (not in Frontend.sockets()).
        self._offered = False
        # The connection failed (the backend's out_error, or an in_error
        # that is no orderly end) and a call raised the error (under
        # _cond): as a TCP socket reports its error once, from now on
        # recv() is at the end of the stream and send() fails with EPIPE.
        self._failure_reported = False
        # The failure was reported by the connect() that completed a
        # non-blocking or timed one (set under _cond): that leaves Linux's
        # socket unconnected, and recv() fails with ENOTCONN rather than
        # being at the end of the stream.
        self._failure_reported_by_connect = False

        # _cond guards the socket's state flags below and is what waiters
        # sleep on; the event thread takes it (after releasing the command
        # ring lock) to wake them.  Lock order: _connect_lock, then
        # _recv_lock / _send_lock / _accept_lock, then the frontend's
        # command lock, then _cond (as Frontend._want_room nests them).
        # Never call into the command ring while holding _cond.
        #
        # Blocks take it as ``with self._mutex``, never ``with self._cond``:
        # Condition's __enter__ and __exit__ are Python functions, where
        # CPython may run a signal's handler between the lock and the with
        # block (as the acquire returns, or as __exit__ starts), and a
        # KeyboardInterrupt raised there in the main thread would leave the
        # lock held for good.  A lock's own __enter__ and __exit__ are C:
        # no handler runs between them and the block.
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        # One receiver, one sender and one acceptor at a time, like the
        # kernel's socket lock; close() takes them to wait out copies from
        # the shared pages before unsharing them.  A connect() takes
        # _connect_lock, then _recv_lock and _send_lock, for all of its
        # course: a blocking connect() of another thread meanwhile waits
        # for it to end on _connect_lock alone (see _join_connect), and
        # sets out itself if it sent nothing; a non-blocking one says
        # EALREADY (see _connect_busy).
        self._connect_lock = threading.Lock()
        # The slot of the last connect() that set out (under
        # _connect_lock): whether its CONNECT went out is its ``sent``.
        self._last_connect: Slot | None = None
        self._recv_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._accept_lock = threading.Lock()
        # What reading _recv_lock_taken and _send_lock_taken calls.
        self._try_recv_lock = functools.partial(self._recv_lock.acquire, False)
        self._try_send_lock = functools.partial(self._send_lock.acquire, False)

        # Passive socket state (under _cond).
        self._poll_inflight = False
        self._poll_ready = False
        self._poll_error = 0
        # accept() took the POLL's readiness and is sending its ACCEPT: no
        # POLL may go out meanwhile (a POLL and an ACCEPT in flight together
        # get the ACCEPT -EINTR from Linux's backend and ours).
        self._accepting = False
        self._armed = False  # fileno() asked for: keep a POLL in flight
        # The errnos of failed updates of the descriptor since the last
        # that went through, and when each was last logged (under _cond;
        # see _update_ready_or_log): _NO_ERRORS and None for a socket
        # whose update never failed.
        self._ready_errors = _NO_ERRORS
        self._ready_told: dict[int | None, float] | None = None
        # A POLL or ACCEPT found no room on the command ring and would not
        # wait: not readable until the event thread says there is room.
        # Set by Frontend._want_room only, with the request to be told;
        # cleared there or by _on_room.
        self._no_room = False

        # Which callers (RECV, SEND) are polling the data ring's own event
        # channel handle (under _cond): whoever else consumes the ring's
        # event, or closes the socket, writes their wakefds to wake them.
        self._polling = [False, False]

        # Dropped unclosed, the socket is released as close() would, by the
        # frontend (see Frontend._collect), and says so with a
        # ResourceWarning, as socket.socket does.  close() detaches it.
        self._finalizer = weakref.finalize(self, frontend._collect, self._st)
        self._finalizer.atexit = False  # at exit the backend lets go of all

    # -- socket.socket API -------------------------------------------------

    def __repr__(self) -> str:
        return self._st.describe(closed=self._closed)

    def settimeout(self, value: float | None) -> None:
        """Like :meth:`socket.socket.settimeout`: ``None`` blocks, ``0``
        never blocks, a positive number of seconds bounds every call
        that waits for the peer or the network (connect(), accept(),
        recv(), send() and their kin).

        Not bind() and listen(), which socket.socket's never make wait
        (nor time out): here they wait for the backend's answer, which
        it gives at once, for up to the frontend's ``timeout`` (see
        :class:`Frontend`) whatever the socket's, non-blocking too, as
        a non-blocking accept() waits for its ACCEPT's answer.  Bounded
        by the socket's, a timed socket's bind() failed with
        :class:`TimeoutError` on a busy machine where socket.socket's
        binds, with its BIND still in flight.

        On a closed socket it fails with EBADF but sets the timeout all
        the same, as socket.socket's, which sets it before it fails to
        set its descriptor's mode."""
        self._timeout = timeout_value(value)
        self._check_open()

    def gettimeout(self) -> float | None:
        """The timeout in seconds, ``None`` if blocking, ``0.0`` if not."""
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        """``settimeout(None)`` if ``flag``, else ``settimeout(0.0)``."""
        # An integer, as socket.socket's: None or a string must not pass
        # as a truth value (setblocking(None) would make it non-blocking).
        self._timeout = None if operator.index(flag) else 0.0
        self._check_open()

    @property
    def timeout(self) -> float | None:
        """The timeout, as :meth:`gettimeout` returns it (read-only, as
        socket.socket's)."""
        return self._timeout

    def getblocking(self) -> bool:
        """False in non-blocking mode (timeout 0.0), else True."""
        return self._timeout != 0.0

    def getsockname(self) -> tuple[str, int]:
        """The address given to :meth:`bind`, ``("0.0.0.0", 0)`` before:
        PV Calls does not tell the guest the address it got."""
        self._check_open()
        return self._sockname

    def getpeername(self) -> tuple[str, int]:
        """The address given to :meth:`connect` (``("0.0.0.0", 0)`` for an
        accepted socket); :class:`OSError` ENOTCONN if not connected, or
        no longer (the connection failed: a TCP socket is closed then)."""
        self._check_open()
        ring = self._st.ring
        if self._peername is None or (ring is not None and _connection_error(ring)):
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        return self._peername

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> int | bytes:
        """The few options the frontend knows itself (SOL_SOCKET level):
        ``SO_ERROR`` (the error of a non-blocking :meth:`connect`, 0 if
        none; reading clears it; then the error of a failed connection, if
        no call said it yet), ``SO_TYPE``, ``SO_DOMAIN`` and
        ``SO_ACCEPTCONN``.  Any other fails with :class:`OSError`
        ENOPROTOOPT: PV Calls carries no socket options.  With ``buflen``,
        the value as bytes, as :meth:`socket.socket.getsockopt` gives it."""
        self._check_open()
        level, optname = operator.index(level), operator.index(optname)
        if buflen is not None:
            buflen = operator.index(buflen)
            if not 0 < buflen <= 1024:
                raise OSError("getsockopt buflen out of range")
        if level == socket.SOL_SOCKET and optname == socket.SO_ERROR:
            with self._mutex:
                value, self._so_error = self._so_error, 0
                if not value and self._connecting and self._fe._dead:
                    # The backend went away (or the frontend failed) with
                    # the CONNECT in flight: no answer will come.  fileno()
                    # polls ready (every call fails at once), and a 0 here
                    # would have select-based programs and asyncio's
                    # sock_connect() take the connect for done.
                    value = self._fe._death[0]
                ring = self._st.ring
                if (not value and ring is not None and not self._failure_reported
                        and not self._connecting):
                    # The connection's failure, unless a call said it: as
                    # a TCP socket's pending error, said once (see
                    # _failure_reported).
                    failed = _connection_error(ring)
                    if failed:
                        self._failure_reported = True
                        value = host_error(failed, "").errno or errno.EIO
        elif level == socket.SOL_SOCKET and optname in _FIXED_OPTIONS:
            value = _FIXED_OPTIONS[optname]
        elif level == socket.SOL_SOCKET and optname == socket.SO_ACCEPTCONN:
            value = int(self._st.listening)
        else:
            raise OSError(errno.ENOPROTOOPT,
                          f"{os.strerror(errno.ENOPROTOOPT)} (level {level}, option {optname}: "
                          "PV Calls carries no socket options)")
        if buflen is None:
            return value
        return _INT.pack(value)[:buflen]

    def setsockopt(self, level: int, optname: int, value: Any, optlen: int | None = None) -> None:
        """:class:`OSError` ENOPROTOOPT, as a socket says of an option it
        does not have: PV Calls carries no socket options.  The one
        exception, ``SO_REUSEADDR`` turned on, is accepted and does
        nothing: the backend binds every socket with it already (so
        servers that set it, as most do, work unchanged).  Programs that
        tolerate ENOPROTOOPT (``http.client`` for ``TCP_NODELAY``) go on."""
        self._check_open()
        level, optname = operator.index(level), operator.index(optname)
        if (level == socket.SOL_SOCKET and optname == socket.SO_REUSEADDR
                and optlen is None and isinstance(value, int) and value):
            return
        raise OSError(errno.ENOPROTOOPT,
                      f"{os.strerror(errno.ENOPROTOOPT)} (level {level}, option {optname}: "
                      "PV Calls carries no socket options)")

    def connect(self, address: tuple[str, int]) -> None:
        """Connect to ``address`` = (host, port) as seen from the backend
        domain; ``host`` is taken as :class:`socket.socket` takes it (a name
        is resolved here, IPv4 only).  Waits for the backend's answer,
        bounded by the timeout when one is set.

        In non-blocking mode it sends the CONNECT and fails with
        :class:`BlockingIOError` EINPROGRESS, as a TCP socket's does (or
        :class:`OSError` ENOBUFS if the command ring has no room: nothing
        was sent), where Linux's pvcalls-front waits whatever O_NONBLOCK
        says.  The answer completes the connect later, as the handshake
        does a TCP socket's: :meth:`fileno` polls writable once it came,
        and ``getsockopt(SOL_SOCKET, SO_ERROR)`` says how it went (0, or
        the errno, which it clears; ENOTCONN if the backend went away
        first).  Meanwhile connect() fails with EALREADY (at once, with a
        timeout too, as socket.socket's), or in blocking mode waits for the
        answer.  So it does while another thread's blocking or timed
        connect() waits for the answer to its CONNECT, and then returns
        if that one connected, or fails with EPIPE if it failed (the
        other one says why), as Linux's (ECONNABORTED after a timed one
        whose handshake failed, which leaves that to the next connect(),
        see below), or sets out itself if that one sent nothing (no room
        on the command ring in time, or a KeyboardInterrupt first).  A
        non-blocking connect() meanwhile, or while another thread's sets
        out, fails with EALREADY.  After the answer the first
        connect() returns (success) or raises the error, as Linux's
        second connect() does; later ones fail with EISCONN, or start over
        after a failure.  That is what ``select``-based programs and
        asyncio's ``loop.sock_connect()`` expect.  A connect() with a
        timeout that succeeded is followed by one more that succeeds too,
        as socket.socket's on Linux (see the comment in the code), and
        one that the handshake failed (refused, no answer) by one more
        that fails with ECONNABORTED.

        A KeyboardInterrupt once the backend's answer came leaves the
        socket as the answer says, as if connect() had returned or raised
        it: connected, or unconnected after a refusal.  (socket.socket's
        state is the kernel's then, which CPython does not specify; this
        library keeps its own, and the backend's answer is the truth.)
        Before the answer came, nobody knows: only close() is left.

        Nor does a connect() whose CONNECT went out fail because
        :meth:`fileno`'s descriptor could not be brought up to date (the
        program closed it: EBADF; ENOBUFS): it says what the backend
        answered (a non-blocking one EINPROGRESS), and the update's error
        is logged, once, and left to the next update, which tries again
        (fileno() raises it)."""
        host, port = resolve(address)
        self._check_open()
        # The mode the call was made in, as socket.socket's: a settimeout()
        # of another thread meanwhile changes the next call, not this one
        # (read again as it sets out, a blocking connect() that waited for
        # another thread's went on as a non-blocking one).
        timeout = self._timeout
        while True:
            with self._mutex:
                started = self._connecting or self._connect_failed or self._connect_unreported
            # Only in blocking mode does it wait for the answer: with a
            # timeout CPython's connect() is a non-blocking one and a wait
            # for the handshake it starts, and Linux's says EALREADY at
            # once to one made while a handshake is on.
            if started and self._finish_connect(None if timeout is not None
                                                else Deadline(None)):
                return
            if not self._handshaking():
                break
            if self._join_connect(timeout):
                return
            # The connect() it waited for sent nothing: the socket is as
            # before it, and this one sets out (or waits for, or reports,
            # one of a third thread that came first, as any connect()).
        if not self._putting_back():
            self._check_unconnected()
        lock_deadline = Deadline(timeout)
        # Non-blocking, a lock held by another thread's connect() says how
        # far that one is (see _connect_busy), not EAGAIN.
        busy = self._connect_busy if timeout == 0.0 else None
        # Let go whatever interrupts the taking (see held): a lock left
        # held keeps the ring, which close() would then leave alone.
        with (held(self._connect_lock, lock_deadline, busy),
              held(self._recv_lock, lock_deadline, busy),
              held(self._send_lock, lock_deadline, busy)):
            self._check_open()
            # Again with the locks: the connect() it waited for may have
            # left an outcome to the next one (a timed one refused), which
            # this one is.  Setting out, it connected the socket with that
            # outcome still to be told, by the connect() after, as if the
            # connected socket's connect had failed.
            if self._finish_connect(None if timeout is not None else Deadline(None)):
                return
            self._check_unconnected()
            sockaddr = pack_sockaddr_in(host, port)
            slot = Slot(PVCALLS_CONNECT, self.id)
            # Before the ring (with which _handshaking() holds): a
            # connect() that waits for this one reads it once this is
            # over, to tell whether the CONNECT went out (see _join_connect).
            self._last_connect = slot
            background = timeout == 0.0
            timed = timeout is not None  # before the tries: their handlers read it
            try:
                # In the try: a Ctrl-C as it returns must not leave the
                # socket with a ring and no CONNECT (EISCONN for ever).
                ring = self._fe._new_data_ring(self)
                if background:
                    # Before the CONNECT can go out, in the try that undoes
                    # it if it does not: from the push on, whatever
                    # interrupts this call, the answer completes the
                    # connect.  Handed over after the push, it was lost to
                    # a Ctrl-C landing in between: the socket connecting
                    # for good, its response table entry taken until the
                    # frontend closed.
                    slot.on_done = self._connect_taker(host, port)
                    with self._mutex:
                        self._st.connecting = True

                def fill(req: Any) -> None:
                    req.u.connect.id = self.id
                    ffi.memmove(req.u.connect.addr, sockaddr, len(sockaddr))
                    req.u.connect.len = SOCKADDR_IN_LEN
                    req.u.connect.flags = 0
                    req.u.connect.ref = ring.ref
                    req.u.connect.evtchn = ring.port

                # One for the wait for room on the command ring and the wait
                # for the answer together, as the timeout bounds a TCP
                # connect().
                deadline = Deadline(timeout)
                req_id = self._fe._submit(slot, fill, deadline, sock=self)
            except BaseException as exc:
                if slot.sent:
                    # Interrupted between the push and the notify, or as
                    # the submit returned (the answer perhaps in already):
                    # as after an interrupted wait (non-blocking: in
                    # flight, as it is to be, and polling so).
                    if background:
                        self._repair_ready()
                    else:
                        # As the wait's handler below, which see.
                        self._broken = True
                        try:
                            self._connect_cut_short(slot, host, port, timed=timed)
                        finally:
                            self._repair_ready()
                    raise
                # Nothing went out (no room on the command ring in time, or
                # closed meanwhile): the ring, if the socket got one, is
                # ours to free, and connect() may be tried again.
                #
                # Given up on while the ring goes back (marked by stores,
                # in which no signal's handler runs): a Ctrl-C landing as
                # the giving back started left the ring with no peer and
                # no mark, which is what a handshake looks like (neither
                # readable nor writable, for good, and EISCONN).  Given up
                # on, the socket is good for close() and polls so.  Only
                # the move (see _give_back) under the mark: one landing in
                # the return to the pool leaves the socket unconnected.
                self._broken = True
                try:
                    self._fe._give_back(self._st, reusable=True)
                    self._broken = False
                    self._fe._return_rings()
                finally:
                    # Connecting no longer whatever cuts the above short,
                    # by a store (no call, where a Ctrl-C could land before
                    # it): with nothing sent no answer comes to end it, and
                    # left set, the socket said EALREADY and polled neither
                    # way for good.  Only once the ring is back or the
                    # socket given up on: cleared before, one landing in
                    # between left a ring with no peer and no mark.
                    if background:
                        with self._mutex:
                            self._st.connecting = False
                            # A connect() of another thread may wait for
                            # the answer to this one (_await_connect_answer):
                            # none comes.  Woken once the socket is
                            # unconnected (or given up on), it goes on from
                            # there.
                            self._cond.notify_all()
                    # Unconnected again, readable and writable (or given
                    # up on, writable): a fileno() of another thread
                    # meanwhile made the descriptor poll as the socket
                    # with its ring, in its handshake, neither way, and a
                    # selector waited for good.
                    self._repair_ready()
                if isinstance(exc, BlockingIOError):
                    # Non-blocking, no room on the command ring.  Not EAGAIN
                    # (Linux's frontend's): asyncio's sock_connect() and
                    # select-based programs read a BlockingIOError from
                    # connect() as EINPROGRESS, wait for fileno() to poll
                    # writable (it does: send() fails at once) and took
                    # SO_ERROR's 0 for a connect that was never sent.
                    raise OSError(errno.ENOBUFS, "the command ring is full: nothing was "
                                  "sent (too many commands in flight)") from None
                raise
            if background:
                try:
                    # Neither readable nor writable until the answer.  The
                    # update's error raised said the connect() failed
                    # (ENOBUFS: that nothing was sent) with its CONNECT in
                    # flight, whose answer connects the socket.
                    self._update_ready_or_log()
                except BaseException:
                    # Left as it was, the unconnected socket's readable and
                    # writable, a loop called recv() over and over for as
                    # long as the handshake took.
                    self._repair_ready()
                    raise
                raise BlockingIOError(errno.EINPROGRESS, os.strerror(errno.EINPROGRESS))
            try:
                # Neither readable nor writable until the answer, as a TCP
                # socket in its handshake (see _handshaking), also for a
                # selector that registered the socket before.  Only once
                # the CONNECT is out, as a non-blocking connect() does:
                # made so before, the descriptor would be for a handler to
                # put back when nothing went out (no room on the command
                # ring in time), which a Ctrl-C could cut short in turn.
                # Raised, the update's error gave up on a CONNECT that
                # went out, whose answer connects the socket.
                self._update_ready_or_log()
                # With the socket: close() must not wait (holding on to
                # this call's locks) for an answer the backend may never send.
                ret = self._fe._wait_slot(req_id, slot, deadline, self)
                if ret < 0:
                    if timed:
                        # In the try, as the ring's giving back: whatever
                        # interrupts the report, the socket is left as the
                        # raise below leaves it.
                        self._failed_in_time(host_error(ret, "connect").errno)
                    # The backend has let go of the ring and the id is a new
                    # socket again (as in Linux's backend): free the ring, so
                    # that connect() may be tried again.
                    self._fe._put_data_ring(self._st, reusable=True)
                    # Unconnected: readable and writable again, whatever
                    # a fileno() made of the socket with its ring meanwhile.
                    # Raised, the update's error replaced the refusal.
                    self._update_ready_or_log()
            except BaseException:
                # Given up on first, by a store (no signal's handler runs
                # in it), unless _connect_cut_short finds the answer in;
                # and the descriptor brought up to date whatever cuts that
                # short (a Ctrl-C landing as the handling of a timeout
                # starts): writable, send() failing at once.  Left to
                # _connect_cut_short alone, such a Ctrl-C left the socket
                # neither connected nor given up on, polling as in its
                # handshake, neither way, for good.
                self._broken = True
                try:
                    self._connect_cut_short(slot, host, port, timed=timed)
                finally:
                    self._repair_ready()
                raise
            if self._closed:
                # close() from another thread: its RELEASE may have cut the
                # CONNECT short (-EINTR), but what happened is EBADF.
                raise bad_fd()
            if ret < 0:
                raise host_error(ret, f"connect to {host}:{port}")
            self._peername = (host, port)
            try:
                if timed:
                    # CPython connects with a timeout by a non-blocking
                    # connect() and a wait for the handshake, after which
                    # Linux still has the socket connecting: the next
                    # connect() succeeds once more, as after a non-blocking
                    # connect() here.
                    with self._mutex:
                        self._connect_unreported = True
                # Readable no longer, as it was unconnected: it polls as the
                # ring says from now on (and as the ring's events come).
                # Raised, the update's error told the program the socket
                # was not connected, which then closed or connected again
                # a connected socket (as send()'s and recv()'s bytes: see
                # there).
                self._update_ready_or_log()
            except BaseException:
                # A Ctrl-C before the update left the descriptor readable,
                # while recv() would block, until data came.
                self._repair_ready()
                raise

    def _join_connect(self, timeout: float | None) -> bool:
        """connect() while another thread's blocking or timed connect()
        waits for its CONNECT's answer: what Linux's connect() does on a
        socket in SS_CONNECTING whose handshake another thread waits for.
        With a timeout (CPython's connect() is a non-blocking one then) or
        in non-blocking mode, fail with EALREADY at once.  In blocking
        mode wait for that connect() to end and report its outcome:
        return True if it connected; if it failed, EPIPE (the other reports
        the error, as on Linux one of the two threads does and the other
        says EPIPE), or ECONNABORTED if it was a timed one whose handshake
        failed (the report that connect() leaves to the next one);
        EISCONN if it was cut short (the socket is given up on: see
        connect()); EBADF if the socket was closed meanwhile.

        False if it sent nothing (no room on the command ring in time, or
        a Ctrl-C before the CONNECT went out) and left the socket as it
        was, unconnected: the caller sets out itself, as Linux's connect()
        does on a socket whose connect() failed before any handshake.  Its
        failure is that call's, not the socket's."""
        if timeout is not None:
            raise OSError(errno.EALREADY, os.strerror(errno.EALREADY) + " (connecting)")
        # Held for the whole of a connect(): free once the other one is
        # over, whatever ended it.  Not the receive lock, which a recv()
        # waiting for data may take first once the socket is connected.
        with held(self._connect_lock, Deadline(None)):
            self._check_open()
            if self._fe._dead:
                raise self._fe._gone()
            with self._mutex:
                started = self._connecting or self._connect_failed or self._connect_unreported
                if not started:
                    # Told under the lock: let go first, a connect() of a
                    # third thread could make the socket its own (a ring, no
                    # peer yet), and this one report that one's (EISCONN)
                    # rather than the one it waited for.  The last
                    # connect() is the one it waited for (the lock is held
                    # for the whole of one), or one that came before it
                    # here and is over too.
                    last = self._last_connect
                    if ((last is None or not last.sent) and self._st.ring is None
                            and not self._broken):
                        return False
                    self._joined_outcome()
                    return True
            # A timed connect() leaves its outcome to the next one (see
            # connect()), and a non-blocking one in flight its answer to
            # come: that is this one's to report.  Free of the lock while
            # it waits, so that none of the socket's connect() waits
            # behind it.
        return self._finish_connect(Deadline(None), joined=True)

    def _joined_outcome(self) -> None:
        """Under _cond: how the connect() that :meth:`_join_connect` waited
        for ended, once nothing of it is left to report: return if
        connected, else EPIPE (EISCONN if it was cut short, EBADF once the
        socket is closed).  A ring with no peer is a later connect()'s,
        in its handshake: a connect() sets out only on a socket left
        unconnected, so the one waited for failed."""
        self._check_open()
        if self._st.ring is not None and self._peername is not None and not self._broken:
            return  # connected, as Linux's reports to every thread that waited
        if not self._handshaking():
            self._check_unconnected()
        raise OSError(errno.EPIPE, os.strerror(errno.EPIPE)
                      + " (the connect() of another thread failed)")

    def _connect_busy(self) -> OSError:
        """What a non-blocking connect() raises when a lock it takes is
        held: what Linux's says once its socket lock, which it waits for
        whatever O_NONBLOCK says, is free.  The holder is another thread's
        connect() (or one that waited for another, looking how that one
        ended), or close(), or briefly a recv() or send().  EBADF once
        closed; EISCONN once connected or given up on (not by the mark a
        connect() puts the socket back under: see _putting_back); else
        EALREADY: a connect() is under way, setting out (Linux's would
        find it in SS_CONNECTING) or putting the socket back after a
        failure (Linux's would set out itself: EINPROGRESS).
        A non-blocking call waits for no lock of the socket, however
        briefly it is held, so the second reads as the first; the
        connect() after it tells (EINPROGRESS, having set out).  Not
        EAGAIN: a TCP connect() says that for no free local port."""
        if self._closed:
            return bad_fd()
        if not self._handshaking() and not self._connecting and not self._putting_back():
            try:
                self._check_unconnected()
            except OSError as exc:
                return exc
        return OSError(errno.EALREADY, os.strerror(errno.EALREADY)
                       + " (a connect() of another thread is under way)")

    def _putting_back(self) -> bool:
        """Whether the socket's given-up-on mark may be a connect()'s for
        the moment: the last connect() sent nothing, or its CONNECT was
        refused, and it marks the socket given up on while it gives the
        ring back (see connect() and _connect_cut_short), taking the mark
        back after.  Looked at without its locks by a connect() of
        another thread, which then takes them and asks the socket
        (EISCONN if a Ctrl-C left the mark for good), or, non-blocking,
        says EALREADY (see _connect_busy).  Taken for given up on, the
        socket being put back unconnected said EISCONN."""
        last = self._last_connect
        return (self._broken and last is not None
                and (not last.sent or (last.done and last.ret < 0)))

    def _connect_cut_short(self, slot: Slot, host: str, port: int, *, timed: bool) -> None:
        """A blocking connect()'s CONNECT went out and the call was cut
        short (a Ctrl-C, its timeout, a close()): leave the socket as the
        answer, if it came, says.  Under the receive and send locks.

        Also from the submit's handler: the answer may be in before the
        submit returns (a fast backend, or one that answered as the notify
        went out), and taken there for an answer unknown, a connected
        socket was marked broken and a refused one kept its ring.

        The caller has marked the socket broken, given up on, and brings
        its descriptor up to date after this (see connect()): an answer
        that is in takes the mark back."""
        if slot.done and slot.ret < 0:
            # Refused, the report cut short (a Ctrl-C as the wait
            # returned, or in the giving back): as if reported.
            # Taken for an answer unknown, the socket kept a ring
            # the backend had let go of, and connect() said
            # EISCONN for good.  Given up on until the ring is back:
            # taken back before, a Ctrl-C landing in between left the
            # ring with no peer, polling as in its handshake, neither
            # way, for good.  Only the move (see _give_back) under the
            # mark: one landing as it returns leaves the socket given up
            # on, good only for close(), as when the answer is unknown;
            # one in the return to the pool, unconnected.
            self._fe._abandon(slot.req_id, slot)  # the entry, if the wait kept it
            self._fe._give_back(self._st, reusable=True)
            self._broken = False
            self._fe._return_rings()
            if timed and not self._closed:
                self._failed_in_time(host_error(slot.ret, "connect").errno)  # as connect()'s raise
            self._repair_ready()  # as connect()'s raise
        elif slot.done and not self._closed:
            # Connected, the report cut short: the backend's answer
            # is the truth, and the socket is left as a return
            # leaves it (stores first, which call nothing).  Where
            # socket.socket's state after a KeyboardInterrupt is
            # the kernel's, this library keeps its own: marked
            # broken, a connected socket could only be closed.
            self._broken = False
            self._peername = (host, port)
            if timed:
                with self._mutex:
                    self._connect_unreported = True  # as connect()'s return
            self._fe._abandon(slot.req_id, slot)  # the entry, if the wait kept it
            self._repair_ready()  # as connect()'s return
        else:
            self._abandon_connect(slot)

    def _failed_in_time(self, err: int | None) -> None:
        """A connect() with a timeout failed with ``err``.  CPython made
        it a non-blocking connect, and an error the handshake met (a
        refusal, no answer) it took from SO_ERROR, which leaves Linux's
        socket connecting (as after a success, see connect()): the next
        connect() finds the attempt over with no error to say, fails
        with ECONNABORTED and starts over at the one after; meanwhile
        the socket polls readable and writable.  That is a failed
        non-blocking connect whose SO_ERROR was read.  Other errors
        (the policy's EACCES, no route) Linux's connect() raises before
        any handshake, leaving the socket unconnected.  The caller brings
        the descriptor up to date, as after any refusal."""
        if err not in _HANDSHAKE_ERRORS:
            return
        with self._mutex:
            self._connect_failed = True

    def _abandon_connect(self, slot: Slot) -> None:
        """connect() gives up on its CONNECT, sent: the answer still comes;
        nobody will read it.  Like Linux, keep the ring until RELEASE.  Not
        only on a timeout: after an interrupt (Ctrl-C in the main thread's
        wait, or between the push and the notify) nobody knows either
        whether the socket will be connected, and a recv() on the ring
        would wait for data that may never come.  (Closed or frontend
        gone: only close() was left anyway.)  Under the receive and send
        locks."""
        self._broken = True  # already, by the caller: see connect()
        self._fe._abandon(slot.req_id, slot)

    def _connect_taker(self, host: str, port: int) -> Callable[[int], None]:
        """What takes a non-blocking connect()'s answer (its slot's
        ``on_done``): the event thread calls it whenever the answer comes,
        and it completes the connect (:meth:`_connect_answered`)."""
        # The answer may never come (a silent peer), so the callback holds
        # the socket weakly: dropped unclosed meanwhile, it is garbage at
        # once, as any socket, and released.  Its RELEASE cuts the CONNECT
        # short (and owns the ring); the answer, -EINTR then, or the
        # peer's if it came first, only frees its response table entry.
        owner = self._st.owner

        def answered(ret: int) -> None:
            sock = owner()
            if sock is not None:
                sock._connect_answered(host, port, ret)

        return answered

    def _connect_answered(self, host: str, port: int, ret: int) -> None:
        """The backend answered a non-blocking connect()'s CONNECT: called
        by the event thread (never in the main thread, where a Ctrl-C
        could cut it short).

        A refused CONNECT gives the ring back here, not in a call of the
        socket: none of them uses the ring while the connect is in flight
        (:meth:`_active_ring` waits for its end), and close() takes the
        ring under ``_cond`` as this does, so exactly one of the two frees
        it.  Once the socket is closed its RELEASE owns the ring."""
        with self._mutex:
            self._st.connecting = False
            if not self._closed:
                if ret < 0:
                    # The backend let go of the ring; the id is a new
                    # socket again (as after a blocking connect() failed).
                    self._so_error = host_error(ret, "connect").errno or errno.EIO
                    self._connect_failed = True
                    # Only moved under _cond, the lock order's last.
                    self._fe._give_back(self._st, reusable=True)
                else:
                    self._peername = (host, port)
                    self._connect_unreported = True
            self._cond.notify_all()
        self._fe._return_rings()
        # Logged as the event thread's other updates: raised, it went to
        # Frontend._complete, which took it for a bug of the frontend's.
        self._update_ready_or_log()

    def _finish_connect(self, deadline: Deadline | None, *, joined: bool = False) -> bool:
        """connect() after a non-blocking one: what Linux's connect()
        does on a socket in SS_CONNECTING.  EALREADY while the CONNECT is
        in flight (with a ``deadline``: wait for it); then return True once
        if it succeeded, or raise its error (ECONNABORTED if SO_ERROR took
        it) once if it failed, leaving the socket unconnected.  If it
        succeeded but the connection has failed since (a reset), raise
        that (ECONNABORTED if a call reported it already), as Linux's
        connect() finding the socket closed does.  False if another
        thread's connect() took the outcome meanwhile: this one is a
        connect() as on any socket.  ``joined``: this one waited for
        another thread's (see _join_connect), and reports how that one
        ended then (:meth:`_joined_outcome`), under _cond where it found
        the outcome taken: looked at later, a third thread's connect()
        may have set out meanwhile, and its handshake was reported as
        this one's (EISCONN)."""
        with self._mutex:
            self._await_connect_answer(deadline, errno.EALREADY)
            if self._connect_unreported:
                self._connect_unreported = False
                ring = self._st.ring
                failed = _connection_error(ring) if ring is not None else 0
                if not failed:
                    return True
                first, self._failure_reported = not self._failure_reported, True
                self._failure_reported_by_connect = True
                if first:
                    raise host_error(failed, "connect")
                raise OSError(errno.ECONNABORTED, os.strerror(errno.ECONNABORTED))
            if self._connect_failed:
                self._connect_failed = False
                err, self._so_error = self._so_error, 0
                err = err or errno.ECONNABORTED
                raise OSError(err, os.strerror(err))
            if joined:
                self._joined_outcome()
                return True
        return False

    def _await_connect_answer(self, deadline: Deadline | None, would_block: int) -> None:
        """Under _cond: wait within ``deadline`` (None: not at all) for a
        non-blocking connect()'s answer, if it is in flight.  Raises
        ``would_block`` (an errno that reads as BlockingIOError) when not
        to wait, EBADF once the socket is closed, and the frontend's error
        once the backend is gone."""
        while self._connecting and not self._closed and not self._fe._dead:
            if deadline is None or deadline.timeout == 0.0:
                raise OSError(would_block, os.strerror(would_block) + " (connecting)")
            # Bounded also with no limit, and the flags looked at again: a
            # wake-up of a main thread's call (a non-blocking connect()
            # that sent nothing, close()) is lost to a Ctrl-C landing as
            # its notify_all() starts, and this slept until the socket
            # closed, the connect it waited for long over.
            self._cond.wait(deadline.recheck())
        self._check_open()
        if self._connecting:
            raise self._fe._gone()

    def _check_unconnected(self) -> None:
        if self._st.ring is not None or self._st.listening or self._broken:
            raise OSError(errno.EISCONN, "socket is already connected or in use")

    def connect_ex(self, address: tuple[str, int]) -> int:
        """Like :meth:`connect` but return an errno instead of raising."""
        # Checked (and a name resolved) here, to be refused as
        # connect_ex() is; connect() takes the numeric address as it is.
        address = resolve(address, "connect_ex")
        try:
            self.connect(address)
        except TimeoutError as exc:
            if exc.errno is not None:
                # The backend's ETIMEDOUT, not this call's timeout (which
                # has no errno, as socket.socket's).
                return exc.errno
            return errno.EAGAIN  # as socket.socket.connect_ex on a timeout
        except (socket.gaierror, socket.herror):
            # Resolving the name failed, not the connect: raised, as by
            # socket.socket's (a gaierror's errno is an EAI_* code).
            raise
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def bind(self, address: tuple[str, int]) -> None:
        """Bind to ``address`` in the backend domain (port 0 lets the
        backend's host pick one; PV Calls cannot tell the guest which).
        Waits for the answer up to the frontend's ``timeout``, whatever
        the socket's (see :meth:`settimeout`); another thread's close()
        ends the wait (EBADF)."""
        host, port = resolve(address, "bind")
        self._check_open()
        if self._st.ring is not None or self._st.bound or self._broken:
            raise OSError(errno.EINVAL, "socket is already bound or connected")
        sockaddr = pack_sockaddr_in(host, port)

        def fill(req: Any) -> None:
            req.u.bind.id = self.id
            ffi.memmove(req.u.bind.addr, sockaddr, len(sockaddr))
            req.u.bind.len = SOCKADDR_IN_LEN

        # With the socket: another thread's close() ends the wait (EBADF),
        # as a recv()'s; the answer that comes later frees its entry, and
        # marks nothing on a closed socket (see _on_success).
        ret = self._fe._call(PVCALLS_BIND, self.id, fill, Deadline(self._fe.timeout), self,
                             on_done=self._on_success(functools.partial(
                                 PVSocket._bound, host=host, port=port)))
        if ret < 0:
            raise host_error(ret, f"bind to {host}:{port}")
        self._bound(host, port)

    def _on_success(self, mark: Callable[[PVSocket], None]) -> Callable[[int], None]:
        """What marks what the backend made of this socket (bound,
        listening) as its answer to BIND or LISTEN comes: a slot's
        ``on_done``, called by the event thread, whatever became of the
        call that sent it.  The call marks it too, as the event thread may
        not have yet when it wakes.  Left to the call alone, a Ctrl-C
        landing as its wait returned lost the mark: the socket bound or
        listening in the backend, and listen() or accept() refused here.
        It holds the socket weakly, as a non-blocking connect()'s taker
        does (the answer may never come)."""
        owner = self._st.owner

        def answered(ret: int) -> None:
            sock = owner()
            if ret >= 0 and sock is not None and not sock._closed:
                mark(sock)

        return answered

    def _bound(self, host: str, port: int) -> None:
        """The backend bound this socket to (host, port).

        A failed non-blocking or timed connect() that connect() has not
        reported yet stays to be reported: Linux's socket is still
        connecting (SS_CONNECTING) then, which bind() does not change
        (the failed handshake let go of its port), and listen() fails
        with EINVAL until connect() has said ECONNABORTED (or the error
        SO_ERROR did not take).  Ended here, the socket listened where
        Linux's refuses to.  (After that report Linux 6.18's listen()
        still fails, for good, as after any refused connect(); this one
        listens: see the module's notes.)"""
        self._st.bound = True
        self._sockname = (host, port)

    def listen(self, backlog: int | None = None) -> None:
        """Start listening; ``backlog`` defaults to ``min(128, SOMAXCONN)``
        as in :meth:`socket.socket.listen`.  Another thread's close()
        ends its wait for the answer (EBADF), as bind()'s."""
        if backlog is None:
            backlog = min(128, socket.SOMAXCONN)
        # Checked as socket.socket checks it (a C int): int() would take
        # "5" and 1.5, and a backlog past 2**32 would be cut to its low bits.
        backlog = operator.index(backlog)
        if not _INT_MIN <= backlog <= _INT_MAX:
            raise OverflowError(f"backlog {backlog} does not fit a C int")
        backlog = max(0, backlog)  # as Linux's listen()
        self._check_open()
        if self._st.ring is not None or self._broken:
            # Connected (or connecting): EINVAL, as socket.socket's and as
            # bind() here.  Not the EOPNOTSUPP below, which asks for a
            # bind() that would be refused too.
            raise OSError(errno.EINVAL, "listen() on a connected socket")
        if self._connect_failed:
            # Still connecting, for Linux (see _bound): EINVAL, also
            # before bind().  It polls readable and writable meanwhile.
            raise OSError(errno.EINVAL, "listen() on a socket whose failed connect() "
                          "was not reported by connect() yet")
        if not self._st.bound:
            # Linux's frontend: listen before bind is EOPNOTSUPP.
            raise OSError(errno.EOPNOTSUPP, "listen() needs bind() first over PV Calls")

        def fill(req: Any) -> None:
            req.u.listen.id = self.id
            req.u.listen.backlog = backlog

        # With the socket, as bind()'s.
        ret = self._fe._call(PVCALLS_LISTEN, self.id, fill, Deadline(self._fe.timeout), self,
                             on_done=self._on_success(PVSocket._listening))
        if ret < 0:
            raise host_error(ret, "listen")
        self._listening()

    def _listening(self) -> None:
        """The backend has this socket listening.  Also from the event
        thread (see _on_success): the POLL that fileno() needs never waits
        for room (see _arm_poll)."""
        self._st.listening = True
        if self._armed:
            self._arm_poll()
            # A listener is not writable.  Its error is neither the event
            # thread's nor that of listen(), which did what it was to.
            self._update_ready_or_log()

    def accept(self) -> tuple[PVSocket, tuple[str, int]]:
        """Wait for a connection: POLL until one is pending, then ACCEPT.

        Returns ``(socket, ("0.0.0.0", 0))``: PV Calls does not carry the
        peer address.  On timeout the POLL or ACCEPT stays in flight and the
        next call picks it up, so no connection is lost.

        Non-blocking, it fails with :class:`BlockingIOError` unless a POLL
        has said a connection is pending (what makes :meth:`fileno`
        readable).  Then it sends the ACCEPT and waits for its answer,
        which the backend gives at once, up to the frontend's ``timeout``
        (as a non-blocking :meth:`connect` waits for CONNECT's): after
        select() said readable, accept() returns the connection, as
        socket.socket's does.  Linux's frontend returns -EAGAIN there
        instead, and a second call after the answer gets the connection;
        the requests on the wire are the same.  An ACCEPT still unanswered
        after that time (or left by a call that timed out) stays in flight
        for the next call, as on a timeout.

        A :meth:`fileno` descriptor that cannot be brought up to date (the
        program closed it; ENOBUFS) is logged, as in :meth:`connect`, and
        keeps no connection from the caller.
        """
        deadline = Deadline(self._timeout)
        # Within the timeout, as socket.socket's: another thread may be
        # blocked in accept() with the lock.
        with held(self._accept_lock, deadline):
            self._check_open()
            if not self._st.listening:
                raise OSError(errno.EINVAL, "accept() on a socket that is not listening")
            answer_by = deadline
            if self._st.accept_inflight is None:
                self._wait_pending_connection(deadline)
                self._start_accept(deadline)
                if deadline.timeout == 0.0:
                    # A connection is pending, and its ACCEPT just went
                    # out: its answer is no wait on the network (see above).
                    answer_by = Deadline(self._fe.timeout)
            assert self._st.accept_inflight is not None
            req_id, slot, new = self._st.accept_inflight
            try:
                # Interrupted as it returns, it gives the same answer to
                # the next accept(), which finds the ACCEPT still here.
                ret = self._fe._wait_slot(req_id, slot, answer_by, self)
            except TimeoutError:
                if answer_by is deadline:
                    raise
                # The socket is non-blocking: "would block", not a timeout
                # it never set; the ACCEPT stays in flight.
                raise BlockingIOError(errno.EAGAIN, "operation would block") from None
            if ret < 0:
                # The backend did not take the new id: free it without
                # RELEASE.  The ACCEPT stays the listener's until the
                # socket is gone (_drop_socket may be taken again): a
                # Ctrl-C landing in the drop leaves it to the next
                # accept(), which gives the same answer and drops what is
                # left, or to the listener's release (_end_accept).  Let
                # go of first, it was in no hands but this call's, and
                # stayed in the frontend's table, its ring with it, until
                # the frontend closed.
                self._fe._drop_socket(new, reusable=True)
                refused = self._st.accept_inflight
                try:
                    with self._mutex:
                        self._st.accept_inflight = None
                    # fileno() needs a POLL in flight again, as after an
                    # ACCEPT that succeeded: without one, a selector's
                    # descriptor, once brought up to date, polled neither
                    # way for good.  The update's error is not the
                    # refusal's (see below).
                    if self._armed:
                        self._arm_poll()
                    self._update_ready_or_log()
                except BaseException:
                    # The refusal back, for the next accept() to report
                    # (its drop done): the POLL cut short goes out then.
                    with self._mutex:
                        self._st.accept_inflight = refused
                    self._repair_ready()
                    raise
                if self._closed:
                    # close() from another thread: its RELEASE may have cut
                    # the ACCEPT short (-EINTR), but what happened is EBADF.
                    raise bad_fd()
                raise host_error(ret, "accept")
            new._peername = ("0.0.0.0", 0)
            new._timeout = socket.getdefaulttimeout()
            # Handed to the caller by stores that call nothing (no handler
            # runs between them), and given back to accept_inflight, for
            # the next accept(), if what follows is interrupted: under the
            # lock, so that no other accept() sent an ACCEPT of its own
            # meanwhile.  Only a Ctrl-C landing as held() lets go of the
            # lock or as this returns loses the connection, as one in
            # socket.socket.accept() after its _accept() does: the socket
            # is released as one dropped unclosed.
            new._offered = False
            self._st.accept_inflight = None
            try:
                if self._armed:
                    self._arm_poll()
                # Logged, not raised: the connection is the caller's.
                # Raised, it went back for the next accept(), whose update
                # failed again (EBADF once the program closed the
                # descriptor): every accept() failed, none handed it over.
                self._update_ready_or_log()
            except BaseException:
                new._offered = True
                with self._mutex:
                    self._st.accept_inflight = (req_id, slot, new)
                self._repair_ready()
                raise
        return new, ("0.0.0.0", 0)

    def _start_accept(self, deadline: Deadline) -> None:
        """Take the readiness of the POLL that said a connection is pending
        (Linux's POLL_RET bit) and send the ACCEPT for it (under
        _accept_lock), waiting for room on the command ring until
        ``deadline``.  If it cannot be sent, the connection is still
        pending: the next accept() takes it.

        Whatever interrupts it, a Ctrl-C included, the readiness is taken
        only in the try that gives it back, and the socket the ACCEPT
        offers is in the listener's ``unsent`` before it is in the
        frontend's table: either the ACCEPT is in flight, or the readiness
        is back and the new socket gone (or left in ``unsent``, for the
        next accept() or the listener's release to drop).  A readiness
        taken by the caller and interrupted before this try was lost with
        ``_accepting`` left set: no POLL went out any more, and every later
        accept() waited for good."""
        slot = Slot(PVCALLS_ACCEPT, self.id)
        self._fe._drop_unsent(self._st)  # what a Ctrl-C left of the last one
        made = self._st.unsent
        took = False
        try:
            with self._mutex:
                self._poll_ready = False
                self._accepting = took = True
            # Its error, logged, does not keep the ACCEPT from going out
            # (as the hand-over's: see accept()).
            self._update_ready_or_log()
            new = self._fe._new_socket(offered=True, into=made)
            ring = self._fe._new_data_ring(new)

            def fill(req: Any) -> None:
                req.u.accept.id = self.id
                req.u.accept.id_new = new.id
                req.u.accept.ref = ring.ref
                req.u.accept.evtchn = ring.port

            self._fe._submit(slot, fill, deadline, sock=self)
        except BaseException as exc:
            if slot.sent:
                raise  # in flight all the same (below)
            # Nothing went out.  The readiness back first, by stores that
            # call nothing: behind the drop, a Ctrl-C landing in that left
            # _accepting set, no POLL went out any more, and every later
            # accept() waited for good.
            if took:
                try:
                    with self._mutex:
                        self._accepting = False
                        self._poll_ready = True
                    if isinstance(exc, BlockingIOError):
                        self._room_later()  # non-blocking: readable again once there is room
                    self._repair_ready()
                except BaseException:
                    # Come here by a failed send, a Ctrl-C landing in the
                    # lines above is the first to cut them short: it left
                    # the descriptor unreadable, as the try had made it,
                    # with the connection pending again, and a selector
                    # waited for good.  One that skipped _room_later
                    # leaves it readable: a non-blocking accept() finds
                    # no room once more, and says so then.
                    self._repair_ready()
                    raise
            # The new socket goes, without RELEASE; cut short, it stays
            # in ``made`` for the next caller.
            self._fe._drop_unsent(self._st)
            raise
        finally:
            if slot.sent:
                # Also when interrupted between the push and the notify:
                # in flight, as after an interrupted wait for the answer,
                # which the next accept() takes.
                with self._mutex:
                    self._st.accept_inflight = (slot.req_id, slot, made[0])
                    self._accepting = False
                    del made[:]

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Copy ``data`` into the out ring and return how many bytes were
        sent.  In blocking mode all of it, waiting for room as often as
        needed, as a blocking TCP socket's send() does (fewer only if an
        error came after some went: the connection failed, the socket was
        closed or the frontend died meanwhile, which the next call says);
        with a timeout, or non-blocking, as much as fits once there is
        room.  A :meth:`fileno` descriptor that cannot be brought up to
        date (the program closed it; ENOBUFS) is logged, as in
        :meth:`connect`, and cuts no call short."""
        flags = _check_flags(flags, _SEND_FLAGS, "send")
        view = _send_view(data)
        timeout = self._call_timeout(flags)
        return self._send(view, Deadline(timeout), len(view) if timeout is None else 1)

    def _call_timeout(self, flags: int) -> float | None:
        """The timeout of one call with ``flags``: MSG_DONTWAIT makes it
        non-blocking, as on a TCP socket, but only in blocking mode: with
        a timeout, socket.socket waits for readiness before it calls the
        kernel, whatever the flags say (and times out)."""
        if flags & _MSG_DONTWAIT and self._timeout is None:
            return 0.0
        return self._timeout

    def _send(self, view: memoryview, deadline: Deadline, want: int = 1) -> int:
        """Send ``view``: return once ``want`` bytes of it went into the
        out ring (fewer if an error came after some: the next call says
        it), or it is empty."""
        # Taken with no handler run before the try (see taken_if_free);
        # contended, every try's outcome is recorded (Deadline.take).
        free = self._send_lock_taken
        waited: list[bool] | None = None
        total = 0
        try:
            if not free:
                waited = []
                deadline.take(self._send_lock, waited)
            ring = self._active_ring(deadline)
            while True:
                if self._closed:
                    if total:
                        return total
                    raise bad_fd()
                err = _connection_error(ring)
                if err:
                    if total:
                        return total
                    # Nothing sent can reach the peer any more.
                    if self._report_failure():
                        raise host_error(err, "send")
                    raise OSError(errno.EPIPE, os.strerror(errno.EPIPE))
                # Our last out_prod store before reading out_cons: the
                # backend announces room only if it saw the ring full, and
                # one of us must see the other's store (see pvcalls._socket).
                mb()
                parts = _checked(ring.outq.writable)
                if parts and len(view):
                    sent = 0
                    for part in parts:
                        n = min(len(part), len(view) - sent)
                        part[:n] = view[sent : sent + n]
                        sent += n
                        if sent == len(view):
                            break
                    if self._closed:
                        # Closed as it copied (a signal's handler, or a
                        # close() that gave up on this call's lock): the
                        # pages may be gone, zero pages in their place.
                        # Not published, the bytes never went.
                        if total:
                            return total
                        raise bad_fd()
                    ring.outq.produce(sent)
                    ring.notify()
                    total += sent
                    view = view[sent:]
                    # A full ring is not writable.  The bytes went: raised,
                    # the update's error told the program they did not,
                    # and it sent them twice.  Nor does it cut the call
                    # short: it is the descriptor's, not the connection's.
                    if self._st.readyfd is not None:
                        self._update_ready_or_log()
                    if total >= want or not len(view):
                        return total
                    continue  # the backend may have made room meanwhile
                if not len(view):
                    return total
                try:
                    self._wait(SEND, deadline,
                               lambda: ring.out_has_room() or bool(_connection_error(ring)))
                except OSError:
                    if total:
                        return total
                    raise
        finally:
            if free or (waited and waited[-1]):
                self._send_lock.release()

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        """Send all of ``data``; the timeout bounds the whole call, as
        socket.socket's has since Python 3.5."""
        flags = _check_flags(flags, _SEND_FLAGS, "sendall")
        view = _send_view(data)
        deadline = Deadline(self._call_timeout(flags))
        # At least one _send(), as socket.socket's sendall() calls send()
        # once even for nothing: an empty ``data`` still fails on a closed
        # or unconnected socket and on the out ring's error.  One _send()
        # for all of it, unless an error cut it short: the next one says it.
        while True:
            n = self._send(view, deadline, len(view))
            view = view[n:]
            if not len(view):
                return

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Receive up to ``nbytes`` (default: ``len(buffer)``) into
        ``buffer``; returns 0 at end of stream.

        ``flags`` may have ``MSG_PEEK`` (the data stays for the next call),
        ``MSG_DONTWAIT`` (this call does not block) and ``MSG_WAITALL``
        (wait for ``nbytes``, or the end of the stream or an error, which
        the next call reports), as on a TCP socket: the last two only in
        blocking mode, as socket.socket's, and a peek waits for no more
        than the ring holds.

        A receive of nothing returns 0 at once, whatever the socket's
        state (closed too), as socket.socket's recv() and recv_into(),
        which make no system call for it; recvfrom() and recvmsg() of
        nothing wait as Linux's TCP does, as for one byte: for data, the
        end of the stream or an error (which they raise), and take no
        data."""
        return self._recv_into(buffer, nbytes, flags, kernel=False)

    def _recv_into(self, buffer: Any, nbytes: int, flags: int, *, kernel: bool,
                   call: str = "recv_into") -> int:
        """:meth:`recv_into`; of nothing as the kernel's if ``kernel``;
        ``call`` is the method a negative ``nbytes`` was given to."""
        dst = _writable_view(buffer)
        if dst is None:
            raise TypeError(f"{call}() argument 1 must be read-write bytes-like object, "
                            f"not {type(buffer).__name__}")
        flags = _check_flags(flags, _RECV_FLAGS, "recv")
        # An integer, as socket.socket's: a float would pass the checks
        # below and wait for data before failing (or never, without a timeout).
        nbytes = _ssize(nbytes)
        if nbytes < 0:
            raise ValueError(f"negative buffersize in {call}")
        if nbytes > len(dst):
            # CPython's two calls say it in words of their own.
            raise ValueError("nbytes is greater than the length of the buffer"
                             if call == "recvfrom_into" else "buffer too small for requested bytes")
        if nbytes == 0:
            nbytes = len(dst)
        if nbytes == 0:
            return self._recv_nothing(flags) if kernel else 0
        return self._receive(dst, nbytes, flags)

    def _recv_nothing(self, flags: int) -> int:
        """A receive of nothing as Linux's TCP does it (for recvfrom() and
        recvmsg(), which make the system call): it waits as a receive of
        one byte would, for data, the end of the stream or an error, and
        raises the error, but takes no data.  Returns 0."""
        self._receive(memoryview(bytearray(1)), 1, flags | _MSG_PEEK)
        return 0

    def _receive(self, dst: memoryview, nbytes: int, flags: int) -> int:
        """Receive up to ``nbytes`` > 0 into ``dst``; ``flags`` checked."""
        timeout = self._call_timeout(flags)
        peek = bool(flags & _MSG_PEEK)
        want = nbytes if flags & _MSG_WAITALL and timeout is None else 1
        deadline = Deadline(timeout)
        # As _send takes its lock.
        free = self._recv_lock_taken
        waited: list[bool] | None = None
        try:
            if not free:
                waited = []
                deadline.take(self._recv_lock, waited)
            ring = self._active_ring(deadline)
            if peek:
                want = min(want, ring.inq.size)  # more never comes in
            got = 0
            while True:
                if self._closed:
                    raise bad_fd()
                # The error first, then the data: the backend writes in_error
                # after its last byte, so data seen after the error is all
                # there is (Linux's __read_ring does the same).
                err = ring.in_error()
                rmb()
                parts = _checked(ring.inq.readable)
                # The index readable() read and the consume starts from:
                # the word on the page is the backend's to overwrite.
                cons = ring.inq.position
                if peek:
                    if parts and (err or sum(map(len, parts)) >= want):
                        n = _copy_out(parts, dst, nbytes)
                        if self._closed:
                            raise bad_fd()  # as below
                        return n
                elif parts:
                    n = _copy_out(parts, dst[got:], nbytes - got)
                    if self._closed:
                        # Closed as it copied (see _send): what it copied
                        # may be the zero pages that the shares left.
                        if got:
                            return got
                        raise bad_fd()
                    got += n
                    ring.inq.consume(n)
                    # The backend waits for our consume only when the ring
                    # was full (Linux's backend stops reading its socket
                    # then, ours too), so only then is it notified.  Whether
                    # it was is read after our in_cons store and a full
                    # barrier; the backend stores in_prod, then (its notify
                    # at the latest) a barrier, then reads in_cons: one of
                    # us sees the other's store, so a backend that found
                    # the ring full gets this notify.  Linux's frontend
                    # notifies after every consume; a 64-byte reply costs
                    # the backend no wake-up here.
                    if ring.in_was_full(cons):
                        ring.notify()
                    # Off the ring: raised, the update's error lost the
                    # bytes taken.  Nor does it cut MSG_WAITALL short (see
                    # _send).
                    if self._st.readyfd is not None:
                        self._update_ready_or_log()
                    if got >= want:
                        return got
                    continue  # MSG_WAITALL: more may have come meanwhile
                if err:
                    if got:
                        return got  # MSG_WAITALL cut short: the next call says why
                    if not _failure(err):
                        return 0  # orderly shutdown by the peer
                    if not self._report_failure():
                        if self._failure_reported_by_connect:
                            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
                        return 0  # a failure said
                    raise host_error(err, "recv")
                if peek and parts:
                    def ready() -> bool:
                        return ring.in_available() >= want or bool(ring.in_error())
                else:
                    def ready() -> bool:
                        return ring.in_pending() or bool(ring.in_error())
                try:
                    self._wait(RECV, deadline, ready)
                except OSError:
                    if got:
                        return got
                    raise
        finally:
            if free or (waited and waited[-1]):
                self._recv_lock.release()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Receive up to ``bufsize`` bytes; ``b""`` at end of stream (and
        at once for ``bufsize`` 0, see :meth:`recv_into`)."""
        return self._recv(bufsize, flags, kernel=False)

    def _recv(self, bufsize: int, flags: int, *, kernel: bool, call: str = "recv") -> bytes:
        # Said as socket.socket says it, not as a failed comparison.
        bufsize = _ssize(bufsize)
        if bufsize < 0:
            raise ValueError(f"negative buffersize in {call}")
        buf = bytearray(bufsize)
        n = self._recv_into(buf, bufsize, flags, kernel=kernel)
        del buf[n:]
        return bytes(buf)

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, None]:
        """:meth:`recv`, and the sender's address: None on a TCP stream.
        Of nothing it waits as the kernel's (see :meth:`recv_into`)."""
        return self._recv(bufsize, flags, kernel=True, call="recvfrom"), None

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, None]:
        """:meth:`recv_into`, and the sender's address: None on a TCP
        stream.  Of nothing it waits as the kernel's (see
        :meth:`recv_into`)."""
        return self._recv_into(buffer, nbytes, flags, kernel=True, call="recvfrom_into"), None

    def recvmsg(self, bufsize: int, ancbufsize: int = 0,
                flags: int = 0) -> tuple[bytes, list[tuple[int, int, bytes]], int, None]:
        """:meth:`recvfrom` as ``(data, ancdata, msg_flags, address)``:
        what a TCP stream gives there, no ancillary data, no message flags
        and no address."""
        bufsize, ancbufsize = _ssize(bufsize), _ssize(ancbufsize)
        if bufsize < 0:
            raise ValueError("negative buffer size in recvmsg()")
        if ancbufsize < 0:
            raise ValueError(_NEGATIVE_ANCILLARY)
        return self._recv(bufsize, flags, kernel=True), [], 0, None

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0,
                     flags: int = 0) -> tuple[int, list[tuple[int, int, bytes]], int, None]:
        """:meth:`recvmsg` into ``buffers``, filled one after the other."""
        # In CPython's order: its arguments converted, then the buffers
        # looked at, then the ancillary size.
        ancbufsize = _ssize(ancbufsize)
        try:
            items = list(buffers)
        except TypeError:
            raise TypeError("recvmsg_into() argument 1 must be an iterable") from None
        views = [view for view in map(_writable_view, items) if view is not None]
        if len(views) != len(items):
            raise TypeError("recvmsg_into() argument 1 must be an iterable "
                            "of single-segment read-write buffers")
        if ancbufsize < 0:
            raise ValueError(_NEGATIVE_ANCILLARY)
        # One receive, as the kernel's: copied out to the buffers after.
        data = bytearray(sum(map(len, views)))
        got = self._recv_into(data, len(data), flags, kernel=True)
        done = 0
        for view in views:
            n = min(len(view), got - done)
            view[:n] = data[done : done + n]
            done += n
        return got, [], 0, None

    def sendto(self, data: bytes | bytearray | memoryview, *args: Any) -> int:
        """``sendto(data[, flags], address)``: :meth:`send`, as on a
        connected TCP socket, which checks the address and ignores it."""
        if len(args) not in (1, 2):
            raise TypeError(f"sendto() takes 2 or 3 arguments ({len(args) + 1} given)")
        flags, address = (0, *args) if len(args) == 1 else args
        # In CPython's order: the data, the flags, then the address.
        _send_view(data)
        flags = operator.index(flags)
        resolve(address, "sendto")
        return self.send(data, flags)

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0,
                address: tuple[str, int] | None = None) -> int:
        """:meth:`send` of ``buffers`` one after the other, as on a
        connected TCP socket (which ignores ``address``).  Ancillary data
        cannot go over PV Calls: :class:`OSError` EOPNOTSUPP."""
        # In CPython's order: the flags converted, the address, the
        # buffers, then the ancillary data.
        flags = operator.index(flags)
        if address is not None:
            resolve(address, "sendmsg")
        try:
            items = list(buffers)
        except TypeError:
            raise TypeError("sendmsg() argument 1 must be an iterable") from None
        views = [_send_view(buf) for buf in items]
        try:
            ancillary = list(ancdata)
        except TypeError:
            raise TypeError("sendmsg() argument 2 must be an iterable") from None
        if ancillary:
            raise OSError(errno.EOPNOTSUPP,
                          "ancillary data (file descriptors, credentials) cannot be sent "
                          "over PV Calls")
        return self.send(b"".join(views), flags)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send ``file`` (opened in binary mode) from ``offset`` to its end,
        or ``count`` bytes of it, and return how many were sent, as
        :meth:`socket.socket.sendfile`: on return (also with an error) the
        file's position is after the last byte sent (a regular file's
        stays where it was if none was); for a file that is not a regular
        one, offset 0 is its position.  The file is read and given to
        :meth:`send`, each wait for room bounded by the timeout (there is
        no descriptor of the connection for ``os.sendfile()``).  As there,
        a non-blocking socket is a :class:`ValueError`, and an empty
        regular file sends nothing at once, whatever the socket's state
        (see :mod:`pvcalls.frontend` for where it differs)."""
        if "b" not in getattr(file, "mode", "b"):
            raise ValueError("file should be opened in binary mode")
        if count is not None:
            if not isinstance(count, int):
                raise TypeError(f"count must be a positive integer (got {count!r})")
            if count <= 0:
                raise ValueError(f"count must be a positive integer (got {count!r})")
        size = _regular_size(file)
        if size == 0:
            # As CPython's, which looks at the file's size before the
            # socket: nothing to send, whatever the socket's state (closed,
            # non-blocking), and the file's position stays.
            return 0
        if self._timeout == 0.0:
            raise ValueError("non-blocking sockets are not supported")
        self._check_open()
        regular = size is not None
        before = file.tell() if regular else None
        if offset or regular:
            file.seek(offset)
        start = file.tell() if regular or _seekable(file) else None
        total = 0
        try:
            while count is None or total < count:
                chunk = file.read(_SENDFILE_CHUNK if count is None
                                  else min(_SENDFILE_CHUNK, count - total))
                if not chunk:
                    break
                view = memoryview(chunk)
                while len(view):
                    n = self.send(view)
                    total += n
                    view = view[n:]
        finally:
            if start is not None:
                file.seek(start + total if total or before is None else before)
        return total

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """A file object on the socket, exactly as :meth:`socket.socket.makefile`
        (modes r, w, b).  As there, :meth:`close` does not wait for the
        files: it returns at once, and the socket is released when the last
        of them is closed."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing = "w" in mode
        reading = "r" in mode or not writing
        binary = "b" in mode
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        raw = socket.SocketIO(self, rawmode)  # type: ignore[arg-type]
        self._io_refs += 1
        if buffering is None or buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: Any
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if binary:
            return buffer
        text = io.TextIOWrapper(buffer, io.text_encoding(encoding), errors, newline)
        text.mode = mode  # type: ignore[misc]
        return text

    def _decref_socketios(self) -> None:
        # Called by socket.SocketIO.close().
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._close_requested and self._io_refs <= 0:
            self._real_close()

    def fileno(self) -> int:
        """A descriptor readable while recv()/accept() would not block, and
        writable while send() would not (one end of a Unix socket pair:
        see "Waiting on sockets" in :mod:`pvcalls.frontend`).

        Not the connection: use it with select/poll/selectors only.  On
        a listening socket the first call starts keeping a POLL in flight, as
        a Linux program's ``poll()`` does.  -1 once closed, as socket.socket
        (selectors then find a closed socket by the object instead).
        """
        if self._closed:
            return -1
        with self._mutex:
            # Again under _cond: a close() since the check above took
            # the state's readyfd under it (Frontend._release), and would
            # not see a descriptor made now.
            if self._closed:
                return -1
            readyfd = self._st.readyfd
            if readyfd is None:
                readyfd = ReadyFd(into=self._st)  # which sets it (see there)
            fd = readyfd.fileno()
            self._armed = True
            ring = self._st.ring
        if ring is not None:
            self._fe._relay(ring, self._st)
        if self._st.listening:
            # At every call, not only the first: none goes out if one is
            # in flight or its answer is not taken yet.  Sent by the first
            # call only, a Ctrl-C landing in it before the POLL went out
            # (or asked for room) left the listener with none for good,
            # whatever fileno() was asked again.
            self._arm_poll()
        self._update_ready()
        return fd

    def close(self) -> None:
        """Release the socket (RELEASE) and free its shared pages.  Other
        threads blocked in this socket's calls get ``OSError(EBADF)``.
        What was sent still reaches the peer with this package's backend,
        which sends the out ring's last bytes before it closes its host
        socket (Linux's backend drops them).  Data received and not read
        does not reset the connection, as a TCP socket's close() does,
        unless some was still in the backend's host socket (see the
        module's notes).

        While files from :meth:`makefile` are open, the release waits for
        the last of them to close, as with :class:`socket.socket`.  A
        socket dropped unclosed is released all the same, with a
        :class:`ResourceWarning` (see the class).  If the program closed
        the descriptor :meth:`fileno` gave it, close() raises
        :class:`OSError` EBADF, as socket.socket's does, once the socket
        is released (a file that took the number since is left open).  A
        close() that a Ctrl-C interrupts leaves the socket closed to its
        calls, and the next close() (or the frontend's) finishes releasing
        it (or, the socket dropped, the frontend does, with no
        ResourceWarning)."""
        self._close_requested = True
        # Before anything that calls: a close() cut short anywhere after
        # this counts as one for the finaliser's warning.
        self._st.close_called = True
        if self._io_refs <= 0:
            self._real_close()

    def shutdown(self, how: int) -> None:
        """Not in PV Calls (:class:`OSError` EOPNOTSUPP): the protocol can
        only release a whole socket.  asyncio's ``write_eof()`` calls it
        (see the module's notes on asyncio).  What socket.socket's says
        before it would shut down, it says too: TypeError or EINVAL for a
        bad ``how``, ENOTCONN on a socket neither connected nor listening,
        or whose connection failed (a reset: a TCP socket is closed then)."""
        how = operator.index(how)
        self._check_open()
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise OSError(errno.EINVAL, f"{os.strerror(errno.EINVAL)} (shutdown how={how})")
        ring = self._st.ring
        if ((ring is None and not self._st.listening)
                or (ring is not None and _connection_error(ring))):
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        raise OSError(errno.EOPNOTSUPP, "PV Calls has no shutdown; close() releases the socket")

    def detach(self) -> int:
        """Not possible: :class:`OSError` EOPNOTSUPP, as the socket has no
        descriptor of its own (-1 once closed, as socket.socket's)."""
        if self._closed:
            return -1
        raise OSError(errno.EOPNOTSUPP, "a PV Calls socket has no descriptor to detach")

    def dup(self) -> PVSocket:
        """Not possible: :class:`OSError` EOPNOTSUPP.  A duplicate would
        share the PV Calls socket, which has no descriptor to duplicate."""
        self._check_open()
        raise OSError(errno.EOPNOTSUPP, "a PV Calls socket cannot be duplicated (dup): "
                      "it has no descriptor of its own")

    def get_inheritable(self) -> bool:
        """False: a child process cannot inherit a PV Calls socket."""
        self._check_open()
        return False

    def set_inheritable(self, inheritable: bool) -> None:
        """:class:`OSError` EOPNOTSUPP when asked to make the socket
        inheritable: it is no descriptor a child process could inherit."""
        self._check_open()
        if inheritable:
            raise OSError(errno.EOPNOTSUPP, "a PV Calls socket cannot be inherited by a "
                          "child process: it has no descriptor of its own")

    @property
    def closed(self) -> bool:
        """True once the socket is released."""
        return self._closed

    @property
    def _connecting(self) -> bool:
        # Kept in the state (see SocketState.connecting); under _cond.
        # Read only: set by stores into the state, in which no signal's
        # handler runs (see connect()).
        return self._st.connecting

    # -- internals ---------------------------------------------------------

    def _real_close(self) -> None:
        # Of two threads closing at once, only one sends the RELEASE: the
        # frontend's claim (see Frontend._release), not this flag, which
        # marks the socket closed for its calls from now on.  A close() a
        # Ctrl-C cut short before its release was done left the socket in
        # the frontend's table: this one finishes it.
        with self._mutex:
            again = self._closed
            self._closed = True
        # Without the frontend's _lock on purpose: a socket the program
        # holds leaves the table only as its release ends and never comes
        # back (ids are not reused), so "gone" is final; "there" may be
        # stale, and _release looks again under _lock.
        if again and self._fe._sockets.get(self.id) is not self._st:
            # Released, by a close() cut short before it detached the
            # finaliser: nothing is left for the reaper.
            self._finalizer.detach()
            return
        # Wake this socket's waiters (on its data, or on an answer to its
        # ACCEPT): they see _closed and leave with EBADF.
        with self._fe._lock:
            self._fe._cmd_cond.notify_all()
        try:
            self._wake()
        except Exception as exc:
            # Known to fail nowhere (an eventfd's write).  Raised, it kept
            # the socket from its release, at this close() and every later
            # one; a waiter it did not wake finds the socket closed at its
            # re-check (see Deadline.recheck), and the release waits for it.
            logger.warning("pvcalls frontend: %r: waking its waiters as it closes: %s",
                           self, exc)
        # Readable and writable, closed, for a selector waiting on the
        # descriptor.  Its error is not close()'s, which released the
        # socket: ENOBUFS raised said it failed; EBADF (the program
        # closed the descriptor) the release's closing of it says, as
        # socket.socket's close() does (see ReadyFd.close).
        self._update_ready_or_log()
        self._fe._release(self._st, self)

    def _check_open(self) -> None:
        if self._closed:
            raise bad_fd()

    def _active_ring(self, deadline: Deadline | None = None) -> DataRing:
        """The data ring of a connected socket, for a call that moves data.

        While a non-blocking connect() is in flight the call waits for it
        within ``deadline`` (None: it does not wait), as a TCP socket's
        send and recv wait for the handshake; the error of one that failed
        is raised once (what SO_ERROR would say), then ENOTCONN."""
        self._check_open()
        if self._connecting or self._connect_failed:
            self._wait_connected(deadline)
        ring = self._st.ring
        if ring is None or self._broken or self._st.listening:
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        return ring

    def _wait_connected(self, deadline: Deadline | None) -> None:
        """See :meth:`_active_ring`."""
        with self._mutex:
            self._await_connect_answer(deadline, errno.EAGAIN)
            err, self._so_error = self._so_error, 0
        if err:
            raise OSError(err, os.strerror(err))

    def _wait(self, side: int, deadline: Deadline, ready: Callable[[], bool]) -> None:
        """Sleep until ``ready()``, the socket closes, or the deadline.

        ``side`` is the caller, RECV or SEND.  With a data ring of its own
        handle, both may block at once (a reader and a writer thread), and
        each polls the handle's descriptor itself with its own wakefd: the
        backend's notify wakes both in parallel, and the one it was for goes
        on without waiting for the other to wake it.  Whoever takes the
        event (one call only gets it) writes the wakefd of the other side if
        that one is polling, since the event may have been its.  Otherwise
        (the shared handle) the event thread notifies ``_cond``.  Either way
        ``ready`` is checked under ``_cond`` as the caller says it polls or
        sleeps, and every consumer of the event looks, under ``_cond``, who
        polls or sleeps after taking it, so no wake-up is lost.

        A ring whose own handle failed (see :meth:`DataRing.consume_events`)
        brings no event any more: instead of waiting for one, the call
        fails with EIO, saying why.
        """
        ring = self._st.ring
        if deadline.timeout == 0.0:
            if self._closed:
                # Closed since the caller looked: its EBADF, as after a
                # wait below, not what the close brought (the frontend's
                # death, an empty ring's EAGAIN).
                return
            if self._fe._dead and not ready():
                raise self._fe._gone()
            if ring is not None and ring.failure is not None and not ready():
                raise OSError(errno.EIO, ring.failure)
            raise BlockingIOError(errno.EAGAIN, "operation would block")
        polling = self._polling
        with self._mutex:
            while not ready() and not self._closed and not self._fe._dead:
                # Bounded (see Deadline.recheck): close()'s wake-up, lost
                # to a Ctrl-C, left this asleep on a closed socket.
                timeout = deadline.recheck()
                if ring is None or not ring.direct:
                    self._cond.wait(timeout)
                    continue
                if ring.failure is not None:
                    # Its handle is broken (see DataRing.consume_events):
                    # no event comes any more.
                    break
                polling[side] = True
                # Each release() opens its try: CPython may run a signal's
                # handler as release() returns, and the KeyboardInterrupt it
                # raises (Ctrl-C in the main thread) must find the lock taken
                # again, or the with block's exit fails to release it, with
                # a RuntimeError that hides the interrupt.  (Not before
                # release(), the try's first call: CPython runs a handler
                # only as a Python function starts, as a call returns, or
                # as a loop goes round, and release() is a C function.)
                try:
                    self._cond.release()
                    fired = self._poll_ring(ring, side, timeout)
                finally:
                    self._cond.acquire()
                    polling[side] = False
                if fired:
                    other = side ^ 1
                    if polling[other]:
                        os.eventfd_write(ring.wakefds[other], 1)
                    if self._st.readyfd is not None:
                        try:
                            self._cond.release()
                            # The event thread's update, taken over: its
                            # error is not this call's, which may have its
                            # data now (see _update_ready_or_log).
                            self._update_ready_or_log()
                        finally:
                            self._cond.acquire()
        # A closed socket is the caller's EBADF whenever this thread got
        # to look: Frontend.close() closes its sockets before it marks
        # itself dead (see Frontend._wait_slot).
        if self._fe._dead and not self._closed and not ready():
            raise self._fe._gone()
        if ring is not None and ring.failure is not None and not self._closed and not ready():
            raise OSError(errno.EIO, ring.failure)

    @staticmethod
    def _poll_ring(ring: DataRing, side: int, timeout: float | None) -> bool:
        """Block on ``ring``'s own handle (or ``side``'s wakefd) for up to
        ``timeout`` seconds; take the event if there is one."""
        ms = None if timeout is None else max(1, int(timeout * 1000 + 0.999))
        wakefd = ring.wakefds[side]
        try:
            events = ring.pollers[side].poll(ms)
        except InterruptedError:
            return False
        for fd, _ in events:
            if fd == wakefd:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
        try:
            return ring.consume_events()
        except OSError:
            return False  # closing, or the ring failed: the caller sees why

    def _on_event(self) -> None:
        """Event thread: the backend signalled this socket's channel:
        wake the waiters, and bring the descriptor up to date."""
        self._wake()
        if self._st.readyfd is not None:
            self._update_ready_or_log()

    def _wake(self) -> None:
        """Wake the waiters of this socket's data ring and calls."""
        with self._mutex:
            self._cond.notify_all()
            # Under _cond: a poller clears its flag under it before it
            # leaves the call that keeps the ring (and wakefds) alive.
            ring = self._st.ring
            if ring is not None:
                for side in (RECV, SEND):
                    if self._polling[side]:
                        os.eventfd_write(ring.wakefds[side], 1)

    def _readable(self) -> bool:
        ring = self._st.ring
        if self._closed or self._fe._dead or self._connect_failed:
            return True  # the call fails at once
        if self._connecting or self._handshaking():
            return False
        if ring is not None and not self._st.listening:
            return ring.in_pending() or bool(ring.in_error()) or ring.failure is not None
        if not self._st.listening:
            # Neither connected nor listening: recv() and accept() fail at
            # once (ENOTCONN, EINVAL), and Linux's TCP polls POLLHUP.
            return True
        # An ACCEPT left in flight by a non-blocking or timed-out accept()
        # and since answered: the next accept() returns at once.
        inflight = self._st.accept_inflight
        return ((self._poll_ready and not self._no_room) or bool(self._poll_error)
                or (inflight is not None and inflight[1].done))

    def _writable(self) -> bool:
        ring = self._st.ring
        if self._closed or self._fe._dead or self._connect_failed:
            return True  # the call fails at once (or connect() reports it)
        if self._connecting or self._handshaking():
            return False  # until the CONNECT's answer, as a TCP handshake
        if self._st.listening:
            # Nothing to send, as on a TCP listener (and Linux's
            # pvcalls-front polls a passive socket for EPOLLIN only).
            return False
        if ring is None or self._broken:
            return True  # send() fails at once: not connected
        return ring.out_has_room() or bool(_connection_error(ring)) or ring.failure is not None

    def _handshaking(self) -> bool:
        """Whether a blocking or timed connect() waits for its CONNECT's
        answer (what ``_connecting`` says of a non-blocking one): the
        socket has a data ring, no peer yet, and is not given up on.  A
        TCP socket polls neither readable nor writable then (its recv()
        and send() wait for the handshake), and so does fileno()'s
        descriptor, where it polled as the connected socket.  Told from
        the state the socket has anyway, not a flag of its own: a flag is
        one more thing a Ctrl-C could leave set when the connect() is
        over.  (An ACCEPT's socket not handed out yet is such a socket
        too, and nobody polls it.)"""
        return self._st.ring is not None and self._peername is None and not self._broken

    def _report_failure(self) -> bool:
        """The connection failed: True the first time, when the caller is
        to raise the error (see ``_failure_reported``)."""
        with self._mutex:
            first, self._failure_reported = not self._failure_reported, True
        return first

    def _update_ready(self) -> None:
        """Make fileno()'s descriptor poll as :meth:`_readable` and
        :meth:`_writable` say.  Gone through, it ends the errors failing
        (see :meth:`_update_ready_or_log`), whoever made it: fileno()'s
        too, which raises what it meets rather than logging it."""
        with self._mutex:
            fd = self._st.readyfd
            if fd is None:
                return
            fd.set(self._readable(), self._writable())
            if self._ready_errors:
                self._ready_errors = _NO_ERRORS

    def _update_ready_or_log(self) -> None:
        """:meth:`_update_ready` where its error is nobody's to raise (the
        event thread), or would say that a call failed which did what
        it was to (connect(), a recv() or send() that moved bytes):
        logged, once for each socket and errno for as long as it lasts
        (twice at worst, a Ctrl-C cutting the first short).  One that
        fails for good (ENOBUFS: the kernel short of memory; EBADF: the
        program closed the descriptor) fails again at every event, and
        logged each time it filled the log.  Once an update went through,
        the error is gone, and said again if it comes back, but not within
        :data:`_RETELL_AFTER` of the last time: an update that changes
        nothing goes through, so an error of every other event would have
        logged a line at each.  EBADF alone is said once for the life of
        the socket: a descriptor the program closed stays so, and one of
        those updates said nothing of it.  Nothing is hidden: every later
        update tries again, and a call that makes one raises what it meets
        (fileno() does)."""
        try:
            self._update_ready()  # which ends the errors failing
        except OSError as exc:
            self._log_ready_error(exc)

    def _log_ready_error(self, exc: OSError) -> None:
        """:meth:`_update_ready_or_log`'s error ``exc``: logged unless it
        fails still, or came back too soon."""
        err = exc.errno
        now = time.monotonic()
        tell = False
        last: float | None = None
        try:
            # Nothing is called under the lock: no signal's handler runs
            # between what is read and what is stored.
            with self._mutex:
                if self._ready_told is None:
                    self._ready_told = {}
                told = self._ready_told
                if err not in self._ready_errors:
                    self._ready_errors |= {err}
                    last = told[err] if err in told else None
                    # EBADF is for good (the program closed the
                    # descriptor): an update that went through since
                    # changed nothing, and so never looked at it.
                    tell = last is None or (err != errno.EBADF
                                            and now - last >= _RETELL_AFTER)
                    if tell:
                        told[err] = now
            if tell:
                # EBADF is the program's doing, which its calls report.
                level = logging.DEBUG if err == errno.EBADF else logging.WARNING
                # Its text, not the exception: a record a handler keeps
                # would keep, by its traceback, the frames of the call
                # this runs in, and a recv()'s buffer with them (exported,
                # it could not be resized).
                logger.log(level, "pvcalls frontend: %r: its fileno() descriptor cannot "
                           "be brought up to date (said once for each socket and error "
                           "while it lasts): %s", self, str(exc))
        except BaseException:
            # Cut short (a Ctrl-C in connect(), in the main thread, as the
            # lock is let go of or in the logging): not told, for the next
            # update to tell, by stores (no signal's handler runs in
            # them).  Left told, the error was never said; put back, one
            # said already is said twice.
            if tell:
                with self._mutex:
                    self._ready_errors -= {err}
                    if last is None:
                        del told[err]
                    else:
                        told[err] = last
            raise

    def _repair_ready(self) -> None:
        """:meth:`_update_ready` in a handler that puts things back before
        an exception goes on its way: an OSError (EBADF, the program
        closed the descriptor) is not raised, for it would replace that
        exception, and a Ctrl-C must come out as one.  Nothing is hidden:
        every later update meets the closed descriptor again, and the call
        that makes it reports it."""
        with contextlib.suppress(OSError):
            self._update_ready()

    def _arm_poll(self, deadline: Deadline | None = None) -> None:
        """Send a POLL unless one is in flight, an ACCEPT is in flight or
        being sent (accept() took the readiness), a connection is already
        known to be pending, an error the last POLL was answered with is
        not reported yet (by accept()), or the socket is closed.
        ``deadline`` bounds the wait for room on the command ring.  Without
        one (the POLL fileno() keeps in flight for a selector) or in
        non-blocking mode, nothing waits: with no room, the POLL goes out
        once answers make room (see :meth:`_on_room`), and fileno() never
        blocks its caller."""
        wait = deadline is not None and deadline.timeout != 0.0

        def fill(req: Any) -> None:
            req.u.poll.id = self.id

        while True:
            slot = Slot(PVCALLS_POLL, self.id)
            # Whether this call marked a POLL in flight: set with the mark,
            # in the try, so that a Ctrl-C landing before the POLL is on
            # its way (as the with block's exit returns, say) takes the
            # mark back.  Left behind, it kept every later POLL from going
            # out, and accept() waited for an answer that never came.
            marked = False
            try:
                with self._mutex:
                    # An error accept() has not reported yet is the POLL's
                    # outcome until it has (fileno() said accept() would not
                    # block): no new POLL, and the error is not wiped.
                    if (self._poll_inflight or self._poll_ready or self._poll_error
                            or self._st.accept_inflight or self._accepting):
                        return
                    if self._closed:
                        return
                    self._poll_inflight = marked = True
                self._fe._submit(slot, fill, deadline if wait and deadline else Deadline(0.0),
                                 reserve=False, sock=self)
                return
            except BaseException as exc:
                if not marked:
                    raise
                if slot.sent:
                    # Interrupted between the push and the notify: in
                    # flight, its answer comes to _on_poll.
                    raise
                with self._mutex:
                    self._poll_inflight = False
                    armed = self._armed and self._st.listening and not self._closed
                if isinstance(exc, OSError) and exc.errno == errno.EBADF and self._closed:
                    return  # closed while it waited for room: no POLL wanted
                if isinstance(exc, OSError) and self._fe._dead:
                    # Nothing answers a POLL any more.  Every caller sees
                    # the death itself (fileno() polls readable, accept()
                    # raises it): raised here, fileno() failed, and a
                    # selector could neither register nor unregister.
                    return
                if wait or not isinstance(exc, BlockingIOError):
                    if armed and (not isinstance(exc, Exception)
                                  or isinstance(exc, TimeoutError)):
                        # Another fileno(), or the event thread's
                        # _on_room or _listening, may have seen the mark
                        # and returned, counting on this POLL: taken back
                        # alone, none went out until the next fileno() or
                        # accept(), and a selector waited for good.  Only
                        # for a Ctrl-C or a wait for room that timed out:
                        # an error the ring gave would come back to the
                        # event thread's retry, again and again.
                        self._fe._poll_later(self)
                    raise
            if not self._room_later():
                return

    def _room_later(self) -> bool:
        """This listener's POLL or ACCEPT found no room on the command ring
        and is not to wait for it: until there is room, accept() would
        block, so fileno() must not poll readable (a selector or asyncio
        loop would call it over and over); the event thread calls
        :meth:`_on_room` once there is.  True if there is room already.

        ``_no_room`` is set by the frontend together with the request to
        be told of room (see Frontend._want_room): set here first, a
        Ctrl-C landing before that request left the listener unreadable
        with nobody to call _on_room, for good."""
        return self._fe._want_room(self)

    def _on_room(self) -> None:
        """Event thread: the command ring has room again for what this
        listener would not wait for (see :meth:`_room_later`)."""
        with self._mutex:
            self._no_room = False
            arm = self._armed and self._st.listening
        if arm:
            self._arm_poll()
        self._update_ready_or_log()

    def _on_poll(self, ret: int) -> None:
        """Event thread: the backend answered this socket's POLL."""
        with self._mutex:
            self._poll_inflight = False
            if ret == 0:
                self._poll_ready = True
            else:
                self._poll_error = ret
            self._cond.notify_all()
        self._update_ready_or_log()

    def _wait_pending_connection(self, deadline: Deadline) -> None:
        """POLL (unless in flight) and wait until it says a connection is
        pending.  The readiness stays: :meth:`_start_accept` takes it."""
        while True:
            self._arm_poll(deadline)
            # A refused POLL's error, taken in the try that gives it back
            # if a Ctrl-C cuts the report short: lost, with the POLL that
            # fileno() needs not yet out, it left the listener neither
            # readable nor polled (a selector waited for good).
            err = 0
            try:
                with self._mutex:
                    # Before the POLL's answer: a close() meanwhile sent the
                    # RELEASE that cut the POLL short, and its -EINTR is no
                    # error of the listener's to report (socket.socket's
                    # accept() says EBADF when another thread closes it).
                    if self._closed:
                        raise bad_fd()
                    err, self._poll_error = self._poll_error, 0
                    if not err:
                        if self._poll_ready:
                            return
                        if deadline.timeout == 0.0:
                            if self._fe._dead:
                                raise self._fe._gone()
                            raise BlockingIOError(errno.EAGAIN, "no connection pending")
                        while (not self._poll_ready and not self._poll_error
                               and not self._closed and not self._fe._dead):
                            self._cond.wait(deadline.recheck())  # as _wait's
                        if self._closed:
                            raise bad_fd()
                        if self._fe._dead:
                            raise self._fe._gone()
                        continue
                # Reported once; fileno() needs a POLL in flight again.
                # The update's error, logged, is not the POLL's, which
                # it replaced and put back for every accept() to meet.
                if self._armed:
                    self._arm_poll()
                self._update_ready_or_log()
            except BaseException:
                if err:
                    with self._mutex:
                        # For the next accept() to report, unless the POLL
                        # sent meanwhile was answered since.
                        if not (self._poll_error or self._poll_ready):
                            self._poll_error = err
                    self._repair_ready()
                raise
            raise host_error(err, "accept (poll)")
