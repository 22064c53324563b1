"""Packaging: every package that src/ imports is declared, and CI runs the README's test command.

A green CI once hid a missing dependency (matplotlib, imported lazily by the report):
the machine it ran on had it installed by hand. These tests read the imports from the
source, lazy ones included, so an undeclared package fails here on any machine.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Imported only where the user opted in, and declared as an extra, not a dependency.
OPTIONAL = {"vllm": "vllm", "deepspeed": "deepspeed"}  # imported only when the run uses them
# Import name -> distribution, for packages that may not be installed where this runs.
KNOWN = {"yaml": "pyyaml", "math_verify": "math-verify"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _normalize(re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0])


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def third_party_imports() -> dict[str, list[str]]:
    """Top-level module name -> files of src/ that import it (anywhere, lazily too)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("reasonmaxxer", "__future__"):
                    continue
                found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def _distribution(module: str) -> set[str]:
    dists = {_normalize(d) for d in importlib.metadata.packages_distributions().get(module, [])}
    if module in KNOWN:
        dists.add(KNOWN[module])
    return dists or {_normalize(module)}


def test_every_imported_package_is_declared() -> None:
    project = _pyproject()["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    extras = {_requirement_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    missing = []
    for module, files in third_party_imports().items():
        if module in OPTIONAL:
            assert _normalize(OPTIONAL[module]) in extras, f"{module} ({files[0]}) is not in an extra"
            continue
        if not _distribution(module) & declared:
            missing.append(f"{module} (imported in {files[0]})")
    assert not missing, "undeclared in pyproject.toml dependencies: " + ", ".join(missing)


def test_the_reader_finds_lazy_imports() -> None:
    """matplotlib is only imported inside functions; the scan must still see it."""
    imports = third_party_imports()
    assert "matplotlib" in imports and "torch" in imports and "os" not in imports


def test_ci_runs_the_readme_test_command_in_a_fresh_venv() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(c for c in commands if "pytest" in c and "train.py" not in c).strip().splitlines()[-1]
    assert test_command in ci, f"CI does not run the README's test command: {test_command}"
    assert "python3 -m venv" in ci or "python -m venv" in ci, "CI must install into a fresh virtual environment"


def test_the_api_page_documents_every_public_name() -> None:
    """docs/api.md renders (mkdocstrings) every name of ``reasonmaxxer.__all__``, each with a docstring."""
    import reasonmaxxer as rm

    page = (ROOT / "docs" / "api.md").read_text()
    documented = {line.split()[1].rsplit(".", 1)[-1] for line in page.splitlines() if line.startswith(":::")}
    modules = {line.split()[1] for line in page.splitlines() if line.startswith(":::")}
    for name in rm.__all__:
        obj = getattr(rm, name)
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
        assert name in documented or obj.__module__ in modules, f"docs/api.md does not render {name}"
