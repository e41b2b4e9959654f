"""pr-sleep and pr-wake: previews asleep while nobody can look at them (nights, weekends).

``prefect.yaml`` runs pr-sleep at the start of each window and pr-wake at its end (cron in the
team's time zone, shown in the Prefect UI). pr-sleep stops every running preview of a pull
request, tagged ``sleep-state=scheduled`` — never one tagged keep, nor one a run is deploying
(its PR's lock is held: it stays awake) — and the warm spares; each PR's comment says it
sleeps and what wakes it. pr-wake starts the spares and the previews it stopped, re-arms each
shutdown timer and probes the app: healthy again, same instance, same data, no migration.

The sweeper stops idle previews the same way (``stop_idle_previews``, ``idle_stop_minutes``).

1. list   2. per preview, under its PR's lock: stop, or start → re-arm → probe
3. the warm spares, under the fleet lock   4. report
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from tasks.cloud.aws import AwsClients, build_clients
from tasks.cloud.instances import Preview
from tasks.cloud.tags import format_time
from tasks.config import PreviewConfig, RunOverrides, run_config
from tasks.github.client import GitHub, github_from_config
from tasks.github.pull_request import PreviewState
from tasks.run.budget import run_budget
from tasks.run.errors import PreviewError
from tasks.run.events import emit_instance_event
from tasks.run.locks import FLEET_LOCK, LockTimeout, hold, pr_lock_name
from tasks.steps.probe import probe
from tasks.steps.sleep import (
    awake_previews,
    idle_candidates,
    note_activity,
    plan_idle,
    plan_sleep,
    read_activity,
    sleep,
    sleep_spares,
    sleeping_detail,
    sleeping_previews,
    tell_pull_request,
    wake,
    wake_spares,
)

BEING_DEPLOYED = "being deployed (its PR's lock is held): stays awake"


class WakeIncomplete(PreviewError):
    """Some previews the schedule put to sleep did not come back healthy."""


@dataclass
class PowerReport:
    """What a pr-sleep or pr-wake run (or the sweeper's idle stop) did to each preview, and
    why."""

    action: str  # sleep | wake | idle
    rows: list[dict[str, str]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    spares: list[str] = field(default_factory=list)  # warm spares stopped or started

    def add(self, instance_id: str, pr: str, outcome: str) -> None:
        self.rows.append({"instance": instance_id, "PR": pr, "outcome": outcome})

    def publish(self) -> None:
        create_table_artifact(
            table=self.rows or [{"instance": "-", "PR": "-", "outcome": "no previews"}],
            key=f"pr-{self.action}",
            description=f"pr-{self.action}: {len(self.changed)} changed,"
            f" {len(self.spares)} spares, {len(self.failed)} failed",
        )


def github_or_none(settings: PreviewConfig, clients: AwsClients) -> GitHub | None:
    """The GitHub client the PR comments go through; without one the previews sleep all the
    same (a comment is a courtesy)."""
    try:
        github = github_from_config(settings, ssm=clients.ssm)
    except Exception as exc:
        get_run_logger().warning("GitHub not configured (%s): no PR is told", exc)
        return None
    return github if github.enabled else None


def _pr(preview: Preview) -> str:
    return f"{preview.repo}#{preview.pr_number}" if preview.pr_number is not None else "-"


def sleep_one(
    clients: AwsClients,
    settings: PreviewConfig,
    github: GitHub | None,
    preview: Preview,
    reason: str,
    report: PowerReport,
    idle_since: datetime | None = None,
) -> bool:
    """Under the PR's lock (a run deploying it keeps it awake): stop ``preview`` as asleep for
    ``reason``, and tell its PR. True when it sleeps."""
    assert preview.repo is not None and preview.pr_number is not None
    try:
        with hold(
            pr_lock_name(preview.repo, preview.pr_number),
            lease_seconds=settings.lock_lease_seconds,
            timeout_seconds=settings.sleep_lock_wait_seconds,
        ):
            slept = sleep(clients, settings, preview.instance_id, reason, idle_since)
    except LockTimeout:
        get_run_logger().info("%s %s", preview.instance_id, BEING_DEPLOYED)
        report.add(preview.instance_id, _pr(preview), BEING_DEPLOYED)
        return False
    if slept is None:
        report.add(preview.instance_id, _pr(preview), "changed meanwhile: left as it is")
        return False
    report.changed.append(preview.instance_id)
    report.add(preview.instance_id, _pr(preview), f"asleep ({reason})")
    emit_instance_event(
        "slept", preview.instance_id, preview.repo, preview.pr_number, reason=reason
    )
    tell_pull_request(
        github,
        settings,
        preview,
        PreviewState.SLEEPING,
        sleeping_detail(preview, reason, slept.slept_at),
    )
    return True


@flow(name="pr-sleep")
def pr_sleep(
    reason: str = "scheduled", dry_run: bool = False, config: RunOverrides | None = None
) -> PowerReport:
    """Stop every running preview that may sleep, tagged ``sleep-state=<reason>``, and the
    warm spares."""
    settings = run_config(config)
    clients = build_clients(settings)
    github = None if dry_run else github_or_none(settings, clients)
    report = PowerReport("sleep")
    now = datetime.now(UTC)
    budget = settings.terminate_timeout_seconds + 4 * settings.sleep_lock_wait_seconds
    with run_budget(budget + 300):
        # 1. Every running preview, and which of them may sleep.
        for decision in plan_sleep(awake_previews(clients, settings), now):
            preview = decision.preview
            if not decision.sleeps or dry_run:
                outcome = "would sleep (dry run)" if decision.sleeps else decision.reason
                report.add(preview.instance_id, _pr(preview), outcome)
                continue
            # 2. Under the PR's lock: a run deploying it keeps it awake.
            sleep_one(clients, settings, github, preview, reason, report)
        # 3. The warm spares: nobody claims one at night (the fleet lock: no claim meets a
        #    spare half stopped).
        if not dry_run:
            lease, wait = settings.lock_lease_seconds, settings.lock_wait_seconds
            with hold(FLEET_LOCK, lease_seconds=lease, timeout_seconds=wait):
                report.spares = sleep_spares(clients, settings, reason)
            for instance_id in report.spares:
                report.add(instance_id, "-", f"warm spare asleep ({reason})")
    report.publish()
    return report


@flow(name="pr-wake")
def pr_wake(reason: str = "scheduled", config: RunOverrides | None = None) -> PowerReport:
    """Start the warm spares and the previews asleep for ``reason``, each preview checked
    healthy again."""
    settings = run_config(config)
    clients = build_clients(settings)
    github = github_or_none(settings, clients)
    logger = get_run_logger()
    report = PowerReport("wake")
    per_preview = settings.lock_wait_seconds + settings.wake_timeout_seconds
    with run_budget(per_preview + settings.probe_timeout_seconds + 300):
        # 1. The warm spares first: the morning's new pull requests claim them.
        lease, wait = settings.lock_lease_seconds, settings.lock_wait_seconds
        with hold(FLEET_LOCK, lease_seconds=lease, timeout_seconds=wait):
            spares = wake_spares(clients, settings, reason)
        for instance_id, woke in spares.items():
            if isinstance(woke, str):
                report.add(instance_id, "-", f"warm spare not woken: {woke}")
                continue
            report.spares.append(instance_id)
            report.add(instance_id, "-", f"warm spare awake in {woke.seconds:.1f} s")
        # 2. The previews, each under its PR's lock, probed healthy.
        for preview in sleeping_previews(clients, settings, reason):
            if not preview.repo or preview.pr_number is None:
                continue  # a spare: woken above
            pr = _pr(preview)
            try:
                outcome = _wake_one(clients, settings, github, preview)
            except Exception as exc:
                logger.error("%s did not wake healthy: %s", preview.instance_id, exc)
                report.failed[preview.instance_id] = str(exc)
                report.add(preview.instance_id, pr, f"failed: {exc}")
                continue
            report.changed.append(preview.instance_id)
            report.add(preview.instance_id, pr, outcome)
    report.publish()
    if report.failed:
        raise WakeIncomplete(
            f"{len(report.failed)} previews did not wake healthy; see the pr-wake artifact"
        )
    return report


def _wake_one(
    clients: AwsClients, settings: PreviewConfig, github: GitHub | None, preview: Preview
) -> str:
    assert preview.repo and preview.pr_number is not None  # sleeping_previews: a PR's only
    with hold(
        pr_lock_name(preview.repo, preview.pr_number),
        lease_seconds=settings.lock_lease_seconds,
        timeout_seconds=settings.lock_wait_seconds,
    ):
        woke = wake(clients, settings, preview.instance_id)
        answer = probe(clients, settings, preview.instance_id)
    emit_instance_event("woke", preview.instance_id, preview.repo, preview.pr_number)
    tell_pull_request(
        github,
        settings,
        preview,
        PreviewState.READY,
        f"Awake again since {format_time(datetime.now(UTC))}: the sleep schedule ended.",
        expires_at=woke.shutdown_at,
    )
    return (
        f"awake in {woke.seconds:.1f} s, timer {woke.timer_minutes} min,"
        f" {answer.path} → {answer.status_code}"
    )


def stop_idle_previews(
    clients: AwsClients,
    settings: PreviewConfig,
    live: list[Preview],
    github: GitHub | None,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> PowerReport:
    """The sweeper's idle stop (``idle_stop_minutes``): read every running preview's activity
    from its instance, keep it as the ``active-at`` tag, and put to sleep (``idle``) those
    nobody used for longer — each under its PR's lock, judged again there."""
    report = PowerReport("idle")
    minutes = settings.idle_stop_minutes
    now = now or datetime.now(UTC)
    candidates = idle_candidates(live, now)
    if minutes is None or not candidates:
        return report
    # 1. What each instance recorded of its use (one SendCommand per 50 instances).
    activity = read_activity(clients, settings, candidates)
    if not dry_run:
        note_activity(clients, settings, candidates, activity, now)
    # 2. Idle longer than the setting: asleep, unless a run holds its PR's lock.
    for decision in plan_idle(candidates, activity, now, minutes):
        preview = decision.preview
        if not decision.idle or dry_run:
            outcome = f"would sleep (dry run): {decision.reason}" if decision.idle else ""
            report.add(preview.instance_id, _pr(preview), outcome or decision.reason)
            continue
        sleep_one(clients, settings, github, preview, "idle", report, decision.idle_since)
    return report
