"""ttl_sweeper: nothing outlives its TTL or its pull request (runbook §9, §11).

Runs every 15 minutes from ``prefect.yaml`` and by hand
(``prefect deployment run ttl-sweeper/ttl-sweeper -p dry_run=true``). It catches what a crashed
flow or a lost webhook left behind, and touches nothing without our Purpose tag or tagged
``pr-preview:keep=true``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from prefect import Task, flow
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.logging import get_run_logger

from tasks.aws import build_clients
from tasks.config import PreviewConfig, load_config
from tasks.instances import TERMINATE_BATCH
from tasks.sweep import (
    EmitEvent,
    PullRequests,
    StickyExpiry,
    SweepReport,
    announce,
    find_sweep_candidates,
    look_up_pull_requests,
    plan_sweep,
    publish_sweep_report,
    pulls_to_look_up,
    revoke_leftover_db_rules,
    terminate_expired,
)
from tasks.terminate import TerminateFailed

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger(__name__)


class SweepIncomplete(RuntimeError):
    """Some previews that should have gone are still there; the next sweep tries again."""


def _step(step: Task[P, R], config: PreviewConfig) -> Callable[P, R]:
    """In a flow run, a task run with the configured retries; outside one, the plain function."""
    if FlowRunContext.get() is None:
        return step.fn
    return step.with_options(
        retries=config.task_retries, retry_delay_seconds=config.retry_delay_seconds
    )


def _log() -> logging.Logger | logging.LoggerAdapter[Any]:
    return get_run_logger() if FlowRunContext.get() else logger


def sweep(
    ec2: EC2Client,
    config: PreviewConfig,
    *,
    dry_run: bool = False,
    github: PullRequests | None = None,
    emit: EmitEvent | None = None,
    now: datetime | None = None,
    max_age_hours: float | None = None,
    batch_size: int = TERMINATE_BATCH,
) -> SweepReport:
    """The sweep over explicit clients: list, decide, terminate, revoke, announce."""
    now = now or datetime.now(UTC)
    log = _log()

    # 1. Every live instance with our Purpose tag (runbook §9's describe-instances, paginated).
    previews = _step(find_sweep_candidates, config)(ec2, config.purpose_tag)

    # 2. Decide by tags; ask GitHub only about PRs whose previews the tags would keep.
    ttl, max_age = config.ttl_hours, max_age_hours
    decisions = plan_sweep(previews, now, ttl_hours=ttl, max_age_hours=max_age)
    lookups = pulls_to_look_up(decisions) if github is not None and github.enabled else []
    if github is not None and lookups:
        pr_states = _step(look_up_pull_requests, config)(github, lookups)
        decisions = plan_sweep(
            previews, now, ttl_hours=ttl, max_age_hours=max_age, pr_states=pr_states
        )
    report = SweepReport(dry_run=dry_run, now=now, decisions=decisions, pr_lookups=len(lookups))
    for decision in decisions:
        if decision.action == "terminate":
            log.info(
                "%s %s: %s",
                "would terminate" if dry_run else "terminate",
                decision.instance_id,
                decision.reason,
            )

    # 3. Terminate in batches of 1,000 (runbook §9's terminate-instances).
    if report.to_terminate and not dry_run:
        try:
            result = _step(terminate_expired, config)(ec2, report.to_terminate, batch_size)
        except TerminateFailed as exc:  # still throttled after the task's retries
            if exc.result is None:
                raise
            result = exc.result
        report.terminated, report.already_gone = result.terminated, result.already_gone
        report.failed, report.terminate_calls = result.failed, result.calls
        errors: dict[str, list[str]] = {}
        for iid, error in result.failed.items():
            errors.setdefault(error, []).append(iid)
        for error, ids in errors.items():
            log.error("terminating %d previews failed (%s…): %s", len(ids), ids[0], error)

    # 5. pr-preview.terminated per instance; the PR's sticky comment says "expired".
    if report.terminated:
        _step(announce, config)(report, emit, github)
    # 4. The temporary /32 rules on db-sg of runbook §2.5 that no live preview uses.
    if config.db_sg_open_public_ip and config.db_security_group_id:
        report.revoked_rules = _step(revoke_leftover_db_rules, config)(
            ec2, config.db_security_group_id, report.live, dry_run
        )
        for rule in report.revoked_rules:
            log.info(
                "%s db-sg rule %s (%s)",
                "would revoke" if dry_run else "revoked",
                rule.cidr,
                rule.description,
            )

    return report


def github_or_none(config: PreviewConfig) -> PullRequests | None:
    """The GitHub client when one is configured; without it the sweep goes by tags alone."""
    try:
        from tasks.github import github_from_config
    except ImportError:
        logger.info("tasks.github not available: sweeping by tags alone")
        return None
    try:
        github = github_from_config(config)
    except Exception as exc:  # no token must not stop the TTL sweep
        _log().warning("GitHub not configured (%s): sweeping by tags alone", exc)
        return None
    return StickyExpiry(github, config.region) if github.enabled else None


@flow(name="ttl-sweeper")
def ttl_sweeper(dry_run: bool = False, config: PreviewConfig | None = None) -> SweepReport:
    """Terminate previews past their TTL, with a closed PR, or too old to judge; report all."""
    config = load_config(config)
    clients = build_clients(config)
    github = github_or_none(config)
    report = sweep(clients.ec2, config, dry_run=dry_run, github=github, emit=emit_event)
    publish_sweep_report(report)
    if report.failed:
        raise SweepIncomplete(
            f"{len(report.failed)} previews could not be terminated; see the ttl-sweep artifact"
        )
    return report


__all__ = ["SweepIncomplete", "github_or_none", "sweep", "ttl_sweeper"]
