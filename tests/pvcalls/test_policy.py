"""pvcalls Policy: rule parsing, evaluation, inheritance and bad files."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pvcalls_rawfront import TIMEOUT, RawFrontend, wait_until
from racewindow import PauseAt, stands_at

import pvcalls
from pvcalls import _backend
from pvcalls._errno import EACCES, EMFILE
from pvcalls._policy import DENIED_ERRNO, LIMIT_ERRNO, Policy, PolicyError, Rule
from xenback import RateLimit

EXAMPLE = """
[default]
max_sockets = 256
connect.allow = ["0.0.0.0/0"]
connect.deny = ["169.254.0.0/16", "10.0.0.1:22"]
bind.allow = ["127.0.0.1:1024-65535", "0.0.0.0:8000-8999"]

[domain.7]
max_sockets = 16
connect.allow = ["192.0.2.0/24:80", "192.0.2.0/24:443"]
"""


def test_default_policy_allows_everything() -> None:
    policy = Policy()
    assert policy.connect_allowed(3, "8.8.8.8", 53)
    assert policy.bind_allowed(3, "0.0.0.0", 1)
    assert policy.max_sockets(3) is None


def test_documented_errnos() -> None:
    assert DENIED_ERRNO == EACCES == 13
    assert LIMIT_ERRNO == EMFILE == 24


def test_example_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE)
    policy = Policy.from_file(path)
    # [default]
    assert policy.max_sockets(1) == 256
    assert policy.connect_allowed(1, "93.184.216.34", 80)
    assert not policy.connect_allowed(1, "169.254.1.1", 80)
    assert not policy.connect_allowed(1, "10.0.0.1", 22)
    assert policy.connect_allowed(1, "10.0.0.1", 23)
    assert policy.bind_allowed(1, "127.0.0.1", 1024)
    assert policy.bind_allowed(1, "127.0.0.1", 65535)
    assert not policy.bind_allowed(1, "127.0.0.1", 1023)
    assert not policy.bind_allowed(1, "0.0.0.0", 1024)
    assert policy.bind_allowed(1, "0.0.0.0", 8080)
    assert not policy.bind_allowed(1, "127.0.0.2", 8080)  # 0.0.0.0 rule: only the wildcard
    # [domain.7]: its own connect list and limit; deny and bind inherited
    assert policy.max_sockets(7) == 16
    assert policy.connect_allowed(7, "192.0.2.9", 443)
    assert not policy.connect_allowed(7, "192.0.2.9", 22)
    assert not policy.connect_allowed(7, "198.51.100.1", 80)
    assert policy.bind_allowed(7, "127.0.0.1", 2000)



# The examples users copy: taken from the documentation itself, so that an
# edit there that breaks them fails here.
ROOT = Path(__file__).resolve().parents[2]


def _docstring_example() -> str:
    """The indented TOML after the first "::" of pvcalls.Policy's
    docstring, where help(pvcalls.Policy) shows the file format."""
    import inspect

    doc = inspect.getdoc(Policy) or ""
    lines = doc.split("::\n", 1)[1].splitlines()
    block = []
    for line in lines[1:]:  # the blank line after "::"
        if line and not line.startswith("    "):
            break
        block.append(line.removeprefix("    "))
    return "\n".join(block)


def _readme_example() -> str:
    """The README's ```toml block."""
    text = (ROOT / "README.md").read_text()
    return text.split("```toml\n", 1)[1].split("```", 1)[0]


def test_the_docstring_example_means_what_its_comments_say() -> None:
    policy = Policy.from_toml(_docstring_example())
    # [default]: every domain without a section of its own.
    assert policy.max_sockets(3) == 256
    assert not policy.connect_allowed(3, "169.254.1.1", 80)
    assert not policy.connect_allowed(3, "10.0.0.1", 22)
    assert policy.connect_allowed(3, "10.0.0.1", 80)
    assert policy.bind_allowed(3, "127.0.0.1", 1024)
    assert policy.bind_allowed(3, "0.0.0.0", 8999)
    assert not policy.bind_allowed(3, "0.0.0.0", 9000)
    # [domain.7]: its own connect.allow and limit, deny and bind inherited.
    assert policy.max_sockets(7) == 16
    assert policy.connect_allowed(7, "192.0.2.1", 443)
    assert not policy.connect_allowed(7, "192.0.2.1", 8080)
    assert not policy.connect_allowed(7, "10.0.0.1", 22)
    assert policy.bind_allowed(7, "127.0.0.1", 1024)
    # [domain.webfront]: by name, whatever its domid; a domid section wins.
    assert policy.connect_allowed(12, "10.1.2.3", 443, "webfront")
    assert not policy.connect_allowed(12, "10.1.2.3", 80, "webfront")
    assert policy.max_sockets(12, "webfront") == 256
    assert policy.max_sockets(7, "webfront") == 16


