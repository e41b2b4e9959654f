"""A small GitHub REST client: the PR, its comments and its deployments (runbook §2 step 7).

Built when a run needs it (``github_from_config``) and passed to the steps. It is the one
retry layer for GitHub calls, because only it sees the rate-limit headers: 5xx answers and
rate limits are retried here (waiting as long as GitHub asks, within ``max_wait_seconds``),
401 and 404 never. The Prefect tasks that call it therefore run without task retries.

The token lives in one private attribute and the ``Authorization`` header. It never appears
in a message, a log line or a repr; ``GitHubError`` texts are scrubbed of it as well.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import httpx

from tasks.prefect_context import api_reachable
from tasks.retry import Transient

if TYPE_CHECKING:
    from tasks.config import PreviewConfig

logger = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
PER_PAGE = 100
SECONDARY_RATE_LIMIT_WAIT = 60.0

DeploymentState = Literal["in_progress", "success", "failure", "error", "inactive", "queued"]

COMMENT_PERMISSION = "pull-requests: write / issues: write"
DEPLOYMENT_PERMISSION = "deployments: write"
READ_PERMISSION = "pull-requests: read (and access to the repository)"


class GitHubError(Exception):
    """A GitHub call failed; the message names the call, the status and what to do."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class GitHubUnavailable(GitHubError, Transient):
    """5xx, a dropped connection or a rate limit that outlasted our patience: try again later."""


class GitHubRateLimited(GitHubUnavailable):
    """GitHub asked us to wait longer than ``max_wait_seconds``."""


class GitHubAuthError(GitHubError):
    """401: the token is invalid, expired or revoked. Retrying cannot help."""


class GitHubPermissionError(GitHubError):
    """403/404 on a write: the token cannot do this on this repository."""


class GitHubNotFound(GitHubError):
    """404 on a read: no such object, or the token cannot see the repository."""


class GitHubDisabled(GitHubError):
    """No token was configured, so there is nothing we may call."""


@dataclass(frozen=True)
class _Call:
    """What a request is for, so an error can say which permission was missing."""

    write: bool = False
    permission: str = READ_PERMISSION


