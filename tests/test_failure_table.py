"""The runbook's failure table (§7), reproduced by breaking the real thing.

Every preview here runs on a real local instance (``real_instances``): the user data runs in
bash, pulls the sample app from the registry with the GHCR token from Parameter Store, starts it
with its env file, migrates a real PostgreSQL with alembic, and the probe reaches the real app.
Each test breaks one thing as it breaks in the field and checks that the run fails, that the
instance is left on the short TTL, and that the diagnosis names the right row and fix, quoting
the real error the instance produced. The rows that break a preview while it runs (a password
typed into app.env unencoded, a GHCR token revoked) break the healthy path's preview before its
teardown: a preview booted for each would pull the app only to be broken by hand.
"""

from __future__ import annotations

import re
import shlex
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from flows.preview import pr_preview
from flows.teardown import pr_teardown
from local_stack.instance.runtime import InstanceRuntime
from local_stack.instance.world import (
    DB_PORT,
    DB_SERVER_IP,
    SAMPLE_APP,
    DbServer,
    db_server,
    push_app_source,
    push_database_image,
    push_sample_app,
)
from local_stack.postgres import Postgres
from local_stack.registry import FakeRegistry
from tasks.cloud.aws import AwsClients
from tasks.cloud.run_instances import resolve_ami
from tasks.cloud.ssm import run_command
from tasks.cloud.tags import parse_time
from tasks.config import PreviewConfig
from tasks.steps.diagnose import SIGNATURES, diagnose_instance
from tasks.steps.migrate import MigrationFailed, run_migrations
from tasks.steps.spares import check_spare, replenish_spares
from tasks.steps.update import Stage, deploy_in_place, parse_stages, pull_with_login
from tasks.steps.wait_ready import parse_ready, ready_command
from tests.support import CANARY_GHCR_TOKEN
from tests.support.moto_state import live, tags
from tests.support.run_record import record
from tests.test_instance_runtime import instance_processes, port_forwarding, read, wait_for

pytestmark = pytest.mark.usefixtures("prefect_server")

REPO = "octo-org/app"
SHA1 = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SHA2 = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
SHA3 = "3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c"
PASSWORD = "pa/ss@w:rd%db"  # URL-special on purpose (runbook §5)
PROJECT = Path(__file__).resolve().parents[1]
VERSION = re.compile(r'id="version">([^<]+)<')


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DbServer]:
    """The runbook's db-server: one real PostgreSQL for the module, a database per test."""
    with db_server(
        tmp_path_factory.mktemp("db-server"), role="admin", password=PASSWORD, database="admin"
    ) as found:
        yield found


@dataclass
class Published:
    """The app's v1 and v2 images in a private registry, the config pointed at them and the
    GHCR token in Parameter Store: what a run sees before it launches anything."""

    aws: AwsClients
    config: PreviewConfig
    registry: FakeRegistry

    def set_ghcr_token(self, token: str) -> None:
        self.aws.ssm.put_parameter(
            Name=self.config.ghcr_token_parameter, Value=token, Type="SecureString", Overwrite=True
        )

    def set_database_url(self, url: str) -> None:
        self.aws.ssm.put_parameter(
            Name=self.config.database_url_parameter, Value=url, Type="SecureString", Overwrite=True
        )


@dataclass
class World(Published):
    runtime: InstanceRuntime
    postgres: Postgres
    database_url: str  # as the instance dials it, password URL-encoded
    role: str
    raw_url: str  # the same URL with the password as typed (the §7 mistake)


@pytest.fixture
def published(aws: AwsClients, config: PreviewConfig, registry: FakeRegistry) -> Published:
    """The registry and the config of every test here; alone, for the rows that fail before
    anything is launched (a launch would still show in moto, booted or not)."""
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    push_sample_app(registry, REPO, SHA1, "v1", private=True)
    push_sample_app(registry, REPO, SHA2, "v2", private=True)
    config.image = f"{registry.host}/{REPO}"
    config.poll_seconds = 0.2
    # Long enough for a loaded 2-core machine; short, as the broken worlds wait them out.
    config.ready_timeout_seconds = 90
    config.migrate_timeout_seconds = 20
    config.probe_timeout_seconds = 15
    config.app_down_seconds = 3
    return Published(aws, config, registry)


