"""Transactions: a private view of the store, checked and applied on commit.

A transaction remembers, for every path it touches, the generation the live
node had when the transaction first looked at it (or None: absent), and
from then on serves that path from its own view.  Because live nodes are
never mutated (see _tree.py), "its own view" can simply hold the live node
objects it read; only paths it changes get new nodes.

Commit fails with EAGAIN when some path the transaction touched has a
different live generation now than at first touch (or, below, when a node
it installs would belong to a domain released meanwhile); otherwise every
changed path is installed (fresh generations) and the queued watch events
fire.  This is cxenstored's scheme: the conflict granularity is one node.

A domain released while the transaction is open has been forgotten by the
live store (Dispatcher.remove_domain_nodes), but not by the transaction's
own nodes.  So that a later domain with the same id inherits nothing
(XSA-322), commit checks every entry, the owner's included, that names a
domain released since the transaction began: may it have been meant for
the released domain?  It depends on whence the entry came into the
transaction's copy of the node (``origin``):

- read from the live store (when the transaction first looked at the
  node): an entry read before the release that names the domain made the
  release change the node, so the commit fails anyway (a conflict).  One
  read after the release was set after it, and means what the live store
  makes of it: the live store, which checks no domids, keeps it for
  whichever domain has the id next, and so does the commit;
- set by the transaction (SET_PERMS, equal permissions too): the entry was
  meant for the domain that had the id then, and counts only if that is a
  new one, introduced again before the transaction set it.  cxenstored
  agrees: its domain_adjust_node_perms() keeps an entry for a domain no
  younger than the node, and its write_node_raw() ignores one set while
  no domain has the id;
- a node the transaction created has its parent's permissions, and origin.

An entry after the owner's that may have been meant for the old domain is
marked PERM_IGNORE; an owner entry that may have been fails the commit with
EAGAIN (had the transaction committed first, the release would have removed
that node).

cxenstored differs both ways.  It compares the domain with the node's
generation, which the commit renews, so it counts an entry the transaction
set while the old domain lived if the new one came before the commit.  And
it counts an entry set while no domain has the id only for a domain its
hypervisor knows already (one being built); here the live store counts it
for any.

The permissions at first touch (which decide who hears of the events at
commit) need no such care: if they were read before the release and name
the domain, the release changed that node, so the commit fails; if read
after, they are the live store's.

Threading: none.  Transactions live on a connection, on the loop thread.
"""

from __future__ import annotations

import collections

from ._tree import PERM_IGNORE, Node, Perms, Store, parent_of
from ._wire import XsError

__all__ = ["Transaction"]