def test_the_readme_example_means_what_the_readme_says(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(_readme_example())
    policy = Policy.from_file(path)  # verbatim, its trailing comment included
    assert policy.max_sockets(2) == 256
    assert not policy.connect_allowed(2, "192.0.2.1", 22)
    assert policy.connect_allowed(2, "192.0.2.1", 80)
    # "a domain name or a domid": here the name.
    assert policy.connect_allowed(1, "127.0.0.1", 8080, "guest1")
    assert policy.connect_allowed(1, "10.2.3.4", 443, "guest1")
    assert not policy.connect_allowed(1, "10.2.3.4", 444, "guest1")
    # [default]'s deny, which guest1's section leaves out, wins over its allow.
    assert not policy.connect_allowed(1, "127.0.0.1", 22, "guest1")
    assert not policy.connect_allowed(1, "192.0.2.1", 80, "guest1")
    assert policy.bind_allowed(1, "127.0.0.1", 8000, "guest1")
    assert not policy.bind_allowed(1, "127.0.0.1", 9001, "guest1")


def test_a_huge_max_sockets_is_a_limit_taken_as_given() -> None:
    """Past TOML's 64 bits (tomllib reads any int) or a C int, max_sockets
    is still the number written: the backend compares Python ints, nothing
    wraps, and a limit no domain can reach is never reached.  No limit is
    said by leaving the key out, so the policy reports the number, not
    None."""
    huge = 2 ** 64
    policy = Policy.from_toml(f"[default]\nmax_sockets = {huge}\n")
    assert policy.max_sockets(3) == huge
    assert pvcalls.DomainPolicy(max_sockets=huge).max_sockets == huge


def test_a_domain_section_takes_from_default_each_key_it_leaves_out() -> None:
    """Key by key: allow, deny and max_sockets each come from [default]
    unless the domain's section gives them; max_sockets = 0 is a limit
    (no sockets at all), not an error."""
    policy = Policy.from_toml("""
[default]
max_sockets = 5
connect.allow = ["10.0.0.0/8"]
connect.deny = ["10.0.0.1"]

[domain.3]
connect.deny = ["10.0.0.2"]

[domain.4]
connect.allow = ["10.0.0.0/8", "192.0.2.0/24"]

[domain.5]
max_sockets = 0
""")
    # [domain.3]: its own deny, the default's allow and limit.
    assert policy.connect_allowed(3, "10.0.0.1", 80)
    assert not policy.connect_allowed(3, "10.0.0.2", 80)
    assert not policy.connect_allowed(3, "192.0.2.1", 80)
    assert policy.max_sockets(3) == 5
    # [domain.4]: its own allow, the default's deny and limit.
    assert policy.connect_allowed(4, "192.0.2.1", 80)
    assert not policy.connect_allowed(4, "10.0.0.1", 80)
    assert policy.max_sockets(4) == 5
    # [domain.5]: no sockets; the default's rules.
    assert policy.max_sockets(5) == 0
    assert not policy.connect_allowed(5, "10.0.0.1", 80)


def test_a_domain_section_without_bind_rules_takes_the_default_s() -> None:
    policy = Policy.from_toml("""
[default]
bind.allow = ["127.0.0.1:8000"]
bind.deny = ["127.0.0.1:8000"]

[domain.3]
max_sockets = 1

[domain.4]
bind.allow = ["127.0.0.1:8000-8001"]
""")
    assert not policy.bind_allowed(3, "127.0.0.1", 8001)  # the default's allow
    assert not policy.bind_allowed(3, "127.0.0.1", 8000)
    assert not policy.bind_allowed(4, "127.0.0.1", 8000)  # the default's deny
    assert policy.bind_allowed(4, "127.0.0.1", 8001)


def test_sections_by_name() -> None:
    policy = Policy.from_toml("""
[default]
max_sockets = 10
[domain.web]
max_sockets = 2
[domain.5]
max_sockets = 5
""")
    assert policy.max_sockets(3, "web") == 2
    assert policy.max_sockets(3, "other") == 10
    assert policy.max_sockets(3) == 10
    assert policy.max_sockets(5, "web") == 5  # the domid section wins


def test_deny_wins_over_allow() -> None:
    policy = Policy.from_toml('[default]\nconnect.allow = ["*"]\nconnect.deny = ["127.0.0.0/8"]')
    assert not policy.connect_allowed(0, "127.0.0.1", 80)
    assert policy.connect_allowed(0, "128.0.0.1", 80)


def test_empty_allow_list_denies_all() -> None:
    policy = Policy.from_toml("[default]\nbind.allow = []")
    assert not policy.bind_allowed(5, "127.0.0.1", 5000)
    assert policy.connect_allowed(5, "127.0.0.1", 5000)


@pytest.mark.parametrize(
    ("text", "network", "first", "last"),
    [
        ("*", "0.0.0.0/0", 0, 65535),
        ("10.1.2.3", "10.1.2.3/32", 0, 65535),
        ("10.1.2.0/24:80", "10.1.2.0/24", 80, 80),
        ("10.1.2.0/24:1-1023", "10.1.2.0/24", 1, 1023),
        ("10.1.2.3/32", "10.1.2.3/32", 0, 65535),
        ("0.0.0.0/0:22", "0.0.0.0/0", 22, 22),
        ("*:*", "0.0.0.0/0", 0, 65535),
        ("*:0", "0.0.0.0/0", 0, 0),
        ("*:65535", "0.0.0.0/0", 65535, 65535),
        ("*:0-65535", "0.0.0.0/0", 0, 65535),
        ("*:8-8", "0.0.0.0/0", 8, 8),
        ("*:0080", "0.0.0.0/0", 80, 80),
        # Leading zeros do not count towards the port's length.
        ("*:0000000080-00000065535", "0.0.0.0/0", 80, 65535),
    ],
)
def test_rule_parse(text: str, network: str, first: int, last: int) -> None:
    rule = Rule.parse(text)
    assert str(rule.network) == network
    assert rule.ports.start == first and rule.ports.stop - 1 == last


@pytest.mark.parametrize("text", ["0.0.0.0/0", "10.1.2.3/32", "10.1.2.0/24:80",
                                  "10.0.0.0/8:1024-65535", "0.0.0.0/0:0-1"])
def test_rule_str_is_its_rule_text(text: str) -> None:
    rule = Rule.parse(text)
    assert str(rule) == text
    assert Rule.parse(str(rule)) == rule


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[default]\nconnect.allow = ["300.1.1.1"]', "bad IPv4 network"),
        ('[default]\nconnect.allow = ["300.1.1.1/8"]', r"bad IPv4 network: .*300\.1\.1\.1'$"),
        ('[default]\nconnect.allow = ["10.0.0.1/8:80"]',
         r"'10\.0\.0\.1/8:80': bad IPv4 network: 10\.0\.0\.1/8 has host bits set "
         r"\(did you mean 10\.0\.0\.0/8, or the address 10\.0\.0\.1\?\)$"),
        # A mask of 0.0.0.0 is /0: the hint must not offer only "every address".
        ('[default]\nconnect.allow = ["1.2.3.4/0.0.0.0"]',
         r"\(did you mean 0\.0\.0\.0/0, or the address 1\.2\.3\.4\?\)$"),
        ('[default]\nconnect.allow = ["1.2.3.4:http"]', "port 'http' is not a decimal number"),
        ('[default]\nconnect.allow = ["1.2.3.4:9-8"]', "port range 9-8 ends before it starts"),
        ('[default]\nconnect.allow = ["1.2.3.4:70000"]', "port 70000 is not within 0-65535"),
        ('[default]\nconnect.allow = ["1.2.3.4:1-65536"]', "port 65536 is not within 0-65535"),
        (f'[default]\nconnect.allow = ["1.2.3.4:{"9" * 5000}"]', "is not within 0-65535"),
        ('[default]\nconnect.allow = ["10.0.0.0/8:8_0"]', "port '8_0' is not a decimal number"),
        ('[default]\nconnect.allow = ["10.0.0.0/8:\uff18\uff10"]', "is not a decimal number"),
        ('[default]\nconnect.allow = ["10.0.0.0/8:+80"]', "port '\\+80' is not a decimal"),
        ('[default]\nconnect.allow = ["10.0.0.0/8:-80"]', "port '' is not a decimal number"),
        ('[default]\nconnect.allow = ["10.0.0.0/8:80-"]', "port '' is not a decimal number"),
        ('[default]\nconnect.allow = ["10.0.0.0/8:1-2-3"]', "port '2-3' is not a decimal"),
        ('[default]\nconnect.allow = ["10.0.0.0/8: 80 - 90 "]', "white space in a rule"),
        ('[default]\nconnect.allow = [" 10.0.0.0/8"]', "white space in a rule"),
        ('[default]\nconnect.allow = ["::1/128"]', "'::1/128': IPv6 is not supported"),
        ('[default]\nconnect.allow = ["::1"]', "IPv6 is not supported"),
        ('[default]\nconnect.allow = ["2001:db8::/32:443"]', "IPv6 is not supported"),
        ('[default]\nconnect.allow = ["[::1]:80"]', "IPv6 is not supported"),
        ('[default]\nconnect.allow = ["::ffff:10.0.0.1"]', "IPv6 is not supported"),
        ('[default]\nconnect.allow = ["1.2.3.4:80:90"]', "'1.2.3.4:80:90': more than one ':'$"),
        ('[default]\nconnect.allow = "1.2.3.4"',
         r"^\[default\] connect.allow must be a list of rule strings, not a string \('1.2.3.4'\)$"),
        ("[default]\nbind.deny = {}", r"bind.deny must be a list of rule strings, not a table$"),
        ('[default]\nconnect.allow = [""]', r"^\[default\] connect.allow: empty rule ''"),
        ('[domain.3]\nbind.deny = ["  "]', r"^\[domain.3\] bind.deny: empty rule '  '"),
        ('[default]\nconnect.deny = [":80"]', "no network before ':'"),
        ('[default]\nconnect.deny = ["10.0.0.0/8:"]', "no port after ':'"),
        ('[default]\nconnect.allow = [7]', "not a string"),
        ("[default]\nmax_sockets = -1", r"^\[default\]: max_sockets must be at least 0, got -1$"),
        ("[default]\nmax_sockets = true",
         r"^\[default\]: max_sockets must be an integer, not a boolean \(true\)$"),
        ('[default]\nmax_sockets = "5"',
         r"^\[default\]: max_sockets must be an integer, not a string \('5'\)$"),
        ("[default]\nmax_sockets = 5.0", r"max_sockets must be an integer, not a float \(5.0\)$"),
        ("[default]\nmax_sockets = [5]", r"max_sockets must be an integer, not an array$"),
        ("[default]\nmax_sockets = 1979-05-27", r"must be an integer, not a date \(1979-05-27\)$"),
        ("[default]\nlisten.allow = []", "unknown key"),
        ("[default]\nconnect.maybe = []", "unknown key"),
        # A misspelt key in a domain section would leave the domain [default]'s value.
        ("[domain.7]\nmax_socket = 4", r"^\[domain.7\]: unknown key\(s\): max_socket$"),
        # A section is named as TOML spells it: [domain.a/b] is no TOML,
        # [domain.a\tb] hides the tab, [domain.web.front] is another table.
        ('[domain."a/b"]\nmax_sockets = 1', r'^\[domain\."a/b"\]: not a domid or a domain name$'),
        ('[domain."a\\tb"]\nmax_sockets = 1',
         r'^\[domain\."a\\u0009b"\]: not a domid or a domain name$'),
        ('[domain."a\\u200bb"]\nmax_sockets = 1',
         r'^\[domain\."a\\u200Bb"\]: not a domid or a domain name$'),
        ('[domain."web.front"]\nmax_sockets = -1',
         r'^\[domain\."web\.front"\]: max_sockets must be at least 0, got -1$'),
        ('[domain."say \\"hi\\""]\nmax_sockets = -1', r'^\[domain\."say \\"hi\\""\]: max_sockets'),
        ("default = 1", r"^\[default\] must be a table, not an integer \(1\)$"),
        ("domain = 1", r"^\[domain\] must be a table, not an integer \(1\)$"),
        ("[domain]\n7 = 'x'", r"^\[domain.7\] must be a table, not a string \('x'\)$"),
        ("[default]\nbind = []", r"^\[default\] bind must be a table, not an array$"),
        (f"default = '{'x' * 100}'", r"must be a table, not a string \('x{39}\.\.\.'\)$"),
        # A long integer is not spelt out in the message.
        (f"default = {'9' * 4000}", r"^\[default\] must be a table, not an integer$"),
        ('[domain.""]\nmax_sockets = 1', r'^\[domain\.""\]: not a domid or a domain name$'),
        ("[domain.99999]\nmax_sockets = 1", r"\[domain.99999\]: domid 99999 is not within 0-32751"),
        ("[domain.32752]\nmax_sockets = 1", "not within 0-32751"),
        (f"[domain.{'9' * 5000}]\nmax_sockets = 1", "not within 0-32751"),
        ("[other]\n", "unknown top-level"),
        ("[default\n", "not valid TOML"),
        (f"[default]\nmax_sockets = {'9' * 5000}", "^not valid TOML: .*5000 digits"),
        (f"[default]\nconnect.allow = [{'1' * 4301}]", "^not valid TOML: .*4301 digits"),
    ],
)
def test_bad_policy_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy.from_toml(text)


