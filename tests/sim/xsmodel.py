"""A reference model of cxenstored's semantics (Xen 4.17), for model-based
testing of the simulated XenStore server (see test_xenstored_model.py).

The model is deliberately small and written from cxenstored's source, not
from the server's: a tree of nodes (value, permissions, ordered children,
generation), per-connection transactions with cxenstored's access list,
watches with their firing rules.  Function names in comments are those of
tools/xenstore/xenstored_{core,transaction,watch,domain}.c of Xen 4.17.

Every operation returns what cxenstored would reply: ("ok", payload) or
("err", errno name), and appends the watch events it causes to each
connection's ``expected`` list, in the order cxenstored sends them.
"""

from __future__ import annotations

import dataclasses

READ, WRITE, OWNER = 1, 2, 4
BOTH = READ | WRITE
NODE_SIZE_QUOTA = 2048  # quota_max_entry_size
PERMS_QUOTA = 5  # quota_nb_perms_per_node

Perms = tuple[tuple[int, int], ...]
Reply = tuple[str, bytes | str]
_CHARS = {"n": 0, "r": READ, "w": WRITE, "b": BOTH}


def parse_perms(items: list[str]) -> Perms:
    return tuple((int(p[1:]), _CHARS[p[0]]) for p in items)


def format_perms(perms: Perms) -> bytes:
    return b"".join(f"{'nrwb'[m]}{d}\0".encode() for d, m in perms)


def parent_of(path: str) -> str:
    """get_parent(): "/" for "/" and for top-level (and special) names."""
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def is_child(child: str, parent: str) -> bool:
    """xenstored_watch.c is_child(): "/" is everyone's parent."""
    if parent == "/":
        return True
    return child == parent or child.startswith(parent + "/")


@dataclasses.dataclass
class MNode:
    value: bytes
    perms: Perms
    children: list[str]
    gen: int = 0

    def copy(self) -> MNode:
        return MNode(self.value, self.perms, list(self.children), self.gen)

    def size(self) -> int:
        """write_node_raw(): header, permissions, value, NUL-terminated children."""
        return 24 + 8 * len(self.perms) + len(self.value) + sum(len(c) + 1 for c in self.children)


@dataclasses.dataclass
class Acc:
    """xenstored_transaction.c struct accessed_node."""

    gen: int | None  # generation at first access (None: NO_GENERATION)
    perms: Perms | None  # permissions at first access
    modified: bool = False
    fire: bool = False
    exact: bool = True


@dataclasses.dataclass
class MTx:
    id: int
    accessed: dict[str, Acc] = dataclasses.field(default_factory=dict)  # access order
    local: dict[str, MNode | None] = dataclasses.field(default_factory=dict)
    fail: bool = False
    doomed: bool = False  # replies no longer compared (see Model.rm)


@dataclasses.dataclass
class MWatch:
    node: str  # canonical
    token: str
    relative: str | None  # the implicit path stripped from events, if relative


@dataclasses.dataclass
class MConn:
    name: str
    domid: int
    home: str
    watches: list[MWatch] = dataclasses.field(default_factory=list)
    txs: dict[int, MTx] = dataclasses.field(default_factory=dict)
    expected: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def privileged(self) -> bool:
        return self.domid == 0

    def send_event(self, path: str, token: str) -> None:
        """send_event(): an event identical to one still waiting to be sent
        is dropped, unless special (XSA-326).  ``expected`` holds what the
        test has not read yet, which is what waits: the test reads every
        connection's events after each request.

        The server's other drop, an event for a guest over its share
        (``max_queued``), is not modelled: one request's events for a guest
        (at most one per watch, 128 watches of at most 4 KiB) fit in the
        default share, and nothing else waits here.  Nor does holding a
        guest back for the events it caused change what anybody receives,
        and no event waits long enough to go stale (20 s)."""
        if path.startswith("@") or (path, token) not in self.expected:
            self.expected.append((path, token))


