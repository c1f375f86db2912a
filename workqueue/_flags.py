"""Workqueue flags and limits, named and valued as in include/linux/workqueue.h."""

from __future__ import annotations

import enum

__all__ = [
    "WQFlags", "WQ_UNBOUND", "WQ_FREEZABLE", "WQ_MEM_RECLAIM", "WQ_HIGHPRI",
    "WQ_CPU_INTENSIVE", "WQ_MAX_ACTIVE", "WQ_DFL_ACTIVE",
]


class WQFlags(enum.IntFlag):
    """Flags for alloc_workqueue()."""

    WQ_UNBOUND = 1 << 1
    """Not bound to any CPU: one pool for the whole topology, not concurrency-managed."""
    WQ_FREEZABLE = 1 << 2
    """Takes part in freeze()/thaw()."""
    WQ_MEM_RECLAIM = 1 << 3
    """Has a rescuer thread, so it makes progress even when no worker can be created."""
    WQ_HIGHPRI = 1 << 4
    """Served by the high-priority pools."""
    WQ_CPU_INTENSIVE = 1 << 5
    """Its items do not count toward concurrency management: they never hold others back."""

    # Internal: alloc_ordered_workqueue() sets it.
    _WQ_ORDERED = 1 << 17


WQ_UNBOUND = WQFlags.WQ_UNBOUND
WQ_FREEZABLE = WQFlags.WQ_FREEZABLE
WQ_MEM_RECLAIM = WQFlags.WQ_MEM_RECLAIM
WQ_HIGHPRI = WQFlags.WQ_HIGHPRI
WQ_CPU_INTENSIVE = WQFlags.WQ_CPU_INTENSIVE
WQ_ORDERED = WQFlags._WQ_ORDERED

#: The public flags alloc_workqueue() accepts.
WQ_USER_FLAGS = WQ_UNBOUND | WQ_FREEZABLE | WQ_MEM_RECLAIM | WQ_HIGHPRI | WQ_CPU_INTENSIVE

#: Upper limit of max_active.
WQ_MAX_ACTIVE = 512
#: The max_active that 0 ("default") stands for.
WQ_DFL_ACTIVE = WQ_MAX_ACTIVE // 2
