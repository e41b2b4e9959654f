"""The app's per-preview settings (``env``) and secrets (``env_parameter_path``).

The settings are checked at load; the real-instance test runs a preview on a local instance
and reads the app process's own environment, then looks for the secret everywhere else it
must not be: the user data, the SSM commands' text, the run's logs and artifacts. What an
in-place push rewrites runs in real bash in tests/test_shell_scripts.py.
"""

from __future__ import annotations

import pytest

from flows.preview import pr_preview
from tasks.app.app_env import preview_env
from tasks.config import ConfigError, PreviewConfig, load_config
from tests.support.moto_state import user_data
from tests.test_failure_table import (  # noqa: F401 (fixtures)
    REPO,
    SHA1,
    World,
    database,
    published,
    record,
    world,
)
from tests.test_instance_runtime import instance_processes, read

CANARY_APP_SECRET = "sk_live_CANARYappSecret0123456789"


def test_settings_fill_their_placeholders_and_ours_are_always_set() -> None:
    config = PreviewConfig(
        env={"APP_URL": "https://pr-{pr_number}.example/{repo}/{branch}", "RAW": "{{sha}}"}
    )

    assert preview_env(config, "octo-org/app", 7, SHA1, "feature/login") == {
        "APP_URL": "https://pr-7.example/octo-org/app/feature/login",
        "RAW": "{sha}",
        "PR_NUMBER": "7",
        "GIT_SHA": SHA1,
        "PR_BRANCH": "feature/login",
    }
    # A branch name outside the strict pattern reaches nothing: PR_BRANCH is empty.
    assert preview_env(config, "octo-org/app", 7, SHA1, "x;$(id)")["PR_BRANCH"] == ""


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"env": {"bad-name": "x"}}, "not a variable name"),
        ({"env": {"GIT_SHA": "x"}}, "GIT_SHA is set by pr-preview itself"),
        ({"env": {"URL": "{host}"}}, "{host} is not one of"),
        ({"env": {"URL": "{sha!r}"}}, "{sha} is not one of"),
        ({"env": {"URL": "{sha:>9}"}}, "{sha} is not one of"),
        ({"env": {"URL": "a } b"}}, "write {{ and }} for braces"),
        ({"env": {"URL": "one\ntwo"}}, "one line"),
        ({"env_parameter_path": "/elsewhere/env"}, "not a path below /pr-preview/"),
        ({"env_parameter_path": "/pr-preview/"}, "not a path below /pr-preview/"),
        ({"env_parameter_path": "/pr-preview/../x"}, "not an absolute path"),
        ({"env_parameter_path": "/pr-preview"}, "not a path below /pr-preview/"),
    ],
)
def test_bad_settings_fail_at_load_naming_the_field(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="env") as raised:
        load_config(values, env={}, use_variable=False)
    assert message in str(raised.value)


def test_the_secrets_path_may_not_hold_our_own_secrets() -> None:
    with pytest.raises(ConfigError, match="holds /pr-preview/app/t"):
        load_config(
            {"env_parameter_path": "/pr-preview/app", "ghcr_token_parameter": "/pr-preview/app/t"},
            env={},
            use_variable=False,
        )


def test_settings_come_from_the_environment_as_json() -> None:
    config = load_config(
        env={
            "PR_PREVIEW_ENV": '{"MODE": "preview"}',
            "PR_PREVIEW_ENV_PARAMETER_PATH": "/pr-preview/env/",
        },
        use_variable=False,
    )
    assert (config.env, config.env_parameter_path) == ({"MODE": "preview"}, "/pr-preview/env")
    with pytest.raises(ConfigError, match="PR_PREVIEW_ENV is not a JSON object"):
        load_config(env={"PR_PREVIEW_ENV": "MODE=preview"}, use_variable=False)


def app_environment(instance_id: str) -> dict[str, str]:
    """The environment of the app's own process (uvicorn) on the instance."""
    for pid in instance_processes(instance_id):
        if b"uvicorn" in read(pid, "cmdline"):
            pairs = [item.partition(b"=") for item in read(pid, "environ").split(b"\0") if item]
            return {key.decode(): value.decode() for key, _, value in pairs}
    raise AssertionError(f"no app process on {instance_id}")


@pytest.mark.usefixtures("prefect_server")
def test_settings_and_secrets_reach_the_app_and_nothing_else(world: World) -> None:  # noqa: F811
    ssm = world.aws.ssm
    config = world.config
    config.env = {"APP_URL": "https://pr-{pr_number}.preview.example/{branch}"}
    config.env_parameter_path = "/pr-preview/env"
    ssm.put_parameter(Name="/pr-preview/env/API_KEY", Value=CANARY_APP_SECRET, Type="SecureString")

    opened = pr_preview(
        REPO, 46, SHA1, action="opened", branch="feature/env", config=config, return_state=True
    )
    instance_id = opened.result().instance_id
    assert instance_id, opened.message
    first = app_environment(instance_id)
    assert {name: first.get(name) for name in ("API_KEY", "APP_URL", "PR_NUMBER", "GIT_SHA")} == {
        "API_KEY": CANARY_APP_SECRET,
        "APP_URL": "https://pr-46.preview.example/feature/env",
        "PR_NUMBER": "46",
        "GIT_SHA": SHA1,
    }
    assert first["PR_BRANCH"] == "feature/env"

    commands = [
        line
        for command in ssm.list_commands()["Commands"]
        for line in command["Parameters"]["commands"]
    ]
    elsewhere = [user_data(world.aws, instance_id), *commands]
    logs, artifacts = record(opened)
    assert not [text for text in [*elsewhere, *logs, *artifacts] if CANARY_APP_SECRET in text]
