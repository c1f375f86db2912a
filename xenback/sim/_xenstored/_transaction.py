"""Transactions: a private view of the store, checked and applied on commit.

A transaction remembers, for every path it touches, the generation the live
node had when the transaction first looked at it (or None: absent), and
from then on serves that path from its own view.  Because live nodes are
never mutated (see _tree.py), "its own view" can simply hold the live node
objects it read; only paths it changes get new nodes.

Commit fails with EAGAIN exactly when some path the transaction touched
has a different live generation now than at first touch; otherwise every
changed path is installed (fresh generations) and the queued watch events
fire.  This is cxenstored's scheme: the conflict granularity is one node.

A domain released while the transaction is open has been forgotten by the
live store (Dispatcher.remove_domain_nodes), but not by the transaction's
own nodes.  So that a later domain with the same id inherits nothing
(XSA-322), commit marks PERM_IGNORE every entry after the owner's that names
a domain released since the transaction began, as cxenstored's
domain_adjust_node_perms() does when it finds the domain gone.  cxenstored
compares the domain's generation with the node's, and the node gets a new
one at commit, so an entry for a domid reintroduced meanwhile would count
there; here it is ignored too, since it was written for the old domain.  A
node the transaction would give to such a domain (owner entry) fails the
commit with EAGAIN: had the transaction committed first, the release would
have removed that node.

Threading: none.  Transactions live on a connection, on the loop thread.
"""

from __future__ import annotations

import collections

from ._tree import PERM_IGNORE, Node, Perms, Store
from ._wire import XsError

__all__ = ["Transaction"]


class Transaction:
    """One open transaction of one connection."""

    __slots__ = (
        "id", "store", "start", "seen", "view", "changed", "events", "owned_delta", "failed",
        "first_perms", "limit",
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
        """Mark ignored the entries naming a domain in ``gone`` (released
        since the transaction began), in the nodes to install and in the
        permissions at first touch, which decide who hears of the events at
        commit (so that a new domain with such an id is not told either);
        raise EAGAIN, changing nothing, if such a domain would own a node."""
        view = self.view
        for path in self.changed:
            node = view[path]
            if node is not None and node.owner in gone:
                raise XsError(
                    "EAGAIN", f"{path} would belong to domain {node.owner}, released meanwhile"
                )
        for path in self.changed:
            node = view[path]
            if node is not None:
                perms = _ignore(node.perms, gone)
                if perms is not node.perms:
                    # A fresh node, not yet shared: the live store will
                    # give it its generation.
                    view[path] = node.replace(perms=perms)
        first = self.first_perms
        for path, before in first.items():
            if before is not None:
                first[path] = _ignore(before, gone)


def _ignore(perms: Perms, gone: frozenset[int]) -> Perms:
    """``perms`` with the entries after the owner's that name a domain in
    ``gone`` marked PERM_IGNORE (the same object if there are none)."""
    if not any(domid in gone and not mask & PERM_IGNORE for domid, mask in perms[1:]):
        return perms
    return (
        perms[0],
        *((d, m | PERM_IGNORE) if d in gone else (d, m) for d, m in perms[1:]),
    )
