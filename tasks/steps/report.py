"""What a pull request sees of a run: the sticky comment, the GitHub deployment status and,
with a GitHub App, the ``pr-preview`` check run on the head sha.

Every state goes through ``PullRequestReport.tell``, so the three always agree. The check run
goes queued → in_progress → success / failure, or neutral when the run rightly deployed
nothing; ``check_run()`` around a run's work makes sure it never stays open. Without a GitHub
token the comment is published as a Prefect markdown artifact and logged, and the run goes on:
the comment is a report, not a step the preview depends on. The text and the deployment live in
tasks/github/pull_request.py, which the sweeper uses too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tasks.app.cost import preview_cost
from tasks.app.masking import mask_secrets
from tasks.config import PreviewConfig
from tasks.github.client import CheckConclusion, CheckStatus, DeploymentState, GitHub, GitHubError
from tasks.github.pull_request import (
    CommentResult,
    CommentState,
    PreviewState,
    flow_run_url,
    headline,
    marker,
    render_comment,
    report_deployment,
    upsert_comment,
)
from tasks.run.budget import grace
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

logger = logging.getLogger(__name__)

CHECK_RUN_NAME = "pr-preview"
MAX_CHECK_SUMMARY_CHARS = 65535

DEPLOYMENT_STATES: dict[PreviewState, DeploymentState] = {
    PreviewState.LAUNCHING: "in_progress",
    PreviewState.READY: "success",
    PreviewState.UPDATED: "success",
    PreviewState.FAILED: "failure",
    PreviewState.TORN_DOWN: "inactive",
    PreviewState.EXPIRED: "inactive",
    PreviewState.CRASHED: "error",
    PreviewState.CANCELLED: "inactive",
}

CheckTarget = tuple[CheckStatus, CheckConclusion | None]
# A check run is on a commit: a report without a sha (a teardown's, the sweeper's) posts none.
# Stopped and torn down reach a commit's check through a command on its preview.
CHECK_RUN_STATES: dict[PreviewState, CheckTarget] = {
    PreviewState.LAUNCHING: ("in_progress", None),
    PreviewState.READY: ("completed", "success"),
    PreviewState.UPDATED: ("completed", "success"),
    PreviewState.FAILED: ("completed", "failure"),
    PreviewState.REFUSED: ("completed", "neutral"),
    PreviewState.SKIPPED: ("completed", "neutral"),
    PreviewState.AWAITING_APPROVAL: ("completed", "neutral"),
    PreviewState.STOPPED: ("completed", "neutral"),
    PreviewState.TORN_DOWN: ("completed", "neutral"),
    PreviewState.CRASHED: ("completed", "failure"),
    PreviewState.CANCELLED: ("completed", "cancelled"),
}
QUEUED: CheckTarget = ("queued", None)
NEUTRAL: CheckTarget = ("completed", "neutral")
FAILURE: CheckTarget = ("completed", "failure")


def report_check_run(
    github: GitHub,
    repo: str,
    sha: str,
    status: CheckStatus,
    *,
    conclusion: CheckConclusion | None = None,
    title: str,
    summary: str,
    check_run_id: int | None = None,
    details_url: str | None = None,
) -> int | None:
    """Show the run's state in the PR's checks list as check run ``pr-preview`` on ``sha``.

    ``queued`` creates a new check run (one per run); a later state edits ``check_run_id``, or
    — for a report from outside the run, a crash say — the newest unfinished one of ours on the
    sha. Returns the id for the next state. Like the deployment, a view: a GitHub that refuses
    is logged, never fatal. Nothing without an App (GitHub gives check runs to Apps only).
    """
    if not github.checks_enabled:
        return None
    output = {"title": title[:255], "summary": summary[:MAX_CHECK_SUMMARY_CHARS]}
    try:
        if check_run_id is None and status != "queued":
            found = github.latest_check_run(repo, sha, CHECK_RUN_NAME)
            if found is not None and found.get("status") != "completed":
                check_run_id = int(found["id"])
        if check_run_id is None:
            created = github.create_check_run(
                repo,
                sha,
                CHECK_RUN_NAME,
                status=status,
                conclusion=conclusion,
                output=output,
                details_url=details_url,
            )
            return int(created["id"])
        github.update_check_run(
            repo,
            check_run_id,
            status=status,
            conclusion=conclusion,
            output=output,
            details_url=details_url,
        )
    except GitHubError as exc:  # after the client's own retries: a view, never fatal
        logger.warning("GitHub check run not posted: %s", exc)
    return check_run_id


@step(retry=False)
def deployment_status(
    github: GitHub,
    repo: str,
    pr_number: int,
    sha: str,
    state: DeploymentState,
    deployment_id: int | None,
    log_url: str | None,
) -> int | None:
    """The ``pr-<n>`` environment's status on the PR page; the client retries by itself."""
    return report_deployment(
        github, repo, pr_number, sha, state, deployment_id=deployment_id, log_url=log_url
    )


