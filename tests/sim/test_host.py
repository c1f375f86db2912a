"""The simulated host: domains, their XenStore homes, lifecycle and teardown."""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import logging.handlers
import math
import os
import queue
import re
import select
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
import pyxs
from fdcensus import numbers_held, sockets_named_under
from hosthelpers import (
    SIM_CODE,
    SIM_ROUND_TRIP,
    answering_once,
    cut_short_in_its_join,
    descriptors,
    eventually,
    every_landing,
    landings,
    records_made,
    wait_pending,
)
from racewindow import TIMEOUT, Attempt, stands_at
from stolensignal import OUTLASTS_THE_TEST, Interrupted, interrupted_as_call_returns, interrupted_at

from workqueue import shown
from xenback.platform import Platform, PlatformError
from xenback.sim import Domain, SimHost, Toolstack, attach, create_domain
from xenback.sim._proto import close_fds
from xenback.sim._xenstored import XenStored

if TYPE_CHECKING:
    import socket
    from types import ModuleType

    from xenback.sim._hypervisor import Hypervisor


def open_fds() -> frozenset[tuple[int, str]]:
    # Each by number and what it is: by number alone, a descriptor left
    # open at a number another thread closed meanwhile passed unseen.
    return descriptors()


def test_dom0_and_guests(host: SimHost) -> None:
    assert host.dom0.domid == 0 and host.dom0.name == "Domain-0"
    assert host.xenstore_path == host.run_dir / "xenstored" / "socket"
    assert host.xenstore_path.exists()
    a, b = host.create_domain("a"), host.create_domain("b")
    assert (a.domid, b.domid) == (1, 2)
    assert a.path == "/local/domain/1"
    assert host.domains() == [host.dom0, a, b]
    assert host.domain(2) is b
    for domain in host.domains():
        assert isinstance(domain, Platform)


#: What libxl__domain_make (libxl_create.c) makes of a PV guest's home, and
#: the permissions: "ro" is libxl's roperm (dom0's, the guest may read),
#: "rw" its rwperm (the guest's own).  name and the platform-feature nodes
#: are written under a roperm parent and take its permissions; domid comes
#: from libxl__build_post, the same way.
LIBXL_HOME = {
    "": "ro",
    "name": "ro",
    "cpu": "ro",
    "memory": "ro",
    "device": "ro",
    "device/suspend": "ro",
    "device/suspend/event-channel": "rw",
    "control": "ro",
    "control/shutdown": "rw",
    "control/feature-poweroff": "rw",
    "control/feature-reboot": "rw",
    "control/feature-suspend": "rw",
    "control/sysrq": "rw",
    "control/platform-feature-multiprocessor-suspend": "ro",
    "control/platform-feature-xs_reset_watches": "ro",
    "data": "rw",
    "drivers": "rw",
    "feature": "rw",
    "attr": "rw",
    "error": "rw",
    "domid": "ro",
}


def walk(c: pyxs.Client, path: bytes) -> list[bytes]:
    """``path`` and every node below it, parents first."""
    found = [path]
    for child in c.list(path):
        found += walk(c, path + b"/" + child)
    return found


def test_domain_home_as_libxl_makes_it(host: SimHost) -> None:
    host.create_domain("guest")
    home = b"/local/domain/1"
    perms = {"ro": [b"n0", b"r1"], "rw": [b"n1"]}
    with host.dom0.xenstore() as c:
        assert c.read(home + b"/name") == b"guest"
        assert c.read(home + b"/domid") == b"1"
        assert c.read(home + b"/control/platform-feature-xs_reset_watches") == b"1"
        assert c.read(home + b"/control/platform-feature-multiprocessor-suspend") == b"1"
        nodes = {p[len(home) + 1 :].decode(): c.get_perms(p) for p in walk(c, home)}
        assert nodes == {node: perms[kind] for node, kind in LIBXL_HOME.items()}
        assert c.read(b"/local/domain/0/name") == b"Domain-0"


def test_guest_reads_its_home_but_not_dom0s(host: SimHost, guest: Domain) -> None:
    with guest.xenstore() as c:
        # Relative paths are the guest's home.
        assert c.read(b"name") == b"guest"
        assert c.read(b"/local/domain/1/domid") == b"1"
        assert b"data" in c.list(b"/local/domain/1")
        with pytest.raises(pyxs.PyXSError) as info:
            c.read(b"/local/domain/0/name")
        assert info.value.args[0] == errno.EACCES


@pytest.mark.parametrize(
    "path", [b"data/x", b"drivers/d", b"feature/f", b"attr/a", b"error/e", b"control/shutdown",
             b"control/feature-poweroff", b"control/sysrq", b"device/suspend/event-channel"]
)
def test_guest_writes_where_libxl_lets_it(host: SimHost, guest: Domain, path: bytes) -> None:
    with guest.xenstore() as c:
        c.write(path, b"1")
        assert c.read(b"/local/domain/1/" + path) == b"1"


@pytest.mark.parametrize(
    "path", [b"name", b"domid", b"mine", b"cpu/0", b"memory/target", b"device/vif",
             b"device/suspend/other", b"control/other",
             b"control/platform-feature-xs_reset_watches"]
)
def test_guest_cannot_write_where_libxl_does_not_let_it(
    host: SimHost, guest: Domain, path: bytes
) -> None:
    with guest.xenstore() as c:
        with pytest.raises(pyxs.PyXSError) as info:
            c.write(path, b"evil")
        assert info.value.args[0] == errno.EACCES
    with host.dom0.xenstore() as c:
        node = b"/local/domain/1/" + path
        assert not c.exists(node) or c.read(node) != b"evil"
        assert (c.read(b"/local/domain/1/name"), c.read(b"/local/domain/1/domid")) == (
            b"guest", b"1")


@pytest.mark.parametrize("path", [b"", b"name", b"domid", b"device", b"control", b"cpu"])
def test_guest_cannot_delete_its_home(host: SimHost, guest: Domain, path: bytes) -> None:
    node = b"/local/domain/1" + (b"/" + path if path else b"")
    with guest.xenstore() as c:
        with pytest.raises(pyxs.PyXSError) as info:
            c.delete(node)
        assert info.value.args[0] == errno.EACCES
    with host.dom0.xenstore() as c:
        assert c.exists(node)
        assert c.read(b"/local/domain/1/name") == b"guest"


def test_guest_deletes_what_is_its_own(host: SimHost, guest: Domain) -> None:
    with guest.xenstore() as c:
        c.write(b"data/x", b"1")
        c.delete(b"data/x")
        c.delete(b"data")  # libxl's rwperm: the node is the guest's
        assert not c.exists(b"data")


def test_introduce_and_release_fire(host: SimHost) -> None:
    with host.dom0.xenstore() as c:
        monitor = c.monitor()
        events: queue.Queue[tuple[bytes, bytes]] = monitor.events
        monitor.watch(b"@introduceDomain", b"intro")
        monitor.watch(b"@releaseDomain", b"release")
        # The immediate first event of each watch.
        firsts = {events.get(timeout=TIMEOUT)[1], events.get(timeout=TIMEOUT)[1]}
        assert firsts == {b"intro", b"release"}
        guest = host.create_domain("guest")
        assert events.get(timeout=TIMEOUT) == (b"@introduceDomain", b"intro")
        with guest.xenstore() as gc:
            assert gc.read(b"name") == b"guest"
        host.destroy_domain(guest)
        assert events.get(timeout=TIMEOUT) == (b"@releaseDomain", b"release")
        assert not c.exists(b"/local/domain/1")
        assert not c.is_domain_introduced(1)


def test_destroy_closes_what_the_domain_held(host: SimHost) -> None:
    guest = host.create_domain("guest")
    e1, shr = guest.evtchn(), guest.gntshr()
    with host.dom0.evtchn() as e0, host.dom0.gnttab() as tab:
        p0 = e0.bind_interdomain(guest.domid, e1.bind_unbound_port(0))
        pages = shr.share_pages(0, 1)
        mapping = tab.map_grant_refs(guest.domid, pages.refs)
        host.destroy_domain(guest)
        assert wait_pending(e0) == p0 and e0.remote(p0) is None
        assert host.hypervisor.stats()["grants"] == 1  # mapped: revoked once unmapped
        assert host.hypervisor.stats()["mappings"] == 1
        mapping.unmap()
        # dom0's port stays bound, waiting for the guest again (as in Xen).
        assert host.hypervisor.stats() == {
            "domains": 1, "connections": 2, "ports": 1, "grants": 0, "mappings": 0,
        }
    e1.close()
    shr.close()
    assert host.domains() == [host.dom0]
    assert not (host.run_dir / "domains" / "1").exists()


def test_domain_ids_are_not_reused(host: SimHost) -> None:
    a = host.create_domain("a")
    host.destroy_domain(a)
    assert host.create_domain("a").domid == 2


@pytest.mark.parametrize("name", ["", "a/b", "x" * 65, "tab\there", "caf\u00e9"])
def test_bad_names_are_refused(host: SimHost, name: str) -> None:
    with pytest.raises(ValueError, match="^a domain name must be 1..64 printable ASCII"):
        host.create_domain(name)


@pytest.mark.parametrize(("name", "said"), [(5, "int 5"), (b"g", "bytes b'g'"),
                                            (None, "NoneType None")])
def test_a_name_that_is_no_str_is_a_type_error(host: SimHost, name: object, said: str) -> None:
    # As Python's own calls: a wrong type is a TypeError, a wrong value
    # of the right one a ValueError.
    with pytest.raises(TypeError, match=f"^a domain name must be a str, not {re.escape(said)}$"):
        host.create_domain(name)  # type: ignore[arg-type]
    assert host.domains() == [host.dom0]


def test_duplicate_names_and_bad_destroys(host: SimHost) -> None:
    host.create_domain("a")
    with pytest.raises(ValueError, match="exists"):
        host.create_domain("a")
    with pytest.raises(ValueError):
        host.destroy_domain(host.dom0)
    with pytest.raises(LookupError):
        host.destroy_domain(42)


def test_attach_joins_a_running_host(host: SimHost) -> None:
    guest = host.create_domain("guest")
    joined = attach(host.run_dir, guest.domid)
    assert joined == guest
    assert (joined.name, joined.xenstore_path) == ("guest", guest.xenstore_path)
    assert attach(host.run_dir, 0).xenstore_path == host.xenstore_path
    with pytest.raises(OSError, match="no domain 7"):
        attach(host.run_dir, 7)


def test_attach_short_of_memory_names_no_missing_domain(
        host: SimHost, monkeypatch: pytest.MonkeyPatch) -> None:
    # The domain is there: what failed is reaching it, and says why.
    import socket

    connect = socket.socket.connect

    def no_memory(sock: socket.socket, address: Any) -> None:
        if str(address).endswith("/domains/0/hypervisor"):
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", no_memory)
    with pytest.raises(PlatformError) as info:
        attach(host.run_dir, 0)
    assert info.value.errno == errno.ENOMEM
    assert str(info.value.strerror).startswith(
        f"cannot join domain 0 of the simulated host in {host.run_dir}: "), info.value
    assert "no domain" not in str(info.value)


def test_stopped_host_refuses_work() -> None:
    host = SimHost()
    host.start()
    host.close()
    host.close()
    with pytest.raises(RuntimeError):
        host.create_domain("late")


def test_nothing_leaks(tmp_path: Path) -> None:
    threads, fds = set(threading.enumerate()), open_fds()
    with SimHost() as host:
        run_dir = host.run_dir
        guest = host.create_domain("guest")
        with guest.gntshr() as shr, host.dom0.gnttab() as tab:
            with guest.evtchn() as e1, host.dom0.evtchn() as e0:
                e0.bind_interdomain(guest.domid, e1.bind_unbound_port(0))
                tab.map_grant_refs(guest.domid, shr.share_pages(0, 2).refs)
                with guest.xenstore() as c:
                    c.write(b"data/k", b"v")
        host.toolstack.add_device("vif", guest.domid)
        host.create_domain("left-running")
        create_domain(host.run_dir, "made-remotely")
    assert not run_dir.exists()
    # Nothing new (earlier tests' leftovers may end meanwhile).
    assert set(threading.enumerate()) - threads == set()
    assert open_fds() - fds == set()


def test_a_close_interrupted_in_a_join_is_finished_by_the_next() -> None:
    """Ctrl-C while close() joins XenStore's thread (the hypervisor has
    stopped): the host is closing (it takes no new work), and the next
    close() stops the rest without closing the hypervisor's descriptors
    again, whose numbers other files may have taken meanwhile."""

    threads, fds = set(threading.enumerate()), open_fds()
    host = SimHost()
    host.start()
    run_dir = host.run_dir
    assert host._hypervisor is not None and host._xenstored is not None
    hypervisor_fds = {host._hypervisor._wake_r, host._hypervisor._wake_w}
    thread = host._xenstored._thread
    assert thread is not None
    join = thread.join

    def interrupted_join(timeout: float | None = None) -> None:
        del thread.join  # only this call
        join(timeout)  # the thread has ended: the interrupt comes on the way out
        raise Interrupted

    thread.join = interrupted_join  # type: ignore[method-assign]
    with numbers_held() as kept:
        # A file of the test's takes each number the first close() closes.
        with kept.closing(), pytest.raises(Interrupted):
            host.close()
        assert hypervisor_fds <= set(kept.numbers)
        with pytest.raises(RuntimeError, match="closing"):
            host.create_domain("late")
        assert run_dir.exists()
        host.close()
        kept.check("the second close()")
    assert not run_dir.exists()
    assert set(threading.enumerate()) - threads == set()
    assert open_fds() - fds == set()


def test_caller_run_dir_is_left_clean(tmp_path: Path) -> None:
    # One that existed is emptied of what the host made, and stays.
    (tmp_path / "run").mkdir()
    with SimHost(tmp_path / "run") as host:
        host.create_domain("guest")
        assert (tmp_path / "run" / "domains" / "1" / "hypervisor").exists()
    assert list((tmp_path / "run").iterdir()) == []
    # One the host made goes, with the parents it made.
    with SimHost(tmp_path / "new" / "run"):
        assert (tmp_path / "new" / "run" / "xenstored").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]


def test_a_host_that_fails_to_start_leaves_no_directory(tmp_path: Path) -> None:
    # A Unix socket path has at most 107 bytes; one of more than 203
    # characters is named by its ends (see test_xenstored_ops.py).
    run_dir = tmp_path / ("d" * 60) / "run"
    host = SimHost(run_dir)
    with pytest.raises(OSError) as info:
        host.start()
    assert info.value.errno == errno.ENAMETOOLONG
    path = run_dir / "xenstored" / "socket"
    assert str(info.value) == (f"[Errno {errno.ENAMETOOLONG}] cannot listen on {path}: AF_UNIX"
                               f" path too long ({len(os.fsencode(path))} bytes, at most 107)")
    assert list(tmp_path.iterdir()) == []


def test_a_start_whose_undo_is_refused_raises_its_own_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A start() that fails once dom0 is added (its XenStore home refused),
    with no thread to be had to remove dom0 in as the start is undone: its
    own error comes out, the undo's refusal logged, and close() (threads
    to be had) finishes the undo.  The refusal (a RuntimeError, "no thread
    to be had") took the start's error's place."""
    from xenback.sim import _hypervisor

    host = SimHost(tmp_path / "run")

    def refuse(domid: int, name: str) -> None:
        monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(threading.Thread, False))
        raise OSError(errno.EMFILE, "no more connections")

    monkeypatch.setattr(host, "_populate", refuse)
    try:
        with caplog.at_level(logging.WARNING, logger="xenback.sim._host"):
            with pytest.raises(OSError, match="no more connections"):
                host.start()
        monkeypatch.undo()
        [said] = [r for r in caplog.records if r.name == "xenback.sim._host"]
        assert said.getMessage() == (
            "undoing the host's start after OSError failed: no thread to remove the domains"
            " in, where no Ctrl-C cuts it short (can't start new thread)")
        assert said.exc_info is not None and type(said.exc_info[1]) is RuntimeError  # where
        assert host.hypervisor.stats()["domains"] == 1  # dom0, left whole
    finally:
        monkeypatch.undo()
        host.close()
    assert host.hypervisor.stats()["domains"] == 0
    assert list(tmp_path.iterdir()) == []


def test_a_ctrl_c_in_a_failed_starts_undo_comes_out_as_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A start() that fails once dom0 is added, a Ctrl-C landing in its
    undo (as the hypervisor stops): the Ctrl-C comes out, not the start's
    error, and nothing says the undo failed; close() finishes it.  Taken
    for an undo refused, it was logged and lost."""
    host = SimHost(tmp_path / "run")

    def refuse(domid: int, name: str) -> None:
        hv = host.hypervisor

        def interrupted() -> None:
            monkeypatch.undo()  # the next stop() is close()'s
            raise Interrupted()

        monkeypatch.setattr(hv, "stop", interrupted)
        raise OSError(errno.EMFILE, "no more connections")

    monkeypatch.setattr(host, "_populate", refuse)
    try:
        with caplog.at_level(logging.WARNING, logger="xenback.sim._host"):
            with pytest.raises(Interrupted):
                host.start()
        assert [r for r in caplog.records if r.name == "xenback.sim._host"] == []
    finally:
        monkeypatch.undo()
        host.close()
    assert host.hypervisor.stats()["domains"] == 0
    assert list(tmp_path.iterdir()) == []


def test_a_with_whose_start_leaves_the_host_closing_says_it_must_be_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``with host:`` whose start() fails, with no thread to be had to undo
    it: its error says that the host is left closing, and where, for the
    caller to close() it (its XenStore thread and run dir are still
    there).  It said nothing of it: ``with SimHost() as host`` gives no
    host to close, and nothing told the caller one was left."""
    from xenback.sim import _hypervisor

    host = SimHost(tmp_path / "run")

    def refuse(domid: int, name: str) -> None:
        monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(threading.Thread, False))
        raise OSError(errno.EMFILE, "no more connections")

    monkeypatch.setattr(host, "_populate", refuse)
    try:
        with pytest.raises(OSError, match="no more connections") as info:
            with host:
                pytest.fail("the body ran")
        monkeypatch.undo()
        assert info.value.__notes__ == [
            f"the simulated host in {tmp_path / 'run'} is left closing: close() it to finish"]
        assert (tmp_path / "run").exists()
    finally:
        monkeypatch.undo()
        host.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call", [SimHost, lambda run_dir: attach(run_dir, 1)],
                         ids=["SimHost", "attach"])
def test_an_empty_run_dir_is_refused(call: Callable[[str], object]) -> None:
    # Path("") is the current directory, not a run directory anyone meant.
    with pytest.raises(ValueError, match="^run_dir is empty"):
        call("")


@pytest.mark.parametrize("call", [SimHost, lambda run_dir: attach(run_dir, 1)],
                         ids=["SimHost", "attach"])
@pytest.mark.parametrize(("run_dir", "kind"), [(3, "int"), (b"/tmp/run", "bytes")],
                         ids=["int", "bytes"])
def test_a_run_dir_of_the_wrong_type_is_named(call: Callable[[object], object],
                                              run_dir: object, kind: str) -> None:
    # os.fspath()'s own message names no argument, and Path()'s for bytes
    # is "argument should be a str object or an os.PathLike object...".
    with pytest.raises(TypeError, match=f"^run_dir must be a str or an os.PathLike of str, "
                                        f"not {kind}$"):
        call(run_dir)


def test_domain_handles_are_independent(host: SimHost) -> None:
    guest: Domain = host.create_domain("guest")
    a, b = guest.evtchn(), guest.evtchn()
    assert a.fileno() != b.fileno()
    a.close()
    assert b.bind_unbound_port(0) >= 1
    b.close()


def test_other_processes_create_and_destroy_through_dom0(host: SimHost) -> None:
    from xenback.platform import PlatformError
    from xenback.sim import destroy_domain

    guest = create_domain(host.run_dir, "remote")
    assert guest.name == "remote" and host.domain(guest.domid) == guest
    with guest.xenstore() as c:
        assert c.read(b"name") == b"remote"
    with pytest.raises(PlatformError) as info:
        create_domain(host.run_dir, "remote")
    assert info.value.errno == errno.EINVAL
    destroy_domain(host.run_dir, guest.domid)
    assert host.domains() == [host.dom0]
    with pytest.raises(PlatformError) as info:
        destroy_domain(host.run_dir, guest.domid)
    assert info.value.errno == errno.ESRCH


def test_only_dom0_controls_domains(host: SimHost) -> None:
    import json
    import socket

    from xenback.sim._hypervisor import domain_socket

    guest = host.create_domain("guest")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(os.fspath(domain_socket(host.run_dir, guest.domid)))
        sock.send(json.dumps({"op": "domain_create", "name": "evil"}).encode())
        assert json.loads(sock.recv(65536))["errno"] == errno.EPERM
        sock.send(json.dumps({"op": "domain_destroy", "domid": 0}).encode())
        assert json.loads(sock.recv(65536))["errno"] == errno.EPERM
    assert [d.name for d in host.domains()] == ["Domain-0", "guest"]


def test_dom0_cannot_destroy_itself_over_the_wire(host: SimHost) -> None:
    import json
    import socket

    from xenback.sim._hypervisor import domain_socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(os.fspath(domain_socket(host.run_dir, 0)))
        sock.send(json.dumps({"op": "domain_destroy", "domid": 0}).encode())
        assert json.loads(sock.recv(65536))["errno"] == errno.EINVAL
        # A wrong type is EINVAL too, as a bad value: not EIO and a
        # traceback in the host's log.  The hypervisor's request check
        # answers it, before SimHost's control handler sees the request.
        sock.send(json.dumps({"op": "domain_destroy", "domid": "1"}).encode())
        assert json.loads(sock.recv(65536))["errno"] == errno.EINVAL
        sock.send(json.dumps({"op": "domain_create", "name": 5}).encode())
        assert json.loads(sock.recv(65536))["errno"] == errno.EINVAL
    assert host.domains() == [host.dom0]
    with host.dom0.evtchn() as ch:  # dom0 still reaches the hypervisor
        ch.bind_unbound_port(0)


