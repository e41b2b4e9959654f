"""What a pull request sees of a run: the sticky comment and the GitHub deployment status."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tasks.comment import CommentState, PreviewState, post_comment
from tasks.config import PreviewConfig
from tasks.cost import preview_cost
from tasks.github import DeploymentState, GitHub, report_deployment
from tasks.step import step

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


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class PullRequestReport:
    """Tells the pull request each state of the run, in one comment and one deployment."""

    github: GitHub
    config: PreviewConfig
    repo: str
    pr_number: int
    sha: str | None
    run_url: str | None
    secrets: list[str] = field(default_factory=list, repr=False)
    deployment_id: int | None = None
    clock: Callable[[], datetime] = field(default=_now, repr=False)

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
            cost = preview_cost(self.config, launched_at, expires_at, self.clock())
        comment = post_comment(
            self.github,
            CommentState(
                state=state,
                repo=self.repo,
                pr_number=self.pr_number,
                sha=self.sha,
                instance_id=instance_id,
                region=self.config.region,
                expires_at=expires_at,
                app_port=self.config.app_port,
                diagnosis=diagnosis,
                flow_run_url=self.run_url,
                detail=detail,
                cost=cost,
            ),
            secrets=self.secrets,
        )
        target = DEPLOYMENT_STATES.get(state)
        if target and self.github.enabled and self.config.github_deployments:
            self.deployment_id = deployment_status(
                self.github,
                self.repo,
                self.pr_number,
                self.sha or "",
                target,
                self.deployment_id,
                self.run_url,
            )
        return comment.body
