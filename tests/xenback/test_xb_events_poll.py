"""EventDispatcher in poll mode: callbacks run in the thread that polls."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.stolensignal import (
    interrupt,
    main_thread_in,
    main_thread_within,
)
from tests.xenback.xbhelpers import TIMEOUT, leaked_threads
from workqueue import Topology, Work, alloc_workqueue
from xenback import EventDispatcher, events


@pytest.fixture
def polled(host):
    """A guest's event channel handle and a dom0 dispatcher in poll mode."""
    before = {t.ident for t in threading.enumerate()}
    guest = host.create_domain("guest")
    evtchn = guest.evtchn()
    dispatcher = EventDispatcher(host.dom0, thread=False)
    yield guest, evtchn, dispatcher
    dispatcher.close()
    evtchn.close()
    assert not leaked_threads(before)


class EpollWaits:
    """A dispatcher's epoll object, recording its waits: each one's
    timeout and what it returned.  What a poll waited for, and whether
    that ran out, without a clock."""

    def __init__(self, epoll: select.epoll) -> None:
        self._epoll = epoll
        self.waits: list[tuple[float, list[tuple[int, int]]]] = []

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        ready = self._epoll.poll(timeout, maxevents)
        self.waits.append((timeout, ready))
        return ready

    def ran_out(self) -> list[float]:
        """The timeouts of the waits that ended with nothing ready."""
        return [timeout for timeout, ready in self.waits if not ready and timeout != 0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._epoll, name)


def epoll_waits(monkeypatch: pytest.MonkeyPatch, dispatcher: EventDispatcher) -> EpollWaits:
    waits = EpollWaits(dispatcher._epoll)
    monkeypatch.setattr(dispatcher, "_epoll", waits)
    return waits


def test_poll_mode_starts_no_thread(host) -> None:
    before = {t.ident for t in threading.enumerate()}
    dispatcher = EventDispatcher(host.dom0, thread=False)
    try:
        assert {t.ident for t in threading.enumerate()} == before
    finally:
        dispatcher.close()


def test_callbacks_run_in_the_polling_thread(polled) -> None:
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    calls: list[tuple[int, threading.Thread]] = []
    local = dispatcher.bind_interdomain(
        guest.domid, remote, lambda port: calls.append((port, threading.current_thread())))
    evtchn.notify(remote)
    assert dispatcher.poll(TIMEOUT) == 1
    assert calls == [(local, threading.current_thread())]
    # The port was unmasked after its callback: the next event comes through.
    evtchn.notify(remote)
    assert dispatcher.poll(TIMEOUT) == 1
    assert len(calls) == 2


