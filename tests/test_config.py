from __future__ import annotations

import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tasks import config as config_module
from tasks.config import (
    GROUPS,
    TRUSTED_FIELDS,
    TUNING_FIELDS,
    AppAndDatabase,
    AwsPlacement,
    ConfigError,
    GitHubIdentity,
    PreviewConfig,
    TrustedFieldInRun,
    as_environment,
    config_from_env,
    config_from_variable,
    load_config,
    run_config,
)
from tasks.run.errors import PreviewError


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


def test_spares_pull_main_until_the_base_tag_is_turned_off() -> None:
    assert load_config(env={}, use_variable=False).spare_base_tag == "main"
    trunk = {"PR_PREVIEW_SPARE_BASE_TAG": "trunk"}
    assert load_config(env=trunk, use_variable=False).spare_base_tag == "trunk"
    turned_off = [
        load_config({"spare_base_tag": None}, env=trunk, use_variable=False),
        load_config({"spare_base_tag": ""}, env=trunk, use_variable=False),
        load_config(env={"PR_PREVIEW_SPARE_BASE_TAG": ""}, use_variable=False),
    ]
    assert [config.spare_base_tag for config in turned_off] == [None, None, None]
    # Off is set, not unset: a flow that layers the config again keeps it off.
    again = load_config(turned_off[2], env={}, use_variable=False)
    assert again.spare_base_tag is None


@pytest.mark.parametrize("tag", ["feature/x", ".hidden", "main\n", " ", "main;reboot"])
def test_a_base_tag_that_is_no_image_tag_is_refused(tag: str) -> None:
    with pytest.raises(ConfigError, match=r"spare_base_tag \(from flow parameters\)"):
        load_config({"spare_base_tag": tag}, env={}, use_variable=False)


def test_flow_parameters_override_only_what_they_set() -> None:
    env = {"PR_PREVIEW_REGION": "eu-west-1", "PR_PREVIEW_TTL_HOURS": "5"}
    config = load_config(PreviewConfig(ttl_hours=2), env=env, use_variable=False)
    assert config.ttl_hours == 2
    assert config.region == "eu-west-1"  # not reset to the default by the override
    again = load_config(config, env={}, use_variable=False)
    assert (again.ttl_hours, again.region) == (2, "eu-west-1")


def test_a_configuration_error_is_one_of_our_own_and_says_what_to_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"ttl_hours": -1}, env={}, use_variable=False)
    assert isinstance(caught.value, PreviewError) and isinstance(caught.value, ValueError)
    assert caught.value.diagnosis == str(caught.value)
    assert "ttl_hours (from flow parameters)" in caught.value.diagnosis


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


# Values that would reach the instance's root shell (user data, SSM scripts) unless refused.
SHELL_BOUND_VALUES = [
    ("image", "ghcr.io/x/y:$(touch /tmp/p)"),
    ("image", "ghcr.io/octo-org/app:latest"),  # the sha is appended as the tag
    ("image", "ghcr.io/octo-org/app@sha256:" + "0" * 64),
    ("image", "octo-org/app"),  # no registry host: docker login would get "octo-org"
    ("image", "ghcr.io/octo-org/app;reboot"),
    ("image", "ghcr.io/octo-org/app\n"),
    ("image", "ghcr.io/octo org/app"),
    ("app_service", "api\nYAML\ntouch /tmp/p"),
    ("app_service", "api;reboot"),
    ("app_service", "-api"),
    ("app_dir", "srv/app"),
    ("app_dir", "/srv/my app"),
    ("app_dir", "/srv/'app'"),
    ("app_dir", "/srv/../etc"),
    ("app_dir", "/srv/app$(id)"),
    ("ghcr_token_parameter", "/pr-preview/ghcr token"),
    ("ghcr_token_parameter", "/other/ghcr-token"),  # the instance role reads /pr-preview/* only
    ("database_url_parameter", "/pr-preview/../database-url"),
    ("database_url_parameter", "/pr-preview/db`id`"),
    ("compose_version", "v2.24.6\n"),
    ("compose_version", "v2.24.6/../x"),
    ("region", "ap-northeast-1;reboot"),
    ("region", "eu-west-1\n"),
    ("region", "EU-WEST-1"),
    ("ghcr_username", "octo bot"),
    ("ghcr_username", "octo$(id)"),
    ("migration_command", "alembic upgrade head\ntouch /tmp/p"),
    ("migration_command", "alembic upgrade 'head"),  # does not split into words
    ("migration_command", "   "),
    ("probe_paths", ["/healthz'$(id)'"]),
    ("probe_paths", ["/healthz other"]),
    ("probe_paths", ["/healthz;reboot"]),
    ("probe_paths", ["healthz"]),
]