def test_a_control_request_no_thread_can_serve_is_refused(
        host: SimHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each control request runs in a thread of its own: one the host has
    no thread left for is answered EAGAIN, and leaves nothing behind (a
    thread never started, kept, made every close() fail to join it)."""
    import json
    import socket

    from xenback.platform import PlatformError
    from xenback.sim._hypervisor import domain_socket

    start = threading.Thread.start

    def no_control_thread_left(thread: threading.Thread) -> None:
        if thread.name.startswith("xenback-sim-control"):
            raise RuntimeError("can't start new thread")
        start(thread)

    guest = host.create_domain("guest")
    monkeypatch.setattr(threading.Thread, "start", no_control_thread_left)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(os.fspath(domain_socket(host.run_dir, 0)))
        sock.send(json.dumps({"op": "domain_destroy", "domid": guest.domid}).encode())
        refused = json.loads(sock.recv(65536))
    assert refused["errno"] == errno.EAGAIN
    assert "can't start new thread" in refused["error"]
    with pytest.raises(PlatformError) as info:  # as another process is told
        create_domain(host.run_dir, "second")
    assert info.value.errno == errno.EAGAIN
    monkeypatch.undo()
    assert host.domains() == [host.dom0, guest]
    host.close()  # joins every control thread it knows of


def test_a_hypervisor_without_domain_control_says_so(tmp_path: Path) -> None:
    """A hypervisor service run without a toolstack (set_control never
    called) answers dom0's control requests ENOSYS, not an internal error."""
    import json
    import socket

    from xenback.sim._hypervisor import Hypervisor

    hv = Hypervisor(tmp_path)
    hv.start()
    try:
        path = hv.add_domain(0, "Domain-0")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(os.fspath(path))
            for request in ({"op": "domain_create", "name": "new"},
                            {"op": "domain_destroy", "domid": 1}):
                sock.send(json.dumps(request).encode())
                assert json.loads(sock.recv(65536))["errno"] == errno.ENOSYS
    finally:
        hv.stop()


@pytest.mark.parametrize("refusal", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                     Interrupted()], ids=["ENOSPC", "Ctrl-C"])
def test_a_hypervisor_domain_whose_listener_cannot_be_watched_is_not_added(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: BaseException) -> None:
    """epoll refusing a new domain's listener (ENOSPC: max_user_watches),
    or a Ctrl-C inside the register: add_domain() raises it, and the
    domain is not there, its socket neither; it is added again, and
    stop() stops.  The domain was listed with its listener unwatched:
    stop() and remove_domain() failed on it (KeyError from unregister)."""
    from xenback.sim._hypervisor import Hypervisor, domain_socket

    hv = Hypervisor(tmp_path)
    hv.start()
    try:
        selector = hv._selector
        register = selector.register

        def refuses(fileobj: Any, events: int, data: Any = None) -> Any:
            monkeypatch.setattr(selector, "register", register)  # once
            raise refusal

        monkeypatch.setattr(selector, "register", refuses)
        with pytest.raises(type(refusal)):
            hv.add_domain(3, "guest")
        assert hv.stats()["domains"] == 0
        assert not domain_socket(tmp_path, 3).exists()
        with pytest.raises(ValueError, match="^no domain 3$"):
            hv.remove_domain(3)
        assert hv.add_domain(3, "guest") == domain_socket(tmp_path, 3)
        hv.remove_domain(3)
    finally:
        hv.stop()


def test_a_hypervisor_add_domain_interrupted_anywhere_adds_it_whole_or_not_at_all(
        tmp_path: Path) -> None:
    """A Ctrl-C landing anywhere in add_domain(): the domain is there,
    listened for and removable, or not there at all, with no socket file
    nor descriptor of its left, and it can be added again (its listener
    is not left watched: the next one, given the same descriptor number,
    could not be), nor to the collector to close (a ResourceWarning: one
    landing as socket() returned).  stop() stops either way."""
    import gc
    import warnings

    from xenback.sim._hypervisor import Hypervisor, domain_socket

    def landing(n: int) -> str:
        hv = Hypervisor(tmp_path / str(n))
        hv.start()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                where = interrupted_at(n, SIM_CODE, lambda: hv.add_domain(3, "guest"))
                gc.collect()
            left = [str(w.message) for w in caught if w.category is ResourceWarning]
            assert not left, f"interrupted {where}: {left}"
            path = domain_socket(hv.run_dir, 3)
            if hv.stats()["domains"]:
                assert path.exists(), f"interrupted {where}: added with no socket"
                hv.remove_domain(3)
            assert not path.exists(), f"interrupted {where}: its socket is left"
            assert not sockets_named_under(hv.run_dir), f"interrupted {where}: descriptors left"
            assert hv.add_domain(3, "guest") == path
            hv.remove_domain(3)
        finally:
            hv.stop()
        return where

    landed = landings(landing)
    assert any("Hypervisor.add_domain" in where for where in landed), landed


@pytest.mark.parametrize(("refusal", "registered"), [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), False),
    (Interrupted(), False),
    (Interrupted(), True),
], ids=["ENOSPC", "Ctrl-C", "Ctrl-C once watched"])
def test_a_hypervisor_add_domain_undo_interrupted_anywhere_leaves_nothing(
        tmp_path: Path, refusal: BaseException, registered: bool) -> None:
    """epoll refusing a new domain's listener, or a first Ctrl-C there (in
    the register, or as it returns, the listener watched), then a (second)
    Ctrl-C landing anywhere in add_domain()'s undo: the domain is not
    there, nor its socket file, nor a descriptor of its, nor its listener
    in the selector (the loop would find it readable for good once
    somebody connected), and it can be added again.  stop() stops.  Only
    a listener watched has an unregister() that returns, for a Ctrl-C to
    land as it does, before the rest of the undo."""
    from xenback.sim._hypervisor import Hypervisor, domain_socket

    def landing(n: int) -> str:
        hv = Hypervisor(tmp_path / str(n))
        hv.start()
        try:
            watched = len(hv._selector.get_map())
            register = hv._selector.register
            refused: list[BaseException] = []

            def refuses(fileobj: Any, events: int, data: Any = None) -> Any:
                hv._selector.register = register  # type: ignore[method-assign]
                if registered:  # as a Ctrl-C landing as it returns
                    register(fileobj, events, data)
                refused.append(refusal)
                raise refusal

            hv._selector.register = refuses  # type: ignore[method-assign]

            def add() -> None:
                try:
                    hv.add_domain(3, "guest")
                except BaseException as e:
                    if refusal not in (e, e.__cause__):  # a Ctrl-C in the undo
                        raise

            # Only in the undo: anywhere before is the sweep above's.
            where = interrupted_at(n, SIM_CODE, add, unless=lambda: not refused)
            hv._selector.register = register  # type: ignore[method-assign]
            path = domain_socket(hv.run_dir, 3)
            assert hv.stats()["domains"] == 0, f"interrupted {where}: the domain is listed"
            assert len(hv._selector.get_map()) == watched, (
                f"interrupted {where}: its listener is watched")
            assert not path.exists(), f"interrupted {where}: its socket is left"
            assert eventually(lambda: not sockets_named_under(hv.run_dir)), (
                f"interrupted {where}: descriptors left")
            assert hv.add_domain(3, "guest") == path
            hv.remove_domain(3)
        finally:
            hv.stop()
        return where

    landed = landings(landing)
    assert sum("Hypervisor.add_domain" in where for where in landed) >= 2, landed


def test_a_hypervisor_stop_interrupted_anywhere_closes_nothing_twice(tmp_path: Path) -> None:
    """A Ctrl-C landing anywhere in the hypervisor service's stop(), then
    stop() again: each of its descriptors is closed once.  One landing as
    a close returned left the closed number stored, and the next stop()
    closed it again: by then the number of a file of someone else's (the
    test's, which holds every number stop() closed: see HeldNumbers)."""
    from xenback.sim._hypervisor import Hypervisor


    def landing(n: int) -> str:
        before = descriptors()
        hv = Hypervisor(tmp_path / str(n))
        hv.start()
        hv.add_domain(0, "Domain-0")
        with numbers_held() as held:
            try:
                with held.closing():
                    where = interrupted_at(n, SIM_CODE, hv.stop)
            finally:
                hv.stop()
            held.check(f"interrupted {where}")
        assert eventually(lambda: descriptors() <= before), (
            f"interrupted {where}: new descriptors {sorted(descriptors() - before)}")
        return where

    landed = landings(landing)
    assert any("Hypervisor.stop" in where for where in landed), landed


def test_a_hypervisor_removal_its_caller_does_interrupted_anywhere_is_whole(
        tmp_path: Path) -> None:
    """With no service thread serving (none started here), remove_domain()
    does the removal in its caller's stead.  A Ctrl-C landing anywhere in
    it leaves the domain removed whole, or there and removable again: the
    next remove_domain() removes it or finds it gone (ValueError), and
    either way its socket file, its listener and its handles (hung up)
    are gone, with no descriptor of its left.  One landing as the domain
    was taken off the list left the rest for good: its listener open and
    watched, its handles connected, its socket file there, and the domain
    not removable again."""
    import contextlib
    import socket

    from xenback.sim._hypervisor import Hypervisor

    def landing(n: int) -> str:
        hv = Hypervisor(tmp_path / str(n))
        clients: list[socket.socket] = []
        try:
            path = hv.add_domain(3, "guest")
            for _ in range(2):
                clients.append(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
                clients[-1].connect(os.fspath(path))
            assert hv.stats()["connections"] == 2  # accepted
            where = interrupted_at(n, SIM_CODE, lambda: hv.remove_domain(3))
            with contextlib.suppress(ValueError):  # removed already
                hv.remove_domain(3)
            assert hv.stats()["domains"] == 0
            assert not path.exists(), f"interrupted {where}: its socket file is left"
            assert not hv._selector.get_map(), f"interrupted {where}: still watched"
            for client in clients:
                assert client.recv(1, socket.MSG_DONTWAIT) == b"", (
                    f"interrupted {where}: a handle is left open")
        finally:
            close_fds([client.detach() for client in clients])
            hv.stop()
        assert eventually(lambda: not sockets_named_under(hv.run_dir)), (
            f"interrupted {where}: descriptors left")
        return where

    landed = landings(landing)
    assert any("Hypervisor.remove_domain" in where for where in landed), landed


def test_a_hypervisor_stop_interrupted_anywhere_removes_every_domain_whole(
        tmp_path: Path) -> None:
    """A Ctrl-C landing anywhere in the hypervisor service's stop(), then
    stop() again: every domain is removed whole, its socket file and its
    handles (hung up) gone, none left to the collector to close (a
    ResourceWarning).  One landing as stop() took a domain off the list
    left the rest of its removal undone: the next stop() never saw it."""
    import gc
    import socket
    import warnings

    from xenback.sim._hypervisor import Hypervisor

    def landing(n: int) -> str:
        hv = Hypervisor(tmp_path / str(n))
        hv.start()
        clients: list[socket.socket] = []
        try:
            paths = [hv.add_domain(domid, f"d{domid}") for domid in (0, 1)]
            for path in paths:
                clients.append(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
                clients[-1].connect(os.fspath(path))
            assert hv.stats()["connections"] == 2  # accepted
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                try:
                    where = interrupted_at(n, SIM_CODE, hv.stop)
                finally:
                    hv.stop()
                gc.collect()
            left = [str(w.message) for w in caught if w.category is ResourceWarning]
            assert not left, f"interrupted {where}: {left}"
            assert not any(path.exists() for path in paths), (
                f"interrupted {where}: a socket file is left")
            for client in clients:
                assert client.recv(1, socket.MSG_DONTWAIT) == b"", (
                    f"interrupted {where}: a handle is left open")
        finally:
            close_fds([client.detach() for client in clients])
            hv.stop()
        assert eventually(lambda: not sockets_named_under(hv.run_dir)), (
            f"interrupted {where}: descriptors left")
        return where

    landed = landings(landing)
    assert any("Hypervisor.stop" in where for where in landed), landed


def _no_threads_since(threads: set[threading.Thread], where: str) -> None:
    """Wait until no thread is left but ``threads``; else fail saying
    which are, after the Ctrl-C ``where``."""
    assert eventually(lambda: set(threading.enumerate()) <= threads), (
        f"interrupted {where}: threads left {set(threading.enumerate()) - threads}")


def test_a_hypervisor_start_interrupted_anywhere_removes_domains_and_stops(
        tmp_path: Path) -> None:
    """A Ctrl-C landing anywhere in the hypervisor service's start(): its
    domains are still removed, and stop() stops it, leaving no thread.
    One landing after it marked itself serving, before it started its
    thread, left remove_domain() waiting for ever for a thread that never
    ran, and stop() raising RuntimeError ("cannot join thread before it
    is started"), every time: the host could never close."""
    from xenback.sim._hypervisor import Hypervisor


    def landing(n: int) -> str:
        before = descriptors()
        threads = set(threading.enumerate())
        hv = Hypervisor(tmp_path / str(n))
        made = descriptors()  # the selector's
        try:
            where = interrupted_at(n, SIM_CODE, hv.start)
            if hv._thread is None:
                # Cut short before its thread: it took back what it made.
                _descriptors_left_since(made, f"interrupted {where}")
                if n % 2:
                    hv.start()
            hv.add_domain(1, "guest")
            removal = threading.Thread(target=hv.remove_domain, args=(1,), daemon=True)
            removal.start()
            removal.join(TIMEOUT)
            assert not removal.is_alive(), f"interrupted {where}: remove_domain() hangs"
        finally:
            hv.stop()
        _no_threads_since(threads, where)
        _descriptors_left_since(before, f"interrupted {where}")
        return where

    landed = landings(landing)
    assert any("Hypervisor.start" in where for where in landed), landed


def _descriptors_left_since(before: frozenset[tuple[int, str]], where: str) -> None:
    assert eventually(lambda: descriptors() <= before), (
        f"{where}: new descriptors {sorted(descriptors() - before)}")


def test_a_hypervisor_made_interrupted_anywhere_keeps_no_descriptor(tmp_path: Path) -> None:
    """A Ctrl-C landing anywhere in making a hypervisor service (or as
    Hypervisor() returns, before its caller has it): nothing is left open.
    It made its wake-up pipe and spare descriptor, plain numbers, in
    __init__: cut short, nobody ever had them to close."""
    from xenback.sim._hypervisor import Hypervisor

    def landing(n: int) -> str:
        before = descriptors()
        made: list[Hypervisor] = []
        where = interrupted_at(n, SIM_CODE, lambda: made.append(Hypervisor(tmp_path)))
        made.clear()  # dropped unstopped, as SimHost._start drops one it never got
        _descriptors_left_since(before, f"interrupted {where}")
        return where

    landed = landings(landing)
    assert any("Hypervisor.__init__" in where for where in landed), landed


def test_a_hypervisor_whose_start_fails_keeps_nothing_and_starts_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """epoll refusing the wake-up pipe (ENOSPC: max_user_watches) as the
    service is made or started: it raises, and the pipe is not left open;
    started again, it serves, and stop() leaves nothing.  Made in
    __init__, the pipe was lost with the object that never was."""
    import json
    import selectors
    import socket

    from xenback.sim._hypervisor import Hypervisor, domain_socket

    class Refusing(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
        refusals = 1

        def register(self, fileobj: Any, events: int, data: Any = None) -> Any:
            if Refusing.refusals:
                Refusing.refusals -= 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().register(fileobj, events, data)

    monkeypatch.setattr(selectors, "DefaultSelector", Refusing)
    before = descriptors()
    made: list[Hypervisor] = []
    with pytest.raises(OSError) as info:
        made.append(Hypervisor(tmp_path))
        made[0].start()
    assert info.value.errno == errno.ENOSPC
    # The selector's epoll alone, which stop() closes.
    assert {what for _, what in descriptors() - before} <= {"anon_inode:[eventpoll]"}
    [hv] = made
    try:
        hv.start()
        hv.add_domain(0, "Domain-0")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(os.fspath(domain_socket(tmp_path, 0)))
            sock.send(b'{"op": "info", "id": 1}')
            assert json.loads(sock.recv(65536))["domid"] == 0
    finally:
        hv.stop()
    _descriptors_left_since(before, "stopped")


@pytest.mark.parametrize("refusal", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                     Interrupted()], ids=["ENOSPC", "Ctrl-C"])
def test_a_hypervisor_start_undo_interrupted_anywhere_leaves_nothing(
        tmp_path: Path, refusal: BaseException) -> None:
    """epoll refusing the wake-up pipe as the service starts, or a first
    Ctrl-C there, then a (second) Ctrl-C landing anywhere in start()'s
    undo: started again (every other time), it serves, and once stopped
    nothing is left open.  The undo let go of the descriptors' numbers
    before it closed them: cut short, nobody had them to close."""
    from xenback.sim._hypervisor import Hypervisor, domain_socket

    def landing(n: int) -> str:
        before = descriptors()
        threads = set(threading.enumerate())
        hv = Hypervisor(tmp_path / str(n))
        register = hv._selector.register

        def refuses(fileobj: Any, events: int, data: Any = None) -> Any:
            hv._selector.register = register  # type: ignore[method-assign]
            raise refusal

        hv._selector.register = refuses  # type: ignore[method-assign]

        def start() -> None:
            try:
                hv.start()
            except BaseException as e:
                if refusal is not e:  # a Ctrl-C in the undo
                    raise

        try:
            # Only in the undo: anywhere before is the sweep above's.
            where = interrupted_at(n, SIM_CODE, start,
                                   unless=lambda: hv._selector.register is refuses)
            if n % 2:
                hv.start()
                assert hv.add_domain(1, "guest") == domain_socket(hv.run_dir, 1)
                hv.remove_domain(1)
        finally:
            hv.stop()
        _no_threads_since(threads, where)
        _descriptors_left_since(before, f"interrupted {where}")
        return where

    landed = landings(landing)
    assert sum("Hypervisor." in where for where in landed) >= 2, landed


def test_a_hypervisor_starts_once_and_never_once_stopped(tmp_path: Path) -> None:
    """A second start() is refused, not a second thread and pipe (the
    first pipe lost); one after stop() is refused too, not a thread
    serving a closed selector."""
    from xenback.sim._hypervisor import Hypervisor

    before = descriptors()
    hv = Hypervisor(tmp_path)
    hv.start()
    try:
        threads = set(threading.enumerate())
        made = descriptors()
        with pytest.raises(RuntimeError, match="^the hypervisor service is started already$"):
            hv.start()
        assert set(threading.enumerate()) == threads
        assert descriptors() <= made  # no second pipe (another thread may close one)
    finally:
        hv.stop()
    with pytest.raises(RuntimeError, match="^the host is stopping$"):
        hv.start()
    _descriptors_left_since(before, "stopped")


class _NoThread(threading.Thread):
    """A thread the system has no room for."""

    def start(self) -> None:
        raise RuntimeError("can't start new thread")


class _ThreadingWith:
    """The threading module as _hypervisor sees it, with another Thread
    for its service thread; the others it makes (a removal's, see
    Hypervisor._uninterrupted) are threading's, or refused as when no
    thread is to be had (``workers=False``), or of class ``workers``."""

    def __init__(self, thread: type[threading.Thread],
                 workers: bool | type[threading.Thread] = True) -> None:
        self._thread = thread
        self._worker = (workers if isinstance(workers, type)
                        else threading.Thread if workers else _NoThread)

    def Thread(self, *args: Any, **kwargs: Any) -> threading.Thread:  # noqa: N802
        if kwargs.get("name", "").startswith("xenback-sim-hypervisor:"):
            return self._thread(*args, **kwargs)
        return self._worker(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(threading, name)


class _TwoRemovals:
    """Two remove_domain() calls of one domain of ``hv`` from threads of
    their own (as a call cut short and the next), for the tests of a
    start() cut short: what each call answered, checks that both were
    answered and the domain removed, and the first Ctrl-C (``cut``) for
    a sweep to land a second one after."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.threads: list[threading.Thread] = []
        self.answers: list[BaseException | None] = []
        self.cut: list[Interrupted] = []

    def cut_short(self) -> NoReturn:
        """The first Ctrl-C, in starting the service thread."""
        self.cut.append(Interrupted())
        raise self.cut[0]

    def start(self) -> None:
        """hv.start(), its first Ctrl-C (:meth:`cut_short`) taken as
        expected: a second one goes on to the sweep."""
        try:
            self.hv.start()
        except Interrupted as e:
            if e is not self.cut[0]:
                raise

    def unless(self) -> bool:
        """For interrupted_at: no landing before the first Ctrl-C."""
        return not self.cut

    def _remove(self) -> None:
        try:
            self.hv.remove_domain(1)
        except BaseException as e:
            self.answers.append(e)
        else:
            self.answers.append(None)

    def queue(self) -> None:
        """Add domain 1 and ask for its removal twice; return once both
        wait in the service's queue (it has no thread serving it yet)."""
        self.hv.add_domain(1, "guest")
        for queued in (1, 2):
            self.threads.append(threading.Thread(target=self._remove, daemon=True))
            self.threads[-1].start()
            assert eventually(lambda q=queued: len(self.hv._removals) == q), "none queued"

    def joined(self, waits: str) -> None:
        """Both calls returned; else fail saying ``waits``."""
        for removal in self.threads:
            removal.join(TIMEOUT)
            assert not removal.is_alive(), waits

    def answered(self, where: str) -> None:
        """Both calls removed the domain, once (its socket is gone); else
        fail saying ``where``."""
        from xenback.sim._hypervisor import domain_socket

        assert self.answers == [None, None], where
        assert not domain_socket(self.hv.run_dir, 1).exists(), where


@pytest.mark.parametrize("end", ["Ctrl-C", "stop"])
def test_a_removal_asked_for_as_a_hypervisor_start_is_cut_short_is_answered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str) -> None:
    """Two remove_domain() calls of one domain from other threads (as a
    call cut short and the next), asked for once start() has marked the
    service serving, then a Ctrl-C in starting its thread (before it
    runs), or a stop() from elsewhere meanwhile: the domain is removed
    once and both callers are answered, neither waiting for a stop() that
    nobody may ever call.  After the Ctrl-C they were left queued for a
    thread that never came, waiting until stop()."""
    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    removals = _TwoRemovals(hv)

    class CutShort(threading.Thread):
        def start(self) -> None:
            removals.queue()
            if end == "stop":
                hv.stop()
                super().start()  # runs only now, to find the service stopped
            else:
                raise Interrupted

    monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(CutShort))
    try:
        if end == "stop":
            hv.start()
        else:
            with pytest.raises(Interrupted):
                hv.start()
        monkeypatch.undo()
        removals.joined("remove_domain() waits for a thread that never ran")
        removals.answered(end)
        assert hv.stats()["domains"] == 0
    finally:
        monkeypatch.undo()
        hv.stop()


_WORKERS = pytest.mark.parametrize("workers", [True, False],
                                   ids=["removals in a thread", "no thread to be had"])


@_WORKERS
@pytest.mark.parametrize("undone_by", ["start", "stop"])
def test_removals_queued_as_a_hypervisor_start_is_cut_short_survive_a_second_ctrl_c(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, undone_by: str, workers: bool) -> None:
    """Two remove_domain() calls queued as start() launches its thread,
    then a Ctrl-C landing anywhere in what answers them: start()'s undo
    of a Ctrl-C in starting that thread, or a stop() before it runs (then
    stop() again).  Both callers are answered, and stop() stops.  The
    queue was taken whole before it was worked through: the rest was lost,
    their callers waiting for ever; and stop() answered them in place, so
    the next stop() answered one again and failed (InvalidStateError).
    The removals run in a thread of their own, where no Ctrl-C lands: one
    landing in a removal itself (_remove_domain) left the domain half
    removed, for good.  With no thread to be had, none is done (stop()
    says so, a RuntimeError) but by a stop() that has one, the domain
    whole meanwhile: done in place, a Ctrl-C landing within a removal
    left it half removed, for good."""
    from xenback.sim import _hypervisor
    from xenback.sim._hypervisor import domain_socket

    def stop_refused(hv: Hypervisor) -> None:
        with pytest.raises(RuntimeError, match="no thread to remove the domains in"):
            hv.stop()

    def landing(n: int) -> str:
        hv = _hypervisor.Hypervisor(tmp_path / str(n))
        removals = _TwoRemovals(hv)
        launched: list[threading.Thread] = []

        class CutShort(threading.Thread):
            def start(self) -> None:
                removals.queue()
                launched.append(self)  # as if launched, not yet running
                if undone_by == "start":
                    removals.cut_short()

        monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(CutShort, workers))
        try:
            if undone_by == "start":
                where = interrupted_at(n, SIM_CODE, removals.start, removals.unless)
            else:
                hv.start()
                monkeypatch.setattr(_hypervisor, "threading",
                                    _ThreadingWith(threading.Thread, workers))
                removals.cut.append(Interrupted())  # lands from here on
                stop = hv.stop if workers else functools.partial(stop_refused, hv)
                where = interrupted_at(n, SIM_CODE, stop, removals.unless)
            monkeypatch.undo()
            if not workers:
                assert 1 in hv._domains, f"interrupted {where}: the domain half removed"
                assert domain_socket(hv.run_dir, 1).exists(), f"interrupted {where}"
                assert removals.answers == [], f"interrupted {where}"
            hv.stop()
            [late] = launched
            threading.Thread.start(late)  # runs only now, to find the service stopped
            late.join(TIMEOUT)
            removals.joined(f"interrupted {where}: remove_domain() waits")
            removals.answered(f"interrupted {where}")
        finally:
            monkeypatch.undo()
            hv.stop()
        return where

    landed = landings(landing)
    assert any("Hypervisor." in where for where in landed), landed


