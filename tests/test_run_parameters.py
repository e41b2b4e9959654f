"""A run's ``config`` parameter tunes; it never widens what a preview trusts (issue 26).

Whoever can start a run (``prefect deployment run -p config=...``, the UI's run form) passes
``config`` as a JSON object; the fields that decide what runs, where or for whom come from the
``pr-preview-config`` Variable or the environment only. Here every flow is started with such a
parameter, as a deployment run gets it (a plain mapping), against moto, a fake registry and a
fake GitHub: each fails at once, naming the fields, and nothing is launched, changed, read or
posted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect import Flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import State
from prefect.utilities.callables import parameter_schema

from flows.bake import pr_preview_bake
from flows.pin import pr_pin
from flows.preview import pr_preview
from flows.spares import pr_spares
from flows.sweeper import ttl_sweeper
from flows.teardown import pr_teardown
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import ScriptedInstances
from tasks.app.user_data import LaunchSpec
from tasks.cloud.aws import AwsClients
from tasks.config import TUNING_FIELDS, VARIABLE_NAME, PreviewConfig
from tasks.steps.launch import launch_instance
from tests.fakes.github import FakeGitHub, served_github
from tests.support import CANARY_GHCR_TOKEN
from tests.support.moto_state import instances

REPO = "octo-org/app"
SHA = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
FLOWS: list[Flow[..., Any]] = [
    pr_preview,
    pr_teardown,
    ttl_sweeper,
    pr_spares,
    pr_preview_bake,
    pr_pin,
]


@pytest.fixture
def github(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    with served_github(monkeypatch) as fake:
        yield fake


@pytest.fixture
def world(
    config: PreviewConfig, registry: FakeRegistry, scripted_ssm: ScriptedInstances
) -> PreviewConfig:
    """The operator's configuration serves octo-org's image; the image is pushed and every
    instance would boot: a run that got past its configuration would launch."""
    config.image = f"{registry.host}/octo-org/app"
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    registry.push("octo-org/app", SHA, private=True)
    scripted_ssm.healthy()
    return config


def fleet(aws: AwsClients) -> dict[str, str]:
    return {i["InstanceId"]: i["State"]["Name"] for i in instances(aws)}


def assert_refused(state: State[Any], *fields: str) -> None:
    message = state.message or ""
    assert state.is_failed(), message
    assert "TrustedFieldInRun" in message
    for name in fields:
        assert name in message and f"PR_PREVIEW_{name.upper()}" in message
    assert f"Prefect Variable {VARIABLE_NAME}" in message


@pytest.mark.usefixtures("prefect_server")
def test_a_preview_run_cannot_widen_whom_it_serves_or_what_it_pulls(
    aws: AwsClients, world: PreviewConfig, registry: FakeRegistry, github: FakeGitHub
) -> None:
    stranger = "evil-user/miner"

    serve_a_stranger = pr_preview(
        stranger,
        7,
        SHA,
        action="opened",
        config={"allowed_repos": [f"{stranger}"], "ttl_hours": 2},
        return_state=True,
    )
    run_another_image = pr_preview(
        REPO,
        42,
        SHA,
        action="opened",
        config={"image": f"{registry.host}/evil-user/miner", "instance_profile": "admin"},
        return_state=True,
    )

    assert_refused(serve_a_stranger, "allowed_repos")
    assert "ttl_hours" not in (serve_a_stranger.message or "")  # a tuning field is welcome
    assert_refused(run_another_image, "image", "instance_profile")
    assert instances(aws) == []
    assert registry.requests == [] and github.requests == []  # no check, no comment, no read


@pytest.mark.usefixtures("prefect_server")
def test_no_other_flow_takes_a_trusted_field_from_its_run(
    aws: AwsClients, world: PreviewConfig, github: FakeGitHub
) -> None:
    # A preview launched by hand, long expired: the sweeper and a teardown would end it.
    long_ago = datetime.now(UTC) - timedelta(days=3)
    launch_instance(aws.ec2, world, LaunchSpec(REPO, 42, SHA), now=long_ago)
    before = fleet(aws)
    runs: dict[str, Callable[[], State[Any]]] = {
        "purpose_tag": lambda: pr_teardown(
            REPO, 42, config={"purpose_tag": world.purpose_tag}, return_state=True
        ),
        "region": lambda: ttl_sweeper(config={"region": "eu-west-1"}, return_state=True),
        "subnet_id": lambda: pr_spares(
            config={"warm_spares": 1, "subnet_id": "subnet-0123456789abcdef0"}, return_state=True
        ),
        "ami_owners": lambda: pr_preview_bake(config={"ami_owners": ["666"]}, return_state=True),
        "keep_label": lambda: pr_pin(
            REPO, 42, "labeled", "bug", config={"keep_label": "bug"}, return_state=True
        ),
    }

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        for field, run in runs.items():
            assert_refused(run(), field)

    assert fleet(aws) == before  # nothing terminated, no spare, no builder
    assert github.requests == []
    # The same runs with their tuning alone do their work.
    assert ttl_sweeper(config={"poll_seconds": 0.01}).terminated == list(before)


def test_every_flows_config_parameter_offers_the_tuning_fields_only() -> None:
    """The schema ``prefect deploy`` stores for ``config``, which the UI's run form shows: no
    trusted field, and no default that would override the Variable's value."""
    for flow in FLOWS:
        schema = parameter_schema(flow.fn).model_dump()["properties"]["config"]
        [overrides] = [option for option in schema["anyOf"] if option.get("type") == "object"]

        assert set(overrides["properties"]) == TUNING_FIELDS, flow.name
        assert not [name for name, field in overrides["properties"].items() if "default" in field]
        assert VARIABLE_NAME in overrides["description"]
