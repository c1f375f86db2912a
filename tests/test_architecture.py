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


def _private(name: str) -> bool:
    """A name that starts with ``_``, but for a dunder (``__version__``,
    ``__all__``): those are public by Python's convention."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_imports_across(path: Path, package: str) -> list[str]:
    """What a module of ``package`` imports from another package of this
    project by a private name: a module or a name of it that starts with
    ``_``.  A layer below may rename or drop those at will; what the
    layers above use of it must be among its public names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
            names: list[str] = []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            names = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] not in ALLOWED or parts[0] == package:
                continue
            if any(map(_private, parts)) or any(map(_private, names)):
                found.append(f"{module}: {', '.join(names) or '(the module)'}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_layer_uses_only_the_public_names_of_those_below(package: str) -> None:
    """``from workqueue._shown import shown`` in xenback tied it to a
    private module of the layer below, which that layer may move at will."""
    wrong = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / package).rglob("*.py"))
        if (found := _private_imports_across(path, package))
    }
    assert wrong == {}


def test_the_private_import_rule_sees_each_spelling(tmp_path: Path) -> None:
    """The rule itself, on a module of xenback's: a private module or name
    of a layer below, however imported, is found; a public name under a
    private alias, a dunder (``__version__`` is public by convention) and
    xenback's own private names are not."""
    module = tmp_path / "scratch.py"
    module.write_text(
        "from workqueue._shown import shown\n"
        "import workqueue._pool\n"
        "from workqueue import _pool, wait_slice\n"
        "import pvcalls._policy as policy\n"
        "from workqueue import shown as _shown\n"
        "from workqueue import __version__\n"
        "from xenback._flags import is_int\n"
        "import xenback.sim._host\n"
        "from . import _private\n"
        "def later():\n"
        "    from workqueue._work import Work\n"
    )
    assert _private_imports_across(module, "xenback") == [
        "workqueue._shown: shown",
        "workqueue._pool: (the module)",
        "workqueue: _pool, wait_slice",
        "pvcalls._policy: (the module)",
        "workqueue._work: Work",
    ]


def _names_imported_across(path: Path, package: str) -> set[tuple[str, str]]:
    """(module, name) of each ``from module import name`` of ``path``
    that reaches into another package of this project."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
        and node.module.split(".")[0] in ALLOWED and node.module.split(".")[0] != package
        for alias in node.names
    }


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_what_a_layer_imports_from_below_is_in_its_all(package: str) -> None:
    """A public name is one the module exports (its ``__all__``), or one of
    its public submodules: workqueue.shown, which xenback imports, kept
    out of workqueue.__all__ would be public only by accident."""
    import importlib.util

    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module, name in _names_imported_across(path, package):
            mod = importlib.import_module(module)
            exported = getattr(mod, "__all__", None)
            if exported is None or name in exported:
                continue
            if not hasattr(mod, "__path__") or importlib.util.find_spec(f"{module}.{name}") is None:
                wrong.append(f"{path.relative_to(ROOT)}: {module}.{name}")
    assert wrong == []


def test_xen_s_reserved_domids_are_spelt_once() -> None:
    """DOMID_FIRST_RESERVED (0x7FF0), and the last domain's id below it,
    are numbers of Xen's ABI that every layer checks a domid by: each
    copy was one more to keep in step.  xenback.platform exports it, and
    no module but the one defining it writes either number (but as
    DOMID_SELF, another of Xen's names, which xenstored reads)."""
    import xenback.platform

    assert "DOMID_FIRST_RESERVED" in xenback.platform.__all__
    assert xenback.platform.DOMID_FIRST_RESERVED == 0x7FF0
    home = ROOT / "xenback" / "_flags.py"
    copies = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for package in ALLOWED
        for path in sorted((ROOT / package).rglob("*.py")) if path != home
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Constant) and type(node.value) is int
        and node.value in (0x7FF0, 0x7FEF)
        and "DOMID_SELF =" not in path.read_text().splitlines()[node.lineno - 1]
    ]
    assert copies == []
