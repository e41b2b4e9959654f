"""A whole self-hosted installation for the end-to-end tests: Prefect server, deployments,
worker, receiver, moto as a server (its own process) with a scripted instance, a registry and
GitHub.

Shared by the tests of one worker (``installation`` in conftest), each handed a clean slate by
``fresh``: no run still going, no instance live, the default configuration. Tests use their own
PR numbers and read back only their own runs.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from deployments.receiver import create_app
from local_stack.account import DEMO_GHCR_TOKEN, DemoAccount, create_demo_account
from local_stack.moto_server import MotoProcess, moto_process
from local_stack.prefect_server import (
    TERMINAL_STATES,
    PrefectStack,
    prefect_stack,
    pull_request_payload,
    signed_delivery,
)
from local_stack.registry import FakeRegistry
from local_stack.serve import serve_asgi, serve_handler
from tasks.cloud.aws import AwsClients, build_clients
from tasks.config import VARIABLE_NAME, PreviewConfig
from tests.fakes.github import FakeGitHub
from tests.support.moto_state import live, tags

REPO = "octo-org/hello-api"
SECRET = "e2e-webhook-secret"
TOKEN = "good-token"
DEPLOYMENTS = ("pr-preview/pr-preview", "pr-teardown/pr-teardown", "pr-command/pr-command")


@dataclass
class Installation:
    stack: PrefectStack
    receiver: str
    aws: AwsClients
    account: DemoAccount
    registry: FakeRegistry
    github: FakeGitHub
    moto: MotoProcess

    def configure(self, **overrides: Any) -> None:
        """The Prefect Variable every flow run reads: the account, fast timings, overrides."""
        self.stack.set_variable(
            VARIABLE_NAME,
            {
                **self.account.config_values(),
                "image": f"{self.registry.host}/{REPO}",
                "poll_seconds": 0.1,
                "retry_delay_seconds": 0.2,
                # Generous: on a loaded 2-core machine twenty runs share the CPU.
                "image_wait_seconds": 120,
                "ready_timeout_seconds": 120,
                **overrides,
            },
        )

    def deliver(self, action: str, pr: int, sha: str, **kwargs: Any) -> httpx.Response:
        """What GitHub does on a PR event: the PR (and CI's image) change, a delivery is sent."""
        payload = pull_request_payload(action, REPO, pr, sha, **kwargs)
        self.registry.push(REPO, sha)
        self.github.add_pull(REPO, payload["pull_request"])
        return signed_delivery(self.receiver, SECRET, "pull_request", payload)

    def wait_idle(self, timeout: float = 300) -> None:
        """Until no run of any deployment is still scheduled, pending or running."""
        for deployment in DEPLOYMENTS:
            runs = self.stack.flow_runs(deployment)
            self.stack.wait_for_runs(deployment, len(runs), timeout=timeout)

    def fresh(self) -> None:
        """A clean slate for the next test: idle, no live instance, default configuration."""
        self.moto.slow(None)
        self.wait_idle()
        running = [i["InstanceId"] for i in live(self.aws)]
        if running:
            self.aws.ec2.terminate_instances(InstanceIds=running)
        self.configure()

    def wait_for_pr_runs(
        self, deployment: str, pr: int, count: int, *, timeout: float = 120
    ) -> list[dict[str, Any]]:
        """Block until PR ``pr`` has ``count`` finished runs of ``deployment``; return its runs."""
        deadline = time.monotonic() + timeout
        while True:
            mine = self.runs_for(deployment, pr)
            done = [run for run in mine if run["state_type"] in TERMINAL_STATES]
            if len(done) >= count:
                return mine
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{deployment} #{pr}: {len(done)}/{count} runs finished: {self.outcomes(mine)}"
                )
            time.sleep(0.5)

    def outcomes(self, runs: list[dict[str, Any]]) -> list[str]:
        """State name and message of each run, for assertion messages."""
        return [f"{run['name']}: {run['state_name']} {run['state']['message']}" for run in runs]

    def live_for(self, pr: int) -> list[dict[str, Any]]:
        return [i for i in live(self.aws) if tags(i).get("PR") == str(pr)]

    def runs_for(self, deployment: str, pr: int) -> list[dict[str, Any]]:
        return [
            run
            for run in self.stack.flow_runs(deployment)
            if run["parameters"].get("pr_number") == pr
        ]

    def logs(self, run_id: str) -> list[dict[str, Any]]:
        with self.stack.client() as http:
            found = http.post(
                "/logs/filter",
                json={"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"},
            )
            found.raise_for_status()
            return list(found.json())

    def lock_intervals(
        self, run_ids: list[str], *, timeout: float = 60
    ) -> list[tuple[datetime, datetime]]:
        """When each run held its PR lock, read from the runs' own logs.

        A run's last logs reach the server shortly after its final state, so this waits until
        every run's acquire and release lines are there.
        """
        pattern = re.compile(r"lock pr-preview:\S+:\d+ (acquired|released)")
        deadline = time.monotonic() + timeout
        while True:
            held = [
                {
                    match.group(1): datetime.fromisoformat(log["timestamp"])
                    for log in self.logs(run_id)
                    if (match := pattern.match(log["message"]))
                }
                for run_id in run_ids
            ]
            if all(len(times) == 2 for times in held) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return sorted((times["acquired"], times["released"]) for times in held)


@contextmanager
def running_installation(
    home: Path,
    *,
    db: str = "sqlite",
    workers: int = 1,
    worker_limit: int | None = None,
    moto_command: list[str] | None = None,
    spool: bool = False,
) -> Iterator[Installation]:
    """Start every piece of the installation; stop all of them (and restore os.environ) after.

    ``db`` is the Prefect server's database (``sqlite`` or ``postgres``), ``workers`` how many
    process workers poll the pool (each running at most ``worker_limit`` runs at a time),
    ``moto_command`` another moto server (see ``moto_process``); ``spool``: the receiver
    keeps deliveries in a spool until Prefect takes them, as ``pr-preview receiver`` does.
    """
    saved = dict(os.environ)
    github = FakeGitHub(tokens={TOKEN: FakeGitHub().tokens["good-token"]})
    registry = FakeRegistry(scheme="http", users={"octo-org": DEMO_GHCR_TOKEN})
    try:
        with (
            moto_process(home / "moto.log", command=moto_command) as moto,
            serve_handler(registry.handle) as registry_url,
            serve_handler(github.handle) as github_url,
        ):
            registry.host = registry_url.removeprefix("http://")
            github.base_url = github_url
            os.environ.update(
                AWS_ENDPOINT_URL=moto.url,
                AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing",
                AWS_DEFAULT_REGION="ap-northeast-1",
                GITHUB_TOKEN=TOKEN,
                GITHUB_API_URL=github_url,
            )
            os.environ.pop("PREFECT_API_URL", None)
            aws = build_clients(PreviewConfig(region="ap-northeast-1"))
            account = create_demo_account(aws)
            with prefect_stack(home / "prefect", db=db) as stack:
                stack.deploy()
                stack.start_workers(workers, worker_limit)
                spooled = home / "receiver-spool.sqlite3" if spool else None
                receiver_app = create_app(SECRET, prefect_api_url=stack.api_url, spool_path=spooled)
                with serve_asgi(receiver_app) as receiver:
                    found = Installation(stack, receiver, aws, account, registry, github, moto)
                    found.configure()
                    yield found
    finally:
        os.environ.clear()
        os.environ.update(saved)
