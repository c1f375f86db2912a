"""The console scripts' entry points (``[project.scripts]`` of pyproject.toml).

A module of its own, outside the three packages: importing any module of
one runs its package's ``__init__`` first, which imports most of the
project, a third of a second.  Ctrl-C in that time, or in a command's
``main()`` before it takes SIGINT itself, ends the command as Ctrl-C does
later, with status 130 and one line at most, rather than a traceback.
"""

import os
import sys
from importlib import import_module

# 128 + SIGINT, a shell's status for it; literal, so that nothing is
# imported before the try below.
_INTERRUPTED = 130


def _run(module: str, prog: str, *, quiet: bool = False) -> int:
    """``module.main()``'s status, or _INTERRUPTED for a Ctrl-C it left to us."""
    try:
        if sys.stderr is None:
            # Descriptor 2 is closed (2>&-): messages go nowhere, rather
            # than to stdout, where a pipeline reads data (print(file=None)
            # and argparse's usage write there), or into whatever the
            # command opens next, which would take number 2.
            sys.stderr = open(os.devnull, "w")  # for the life of the process
        return int(import_module(module).main())
    except KeyboardInterrupt:
        if not quiet and sys.stderr is not None:  # None: interrupted before the open
            print(f"{prog}: interrupted", file=sys.stderr)
        return _INTERRUPTED


def pvcalls_backend() -> int:
    return _run("pvcalls._cli", "pvcalls-backend")


def pvcalls_nc() -> int:
    # Quietly, as it leaves on SIGINT once connected.
    return _run("pvcalls._nc", "pvcalls-nc", quiet=True)


def xenback_sim() -> int:
    return _run("xenback.sim._daemon", "xenback-sim")
