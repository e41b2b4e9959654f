"""Past one machine, for real (issue 34): prefect-aws's ECS worker runs the flows in containers.

The world (``tests/support/ecs_world.py``): the CloudFormation stack deployed with
``WorkPool=ecs`` into a moto server whose instances boot for real, the ECS work pool from
``deployments/pools/ecs.yaml``, the deployments from ``python -m deployments.pools ecs
--from-stack``, prefect-aws's own worker (``prefect worker start --type ecs``), the flow image
built here (``make image``) pushed to the local registry, and ``local_stack/ecs_tasks.py`` as
ECS's data plane, running each task moto accepted on a real Docker Engine and reporting its end
as ECS and EventBridge do to the worker's observer. A preview run goes all the way there: its
container launches an instance that boots, pulls the PR's image and migrates the db-server, and
the PR gets its comment. moto's recorder keeps every request the worker signed with its own
key, which the stack's worker policy must allow, one by one, and nothing more.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from deployments.aws import ECS_WORKER_POLICY
from local_stack.ecs_tasks import wait_for
from local_stack.instance.world import push_sample_app
from local_stack.prefect_server import pull_request_payload
from tasks.cloud.ssm import run_command
from tasks.github.pull_request import marker
from tests.support.ecs_world import (
    POOL,
    REGION,
    WORKER_KEY,
    WORKER_NAME,
    EcsWorld,
    running_ecs_world,
)
from tests.support.iam_policy import Request, evaluate
from tests.support.moto_state import tags

pytestmark = [pytest.mark.server, pytest.mark.ecs, pytest.mark.xdist_group("ecs")]

REPO = "octo-org/hello-api"


@pytest.fixture(scope="module")
def ecs_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EcsWorld]:
    with running_ecs_world(tmp_path_factory.mktemp("ecs")) as world:
        yield world


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
    # The worker's supervisor, which cancels a running run; not the engine alone
    # (deployments/pools/ecs.yaml).
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


def test_a_preview_run_completes_in_its_container_and_the_pr_gets_its_preview(
    ecs_world: EcsWorld,
) -> None:
    pr, sha = 42, "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
    push_sample_app(ecs_world.registry, REPO, sha, "v1", private=True)
    ecs_world.github.add_pull(REPO, pull_request_payload("opened", REPO, pr, sha)["pull_request"])
    started = time.monotonic()
    run_id = ecs_world.start_run(
        "pr-preview/pr-preview",
        {"repo": REPO, "pr_number": pr, "head_sha": sha, "action": "opened"},
    )
    final = ecs_world.wait_final(run_id, timeout=420)
    task = ecs_world.task_of(run_id)
    assert final["state_type"] == "COMPLETED", (
        final["state"],
        ecs_world.plane.logs(task["taskArn"])[-3000:],
    )
    # The ECS worker ran it, as the UI shows it: the worker's name and type on the run, the
    # task as its infrastructure, and the task's container exited 0.
    assert final["work_pool_name"] == POOL
    assert final["labels"]["prefect.worker.name"] == WORKER_NAME
    assert final["labels"]["prefect.worker.type"] == "ecs"
    assert final["infrastructure_pid"] == f"{ecs_world.cluster}::{task['taskArn']}"
    container = ecs_world.plane.runs[task["taskArn"]]
    assert wait_for(lambda: container.exit_code is not None, 30) and container.exit_code == 0
    # The instance it launched in moto, with the PR's tags, booted for real: the app answers
    # inside it with the PR's sha (the page the reviewer opens through the tunnel).
    ec2 = ecs_world.client("ec2")
    reservations = ec2.describe_instances(
        Filters=[{"Name": "tag:PR", "Values": [str(pr)]}, {"Name": "tag:Repo", "Values": [REPO]}]
    )["Reservations"]
    [instance] = [i for r in reservations for i in r["Instances"]]
    assert instance["State"]["Name"] == "running"
    found = tags(instance)
    assert (found["Purpose"], found["Sha"], found["Name"]) == (
        "pr-preview-singleton",
        sha,
        f"pr-{pr}-preview",
    )
    assert "shutdown-at" in found and "updated-at" in found
    page = run_command(
        ecs_world.client("ssm"),
        instance["InstanceId"],
        ["curl -fsS http://127.0.0.1:8000/"],
        timeout_seconds=60,
        poll_seconds=0.2,
    )
    assert page.ok and sha in page.output, page.output[-2000:]
    # The PR's sticky comment, posted from the container to GitHub: ready, with the instance.
    [comment] = [
        body
        for body in ecs_world.github.comment_bodies(REPO, pr)
        if body.startswith(marker(REPO, pr))
    ]
    assert "✅ Preview ready" in comment and instance["InstanceId"] in comment, comment
    created, running = (datetime.fromisoformat(final[key]) for key in ("created", "start_time"))
    print(
        f"preview run in its container: created → Running {(running - created).total_seconds():.1f}"
        f" s, → Completed (instance booted, app ready) {time.monotonic() - started:.1f} s"
    )


def test_a_preview_run_that_crashes_or_never_starts_ends_crashed_and_the_pr_is_told(
    ecs_world: EcsWorld,
) -> None:
    """A container that exits non-zero, and a task whose image cannot be pulled: the worker's
    observer reports each run Crashed, and the server-side automation starts pr-crash-report,
    which tells the PR from a container of its own (no state hook runs on ECS)."""
    sha = "2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d1a"
    exits, never = 51, 52
    for pr in (exits, never):
        ecs_world.github.add_pull(
            REPO, pull_request_payload("opened", REPO, pr, sha)["pull_request"]
        )
    parameters = {"repo": REPO, "head_sha": sha, "action": "opened"}
    exited = ecs_world.start_run(
        "pr-preview/pr-preview",
        {**parameters, "pr_number": exits},
        command="python3 -c 'import sys; sys.exit(3)'",
    )
    unpulled = ecs_world.start_run(
        "pr-preview/pr-preview",
        {**parameters, "pr_number": never},
        image=ecs_world.image.rsplit(":", 1)[0] + ":no-such-tag",
    )
    for run_id, pr in ((exited, exits), (unpulled, never)):
        final = ecs_world.wait_final(run_id)
        assert final["state_type"] == "CRASHED", (pr, final["state"])
        assert "non-zero exit code: ['prefect']" in final["state"]["message"]
    exited_task = ecs_world.plane.runs[ecs_world.task_of(exited)["taskArn"]]
    assert exited_task.exit_code == 3 and exited_task.failed_to_start is None
    unpulled_task = ecs_world.plane.runs[ecs_world.task_of(unpulled)["taskArn"]]
    assert unpulled_task.exit_code is None and unpulled_task.container_id == ""
    assert str(unpulled_task.failed_to_start).startswith("CannotPullContainerError: ")
    # The observer's diagnosis of the task that never started, in the run's logs.
    assert wait_for(
        lambda: any("CannotPullContainerError" in line for line in ecs_world.logs(unpulled)), 30
    )
    for run_id, pr in ((exited, exits), (unpulled, never)):
        told = ecs_world.wait_final(crash_report_of(ecs_world, run_id))
        assert told["state_type"] == "COMPLETED", told["state"]
        assert told["labels"]["prefect.worker.name"] == WORKER_NAME
        [comment] = [
            body
            for body in ecs_world.github.comment_bodies(REPO, pr)
            if body.startswith(marker(REPO, pr))
        ]
        assert "💥 Preview run crashed" in comment, comment
        assert "It left no instance running." in comment


def test_a_running_preview_run_cancelled_from_the_ui_ends_cancelled_in_its_container(
    ecs_world: EcsWorld,
) -> None:
    """The worker cancels only runs that never started; a running one is cancelled by the
    supervisor in its container, ``prefect flow-run execute`` (why the pool keeps the worker's
    command rather than the engine alone, which leaves the run Cancelling), which also runs
    the flow's on_cancellation hook."""
    pr, sha = 61, "3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d1a2b"  # no image: it waits in the check
    ecs_world.github.add_pull(REPO, pull_request_payload("opened", REPO, pr, sha)["pull_request"])
    run_id = ecs_world.start_run(
        "pr-preview/pr-preview",
        {"repo": REPO, "pr_number": pr, "head_sha": sha, "action": "opened"},
    )
    # Running, its PR told it is launching: it waits for CI's image from here.
    wait_for(lambda: ecs_world.github.comment_bodies(REPO, pr), 120, interval=0.5)
    with ecs_world.stack.client() as http:  # what the UI's Cancel does
        http.post(
            f"/flow_runs/{run_id}/set_state",
            json={"state": {"type": "CANCELLING", "name": "Cancelling"}},
        ).raise_for_status()
    final = ecs_world.wait_final(run_id, timeout=120)
    assert (final["state_type"], final["state"]["message"]) == (
        "CANCELLED",
        "Flow run was cancelled successfully.",
    )
    container = ecs_world.plane.runs[ecs_world.task_of(run_id)["taskArn"]]
    assert wait_for(lambda: container.exit_code is not None, 60) and container.exit_code == 0
    assert f"lock pr-preview:octo-org:hello-api:{pr} released" in ecs_world.logs(run_id)
    # The supervisor ran the flow's on_cancellation hook (handed the Cancelling state): the PR
    # hears it.
    [comment] = [
        body
        for body in ecs_world.github.comment_bodies(REPO, pr)
        if body.startswith(marker(REPO, pr))
    ]
    assert "⏹ Preview run cancelled" in comment, comment
    ec2 = ecs_world.client("ec2")
    launched = ec2.describe_instances(Filters=[{"Name": "tag:PR", "Values": [str(pr)]}])
    assert launched["Reservations"] == []


