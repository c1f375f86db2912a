"""The Ctrl-C sweep's helper (tests/stolensignal.py): it lands where CPython
runs a signal's handler, and only there."""

from __future__ import annotations

import importlib.util
import itertools
import os
import textwrap
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from stolensignal import (
    Interrupted,
    interrupted_as_call_returns,
    interrupted_as_frame_starts,
    interrupted_at,
    main_thread_in,
    signal_taken_elsewhere,
)

# Where a generator thrown into (throw(), close(), a yield from passing the
# exception on) goes straight to its handlers: CPython 3.11 runs no signal's
# handler as it starts again (no RESUME), but a tracer's call event comes,
# and an exception raised there ended the generator without its finally.
# Where one is resumed by next() (RESUME 1), a handler runs.
_CODE = '''
import contextlib

entered: list[int] = []
left: list[int] = []


def gen():
    try:
        entered.append(1)
        yield
    finally:
        left.append(1)


def delegating():
    yield from gen()


def thrown_with_a_made_exception():
    g = gen()
    next(g)
    try:
        g.throw(ValueError("made by a call"))
    except ValueError:
        pass


def thrown_through_yield_from():
    g = delegating()
    next(g)
    try:
        g.throw(ValueError)
    except ValueError:
        pass


def closed():
    g = gen()
    next(g)
    g.close()


def resumed_with_throw_at_hand():
    g = gen()
    next(g)
    throw = g.throw
    next(g, None)
    return throw


done: list[int] = []


def work():
    done.append(1)


def swallowing():
    try:
        work()
    except BaseException:
        pass


def returning_in_finally():
    try:
        work()
    finally:
        return


def suppressing():
    with contextlib.suppress(BaseException):
        work()


def reraising():
    try:
        work()
    except BaseException:
        done.clear()
        raise


def converting():
    try:
        work()
    except BaseException:
        raise OSError("refused")


def cleanup():
    raise OSError("refused")


def failing_in_cleanup():
    try:
        work()
    finally:
        cleanup()


def failing_after_dropping():
    try:
        work()
    except BaseException:
        failed = True
    else:
        failed = False
    if failed:
        raise OSError("refused")


def checking():
    try:
        work()
    except BaseException:
        raise AssertionError("the caller's own check")


def spreading():
    done.extend(*[(1, 2)])


def going_round():
    seen = {}
    for x in (1, 2):
        seen[x] = x


def counting_down():
    n = 2
    while n:
        n -= 1


def looping_in_a_try():
    n = 2
    try:
        entered.append(1)
        while n:
            try:
                n -= 1
            except ValueError:
                pass
    finally:
        left.append(1)
'''


