"""Shared rings of ``xen/io/ring.h``, on memoryviews of granted pages.

Two kinds of ring exist in Xen's PV protocols:

* the request/response ring of ``DEFINE_RING_TYPES``: a 64-byte header of
  free-running 32-bit indexes followed by a power-of-two number of fixed-size
  slots, each holding a request or, later, its response (:class:`BackRing`
  for the backend, :class:`FrontRing` for the frontend);
* the byte ring of ``DEFINE_XEN_FLEX_RING`` (``XEN_FLEX_RING``): a
  power-of-two byte array with a producer and a consumer index somewhere
  else, free-running ``u32`` and masked on use (:class:`FlexRing`, one
  direction).

The other end is another domain, so everything it writes is hostile: each
request is copied out of the ring once (``bytes``) and only the copy may be
parsed; every index read from shared memory is bounded before use, and a ring
whose indexes cannot be right raises :class:`RingError` (the caller treats
that as a protocol error of that frontend only).  The ring's own private
indexes (``req_cons``, ``rsp_prod_pvt``...) live in this object, never in
shared memory, as in the kernel's ``struct *_back_ring``.

Memory ordering
---------------
The other end runs on another CPU, so the order in which our loads and stores
become visible matters, exactly as in the kernel's ring macros.  Python has
no barriers of its own; :func:`mb`, :func:`rmb` and :func:`wmb` are the
kernel's ``virt_mb``/``virt_rmb``/``virt_wmb`` (from a C helper,
:mod:`xenback._barrier`), for rings of a layout of one's own too.  Each
shared index is read and written as one aligned 32-bit access (a memoryview
cast to ``"I"``), and each barrier is an opaque call into C, so neither
CPython's C compiler nor the interpreter can move a memory access across
it; only the CPU could:

* x86-64 is TSO: loads are not reordered with older loads, stores not with
  older stores, and a store is not reordered with an older load.  So the
  read side (load index, then load slots) and the write side (store slots,
  then store index) need only a compiler barrier, which is what ``rmb`` and
  ``wmb`` compile to there.  The one reordering TSO allows is a load passing
  an older store to another address: exactly the "publish ``rsp_prod``, then
  read ``rsp_event``" step of the notification check and the "set
  ``req_event``, then re-read ``req_prod``" step of the final check.  Those
  use ``mb`` (a locked instruction / ``mfence``); without it both sides can
  go to sleep with work pending.
* arm64 is weakly ordered: any two accesses to different addresses may be
  reordered.  ``rmb`` is ``dmb ishld`` (earlier loads before later loads and
  stores: the index before the slots it covers, and the data before the
  consumer index that frees it); ``wmb`` is ``dmb ishst`` (slot stores before
  the index store that publishes them); ``mb`` is ``dmb ish``.

Where the kernel uses ``virt_mb`` for a read-then-write hand-over (a byte
ring's consumer releasing space, a producer checking space before writing),
this module uses ``mb`` too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NoReturn

from xenback._barrier import lib as _barrier
from xenback._flags import check_flag
from xenback._wire import SRING_HEADER_SIZE, ffi

__all__ = ["BackRing", "FlexRing", "FrontRing", "RingError", "mb", "ring_size", "rmb", "wmb"]

_MASK = 0xFFFFFFFF

# Indexes into the header viewed as u32[]: the offsets are taken from the one
# set of declarations, so the layout test covers them.
_REQ_PROD = ffi.offsetof("struct xen_sring_header", "req_prod") // 4
_REQ_EVENT = ffi.offsetof("struct xen_sring_header", "req_event") // 4
_RSP_PROD = ffi.offsetof("struct xen_sring_header", "rsp_prod") // 4
_RSP_EVENT = ffi.offsetof("struct xen_sring_header", "rsp_event") // 4

#: Full barrier: earlier loads and stores before later ones (``virt_mb``).
mb = _barrier.xb_mb
#: Read barrier: earlier loads before later loads (``virt_rmb``).
rmb = _barrier.xb_rmb
#: Write barrier: earlier stores before later stores (``virt_wmb``).
wmb = _barrier.xb_wmb

# What this module's ring steps call: module globals of their own, which the
# barrier test replaces to trace where each step puts its barriers.
_mb, _rmb, _wmb = mb, rmb, wmb


class RingError(Exception):
    """The other end broke the ring protocol (impossible indexes), or the
    caller misused the ring (pushing into a full ring, answering a request
    that was never taken)."""


def ring_size(buffer_size: int, slot_size: int) -> int:
    """Number of slots of a ``ring.h`` ring in ``buffer_size`` bytes
    (``__CONST_RING_SIZE``: the largest power of two that fits)."""
    for name, value in (("buffer size", buffer_size), ("slot size", slot_size)):
        if type(value) is not int:
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if slot_size <= 0:
        raise ValueError(f"slot size must be positive, not {slot_size}")
    n = (buffer_size - SRING_HEADER_SIZE) // slot_size
    if n < 1:
        raise ValueError(
            f"a {buffer_size}-byte buffer has no room for a {slot_size}-byte slot "
            f"after the {SRING_HEADER_SIZE}-byte ring header"
        )
    return 1 << (n.bit_length() - 1)


def _as_bytes_view(buffer: memoryview | bytearray, what: str) -> memoryview:
    view = memoryview(buffer)
    if view.readonly:
        raise ValueError(f"{what} must be writable")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class _Released:
    """What a released ring holds in place of each of its views: any use
    of it says which ring was released, where the view's own error
    ("operation forbidden on released memoryview object") named neither.

    A ValueError still, as the view's and a closed file's.  Put in place
    of the views rather than checked for: the data path pays nothing.
    """

    __slots__ = ("_what",)

    def __init__(self, ring: object) -> None:
        self._what = type(ring).__name__

    def _used(self) -> NoReturn:
        raise ValueError(f"this {self._what} was released (release()): "
                         f"it cannot be used any more")

    def __getitem__(self, key: object) -> NoReturn:
        self._used()

    def __setitem__(self, key: object, value: object) -> NoReturn:
        self._used()

    def release(self) -> None:
        """Released already: releasing again does nothing, as a view's."""


