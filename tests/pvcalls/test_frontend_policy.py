"""Refusals by the backend's policy reach the guest as the right OSError."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest

import pvcalls
from pvcalls._policy import Policy
from xenback.sim import SimHost

TIMEOUT = 10.0

POLICY = """
[default]
max_sockets = 2
connect.deny = ["127.0.0.1:1-1023"]
bind.allow = ["127.0.0.1:20000-65535"]
"""


@pytest.fixture(scope="module")
def fe() -> Iterator[pvcalls.Frontend]:
    with SimHost() as host, pvcalls.Backend(host.dom0, max_ioworkers=1,
                                            policy=Policy.from_toml(POLICY)):
        with pvcalls.Frontend(host.create_domain("restricted")) as f:
            yield f


def test_denied_connect_is_permission_error(fe: pvcalls.Frontend) -> None:
    with fe.socket() as s, pytest.raises(PermissionError) as info:
        s.connect(("127.0.0.1", 22))
    assert info.value.errno == errno.EACCES


def test_a_denied_connect_with_a_timeout_leaves_the_socket_unconnected(
        fe: pvcalls.Frontend) -> None:
    """A refusal that is no handshake's (as a firewall's EPERM, which
    Linux's connect() raises before it starts one): the next connect()
    is tried anew, not failed with ECONNABORTED as after a refused
    handshake (test_frontend_socket_parity.py)."""
    with fe.socket() as s:
        s.settimeout(TIMEOUT)
        for _ in range(2):
            assert s.connect_ex(("127.0.0.1", 22)) == errno.EACCES


def test_denied_bind_is_permission_error(fe: pvcalls.Frontend) -> None:
    with fe.socket() as s, pytest.raises(PermissionError) as info:
        s.bind(("127.0.0.1", 80))
    assert info.value.errno == errno.EACCES


def test_socket_limit_is_emfile(fe: pvcalls.Frontend) -> None:
    socks: list[Any] = [fe.socket(), fe.socket()]
    try:
        with pytest.raises(OSError) as info:
            fe.socket()
        assert info.value.errno == errno.EMFILE
    finally:
        for s in socks:
            s.close()
    with fe.socket():  # room again once released
        pass


def test_accept_beyond_the_socket_limit_is_emfile(fe: pvcalls.Frontend) -> None:
    """The ACCEPT's new socket would be one too many: accept() fails with
    EMFILE, the socket it offered is gone, the connection stays queued."""
    free = socket.create_server(("127.0.0.1", 0))
    address = free.getsockname()
    free.close()
    assert address[1] >= 20000  # an ephemeral port: one the policy lets us bind
    with fe.socket() as ls, fe.socket() as other:  # the limit, 2
        ls.bind(address)
        ls.listen()
        ls.settimeout(TIMEOUT)
        with socket.create_connection(address, timeout=TIMEOUT) as client:
            known = fe.sockets()
            with pytest.raises(OSError) as info:
                ls.accept()
            assert info.value.errno == errno.EMFILE
            assert fe.sockets() == known
            other.close()
            conn, _ = ls.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                client.sendall(b"x")
                assert conn.recv(1) == b"x"
