"""A signal that the kernel can give only to another thread than the main
one: the case in which a main thread asleep in the kernel does not wake,
although CPython runs the handler there."""

from __future__ import annotations

import contextlib
import dis
import inspect
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any, NamedTuple

import pytest

TIMEOUT = 10.0
#: The timeout of a wait that something else must end (a signal, here), in
#: the tests that say so: longer than pytest-timeout lets a test run (120
#: s, pyproject.toml).  A wait that nothing ended then fails the test as a
#: test timeout, instead of ending at its own timeout (where a signal's
#: handler runs too, late) -- and no machine is too slow for it, as for a
#: bound on the time taken.
OUTLASTS_THE_TEST = 3600.0


def main_thread_in(*names: str, path: str = "") -> bool:
    """Whether the main thread's innermost Python frame is a function named
    one of ``names``, in a file whose path contains ``path``: where it
    sleeps in the lock or poll that function calls (or is about to)."""
    frame = sys._current_frames()[threading.main_thread().ident]  # type: ignore[index]
    return frame.f_code.co_name in names and path in frame.f_code.co_filename


def main_thread_within(name: str, depth: int) -> bool:
    """Whether a call of a function named ``name`` is among the ``depth``
    innermost frames of the main thread: to tell the wait it makes itself
    from the waits of the calls it makes (a XenStore request's, say)."""
    frame = sys._current_frames()[threading.main_thread().ident]  # type: ignore[index]
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


class Interrupted(BaseException):
    """What the handler raises in the main thread: as KeyboardInterrupt, no
    :class:`Exception`, which library code may catch and log."""


def _describe(when: Callable[[], object]) -> str:
    """``when`` as a failure names it: its name, where it is defined, and,
    for a lambda, its source line (its name alone says nothing)."""
    code = getattr(when, "__code__", None)
    if code is None:
        return repr(when)
    place = f"{when.__qualname__} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"
    if code.co_name == "<lambda>":
        with contextlib.suppress(OSError, TypeError):
            place += f": {inspect.getsource(when).strip()}"
    return place


def _main_thread_stack() -> str:
    """Where the main thread is: the innermost frames of its Python stack
    (innermost last), not pytest's own below the test."""
    frame = sys._current_frames().get(threading.main_thread().ident)  # type: ignore[arg-type]
    if frame is None:
        return "  (no Python frame)\n"
    return "".join(traceback.format_stack(frame, limit=12))


@contextlib.contextmanager
def signal_taken_elsewhere(when: Callable[[], bool], within: float = TIMEOUT) -> Iterator[None]:
    """In the block, once ``when()`` is true (polled from another thread),
    SIGUSR1 is sent to the process; its handler raises :class:`Interrupted`
    in the main thread.  The main thread blocks SIGUSR1 meanwhile and a
    thread of its own does not, so that thread is the one to take it,
    whatever other threads there are.

    If ``when()`` never holds ``within`` seconds (or raises), the test
    fails, naming the condition and where the main thread was: a
    condition that no longer matches the code it looks for would else let
    the signal come late, anywhere, and the test check nothing it claims.
    The signal is still sent then, only to end the main thread's wait."""
    assert threading.current_thread() is threading.main_thread()

    never: list[str] = []  # why the signal came without the condition
    ended = threading.Event()  # the block ended: no signal is due any more

    def handler(signum: int, frame: Any) -> None:
        # One sent as the block ended would raise in the cleanup below.
        if not ended.is_set():
            raise Interrupted

    def send() -> None:
        deadline = time.monotonic() + within
        try:
            while not when():
                if ended.is_set():
                    return
                if time.monotonic() >= deadline:
                    never.append(f"{_describe(when)} never held in {within} s;"
                                 f" the main thread was at:\n{_main_thread_stack()}")
                    break
                time.sleep(0.001)
        except Exception:
            never.append(f"{_describe(when)} raised:\n{traceback.format_exc()}"
                         f"the main thread was at:\n{_main_thread_stack()}")
        os.kill(os.getpid(), signal.SIGUSR1)

    done = threading.Event()
    # Started before the main thread blocks the signal: it does not.
    taker = threading.Thread(target=done.wait, args=(TIMEOUT,), name="signal-taker")
    taker.start()
    old = signal.signal(signal.SIGUSR1, handler)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    sender = threading.Thread(target=send, name="signal-sender")
    try:
        sender.start()
        yield
    finally:
        ended.set()
        sender.join(TIMEOUT)
        done.set()
        taker.join(TIMEOUT)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGUSR1, old)
        # In the finally: whatever the block raised (the late signal may
        # have landed anywhere) is shown too, as this failure's context.
        assert not never, "signal_taken_elsewhere: " + never[0]


