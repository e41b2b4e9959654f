"""The local instance's container engine, run as the bootstrap runs it: a ``docker`` process.

Each test has its own engine root, client config and project dir in ``tmp_path``, and talks to a
fake GHCR served on 127.0.0.1 (``registry`` from conftest). The app image runs a ten-line ASGI
app written into ``tmp_path`` with uvicorn, so these tests do not depend on the sample app. No
container process outlives its test: ``engine`` kills whatever the engine root still records.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from local_stack.instance.engine import alive, process_start, wait_until
from local_stack.prefect_server import PROJECT_DIR, free_port
from local_stack.registry import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    SOURCE_LABEL,
    FakeRegistry,
    image_config,
)
from tasks.app_env import PREVIEW_ENV_FILE, SECRETS_ENV_FILE
from tasks.config import PreviewConfig
from tasks.diagnose import SIGNATURES
from tasks.launch import compose_file

REPO = "octo-org/app"
USER = "octo-org"
TOKEN = "ghp_engineTestToken0123456789abcdefABCD"
SHA1 = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SHA2 = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
ASGI_APP = """\
import os

VERSION = {version!r}


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"{{VERSION}} {{os.environ.get('GREETING', '-')}} {{os.getcwd()}}".encode()
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": body}})
"""


@dataclass
class Engine:
    """One engine root, client config and label project dir; ``docker`` runs the shim."""

    root: Path
    docker_config: Path
    project: Path
    app_dir: Path
    env: dict[str, str]

    def docker(
        self,
        *args: str,
        input: str | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "local_stack.instance.engine", *args],
            cwd=cwd or self.app_dir,
            env={**self.env, **(env or {})},
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> str:
        done = self.docker(*args, input=input, env=env)
        assert done.returncode == 0, f"docker {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout + done.stderr

    def records(self) -> dict[str, dict[str, Any]]:
        found = {}
        for state in sorted(self.root.glob("containers/*/state.json")):
            record = json.loads(state.read_text())
            found[record["name"]] = record
        return found

    def write_app(self, version: str) -> str:
        """A stand-in app's source tree; returns its path relative to the project dir."""
        source = self.project / "apps" / version
        source.mkdir(parents=True, exist_ok=True)
        (source / "app.py").write_text(ASGI_APP.format(version=version))
        return f"apps/{version}"

    def compose(self, image: str, port: int, extra: str = "") -> None:
        """The app's compose file as tasks/launch.py writes it, image from ``.env``."""
        (self.app_dir / "docker-compose.yml").write_text(
            "services:\n"
            "  api:\n"
            "    image: ${APP_IMAGE}\n"
            "    env_file: [app.env]\n"
            f'    ports: ["127.0.0.1:{port}:{port}"]\n'
            "    restart: unless-stopped\n" + extra
        )
        (self.app_dir / "app.env").write_text("GREETING=hello from app.env\n")
        self.set_image(image)

    def set_image(self, image: str) -> None:
        (self.app_dir / ".env").write_text(f"APP_IMAGE={image}\n")


