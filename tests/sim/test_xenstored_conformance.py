"""Unmodified third-party clients against the XenStore server.

* pyxs, the project's XenStore client, including watches and transactions;
* Debian's xenstore-utils (libxenstore) through XENSTORED_PATH;
* Xen's own test program, /usr/lib/xen-4.17/bin/test-xenstore.

The Debian-package tests skip, naming the missing binary, only where the
package is not installed (tools/test.sh installs xenstore-utils and
xen-utils-4.17).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pyxs
from pyxs.exceptions import PyXSError

from xenback.sim._xenstored import RawClient, XenStored

TEST_XENSTORE = Path("/usr/lib/xen-4.17/bin/test-xenstore")


@pytest.fixture
def client(xsd: XenStored) -> Iterator[pyxs.Client]:
    with pyxs.Client(unix_socket_path=os.fspath(xsd.path)) as c:
        yield c


# --- pyxs -----------------------------------------------------------------------


def test_pyxs_basic_operations(xsd: XenStored, client: pyxs.Client) -> None:
    client.write(b"/vm/1/name", b"guest")
    assert client.read(b"/vm/1/name") == b"guest"
    assert client.read(b"/vm/1/none", b"dflt") == b"dflt"
    assert client.exists(b"/vm/1")
    assert not client.exists(b"/vm/2")
    client.mkdir(b"/vm/1/dir")
    assert sorted(client.list(b"/vm/1")) == [b"dir", b"name"]
    client.set_perms(b"/vm/1", [b"b0", b"r1"])
    assert client.get_perms(b"/vm/1") == [b"b0", b"r1"]
    assert [top for top, _value, _children in client.walk(b"/vm")] == [
        b"/vm", b"/vm/1", b"/vm/1/name", b"/vm/1/dir"
    ]
    client.delete(b"/vm")
    assert not client.exists(b"/vm")
    assert client.get_domain_path(3) == b"/local/domain/3"
    with pytest.raises(PyXSError):
        client.read(b"/missing")


def test_pyxs_domain_operations(xsd: XenStored, client: pyxs.Client) -> None:
    # pyxs refuses RELEASE, RESUME and SET_TARGET itself unless
    # /proc/xen/capabilities says it runs in the control domain; the socket
    # is dom0's, so say so.
    client.SU = True
    assert client.is_domain_introduced(0)
    assert not client.is_domain_introduced(8)
    client.introduce_domain(8, 1234, 5)
    assert client.is_domain_introduced(8)
    client.resume_domain(8)
    client.introduce_domain(9, 1234, 6)
    client.set_target(9, 8)
    client.release_domain(8)
    client.release_domain(9)
    assert not client.is_domain_introduced(8)


def test_pyxs_watches(xsd: XenStored, client: pyxs.Client) -> None:
    with pyxs.Client(unix_socket_path=os.fspath(xsd.path)) as writer:
        monitor = client.monitor()
        monitor.watch(b"/w", b"token")
        assert monitor.events.get(timeout=10) == (b"/w", b"token")
        writer.write(b"/w/x", b"1")
        assert monitor.events.get(timeout=10) == (b"/w/x", b"token")
        writer.delete(b"/w")
        assert monitor.events.get(timeout=10) == (b"/w", b"token")
        monitor.unwatch(b"/w", b"token")
        writer.write(b"/w", b"again")
        writer.write(b"/sync", b"s")
        client.read(b"/sync")  # the reply comes after any event would have
        assert monitor.events.empty()


def test_pyxs_survives_an_event_too_long_to_send(xsd: XenStored, client: pyxs.Client) -> None:
    # An over-long WATCH_EVENT would kill pyxs's reader thread and so the
    # whole connection; the server must drop the event instead.
    token = b"t" * 4000  # legal: the WATCH request is 4005 bytes
    with pyxs.Client(unix_socket_path=os.fspath(xsd.path)) as writer:
        writer.write(b"/a", b"x")
        monitor = client.monitor()
        monitor.watch(b"/a", token)
        assert monitor.events.get(timeout=10) == (b"/a", token)
        writer.write(b"/a/" + b"b" * 100, b"y")  # its event: 4105 bytes
        writer.write(b"/a", b"z")
        assert monitor.events.get(timeout=10) == (b"/a", token)
        assert client.read(b"/a") == b"z"


def test_pyxs_transactions(xsd: XenStored, client: pyxs.Client) -> None:
    with pyxs.Client(unix_socket_path=os.fspath(xsd.path)) as other:
        client.write(b"/t/counter", b"0")
        client.transaction()
        value = int(client.read(b"/t/counter"))
        client.write(b"/t/counter", str(value + 1).encode())
        assert other.read(b"/t/counter") == b"0"
        assert client.commit()
        assert other.read(b"/t/counter") == b"1"

        client.transaction()
        client.read(b"/t/counter")
        other.write(b"/t/counter", b"5")
        client.write(b"/t/counter", b"99")
        assert client.commit() is False  # EAGAIN: start over
        assert other.read(b"/t/counter") == b"5"

        client.transaction()
        client.write(b"/t/counter", b"7")
        client.rollback()
        assert other.read(b"/t/counter") == b"5"


def test_pyxs_as_an_unprivileged_guest(xsd: XenStored, client: pyxs.Client) -> None:
    client.mkdir(b"/local/domain/5")
    client.set_perms(b"/local/domain/5", [b"n5", b"r0"])
    with pyxs.Client(unix_socket_path=os.fspath(xsd.introduce_domain(5))) as guest:
        guest.write(b"device/vif/0/state", b"1")
        assert client.read(b"/local/domain/5/device/vif/0/state") == b"1"
        with pytest.raises(PyXSError) as info:
            guest.read(b"/tool/xenstored")
        assert info.value.args[0] == 13  # EACCES


# --- Debian's xenstore-utils -----------------------------------------------------------


def xenstore_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package xenstore-utils)")
    return path


def run_tool(xsd: XenStored, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XENSTORED_PATH=os.fspath(xsd.path))
    return subprocess.run(
        [xenstore_tool(argv[0]), *argv[1:]], env=env, capture_output=True, text=True,
        timeout=30, check=check,
    )


def test_xenstore_utils(xsd: XenStored) -> None:
    run_tool(xsd, "xenstore-write", "/u/a", "1", "/u/b", "two words")
    assert run_tool(xsd, "xenstore-read", "/u/a", "/u/b").stdout == "1\ntwo words\n"
    assert run_tool(xsd, "xenstore-list", "/u").stdout.split() == ["a", "b"]
    assert run_tool(xsd, "xenstore-ls", "/u").stdout == 'a = "1"\nb = "two words"\n'
    assert run_tool(xsd, "xenstore-exists", "/u/a").returncode == 0
    assert run_tool(xsd, "xenstore-exists", "/u/zz", check=False).returncode != 0
    assert run_tool(xsd, "xenstore-read", "/u/zz", check=False).returncode != 0
    run_tool(xsd, "xenstore-chmod", "/u/a", "r0", "w3")
    assert "(r0,w3)" in run_tool(xsd, "xenstore-ls", "-p", "/u").stdout
    run_tool(xsd, "xenstore-rm", "/u/a")
    assert run_tool(xsd, "xenstore-list", "/u").stdout.split() == ["b"]
    # relative paths resolve below dom0's home, as for any client
    run_tool(xsd, "xenstore-write", "rel", "r")
    with RawClient(xsd.path) as c:
        assert c.read("/local/domain/0/rel") == b"r"


def test_xenstore_list_of_a_directory_too_big_for_one_reply(xsd: XenStored) -> None:
    # libxenstore asks DIRECTORY, gets E2BIG and pages with DIRECTORY_PART.
    names = [f"child-with-a-long-name-{i:04d}" for i in range(300)]
    with RawClient(xsd.path) as c:
        for name in names:
            c.write(f"/huge/{name}", "")
    assert run_tool(xsd, "xenstore-list", "/huge").stdout.split() == names


def test_xenstore_utils_find_the_socket_through_xenstored_rundir(xsd: XenStored) -> None:
    env = dict(os.environ, XENSTORED_RUNDIR=os.fspath(xsd.path.parent))
    env.pop("XENSTORED_PATH", None)
    run = subprocess.run(
        [xenstore_tool("xenstore-write"), "/via-rundir", "yes"], env=env, timeout=30, check=True
    )
    assert run.returncode == 0
    with RawClient(xsd.path) as c:
        assert c.read("/via-rundir") == b"yes"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XENSTORED_RUNDIR", os.fspath(xsd.path.parent))
        mp.delenv("XENSTORED_PATH", raising=False)
        with pyxs.Client() as c:
            assert c.read(b"/via-rundir") == b"yes"


def test_xenstore_watch(xsd: XenStored) -> None:
    env = dict(os.environ, XENSTORED_PATH=os.fspath(xsd.path))
    with subprocess.Popen(
        [xenstore_tool("xenstore-watch"), "-n", "2", "/wt"],
        env=env, stdout=subprocess.PIPE, text=True,
    ) as watch:
        try:
            assert watch.stdout is not None
            assert watch.stdout.readline() == "/wt\n"  # the initial event
            run_tool(xsd, "xenstore-write", "/wt/x", "1")
            assert watch.stdout.readline() == "/wt/x\n"
            assert watch.wait(timeout=30) == 0
        finally:
            watch.kill()


def test_xenstore_watch_survives_an_event_too_long_to_send(xsd: XenStored) -> None:
    # xenstore-watch's token is the watched path; one over-long event would
    # make libxenstore drop the connection and every later event with it.
    base = "/local/domain/0/" + "a" * 2030
    env = dict(os.environ, XENSTORED_PATH=os.fspath(xsd.path))
    with RawClient(xsd.path) as c:
        c.write(base, "x")
        with subprocess.Popen(
            [xenstore_tool("xenstore-watch"), "-n", "2", base],
            env=env, stdout=subprocess.PIPE, text=True,
        ) as watch:
            try:
                assert watch.stdout is not None
                assert watch.stdout.readline() == base + "\n"  # the initial event
                c.write(base + "/" + "b" * 17, "y")  # its event: 4112 bytes
                c.write(base, "z")
                assert watch.stdout.readline() == base + "\n"
                assert watch.wait(timeout=30) == 0
            finally:
                watch.kill()


# --- Xen's test-xenstore ------------------------------------------------------------------


def run_test_xenstore(socket_path: Path, *args: str, timeout: float) -> str:
    if not os.access(TEST_XENSTORE, os.X_OK):
        pytest.skip(f"{TEST_XENSTORE} not installed (Debian package xen-utils-4.17)")
    env = dict(os.environ, XENSTORED_PATH=os.fspath(socket_path))
    proc = subprocess.run(
        [os.fspath(TEST_XENSTORE), *args], env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "failed" not in proc.stdout
    return proc.stdout


def test_xen_test_xenstore_all_tests_10_iterations(xsd: XenStored) -> None:
    out = run_test_xenstore(xsd.path, "-i", "10", timeout=60)
    names = [line.split(":")[0].strip() for line in out.splitlines() if ":" in line]
    listed = subprocess.run(
        [os.fspath(TEST_XENSTORE), "-l"], capture_output=True, text=True, check=True
    ).stdout
    assert names == [line.split(":")[0].strip() for line in listed.splitlines()]
    # it cleans up after itself
    with RawClient(xsd.path) as c:
        assert "xenstore-test" not in c.directory("/local/domain/0")


def test_xen_test_xenstore_random_30_seconds(xsd: XenStored) -> None:
    # -r SECS: random tests for that many seconds (one iteration each).
    run_test_xenstore(xsd.path, "-r", "30", timeout=90)


def test_xen_test_xenstore_as_an_unprivileged_guest(xsd: XenStored) -> None:
    # Its relative paths land in the guest's home, where quotas and
    # permissions apply (2000-byte values still fit the node-size quota).
    with RawClient(xsd.path) as c:
        c.mkdir("/local/domain/3")
        c.set_perms("/local/domain/3", ["n3", "r0"])
        run_test_xenstore(xsd.introduce_domain(3), "-i", "3", timeout=60)
        assert c.directory("/local/domain/3") == []  # it cleaned up
