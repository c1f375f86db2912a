"""Race windows opened on purpose, for tests of the code that closes them.

A race between two threads usually needs one of them to stop at one
particular line while the other runs.  :class:`PauseAt` stops a thread there
(with a trace function, so the code under test is unchanged), and
:func:`stands_at` tells whether a thread has got to a line, as one that
waits there for a lock has.  Lines are found by their text, so that a test
still finds its line after unrelated edits.  :class:`Attempt` runs the
call that races on a thread of its own and hands back how it ended.
"""

from __future__ import annotations

import inspect
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

TIMEOUT = 10.0


def line_of(func: Callable[..., Any], text: str, after: str = "") -> int:
    """The number of the first line of ``func`` whose source contains
    ``text`` (with ``after``, the first such line past the first one that
    contains ``after``: for a line whose text recurs, as a ``with
    self._lock:``); ValueError if none does."""
    lines, first = inspect.getsourcelines(func)
    start = 0
    if after:
        start = next((i + 1 for i, line in enumerate(lines) if after in line), len(lines))
    for i, line in enumerate(lines[start:], start):
        if text in line:
            return first + i
    where = f" past {after!r}" if after else ""
    raise ValueError(f"no line of {func.__qualname__}{where} contains {text!r}")


class PauseAt:
    """Stops the thread that runs :meth:`run` just before the first line of
    ``func`` that contains ``text`` (past ``after``: see :func:`line_of`),
    until :meth:`resume` (or ``TIMEOUT``); with ``skip``, as it gets there
    for the ``skip + 1``-th time.

    A thread that went on at ``TIMEOUT`` fails the test in :meth:`resume`:
    the test itself waited for the paused thread (the pause is under a
    lock the test's next step takes, say), and what it checked meanwhile
    ran after the race, not in it."""

    def __init__(self, func: Callable[..., Any], text: str, skip: int = 0,
                 after: str = "") -> None:
        self._code = func.__code__
        self._lineno = line_of(func, text, after)
        self._skip = skip
        self.reached = threading.Event()
        self._go = threading.Event()
        self._timed_out = False

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, stopping once at the line."""

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno == self._lineno and not self.reached.is_set():
                if self._skip:
                    self._skip -= 1
                    return local
                self.reached.set()
                self._timed_out = not self._go.wait(TIMEOUT)
            return local

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            return local if frame.f_code is self._code else None

        sys.settrace(trace)
        try:
            return fn()
        finally:
            sys.settrace(None)

    def resume(self) -> None:
        self._go.set()
        assert not self._timed_out, (
            f"the thread paused before line {self._lineno} of {self._code.co_qualname} went on"
            f" at its {TIMEOUT} s timeout, before resume(): the test waited for it")

    @classmethod
    def in_method(cls, monkeypatch: Any, owner: type, name: str, text: str,
                  after: str = "") -> PauseAt:
        """A PauseAt at the line of method ``owner.name`` that contains
        ``text`` (past ``after``), with the method patched (by
        ``monkeypatch``) so that every call runs under it: the first to get
        there stops."""
        real = getattr(owner, name)
        pause = cls(real, text, after=after)

        def paused(*args: Any, **kwargs: Any) -> Any:
            return pause.run(lambda: real(*args, **kwargs))

        monkeypatch.setattr(owner, name, paused)
        return pause


class Attempt:
    """``fn()``, started at once on a daemon thread of its own (a call that
    hangs must not keep the test run from ending), for the test to race
    it meanwhile.  :meth:`result` says how it ended."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._outcome: list[Any] = []
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._outcome.append(fn())
        except BaseException as exc:
            self._outcome.append(exc)

    def result(self, timeout: float = TIMEOUT, msg: str = "the call has not ended") -> Any:
        """What ``fn()`` returned, or the exception it raised, once it has
        ended; AssertionError with ``msg`` if it is still running after
        ``timeout`` seconds."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), msg
        (outcome,) = self._outcome
        return outcome

    def waits_at(self, func: Callable[..., Any], text: str, timeout: float = TIMEOUT) -> bool:
        """Whether the call comes to stand at the first line of ``func``
        that contains ``text`` (see :func:`stands_at`) within ``timeout``
        seconds: False if it ends first, or is elsewhere at the timeout."""
        deadline = time.monotonic() + timeout
        while self.thread.is_alive():
            if stands_at(self.thread.ident or -1, func, text):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return False


def stands_at(thread_id: int, func: Callable[..., Any], text: str) -> bool:
    """Whether thread ``thread_id`` is at the first line of ``func`` that
    contains ``text``, or inside what that line calls (a thread waiting
    there for a ``threading.Condition`` is in its ``__enter__``).  False if
    ``func`` has no such line."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None and frame.f_code is not func.__code__:
        frame = frame.f_back
    if frame is None:
        return False
    try:
        return frame.f_lineno == line_of(func, text)
    except ValueError:
        return False
