"""What the frontend's modules share: the default ring order, errors in
the host's numbering, addresses and timeouts checked as socket.socket
checks them, deadlines, and the response table entry of a command."""

from __future__ import annotations

import contextlib
import errno
import math
import operator
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from workqueue import wait_slice

from .. import _errno

#: The default data ring order of every active socket: Linux's
#: ``PVCALLS_RING_ORDER``.  Linux's frontend also refuses a backend whose
#: ``max-page-order`` is below it.
FRONTEND_RING_ORDER = 4


#: The resets in a row of an event channel handle after which it is taken
#: for broken: resets with no read of its queue of fired ports that found
#: it empty between them (see Frontend._event_loop, and DataRing's for a
#: ring's own handle).  More than one: the hand-out after a reset unmasks
#: every port, and Linux's queue holds a port that fires again then
#: twice, which a storm on every port may overflow once more.
RESETS_IN_A_ROW = 3


U32 = struct.Struct("=I")


#: The longest timeout settimeout() takes (socket.socket's limit is time_t's).
_TIMEOUT_MAX = float(threading.TIMEOUT_MAX)


#: Errors that Python's callers take for "try again", not for a failure:
#: BlockingIOError's (socket.SocketIO reads EAGAIN as no data yet, a select
#: loop tries again) and InterruptedError's (PEP 475 retries).  No backend
#: may mean either: the frontend's calls wait themselves, EAGAIN is never
#: stored in a data ring, and ACCEPT is answered once a connection is in.
_RETRY_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EWOULDBLOCK, errno.EALREADY, errno.EINPROGRESS, errno.EINTR})


def host_error(ret: int, what: str) -> OSError:
    """An :class:`OSError` in the host's numbering for the negative Xen
    errno ``ret`` (mapped by name; Linux's internal ENOTSUPP becomes
    EOPNOTSUPP, and one that would read as "try again" EPROTO: a
    blocking call retried on it forever, or took it for end of stream)."""
    name = _errno.name_of(ret)
    code = getattr(errno, name, None)
    if code is None:
        code = errno.EOPNOTSUPP if name == "ENOTSUPP" else errno.EIO
    elif code in _RETRY_ERRNOS:
        return OSError(errno.EPROTO,
                       f"{os.strerror(errno.EPROTO)} ({what}: the backend said {name})")
    return OSError(code, f"{os.strerror(code)} ({what})")


def bad_fd() -> OSError:
    return OSError(errno.EBADF, os.strerror(errno.EBADF))


def timeout_value(value: float | None) -> float | None:
    """``value`` checked as :meth:`socket.socket.settimeout` checks it."""
    if value is None:
        return None
    # A float or an integer, as socket.socket takes: not whatever float()
    # converts (a string, a Decimal, a Fraction).
    if not isinstance(value, float):
        try:
            value = float(operator.index(value))
        except TypeError:
            raise TypeError("timeout must be a float, an int or None, "
                            f"not {type(value).__name__}") from None
    if math.isnan(value):
        raise ValueError("Invalid value NaN (not a number)")
    if value < 0:
        raise ValueError("Timeout value out of range")
    if value > _TIMEOUT_MAX:
        raise OverflowError(f"timeout {value} too large (at most {_TIMEOUT_MAX:g} s)")
    return value + 0.0  # -0.0 is 0.0, as socket.socket's says


def host_bytes(host: str) -> bytes:
    """The bytes :class:`socket.socket` hands the C library for ``host``:
    an ASCII name as it is, any other IDNA-encoded; :class:`TypeError` if
    it cannot be.  (socket.getaddrinfo() would IDNA-encode an ASCII str
    too, and raise UnicodeError for a malformed name such as "a..b" that
    the resolver should refuse.)"""
    try:
        return host.encode("ascii") if host.isascii() else host.encode("idna")
    except UnicodeError:
        raise TypeError("encoding of hostname failed") from None


def resolve(address: object, call: str = "connect") -> tuple[str, int]:
    """An AF_INET ``(host, port)`` as :class:`socket.socket` takes it: the
    host a string or bytes, numeric (``inet_aton`` forms such as ``127.1``
    included) or a name resolved here, in the guest, as a Linux guest's C
    library does before it calls connect() or bind().  A wrong one is
    refused as by CPython's method ``call``: its checks, in its order
    (the host before the port), its exceptions and words, naming ``call``
    where it does."""
    if not isinstance(address, tuple):
        raise TypeError(f"{call}(): AF_INET address must be tuple, not {type(address).__name__}")
    if len(address) != 2:
        raise TypeError("AF_INET address must be a pair (host, port)")
    host, port = address
    if not isinstance(host, str | bytes | bytearray):
        raise TypeError(f"str, bytes or bytearray expected, not {type(host).__name__}")
    name = host_bytes(host) if isinstance(host, str) else bytes(host)
    if b"\0" in name:
        raise TypeError("host name must not contain null character")
    port = operator.index(port)
    if not 0 <= port <= 0xFFFF:
        raise OverflowError(f"{call}(): port must be 0-65535.")
    if name == b"":
        return "0.0.0.0", port
    if name == b"<broadcast>":
        return "255.255.255.255", port
    if name.isascii():
        try:
            return socket.inet_ntoa(socket.inet_aton(name.decode("ascii"))), port
        except OSError:
            pass
    # Raises socket.gaierror for a name without an IPv4 address, as
    # socket.socket does.
    info = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)
    return str(info[0][4][0]), port


#: The longest a wait that a call of another thread (close() above all)
#: must end sleeps before it looks again at what it waits for, also with
#: no limit (see Deadline.recheck): seconds, a wake-up of the waiter a
#: second at most, only while it sleeps.
RECHECK = 1.0