@_WORKERS
@pytest.mark.parametrize("thread", ["runs as stop() waits", "never runs"])
def test_removals_left_by_a_cut_short_start_undo_are_answered_by_a_late_service_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread: str, workers: bool) -> None:
    """Two remove_domain() calls queued as start() launches its thread, a
    Ctrl-C in starting it, then a second one landing anywhere in the undo
    that answers them; the thread, launched all the same, runs only as
    stop() waits for it, and ends at once (stopping): both callers are
    answered, and stop() stops.  The thread took the queue whole at its
    end: one the undo answered before the Ctrl-C took it off was answered
    again (InvalidStateError, in the thread), and the rest were lost,
    their callers waiting for ever.  The undo runs them in a thread of
    its own, as the test above's; with no thread to be had, it runs
    none, and leaves them to stop(), as a thread that never runs does."""
    from xenback.sim import _hypervisor

    def landing(n: int) -> str:
        hv = _hypervisor.Hypervisor(tmp_path / str(n))
        removals = _TwoRemovals(hv)
        failed: list[BaseException | None] = []

        class CutShort(threading.Thread):
            def start(self) -> None:
                removals.queue()
                removals.cut_short()  # launched, not yet running

            def is_alive(self) -> bool:
                # stop() asks as it is about to wait for it: it runs now.
                if thread == "runs as stop() waits" and not self._started.is_set():
                    threading.Thread.start(self)
                return super().is_alive()

            def run(self) -> None:
                try:
                    super().run()
                except BaseException as e:
                    failed.append(e)
                    raise

        monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(CutShort, workers))
        try:
            where = interrupted_at(n, SIM_CODE, removals.start, removals.unless)
            monkeypatch.undo()
            hv.stop()
            removals.joined(f"interrupted {where}: remove_domain() waits")
            assert failed == [], f"interrupted {where}"
            removals.answered(f"interrupted {where}")
        finally:
            monkeypatch.undo()
            hv.stop()
        return where

    landed = landings(landing)
    # Where the undo waits, or finds no thread to be had.
    assert any("Hypervisor._uninterrupted," in where for where in landed), landed


def test_a_hypervisor_domain_whose_directory_cannot_be_made_is_refused_quietly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A domain whose socket's directory cannot be made (``domains`` is a
    file): add_domain() says so, and takes its listener back without
    logging a failure to remove a socket file it never made."""
    from xenback.sim._hypervisor import Hypervisor, domain_socket

    (tmp_path / "domains").write_text("")
    hv = Hypervisor(tmp_path)
    hv.start()
    try:
        with pytest.raises(OSError) as info:
            hv.add_domain(3, "guest")
        assert info.value.errno == errno.ENOTDIR
        # Named, and nothing said of the path's length, which is not why.
        assert str(info.value) == (f"[Errno {errno.ENOTDIR}] cannot listen on "
                                   f"{domain_socket(tmp_path, 3)}: {os.strerror(errno.ENOTDIR)}")
        assert hv.stats()["domains"] == 0
    finally:
        hv.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_hypervisor_domain_whose_socket_file_went_is_refused_quietly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """epoll refusing a new domain's listener once somebody removed its
    socket file: add_domain() says so, and its undo, finding no file to
    remove, logs nothing (there is nothing to report, bound or not)."""
    from xenback.sim._hypervisor import Hypervisor, domain_socket

    hv = Hypervisor(tmp_path)
    hv.start()
    try:
        selector = hv._selector
        register = selector.register
        path = domain_socket(tmp_path, 3)

        def refuses(fileobj: Any, events: int, data: Any = None) -> Any:
            monkeypatch.setattr(selector, "register", register)  # once
            path.unlink()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(selector, "register", refuses)
        with pytest.raises(OSError) as info:
            hv.add_domain(3, "guest")
        assert info.value.errno == errno.ENOSPC
        assert hv.stats()["domains"] == 0
    finally:
        hv.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_hypervisor_with_no_descriptor_to_spare_starts_without_its_reserve(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors for the spare one (EMFILE opening it) as the
    service starts: it starts all the same, without it, and serves."""
    import json
    import socket

    from xenback.sim._hypervisor import Hypervisor, domain_socket

    real_open = os.open

    def short_of_one(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == os.devnull:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(path, flags, *args, **kwargs)

    before = descriptors()
    hv = Hypervisor(tmp_path)
    monkeypatch.setattr(os, "open", short_of_one)
    try:
        hv.start()
    finally:
        monkeypatch.undo()
    try:
        assert hv._reserve == -1
        hv.add_domain(0, "Domain-0")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(os.fspath(domain_socket(tmp_path, 0)))
            sock.send(b'{"op": "info", "id": 1}')
            assert json.loads(sock.recv(65536))["domid"] == 0
    finally:
        hv.stop()
    _descriptors_left_since(before, "stopped")


def test_a_hypervisor_thread_that_runs_only_after_stop_ends_without_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C inside threading's start() can leave the service thread
    launched but not yet running: stop() does not join it (join() refuses
    a thread not started) and closes the service's descriptors.  When it
    runs, it ends at once; it went on to serve, and died on the closed
    selector (an unhandled thread exception, which fails the test)."""
    from xenback.sim import _hypervisor

    unlaunched: list[threading.Thread] = []

    class CutShort(threading.Thread):
        def start(self) -> None:
            unlaunched.append(self)
            raise Interrupted

    hv = _hypervisor.Hypervisor(tmp_path)
    monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(CutShort))
    with pytest.raises(Interrupted):
        hv.start()
    monkeypatch.undo()
    hv.stop()
    [late] = unlaunched
    threading.Thread.start(late)
    late.join(TIMEOUT)
    assert not late.is_alive()


def test_a_hypervisor_stops_with_its_wake_up_pipe_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wake-ups the service thread has yet to read can fill its pipe (here
    a thread launched by a start() cut short, which never ran): stop()'s
    own wake-up finds no room and stop() still stops, closing the
    service's descriptors.  It raised BlockingIOError, and left them open."""
    from xenback.sim import _hypervisor

    unlaunched: list[threading.Thread] = []

    class CutShort(threading.Thread):
        def start(self) -> None:
            unlaunched.append(self)
            raise Interrupted

    before = descriptors()
    hv = _hypervisor.Hypervisor(tmp_path)
    monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(CutShort))
    with pytest.raises(Interrupted):
        hv.start()
    monkeypatch.undo()
    with pytest.raises(BlockingIOError):
        while True:
            os.write(hv._wake_w, b"x" * 4096)
    hv.stop()
    assert descriptors() <= before
    [late] = unlaunched
    threading.Thread.start(late)
    late.join(TIMEOUT)
    assert not late.is_alive()


def _left_waiting(workers: list[threading.Thread], cut: int = 1,
                  as_it_ends: bool = False) -> type[threading.Thread]:
    """A removal's thread (see Hypervisor._uninterrupted) whose first
    join() a Ctrl-C cuts short, as it lands in the wait of the main thread,
    the thread going on without it (``as_it_ends``: as the wait returns,
    the thread ended); the first ``cut`` made so, each put in ``workers``.
    Joined again, it is joined."""

    class LeftWaiting(threading.Thread):
        def join(self, timeout: float | None = None) -> None:
            if self not in workers and len(workers) < cut:
                workers.append(self)
                if as_it_ends:
                    super().join(timeout)
                raise Interrupted
            super().join(timeout)

    return LeftWaiting


def _records_of_a_stop_its_removal_outlived(
        hv: Hypervisor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        removal: Callable[[Hypervisor, int], None], level: int,
        as_it_ends: bool) -> list[logging.LogRecord]:
    """A Ctrl-C in stop()'s wait for the thread that removes the domains
    by ``removal`` (in _remove_domain's stead), which goes on after the
    Ctrl-C, or ends just before it (``as_it_ends``): what the hypervisor
    logged at ``level`` or above, once that thread ended.  hv is stopped
    again at the end."""
    from xenback.sim import _hypervisor

    left = threading.Event()

    def late(self: Hypervisor, domid: int) -> None:
        left.wait(TIMEOUT)
        removal(self, domid)

    workers: list[threading.Thread] = []
    monkeypatch.setattr(_hypervisor.Hypervisor, "_remove_domain", late)
    monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(
        threading.Thread, _left_waiting(workers, as_it_ends=as_it_ends)))
    if as_it_ends:
        left.set()
    try:
        with caplog.at_level(level, logger=_hypervisor.__name__):
            with pytest.raises(Interrupted):
                hv.stop()
            left.set()
            [worker] = workers
            worker.join(TIMEOUT)
            assert not worker.is_alive()
        return list(caplog.records)
    finally:
        monkeypatch.undo()
        hv.stop()


def test_a_removals_records_outlive_a_stop_cut_short_joining_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A remove_domain() cut short in its wait (a Ctrl-C), then a stop()
    cut short in its join of that removal's thread, still running, and
    no stop() after (a host whose close() the second cut short, as the
    program ends): what the removal logged is emitted, once, by its
    thread; once still after stop() again.  Claimed by the stop() cut
    short, it was handed to the next stop(), and lost without one."""
    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")
    _with_refusals_unreported(hv, 3)
    left = threading.Event()
    remove_listed = _hypervisor.Hypervisor._remove_listed

    def late(self: Hypervisor, dom: Any, future: Any) -> None:
        remove_listed(self, dom, future)
        left.wait(TIMEOUT)  # past _lock: stop() has none to wait for

    joins: dict[threading.Thread, int] = {}

    class CutTwice(threading.Thread):
        def join(self, timeout: float | None = None) -> None:
            if not joins or self in joins:
                joins[self] = joins.get(self, 0) + 1
                if joins[self] <= 2:
                    raise Interrupted
            super().join(timeout)

    monkeypatch.setattr(_hypervisor.Hypervisor, "_remove_listed", late)
    monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(threading.Thread, CutTwice))
    said = ["hypervisor: domain 3: 1 message suppressed"]
    try:
        with caplog.at_level(logging.WARNING, logger=_hypervisor.__name__):
            with pytest.raises(Interrupted):
                hv.remove_domain(3)
            with pytest.raises(Interrupted):
                hv.stop()
            [(worker, cut)] = joins.items()
            assert cut == 2, "stop() did not join the removal"
            left.set()
            worker.join(TIMEOUT)
            assert not worker.is_alive()
            assert eventually(lambda: len(caplog.records) >= 1), "lost"
            assert [r.getMessage() for r in caplog.records] == said
            monkeypatch.undo()
            hv.stop()
            assert [r.getMessage() for r in caplog.records] == said
    finally:
        left.set()
        monkeypatch.undo()
        hv.stop()


def test_a_ctrl_c_in_stops_wait_for_its_removal_comes_out_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C in stop()'s wait for the thread that removes the domains
    comes out at once, the removal going on without it.  stop() waited
    on its way out for _lock, which the removal holds: the Ctrl-C came
    out once the removal was over (here, 10 s later)."""
    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")
    left, went_on = threading.Event(), threading.Event()
    remove = _hypervisor.Hypervisor._remove_domain

    def late(self: Hypervisor, domid: int) -> None:
        left.wait(TIMEOUT)
        went_on.set()
        remove(self, domid)

    workers: list[threading.Thread] = []
    monkeypatch.setattr(_hypervisor.Hypervisor, "_remove_domain", late)
    monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(
        threading.Thread, _left_waiting(workers)))
    try:
        with pytest.raises(Interrupted):
            hv.stop()
        assert not went_on.is_set(), "stop() waited for the removal it was cut short in"
    finally:
        left.set()
        monkeypatch.undo()
        hv.stop()
    assert hv.stats()["domains"] == 0


def test_a_ctrl_c_in_stops_wait_for_the_lock_comes_out_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C in stop()'s first wait for _lock, held by the thread of a
    remove_domain() that a Ctrl-C took out of its wait, comes out at once,
    the removal going on without it.  stop() took _lock again on its way
    out, to have a service thread it had not joined emit its own records
    (which it already does, this stop() having told it nothing): the
    Ctrl-C came out once the removal was over (here, TIMEOUT later)."""
    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")
    hv.start()
    began, left, went_on = threading.Event(), threading.Event(), threading.Event()
    remove = _hypervisor.Hypervisor._remove_domain

    def late(self: Hypervisor, domid: int) -> None:
        began.set()
        left.wait(TIMEOUT)  # under _lock
        went_on.set()
        remove(self, domid)

    class CutWait:
        """_lock, whose wait by the main thread a Ctrl-C cuts short, once armed."""

        def __init__(self, lock: threading.Lock) -> None:
            self.lock = lock
            self.armed = False

        def __enter__(self) -> None:
            if self.lock.acquire(blocking=False):
                return
            if self.armed and threading.current_thread() is threading.main_thread():
                self.armed = False
                raise Interrupted
            self.lock.acquire()

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    workers: list[threading.Thread] = []
    monkeypatch.setattr(_hypervisor.Hypervisor, "_remove_domain", late)
    monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(
        threading.Thread, _left_waiting(workers)))
    lock = CutWait(hv._lock)
    hv._lock = lock  # type: ignore[assignment]
    try:
        with pytest.raises(Interrupted):
            hv.remove_domain(3)
        assert began.wait(TIMEOUT), "the removal never began"
        lock.armed = True
        with pytest.raises(Interrupted):
            hv.stop()
        assert not lock.armed, "stop() never waited for _lock"
        assert not went_on.is_set(), "stop() waited for the removal on its way out"
    finally:
        left.set()
        monkeypatch.undo()
        hv.stop()
    assert hv.stats()["domains"] == 0



@pytest.mark.parametrize("as_it_ends", [False, True], ids=["fails after", "failed before"])
def test_a_removal_failing_once_its_caller_was_interrupted_is_logged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        as_it_ends: bool) -> None:
    """A Ctrl-C in stop()'s wait for the thread that removes the domains,
    which fails (a bug), after the Ctrl-C or just before: the failure is
    logged, nobody else being left to hear of it.  It was kept for the
    caller that had gone: lost without a trace."""
    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")

    def failing(self: Hypervisor, domid: int) -> NoReturn:
        raise RuntimeError(f"a bug removing domain {domid}")

    [record] = _records_of_a_stop_its_removal_outlived(
        hv, monkeypatch, caplog, failing, logging.ERROR, as_it_ends)
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "a bug removing domain 3"


def test_a_removal_failing_in_its_thread_fails_its_caller_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """stop()'s removals failing (a bug) in the thread that does them for
    the main thread, which waits: stop() raises that failure, as if it had
    done them itself, and it is told once (not logged besides)."""
    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")

    def failing(self: Hypervisor, domid: int) -> NoReturn:
        assert threading.current_thread() is not threading.main_thread()
        raise RuntimeError(f"a bug removing domain {domid}")

    monkeypatch.setattr(_hypervisor.Hypervisor, "_remove_domain", failing)
    try:
        with caplog.at_level(logging.ERROR, logger=_hypervisor.__name__):
            with pytest.raises(RuntimeError, match="^a bug removing domain 3$"):
                hv.stop()
        assert caplog.records == []
    finally:
        monkeypatch.undo()
        hv.stop()


@pytest.mark.parametrize("failing", [False, True], ids=["logging", "failing"])
def test_a_removals_records_survive_a_second_ctrl_c_as_its_caller_tells_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        failing: bool) -> None:
    """A Ctrl-C in stop()'s wait for the thread that removes the domains,
    just as that thread ended (logging, or failing: a bug), then a second
    landing anywhere on stop()'s way out: what the removal said comes out
    once, by the next stop() at the latest.  The thread had left it to
    stop(), whose told_late() a second Ctrl-C cut short as it started: it
    was lost."""
    from xenback.sim import _hypervisor

    def fails(self: Hypervisor, domid: int) -> NoReturn:
        raise RuntimeError(f"a bug removing domain {domid}")

    said = (["hypervisor: failure removing domains"] if failing
            else ["hypervisor: domain 3: 1 message suppressed"])

    def landing(n: int) -> str:
        hv = _hypervisor.Hypervisor(tmp_path / str(n))
        hv.add_domain(3, "guest")
        if failing:
            monkeypatch.setattr(_hypervisor.Hypervisor, "_remove_domain", fails)
        else:
            _with_refusals_unreported(hv, 3)
        workers: list[threading.Thread] = []
        monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(
            threading.Thread, _left_waiting(workers, as_it_ends=True)))
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger=_hypervisor.__name__):
                try:
                    where = interrupted_at(n, SIM_CODE, hv.stop, unless=lambda: not workers)
                except Interrupted:
                    where = ""  # the wait's own Ctrl-C: no place after it was left
                assert workers, "stop() did not wait for its removal"
                monkeypatch.undo()
                hv.stop()
                assert [r.getMessage() for r in caplog.records] == said, f"interrupted {where}"
        finally:
            monkeypatch.undo()
            hv.stop()
        return where

    landed = landings(landing)
    assert any("_uninterrupted" in where for where in landed), landed


def test_a_removals_records_survive_a_ctrl_c_landing_anywhere_in_its_caller(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Ctrl-C landing anywhere in a remove_domain() of the main thread
    whose removal logs (refusals the domain's log was spared): what it
    logged comes out once, by the next stop() at the latest.  Landing as
    the caller's emit() of them started, after its wait, lost them all:
    they were in no list but its own."""
    from xenback.sim import _hypervisor

    def landing(n: int) -> str:
        hv = _hypervisor.Hypervisor(tmp_path / str(n))
        hv.add_domain(3, "guest")
        _with_refusals_unreported(hv, 3)
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger=_hypervisor.__name__):
                where = interrupted_at(n, SIM_CODE, lambda: hv.remove_domain(3))
                hv.stop()  # joins the removal's thread, left by the Ctrl-C
                assert [r.getMessage() for r in caplog.records] == [
                    "hypervisor: domain 3: 1 message suppressed"], f"interrupted {where}"
        finally:
            hv.stop()
        return where

    landed = landings(landing)
    assert any("as it starts: emit" in where for where in landed), landed


