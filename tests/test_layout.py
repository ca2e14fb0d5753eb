"""The import graph runs one way: harness -> methods; the report reads records only.

Every import statement is read from the source (function-level imports included), so a lazy
``import harness...`` inside a method is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# modules that run a model or build methods: the report may import none of them
LIVE_RUN = ("harness.run", "harness.lm", "harness.generation", "harness.models", "harness.measure")


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def offending(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(REPO)} imports {module}"
        for path in sources(folder)
        for module in sorted(imported_modules(path))
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]


def test_the_walker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    probe = REPO / "methods" / "_probe_for_test.py"
    probe.write_text("def f():\n    import harness.run\n    from .base import Method\n")
    try:
        found = imported_modules(probe)
    finally:
        probe.unlink()
    assert "harness.run" in found and "methods.base" in found


def test_methods_import_nothing_from_harness() -> None:
    assert offending("methods", ("harness",)) == []


@pytest.mark.parametrize("forbidden", [("methods",), LIVE_RUN])
def test_the_report_imports_no_method_or_live_run_code(forbidden: tuple[str, ...]) -> None:
    assert offending("harness/report", forbidden) == []