@pytest.fixture
def world(
    request: pytest.FixtureRequest,
    published: Published,
    real_instances: InstanceRuntime,
    database: DbServer,
) -> World:
    """A healthy world: the published images, a database of its own for this test, the
    encoded DATABASE_URL in Parameter Store; instances reach the registry and the db-server."""
    role = "app_" + request.node.name.removeprefix("test_")[:40].lower().replace("-", "_")
    role = "".join(c if c.isalnum() or c == "_" else "_" for c in role)
    url = database.postgres.create_database(role, role, PASSWORD)
    encoded = url.render(host=DB_SERVER_IP, port=DB_PORT)
    raw = f"postgresql+asyncpg://{role}:{PASSWORD}@{DB_SERVER_IP}:{DB_PORT}/{role}"
    assert quote(PASSWORD, safe="") in encoded
    real_instances.apply({"bridge": "=".join(database.bridge)})
    real_instances.apply({"bridge": f"{published.registry.host}={published.registry.host}"})
    found = World(
        published.aws,
        published.config,
        published.registry,
        real_instances,
        database.postgres,
        encoded,
        role,
        raw,
    )
    found.set_database_url(encoded)
    return found


@dataclass
class Failure:
    key: str
    message: str
    diagnosis: str  # the markdown artifact: cause, fix, evidence
    instance: dict[str, Any]


def failed_preview(world: World, sha: str = SHA1, pr: int = 7) -> Failure:
    state = pr_preview(REPO, pr, sha, action="opened", config=world.config, return_state=True)
    assert state.is_failed(), state.message
    _, artifacts = record(state)
    diagnosis = next((body for body in artifacts if body.startswith("## Diagnosis")), "")
    keys = [sig.key for sig in SIGNATURES if f"**Cause:** {sig.cause}" in diagnosis]
    [instance] = [i for i in live(world.aws) if tags(i).get("PR") == str(pr)]
    return Failure(keys[0] if keys else "", str(state.message), diagnosis, instance)


def deploy_stages(world: World, instance_id: str, sha: str) -> list[Stage]:
    """The stage lines of the deploy command that took ``sha`` to ``instance_id``."""
    sent = world.aws.ssm.list_commands(InstanceId=instance_id)["Commands"]
    [command] = [c for c in sent if c["Comment"] == f"pr-preview deploy {sha[:12]}"]
    invocation = world.aws.ssm.get_command_invocation(
        CommandId=command["CommandId"], InstanceId=instance_id
    )
    return parse_stages(invocation["StandardOutputContent"])


def assert_left_on_short_ttl(failure: Failure, config: PreviewConfig) -> None:
    expires = parse_time(tags(failure.instance)["shutdown-at"])
    launched = failure.instance["LaunchTime"]
    assert expires is not None
    assert (expires - launched).total_seconds() <= config.failure_ttl_hours * 3600 + 120


def app_version(
    tmp_path: Path,
    name: str,
    *,
    replace: dict[str, tuple[str, str]] | None = None,
    base: str = "v1",
) -> str:
    """A copy of the sample app's ``base`` version with files edited: a broken build."""
    target = tmp_path / name
    shutil.copytree(PROJECT / SAMPLE_APP / base, target)
    for relative, (old, new) in (replace or {}).items():
        path = target / relative
        text = path.read_text()
        assert old in text, f"{relative} has no {old!r}"
        path.write_text(text.replace(old, new))
    target.chmod(0o755)
    return str(target)


def push_source(world: World, sha: str, source: str) -> None:
    push_app_source(world.registry, REPO, sha, Path(source), private=True)


class Poller:
    """A reviewer's browser through `pr-preview tunnel`: ``GET /`` every 100 ms on a new
    connection each time (as ``curl`` in a loop), until stopped; every answer kept in order as
    ``(status, version)`` — status 0 and the error's name when no HTTP answer came."""

    def __init__(self, url: str) -> None:
        self.url, self.answers = url, list[tuple[int, str]]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                page = httpx.get(self.url, timeout=10)
                found = VERSION.search(page.text)
                self.answers.append((page.status_code, found.group(1) if found else page.text))
            except httpx.HTTPError as exc:
                self.answers.append((0, type(exc).__name__))
            self._stop.wait(0.1)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    @property
    def failed(self) -> list[tuple[int, str]]:
        return [answer for answer in self.answers if answer[0] != 200]

    @property
    def versions(self) -> list[str]:
        """The versions answered, each once, in the order they first answered."""
        return list(dict.fromkeys(version for status, version in self.answers if status == 200))


