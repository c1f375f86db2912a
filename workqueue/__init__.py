"""Linux kernel workqueues on Python threads, usable as a concurrent.futures Executor.

    from workqueue import alloc_workqueue, Work

    wq = alloc_workqueue("events")
    w = Work(lambda work: print("ran", work))
    wq.queue_work(w)          # False if w is already pending
    w.flush()
    wq.destroy()

The semantics are the kernel's (Documentation/core-api/workqueue.rst):
per-CPU worker pools shared by all workqueues, concurrency management,
max_active, ordered queues, delayed work, flush/drain/destroy, cancel with
and without waiting, disable/enable, CPU hotplug, rescuers, freezing and a
watchdog.  A Workqueue is also an Executor (submit, map, shutdown), with a
lean Future.  See Workqueue, Work and Topology for the details.

The flags of alloc_workqueue() are ``WQ_UNBOUND``, ``WQ_HIGHPRI``,
``WQ_CPU_INTENSIVE``, ``WQ_FREEZABLE`` and ``WQ_MEM_RECLAIM`` (WQFlags);
``WQ_DFL_ACTIVE`` (256) is the max_active that 0 asks for, and
``WQ_MAX_ACTIVE`` (512) the largest.  ``TraceHook`` is the type of the
hooks of Workqueue.add_trace_hook(): hook(event, work, cpu), the event one
of ``TRACE_EVENTS``.
"""

from __future__ import annotations

from ._flags import (
    WQ_CPU_INTENSIVE,
    WQ_DFL_ACTIVE,
    WQ_FREEZABLE,
    WQ_HIGHPRI,
    WQ_MAX_ACTIVE,
    WQ_MEM_RECLAIM,
    WQ_UNBOUND,
    WQFlags,
)
from ._loadindex import LoadIndex, LoadIndexStats
from ._pool import blocking, current_work, current_workqueue, wait_slice
from ._serial import SerialExecutor
from ._shown import shown
from ._stats import TRACE_EVENTS, PoolStats, TraceHook, WorkqueueStats
from ._topology import Topology
from ._work import DelayedWork, Work
from ._workqueue import Workqueue, alloc_ordered_workqueue, alloc_workqueue, default_topology

__all__ = [
    "alloc_workqueue", "alloc_ordered_workqueue", "Work", "DelayedWork",
    "WQ_UNBOUND", "WQ_HIGHPRI", "WQ_CPU_INTENSIVE", "WQ_FREEZABLE", "WQ_MEM_RECLAIM",
    "Topology", "LoadIndex", "current_work",
    # Beyond the kernel's names:
    "Workqueue", "WQFlags", "WQ_MAX_ACTIVE", "WQ_DFL_ACTIVE", "blocking",
    "default_topology", "PoolStats", "WorkqueueStats", "LoadIndexStats", "TraceHook",
    "TRACE_EVENTS",
    "wait_slice", "SerialExecutor", "shown", "current_workqueue",
]
