"""Every shared fixture: moto standing in for AWS, the runbook's account, a Prefect test server,
the scripted instance, instances that boot for real, a fake registry, a real PostgreSQL, and the
whole self-hosted installation.

A test module that sets ``ONE_ACCOUNT_PER_MODULE = True`` gets one moto and one account for all
its tests (each costs ~0.8 s on 2 cores): its tests launch their own instances and look only at
those.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws

from local_stack.account import DemoAccount, create_demo_account
from local_stack.db_host import DbHost, launch_db_host
from local_stack.db_host import db_host as local_db_host
from local_stack.instance.relay import Bridge
from local_stack.instance.runtime import InstanceRuntime
from local_stack.postgres import Postgres, postgres_server
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import ScriptedInstances
from local_stack.serve import serve_handler
from tasks.cloud.aws import AwsClients, build_clients
from tasks.config import PreviewConfig, load_config
from tests.fakes.github import FakeGitHub, served_github
from tests.support import CANARY_DATABASE_URL, CANARY_GHCR_TOKEN, REGION
from tests.support.deployed import DeployedConfig
from tests.support.installation import Installation, running_installation
from tests.support.ssm import plain_instances

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

pytest_plugins = ["tests.plugins.fault_matrix_report"]

SERVER_FIXTURES = {"prefect_server", "installation", "e2e", "real_instances"}


# tryfirst: before pytest's own -m filter reads the server mark; still after pytest-randomly's
# shuffle, which runs in a wrapper around every plain implementation.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark what needs a Prefect server or other processes, so `make test-fast` can leave it.

    The order stays pytest-randomly's: handing the longest tests out first (tried) put every
    installation, fault matrix and real boot on the CPU at once, and the suite took 792-852 s
    where the random mix took 617 s."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


def _shares_account(request: pytest.FixtureRequest) -> bool:
    return bool(getattr(request.module, "ONE_ACCOUNT_PER_MODULE", False))


@pytest.fixture(autouse=True)
def _aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials, our region, no endpoint override and no PR_PREVIEW_* from the shell."""
    for name in list(os.environ):
        if name.startswith("PR_PREVIEW_") or name in (
            "AWS_ENDPOINT_URL",
            "GITHUB_TOKEN",
            "GITHUB_API_URL",
            "GITHUB_WEBHOOK_SECRET",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(scope="module")
def module_aws() -> Iterator[AwsClients]:
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
            patch.delenv(name, raising=False)
        with mock_aws():
            yield build_clients(PreviewConfig.model_validate({"region": REGION}))


@pytest.fixture(scope="module")
def module_account(module_aws: AwsClients) -> DemoAccount:
    return create_demo_account(
        module_aws, ghcr_token=CANARY_GHCR_TOKEN, database_url=CANARY_DATABASE_URL
    )


@pytest.fixture(scope="module")
def module_config(module_account: DemoAccount) -> DeployedConfig:
    loaded = load_config(
        {
            **module_account.config_values(),
            "region": REGION,
            "retry_delay_seconds": 0,
            "poll_seconds": 0.01,
            "image": "ghcr.io/octo-org/app",
        },
        env={},
        use_variable=False,
    )
    return DeployedConfig.of(loaded)


@pytest.fixture
def aws(request: pytest.FixtureRequest) -> Iterator[AwsClients]:
    """Fresh in-process moto and clients built the way a run builds them."""
    if _shares_account(request):
        yield request.getfixturevalue("module_aws")
        return
    with mock_aws():
        yield build_clients(PreviewConfig(region=REGION))


@pytest.fixture
def account(request: pytest.FixtureRequest, aws: AwsClients) -> DemoAccount:
    if _shares_account(request):
        found: DemoAccount = request.getfixturevalue("module_account")
        return found
    return create_demo_account(aws, ghcr_token=CANARY_GHCR_TOKEN, database_url=CANARY_DATABASE_URL)


@pytest.fixture
def config(
    request: pytest.FixtureRequest, account: DemoAccount, monkeypatch: pytest.MonkeyPatch
) -> DeployedConfig:
    """The account's config with timings shrunk so tests never sleep for long; its trusted
    fields are in the test's environment, as a deployment's runs find them
    (``tests.support.deployed``), so ``config=config`` passes a flow the tuning only."""
    if _shares_account(request):
        shared: DeployedConfig = request.getfixturevalue("module_config")
        return shared.deploy(monkeypatch)
    loaded = load_config(
        {
            **account.config_values(),
            "region": REGION,
            "retry_delay_seconds": 0,
            "poll_seconds": 0.01,
            "image": "ghcr.io/octo-org/app",
            "ready_timeout_seconds": 30,
            "migrate_timeout_seconds": 10,
            "probe_timeout_seconds": 10,
            "image_wait_seconds": 0,
        },
        env={},
        use_variable=False,
    )
    return DeployedConfig.of(loaded).deploy(monkeypatch)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every test that runs a real flow."""
    home: Path = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["TMPDIR"] = str(home)
    from prefect.server.api import server as prefect_server_module
    from prefect.testing.utilities import prefect_test_harness

    Server = prefect_server_module.SubprocessASGIServer
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Server, "_run_uvicorn_command", _on_our_factory(Server._run_uvicorn_command))
        with prefect_test_harness(server_startup_timeout=60):
            yield


# Prefect's task-run recorder writes each task-run event in a transaction of its own (batch size
# 1): three per task run, ~25 ms of the server's CPU per task run, most of what a run costs the
# server. In batches of up to 100, flushed every second, the same rows cost a third; a task run
# reaches the API up to a second after its event (a reader polls: test_seen_by_a_person). The
# interval is whole seconds: Prefect truncates it, and 0 flushes in a busy loop.
RECORDER_IN_BATCHES = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


def _on_our_factory(run_uvicorn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The harness's uvicorn command, on ``local_stack.sqlite_server:create_app``: Prefect's
    app with every SQLite transaction begun IMMEDIATE. Prefect's own answers 503 "database is
    locked" to a deferred transaction another writer overtook (ten flows at once did: a run
    failed), where an IMMEDIATE one waits its turn. Its task-run recorder writes in batches
    (``RECORDER_IN_BATCHES``)."""
    prefect_factory = "prefect.server.api.server:create_app"
    ours = "local_stack.sqlite_server:create_app"

    def run(server: Any) -> Any:
        real_popen = subprocess.Popen

        def popen(args: list[str], *rest: Any, **kwargs: Any) -> Any:
            assert prefect_factory in args, f"Prefect's uvicorn command changed: {args}"
            kwargs["env"] = {**kwargs.get("env", os.environ), **RECORDER_IN_BATCHES}
            return real_popen([ours if a == prefect_factory else a for a in args], *rest, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(subprocess, "Popen", popen)
            return run_uvicorn(server)

    return run


@pytest.fixture
def scripted_ssm() -> Iterator[ScriptedInstances]:
    """What instances "print" over SSM, scripted per command; unscripted ones act like moto."""
    with ScriptedInstances().patched() as fake:
        yield fake


@pytest.fixture
def instance(aws: AwsClients, scripted_ssm: ScriptedInstances) -> str:
    """One plain running instance whose scripted agent answers every check healthy."""
    (instance_id,) = plain_instances(aws.ec2)
    scripted_ssm.healthy(instance_id=instance_id)
    return instance_id


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A real PostgreSQL on 127.0.0.1 for the module's tests."""
    with postgres_server(tmp_path_factory.mktemp("postgres") / "data") as server:
        yield server


@pytest.fixture
def db_host(
    aws: AwsClients, account: DemoAccount, scripted_ssm: ScriptedInstances, tmp_path: Path
) -> Iterator[DbHost]:
    """The runbook's database host for ``database: per-preview``: an instance in moto whose
    SSM commands run in real bash beside a real PostgreSQL (``local_stack.db_host``)."""
    instance_id = launch_db_host(aws.ec2, account.db_sg_id)
    with local_db_host(tmp_path / "db-host", instance_id) as host:
        host.serve(scripted_ssm)
        yield host


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    """A fake OCI registry on 127.0.0.1 (plain http, as docker speaks to a local registry)."""
    fake = FakeRegistry(scheme="http")
    with serve_handler(fake.handle) as url:
        fake.host = url.removeprefix("http://")
        yield fake


@pytest.fixture
def github_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    """A fake GitHub on a local port, reached as the flows reach GitHub: ``GITHUB_API_URL`` and
    the token ``good-token``."""
    with served_github(monkeypatch) as fake:
        yield fake


@pytest.fixture
def real_instances(aws: AwsClients, tmp_path: Path) -> Iterator[InstanceRuntime]:
    """Instances that boot for real on this machine (local_stack/instance) behind the test's
    moto. moto also answers over HTTP, so the AWS CLI on an instance reads the test's
    Parameter Store."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    runtime = InstanceRuntime(
        tmp_path / "instances",
        bridges=[Bridge(host, port, host, port)],
        env={
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        },
    )
    try:
        with runtime.patched():
            yield runtime
    finally:
        server.stop()


@pytest.fixture(scope="session")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    """The whole self-hosted installation, started once per test worker."""
    with running_installation(tmp_path_factory.mktemp("installation")) as found:
        yield found


@pytest.fixture
def e2e(installation: Installation) -> Installation:
    """The installation, idle, with no live instance and the default configuration."""
    installation.fresh()
    return installation
