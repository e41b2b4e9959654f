"""A latency model of real AWS for moto and the scripted SSM instance, with time scaled down.

Every number is in modelled real seconds and carries its source. What the Docker Engine does on
the instance is MEASURED here (bench/bench_engine.py, on a real local instance, with the date);
AWS-side rows come from published measurements; where neither exists, the value is marked
ESTIMATE with the reasoning, so a reader knows which ones to replace first.

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

Issue 15 asks what each lever buys: a cold launch, a launch from a baked AMI, a warm spare
claimed by a new PR, a push deployed in place. Each is a :class:`Composition` here — the
sequence of modelled calls on its critical path, whose sum is the path's floor — and the boot of
a launched instance is a :class:`BootProfile` (stock or baked, migrating on boot or not). The
changes to the product the targets needed are named (:data:`CHANGES`, F1…F6, S1; all made) and
compositions say which they take, so a floor before a change can still be shown beside ours.
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
    BOOTSTRAP_CHECK,
    DEPLOY_COMMAND,
    EARLY_PULL,
    HEALTH,
    MIGRATE,
    MIGRATED_CHECK,
    MIGRATED_LINE,
    PORT_CHECK,
    PROBE,
    Call,
    Reply,
    ScriptedInstances,
    probe_reply,
)
from tasks.app.cost import (
    HOURS_PER_MONTH,
    SNAPSHOT_GB_MONTH,
    format_usd,
    hourly_price,
    volume_hourly_price,
)
from tasks.config import PreviewConfig


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
# MEASURED rows: bench/bench_engine.py, 2026-12-07, on a real local instance (Docker Engine
# 20.10 per instance, Docker Compose v2.40.3, the sample app examples/hello-api), this 2-core
# machine shared with other test runs: the median of 3 (6 for compose up), each timed on the
# instance with bash's $EPOCHREALTIME around the command alone (no SSM round trip in it).
ENGINE_BENCH = "MEASURED bench/bench_engine.py 2026-12-07"
LOCAL_PULL_FULL = Measurement(
    7.82,
    f"{ENGINE_BENCH}: `docker pull` of the sample app (192 MB, 3 uncompressed layers) after"
    " `docker rmi` of every image, from the loopback registry — unpacking and registering the"
    " layers, next to no network",
)
LOCAL_PULL_TOP = Measurement(
    0.43,
    f"{ENGINE_BENCH}: `docker pull` of v2 with v1 present (index, manifest, config and its"
    " 0.02 MB app layer) from the loopback registry",
)
IMAGE_PULL_FULL = Measurement(
    8.0 + LOCAL_PULL_FULL.seconds,
    "200 MB compressed at 200 Mbps = 8 s (dev-toolbox.tech 'Docker Image Download Time"
    " Calculator': Docker Hub-class registry ~200 Mbps typical, region-local 0.5–1 Gbps)"
    f" + {LOCAL_PULL_FULL.seconds:g} s to unpack, as a local pull of 192 MB took"
    f" ({ENGINE_BENCH})",
)
IMAGE_PULL_CHANGED_LAYERS = Measurement(
    1.2 + LOCAL_PULL_TOP.seconds,
    "~30 MB of changed layers after a code change (same calculator: 'After code change: 15-50"
    " MB (only changed layers)') at 200 Mbps = 1.2 s"
    f" + {LOCAL_PULL_TOP.seconds:g} s of manifests and unpacking, as a local pull of one new"
    f" layer took ({ENGINE_BENCH})",
)
COMPOSE_UP = Measurement(
    1.83,
    f"{ENGINE_BENCH}: `docker compose up -d` recreating the app service (APP_IMAGE flipped"
    " between two images present), median of 6",
)
APP_START = Measurement(
    2.17,
    f"{ENGINE_BENCH}: after `compose up -d`, until curl on the app port gets an HTTP answer"
    " (uvicorn importing FastAPI, SQLAlchemy and the app), median of 6",
)
SIDE_BY_SIDE_START = Measurement(
    1.25,
    f"{ENGINE_BENCH}: the deploy's swap stage — `docker compose up -d --no-recreate --scale"
    " api=2` starting the new version beside the one serving (mean of 2: 1.42, 1.07 s)",
)
SWITCH = Measurement(
    0.03,
    f"{ENGINE_BENCH}: the deploy's switch stage — the proxy's upstream file renamed onto the new"
    " version, its old one's retirement started in the background, the command ends (mean of 2:"
    " 0.04, 0.01 s); the retirement (drain, `docker stop -t 10`, compose up) took 1.21, 1.93 s"
    " after it, off the path (change D4)",
)
SWITCH_AND_STOP = Measurement(
    1.57,
    f"{ENGINE_BENCH}: the switch stage before D4 — the rename, then the old version's"
    " connections drained and `docker stop -t 10` of it inside the command (mean of 2: 1.74,"
    " 1.40 s)",
)
CONTAINER_START = Measurement(
    0.59,
    f"{ENGINE_BENCH}: `docker run --rm --network none --entrypoint true IMAGE` (create,"
    " start, exit, remove)",
)
RUN_START = Measurement(
    1.11,
    f"{ENGINE_BENCH}: `docker compose run --rm -T api true` (a one-off container of the app"
    " service on its network, with its env files)",
)
ALEMBIC_CURRENT = Measurement(
    1.41,
    f"{ENGINE_BENCH}: `docker compose exec -T api alembic current` in the running app"
    " container (Python, alembic and the app's env.py, one query)",
)
IMAGE_INSPECT = Measurement(
    0.13,
    f"{ENGINE_BENCH}: `docker image inspect IMAGE@digest` (is the pinned image here?); the"
    " alembic-heads label read the same way took 0.07 s",
)

# --- the steps after ready
MIGRATION = Measurement(
    3.04,
    f"{ENGINE_BENCH}: `docker compose run --rm -T api alembic upgrade head` of 1 revision"
    " (2 revisions: 2.72 s, none to run: 2.22 s — the container and Python, not the SQL)",
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

# --- published, shown beside the model but not charged by it (issue 15)
START_STOPPED = Measurement(
    21.2,
    "brevdev/ec2-coldboot-research docs/start-stopped-results.md (m7i.large, AL2023):"
    " start-instances 1764 ms + pending→running 16372 ms + boot→SSH 3042 ms = 21178 ms",
)
HIBERNATE_RESUME = Measurement(
    20.7,
    "brevdev/ec2-coldboot-research docs/hibernate-results.md (m7i.large): API 2015 ms +"
    " pending→running 16311 ms + RAM restore→SSH 2381 ms = 20707 ms",
)
WARM_POOL_CLAIM = Measurement(
    12.8,
    "brevdev/ec2-coldboot-research docs/warm-pool-realistic-results.md: describe-instances 6476 ms"
    " + create-tags 1460 ms + key push + SSH = 12837 ms (3.9 s without the tag query); AWS CLI"
    " start-up is in every call, so the model charges a claim's two calls at 'other AWS API call'",
)
TUNNEL_REFUSED_AFTER_START = Measurement(
    90.0,
    "jupyter-infra/jupyter-deploy#176 (as /work/shared/FACTS.md quotes it): after a stop/start,"
    " Session Manager port forwarding refused sessions (TargetNotConnected) for over 90 s while"
    " SendCommand already worked",
)
START_INSTANCES_API = Measurement(
    1.76,
    "brevdev/ec2-coldboot-research docs/start-stopped-results.md (m7i.large, AL2023):"
    " start-instances 1764 ms",
)
PENDING_TO_RUNNING_AFTER_START = Measurement(
    16.4,
    "brevdev/ec2-coldboot-research docs/start-stopped-results.md: pending→running 16372 ms",
)
SESSION_RETRY = Measurement(
    5.0,
    "a choice (deployments/cli/tunnel.py RETRY_SECONDS): how often `pr-preview tunnel` starts"
    " the session again while Session Manager answers TargetNotConnected; half of it is waited"
    " on average",
)
AGENT_POLL = Measurement(
    1.0,
    "a choice (change F4, tasks/steps/wait_ready.py AGENT_POLL_SECONDS): how often wait-ready asks"
    " the SSM agent; a refused SendCommand (InvalidInstanceId) costs one API call",
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
    "side-by-side start": SIDE_BY_SIDE_START,
    "switch (D4)": SWITCH,
    "switch and stop (before D4)": SWITCH_AND_STOP,
    "app start": APP_START,
    "alembic migration": MIGRATION,
    "container start": CONTAINER_START,
    "compose run --rm start": RUN_START,
    "alembic current (exec)": ALEMBIC_CURRENT,
    "image inspect": IMAGE_INSPECT,
    "local pull, 192 MB": LOCAL_PULL_FULL,
    "local pull, one layer": LOCAL_PULL_TOP,
    "probe curl": PROBE_CURL,
    "SSM command round trip": SSM_COMMAND,
    "AWS CLI ec2 waiter delay": CLI_WAITER_DELAY,
    "AWS CLI ssm waiter delay": CLI_COMMAND_WAITER_DELAY,
    "runbook port-8000 poll": RUNBOOK_PORT_POLL,
    "agent poll with F4": AGENT_POLL,
}
REFERENCES: dict[str, Measurement] = {
    "start a stopped instance → SSH": START_STOPPED,
    "hibernate resume → SSH": HIBERNATE_RESUME,
    "warm pool claim by tags (AWS CLI)": WARM_POOL_CLAIM,
    "port forwarding refused after start": TUNNEL_REFUSED_AFTER_START,
    "StartInstances API": START_INSTANCES_API,
    "pending → running after a start": PENDING_TO_RUNNING_AFTER_START,
    "tunnel session retry": SESSION_RETRY,
}

API_LATENCY = {"RunInstances": RUN_INSTANCES_API.seconds}


@dataclass(frozen=True)
class BootProfile:
    """What a launched instance's user data does from running to ``bootstrap-done``, step by
    step; the app answers ``APP_START`` after ``compose up`` (a migration run after it overlaps)."""

    name: str
    steps: tuple[tuple[str, Measurement], ...]
    migrated: bool = False  # the user data ran the migrations (change F2)

    @property
    def bootstrap_seconds(self) -> float:
        return sum(measurement.seconds for _, measurement in self.steps)

    @property
    def app_seconds(self) -> float:
        """Running → the app answers on its port."""
        until_up = 0.0
        for _, measurement in self.steps:
            until_up += measurement.seconds
            if measurement is COMPOSE_UP:
                break
        return until_up + APP_START.seconds


# The runbook's user data (and ours before F2): no migrations on boot.
STOCK = BootProfile(
    "stock AMI",
    (
        ("cloud-init", BOOT_TO_CLOUD_INIT),
        ("dnf install docker", DNF_INSTALL_DOCKER),
        ("compose plugin", COMPOSE_PLUGIN),
        ("registry login", REGISTRY_LOGIN),
        ("pull the full image", IMAGE_PULL_FULL),
        ("compose up -d", COMPOSE_UP),
    ),
)
# Docker, Compose and the image's base layers are on the AMI: the user data logs in, pulls the
# PR's top layers (the changed-layers measurement: what differs from the base) and starts.
BAKED = BootProfile(
    "baked AMI",
    (
        ("cloud-init", BOOT_TO_CLOUD_INIT),
        ("registry login", REGISTRY_LOGIN),
        ("pull the top layers", IMAGE_PULL_CHANGED_LAYERS),
        ("compose up -d", COMPOSE_UP),
    ),
)
# Ours (change F2): every launch's user data migrates once after `up`, while the agent registers.
STOCK_MIGRATING = BootProfile(
    "stock AMI, migrating on boot (F2)",
    (*STOCK.steps, ("alembic migration", MIGRATION)),
    migrated=True,
)
BAKED_MIGRATING = BootProfile(
    "baked AMI, migrating on boot (F2)",
    (*BAKED.steps, ("alembic migration", MIGRATION)),
    migrated=True,
)


def bootstrap_seconds() -> float:
    """Running → ``bootstrap-done`` marker on the stock AMI, the runbook's user data (no
    migrations on boot): its steps in turn."""
    return STOCK.bootstrap_seconds


def deploy_seconds(*, layers: bool = True) -> float:
    """The in-place deploy's one SSM script: login, pull, recreate. ``layers``: the image's base
    layers are on the instance already, so only the changed ones are pulled."""
    pull = IMAGE_PULL_CHANGED_LAYERS if layers else IMAGE_PULL_FULL
    return REGISTRY_LOGIN.seconds + pull.seconds + COMPOSE_UP.seconds


# --- issue 15: the changes to the product that the targets assumed (all made now)


@dataclass(frozen=True)
class Change:
    key: str
    title: str
    detail: str


CHANGES: dict[str, Change] = {
    change.key: change
    for change in (
        Change(
            "F1",
            "one ready command",
            "wait-ready's agent ping, bootstrap check and port check are one SSM command, sent"
            " until it says ready; once the boot migrated, the same command probes (made)",
        ),
        Change(
            "F2",
            "migrate on boot",
            "every launch's user data, stock or baked, runs the migrations once after compose up,"
            " while the SSM agent registers, and marks the .env it migrated; bootstrap-done then"
            " means migrated or left to the flow, whose migrate step runs (and diagnoses) a"
            " failure as before; a push keeps its own migrate step. On stock the migration"
            " lengthens the user data but takes the migrate command off the path; not with"
            " db_sg_open_public_ip or an ephemeral database, which the boot cannot reach yet"
            " (made)",
        ),
        Change(
            "F3",
            "TTL in the probe",
            "the probe's script moves the shutdown timer once the app answers; confirm-TTL keeps"
            " only its CreateTags (with F1 the probe is in the ready command too) (made)",
        ),
        Change(
            "F4",
            "agent poll 1 s",
            "wait-ready asks the SSM agent every second, not every poll_seconds (5 s) (made)",
        ),
        Change(
            "F5",
            "health beside the image check",
            "the in-place path asks the preview's health while the image check runs: the"
            " health command leaves the critical path (made)",
        ),
        Change(
            "F6",
            "no preflight in place",
            "the in-place path waits for the image check only: preflight's checks (AMI, subnet,"
            " groups, profile, RunInstances dry run) are about launching (made)",
        ),
        Change(
            "D1",
            "one deploy command",
            "the in-place path (a push, a claimed spare) sends one SSM command that pulls,"
            " migrates, swaps, probes and re-arms the timer, one stage line each; the flow shows"
            " each stage as its own task run from that output (made)",
        ),
        Change(
            "D2",
            "skip what has not changed",
            "no pull when the pinned digest is on the instance (`docker image inspect`); no"
            " migration container when the database stands at the image's alembic heads (its"
            " label, against `alembic current` in the running app container); the common push"
            " adds no revision (made)",
        ),
        Change(
            "D3",
            "start early",
            "as soon as the image check has the digest, the push path sends its preview a"
            " command that logs in and pulls it in the background (not waited for); the deploy"
            " command finds it present or joins the pull (made)",
        ),
        Change(
            "D4",
            "retire after the switch",
            "the deploy command ends once the proxy forwards to the new version; the old one's"
            " drain and stop run in the background, holding the deploy lock the next deploy waits"
            " for (made)",
        ),
        Change(
            "D5",
            "log in when refused",
            "a pull uses the login the instance holds (its boot's or the last push's) and logs in"
            " again only when the registry refuses it: no Parameter Store read and `docker login`"
            " on every push and claim (made)",
        ),
        Change(
            "S2",
            "claim beside preflight",
            "with warm spares the claim waits for the image check only; preflight, still running,"
            " is waited for when nothing was claimed: its checks are about launching (made)",
        ),
        Change(
            "S1",
            "spares hold base layers",
            "a spare's bootstrap pulls the default branch's image (spare_base_tag, default main,"
            " the tag deployments/github/build-image.yml pushes on every push to the default"
            " branch; or it boots from the baked AMI): a claim pulls only the top layers (made,"
            " default)",
        ),
    )
}


@dataclass(frozen=True)
class Leg:
    what: str
    seconds: float


@dataclass(frozen=True)
class Composition:
    """A path's critical path as modelled calls (the calls the flow makes; with fewer changes,
    the calls it made before them). The floor is their sum: every poll instant, no
    orchestration; preflight and other lookups before the first leg are left out."""

    title: str
    legs: tuple[Leg, ...]
    changes: tuple[str, ...] = ()

    @property
    def floor(self) -> float:
        return sum(leg.seconds for leg in self.legs)

    def describe(self) -> str:
        return " + ".join(f"{leg.what} {leg.seconds:.4g}" for leg in self.legs)


def new_launch(boot: BootProfile = STOCK, changes: tuple[str, ...] = ()) -> Composition:
    """A new PR's launch: RunInstances, the boot, wait-ready, migrate, probe.

    Without F1, wait-ready sends the agent ping, the bootstrap check and the port check one
    after another, each once its event happened; with F1 one command answers all three (and,
    with F2 and F3, probes the app migrated on boot and moves its timer)."""
    ssm, agent = SSM_COMMAND.seconds, SSM_AGENT_REGISTRATION.seconds
    last_event = max(agent, boot.bootstrap_seconds, boot.app_seconds)
    if "F1" in changes:
        ready = last_event + ssm
    else:
        ready = agent + ssm
        ready = max(ready, boot.bootstrap_seconds) + ssm
        ready = max(ready, boot.app_seconds) + ssm
    legs = [
        Leg("RunInstances", RUN_INSTANCES_API.seconds),
        Leg("pending→running", PENDING_TO_RUNNING.seconds),
        Leg(
            f"max(SSM agent {agent:g}, user data {boot.bootstrap_seconds:.4g},"
            f" app {boot.app_seconds:.4g})",
            last_event,
        ),
        Leg("wait-ready SSM after it", ready - last_event),
    ]
    if not boot.migrated:
        legs.append(Leg("migrate", ssm + MIGRATION.seconds))
    if "F1" in changes and "F3" in changes:
        legs.append(Leg("probe in the ready command", PROBE_CURL.seconds))
    else:
        legs.append(Leg("probe", ssm + PROBE_CURL.seconds))
    return Composition(f"new PR, {boot.name}", tuple(legs), changes)


@dataclass(frozen=True)
class DeployStages:
    """The one deploy command's stages (change D1), in modelled seconds."""

    pull: float
    migrate: float
    swap: float = SIDE_BY_SIDE_START.seconds
    probe: float = APP_START.seconds + PROBE_CURL.seconds
    switch: float = SWITCH.seconds

    @property
    def seconds(self) -> float:
        return self.pull + self.migrate + self.swap + self.probe + self.switch