@dataclass(frozen=True)
class Identity:
    """The GitHub user the token acts as; comments are ours only when this user wrote them."""

    id: int
    login: str


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
    ) -> None:
        self._token = token or None
        self.base_url = base_url.rstrip("/")
        self.max_wait_seconds = max_wait_seconds
        self.max_retries = max_retries
        self._sleep = sleep
        self._clock = clock
        headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": "pr-preview",
        }
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        self._client = httpx.Client(
            base_url=self.base_url, headers=headers, transport=transport, timeout=timeout
        )
        self._identity: Identity | None = None

    @property
    def enabled(self) -> bool:
        """False without a token: callers publish to Prefect instead of GitHub."""
        return self._token is not None

    def __repr__(self) -> str:
        return f"GitHub(base_url={self.base_url!r}, enabled={self.enabled})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GitHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- who we are

    def identity(self) -> Identity | None:
        """The token's own user (``GET /user``), read once per client; None when GitHub will not
        say (a token without that permission): the caller then cannot tell its own comments."""
        if self._identity is None and self.enabled:
            try:
                user = self._request("GET", "/user", call=_Call()).json()
                self._identity = Identity(int(user["id"]), str(user["login"]))
            except (GitHubError, KeyError, TypeError, ValueError) as exc:
                logger.warning("GitHub did not say who this token is: %s", exc)
        return self._identity

    # --- pull requests

    def get_pull(self, repo: str, number: int) -> dict[str, Any]:
        """The pull request as the REST API returns it (``head.sha``, ``state``, repos)."""
        response = self._request("GET", f"/repos/{repo}/pulls/{int(number)}", call=_Call())
        return dict(response.json())

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

    # --- issue comments (a PR's conversation is its issue)

    def list_issue_comments(self, repo: str, number: int) -> list[dict[str, Any]]:
        """Every comment of the PR, all pages, oldest first."""
        return list(self._paginate(f"/repos/{repo}/issues/{int(number)}/comments"))

    def create_issue_comment(self, repo: str, number: int, body: str) -> dict[str, Any]:
        response = self._request(
            "POST",
            f"/repos/{repo}/issues/{int(number)}/comments",
            json={"body": body},
            call=_Call(write=True, permission=COMMENT_PERMISSION),
        )
        return dict(response.json())

    def update_issue_comment(self, repo: str, comment_id: int, body: str) -> dict[str, Any]:
        response = self._request(
            "PATCH",
            f"/repos/{repo}/issues/comments/{int(comment_id)}",
            json={"body": body},
            call=_Call(write=True, permission=COMMENT_PERMISSION),
        )
        return dict(response.json())

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
        response = self._request(
            "POST",
            f"/repos/{repo}/deployments",
            json=payload,
            call=_Call(write=True, permission=DEPLOYMENT_PERMISSION),
        )
        if response.status_code == 202:  # GitHub answers 202 when it merged instead
            raise GitHubError(
                f"GitHub did not create a deployment of {sha} in {repo}: {_message(response)}",
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
        response = self._request(
            "POST",
            f"/repos/{repo}/deployments/{int(deployment_id)}/statuses",
            json=payload,
            call=_Call(write=True, permission=DEPLOYMENT_PERMISSION),
        )
        return dict(response.json())

    def list_deployments(self, repo: str, environment: str) -> list[dict[str, Any]]:
        """Every deployment to ``environment``, newest first."""
        return list(self._paginate(f"/repos/{repo}/deployments", {"environment": environment}))

    # --- plumbing

    def _paginate(
        self, path: str, params: Mapping[str, str | int] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Follow ``Link: rel="next"`` to the end, never off GitHub's host (the token goes too)."""
        url: str | None = path
        query: dict[str, str | int] | None = {**(params or {}), "per_page": PER_PAGE}
        while url is not None:
            response = self._request("GET", url, params=query, call=_Call())
            items = response.json()
            if not isinstance(items, list):
                raise GitHubError(f"GET {_path(response.request)}: expected a list, got {items!r}")
            yield from items
            url = response.links.get("next", {}).get("url")
            query = None  # the next link carries the query
            if url is not None and urlsplit(url).netloc != urlsplit(self.base_url).netloc:
                raise GitHubError(f"refusing to follow a pagination link to another host: {url}")

    def _request(
        self,
        method: str,
        url: str,
        *,
        call: _Call,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
    ) -> httpx.Response:
        if not self.enabled:
            raise GitHubDisabled(f"{method} {url}: no GitHub token is configured")
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._client.request(method, url, json=json, params=params)
            except httpx.TransportError as exc:
                failure: GitHubError = GitHubUnavailable(
                    self._scrub(f"{method} {url}: {type(exc).__name__}: {exc}")
                )
                delay = self._backoff(attempt)
            else:
                if response.status_code < 400:
                    return response
                failure = self._error(response, call)
                if not isinstance(failure, Transient):
                    raise failure
                asked = self._rate_limit_wait(response)
                delay = self._backoff(attempt) if asked is None else asked
                if asked is not None and waited + asked > self.max_wait_seconds:
                    raise GitHubRateLimited(
                        f"{failure} — GitHub asks to wait {asked:.0f} s, more than the "
                        f"{self.max_wait_seconds:.0f} s allowed; try again later",
                        status=response.status_code,
                    ) from None
            remaining = self.max_wait_seconds - waited
            if attempt > self.max_retries or remaining <= 0:
                raise failure
            delay = max(0.0, min(delay, remaining))
            logger.warning("%s; retrying in %.1f s", failure, delay)
            self._sleep(delay)
            waited += delay

    def _backoff(self, attempt: int) -> float:
        return float(min(2 ** (attempt - 1), 30)) * (0.5 + random.random() / 2)

    def _rate_limit_wait(self, response: httpx.Response) -> float | None:
        """Seconds GitHub asks us to wait, or None when this is not a rate limit."""
        headers = response.headers
        retry_after = headers.get("Retry-After")
        if retry_after is not None:
            try:
                return max(0.0, float(retry_after))
            except ValueError:
                pass
        if headers.get("X-RateLimit-Remaining") == "0" and headers.get("X-RateLimit-Reset"):
            try:
                return max(0.0, float(headers["X-RateLimit-Reset"]) - self._clock()) + 1.0
            except ValueError:
                pass
        if response.status_code in (403, 429):
            return SECONDARY_RATE_LIMIT_WAIT
        return None

    def _error(self, response: httpx.Response, call: _Call) -> GitHubError:
        status = response.status_code
        where = f"{response.request.method} {_path(response.request)} → {status}"
        message = self._scrub(_message(response))
        if status >= 500:
            return GitHubUnavailable(f"{where}: {message}", status=status)
        if status == 429 or (status == 403 and _is_rate_limit(response)):
            return GitHubUnavailable(f"{where}: rate limited: {message}", status=status)
        if status == 401:
            return GitHubAuthError(
                f"{where}: GitHub rejected the token ({message}); it is invalid, expired or "
                "revoked — replace the GitHub token Secret block or GITHUB_TOKEN",
                status=status,
            )
        if call.write and status in (403, 404):
            return GitHubPermissionError(
                f"{where}: {message} — the token lacks {call.permission} on this repository "
                "(or cannot see it)",
                status=status,
            )
        if status == 404:
            return GitHubNotFound(
                f"{where}: {message} — no such object, or the token lacks {call.permission}",
                status=status,
            )
        if status == 403:
            return GitHubPermissionError(
                f"{where}: {message} — the token lacks {call.permission}", status=status
            )
        return GitHubError(f"{where}: {message}", status=status)

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "****") if self._token else text


def _is_rate_limit(response: httpx.Response) -> bool:
    if response.headers.get("X-RateLimit-Remaining") == "0":
        return True
    if "Retry-After" in response.headers:
        return True
    return "rate limit" in _message(response).lower()


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.reason_phrase or f"HTTP {response.status_code}"
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return response.reason_phrase or f"HTTP {response.status_code}"


def _path(request: httpx.Request) -> str:
    return request.url.path


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
    config: PreviewConfig,
    env: Mapping[str, str] = os.environ,
    transport: httpx.BaseTransport | None = None,
) -> GitHub:
    """A client for this run: token from the Secret block, else GITHUB_TOKEN; GITHUB_API_URL."""
    token = None
    if api_reachable(env):
        token = token_from_secret_block(config.github_token_secret_block)
    if not token:
        token = env.get("GITHUB_TOKEN") or None
    base_url = env.get("GITHUB_API_URL") or DEFAULT_API_URL
    github = GitHub(token, base_url=base_url, transport=transport)
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