# --- the healthy path, for real -----------------------------------------------------------


def test_a_preview_runs_the_real_app_migrates_in_place_and_dies_with_its_instance(
    world: World, tmp_path: Path
) -> None:
    opened = pr_preview(REPO, 42, SHA1, action="opened", config=world.config, return_state=True)
    first = opened.result()
    assert (first.status, first.path) == ("ready", "launched"), opened.message
    assert first.probe.startswith("/healthz → 200")
    # The probe's healthy answer moved the real shutdown timer to the full TTL: no command of
    # its own for it, and the timer agrees with the tag within the run's few seconds.
    sandbox = world.runtime.sandboxes[first.instance_id]
    due = float(sandbox.inside("/run/pr-preview/shutdown-at").read_text())
    assert first.shutdown_at is not None
    assert abs(due - first.shutdown_at.timestamp()) < 90
    sent = world.aws.ssm.list_commands(InstanceId=first.instance_id)["Commands"]
    comments = [command["Comment"] for command in sent]
    assert "pr-preview confirm TTL" not in comments
    # The user data migrated on boot, and wait-ready's command saw it and probed: the flow
    # sent no migrate and no probe of its own.
    assert database_tables(world) == "alembic_version notes"
    assert not [c for c in comments if c.startswith(("pr-preview migrate", "pr-preview probe"))]
    with port_forwarding(world.runtime, first.instance_id) as url:
        page = httpx.get(url, timeout=10).text
        assert SHA1 in page and "v1" in page
        assert httpx.get(f"{url}docs", timeout=10).status_code == 200
        # The push, while a reviewer polls through the tunnel: v2 starts beside v1, the
        # proxy switches once it answers, v1 stops after — not one request fails.
        with Poller(url) as reviewer:
            pushed = pr_preview(
                REPO, 42, SHA2, action="synchronize", config=world.config, return_state=True
            )
    assert reviewer.failed == [] and len(reviewer.answers) > 10, reviewer.answers
    assert reviewer.versions == ["v1", "v2"], reviewer.answers
    second = pushed.result()
    assert (second.status, second.path, second.instance_id) == (
        "ready",
        "in-place",
        first.instance_id,
    )
    with port_forwarding(world.runtime, first.instance_id) as url:
        page = httpx.get(url, timeout=10).text
        assert SHA2 in page and "v2" in page and "visits" in page
    # v2's migration really ran against the db-server, in the push's one deploy command (one
    # stage line each); the boot's marker names v1's .env, so the ready check no longer calls
    # the instance migrated.
    assert database_tables(world) == "alembic_version notes visits"
    sent = world.aws.ssm.list_commands(InstanceId=first.instance_id)["Commands"]
    comments = [command["Comment"] for command in sent]
    assert not [c for c in comments if c.startswith(("pr-preview migrate", "pr-preview probe"))]
    # The image check found SHA2's image: the instance began pulling it before the deploy.
    assert f"pr-preview early pull {SHA2[:12]}" in comments
    early = sandbox.inside("/var/lib/pr-preview/early-pull.log")
    wait_for(lambda: "Status: " in early.read_text(), timeout=30)
    stages = {stage.name: stage for stage in deploy_stages(world, first.instance_id, SHA2)}
    # Pulled by the deploy, or found present when the early pull had finished first.
    assert stages["pull"].outcome in ("ok", "skipped")
    assert [(name, stage.outcome) for name, stage in stages.items()][1:] == [
        ("migrate", "ok"),
        ("swap", "ok"),
        ("probe", "ok"),
        ("switch", "ok"),
        ("ttl", "ok"),
    ]
    assert stages["swap"].detail == "started beside the previous version on 127.0.0.1:18001"
    assert stages["switch"].detail == (
        "127.0.0.1:8000 forwards to 127.0.0.1:18001;"
        " the previous version stops once its connections end"
    )
    assert stages["probe"].detail.split()[1] == "200"  # /healthz, or /docs while it starts
    # v1 is retired after the command ended, holding the deploy lock the next deploy waits for.
    retired = sandbox.inside(f"{world.config.app_dir}/.switch.log")
    wait_for(lambda: retired.exists() and " retire ok " in retired.read_text(), timeout=30)
    # The same image again: its layers are here and the database stands at its alembic head
    # (the image's label), so neither a pull nor a migration container runs.
    again = deploy_in_place(
        world.aws.ec2,
        world.aws.ssm,
        world.config,
        first.instance_id,
        repo=REPO,
        sha=SHA2,
        digest=world.registry.repositories[REPO].tags[SHA2],
    )
    outcomes = [(stage.name, stage.outcome) for stage in again.stages]
    assert outcomes == [
        ("pull", "skipped"),
        ("migrate", "skipped"),
        ("swap", "ok"),
        ("probe", "ok"),
        ("switch", "ok"),
        ("ttl", "skipped"),
    ]
    assert again.stages[1].detail == "database at head 0002"
    assert again.stages[2].detail.endswith("127.0.0.1:18000")  # the slots take turns
    # A push whose app never answers: it starts beside v2, fails its probe and goes; v2 is
    # never switched away from, nothing is relaunched, and the comment says what still serves.
    crashing = app_version(
        tmp_path,
        "crashing-app",
        replace={
            "hello_api/main.py": ("from fastapi", "import hello_api.missing_module\nfrom fastapi")
        },
        base="v2",  # its migrations are v2's: the database stands at its head already
    )
    push_source(world, SHA3, crashing)
    world.config.probe_timeout_seconds = 5
    with (
        port_forwarding(world.runtime, first.instance_id) as url,
        Poller(url) as reviewer,
    ):
        broken = pr_preview(
            REPO, 42, SHA3, action="synchronize", config=world.config, return_state=True
        )
    assert broken.is_failed(), broken.message
    assert reviewer.failed == [] and reviewer.versions == ["v2"], reviewer.answers
    stages = {stage.name: stage for stage in deploy_stages(world, first.instance_id, SHA3)}
    assert stages["probe"].outcome == "failed" and "switch" not in stages
    assert stages["probe"].detail.endswith("the previous version keeps serving")
    [instance] = live(world.aws)
    assert instance["InstanceId"] == first.instance_id and tags(instance)["Sha"] == SHA2
    _, artifacts = record(broken)
    [comment] = [body for body in artifacts if "Preview failed" in body]
    assert f"the previous version (`{SHA2[:12]}`) keeps serving until" in comment
    assert "No module named 'hello_api.missing_module'" in comment
    with port_forwarding(world.runtime, first.instance_id) as url:
        assert SHA2 in httpx.get(url, timeout=10).text
    ps = run_command(
        world.aws.ssm,
        first.instance_id,
        ["docker ps -a --format '{{.Image}}'", f"cat {world.config.app_dir}/.env"],
        timeout_seconds=30,
        poll_seconds=0.2,
    ).stdout
    assert SHA3 not in ps and SHA2 in ps  # the failed version is gone, .env put back
    assert SHA1 not in ps  # v1 retired in the background after the switch
    check = run_command(
        world.aws.ssm,
        first.instance_id,
        ready_command(world.config),
        timeout_seconds=30,
        poll_seconds=0.2,
    )
    answer = parse_ready(check.stdout, world.config.probe_paths)
    assert (answer.bootstrap, answer.port_open, answer.migrated) == ("done", True, False)
    # Two rows of §7 that break a preview while it runs, on this one rather than on a preview
    # booted for each: what they break is on the instance, and the teardown follows.
    unencoded_password_under(world, first.instance_id)
    revoked_token_under(world, first.instance_id)
    assert instance_processes(first.instance_id)
    pr_teardown(REPO, 42, config=world.config)
    assert not live(world.aws)
    wait_for(lambda: not instance_processes(first.instance_id), timeout=10)