def deploy_stages(
    *,
    layers: bool,
    present: bool = False,
    at_head: bool = False,
    app_running: bool = True,
    pull: float | None = None,
) -> DeployStages:
    """``present``: the pinned digest is on the instance (D2: only the inspect); ``at_head``:
    the database stands at the image's heads (D2: the label and ``alembic current``, no
    migration container); ``app_running``: an app container answers ``alembic current`` (a
    spare runs none: compose's exec fails at once, charged as one more inspect); ``pull``: the
    pull stage's time when known otherwise (the rest of an early pull, D3)."""
    if pull is None:
        pull = IMAGE_INSPECT.seconds
        if not present:  # with the login the instance holds (D5)
            pull += (IMAGE_PULL_CHANGED_LAYERS if layers else IMAGE_PULL_FULL).seconds
    # `alembic current` runs beside the pull: only what outlasts the pull is the migrate's.
    current = (ALEMBIC_CURRENT if app_running else IMAGE_INSPECT).seconds
    check = IMAGE_INSPECT.seconds + max(0.0, current - pull)
    return DeployStages(pull, check if at_head else check + MIGRATION.seconds)


def spare_claim(
    *, layers: bool, changes: tuple[str, ...] = ("D1", "D4", "D5", "S2")
) -> Composition:
    """A new PR claims a running, bootstrapped spare under the fleet lock (DescribeInstances,
    an SSM check that Docker answers, CreateTags), then deploys as a push does in place: with
    D1 one command (its database is new: the migration runs)."""
    ssm, api = SSM_COMMAND.seconds, OTHER_API_CALL.seconds
    legs = [
        Leg("claim: the AMI + DescribeInstances + CreateTags", 3 * api),
        Leg("spare check", ssm),
    ]
    if "D1" in changes:
        stages = deploy_stages(layers=layers, app_running=False)
        legs += [
            Leg("deploy command", ssm),
            Leg("pull", stages.pull),
            Leg("migrate", stages.migrate),
            Leg("swap", stages.swap),
            Leg("probe", stages.probe),
            Leg("switch", stages.switch),
        ]
    else:
        legs += [
            Leg("deploy", ssm + deploy_seconds(layers=layers)),
            Leg("migrate", ssm + MIGRATION.seconds),
            Leg("probe", ssm + PROBE_CURL.seconds),
        ]
    title = "new PR, warm spare" + (" with base layers" if layers else " without the image")
    return Composition(title, tuple(legs), changes)


