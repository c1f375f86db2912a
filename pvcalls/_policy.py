"""Per-domain access policy for PV Calls: what a guest may connect to and bind.

The rules and the file format are :class:`Policy`'s docstring, public as
``help(pvcalls.Policy)``, and the README's Policy section.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenback.platform import DOMID_FIRST_RESERVED

from . import _errno

__all__ = [
    "DENIED_ERRNO",
    "LIMIT_ERRNO",
    "AccessList",
    "DomainPolicy",
    "Policy",
    "PolicyError",
    "Rule",
]

#: Positive Xen errno of a CONNECT or BIND the policy refuses (sent negated).
DENIED_ERRNO = _errno.EACCES
#: Positive Xen errno of a SOCKET or ACCEPT beyond ``max_sockets``.
LIMIT_ERRNO = _errno.EMFILE

_ANY_NETWORK = ipaddress.IPv4Network("0.0.0.0/0")
_ALL_PORTS = range(0, 65536)
#: Domids from DOMID_FIRST_RESERVED (0x7FF0) up name no domain of their own.
_MAX_DOMID = DOMID_FIRST_RESERVED - 1
#: What Python's int() reads as a decimal number (a sign, white space,
#: underscores between digits, any script's digits): a section key or a
#: name so spelt is a domid written wrong, not a domain's name.
_READS_AS_NUMBER = re.compile(r"\s*[+-]?\d+(?:_\d+)*\s*")
#: The largest policy file read: far more than thousands of rules take.
_MAX_FILE_SIZE = 1 << 20
#: A key TOML takes unquoted.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class PolicyError(ValueError):
    """A policy file or rule is malformed; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``NETWORK[:PORTS]`` rule."""

    network: ipaddress.IPv4Network = _ANY_NETWORK
    ports: range = _ALL_PORTS

    def __post_init__(self) -> None:
        # Checked here, not when a guest's CONNECT is matched: a wrong rule
        # would fail it with -EIO, or match nothing, far from its cause.
        if not isinstance(self.network, ipaddress.IPv4Network):
            raise TypeError(f"network must be an ipaddress.IPv4Network, not "
                            f"{type(self.network).__name__} (Rule.parse() takes text)")
        if not isinstance(self.ports, range):
            raise TypeError(f"ports must be a range, not {type(self.ports).__name__}")
        if self.ports.step != 1:
            raise PolicyError(f"ports must be a range of step 1, got {self.ports!r}")
        if not self.ports or self.ports.start < 0 or self.ports.stop > _ALL_PORTS.stop:
            raise PolicyError(f"ports must be a range within 0-{_ALL_PORTS[-1]}, "
                              f"got {self.ports!r}")

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Parse ``NETWORK[:PORTS]``; raises :class:`PolicyError`."""
        if not isinstance(text, str):
            raise PolicyError(f"rule {text!r} is not a string")
        # An empty rule, or an empty side of the ':', used to pass for '*':
        # an undocumented way to allow or deny everything by a slip.
        if not text.strip():
            raise PolicyError(f"empty rule {text!r} (write '*' for any address and port)")
        # int() would read " 80 - 90 " as 80-90; a rule is one word.
        if any(char.isspace() for char in text):
            raise PolicyError(f"rule {text!r}: white space in a rule")
        # Split on its first ':', an IPv6 rule would be blamed for a bad port.
        if text.count(":") > 1:
            if _is_ipv6(text):
                raise PolicyError(f"rule {text!r}: IPv6 is not supported "
                                  "(PV Calls here carries IPv4 only)")
            raise PolicyError(f"rule {text!r}: more than one ':'")
        net_text, sep, port_text = text.partition(":")
        if not net_text:
            raise PolicyError(f"rule {text!r}: no network before ':' (write '*' for any)")
        if sep and not port_text:
            raise PolicyError(f"rule {text!r}: no port after ':' (write '*' for any)")
        if net_text == "*":
            network = _ANY_NETWORK
        else:
            # Strict: '10.0.0.1/8' is as likely a slip for '10.0.0.1' as for
            # '10.0.0.0/8', and silently widening it to the latter could
            # allow (or deny) far more than its author meant.  For the same
            # reason the hint offers both readings.
            try:
                network = ipaddress.IPv4Network(net_text)
            except ValueError as exc:
                try:
                    wide = ipaddress.IPv4Interface(net_text)
                    hint = f" (did you mean {wide.network}, or the address {wide.ip}?)"
                except ValueError:
                    hint = ""
                raise PolicyError(f"rule {text!r}: bad IPv4 network: {exc}{hint}") from None
        if not sep or port_text == "*":
            return cls(network, _ALL_PORTS)
        low_text, dash, high_text = port_text.partition("-")
        low = _decimal(low_text, _ALL_PORTS[-1], f"rule {text!r}: port")
        high = _decimal(high_text, _ALL_PORTS[-1], f"rule {text!r}: port") if dash else low
        if low > high:
            raise PolicyError(f"rule {text!r}: port range {port_text} ends before it starts")
        return cls(network, range(low, high + 1))

    def matches(self, address: ipaddress.IPv4Address, port: int) -> bool:
        """Whether ``address:port`` falls in this rule's network and ports."""
        return address in self.network and port in self.ports

    def __str__(self) -> str:
        if self.ports == _ALL_PORTS:
            return str(self.network)
        if len(self.ports) == 1:
            return f"{self.network}:{self.ports.start}"
        return f"{self.network}:{self.ports.start}-{self.ports.stop - 1}"


