"""The preview and teardown flows end to end on a real (temporary) Prefect server and moto."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, LogFilter
from prefect.states import State

import flows.preview
from flows.preview import pr_preview
from flows.teardown import pr_teardown
from local_stack.account import DemoAccount
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import BOOTSTRAP_CHECK, HEALTH, MIGRATE, Reply, ScriptedInstances
from tasks.cloud.aws import AwsClients
from tasks.cloud.tags import parse_time
from tasks.config import PreviewConfig
from tests.fakes.aws_faults import aws_faults
from tests.support import CANARIES, CANARY_DATABASE_URL, CANARY_GHCR_TOKEN
from tests.support.moto_state import live, ssm_commands, state_of, tags, user_data
from tests.support.moving_tags import moving_tags

pytestmark = pytest.mark.usefixtures("prefect_server", "healthy_world")

REPO = "octo-org/app"
SHA1 = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SHA2 = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"


@pytest.fixture
def healthy_world(
    config: PreviewConfig, registry: FakeRegistry, scripted_ssm: ScriptedInstances
) -> None:
    """Every image is pushed and every instance boots and answers."""
    config.image = f"{registry.host}/octo-org/app"
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    for sha in (SHA1, SHA2):
        registry.push("octo-org/app", sha, private=True)
    scripted_ssm.healthy()


def run_record(state: State[Any]) -> tuple[str, list[str], list[str]]:
    """Name, log messages and artifact bodies (oldest first) of the flow run behind ``state``."""
    run_id: UUID = state.state_details.flow_run_id  # type: ignore[assignment]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run_id]}))
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id={"any_": [run_id]}),
            artifact_filter=ArtifactFilter(),
        )
    artifacts = sorted(artifacts, key=lambda artifact: artifact.created or 0)  # type: ignore[arg-type, return-value]
    return run.name, [log.message for log in logs], [str(a.data) for a in artifacts]


def assert_no_secret(*texts: str) -> None:
    leaked = [canary for canary in CANARIES for text in texts if canary in text]
    assert not leaked


def test_open_rerun_push_in_place_and_close(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    opened = pr_preview(REPO, 42, SHA1, action="opened", config=config, return_state=True)
    first = opened.result()
    assert (first.status, first.path) == ("ready", "launched")
    [instance] = live(aws)
    expires = parse_time(tags(instance)["shutdown-at"])
    assert expires is not None and expires > datetime.now(UTC) + timedelta(hours=23)
    assert scripted_ssm.count(r"shutdown -h \+1440 ", first.instance_id) == 1  # timer moved too
    assert first.probe.startswith("/healthz → 200")
    name, logs, artifacts = run_record(opened)
    assert name == "pr-42-1a2b3c4"
    assert any(first.instance_id in body and "Preview ready" in body for body in artifacts)
    assert any("Preflight passed" in body for body in artifacts)
    assert_no_secret(*logs, *artifacts)

    again = pr_preview(REPO, 42, SHA1, action="opened", config=config)
    assert (again.path, again.instance_id) == ("reused", first.instance_id)
    assert [i["InstanceId"] for i in live(aws)] == [first.instance_id]

    pushed = pr_preview(REPO, 42, SHA2, action="synchronize", config=config, return_state=True)
    updated = pushed.result()
    assert (updated.path, updated.instance_id) == ("in-place", first.instance_id)
    [current] = live(aws)  # no new instance: the push was deployed on the running one
    assert current["InstanceId"] == first.instance_id
    assert tags(current)["Sha"] == SHA2
    assert any("Preview updated in place" in body for body in run_record(pushed)[2])

    closed = pr_teardown(REPO, 42, config=config, return_state=True)
    assert closed.result().terminated == [first.instance_id]
    assert run_record(closed)[0] == "pr-42-teardown"
    assert live(aws) == []


def test_push_to_an_unhealthy_preview_relaunches(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    first = pr_preview(REPO, 43, SHA1, action="opened", config=config)
    scripted_ssm.on(
        HEALTH, Reply(stdout="unhealthy: api exited\n", exit_code=1), instance_id=first.instance_id
    )
    pushed = pr_preview(REPO, 43, SHA2, config=config)
    assert pushed.path == "launched"
    assert pushed.replaced == [first.instance_id]
    assert state_of(aws, first.instance_id or "") == "terminated"
    [current] = live(aws)
    assert (current["InstanceId"], tags(current)["Sha"]) == (pushed.instance_id, SHA2)


def test_failed_preview_keeps_instance_on_short_ttl_with_diagnosis(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    scripted_ssm.on(
        BOOTSTRAP_CHECK,
        Reply(
            stdout="bootstrap-failed\nghcr-login\n",
            stderr="Error response from daemon: Get https://ghcr.io/v2/: unauthorized\n",
        ),
    )
    scripted_ssm.on(
        r"cloud-init-output",
        Reply(stdout='Error response from daemon: Get "https://ghcr.io/v2/": unauthorized\n'),
    )
    state = pr_preview(REPO, 44, SHA1, config=config, return_state=True)
    assert state.is_failed()
    _, logs, artifacts = run_record(state)
    [instance] = live(aws)  # kept for debugging ...
    expires = parse_time(tags(instance)["shutdown-at"])
    assert expires is not None
    assert expires <= datetime.now(UTC) + timedelta(hours=config.failure_ttl_hours, minutes=1)
    *_, comment = (body for body in artifacts if "pr-preview:octo-org/app#44" in body)
    assert "Preview failed" in comment and "read:packages" in comment
    assert any(body.startswith("## Diagnosis") for body in artifacts)
    assert_no_secret(*logs, *artifacts)


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


def test_optional_db_sg_rule_is_opened_and_revoked(
    aws: AwsClients, account: DemoAccount, config: PreviewConfig
) -> None:
    config.db_sg_open_public_ip = True
    ready = pr_preview(REPO, 45, SHA1, config=config)
    [instance] = live(aws)
    rules = aws.ec2.describe_security_group_rules(
        Filters=[{"Name": "group-id", "Values": [account.db_sg_id]}]
    )["SecurityGroupRules"]
    [opened] = [r for r in rules if r.get("Description") == f"pr-preview {ready.instance_id}"]
    assert opened["CidrIpv4"] == f"{instance['PublicIpAddress']}/32"
    assert (opened["FromPort"], opened["ToPort"]) == (5432, 5432)

    pr_teardown(REPO, 45, config=config)
    rules = aws.ec2.describe_security_group_rules(
        Filters=[{"Name": "group-id", "Values": [account.db_sg_id]}]
    )["SecurityGroupRules"]
    assert not [r for r in rules if "pr-preview" in r.get("Description", "")]
    assert any(r.get("ReferencedGroupInfo") for r in rules)  # the api-sg rule stays


def test_failed_in_place_update_relaunches_on_a_fresh_instance(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    first = pr_preview(REPO, 46, SHA1, action="opened", config=config)
    config.migrate_timeout_seconds = 0.3
    scripted_ssm.on(
        MIGRATE,
        Reply(stderr="sqlalchemy.exc.OperationalError: connection timed out\n", exit_code=1),
        instance_id=first.instance_id,
    )
    pushed = pr_preview(REPO, 46, SHA2, config=config)
    assert (pushed.status, pushed.path) == ("ready", "launched")
    assert pushed.replaced == [first.instance_id]
    assert state_of(aws, first.instance_id or "") == "terminated"
    [current] = live(aws)
    assert current["InstanceId"] == pushed.instance_id != first.instance_id
    assert tags(current)["Sha"] == SHA2


def test_an_in_place_error_that_is_not_a_refusal_fails_the_run_and_keeps_the_instance(
    aws: AwsClients, config: PreviewConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only "this instance cannot take the push" relaunches; a bug surfaces as itself."""
    first = pr_preview(REPO, 48, SHA1, action="opened", config=config)

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug in the deploy")

    monkeypatch.setattr(flows.preview, "update_in_place", broken)
    state = pr_preview(REPO, 48, SHA2, config=config, return_state=True)
    assert state.is_failed()
    with pytest.raises(KeyError, match="a bug in the deploy"):
        state.result()
    [current] = live(aws)
    assert (current["InstanceId"], tags(current)["Sha"]) == (first.instance_id, SHA1)


