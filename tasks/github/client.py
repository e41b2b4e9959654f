"""The GitHub REST resources the flows use: the PR, its comments, deployments and check runs.

A ``GitHub`` client is built when a run needs it (``github_from_config``) and passed to the
steps (runbook §2 step 7). Each method here is one resource call, small; the rest is in the
modules beside it, split as gidgethub splits its client:

- ``tasks.github.http``: the transport, with the verbs, pagination and the one retry layer for
  GitHub calls (5xx and rate limits retried, 401 and 404 never), so the Prefect tasks that call
  it run without task retries;
- ``tasks.github.sansio``: what an answer means, without I/O (the errors, the rate-limit waits);
- ``tasks.github.app``: a GitHub App's JWT and its installation tokens.

It authenticates with a token (a PAT, or ``GITHUB_TOKEN``) or as a GitHub App. Credentials
live in private attributes and the ``Authorization`` header of each request. They never appear
in a message, a log line or a repr; ``GitHubError`` texts are scrubbed of them as well.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx

from tasks.github.app import GitHubApp, app_from_config, app_slug, require_app
from tasks.github.http import GitHubHTTP
from tasks.github.sansio import (
    GitHubAuthError,
    GitHubDisabled,
    GitHubError,
    GitHubNotFound,
    GitHubPermissionError,
    GitHubRateLimited,
    GitHubUnavailable,
    checked_repo,
    checked_sha,
    message_of,
)
from tasks.inputs import is_login
from tasks.run.prefect_context import api_reachable

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

    from tasks.config import PreviewConfig

__all__ = [
    "WRITE_PERMISSIONS",
    "CheckConclusion",
    "CheckStatus",
    "DeploymentState",
    "GitHub",
    "GitHubAuthError",
    "GitHubDisabled",
    "GitHubError",
    "GitHubNotFound",
    "GitHubPermissionError",
    "GitHubRateLimited",
    "GitHubUnavailable",
    "Identity",
    "Reaction",
    "deployment_environment",
    "github_from_config",
    "latest_deployment_id",
    "token_from_secret_block",
]

logger = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"

DeploymentState = Literal["in_progress", "success", "failure", "error", "inactive", "queued"]
CheckStatus = Literal["queued", "in_progress", "completed"]
CheckConclusion = Literal["success", "failure", "neutral", "cancelled"]

COMMENT_PERMISSION = "pull-requests: write / issues: write"
DEPLOYMENT_PERMISSION = "deployments: write"
CHECKS_PERMISSION = "checks: write"
CONTENTS_PERMISSION = "contents: read"
METADATA_PERMISSION = "metadata: read"

WRITE_PERMISSIONS = frozenset({"admin", "write"})
"""The collaborator permissions (GitHub folds maintain into write) that may command previews."""
Reaction = Literal["+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"]


@dataclass(frozen=True)
class Identity:
    """The GitHub user the client acts as; comments are ours only when this user wrote them.

    A token's user is known by id. An App's bot is known by login (``<slug>[bot]``): the
    brackets cannot be part of a person's login, so nobody else can carry it.
    """

    id: int | None
    login: str

    def wrote(self, user: Mapping[str, Any] | None) -> bool:
        if not user:
            return False
        if self.id is not None:
            return bool(user.get("id") == self.id)
        return str(user.get("login", "")).lower() == self.login.lower()


class GitHub:
    """GitHub REST v3 over one ``httpx.Client`` (GitHub Enterprise through ``base_url``)."""

    def __init__(
        self,
        token: str | None,
        base_url: str = DEFAULT_API_URL,
        transport: httpx.BaseTransport | None = None,
        max_wait_seconds: float = 60,
        sleep: Callable[[float], None] = time.sleep,
        *,
        max_retries: int = 3,
        clock: Callable[[], float] = time.time,
        timeout: float = 30.0,
        app: GitHubApp | None = None,
    ) -> None:
        self._app = app
        self._http = GitHubHTTP(
            token,
            base_url,
            app=app,
            transport=transport,
            max_wait_seconds=max_wait_seconds,
            max_retries=max_retries,
            sleep=sleep,
            clock=clock,
            timeout=timeout,
        )
        self._identity: Identity | None = None

    @property
    def base_url(self) -> str:
        return self._http.base_url

    @property
    def enabled(self) -> bool:
        """False without a token or an App: callers publish to Prefect instead of GitHub."""
        return self._http.enabled

    @property
    def checks_enabled(self) -> bool:
        """Check runs need an App: GitHub refuses them to every other token."""
        return self._app is not None

    def __repr__(self) -> str:
        app = f", app_id={self._app.app_id}" if self._app else ""
        return f"GitHub(base_url={self.base_url!r}, enabled={self.enabled}{app})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GitHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- who we are

    def identity(self) -> Identity | None:
        """Who writes our comments, read once per client: the token's user (``GET /user``) or
        the App's bot (``GET /app``: ``<slug>[bot]``); None when GitHub will not say (a token
        without that permission): the caller then cannot tell its own comments."""
        if self._identity is None and self.enabled:
            try:
                if self._app is not None:
                    self._identity = Identity(None, f"{self.app_slug()}[bot]")
                else:
                    user = self._http.get("/user").json()
                    self._identity = Identity(int(user["id"]), str(user["login"]))
            except (GitHubError, KeyError, TypeError, ValueError) as exc:
                logger.warning("GitHub did not say who this client is: %s", exc)
        return self._identity

    def app_slug(self) -> str:
        """The App's slug (``GET /app``), read once; its bot user is ``<slug>[bot]``."""
        return app_slug(self._http, require_app(self._app))

    # --- pull requests

    def get_pull(self, repo: str, number: int) -> dict[str, Any]:
        """The pull request as the REST API returns it (``head.sha``, ``state``, repos)."""
        path = f"/repos/{checked_repo(repo)}/pulls/{int(number)}"
        return dict(self._http.get(path, repo=repo).json())

    def pull_state(self, repo: str, number: int) -> Literal["open", "closed"] | None:
        """``open``/``closed``, or None when unknown (no token, or the PR cannot be seen)."""
        if not self.enabled:
            return None
        try:
            state = self.get_pull(repo, number).get("state")
        except GitHubNotFound:
            return None
        if state == "open":
            return "open"
        if state == "closed":
            return "closed"
        return None

    def list_pull_files(self, repo: str, number: int) -> list[dict[str, Any]]:
        """The files the pull request changes (``filename``, ``status``), all pages; GitHub
        lists at most 3,000."""
        path = f"/repos/{checked_repo(repo)}/pulls/{int(number)}/files"
        return list(self._http.paginate(path, repo=repo))

    # --- repository contents

    def get_file(self, repo: str, path: str, ref: str) -> str:
        """The text of ``path`` at ``ref`` (``GET /repos/{repo}/contents/{path}``, raw).
        ``path`` must already be a checked relative path: it becomes part of the URL."""
        response = self._http.get(
            f"/repos/{checked_repo(repo)}/contents/{path}",
            repo=repo,
            params={"ref": ref},
            accept="application/vnd.github.raw+json",
            permission=CONTENTS_PERMISSION,
        )
        return response.text

    # --- issue comments (a PR's conversation is its issue)

    def list_issue_comments(self, repo: str, number: int) -> list[dict[str, Any]]:
        """Every comment of the PR, all pages, oldest first."""
        path = f"/repos/{checked_repo(repo)}/issues/{int(number)}/comments"
        return list(self._http.paginate(path, repo=repo))

    def create_issue_comment(self, repo: str, number: int, body: str) -> dict[str, Any]:
        path = f"/repos/{checked_repo(repo)}/issues/{int(number)}/comments"
        response = self._http.post(path, {"body": body}, repo=repo, permission=COMMENT_PERMISSION)
        return dict(response.json())

    def update_issue_comment(self, repo: str, comment_id: int, body: str) -> dict[str, Any]:
        path = f"/repos/{checked_repo(repo)}/issues/comments/{int(comment_id)}"
        response = self._http.patch(path, {"body": body}, repo=repo, permission=COMMENT_PERMISSION)
        return dict(response.json())

    def create_reaction(self, repo: str, comment_id: int, content: Reaction) -> dict[str, Any]:
        """React to an issue comment (201 new, 200 when we already had)."""
        path = f"/repos/{checked_repo(repo)}/issues/comments/{int(comment_id)}/reactions"
        response = self._http.post(
            path, {"content": content}, repo=repo, permission=COMMENT_PERMISSION
        )
        return dict(response.json())

    # --- collaborators

    def collaborator_permission(self, repo: str, login: str) -> str:
        """``login``'s permission on ``repo`` as GitHub says it now: ``admin``, ``write``,
        ``read`` or ``none`` (GitHub's 404 for someone who is no collaborator is ``none``).
        ``login`` must be a checked login (``tasks.inputs.is_login``): it is part of the URL."""
        if not is_login(login):
            raise ValueError(f"not a GitHub login: {login[:50]!r}")
        path = f"/repos/{checked_repo(repo)}/collaborators/{login}/permission"
        try:
            answer = self._http.get(path, repo=repo, permission=METADATA_PERMISSION).json()
        except GitHubNotFound:
            return "none"
        permission = answer.get("permission") if isinstance(answer, dict) else None
        return permission if permission in ("admin", "write", "read") else "none"

    # --- deployments (the PR page shows the preview's state)

    def create_deployment(
        self, repo: str, sha: str, environment: str, *, description: str | None = None
    ) -> dict[str, Any]:
        """A deployment of ``sha`` to ``environment``; never merges, waits for no checks."""
        payload: dict[str, Any] = {
            "ref": sha,
            "environment": environment,
            "auto_merge": False,
            "required_contexts": [],
            "transient_environment": True,
            "production_environment": False,
        }
        if description:
            payload["description"] = description[:140]
        path = f"/repos/{checked_repo(repo)}/deployments"
        response = self._http.post(path, payload, repo=repo, permission=DEPLOYMENT_PERMISSION)
        if response.status_code == 202:  # GitHub answers 202 when it merged instead
            raise GitHubError(
                f"GitHub did not create a deployment of {sha} in {repo}: {message_of(response)}",
                status=202,
            )
        return dict(response.json())

    def create_deployment_status(
        self,
        repo: str,
        deployment_id: int,
        state: DeploymentState,
        *,
        environment_url: str | None = None,
        log_url: str | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"state": state}
        if environment_url:
            payload["environment_url"] = environment_url
        if log_url:
            payload["log_url"] = log_url
        if description:
            payload["description"] = description[:140]
        path = f"/repos/{checked_repo(repo)}/deployments/{int(deployment_id)}/statuses"
        response = self._http.post(path, payload, repo=repo, permission=DEPLOYMENT_PERMISSION)
        return dict(response.json())

    def list_deployments(self, repo: str, environment: str) -> list[dict[str, Any]]:
        """Every deployment to ``environment``, newest first."""
        path = f"/repos/{checked_repo(repo)}/deployments"
        return list(self._http.paginate(path, repo=repo, params={"environment": environment}))

    # --- check runs (the PR's checks list; an App only)

    def create_check_run(
        self,
        repo: str,
        head_sha: str,
        name: str,
        *,
        status: CheckStatus,
        conclusion: CheckConclusion | None = None,
        output: Mapping[str, str] | None = None,
        details_url: str | None = None,
    ) -> dict[str, Any]:
        payload = _check_payload(status, conclusion, output, details_url)
        payload.update(name=name, head_sha=head_sha)
        path = f"/repos/{checked_repo(repo)}/check-runs"
        response = self._http.post(path, payload, repo=repo, permission=CHECKS_PERMISSION)
        return dict(response.json())

    def update_check_run(
        self,
        repo: str,
        check_run_id: int,
        *,
        status: CheckStatus,
        conclusion: CheckConclusion | None = None,
        output: Mapping[str, str] | None = None,
        details_url: str | None = None,
    ) -> dict[str, Any]:
        payload = _check_payload(status, conclusion, output, details_url)
        path = f"/repos/{checked_repo(repo)}/check-runs/{int(check_run_id)}"
        response = self._http.patch(path, payload, repo=repo, permission=CHECKS_PERMISSION)
        return dict(response.json())

    def latest_check_run(self, repo: str, sha: str, name: str) -> dict[str, Any] | None:
        """The newest check run ``name`` of this App on ``sha``, if any."""
        params: dict[str, str | int] = {"check_name": name, "filter": "latest"}
        if self._app is not None:
            params["app_id"] = self._app.app_id
        path = f"/repos/{checked_repo(repo)}/commits/{checked_sha(sha)}/check-runs"
        runs = self._http.get(path, repo=repo, params=params).json().get("check_runs") or []
        return dict(max(runs, key=lambda run: int(run["id"]))) if runs else None


