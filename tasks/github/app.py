"""A GitHub App as the run's GitHub identity: its JWT, its installation tokens, its key's source.

An App acts on a repository through an installation access token (valid one hour) that it gets
by presenting a JWT signed with its private key: RS256, ``iat`` 60 s in the past against clock
drift, ``exp`` at most 10 minutes ahead. Each token is asked for one repository and the
permissions a run uses (``TOKEN_PERMISSIONS``), not everything the installation may do: a token
that leaks from a run touches nothing else. ``GitHubApp`` holds the key and caches one token per
installation and repository, renewed ``REFRESH_MARGIN_SECONDS`` before it expires, so a long run
never sends a token that lapses mid-call. Tokens are opaque: GitHub is changing their format, so
nothing here looks at their length or prefix. The key, the JWTs and the tokens live in fields
hidden from repr and are never logged; ``secrets()`` lists them for the client to scrub from its
messages. ``app_credential`` picks what one request of ``tasks.github.http`` authenticates with,
asking GitHub for the installation and its token (the App's own endpoints) when none is held.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_fixed

from tasks.github.sansio import Call, Credential, GitHubDisabled, GitHubError, checked_repo
from tasks.run.errors import PreviewError
from tasks.run.retry import is_transient

if TYPE_CHECKING:
    import httpx
    from mypy_boto3_ssm import SSMClient

    from tasks.config import PreviewConfig

logger = logging.getLogger(__name__)

JWT_BACKDATE_SECONDS = 60
JWT_LIFETIME_SECONDS = 540  # under GitHub's 10-minute cap, counted from the real now
TOKEN_LIFETIME_SECONDS = 3600  # what GitHub grants when it does not say
REFRESH_MARGIN_SECONDS = 300
SLUG_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,99}")
# What a run does with an installation token, and nothing more; the README's App permissions.
TOKEN_PERMISSIONS: Mapping[str, str] = MappingProxyType(
    {
        "checks": "write",  # the pr-preview check run: create, update, find the newest
        "contents": "read",  # the PR's compose file (GET …/contents/{path})
        "deployments": "write",  # the pr-<n> environment: deployments and their statuses
        "issues": "write",  # the sticky comment (a pull request's conversation is its issue)
        "metadata": "read",  # GitHub's mandatory one
        "pull_requests": "read",  # the PR's head, state and fork
    }
)


class AppHTTP(Protocol):
    """The verbs the App's own calls go through (``tasks.github.http.GitHubHTTP``)."""

    def get(
        self, path: str, *, repo: str | None = None, as_app: bool = False
    ) -> httpx.Response: ...

    def post(
        self, path: str, payload: Any, *, repo: str | None = None, as_app: bool = False
    ) -> httpx.Response: ...


class GitHubAppKeyError(PreviewError, ValueError):
    """The App's private key cannot be read or is not an RSA key; says where it was looked for."""


@dataclass(frozen=True)
class InstallationToken:
    token: str = field(repr=False)
    expires_at: float

    def fresh(self, now: float) -> bool:
        """Usable for at least ``REFRESH_MARGIN_SECONDS`` more."""
        return now < self.expires_at - REFRESH_MARGIN_SECONDS


