"""Refusals by the backend's policy reach the guest as the right OSError."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

import pvcalls
from pvcalls._policy import Policy
from xenback.sim import SimHost

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
