"""XenStore operations, one by one, over the wire (xs_wire.h semantics)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import itertools
import logging
import logging.handlers
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fdcensus import descriptors, open_sockets
from hosthelpers import (
    SIM_CODE,
    cut_short_in_its_join,
    error_of,
    eventually,
    make_guest,
    records_made,
    refused_as_not_running,
)
from stolensignal import (
    OUTLASTS_THE_TEST,
    Interrupted,
    interrupted_as_call_returns,
    interrupted_as_frame_starts,
    interrupted_at,
    main_thread_in,
    main_thread_within,
)

from xenback.sim import SimHost
from xenback.sim._xenstored import Op, Quota, RawClient, XenStored, XsError, _ops, _server
from xenback.sim._xenstored._wire import ABS_PATH_MAX, ERRORS, PAYLOAD_MAX, REL_PATH_MAX


@pytest.fixture
def guest(xsd: XenStored, dom0: RawClient) -> Iterator[RawClient]:
    """Here a guest is domain 1's wire connection to the bare ``xsd``
    (conftest's ``guest`` is a domain of a whole SimHost)."""
    with make_guest(xsd, dom0, 1) as c:
        yield c


# --- basic reads and writes ----------------------------------------------------


def test_write_read_and_parents_created_empty(dom0: RawClient) -> None:
    dom0.write("/a/b/c", b"v\0with nul")
    assert dom0.read("/a/b/c") == b"v\0with nul"
    assert dom0.read("/a/b") == b""
    assert dom0.directory("/a") == ["b"]
    assert "a" in dom0.directory("/")


def test_write_replaces_value(dom0: RawClient) -> None:
    dom0.write("/x", "1")
    dom0.write("/x", "")
    assert dom0.read("/x") == b""


def test_read_missing_is_enoent(dom0: RawClient) -> None:
    assert error_of(dom0.read, "/nope") == "ENOENT"
    assert error_of(dom0.directory, "/nope") == "ENOENT"


def test_mkdir_leaves_existing_node(dom0: RawClient) -> None:
    dom0.write("/m", "keep")
    dom0.mkdir("/m")
    assert dom0.read("/m") == b"keep"
    dom0.mkdir("/m/n/o")
    assert dom0.directory("/m/n") == ["o"]


def test_directory_lists_in_creation_order(dom0: RawClient) -> None:
    for name in ["z", "a", "m"]:
        dom0.write(f"/d/{name}", "")
    assert dom0.directory("/d") == ["z", "a", "m"]
    dom0.rm("/d/a")
    assert dom0.directory("/d") == ["z", "m"]
    assert dom0.directory("/d/z") == []


def test_rm_rules(dom0: RawClient) -> None:
    dom0.write("/r/a/b", "1")
    dom0.rm("/r/a")
    assert error_of(dom0.read, "/r/a/b") == "ENOENT"
    assert dom0.directory("/r") == []
    dom0.rm("/r/missing")  # parent exists: fine
    assert error_of(dom0.rm, "/r/missing/deeper") == "ENOENT"
    assert error_of(dom0.rm, "/") == "EINVAL"


def test_relative_paths_resolve_under_the_domain_home(dom0: RawClient, guest: RawClient) -> None:
    dom0.write("rel/x", "0")
    assert dom0.read("/local/domain/0/rel/x") == b"0"
    guest.write("data/y", "1")
    assert dom0.read("/local/domain/1/data/y") == b"1"
    assert guest.read("/local/domain/1/data/y") == b"1"


@pytest.mark.parametrize(
    "path",
    ["", "/a/", "//a", "/a//b", "/a b", "/a\x01", "/ä", "@introduceDomain", "a/"],
)
def test_invalid_paths_are_einval(dom0: RawClient, path: str) -> None:
    payload = path.encode("utf-8") + b"\0"
    for op in (Op.READ, Op.WRITE, Op.MKDIR, Op.RM, Op.DIRECTORY):
        assert error_of(dom0.request, op, payload) == "EINVAL"


def test_allowed_characters(dom0: RawClient) -> None:
    path = "/Az09-_@/x"
    dom0.write(path, "ok")
    assert dom0.read(path) == b"ok"


def test_missing_nuls_are_einval(dom0: RawClient) -> None:
    assert error_of(dom0.request, Op.READ, b"/a") == "EINVAL"
    assert error_of(dom0.request, Op.READ, b"/a\0/b\0") == "EINVAL"
    assert error_of(dom0.request, Op.WRITE, b"/a") == "EINVAL"
    assert error_of(dom0.request, Op.READ, b"") == "EINVAL"
    assert error_of(dom0.request, Op.WATCH, b"/a\0tok") == "EINVAL"
    assert error_of(dom0.request, Op.SET_PERMS, b"/a\0") == "EINVAL"


XS_WIRE_H = Path("/usr/include/xen/io/xs_wire.h")


def xs_wire_h() -> str:
    if not XS_WIRE_H.exists():
        pytest.skip(f"{XS_WIRE_H} not installed (Debian package libxen-dev)")
    return XS_WIRE_H.read_text()


def test_op_numbers_are_those_of_xs_wire_h() -> None:
    body = re.search(r"enum xsd_sockmsg_type\s*\{(.*?)\};", xs_wire_h(), re.S)
    assert body is not None
    # Enumerators count up from 0; one restarts as "XS_SET_TARGET + 2".
    numbers: dict[str, int] = {}
    following = 0
    for name, base, offset in re.findall(
        r"^\s*XS_(\w+)(?:\s*=\s*XS_(\w+)\s*\+\s*(\d+))?\s*,", body[1], re.M
    ):
        if base:
            following = numbers[base] + int(offset)
        numbers[name] = following
        following += 1
    del numbers["TYPE_COUNT"]
    assert {op.name: op.value for op in Op} == numbers


def test_error_names_are_the_xsd_errors_table() -> None:
    table = re.findall(r"XSD_ERROR\((E\w+)\)", xs_wire_h())
    assert table and ERRORS == tuple(table)
    with pytest.raises(ValueError):
        XsError("ENOTDIR")  # a real errno, but not one the wire can carry


def test_limits_are_those_of_xs_wire_h() -> None:
    text = xs_wire_h()
    for name, value in (
        ("XENSTORE_PAYLOAD_MAX", PAYLOAD_MAX),
        ("XENSTORE_ABS_PATH_MAX", ABS_PATH_MAX),
        ("XENSTORE_REL_PATH_MAX", REL_PATH_MAX),
    ):
        assert re.search(rf"#define {name} {value}\b", text), name


@pytest.mark.parametrize("op", [Op.WATCH_EVENT, Op.ERROR, 20, 23, 1000, 0xFFFF])
def test_unknown_ops_are_enosys(dom0: RawClient, op: int) -> None:
    assert error_of(dom0.request, op, b"/\0") == "ENOSYS"
    assert dom0.read("/") == b""  # still in sync


def test_reply_echoes_header(dom0: RawClient) -> None:
    dom0.send(Op.READ, b"/\0", req_id=0xDEADBEEF)
    op, req_id, tx_id, payload = dom0.recv_message()
    assert (op, req_id, tx_id, payload) == (Op.READ, 0xDEADBEEF, 0, b"")
    dom0.send(Op.READ, b"/nope\0", req_id=7)
    assert dom0.recv_message() == (Op.ERROR, 7, 0, b"ENOENT\0")
    # The transaction id too, in replies and in errors.
    tx = dom0.transaction_start()
    dom0.send(Op.READ, b"/\0", tx_id=tx, req_id=8)
    assert dom0.recv_message() == (Op.READ, 8, tx, b"")
    dom0.send(Op.READ, b"/\0", tx_id=tx + 1, req_id=9)
    assert dom0.recv_message() == (Op.ERROR, 9, tx + 1, b"ENOENT\0")


def test_large_values_and_e2big(dom0: RawClient) -> None:
    value = b"v" * 4000
    dom0.write("/big", value)
    assert dom0.read("/big") == value
    # A directory listing longer than a payload cannot be sent in one reply.
    for i in range(300):
        dom0.write(f"/many/child-with-a-long-name-{i:04d}", "")
    assert error_of(dom0.directory, "/many") == "E2BIG"


def test_directory_part_pages_through_children(dom0: RawClient) -> None:
    names = [f"child-with-a-long-name-{i:04d}" for i in range(300)]
    for name in names:
        dom0.write(f"/many/{name}", "")
    assert _children_in_parts(dom0, "/many") == names
    assert error_of(dom0.request, Op.DIRECTORY_PART, b"/many\0") == "EINVAL"
def _children_in_parts(client: RawClient, path: str) -> list[str]:
    """A node's children, paged through with DIRECTORY_PART (as libxenstore does)."""
    got: list[str] = []
    offset = 0
    generation = None
    while True:
        payload = client.request(Op.DIRECTORY_PART, f"{path}\0{offset}\0".encode())
        assert len(payload) <= PAYLOAD_MAX
        gen, _, rest = payload.partition(b"\0")
        assert generation in (None, gen)
        generation = gen
        if rest == b"\0":
            return got
        done = rest.endswith(b"\0\0")
        part = rest[:-1] if done else rest
        got.extend(c.decode() for c in part.split(b"\0")[:-1])
        offset += len(part)
        if done:
            return got


def test_numbers_are_read_as_atoi_reads_them(xsd: XenStored, dom0: RawClient) -> None:
    # cxenstored reads DIRECTORY_PART's offset and INTRODUCE's port with
    # atoi(): leading digits count, whatever follows them.
    dom0.write("/ai/a", "")
    dom0.write("/ai/bb", "")
    gen = dom0.request(Op.DIRECTORY_PART, b"/ai\0" b"0\0").partition(b"\0")[0]
    for offset, rest in ((b"2junk", b"bb\0\0"), (b"1_0", b"\0bb\0\0"), (b" +2", b"bb\0\0"),
                         (b"junk", b"a\0bb\0\0"), (b"-1", b"\0")):
        payload = dom0.request(Op.DIRECTORY_PART, b"/ai\0" + offset + b"\0")
        assert payload == gen + b"\0" + rest, offset
    assert dom0.request(Op.INTRODUCE, b"5\0" b"1234\0" b"7x\0") == b"OK\0"
    assert xsd.is_introduced(5)


def test_directory_part_of_a_list_that_would_fill_a_reply_exactly(dom0: RawClient) -> None:
    # The end-of-list marker needs a byte of its own: children that fill
    # the rest of a reply to its last byte come in two parts, not as E2BIG.
    names = [f"{i:02d}" + "x" * 97 for i in range(40)]  # 100 bytes each
    for name in names:
        dom0.write(f"/full/{name}", "")
    last = "y"
    while True:
        dom0.write(f"/full/{last}", "")
        # A past-the-end offset answers with the generation alone.
        gen = dom0.request(Op.DIRECTORY_PART, b"/full\0" b"100000\0")
        listed = sum(len(n) + 1 for n in names) + len(last) + 1
        if listed == PAYLOAD_MAX - (len(gen) - 1):
            break
        dom0.rm(f"/full/{last}")
        last = "y" * (len(last) + PAYLOAD_MAX - (len(gen) - 1) - listed)
    assert _children_in_parts(dom0, "/full") == [*names, last]


def test_directory_part_generation_changes_with_children(dom0: RawClient) -> None:
    dom0.write("/g/a", "")
    first = dom0.request(Op.DIRECTORY_PART, b"/g\0" b"0\0")
    assert first.split(b"\0")[1:] == [b"a", b"", b""]
    dom0.write("/g/b", "")
    second = dom0.request(Op.DIRECTORY_PART, b"/g\0" b"0\0")
    assert int(second.split(b"\0")[0]) > int(first.split(b"\0")[0])
    dom0.write("/g/a", "value only")  # not a change of /g
    third = dom0.request(Op.DIRECTORY_PART, b"/g\0" b"0\0")
    assert third.split(b"\0")[0] == second.split(b"\0")[0]
    # The offset is read as atoi() reads it; before the start is past the end.
    assert dom0.request(Op.DIRECTORY_PART, b"/g\0" b"x\0") == third
    gen = third.split(b"\0")[0]
    assert dom0.request(Op.DIRECTORY_PART, b"/g\0" b"-2\0") == gen + b"\0\0"
    # inside a transaction too
    tx = dom0.transaction_start()
    in_tx = dom0.request(Op.DIRECTORY_PART, b"/g\0" b"0\0", tx)
    assert in_tx == third
    dom0.write("/g/c", "", tx)
    changed = dom0.request(Op.DIRECTORY_PART, b"/g\0" b"0\0", tx)
    assert changed.split(b"\0")[0] != in_tx.split(b"\0")[0]
    assert changed.split(b"\0")[1:] == [b"a", b"b", b"c", b"", b""]
    dom0.transaction_end(tx, commit=False)


# --- permissions ------------------------------------------------------------------


def test_get_set_perms(dom0: RawClient) -> None:
    dom0.write("/p", "")
    assert dom0.get_perms("/p") == ["n0"]
    dom0.set_perms("/p", ["b3", "r5", "w7", "n9"])
    assert dom0.get_perms("/p") == ["b3", "r5", "w7", "n9"]
    for bad in (["x1"], ["r"], ["r-1"], ["r70000"], ["r1x"]):
        assert error_of(dom0.set_perms, "/p", bad) == "EINVAL"
    assert error_of(dom0.set_perms, "/missing", ["n0"]) == "ENOENT"


def test_perms_read_domids_as_strtol_does(dom0: RawClient) -> None:
    # cxenstored reads the domid of a permission with strtol(p, &end, 0):
    # a leading 0 means octal, 0x hexadecimal.  Granting domain 10 where
    # Xen grants domain 8 would hide a client's bug.
    dom0.write("/p", "")
    dom0.set_perms("/p", ["b0", "r010", "w0x1f", "n 7", "r+3"])
    assert dom0.get_perms("/p") == ["b0", "r8", "w31", "n7", "r3"]
    for bad in (["r08"], ["r0x"], ["r0x1g"], ["r7 "], ["r0x10000"]):
        assert error_of(dom0.set_perms, "/p", bad) == "EINVAL"


def test_a_missing_special_path_is_hidden_as_the_root_hides_it(
    dom0: RawClient, guest: RawClient
) -> None:
    # cxenstored looks up "@foo" as a node whose parent is "/": a guest that
    # may not read the root learns nothing of which special paths exist.
    assert error_of(dom0.get_perms, "@foo") == "ENOENT"
    assert error_of(guest.get_perms, "@foo") == "EACCES"
    assert error_of(guest.set_perms, "@foo", ["n1"]) == "EACCES"
    dom0.set_perms("/", ["n0", "r1"])
    assert error_of(guest.get_perms, "@foo") == "ENOENT"
    # Reading the root is not writing it.
    assert error_of(guest.set_perms, "@foo", ["n1"]) == "EACCES"
    dom0.set_perms("/", ["n0", "b1"])
    assert error_of(guest.set_perms, "@foo", ["n1"]) == "ENOENT"


def test_children_inherit_permissions(dom0: RawClient, guest: RawClient) -> None:
    dom0.write("/inh", "")
    dom0.set_perms("/inh", ["r0", "w4"])
    dom0.write("/inh/a/b", "")
    assert dom0.get_perms("/inh/a/b") == ["r0", "w4"]
    # An unprivileged creator owns what it creates, keeping the rest.
    guest.write("data", "")
    assert dom0.get_perms("/local/domain/1/data") == ["n1", "r0"]


def test_unprivileged_access_rules(xsd: XenStored, dom0: RawClient, guest: RawClient) -> None:
    dom0.write("/secret/x", "s")
    assert error_of(guest.read, "/secret/x") == "EACCES"
    assert error_of(guest.write, "/secret/x", "t") == "EACCES"
    assert error_of(guest.directory, "/secret") == "EACCES"
    # ENOENT becomes EACCES where the parent is not readable either.
    assert error_of(guest.read, "/secret/missing") == "EACCES"
    assert error_of(guest.read, "/missing/deep") == "EACCES"
    dom0.set_perms("/secret", ["n0", "r1"])
    assert error_of(guest.read, "/secret/missing") == "ENOENT"
    assert error_of(guest.read, "/secret/x") == "EACCES"  # x keeps n0
    assert guest.directory("/secret") == ["x"]  # reading is enough to list
    # Readable is not writable: nothing can be made, removed or changed below.
    assert error_of(guest.write, "/secret/new", "") == "EACCES"
    assert error_of(guest.mkdir, "/secret/new") == "EACCES"
    assert error_of(guest.rm, "/secret/missing") == "EACCES"
    assert error_of(guest.set_perms, "/secret/missing", ["n1"]) == "EACCES"
    assert dom0.directory("/secret") == ["x"]
    dom0.set_perms("/secret/x", ["n0", "r1"])
    assert guest.read("/secret/x") == b"s"
    assert guest.get_perms("/secret/x") == ["n0", "r1"]  # reading is enough
    assert error_of(guest.write, "/secret/x", "t") == "EACCES"
    dom0.set_perms("/secret/x", ["w0"])  # default for everybody: write only
    guest.write("/secret/x", "t")
    assert error_of(guest.read, "/secret/x") == "EACCES"
    # Its own home: full access as owner.
    guest.write("/local/domain/1/mine", "m")
    assert guest.read("mine") == b"m"
    assert guest.get_perms("mine") == ["n1", "r0"]


def test_owner_can_set_perms_but_not_give_away(dom0: RawClient, guest: RawClient) -> None:
    guest.write("own", "")
    guest.set_perms("own", ["n1", "r2"])
    assert guest.get_perms("own") == ["n1", "r2"]
    assert error_of(guest.set_perms, "own", ["n2"]) == "EPERM"
    dom0.write("/local/domain/1/dom0s", "")
    dom0.set_perms("/local/domain/1/dom0s", ["n0", "b1"])
    assert error_of(guest.set_perms, "dom0s", ["n0", "b1"]) == "EACCES"


def test_set_target_acts_for_the_target(xsd: XenStored, dom0: RawClient) -> None:
    with make_guest(xsd, dom0, 2) as guest2, make_guest(xsd, dom0, 3) as stubdom:
        guest2.write("devmodel", "x")
        assert error_of(stubdom.read, "/local/domain/2/devmodel") == "EACCES"
        dom0.request(Op.SET_TARGET, b"3\0" b"2\0")
        assert stubdom.read("/local/domain/2/devmodel") == b"x"
        # Acting for its target also where an ACL entry names the target.
        dom0.write("/shared-with-2", "y")
        dom0.set_perms("/shared-with-2", ["n0", "r2"])
        assert stubdom.read("/shared-with-2") == b"y"
        # It may also set the permissions of its target's nodes (as the
        # owner: cxenstored's perm_for_conn() grants it XS_PERM_OWNER), but
        # give them to nobody else.
        stubdom.set_perms("/local/domain/2/devmodel", ["n2", "r5"])
        assert dom0.get_perms("/local/domain/2/devmodel") == ["n2", "r5"]
        assert error_of(stubdom.set_perms, "/local/domain/2/devmodel", ["n3"]) == "EPERM"
        assert error_of(dom0.request, Op.SET_TARGET, b"3\0" b"99\0") == "ENOENT"
        assert error_of(dom0.request, Op.SET_TARGET, b"3\0") == "EINVAL"


def test_a_released_target_is_forgotten(xsd: XenStored, dom0: RawClient) -> None:
    with make_guest(xsd, dom0, 3) as stubdom:
        with make_guest(xsd, dom0, 2):
            dom0.request(Op.SET_TARGET, b"3\0" b"2\0")
        xsd.release_domain(2)
        # A new domain 2 is not the one the device model served.
        with make_guest(xsd, dom0, 2) as reborn:
            reborn.write("secret", "s")
            assert error_of(stubdom.read, "/local/domain/2/secret") == "EACCES"


def test_privileged_ops_are_refused_to_guests(guest: RawClient) -> None:
    for op, payload in [
        (Op.INTRODUCE, b"5\0" b"0\0" b"1\0"),
        (Op.RELEASE, b"1\0"),
        (Op.IS_DOMAIN_INTRODUCED, b"1\0"),
        (Op.RESUME, b"1\0"),
        (Op.SET_TARGET, b"1\0" b"0\0"),
        (Op.CONTROL, b"check\0"),
    ]:
        assert error_of(guest.request, op, payload) == "EACCES"
    assert guest.request(Op.GET_DOMAIN_PATH, b"7\0") == b"/local/domain/7\0"


def test_missing_node_below_an_unreadable_one_is_eacces(dom0: RawClient, guest: RawClient) -> None:
    # The nearest existing ancestor decides, not any readable one above it:
    # /open is readable, but /open/closed is not, so what is (not) below
    # /open/closed is none of the guest's business.
    dom0.write("/open/closed", "")
    dom0.set_perms("/open", ["r0"])
    dom0.set_perms("/open/closed", ["n0"])
    assert error_of(guest.read, "/open/missing") == "ENOENT"
    assert error_of(guest.read, "/open/closed/missing") == "EACCES"
    assert error_of(guest.read, "/open/closed/missing/deeper") == "EACCES"


def test_mkdir_and_rm_need_write_permission(dom0: RawClient, guest: RawClient) -> None:
    dom0.write("/ro/x", "")
    dom0.set_perms("/ro", ["r0"])
    dom0.set_perms("/ro/x", ["r0"])
    assert error_of(guest.mkdir, "/ro/x") == "EACCES"  # exists, but not writable
    assert error_of(guest.rm, "/ro/x") == "EACCES"
    assert dom0.read("/ro/x") == b""
    dom0.set_perms("/ro/x", ["w0"])
    guest.mkdir("/ro/x")
    guest.rm("/ro/x")
    assert error_of(dom0.read, "/ro/x") == "ENOENT"


def test_the_first_acl_entry_naming_a_domain_decides(dom0: RawClient, guest: RawClient) -> None:
    dom0.write("/acl", "v")
    dom0.set_perms("/acl", ["n0", "r1", "w1"])
    assert guest.read("/acl") == b"v"
    assert error_of(guest.write, "/acl", "w") == "EACCES"
    dom0.set_perms("/acl", ["n0", "w1", "r1"])
    guest.write("/acl", "w")
    assert error_of(guest.read, "/acl") == "EACCES"


def test_a_guest_owns_what_it_creates_in_a_directory_it_may_write(
    dom0: RawClient, guest: RawClient
) -> None:
    dom0.write("/pub", "")
    dom0.set_perms("/pub", ["r0", "b1"])
    guest.write("/pub/mine/deeper", "")
    # The owner entry names the creator (keeping the default); the ACL is inherited.
    assert dom0.get_perms("/pub/mine") == ["r1", "b1"]
    assert dom0.get_perms("/pub/mine/deeper") == ["r1", "b1"]
    guest.set_perms("/pub/mine", ["n1"])  # as its owner
    assert dom0.get_perms("/pub") == ["r0", "b1"]


# --- domains ----------------------------------------------------------------------


def test_domain_ops(xsd: XenStored, dom0: RawClient) -> None:
    assert dom0.request(Op.GET_DOMAIN_PATH, b"0\0") == b"/local/domain/0\0"
    assert error_of(dom0.request, Op.GET_DOMAIN_PATH, b"x\0") == "EINVAL"
    assert error_of(dom0.request, Op.GET_DOMAIN_PATH, b"70000\0") == "EINVAL"
    assert dom0.request(Op.IS_DOMAIN_INTRODUCED, b"0\0") == b"T\0"
    assert dom0.request(Op.IS_DOMAIN_INTRODUCED, b"5\0") == b"F\0"
    assert dom0.request(Op.IS_DOMAIN_INTRODUCED, b"32752\0") == b"T\0"  # DOMID_SELF
    for bad in (b"x\0", b"70000\0", b"\0"):
        assert error_of(dom0.request, Op.IS_DOMAIN_INTRODUCED, bad) == "EINVAL"
    assert dom0.request(Op.INTRODUCE, b"5\0" b"1234\0" b"7\0") == b"OK\0"
    assert dom0.request(Op.INTRODUCE, b"5\0" b"1234\0" b"7\0") == b"OK\0"  # again: fine
    assert error_of(dom0.request, Op.INTRODUCE, b"6\0" b"1234\0" b"0\0") == "EINVAL"
    assert error_of(dom0.request, Op.INTRODUCE, b"6\0" b"1234\0" b"x\0") == "EINVAL"
    assert error_of(dom0.request, Op.INTRODUCE, b"6\0") == "EINVAL"
    assert dom0.request(Op.IS_DOMAIN_INTRODUCED, b"5\0") == b"T\0"
    sock = xsd.run_dir / "domains" / "5" / "xenstore"
    assert sock.exists()
    with RawClient(sock) as guest:
        assert guest.request(Op.GET_DOMAIN_PATH, b"5\0") == b"/local/domain/5\0"
        assert dom0.request(Op.RESUME, b"5\0") == b"OK\0"
        assert error_of(dom0.request, Op.RESUME, b"6\0") == "ENOENT"
        assert dom0.request(Op.RELEASE, b"5\0") == b"OK\0"
        with pytest.raises(ConnectionError):
            guest.read("/")
    assert not sock.exists()
    assert dom0.request(Op.IS_DOMAIN_INTRODUCED, b"5\0") == b"F\0"
    assert error_of(dom0.request, Op.RELEASE, b"5\0") == "ENOENT"
    assert error_of(dom0.request, Op.RELEASE, b"0\0") == "EINVAL"


def test_introducing_a_domain_again_resets_its_connections(xsd: XenStored, dom0: RawClient) -> None:
    # cxenstored's do_introduce() calls domain_conn_reset() also for a domain
    # it knows (restore, resume): the guest's watches and transactions go,
    # and so do the quota they used.  The connection itself stays.
    with make_guest(xsd, dom0, 5) as guest:
        guest.watch("w", "tok")
        assert guest.wait_event() == ("w", "tok")
        tx = guest.transaction_start()
        guest.write("in-tx", "", tx)
        assert dom0.request(Op.INTRODUCE, b"5\0" b"0\0" b"1\0") == b"OK\0"
        dom0.write("/local/domain/5/w", "")
        assert error_of(guest.transaction_end, tx) == "ENOENT"
        assert error_of(guest.unwatch, "w", "tok") == "ENOENT"
        assert not guest.events
        assert xsd._call(lambda: xsd._dispatcher.domains[5].nwatches) == 0
        assert xsd._call(lambda: xsd._dispatcher.domains[5].ntransactions) == 0
        guest.watch("w", "again")  # the connection serves on
        assert guest.wait_event() == ("w", "again")


def test_introducing_dom0_again_resets_none_of_its_sockets(dom0: RawClient) -> None:
    # cxenstored resets a domain's ring connection; dom0's are sockets,
    # which an INTRODUCE of domain 0 leaves as they are.
    dom0.watch("/i0", "tok")
    assert dom0.wait_event() == ("/i0", "tok")
    tx = dom0.transaction_start()
    assert dom0.request(Op.INTRODUCE, b"0\0" b"0\0" b"1\0") == b"OK\0"
    dom0.write("/i0", "")
    assert dom0.wait_event() == ("/i0", "tok")
    dom0.transaction_end(tx)


def test_python_introduce_and_release(xsd: XenStored) -> None:
    path = xsd.introduce_domain(9)
    assert xsd.introduce_domain(9) == path
    assert xsd.is_introduced(9)
    with RawClient(path) as c:
        assert c.request(Op.GET_DOMAIN_PATH, b"9\0") == b"/local/domain/9\0"
    xsd.release_domain(9)
    assert not path.exists()
    with pytest.raises(KeyError):
        xsd.release_domain(9)
    with pytest.raises(ValueError):
        xsd.release_domain(0)
    assert xsd.introduce_domain(0) == xsd.path


def test_a_domain_socket_that_cannot_be_made_keeps_its_errno(tmp_path: Path) -> None:
    """The host's caller hears why (ENAMETOOLONG: a run_dir too long for
    the domain's socket path, which dom0's path still fits), not an
    OSError with no errno; nothing is introduced, and the directories
    made for the socket go again (those there before stay): they were
    left behind, made by the bind that failed."""
    # A socket's path has at most 107 bytes: domain 12345's is made 110.
    width = 110 - len(f"{tmp_path}//domains/12345/xenstore")
    if width < 1:
        pytest.skip(f"{tmp_path} is too long for this test")
    with XenStored(tmp_path / ("d" * width)) as xsd:
        too_long = xsd.introduce_path(12345)
        assert len(bytes(xsd.path)) <= 107 < len(bytes(too_long))
        with pytest.raises(OSError) as info:
            xsd.introduce_domain(12345)
        assert info.value.errno == errno.ENAMETOOLONG
        assert str(info.value) == (f"[Errno {errno.ENAMETOOLONG}] cannot create socket for "
                                   f"domain 12345: cannot listen on {too_long}: "
                                   "AF_UNIX path too long (110 bytes, at most 107)")
        assert not xsd.is_introduced(12345)
        domains = too_long.parent.parent
        assert not domains.exists()
        # Domain 1's path, four bytes shorter, fits: its directories are there before.
        fits = xsd.introduce_domain(1)
        with pytest.raises(OSError) as info:
            xsd.introduce_domain(12345)
        assert info.value.errno == errno.ENAMETOOLONG
        assert sorted(p.name for p in domains.iterdir()) == ["1"]
        assert fits.exists()


@pytest.mark.parametrize("failure", ["interrupted", "theirs meanwhile"])
def test_a_domain_socket_that_cannot_be_made_takes_back_only_its_own_empty_directories(
        xsd: XenStored, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """The directories made for a socket that cannot be made go again
    whatever stopped it (an interrupt too), but one that someone else put
    a file in meanwhile stays, with those above it, and the error the
    host's caller hears is still the socket's, not the removal's
    (ENOTEMPTY)."""
    socket_path = xsd.introduce_path(5)
    domains = socket_path.parent.parent
    assert not domains.exists()
    listen = xsd._listen

    def fails(sock: socket.socket, path: Path) -> None:
        monkeypatch.setattr(xsd, "_listen", listen)  # once
        if failure == "interrupted":
            raise KeyboardInterrupt
        (path.parent / "theirs").write_bytes(b"")
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))

    monkeypatch.setattr(xsd, "_listen", fails)
    if failure == "interrupted":
        # From this thread: an interrupt on the loop's ends the loop.
        with pytest.raises(KeyboardInterrupt):
            xsd._bind(socket_path)
        assert not domains.exists()
    else:
        with pytest.raises(OSError) as info:
            xsd.introduce_domain(5)
        assert info.value.errno == errno.ENAMETOOLONG
        assert [p.name for p in socket_path.parent.iterdir()] == ["theirs"]
    assert not xsd.is_introduced(5)
    path = xsd.introduce_domain(5)
    with RawClient(path) as c:
        assert c.request(Op.GET_DOMAIN_PATH, b"5\0") == b"/local/domain/5\0"


