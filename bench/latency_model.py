"""A latency model of real AWS for moto and the scripted SSM instance, with time scaled down.

Every number is in modelled real seconds and carries its source. Where no published measurement
was found, the value is marked ESTIMATE with the reasoning, so a reader knows which ones to
replace first when real measurements exist.

The model is applied in three places:

- botocore ``before-call``: every AWS call sleeps its modelled API latency (× scale), then moto
  answers. The handler is put into ``botocore.handlers.BUILTIN_HANDLERS``, so it reaches the
  clients a flow builds for itself (as tests/fakes/aws_faults.py does).
- botocore ``after-call``: RunInstances / TerminateInstances start an instance's timeline;
  DescribeInstances is rewritten so an instance reads ``pending`` until its modelled boot passed
  and ``shutting-down`` until its modelled termination passed (moto answers at once).
- the scripted SSM instance (deployments/scripted_instance.py): the agent refuses commands
  until it registered, the bootstrap marker and the app port appear at their modelled moments,
  and every command runs for its modelled time (``InProgress`` meanwhile).

The wall time spent inside moto itself (not modelled, an artefact of emulation) is measured per
call so the bench can take it out before scaling wall time back up.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from botocore import handlers

from local_stack.scripted_instance import (
    AGENT_PING,
    BOOTSTRAP_CHECK,
    DEPLOY,
    HEALTH,
    MIGRATE,
    PORT_CHECK,
    PROBE,
    Call,
    Reply,
    ScriptedInstances,
    probe_answer,
)


@dataclass(frozen=True)
class Measurement:
    """One modelled duration and where the number comes from."""

    seconds: float
    source: str


# --- EC2 control plane
RUN_INSTANCES_API = Measurement(
    1.54,
    "Colin Percival, 'EC2 boot time benchmarking' (daemonology.net/blog/"
    "2021-08-12-EC2-boot-time-benchmarking.html): 'RunInstances API call took: 1.543152 s'",
)
PENDING_TO_RUNNING = Measurement(
    16.5,
    "brevdev/ec2-coldboot-research docs/instance-type-sweep-results.md (2026-01-31, us-west-2):"
    " pending→running 16.37–16.62 s on t3.medium/t3.large/m6i/m7i/c7i/r7i.large",
)
OTHER_API_CALL = Measurement(
    0.1,
    "ESTIMATE: in-region AWS API round trip; the published CLI timings (brevdev warm-pool"
    " results: create-tags 1.46 s, describe-instances 6.5 s) include AWS CLI start-up, so"
    " they are upper bounds, not per-call latencies",
)
SHUTTING_DOWN_TO_TERMINATED = Measurement(
    30.0,
    "ESTIMATE: no published timing found; AWS docs 'Troubleshoot instance termination' call"
    " shutting-down 'longer than a few minutes' abnormal (docs.aws.amazon.com/AWSEC2/latest/"
    "UserGuide/TroubleshootingInstancesShuttingDown.html)",
)

# --- on the instance: boot, SSM agent, user data (tasks/templates/user_data.sh)
BOOT_TO_CLOUD_INIT = Measurement(
    3.2,
    "brevdev/ec2-coldboot-research docs/cold-baseline-results.md (AL2023, m7i.large):"
    " running→SSH ready 3217 ms (kernel + systemd + cloud-init + sshd)",
)
SSM_AGENT_REGISTRATION = Measurement(
    30.0,
    "DataDog/stratus-red-team issue #108 (2022-03-30): an instance 'can take randomly from 30s"
    " to several minutes' to register with SSM after it is running; 30 s is the low end",
)
DNF_INSTALL_DOCKER = Measurement(
    20.0,
    "ESTIMATE: `dnf -y install docker` on AL2023 (repo metadata + ~80 MB of RPMs from the"
    " in-region mirror) + `systemctl enable --now docker`; no published timing found",
)
COMPOSE_PLUGIN = Measurement(
    3.0,
    "ESTIMATE: docker-compose-plugin from dnf, else one ~60 MB download of the compose binary",
)
REGISTRY_LOGIN = Measurement(
    2.0,
    "ESTIMATE: two `aws ssm get-parameter` calls (AWS CLI start-up ~1 s each) + `docker login`",
)
IMAGE_PULL_FULL = Measurement(
    14.0,
    "200 MB compressed at 200 Mbps = 8 s (dev-toolbox.tech 'Docker Image Download Time"
    " Calculator': Docker Hub-class registry ~200 Mbps typical, region-local 0.5–1 Gbps)"
    " + ESTIMATE 6 s to decompress and extract the layers",
)
IMAGE_PULL_CHANGED_LAYERS = Measurement(
    3.0,
    "~30 MB of changed layers after a code change (same calculator: 'After code change: 15-50"
    " MB (only changed layers)') at 200 Mbps = 1.2 s + ESTIMATE 1 s extract, 1 s manifests",
)
COMPOSE_UP = Measurement(2.0, "ESTIMATE: `docker compose up -d` creating/recreating one service")
APP_START = Measurement(2.0, "ESTIMATE: the app (uvicorn) listening after its container starts")

# --- the steps after ready
MIGRATION = Measurement(
    5.0,
    "ESTIMATE: `docker compose run --rm api alembic upgrade head` — container start ~1 s,"
    " Python + alembic import and a handful of revisions ~4 s; no published timing found",
)
PROBE_CURL = Measurement(0.05, "ESTIMATE: one in-instance curl of /healthz on loopback")
SSM_COMMAND = Measurement(
    1.0,
    "ESTIMATE: SendCommand → agent → Success for a trivial script; DataDog/stratus-red-team"
    " #108 log shows ≤5 s for a curl including their result polling",
)

# --- the runbook's GitHub Actions workflow (runbook §2) as shell steps
CLI_WAITER_DELAY = Measurement(
    15.0,
    "botocore ec2 waiters-2.json (used by `aws ec2 wait instance-running|instance-terminated`):"
    " Delay 15 s, MaxAttempts 40",
)
CLI_COMMAND_WAITER_DELAY = Measurement(
    5.0,
    "botocore ssm waiters-2.json (`aws ssm wait command-executed`): Delay 5 s",
)
RUNBOOK_PORT_POLL = Measurement(
    10.0,
    "ASSUMPTION: runbook §2 step 6 'wait until 8000/TCP opens' gives no interval; a `sleep 10`"
    " loop is the common shape",
)

MEASUREMENTS: dict[str, Measurement] = {
    "RunInstances API": RUN_INSTANCES_API,
    "pending → running": PENDING_TO_RUNNING,
    "other AWS API call": OTHER_API_CALL,
    "shutting-down → terminated": SHUTTING_DOWN_TO_TERMINATED,
    "boot → cloud-init": BOOT_TO_CLOUD_INIT,
    "SSM agent registered (after running)": SSM_AGENT_REGISTRATION,
    "dnf install docker": DNF_INSTALL_DOCKER,
    "compose plugin": COMPOSE_PLUGIN,
    "registry login": REGISTRY_LOGIN,
    "pull ~200 MB image": IMAGE_PULL_FULL,
    "pull changed layers (push)": IMAGE_PULL_CHANGED_LAYERS,
    "compose up -d": COMPOSE_UP,
    "app start": APP_START,
    "alembic migration": MIGRATION,
    "probe curl": PROBE_CURL,
    "SSM command round trip": SSM_COMMAND,
    "AWS CLI ec2 waiter delay": CLI_WAITER_DELAY,
    "AWS CLI ssm waiter delay": CLI_COMMAND_WAITER_DELAY,
    "runbook port-8000 poll": RUNBOOK_PORT_POLL,
}

API_LATENCY = {"RunInstances": RUN_INSTANCES_API.seconds}


def bootstrap_seconds() -> float:
    """Running → ``bootstrap-done`` marker: the user data's steps one after another."""
    return (
        BOOT_TO_CLOUD_INIT.seconds
        + DNF_INSTALL_DOCKER.seconds
        + COMPOSE_PLUGIN.seconds
        + REGISTRY_LOGIN.seconds
        + IMAGE_PULL_FULL.seconds
        + COMPOSE_UP.seconds
    )