@dataclass
class GitHubApp:
    """One App's credentials and the installation tokens it holds, one per installation."""

    app_id: int
    private_key: str = field(repr=False)
    installation_id: int | None = None
    clock: Callable[[], float] = field(default=time.time, repr=False)
    slug: str | None = None
    permissions: Mapping[str, str] = field(default_factory=lambda: TOKEN_PERMISSIONS)
    _tokens: dict[tuple[int, str], InstallationToken] = field(default_factory=dict, repr=False)
    _installations: dict[str, int] = field(default_factory=dict, repr=False)
    _jwt: str | None = field(default=None, repr=False)
    _signing_key: RSAPrivateKey | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """How messages name the App: its slug when known, always its id."""
        if self.slug:
            return f"GitHub App {self.slug} (id {self.app_id})"
        return f"GitHub App id {self.app_id}"

    def jwt(self) -> str:
        """A fresh JWT that authenticates as the App itself (the /app endpoints)."""
        now = int(self.clock())
        claims = {
            "iat": now - JWT_BACKDATE_SECONDS,
            "exp": now + JWT_LIFETIME_SECONDS,
            "iss": str(self.app_id),
        }
        if self._signing_key is None:  # parsing (and checking) the key costs ~30 ms a time
            self._signing_key = check_private_key(self.private_key, f"{self.label}'s key")
        self._jwt = jwt.encode(claims, self._signing_key, algorithm="RS256")
        return self._jwt

    def token_request(self, repo: str) -> dict[str, Any]:
        """The body of ``POST …/access_tokens``: ``repo`` alone (GitHub takes the name without
        the owner: an installation belongs to one account) and ``permissions``."""
        return {"repositories": [repo.split("/", 1)[1]], "permissions": dict(self.permissions)}

    def cached_token(self, installation_id: int, repo: str) -> str | None:
        """The token for ``repo`` while it is fresh, else None (time to ask for another)."""
        held = self._tokens.get((installation_id, repo.lower()))
        if held is not None and held.fresh(self.clock()):
            return held.token
        return None

    def keep_token(self, installation_id: int, repo: str, answer: Mapping[str, Any]) -> str:
        """Remember the token of a ``POST …/access_tokens`` answer until its ``expires_at``."""
        token = str(answer["token"])
        expires_at = _timestamp(answer.get("expires_at"))
        if expires_at is None:
            expires_at = self.clock() + TOKEN_LIFETIME_SECONDS
        self._tokens[(installation_id, repo.lower())] = InstallationToken(token, expires_at)
        return token

    def forget_token(self, installation_id: int, repo: str) -> None:
        self._tokens.pop((installation_id, repo.lower()), None)

    def installation_for(self, repo: str) -> int | None:
        """The configured installation, else the one looked up for ``repo`` earlier."""
        return self.installation_id or self._installations.get(repo.lower())

    def keep_installation(self, repo: str, installation_id: int) -> None:
        self._installations[repo.lower()] = installation_id

    def secrets(self) -> list[str]:
        """Every credential this App has handled, for scrubbing text before it is shown."""
        held = [token.token for token in self._tokens.values()]
        return [self.private_key, *held, *([self._jwt] if self._jwt else [])]


def require_app(app: GitHubApp | None) -> GitHubApp:
    if app is None:
        raise GitHubDisabled("no GitHub App is configured")
    return app


def app_slug(http: AppHTTP, app: GitHubApp) -> str:
    """The App's slug (``GET /app``), read once; its bot user is ``<slug>[bot]``."""
    if app.slug is None:
        slug = str(http.get("/app", as_app=True).json().get("slug") or "")
        if not SLUG_PATTERN.fullmatch(slug):
            raise GitHubError(f"GET /app: {app.label} answered an unusable slug")
        app.slug = slug
    return app.slug


def learn_slug(http: AppHTTP, app: GitHubApp) -> None:
    """Best effort, for a message: the App's slug names it better than its id."""
    with contextlib.suppress(GitHubError):
        app_slug(http, app)


def installation_id(http: AppHTTP, app: GitHubApp, repo: str) -> int:
    """The App's installation on ``repo``: configured, or ``GET /repos/{repo}/installation``."""
    found = app.installation_for(repo)
    if found is None:
        path = f"/repos/{checked_repo(repo)}/installation"
        answer = http.get(path, as_app=True, repo=repo).json()
        found = int(answer["id"])
        app.keep_installation(repo, found)
    return found


def installation_token(http: AppHTTP, app: GitHubApp, repo: str) -> str:
    """A token of the installation on ``repo`` with at least five minutes left; a new one
    (``POST /app/installations/{id}/access_tokens``) when the cached one is older. Each is
    asked for ``repo`` alone and the App's ``permissions``: GitHub refuses it any other
    repository of the installation, and anything else the App may do."""
    installation = installation_id(http, app, repo)
    token = app.cached_token(installation, repo)
    if token is None:
        answer = http.post(
            f"/app/installations/{int(installation)}/access_tokens",
            app.token_request(repo),
            as_app=True,
            repo=repo,
        ).json()
        token = app.keep_token(installation, repo, answer)
    return token


