"""Import a script that is not part of a package (a benchmark, an example,
the real-Xen harness) as a module, for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def helper_path(*more: str) -> list[str]:
    """What a child process puts first on ``sys.path`` to import the
    tests' helpers (``tests``, then ``more``): the repository root before
    them, as pytest has it (pyproject.toml's pythonpath).  ``tests`` alone
    made ``tests/workqueue``, ``tests/xenback`` and ``tests/pvcalls``
    namespace packages in place of the real ones, whenever the working
    directory was not the root (the editable install's finder comes after
    the path-based one, which settles for a namespace package): see
    tests/test_run_elsewhere.py."""
    return [str(ROOT), str(ROOT / "tests"), *more]


def load_script(path: Path, name: str) -> ModuleType:
    """Execute the script at ``path`` as a new module named ``name``
    (registered in ``sys.modules``, as dataclasses and pickle need)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