def crash_report_of(ecs_world: EcsWorld, run_id: str) -> str:
    """The pr-crash-report run the automation started for run ``run_id``."""
    found = wait_for(
        lambda: ecs_world.runs_of("pr-crash-report/pr-crash-report", flow_run_id=run_id), 60
    )
    [report] = found
    return str(report["id"])


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
    # pr-crash-report's own runs are not tagged pr-preview: no report of this crash follows.
    run_id = ecs_world.start_run(
        "pr-crash-report/pr-crash-report",
        {"flow_run_id": "00000000-0000-0000-0000-000000000000"},
        command="python3 -c 'import sys; sys.exit(4)'",
    )
    ecs_world.wait_final(run_id)
    iam = ecs_world.client("iam")
    policy = iam.get_policy(PolicyArn=ecs_world.outputs["EcsWorkerPolicyArn"])["Policy"]
    document = iam.get_policy_version(
        PolicyArn=policy["Arn"], VersionId=policy["DefaultVersionId"]
    )["PolicyVersion"]["Document"]
    assert [s["Sid"] for s in document["Statement"]] == [
        s["Sid"] for s in json.loads(ECS_WORKER_POLICY.read_text())["Statement"]
    ]
    allowed = {
        action
        for statement in document["Statement"]
        for action in (
            [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        )
    }
    account = ecs_world.cluster.split(":")[4]

    def requests_so_far() -> list[Request]:
        calls = worker_calls(ecs_world.recording)
        return [request for call in calls for request in authorizations(call, account)]

    def every_call() -> list[Request] | None:
        """The worker's requests once the observer has handled the crash (its logs read, the
        event's message deleted): it does both after the run is already Crashed."""
        found = requests_so_far()
        return found if allowed - set(NOT_EXERCISED) <= {r.action for r in found} else None

    try:
        requests = wait_for(every_call, 30)
    except TimeoutError:
        requests = requests_so_far()
    refused = [r for r in requests if not evaluate({"ecs-worker": document}, r).allowed]
    assert refused == []
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