def deploy_seconds() -> float:
    """The in-place update's one SSM script: login, pull the changed layers, recreate."""
    return REGISTRY_LOGIN.seconds + IMAGE_PULL_CHANGED_LAYERS.seconds + COMPOSE_UP.seconds


@dataclass
class Timeline:
    """Modelled moments (``time.monotonic()``) of one instance."""

    running_at: float = float("-inf")
    agent_at: float = float("-inf")
    bootstrap_at: float = float("-inf")
    app_at: float = float("-inf")
    terminated_at: float | None = None


@dataclass
class World:
    """The instances' timelines plus what the run spent inside moto (emulation artefact)."""

    scale: float
    instances: dict[str, Timeline] = field(default_factory=dict)
    moto_seconds: float = 0.0
    api_calls: int = 0
    events: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def s(self, seconds: float) -> float:
        """Modelled seconds → wall seconds."""
        return seconds * self.scale

    def booted(self, instance_id: str) -> None:
        """An instance that was up long before the run (the PR's current preview)."""
        self.instances[instance_id] = Timeline()

    def launched(self, instance_id: str, at: float) -> None:
        running = at + self.s(PENDING_TO_RUNNING.seconds)
        bootstrap = running + self.s(bootstrap_seconds())
        self.instances[instance_id] = Timeline(
            running_at=running,
            agent_at=running + self.s(SSM_AGENT_REGISTRATION.seconds),
            bootstrap_at=bootstrap,
            app_at=bootstrap + self.s(APP_START.seconds),
        )
        self.events.append((at, f"launched {instance_id}"))

    def terminating(self, instance_id: str, at: float) -> None:
        timeline = self.instances.setdefault(instance_id, Timeline())
        if timeline.terminated_at is None:
            timeline.terminated_at = at + self.s(SHUTTING_DOWN_TO_TERMINATED.seconds)
            self.events.append((at, f"terminating {instance_id}"))

    def timeline(self, instance_id: str) -> Timeline:
        return self.instances.get(instance_id) or Timeline()

    def agent_online(self, instance_id: str) -> bool:
        return time.monotonic() >= self.timeline(instance_id).agent_at