def test_a_warm_spare_boots_for_real_and_a_new_pr_runs_on_it(world: World) -> None:
    """The spare's user data runs in bash up to the app and stops; a new PR claims the spare
    and its real app is pulled, started, migrated and probed there — no launch."""
    world.config.warm_spares = 1
    world.config.spare_base_tag = "main"  # the default branch's image: its layers on the spare
    push_sample_app(world.registry, REPO, "main", "v1", private=True)
    ami = resolve_ami(world.aws.ec2, world.config)["ImageId"]
    [spare] = replenish_spares(
        world.aws.ec2, world.config, ami_id=ami, subnet_id=world.config.subnet_id
    ).launched
    wait_for(lambda: check_spare(world.aws.ssm, world.config, spare).ready, timeout=90)
    booted = run_command(
        world.aws.ssm,
        spare,
        ["cat /var/log/cloud-init-output.log"],
        timeout_seconds=30,
        poll_seconds=0.2,
    )
    assert "pr-preview spare ready" in booted.stdout
    assert " api Pull" not in booted.stdout  # a spare pulls no PR's image (compose's words)…
    assert f"base layers of {world.config.image_for(REPO)}:main pulled" in booted.stdout  # …but
    assert CANARY_GHCR_TOKEN not in booted.stdout  # the base layers, with the token unshown

    opened = pr_preview(REPO, 44, SHA1, action="opened", config=world.config, return_state=True)
    result = opened.result()

    assert (result.status, result.path, result.instance_id) == ("ready", "spare", spare)
    assert result.probe.startswith("/healthz → 200")
    with port_forwarding(world.runtime, spare) as url:
        page = httpx.get(url, timeout=10).text
        assert SHA1 in page and "v1" in page
    [instance] = live(world.aws)
    assert tags(instance)["PR"] == "44" and tags(instance)["Sha"] == SHA1