class _EveryCallerMain(_ThreadingWith):
    """The threading module as _hypervisor and _heldlog see it (see
    install), where whichever thread calls is the main one: a test's
    thread stands for it, so that a wait that never ends fails the test
    instead of hanging it."""

    def __init__(self) -> None:
        super().__init__(threading.Thread)

    def main_thread(self) -> threading.Thread:
        return threading.current_thread()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make it the threading module of _hypervisor and of _heldlog,
        whose records_held() keeps nothing in the main thread: a stand-in
        calling stats() or add_domain() must not keep either."""
        from xenback.sim import _heldlog, _hypervisor

        monkeypatch.setattr(_hypervisor, "threading", self)
        monkeypatch.setattr(_heldlog, "threading", self)


def _with_refusals_unreported(hv: Hypervisor, domid: int) -> None:
    """Make ``domid`` have a refusal its log was spared, reported as it goes."""
    limit = hv._domains[domid].warnings
    for _ in range(limit.burst + 1):
        limit()



def _creates_gated(host: SimHost, monkeypatch: pytest.MonkeyPatch, served: str) -> threading.Event:
    """The host's domain creates, as a control thread serves them, wait
    for the returned gate, then log ``served`` (through _heldlog, as the
    host's code does) and fail as on a host stopping."""
    from xenback.sim import _heldlog, _host

    gate = threading.Event()

    def gated(name: str) -> Domain:
        gate.wait(TIMEOUT)
        _heldlog.log(_host.logger).info(served)
        raise RuntimeError("the host is stopping")

    monkeypatch.setattr(host, "create_domain", gated)
    return gate


def _replies_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hypervisor's replies to its clients fail as on a full socket
    (EAGAIN), their requests sent as ever: the handle is dropped, and
    says so."""
    from xenback.sim import _hypervisor

    send = _hypervisor.send_message

    def full(sock: socket.socket, msg: Any, *args: Any) -> None:
        if "domid" in msg:  # the reply, not the request's
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        send(sock, msg, *args)

    monkeypatch.setattr(_hypervisor, "send_message", full)


class _MainInARecord:
    """A handler of a logger of the simulation's, the test's own (a call
    stuck in it, the bug, leaves the others be), and a test's thread
    standing for the main one as it emits a record through it, the
    handler's lock held: where a signal's handler comes in to make the
    call under test."""

    def __init__(self) -> None:
        self.kept = logging.handlers.BufferingHandler(capacity=100)
        self.ended = False

    def call(self, fn: Callable[[], Any], msg: str) -> Any:
        """What ``fn()`` returned or raised, called in a test's thread
        holding the handler's lock; fails with ``msg`` if it has not ended
        within TIMEOUT (the deadlock)."""
        from racewindow import Attempt

        def in_a_record() -> Any:
            with self.kept.lock:
                return fn()

        outcome = Attempt(in_a_record).result(msg=msg)
        self.ended = True
        return outcome

    def said(self) -> list[str]:
        """The messages of the records the handler got, in order."""
        return [r.getMessage() for r in self.kept.buffer]


@contextlib.contextmanager
def _main_in_a_record(
        stop: Callable[[], object], monkeypatch: pytest.MonkeyPatch,
        *letting_go: Callable[[], object], logger: str = "xenback.sim._hypervisor",
        level: int | None = None) -> Iterator[_MainInARecord]:
    """A _MainInARecord, its handler added to ``logger`` (at ``level``, if
    given) for the block.  At its end, the handler removed, the logger's
    level as it was, ``letting_go`` called in order (what else the test
    holds that the simulation's threads may wait for), monkeypatch undone,
    and ``stop()`` called (a hypervisor stopped, a host closed), unless a
    call stuck in the record."""
    record = _MainInARecord()
    sim_logger = logging.getLogger(logger)
    was = sim_logger.level
    sim_logger.addHandler(record.kept)
    if level is not None:
        sim_logger.setLevel(level)
    try:
        yield record
    finally:
        sim_logger.removeHandler(record.kept)
        sim_logger.setLevel(was)
        for let_go in letting_go:
            let_go()
        monkeypatch.undo()
        if record.ended:
            stop()
        else:
            # Its lock is held for good by the caller stuck with the
            # simulation's threads: at exit, logging would wait for it to
            # flush the handler.
            record.kept.lock = None  # type: ignore[assignment]


@pytest.mark.parametrize("removal", ["stop", "failing remove_domain"])
def test_a_removal_for_a_signal_handler_come_in_as_a_record_was_emitted_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        removal: str) -> None:
    """A removal the main thread asks for, from a signal's handler (a host
    closed on SIGTERM) come in while that thread emitted a record, a
    handler's lock held, and what the removal logs: it ends, and its
    records are emitted once, as if it had logged them there.  Its thread
    logged them itself, waiting for ever for the lock its caller held, who
    waited for ever for it."""
    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")
    if removal == "stop":
        _with_refusals_unreported(hv, 3)
        call, said, raised = hv.stop, "hypervisor: domain 3: 1 message suppressed", None
    else:
        def failing(self: Hypervisor, domid: int) -> NoReturn:
            raise RuntimeError(f"a bug removing domain {domid}")

        monkeypatch.setattr(_hypervisor.Hypervisor, "_remove_domain", failing)
        call, said = functools.partial(hv.remove_domain, 3), "hypervisor: failure removing domain 3"
        raised = "a bug removing domain 3"
    _EveryCallerMain().install(monkeypatch)
    with _main_in_a_record(hv.stop, monkeypatch) as record:
        with caplog.at_level(logging.WARNING, logger=_hypervisor.__name__):
            outcome = record.call(
                call, msg="the removal waits for the lock its caller holds, who waits for it")
        if raised is None:
            assert outcome is None
        else:
            assert isinstance(outcome, RuntimeError) and str(outcome) == raised
        assert record.said() == [said]


@pytest.mark.parametrize("as_it_ends", [False, True], ids=["ends after", "ended before"])
def test_a_removals_records_once_its_caller_was_interrupted_are_emitted_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        as_it_ends: bool) -> None:
    """A Ctrl-C in stop()'s wait for the thread that removes the domains,
    which logs, after the Ctrl-C or just before: its records are emitted,
    once, nobody else being left to emit them."""
    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")
    _with_refusals_unreported(hv, 3)
    records = _records_of_a_stop_its_removal_outlived(
        hv, monkeypatch, caplog, _hypervisor.Hypervisor._remove_domain, logging.WARNING,
        as_it_ends)
    assert [r.getMessage() for r in records] == ["hypervisor: domain 3: 1 message suppressed"]


def _emitting(thread: threading.Thread) -> bool:
    """Whether ``thread`` stands at a handler's lock, emitting a record."""
    assert thread.ident is not None
    return stands_at(thread.ident, logging.Handler.handle, "self.acquire()")


def _serving_info_failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          ) -> tuple[Hypervisor, Path, threading.Thread]:
    """A hypervisor started, with domain 3's socket, and its service
    thread, which fails serving 'info' (a bug) and logs so."""
    from xenback.sim import _hypervisor

    def failing(self: Hypervisor, conn: object, msg: object, fds: object) -> NoReturn:
        raise RuntimeError("a bug serving 'info'")

    monkeypatch.setitem(_hypervisor.Hypervisor._ops, "info", failing)
    hv = _hypervisor.Hypervisor(tmp_path)
    hv.start()
    path = hv.add_domain(3, "guest")
    service = hv._thread
    assert service is not None
    return hv, path, service


def _service_logging(client: socket.socket, path: Path, service: threading.Thread) -> None:
    """Have ``service`` (a _serving_info_failing() one) log, ``client``
    asking domain 3's socket at ``path`` for 'info'; back once it stands
    at a handler's lock, emitting."""
    import json

    client.connect(os.fspath(path))
    client.send(json.dumps({"op": "info"}).encode())
    assert eventually(lambda: _emitting(service)), "the service logs nothing"


@pytest.mark.parametrize("call, logs", [
    ("remove_domain", "the removal"),
    ("remove_domain", "the service"),
    ("stop", "the service"),
])
def test_a_signal_handlers_call_while_the_service_thread_serves_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, logs: str) -> None:
    """A signal's handler removing a domain or stopping (a host closed on
    SIGTERM) while the service thread serves, come in as the main thread
    emitted a record, a handler's lock held; the removal logs (refusals
    the domain's log was spared), or the service thread is logging (a
    request failed: a bug) through that handler.  The call ends, and the
    records are emitted once each: the removal's at once (as if logged
    by the caller), the service thread's once the main thread lets go of
    the lock.  The removal was the service thread's, which logged, its
    caller waiting for it; the service thread logged under the lock the
    call takes, or the call waited for it: each for ever."""
    import socket

    from xenback.sim import _hypervisor

    hv, path, service = _serving_info_failing(tmp_path, monkeypatch)
    said = []
    if logs == "the removal":
        _with_refusals_unreported(hv, 3)
        said.append("hypervisor: domain 3: 1 message suppressed")
    else:
        said.append("hypervisor: request 'info' from domain 3 failed")
    _EveryCallerMain().install(monkeypatch)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def in_a_record() -> object:
        if logs == "the service":
            _service_logging(client, path, service)
        return hv.remove_domain(3) if call == "remove_domain" else hv.stop()

    with _main_in_a_record(hv.stop, monkeypatch, client.close) as record:
        outcome = record.call(
            in_a_record,
            msg="the call waits for the service thread, which waits for its caller's lock")
        assert outcome is None
        if call == "stop":
            service.join(TIMEOUT)
            assert not service.is_alive(), "the service thread outlived the lock"
        else:
            # Back in its wait for events: done emitting (past the
            # handler's lock, it may not have emitted yet).
            assert service.ident is not None
            assert eventually(lambda: stands_at(service.ident, _hypervisor.Hypervisor._serve_loop,
                                                "self._selector.select("))
            assert hv.stats()["domains"] == 0
        assert record.said() == said


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_signal_handlers_stop_as_the_service_thread_dies_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service thread dies of a bug (its select fails) as a signal's
    handler stops it (a host closed on SIGTERM), come in as the main
    thread emitted a record through a handler of the hypervisor's, the
    lock held.  stop() ends, and the thread's last words are emitted
    once.  Emitted by that thread as it died, they kept stop()'s join
    waiting for the lock stop()'s caller held: for ever."""
    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.start()
    service = hv._thread
    assert service is not None
    select = hv._selector.select
    failing_next = threading.Event()

    def failing(timeout: float | None = None) -> Any:
        failing_next.set()
        events = select(timeout)
        if hv._stopping:
            raise RuntimeError("a bug in the service loop")
        return events

    monkeypatch.setattr(hv._selector, "select", failing)
    os.write(hv._wake_w, b"x")  # a round in the select it is in, then one in this
    assert failing_next.wait(TIMEOUT)
    with _main_in_a_record(hv.stop, monkeypatch) as record:
        # In a test's thread standing for the main one: its stop() joins
        # the service thread as the main one's would.
        outcome = record.call(
            hv.stop, msg="stop() waits for the service thread, which waits for its caller's lock")
        assert outcome is None
        assert not service.is_alive()
        assert record.said() == ["hypervisor: the service thread died"]


@contextlib.contextmanager
def _a_slow_handler(
        module: ModuleType, monkeypatch: pytest.MonkeyPatch, level: int | None = None,
) -> Iterator[tuple[logging.handlers.BufferingHandler, threading.Event]]:
    """A handler of ``module``'s logger (at ``level``, if given) whose lock
    another thread holds until the event yielded with it is set: not the
    caller of the stop() under test, so no deadlock, only a slow handler.
    ``module``'s EMITTER_WAIT, how long that stop() waits for a thread
    emitting, is past the test's own waits: a loaded machine's test
    thread may look later than 1 s after the stop() began to wait.  At
    the end, the lock let go, the handler removed, the logger's level as
    it was, and monkeypatch undone."""
    kept = logging.handlers.BufferingHandler(capacity=100)
    logger = logging.getLogger(module.__name__)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with kept.lock:
            held.set()
            release.wait(TIMEOUT)

    holder = threading.Thread(target=hold, daemon=True)
    monkeypatch.setattr(module, "EMITTER_WAIT", 2 * TIMEOUT)
    was = logger.level
    logger.addHandler(kept)
    if level is not None:
        logger.setLevel(level)
    try:
        holder.start()
        assert held.wait(TIMEOUT)
        yield kept, release
    finally:
        release.set()
        holder.join(TIMEOUT)
        logger.removeHandler(kept)
        logger.setLevel(was)
        monkeypatch.undo()


def test_stop_waits_a_while_for_a_service_thread_emitting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service thread emits a record to a handler whose lock another
    thread holds, not stop()'s caller (so no deadlock, only a slow
    handler): stop() waits for it, and no thread of the service outlives
    stop().  Not waited for at all, it still ran once stop() returned,
    and a test counting threads after a host's stop() saw it."""
    import socket

    from racewindow import Attempt

    from xenback.sim import _hypervisor

    hv, path, service = _serving_info_failing(tmp_path, monkeypatch)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with _a_slow_handler(_hypervisor, monkeypatch) as (kept, release):
            _service_logging(client, path, service)
            stopper = Attempt(hv.stop)
            assert stopper.thread.ident is not None
            assert eventually(lambda: stands_at(
                stopper.thread.ident, _hypervisor.Hypervisor.stop,
                "self._thread.join(")), "stop() does not wait"
            release.set()
            stopper.result()
            assert not service.is_alive(), "the service thread outlived stop()"
            assert [r.getMessage() for r in kept.buffer] == [
                "hypervisor: request 'info' from domain 3 failed"]
    finally:
        client.close()
        hv.stop()


def test_a_signal_handlers_stop_as_a_control_reply_logs_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A domain control request answered from a thread of the toolstack's
    whose reply cannot be sent (dom0's handle takes no more: dropped, and
    logged), while the main thread emits a record through that handler
    and a signal's handler then stops the service (a host closed on
    SIGTERM): stop() ends, and the record is emitted once the main thread
    lets go of the handler's lock.  The reply was logged under the lock
    stop() takes: each waited for the other for ever."""
    import json
    import socket

    from racewindow import Attempt

    from xenback.sim import _hypervisor

    replies: queue.Queue[Callable[[dict[str, Any]], None]] = queue.Queue()
    hv = _hypervisor.Hypervisor(tmp_path)
    hv.set_control(lambda op, args, reply: replies.put(reply))
    hv.start()
    path = hv.add_domain(0, "Domain-0")

    # stop() in a test's thread, standing for the main one: it waits for
    # _lock as the main one would, and the reply's thread is no main one.
    _replies_dropped(monkeypatch)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with _main_in_a_record(hv.stop, monkeypatch, client.close) as record:
        client.connect(os.fspath(path))
        client.send(json.dumps({"op": "domain_create", "name": "guest"}).encode())
        reply = replies.get(timeout=TIMEOUT)

        def in_a_record() -> object:
            replier = Attempt(lambda: reply({"domid": 1}))
            assert eventually(lambda: _emitting(replier.thread)), "the reply logs nothing"
            return hv.stop(), replier

        outcome = record.call(
            in_a_record,
            msg="stop() waits for the lock the reply holds, which waits for its caller's lock")
        result, replier = outcome
        assert result is None
        assert replier.result() is None
        assert record.said() == [
            "hypervisor: dropping a handle of domain 0: "
            f"[Errno {errno.EAGAIN}] {os.strerror(errno.EAGAIN)}"]


def _someone_emitting() -> bool:
    """Whether a thread other than this one stands at a handler's lock."""
    me = threading.current_thread()
    return any(_emitting(t) for t in threading.enumerate() if t is not me and t.ident)


@pytest.mark.parametrize("op", ["create", "create, its reply dropped", "destroy a driver domain"])
def test_a_signal_handlers_close_as_dom0_controls_a_domain_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    """Another process creates a domain through dom0 (its handle perhaps
    taking no reply: dropped, and the hypervisor says so), or destroys a
    driver domain (its devices go at once, and the toolstack says so),
    while the main thread emits a record, a handler's lock held, and a
    signal's handler then closes the host (a host closed on SIGTERM):
    close() ends, and what was logged meanwhile is emitted, once each:
    what close() logged before it returns, the request's once the main
    thread lets go of the lock.  XenStore's loop logged as it introduced
    the domain for the toolstack's thread serving dom0, which held the
    host's lock: close() waited for that lock for ever, the thread for
    the loop, the loop for close()'s caller.  The toolstack's thread
    logged removing the device, or the hypervisor in it dropping the
    handle, and close() joined it for ever."""
    from racewindow import Attempt

    from xenback.sim import destroy_domain

    host = SimHost(tmp_path / "run")
    host.start()
    xs_path = host.run_dir / "domains" / "1" / "xenstore"
    if op.startswith("create"):
        request: Callable[[], object] = functools.partial(create_domain, host.run_dir, "guest")
        answer: object = Domain(host.run_dir, 1, "guest", xs_path)
        expected = ["created domain 1 (guest)", f"introduced domain 1 at {xs_path}"]
        if op == "create, its reply dropped":
            _replies_dropped(monkeypatch)
            answer = PlatformError
            expected.append("hypervisor: dropping a handle of domain 0: "
                            f"[Errno {errno.EAGAIN}] {os.strerror(errno.EAGAIN)}")
    else:
        driver = host.create_domain("driver")
        device = host.toolstack.add_device("vif", 0, backend_id=driver.domid)
        request = functools.partial(destroy_domain, host.run_dir, driver.domid)
        answer = None
        expected = ["destroyed domain 1", f"toolstack: removed {device.backend_path}"]
    with _main_in_a_record(host.close, monkeypatch, logger="xenback.sim",
                           level=logging.INFO) as record:
        def in_a_record() -> tuple[object, list[str], Attempt]:
            requester = Attempt(request)
            assert eventually(_someone_emitting), "nobody logs"
            return host.close(), record.said(), requester

        outcome = record.call(
            in_a_record,
            msg="close() waits for the toolstack's thread, which waits for close()'s caller")
        assert not isinstance(outcome, BaseException), outcome
        closed, said_in_close, requester = outcome
        assert closed is None
        if answer is PlatformError:
            assert isinstance(requester.result(), PlatformError)
        else:
            assert requester.result() == answer
        assert "xenstored stopped" in said_in_close
        assert not set(expected) & set(said_in_close)
        for thread in threading.enumerate():
            if thread.name.startswith("xenback-sim-control:"):  # emitting, once let go
                thread.join(TIMEOUT)
                assert not thread.is_alive(), "the toolstack's thread outlived the lock"
        said = record.said()
        for message in [*expected, "xenstored stopped"]:
            assert said.count(message) == 1, (message, said)


def test_a_signal_handlers_close_as_a_control_request_refused_logs_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A domain control request the host has no thread for, refused and
    logged by the service thread, as the main thread emits a record
    through that handler, and a signal's handler then closes the host: the
    close() ends, and the record is emitted once the main thread lets go
    of the handler's lock.  The host's control handler logged under the
    hypervisor's lock, which close() takes: each waited for the other."""
    from racewindow import Attempt

    from xenback.platform import PlatformError

    start = threading.Thread.start

    def no_control_thread_left(thread: threading.Thread) -> None:
        if thread.name.startswith("xenback-sim-control"):
            raise RuntimeError("can't start new thread")
        start(thread)

    host = SimHost(tmp_path / "run")
    host.start()
    service = host.hypervisor._thread
    assert service is not None
    monkeypatch.setattr(threading.Thread, "start", no_control_thread_left)
    with _main_in_a_record(host.close, monkeypatch, logger="xenback.sim._host") as record:
        def in_a_record() -> tuple[object, object]:
            requester = Attempt(functools.partial(create_domain, host.run_dir, "guest"))
            assert eventually(lambda: _emitting(service)), "the refusal logs nothing"
            return host.close(), requester

        outcome = record.call(
            in_a_record,
            msg="close() waits for the hypervisor's lock, held by the service thread"
                " logging, which waits for close()'s caller")
        assert not isinstance(outcome, BaseException), outcome
        closed, requester = outcome
        assert closed is None
        assert isinstance(requester.result(), PlatformError)
        service.join(TIMEOUT)
        assert not service.is_alive(), "the service thread outlived the lock"
        assert record.said() == [
            "domain control request domain_create {'name': 'guest'} refused:"
            " can't start new thread"]


def test_a_signal_handlers_close_as_another_thread_destroys_while_the_service_logs_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread of the program's destroys a domain while the service
    thread emits a record (a request failed: a bug) to a handler whose
    lock the main thread holds, emitting, and a signal's handler then
    closes the host: close() ends, and the records are emitted once
    each.  The destroy held the host's lock while it waited for the
    service thread to remove the domain, the service thread for the
    handler's lock, and close() for the host's lock: each for ever."""
    import json
    import socket

    from racewindow import Attempt

    from xenback.sim import _hypervisor

    def failing(self: Hypervisor, conn: object, msg: object, fds: object) -> NoReturn:
        raise RuntimeError("a bug serving 'info'")

    monkeypatch.setitem(_hypervisor.Hypervisor._ops, "info", failing)
    host = SimHost(tmp_path / "run")
    host.start()
    guest = host.create_domain("guest")
    service = host.hypervisor._thread
    assert service is not None
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with _main_in_a_record(host.close, monkeypatch, client.close, logger="xenback.sim",
                           level=logging.INFO) as record:
        def in_a_record() -> tuple[object, Attempt]:
            client.connect(os.fspath(_hypervisor.domain_socket(host.run_dir, guest.domid)))
            client.send(json.dumps({"op": "info"}).encode())
            assert eventually(lambda: _emitting(service)), "the service logs nothing"
            destroyer = Attempt(functools.partial(host.destroy_domain, guest.domid))
            assert destroyer.thread.ident is not None
            # Past the host's lock: it emits once done, or it waits there
            # for the service thread.
            assert eventually(lambda: _emitting(destroyer.thread) or stands_at(
                destroyer.thread.ident, _hypervisor.Hypervisor.remove_domain,
                "future.result()"))
            return host.close(), destroyer

        outcome = record.call(
            in_a_record, msg="close() waits for the destroy, which waits for the service thread")
        assert not isinstance(outcome, BaseException), outcome
        closed, destroyer = outcome
        assert closed is None
        assert destroyer.result() is None
        said = record.said()
        for message in ["hypervisor: request 'info' from domain 1 failed",
                        "destroyed domain 1", "xenstored stopped"]:
            assert said.count(message) == 1, (message, said)


def _in_order_of_what(said: list[str]) -> list[str]:
    """XenStore's messages, each cut to what it says happened: a
    connection's closing to why, a watch event dropped to that."""
    return ["dropped a watch event" if "dropped an event of the watch" in message
            else message.rsplit(": ", 1)[-1] if message.startswith("closing ")
            else message for message in said]


