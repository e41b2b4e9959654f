"""Sleep and wake: a preview stopped while nobody can look at it, started again on demand.

A sleeping preview is a stopped instance tagged ``sleep-state`` (why: scheduled, idle,
manual): its volume keeps the app, its images and its data, its tags keep its TTL. A wake
starts it, waits for its SSM agent and re-arms the on-instance shutdown timer from
``shutdown-at`` (a stop clears it) in the first command the agent takes; whoever woke it then
probes the app. ``plan_sleep`` decides which previews may sleep, with no I/O.

``sleep`` and ``wake`` are what a person's command calls (``/preview stop|start``), holding the
PR's lock as every change to a preview does.

Idle (``idle_stop_minutes``): each instance samples its own use every minute (a systemd timer:
SSM sessions, connections to the app port) into a root-only file; the sweeper reads every
running preview's file with one SendCommand per 50 instances (``read_activity``), keeps what it
read as the ``active-at`` tag, and ``plan_idle`` picks the previews nobody used for longer.

Warm spares follow the schedule: ``sleep_spares`` and ``wake_spares``, under the fleet lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from tasks.cloud.aws import AwsClients
from tasks.cloud.instances import Preview, describe_preview, find_previews
from tasks.cloud.on_instance import Activity, activity_read, parse_activity
from tasks.cloud.power import WakeFailed, Woken, stop_preview, wake_instance
from tasks.cloud.ssm import run_on_each
from tasks.cloud.tags import SPARE, TAG_ACTIVE_AT, TAG_SPARE, format_time
from tasks.config import PreviewConfig
from tasks.github.pull_request import CommentState, PreviewState, render_comment, upsert_comment
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from tasks.github.client import GitHub

logger = logging.getLogger(__name__)

ACTIVITY_COMMENT = "pr-preview sweeper: read the preview's activity"
# One read of every running preview's activity: the instances answer in parallel.
ACTIVITY_TIMEOUT_SECONDS = 60.0


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


@dataclass(frozen=True)
class IdleDecision:
    preview: Preview
    idle: bool
    reason: str
    idle_since: datetime | None = None  # None: its activity could not be read


def idle_candidates(previews: Iterable[Preview], now: datetime) -> list[Preview]:
    """The previews an idle stop may concern: those the schedule may put to sleep."""
    return [decision.preview for decision in plan_sleep(previews, now) if decision.sleeps]


def plan_idle(
    previews: Iterable[Preview],
    activity: dict[str, Activity | str],
    now: datetime,
    idle_minutes: int,
) -> list[IdleDecision]:
    """Which of ``previews`` nobody used for more than ``idle_minutes``: no session or
    connection now, none since the last activity the instance recorded, its last deploy and
    the start of its run. A preview whose activity was not read stays awake: never guessed."""
    limit = timedelta(minutes=idle_minutes)
    decisions = []
    for preview in previews:
        read = activity.get(preview.instance_id, "not read")
        if isinstance(read, str):
            decisions.append(IdleDecision(preview, False, f"activity unknown: {read}"))
            continue
        if read.active_now:
            why = f"in use now ({read.sessions} sessions, {read.connections} connections)"
            decisions.append(IdleDecision(preview, False, why, now))
            continue
        since = preview.idle_since(read.last)
        idle = now - since > limit
        idle_for = _minutes(now - since)
        why = f"idle {idle_for}" + (f", over {idle_minutes} min" if idle else "")
        decisions.append(IdleDecision(preview, idle, why, since))
    return decisions


def _minutes(delta: timedelta) -> str:
    minutes = max(0, int(delta.total_seconds() // 60))
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes} min"


@step
def read_activity(
    clients: AwsClients, settings: PreviewConfig, previews: list[Preview]
) -> dict[str, Activity | str]:
    """Each running preview's use, as the instance itself recorded it: a sample now and the
    last activity its timer saw — or why it could not say (its agent away, no answer).

    Read with SSM commands rather than reported by the instance: the instance role gets no
    new permission, and what a container might send cannot reach the sweeper (the file is
    root's, where no container may mount). One SendCommand per 50 instances."""
    ids = [preview.instance_id for preview in previews]
    if not ids:
        return {}
    answers = run_on_each(
        clients.ssm,
        ids,
        activity_read(settings.app_port),
        timeout_seconds=ACTIVITY_TIMEOUT_SECONDS,
        poll_seconds=min(settings.poll_seconds, 1.0),
        comment=ACTIVITY_COMMENT,
    )
    found: dict[str, Activity | str] = {}
    for instance_id, answer in answers.items():
        if isinstance(answer, str):
            found[instance_id] = answer
            continue
        parsed = parse_activity(answer.stdout) if answer.ok else None
        found[instance_id] = parsed or f"unreadable answer (exit {answer.exit_code})"
    return found


@step
def note_activity(
    clients: AwsClients,
    settings: PreviewConfig,
    previews: list[Preview],
    activity: dict[str, Activity | str],
    now: datetime,
) -> list[str]:
    """Keep each preview's last activity as its ``active-at`` tag (what ``pr-preview list``
    shows idle time from): what its instance recorded, when that is newer than the tag; the
    instance's own clock (a sample in use writes it), ``now`` only for one in use that could
    not write it. Returns the instances tagged."""
    tagged = []
    for preview in previews:
        read = activity.get(preview.instance_id)
        if not isinstance(read, Activity):
            continue
        last = read.last or (now if read.active_now else None)
        if last is None or (preview.active_at is not None and last <= preview.active_at):
            continue
        clients.ec2.create_tags(
            Resources=[preview.instance_id],
            Tags=[{"Key": TAG_ACTIVE_AT, "Value": format_time(last)}],
        )
        tagged.append(preview.instance_id)
    return tagged


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
    idle_since: datetime | None = None,
) -> Slept | None:
    """Stop ``instance_id`` as asleep for ``reason``; None when it is not a running preview
    that may sleep (gone, already stopped, tagged keep) — judged again now, under the lock.
    ``idle_since``: the idle time it was judged by; a deploy or a wake since then (its tags
    moved) keeps it awake."""
    now = now or datetime.now(UTC)
    preview = describe_preview(clients.ec2, instance_id)
    if preview is None:
        return None
    [decision] = plan_sleep([preview], now)
    if decision.sleeps and idle_since is not None and preview.idle_since() > idle_since:
        decision = SleepDecision(preview, False, "deployed or woken since it was found idle")
    if not decision.sleeps:
        run_logger(logger).info("%s stays as it is: %s", instance_id, decision.reason)
        return None
    stop_preview(clients.ec2, preview, reason, now)
    run_logger(logger).info("%s asleep (%s) since %s", instance_id, reason, format_time(now))
    return Slept(instance_id, reason, now)


