"""Crash safety (issue 8): a preview run stopped dead after any step leaves nothing that the
next sweep does not remove, and the next run for the PR converges to one healthy preview.

"Stopped dead" is a ``BaseException`` raised right after the step's effect happened: none of
the flow's failure handling (diagnosis, short TTL, comment) runs, as when the process is
killed. Only the lock's own ``finally`` still releases it, where a killed process would leave
the lock to its lease expiry.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterName,
)
from prefect.client.schemas.sorting import ArtifactSort
from prefect.exceptions import ObjectNotFound

import flows.preview
import flows.run_end
import tasks.run.locks
from flows.crash_report import pr_crash_report
from flows.preview import pr_preview
from flows.teardown import pr_teardown
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import BOOTSTRAP_CHECK, Reply, ScriptedInstances
from tasks.cloud.aws import AwsClients
from tasks.cloud.tags import parse_time
from tasks.config import PreviewConfig
from tasks.run.locks import pr_lock_name
from tasks.steps.sweep import sweep
from tests.support import CANARY_GHCR_TOKEN
from tests.support.moto_state import live, tags

pytestmark = [pytest.mark.crash, pytest.mark.usefixtures("prefect_server")]

REPO = "octo-org/app"
OLD, NEW = "0" * 39 + "1", "f" * 39 + "2"


class Killed(BaseException):
    """The run's process died here."""


class DiesAfter:
    """``step`` that kills the run once it has done its work, called or submitted."""

    def __init__(self, step: Any) -> None:
        self.step, self.name = step, getattr(step, "name", "step")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.step(*args, **kwargs)
        raise Killed(self.name)

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        future = self.step.submit(*args, **kwargs)
        name = self.name

        class Dying:
            def result(self, *args: Any, **kwargs: Any) -> Any:
                future.result(*args, **kwargs)
                raise Killed(name)

        return Dying()


