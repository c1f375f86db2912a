"""Watches and the index that finds the ones a change fires.

A watch is (connection, path, token).  The index maps a canonical absolute
path to the watches registered on it, so firing costs one dict lookup per
ancestor of the changed path rather than a scan of every watch.

Matching (cxenstored's, Xen 4.17 semantics, no depth):
  * subtree: a change of P fires every watch on P or on an ancestor of P,
    the event naming P;
  * exact: fires only the watches on P itself (descendants removed by RM,
    special nodes).
Order: the watches a change fires go out in the order they were registered
(per connection that is all a client can see), as cxenstored's
fire_watches() walks each connection's watch list, to which add_watch()
appends: a watch on /a registered before one on /a/b hears of /a/b/c
first.
A relative watch (registered without a leading '/') gets event paths with
its connection's home prefix stripped.

Threading: none (loop thread only).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["Watch", "WatchIndex", "ancestors"]


class Watch:
    __slots__ = ("conn", "node", "token", "prefix_len", "dropped", "seq")

    def __init__(self, conn: Any, node: str, token: str, prefix_len: int) -> None:
        self.conn = conn
        #: canonical absolute path (or special "@..." name)
        self.node = node
        self.token = token
        #: how much of an event path to strip: len(home) + 1 if relative
        self.prefix_len = prefix_len
        #: events dropped for exceeding XENSTORE_PAYLOAD_MAX
        self.dropped = 0
        #: registration order, set by WatchIndex.add
        self.seq = 0

    def event_payload(self, path: str) -> bytes:
        return f"{path[self.prefix_len:]}\0{self.token}\0".encode("latin-1")

    def __repr__(self) -> str:
        return f"Watch({self.node!r}, {self.token!r})"


def ancestors(path: str) -> Iterator[str]:
    """``path`` and each ancestor up to and including "/"."""
    yield path
    if path[0] != "/":
        return
    while path != "/":
        cut = path.rfind("/")
        path = path[:cut] if cut > 0 else "/"
        yield path


class WatchIndex:
    """All watches of all connections, indexed by watched path."""

    def __init__(self) -> None:
        self._by_node: dict[str, list[Watch]] = {}
        self._seq = 0

    def add(self, watch: Watch) -> None:
        self._seq += 1
        watch.seq = self._seq
        self._by_node.setdefault(watch.node, []).append(watch)

    def remove(self, watch: Watch) -> None:
        watches = self._by_node[watch.node]
        watches.remove(watch)
        if not watches:
            del self._by_node[watch.node]

    def __len__(self) -> int:
        return sum(len(w) for w in self._by_node.values())

    def matching(self, path: str, subtree: bool) -> list[Watch]:
        """The watches a change of ``path`` fires, in registration order."""
        by_node = self._by_node
        if not by_node:
            return []
        if not subtree:
            return list(by_node.get(path, ()))
        found: list[Watch] = []
        paths = 0
        for p in ancestors(path):
            watches = by_node.get(p)
            if watches:
                found.extend(watches)
                paths += 1
        if paths > 1:
            # Each path's list is in registration order already; several
            # must be merged (cxenstored: one list per connection).
            found.sort(key=_seq)
        return found


def _seq(watch: Watch) -> int:
    return watch.seq