@step(needs_lock=True)
def sleep(
    clients: AwsClients,
    settings: PreviewConfig,
    instance_id: str,
    reason: str = "manual",
    idle_since: datetime | None = None,
) -> Slept | None:
    """Stop a running preview until a push, a tunnel or the wake schedule starts it."""
    return sleep_instance(clients, settings, instance_id, reason, idle_since=idle_since)


def sleeping_detail(preview: Preview, reason: str, since: datetime) -> str:
    """What the PR's comment says of a sleeping preview: since when, why, what wakes it."""
    why = {
        "scheduled": "the team's sleep schedule",
        "idle": "nobody used it",
        "manual": "stopped by hand",
    }.get(reason, reason)
    return (
        f"Sleeping since {format_time(since)} ({why}); its disk, data and expiry are kept."
        f" It wakes on a push, `pr-preview tunnel {preview.pr_number}` or `/preview start`."
    )


@step(retry=False)
def tell_pull_request(
    github: GitHub | None,
    settings: PreviewConfig,
    preview: Preview,
    state: PreviewState,
    detail: str,
    expires_at: datetime | None = None,
) -> bool:
    """The PR's sticky comment says the preview sleeps (since when, what wakes it) or woke. A
    comment is a courtesy: GitHub away or unset is logged, never fatal. True when posted."""
    if github is None or not github.enabled or not preview.repo or preview.pr_number is None:
        return False
    status = CommentState(
        state,
        preview.repo,
        preview.pr_number,
        sha=preview.sha,
        instance_id=preview.instance_id,
        region=settings.region,
        expires_at=expires_at or preview.shutdown_at,
        app_port=settings.app_port,
        detail=detail,
    )
    try:
        upsert_comment(github, preview.repo, preview.pr_number, render_comment(status))
    except Exception as exc:  # the preview sleeps (or woke) all the same
        run_logger(logger).warning(
            "sticky comment of %s#%d not updated: %s", preview.repo, preview.pr_number, exc
        )
        return False
    return True


def sleepy_spares(previews: Iterable[Preview], now: datetime) -> list[Preview]:
    """The unclaimed warm spares that may sleep: running, not tagged keep, not past their
    TTL (the sweeper ends those)."""
    return [
        preview
        for preview in previews
        if preview.state == "running"
        and preview.tags.get(TAG_SPARE) == SPARE
        and not preview.keep
        and (preview.shutdown_at is None or preview.shutdown_at > now)
    ]


@step(needs_lock=True)
def sleep_spares(clients: AwsClients, settings: PreviewConfig, reason: str) -> list[str]:
    """Stop every unclaimed warm spare that may sleep (hold the fleet lock: a claim never
    meets one half stopped). Returns the spares stopped."""
    now = datetime.now(UTC)
    running = find_previews(clients.ec2, settings.purpose_tag, states=("running",))
    stopped = []
    for spare in sleepy_spares(running, now):
        stop_preview(clients.ec2, spare, reason, now)
        stopped.append(spare.instance_id)
    if stopped:
        run_logger(logger).info("%d warm spares asleep (%s)", len(stopped), reason)
    return stopped


@step(needs_lock=True)
def wake_spares(
    clients: AwsClients, settings: PreviewConfig, reason: str
) -> dict[str, Woken | str]:
    """Start the unclaimed warm spares asleep for ``reason`` (hold the fleet lock), each with
    its shutdown timer re-armed; one that cannot wake (past its TTL: the sweeper's) says why."""
    woke: dict[str, Woken | str] = {}
    for spare in sleeping_previews.fn(clients, settings, reason):
        if spare.tags.get(TAG_SPARE) != SPARE:
            continue
        try:
            woke[spare.instance_id] = wake_instance(clients, settings, spare.instance_id)
        except WakeFailed as exc:
            woke[spare.instance_id] = str(exc)
    return woke


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