def uvicorn_config(source: str, port: int) -> dict[str, Any]:
    return image_config(
        ["uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)], source=source
    )


def answer(port: int, timeout: float = 20) -> str:
    """The body the app on ``port`` answers with, once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/", timeout=2, trust_env=False).text
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def processes(record: dict[str, Any]) -> list[tuple[int, int | None]]:
    return [
        (record[pid], record.get(start))
        for pid, start in (("pid", "pid_start"), ("shim_pid", "shim_start"))
        if record.get(pid)
    ]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    app_dir = tmp_path / "srv" / "app"
    app_dir.mkdir(parents=True)
    project = tmp_path / "project"
    project.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(PROJECT_DIR),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PR_PREVIEW_ENGINE_ROOT": str(tmp_path / "engine"),
        "DOCKER_CONFIG": str(tmp_path / "docker-config"),
        "PR_PREVIEW_PROJECT": str(project),
        "PR_PREVIEW_PYTHON": sys.executable,
    }
    found = Engine(tmp_path / "engine", tmp_path / "docker-config", project, app_dir, env)
    yield found
    wait_until(lambda: not started_under(tmp_path), 3.0)  # a shim may be writing an exit code
    leftovers = started_under(tmp_path)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes outlived the test: {leftovers}"


def started_under(directory: Path) -> list[int]:
    """Every live process whose cwd, command line or environment names ``directory``: what
    the test's engine started (the test process itself names it nowhere)."""
    needle = str(directory).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd").encode()
            named = needle in (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if (cwd.startswith(needle) or named) and process_start(int(entry.name)) is not None:
            found.append(int(entry.name))
    return found


@pytest.fixture
def ghcr(registry: FakeRegistry) -> FakeRegistry:
    """conftest's served registry, with the org's token, as GHCR with a PAT."""
    registry.users[USER] = TOKEN
    return registry


def login(
    engine: Engine, registry: FakeRegistry, token: str = TOKEN
) -> subprocess.CompletedProcess[str]:
    return engine.docker("login", registry.host, "-u", USER, "--password-stdin", input=f"{token}\n")


# --- login and pull ------------------------------------------------------------------------------


def test_login_checks_the_token_with_the_registry_and_stores_it_like_docker(
    engine: Engine, ghcr: FakeRegistry
) -> None:
    done = login(engine, ghcr)

    assert done.returncode == 0, done.stderr
    assert done.stdout == "Login Succeeded\n"
    config = json.loads((engine.docker_config / "config.json").read_text())
    assert config == {
        "auths": {ghcr.host: {"auth": base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()}}
    }
    assert (engine.docker_config / "config.json").stat().st_mode & 0o077 == 0
    basic = ghcr.token_requests()[0].headers["authorization"]
    assert base64.b64decode(basic.removeprefix("Basic ")).decode() == f"{USER}:{TOKEN}"


def test_login_with_a_wrong_token_fails_with_the_registrys_401(
    engine: Engine, ghcr: FakeRegistry
) -> None:
    done = login(engine, ghcr, token="ghp_wrong")

    assert done.returncode == 1
    assert (
        done.stderr == f'Error response from daemon: Get "http://{ghcr.host}/v2/": unauthorized\n'
    )
    assert not (engine.docker_config / "config.json").exists()
    assert ghcr.token_requests(), "the 401 came from the registry's token endpoint"


def test_a_mirrored_ghcr_is_reached_at_the_mirror_and_named_as_ghcr(
    engine: Engine, ghcr: FakeRegistry
) -> None:
    mirror = {"PR_PREVIEW_REGISTRY_MIRRORS": f"ghcr.io=http://{ghcr.host}"}
    ghcr.push(REPO, SHA1, private=True, config=uvicorn_config("apps/v1", 8000))

    wrong = engine.docker(
        "login", "ghcr.io", "-u", USER, "--password-stdin", input="ghp_wrong\n", env=mirror
    )
    right = engine.docker(
        "login", "ghcr.io", "-u", USER, "--password-stdin", input=TOKEN, env=mirror
    )
    engine.compose(f"ghcr.io/{REPO}:{SHA1}", 8000)
    pulled = engine.docker("compose", "pull", "api", env=mirror)

    assert wrong.stderr == 'Error response from daemon: Get "https://ghcr.io/v2/": unauthorized\n'
    assert (
        right.returncode == 0
        and "ghcr.io" in json.loads((engine.docker_config / "config.json").read_text())["auths"]
    )
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stderr == " api Pulling \n api Pulled \n"
    assert ghcr.manifest_requests(SHA1)


def test_an_ecr_like_registry_wants_basic_auth_with_the_aws_password(
    engine: Engine, registry: FakeRegistry
) -> None:
    """ECR's login: user AWS, the password GetAuthorizationToken hands out, Basic auth on every
    request; a pull without it fails in the docker client's own words."""
    ecr = "123456789012.dkr.ecr.ap-northeast-1.amazonaws.com"
    password = "ecr-password-from-get-login-password"
    registry.auth, registry.users = "basic", {"AWS": password}
    registry.push(REPO, SHA1, private=True, config=uvicorn_config("apps/v1", 8000))
    mirror = {"PR_PREVIEW_REGISTRY_MIRRORS": f"{ecr}=http://{registry.host}"}
    engine.compose(f"{ecr}/{REPO}:{SHA1}", 8000)

    denied = engine.docker("compose", "pull", "api", env=mirror)
    wrong = engine.docker(
        "login", "--username", "AWS", "--password-stdin", ecr, input="expired\n", env=mirror
    )
    login = engine.docker(
        "login", "--username", "AWS", "--password-stdin", ecr, input=f"{password}\n", env=mirror
    )
    pulled = engine.docker("compose", "pull", "api", env=mirror)

    assert denied.stderr.splitlines()[-1] == (
        f'Error response from daemon: Head "https://{ecr}/v2/{REPO}/manifests/{SHA1}":'
        " no basic auth credentials"
    )
    assert {s.key for s in SIGNATURES if s.pattern.search(denied.stderr)} == {"ecr-login"}
    assert wrong.returncode == 1 and login.stdout == "Login Succeeded\n", login.stderr
    assert pulled.returncode == 0, pulled.stderr
    basic = "Basic " + base64.b64encode(f"AWS:{password}".encode()).decode()
    assert registry.manifest_requests(SHA1)[-1].headers["authorization"] == basic
    assert not registry.token_requests()  # no token dance


def test_pulling_a_missing_tag_says_manifest_unknown(engine: Engine, ghcr: FakeRegistry) -> None:
    ghcr.push(REPO, SHA1, config=uvicorn_config("apps/v1", 8000))
    engine.compose(f"{ghcr.host}/{REPO}:{SHA2}", 8000)

    done = engine.docker("compose", "pull", "api")

    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"Error response from daemon: manifest for {ghcr.host}/{REPO}:{SHA2} not found:"
        " manifest unknown: manifest unknown"
    )
    assert done.stderr.startswith(" api Pulling \n api Error manifest for ")
    assert not (engine.root / "images" / "repositories.json").exists()


def test_pulling_a_private_repo_without_login_is_denied(engine: Engine, ghcr: FakeRegistry) -> None:
    ghcr.push(REPO, SHA1, private=True, config=uvicorn_config("apps/v1", 8000))
    engine.compose(f"{ghcr.host}/{REPO}:{SHA1}", 8000)

    done = engine.docker("compose", "pull", "api")

    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"Error response from daemon: pull access denied for {ghcr.host}/{REPO}, repository"
        " does not exist or may require 'docker login': denied: requested access to the"
        " resource is denied"
    )
    assert "authorization" not in ghcr.token_requests()[0].headers  # asked anonymously


