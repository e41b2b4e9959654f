"""seed_command: run in the app service after a preview's first successful migration.

The once-per-instance marker is real bash over a sandbox (tests/test_shell_scripts.py); the
flow's share — the output in the run's log, a failure diagnosed — runs on moto with scripted
instances.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from prefect.states import State

import tasks.steps.migrate
from flows.preview import pr_preview
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import Reply, ScriptedInstances
from tasks.config import PreviewConfig
from tasks.steps.migrate import SEEDED_BEFORE, seed_commands
from tests.support import CANARY_GHCR_TOKEN
from tests.test_lifecycle_flows import SHA1, assert_no_secret, run_record
from tests.test_shell_scripts import Sandbox, sandbox, sandbox_config  # noqa: F401 (fixture)

REPO = "octo-org/app"


@pytest.mark.parametrize("every_deploy", [False, True])
def test_a_preview_is_seeded_once_unless_every_deploy(
    sandbox: Sandbox,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    every_deploy: bool,
) -> None:
    monkeypatch.setattr(tasks.steps.migrate, "SEEDED", str(sandbox.root / "seeded"))
    (sandbox.root / "app").mkdir()
    config = sandbox_config(
        sandbox, seed_command="python -m app.seed --users 'a b'", seed_on_every_deploy=every_deploy
    )
    script = "\n".join(seed_commands(config)) + "\n"

    first, second = sandbox.run(script), sandbox.run(script)

    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    runs = [line for line in sandbox.calls.splitlines() if " run --rm " in line]
    assert runs[0].endswith("run --rm -T api python -m app.seed --users a b")
    assert len(runs) == (2 if every_deploy else 1)
    assert (second.stdout.strip() == SEEDED_BEFORE) is not every_deploy


def test_a_failed_seed_is_not_marked_and_runs_again(
    sandbox: Sandbox,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks.steps.migrate, "SEEDED", str(sandbox.root / "seeded"))
    (sandbox.root / "app").mkdir()
    (sandbox.bin / "docker").write_text(
        '#!/bin/bash\necho "IntegrityError: duplicate" >&2\nexit 1\n'
    )
    script = "\n".join(seed_commands(sandbox_config(sandbox, seed_command="seed"))) + "\n"

    failed = sandbox.run(script)

    assert failed.returncode == 1 and "IntegrityError: duplicate" in failed.stdout
    assert not (sandbox.root / "seeded").exists()


def logged(state: State[Any], text: str, timeout: float = 20) -> list[str]:
    """The run's log lines once one of them holds ``text`` (logs reach the API in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        _, logs, _ = run_record(state)
        if any(text in line for line in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(0.5)


@pytest.mark.usefixtures("prefect_server")
def test_the_seed_output_is_logged_and_its_failure_diagnosed(
    config: PreviewConfig, registry: FakeRegistry, scripted_ssm: ScriptedInstances
) -> None:
    config.image = f"{registry.host}/octo-org/app"
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    registry.push("octo-org/app", SHA1, private=True)
    scripted_ssm.healthy()
    config.seed_command = "python -m app.seed"
    scripted_ssm.on(r"app\.seed", Reply(stdout="created 3 users\n"))

    seeded = pr_preview(REPO, 47, SHA1, action="opened", config=config, return_state=True)

    assert seeded.result().status == "ready"
    logs = logged(seeded, "created 3 users")
    assert any(line.startswith("seeded i-") for line in logs)

    scripted_ssm.on(
        r"app\.seed",
        Reply(stdout="Traceback (most recent call last):\nKeyError: 'ADMIN_EMAIL'\n", exit_code=1),
    )
    failed = pr_preview(REPO, 48, SHA1, action="opened", config=config, return_state=True)

    assert failed.is_failed()
    logs = logged(failed, "KeyError: 'ADMIN_EMAIL'")
    assert any(line.startswith("seed output (tail)") for line in logs)
    _, _, artifacts = run_record(failed)
    [diagnosis] = [body for body in artifacts if body.startswith("## Diagnosis")]
    assert "The seed command (seed_command) failed" in diagnosis
    *_, comment = (body for body in artifacts if "pr-preview:octo-org/app#48" in body)
    assert "KeyError: 'ADMIN_EMAIL'" in comment and "fix the seed" in comment
    assert_no_secret(*logs, *artifacts)
