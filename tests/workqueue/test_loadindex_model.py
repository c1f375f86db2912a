"""LoadIndex against a reference model (hypothesis, stateful).

The model places every key on the least-loaded online CPU (lowest number on
a tie), moves the keys of a CPU going down heaviest first (assignment order
among equals), each onto the then least-loaded CPU, and moves nothing back
when a CPU comes up.  Checked after every step: every key's CPU, each CPU's
keys in order, the loads, the statistics, the on_move calls; and the
evenness promises: while only keys of weight 1 are added and CPUs only go
down, the loads of any two online CPUs differ by at most one; in general an
assign() or a cpu_down() never widens the spread beyond max(spread before,
largest weight).
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from workqueue import LoadIndex, Topology

NCPUS = 4


class LoadIndexModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.topo = Topology(NCPUS)
        self.moves: list[tuple[object, int, int]] = []
        self.index = LoadIndex(self.topo, on_move=lambda k, a, b: self.moves.append((k, a, b)))
        self.online = set(range(NCPUS))
        self.keys_on: dict[int, list[int]] = {cpu: [] for cpu in range(NCPUS)}
        self.weight: dict[int, int] = {}
        self.next_key = 0
        self.nr_moves = 0
        # Only weight-1 keys added and CPUs taken down since the start.
        self.only_adding = True

    def load(self, cpu: int) -> int:
        return sum(self.weight[k] for k in self.keys_on[cpu])

    def spread(self) -> int:
        loads = [self.load(cpu) for cpu in self.online]
        return max(loads) - min(loads)

    def least_loaded(self) -> int:
        return min(self.online, key=lambda cpu: (self.load(cpu), cpu))

    @rule(weight=st.sampled_from([1, 1, 1, 2, 5]))
    def assign(self, weight: int) -> None:
        before = self.spread()
        key = self.next_key
        self.next_key += 1
        expected = self.least_loaded()
        assert self.index.least_loaded() == expected
        assert self.index.assign(key, weight) == expected
        self.keys_on[expected].append(key)
        self.weight[key] = weight
        if weight != 1:
            self.only_adding = False
        assert self.spread() <= max(before, max(self.weight.values()))

    @precondition(lambda self: bool(self.weight))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.weight)))
        self.index.release(key)
        cpu = next(c for c, keys in self.keys_on.items() if key in keys)
        self.keys_on[cpu].remove(key)
        del self.weight[key]
        self.only_adding = False

    @rule(cpu=st.integers(0, NCPUS - 1))
    def cpu_down(self, cpu: int) -> None:
        if cpu not in self.online:
            self.topo.cpu_down(cpu)  # a no-op
            assert not self.moves
            return
        if len(self.online) == 1:
            return  # Topology refuses: test_hotplug covers it
        before = self.spread()
        self.topo.cpu_down(cpu)
        self.online.discard(cpu)
        # Heaviest first, assignment order among equals (a stable sort).
        keys = sorted(self.keys_on[cpu], key=lambda k: -self.weight[k])
        self.keys_on[cpu] = []
        expected = []
        for key in keys:
            target = self.least_loaded()
            self.keys_on[target].append(key)
            expected.append((key, cpu, target))
        assert self.moves == expected
        self.moves.clear()
        self.nr_moves += len(expected)
        if self.weight:
            assert self.spread() <= max(before, max(self.weight.values()))

    @rule(cpu=st.integers(0, NCPUS - 1))
    def cpu_up(self, cpu: int) -> None:
        self.topo.cpu_up(cpu)
        if cpu not in self.online:
            self.online.add(cpu)
            self.only_adding = False  # an empty CPU: the spread may grow
        assert not self.moves  # nothing moves back

    @invariant()
    def books_match(self) -> None:
        stats = self.index.statistics()
        assert stats.keys == len(self.weight) == len(self.index)
        assert stats.total_load == sum(self.weight.values())
        assert dict(stats.loads) == {cpu: self.load(cpu) for cpu in sorted(self.online)}
        assert stats.offline == tuple(sorted(set(range(NCPUS)) - self.online))
        assert stats.moves == self.nr_moves
        for cpu in range(NCPUS):
            assert self.index.keys_on(cpu) == self.keys_on[cpu]
            assert self.index.load(cpu) == self.load(cpu)
            for key in self.keys_on[cpu]:
                assert self.index.cpu_of(key) == cpu
        if self.only_adding:
            assert self.spread() <= 1, f"uneven: {dict(stats.loads)}"

    def teardown(self) -> None:
        self.index.close()


LoadIndexModel.TestCase.settings = settings(max_examples=100, stateful_step_count=40,
                                            deadline=None, derandomize=True)
test_loadindex_model = LoadIndexModel.TestCase