def test_a_login_whose_token_was_revoked_makes_the_pull_unauthorized(
    engine: Engine, ghcr: FakeRegistry
) -> None:
    ghcr.push(REPO, SHA1, private=True, config=uvicorn_config("apps/v1", 8000))
    engine.compose(f"{ghcr.host}/{REPO}:{SHA1}", 8000)
    assert login(engine, ghcr).returncode == 0
    ghcr.users[USER] = "ghp_rotated"

    done = engine.docker("compose", "pull", "api")

    assert done.returncode == 1
    message = (
        f'Error response from daemon: Head "http://{ghcr.host}/v2/{REPO}/manifests/{SHA1}":'
        " unauthorized"
    )
    assert done.stderr.splitlines()[-1] == message
    diagnosis = {s.key for s in SIGNATURES if s.pattern.search(done.stderr)}
    assert diagnosis == {"ghcr-unauthorized"}


def test_pull_follows_the_index_to_the_amd64_config(engine: Engine, ghcr: FakeRegistry) -> None:
    digest = ghcr.push(REPO, SHA1, private=True, config=uvicorn_config("apps/v1", 8000))
    engine.compose(f"{ghcr.host}/{REPO}:{SHA1}", 8000)
    login(engine, ghcr)

    engine.ok("compose", "pull", "api", env={"PR_PREVIEW_ENGINE_DELAYS": '{"pull": 0}'})

    asked = [(r.method, r.url.path) for r in ghcr.requests if r.url.path.startswith("/v2/")]
    index = json.loads(ghcr.repositories[REPO].manifests[digest][1])
    amd64 = index["manifests"][0]["digest"]
    config = json.loads(ghcr.repositories[REPO].manifests[amd64][1])["config"]["digest"]
    assert asked[-4:] == [
        ("HEAD", f"/v2/{REPO}/manifests/{SHA1}"),
        ("GET", f"/v2/{REPO}/manifests/{digest}"),
        ("GET", f"/v2/{REPO}/manifests/{amd64}"),
        ("GET", f"/v2/{REPO}/blobs/{config}"),
    ]
    stored = json.loads((engine.root / "images" / "repositories.json").read_text())
    assert stored == {f"{ghcr.host}/{REPO}:{SHA1}": config}


