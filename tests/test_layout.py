"""The import graph runs one way: harness -> methods; the report reads records only; the
library does not reach the command line; no import cycle; small functions and files.

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
PACKAGES = ("harness", "methods", "bench", "hydra_plugins")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 400
# RULER generators ported line for line from lm-eval: kept long so they diff against the source
PORTED = {
    f"harness/tasks/ruler/{name}.py::generate_samples" for name in ("cwe", "fwe", "niah", "vt")
}


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


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_graph() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports (``a.b.c`` resolves to the
    longest prefix that is a module), function-level imports included."""
    paths = [p for package in PACKAGES for p in sources(package)]
    modules = {module_name(p): p for p in paths}

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    graph = {}
    for name, path in modules.items():
        targets = {resolve(m) for m in imported_modules(path)}
        # a submodule importing its own package's __init__ is how Python loads it: no cycle
        graph[name] = {t for t in targets if t is not None and not (name + ".").startswith(t + ".")}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_methods_reach_no_harness_module_transitively() -> None:
    graph = project_graph()
    bad = {
        f"{name} -> {target}"
        for name in graph
        if name.startswith("methods")
        for target in reachable(graph, name)
        if target.startswith("harness")
    }
    assert sorted(bad) == []


def test_methods_name_no_harness_target() -> None:
    bad = [
        f"{path.relative_to(REPO)}: {node.value!r}"
        for path in sources("methods")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if node.value.startswith("harness.")
    ]
    assert bad == []


def names_used(tree: ast.AST) -> set[str]:
    """Every name, attribute and imported name in ``tree`` (``conf_dir``, ``storage.conf_dir``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found.add(node.name.split(".")[-1])
    return found


def test_methods_do_not_know_the_config_folder() -> None:
    """Only methods/storage.py knows where the Hydra configs are (``conf_dir``): a method never
    resolves a config name (a prompt method's named compressor is loaded and handed over by
    harness/compressors.py), so no other module under methods/ uses ``conf_dir`` or names the
    model config folder."""
    bad = []
    for path in sources("methods"):
        rel = path.relative_to(REPO).as_posix()
        if rel == "methods/storage.py":
            continue
        text = path.read_text(encoding="utf-8")
        if "conf_dir" in names_used(ast.parse(text)):
            bad.append(f"{rel} uses conf_dir")
        if "conf/model" in text:
            bad.append(f"{rel} names conf/model")
    assert bad == []


def test_the_api_does_not_reach_the_command_line() -> None:
    assert "harness.run" not in reachable(project_graph(), "harness.api")


def test_no_import_cycle() -> None:
    graph = project_graph()
    cycles = sorted(name for name in graph if name in reachable(graph, name))
    assert cycles == []


def test_functions_and_files_are_small() -> None:
    bad = []
    for path in [p for package in PACKAGES for p in sources(package)]:
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_FILE_LINES:
            bad.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{rel}::{node.name}" not in PORTED:
                    bad.append(f"{rel}::{node.name}: {lines} lines")
    assert bad == []