def test_running_port_is_the_polled_port_in_its_callback_only(polled) -> None:
    """In poll mode the caller of poll() runs the callbacks: the port in
    its callback, None around the poll (the same thread, no callback)."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    seen: list[int | None] = []
    local = dispatcher.bind_interdomain(
        guest.domid, remote, lambda _port: seen.append(dispatcher.running_port()))
    assert dispatcher.running_port() is None
    evtchn.notify(remote)
    assert dispatcher.poll(TIMEOUT) == 1
    assert seen == [local]
    assert dispatcher.running_port() is None


def test_poll_times_out_with_nothing_ready(polled) -> None:
    _, _, dispatcher = polled
    assert dispatcher.poll(0) == 0
    assert dispatcher.poll(0.01) == 0
    # A deadline already past (a caller's remaining time) does not wait:
    # to epoll a negative timeout would mean for ever.
    results: list[int] = []
    poller = threading.Thread(target=lambda: results.append(dispatcher.poll(-0.5)))
    poller.start()
    poller.join(TIMEOUT)
    waited = poller.is_alive()
    if waited:  # free it, then fail
        dispatcher.wakeup()
        poller.join(TIMEOUT)
    assert not waited and results == [0]


def test_host_fd_in_poll_mode(polled) -> None:
    _, _, dispatcher = polled
    r, w = os.pipe()
    try:
        seen: list[int] = []
        dispatcher.add_fd(r, 0x001, lambda fd, events: seen.append(fd))  # EPOLLIN
        os.write(w, b"x")
        assert dispatcher.poll(TIMEOUT) == 1
        assert seen == [r]
        dispatcher.remove_fd(r)
        assert dispatcher.poll(0) == 0  # no longer watched, though still readable
    finally:
        os.close(r)
        os.close(w)


class _EpollSpy:
    """Stands in for a dispatcher's epoll object: sets ``entered`` as the
    poller goes into epoll_wait, and with ``hold`` keeps it from leaving
    poll() until that is set."""

    def __init__(self, real: Any, hold: threading.Event | None = None) -> None:
        self._real = real
        self._hold = hold
        self.entered = threading.Event()

    def poll(self, *args: Any) -> Any:
        self.entered.set()
        ready = self._real.poll(*args)
        if self._hold is not None:
            self._hold.wait(TIMEOUT)
        return ready

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_wakeup_ends_a_poll_in_progress(polled, monkeypatch) -> None:
    _, _, dispatcher = polled
    spy = _EpollSpy(dispatcher._epoll)
    monkeypatch.setattr(dispatcher, "_epoll", spy)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(dispatcher.poll(None)), daemon=True)
    t.start()
    # Wake it up only once it is past its checks and waiting in epoll.
    assert spy.entered.wait(TIMEOUT)
    dispatcher.wakeup()
    t.join(TIMEOUT)
    woken = not t.is_alive()
    if not woken:  # release it by hand, or closing the fixture waits for ever
        os.write(dispatcher._wake_w, b"x")
    assert woken, "wakeup() did not end the poll"
    assert result == [0]  # woken, nothing ran


def test_close_waits_for_a_poll_in_progress(host, monkeypatch) -> None:
    dispatcher = EventDispatcher(host.dom0, thread=False)
    leave = threading.Event()
    spy = _EpollSpy(dispatcher._epoll, hold=leave)
    monkeypatch.setattr(dispatcher, "_epoll", spy)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(dispatcher.poll(None)), daemon=True)
    t.start()
    assert spy.entered.wait(TIMEOUT)  # in epoll_wait: only close() can end it
    closer = threading.Thread(target=dispatcher.close, daemon=True)
    closer.start()
    # close() woke the poll (which is held on its way out): it must not
    # close the descriptors under it.
    closer.join(0.2)
    assert closer.is_alive(), "close() returned while a poll was in progress"
    leave.set()
    closer.join(TIMEOUT)
    assert not closer.is_alive(), "close() did not end the poll in progress"
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert result == [0]
    assert dispatcher.poll(0) == 0  # a closed dispatcher has nothing more


def _main_waits_in_close() -> bool:
    # The wait of close() for the poll in progress: on a condition, or (as
    # it was) in sleep_on() on the poll lock.
    return main_thread_in("sleep_on") or (
        main_thread_in("wait", path="threading") and main_thread_within("close", depth=2))


def _poll_in_progress(host, monkeypatch) -> tuple[EventDispatcher, threading.Event, Any,
                                                  threading.Thread]:
    """A dispatcher in poll mode with a thread in its poll(), held there
    until the returned event is set; its epoll spy; that thread."""
    dispatcher = EventDispatcher(host.dom0, thread=False)
    leave = threading.Event()
    spy = _EpollSpy(dispatcher._epoll, hold=leave)
    monkeypatch.setattr(dispatcher, "_epoll", spy)
    t = threading.Thread(target=dispatcher.poll, args=(None,), daemon=True)
    t.start()
    assert spy.entered.wait(TIMEOUT)
    return dispatcher, leave, spy, t


def test_a_close_interrupted_while_a_poll_is_in_progress_is_finished_by_the_next(
        host, monkeypatch) -> None:
    dispatcher, leave, spy, t = _poll_in_progress(host, monkeypatch)
    try:
        interrupt(_main_waits_in_close, dispatcher.close)
        assert not spy._real.closed  # the poll still uses it
    finally:
        leave.set()
    t.join(TIMEOUT)
    assert not t.is_alive()
    dispatcher.close()
    assert spy._real.closed  # released by the second close()


def test_a_close_interrupted_as_the_poll_leaves_does_not_keep_the_poll_lock(
        host, monkeypatch) -> None:
    """The signal another thread took arrives while close() waits and the
    poll leaves before the main thread looks again: the interrupt must not
    come with the poll lock taken, or nothing would release it, the next
    close() would wait for ever and every poll() would fail."""
    dispatcher, leave, spy, t = _poll_in_progress(host, monkeypatch)
    sending = threading.Event()

    def main_waits() -> bool:
        if not _main_waits_in_close():
            return False
        sending.set()  # the signal goes right after this returns
        return True

    # The signal's C handler, in whichever thread took it, writes to the
    # wakeup fd: then its Python handler waits for the main thread to look.
    taken_r, taken_w = os.pipe2(os.O_NONBLOCK)
    taken: list[bool] = []

    def leave_after_the_signal() -> None:
        if sending.wait(TIMEOUT):
            taken.append(bool(select.select([taken_r], [], [], TIMEOUT)[0]))
        leave.set()  # well within the main thread's slice

    helper = threading.Thread(target=leave_after_the_signal)
    previous_wake = signal.set_wakeup_fd(taken_w, warn_on_full_buffer=False)
    helper.start()
    try:
        interrupt(main_waits, dispatcher.close)
    finally:
        leave.set()
        helper.join(TIMEOUT)
        signal.set_wakeup_fd(previous_wake)
        os.close(taken_r)
        os.close(taken_w)
    assert taken == [True], "the poll left before the signal was taken"
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert not dispatcher._poll_lock.locked()
    dispatcher.close()
    assert spy._real.closed
    assert dispatcher.poll(0) == 0


def test_poll_is_for_poll_mode_only(host) -> None:
    dispatcher = EventDispatcher(host.dom0)
    try:
        with pytest.raises(RuntimeError, match="thread=False"):
            dispatcher.poll(0)
    finally:
        dispatcher.close()


def test_one_poller_at_a_time(polled) -> None:
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    inside = threading.Event()
    release = threading.Event()

    def callback(port: int) -> None:
        inside.set()
        release.wait(TIMEOUT)

    dispatcher.bind_interdomain(guest.domid, remote, callback)
    evtchn.notify(remote)
    t = threading.Thread(target=dispatcher.poll, args=(TIMEOUT,))
    t.start()
    try:
        assert inside.wait(TIMEOUT)  # the other thread is inside poll()
        with pytest.raises(RuntimeError, match="two threads"):
            dispatcher.poll(0)
    finally:
        release.set()
        t.join(TIMEOUT)


def test_unbind_from_a_callback_does_not_wait_for_itself(polled) -> None:
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    local: list[int] = []

    def callback(port: int) -> None:
        dispatcher.unbind(port)  # would deadlock if it waited for itself

    local.append(dispatcher.bind_interdomain(guest.domid, remote, callback))
    evtchn.notify(remote)
    assert dispatcher.poll(TIMEOUT) == 1
    assert dispatcher.ports == []


def test_the_wait_counts_as_blocking_for_a_work_item(polled) -> None:
    """A work item sleeping in poll() lets its pool run the next item."""
    guest, evtchn, dispatcher = polled
    # Long enough that only blocking() can let the other item in.
    topology = Topology(1, cpu_intensive_thresh=3600.0)
    wq = alloc_workqueue("poll-test", topology=topology)
    try:
        other_ran = threading.Event()
        polling = threading.Event()

        def poll_fn(work: Work) -> None:
            polling.set()
            dispatcher.poll(TIMEOUT)

        wq.queue_work(Work(poll_fn))
        assert polling.wait(TIMEOUT)
        wq.queue_work(Work(lambda work: other_ran.set()))
        # The pool's one running item sleeps in epoll: without blocking()
        # the other would wait for the cpu-intensive threshold, an hour.
        assert other_ran.wait(TIMEOUT)
        dispatcher.wakeup()
        wq.flush()
    finally:
        wq.destroy()


def test_one_port_per_poll(host, polled) -> None:
    """Each poll takes one fired port; the next poll takes the next at once."""
    guest, evtchn, dispatcher = polled
    remotes = [evtchn.bind_unbound_port(0) for _ in range(3)]
    calls: list[int] = []
    for remote in remotes:
        dispatcher.bind_interdomain(guest.domid, remote, calls.append)
    for remote in remotes:
        evtchn.notify(remote)
    assert dispatcher.poll(TIMEOUT) == 1
    assert len(calls) == 1
    # The other two are still there: each of the next polls finds one
    # without waiting (a poll that waited would have to time out here).
    assert dispatcher.poll(TIMEOUT) == 1
    assert dispatcher.poll(TIMEOUT) == 1
    assert len(set(calls)) == 3
    assert dispatcher.poll(0) == 0


def test_close_from_a_callback_ends_the_round_with_a_wakeup_pending(polled) -> None:
    """A callback that closes the dispatcher ends the dispatch round: what
    else that poll found ready (here the wake-up pipe) is a descriptor
    closed now, or by then another file's."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: dispatcher.close())
    evtchn.notify(remote)
    # The handle turns readable before the pipe: epoll reports it first.
    assert select.select([dispatcher._evtchn_fd], [], [], TIMEOUT)[0]
    dispatcher.wakeup()
    assert dispatcher.poll(TIMEOUT) == 1
    assert dispatcher.poll(0) == 0  # closed


