"""Test side of the scripted instance: fixtures and helpers over
``deployments/scripted_instance.py``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from moto import mock_aws

from deployments.demo_account import DemoAccount, create_demo_account
from deployments.scripted_instance import *  # noqa: F403
from tasks.aws import AwsClients, build_clients
from tasks.config import PreviewConfig, load_config
from tests.conftest import CANARY_DATABASE_URL, CANARY_GHCR_TOKEN, REGION


def plain_instances(ec2: Any, count: int = 1) -> list[str]:
    """``count`` bare instances of an AMI moto ships (a name filter keeps the lookup fast)."""
    images = ec2.describe_images(
        Owners=["amazon"], Filters=[{"Name": "name", "Values": ["al2023-ami-2023*-x86_64"]}]
    )["Images"]
    reservation = ec2.run_instances(ImageId=images[0]["ImageId"], MinCount=count, MaxCount=count)
    return [instance["InstanceId"] for instance in reservation["Instances"]]


def module_scoped_account() -> tuple[Any, Any, Any]:
    """Module-scoped ``aws``, ``account`` and ``config`` built exactly as conftest builds them.

    One moto and one demo account per test module instead of per test: on a 2-core machine
    each costs ~0.8 s. Tests sharing them must launch their own instances and look only at
    those. Use as ``aws, account, config = module_scoped_account()`` at module level.
    """

    @pytest.fixture(scope="module", name="aws")
    def aws_fixture() -> Iterator[AwsClients]:
        with pytest.MonkeyPatch.context() as patch:
            for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
                patch.delenv(name, raising=False)
            with mock_aws():
                yield build_clients(PreviewConfig.model_validate({"region": REGION}))

    @pytest.fixture(scope="module", name="account")
    def account_fixture(aws: AwsClients) -> DemoAccount:
        return create_demo_account(
            aws, ghcr_token=CANARY_GHCR_TOKEN, database_url=CANARY_DATABASE_URL
        )

    @pytest.fixture(scope="module", name="config")
    def config_fixture(account: DemoAccount) -> PreviewConfig:
        return load_config(
            {
                **account.config_values(),
                "region": REGION,
                "retry_delay_seconds": 0,
                "poll_seconds": 0.01,
                "image": "ghcr.io/octo-org/app",
            },
            env={},
            use_variable=False,
        )

    return aws_fixture, account_fixture, config_fixture
