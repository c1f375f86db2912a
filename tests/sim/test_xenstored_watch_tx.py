"""Watches and transactions of the XenStore server."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hosthelpers import error_of, eventually, make_guest

from xenback.sim._xenstored import Op, Quota, RawClient, XenStored
from xenback.sim._xenstored._wire import PAYLOAD_MAX


@pytest.fixture
def other(xsd: XenStored) -> Iterator[RawClient]:
    with RawClient(xsd.path) as c:
        yield c


def assert_no_event(client: RawClient) -> None:
    """No event is pending: a round trip returns with nothing queued before it."""
    client.request(Op.GET_DOMAIN_PATH, b"0\0")
    assert not client.events


# --- watches ------------------------------------------------------------------


def test_watch_replies_ok_then_one_initial_event(dom0: RawClient) -> None:
    rid = dom0.send(Op.WATCH, b"/w\0tok\0")
    assert dom0.recv_message() == (Op.WATCH, rid, 0, b"OK\0")
    assert dom0.recv_message() == (Op.WATCH_EVENT, 0, 0, b"/w\0tok\0")
    assert_no_event(dom0)


def test_subtree_match_and_event_paths(dom0: RawClient, other: RawClient) -> None:
    dom0.watch("/w", "t")
    assert dom0.wait_event() == ("/w", "t")
    other.write("/w/a/b", "1")
    assert dom0.wait_event() == ("/w/a/b", "t")
    other.write("/wx", "1")  # a sibling with a common prefix is not below /w
    other.write("/w", "2")
    assert dom0.wait_event() == ("/w", "t")
    other.mkdir("/w/a")  # exists: no change, no event
    other.mkdir("/w/c")
    assert dom0.wait_event() == ("/w/c", "t")
    assert_no_event(dom0)


def test_one_change_fires_a_connections_watches_in_registration_order(
    dom0: RawClient, other: RawClient
) -> None:
    # cxenstored's fire_watches() walks each connection's watch list, which
    # add_watch() appends to: the order the watches were registered in,
    # whatever their depth.
    dom0.watch("/w", "outer")
    dom0.watch("/w/a/b", "exact")
    dom0.watch("/w/a", "inner")
    dom0.watch("/", "root")
    for _ in range(4):
        dom0.wait_event()  # the initial ones
    other.write("/w/a/b", "1")
    assert [dom0.wait_event() for _ in range(4)] == [
        ("/w/a/b", "outer"), ("/w/a/b", "exact"), ("/w/a/b", "inner"), ("/w/a/b", "root")
    ]
    assert_no_event(dom0)


def test_one_change_fires_two_watches_with_one_token_once(
    dom0: RawClient, other: RawClient
) -> None:
    # Both watches make the same message, and cxenstored's send_event()
    # drops one identical to an event still waiting (XSA-326): the first is
    # still queued when the second is made.  (A model campaign found the
    # model, not the server, wrong here.)
    dom0.watch("/w/a", "t")
    dom0.watch("/w", "t")
    assert [dom0.wait_event() for _ in range(2)] == [("/w/a", "t"), ("/w", "t")]
    other.write("/w/a", "1")
    assert dom0.wait_event() == ("/w/a", "t")
    assert_no_event(dom0)
    other.write("/w/a", "2")  # the first was sent: this one is not dropped
    assert dom0.wait_event() == ("/w/a", "t")
    assert_no_event(dom0)


def test_root_watch_sees_everything(dom0: RawClient, other: RawClient) -> None:
    dom0.watch("/", "root")
    assert dom0.wait_event() == ("/", "root")
    other.write("/anything", "")
    assert dom0.wait_event() == ("/anything", "root")


def test_relative_watch_gets_relative_paths(dom0: RawClient, other: RawClient) -> None:
    dom0.watch("device", "rel")
    assert dom0.wait_event() == ("device", "rel")
    other.write("/local/domain/0/device/vif/0", "x")
    assert dom0.wait_event() == ("device/vif/0", "rel")
    dom0.watch("/local/domain/0/device", "abs")
    assert dom0.wait_event() == ("/local/domain/0/device", "abs")
    other.write("device/x", "y")
    events = {dom0.wait_event(), dom0.wait_event()}
    assert events == {("device/x", "rel"), ("/local/domain/0/device/x", "abs")}


def test_duplicate_and_unknown_watches(dom0: RawClient, other: RawClient) -> None:
    dom0.watch("/d", "t")
    assert error_of(dom0.watch, "/d", "t") == "EEXIST"
    # the relative spelling of the same node is the same watch
    dom0.watch("/local/domain/0/r", "t")
    assert error_of(dom0.watch, "r", "t") == "EEXIST"
    dom0.watch("/d", "t2")  # another token is another watch
    assert error_of(dom0.unwatch, "/d", "nope") == "ENOENT"
    assert error_of(dom0.unwatch, "/nope", "t") == "ENOENT"
    dom0.unwatch("/d", "t")
    assert error_of(dom0.unwatch, "/d", "t") == "ENOENT"
    while dom0.events:
        dom0.events.popleft()
    other.write("/d", "")
    assert dom0.wait_event() == ("/d", "t2")
    assert_no_event(dom0)
    assert error_of(dom0.watch, "/d//x", "t") == "EINVAL"


def test_over_long_events_are_dropped_not_sent(
    dom0: RawClient, other: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    # The WATCH request is exactly XENSTORE_PAYLOAD_MAX, so its initial
    # event fits, but any change below /a makes an event too long to send.
    caplog.set_level(logging.DEBUG, logger="xenback.sim._xenstored")
    token = "t" * (PAYLOAD_MAX - len("/a\0") - 1)
    dom0.watch("/a", token)
    dom0.watch("/a", "short")
    assert [dom0.wait_event(), dom0.wait_event()] == [("/a", token), ("/a", "short")]
    other.write("/a/longer-child-name", "y")
    other.write("/a/another-child", "y")
    other.write("/a", "z")
    # Only what fits arrives, and the connection keeps working after it.
    seen = []
    while len(seen) < 4:
        op, _rid, _tx, payload = dom0.recv_message()
        assert op == Op.WATCH_EVENT and len(payload) <= PAYLOAD_MAX
        seen.append(payload.split(b"\0")[:2])
    assert seen == [
        [b"/a/longer-child-name", b"short"],
        [b"/a/another-child", b"short"],
        [b"/a", token.encode()],
        [b"/a", b"short"],
    ]
    assert_no_event(dom0)
    drops = [r for r in caplog.records if "XENSTORE_PAYLOAD_MAX" in r.getMessage()]
    assert [r.levelno for r in drops] == [logging.WARNING, logging.DEBUG]
    assert "/a/longer-child-name" in drops[0].getMessage()


def test_rm_fires_node_ancestors_and_descendant_watches(dom0: RawClient, other: RawClient) -> None:
    other.write("/t/a/b/c", "")
    dom0.watch("/t", "top")
    dom0.watch("/t/a/b/c", "leaf")
    dom0.watch("/t/a/b/c/below", "below")
    for _ in range(3):
        dom0.wait_event()
    other.rm("/t/a")
    events = [dom0.wait_event(), dom0.wait_event()]
    assert events == [("/t/a/b/c", "leaf"), ("/t/a", "top")]
    assert_no_event(dom0)


def test_special_watches_fire_for_privileged_only(xsd: XenStored, dom0: RawClient) -> None:
    dom0.watch("@introduceDomain", "in")
    dom0.watch("@releaseDomain", "out")
    assert [dom0.wait_event(), dom0.wait_event()] == [
        ("@introduceDomain", "in"),
        ("@releaseDomain", "out"),
    ]
    with make_guest(xsd, dom0, 4) as guest:
        assert dom0.wait_event() == ("@introduceDomain", "in")
        guest.watch("@releaseDomain", "g")
        assert guest.wait_event() == ("@releaseDomain", "g")  # the initial one
        dom0.request(Op.INTRODUCE, b"6\0" b"0\0" b"3\0")
        assert dom0.wait_event() == ("@introduceDomain", "in")
        dom0.request(Op.INTRODUCE, b"6\0" b"0\0" b"3\0")  # again: not news
        xsd.introduce_domain(4)  # nor through the host's API
        assert_no_event(dom0)
        dom0.request(Op.RELEASE, b"6\0")
        assert dom0.wait_event() == ("@releaseDomain", "out")
        assert_no_event(guest)
    xsd.release_domain(4)
    assert dom0.wait_event() == ("@releaseDomain", "out")
    assert error_of(dom0.read, "@releaseDomain") == "EINVAL"
    assert dom0.get_perms("@releaseDomain") == ["n0"]


def test_guest_hears_only_what_it_may_read(xsd: XenStored, dom0: RawClient) -> None:
    with make_guest(xsd, dom0, 2) as guest:
        dom0.write("/shared/open", "")
        dom0.write("/shared/closed", "")
        dom0.set_perms("/shared", ["n0", "r2"])
        dom0.set_perms("/shared/open", ["n0", "r2"])
        dom0.set_perms("/shared/closed", ["n0"])
        dom0.write("/shared/closed/deeper", "")
        guest.watch("/shared", "s")
        assert guest.wait_event() == ("/shared", "s")
        dom0.write("/shared/open", "1")
        assert guest.wait_event() == ("/shared/open", "s")
        dom0.write("/shared/closed", "1")  # parent readable: permitted
        assert guest.wait_event() == ("/shared/closed", "s")
        dom0.write("/shared/closed/deeper", "1")  # neither it nor parent
        assert_no_event(guest)
        dom0.set_perms("/shared/closed/deeper", ["n0", "r2"])  # now readable
        assert guest.wait_event() == ("/shared/closed/deeper", "s")


def test_a_watcher_that_could_read_a_node_hears_it_made_unreadable(
    xsd: XenStored, dom0: RawClient
) -> None:
    with make_guest(xsd, dom0, 2) as guest:
        dom0.write("/hidden/n", "")  # the parent stays unreadable to the guest
        dom0.set_perms("/hidden/n", ["n0", "r2"])
        guest.watch("/hidden/n", "t")
        assert guest.wait_event() == ("/hidden/n", "t")
        dom0.set_perms("/hidden/n", ["n0"])  # it could read it before
        assert guest.wait_event() == ("/hidden/n", "t")
        dom0.write("/hidden/n", "1")  # now it cannot
        assert_no_event(guest)


def test_reset_watches_forgets_watches_and_transactions(dom0: RawClient, other: RawClient) -> None:
    dom0.watch("/rw", "t")
    dom0.wait_event()
    tx = dom0.transaction_start()
    assert dom0.request(Op.RESET_WATCHES, b"") == b"OK\0"
    other.write("/rw", "")
    assert_no_event(dom0)
    assert error_of(dom0.read, "/", tx) == "ENOENT"


def test_watch_ignores_transaction_id(dom0: RawClient, other: RawClient) -> None:
    tx = dom0.transaction_start()
    assert dom0.request(Op.WATCH, b"/wt\0t\0", tx_id=999) == b"OK\0"
    dom0.wait_event()
    other.write("/wt", "")
    assert dom0.wait_event() == ("/wt", "t")
    assert dom0.request(Op.UNWATCH, b"/wt\0t\0", tx_id=999) == b"OK\0"
    other.write("/wt", "again")
    assert_no_event(dom0)
    dom0.transaction_end(tx, commit=False)


def test_closing_a_connection_drops_its_watches(xsd: XenStored, other: RawClient) -> None:
    with RawClient(xsd.path) as c:
        c.watch("/gone", "t")
        c.wait_event()
    other.write("/gone", "")  # must not trip over the closed connection
    assert other.read("/gone") == b""


def test_a_closed_connection_gives_back_its_watch_and_transaction_quota() -> None:
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), quota=Quota(watches=1, transactions=1)
    ) as server, RawClient(server.path) as admin:
        with make_guest(server, admin, 1) as first:
            first.watch("a", "t")
            first.wait_event()
            first.transaction_start()
        # The server sees the close on its loop thread; ask it there.
        assert eventually(lambda: server._call(lambda: not server._dispatcher.domains[1].conns))
        with RawClient(server.introduce_path(1)) as second:
            second.watch("b", "t")
            second.transaction_start()


# --- transactions ---------------------------------------------------------------


def test_transaction_isolation_and_commit(dom0: RawClient, other: RawClient) -> None:
    other.write("/tx/a", "1")
    tx = dom0.transaction_start()
    assert tx != 0
    assert dom0.read("/tx/a", tx) == b"1"
    dom0.write("/tx/a", "2", tx)
    dom0.write("/tx/new/deep", "3", tx)
    assert dom0.read("/tx/a", tx) == b"2"
    assert other.read("/tx/a") == b"1"
    assert error_of(other.read, "/tx/new/deep") == "ENOENT"
    assert dom0.directory("/tx", tx) == ["a", "new"]
    dom0.transaction_end(tx)
    assert other.read("/tx/a") == b"2"
    assert other.read("/tx/new/deep") == b"3"


def test_abort_discards(dom0: RawClient) -> None:
    dom0.write("/ab", "1")
    tx = dom0.transaction_start()
    dom0.write("/ab", "2", tx)
    dom0.rm("/ab", tx)
    assert error_of(dom0.read, "/ab", tx) == "ENOENT"
    dom0.transaction_end(tx, commit=False)
    assert dom0.read("/ab") == b"1"
    assert error_of(dom0.read, "/ab", tx) == "ENOENT"  # the transaction is gone


def test_conflict_on_a_node_read_gives_eagain(dom0: RawClient, other: RawClient) -> None:
    other.write("/c/a", "1")
    tx = dom0.transaction_start()
    assert dom0.read("/c/a", tx) == b"1"
    other.write("/c/a", "2")
    assert dom0.read("/c/a", tx) == b"1"  # the transaction keeps what it read
    dom0.write("/c/b", "x", tx)
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"
    assert error_of(dom0.read, "/c/b") == "ENOENT"  # nothing applied
    assert dom0.read("/c/a") == b"2"


def test_no_conflict_when_untouched_nodes_change(dom0: RawClient, other: RawClient) -> None:
    other.write("/n/a", "1")
    other.write("/n/b", "1")
    tx = dom0.transaction_start()
    dom0.read("/n/a", tx)
    other.write("/n/b", "2")  # /n/b was never read in the transaction
    other.write("/elsewhere", "")
    dom0.write("/n/a", "3", tx)
    dom0.transaction_end(tx)
    assert dom0.read("/n/a") == b"3"


def test_only_changes_after_the_first_read_conflict(dom0: RawClient, other: RawClient) -> None:
    other.write("/fr/a", "1")
    tx = dom0.transaction_start()
    other.write("/fr/a", "2")  # before the transaction first looks at it
    assert dom0.read("/fr/a", tx) == b"2"
    dom0.write("/fr/b", "x", tx)
    dom0.transaction_end(tx)
    assert dom0.read("/fr/b") == b"x"
    # Rewriting the same value is a change all the same: a new generation.
    tx = dom0.transaction_start()
    assert dom0.read("/fr/a", tx) == b"2"
    other.write("/fr/a", "2")
    dom0.write("/fr/b", "y", tx)
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"
    assert dom0.read("/fr/b") == b"x"


def test_conflict_when_a_node_read_as_absent_appears(dom0: RawClient, other: RawClient) -> None:
    other.write("/ap", "")
    tx = dom0.transaction_start()
    assert error_of(dom0.read, "/ap/x", tx) == "ENOENT"
    other.write("/ap/x", "now")
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"


def test_conflict_on_the_ancestor_that_told_enoent_from_eacces(
    dom0: RawClient, other: RawClient
) -> None:
    # cxenstored's get_node() asks the nearest existing ancestor whether a
    # missing node is ENOENT or EACCES (errno_from_parents(), for every
    # caller), and read_node() records what it reads in the transaction: a
    # change of that ancestor fails the commit.
    other.write("/an/b", "")
    tx = dom0.transaction_start()
    assert error_of(dom0.read, "/an/b/c/d", tx) == "ENOENT"
    dom0.write("/elsewhere", "x", tx)
    other.write("/an/b", "changed")
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"
    # ... and so does a change of a missing node in between.
    tx = dom0.transaction_start()
    assert error_of(dom0.read, "/an/b/c/d", tx) == "ENOENT"
    other.write("/an/b/c", "")
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"
    # So for RM of a missing node and for a guest denied an existing one.
    tx = dom0.transaction_start()
    dom0.rm("/an/b/gone", tx)
    other.write("/an/b", "again")
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"


def test_guest_conflicts_on_the_parent_of_a_node_it_may_not_read(
    xsd: XenStored, dom0: RawClient
) -> None:
    dom0.write("/gp/secret", "")
    dom0.set_perms("/gp", ["n0", "r5"])
    dom0.set_perms("/gp/secret", ["n0"])
    with make_guest(xsd, dom0, 5) as guest:
        tx = guest.transaction_start()
        assert error_of(guest.read, "/gp/secret", tx) == "EACCES"
        dom0.write("/gp", "changed")
        assert error_of(guest.transaction_end, tx) == "EAGAIN"


def test_conflict_through_directory_listing(dom0: RawClient, other: RawClient) -> None:
    other.write("/dl/a", "")
    tx = dom0.transaction_start()
    assert dom0.directory("/dl", tx) == ["a"]
    other.write("/dl/b", "")  # changes /dl's child list, so /dl itself
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"


def test_two_transactions_writing_the_same_node(dom0: RawClient, other: RawClient) -> None:
    dom0.write("/ww", "0")
    t1 = dom0.transaction_start()
    t2 = other.transaction_start()
    dom0.write("/ww", "1", t1)
    other.write("/ww", "2", t2)
    dom0.transaction_end(t1)
    assert error_of(other.transaction_end, t2) == "EAGAIN"
    assert dom0.read("/ww") == b"1"


def test_transaction_watch_events_fire_on_commit_only(dom0: RawClient, other: RawClient) -> None:
    dom0.watch("/ev", "t")
    dom0.wait_event()
    tx = other.transaction_start()
    other.write("/ev/a", "1", tx)
    other.rm("/ev/a", tx)
    other.write("/ev/b", "1", tx)
    assert_no_event(dom0)
    other.transaction_end(tx)
    # One event per changed node; none for /ev/a, which existed neither
    # before nor after (see test_commit_fires_nothing_for_a_node_...), and
    # none for /ev, created only as /ev/a's parent.
    assert dom0.wait_event() == ("/ev/b", "t")
    assert_no_event(dom0)
    tx = other.transaction_start()
    other.write("/ev/c", "1", tx)
    other.transaction_end(tx, commit=False)
    assert_no_event(dom0)


def test_transaction_id_rules(dom0: RawClient, other: RawClient) -> None:
    tx = dom0.transaction_start()
    assert error_of(dom0.request, Op.TRANSACTION_START, b"\0", tx) == "EBUSY"
    assert error_of(dom0.request, Op.TRANSACTION_START, b"\0", 12345) == "EBUSY"
    assert error_of(dom0.read, "/", 12345) == "ENOENT"
    assert error_of(other.read, "/", tx) == "ENOENT"  # transactions are per connection
    assert error_of(dom0.request, Op.TRANSACTION_END, b"T\0") == "ENOENT"
    assert error_of(dom0.request, Op.TRANSACTION_END, b"X\0", tx) == "EINVAL"
    assert error_of(dom0.request, Op.TRANSACTION_END, b"T", tx) == "EINVAL"
    tx2 = dom0.transaction_start()
    assert tx2 != tx
    dom0.transaction_end(tx)
    dom0.transaction_end(tx2)
    # An ended transaction's id is not handed out again at once: a late
    # request naming it must fail, not land in a new transaction.
    tx3 = dom0.transaction_start()
    assert tx3 not in (tx, tx2)
    assert error_of(dom0.read, "/", tx2) == "ENOENT"
    dom0.transaction_end(tx3)
    rid = dom0.send(Op.TRANSACTION_START, b"\0")
    op, req_id, tx_id, payload = dom0.recv_message()
    assert (op, req_id, tx_id) == (Op.TRANSACTION_START, rid, 0)
    assert payload.endswith(b"\0") and int(payload[:-1]) > 0


def test_rm_in_transaction_conflicts_with_new_child(dom0: RawClient, other: RawClient) -> None:
    other.write("/rt/a/b", "")
    tx = dom0.transaction_start()
    dom0.rm("/rt/a", tx)
    other.write("/rt/a/c", "")
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"
    assert other.directory("/rt/a") == ["b", "c"]


def test_rm_in_transaction_of_a_node_its_parent_does_not_list(
    dom0: RawClient, other: RawClient
) -> None:
    """A transaction sees each node as it was when it first looked at it, so
    another client can make its view disagree with itself: a node without
    its parent, or a parent without the node.  Removing such a node is no
    reason to drop the connection; the transaction just cannot commit."""
    other.write("/in/a", "")
    tx = dom0.transaction_start()
    assert dom0.directory("/in", tx) == ["a"]  # /in as the transaction sees it
    other.write("/in/b", "")
    dom0.rm("/in/b", tx)  # /in/b is new to it, but its /in has no "b"
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"
    assert other.directory("/in") == ["a", "b"]

    tx = dom0.transaction_start()
    assert dom0.read("/in/a", tx) == b""
    other.rm("/in")
    dom0.rm("/in/a", tx)  # its /in/a, whose /in is gone
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"
    assert error_of(other.read, "/in") == "ENOENT"


def test_a_write_failing_for_size_in_a_transaction_fails_its_commit(
    xsd: XenStored, dom0: RawClient
) -> None:
    # cxenstored's write_node() has recorded the write in the transaction
    # before the node-size check refuses it, and "reverting access_node()
    # is hard, so just fail the transaction" (fail_transaction()):
    # do_transaction_end() then answers a commit with ENOMEM.
    with make_guest(xsd, dom0, 6) as guest:
        tx = guest.transaction_start()
        guest.write("fine", "1", tx)
        assert error_of(guest.write, "big", b"x" * 2048, tx) == "ENOSPC"
        assert error_of(guest.transaction_end, tx) == "ENOMEM"
        assert error_of(guest.read, "fine") == "ENOENT"
        # also when SET_PERMS or a child's name makes a node too big
        guest.write("full", b"x" * (2048 - 24 - 16 - 2))
        tx = guest.transaction_start()
        assert error_of(guest.set_perms, "full", ["n6", "r0", "r1"], tx) == "ENOSPC"
        assert error_of(guest.transaction_end, tx) == "ENOMEM"
        tx = guest.transaction_start()
        assert error_of(guest.write, "full/child", "", tx) == "ENOSPC"
        assert error_of(guest.transaction_end, tx) == "ENOMEM"
        # Aborting is fine, and the transaction is gone either way.
        tx = guest.transaction_start()
        assert error_of(guest.write, "big", b"x" * 2048, tx) == "ENOSPC"
        guest.transaction_end(tx, commit=False)
        assert error_of(guest.transaction_end, tx) == "ENOENT"


def test_commit_fires_nothing_for_a_node_that_exists_neither_before_nor_after(
    dom0: RawClient, other: RawClient
) -> None:
    # cxenstored's finalize_transaction() fires each changed node's watches
    # with the permissions it had when the transaction first read it (none:
    # it did not exist) and the node as it is now (none: removed again),
    # and watch_permitted() lets nobody, not even dom0, hear of it.
    other.write("/cd", "")
    dom0.watch("/cd", "w")
    assert dom0.wait_event() == ("/cd", "w")
    tx = other.transaction_start()
    other.write("/cd/tmp/x", "1", tx)
    other.rm("/cd/tmp", tx)
    other.write("/cd/kept", "", tx)
    other.transaction_end(tx)
    assert dom0.wait_event() == ("/cd/kept", "w")
    assert_no_event(dom0)


def test_commit_fires_what_a_guest_could_read_before_or_can_read_now(
    xsd: XenStored, dom0: RawClient
) -> None:
    # A node removed by a transaction: watch_permitted() is asked with the
    # permissions the transaction first saw and without a node (it is
    # gone), so the parent's permissions do not count, unlike for a
    # removal outside a transaction.
    dom0.write("/cg/secret", "")
    dom0.set_perms("/cg", ["n0", "r7"])
    dom0.set_perms("/cg/secret", ["n0"])
    with make_guest(xsd, dom0, 7) as guest:
        guest.watch("/cg", "g")
        assert guest.wait_event() == ("/cg", "g")
        tx = dom0.transaction_start()
        dom0.rm("/cg/secret", tx)
        dom0.transaction_end(tx)
        assert_no_event(guest)
        dom0.write("/cg/secret", "")
        assert guest.wait_event() == ("/cg/secret", "g")  # the parent says so
        dom0.rm("/cg/secret")
        assert guest.wait_event() == ("/cg/secret", "g")


def test_commit_fires_in_the_order_the_transaction_first_read_the_nodes(
    dom0: RawClient, other: RawClient
) -> None:
    # finalize_transaction() walks the access list, in first-access order.
    other.write("/or/b", "")
    dom0.watch("/or", "w")
    assert dom0.wait_event() == ("/or", "w")
    tx = other.transaction_start()
    assert other.read("/or/b", tx) == b""
    other.write("/or/a", "1", tx)
    other.write("/or/b", "1", tx)
    other.transaction_end(tx)
    assert [dom0.wait_event(), dom0.wait_event()] == [("/or/b", "w"), ("/or/a", "w")]
    assert_no_event(dom0)


def test_guest_transaction_node_quota_counts_at_commit(xsd: XenStored, dom0: RawClient) -> None:
    with make_guest(xsd, dom0, 3) as guest:
        tx = guest.transaction_start()
        guest.write("t/a", "1", tx)
        guest.set_perms("t/a", ["n3", "r0"], tx)
        guest.transaction_end(tx)
        assert dom0.get_perms("/local/domain/3/t/a") == ["n3", "r0"]


def test_special_watch_enabled_for_a_guest_by_set_perms(xsd: XenStored, dom0: RawClient) -> None:
    with make_guest(xsd, dom0, 5) as guest:
        guest.watch("@releaseDomain", "g")
        assert guest.wait_event() == ("@releaseDomain", "g")
        dom0.set_perms("@releaseDomain", ["n0", "r5"])
        # A permission change is a change of the node: it fires too.
        assert guest.wait_event() == ("@releaseDomain", "g")
        xsd.introduce_domain(6)
        xsd.release_domain(6)
        assert guest.wait_event() == ("@releaseDomain", "g")
        assert_no_event(guest)


def test_node_quota_is_checked_again_at_commit() -> None:
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), quota=Quota(nodes=4)
    ) as server, RawClient(server.path) as admin:
        with make_guest(server, admin, 1) as guest, make_guest(server, admin, 1) as again:
            t1 = guest.transaction_start()
            t2 = again.transaction_start()
            guest.write("a", "", t1)
            guest.write("b", "", t1)
            again.write("c", "", t2)
            again.write("d", "", t2)
            guest.transaction_end(t1)  # home + a + b: 3 of 4
            assert error_of(again.transaction_end, t2) == "ENOSPC"
            assert error_of(admin.read, "/local/domain/1/c") == "ENOENT"


def test_a_node_changed_many_times_in_a_transaction_fires_once(
    xsd: XenStored, dom0: RawClient
) -> None:
    # As cxenstored's add_change_node(): one event per changed node, however
    # often the transaction changed it.  Remembering every change instead
    # would let a guest grow the server's memory without bound in one
    # transaction and flood the watchers at commit.
    dom0.watch("/local/domain/1/many", "t")
    assert dom0.wait_event() == ("/local/domain/1/many", "t")
    with make_guest(xsd, dom0, 1) as guest:
        tx = guest.transaction_start()
        for i in range(50):
            guest.write("many/n", str(i), tx)
        guest.transaction_end(tx)
        assert dom0.wait_event() == ("/local/domain/1/many/n", "t")
        assert_no_event(dom0)
        assert dom0.read("/local/domain/1/many/n") == b"49"


def test_transaction_open_across_a_release_grants_the_dead_domain_nothing(
    xsd: XenStored, dom0: RawClient
) -> None:
    # The release strips domain 4 from the live nodes (XSA-322), but not from
    # what an open transaction holds.  cxenstored then ignores an entry for
    # a domain younger than the node, or gone (domain_adjust_node_perms):
    # the commit succeeds, the entry still shows in GET_PERMS, and nobody
    # gets access through it.
    with make_guest(xsd, dom0, 5) as alive:
        with make_guest(xsd, dom0, 4):
            dom0.write("/shared", "s")
            tx = dom0.transaction_start()
            dom0.set_perms("/shared", ["n0", "r4", "r5"], tx)  # 4 still alive
            xsd.release_domain(4)
        dom0.write("/late", "l", tx)
        dom0.set_perms("/late", ["n0", "r4"], tx)  # 4 gone, in the tx's view
        dom0.transaction_end(tx)
        assert dom0.get_perms("/shared") == ["n0", "r4", "r5"]
        assert alive.read("/shared") == b"s"  # entries of live domains still count
        # A new domain 4 inherits nothing.
        with make_guest(xsd, dom0, 4) as again:
            assert error_of(again.read, "/shared") == "EACCES"
            assert error_of(again.read, "/late") == "EACCES"


def test_a_domid_reintroduced_during_a_transaction_inherits_nothing(
    xsd: XenStored, dom0: RawClient
) -> None:
    # cxenstored would let this one through: the committed node is younger
    # than the new domain 4.  The entry was written for the old domain 4,
    # though, so it is ignored here all the same.
    with make_guest(xsd, dom0, 4):
        dom0.write("/shared", "s")
        tx = dom0.transaction_start()
        dom0.set_perms("/shared", ["n0", "r4"], tx)
        xsd.release_domain(4)
    with make_guest(xsd, dom0, 4) as again:
        dom0.transaction_end(tx)
        assert error_of(again.read, "/shared") == "EACCES"
        # A permission set after the new domain came is the new domain's.
        dom0.set_perms("/shared", ["n0", "r4"])
        assert again.read("/shared") == b"s"


def test_entries_a_transaction_took_up_after_the_reintroduction_count(
    xsd: XenStored, dom0: RawClient
) -> None:
    # The transaction began before domain 4 was released, but what it holds
    # for 4 it took up after a new domain 4 came: the new domain's, as
    # cxenstored agrees (the node is younger than the domain).  Before, the
    # commit marked them ignored all the same, and hid its events from 4.
    dom0.write("/n", "1")
    dom0.write("/m", "1")
    dom0.write("/s", "1")
    with make_guest(xsd, dom0, 4):
        tx = dom0.transaction_start()
        assert dom0.read("/s", tx) == b"1"  # first looked at before the release
        xsd.release_domain(4)
    with make_guest(xsd, dom0, 4) as again:
        dom0.set_perms("/n", ["n0", "r4"])
        dom0.set_perms("/m", ["n0", "r4"])
        again.watch("/n", "n")
        again.watch("/m", "m")
        assert [again.wait_event(), again.wait_event()] == [("/n", "n"), ("/m", "m")]
        assert dom0.read("/n", tx) == b"1"  # first looked at now
        dom0.write("/n", "2", tx)
        dom0.set_perms("/m", ["n0"], tx)  # 4 could read it before: it hears
        dom0.set_perms("/s", ["n0", "r4"], tx)  # set for the new domain
        dom0.transaction_end(tx)
        assert [again.wait_event(), again.wait_event()] == [("/n", "n"), ("/m", "m")]
        assert again.read("/n") == b"2"
        assert again.read("/s") == b"1"


def test_entries_for_the_old_domain_stay_ignored_in_what_they_reach_later(
    xsd: XenStored, dom0: RawClient
) -> None:
    # A node the transaction creates after the reintroduction inherits its
    # parent's entry, set for the old domain 4; and an entry set while no
    # domain 4 existed is no grant to the next one either (cxenstored marks
    # it ignored on the spot: write_node_raw()).
    with make_guest(xsd, dom0, 4):
        tx = dom0.transaction_start()
        dom0.write("/p", "", tx)
        dom0.set_perms("/p", ["n0", "r4"], tx)
        xsd.release_domain(4)
    dom0.write("/between", "b", tx)
    dom0.set_perms("/between", ["n0", "r4"], tx)
    with make_guest(xsd, dom0, 4) as again:
        dom0.write("/p/c", "c", tx)
        dom0.write("/between/c", "c", tx)
        dom0.transaction_end(tx)
        for path in ("/p", "/p/c", "/between", "/between/c"):
            assert error_of(again.read, path) == "EACCES", path


def test_a_transaction_that_read_an_entry_for_a_released_domain_cannot_commit(
    xsd: XenStored, dom0: RawClient
) -> None:
    # The release strips the entry from the live node, which the transaction
    # read: a conflict.  So the permissions a commit's events are judged by
    # never carry an entry for a domain released meanwhile.
    with make_guest(xsd, dom0, 4):
        dom0.write("/read", "r")
        dom0.set_perms("/read", ["n0", "r4"])
        tx = dom0.transaction_start()
        assert dom0.read("/read", tx) == b"r"
        dom0.write("/other", "o", tx)
        xsd.release_domain(4)
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"


def test_an_entry_set_again_for_the_new_domain_counts(
    xsd: XenStored, dom0: RawClient
) -> None:
    # The same permissions set again after domain 4 came back are set for
    # the new domain, even equal ones (a SET_PERMS is told apart from other
    # changes by a new perms object), and so are those of a node the
    # transaction creates below afterwards.  Set first thing after the
    # introduction: the transaction's generation counts as after it.
    dom0.write("/again", "a")
    with make_guest(xsd, dom0, 4):
        tx = dom0.transaction_start()
        dom0.set_perms("/again", ["n0", "r4"], tx)  # for the old domain 4
        xsd.release_domain(4)
    with make_guest(xsd, dom0, 4) as again:
        dom0.set_perms("/again", ["n0", "r4"], tx)
        dom0.write("/again/c", "c", tx)
        dom0.transaction_end(tx)
        assert again.read("/again") == b"a"
        assert again.read("/again/c") == b"c"


def test_a_new_domain_hears_of_a_node_it_could_read_before_the_commit(
    xsd: XenStored, dom0: RawClient
) -> None:
    # An entry set after the release and before domain 4 came back is the
    # live store's, which keeps it for the next domain 4: the transaction
    # read it after the release, so the commit's event is judged by it, as
    # by any permissions at first touch (they are not rewritten).
    dom0.write("/a", "")
    dom0.write("/later", "l")
    with make_guest(xsd, dom0, 4):
        tx = dom0.transaction_start()
        dom0.write("/a", "a", tx)
        xsd.release_domain(4)
    dom0.set_perms("/later", ["n0", "r4"])
    assert dom0.read("/later", tx) == b"l"
    with make_guest(xsd, dom0, 4) as again:
        assert again.read("/later") == b"l"
        again.watch("/later", "w")
        assert again.wait_event() == ("/later", "w")
        dom0.write("/later", "m", tx)
        dom0.transaction_end(tx)
        assert again.wait_event() == ("/later", "w")


def test_the_rule_is_decided_for_each_domid_of_an_entry(
    xsd: XenStored, dom0: RawClient
) -> None:
    # Domains 4 and 5 both go; only 4 comes back before the transaction
    # sets the node's permissions: 4's entry counts, 5's is ignored.
    dom0.write("/two", "t")
    with make_guest(xsd, dom0, 4), make_guest(xsd, dom0, 5):
        tx = dom0.transaction_start()
        assert dom0.read("/two", tx) == b"t"
        xsd.release_domain(4)
        xsd.release_domain(5)
    with make_guest(xsd, dom0, 4) as again:
        dom0.set_perms("/two", ["n0", "r4", "r5"], tx)
        dom0.transaction_end(tx)
        assert again.read("/two") == b"t"
        with make_guest(xsd, dom0, 5) as five:
            assert error_of(five.read, "/two") == "EACCES"


def test_an_entry_read_after_the_release_keeps_the_live_stores_meaning(
    xsd: XenStored, dom0: RawClient
) -> None:
    # The live store keeps an entry set while no domain 4 exists for the
    # next domain 4 (a toolstack sets up a guest's nodes before introducing
    # it).  A transaction open across the old domain's release that reads
    # such a node, still before the new domain came, and rewrites only its
    # value must not take the grant away: what it read postdates the
    # release.  Before, the commit marked the entry ignored.
    dom0.write("/a", "")
    dom0.write("/live", "l")
    dom0.write("/touched", "t")
    with make_guest(xsd, dom0, 4):
        tx = dom0.transaction_start()
        dom0.write("/a", "a", tx)
        xsd.release_domain(4)
    dom0.set_perms("/live", ["n0", "r4"])
    dom0.set_perms("/touched", ["n0", "r4"])
    assert dom0.read("/touched", tx) == b"t"
    with make_guest(xsd, dom0, 4) as again:
        dom0.write("/touched", "u", tx)
        dom0.write("/touched/c", "c", tx)  # its parent's entry, as live
        dom0.transaction_end(tx)
        assert again.read("/live") == b"l"
        assert again.read("/touched") == b"u"
        assert again.read("/touched/c") == b"c"


def test_a_transaction_cannot_give_a_node_to_a_domain_released_meanwhile(
    xsd: XenStored, dom0: RawClient
) -> None:
    # Had the transaction committed first, the release would have removed
    # the node; committing it afterwards would hand it to whichever domain
    # gets id 4 next.  The client must look again: EAGAIN.
    with make_guest(xsd, dom0, 4):
        tx = dom0.transaction_start()
        dom0.write("/orphan", "o", tx)
        dom0.set_perms("/orphan", ["n4"], tx)
        xsd.release_domain(4)
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"
    assert error_of(dom0.read, "/orphan") == "ENOENT"


def test_a_transaction_may_give_a_node_to_the_domain_that_came_back(
    xsd: XenStored, dom0: RawClient
) -> None:
    # The owner entry follows the rule of the others: set after a new
    # domain 4 came, it names the new domain, whose node it is, as are
    # the nodes the transaction creates below it afterwards.  One set for
    # the old domain still fails the commit (the test above).
    dom0.write("/given", "g")
    with make_guest(xsd, dom0, 4):
        tx = dom0.transaction_start()
        assert dom0.read("/given", tx) == b"g"
        xsd.release_domain(4)
    with make_guest(xsd, dom0, 4) as again:
        dom0.set_perms("/given", ["n4"], tx)
        dom0.write("/given/c", "c", tx)
        dom0.transaction_end(tx)
        again.write("/given", "mine")
        assert again.read("/given/c") == b"c"
        assert dom0.get_perms("/given/c") == ["n4"]


def test_a_transaction_merges_the_events_of_a_node_it_changed_twice(
    xsd: XenStored, dom0: RawClient
) -> None:
    # One event per node at commit (see the test above): subtree-style if
    # any change was, and for whoever could read the node before the first
    # change or after the last.
    with make_guest(xsd, dom0, 2) as guest:
        dom0.write("/m/a", "")
        dom0.write("/m/hidden/n", "")
        dom0.set_perms("/m", ["n0", "r2"])
        dom0.set_perms("/m/hidden", ["n0"])
        dom0.set_perms("/m/hidden/n", ["n0", "r2"])
        dom0.watch("/m", "w")
        assert dom0.wait_event() == ("/m", "w")
        guest.watch("/m/hidden/n", "g")
        assert guest.wait_event() == ("/m/hidden/n", "g")
        tx = dom0.transaction_start()
        dom0.write("/m/a/b", "", tx)  # an event for /m/a/b's ancestors ...
        dom0.rm("/m/a", tx)  # ... and then one for /m/a/b's own watchers only
        dom0.set_perms("/m/hidden/n", ["n0"], tx)  # readable by the guest before ...
        dom0.write("/m/hidden/n", "x", tx)  # ... not after
        dom0.transaction_end(tx)
        # /m/a/b, created and removed again, fires nothing at all (as in
        # cxenstored: see test_commit_fires_nothing_for_a_node_...).
        assert [dom0.wait_event() for _ in range(2)] == [
            ("/m/a", "w"), ("/m/hidden/n", "w"),
        ]
        assert_no_event(dom0)
        assert guest.wait_event() == ("/m/hidden/n", "g")
        assert_no_event(guest)


def test_a_node_removed_in_a_transaction_frees_quota_for_another() -> None:
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(
        Path(d), quota=Quota(nodes=3)
    ) as server, RawClient(server.path) as admin:
        with make_guest(server, admin, 1) as guest:
            guest.write("a", "")
            guest.write("b", "")  # home + a + b: the quota is used up
            tx = guest.transaction_start()
            guest.rm("a", tx)
            guest.write("c", "", tx)
            guest.transaction_end(tx)
            assert admin.directory("/local/domain/1") == ["b", "c"]


@pytest.mark.parametrize(("domid", "error", "said"), [
    (True, TypeError, "domid must be an int, not bool"),
    ("4", TypeError, "domid must be an int, not str"),
    (-1, ValueError, r"domid must be 0 to 65535 \(a domid_t\), not -1"),
    (65536, ValueError, r"domid must be 0 to 65535 \(a domid_t\), not 65536"),
])
def test_the_servers_domain_calls_check_a_domid_as_the_client_does(
        xsd: XenStored, domid: object, error: type[Exception], said: str) -> None:
    """introduce_domain(True) introduced domain 1, is_introduced(True) and
    release_domain(True) answered for it, release_domain(-1) was a
    KeyError of no such domain: the rule of xenback.XenStore's domain
    queries (is_int, a domid_t), before anything is changed."""
    xsd.introduce_domain(1)
    for call in (xsd.introduce_path, xsd.introduce_domain, xsd.release_domain,
                 xsd.is_introduced):
        with pytest.raises(error, match=f"^{said}$"):
            call(domid)  # type: ignore[arg-type]
    assert xsd.is_introduced(1)


def test_the_servers_domain_calls_take_an_int_subclass(xsd: XenStored) -> None:
    import enum

    Dom = enum.IntEnum("Dom", {"GUEST": 4})
    assert xsd.introduce_domain(Dom.GUEST) == xsd.introduce_path(4)
    assert xsd.is_introduced(Dom.GUEST)
    xsd.release_domain(Dom.GUEST)
    assert not xsd.is_introduced(4)


def test_a_node_changed_by_write_then_removed_in_a_transaction_fires_subtree_style(
    dom0: RawClient,
) -> None:
    # The subtree-style event of the WRITE is not turned into RM's exact one
    # for a descendant (cxenstored's add_change_node(): recurse sticks), so
    # a watcher of an ancestor hears of the node, not only of the removed
    # subtree's root.
    dom0.write("/ms/a/b", "")
    dom0.watch("/ms", "w")
    assert dom0.wait_event() == ("/ms", "w")
    tx = dom0.transaction_start()
    dom0.write("/ms/a/b", "x", tx)
    dom0.rm("/ms/a", tx)
    dom0.transaction_end(tx)
    assert [dom0.wait_event() for _ in range(2)] == [("/ms/a/b", "w"), ("/ms/a", "w")]
    assert_no_event(dom0)


def test_a_root_watch_hears_nothing_of_a_special_node(xsd: XenStored, dom0: RawClient) -> None:
    # "/" is no ancestor of "@..." names for matching (current xenstored's
    # is_child()): a permission change of a special node fires its own
    # watchers only, and so do domain introductions and releases.
    dom0.watch("/", "root")
    assert dom0.wait_event() == ("/", "root")
    dom0.watch("@releaseDomain", "out")
    assert dom0.wait_event() == ("@releaseDomain", "out")
    dom0.set_perms("@releaseDomain", ["n0", "r5"])
    assert dom0.wait_event() == ("@releaseDomain", "out")
    xsd.introduce_domain(5)
    xsd.release_domain(5)
    assert dom0.wait_event() == ("@releaseDomain", "out")
    assert_no_event(dom0)


def test_a_change_after_the_first_read_conflicts_however_many_came_before(
    dom0: RawClient, other: RawClient
) -> None:
    # Every change of a node is a generation of its own, not one per
    # transaction begun: a second change after the transaction read the
    # first one's result is a conflict too.
    tx = dom0.transaction_start()
    other.write("/cc", "1")
    assert dom0.read("/cc", tx) == b"1"
    other.write("/cc", "2")
    dom0.write("/cc-out", "", tx)
    assert error_of(dom0.transaction_end, tx) == "EAGAIN"


def test_commit_fires_to_a_guest_that_can_read_only_what_the_node_became(
    xsd: XenStored, dom0: RawClient
) -> None:
    # A node that existed before the transaction, unreadable to the guest
    # then, readable after: watch_permitted() finds the node as it is now.
    dom0.write("/cb/x", "")
    dom0.set_perms("/cb", ["n0"])
    dom0.set_perms("/cb/x", ["n0"])
    with make_guest(xsd, dom0, 7) as guest:
        guest.watch("/cb/x", "g")
        assert guest.wait_event() == ("/cb/x", "g")
        tx = dom0.transaction_start()
        dom0.set_perms("/cb/x", ["n0", "r7"], tx)
        dom0.transaction_end(tx)
        assert guest.wait_event() == ("/cb/x", "g")
        assert_no_event(guest)
