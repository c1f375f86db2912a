"""The typed XenStore helper and the ordered event queues."""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import re
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
import pyxs
from pyxs._internal import Op

from tests.highfds import Filled, descriptors_past_fd_setsize, past_fd_setsize
from tests.racewindow import Attempt, PauseAt, stands_at
from tests.sim.hosthelpers import answer_one_request, eventually, hang_up_after_one_request
from tests.stolensignal import (
    OUTLASTS_THE_TEST,
    interrupt,
    main_thread_in,
    main_thread_within,
)
from tests.xenback.xbhelpers import TIMEOUT, handed_over, leaked_threads
from xenback import EventQueue, XenStore
from xenback.xenstore import close_client


@pytest.fixture
def wq():
    from workqueue import WQ_UNBOUND, alloc_workqueue

    queue = alloc_workqueue("xb-test", WQ_UNBOUND)
    yield queue
    queue.destroy()


def test_typed_reads_and_writes(dom0_xs) -> None:
    xs = dom0_xs
    xs.write("/test/a/b", 42)
    assert xs.read("/test/a/b") == "42"
    assert xs.read_int("/test/a/b") == 42
    assert xs.read("/test/a") == ""  # parents are created empty
    assert xs.read("/test/missing") is None
    assert xs.read("/test/missing", "dflt") == "dflt"
    assert xs.read_int("/test/missing", 7) == 7
    xs.write("/test/garbage", "12abc")
    with pytest.raises(ValueError, match=r"/test/garbage: expected an integer, found '12abc'"):
        xs.read_int("/test/garbage")
    assert sorted(xs.ls("/test")) == ["a", "garbage"]
    assert xs.ls("/test/nothing") == []
    assert xs.exists("/test/a") and not xs.exists("/test/nothing")
    xs.rm("/test/a")
    xs.rm("/test/a")  # already gone: fine
    assert not xs.exists("/test/a/b")
    xs.rm("/no/such/parent")
    with pytest.raises(FileNotFoundError) as info:
        xs.get_perms("/no/such/node")
    assert info.value.filename == "/no/such/node"
    with pytest.raises(ValueError, match="invalid XenStore path"):
        xs.read("/bad path")
    with pytest.raises(ValueError, match="not ASCII"):
        xs.read("/caf\u00e9")
    with pytest.raises(TypeError, match="str or int"):
        xs.write("/test/x", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="str or int, not bool"):
        xs.write("/test/x", True)  # an int, but "True" is no XenStore number
    assert xs.get_domain_path(3) == "/local/domain/3"
    with pytest.raises(TypeError, match="XenStore paths are str, not bytes"):
        xs.read(b"/test")  # type: ignore[arg-type]
    xs.mkdir("/test/made/deep")
    assert xs.read("/test/made/deep") == "" and xs.read("/test/made") == ""
    xs.write("/test/made/deep", "kept")
    xs.mkdir("/test/made/deep")  # an existing node keeps its value
    assert xs.read("/test/made/deep") == "kept"


@pytest.mark.parametrize("value", ["--5", "---1", "-", "- 5", "5-"])
def test_read_int_names_the_node_for_any_non_number(dom0_xs, value) -> None:
    # The value may be another domain's: whatever it wrote, the error says
    # which node held what, not what int() thought of it.
    dom0_xs.write("/test/n", value)
    with pytest.raises(ValueError) as info:
        dom0_xs.read_int("/test/n")
    assert str(info.value) == f"/test/n: expected an integer, found {value!r}"


@pytest.mark.parametrize(("value", "number"), [(" 7", 7), ("-3 ", -3), ("  12  ", 12)])
def test_read_int_takes_white_space_around_the_number(dom0_xs, value, number) -> None:
    # As the kernel's xenbus_scanf("%d") does: another domain's " 7" is 7.
    dom0_xs.write("/test/n", value)
    assert dom0_xs.read_int("/test/n") == number


@pytest.mark.parametrize("value", ["\u0663", "\uff15", "-\u0967\u0968"],
                         ids=["arabic-indic", "fullwidth", "devanagari"])
def test_read_int_refuses_digits_other_than_ascii(host, dom0_xs, value) -> None:
    """int() takes any Unicode decimal digit; a guest's "\u0663" is no number
    of the XenStore protocol, whose numbers are ASCII."""
    _write_raw(host, "/test/n", value.encode())
    assert dom0_xs.read("/test/n") == value
    with pytest.raises(ValueError) as info:
        dom0_xs.read_int("/test/n")
    assert str(info.value) == f"/test/n: expected an integer, found {ascii(value)}"


def test_a_value_that_is_no_utf8_is_read_with_replacement_characters(host, dom0_xs) -> None:
    """Another domain's value may be any bytes: read() gives what it can
    of them rather than fail on a UnicodeDecodeError."""
    _write_raw(host, "/test/raw", b"ok \xff\xfe end")
    assert dom0_xs.read("/test/raw") == "ok \ufffd\ufffd end"


