"""Steps apart from foundations: a step imports no other step, a foundation imports no step nor a
foundation of a later layer, and flows import only steps, foundations, each other and Prefect.
Read from the source — every import, however nested — so a function-level import cannot hide an
arrow."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = "tasks.steps"
# What a flow may use at run time besides the standard library; under TYPE_CHECKING it may name
# any type (an EC2 client's, say) since that import never runs.
FLOW_MAY_IMPORT = ("tasks", "flows", "prefect")
# The foundations' layers, lowest first: a package imports only itself and those before it, even
# under TYPE_CHECKING (tasks/__init__.py's map).
LAYERS = ("tasks.run", "tasks.cloud", "tasks.app", "tasks.github")


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path) -> Iterator[tuple[str, bool]]:
    """Each module ``path`` imports, resolved to a module of ``root`` where it names one (``from
    a import b`` names ``a.b`` when ``b`` is a module), and whether it sits under TYPE_CHECKING."""
    name = module_name(root, path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def walk(node: ast.AST, typing_only: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                yield from ((alias.name, typing_only) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = ".".join(package[: len(package) - child.level + 1]) if child.level else ""
                source = ".".join(part for part in (base, child.module or "") if part)
                for alias in child.names:
                    submodule = f"{source}.{alias.name}"
                    exists = any(
                        (root / submodule.replace(".", "/")).with_suffix(suffix).exists()
                        for suffix in (".py", "")
                    )
                    yield (submodule if exists else source), typing_only
            else:
                guarded = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
                yield from walk(child, typing_only or guarded)

    yield from walk(ast.parse(path.read_text(), filename=str(path)), False)


def is_step(module: str) -> bool:
    return module.startswith(f"{STEPS}.")


def layer(module: str) -> int | None:
    return next(
        (i for i, name in enumerate(LAYERS) if module == name or module.startswith(f"{name}.")),
        None,
    )


def violations(root: Path) -> list[str]:
    """Every arrow of ``root``'s tasks/ and flows/ that the layout forbids, as a sentence."""
    wrong = []
    for path in sorted((root / "tasks").rglob("*.py")):
        name = module_name(root, path)
        for target, _ in imports(root, path):
            below, above = layer(name), layer(target)
            if below is not None and above is not None and above > below:
                wrong.append(f"foundation {name} imports {target} of a later layer")
            if not is_step(target) or target == name:
                continue
            if is_step(name):
                wrong.append(f"step {name} imports step {target}: share it through a foundation")
            else:
                wrong.append(f"foundation {name} imports step {target}")
    for path in sorted((root / "flows").rglob("*.py")):
        name = module_name(root, path)
        for target, typing_only in imports(root, path):
            top = target.split(".")[0]
            if typing_only or top in FLOW_MAY_IMPORT or top in sys.stdlib_module_names:
                continue
            wrong.append(f"flow {name} imports {target}: flows compose steps, they call nothing")
    return wrong


def test_steps_foundations_and_flows_keep_their_places() -> None:
    assert violations(ROOT) == []


def test_every_step_module_is_a_step() -> None:
    """A module under tasks/steps holds a ``@step``; one that holds none is a foundation."""
    plain = [
        module_name(ROOT, path)
        for path in sorted((ROOT / "tasks" / "steps").glob("*.py"))
        if path.name != "__init__.py" and "@step" not in path.read_text()
    ]
    assert plain == []


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    files = {
        "tasks/__init__.py": "",
        "tasks/steps/__init__.py": "",
        "tasks/steps/launch.py": "from tasks.cloud.tags import TAG\n",
        "tasks/steps/spares.py": "def f():\n    from tasks.steps.launch import LaunchSpec\n",
        "tasks/steps/probe.py": "from . import launch\n",
        "tasks/cloud/__init__.py": "",
        "tasks/cloud/tags.py": "TAG = 'x'\n",
        "tasks/app/user_data.py": "from tasks.steps import launch\n",
        "flows/__init__.py": "",
        "flows/preview.py": (
            "from typing import TYPE_CHECKING\nimport time\nfrom prefect import flow\n"
            "from tasks.steps.launch import launch\nfrom flows.run_end import hook\n"
            "if TYPE_CHECKING:\n    from mypy_boto3_ec2 import EC2Client\n"
            "def f():\n    import boto3\n"
        ),
        "flows/run_end.py": "hook = None\n",
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    return tmp_path


def test_a_tiny_tree_with_every_wrong_arrow_is_caught(tiny: Path) -> None:
    assert violations(tiny) == [
        "foundation tasks.app.user_data imports step tasks.steps.launch",
        "step tasks.steps.probe imports step tasks.steps.launch: share it through a foundation",
        "step tasks.steps.spares imports step tasks.steps.launch: share it through a foundation",
        "flow flows.preview imports boto3: flows compose steps, they call nothing",
    ]
