"""Shell commands on one preview instance over SSM Run Command (runbook §0, §9).

Every step that looks inside an instance — wait-ready, migrate, probe, update, diagnostics —
goes through :func:`run_command`: send ``AWS-RunShellScript`` to one instance, then poll
``GetCommandInvocation`` for that instance (never a list: moto runs a command on every
instance of the region when ``Targets`` is absent) until a terminal status or the deadline.
Command text is never logged: it must not hold secrets, and the rule is simpler than the
exceptions. Output is the caller's to mask before it leaves the run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_delay

from tasks.run.errors import PreviewError
from tasks.run.retry import error_code

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

DOCUMENT = "AWS-RunShellScript"
TERMINAL_STATUSES = frozenset({"Success", "Failed", "Cancelled", "TimedOut"})
# On AWS the invocation appears a moment after SendCommand answers; until then this code.
NOT_YET_CODE = "InvocationDoesNotExist"
# SendCommand's answer while an instance's agent has not registered (or no longer answers).
AGENT_NOT_REGISTERED_CODE = "InvalidInstanceId"
# SendCommand's delivery timeout must lie in [30, 2592000] s; executionTimeout in [1, 172800] s.
MIN_DELIVERY_TIMEOUT = 30
MAX_EXECUTION_TIMEOUT = 172800
COMMENT_LIMIT = 100
SEND_BATCH = 50  # the most instance ids one SendCommand accepts


@dataclass(frozen=True)
class CommandResult:
    """What one instance made of one command."""

    command_id: str
    instance_id: str
    status: str
    exit_code: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.status == "Success" and self.exit_code == 0

    @property
    def output(self) -> str:
        """stdout then stderr, for matching and evidence."""
        return "\n".join(part for part in (self.stdout, self.stderr) if part)


class CommandTimeout(PreviewError):
    """The command did not reach a terminal status before the caller's deadline."""

    def __init__(
        self, command_id: str, instance_id: str, timeout_seconds: float, last_status: str
    ) -> None:
        self.command_id = command_id
        self.instance_id = instance_id
        self.timeout_seconds = timeout_seconds
        self.last_status = last_status
        super().__init__(
            f"SSM command {command_id} on {instance_id} still {last_status} after"
            f" {timeout_seconds:g}s"
        )


def agent_not_registered(exc: ClientError) -> bool:
    """Whether SendCommand refused ``exc`` because the instance's SSM agent has not registered."""
    return error_code(exc) == AGENT_NOT_REGISTERED_CODE


def poll_wait(poll_seconds: float, timeout_seconds: float) -> Callable[[RetryCallState], float]:
    """A tenacity wait of ``poll_seconds`` that never sleeps past the deadline, so the last
    look happens at the deadline rather than one interval after it."""

    def wait(state: RetryCallState) -> float:
        remaining = timeout_seconds - (state.seconds_since_start or 0.0)
        return max(0.0, min(poll_seconds, remaining))

    return wait


def send_shell(
    ssm: SSMClient,
    instance_id: str | Sequence[str],
    commands: Sequence[str],
    *,
    timeout_seconds: float,
    comment: str | None = None,
) -> str:
    """Send ``commands`` as one shell script to one instance (or to each of up to 50);
    returns the command id.

    ``executionTimeout`` makes the instance kill the script at our deadline too.
    """
    instance_ids = [instance_id] if isinstance(instance_id, str) else list(instance_id)
    execution_timeout = min(MAX_EXECUTION_TIMEOUT, max(1, math.ceil(timeout_seconds)))
    params: dict[str, Any] = {
        "InstanceIds": instance_ids,
        "DocumentName": DOCUMENT,
        "Parameters": {"commands": list(commands), "executionTimeout": [str(execution_timeout)]},
        "TimeoutSeconds": max(MIN_DELIVERY_TIMEOUT, execution_timeout),
    }
    if comment:
        params["Comment"] = comment[:COMMENT_LIMIT]
    response = ssm.send_command(**params)
    return response["Command"]["CommandId"]


