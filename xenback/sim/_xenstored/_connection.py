"""Per-domain and per-connection state.

Threading: none.  Everything here belongs to the server's loop thread.
"""

from __future__ import annotations

import collections
import logging
import socket
from pathlib import Path

from ._transaction import Transaction
from ._tree import domain_path
from ._watch import Watch

__all__ = ["Domain", "Connection", "Outstanding", "WaitingEvent"]


class Domain:
    """An introduced domain, as the store sees it.

    Quotas that cxenstored keeps per domain (watches, transactions) are
    counted here, summed over the domain's connections.
    """

    __slots__ = (
        "domid", "privileged", "target", "conns", "nwatches", "ntransactions",
        "listener", "socket_path", "warned", "queued", "outstanding",
    )

    def __init__(self, domid: int, privileged: bool) -> None:
        self.domid = domid
        self.privileged = privileged
        #: domain this one acts for (XS_SET_TARGET: a device model's guest)
        self.target: int | None = None
        self.conns: set[Connection] = set()
        self.nwatches = 0
        self.ntransactions = 0
        #: the Unix socket whose connections are this domain (None for dom0,
        #: whose socket is the server's main one)
        self.listener: socket.socket | None = None
        self.socket_path: Path | None = None
        #: a warning about this domain's misbehaviour was logged (see
        #: fault_level)
        self.warned = False
        #: bytes waiting in the ``out`` of this domain's connections (its
        #: share of the server's memory: see XenStored.max_queued)
        self.queued = 0
        #: requests of this domain outstanding: some watch event each
        #: caused still waits in the server, for any client; only a
        #: guest's are counted (see Quota.outstanding and Outstanding)
        self.outstanding = 0

    def fault_level(self) -> int:
        """The level to log this domain's fault at: WARNING, but for a guest
        only the first time.  A guest can commit any number of them (one
        per connection it opens, or per watch it sets up) and must not fill
        the host's log."""
        if self.privileged:
            return logging.WARNING
        if self.warned:
            return logging.DEBUG
        self.warned = True
        return logging.WARNING

    def __repr__(self) -> str:
        return f"Domain({self.domid})"


class Outstanding:
    """A guest's request whose watch events wait in the server: one of
    its Domain.outstanding until the last of them is sent or dropped, as
    cxenstored keeps a request until the events it caused are written
    (its pend.ref.event_cnt)."""

    __slots__ = ("domain", "events")

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        #: its events that wait, for whichever client
        self.events = 0

    def __repr__(self) -> str:
        return f"Outstanding({self.domain}, events={self.events})"


class WaitingEvent:
    """A watch event waiting in a connection's ``out``: where it lies (as
    offsets in everything ever queued for the client, see
    ``Connection.out_base``), the guest's request it counts in, and when
    it goes stale."""

    __slots__ = ("start", "end", "cause", "deadline")

    def __init__(self, start: int, end: int, cause: Outstanding | None,
                 deadline: float) -> None:
        self.start = start
        self.end = end
        #: the guest's request that caused it, outstanding until this and
        #: its other events are sent or dropped (None: nobody is charged,
        #: it was the server's doing or a privileged client's)
        self.cause = cause
        #: time.monotonic() at which it is dropped unless sending it has
        #: begun (inf: never; events for privileged clients)
        self.deadline = deadline


class Connection:
    """One client connection: its buffers, watches and transactions."""

    __slots__ = (
        "sock", "fd", "domain", "home", "inbuf", "out", "out_base", "queued_events",
        "watches", "transactions", "next_tx_id", "closed", "paused", "events", "name",
        "waiting", "expiry_armed", "eof",
    )

    def __init__(self, sock: socket.socket, domain: Domain, name: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.domain = domain
        #: where relative paths resolve: /local/domain/<domid>
        self.home = domain_path(domain.domid)
        #: received bytes not yet forming a complete message
        self.inbuf = b""
        #: bytes queued for the client, not yet accepted by the kernel
        self.out = bytearray()
        #: bytes of output the kernel has taken so far: the offset of
        #: ``out[0]`` in everything ever queued for this client
        self.out_base = 0
        #: watch events waiting in ``out``, wholly or in part (whole
        #: messages) -> the offset just past them, oldest first.  Every
        #: entry waits: only XenStored._flush moves ``out_base``, and it
        #: drops the entries the kernel has taken (_forget_sent_events);
        #: _expire drops those of the stale events it takes out.
        self.queued_events: dict[bytes, int] = {}
        #: watch events in ``out``, oldest first: for a guest's connection
        #: every one (each goes stale), for a privileged one those a guest
        #: caused.  Each charged one keeps its guest's request
        #: outstanding until the kernel takes it whole or it is dropped as
        #: stale.
        self.waiting: collections.deque[WaitingEvent] = collections.deque()
        #: an entry for this connection is in XenStored._expiry
        self.expiry_armed = False
        self.watches: list[Watch] = []
        self.transactions: dict[int, Transaction] = {}
        self.next_tx_id = 1
        self.closed = False
        #: not reading requests until the client has read its replies, or
        #: (a guest) until the events it caused are read or go stale
        self.paused = False
        #: the client shut its writing side (EOF read) with replies still
        #: waiting in ``out``: nothing more is read, and the connection
        #: closes once they are sent
        self.eof = False
        #: selector event mask currently registered (0: not registered)
        self.events = 0
        self.name = name

    @property
    def domid(self) -> int:
        return self.domain.domid

    @property
    def privileged(self) -> bool:
        return self.domain.privileged

    @property
    def target(self) -> int | None:
        return self.domain.target

    def __repr__(self) -> str:
        return f"Connection({self.name}, dom{self.domain.domid})"
