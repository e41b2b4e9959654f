"""Tear down one pull request's preview when it closes (runbook §2.8), when it loses the
preview label (``trigger_mode: label``), or when it becomes a draft (``skip_drafts``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect.states import Completed

from flows.run_end import state_hook
from tasks.cloud.aws import build_clients
from tasks.config import PreviewConfig, RunOverrides, run_config
from tasks.github.client import github_from_config
from tasks.github.pull_request import PreviewState
from tasks.inputs import check_inputs
from tasks.run.approvals import forget_approval
from tasks.run.budget import grace, run_budget
from tasks.run.events import emit_instance_event
from tasks.run.locks import delete_lock, hold, pr_lock_name
from tasks.run.outcome import Outcome
from tasks.run.prefect_context import rename_run
from tasks.steps.database import drop_database
from tasks.steps.db_access import close_db_access
from tasks.steps.dns import remove_name
from tasks.steps.guards import check_trigger, confirm_closed, confirm_draft, confirm_unlabeled
from tasks.steps.report import run_report
from tasks.steps.teardown import run_teardown_command, teardown

Cause = Literal["closed", "unlabeled", "draft"]


@dataclass
class TeardownResult:
    repo: str
    pr_number: int
    terminated: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)
    database: str | None = None  # database: per-preview — the one dropped
    dns_name: str | None = None  # dns_zone_id — the name removed


@flow(
    name="pr-teardown",
    flow_run_name="pr-{pr_number}-teardown",
    on_crashed=[state_hook],
    on_cancellation=[state_hook],
)
def pr_teardown(
    repo: str,
    pr_number: int,
    config: RunOverrides | None = None,
    action: str = "closed",
    label: str | None = None,
) -> TeardownResult:
    """Terminate every instance of ``repo#pr_number``; other PRs and untagged instances stay.

    ``action`` ``unlabeled`` with ``label`` the preview label (``trigger_mode: label``) tears
    down the same way; any other label changes nothing. ``converted_to_draft`` tears down
    with ``skip_drafts`` only."""
    check_inputs(repo, pr_number)
    settings = run_config(config)
    if not settings.serves(repo):
        return _nothing_done(repo, pr_number, Outcome.NOT_ALLOWED, settings.not_served(repo))
    trigger = check_trigger(settings.trigger_mode, settings.preview_label, action, label or None)
    if not trigger.ok:
        assert trigger.verdict is not None
        return _nothing_done(repo, pr_number, trigger.verdict, trigger.reason)
    if action == "converted_to_draft" and not settings.skip_drafts:
        why = "skip_drafts is off: a draft keeps its preview"
        return _nothing_done(repo, pr_number, Outcome.DRAFT_IGNORED, why)
    causes: dict[str, Cause] = {"unlabeled": "unlabeled", "converted_to_draft": "draft"}
    with run_budget(settings.teardown_timeout_seconds()):
        return _teardown(settings, repo, pr_number, causes.get(action, "closed"))


def _nothing_done(repo: str, pr_number: int, outcome: Outcome, reason: str) -> TeardownResult:
    """Completed, named after why nothing was torn down (the run's name too, for a label)."""
    get_run_logger().warning("not tearing down: %s", reason)
    if outcome.run_name_suffix:
        rename_run(outcome.run_name_suffix)
    state: State[TeardownResult] = Completed(
        name=outcome.state_name, message=reason, data=TeardownResult(repo, pr_number)
    )
    return cast(TeardownResult, state)


def _teardown(
    settings: PreviewConfig,
    repo: str,
    pr_number: int,
    cause: Cause = "closed",
) -> TeardownResult:
    clients = build_clients(settings)
    github = github_from_config(settings, ssm=clients.ssm)
    report = run_report(github, settings, repo, pr_number)

    # Waits only for a run of this same PR, never for another PR's preview.
    lock = pr_lock_name(repo, pr_number)
    lease, wait = settings.lock_lease_seconds, settings.lock_wait_seconds
    with github, hold(lock, lease_seconds=lease, timeout_seconds=wait):
        # 0. Only a pull request that GitHub says is closed, no longer labelled, or a draft (a
        #    forged or stale event changes nothing).
        if cause == "unlabeled":
            confirmed = confirm_unlabeled(github, repo, pr_number, settings.preview_label)
        elif cause == "draft":
            confirmed = confirm_draft(github, repo, pr_number)
        else:
            confirmed = confirm_closed(github, repo, pr_number)
        if not confirmed.ok:
            assert confirmed.verdict is not None
            return _nothing_done(repo, pr_number, confirmed.verdict, confirmed.reason)
        why = {
            "unlabeled": "preview label removed",
            "draft": "converted to a draft",
            "closed": "pull request closed",
        }[cause]
        # 1. The app's teardown_command on each running preview (bounded; its failure is
        #    logged, never blocking), then terminate exactly this PR's instances (tags
        #    Purpose, Repo, PR) and wait for them.
        try:
            run_teardown_command(clients, settings, repo, pr_number)
            removed = teardown(clients.ec2, settings, repo, pr_number)
        except Exception as exc:
            with grace():
                report.tell(
                    PreviewState.FAILED,
                    diagnosis=f"teardown failed: {exc}; the TTL sweeper removes the preview at"
                    " its shutdown-at",
                )
            raise
        for instance_id in removed.instance_ids:
            emit_instance_event("terminated", instance_id, repo, pr_number, reason=why)
        # 1b. Its own database, role and DATABASE_URL parameter (database: per-preview); the
        #     sweeper drops any this step leaves.
        dropped = None
        if settings.database == "per-preview":
            try:
                dropped = drop_database(clients, settings, repo, pr_number)
            except Exception as exc:
                with grace():
                    report.tell(
                        PreviewState.FAILED,
                        diagnosis=f"the preview is gone, its database not: {exc}; the TTL"
                        " sweeper drops it",
                    )
                raise
        # 1c. Its name in the VPC (dns_zone_id); the sweeper removes any this step leaves.
        name = None
        try:
            name = remove_name(clients, settings, repo, pr_number)
        except Exception as exc:
            get_run_logger().warning("the name of %s#%d not removed: %s", repo, pr_number, exc)

        # 2. Tell the pull request: the comment says torn down, the deployment goes inactive.
        report.tell(
            PreviewState.TORN_DOWN,
            instance_id=", ".join(removed.instance_ids) or None,
            detail={
                "unlabeled": f"The `{settings.preview_label}` label was removed.",
                "draft": "The pull request was converted to a draft: marking it ready for"
                " review, or `/preview redeploy`, launches a new preview.",
            }.get(cause),
        )
        # 3. The db-sg rules of runbook §2.5 (the sweeper revokes any this step leaves).
        close_db_access(clients.ec2, settings, removed.instance_ids)

    # 4. A closed PR needs no lock any more (a reopened one creates it again), nor a fork's
    #    approval (a reopened one asks again).
    if cause == "closed":
        delete_lock(lock)
        forget_approval(repo, pr_number)
    result = TeardownResult(
        repo, pr_number, removed.instance_ids, removed.already_gone, dropped, name
    )
    create_markdown_artifact(
        markdown=(
            f"## Teardown of {repo}#{pr_number}\n\n"
            f"terminated: {', '.join(result.terminated) or 'nothing was running'}"
            + (f"\n\ndatabase dropped: `{dropped}`" if dropped else "")
        ),
        key=f"pr-{pr_number}-teardown",
        description="pr-preview teardown",
    )
    return result
