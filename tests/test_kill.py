"""Real kills: the flow-run process of a real process worker is SIGKILLed at four stages.

After each kill the PR must end truthful (the worker's on_crashed hook, or the pr-crash-report
automation: the comment says crashed, the GitHub deployment is ``error``), the next run for the
PR must get its lock within the lease plus the server's repossessor loop, and converge to one
healthy preview; until then the next sweep would remove what the dead run left.

The four PRs run side by side so that their leases run out together; the fleet-section kill
comes last, since the dead run keeps the fleet lock until its lease ends.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tasks.config import PreviewConfig
from tasks.steps.sweep import sweep
from tests.support.installation import REPO, Installation
from tests.support.moto_state import tags

pytestmark = [pytest.mark.crash, pytest.mark.xdist_group("installation")]

LEASE = 60.0
REPOSSESSOR = 5.0  # PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS of the local stack
FIRST, SECOND = "a1" * 20, "b2" * 20


@dataclass
class KillPoint:
    name: str
    pr: int
    brake: str | None  # the stage the run is held in (moto_server.Brakes)
    running_task: str | None  # kill once this task run is Running (None: once launch completed)
    run_id: str = ""
    killed_at: float = 0.0
    killed_wall: datetime = field(default_factory=lambda: datetime.now(UTC))
    left: list[str] = field(default_factory=list)
    told: str = ""
    deployment: str = ""


def flow_run_pids(run_id: str) -> list[int]:
    """Every process started for flow run ``run_id`` (the process worker sets its id)."""
    marker = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def task_runs(e2e: Installation, run_id: str) -> list[dict[str, Any]]:
    with e2e.stack.client() as http:
        found = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}})
        found.raise_for_status()
        return list(found.json())


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def kill_at(e2e: Installation, point: KillPoint) -> None:
    def my_run() -> str | None:
        runs = e2e.runs_for("pr-preview/pr-preview", point.pr)
        return runs[-1]["id"] if runs and runs[-1]["state_type"] == "RUNNING" else None

    point.run_id = wait_until(my_run, 120, f"{point.name}: the run never started")

    def ready_to_kill() -> bool:
        name, state = (
            point.running_task or "launch",
            "RUNNING" if point.running_task else "COMPLETED",
        )
        return any(
            run["name"].startswith(name) and run["state_type"] == state
            for run in task_runs(e2e, point.run_id)
        )

    try:
        wait_until(ready_to_kill, 150, f"{point.name}: never reached {point.running_task}")
    except TimeoutError as exc:
        seen = [(r["name"], r["state_type"]) for r in task_runs(e2e, point.run_id)]
        raise TimeoutError(
            f"{exc}: {seen}; {e2e.outcomes(e2e.runs_for('pr-preview/pr-preview', point.pr))}"
        ) from exc
    pids = wait_until(lambda: flow_run_pids(point.run_id), 10, f"{point.name}: no process")
    # One interpreter per run, a worker's own child: the pool's command is the engine itself
    # (deployments.pools.process_base_job_template), not a supervisor that starts a second.
    stack = {process.pid for process in e2e.stack.processes}
    assert len(pids) == 1 and parent_of(pids[0]) in stack, (pids, stack)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    point.killed_at, point.killed_wall = time.monotonic(), datetime.now(UTC)


def crashed_state(e2e: Installation, point: KillPoint) -> dict[str, Any]:
    def crashed() -> dict[str, Any] | None:
        [run] = [
            r for r in e2e.runs_for("pr-preview/pr-preview", point.pr) if r["id"] == point.run_id
        ]
        return run if run["state_type"] == "CRASHED" else None

    found: dict[str, Any] = wait_until(crashed, 90, f"{point.name}: never marked Crashed")
    return found


def test_a_killed_run_leaves_the_pr_truthful_and_the_next_run_converges(
    e2e: Installation,
) -> None:
    e2e.configure(max_previews=10, lock_lease_seconds=LEASE, ready_timeout_seconds=300)
    points = [
        KillPoint("after launch", 81, "bootstrap", None),
        KillPoint("during wait-ready", 82, "bootstrap", "wait-ready"),
        KillPoint("during migrate", 83, "migrate", "migrate"),
        KillPoint("inside the fleet section", 84, "launch", "launch"),
    ]
    for point in points:
        if point.brake:
            e2e.moto.slow(point.brake, point.pr, 240)
    for point in points[:3]:
        assert e2e.deliver("opened", point.pr, FIRST).status_code == 200
    for point in points[:3]:
        kill_at(e2e, point)
    assert e2e.deliver("opened", points[3].pr, FIRST).status_code == 200
    kill_at(e2e, points[3])

    # The PR is told: comment crashed, deployment error (hook or automation, within seconds).
    for point in points:
        state = crashed_state(e2e, point)
        point.left = [i["InstanceId"] for i in e2e.live_for(point.pr)]

        def told(point: KillPoint = point) -> str | None:
            bodies = e2e.github.comment_bodies(REPO, point.pr)
            return bodies[0] if bodies and "💥 Preview run crashed" in bodies[0] else None

        body = wait_until(told, 90, f"{point.name}: the PR was never told ({state['name']})")
        point.told = body.splitlines()[1]
        for instance_id in point.left:
            assert instance_id in body

        def deployment_states(point: KillPoint = point) -> list[str]:
            return [
                status["state"]
                for deployment in e2e.github.deployments.get(REPO.lower(), [])
                if deployment["environment"] == f"pr-{point.pr}"
                for status in e2e.github.statuses[deployment["id"]]
            ]

        # The comment is posted first, the deployment status right after it.
        try:
            wait_until(lambda: deployment_states()[-1:] == ["error"], 30, "no error status")
        except TimeoutError:
            pytest.fail(f"{point.name}: deployment states {deployment_states()}")
        point.deployment = deployment_states()[-1]

    # What the dead runs left carries the short TTL: the next sweep would remove it.
    config = PreviewConfig.model_validate(
        {**e2e.account.config_values(), "region": "ap-northeast-1"}
    )
    later = datetime.now(UTC) + timedelta(hours=config.failure_ttl_hours, minutes=1)
    doomed = {
        d.instance_id
        for d in sweep(e2e.aws.ec2, config, now=later, dry_run=True).decisions
        if d.action == "terminate"
    }
    for point in points:
        assert set(point.left) <= doomed, point.name

    # The next push: its run waits for the dead run's lease, then converges.
    e2e.moto.slow(None)
    for point in points:
        assert e2e.deliver("synchronize", point.pr, SECOND).status_code == 200
    waits = {}
    for point in points:
        runs = e2e.wait_for_pr_runs("pr-preview/pr-preview", point.pr, 2, timeout=400)
        newest = runs[-1]
        assert newest["state_name"] == "Completed", e2e.outcomes(runs)
        [(acquired, _)] = e2e.lock_intervals([newest["id"]])
        waits[point.name] = (acquired - point.killed_wall).total_seconds()
        # Blocked by the dead run at most until its lease ends and the repossessor frees it;
        # a push that arrives after that gets the lock as soon as its run starts.
        freed = point.killed_wall + timedelta(seconds=LEASE + REPOSSESSOR + 10)
        started = datetime.fromisoformat(newest["start_time"])
        assert acquired <= max(freed, started + timedelta(seconds=10)), (waits, newest["name"])
        [instance] = e2e.live_for(point.pr)
        assert tags(instance)["Sha"] == SECOND
    for point in points:
        print(
            f"{point.name:<25} PR showed {point.told!r}, deployment {point.deployment};"
            f" next run locked after {waits[point.name]:.1f} s;"
            f" the sweep would remove {point.left or 'nothing'}"
        )
