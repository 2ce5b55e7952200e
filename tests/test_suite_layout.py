"""What test modules share lives in helper modules (tests/*.py not named test_*) and fixtures in
conftest.py: a test module never imports another, so each can be read, moved or deleted alone."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_test_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found |= {name.split(".")[1] for name in names if name.startswith("tests.test_")}
    return found


def test_no_test_module_imports_another() -> None:
    imports = {(path.stem, imported) for path in TESTS.glob("test_*.py") for imported in _imported_test_modules(path)}
    assert imports == set()
