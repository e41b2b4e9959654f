"""Crash safety (issue 8): a preview run stopped dead after any step leaves nothing that the
next sweep does not remove, and the next run for the PR converges to one healthy preview.

"Stopped dead" is a ``BaseException`` raised right after the step's effect happened: none of
the flow's failure handling (diagnosis, short TTL, comment) runs, as when the process is
killed. Only the lock's own ``finally`` still releases it, where a killed process would leave
the lock to its lease expiry.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

import flows.preview
from flows.preview import pr_preview
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import ScriptedInstances
from tasks.aws import AwsClients
from tasks.config import PreviewConfig
from tasks.sweep import sweep
from tasks.tags import parse_time
from tests.support import CANARY_GHCR_TOKEN
from tests.support.moto_state import live, tags

pytestmark = [pytest.mark.crash, pytest.mark.usefixtures("prefect_server")]

REPO = "octo-org/app"
OLD, NEW = "0" * 39 + "1", "f" * 39 + "2"


class Killed(BaseException):
    """The run's process died here."""


def dies_after(step: Callable[..., Any]) -> Callable[..., Any]:
    def run_then_die(*args: Any, **kwargs: Any) -> Any:
        step(*args, **kwargs)
        raise Killed(getattr(step, "name", "step"))

    return run_then_die


def kill_after(monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """Make the flow die right after ``step`` (a step the flow calls) has done its work."""
    monkeypatch.setattr(flows.preview, step, dies_after(getattr(flows.preview, step)))


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


@pytest.mark.parametrize("step", ["preview_health", "update_in_place", "migrate", "probe"])
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
