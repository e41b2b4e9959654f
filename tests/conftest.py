"""Shared fixtures: moto standing in for AWS, the runbook's account, one Prefect test server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from moto import mock_aws

from deployments.demo_account import DemoAccount, create_demo_account
from deployments.local_http import serve_handler
from deployments.scripted_instance import ScriptedInstances
from tasks.aws import AwsClients, build_clients
from tasks.config import PreviewConfig, load_config
from tests.fakes.fault_matrix_report import (  # noqa: F401  (hooks that print the matrix)
    pytest_runtest_logreport,
    pytest_terminal_summary,
)
from tests.fakes.installation import installation  # noqa: F401  (a shared fixture)
from tests.fakes.registry import FakeRegistry

REGION = "ap-northeast-1"
CANARY_GHCR_TOKEN = "ghp_CANARYghcrToken1234567890abcdefABCD"
CANARY_DB_PASSWORD = "Canary%2FDbPassw0rd"
CANARY_DATABASE_URL = f"postgresql+asyncpg://app:{CANARY_DB_PASSWORD}@172.31.39.125:5432/app"
CANARIES = (CANARY_GHCR_TOKEN, CANARY_DB_PASSWORD, "Canary/DbPassw0rd")


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


@pytest.fixture
def aws() -> Iterator[AwsClients]:
    """Fresh in-process moto and clients built the way a run builds them."""
    with mock_aws():
        yield build_clients(PreviewConfig(region=REGION))


@pytest.fixture
def account(aws: AwsClients) -> DemoAccount:
    return create_demo_account(aws, ghcr_token=CANARY_GHCR_TOKEN, database_url=CANARY_DATABASE_URL)


@pytest.fixture
def config(account: DemoAccount) -> PreviewConfig:
    """The account's config with timings shrunk so tests never sleep for long."""
    return load_config(
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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every test that runs a real flow."""
    home: Path = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["TMPDIR"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def scripted_ssm() -> Iterator[ScriptedInstances]:
    """What instances "print" over SSM, scripted per command; unscripted ones act like moto."""
    with ScriptedInstances().patched() as fake:
        yield fake


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    """A fake OCI registry on 127.0.0.1 (plain http, as docker speaks to a local registry)."""
    fake = FakeRegistry(scheme="http")
    with serve_handler(fake.handle) as url:
        fake.host = url.removeprefix("http://")
        yield fake