def test_the_pull_delay_models_a_slow_pull(engine: Engine, ghcr: FakeRegistry) -> None:
    ghcr.push(REPO, SHA1, config=uvicorn_config("apps/v1", 8000))
    engine.compose(f"{ghcr.host}/{REPO}:{SHA1}", 8000)

    started = time.monotonic()
    engine.ok("compose", "pull", "api", env={"PR_PREVIEW_ENGINE_DELAYS": '{"pull": 2.0}'})
    elapsed = time.monotonic() - started
    bad = engine.docker("compose", "pull", "api", env={"PR_PREVIEW_ENGINE_DELAYS": '{"pul": 1}'})

    assert elapsed >= 2.0
    assert bad.returncode == 1 and "PR_PREVIEW_ENGINE_DELAYS: unknown operation 'pul'" in bad.stderr


# --- containers ----------------------------------------------------------------------------------


@pytest.mark.server
def test_up_runs_the_image_source_as_a_process_that_answers_on_its_port(
    engine: Engine, ghcr: FakeRegistry
) -> None:
    port = free_port()
    source = engine.write_app("v1")
    ghcr.push(REPO, SHA1, private=True, config=uvicorn_config(source, port))
    engine.compose(f"{ghcr.host}/{REPO}:{SHA1}", port)
    login(engine, ghcr)

    first = engine.ok("compose", "up", "-d")
    body = answer(port)
    pid = engine.records()["app-api-1"]["pid"]
    second = engine.ok("compose", "up", "-d")

    assert first == (
        " api Pulling \n api Pulled \n"
        " Container app-api-1  Creating\n Container app-api-1  Created\n"
        " Container app-api-1  Starting\n Container app-api-1  Started\n"
    )
    assert body == f"v1 hello from app.env {engine.project / 'apps' / 'v1'}"
    assert Path(f"/proc/{pid}/cwd").resolve() == engine.project / "apps" / "v1"
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"PYTHONDONTWRITEBYTECODE=1" in environ
    assert f"PATH={Path(sys.executable).parent}:".encode() in b"\n".join(environ)
    assert second == " Container app-api-1  Running\n"
    assert engine.records()["app-api-1"]["pid"] == pid and alive(pid, None)
    engine.ok("compose", "down", "-t", "2")


@pytest.mark.server
def test_a_second_up_with_a_new_image_recreates_the_service(
    engine: Engine, ghcr: FakeRegistry
) -> None:
    port = free_port()
    ghcr.push(REPO, SHA1, config=uvicorn_config(engine.write_app("v1"), port))
    ghcr.push(REPO, SHA2, config=uvicorn_config(engine.write_app("v2"), port))
    engine.compose(f"{ghcr.host}/{REPO}:{SHA1}", port)
    engine.ok("compose", "up", "-d")
    assert answer(port).startswith("v1 ")
    old = engine.records()["app-api-1"]

    engine.set_image(f"{ghcr.host}/{REPO}:{SHA2}")  # what tasks/update.py does to .env
    engine.ok("compose", "pull", "api")
    recreated = engine.ok("compose", "up", "-d", "-t", "5")
    body = answer(port)

    assert recreated == (
        " Container app-api-1  Recreate\n Container app-api-1  Recreated\n"
        " Container app-api-1  Starting\n Container app-api-1  Started\n"
    )
    assert body.startswith("v2 ")
    assert not any(alive(pid, start) for pid, start in processes(old))
    assert engine.records()["app-api-1"]["pid"] != old["pid"]
    engine.ok("compose", "down", "-t", "2")