def test_a_domain_socket_whose_directory_cannot_be_made_names_it(
        xsd: XenStored, dom0: RawClient) -> None:
    """A file where the domain's directory goes: the host's caller hears
    the errno and which path (the directory's, which mkdir's strerror
    alone does not name); a dom0 client's INTRODUCE of it is answered EIO,
    as cxenstored's is; nothing is introduced either way."""
    blocker = xsd.introduce_path(12345).parent
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"")
    with pytest.raises(OSError) as info:
        xsd.introduce_domain(12345)
    assert info.value.errno == errno.EEXIST
    assert str(info.value) == (f"[Errno {errno.EEXIST}] cannot create socket for domain 12345: "
                               f"{blocker}: {os.strerror(errno.EEXIST)}")
    assert error_of(dom0.request, Op.INTRODUCE, b"12345\0" b"0\0" b"1\0") == "EIO"
    assert not xsd.is_introduced(12345)
    assert dom0.request(Op.IS_DOMAIN_INTRODUCED, b"12345\0") == b"F\0"
    assert blocker.is_file()  # not ours: nothing was made, nothing goes


def test_a_domain_socket_that_cannot_be_watched_is_undone(
        xsd: XenStored, monkeypatch: pytest.MonkeyPatch) -> None:
    """epoll refusing the new listener (ENOSPC: max_user_watches) fails
    the introduction with that errno, leaving no socket, descriptor or
    directory behind (``domains/`` too, which this introduction made),
    and the next introduction goes on; it let the error out of the
    loop's call as a bug, the listener open."""
    selector = xsd._selector
    assert selector is not None
    register = selector.register
    opened: list[socket.socket] = []
    domains = xsd.introduce_path(7).parent.parent
    assert not domains.exists()

    def refuses(fileobj: Any, events: int, data: Any = None) -> Any:
        monkeypatch.setattr(selector, "register", register)  # once
        assert isinstance(fileobj, socket.socket)
        opened.append(fileobj)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(selector, "register", refuses)
    with pytest.raises(OSError) as info:
        xsd.introduce_domain(7)
    assert info.value.errno == errno.ENOSPC
    assert "cannot create socket for domain 7" in str(info.value)
    assert not xsd.is_introduced(7)
    [listener] = opened
    assert listener.fileno() == -1
    assert not domains.exists()
    path = xsd.introduce_domain(7)
    with RawClient(path) as c:
        assert c.request(Op.GET_DOMAIN_PATH, b"7\0") == b"/local/domain/7\0"