def test_the_instance_pulls_what_the_check_saw_though_the_tag_moves(
    aws: AwsClients, config: PreviewConfig, registry: FakeRegistry
) -> None:
    with moving_tags(registry, "octo-org/app") as moving:
        image = config.image = f"{moving.host}/octo-org/app"
        moving.move(SHA1)

        opened = pr_preview(REPO, 47, SHA1, action="opened", config=config)

        checked, repointed = moving.moved[SHA1]
        assert checked != repointed == registry.repositories["octo-org/app"].tags[SHA1]
        assert opened.image == f"{image}:{SHA1}@{checked}"
        script = user_data(aws, opened.instance_id or "")
        assert f"printf '%s\\n' APP_IMAGE={image}:{SHA1}@{checked} APP_HOST_PORT=" in script
        assert repointed not in script

        moving.move(SHA2)
        pushed = pr_preview(REPO, 47, SHA2, action="synchronize", config=config)

        checked, repointed = moving.moved[SHA2]
        assert (pushed.path, pushed.image) == ("in-place", f"{image}:{SHA2}@{checked}")
        [deploy] = [
            text for text in ssm_commands(aws, opened.instance_id or "") if "APP_IMAGE=" in text
        ]
        assert f'echo APP_IMAGE={image}:{SHA2}@{checked}; }} > "$tmp"' in deploy
        assert repointed not in deploy


def test_the_teardown_command_runs_first_and_its_failure_blocks_nothing(
    aws: AwsClients,
    config: PreviewConfig,
    scripted_ssm: ScriptedInstances,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config.teardown_command = "python -m app.unregister --pr 43 '$(reboot)'"
    scripted_ssm.on(
        r"app\.unregister",
        Reply(stdout=f"cannot reach {CANARY_DATABASE_URL}\n", stderr="Traceback…\n", exit_code=3),
    )
    launched = pr_preview(REPO, 43, SHA1, action="opened", config=config)
    assert launched.status == "ready"
    assert scripted_ssm.count(r"app\.unregister") == 0  # a teardown's, not a deploy's

    closed = pr_teardown(REPO, 43, config=config, return_state=True)
    assert closed.result().terminated == [launched.instance_id]
    assert live(aws) == []
    [sent] = scripted_ssm.commands(launched.instance_id, r"app\.unregister")
    # In the app service, each word one argument: no shell reads the $(...).
    assert "run --rm -T api python -m app.unregister --pr 43 '$(reboot)'" in sent
    logs = [record.getMessage() for record in caplog.records]
    [failed] = [message for message in logs if "failed (exit 3); terminating anyway" in message]
    assert "cannot reach postgresql+asyncpg://" in failed  # the output, masked
    assert_no_secret(*logs)
