"""Fixtures shared by the whole suite."""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh directory with a short path, removed afterwards: for a
    TMPDIR in which a simulated host makes its sockets, whose paths have
    room for 107 bytes.  tmp_path is too deep for that under
    pytest-xdist, whose workers add a directory of their own."""
    path = Path(tempfile.mkdtemp(prefix="t-"))
    yield path
    shutil.rmtree(path)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Leave what collection made out of every later garbage collection.

    The suite's modules, pytest's items and the libraries they import are
    some 110,000 objects that live to the end of the run, and every
    gc.collect() walked them all: 30-60 ms each (fdcensus.descriptors()
    collects before each census, two or more per landing of a Ctrl-C
    sweep).  Frozen, a collection walks only what the tests made since.
    Collected first, so that no garbage is frozen with them: freezing can
    only keep an object alive, so a census can find a descriptor held that
    a collection would have released (a failure), never miss one."""
    gc.collect()
    gc.freeze()