def test_a_domain_socket_whose_watch_is_interrupted_is_undone(xsd: XenStored) -> None:
    """A Ctrl-C as the new listener is handed to epoll comes out as itself
    and takes back all the introduction made, as a refusal does: the
    listener, its socket file and the directories made for it."""
    socket_path = xsd.introduce_path(5)
    domains = socket_path.parent.parent
    watched: list[socket.socket] = []

    def interrupted(sock: socket.socket) -> None:
        watched.append(sock)
        raise KeyboardInterrupt

    # From this thread: an interrupt on the loop's ends the loop.
    with pytest.raises(KeyboardInterrupt):
        xsd._bind(socket_path, interrupted)
    [listener] = watched
    assert listener.fileno() == -1
    assert not domains.exists()


def test_a_ctrl_c_anywhere_in_taking_back_a_refused_socket_comes_out_as_itself(
        xsd: XenStored) -> None:
    """A Ctrl-C landing anywhere as _bind() takes back a socket epoll
    refused comes out as itself, not as the refusal: the removal's own
    failures are logged, a Ctrl-C is not one of them.  And the next
    introduction of the domain goes on."""
    socket_path = xsd.introduce_path(5)

    def refuses(sock: socket.socket) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def bind_refused() -> None:
        try:
            xsd._bind(socket_path, refuses)
        except OSError as e:
            assert e.errno == errno.ENOSPC  # (and a Ctrl-C dropped on the way fails)

    landed = []
    for n in itertools.count():
        # From this thread: an interrupt on the loop's ends the loop.
        where = interrupted_at(n, SIM_CODE, bind_refused)
        if not where:
            break
        landed.append(where)
    assert any("_bind" in where for where in landed), landed
    with RawClient(xsd.introduce_domain(5)) as c:
        assert c.request(Op.GET_DOMAIN_PATH, b"5\0") == b"/local/domain/5\0"


def test_a_domain_socket_whose_making_is_interrupted_anywhere_leaves_nothing(
        xsd: XenStored) -> None:
    """A Ctrl-C landing anywhere as _bind() makes a domain's socket, unwatched
    (as XenStored.start() makes the main one) or watched: it comes out as
    itself and leaves no socket file, descriptor or directory of it behind.
    One landing as bind() returned left the socket file, and with it the
    directories made for it."""
    socket_path = xsd.introduce_path(5)
    domains = socket_path.parent.parent
    for watch in (None, lambda sock: None):
        landed = []
        for n in itertools.count():
            fds = descriptors()
            made: list[socket.socket] = []
            # From this thread: an interrupt on the loop's ends the loop.
            where = interrupted_at(n, SIM_CODE, lambda made=made, watch=watch: made.append(
                xsd._bind(socket_path, watch)))
            if not where:
                break
            landed.append(where)
            assert not socket_path.exists(), f"interrupted {where}: its socket file is left"
            assert not domains.exists(), f"interrupted {where}: directories left"
            # Not collected: a socket lost to a reference cycle is a leak.
            assert descriptors(collect=False) <= fds, f"interrupted {where}: descriptors"
        [sock] = made
        sock.close()
        xsd._unlink(socket_path)
        for directory in (socket_path.parent, domains):
            directory.rmdir()
        assert any("_listen" in where for where in landed), landed


def test_a_domain_socket_whose_directories_are_made_only_in_part_takes_them_back(
        xsd: XenStored, monkeypatch: pytest.MonkeyPatch) -> None:
    """mkdir making the upper directories, then failing on a deeper one
    (ENOSPC, EACCES): the error comes out, and the ones it made go again.
    They were left (mkdir's failure came before the try that removes them)."""
    socket_path = xsd.introduce_path(5)
    domains = socket_path.parent.parent
    mkdir = Path.mkdir

    def halfway(self: Path, mode: int = 0o777, parents: bool = False,
                exist_ok: bool = False) -> None:
        if self != socket_path.parent:
            return mkdir(self, mode, parents, exist_ok)
        mkdir(domains)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))

    monkeypatch.setattr(Path, "mkdir", halfway)
    with pytest.raises(OSError) as info:
        xsd._bind(socket_path)
    assert info.value.errno == errno.ENOSPC
    assert not domains.exists()


def test_a_domain_socket_that_cannot_be_bound_leaves_the_file_in_its_way(
        xsd: XenStored, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone else's file comes in the way between the removal of a stale
    socket and bind(): EADDRINUSE, and that file stays.  Only a socket
    that bound its file takes the file back with it."""
    socket_path = xsd.introduce_path(5)
    unlink = xsd._unlink

    def theirs_comes(path: Path) -> None:
        monkeypatch.setattr(xsd, "_unlink", unlink)  # once
        unlink(path)
        path.write_bytes(b"theirs")

    monkeypatch.setattr(xsd, "_unlink", theirs_comes)
    with pytest.raises(OSError) as info:
        xsd._bind(socket_path)
    assert info.value.errno == errno.EADDRINUSE
    assert socket_path.read_bytes() == b"theirs"


@pytest.mark.parametrize("filled", ["domain's", "domains"])
def test_a_domain_socket_that_cannot_be_watched_leaves_directories_filled_meanwhile(
        xsd: XenStored, monkeypatch: pytest.MonkeyPatch, filled: str) -> None:
    """The directories an introduction that epoll refused made go again,
    deepest first, but not one someone else put a file in meanwhile, nor
    those above it: they are someone else's by then."""
    selector = xsd._selector
    assert selector is not None
    register = selector.register
    socket_path = xsd.introduce_path(7)
    domains = socket_path.parent.parent
    theirs = (socket_path.parent if filled == "domain's" else domains) / "theirs"

    def refuses(fileobj: Any, events: int, data: Any = None) -> Any:
        monkeypatch.setattr(selector, "register", register)  # once
        theirs.write_bytes(b"")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(selector, "register", refuses)
    with pytest.raises(OSError) as info:
        xsd.introduce_domain(7)
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in theirs.parent.iterdir()] == ["theirs"]
    assert not socket_path.exists()
    assert domains.is_dir()
    assert not xsd.is_introduced(7)


def test_a_domain_socket_that_cannot_be_watched_nor_removed_says_why_epoll_refused(
        xsd: XenStored, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """When taking back the refused socket fails too (its file cannot be
    unlinked), the host's caller hears epoll's errno, which says what went
    wrong, not the removal's; the removal's failure is logged.  It
    replaced epoll's."""
    selector = xsd._selector
    assert selector is not None
    register = selector.register
    unlink = _server.XenStored._unlink
    socket_path = xsd.introduce_path(7)
    refused = threading.Event()

    def refuses(fileobj: Any, events: int, data: Any = None) -> Any:
        monkeypatch.setattr(selector, "register", register)  # once
        refused.set()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def cannot_unlink(path: Path) -> None:
        # Not before: _listen unlinks a stale socket first.
        if refused.is_set() and path == socket_path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        unlink(path)

    monkeypatch.setattr(selector, "register", refuses)
    monkeypatch.setattr(xsd, "_unlink", cannot_unlink)
    with caplog.at_level(logging.ERROR, logger=_server.__name__):
        with pytest.raises(OSError) as info:
            xsd.introduce_domain(7)
    assert info.value.errno == errno.ENOSPC
    assert "cannot create socket for domain 7" in str(info.value)
    assert not xsd.is_introduced(7)
    [record] = [r for r in caplog.records if r.exc_info]
    assert str(socket_path) in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], PermissionError)


def test_control(dom0: RawClient) -> None:
    assert dom0.request(Op.CONTROL, b"check\0") == b"OK\0"
    assert dom0.request(Op.CONTROL, b"print\0hello\0") == b"OK\0"
    assert b"check" in dom0.request(Op.CONTROL, b"help\0")
    assert error_of(dom0.request, Op.CONTROL, b"bogus\0") == "EINVAL"
    assert error_of(dom0.request, Op.CONTROL, b"") == "EINVAL"