@dataclass(frozen=True, slots=True)
class AccessList:
    """Deny rules first; then, if ``allow`` is not None, one must match."""

    allow: tuple[Rule, ...] | None = None
    deny: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        # Any iterable of rules, kept as a tuple: frozen means that a list
        # changed afterwards does not change the policy.
        if self.allow is not None:
            object.__setattr__(self, "allow", _rules(self.allow, "allow"))
        object.__setattr__(self, "deny", _rules(self.deny, "deny"))

    def permits(self, host: str, port: int) -> bool:
        """Whether ``host:port`` passes this list."""
        address = ipaddress.IPv4Address(host)
        if any(rule.matches(address, port) for rule in self.deny):
            return False
        if self.allow is None:
            return True
        return any(rule.matches(address, port) for rule in self.allow)


@dataclass(frozen=True, slots=True)
class DomainPolicy:
    """The rules that apply to one domain.  ``max_sockets`` None = no limit."""

    connect: AccessList = field(default_factory=AccessList)
    bind: AccessList = field(default_factory=AccessList)
    max_sockets: int | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "bind"):
            value = getattr(self, name)
            if not isinstance(value, AccessList):
                raise TypeError(f"{name} must be a pvcalls.AccessList, not {type(value).__name__}")
        limit = self.max_sockets
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int):
                raise TypeError(f"max_sockets must be an int or None, not {type(limit).__name__}")
            if limit < 0:
                raise PolicyError(f"max_sockets must be at least 0 (or None: no limit), "
                                  f"got {limit}")


def connect_destination(host: str) -> str:
    """The address a connect to ``host`` (dotted quad) reaches: Linux sends
    one to ``0.0.0.0`` to ``127.0.0.1`` (ip_route_output_key_hash_rcu).
    CONNECT is checked, and made, there, or a deny rule for 127.0.0.0/8
    would not hold."""
    return "127.0.0.1" if host == "0.0.0.0" else host


