"""An active socket's data ring as the frontend shares it with the backend."""

from __future__ import annotations

import errno
import functools
import logging
import operator
import os
import select
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from xenback.ring import FlexRing, mb

from .._wire import (
    IN_CONS_OFFSET,
    IN_ERROR_OFFSET,
    IN_PROD_OFFSET,
    OUT_CONS_OFFSET,
    OUT_ERROR_OFFSET,
    OUT_PROD_OFFSET,
    PAGE_SIZE,
    REF_OFFSET,
    RING_ORDER_OFFSET,
    flex_ring_size,
)
from ._common import RESETS_IN_A_ROW, U32

if TYPE_CHECKING:
    from xenback.platform import EventChannel, GrantShare, SharedPages

# One logger for the whole frontend library, as concurrent.futures has.
logger = logging.getLogger("pvcalls.frontend")


_I32 = struct.Struct("=i")


class DataRing:
    """An active socket's shared pages: the indexes page and 2**order data
    pages, granted to the backend, and the event channel that goes with
    them.  The frontend initialises them; only the frontend frees them.

    ``evtchn`` is the handle the port is bound on: one of the ring's own
    (``direct``: the socket's blocked callers poll it, see
    :meth:`PVSocket._wait`) or the frontend's shared one (its event thread
    relays the port's events).  Each of the two callers that may block on
    the ring, the receiver (:data:`RECV`) and the sender (:data:`SEND`), has
    an eventfd in ``wakefds`` polled with the handle, so that whoever else
    consumed the ring's event (the other caller, or the event thread), or
    closes the socket, can wake it.
    """

    def __init__(
        self,
        gntshr: GrantShare,
        evtchn: EventChannel,
        backend_id: int,
        order: int,
        *,
        direct: bool = False,
        into: list[DataRing] | None = None,
    ) -> None:
        """Whole or nothing.  A handle of the ring's own (``direct``) is
        the ring's once it is made, to close when it is freed; until then
        it is the caller's, also when the making fails.  With ``into``,
        the ring is appended to it as the last step: for a caller that
        must free it whatever interrupts its making, a Ctrl-C as this
        returns included, which would lose a ring made whole."""
        self.evtchn = evtchn
        self.direct = direct
        self.relayed = False  # the frontend's event thread watches ``evtchn``
        # A handle of its own: its resets since a pending() last answered,
        # and, once it is taken for broken, why (see consume_events).
        # Written by whoever consumes the ring's events, two threads at
        # once at times: a count lost between them delays the verdict by
        # a reset, and the verdict, once written, stays.
        self._resets = 0
        self.failure: str | None = None
        # What free() has released so far, one entry per step (see free).
        self._released: list[object] = []
        # Set under the frontend's _lock by whoever frees the ring (see
        # Frontend._finish_each): one thread at a time.  Given back without
        # the lock by that thread alone, as a Ctrl-C stops it: no call, so
        # no handler, between the interrupt and the give-back.
        self.claimed = False
        # Whole or nothing: short of grants, ports or descriptors any step
        # may fail, and what the steps before made is given back before the
        # error goes on.  Each step's result is recorded by the call that
        # makes it (list.extend() stores it before control is back in
        # Python code), the eventfds being ints that nothing closes.
        pages: list[SharedPages] = []
        ports: list[int] = []
        wakefds: list[int] = []
        try:
            pages.extend(map(gntshr.share_pages, (backend_id,), (1 + (1 << order),)))
            self._lay_out(pages[0], order)
            ports.extend(map(evtchn.bind_unbound_port, (backend_id,)))
            # Indexed by RECV and SEND, each used by that caller only.
            flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
            wakefds.extend(map(os.eventfd, (0, 0), (flags, flags)))
            self.pollers = (select.poll(), select.poll())
            for poller, wakefd in zip(self.pollers, wakefds, strict=True):
                if direct:
                    poller.register(evtchn.fileno(), select.POLLIN)
                poller.register(wakefd, select.POLLIN)
            self.port = ports[0]
            self.wakefds = (wakefds[0], wakefds[1])
            if into is not None:
                into.append(self)
        except BaseException:
            if into and into[-1] is self:
                del into[-1]  # interrupted as append() returned
            for wakefd in wakefds:
                os.close(wakefd)
            # The handle stays the caller's: its port goes, not the handle.
            for port in ports:
                try:
                    evtchn.unbind(port)
                except OSError as exc:
                    logger.debug("unbinding port %d: %s", port, exc)
            for shared in pages:
                shared.unshare()
            raise

    def _lay_out(self, pages: SharedPages, order: int) -> None:
        """Write the ring's order and data refs into its indexes page, and
        make its two queues over the data pages."""
        npages = 1 << order
        size = flex_ring_size(order)
        self.pages = pages
        buf = pages.buffer
        self.indexes = buf[:PAGE_SIZE]
        data = buf[PAGE_SIZE:]
        refs = pages.refs
        U32.pack_into(self.indexes, RING_ORDER_OFFSET, order)
        for i in range(npages):
            U32.pack_into(self.indexes, REF_OFFSET + 4 * i, refs[1 + i])
        self.ref = refs[0]
        # in: the backend produces, we consume.  out: the other way round.
        self.inq = FlexRing(
            data[:size], self.indexes, prod_offset=IN_PROD_OFFSET, cons_offset=IN_CONS_OFFSET
        )
        self.outq = FlexRing(
            data[size : 2 * size],
            self.indexes,
            prod_offset=OUT_PROD_OFFSET,
            cons_offset=OUT_CONS_OFFSET,
        )

    def notify(self) -> None:
        """Tell the backend we produced or consumed."""
        self.evtchn.notify(self.port)

    def consume_events(self) -> bool:
        """Take (and unmask) the ring's fired port from a handle of its own;
        True if it had fired.  Any thread may call it: whoever gets the
        event wakes the others (the event thread through
        PVSocket._on_event, a blocked recv() or send() by writing the
        other side's wakefd itself, see PVSocket._wait).

        A handle that overflows again at once after every reset is
        broken, and its descriptor stays readable: its waiters would
        reset it, take the port as fired and poll again, for ever.  After
        ``RESETS_IN_A_ROW`` resets with no pending() that answered between
        them, as for the frontend's shared handle, the ring fails: the
        handle is left overflowed, and every call raises :class:`OSError`
        EIO, saying why, which :attr:`failure` keeps for the socket's
        waiters (see PVSocket._wait)."""
        # One pending() is enough: the handle has this one port, which is
        # pending at most once, and a notify that comes after the unmask
        # makes the descriptor readable again.  (Asking until None costs the
        # simulated handle two more system calls per event.)
        evtchn = self.evtchn
        try:
            fired = evtchn.pending() is not None
        except OSError as exc:
            if exc.errno != errno.EFBIG:
                raise
            self._overflowed(exc)
            fired = True
        else:
            # Its queue holds the one port, twice at most (queued after a
            # reset, then again after the unmask below), far from full: a
            # read that took it, not only one that found none, says that
            # the overflow is over.
            self._resets = 0
            if not fired:
                return False
        evtchn.unmask(self.port)
        return True

    def _overflowed(self, overflow: OSError) -> None:
        """The handle's queue of fired ports overflowed (it cannot with
        one port taken before its unmask, but a handle may say so): reset
        it, the port to be taken as fired, its event maybe lost; or fail
        the ring, if the reset does not help (see :meth:`consume_events`)."""
        if self._resets >= RESETS_IN_A_ROW:
            if self.failure is None:
                self.failure = (f"the event channel handle of its data ring overflowed again "
                                f"after {self._resets} resets in a row, its port never taken "
                                f"between them (a reset empties its queue): the handle is broken")
                logger.warning("pvcalls frontend: data ring on port %d: %s", self.port,
                               self.failure)
            raise OSError(errno.EIO, self.failure) from overflow
        self._resets += 1  # first: a reset seen done is counted
        self.evtchn.reset()

    # Peeks for wait predicates and the readiness eventfd: they must not
    # disturb the FlexRing's notion of the last readable()/writable().
    def in_pending(self) -> bool:
        return U32.unpack_from(self.indexes, IN_PROD_OFFSET) != U32.unpack_from(
            self.indexes, IN_CONS_OFFSET
        )

    def in_available(self) -> int:
        """How many bytes the in ring holds (more than its size if the
        backend broke the indexes: the reader finds out)."""
        return (U32.unpack_from(self.indexes, IN_PROD_OFFSET)[0]
                - U32.unpack_from(self.indexes, IN_CONS_OFFSET)[0]) & 0xFFFFFFFF

    def out_has_room(self) -> bool:
        """Room in the out ring, or indexes the backend broke (``used >
        size``): either way a blocked send() must look (and raise EPROTO)."""
        # Our out_prod store before this read of out_cons (see send()).
        mb()
        used = (
            U32.unpack_from(self.indexes, OUT_PROD_OFFSET)[0]
            - U32.unpack_from(self.indexes, OUT_CONS_OFFSET)[0]
        ) & 0xFFFFFFFF
        return used != self.outq.size

    def reset(self) -> None:
        """Make a recycled ring new: indexes and errors back to zero (the
        ring order and grant references stay), and its handle's resets
        (one that failed is not recycled)."""
        self._resets = 0
        for offset in (IN_CONS_OFFSET, IN_PROD_OFFSET, IN_ERROR_OFFSET,
                       OUT_CONS_OFFSET, OUT_PROD_OFFSET, OUT_ERROR_OFFSET):
            U32.pack_into(self.indexes, offset, 0)

    def in_was_full(self, cons: int) -> bool:
        """After a consume: was the in ring full with ``cons``, our index
        before it?  Read after our in_cons store and a full barrier (see
        PVSocket.recv_into)."""
        mb()
        prod = U32.unpack_from(self.indexes, IN_PROD_OFFSET)[0]
        return (prod - cons) & 0xFFFFFFFF >= self.inq.size

    def in_error(self) -> int:
        return int(_I32.unpack_from(self.indexes, IN_ERROR_OFFSET)[0])

    def out_error(self) -> int:
        return int(_I32.unpack_from(self.indexes, OUT_ERROR_OFFSET)[0])

    def set_in_error(self, value: int) -> None:
        _I32.pack_into(self.indexes, IN_ERROR_OFFSET, value)

    def free(self) -> None:
        """Give back what the ring holds: its port, its own handle, the
        eventfds and the granted pages.

        Resumable: a Ctrl-C may land anywhere in it, and a free() again
        releases what is left, each resource at most once (a port or a
        descriptor released twice may be someone else's by then).  So each
        release is recorded by the call that makes it, as __init__ records
        what it makes, and one that fails counts as done: there is nothing
        left to retry.  Not by two threads at once: the frontend claims a
        ring before it frees it (see Frontend._free_rings)."""
        done = self._released
        if not done and self.direct:
            # Read the service's news about our port (the backend unbinding
            # it) while the port is still ours to be told about.
            try:
                self.consume_events()
            except OSError:
                pass
        steps = self._releases()
        while len(done) < len(steps):
            release, what = steps[len(done)]
            try:
                done.extend(map(operator.call, (release,)))
            except OSError as exc:
                done.append(exc)  # first: recorded before a handler may run
                # The unbind (the first step) may fail harmlessly; any other
                # step that fails keeps what it held for good: say so.
                level = logging.DEBUG if len(done) == 1 else logging.WARNING
                logger.log(level, "freeing the data ring on port %d: %s: %s",
                           self.port, what, exc)

    def _releases(self) -> list[tuple[Callable[[], object], str]]:
        """free()'s steps, in order: the same list every time."""
        steps: list[tuple[Callable[[], object], str]] = [
            (functools.partial(self.evtchn.unbind, self.port), "unbinding its port")]
        if self.direct:
            steps.append((self.evtchn.close, "closing its handle"))
        steps.extend((functools.partial(os.close, wakefd), f"closing eventfd {wakefd}")
                     for wakefd in self.wakefds)
        # Repeatable: a view released twice is released.  Before the pages
        # go (see _release_views).
        steps.append((self._release_views, "releasing its views"))
        steps.append((self.pages.unshare, "unsharing its pages"))
        return steps

    def _release_views(self) -> None:
        # A view whose buffer something still exports (a cffi or numpy
        # object over it) cannot be released.  Left as it is, it sees the
        # zero pages that unsharing puts in the grants' place, as xenback
        # leaves such views of its own pages; raised, it would keep the
        # pages shared and stop every ring freed after this one.
        for view in (self.inq, self.outq, self.indexes):
            try:
                view.release()
            except BufferError as exc:
                logger.debug("freeing the data ring on port %d: a view is exported: %s",
                             self.port, exc)
