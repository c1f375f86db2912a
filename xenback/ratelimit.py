"""Rate-limited logging of what a guest can make a backend say.

A backend logs what a frontend did wrong or was refused: a malformed ring,
a policy refusal.  A hostile guest can do that thousands of times a second,
and every line would reach the host's log.  The kernel's answer is
``printk_ratelimited`` (``lib/ratelimit.c``): within each interval of
``interval`` seconds the first ``burst`` messages go out and the rest are
counted; the count is reported when the next interval begins, so nothing
goes unmentioned.  :class:`RateLimit` is that state, with the kernel's
defaults (10 messages per 5 s).

A backend keeps one per frontend device, so that one guest's flood does not
silence what another guest's requests cause, and one that outlives the
device's connections, so that a guest restarting its device does not get a
new budget each time.  :class:`xenback.BackendDevice` has it, logs its own
errors through it and, when the device goes, reports what it suppressed
(:meth:`RateLimit.close`); a driver logs through it too::

    dev.ratelimit.log(logger, logging.WARNING, "CONNECT to %s refused", addr)
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable

__all__ = ["RateLimit", "DEFAULT_RATELIMIT_INTERVAL", "DEFAULT_RATELIMIT_BURST"]

#: The kernel's ``DEFAULT_RATELIMIT_INTERVAL`` (5 * HZ), in seconds.
DEFAULT_RATELIMIT_INTERVAL = 5.0
#: The kernel's ``DEFAULT_RATELIMIT_BURST``.
DEFAULT_RATELIMIT_BURST = 10


class RateLimit:
    """At most ``burst`` messages per ``interval`` seconds, the rest counted.

    ``name`` starts the line that reports a count of suppressed messages
    (``"dom3: 42 messages suppressed"``); ``clock`` is for tests.
    """

    def __init__(
        self,
        name: str,
        interval: float = DEFAULT_RATELIMIT_INTERVAL,
        burst: int = DEFAULT_RATELIMIT_BURST,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int | float):
            raise TypeError(f"interval must be a number of seconds, not {type(interval).__name__}")
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval must be a finite number of seconds above 0, "
                             f"got {interval}")
        if isinstance(burst, bool) or not isinstance(burst, int):
            raise TypeError(f"burst must be an int, not {type(burst).__name__}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.name = name
        self.interval = float(interval)
        self.burst = burst
        self._clock = clock
        # _lock guards the window below: messages come from whichever
        # thread serves the guest (a frontend's command Work, its sockets'
        # Work on every CPU).
        self._lock = threading.Lock()
        self._begin: float | None = None  # start of the current interval
        self._printed = 0  # messages let through in it
        self._missed = 0  # messages suppressed and not yet reported

    def __repr__(self) -> str:
        # A snapshot, without _lock: a debugger stopped where it is held
        # would hang showing us.
        return (f"<RateLimit {self.name} {self.burst} per {self.interval:g} s "
                f"missed={self._missed}>")

    def __call__(self) -> tuple[bool, int]:
        """Take one message: (whether it may go out, how many were
        suppressed before it and are reported now).  The kernel's
        ``__ratelimit()``, which also reports the count as a new interval
        begins.  Cut short by a Ctrl-C, it keeps the count for the next."""
        reported = 0
        try:
            with self._lock:
                now = self._clock()
                if self._begin is None or now - self._begin >= self.interval:
                    reported, self._missed = self._missed, 0
                    self._begin = now
                    self._printed = 0
                if self._printed < self.burst:
                    self._printed += 1
                    return True, reported
                self._missed += 1
                return False, reported
        except BaseException:
            # Cut short once the count was taken (a Ctrl-C as the lock is
            # let go of): nobody has it to report, so it goes back.
            self._put_back(reported)
            raise

    def log(self, logger: logging.Logger, level: int, msg: str, *args: object,
            exc_info: BaseException | None = None) -> bool:
        """``logger.log(level, msg, *args)`` if the limit lets it through,
        preceded by the count of messages suppressed since the last report.
        Whether it went out.  With ``exc_info``, an exception, its
        traceback goes with the line (and not without it)."""
        # Each stored by the call that makes it (list.extend() stores what
        # starmap() got before control is back in Python code): a Ctrl-C as
        # the call returned finds it there, and a count taken and not said
        # goes back, for the next report; one said is not said again.
        taken: list[tuple[bool, int]] = []
        said: list[object] = []
        try:
            taken.extend(itertools.starmap(self, ((),)))
            allowed, reported = taken[0]
            if reported:
                self._report(logger, level, reported, said)
        except BaseException:
            if taken and not said:
                self._put_back(taken[0][1])
            raise
        if allowed:
            # stacklevel: the line is the caller's, not ours.
            logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)
        return allowed

    def close(self, logger: logging.Logger, level: int = logging.WARNING) -> None:
        """Report messages suppressed since the last report, if any: the
        last word of a guest that is going away.  The limit stays usable.
        Cut short by a Ctrl-C before the count is said, it leaves it to
        the next report."""
        reported = 0
        said: list[object] = []  # see log()
        try:
            with self._lock:
                reported, self._missed = self._missed, 0
            if reported:
                self._report(logger, level, reported, said)
        except BaseException:
            if not said:
                self._put_back(reported)
            raise

    def _put_back(self, count: int) -> None:
        """Count again ``count`` suppressed messages that a report cut
        short took and did not say."""
        if count:
            with self._lock:
                self._missed += count

    def _report(self, logger: logging.Logger, level: int, count: int,
                said: list[object]) -> None:
        """Say ``count``; ``said`` gets an item by the call that says it."""
        # Reached from log() or close(): the line is their caller's.
        say = functools.partial(logger.log, stacklevel=3)
        said.extend(itertools.starmap(say, ((level, "%s: %d message%s suppressed", self.name,
                                             count, "" if count == 1 else "s"),)))