class Policy:
    """Access rules by frontend domid or name, with a default for the others.

    ``Policy()`` allows everything and sets no limit (Linux's behaviour).
    Instances are immutable and safe to share between threads.  Built in
    Python, every part is checked as it is built (TypeError, or
    :class:`PolicyError` for a value out of range), not when a guest
    first meets it.  Its file (:meth:`from_file`, :meth:`from_toml`) is
    TOML, read with :mod:`tomllib`::

        # Applies to every domain that has no section of its own, and supplies
        # each key a domain section leaves out.
        [default]
        max_sockets = 256
        connect.allow = ["0.0.0.0/0"]
        connect.deny = ["169.254.0.0/16", "10.0.0.1:22"]
        bind.allow = ["127.0.0.1:1024-65535", "0.0.0.0:8000-8999"]

        # Domain 7 (by domid) gets its own connect.allow and limit; its
        # connect.deny and bind rules come from [default].
        [domain.7]
        max_sockets = 16
        connect.allow = ["192.0.2.0/24:80", "192.0.2.0/24:443"]

        # A domain by name (its XenStore ``name`` node, written by the
        # toolstack): stable across restarts, unlike domids.
        [domain.webfront]
        connect.allow = ["10.1.0.0/16:443"]

    A section keyed by a number in digits 0-9 alone (``7``, ``007``) applies
    to that domid, 0 to 32751; any other key is a domain name, but for one
    that Python's ``int()`` would read as a number (``-1``, ``+7``, ``" 7"``,
    ``1_0``, another script's digits): that is refused, as a domid written
    wrong, not taken for a name.  xl would take such a name (it reads a
    domain's qualifier of digits alone as a domid, anything else as a name),
    but a policy file that means a domain named ``-1`` is far less likely
    than a slip, which would leave the domain its author meant to
    ``[default]``'s rules; give such a domain a domid section instead.

    A domid section wins over a name section, and a name section over
    ``[default]``.  A domain without a ``name`` node has no name.  One
    whose name the backend may not read (a backend in a driver domain, which
    the toolstack lets read no other domain's home) is refused its device if a
    name section could apply to it: its rules cannot be known, and
    ``[default]``'s may be the laxer ones.

    A file without any section is an error, not a policy that allows
    everything: it is more likely truncated than meant.  An empty
    ``[default]`` section says "allow everything" on purpose.

    A rule is ``NETWORK[:PORTS]``: an IPv4 address or network (``10.0.0.0/8``,
    no host bits set; ``*`` for any address) and optionally a port (``80``), an
    inclusive range (``1024-65535``) or ``*`` (any port, the default), in ASCII
    digits.  There are no IPv6 rules: the backend serves ``AF_INET`` only.
    A bind to ``0.0.0.0`` (every address) only matches rules whose network
    contains ``0.0.0.0``, such as ``0.0.0.0/0`` or ``0.0.0.0``: binding
    everywhere must be allowed as such.
    Likewise a bind to port 0 (the host picks a free port) is checked as port 0:
    allow it with a rule covering port 0 (``127.0.0.1:0``, ``127.0.0.1:*``).
    A connect to ``0.0.0.0`` is checked, and made, as a connect to
    ``127.0.0.1``: that is where Linux sends it.

    What the rules mean: Linux's backend lets any guest connect anywhere
    the backend domain can reach and bind any port it can bind.  A policy
    narrows that per frontend domain:

    * CONNECT and BIND each have an access list: ``deny`` rules, then ``allow``
      rules.  A destination matching any deny rule is refused; otherwise, if
      allow rules are given, it must match one of them; with no allow rules
      everything not denied is allowed.
    * ``max_sockets`` limits how many sockets (of any kind: new, active,
      passive) one domain may hold at a time.  Any size is taken as given,
      even past 64 bits (which TOML's spec would refuse and :mod:`tomllib`
      reads): it is compared as a Python int, so nothing wraps, and one no
      domain can reach is never reached.  No limit is the key left out.

    A refused CONNECT or BIND is answered with ``-EACCES`` (Xen numbering, 13),
    like a host firewall refusing the operation; a SOCKET or ACCEPT beyond the
    limit is answered with ``-EMFILE`` (24), "too many open files", since the
    limit is the domain's descriptor table.  The backend logs each refusal at
    WARNING with the domain, the command and the address (the socket id and
    the limit for one beyond the limit), at most 10 lines per
    5 s for one frontend device, however often it reconnects (as the kernel's
    ``printk_ratelimited``); how many it left out is logged when the next one
    goes out and when the device goes.
    """

    def __init__(
        self,
        default: DomainPolicy | None = None,
        domains: Mapping[int, DomainPolicy] | None = None,
        names: Mapping[str, DomainPolicy] | None = None,
    ) -> None:
        # Checked here: a domid given as a string, say, would otherwise
        # match no domain, which would get the default rules instead.
        if default is not None and not isinstance(default, DomainPolicy):
            raise TypeError(f"default must be a pvcalls.DomainPolicy or None, "
                            f"not {type(default).__name__}")
        self._default = default if default is not None else DomainPolicy()
        self._domains: dict[int, DomainPolicy] = _sections(domains, "domains", _check_domid)
        self._names: dict[str, DomainPolicy] = _sections(names, "names", _check_name)

    # -- construction -------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Load a TOML policy file (the format: :class:`Policy`'s docstring).

        Raises :class:`PolicyError` for a file that cannot be read (the
        read's OSError is its ``__cause__``, for a caller to tell a host
        short of descriptors or memory from a bad file), is larger than
        1 MiB, is not UTF-8 or not TOML, or holds a rule or value that is
        wrong.  Its message starts with ``path`` and names it only there,
        so a caller can add context without repeating it.  A UTF-8 byte
        order mark at its start is skipped.
        """
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"policy path must be a str or an os.PathLike, "
                            f"not {type(path).__name__}")
        path = Path(path)
        try:
            # Read no more than a policy can be: /dev/zero or a huge file
            # given by mistake would otherwise be read until memory ran out.
            with path.open("rb") as file:
                raw = file.read(_MAX_FILE_SIZE + 1)
        except OSError as exc:
            # str(exc) would name the file a second time.  The cause, not
            # "from None": a caller's test of the context would also see
            # an exception it was handling itself as it called us.
            raise PolicyError(f"{path}: cannot read policy: {exc.strerror or exc}") from exc
        if len(raw) > _MAX_FILE_SIZE:
            raise PolicyError(f"{path}: larger than {_MAX_FILE_SIZE >> 20} MiB, "
                              "too large for a policy file")
        try:
            # TOML is UTF-8 whatever the locale says.  A byte order mark
            # some editors put first is the encoding's signature, not
            # text: tomllib would call it an invalid statement at line 1.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise PolicyError(f"{path}: not UTF-8, as TOML must be: {exc}") from None
        try:
            return cls.from_dict(_load_toml(text))
        except PolicyError as exc:
            raise PolicyError(f"{path}: {exc}") from None

    @classmethod
    def from_toml(cls, text: str) -> Policy:
        """Parse policy text in the file format (text without any section
        is an error, as in a file).  Raises :class:`PolicyError` for text
        that is not TOML or holds a wrong rule or value, TypeError for
        ``text`` not a str."""
        if not isinstance(text, str):
            hint = " (decode it, or use Policy.from_file())" if isinstance(text, bytes) else ""
            raise TypeError(f"policy text must be a str, not {type(text).__name__}{hint}")
        return cls.from_dict(_load_toml(text))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Build a policy from the parsed file structure.

        As a file, a structure without any section is an error, not a
        policy that allows everything: ``Policy()`` is that policy.  Its
        keys are strings, as TOML's are (domids too: ``"7"``), else
        TypeError.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"policy data must be a mapping (parsed TOML), "
                            f"not {type(data).__name__}")
        _check_keys(data, "policy data")
        unknown = set(data) - {"default", "domain"}
        if unknown:
            raise PolicyError(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
        default_table = _table(data.get("default", {}), "[default]")
        domain_tables = _table(data.get("domain", {}), "[domain]")
        # An empty policy allows everything, so an empty file is far more
        # likely truncated or the wrong file than meant: say so rather than
        # silently lift every restriction.
        if "default" not in data and not domain_tables:
            raise PolicyError("no [default] or [domain.X] section: an empty policy would "
                              "allow everything (to mean that, write an empty [default])")
        default = _parse_domain("[default]", default_table, DomainPolicy())
        domains: dict[int, DomainPolicy] = {}
        names: dict[str, DomainPolicy] = {}
        # TOML rejects a repeated key, but not [domain.7] next to [domain.07]:
        # two spellings of one domid, of which the later would silently win.
        domid_keys: dict[int, str] = {}
        for key, section in domain_tables.items():
            where = f"[domain.{_toml_key(key)}]"
            rules = _parse_domain(where, _table(section, where), default)
            if key.isascii() and key.isdigit():
                domid = _decimal(key, _MAX_DOMID, f"{where}: domid")
                if domid in domid_keys:
                    raise PolicyError(f"{where}: domid {domid} already has a section, "
                                      f"[domain.{domid_keys[domid]}]")
                domid_keys[domid] = key
                domains[domid] = rules
            elif _READS_AS_NUMBER.fullmatch(key):
                raise PolicyError(f"{where}: {key!r} reads as a number, not as a domain name: "
                                  f"a domid is written in digits 0-9 alone (0-{_MAX_DOMID})")
            elif key and key.isprintable() and "/" not in key:
                names[key] = rules
            else:
                raise PolicyError(f"{where}: not a domid or a domain name")
        return cls(default, domains, names)

    # -- queries ------------------------------------------------------------

    def for_domain(self, domid: int, name: str | None = None) -> DomainPolicy:
        """The rules of domain ``domid`` called ``name``: its domid section,
        else its name section, else ``[default]``."""
        rules = self._domains.get(domid)
        if rules is None and name is not None:
            rules = self._names.get(name)
        return rules if rules is not None else self._default

    def needs_name(self, domid: int) -> bool:
        """Whether the rules of domain ``domid`` may depend on its name:
        there are name sections, and none by its domid (which would win)."""
        return bool(self._names) and domid not in self._domains

    def connect_allowed(self, domid: int, host: str, port: int, name: str | None = None) -> bool:
        """Whether domain ``domid`` (``name``) may connect to ``host:port``
        (checked where the connection goes: see :func:`connect_destination`)."""
        return self.for_domain(domid, name).connect.permits(connect_destination(host), port)

    def bind_allowed(self, domid: int, host: str, port: int, name: str | None = None) -> bool:
        """Whether domain ``domid`` (``name``) may bind ``host:port``."""
        return self.for_domain(domid, name).bind.permits(host, port)

    def max_sockets(self, domid: int, name: str | None = None) -> int | None:
        """The socket limit of domain ``domid`` (``name``); None: unlimited."""
        return self.for_domain(domid, name).max_sockets

    def __repr__(self) -> str:
        return (f"Policy(default={self._default!r}, domains={self._domains!r}, "
                f"names={self._names!r})")


def _load_toml(text: str) -> dict[str, Any]:
    """``text`` parsed; raises :class:`PolicyError` for anything tomllib refuses."""
    try:
        return tomllib.loads(text)
    except ValueError as exc:
        # TOMLDecodeError, or int()'s own ValueError, which tomllib lets
        # out for an integer of more than sys.get_int_max_str_digits().
        raise PolicyError(f"not valid TOML: {exc}") from None


def _toml_key(key: str) -> str:
    """``key`` as TOML spells it, for a message naming its section: quoted
    unless bare, with what does not print escaped.  Unquoted, an empty key
    left ``[domain.]``, a tab looked like a space and ``[domain.web.front]``
    named another table than the one that was wrong."""
    if _BARE_KEY.fullmatch(key):
        return key
    escaped = "".join(
        "\\" + char if char in '"\\'
        else char if char.isprintable()
        else f"\\u{ord(char):04X}" if ord(char) <= 0xFFFF
        else f"\\U{ord(char):08X}"
        for char in key)
    return f'"{escaped}"'


def _decimal(text: str, maximum: int, what: str) -> int:
    """The value of ``text``, which must be ASCII decimal digits, 0 to ``maximum``.

    ``int()`` alone would also take ``"+8"``, ``" 8 "``, ``"8_0"`` and other
    scripts' digits (``"８"``), none of which a policy file should mean.
    ``what`` starts the message of the :class:`PolicyError` raised otherwise.
    """
    if not (text.isascii() and text.isdigit()):
        raise PolicyError(f"{what} {text!r} is not a decimal number (digits 0-9 only)")
    # Compare lengths first: int() refuses more digits than
    # sys.get_int_max_str_digits(), and a number that long is out of range.
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(maximum)) or int(digits) > maximum:
        raise PolicyError(f"{what} {text} is not within 0-{maximum}")
    return int(digits)


def _is_ipv6(rule: str) -> bool:
    """Whether ``rule`` is an IPv6 network, bracketed or not, maybe with a port."""
    for candidate in (rule, rule.rpartition(":")[0]):
        try:
            ipaddress.IPv6Network(candidate.removeprefix("[").removesuffix("]"), strict=False)
        except ValueError:
            continue
        return True
    return False


def _rules(value: object, what: str) -> tuple[Rule, ...]:
    """``value``, an AccessList's ``allow`` or ``deny``, as a tuple of rules."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a sequence of pvcalls.Rule, not {type(value).__name__}")
    rules = tuple(value)
    for rule in rules:
        if not isinstance(rule, Rule):
            raise TypeError(f"{what}: {rule!r} is not a pvcalls.Rule (Rule.parse() makes one)")
    return rules