def push_in_place(changes: tuple[str, ...] = ()) -> Composition:
    """A push to a PR whose preview is healthy: health, deploy, migrate, probe — with D1 one
    command for all but the health; with D2 the push adds no revision, so no migration
    container runs."""
    ssm = SSM_COMMAND.seconds
    legs = [] if "F5" in changes else [Leg("health", ssm)]
    if "D1" in changes:
        stages = deploy_stages(layers=True, at_head="D2" in changes)
        pull = Leg("pull", stages.pull)
        if "D3" in changes:  # sent beside the health check, one round trip before the deploy
            pulling = IMAGE_PULL_CHANGED_LAYERS.seconds  # the instance's own login (D5)
            rest = IMAGE_INSPECT.seconds + max(0.0, pulling - (0.0 if "F5" in changes else ssm))
            stages = deploy_stages(layers=True, at_head="D2" in changes, pull=rest)
            pull = Leg("rest of the early pull", rest)
        legs += [
            Leg("deploy command", ssm),
            pull,
            Leg("migrate" + (": at head" if "D2" in changes else ""), stages.migrate),
            Leg("swap", stages.swap),
            Leg("probe", stages.probe),
            Leg("switch", stages.switch),
        ]
    else:
        legs += [
            Leg("deploy", ssm + deploy_seconds()),
            Leg("migrate", ssm + MIGRATION.seconds),
            Leg("probe", ssm + PROBE_CURL.seconds),
        ]
    return Composition("push in place", tuple(legs), changes)


