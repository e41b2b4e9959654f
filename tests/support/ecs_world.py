"""The ECS work pool end to end, on this machine: what ``tests/test_ecs_pool.py`` and
``bench/bench_ecs_command.py`` run on.

The account's side from the CloudFormation stack deployed with ``WorkPool=ecs`` into a moto
server whose instances boot for real (``local_stack/instance``): the cluster, the roles, the log
group, the tasks' security group, beside the runbook's account (subnet, security groups,
instance profile, the GHCR token and DATABASE_URL in Parameter Store) and its db-server, a real
PostgreSQL. The ECS work pool from ``deployments/pools/ecs.yaml``, the deployments from
``python -m deployments.pools ecs --from-stack``, prefect-aws's own worker (``prefect worker
start --type ecs``); the flow image built here (``make image``) and the sample app's images in
the local registry; a fake GitHub the runs reach as a GitHub Enterprise (``GITHUB_API_URL`` in
the job variables, the token in the ``github-token`` Secret block); ``local_stack/ecs_tasks.py``
as ECS's data plane. moto's recorder keeps every request, the worker's signed with its own key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import yaml

from local_stack.account import DEMO_DB_PASSWORD, DEMO_GHCR_TOKEN, DemoAccount, create_demo_account
from local_stack.docker_engine import docker_engine
from local_stack.ecs_tasks import EcsDataPlane, wait_for
from local_stack.github import FakeGitHub
from local_stack.images import FLOW_IMAGE_NAME, ImageBuilder, push_image
from local_stack.instance.world import db_server
from local_stack.moto_server import MotoProcess, moto_process
from local_stack.prefect_server import PROJECT_DIR, TERMINAL_STATES, PrefectStack, prefect_stack
from local_stack.registry import FakeRegistry
from local_stack.serve import serve_handler
from tasks.cloud.aws import build_clients
from tasks.config import VARIABLE_NAME, PreviewConfig

REGION = "ap-northeast-1"
POOL = "pr-preview-ecs"
STACK = "pr-preview"
WORKER_NAME = "ecs-worker-e2e"
WORKER_KEY = "ecsworkerkey"  # the worker's access key: its requests in moto's recording
GITHUB_TOKEN = "good-token"
DEPLOYMENTS = ("pr-preview", "pr-crash-report", "ttl-sweeper")
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


@dataclass
class EcsWorld:
    stack: PrefectStack
    moto: MotoProcess
    image: str
    account: DemoAccount
    outputs: dict[str, str]  # the CloudFormation stack's
    recording: Path  # moto's recorder: one JSON request a line
    plane: EcsDataPlane
    registry: FakeRegistry
    github: FakeGitHub

    @property
    def moto_url(self) -> str:
        return self.moto.url

    @property
    def cluster(self) -> str:
        return self.outputs["EcsClusterArn"]

    def client(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.moto_url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def start_run(self, deployment: str, parameters: dict[str, Any], **job: Any) -> str:
        """A flow run of ``deployment`` (``flow/deployment``), as a trigger or a person starts
        one; ``job``: job variables of this run only."""
        with self.stack.client() as http:
            found = http.get(f"/deployments/name/{deployment}")
            found.raise_for_status()
            created = http.post(
                f"/deployments/{found.json()['id']}/create_flow_run",
                json={"parameters": parameters, "job_variables": job},
            )
            created.raise_for_status()
            return str(created.json()["id"])

    def run(self, flow_run_id: str) -> dict[str, Any]:
        with self.stack.client() as http:
            answer = http.get(f"/flow_runs/{flow_run_id}")
            answer.raise_for_status()
            found: dict[str, Any] = answer.json()
            return found

    def wait_final(self, flow_run_id: str, timeout: float = 150) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            run = self.run(flow_run_id)
            return run if run["state_type"] in TERMINAL_STATES else None

        try:
            found: dict[str, Any] = wait_for(final, timeout, interval=0.5)
        except TimeoutError:
            raise AssertionError(
                f"run {flow_run_id} not final: {self.run(flow_run_id)['state']};"
                f" data plane errors {self.plane.errors}; see {self.stack.home}"
            ) from None
        return found

    def runs_of(self, deployment: str, **parameters: Any) -> list[dict[str, Any]]:
        """The runs of ``deployment`` whose parameters include ``parameters``."""
        return [
            run
            for run in self.stack.flow_runs(deployment)
            if all(run["parameters"].get(key) == value for key, value in parameters.items())
        ]

    def logs(self, flow_run_id: str) -> list[str]:
        """The run's log messages the server holds, oldest first."""
        with self.stack.client() as http:
            found = http.post(
                "/logs/filter",
                json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"},
            )
            found.raise_for_status()
            return [str(log["message"]) for log in found.json()]

    def task_of(self, flow_run_id: str, timeout: float = 60) -> dict[str, Any]:
        """The ECS task moto holds for this flow run (tagged with its id by the worker)."""
        ecs = self.client("ecs")

        def find() -> dict[str, Any] | None:
            arns = ecs.list_tasks(cluster=self.cluster)["taskArns"]
            if not arns:
                return None
            tasks = ecs.describe_tasks(cluster=self.cluster, tasks=arns, include=["TAGS"])["tasks"]
            for task in tasks:
                tags = {tag["key"]: tag["value"] for tag in task.get("tags", [])}
                if tags.get("prefect.io/flow-run-id") == flow_run_id:
                    found: dict[str, Any] = task
                    return found
            return None

        found: dict[str, Any] = wait_for(find, timeout, interval=0.3)
        return found