# --- quotas (unprivileged domains only) ----------------------------------------


def test_node_size_quota(dom0: RawClient, guest: RawClient) -> None:
    # Xen 4.17: a 24-byte header, 8 bytes per permission, value and child
    # names must stay below 2048 bytes.  Nodes here have 2 permissions.
    guest.write("ok", b"x" * (2047 - 24 - 16))
    assert error_of(guest.write, "big", b"x" * (2048 - 24 - 16)) == "ENOSPC"
    assert error_of(guest.read, "big") == "ENOENT"  # nothing half-created
    assert error_of(guest.write, "ok", b"x" * (2048 - 24 - 16)) == "ENOSPC"
    # A third permission is 8 bytes more: too many for "ok".
    assert error_of(guest.set_perms, "ok", ["n1", "r0", "r2"]) == "ENOSPC"
    assert guest.get_perms("ok") == ["n1", "r0"]
    dom0.write("/local/domain/1/dom0-may", b"x" * 4000)


def test_perms_quota(dom0: RawClient, guest: RawClient) -> None:
    guest.write("p", "")
    guest.set_perms("p", ["n1", "r2", "r3", "r4", "r5"])
    assert error_of(guest.set_perms, "p", ["n1", "r2", "r3", "r4", "r5", "r6"]) == "ENOSPC"
    dom0.set_perms("/local/domain/1/p", ["n1", "r2", "r3", "r4", "r5", "r6", "r7"])


def test_node_quota(xsd: XenStored, dom0: RawClient, guest: RawClient) -> None:
    # The guest owns its home already; fill up to 1000 nodes, 100 per directory
    # (the parent's child list counts against the node size too).
    owned = 1
    for d in range(10):
        for i in range(100 if d < 9 else 99 - d):
            if owned >= 1000:
                break
            guest.write(f"q{d}/{i}", "")
            owned += 1 if i else 2
    assert owned == 1000
    assert error_of(guest.write, "one-too-many", "") == "ENOSPC"
    guest.rm("q0/0")
    guest.write("one-more", "")
    # dom0 is not limited, also when writing below the guest's home
    dom0.write("/local/domain/1/dom0-node", "")


def test_watch_and_transaction_quotas(dom0: RawClient, guest: RawClient) -> None:
    for i in range(129):  # no quota for the privileged
        dom0.watch(f"/w{i}", "t")
    for i in range(128):
        guest.watch(f"w{i}", "t")
    assert error_of(guest.watch, "w-last", "t") == "ENOSPC"
    guest.unwatch("w0", "t")
    guest.watch("w-last", "t")
    txs = [guest.transaction_start() for _ in range(10)]
    assert error_of(guest.transaction_start) == "ENOSPC"
    guest.transaction_end(txs[0], commit=False)
    guest.transaction_start()


def test_node_quota_counts_every_node_a_write_creates() -> None:
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), quota=Quota(nodes=3)
    ) as server, RawClient(server.path) as admin:
        with make_guest(server, admin, 1) as guest:
            # Home + a + a/b + a/b/c would be 4: refused as a whole.
            assert error_of(guest.write, "a/b/c", "") == "ENOSPC"
            assert error_of(guest.read, "a") == "ENOENT"
            guest.write("a/b", "")  # home + a + a/b: 3


def test_a_parent_whose_child_list_outgrows_the_node_size_refuses_children(
    guest: RawClient,
) -> None:
    # The parent record holds its children's names: with 2 permissions
    # (40 bytes of header and perms) 19 names of 101 bytes (with their
    # NULs) fit below 2048 bytes, a 20th does not.
    names = [f"{i:02d}" + "x" * 98 for i in range(20)]
    for name in names[:19]:
        guest.write(f"dir/{name}", "")
    assert error_of(guest.write, f"dir/{names[19]}", "") == "ENOSPC"
    assert error_of(guest.read, f"dir/{names[19]}") == "ENOENT"
    assert guest.directory("dir") == names[:19]


def test_transaction_node_quota() -> None:
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), quota=Quota(transaction_nodes=4)
    ) as server, RawClient(server.path) as admin:
        with make_guest(server, admin, 1) as guest:
            for name in "abcde":
                guest.write(name, name)
            tx = guest.transaction_start()
            for name in "abcd":  # four nodes touched: the quota is used up
                assert guest.read(name, tx) == name.encode()
            assert error_of(guest.read, "e", tx) == "ENOSPC"
            # As cxenstored's access_node(): only a node new to the
            # transaction counts, and the one refused fails the
            # transaction (its commit answers ENOMEM; aborting is fine).
            assert guest.read("a", tx) == b"a"
            assert error_of(guest.transaction_end, tx) == "ENOMEM"
            tx = guest.transaction_start()
            for name in "abcd":
                guest.read(name, tx)
            assert error_of(guest.write, "e", "x", tx) == "ENOSPC"
            guest.transaction_end(tx, commit=False)
            assert guest.read("e") == b"e"
            tx = admin.transaction_start()  # no quota for the privileged
            for name in "abcde":
                admin.read(f"/local/domain/1/{name}", tx)
            admin.transaction_end(tx)


def test_path_length_limits(dom0: RawClient, guest: RawClient) -> None:
    # Xen 4.17: at most XENSTORE_REL_PATH_MAX (2048) characters below
    # /local/domain/<domid>/, or in all for other paths; for everybody.
    below = "/".join(["x" * 99] * 20) + "/" + "y" * 47  # 2047 characters
    for client, home in ((guest, "/local/domain/1"), (dom0, "/local/domain/0")):
        client.write(f"{below}z", "")
        assert client.read(f"{home}/{below}z") == b""
        assert error_of(client.write, f"{below}zz", "") == "EINVAL"
        assert error_of(client.write, f"{home}/{below}zz", "") == "EINVAL"
    dom0.write("/" + "y" * 2047, "")
    assert error_of(dom0.write, "/" + "y" * 2048, "") == "EINVAL"
    assert error_of(dom0.read, "/" + "y" * 4000) == "EINVAL"


def test_release_removes_what_the_domain_owns(xsd: XenStored, dom0: RawClient) -> None:
    with make_guest(xsd, dom0, 4) as guest:
        guest.write("device/vif/0/state", "4")
        dom0.mkdir("/local/domain/0/backend/vif/4/0")
        dom0.set_perms("/local/domain/0/backend/vif/4/0", ["n0", "r4", "w7"])
        dom0.write("/local/domain/0/backend/vif/4/0/state", "4")
        dom0.write("/elsewhere/owned-by-4", "")
        dom0.set_perms("/elsewhere/owned-by-4", ["n4"])
        dom0.write("/elsewhere/owned-by-4/child", "")
        dom0.set_perms("@releaseDomain", ["n0", "r4"])
        dom0.watch("/local/domain/4", "home")
        assert dom0.wait_event() == ("/local/domain/4", "home")
        xsd.release_domain(4)
    # As cxenstored since XSA-322: owned nodes go (watchers hear of it) ...
    assert dom0.wait_event() == ("/local/domain/4", "home")
    assert error_of(dom0.read, "/local/domain/4") == "ENOENT"
    assert error_of(dom0.read, "/elsewhere/owned-by-4") == "ENOENT"
    assert dom0.directory("/elsewhere") == []
    # ... and nobody else's permissions mention the domain any more.
    assert dom0.get_perms("/local/domain/0/backend/vif/4/0") == ["n0", "w7"]
    assert dom0.get_perms("/local/domain/0/backend/vif/4/0/state") == ["n0", "w7"]
    assert dom0.get_perms("@releaseDomain") == ["n0"]
    # A new domain with the same id starts from nothing.
    with make_guest(xsd, dom0, 4) as again:
        assert again.directory("/local/domain/4") == []
        assert error_of(again.read, "/local/domain/0/backend/vif/4/0") == "EACCES"


def test_release_gives_root_and_special_nodes_it_owns_to_dom0(
    xsd: XenStored, dom0: RawClient
) -> None:
    # "/" and the special nodes cannot go as the rest of what a released
    # domain owns does: they become dom0's, their other entries kept.
    with make_guest(xsd, dom0, 4):
        dom0.set_perms("/", ["n4", "r7"])
        dom0.set_perms("@introduceDomain", ["b4", "w7"])
        dom0.write("/owned-by-4", "")  # takes its parent's permissions
        xsd.release_domain(4)
    assert dom0.get_perms("/") == ["n0", "r7"]
    assert dom0.get_perms("@introduceDomain") == ["b0", "w7"]
    assert error_of(dom0.read, "/owned-by-4") == "ENOENT"
    assert "owned-by-4" not in dom0.directory("/")


def test_lifecycle() -> None:
    with tempfile.TemporaryDirectory(prefix="xs") as d:
        server = XenStored(Path(d))
        server.stop()  # never started: nothing to do
        with pytest.raises(RuntimeError):
            server.introduce_domain(1)
        with server:
            with pytest.raises(RuntimeError):
                server.start()
            guest_socket = server.introduce_domain(1)
            assert server.path.exists() and guest_socket.exists()
        server.stop()  # again: fine
        assert not server.path.exists() and not guest_socket.exists()
        with pytest.raises(RuntimeError):
            server.introduce_domain(2)


def _stuck_call() -> tuple[threading.Event, threading.Event, Callable[[], None]]:
    """A call that holds the loop from when it sets ``entered`` until
    ``gate`` is set: ``(entered, gate, stuck)``.  Its name is what the
    loop's stuck report says (``in stuck``)."""
    entered, gate = threading.Event(), threading.Event()

    def stuck() -> None:
        entered.set()
        assert gate.wait(60)

    return entered, gate, stuck


def test_stopping_a_stuck_loop_fails_naming_it() -> None:
    # stop() once waited for the loop thread for ever: a bug that kept
    # the loop from coming back to its select() hung whoever stopped it
    # (a test's fixture, past pytest-timeout).  Bounded, it says which
    # thread is stuck, and where; a later stop() finishes the job.
    entered, gate, stuck = _stuck_call()

    with tempfile.TemporaryDirectory(prefix="xs") as d:
        xsd = XenStored(Path(d))
        xsd.start()
        holder = threading.Thread(target=xsd._call, args=(stuck,), daemon=True)
        holder.start()
        try:
            assert entered.wait(10)
            began = time.monotonic()
            with pytest.raises(TimeoutError) as info:
                xsd.stop(timeout=0.5)
            # Its 0.5 s, not the 60 s the loop is stuck for (half of that
            # for a loaded machine's stalls).
            assert time.monotonic() - began < 30
            message = str(info.value)
            assert "'xenstored'" in message and "within 0.5 s" in message
            assert "in stuck" in message  # where it is stuck
            assert xsd._thread is not None and xsd._thread.is_alive()
            refused_as_not_running(xsd)  # stopping, though stuck
        finally:
            gate.set()
        xsd.stop()
        holder.join(10)
        assert not xsd._thread.is_alive() and not xsd.path.exists()
        xsd.stop()  # stopped: nothing more to do


