"""Every dependency pyproject declares is used by caictl's code: an unused one costs every install and misleads
whoever reads the list for what caictl is built on."""

from __future__ import annotations

import ast
import re
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later

ROOT = Path(__file__).resolve().parents[1]
# Declared but never imported, each for a reason a reader can check.
NOT_IMPORTED: dict[str, str] = {}


def test_every_declared_dependency_is_imported_in_src():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {normalised(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}
    # Import names are not distribution names (`yaml` comes from PyYAML): ask the installed metadata.
    distributions = packages_distributions()
    used = {normalised(name) for module in imported_modules(ROOT / "src")
            for name in distributions.get(module, [module])}
    assert sorted(declared - used) == sorted(NOT_IMPORTED)


def imported_modules(folder: Path) -> set[str]:
    """Top-level names of every absolute import in the folder's Python files, lazy imports inside functions too."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: PyYAML, pyyaml and py_yaml are one project