@pytest.mark.parametrize("key", ["-1", "+7", " 7", "7 ", "1_0", "\uff17", "-32752", "-0"])
def test_a_section_key_that_reads_as_a_number_is_no_name(key: str) -> None:
    """[domain.-1] was read as a domain named "-1": its rules applied to
    nobody, and the domain its author meant got [default]'s.  xl reads a
    domain's qualifier of digits alone as a domid and anything else as a
    name, so "-1" can name a domain there; but a policy meaning it is far
    less likely than a slip, and a slip here leaves a domain the laxer
    rules: refused, saying how a domid is written."""
    escaped = key.replace("\\", "\\\\").replace('"', '\\"')
    with pytest.raises(PolicyError, match=r"^\[domain\..*\]: .* reads as a number, .*: a domid "
                                          r"is written in digits 0-9 alone \(0-32751\)"):
        Policy.from_toml(f'[domain."{escaped}"]\nmax_sockets = 1\n')


@pytest.mark.parametrize("key", ["-1", "7", "+7", "\uff17"])
def test_a_name_that_reads_as_a_number_is_refused_in_python_too(key: str) -> None:
    with pytest.raises(PolicyError, match=r"^names: .* reads as a number"):
        Policy(names={key: _DP})


@pytest.mark.parametrize("name", ["web-1", "1web", "-", "1-2", "-web", "0x10", "1.5", "1e3"])
def test_a_name_with_digits_is_still_a_name(name: str) -> None:
    policy = Policy.from_toml(f'[domain."{name}"]\nmax_sockets = 1\n')
    assert policy.max_sockets(5, name) == 1
    assert policy.max_sockets(5, "other") is None