def test_an_ephemeral_database_lives_and_dies_with_its_preview(world: World) -> None:
    """`database: ephemeral` (runbook §11): a real PostgreSQL beside the app on the instance,
    migrated there; closing the PR ends it with the instance, and the db-server is untouched."""
    world.config.database = "ephemeral"
    # postgres:16-alpine from Docker Hub, as a mirror on the local registry serves it.
    push_database_image(world.registry)
    world.runtime.apply(
        {"env": {"PR_PREVIEW_REGISTRY_MIRRORS": f"docker.io=http://{world.registry.host}"}}
    )
    opened = pr_preview(REPO, 43, SHA2, action="opened", config=world.config, return_state=True)
    result = opened.result()
    assert result.status == "ready", opened.message
    instance_id = result.instance_id
    tables = run_command(
        world.aws.ssm,
        instance_id,
        [f"cd {shlex.quote(world.config.app_dir)}", "docker compose ps -a"],
        timeout_seconds=60,
        poll_seconds=0.2,
    )
    assert "db-1" in tables.output and "Up " in tables.output, tables.output
    postgres = [
        pid for pid in instance_processes(instance_id) if b"postgres" in read(pid, "cmdline")
    ]
    assert postgres, "no PostgreSQL among the instance's processes"
    assert database_tables(world) == ""  # the migrations ran on the instance's own database
    pr_teardown(REPO, 43, config=world.config)
    wait_for(lambda: not instance_processes(instance_id), timeout=10)


def database_tables(world: World) -> str:
    return world.postgres.execute(
        "select string_agg(tablename, ' ' order by tablename) from pg_tables"
        " where schemaname = 'public'",
        database=world.role,
    ).strip()


# --- §7, row by row ------------------------------------------------------------------------


def test_an_unencoded_password_in_database_url(published: Published) -> None:
    """`invalid integer value ... for connection option "port"`: the password's symbols.

    Preflight reads the parameter and refuses before anything is launched. An instance that
    has such a URL anyway (its app.env edited by hand) fails to migrate with the driver's own
    error: :func:`unencoded_password_under` breaks the healthy path's running preview so."""
    raw = f"postgresql+asyncpg://app:{PASSWORD}@{DB_SERVER_IP}:{DB_PORT}/app"
    published.set_database_url(raw)
    refused = pr_preview(REPO, 6, SHA1, action="opened", config=published.config, return_state=True)
    assert refused.is_failed()
    assert "URL-encode the password" in str(refused.message)
    assert not live(published.aws)


