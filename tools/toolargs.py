"""argparse types for the tools the README has developers run by hand (the
fuzzers, the workqueue campaigns): a wrong number is a usage error saying
which, not a traceback from int() or from hypothesis, nor a run of nothing
that reports success."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def whole(least: int) -> Callable[[str], int]:
    """The type of an option that takes a whole number of ``least`` or more."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1  # said below, as an out-of-range one is
            shown = repr(text)
        else:
            shown = text
        if value < least:
            raise argparse.ArgumentTypeError(f"{shown} is not a whole number of {least} or more")
        return value
    return parse


def seed_range(text: str) -> range:
    """The type of ``--seeds``: one seed ``N``, or ``N-M``, both included."""
    first, dash, last = text.partition("-")
    if not (first.isdecimal() and (last.isdecimal() if dash else True)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a seed or a range of seeds (N or N-M)")
    seeds = range(int(first), int(last or first) + 1)
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text} ends before it starts")
    return seeds
