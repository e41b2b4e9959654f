"""moto as an AWS endpoint in a process of its own, with instances behind EC2 and SSM.

moto keeps its state in module globals: a ``ThreadedMotoServer`` inside the test process shares
it with every ``mock_aws()`` of the other tests on that worker, which reset it. In its own
process the installation's account is nobody else's. ``python -m local_stack.moto_server``
prints ``MOTO_URL <url>`` once it answers and serves until stdin closes or a signal arrives.

``--runtime real`` boots every instance for real (``local_stack/instance/``: user data in bash,
SSM commands in bash, the app and its database as real processes); stdin then takes
``{"bridge": "<address the instance dials>=<host address>"}`` and ``{"env": {...}, "pr": N}``.

``--runtime scripted`` (the default) answers SSM from rules (``scripted_instance.py``), for the
tests whose subject is orchestration under load. Each line on stdin is a JSON command that holds
one PR's run in a stage, so a test can kill the run there:
``{"slow": "bootstrap"|"migrate"|"launch", "pr": 42, "seconds": 60}`` (the instance's bootstrap
check or migration stays InProgress that long; RunInstances for that PR answers that late,
inside the fleet lock). ``{"slow": null}`` clears every brake.

ECS's RunTask is mended (:func:`fargate_task_memory`): moto sums each container's memory and
fails (HTTP 500) on a Fargate task definition whose size is the task's alone, which real ECS
accepts and prefect-aws's ECS worker registers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from local_stack.prefect_server import PROJECT_DIR
from local_stack.processes import die_with_parent, stop_process
from local_stack.scripted_instance import (
    BOOTSTRAP_CHECK,
    BOOTSTRAP_DONE,
    MIGRATE,
    Call,
    Reply,
    Responder,
    ScriptedInstances,
)

MIGRATED = Reply(stdout="INFO  [alembic.runtime.migration] Will assume transactional DDL.\n")

READY_PREFIX = "MOTO_URL "


class Brakes:
    """Stages that run slowly for one PR: set over stdin, read by the scripted instance."""

    STAGES = ("bootstrap", "migrate", "launch")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.slow: dict[str, dict[int, float]] = {stage: {} for stage in self.STAGES}
        self._prs: dict[str, int | None] = {}
        self._lock = threading.Lock()

    def apply(self, command: dict[str, Any]) -> None:
        with self._lock:
            if command.get("slow") is None:
                for stage in self.slow.values():
                    stage.clear()
                return
            self.slow[command["slow"]][int(command["pr"])] = float(command["seconds"])

    def seconds(self, stage: str, pr: int | None) -> float:
        with self._lock:
            return self.slow[stage].get(pr, 0.0) if pr is not None else 0.0

    def pr_of(self, instance_id: str) -> int | None:
        """The instance's PR tag, read from this very server (and remembered)."""
        if instance_id not in self._prs:
            import boto3

            ec2 = boto3.client(
                "ec2",
                endpoint_url=self.endpoint,
                region_name="ap-northeast-1",
                aws_access_key_id="local",
                aws_secret_access_key="local",
            )
            found = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
            tags = {t["Key"]: t["Value"] for t in found[0]["Instances"][0].get("Tags", [])}
            self._prs[instance_id] = int(tags["PR"]) if tags.get("PR", "").isdigit() else None
        return self._prs[instance_id]

    def hold(self, stage: str, normal: Reply) -> Responder:
        def respond(call: Call) -> Reply:
            seconds = self.seconds(stage, self.pr_of(call.instance_id))
            return replace(normal, seconds=seconds) if seconds else normal

        return respond

    def patch_run_instances(self) -> None:
        from moto.ec2.models.instances import InstanceBackend

        original = InstanceBackend.run_instances
        brakes = self

        def run_instances(backend: Any, *args: Any, **kwargs: Any) -> Any:
            tags = kwargs.get("tags") or {}
            pr = next(
                (
                    int(values["PR"])
                    for values in tags.values()
                    if isinstance(values, dict) and str(values.get("PR", "")).isdigit()
                ),
                None,
            )
            time.sleep(brakes.seconds("launch", pr))
            return original(backend, *args, **kwargs)

        setattr(InstanceBackend, "run_instances", run_instances)  # noqa: B010  (a patch)


def serve(runtime: str = "scripted", instances_root: Path | None = None) -> int:
    from moto.server import ThreadedMotoServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    fargate_task_memory()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, stop)
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with instances(runtime, endpoint, instances_root) as apply:
            print(f"{READY_PREFIX}{endpoint}", flush=True)
            for line in sys.stdin:  # until the parent closes our stdin (or dies)
                if line.strip():
                    apply(json.loads(line))
    finally:
        server.stop()
    return 0