@pytest.fixture()
def module(tmp_path: Path) -> types.ModuleType:
    path = tmp_path / "sweptmod.py"
    path.write_text(textwrap.dedent(_CODE))
    spec = importlib.util.spec_from_file_location("sweptmod", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sweep(mod: types.ModuleType, call: Callable[[], object]) -> list[str]:
    """Every landing along ``call()``; after each, the generator that got
    into its try left it through its finally."""
    within = os.path.dirname(mod.__file__ or "")
    landed = []
    for n in itertools.count():
        mod.entered.clear()
        mod.left.clear()
        where = interrupted_at(n, within, call)
        assert mod.entered == mod.left, f"interrupted {where or 'nowhere'}: no finally"
        if not where:
            return landed
        landed.append(where)


@pytest.mark.parametrize("name", ["thrown_with_a_made_exception", "thrown_through_yield_from",
                                  "closed"])
def test_no_landing_as_a_generator_thrown_into_starts_again(
        module: types.ModuleType, name: str) -> None:
    landed = _sweep(module, getattr(module, name))
    # The sweep went past the throw: landings in the finally's append.
    assert any("as a call returns in gen" in where for where in landed), landed


def test_a_landing_as_a_generator_resumed_by_next_starts_again(module: types.ModuleType) -> None:
    """Resumed by next() in a frame that has a generator's throw at hand
    (loaded, not called): a real place, not a throw's."""
    landed = _sweep(module, module.resumed_with_throw_at_hand)
    starts = [where for where in landed if where.startswith("as it starts: gen,")]
    assert len(starts) == 2, landed  # started, and resumed


def _naps_until_interrupted() -> None:
    # Naps, not one long wait: the main thread runs a signal's handler
    # that another thread took only once it wakes.
    while True:
        time.sleep(0.005)


def test_a_signal_whose_condition_never_holds_fails_the_test() -> None:
    """The signal still ends the wait, but the test fails, naming the
    condition and where the main thread was: a stale condition would else
    let the signal come late, anywhere, and the test check nothing."""
    with pytest.raises(AssertionError) as failure:
        with signal_taken_elsewhere(lambda: False, within=0.2):
            with pytest.raises(Interrupted):
                _naps_until_interrupted()
    message = str(failure.value)
    assert "lambda: False, within=0.2" in message and "never held in 0.2 s" in message, message
    # Where, exactly, depends on how far the main thread got in 0.2 s.
    assert "the main thread was at:\n  File " in message, message


def test_a_signal_whose_condition_raises_fails_the_test() -> None:
    def when() -> bool:
        # Once the main thread naps: the stack to show is known then.
        if not main_thread_in("_naps_until_interrupted"):
            return False
        raise LookupError("no such frame")

    with pytest.raises(AssertionError) as failure:
        with signal_taken_elsewhere(when):
            with pytest.raises(Interrupted):
                _naps_until_interrupted()
    message = str(failure.value)
    assert "when (" in message and "LookupError: no such frame" in message, message
    assert "in _naps_until_interrupted" in message, message


def test_no_signal_once_the_block_ended() -> None:
    """A block that ends before the condition holds gets no signal later,
    in the cleanup or after it (its own failure, if any, stands): the
    sender gives up at once, with no failure of its own."""
    with signal_taken_elsewhere(lambda: False, within=0.2):
        pass
    assert not [t for t in threading.enumerate() if t.name == "signal-sender"]


def _every_landing(mod: types.ModuleType, call: Callable[[], object],
                   swallows: bool = False, converts: bool = False) -> list[str]:
    within = os.path.dirname(mod.__file__ or "")
    landed = []
    for n in itertools.count():
        where = interrupted_at(n, within, call, swallows=swallows, converts=converts)
        if not where:
            return landed
        landed.append(where)


@pytest.mark.parametrize("name", ["swallowing", "returning_in_finally", "suppressing"])
def test_a_call_that_swallows_the_ctrl_c_fails_the_sweep(
        module: types.ModuleType, name: str) -> None:
    """The sweep's first landing in work() is caught and dropped by its
    caller, which returns: the helper fails there, naming the place,
    instead of counting it as a landing like any other."""
    with pytest.raises(AssertionError) as failure:
        _every_landing(module, getattr(module, name))
    message = str(failure.value)
    assert "the Ctrl-C raised as it starts: work, sweptmod.py:" in message, message
    assert f"was swallowed: {name} (sweptmod.py:" in message, message


def test_a_call_that_raises_the_ctrl_c_again_passes_the_sweep(module: types.ModuleType) -> None:
    landed = _every_landing(module, module.reraising)
    assert any(where.startswith("as it starts: work,") for where in landed), landed
    assert module.done == [1]  # the last call, undisturbed, got through


def test_a_call_that_swallows_on_purpose_says_so(module: types.ModuleType) -> None:
    landed = _every_landing(module, module.swallowing, swallows=True)
    assert any(where.startswith("as it starts: work,") for where in landed), landed


def test_the_other_sweeps_fail_a_swallowing_call_too(module: types.ModuleType) -> None:
    with pytest.raises(AssertionError, match=r"as work started was swallowed"):
        interrupted_as_frame_starts(module.work.__code__, module.swallowing)
    with pytest.raises(AssertionError,
                       match=r"as a call of work returned \(place 0\) was swallowed"):
        interrupted_as_call_returns(module.work.__code__, 0, module.swallowing)
    assert interrupted_as_frame_starts(module.work.__code__, module.swallowing, swallows=True)
    assert interrupted_as_frame_starts(module.work.__code__, module.reraising)
    assert interrupted_as_call_returns(module.work.__code__, 0, module.reraising)


@pytest.mark.parametrize(("name", "chained"), [("converting", True), ("failing_in_cleanup", True),
                                                ("failing_after_dropping", False)])
def test_a_call_that_turns_the_ctrl_c_into_another_exception_fails_the_sweep(
        module: types.ModuleType, name: str, chained: bool) -> None:
    """The first landing in work() comes out of its caller as an OSError,
    which a program's ``except OSError`` would take for an error and
    carry on: the helper fails there, naming the place, the exception,
    and whether the Ctrl-C is still in its context."""
    with pytest.raises(AssertionError) as failure:
        _every_landing(module, getattr(module, name))
    message = str(failure.value)
    assert "the Ctrl-C raised as it starts: work, sweptmod.py:" in message, message
    assert f"was turned into OSError: refused by {name} (sweptmod.py:" in message, message
    chain = "the Interrupted is in" if chained else "no Interrupted is in"
    assert f"({chain} its __context__ chain)" in message, message
    assert isinstance(failure.value.__cause__, OSError)


def test_an_assertion_of_the_call_itself_comes_out_unchanged(module: types.ModuleType) -> None:
    """A caller's own check failing inside call() is a test failure, not
    a conversion: it is neither wrapped nor renamed."""
    with pytest.raises(AssertionError, match=r"^the caller's own check$") as failure:
        _every_landing(module, module.checking)
    assert failure.value.__cause__ is None


def test_an_exception_with_no_ctrl_c_raised_comes_out_unchanged(
        module: types.ModuleType) -> None:
    """No frame of gen() runs: the OSError is the call's own, not a
    conversion."""
    with pytest.raises(OSError, match=r"^refused$"):
        interrupted_as_frame_starts(module.gen.__code__, module.cleanup)


def test_a_call_that_converts_on_purpose_says_so(module: types.ModuleType) -> None:
    """The opt-out lets the exception come out of the helper as itself."""
    with pytest.raises(OSError, match=r"^refused$"):
        _every_landing(module, module.converting, converts=True)
    with pytest.raises(OSError, match=r"^refused$"):
        interrupted_as_frame_starts(module.work.__code__, module.converting, converts=True)


def test_the_other_sweeps_fail_a_converting_call_too(module: types.ModuleType) -> None:
    with pytest.raises(AssertionError, match=r"as work started was turned into OSError: refused"):
        interrupted_as_frame_starts(module.work.__code__, module.converting)
    with pytest.raises(AssertionError, match=r"as a call of work returned \(place 0\) was turned"
                                             r" into OSError: refused"):
        interrupted_as_call_returns(module.work.__code__, 0, module.converting)


def _line_of(mod: types.ModuleType, text: str) -> int:
    """The line of ``mod``'s source that holds ``text``."""
    lines = Path(mod.__file__ or "").read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if text in line)


