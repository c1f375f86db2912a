"""Statistics and trace points.

The engine has the kernel's four workqueue trace points -- queue (queue_work
accepted an item), activate (the item entered its pool's worklist),
execute_start and execute_end.  Workqueue.stats() reports how often each
one fired, per pool_workqueue (queue and execute_start are counted as they
fire; activate and execute_end follow from those and the pwq's state, which
keeps two counter updates per item off the hot path), and each one calls
the workqueue's trace hooks if it has any:

    def hook(event: str, work: Work, cpu: int | None) -> None: ...
    wq.add_trace_hook(hook)

`cpu` is the CPU of the pool (None for an unbound pool).  Hooks run under
the engine lock, like tracepoints with interrupts off: they must be quick and
must not call into the workqueue.  What a hook raises, whatever it is, is
logged, and the engine goes on: in the main thread, that includes a Ctrl-C
that lands while a hook runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._pool import PoolWorkqueue

__all__ = ["PoolStats", "WorkqueueStats", "TraceHook", "TRACE_EVENTS"]

TraceHook = Callable[[str, Any, "int | None"], None]
#: The trace points' names, in the order in which one item meets them.
TRACE_EVENTS = ("queue", "activate", "execute_start", "execute_end")


@dataclass(frozen=True, slots=True)
class PoolStats:
    """One workqueue's use of one worker pool, and the pool's own gauges."""

    pool: str
    """Pool name: "cpu3", "cpu3H" (high priority), "unbound", "unboundH"."""
    cpu: int | None
    """The pool's CPU, None for an unbound pool."""
    bound: bool
    """False for unbound pools and for pools of an offline CPU."""
    queued: int
    """Items this workqueue queued here (trace point "queue")."""
    activated: int
    """Items that entered the worklist (trace point "activate")."""
    started: int
    """Items whose function started (trace point "execute_start")."""
    completed: int
    """Items whose function returned or raised (trace point "execute_end")."""
    failed: int
    """Items whose function raised (they are logged)."""
    cpu_intensive: int
    """Items that ran longer than the CPU-intensive threshold and stopped counting."""
    nr_active: int
    """This workqueue's items now on the worklist or running."""
    nr_inactive: int
    """This workqueue's items waiting for max_active."""
    max_active: int
    """The limit now in force (0 while frozen)."""
    nr_workers: int
    """Worker threads of the pool (shared with other workqueues)."""
    nr_idle: int
    """Idle workers of the pool."""
    nr_running: int
    """Workers counted by concurrency management right now."""

    @classmethod
    def of(cls, pwq: PoolWorkqueue, nr_running_items: int) -> PoolStats:
        """The snapshot of ``pwq`` (engine lock held), ``nr_running_items``
        of whose items are running now (started, not yet completed)."""
        pool = pwq.pool
        return cls(
            pool=pool.name, cpu=pool.cpu, bound=not pool.disassociated,
            queued=pwq.nr_queued, activated=pwq.activated, started=pwq.nr_started,
            completed=pwq.nr_started - nr_running_items, failed=pwq.nr_failed,
            cpu_intensive=pwq.nr_cpu_intensive, nr_active=pwq.nr_active,
            nr_inactive=pwq.inactive.nr, max_active=pwq.max_active,
            nr_workers=len(pool.workers), nr_idle=len(pool.idle), nr_running=pool.nr_running,
        )


@dataclass(frozen=True, slots=True)
class WorkqueueStats:
    """A consistent snapshot of a workqueue, taken under the engine lock."""

    name: str
    flags: int
    max_active: int
    pools: tuple[PoolStats, ...]

    @property
    def queued(self) -> int:
        """Items queued, all pools together."""
        return sum(p.queued for p in self.pools)

    @property
    def started(self) -> int:
        """Items whose function started, all pools together."""
        return sum(p.started for p in self.pools)

    @property
    def completed(self) -> int:
        """Items whose function returned or raised, all pools together."""
        return sum(p.completed for p in self.pools)

    @property
    def failed(self) -> int:
        """Items whose function raised, all pools together."""
        return sum(p.failed for p in self.pools)

    @property
    def in_flight(self) -> int:
        """Items queued and not yet completed: pending, waiting for
        max_active, or running."""
        return sum(p.nr_active + p.nr_inactive for p in self.pools)