def report_deployment(
    github: GitHub,
    repo: str,
    pr_number: int,
    sha: str,
    state: DeploymentState,
    *,
    deployment_id: int | None = None,
    log_url: str | None = None,
    environment_url: str | None = None,
    description: str | None = None,
) -> int | None:
    """Show the preview's state on the PR page through environment ``pr-<n>``.

    Creates the deployment of ``sha`` when ``deployment_id`` is None and returns its id, so the
    flow posts later states to the same one. ``inactive`` without an id marks every deployment
    of the environment inactive (teardown). A token that may not write deployments, or a GitHub
    still failing after the client's retries, is logged and ignored: the deployment is a view of
    the preview, not part of it.
    """
    if not github.enabled:
        return None
    environment = deployment_environment(pr_number)
    try:
        if deployment_id is None and state == "inactive":
            for deployment in github.list_deployments(repo, environment):
                github.create_deployment_status(
                    repo, int(deployment["id"]), "inactive", description=description
                )
            return None
        if deployment_id is None:
            deployment_id = int(github.create_deployment(repo, sha, environment)["id"])
        github.create_deployment_status(
            repo,
            deployment_id,
            state,
            environment_url=environment_url,
            log_url=log_url,
            description=description,
        )
    except GitHubError as exc:  # after the client's own retries: a view, never fatal
        logger.warning("GitHub deployment status not posted: %s", exc)
    return deployment_id
