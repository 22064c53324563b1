"""The package's layering: ``core`` imports only torch, and no layer imports a higher one.

Imports are read from the source (lazy, function-level imports included), so a layering
break fails here even when no test happens to execute the offending line.
"""

from __future__ import annotations

import ast
import sys
import typing
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "reasonmaxxer"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS: dict[str, int] = {
    "core": 0,                          # pure tensor math, torch only
    "errors": 1, "utils": 1,
    "data": 2,                          # problem sources, prompts, answer checking
    "config": 3, "models": 3,
    "stages": 4, "tracking": 4,         # the data stages: rollouts, scoring, selection
    "training": 5,                      # the trainers, their checks and outputs
    "evaluation": 6,
    "jobs": 7,                          # pipeline, sweep, compare: compose the layers below
    "cli": 8, "testing": 8, "__init__": 8,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Absolute names of every module this file imports, anywhere in it."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    return _imports_in(path.read_text(), package)


def _imports_in(text: str, package: str) -> list[str]:
    tree = ast.parse(text)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(module)
            # `from . import x` / `from .pkg import mod` may name submodules
            found += [f"{module}.{alias.name}" for alias in node.names]
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_project_module(name: str) -> bool:
    if not name.startswith("reasonmaxxer"):
        return False
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in SOURCES:
        assert _layer(_module_name(path)) in LAYERS, f"{path}: add its folder to LAYERS"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_layer_imports_a_higher_one(path: Path) -> None:
    source = _module_name(path)
    mine = LAYERS[_layer(source)]
    for name in _imports(path):
        if _is_project_module(name):
            theirs = LAYERS[_layer(name)]
            assert theirs <= mine, f"{source} (layer {mine}) imports {name} (layer {theirs})"


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").rglob("*.py")), ids=lambda p: p.name)
def test_core_imports_only_torch(path: Path) -> None:
    allowed_stdlib = {"__future__", "collections", "importlib", "math", "typing"}
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "reasonmaxxer":
            assert name.startswith("reasonmaxxer.core"), f"{path.name} imports {name}"
        else:
            assert top == "torch" or top in allowed_stdlib, f"{path.name} imports {name}: core is torch only"


def test_the_checker_sees_a_violation() -> None:
    """Relative and lazy imports resolve to the module they name, so the checks above can fail."""
    names = _imports_in("def f():\n    from ..jobs.pipeline import Pipeline\n", "reasonmaxxer.core")
    assert "reasonmaxxer.jobs.pipeline" in names and _is_project_module("reasonmaxxer.jobs.pipeline")
    assert LAYERS[_layer("reasonmaxxer.jobs.pipeline")] > LAYERS["core"]
    assert "reasonmaxxer.core.ops" in _imports_in("from .ops import masked_mean\n", "reasonmaxxer.core")


def test_choice_sets_have_one_definition() -> None:
    """The config's choices are the core's own Literal types, not copies."""
    from reasonmaxxer.config import GateConfig, LossConfig
    from reasonmaxxer.core.gate import GATE_MODES, REFERENCE_MODES, GateMode, ReferenceMode
    from reasonmaxxer.core.loss import LOSS_VARIANTS, LossVariant

    hints = typing.get_type_hints(GateConfig)
    assert hints["mode"] is GateMode and typing.get_args(GateMode) == GATE_MODES
    assert hints["reference"] is ReferenceMode and typing.get_args(ReferenceMode) == REFERENCE_MODES
    assert typing.get_type_hints(LossConfig)["variant"] is LossVariant
    assert typing.get_args(LossVariant) == LOSS_VARIANTS


def test_builtin_kinds_have_one_definition() -> None:
    from reasonmaxxer.data import builtin

    assert set(builtin.KIND_DIFFICULTY) == set(builtin.PROBLEM_KINDS)
    assert set(builtin._DRAWERS) == set(builtin.PROBLEM_KINDS)


def test_core_imports_without_the_rest_of_the_stack() -> None:
    """Importing reasonmaxxer.core pulls in no transformers, trl, peft or datasets."""
    import subprocess

    code = ("import sys; import reasonmaxxer.core; "
            "bad = [m for m in ('transformers', 'trl', 'peft', 'datasets', 'wandb', 'yaml') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PACKAGE.parent), "PATH": ""})
    assert out.stdout.strip() == "", out.stdout


def test_no_import_cycle_between_modules() -> None:
    """Every import, lazy ones included, runs one way: the module graph has no cycle."""
    graph = {_module_name(p): {n for n in _imports(p) if _is_project_module(n)} for p in SOURCES}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + (module,)))
        if module in done:
            return
        for name in graph.get(module, ()):
            if name != module:
                visit(name, path + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())
    with pytest.raises(AssertionError, match="import cycle"):  # the check itself can fail
        graph = {"a": {"b"}, "b": {"a"}}
        done.clear()
        visit("a", ())


def test_config_and_cli_import_without_torch() -> None:
    """``train.py --help`` and config validation do not pay for torch (seconds to import)."""
    import subprocess

    code = ("import sys; import reasonmaxxer.config, reasonmaxxer.config.reference, reasonmaxxer.cli; "
            "print(','.join(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PACKAGE.parent), "PATH": ""})
    assert out.stdout.strip() == "", out.stdout


@pytest.mark.parametrize("package", ["reasonmaxxer", "reasonmaxxer.core"])
def test_lazy_exports_resolve_and_match_all(package: str) -> None:
    import importlib

    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(module._EXPORTS)
    for name in module.__all__:
        assert getattr(module, name) is getattr(importlib.import_module(module._EXPORTS[name], package), name)
    with pytest.raises(AttributeError):
        module.not_a_name  # noqa: B018


def test_submodules_are_attributes_of_the_lazy_package() -> None:
    import subprocess

    code = "import reasonmaxxer as rm; print(rm.core.stats_to_floats.__name__, rm.jobs.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PACKAGE.parent), "PATH": ""})
    assert out.stdout.split() == ["stats_to_floats", "reasonmaxxer.jobs"]
