from __future__ import annotations

import pytest

from tasks.config import ConfigError, PreviewConfig, load_config


def test_defaults_are_the_runbooks_values() -> None:
    config = load_config(env={}, use_variable=False)
    assert config.region == "ap-northeast-1"
    assert config.instance_type == "t3.small"
    assert config.instance_profile == "ec2-pr-preview-ssm"
    assert config.purpose_tag == "pr-preview-singleton"
    assert (config.app_port, config.ttl_hours, config.max_previews) == (8000, 24.0, 1)
    assert config.app_dir == "/srv/app"
    assert config.database == "external"
    assert config.image_for("Octo-Org/App") == "ghcr.io/octo-org/app"


def test_environment_sets_every_kind_of_field() -> None:
    env = {
        "PR_PREVIEW_REGION": "eu-west-1",
        "PR_PREVIEW_SECURITY_GROUP_IDS": "sg-0aa, sg-0bb,",
        "PR_PREVIEW_TTL_HOURS": "2.5",
        "PR_PREVIEW_MAX_PREVIEWS": "3",
        "PR_PREVIEW_DB_SG_OPEN_PUBLIC_IP": "true",
        "PR_PREVIEW_DATABASE": "ephemeral",
        "PR_PREVIEW_SUBNET_ID": "",
    }
    config = load_config(env=env, use_variable=False)
    assert config.region == "eu-west-1"
    assert config.security_group_ids == ["sg-0aa", "sg-0bb"]
    assert config.ttl_hours == 2.5
    assert config.max_previews == 3
    assert config.db_sg_open_public_ip is True
    assert config.database == "ephemeral"
    assert config.subnet_id is None


@pytest.mark.parametrize(
    ("env", "field", "source"),
    [
        ({"PR_PREVIEW_TTL_HOURS": "-1"}, "ttl_hours", "PR_PREVIEW_TTL_HOURS"),
        ({"PR_PREVIEW_APP_PORT": "eighty"}, "app_port", "PR_PREVIEW_APP_PORT"),
        ({"PR_PREVIEW_SECURITY_GROUP_IDS": "api-sg"}, "security_group_ids", "PR_PREVIEW_"),
        ({"PR_PREVIEW_DATABASE": "rds"}, "database", "PR_PREVIEW_DATABASE"),
        ({"PR_PREVIEW_AMI_ID": "ubuntu"}, "ami_id", "PR_PREVIEW_AMI_ID"),
    ],
)
def test_a_bad_value_fails_at_load_naming_field_and_source(
    env: dict[str, str], field: str, source: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env=env, use_variable=False)
    assert f"{field} (from {source}" in str(caught.value)


def test_flow_parameters_override_only_what_they_set() -> None:
    env = {"PR_PREVIEW_REGION": "eu-west-1", "PR_PREVIEW_TTL_HOURS": "5"}
    config = load_config(PreviewConfig(ttl_hours=2), env=env, use_variable=False)
    assert config.ttl_hours == 2
    assert config.region == "eu-west-1"  # not reset to the default by the override
    again = load_config(config, env={}, use_variable=False)
    assert (again.ttl_hours, again.region) == (2, "eu-west-1")


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ConfigError, match="ttl"):
        load_config({"ttl": 3}, env={}, use_variable=False)


def test_prefect_variable_sits_below_the_environment(prefect_server: None) -> None:
    from prefect.variables import Variable

    Variable.set("pr-preview-config", {"max_previews": 4, "region": "us-east-1"}, overwrite=True)
    try:
        config = load_config(env={"PR_PREVIEW_REGION": "eu-west-1"}, use_variable=True)
        assert config.max_previews == 4
        assert config.region == "eu-west-1"
        Variable.set("pr-preview-config", {"max_previews": 0}, overwrite=True)
        with pytest.raises(ConfigError, match="max_previews \\(from Prefect Variable"):
            load_config(env={}, use_variable=True)
    finally:
        Variable.unset("pr-preview-config")