def test_one_domid_spelt_twice_names_both_sections() -> None:
    with pytest.raises(PolicyError,
                       match=r"^\[domain.07\]: domid 7 already has a section, \[domain.7\]$"):
        Policy.from_toml("[domain.7]\nmax_sockets = 1\n[domain.07]\nmax_sockets = 2\n")


def test_domid_with_leading_zeros() -> None:
    policy = Policy.from_toml("[domain.007]\nmax_sockets = 1\n[domain.0]\nmax_sockets = 2\n"
                              "[domain.000000032751]\nmax_sockets = 3\n")
    assert policy.max_sockets(7) == 1
    assert policy.max_sockets(0) == 2
    assert policy.max_sockets(32751) == 3


def test_other_scripts_digits_are_neither_a_domid_nor_a_name() -> None:
    # "\uff17" (a fullwidth 7) is no domid; nor a name any longer: int()
    # reads it as 7, so it is far likelier a slip for domain 7 than a
    # domain's name, and either reading would give one of them the
    # wrong rules.
    with pytest.raises(PolicyError, match=r"'\uff17' reads as a number"):
        Policy.from_toml('[domain."\uff17"]\nmax_sockets = 1\n')


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n\n", "[domain]\n"])
def test_empty_policy_is_an_error(tmp_path: Path, text: str) -> None:
    # A truncated file must not silently lift every restriction.
    path = tmp_path / "truncated.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=r"no \[default\] or \[domain.X\] section"):
        Policy.from_file(path)


def test_empty_default_section_allows_everything() -> None:
    policy = Policy.from_toml("[default]\n")
    assert policy.connect_allowed(3, "8.8.8.8", 53)
    assert policy.bind_allowed(3, "0.0.0.0", 0)
    assert policy.max_sockets(3) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read policy: No such file or directory$"),
        (b"[default\n", "not valid TOML"),
        (b"[domain.caf\xe9]\n", "not UTF-8"),
        (b"[default]\nmax_sockets = 'x'", r"\[default\]: max_sockets must be"),
        # tomllib lets int()'s ValueError out for a number this long: a
        # traceback, and serve's exit status 1, which systemd restarts.
        (b"[default]\nmax_sockets = " + b"9" * 5000, r": not valid TOML: .*5000 digits"),
        # Valid TOML, but a policy file that large is a mistake (and is not read whole).
        (b"[default]\n#" + b"#" * (1 << 20), "larger than 1 MiB, too large for a policy file$"),
    ],
)
def test_bad_file_names_the_file_once(tmp_path: Path, content: bytes | None, message: str) -> None:
    # Once, at the start: the CLI prefixes its option name, not the path again.
    path = tmp_path / "bad.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PolicyError, match=message) as info:
        Policy.from_file(path)
    assert str(info.value).startswith(f"{path}: ")
    assert str(info.value).count("bad.toml") == 1


def test_a_file_that_cannot_be_read_has_its_oserror_as_the_cause(tmp_path: Path) -> None:
    # The read's OSError is the PolicyError's __cause__ (serve tells a
    # shortage, worth a restart, from a bad file by it); the rest have none.
    path = tmp_path / "missing.toml"
    with pytest.raises(PolicyError) as info:
        Policy.from_file(path)
    cause = info.value.__cause__
    assert isinstance(cause, FileNotFoundError) and cause.errno == errno.ENOENT
    path.write_bytes(b"[default\n")
    with pytest.raises(PolicyError) as info:
        Policy.from_file(path)
    assert info.value.__cause__ is None


