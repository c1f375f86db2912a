"""What the benchmarks do alike: check their options.

Imported by the scripts next to it (``python bench/<name>_bench.py`` puts
this directory first on ``sys.path``; the tests add it too).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# -- option types: argparse says "argument --NAME: <message>", exit status 2 --


def whole_number(text: str) -> int:
    # Decimal ASCII digits only: int() would also take " 5", "1_0" and "５".
    # A minus sign is let through, so that "-1" is told it is too small
    # rather than that it is not a whole number.
    digits = text.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    try:
        return int(text)
    except ValueError:  # more digits than int() converts
        raise argparse.ArgumentTypeError(f"{text[:20]}... is too large") from None


def at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number type for argparse, ``low`` or more (and at most
    ``high``)."""

    def check(text: str) -> int:
        value = whole_number(text)
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    return check


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isinf(value):
        # Every duration here ends a measurement: an infinite one never
        # gives a result.
        raise argparse.ArgumentTypeError(f"{text} is not finite")
    return value


def seconds(text: str) -> float:
    """A duration for argparse: a finite number of seconds, more than 0."""
    value = _number(text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


def seconds_or_none(text: str) -> float:
    """A duration for argparse that may be 0 (for none)."""
    value = _number(text)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value