def test_close_from_an_fd_callback_ends_the_round_before_the_handle(polled, caplog) -> None:
    """As above, with the handle ready after the fd whose callback closed
    the dispatcher: a handle closed now is not asked for its port (it
    would fail, and be reported dead)."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    calls: list[int] = []
    dispatcher.bind_interdomain(guest.domid, remote, calls.append)
    r, w = os.pipe()
    try:
        dispatcher.add_fd(r, select.EPOLLIN, lambda _fd, _events: dispatcher.close())
        os.write(w, b"x")
        evtchn.notify(remote)  # readable after the pipe: epoll reports it second
        assert select.select([dispatcher._evtchn_fd], [], [], TIMEOUT)[0]
        assert dispatcher.poll(TIMEOUT) == 1
        assert calls == []
        assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING] == []
    finally:
        os.close(r)
        os.close(w)


def test_wakeups_beyond_what_the_pipe_holds_are_one_wakeup(polled, monkeypatch) -> None:
    """wakeup() never blocks nor fails, however often it is called before
    a poll: a full pipe already holds a pending wake-up."""
    _, _, dispatcher = polled
    for _ in range(fcntl.fcntl(dispatcher._wake_w, fcntl.F_GETPIPE_SZ) + 1):
        dispatcher.wakeup()
    epoll = epoll_waits(monkeypatch, dispatcher)
    assert dispatcher.poll(TIMEOUT) == 0  # woken, nothing ran
    assert [[fd for fd, _ in ready] for _, ready in epoll.waits] == [[dispatcher._wake_r]], \
        "poll() was not woken"
    assert dispatcher.poll(0) == 0
    assert epoll.waits[-1][1] == [], "the wake-up was not taken: every poll would return at once"
    dispatcher.wakeup()  # the pipe was drained: there is room again
    assert dispatcher.poll(TIMEOUT) == 0


def test_an_event_whose_callback_failed_is_handed_out_again(polled, monkeypatch) -> None:
    """A callback that raised lost its event (the work it would have
    queued): the next poll runs every callback once more, before it
    waits; a host fd's with its readiness of now, as a level-triggered
    watch would report it."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    fd_calls: list[int] = []
    local, port_calls = _failing_first(dispatcher, remote, guest)
    r, w = os.pipe()
    try:
        dispatcher.add_fd(r, select.EPOLLIN | select.EPOLLET,
                          lambda _fd, revents: fd_calls.append(revents))
        os.write(w, b"x")
        evtchn.notify(remote)
        assert select.select([dispatcher._evtchn_fd], [], [], TIMEOUT)[0]
        assert dispatcher.poll(TIMEOUT) == 2
        assert port_calls == [local] and fd_calls == [select.POLLIN]
        epoll = epoll_waits(monkeypatch, dispatcher)
        assert dispatcher.poll(TIMEOUT) == 2
        assert not epoll.ran_out(), "the resync waited"
        assert port_calls == [local, local]
        assert fd_calls == [select.POLLIN, select.POLLIN]  # still unread
        # Handed out once: the port was unmasked, nothing is run again.
        assert dispatcher.poll(0) == 0
        evtchn.notify(remote)
        assert dispatcher.poll(TIMEOUT) == 1
        assert len(port_calls) == 3
    finally:
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


def test_a_callback_failing_at_every_call_costs_a_resync_per_wakeup(polled) -> None:
    """A resync that fails in its turn is done again only after the next
    wait: a callback that always raises does not make the poller spin."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    calls: list[int] = []

    def broken(port: int) -> None:
        calls.append(port)
        raise RuntimeError("a bug")

    dispatcher.bind_interdomain(guest.domid, remote, broken)
    evtchn.notify(remote)
    assert dispatcher.poll(TIMEOUT) == 1  # failed
    assert dispatcher.poll(TIMEOUT) == 1  # the resync, at once; failed again
    assert len(calls) == 2
    start = time.monotonic()
    assert dispatcher.poll(0.2) == 1  # waited for nothing, then resynced
    assert time.monotonic() - start >= 0.2
    assert len(calls) == 3


def test_a_resync_leaves_a_oneshot_fd_to_its_owner(polled) -> None:
    """A ONESHOT fd whose callback took its event is its owner's until
    modify_fd re-arms it: a resync that another callback's failure set
    off does not call it again meanwhile.  Re-armed, it is epoll's."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    _, failed = _failing_first(dispatcher, remote, guest)
    r, w = os.pipe()
    oneshot = select.EPOLLIN | select.EPOLLONESHOT
    calls: list[int] = []
    try:
        dispatcher.add_fd(r, oneshot, lambda _fd, revents: calls.append(revents))
        os.write(w, b"x")  # never read: readable throughout
        assert dispatcher.poll(TIMEOUT) == 1
        assert calls == [select.EPOLLIN]  # taken: disarmed until re-armed
        evtchn.notify(remote)
        assert dispatcher.poll(TIMEOUT) == 1  # the port's callback raised
        assert dispatcher.poll(TIMEOUT) == 1  # the resync: the port alone
        assert dispatcher.poll(0) == 0  # nor did the resync re-arm the fd
        assert len(failed) == 2 and calls == [select.EPOLLIN]
        dispatcher.modify_fd(r, oneshot)
        assert dispatcher.poll(TIMEOUT) == 1
        assert calls == [select.EPOLLIN, select.EPOLLIN]
    finally:
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


