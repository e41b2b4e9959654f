"""A preview asleep and awake: EC2 StopInstances/StartInstances, the tags that carry a
preview's TTL and cost across a stop, and the wake (start, agent, timer) that the sleep and
wake flows, the tunnel and a spare's claim share.

A stopped instance keeps its volume (the app's containers, images and data) and its tags; its
``shutdown-at`` still binds (the sweeper terminates a stopped preview past it). What a stop
loses is the on-instance shutdown timer: it lives in memory, so a wake re-arms it from the tag.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from tasks.cloud.aws import AwsClients, wait_timed
from tasks.cloud.instances import Preview, describe_preview
from tasks.cloud.on_instance import timer_command, timer_minutes
from tasks.cloud.ssm import CommandTimeout, agent_not_registered, run_command
from tasks.cloud.tags import (
    SLEEP_REASONS,
    TAG_RAN_SECONDS,
    TAG_SLEEP_STATE,
    TAG_SLEPT_AT,
    TAG_SLEPT_SECONDS,
    TAG_WOKE_AT,
    format_time,
)
from tasks.config import PreviewConfig
from tasks.run.errors import PreviewError

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import TagTypeDef

REARM_COMMENT = "pr-preview wake: re-arm the shutdown timer"


def sleep_tags(preview: Preview, reason: str, now: datetime) -> list[TagTypeDef]:
    """The tags of ``preview`` stopped at ``now``: why, since when, and its running seconds so
    far (its cost while asleep is its volume only)."""
    if reason not in SLEEP_REASONS:
        raise ValueError(f"sleep reason {reason!r} is not one of {', '.join(SLEEP_REASONS)}")
    return [
        {"Key": TAG_SLEEP_STATE, "Value": reason},
        {"Key": TAG_SLEPT_AT, "Value": format_time(now)},
        {"Key": TAG_RAN_SECONDS, "Value": str(round(preview.ran_seconds(now)))},
    ]


def wake_tags(preview: Preview, now: datetime) -> list[TagTypeDef]:
    """The tags of ``preview`` started at ``now``: its sleep added to its slept seconds, and
    the start of its new run. ``sleep-state`` goes (:func:`woken`)."""
    return [
        {"Key": TAG_SLEPT_SECONDS, "Value": str(round(preview.slept_seconds(now)))},
        {"Key": TAG_WOKE_AT, "Value": format_time(now)},
    ]


def stop_preview(ec2: EC2Client, preview: Preview, reason: str, now: datetime) -> None:
    """Tag, then stop: a stop that fails leaves a running preview tagged asleep, which the
    next wake starts (a no-op), never a stopped one that no wake would find."""
    ec2.create_tags(Resources=[preview.instance_id], Tags=sleep_tags(preview, reason, now))
    ec2.stop_instances(InstanceIds=[preview.instance_id])


def start_preview(ec2: EC2Client, preview: Preview) -> None:
    ec2.start_instances(InstanceIds=[preview.instance_id])


def woken(ec2: EC2Client, preview: Preview, now: datetime) -> None:
    """The preview runs again: its sleep is accounted for and ``sleep-state`` removed."""
    ec2.create_tags(Resources=[preview.instance_id], Tags=wake_tags(preview, now))
    ec2.delete_tags(Resources=[preview.instance_id], Tags=[{"Key": TAG_SLEEP_STATE}])


def minutes_left(preview: Preview, now: datetime) -> int | None:
    """The shutdown timer to re-arm: whole minutes until ``shutdown-at`` (rounded up, at least
    one), or None when the tag is missing, unparsable or already past."""
    shutdown_at = preview.shutdown_at
    if shutdown_at is None or shutdown_at <= now:
        return None
    return max(1, timer_minutes(math.ceil((shutdown_at - now).total_seconds() / 60) / 60))


class WakeFailed(PreviewError):
    """The preview could not be woken: gone, past its TTL, or its agent never answered."""


@dataclass(frozen=True)
class Woken:
    instance_id: str
    seconds: float  # from the start call to the agent re-arming the timer
    timer_minutes: int
    shutdown_at: datetime | None
    was: str  # the state it was found in: stopped, stopping, or running (nothing to start)


def wake_instance(
    clients: AwsClients,
    settings: PreviewConfig,
    instance_id: str,
    *,
    clock: type[datetime] = datetime,
) -> Woken:
    """Start ``instance_id`` if it sleeps, wait until it runs and its agent takes a command,
    and re-arm its shutdown timer from ``shutdown-at`` with that command.

    Never wakes a preview past its TTL (``WakeFailed``: the sweeper terminates it). A running
    preview gets its timer re-armed all the same: a wake is idempotent.
    """
    ec2, timeout = clients.ec2, settings.wake_timeout_seconds
    started = time.monotonic()
    preview = describe_preview(ec2, instance_id)
    if preview is None or preview.state in ("shutting-down", "terminated"):
        state = preview.state if preview else "gone"
        raise WakeFailed(f"{instance_id} is {state}: nothing to wake")
    if minutes_left(preview, clock.now(UTC)) is None:
        raise WakeFailed(
            f"{instance_id} is past its shutdown-at ({preview.tags.get('shutdown-at', 'none')}):"
            " not woken, the sweeper terminates it"
        )
    poll = settings.poll_seconds
    if preview.state == "stopping":
        wait_timed(
            ec2.get_waiter("instance_stopped"),
            timeout_seconds=timeout,
            poll_seconds=poll,
            InstanceIds=[instance_id],
        )
    if preview.state in ("stopping", "stopped"):
        start_preview(ec2, preview)
    wait_timed(
        ec2.get_waiter("instance_running"),
        timeout_seconds=max(1.0, timeout - (time.monotonic() - started)),
        poll_seconds=poll,
        InstanceIds=[instance_id],
    )
    minutes = _rearm_timer(clients, settings, preview, started, clock)
    woke = clock.now(UTC)
    if preview.state != "running" or preview.sleep_state:
        woken(ec2, preview, woke)
    return Woken(
        instance_id, time.monotonic() - started, minutes, preview.shutdown_at, preview.state
    )


def _rearm_timer(
    clients: AwsClients,
    settings: PreviewConfig,
    preview: Preview,
    started: float,
    clock: type[datetime],
) -> int:
    """The agent's first command: the shutdown timer at what is left of ``shutdown-at``.
    Sent again while the agent is not registered yet, until ``wake_timeout_seconds``."""
    deadline = started + settings.wake_timeout_seconds
    last = "no answer"
    while True:
        minutes = minutes_left(preview, clock.now(UTC))
        if minutes is None:
            raise WakeFailed(f"{preview.instance_id} reached its shutdown-at while waking")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WakeFailed(
                f"{preview.instance_id} runs but its SSM agent did not take a command within"
                f" {settings.wake_timeout_seconds:g} s ({last})"
            )
        try:
            result = run_command(
                clients.ssm,
                preview.instance_id,
                [timer_command(minutes)],
                timeout_seconds=max(1.0, min(60.0, remaining)),
                poll_seconds=min(settings.poll_seconds, 1.0),
                comment=REARM_COMMENT,
            )
        except ClientError as exc:
            if not agent_not_registered(exc):
                raise
            last = "agent not registered"
        except CommandTimeout:
            last = "command not answered"
        else:
            if result.ok:
                return minutes
            raise WakeFailed(
                f"could not re-arm the shutdown timer of {preview.instance_id}"
                f" (exit {result.exit_code})"
            )
        time.sleep(min(settings.poll_seconds, max(0.0, deadline - time.monotonic())))