def _wake_legs() -> list[Leg]:
    """A sleeping preview started: the API, pending→running, the agent (its registration after
    running, the published low end; Docker has restarted the app well before), the re-arm."""
    return [
        Leg("StartInstances", START_INSTANCES_API.seconds),
        Leg("pending→running", PENDING_TO_RUNNING_AFTER_START.seconds),
        Leg("SSM agent after running", SSM_AGENT_REGISTRATION.seconds),
        Leg("re-arm the shutdown timer", SSM_COMMAND.seconds),
    ]


def wake_by_push() -> Composition:
    """A push to a sleeping preview: wake, probe, then the push in place."""
    legs = [*_wake_legs(), Leg("probe", SSM_COMMAND.seconds + PROBE_CURL.seconds)]
    return Composition("push wakes a sleeping preview", (*legs, *push_in_place().legs))


def wake_by_tunnel() -> Composition:
    """``pr-preview tunnel`` on a sleeping preview: wake, then port forwarding retried until
    Session Manager accepts, ~90 s after the start (the published refusal)."""
    legs = _wake_legs()
    woken = sum(leg.seconds for leg in legs) - START_INSTANCES_API.seconds
    refused = max(0.0, TUNNEL_REFUSED_AFTER_START.seconds - woken)
    legs += [
        Leg("TargetNotConnected until ~90 s after the start", refused),
        Leg("retry granularity (half an interval)", SESSION_RETRY.seconds / 2),
    ]
    return Composition("tunnel wakes a sleeping preview", tuple(legs))