def test_a_landing_as_a_call_with_star_args_returns(module: types.ModuleType) -> None:
    """CPython runs a signal's handler as a ``f(*args)`` call returns
    (CALL_FUNCTION_EX), as for a plain call: the sweep lands there too."""
    line = _line_of(module, "done.extend(*[(1, 2)])")
    assert _every_landing(module, module.spreading) == [
        f"as it starts: spreading, sweptmod.py:{line - 1}",
        f"as a call returns in spreading, sweptmod.py:{line}",
    ]
    assert interrupted_as_call_returns(module.spreading.__code__, 0, module.spreading)
    assert not interrupted_as_call_returns(module.spreading.__code__, 1, module.spreading)


def test_a_landing_each_time_a_loop_goes_round(module: types.ModuleType) -> None:
    """And as a loop goes round (JUMP_BACKWARD), each time, whatever its
    body does: there is no call in this one."""
    line = _line_of(module, "for x in (1, 2):")
    assert _every_landing(module, module.going_round) == [
        f"as it starts: going_round, sweptmod.py:{line - 2}",
        f"as a loop goes round in going_round, sweptmod.py:{line}",
        f"as a loop goes round in going_round, sweptmod.py:{line}",
    ]
    code = module.going_round.__code__
    assert interrupted_as_call_returns(code, 1, module.going_round)
    assert not interrupted_as_call_returns(code, 2, module.going_round)


def test_a_landing_as_a_loop_goes_round_only_if_it_does(module: types.ModuleType) -> None:
    """A ``while`` loop's test at its bottom jumps back (POP_JUMP_BACKWARD_IF_TRUE,
    where the handler runs) or falls through (where it does not): one
    landing for two tests."""
    line = _line_of(module, "n -= 1")
    assert _every_landing(module, module.counting_down) == [
        f"as it starts: counting_down, sweptmod.py:{line - 3}",
        f"as a loop goes round in counting_down, sweptmod.py:{line}",
    ]
    code = module.counting_down.__code__
    assert interrupted_as_call_returns(code, 0, module.counting_down)
    assert not interrupted_as_call_returns(code, 1, module.counting_down)


def test_no_landing_as_a_loop_goes_round_to_a_place_its_try_leaves_out(
        module: types.ModuleType) -> None:
    """The inner try's first instruction, where the loop goes round to, is
    a NOP that the outer try's exception table leaves out: an exception a
    tracer raised there would skip the finally, but CPython looks up the
    signal's at the code unit before it, which the table covers.  Not a
    place the sweep can land as a signal would: left out."""
    landed = _sweep(module, module.looping_in_a_try)
    assert not [where for where in landed if "loop goes round" in where], landed
    assert any("as a call returns in looping_in_a_try" in where for where in landed), landed
