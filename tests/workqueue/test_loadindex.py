"""LoadIndex: placement, errors, hotplug re-homing, evenness, threads."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from workqueue import LoadIndex, Topology


def spread(loads: dict[int, int]) -> int:
    return max(loads.values()) - min(loads.values())


# -- placement and errors -----------------------------------------------------


def test_assign_spreads_keys_round_robin_lowest_cpu_first() -> None:
    with LoadIndex(Topology(4)) as index:
        assert [index.assign(k) for k in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
        assert [index.load(cpu) for cpu in range(4)] == [2, 2, 2, 2]
        assert index.cpu_of(5) == 1
        assert len(index) == 8 and 5 in index and 8 not in index


def test_least_loaded_is_the_cpu_assign_picks_next() -> None:
    t = Topology(4)
    li = LoadIndex(t)
    for i in range(10):
        cpu = li.least_loaded()
        assert li.assign(i, weight=1 + i % 3) == cpu
    assert li.least_loaded() == min(t.online(), key=lambda c: (li.load(c), c))
    t.cpu_down(li.least_loaded())
    assert li.least_loaded() in t.online()
    before = li.statistics()
    li.least_loaded()
    assert li.statistics() == before  # it assigns nothing


def test_weights_count_toward_load() -> None:
    with LoadIndex(Topology(3)) as index:
        assert index.assign("big", weight=5) == 0
        assert index.assign("a") == 1
        assert index.assign("b") == 2
        assert index.assign("c", weight=2) == 1
        assert index.assign("d") == 2
        assert [index.load(c) for c in range(3)] == [5, 3, 2]
        assert index.weight_of("c") == 2
        index.release("big")
        assert index.load(0) == 0
        assert index.assign("e") == 0


def test_release_makes_room_on_that_cpu() -> None:
    with LoadIndex(Topology(3)) as index:
        for k in range(6):
            index.assign(k)
        index.release(4)  # was on CPU 1
        assert index.load(1) == 1
        assert index.assign("new") == 1


def test_unknown_keys_raise_key_error() -> None:
    with LoadIndex(Topology(2)) as index:
        index.assign("a")
        for op in (index.cpu_of, index.release, index.weight_of):
            with pytest.raises(KeyError) as caught:
                op("nope")
            assert caught.value.args == ("nope",)  # as a dict says it
        index.release("a")
        with pytest.raises(KeyError):
            index.release("a")


def test_duplicate_assign_is_a_clear_error() -> None:
    with LoadIndex(Topology(2)) as index:
        index.assign("a")
        with pytest.raises(ValueError, match="already assigned to CPU 0"):
            index.assign("a")
        assert index.load(0) == 1 and index.load(1) == 0


@pytest.mark.parametrize("weight", [0, -1])
def test_non_positive_weight_is_a_value_error(weight: int) -> None:
    with LoadIndex(Topology(2)) as index:
        with pytest.raises(ValueError, match="positive"):
            index.assign("a", weight=weight)
        assert "a" not in index


@pytest.mark.parametrize("weight", [1.5, "1", None, True])
def test_non_int_weight_is_a_type_error(weight: object) -> None:
    with LoadIndex(Topology(2)) as index:
        with pytest.raises(TypeError, match="weight must be an int"):
            index.assign("a", weight=weight)  # type: ignore[arg-type]


def test_unhashable_key_and_unknown_cpu() -> None:
    with LoadIndex(Topology(2)) as index:
        with pytest.raises(TypeError):
            index.assign(["a"])
        assert len(index) == 0
        for bad in (7, -1):
            with pytest.raises(ValueError, match="not a possible CPU"):
                index.load(bad)
            with pytest.raises(ValueError, match="not a possible CPU"):
                index.keys_on(bad)


def test_a_cpu_number_that_is_not_an_int_is_a_type_error_as_in_topology() -> None:
    # It was a ValueError ("'0' is not a possible CPU"), where Topology
    # and Workqueue.queue_work_on() say TypeError for the same CPU number.
    # True and 1.0 hash like CPU 1, and must not pass for it.
    topo = Topology(2)
    with LoadIndex(topo) as index:
        for bad in ("0", True, 1.0, None, [1]):
            kind = type(bad).__name__
            for call in (index.load, index.keys_on, topo.is_online):
                with pytest.raises(TypeError, match=rf"^a CPU number must be an int, not {kind}$"):
                    call(bad)  # type: ignore[arg-type]


def test_on_move_must_be_callable() -> None:
    with pytest.raises(TypeError, match="on_move must be callable"):
        LoadIndex(Topology(2), on_move="nope")  # type: ignore[arg-type]


def test_topology_must_be_one() -> None:
    for bad in ("x", None, 2):
        with pytest.raises(TypeError, match="topology must be a workqueue.Topology"):
            LoadIndex(bad)  # type: ignore[arg-type]


def test_the_topology_class_itself_is_refused_as_such() -> None:
    # LoadIndex(Topology), its parentheses forgotten, passed the check
    # (the class has the methods) and failed as "Topology.possible()
    # missing 1 required positional argument: 'self'".
    with pytest.raises(TypeError, match=r"^topology must be a workqueue.Topology, "
                                        r"not the class Topology$"):
        LoadIndex(Topology)  # type: ignore[arg-type]


def test_a_topology_that_cannot_unregister_is_refused_before_registering() -> None:
    """Without remove_hotplug_notifier() the index could never close():
    refused at once, and registered with nothing (its notifier would stay
    with the source for good)."""

    class NoRemove:
        def __init__(self) -> None:
            self.notifiers: list[Any] = []

        def possible(self) -> list[int]:
            return [0, 1]

        def online(self) -> list[int]:
            return [0, 1]

        def add_hotplug_notifier(self, fn: Any) -> None:
            self.notifiers.append(fn)

    source = NoRemove()
    with pytest.raises(TypeError, match="topology must be a workqueue.Topology, not NoRemove"):
        LoadIndex(source)  # type: ignore[arg-type]
    assert source.notifiers == []


def test_a_closed_index_still_names_a_wrong_argument() -> None:
    """A wrong key or weight is the caller's mistake whatever the index's
    state: it is named as such, not hidden behind "closed"."""
    index = LoadIndex(Topology(2))
    index.close()
    with pytest.raises(TypeError, match="unhashable"):
        index.assign(["a"])
    with pytest.raises(ValueError, match="positive"):
        index.assign("a", weight=0)
    with pytest.raises(RuntimeError, match="closed"):
        index.assign("a")


def test_repr_says_keys_and_state() -> None:
    index = LoadIndex(Topology(3))
    index.assign("a")
    assert repr(index) == "<LoadIndex 1 keys, 3 online CPUs>"
    index.close()
    assert repr(index) == "<LoadIndex 1 keys, closed>"


def test_sparse_cpu_numbers() -> None:
    with LoadIndex(Topology(cpus=[3, 5, 9])) as index:
        assert [index.assign(k) for k in range(4)] == [3, 5, 9, 3]
        with pytest.raises(ValueError):
            index.load(0)


def test_many_logical_cpus() -> None:
    # A 640-CPU dom0 on a small machine: placement stays exact and even.
    with LoadIndex(Topology(640)) as index:
        cpus = [index.assign(k) for k in range(640 * 5 + 17)]
        assert cpus[:640] == list(range(640))
        loads = index.statistics().loads
        assert spread(dict(loads)) == 1
        assert sum(loads.values()) == 640 * 5 + 17


# -- hotplug ------------------------------------------------------------------


def test_cpu_down_moves_keys_evenly_and_reports_each_move() -> None:
    topo = Topology(4)
    moves: list[tuple[Hashable, int, int]] = []
    with LoadIndex(topo, on_move=lambda k, old, new: moves.append((k, old, new))) as index:
        for k in range(12):
            index.assign(k)  # 3 keys per CPU
        on_cpu1 = index.keys_on(1)
        topo.cpu_down(1)
        # Synchronous: every move was reported before cpu_down returned.
        assert sorted(k for k, _, _ in moves) == sorted(on_cpu1)
        assert all(old == 1 and new in (0, 2, 3) for _, old, new in moves)
        assert len({new for _, _, new in moves}) == 3  # one to each remaining CPU
        assert [index.load(c) for c in range(4)] == [4, 0, 4, 4]
        for k, _, new in moves:
            assert index.cpu_of(k) == new
        assert index.statistics().moves == 3
        assert index.statistics().offline == (1,)


def test_cpu_down_moves_heaviest_first() -> None:
    topo = Topology(3)
    with LoadIndex(topo) as index:
        index.assign("x", weight=1)  # CPU 0
        index.assign("y", weight=1)  # CPU 1
        index.assign("z", weight=1)  # CPU 2
        index.assign("heavy", weight=4)  # CPU 0
        index.assign("light", weight=1)  # CPU 1
        topo.cpu_down(0)
        # heavy goes first to the lighter CPU 2, then x to CPU 1 or 2 (both 2 vs 5 -> CPU 1)
        assert index.cpu_of("heavy") == 2
        assert index.cpu_of("x") == 1
        assert [index.load(1), index.load(2)] == [3, 5]


def test_cpu_up_fills_the_new_cpu_first_without_moving_back() -> None:
    topo = Topology(3)
    topo.cpu_down(2)
    with LoadIndex(topo) as index:
        for k in range(4):
            index.assign(k)
        assert index.load(2) == 0
        topo.cpu_up(2)
        assert [index.cpu_of(k) for k in range(4)] == [0, 1, 0, 1]
        assert [index.assign(k) for k in range(4, 7)] == [2, 2, 0]


def test_on_move_may_call_back_into_the_index() -> None:
    topo = Topology(2)
    seen: list[int] = []
    index = LoadIndex(topo, on_move=lambda k, old, new: seen.append(index.cpu_of(k)))
    with index:
        index.assign("a")
        index.assign("b")
        topo.cpu_down(0)
        assert seen == [1]


def test_failing_on_move_is_logged_and_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    topo = Topology(2)
    moved: list[Hashable] = []

    def on_move(key: Hashable, old: int, new: int) -> None:
        moved.append(key)
        if key == 0:
            raise RuntimeError("owner bug")

    with LoadIndex(topo, on_move=on_move) as index:
        for k in range(4):
            index.assign(k)
        with caplog.at_level(logging.ERROR, logger="workqueue._loadindex"):
            topo.cpu_down(0)
        assert moved == [0, 2]
        assert "on_move(0, 0, 1) raised" in caplog.text
        assert index.load(1) == 4


def test_two_indexes_on_one_topology_both_rehome() -> None:
    topo = Topology(2)
    with LoadIndex(topo) as a, LoadIndex(topo) as b:
        a.assign("k")
        b.assign("k")
        topo.cpu_down(0)
        assert a.cpu_of("k") == b.cpu_of("k") == 1


def test_leaving_the_with_block_closes_the_index() -> None:
    topo = Topology(2)
    with LoadIndex(topo) as index:
        index.assign("a")
    assert topo._notifiers == []
    with pytest.raises(RuntimeError, match="closed"):
        index.assign("b")


def test_close_unregisters_and_refuses_new_keys() -> None:
    topo = Topology(2)
    moves: list[object] = []
    index = LoadIndex(topo, on_move=lambda *m: moves.append(m))
    index.assign("a")
    index.close()
    index.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        index.assign("b")
    topo.cpu_down(0)
    assert moves == []
    index.release("a")  # still allowed, so that owners can tear down
    assert len(index) == 0


class _HandDrivenHotplug:
    """What LoadIndex takes of a Topology, with hotplug events delivered by
    the test: one racing with close() (its notifier still registered), or
    one that a confused topology should never send."""

    def __init__(self, cpus: list[int]) -> None:
        self.cpus = cpus
        self.notifiers: list[Any] = []

    def possible(self) -> list[int]:
        return list(self.cpus)

    def online(self) -> list[int]:
        return list(self.cpus)

    def add_hotplug_notifier(self, fn: Any) -> None:
        self.notifiers.append(fn)

    def remove_hotplug_notifier(self, fn: Any) -> None:
        pass  # as if a cpu_down had already started to call it

    def send(self, cpu: int, online: bool) -> None:
        for fn in list(self.notifiers):
            fn(cpu, online)


def test_a_hotplug_event_racing_with_close_moves_nothing() -> None:
    source = _HandDrivenHotplug([0, 1])
    moves: list[object] = []
    index = LoadIndex(source, on_move=lambda *m: moves.append(m))
    assert index.assign("a") == 0
    index.close()
    source.send(0, False)
    assert moves == [] and index.cpu_of("a") == 0
    assert index.statistics().moves == 0


def test_a_down_event_for_a_cpu_already_offline_is_ignored() -> None:
    """As when the index read the online set after the CPU went and its
    notifier is then called for it (the race __init__ allows for)."""
    source = _HandDrivenHotplug([0, 1, 2])
    moves: list[object] = []
    index = LoadIndex(source, on_move=lambda *m: moves.append(m))
    for key in "abc":
        index.assign(key)
    source.send(2, False)
    assert moves == [("c", 2, 0)]
    source.send(2, False)
    assert moves == [("c", 2, 0)]
    assert index.statistics().offline == (2,)
    assert dict(index.statistics().loads) == {0: 2, 1: 1}


def test_hotplug_events_for_a_cpu_the_index_does_not_know_are_ignored() -> None:
    """A source that names a CPU outside the possible() it gave changes
    nothing: the index has no load or keys for it to place or move."""
    source = _HandDrivenHotplug([0, 1])
    index = LoadIndex(source)
    assert index.assign("a") == 0
    before = index.statistics()
    source.send(5, True)
    source.send(5, False)
    assert index.statistics() == before
    assert index.assign("b") == 1


def test_the_last_online_cpu_going_down_keeps_its_keys(caplog: pytest.LogCaptureFixture) -> None:
    """A topology never takes its last CPU down; told so all the same, the
    index keeps the keys where they are and says it disagrees."""
    source = _HandDrivenHotplug([0, 1])
    index = LoadIndex(source)
    assert index.assign("a") == 0
    source.send(1, False)
    assert index.cpu_of("a") == 0
    with caplog.at_level(logging.ERROR, logger="workqueue._loadindex"):
        source.send(0, False)
    assert "last online CPU" in caplog.text
    assert index.cpu_of("a") == 0 and index.least_loaded() == 0
    assert index.assign("b") == 0


def test_a_source_with_no_online_cpu_is_refused_and_keeps_no_notifier() -> None:
    """With no CPU online a key has nowhere to go: the making fails with
    ValueError, and takes back the notifier it had registered (the source
    would keep it, and the index, for good)."""

    class NoneOnline(_HandDrivenHotplug):
        def online(self) -> list[int]:
            return []

        def remove_hotplug_notifier(self, fn: Any) -> None:
            self.notifiers.remove(fn)

    source = NoneOnline([0, 1])
    with pytest.raises(ValueError, match="no online CPU"):
        LoadIndex(source)
    assert source.notifiers == []


def test_cpu_down_without_on_move_fails_no_notifier(caplog: pytest.LogCaptureFixture) -> None:
    """An index with no on_move has nobody to tell of its moves: a
    cpu_down() moves its keys and leaves nothing owed to tell, which the
    index's notifier would otherwise trip over at every later change."""
    topo = Topology(3)
    index = LoadIndex(topo)
    for key in range(6):
        index.assign(key)
    with caplog.at_level(logging.ERROR):
        topo.cpu_down(0)
        topo.cpu_up(0)
        topo.cpu_down(1)
    assert caplog.records == []
    assert not index._untold
    assert index.keys_on(1) == [] and index.statistics().moves == 5
    index.close()