class Deadline:
    """A socket timeout turned into an absolute deadline.

    ``None`` waits forever, ``0.0`` never waits (the caller raises
    :class:`BlockingIOError`), anything else raises :class:`TimeoutError`.
    Every wait sleeps at most :meth:`nap` at a time and looks again, so
    that the main thread runs a signal's handler soon, whichever thread
    the kernel gave the signal to.
    """

    __slots__ = ("_end", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left; raises :class:`TimeoutError` once they are over."""
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def nap(self) -> float | None:
        """How long to sleep before looking again: the time left (``None``:
        no limit), in the main thread half a second at most, as the
        workqueue's waits (:func:`workqueue.wait_slice`, which says why);
        raises :class:`TimeoutError` once it is over."""
        return wait_slice(self.remaining())

    def recheck(self) -> float:
        """:meth:`nap`, :data:`RECHECK` at most in any thread: for a wait
        that a ``notify_all()`` of another thread ends (close(), the
        frontend's death, a non-blocking connect() that sent nothing).
        A Ctrl-C landing in the main thread as that notify_all() starts
        loses the wake-up, and a waiter with no limit slept on for good,
        on a socket closed meanwhile; it now sees that for itself within
        a second.  Raises :class:`TimeoutError` once the time is over."""
        nap = self.nap()
        return RECHECK if nap is None else min(nap, RECHECK)

    def take(self, lock: threading.Lock | threading.RLock, taken: list[bool]) -> None:
        """Take ``lock`` (a socket's lock, or Frontend.close()'s, which
        another thread may hold while it waits) within the deadline,
        appending each try's outcome to ``taken``: once it returns, the
        last is True.  Raises :class:`BlockingIOError` at once in
        non-blocking mode, :class:`TimeoutError` when the time is over.
        A free lock is taken also once the time is over.

        Whatever interrupts it, the last outcome in ``taken`` says whether
        the caller holds the lock: each is recorded by the call that makes
        the try (list.extend over a map), as the C ``__enter__`` of a
        ``with lock:`` takes it with no handler run in between.  As
        ``lock.acquire()`` returning to Python code, a Ctrl-C as it
        returned (CPython runs a signal's handler there) left the lock
        held for good, and what it guards with it (see Frontend._release).
        """
        taken.extend(map(lock.acquire, (False,)))
        if taken[-1]:
            return
        if self.timeout == 0.0:
            raise BlockingIOError(errno.EAGAIN, "operation would block")
        while not taken[-1]:
            nap = self.nap()
            taken.extend(map(lock.acquire, (True,), (-1 if nap is None else nap,)))


@contextlib.contextmanager
def held(lock: threading.Lock | threading.RLock, deadline: Deadline,
         busy: Callable[[], BaseException] | None = None) -> Iterator[None]:
    """``with lock:``, taken within ``deadline`` as :meth:`Deadline.take`
    takes it, and let go whatever interrupts the block or the taking.
    ``busy``: what to raise, rather than EAGAIN, when a non-blocking
    ``deadline`` finds the lock held (looked at as it is found so).
    (One landing in contextlib's ``__enter__`` once this has yielded
    leaves the lock to the generator's close, when the exception lets go
    of it.)  Off the data path: send and recv take their locks with
    :func:`taken_if_free` first, a generator and its context manager
    the time of a small recv() more."""
    taken: list[bool] = []
    try:
        try:
            deadline.take(lock, taken)
        except BlockingIOError:
            if busy is None:
                raise
            raise busy() from None
        yield
    finally:
        if taken and taken[-1]:
            lock.release()


def taken_if_free(try_acquire: str) -> Any:
    """A class attribute whose read on an instance calls the instance's
    attribute ``try_acquire``, a ``functools.partial(lock.acquire,
    False)``, and gives what it returned: whether the lock was free, and
    is now the reader's.

    ``got = self._lock_taken`` takes the lock as ``with lock:`` does: all
    of it runs in C (a property, operator.methodcaller, functools.partial,
    the lock's acquire), and CPython runs a signal's handler only in
    Python code, so none runs between the take and the store of its
    outcome.  ``got = lock.acquire(False)`` is a call returning to Python
    code, where a Ctrl-C lands before the store, and left the lock held
    for good.  For the data path, where :func:`held` costs too much: a
    read of this costs about a tenth of a microsecond more than the call.
    """
    return property(operator.methodcaller(try_acquire))


class Slot:
    """One command in flight: the response table entry of its ring slot."""

    __slots__ = ("cmd", "sock_id", "req_id", "sent", "done", "ret", "abandoned", "on_done")

    def __init__(self, cmd: int, sock_id: int) -> None:
        self.cmd = cmd
        self.sock_id = sock_id
        # Set by Frontend._submit under its lock, as the request goes on
        # the command ring: whatever interrupts the submitter, its caller
        # knows whether the request went out (its answer will come).
        self.req_id = -1
        self.sent = False
        self.done = False
        self.ret = 0
        # Nobody will collect the answer: free the slot when it arrives.
        self.abandoned = False
        # The event thread frees the slot and calls this with ``ret``
        # (outside the command lock) when the answer arrives: nobody may
        # be waiting any more (a BIND's or LISTEN's caller may, and reads
        # ``ret``, but after a Ctrl-C only this takes the answer).
        self.on_done: Callable[[int], None] | None = None


#: The two callers that may block on a data ring: indexes of
#: ``DataRing.wakefds`` and ``PVSocket._polling``.
RECV, SEND = 0, 1
