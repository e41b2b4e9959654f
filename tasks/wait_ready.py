"""Wait until a preview is ready, in the order a person would check it (runbook §0, §2.6).

1. ``instance-running``: EC2 says running (botocore's ``instance_running`` waiter).
2. ``ssm-agent``: the SSM agent runs a no-op command (a seam: moto has no
   ``DescribeInstanceInformation``, and a command that succeeds is the stronger proof anyway).
3. ``bootstrap``: the user data wrote ``bootstrap-done``; ``bootstrap-failed`` fails at once
   with the step it names.
4. ``app-port``: something accepts connections on the app port (``/dev/tcp``, no nc needed);
   while it does not, compose says what the app's container is doing, and a container down
   (exited, restarting) for ``app_down_seconds`` ends the wait: an app that crashes on start
   will not open its port by waiting for it.

Each stage has its own timeout and the whole wait is bounded by ``ready_timeout_seconds``;
a timeout names its stage, so the failure message and the diagnosis start in the right place.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from botocore.exceptions import ClientError, WaiterError
from tenacity import Retrying, retry_if_result, stop_after_delay

from tasks.aws import AwsClients
from tasks.config import PreviewConfig
from tasks.on_instance import (
    AGENT_PING,
    APP_STATE_PREFIX,
    BOOTSTRAP_CHECK,
    FAILED_PREFIX,
    app_state_check,
    port_check,
)
from tasks.prefect_context import run_logger
from tasks.retry import error_code
from tasks.ssm import CommandResult, CommandTimeout, poll_wait, run_command
from tasks.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

STAGE_RUNNING = "instance-running"
STAGE_AGENT = "ssm-agent"
STAGE_BOOTSTRAP = "bootstrap"
STAGE_APP_PORT = "app-port"
STAGES = (STAGE_RUNNING, STAGE_AGENT, STAGE_BOOTSTRAP, STAGE_APP_PORT)


class ReadyError(Exception):
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
    """The app's container stayed down (exited or restarting) with its port closed."""

    def __init__(self, state: str, seconds: float, port: int) -> None:
        self.state = state
        message = (
            f"the app's container has been {state} for {seconds:.0f}s and nothing accepts"
            f" connections on 127.0.0.1:{port}: the app exits on start (its logs are in the"
            " diagnosis)"
        )
        super().__init__(STAGE_APP_PORT, message, state)


# What compose calls a container that is not serving and not about to: a crash-looping
# container with a restart policy shows "restarting", one without "exited".
DOWN_STATES = frozenset({"exited", "dead", "restarting"})


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
    def from_config(cls, config: PreviewConfig, **overrides: float) -> StageTimeouts:
        budget = config.ready_timeout_seconds
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


class AgentCheck(Protocol):
    """Does the SSM agent on ``instance_id`` answer? False means "not yet", never raises for it."""

    def __call__(
        self, ssm: SSMClient, instance_id: str, *, timeout_seconds: float, poll_seconds: float
    ) -> bool: ...


NOT_REGISTERED_CODES = frozenset({"InvalidInstanceId"})


def agent_answers_command(
    ssm: SSMClient, instance_id: str, *, timeout_seconds: float, poll_seconds: float
) -> bool:
    """The agent answers when a no-op command succeeds. Before the agent registers, AWS
    refuses SendCommand with ``InvalidInstanceId``; that is "not yet", like a timeout."""
    try:
        result = run_command(
            ssm,
            instance_id,
            [AGENT_PING],
            timeout_seconds=timeout_seconds,
            poll_seconds=poll_seconds,
            comment="pr-preview wait-ready: agent",
        )
    except ClientError as exc:
        if error_code(exc) in NOT_REGISTERED_CODES:
            return False
        raise
    except CommandTimeout:
        return False
    return result.ok


def _stage_key(stage: str) -> str:
    return {
        STAGE_RUNNING: "instance_running",
        STAGE_AGENT: "ssm_agent",
        STAGE_BOOTSTRAP: "bootstrap",
        STAGE_APP_PORT: "app_port",
    }[stage]


def _poll(
    stage: str,
    check: Callable[[], tuple[bool, str]],
    *,
    timeout_seconds: float,
    poll_seconds: float,
) -> int:
    """Call ``check`` every ``poll_seconds`` until it says done; returns the number of polls."""
    polls = 0
    last_detail = ""

    def attempt() -> bool:
        nonlocal polls, last_detail
        polls += 1
        done, last_detail = check()
        return done

    def give_up(_: object) -> bool:
        raise ReadyTimeout(stage, timeout_seconds, last_detail)

    Retrying(
        stop=stop_after_delay(timeout_seconds),
        wait=poll_wait(poll_seconds, timeout_seconds),
        retry=retry_if_result(lambda done: not done),
        retry_error_callback=give_up,
    )(attempt)
    return polls


