"""Wait until a preview is ready, in the order a person would check it (runbook §0, §2.6).

1. ``instance-running``: EC2 says running (botocore's ``instance_running`` waiter).
2. ``ssm-agent``: the SSM agent runs a command (moto has no ``DescribeInstanceInformation``,
   and a command that succeeds is the stronger proof anyway). Until it registers AWS refuses
   SendCommand, and asking costs one API call: it is asked every second (``AGENT_POLL_SECONDS``),
   not every ``poll_seconds`` — the agent is the last thing a baked instance waits for.
3. ``bootstrap``: the user data wrote ``bootstrap-done``; ``bootstrap-failed`` fails at once
   with the step it names.
4. ``app-port``: something accepts connections on the app port (``/dev/tcp``, no nc needed);
   while it does not, compose says what the app's container is doing, and a container down
   (exited, restarting) for ``app_down_seconds`` ends the wait: an app that crashes on start
   will not open its port by waiting for it.

Stages 2–4 are one SSM command (:func:`ready_command`), sent again until it says ready: its
first answer proves the agent, and each line it prints starts with a marker the parser looks
for (:func:`parse_ready`). The same command says whether the user data migrated on boot the
image the instance runs (``tasks/app/user_data.py``), and — asked with ``ready_ttl_minutes``
— once it did and the port is open, it probes the app and moves the shutdown timer as the probe step
would: the flow then skips its migrate and probe steps.

Each stage has its own timeout and the whole wait is bounded by ``ready_timeout_seconds``;
a timeout names its stage, so the failure message and the diagnosis start in the right place.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError, WaiterError
from tenacity import RetryCallState, Retrying, retry_if_result

from tasks.cloud.aws import AwsClients, gave_up, wait_timed
from tasks.cloud.on_instance import (
    APP_STATE_PREFIX,
    BOOTSTRAP_CHECK,
    FAILED_PREFIX,
    MIGRATED,
    PATH_SAYS_NOTHING_CASE,
    ProbeAnswer,
    ProbeResult,
    app_state_check,
    parse_answer,
    port_check,
    probe_command,
)
from tasks.cloud.ssm import CommandTimeout, agent_not_registered, run_command
from tasks.config import PreviewConfig
from tasks.run.budget import check_budget
from tasks.run.budget import remaining as run_budget_left
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

STAGE_RUNNING = "instance-running"
STAGE_AGENT = "ssm-agent"
STAGE_BOOTSTRAP = "bootstrap"
STAGE_APP_PORT = "app-port"
STAGES = (STAGE_RUNNING, STAGE_AGENT, STAGE_BOOTSTRAP, STAGE_APP_PORT)


class ReadyError(PreviewError):
    """The preview did not become ready; ``stage`` says where it stopped."""

    def __init__(self, stage: str, message: str, detail: str = "") -> None:
        self.stage = stage
        self.detail = detail
        super().__init__(message)


class ReadyTimeout(ReadyError):
    """A stage did not finish within its timeout."""

    def __init__(self, stage: str, timeout_seconds: float, detail: str = "") -> None:
        self.timeout_seconds = timeout_seconds
        message = f"wait-ready stage {stage!r} did not finish within {timeout_seconds:g}s"
        super().__init__(stage, f"{message}: {detail}" if detail else message, detail)


class BootstrapFailed(ReadyError):
    """The user data gave up; ``step`` is what its bootstrap-failed marker says."""

    def __init__(self, step: str) -> None:
        self.step = step
        super().__init__(STAGE_BOOTSTRAP, f"{FAILED_PREFIX}{step}", step)


class AppDown(ReadyError):
    """The app's container stayed down (exited, or restarting by its restart policy) and the
    app answered nothing on its port."""

    def __init__(self, state: str, seconds: float, port: int) -> None:
        self.state = state
        message = (
            f"the app's container has been {state} for {seconds:.0f}s and the app answers"
            f" nothing on 127.0.0.1:{port}: the app exits on start (its logs are in the"
            " diagnosis)"
        )
        super().__init__(STAGE_APP_PORT, message, state)


# What compose calls a container that is not serving and not about to: a crash-looping
# container with a restart policy shows "restarting", one without "exited".
DOWN_STATES = frozenset({"exited", "dead", "restarting"})
# Restarted this often by its restart policy, the app is crash-looping even while "running".
CRASH_LOOP_RESTARTS = 2


def app_down(state: str | None, last_exit: str | None = None) -> str | None:
    """How the app's container is down (``restarting (exit code 1, restarted 3 times)``), from
    ``<status> <exit code> <restarts>``; None while it is not (or nobody can say).

    A crash-looping container caught between two restarts is ``running`` with exit code 0:
    Docker clears the code when it starts the container again. ``last_exit``, the code an
    earlier look saw while it was down, is the one to tell; without one, none is told."""
    words = (state or "").split()
    if not words:
        return None
    status = words[0]
    code: str | None = words[1] if len(words) > 1 else "?"
    restarts = int(words[2]) if len(words) > 2 and words[2].isdigit() else 0
    if status not in DOWN_STATES and restarts < CRASH_LOOP_RESTARTS:
        return None
    if status == "running":
        code = last_exit
    shown = "restarting" if restarts >= CRASH_LOOP_RESTARTS else status
    again = f"restarted {restarts} times" if restarts else ""
    told = [f"exit code {code}"] if code is not None else []
    return f"{shown} ({', '.join([*told, again] if again else told) or 'down'})"


def exit_seen(state: str | None, last_exit: str | None) -> str | None:
    """The exit code ``state`` shows of a container that is down, else ``last_exit``."""
    words = (state or "").split()
    return words[1] if len(words) > 1 and words[0] in DOWN_STATES else last_exit


class InstanceNotRunning(ReadyError):
    """The instance went to a state it will not come back from (stopping, terminated)."""

    def __init__(self, detail: str) -> None:
        super().__init__(STAGE_RUNNING, f"instance will not reach running: {detail}", detail)


@dataclass(frozen=True)
class StageTimeouts:
    """One timeout per stage; by default each may use the whole ``ready_timeout_seconds``."""

    instance_running: float
    ssm_agent: float
    bootstrap: float
    app_port: float

    @classmethod
    def from_config(cls, settings: PreviewConfig, **overrides: float) -> StageTimeouts:
        budget = settings.ready_timeout_seconds
        values = dict.fromkeys(("instance_running", "ssm_agent", "bootstrap", "app_port"), budget)
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class StageResult:
    stage: str
    seconds: float
    polls: int


@dataclass(frozen=True)
class ReadyResult:
    instance_id: str
    seconds: float
    stages: list[StageResult] = field(default_factory=list)
    migrated: bool = False  # the user data migrated the image the instance runs (on boot)
    probe: ProbeResult | None = None  # the ready command's healthy probe (the timer moved)


AGENT_POLL_SECONDS = 1.0  # how often to ask an agent that has not registered (capped by poll)

READY_MARKER = "# pr-preview-ready"
SECTION = f"{READY_MARKER}: "  # a function of the command begins; the scripted instance reads it
MIGRATED_LINE = "MIGRATED ON BOOT"
PROBE_PREFIX = "PROBE "
BOOTSTRAP_STATES = {
    "bootstrap-done": "done",
    "bootstrap-failed": "failed",
    "bootstrap-pending": "pending",
}


def _function(
    name: str, section: str, lines: Sequence[str], *, subshell: bool = False
) -> list[str]:
    """A shell function holding ``lines``; a subshell body keeps their ``exit`` inside it."""
    opened, closed = ("(", ")") if subshell else ("{", "}")
    return [f"{SECTION}{section}", f"{name}() {opened}", *(f"  {line}" for line in lines), closed]


def ready_command(settings: PreviewConfig, ready_ttl_minutes: int | None = None) -> list[str]:
    """Wait-ready's one command: the bootstrap marker, then — once bootstrapped — whether the
    boot migrated the image in ``.env``, the app port, and compose's view of the app while the
    port is closed. With ``ready_ttl_minutes``, an instance migrated on boot whose port is open
    is probed (each of ``probe_paths`` until one answers 2xx/3xx, which moves the shutdown
    timer to ``ready_ttl_minutes``). Always exits 0: the answer is in the marked lines."""
    env_file = shlex.quote(f"{settings.app_dir}/.env")
    lines = [
        f"{READY_MARKER} (wait-ready: bootstrap, migrated on boot, app port, probe)",
        *_function("bootstrap_state", "bootstrap", BOOTSTRAP_CHECK),
        *_function(
            "migrated_on_boot",
            "migrated",
            [
                f"marker=$(cat {MIGRATED} 2>/dev/null) || marker=''",
                f"running=$(cat {env_file} 2>/dev/null) || running=''",
                'if [ -n "$marker" ] && [ "$marker" = "$running" ]; then',
                f"  echo {shlex.quote(MIGRATED_LINE)}",
                "fi",
            ],
        ),
        *_function("app_port", "app-port", port_check(settings.app_port), subshell=True),
        *_function(
            "app_state", "app-state", app_state_check(settings.app_dir, settings.app_service)
        ),
    ]
    paths = list(settings.probe_paths) if ready_ttl_minutes is not None else []
    for index, path in enumerate(paths):
        probe = probe_command(settings.app_port, path, ready_ttl_minutes)
        lines += _function(f"probe_{index}", f"probe {path}", probe, subshell=True)
    lines += [
        f"{SECTION}run",
        "state=$(bootstrap_state)",
        'echo "$state"',
        "if [ \"${state%%$'\\n'*}\" != bootstrap-done ]; then exit 0; fi",
        "migrated=$(migrated_on_boot)",
        'if [ -n "$migrated" ]; then echo "$migrated"; fi',
        "if ! app_port; then",
        "  app_state",
        "  exit 0",
        "fi",
        'if [ -z "$migrated" ]; then exit 0; fi',
    ]
    for index, path in enumerate(paths):
        lines += [
            f"answer=$(probe_{index} 2>/dev/null) || true",
            f"printf '{PROBE_PREFIX}%s %s\\n' {shlex.quote(path)}" + " \"${answer//$'\\n'/ }\"",
            # A path the app answers about its health decides (ProbeAnswer.decisive).
            'case "$answer" in [23][0-9][0-9]\\ *) exit 0 ;;'
            f" {PATH_SAYS_NOTHING_CASE}) ;; *) app_state; exit 0 ;; esac",
        ]
    if paths:  # no path answered healthy: is the app up, or crash-looping behind the proxy?
        lines.append("app_state")
    return [*lines, "exit 0"]


@dataclass(frozen=True)
class ReadyAnswer:
    """What one ready command found; ``None`` where it did not look."""

    bootstrap: str  # done, failed, pending, or "" (no marker: the command did not run through)
    failed_step: str = ""
    migrated: bool = False
    port_open: bool | None = None
    app_state: str | None = None  # "exited 1", "running 0", … (None: compose could not say)
    probes: tuple[ProbeAnswer, ...] = ()

    @property
    def starting(self) -> bool:
        """Probed, and no path gave any HTTP answer: the port accepts (Docker's port proxy
        does as soon as the container starts) but the app is not serving yet."""
        return bool(self.probes) and all(probe.status_code == 0 for probe in self.probes)

    @property
    def healthy_probe(self) -> ProbeAnswer | None:
        return self.probes[-1] if self.probes and self.probes[-1].healthy else None


def parse_ready(stdout: str, probe_paths: Sequence[str]) -> ReadyAnswer:
    """The ready command's marked lines; anything else it printed is ignored."""
    bootstrap, step_name, migrated = "", "", False
    port_open: bool | None = None
    app_state: str | None = None
    probes: list[ProbeAnswer] = []
    for raw in stdout.splitlines():
        line = raw.strip()
        if line in BOOTSTRAP_STATES and not bootstrap:
            bootstrap = BOOTSTRAP_STATES[line]
        elif line.startswith(FAILED_PREFIX) and not step_name:
            step_name = line.removeprefix(FAILED_PREFIX).strip()
        elif line == MIGRATED_LINE:
            migrated = True
        elif line.startswith("APP PORT OPEN"):
            port_open = True
        elif line.startswith("APP PORT CLOSED"):
            port_open = False
        elif line.startswith(APP_STATE_PREFIX):
            state = line.removeprefix(APP_STATE_PREFIX).strip()
            app_state = None if state in ("", "unknown") else state
        elif line.startswith(PROBE_PREFIX):
            rest = line.removeprefix(PROBE_PREFIX)
            path = next((p for p in probe_paths if rest == p or rest.startswith(f"{p} ")), None)
            if path is not None:
                probes.append(parse_answer(path, rest[len(path) :], ""))
    return ReadyAnswer(bootstrap, step_name, migrated, port_open, app_state, tuple(probes))


