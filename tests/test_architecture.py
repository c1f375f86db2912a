"""The public faces of the three packages, and the one-way layering between them.

Acceptance checks outside the repository import the names the issues fix, so
their presence is tested here; the layering (pvcalls -> xenback -> workqueue)
is checked statically, on every module's imports, so that a stray import in a
rarely executed path cannot slip through.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FIXED_NAMES = {
    "workqueue": [
        "alloc_workqueue", "alloc_ordered_workqueue", "Work", "DelayedWork",
        "WQ_UNBOUND", "WQ_HIGHPRI", "WQ_CPU_INTENSIVE", "WQ_FREEZABLE", "WQ_MEM_RECLAIM",
        "Topology", "LoadIndex", "current_work",
    ],
    "xenback": ["XenbusState", "BackendDriver", "BackendDevice", "BackRing", "FrontRing",
                "FlexRing", "Platform", "PlatformUnavailable"],
    "xenback.sim": ["SimHost", "Domain", "attach", "Toolstack", "FrontendDevice"],
    "xenback.xen": ["open"],
    "pvcalls": ["Backend", "Frontend", "Policy"],
}

# What each package may import from this project.
ALLOWED = {
    "workqueue": {"workqueue"},
    "xenback": {"xenback", "workqueue"},
    "pvcalls": {"pvcalls", "xenback", "workqueue"},
}


@pytest.mark.parametrize("module", sorted(FIXED_NAMES))
def test_fixed_names_are_exported(module: str) -> None:
    mod = importlib.import_module(module)
    exported = set(getattr(mod, "__all__", ()))
    for name in FIXED_NAMES[module]:
        assert hasattr(mod, name), f"{module} lacks {name}"
        if module != "xenback.xen":
            assert name in exported, f"{name} missing from {module}.__all__"


@pytest.mark.parametrize("module", sorted(FIXED_NAMES))
def test_all_lists_only_real_public_names(module: str) -> None:
    mod = importlib.import_module(module)
    names = list(getattr(mod, "__all__", ()))
    assert len(names) == len(set(names)), f"{module}.__all__ has duplicates"
    for name in names:
        assert not name.startswith("_"), f"{module}.__all__ exports private {name}"
        assert hasattr(mod, name), f"{module}.__all__ names missing {name}"


def _project_imports(path: Path) -> set[str]:
    """Top-level project packages a module imports (absolute imports only:
    relative ones stay inside their own package by construction)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layers_point_one_way(package: str) -> None:
    sources = sorted((ROOT / package).rglob("*.py"))
    assert sources, f"no sources found for {package}"
    for path in sources:
        wrong = _project_imports(path) - ALLOWED[package]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)} across the layers"
