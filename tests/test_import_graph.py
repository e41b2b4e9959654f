"""No arrow back up: the product never imports the local stack, and the local stack has no
import circle. Read from the source (every import, however nested), not from what ran."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("deployments", "flows", "tasks")
LOCAL_STACK = "local_stack"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / package).rglob("*.py"))}


def imported(path: Path, name: str) -> Iterator[str]:
    """Every module the module ``name`` at ``path`` names in an import statement: at the top,
    in a function, under ``TYPE_CHECKING``; ``from a import b`` names ``a.b`` as well (``b`` may
    be a module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            source = ".".join(part for part in (base, node.module or "") if part)
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names)


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph``, as the modules along it, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            if found := visit(target):
                return found
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if found := visit(module):
            return found
    return None


def within(names: Iterator[str], known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that importing ``names`` runs: each one and its packages."""
    found = set()
    for name in names:
        parts = name.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known.keys()
    return found


@pytest.mark.parametrize("package", PRODUCT)
def test_the_product_never_imports_the_local_stack(package: str) -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, path in modules(package).items()
        for target in imported(path, name)
        if target == LOCAL_STACK or target.startswith(f"{LOCAL_STACK}.")
    )
    assert wrong == []


def test_the_local_stack_has_no_import_circle() -> None:
    stack = modules(LOCAL_STACK)
    graph = {name: within(imported(path, name), stack) - {name} for name, path in stack.items()}
    assert cycle(graph) is None, " → ".join(cycle(graph) or [])


def test_a_circle_is_found_however_its_imports_are_written(tmp_path: Path) -> None:
    """The check itself: a lazy import and a ``TYPE_CHECKING`` one close a circle too."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle(graph) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from local_stack.postgres import Postgres\n"
        "def f():\n    from local_stack import demo\n    import local_stack.account\n"
        "from . import step\n"
    )
    names = set(imported(source, "tasks.m"))
    assert {"local_stack.postgres", "local_stack.demo", "local_stack.account"} <= names
    assert "tasks.step" in names