@pytest.mark.parametrize("logs", ["a client closing", "a watch event dropped"])
@pytest.mark.parametrize("stopping", ["XenStored.stop", "SimHost.close"])
def test_a_signal_handlers_stop_as_the_xenstore_loop_logs_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: str, stopping: str) -> None:
    """XenStore's loop thread emits a record as it serves (a client gone,
    a watch event too long for the wire dropped) to a handler whose lock
    the main thread holds, emitting, and a signal's handler then stops
    XenStore, or closes the host: it ends, XenStore stopped.  What stop()
    logged is emitted at once, the record the loop was emitting once the
    main thread lets go: each once.  stop() waited for the loop, which
    waited for the lock: STOP_TIMEOUT, then TimeoutError, XenStore (and
    the host) left half stopped."""
    from xenback.sim._xenstored import Op, RawClient, _server

    # Fails in seconds where stop() waits for the loop, not in ten.
    monkeypatch.setattr(_server, "STOP_TIMEOUT", 3.0)
    host = SimHost(tmp_path / "run") if stopping == "SimHost.close" else None
    if host is not None:
        host.start()
        xsd, stop = host.xenstored, host.close
    else:
        xsd = XenStored(tmp_path / "xs")
        xsd.start()
        stop = xsd.stop
    loop = xsd._thread
    assert loop is not None
    token = "t" * 4000
    dom0, other = RawClient(xsd.path), RawClient(xsd.path)
    dom0.watch("/w", token)
    assert dom0.wait_event() == ("/w", token)
    other.read("/")
    serving = len(xsd._conns)
    with _main_in_a_record(stop, monkeypatch, dom0.close, other.close,
                           logger="xenback.sim._xenstored", level=logging.DEBUG) as record:
        def in_a_record() -> object:
            if logs == "a client closing":
                other.close()
            else:  # its event, with the token, is over XENSTORE_PAYLOAD_MAX
                dom0.send(Op.WRITE, b"/w/" + b"x" * 200 + b"\0")
            assert eventually(lambda: _emitting(loop)), "the loop logs nothing"
            return stop()

        outcome = record.call(
            in_a_record, msg="stop() waits for the loop, which waits for its caller's lock")
        assert outcome is None, outcome
        assert not xsd.path.exists()
        if host is not None:
            assert host._state == "closed"
        loop.join(TIMEOUT)
        assert not loop.is_alive(), "the loop outlived the lock"
        *said, emitting = _in_order_of_what(record.said())
        if logs == "a client closing":
            assert emitting == "closed by peer"
            serving -= 1
        else:
            assert emitting == "dropped a watch event"
        assert said == serving * ["server stopping"] + ["xenstored stopped"]

def test_a_control_requests_records_outlive_a_close_cut_short_anywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A Ctrl-C landing anywhere of the host's own in close() (not in the
    hypervisor's or XenStore's), joining a toolstack's thread serving dom0
    that logs and ends meanwhile, and no close() after: what the thread
    logged is emitted once; once still after close() again.  (Not one
    landing in close()'s emitting them, which leaves the rest to the
    next.)  One landing as close() let go of _control_lock, done joining,
    left them with a close() that was gone."""
    from racewindow import Attempt, line_of

    from xenback.sim import _host

    served = "served a create at the gate"
    mine = ("_host.py", "_heldlog.py")
    others = tuple(os.path.join(SIM_CODE, name) for name in os.listdir(SIM_CODE)
                   if name not in mine)
    emitting = line_of(SimHost.close, "emit(self._control_unsaid)")

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage() == served]

    def landing(n: int) -> str:
        caplog.clear()
        host = SimHost(tmp_path / str(n))
        host.start()
        gate = _creates_gated(host, monkeypatch, served)
        requester = Attempt(functools.partial(create_domain, host.run_dir, "guest"))
        where = ""
        try:
            assert eventually(lambda: any(t.name == "xenback-sim-control:domain_create"
                                          for t in threading.enumerate())), "no request served"
            main = threading.get_ident()
            opener = Attempt(lambda: (
                eventually(lambda: gate.is_set() or stands_at(main, SimHost.close,
                                                              "thread.join()")),
                gate.set()))
            try:
                where = interrupted_at(n, SIM_CODE, host.close, besides=others)
            finally:
                gate.set()
            opener.result()
            assert isinstance(requester.result(), PlatformError), where
            for thread in threading.enumerate():
                if thread.name.startswith("xenback-sim-control:"):
                    thread.join(TIMEOUT)
                    assert not thread.is_alive(), where
            if (not re.search(r" emit, _heldlog\.py:\d+$", where)
                    and not where.endswith(f"SimHost.close, _host.py:{emitting}")):
                assert said() == [served], f"interrupted {where}"
        finally:
            gate.set()
            monkeypatch.undo()
            host.close()
        assert said() == [served], f"interrupted {where}"
        return where

    with caplog.at_level(logging.INFO, logger=_host.__name__):
        landed = landings(landing)
    assert any("thread.join()" in where or "SimHost.close" in where for where in landed), landed


def test_close_waits_a_while_for_a_toolstack_thread_emitting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A toolstack's thread that served dom0 emits what it logged itself
    (it ended before close() began to join it), to a handler whose lock
    another thread holds, not close()'s caller (so no deadlock, only a
    slow handler): close() waits for it, and it does not outlive close()."""
    from racewindow import Attempt

    from xenback.sim import _host

    host = SimHost(tmp_path / "run")
    host.start()
    try:
        with _a_slow_handler(_host, monkeypatch, logging.INFO) as (kept, release):
            requester = Attempt(functools.partial(create_domain, host.run_dir, "guest"))
            assert eventually(lambda: any(
                t.name == "xenback-sim-control:domain_create" and t.ident and _emitting(t)
                for t in threading.enumerate())), "the toolstack's thread does not emit"
            [control] = [t for t in threading.enumerate()
                         if t.name == "xenback-sim-control:domain_create"]
            assert requester.result() == Domain(host.run_dir, 1, "guest",
                                                host.run_dir / "domains" / "1" / "xenstore")
            closer = Attempt(host.close)
            assert closer.thread.ident is not None
            assert eventually(lambda: stands_at(
                closer.thread.ident, SimHost.close,
                "thread.join(EMITTER_WAIT)")), "close() does not wait"
            release.set()
            assert closer.result() is None
            assert not control.is_alive(), "the toolstack's thread outlived close()"
            assert [r.getMessage() for r in kept.buffer] == ["created domain 1 (guest)"]
    finally:
        host.close()


