"""Linux kernel workqueues on Python threads.

(Work in progress: the engine lands in the next commits; Topology and
LoadIndex are usable now.)
"""

from __future__ import annotations

import importlib
from typing import Any

from ._loadindex import LoadIndex
from ._topology import Topology

__all__ = [
    "alloc_workqueue", "alloc_ordered_workqueue", "Work", "DelayedWork",
    "WQ_UNBOUND", "WQ_HIGHPRI", "WQ_CPU_INTENSIVE", "WQ_FREEZABLE", "WQ_MEM_RECLAIM",
    "Topology", "LoadIndex", "current_work",
]

# Names whose modules are not written yet; resolved on first use.
_LATER = {
    "alloc_workqueue": "._workqueue", "alloc_ordered_workqueue": "._workqueue",
    "Work": "._work", "DelayedWork": "._work", "current_work": "._work",
    "WQ_UNBOUND": "._flags", "WQ_HIGHPRI": "._flags", "WQ_CPU_INTENSIVE": "._flags",
    "WQ_FREEZABLE": "._flags", "WQ_MEM_RECLAIM": "._flags",
}


def __getattr__(name: str) -> Any:
    module = _LATER.get(name)
    if module is None:
        raise AttributeError(f"module 'workqueue' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
