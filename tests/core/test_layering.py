"""Methods and adapters meet only in the core: the import graph must point that way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vtprune"
# package -> the vtprune packages its modules must never import
FORBIDDEN = {
    "core": ("vtprune.methods", "vtprune.adapters", "vtprune.api", "vtprune.eval", "vtprune.cli"),
    "methods": ("vtprune.adapters", "vtprune.api", "vtprune.eval", "vtprune.cli"),
    "adapters": ("vtprune.methods", "vtprune.api", "vtprune.eval", "vtprune.cli"),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_into_the_core(package):
    wrong = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for name in _imports(path)
        if name.startswith(FORBIDDEN[package])
    ]
    assert not wrong, wrong