def test_a_resync_calls_an_armed_oneshot_fd_once(polled) -> None:
    """A ONESHOT fd still armed is epoll's to report: a resync that
    called it as well would call it twice for one arming."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    _, failed = _failing_first(dispatcher, remote, guest)
    r, w = os.pipe()
    calls: list[int] = []
    try:
        dispatcher.add_fd(r, select.EPOLLIN | select.EPOLLONESHOT,
                          lambda _fd, revents: calls.append(revents))
        evtchn.notify(remote)
        assert dispatcher.poll(TIMEOUT) == 1  # the port's callback raised
        os.write(w, b"x")  # never read: readable throughout
        dispatcher.poll(TIMEOUT)  # the resync
        dispatcher.poll(0)
        assert dispatcher.poll(0) == 0
        assert len(failed) == 2 and calls == [select.EPOLLIN]
    finally:
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


def _fd_callback_failing_once() -> tuple[Callable[[int, int], None], list[int]]:
    """An fd callback that raises at its first call, and the list of the
    events it was called with."""
    calls: list[int] = []

    def once(_fd: int, revents: int) -> None:
        calls.append(revents)
        if len(calls) == 1:
            raise RuntimeError("a bug")

    return once, calls


def test_a_resync_hands_out_again_what_a_oneshot_callback_lost(polled) -> None:
    """A ONESHOT fd's callback that raised lost its event, and nobody
    will re-arm the fd: a resync hands the event out again, once."""
    _, _, dispatcher = polled
    r, w = os.pipe()
    once, calls = _fd_callback_failing_once()

    try:
        dispatcher.add_fd(r, select.EPOLLIN | select.EPOLLONESHOT, once)
        os.write(w, b"x")  # never read: readable throughout
        assert dispatcher.poll(TIMEOUT) == 1  # raised
        dispatcher.poll(TIMEOUT)  # the resync
        dispatcher.poll(0)
        assert calls == [select.EPOLLIN, select.EPOLLIN]
        assert dispatcher.poll(0) == 0  # taken: its owner's until re-armed
        assert len(calls) == 2
    finally:
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_a_port_callback_interrupted_is_no_longer_running(polled, interrupt) -> None:
    """A port's callback that leaves by a BaseException (Ctrl-C in the
    thread that polls) has returned: unbind() waits for it no more, as
    for an fd's; the owner may well be cleaning up after the Ctrl-C."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)

    def interrupted(port: int) -> None:
        raise interrupt

    local = dispatcher.bind_interdomain(guest.domid, remote, interrupted)
    evtchn.notify(remote)
    with pytest.raises(interrupt):
        dispatcher.poll(TIMEOUT)
    unbinder = threading.Thread(target=dispatcher.unbind, args=(local,), daemon=True)
    unbinder.start()
    unbinder.join(TIMEOUT)
    stuck = unbinder.is_alive()
    if stuck:  # free it, then fail
        with dispatcher._lock:
            dispatcher._running = None
            dispatcher._idle.notify_all()
        unbinder.join(TIMEOUT)
    assert not stuck, "unbind() waited for a callback that had returned"
    assert dispatcher.ports == []