def test_a_file_of_the_largest_size_is_read(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    head = b"[default]\nmax_sockets = 9\n#"
    path.write_bytes(head + b"#" * ((1 << 20) - len(head) - 1) + b"\n")
    assert path.stat().st_size == 1 << 20
    assert Policy.from_file(path).max_sockets(1) == 9


def test_a_file_starting_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    # Some editors start a UTF-8 file with one.  It is the encoding's
    # signature, not text: tomllib took it for a statement, and the
    # message blamed "line 1, column 1" of a file that looks right.
    path = tmp_path / "policy.toml"
    path.write_bytes(b"\xef\xbb\xbf[default]\nmax_sockets = 4\n")
    assert Policy.from_file(path).max_sockets(1) == 4
    # Only at the start: anywhere else it is a character, and TOML's rules apply.
    path.write_bytes(b"[default]\n\xef\xbb\xbfmax_sockets = 4\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        Policy.from_file(path)


def test_file_is_read_as_utf8_whatever_the_locale(tmp_path: Path) -> None:
    # TOML is UTF-8; in a Latin-1 locale a read in the locale's encoding
    # would turn the domain name into mojibake.  -X warn_default_encoding
    # makes any read in the locale's encoding fail, whatever this host's.
    path = tmp_path / "policy.toml"
    path.write_bytes('[domain."caf\u00e9"]\nmax_sockets = 1\n'.encode())
    code = ("import sys; from pvcalls._policy import Policy; "
            "print(Policy.from_file(sys.argv[1]).max_sockets(3, 'caf\\u00e9'))")
    result = subprocess.run(
        [sys.executable, "-X", "warn_default_encoding", "-W", "error::EncodingWarning",
         "-c", code, str(path)],
        capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "1\n", "")


# -- enforced by the backend ------------------------------------------------------


@pytest.fixture
def strict(host: Any, topology: Any, echo_server: Any) -> Any:
    port = echo_server.address[1]
    policy = Policy.from_toml(f"""
[default]
max_sockets = 3
connect.allow = ["127.0.0.1:{port}"]
bind.allow = ["127.0.0.1:0", "127.0.0.1:1024-65535"]
""")
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology) as backend:
        yield backend


def test_backend_refuses_connect_and_bind(make_frontend: Any, host: Any, strict: Any,
                                          echo_server: Any,
                                          caplog: pytest.LogCaptureFixture) -> None:
    fe = make_frontend("limited")
    sock_id, _ = fe.socket()
    other_port = echo_server.address[1] ^ 1
    with caplog.at_level(logging.WARNING, logger="pvcalls"):
        rsp = fe.response(fe.push_connect(sock_id, ("127.0.0.1", other_port), fe.new_ring()))
        assert rsp.ret == -EACCES
        assert fe.bind(sock_id, ("127.0.0.1", 80)).ret == -EACCES
        assert fe.bind(sock_id, ("0.0.0.0", 5000)).ret == -EACCES
    messages = [r.getMessage() for r in caplog.records]
    assert any("CONNECT" in m and f"127.0.0.1:{other_port}" in m and "refused" in m
               for m in messages)
    assert any("BIND" in m and "127.0.0.1:80" in m for m in messages)
    # What is allowed still works on the same socket.
    ring = fe.new_ring()
    assert fe.response(fe.push_connect(sock_id, echo_server.address, ring)).ret == 0
    fe.echo(ring, b"ok")
    fe.close()


@pytest.mark.parametrize("command", ["BIND", "CONNECT"])
def test_refusals_are_logged_at_most_ten_per_interval_for_each_frontend(
        make_frontend: Any, host: Any, strict: Any, caplog: pytest.LogCaptureFixture,
        command: str) -> None:
    """A guest sending refused requests without pause gets 10 log lines per
    interval, the rest counted and the count logged as it goes; another
    guest's refusals are still logged meanwhile."""
    caplog.set_level(logging.WARNING, logger="pvcalls")
    flooder, bystander = make_frontend("flooder"), make_frontend("bystander")
    # One interval for the whole test, however slow the machine.
    be_flooder = strict._frontends[(flooder.guest.domid, 0)]
    be_flooder.ratelimit = be_flooder.dev.ratelimit = RateLimit(
        f"dom{flooder.guest.domid}", clock=lambda: 0.0)

    def refusing(fe: RawFrontend) -> Callable[[tuple[str, int]], int]:
        sock_id, _ = fe.socket()
        ring = fe.new_ring()  # never mapped: the policy refuses first

        def refused(address: tuple[str, int]) -> int:
            if command == "BIND":
                return int(fe.bind(sock_id, address).ret)
            return int(fe.response(fe.push_connect(sock_id, address, ring)).ret)
        return refused

    flood = refusing(flooder)
    for _ in range(25):
        assert flood(("127.0.0.1", 80)) == -EACCES
    assert refusing(bystander)(("127.0.0.1", 81)) == -EACCES

    def lines(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    assert len(lines(f"dom{flooder.guest.domid}: {command}")) == 10
    assert len(lines(f"dom{bystander.guest.domid}: {command}")) == 1
    assert lines("suppressed") == []
    # The count waits for the next interval, or for the device to go (not
    # for a mere restart, which a guest can repeat at will).
    flooder.close()
    assert lines("suppressed") == []
    assert host.toolstack.remove_device(flooder.device)
    wait_until(lambda: bool(lines("suppressed")))
    assert lines("suppressed") == [f"dom{flooder.guest.domid}: 15 messages suppressed"]


def test_socket_limit_refusals_are_rate_limited_too(
        make_frontend: Any, host: Any, strict: Any, caplog: pytest.LogCaptureFixture) -> None:
    """SOCKETs beyond max_sockets are logged through the frontend's rate
    limit as well: a guest asking without pause gets 10 lines."""
    caplog.set_level(logging.WARNING, logger="pvcalls")
    flooder = make_frontend("flooder")
    be_flooder = strict._frontends[(flooder.guest.domid, 0)]
    be_flooder.ratelimit = be_flooder.dev.ratelimit = RateLimit(
        f"dom{flooder.guest.domid}", clock=lambda: 0.0)
    for _ in range(3):
        assert flooder.socket()[1].ret == 0
    for _ in range(25):
        assert flooder.socket()[1].ret == -EMFILE
    refusals = [r for r in caplog.records if "socket limit 3 reached" in r.getMessage()]
    assert len(refusals) == 10
    flooder.close()


def test_connect_to_any_address_is_checked_as_loopback(
        make_frontend: Any, host: Any, topology: Any, echo_server: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """Linux connects a destination of 0.0.0.0 to the loopback address: a
    deny rule for 127.0.0.0/8 must cover it too, and the refusal says so."""
    policy = Policy.from_toml('[default]\nconnect.deny = ["127.0.0.0/8"]\n')
    caplog.set_level(logging.WARNING, logger="pvcalls")
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology):
        fe = make_frontend("no-loopback")
        sock_id, _ = fe.socket()
        port = echo_server.address[1]
        rsp = fe.response(fe.push_connect(sock_id, ("0.0.0.0", port), fe.new_ring()))
        assert rsp.ret == -EACCES
        assert echo_server.accepted == 0
        assert any(f"CONNECT {sock_id:#x} to 127.0.0.1:{port} refused" in r.getMessage()
                   for r in caplog.records)
        fe.close()
    assert not policy.connect_allowed(1, "0.0.0.0", echo_server.address[1])


def test_backend_applies_name_sections(make_frontend: Any, host: Any, topology: Any) -> None:
    policy = Policy.from_toml('[domain.tiny]\nmax_sockets = 1\n')
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology):
        tiny = make_frontend("tiny")
        other = make_frontend("other")
        assert tiny.socket()[1].ret == 0
        assert tiny.socket()[1].ret == -EMFILE
        assert other.socket()[1].ret == 0
        assert other.socket()[1].ret == 0
        tiny.close()
        other.close()


def test_policy_says_which_domains_rules_depend_on_their_name() -> None:
    policy = Policy.from_toml("[domain.web]\nmax_sockets = 2\n[domain.5]\nmax_sockets = 5\n")
    assert policy.needs_name(3)
    assert not policy.needs_name(5)  # its domid section wins whatever its name
    assert not Policy.from_toml("[domain.5]\nmax_sockets = 5\n").needs_name(3)
    assert not Policy().needs_name(3)


def test_a_backend_that_cannot_read_a_name_does_not_guess_its_rules(
        host: Any, dom0_xs: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A driver domain may not read other domains' homes, ``name``
    included.  Where a name section could apply, the domain's device is
    refused, saying why, rather than served by [default]'s rules: a name
    section may be the stricter one."""
    policy = Policy.from_toml("[default]\n[domain.tiny]\nmax_sockets = 1\n[domain.2]\n")
    driver = host.create_domain("driver")  # domid 1
    tiny = host.create_domain("tiny")  # 2: its domid section needs no name
    other = host.create_domain("tiny2")
    with pvcalls.Backend(driver, policy=policy, cpus=1):
        served = RawFrontend(host, tiny, backend_id=driver.domid)
        assert served.socket()[1].ret == 0
        refused = RawFrontend(host, other, backend_id=driver.domid, connect=False)
        refused.connect(wait=False)
        refused.wait_backend_state(5)
        error = dom0_xs.read(
            f"/local/domain/{driver.domid}/error/backend/pvcalls/{other.domid}/0/error")
        assert error == (f"{errno.EACCES} connecting: the policy needs the domain's name, "
                         "which cannot be read: Permission denied")
        assert any(f"dom{other.domid}" in r.getMessage() and "name" in r.getMessage()
                   and r.levelno == logging.ERROR for r in caplog.records)
        served.close()
    with pvcalls.Backend(driver, policy=Policy.from_toml("[domain.7]\n"), cpus=1):
        # Without name sections, no name is needed.
        fe = RawFrontend(host, host.create_domain("plain"), backend_id=driver.domid)
        assert fe.socket()[1].ret == 0
        fe.close()


def test_a_name_that_cannot_be_read_is_said_through_the_device_s_rate_limit(
        caplog: pytest.LogCaptureFixture) -> None:
    """The guest may restart its device at will, each refused for the name
    that cannot be read: its lines share the device's budget."""
    def read(path: str) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    dev = SimpleNamespace(frontend_id=3, xenstore=SimpleNamespace(read=read),
                          ratelimit=RateLimit("dom3", clock=lambda: 0.0))
    policy = Policy.from_toml("[domain.tiny]\nmax_sockets = 1\n")
    for _ in range(25):
        with pytest.raises(PermissionError, match="the policy needs the domain's name"):
            _backend._domain_name(dev, policy)  # type: ignore[arg-type]
    said = [r for r in caplog.records if "name cannot be read" in r.getMessage()]
    assert len(said) == 10


def test_a_domain_with_two_devices_has_one_socket_limit(host: Any, topology: Any) -> None:
    """max_sockets is the domain's, not each of its pvcalls devices'."""
    policy = Policy.from_toml('[domain.two]\nmax_sockets = 3\n')
    guest = host.create_domain("two")
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology) as backend:
        first = RawFrontend(host, guest, devid=0)
        second = RawFrontend(host, guest, devid=1)
        assert first.socket()[1].ret == 0
        listener, _ = second.listening(backend)
        assert first.socket()[1].ret == 0
        assert first.socket()[1].ret == -EMFILE
        assert second.socket()[1].ret == -EMFILE
        # ACCEPT's id_new counts too, and is refused before its ring is mapped.
        accept = second.response(second.push_accept(listener, 0x5000, second.new_ring()))
        assert accept.ret == -EMFILE
        first.close()
        assert second.socket()[1].ret == 0  # the first device's sockets went
        second.close()


@contextlib.contextmanager
def _accept_paused_at(host: Any, topology: Any, monkeypatch: pytest.MonkeyPatch,
                      where: str) -> Iterator[tuple[RawFrontend, RawFrontend, int, int, PauseAt]]:
    """A domain of two sockets at most, with two devices: the first one's
    ACCEPT on its listener stands at ``where`` in the backend's handler.
    Yields both frontends, the listener's id, the ACCEPT's req_id and the
    pause; the frontends are closed afterwards."""
    policy = Policy.from_toml('[domain.two]\nmax_sockets = 2\n')
    guest = host.create_domain("two")
    real_accept = _backend._HANDLERS[pvcalls._wire.PVCALLS_ACCEPT]
    pause = PauseAt(real_accept, where)

    def paused_accept(fe: Any, request: Any, req: Any) -> int | None:
        return pause.run(lambda: real_accept(fe, request, req))

    monkeypatch.setitem(_backend._HANDLERS, pvcalls._wire.PVCALLS_ACCEPT, paused_accept)
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology) as backend:
        first = RawFrontend(host, guest, devid=0)
        second = RawFrontend(host, guest, devid=1)
        listener, _ = first.listening(backend)
        accept = first.push_accept(listener, first.new_id(), first.new_ring())
        assert pause.reached.wait(10)
        yield first, second, listener, accept, pause
        first.close()
        second.close()


