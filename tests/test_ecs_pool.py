"""Past one machine, for real (issue 34): prefect-aws's ECS worker runs the flows in containers.

The ECS work pool from ``deployments/pools/ecs.yaml``, the deployments from ``python -m
deployments.pools ecs``, prefect-aws's own worker (``prefect worker start --type ecs``) against a
moto server; the flow image built here (``make image``) pushed to the local registry; and
``local_stack/ecs_tasks.py`` as ECS's data plane, running each task moto accepted on a real
Docker Engine and reporting its exit as ECS and EventBridge do to the worker's observer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import pytest

from local_stack.account import DemoAccount, create_demo_account
from local_stack.docker_engine import docker_engine
from local_stack.ecs_tasks import QUEUE_NAME, EcsDataPlane, wait_for
from local_stack.images import FLOW_IMAGE_NAME, ImageBuilder, push_image
from local_stack.moto_server import moto_process
from local_stack.prefect_server import TERMINAL_STATES, PrefectStack, prefect_stack
from local_stack.registry import FakeRegistry
from local_stack.serve import serve_handler
from tasks.cloud.aws import build_clients
from tasks.config import VARIABLE_NAME, PreviewConfig

pytestmark = [pytest.mark.server, pytest.mark.ecs, pytest.mark.xdist_group("ecs")]

REGION = "ap-northeast-1"
POOL = "pr-preview-ecs"
CLUSTER = "previews"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


@dataclass
class EcsWorld:
    stack: PrefectStack
    moto_url: str
    image: str
    account: DemoAccount
    task_role: str
    execution_role: str
    security_group: str
    plane: EcsDataPlane

    def client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.moto_url, region_name=REGION, **_keys())

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

    def task_of(self, flow_run_id: str, timeout: float = 60) -> dict[str, Any]:
        """The ECS task moto holds for this flow run (tagged with its id by the worker)."""
        ecs = self.client("ecs")

        def find() -> dict[str, Any] | None:
            arns = ecs.list_tasks(cluster=CLUSTER)["taskArns"]
            if not arns:
                return None
            tasks = ecs.describe_tasks(cluster=CLUSTER, tasks=arns, include=["TAGS"])["tasks"]
            for task in tasks:
                tags = {tag["key"]: tag["value"] for tag in task.get("tags", [])}
                if tags.get("prefect.io/flow-run-id") == flow_run_id:
                    found: dict[str, Any] = task
                    return found
            return None

        found: dict[str, Any] = wait_for(find, timeout, interval=0.3)
        return found


def _keys() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def ecs_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EcsWorld]:
    home = tmp_path_factory.mktemp("ecs")
    registry = FakeRegistry(scheme="http")
    started = time.monotonic()
    with (
        moto_process(home / "moto.log") as moto,
        serve_handler(registry.handle) as registry_url,
        docker_engine(home / "docker") as engine,
    ):
        registry.host = registry_url.removeprefix("http://")
        aws_env = {**AWS_ENV, "AWS_ENDPOINT_URL": moto.url}
        # 1. The flow image, built here, pushed as CI pushes.
        tag = "e2e"
        push_image(registry, FLOW_IMAGE_NAME, tag, ImageBuilder().flow_image())
        image = f"{registry.host}/{FLOW_IMAGE_NAME}:{tag}"
        # 2. What the README tells an ECS user to create: a cluster, the task and execution
        # roles, a subnet and security group, and the observer's queue.
        session = boto3.Session(region_name=REGION, **_keys())
        ecs = session.client("ecs", endpoint_url=moto.url)
        iam = session.client("iam", endpoint_url=moto.url)
        sqs = session.client("sqs", endpoint_url=moto.url)
        ecs.create_cluster(clusterName=CLUSTER)
        trust = json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "ecs-tasks.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        )
        task_role = iam.create_role(
            RoleName="pr-preview-orchestrator", AssumeRolePolicyDocument=trust
        )
        execution_role = iam.create_role(
            RoleName="ecs-task-execution", AssumeRolePolicyDocument=trust
        )
        sqs.create_queue(QueueName=QUEUE_NAME)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in aws_env.items():
                patch.setenv(name, value)
            account = create_demo_account(build_clients(PreviewConfig(region=REGION)))
        security_group = session.client("ec2", endpoint_url=moto.url).create_security_group(
            GroupName="flows-sg", Description="pr-preview flow runs", VpcId=account.vpc_id
        )["GroupId"]
        with prefect_stack(home / "prefect") as stack:
            stack.set_variable(VARIABLE_NAME, {**account.config_values(), "region": REGION})
            # 3. The pool from the project's variant, the deployments from deployments.pools.
            stack.prefect("work-pool", "create", POOL, "--type", "ecs")
            rendered = subprocess.run(
                [sys.executable, "-m", "deployments.pools", "ecs"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            prefect_file = home / "prefect.ecs.yaml"
            prefect_file.write_text(rendered)
            deploy_env = {
                "PR_PREVIEW_FLOW_IMAGE": image,
                "PR_PREVIEW_ECS_CLUSTER": CLUSTER,
                "PR_PREVIEW_ORCHESTRATOR_ROLE_ARN": task_role["Role"]["Arn"],
                "PR_PREVIEW_ECS_EXECUTION_ROLE_ARN": execution_role["Role"]["Arn"],
                "PR_PREVIEW_ECS_VPC_ID": account.vpc_id,
                "PR_PREVIEW_ECS_SUBNET_ID": account.subnet_id,
                "PR_PREVIEW_ECS_SECURITY_GROUP_ID": security_group,
            }
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "--no-prompt",
                    "deploy",
                    "--prefect-file",
                    str(prefect_file),
                    "--name",
                    "pr-preview",
                    "--name",
                    "ttl-sweeper",
                ],
                cwd=Path(__file__).resolve().parents[1],
                env={**stack.env, **deploy_env},
                capture_output=True,
                check=True,
                timeout=180,
            )
            # 4. prefect-aws's ECS worker, its observer on the queue.
            worker_log = (home / "worker.log").open("ab")
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "worker",
                    "start",
                    "--pool",
                    POOL,
                    "--type",
                    "ecs",
                ],
                env={**stack.env, **aws_env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
                stdout=worker_log,
                stderr=subprocess.STDOUT,
            )
            stack.processes.append(worker)
            # 5. ECS's data plane: the task's container on the Docker Engine. The platform gives
            # it the task role's credentials and the way to AWS; the task definition does not.
            plane = EcsDataPlane(
                ecs,
                sqs,
                engine,
                CLUSTER,
                platform_env=aws_env,
            )
            stop = threading.Event()
            thread = plane.run_in_background(stop)
            print(f"ECS world ready in {time.monotonic() - started:.1f} s")
            try:
                yield EcsWorld(
                    stack,
                    moto.url,
                    image,
                    account,
                    task_role["Role"]["Arn"],
                    execution_role["Role"]["Arn"],
                    security_group,
                    plane,
                )
            finally:
                stop.set()
                thread.join(timeout=10)


def test_a_preview_run_is_a_fargate_task_of_the_flow_image_as_the_pool_configures_it(
    ecs_world: EcsWorld,
) -> None:
    started = time.monotonic()
    run_id = ecs_world.start_run(
        "pr-preview/pr-preview",
        {"repo": "elsewhere/app", "pr_number": 7, "head_sha": "a" * 40, "action": "opened"},
    )
    task = ecs_world.task_of(run_id)
    ecs = ecs_world.client("ecs")
    # What RunTask carried: the cluster, Fargate, the subnet and security group of the pool.
    assert task["clusterArn"].endswith(f":cluster/{CLUSTER}")
    assert task["launchType"] == "FARGATE"
    [attachment] = task["attachments"]
    details = {d["name"]: d["value"] for d in attachment["details"]}
    assert details["subnetId"] == ecs_world.account.subnet_id
    [eni] = ecs_world.client("ec2").describe_network_interfaces(
        NetworkInterfaceIds=[details["networkInterfaceId"]]
    )["NetworkInterfaces"]
    assert [group["GroupId"] for group in eni["Groups"]] == [ecs_world.security_group]
    assert task["overrides"]["taskRoleArn"] == ecs_world.task_role
    [override] = task["overrides"]["containerOverrides"]
    env = {e["name"]: e["value"] for e in override["environment"]}
    assert env["PREFECT__FLOW_RUN_ID"] == run_id
    assert env["PREFECT_API_URL"] == ecs_world.stack.api_url
    # The task definition the worker registered: the image, its command, the size, the roles,
    # the logs to CloudWatch.
    definition = ecs.describe_task_definition(taskDefinition=task["taskDefinitionArn"])[
        "taskDefinition"
    ]
    [container] = definition["containerDefinitions"]
    assert container["name"] == "prefect"
    assert container["image"] == ecs_world.image
    command = override.get("command") or container.get("command")
    assert command == ["prefect", "flow-run", "execute"], command
    assert (definition["cpu"], definition["memory"]) == ("512", "1024")
    assert definition["requiresCompatibilities"] == ["FARGATE"]
    assert definition["networkMode"] == "awsvpc"
    assert definition["executionRoleArn"] == ecs_world.execution_role
    logs = container["logConfiguration"]
    assert logs["logDriver"] == "awslogs"
    assert logs["options"]["awslogs-stream-prefix"] == "pr-preview"
    assert logs["options"]["awslogs-region"] == REGION
    # Nothing secret in the definition's or the run's plain environment.
    for name, value in [
        *env.items(),
        *((e["name"], e["value"]) for e in container.get("environment", [])),
    ]:
        assert "SECRET" not in name and "testing" not in value, name
    # The preview flow ran in the container: it read the Variable and refused a repository
    # it does not serve, and said so to the server.
    final = ecs_world.wait_final(run_id)
    assert (final["state_type"], final["state"]["name"]) == ("COMPLETED", "Not Allowed")
    assert "elsewhere/app is not in allowed_repos" in final["state"]["message"]
    print(
        f"preview run: created → Not Allowed in its container in {time.monotonic() - started:.1f} s"
    )


def test_a_sweep_completes_in_its_container(ecs_world: EcsWorld) -> None:
    started = time.monotonic()
    run_id = ecs_world.start_run("ttl-sweeper/ttl-sweeper", {"dry_run": True})
    final = ecs_world.wait_final(run_id)
    task = ecs_world.task_of(run_id)
    assert final["state_type"] == "COMPLETED", (
        final["state"],
        ecs_world.plane.logs(task["taskArn"])[-3000:],
    )
    # The run reports Completed before its process exits: the container's end follows.
    run = ecs_world.plane.runs[task["taskArn"]]
    assert wait_for(lambda: run.exit_code is not None, 30) and run.exit_code == 0
    # ECS's view: the task stopped because its essential container exited.
    [stopped] = ecs_world.client("ecs").describe_tasks(cluster=CLUSTER, tasks=[task["taskArn"]])[
        "tasks"
    ]
    assert stopped["lastStatus"] == "STOPPED" and stopped["desiredStatus"] == "STOPPED"
    created, running = (datetime.fromisoformat(final[key]) for key in ("created", "start_time"))
    print(
        f"sweep run: created → Running {(running - created).total_seconds():.1f} s,"
        f" → Completed in a container {time.monotonic() - started:.1f} s"
    )


def test_a_container_that_exits_non_zero_leaves_its_run_crashed(ecs_world: EcsWorld) -> None:
    run_id = ecs_world.start_run(
        "ttl-sweeper/ttl-sweeper",
        {"dry_run": True},
        command="python3 -c 'import sys; sys.exit(3)'",
    )
    final = ecs_world.wait_final(run_id)
    task = ecs_world.task_of(run_id)
    assert ecs_world.plane.runs[task["taskArn"]].exit_code == 3
    assert final["state_type"] == "CRASHED", final["state"]
    assert "exit code" in final["state"]["message"], final["state"]["message"]
