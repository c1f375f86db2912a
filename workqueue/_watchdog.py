"""The lockup watchdog (the kernel's wq_watchdog), reduced to one promise.

A work item that runs longer than topology.watchdog_thresh seconds (default
30, like wq_watchdog_thresh) is reported once per stall, through logging at
WARNING, with a dump of its pool.  The check runs on the timer thread every
quarter threshold while any worker of the topology is busy, and sleeps
otherwise (a worker arms it when it starts an item).
"""

from __future__ import annotations

import logging
import time

from . import _pool
from ._timer import add_timer, timer_pending

__all__ = ["arm_watchdog"]

logger = logging.getLogger(__name__)


def arm_watchdog(pset: _pool.PoolSet) -> None:
    """Arm the check of *pset* (engine lock held)."""
    period = max(pset.topology.watchdog_thresh / 4, 0.005)
    pset.watchdog = add_timer(period, _watchdog_timer_fn, pset)


def _watchdog_timer_fn(pset: _pool.PoolSet) -> None:
    reports = []
    with _pool.lock:
        if timer_pending(pset.watchdog):
            # Superseded: armed again (PoolSet.rearm_checks) as we fired.
            return
        pset.watchdog = None
        thresh = pset.topology.watchdog_thresh
        now = time.monotonic()
        busy = False
        for pool in pset.pools():
            for worker in pool.busy_workers():
                busy = True
                if now - worker.start >= thresh and worker.reported != worker.start:
                    worker.reported = worker.start
                    reports.append((pool.name, worker.name, _pool.work_name(worker.current),
                                    now - worker.start, pool.dump()))
        if busy:
            arm_watchdog(pset)
    for pool_name, worker_name, work, stalled, dump in reports:
        logger.warning(
            "BUG: workqueue lockup - pool %s: %s has been running %s for %.1fs\n%s",
            pool_name, worker_name, work, stalled, dump)
