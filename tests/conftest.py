"""Fixtures shared by the whole suite."""

from __future__ import annotations

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