def kill_after(monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """Make the flow die right after ``step`` (a step the flow calls) has done its work."""
    monkeypatch.setattr(flows.preview, step, DiesAfter(getattr(flows.preview, step)))


@pytest.fixture(autouse=True)
def world(config: PreviewConfig, registry: FakeRegistry, scripted_ssm: ScriptedInstances) -> None:
    config.image = f"{registry.host}/octo-org/app"
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    for sha in (OLD, NEW):
        registry.push("octo-org/app", sha, private=True)
    scripted_ssm.healthy()


def latest_comment(pr_number: int) -> str:
    """The newest version of the PR's comment artifact (how a run without a token tells it)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"pr-{pr_number}-comment"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    return str(found[0].data) if found else ""


def assert_the_next_sweep_removes_the_debris(
    aws: AwsClients, config: PreviewConfig, instances: ScriptedInstances
) -> None:
    """Whatever the dead run left carries its tags and the short TTL (unless it was already
    confirmed ready), so the first sweep after the short TTL would remove it: asked as a dry
    run, so the next preview run can show it converges from the same state."""
    now = datetime.now(UTC)
    after_short_ttl = now + timedelta(hours=config.failure_ttl_hours, minutes=1)
    report = sweep(aws.ec2, config, now=after_short_ttl, dry_run=True)
    doomed = {d.instance_id for d in report.decisions if d.action == "terminate"}
    for instance in live(aws):
        found = tags(instance)
        assert {"Purpose", "Repo", "PR", "Sha", "shutdown-at"} <= found.keys()
        expires = parse_time(found["shutdown-at"])
        assert expires is not None
        if expires > after_short_ttl:  # only a preview already confirmed ready
            assert expires <= now + timedelta(hours=config.ttl_hours, minutes=1)
            assert instances.count(r"shutdown -h \+1440 ", instance["InstanceId"]) >= 1
        else:
            assert instance["InstanceId"] in doomed


@pytest.mark.parametrize(
    "step",
    ["guard", "terminate", "launch", "wait_ready", "migrate", "probe", "confirm_ttl"],
)
def test_a_new_preview_killed_after_each_step(
    aws: AwsClients,
    config: PreviewConfig,
    scripted_ssm: ScriptedInstances,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    with monkeypatch.context() as patch:
        kill_after(patch, step)
        with pytest.raises(Killed):
            pr_preview(REPO, 5, NEW, action="opened", config=config)
    left = [i["InstanceId"] for i in live(aws)]
    assert_the_next_sweep_removes_the_debris(aws, config, scripted_ssm)
    # The on_crashed hook told the PR (no token here: the comment is the run's artifact).
    told = latest_comment(5)
    assert "💥 Preview run crashed" in told and "⏳" not in told
    for instance_id in left:
        assert instance_id in told and "expires at" in told
    if not left:
        assert "It left no instance running." in told

    again = pr_preview(REPO, 5, NEW, config=config)
    assert again.status == "ready"
    [instance] = live(aws)
    assert tags(instance)["Sha"] == NEW and instance["InstanceId"] == again.instance_id
    assert left in ([], [again.instance_id])  # the dead run's instance was taken over


@pytest.mark.parametrize("step", ["preview_health", "start_pull", "update_in_place", "show_stages"])
def test_a_push_killed_during_the_in_place_update(
    aws: AwsClients,
    config: PreviewConfig,
    scripted_ssm: ScriptedInstances,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    first = pr_preview(REPO, 7, OLD, action="opened", config=config)
    with monkeypatch.context() as patch:
        kill_after(patch, step)
        with pytest.raises(Killed):
            pr_preview(REPO, 7, NEW, config=config)
    assert_the_next_sweep_removes_the_debris(aws, config, scripted_ssm)

    again = pr_preview(REPO, 7, NEW, config=config)
    assert again.status == "ready"
    [instance] = live(aws)
    assert tags(instance)["Sha"] == NEW
    assert instance["InstanceId"] in (first.instance_id, again.instance_id)


def test_a_run_that_loses_its_lock_fails_before_its_next_change(
    aws: AwsClients, config: PreviewConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease cannot be renewed (the server lost it): the run must not launch anything."""

    def refused(lease_id: object, lease_seconds: float) -> None:
        raise RuntimeError("404: lease not found")

    monkeypatch.setattr(tasks.run.locks, "_renew", refused)
    monkeypatch.setattr(tasks.run.locks, "RENEWALS_PER_LEASE", 6000)  # renew every 10 ms
    guarded = flows.preview.guard

    def slow_guard(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1)  # holding the PR lock: long enough for three failed renewals
        return guarded(*args, **kwargs)

    monkeypatch.setattr(flows.preview, "guard", slow_guard)

    with pytest.raises(Exception, match="is no longer held: its lease could not be renewed"):
        pr_preview(REPO, 11, NEW, action="opened", config=config)

    assert live(aws) == []
    told = latest_comment(11)
    assert "❌ Preview failed" in told and "no longer held" in told


def test_a_run_past_its_time_budget_fails_like_any_failed_run(
    aws: AwsClients,
    config: PreviewConfig,
    scripted_ssm: ScriptedInstances,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bootstrap never finishes; the run's budget ends before wait-ready gives up."""
    scripted_ssm.on(BOOTSTRAP_CHECK, Reply(stdout="bootstrap-pending\n"))
    config.poll_seconds = 0.2  # the wait is the budget: five looks a second, not a hundred
    # Long enough to launch on a loaded machine, well short of wait-ready's own 30 s.
    monkeypatch.setattr(PreviewConfig, "preview_timeout_seconds", lambda self: 12.0)
    started = time.monotonic()

    with pytest.raises(Exception, match="RunTimedOut: the run used up its 12 s budget"):
        pr_preview(REPO, 12, NEW, action="opened", config=config)

    assert time.monotonic() - started < config.ready_timeout_seconds
    [instance] = live(aws)
    expires = parse_time(tags(instance)["shutdown-at"])
    assert expires is not None
    assert expires <= datetime.now(UTC) + timedelta(hours=config.failure_ttl_hours, minutes=1)
    told = latest_comment(12)
    assert "❌ Preview failed" in told and instance["InstanceId"] in told


def test_teardown_deletes_the_prs_lock(aws: AwsClients, config: PreviewConfig) -> None:
    assert pr_preview(REPO, 13, NEW, action="opened", config=config).status == "ready"
    pr_teardown(REPO, 13, config=config)
    with get_client(sync_client=True) as client, pytest.raises(ObjectNotFound):
        client.read_global_concurrency_limit_by_name(pr_lock_name(REPO, 13))
    assert live(aws) == []


def test_the_crash_report_flow_tells_the_pr_when_no_hook_ran(
    aws: AwsClients, config: PreviewConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server-side path: a worker that runs no hooks (ECS, Kubernetes) still gets the PR
    told, by the pr-crash-report deployment its automation starts."""
    with monkeypatch.context() as patch:
        patch.setattr(flows.run_end, "report_run_end", lambda *a, **k: None)  # no hook
        kill_after(patch, "launch")
        with pytest.raises(Killed):
            pr_preview(REPO, 14, NEW, action="opened", config=config)
    assert "⏳ Preview launching" in latest_comment(14)
    with get_client(sync_client=True) as client:
        [crashed] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"pr-14-{NEW[:7]}"])),
            limit=1,
        )
    assert crashed.state is not None and crashed.state.type.value == "CRASHED"

    said = pr_crash_report(str(crashed.id))

    [instance] = live(aws)
    told = latest_comment(14)
    assert said.startswith(f"told {REPO}#14")
    assert "💥 Preview run crashed" in told and instance["InstanceId"] in told
