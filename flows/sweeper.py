"""ttl_sweeper: nothing outlives its TTL or its pull request (runbook §9, §11).

Runs every 15 minutes from ``prefect.yaml`` and by hand
(``prefect deployment run ttl-sweeper/ttl-sweeper -p dry_run=true``). It catches what a crashed
flow or a lost webhook left behind, and touches nothing without our Purpose tag or tagged
``pr-preview:keep=true``; a preview pinned by the keep label it keeps, and keeps ahead.

1. list every preview   2. decide by tags (and GitHub)   3. terminate in batches
4. announce: events, "expired" comments; warn the PRs whose preview expires within the hour
5. revoke leftover db-sg rules   6. renew the expiry of pinned previews
7. drop the databases of previews that are gone (database: per-preview)
8. put idle previews to sleep (idle_stop_minutes)
9. remove the names of previews that are gone (dns_zone_id)   10. report
"""

from __future__ import annotations

from prefect import flow
from prefect.events import emit_event

from flows.sleep import stop_idle_previews
from tasks.cloud.aws import build_clients
from tasks.cloud.databases import DatabaseFailed
from tasks.config import RunOverrides, run_config
from tasks.run.budget import run_budget
from tasks.run.errors import PreviewError
from tasks.steps.database import sweep_databases
from tasks.steps.dns import sweep_names
from tasks.steps.sleep import ACTIVITY_TIMEOUT_SECONDS
from tasks.steps.sweep import (
    StickyExpiry,
    SweepReport,
    github_or_none,
    publish_sweep_report,
    renew_pinned,
    sweep,
)


class SweepIncomplete(PreviewError):
    """Some previews that should have gone are still there; the next sweep tries again."""


@flow(name="ttl-sweeper")
def ttl_sweeper(dry_run: bool = False, config: RunOverrides | None = None) -> SweepReport:
    """Terminate previews past their TTL, with a closed PR, or too old to judge; report all."""
    settings = run_config(config)
    clients = build_clients(settings)
    budget = settings.sweep_timeout_seconds()
    if settings.idle_stop_minutes is not None:  # one activity read, a few locks
        budget += ACTIVITY_TIMEOUT_SECONDS + 4 * settings.sleep_lock_wait_seconds
    with run_budget(budget):
        report_github = github_or_none(settings)
        report = sweep(
            clients.ec2, settings, dry_run=dry_run, github=report_github, emit=emit_event
        )
        # 6. Pinned previews: their expiry, and the timer with it, kept ahead.
        renewals = renew_pinned(clients, settings, report.live, report.now, dry_run)
        report.renewed, report.failed_renewals = renewals.renewed, renewals.failed
        # 7. Preview databases whose preview is gone (database: per-preview).
        if settings.database == "per-preview":
            try:
                databases = sweep_databases(clients, settings, report.live_pulls(), dry_run=dry_run)
            except DatabaseFailed as exc:  # the host: the report still tells what went
                report.failed_databases = {settings.db_instance_id or "database host": str(exc)}
            else:
                report.dropped_databases = databases.dropped
                report.failed_databases = databases.failed
        # 8. Previews nobody used for idle_stop_minutes: asleep until a push or a tunnel.
        if settings.idle_stop_minutes is not None:
            github = report_github if isinstance(report_github, StickyExpiry) else None
            idle = stop_idle_previews(
                clients,
                settings,
                report.live,
                github.github if github else None,
                now=report.now,
                dry_run=dry_run,
            )
            report.idle = {row["instance"]: row["outcome"] for row in idle.rows}
            report.slept_idle = idle.changed
        # 9. Names in the VPC whose preview is gone (dns_zone_id).
        names_failed = ""
        try:
            report.removed_names = sweep_names(clients, settings, dry_run)
        except Exception as exc:  # Route 53: the report still tells what went
            names_failed = f" and the names not swept ({exc})"
    publish_sweep_report(report)
    if report.failed or report.failed_databases or report.failed_renewals or names_failed:
        raise SweepIncomplete(
            f"{len(report.failed)} previews could not be terminated,"
            f" {len(report.failed_databases)} databases not dropped,"
            f" {len(report.failed_renewals)} pinned previews not renewed{names_failed};"
            " see the ttl-sweep artifact"
        )
    return report