def _stage_key(stage: str) -> str:
    return {
        STAGE_RUNNING: "instance_running",
        STAGE_AGENT: "ssm_agent",
        STAGE_BOOTSTRAP: "bootstrap",
        STAGE_APP_PORT: "app_port",
    }[stage]


def wait_running(
    ec2: EC2Client, instance_id: str, *, timeout_seconds: float, poll_seconds: float
) -> int:
    """botocore's ``instance_running`` waiter with our timing; returns the attempts it took."""
    try:
        wait_timed(
            ec2.get_waiter("instance_running"),
            InstanceIds=[instance_id],
            timeout_seconds=timeout_seconds,
            poll_seconds=poll_seconds,
        )
    except WaiterError as exc:
        if gave_up(exc):
            state = _state_of(exc.last_response)
            raise ReadyTimeout(STAGE_RUNNING, timeout_seconds, f"instance is {state}") from None
        raise InstanceNotRunning(f"{instance_id} is {_state_of(exc.last_response)}") from None
    return 1


def _state_of(response: object) -> str:
    try:
        reservations = response["Reservations"]  # type: ignore[index]
        return str(reservations[0]["Instances"][0]["State"]["Name"])
    except (KeyError, IndexError, TypeError):
        return "unknown"


def wait_until_ready(
    ec2: EC2Client,
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    timeouts: StageTimeouts | None = None,
    ready_ttl_minutes: int | None = None,
    command_timeout_seconds: float = 60.0,
    command_poll_seconds: float | None = None,
) -> ReadyResult:
    """Block until ``instance_id`` passes every stage, or raise the ``ReadyError`` of the first
    stage that did not.

    ``ready_ttl_minutes``: the ready command also probes an instance migrated on boot (see
    :func:`ready_command`). ``command_poll_seconds`` is how often one SSM command's outcome is
    read (default: ``poll_seconds`` capped at 0.5 s: a check takes about a second on AWS, and
    each read interval adds to the lag); ``poll_seconds`` is how often a stage looks again,
    ``AGENT_POLL_SECONDS`` (at most ``poll_seconds``) while the agent has not answered.
    """
    timeouts = timeouts or StageTimeouts.from_config(settings)
    poll = settings.poll_seconds
    command_poll = command_poll_seconds if command_poll_seconds is not None else min(poll, 0.5)
    started = time.monotonic()
    deadline = started + settings.ready_timeout_seconds
    # The run's own budget ends the wait too, here rather than by Prefect's task timeout, which
    # cannot always interrupt a step (a step on a thread, or beside another alarm handler).
    left = run_budget_left()
    if left is not None:
        deadline = min(deadline, started + max(left, 0.0))
    results: list[StageResult] = []

    def budget(stage: str) -> float:
        limit = float(getattr(timeouts, _stage_key(stage)))
        return max(0.0, min(limit, deadline - time.monotonic()))

    # 1. running
    stage_start = time.monotonic()
    limit = budget(STAGE_RUNNING)
    polls = wait_running(ec2, instance_id, timeout_seconds=limit, poll_seconds=poll)
    results.append(StageResult(STAGE_RUNNING, time.monotonic() - stage_start, polls))

    # 2.–4. one command, asked again until it says the agent, the bootstrap and the port are done
    commands = ready_command(settings, ready_ttl_minutes)
    stage, stage_start, limit, polls = STAGE_AGENT, time.monotonic(), budget(STAGE_AGENT), 0
    detail = ""
    down_since: float | None = None
    last_exit: str | None = None  # the app container's exit code, last seen while it was down
    ready: list[ReadyAnswer] = []

    def enter(next_stage: str, now: float) -> None:
        """``stage`` passed with this poll, which already looked at ``next_stage``."""
        nonlocal stage, stage_start, limit, polls
        results.append(StageResult(stage, now - stage_start, polls))
        stage, stage_start, limit, polls = next_stage, now, budget(next_stage), 1

    def ask() -> tuple[ReadyAnswer | None, str]:
        remaining = max(0.0, stage_start + limit - time.monotonic())
        try:
            result = run_command(
                ssm,
                instance_id,
                commands,
                timeout_seconds=min(command_timeout_seconds, remaining),
                poll_seconds=command_poll,
                comment="pr-preview wait-ready",
            )
        except ClientError as exc:
            # Before the agent registers, AWS refuses SendCommand: "not yet", like a timeout.
            if agent_not_registered(exc):
                return None, "the SSM agent does not answer yet"
            raise
        except CommandTimeout as exc:
            return None, str(exc) if stage != STAGE_AGENT else "the SSM agent does not answer yet"
        answer = parse_ready(result.stdout, settings.probe_paths)
        if not answer.bootstrap and not result.ok:
            return answer, f"the ready check exited {result.exit_code}"
        return answer, ""

    def attempt() -> bool:
        nonlocal polls, detail, down_since, last_exit
        polls += 1
        answer, detail = ask()
        now = time.monotonic()
        if answer is None:
            return False
        if stage == STAGE_AGENT:
            enter(STAGE_BOOTSTRAP, now)
        if stage == STAGE_BOOTSTRAP:
            if answer.bootstrap == "failed":
                raise BootstrapFailed(answer.failed_step or "unknown")
            if answer.bootstrap != "done":
                detail = detail or "bootstrap still running (no marker yet)"
                return False
            enter(STAGE_APP_PORT, now)
        if answer.port_open and not answer.starting:
            ready.append(answer)
            return True
        if answer.port_open:
            # Docker's port proxy accepts before the app listens (and between its restarts).
            waiting = (
                f"127.0.0.1:{settings.app_port} accepts connections (Docker's port proxy) but"
                " the app gives no HTTP answer"
            )
        else:
            waiting = f"nothing accepts connections on 127.0.0.1:{settings.app_port}"
        last_exit = exit_seen(answer.app_state, last_exit)
        down = app_down(answer.app_state, last_exit)
        if down is None:
            down_since, detail = None, waiting
            return False
        down_since = now if down_since is None else down_since
        if now - down_since >= settings.app_down_seconds:
            raise AppDown(down, now - down_since, settings.app_port)
        detail = f"{waiting}; the app's container is {down}"
        return False

    def expired(_: RetryCallState) -> bool:
        return time.monotonic() - stage_start >= limit

    def interval(_: RetryCallState) -> float:
        every = min(poll, AGENT_POLL_SECONDS) if stage == STAGE_AGENT else poll
        return max(0.0, min(every, stage_start + limit - time.monotonic()))

    def give_up(_: RetryCallState) -> bool:
        check_budget("wait-ready")  # RunTimedOut when it was the run's budget that ran out
        raise ReadyTimeout(stage, limit, detail)

    Retrying(
        stop=expired,
        wait=interval,
        retry=retry_if_result(lambda done: not done),
        retry_error_callback=give_up,
    )(attempt)
    results.append(StageResult(stage, time.monotonic() - stage_start, polls))

    [answer] = ready
    healthy = answer.healthy_probe
    probed = None
    if healthy is not None:
        probed = ProbeResult(
            instance_id=instance_id,
            path=healthy.path,
            status_code=healthy.status_code,
            latency_seconds=healthy.latency_seconds,
            attempts=1,
            answers=list(answer.probes),
            timer_moved=healthy.timer_moved,
        )
    return ReadyResult(
        instance_id, time.monotonic() - started, results, migrated=answer.migrated, probe=probed
    )


@step
def wait_ready(
    clients: AwsClients,
    settings: PreviewConfig,
    instance_id: str,
    timeouts: StageTimeouts | None = None,
    ready_ttl_minutes: int | None = None,
) -> ReadyResult:
    """Prefect wrapper: a ``ReadyError`` is not retried (it is the world's answer)."""
    result = wait_until_ready(
        clients.ec2,
        clients.ssm,
        settings,
        instance_id,
        timeouts=timeouts,
        ready_ttl_minutes=ready_ttl_minutes,
    )
    extra = [
        "migrated on boot" if result.migrated else "not migrated on boot: the migrate step runs",
    ]
    if result.probe is not None:
        extra.append(f"{result.probe.path} answered {result.probe.status_code}")
    run_logger(logger).info(
        "%s ready in %.1fs (%s); %s",
        instance_id,
        result.seconds,
        ", ".join(f"{stage.stage} {stage.seconds:.1f}s/{stage.polls}" for stage in result.stages),
        "; ".join(extra),
    )
    return result
