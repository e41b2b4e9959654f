"""Past one machine, for real (issue 34): prefect-aws's ECS worker runs the flows in containers.

The account's side from the CloudFormation stack deployed with ``WorkPool=ecs`` into moto (the
cluster, the roles, the log group, the tasks' security group), the ECS work pool from
``deployments/pools/ecs.yaml``, the deployments from ``python -m deployments.pools ecs
--from-stack``, prefect-aws's own worker (``prefect worker start --type ecs``) against a moto
server; the flow image built here (``make image``) pushed to the local registry; and
``local_stack/ecs_tasks.py`` as ECS's data plane, running each task moto accepted on a real
Docker Engine and reporting its exit as ECS and EventBridge do to the worker's observer. moto's
recorder keeps every request the worker signed with its own key, which the stack's worker
policy must allow, one by one, and nothing more.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import boto3
import httpx
import pytest

from deployments.aws import ECS_WORKER_POLICY
from local_stack.account import DemoAccount, create_demo_account
from local_stack.docker_engine import docker_engine
from local_stack.ecs_tasks import EcsDataPlane, wait_for
from local_stack.images import FLOW_IMAGE_NAME, ImageBuilder, push_image
from local_stack.moto_server import moto_process
from local_stack.prefect_server import TERMINAL_STATES, PrefectStack, prefect_stack
from local_stack.registry import FakeRegistry
from local_stack.serve import serve_handler
from tasks.cloud.aws import build_clients
from tasks.config import VARIABLE_NAME, PreviewConfig
from tests.support.iam_policy import Request, evaluate
from tests.support.stacks import create_stack

pytestmark = [pytest.mark.server, pytest.mark.ecs, pytest.mark.xdist_group("ecs")]

REGION = "ap-northeast-1"
POOL = "pr-preview-ecs"
STACK = "pr-preview"
WORKER_KEY = "ecsworkerkey"  # the worker's access key: its requests in moto's recording
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
    outputs: dict[str, str]  # the CloudFormation stack's
    recording: Path  # moto's recorder: one JSON request a line
    plane: EcsDataPlane

    @property
    def cluster(self) -> str:
        return self.outputs["EcsClusterArn"]

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


def _keys() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def ecs_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EcsWorld]:
    home = tmp_path_factory.mktemp("ecs")
    registry = FakeRegistry(scheme="http")
    started = time.monotonic()
    recording = home / "moto-recording.jsonl"
    with (
        moto_process(home / "moto.log", env={"MOTO_RECORDER_FILEPATH": str(recording)}) as moto,
        serve_handler(registry.handle) as registry_url,
        docker_engine(home / "docker") as engine,
    ):
        registry.host = registry_url.removeprefix("http://")
        aws_env = {**AWS_ENV, "AWS_ENDPOINT_URL": moto.url}
        # 1. The flow image, built here, pushed as CI pushes.
        tag = "e2e"
        push_image(registry, FLOW_IMAGE_NAME, tag, ImageBuilder().flow_image())
        image = f"{registry.host}/{FLOW_IMAGE_NAME}:{tag}"
        # 2. What the README tells an ECS user to create: the stack with WorkPool=ecs (the
        # cluster, the roles, the log group, the tasks' security group) in the previews' VPC,
        # and the observer's queue (prefect-aws's `ecs-worker deploy-events`).
        session = boto3.Session(region_name=REGION, **_keys())
        ecs = session.client("ecs", endpoint_url=moto.url)
        sqs = session.client("sqs", endpoint_url=moto.url)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in aws_env.items():
                patch.setenv(name, value)
            account = create_demo_account(build_clients(PreviewConfig(region=REGION)))
        cfn = session.client("cloudformation", endpoint_url=moto.url)
        parameters = {"VpcId": account.vpc_id, "SubnetId": account.subnet_id, "WorkPool": "ecs"}
        outputs = create_stack(cfn, STACK, parameters)
        sqs.create_queue(QueueName=outputs["EcsEventsQueueName"])
        with prefect_stack(home / "prefect") as stack:
            stack.set_variable(VARIABLE_NAME, {**account.config_values(), "region": REGION})
            # 3. The pool from the project's variant, the deployments from deployments.pools
            # with the stack's values.
            stack.prefect("work-pool", "create", POOL, "--type", "ecs")
            rendered = subprocess.run(
                [sys.executable, "-m", "deployments.pools", "ecs", "--from-stack", STACK],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, **aws_env},
            ).stdout
            prefect_file = home / "prefect.ecs.yaml"
            prefect_file.write_text(rendered)
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
                env={**stack.env, "PR_PREVIEW_FLOW_IMAGE": image},
                capture_output=True,
                check=True,
                timeout=180,
            )
            # 4. prefect-aws's ECS worker, its observer on the queue; from here moto records.
            httpx.post(f"{moto.url}/moto-api/recorder/start-recording").raise_for_status()
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
            plane = EcsDataPlane(
                ecs,
                sqs,
                engine,
                outputs["EcsClusterArn"],
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
                    outputs,
                    recording,
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
    assert task["clusterArn"] == ecs_world.cluster
    assert task["launchType"] == "FARGATE"
    [attachment] = task["attachments"]
    details = {d["name"]: d["value"] for d in attachment["details"]}
    assert details["subnetId"] == ecs_world.account.subnet_id
    [eni] = ecs_world.client("ec2").describe_network_interfaces(
        NetworkInterfaceIds=[details["networkInterfaceId"]]
    )["NetworkInterfaces"]
    assert [group["GroupId"] for group in eni["Groups"]] == [
        ecs_world.outputs["EcsSecurityGroupId"]
    ]
    assert task["overrides"]["taskRoleArn"] == ecs_world.outputs["OrchestratorRoleArn"]
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
    assert definition["executionRoleArn"] == ecs_world.outputs["EcsExecutionRoleArn"]
    logs = container["logConfiguration"]
    assert logs["logDriver"] == "awslogs"
    assert logs["options"]["awslogs-group"] == ecs_world.outputs["EcsLogGroupName"]
    assert logs["options"]["awslogs-create-group"] == "false"
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
    [stopped] = ecs_world.client("ecs").describe_tasks(
        cluster=ecs_world.cluster, tasks=[task["taskArn"]]
    )["tasks"]
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


# --- what the worker asks of AWS, against the stack's worker policy -------------------------

# Allowed, and not made here: what a run of this test cannot reach.
NOT_EXERCISED = {
    "ecs:StopTask": "cancelling a flow run (the worker stops its task)",
    "sqs:ChangeMessageVisibility": "an event the observer is still handling after 240 s",
}


@dataclass(frozen=True)
class Call:
    action: str  # ``ecs:RunTask``: the credential scope's service, the operation
    params: dict[str, Any]


def worker_calls(recording: Path) -> list[Call]:
    """Every request moto recorded that the worker signed (its own access key)."""
    found = []
    for line in recording.read_text().splitlines() if recording.exists() else []:
        entry = json.loads(line)
        headers = {key.lower(): value for key, value in entry["headers"].items()}
        scope = re.search(
            r"Credential=([^/]+)/[^/]+/[^/]+/([^/]+)/", headers.get("authorization", "")
        )
        if scope is None or scope[1] != WORKER_KEY:
            continue
        body = entry.get("body") or ""
        if entry.get("body_encoded"):
            body = base64.b64decode(body).decode()
        if "x-amz-target" in headers:  # the JSON protocols (ECS, SQS, CloudWatch Logs)
            operation = headers["x-amz-target"].rsplit(".", 1)[1]
            params = json.loads(body or "{}")
        else:  # the query protocol (EC2)
            params = dict(parse_qsl(body))
            operation = params.pop("Action")
        found.append(Call(f"{scope[2]}:{operation}", params))
    return found


def authorizations(call: Call, account: str) -> list[Request]:
    """What IAM authorizes for ``call``: the action on its resources with their condition keys,
    and what the call implies (passing a role, tagging the task it creates)."""
    params, action = call.params, call.action
    passed = {"iam:PassedToService": "ecs-tasks.amazonaws.com"}
    if action == "ecs:DescribeTaskDefinition":
        return [Request(action, "*")]
    if action == "ecs:RegisterTaskDefinition":  # the family's next revision
        made = f"arn:aws:ecs:{REGION}:{account}:task-definition/{params['family']}:1"
        roles = [params[key] for key in ("executionRoleArn", "taskRoleArn") if params.get(key)]
        return [Request(action, made), *(Request("iam:PassRole", role, passed) for role in roles)]
    if action == "ecs:RunTask":
        overrides = params.get("overrides", {})
        roles = [overrides[key] for key in ("executionRoleArn", "taskRoleArn") if key in overrides]
        found = [Request(action, params["taskDefinition"], {"ecs:cluster": params["cluster"]})]
        found += [Request("iam:PassRole", role, passed) for role in roles]
        if params.get("tags"):  # the task it creates: task/<cluster name>/<id>
            task = params["cluster"].replace(":cluster/", ":task/") + "/" + "0" * 32
            found.append(Request("ecs:TagResource", task, {"ecs:CreateAction": "RunTask"}))
        return found
    if action in ("ecs:DescribeTasks", "ecs:StopTask"):
        return [Request(action, task) for task in params.get("tasks", [params.get("task")])]
    if action in ("ec2:DescribeVpcs", "ec2:DescribeSubnets"):
        return [Request(action, "*")]
    if action.startswith("sqs:"):
        queue = params.get("QueueName") or params["QueueUrl"].rsplit("/", 1)[1]
        return [Request(action, f"arn:aws:sqs:{REGION}:{account}:{queue}")]
    if action == "logs:GetLogEvents":
        group, stream = params["logGroupName"], params["logStreamName"]
        return [
            Request(
                action, f"arn:aws:logs:{REGION}:{account}:log-group:{group}:log-stream:{stream}"
            )
        ]
    raise AssertionError(f"the worker made a call this test does not know: {call}")


def test_the_worker_makes_exactly_the_calls_the_stacks_worker_policy_allows(
    ecs_world: EcsWorld,
) -> None:
    # A run whose container dies before it reaches the server: the observer then reads its
    # logs as well. Whatever ran before in this module was recorded too.
    run_id = ecs_world.start_run(
        "ttl-sweeper/ttl-sweeper", {"dry_run": True}, command="python3 -c 'import sys; sys.exit(4)'"
    )
    ecs_world.wait_final(run_id)

    def read_logs() -> list[Call] | None:
        found = worker_calls(ecs_world.recording)
        return found if any(c.action == "logs:GetLogEvents" for c in found) else None

    try:
        calls = wait_for(read_logs, 30)
    except TimeoutError:
        calls = worker_calls(ecs_world.recording)
    iam = ecs_world.client("iam")
    policy = iam.get_policy(PolicyArn=ecs_world.outputs["EcsWorkerPolicyArn"])["Policy"]
    document = iam.get_policy_version(
        PolicyArn=policy["Arn"], VersionId=policy["DefaultVersionId"]
    )["PolicyVersion"]["Document"]
    assert [s["Sid"] for s in document["Statement"]] == [
        s["Sid"] for s in json.loads(ECS_WORKER_POLICY.read_text())["Statement"]
    ]
    account = ecs_world.cluster.split(":")[4]
    requests = [request for call in calls for request in authorizations(call, account)]
    refused = [r for r in requests if not evaluate({"ecs-worker": document}, r).allowed]
    assert refused == []
    allowed = {
        action
        for statement in document["Statement"]
        for action in (
            [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        )
    }
    made = Counter(request.action for request in requests)
    assert set(made) | set(NOT_EXERCISED) == allowed, sorted(made)
    # It passed the stack's two roles, ran on the stack's cluster, read the stack's log group.
    assert {r.resource for r in requests if r.action == "iam:PassRole"} == {
        ecs_world.outputs["OrchestratorRoleArn"],
        ecs_world.outputs["EcsExecutionRoleArn"],
    }
    assert {r.context["ecs:cluster"] for r in requests if r.action == "ecs:RunTask"} == {
        ecs_world.cluster
    }
    group = ecs_world.outputs["EcsLogGroupName"]
    assert all(
        f":log-group:{group}:" in r.resource for r in requests if r.action.startswith("logs")
    )
    print("the ECS worker's calls: " + ", ".join(f"{a} ×{n}" for a, n in sorted(made.items())))