def test_an_accept_taking_its_socket_is_counted_by_the_other_device(
        host: Any, topology: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ACCEPT's id_new moves from the reserved count into the sockets
    table in one step for the domain's other devices: one device's SOCKET
    checked in between would find the domain a socket short of its limit."""
    with _accept_paused_at(host, topology, monkeypatch, "self._sockets[id_new] = new") as (
            first, second, listener, accept, between):

        def fill(req: Any) -> None:
            req.u.socket.id = second.new_id()
            req.u.socket.domain = pvcalls._wire.AF_INET
            req.u.socket.type = pvcalls._wire.SOCK_STREAM

        def waits_for_the_limit_lock() -> bool:
            return any(stands_at(tid, _backend._Frontend._socket,
                                 "with self._lock, self.backend.limit_lock")
                       for tid in sys._current_frames())

        req_id = second.push(pvcalls._wire.PVCALLS_SOCKET, fill)
        try:
            # Counted in the window, the domain is a socket short and the
            # SOCKET is answered at once; counted under the lock, it waits
            # for the ACCEPT's socket to be in the table.
            second.wait(lambda: req_id in second.responses or waits_for_the_limit_lock())
        finally:
            between.resume()
        # The listener and the ACCEPT's socket: the domain is at its limit.
        assert second.response(req_id).ret == -EMFILE
        assert second.socket()[1].ret == -EMFILE
        assert first.release(listener).ret == 0
        assert first.response(accept).ret < 0  # -EINTR: its listener went


def test_an_accept_mapping_its_ring_is_counted_by_the_other_device(
        host: Any, topology: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """While an ACCEPT maps its id_new's ring (outside every lock), its
    socket is reserved: the domain's other device finds the domain at its
    limit then, not a socket short."""
    with _accept_paused_at(host, topology, monkeypatch, "new.attach_ring(") as (
            first, second, listener, accept, mapping):
        try:
            # No lock is held there: the SOCKET is answered at once.
            assert second.socket()[1].ret == -EMFILE
        finally:
            mapping.resume()
        assert first.release(listener).ret == 0
        assert first.response(accept).ret < 0  # -EINTR: its listener went
        assert second.socket()[1].ret == 0  # both sockets went


def test_an_accept_that_fails_to_map_its_ring_gives_its_reservation_back(
        host: Any, topology: Any) -> None:
    """An ACCEPT counted against the limit from its check on, and refused
    because its ring cannot be mapped, leaves the domain's count as it was."""
    policy = Policy.from_toml("[default]\nmax_sockets = 2\n")
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology) as backend:
        fe = RawFrontend(host, host.create_domain("one"))
        listener, _ = fe.listening(backend)
        bad = fe.new_ring(refs=[0xFFFFFF])  # no such grant
        assert fe.response(fe.push_accept(listener, fe.new_id(), bad)).ret == -22
        assert fe.socket()[1].ret == 0  # the second of two
        assert fe.socket()[1].ret == -EMFILE
        fe.close()