class LatencyModel:
    """Installs the botocore handlers and the SSM rules once; ``world`` is swapped per run."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.world = World(scale)
        self.fake: ScriptedInstances | None = None

    def new_world(self) -> World:
        self.world = World(self.scale)
        return self.world

    # --- botocore
    def before_call(self, event_name: str, model: Any, context: dict[str, Any], **_: Any) -> None:
        latency = API_LATENCY.get(model.name, OTHER_API_CALL.seconds)
        time.sleep(latency * self.scale)
        context["latency_model_started"] = time.monotonic()

    def after_call(
        self, event_name: str, model: Any, parsed: dict[str, Any], context: dict[str, Any], **_: Any
    ) -> None:
        world = self.world
        now = time.monotonic()
        started = context.get("latency_model_started")
        with world.lock:
            if started is not None:
                world.moto_seconds += now - started
            world.api_calls += 1
        if model.name == "RunInstances":
            for instance in parsed.get("Instances", []):
                world.launched(instance["InstanceId"], now)
                if self.fake is not None:
                    self.agent_offline_until_registered(self.fake, instance["InstanceId"])
        elif model.name == "TerminateInstances":
            for change in parsed.get("TerminatingInstances", []):
                world.terminating(change["InstanceId"], now)
        elif model.name == "DescribeInstances":
            for reservation in parsed.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    self._rewrite_state(instance, now)

    def _rewrite_state(self, instance: dict[str, Any], now: float) -> None:
        timeline = self.world.instances.get(instance.get("InstanceId", ""))
        if timeline is None:
            return
        if timeline.terminated_at is not None and now < timeline.terminated_at:
            instance["State"] = {"Code": 32, "Name": "shutting-down"}
        elif timeline.terminated_at is None and now < timeline.running_at:
            instance["State"] = {"Code": 0, "Name": "pending"}

    @contextlib.contextmanager
    def installed(self) -> Iterator[LatencyModel]:
        """Put the handlers in every botocore session created inside the block."""
        specs = [("before-call", self.before_call), ("after-call", self.after_call)]
        for spec in specs:
            handlers.BUILTIN_HANDLERS.insert(0, spec)
        try:
            yield self
        finally:
            for spec in specs:
                handlers.BUILTIN_HANDLERS.remove(spec)

    # --- the scripted SSM instance
    def script(self, fake: ScriptedInstances) -> ScriptedInstances:
        """Rules that read each instance's timeline; every command costs an SSM round trip."""
        self.fake = fake
        rtt = self.scale * SSM_COMMAND.seconds

        def reply(stdout: str = "", seconds: float = 0.0, **kwargs: Any) -> Reply:
            return Reply(
                stdout=stdout, seconds=rtt + seconds * self.scale, missing_reads=1, **kwargs
            )

        def bootstrap(call: Call) -> Reply:
            done = call.at >= self.world.timeline(call.instance_id).bootstrap_at
            return reply("bootstrap-done\n" if done else "bootstrap-pending\n")

        def port(call: Call) -> Reply:
            if call.at >= self.world.timeline(call.instance_id).app_at:
                return reply("APP PORT OPEN 8000\n")
            return reply("APP PORT CLOSED 8000\n", exit_code=1)

        def probe(call: Call) -> Reply:
            answer = probe_answer(
                200 if call.at >= self.world.timeline(call.instance_id).app_at else 0
            )
            return Reply(
                stdout=answer.stdout,
                stderr=answer.stderr,
                exit_code=answer.exit_code,
                seconds=rtt + PROBE_CURL.seconds * self.scale,
                missing_reads=1,
            )

        def health(call: Call) -> Reply:
            if call.at >= self.world.timeline(call.instance_id).app_at:
                return reply("healthy\n")
            return reply("app port 8000 closed\n", exit_code=1)

        def deploy(call: Call) -> Reply:
            timeline = self.world.timeline(call.instance_id)
            done = call.at + self.scale * deploy_seconds()
            timeline.app_at = done + self.scale * APP_START.seconds
            self.world.instances[call.instance_id] = timeline
            return reply("updated\n", deploy_seconds())

        fake.on(AGENT_PING, reply("pr-preview-agent-ok\n"))
        fake.respond(BOOTSTRAP_CHECK, bootstrap)
        fake.respond(PORT_CHECK, port)
        fake.respond(PROBE, probe)
        fake.respond(HEALTH, health)
        fake.respond(DEPLOY, deploy)
        fake.on(
            MIGRATE, reply("INFO  [alembic.runtime.migration] Running upgrade\n", MIGRATION.seconds)
        )
        return fake

    def agent_offline_until_registered(self, fake: ScriptedInstances, instance_id: str) -> None:
        world = self.world
        fake.agent_offline(instance_id, until=lambda: world.agent_online(instance_id))
