"""Fixtures for the pvcalls backend tests: a simulated host, a backend on a
4-CPU topology, raw frontends, and host-side TCP servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from echoserver import EchoServer
from pvcalls_rawfront import RawFrontend, dispose_all

import pvcalls
from workqueue import Topology
from xenback.sim import SimHost
from xenback.xenstore import XenStore


@pytest.fixture(autouse=True)
def _dispose_raw_frontends() -> Iterator[None]:
    # Set up first, so torn down last: after the host and backend.
    yield
    dispose_all()


@pytest.fixture
def host() -> Iterator[Any]:
    with SimHost() as h:
        yield h


@pytest.fixture
def topology() -> Topology:
    return Topology(4)


@pytest.fixture
def backend(host: Any, topology: Topology) -> Iterator[pvcalls.Backend]:
    with pvcalls.Backend(host.dom0, topology=topology) as b:
        yield b


@pytest.fixture
def make_frontend(host: Any) -> Iterator[Callable[..., RawFrontend]]:
    """make_frontend(name, **kwargs): a new guest domain with a RawFrontend."""
    made: list[RawFrontend] = []

    def make(name: str = "guest", **kwargs: Any) -> RawFrontend:
        fe = RawFrontend(host, host.create_domain(name), **kwargs)
        made.append(fe)
        return fe

    yield make
    for fe in made:
        try:
            fe.xs.close()
        except OSError:
            pass


@pytest.fixture
def raw(make_frontend: Callable[..., RawFrontend], backend: pvcalls.Backend) -> RawFrontend:
    return make_frontend("raw-guest")


@pytest.fixture
def dom0_xs(host: Any) -> Iterator[XenStore]:
    xs = XenStore.connect_to(host.dom0)
    yield xs
    xs.close()


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()