# --- what sleeping saves a month (prices from tasks/app/cost.py)
WORK_WEEK_HOURS = 5 * 10.0  # weekdays 09:00–19:00: prefect.yaml's pr-sleep/pr-wake window
WEEK_HOURS = 7 * 24.0
IDLE_STOP_MINUTES = 30
REVIEW_PATTERN = (
    "ASSUMPTION (no published review-activity study found): per working day 3 reviews of"
    " 20 min and 4 pushes deployed in ~2 min, each followed by the idle window before the"
    " stop; 21.7 working days a month"
)
REVIEWS_PER_DAY, REVIEW_MINUTES, PUSHES_PER_DAY, PUSH_MINUTES = 3, 20, 4, 2
WORKING_DAYS_PER_MONTH = HOURS_PER_MONTH / WEEK_HOURS * 5


@dataclass(frozen=True)
class SleepPlan:
    name: str
    running_hours: float  # a month
    how: str


def sleep_plans(idle_minutes: int = IDLE_STOP_MINUTES) -> list[SleepPlan]:
    """One preview's running hours a month: always on, asleep nights and weekends, stopped
    after ``idle_minutes`` idle with the review pattern above."""
    scheduled = HOURS_PER_MONTH * WORK_WEEK_HOURS / WEEK_HOURS
    per_day = (
        REVIEWS_PER_DAY * (REVIEW_MINUTES + idle_minutes)
        + PUSHES_PER_DAY * (PUSH_MINUTES + idle_minutes)
    ) / 60
    return [
        SleepPlan("always on", HOURS_PER_MONTH, f"{HOURS_PER_MONTH} h"),
        SleepPlan(
            "asleep nights and weekends",
            scheduled,
            f"{WORK_WEEK_HOURS:g} of {WEEK_HOURS:g} h a week",
        ),
        SleepPlan(
            f"idle-stop at {idle_minutes} min",
            per_day * WORKING_DAYS_PER_MONTH,
            f"{per_day:.2f} h a working day × {WORKING_DAYS_PER_MONTH:.1f} days",
        ),
    ]