@step(retry=False)
def check_run_status(
    github: GitHub,
    repo: str,
    sha: str,
    target: CheckTarget,
    title: str,
    summary: str,
    check_run_id: int | None,
    details_url: str | None,
) -> int | None:
    """The ``pr-preview`` check run on the PR's head sha; the client retries by itself."""
    status, conclusion = target
    return report_check_run(
        github,
        repo,
        sha,
        status,
        conclusion=conclusion,
        title=title,
        summary=summary,
        check_run_id=check_run_id,
        details_url=details_url,
    )


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class PullRequestReport:
    """Tells the pull request each state of the run: one comment, one deployment, one check."""

    github: GitHub
    settings: PreviewConfig
    repo: str
    pr_number: int
    sha: str | None
    run_url: str | None
    secrets: list[str] = field(default_factory=list, repr=False)
    deployment_id: int | None = None
    clock: Callable[[], datetime] = field(default=_now, repr=False)
    check_run_id: int | None = None
    check_concluded: bool = False
    services: tuple[str, ...] = ()  # shown once known (the compose file is checked first)
    variables: tuple[str, ...] = ()
    database: str | None = None  # `name` (size), once the preview's own database is made
    dns_name: str | None = None  # dns_zone_id: the preview's name, once published
    pinned_by: str | None = None  # the keep label, while it pins the preview

    def tell(
        self,
        state: PreviewState,
        *,
        instance_id: str | None = None,
        expires_at: datetime | None = None,
        diagnosis: str | None = None,
        detail: str | None = None,
        launched_at: datetime | None = None,
    ) -> str:
        """Post the comment for ``state`` (a Prefect artifact without a token); return it.

        ``launched_at`` (the instance's EC2 LaunchTime) lets a ready or updated comment say what
        the preview has cost so far and will cost by ``expires_at``.
        """
        cost = None
        if launched_at is not None:
            cost = preview_cost(self.settings, launched_at, expires_at, self.clock())
        comment = post_comment(
            self.github,
            CommentState(
                state=state,
                repo=self.repo,
                pr_number=self.pr_number,
                sha=self.sha,
                instance_id=instance_id,
                region=self.settings.region,
                expires_at=expires_at,
                app_port=self.settings.app_port,
                diagnosis=diagnosis,
                flow_run_url=self.run_url,
                detail=detail,
                cost=cost,
                services=self.services,
                variables=self.variables,
                secrets_path=self.settings.env_parameter_path,
                database=self.database,
                dns_name=self.dns_name,
                pinned_by=self.pinned_by,
            ),
            secrets=self.secrets,
        )
        target = DEPLOYMENT_STATES.get(state)
        if target and self.github.enabled and self.settings.github_deployments:
            self.deployment_id = deployment_status(
                self.github,
                self.repo,
                self.pr_number,
                self.sha or "",
                target,
                self.deployment_id,
                self.run_url,
            )
        self._check(CHECK_RUN_STATES.get(state), headline(state), self._summary(comment.body))
        return comment.body

    def skipped(self, title: str, reason: str) -> None:
        """A run that rightly deploys nothing (superseded, closed): a neutral check, no comment."""
        self._check(NEUTRAL, title, reason)

    @contextmanager
    def check_run(self) -> Iterator[None]:
        """Queue the check run now (the run may wait for its PR's lock) and make sure it is
        concluded: failure when the run raises before telling a result, neutral when it ends
        without one."""
        self._check(QUEUED, "Queued", "Waiting for this pull request's turn: one run at a time.")
        try:
            yield
        except Exception as exc:
            if not self.check_concluded:
                with grace():  # a run past its budget still concludes its check
                    why = f"{type(exc).__name__}: {exc}"
                    self._check(FAILURE, headline(PreviewState.FAILED), why)
            raise
        if not self.check_concluded:
            with grace():
                self._check(NEUTRAL, "Nothing deployed", "The run ended without deploying.")

    def _check(self, target: CheckTarget | None, title: str, summary: str) -> None:
        if target is None or not self.sha or not self.github.checks_enabled:
            return
        self.check_run_id = check_run_status(
            self.github,
            self.repo,
            self.sha,
            target,
            title,
            mask_secrets(summary, self.secrets),
            self.check_run_id,
            self.run_url,
        )
        self.check_concluded = target[0] == "completed"

    def _summary(self, body: str) -> str:
        """The comment without its marker and headline: the check's title says that."""
        lines = body.splitlines()
        while lines and (lines[0] == marker(self.repo, self.pr_number) or not lines[0].strip()):
            lines.pop(0)
        if lines and lines[0].startswith("### "):
            lines.pop(0)
        return "\n".join(lines).strip() or "—"


def run_report(
    github: GitHub, settings: PreviewConfig, repo: str, pr_number: int
) -> PullRequestReport:
    """The report of the flow run under way about a pull request, before it knows the sha its
    preview runs (a teardown, a command, the keep label): its comment links to the run."""
    from prefect.runtime import flow_run

    run_url = flow_run_url(settings.prefect_ui_url, flow_run.get_id())
    return PullRequestReport(github, settings, repo, pr_number, sha=None, run_url=run_url)


def artifact_key(pr_number: int) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"pr-{int(pr_number)}-comment"


@step(retry=False)
def post_comment(
    github: GitHub, status: CommentState, secrets: Iterable[str | None] = ()
) -> CommentResult:
    """Render and publish the sticky comment; never fails for want of a GitHub token.

    The client retries GitHub's transient answers itself, so this task has no retries. A token
    that may not comment, or a GitHub still down after those retries, is reported and the body
    published to Prefect instead.
    """
    from prefect.artifacts import create_markdown_artifact

    log = run_logger(logger)
    body = render_comment(status, secrets)
    if github.enabled:
        try:
            result = upsert_comment(github, status.repo, status.pr_number, body)
        except GitHubError as exc:  # after the client's own retries: report, don't fail
            log.error("PR comment not posted: %s", exc)
        else:
            log.info("PR comment %s (id %s)", result.action, result.comment_id)
            return result
    create_markdown_artifact(
        markdown=body,
        key=artifact_key(status.pr_number),
        description=f"The pr-preview comment for {status.repo}#{status.pr_number}",
    )
    log.info("PR comment (not posted to GitHub):\n%s", body)
    return CommentResult("skipped", None, body)