class Model:
    def __init__(self, nodes: dict[str, MNode], conns: list[MConn]) -> None:
        self.nodes = nodes
        self.gen = max((n.gen for n in nodes.values()), default=0)
        self.conns = conns
        #: dom_introduce_perms / dom_release_perms (set_dom_perms_default: n0)
        self.special: dict[str, Perms] = {"@introduceDomain": ((0, 0),),
                                          "@releaseDomain": ((0, 0),)}

    # --- permissions: perm_for_conn() -----------------------------------------

    @staticmethod
    def perm(conn: MConn, perms: Perms) -> int:
        if conn.privileged or perms[0][0] == conn.domid:
            return READ | WRITE | OWNER
        for domid, mask in perms[1:]:
            if domid == conn.domid:
                return mask
        return perms[0][1]

    # --- node access: read_node(), write_node(), access_node() ------------

    def _next_gen(self) -> int:
        self.gen += 1
        return self.gen

    def rd(self, tx: MTx | None, path: str) -> MNode | None:
        """read_node(): in a transaction the first access records the node."""
        if tx is None:
            n = self.nodes.get(path)
            return None if n is None else n.copy()
        if path not in tx.accessed:
            live = self.nodes.get(path)
            tx.accessed[path] = Acc(None if live is None else live.gen,
                                    None if live is None else live.perms)
            tx.local[path] = None if live is None else live.copy()
        n = tx.local[path]
        return None if n is None else n.copy()

    def wr(self, tx: MTx | None, path: str, node: MNode) -> None:
        node.gen = self._next_gen()
        if tx is None:
            self.nodes[path] = node
            return
        # Every write follows a read of the node in cxenstored's handlers,
        # so the node is on the access list already (check_gen set).
        assert path in tx.accessed, path
        tx.local[path] = node
        tx.accessed[path].modified = True

    def dl(self, tx: MTx | None, path: str) -> None:
        if tx is None:
            del self.nodes[path]
            return
        assert path in tx.accessed, path
        tx.local[path] = None
        tx.accessed[path].modified = True

    def get_node(self, conn: MConn, tx: MTx | None, path: str,
                 want: int) -> tuple[MNode | None, str]:
        """get_node() with errno_from_parents()/ask_parents(): the ancestors
        read to choose between ENOENT and EACCES are read (and so, in a
        transaction, recorded) for every caller, privileged or not."""
        node = self.rd(tx, path)
        if node is not None and self.perm(conn, node.perms) & want == want:
            return node, ""
        err = "ENOENT" if node is None else "EACCES"
        p = path
        while True:
            p = parent_of(p)
            anc = self.rd(tx, p)
            if anc is not None or p == "/":
                break
        assert anc is not None
        if not self.perm(conn, anc.perms) & want:
            err = "EACCES"
        return None, err

    def _too_big(self, conn: MConn, node: MNode) -> bool:
        return not conn.privileged and node.size() >= NODE_SIZE_QUOTA

    # --- watches: fire_watches(), watch_permitted() -------------------------

    def fire(self, conn: MConn, tx: MTx | None, name: str, node: MNode | None,
             exact: bool, old_perms: Perms | None = None) -> None:
        if tx is not None:
            # queue_watches(): non-exact replaces exact, not the other way
            acc = tx.accessed[name]
            if not acc.fire:
                acc.fire, acc.exact = True, exact
            elif not exact:
                acc.exact = False
            return
        self.fire_live(name, node, exact, old_perms)

    def fire_live(self, name: str, node: MNode | None, exact: bool,
                  old_perms: Perms | None) -> None:
        for w in self.conns:
            if name.startswith("@"):
                if not self.perm(w, self.special[name]) & READ:  # check_perms_special
                    continue
            elif not self.watch_permitted(w, name, node, old_perms):
                continue
            # each connection's watches in the order it registered them
            for watch in w.watches:
                if watch.node == name if exact else is_child(name, watch.node):
                    w.send_event(self.watch_path(watch, name), watch.token)

    def watch_permitted(self, w: MConn, name: str, node: MNode | None,
                        old_perms: Perms | None) -> bool:
        if old_perms is not None and self.perm(w, old_perms) & READ:
            return True
        if node is None:
            node = self.nodes.get(name)
            if node is None:
                return False
        if self.perm(w, node.perms) & READ:
            return True
        parent = self.nodes.get(parent_of(name))
        return parent is not None and bool(self.perm(w, parent.perms) & READ)

    @staticmethod
    def watch_path(watch: MWatch, name: str) -> str:
        """get_watch_path()"""
        if watch.relative is None:
            return name
        rest = name[len(watch.relative):]
        return rest[1:] if rest.startswith("/") else rest

    # --- operations ---------------------------------------------------------

    def read(self, c: MConn, tx: MTx | None, path: str) -> Reply:
        node, err = self.get_node(c, tx, path, READ)
        return ("err", err) if node is None else ("ok", node.value)

    def directory(self, c: MConn, tx: MTx | None, path: str) -> Reply:
        node, err = self.get_node(c, tx, path, READ)
        if node is None:
            return ("err", err)
        return ("ok", b"".join(ch.encode() + b"\0" for ch in node.children))

    def get_perms(self, c: MConn, tx: MTx | None, path: str) -> Reply:
        node, err = self.get_node(c, tx, path, READ)
        return ("err", err) if node is None else ("ok", format_perms(node.perms))

    def _fail_tx(self, tx: MTx | None) -> None:
        # write_node(): a failed write in a transaction fails it
        # (fail_transaction()): its commit returns ENOMEM.
        if tx is not None:
            tx.fail = True

    def _create(self, c: MConn, tx: MTx | None, path: str, value: bytes) -> MNode | str:
        """create_node()/construct_node(): missing ancestors get empty values,
        every new node the parent's permissions (unprivileged creators own
        them); written bottom up, each size-checked."""
        names = [path]
        p = parent_of(path)
        parent = self.rd(tx, p)
        while parent is None:
            names.append(p)
            p = parent_of(p)
            parent = self.rd(tx, p)
        perms = parent.perms
        if not c.privileged:
            perms = ((c.domid, perms[0][1]), *perms[1:])
        new: list[tuple[str, MNode]] = []
        for i, name in enumerate(names):
            children = [basename(names[i - 1])] if i else []
            new.append((name, MNode(b"" if i else value, perms, children)))
        parent.children.append(basename(names[-1]))
        for _name, node in [*new, (p, parent)]:
            if self._too_big(c, node):
                self._fail_tx(tx)
                return "ENOSPC"
        for name, node in reversed(new):
            self.wr(tx, name, node)
        self.wr(tx, p, parent)
        return new[0][1]

    def write(self, c: MConn, tx: MTx | None, path: str, value: bytes) -> Reply:
        node, err = self.get_node(c, tx, path, WRITE)
        if node is None:
            if err != "ENOENT":
                return ("err", err)
            created = self._create(c, tx, path, value)
            if isinstance(created, str):
                return ("err", created)
            node = created
        else:
            node.value = value
            if self._too_big(c, node):
                self._fail_tx(tx)
                return ("err", "ENOSPC")
            self.wr(tx, path, node)
        self.fire(c, tx, path, node, False)
        return ("ok", b"OK\0")

    def mkdir(self, c: MConn, tx: MTx | None, path: str) -> Reply:
        node, err = self.get_node(c, tx, path, WRITE)
        if node is not None:
            return ("ok", b"OK\0")
        if err != "ENOENT":
            return ("err", err)
        created = self._create(c, tx, path, b"")
        if isinstance(created, str):
            return ("err", created)
        self.fire(c, tx, path, created, False)
        return ("ok", b"OK\0")

    def rm(self, c: MConn, tx: MTx | None, path: str) -> Reply:
        node, err = self.get_node(c, tx, path, WRITE)
        if node is None:
            if err == "ENOENT" and self.rd(tx, parent_of(path)) is not None:
                return ("ok", b"OK\0")
            return ("err", err)
        if path == "/":
            return ("err", "EINVAL")
        parent = self.rd(tx, parent_of(path))  # rm_node()
        if parent is None:
            # rm_node() fails with EINVAL, changing nothing: only possible
            # in a transaction whose snapshot has the node but not its
            # parent (removed meanwhile).  The server removes the subtree
            # from the transaction's view instead.  Either way the commit
            # fails (the node changed after it was read); left out: the
            # transaction's further replies are not compared.
            assert tx is not None
            tx.doomed = True
            return ("ok|EINVAL", b"OK\0")
        # walk_node_tree() with delnode_sub() as exit: post order, children
        # in list order; each node deleted, then its watches fired (exact
        # for all but the root of the removal).
        self._delete_tree(c, tx, path, node, path)
        if basename(path) not in parent.children:
            # delete_child() calls corrupt() and fails with EIO: only
            # possible in a transaction whose snapshot of the parent is
            # older than its snapshot of the node.
            # The transaction fails at commit (EAGAIN: the parent changed
            # after it was read) whatever this reply was.
            return ("ok|EIO", b"OK\0")
        parent.children.remove(basename(path))
        self.wr(tx, parent_of(path), parent)
        return ("ok", b"OK\0")

    def _delete_tree(self, c: MConn, tx: MTx | None, path: str, node: MNode,
                     root: str) -> None:
        for child in node.children:
            cpath = f"{path}/{child}" if path != "/" else f"/{child}"
            cnode = self.rd(tx, cpath)
            if cnode is not None:
                self._delete_tree(c, tx, cpath, cnode, root)
        self.dl(tx, path)
        self.fire(c, tx, path, node, path != root)

    def set_perms(self, c: MConn, tx: MTx | None, path: str, items: list[str]) -> Reply:
        if not c.privileged and len(items) > PERMS_QUOTA:
            return ("err", "ENOSPC")
        perms = parse_perms(items)
        if path.startswith("@"):
            # set_perms_special(): not part of any transaction, fires nothing
            if self.perm(c, self.special[path]) & (WRITE | OWNER) != WRITE | OWNER:
                return ("err", "EACCES")
            self.special[path] = perms
            return ("ok", b"OK\0")
        node, err = self.get_node(c, tx, path, WRITE | OWNER)
        if node is None:
            return ("err", err)
        if not c.privileged and perms[0][0] != node.perms[0][0]:
            return ("err", "EPERM")
        old = node.perms
        node.perms = perms
        if self._too_big(c, node):
            self._fail_tx(tx)
            return ("err", "ENOSPC")
        self.wr(tx, path, node)
        self.fire(c, tx, path, node, False, old)
        return ("ok", b"OK\0")

    def watch(self, c: MConn, raw: str, token: str) -> Reply:
        relative = not raw.startswith(("/", "@"))
        path = f"{c.home}/{raw}" if relative else raw
        if any(w.node == path and w.token == token for w in c.watches):
            return ("err", "EEXIST")
        w = MWatch(path, token, c.home if relative else None)
        c.watches.append(w)
        # the initial event, after the reply
        c.send_event(self.watch_path(w, path), token)
        return ("ok", b"OK\0")

    def unwatch(self, c: MConn, raw: str, token: str) -> Reply:
        relative = not raw.startswith(("/", "@"))
        path = f"{c.home}/{raw}" if relative else raw
        for w in c.watches:
            if w.node == path and w.token == token:
                c.watches.remove(w)
                return ("ok", b"OK\0")
        return ("err", "ENOENT")

    def transaction_end(self, c: MConn, tx: MTx, commit: bool) -> Reply:
        del c.txs[tx.id]
        if not commit:
            return ("ok", b"OK\0")
        if tx.fail:
            return ("err", "ENOMEM")
        # finalize_transaction(): every node on the access list (all were
        # read first) must still have its generation...
        for path, acc in tx.accessed.items():
            live = self.nodes.get(path)
            if (None if live is None else live.gen) != acc.gen:
                return ("err", "EAGAIN")
        # ... then the modified ones are written in access order, each
        # firing its queued watches right after it is written, with the
        # permissions it had at first access and node NULL (re-read).
        for path, acc in tx.accessed.items():
            if not acc.modified:
                continue
            node = tx.local[path]
            if node is not None:
                node.gen = self._next_gen()
                self.nodes[path] = node
            elif acc.gen is not None:
                del self.nodes[path]
            if acc.fire:
                self.fire_live(path, None, acc.exact, acc.perms)
        return ("ok", b"OK\0")
