"""The node tree: nodes, permissions, path rules and the live store.

The store is a flat ``dict`` from canonical absolute path to :class:`Node`.
Parent/child structure lives in each node's ``children`` (ordered by
creation, as cxenstored returns them).

Invariant (copy on write): a :class:`Node` reachable from the live store is
never mutated.  A change builds a new node and :meth:`Store.put` installs
it with a fresh generation.  That is what lets a transaction keep the node
objects it read as its snapshot without copying them (see _transaction.py).

Threading: none.  Only the server's loop thread touches a Store.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

from ._wire import ABS_PATH_MAX, REL_PATH_MAX, XsError

__all__ = [
    "PERM_NONE",
    "PERM_READ",
    "PERM_WRITE",
    "PERM_BOTH",
    "PERM_IGNORE",
    "Perms",
    "Node",
    "Store",
    "SPECIAL_PATHS",
    "canonicalize",
    "parent_of",
    "basename",
    "domain_path",
    "parse_perms",
    "format_perms",
    "parse_domid",
    "perm_for",
    "node_size",
]

PERM_NONE = 0
PERM_READ = 1
PERM_WRITE = 2
PERM_BOTH = PERM_READ | PERM_WRITE
#: Flag on an entry after the owner's: it names a domain that was released
#: while a transaction writing the entry was open, so it grants nothing.
#: cxenstored's XS_PERM_IGNORE (same value): GET_PERMS still lists the entry,
#: access checks skip it.
PERM_IGNORE = 0x10

#: ((domid, mask), ...): entry 0 names the owner and is also the default for
#: domains not listed; later entries grant ``mask`` to one domain (nothing
#: if the mask has PERM_IGNORE).
Perms = tuple[tuple[int, int], ...]

_PERM_CHARS = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_BOTH}
_PERM_NAMES = "nrwb"

_valid_path = re.compile(r"[A-Za-z0-9\-/_@]*\Z").match
_local_prefix = re.compile(r"/local/domain/\d{1,5}/").match
_decimal = re.compile(r"\d+\Z").match
#: what strtol(p, &end, 0) reads whole (C locale space, sign, base prefix)
_strtol0 = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z").match


class Node:
    """One node.  Never mutated once it is in the live store."""

    __slots__ = ("value", "perms", "children", "generation")

    def __init__(
        self, value: bytes, perms: Perms, children: dict[str, None], generation: int = 0
    ) -> None:
        self.value = value
        self.perms = perms
        #: child base names, in creation order (a dict used as ordered set)
        self.children = children
        self.generation = generation

    def replace(
        self,
        *,
        value: bytes | None = None,
        perms: Perms | None = None,
        children: dict[str, None] | None = None,
    ) -> Node:
        """A new node that differs from this one in the given fields."""
        return Node(
            self.value if value is None else value,
            self.perms if perms is None else perms,
            self.children if children is None else children,
        )

    @property
    def owner(self) -> int:
        return self.perms[0][0]

    def __repr__(self) -> str:
        return f"Node({self.value!r}, {format_perms(self.perms)!r}, gen={self.generation})"


def node_size(node: Node) -> int:
    """Size Xen 4.17's cxenstored checks against the node-size quota.

    The record it stores in its database: a 24-byte header, 8 bytes per
    permission, the value and the NUL-terminated child names.
    """
    childlen = sum(len(c) + 1 for c in node.children)
    return 24 + 8 * len(node.perms) + len(node.value) + childlen


# --- paths -----------------------------------------------------------------


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def canonicalize(raw: str, home: str, *, special_ok: bool = False) -> str:
    """Absolute canonical form of a path received from a client.

    ``home`` is the connection's domain path; relative paths resolve below
    it (for dom0 as well: test-xenstore relies on that).  Special paths
    (``@introduceDomain``) pass only where ``special_ok``.  Length: the
    part below /local/domain/<domid>/ (or the whole path elsewhere) may not
    exceed XENSTORE_REL_PATH_MAX, for every caller, as in Xen 4.17's
    cxenstored; so no path exceeds XENSTORE_ABS_PATH_MAX either.
    Anything else invalid raises EINVAL.
    """
    if not raw or not _valid_path(raw):
        raise XsError("EINVAL", f"invalid characters in path {raw[:64]!r}")
    first = raw[0]
    if first == "@":
        if not special_ok:
            raise XsError("EINVAL", "special path not allowed here")
        name = raw
    elif first == "/":
        name = raw
    else:
        name = f"{home}/{raw}"
    if (name[-1] == "/" and name != "/") or "//" in name:
        raise XsError("EINVAL", f"malformed path {raw[:64]!r}")
    if len(name) > REL_PATH_MAX:
        m = _local_prefix(name)
        if len(name) - (m.end() if m else 0) > REL_PATH_MAX or len(name) > ABS_PATH_MAX:
            raise XsError("EINVAL", "path too long")
    return name


def parent_of(path: str) -> str:
    """Parent of an absolute path other than "/"."""
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def parse_domid(text: str) -> int:
    """A domid argument: decimal, at most 65535 (cxenstored's parse_domid)."""
    if not _decimal(text) or int(text) > 0xFFFF:
        raise XsError("EINVAL", f"bad domain id {text[:16]!r}")
    return int(text)


def parse_perms(items: Sequence[str]) -> Perms:
    """Permission strings ("b0", "r5", ...) into a Perms tuple.

    The domid is read as cxenstored's xs_strings_to_perms() reads it, with
    strtol() in base 0, so "r010" names domain 8 and "r0x1f" domain 31.
    One thing is stricter: a domid outside 0..65535, which strtol() would
    wrap into an unsigned id no domain has, is EINVAL.
    """
    out = []
    for item in items:
        domid = _strtol_whole(item[1:])
        if not item or item[0] not in _PERM_CHARS or domid is None or not 0 <= domid <= 0xFFFF:
            raise XsError("EINVAL", f"bad permission {item[:16]!r}")
        out.append((domid, _PERM_CHARS[item[0]]))
    if not out:
        raise XsError("EINVAL", "no permissions given")
    return tuple(out)


def _strtol_whole(text: str) -> int | None:
    """strtol(text, &end, 0) if it reads all of ``text``, else None."""
    m = _strtol0(text)
    if m is None:
        return None
    sign, digits = m.groups()
    if digits[:2] in ("0x", "0X"):
        value = int(digits, 16)
    elif digits[0] == "0":
        value = int(digits, 8)
    else:
        value = int(digits)
    return -value if sign == "-" else value


def format_perms(perms: Perms) -> bytes:
    """Perms as the wire wants them: "b0\\0r5\\0"."""
    return b"".join(
        f"{_PERM_NAMES[mask & PERM_BOTH]}{domid}\0".encode() for domid, mask in perms
    )


def perm_for(perms: Perms, domid: int, target: int | None) -> int:
    """What an unprivileged ``domid`` (acting also for ``target``) may do.

    The owner gets everything; otherwise the first entry after the owner
    naming the domain decides, else the default (the owner entry's mask).
    Ignored entries (PERM_IGNORE) do not count.
    Privileged callers never get here: they have full access.
    """
    owner = perms[0][0]
    if owner == domid or owner == target:
        return PERM_BOTH
    for who, mask in perms[1:]:
        if (who == domid or who == target) and not mask & PERM_IGNORE:
            return mask
    return perms[0][1]


# --- the live store ----------------------------------------------------------

#: Special nodes: watchable, with permissions, not part of the tree.
SPECIAL_PATHS = ("@introduceDomain", "@releaseDomain")


class Store:
    """The live node tree.

    ``generation`` is the last generation number handed out; every node
    installed by :meth:`put` gets the next one, so a node's generation
    changes exactly when it changes (and a re-created node never repeats an
    old generation).  ``owned`` counts nodes per owning domain for the
    node quota.

    ``released`` maps a domid to the generation :meth:`note_release` took
    when the domain was last released, and ``introduced`` a domid introduced
    now to the one :meth:`note_introduce` took, so that a transaction begun
    before (see :meth:`new_epoch`) can tell whether an entry it set names a
    domain gone since, or one introduced again before it set the entry
    (cxenstored compares domain and node generations instead:
    chk_domain_generation()).  At most one entry per domid in each: bounded.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.generation = 0
        self.owned: collections.Counter[int] = collections.Counter()
        self.released: dict[int, int] = {}
        self.introduced: dict[int, int] = {}
        #: the largest value in ``released`` (0: none), to skip the search
        #: at commit when nothing was released since the transaction began
        self.last_release = 0
        dom0_only: Perms = ((0, PERM_NONE),)
        # The skeleton cxenstored's setup_structure() creates.
        self.put("/", Node(b"", dom0_only, {"tool": None}))
        self.put("/tool", Node(b"", dom0_only, {"xenstored": None}))
        self.put("/tool/xenstored", Node(b"", dom0_only, {}))
        for special in SPECIAL_PATHS:
            self.nodes[special] = Node(b"", dom0_only, {}, 0)

    def get(self, path: str) -> Node | None:
        return self.nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        """Install ``node`` (a fresh object, not yet shared) at ``path``."""
        old = self.nodes.get(path)
        owned = self.owned
        if path[0] == "@":
            pass  # special nodes are not charged to anyone
        elif old is None:
            owned[node.perms[0][0]] += 1
        elif old.perms[0][0] != node.perms[0][0]:
            owned[old.perms[0][0]] -= 1
            owned[node.perms[0][0]] += 1
        self.generation += 1
        node.generation = self.generation
        self.nodes[path] = node

    def delete(self, path: str) -> None:
        old = self.nodes.pop(path, None)
        if old is not None and path[0] != "@":
            self.owned[old.perms[0][0]] -= 1

    def count(self, domid: int) -> int:
        """Nodes owned by ``domid`` (for the node quota)."""
        return self.owned[domid]

    def new_epoch(self) -> int:
        """A generation of its own, for something that happens now.

        Each call takes a fresh number, so two events are never tied: a
        transaction beginning and a domain being released are always
        ordered one way or the other.
        """
        self.generation += 1
        return self.generation

    def note_introduce(self, domid: int) -> None:
        """Remember that ``domid`` is introduced as of now."""
        self.introduced[domid] = self.new_epoch()

    def note_release(self, domid: int) -> None:
        """Remember that ``domid`` is released as of now."""
        self.introduced.pop(domid, None)
        self.last_release = self.released[domid] = self.new_epoch()

    def released_since(self, generation: int) -> frozenset[int]:
        """Domids released after ``generation`` (a :meth:`new_epoch` value)."""
        if self.last_release <= generation:
            return frozenset()
        return frozenset(d for d, g in self.released.items() if g > generation)