def _check_count(n: int) -> None:
    # Before any arithmetic: a float would fail deep in the index masking,
    # and True would move a byte.
    if type(n) is not int:
        raise TypeError(f"byte count must be an int, not {type(n).__name__}")


class _SharedRing:
    """What the front and back rings share: the slots and the header."""

    def __init__(self, buffer: memoryview | bytearray, slot_size: int) -> None:
        buf = _as_bytes_view(buffer, "ring buffer")
        self.slot_size = slot_size
        #: Number of slots (``RING_SIZE``).
        self.nr_ents = ring_size(len(buf), slot_size)
        self._buf: memoryview | _Released = buf
        self._idx: memoryview | _Released = buf[:SRING_HEADER_SIZE].cast("I")

    def _slot(self, idx: int) -> memoryview:
        off = SRING_HEADER_SIZE + (idx & (self.nr_ents - 1)) * self.slot_size
        return self._buf[off : off + self.slot_size]

    def _put(self, idx: int, data: bytes | bytearray | memoryview) -> None:
        if len(data) > self.slot_size:
            raise ValueError(f"{len(data)}-byte message does not fit a {self.slot_size}-byte slot")
        off = SRING_HEADER_SIZE + (idx & (self.nr_ents - 1)) * self.slot_size
        self._buf[off : off + len(data)] = data

    def release(self) -> None:
        """Drop this object's views of the buffer (before the pages are
        unmapped); the ring must not be used afterwards: a ValueError says
        so.  Releasing it again does nothing."""
        self._idx.release()
        self._idx = _Released(self)
        self._buf.release()
        self._buf = _Released(self)