def _check_payload(
    status: CheckStatus,
    conclusion: CheckConclusion | None,
    output: Mapping[str, str] | None,
    details_url: str | None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {"status": status}
    if conclusion is not None:
        payload["conclusion"] = conclusion
    if output:
        payload["output"] = dict(output)
    if details_url:
        payload["details_url"] = details_url
    return payload


def deployment_environment(pr_number: int) -> str:
    """The GitHub environment of one PR's preview."""
    return f"pr-{int(pr_number)}"


def token_from_secret_block(name: str) -> str | None:
    """The token in Prefect Secret block ``name``; None when it cannot be read (not fatal)."""
    try:
        from prefect.blocks.system import Secret

        block: Any = Secret.load(name)
        value = block.get()
    except Exception as exc:  # a missing block or an unreachable API means "no token here"
        logger.info("GitHub token Secret block %r not read (%s)", name, type(exc).__name__)
        return None
    return str(value) if value else None


def github_from_config(
    settings: PreviewConfig,
    env: Mapping[str, str] = os.environ,
    transport: httpx.BaseTransport | None = None,
    *,
    ssm: SSMClient | None = None,
    clock: Callable[[], float] = time.time,
) -> GitHub:
    """A client for this run (``GITHUB_API_URL`` for GitHub Enterprise): the GitHub App when
    ``github_app_id`` is set (no token is read then), else the token from the Secret block or
    ``GITHUB_TOKEN``. ``ssm`` reads an App key kept in Parameter Store."""
    base_url = env.get("GITHUB_API_URL") or DEFAULT_API_URL
    app = app_from_config(settings, ssm=ssm, clock=clock)
    if app is not None:
        logger.info("acting on GitHub as %s", app.label)
        return GitHub(None, base_url=base_url, transport=transport, clock=clock, app=app)
    token = None
    if api_reachable(env):
        token = token_from_secret_block(settings.github_token_secret_block)
    if not token:
        token = env.get("GITHUB_TOKEN") or None
    github = GitHub(token, base_url=base_url, transport=transport, clock=clock)
    if not github.enabled:
        logger.info("no GitHub token: comments go to Prefect artifacts and the log")
    return github


def latest_deployment_id(github: GitHub, repo: str, pr_number: int, sha: str) -> int | None:
    """The newest deployment of ``sha`` to the PR's environment, if a run created one."""
    if not github.enabled:
        return None
    try:
        for deployment in github.list_deployments(repo, deployment_environment(pr_number)):
            if deployment.get("sha") == sha:
                return int(deployment["id"])
    except GitHubError as exc:
        logger.warning("GitHub deployments not read: %s", exc)
    return None
