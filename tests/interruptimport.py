"""Test-only: a child process whose import of one module waits for a signal.

A child imports this first (``python -c "import interruptimport; ..."``).
With ``INTERRUPT_IMPORT=NAME`` and ``INTERRUPT_IMPORT_FD=FD`` in its
environment, the import of ``NAME`` writes ``NAME`` and a newline to the
descriptor ``FD``, closes it, and waits there for good: what the child's
signal handlers do then is what the test sees (Python's for SIGINT raises
KeyboardInterrupt out of the import).  Nothing of the project is imported
here.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class _Stop:
    """A finder that finds nothing, but stops the import of one module."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        os.write(self.fd, f"{name}\n".encode())
        os.close(self.fd)
        while True:
            # In slices: a signal that comes just before a sleep starts is
            # taken as it ends, where one long wait would miss it.
            time.sleep(0.05)


if "INTERRUPT_IMPORT" in os.environ:
    sys.meta_path.insert(0, _Stop(os.environ["INTERRUPT_IMPORT"],
                                  int(os.environ["INTERRUPT_IMPORT_FD"])))