def interrupt(when: Callable[[], bool], call: Callable[[], object]) -> None:
    """Run ``call()`` in the main thread and assert that the signal, sent
    once ``when()`` holds and taken by another thread, interrupts it."""
    with signal_taken_elsewhere(when):
        with pytest.raises(Interrupted):
            call()


def _handlers(code: CodeType) -> Callable[[int], object]:
    """Which handler of ``code``'s exception table covers an instruction
    (by offset); None if none does."""
    entries = [(e.start, e.end, (e.target, e.depth))
               for e in dis._parse_exception_table(code)]  # type: ignore[attr-defined]

    def handler(offset: int) -> object:
        for start, end, target in entries:
            if start <= offset < end:
                return target
        return None

    return handler


def _raisable_after(code: CodeType) -> Callable[[int, int], bool]:
    """Whether an exception raised by a trace function as the instruction
    at one offset of ``code`` starts is handled as one that CPython raises
    from a signal's handler where the exception table looks it up at
    another offset (see _Place.looked_up): the handler runs in a call's
    instruction or a loop's jump back, the trace function in the next
    instruction, and the two may lie on either side of the end of a try
    or a with block (``with lock: return f()`` leaves its block after f's
    CALL).  There an exception the tracer raises would skip the block's
    exit, which a real signal never does: such places are left out."""
    handler = _handlers(code)
    return lambda looked_up, then: handler(looked_up) == handler(then)


#: The instructions after which CPython 3.11 runs a pending signal's
#: handler in the middle of a function (its eval loop's CHECK_EVAL_BREAKER),
#: as a tracer sees them (de-specialised): a call returning (``f(*args)``
#: and ``f(**kw)`` are CALL_FUNCTION_EX) ...
_CALLS = frozenset({"CALL", "CALL_FUNCTION_EX"})
#: ... and a loop going round: a jump back, taken (JUMP_BACKWARD_NO_INTERRUPT,
#: in ``yield from`` and ``await``, looks for no signal).
_JUMPS_BACK = frozenset({"JUMP_BACKWARD", "POP_JUMP_BACKWARD_IF_FALSE",
                         "POP_JUMP_BACKWARD_IF_TRUE", "POP_JUMP_BACKWARD_IF_NONE",
                         "POP_JUMP_BACKWARD_IF_NOT_NONE"})


class _Place(NamedTuple):
    """Where, after an instruction, a signal's handler may run."""

    #: How a failure names it.
    what: str
    #: The instruction the frame must go on to for the handler to have
    #: run: a jump back's target (one not taken falls through, where no
    #: handler runs); None after a call, which returns (or raises) to
    #: wherever it does.
    then: int | None
    #: The offset at which CPython looks up the handler of the exception
    #: the signal's handler raises (INSTR_OFFSET()-1 in its eval loop): the
    #: call's own; after a jump back, the code unit before its target.
    #: Where the table covers one and not the other (a loop going round to
    #: a try's first instruction, a NOP the table leaves out, or to one
    #: just after such a NOP), the tracer's exception is not handled as the
    #: signal's: left out (see _raisable_after).  In the second case a real
    #: signal skips the try's handlers and its finally: no tracer imitates it.
    looked_up: int


def _places(code: CodeType) -> dict[int, _Place]:
    """The instructions of ``code`` (by offset) after which CPython may run
    a signal's handler, and how."""
    places = {}
    for ins in dis.get_instructions(code):
        if ins.opname in _CALLS:
            places[ins.offset] = _Place("as a call returns in", None, ins.offset)
        elif ins.opname in _JUMPS_BACK:
            places[ins.offset] = _Place("as a loop goes round in", ins.argval, ins.argval - 2)
    return places


def _landed(place: _Place | None, raisable: Callable[[int, int], bool], then: int) -> bool:
    """Whether a frame whose last instruction was at ``place`` (None if
    none) and whose next is at ``then`` went by a place where a signal's
    handler runs, at which a tracer's exception is handled as its would be."""
    return (place is not None and (place.then is None or place.then == then)
            and raisable(place.looked_up, then))