def test_a_call_to_a_stuck_loop_fails_naming_it_and_never_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A call from another thread waited on its Future for ever while the
    # loop was stuck (stop() gave up after STOP_TIMEOUT, naming it, but a
    # caller meanwhile hung for good).  It waits as long as stop() does,
    # then fails the same way; a call the loop never began is withdrawn,
    # not run once the loop comes back.  The stuck call itself fails too.
    monkeypatch.setattr(_server, "STOP_TIMEOUT", 0.5)
    entered, gate, stuck = _stuck_call()

    ran: list[int] = []
    answers: dict[str, BaseException | None] = {}

    def call(name: str, fn: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            try:
                xsd._call(fn)
                answers[name] = None
            except BaseException as e:
                answers[name] = e

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    with tempfile.TemporaryDirectory(prefix="xs") as d:
        xsd = XenStored(Path(d))
        xsd.start()
        try:
            holder = call("stuck", stuck)
            assert entered.wait(10)
            caller = call("queued", lambda: ran.append(1))
            # Its 0.5 s, not the 60 s the loop is stuck for: the message
            # below says so; wall time on a loaded machine would not.
            caller.join(10)
            assert not caller.is_alive(), "a call waits for a stuck loop for good"
            queued = answers["queued"]
            assert isinstance(queued, TimeoutError), queued
            assert "'xenstored'" in str(queued) and "0.5 s" in str(queued)
            assert "in stuck" in str(queued)  # where the loop is stuck
            holder.join(10)
            assert isinstance(answers["stuck"], TimeoutError), answers
        finally:
            gate.set()
        # Waited for as long as ever (STOP_TIMEOUT back): the loop,
        # released, has to get going again first, which a loaded machine
        # may not let it do in 0.5 s.
        monkeypatch.undo()
        assert xsd.is_introduced(0)  # the loop is back
        assert ran == []  # the withdrawn call never ran
        xsd.stop()


def _holding_the_loop(xsd: XenStored) -> tuple[threading.Event, threading.Thread]:
    """Hold ``xsd``'s loop in a call until the Event returned is set (the
    holder thread, returned too, ends then, also if its own call gave up
    on the loop first)."""
    entered, gate, stuck = _stuck_call()

    def hold() -> None:
        try:
            xsd._call(stuck)
        except TimeoutError:
            pass  # given up on after STOP_TIMEOUT; the loop stays in stuck()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert entered.wait(10)
    return gate, holder


class _StuckLoop:
    """``host``'s XenStore loop made to get stuck: ``inside`` XenStored's
    ``step`` (the host's call in flight, which the loop finishes once
    released), or else held by another call as the hypervisor's ``before``
    returns (the host's next call into the loop withdrawn, never run).
    release() lets the loop go on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, host: SimHost, *, inside: bool,
                 step: str, before: str) -> None:
        self.gate = threading.Event()
        self.holder: threading.Thread | None = None
        if inside:
            original = getattr(XenStored, step)
            gate = self.gate

            def stuck(xsd: XenStored, domid: int) -> object:
                assert gate.wait(60)
                return original(xsd, domid)

            monkeypatch.setattr(XenStored, step, stuck)
        else:
            hypervisor_step = getattr(host.hypervisor, before)

            def then_get_stuck(*args: Any) -> object:
                result = hypervisor_step(*args)
                self.gate, self.holder = _holding_the_loop(host.xenstored)
                return result

            monkeypatch.setattr(host.hypervisor, before, then_get_stuck)

    def release(self) -> None:
        self.gate.set()
        if self.holder is not None:
            self.holder.join(10)


@pytest.mark.parametrize("within", [SIM_CODE, os.path.dirname(concurrent.futures.__file__)],
                         ids=["sim", "concurrent.futures"])
def test_a_call_cut_short_by_ctrl_c_before_the_loop_began_it_never_runs(
    monkeypatch: pytest.MonkeyPatch, within: str,
) -> None:
    # A Ctrl-C landing as the caller queued the call, or woke the loop,
    # left the call queued: the loop ran it once it came to it, for a
    # caller long gone (an introduce_domain() whose create_domain() had
    # undone itself meanwhile).  Withdrawn, as one the wait gave up on is,
    # and the Ctrl-C comes out of the call.  Also one landing in the
    # Future's own code, as the wait for it times out and the cancel()
    # that withdraws the call starts: it left the call queued.
    ran: list[int] = []

    def call() -> None:
        # Only this call gives up soon (else each landing would wait 10
        # s): the loop's check below and stop() at the end wait for a
        # loop that runs, which a loaded machine may not get going
        # within 0.2 s.
        with monkeypatch.context() as patch:
            patch.setattr(_server, "STOP_TIMEOUT", 0.2)
            try:
                xsd._call(ran.append, 1)
            except TimeoutError:
                pass  # undisturbed: the held loop never came to it

    landed = []
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as xsd:
        for n in itertools.count():
            gate, holder = _holding_the_loop(xsd)
            try:
                where = interrupted_at(n, within, call)
            finally:
                gate.set()
            holder.join(10)
            assert xsd.is_introduced(0)  # the loop went through its queue
            assert ran == [], where
            if not where:
                break
            landed.append(where)
    assert len(landed) > 5, landed


@contextlib.contextmanager
def _ctrl_c_once_a_call_waits(then: Callable[[], object] = lambda: None) -> Iterator[list[bool]]:
    """Within the block, SIGUSR1 goes to the main thread, as a terminal's
    Ctrl-C would, once it waits in XenStored._call for the loop (and
    ``then()`` has run); its handler raises :class:`Interrupted`.  The list
    yielded holds True after the block if the main thread was seen waiting
    so (else the signal was sent all the same, after 10 s, to end the
    wait)."""
    main = threading.get_ident()
    waited: list[bool] = []

    def send() -> None:
        deadline = time.monotonic() + 10
        while not (main_thread_in("wait", path="threading.py")
                   and main_thread_within("_call", 4)):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.001)
        else:
            waited.append(True)
        then()
        signal.pthread_kill(main, signal.SIGUSR1)

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        sender = threading.Thread(target=send)
        sender.start()
        try:
            yield waited
        finally:
            sender.join(10)
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_a_ctrl_c_while_a_call_waits_for_the_loop_withdraws_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The wait itself, where a Ctrl-C most likely comes: the call stayed
    # queued and ran once the loop came back.
    monkeypatch.setattr(_server, "STOP_TIMEOUT", OUTLASTS_THE_TEST)
    ran: list[int] = []
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as xsd:
        gate, holder = _holding_the_loop(xsd)
        try:
            with _ctrl_c_once_a_call_waits() as waited, pytest.raises(Interrupted):
                xsd._call(ran.append, 1)
        finally:
            gate.set()
        assert waited, "the call never waited for the loop"
        holder.join(10)
        assert xsd.is_introduced(0)  # the loop went through its queue
        assert ran == []


def test_a_timeout_error_the_call_raises_is_its_answer() -> None:
    # Not taken for the loop's delay: it comes at once, as fn raised it.
    def fn() -> None:
        raise TimeoutError("fn's own")

    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as xsd:
        with pytest.raises(TimeoutError, match="^fn's own$"):
            xsd._call(fn)
        assert xsd.is_introduced(0)


def test_a_call_the_loop_finishes_as_the_wait_times_out_is_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The wait may time out just as the loop finishes the call: cancel()
    # then fails and the call is done, so its answer is the caller's, not
    # a TimeoutError blaming a loop that was not stuck.  Each wait here
    # times out only once the call is done.
    class LateFuture(concurrent.futures.Future):  # type: ignore[type-arg]
        def exception(self, timeout: float | None = None) -> BaseException | None:
            super().exception()
            raise TimeoutError

    def fails() -> None:
        raise KeyError("fn's own")

    monkeypatch.setattr(_server.concurrent.futures, "Future", LateFuture)
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as xsd:
        assert xsd._call(lambda: 42) == 42
        with pytest.raises(KeyError, match="fn's own"):
            xsd._call(fails)


def test_a_call_from_the_loop_thread_runs_there_at_once() -> None:
    # Queued, it would wait for the loop that waits for it.
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as xsd:
        assert xsd._call(lambda: xsd.is_introduced(0)) is True


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop's death
def test_a_call_the_loop_ended_without_running_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # The loop ending (here dying of a bug) cancels the calls it left
    # queued.  A caller waiting through concurrent.futures.wait() was not
    # woken by that (cancel() wakes result()'s waiters, not wait()'s): it
    # slept STOP_TIMEOUT, then blamed a stuck loop.  It hears of it at once,
    # as before the timeout came (CancelledError).
    monkeypatch.setattr(_server, "STOP_TIMEOUT", OUTLASTS_THE_TEST)

    def dies(self: XenStored, _mask: int, _data: object) -> None:
        raise RuntimeError("a bug of the loop")

    monkeypatch.setattr(XenStored, "_run_calls", dies)
    with tempfile.TemporaryDirectory(prefix="xs") as d:
        xsd = XenStored(Path(d))
        xsd.start()
        try:
            with caplog.at_level("ERROR"), pytest.raises(concurrent.futures.CancelledError):
                xsd.introduce_domain(1)
            assert "xenstored loop died" in caplog.text
        finally:
            xsd.stop()


def test_a_create_domain_the_stuck_loop_fails_leaves_the_hypervisor_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Introducing the domain, XenStore's loop got stuck: the call gave up
    # after STOP_TIMEOUT, and so did the undo's release, whose
    # TimeoutError skipped the rest of the undo: the hypervisor kept a
    # domain nobody could destroy (not the host's, LookupError) until the
    # host closed.  The hypervisor forgets it whatever XenStore's steps
    # met.  (Its XenStore home stays: forgetting it needs that loop.)
    monkeypatch.setattr(_server, "STOP_TIMEOUT", 0.5)
    gate = threading.Event()
    introduce = XenStored._introduce_and_flush

    def stuck(self: XenStored, domid: int) -> object:
        assert gate.wait(60)
        return introduce(self, domid)

    host = SimHost().start()
    try:
        before = host.hypervisor.stats()
        monkeypatch.setattr(XenStored, "_introduce_and_flush", stuck)
        with pytest.raises(TimeoutError, match="'xenstored'"):
            host.create_domain("g")
        assert host.hypervisor.stats() == before
        assert [d.domid for d in host.domains()] == [0]
    finally:
        gate.set()
        host.close()


@pytest.mark.parametrize("then", ["retry", "close"])
@pytest.mark.parametrize("stuck_where", ["in the introduce", "before the introduce"])
def test_what_a_create_domain_the_stuck_loop_failed_left_goes_with_the_next(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stuck_where: str, then: str,
) -> None:
    # The undo of a create_domain() that XenStore's stuck loop failed
    # could not forget the domain there: its home (named as the one a
    # retry makes) stayed for good, and, had the loop been stuck in the
    # introduce itself, the domain too, introduced once the loop came back
    # (@introduceDomain, a socket), though no domain of the host, nor one
    # destroy_domain() knows.  The next create_domain() finishes that undo
    # first (failing as the first did while the loop is still stuck: it
    # waited for good to write its home); close() takes it with the rest.
    monkeypatch.setattr(_server, "STOP_TIMEOUT", 0.5)
    host = SimHost(tmp_path / "run").start()
    # Not in the introduce: stuck elsewhere after the home was written,
    # the introduce withdrawn, never run.
    loop = _StuckLoop(monkeypatch, host, inside=stuck_where == "in the introduce",
                      step="_introduce_and_flush", before="add_domain")
    try:
        with pytest.raises(TimeoutError, match="'xenstored'"):
            host.create_domain("g")
        monkeypatch.undo()
        monkeypatch.setattr(_server, "STOP_TIMEOUT", 0.5)
        if then == "retry":
            # Still stuck: failed the same way, not waiting for good to
            # write the new home.
            with pytest.raises(TimeoutError, match="'xenstored'"):
                host.create_domain("g")
        loop.release()
        assert host.xenstored.is_introduced(0)  # the loop is back
        if then == "retry":
            guest = host.create_domain("g")
            assert guest.domid == 2
            with host.dom0.xenstore() as c:
                assert not c.exists(b"/local/domain/1")
                assert not c.is_domain_introduced(1)
                names = [c.read(b"/local/domain/" + d + b"/name")
                         for d in c.list(b"/local/domain")]
                assert sorted(names) == [b"Domain-0", b"g"], names
            assert not (host.run_dir / "domains" / "1").exists()
            with pytest.raises(LookupError):
                host.destroy_domain(1)  # never the host's
            host.destroy_domain(guest)
    finally:
        loop.release()
        host.close()
    assert not (tmp_path / "run").exists()


def test_a_ctrl_c_while_create_domain_waits_for_the_stuck_loop_comes_out_as_itself(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> None:
    # A Ctrl-C while create_domain() waited for XenStore's loop, stuck
    # introducing the domain: the undo's release met that loop too, and
    # its TimeoutError took the Ctrl-C's place (the Ctrl-C only its
    # context), for a caller's except OSError to hide.  The Ctrl-C comes
    # out as itself, the undo's failure logged, and the next
    # create_domain(), the loop back, finishes the undo.
    stop_timeout = _server.STOP_TIMEOUT
    monkeypatch.setattr(_server, "STOP_TIMEOUT", OUTLASTS_THE_TEST)  # only the Ctrl-C ends it
    gate, entered = threading.Event(), threading.Event()
    introduce = XenStored._introduce_and_flush

    def stuck(self: XenStored, domid: int) -> object:
        entered.set()
        assert gate.wait(60)
        return introduce(self, domid)

    def then() -> None:
        # The main thread waiting in _call is not yet the loop stuck in
        # the introduce: a loop slow to take the call (a loaded machine)
        # had it withdrawn by the Ctrl-C, and the undo's release passed.
        entered.wait(10)
        _server.STOP_TIMEOUT = 0.2  # for the undo's release, which the loop fails

    host = SimHost(tmp_path / "run").start()
    try:
        before = host.hypervisor.stats()
        monkeypatch.setattr(XenStored, "_introduce_and_flush", stuck)
        with caplog.at_level("WARNING", logger="xenback.sim"):
            with _ctrl_c_once_a_call_waits(then) as waited, pytest.raises(Interrupted):
                host.create_domain("g")
        assert waited, "the create never waited for the loop"
        assert entered.is_set(), "the loop never took the introduce"
        assert re.search(r"domain 1: undoing its create after Interrupted failed: .*'xenstored'",
                         caplog.text), caplog.text
        assert host.hypervisor.stats() == before  # forgotten whatever the loop did
        assert host._undoing == {1}  # the rest is the next create's
        gate.set()
        monkeypatch.undo()
        monkeypatch.setattr(_server, "STOP_TIMEOUT", stop_timeout)
        assert host.xenstored.is_introduced(1)  # the loop is back: it finished the introduce
        guest = host.create_domain("g")
        assert guest.domid == 2
        with host.dom0.xenstore() as c:
            assert not c.exists(b"/local/domain/1")
            assert not c.exists(b"/libxl/1")
            assert not c.is_domain_introduced(1)
        assert not (host.run_dir / "domains" / "1").exists()
        assert host._undoing == set()
        host.destroy_domain(guest)
        assert host.hypervisor.stats() == before
    finally:
        gate.set()
        host.close()
    assert not (tmp_path / "run").exists()


def _release_stuck_once(host: SimHost) -> list[int]:
    """Make XenStore's first release_domain() fail as a stuck loop's call
    does (TimeoutError); the list returned gets the domid it failed."""
    release_domain = host.xenstored.release_domain
    failed: list[int] = []

    def stuck_release(domid: int) -> object:
        if not failed:
            failed.append(domid)
            raise TimeoutError(errno.ETIMEDOUT, "stuck, as the loop's would")
        return release_domain(domid)

    host.xenstored.release_domain = stuck_release  # type: ignore[method-assign]
    return failed


def test_a_ctrl_c_as_create_domain_ends_leaves_an_undo_the_loop_failed_to_the_next(
    caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> None:
    # A Ctrl-C as the create's last step (taking the domain off _undoing)
    # returns: the create is undone, and if XenStore's loop, stuck since,
    # fails the undo's release, what is left (the domain introduced, its
    # home) is still the next create's to finish, as for a Ctrl-C earlier.
    host = SimHost(tmp_path / "run").start()

    class Undoing(set[int]):
        """_undoing, with a signal's handler run as the create's discard
        returns (the one place in the try after it)."""

        armed = True

        def discard(self, domid: int) -> None:
            super().discard(domid)
            if self.armed:
                self.armed = False
                raise Interrupted

    try:
        before = host.hypervisor.stats()
        host._undoing = Undoing()
        failed = _release_stuck_once(host)
        with caplog.at_level("WARNING", logger="xenback.sim"), pytest.raises(Interrupted):
            host.create_domain("g")
        assert failed == [1]
        assert "domain 1: undoing its create after Interrupted failed" in caplog.text
        assert host.hypervisor.stats() == before
        assert host._undoing == {1}  # the rest is the next create's
        guest = host.create_domain("g")
        assert guest.domid == 2
        with host.dom0.xenstore() as c:
            assert not c.exists(b"/local/domain/1")
            assert not c.is_domain_introduced(1)
        assert host._undoing == set()
        host.destroy_domain(guest)
        assert host.hypervisor.stats() == before
    finally:
        host.close()
    assert not (tmp_path / "run").exists()


def test_a_create_domain_failure_comes_out_over_its_undo_s(
    caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> None:
    # As a Ctrl-C (above), a failure that is an Exception comes out as
    # itself, the undo's failure logged: it says why the create failed,
    # where the undo's would hide it (a RuntimeError "no thread to be
    # had" in place of the create's OSError, say).  It gave way to the
    # undo's, raised with it as its context.
    host = SimHost(tmp_path / "run").start()
    def broken(domid: int, path: str) -> None:
        raise RuntimeError("set_xenstore_path broke")

    try:
        before = host.hypervisor.stats()
        _release_stuck_once(host)
        host.hypervisor.set_xenstore_path = broken  # type: ignore[method-assign]
        with caplog.at_level("WARNING", logger="xenback.sim"), \
                pytest.raises(RuntimeError, match="set_xenstore_path broke"):
            host.create_domain("g")
        assert [r.getMessage() for r in caplog.records] == [
            "domain 1: undoing its create after RuntimeError failed: [Errno 110] stuck,"
            " as the loop's would"]
        assert host._undoing == {1}
        del host.hypervisor.set_xenstore_path
        guest = host.create_domain("g")
        assert guest.domid == 2 and host._undoing == set()
        host.destroy_domain(guest)
        assert host.hypervisor.stats() == before
    finally:
        host.close()
    assert not (tmp_path / "run").exists()


def test_an_undo_of_a_failed_create_domain_cut_short_anywhere_is_finished_by_the_next(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    # A create_domain() failing at its last step undoes every one before;
    # a Ctrl-C landing in that undo leaves the rest to the next
    # create_domain() (_undoing).  Also one landing as the undo starts,
    # before it counted itself there: that left the domain in the
    # hypervisor and introduced in XenStore, with its home, for good.
    host = SimHost(tmp_path / "run").start()
    code = SimHost._undo_create.__code__

    def failing(domid: int, path: str) -> None:
        raise OSError(errno.EIO, "set_xenstore_path failed (injected)")

    def create() -> None:
        try:
            host.create_domain("g")
        except OSError:
            pass  # undisturbed: the undo ran whole

    try:
        for n in itertools.count(-1):
            monkeypatch.setattr(host.hypervisor, "set_xenstore_path", failing)
            if n < 0:
                landed = interrupted_as_frame_starts(code, create)
            else:
                landed = interrupted_as_call_returns(code, n, create)
            monkeypatch.undo()
            guest = host.create_domain("g")
            failed = guest.domid - 1  # domids are not reused
            assert host.hypervisor.stats()["domains"] == 2, n
            with host.dom0.xenstore() as c:
                assert not c.is_domain_introduced(failed), n
                assert not c.exists(f"/local/domain/{failed}".encode()), n
                assert not c.exists(f"/libxl/{failed}".encode()), n
            assert not (host.run_dir / "domains" / str(failed)).exists(), n
            assert host._undoing == set(), n
            host.destroy_domain(guest)
            if not landed:
                break
        assert n > 5
    finally:
        host.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("then", ["retry", "close"])
@pytest.mark.parametrize("stuck_where", ["in the release", "before the release"])
def test_a_destroy_the_stuck_loop_failed_leaves_the_domain_dying_for_the_next(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stuck_where: str, then: str,
) -> None:
    # XenStore's loop stuck as destroy_domain() releases the domain there:
    # the destroy fails (TimeoutError), the domain left dying (unlisted,
    # its name taken) as by any failed destroy, and the next destroy of
    # it, or close(), finishes it once the loop is back: whether the loop
    # came back to finish the release it was stuck in, or the release,
    # withdrawn, never ran.
    monkeypatch.setattr(_server, "STOP_TIMEOUT", 0.5)
    host = SimHost(tmp_path / "run").start()
    loop: _StuckLoop | None = None
    try:
        guest = host.create_domain("g")
        # Not in the release: stuck as the hypervisor forgot the domain,
        # the release withdrawn, never run.
        loop = _StuckLoop(monkeypatch, host, inside=stuck_where == "in the release",
                          step="_release_and_flush", before="remove_domain")
        with pytest.raises(TimeoutError, match="'xenstored'"):
            host.destroy_domain(guest, 0)
        monkeypatch.undo()
        monkeypatch.setattr(_server, "STOP_TIMEOUT", 0.5)
        assert host.domains() == [host.dom0]
        with pytest.raises(LookupError, match="being destroyed"):
            host.domain(guest.domid)
        with pytest.raises(ValueError, match="exists already"):
            host.create_domain("g")  # dying, not gone
        loop.release()
        assert host.xenstored.is_introduced(0)  # the loop is back
        if then == "retry":
            host.destroy_domain(guest, 0)
            with host.dom0.xenstore() as c:
                assert not c.is_domain_introduced(guest.domid)
                assert not c.exists(f"/local/domain/{guest.domid}".encode())
            assert host.hypervisor.stats()["domains"] == 1
            assert not (host.run_dir / "domains" / str(guest.domid)).exists()
            with pytest.raises(LookupError, match="no domain"):
                host.destroy_domain(guest)
            assert host.create_domain("g").domid == guest.domid + 1  # the name is free
    finally:
        if loop is not None:
            loop.release()
        host.close()
    assert not (tmp_path / "run").exists()


def test_closing_a_host_whose_xenstore_loop_is_stuck_fails_and_can_be_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_server, "STOP_TIMEOUT", 0.5)
    entered, gate, stuck = _stuck_call()

    answers: list[BaseException] = []

    def hold() -> None:
        try:
            host.xenstored._call(stuck)
        except TimeoutError as e:  # the stuck call, given up on after STOP_TIMEOUT
            answers.append(e)

    host = SimHost().start()
    try:
        run_dir = host.run_dir
        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        assert entered.wait(10)
        with pytest.raises(TimeoutError, match="'xenstored' did not stop within 0.5 s"):
            host.close()
        # Its caller gives up too, with the loop still stuck: once the gate
        # opens, the call ends and would answer (None) in time for anyone.
        holder.join(10)
        assert not holder.is_alive(), "the stuck call's caller waits as long as the loop"
    finally:
        gate.set()
        host.close()
    holder.join(10)
    assert not run_dir.exists()
    assert len(answers) == 1 and "in stuck" in str(answers[0]), answers


def test_a_stop_cut_short_by_ctrl_c_is_finished_by_the_next() -> None:
    landed = []
    with tempfile.TemporaryDirectory(prefix="xs") as d:
        for n in itertools.count():
            xsd = XenStored(Path(d))
            xsd.start()
            try:
                where = interrupted_at(n, SIM_CODE, xsd.stop)
            finally:
                xsd.stop()
            assert xsd._thread is not None and not xsd._thread.is_alive(), where
            assert not xsd.path.exists(), where
            if not where:
                break
            landed.append(where)
    assert len(landed) > 3, landed


def test_a_start_cut_short_by_ctrl_c_anywhere_is_undone_by_stop() -> None:
    """A Ctrl-C landing anywhere in XenStored.start(), then stop(): no
    thread, socket or socket file of its is left, nor any descriptor once
    the collector ran (an epoll selector lost as its constructor returned
    is in a reference cycle: no code of ours has it to close).  One
    landing before the thread was made left the listener, selector and
    wake-up pair open for good (stop() saw no thread and did nothing)."""
    landed = []
    with tempfile.TemporaryDirectory(prefix="xs") as d:
        for n in itertools.count():
            threads, fds = set(threading.enumerate()), descriptors()
            sockets = open_sockets()
            xsd = XenStored(Path(d) / str(n))
            try:
                where = interrupted_at(n, SIM_CODE, xsd.start)
            finally:
                xsd.stop()
            assert eventually(lambda threads=threads: set(threading.enumerate()) <= threads), (
                f"interrupted {where}: threads left")
            assert open_sockets() <= sockets, f"interrupted {where}: sockets left"
            assert descriptors() <= fds, f"interrupted {where}: descriptors"
            assert not xsd.path.exists(), f"interrupted {where}: its socket file is left"
            if not where:
                break
            landed.append(where)
    assert any("XenStored.start" in where for where in landed), landed


@pytest.mark.parametrize("runs", ["never", "after stop()"])
def test_a_start_cut_short_in_starting_its_thread_is_undone_by_stop(
        monkeypatch: pytest.MonkeyPatch, runs: str) -> None:
    """A Ctrl-C inside threading's start() leaves the loop thread never
    started, or launched but running only later: stop() joins no thread
    that is not started (RuntimeError, and the server could never stop)
    and closes everything itself; the late thread, when it runs, ends at
    once, without touching what stop() closed."""
    launched: list[threading.Thread] = []

    def cut_short(thread: threading.Thread) -> None:
        launched.append(thread)
        raise Interrupted

    with tempfile.TemporaryDirectory(prefix="xs") as d:
        fds = descriptors()
        xsd = XenStored(Path(d))
        with monkeypatch.context() as patched:
            patched.setattr(threading.Thread, "start", cut_short)
            with pytest.raises(Interrupted):
                xsd.start()
        xsd.stop()
        assert descriptors() <= fds
        assert not xsd.path.exists()
        if runs == "after stop()":
            # The path serves someone else by then: the late thread must
            # not shut the server down again (unlinking it).
            theirs = xsd._bind(xsd.path)
            try:
                [late] = launched
                late.start()
                late.join(10)
                assert not late.is_alive()
                assert xsd.path.exists()
            finally:
                theirs.close()

def test_a_server_stop_closed_itself_is_said_stopped_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """stop() after a start() cut short in starting its thread closes the
    server itself; a stop() again closes nothing again, nor says so again.
    Each said "xenstored stopped"."""
    def cut_short(thread: threading.Thread) -> None:
        raise Interrupted

    with tempfile.TemporaryDirectory(prefix="xs") as d:
        xsd = XenStored(Path(d))
        with monkeypatch.context() as patched:
            patched.setattr(threading.Thread, "start", cut_short)
            with pytest.raises(Interrupted):
                xsd.start()
        with caplog.at_level(logging.INFO, logger=_server.__name__):
            xsd.stop()
            xsd.stop()
        assert [r.getMessage() for r in caplog.records] == ["xenstored stopped"]



def test_a_stop_before_the_loop_began_waits_for_its_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() coming after start() returned but before the loop thread
    began its loop closes everything itself, and joins the thread all the
    same (it ends as it begins): no thread is left running after stop()."""
    with tempfile.TemporaryDirectory(prefix="xs") as d:
        xsd = XenStored(Path(d))
        loop = xsd._loop
        gate = threading.Event()

        def held_back() -> None:
            gate.wait(10)
            loop()

        monkeypatch.setattr(xsd, "_loop", held_back)
        xsd.start()

        def open_gate_once_joined() -> None:
            # Opened once stop() waits in the join (or, failing that, at
            # the deadline: the test fails then on the thread left running).
            eventually(lambda: main_thread_within("join", 3), timeout=5)
            gate.set()

        opener = threading.Thread(target=open_gate_once_joined)
        opener.start()
        try:
            xsd.stop()
            assert xsd._thread is not None and not xsd._thread.is_alive()
        finally:
            gate.set()
            opener.join(10)
        assert not xsd.path.exists()


_STUCK_TEST = """
import tempfile
import threading
from pathlib import Path

import pytest

from xenback.sim._xenstored import XenStored, _server

_server.STOP_TIMEOUT = 1.0  # for a short test: 10 s by default


@pytest.fixture
def xsd():
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as server:
        yield server


def _get_stuck(xsd):
    try:
        xsd._call(threading.Event().wait)
    except TimeoutError:
        pass  # the call gives up after STOP_TIMEOUT; the loop stays stuck


def test_with_a_stuck_loop(xsd):
    # The loop waits for ever (a loop that spins is as stuck, and costs a
    # CPU), and this test for something only it would do.
    threading.Thread(target=_get_stuck, args=(xsd,), daemon=True).start()
    threading.Event().wait()
"""


def test_pytest_timeout_fails_a_test_whose_loop_is_stuck(tmp_path: Path) -> None:
    # pytest-timeout ends the test's call once, and the fixture's stop()
    # then ran with no timeout left: a test file hung for minutes, with
    # --timeout 60.  Now the test fails, and its teardown says why.
    (tmp_path / "test_stuck.py").write_text(_STUCK_TEST)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "2",
             "-o", "timeout_method=signal", "test_stuck.py"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the stuck test hung pytest: {e.stdout!r}")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 1 error" in run.stdout, run.stdout
    assert "Timeout (>2.0s)" in run.stdout, run.stdout
    assert "TimeoutError: the XenStore loop thread 'xenstored' did not stop" in run.stdout


def test_the_loops_last_records_are_emitted_after_a_stop_cut_short(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Ctrl-C in stop()'s join of the loop thread, which goes on
    stopping and logs so, and no stop() after it (a host whose close()
    it cut short, as the program ends): what the loop logged is emitted
    all the same, once; once still after stop() again.  Handed to the
    stop() that gave up on it, it waited for the next stop()."""
    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == _server.__name__]

    xsd = XenStored(tmp_path / "run")
    xsd.start()
    thread = xsd._thread
    assert thread is not None
    with caplog.at_level(logging.INFO, logger=_server.__name__):
        cut_short_in_its_join(thread, xsd.stop)
        assert said().count("xenstored stopped") == 1, said()
        xsd.stop()
        assert said().count("xenstored stopped") == 1, said()


def test_the_loops_last_records_are_emitted_after_a_stop_cut_short_anywhere(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As above, with the Ctrl-C landing anywhere in stop(), and the loop
    ending after it (woken here, as by anything it serves): what it logged
    stopping is emitted once, with no stop() after; once still after
    stop() again.  (Not one landing in stop()'s emitting them, which
    leaves the rest to the next stop(), so as to emit none twice.)  One
    landing as stop() let go of _calls_lock, marked joining but before
    its try, left the loop handing its records to a stop() gone."""
    from racewindow import TIMEOUT, line_of

    emitting = line_of(XenStored.stop, "emit(self._unsaid)")

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == _server.__name__]

    landed = []
    with caplog.at_level(logging.INFO, logger=_server.__name__):
        for n in itertools.count():
            caplog.clear()
            xsd = XenStored(tmp_path / str(n))
            xsd.start()
            thread = xsd._thread
            assert thread is not None
            try:
                where = interrupted_at(n, SIM_CODE, xsd.stop)
                if not xsd._stopping:
                    continue  # cut short before it told the loop: nothing said yet
                with xsd._calls_lock:
                    if not xsd._calls_closed:
                        xsd._wake()
                thread.join(TIMEOUT)
                assert not thread.is_alive(), where
                if (not re.search(r" emit, _heldlog\.py:\d+$", where)
                        and not where.endswith(f"XenStored.stop, _server.py:{emitting}")):
                    assert said().count("xenstored stopped") == 1, (where, said())
            finally:
                xsd.stop()
                assert said().count("xenstored stopped") == 1, (where, said())
                if where:
                    landed.append(where)
            if not where:
                break
    assert any("XenStored.stop" in where for where in landed), landed


@contextlib.contextmanager
def _held_up(
        holds: Callable[[logging.LogRecord], bool], then: Callable[[], object] = lambda: None,
) -> Iterator[tuple[logging.handlers.BufferingHandler, threading.Event, threading.Event]]:
    """For the block, XenStored's records down to DEBUG go to the handler
    yielded, whose filter holds up the thread emitting the first that
    ``holds`` picks (as a lock the main thread holds would): it sets the
    ``entered`` yielded, waits for ``go`` (yielded; TIMEOUT at most), then
    calls ``then``.  Cleared, ``entered`` lets it pick another.  At the
    end, ``go`` is set and the logger is as it was."""
    from racewindow import TIMEOUT

    entered, go = threading.Event(), threading.Event()

    def held_up(record: logging.LogRecord) -> bool:
        if not entered.is_set() and holds(record):
            entered.set()
            go.wait(TIMEOUT)
            then()
        return True

    kept = logging.handlers.BufferingHandler(capacity=1000)
    kept.addFilter(held_up)
    xs_logger = logging.getLogger("xenback.sim._xenstored")
    was = xs_logger.level
    xs_logger.addHandler(kept)
    xs_logger.setLevel(logging.DEBUG)
    try:
        yield kept, entered, go
    finally:
        go.set()
        xs_logger.removeHandler(kept)
        xs_logger.setLevel(was)


def test_a_stop_taking_over_an_emitting_loop_cut_short_anywhere_loses_no_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing anywhere in a stop() that finds the loop emitting a
    record (held up in a handler's filter here, as by a lock the main
    thread holds) and takes the server over, then stop() again: the
    server is stopped, and each record is emitted once, the loop's and
    stop()'s, whoever emits them."""
    from racewindow import TIMEOUT

    # Taken over at once: the loop emits until the test lets it go.
    monkeypatch.setattr(_server, "EMITTER_WAIT", 0.0)
    landed = []
    # Not formatted there, where a Ctrl-C would land in the repr.
    with _held_up(lambda record: record.msg == "closing %r: %s"
                  and record.args == (record.args[0], "closed by peer")) as (kept, entered, go):
        for n in itertools.count():
            entered.clear()
            go.clear()
            xsd = XenStored(tmp_path / str(n))
            xsd.start()
            kept.buffer.clear()
            loop = xsd._thread
            assert loop is not None
            where = "?"
            try:
                with RawClient(xsd.path) as dom0, RawClient(xsd.path) as other:
                    dom0.read("/")
                    other.read("/")
                    other.close()
                    assert entered.wait(TIMEOUT), "the loop logs nothing"
                    where = interrupted_at(n, SIM_CODE, xsd.stop)
                    go.set()
                    xsd.stop()
            finally:
                go.set()
                xsd.stop()
            loop.join(TIMEOUT)
            assert not loop.is_alive(), where
            assert not xsd.path.exists(), where
            said = [r.getMessage() for r in kept.buffer]
            assert len(set(said)) == len(said), (where, said)
            assert {message.rsplit(": ", 1)[-1] for message in said} == {
                "closed by peer", "server stopping", "xenstored stopped"}, (where, said)
            if not where:
                break
            landed.append(where)
    assert any("XenStored.stop" in where for where in landed), landed


def test_a_calls_records_are_emitted_once_whatever_cuts_its_caller_short(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Ctrl-C landing anywhere in _call() of a call that logs: what the
    call logged is emitted once if it ran, by the caller or, gone first,
    by the loop; never if it was withdrawn.  (Not one landing in the
    caller's emitting them, which cuts that short as it would records
    of its own.)"""
    import inspect

    lines, first = inspect.getsourcelines(XenStored._call)
    emitting = {first + i for i, text in enumerate(lines) if "emit(said)" in text}
    ran: list[int] = []

    def logs() -> None:
        ran.append(1)
        _server._log().info("ran for a caller")

    def said() -> int:
        return sum(r.getMessage() == "ran for a caller" for r in caplog.records)

    landed = []
    with XenStored(tmp_path / "run") as xsd, \
            caplog.at_level(logging.INFO, logger=_server.__name__):
        for n in itertools.count():
            ran.clear()
            caplog.clear()
            where = interrupted_at(n, SIM_CODE, lambda: xsd._call(logs))
            xsd._call(lambda: None)  # the loop is done with the one before
            line = re.search(r"XenStored\._call, _server\.py:(\d+)$", where)
            if not re.search(r" emit, _heldlog\.py:\d+$", where) and not (
                    line and int(line[1]) in emitting):
                assert said() == len(ran), f"interrupted {where}"
            if not where:
                break
            landed.append(where)
    assert any("XenStored._call" in where for where in landed), landed


def test_a_calls_records_are_emitted_by_the_loop_once_its_caller_has_gone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Ctrl-C in _call()'s wait while the loop runs the call, which then
    logs: the loop emits it, once, its caller gone.  Left to the caller,
    it was lost."""
    began, go = threading.Event(), threading.Event()

    def logs() -> None:
        began.set()
        go.wait(10)
        _server._log().info("ran for a caller gone")

    with XenStored(tmp_path / "run") as xsd, \
            caplog.at_level(logging.INFO, logger=_server.__name__):
        try:
            with _ctrl_c_once_a_call_waits(lambda: began.wait(10)) as waited, \
                    pytest.raises(Interrupted):
                xsd._call(logs)
        finally:
            go.set()
        assert waited, "the call never waited for the loop"
        xsd._call(lambda: None)  # the loop is done with the one before
        assert [r.getMessage() for r in caplog.records
                if r.name == _server.__name__] == ["ran for a caller gone"]


def test_a_run_dir_too_long_for_a_socket_is_named(tmp_path: Path) -> None:
    run_dir = tmp_path / ("d" * 100)
    with pytest.raises(OSError, match="cannot listen on .*ddd"):
        XenStored(run_dir).start()


@pytest.mark.parametrize("depth", [1, 10])
def test_a_socket_path_too_long_says_its_size_and_the_limit(tmp_path: Path, depth: int) -> None:
    """A socket path too long is ENAMETOOLONG, its message saying by how
    much (its size in bytes, as the kernel counts: an é is two) and which
    path: whole, or its first and last 100 characters when it is longer
    than 203 (it may be thousands).  It said neither size nor limit, and
    gave a path of any length whole."""
    run_dir = tmp_path.joinpath(*["é" * 100] * depth)
    path = os.fspath(run_dir / "xenstored" / "socket")
    shown = path if len(path) <= 203 else f"{path[:100]}...{path[-100:]}"
    with pytest.raises(OSError) as info:
        XenStored(run_dir).start()
    assert info.value.errno == errno.ENAMETOOLONG
    assert str(info.value) == (f"[Errno {errno.ENAMETOOLONG}] cannot listen on {shown}: "
                               f"AF_UNIX path too long ({len(os.fsencode(path))} bytes,"
                               " at most 107)")


def test_a_second_server_on_the_same_run_dir_is_refused(xsd: XenStored) -> None:
    with pytest.raises(OSError, match="served by someone else"):
        XenStored(xsd.run_dir).start()
    with RawClient(xsd.path) as c:  # the first one is unharmed
        assert c.read("/") == b""


def test_a_stale_socket_is_replaced() -> None:
    with tempfile.TemporaryDirectory(prefix="xs") as d:
        with XenStored(Path(d)) as first:
            stale = first.path
        leftover = socket.socket(socket.AF_UNIX)
        leftover.bind(str(stale))  # bound, never listening: a dead server's file
        leftover.close()
        with XenStored(Path(d)) as second, RawClient(second.path) as c:
            assert c.read("/") == b""


def test_quotas_can_be_configured() -> None:
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), quota=Quota(nodes=3, watches=1)
    ) as server, RawClient(server.path) as admin:
        with make_guest(server, admin, 1) as guest:
            guest.write("a", "")
            guest.write("b", "")
            assert error_of(guest.write, "c", "") == "ENOSPC"
            guest.watch("a", "t")
            assert error_of(guest.watch, "b", "t") == "ENOSPC"