def test_an_accepted_socket_counts_once(host: Any, topology: Any) -> None:
    """The reservation of an ACCEPT ends as its socket enters the table:
    once that socket is released, the domain's count is back to where it
    was, for every further SOCKET."""
    policy = Policy.from_toml("[default]\nmax_sockets = 2\n")
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology) as backend:
        fe = RawFrontend(host, host.create_domain("one"))
        listener, address = fe.listening(backend)
        id_new = fe.new_id()
        req_id = fe.push_accept(listener, id_new, fe.new_ring())
        with socket.create_connection(address, timeout=TIMEOUT):
            assert fe.response(req_id).ret == 0
        assert backend.domain_sockets(fe.guest.domid) == 2
        assert fe.release(id_new).ret == 0
        assert backend.domain_sockets(fe.guest.domid) == 1
        assert fe.socket()[1].ret == 0  # the second of two again
        assert fe.socket()[1].ret == -EMFILE
        fe.close()


def test_a_socket_limit_of_0_allows_no_socket(make_frontend: Any, host: Any,
                                              topology: Any) -> None:
    policy = Policy.from_toml("[default]\nmax_sockets = 0\n")
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology):
        fe = make_frontend("none")
        assert fe.socket()[1].ret == -EMFILE
        fe.close()


def test_the_socket_limit_counts_the_domain_s_own_sockets_only(host: Any, topology: Any) -> None:
    """max_sockets counts the sockets of the domain asking only."""
    policy = Policy.from_toml("[default]\nmax_sockets = 1\n")
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology):
        one = RawFrontend(host, host.create_domain("one"))
        other = RawFrontend(host, host.create_domain("other"))
        assert one.socket()[1].ret == 0
        assert other.socket()[1].ret == 0
        assert one.socket()[1].ret == -EMFILE
        one.close()
        other.close()


def test_backend_enforces_socket_limit(make_frontend: Any, host: Any, strict: Any,
                                       caplog: pytest.LogCaptureFixture) -> None:
    fe = make_frontend("limited")
    ids = [fe.socket()[0] for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="pvcalls"):
        _, rsp = fe.socket()
    assert rsp.ret == -EMFILE
    assert any("limit" in r.getMessage() for r in caplog.records)
    # ACCEPT's id_new counts too.
    assert fe.bind(ids[0], ("127.0.0.1", 0)).ret == 0
    assert fe.listen(ids[0]).ret == 0
    assert fe.response(fe.push_accept(ids[0], fe.new_id(), fe.new_ring())).ret == -EMFILE
    # Releasing one makes room again.
    assert fe.release(ids[1]).ret == 0
    _, rsp = fe.socket()
    assert rsp.ret == 0
    fe.close()


# -- building a policy in Python --------------------------------------------------