def _handler_runs_as_it_starts(frame: FrameType, cache: dict[CodeType, frozenset[int]]) -> bool:
    """Whether CPython runs a signal's handler as ``frame`` starts (again),
    where a tracer's call event comes.  It does in a RESUME instruction
    with oparg 0 or 1 (a function starting, a generator started or resumed
    by next() or send()), in which the call event comes too.  Not so in a
    generator thrown into: by ``gen.throw()`` (as a ``with`` block of a
    :func:`contextlib.contextmanager` left by an exception does), by
    ``close()``, or by a ``yield from`` passing either on.  It stands at
    its yield and goes on unwinding the exception at once, with no RESUME,
    but the call event comes, and an exception the tracer raises in it
    ends the generator without its own handlers (the finally that lets go
    of a lock), as no signal does.  Nor in a RESUME after a ``yield from``
    or an ``await`` (oparg 2 or 3), which looks for no signal.  Told by
    the instruction the frame stands at, not by its caller's code, which
    no call names for sure (a ``throw`` loaded, then a next() made; a
    throw whose argument is a call's result; a ``yield from``).  ``cache``:
    the offsets of those RESUMEs, by code."""
    code = frame.f_code
    if code not in cache:
        # The low two bits: where (3.13 adds a flag above them).
        cache[code] = frozenset(ins.offset for ins in dis.get_instructions(code)
                                if ins.opname == "RESUME" and (ins.arg or 0) & 3 < 2)
    return frame.f_lasti in cache[code]


