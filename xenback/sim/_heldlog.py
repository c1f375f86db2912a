"""Records a thread keeps, to be emitted where nobody waits on it.

Emitting a record takes the locks of the handlers it goes to, and
logging's own for a level not asked about since the last change.  A
signal's handler that closes the host may come in where the main thread
held one of them, and then waits for a lock of the host's, or joins a
thread: one that emits meanwhile waits for the main thread, which waits
for it.  So a thread the main thread may wait on keeps what it logs,
within :func:`records_held` (or :func:`records_kept`), and it is emitted
once nobody waits on it: after the lock is let go, by whoever joins it.

The host, XenStored, the toolstack and the hypervisor log through
:func:`log`, which is their logger unless the thread keeps records, and
emit records kept elsewhere (handed over by another thread) through
:func:`emit`, which keeps them too if this thread keeps.

Who keeps, who emits, and where:

- The main thread keeps nothing: it emits as it logs (a handler's lock
  it holds, it takes again), and a Ctrl-C there could leave it keeping
  for good.  It emits what others hand it through :func:`emit`.
- Another thread taking a lock the main thread may wait for keeps within
  :func:`records_held`, and emits once it let the lock go: a caller of
  SimHost._locked, Hypervisor.add_domain, stats and _reply_later, and
  Hypervisor._uninterrupted's work done in place.
- A thread that decides itself when its records come out keeps them
  within :func:`records_kept`, in a list of its own, and emits them past
  its locks, or hands them to whoever joins it, who emits them past the
  join: the hypervisor's service thread (Hypervisor._serve, to stop()), a
  removal's thread (Hypervisor._uninterrupted: to its caller; once that
  has gone, itself, or to the stop() joining it), the host's control
  threads (SimHost._control's run, to close()), XenStore's loop thread
  (XenStored._loop, to stop()) and the calls it runs for another thread
  (XenStored._call: to their caller; once that gave up, itself).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

#: How long a closer waits for a thread it would join that is emitting
#: records itself (see Hypervisor.stop, SimHost.close): for ever, it would
#: deadlock with a signal's handler that came in where the main thread
#: held a lock of logging's the thread waits for; otherwise the thread
#: ends within microseconds.
EMITTER_WAIT = 1.0

# .records: the list this thread keeps its records in, while it keeps.
_held = threading.local()


class _Keeper(logging.Logger):
    """A logger as a thread that keeps records sees it: it keeps them in
    the list of the thread making them, and takes no lock.  It makes no
    record of a level its logger would not emit (asked of the logger's
    levels, which takes no lock, where isEnabledFor() may take logging's
    own): a keeping thread that logs per request, at a level nobody
    listens to, must not pay a record for each.  Filters are applied as
    the records are emitted (see emit), which asks the levels again.

    One per logger, shared by the threads.  This leans on isEnabledFor()
    and handle() being a Logger's only ways to its handlers, true of
    logging as of Python 3.11: debug() to exception() and log() ask
    isEnabledFor(), then _log() makes the record and passes it to
    handle()."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger.name)
        self.of = logger

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802
        of = self.of
        return (not of.disabled and of.manager.disable < level
                and level >= of.getEffectiveLevel())

    def handle(self, record: logging.LogRecord) -> None:
        # Used as log() returns it, only by a thread keeping records.
        _held.records.append(record)


# Each logger's _Keeper, made once: a dict's get() and setdefault() are atomic.
_keepers: dict[logging.Logger, _Keeper] = {}


def log(logger: logging.Logger) -> logging.Logger:
    """``logger``, or one keeping its records if this thread keeps them
    (none of a level ``logger`` would not emit as the record is made)."""
    if getattr(_held, "records", None) is None:
        return logger
    keeper = _keepers.get(logger)
    if keeper is None:
        keeper = _keepers.setdefault(logger, _Keeper(logger))
    return keeper


def keeping() -> bool:
    """Whether this thread keeps its records."""
    return getattr(_held, "records", None) is not None


def emit(records: list[logging.LogRecord]) -> None:
    """Emit ``records`` as their loggers would have, or keep them if this
    thread keeps its own; taken off the list either way.

    One at a time, each taken off with no call between that and
    logging's: a call a Ctrl-C cuts short (as a record returns) and that
    is made again emits none twice.  (One landing inside logging cuts
    that record short, as it would any record made in the main thread.)"""
    kept: list[logging.LogRecord] | None = getattr(_held, "records", None)
    if kept is not None:
        kept += records  # not in the main thread: no Ctrl-C between these
        records.clear()
        return
    while records:
        record = records[0]
        logger = logging.getLogger(record.name)
        enabled = logger.isEnabledFor(record.levelno)
        del records[0]
        if enabled:
            logger.handle(record)


@contextlib.contextmanager
def records_kept(into: list[logging.LogRecord] | None) -> Iterator[None]:
    """What this thread logs through :func:`log` within, kept in ``into``
    for the caller to emit or hand over.

    With None, the thread emits what it logs and what :func:`emit` is
    given within, though it keeps its records around: for a thread that
    keeps them and emits them itself where it can tell nobody waits on it
    (see XenStored._say)."""
    outer = getattr(_held, "records", None)
    _held.records = into
    try:
        yield
    finally:
        _held.records = outer


@contextlib.contextmanager
def records_held() -> Iterator[None]:
    """What this thread logs through :func:`log` within, emitted at the end.

    Not in the main thread, which emits as it logs (a handler's lock it
    holds, it takes again): there a Ctrl-C as this began could leave its
    records held for good.  Nor where they are kept already, by a thread
    that emits them later itself."""
    if threading.current_thread() is threading.main_thread() or keeping():
        yield
        return
    records: list[logging.LogRecord] = []
    try:
        with records_kept(records):
            yield
    finally:
        emit(records)