def unencoded_password_under(world: World, instance_id: str) -> None:
    """The row above on a running preview: its app.env edited by hand to the URL as typed,
    the migrations fail with the driver's error, and the diagnosis names the row. app.env is
    put back after."""
    app_env = shlex.quote(f"{world.config.app_dir}/app.env")
    edit = run_command(
        world.aws.ssm,
        instance_id,
        [
            f"cp -p {app_env} {app_env}.kept",
            f"printf 'DATABASE_URL=%s\\n' {shlex.quote(world.raw_url)} > {app_env}",
        ],
        timeout_seconds=30,
        poll_seconds=0.2,
    )
    assert edit.ok, edit
    with pytest.raises(MigrationFailed) as failed:
        run_migrations(world.aws.ssm, world.config, instance_id, timeout_seconds=60)
    assert "invalid literal for int() with base 10" in str(failed.value)
    diagnosis = diagnose_instance(world.aws.ssm, world.config, instance_id, error=failed.value)
    assert diagnosis.key == "database-url-encoding", diagnosis.markdown()
    assert "URL-encode the password" in diagnosis.fix
    assert PASSWORD not in diagnosis.markdown()  # the secret is masked in the evidence
    back = run_command(
        world.aws.ssm,
        instance_id,
        [f"mv -f {app_env}.kept {app_env}"],
        timeout_seconds=30,
        poll_seconds=0.2,
    )
    assert back.ok, back


def test_a_database_that_refuses_connections(world: World) -> None:
    """Nothing listens where DATABASE_URL points: the driver's real refusal."""
    world.set_database_url(world.database_url.replace(f":{DB_PORT}/", ":5439/"))
    world.config.migrate_timeout_seconds = 4  # every attempt meets the same refusal
    failure = failed_preview(world)
    assert failure.key == "db-refused", failure.diagnosis
    assert "Connect call failed" in failure.diagnosis or "refused" in failure.diagnosis
    assert_left_on_short_ttl(failure, world.config)


def test_a_wrong_ghcr_token(published: Published) -> None:
    """GHCR `unauthorized`: the registry's real 401, before launch and on an instance.

    check-image uses the same token as the instance, so a wrong one stops the run before
    anything is launched. An instance whose token is revoked under it (rotated while the
    preview runs) fails to pull: :func:`revoked_token_under` revokes the token of the healthy
    path's running preview."""
    wrong = "ghp_wrongToken000000000000000000000000"
    published.set_ghcr_token(wrong)
    refused = pr_preview(REPO, 6, SHA1, action="opened", config=published.config, return_state=True)
    assert refused.is_failed()
    assert "(HTTP 401)" in str(refused.message) and "read:packages" in str(refused.message)
    assert not live(published.aws)


def revoked_token_under(world: World, instance_id: str) -> None:
    """The row above on a running preview: the registry no longer takes its token, the next
    push's image does not pull, and the diagnosis names the row; with the rotated token in
    Parameter Store, a push's pull logs in again and pulls."""
    next_push = "4d" * 20
    push_sample_app(world.registry, REPO, next_push, "v1", private=True)
    # Revoked: the token no longer logs in, and the registry tokens it minted are void.
    rotated = "ghp_rotatedToken00000000000000000000000"
    world.registry.users["octo-org"] = rotated
    world.registry.tokens.clear()
    compose = shlex.quote(f"{world.config.app_dir}/docker-compose.yml")
    # The next push's image (the running one is pinned by digest and already here, so pulling
    # it again asks the registry nothing).
    pushed = shlex.quote(f"APP_IMAGE={world.config.image}:{next_push}")
    pull = run_command(
        world.aws.ssm,
        instance_id,
        [f"env {pushed} docker compose -f {compose} pull api"],
        timeout_seconds=60,
        poll_seconds=0.2,
    )
    assert not pull.ok
    assert ": unauthorized" in pull.output
    diagnosis = diagnose_instance(world.aws.ssm, world.config, instance_id, error=pull.output)
    assert diagnosis.key == "ghcr-unauthorized", diagnosis.markdown()
    assert "read:packages" in diagnosis.cause
    # Rotated: the new token is in Parameter Store. A push's pull, refused with the login the
    # instance holds, logs in again with it and pulls.
    world.set_ghcr_token(rotated)
    relogin = run_command(
        world.aws.ssm,
        instance_id,
        [pull_with_login(world.config, REPO, f"env {pushed} docker compose -f {compose} pull api")],
        timeout_seconds=60,
        poll_seconds=0.2,
    )
    assert relogin.ok, relogin.output
    assert ": unauthorized" in relogin.output and "Login Succeeded" in relogin.output


