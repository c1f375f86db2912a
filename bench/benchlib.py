"""What the benchmarks do alike: check their options, and stop cleanly on
Ctrl-C or SIGTERM.

Imported by the scripts next to it (``python bench/<name>_bench.py`` puts
this directory first on ``sys.path``; the tests add it too).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import multiprocessing.resource_tracker
import multiprocessing.util
import os
import signal
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from multiprocessing.process import BaseProcess
from types import FrameType, TracebackType

EPILOG = ("Exit status: 0 when done, 1 when a measurement failed (with why, and no results), "
          "2 for a usage error, 130 (143) when interrupted by Ctrl-C (SIGTERM), with no "
          "results.")


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


def cpus_text(cpus: Iterable[int]) -> str:
    """``CPU 0``, ``CPUs 0-3`` or ``CPUs 0,2,5``."""
    ordered = sorted(cpus)
    if len(ordered) == 1:
        return f"CPU {ordered[0]}"
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"CPUs {ordered[0]}-{ordered[-1]}"
    return "CPUs " + ",".join(map(str, ordered))


def cpu_list(text: str) -> frozenset[int]:
    """A set of CPUs for argparse, as taskset's ``-c`` takes it (``0``,
    ``0,2``, ``0-3``), each one this process may run on."""
    if not text:
        raise argparse.ArgumentTypeError("no CPU given")
    allowed = os.sched_getaffinity(0)
    cpus: set[int] = set()
    for item in text.split(","):
        ends = item.split("-")
        if not (len(ends) <= 2 and all(end.isascii() and end.isdigit() for end in ends)
                and int(ends[0]) <= int(ends[-1])):
            raise argparse.ArgumentTypeError(f"{text!r} is not a CPU list (e.g. 0 or 0,2 or 0-3)")
        first, last = int(ends[0]), int(ends[-1])
        # Cut at the first CPU past the allowed ones, which is enough to
        # refuse: "0-999999999" is not built.
        cpus.update(range(first, min(last, max(allowed) + 1) + 1) or (first,))
    refused = sorted(cpus - allowed)
    if refused:
        raise argparse.ArgumentTypeError(
            f"CPU {refused[0]} is not one this process may run on ({cpus_text(allowed)})")
    return frozenset(cpus)


# -- signals -------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """How a benchmark takes SIGINT (Ctrl-C) and SIGTERM while it runs.

    The first raises :class:`KeyboardInterrupt` in the main thread; later
    ones are ignored, so that a second Ctrl-C does not cut short the
    cleanup the first started (stopping child processes, removing
    directories).  With ``grace``, the first SIGINT only asks the run to
    stop at its next :meth:`checkpoint`, so that the measurement under way
    ends as it would have, and ``grace`` is printed to say so; a second
    SIGINT, or a SIGTERM, raises at once.

    The handlers are the previous ones again on exit (unless
    :func:`stay_stopped` says a stop ends the process), and in a child
    forked meanwhile (multiprocessing's "fork"): a child's SIGTERM ends it,
    as :meth:`Process.terminate` expects, and its SIGINT is blocked (see
    :func:`start`).
    """

    def __init__(self, *, grace: str | None = None) -> None:
        self.grace = grace
        self.signum: int | None = None  # the first signal taken
        self._deferred = 0
        self._held = False
        self._previous: dict[int, object] = {}
        # While call() runs a child, a stop is passed on to it (through
        # _relay_to, a pidfd: never another process that got its pid once
        # it is reaped), or kept in _unsent until it is started.
        self._relaying = False
        self._relay_to: int | None = None
        self._unsent: list[int] = []

    def __enter__(self) -> Interrupts:
        global _running
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handler)
        _running = self
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _running
        _running = None
        if self.stopping and _stay_stopped:
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
        else:
            self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._relaying:
            # Not raised: see call().  What a stop means is the child's
            # to say, a second one too.
            if self.signum is None:
                self.signum = signum
            self._pass_on(signum)
            return
        if self.signum is None:
            self.signum = signum
            if self.grace is not None and signum == signal.SIGINT:
                # Not print(): the main thread may be inside a write to
                # sys.stderr, which is not reentrant.
                os.write(2, f"{self.grace}\n".encode())
                return  # taken at the next checkpoint()
        if self._deferred or _in_finalizer(frame):
            self._held = True  # raised once the deferral ends, or at checkpoint()
            return
        self._stop()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a stop back until the body is done (when a signal comes
        in the middle of starting a child process, say: it must not leave
        the child started but unknown)."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
        if not self._deferred and self._held:
            self._held = False
            self._stop()

    def _stop(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        raise KeyboardInterrupt

    @property
    def stopping(self) -> bool:
        return self.signum is not None

    def checkpoint(self) -> None:
        """Raise :class:`KeyboardInterrupt` if a signal asked to stop (one
        held back, or one taken with ``grace``)."""
        if self.stopping:
            self._stop()

    def status(self) -> int:
        """The exit status for a run ended by a signal: 128 + its number."""
        return 128 + (self.signum or signal.SIGINT)

    def call(self, cmd: list[str]) -> int:
        """Run ``cmd``, a benchmark of its own, to its end and return its
        exit status (128 + N if signal N ended it, as a shell says it).

        A stop signal that comes meanwhile is passed on to it instead of raised
        here: it stops as it does when run alone, saying so, and its status is
        the run's.  (If it cannot be started, or watched once started, the stop
        is raised here after all, rather than the error; a child started is
        stopped and reaped first.)  A Ctrl-C reaches it anyway (the terminal
        signals the whole process group), one sent to this process alone would
        not.  Raised here, it could also lose the child's status: a
        KeyboardInterrupt raised after ``waitpid()`` reaped the child but
        before :mod:`subprocess` noted its status leaves subprocess to wait
        again, get ECHILD, and take the child for one that exited 0 -- which it
        does when the child stops and exits before this process gets the CPU
        back, as under load.

        So the child gets a Ctrl-C twice, the terminal's and this one: it
        must take a repeat quietly, up to its exit (:func:`stay_stopped`).
        """
        self.checkpoint()  # a stopping run starts nothing
        self._relaying = True
        pidfd = None
        try:
            try:
                proc = subprocess.Popen(cmd)
            except Exception:
                # A stop taken meanwhile was kept for a child that never
                # came: it is this run's to take again, and a stop wins
                # over a failure, as in run().
                self.checkpoint()
                raise
            try:
                # Opened before the wait that reaps it, so that it is the
                # child's for sure.
                pidfd = os.pidfd_open(proc.pid)
                self._relay_to = pidfd
                while self._unsent:  # taken while the child was being started
                    self._pass_on(self._unsent.pop(0))
                status = proc.wait()
            except BaseException:
                # Out of descriptors, say: the child must not run on, unknown
                # and unreaped.  SIGTERM, which a benchmark takes as a stop
                # and cleans up after; waited for as the run would have.
                # Still relaying meanwhile, so that a stop that comes is kept
                # and then wins over the failure.
                if proc.returncode is None:
                    proc.terminate()
                    proc.wait()
                self.checkpoint()
                raise
        finally:
            self._relaying = False
            self._relay_to = None
            self._unsent.clear()
            if pidfd is not None:
                os.close(pidfd)
        return status if status >= 0 else 128 - status

    def _pass_on(self, signum: int) -> None:
        if self._relay_to is None:
            self._unsent.append(signum)
            return
        try:
            signal.pidfd_send_signal(self._relay_to, signum)
        except ProcessLookupError:
            pass  # it has exited, and been reaped


def _in_finalizer(frame: FrameType | None) -> bool:
    # An exception raised in a finalizer (a weakref callback, as
    # multiprocessing's Finalize is, or a __del__) is printed and then
    # ignored: the stop would be lost.
    while frame is not None:
        if frame.f_code in _FINALIZERS or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


_FINALIZERS = {mp.util.Finalize.__call__.__code__, weakref.finalize.__call__.__code__}

_running: Interrupts | None = None
_stay_stopped = False


def stay_stopped() -> None:
    """Once a run of this process has taken a stop signal, ignore stop
    signals until the process exits, instead of putting back the handlers
    there were before the run.

    For a benchmark's ``__main__``, whose process exits when its run ends.
    A repeat of the stop there, after "interrupted, no results", would
    otherwise land in the interpreter's exit: a KeyboardInterrupt traceback,
    or (once the interpreter has put SIG_DFL back) a death by the signal.
    A benchmark that :meth:`Interrupts.call` runs gets such a repeat
    whenever the terminal's Ctrl-C reached both processes; so does one
    whose user presses Ctrl-C twice.  A caller that goes on after the run
    (a test calling ``main()``) leaves this off and gets its handlers back.
    """
    global _stay_stopped
    _stay_stopped = True


def _after_fork_in_child() -> None:
    if _running is not None:
        _running._restore()


os.register_at_fork(after_in_child=_after_fork_in_child)


def run(name: str, body: Callable[[Interrupts], int], *,
        failure: type[Exception] | tuple[type[Exception], ...] = (),
        grace: str | None = None) -> int:
    """``body(interrupts)``'s exit status; or, when it raised ``failure``,
    "NAME: FAILED, no results: <why>" on stderr and 1; or, when a signal
    stopped it, "NAME: interrupted, no results" and 128 + the signal's
    number (130 for Ctrl-C).  No traceback either way."""
    with Interrupts(grace=grace) as interrupts:
        try:
            # A signal held back and not raised by a checkpoint since came
            # too late to matter: the results are out.
            return body(interrupts)
        except KeyboardInterrupt:
            pass
        except failure as exc:
            if not interrupts.stopping:
                print(f"{name}: FAILED, no results: {exc}", file=sys.stderr, flush=True)
                return 1
            # Failed on its way out of an interrupted run (SIGTERM to the
            # process group ends a child first, say): the signal's doing.
        print(f"{name}: interrupted, no results", file=sys.stderr, flush=True)
        return interrupts.status()


def held_back() -> AbstractContextManager[None]:
    """:meth:`Interrupts.deferred` of the run under way, if any: around
    what must be done whole or not at all, such as making a temporary
    directory and noting it for the cleanup (``tempfile`` itself leaves a
    file behind when stopped as it first looks for a directory)."""
    return _running.deferred() if _running is not None else nullcontext()


def start(proc: BaseProcess) -> None:
    """Start a child process that leaves SIGINT to this one.

    Ctrl-C reaches every process of the terminal's foreground group, the
    children too; this process stops them in order (as it does when a run
    fails), so they keep SIGINT blocked from birth, where no handler of
    theirs can print a traceback nor exit before being told.  SIGTERM
    still ends them (``Process.terminate()``).  A stop that comes while
    the child starts is held back until it is started and known to
    ``proc`` and to :func:`reap_children`.
    """
    with held_back():
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            if _start_method(proc) != "fork":
                # The first child of a spawn or forkserver context starts
                # multiprocessing's resource tracker, which blocks SIGINT
                # and SIGTERM around its own start and then unblocks them
                # instead of putting the mask back: the child started next
                # would have SIGINT open.  So it is started first, and our
                # mask put back after it.
                mp.resource_tracker.ensure_running()
                signal.pthread_sigmask(signal.SIG_SETMASK, old | {signal.SIGINT})
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _start_method(proc: BaseProcess) -> str:
    """How ``proc`` will be started: its context's method, or (made by
    ``multiprocessing.Process``) the default context's, which its start()
    would fix as this does."""
    method: str | None = getattr(proc, "_start_method", None)
    return method or mp.get_context().get_start_method()


def reap_children() -> None:
    """Kill and reap every child process still running: the last resort
    of a run's cleanup, for those a stop left between their start and the
    code that would have stopped them (blocking SIGINT, they wait for
    nobody)."""
    for child in mp.active_children():
        child.kill()
        child.join()
