"""The lockup watchdog (the kernel's wq_watchdog), reduced to two promises.

Each stall is reported once, through logging at WARNING, with a dump of
its pool, once it has lasted topology.watchdog_thresh seconds (default 30,
like wq_watchdog_thresh):

* a work item that runs that long;

* a pool whose worklist does not move that long: items wait on it and
  none of the pool's items starts (every worker busy with items that
  neither return nor say they block, or no worker to be had).  This is
  the kernel's own lockup check, which watches pool->watchdog_ts.

The kernel touches pool->watchdog_ts as a worker takes an item, and as
an item is queued on an empty worklist, both on the hot path; ours reads
instead the counts of started items that every pwq keeps anyway
(PoolWorkqueue.nr_started) and notes when it last saw one move, so that
watching costs queue_work() and the workers nothing.  A stall is timed
from the first check that saw the worklist waiting, or saw a count move
while it waited: at most a quarter threshold late, never early.  A
worklist that empties between two checks with nothing started -- its
items cancelled, handed to the workers still running them, or taken by
a rescuer that starts none -- would time a stall of the next item queued
from before its queueing: those few places, none of them queue_work()
or an item's way through a worker, clear the pool's watchdog_ts
themselves.  (The counts move with the pool's workers' `scheduled`
lists too, which the kernel's stamp does not watch: an item that a busy
worker keeps running from there hides a stall of the worklist behind
it.)

The check runs on the timer thread every quarter threshold while any
worker of the topology is busy or any of its worklists holds items, and
sleeps otherwise: a worker arms it when it starts running items, and so
does a pool that fails to make a worker.  A worklist whose pool lost a
wake-up with no worker busy anywhere would go unwatched; that is a bug
of the engine, not a stall of the program's.
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


def _pool_stalled(pool: _pool.WorkerPool, now: float, thresh: float) -> float | None:
    """For how long *pool*'s worklist has waited with no item started, if
    that is a stall to report now, else None (engine lock held)."""
    seen = pool.watchdog_started
    if not pool.worklist.nr:
        pool.watchdog_ts = None
        seen.clear()  # nor keeps the pwqs of workqueues destroyed since
        return None
    # Pwq by pwq, not their sum: a workqueue destroyed meanwhile takes its
    # count along with its pwq (release_pwq), which starts nothing, and
    # would otherwise hide a start elsewhere or time the stall afresh.
    # Those seen last time too, gone or not: one that started items, then
    # left, moved the worklist, and the item waiting now may be younger
    # than the stamp.  (`seen` keeps a gone pwq until the next stamp.)
    if pool.watchdog_ts is None or any(
            pwq.nr_started != n for pwq, n in seen.items()) or any(
            pwq.nr_started and pwq not in seen for pwq in pool.pwqs):
        pool.watchdog_ts = now
        pool.watchdog_started = {pwq: pwq.nr_started for pwq in pool.pwqs}
        return None
    stalled = now - pool.watchdog_ts
    if stalled < thresh or pool.watchdog_reported == pool.watchdog_ts:
        return None
    pool.watchdog_reported = pool.watchdog_ts
    return stalled


def _watchdog_timer_fn(pset: _pool.PoolSet) -> None:
    # Logged once the lock is free, its items named then too (see Draft).
    reports: list[tuple[str, tuple[object, ...]]] = []
    with _pool.lock:
        if timer_pending(pset.watchdog):
            # Superseded: armed again (PoolSet.rearm_checks) as we fired.
            return
        pset.watchdog = None
        thresh = pset.topology.watchdog_thresh
        now = time.monotonic()
        watching = False
        for pool in pset.pools():
            for worker in pool.busy_workers():
                watching = True
                if now - worker.start >= thresh and worker.reported != worker.start:
                    worker.reported = worker.start
                    reports.append((
                        "BUG: workqueue lockup - pool %s: %s has been running %s for %.1fs\n%s",
                        (pool.name, worker.name, _named(worker.current),
                         now - worker.start, pool.draft(now))))
            stalled = _pool_stalled(pool, now, thresh)
            if stalled is not None:
                reports.append((
                    "BUG: workqueue lockup - pool %s stuck for %.1fs: %s waits, and no item "
                    "of the pool has started since\n%s",
                    (pool.name, stalled, _named(next(iter(pool.worklist))), pool.draft(now))))
            if pool.worklist.nr:
                watching = True
        if watching:
            arm_watchdog(pset)
    for message, args in reports:
        logger.warning(message, *[arg.text() if isinstance(arg, _pool.Draft) else arg
                                  for arg in args])


def _named(work: object) -> _pool.Draft:
    """*work*, to be named once the lock is free."""
    draft = _pool.Draft()
    draft.item(work)
    return draft