def test_a_migration_that_fails(world: World, tmp_path: Path) -> None:
    """A revision whose SQL the database rejects: alembic's real error, the run fails at
    migrate and the instance stays for a look."""
    broken = app_version(
        tmp_path,
        "broken-migration",
        replace={
            "migrations/versions/0001_notes.py": (
                "op.create_table(",
                'op.execute("ALTER TABLE no_such_table ADD COLUMN x int")\n    op.create_table(',
            )
        },
    )
    push_source(world, SHA1, broken)
    failure = failed_preview(world)
    assert failure.key == "migration-failed", failure.diagnosis
    assert "no_such_table" in failure.message + failure.diagnosis
    assert 'relation "no_such_table" does not exist' in failure.message + failure.diagnosis
    assert_left_on_short_ttl(failure, world.config)


def test_an_app_that_crashes_on_start(world: World, tmp_path: Path) -> None:
    """The container exits at once: the diagnosis quotes the real traceback."""
    crashing = app_version(
        tmp_path,
        "crashing-app",
        replace={
            "hello_api/main.py": ("from fastapi", "import hello_api.missing_module\nfrom fastapi")
        },
    )
    push_source(world, SHA1, crashing)
    world.config.migration_command = "true"
    failure = failed_preview(world)
    assert failure.key == "app-not-listening", failure.diagnosis
    # restart: unless-stopped: Docker restarts it, keeping the last run's exit code.
    assert "the app's container has been restarting (exit code 1" in failure.message
    assert "ModuleNotFoundError: No module named 'hello_api.missing_module'" in failure.diagnosis
    assert_left_on_short_ttl(failure, world.config)


def test_the_compose_plugin_missing_and_its_download_failing(world: World) -> None:
    """AL2023 has no docker-compose-plugin package, and the release download cannot reach
    GitHub from this instance (it has no route out): the real curl's error is the evidence."""
    world.config.compose_release_url = "https://github.com/docker/compose/releases/download"
    failure = failed_preview(world)
    assert failure.key == "compose-plugin-missing", failure.diagnosis
    assert "bootstrap failed at step: compose" in failure.diagnosis
    assert "curl: (" in failure.diagnosis
    assert_left_on_short_ttl(failure, world.config)


def test_docker_missing_and_user_data_failing_at_a_named_step(world: World) -> None:
    """`sh: docker: command not found` and `cloud-init ... scripts-user failed`: the package
    repository is out of reach, `dnf install docker` fails, the user data stops at its
    docker step, and the instance has no docker unit."""
    world.runtime.apply({"env": {"PR_PREVIEW_DNF_OFFLINE": "1"}, "pr": 7})
    failure = failed_preview(world)
    assert failure.key == "docker-missing", failure.diagnosis
    assert "docker: command not found" in failure.diagnosis
    assert "bootstrap failed at step: docker" in failure.diagnosis
    assert "Failed to download metadata for repo 'amazonlinux'" in failure.diagnosis
    assert "Failed to run module scripts-user" in failure.diagnosis
    assert_left_on_short_ttl(failure, world.config)


def test_an_image_tag_that_was_never_pushed(published: Published) -> None:
    """The build has not pushed `:<sha>`: the registry's real `manifest unknown`, and no
    instance is launched for an image that does not exist."""
    missing = "c" * 40
    published.config.image_wait_seconds = 0
    state = pr_preview(
        REPO, 8, missing, action="opened", config=published.config, return_state=True
    )
    assert state.is_failed()
    assert missing in str(state.message)
    assert "image" in str(state.message).lower()
    assert not live(published.aws)