def test_connections_per_domain_are_limited() -> None:
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), quota=Quota(connections=2)
    ) as server, RawClient(server.path) as admin:
        first = make_guest(server, admin, 1)
        second = RawClient(server.introduce_path(1))
        with first, second, RawClient(server.introduce_path(1)) as third:
            with pytest.raises(ConnectionError):
                third.read("/local/domain/1")
            assert first.read("/local/domain/1") == b""
            assert second.read("/local/domain/1") == b""


def test_a_quota_that_would_hold_every_guest_back_is_refused() -> None:
    # At 0, a guest's first request would wait for ever: nothing it caused
    # ever waits for dom0, so nothing wakes it.
    with pytest.raises(ValueError, match="outstanding"):
        Quota(outstanding=0)


def test_domid_arguments_go_up_to_65535(dom0: RawClient) -> None:
    # A domid is a domid_t: 65535 is the largest, 65536 is EINVAL.
    assert dom0.request(Op.GET_DOMAIN_PATH, b"65535\0") == b"/local/domain/65535\0"
    assert error_of(dom0.request, Op.GET_DOMAIN_PATH, b"65536\0") == "EINVAL"
    assert dom0.request(Op.IS_DOMAIN_INTRODUCED, b"65535\0") == b"F\0"


@pytest.mark.parametrize("domid", [0x7FF0, 0x7FF4, 0xFFFF])
def test_a_reserved_domid_is_no_domain_to_introduce(
        xsd: XenStored, dom0: RawClient, domid: int) -> None:
    """From DOMID_FIRST_RESERVED (0x7FF0) on no domain has the id:
    cxenstored's INTRODUCE fails to map its ring (the grant map finds no
    such domain, EINVAL), and so does the wire's here; introduce_domain()
    refuses it before anything changes, as the host refuses such a domid.
    Both made it a socket and an introduced domain."""
    payload = f"{domid}\0" "1234\0" "7\0".encode()
    assert error_of(dom0.request, Op.INTRODUCE, payload) == "EINVAL"
    with pytest.raises(ValueError, match=rf"^domid {domid} is reserved \(0x7FF0 on\): "
                                         r"no domain has it$"):
        xsd.introduce_domain(domid)
    assert not xsd.is_introduced(domid)
    with pytest.raises(KeyError):  # not introduced, as its docstring says: no ValueError
        xsd.release_domain(domid)
    assert not (xsd.run_dir / "domains").exists()
    # The largest id a domain has is fine.
    assert dom0.request(Op.INTRODUCE, b"32751\0" b"1234\0" b"7\0") == b"OK\0"
    assert xsd.introduce_domain(0x7FEF) == xsd.introduce_path(0x7FEF)


