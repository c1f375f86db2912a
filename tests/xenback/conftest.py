"""Shared fixtures of the xenback tests."""

from __future__ import annotations

import sys
from pathlib import Path

# tests/ccheck.py is imported as ``tests.ccheck``: make the repository root
# importable also when pytest is started as a script rather than ``python -m``.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
