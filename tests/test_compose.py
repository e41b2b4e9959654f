"""compose_path: the repository's own compose file, checked before launch and run as fetched.

The checks are pure (each refused construct and its message); the flow test fetches a
three-service file from the fake GitHub at the PR's sha and finds it, rewritten, in the
instance's user data, then the next sha's in the in-place deploy, then the instance gone.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from flows.preview import pr_preview
from flows.teardown import pr_teardown
from local_stack.instance.world import SAMPLE_APP
from local_stack.registry import image_config
from local_stack.scripted_instance import ScriptedInstances
from tasks.aws import AwsClients
from tasks.compose import ComposeRefused, check_compose, render_compose
from tasks.config import ConfigError, PreviewConfig, load_config
from tests.fakes.github import ALL_PERMISSIONS, FakeGitHub
from tests.support.moto_state import live, state_of, user_data
from tests.test_failure_table import World, database, world  # noqa: F401 (fixtures)
from tests.test_instance_runtime import instance_processes, read, wait_for
from tests.test_preview_github import (  # noqa: F401 (fixtures)
    REPO,
    SHA1,
    SHA2,
    github,
    healthy_world,
    pull,
    served,
)

PATH = "deploy/preview.compose.yml"
THREE_SERVICES = """\
services:
  api:
    image: placeholder
    env_file: [api.env]
    ports: ["127.0.0.1:8000:8000"]
    depends_on: [cache]
    volumes: ["./uploads:/srv/uploads", "media:/media"]
  worker:
    image: ghcr.io/octo-org/app-worker:1.4
    command: ["python", "-m", "app.worker"]
    environment: {QUEUE: "{queue}"}
  cache:
    image: redis:7-alpine
    ports:
      - {target: 6379, published: 6379, host_ip: 127.0.0.1}
volumes:
  media: {}
