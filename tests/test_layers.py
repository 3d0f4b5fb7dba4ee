"""The package's layers import downwards only (DESIGN.md §4): the training loop never knows compression."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "asc"


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _offenders(layer: str, forbidden: str) -> list[str]:
    return sorted(f"{path.relative_to(PACKAGE.parent)} imports {name}"
                  for path in (PACKAGE / layer).rglob("*.py")
                  for name in _imported_modules(path)
                  if name == forbidden or name.startswith(forbidden + "."))


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("import os\n\ndef f():\n    from asc.compress.quant import Int8QAT\n")
    assert _imported_modules(source) == {"os", "asc.compress.quant"}


def test_train_never_imports_compress() -> None:
    assert _offenders("train", "asc.compress") == []


def test_models_import_neither_train_nor_compress() -> None:
    assert _offenders("models", "asc.compress") + _offenders("models", "asc.train") == []
