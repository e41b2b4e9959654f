from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.app.user_data import (
    USER_DATA_LIMIT,
    LaunchSpec,
    UserDataTooLarge,
    render_spare_user_data,
    render_user_data,
)
from tasks.cloud.aws import AwsClients
from tasks.cloud.tags import parse_time
from tasks.config import PreviewConfig
from tasks.steps.compose import MAX_RENDERED_BYTES
from tasks.steps.launch import client_token, launch_instance
from tests.support import CANARIES
from tests.support.moto_state import live, tags, user_data

SPEC = LaunchSpec("octo-org/app", 42, "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d")


def test_launch_tags_instance_and_volume_and_hardens_it(
    aws: AwsClients, config: PreviewConfig
) -> None:
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    result = launch_instance(aws.ec2, config, SPEC, now=now)
    instance = aws.ec2.describe_instances(InstanceIds=[result.instance_id])["Reservations"][0][
        "Instances"
    ][0]
    expected = {
        "Purpose": "pr-preview-singleton",
        "Repo": "octo-org/app",
        "PR": "42",
        "Sha": SPEC.sha,
        "shutdown-at": "2026-11-28T13:00:00Z",  # provisional: failure_ttl_hours until ready
        "Name": "pr-42-preview",
    }
    assert expected.items() <= tags(instance).items()
    assert parse_time(tags(instance)["shutdown-at"]) == now + timedelta(hours=1)
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    # Hop limit 1: a container on the instance cannot reach the role's credentials.
    assert instance["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert instance["IamInstanceProfile"]["Arn"].endswith("/ec2-pr-preview-ssm")
    assert instance["SubnetId"] == config.subnet_id
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == config.security_group_ids
    behaviour = aws.ec2.describe_instance_attribute(
        InstanceId=result.instance_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    volume_ids = [m["Ebs"]["VolumeId"] for m in instance["BlockDeviceMappings"]]
    volumes = aws.ec2.describe_volumes(VolumeIds=volume_ids)["Volumes"]
    assert volumes and all(expected.items() <= tags(v).items() for v in volumes)


def test_user_data_reads_secrets_at_boot_and_holds_none(
    aws: AwsClients, config: PreviewConfig
) -> None:
    result = launch_instance(aws.ec2, config, SPEC)
    script = user_data(aws, result.instance_id)
    assert not [canary for canary in CANARIES if canary in script]
    assert "--with-decryption --name" in script
    assert config.ghcr_token_parameter in script and config.database_url_parameter in script
    assert "docker login ghcr.io -u octo-org --password-stdin" in script
    assert f"APP_IMAGE=ghcr.io/octo-org/app:{SPEC.sha}" in script
    assert "releases/download/v2.40.3/docker-compose-linux-" in script
    assert f"/repos/octo-org/app/tarball/{SPEC.sha}" in script
    assert "shutdown -h +60 " in script  # the short TTL until the preview is confirmed ready
    # The app publishes on the upstream port .env names, behind the app port's proxy.
    assert '"127.0.0.1:${APP_HOST_PORT}:8000"' in script
    assert "systemctl enable --now pr-preview-proxy.service" in script
    assert "{{" not in script


def test_the_instance_pulls_the_digest_the_check_saw(
    aws: AwsClients, config: PreviewConfig
) -> None:
    digest = "sha256:" + "5e" * 32
    pinned = LaunchSpec(SPEC.repo, SPEC.pr_number, SPEC.sha, digest=digest)

    result = launch_instance(aws.ec2, config, pinned)

    script = user_data(aws, result.instance_id)
    # compose pulls ${APP_IMAGE}: the manifest checked, whatever the tag names by boot time
    assert (
        f"printf '%s\\n' APP_IMAGE=ghcr.io/octo-org/app:{SPEC.sha}@{digest} APP_HOST_PORT=18000"
        ' | put "$APP_DIR/.env"' in script
    )
    assert "compose pull api" in script


@pytest.mark.parametrize("digest", ["latest", "sha256:" + "5e" * 31, f"sha256:{'5e' * 32} x"])
def test_a_launch_refuses_what_is_not_a_digest(
    aws: AwsClients, config: PreviewConfig, digest: str
) -> None:
    with pytest.raises(ValueError, match="not a manifest digest"):
        launch_instance(
            aws.ec2, config, LaunchSpec(SPEC.repo, SPEC.pr_number, SPEC.sha, digest=digest)
        )
    assert live(aws) == []


def test_a_spare_pulls_the_default_branchs_image_unless_turned_off() -> None:
    config = PreviewConfig(image="ghcr.io/octo-org/app")  # rendering reads no account
    pulled = render_spare_user_data(config)
    config.spare_base_tag = None
    bare = render_spare_user_data(config)

    assert "step=base-layers" in pulled and "docker pull ghcr.io/octo-org/app:main;" in pulled
    assert "docker login ghcr.io -u octo-org" in pulled  # the token from Parameter Store, piped
    assert "not pulled: a claim pulls the whole image" in pulled  # best effort, never fatal
    assert "step=base-layers" not in bare and "docker pull" not in bare
    assert "docker login" not in bare
    for script in (pulled, bare):
        assert not [canary for canary in CANARIES if canary in script]
        assert "--with-decryption --name" in script and "{{" not in script
        assert script.rstrip().endswith("exit 0")  # the spare stops before any app


def test_a_spare_that_cannot_name_one_image_says_so(caplog: pytest.LogCaptureFixture) -> None:
    config = PreviewConfig(allowed_repos=["octo-org/*"])  # no image, a pattern of repositories
    with caplog.at_level("WARNING", logger="tasks.steps.launch"):
        script = render_spare_user_data(config)
    assert "step=base-layers" not in script and "docker pull" not in script
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "spare_base_tag main: no single image to pull" in warning
    assert "octo-org/*" in warning and "set `image`" in warning


def test_ephemeral_database_adds_a_db_service(config: PreviewConfig) -> None:
    config.database = "ephemeral"
    script = render_user_data(config, SPEC)
    assert "  db:\n    image: postgres:16-alpine" in script
    assert "@db:5432/app" in script
    assert config.database_url_parameter not in script


def test_same_preview_twice_is_one_instance(aws: AwsClients, config: PreviewConfig) -> None:
    first = launch_instance(aws.ec2, config, SPEC, attempt_key="run-1")
    second = launch_instance(aws.ec2, config, SPEC, attempt_key="run-2")
    assert (first.reused, second.reused) == (False, True)
    assert second.instance_id == first.instance_id
    assert [i["InstanceId"] for i in live(aws)] == [first.instance_id]


def test_the_largest_compose_file_allowed_fits_in_the_user_data(config: PreviewConfig) -> None:
    """What the compose check lets through still fits EC2's 16 KB with every optional part of
    the bootstrap in it (a per-preview database, spare base layers, a long repository name)."""
    config.db_instance_id = "i-0123456789abcdef0"
    config.database = "per-preview"
    config.spare_base_tag = "main"
    filler = "x" * (MAX_RENDERED_BYTES - 60)
    rendered = '{"services":{"api":{"image":"${APP_IMAGE}","command":["' + filler + '"]}}}'
    assert len(rendered.encode()) <= MAX_RENDERED_BYTES
    spec = LaunchSpec("octo-org-with-a-long-name/" + "r" * 60, 7, "a" * 40, compose=rendered)
    for script in (render_user_data(config, spec), render_spare_user_data(config)):
        assert len(script.encode()) <= USER_DATA_LIMIT


def test_user_data_over_ec2s_limit_is_refused_before_anything_launches(
    aws: AwsClients, config: PreviewConfig
) -> None:
    config.env = {f"SETTING_{n}": "v" * 500 for n in range(20)}  # 10 KB of the app's settings
    with pytest.raises(UserDataTooLarge, match=f"over the {USER_DATA_LIMIT} EC2 accepts") as exc:
        launch_instance(aws.ec2, config, SPEC, attempt_key="run-1")
    assert "`env`" in str(exc.value)
    assert live(aws) == []


def test_client_token_is_stable_per_run_and_fits_aws() -> None:
    assert client_token(SPEC, "run-1") == client_token(SPEC, "run-1")
    assert client_token(SPEC, "run-1") != client_token(SPEC, "run-2")
    assert len(client_token(SPEC, "x" * 200)) <= 64


def test_user_data_never_puts_the_token_on_a_command_line(config: PreviewConfig) -> None:
    script = render_user_data(config, SPEC)
    (curl,) = [line for line in script.splitlines() if "/tarball/" in line]

    assert "curl -fsSL -H @- " in curl  # the header is read from stdin ...
    assert '<<<"Authorization: Bearer $GHCR_TOKEN"' in script  # ... where ps cannot see it
    assert "Authorization" not in curl


def test_user_data_stops_at_secrets_when_a_read_fails(config: PreviewConfig) -> None:
    script = render_user_data(config, SPEC)

    assert '"$(param' not in script  # a read inside another command hides its failure
    assert "database_url=$(param /pr-preview/database-url) || fail " in script
    assert "GHCR_TOKEN=$(param /pr-preview/ghcr-token) || fail " in script
    assert '[ -n "$database_url" ] || fail ' in script


@pytest.mark.parametrize(
    "spec",
    [
        LaunchSpec("octo-org/app\ntouch /tmp/p", 42, SPEC.sha),
        LaunchSpec("octo-org/app", 42, "1a2b3c4$(reboot)"),
        LaunchSpec("octo-org/app", 0, SPEC.sha),
    ],
    ids=["repo", "sha", "pr"],
)
def test_user_data_refuses_a_spec_it_cannot_render_safely(
    config: PreviewConfig, spec: LaunchSpec
) -> None:
    with pytest.raises(ValueError):
        render_user_data(config, spec)


def test_a_value_cannot_bring_in_another_placeholder(config: PreviewConfig) -> None:
    tricky = PreviewConfig.model_construct(
        **{**config.model_dump(), "app_service": "api{{database_env}}"}
    )

    script = render_user_data(tricky, SPEC)

    assert "compose pull 'api{{database_env}}'" in script