def app_credential(http: AppHTTP, app: GitHubApp, call: Call, repo: str | None) -> Credential:
    """What authenticates one attempt: the App's JWT for its own endpoints, else the
    installation token of the App on ``repo`` (renewed here when it is about to expire)."""
    if call.as_app:
        return Credential(app.jwt(), f"{app.label}'s JWT", repo=repo)
    if repo is None:
        raise GitHubError(f"{app.label}: no repository to pick the installation for")
    installation = installation_id(http, app, repo)
    return Credential(
        installation_token(http, app, repo),
        f"{app.label} (installation {installation})",
        repo=repo,
        installation=installation,
    )


def check_private_key(pem: str, where: str) -> RSAPrivateKey:
    """``pem`` as a key to sign with; fails, without quoting it, when it is not an RSA private
    key."""
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise GitHubAppKeyError(
            f"{where} is not a PEM private key: paste the whole .pem file GitHub generated"
            " (-----BEGIN RSA PRIVATE KEY----- … -----END RSA PRIVATE KEY-----)"
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise GitHubAppKeyError(f"{where} is not an RSA key: GitHub Apps sign with RS256")
    return key


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def key_from_secret_block(name: str) -> str | None:
    """The PEM in Prefect Secret block ``name``; None when it cannot be read."""
    try:
        from prefect.blocks.system import Secret

        block: Any = Secret.load(name)
        value = block.get()
    except Exception as exc:  # a missing block or an unreachable API: said below, by name
        logger.warning("GitHub App key Secret block %r not read (%s)", name, type(exc).__name__)
        return None
    return str(value) if value else None


def key_from_parameter(
    ssm: SSMClient, name: str, *, attempts: int = 1, wait_seconds: float = 0.0
) -> str | None:
    """The PEM in SecureString ``name``; None when it cannot be read. Throttling and 5xx are
    tried ``attempts`` times in all: without the key the run cannot tell its pull request
    anything, not even that it failed."""
    from botocore.exceptions import BotoCoreError, ClientError

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts),
        wait=wait_fixed(wait_seconds),
        reraise=True,
    )
    try:
        answer = retrying(lambda: ssm.get_parameter(Name=name, WithDecryption=True))
    except (ClientError, BotoCoreError) as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        logger.warning("GitHub App key parameter %s not read (%s)", name, code)
        return None
    return answer["Parameter"].get("Value") or None


def app_from_config(
    settings: PreviewConfig,
    *,
    ssm: SSMClient | None = None,
    clock: Callable[[], float] = time.time,
) -> GitHubApp | None:
    """The configured App, its key read from the Secret block or Parameter Store; None without
    ``github_app_id``. A key that cannot be read fails the run here, saying where to put it."""
    if settings.github_app_id is None:
        return None
    pem: str | None = None
    if settings.github_app_private_key_secret_block:
        where = f"Prefect Secret block {settings.github_app_private_key_secret_block!r}"
        pem = key_from_secret_block(settings.github_app_private_key_secret_block)
    elif settings.github_app_private_key_parameter:
        where = f"SecureString parameter {settings.github_app_private_key_parameter}"
        if ssm is None:
            from tasks.cloud.aws import build_clients

            ssm = build_clients(settings).ssm
        pem = key_from_parameter(
            ssm,
            settings.github_app_private_key_parameter,
            attempts=settings.task_retries + 1,
            wait_seconds=settings.retry_delay_seconds,
        )
    else:  # the configuration's own check refuses this; kept for a config built by hand
        raise GitHubAppKeyError("github_app_id is set but no private key source is")
    if not pem:
        raise GitHubAppKeyError(
            f"GitHub App id {settings.github_app_id}: no private key in the {where}: store the"
            " App's .pem there (see the README's 'Create the GitHub App')"
        )
    check_private_key(pem, f"the GitHub App key in the {where}")
    return GitHubApp(settings.github_app_id, pem, settings.github_app_installation_id, clock=clock)
