"""The operations: one handler per XenStore request type.

:class:`Dispatcher` owns the store, the watch index and the domain table and
turns each request into exactly one reply (plus any watch events, which are
queued *after* the reply of the request that caused them: that is the order
the initial event of XS_WATCH needs, and harmless for every other event).

Semantics follow cxenstored of Xen 4.17 and docs/misc/xenstore.txt; where
this module simplifies, the docstring of the handler says so.

Threading: none.  The server calls :meth:`Dispatcher.handle` from its loop
thread only, and the store, watches and domains are touched only there.
It logs through :func:`~xenback.sim._heldlog.log`: the loop thread keeps
its records, to emit where no stop() waits on it (see the server's _say).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable

from xenback._flags import DOMID_FIRST_RESERVED

from .._heldlog import log
from ._connection import Connection, Domain
from ._transaction import Transaction
from ._tree import (
    PERM_READ,
    PERM_WRITE,
    SPECIAL_PATHS,
    Node,
    Perms,
    Store,
    basename,
    canonicalize,
    domain_path,
    format_perms,
    node_size,
    parent_of,
    parse_domid,
    parse_perms,
    perm_for,
)
from ._watch import Watch, WatchIndex
from ._wire import HEADER, PAYLOAD_MAX, Op, XsError

__all__ = ["Dispatcher", "Quota"]

logger = logging.getLogger(__name__)

View = Store | Transaction
Handler = Callable[[Connection, View, bytes], bytes]

_OK = b"OK\0"
_DOMID_SELF = 0x7FF0


@dataclasses.dataclass(frozen=True)
class Quota:
    """Limits for unprivileged domains; the defaults are cxenstored's.

    Exceeding one is ENOSPC.  Privileged connections have none.
    """

    nodes: int = 1000  #: nodes a domain may own
    watches: int = 128  #: watches per domain
    transactions: int = 10  #: open transactions per domain
    node_size: int = 2048  #: a node record must be smaller (see _tree.node_size)
    perms: int = 5  #: permission entries per node
    transaction_nodes: int = 1024  #: nodes one transaction may touch
    #: connections on a domain's socket (not in cxenstored, where a domain
    #: has exactly one ring; here a guest could otherwise open any number)
    connections: int = 64
    #: requests of a domain that may be outstanding: some watch event
    #: each caused waits in the server (for any client).  At this many,
    #: its further requests wait until those clients read or, for
    #: guests, the events go stale.  As cxenstored's
    #: quota_req_outstanding: one request counts once however many
    #: events it fired (see XenStored._send_events).
    outstanding: int = 20

    def __post_init__(self) -> None:
        # Any other limit at 0 fails requests; this one would stall a
        # guest's first request for good (no event of its waits, so none
        # is ever sent or dropped to wake it).
        if self.outstanding < 1:
            raise ValueError(f"Quota.outstanding must be at least 1, not {self.outstanding}")


# --- argument parsing: cxenstored's onearg() and get_strings() -------------


def _onearg(payload: bytes) -> str:
    """The single NUL-terminated string a request must consist of."""
    if not payload or payload.find(0) != len(payload) - 1:
        raise XsError("EINVAL", "expected exactly one NUL-terminated argument")
    return payload[:-1].decode("latin-1")


def _strings(payload: bytes) -> list[str]:
    """All complete NUL-terminated strings; unterminated trailing bytes are ignored."""
    parts = payload.split(b"\0")
    parts.pop()  # what follows the last NUL: empty, or not a complete string
    return [p.decode("latin-1") for p in parts]


_atoi_prefix = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)?").match


def _atoi(text: str) -> int:
    """C's atoi(), which cxenstored reads some numbers with: the leading
    decimal digits after optional space and sign; 0 if there are none."""
    m = _atoi_prefix(text)  # matches any text, if only its empty start
    return int(m[1]) if m and m[1] else 0


def _nstrings(payload: bytes, n: int) -> list[str]:
    strings = _strings(payload)
    if len(strings) != n:
        raise XsError("EINVAL", f"expected {n} NUL-terminated arguments")
    return strings


class Dispatcher:
    """Processes requests against one store.

    ``send(conn, data)`` queues bytes for a connection; ``send_events(
    events, cause)`` queues the watch events ``[(conn, message), ...]``
    that one request of ``cause`` (the requester's domain, or None)
    brought about, any of which the server may drop if an identical one
    still waits for that client or the client is a guest over its share.  ``introduce(domid)`` and
    ``release(domid)`` are the server's hooks that create and tear down a
    domain's socket; they return the Domain and nothing respectively.
    """

    def __init__(
        self,
        send: Callable[[Connection, bytes], None],
        send_events: Callable[[list[tuple[Connection, bytes]], Domain | None], None],
        introduce: Callable[[int], Domain],
        release: Callable[[int], None],
        quota: Quota | None = None,
    ) -> None:
        self.store = Store()
        self.watches = WatchIndex()
        self.dom0 = Domain(0, privileged=True)
        self.domains: dict[int, Domain] = {0: self.dom0}
        self.quota = quota or Quota()
        self._send = send
        self._send_events = send_events
        self._introduce = introduce
        self._release = release
        #: events caused by the request being processed, sent after its reply
        self._deferred: list[tuple[Connection, bytes]] = []
        self._handlers: list[Handler | None] = [None] * (max(Op) + 1)
        self._notid = frozenset((Op.WATCH, Op.UNWATCH))
        self._privileged_only = frozenset(
            (Op.CONTROL, Op.INTRODUCE, Op.RELEASE, Op.IS_DOMAIN_INTRODUCED,
             Op.RESUME, Op.SET_TARGET)
        )
        for op, handler in (
            (Op.CONTROL, self._control),
            (Op.DIRECTORY, self._directory),
            (Op.READ, self._read),
            (Op.GET_PERMS, self._get_perms),
            (Op.WATCH, self._watch),
            (Op.UNWATCH, self._unwatch),
            (Op.TRANSACTION_START, self._transaction_start),
            (Op.TRANSACTION_END, self._transaction_end),
            (Op.INTRODUCE, self._introduce_op),
            (Op.RELEASE, self._release_op),
            (Op.GET_DOMAIN_PATH, self._get_domain_path),
            (Op.WRITE, self._write),
            (Op.MKDIR, self._mkdir),
            (Op.RM, self._rm),
            (Op.SET_PERMS, self._set_perms),
            (Op.IS_DOMAIN_INTRODUCED, self._is_domain_introduced),
            (Op.RESUME, self._resume),
            (Op.SET_TARGET, self._set_target),
            (Op.RESET_WATCHES, self._reset_watches),
            (Op.DIRECTORY_PART, self._directory_part),
        ):
            self._handlers[op] = handler

    # --- entry point ------------------------------------------------------

    def handle(self, conn: Connection, op: int, req_id: int, tx_id: int, payload: bytes) -> None:
        """Process one complete request from ``conn`` and queue its reply."""
        handler = self._handlers[op] if op < len(self._handlers) else None
        try:
            if handler is None:
                raise XsError("ENOSYS", f"unknown operation {op}")
            if op in self._privileged_only and not conn.domain.privileged:
                raise XsError("EACCES", "privileged operation")
            view: View = self.store
            if tx_id and op == Op.TRANSACTION_START:
                # Transactions do not nest.  (cxenstored looks the id up
                # first and says ENOENT for an unknown one; the protocol
                # reference says EBUSY for any.)
                raise XsError("EBUSY", "TRANSACTION_START inside a transaction")
            if tx_id and op not in self._notid:
                tx = conn.transactions.get(tx_id)
                if tx is None:
                    raise XsError("ENOENT", f"no transaction {tx_id}")
                # (The transaction-nodes quota is the transaction's own
                # check, when it first touches a node: see Transaction.)
                view = tx
            reply = handler(conn, view, payload)
            if len(reply) > PAYLOAD_MAX:
                raise XsError("E2BIG", "reply too long")
        except XsError as e:
            log(logger).debug("%r op %s: %s", conn, op, e)
            self._send(conn, HEADER.pack(Op.ERROR, req_id, tx_id, len(e.name) + 1)
                       + e.name.encode() + b"\0")
        else:
            self._send(conn, HEADER.pack(op, req_id, tx_id, len(reply)) + reply)
        finally:
            # Also when a bug cuts the request short (costing the
            # connection): what it changed has fired watches, which would
            # otherwise go out after some later request, charged to that
            # request's domain.
            if self._deferred:
                self.flush_deferred(conn.domain)

    # --- node access with cxenstored's permission rules ---------------------

    def _path(self, conn: Connection, raw: str, special_ok: bool = False) -> str:
        return canonicalize(raw, conn.home, special_ok=special_ok)

    def _may(self, conn: Connection, node: Node, want: int) -> bool:
        domain = conn.domain
        if domain.privileged:
            return True
        return perm_for(node.perms, domain.domid, domain.target) & want == want

    def _missing(self, conn: Connection, view: View, path: str, want: int) -> XsError:
        """The error for a missing node: ENOENT, or EACCES if the nearest
        existing ancestor would not have allowed ``want`` (so that the error
        does not tell an unprivileged domain what exists where it may not
        look).  A special path's parent is "/" (cxenstored's get_parent()),
        so a guest asking for a missing one is answered by the root's
        permissions: EACCES unless they allow what it asked.

        The ancestors are looked at in the view, so a transaction records
        them as read, for privileged callers too: cxenstored's get_node()
        asks them (errno_from_parents()) whoever calls, and read_node()
        puts every node it reads on the transaction's access list, whose
        changes fail the commit."""
        if conn.domain.privileged and not isinstance(view, Transaction):
            return XsError("ENOENT", path)  # nothing to record
        node = self._nearest_ancestor(view, path)
        if conn.domain.privileged or (
            node is not None and perm_for(node.perms, conn.domid, conn.target) & want
        ):
            return XsError("ENOENT", path)
        return XsError("EACCES", path)

    @staticmethod
    def _nearest_ancestor(view: View, path: str) -> Node | None:
        p = path
        while p != "/":
            p = parent_of(p)
            node = view.get(p)
            if node is not None:
                return node
        return None

    def _denied(self, view: View, path: str) -> XsError:
        """EACCES for an existing node the caller may not use as it asked.
        cxenstored's get_node() consults the ancestors here too (the answer
        is EACCES either way), so a transaction records them as read."""
        if isinstance(view, Transaction):
            self._nearest_ancestor(view, path)
        return XsError("EACCES", path)

    def _lookup(self, conn: Connection, view: View, path: str, want: int) -> Node:
        node = view.get(path)
        if node is None:
            raise self._missing(conn, view, path, want)
        if not self._may(conn, node, want):
            raise self._denied(view, path)
        return node

    def _check_size(self, conn: Connection, view: View, node: Node) -> None:
        """ENOSPC for an unprivileged writer if ``node`` is too big.

        Inside a transaction this also fails the transaction: cxenstored's
        write_node() has put the node on the transaction's access list
        before write_node_raw() refuses it and, not undoing that, marks the
        transaction failed (fail_transaction()), so that its commit
        answers ENOMEM."""
        if not conn.domain.privileged and node_size(node) >= self.quota.node_size:
            if isinstance(view, Transaction):
                view.failed = True
            raise XsError("ENOSPC", "node too big")

    def _create(self, conn: Connection, view: View, path: str, value: bytes) -> Node:
        """Create ``path`` and any missing ancestors (empty values).

        New nodes inherit their parent's permissions; an unprivileged
        creator becomes the owner.  All quota checks happen before anything
        is written, so a failure leaves the store untouched.
        """
        missing = [path]
        parent_path = parent_of(path)
        parent = view.get(parent_path)
        while parent is None:
            missing.append(parent_path)
            parent_path = parent_of(parent_path)
            parent = view.get(parent_path)
        domain = conn.domain
        if not domain.privileged:
            if view.count(domain.domid) + len(missing) > self.quota.nodes:
                raise XsError("ENOSPC", "node quota exceeded")
        new_parent = parent.replace(children={**parent.children, basename(missing[-1]): None})
        self._check_size(conn, view, new_parent)
        created: list[tuple[str, Node]] = []
        perms = parent.perms
        if not domain.privileged:
            perms = ((domain.domid, perms[0][1]), *perms[1:])
        for i in range(len(missing) - 1, -1, -1):
            name = missing[i]
            children = {basename(missing[i - 1]): None} if i else {}
            node = Node(value if not i else b"", perms, children)
            self._check_size(conn, view, node)
            created.append((name, node))
        view.put(parent_path, new_parent)
        for name, node in created:
            view.put(name, node)
        return created[-1][1]

    # --- watch events -----------------------------------------------------

    def _fire(self, view: View, path: str, subtree: bool, perms: Perms,
              old_perms: Perms | None = None) -> None:
        """Fire the watches a change of ``path`` triggers.

        Inside a transaction the event is queued and fires on commit, to
        the watchers :meth:`_fire_committed` picks (the permissions given
        here do not count then).  Otherwise ``perms`` are the node's
        permissions at the time of the change: a watcher receives the
        event if it may read the node or its parent (or, for a permission
        change, could read it under ``old_perms``).
        """
        if isinstance(view, Transaction):
            view.add_event(path, subtree)
            return
        for watch in self.watches.matching(path, subtree):
            target = watch.conn
            if target.domain.privileged or self._watch_permitted(
                target, path, perms, old_perms
            ):
                self._queue_event(watch, path)

    def _queue_event(self, watch: Watch, path: str) -> None:
        """Queue the event of ``watch`` naming ``path``, unless it is over-long.

        A token may fill a WATCH request up to XENSTORE_PAYLOAD_MAX, so the
        event for a path longer than the watched one can exceed it.  No
        client can take such a message: libxenstore drops the connection and
        pyxs's reader thread dies, and with them every later event.  Like
        cxenstored's send_event(), drop it: the watcher loses one event
        rather than all of them.
        """
        payload = watch.event_payload(path)
        if len(payload) > PAYLOAD_MAX:
            watch.dropped += 1
            # Warn once per watch, and for a guest's watches once per guest:
            # it can set up any number of watches in turn.
            level = watch.conn.domain.fault_level() if watch.dropped == 1 else logging.DEBUG
            log(logger).log(
                level,
                "%r: dropped an event of the watch on %.64s: path %.64s (%d bytes) "
                "and token (%d bytes) make %d bytes, over XENSTORE_PAYLOAD_MAX (%d)",
                watch.conn, watch.node, path, len(path) - watch.prefix_len,
                len(watch.token), len(payload), PAYLOAD_MAX,
            )
            return
        self._deferred.append(
            (watch.conn, HEADER.pack(Op.WATCH_EVENT, 0, 0, len(payload)) + payload)
        )

    def _watch_permitted(
        self, conn: Connection, path: str, perms: Perms, old_perms: Perms | None
    ) -> bool:
        domain = conn.domain
        if perm_for(perms, domain.domid, domain.target) & PERM_READ:
            return True
        if old_perms and perm_for(old_perms, domain.domid, domain.target) & PERM_READ:
            return True
        if path[0] != "/" or path == "/":
            return False
        parent = self.store.get(parent_of(path))
        return parent is not None and bool(
            perm_for(parent.perms, domain.domid, domain.target) & PERM_READ
        )

    def fire_special(self, name: str) -> None:
        """Fire @introduceDomain or @releaseDomain (exact watchers only)."""
        node = self.store.get(name)
        assert node is not None
        self._fire(self.store, name, False, node.perms)

    def flush_deferred(self, cause: Domain | None = None) -> None:
        """Send the events raised by a request of ``cause``, after its
        reply, or outside one (domain introduce/release: no cause)."""
        deferred, self._deferred = self._deferred, []
        if deferred:
            self._send_events(deferred, cause)

    # --- handlers: reading ---------------------------------------------------

    def _read(self, conn: Connection, view: View, payload: bytes) -> bytes:
        path = self._path(conn, _onearg(payload))
        return self._lookup(conn, view, path, PERM_READ).value

    def _directory(self, conn: Connection, view: View, payload: bytes) -> bytes:
        path = self._path(conn, _onearg(payload))
        node = self._lookup(conn, view, path, PERM_READ)
        return "".join(f"{c}\0" for c in node.children).encode("latin-1")

    def _directory_part(self, conn: Connection, view: View, payload: bytes) -> bytes:
        """Children from a byte offset into the NUL-separated child list.

        Reply: the node's generation, then as many children as fit; an extra
        empty string marks the end of the list.
        """
        raw_path, raw_offset = _nstrings(payload, 2)
        node = self._lookup(conn, view, self._path(conn, raw_path), PERM_READ)
        offset = _atoi(raw_offset)
        gen = f"{node.generation}\0".encode()
        children = "".join(f"{c}\0" for c in node.children).encode("latin-1")
        if offset < 0 or offset >= len(children):
            return gen + b"\0"
        room = PAYLOAD_MAX - len(gen) - 1
        end = offset
        while end < len(children):
            nul = children.index(b"\0", end)
            if nul + 1 - offset > room:
                break
            end = nul + 1
        part = children[offset:end]
        if end == len(children):
            part += b"\0"
        return gen + part

    def _get_perms(self, conn: Connection, view: View, payload: bytes) -> bytes:
        path = self._path(conn, _onearg(payload), special_ok=True)
        return format_perms(self._lookup(conn, view, path, PERM_READ).perms)

    def _get_domain_path(self, conn: Connection, view: View, payload: bytes) -> bytes:
        return f"{domain_path(parse_domid(_onearg(payload)))}\0".encode()

    def _is_domain_introduced(self, conn: Connection, view: View, payload: bytes) -> bytes:
        domid = parse_domid(_onearg(payload))
        return b"T\0" if domid == _DOMID_SELF or domid in self.domains else b"F\0"

    # --- handlers: writing -----------------------------------------------------

    def _write(self, conn: Connection, view: View, payload: bytes) -> bytes:
        nul = payload.find(0)
        if nul < 0:
            raise XsError("EINVAL", "WRITE without a NUL-terminated path")
        path = self._path(conn, payload[:nul].decode("latin-1"))
        value = payload[nul + 1 :]
        node = view.get(path)
        if node is None:
            err = self._missing(conn, view, path, PERM_WRITE)
            if err.name != "ENOENT":
                raise err
            node = self._create(conn, view, path, value)
        else:
            if not self._may(conn, node, PERM_WRITE):
                raise self._denied(view, path)
            node = node.replace(value=value)
            self._check_size(conn, view, node)
            view.put(path, node)
        self._fire(view, path, True, node.perms)
        return _OK

    def _mkdir(self, conn: Connection, view: View, payload: bytes) -> bytes:
        path = self._path(conn, _onearg(payload))
        node = view.get(path)
        if node is not None:
            if not self._may(conn, node, PERM_WRITE):
                raise self._denied(view, path)
            return _OK
        err = self._missing(conn, view, path, PERM_WRITE)
        if err.name != "ENOENT":
            raise err
        node = self._create(conn, view, path, b"")
        self._fire(view, path, True, node.perms)
        return _OK

    def _rm(self, conn: Connection, view: View, payload: bytes) -> bytes:
        """Remove a subtree.  A missing node is fine if its parent exists.

        Events: the removed node fires subtree-style (its watchers and its
        ancestors' watchers), every removed descendant fires its exact
        watchers; children go before parents, as cxenstored walks.
        """
        path = self._path(conn, _onearg(payload))
        node = view.get(path)
        if node is None:
            err = self._missing(conn, view, path, PERM_WRITE)
            if err.name != "ENOENT":
                raise err
            if path != "/" and view.get(parent_of(path)) is not None:
                return _OK
            raise err
        if not self._may(conn, node, PERM_WRITE):
            raise self._denied(view, path)
        if path == "/":
            raise XsError("EINVAL", "cannot remove /")
        self._remove(view, path, node)
        return _OK

    def _remove(self, view: View, path: str, node: Node) -> None:
        """Delete ``node`` at ``path`` (not "/") with its subtree, firing watches."""
        # Iterative post-order walk: a deep tree must not hit the recursion limit.
        stack: list[tuple[str, Node, bool]] = [(path, node, False)]
        while stack:
            p, n, expanded = stack.pop()
            if not expanded and n.children:
                stack.append((p, n, True))
                for child in reversed(n.children):
                    child_path = f"{p}/{child}"
                    c = view.get(child_path)
                    if c is not None:
                        stack.append((child_path, c, False))
                continue
            view.delete(p)
            self._fire(view, p, p == path, n.perms)
        parent_path = parent_of(path)
        parent = view.get(parent_path)
        if parent is None or basename(path) not in parent.children:
            # A transaction sees each node as it was when it first looked at
            # it: if another client changed the node or its parent between
            # those looks, they disagree.  Then one of them changed after
            # the transaction read it, so the commit fails with EAGAIN
            # anyway; until then the subtree is gone from its view.
            assert isinstance(view, Transaction), f"{path} existed without its parent"
            return
        children = dict(parent.children)
        del children[basename(path)]
        view.put(parent_path, parent.replace(children=children))

    def remove_domain_nodes(self, domid: int) -> None:
        """Forget a released domain, as cxenstored does (XSA-322).

        Nodes it owns go, with their subtrees (watches fire as for RM),
        but "/" and the special nodes, which go to dom0; permission
        entries naming it are dropped from every other node (silently), so
        that a later domain with the same id inherits nothing.  Open
        transactions learn of the release at commit (see _transaction.py).
        """
        store = self.store
        store.note_release(domid)
        stack = ["/"]
        while stack:
            path = stack.pop()
            node = store.get(path)
            if node is None:
                continue
            if node.owner == domid and path != "/":
                self._remove(store, path, node)
                continue
            self._strip_perms(path, node, domid)
            prefix = path if path != "/" else ""
            stack.extend(f"{prefix}/{child}" for child in node.children)
        for special in SPECIAL_PATHS:
            node = store.get(special)
            assert node is not None
            self._strip_perms(special, node, domid)

    def _strip_perms(self, path: str, node: Node, domid: int) -> None:
        perms = node.perms
        if perms[0][0] == domid:  # only "/" and the special nodes get here owned by domid
            perms = ((0, perms[0][1]), *perms[1:])
        perms = (perms[0], *(p for p in perms[1:] if p[0] != domid))
        if perms != node.perms:
            self.store.put(path, node.replace(perms=perms))

    def _set_perms(self, conn: Connection, view: View, payload: bytes) -> bytes:
        strings = _strings(payload)
        if len(strings) < 2:
            raise XsError("EINVAL", "SET_PERMS needs a path and permissions")
        domain = conn.domain
        if not domain.privileged and len(strings) - 1 > self.quota.perms:
            raise XsError("ENOSPC", "too many permissions")
        perms = parse_perms(strings[1:])
        path = self._path(conn, strings[0], special_ok=True)
        node = view.get(path)
        if node is None:
            raise self._missing(conn, view, path, PERM_WRITE)
        # Needs write permission and ownership (perm_for grants both only
        # to the owner).
        if not domain.privileged:
            owner = node.perms[0][0]
            if owner != domain.domid and owner != domain.target:
                raise self._denied(view, path)
            if perms[0][0] != owner:
                raise XsError("EPERM", "unprivileged domains may not change the owner")
        new = node.replace(perms=perms)
        self._check_size(conn, view, new)
        view.put(path, new)
        # Watchers that could read the node before, or can now, hear of it.
        self._fire(view, path, True, perms, node.perms)
        return _OK

    # --- handlers: watches -------------------------------------------------------

    def _watch(self, conn: Connection, view: View, payload: bytes) -> bytes:
        raw_path, token = _nstrings(payload, 2)
        path = self._path(conn, raw_path, special_ok=True)
        for w in conn.watches:
            if w.node == path and w.token == token:
                raise XsError("EEXIST", "watch exists")
        domain = conn.domain
        if not domain.privileged and domain.nwatches >= self.quota.watches:
            raise XsError("ENOSPC", "watch quota exceeded")
        relative = raw_path[0] not in "/@"
        watch = Watch(conn, path, token, len(conn.home) + 1 if relative else 0)
        conn.watches.append(watch)
        self.watches.add(watch)
        domain.nwatches += 1
        self._queue_event(watch, path)
        return _OK

    def _unwatch(self, conn: Connection, view: View, payload: bytes) -> bytes:
        raw_path, token = _nstrings(payload, 2)
        path = self._path(conn, raw_path, special_ok=True)
        for w in conn.watches:
            if w.node == path and w.token == token:
                self._drop_watch(w)
                return _OK
        raise XsError("ENOENT", "no such watch")

    def _drop_watch(self, watch: Watch) -> None:
        conn = watch.conn
        conn.watches.remove(watch)
        self.watches.remove(watch)
        conn.domain.nwatches -= 1

    def _reset_watches(self, conn: Connection, view: View, payload: bytes) -> bytes:
        self.drop_connection_state(conn)
        return _OK

    def drop_connection_state(self, conn: Connection) -> None:
        """Forget a connection's watches and transactions (reset or close)."""
        for watch in list(conn.watches):
            self._drop_watch(watch)
        conn.domain.ntransactions -= len(conn.transactions)
        conn.transactions.clear()

    # --- handlers: transactions --------------------------------------------------

    def _transaction_start(self, conn: Connection, view: View, payload: bytes) -> bytes:
        domain = conn.domain
        if not domain.privileged and domain.ntransactions >= self.quota.transactions:
            raise XsError("ENOSPC", "transaction quota exceeded")
        tx_id = conn.next_tx_id
        while tx_id == 0 or tx_id in conn.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
        limit = None if domain.privileged else self.quota.transaction_nodes
        conn.transactions[tx_id] = Transaction(tx_id, self.store, limit)
        domain.ntransactions += 1
        return f"{tx_id}\0".encode()

    def _transaction_end(self, conn: Connection, view: View, payload: bytes) -> bytes:
        arg = _onearg(payload)
        if arg not in ("T", "F"):
            raise XsError("EINVAL", "TRANSACTION_END wants T or F")
        if not isinstance(view, Transaction):
            raise XsError("ENOENT", "no transaction")
        del conn.transactions[view.id]
        conn.domain.ntransactions -= 1
        if arg == "T":
            if view.failed:
                # cxenstored's do_transaction_end() for a transaction
                # fail_transaction() marked (see _check_size)
                raise XsError("ENOMEM", "a write in the transaction failed")
            # Other transactions may have used up the quota meanwhile.
            grown = view.owned_delta[conn.domid]
            if (
                not conn.domain.privileged
                and grown > 0
                and self.store.count(conn.domid) + grown > self.quota.nodes
            ):
                raise XsError("ENOSPC", "node quota exceeded")
            view.commit()
            # cxenstored's finalize_transaction() fires in the order of its
            # access list: the order the transaction first touched the nodes.
            events = view.events
            for path in view.seen:
                subtree = events.get(path)
                if subtree is not None:
                    self._fire_committed(path, subtree, view.first_perms[path])
        return _OK

    def _fire_committed(self, path: str, subtree: bool, before: Perms | None) -> None:
        """Fire the watches of a node a committed transaction changed.

        As cxenstored's finalize_transaction() calls fire_watches(): with
        the permissions the node had when the transaction first touched it
        (``before``, None if it did not exist) and no node, so that
        watch_permitted() looks the node up as it is now.  A watcher hears
        of the change if it could read the node before, or can read it or
        its parent now; a node removed by the transaction has no "now", so
        only ``before`` counts, and a node that exists neither before nor
        after (created and removed again) is heard of by nobody, dom0
        included.
        """
        node = self.store.get(path)
        if before is None and node is None:
            return
        for watch in self.watches.matching(path, subtree):
            target = watch.conn
            domain = target.domain
            if domain.privileged:
                self._queue_event(watch, path)
                continue
            if before is not None and perm_for(before, domain.domid, domain.target) & PERM_READ:
                self._queue_event(watch, path)
            elif node is not None and self._watch_permitted(target, path, node.perms, None):
                self._queue_event(watch, path)

    # --- handlers: domains ------------------------------------------------------

    def _introduce_op(self, conn: Connection, view: View, payload: bytes) -> bytes:
        """Introduce a domain, or reset one introduced already.

        cxenstored's do_introduce() resets the domain's connection either
        way (domain_conn_reset(): a domain restored or resumed starts
        afresh), so a domain introduced again loses the watches and
        transactions of all its connections here.  What is queued for them
        still goes out: on a socket, unlike a ring, dropping it could cut a
        message in two.  Dom0's connections are its sockets', which
        cxenstored does not reset either.
        """
        strings = _strings(payload)
        if len(strings) < 3:
            raise XsError("EINVAL", "INTRODUCE needs domid, mfn, port")
        domid = parse_domid(strings[0])
        if domid >= DOMID_FIRST_RESERVED:
            # cxenstored maps the domain's ring first, and the grant map
            # finds no domain by such an id: EINVAL (Linux's gntdev).
            raise XsError("EINVAL", f"domid {domid} is reserved: no domain has it")
        port = _atoi(strings[2])
        if port <= 0:
            raise XsError("EINVAL", "bad event channel port")
        domain = self.domains.get(domid)
        if domain is None:
            self._introduce(domid)
        elif not domain.privileged:
            for c in domain.conns:
                self.drop_connection_state(c)
        return _OK

    def _domain_arg(self, payload: bytes) -> Domain:
        domid = parse_domid(_onearg(payload))
        if domid == 0:
            raise XsError("EINVAL", "not for the privileged domain")
        domain = self.domains.get(domid)
        if domain is None:
            raise XsError("ENOENT", f"domain {domid} not introduced")
        return domain

    def _release_op(self, conn: Connection, view: View, payload: bytes) -> bytes:
        self._release(self._domain_arg(payload).domid)
        return _OK

    def _resume(self, conn: Connection, view: View, payload: bytes) -> bytes:
        self._domain_arg(payload)
        return _OK

    def _set_target(self, conn: Connection, view: View, payload: bytes) -> bytes:
        strings = _strings(payload)
        if len(strings) < 2:
            raise XsError("EINVAL", "SET_TARGET needs domid and target")
        domid, target = parse_domid(strings[0]), parse_domid(strings[1])
        domain = self.domains.get(domid)
        if domain is None or target not in self.domains:
            raise XsError("ENOENT", "domain not introduced")
        domain.target = target
        return _OK

    def _control(self, conn: Connection, view: View, payload: bytes) -> bytes:
        """A few of cxenstored's debug commands: check, print, log, help."""
        strings = _strings(payload)
        if not strings:
            raise XsError("EINVAL", "CONTROL needs a command")
        command = strings[0]
        if command == "check":
            return _OK
        if command == "print":
            log(logger).info("xenstore control print: %s", " ".join(strings[1:]))
            return _OK
        if command == "log":
            return _OK
        if command == "help":
            return b"check\nprint <string>\nlog\nhelp\n\0"
        raise XsError("EINVAL", f"unknown control command {command[:32]!r}")