def _check_domid(key: object) -> None:
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"domains: key {key!r} is not a domid (an int)")
    if not 0 <= key <= _MAX_DOMID:
        raise PolicyError(f"domains: domid {key} is not within 0-{_MAX_DOMID}")


def _check_name(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"names: key {key!r} is not a domain name (a str)")
    if not key or not key.isprintable() or "/" in key:
        raise PolicyError(f"names: {key!r} is not a domain name")
    if _READS_AS_NUMBER.fullmatch(key):
        raise PolicyError(f"names: {key!r} reads as a number, not as a domain name: "
                          f"a domid goes in domains, as an int (0-{_MAX_DOMID})")


def _sections(value: object, what: str,
              check_key: Callable[[object], None]) -> dict[Any, DomainPolicy]:
    """A copy of Policy's ``domains`` or ``names``, each key and rules checked."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping, not {type(value).__name__}")
    sections = dict(value)
    for key, rules in sections.items():
        check_key(key)
        if not isinstance(rules, DomainPolicy):
            raise TypeError(f"{what}[{key!r}] must be a pvcalls.DomainPolicy, "
                            f"not {type(rules).__name__}")
    return sections


def _found(value: object) -> str:
    """What a parsed TOML value is, in TOML's words, for a message saying
    it is not what was expected.  Clipped: a string may be a whole file."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value if len(value) <= 40 else value[:39] + '...'!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, int):
        # str() refuses more than sys.get_int_max_str_digits() digits.
        return f"an integer ({value})" if value.bit_length() <= 64 else "an integer"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, datetime.datetime):
        return f"a date-time ({value.isoformat()})"
    if isinstance(value, datetime.date):
        return f"a date ({value.isoformat()})"
    if isinstance(value, datetime.time):
        return f"a time ({value.isoformat()})"
    return f"a {type(value).__name__}"


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where} must be a table, not {_found(value)}")
    _check_keys(value, where)
    return value