@dataclass(frozen=True)
class MonthlyCost:
    plan: SleepPlan
    instance_usd: float
    volume_usd: float

    @property
    def usd(self) -> float:
        return self.instance_usd + self.volume_usd


def monthly_costs(config: PreviewConfig, plans: list[SleepPlan]) -> list[MonthlyCost] | None:
    """Each plan's month: running hours at the instance price, stopped hours at the root
    volume's (tasks/app/cost.py); None without a price for the instance type."""
    price = hourly_price(config)
    if price is None:
        return None
    volume = volume_hourly_price(config.region)
    return [
        MonthlyCost(
            plan, plan.running_hours * price, (HOURS_PER_MONTH - plan.running_hours) * volume
        )
        for plan in plans
    ]


# --- what a lever costs a month (prices from tasks/app/cost.py)
BAKED_IMAGE_GB = 8.0
BAKED_IMAGE_GB_SOURCE = (
    "namecheap/ec2-github-runner#44: an AL2023 AMI maps an 8 GiB gp3 root volume; a snapshot"
    " bills the blocks it holds, so the volume's size is an upper bound"
)


@dataclass(frozen=True)
class LeverCost:
    usd: float | None  # None: no price for the instance type in the region
    how: str


def spare_cost(config: PreviewConfig, spares: int) -> LeverCost:
    """``spares`` running all month, whichever PR claims them (a claimed one is replaced)."""
    price = hourly_price(config)
    if price is None:
        return LeverCost(None, f"no price for {config.instance_type} in {config.region}")
    usd = spares * HOURS_PER_MONTH * price
    return LeverCost(usd, f"{spares} × {HOURS_PER_MONTH} h × ${price:g}/h = {format_usd(usd)}")


def baked_cost(images_kept: int, gigabytes: float = BAKED_IMAGE_GB) -> LeverCost:
    """The snapshots of the baked images kept (``baked_images_kept``)."""
    usd = images_kept * gigabytes * SNAPSHOT_GB_MONTH
    return LeverCost(
        usd,
        f"{images_kept} × {gigabytes:g} GB × ${SNAPSHOT_GB_MONTH:g}/GB = {format_usd(usd)}",
    )


