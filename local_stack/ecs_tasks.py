"""ECS's data plane, played locally: moto accepts RunTask; this runs the task's container.

moto keeps the tasks ECS accepted and runs nothing. :class:`EcsDataPlane` finds each task moto
holds as RUNNING, pulls its task definition's image and starts the essential container on a real
Docker Engine (``docker_engine.py``) with the definition's command and environment and the
task's container overrides, as the ECS agent would. When the container exits it does what ECS
and an EventBridge rule do together: the task is stopped in moto (``StopTask``, reason
"Essential container in task exited") and an "ECS Task State Change" event with the container's
exit code goes to the SQS queue prefect-aws's ECS observer reads
(``prefect-ecs-tasks-events``, what its CloudFormation template routes there). A task whose
image cannot be pulled never starts: ECS stops it with ``TaskFailedToStart`` and a
``CannotPullContainerError``, its container stopped without an exit code, and so does this.

What a real task gets from the platform and not from its definition — the task role's
credentials (ECS's credential endpoint) and a route to AWS — comes from ``platform_env``,
never from the task definition: secrets stay out of its plain environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from local_stack.docker_engine import DockerEngine

if TYPE_CHECKING:
    from mypy_boto3_ecs import ECSClient
    from mypy_boto3_sqs import SQSClient

QUEUE_NAME = "prefect-ecs-tasks-events"
STOPPED_REASON = "Essential container in task exited"
PULL_FAILED = "CannotPullContainerError"


@dataclass
class TaskRun:
    """One task this data plane started: its container, and its exit code once it exited."""

    cluster_arn: str
    task_arn: str
    container_name: str
    container_id: str  # empty when it never started
    exit_code: int | None = None
    failed_to_start: str | None = None  # ECS's stoppedReason when the task never started
    started_at: datetime | None = None  # the container's start and end, as the engine saw them
    finished_at: datetime | None = None

    @property
    def stopped(self) -> bool:
        return self.exit_code is not None or self.failed_to_start is not None


@dataclass
class EcsDataPlane:
    ecs: ECSClient
    sqs: SQSClient
    docker: DockerEngine
    cluster: str
    platform_env: Mapping[str, str] = field(default_factory=dict)
    poll_seconds: float = 0.2
    runs: dict[str, TaskRun] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def step(self) -> None:
        """Start the tasks moto accepted since the last step; stop those whose container
        exited."""
        arns = self.ecs.list_tasks(cluster=self.cluster, desiredStatus="RUNNING")["taskArns"]
        new = [arn for arn in arns if arn not in self.runs]
        if new:
            for task in self.ecs.describe_tasks(cluster=self.cluster, tasks=new)["tasks"]:
                self.runs[task["taskArn"]] = self._start(task)
        for run in self.runs.values():
            if not run.stopped:
                self._check(run)

    def _start(self, task: Mapping[str, Any]) -> TaskRun:
        definition = self.ecs.describe_task_definition(taskDefinition=task["taskDefinitionArn"])[
            "taskDefinition"
        ]
        container = next(c for c in definition["containerDefinitions"] if c.get("essential", True))
        override: Mapping[str, Any] = next(
            (
                o
                for o in task.get("overrides", {}).get("containerOverrides", [])
                if o.get("name") == container["name"]
            ),
            {},
        )
        env = {e["name"]: e["value"] for e in container.get("environment", [])}
        env |= {e["name"]: e["value"] for e in override.get("environment", [])}
        env |= self.platform_env
        command = override.get("command") or container.get("command") or []
        run = TaskRun(task["clusterArn"], task["taskArn"], container["name"], "")
        try:
            self.docker.docker("pull", "--quiet", container["image"], timeout=300)
        except RuntimeError as exc:
            run.failed_to_start = f"{PULL_FAILED}: {str(exc).removeprefix('docker pull failed: ')}"
            self._stop(run, run.failed_to_start, stop_code="TaskFailedToStart")
            return run
        argv = ["run", "--detach", "--network", "host", "--name", task["taskArn"].split("/")[-1]]
        for name in env:
            argv += ["--env", name]  # the value from the CLI's environment, not its argv
        run.container_id = self._run_with_env([*argv, container["image"], *command], env)
        return run

    def _run_with_env(self, argv: list[str], env: Mapping[str, str]) -> str:
        done = subprocess.run(
            ["docker", "--host", f"unix://{self.docker.socket}", *argv],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"docker run failed: {done.stderr.strip()[-2000:]}")
        return done.stdout.strip()

    def _check(self, run: TaskRun) -> None:
        state = json.loads(
            self.docker.docker("inspect", "--format", "{{json .State}}", run.container_id)
        )
        if state["Running"]:
            return
        run.started_at = datetime.fromisoformat(state["StartedAt"])
        run.finished_at = datetime.fromisoformat(state["FinishedAt"])
        run.exit_code = int(state["ExitCode"])
        self._stop(run, STOPPED_REASON, stop_code="EssentialContainerExited")

    def _stop(self, run: TaskRun, reason: str, *, stop_code: str) -> None:
        """Stop the task in moto and send the "ECS Task State Change" event EventBridge
        delivers to the observer's queue: the container's exit code, or (never started) the
        reason it did not start and no exit code."""
        self.ecs.stop_task(cluster=run.cluster_arn, task=run.task_arn, reason=reason[:255])
        [task] = self.ecs.describe_tasks(cluster=run.cluster_arn, tasks=[run.task_arn])["tasks"]
        container: dict[str, Any] = {
            "name": run.container_name,
            "lastStatus": "STOPPED",
            "taskArn": run.task_arn,
        }
        if run.exit_code is not None:
            container["exitCode"] = run.exit_code
        else:
            container["reason"] = reason
        event = {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "ECS Task State Change",
            "source": "aws.ecs",
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": run.task_arn.split(":")[3],
            "resources": [run.task_arn],
            "detail": {
                "clusterArn": run.cluster_arn,
                "taskArn": run.task_arn,
                "taskDefinitionArn": task["taskDefinitionArn"],
                "lastStatus": "STOPPED",
                "desiredStatus": "STOPPED",
                "stopCode": stop_code,
                "stoppedReason": reason,
                "containers": [container],
            },
        }
        queue = self.sqs.get_queue_url(QueueName=QUEUE_NAME)["QueueUrl"]
        self.sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(event))

    def logs(self, task_arn: str) -> str:
        """What the task's container printed (stdout and stderr)."""
        done = subprocess.run(
            [
                "docker",
                "--host",
                f"unix://{self.docker.socket}",
                "logs",
                self.runs[task_arn].container_id,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return done.stdout + done.stderr

    def run_in_background(self, stop: threading.Event) -> threading.Thread:
        """Step every ``poll_seconds`` until ``stop`` is set; a failed step is kept in
        ``errors`` (the test reads them) and the loop goes on."""

        def loop() -> None:
            while not stop.is_set():
                try:
                    self.step()
                except Exception as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                stop.wait(self.poll_seconds)

        thread = threading.Thread(target=loop, name="ecs-data-plane", daemon=True)
        thread.start()
        return thread


def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> Any:
    """``predicate()``'s first truthy answer within ``timeout`` seconds, else TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        if found := predicate():
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s")
        time.sleep(interval)