_DP = pvcalls.DomainPolicy()
_NET = __import__("ipaddress").IPv4Network("10.0.0.0/8")


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        # Wrong parts used to be taken, and to fail only when a guest
        # connected (an AttributeError in its handshake, -EIO for its
        # commands), or never: a domid spelt as a string matched no domain,
        # which then got the default rules instead of its own.
        (lambda: Policy(default="x"), TypeError,
         r"^default must be a pvcalls.DomainPolicy or None, not str$"),
        (lambda: Policy(domains={"7": _DP}), TypeError,
         r"^domains: key '7' is not a domid \(an int\)"),
        (lambda: Policy(domains={True: _DP}), TypeError, r"^domains: key True is not a domid"),
        (lambda: Policy(domains={32752: _DP}), ValueError,
         r"^domains: domid 32752 is not within 0-32751$"),
        (lambda: Policy(domains={7: "x"}), TypeError,
         r"^domains\[7\] must be a pvcalls.DomainPolicy, not str$"),
        (lambda: Policy(domains=[(7, _DP)]), TypeError, r"^domains must be a mapping, not list$"),
        (lambda: Policy(names={7: _DP}), TypeError, r"^names: key 7 is not a domain name"),
        (lambda: Policy(names={"": _DP}), ValueError, r"^names: '' is not a domain name"),
        (lambda: Policy(names={"web": None}), TypeError,
         r"^names\['web'\] must be a pvcalls.DomainPolicy, not NoneType$"),
        (lambda: pvcalls.DomainPolicy(max_sockets=-1), ValueError,
         r"^max_sockets must be at least 0 \(or None: no limit\), got -1$"),
        (lambda: pvcalls.DomainPolicy(max_sockets="5"), TypeError,
         r"^max_sockets must be an int or None, not str$"),
        (lambda: pvcalls.DomainPolicy(max_sockets=True), TypeError,
         r"^max_sockets must be an int or None, not bool$"),
        (lambda: pvcalls.DomainPolicy(connect="x"), TypeError,
         r"^connect must be a pvcalls.AccessList, not str$"),
        (lambda: pvcalls.DomainPolicy(bind=None), TypeError,
         r"^bind must be a pvcalls.AccessList, not NoneType$"),
        (lambda: pvcalls.AccessList(allow=["10.0.0.0/8"]), TypeError,
         r"^allow: '10.0.0.0/8' is not a pvcalls.Rule \(Rule.parse\(\) makes one\)$"),
        (lambda: pvcalls.AccessList(deny=Rule.parse("10.0.0.0/8")), TypeError,
         r"^deny must be a sequence of pvcalls.Rule, not Rule$"),
        (lambda: pvcalls.AccessList(deny="10.0.0.0/8"), TypeError,
         r"^deny must be a sequence of pvcalls.Rule, not str$"),
        (lambda: Rule(network="10.0.0.0/8"), TypeError,
         r"^network must be an ipaddress.IPv4Network, not str \(Rule.parse\(\) takes text\)$"),
        (lambda: Rule(_NET, ports=range(0, 70000)), ValueError,
         r"^ports must be a range within 0-65535, got range\(0, 70000\)$"),
        # One past the last port: range(0, 65536) is every port, 65537 is not.
        (lambda: Rule(_NET, ports=range(65535, 65537)), ValueError,
         r"^ports must be a range within 0-65535, got range\(65535, 65537\)$"),
        (lambda: Rule(_NET, ports=range(80, 80)), ValueError,
         r"^ports must be a range within 0-65535, got range\(80, 80\)$"),
        (lambda: Rule(_NET, ports=range(0, 100, 2)), ValueError,
         r"^ports must be a range of step 1, got range\(0, 100, 2\)$"),
        (lambda: Rule(_NET, ports=[80]), TypeError, r"^ports must be a range, not list$"),
        # from_dict() takes parsed TOML, whose keys are strings: a domid
        # given as an int failed with an AttributeError, other keys in a
        # str.join() deep inside.
        (lambda: Policy.from_dict({"domain": {7: {"max_sockets": 1}}}), TypeError,
         r"^\[domain\]: key 7 is not a string \(TOML keys are; a domid too: '7'\)$"),
        (lambda: Policy.from_dict({"default": {}, 5: {}}), TypeError,
         r"^policy data: key 5 is not a string"),
        (lambda: Policy.from_dict({"default": {"max_sockets": 1, 3: 4}}), TypeError,
         r"^\[default\]: key 3 is not a string"),
        (lambda: Policy.from_dict({"domain": {"web": {None: 1}}}), TypeError,
         r"^\[domain.web\]: key None is not a string"),
        (lambda: Policy.from_dict({"default": {"connect": {1: []}}}), TypeError,
         r"^\[default\] connect: key 1 is not a string"),
    ],
)
def test_a_policy_built_in_python_is_checked_as_it_is_built(
        make: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def test_a_policy_built_in_python_keeps_no_reference_to_what_it_was_given() -> None:
    """Immutable, as the documentation says: a list of rules or a dict of
    domains changed afterwards does not change the policy."""
    rules = [Rule.parse("10.0.0.0/8")]
    access = pvcalls.AccessList(allow=rules)
    assert access.allow == (Rule.parse("10.0.0.0/8"),)
    rules.append(Rule.parse("192.0.2.0/24"))
    assert not access.permits("192.0.2.1", 80)
    hash(access)  # frozen and hashable, as a parsed one
    domains = {7: pvcalls.DomainPolicy(max_sockets=1)}
    policy = Policy(domains=domains)
    domains[7] = pvcalls.DomainPolicy(max_sockets=2)
    assert policy.max_sockets(7) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # A string used to be taken for its letters ("unknown top-level
        # key(s): a, d, e, ..."), a list or None failed inside.
        (lambda: Policy.from_dict("default"),
         r"^policy data must be a mapping \(parsed TOML\), not str$"),
        (lambda: Policy.from_dict([]),
         r"^policy data must be a mapping \(parsed TOML\), not list$"),
        (lambda: Policy.from_dict(None), r"^policy data must be a mapping"),
        # bytes used to get tomllib's "a bytes-like object is required,
        # not 'str'", the other way round.
        (lambda: Policy.from_toml(b"[default]"),
         r"^policy text must be a str, not bytes \(decode it, or use Policy.from_file\(\)\)$"),
        (lambda: Policy.from_toml(None), r"^policy text must be a str, not NoneType$"),
        # os.fspath()'s "expected str, bytes or os.PathLike object, not int"
        # named no argument.
        (lambda: Policy.from_file(3), r"^policy path must be a str or an os.PathLike, not int$"),
        (lambda: Policy.from_file(None),
         r"^policy path must be a str or an os.PathLike, not NoneType$"),
    ],
)
def test_policy_text_or_data_of_the_wrong_type_is_a_clear_error(make: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        make()


def test_an_accepted_connection_is_not_checked_against_connect_rules(
        host: Any, topology: Any) -> None:
    """connect rules are the guest's own CONNECTs: a peer reaching its
    listener is let in whatever they say (the host firewall's choice), and
    the accepted socket counts against max_sockets."""
    policy = Policy.from_toml('[default]\nmax_sockets = 2\nconnect.deny = ["0.0.0.0/0"]\n')
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology) as backend:
        fe = RawFrontend(host, host.create_domain("server"))
        listener, rsp = fe.socket()
        assert rsp.ret == 0
        assert fe.bind(listener, ("127.0.0.1", 0)).ret == 0
        assert fe.listen(listener).ret == 0
        row, = backend.stats().sockets
        assert row.address is not None
        accept = fe.push_accept(listener, fe.new_id(), fe.new_ring())
        with socket.create_connection(row.address, timeout=TIMEOUT):
            assert fe.response(accept).ret == 0
            assert fe.socket()[1].ret == -EMFILE
        fe.close()
