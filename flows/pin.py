"""Pin a pull request's preview while it carries the keep label (README, "Keep and expiry
warnings"); restart its TTL when the label comes off.

0. not served, another label, or no keep_label: nothing (no client, no comment)
1. under the PR's lock: GitHub says the label is on (off) now — a stale event changes nothing
2. each of the PR's live previews pinned (its expiry renewed when less than half a TTL is
   left), or unpinned (its TTL restarted from now, the timer first)
3. the sticky comment says so
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect.states import Completed

from tasks.cloud.aws import build_clients
from tasks.config import RUN_MARGIN_SECONDS, PreviewConfig, RunOverrides, run_config
from tasks.github.client import github_from_config
from tasks.github.pull_request import PreviewState
from tasks.inputs import check_inputs
from tasks.run.budget import run_budget
from tasks.run.locks import hold, pr_lock_name
from tasks.run.outcome import Outcome
from tasks.run.prefect_context import rename_run
from tasks.steps.command import pr_previews
from tasks.steps.dns import preview_name
from tasks.steps.pin import check_keep_event, confirm_keep_label, pin_preview, unpin_preview
from tasks.steps.report import run_report


@dataclass
class PinResult:
    repo: str
    pr_number: int
    pinned: bool  # what the label asked for
    instance_ids: list[str] = field(default_factory=list)
    shutdown_at: datetime | None = None  # the newest preview's, after the change


@flow(name="pr-pin", flow_run_name="pr-{pr_number}-{action}")
def pr_pin(
    repo: str,
    pr_number: int,
    action: str = "labeled",
    label: str | None = None,
    config: RunOverrides | None = None,
) -> PinResult:
    """``labeled`` with ``label`` the keep label pins ``repo#pr_number``'s preview,
    ``unlabeled`` unpins it; any other label changes nothing."""
    check_inputs(repo, pr_number)
    settings = run_config(config)
    result = PinResult(repo, pr_number, pinned=action == "labeled")
    if not settings.serves(repo):
        return _nothing_done(result, Outcome.NOT_ALLOWED, settings.not_served(repo))
    verdict = check_keep_event(settings.keep_label, action, label or None)
    if not verdict.ok:
        assert verdict.verdict is not None
        return _nothing_done(result, verdict.verdict, verdict.reason)
    # The PR's lock, then a timer command and a tag per preview: well inside the margin.
    with run_budget(settings.lock_wait_seconds + RUN_MARGIN_SECONDS):
        return _pin(settings, result)


def _nothing_done(result: PinResult, outcome: Outcome, reason: str) -> PinResult:
    """Completed, named after why nothing was pinned (the run's name too, for a label)."""
    get_run_logger().info("nothing pinned: %s", reason)
    if outcome.run_name_suffix:
        rename_run(outcome.run_name_suffix)
    state: State[PinResult] = Completed(name=outcome.state_name, message=reason, data=result)
    return cast(PinResult, state)


def _pin(settings: PreviewConfig, result: PinResult) -> PinResult:
    repo, pr_number, keep_label = result.repo, result.pr_number, settings.keep_label or ""
    clients = build_clients(settings)
    github = github_from_config(settings, ssm=clients.ssm)
    report = run_report(github, settings, repo, pr_number)
    lease, wait = settings.lock_lease_seconds, settings.lock_wait_seconds
    with github, hold(pr_lock_name(repo, pr_number), lease_seconds=lease, timeout_seconds=wait):
        # 1. The label as GitHub holds it now (a stale or forged event changes nothing).
        confirmed = confirm_keep_label(github, repo, pr_number, keep_label, on=result.pinned)
        if not confirmed.ok:
            assert confirmed.verdict is not None
            return _nothing_done(result, confirmed.verdict, confirmed.reason)

        # 2. Every live preview of the PR; one launched later is pinned by its deploy.
        previews = pr_previews(clients.ec2, settings, repo, pr_number)
        if not previews:
            get_run_logger().info("%s#%d has no preview now: nothing to pin", repo, pr_number)
            return result
        for preview in previews:
            change = pin_preview if result.pinned else unpin_preview
            result.shutdown_at = change(clients, settings, preview)
            result.instance_ids.append(preview.instance_id)

        # 3. The sticky comment: pinned, or when it expires now.
        newest = previews[-1]
        report.sha = newest.sha
        report.dns_name = preview_name(clients, settings, repo, pr_number)
        report.pinned_by = keep_label if result.pinned else None
        if result.pinned:
            detail = (
                f"📌 Pinned by the `{keep_label}` label: the preview does not expire while the"
                " label is on. Remove it to let the preview expire again."
            )
        else:
            detail = (
                f"The `{keep_label}` label was removed: the preview expires again, its TTL"
                " restarted from now. `/preview extend 8h` keeps it longer."
            )
        stopped = newest.state in ("stopping", "stopped")
        report.tell(
            PreviewState.STOPPED if stopped else PreviewState.READY,
            instance_id=newest.instance_id,
            expires_at=result.shutdown_at,
            detail=detail,
        )
    return result
