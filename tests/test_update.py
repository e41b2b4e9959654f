"""In-place update and the failure TTL, asserted on the tags and instances moto holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.cloud.aws import AwsClients
from tasks.cloud.on_instance import compose_command
from tasks.cloud.tags import TAG_SHA, TAG_SHUTDOWN_AT, TAG_UPDATED_AT, format_time
from tasks.config import PreviewConfig
from tasks.steps.update import (
    UpdateFailed,
    check_health,
    deploy_commands,
    deploy_in_place,
    health_commands,
    set_short_ttl,
)
from tests.support import CANARIES
from tests.support.ssm import DEPLOY, HEALTH, Reply, ScriptedInstances

OLD_SHA = "1111111111111111111111111111111111111111"
NEW_SHA = "2222222222222222222222222222222222222222"
DIGEST = "sha256:" + "ab" * 32  # what the image check saw for NEW_SHA
LAUNCHED = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

ONE_ACCOUNT_PER_MODULE = True  # see tests/conftest.py: aws, account, config


def launch_preview(aws: AwsClients, shutdown_at: str | None = None) -> str:
    images = aws.ec2.describe_images(
        Owners=["amazon"], Filters=[{"Name": "name", "Values": ["al2023-ami-2023*-x86_64"]}]
    )["Images"]
    tags: list[dict[str, str]] = [
        {"Key": "Purpose", "Value": "pr-preview-singleton"},
        {"Key": "Repo", "Value": "octo-org/app"},
        {"Key": "PR", "Value": "42"},
        {"Key": TAG_SHA, "Value": OLD_SHA},
    ]
    if shutdown_at is not None:
        tags.append({"Key": TAG_SHUTDOWN_AT, "Value": shutdown_at})
    reservation = aws.ec2.run_instances(
        ImageId=images[0]["ImageId"],
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],  # type: ignore[misc,list-item]
    )
    return reservation["Instances"][0]["InstanceId"]


def tags_of(aws: AwsClients, instance_id: str) -> dict[str, str]:
    instance = aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0][
        "Instances"
    ][0]
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}


def all_instances(aws: AwsClients) -> list[str]:
    return [
        instance["InstanceId"]
        for reservation in aws.ec2.describe_instances()["Reservations"]
        for instance in reservation["Instances"]
    ]


def test_update_deploys_the_new_sha_and_moves_the_tags(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
):
    instance = launch_preview(aws, format_time(LAUNCHED + timedelta(hours=24)))
    scripted_ssm.on(DEPLOY, Reply(stdout=f"updated to ghcr.io/octo-org/app:{NEW_SHA}\n"))
    before = all_instances(aws)

    result = deploy_in_place(
        aws.ec2, aws.ssm, config, instance, repo="octo-org/app", sha=NEW_SHA, digest=DIGEST, now=NOW
    )

    assert (result.previous_sha, result.sha, result.path) == (OLD_SHA, NEW_SHA, "in-place")
    assert result.image == f"ghcr.io/octo-org/app:{NEW_SHA}@{DIGEST}"
    tags = tags_of(aws, instance)
    assert tags[TAG_SHA] == NEW_SHA
    assert tags[TAG_UPDATED_AT] == "2026-11-28T12:00:00Z"
    # provisional until the flow confirms the preview ready
    assert tags[TAG_SHUTDOWN_AT] == format_time(NOW + timedelta(hours=config.failure_ttl_hours))
    assert all_instances(aws) == before  # no new instance
    (script,) = scripted_ssm.commands(instance, DEPLOY)
    # The checked manifest, whatever the tag says by the time the instance pulls.
    assert f'echo APP_IMAGE=ghcr.io/octo-org/app:{NEW_SHA}@{DIGEST}; }} > "$tmp"' in script
    assert "--password-stdin" in script and "/pr-preview/ghcr-token" in script
    compose = compose_command("/srv/app")
    assert f"{compose} pull api" in script and f"{compose} up -d" in script
    for canary in CANARIES:
        assert canary not in script


def test_failed_update_keeps_the_old_tags(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
):
    instance = launch_preview(aws, format_time(LAUNCHED + timedelta(hours=24)))
    scripted_ssm.on(
        DEPLOY,
        Reply(
            stderr="Error response from daemon: manifest for ghcr.io/octo-org/app:2222222 not"
            " found: manifest unknown\n",
            exit_code=18,
        ),
    )

    with pytest.raises(UpdateFailed) as raised:
        deploy_in_place(
            aws.ec2,
            aws.ssm,
            config,
            instance,
            repo="octo-org/app",
            sha=NEW_SHA,
            digest=DIGEST,
            now=NOW,
        )

    assert "manifest unknown" in raised.value.output
    assert tags_of(aws, instance)[TAG_SHA] == OLD_SHA


def test_update_refuses_an_instance_that_is_not_running(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
):
    instance = launch_preview(aws)
    aws.ec2.stop_instances(InstanceIds=[instance])

    with pytest.raises(UpdateFailed, match="stopped"):
        deploy_in_place(
            aws.ec2, aws.ssm, config, instance, repo="octo-org/app", sha=NEW_SHA, digest=DIGEST
        )
    assert scripted_ssm.commands(instance) == []


def test_update_rejects_what_is_not_a_sha(aws: AwsClients, config: PreviewConfig):
    with pytest.raises(ValueError):
        deploy_in_place(
            aws.ec2,
            aws.ssm,
            config,
            "i-0",
            repo="octo-org/app",
            sha="main; rm -rf /",
            digest=DIGEST,
        )


@pytest.mark.parametrize("digest", ["", "latest", "sha256:abc", f"{DIGEST}\nreboot"])
def test_update_pulls_only_a_manifest_digest(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, digest: str
) -> None:
    instance = launch_preview(aws)

    with pytest.raises(ValueError, match="not a manifest digest"):
        deploy_in_place(
            aws.ec2, aws.ssm, config, instance, repo="octo-org/app", sha=NEW_SHA, digest=digest
        )
    assert scripted_ssm.commands(instance) == []


def test_health_says_healthy_only_when_bootstrapped_and_listening(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
):
    healthy, closed, offline, stopped = (launch_preview(aws) for _ in range(4))
    scripted_ssm.on(HEALTH, Reply(stdout="healthy\n"), instance_id=healthy)
    scripted_ssm.on(HEALTH, Reply(stdout="app port 8000 closed\n", exit_code=1), instance_id=closed)
    scripted_ssm.agent_offline(offline)
    aws.ec2.stop_instances(InstanceIds=[stopped])

    answers = {
        instance: check_health(aws.ec2, aws.ssm, config, instance)
        for instance in (healthy, closed, offline, stopped)
    }

    assert [(answer.healthy, answer.reason) for answer in answers.values()] == [
        (True, "healthy"),
        (False, "app port 8000 closed"),
        (False, "SSM agent not reachable"),
        (False, "instance is stopped"),
    ]


def test_health_of_a_missing_instance(aws: AwsClients, config: PreviewConfig):
    answer = check_health(aws.ec2, aws.ssm, config, "i-0123456789abcdef0")

    assert (answer.healthy, answer.reason) == (False, "instance not found")


def test_shorten_ttl_moves_shutdown_at_to_the_failure_ttl(aws: AwsClients):
    instance = launch_preview(aws, format_time(NOW + timedelta(hours=24)))

    change = set_short_ttl(aws.ec2, instance, 1.0, now=NOW)

    assert change.changed
    assert tags_of(aws, instance)[TAG_SHUTDOWN_AT] == "2026-11-28T13:00:00Z"
    assert change.after == NOW + timedelta(hours=1)


def test_shorten_ttl_never_makes_it_later(aws: AwsClients):
    soon = format_time(NOW + timedelta(minutes=10))
    instance = launch_preview(aws, soon)

    change = set_short_ttl(aws.ec2, instance, 1.0, now=NOW)

    assert not change.changed
    assert tags_of(aws, instance)[TAG_SHUTDOWN_AT] == soon


@pytest.mark.parametrize("tag", [None, "next tuesday"])
def test_shorten_ttl_sets_a_missing_or_unreadable_tag(aws: AwsClients, tag: str | None):
    instance = launch_preview(aws, tag)

    set_short_ttl(aws.ec2, instance, 1.0, now=NOW)

    assert tags_of(aws, instance)[TAG_SHUTDOWN_AT] == "2026-11-28T13:00:00Z"


def test_health_check_gives_bash_the_port_as_an_argument(config: PreviewConfig) -> None:
    script = "\n".join(health_commands(config))

    assert """bash -c 'echo > "/dev/tcp/$1/$2"' tcp-check 127.0.0.1 8000""" in script
    assert "/dev/tcp/127.0.0.1" not in script


def test_deploy_quotes_what_it_was_given(config: PreviewConfig) -> None:
    script = "\n".join(deploy_commands(config, "octo-org/app", "ghcr.io/octo-org/app:$(reboot)"))

    assert "echo 'APP_IMAGE=ghcr.io/octo-org/app:$(reboot)'; }" in script
    assert "docker image inspect 'ghcr.io/octo-org/app:$(reboot)' >/dev/null" in script