@pytest.mark.server
def test_run_rm_passes_the_commands_output_and_exit_code_through(
    engine: Engine, ghcr: FakeRegistry
) -> None:
    ghcr.push(REPO, SHA1, config=uvicorn_config(engine.write_app("v1"), 8000))
    engine.compose(f"{ghcr.host}/{REPO}:{SHA1}", 8000)
    script = 'echo "migrating in $(pwd) with $GREETING"; echo "no such table" >&2; exit 3'

    done = engine.docker(
        "compose",
        "-f",
        str(engine.app_dir / "docker-compose.yml"),
        "run",
        "--rm",
        "-T",
        "api",
        "sh",
        "-c",
        script,
        cwd=engine.project,
    )
    missing = engine.docker("compose", "run", "--rm", "-T", "api", "alembic-nope", "upgrade")

    assert done.returncode == 3
    assert done.stdout == f"migrating in {engine.project / 'apps' / 'v1'} with hello from app.env\n"
    assert done.stderr.endswith("no such table\n")
    assert engine.records() == {}
    assert missing.returncode != 0
    assert 'exec: "alembic-nope": executable file not found in $PATH' in missing.stderr


@pytest.mark.server
def test_ps_and_logs_show_the_real_process_and_its_log(engine: Engine, ghcr: FakeRegistry) -> None:
    port = free_port()
    ghcr.push(REPO, SHA1, config=uvicorn_config(engine.write_app("v1"), port))
    engine.compose(f"{ghcr.host}/{REPO}:{SHA1}", port)
    engine.ok("compose", "up", "-d")
    answer(port)
    compose = ["compose", "-f", str(engine.app_dir / "docker-compose.yml")]  # as diagnose asks

    state = [*compose, "ps", "-a", "--format", "{{.State}} {{.ExitCode}}", "api"]
    running = engine.ok(*compose, "ps", "-a")
    running_state = engine.ok(*state)
    logs = engine.ok(*compose, "logs", "--no-color", "--tail=200", "api")
    os.kill(engine.records()["app-api-1"]["pid"], signal.SIGKILL)
    time.sleep(0.5)
    exited = engine.ok(*compose, "ps", "-a")
    exited_state = engine.ok(*state)
    as_json = json.loads(engine.ok(*compose, "ps", "-a", "--format", "json", "api"))
    only_running = engine.ok(*compose, "ps")

    header, row = running.splitlines()
    assert header.split() == ["NAME", "IMAGE", "COMMAND", "SERVICE", "CREATED", "STATUS", "PORTS"]
    assert row.startswith(f'app-api-1   {ghcr.host}/{REPO}:{SHA1}   "uvicorn app:app --h…"')
    assert " Up " in row and row.endswith(f"127.0.0.1:{port}->{port}/tcp")
    assert f"app-api-1  | INFO:     Uvicorn running on http://127.0.0.1:{port}" in logs
    assert "app-api-1  | INFO:     127.0.0.1:" in logs and '"GET / HTTP/1.1" 200' in logs
    assert "Exited (137)" in exited.splitlines()[1]
    assert (running_state, exited_state) == ("running 0\n", "exited 137\n")
    assert as_json["Service"] == "api" and as_json["State"] == "exited"
    assert len(only_running.splitlines()) == 1
    diagnosis = {s.key for s in SIGNATURES if s.pattern.search(exited)}
    assert "app-not-listening" in diagnosis


