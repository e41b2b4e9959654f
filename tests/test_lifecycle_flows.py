"""The preview and teardown flows end to end on a real (temporary) Prefect server and moto."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, LogFilter
from prefect.states import State

from flows.preview import pr_preview
from flows.teardown import pr_teardown
from tasks.aws import AwsClients
from tasks.config import PreviewConfig
from tests.conftest import CANARIES
from tests.fakes.aws_faults import aws_faults
from tests.helpers import live, state_of, tags

pytestmark = pytest.mark.usefixtures("prefect_server")

REPO = "octo-org/app"
SHA1 = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SHA2 = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"


def run_record(state: State[Any]) -> tuple[str, list[str], list[str]]:
    """Name, log messages and artifact bodies of the flow run behind ``state``."""
    run_id: UUID = state.state_details.flow_run_id  # type: ignore[assignment]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run_id]}))
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id={"any_": [run_id]}),
            artifact_filter=ArtifactFilter(),
        )
    return run.name, [log.message for log in logs], [str(a.data) for a in artifacts]


def assert_no_secret(*texts: str) -> None:
    leaked = [canary for canary in CANARIES for text in texts if canary in text]
    assert not leaked


def test_open_sync_rerun_and_close(aws: AwsClients, config: PreviewConfig) -> None:
    opened = pr_preview(REPO, 42, SHA1, action="opened", config=config, return_state=True)
    first = opened.result()
    assert first.status == "launched"
    name, logs, artifacts = run_record(opened)
    assert name == "pr-42-1a2b3c4"
    assert any(first.instance_id in body for body in artifacts)
    assert any("Preflight passed" in body for body in artifacts)
    assert_no_secret(*logs, *artifacts)

    again = pr_preview(REPO, 42, SHA1, action="opened", config=config)
    assert (again.status, again.instance_id) == ("reused", first.instance_id)
    assert [i["InstanceId"] for i in live(aws)] == [first.instance_id]

    pushed = pr_preview(REPO, 42, SHA2, action="synchronize", config=config)
    assert pushed.replaced == [first.instance_id]
    assert state_of(aws, first.instance_id or "") == "terminated"
    [current] = live(aws)
    assert tags(current)["Sha"] == SHA2

    closed = pr_teardown(REPO, 42, config=config, return_state=True)
    assert closed.result().terminated == [current["InstanceId"]]
    assert run_record(closed)[0] == "pr-42-teardown"
    assert live(aws) == []


def test_throttled_launch_is_retried(aws: AwsClients, config: PreviewConfig) -> None:
    with aws_faults() as faults:
        faults.fail("ec2.RunInstances", "RequestLimitExceeded", times=2)
        result = pr_preview(REPO, 7, SHA1, config=config)
    assert faults.injected["ec2.RunInstances"] == 2
    assert [i["InstanceId"] for i in live(aws)] == [result.instance_id]


def test_launch_throttled_every_time_fails_and_leaves_nothing(
    aws: AwsClients, config: PreviewConfig
) -> None:
    with aws_faults() as faults:
        faults.fail("ec2.RunInstances", "RequestLimitExceeded")
        state = pr_preview(REPO, 8, SHA1, config=config, return_state=True)
    assert state.is_failed()
    assert faults.injected["ec2.RunInstances"] == config.task_retries + 1
    assert live(aws) == []


def test_permanent_error_is_not_retried(aws: AwsClients, config: PreviewConfig) -> None:
    with aws_faults() as faults:
        faults.fail("ec2.RunInstances", "InvalidParameterValue", status=400)
        state = pr_preview(REPO, 9, SHA1, config=config, return_state=True)
    assert state.is_failed()
    assert faults.injected["ec2.RunInstances"] == 1
    assert live(aws) == []


def test_failed_preflight_launches_nothing(aws: AwsClients, config: PreviewConfig) -> None:
    config.instance_profile = "missing-profile"
    state = pr_preview(REPO, 10, SHA1, config=config, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="instance profile missing-profile does not exist"):
        state.result()
    assert live(aws) == []


@pytest.mark.parametrize(
    ("repo", "pr", "sha", "message"),
    [
        ("not-a-repo", 1, SHA1, "owner/name"),
        (REPO, 0, SHA1, "positive"),
        (REPO, 1, "HEAD", "hex"),
    ],
)
def test_bad_parameters_change_nothing(
    aws: AwsClients, config: PreviewConfig, repo: str, pr: int, sha: str, message: str
) -> None:
    state = pr_preview(repo, pr, sha, config=config, return_state=True)
    with pytest.raises(ValueError, match=message):
        state.result()
    assert live(aws) == []
