"""What GitHub's answers mean, decided without sending anything: the error, and the wait.

As gidgethub keeps ``sansio`` apart from its transport: ``decipher_response`` turns a failed
answer into the ``GitHubError`` that names the call, the status and what to do;
``rate_limit_wait`` reads how long a rate limit asks us to wait; ``checked_repo`` and
``checked_sha`` keep a URL path to GitHub's characters. ``tasks.github.http`` sends,
retries and follows pages with them. Every message is scrubbed of the credentials it is given:
a token, a JWT or a private key never reaches an exception or a log line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from tasks.inputs import is_repo, is_sha
from tasks.run.errors import PreviewError
from tasks.run.retry import Transient

SECONDARY_RATE_LIMIT_WAIT = 60.0  # GitHub: "wait at least one minute" when it names no time
READ_PERMISSION = "pull-requests: read (and access to the repository)"


class GitHubError(PreviewError):
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


class AppNames(Protocol):
    """What an error says of a GitHub App (``tasks.github.app.GitHubApp``)."""

    @property
    def label(self) -> str: ...

    @property
    def installation_id(self) -> int | None: ...

    @property
    def permissions(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class Call:
    """What a request is for, so an error can say which permission was missing."""

    write: bool = False
    permission: str = READ_PERMISSION
    as_app: bool = False  # the App's own endpoints: a JWT, not an installation token


@dataclass(frozen=True)
class Credential:
    """What one request authenticated with, so an error can say whose it was and what to fix."""

    secret: str = field(repr=False)
    who: str
    repo: str | None = None
    installation: int | None = None


def checked_repo(repo: str) -> str:
    """``repo`` for a URL path: owner/name with GitHub's characters only."""
    if not is_repo(repo):
        raise GitHubError(f"{repo!r} is not a repository name (owner/name)")
    return repo


def checked_sha(sha: str) -> str:
    """``sha`` for a URL path: a full commit sha."""
    if not is_sha(sha):
        raise GitHubError(f"{sha!r} is not a commit sha")
    return sha


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every credential in ``secrets`` replaced by ``****``."""
    for secret in filter(None, secrets):
        text = text.replace(secret, "****")
    return text


def message_of(response: httpx.Response) -> str:
    """GitHub's ``message``, else the reason phrase."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return response.reason_phrase or f"HTTP {response.status_code}"


def is_rate_limit(response: httpx.Response) -> bool:
    """A 403 that is a rate limit (primary or secondary), not a missing permission."""
    if response.headers.get("X-RateLimit-Remaining") == "0":
        return True
    if "Retry-After" in response.headers:
        return True
    return "rate limit" in message_of(response).lower()


def rate_limit_wait(response: httpx.Response, now: float) -> float | None:
    """Seconds GitHub asks us to wait, or None when this is not a rate limit: ``Retry-After``,
    else until ``X-RateLimit-Reset`` (and a second) once none remain, else a minute for a
    secondary limit (403/429) that names no time."""
    headers = response.headers
    retry_after = headers.get("Retry-After")
    if retry_after is not None:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            pass
    if headers.get("X-RateLimit-Remaining") == "0" and headers.get("X-RateLimit-Reset"):
        try:
            return max(0.0, float(headers["X-RateLimit-Reset"]) - now) + 1.0
        except ValueError:
            pass
    if response.status_code in (403, 429):
        return SECONDARY_RATE_LIMIT_WAIT
    return None


def names_app(response: httpx.Response, call: Call, credential: Credential) -> bool:
    """True when the error for this answer names the App and its JWT still works: the App's
    slug (``GET /app``) is then worth learning first, since it names the App better."""
    status = response.status_code
    blames_app = status == 401 or call.as_app
    jwt_refused = credential.installation is None and status == 401
    return blames_app and not jwt_refused and not _transient(response)


def decipher_response(
    response: httpx.Response,
    call: Call,
    credential: Credential,
    *,
    app: AppNames | None = None,
    secrets: Iterable[str] = (),
) -> GitHubError:
    """The error for a failed answer; a ``Transient`` one (5xx, rate limits) is worth a retry."""
    status = response.status_code
    where = f"{response.request.method} {response.request.url.path} → {status}"
    message = scrub(message_of(response), secrets)
    who = credential.who
    if status >= 500:
        return GitHubUnavailable(f"{where}: {message}", status=status)
    if _transient(response):
        return GitHubUnavailable(f"{where}: rate limited: {message}", status=status)
    if app is not None and (status == 401 or call.as_app):
        return _app_error(where, status, message, credential, app)
    if status == 401:
        return GitHubAuthError(
            f"{where}: GitHub rejected the token ({message}); it is invalid, expired or "
            "revoked — replace the GitHub token Secret block or GITHUB_TOKEN",
            status=status,
        )
    fix = ""
    if app is not None:
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


def _transient(response: httpx.Response) -> bool:
    status = response.status_code
    return status >= 500 or status == 429 or (status == 403 and is_rate_limit(response))


def _app_error(
    where: str, status: int, message: str, credential: Credential, app: AppNames
) -> GitHubError:
    """What went wrong with the App's own credentials, naming the App and the fix."""
    if credential.installation is None and status == 401:
        return GitHubAuthError(
            f"{where}: GitHub rejected the JWT of {app.label} ({message}): the private key"
            " is not this App's (or was deleted from it), github_app_id is wrong, or this"
            " machine's clock is off — generate a new private key in the App's settings"
            " and store it where github_app_private_key_* points",
            status=status,
        )
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