@pytest.mark.server
def test_down_stops_every_process_of_the_project(engine: Engine, ghcr: FakeRegistry) -> None:
    port = free_port()
    # The app leaves a child behind it: down must not leave that one either.
    command = f"sleep 300 & exec python -m http.server {port} --bind 127.0.0.1"
    config = image_config(["sh", "-c", command], source=engine.write_app("v1"))
    ghcr.push(REPO, SHA1, config=config)
    engine.compose(f"{ghcr.host}/{REPO}:{SHA1}", port)
    engine.ok("compose", "up", "-d")
    answer(port)
    record = engine.records()["app-api-1"]
    sleeper = [pid for pid in process_group(record["pid"]) if pid != record["pid"]]

    stopped = engine.ok("compose", "down")

    assert stopped == (
        " Container app-api-1  Stopping\n Container app-api-1  Stopped\n"
        " Container app-api-1  Removing\n Container app-api-1  Removed\n"
    )
    assert sleeper, "the sleep child was in the container's process group"
    assert not any(alive(pid, start) for pid, start in processes(record))
    assert not any(process_start(pid) for pid in sleeper)
    assert engine.records() == {}
    assert engine.ok("compose", "ps", "-a").split() == [
        "NAME",
        "IMAGE",
        "COMMAND",
        "SERVICE",
        "CREATED",
        "STATUS",
        "PORTS",
    ]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2, trust_env=False)


