"""A fake GitHub REST API behind ``httpx.MockTransport``: answers by URL, records every request.

It keeps pulls, issue comments and deployments in memory and behaves like the real service
where our client cares: ``per_page`` pagination with ``Link`` headers, 401 for a bad token,
403 for a token without the permission, 404 for anything unknown, and injectable rate limits
and 5xx answers.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx

BOT_ID = 41898282
ALL_PERMISSIONS = frozenset({"pull_requests:read", "issues:write", "deployments:write"})


@dataclass
class Recorded:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    body: Any

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class FakeGitHub:
    """In-memory GitHub. ``tokens`` maps each valid token to the permissions it holds."""

    base_url: str = "https://api.github.com"
    tokens: dict[str, frozenset[str]] = field(
        default_factory=lambda: {"good-token": ALL_PERMISSIONS}
    )
    bot_login: str = "pr-preview[bot]"
    now: float = 1_800_000_000.0
    pulls: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    comments: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    deployments: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    statuses: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    _faults: deque[httpx.Response] = field(default_factory=deque)
    _next_id: int = 1000

    # --- arranging

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def add_pull(self, repo: str, pull: dict[str, Any]) -> None:
        self.pulls[(repo.lower(), int(pull["number"]))] = pull
        self.comments.setdefault((repo.lower(), int(pull["number"])), [])

    def add_comment(self, repo: str, number: int, body: str, user: str = "someone") -> int:
        comment_id = self._id()
        self.comments.setdefault((repo.lower(), number), []).append(
            {"id": comment_id, "body": body, "user": self.user(user)}
        )
        return comment_id

    def user(self, login: str) -> dict[str, Any]:
        """A user as GitHub shows it in a comment; ids are stable per login."""
        user_id = BOT_ID if login == self.bot_login else 10_000 + zlib.crc32(login.encode())
        return {"login": login, "id": user_id, "type": "Bot" if login.endswith("[bot]") else "User"}

    def inject(
        self,
        status: int,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
        message: str = "injected",
    ) -> None:
        """The next ``times`` requests answer ``status`` before any routing."""
        for _ in range(times):
            self._faults.append(
                httpx.Response(status, headers=headers or {}, json={"message": message})
            )

    def rate_limit(self, *, reset_in: float, times: int = 1) -> None:
        """The primary rate limit: 403 with ``X-RateLimit-Remaining: 0`` until ``reset``."""
        self.inject(
            403,
            times=times,
            headers={
                "X-RateLimit-Limit": "5000",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(int(self.now + reset_in)),
            },
            message="API rate limit exceeded for user ID 1.",
        )

    # --- reading what happened

    def sent(self, method: str | None = None, path_contains: str = "") -> list[Recorded]:
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and path_contains in r.path
        ]

    def comment_bodies(self, repo: str, number: int) -> list[str]:
        return [c["body"] for c in self.comments.get((repo.lower(), number), [])]

    # --- the API

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        prefix = httpx.URL(self.base_url).path.rstrip("/")
        path = request.url.path
        self.requests.append(
            Recorded(
                request.method,
                path,
                dict(request.url.params),
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )
        )
        if self._faults:
            return self._faults.popleft()
        if not path.startswith(prefix):
            return _error(404, "Not Found")
        path = path[len(prefix) :]

        auth = request.headers.get("authorization", "")
        token = auth.split(" ", 1)[1] if " " in auth else None
        if token is None:
            return _error(401, "Requires authentication")
        if token not in self.tokens:
            return _error(401, "Bad credentials")
        granted = self.tokens[token]

        for pattern, method, handler in self._routes():
            match = re.fullmatch(pattern, path)
            if match and request.method == method:
                return handler(request, granted, body, *match.groups())
        return _error(404, "Not Found")

    def _routes(self) -> list[tuple[str, str, Any]]:
        repo = r"/repos/([^/]+/[^/]+)"
        return [
            (r"/user", "GET", self._get_user),
            (repo + r"/pulls/(\d+)", "GET", self._get_pull),
            (repo + r"/issues/(\d+)/comments", "GET", self._list_comments),
            (repo + r"/issues/(\d+)/comments", "POST", self._create_comment),
            (repo + r"/issues/comments/(\d+)", "PATCH", self._update_comment),
            (repo + r"/deployments", "GET", self._list_deployments),
            (repo + r"/deployments", "POST", self._create_deployment),
            (repo + r"/deployments/(\d+)/statuses", "POST", self._create_status),
        ]

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _known_repo(self, repo: str) -> bool:
        return any(key[0] == repo.lower() for key in self.pulls)

    def _get_user(
        self, request: httpx.Request, granted: frozenset[str], body: Any
    ) -> httpx.Response:
        return httpx.Response(200, json=self.user(self.bot_login))

    def _get_pull(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, number: str
    ) -> httpx.Response:
        pull = self.pulls.get((repo.lower(), int(number)))
        if pull is None:
            return _error(404, "Not Found")
        return httpx.Response(200, json=pull)

    def _list_comments(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, number: str
    ) -> httpx.Response:
        key = (repo.lower(), int(number))
        if key not in self.comments:
            return _error(404, "Not Found")
        return self._page(request, self.comments[key])

    def _create_comment(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, number: str
    ) -> httpx.Response:
        key = (repo.lower(), int(number))
        if key not in self.comments:
            return _error(404, "Not Found")
        if "issues:write" not in granted:
            return _error(403, "Resource not accessible by personal access token")
        comment = {"id": self._id(), "body": body["body"], "user": self.user(self.bot_login)}
        self.comments[key].append(comment)
        return httpx.Response(201, json=comment)

    def _update_comment(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, comment_id: str
    ) -> httpx.Response:
        for (name, _), comments in self.comments.items():
            for comment in comments:
                if name == repo.lower() and comment["id"] == int(comment_id):
                    if "issues:write" not in granted:
                        return _error(403, "Resource not accessible by personal access token")
                    comment["body"] = body["body"]
                    return httpx.Response(200, json=comment)
        return _error(404, "Not Found")

    def _list_deployments(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str
    ) -> httpx.Response:
        if not self._known_repo(repo):
            return _error(404, "Not Found")
        environment = request.url.params.get("environment")
        items = [
            d
            for d in reversed(self.deployments.get(repo.lower(), []))
            if environment is None or d["environment"] == environment
        ]
        return self._page(request, items)

    def _create_deployment(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str
    ) -> httpx.Response:
        if not self._known_repo(repo):
            return _error(404, "Not Found")
        if "deployments:write" not in granted:
            return _error(403, "Resource not accessible by personal access token")
        if not body or not body.get("ref"):
            return _error(422, "Invalid request.")
        deployment = {
            "id": self._id(),
            "sha": body["ref"],
            "ref": body["ref"],
            "environment": body.get("environment", "production"),
            "transient_environment": body.get("transient_environment", False),
            "production_environment": body.get("production_environment", False),
            "description": body.get("description"),
        }
        self.deployments.setdefault(repo.lower(), []).append(deployment)
        self.statuses[deployment["id"]] = []
        return httpx.Response(201, json=deployment)

    def _create_status(
        self,
        request: httpx.Request,
        granted: frozenset[str],
        body: Any,
        repo: str,
        deployment_id: str,
    ) -> httpx.Response:
        if int(deployment_id) not in self.statuses:
            return _error(404, "Not Found")
        if "deployments:write" not in granted:
            return _error(403, "Resource not accessible by personal access token")
        states = {"error", "failure", "inactive", "in_progress", "queued", "pending", "success"}
        if body.get("state") not in states:
            return _error(422, "Validation Failed")
        status = {"id": self._id(), **body}
        self.statuses[int(deployment_id)].append(status)
        return httpx.Response(201, json=status)

    def _page(self, request: httpx.Request, items: list[dict[str, Any]]) -> httpx.Response:
        params = dict(request.url.params)
        per_page = min(int(params.get("per_page", 30)), 100)
        page = int(params.get("page", 1))
        last = max(1, -(-len(items) // per_page))
        chunk = items[(page - 1) * per_page : page * per_page]
        links = []
        base = str(request.url.copy_with(query=None))

        def link(number: int, rel: str) -> str:
            return f'<{base}?{urlencode({**params, "page": number})}>; rel="{rel}"'

        if page < last:
            links += [link(page + 1, "next"), link(last, "last")]
        if page > 1:
            links += [link(1, "first"), link(page - 1, "prev")]
        headers = {"Link": ", ".join(links)} if links else {}
        return httpx.Response(200, json=chunk, headers=headers)


def _error(status: int, message: str) -> httpx.Response:
    return httpx.Response(
        status, json={"message": message, "documentation_url": "https://docs.github.com/rest"}
    )
