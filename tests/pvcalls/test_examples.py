"""examples/pvcalls_*.py: each runs to the end and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIMEOUT = 60


@pytest.mark.parametrize(("name", "expected"), [
    ("pvcalls_hello.py", r"^Hello, guest1! Greetings from the host\.$"),
    ("pvcalls_guest_server.py",
     r"^guest \d+ listens; host clients connect to 127\.0\.0\.1:\d+\n"
     r"sent 'hello', guest answered 'HELLO'\n"
     r"sent 'from', guest answered 'FROM'\n"
     r"sent 'the host', guest answered 'THE HOST'$"),
    ("pvcalls_asyncio.py",
     r"^asked 'hello', host answered 'HELLO'\n"
     r"asked 'from the guest', host answered 'FROM THE GUEST'\n"
     r"asked 'anyone there\?': ConnectionRefusedError$"),
])
def test_example_runs(name: str, expected: str) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / name)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(expected, result.stdout.strip()), result.stdout
    assert "Traceback" not in result.stderr
