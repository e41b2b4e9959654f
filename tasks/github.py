"""A small GitHub REST client: the PR, its comments and its deployments (runbook §2 step 7).

Built when a run needs it (``github_from_config``) and passed to the steps. It is the one
retry layer for GitHub calls, because only it sees the rate-limit headers: 5xx answers and
rate limits are retried here (waiting as long as GitHub asks, within ``max_wait_seconds``),
401 and 404 never. The Prefect tasks that call it therefore run without task retries.

It authenticates with a token (a PAT, or ``GITHUB_TOKEN``) or as a GitHub App
(``tasks.github_app``): then each repository call carries the installation token of the App's
installation on that repository, looked up and renewed here before it expires, and the App's
own endpoints a JWT. Credentials live in private attributes and the ``Authorization`` header of
each request. They never appear in a message, a log line or a repr; ``GitHubError`` texts are
scrubbed of them as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import httpx

from tasks.github_app import GitHubApp, app_from_config
from tasks.inputs import is_repo, is_sha
from tasks.prefect_context import api_reachable
from tasks.retry import Transient
from tasks.tls import tls_context

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

    from tasks.config import PreviewConfig

logger = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
PER_PAGE = 100
SECONDARY_RATE_LIMIT_WAIT = 60.0
SLUG_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,99}")

DeploymentState = Literal["in_progress", "success", "failure", "error", "inactive", "queued"]
CheckStatus = Literal["queued", "in_progress", "completed"]
CheckConclusion = Literal["success", "failure", "neutral", "cancelled"]

COMMENT_PERMISSION = "pull-requests: write / issues: write"
DEPLOYMENT_PERMISSION = "deployments: write"
CHECK_RUN_NAME = "pr-preview"
MAX_CHECK_SUMMARY_CHARS = 65535
CHECKS_PERMISSION = "checks: write"
READ_PERMISSION = "pull-requests: read (and access to the repository)"
CONTENTS_PERMISSION = "contents: read"


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
    as_app: bool = False  # the App's own endpoints: a JWT, not an installation token


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
        self._token = token or None
        self._app = app
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
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            transport=transport,
            timeout=timeout,
            verify=tls_context(),
        )
        self._identity: Identity | None = None

    @property
    def enabled(self) -> bool:
        """False without a token or an App: callers publish to Prefect instead of GitHub."""
        return self._token is not None or self._app is not None

    @property
    def checks_enabled(self) -> bool:
        """Check runs need an App: GitHub refuses them to every other token."""
        return self._app is not None

    def __repr__(self) -> str:
        app = f", app_id={self._app.app_id}" if self._app else ""
        return f"GitHub(base_url={self.base_url!r}, enabled={self.enabled}{app})"

    def close(self) -> None:
        self._client.close()

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
                    user = self._request("GET", "/user", call=_Call()).json()
                    self._identity = Identity(int(user["id"]), str(user["login"]))
            except (GitHubError, KeyError, TypeError, ValueError) as exc:
                logger.warning("GitHub did not say who this client is: %s", exc)
        return self._identity

    # --- the App and its installations

    def app_slug(self) -> str:
        """The App's slug (``GET /app``), read once; its bot user is ``<slug>[bot]``."""
        app = self._require_app()
        if app.slug is None:
            answer = self._request("GET", "/app", call=_Call(as_app=True)).json()
            slug = str(answer.get("slug") or "")
            if not SLUG_PATTERN.fullmatch(slug):
                raise GitHubError(f"GET /app: {app.label} answered an unusable slug")
            app.slug = slug
        return app.slug

    def installation_id(self, repo: str) -> int:
        """The App's installation on ``repo``: configured, or ``GET /repos/{repo}/installation``."""
        app = self._require_app()
        found = app.installation_for(repo)
        if found is None:
            answer = self._request(
                "GET", f"/repos/{_repo(repo)}/installation", call=_Call(as_app=True), repo=repo
            ).json()
            found = int(answer["id"])
            app.keep_installation(repo, found)
        return found

    def installation_token(self, repo: str) -> str:
        """A token of the installation on ``repo`` with at least five minutes left; a new one
        (``POST /app/installations/{id}/access_tokens``) when the cached one is older. Each is
        asked for ``repo`` alone and the App's ``permissions``: GitHub refuses it any other
        repository of the installation, and anything else the App may do."""
        app = self._require_app()
        installation = self.installation_id(repo)
        token = app.cached_token(installation, repo)
        if token is None:
            answer = self._request(
                "POST",
                f"/app/installations/{int(installation)}/access_tokens",
                call=_Call(write=True, as_app=True),
                json=app.token_request(repo),
                repo=repo,
            ).json()
            token = app.keep_token(installation, repo, answer)
        return token

    def _require_app(self) -> GitHubApp:
        if self._app is None:
            raise GitHubDisabled("no GitHub App is configured")
        return self._app

    # --- pull requests

    def get_pull(self, repo: str, number: int) -> dict[str, Any]:
        """The pull request as the REST API returns it (``head.sha``, ``state``, repos)."""
        response = self._request(
            "GET", f"/repos/{_repo(repo)}/pulls/{int(number)}", call=_Call(), repo=repo
        )
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

    # --- repository contents

    def get_file(self, repo: str, path: str, ref: str) -> str:
        """The text of ``path`` at ``ref`` (``GET /repos/{repo}/contents/{path}``, raw).
        ``path`` must already be a checked relative path: it becomes part of the URL."""
        response = self._request(
            "GET",
            f"/repos/{_repo(repo)}/contents/{path}",
            call=_Call(permission=CONTENTS_PERMISSION),
            params={"ref": ref},
            repo=repo,
            accept="application/vnd.github.raw+json",
        )
        return response.text

    # --- issue comments (a PR's conversation is its issue)

    def list_issue_comments(self, repo: str, number: int) -> list[dict[str, Any]]:
        """Every comment of the PR, all pages, oldest first."""
        return list(self._paginate(repo, f"/repos/{_repo(repo)}/issues/{int(number)}/comments"))

    def create_issue_comment(self, repo: str, number: int, body: str) -> dict[str, Any]:
        response = self._write(
            "POST",
            repo,
            f"/repos/{_repo(repo)}/issues/{int(number)}/comments",
            {"body": body},
            COMMENT_PERMISSION,
        )
        return dict(response.json())

    def update_issue_comment(self, repo: str, comment_id: int, body: str) -> dict[str, Any]:
        response = self._write(
            "PATCH",
            repo,
            f"/repos/{_repo(repo)}/issues/comments/{int(comment_id)}",
            {"body": body},
            COMMENT_PERMISSION,
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
        response = self._write(
            "POST", repo, f"/repos/{_repo(repo)}/deployments", payload, DEPLOYMENT_PERMISSION
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
        response = self._write(
            "POST",
            repo,
            f"/repos/{_repo(repo)}/deployments/{int(deployment_id)}/statuses",
            payload,
            DEPLOYMENT_PERMISSION,
        )
        return dict(response.json())

    def list_deployments(self, repo: str, environment: str) -> list[dict[str, Any]]:
        """Every deployment to ``environment``, newest first."""
        return list(
            self._paginate(repo, f"/repos/{_repo(repo)}/deployments", {"environment": environment})
        )

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
        response = self._write(
            "POST", repo, f"/repos/{_repo(repo)}/check-runs", payload, CHECKS_PERMISSION
        )
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
        response = self._write(
            "PATCH",
            repo,
            f"/repos/{_repo(repo)}/check-runs/{int(check_run_id)}",
            _check_payload(status, conclusion, output, details_url),
            CHECKS_PERMISSION,
        )
        return dict(response.json())

    def latest_check_run(self, repo: str, sha: str, name: str) -> dict[str, Any] | None:
        """The newest check run ``name`` of this App on ``sha``, if any."""
        params: dict[str, str | int] = {"check_name": name, "filter": "latest"}
        if self._app is not None:
            params["app_id"] = self._app.app_id
        response = self._request(
            "GET",
            f"/repos/{_repo(repo)}/commits/{_sha(sha)}/check-runs",
            params=params,
            call=_Call(),
            repo=repo,
        )
        runs = response.json().get("check_runs") or []
        return dict(max(runs, key=lambda run: int(run["id"]))) if runs else None

    # --- plumbing

    def _paginate(
        self, repo: str, path: str, params: Mapping[str, str | int] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Follow ``Link: rel="next"`` to the end, never off GitHub's host (the token goes too)."""
        url: str | None = path
        query: dict[str, str | int] | None = {**(params or {}), "per_page": PER_PAGE}
        while url is not None:
            response = self._request("GET", url, params=query, call=_Call(), repo=repo)
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
        repo: str | None = None,
        accept: str | None = None,
    ) -> httpx.Response:
        if not self.enabled:
            raise GitHubDisabled(f"{method} {url}: no GitHub token is configured")
        waited = 0.0
        attempt = 0
        renewed = False
        while True:
            attempt += 1
            credential = self._credential(call, repo)
            headers = {"Authorization": f"Bearer {credential.secret}"}
            if accept:
                headers["Accept"] = accept
            try:
                response = self._client.request(
                    method, url, json=json, params=params, headers=headers
                )
            except httpx.TransportError as exc:
                failure: GitHubError = GitHubUnavailable(
                    self._scrub(f"{method} {url}: {type(exc).__name__}: {exc}")
                )
                delay = self._backoff(attempt)
            else:
                if response.status_code < 400:
                    return response
                if response.status_code == 401 and credential.installation and not renewed:
                    # Revoked early, or expired between our clock and GitHub's: a new one.
                    assert self._app is not None and credential.repo is not None
                    self._app.forget_token(credential.installation, credential.repo)
                    renewed = True
                    continue
                failure = self._error(response, call, credential)
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

    def _write(
        self, method: str, repo: str, url: str, payload: dict[str, Any], permission: str
    ) -> httpx.Response:
        """A change to ``repo`` that needs ``permission`` (named in the error without it)."""
        return self._request(
            method, url, json=payload, call=_Call(write=True, permission=permission), repo=repo
        )

    def _credential(self, call: _Call, repo: str | None) -> _Credential:
        """What authenticates this attempt: the token, the App's JWT, or the installation token
        of the App on ``repo`` (renewed here when it is about to expire)."""
        if self._app is None:
            return _Credential(self._token or "", "the token")
        if call.as_app:
            return _Credential(self._app.jwt(), f"{self._app.label}'s JWT", repo=repo)
        if repo is None:
            raise GitHubError(f"{self._app.label}: no repository to pick the installation for")
        installation = self.installation_id(repo)
        return _Credential(
            self.installation_token(repo),
            f"{self._app.label} (installation {installation})",
            repo=repo,
            installation=installation,
        )

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

    def _error(self, response: httpx.Response, call: _Call, credential: _Credential) -> GitHubError:
        status = response.status_code
        where = f"{response.request.method} {_path(response.request)} → {status}"
        message = self._scrub(_message(response))
        who = credential.who
        if status >= 500:
            return GitHubUnavailable(f"{where}: {message}", status=status)
        if status == 429 or (status == 403 and _is_rate_limit(response)):
            return GitHubUnavailable(f"{where}: rate limited: {message}", status=status)
        if self._app is not None and (status == 401 or call.as_app):
            return self._app_error(where, status, message, credential)
        if status == 401:
            return GitHubAuthError(
                f"{where}: GitHub rejected the token ({message}); it is invalid, expired or "
                "revoked — replace the GitHub token Secret block or GITHUB_TOKEN",
                status=status,
            )
        fix = ""
        if self._app is not None:
            fix = "; add it to the App's permissions and accept them in its installation"
        if call.write and status in (403, 404):
            return GitHubPermissionError(
                f"{where}: {message} — {who} lacks {call.permission} on this repository "
                f"(or cannot see it){fix}",
                status=status,
            )
        if status == 404:
            return GitHubNotFound(
                f"{where}: {message} — no such object, or {who} lacks {call.permission}",
                status=status,
            )
        if status == 403:
            return GitHubPermissionError(
                f"{where}: {message} — {who} lacks {call.permission}{fix}", status=status
            )
        return GitHubError(f"{where}: {message}", status=status)

    def _app_error(
        self, where: str, status: int, message: str, credential: _Credential
    ) -> GitHubError:
        """What went wrong with the App's own credentials, naming the App and the fix."""
        assert self._app is not None
        app = self._app
        if credential.installation is None and status == 401:
            return GitHubAuthError(
                f"{where}: GitHub rejected the JWT of {app.label} ({message}): the private key"
                " is not this App's (or was deleted from it), github_app_id is wrong, or this"
                " machine's clock is off — generate a new private key in the App's settings"
                " and store it where github_app_private_key_* points",
                status=status,
            )
        self._learn_slug()
        repo = credential.repo or "the repository"
        if status == 401:
            return GitHubAuthError(
                f"{where}: GitHub rejected the installation token of {app.label} on {repo}"
                f" even when just renewed ({message}): its installation was revoked (the App"
                " was uninstalled) or suspended — install the App on the repository again"
                " (the owner's Settings → GitHub Apps), or configure a GitHub token instead",
                status=status,
            )
        if status == 404:
            configured = f" as installation {app.installation_id}" if app.installation_id else ""
            return GitHubAuthError(
                f"{where}: {app.label} is not installed on {repo}{configured} ({message}) —"
                " install it on the repository, or fix github_app_installation_id",
                status=status,
            )
        if status == 403:
            return GitHubAuthError(
                f"{where}: {app.label} may not act on {repo} ({message}): its installation"
                " is suspended or does not include the repository — unsuspend it or add the"
                " repository in the owner's Settings → GitHub Apps",
                status=status,
            )
        if status == 422:
            wanted = ", ".join(f"{name}: {level}" for name, level in app.permissions.items())
            return GitHubAuthError(
                f"{where}: GitHub gives {app.label} no token for {repo} with {wanted}"
                f" ({message}) — give the App these repository permissions and accept them in"
                " its installation (the README's 'Create the GitHub App'), and include the"
                " repository in the installation",
                status=status,
            )
        return GitHubError(f"{where}: {app.label}: {message}", status=status)

    def _learn_slug(self) -> None:
        """Best effort, for a message: the App's slug names it better than its id."""
        with contextlib.suppress(GitHubError):
            self.app_slug()

    def _scrub(self, text: str) -> str:
        secrets = [self._token or "", *(self._app.secrets() if self._app else [])]
        for secret in filter(None, secrets):
            text = text.replace(secret, "****")
        return text


@dataclass(frozen=True)
class _Credential:
    """What one request authenticated with, so an error can say whose it was and what to fix."""

    secret: str = field(repr=False)
    who: str
    repo: str | None = None
    installation: int | None = None


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


def _repo(repo: str) -> str:
    """``repo`` for a URL path: owner/name with GitHub's characters only."""
    if not is_repo(repo):
        raise GitHubError(f"{repo!r} is not a repository name (owner/name)")
    return repo


def _sha(sha: str) -> str:
    if not is_sha(sha):
        raise GitHubError(f"{sha!r} is not a commit sha")
    return sha


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
    *,
    ssm: SSMClient | None = None,
    clock: Callable[[], float] = time.time,
) -> GitHub:
    """A client for this run (``GITHUB_API_URL`` for GitHub Enterprise): the GitHub App when
    ``github_app_id`` is set (no token is read then), else the token from the Secret block or
    ``GITHUB_TOKEN``. ``ssm`` reads an App key kept in Parameter Store."""
    base_url = env.get("GITHUB_API_URL") or DEFAULT_API_URL
    app = app_from_config(config, ssm=ssm, clock=clock)
    if app is not None:
        logger.info("acting on GitHub as %s", app.label)
        return GitHub(None, base_url=base_url, transport=transport, clock=clock, app=app)
    token = None
    if api_reachable(env):
        token = token_from_secret_block(config.github_token_secret_block)
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