class Transaction:
    """One open transaction of one connection."""

    __slots__ = (
        "id", "store", "start", "seen", "view", "changed", "events", "owned_delta", "failed",
        "first_perms", "origin", "limit",
    )

    def __init__(self, tx_id: int, store: Store, limit: int | None = None) -> None:
        self.id = tx_id
        self.store = store
        #: how many nodes it may touch (None: no limit, for the privileged)
        self.limit = limit
        #: when the transaction began, for Store.released_since
        self.start = store.new_epoch()
        #: path -> live generation at first touch (None: did not exist)
        self.seen: dict[str, int | None] = {}
        #: path -> the node's permissions at first touch (None: absent), for
        #: the events at commit (cxenstored's accessed_node.perms)
        self.first_perms: dict[str, Perms | None] = {}
        #: path -> the generation at which this transaction set the
        #: permissions of its node in ``view`` (None: as in the live store
        #: when it first looked), for commit (see the module docstring)
        self.origin: dict[str, int | None] = {}
        #: path -> node as this transaction sees it (None: absent)
        self.view: dict[str, Node | None] = {}
        #: paths this transaction wrote or deleted, in order
        self.changed: dict[str, None] = {}
        #: watch events to fire on commit, one per changed path (see
        #: add_event): path -> whether subtree-style
        self.events: dict[str, bool] = {}
        self.owned_delta: collections.Counter[int] = collections.Counter()
        #: a write in it failed half-way (cxenstored's fail_transaction()):
        #: it can only be aborted, a commit answers ENOMEM
        self.failed = False

    def _touch(self, path: str) -> Node | None:
        if self.limit is not None and len(self.seen) >= self.limit:
            # cxenstored's access_node(): the quota counts nodes new to the
            # transaction, and refusing one fails the transaction (its
            # commit answers ENOMEM), since the operation may have done
            # part of its work already.
            self.failed = True
            raise XsError("ENOSPC", "transaction touches too many nodes")
        node = self.store.nodes.get(path)
        self.seen[path] = None if node is None else node.generation
        self.first_perms[path] = None if node is None else node.perms
        self.origin[path] = None
        self.view[path] = node
        return node

    def get(self, path: str) -> Node | None:
        try:
            return self.view[path]
        except KeyError:
            return self._touch(path)

    def put(self, path: str, node: Node) -> None:
        old = self.get(path)
        delta = self.owned_delta
        if old is None:
            delta[node.owner] += 1
        elif old.owner != node.owner:
            delta[old.owner] -= 1
            delta[node.owner] += 1
        if old is None:
            # Created: its permissions are its parent's (Dispatcher._create).
            self.origin[path] = self.origin[parent_of(path)]
        elif node.perms is not old.perms:
            # Set now (SET_PERMS); other changes keep them (Node.replace).
            self.origin[path] = self.store.generation
        # A generation of its own (from the global counter, so unique) lets
        # DIRECTORY_PART inside the transaction see changes made in it.
        self.store.generation += 1
        node.generation = self.store.generation
        self.view[path] = node
        self.changed[path] = None

    def delete(self, path: str) -> None:
        old = self.get(path)
        if old is not None:
            self.owned_delta[old.owner] -= 1
        self.view[path] = None
        self.changed[path] = None

    def add_event(self, path: str, subtree: bool) -> None:
        """Remember that ``path`` changed, for an event on commit.

        One event per path, however often the transaction changed it (as
        cxenstored's add_change_node()): a list of every change would let a
        guest grow it without bound by rewriting one node, and flood the
        watchers at commit.  The event is subtree-style if any change was.
        Who hears of it is decided at commit, from the node's permissions
        at first touch (``first_perms``) and the node as it is then (see
        Dispatcher._fire_committed): what happened in between nobody else saw.
        """
        self.events[path] = self.events.get(path, False) or subtree

    def count(self, domid: int) -> int:
        return self.store.count(domid) + self.owned_delta[domid]

    def commit(self) -> None:
        """Apply to the live store, or raise EAGAIN and apply nothing."""
        nodes = self.store.nodes
        for path, generation in self.seen.items():
            node = nodes.get(path)
            if (None if node is None else node.generation) != generation:
                raise XsError("EAGAIN", f"{path} changed during the transaction")
        store = self.store
        gone = store.released_since(self.start)
        if gone:
            self._forget(gone)
        for path in self.changed:
            node = self.view[path]
            if node is None:
                store.delete(path)
            else:
                store.put(path, node)

    def _forget(self, gone: frozenset[int]) -> None:
        """Mark ignored the entries in the nodes to install that may name a
        domain in ``gone`` (released since the transaction began) rather
        than a later one with its id; raise EAGAIN, changing nothing, if such
        an entry is a node's owner (see the module docstring)."""
        view = self.view
        store = self.store
        marked: list[tuple[str, Node, frozenset[int]]] = []
        for path in self.changed:
            node = view[path]
            if node is None:
                continue
            stale = self._stale(path, gone, store)
            if node.owner in stale:
                # An unprivileged creator, the owner of what it creates,
                # never gets here: its transactions go when it is released.
                raise XsError(
                    "EAGAIN", f"{path} would belong to domain {node.owner}, released meanwhile"
                )
            if stale:
                marked.append((path, node, stale))
        for path, node, stale in marked:
            perms = _ignore(node.perms, stale)
            if perms is not node.perms:
                # A fresh node, not yet shared: the live store will
                # give it its generation.
                view[path] = node.replace(perms=perms)

    def _stale(self, path: str, gone: frozenset[int], store: Store) -> frozenset[int]:
        """The domids in ``gone`` whose entries in ``path``'s node may have
        been meant for a domain released since (see the module docstring)."""
        origin = self.origin[path]
        if origin is None:
            # As read from the live store: before the release, an entry
            # naming the domain made the release change the node (the commit
            # failed already); after it, the entry means what it does there.
            return frozenset()
        # Set here: for the domain that had the id then, if any.
        introduced = store.introduced
        return frozenset(d for d in gone if introduced.get(d, origin + 1) > origin)


def _ignore(perms: Perms, gone: frozenset[int]) -> Perms:
    """``perms`` with the entries after the owner's that name a domain in
    ``gone`` marked PERM_IGNORE (the same object if there are none)."""
    if not any(domid in gone and not mask & PERM_IGNORE for domid, mask in perms[1:]):
        return perms
    return (
        perms[0],
        *((d, m | PERM_IGNORE) if d in gone else (d, m) for d, m in perms[1:]),
    )