def wait_command(
    ssm: SSMClient,
    command_id: str,
    instance_id: str,
    *,
    timeout_seconds: float,
    poll_seconds: float,
    not_found_grace_seconds: float = 15.0,
    started: float | None = None,
) -> CommandResult:
    """Poll the invocation on ``instance_id`` until a terminal status; ``CommandTimeout`` after
    ``timeout_seconds`` (the command is then cancelled, best effort).

    ``InvocationDoesNotExist`` counts as "not yet" for ``not_found_grace_seconds``; after that
    it is an error. Other ``ClientError``s surface for the task's retry policy to judge.
    """
    started = time.monotonic() if started is None else started
    last_status = "Pending"

    def read() -> dict[str, Any] | None:
        nonlocal last_status
        try:
            invocation: dict[str, Any] = dict(
                ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
            )
        except ClientError as exc:
            if error_code(exc) == NOT_YET_CODE and (
                time.monotonic() - started < not_found_grace_seconds
            ):
                return None
            raise
        last_status = str(invocation.get("Status", ""))
        return invocation

    def not_done(invocation: dict[str, Any] | None) -> bool:
        return invocation is None or invocation.get("Status") not in TERMINAL_STATUSES

    def give_up(state: RetryCallState) -> dict[str, Any]:
        cancel_quietly(ssm, command_id, instance_id)
        raise CommandTimeout(command_id, instance_id, timeout_seconds, last_status)

    invocation = Retrying(
        stop=stop_after_delay(timeout_seconds),
        wait=poll_wait(poll_seconds, timeout_seconds),
        retry=retry_if_result(not_done),
        retry_error_callback=give_up,
        reraise=True,
    )(read)
    assert invocation is not None  # give_up raises for every unfinished read
    result = CommandResult(
        command_id=command_id,
        instance_id=instance_id,
        status=str(invocation["Status"]),
        exit_code=int(invocation.get("ResponseCode", -1)),
        stdout=str(invocation.get("StandardOutputContent", "")),
        stderr=str(invocation.get("StandardErrorContent", "")),
        duration=time.monotonic() - started,
    )
    logger.debug(
        "SSM command %s on %s: %s exit %d in %.2fs",
        command_id,
        instance_id,
        result.status,
        result.exit_code,
        result.duration,
    )
    return result


def run_command(
    ssm: SSMClient,
    instance_id: str,
    commands: Sequence[str],
    *,
    timeout_seconds: float,
    poll_seconds: float,
    comment: str | None = None,
    not_found_grace_seconds: float = 15.0,
) -> CommandResult:
    """Run ``commands`` on ``instance_id`` and wait for the outcome, at most ``timeout_seconds``.

    A non-zero exit is a result (``status="Failed"``, ``ok`` False), not an exception: the
    caller knows what it means. ``CommandTimeout`` when the deadline passes first.
    """
    started = time.monotonic()
    command_id = send_shell(
        ssm, instance_id, commands, timeout_seconds=timeout_seconds, comment=comment
    )
    return wait_command(
        ssm,
        command_id,
        instance_id,
        timeout_seconds=timeout_seconds,
        poll_seconds=poll_seconds,
        not_found_grace_seconds=not_found_grace_seconds,
        started=started,
    )


def cancel_quietly(ssm: SSMClient, command_id: str, instance_id: str) -> None:
    """Cancel a command we stopped waiting for; failing to cancel changes nothing for us."""
    try:
        ssm.cancel_command(CommandId=command_id, InstanceIds=[instance_id])
    except Exception as exc:  # moto lacks CancelCommand; AWS may say it already finished
        logger.debug("cancelling SSM command %s failed: %s", command_id, exc)


def run_on_each(
    ssm: SSMClient,
    instance_ids: Sequence[str],
    commands: Sequence[str],
    *,
    timeout_seconds: float,
    poll_seconds: float,
    comment: str | None = None,
) -> dict[str, CommandResult | str]:
    """Run ``commands`` on every instance of ``instance_ids`` with one SendCommand per 50, and
    wait for each outcome within one ``timeout_seconds`` for all. Each instance gets its result,
    or why there is none (its agent is not registered, it did not answer in time): one
    instance's trouble never hides another's answer.

    SendCommand refuses the whole call when one instance's agent is not registered; that batch
    is then sent again in halves, and so on, so only that one goes without.
    """
    started = time.monotonic()
    sent: dict[str, str] = {}
    outcome: dict[str, CommandResult | str] = {}
    ids = list(dict.fromkeys(instance_ids))
    for start in range(0, len(ids), SEND_BATCH):
        batch = ids[start : start + SEND_BATCH]
        groups = [batch]
        while groups:
            group = groups.pop()
            try:
                command_id = send_shell(
                    ssm, group, commands, timeout_seconds=timeout_seconds, comment=comment
                )
            except ClientError as exc:
                if not agent_not_registered(exc):
                    raise
                if len(group) > 1:  # halves: the others still go in few calls
                    middle = len(group) // 2
                    groups += [group[:middle], group[middle:]]
                else:
                    outcome[group[0]] = "its SSM agent is not registered"
                continue
            sent.update(dict.fromkeys(group, command_id))
    for instance_id, command_id in sent.items():
        remaining = timeout_seconds - (time.monotonic() - started)
        try:
            outcome[instance_id] = wait_command(
                ssm,
                command_id,
                instance_id,
                timeout_seconds=max(poll_seconds, remaining),
                poll_seconds=poll_seconds,
            )
        except CommandTimeout:
            outcome[instance_id] = f"no answer within {timeout_seconds:g} s"
    return outcome