def _still_running(operation: str, parsed: dict[str, Any]) -> bool:
    """A GetCommandInvocation that found the command not done (or not yet visible)."""
    if operation != "GetCommandInvocation":
        return False
    code = parsed.get("Error", {}).get("Code")
    return code == "InvocationDoesNotExist" or parsed.get("Status") in ("Pending", "InProgress")


@dataclass
class Timeline:
    """Modelled moments of one instance, on the world's clock (:meth:`World.now`)."""

    running_at: float = float("-inf")
    agent_at: float = float("-inf")
    bootstrap_at: float = float("-inf")
    app_at: float = float("-inf")
    terminated_at: float | None = None
    layers: bool = True  # the image's base layers are on disk: a deploy pulls the changed ones
    at_head: bool = True  # the database stands at the app's heads: a push adds no revision
    pulled_at: float | None = None  # an early pull (change D3) has the image here from then on
    migrated: bool = False  # the boot migrated the image .env names (until a deploy rewrites it)


@dataclass
class World:
    """The instances' timelines plus what the run spent inside moto (emulation artefact).

    The timelines run on a clock that stops while moto answers (:meth:`now`): the bench takes
    moto's time out of wall time, so a boot or an SSM command must not advance meanwhile, or
    every poll that waits on it would shorten the wait it is part of."""

    scale: float
    boot: BootProfile = STOCK  # how an instance launched in this world boots …
    images: dict[str, BootProfile] = field(default_factory=dict)  # … unless its AMI says otherwise
    instances: dict[str, Timeline] = field(default_factory=dict)
    moto_seconds: float = 0.0
    moto_until: float = float("-inf")  # the end of the last moto answer taken out
    overlapped_seconds: float = 0.0  # moto's time inside a running command: not taken out
    api_calls: int = 0
    events: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def s(self, seconds: float) -> float:
        """Modelled seconds → wall seconds."""
        return seconds * self.scale

    def booted(self, instance_id: str, *, layers: bool = True, at_head: bool = True) -> None:
        """An instance that was up long before the run: the PR's current preview, or a warm
        spare (``layers=False`` when its bootstrap pulled no image; ``at_head=False``: its
        database is new, the deploy migrates)."""
        self.instances[instance_id] = Timeline(layers=layers, at_head=at_head)

    def launched(self, instance_id: str, at: float, image_id: str = "") -> None:
        running = at + self.s(PENDING_TO_RUNNING.seconds)
        boot = self.images.get(image_id, self.boot)
        self.instances[instance_id] = Timeline(
            running_at=running,
            agent_at=running + self.s(SSM_AGENT_REGISTRATION.seconds),
            bootstrap_at=running + self.s(boot.bootstrap_seconds),
            app_at=running + self.s(boot.app_seconds),
            migrated=boot.migrated,
        )
        self.events.append((time.monotonic(), f"launched {instance_id}"))

    def terminating(self, instance_id: str, at: float) -> None:
        timeline = self.instances.setdefault(instance_id, Timeline())
        if timeline.terminated_at is None:
            timeline.terminated_at = at + self.s(SHUTTING_DOWN_TO_TERMINATED.seconds)
            self.events.append((time.monotonic(), f"terminating {instance_id}"))

    def timeline(self, instance_id: str) -> Timeline:
        return self.instances.get(instance_id) or Timeline()

    def agent_online(self, instance_id: str) -> bool:
        return self.now() >= self.timeline(instance_id).agent_at

    def now(self) -> float:
        """The model's clock: wall time less the time moto has spent on the run's path."""
        return self.at(time.monotonic())

    def at(self, moment: float) -> float:
        """A ``time.monotonic()`` moment of now, on the model's clock."""
        return moment - self.moto_seconds


