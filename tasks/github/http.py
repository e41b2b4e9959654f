"""GitHub over HTTP: authenticate each request, send it, retry what is worth it, follow pages.

The one retry layer for GitHub calls, because only it sees the rate-limit headers: 5xx answers,
dropped connections and rate limits are retried here (waiting as long as GitHub asks, within
``max_wait_seconds``), 401 and 404 never; what an answer means is ``tasks.github.sansio``'s to
say. A request authenticates with the token, or for a GitHub App with its JWT or the
installation token on the request's repository (``tasks.github.app``); an installation token
that GitHub refuses is renewed once. Credentials travel only in the ``Authorization`` header.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from tasks.github.app import GitHubApp, app_credential, learn_slug
from tasks.github.sansio import (
    READ_PERMISSION,
    Call,
    Credential,
    GitHubDisabled,
    GitHubError,
    GitHubRateLimited,
    GitHubUnavailable,
    decipher_response,
    names_app,
    rate_limit_wait,
    scrub,
)
from tasks.run.retry import Transient
from tasks.run.tls import tls_context

logger = logging.getLogger(__name__)

API_VERSION = "2022-11-28"
PER_PAGE = 100

Params = Mapping[str, str | int]


class GitHubHTTP:
    """Generic verbs on GitHub's REST API over one ``httpx.Client``, with the retry policy."""

    def __init__(
        self,
        token: str | None,
        base_url: str,
        *,
        app: GitHubApp | None = None,
        transport: httpx.BaseTransport | None = None,
        max_wait_seconds: float = 60,
        max_retries: int = 3,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        timeout: float = 30.0,
    ) -> None:
        self._token = token or None
        self.app = app
        self.base_url = base_url.rstrip("/")
        self.max_wait_seconds = max_wait_seconds
        self.max_retries = max_retries
        self._sleep = sleep
        self._clock = clock
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": "pr-preview",
            },
            transport=transport,
            timeout=timeout,
            verify=tls_context(),
        )

    @property
    def enabled(self) -> bool:
        return self._token is not None or self.app is not None

    def __repr__(self) -> str:
        return f"GitHubHTTP(base_url={self.base_url!r}, enabled={self.enabled})"

    def close(self) -> None:
        self._client.close()

    # --- the verbs

    def get(
        self,
        path: str,
        *,
        repo: str | None = None,
        params: Params | None = None,
        accept: str | None = None,
        permission: str = READ_PERMISSION,
        as_app: bool = False,
    ) -> httpx.Response:
        call = Call(permission=permission, as_app=as_app)
        return self.request("GET", path, call=call, repo=repo, params=params, accept=accept)

    def post(
        self,
        path: str,
        payload: Any,
        *,
        repo: str | None = None,
        permission: str = READ_PERMISSION,
        as_app: bool = False,
    ) -> httpx.Response:
        call = Call(write=True, permission=permission, as_app=as_app)
        return self.request("POST", path, call=call, repo=repo, json=payload)

    def patch(
        self, path: str, payload: Any, *, repo: str | None = None, permission: str = READ_PERMISSION
    ) -> httpx.Response:
        call = Call(write=True, permission=permission)
        return self.request("PATCH", path, call=call, repo=repo, json=payload)

    def delete(
        self, path: str, *, repo: str | None = None, permission: str = READ_PERMISSION
    ) -> httpx.Response:
        return self.request("DELETE", path, call=Call(write=True, permission=permission), repo=repo)

    def paginate(
        self, path: str, *, repo: str | None = None, params: Params | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every item of a list, following ``Link: rel="next"`` to the end, never off GitHub's
        host (the credential goes with each page)."""
        url: str | None = path
        query: dict[str, str | int] | None = {**(params or {}), "per_page": PER_PAGE}
        while url is not None:
            response = self.get(url, repo=repo, params=query)
            items = response.json()
            if not isinstance(items, list):
                where = response.request.url.path
                raise GitHubError(f"GET {where}: expected a list, got {items!r}")
            yield from items
            url = response.links.get("next", {}).get("url")
            query = None  # the next link carries the query
            if url is not None and urlsplit(url).netloc != urlsplit(self.base_url).netloc:
                raise GitHubError(f"refusing to follow a pagination link to another host: {url}")

    # --- one request, retried

    def request(
        self,
        method: str,
        url: str,
        *,
        call: Call,
        json: Any = None,
        params: Params | None = None,
        repo: str | None = None,
        accept: str | None = None,
    ) -> httpx.Response:
        """The answer to one call, after retrying transient failures within the budget."""
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
                text = f"{method} {url}: {type(exc).__name__}: {exc}"
                failure: GitHubError = GitHubUnavailable(scrub(text, self._secrets(credential)))
                delay = self._backoff(attempt)
            else:
                if response.status_code < 400:
                    return response
                if response.status_code == 401 and credential.installation and not renewed:
                    # Revoked early, or expired between our clock and GitHub's: a new one.
                    assert self.app is not None and credential.repo is not None
                    self.app.forget_token(credential.installation, credential.repo)
                    renewed = True
                    continue
                failure = self._error(response, call, credential)
                if not isinstance(failure, Transient):
                    raise failure
                asked = rate_limit_wait(response, self._clock())
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

    def _secrets(self, credential: Credential) -> list[str]:
        """Every credential this client has held, to scrub from a message."""
        return [credential.secret, self._token or "", *(self.app.secrets() if self.app else [])]

    def _credential(self, call: Call, repo: str | None) -> Credential:
        if self.app is None:
            return Credential(self._token or "", "the token")
        return app_credential(self, self.app, call, repo)

    def _error(self, response: httpx.Response, call: Call, credential: Credential) -> GitHubError:
        secrets = self._secrets(credential)
        if self.app is not None and names_app(response, call, credential):
            learn_slug(self, self.app)  # one GET /app: the slug names the App in the message
        return decipher_response(response, call, credential, app=self.app, secrets=secrets)

    def _backoff(self, attempt: int) -> float:
        return float(min(2 ** (attempt - 1), 30)) * (0.5 + random.random() / 2)