class BackRing(_SharedRing):
    """The backend's end of a request/response ring (``BACK_RING_INIT``).

    Invariant, checked on every batch: ``req_prod - rsp_prod_pvt <=
    nr_ents`` (modulo 2**32).  Requests we have not yet answered plus
    requests we have not taken never exceed the ring; a frontend whose
    ``req_prod`` says otherwise is broken or hostile (the kernel's
    ``RING_REQUEST_PROD_OVERFLOW``) and :meth:`requests` raises
    :class:`RingError`.  It implies ``req_prod - req_cons <= nr_ents`` and
    that we never take a request whose response slot is still in use
    (``RING_REQUEST_CONS_OVERFLOW``).

    Typical loop, run by one work item at a time::

        while True:
            for req in ring.requests():
                ring.push_response(handle(req))
            if ring.push_responses():
                notify()
            if not ring.final_check_for_requests():
                break
    """

    def __init__(self, buffer: memoryview | bytearray, slot_size: int, *, index: int = 0) -> None:
        """``buffer`` is the whole shared ring, header first (the mapped
        pages); ``slot_size`` is the size of one slot, the union of request
        and response that ``DEFINE_RING_TYPES`` declares.  With cffi:
        ``ffi.sizeof("union my_sring_entry")``, declaring the union of the
        two structs, not the larger of their sizes, which is smaller when
        their alignments differ (a 9-byte request and a 4-byte response
        make 12-byte slots): the other end would find the slots elsewhere.

        ``index`` is where the private indexes start (``BACK_RING_ATTACH``:
        a ring re-attached after the backend restarted)."""
        if type(index) is not int:
            raise TypeError(f"index must be an int, not {type(index).__name__}")
        if not 0 <= index <= _MASK:
            # Masking it would attach at another index without a word.
            raise ValueError(f"index {index} is not a RING_IDX (0 to {_MASK})")
        super().__init__(buffer, slot_size)
        self.req_cons = index
        self.rsp_prod_pvt = index
        self._rsp_pushed = index

    def unconsumed_requests(self) -> int:
        """``RING_HAS_UNCONSUMED_REQUESTS``, unvalidated: a hint only."""
        return (self._idx[_REQ_PROD] - self.req_cons) & _MASK

    def requests(self) -> Iterator[bytes]:
        """Yield a private copy of each request published so far, a whole
        slot each (``slot_size`` bytes).

        ``req_prod`` is read once per call, then each request is copied out
        once and ``req_cons`` advanced before it is yielded (a request is
        taken even if the caller stops iterating).  Raises
        :class:`RingError` if ``req_prod`` is impossible.
        """
        prod = self._idx[_REQ_PROD]
        _rmb()  # Read the slots only after reading req_prod.
        if (prod - self.rsp_prod_pvt) & _MASK > self.nr_ents:
            raise RingError(
                f"req_prod {prod} is more than {self.nr_ents} slots ahead of the "
                f"responses produced ({self.rsp_prod_pvt})"
            )
        if (prod - self.req_cons) & _MASK > (prod - self.rsp_prod_pvt) & _MASK:
            raise RingError(f"req_prod {prod} went backwards past req_cons {self.req_cons}")
        while self.req_cons != prod:
            req = bytes(self._slot(self.req_cons))
            self.req_cons = (self.req_cons + 1) & _MASK
            yield req

    def push_response(self, rsp: bytes | bytearray | memoryview) -> None:
        """Write the next response (``RING_GET_RESPONSE`` + ``rsp_prod_pvt++``);
        it becomes visible with :meth:`push_responses`.  One shorter than
        the slot leaves the rest of the slot as it was (the request's
        bytes), as a C backend writing only some fields does."""
        if self.rsp_prod_pvt == self.req_cons:
            raise RingError("no request is waiting for a response")
        self._put(self.rsp_prod_pvt, rsp)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & _MASK

    def push_responses(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``: publish the responses
        written so far; True if the frontend asked to be notified.

        The old ``rsp_prod`` the check compares with is the one we last
        published, kept here, where the macro re-reads it from the page:
        the same value, unless the frontend rewrote it to sway the
        decision."""
        old = self._rsp_pushed
        new = self.rsp_prod_pvt
        _wmb()  # The frontend must see the responses before rsp_prod.
        self._idx[_RSP_PROD] = new
        self._rsp_pushed = new
        _mb()  # Publish rsp_prod before reading rsp_event.
        event = self._idx[_RSP_EVENT]
        return (new - event) & _MASK < (new - old) & _MASK

    def final_check_for_requests(self) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``: True if more requests arrived.

        If none, ask to be notified for the next one (``req_event``) and
        check once more, closing the race with a frontend that published
        just before seeing the new ``req_event``.
        """
        if self.unconsumed_requests():
            return True
        self._idx[_REQ_EVENT] = (self.req_cons + 1) & _MASK
        _mb()  # Publish req_event before re-reading req_prod.
        return self.unconsumed_requests() != 0


class FrontRing(_SharedRing):
    """The frontend's end of a request/response ring (``FRONT_RING_INIT``).

    For frontends (tests, the pvcalls frontend library).  With ``init=True``
    the shared header is initialised (``SHARED_RING_INIT``); responses are
    bounded by the requests in flight, else :class:`RingError`.
    """

    def __init__(
        self, buffer: memoryview | bytearray, slot_size: int, *, init: bool = True
    ) -> None:
        """``buffer`` and ``slot_size`` as for :class:`BackRing`."""
        check_flag("init", init)
        super().__init__(buffer, slot_size)
        if init:
            self._buf[:SRING_HEADER_SIZE] = bytes(SRING_HEADER_SIZE)
            self._idx[_REQ_EVENT] = 1
            self._idx[_RSP_EVENT] = 1
        self.req_prod_pvt = self._idx[_REQ_PROD]
        self.rsp_cons = self._idx[_RSP_PROD]
        self._req_pushed = self.req_prod_pvt

    @property
    def free_slots(self) -> int:
        """``RING_FREE_REQUESTS``."""
        return self.nr_ents - ((self.req_prod_pvt - self.rsp_cons) & _MASK)

    def push_request(self, req: bytes | bytearray | memoryview) -> None:
        """Write the next request; visible after :meth:`push_requests`.
        One shorter than the slot leaves the rest of the slot as it was
        (an earlier response's bytes)."""
        if self.free_slots <= 0:
            raise RingError("ring is full")
        self._put(self.req_prod_pvt, req)
        self.req_prod_pvt = (self.req_prod_pvt + 1) & _MASK

    def push_requests(self, since: int | None = None) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`` (the old ``req_prod``
        is the one we last published, as in :meth:`BackRing.push_responses`).

        ``since``, if given, is the old ``req_prod`` instead: the one up to
        which the other end was last notified, or needed no notify.  For a
        caller whose notify may be lost between this check and the notify
        (a signal's handler raising there): the next check then still asks
        for the notify that the other end's ``req_event`` waits for.
        Checked before anything is published: a ``RING_IDX`` (an int, 0
        to 2**32 - 1), else :class:`TypeError` or :class:`ValueError`."""
        if since is None:
            old = self._req_pushed
        elif type(since) is not int:
            # The check below would fail after req_prod went out, leaving
            # the caller unable to tell that the other end may wait.
            raise TypeError(f"since must be an int, not {type(since).__name__}")
        elif not 0 <= since <= _MASK:
            raise ValueError(f"since {since} is not a RING_IDX (0 to {_MASK})")
        else:
            old = since
        new = self.req_prod_pvt
        _wmb()
        self._idx[_REQ_PROD] = new
        self._req_pushed = new
        _mb()
        event = self._idx[_REQ_EVENT]
        return (new - event) & _MASK < (new - old) & _MASK

    def unconsumed_responses(self) -> int:
        """``RING_HAS_UNCONSUMED_RESPONSES``, unvalidated."""
        return (self._idx[_RSP_PROD] - self.rsp_cons) & _MASK

    def responses(self) -> Iterator[bytes]:
        """Yield a private copy of each response published so far."""
        prod = self._idx[_RSP_PROD]
        _rmb()
        if (prod - self.rsp_cons) & _MASK > (self._req_pushed - self.rsp_cons) & _MASK:
            raise RingError(
                f"rsp_prod {prod} is ahead of the requests pushed ({self._req_pushed})"
            )
        while self.rsp_cons != prod:
            rsp = bytes(self._slot(self.rsp_cons))
            self.rsp_cons = (self.rsp_cons + 1) & _MASK
            yield rsp

    def final_check_for_responses(self) -> bool:
        """``RING_FINAL_CHECK_FOR_RESPONSES``."""
        if self.unconsumed_responses():
            return True
        self._idx[_RSP_EVENT] = (self.rsp_cons + 1) & _MASK
        _mb()
        return self.unconsumed_responses() != 0


class FlexRing:
    """One direction of a ``XEN_FLEX_RING`` byte ring.

    ``data`` is the byte array (a power of two long); ``indexes`` is the
    memory holding this direction's producer and consumer indexes, at byte
    offsets ``prod_offset`` and ``cons_offset`` (for pvcalls' ``in``
    direction of ``struct pvcalls_data_intf``: ``in_prod`` and ``in_cons``).
    The indexes are free-running ``u32``; positions are masked.

    One object is used in one role: a consumer calls :meth:`readable` then
    :meth:`consume`, a producer :meth:`writable` then :meth:`produce`.  Both
    indexes are re-read from shared memory by every :meth:`readable` /
    :meth:`writable` (as Linux's pvcalls does), and a pair with ``prod -
    cons > size`` raises :class:`RingError`.  :meth:`consume` and
    :meth:`produce` advance the index returned by the last
    :meth:`readable` / :meth:`writable`, never one re-read from the page.
    """

    def __init__(
        self,
        data: memoryview | bytearray,
        indexes: memoryview | bytearray,
        *,
        prod_offset: int,
        cons_offset: int,
    ) -> None:
        view = _as_bytes_view(data, "ring data")
        self._data: memoryview | _Released = view
        self.size = len(view)
        if self.size == 0 or self.size & (self.size - 1):
            raise ValueError(f"a flex ring's size must be a power of two, not {self.size}")
        idx = _as_bytes_view(indexes, "ring indexes")
        for name, off in (("prod_offset", prod_offset), ("cons_offset", cons_offset)):
            if type(off) is not int:
                raise TypeError(f"{name} must be an int, not {type(off).__name__}")
            if off % 4 or not 0 <= off <= len(idx) - 4:
                raise ValueError(f"{name} {off} is not an aligned u32 inside the indexes")
        if prod_offset == cons_offset:
            # One word written by both ends: the ring would always look
            # empty to the consumer, and data would be overwritten unread.
            raise ValueError(
                f"prod_offset and cons_offset are both {prod_offset}: "
                f"a flex ring needs two indexes"
            )
        self._prod: memoryview | _Released = idx[prod_offset : prod_offset + 4].cast("I")
        self._cons: memoryview | _Released = idx[cons_offset : cons_offset + 4].cast("I")
        # The index our last readable()/writable() saw, and how far it may move.
        self._pos = 0
        self._limit = 0

    @property
    def position(self) -> int:
        """This end's index as the last :meth:`readable` / :meth:`writable`
        read it, moved by :meth:`consume` / :meth:`produce` since: the value
        they write back.  Never re-read from shared memory, where the other
        end may have changed it meanwhile."""
        return self._pos

    def _pieces(self, start: int, length: int) -> tuple[memoryview, ...]:
        if length == 0:
            return ()
        start &= self.size - 1
        first = min(length, self.size - start)
        if first == length:
            return (self._data[start : start + length],)
        return (self._data[start : start + first], self._data[: length - first])

    def _used(self, prod: int, cons: int) -> int:
        used = (prod - cons) & _MASK
        if used > self.size:
            raise RingError(
                f"flex ring indexes prod {prod} cons {cons} claim {used} bytes "
                f"in a {self.size}-byte ring"
            )
        return used

    def readable(self) -> tuple[memoryview, ...]:
        """Views (0, 1 or 2 pieces, in order) of the bytes published and not
        yet consumed.  Copy them out before trusting them."""
        prod = self._prod[0]
        cons = self._cons[0]
        _rmb()  # Read the data only after reading prod.
        # _used() inlined, and no _pieces() call for an empty ring: this
        # runs at every event of a pvcalls socket.
        used = (prod - cons) & _MASK
        if used > self.size:
            self._used(prod, cons)  # raises RingError
        self._pos, self._limit = cons, used
        return self._pieces(cons, used) if used else ()

    def consume(self, n: int) -> None:
        """Release the first ``n`` bytes of the last :meth:`readable`."""
        if type(n) is not int:  # the check only: a call less per event
            _check_count(n)
        if not 0 <= n <= self._limit:
            raise ValueError(f"cannot consume {n} bytes: {self._limit} were readable")
        _mb()  # Finish reading the data before the producer may reuse it.
        self._pos = (self._pos + n) & _MASK
        self._limit -= n
        self._cons[0] = self._pos

    def writable(self) -> tuple[memoryview, ...]:
        """Views (0, 1 or 2 pieces, in order) of the free space."""
        prod = self._prod[0]
        cons = self._cons[0]
        _mb()  # Read cons before overwriting the space it released.
        used = (prod - cons) & _MASK  # _used() inlined, as in readable()
        if used > self.size:
            self._used(prod, cons)  # raises RingError
        free = self.size - used
        self._pos, self._limit = prod, free
        return self._pieces(prod, free) if free else ()

    def produce(self, n: int) -> None:
        """Publish the first ``n`` bytes written into the last :meth:`writable`."""
        if type(n) is not int:  # the check only: a call less per event
            _check_count(n)
        if not 0 <= n <= self._limit:
            raise ValueError(f"cannot produce {n} bytes: {self._limit} were free")
        _wmb()  # The consumer must see the data before prod.
        self._pos = (self._pos + n) & _MASK
        self._limit -= n
        self._prod[0] = self._pos

    def release(self) -> None:
        """Drop the views (before the pages are unmapped); the ring must
        not be used afterwards: a ValueError says so.  Releasing it again
        does nothing."""
        self._prod.release()
        self._prod = _Released(self)
        self._cons.release()
        self._cons = _Released(self)
        self._data.release()
        self._data = _Released(self)