def wait_running(
    ec2: EC2Client, instance_id: str, *, timeout_seconds: float, poll_seconds: float
) -> int:
    """botocore's ``instance_running`` waiter with our timing; returns the attempts it took."""
    delay = max(poll_seconds, 0.0)
    attempts = max(1, math.ceil(timeout_seconds / delay) + 1) if delay else 1
    try:
        ec2.get_waiter("instance_running").wait(
            InstanceIds=[instance_id],
            # botocore sleeps Delay as given; the stubs say int, tests need fractions of a second
            WaiterConfig={"Delay": delay, "MaxAttempts": attempts},  # type: ignore[typeddict-item]
        )
    except WaiterError as exc:
        reason = str(exc.kwargs.get("reason", exc))
        if "Max attempts exceeded" in reason:
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
    instance_id: str,
    config: PreviewConfig,
    *,
    timeouts: StageTimeouts | None = None,
    agent_check: AgentCheck = agent_answers_command,
    command_timeout_seconds: float = 60.0,
    command_poll_seconds: float | None = None,
) -> ReadyResult:
    """Block until ``instance_id`` passes every stage, or raise the ``ReadyError`` of the first
    stage that did not.

    ``command_poll_seconds`` is how often one SSM command's outcome is read (default:
    ``poll_seconds`` capped at 0.5 s: a check takes about a second on AWS, and each read
    interval adds to the lag);
    ``poll_seconds`` is how often a stage looks again.
    """
    timeouts = timeouts or StageTimeouts.from_config(config)
    poll = config.poll_seconds
    command_poll = command_poll_seconds if command_poll_seconds is not None else min(poll, 0.5)
    started = time.monotonic()
    deadline = started + config.ready_timeout_seconds
    results: list[StageResult] = []

    def budget(stage: str) -> float:
        return max(0.0, min(getattr(timeouts, _stage_key(stage)), deadline - time.monotonic()))

    def command(commands: list[str], stage_timeout: float, what: str) -> CommandResult:
        return run_command(
            ssm,
            instance_id,
            commands,
            timeout_seconds=max(0.0, min(command_timeout_seconds, stage_timeout)),
            poll_seconds=command_poll,
            comment=f"pr-preview wait-ready: {what}",
        )

    # 1. running
    stage_start = time.monotonic()
    limit = budget(STAGE_RUNNING)
    polls = wait_running(ec2, instance_id, timeout_seconds=limit, poll_seconds=poll)
    results.append(StageResult(STAGE_RUNNING, time.monotonic() - stage_start, polls))

    # 2. the SSM agent answers
    stage_start = time.monotonic()
    limit = budget(STAGE_AGENT)

    def agent() -> tuple[bool, str]:
        answered = agent_check(
            ssm,
            instance_id,
            timeout_seconds=max(0.0, min(command_timeout_seconds, limit)),
            poll_seconds=command_poll,
        )
        return answered, "" if answered else "the SSM agent does not answer yet"

    polls = _poll(STAGE_AGENT, agent, timeout_seconds=limit, poll_seconds=poll)
    results.append(StageResult(STAGE_AGENT, time.monotonic() - stage_start, polls))

    # 3. the user data finished
    stage_start = time.monotonic()
    limit = budget(STAGE_BOOTSTRAP)

    def bootstrap() -> tuple[bool, str]:
        try:
            result = command(BOOTSTRAP_CHECK, limit, "bootstrap")
        except CommandTimeout as exc:
            return False, str(exc)
        lines = result.stdout.strip().splitlines()
        state = lines[0].strip() if lines else ""
        if state == "bootstrap-failed":
            step = "\n".join(lines[1:]).strip().removeprefix(FAILED_PREFIX).strip()
            raise BootstrapFailed(step or "unknown")
        if state == "bootstrap-done":
            return True, ""
        if not result.ok:
            return False, f"bootstrap check exited {result.exit_code}"
        return False, "bootstrap still running (no marker yet)"

    polls = _poll(STAGE_BOOTSTRAP, bootstrap, timeout_seconds=limit, poll_seconds=poll)
    results.append(StageResult(STAGE_BOOTSTRAP, time.monotonic() - stage_start, polls))

    # 4. the app port accepts connections
    stage_start = time.monotonic()
    limit = budget(STAGE_APP_PORT)

    down_since: float | None = None

    def container_state() -> str | None:
        """``exited 1``, ``restarting 1``, ``running 0``…, or None when compose cannot say."""
        try:
            result = command(app_state_check(config.app_dir, config.app_service), limit, "app")
        except CommandTimeout:
            return None
        for line in result.stdout.splitlines():
            if line.startswith(APP_STATE_PREFIX):
                state = line.removeprefix(APP_STATE_PREFIX).strip()
                return None if state == "unknown" else state
        return None

    def app_port() -> tuple[bool, str]:
        nonlocal down_since
        try:
            result = command(port_check(config.app_port), limit, "app port")
        except CommandTimeout as exc:
            return False, str(exc)
        if result.ok:
            return True, ""
        closed = f"nothing accepts connections on 127.0.0.1:{config.app_port}"
        state = container_state()
        if state is None or state.split()[0] not in DOWN_STATES:
            down_since = None
            return False, closed
        now = time.monotonic()
        down_since = now if down_since is None else down_since
        if now - down_since >= config.app_down_seconds:
            shown = f"{state.split()[0]} (exit code {state.split()[-1]})"
            raise AppDown(shown, now - down_since, config.app_port)
        return False, f"{closed}; the app's container is {state.split()[0]}"

    polls = _poll(STAGE_APP_PORT, app_port, timeout_seconds=limit, poll_seconds=poll)
    results.append(StageResult(STAGE_APP_PORT, time.monotonic() - stage_start, polls))

    return ReadyResult(instance_id, time.monotonic() - started, results)


@step
def wait_ready(
    clients: AwsClients,
    config: PreviewConfig,
    instance_id: str,
    timeouts: StageTimeouts | None = None,
) -> ReadyResult:
    """Prefect wrapper: a ``ReadyError`` is not retried (it is the world's answer)."""
    result = wait_until_ready(clients.ec2, clients.ssm, instance_id, config, timeouts=timeouts)
    run_logger(logger).info(
        "%s ready in %.1fs (%s)",
        instance_id,
        result.seconds,
        ", ".join(f"{stage.stage} {stage.seconds:.1f}s/{stage.polls}" for stage in result.stages),
    )
    return result