def _write_raw(host, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` as another domain's client may: pyxs
    sends ASCII only."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(host.dom0.xenstore_path))
        sock.sendall(_packet(Op.WRITE, 1, 0, path.encode() + b"\0" + data))
        header = sock.recv(16, socket.MSG_WAITALL)
        op, _, _, length = struct.unpack("<4I", header)
        assert op == Op.WRITE, sock.recv(length, socket.MSG_WAITALL)
        sock.recv(length, socket.MSG_WAITALL)


@pytest.mark.parametrize(
    "value, text",
    [
        ("caf\u00e9", r"'\xe9' at offset 3 is not ASCII"),
        ("\ufffd", r"'\ufffd' at offset 0 is not ASCII"),
        ("two\nlines", r"'\n' at offset 3 is a control character"),
    ],
    ids=["latin-1", "replacement-character", "newline"],
)
def test_values_pyxs_cannot_send_are_refused_by_name(dom0_xs, value, text) -> None:
    with pytest.raises(ValueError) as info:
        dom0_xs.write("/test/v", value)
    assert str(info.value) == f"XenStore value for '/test/v' must be printable ASCII: {text}"
    assert dom0_xs.read("/test/v") is None  # nothing was sent
    dom0_xs.write("/test/v", "printable ASCII and \x7f go")
    assert dom0_xs.read("/test/v") == "printable ASCII and \x7f go"
    # NUL goes too (C readers, the kernel's xenbus among them, take it
    # for the value's end): XenStore keeps every byte.
    dom0_xs.write("/test/v", "before\0after")
    assert dom0_xs.read("/test/v") == "before\0after"


def test_a_value_can_be_emptied(dom0_xs) -> None:
    dom0_xs.write("/test/e", "full")
    dom0_xs.write("/test/e", "")
    assert dom0_xs.read("/test/e") == ""
    dom0_xs.write("/test/e", "full")
    dom0_xs.transaction(lambda t: t.write("/test/e", ""))
    assert dom0_xs.read("/test/e") == ""
    with pytest.raises(ValueError, match="invalid XenStore path '/bad path'"):
        dom0_xs.write("/bad path", "")


def test_requests_over_the_payload_limit_say_so(dom0_xs) -> None:
    # The limit is on "<path>\0<value>": this path leaves 4096 - 8 bytes.
    dom0_xs.write("/test/v", "x" * 4088)
    assert dom0_xs.read("/test/v") == "x" * 4088
    with pytest.raises(ValueError) as info:
        dom0_xs.write("/test/v", "x" * 4089)
    assert str(info.value) == (
        "XenStore value for '/test/v' is too long: 4089 bytes, but a WRITE "
        "to this node has room for 4088 in its 4096-byte payload"
    )
    with pytest.raises(ValueError, match=r"request for '/test/v' is too long: 6011 bytes"):
        dom0_xs.set_perms("/test/v", ["n0"] + ["r1"] * 2000)
    with pytest.raises(ValueError, match=r"invalid XenStore permission 'q1' for '/test/v'"):
        dom0_xs.set_perms("/test/v", ["q1"])
    assert dom0_xs.read("/test/v") == "x" * 4088 and dom0_xs.get_perms("/test/v") == ["n0"]


@pytest.mark.parametrize(("perms", "error", "text"), [
    ("n0", TypeError, r"permissions must be a sequence of str like \['n0', 'r5'\], not str"),
    (b"n0", TypeError, r"permissions must be a sequence of str like \['n0', 'r5'\], not bytes"),
    ([b"n0"], TypeError, r"permission b'n0' must be a str"),
    ([], ValueError, r"no permissions for '/test/p': the first one, the owner's, is needed"),
    # pyxs's check ends in "$", which lets a trailing newline through to
    # its payload check: a bare ValueError of the payload's parts.
    (["n0", "r1\n"], ValueError, r"invalid XenStore permission 'r1\\n' for '/test/p': "
                                 r"one of the letters w r b n and a domid, like 'r5'$"),
    # int() would take these digits; pyxs quoted their UTF-8 bytes.
    (["n\u0661"], ValueError, r"invalid XenStore permission 'n\\u0661' for '/test/p'"),
    # No letter: refused by this check, saying what one is, not pyxs's.
    (["n0", "5"], ValueError, r"invalid XenStore permission '5' for '/test/p': one of"),
    # XenStore's bare EINVAL before: a domid past a domid_t's range.
    (["n0", "r65536"], ValueError, r"invalid XenStore permission 'r65536' for '/test/p': "
                                   r"domid 65536 is past 65535 \(a domid_t\)$"),
    (["n99999999999999999999"], ValueError, r"permission 'n99999999999999999999' for "
                                            r"'/test/p': domid 99999999999999999999 is past"),
    # cxenstored reads "r010" with strtol() base 0, as domain 8: one
    # spelling per domain, plain decimal.
    (["n0", "r010"], ValueError, r"invalid XenStore permission 'r010' for '/test/p': "
                                 r"one of the letters w r b n and a domid, like 'r5'$"),
])
def test_set_perms_names_a_wrong_permission_list(dom0_xs, perms, error, text) -> None:
    """A str was taken letter by letter ("invalid XenStore permission
    b'n'"), bytes failed in .encode(), and [] came back as XenStore's bare
    EINVAL: each is named, and the node keeps its permissions."""
    dom0_xs.write("/test/p", "x")
    dom0_xs.set_perms("/test/p", ["n0", "r1"])
    with pytest.raises(error, match=text):
        dom0_xs.set_perms("/test/p", perms)
    assert dom0_xs.get_perms("/test/p") == ["n0", "r1"]


@pytest.mark.parametrize("perm", ["n" + "9" * 5000, "r1" + "0" * 4999])
def test_set_perms_shows_a_huge_domid_short(dom0_xs, perm) -> None:
    """A domid of thousands of digits is past a domid_t too: refused
    without int() of it (Python's own digit-limit ValueError), in a
    message that does not quote its 5000 digits twice."""
    dom0_xs.write("/test/p", "x")
    with pytest.raises(ValueError, match=r"^invalid XenStore permission '[nr][0-9]+\.\.\.[0-9]+' "
                                         r"for '/test/p': domid of 5000 digits is past 65535 "
                                         r"\(a domid_t\)$") as info:
        dom0_xs.set_perms("/test/p", ["n0", perm])
    assert len(str(info.value)) < 200
    assert dom0_xs.get_perms("/test/p") == ["n0"]


def test_guest_permissions_become_permission_error(host, dom0_xs) -> None:
    guest = host.create_domain("guest")
    dom0_xs.write("/secret", "x")
    dom0_xs.set_perms("/secret", ["n0"])
    assert dom0_xs.get_perms("/secret") == ["n0"]
    with XenStore(guest.xenstore()) as gxs:
        with pytest.raises(PermissionError):
            gxs.write("/secret", "y")
    assert dom0_xs.is_domain_introduced(guest.domid)
    host.destroy_domain(guest)
    assert not dom0_xs.is_domain_introduced(guest.domid)


def test_a_node_we_may_not_see_is_no_missing_node(host, dom0_xs) -> None:
    """exists(), ls() and rm() take a missing node for an answer (False,
    [], nothing to remove), but not a refusal: a driver domain must tell
    "gone" from "not ours to see", and a removal refused removed nothing."""
    guest = host.create_domain("guest")
    dom0_xs.write("/secret/child", "x")
    dom0_xs.set_perms("/secret/child", ["n0"])
    dom0_xs.set_perms("/secret", ["n0"])
    with XenStore(guest.xenstore()) as gxs:
        for op in (gxs.exists, gxs.ls, gxs.rm, gxs.read):
            with pytest.raises(PermissionError) as info:
                op("/secret")
            assert info.value.filename == "/secret"
    assert dom0_xs.read("/secret/child") == "x"


@pytest.mark.parametrize("domid", ["1", True, 1.5, None])
def test_domain_queries_take_an_int_domid(host, dom0_xs, domid) -> None:
    """A str domid went through as its text (get_domain_path("1") answered
    for domain 1), True or None as XenStore's EINVAL for '@domain/True':
    a domain id that is not an int is the caller's mistake, named."""
    for query in (dom0_xs.get_domain_path, dom0_xs.is_domain_introduced):
        with pytest.raises(TypeError, match=f"domid must be an int, not {type(domid).__name__}"):
            query(domid)


@pytest.mark.parametrize("domid", [65536, 99999, -1, 1 << 70])
def test_domain_queries_refuse_a_domid_out_of_range(dom0_xs, domid, monkeypatch) -> None:
    """XenStore's EINVAL for '@domain/-1' said nothing of why: a domid
    past a domid_t's 0..65535 is refused before anything is sent."""
    sent = []
    for name in ("get_domain_path", "is_domain_introduced"):
        monkeypatch.setattr(dom0_xs._client, name, lambda d, name=name: sent.append(name))
    for query in (dom0_xs.get_domain_path, dom0_xs.is_domain_introduced):
        with pytest.raises(ValueError,
                           match=rf"^domid must be 0 to 65535 \(a domid_t\), not {domid}$"):
            query(domid)
    assert sent == []


def test_domain_queries_and_perms_take_the_whole_domid_range(dom0_xs) -> None:
    # XenStore's own limits, not the hypervisor's reserved ids (DOMID_SELF
    # 0x7FF0 is introduced, as xenstored answers).
    assert dom0_xs.get_domain_path(65535) == "/local/domain/65535"
    assert dom0_xs.is_domain_introduced(0x7FF0)
    dom0_xs.write("/test/p", "x")
    dom0_xs.set_perms("/test/p", ["n0", "r65535"])
    assert dom0_xs.get_perms("/test/p") == ["n0", "r65535"]


def test_domain_queries_take_an_int_subclass(dom0_xs) -> None:
    """An IntEnum is a domid as it is a port (xenback._flags.is_int),
    sent as its number, not its name."""
    import enum

    class Dom(enum.IntEnum):
        GUEST = 3

    assert dom0_xs.get_domain_path(Dom.GUEST) == "/local/domain/3"


class _Named(int):
    """An int subclass whose str() is not its number (as a driver's own
    class may be): what pyxs sends, str(domid), would be its name."""

    def __str__(self) -> str:
        return "guest"


def test_domain_queries_send_the_number_of_any_int_subclass(host, dom0_xs) -> None:
    """The check's plain int is what is sent: an IntEnum's str() is its
    number since Python 3.11, but not every int subclass's."""
    guest = host.create_domain("guest")
    assert dom0_xs.get_domain_path(_Named(guest.domid)) == f"/local/domain/{guest.domid}"
    assert dom0_xs.is_domain_introduced(_Named(guest.domid)) is True


def test_an_int_subclass_is_written_and_awaited_as_its_number(dom0_xs) -> None:
    """write() sent str(value): an int subclass whose str() is its name
    was written as "guest", where wait_for() and the domain queries take
    it for its number.  Both use the number."""
    dom0_xs.write("/test/n", _Named(3))
    assert dom0_xs.read("/test/n") == "3"
    assert dom0_xs.wait_for("/test/n", _Named(3), timeout=TIMEOUT) == "3"
    dom0_xs.transaction(lambda t: t.write("/test/n", _Named(4)))
    assert dom0_xs.read("/test/n") == "4"


def test_pyxs_errors_without_a_usable_errno_are_named(dom0_xs, monkeypatch) -> None:
    """An error name XenStore sends that pyxs does not know comes as errno
    0 ("Success"): EIO.  A request pyxs refuses to build (a ValueError
    of its own) is the caller's ValueError, not an OSError of whatever
    number pyxs's exception happens to hold."""
    from pyxs.exceptions import InvalidOperation
    from pyxs.helpers import error

    def unknown(path):
        raise error(b"ENOSUCHERROR")

    monkeypatch.setattr(dom0_xs._client, "read", unknown)
    with pytest.raises(OSError) as info:
        dom0_xs.read("/test/x")
    assert info.value.errno == errno.EIO and info.value.filename == "/test/x"

    def unbuildable(path):
        raise InvalidOperation(99)

    monkeypatch.setattr(dom0_xs._client, "read", unbuildable)
    with pytest.raises(ValueError, match=r"^pyxs refused the request for '/test/x': "):
        dom0_xs.read("/test/x")


def test_domain_queries_raise_oserror_naming_the_domain(dom0_xs, monkeypatch) -> None:
    # As every other operation: an OSError with the errno, not pyxs's own.
    def refuse(domid):
        raise pyxs.PyXSError(errno.EINVAL)

    for name in ("get_domain_path", "is_domain_introduced"):
        monkeypatch.setattr(dom0_xs._client, name, refuse)
    for query in (dom0_xs.get_domain_path, dom0_xs.is_domain_introduced):
        with pytest.raises(OSError) as info:
            query(7)
        assert info.value.errno == errno.EINVAL
        assert info.value.filename == "@domain/7"


def test_transaction_is_rerun_on_conflict(host, dom0_xs) -> None:
    dom0_xs.write("/counter", 0)
    attempts = []

    def increment(t) -> int:
        value = t.read_int("/counter")
        attempts.append(value)
        if len(attempts) == 1:
            dom0_xs.write("/counter", 100)  # a concurrent writer: EAGAIN on commit
        t.write("/counter", value + 1)
        return value + 1

    assert dom0_xs.transaction(increment) == 101
    assert attempts == [0, 100]
    assert dom0_xs.read("/counter") == "101"

    def fail(t) -> None:
        t.write("/counter", 5)
        raise KeyError("no")

    with pytest.raises(KeyError):
        dom0_xs.transaction(fail)
    assert dom0_xs.read("/counter") == "101"  # rolled back


def test_transaction_is_rerun_when_its_function_meets_eagain(dom0_xs) -> None:
    """An EAGAIN raised inside the function (a nested XenStore call that
    conflicted) re-runs the whole transaction, as a failed commit does."""
    dom0_xs.write("/again", 0)
    runs = []

    def body(t) -> int:
        runs.append(t.read_int("/again"))
        t.write("/again", 1)
        if len(runs) == 1:
            raise BlockingIOError(errno.EAGAIN, "conflict under us")
        return len(runs)

    assert dom0_xs.transaction(body) == 2
    assert runs == [0, 0]  # the first attempt's write was rolled back
    assert dom0_xs.read("/again") == "1"


def test_a_transaction_on_a_closed_connection_is_not_connected(host) -> None:
    """As every request on it: "not connected", not "lost" (we closed
    it), and the function is not run."""
    xs = XenStore(host.dom0.xenstore())
    xs.open()
    xs.close()
    with pytest.raises(ConnectionError) as info:
        xs.transaction(lambda t: pytest.fail("run on a closed connection"))
    assert info.value.errno == errno.ENOTCONN
    assert info.value.strerror == "not connected to XenStore"
    assert info.value.filename == "@transaction"


def test_a_commit_refused_for_another_reason_is_raised(host) -> None:
    """A guest's commit that would exceed its node quota fails with
    ENOSPC: raised at once, not retried, and nothing is written."""
    guest = host.create_domain("quota")
    data = f"/local/domain/{guest.domid}/data"  # where a guest may write
    attempts = []
    with XenStore(guest.xenstore()) as gxs:

        def body(t) -> None:
            attempts.append(1)
            t.write(f"{data}/tx/a", 1)
            t.write(f"{data}/tx/b", 1)
            # Meanwhile the guest uses its quota up outside the transaction
            # (up to one node short: the two above do not fit any more).
            n = 0
            while True:
                try:
                    gxs.write(f"{data}/fill/{n // 100}/{n % 100}", 1)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
                n += 1
            gxs.rm(f"{data}/fill/0/0")

        with pytest.raises(OSError) as info:
            gxs.transaction(body)
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == "@transaction"
        assert attempts == [1]
        assert not gxs.exists(f"{data}/tx")
        gxs.rm(f"{data}/fill")
        gxs.transaction(lambda t: t.write(f"{data}/tx/a", 2))  # room again
        assert gxs.read(f"{data}/tx/a") == "2"


def test_a_transaction_start_waits_out_a_full_quota_for_a_while(host, monkeypatch) -> None:
    """A start refused because the domain holds its quota of open
    transactions (another process of it, say) is tried again, for
    TRANSACTION_QUOTA_WAIT seconds, then refused with ENOSPC; one that
    gets a slot meanwhile goes ahead."""
    import xenback.xenstore as xenstore_module
    from xenback.sim._xenstored import RawClient

    guest = host.create_domain("quota")
    node = f"/local/domain/{guest.domid}/data/tx"
    monkeypatch.setattr(xenstore_module, "TRANSACTION_QUOTA_WAIT", 0.05)
    with XenStore(guest.xenstore()) as gxs, RawClient(guest.xenstore_path) as other:
        held = [other.transaction_start() for _ in range(10)]
        with pytest.raises(OSError) as info:
            gxs.transaction(lambda t: t.write(node, "never"))
        assert info.value.errno == errno.ENOSPC
        assert gxs.read(node) is None
        other.transaction_end(held.pop(), commit=False)
        gxs.transaction(lambda t: t.write(node, "done"))
        assert gxs.read(node) == "done"
        for tx in held:
            other.transaction_end(tx, commit=False)


def test_a_transaction_start_goes_ahead_once_the_quota_has_room(host, monkeypatch) -> None:
    """A start refused for the quota is tried again: a slot freed after
    the first refusal lets the transaction through, without ENOSPC."""
    import xenback.xenstore as xenstore_module
    from xenback.sim._xenstored import RawClient

    guest = host.create_domain("quota")
    node = f"/local/domain/{guest.domid}/data/tx"
    real_begin = xenstore_module._begin
    refusals: list[int] = []
    with XenStore(guest.xenstore()) as gxs, RawClient(guest.xenstore_path) as other:
        held = [other.transaction_start() for _ in range(10)]

        def begin(client) -> None:
            try:
                real_begin(client)
            except pyxs.PyXSError as exc:
                refusals.append(exc.args[0])
                other.transaction_end(held.pop(), commit=False)  # room, now
                raise

        monkeypatch.setattr(xenstore_module, "_begin", begin)
        gxs.transaction(lambda t: t.write(node, "done"))
        assert refusals == [errno.ENOSPC]
        assert gxs.read(node) == "done"
        for tx in held:
            other.transaction_end(tx, commit=False)


def test_a_transaction_whose_function_fails_is_aborted(host) -> None:
    """Each failed run gives its transaction back: a guest may hold only
    Quota.transactions (10) open, so leaked ones would soon make every
    transaction of the domain fail with ENOSPC."""
    guest = host.create_domain("aborts")
    data = f"/local/domain/{guest.domid}/data"  # where a guest may write
    failures: list[Exception] = [ValueError("a bug in fn"), FileNotFoundError(errno.ENOENT, "gone")]
    with XenStore(guest.xenstore()) as gxs:
        for exc in failures * 11:

            def body(t, exc: Exception = exc) -> None:
                t.write(f"{data}/tx", "never")
                raise exc

            with pytest.raises(type(exc)):
                gxs.transaction(body)
        gxs.transaction(lambda t: t.write(f"{data}/tx", "done"))
        assert gxs.read(f"{data}/tx") == "done"


def test_transaction_gives_up_after_attempts(dom0_xs) -> None:
    dom0_xs.write("/hot", 0)
    runs: list[int] = []

    def always_conflicts(t) -> None:
        runs.append(len(runs))
        t.read("/hot")
        dom0_xs.write("/hot", 1)
        t.write("/hot", 2)

    with pytest.raises(OSError, match="still conflicting after 3 attempts") as info:
        dom0_xs.transaction(always_conflicts, attempts=3)
    # EAGAIN, as each conflict was: a caller may retry later.
    assert info.value.errno == errno.EAGAIN
    assert runs == [0, 1, 2]
    assert dom0_xs.read("/hot") == "1"


def test_wait_for(dom0_xs) -> None:
    dom0_xs.write("/w", "a")
    values: list[str | None] = []
    checked = threading.Event()

    def is_b(value: str | None) -> bool:
        values.append(value)
        checked.set()  # the watch is in place and "a" was read: now it waits
        return value == "b"

    def writer() -> None:
        if checked.wait(TIMEOUT):
            dom0_xs.write("/w", "b")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    assert dom0_xs.wait_for("/w", is_b, timeout=TIMEOUT) == "b"
    thread.join(TIMEOUT)
    assert values[0] == "a" and values[-1] == "b"  # it did wait for the change
    assert dom0_xs.wait_for("/w", "b", timeout=TIMEOUT) == "b"
    assert dom0_xs.wait_for("/w", timeout=TIMEOUT) == "b"
    assert dom0_xs.wait_for("/w2", lambda v: v is None, timeout=TIMEOUT) is None
    with pytest.raises(TimeoutError, match=r"/w2 did not become 'b' .* \(last value None\)"):
        dom0_xs.wait_for("/w2", "b", timeout=0.05)  # a missing node is no value
    with pytest.raises(TimeoutError, match=r"/w did not become 'c' .* \(last value 'b'\)"):
        dom0_xs.wait_for("/w", "c", timeout=0.05)


def test_wait_for_sees_a_change_made_as_it_reads(dom0_xs, monkeypatch) -> None:
    """A change whose watch event comes while wait_for() reads the node
    (after the read, before the wait) wakes it: not lost, leaving it to
    wait out its timeout with the value it wanted already there."""
    dom0_xs.write("/test/race", "old")
    fired = threading.Semaphore(0)
    real_watch, real_read = dom0_xs._watch, dom0_xs.read

    def watch(path, callback, *args, **kwargs):
        def told(event_path: str) -> None:
            callback(event_path)
            fired.release()  # after wait_for()'s own callback ran
        return real_watch(path, told, *args, **kwargs)

    reads: list[str | None] = []

    def read(path, default=None):
        value = real_read(path, default)
        reads.append(value)
        if len(reads) == 1:
            assert fired.acquire(timeout=TIMEOUT)  # the watch's first firing
            dom0_xs.write(path, "new")
            assert fired.acquire(timeout=TIMEOUT)  # and the change's
        return value

    monkeypatch.setattr(dom0_xs, "_watch", watch)
    monkeypatch.setattr(dom0_xs, "read", read)
    waiter = Attempt(lambda: dom0_xs.wait_for("/test/race", "new", timeout=OUTLASTS_THE_TEST))
    assert waiter.result(msg="wait_for() missed the change") == "new"
    assert reads == ["old", "new"]


def test_waking_the_waiters_has_each_test_its_predicate_again(dom0_xs) -> None:
    """A predicate that looks at more than the node (a flag another thread
    sets to give up the wait): wake_waiters() has the wait test it again
    at once, with no change of the node."""
    dom0_xs.write("/test/woken", "same")
    given_up = threading.Event()
    checked = threading.Semaphore(0)

    def done(value: str | None) -> bool:
        checked.release()
        return given_up.is_set()

    waiter = Attempt(lambda: dom0_xs.wait_for("/test/woken", done, timeout=OUTLASTS_THE_TEST))
    assert checked.acquire(timeout=TIMEOUT)  # read once, found wanting
    given_up.set()
    dom0_xs.wake_waiters()
    assert waiter.result(msg="the wait was not woken") == "same"


def test_wait_for_timeout_says_what_was_awaited(dom0_xs) -> None:
    """A frontend waiting for its backend's state learns from the
    TimeoutError which value it waited for, not only the last one seen."""
    from xenback import XenbusState

    dom0_xs.write("/s", XenbusState.CLOSING)
    with pytest.raises(TimeoutError,
                       match=r"^/s did not become '4' within 0.05 s \(last value '5'\)$"):
        dom0_xs.wait_for("/s", XenbusState.CONNECTED, timeout=0.05)
    with pytest.raises(TimeoutError,
                       match=r"^/none did not appear within 0.05 s \(last value None\)$"):
        dom0_xs.wait_for("/none", timeout=0.05)

    def backend_ready(value: str | None) -> bool:
        return False

    with pytest.raises(TimeoutError, match=r"^/s did not satisfy backend_ready within 0.05 s "):
        dom0_xs.wait_for("/s", backend_ready, timeout=0.05)


def test_wait_for_gives_its_watch_back(host) -> None:
    """Every wait_for() watches the node for its duration only: a guest has
    Quota.watches (128), which waits that kept theirs would use up."""
    guest = host.create_domain("waits")
    node = f"/local/domain/{guest.domid}/data/w"
    with XenStore(guest.xenstore()) as gxs:
        gxs.write(node, "x")
        for _ in range(70):
            assert gxs.wait_for(node, timeout=TIMEOUT) == "x"
            with pytest.raises(TimeoutError):
                gxs.wait_for(node, "y", timeout=0.001)
        gxs.watch(node, lambda _p: None).unwatch()  # room for a watch still


def test_a_removal_that_fails_unexpectedly_ends_the_wait_for_all_the_same(
        dom0_xs, monkeypatch) -> None:
    """The watch thread removes a wait_for()'s watch, and the wait_for()
    waits for it.  A removal failing with what it does not expect (a bug)
    is logged: it neither ends the watch thread, which would leave every
    watch silent and this wait_for() waiting for ever, nor the wait."""
    dom0_xs.write("/test/rm", "1")
    real_unwatch = XenStore._unwatch
    failures: list[str] = []

    def unwatch_once_broken(self: XenStore, w: Any) -> None:
        if not failures:
            failures.append(w.path)
            raise RuntimeError("a bug in the removal")
        real_unwatch(self, w)

    monkeypatch.setattr(XenStore, "_unwatch", unwatch_once_broken)
    waiter = Attempt(lambda: dom0_xs.wait_for("/test/rm", "1", timeout=TIMEOUT))
    assert waiter.result() == "1"
    assert failures == ["/test/rm"]
    fired = threading.Event()
    dom0_xs.watch("/test/rm2", lambda _p: fired.set())
    assert fired.wait(TIMEOUT)


@pytest.mark.parametrize("later", [1001.5, 1001.0], ids=["past", "at"])
def test_wait_for_raises_once_the_deadline_has_passed(dom0_xs, monkeypatch, later) -> None:
    """However little past the deadline the clock is, or at it, wait_for()
    raises rather than waiting on.  The clock is faked: from the second
    reading on it stays at ``later``."""
    import types

    import xenback.xenstore as xenstore_module

    readings = iter([1000.0])  # the deadline is 1001.0
    fake_time = types.SimpleNamespace(monotonic=lambda: next(readings, later))
    monkeypatch.setattr(xenstore_module, "time", fake_time)
    dom0_xs.write("/deadline", "a")
    waiter = Attempt(lambda: dom0_xs.wait_for("/deadline", "b", timeout=1.0))
    exc = waiter.result(msg="wait_for() went on waiting past its deadline")
    assert isinstance(exc, TimeoutError), exc


def test_a_signal_another_thread_took_interrupts_wait_for(dom0_xs) -> None:
    """The main thread in wait_for() runs a signal's handler soon, not at
    the timeout, whichever thread the kernel gave the signal to.  (The
    timeout outlasts the test: a wait the signal did not end is a test
    timeout.)"""
    def main_waits() -> bool:
        return main_thread_in("wait", path="threading") and main_thread_within("wait_for", depth=3)

    interrupt(main_waits, lambda: dom0_xs.wait_for("/never", "x", timeout=OUTLASTS_THE_TEST))
    assert not dom0_xs._waiters  # and it left nothing behind


def test_watches_on_an_event_queue_keep_order(host, wq) -> None:
    before = {t.ident for t in threading.enumerate()}
    seen: list[str] = []
    done = threading.Event()
    with XenStore(host.dom0.xenstore()) as xs:
        queue = EventQueue(wq, "test")
        lock = threading.Lock()
        running = []

        def callback(path: str) -> None:
            with lock:
                running.append(1)
                assert len(running) == 1, "two calls of one queue ran at once"
            seen.append(path)
            with lock:
                running.pop()
            if path == "/ord/99":
                done.set()

        watch = xs.watch("/ord", callback, events=queue)
        for i in range(100):
            xs.write(f"/ord/{i}", i)
        assert done.wait(TIMEOUT)
        queue.flush()
        assert seen[0] == "/ord"  # the first event of every new watch
        assert seen[-100:] == [f"/ord/{i}" for i in range(100)]
        # A second watch on the queue, left in place when the queue closes.
        xs.watch("/kept", callback, events=queue)
        handed_over(xs, "kept")
        queue.flush()
        assert seen[-1] == "/kept"
        watch.unwatch()
        xs.write("/ord/after", 1)
        handed_over(xs, "unwatched")
        queue.flush()
        assert "/ord/after" not in seen, "an event came after unwatch()"
        queue.close()
        assert queue.call(print) is False
        n = len(seen)
        xs.write("/kept/after", 2)
        handed_over(xs, "closed")
        wq.flush()
        assert seen[n:] == [], "a closed queue still delivered an event"
    assert not leaked_threads(before)


def test_event_queue_survives_a_failing_call(wq, caplog) -> None:
    queue = EventQueue(wq, "failing")
    out: list[int] = []
    queue.call(lambda: 1 / 0)
    for i in range(50):
        queue.call(out.append, i)
    queue.flush()
    assert out == list(range(50))
    assert "ZeroDivisionError" in caplog.text


def _hold(wq: Any, release: threading.Event) -> None:
    """Start an item on ``wq`` that holds it until ``release`` is set: on
    an ordered workqueue, what is queued meanwhile waits behind it."""
    from workqueue import Work

    started = threading.Event()

    def hold(_work: object) -> None:
        started.set()
        release.wait(TIMEOUT)

    wq.queue_work(Work(hold))
    assert started.wait(TIMEOUT)


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("raiser", ["call", "handled"])
def test_a_call_raising_past_exception_leaves_none_behind(caplog, exc, raiser) -> None:
    # What no "except Exception" takes ends the Work's run (the worker logs
    # it); the calls queued behind it must still run, not wait for the
    # next call() to queue the Work again.  An ordered workqueue busy with
    # another item keeps the queue's Work waiting until both calls are in.
    # The same from the ``handled`` hook, shown the call's own exception.
    from workqueue import alloc_ordered_workqueue

    def handled(_exc: Exception) -> bool:
        raise exc

    wq = alloc_ordered_workqueue("xb-exiting")
    try:
        if raiser == "call":
            queue = EventQueue(wq, "exiting")
        else:
            queue = EventQueue(wq, "exiting", handled=handled)
        out: list[int] = []
        release = threading.Event()


        def leave() -> None:
            if raiser == "call":
                raise exc
            raise ValueError("for the handled hook")

        _hold(wq, release)
        queue.call(leave)
        queue.call(out.append, 1)
        release.set()
        queue.flush()
        assert out == [1]
        assert exc.__name__ in caplog.text
    finally:
        release.set()
        wq.destroy()


def _flushing(queue: EventQueue) -> tuple[threading.Thread, threading.Event]:
    """``queue.flush()`` on a thread of its own, waiting by the time this
    returns (a flush begun only after a run ended past Exception would find
    the Work queued again, and wait for it as a right one does), and the
    event it sets once it returned."""
    flushed = threading.Event()
    flusher = threading.Thread(target=lambda: (queue.flush(), flushed.set()))
    flusher.start()
    assert eventually(lambda: queue._work._flushers is not None, TIMEOUT)
    return flusher, flushed


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
def test_a_flush_waits_for_the_calls_a_run_ended_past_exception_left(caplog, exc) -> None:
    # flush() waits for the queue's Work as it was queued when called; a
    # run ended by what no "except Exception" takes queues the Work anew
    # for the calls behind it, and flush() must wait for that run too.
    from workqueue import alloc_ordered_workqueue

    wq = alloc_ordered_workqueue("xb-flush-exiting")
    try:
        queue = EventQueue(wq, "exiting")
        release = threading.Event()
        second, gate = threading.Event(), threading.Event()
        out: list[int] = []


        def leave() -> None:
            raise exc

        def behind() -> None:
            second.set()
            gate.wait(TIMEOUT)
            out.append(1)

        _hold(wq, release)
        queue.call(leave)
        queue.call(behind)  # the same queueing of the Work as leave's
        flusher, flushed = _flushing(queue)
        release.set()
        assert second.wait(TIMEOUT)
        # The first run is over by now: a flush that waited for it alone
        # has returned.  Longer only makes this stricter.
        assert not flushed.wait(0.2), "flush() returned before a call queued before it ran"
        gate.set()
        assert flushed.wait(TIMEOUT)
        flusher.join(TIMEOUT)
        assert out == [1]
        assert exc.__name__ in caplog.text
    finally:
        release.set()
        gate.set()
        wq.destroy()


def test_a_flush_waits_for_a_run_ended_past_exception_after_a_call_cut_short(caplog) -> None:
    # A Ctrl-C landing anywhere in call() must leave flush()'s count of the
    # calls let in no lower than the calls in the queue: one too low let a
    # flush return as the run that SystemExit split ended, before the call
    # queued behind it ran.
    import os

    import xenback
    from tests.stolensignal import interrupted_at
    from workqueue import alloc_ordered_workqueue

    within = os.path.dirname(xenback.__file__)
    for n in itertools.count():
        wq = alloc_ordered_workqueue("xb-flush-cut-short")
        release, gate = threading.Event(), threading.Event()
        try:
            queue = EventQueue(wq, "cut-short")
            second = threading.Event()

            def leave() -> None:
                raise SystemExit

            def behind(second: threading.Event = second, gate: threading.Event = gate) -> None:
                second.set()
                gate.wait(TIMEOUT)

            _hold(wq, release)
            where = interrupted_at(n, within, lambda queue=queue: queue.call(lambda: None))
            if not where:
                break
            assert queue.call(leave) and queue.call(behind)
            # Its flush under way before the run that SystemExit ends.
            flusher, flushed = _flushing(queue)
            release.set()
            assert second.wait(TIMEOUT)
            assert not flushed.wait(0.2), f"flush() returned before a call queued before it ran" \
                f" (Ctrl-C {where})"
            gate.set()
            assert flushed.wait(TIMEOUT)
            flusher.join(TIMEOUT)
        finally:
            release.set()
            gate.set()
            wq.destroy()
    assert n > 2  # it landed somewhere


def test_a_flush_waits_across_every_run_that_exiting_calls_split(caplog) -> None:
    # Each call raising SystemExit ends a run and queues the next: flush()
    # waits for as many runs as it takes, not for two.
    from workqueue import alloc_ordered_workqueue

    wq = alloc_ordered_workqueue("xb-flush-exiting-twice")
    release = threading.Event()
    third, gate = threading.Event(), threading.Event()
    try:
        queue = EventQueue(wq, "exiting-twice")


        def leave() -> None:
            # Not before the flush waits for this run: one that came later
            # would wait for the next run at once, as a flush that waits
            # for two runs only would too.
            assert eventually(lambda: queue._work._flushers is not None, TIMEOUT)
            raise SystemExit

        def behind() -> None:
            third.set()
            gate.wait(TIMEOUT)

        _hold(wq, release)
        assert queue.call(leave) and queue.call(leave) and queue.call(behind)
        # Its flush under way before the first run that SystemExit ends.
        flusher, flushed = _flushing(queue)
        release.set()
        assert third.wait(TIMEOUT)
        assert not flushed.wait(0.2), "flush() returned before the third run ended"
        gate.set()
        assert flushed.wait(TIMEOUT)
        flusher.join(TIMEOUT)
    finally:
        release.set()
        gate.set()
        wq.destroy()


def test_a_flush_returns_when_nothing_will_run_the_calls_left() -> None:
    # A call whose Work its destroyed workqueue refused will never run:
    # flush() must not wait for it.
    from workqueue import alloc_ordered_workqueue

    wq = alloc_ordered_workqueue("xb-flush-refused")
    queue = EventQueue(wq, "refused")
    wq.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        queue.call(lambda: None)
    flushed = threading.Event()
    # A daemon: a flush that never returns must fail the test, not hang it.
    threading.Thread(target=lambda: (queue.flush(), flushed.set()), daemon=True).start()
    assert flushed.wait(TIMEOUT), "flush() waits for a call that nothing will run"


def test_a_call_its_workqueue_refuses_is_not_run_later() -> None:
    # call() raising says the call is not taken: a draining workqueue
    # refuses the queue's Work, and the call must not run when a later
    # call() queues the Work again.  It stayed in the queue, and did.
    from workqueue import alloc_ordered_workqueue

    wq = alloc_ordered_workqueue("xb-call-refused")
    try:
        queue = EventQueue(wq, "refused")
        release = threading.Event()
        ran: list[str] = []


        _hold(wq, release)
        drainer = threading.Thread(target=wq.drain)
        drainer.start()
        assert eventually(lambda: wq._state != 0)  # drain() has begun
        with pytest.raises(RuntimeError, match="draining"):
            queue.call(ran.append, "refused")
        release.set()
        drainer.join(TIMEOUT)
        assert not drainer.is_alive()
        assert queue.call(ran.append, "taken")
        queue.flush()
        assert ran == ["taken"]
    finally:
        release.set()
        wq.destroy()


def test_an_unnamed_event_queue_says_what_failed_all_the_same(wq, caplog) -> None:
    queue = EventQueue(wq)
    queue.call(lambda: 1 / 0)
    queue.flush()
    (record,) = [r for r in caplog.records if r.name == "xenback._eventqueue"]
    assert record.getMessage().startswith("event queue: callback <function ")


def test_a_call_may_flush_its_own_queue(wq, caplog) -> None:
    # Waiting for itself would never end: flush() from a call returns at
    # once, and the calls behind it run after it.
    queue = EventQueue(wq, "self-flushing")
    out: list[str] = []

    def call() -> None:
        assert queue.in_queue()
        queue.flush()
        out.append("flushed")

    queue.call(call)
    queue.call(out.append, "next")
    queue.flush()
    assert out == ["flushed", "next"]
    assert not queue.in_queue()
    assert "failed" not in caplog.text


def test_a_request_whose_reply_never_comes_fails(tmp_path) -> None:
    """XenStore closes the connection after reading a request: the caller
    gets an OSError instead of waiting forever for the reply."""
    import pyxs

    path = str(tmp_path / "xenstored")
    server = hang_up_after_one_request(path)
    outcome: list[BaseException | str | None] = []
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    xs.open()
    caller = threading.Thread(target=lambda: outcome.append(_try_read(xs)), daemon=True)
    caller.start()
    caller.join(TIMEOUT)
    assert not caller.is_alive(), "the read is still waiting for its reply"
    (exc,) = outcome
    assert isinstance(exc, OSError) and exc.errno == errno.ENOTCONN, exc
    assert not xs.connected  # already, whether connection_lost is set yet or not
    with pytest.raises(ConnectionError):
        xs.read("/again")
    assert xs.connection_lost.wait(TIMEOUT)
    xs.close()
    server.join(TIMEOUT)


def test_a_transaction_whose_start_is_never_answered_fails_as_a_lost_connection(
        tmp_path) -> None:
    """XenStore hangs up on a TRANSACTION_START: the router answers it
    ENOTCONN as it ends, which the start raises as ConnectionError, as a
    read does, not some other OSError (EIO) a caller would take for a
    refusal of this one request."""
    path = str(tmp_path / "xenstored")
    server = hang_up_after_one_request(path)
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    xs.open()
    ran: list[object] = []
    try:
        attempt = Attempt(lambda: xs.transaction(ran.append))
        exc = attempt.result(TIMEOUT, msg="the transaction still waits for its start")
        assert isinstance(exc, ConnectionError) and exc.errno == errno.ENOTCONN, repr(exc)
        assert not ran
    finally:
        xs.close()
        server.join(TIMEOUT)


def test_connection_lost_is_set_by_xenstore_not_by_close(host) -> None:
    closed = XenStore(host.dom0.xenstore())
    assert not closed.connected
    closed.open()
    assert closed.connected
    closed.close()
    assert not closed.connection_lost.is_set() and not closed.connected
    with XenStore(host.dom0.xenstore()) as xs:
        host.close()  # the host, and its XenStore, go away
        assert xs.connection_lost.wait(TIMEOUT)
        assert not xs.connected
        with pytest.raises(ConnectionError):
            xs.read("/local")
        # pyxs cannot connect its client again: said so, not "threads can
        # only be started once".
        with pytest.raises(RuntimeError, match="this XenStore connection was lost"):
            xs.open()


@pytest.mark.parametrize("where", ["request", "transaction"])
def test_a_socket_failing_under_pyxs_is_a_lost_connection(host, monkeypatch, where: str) -> None:
    # pyxs raises its ConnectionError from send() when the socket fails,
    # before its router thread has noticed: that is ENOTCONN, not EIO.
    import pyxs

    def broken(*_args: Any) -> None:
        raise pyxs.exceptions.ConnectionError("error while writing to socket: (32, 'EPIPE')")

    with XenStore(host.dom0.xenstore()) as xs:
        assert xs._client.router.is_connected
        if where == "request":
            monkeypatch.setattr(xs._client, "read", broken)
            with pytest.raises(ConnectionError) as info:
                xs.read("/local")
        else:  # as the transaction's start is sent, through the shared router
            monkeypatch.setattr(xs._client.router, "send", broken)
            with pytest.raises(ConnectionError) as info:
                xs.transaction(lambda t: t.read("/local"))
        assert info.value.errno == errno.ENOTCONN


def _request_as_the_connection_closes(
    xs: XenStore, monkeypatch: pytest.MonkeyPatch, where: str, at: str,
    close: Callable[[], object],
) -> BaseException | str | None:
    """What a request (a read, or a transaction) of ``xs`` comes to when its
    sender stops in its write (xenback.xenstore._write) before the line
    containing ``at``, and ``close()`` has the router close the connection
    meanwhile: at once without the rule, or waiting for the sender to be
    done with send_lock (see xenback.xenstore.adopt_router)."""
    import xenback.xenstore as xenstore

    router = xs._client.router
    real_write = xenstore._write
    pause = PauseAt(real_write, at)
    monkeypatch.setattr(xenstore, "_write",
                        lambda *args: pause.run(lambda: real_write(*args)))

    def request() -> str | None:
        if where == "request":
            return xs.read("/local")
        return xs.transaction(lambda t: t.read("/local"))

    caller = Attempt(request)
    try:
        assert pause.reached.wait(TIMEOUT)
        close()
        deadline = time.monotonic() + TIMEOUT
        while router.connection.is_connected and not stands_at(
                router.thread.ident, router.connection.close, "with send_lock"):
            assert time.monotonic() < deadline, "the router did not close the connection"
            time.sleep(0.001)
    finally:
        pause.resume()
    return caller.result()


@pytest.mark.parametrize("where", ["request", "transaction"])
def test_a_request_sent_as_the_router_closes_is_a_lost_connection(
    host, monkeypatch, where: str
) -> None:
    """pyxs's send() tests that the connection is open and then writes to
    its transport, which the router thread's close() sets to None: a
    request caught between the two (a driver's event callback as its
    XenStore connection closes; the xenbus fuzzer's seed 2747 met it) got
    pyxs's AttributeError.  It is a lost connection, as any other request
    of that moment."""
    xs = XenStore(host.dom0.xenstore())
    xs.open()
    closer = threading.Thread(target=xs.close, daemon=True)
    exc = _request_as_the_connection_closes(
        xs, monkeypatch, where, "view = memoryview(data)", closer.start)
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert isinstance(exc, ConnectionError) and exc.errno == errno.ENOTCONN, repr(exc)


@pytest.mark.parametrize("where", ["request", "transaction"])
def test_a_request_half_sent_as_xenstore_hangs_up_is_a_lost_connection(
    tmp_path, monkeypatch, where: str
) -> None:
    """pyxs's router closes the connection itself when a read finds it
    reset, which sets its transport to None; a sender between its
    header and its payload then met AttributeError (the xenbus fuzzer's
    seed 2882: a driver domain destroyed under a driver's request).  A
    request is one write now: the sender stops in front of it."""
    from tests.sim.hosthelpers import serve_one_client

    path = str(tmp_path / "xenstored")
    hang_up = threading.Event()
    server = serve_one_client(path, lambda _conn: hang_up.wait(TIMEOUT))

    def xenstored_hangs_up() -> None:
        hang_up.set()
        server.join(TIMEOUT)

    xs = XenStore(pyxs.Client(unix_socket_path=path))
    xs.open()
    exc = _request_as_the_connection_closes(
        xs, monkeypatch, where, "sent.extend(", xenstored_hangs_up)
    assert isinstance(exc, ConnectionError) and exc.errno == errno.ENOTCONN, repr(exc)
    xs.close()


def test_close_as_xenstore_hangs_up_is_quiet(tmp_path, monkeypatch) -> None:
    """close() asks pyxs's router to stop by writing to its terminator
    pair, if the connection is still up; XenStore hanging up between that
    test and the write has the router close the pair, and close() met a
    closed socket (EBADF).  Both mean the same: the connection is over."""
    import pyxs
    from pyxs.client import Router

    path = str(tmp_path / "xenstored")
    server = hang_up_after_one_request(path)
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    xs.open()
    router = xs._client.router
    pause = PauseAt.in_method(monkeypatch, Router, "terminate", "self.w_terminator.sendall")
    closer = Attempt(xs.close)
    assert pause.reached.wait(TIMEOUT)
    exc = _try_read(xs)  # the server hangs up on it
    assert isinstance(exc, ConnectionError), repr(exc)
    router.thread.join(TIMEOUT)
    assert not router.thread.is_alive()
    pause.resume()
    assert closer.result() is None
    server.join(TIMEOUT)


def test_close_raises_a_terminator_failure_while_still_connected(host) -> None:
    """Only a connection that is over makes a failing write to the
    terminator pair quiet (see above): with the connection still up, the
    router was never told to stop, and close() waiting for it would wait
    for ever.  It raises instead, and a later close() finishes the job."""
    xs = XenStore(host.dom0.xenstore())
    xs.open()
    router = xs._client.router
    real = router.w_terminator

    class _Failing:
        def sendall(self, _data: bytes) -> None:
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))

    router.w_terminator = _Failing()
    try:
        exc = Attempt(lambda: close_client(xs._client)).result(
            TIMEOUT, msg="close waits for a router it never told to stop")
        assert isinstance(exc, OSError) and exc.errno == errno.ENOBUFS, repr(exc)
        assert router.thread.is_alive() and xs.connected
    finally:
        router.w_terminator = real
    xs.close()
    assert not router.thread.is_alive()


def test_on_lost_is_told_instead_of_a_warning(host, caplog) -> None:
    told: list[Exception] = []
    seen = threading.Event()

    def on_lost(exc: Exception) -> None:
        told.append(exc)
        seen.set()

    with XenStore(host.dom0.xenstore(), on_lost=on_lost) as xs:
        # Answered once: one never answered ends as a refused one does.
        xs.read("/local")
        host.close()
        assert seen.wait(TIMEOUT)
        assert xs.connection_lost.is_set()  # set before on_lost runs
    (lost,) = told
    # pyxs says "error while reading from '<path>': (104,)" for an end of
    # file (it raises ECONNRESET with no text): what happened, in words.
    assert isinstance(lost, pyxs.exceptions.ConnectionError)
    assert str(lost) == "XenStore closed the connection"
    assert not [r for r in caplog.records if r.name == "xenback.xenstore"]


@pytest.mark.parametrize("end", ["lost", "closed"])
def test_wait_for_fails_as_soon_as_the_connection_ends(host, end: str) -> None:
    """The connection lost (the host gone), or close() from another thread
    (a backend shutting down): a wait_for() in progress ends at once with
    ConnectionError, not after its whole timeout with a TimeoutError."""
    xs = XenStore(host.dom0.xenstore())
    xs.open()
    try:
        checked = threading.Event()

        def never(_value: str | None) -> bool:
            checked.set()  # the watch is in place: wait_for goes on to wait
            return False

        waiter = Attempt(lambda: xs.wait_for("/never", never, timeout=600))
        assert checked.wait(TIMEOUT)
        # The event its watch fires as it is set may come after that first
        # read, and wake the wait as well as the end would (one more read
        # then failed at once).  Events of a connection come in order: once
        # a later watch's has come, so has the waiter's, and the waiter is
        # settled when it waits with no change left to see.
        (changed,) = xs._waiters
        fired = threading.Event()
        xs.watch("/never", lambda _path: fired.set())
        assert fired.wait(TIMEOUT)
        assert eventually(lambda: not changed.is_set() and stands_at(
            waiter.thread.ident, XenStore.wait_for, "changed.wait("), TIMEOUT)
        if end == "lost":
            host.close()
        else:
            xs.close()
        exc = waiter.result(msg="wait_for waits for its timeout")
        assert isinstance(exc, ConnectionError), exc
        assert not xs._waiters
    finally:
        xs.close()


def _open_past_fd_setsize(host: Any, filled: Filled, **kwargs: Any) -> XenStore:
    """An open XenStore whose router waits on descriptors past
    FD_SETSIZE only.  A thread of the host may close a low descriptor as
    the connection opens (its end of an earlier connection), which the
    connection or its router's wake-up pair then takes: refill, try again."""
    for _ in range(10):
        filled.refill()
        xs = XenStore(host.dom0.xenstore(), **kwargs)
        xs.open()
        router = xs._client.router
        if not router.connection.is_connected:
            return xs  # its router died already: the test's first request says why
        if past_fd_setsize(router.connection.fileno(), router.r_terminator.fileno()):
            return xs
        xs.close()
    pytest.fail("descriptors below FD_SETSIZE kept being freed")


def test_a_connection_past_fd_setsize_works(host) -> None:
    """A process holding 1024 descriptors (a backend serving hundreds of
    sockets) still talks to XenStore: select() would refuse its socket."""
    with descriptors_past_fd_setsize() as filled:
        with _open_past_fd_setsize(host, filled) as xs:
            xs.write("/fds/a", "1")
            assert xs.read("/fds/a") == "1"
            fired = threading.Event()

            def changed(path: str) -> None:
                if path == "/fds/w/x":  # not the first event, for /fds/w
                    fired.set()

            xs.watch("/fds/w", changed)
            xs.write("/fds/w/x", "1")
            assert fired.wait(TIMEOUT), "the watch did not fire"

            def move(t: Any) -> str | None:
                value = t.read("/fds/a")
                t.write("/fds/b", value)
                t.rm("/fds/a")
                return value

            assert xs.transaction(move) == "1"
            assert xs.read("/fds/a") is None and xs.read("/fds/b") == "1"
        assert not xs.connection_lost.is_set()  # close() ended it, not XenStore


def test_a_connection_past_fd_setsize_is_lost_as_any(host) -> None:
    told = threading.Event()
    with descriptors_past_fd_setsize() as filled:
        with _open_past_fd_setsize(host, filled, on_lost=lambda _exc: told.set()) as xs:
            xs.write("/fds/a", "1")
            host.close()
            assert told.wait(TIMEOUT)
            assert xs.connection_lost.is_set()
            with pytest.raises(ConnectionError):
                xs.read("/fds/a")


def _packet(op: int, rq_id: int, tx_id: int, payload: bytes) -> bytes:
    return struct.pack("<4I", op, rq_id, tx_id, len(payload)) + payload


@pytest.mark.parametrize(
    "answer",
    [
        # A reply to a request nobody sent.
        lambda rq_id, tx_id: _packet(Op.READ, rq_id + 1, tx_id, b"x"),
        # A watch event that is not "<path>\0<token>\0".
        lambda rq_id, tx_id: _packet(Op.WATCH_EVENT, 0, 0, b"/path\0token\0more\0"),
    ],
    ids=["stray-reply", "bad-watch-event"],
)
def test_a_packet_nobody_asked_for_ends_the_connection(tmp_path, answer) -> None:
    """As in pyxs's router: XenStore can no longer be trusted to answer,
    so the request waiting is answered ENOTCONN and on_lost is told."""
    import pyxs

    path = str(tmp_path / "xenstored")
    server = answer_one_request(path, answer)
    told: list[Exception] = []
    seen = threading.Event()

    def on_lost(exc: Exception) -> None:
        told.append(exc)
        seen.set()

    xs = XenStore(pyxs.Client(unix_socket_path=path), on_lost=on_lost)
    xs.open()
    try:
        # On a thread of its own: a packet let through leaves the read
        # waiting for ever (until the close below ends it).
        exc = Attempt(lambda: _try_read(xs)).result(
            msg="the read is still waiting: the packet was let through")
        assert isinstance(exc, OSError) and exc.errno == errno.ENOTCONN, exc
        assert seen.wait(TIMEOUT)  # after the waiting request was answered
        (lost,) = told
        assert isinstance(lost, pyxs.exceptions.UnexpectedPacket), lost
    finally:
        xs.close()
        server.join(TIMEOUT)
    assert not server.is_alive()  # the router hung up


def test_event_queue_close_waits_for_a_call_it_let_in(wq) -> None:
    # A call that has passed the closed check but not yet queued its work
    # (the watch thread preempted there) when close() and then the
    # workqueue's destroy() run: close() must wait for it, or the call
    # queues on a destroyed workqueue (a RuntimeError in the watch thread).
    queue = EventQueue(wq, "racing")
    checked, go = threading.Event(), threading.Event()
    real_queue_work = wq.queue_work

    def preempted_queue_work(work: Any) -> bool:
        checked.set()
        assert go.wait(TIMEOUT)
        return bool(real_queue_work(work))

    wq.queue_work = preempted_queue_work
    ran, failed = threading.Event(), []

    def caller() -> None:
        try:
            queue.call(ran.set)
        except BaseException as exc:
            failed.append(exc)

    threading.Thread(target=caller).start()
    assert checked.wait(TIMEOUT)
    closer = threading.Thread(target=queue.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "close() returned with a call on its way to the workqueue"
    go.set()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert ran.is_set() and not failed
    assert not queue.call(ran.set)  # closed


def test_event_queue_reports_a_lost_connection_without_a_traceback(wq, caplog) -> None:
    queue = EventQueue(wq, "lost")

    def gone() -> None:
        raise ConnectionError(107, "XenStore connection lost", "/local")

    def reset() -> None:  # a callback's own bug, not XenStore going away
        raise ConnectionResetError(104, "Connection reset by peer")

    queue.call(gone)
    queue.call(reset)
    queue.flush()
    lost, bug = [r for r in caplog.records if r.name == "xenback._eventqueue"]
    assert "XenStore connection lost" in lost.getMessage() and lost.exc_info is None
    assert "failed" in bug.getMessage() and bug.exc_info is not None


def test_event_queue_leaves_what_its_owner_handled_unlogged(wq, caplog) -> None:
    """``handled`` sees a failed call's exception first: what it takes is
    not logged; what it refuses, or fails on, is logged as without it,
    and the calls behind go on running either way."""
    seen: list[BaseException] = []

    def handled(exc: Exception) -> bool:
        seen.append(exc)
        if isinstance(exc, KeyError):
            raise RuntimeError("the handler's own bug")
        return isinstance(exc, PermissionError)

    queue = EventQueue(wq, "owned", handled=handled)
    out: list[int] = []

    def fail(exc: Exception) -> None:
        raise exc

    queue.call(fail, PermissionError(13, "Permission denied", "/local/domain/1"))
    queue.call(fail, ZeroDivisionError("a bug"))
    queue.call(fail, KeyError("another"))
    queue.call(out.append, 1)
    queue.flush()
    assert out == [1]
    assert [type(e) for e in seen] == [PermissionError, ZeroDivisionError, KeyError]
    logged = [r for r in caplog.records if r.name == "xenback._eventqueue"]
    assert [r.exc_info[0] for r in logged if r.exc_info] == [
        ZeroDivisionError, RuntimeError, KeyError]
    assert "Permission denied" not in caplog.text


def test_a_failing_watch_callback_silences_no_watch(dom0_xs, caplog) -> None:
    """Callbacks run on the one watch thread of the connection: one that
    raises is logged, and every watch (itself included) goes on firing."""
    seen: list[str] = []
    cond = threading.Condition()

    def bad(path: str) -> None:
        if path.startswith("/cb/bad/"):
            raise RuntimeError(f"cannot handle {path}")

    def good(path: str) -> None:
        with cond:
            seen.append(path)
            cond.notify_all()

    bad_watch = dom0_xs.watch("/cb/bad", bad)
    dom0_xs.watch("/cb/good", good)
    for i in range(3):
        dom0_xs.write(f"/cb/bad/{i}", i)
        dom0_xs.write(f"/cb/good/{i}", i)
    with cond:
        assert cond.wait_for(lambda: "/cb/good/2" in seen, TIMEOUT)
    assert seen == ["/cb/good"] + [f"/cb/good/{i}" for i in range(3)]
    failures = [r for r in caplog.records if r.getMessage() == "watch /cb/bad: callback failed"]
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == [
        f"cannot handle /cb/bad/{i}" for i in range(3)
    ]
    assert repr(bad_watch) == f"<Watch '/cb/bad' token={bad_watch.token!r}>"


def test_an_event_of_a_watch_just_removed_is_dropped(dom0_xs) -> None:
    """Events already queued when their watch is removed find no watch:
    the watch thread drops them and goes on serving the other watches."""
    import queue

    seen: queue.Queue[str] = queue.Queue()
    release = threading.Event()

    def blocking(path: str) -> None:
        seen.put(path)
        release.wait(TIMEOUT)  # holds the watch thread on its first event

    dom0_xs.watch("/stale/a", blocking)
    assert seen.get(timeout=TIMEOUT) == "/stale/a"
    b = dom0_xs.watch("/stale/b", lambda path: seen.put(f"b {path}"))
    # A later request's reply comes after b's first event: it is queued.
    dom0_xs.read("/stale")
    b.unwatch()
    release.set()
    dom0_xs.write("/stale/a", "again")
    assert seen.get(timeout=TIMEOUT) == "/stale/a"


def test_unwatch_after_the_connection_is_lost_is_quiet(host) -> None:
    """The watches went with the connection: removing one is no error."""
    with XenStore(host.dom0.xenstore()) as xs:
        w = xs.watch("/gone", lambda _path: None)
        host.close()
        assert xs.connection_lost.wait(TIMEOUT)
        w.unwatch()
        w.unwatch()


def test_a_watch_xenstore_refuses_is_not_kept(dom0_xs) -> None:
    """A watch XenStore (or pyxs) refused leaves nothing behind, and
    unwatch() of a removed watch is a no-op."""
    fired = threading.Event()
    watches = dict(dom0_xs._watches)
    with pytest.raises(ValueError, match="invalid XenStore path '/bad path'"):
        dom0_xs.watch("/bad path", lambda _p: fired.set())
    with pytest.raises(ValueError, match="invalid XenStore path '/bad path'"):
        dom0_xs.wait_for("/bad path", timeout=TIMEOUT)
    assert dom0_xs._watches == watches and dom0_xs._waiters == set()
    watch = dom0_xs.watch("/ok", lambda _p: None)
    watch.unwatch()
    watch.unwatch()  # idempotent
    assert dom0_xs._watches == watches
    dom0_xs.write("/ok/x", 1)
    assert dom0_xs.wait_for("/ok/x", "1", timeout=TIMEOUT) == "1"  # still usable
    assert not fired.is_set()


def _try_read(xs: XenStore) -> BaseException | str | None:
    try:
        return xs.read("/anything")
    except BaseException as exc:
        return exc


class _Told(list[Exception]):
    """An on_lost that keeps what it is told.  XenStore sets
    connection_lost before it calls on_lost (see XenStore()): a test that
    has waited for the event may look before anything is told, and waits
    for it with :meth:`one`."""

    def __init__(self) -> None:
        super().__init__()
        self._seen = threading.Event()

    def __call__(self, exc: Exception) -> None:
        self.append(exc)
        self._seen.set()

    def one(self) -> Exception:
        """What on_lost was told, once it has been told: one error only."""
        assert self._seen.wait(TIMEOUT), "on_lost was not told"
        (exc,) = self
        return exc


@pytest.mark.parametrize("callback", [None, "not a function"])
def test_a_callback_that_cannot_be_called_is_refused_at_once(dom0_xs, wq, callback) -> None:
    """watch() and EventQueue.call() take a callback that is run later, on
    another thread, where a TypeError would only be logged, once per event,
    far from the mistake: it is refused when given."""
    watches = dict(dom0_xs._watches)
    with pytest.raises(TypeError, match="callback must be callable, not (NoneType|str)"):
        dom0_xs.watch("/test/cb", callback)
    assert dom0_xs._watches == watches
    queue = EventQueue(wq, "callable")
    with pytest.raises(TypeError, match="callback must be callable, not (NoneType|str)"):
        queue.call(callback)
    assert queue._calls == deque()


def test_a_connection_never_made_closes_its_terminator_pair(tmp_path) -> None:
    """close() of a client whose connect failed (no xenstored there):
    no router thread ever ran to close pyxs's terminator socket pair, so
    close() does, or each failed attempt cost two descriptors."""
    xs = XenStore(pyxs.Client(unix_socket_path=str(tmp_path / "none")))
    with pytest.raises(ConnectionError) as info:
        xs.open()
    # The system's errno, kept from pyxs's error: no xenstored there.
    assert info.value.errno == errno.ENOENT, repr(info.value)
    router = xs._client.router
    xs.close()
    assert router.r_terminator.fileno() == -1 and router.w_terminator.fileno() == -1
    xs.close()  # again: the terminator pair, closed, is not written to


def test_a_connection_closed_leaves_no_descriptor_open(host) -> None:
    """The router polls a duplicate of the connection's descriptor (see
    xenback.xenstore._route): closing the connection must close it too,
    or every XenStore opened and closed kept one."""
    from tests.fdcensus import descriptors

    before = descriptors()
    for _ in range(3):
        with XenStore(host.dom0.xenstore()) as xs:
            assert xs.read("/local/domain/0/name") == "Domain-0"
    # The simulated XenStore closes its side of each as it sees it end.  (The
    # host may close some of its own meanwhile: only new ones count.)
    assert eventually(lambda: not descriptors() - before, TIMEOUT), descriptors() - before


def test_adopt_router_takes_a_router_that_never_ran_and_makes_it_a_daemon(host) -> None:
    """A router thread that has run cannot run again: adopting it says so
    at once.  The thread adopt_router() makes is a daemon's, as pyxs's
    is: a connection nobody closed must not keep the process alive."""
    from xenback.xenstore import adopt_router

    xs = XenStore(host.dom0.xenstore())
    xs.open()
    router = xs._client.router
    assert router.thread.daemon
    xs.close()
    with pytest.raises(RuntimeError, match="the router has run already"):
        adopt_router(router, lambda _exc: None, name="again")


def test_a_closed_connection_cannot_be_opened_again(host) -> None:
    """pyxs cannot reconnect a client (its router thread has run): open()
    after close() says so, not 'threads can only be started once'."""
    xs = XenStore(host.dom0.xenstore())
    xs.open()
    xs.open()  # already open: nothing to do
    assert xs.read("/local/domain/0/name") == "Domain-0"
    xs.close()
    for reopen in (xs.open, xs.__enter__):
        with pytest.raises(RuntimeError, match="XenStore connection was closed"):
            reopen()
    assert not xs.connected


@pytest.mark.parametrize(
    ("timeout", "error", "text"),
    [
        (None, TypeError, "timeout must be a number of seconds, not NoneType"),
        ("1", TypeError, "timeout must be a number of seconds, not str"),
        (float("nan"), ValueError, "timeout must be a number of seconds, not nan"),
    ],
)
@pytest.mark.timeout(30)
def test_wait_for_refuses_a_timeout_that_is_not_a_number(dom0_xs, timeout, error, text) -> None:
    """A NaN deadline is never reached, nor ever passed: wait_for spun
    for ever re-reading the node.  None failed in the deadline's sum."""
    watches = dict(dom0_xs._watches)
    with pytest.raises(error, match=text):
        dom0_xs.wait_for("/test/never", timeout=timeout)
    assert dom0_xs._watches == watches and dom0_xs._waiters == set()



@pytest.mark.parametrize(("attempts", "error"), [(0, ValueError), (-1, ValueError),
                                                 (1.5, TypeError), (True, TypeError)])
def test_transaction_needs_at_least_one_attempt(dom0_xs, attempts, error) -> None:
    ran: list[int] = []
    with pytest.raises(error, match="attempts must be"):
        dom0_xs.transaction(lambda t: ran.append(1), attempts=attempts)
    assert ran == []


@pytest.mark.parametrize("fn", [None, "/test/x", 5])
def test_a_transaction_function_that_cannot_be_called_is_refused_before_any_start(
    dom0_xs, monkeypatch, fn
) -> None:
    """transaction(None) started a transaction, failed calling None with
    "'NoneType' object is not callable", which names no argument, and
    ended it: two requests for nothing."""
    import xenback.xenstore as xenstore_module

    begun: list[object] = []
    monkeypatch.setattr(xenstore_module, "_begin_within_quota", begun.append)
    with pytest.raises(TypeError, match=f"^fn must be callable, not {type(fn).__name__}$"):
        dom0_xs.transaction(fn)
    assert begun == []


@pytest.mark.parametrize("path", ["/test/nul\0", "/test/nul\0\0", "/test/n\0ul"])
def test_a_path_with_a_nul_is_refused_before_anything_is_written(dom0_xs, path) -> None:
    """pyxs's path check lets one trailing NUL through, which then ends
    the path inside the request: write("/test/nul\\0", "x") wrote "\\0x"
    to /test/nul."""
    with pytest.raises(ValueError,
                       match=r"invalid XenStore path '/test/n.*': contains NUL at offset \d"):
        dom0_xs.write(path, "x")
    with pytest.raises(ValueError, match="contains NUL"):
        dom0_xs.transaction(lambda t: t.write(path, "x"))
    with pytest.raises(ValueError, match="contains NUL"):
        dom0_xs.write(path, "")
    for op in (dom0_xs.read, dom0_xs.exists, dom0_xs.mkdir, dom0_xs.rm):
        with pytest.raises(ValueError, match="contains NUL"):
            op(path)
    assert dom0_xs.ls("/test") == []


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty"),
        ("/test/a b", r"' ' at offset 7 is not a letter, a digit or one of - / _ @"),
        ("/test/a\n", r"'\\n' at offset 7 is not a letter, a digit or one of - / _ @"),
        ("/test/a.b", r"'.' at offset 7 is not a letter, a digit or one of - / _ @"),
        ("/test/caf\u00e9", r"'\\xe9' at offset 9 is not ASCII"),
        ("/test/a/", "ends with '/'"),
        ("/test//a", r"an empty component \('//'\) at offset 5"),
        ("//test", r"an empty component \('//'\) at offset 0"),
        ("/" + "a" * 3072, "3073 bytes long, over XenStore's limit of 3072"),
        ("a" * 2049, "2049 bytes long, over XenStore's limit of 2048 for a relative path"),
    ],
    ids=["empty", "space", "newline", "dot", "non-ascii", "trailing-slash",
         "double-slash", "leading-double-slash", "too-long", "relative-too-long"],
)
def test_an_invalid_path_is_refused_saying_why(dom0_xs, path, reason) -> None:
    """Each way a path can be wrong is named, for every operation; a
    newline got past pyxs's path check and then failed with a bare
    ValueError(payload), a long path was quoted whole."""
    for op in (dom0_xs.read, dom0_xs.exists, dom0_xs.ls, dom0_xs.mkdir, dom0_xs.rm,
               lambda p: dom0_xs.write(p, "x"), lambda p: dom0_xs.watch(p, lambda _p: None)):
        with pytest.raises(ValueError) as info:
            op(path)
        message = str(info.value)
        assert message.startswith("invalid XenStore path "), message
        assert re.search(f": {reason}$", message), message
        assert len(message) < 200, "the path is quoted in full"


def test_a_special_path_is_refused_but_by_watch_saying_why(dom0_xs, monkeypatch) -> None:
    """xenstore.txt: "@" paths name special watches, and xenstored
    refuses them in any other request.  They went to it all the same,
    and came back a bare EINVAL OSError, where every other path rule is a
    ValueError saying which; watch() refused an unknown one as pyxs did,
    with no reason."""
    # Every WATCH sent (the fixture made the monitor): wait_for() sends
    # none for a path it cannot read.
    sent: list[object] = []
    monitor_watch = dom0_xs._monitor.watch
    monkeypatch.setattr(dom0_xs._monitor, "watch",
                        lambda *args: (sent.append(args), monitor_watch(*args))[1])
    special = "@releaseDomain"
    for op in (dom0_xs.read, dom0_xs.read_int, dom0_xs.exists, dom0_xs.ls, dom0_xs.mkdir,
               dom0_xs.rm, lambda p: dom0_xs.write(p, "x"), lambda p: dom0_xs.write(p, ""),
               lambda p: dom0_xs.transaction(lambda t: t.read(p)),
               lambda p: dom0_xs.wait_for(p, timeout=TIMEOUT)):
        with pytest.raises(ValueError) as info:
            op(special)
        assert str(info.value) == (
            "invalid XenStore path '@releaseDomain': a special watch path (starts with "
            "'@'), which only watch(), get_perms() and set_perms() take"
        )
    assert sent == []  # wait_for() set none
    for op in (lambda p: dom0_xs.watch(p, lambda _p: None), dom0_xs.get_perms):
        with pytest.raises(ValueError) as info:
            op("@shutdownDomain")
        assert str(info.value) == (
            "invalid XenStore path '@shutdownDomain': the special watch paths are "
            "@introduceDomain and @releaseDomain"
        )
    # Long, it is still special, not relative.
    with pytest.raises(ValueError, match="the special watch paths are"):
        dom0_xs.watch("@" + "a" * 2048, lambda _p: None)
    dom0_xs.watch(special, lambda _p: None).unwatch()
    # Since XSA-115 they have permissions: who may watch them.
    dom0_xs.set_perms(special, ["n0", "r1"])
    assert dom0_xs.get_perms(special) == ["n0", "r1"]


def test_paths_as_long_as_xenstore_takes_are_sent(dom0_xs) -> None:
    """The limits are xenstored's, not shorter: a relative path of 2048
    bytes, and an absolute one of 2048 below a domain's home (longer than
    2048 in all, which only relative paths may not be)."""
    relative = "a" * 2048
    assert dom0_xs.read(relative) is None
    absolute = "/local/domain/0/" + "b" * 2048
    dom0_xs.write(absolute, "1")
    assert dom0_xs.read(absolute) == "1"
    dom0_xs.rm(absolute)


def test_the_root_and_the_longest_absolute_path_are_sent(dom0_xs) -> None:
    """"/" is the root, not a path ending in '/'; an absolute path of
    exactly XENSTORE_ABS_PATH_MAX bytes is xenstored's to judge (this one
    refuses it, EINVAL), not refused here as over the limit."""
    assert "local" in dom0_xs.ls("/")
    assert dom0_xs.exists("/")
    longest = "/local/domain/0/" + "c" * (3072 - len("/local/domain/0/"))
    with pytest.raises(OSError) as info:
        dom0_xs.write(longest, "1")
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("ending", ["commit", "abort"])
def test_a_transaction_cannot_be_used_once_it_has_ended(dom0_xs, ending) -> None:
    """pyxs resets a client's transaction id when it ends: a Transaction
    kept past its function went on working outside any transaction, its
    writes and removals applied at once, unchecked."""
    dom0_xs.write("/test/kept", "1")
    kept: list[Any] = []

    def fn(t) -> None:
        kept.append(t)
        if ending == "abort":
            raise KeyError("abort")

    with contextlib.suppress(KeyError):
        dom0_xs.transaction(fn)
    (t,) = kept
    for op in (lambda: t.read("/test/kept"), lambda: t.exists("/test/kept"),
               lambda: t.ls("/test"), lambda: t.write("/test/kept", "2"),
               lambda: t.rm("/test/kept"), lambda: t.mkdir("/test/new")):
        with pytest.raises(RuntimeError, match="transaction has ended"):
            op()
    assert dom0_xs.read("/test/kept") == "1"
    assert not dom0_xs.exists("/test/new")


def test_wait_for_on_the_watch_thread_is_refused(dom0_xs, wq) -> None:
    """wait_for() learns of changes from a watch, delivered on the watch
    thread: called from a watch callback running on that thread it could
    never see one, and timed out saying the node had not changed when it
    had.  It is refused at once; through an EventQueue it works."""
    outcome: list[object] = []
    done = threading.Event()

    def on_watch_thread(_path: str) -> None:
        if done.is_set():
            return
        try:
            # No time to wait: let through, it times out at once, and then
            # waits for ever for its own thread to remove its watch.
            outcome.append(dom0_xs.wait_for("/test/later", "1", timeout=0))
        except (RuntimeError, TimeoutError) as exc:
            outcome.append(str(exc))
        done.set()

    watches = dict(dom0_xs._watches)
    w = dom0_xs.watch("/test/trigger", on_watch_thread)
    if not done.wait(TIMEOUT):
        # Let the watch thread go, or the fixture's close() waits for it
        # for ever: the test fails here, not at the harness' timeout.
        for removal in list(dom0_xs._removals):
            removal.done.set()
        pytest.fail("wait_for() on the watch thread was let through: it waits for "
                    "the watch thread, itself, to remove its watch")
    w.unwatch()
    assert outcome == ["wait_for() from a watch callback run on the watch thread would "
                       "never see the change: give the watch an EventQueue"]
    assert dom0_xs._watches == watches and dom0_xs._waiters == set()

    queued = EventQueue(wq, "waits")
    seen: list[object] = []
    started = threading.Event()

    def on_queue(_path: str) -> None:
        if started.is_set():
            return
        started.set()
        seen.append(dom0_xs.wait_for("/test/later", "1", timeout=TIMEOUT))

    w = dom0_xs.watch("/test/trigger2", on_queue, events=queued)
    assert started.wait(TIMEOUT)
    dom0_xs.write("/test/later", "1")
    queued.flush()
    w.unwatch()
    assert seen == ["1"]


def test_a_watch_refuses_events_that_are_not_an_event_queue(dom0_xs, wq) -> None:
    """events= takes an EventQueue; a workqueue given instead (the likely
    mistake) was taken, and every event failed on the watch thread."""
    watches = dict(dom0_xs._watches)
    with pytest.raises(TypeError, match="events must be an EventQueue, not Workqueue"):
        dom0_xs.watch("/test/e", lambda _p: None, events=wq)
    assert dom0_xs._watches == watches


def test_wait_for_takes_a_number_as_write_does(dom0_xs) -> None:
    """write() takes an int for its decimal text; wait_for(path, 4), or
    wait_for(path, XenbusState.CONNECTED), failed with "'int' object is not
    callable" (an IntEnum, even after matching).  A number is waited for as
    its text; anything else that is not a predicate is named."""
    from xenback import XenbusState

    dom0_xs.write("/test/state", XenbusState.CONNECTED)
    assert dom0_xs.wait_for("/test/state", 4, timeout=TIMEOUT) == "4"
    assert dom0_xs.wait_for("/test/state", XenbusState.CONNECTED, timeout=TIMEOUT) == "4"
    for wrong in (True, 4.0, b"4"):
        with pytest.raises(TypeError, match="predicate must be a function, a str, an int or None"):
            dom0_xs.wait_for("/test/state", wrong, timeout=TIMEOUT)  # type: ignore[arg-type]
    assert dom0_xs._waiters == set()


def test_a_watch_on_a_connection_not_open_starts_no_thread(host) -> None:
    """watch() before open() (or after the connection was lost) failed
    with ConnectionError, but only after starting the watch thread, which
    then lived until a close() that a caller who never opened has no
    reason to call."""
    before = {t.ident for t in threading.enumerate()}
    xs = XenStore(host.dom0.xenstore())
    with pytest.raises(ConnectionError):
        xs.watch("/test/w", lambda _p: None)
    with pytest.raises(ConnectionError):
        xs.wait_for("/test/w", timeout=TIMEOUT)
    assert not leaked_threads(before)
    assert xs._watches == {} and xs._waiters == set()



def test_the_watches_of_a_connection_share_one_watch_thread(host) -> None:
    """Every watch of a connection is delivered by one watch thread (in
    the order XenStore sent the events: they come off one queue), and
    close() stops it.  With a thread per watch, each took events off
    that queue in any order, and close(), which wakes one thread, waited
    for another for ever: here it fails at a timeout instead."""
    before = {t.ident for t in threading.enumerate()}
    xs = XenStore.connect_to(host.dom0)
    try:
        fired = [threading.Event(), threading.Event()]
        for i, event in enumerate(fired):
            xs.watch(f"/test/one-thread/{i}", lambda _p, event=event: event.set())
        assert all(event.wait(TIMEOUT) for event in fired)  # each fires once, as it is set
        watchers = [t for t in threading.enumerate()
                    if t.ident not in before and t.name == "xenstore-watch"]
        assert watchers == [xs._thread], watchers
    finally:
        outcome = Attempt(xs.close).result(
            TIMEOUT, msg="close() did not return: it waits for a watch thread it did not stop")
        assert outcome is None, outcome
    assert not leaked_threads(before)


def test_a_watch_of_an_invalid_path_starts_no_thread(host) -> None:
    """watch() checked its path only as it sent the WATCH, after making
    the monitor and starting the watch thread: a connection whose first
    watch was refused kept a thread that had nothing to watch."""
    with XenStore(host.dom0.xenstore()) as xs:
        before = {t.ident for t in threading.enumerate()}  # the connection's own included
        for path in ("@shutdownDomain", "/bad path", "/test/w/", "", "@releaseDomain\n"):
            with pytest.raises(ValueError, match="invalid XenStore path"):
                xs.watch(path, lambda _p: None)
        assert xs._monitor is None and xs._thread is None
        assert not leaked_threads(before)
        assert xs._watches == {} and xs._client.router.monitors == {}
        # The connection still works, and so does a watch.
        fired = threading.Event()
        xs.watch("@releaseDomain", lambda _p: fired.set())
        assert fired.wait(TIMEOUT)


def test_a_request_on_a_connection_never_opened_is_not_connected(host) -> None:
    """A read before open() fails as one after the connection's loss
    does, ENOTCONN, whether its router was ever adopted or not."""
    xs = XenStore(host.dom0.xenstore())
    try:
        with pytest.raises(ConnectionError, match="not connected") as caught:
            xs.read("/test/r")
        assert caught.value.errno == errno.ENOTCONN
        with pytest.raises(ConnectionError, match="not connected"):
            xs.write("/test/r", "1")
        # Not "connection lost": there never was one.
        for query in (xs.get_domain_path, xs.is_domain_introduced):
            with pytest.raises(ConnectionError, match="not connected to XenStore") as caught:
                query(0)
            assert caught.value.errno == errno.ENOTCONN
    finally:
        xs.close()


def test_unwatch_as_the_connection_is_lost_is_quiet(host, monkeypatch) -> None:
    """unwatch() is quiet once the connection is lost, but one that found
    it up and sent UNWATCH as it went raised ConnectionError: from
    wait_for()'s finally, that replaced the value it had read."""
    xs = XenStore(host.dom0.xenstore())
    xs.open()
    w = xs.watch("/test/w", lambda _p: None)
    pause = PauseAt.in_method(monkeypatch, XenStore, "_unwatch", "self._do(")
    unwatcher = Attempt(w.unwatch)
    assert pause.reached.wait(TIMEOUT)
    host.close()
    assert xs.connection_lost.wait(TIMEOUT)
    pause.resume()
    assert unwatcher.result() is None
    xs.close()



def test_a_connection_a_sender_closes_ends_the_router(tmp_path, monkeypatch) -> None:
    """pyxs's send() closes the connection itself when a write finds it
    broken (EPIPE).  The router, between its test that the connection is
    up and its poll(), then polled a descriptor number that another file
    may take meanwhile: it waited on that file, for ever, and close()
    with it (terminate() wakes no router of a closed connection)."""
    import os

    import xenback.xenstore as xenstore
    from tests.sim.hosthelpers import serve_one_client

    path = str(tmp_path / "xenstored")
    server = serve_one_client(path, lambda _conn: None)  # hangs up at once
    real_route = xenstore._route
    pause = PauseAt(real_route, "poller.poll()")
    monkeypatch.setattr(xenstore, "_route", lambda router: pause.run(lambda: real_route(router)))
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    xs.open()
    assert pause.reached.wait(TIMEOUT)
    server.join(TIMEOUT)
    transport = xs._client.router.connection.transport
    number = transport.fileno()
    other, peer = socket.socketpair()

    def closed_and_taken() -> None:
        # Another file takes the number as the connection closes, in one
        # step (dup2): no other thread's file can get it in between.
        with contextlib.suppress(OSError):
            transport.sock.shutdown(socket.SHUT_RDWR)
        os.dup2(other.fileno(), number)
        transport.sock.detach()

    transport.close = closed_and_taken
    exc = _try_read(xs)  # EPIPE: pyxs closes the connection
    assert isinstance(exc, ConnectionError), repr(exc)
    try:
        assert transport.sock.fileno() == -1, "pyxs did not close the connection"
        pause.resume()
        lost = xs.connection_lost.wait(TIMEOUT)
        if not lost:
            peer.send(b"\0")  # lets the router go, to end the test
        assert lost, "the router waits on a file that is not its connection"
        xs.close()
    finally:
        if transport.sock.fileno() == -1:
            os.close(number)  # the test's duplicate of other
        other.close()
        peer.close()



def test_close_from_on_lost_is_quiet(host) -> None:
    """on_lost runs on pyxs's router thread as it ends: a close() from
    there (a daemon shutting down on the loss) had pyxs's terminate()
    join that very thread, a RuntimeError."""
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def on_lost(_exc: Exception) -> None:
        try:
            xs.close()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        done.set()

    xs = XenStore(host.dom0.xenstore(), on_lost=on_lost)
    xs.open()
    xs.watch("/test/w", lambda _p: None)  # a watch thread, for close() to stop
    host.close()
    assert done.wait(TIMEOUT)
    assert outcome == [None]
    xs._client.router.thread.join(TIMEOUT)
    assert not xs._client.router.thread.is_alive()
    xs.close()  # again, from here: it waits for what the first one started



def test_a_watch_racing_close_leaves_no_thread(host, monkeypatch) -> None:
    """watch() tests that the connection is up and then, under _lock,
    starts the watch thread if there is none: a close() in between had
    already taken the thread to stop, and the new one ran for ever."""
    before = {t.ident for t in threading.enumerate()}
    xs = XenStore(host.dom0.xenstore())
    xs.open()
    pause = PauseAt.in_method(monkeypatch, XenStore, "_watch", "with self._lock:")
    watcher = Attempt(lambda: xs.watch("/test/w", lambda _p: None))
    assert pause.reached.wait(TIMEOUT)
    xs.close()
    pause.resume()
    exc = watcher.result()
    assert isinstance(exc, ConnectionError), repr(exc)
    assert not leaked_threads(before)



def test_close_as_open_connects_leaves_nothing_open(host, monkeypatch) -> None:
    """close() while open() connects: close() found nothing connected
    yet and returned, then open() finished, leaving the connection, its
    descriptor and its router thread open for good."""
    xs = XenStore(host.dom0.xenstore())
    router = xs._client.router
    pause = PauseAt.in_method(monkeypatch, XenStore, "_open", "self._client.connect()")
    opener = Attempt(xs.open)
    assert pause.reached.wait(TIMEOUT)
    closer = Attempt(xs.close)
    _waits_for_a_lock_in_close(closer.thread)
    pause.resume()
    assert closer.result() is None
    exc = opener.result()
    assert not router.connection.is_connected, "open() left the connection open"
    assert not router.thread.is_alive()
    assert not xs.connected
    assert isinstance(exc, RuntimeError) and "closed" in str(exc), repr(exc)



def _waits_for_a_lock_in_close(thread: threading.Thread) -> bool:
    """Whether ``thread`` has returned from XenStore.close() or waits in it
    for the close in progress to end."""
    deadline = time.monotonic() + TIMEOUT
    while thread.is_alive() and not stands_at(thread.ident, XenStore.close, "self._closing"):
        assert time.monotonic() < deadline, "close() neither returned nor waited"
        time.sleep(0.001)
    return True



def _close_waiting_for_the_watch_thread(xs: XenStore) -> threading.Thread:
    """A thread running xs.close(), once it waits for the watch thread (a
    callback of which the test holds)."""
    first = threading.Thread(target=xs.close, daemon=True)
    first.start()
    deadline = time.monotonic() + TIMEOUT
    while not stands_at(first.ident, XenStore.close, "thread.join()"):
        assert time.monotonic() < deadline, "close() did not wait for the watch thread"
        time.sleep(0.001)
    return first


def test_a_second_close_returns_once_the_first_is_done(host) -> None:
    """Two threads closing at once (a driver's stop() and its owner's
    with): the second found the watch thread taken and the connection
    marked closed, and returned while the first still waited for a
    watch callback to end; no callback may run after close() returns."""
    xs = XenStore(host.dom0.xenstore())
    xs.open()
    running = threading.Event()
    release = threading.Event()

    def busy(_path: str) -> None:
        running.set()
        release.wait(TIMEOUT)

    xs.watch("/test/busy", busy)  # fires once at once
    assert running.wait(TIMEOUT)
    first = _close_waiting_for_the_watch_thread(xs)
    callback_ran: list[bool] = []

    def second_close() -> None:
        xs.close()
        callback_ran.append(not release.is_set())

    second = threading.Thread(target=second_close, daemon=True)
    second.start()
    _waits_for_a_lock_in_close(second)
    release.set()
    for thread in (first, second):
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert callback_ran == [False], "the second close() returned as a callback ran"


def _from_a_callback_another_close_waits_for(host, call: str) -> BaseException | None:
    """Call ``xs.<call>()`` from a watch callback while another thread's
    close() waits for the watch thread; what it raised (None: nothing).
    Both must return: the close() and the callback's call."""
    xs = XenStore(host.dom0.xenstore())
    xs.open()
    running = threading.Event()
    release = threading.Event()
    outcome: list[BaseException | None] = []

    def calling(_path: str) -> None:
        running.set()
        release.wait(TIMEOUT)
        try:
            getattr(xs, call)()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    xs.watch(f"/test/{call}", calling)
    assert running.wait(TIMEOUT)
    first = _close_waiting_for_the_watch_thread(xs)
    release.set()
    first.join(TIMEOUT)
    assert not first.is_alive(), f"close() and the callback's {call}() wait for each other"
    assert not xs._client.router.thread.is_alive()
    (raised,) = outcome
    return raised


def test_close_from_a_callback_another_close_waits_for(host) -> None:
    """A close() waits for the watch thread, and a second one for the
    first: a callback's own close() must wait for neither."""
    assert _from_a_callback_another_close_waits_for(host, "close") is None


def test_close_from_on_lost_and_from_a_callback_at_once(host) -> None:
    """A daemon closing its connection both from on_lost and from a watch
    callback: on_lost's close() waited for the watch thread, whose
    callback's close() had pyxs's terminate() wait for the router thread,
    on which on_lost was waiting."""
    running = threading.Event()
    release = threading.Event()
    closed: list[str] = []

    def close(where: str) -> None:
        xs.close()
        closed.append(where)

    def callback(_path: str) -> None:
        running.set()
        release.wait(TIMEOUT)
        close("callback")

    xs = XenStore(host.dom0.xenstore(), on_lost=lambda _exc: close("on_lost"))
    xs.open()
    xs.watch("/test/closing", callback)
    assert running.wait(TIMEOUT)
    router = xs._client.router.thread
    host.close()
    deadline = time.monotonic() + TIMEOUT
    # on_lost's close() in progress, waiting for the watch thread or not.
    while not closed and not stands_at(router.ident, XenStore.close, "thread.join()"):
        assert time.monotonic() < deadline, "on_lost was not called"
        time.sleep(0.001)
    release.set()
    router.join(TIMEOUT)
    assert not router.is_alive(), "on_lost's close() and the callback's wait for each other"
    xs.close()
    assert sorted(closed) == ["callback", "on_lost"]


def test_open_from_a_callback_another_close_waits_for(host) -> None:
    """open() waits for a close() in progress (to find it done), and that
    close() waits for the watch thread: an open() from a watch callback
    waited for a close() that waited for it.  It must fail at once, saying
    the connection is closing, and the close() return."""
    exc = _from_a_callback_another_close_waits_for(host, "open")
    assert isinstance(exc, RuntimeError) and "closing" in str(exc), repr(exc)


def test_open_from_on_lost_as_another_close_waits_for_it(host) -> None:
    """on_lost runs on the router thread, which a close() from another
    thread waits for, holding what open() waits for: an open() from
    on_lost (a daemon trying its connection again) hung both."""
    running = threading.Event()
    release = threading.Event()
    opened: list[BaseException | None] = []

    def on_lost(_exc: Exception) -> None:
        running.set()
        release.wait(TIMEOUT)
        try:
            xs.open()
            opened.append(None)
        except BaseException as exc:
            opened.append(exc)

    xs = XenStore(host.dom0.xenstore(), on_lost=on_lost)
    xs.open()
    host.close()
    assert running.wait(TIMEOUT)
    closer = threading.Thread(target=xs.close, daemon=True)
    closer.start()
    deadline = time.monotonic() + TIMEOUT
    while not stands_at(closer.ident, close_client, "client.close()"):
        assert time.monotonic() < deadline, "close() did not wait for the router thread"
        time.sleep(0.001)
    release.set()
    closer.join(TIMEOUT)
    assert not closer.is_alive(), "close() and on_lost's open() wait for each other"
    (exc,) = opened
    assert isinstance(exc, RuntimeError), repr(exc)
    assert "closing" in str(exc) or "lost" in str(exc), repr(exc)


def test_open_from_a_callback_of_an_open_connection_does_nothing(dom0_xs) -> None:
    """On the watch thread the connection is open already: open() there
    has nothing to do (as anywhere else), and says nothing."""
    opened: list[BaseException | None] = []
    done = threading.Event()

    def opening(_path: str) -> None:
        try:
            dom0_xs.open()
            opened.append(None)
        except BaseException as exc:
            opened.append(exc)
        done.set()

    w = dom0_xs.watch("/test/opening", opening)
    assert done.wait(TIMEOUT)
    w.unwatch()
    assert opened[0] is None
    assert dom0_xs.read("/local/domain/0/name") == "Domain-0"


def test_a_xenbus_connection_a_sender_closes_ends_the_router() -> None:
    """On XenBus (/dev/xen/xenbus) the transport's close() is a bare
    os.close(), with no shutdown() that would show on the duplicate of
    its descriptor the router polls: a sender closing the connection on
    a write failing with EPIPE left the router waiting on a file nothing
    would ever make readable, the loss untold, and close() waiting for
    the router (terminate() wakes no router of a closed connection)."""
    import os

    from pyxs.client import Router
    from pyxs.connection import XenBusConnection, _XenBusTransport

    import xenback.xenstore as xenstore

    ours, xenstored = socket.socketpair()  # xenstored: silent, never hangs up

    ours.shutdown(socket.SHUT_WR)  # writes fail with EPIPE; nothing to read

    class Transport(_XenBusTransport):
        def __init__(self) -> None:
            self.fd = os.dup(ours.fileno())

    class Connection(XenBusConnection):
        def create_transport(self) -> Transport:
            return Transport()

    xs = XenStore(pyxs.Client(router=Router(Connection("xenbus"))))
    xs.open()
    router = xs._client.router
    closer = threading.Thread(target=xs.close, daemon=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not stands_at(router.thread.ident, xenstore._route, "poller.poll()"):
            assert time.monotonic() < deadline, "the router does not wait"
            time.sleep(0.001)
        exc = _try_read(xs)  # EPIPE: pyxs closes the connection
        assert isinstance(exc, ConnectionError), repr(exc)
        assert xs.connection_lost.wait(TIMEOUT), "the router waits on a closed connection"
        closer.start()
        closer.join(TIMEOUT)
        assert not closer.is_alive(), "close() waits for the router"
    finally:
        if router.thread.is_alive():
            xenstored.send(b"\0")  # lets the router go, to end the test
        ours.close()
        xenstored.close()


def test_a_xenbus_connection_that_is_no_socket_closes_quietly() -> None:
    """XenBus (/dev/xen/xenbus) is a character device, not a socket: the
    shutdown the router gives its descriptor as it ends (for a write
    stuck on a socket) leaves it be.  Taken for a socket, it failed
    (ENOTSOCK) and the router ended before it closed the connection,
    the close() told as a lost connection.  A pipe stands in for it."""
    import os

    from pyxs.client import Router
    from pyxs.connection import XenBusConnection, _XenBusTransport

    device, other_end = os.pipe()

    class Transport(_XenBusTransport):
        def __init__(self) -> None:
            self.fd = device  # closed with the connection

    class Connection(XenBusConnection):
        def create_transport(self) -> Transport:
            return Transport()

    told = _Told()
    xs = XenStore(pyxs.Client(router=Router(Connection("xenbus"))), on_lost=told)
    try:
        xs.open()
        router = xs._client.router
        xs.close()
        assert not router.thread.is_alive()
        assert told == [] and not xs.connection_lost.is_set(), told
        assert not router.is_connected
    finally:
        os.close(other_end)


def test_close_ends_a_request_stuck_in_its_write(tmp_path) -> None:
    """A xenstored that stops reading (hung) leaves a sender blocked in
    its write, holding send_lock.  close() has the router close the
    connection, which shuts the socket down and so ends that write (with
    EPIPE): a router waiting for send_lock to close the connection waited
    for that very write, and close() with it."""
    import xenback.xenstore as xenstore
    from tests.sim.hosthelpers import serve_one_client

    path = str(tmp_path / "xenstored")
    release = threading.Event()
    # Reads nothing until the test ends (longer than close() may take).
    server = serve_one_client(path, lambda _conn: release.wait(3 * TIMEOUT))
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    xs.open()
    xs._client.router.connection.transport.sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the smallest: a few KiB
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            xs.write("/big", "x" * 4000)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    writers = [threading.Thread(target=write, daemon=True) for _ in range(8)]
    for writer in writers:
        writer.start()
    closer = threading.Thread(target=xs.close, daemon=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any(stands_at(writer.ident, xenstore._write, "sent.extend(")
                      for writer in writers if writer.ident is not None):
            assert time.monotonic() < deadline, "no write blocks"
            time.sleep(0.001)
        closer.start()
        closer.join(TIMEOUT)
        assert not closer.is_alive(), "close() waits for a write xenstored never reads"
        for writer in writers:
            writer.join(TIMEOUT)
            assert not writer.is_alive()
        assert all(isinstance(exc, ConnectionError) for exc in outcome), outcome
    finally:
        release.set()
        server.join(TIMEOUT)


def _opened_on_a_hang_up_router_paused(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
) -> tuple[threading.Thread, PauseAt, XenStore, _Told]:
    """A XenStore opened on a xenstored that hangs up at once, its router
    to pause just before it reads (so that a sender meets the hang-up
    first), and the list of what on_lost is told."""
    from pyxs.connection import PacketConnection

    from tests.sim.hosthelpers import serve_one_client

    path = str(tmp_path / "xenstored")
    server = serve_one_client(path, lambda _conn: None)  # hangs up at once
    pause = PauseAt.in_method(monkeypatch, PacketConnection, "recv",
                              "header = self.transport.recv(")
    told = _Told()
    xs = XenStore(pyxs.Client(unix_socket_path=path), on_lost=told)
    xs.open()
    return server, pause, xs, told


def test_a_read_a_sender_closes_under_is_a_lost_connection(tmp_path, monkeypatch) -> None:
    """xenstored hanging up wakes the router, whose read of the end of
    file races a sender whose write fails (EPIPE): pyxs's send() closes
    the connection, setting its transport to None between the router's
    test that it is up and its read.  on_lost was told of pyxs's
    AttributeError ("'NoneType' object has no attribute 'recv'") rather
    than of the connection lost."""
    server, pause, xs, told = _opened_on_a_hang_up_router_paused(tmp_path, monkeypatch)
    try:
        assert pause.reached.wait(TIMEOUT)
        exc = _try_read(xs)  # EPIPE: pyxs closes the connection
        assert isinstance(exc, ConnectionError), repr(exc)
    finally:
        pause.resume()
    assert xs.connection_lost.wait(TIMEOUT)
    lost = told.one()
    assert isinstance(lost, pyxs.exceptions.ConnectionError), repr(lost)
    xs.close()
    server.join(TIMEOUT)


def test_an_attribute_error_of_a_read_on_a_connection_still_up_is_told_as_it_is(
        host, monkeypatch) -> None:
    """Only a connection a sender closed makes the router's AttributeError
    a lost connection (above): with the connection still up it is a bug,
    and on_lost is told of it, not of a "not connected" that hides it."""
    told = _Told()
    xs = XenStore(host.dom0.xenstore(), on_lost=told)
    xs.open()
    try:
        # Answered once: no refusal, whose message would wrap the error.
        assert xs.read("/local/domain/0/name") == "Domain-0"

        def recv() -> None:
            raise AttributeError("a bug of the read itself")

        monkeypatch.setattr(xs._client.router.connection, "recv", recv)
        exc = _try_read(xs)  # its reply wakes the router, whose read fails
        assert isinstance(exc, ConnectionError), repr(exc)
        assert xs.connection_lost.wait(TIMEOUT)
        lost = told.one()
        assert isinstance(lost, AttributeError), repr(lost)
    finally:
        xs.close()


def test_open_retried_until_xenstored_comes_closes_as_any(tmp_path, caplog) -> None:
    """open() failing to connect leaves the client unconnected, to be
    opened again (a daemon waiting for xenstored to start).  Each attempt
    wrapped the connection's close() once more: past the recursion limit
    of attempts, the router's close() overflowed, and the connection
    ended as "lost: maximum recursion depth exceeded"."""
    import sys

    from tests.sim.hosthelpers import serve_one_client

    path = str(tmp_path / "xenstored")
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    for _ in range(sys.getrecursionlimit() + 1):
        with pytest.raises(ConnectionError, match="cannot connect to XenStore"):
            xs.open()
    # So does a ``with`` block that failed to connect: nothing to close.
    with pytest.raises(ConnectionError, match="cannot connect to XenStore"):
        with xs:
            pass
    server = serve_one_client(path, lambda conn: conn.recv(1))  # until we hang up
    xs.open()
    router = xs._client.router.thread
    xs.close()
    assert not router.is_alive()
    assert not xs.connection_lost.is_set()
    assert not [r for r in caplog.records if r.name == "xenback.xenstore"]
    server.join(TIMEOUT)


def _interrupted_request(xs: XenStore, n: int, within: str) -> str:
    """Where a Ctrl-C landed at the ``n``-th place in ``within`` of a WRITE
    of ``xs`` (see tests.stolensignal.interrupted_at): '' once past them."""
    from tests.stolensignal import interrupted_at

    return interrupted_at(n, within, lambda: xs.write("/test/ctrl-c", "x" * 64))


@pytest.mark.parametrize("platform", [None, "/tmp/run/xenstored/socket"], ids=["None", "str"])
def test_connect_to_names_a_platform_of_the_wrong_type(platform: object) -> None:
    # Used unchecked, it was "'str' object has no attribute 'xenstore'".
    with pytest.raises(TypeError, match=f"^platform must be a xenback.platform.Platform, "
                                        f"not {type(platform).__name__}$"):
        XenStore.connect_to(platform)  # type: ignore[arg-type]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("package", ["xenback", "pyxs"])
@pytest.mark.parametrize("how", ["open", "connect_to", "with"])
def test_an_open_interrupted_anywhere_leaves_nothing_open(host, package: str, how: str) -> None:
    """A Ctrl-C landing as any call of an open returns (in xenback's code
    or pyxs's): pyxs's router thread started and the connection up, but
    open() not yet saying so, so that close() found nothing to close (or
    connect_to() and ``with`` never handed it back), and the router
    thread ran for ever.  After it, close() leaves nothing open."""
    import importlib
    import os

    from tests.stolensignal import interrupted_at

    within = os.path.dirname(importlib.import_module(package).__file__ or "")
    landed: list[str] = []
    for n in itertools.count():
        before = {t.ident for t in threading.enumerate()}
        made: list[XenStore] = []
        # Once in the with block: a Ctrl-C in __exit__ is one in close().
        inside: list[bool] = []

        def opening(made: list[XenStore] = made, inside: list[bool] = inside) -> None:
            if how == "connect_to":
                made.append(XenStore.connect_to(host.dom0))
                return
            made.append(XenStore(host.dom0.xenstore()))
            if how == "open":
                made[0].open()
            else:
                with made[0]:
                    inside.append(True)

        where = interrupted_at(n, within, opening, unless=lambda inside=inside: bool(inside))
        if how == "open":  # close() is the caller's, and must undo it all
            for xs in made:
                xs.close()
        elif how == "connect_to":  # returned, and whole: closed by its caller
            for xs in made:
                assert xs.connected, f"interrupted {where}"
                xs.close()
        assert not leaked_threads(before), f"interrupted {where}: {leaked_threads(before)}"
        for xs in made:  # nor a socket left connected to XenStore
            if how != "with" or xs._client.router.thread.ident is not None:
                assert not xs._client.router.is_connected, f"interrupted {where}"
        if not where:
            break
        landed.append(where)
    assert len(landed) > 5, landed


def test_a_first_watch_interrupted_anywhere_leaves_what_close_removes(host) -> None:
    """A Ctrl-C landing as any call of a connection's first watch() returns:
    the watch was listed before the monitor it is removed with was made,
    and close() then failed on it (AttributeError), leaving the router
    thread running."""
    import os

    import xenback
    from tests.stolensignal import interrupted_at

    within = os.path.dirname(xenback.__file__)
    landed: list[str] = []
    for n in itertools.count():
        before = {t.ident for t in threading.enumerate()}
        xs = XenStore(host.dom0.xenstore())
        xs.open()
        where = interrupted_at(n, within, lambda xs=xs: xs.watch("/test/w", lambda _p: None))
        try:
            xs.close()
        except Exception as exc:
            raise AssertionError(f"interrupted {where}: close() failed: {exc!r}") from exc
        assert not leaked_threads(before), f"interrupted {where}: {leaked_threads(before)}"
        if not where:
            break
        landed.append(where)
    assert len(landed) > 5, landed


def _guest_connection_counts(host: Any) -> tuple[Any, XenStore, Callable[[], tuple[int, int]]]:
    """A guest, its XenStore connection, and what XenStore holds for it:
    (open transactions, watches), each within a quota for a guest."""
    guest = host.create_domain("guest")
    xs = XenStore.connect_to(guest)
    domain = host._xenstored._dispatcher.domains[guest.domid]

    def held() -> tuple[int, int]:
        # A request answered: XenStore has done those sent before it.
        xs.read(f"/local/domain/{guest.domid}/name")
        return domain.ntransactions, domain.nwatches

    return guest, xs, held


def _swept_leaving_nothing_held(
        host: Any, package: str, call: Callable[[Any, XenStore], object],
        after: Callable[[XenStore], None] = lambda _xs: None) -> list[str]:
    """Run ``call(guest, xs)`` on a guest's connection with a Ctrl-C
    landing as the n-th call within ``package``'s code returns, for n = 0,
    1, ... until one lands nowhere; after each run, ``after(xs)``, then
    XenStore must come to hold no transaction and no watch for the guest.
    Returns where the Ctrl-Cs landed."""
    import importlib

    from tests.stolensignal import interrupted_at

    guest, xs, held = _guest_connection_counts(host)
    within = os.path.dirname(importlib.import_module(package).__file__ or "")
    landed: list[str] = []
    try:
        while True:
            where = interrupted_at(len(landed), within, lambda: call(guest, xs))
            after(xs)
            assert eventually(lambda: held() == (0, 0), TIMEOUT), f"interrupted {where}: {held()}"
            if not where:
                return landed
            landed.append(where)
    finally:
        xs.close()


def _within_code(code: Any) -> bool:
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


@pytest.mark.timeout(300)
@pytest.mark.parametrize("package", ["xenback", "pyxs"])
def test_a_special_watch_interrupted_anywhere_leaves_none_at_xenstore(host, package: str) -> None:
    """A Ctrl-C landing as any call of watch("@releaseDomain") returns:
    once the WATCH may have gone, the watch is removed at XenStore too,
    by an UNWATCH whose path is as special as the WATCH's (refused as a
    path to read, it was never sent, and the watch stayed, counted
    against the guest's quota for the life of the connection)."""

    def unwatch_all(xs: XenStore) -> None:
        # Returned (or a Ctrl-C as it did): the caller's to remove.
        for w in list(xs._watches.values()):
            w.unwatch()

    landed = _swept_leaving_nothing_held(
        host, package, lambda _guest, xs: xs.watch("@releaseDomain", lambda _p: None),
        after=unwatch_all)
    assert len(landed) > 5, landed


@pytest.mark.timeout(300)
@pytest.mark.parametrize("package", ["xenback", "pyxs"])
def test_a_transaction_interrupted_anywhere_leaves_none_open(host, package: str) -> None:
    """A Ctrl-C landing as any call of transaction() returns (in xenback's
    code or pyxs's): as the start returned, or as the commit was about to
    go (pyxs forgets the id either way), the transaction stayed open for
    the life of the connection, and a guest, after ten of them
    (cxenstored's quota), could begin none (ENOSPC); and so did one
    landing while the start's request was in flight, whose id only its
    reply, read by nobody, told."""
    # The start's reply may come after the Ctrl-C: whoever ends the
    # transaction then does so by the time XenStore answers (the wait
    # for nothing held).
    landed = _swept_leaving_nothing_held(
        host, package, lambda guest, xs: xs.transaction(
            lambda t: t.write(f"/local/domain/{guest.domid}/data/tx", "x")))
    assert len(landed) > 10, landed
    if package == "xenback":
        assert any("commit" in where or "XenStore.transaction" in where for where in landed), landed




def test_a_transaction_start_given_up_before_its_reply_is_ended(
        host, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while the start of a transaction waits for its reply: the
    requester is gone by the time the reply tells the transaction's id,
    so the router ends it, which nobody else could, rather than leave it
    open for the life of the connection (and take it for the requester's,
    which has gone on)."""
    from xenback import xenstore

    guest, xs, held = _guest_connection_counts(host)
    node = f"/local/domain/{guest.domid}/data/tx"
    # The start's reply is held on the router thread until the requester
    # has given up on it.
    given_up = threading.Event()
    real_dispatch = xenstore._dispatch

    def dispatch(router: Any, packet: Any) -> None:
        if packet.op == Op.TRANSACTION_START:
            assert given_up.wait(TIMEOUT)
        real_dispatch(router, packet)

    monkeypatch.setattr(xenstore, "_dispatch", dispatch)
    real_get = xenstore._Reply.get
    waits: list[object] = []

    def get(reply: Any) -> Any:
        if not waits:
            waits.append(reply)
            raise KeyboardInterrupt  # as the first wait for a reply begins
        return real_get(reply)

    monkeypatch.setattr(xenstore._Reply, "get", get)
    try:
        with pytest.raises(KeyboardInterrupt):
            xs.transaction(lambda t: t.write(node, "x"))
        given_up.set()
        assert eventually(lambda: held() == (0, 0), TIMEOUT), held()
        assert xs.read(node) is None
        xs.transaction(lambda t: t.write(node, "y"))
        assert xs.read(node) == "y"
        assert held() == (0, 0)
    finally:
        given_up.set()
        xs.close()


def _start_given_up(monkeypatch: pytest.MonkeyPatch, *, refused: bool = False
                    ) -> Callable[[XenStore], None]:
    """A function that runs a transaction on a XenStore whose start is
    given up (a Ctrl-C as its requester begins to wait) before its reply,
    held on the router thread until then, is handed over (with
    ``refused``, as EAGAIN); it returns once the router is past that
    reply."""
    from xenback import xenstore

    given_up = threading.Event()
    dispatched = threading.Event()
    real_dispatch = xenstore._dispatch

    def dispatch(router: Any, packet: Any) -> None:
        start = packet.op == Op.TRANSACTION_START
        if start:
            assert given_up.wait(TIMEOUT)
            if refused:
                packet = packet._replace(op=Op.ERROR, payload=b"EAGAIN\0")
        real_dispatch(router, packet)
        if start:
            dispatched.set()

    monkeypatch.setattr(xenstore, "_dispatch", dispatch)
    real_get = xenstore._Reply.get

    def get(reply: Any) -> Any:
        monkeypatch.setattr(xenstore._Reply, "get", real_get)
        raise KeyboardInterrupt  # as the first wait for a reply begins

    monkeypatch.setattr(xenstore._Reply, "get", get)

    def give_up(xs: XenStore) -> None:
        try:
            with pytest.raises(KeyboardInterrupt):
                xs.transaction(lambda t: t.write("/test/tx", "x"))
        finally:
            given_up.set()
        assert dispatched.wait(TIMEOUT), "the router did not get past the start's reply"

    return give_up


def test_a_transaction_start_given_up_and_refused_sends_nothing_more(
        host, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, but XenStore refuses the start (EAGAIN): no transaction
    began, so the router has nothing to end, and sends no END for a
    transaction 0 that is nobody's."""
    give_up = _start_given_up(monkeypatch, refused=True)
    with XenStore(host.dom0.xenstore()) as xs:
        router = xs._client.router
        real_send = router.send
        ops: list[int] = []

        def send(packet: Any, rvar: Any = None) -> Any:
            ops.append(packet.op)
            return real_send(packet, rvar)

        monkeypatch.setattr(router, "send", send)
        give_up(xs)
        assert ops == [Op.TRANSACTION_START], ops
        assert xs.read("/test/tx") is None


def test_a_given_up_start_whose_end_cannot_be_sent_keeps_the_connection(
        host, monkeypatch: pytest.MonkeyPatch) -> None:
    """The router ends a transaction whose start was given up; if that
    END cannot be sent, the failure stays the router's to log: raised on
    the router thread, it would end the connection for everybody."""
    give_up = _start_given_up(monkeypatch)
    with XenStore(host.dom0.xenstore()) as xs:
        router = xs._client.router
        real_send = router.send

        def send(packet: Any, rvar: Any = None) -> Any:
            if packet.op == Op.TRANSACTION_END:
                raise pyxs.PyXSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
            return real_send(packet, rvar)

        monkeypatch.setattr(router, "send", send)
        give_up(xs)
        assert xs.read("/local/domain/0/name") == "Domain-0"
        assert not xs.connection_lost.is_set()


def test_a_commit_interrupted_as_its_reply_is_handed_over_waits_for_it(
        host, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C as the commit's reply, read already, is being handed to
    its requester: the commit went, and _commit must not go on before
    committed() has run (the toolstack's add_device() lists its device
    there).  The router unregisters a reply only once it is set; one
    unregistered first looked never sent (_Reply.outstanding), and
    _commit went on without it."""
    from xenback import xenstore

    pause = PauseAt(xenstore._dispatch, "rvar.set(packet)")
    real_dispatch = xenstore._dispatch

    def dispatch(router: Any, packet: Any) -> None:
        if packet.op == Op.TRANSACTION_END:
            pause.run(lambda: real_dispatch(router, packet))
        else:
            real_dispatch(router, packet)

    monkeypatch.setattr(xenstore, "_dispatch", dispatch)
    real_get = xenstore._Reply.get
    waits: list[object] = []

    def get(reply: Any) -> Any:
        waits.append(reply)
        if len(waits) == 1:
            assert pause.reached.wait(TIMEOUT)  # the reply is being handed over
            raise KeyboardInterrupt
        pause.resume()
        return real_get(reply)

    monkeypatch.setattr(xenstore._Reply, "get", get)
    committed: list[bool] = []
    with host.toolstack._client() as client:
        client.transaction()
        client.write(b"/test/commit", b"1")
        try:
            with pytest.raises(KeyboardInterrupt):
                xenstore._commit(client, lambda: committed.append(True))
            assert committed == [True], "_commit went on before its reply was handed over"
        finally:
            pause.resume()


def test_a_connection_that_ends_before_any_reply_is_said_refused(tmp_path) -> None:
    """XenStore hangs up on the first request, having said nothing on the
    connection: the request's error, and on_lost's, say that it refused
    the connection, not that an established one was lost."""
    import pyxs

    path = str(tmp_path / "xenstored")
    server = hang_up_after_one_request(path)
    lost = _Told()
    xs = XenStore(pyxs.Client(unix_socket_path=path), on_lost=lost)
    try:
        xs.open()
        exc = _try_read(xs)
        assert isinstance(exc, ConnectionError) and exc.errno == errno.ENOTCONN, repr(exc)
        assert "before its first reply" in str(exc)
        with pytest.raises(ConnectionError, match="before its first reply"):
            xs.read("/again")
        assert xs.connection_lost.wait(TIMEOUT)
        reported = lost.one()
        assert "before its first reply" in str(reported)
    finally:
        xs.close()
        server.join(TIMEOUT)



@pytest.mark.parametrize(("op", "payload", "tx_id"), [
    (Op.TRANSACTION_START, b"7\0", 7),
    (Op.TRANSACTION_START, b"4294967295\0", 0xFFFFFFFF),   # the largest id
    (Op.TRANSACTION_START, b"4294967296\0", 0),            # past 32 bits
    (Op.TRANSACTION_START, b"04294967295\0", 0),           # 11 digits
    (Op.TRANSACTION_START, b"-1\0", 0),
    (Op.TRANSACTION_START, b"\0", 0),
    (Op.ERROR, b"7\0", 0),
])
def test_the_id_of_a_started_transaction_is_a_32_bit_number(op, payload, tx_id) -> None:
    from pyxs._internal import Packet

    from xenback.xenstore import _started_id

    assert _started_id(Packet(op, payload, rq_id=1)) == tx_id


def test_a_transaction_start_answered_without_an_id_runs_nothing(tmp_path) -> None:
    """A reply to TRANSACTION_START that names no transaction: the body
    must not run, its writes outside any transaction."""
    import pyxs

    path = str(tmp_path / "xenstored")
    server = answer_one_request(path, lambda rq_id, tx_id: _packet(
        Op.TRANSACTION_START, rq_id, tx_id, b"not an id\0"))
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    xs.open()
    ran: list[object] = []

    def body(t: Any) -> None:
        ran.append(t)
        xs.close()  # or the commit would wait for a reply for ever

    try:
        with pytest.raises(OSError):
            xs.transaction(body)
        assert ran == []
    finally:
        xs.close()
        server.join(TIMEOUT)


def test_a_wait_for_over_keeps_nothing_for_close(dom0_xs) -> None:
    """What close() must end for a wait_for() in progress is let go of
    once it is over, whichever way."""
    dom0_xs.write("/test/kept", "1")
    assert dom0_xs.wait_for("/test/kept", "1", timeout=TIMEOUT) == "1"
    with pytest.raises(TimeoutError):
        dom0_xs.wait_for("/test/kept", "2", timeout=0.001)
    assert dom0_xs._removals == set() and dom0_xs._waiters == set()



def test_a_connection_closed_as_it_opens_is_said_refused(tmp_path, monkeypatch) -> None:
    """XenStore closes the connection as it accepts it, and pyxs's router
    dies before open() is done: open() says that XenStore refused it, not
    pyxs's "router died"."""
    import pyxs
    from pyxs.client import Router

    from tests.sim.hosthelpers import serve_one_client

    path = str(tmp_path / "xenstored")
    server = serve_one_client(path, lambda conn: None)  # accepted, closed
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    started = PauseAt.in_method(monkeypatch, Router, "start", "while not self.is_connected")
    opening = Attempt(xs.open)
    try:
        assert started.reached.wait(TIMEOUT)
        router = xs._client.router
        router.thread.join(TIMEOUT)
        assert not router.thread.is_alive()
    finally:
        started.resume()
    exc = opening.result()
    assert isinstance(exc, ConnectionError), repr(exc)
    assert "before its first reply" in str(exc) and "router died" not in str(exc)
    xs.close()
    server.join(TIMEOUT)



def test_close_ends_a_wait_for_removal_the_watch_thread_will_not_do(
        host, monkeypatch) -> None:
    """A wait_for() over hands its watch to the watch thread to remove and
    waits for that; but close() got there first, and the thread, told to
    stop before the removal was queued, stops without doing it.  close()
    ends the wait (the watch goes with the connection)."""
    xs = XenStore(host.dom0.xenstore())
    xs.open()
    calls: list[str] = []
    armed, held, hold = threading.Event(), threading.Event(), threading.Event()

    def blocking(path: str) -> None:
        calls.append(path)
        if armed.is_set():
            held.set()
            hold.wait(TIMEOUT)

    wait_for = XenStore.wait_for
    try:
        xs.watch("/test/blk", blocking)
        assert eventually(lambda: calls, TIMEOUT)  # the watch's first event
        armed.set()
        xs.write("/test/blk", "1")
        assert held.wait(TIMEOUT)  # the watch thread is busy
        over = PauseAt.in_method(monkeypatch, XenStore, "wait_for",
                                 "if watches and self._monitor is not None")
        waiter = Attempt(lambda: xs.wait_for("/test/w", "never", timeout=0.001))
        assert over.reached.wait(TIMEOUT)  # timed out, its watch set
        closer = Attempt(xs.close)
        assert eventually(lambda: stands_at(closer.thread.ident, XenStore.close,
                                            "thread.join()"), TIMEOUT)
        over.resume()  # queues its removal behind close()'s stop
        assert eventually(lambda: stands_at(waiter.thread.ident, wait_for,
                                            "while not removal.done.wait"), TIMEOUT)
    finally:
        hold.set()
    assert isinstance(waiter.result(), TimeoutError)
    assert closer.result() is None


class _FirstCtrlC(BaseException):
    """The Ctrl-C that starts a wait_for()'s clean-up, for a second one to
    land in."""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("package", ["xenback", "pyxs"])
@pytest.mark.parametrize("second", [False, True], ids=["once", "in-the-clean-up"])
def test_a_wait_for_interrupted_anywhere_leaves_no_watch(host, package: str, second: bool) -> None:
    """A Ctrl-C landing as any call of wait_for() returns (in xenback's
    code or pyxs's): once the WATCH had gone, watch() forgot the watch
    but XenStore kept it; as watch() returned, wait_for() never had it
    to remove; and in the removal (the value found, or a first Ctrl-C
    cutting the wait short), the watch, forgotten first, stayed at
    XenStore.  Each stayed for the life of the connection (a guest has
    128), firing for nobody."""
    import importlib

    from tests.stolensignal import interrupted_at

    guest, xs, held = _guest_connection_counts(host)
    node = f"/local/domain/{guest.domid}/data/w"
    xs.write(node, "1")
    within = os.path.dirname(importlib.import_module(package).__file__ or "")
    landed: list[str] = []
    try:
        for n in itertools.count():
            found: list[bool] = []

            def seen(value: str | None, found: list[bool] = found) -> bool:
                found.append(True)
                if second:
                    raise _FirstCtrlC
                return value == "1"

            def waiting(seen: Callable[[str | None], bool] = seen) -> None:
                with contextlib.suppress(_FirstCtrlC):
                    xs.wait_for(node, seen, timeout=TIMEOUT)

            # The second Ctrl-C lands only once the first has: in the
            # clean-up.
            where = interrupted_at(n, within, waiting,
                                   unless=lambda found=found: second and not found)
            # Interrupted, wait_for() may return before the watch thread
            # has removed its watch.
            assert eventually(lambda: held() == (0, 0) and not xs._client.router.monitors,
                              TIMEOUT), f"interrupted {where}"
            assert xs._watches == {}, f"interrupted {where}"
            if not where:
                break
            landed.append(where)
    finally:
        xs.close()
    if second and package == "pyxs":
        # The clean-up runs none of pyxs's code in the caller's thread.
        assert landed == [], landed
    else:
        assert len(landed) > (5 if second else 20), landed


@pytest.mark.timeout(300)
@pytest.mark.parametrize("package", ["xenback", "pyxs"])
def test_a_close_interrupted_anywhere_is_finished_by_the_next(host, package: str) -> None:
    """A Ctrl-C landing as any call of close() returns (in xenback's code
    or pyxs's), with a watch set: a later close() finishes the job, the
    watch thread and the router thread stopped, the connection and its
    watch gone from XenStore."""
    import importlib

    from tests.stolensignal import interrupted_at

    guest = host.create_domain("guest")
    domain = host._xenstored._dispatcher.domains[guest.domid]
    within = os.path.dirname(importlib.import_module(package).__file__ or "")
    landed: list[str] = []
    for n in itertools.count():
        before = {t.ident for t in threading.enumerate()}
        xs = XenStore.connect_to(guest)
        fired = threading.Event()
        xs.watch(f"/local/domain/{guest.domid}", lambda _p, fired=fired: fired.set())
        assert fired.wait(TIMEOUT)
        where = interrupted_at(n, within, xs.close)
        try:
            xs.close()
        except Exception as exc:
            raise AssertionError(f"interrupted {where}: close() failed: {exc!r}") from exc
        assert not leaked_threads(before), f"interrupted {where}: {leaked_threads(before)}"
        assert not xs._client.router.is_connected, f"interrupted {where}"
        assert eventually(lambda: not domain.conns and domain.nwatches == 0, TIMEOUT), \
            f"interrupted {where}"
        if not where:
            break
        landed.append(where)
    assert len(landed) > 10, landed


@pytest.mark.parametrize("package", ["pyxs", "xenback"])
def test_a_request_interrupted_half_sent_loses_the_connection(host, package: str) -> None:
    """A Ctrl-C between pyxs's writes of a request's header and payload
    left half a request on the connection, and the connection up: the
    next request's bytes were taken for the rest (or xenstored waited
    for it), and that request waited for ever.  A Ctrl-C landing anywhere
    in a request leaves the connection either up and framed, or lost,
    saying that a write was interrupted."""
    import importlib
    import os

    within = os.path.dirname(importlib.import_module(package).__file__ or "")
    landed: list[str] = []
    for n in itertools.count():
        told = _Told()
        xs = XenStore(host.dom0.xenstore(), on_lost=told)
        xs.open()
        try:
            where = _interrupted_request(xs, n, within)
            if not where:
                break
            landed.append(where)
            if xs.connected:
                reader = Attempt(functools.partial(xs.read, "/test/ctrl-c"))
                value = reader.result(msg=f"interrupted {where}: the next request hangs")
                assert value is None or value == "x" * 64, f"interrupted {where}: {value!r}"
                continue
            assert xs.connection_lost.wait(TIMEOUT), where
            exc = _try_read(xs)
            assert isinstance(exc, ConnectionError) and exc.errno == errno.ENOTCONN, where
            reason = told.one()
            assert "interrupted" in str(reason), f"interrupted {where}: {reason!r}"
            # Lost for part of a request only: none, or all, keeps it framed.
            went = re.search(r"after (\d+) of (\d+) bytes", str(reason))
            assert went and 0 < int(went[1]) < int(went[2]), f"interrupted {where}: {reason!r}"
        finally:
            xs.close()
    assert len(landed) > 10, landed


def test_a_first_request_interrupted_half_sent_is_not_said_refused(
        host, monkeypatch) -> None:
    """The first request of a connection, cut mid-write by our own Ctrl-C:
    the connection is lost, but XenStore refused nothing.  It was said to
    have ("closed the connection before its first reply: it refused
    it"), to on_lost and to the requests after, sending whoever reads the
    log to count the domain's connections."""
    from xenback import xenstore

    class Interrupted(BaseException):
        pass

    def half_then_interrupted(fd: int, data: bytes, sent: list[int]) -> None:
        sent.append(os.write(fd, data[:8]))
        raise Interrupted

    told = _Told()
    xs = XenStore(host.dom0.xenstore(), on_lost=told)
    xs.open()
    try:
        monkeypatch.setattr(xenstore, "_write", half_then_interrupted)
        with pytest.raises(Interrupted):
            xs.write("/test/ctrl-c", "x")
        monkeypatch.undo()
        assert xs.connection_lost.wait(TIMEOUT)
        reason = told.one()
        assert "interrupted after 8 of" in str(reason), repr(reason)
        assert "refused" not in str(reason), repr(reason)
        exc = _try_read(xs)
        assert isinstance(exc, ConnectionError) and exc.errno == errno.ENOTCONN, repr(exc)
        assert "refused" not in str(exc), repr(exc)
    finally:
        xs.close()


def test_a_request_interrupted_in_a_partial_write_loses_the_connection(tmp_path) -> None:
    """Ctrl-C as a write to a xenstored slow to read has sent part of a
    request: the rest is never sent, and the connection, which can no
    longer be framed, must be lost, not left up."""
    import fcntl
    import signal
    import termios

    path = str(tmp_path / "xenstored")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    told = _Told()
    xs = XenStore(pyxs.Client(unix_socket_path=path), on_lost=told)
    xs.open()
    xenstored, _ = listener.accept()
    listener.close()
    sock = xs._client.router.connection.transport.sock
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the smallest: a few KiB
    chunk = b"\0" * 1000
    filled = 0
    with contextlib.suppress(BlockingIOError):
        while True:  # xenstored reads nothing yet: fill what it has to read
            filled += sock.send(chunk, socket.MSG_DONTWAIT)

    def queued() -> int:
        buf = bytearray(4)
        fcntl.ioctl(xenstored, termios.FIONREAD, buf)
        return int.from_bytes(buf, "little")

    class Interrupted(BaseException):
        pass

    def handler(_signum: int, _frame: Any) -> None:
        raise Interrupted

    main = threading.main_thread().ident
    assert main == threading.get_ident()

    # Room for part of the request.  Made before the write: once a writer
    # sleeps, a socket wakes it only when most of its buffer is free.
    xenstored.recv(len(chunk), socket.MSG_WAITALL)
    before = filled - len(chunk)
    request = 16 + len("/big\0") + 4000

    def interrupt_once_part_went() -> None:
        deadline = time.monotonic() + TIMEOUT
        while queued() <= before and time.monotonic() < deadline:
            time.sleep(0.001)
        signal.pthread_kill(main, signal.SIGUSR1)  # type: ignore[arg-type]

    old = signal.signal(signal.SIGUSR1, handler)
    interrupter = threading.Thread(target=interrupt_once_part_went, daemon=True)
    try:
        interrupter.start()
        with pytest.raises(Interrupted):
            xs.write("/big", "x" * 4000)
    finally:
        interrupter.join(TIMEOUT)
        signal.signal(signal.SIGUSR1, old)
    try:
        went = queued() - before
        if not 0 < went < request:
            pytest.skip(f"{went} of the {request} bytes went: this kernel buffers otherwise")
        assert xs.connection_lost.wait(TIMEOUT), "the connection is up with half a request on it"
        exc = _try_read(xs)
        assert isinstance(exc, ConnectionError) and exc.errno == errno.ENOTCONN, repr(exc)
        reason = told.one()
        assert "interrupted" in str(reason), repr(reason)
    finally:
        xs.close()
        xenstored.close()


def test_two_opens_at_once_open_one_connection(host, monkeypatch) -> None:
    """Two threads opening one XenStore at once (a driver's start() and
    its owner's with) both adopted the router and both connected: the
    second socket replaced the first under a router still polling the
    first, so that no reply was ever read, and the first socket leaked."""
    from pyxs.connection import PacketConnection

    before = {t.ident for t in threading.enumerate()}
    xs = XenStore(host.dom0.xenstore())
    pause = PauseAt.in_method(monkeypatch, PacketConnection, "connect",
                              "self.transport = self.create_transport()")
    first = Attempt(xs.open)
    assert pause.reached.wait(TIMEOUT)
    second = Attempt(xs.open)
    deadline = time.monotonic() + TIMEOUT
    # Done, or waiting for the first: whichever, let the first go on.
    while second.thread.is_alive() and not stands_at(
            second.thread.ident, XenStore.open, "with self._closing:"):
        assert time.monotonic() < deadline, "the second open() neither returned nor waited"
        time.sleep(0.001)
    pause.resume()
    assert first.result() is None and second.result() is None
    try:
        reader = Attempt(lambda: xs.read("/local/domain/0/name"))
        assert reader.result(msg="no reply is read") == "Domain-0"
    finally:
        xs.close()
    assert not leaked_threads(before)


def _serve_reads(path: str, count: int) -> tuple[threading.Thread, list[int]]:
    """A xenstored at ``path`` that reads ``count`` READ requests, and only
    then answers each with its own path for a value; the thread serving
    it, and the request ids it has read so far."""
    ids: list[int] = []

    def handle(conn: socket.socket) -> None:
        requests = []
        for _ in range(count):
            op, rq_id, tx_id, size = struct.unpack("<4I", conn.recv(16, socket.MSG_WAITALL))
            requests.append((op, rq_id, tx_id, conn.recv(size, socket.MSG_WAITALL)))
            ids.append(rq_id)
        for op, rq_id, tx_id, payload in requests:
            conn.sendall(_packet(op, rq_id, tx_id, payload.rstrip(b"\0")))
        while conn.recv(4096):  # until we hang up
            pass

    from tests.sim.hosthelpers import serve_one_client

    return serve_one_client(path, handle), ids


def _read_count(ids: list[int], count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while len(ids) < count:
        assert time.monotonic() < deadline, f"xenstored read {len(ids)} requests, not {count}"
        time.sleep(0.001)


def test_request_ids_wrap_within_32_bits_past_those_in_use(tmp_path, monkeypatch) -> None:
    """pyxs's request ids wrap at sys.maxsize: a process's 2**32nd request
    failed to pack (xenstored's req_id is a u32).  Ids wrap within 32 bits
    and skip those of requests still waiting for their replies."""
    import pyxs._internal

    monkeypatch.setattr(pyxs._internal, "_rq_id", 2**32 - 2)  # pyxs's next: 2**32 - 1
    path = str(tmp_path / "xenstored")
    server, ids = _serve_reads(path, 3)
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    xs.open()
    try:
        router = xs._client.router
        router.last_rq_id = 2**32 - 2
        readers = []
        for i, name in enumerate("ab"):
            readers.append(Attempt(functools.partial(xs.read, f"/{name}")))
            _read_count(ids, i + 1)
        router.last_rq_id = 2**32 - 2  # as if 2**32 requests had gone since
        readers.append(Attempt(functools.partial(xs.read, "/c")))
        assert [r.result() for r in readers] == ["/a", "/b", "/c"]
        assert ids == [2**32 - 1, 0, 1]
    finally:
        xs.close()
        server.join(TIMEOUT)


def test_requests_of_threads_at_once_get_ids_of_their_own(tmp_path, monkeypatch) -> None:
    """pyxs's id counter has no lock: a thread between its increment and
    its modulo, another thread's request took the id it was about to
    return, and two requests waited under one id, one of them for ever."""
    import pyxs._internal

    path = str(tmp_path / "xenstored")
    server, ids = _serve_reads(path, 2)
    real = pyxs._internal.next_rq_id
    pause = PauseAt(real, "_rq_id %= sys.maxsize")
    monkeypatch.setattr(pyxs.client, "next_rq_id", lambda: pause.run(real))
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    xs.open()
    try:
        first = Attempt(lambda: xs.read("/a"))
        assert pause.reached.wait(TIMEOUT)
        second = Attempt(lambda: xs.read("/b"))
        _read_count(ids, 1)
        pause.resume()
        assert first.result() == "/a" and second.result() == "/b"
        assert len(set(ids)) == 2, ids
    finally:
        xs.close()
        server.join(TIMEOUT)


def test_a_watch_xenstore_refuses_leaves_no_subscription(tmp_path) -> None:
    """pyxs subscribes a watch's token to the router before it asks
    XenStore: a WATCH refused (a quota: ENOSPC) left the subscription,
    one per refusal, for as long as the connection lives."""
    path = str(tmp_path / "xenstored")
    server = answer_one_request(path, lambda rq_id, tx_id: _packet(Op.ERROR, rq_id, tx_id,
                                                                   b"ENOSPC\0"))
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    xs.open()
    try:
        with pytest.raises(OSError) as info:
            xs.watch("/test/w", lambda _p: None)
        assert info.value.errno == errno.ENOSPC
        assert xs._watches == {}
        assert dict(xs._client.router.monitors) == {}
    finally:
        xs.close()
        server.join(TIMEOUT)


def test_an_event_of_a_token_never_watched_leaves_no_subscription(tmp_path) -> None:
    """An event for a token nobody subscribed (a watch removed as it
    fired, or a confused XenStore's) is dropped: looked up in pyxs's
    defaultdict of monitors, it left an empty list behind, one per
    token, for as long as the connection lives."""
    path = str(tmp_path / "xenstored")
    event = b"/x\0stray\0"

    def answer(rq_id: int, tx_id: int) -> bytes:
        # The event first: the router has handed it on by the reply.
        return (struct.pack("<IIII", Op.WATCH_EVENT, 0, 0, len(event)) + event
                + struct.pack("<IIII", Op.READ, rq_id, tx_id, 1) + b"v")

    server = answer_one_request(path, answer)
    xs = XenStore(pyxs.Client(unix_socket_path=path))
    xs.open()
    try:
        assert xs.read("/x") == "v"
        assert dict(xs._client.router.monitors) == {}
    finally:
        xs.close()
        server.join(TIMEOUT)


def test_an_event_path_that_is_no_utf8_silences_no_watch(tmp_path) -> None:
    """The watch thread decodes each event's path leniently, as read()
    does a value: one it could not decode would end the thread, and with
    it every watch of the connection."""
    from tests.sim.hosthelpers import serve_one_client

    path = str(tmp_path / "xenstored")
    hang_up = threading.Event()

    def handle(conn: socket.socket) -> None:
        header = conn.recv(16, socket.MSG_WAITALL)
        _op, rq_id, tx_id, size = struct.unpack("<4I", header)
        conn.recv(size, socket.MSG_WAITALL)  # the WATCH of token xb0
        conn.sendall(_packet(Op.WATCH, rq_id, tx_id, b"OK\0")
                     + _packet(Op.WATCH_EVENT, 0, 0, b"/w/\xff\0xb0\0")
                     + _packet(Op.WATCH_EVENT, 0, 0, b"/w\0xb0\0"))
        hang_up.wait(TIMEOUT)

    server = serve_one_client(path, handle)
    xs = XenStore(pyxs.Client(unix_socket_path=path), on_lost=lambda _exc: None)
    xs.open()
    try:
        seen: list[str] = []
        both = threading.Event()

        def changed(event_path: str) -> None:
            seen.append(event_path)
            if len(seen) == 2:
                both.set()

        xs.watch("/w", changed)
        assert both.wait(TIMEOUT), seen
        assert seen == ["/w/\ufffd", "/w"]
    finally:
        hang_up.set()
        server.join(TIMEOUT)
        assert xs.connection_lost.wait(TIMEOUT)  # so close() asks nothing more
        xs.close()


def test_a_watch_removed_leaves_no_subscription(dom0_xs) -> None:
    """pyxs's unwatch leaves its token's empty list of monitors behind:
    every wait_for() left one more for as long as the connection lives."""
    monitors = {k: list(v) for k, v in dom0_xs._client.router.monitors.items()}
    dom0_xs.write("/test/w", "1")
    for _ in range(3):
        assert dom0_xs.wait_for("/test/w", "1", timeout=TIMEOUT) == "1"
    dom0_xs.watch("/test/w", lambda _p: None).unwatch()
    assert dict(dom0_xs._client.router.monitors) == monitors


def test_on_lost_is_told_the_write_error_that_ended_the_connection(tmp_path, monkeypatch) -> None:
    """A sender whose write fails (EPIPE: xenstored has gone) closes the
    connection; the router then found it closed, and on_lost was told a
    bare "not connected", which says nothing of why."""
    import os

    server, pause, xs, told = _opened_on_a_hang_up_router_paused(tmp_path, monkeypatch)
    try:
        assert pause.reached.wait(TIMEOUT)
        server.join(TIMEOUT)
        exc = _try_read(xs)
        assert isinstance(exc, ConnectionError), repr(exc)
    finally:
        pause.resume()
    assert xs.connection_lost.wait(TIMEOUT)
    lost = told.one()
    cause = lost.__cause__
    assert isinstance(cause, OSError) and cause.errno in (errno.EPIPE, errno.ECONNRESET), (
        repr(lost))
    # And, with no reply before it, what that likely means.
    assert str(lost).endswith(f"(writing to XenStore failed: {os.strerror(cause.errno)})")
    assert str(lost).startswith("XenStore closed the connection before its first reply")
    xs.close()


def test_close_returns_once_an_open_in_progress_is_undone(host, monkeypatch) -> None:
    """close() as open() had connected but not yet said so: close() found
    nothing connected and returned, the socket and the router thread
    still open until open() saw that it was closed and closed them.  Once
    close() returns, nothing of the XenStore may be open."""
    xs = XenStore(host.dom0.xenstore())
    router = xs._client.router
    pause = PauseAt.in_method(monkeypatch, XenStore, "_open", "with close()'s setting of _closed")

    def close_and_look() -> tuple[bool, bool]:
        xs.close()
        return router.connection.is_connected, router.thread.is_alive()

    opener = Attempt(xs.open)
    assert pause.reached.wait(TIMEOUT)
    closer = Attempt(close_and_look)
    _waits_for_a_lock_in_close(closer.thread)
    pause.resume()
    assert closer.result() == (False, False), "close() returned with the connection open"
    exc = opener.result()
    assert isinstance(exc, RuntimeError) and "closed" in str(exc), repr(exc)
    assert not xs.connected


def test_on_lost_is_told_why_the_router_ended_not_what_followed(tmp_path) -> None:
    """The router ending (here on a packet nobody asked for) shuts the
    socket down, which fails a write blocked on it: that sender's EPIPE,
    a consequence, was what on_lost heard, not the packet that ended the
    connection."""
    import xenback.xenstore as xenstore

    path = str(tmp_path / "xenstored")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    told = _Told()
    xs = XenStore(pyxs.Client(unix_socket_path=path), on_lost=told)
    xs.open()
    xenstored, _ = listener.accept()
    listener.close()
    try:
        sock = xs._client.router.connection.transport.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        with contextlib.suppress(BlockingIOError):
            while True:  # xenstored reads nothing: the next write blocks
                sock.send(b"\0" * 1000, socket.MSG_DONTWAIT)
        writer = Attempt(lambda: xs.write("/big", "x" * 4000))
        deadline = time.monotonic() + TIMEOUT
        while not stands_at(writer.thread.ident, xenstore._write, "sent.extend("):
            assert time.monotonic() < deadline, "the write does not block"
            time.sleep(0.001)
        xenstored.sendall(_packet(Op.READ, 12345, 0, b"x"))  # nobody asked for it
        assert isinstance(writer.result(), ConnectionError)
        assert xs.connection_lost.wait(TIMEOUT)
        lost = told.one()
        assert isinstance(lost, pyxs.exceptions.UnexpectedPacket), repr(lost)
    finally:
        xs.close()
        xenstored.close()


class _ShortWrites:
    """The os module, but for a write() that takes at most ``most`` bytes,
    as a write interrupted by a signal handler that returns does."""

    def __init__(self, most: int) -> None:
        import os

        self._os = os
        self._most = most

    def __getattr__(self, name: str) -> Any:
        return getattr(self._os, name)

    def write(self, fd: int, data: Any) -> int:
        return self._os.write(fd, bytes(data[:self._most]))


def test_a_request_written_in_parts_goes_whole(host, monkeypatch) -> None:
    """A write may take only part of a request: the rest follows, and
    once only, or xenstored could no longer frame the stream."""
    import xenback.xenstore as xenstore

    xs = XenStore(host.dom0.xenstore())
    xs.open()
    try:
        monkeypatch.setattr(xenstore, "os", _ShortWrites(5))
        writer = Attempt(lambda: xs.write("/test/parts", "x" * 100))
        assert writer.result(msg="the request did not go whole") is None
        assert Attempt(lambda: xs.read("/test/parts")).result() == "x" * 100
    finally:
        monkeypatch.undo()
        xs.close()


def test_a_sender_waits_for_one_half_sent(host, monkeypatch) -> None:
    """Two requests at once: the second is written only once the first
    has gone whole, not into its middle."""
    import xenback.xenstore as xenstore

    xs = XenStore(host.dom0.xenstore())
    xs.open()
    try:
        xs.write("/test/a", "1")
        xs.write("/test/b", "2")
        monkeypatch.setattr(xenstore, "os", _ShortWrites(5))
        real = xenstore._write
        pause = PauseAt(real, "done += sent[-1]")  # part of the first went
        monkeypatch.setattr(xenstore, "_write", lambda *args: pause.run(lambda: real(*args)))
        first = Attempt(lambda: xs.read("/test/a"))
        assert pause.reached.wait(TIMEOUT)
        second = Attempt(lambda: xs.read("/test/b"))
        deadline = time.monotonic() + TIMEOUT
        while not stands_at(second.thread.ident, xs._client.router.send, "with send_lock:"):
            assert time.monotonic() < deadline, "the second sender does not wait for the first"
            time.sleep(0.001)
        pause.resume()
        assert first.result() == "1" and second.result() == "2"
    finally:
        monkeypatch.undo()
        xs.close()


def test_a_request_interrupted_as_its_write_returned_keeps_the_connection(
        host, monkeypatch) -> None:
    """A Ctrl-C once the whole request went: the stream is still framed,
    the connection stays up, and its reply is read like any other."""
    import xenback.xenstore as xenstore

    class Interrupted(BaseException):
        pass

    real = xenstore._write

    def write_then_interrupt(*args: Any) -> None:
        real(*args)
        raise Interrupted

    told = _Told()
    xs = XenStore(host.dom0.xenstore(), on_lost=told)
    xs.open()
    try:
        monkeypatch.setattr(xenstore, "_write", write_then_interrupt)
        with pytest.raises(Interrupted):
            xs.write("/test/whole", "1")
        monkeypatch.undo()
        assert Attempt(lambda: xs.read("/test/whole")).result() == "1"
        assert xs.connected and told == []
    finally:
        monkeypatch.undo()
        xs.close()


def test_a_write_failing_before_any_byte_went_keeps_the_connection(host, monkeypatch) -> None:
    """A write failing for a passing reason (ENOBUFS) before any of the
    request went leaves the stream framed: the request fails with that
    error, not as a lost connection, and leaves nothing waiting."""
    import os

    import xenback.xenstore as xenstore

    def no_buffers(*_args: Any) -> None:
        raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))

    told = _Told()
    xs = XenStore(host.dom0.xenstore(), on_lost=told)
    xs.open()
    try:
        xs.write("/test/framed", "1")
        monkeypatch.setattr(xenstore, "_write", no_buffers)
        exc = _try_read(xs)
        monkeypatch.undo()
        assert isinstance(exc, OSError) and not isinstance(exc, ConnectionError), repr(exc)
        assert exc.errno == errno.ENOBUFS and exc.filename == "/anything", repr(exc)
        assert xs._client.router.rvars == {}
        assert Attempt(lambda: xs.read("/test/framed")).result() == "1"
        assert xs.connected and told == []
    finally:
        monkeypatch.undo()
        xs.close()


def _guest_at_its_connection_limit(host: Any, stack: contextlib.ExitStack) -> Any:
    """A new guest of ``host`` with as many XenStore connections open as
    it may have (closed by ``stack``): its next one is refused."""
    from xenback.sim._xenstored._ops import Quota

    guest = host.create_domain("g")
    path = os.fspath(host.xenstored.introduce_path(guest.domid))
    for _ in range(Quota().connections):  # accepted before ours: in order
        stack.enter_context(socket.socket(socket.AF_UNIX)).connect(path)
    return guest


def test_a_connection_xenstore_refuses_says_so(host) -> None:
    """xenstored may close a socket connection as it accepts it, before a
    word is said: cxenstored when it cannot allocate one, the simulated
    host's past a guest's limit on connections.  The protocol has no
    message for it, so open() succeeds (unless pyxs's router sees the end
    first); what fails next (open(), or the first request and on_lost)
    must say that XenStore closed the connection before its first reply,
    and what that likely means, not "connection lost" (which reads as a
    crash of xenstored) or pyxs's "router died"."""
    with contextlib.ExitStack() as stack:
        guest = _guest_at_its_connection_limit(host, stack)
        lost = _Told()
        xs = XenStore(guest.xenstore(), on_lost=lost)
        stack.callback(xs.close)
        requested = False
        with pytest.raises(ConnectionError) as info:
            xs.open()
            requested = True
            xs.read("/local/domain")
        assert "before its first reply" in str(info.value)
        assert "too many connections" in str(info.value)
        assert xs.connection_lost.wait(TIMEOUT)
        exc = lost.one()
        if requested:
            assert info.value.errno == errno.ENOTCONN
            assert "before its first reply" in str(exc)
            assert "too many connections" in str(exc)


def test_a_refusal_is_said_to_a_request_before_the_router_unwinds(host, monkeypatch) -> None:
    """pyxs's recv() closes the connection itself as it finds it reset,
    before the router can say why.  The router decided whether it was
    refused only once it had unwound, and a request failing on the closed
    connection in between read "not connected to XenStore" (CI saw it as
    "connection lost"): it is decided before the close now."""
    import xenback.xenstore as xenstore

    with contextlib.ExitStack() as stack:
        guest = _guest_at_its_connection_limit(host, stack)
        xs = XenStore(guest.xenstore())
        stack.callback(xs.close)
        real_route, real_read_failure = xenstore._route, xenstore._read_failure
        opened, parked, unparked = threading.Event(), threading.Event(), threading.Event()
        stack.callback(unparked.set)  # before xs.close(), which joins the router

        def route_once_opened(router: Any) -> None:
            if router is xs._client.router:  # not the host's own clients
                assert opened.wait(TIMEOUT)
            real_route(router)

        def read_failure_parked(exc: Exception) -> str:
            if threading.current_thread() is xs._client.router.thread:
                parked.set()
                assert unparked.wait(TIMEOUT)
            return real_read_failure(exc)

        monkeypatch.setattr(xenstore, "_route", route_once_opened)
        monkeypatch.setattr(xenstore, "_read_failure", read_failure_parked)
        xs.open()
        opened.set()
        assert parked.wait(TIMEOUT)
        assert not xs._client.router.is_connected  # closed by pyxs's recv()
        with pytest.raises(ConnectionError) as info:
            xs.read("/local/domain")
        unparked.set()
        assert info.value.errno == errno.ENOTCONN
        assert "before its first reply" in str(info.value)
        assert xs.connection_lost.wait(TIMEOUT)


def test_a_connection_of_a_destroyed_domain_is_not_only_said_refused(host, caplog) -> None:
    """A guest's connection that never had a reply, open as its domain is
    destroyed: XenStore closes it then, as it closes one it refuses, and
    nothing on the wire tells the two apart.  The warning named only a
    refusal ("too many connections of this domain?") or XenStore going
    away, sending whoever read it to count connections."""
    import logging

    guest = host.create_domain("g")
    xs = XenStore(guest.xenstore())
    xs.open()
    try:
        with caplog.at_level(logging.WARNING, logger="xenback.xenstore"):
            host.destroy_domain(guest)
            assert xs.connection_lost.wait(TIMEOUT)
    finally:
        xs.close()
    (warned,) = [r for r in caplog.records if r.name == "xenback.xenstore"]
    assert warned.getMessage() == (
        "XenStore connection lost: XenStore closed the connection before its first reply: "
        "it refused it (too many connections of this domain?), or it stopped, or this "
        "domain was destroyed (XenStore closed the connection)")


def test_a_connection_refused_before_its_first_request_says_so(host, monkeypatch) -> None:
    """The same refusal, seen by the router only once open() returned and
    before the first request went (a loaded machine's order of things):
    nothing was ever answered on the connection, and its request says
    that XenStore closed it before its first reply, as on_lost does, not
    "connection lost"."""
    import xenback.xenstore as xenstore

    with contextlib.ExitStack() as stack:
        guest = _guest_at_its_connection_limit(host, stack)
        lost = _Told()
        xs = XenStore(guest.xenstore(), on_lost=lost)
        stack.callback(xs.close)
        real_route = xenstore._route
        opened = threading.Event()

        def route_once_opened(router: Any) -> None:
            if router is xs._client.router:  # not the host's own clients
                assert opened.wait(TIMEOUT)
            real_route(router)

        monkeypatch.setattr(xenstore, "_route", route_once_opened)
        xs.open()
        opened.set()
        assert xs.connection_lost.wait(TIMEOUT)
        with pytest.raises(ConnectionError) as info:
            xs.read("/local/domain")
        assert info.value.errno == errno.ENOTCONN
        assert "before its first reply" in str(info.value)
        exc = lost.one()
        assert "before its first reply" in str(exc)