def test_forgotten_index_is_not_kept_alive_by_the_topology() -> None:
    topo = Topology(2)
    index = LoadIndex(topo)
    index.assign("a")
    ref = weakref.ref(index)
    del index
    gc.collect()
    assert ref() is None
    topo.cpu_down(0)  # the stale notifier does nothing
    topo.cpu_up(0)


def test_statistics_is_a_frozen_snapshot() -> None:
    topo = Topology(3)
    with LoadIndex(topo) as index:
        index.assign("a", weight=2)
        index.assign("b")
        stats = index.statistics()
        index.assign("c")
        assert stats.keys == 2 and stats.total_load == 3
        assert dict(stats.loads) == {0: 2, 1: 1, 2: 0}
        with pytest.raises(AttributeError):
            stats.keys = 5  # type: ignore[misc]
        with pytest.raises(TypeError):
            stats.loads[0] = 9  # type: ignore[index]


def test_the_statistics_type_is_public_like_the_workqueues() -> None:
    # PoolStats and WorkqueueStats are importable from the package; so is
    # the type of LoadIndex.statistics(), for code that annotates with it.
    import workqueue

    assert "LoadIndexStats" in workqueue.__all__
    with LoadIndex(Topology(2)) as index:
        assert isinstance(index.statistics(), workqueue.LoadIndexStats)