"""


def service(**values: Any) -> str:
    return yaml.safe_dump({"services": {"api": {"image": "x", **values}}})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: [", "does not parse as YAML"),
        ("version: '3'", "has no services: mapping"),
        ("services: {web: {image: x}}", "has no service 'api' (app_service); it has: web"),
        ("include: [other.yml]\nservices: {api: {image: x}}", "include: is not supported"),
        (service(build="."), "build: is refused"),
        (service(privileged=True), "privileged: true is refused"),
        (service(network_mode="host"), "network_mode: host is refused"),
        (service(pid="host"), "pid: host is refused"),
        (service(cap_add=["SYS_ADMIN"]), "cap_add: is refused"),
        (service(security_opt=["seccomp:unconfined"]), "security_opt: is refused"),
        (service(env_file=["/etc/shadow"]), "env_file '/etc/shadow' is outside the app dir"),
        (
            "secrets: {k: {file: /root/.aws/credentials}}\nservices: {api: {image: x}}",
            "secrets: file '/root/.aws/credentials' is outside the app dir",
        ),
        (
            "volumes: {v: {driver_opts: {o: bind, device: /etc}}}\nservices: {api: {image: x}}",
            "driver_opts is refused",
        ),
        (service(ports=["8000:8000"]), "published on every address"),
        (service(ports=["8000"]), "published on every address"),
        (service(ports=["0.0.0.0:6379:6379"]), "published on 0.0.0.0"),
        (service(ports=[{"target": 80, "published": 80}]), "published on every address"),
        (service(volumes=["/etc:/host-etc"]), "bind mount of '/etc' is outside the app dir"),
        (service(volumes=["../../root:/r"]), "bind mount of '../../root' is outside"),
        (service(volumes=["~/.ssh:/k"]), "bind mount of '~/.ssh' is outside"),
        (
            service(volumes=[{"type": "bind", "source": "/var/run/docker.sock", "target": "/s"}]),
            "bind mount of '/var/run/docker.sock' is outside",
        ),
    ],
)
def test_each_refused_construct_says_why(text: str, message: str) -> None:
    with pytest.raises(ComposeRefused) as refused:
        check_compose(text, PreviewConfig(), f"{PATH}@1a2b3c4")
    assert message in str(refused.value)
    assert str(refused.value).startswith(f"{PATH}@1a2b3c4")


def test_a_three_service_file_runs_the_prs_image_with_our_env_files() -> None:
    for kind in ("external", "ephemeral"):
        config = PreviewConfig(database=kind)
        rendered = yaml.safe_load(
            render_compose(check_compose(THREE_SERVICES, config, PATH), config)
        )
        api = rendered["services"]["api"]
        assert api["image"] == "${APP_IMAGE}"
        assert api["env_file"] == ["api.env", "secrets.env", "preview.env", "app.env"]
        assert rendered["services"]["worker"]["image"] == "ghcr.io/octo-org/app-worker:1.4"
        expected = {"api", "worker", "cache"} | ({"db"} if kind == "ephemeral" else set())
        assert set(rendered["services"]) == expected
    assert api["depends_on"] == ["cache", "db"]
    assert set(rendered["volumes"]) == {"media", "pgdata"}


@pytest.mark.parametrize("path", ["../secrets.yml", "/etc/compose.yml", "a b.yml", "x/./y.yml"])
def test_compose_path_stays_inside_the_repository(path: str) -> None:
    with pytest.raises(ConfigError, match="compose_path"):
        load_config({"compose_path": path}, env={}, use_variable=False)


@pytest.mark.usefixtures("prefect_server", "healthy_world")
def test_the_repos_compose_file_is_fetched_at_each_sha_and_torn_down_with_the_preview(
    aws: AwsClients,
    config: PreviewConfig,
    github: FakeGitHub,  # noqa: F811
    scripted_ssm: ScriptedInstances,
) -> None:
    github.tokens["good-token"] = ALL_PERMISSIONS | {"contents:read"}
    config.compose_path = PATH
    github.add_pull(REPO, pull(50, SHA1))
    github.add_file(REPO, SHA1, PATH, THREE_SERVICES)
    github.add_file(REPO, SHA2, PATH, THREE_SERVICES.replace("redis:7-alpine", "redis:8-alpine"))

    opened = pr_preview(REPO, 50, SHA1, action="opened", config=config)

    assert opened.status == "ready"
    booted = user_data(aws, opened.instance_id or "")
    assert "app-worker:1.4" in booted and "redis:7-alpine" in booted
    assert [r.params for r in github.sent("GET", "/contents/")] == [{"ref": SHA1}]
    ready = github.comment_bodies(REPO, 50)[-1]
    assert "Services: `api`, `worker`, `cache`" in ready
    assert "Variables: `DATABASE_URL`, `GIT_SHA`, `PR_BRANCH`, `PR_NUMBER`" in ready

    github.add_pull(REPO, pull(50, SHA2))
    pushed = pr_preview(REPO, 50, SHA2, action="synchronize", config=config)

    assert (pushed.path, pushed.instance_id) == ("in-place", opened.instance_id)
    [deploy] = scripted_ssm.commands(opened.instance_id, r"docker compose pull")
    assert "redis:8-alpine" in deploy and "> docker-compose.yml" in deploy
    assert f"GIT_SHA={SHA2}" in deploy and "> preview.env" in deploy  # the push's settings

    github.add_pull(REPO, pull(50, SHA2, state="closed"))
    pr_teardown(REPO, 50, config=config)
    assert state_of(aws, opened.instance_id or "") == "terminated"


@pytest.mark.usefixtures("prefect_server", "healthy_world")
def test_a_refused_compose_file_launches_nothing_and_the_pr_is_told_why(
    aws: AwsClients,
    config: PreviewConfig,
    github: FakeGitHub,  # noqa: F811
) -> None:
    github.tokens["good-token"] = ALL_PERMISSIONS | {"contents:read"}
    config.compose_path = PATH
    github.add_pull(REPO, pull(51, SHA1))
    github.add_file(REPO, SHA1, PATH, service(privileged=True))

    refused = pr_preview(REPO, 51, SHA1, action="opened", config=config, return_state=True)

    assert refused.is_failed()
    assert not [i for i in live(aws) if {"Key": "PR", "Value": "51"} in i["Tags"]]
    comment = github.comment_bodies(REPO, 51)[-1]
    assert "Preview failed" in comment and "privileged: true is refused" in comment


REAL_THREE_SERVICES = """\
services:
  api:
    image: placeholder
    ports: ["127.0.0.1:8000:8000"]
    depends_on: [cache]
  worker:
    image: ${{APP_IMAGE}}
    command: ["python", "-c", "import time; time.sleep(3600)  # preview-worker"]
  cache:
    image: {cache}
    command: ["python", "-m", "http.server", "6379", "--bind", "127.0.0.1"]
"""


@pytest.mark.usefixtures("prefect_server")
def test_three_services_run_on_a_real_instance_and_end_with_it(
    world: World,  # noqa: F811
    github: FakeGitHub,  # noqa: F811
) -> None:
    """The local instance runtime runs the fetched file: the app serves the probe, the worker
    (the PR's image, another command) and the redis-like cache run beside it; teardown ends
    every one of them."""
    cache = f"{world.registry.host}/octo-org/cache"
    world.registry.push("octo-org/cache", "7", config=image_config([], source=f"{SAMPLE_APP}/v1"))
    github.tokens["good-token"] = ALL_PERMISSIONS | {"contents:read"}
    github.add_pull(REPO, pull(52, SHA1))
    github.add_file(REPO, SHA1, PATH, REAL_THREE_SERVICES.format(cache=f"{cache}:7"))
    world.config.compose_path = PATH

    ready = pr_preview(REPO, 52, SHA1, action="opened", config=world.config, return_state=True)

    result = ready.result()
    assert (result.status, result.probe[:14]) == ("ready", "/healthz → 200"), ready.message
    commands = [read(pid, "cmdline") for pid in instance_processes(result.instance_id or "")]
    assert any(b"preview-worker" in line for line in commands)
    assert any(b"http.server\x006379" in line for line in commands)
    github.add_pull(REPO, pull(52, SHA1, state="closed"))
    pr_teardown(REPO, 52, config=world.config)
    wait_for(lambda: not instance_processes(result.instance_id or ""), timeout=10)