def _unmask_failing_once(dispatcher: EventDispatcher,
                         monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the handle's next unmask() of ``dispatcher`` fail, as a dead
    handle's would, and the later ones work; the list of the port it
    failed for."""
    unmask = dispatcher._evtchn.unmask
    failed: list[int] = []

    def failing_once(port: int) -> None:
        if not failed:
            failed.append(port)
            raise OSError(5, "the handle failed")
        unmask(port)

    monkeypatch.setattr(dispatcher._evtchn, "unmask", failing_once)
    return failed


def _ready_behind_a_failing_unmask(dispatcher: EventDispatcher, evtchn: Any, remote: int,
                                   monkeypatch: pytest.MonkeyPatch,
                                   arm: Callable[[], object]) -> None:
    """Signal ``remote``'s port of ``dispatcher`` with the handle's next
    unmask failing, and ``arm()`` an fd, ready, behind it: the poll that
    takes the port fails on its unmask before the fd is reached (the next
    poll's resync hands it out)."""
    failed = _unmask_failing_once(dispatcher, monkeypatch)
    evtchn.notify(remote)
    assert select.select([dispatcher._evtchn_fd], [], [], TIMEOUT)[0]
    arm()  # ready behind the port
    with pytest.raises(OSError):
        dispatcher.poll(TIMEOUT)  # the port's unmask: the fd is not reached
    assert failed


def test_a_oneshot_fd_re_armed_and_lost_is_handed_out_again(polled, monkeypatch) -> None:
    """Re-armed, a ONESHOT fd is no longer its owner's: an event of it
    that a failed dispatch lost (reported, so disarmed, but its callback
    never called) is handed out again."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: None)
    r, w = os.pipe()
    oneshot = select.EPOLLIN | select.EPOLLONESHOT
    calls: list[int] = []

    try:
        dispatcher.add_fd(r, oneshot, lambda _fd, revents: calls.append(revents))
        os.write(w, b"x")  # never read: readable throughout
        assert dispatcher.poll(TIMEOUT) == 1
        dispatcher.modify_fd(r, 0)  # re-armed, but for nothing yet
        _ready_behind_a_failing_unmask(dispatcher, evtchn, remote, monkeypatch,
                                       lambda: dispatcher.modify_fd(r, oneshot))
        assert calls == [select.EPOLLIN]
        dispatcher.poll(TIMEOUT)  # the resync
        dispatcher.poll(0)
        assert calls == [select.EPOLLIN, select.EPOLLIN]
    finally:
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


def _failing_first(dispatcher: EventDispatcher, remote: int, guest: Any,
                   *raising: BaseException | type[BaseException]) -> tuple[int, list[int]]:
    """A port of ``dispatcher`` bound to ``remote``, whose callback raises
    at its first calls (its n-th call the n-th of ``raising``; by default
    a bug, RuntimeError, at its first) and goes well after them, and the
    list of the ports it was called for."""
    failures = raising or (RuntimeError("a bug"),)
    calls: list[int] = []

    def broken(port: int) -> None:
        calls.append(port)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]

    return dispatcher.bind_interdomain(guest.domid, remote, broken), calls


def test_a_resync_watches_an_fd_for_its_mask_as_modified(polled) -> None:
    """A resync hands a level-triggered fd out again with its readiness
    for the events of its latest modify_fd, not those it was added with."""
    _, _, dispatcher = polled
    r, w = os.pipe()
    once, calls = _fd_callback_failing_once()

    try:
        dispatcher.add_fd(w, select.EPOLLIN, once)  # a pipe's write end: never readable
        dispatcher.modify_fd(w, select.EPOLLOUT | select.EPOLLET)
        assert dispatcher.poll(TIMEOUT) == 1  # raised
        assert dispatcher.poll(TIMEOUT) == 1  # the resync: writable still
        assert calls == [select.EPOLLOUT, select.POLLOUT]
    finally:
        dispatcher.remove_fd(w)
        os.close(r)
        os.close(w)


def test_a_oneshot_fd_removed_and_added_again_is_not_its_owners(polled, monkeypatch) -> None:
    """A ONESHOT fd its callback took, removed and then added again, is
    armed: an event of it that a failed dispatch lost is handed out
    again, as any armed fd's."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: None)
    r, w = os.pipe()
    oneshot = select.EPOLLIN | select.EPOLLONESHOT
    calls: list[int] = []

    def record(_fd: int, revents: int) -> None:
        calls.append(revents)

    try:
        dispatcher.add_fd(r, oneshot, record)
        os.write(w, b"x")  # never read: readable throughout
        assert dispatcher.poll(TIMEOUT) == 1  # taken
        dispatcher.remove_fd(r)
        _ready_behind_a_failing_unmask(dispatcher, evtchn, remote, monkeypatch,
                                       lambda: dispatcher.add_fd(r, oneshot, record))
        assert calls == [select.EPOLLIN]
        dispatcher.poll(TIMEOUT)  # the resync
        dispatcher.poll(0)
        assert calls == [select.EPOLLIN, select.EPOLLIN]
    finally:
        monkeypatch.undo()
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


def test_a_resync_leaves_a_removed_fd_alone(polled, caplog) -> None:
    """A ONESHOT fd removed is no longer re-armed by a resync (which
    failed, and was done again after every wait, logging each time)."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    _, failed = _failing_first(dispatcher, remote, guest)
    r, w = os.pipe()
    try:
        dispatcher.add_fd(r, select.EPOLLIN | select.EPOLLONESHOT, lambda _fd, _ev: None)
        dispatcher.remove_fd(r)
        evtchn.notify(remote)
        assert dispatcher.poll(TIMEOUT) == 1  # raised
        assert dispatcher.poll(TIMEOUT) == 1  # the resync
        assert len(failed) == 2
        assert dispatcher.poll(0) == 0  # and no resync after the wait
        assert "re-arming failed" not in caplog.text
    finally:
        os.close(r)
        os.close(w)


def test_a_port_interrupted_is_what_poll_raises_if_its_unmask_would_fail(
        polled, monkeypatch) -> None:
    """A Ctrl-C in a port's callback leaves the port masked, for the
    resync to unmask: an unmask failing meanwhile (a dead handle) must
    not replace the Ctrl-C."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)

    def interrupted(_port: int) -> None:
        raise KeyboardInterrupt

    def dead(_port: int) -> None:
        raise OSError(5, "the handle failed")

    dispatcher.bind_interdomain(guest.domid, remote, interrupted)
    monkeypatch.setattr(dispatcher._evtchn, "unmask", dead)
    evtchn.notify(remote)
    with pytest.raises(KeyboardInterrupt):
        dispatcher.poll(TIMEOUT)


def test_a_resync_whose_unmask_failed_is_done_again_after_the_wait(
        polled, monkeypatch) -> None:
    """A port the resync could not unmask is masked still: the resync is
    done again after the next wait, or nothing of the port came again."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    calls: list[int] = []
    local = dispatcher.bind_interdomain(guest.domid, remote, calls.append)
    unmask = dispatcher._evtchn.unmask
    failures = [OSError(5, "the handle failed")] * 2

    def failing_twice(port: int) -> None:
        if failures:
            raise failures.pop()
        unmask(port)

    monkeypatch.setattr(dispatcher._evtchn, "unmask", failing_twice)
    evtchn.notify(remote)
    with pytest.raises(OSError):
        dispatcher.poll(TIMEOUT)  # the unmask after the callback
    dispatcher.poll(TIMEOUT)  # the resync, whose unmask failed
    assert calls == [local] * 2
    dispatcher.poll(0)  # after the wait: the resync again
    assert calls == [local] * 3
    evtchn.notify(remote)
    assert dispatcher.poll(TIMEOUT) == 1  # unmasked: delivered
    assert calls == [local] * 4


class _FailingModify:
    """Stands in for a dispatcher's epoll object, whose modify() fails
    ``count`` times."""

    def __init__(self, real: Any, count: int) -> None:
        self._real = real
        self.count = count

    def modify(self, fd: int, events: int) -> None:
        if self.count:
            self.count -= 1
            raise OSError(12, "Cannot allocate memory")
        self._real.modify(fd, events)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_a_oneshot_fd_the_resync_could_not_re_arm_is_re_armed_later(
        polled, monkeypatch, caplog) -> None:
    """Re-arming a ONESHOT fd whose event was lost can fail: logged, and
    done again after the next wait, or the fd is never reported again."""
    _, _, dispatcher = polled
    r, w = os.pipe()
    once, calls = _fd_callback_failing_once()

    try:
        dispatcher.add_fd(r, select.EPOLLIN | select.EPOLLONESHOT, once)
        os.write(w, b"x")  # never read: readable throughout
        assert dispatcher.poll(TIMEOUT) == 1  # raised: the event lost
        monkeypatch.setattr(dispatcher, "_epoll", _FailingModify(dispatcher._epoll, 1))
        assert dispatcher.poll(TIMEOUT) == 0  # the resync, whose re-arming failed
        assert f"fd {r}: re-arming failed" in caplog.text
        dispatcher.poll(0)  # after the wait: the resync again, which re-arms
        dispatcher.poll(0)
        assert calls == [select.EPOLLIN, select.EPOLLIN]
    finally:
        monkeypatch.undo()
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


def test_poll_counts_every_callback_a_resync_ran_and_no_other(polled, monkeypatch) -> None:
    """poll() returns how many callbacks ran, also in a resync: a port's
    whose unmask failed afterwards ran (it was not counted), a ONESHOT
    fd's re-armed rather than called did not, nor a port's unbound."""
    guest, evtchn, dispatcher = polled
    calls: list[object] = []
    remotes = [evtchn.bind_unbound_port(0) for _ in range(3)]
    ports = [dispatcher.bind_interdomain(guest.domid, remote, calls.append)
             for remote in remotes]
    r, w = os.pipe()
    r1, w1 = os.pipe()
    unmask = dispatcher._evtchn.unmask
    failing: list[int] = []  # the ports whose next unmask fails

    def unmask_failing(port: int) -> None:
        if port in failing:
            failing.remove(port)
            raise OSError(5, "the handle failed")
        unmask(port)

    def ran(call: Callable[[], int]) -> tuple[int, int]:
        before = len(calls)
        return call(), len(calls) - before

    monkeypatch.setattr(dispatcher._evtchn, "unmask", unmask_failing)
    try:
        dispatcher.add_fd(r, select.EPOLLIN, lambda fd, _revents: calls.append(fd))
        dispatcher.add_fd(r1, select.EPOLLIN | select.EPOLLONESHOT,
                          lambda fd, _revents: calls.append(fd))
        os.write(w, b"x")  # never read: readable throughout
        assert ran(lambda: dispatcher.poll(TIMEOUT)) == (1, 1)  # the level fd
        dispatcher.unbind(ports[2])
        failing[:] = [ports[0], ports[0]]  # after the event, and in the resync
        evtchn.notify(remotes[0])
        assert select.select([dispatcher._evtchn_fd], [], [], TIMEOUT)[0]
        with pytest.raises(OSError):
            dispatcher.poll(0)
        # The resync: both ports (the first one's unmask failing again)
        # and the level fd; the ONESHOT fd, not ready, is re-armed only.
        count, really = ran(lambda: dispatcher.poll(0))
        assert really == 3 and count == really
        # After the wait: the resync again, and the level fd as ready.
        count, really = ran(lambda: dispatcher.poll(0))
        assert really == 4 and count == really
        os.read(r, 1)
        assert ran(lambda: dispatcher.poll(0)) == (0, 0)
    finally:
        dispatcher.remove_fd(r)
        dispatcher.remove_fd(r1)
        for fd in (r, w, r1, w1):
            os.close(fd)


@pytest.mark.parametrize("timeout", [None, TIMEOUT])
def test_a_pending_failing_at_every_call_is_left_out_of_the_wait_for_a_while(
        polled, monkeypatch, timeout) -> None:
    """A handle whose pending() raises at every call keeps its descriptor
    readable: each poll failed at once, or handed every event out, and
    the poller's worker spun.  After a second failure in a row the
    handle is left out of the wait for a delay (doubled at each failure
    in a row): polls meanwhile serve the rest and return at its end."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    calls: list[int] = []
    local = dispatcher.bind_interdomain(guest.domid, remote, calls.append)
    real = dispatcher._evtchn.pending
    asked: list[int | None] = []
    broken = True

    def pending() -> int | None:
        if broken:
            asked.append(None)
            raise RuntimeError("a bug in the handle")
        port = real()
        asked.append(port)
        return port

    monkeypatch.setattr(dispatcher._evtchn, "pending", pending)
    # A back-off that outlasts the steps below on a loaded machine (the
    # first one, 10 ms, may be over before the poll that must not ask),
    # and still ends the poll that waits for it well within its timeout.
    monkeypatch.setattr(events, "_BACKOFF_FIRST", TIMEOUT / 10)
    monkeypatch.setattr(events, "_BACKOFF_MAX", TIMEOUT / 10)
    evtchn.notify(remote)  # never taken while the bug lasts: readable for good
    with pytest.raises(RuntimeError):
        dispatcher.poll(TIMEOUT)
    assert dispatcher.poll(TIMEOUT) == 1  # the resync, at once
    with pytest.raises(RuntimeError):
        dispatcher.poll(TIMEOUT)  # a failure in a row: backing off
    assert dispatcher.poll(TIMEOUT) == 1  # the resync, at once
    assert len(asked) == 2
    assert dispatcher.poll(0) == 0  # the handle is not asked meanwhile
    # Returns as the delay ends, with nothing to wait for, its own
    # timeout (if any) longer.
    start = time.monotonic()
    assert dispatcher.poll(timeout) == 0
    assert time.monotonic() - start < TIMEOUT / 2, "the back-off did not end the poll"
    assert len(asked) == 2
    broken = False
    assert dispatcher.poll(TIMEOUT) == 1  # watched and asked again: the port
    assert asked == [None, None, local] and calls == [local] * 3
    evtchn.notify(remote)
    assert dispatcher.poll(TIMEOUT) == 1
    assert asked[-1] == local and len(calls) == 4


def test_failures_with_a_round_gone_well_between_them_do_not_back_off(
        polled, monkeypatch) -> None:
    """Backing off is for a failure that stays: a round that waited with
    the handle watched and went well forgets the failures before it, so
    a failure now and then never leaves the handle out of the wait."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    calls: list[int] = []
    local = dispatcher.bind_interdomain(guest.domid, remote, calls.append)
    real = dispatcher._evtchn.pending
    fail = [False]

    def pending() -> int | None:
        if fail[0]:
            fail[0] = False
            raise RuntimeError("a bug in the handle, now and then")
        return real()

    monkeypatch.setattr(dispatcher._evtchn, "pending", pending)
    for n in range(3):
        fail[0] = True
        evtchn.notify(remote)
        with pytest.raises(RuntimeError):
            dispatcher.poll(TIMEOUT)
        assert dispatcher.poll(TIMEOUT) == 1  # the resync, at once
        # The port, still queued in the handle: watched, not backed off.
        assert dispatcher.poll(TIMEOUT) == 1, f"backed off after failure {n + 1}"
        assert calls == [local] * 2 * (n + 1)
    assert dispatcher._handle_back is None


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_a_port_callback_interrupted_is_handed_out_again_at_once(polled, interrupt) -> None:
    """A port whose callback a Ctrl-C cut short stays masked (an unmask
    that failed would hide the interrupt): the next poll hands every
    event out again, before it waits, and so unmasks it."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    local, calls = _failing_first(dispatcher, remote, guest, interrupt)
    evtchn.notify(remote)
    with pytest.raises(interrupt):
        dispatcher.poll(TIMEOUT)
    assert dispatcher.poll(0) == 1 and calls == [local, local], "not handed out again"
    evtchn.notify(remote)
    assert dispatcher.poll(TIMEOUT) == 1 and calls == [local] * 3, "left masked"


def test_a_resync_interrupted_is_done_again_after_the_wait(polled, monkeypatch) -> None:
    """A hand-out that a Ctrl-C in a callback cut short failed in its
    turn: as one that raised, it is done again after the next wait, not
    at once."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    local, calls = _failing_first(dispatcher, remote, guest, RuntimeError("a bug"),
                                  KeyboardInterrupt)
    evtchn.notify(remote)
    assert dispatcher.poll(TIMEOUT) == 1  # logged, and lost
    epoll = epoll_waits(monkeypatch, dispatcher)
    with pytest.raises(KeyboardInterrupt):
        dispatcher.poll(TIMEOUT)  # the resync, at once
    assert epoll.waits == []
    assert dispatcher.poll(0) == 1 and calls == [local] * 3
    assert len(epoll.waits) == 1, "the interrupted resync was done again before the wait"


def _overflowing_after_every_reset(monkeypatch: pytest.MonkeyPatch,
                                   dispatcher: EventDispatcher) -> list[int]:
    """Have the dispatcher's simulated handle overflow now, and again as
    soon as each reset has emptied its queue while the list returned
    holds a true first item (clear it to stop).  Counts the resets in
    its second item."""
    handle = dispatcher._evtchn
    real = handle.reset
    state = [1, 0]

    def reset() -> None:
        real()
        state[1] += 1
        if state[0]:
            handle.overflow()

    monkeypatch.setattr(handle, "reset", reset)
    handle.overflow()
    return state


def test_polls_of_a_handle_overflowing_after_every_reset_back_off(
        polled, monkeypatch) -> None:
    """A handle whose queue overflows again at once after each reset had
    every poll that waited reset it (and the next hand every port out
    again): a poller's worker spinning.  An overflow before a read or a
    wait found the queue empty since the reset is a failure: the poll
    raises it, and a second one backs off as any failure does (here for
    longer than the test).  Counted over a window of fd events."""
    monkeypatch.setattr(events, "_BACKOFF_FIRST", 3600.0)
    monkeypatch.setattr(events, "_BACKOFF_MAX", 3600.0)
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: None)
    r, w = os.pipe2(os.O_NONBLOCK)
    served: list[bytes] = []

    def drain(fd: int, _events: int) -> None:
        try:
            served.append(os.read(fd, 1))
        except BlockingIOError:
            pass  # a resync's call

    dispatcher.add_fd(r, select.EPOLLIN, drain)
    try:
        state = _overflowing_after_every_reset(monkeypatch, dispatcher)
        raised: list[OSError] = []
        for i in range(50):
            os.write(w, b"x")
            for _ in range(4):  # a reset, a hand-out, then the fd at the latest
                try:
                    dispatcher.poll(TIMEOUT)
                except OSError as exc:
                    raised.append(exc)
                if len(served) > i:
                    break
            assert len(served) == i + 1, "the fd went unserved"
        assert state[1] <= 3, "every poll resets the handle"
        assert raised and all(exc.errno == errno.EFBIG for exc in raised)
    finally:
        dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)


def test_a_poll_that_found_the_handle_not_ready_clears_its_overflows(
        polled, monkeypatch) -> None:
    """A poller takes one port per poll, and so seldom reads the queue
    empty: a wait that found the handle not ready says as much.  Then an
    overflow is reset again and raises nothing, also after earlier ones."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    calls: list[int] = []
    local = dispatcher.bind_interdomain(guest.domid, remote, calls.append)
    for _ in range(3):
        dispatcher._evtchn.overflow()
        assert dispatcher.poll(TIMEOUT) == 0  # reset
        assert dispatcher.poll(TIMEOUT) == 1  # the hand-out again
        evtchn.notify(remote)
        assert dispatcher.poll(TIMEOUT) == 1  # the port, taken
        assert dispatcher.poll(0) == 0  # the queue is empty
    assert calls == [local] * 6


def test_an_overflow_after_a_back_off_is_still_a_failure(polled) -> None:
    """Backing off, the handle is left out of the wait: a wait that could
    not see it has not found its queue empty.  A queue that overflows
    again at once after every reset is then still failing once the
    handle is watched again, and backs off again, rather than being
    reset quietly as a first overflow every other time."""
    _guest, _evtchn, dispatcher = polled
    outcomes: list[str] = []

    def poll() -> None:
        try:
            dispatcher.poll(TIMEOUT)
        except OSError as exc:
            assert exc.errno == errno.EFBIG
            outcomes.append("failed")
        else:
            outcomes.append("ok")

    dispatcher._evtchn.overflow()
    poll()  # reset
    poll()  # the hand-out
    dispatcher._evtchn.overflow()  # again, before any read found it empty
    poll()  # a failure
    poll()  # the hand-out
    dispatcher._evtchn.overflow()
    poll()  # a failure again: the handle is left out of the wait
    assert dispatcher._handle_back is not None
    assert outcomes == ["ok", "ok", "failed", "ok", "failed"]
    dispatcher._evtchn.overflow()  # at once after that reset, again
    poll()  # the hand-out
    outcomes.clear()
    out_until = dispatcher._handle_back
    while dispatcher._handle_back == out_until:
        poll()  # waits out the back-off, the handle not watched; then watched
    assert outcomes[-1] == "failed" and set(outcomes[:-1]) <= {"ok"}


def test_a_oneshot_fd_whose_removal_failed_leaves_its_number_to_the_next(
        polled, monkeypatch) -> None:
    """A ONESHOT fd its callback took, whose remove_fd failed (epoll's
    unregister saying ENOENT: its owner closed it first, and another file
    took its number), is forgotten whole: the next fd of its number,
    added ONESHOT, is armed, and an event of it that a failed dispatch
    lost is handed out again.  Kept as taken, the new fd was left to an
    owner that never had it, and never watched again."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: None)
    oneshot = select.EPOLLIN | select.EPOLLONESHOT
    calls: list[int] = []

    def record(_fd: int, revents: int) -> None:
        calls.append(revents)

    r, w = os.pipe()
    os.write(w, b"x")  # never read: readable throughout
    dispatcher.add_fd(r, oneshot, record)
    assert dispatcher.poll(TIMEOUT) == 1  # taken
    # The owner's close and the next file at the number in one step: dup2
    # closes the pipe's end as it puts another pipe's there.  Closed and
    # opened again, the number could go to any thread's descriptor in
    # between (once in a loaded run: the new pipe got another number).
    r2, w2 = os.pipe()
    os.dup2(r2, r)
    os.close(r2)
    r2 = r
    os.close(w)
    try:
        with pytest.raises(OSError) as failed_removal:
            dispatcher.remove_fd(r)
        assert failed_removal.value.errno == errno.ENOENT
        os.write(w2, b"x")
        _ready_behind_a_failing_unmask(dispatcher, evtchn, remote, monkeypatch,
                                       lambda: dispatcher.add_fd(r2, oneshot, record))
        assert calls == [select.EPOLLIN]
        dispatcher.poll(TIMEOUT)  # the resync
        dispatcher.poll(0)
        assert calls == [select.EPOLLIN, select.EPOLLIN]
    finally:
        monkeypatch.undo()
        dispatcher.remove_fd(r2)
        os.close(r2)
        os.close(w2)


def test_a_taken_oneshot_fd_s_removal_interrupted_anywhere_leaves_it_not_taken(
        polled, monkeypatch) -> None:
    """A Ctrl-C landing as any call of a remove_fd of a ONESHOT fd its
    callback took returns, or as any of its frames starts: once removed
    (by that remove_fd or the one done again), the fd added again
    ONESHOT is armed, and an event of it that a failed dispatch lost is
    handed out again.  One landing as epoll's unregister returned had
    the fd unlisted but still taken, left alone by every resync.  Nor,
    listed still, is it re-armed by a resync meanwhile: it is its
    owner's until it is removed."""
    from tests.stolensignal import interrupted_at

    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    dispatcher.bind_interdomain(guest.domid, remote, lambda _port: None)
    other = evtchn.bind_unbound_port(0)
    within = os.path.dirname(events.__file__)
    oneshot = select.EPOLLIN | select.EPOLLONESHOT
    calls: list[int] = []

    def record(_fd: int, revents: int) -> None:
        calls.append(revents)

    failing: list[int] = []

    def fail(port: int) -> None:
        failing.append(port)
        if len(failing) % 2:
            raise RuntimeError("a bug")  # every other call: a resync each

    dispatcher.bind_interdomain(guest.domid, other, fail)
    r, w = os.pipe()
    os.write(w, b"x")  # never read: readable throughout
    landed = 0
    try:
        for n in itertools.count():
            dispatcher.add_fd(r, oneshot, record)
            assert dispatcher.poll(TIMEOUT) == 1  # taken
            calls.clear()
            where = interrupted_at(n, within, lambda: dispatcher.remove_fd(r))
            evtchn.notify(other)
            assert dispatcher.poll(TIMEOUT) == 1  # its callback raised
            dispatcher.poll(TIMEOUT)  # the resync
            dispatcher.poll(0)
            assert not calls, where
            with contextlib.suppress(KeyError):
                dispatcher.remove_fd(r)
            calls.clear()
            _ready_behind_a_failing_unmask(dispatcher, evtchn, remote, monkeypatch,
                                           lambda: dispatcher.add_fd(r, oneshot, record))
            assert not calls, where
            dispatcher.poll(TIMEOUT)  # the resync
            dispatcher.poll(0)
            assert calls == [select.EPOLLIN], where
            monkeypatch.undo()
            dispatcher.remove_fd(r)
            calls.clear()
            if not where:
                break
            landed += 1
    finally:
        monkeypatch.undo()
        with contextlib.suppress(KeyError):
            dispatcher.remove_fd(r)
        os.close(r)
        os.close(w)
    assert landed >= 3


def test_an_fd_epoll_refused_leaves_nothing_for_a_resync(polled, caplog) -> None:
    """An add_fd that epoll's register refused (a regular file: EPERM)
    leaves nothing of the fd: a resync after it re-arms no such fd (which
    would fail, be logged, and have every wake-up resync again)."""
    guest, evtchn, dispatcher = polled
    remote = evtchn.bind_unbound_port(0)
    _, failed = _failing_first(dispatcher, remote, guest)
    with open(__file__) as f:
        with pytest.raises(PermissionError):
            dispatcher.add_fd(f.fileno(), select.EPOLLIN | select.EPOLLONESHOT,
                              lambda _fd, _events: None)
        evtchn.notify(remote)
        assert dispatcher.poll(TIMEOUT) == 1  # the port's callback raised
        assert dispatcher.poll(TIMEOUT) == 1  # the resync: the port alone
        assert dispatcher.poll(0) == 0  # and no resync again
    assert len(failed) == 2
    assert not [r for r in caplog.records if "re-arming failed" in r.getMessage()]