@pytest.mark.parametrize(("field", "value"), SHELL_BOUND_VALUES)
def test_values_bound_for_a_shell_are_refused_at_load_naming_the_field(
    field: str, value: object
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({field: value}, env={}, use_variable=False)
    assert f"{field} (from flow parameters)" in str(caught.value)


def test_shell_bound_values_from_the_environment_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"image \(from PR_PREVIEW_IMAGE\)"):
        load_config(env={"PR_PREVIEW_IMAGE": "ghcr.io/x/y:$(reboot)"}, use_variable=False)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image", "ghcr.io/octo-org/app"),
        ("image", "ghcr.io/Octo-Org/App"),  # image_for lower-cases it, as GHCR names are
        ("image", "127.0.0.1:5000/octo-org/app"),  # a local registry, as the tests run one
        ("image", "localhost:5000/app"),
        ("image", "registry.example.com/team/sub/app__x-y.z"),
        ("app_service", "web.app_1"),
        ("app_dir", "/srv/app-1.2/x_y"),
        ("ghcr_token_parameter", "/pr-preview/team/ghcr-token"),
        ("region", "us-gov-west-1"),
        ("ghcr_username", "octo-bot"),
        ("migration_command", "sh -c 'alembic upgrade head && python -m app.seed'"),
        ("probe_paths", ["/healthz", "/api/v1/health%20check", "/"]),
    ],
)
def test_ordinary_values_still_load(field: str, value: object) -> None:
    config = load_config({field: value}, env={}, use_variable=False)
    assert getattr(config, field) == value


def test_flow_parameter_config_with_a_bad_image_is_refused() -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.preview import pr_preview

    bad = {"image": "ghcr.io/x/y:$(touch /tmp/p)"}
    parameters = {"repo": "octo-org/app", "pr_number": 1, "head_sha": "a" * 40, "config": bad}
    # What Prefect does with a run's parameters before the flow starts ...
    with pytest.raises(ParameterTypeError, match="image"):
        pr_preview.validate_parameters(parameters)
    # ... and what the flow does with whatever it was given, even a model built unvalidated.
    with pytest.raises(ConfigError, match=r"image \(from flow parameters\)"):
        load_config(bad, env={}, use_variable=False)
    with pytest.raises(ConfigError, match=r"image \(from flow parameters\)"):
        load_config(PreviewConfig.model_construct(**bad), env={}, use_variable=False)


def test_assignment_is_validated_too() -> None:
    config = load_config(env={}, use_variable=False)
    with pytest.raises(ValueError, match="compose service name"):
        config.app_service = "api\nYAML"


# --- a run's parameters tune; they never widen trust (issue 26) ----------------------------


def test_every_field_is_either_trusted_or_tuning() -> None:
    """A new field must be placed: the run parameter refuses what is not tuning."""
    assert set(TRUSTED_FIELDS) | TUNING_FIELDS == set(PreviewConfig.model_fields)
    assert not set(TRUSTED_FIELDS) & TUNING_FIELDS
    widening = {"allowed_repos", "allowed_fork_repos", "image", "ghcr_username", "compose_path"}
    widening |= {"instance_profile", "subnet_id", "security_group_ids", "db_security_group_id"}
    widening |= {"database", "database_url_parameter", "ghcr_token_parameter"}
    widening |= {"env_parameter_path", "github_app_private_key_parameter", "ami_id", "ami_name"}
    widening |= {"ami_owners", "ami_strategy", "region", "aws_credentials_block"}
    assert widening <= set(TRUSTED_FIELDS)
    assert {"ttl_hours", "poll_seconds", "ready_timeout_seconds"} <= TUNING_FIELDS


@pytest.mark.parametrize("field", sorted(TRUSTED_FIELDS))
def test_a_run_that_sets_a_trusted_field_is_refused_naming_it_and_where_it_belongs(
    field: str,
) -> None:
    # The very value the Variable holds: setting it at all is refused, not only changing it.
    value = getattr(PreviewConfig(), field)

    for given in ({field: value}, PreviewConfig.model_construct(_fields_set={field})):
        with pytest.raises(TrustedFieldInRun) as caught:
            run_config(given)
        message = str(caught.value)
        assert f"sets {field} ({TRUSTED_FIELDS[field]})" in message
        assert "Prefect Variable pr-preview-config" in message
        assert f"PR_PREVIEW_{field.upper()}" in message


