"""pr-sleep and pr-wake: previews asleep while nobody can look at them (nights, weekends).

``prefect.yaml`` runs pr-sleep at the start of each window and pr-wake at its end (cron in the
team's time zone, shown in the Prefect UI). pr-sleep stops every running preview of a pull
request, tagged ``sleep-state=scheduled`` — never one tagged keep, nor one a run is deploying
(its PR's lock is held: it stays awake). pr-wake starts those it stopped, re-arms each
shutdown timer and probes the app: healthy again, same instance, same data, no migration.

1. list   2. per preview, under its PR's lock: stop, or start → re-arm → probe   3. report
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from tasks.cloud.aws import AwsClients, build_clients
from tasks.cloud.instances import Preview
from tasks.config import PreviewConfig, RunOverrides, run_config
from tasks.run.budget import run_budget
from tasks.run.errors import PreviewError
from tasks.run.events import emit_instance_event
from tasks.run.locks import LockTimeout, hold, pr_lock_name
from tasks.steps.probe import probe
from tasks.steps.sleep import (
    awake_previews,
    plan_sleep,
    sleep,
    sleeping_previews,
    wake,
)

BEING_DEPLOYED = "being deployed (its PR's lock is held): stays awake"


class WakeIncomplete(PreviewError):
    """Some previews the schedule put to sleep did not come back healthy."""


@dataclass
class PowerReport:
    """What a pr-sleep or pr-wake run did to each preview, and why."""

    action: str  # sleep | wake
    rows: list[dict[str, str]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def add(self, instance_id: str, pr: str, outcome: str) -> None:
        self.rows.append({"instance": instance_id, "PR": pr, "outcome": outcome})

    def publish(self) -> None:
        create_table_artifact(
            table=self.rows or [{"instance": "-", "PR": "-", "outcome": "no previews"}],
            key=f"pr-{self.action}",
            description=f"pr-{self.action}: {len(self.changed)} changed, {len(self.failed)} failed",
        )


@flow(name="pr-sleep")
def pr_sleep(
    reason: str = "scheduled", dry_run: bool = False, config: RunOverrides | None = None
) -> PowerReport:
    """Stop every running preview that may sleep, tagged ``sleep-state=<reason>``."""
    settings = run_config(config)
    clients = build_clients(settings)
    logger = get_run_logger()
    report = PowerReport("sleep")
    now = datetime.now(UTC)
    budget = settings.terminate_timeout_seconds + 4 * settings.sleep_lock_wait_seconds
    with run_budget(budget + 300):
        # 1. Every running preview, and which of them may sleep.
        for decision in plan_sleep(awake_previews(clients, settings), now):
            preview = decision.preview
            pr = f"{preview.repo}#{preview.pr_number}" if preview.pr_number else "-"
            if not decision.sleeps or dry_run:
                outcome = "would sleep (dry run)" if decision.sleeps else decision.reason
                report.add(preview.instance_id, pr, outcome)
                continue
            # 2. Under the PR's lock: a run deploying it keeps it awake.
            assert preview.repo is not None and preview.pr_number is not None
            try:
                with hold(
                    pr_lock_name(preview.repo, preview.pr_number),
                    lease_seconds=settings.lock_lease_seconds,
                    timeout_seconds=settings.sleep_lock_wait_seconds,
                ):
                    slept = sleep(clients, settings, preview.instance_id, reason)
            except LockTimeout:
                logger.info("%s %s", preview.instance_id, BEING_DEPLOYED)
                report.add(preview.instance_id, pr, BEING_DEPLOYED)
                continue
            if slept is None:
                report.add(preview.instance_id, pr, "changed meanwhile: left as it is")
                continue
            report.changed.append(preview.instance_id)
            report.add(preview.instance_id, pr, f"asleep ({reason})")
            emit_instance_event(
                "slept", preview.instance_id, preview.repo, preview.pr_number, reason=reason
            )
    report.publish()
    return report


@flow(name="pr-wake")
def pr_wake(reason: str = "scheduled", config: RunOverrides | None = None) -> PowerReport:
    """Start the previews asleep for ``reason``, each checked healthy again."""
    settings = run_config(config)
    clients = build_clients(settings)
    logger = get_run_logger()
    report = PowerReport("wake")
    per_preview = settings.lock_wait_seconds + settings.wake_timeout_seconds
    with run_budget(per_preview + settings.probe_timeout_seconds + 300):
        for preview in sleeping_previews(clients, settings, reason):
            if not preview.repo or preview.pr_number is None:
                continue  # a spare's sleep is the spares' flow to end
            pr = f"{preview.repo}#{preview.pr_number}"
            try:
                outcome = _wake_one(clients, settings, preview.instance_id, preview)
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
    clients: AwsClients, settings: PreviewConfig, instance_id: str, preview: Preview
) -> str:
    assert preview.repo and preview.pr_number is not None  # sleeping_previews: a PR's only
    with hold(
        pr_lock_name(preview.repo, preview.pr_number),
        lease_seconds=settings.lock_lease_seconds,
        timeout_seconds=settings.lock_wait_seconds,
    ):
        woke = wake(clients, settings, instance_id)
        answer = probe(clients, settings, instance_id)
    emit_instance_event("woke", instance_id, preview.repo, preview.pr_number)
    return (
        f"awake in {woke.seconds:.1f} s, timer {woke.timer_minutes} min,"
        f" {answer.path} → {answer.status_code}"
    )