def test_statistics_snapshots_hash_like_any_frozen_dataclass() -> None:
    # A frozen dataclass is hashable, and equal snapshots hash alike: they
    # can be kept in a set or used as a cache key, as Workqueue.stats() can.
    topo = Topology(2)
    with LoadIndex(topo) as index:
        index.assign("a")
        first, again = index.statistics(), index.statistics()
        index.assign("b")
        later = index.statistics()
        assert first == again and hash(first) == hash(again)
        assert len({first, again, later}) == 2


# -- threads ------------------------------------------------------------------


def test_concurrent_assign_release_and_hotplug_keep_the_books_straight() -> None:
    topo = Topology(4)
    moves: list[tuple[Hashable, int, int]] = []
    index = LoadIndex(topo, on_move=lambda k, o, n: moves.append((k, o, n)))
    nthreads, per_thread = 8, 400
    start = threading.Barrier(nthreads + 1)
    errors: list[BaseException] = []

    def producer(t: int) -> None:
        try:
            start.wait(timeout=10)
            for i in range(per_thread):
                index.assign((t, i), weight=1 + i % 3)
                if i % 4 == 3:
                    index.release((t, i - 1))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(nthreads)]
    for thread in threads:
        thread.start()
    start.wait(timeout=10)
    for round_ in range(30):
        cpu = round_ % 3 + 1
        topo.cpu_down(cpu)
        topo.cpu_up(cpu)
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    with index:
        expected = {
            (t, i): 1 + i % 3 for t in range(nthreads) for i in range(per_thread) if i % 4 != 2
        }
        assert len(index) == len(expected)
        loads = dict.fromkeys(range(4), 0)
        for key, weight in expected.items():
            assert index.weight_of(key) == weight
            loads[index.cpu_of(key)] += weight
        assert loads == {cpu: index.load(cpu) for cpu in range(4)}
        assert all(old != new for _, old, new in moves)