def test_a_run_may_tune(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PR_PREVIEW_ALLOWED_REPOS", "octo-org/*")
    monkeypatch.setenv("PR_PREVIEW_IMAGE", "ghcr.io/octo-org/app")

    config = run_config({"ttl_hours": 2, "poll_seconds": 0.5, "warm_spares": 1})

    assert (config.ttl_hours, config.poll_seconds, config.warm_spares) == (2, 0.5, 1)
    assert config.allowed_repos == ["octo-org/*"] and config.image == "ghcr.io/octo-org/app"
    assert run_config(None).allowed_repos == ["octo-org/*"]


def test_the_environment_form_of_a_config_reads_back_as_the_same_values() -> None:
    config = PreviewConfig(
        security_group_ids=["sg-0aa", "sg-0bb"],
        env={"MODE": "preview", "PR": "{pr_number}"},
        db_sg_open_public_ip=True,
        image="ghcr.io/octo-org/app",
        max_previews=3,
    )

    values = config_from_env(as_environment(config.model_dump()))

    assert PreviewConfig.model_validate(values) == config


# --- settings grouped by concern (issue 33) ------------------------------------------------


def test_every_field_has_a_description_and_belongs_to_exactly_one_group() -> None:
    owners: dict[str, list[str]] = {}
    for group in GROUPS:
        for name in group.model_fields:
            owners.setdefault(name, []).append(group.__name__)
    assert set(owners) == set(PreviewConfig.model_fields)
    assert {name: groups for name, groups in owners.items() if len(groups) != 1} == {}
    undescribed = [
        name
        for name, field in PreviewConfig.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert undescribed == []
    # The composed model reads in the groups' order, as the run form shows it.
    assert list(PreviewConfig.model_fields) == [n for g in GROUPS for n in g.model_fields]


def test_a_group_checks_its_own_fields_and_the_composition_keeps_them() -> None:
    with pytest.raises(ValueError, match="is not an AWS region name"):
        AwsPlacement(region="eu-west-1;reboot")
    with pytest.raises(ValueError, match="exactly one private key source"):
        GitHubIdentity(github_app_id=1)
    with pytest.raises(ConfigError, match=r"github_app_id needs exactly one private key source"):
        load_config({}, env={"PR_PREVIEW_GITHUB_APP_ID": "1"}, use_variable=False)
    # ... and the rule across groups stays on the composition.
    assert AppAndDatabase(env_parameter_path="/pr-preview/app/").env_parameter_path == (
        "/pr-preview/app"
    )
    env = {
        "PR_PREVIEW_ENV_PARAMETER_PATH": "/pr-preview/app/",
        "PR_PREVIEW_GHCR_TOKEN_PARAMETER": "/pr-preview/app/ghcr-token",
    }
    with pytest.raises(ConfigError, match="env_parameter_path /pr-preview/app holds"):
        load_config(env=env, use_variable=False)


def test_fields_set_stay_explicit_across_the_groups() -> None:
    config = PreviewConfig(region="eu-west-1", ttl_hours=2, trigger_mode="label")
    assert config.model_fields_set == {"region", "ttl_hours", "trigger_mode"}
    config.warm_spares = 2
    assert "warm_spares" in config.model_fields_set
    with pytest.raises(ValueError, match="is not a security group id"):
        config.security_group_ids = ["sg-0aa", "api-sg"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PR_PREVIEW_AMI_ID": "ubuntu"}, "ami_id (from PR_PREVIEW_AMI_ID): Value error, 'ubuntu'"),
        ({"PR_PREVIEW_SUBNET_ID": "subnet-xyz"}, "'subnet-xyz' is not a subnet id"),
        ({"PR_PREVIEW_SECURITY_GROUP_IDS": "sg-0aa,api-sg"}, "'api-sg' is not a security group"),
        ({"PR_PREVIEW_DB_SECURITY_GROUP_ID": "db-sg"}, "db_security_group_id (from PR_PREVIEW_"),
        ({"PR_PREVIEW_ALLOWED_FORK_REPOS": "acme"}, "allowed_fork_repos (from PR_PREVIEW_"),
        ({"PR_PREVIEW_GHCR_USERNAME": "a b"}, "'a b' is not a registry user name"),
        ({"PR_PREVIEW_COMPOSE_RELEASE_URL": "ftp://x"}, "compose_release_url (from PR_PREVIEW_"),
        ({"PR_PREVIEW_GITHUB_APP_PRIVATE_KEY_PARAMETER": "/pr-preview/key"}, "stay out of"),
    ],
)
def test_a_shared_check_says_what_it_expected_naming_field_and_source(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env=env, use_variable=False)
    assert message in str(caught.value)


# --- the README's configuration examples load as they read ---------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
# Placeholders the README writes for what only the reader knows.
PLACEHOLDERS = {"<owner>/<repo>": "octo-org/app", "sg-…": "sg-0123456789abcdef0"}


def _readme_examples() -> list[tuple[str, str, dict[str, Any]]]:
    """(where, how it is given, values) of every configuration example in the README: the
    ```json blocks, the ``prefect variable set`` command, a run's ``-p config=`` and inline
    ``field: value`` settings; ``PR_PREVIEW_<FIELD>=`` lines are replayed separately."""
    text = README.read_text()
    examples: list[tuple[str, str, dict[str, Any]]] = []
    for block in re.findall(r"```json\n(.*?)```", text, re.DOTALL):
        examples.append((block.strip(), "variable", json.loads(block)))
    for value in re.findall(r"prefect variable set pr-preview-config '(.*?)'", text, re.DOTALL):
        for placeholder, example in PLACEHOLDERS.items():
            value = value.replace(placeholder, example)
        examples.append((value, "variable", json.loads(value)))
    for value in re.findall(r"-p config='(.*?)'", text):
        examples.append((value, "run", json.loads(value)))
    for name, raw in re.findall(r"`([a-z_]+): ([^`]+)`", text):
        if name in PreviewConfig.model_fields:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw  # a bare word, as YAML reads it
            examples.append((f"{name}: {raw}", "variable", {name: value}))
    unique = {" ".join(where.split()): (how, values) for where, how, values in examples}
    return [(where, how, values) for where, (how, values) in unique.items()]


README_EXAMPLES = _readme_examples()


def test_the_readme_examples_are_found() -> None:
    found = {key for _, _, values in README_EXAMPLES for key in values}
    assert {"trigger_mode", "compose_path", "env", "env_parameter_path", "image"} <= found
    assert {"seed_command", "allowed_repos", "ttl_hours", "warm_spares"} <= found
    assert len(README_EXAMPLES) >= 12


@pytest.mark.parametrize(
    ("given", "values"),
    [(how, values) for _, how, values in README_EXAMPLES],
    ids=[where[:60] for where, _, _ in README_EXAMPLES],
)
def test_a_readme_configuration_example_loads_with_the_values_it_shows(
    given: str, values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    if given == "run":
        monkeypatch.setattr(config_module, "config_from_variable", dict)
        config = run_config(values)
    else:
        # As the pr-preview-config Variable holds it, under an empty environment.
        monkeypatch.setattr(config_module, "config_from_variable", lambda: dict(values))
        config = load_config(env={}, use_variable=True)
    assert {name: getattr(config, name) for name in values} == values


def test_the_readme_environment_examples_load_with_the_values_they_show() -> None:
    examples = re.findall(r"\b(PR_PREVIEW_[A-Z_]+)=([^\s`]*)", README.read_text())
    assert ("PR_PREVIEW_SPARE_BASE_TAG", "") in examples
    assert ("PR_PREVIEW_PRICE_PER_HOUR", "0.02") in examples
    for variable, raw in examples:
        name = variable.removeprefix("PR_PREVIEW_").lower()
        assert name in PreviewConfig.model_fields, variable
        config = load_config(env={variable: raw}, use_variable=False)
        assert name in config.model_fields_set, variable
        assert as_environment({name: getattr(config, name)}) == {variable: raw}


# --- the Variable: an API that cannot answer is no configuration error ---------------------


def test_an_unreachable_or_refusing_api_leaves_the_variable_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(401, "no API key")

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    refusing = f"http://127.0.0.1:{server.server_address[1]}/api"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{unused.getsockname()[1]}/api"
    try:
        for url in (closed, refusing):
            with temporary_settings({PREFECT_API_URL: url}), caplog.at_level(logging.WARNING):
                caplog.clear()
                assert config_from_variable() == {}
            assert "Prefect Variable pr-preview-config not read" in caplog.text, url
    finally:
        server.shutdown()
        server.server_close()


def test_a_fault_reading_the_variable_is_not_mistaken_for_an_unreachable_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.variables import Variable

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("a bug, not the network")

    monkeypatch.setattr(Variable, "get", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        config_from_variable()