def process_group(pgid: int) -> list[int]:
    """The pids in process group ``pgid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


@pytest.mark.server
def test_build_then_up_runs_the_built_directory_without_a_registry(engine: Engine) -> None:
    port = free_port()
    context = engine.project / "build"
    context.mkdir()
    (context / "built-here.txt").write_text("from the tarball\n")
    (context / "Dockerfile").write_text(
        "FROM python:3.11-slim\nWORKDIR /app\nCOPY . .\n"
        f'CMD ["python", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]\n'
    )
    unreachable = f"127.0.0.1:{free_port()}/{REPO}:{SHA1}"  # nothing listens: no pull possible
    engine.compose(unreachable, port)

    built = engine.ok("build", "-t", unreachable, str(context))
    up = engine.ok("compose", "up", "-d")
    listing = answer(port)

    assert f"Successfully tagged {unreachable}" in built
    assert "Pulling" not in up and "Started" in up
    assert "built-here.txt" in listing
    engine.ok("compose", "down", "-t", "2")


@pytest.mark.server
def test_the_ephemeral_database_is_a_real_postgres_started_before_the_app(
    engine: Engine, ghcr: FakeRegistry
) -> None:
    pytest.importorskip("local_stack.postgres")
    app_port, db_port = free_port(), free_port()
    config = PreviewConfig(region="ap-northeast-1", database="ephemeral", app_port=app_port)
    (engine.app_dir / "docker-compose.yml").write_text(compose_file(config))
    # The generated files, but for the port: the tests share one loopback.
    (engine.app_dir / "db.env").write_text(f"POSTGRES_PASSWORD=pw0123\nPGPORT={db_port}\n")
    (engine.app_dir / "app.env").write_text("GREETING=hi\n")
    (engine.app_dir / PREVIEW_ENV_FILE).write_text("PR_NUMBER=42\n")
    (engine.app_dir / SECRETS_ENV_FILE).write_text("")  # no env_parameter_path: empty
    ghcr.push(REPO, SHA1, config=uvicorn_config(engine.write_app("v1"), app_port))
    engine.set_image(f"{ghcr.host}/{REPO}:{SHA1}")

    up = engine.ok("compose", "up", "-d")
    answer(app_port)

    async def whoami() -> str:
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = await asyncpg.connect(
                    host="127.0.0.1", port=db_port, user="app", password="pw0123", database="app"
                )
                break
            except (OSError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        try:
            return str(
                await connection.fetchval("SELECT current_user || '@' || current_database()")
            )
        finally:
            await connection.close()

    assert asyncio.run(whoami()) == "app@app"
    assert up.index("Container app-db-1  Started") < up.index("Container app-api-1  Creating")
    assert (engine.root / "volumes" / "app_pgdata" / "_data" / "PG_VERSION").exists()
    assert '"docker-entrypoint.s…"   db' in engine.ok("compose", "ps")
    records = engine.records()
    engine.ok("compose", "down")
    assert not any(alive(pid, start) for r in records.values() for pid, start in processes(r))


# --- the compose plugin --------------------------------------------------------------------------


def test_without_the_compose_plugin_compose_fails_as_docker_does(engine: Engine) -> None:
    missing = {"PR_PREVIEW_ENGINE_NO_COMPOSE": "1"}

    version = engine.docker("compose", "version", env=missing)
    with_file = engine.docker("compose", "-f", "/srv/app/docker-compose.yml", "ps", env=missing)
    plugins = engine.docker_config / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").write_text("#!/bin/sh\n")
    (plugins / "docker-compose").chmod(0o755)
    placed = engine.docker("compose", "version", env=missing)

    assert version.returncode == 1
    assert version.stderr == "docker: 'compose' is not a docker command.\nSee 'docker --help'\n"
    assert with_file.returncode == 125
    assert with_file.stderr.startswith("unknown shorthand flag: 'f' in -f\n")
    for output in (version.stderr, with_file.stderr):
        assert any(
            s.key == "compose-plugin-missing" and s.pattern.search(output) for s in SIGNATURES
        )
    assert placed.returncode == 0 and placed.stdout == "Docker Compose version v2.24.6\n"


def test_a_marker_file_also_takes_the_plugin_away(engine: Engine) -> None:
    engine.root.mkdir(parents=True)
    (engine.root / "no-compose-plugin").touch()

    assert engine.docker("compose", "version").returncode == 1
    (engine.root / "no-compose-plugin").unlink()
    assert engine.ok("compose", "version") == "Docker Compose version v2.24.6\n"


# --- the registry --------------------------------------------------------------------------------


def test_the_registry_serves_what_it_was_pushed_as_buildx_pushes_it() -> None:
    registry = FakeRegistry(users={USER: TOKEN})
    config = uvicorn_config("apps/v1", 8000)
    digest = registry.push(REPO, SHA1, private=True, config=config)
    basic = base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()
    with httpx.Client(transport=registry.transport, base_url="https://ghcr.io") as client:
        challenge = client.get("/v2/")
        scope = {"scope": f"repository:{REPO}:pull", "service": "ghcr.io"}
        token = client.get("/token", params=scope, headers={"Authorization": f"Basic {basic}"})
        bearer = {"Authorization": f"Bearer {token.json()['token']}"}
        head = client.head(f"/v2/{REPO}/manifests/{SHA1}", headers={**bearer, "Accept": OCI_INDEX})
        head_without_index = client.head(
            f"/v2/{REPO}/manifests/{SHA1}", headers={**bearer, "Accept": OCI_MANIFEST}
        )
        index = client.get(f"/v2/{REPO}/manifests/{SHA1}", headers={**bearer, "Accept": OCI_INDEX})
        amd64 = index.json()["manifests"][0]
        manifest = client.get(f"/v2/{REPO}/manifests/{amd64['digest']}", headers=bearer)
        blob = client.get(f"/v2/{REPO}/blobs/{manifest.json()['config']['digest']}", headers=bearer)
        base = client.get("/v2/", headers=bearer)

    assert challenge.status_code == 401
    assert challenge.headers["WWW-Authenticate"] == (
        'Bearer realm="https://ghcr.io/token",service="ghcr.io"'
    )
    assert (head.status_code, head.headers["Docker-Content-Digest"], head.content) == (
        200,
        digest,
        b"",
    )
    assert head_without_index.status_code == 404
    assert index.headers["Content-Type"] == OCI_INDEX
    assert "sha256:" + hashlib.sha256(index.content).hexdigest() == digest
    assert amd64["platform"] == {"architecture": "amd64", "os": "linux"}
    assert index.json()["manifests"][1]["platform"]["os"] == "unknown"  # the attestation
    assert manifest.json()["config"]["mediaType"] == OCI_CONFIG
    assert json.loads(blob.content)["config"]["Labels"] == {SOURCE_LABEL: "apps/v1"}
    assert base.status_code == 200


def test_push_app_labels_the_sample_apps_source_and_command() -> None:
    registry = FakeRegistry()
    registry.push_app(REPO, SHA1, "examples/hello-api/v2")
    repo = registry.repositories[REPO]
    config = json.loads(next(b for b in repo.blobs.values() if b"Labels" in b))["config"]

    assert config["Labels"][SOURCE_LABEL] == "examples/hello-api/v2"
    assert config["Cmd"] == ["uvicorn", "hello_api.main:app", "--host", "0.0.0.0", "--port", "8000"]
