"""Fixtures shared by the simulated-host tests.

``host`` and ``guest`` are a whole simulated host and one guest domain on it;
``xsd`` and ``dom0`` are a bare XenStore server and a privileged wire client
of it, for the tests of the store alone.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenback.sim import Domain, SimHost
from xenback.sim._xenstored import RawClient, XenStored


@pytest.fixture
def host() -> Iterator[SimHost]:
    with SimHost() as host:
        yield host


@pytest.fixture
def guest(host: SimHost) -> Domain:
    return host.create_domain("guest")


@pytest.fixture
def xsd() -> Iterator[XenStored]:
    # A short path: Unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="xs") as d, XenStored(Path(d)) as server:
        yield server


@pytest.fixture
def dom0(xsd: XenStored) -> Iterator[RawClient]:
    with RawClient(xsd.path) as c:
        yield c