def _check_keys(table: Mapping[Any, Any], where: str) -> None:
    # Parsed TOML has none but str keys; from_dict() may be given others.
    for key in table:
        if not isinstance(key, str):
            hint = (f"; a domid too: {str(key)!r}"
                    if isinstance(key, int) and not isinstance(key, bool) else "")
            raise TypeError(f"{where}: key {key!r} is not a string (TOML keys are{hint})")


def _parse_rules(value: object, where: str) -> tuple[Rule, ...]:
    if not isinstance(value, list):
        raise PolicyError(f"{where} must be a list of rule strings, not {_found(value)}")
    rules = []
    for item in value:
        try:
            rules.append(Rule.parse(item))
        except PolicyError as exc:
            raise PolicyError(f"{where}: {exc}") from None
    return tuple(rules)


def _parse_access(value: object, where: str, inherited: AccessList) -> AccessList:
    table = _table(value, where)
    unknown = set(table) - {"allow", "deny"}
    if unknown:
        raise PolicyError(f"{where}: unknown key(s): {', '.join(sorted(unknown))}")
    allow = (_parse_rules(table["allow"], f"{where}.allow")
             if "allow" in table else inherited.allow)
    deny = _parse_rules(table["deny"], f"{where}.deny") if "deny" in table else inherited.deny
    return AccessList(allow, deny)


def _parse_domain(where: str, table: Mapping[str, Any], inherited: DomainPolicy) -> DomainPolicy:
    unknown = set(table) - {"connect", "bind", "max_sockets"}
    if unknown:
        raise PolicyError(f"{where}: unknown key(s): {', '.join(sorted(unknown))}")
    connect = (_parse_access(table["connect"], f"{where} connect", inherited.connect)
               if "connect" in table else inherited.connect)
    bind = (_parse_access(table["bind"], f"{where} bind", inherited.bind)
            if "bind" in table else inherited.bind)
    max_sockets = inherited.max_sockets
    if "max_sockets" in table:
        value = table["max_sockets"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(f"{where}: max_sockets must be an integer, not {_found(value)}")
        if value < 0:
            raise PolicyError(f"{where}: max_sockets must be at least 0, got {value}")
        max_sockets = value
    return DomainPolicy(connect, bind, max_sockets)