@contextmanager
def running_ecs_world(home: Path) -> Iterator[EcsWorld]:
    """Every piece above, started under ``home``; all stopped after."""
    registry = FakeRegistry(scheme="http", users={"octo-org": DEMO_GHCR_TOKEN})
    github = FakeGitHub()
    started = time.monotonic()
    recording = home / "moto-recording.jsonl"
    with (
        moto_process(
            home / "moto.log",
            runtime="real",
            instances_root=home / "instances",
            env={"MOTO_RECORDER_FILEPATH": str(recording)},
        ) as moto,
        serve_handler(registry.handle) as registry_url,
        serve_handler(github.handle) as github_url,
        docker_engine(home / "docker") as engine,
        db_server(home / "db-server", role="app", password=DEMO_DB_PASSWORD, database="app") as db,
    ):
        registry.host = registry_url.removeprefix("http://")
        github.base_url = github_url
        # Instances dial the runbook's db-server address and the registry (as GHCR).
        moto.bridge(*db.bridge)
        moto.bridge(registry.host, registry.host)
        aws_env = {**AWS_ENV, "AWS_ENDPOINT_URL": moto.url}
        # 1. The flow image, built here, pushed as CI pushes.
        tag = "e2e"
        push_image(registry, FLOW_IMAGE_NAME, tag, ImageBuilder().flow_image())
        image = f"{registry.host}/{FLOW_IMAGE_NAME}:{tag}"
        # 2. The runbook's account, and what the README tells an ECS user to create: the stack
        # with WorkPool=ecs in the previews' VPC, and the observer's queue (prefect-aws's
        # `ecs-worker deploy-events`).
        session = boto3.Session(
            region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        ecs = session.client("ecs", endpoint_url=moto.url)
        sqs = session.client("sqs", endpoint_url=moto.url)
        saved = dict(os.environ)
        try:
            os.environ.update(aws_env)
            account = create_demo_account(
                build_clients(PreviewConfig(region=REGION)), database_url=db.database_url
            )
        finally:
            os.environ.clear()
            os.environ.update(saved)
        from tests.support.stacks import create_stack

        cfn = session.client("cloudformation", endpoint_url=moto.url)
        parameters = {"VpcId": account.vpc_id, "SubnetId": account.subnet_id, "WorkPool": "ecs"}
        outputs = create_stack(cfn, STACK, parameters)
        sqs.create_queue(QueueName=outputs["EcsEventsQueueName"])
        with prefect_stack(home / "prefect") as stack:
            stack.set_variable(
                VARIABLE_NAME,
                {
                    **account.config_values(),
                    "region": REGION,
                    "image": f"{registry.host}/octo-org/hello-api",
                    "poll_seconds": 0.2,
                    "retry_delay_seconds": 0.5,
                    "image_wait_seconds": 60,
                    # Generous: the flow, the instance and its app share two busy cores.
                    "ready_timeout_seconds": 240,
                },
            )
            # The GitHub token where a run reads it: a Secret block, never the task definition.
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys; from prefect.blocks.system import Secret;"
                    " Secret(value=sys.stdin.read()).save('github-token')",
                ],
                input=GITHUB_TOKEN,
                env=stack.env,
                text=True,
                capture_output=True,
                check=True,
                timeout=120,
            )
            # 3. The pool from the project's variant, the deployments from deployments.pools
            # with the stack's values; GitHub (Enterprise) at its URL.
            stack.prefect("work-pool", "create", POOL, "--type", "ecs")
            rendered = yaml.safe_load(
                subprocess.run(
                    [sys.executable, "-m", "deployments.pools", "ecs", "--from-stack", STACK],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ, **aws_env},
                ).stdout
            )
            for deployment in rendered["deployments"]:
                job_variables = deployment["work_pool"]["job_variables"]
                job_variables["env"] = {"GITHUB_API_URL": github_url}
            prefect_file = home / "prefect.ecs.yaml"
            prefect_file.write_text(yaml.safe_dump(rendered, sort_keys=False))
            names = [arg for name in DEPLOYMENTS for arg in ("--name", name)]
            deploy = ["--no-prompt", "deploy", "--prefect-file", str(prefect_file), *names]
            subprocess.run(
                [sys.executable, "-m", "prefect", *deploy],
                cwd=PROJECT_DIR,
                env={**stack.env, "PR_PREVIEW_FLOW_IMAGE": image},
                capture_output=True,
                check=True,
                timeout=180,
            )
            # 4. prefect-aws's ECS worker, its observer on the queue; from here moto records.
            httpx.post(f"{moto.url}/moto-api/recorder/start-recording").raise_for_status()
            worker_log = (home / "worker.log").open("ab")
            start = ["worker", "start", "--pool", POOL, "--type", "ecs", "--name", WORKER_NAME]
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", *start],
                env={
                    **stack.env,
                    **aws_env,
                    "AWS_ACCESS_KEY_ID": WORKER_KEY,
                    "PREFECT_WORKER_QUERY_SECONDS": "1",
                },
                stdout=worker_log,
                stderr=subprocess.STDOUT,
            )
            stack.processes.append(worker)
            # 5. ECS's data plane: the task's container on the Docker Engine. The platform gives
            # it the task role's credentials and the way to AWS; the task definition does not.
            plane = EcsDataPlane(ecs, sqs, engine, outputs["EcsClusterArn"], platform_env=aws_env)
            stop = threading.Event()
            thread = plane.run_in_background(stop)
            print(f"ECS world ready in {time.monotonic() - started:.1f} s")
            try:
                yield EcsWorld(
                    stack, moto, image, account, outputs, recording, plane, registry, github
                )
            finally:
                stop.set()
                thread.join(timeout=10)