def test_a_toolstack_thread_ending_as_close_joins_it_hands_its_records_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A toolstack's thread serving dom0 that logs and ends while close()
    joins it, close()'s caller holding the lock of the handler it logs to
    (a signal's handler come in as the main thread emitted): close() ends
    and emits the record, once, past the join.  Emitted by the thread,
    it kept the join waiting for that lock for ever."""
    from racewindow import Attempt

    from xenback.sim import _host

    served = "served a create at the gate"
    host = SimHost(tmp_path / "run")
    host.start()
    gate = _creates_gated(host, monkeypatch, served)
    with _main_in_a_record(host.close, monkeypatch, gate.set, logger=_host.__name__,
                           level=logging.INFO) as record:
        requester = Attempt(functools.partial(create_domain, host.run_dir, "guest"))
        assert eventually(lambda: any(t.name == "xenback-sim-control:domain_create"
                                      for t in threading.enumerate())), "no request served"

        def in_a_record() -> object:
            me = threading.get_ident()
            opener = Attempt(lambda: (
                eventually(lambda: stands_at(me, SimHost.close, "thread.join()")),
                gate.set()))
            closed = host.close()
            assert opener.result() == (True, None)
            return closed, record.said()

        outcome = record.call(
            in_a_record,
            msg="close() joins the toolstack's thread, which waits for close()'s caller")
        assert outcome == (None, [served])
        assert isinstance(requester.result(), PlatformError)


def test_records_a_thread_held_are_emitted_as_their_logger_would() -> None:
    """What a thread held (see _heldlog) comes out as its logger would
    have let it at the time it is emitted: a DEBUG record of a logger at
    INFO does not, an INFO one does, once each."""
    from racewindow import Attempt

    from xenback.sim import _heldlog, _host

    kept = logging.handlers.BufferingHandler(capacity=100)
    host_logger = logging.getLogger(_host.__name__)
    level = host_logger.level
    host_logger.addHandler(kept)
    host_logger.setLevel(logging.INFO)

    def held() -> None:
        with _heldlog.records_held():
            _heldlog.log(host_logger).debug("not asked for")
            _heldlog.log(host_logger).info("asked for")
            assert kept.buffer == []  # held, not emitted yet

    try:
        assert Attempt(held).result() is None
        assert [r.getMessage() for r in kept.buffer] == ["asked for"]
    finally:
        host_logger.removeHandler(kept)
        host_logger.setLevel(level)


def test_a_thread_keeping_records_makes_none_its_logger_would_not_emit() -> None:
    """A thread keeping its records (see _heldlog) makes no record of a
    level its logger would not emit: a DEBUG one of a logger at INFO is
    not made at all, not only dropped as it is emitted."""
    from racewindow import Attempt

    from xenback.sim import _heldlog, _host

    host_logger = logging.getLogger(_host.__name__)
    level = host_logger.level
    host_logger.setLevel(logging.INFO)

    def kept() -> list[logging.LogRecord]:
        into: list[logging.LogRecord] = []
        with _heldlog.records_kept(into):
            _heldlog.log(host_logger).debug("not asked for")
            _heldlog.log(host_logger).info("asked for")
        return into

    try:
        with records_made() as made:
            into = Attempt(kept).result()
    finally:
        host_logger.setLevel(level)
    assert [r.getMessage() for r in into] == ["asked for"]
    assert [r.getMessage() for r in made if r.name == _host.__name__] == ["asked for"]


def test_a_removal_another_thread_does_in_place_logs_past_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """remove_domain() from a thread other than the main one, with no
    service thread serving (done in place), logging (refusals the
    domain's log was spared) through a handler the main thread holds, as
    it emits a record; a signal's handler then removes another domain.
    Both end, and the record is emitted once the main thread lets go of
    the handler's lock.  The first logged under the lock the second
    takes: each waited for the other for ever."""
    from racewindow import Attempt

    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")
    hv.add_domain(4, "other")
    _with_refusals_unreported(hv, 3)

    # In a test's thread standing for the main one, which waits for _lock
    # as the main one would.
    def in_a_record() -> object:
        remover = Attempt(lambda: hv.remove_domain(3))
        assert eventually(lambda: _emitting(remover.thread)), "the removal logs nothing"
        return hv.remove_domain(4), remover

    with _main_in_a_record(hv.stop, monkeypatch) as record:
        outcome = record.call(
            in_a_record,
            msg="the call waits for the lock the removal holds, which waits for its caller's lock")
        result, remover = outcome
        assert result is None
        assert remover.result() is None
        assert hv.stats()["domains"] == 0
        assert record.said() == ["hypervisor: domain 3: 1 message suppressed"]


@pytest.mark.parametrize("logs", ["refusals", "its failure"])
@pytest.mark.parametrize("first", ["the removal", "stop()"])
def test_a_signal_handlers_stop_as_a_removal_left_by_a_ctrl_c_logs_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str, logs: str) -> None:
    """A Ctrl-C in remove_domain()'s wait for the thread that removes the
    domain for it, that thread then logging (refusals the domain's log was
    spared, or its work's failure, a bug), its caller gone, while the main
    thread emits a record through that handler, the lock held; a signal's
    handler then stops the service (a host closed on SIGTERM), as that
    thread emits, or before it has got there.  stop() ends, and the record
    is emitted once: by that thread once the main thread lets go of the
    lock, or by stop() itself.  stop() joined that thread, which waited for
    the lock stop()'s caller held: for ever."""
    import types

    from racewindow import Attempt, PauseAt

    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")
    if logs == "refusals":
        _with_refusals_unreported(hv, 3)
        said = "hypervisor: domain 3: 1 message suppressed"
    else:
        def failing(self: Hypervisor, dom: object, future: object) -> NoReturn:
            raise RuntimeError("a bug removing domain 3")

        monkeypatch.setattr(_hypervisor.Hypervisor, "_remove_listed", failing)
        said = "hypervisor: failure removing domains"
    workers: list[threading.Thread] = []
    [run] = [c for c in _hypervisor.Hypervisor._uninterrupted.__code__.co_consts
             if isinstance(c, types.CodeType) and c.co_name == "run"]
    # Its work done, about to say so: its caller is gone by then.
    pause = PauseAt(types.FunctionType(run, {}, closure=tuple(
        types.CellType() for _ in run.co_freevars)), "ended.append(True)")

    class Paused(_left_waiting(workers)):
        def run(self) -> None:
            pause.run(super().run)

    class EveryCallerMainLeftWaiting(_EveryCallerMain):
        def __init__(self) -> None:
            _ThreadingWith.__init__(self, threading.Thread, Paused)

    EveryCallerMainLeftWaiting().install(monkeypatch)

    # In a test's thread standing for the main one.
    def in_a_record() -> object:
        with pytest.raises(Interrupted):
            hv.remove_domain(3)
        [worker] = workers
        assert pause.reached.wait(TIMEOUT)
        if first == "the removal":
            pause.resume()
            assert eventually(lambda: _emitting(worker)), "the removal logs nothing"
        else:
            me = threading.get_ident()
            Attempt(lambda: (eventually(lambda: stands_at(
                me, _hypervisor.Hypervisor.stop, "worker.join(")), pause.resume()))
        return hv.stop(), worker

    with _main_in_a_record(hv.stop, monkeypatch, pause.resume) as record:
        outcome = record.call(
            in_a_record,
            msg="stop() waits for the removal's thread, which waits for its caller's lock")
        result, worker = outcome
        assert result is None
        worker.join(TIMEOUT)
        assert not worker.is_alive(), "the removal's thread outlived the lock"
        assert record.said() == [said]
        assert hv.stats()["domains"] == 0


def test_stats_in_another_thread_log_past_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stats() from a thread other than the main one, accepting the
    handles in the backlog (no service thread serves), logs the refusal
    of one past its domain's most through a handler the main thread holds
    as it emits a record; a signal's handler then removes the domain.
    Both end, and the record is emitted once the main thread lets go of
    the handler's lock.  stats() logged under the lock the removal takes:
    each waited for the other for ever."""
    import socket

    from racewindow import Attempt

    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    path = hv.add_domain(3, "guest")
    clients: list[socket.socket] = []

    def close_clients() -> None:
        for client in clients:
            client.close()

    # In a test's thread standing for the main one, which waits for _lock
    # as the main one would.
    def in_a_record() -> object:
        counter = Attempt(hv.stats)
        assert eventually(lambda: _emitting(counter.thread)), "stats() logs nothing"
        return hv.remove_domain(3), counter

    with _main_in_a_record(hv.stop, monkeypatch, close_clients) as record:
        for i in range(_hypervisor.MAX_HANDLES_PER_DOMAIN + 1):
            if i % 32 == 0:
                hv.stats()  # accepted, before the backlog (64) is full
            clients.append(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
            clients[-1].connect(os.fspath(path))
        assert not record.said(), "refused before the test"
        outcome = record.call(
            in_a_record,
            msg="the removal waits for the lock stats() holds, which waits for its caller's lock")
        result, counter = outcome
        assert result is None
        assert counter.result()["connections"] == _hypervisor.MAX_HANDLES_PER_DOMAIN
        assert record.said() == ["hypervisor: domain 3 has 256 handles open; refusing another"]


def test_an_add_domain_undone_in_another_thread_logs_past_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """add_domain() from a thread other than the main one (a toolstack's
    thread serving dom0's domain_create), failing once its socket is
    bound and unable to remove the socket's file, logs so through a
    handler the main thread holds as it emits a record; a signal's
    handler then removes another domain.  Both end, and the record is
    emitted once the main thread lets go of the handler's lock.
    add_domain() logged under the lock the removal takes: each waited for
    the other for ever."""
    import types

    from racewindow import Attempt

    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(4, "other")

    def full(*args: object) -> NoReturn:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    def unlink(path: object) -> NoReturn:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(hv._selector, "register", full)
    # The module's os, but for unlink: the file of a socket bound stays.
    refusing = types.SimpleNamespace(**vars(os))
    refusing.unlink = unlink
    monkeypatch.setattr(_hypervisor, "os", refusing)

    # In a test's thread standing for the main one, which waits for _lock
    # as the main one would.
    def in_a_record() -> object:
        adder = Attempt(lambda: hv.add_domain(3, "guest"))
        assert eventually(lambda: _emitting(adder.thread)), "add_domain() logs nothing"
        return hv.remove_domain(4), adder

    with _main_in_a_record(hv.stop, monkeypatch) as record:
        outcome = record.call(
            in_a_record,
            msg="the removal waits for the lock add_domain() holds, which waits for its"
                " caller's lock")
        result, adder = outcome
        assert result is None
        failure = adder.result()
        assert isinstance(failure, OSError) and failure.errno == errno.ENOMEM, failure
        monkeypatch.undo()
        assert hv.stats()["domains"] == 0
        assert record.said() == ["hypervisor: cannot remove the socket of a domain not added"]


def test_no_removal_thread_outlives_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C in remove_domain()'s wait for the thread that removes the
    domain for it (no service thread serves: none started here), then
    stop(): once stop() returns, that thread has ended too, none is left.
    stop() joined only its own: the other one was still there after it
    (here, about to take the lock, then to find its domain gone)."""
    from racewindow import Attempt, PauseAt

    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")
    threads = set(threading.enumerate())
    workers: list[threading.Thread] = []
    pause = PauseAt.in_method(monkeypatch, _hypervisor.Hypervisor, "_remove_listed",
                              "with self._lock")
    monkeypatch.setattr(_hypervisor, "threading",
                        _ThreadingWith(threading.Thread, _left_waiting(workers)))
    # Not emitting: waited for as long as it takes, not EMITTER_WAIT.
    monkeypatch.setattr(_hypervisor, "EMITTER_WAIT", 0.0)
    try:
        with pytest.raises(Interrupted):
            hv.remove_domain(3)
        [worker] = workers
        assert pause.reached.wait(TIMEOUT)
        main = threading.get_ident()
        # Let go once stop() waits for it: else it would wait for ever.
        resumer = Attempt(lambda: (
            eventually(lambda: stands_at(main, _hypervisor.Hypervisor.stop, "worker.join(")),
            pause.resume()))
        hv.stop()
        assert not worker.is_alive(), "a removal's thread outlived stop()"
        assert resumer.result() == (True, None)
        _no_threads_since(threads, "in remove_domain()'s wait")
        assert hv.stats()["domains"] == 0
    finally:
        pause.resume()
        monkeypatch.undo()
        hv.stop()


def test_stop_keeps_no_removal_thread_left_by_a_ctrl_c(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C in remove_domain()'s wait for the thread that removes the
    domain for it, then stop(): once stop() has joined that thread, the
    hypervisor holds on to it no more, however many it was left."""
    import gc
    import weakref

    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")
    workers: list[threading.Thread] = []
    monkeypatch.setattr(_hypervisor, "threading",
                        _ThreadingWith(threading.Thread, _left_waiting(workers)))
    try:
        with pytest.raises(Interrupted):
            hv.remove_domain(3)
        [worker] = workers
        hv.stop()
        assert not worker.is_alive()
        left = weakref.ref(worker)
        del worker
        workers.clear()
        gc.collect()
        assert left() is None, "stop() keeps the removal's thread it joined"
    finally:
        monkeypatch.undo()
        hv.stop()


class _LastRecord:
    """A started hypervisor (``hv``) whose service thread (``service``)
    runs only once let go (``go``), and a removal of a domain whose log
    was spared a refusal, asked for in another thread (``remover``) and
    queued for the service thread: answered as that thread ends, it logs
    :attr:`SAID`, the thread's last record, which ``kept``, a handler of
    the hypervisor's logger, gets once emitted."""

    SAID = ["hypervisor: domain 3: 1 message suppressed"]

    def __init__(self, hv: Hypervisor, go: threading.Event, service: threading.Thread,
                 remover: Attempt, kept: logging.handlers.BufferingHandler) -> None:
        self.hv = hv
        self.go = go
        self.service = service
        self.remover = remover
        self.kept = kept

    def go_once_joined(self, ident: int) -> Attempt:
        """Let the service thread run once thread ``ident`` waits in stop()
        to join it (or once let go already), from a thread of its own; its
        result: whether it came to that."""
        from xenback.sim import _hypervisor

        def let_go() -> bool:
            came = eventually(lambda: self.go.is_set() or stands_at(
                ident, _hypervisor.Hypervisor.stop, "self._thread.join("))
            self.go.set()
            return came

        return Attempt(let_go)

    def said(self) -> list[str]:
        """The messages of the records ``kept`` got, in order."""
        return [r.getMessage() for r in self.kept.buffer]


@contextlib.contextmanager
def _the_service_ending_with_a_record(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_LastRecord]:
    """A _LastRecord for the block, its hypervisor at ``path``.  At its
    end, the service thread let go, ``kept`` removed, monkeypatch undone,
    and the hypervisor stopped, unless the service thread is stuck (in a
    record whose handler's lock a test's thread stuck in stop() holds:
    this stop() would wait for it too)."""
    from xenback.sim import _hypervisor

    go = threading.Event()

    class Late(threading.Thread):
        def run(self) -> None:
            go.wait(OUTLASTS_THE_TEST)
            super().run()

    hv = _hypervisor.Hypervisor(path)
    monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(Late))
    kept = logging.handlers.BufferingHandler(capacity=100)
    hv_logger = logging.getLogger(_hypervisor.__name__)
    hv_logger.addHandler(kept)
    service = None
    try:
        hv.add_domain(3, "guest")
        _with_refusals_unreported(hv, 3)
        hv.start()
        service = hv._thread
        assert service is not None
        remover = Attempt(lambda: hv.remove_domain(3))
        assert eventually(lambda: hv._removals != []), "the removal is not queued"
        yield _LastRecord(hv, go, service, remover, kept)
    finally:
        go.set()
        hv_logger.removeHandler(kept)
        monkeypatch.undo()
        if service is not None:
            service.join(TIMEOUT)
        if service is None or not service.is_alive():
            hv.stop()


def test_a_signal_handlers_stop_as_the_service_thread_ends_logging_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A removal another thread asked for as stop() came, answered by the
    service thread as it ends, logs (refusals the domain's log was
    spared), while the main thread emits a record through that handler,
    the lock held, and a signal's handler stopped the service (a host
    closed on SIGTERM).  stop() ends, and emits the record once.  Emitted
    by the service thread, it kept stop()'s join waiting for the lock
    stop()'s caller held: for ever."""
    with _the_service_ending_with_a_record(tmp_path, monkeypatch) as last:
        # In a test's thread standing for the main one: its stop() joins
        # the service thread as the main one's would (the removal, asked
        # for in another thread, is the service thread's).
        def in_a_record() -> object:
            last.go_once_joined(threading.get_ident())
            return last.hv.stop()

        with _main_in_a_record(last.hv.stop, monkeypatch, last.go.set) as record:
            outcome = record.call(
                in_a_record,
                msg="stop() waits for the service thread, which waits for its caller's lock")
            assert outcome is None
            assert not last.service.is_alive()
            assert last.remover.result() is None
            assert record.said() == last.SAID


def test_the_service_threads_last_records_are_emitted_once_by_stop_cut_short(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A removal another thread asked for as stop() came, answered by the
    service thread as it ends, logs (refusals the domain's log was
    spared): stop(), which joined that thread, emits the record.  A
    Ctrl-C landing anywhere in stop(), then stop() again: it is emitted
    once.  One landing as it was emitted left it to the next stop(),
    which emitted it again."""
    from racewindow import line_of

    from xenback.sim import _heldlog

    def landing(n: int) -> str:
        with _the_service_ending_with_a_record(tmp_path / str(n), monkeypatch) as last:
            resumer = last.go_once_joined(threading.get_ident())
            try:
                where = interrupted_at(n, SIM_CODE, last.hv.stop)
            finally:
                last.go.set()
                last.hv.stop()
            assert last.remover.result() is None, where
            assert resumer.result() is True, where
            assert last.said() == last.SAID, f"interrupted {where}"
            return where

    landed = landings(landing)
    emitting = line_of(_heldlog.emit, "logger.handle(record)")
    assert f"as a call returns in emit, _heldlog.py:{emitting}" in landed, landed


def test_the_service_threads_last_records_are_kept_by_a_stop_in_a_keeping_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() from a thread that keeps its records (one holding the host's
    lock, closing it, see _heldlog): what the service thread handed it is
    kept with that thread's own, not emitted there.  It was emitted under
    the host's lock, where a signal's handler's close(), come in as the
    main thread held the handler's lock, waited for that lock for ever."""
    from xenback.sim import _heldlog

    with _the_service_ending_with_a_record(tmp_path, monkeypatch) as last:
        into: list[logging.LogRecord] = []

        def stop() -> None:
            with _heldlog.records_kept(into):
                last.hv.stop()

        stopper = Attempt(stop)
        assert stopper.thread.ident is not None
        # The service thread runs once stop() waits for it to end, and
        # hands it the removal's record.
        assert last.go_once_joined(stopper.thread.ident).result(), "stop() does not join"
        assert stopper.result() is None
        assert last.remover.result() is None
        assert [r.getMessage() for r in into] == last.SAID
        assert last.kept.buffer == []
        last.hv.stop()  # kept once: nothing left for the next
        assert len(into) == 1
        assert last.kept.buffer == []


def test_the_service_threads_last_records_are_emitted_by_a_stop_cut_short(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, but nobody calls stop() again after the Ctrl-C (a host
    whose close() it cut short, as the program ends): the record is
    emitted all the same, once, by stop() on its way out or by the thread
    that made it; and once still after stop() again.  Handed to the
    stop() cut short, it waited for the next, and was lost without one.
    (Not one landing in stop()'s emitting them, which leaves the rest to
    the next stop(), so as to emit none twice.)"""
    from racewindow import line_of

    from xenback.sim import _hypervisor

    # A landing in stop()'s emitting them leaves the rest to the next.
    emitting = line_of(_hypervisor.Hypervisor.stop, "emit(self._unsaid)")

    def landing(n: int) -> str:
        with _the_service_ending_with_a_record(tmp_path / str(n), monkeypatch) as last:
            resumer = last.go_once_joined(threading.get_ident())
            try:
                where = interrupted_at(n, SIM_CODE, last.hv.stop)
            finally:
                last.go.set()
            assert last.remover.result() is None, where
            assert resumer.result() is True, where
            if (not re.search(r" emit, _heldlog\.py:\d+$", where)
                    and not where.endswith(f"Hypervisor.stop, _hypervisor.py:{emitting}")):
                assert eventually(lambda: len(last.kept.buffer) >= 1), \
                    f"lost, interrupted {where}"
            last.hv.stop()
            assert last.said() == last.SAID, f"interrupted {where}"
            return where

    landed = landings(landing)
    assert any("self._thread.join(" in where or "Hypervisor.stop" in where
               for where in landed), landed


def test_a_hypervisor_domain_socket_path_is_measured_in_bytes() -> None:
    """sun_path holds bytes: a path of fewer characters than its 107, but
    more bytes (an é is two), is refused with ENAMETOOLONG, its size said
    in bytes, as the kernel counts."""
    from xenback.sim._hypervisor import Hypervisor, domain_socket

    with tempfile.TemporaryDirectory(prefix="xs") as base:
        tail = len(os.fsencode(domain_socket(Path("/"), 3)))  # "/domains/3/hypervisor"
        run_dir = Path(base) / ("é" * -(-(108 - len(os.fsencode(base)) - tail) // 2))
        path = domain_socket(run_dir, 3)
        size = len(os.fsencode(path))
        assert len(str(path)) <= 107 < size
        hv = Hypervisor(run_dir)
        try:
            with pytest.raises(OSError) as info:
                hv.add_domain(3, "guest")
            assert info.value.errno == errno.ENAMETOOLONG
            assert str(info.value).endswith(f"({size} bytes, at most 107)")
        finally:
            hv.stop()


def test_a_hypervisor_domain_socket_path_too_long_is_named_by_its_ends(tmp_path: Path) -> None:
    """A domain socket's path of thousands of characters is named as
    XenStored names its own (see test_xenstored_ops.py): by its first and
    last 100, with its size and the limit.  It was given whole."""
    from xenback.sim._hypervisor import Hypervisor, domain_socket

    run_dir = tmp_path.joinpath(*["é" * 100] * 10)
    path = os.fspath(domain_socket(run_dir, 3))
    hv = Hypervisor(run_dir)
    try:
        with pytest.raises(OSError) as info:
            hv.add_domain(3, "guest")
    finally:
        hv.stop()
    assert info.value.errno == errno.ENAMETOOLONG
    assert str(info.value) == (
        f"[Errno {errno.ENAMETOOLONG}] cannot listen on {path[:100]}...{path[-100:]}: AF_UNIX"
        f" path too long ({len(os.fsencode(path))} bytes, at most 107)")


def test_a_removal_asked_for_outside_the_main_thread_is_done_in_the_caller(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no service thread serving, remove_domain() from a thread other
    than the main one removes the domain in that thread: a signal's
    handler runs in the main thread only, so no thread is spent on it."""
    from racewindow import Attempt

    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")
    removers: list[threading.Thread] = []
    remove = _hypervisor.Hypervisor._remove_domain

    def recorded(self: Hypervisor, domid: int) -> None:
        removers.append(threading.current_thread())
        remove(self, domid)

    monkeypatch.setattr(_hypervisor.Hypervisor, "_remove_domain", recorded)
    try:
        caller = Attempt(lambda: hv.remove_domain(3))
        assert caller.result() is None
        assert removers == [caller.thread]
        assert hv.stats()["domains"] == 0
    finally:
        hv.stop()


def test_a_removal_the_main_thread_has_no_thread_for_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """remove_domain() from the main thread with no thread to be had for
    the removal (see Hypervisor._uninterrupted): a RuntimeError saying so,
    or the Ctrl-C landing anywhere in it, and the domain left whole
    (listed, listening, its handle open, its socket file there), for the
    next call, a thread to be had, to remove.  It was removed in place,
    where a Ctrl-C landing left it half removed (off the list, its
    listener and handles open) for good."""
    import socket

    from xenback.sim import _hypervisor

    def landing(n: int) -> str:
        hv = _hypervisor.Hypervisor(tmp_path / str(n))
        path = hv.add_domain(3, "guest")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        refused: list[RuntimeError] = []

        def remove() -> None:
            try:
                hv.remove_domain(3)
            except RuntimeError as e:
                refused.append(e)

        try:
            client.connect(os.fspath(path))
            monkeypatch.setattr(_hypervisor, "threading",
                                _ThreadingWith(threading.Thread, False))
            where = interrupted_at(n, SIM_CODE, remove)
            monkeypatch.undo()
            if not where:
                [e] = refused
                assert str(e) == ("no thread to remove domain 3 in, where no Ctrl-C cuts it"
                                  " short (can't start new thread)")
            assert (hv.stats()["domains"], hv.stats()["connections"]) == (1, 1), where
            assert path.exists(), where
            hv.remove_domain(3)
            assert hv.stats()["domains"] == 0
            assert client.recv(1, socket.MSG_DONTWAIT) == b"", where  # hung up
        finally:
            client.close()
            monkeypatch.undo()
            hv.stop()
        return where

    landed = landings(landing)
    assert any("Hypervisor._uninterrupted" in where for where in landed), landed


def test_a_removal_left_by_a_ctrl_c_spares_the_domain_added_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C in remove_domain()'s wait for the thread that removes the
    domain for it (no service thread serves: none started here); before
    that thread gets to it, the domain is removed (the next
    remove_domain()) and added again under the same domid.  That thread
    then finds its domain gone, and leaves the new one alone: listed,
    listening, its socket file there."""
    import socket

    from racewindow import PauseAt

    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    hv.add_domain(3, "guest")
    workers: list[threading.Thread] = []
    pause = PauseAt.in_method(monkeypatch, _hypervisor.Hypervisor, "_remove_listed",
                              "with self._lock")
    monkeypatch.setattr(_hypervisor, "threading",
                        _ThreadingWith(threading.Thread, _left_waiting(workers)))
    try:
        with pytest.raises(Interrupted):
            hv.remove_domain(3)
        [worker] = workers
        assert pause.reached.wait(TIMEOUT)
        hv.remove_domain(3)  # the first to get there: not paused
        path = hv.add_domain(3, "again")
        pause.resume()
        worker.join(TIMEOUT)
        assert not worker.is_alive()
        assert hv.stats()["domains"] == 1
        assert path.exists()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with client:
            client.connect(os.fspath(path))
            assert hv.stats()["connections"] == 1
    finally:
        pause.resume()
        monkeypatch.undo()
        hv.stop()


def test_a_removal_queued_for_the_service_spares_the_domain_added_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remove_domain() from a thread of the host's, queued for the
    service thread; before that thread gets to it, the domain is removed
    (the main thread's remove_domain()) and added again under the same
    domid.  The queued removal then finds its domain gone, and leaves the
    new one alone: listed, listening, its socket file there.  It was
    queued by domid, and removed the new domain."""
    import socket

    from racewindow import PauseAt

    from xenback.sim import _hypervisor

    hv = _hypervisor.Hypervisor(tmp_path)
    # The service's first round: woken by the queued removal, nothing
    # else being there to wake it.
    pause = PauseAt.in_method(monkeypatch, _hypervisor.Hypervisor, "_serve_loop",
                              "with records_kept(")
    try:
        hv.start()
        hv.add_domain(3, "guest")
        caller = Attempt(lambda: hv.remove_domain(3))
        assert pause.reached.wait(TIMEOUT)
        hv.remove_domain(3)  # in a thread of its own (see _uninterrupted)
        path = hv.add_domain(3, "again")
        pause.resume()
        assert caller.result() is None
        assert hv.stats()["domains"] == 1
        assert path.exists()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with client:
            client.connect(os.fspath(path))
            assert hv.stats()["connections"] == 1
    finally:
        pause.resume()
        monkeypatch.undo()
        hv.stop()


def test_no_domain_is_added_to_a_stopping_hypervisor() -> None:
    """stop() destroyed every domain: one added after it would keep a
    listening socket no service thread ever serves."""
    host = SimHost()
    host.start()
    host.close()
    with pytest.raises(RuntimeError, match="stopping"):
        host.hypervisor.add_domain(5, "late")


def test_destroy_after_a_wire_release(host: SimHost) -> None:
    from pyxs._internal import Op

    guest = host.create_domain("released")
    with host.dom0.xenstore() as c:
        # pyxs's release_domain() refuses client-side; send RELEASE itself.
        c.ack(Op.RELEASE, str(guest.domid).encode() + b"\0")
        host.destroy_domain(guest)
        assert not c.exists(b"/local/domain/1")
    assert host.domains() == [host.dom0]


def test_destroy_waits_for_the_backend_without_holding_the_host(host: SimHost) -> None:
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("vif", guest.domid)
    state = dev.backend_path.encode() + b"/state"
    with host.dom0.xenstore() as c:
        monitor = c.monitor()
        monitor.watch(state, b"t")
        done = threading.Event()

        def destroy() -> None:
            host.destroy_domain(guest, timeout=60)
            done.set()

        thread = threading.Thread(target=destroy)
        second = threading.Thread(target=host.destroy_domain, args=(guest,))
        thread.start()
        try:
            while c.read(state, b"") != b"5":  # the toolstack asks it to close
                monitor.events.get(timeout=10)
            # The guest is no longer listed, and the host serves others
            # while libxl waits for the backend.
            assert guest not in host.domains()
            other = host.create_domain("other")
            with pytest.raises(ValueError, match="exists already"):
                host.create_domain("guest")  # its name is taken until it is gone
            # A second destroy waits for the first to end, and returns
            # with it; it does not destroy the devices a second time.
            second.start()
            assert eventually(lambda: stands_at(
                second.ident, SimHost.destroy_domain, "other.running.acquire("))
            assert not done.is_set()
            with guest.xenstore() as g:  # alive until its devices are gone
                assert g.read(b"name") == b"guest"
            c.write(state, b"6")  # the backend closes: the wait ends
        finally:
            thread.join(30)
            if second.ident is not None:
                second.join(30)
        assert done.is_set() and not second.is_alive()
        assert host.domains() == [host.dom0, other]
        with pytest.raises(LookupError):
            host.domain(guest.domid)


def _destroy_waiting_for_its_backend(host: SimHost, guest: Domain, timeout: float) -> tuple[
        threading.Thread, list[BaseException], Callable[[], None]]:
    """A destroy of ``guest`` with ``timeout``, in a thread, once it waits
    for the backend of a device nobody serves: the thread, what it raised,
    and what closes the backend."""
    dev = host.toolstack.add_device("vif", guest.domid)
    state = dev.backend_path.encode() + b"/state"
    raised: list[BaseException] = []

    def destroy() -> None:
        try:
            host.destroy_domain(guest, timeout=timeout)
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=destroy)
    with host.dom0.xenstore() as c:
        monitor = c.monitor()
        monitor.watch(state, b"t")
        thread.start()
        while c.read(state, b"") != b"5":  # the toolstack asks it to close
            monitor.events.get(timeout=TIMEOUT)

    def close_backend() -> None:
        with host.dom0.xenstore() as c:
            c.write(state, b"6")

    return thread, raised, close_backend


def test_a_destroy_waiting_for_another_honours_its_own_timeout(host: SimHost) -> None:
    """A destroy of a domain that another destroy, giving its backends
    longer, is destroying: past its own timeout it raises TimeoutError
    (ETIMEDOUT), the domain still dying, and the other goes on and ends
    it.  It waited for the other for as long as that one took."""
    guest = host.create_domain("guest")
    first, raised, close_backend = _destroy_waiting_for_its_backend(
        host, guest, OUTLASTS_THE_TEST)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            host.destroy_domain(guest, timeout=0.2)
        assert time.monotonic() - started >= 0.2  # its whole timeout, no less
        assert info.value.errno == errno.ETIMEDOUT
        assert f"domain {guest.domid}" in str(info.value)
        assert first.is_alive()
        assert guest not in host.domains()
        with pytest.raises(ValueError, match="exists already"):
            host.create_domain("guest")  # still dying
    finally:
        close_backend()
        first.join(TIMEOUT)
    assert not first.is_alive() and raised == []
    assert host.domains() == [host.dom0]


def test_a_destroy_waiting_for_another_waits_no_slice_past_its_own_deadline(
        host: SimHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each wait for the other destroy, which gives its backends longer,
    ends by this one's deadline: the slice is cut at it.  A whole slice
    (0.1 s) raised the TimeoutError up to a slice late.  Told by the
    timeouts the waits ask for, which no clock or scheduling changes."""
    from xenback.sim._host import _DESTROY_WAIT_SLICE

    guest = host.create_domain("guest")
    first, raised, close_backend = _destroy_waiting_for_its_backend(
        host, guest, OUTLASTS_THE_TEST)
    timeout = _DESTROY_WAIT_SLICE / 2
    other = host._dying[guest.domid]
    running = other.running
    asked: list[float] = []

    class Recording:
        """The other destroy's lock, noting how long each wait asks for."""

        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            asked.append(timeout)
            return running.acquire(blocking, timeout)

        def release(self) -> None:
            running.release()

    monkeypatch.setattr(other, "running", Recording())
    try:
        with pytest.raises(TimeoutError):
            host.destroy_domain(guest, timeout=timeout)
    finally:
        close_backend()
        first.join(TIMEOUT)
    assert not first.is_alive() and raised == []
    assert asked and all(0 <= t <= timeout for t in asked), asked


def test_a_destroy_waiting_for_one_that_gives_its_backends_less_time_waits_it_out(
        host: SimHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other destroy's timeout ends before this one's: it waits for
    that destroy's forced removal, past its own timeout if the removal
    takes that long, and returns with the domain gone, as its own destroy
    would have."""
    guest = host.create_domain("guest")
    main = threading.get_ident()
    destroy_devices = host.toolstack.destroy_devices

    def forced_once_the_second_waits(domid: int, timeout: float | None = None) -> Any:
        late = destroy_devices(domid, timeout)
        # Not over before the second destroy waits for it: a main thread
        # stalled past the first's 0.5 s (a loaded machine) would find the
        # domain gone, a LookupError.
        assert eventually(lambda: stands_at(main, SimHost.destroy_domain,
                                            "other.running.acquire("))
        return late

    monkeypatch.setattr(host.toolstack, "destroy_devices", forced_once_the_second_waits)
    first, raised, _ = _destroy_waiting_for_its_backend(host, guest, 0.5)
    try:
        host.destroy_domain(guest, timeout=0.5)
    finally:
        first.join(TIMEOUT)
    assert not first.is_alive() and raised == []
    assert host.domains() == [host.dom0]


def test_create_domain_whose_socket_path_is_too_long() -> None:
    """A run_dir where dom0's hypervisor socket path just fits (107 bytes):
    domains 1..9 fit too, domain 10's path is one byte too long.  Creating
    it fails with ENAMETOOLONG (an errno, as XenStored's socket gets),
    naming the path and the limit, and leaves nothing behind: no
    domain, no XenStore home, no directory; the host goes on working."""
    with tempfile.TemporaryDirectory(prefix="xs") as base:
        run_dir = Path(base) / ("d" * (107 - len("/domains/0/hypervisor") - len(base) - 1))
        assert len(os.fspath(run_dir / "domains" / "0" / "hypervisor")) == 107
        with SimHost(run_dir) as host:
            guests = [host.create_domain(f"g{i}") for i in range(1, 10)]
            assert guests[-1].domid == 9
            before = sorted(os.listdir(run_dir / "domains"))
            too_long = run_dir / "domains" / "10" / "hypervisor"
            with pytest.raises(OSError) as info:
                host.create_domain("g10")
            assert info.value.errno == errno.ENAMETOOLONG
            assert info.value.filename is None  # named in the message, once
            assert str(info.value) == (f"[Errno {errno.ENAMETOOLONG}] cannot listen on "
                                       f"{too_long}: AF_UNIX path too long (108 bytes,"
                                       " at most 107)")
            assert sorted(os.listdir(run_dir / "domains")) == before
            assert host.domains() == [host.dom0, *guests]
            with pytest.raises(LookupError):
                host.domain(10)
            assert not host.xenstored.is_introduced(10)
            with host.dom0.xenstore() as c:
                assert sorted(c.list(b"/local/domain")) == sorted(
                    str(d).encode() for d in range(10))
            # The name was not taken: trying again fails the same way, with
            # the next id (ids are not reused).
            with pytest.raises(OSError, match="domains/11/hypervisor: AF_UNIX path too long"):
                host.create_domain("g10")
            assert sorted(os.listdir(run_dir / "domains")) == before
            # The domains that exist work as before.
            host.destroy_domain(guests[0])
            assert "1" not in os.listdir(run_dir / "domains")
    assert not Path(base).exists()


def test_a_64_character_name_is_a_name(host: SimHost) -> None:
    assert host.create_domain("x" * 64).name == "x" * 64


def test_refused_names_use_up_no_domain_id(host: SimHost) -> None:
    # Refused before anything is made: no XenStore home, no id.
    for name in ("", "tab\there", "x" * 65, "Domain-0", "caf\u00e9"):
        with pytest.raises(ValueError):
            host.create_domain(name)
    assert host.create_domain("ok").domid == 1


def test_no_guest_may_take_dom0s_name(host: SimHost) -> None:
    with pytest.raises(ValueError, match="'Domain-0' exists already"):
        host.create_domain("Domain-0")


def test_a_host_starts_once() -> None:
    with SimHost() as host:
        with pytest.raises(RuntimeError, match="SimHost is running"):
            host.start()
        assert host.domains() == [host.dom0]
    with pytest.raises(RuntimeError, match="SimHost is closed"):
        host.start()


def test_a_host_start_interrupted_anywhere_is_closed_whole(tmp_path: Path) -> None:
    """A Ctrl-C landing anywhere in SimHost's own start() code comes out
    as itself, and the host it leaves is running whole (the Ctrl-C came
    as start() returned) or refuses to serve dom0: never serving it while
    starting, which _check_running() allowed for a state none reaches.
    close() closes it, leaving no thread."""
    # In SimHost's own code.  XenStored.start(), Hypervisor.start() and
    # add_domain() and the toolstack's operations have sweeps of their own
    # (test_xenstored_ops.py, above, test_toolstack.py), as has
    # Hypervisor() (above).  Nothing is left open: one landing as
    # Hypervisor() returned, before the host stored it, left its wake-up
    # pipe and spare descriptor (made in __init__) with nobody to close them.
    elsewhere = tuple(os.fspath(p) for p in Path(SIM_CODE).iterdir() if p.name != "_host.py")

    def landing(n: int) -> str:
        before = descriptors()
        threads = set(threading.enumerate())
        host = SimHost(tmp_path / str(n))
        try:
            where = interrupted_at(n, SIM_CODE, host.start, besides=elsewhere)
            try:
                dom0: Domain | None = host.dom0
            except RuntimeError:
                dom0 = None
            # Served, it starts no more; no host serves dom0 while starting.
            if dom0 is not None:
                with pytest.raises(RuntimeError, match="^SimHost is running$"):
                    host.start()
        finally:
            host.close()
        with pytest.raises(RuntimeError, match="^SimHost is closed$"):
            host.start()
        _no_threads_since(threads, where)
        _descriptors_left_since(before, f"interrupted {where}")
        return where

    landed = landings(landing)
    assert any("SimHost._start" in where for where in landed), landed


def test_the_last_domain_id_is_0x7fef(host: SimHost) -> None:
    # libxl's DOMID_FIRST_RESERVED (0x7FF0) and above name no guest.
    host._domids = itertools.count(0x7FEF)
    assert host.create_domain("last").domid == 0x7FEF
    with pytest.raises(OSError, match="out of domain ids") as info:
        host.create_domain("one-too-many")
    assert info.value.errno == errno.ENOMEM  # as Xen's createdomain
    with pytest.raises(ValueError, match="must be a domain id"):
        host.domain(0x7FF0)
    # Another process asking gets the same errno.
    with pytest.raises(PlatformError, match="out of domain ids") as info:
        create_domain(host.run_dir, "from-afar")
    assert info.value.errno == errno.ENOMEM


def test_a_domain_xenstore_refuses_is_not_left_in_the_hypervisor(
    host: SimHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(domid: int) -> Path:
        raise OSError(errno.EMFILE, "no more connections")

    monkeypatch.setattr(host.xenstored, "introduce_domain", refuse)
    with pytest.raises(OSError, match="no more connections"):
        host.create_domain("guest")
    assert host.hypervisor.stats()["domains"] == 1
    assert sorted(os.listdir(host.run_dir / "domains")) == ["0"]
    with pytest.raises(OSError):
        attach(host.run_dir, 1)


def test_a_create_whose_undo_is_refused_raises_its_own_error(
    host: SimHost, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A create that fails (XenStore refuses the domain) from the main
    thread, with no thread to be had to remove the domain in: its own
    error comes out, the undo's refusal logged, and the next create
    (threads to be had) finishes the undo.  The refusal (a RuntimeError,
    "no thread to be had") took the create's error's place."""
    from xenback.sim import _hypervisor

    def refuse(domid: int) -> Path:
        monkeypatch.setattr(_hypervisor, "threading", _ThreadingWith(threading.Thread, False))
        raise OSError(errno.EMFILE, "no more connections")

    monkeypatch.setattr(host.xenstored, "introduce_domain", refuse)
    with caplog.at_level(logging.WARNING, logger="xenback.sim._host"):
        with pytest.raises(OSError, match="no more connections"):
            host.create_domain("guest")
    monkeypatch.undo()
    [said] = [r for r in caplog.records if r.name == "xenback.sim._host"]
    assert said.getMessage() == (
        "domain 1: undoing its create after OSError failed: no thread to remove domain 1 in,"
        " where no Ctrl-C cuts it short (can't start new thread)")
    assert said.exc_info is not None and type(said.exc_info[1]) is RuntimeError  # where, too
    assert host.hypervisor.stats()["domains"] == 2  # left whole
    guest = host.create_domain("guest")
    assert guest.domid == 2
    assert host.hypervisor.stats()["domains"] == 2
    assert sorted(os.listdir(host.run_dir / "domains")) == ["0", "2"]


@pytest.mark.parametrize(("timeout", "error", "said"), [
    (-1, ValueError, "timeout must be a non-negative number of seconds, not -1"),
    (float("nan"), ValueError, "timeout must be a non-negative number of seconds, not nan"),
    ("1", TypeError, "timeout must be a number of seconds, not str '1'"),
    (None, TypeError, "timeout must be a number of seconds, not NoneType None"),
    (True, TypeError, "timeout must be a number of seconds, not bool True")])
def test_destroy_refuses_a_timeout_that_is_no_time(
        host: SimHost, timeout: float, error: type[Exception], said: str) -> None:
    guest = host.create_domain("guest")
    with pytest.raises(error, match=f"^{re.escape(said)}$"):
        host.destroy_domain(guest, timeout=timeout)
    assert host.domains() == [host.dom0, guest]


def test_destroy_with_no_time_to_wait_forces_the_removal(host: SimHost) -> None:
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("vif", guest.domid)
    host.destroy_domain(guest, timeout=0)  # nobody would close the backend
    with host.dom0.xenstore() as c:
        assert not c.exists(dev.backend_path.encode())
    assert host.domains() == [host.dom0]


def test_dom0_is_not_destroyed(host: SimHost) -> None:
    for dom0 in (host.dom0, 0):
        with pytest.raises(ValueError, match="^dom0 cannot be destroyed$"):
            host.destroy_domain(dom0)
    assert host.domains() == [host.dom0]
    assert host.create_domain("guest").domid == 1


def test_destroying_a_driver_domain_deletes_what_it_served_at_once(
        host: SimHost, caplog: pytest.LogCaptureFixture) -> None:
    """Its backends die with it: the devices it served, to a guest or to
    itself, go at once, without waiting for a Closed nobody can write (a
    wait for it would run out, and the toolstack say so)."""
    driver, guest = host.create_domain("driver"), host.create_domain("guest")
    served = host.toolstack.add_device("vif", guest.domid, backend_id=driver.domid)
    own = host.toolstack.add_device("console", driver.domid, backend_id=driver.domid)
    host.destroy_domain(driver, timeout=30)
    assert "did not close" not in caplog.text
    assert host.toolstack.devices() == []
    with host.dom0.xenstore() as c:
        for dev in (served, own):
            for path in (dev.frontend_path, dev.backend_path, dev.libxl_path):
                assert not c.exists(path.encode()), path


def test_destroy_forgets_what_libxl_kept_of_the_domain(host: SimHost) -> None:
    guest = host.create_domain("guest")
    with host.dom0.xenstore() as c:  # no device: devices() skips it
        c.write(f"/libxl/{guest.domid}/dm-version".encode(), b"qemu_xen")
    host.destroy_domain(guest)
    with host.dom0.xenstore() as c:
        assert not c.exists(f"/libxl/{guest.domid}".encode())


def test_close_waits_for_a_control_request_in_flight(host: SimHost) -> None:
    """A domain_destroy from another process still running when the host
    closes: close() returns only once it has finished."""
    from xenback.sim import destroy_domain

    guest = host.create_domain("guest")
    entered, release = threading.Event(), threading.Event()
    real = host.destroy_domain

    def held_destroy(domain: Domain | int, timeout: float = 10.0) -> None:
        entered.set()
        assert release.wait(TIMEOUT)
        real(domain, timeout)

    host.destroy_domain = held_destroy  # type: ignore[method-assign]
    outcome: list[BaseException | None] = []

    def remote() -> None:
        try:
            destroy_domain(host.run_dir, guest.domid)
        except BaseException as e:
            outcome.append(e)
        else:
            outcome.append(None)

    caller = threading.Thread(target=remote)
    caller.start()
    closer = threading.Thread(target=host.close)
    try:
        assert entered.wait(TIMEOUT)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive(), "close() returned while a control request ran"
    finally:
        release.set()
        if closer.ident is not None:
            closer.join(TIMEOUT)
        caller.join(TIMEOUT)
    assert not closer.is_alive() and not caller.is_alive()
    (error,) = outcome
    assert isinstance(error, OSError) and error.errno == errno.ENODEV, error
    assert [t for t in threading.enumerate() if t.name.startswith("xenback-sim-control")] == []


def test_a_control_requests_records_outlive_a_close_cut_short(
        host: SimHost, caplog: pytest.LogCaptureFixture) -> None:
    """A Ctrl-C in close()'s join of a toolstack's thread serving dom0,
    which goes on and logs, and no close() after it (as the program
    ends): what the thread logged is emitted all the same, once; once
    still after close() again.  Handed to the close() that gave up on
    it, it waited for the next close()."""
    from racewindow import Attempt

    from xenback.sim import destroy_domain

    guest = host.create_domain("guest")
    entered, release = threading.Event(), threading.Event()

    def held_destroy(domain: Domain | int, timeout: float = 10.0) -> None:
        entered.set()
        assert release.wait(TIMEOUT)
        raise OSError(errno.EIO, "a destroy failing (injected)")

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "xenback.sim._host"]

    host.destroy_domain = held_destroy  # type: ignore[method-assign]
    caller = Attempt(functools.partial(destroy_domain, host.run_dir, guest.domid))
    try:
        assert entered.wait(TIMEOUT)
        [server] = [t for t in threading.enumerate() if t.name.startswith("xenback-sim-control")]
        with caplog.at_level(logging.WARNING, logger="xenback.sim._host"):
            cut_short_in_its_join(server, host.close, release.set)
            message = (f"domain control request domain_destroy {{'domid': {guest.domid}}}"
                       f" failed: [Errno {errno.EIO}] a destroy failing (injected)")
            assert said() == [message]
            host.close()
            assert said() == [message]
    finally:
        release.set()
        caller.result()


def test_domains_of_two_hosts_are_not_equal() -> None:
    with SimHost() as one, SimHost() as two:
        a, b = one.create_domain("guest"), two.create_domain("guest")
        assert a.domid == b.domid
        assert a != b and a == attach(one.run_dir, 1)
        assert len({a, b, attach(two.run_dir, 1)}) == 2


def test_a_relative_run_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sockets are found again after a chdir: every path is absolute.
    monkeypatch.chdir(tmp_path)
    with SimHost("run") as host:
        assert host.run_dir == tmp_path / "run"
        guest = host.create_domain("guest")
        assert guest.run_dir == tmp_path / "run"
        assert attach("run", 1).run_dir == tmp_path / "run"
        monkeypatch.chdir("/")
        with guest.evtchn() as ch:
            ch.bind_unbound_port(0)


@pytest.mark.parametrize(("domid", "error", "said"), [
    (-1, ValueError, "domid must be a domain id (0 to 32751), not -1"),
    (0x7FF0, ValueError, "domid must be a domain id (0 to 32751), not 32752"),
    pytest.param(10**5000, ValueError, "domid must be a domain id (0 to 32751), "
                                       "not about 10**5000 (an int of 16610 bits)", id="1e5000"),
    (True, TypeError, "domid must be an int (a domain id), not bool True"),
    ("1", TypeError, "domid must be an int (a domain id), not str '1'")])
def test_attach_refuses_what_is_not_a_domain_id(
        host: SimHost, domid: int, error: type[Exception], said: str) -> None:
    with pytest.raises(error, match=f"^{re.escape(said)}$"):
        attach(host.run_dir, domid)


@pytest.mark.parametrize(("name", "said"), [(5, "int 5"), (b"g", "bytes b'g'")])
def test_create_from_another_process_refuses_a_name_that_is_no_str(
        host: SimHost, name: object, said: str) -> None:
    """As SimHost.create_domain(): a TypeError, at once, not the
    hypervisor's EINVAL for the request."""
    with pytest.raises(TypeError, match=f"^a domain name must be a str, not {re.escape(said)}$"):
        create_domain(host.run_dir, name)  # type: ignore[arg-type]
    assert host.domains() == [host.dom0]


@pytest.mark.parametrize(("domid", "error", "said"), [
    (-1, ValueError, "domid must be a domain id (0 to 32751), not -1"),
    (0x7FF0, ValueError, "domid must be a domain id (0 to 32751), not 32752"),
    pytest.param(10**5000, ValueError, "domid must be a domain id (0 to 32751), "
                                       "not about 10**5000 (an int of 16610 bits)", id="1e5000"),
    (True, TypeError, "domid must be an int (a domain id), not bool True")])
def test_destroy_from_another_process_refuses_what_is_not_a_domain_id(
        host: SimHost, domid: int, error: type[Exception], said: str) -> None:
    """As attach() in the same module: 10**5000 failed inside the
    request's JSON, with Python's digit limit for its message."""
    from xenback.sim import destroy_domain

    guest = host.create_domain("guest")
    with pytest.raises(error, match=f"^{re.escape(said)}$"):
        destroy_domain(host.run_dir, domid)
    assert host.domains() == [host.dom0, guest]


def test_without_a_host_the_platform_is_unavailable(tmp_path: Path) -> None:
    from xenback.platform import PlatformError, PlatformUnavailable
    from xenback.sim import destroy_domain

    for call in (lambda: create_domain(tmp_path, "g"), lambda: destroy_domain(tmp_path, 1),
                 lambda: attach(tmp_path, 0)):
        with pytest.raises(PlatformUnavailable) as info:
            call()
        assert isinstance(info.value, PlatformError)
        assert info.value.errno == errno.ENOENT
        assert f"simulated host in {tmp_path}" in str(info.value)


def test_domain_control_of_a_host_that_died_says_how_the_connection_failed(
        tmp_path: Path) -> None:
    # Its dom0 socket left behind refuses a connection: ECONNREFUSED, as
    # attach() says, not the ENOENT of a run directory without sockets.
    import socket

    from xenback.platform import PlatformUnavailable
    from xenback.sim import destroy_domain

    path = tmp_path / "domains" / "0" / "hypervisor"
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    for call in (lambda: create_domain(tmp_path, "g"), lambda: destroy_domain(tmp_path, 1)):
        with pytest.raises(PlatformUnavailable) as info:
            call()
        assert info.value.errno == errno.ECONNREFUSED
        assert f"no simulated host in {tmp_path}" in str(info.value)


def test_a_failed_grant_or_channel_operation_is_a_platform_error(host: SimHost) -> None:
    # Backends catch PlatformError (an OSError) for whatever Xen refuses.
    from xenback.platform import EventChannelError, GrantError, PlatformError

    guest = host.create_domain("guest")
    with host.dom0.gnttab() as tab, pytest.raises(PlatformError) as info:
        tab.map_grant_refs(guest.domid, [8])  # never granted
    assert type(info.value) is GrantError and info.value.errno == errno.EINVAL
    with host.dom0.evtchn() as ch, pytest.raises(PlatformError) as info:
        ch.notify(99)  # not bound
    assert type(info.value) is EventChannelError


def test_joining_leaves_no_socket_open(host: SimHost, tmp_path: Path) -> None:
    """attach, create_domain and destroy_domain close the connection they
    asked through, also when there is nothing to reach (an unclosed socket
    is a ResourceWarning, and a descriptor until the collector runs)."""
    import gc
    import warnings

    from xenback.sim import destroy_domain

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        guest = create_domain(host.run_dir, "guest")
        attach(host.run_dir, guest.domid)
        destroy_domain(host.run_dir, guest.domid)
        with pytest.raises(OSError):
            attach(tmp_path, 0)
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


_MEMBERS = {"domid": 0, "run_dir": Path("/run"), "xenstore": None, "gnttab": None,
            "gntshr": None, "evtchn": None}


@pytest.mark.parametrize("missing", sorted(_MEMBERS))
def test_a_platform_has_every_service(missing: str) -> None:
    # What a backend checks its platform argument against.
    class Partial:
        pass

    def service(self: Partial) -> None:
        return None

    for name, value in _MEMBERS.items():
        if name != missing:
            setattr(Partial, name, service if value is None else value)
    assert not isinstance(Partial(), Platform)
    setattr(Partial, missing, service if _MEMBERS[missing] is None else _MEMBERS[missing])
    assert isinstance(Partial(), Platform)


@pytest.mark.parametrize("domid", [True, 1.0, "1", None])
def test_destroy_refuses_what_is_not_a_domain_and_keeps_it(host: SimHost, domid: object) -> None:
    # True == 1 == 1.0 as dict keys: each would have reached domain 1.
    guest = host.create_domain("guest")
    with pytest.raises(TypeError, match="^domain must be a Domain or a domain id "
                                        rf"\(an int\), not {type(domid).__name__} "):
        host.destroy_domain(domid)  # type: ignore[arg-type]
    assert host.domains() == [host.dom0, guest]
    assert host.hypervisor.stats()["domains"] == 2
    with guest.xenstore() as c:
        assert c.read(b"name") == b"guest"


def test_destroy_refuses_a_domain_of_another_host() -> None:
    with SimHost() as one, SimHost() as two:
        mine, theirs = one.create_domain("mine"), two.create_domain("theirs")
        assert mine.domid == theirs.domid
        with pytest.raises(ValueError, match="is not a domain of the host in"):
            one.destroy_domain(theirs)
        assert one.domains() == [one.dom0, mine]
        assert two.domains() == [two.dom0, theirs]


def test_a_run_dir_in_use_is_refused_and_left_alone(tmp_path: Path) -> None:
    with SimHost(tmp_path / "run") as live:
        guest = live.create_domain("guest")
        sockets = sorted(p for p in live.run_dir.rglob("*") if p.is_socket())
        second = SimHost(tmp_path / "run")
        with pytest.raises(OSError, match="served by someone else") as in_use:
            second.start()
        assert in_use.value.errno == errno.EADDRINUSE
        # The live host's sockets are not taken for a dead one's.
        assert sorted(p for p in live.run_dir.rglob("*") if p.is_socket()) == sockets
        assert attach(live.run_dir, guest.domid) == guest
        with guest.evtchn() as ch:
            ch.bind_unbound_port(0)


def test_a_destroy_waiting_for_a_backend_ends_with_the_host() -> None:
    """close() while destroy_domain waits for a backend that never closes:
    the domain went down with the host, so the destroy returns at once
    instead of waiting out its timeout and failing on a lost XenStore."""
    host = SimHost()
    host.start()
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("vif", guest.domid)
    outcome: list[BaseException | None] = []

    def destroy() -> None:
        try:
            host.destroy_domain(guest, timeout=10 * TIMEOUT)
        except BaseException as e:
            outcome.append(e)
        else:
            outcome.append(None)

    with host.dom0.xenstore() as c:
        monitor = c.monitor()
        monitor.watch(f"{dev.backend_path}/state".encode(), b"t")
        destroyer = threading.Thread(target=destroy)
        destroyer.start()
        deadline = time.monotonic() + TIMEOUT
        while c.read(f"{dev.backend_path}/state".encode()) != b"5":  # asked to close
            monitor.events.get(timeout=max(0.0, deadline - time.monotonic()))
    # Waiting for an event, not about to connect (that would fail at once).
    assert eventually(lambda: stands_at(destroyer.ident, Toolstack._wait_closed, "events.get("))
    host.close()
    destroyer.join(TIMEOUT)
    assert not destroyer.is_alive()
    assert outcome == [None]


@pytest.mark.parametrize("domid", ["1", 1.0, True, None])
def test_domain_refuses_what_is_not_a_domain_id(host: SimHost, domid: object) -> None:
    # Not "no domain 1" while domain 1 lives, nor domain 1 for True.
    host.create_domain("guest")
    with pytest.raises(TypeError, match=rf"^domid must be an int \(a domain id\), "
                                        rf"not {type(domid).__name__} "):
        host.domain(domid)  # type: ignore[arg-type]


def test_a_host_not_started_says_so() -> None:
    host = SimHost()
    for call in (lambda: host.dom0, lambda: host.create_domain("g"),
                 lambda: host.destroy_domain(1)):
        with pytest.raises(RuntimeError, match=r"^SimHost is not started \(start\(\) or with\)"):
            call()


def test_destroy_takes_its_domain_joined_through_a_symlink(tmp_path: Path) -> None:
    with SimHost(tmp_path / "run") as host:
        guest = host.create_domain("guest")
        (tmp_path / "link").symlink_to(tmp_path / "run")
        host.destroy_domain(attach(tmp_path / "link", guest.domid))
        assert host.domains() == [host.dom0]


def test_stats_count_a_handle_the_service_has_not_accepted_yet(host: SimHost) -> None:
    # Opening a handle is a connect(), which returns once the connection is
    # in the listener's backlog, before the service accepts it.  Leak checks
    # take stats() and the process's descriptors right after opening
    # handles: a handle accepted later looked like a descriptor leaked.
    hv = host.hypervisor
    select = hv._selector.select
    paused, resume = threading.Event(), threading.Event()

    def stalled_select(timeout: float | None = None) -> list[Any]:
        paused.set()
        assert resume.wait(TIMEOUT)
        return select(timeout)

    before = hv.stats()["connections"]
    hv._selector.select = stalled_select  # type: ignore[method-assign]
    try:
        os.write(hv._wake_w, b"x")  # out of the select() it is in
        assert paused.wait(TIMEOUT)
        with host.dom0.evtchn():
            fds = open_fds()
            assert hv.stats()["connections"] == before + 1
            # Its service end exists by now, not later.
            assert open_fds() - fds
    finally:
        hv._selector.select = select  # type: ignore[method-assign]
        resume.set()
    assert eventually(lambda: hv.stats()["connections"] == before)


class Hung(BaseException):
    """Raised in the main thread by :class:`CallFromHandler` when the
    handler's call did not return in time: a deadlock ends the test."""


class CallFromHandler:
    """``call()`` from a signal's handler, run in the main thread in
    :meth:`pause`, which a test patches in where it wants the main thread
    (a lock of the host held, say).  :meth:`pause` sends SIGUSR1 to its own
    thread, so the handler runs as ``pthread_kill`` returns, there and
    nowhere else (a signal sent from another thread may come as the main
    thread is about to sleep in a lock, and wait as long as the lock).  The
    handler makes the call and lets what it raised go on (kept in
    :attr:`raised`).  Should the call not return within ``TIMEOUT``, a
    watchdog's SIGUSR2 interrupts it with :class:`Hung`."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.call = call
        self.raised: list[BaseException] = []
        self._paused = threading.Event()
        self._returned = threading.Event()
        # _lock makes a signal and the end of the block exclusive: none is
        # sent once the handlers are put back.
        self._lock = threading.Lock()
        self._over = False
        self._watchdog = threading.Thread(target=self._watch, name="signal-watchdog")

    def pause(self) -> None:
        assert threading.current_thread() is threading.main_thread()
        self._paused.set()
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    def _handler(self, signum: int, frame: object) -> None:
        try:
            self.call()
        except BaseException as e:
            self.raised.append(e)
            raise
        finally:
            self._returned.set()

    @staticmethod
    def _hung(signum: int, frame: object) -> None:
        raise Hung(f"a call from a signal's handler did not return in {TIMEOUT} s")

    def _watch(self) -> None:
        self._paused.wait(TIMEOUT)
        if not self._returned.wait(TIMEOUT):
            with self._lock:
                if not self._over:
                    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR2)

    def __enter__(self) -> CallFromHandler:
        self._old = (signal.signal(signal.SIGUSR1, self._handler),
                     signal.signal(signal.SIGUSR2, self._hung))
        self._watchdog.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._over = True
        self._paused.set()
        self._returned.set()
        self._watchdog.join()
        signal.signal(signal.SIGUSR1, self._old[0])
        signal.signal(signal.SIGUSR2, self._old[1])


def _no_guest_left(host: SimHost) -> None:
    assert host.domains() == [host.dom0]
    assert host.hypervisor.stats()["domains"] == 1
    assert os.listdir(host.run_dir / "domains") == ["0"]
    with host.dom0.xenstore() as c:
        assert c.list(b"/local/domain") == [b"0"]
        assert not c.exists(b"/libxl") or c.list(b"/libxl") == []


@pytest.mark.parametrize("nested", ["close", "domains", "create_domain"])
def test_a_signal_handler_calling_the_host_inside_create_domain_is_refused(
    host: SimHost, monkeypatch: pytest.MonkeyPatch, nested: str
) -> None:
    """A signal's handler runs in the main thread wherever that is: here in
    create_domain(), which holds the host's lock.  close() (or any call of
    the host that takes the lock) from the handler waited for it for ever.
    It is refused, saying why; the error goes out through create_domain(),
    which undoes what it did, and the host serves and closes as usual."""
    calls: dict[str, Callable[[], object]] = {
        "close": host.close, "domains": host.domains,
        "create_domain": lambda: host.create_domain("other"),
    }
    add_domain = host.hypervisor.add_domain
    with CallFromHandler(calls[nested]) as handler:
        def paused_add_domain(domid: int, name: str) -> None:
            add_domain(domid, name)
            handler.pause()

        monkeypatch.setattr(host.hypervisor, "add_domain", paused_add_domain)
        with pytest.raises(RuntimeError) as info:
            host.create_domain("guest")
    assert handler.raised == [info.value]
    assert str(info.value).startswith(
        f"SimHost.{nested}() called while this thread is inside SimHost.create_domain()"
        " (from a signal handler?)")
    monkeypatch.undo()
    _no_guest_left(host)
    assert host.create_domain("guest").domid == 2
    host.close()
    assert not host.run_dir.exists()


def test_a_signal_handler_closing_the_host_inside_destroy_domain_is_refused(
    host: SimHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same in the part of destroy_domain() that holds the lock (the
    hypervisor's and XenStore's parts of the destroy): refused, the domain
    left dying, and the next destroy_domain() finishes it."""
    guest = host.create_domain("guest")
    remove_domain = host.hypervisor.remove_domain
    with CallFromHandler(host.close) as handler:
        def paused_remove_domain(domid: int) -> None:
            remove_domain(domid)
            handler.pause()

        monkeypatch.setattr(host.hypervisor, "remove_domain", paused_remove_domain)
        with pytest.raises(RuntimeError, match=r"inside SimHost\.destroy_domain\(\)"):
            host.destroy_domain(guest)
    monkeypatch.undo()
    assert host.domains() == [host.dom0]
    host.destroy_domain(guest)
    _no_guest_left(host)
    host.close()
    assert not host.run_dir.exists()


def test_a_signal_handler_closes_the_host_while_no_lock_is_held(
    host: SimHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused only where it would wait for itself: while destroy_domain()
    waits for the domain's backends (without the host's lock), close() from
    a handler closes the host, and the destroy returns, the domain gone
    with the host."""
    guest = host.create_domain("guest")
    destroy_devices = host.toolstack.destroy_devices
    with CallFromHandler(host.close) as handler:
        def paused_destroy_devices(domid: int, timeout: float) -> list[Any]:
            handler.pause()
            return destroy_devices(domid, timeout)

        monkeypatch.setattr(host.toolstack, "destroy_devices", paused_destroy_devices)
        host.destroy_domain(guest)
    assert handler.raised == []
    assert not host.run_dir.exists()
    with pytest.raises(RuntimeError, match="SimHost is closed"):
        host.create_domain("late")


def test_a_signal_handler_destroying_the_domain_a_destroy_waits_on_finishes_it(
    host: SimHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """destroy_domain() of the same domain from a handler that came while
    destroy_domain() waited for the backends (without the lock): the
    interrupted destroy, of this thread, cannot end before the handler
    returns, so the handler's goes on with what it left rather than wait
    for it (which would time out, or wait for ever), and both return."""
    guest = host.create_domain("guest")
    destroy_devices = host.toolstack.destroy_devices
    paused: list[bool] = []
    with CallFromHandler(lambda: host.destroy_domain(guest.domid, 0)) as handler:
        def paused_destroy_devices(domid: int, timeout: float) -> list[Any]:
            if not paused:  # the interrupted destroy's, not the handler's
                paused.append(True)
                handler.pause()
            return destroy_devices(domid, timeout)

        monkeypatch.setattr(host.toolstack, "destroy_devices", paused_destroy_devices)
        host.destroy_domain(guest, 5.0)
    assert handler.raised == []
    monkeypatch.undo()
    assert host.domains() == [host.dom0]
    _no_guest_left(host)


@pytest.mark.parametrize("function", ["_locked", "_create_domain"])
def test_an_interrupt_as_any_call_of_create_domain_returns_leaves_no_half_domain(
    host: SimHost, function: str
) -> None:
    """What a signal's handler raises (KeyboardInterrupt, or the RuntimeError
    the host gives it above) comes as a call returns, any call: the lock is
    not left held or marked, and a domain is made whole or not at all."""
    code = getattr(SimHost, function).__code__
    for n in itertools.count():
        if not interrupted_as_call_returns(code, n, lambda: host.create_domain("guest")):
            break
        held = host._lock.locked()
        if held:
            host._lock.release()  # or the fixture's close() would hang
        assert not held, f"lock left held by an interrupt as call {n} returned"
        assert host._holder is None
        for domain in host.domains()[1:]:  # made whole: the call had returned
            host.destroy_domain(domain)
        _no_guest_left(host)
    assert n > 0  # there were calls to interrupt
    # The last call went undisturbed.
    assert [d.name for d in host.domains()] == ["Domain-0", "guest"]


def test_attach_to_a_host_that_died_finds_no_domain(tmp_path: Path) -> None:
    # A host killed leaves its sockets behind, which refuse a connection:
    # the domain is not there, as in a run directory without them.
    import socket

    path = tmp_path / "domains" / "0" / "hypervisor"
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    with pytest.raises(PlatformError) as info:
        attach(tmp_path, 0)
    assert info.value.errno == errno.ECONNREFUSED
    assert str(info.value.strerror).startswith(
        f"no domain 0 on a simulated host in {tmp_path} "), info.value


_GOOD_INFO = {"domid": 0, "name": "guest", "xenstore_path": "/run/xs"}

_MALFORMED_INFO = {
    "empty": {}, "no-path": {"domid": 0, "name": "guest"},
    "name-null": {**_GOOD_INFO, "name": None}, "name-int": {**_GOOD_INFO, "name": 5},
    "path-null": {**_GOOD_INFO, "xenstore_path": None},
    "path-list": {**_GOOD_INFO, "xenstore_path": ["/x"]},
    "domid-str": {**_GOOD_INFO, "domid": "0"}, "domid-bool": {**_GOOD_INFO, "domid": False},
    "domid-negative": {**_GOOD_INFO, "domid": -1},
    "domid-reserved": {**_GOOD_INFO, "domid": 0x7FF0},
    "good": _GOOD_INFO, "another-domain": {**_GOOD_INFO, "domid": 3},
}


@pytest.mark.parametrize("reply", _MALFORMED_INFO.values(), ids=_MALFORMED_INFO.keys())
@pytest.mark.parametrize("call", ["attach", "create_domain"])
def test_a_malformed_reply_to_attach_or_create_domain_is_a_protocol_error(
        tmp_path: Path, call: str, reply: dict[str, Any]) -> None:
    """The service's reply names the domain: one short of a field, or
    with one of the wrong type (or, to attach(), naming another domain)
    is its protocol error (EPROTO), not a KeyError or TypeError, nor a
    Domain of a name or domid that is none; descriptors it carried are
    closed, also those of a good one."""
    path = tmp_path / "domains" / "0" / "hypervisor"
    path.parent.mkdir(parents=True)
    r, w = os.pipe()
    server, _ = answering_once(str(path), reply, [w])
    good = reply is _GOOD_INFO or (call == "create_domain" and reply.get("domid") == 3)
    try:
        if good:
            domain = attach(tmp_path, 0) if call == "attach" else create_domain(tmp_path, "guest")
            assert (domain.domid, domain.name, domain.xenstore_path) == (
                reply["domid"], "guest", Path("/run/xs"))
        else:
            with pytest.raises(PlatformError) as info:
                attach(tmp_path, 0) if call == "attach" else create_domain(tmp_path, "guest")
            assert info.value.errno == errno.EPROTO, info.value
        # The write end it carried is closed: EOF.
        assert select.select([r], [], [], TIMEOUT)[0] == [r]
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        server.join(TIMEOUT)


@pytest.mark.timeout(600)
def test_a_destroy_interrupted_anywhere_is_finished_when_called_again(host: SimHost) -> None:
    """A Ctrl-C landing anywhere in destroy_domain(), then destroy_domain()
    again: the domain is gone whole (unlisted, its home deleted, its
    devices too, the channel's peer unbound, its grant revoked,
    @releaseDomain fired, nothing held).  The domain was unlisted first,
    so one cut short after that was lost: the retry said there was no such
    domain, and nothing could finish the destroy but the host's close()."""
    with host.dom0.xenstore() as c:
        monitor = c.monitor()
        events: queue.Queue[tuple[bytes, bytes]] = monitor.events
        monitor.watch(b"@releaseDomain", b"release")
        assert events.get(timeout=TIMEOUT) == (b"@releaseDomain", b"release")

        def landing(n: int) -> str:
            grants = host.hypervisor.stats()["grants"]
            guest = host.create_domain("guest")
            host.toolstack.add_device("vif", guest.domid)
            e0, e1, shr, tab = (host.dom0.evtchn(), guest.evtchn(), guest.gntshr(),
                                host.dom0.gnttab())
            p0 = e0.bind_interdomain(guest.domid, e1.bind_unbound_port(0))
            pages = shr.share_pages(0, 1)
            mapping = tab.map_grant_refs(guest.domid, pages.refs)
            where = interrupted_at(n, SIM_CODE, lambda d=guest.domid: host.destroy_domain(d, 0),
                                   besides=SIM_ROUND_TRIP)
            try:
                host.destroy_domain(guest.domid, 0)
            except LookupError:
                pass  # the first one was over when the signal came, if it came
            assert host.domains() == [host.dom0], where
            with pytest.raises(LookupError):
                host.domain(guest.domid)
            assert host.hypervisor.stats()["domains"] == 1, where
            assert host.toolstack.devices() == [], where
            assert not c.exists(f"/local/domain/{guest.domid}".encode()), where
            assert not c.exists(f"/libxl/{guest.domid}".encode()), where
            assert not c.is_domain_introduced(guest.domid), where
            assert not (host.run_dir / "domains" / str(guest.domid)).exists(), where
            assert events.get(timeout=TIMEOUT) == (b"@releaseDomain", b"release"), where
            assert e0.remote(p0) is None, where
            assert wait_pending(e0) == p0, where
            with pytest.raises(PlatformError) as info:  # revoked: no new mapping
                tab.map_grant_refs(guest.domid, pages.refs)
            assert info.value.errno == errno.ESRCH, where
            mapping.unmap()
            assert host.hypervisor.stats()["grants"] == grants, where
            for handle in (e0, e1, shr, tab):
                handle.close()
            return where

        every_landing(host, landing, more_than=50)


@pytest.mark.parametrize("landing", ["in the devices' part", "in the domain's own end"])
def test_close_finishes_a_destroy_cut_short(tmp_path: Path, landing: str) -> None:
    """A domain left dying by a destroy cut short goes with the host:
    close() leaves nothing of it (nor of the host) in a caller's run
    directory, and no thread or descriptor."""
    threads, fds = set(threading.enumerate()), open_fds()
    host = SimHost(tmp_path / "run")
    host.start()
    guest = host.create_domain("guest")
    host.toolstack.add_device("vif", guest.domid)
    # As the first call of the wait for its backends returns, or as
    # XenStore's release of the domain (after the hypervisor's) does.
    code = (Toolstack._remove if landing == "in the devices' part"
            else XenStored.release_domain).__code__
    assert interrupted_as_call_returns(code, 0, lambda: host.destroy_domain(guest, 0))
    assert host.domains() == [host.dom0]
    with pytest.raises(ValueError, match="exists already"):
        host.create_domain("guest")  # dying, not gone
    host.close()
    assert not (tmp_path / "run").exists()
    with pytest.raises(RuntimeError, match="closed"):
        host.destroy_domain(guest)
    assert set(threading.enumerate()) - threads == set()
    assert eventually(lambda: open_fds() <= fds), landing


def _destroy_in_a_thread(host: SimHost, guest: Domain) -> BaseException | None:
    """destroy_domain(guest) in a thread, joined with a timeout: it must
    end (what it raised, if anything)."""
    raised: list[BaseException] = []

    def destroy() -> None:
        try:
            host.destroy_domain(guest)
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=destroy)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "destroy_domain() waits for a dead service thread"
    return raised[0] if raised else None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_destroy_after_the_hypervisor_thread_died_of_a_bug(
    host: SimHost, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The service thread dead of a bug (logged): nobody serves the
    removal, so remove_domain() does it itself.  It waited for the thread
    for ever, the host's lock held, and close() with it."""
    guest = host.create_domain("guest")
    hv = host.hypervisor
    service = hv._thread
    assert service is not None

    def select(timeout: float | None = None) -> Any:
        raise RuntimeError("a bug in the service loop")

    monkeypatch.setattr(hv._selector, "select", select)
    os.write(hv._wake_w, b"x")  # its select returns, and the next one fails
    service.join(TIMEOUT)
    assert not service.is_alive()
    monkeypatch.undo()
    assert _destroy_in_a_thread(host, guest) is None
    _no_guest_left(host)
    assert "hypervisor: the service thread died" in caplog.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_removal_pending_as_the_hypervisor_thread_dies_is_done(
    host: SimHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal asked for just as the service thread dies of a bug
    (before it ran the removals) is done as it dies: its caller waited
    for ever."""
    guest = host.create_domain("guest")
    hv = host.hypervisor

    def run_removals() -> None:
        raise RuntimeError("a bug in the service loop")

    monkeypatch.setattr(hv, "_run_removals", run_removals)
    assert _destroy_in_a_thread(host, guest) is None
    monkeypatch.undo()
    _no_guest_left(host)


def test_close_from_a_handler_inside_destroy_lets_a_waiting_destroy_go(
    host: SimHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() from a signal's handler that came in destroy_domain()'s wait
    for the backends (where the lock is not held: close() is allowed),
    while dom0's destroy of the same domain waits for that destroy: close()
    joins the control thread, which waited for the interrupted destroy,
    which cannot end before the handler returns, for ever.  (The handler
    is played by a thread the interrupted one waits for.)"""
    guest = host.create_domain("guest")
    host.toolstack.add_device("vif", guest.domid)
    from xenback.sim import destroy_domain as wire_destroy

    def destroy_devices(domid: int, timeout: float | None = None) -> None:
        wire = threading.Thread(target=lambda: _ignore(wire_destroy, host.run_dir, domid))
        wire.start()

        def control_waits() -> bool:
            with host._control_lock:
                threads = list(host._control_threads)
            return any(t.ident is not None and stands_at(
                t.ident, SimHost.destroy_domain, "other.running.acquire(") for t in threads)

        # (Said, not asserted: destroy_domain() takes an error from here,
        # the host closed, for the host's going.)
        seen.append(eventually(control_waits))
        handler = threading.Thread(target=host.close)
        handler.start()
        handler.join(TIMEOUT)
        seen.append(not handler.is_alive())
        wire.join(TIMEOUT)

    seen: list[bool] = []
    monkeypatch.setattr(host.toolstack, "destroy_devices", destroy_devices)
    host.destroy_domain(guest)
    assert seen == [True, True], "close() waited for a destroy its caller interrupted"


def _ignore(call: Callable[..., object], *args: object) -> None:
    try:
        call(*args)
    except OSError:
        pass  # the host closed under it


def test_the_xenstored_limits_are_the_hosts_to_set(tmp_path: Path) -> None:
    with SimHost(tmp_path, max_queued=300000, watch_event_timeout=None) as host:
        xsd = host._xenstored
        assert xsd is not None
        assert (xsd.max_queued, xsd.watch_event_timeout) == (300000, None)
    with SimHost() as host:
        xsd = host._xenstored
        assert xsd is not None
        assert (xsd.max_queued, xsd.watch_event_timeout) == (1 << 20, 20.0)
    with pytest.raises(ValueError, match="watch_event_timeout"):
        SimHost(tmp_path, watch_event_timeout=0)
    with pytest.raises(ValueError, match="max_queued"):
        SimHost(tmp_path, max_queued=1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_queued": "1048576"}, "^max_queued must be an int, not str$"),
    ({"max_queued": 1.5e6}, "^max_queued must be an int, not float$"),
    ({"max_queued": True}, "^max_queued must be an int, not bool$"),
    ({"watch_event_timeout": "20"},
     "^watch_event_timeout must be a number of seconds or None, not str$"),
    ({"watch_event_timeout": True},
     "^watch_event_timeout must be a number of seconds or None, not bool$"),
], ids=["max_queued-str", "max_queued-float", "max_queued-bool", "timeout-str", "timeout-bool"])
def test_a_limit_of_the_wrong_type_is_named(tmp_path: Path, kwargs: dict[str, object],
                                           message: str) -> None:
    # Compared unchecked, a string was "'<' not supported between instances
    # of 'str' and 'int'" (naming no argument), and a float or a bool was
    # taken for a byte count or a number of seconds.
    with pytest.raises(TypeError, match=message):
        SimHost(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("timeout", [math.inf, 10 ** 400, -math.inf, math.nan],
                         ids=["inf", "huge-int", "-inf", "nan"])
def test_never_is_none_not_an_endless_timeout(tmp_path: Path, timeout: float) -> None:
    # inf was taken (while xenback-sim -w refused it): never has one
    # spelling, None, as 0 on the command line.  An int too large for a
    # float deadline was taken too, and broke the loop at the first event.
    with pytest.raises(ValueError, match="^watch_event_timeout must be positive and finite"):
        SimHost(tmp_path, watch_event_timeout=timeout)
    assert list(tmp_path.iterdir()) == []


def test_a_huge_limit_is_taken_as_given(tmp_path: Path) -> None:
    # Nothing here is a C int that could wrap: a limit past what memory or
    # time allows is one never reached, which is what it says.
    with SimHost(tmp_path, max_queued=2 ** 100, watch_event_timeout=1e300) as host:
        xsd = host._xenstored
        assert xsd is not None
        assert (xsd.max_queued, xsd.watch_event_timeout) == (2 ** 100, 1e300)
        guest = host.create_domain("guest")
        home = f"/local/domain/{guest.domid}".encode()
        with guest.xenstore() as c:
            # A guest's event is queued with its deadline 1e300 s away.
            monitor = c.monitor()
            monitor.watch(home, b"t")
            assert monitor.events.get(timeout=TIMEOUT) == (home, b"t")


def test_domain_ids_follow_the_port_rule(host: SimHost) -> None:
    """Domain ids, as ports (xenback._flags.is_int): an int subclass such
    as an IntEnum is the domain it stands for, everywhere the simulated
    host takes one; it was "invalid domain id <Dom.GUEST: 1>"."""
    import enum

    guest = host.create_domain("guest")
    Dom = enum.IntEnum("Dom", {"ZERO": 0, "GUEST": guest.domid})
    assert host.domain(Dom.GUEST) is guest
    again = attach(host.run_dir, Dom.GUEST)
    assert again.domid == guest.domid and type(again.domid) is int
    with guest.evtchn() as ch:
        assert ch.bind_unbound_port(Dom.ZERO) > 0
    dev = host.toolstack.add_device("vif", Dom.GUEST, backend_id=Dom.ZERO, devid=Dom.ZERO)
    assert (type(dev.frontend_id), type(dev.backend_id), type(dev.devid)) == (int, int, int)
    assert dev.frontend_path == f"/local/domain/{guest.domid}/device/vif/0"
    assert host.toolstack.devices(Dom.GUEST) == [dev]
    assert host.toolstack.destroy_devices(Dom.GUEST, timeout=0) == [dev]  # no backend
    host.destroy_domain(Dom.GUEST)
    with pytest.raises(LookupError):
        host.domain(guest.domid)


@pytest.mark.parametrize("domid", [True, False])
def test_a_bool_is_no_domain_id(host: SimHost, domid: bool) -> None:
    """True and False are looked up as 1 and 0: refused before, as ports."""
    guest = host.create_domain("guest")
    for call in (lambda: host.domain(domid), lambda: host.destroy_domain(domid),
                 lambda: host.toolstack.devices(domid),
                 lambda: host.toolstack.add_device("vif", 1, devid=domid),
                 lambda: attach(host.run_dir, domid)):
        with pytest.raises(TypeError):
            call()
    with guest.evtchn() as ch, pytest.raises(PlatformError) as info:
        ch.bind_unbound_port(domid)
    assert info.value.errno == errno.EINVAL


class _Named(int):
    """An int subclass whose str() is not its number (a caller's own
    class may be one): a message must name the number."""

    def __str__(self) -> str:
        return "guest"


def test_no_domain_is_named_by_its_number(host: SimHost) -> None:
    """LookupError naming the number: an int subclass was named by its
    str()."""
    for call in (host.domain, host.destroy_domain):
        with pytest.raises(LookupError, match=r"^no domain 99$"):
            call(_Named(99))


@pytest.mark.parametrize("domid", [-1, 0x7FF0, 2**32 + 1, pytest.param(10**5000, id="1e5000")])
def test_a_number_that_is_no_domain_id_is_a_wrong_value_everywhere(
        host: SimHost, domid: int) -> None:
    """One answer for a domid out of 0..0x7FEF, as the toolstack's, the
    remote destroy_domain() and attach() give it: ValueError naming the
    argument, the number shown short.  SimHost.domain() and
    destroy_domain() said LookupError ("no domain -1"), as for a domain
    that might have been."""
    guest = host.create_domain("guest")
    said = f"must be a domain id (0 to 32751), not {shown(domid)}"
    for name, call in (("domid", host.domain), ("domain", host.destroy_domain),
                       ("domid", host.toolstack.devices),
                       ("domid", host.toolstack.destroy_devices)):
        with pytest.raises(ValueError, match=f"^{re.escape(name + ' ' + said)}$"):
            call(domid)
    assert host.domains() == [host.dom0, guest]


def test_a_domain_id_of_no_domain_is_a_lookup_error(host: SimHost) -> None:
    # Within 0..0x7FEF the number is right; the domain is not there.
    for call in (host.domain, host.destroy_domain):
        with pytest.raises(LookupError, match=r"^no domain 0x7FEF$|^no domain 32751$"):
            call(0x7FEF)