def test_directory_part_generation_changes_with_each_change_in_a_transaction(
    dom0: RawClient,
) -> None:
    # Each node a transaction writes gets a generation of its own, so a
    # client paging through a list it changes in between can tell, as it
    # can outside one.
    dom0.write("/gt/a", "")
    tx = dom0.transaction_start()
    gens = [dom0.request(Op.DIRECTORY_PART, b"/gt\0" b"0\0", tx).split(b"\0")[0]]
    for name in ("b", "c"):
        dom0.write(f"/gt/{name}", "", tx)
        gens.append(dom0.request(Op.DIRECTORY_PART, b"/gt\0" b"0\0", tx).split(b"\0")[0])
    assert len(set(gens)) == 3, gens
    dom0.transaction_end(tx, commit=False)


def test_directory_part_sends_as_many_children_as_fit(dom0: RawClient) -> None:
    # Children that fill a part to the byte before the end marker's go in
    # it, when more follow: a part is not cut one child short.
    names = [f"{i:02d}" + "x" * 97 for i in range(40)]  # 100 bytes each
    for name in names:
        dom0.write(f"/fit/{name}", "")
    filler = "y"
    while True:
        dom0.write(f"/fit/{filler}", "")
        dom0.write("/fit/z", "")
        gen = dom0.request(Op.DIRECTORY_PART, b"/fit\0" b"100000\0")[:-1]  # with its NUL
        room = PAYLOAD_MAX - len(gen) - 1
        listed = sum(len(n) + 1 for n in names) + len(filler) + 1
        if listed == room:
            break
        dom0.rm(f"/fit/{filler}")
        dom0.rm("/fit/z")
        filler = "y" * (len(filler) + room - listed)
    first = dom0.request(Op.DIRECTORY_PART, b"/fit\0" b"0\0")
    assert len(first) == PAYLOAD_MAX - 1
    assert first[len(gen):].split(b"\0")[:-1] == [n.encode() for n in [*names, filler]]
    assert _children_in_parts(dom0, "/fit") == [*names, filler, "z"]