def fargate_task_memory() -> None:
    """RunTask of a task definition whose containers name no memory (the task's ``memory``
    sizes them, as on Fargate): moto's resource sum adds ``None``; count such a container as
    0 MiB, as the container-less sum starts."""
    from moto.ecs.models import EC2ContainerServiceBackend

    calculate = EC2ContainerServiceBackend._calculate_task_resource_requirements

    def sized(task_definition: Any) -> Any:
        containers = task_definition.container_definitions
        unsized = [
            c
            for c in containers
            if not {"memory", "memoryReservation", "Memory", "MemoryReservation"} & set(c)
        ]
        for container in unsized:
            container["memoryReservation"] = 0
        try:
            return calculate(task_definition)
        finally:
            for container in unsized:
                container.pop("memoryReservation", None)

    EC2ContainerServiceBackend._calculate_task_resource_requirements = staticmethod(sized)  # type: ignore[method-assign]


@contextmanager
def instances(
    runtime: str, endpoint: str, instances_root: Path | None
) -> Iterator[Callable[[dict[str, Any]], None]]:
    """The instances behind moto; yields what applies a command read from stdin."""
    if runtime == "real":
        from local_stack.instance.relay import Bridge
        from local_stack.instance.runtime import InstanceRuntime

        assert instances_root is not None
        port = int(endpoint.rsplit(":", 1)[1])
        real = InstanceRuntime(
            instances_root,
            bridges=[Bridge("127.0.0.1", port, "127.0.0.1", port)],
            env={
                # What the instance profile gives the AWS CLI on an instance.
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "local-instance-role",
                "AWS_SECRET_ACCESS_KEY": "local-instance-role",
            },
        )
        with real.patched():
            yield real.apply
        return
    brakes = Brakes(endpoint)
    brakes.patch_run_instances()
    scripted = ScriptedInstances().healthy()
    scripted.respond(BOOTSTRAP_CHECK, brakes.hold("bootstrap", BOOTSTRAP_DONE))
    scripted.respond(MIGRATE, brakes.hold("migrate", MIGRATED))
    with scripted.patched():
        yield brakes.apply


@dataclass
class MotoProcess:
    url: str
    process: subprocess.Popen[bytes]
    instances_root: Path | None = None

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()

    def slow(self, stage: str | None, pr: int = 0, seconds: float = 0) -> None:
        """Hold PR ``pr``'s run in ``stage`` for ``seconds`` (None: release every brake)."""
        self.send({"slow": stage, "pr": pr, "seconds": seconds})

    def bridge(self, inside: str, host: str) -> None:
        """Real instances booted from now on reach host ``host`` when they dial ``inside``."""
        self.send({"bridge": f"{inside}={host}"})

    def instance_env(self, env: dict[str, str], pr: int | None = None) -> None:
        """Environment of real instances booted from now on (only PR ``pr``'s if given)."""
        self.send({"env": env, "pr": pr})


@contextmanager
def moto_process(
    log: Path,
    *,
    runtime: str = "scripted",
    instances_root: Path | None = None,
    command: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[MotoProcess]:
    """A moto server process with scripted instances or, with ``runtime="real"``, instances
    that boot for real in sandboxes under ``instances_root``. ``command`` starts another
    server that speaks the same protocol (prints ``MOTO_URL``, reads stdin), e.g. a bench's.
    ``env``: added to its environment (``MOTO_RECORDER_FILEPATH``: where moto's recorder,
    started with ``POST /moto-api/recorder/start-recording``, writes each request)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = command or [sys.executable, "-m", "local_stack.moto_server", "--runtime", runtime]
    if instances_root is not None:
        argv += ["--instances-root", str(instances_root)]
    with log.open("ab") as errors:
        process = subprocess.Popen(
            argv,
            cwd=PROJECT_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            preexec_fn=die_with_parent,
            env={**os.environ, **env} if env else None,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        if not line.startswith(READY_PREFIX):
            process.wait(timeout=10)
            # Its last words say why (e.g. a machine without namespaces: what to enable).
            last = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(
                f"moto server did not start ({line!r}): {' | '.join(last)} (see {log})"
            )
        yield MotoProcess(line.removeprefix(READY_PREFIX), process, instances_root)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        stop_process(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runtime", choices=("scripted", "real"), default="scripted")
    parser.add_argument("--instances-root", type=Path)
    args = parser.parse_args(argv)
    if args.runtime == "real" and args.instances_root is None:
        parser.error("--runtime real needs --instances-root")
    return serve(args.runtime, args.instances_root)


if __name__ == "__main__":
    sys.exit(main())
