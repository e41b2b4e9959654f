"""The self-hosted trigger path end to end, on a real local Prefect server.

signed GitHub delivery → receiver → Prefect event → deployment trigger → worker → flow run,
with moto (as a server) for AWS and a scripted instance answering over SSM.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.demo_account import DEMO_GHCR_TOKEN, create_demo_account
from deployments.local_http import serve_asgi, serve_handler
from deployments.local_stack import (
    PrefectStack,
    prefect_stack,
    pull_request_payload,
    signed_delivery,
)
from deployments.receiver import create_app
from deployments.scripted_instance import ScriptedInstances
from tasks.aws import AwsClients, build_clients
from tasks.config import VARIABLE_NAME, PreviewConfig
from tests.fakes.registry import FakeRegistry
from tests.helpers import live, tags

pytestmark = pytest.mark.e2e

REPO = "octo-org/hello-api"
SECRET = "e2e-webhook-secret"
SHAS = [f"{n:x}" * 40 for n in range(1, 6)]


@dataclass
class Installation:
    stack: PrefectStack
    receiver: str
    aws: AwsClients
    registry: FakeRegistry

    def deliver(self, action: str, pr: int, sha: str, **kwargs: Any) -> httpx.Response:
        payload = pull_request_payload(action, REPO, pr, sha, **kwargs)
        return signed_delivery(self.receiver, SECRET, "pull_request", payload)


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    from moto.server import ThreadedMotoServer

    saved = dict(os.environ)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="ap-northeast-1",
    )
    for name in ("PREFECT_API_URL", "GITHUB_TOKEN", "GITHUB_API_URL"):
        os.environ.pop(name, None)
    registry = FakeRegistry(scheme="http", users={"octo-org": DEMO_GHCR_TOKEN})
    try:
        aws = build_clients(PreviewConfig(region="ap-northeast-1"))
        account = create_demo_account(aws)
        with (
            ScriptedInstances().healthy().patched(),
            serve_handler(registry.handle) as registry_url,
            prefect_stack(tmp_path_factory.mktemp("prefect")) as stack,
        ):
            registry.host = registry_url.removeprefix("http://")
            stack.set_variable(
                VARIABLE_NAME,
                {
                    **account.config_values(),
                    "image": f"{registry.host}/{REPO}",
                    "poll_seconds": 0.1,
                    "retry_delay_seconds": 0.2,
                    "image_wait_seconds": 30,
                    "ready_timeout_seconds": 30,
                },
            )
            stack.deploy()
            stack.start_worker(Path(stack.home) / "worker.log")
            with serve_asgi(create_app(SECRET, prefect_api_url=stack.api_url)) as receiver:
                yield Installation(stack, receiver, aws, registry)
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


def lock_intervals(stack: PrefectStack, run_ids: list[str]) -> list[tuple[datetime, datetime]]:
    """When each run held its PR lock, read from the runs' own logs."""
    intervals = []
    with stack.client() as http:
        for run_id in run_ids:
            logs = http.post(
                "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}}
            ).json()
            held = {
                match.group(1): datetime.fromisoformat(log["timestamp"])
                for log in logs
                if (
                    match := re.match(
                        r"lock pr-preview:\S+:\d+ (acquired|released)", log["message"]
                    )
                )
            }
            intervals.append((held["acquired"], held["released"]))
    return sorted(intervals)


def test_signed_delivery_starts_the_preview_with_the_event_parameters(
    installation: Installation,
) -> None:
    installation.registry.push(REPO, SHAS[0])
    answer = installation.deliver("opened", 7, SHAS[0])
    assert answer.status_code == 200
    [run] = installation.stack.wait_for_runs("pr-preview/pr-preview", 1, timeout=120)
    assert run["state_type"] == "COMPLETED", run["state"]["message"]
    assert run["name"] == f"pr-7-{SHAS[0][:7]}"
    assert run["parameters"] == {
        "repo": REPO,
        "pr_number": 7,
        "head_sha": SHAS[0],
        "action": "opened",
        "head_repo": REPO,
    }
    [instance] = [i for i in live(installation.aws) if tags(i).get("PR") == "7"]
    assert tags(instance)["Sha"] == SHAS[0]

    closed = installation.deliver("closed", 7, SHAS[0], merged=True)
    assert closed.status_code == 200
    [teardown] = installation.stack.wait_for_runs("pr-teardown/pr-teardown", 1, timeout=120)
    assert teardown["state_type"] == "COMPLETED"
    assert teardown["parameters"] == {"repo": REPO, "pr_number": 7}
    assert not [i for i in live(installation.aws) if tags(i).get("PR") == "7"]


def test_a_bad_signature_starts_nothing(installation: Installation) -> None:
    before = len(installation.stack.flow_runs("pr-preview/pr-preview"))
    payload = pull_request_payload("opened", REPO, 8, SHAS[1])
    forged = signed_delivery(installation.receiver, "not-the-secret", "pull_request", payload)
    assert forged.status_code == 401
    time.sleep(3)  # a trigger fires within ~0.2 s of an event
    assert len(installation.stack.flow_runs("pr-preview/pr-preview")) == before


def test_two_rapid_pushes_for_one_pr_do_not_overlap(installation: Installation) -> None:
    before = len(installation.stack.flow_runs("pr-preview/pr-preview"))
    for sha in SHAS[2:4]:
        installation.registry.push(REPO, sha)
    assert installation.deliver("synchronize", 9, SHAS[2]).status_code == 200
    assert installation.deliver("synchronize", 9, SHAS[3]).status_code == 200
    runs = installation.stack.wait_for_runs("pr-preview/pr-preview", before + 2, timeout=180)
    mine = [run for run in runs if run["parameters"].get("pr_number") == 9]
    assert [run["state_type"] for run in mine] == ["COMPLETED", "COMPLETED"]
    (_, first_end), (second_start, _) = lock_intervals(
        installation.stack, [run["id"] for run in mine]
    )
    assert first_end <= second_start, "two runs for one PR held its lock at the same time"
    assert len([i for i in live(installation.aws) if tags(i).get("PR") == "9"]) == 1