def test_a_special_node_owned_by_a_released_domain_goes_back_to_dom0(
    xsd: XenStored, dom0: RawClient
) -> None:
    # Special nodes are not removed with their owner (the server's domain
    # socket needs them); like a kept orphan in cxenstored's
    # domain_tree_remove_sub() they pass to dom0, keeping the default.  A
    # later domain with the same id must not inherit them.
    dom0.set_perms("@introduceDomain", ["r4", "w5"])
    xsd.introduce_domain(4)
    xsd.release_domain(4)
    assert dom0.get_perms("@introduceDomain") == ["r0", "w5"]
    with make_guest(xsd, dom0, 4) as again:
        assert error_of(again.set_perms, "@introduceDomain", ["b4"]) == "EACCES"


def test_the_loop_makes_no_record_nobody_listens_to(
        xsd: XenStored, dom0: RawClient, caplog: pytest.LogCaptureFixture) -> None:
    """The loop keeps what it logs (see _server._say), but makes no record
    of a level its logger would not emit: a failed request (a missing
    node read) is logged at DEBUG, and a loop that kept a record of each
    served them at half the rate."""
    caplog.set_level(logging.INFO, logger="xenback.sim._xenstored")
    with records_made() as made:
        assert error_of(dom0.read, "/missing") == "ENOENT"
    assert [r.getMessage() for r in made if r.name.startswith("xenback.sim._xenstored")] == []


@pytest.mark.parametrize("silenced", ["logging.disable", "logger.disabled"])
def test_the_loop_makes_no_record_of_a_silenced_logger(
        xsd: XenStored, dom0: RawClient, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, silenced: str) -> None:
    """Nor of a level its logger would emit but for logging.disable(), or
    a logger disabled (as logging.config does to the loggers it does not
    name): the failed request's DEBUG record would not be emitted."""
    caplog.set_level(logging.DEBUG, logger="xenback.sim._xenstored")
    if silenced == "logging.disable":
        logging.disable(logging.DEBUG)
    else:
        monkeypatch.setattr(logging.getLogger(_ops.__name__), "disabled", True)
    try:
        with records_made() as made:
            assert error_of(dom0.read, "/missing") == "ENOENT"
    finally:
        logging.disable(logging.NOTSET)
    assert [r.getMessage() for r in made if r.name.startswith("xenback.sim._xenstored")] == []


def test_a_stop_waits_for_the_loop_emitting_no_longer_than_it_was_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stop(timeout) finding the loop emitting a record (held up in a
    handler) waits for it ``timeout`` at most, when that is less than
    EMITTER_WAIT, then stops the server without it.  It waited
    EMITTER_WAIT all the same."""
    from racewindow import TIMEOUT, Attempt

    monkeypatch.setattr(_server, "EMITTER_WAIT", OUTLASTS_THE_TEST)
    with _held_up(lambda record: record.msg == "closing %r: %s") as (_, entered, go):
        xsd = XenStored(tmp_path / "run")
        xsd.start()
        try:
            with RawClient(xsd.path) as client:
                client.read("/")
            assert entered.wait(TIMEOUT), "the loop logs nothing"
            stopper = Attempt(lambda: xsd.stop(0.1))
            assert stopper.result(TIMEOUT / 2, msg="stop() waits past its timeout") is None
            assert not xsd.path.exists()
        finally:
            go.set()
            xsd.stop()


def test_a_stop_after_one_cut_short_starting_its_closer_closes_all_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop() taking the server from an emitting loop, cut short (a
    Ctrl-C) starting its closer, leaves the closing to the next stop():
    a Ctrl-C landing anywhere in that one, then stop() again, leaves no
    socket of the server's (a guest's too) and closes each connection
    once.  The next stop() closed it in the main thread: one cut short
    there left the rest open for good (the stop() after it found the
    server closed), a guest's socket file with it."""
    from racewindow import TIMEOUT

    monkeypatch.setattr(_server, "EMITTER_WAIT", 0.0)

    def cut_short(thread: threading.Thread) -> None:
        raise Interrupted

    landed = []
    with _held_up(lambda record: record.msg == "closing %r: %s"
                  and record.args == (record.args[0], "closed by peer")) as (kept, entered, go):
        for n in itertools.count():
            entered.clear()
            go.clear()
            xsd = XenStored(tmp_path / str(n))
            xsd.start()
            guest = xsd.introduce_domain(5)
            kept.buffer.clear()
            loop = xsd._thread
            assert loop is not None
            where = "?"
            try:
                with RawClient(xsd.path) as dom0, RawClient(xsd.path) as other:
                    dom0.read("/")
                    other.read("/")
                    other.close()
                    assert entered.wait(TIMEOUT), "the loop logs nothing"
                    with monkeypatch.context() as patched:
                        patched.setattr(threading.Thread, "start", cut_short)
                        with pytest.raises(Interrupted):
                            xsd.stop()
                    where = interrupted_at(n, SIM_CODE, xsd.stop)
                    xsd.stop()
            finally:
                go.set()
                xsd.stop()
            loop.join(TIMEOUT)
            assert not loop.is_alive(), where
            assert not xsd.path.exists(), where
            assert not guest.exists(), where
            said = [r.getMessage() for r in kept.buffer]
            assert len(set(said)) == len(said), (where, said)
            assert sum(m.endswith(": server stopping") for m in said) == 1, (where, said)
            assert said.count("xenstored stopped") == 1, (where, said)
            if not where:
                break
            landed.append(where)
    assert any("XenStored.stop" in where for where in landed), landed


def test_a_stop_taking_over_an_emitting_loop_emits_what_it_had_yet_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop() that takes the server from a loop emitting the first of
    two records it logged in one callback (two failed requests in one
    packet, the first held up in a handler): the second is emitted by the
    time stop() returns, the first once the handler lets go."""
    from racewindow import TIMEOUT

    from xenback.sim._xenstored._wire import HEADER

    monkeypatch.setattr(_server, "EMITTER_WAIT", 0.0)
    with _held_up(lambda record: record.msg == "%r op %s: %s") as (kept, entered, go):
        xsd = XenStored(tmp_path / "run")
        xsd.start()
        loop = xsd._thread
        assert loop is not None
        try:
            with RawClient(xsd.path) as dom0:
                dom0.send_raw(b"".join(HEADER.pack(Op.READ, i, 0, len(path)) + path
                                       for i, path in enumerate((b"/first\0", b"/second\0"))))
                assert entered.wait(TIMEOUT), "the loop logs nothing"
                xsd.stop()
                said = [r.getMessage() for r in kept.buffer]
                assert [m.rsplit(" ", 1)[-1] for m in said if "ENOENT" in m] == ["/second"], said
                go.set()
                loop.join(TIMEOUT)
                assert not loop.is_alive()
                said = [r.getMessage() for r in kept.buffer]
                assert [m.rsplit(" ", 1)[-1] for m in said if "ENOENT" in m] == [
                    "/second", "/first"], said
        finally:
            go.set()
            xsd.stop()


def test_a_loop_whose_record_raises_after_a_stop_took_over_is_not_said_dead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop() takes the server from a loop emitting a record (held up
    in a handler's filter), then the filter raises what the loop lets
    through (SystemExit, a filter calling sys.exit()): the loop ends with
    it, having lost only the server, which is stopped.  It is not said to
    have died: "xenstored loop died" went to the records of the server's
    new thread, the closer."""
    from racewindow import TIMEOUT

    monkeypatch.setattr(_server, "EMITTER_WAIT", 0.0)
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    with _held_up(lambda record: record.msg == "closing %r: %s",
                  then=lambda: sys.exit("a filter's bug")) as (kept, entered, go):
        xsd = XenStored(tmp_path / "run")
        xsd.start()
        loop = xsd._thread
        assert loop is not None
        try:
            with RawClient(xsd.path) as client:
                client.read("/")
            assert entered.wait(TIMEOUT), "the loop logs nothing"
            xsd.stop()
            go.set()
            loop.join(TIMEOUT)
            assert not loop.is_alive()
            assert [type(e) for e in died] == [SystemExit]
            said = [r.getMessage() for r in kept.buffer] + [r.getMessage() for r in xsd._said]
            assert "xenstored loop died" not in said, said
            assert "xenstored stopped" in said, said
        finally:
            go.set()
            xsd.stop()


def test_a_call_given_up_on_is_said_before_the_next_call_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """What a call whose caller gave up on it logged is the loop's to emit
    (see _call): it goes out before the call queued behind it runs, so
    that call's caller, once returned, finds it emitted, as when the loop
    emitted as it logged."""
    from racewindow import TIMEOUT, Attempt

    running, go, woken = threading.Event(), threading.Event(), threading.Event()
    next_ran: list[bool] = []   # whether the next call had run, each time it was emitted
    ran = threading.Event()

    def given_up_on() -> None:
        running.set()
        go.wait(TIMEOUT)
        _server._log().warning("the call given up on")

    def heard(record: logging.LogRecord) -> bool:
        if record.msg == "the call given up on":
            next_ran.append(ran.is_set())
        return True

    kept = logging.handlers.BufferingHandler(capacity=100)
    kept.addFilter(heard)
    caplog.set_level(logging.INFO, logger=_server.__name__)
    logging.getLogger(_server.__name__).addHandler(kept)
    xsd = XenStored(tmp_path / "run")
    xsd.start()
    try:
        def gives_up(future: concurrent.futures.Future[Any], timeout: float) -> None:
            # Once the loop runs it: as a caller whose wait timed out.
            assert running.wait(TIMEOUT), "the loop does not run the call"
            raise TimeoutError

        with monkeypatch.context() as patched:
            patched.setattr(concurrent.futures.Future, "exception", gives_up)
            first = Attempt(lambda: xsd._call(given_up_on))
            assert isinstance(first.result(), TimeoutError)
        wake = xsd._wake

        def queued() -> None:
            wake()
            woken.set()

        monkeypatch.setattr(xsd, "_wake", queued)
        second = Attempt(lambda: xsd._call(ran.set))
        assert woken.wait(TIMEOUT), "the second call is not queued"
        go.set()
        assert second.result() is None
        assert next_ran == [False], next_ran
    finally:
        go.set()
        logging.getLogger(_server.__name__).removeHandler(kept)
        xsd.stop()


def test_a_handler_raising_on_a_loop_record_costs_that_record_only(
        xsd: XenStored, dom0: RawClient, caplog: pytest.LogCaptureFixture) -> None:
    """A handler's filter raising on a record the loop logged (a failed
    request's) costs that record, not the server: the request is
    answered, and the loop serves on.  Emitted as it was logged, it cost
    the connection (see _on_event); emitted by the loop in _say, it
    killed the loop, and the server with it."""
    raised: list[str] = []

    def buggy(record: logging.LogRecord) -> bool:
        if record.msg == "%r op %s: %s" and not raised:
            raised.append(record.getMessage())
            raise ValueError("a filter's bug")
        return True

    handler = logging.handlers.BufferingHandler(capacity=100)
    handler.addFilter(buggy)
    xs_logger = logging.getLogger("xenback.sim._xenstored")
    caplog.set_level(logging.DEBUG, logger=xs_logger.name)
    xs_logger.addHandler(handler)
    try:
        assert error_of(dom0.read, "/missing") == "ENOENT"
        assert raised, "no record to raise on"
        dom0.write("/still", b"served")
        assert dom0.read("/still") == b"served"
    finally:
        xs_logger.removeHandler(handler)
    assert xsd._thread is not None and xsd._thread.is_alive()


def test_a_stop_taking_over_a_loop_emitting_after_it_closed_closes_nothing_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop that saw stop() begin (its first step, before it joins) and
    closed the server, then emits what it logged closing, held up in a
    handler: the stop() that takes it over closes nothing again, nor says
    "xenstored stopped" again."""
    from racewindow import TIMEOUT, Attempt, PauseAt

    monkeypatch.setattr(_server, "EMITTER_WAIT", 0.0)
    with _held_up(lambda record: record.msg == "closing %r: %s"
                  and record.args == (record.args[0], "server stopping")) as (kept, entered, go):
        xsd = XenStored(tmp_path / "run")
        xsd.start()
        loop = xsd._thread
        assert loop is not None
        try:
            with RawClient(xsd.path) as dom0:
                dom0.read("/")  # served, not taken to the loop's end unread
                pause = PauseAt(XenStored.stop, "with self._entry_lock:")
                stopper = Attempt(lambda: pause.run(xsd.stop))
                assert pause.reached.wait(TIMEOUT), "stop() does not begin"
                # Wakes the loop, which finds it stopping: unless it found so
                # itself, its pass that answered the first read not over as
                # stop() began, and has closed dom0 (the same scene from here).
                with contextlib.suppress(OSError):
                    dom0.send(Op.READ, b"/\0")
                assert entered.wait(TIMEOUT), "the loop emits nothing closing"
                pause.resume()
                assert stopper.result() is None
                go.set()
                loop.join(TIMEOUT)
                assert not loop.is_alive()
            said = [r.getMessage() for r in kept.buffer]
            assert said.count("xenstored stopped") == 1, said
        finally:
            go.set()
            xsd.stop()