# -- the stateful property test -----------------------------------------------


class LoadIndexMachine(RuleBasedStateMachine):
    """Random assign/release/cpu_down/cpu_up against a tiny model.

    The model knows each key's CPU and weight; it does not re-implement the
    placement, it checks that every placement went to a least-loaded CPU and
    that the spread between CPUs behaves as LoadIndex promises.
    """

    keys = Bundle("keys")

    def __init__(self) -> None:
        super().__init__()
        self.topo: Topology | None = None
        self.index: LoadIndex | None = None
        self.model: dict[int, tuple[int, int]] = {}  # key -> (cpu, weight)
        self.online: set[int] = set()
        self.moves: list[tuple[Hashable, int, int]] = []
        self.next_key = 0
        self.only_added = True  # no release or cpu_up yet
        self.unit = True
        self.max_weight = 1

    @initialize(ncpus=st.integers(1, 6), unit=st.booleans())
    def setup(self, ncpus: int, unit: bool) -> None:
        self.topo = Topology(ncpus)
        self.index = LoadIndex(self.topo, on_move=lambda k, o, n: self.moves.append((k, o, n)))
        self.online = set(range(ncpus))
        self.unit = unit

    def loads(self) -> dict[int, int]:
        loads = dict.fromkeys(self.online, 0)
        for cpu, weight in self.model.values():
            loads[cpu] += weight
        return loads

    @rule(target=keys, weight=st.integers(1, 4))
    def assign(self, weight: int) -> int:
        assert self.index is not None
        if self.unit:
            weight = 1
        before = self.loads()
        key = self.next_key
        self.next_key += 1
        cpu = self.index.assign(key, weight=weight)
        least = min(before.values())
        assert cpu == min(c for c, load in before.items() if load == least)
        self.model[key] = (cpu, weight)
        self.max_weight = max(self.max_weight, weight)
        assert spread(self.loads()) <= max(spread(before), weight)
        return key

    @rule(key=consumes(keys))
    def release(self, key: int) -> None:
        assert self.index is not None
        self.index.release(key)
        del self.model[key]
        self.only_added = False
        with pytest.raises(KeyError):
            self.index.cpu_of(key)

    @precondition(lambda self: len(self.online) > 1)
    @rule(data=st.data())
    def cpu_down(self, data: st.DataObject) -> None:
        assert self.topo is not None
        cpu = data.draw(st.sampled_from(sorted(self.online)))
        victims = {k for k, (c, _) in self.model.items() if c == cpu}
        self.online.discard(cpu)
        before = dict.fromkeys(self.online, 0)
        for c, weight in self.model.values():
            if c != cpu:
                before[c] += weight
        self.moves.clear()
        self.topo.cpu_down(cpu)
        assert {k for k, _, _ in self.moves} == victims
        for key, old, new in self.moves:
            assert old == cpu and new in self.online
            self.model[key] = (new, self.model[key][1])  # type: ignore[index]
        largest = max((self.model[k][1] for k in victims), default=0)
        assert spread(self.loads()) <= max(spread(before), largest)

    @precondition(
        lambda self: self.topo is not None and len(self.online) < len(self.topo.possible())
    )
    @rule(data=st.data())
    def cpu_up(self, data: st.DataObject) -> None:
        assert self.topo is not None
        cpu = data.draw(st.sampled_from(sorted(set(self.topo.possible()) - self.online)))
        self.moves.clear()
        self.topo.cpu_up(cpu)
        self.online.add(cpu)
        assert self.moves == []
        self.only_added = False

    @invariant()
    def books_match_the_model(self) -> None:
        if self.index is None or self.topo is None:
            return
        loads = self.loads()
        for cpu in self.topo.possible():
            assert self.index.load(cpu) == loads.get(cpu, 0)
        for key, (cpu, weight) in self.model.items():
            assert self.index.cpu_of(key) == cpu
            assert self.index.weight_of(key) == weight
        stats = self.index.statistics()
        assert dict(stats.loads) == loads
        assert stats.keys == len(self.model)

    @invariant()
    def even_while_only_adding(self) -> None:
        if self.index is not None and self.unit and self.only_added:
            assert spread(self.loads()) <= 1

    def teardown(self) -> None:
        if self.index is not None:
            self.index.close()


LoadIndexMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_load_index_state_machine = LoadIndexMachine.TestCase
