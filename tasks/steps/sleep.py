"""Sleep and wake: a preview stopped while nobody can look at it, started again on demand.

A sleeping preview is a stopped instance tagged ``sleep-state`` (why: scheduled, idle,
manual): its volume keeps the app, its images and its data, its tags keep its TTL. A wake
starts it, waits for its SSM agent and re-arms the on-instance shutdown timer from
``shutdown-at`` (a stop clears it) in the first command the agent takes; whoever woke it then
probes the app. ``plan_sleep`` decides which previews may sleep, with no I/O.

``sleep`` and ``wake`` are what a person's command calls (``/preview stop|start``), holding the
PR's lock as every change to a preview does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from botocore.exceptions import ClientError

from tasks.cloud.aws import AwsClients, wait_timed
from tasks.cloud.instances import Preview, describe_preview, find_previews
from tasks.cloud.on_instance import timer_command
from tasks.cloud.power import minutes_left, start_preview, stop_preview, woken
from tasks.cloud.ssm import CommandTimeout, agent_not_registered, run_command
from tasks.cloud.tags import TAG_SPARE, format_time
from tasks.config import PreviewConfig
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

logger = logging.getLogger(__name__)

REARM_COMMENT = "pr-preview wake: re-arm the shutdown timer"


class WakeFailed(PreviewError):
    """The preview could not be woken: gone, past its TTL, or its agent never answered."""


@dataclass(frozen=True)
class SleepDecision:
    preview: Preview
    sleeps: bool
    reason: str


@dataclass(frozen=True)
class Slept:
    instance_id: str
    reason: str
    slept_at: datetime


@dataclass(frozen=True)
class Woken:
    instance_id: str
    seconds: float  # from the start call to the agent re-arming the timer
    timer_minutes: int
    shutdown_at: datetime | None
    was: str  # the state it was found in: stopped, stopping, or running (nothing to start)


def plan_sleep(previews: Iterable[Preview], now: datetime) -> list[SleepDecision]:
    """Which running previews may sleep: a PR's preview not tagged keep, not a spare, not
    already past its TTL (the sweeper ends those)."""
    decisions = []
    for preview in previews:
        shutdown_at = preview.shutdown_at
        if preview.state != "running":
            decision = SleepDecision(preview, False, f"instance is {preview.state}")
        elif preview.keep:
            decision = SleepDecision(preview, False, "tagged pr-preview:keep=true")
        elif preview.tags.get(TAG_SPARE) or preview.pr_number is None or not preview.repo:
            decision = SleepDecision(preview, False, "serves no pull request")
        elif shutdown_at is not None and shutdown_at <= now:
            decision = SleepDecision(preview, False, "past its TTL: the sweeper ends it")
        else:
            decision = SleepDecision(preview, True, "asleep until woken")
        decisions.append(decision)
    return decisions


@step
def awake_previews(clients: AwsClients, settings: PreviewConfig) -> list[Preview]:
    """Every running preview (spares too: ``plan_sleep`` tells them apart)."""
    return find_previews(clients.ec2, settings.purpose_tag, states=("running",))


@step
def sleeping_previews(
    clients: AwsClients,
    settings: PreviewConfig,
    reason: str | None = None,
    repo: str | None = None,
    pr_number: int | None = None,
) -> list[Preview]:
    """Stopped previews that pr-preview put to sleep (for ``reason`` only, when given)."""
    found = find_previews(
        clients.ec2, settings.purpose_tag, repo=repo, pr_number=pr_number, states=("stopped",)
    )
    return [p for p in found if p.sleep_state and (reason is None or p.sleep_state == reason)]


def sleep_instance(
    clients: AwsClients,
    settings: PreviewConfig,
    instance_id: str,
    reason: str,
    *,
    now: datetime | None = None,
) -> Slept | None:
    """Stop ``instance_id`` as asleep for ``reason``; None when it is not a running preview
    that may sleep (gone, already stopped, tagged keep) — judged again now, under the lock."""
    now = now or datetime.now(UTC)
    preview = describe_preview(clients.ec2, instance_id)
    if preview is None:
        return None
    [decision] = plan_sleep([preview], now)
    if not decision.sleeps:
        run_logger(logger).info("%s stays as it is: %s", instance_id, decision.reason)
        return None
    stop_preview(clients.ec2, preview, reason, now)
    run_logger(logger).info("%s asleep (%s) since %s", instance_id, reason, format_time(now))
    return Slept(instance_id, reason, now)


@step(needs_lock=True)
def sleep(
    clients: AwsClients, settings: PreviewConfig, instance_id: str, reason: str = "manual"
) -> Slept | None:
    """Stop a running preview until a push, a tunnel or the wake schedule starts it."""
    return sleep_instance(clients, settings, instance_id, reason)


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


@step(needs_lock=True)
def wake(clients: AwsClients, settings: PreviewConfig, instance_id: str) -> Woken:
    """Start a sleeping preview and re-arm its shutdown timer; the caller probes the app."""
    woke = wake_instance(clients, settings, instance_id)
    run_logger(logger).info(
        "%s awake (was %s) in %.1f s, shutdown timer %d min",
        instance_id,
        woke.was,
        woke.seconds,
        woke.timer_minutes,
    )
    return woke