def interrupted_as_call_returns(code: CodeType, n: int, call: Callable[[], object], *,
                                swallows: bool = False, converts: bool = False) -> bool:
    """Run ``call()`` with :class:`Interrupted` raised at the ``n``-th place
    (counting from 0) in a frame of ``code`` where CPython runs a signal's
    handler in the middle of a function: as a call the frame made returns
    (``f(*args)`` too), or as one of its loops goes round (a jump back
    taken), not as a Python function starts.  True if it was raised; False
    if the frames went by fewer places, and ``call()`` ran undisturbed.
    A ``call()`` that returns all the same fails (see _traced), unless
    ``swallows``: for a call that keeps the Ctrl-C on purpose.  One that
    raises another exception instead fails too, unless ``converts``."""
    places = _places(code)
    raisable = _raisable_after(code)
    passed = 0
    after: _Place | None = None
    raised = ""

    def in_frame(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal passed, after, raised
        if event != "opcode":
            return in_frame
        if _landed(after, raisable, frame.f_lasti):
            if passed == n:
                assert after is not None
                what = "a call of {} returned" if after.then is None else "a loop of {} went round"
                raised = f"as {what.format(code.co_qualname)} (place {n})"
                raise Interrupted
            passed += 1
        after = places.get(frame.f_lasti)
        return in_frame

    def enter(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal after
        if frame.f_code is not code:
            return None
        frame.f_trace_opcodes = True
        after = None
        return in_frame

    return _traced(enter, call, lambda: bool(raised), lambda: raised, swallows, converts)


def interrupted_as_frame_starts(code: CodeType, call: Callable[[], object], *,
                                swallows: bool = False, converts: bool = False) -> bool:
    """Run ``call()`` with :class:`Interrupted` raised as the first frame of
    ``code`` starts: where CPython runs a signal's handler before the
    function does anything.  True if it was raised; False if no frame of
    ``code`` ran.  ``swallows``, ``converts``: as for
    interrupted_as_call_returns."""
    raised = False

    def enter(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal raised
        if frame.f_code is code and not raised:
            raised = True
            raise Interrupted
        return None

    return _traced(enter, call, lambda: raised, lambda: f"as {code.co_qualname} started", swallows,
                   converts)


def interrupted_at(n: int, within: str, call: Callable[[], object],
                   unless: Callable[[], bool] = lambda: False, *,
                   besides: str | tuple[str, ...] = "", swallows: bool = False,
                   converts: bool = False) -> str:
    """Run ``call()`` with :class:`Interrupted` raised at the ``n``-th place
    (counting from 0) where CPython may run a signal's handler in a frame
    of a file under the directory ``within``: as such a frame starts (not
    a generator's that a throw() resumes: see _handler_runs_as_it_starts),
    as a call it makes returns (``f(*args)`` too), or as one of its loops
    goes round (a jump back taken).  Where it was raised (what, function
    and line); '' if there were fewer places, and ``call()`` ran
    undisturbed.

    Going through n = 0, 1, 2, ... until it returns '' lands a Ctrl-C
    at every such place of one call, however its code is split into
    functions.  A place where ``unless()`` holds does not count, nor one
    in a file ``besides`` names: a directory (every file under it) or a
    ``.py`` file, or a tuple of them.

    A ``call()`` that returns normally although the Ctrl-C was raised
    fails, naming the place: a library that catches a KeyboardInterrupt
    and drops it lets the user's program go on as if none had come.
    ``swallows`` allows it, for a call that keeps the Ctrl-C on purpose
    (to raise it later, say): say why where it is passed.  A ``call()``
    that raises another exception instead fails too (an AssertionError
    aside: see _traced), as a caller's ``except`` for that one would hide
    the Ctrl-C; ``converts`` allows it."""
    within = os.path.join(within, "")
    skipped = tuple(path if path.endswith(".py") else os.path.join(path, "")
                    for path in ((besides,) if isinstance(besides, str) else besides) if path)
    count = 0
    raised = ""
    places: dict[CodeType, dict[int, _Place]] = {}
    raisable: dict[CodeType, Callable[[int, int], bool]] = {}
    # The frames whose last instruction was a call or a jump back, and
    # which place that is: the call has returned, the jump was taken or
    # not, by their next one.
    in_place: dict[FrameType, _Place] = {}
    resumes: dict[CodeType, frozenset[int]] = {}

    def land(frame: FrameType, event: str) -> None:
        nonlocal count, raised
        if raised or unless():  # one signal
            return
        if count == n:
            code = frame.f_code
            raised = (f"{event} {code.co_qualname}, "
                      f"{os.path.basename(code.co_filename)}:{frame.f_lineno}")
            raise Interrupted
        count += 1

    def in_frame(frame: FrameType, event: str, arg: object) -> Any:
        if event == "return":
            in_place.pop(frame, None)
        elif event == "opcode":
            place = in_place.pop(frame, None)
            if _landed(place, raisable[frame.f_code], frame.f_lasti):
                assert place is not None
                land(frame, place.what)
            place = places[frame.f_code].get(frame.f_lasti)
            if place is not None:
                in_place[frame] = place
        return in_frame

    def enter(frame: FrameType, event: str, arg: object) -> Any:
        code = frame.f_code
        if raised or not code.co_filename.startswith(within):
            return None
        if skipped and code.co_filename.startswith(skipped):
            return None
        if code not in places:
            places[code] = _places(code)
            raisable[code] = _raisable_after(code)
        frame.f_trace_opcodes = True
        if _handler_runs_as_it_starts(frame, resumes):
            land(frame, "as it starts:")
        return in_frame

    _traced(enter, call, lambda: bool(raised), lambda: raised, swallows, converts)
    return raised


def _in_context_chain(exc: BaseException) -> bool:
    """Whether an :class:`Interrupted` is among the exceptions ``exc`` was
    raised while handling (its ``__context__``, theirs, and so on)."""
    seen: set[int] = set()
    context = exc.__context__
    while context is not None and id(context) not in seen:
        if isinstance(context, Interrupted):
            return True
        seen.add(id(context))
        context = context.__context__
    return False


def _exception_name(exc: BaseException) -> str:
    kind = type(exc)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


#: What a caller's own checks raise inside ``call()``: a test failing (or
#: skipped) there, not a library turning the Ctrl-C into something else.
_TEST_OUTCOMES = (AssertionError, pytest.fail.Exception, pytest.skip.Exception)


def _traced(tracer: Any, call: Callable[[], object], raised: Callable[[], bool],
            where: Callable[[], str], swallows: bool, converts: bool) -> bool:
    """``call()`` under ``tracer``; True if the tracer raised its
    :class:`Interrupted` (``raised()``), which ends the call; any other
    goes on.

    Once the tracer raised, ``call()`` must raise an :class:`Interrupted`.
    A call that returns fails, naming ``where()`` it landed, unless
    ``swallows``: something on the way out caught the Ctrl-C and dropped
    it, and a user's program would go on as if none had come.  A call
    that raises another exception fails too, naming it and whether the
    Interrupted is in its ``__context__`` chain, unless ``converts``:
    something on the way out turned the Ctrl-C into an error (a cleanup
    that failed as it unwound, an ``except BaseException`` raising an
    OSError), which a caller's ``except OSError`` would then hide.  With
    ``converts`` that exception comes out of the helper as itself.

    An AssertionError (or pytest's fail() or skip()) comes out as itself:
    it is the caller's own check failing inside ``call()``, as a sweep's
    call that catches the Interrupted to look at the state it left does
    on purpose, not a conversion.  The cost: library code whose ``assert``
    fails as the Ctrl-C unwinds is not told from it here (it fails the
    test all the same)."""
    sys.settrace(tracer)
    try:
        call()
    except Interrupted:
        if not raised():
            raise
    except _TEST_OUTCOMES:
        raise
    except BaseException as exc:
        if not raised() or converts:
            raise
        chain = ("the Interrupted is in its __context__ chain" if _in_context_chain(exc)
                 else "no Interrupted is in its __context__ chain")
        raise AssertionError(f"the Ctrl-C raised {where()} was turned into"
                             f" {_exception_name(exc)}: {exc} by {_describe(call)}"
                             f" ({chain})") from exc
    else:
        if raised() and not swallows:
            raise AssertionError(f"the Ctrl-C raised {where()} was swallowed:"
                                 f" {_describe(call)} returned normally")
    finally:
        sys.settrace(None)
    return raised()