class LatencyModel:
    """Installs the botocore handlers and the SSM rules once; ``world`` is swapped per run."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.world = World(scale)
        self.fake: ScriptedInstances | None = None

    def new_world(self, boot: BootProfile = STOCK) -> World:
        self.world = World(self.scale, boot)
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
        wall = time.monotonic()
        started = context.get("latency_model_started")
        with world.lock:
            # A read of a command still running overlapped the command's own (wall) time on
            # the scripted instance: taking it out would shorten the command.
            if started is None:
                pass
            elif _still_running(model.name, parsed):
                world.overlapped_seconds += wall - started
            else:
                # Calls answered at once (preflight's beside a claim) are taken out once: only
                # what this call adds past the last one's end (an undercount, never an over).
                world.moto_seconds += max(0.0, wall - max(started, world.moto_until))
                world.moto_until = max(world.moto_until, wall)
            world.api_calls += 1
        now = world.at(wall)
        if model.name == "RunInstances":
            for instance in parsed.get("Instances", []):
                world.launched(instance["InstanceId"], now, instance.get("ImageId", ""))
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
            done = self.world.at(call.at) >= self.world.timeline(call.instance_id).bootstrap_at
            return reply("bootstrap-done\n" if done else "bootstrap-pending\n")

        def port(call: Call) -> Reply:
            if self.world.at(call.at) >= self.world.timeline(call.instance_id).app_at:
                return reply("APP PORT OPEN 8000\n")
            return reply("APP PORT CLOSED 8000\n", exit_code=1)

        def probe(call: Call) -> Reply:
            up = self.world.at(call.at) >= self.world.timeline(call.instance_id).app_at
            answer = probe_reply(200 if up else 0, call.command)
            return Reply(
                stdout=answer.stdout,
                stderr=answer.stderr,
                exit_code=answer.exit_code,
                seconds=rtt + PROBE_CURL.seconds * self.scale,
                missing_reads=1,
            )

        def health(call: Call) -> Reply:
            if self.world.at(call.at) >= self.world.timeline(call.instance_id).app_at:
                return reply("healthy\n")
            return reply("app port 8000 closed\n", exit_code=1)

        def deploy(call: Call) -> Reply:
            """The one deploy command (D1): its stages' lines, its stages' time."""
            timeline = self.world.timeline(call.instance_id)
            at_head = timeline.at_head
            stages = deploy_stages(
                layers=timeline.layers, at_head=timeline.at_head, app_running=timeline.at_head
            )
            if timeline.pulled_at is not None:  # the early pull: wait for its rest, if any
                rest = max(0.0, timeline.pulled_at - self.world.at(call.at)) / self.scale
                stages = deploy_stages(
                    layers=True,
                    at_head=at_head,
                    app_running=at_head,
                    pull=IMAGE_INSPECT.seconds + rest,
                )
                timeline.pulled_at = None
            timeline.app_at = self.world.at(call.at) + self.scale * stages.seconds
            timeline.layers, timeline.migrated, timeline.at_head = True, False, True
            self.world.instances[call.instance_id] = timeline
            moved = 'stage ttl ok "$started"' in call.command  # given the ready TTL
            ttl = "ok 0.000 shutdown timer moved" if moved else "skipped 0.000"
            lines = [
                f"pr-preview-stage pull ok {stages.pull:.3f}",
                f"pr-preview-stage migrate {'skipped' if at_head else 'ok'} {stages.migrate:.3f}",
                f"pr-preview-stage swap ok {stages.swap:.3f}",
                f"pr-preview-stage probe ok {stages.probe:.3f} /healthz 200 0.004",
                f"pr-preview-stage switch ok {stages.switch:.3f}",
                f"pr-preview-stage ttl {ttl}",
            ]
            return reply("\n".join(lines) + "\n", stages.seconds)

        def migrated(call: Call) -> Reply:
            timeline = self.world.timeline(call.instance_id)
            done = self.world.at(call.at) >= timeline.bootstrap_at
            return reply(f"{MIGRATED_LINE}\n" if timeline.migrated and done else "")

        # Every command costs its round trip, scripted or not (the shutdown timer, the spare
        # check, compose's view of the app's container); wait-ready's one command costs one
        # round trip plus its probe's curl (the scripted instance runs its checks together).
        fake.default = reply()
        fake.respond(BOOTSTRAP_CHECK, bootstrap)
        fake.respond(MIGRATED_CHECK, migrated)
        fake.respond(PORT_CHECK, port)
        fake.respond(PROBE, probe)
        fake.respond(HEALTH, health)

        def early_pull(call: Call) -> Reply:
            """D3: the pull runs on the instance after the command answered."""
            timeline = self.world.timeline(call.instance_id)
            pull = IMAGE_PULL_CHANGED_LAYERS if timeline.layers else IMAGE_PULL_FULL
            seconds = SSM_COMMAND.seconds + REGISTRY_LOGIN.seconds + pull.seconds
            timeline.pulled_at = self.world.at(call.at) + self.scale * seconds
            self.world.instances[call.instance_id] = timeline
            return reply("started\n")

        fake.respond(DEPLOY_COMMAND, deploy)
        fake.respond(EARLY_PULL, early_pull)
        fake.on(
            MIGRATE, reply("INFO  [alembic.runtime.migration] Running upgrade\n", MIGRATION.seconds)
        )
        return fake

    def agent_offline_until_registered(self, fake: ScriptedInstances, instance_id: str) -> None:
        world = self.world
        fake.agent_offline(instance_id, until=lambda: world.agent_online(instance_id))
