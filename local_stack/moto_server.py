"""moto as an AWS endpoint in a process of its own, with the scripted instance behind SSM.

moto keeps its state in module globals: a ``ThreadedMotoServer`` inside the test process shares
it with every ``mock_aws()`` of the other tests on that worker, which reset it. In its own
process the installation's account is nobody else's. ``python -m local_stack.moto_server``
prints ``MOTO_URL <url>`` once it answers and serves until stdin closes or a signal arrives.

Each line on stdin is a JSON command that holds one PR's run in a stage, so a test can kill the
run there: ``{"slow": "bootstrap"|"migrate"|"launch", "pr": 42, "seconds": 60}`` (the instance's
bootstrap check or migration stays InProgress that long; RunInstances for that PR answers that
late, inside the fleet lock). ``{"slow": null}`` clears every brake.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from local_stack.prefect_server import PROJECT_DIR, die_with_parent, stop_process
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

    def apply(self, line: str) -> None:
        command = json.loads(line)
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


def serve() -> int:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, stop)
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    brakes = Brakes(endpoint)
    brakes.patch_run_instances()
    instances = ScriptedInstances().healthy()
    instances.respond(BOOTSTRAP_CHECK, brakes.hold("bootstrap", BOOTSTRAP_DONE))
    instances.respond(MIGRATE, brakes.hold("migrate", MIGRATED))
    try:
        with instances.patched():
            print(f"{READY_PREFIX}{endpoint}", flush=True)
            for line in sys.stdin:  # until the parent closes our stdin (or dies)
                if line.strip():
                    brakes.apply(line)
    finally:
        server.stop()
    return 0


@dataclass
class MotoProcess:
    url: str
    process: subprocess.Popen[bytes]

    def slow(self, stage: str | None, pr: int = 0, seconds: float = 0) -> None:
        """Hold PR ``pr``'s run in ``stage`` for ``seconds`` (None: release every brake)."""
        assert self.process.stdin is not None
        line = {"slow": stage, "pr": pr, "seconds": seconds}
        self.process.stdin.write((json.dumps(line) + "\n").encode())
        self.process.stdin.flush()


@contextmanager
def moto_process(log: Path) -> Iterator[MotoProcess]:
    """A moto server process with a healthy scripted instance."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "local_stack.moto_server"],
            cwd=PROJECT_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            preexec_fn=die_with_parent,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"moto server did not start ({line!r}); see {log}")
        yield MotoProcess(line.removeprefix(READY_PREFIX), process)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        stop_process(process)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None).parse_args(
        argv
    )
    return serve()


if __name__ == "__main__":
    sys.exit(main())
