"""A fake OCI registry behind ``httpx.MockTransport``, with GHCR's token dance.

``HEAD /v2/<name>/manifests/<ref>`` without a bearer token answers 401 and
``WWW-Authenticate: Bearer realm="<scheme>://<host>/token",service=…,scope=…``. ``GET /token``
hands out tokens: to anyone for a public repository, only with the right basic auth for a
private one (wrong credentials → 401). A tag can be set to appear only after N manifest polls,
as an image still being built does. Every request is recorded.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field

import httpx


@dataclass
class Repository:
    private: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    appears_after: dict[str, int] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)


@dataclass
class FakeRegistry:
    host: str = "ghcr.io"
    scheme: str = "https"
    users: dict[str, str] = field(default_factory=dict)
    repositories: dict[str, Repository] = field(default_factory=dict)
    tokens: dict[str, set[str]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    unavailable: int = 0

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def push(self, name: str, tag: str, *, private: bool = False, after_polls: int = 0) -> str:
        """Publish ``name:tag``; visible from the ``after_polls + 1``-th manifest request on."""
        repo = self.repositories.setdefault(name, Repository(private=private))
        repo.private = private
        digest = "sha256:" + secrets.token_hex(32)
        repo.tags[tag] = digest
        repo.appears_after[tag] = after_polls
        return digest

    def create(self, name: str, *, private: bool = False) -> None:
        self.repositories.setdefault(name, Repository(private=private))

    def manifest_requests(self, tag: str | None = None) -> list[httpx.Request]:
        return [
            r
            for r in self.requests
            if "/manifests/" in r.url.path and (tag is None or r.url.path.endswith(f"/{tag}"))
        ]

    def token_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == "/token"]

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host != self.host.split(":")[0] or request.url.scheme != self.scheme:
            raise httpx.ConnectError(f"no registry at {request.url.scheme}://{request.url.host}")
        if self.unavailable > 0:
            self.unavailable -= 1
            return httpx.Response(503, text="upstream unavailable")
        if request.url.path == "/token":
            return self._token(request)
        if request.url.path.startswith("/v2/") and "/manifests/" in request.url.path:
            name, _, ref = request.url.path[len("/v2/") :].partition("/manifests/")
            return self._manifest(request, name, ref)
        return httpx.Response(404, json={"errors": [{"code": "NOT_FOUND"}]})

    def _challenge(self, name: str, error: str | None = None) -> dict[str, str]:
        value = (
            f'Bearer realm="{self.scheme}://{self.host}/token",service="{self.host}",'
            f'scope="repository:{name}:pull"'
        )
        if error:
            value += f',error="{error}"'
        return {"WWW-Authenticate": value}

    def _token(self, request: httpx.Request) -> httpx.Response:
        scope = request.url.params.get("scope", "")
        parts = scope.split(":")
        name = parts[1] if len(parts) == 3 else ""
        authorized = False
        header = request.headers.get("authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(user) != password:
                return httpx.Response(401, json={"errors": [{"code": "UNAUTHORIZED"}]})
            authorized = True
        repo = self.repositories.get(name)
        granted = set()
        if repo is not None and (authorized or not repo.private):
            granted.add(name)
        token = secrets.token_urlsafe(16)
        self.tokens[token] = granted
        return httpx.Response(200, json={"token": token})

    def _manifest(self, request: httpx.Request, name: str, ref: str) -> httpx.Response:
        if request.method not in ("HEAD", "GET"):
            return httpx.Response(405)
        header = request.headers.get("authorization", "")
        token = header[7:] if header.startswith("Bearer ") else None
        if token is None or token not in self.tokens:
            return httpx.Response(401, headers=self._challenge(name))
        if name not in self.tokens[token]:
            # GHCR: "denied" both for private repos we may not see and for unknown ones
            return httpx.Response(403, json={"errors": [{"code": "DENIED"}]})
        repo = self.repositories[name]
        repo.polls[ref] = repo.polls.get(ref, 0) + 1
        accept = request.headers.get("accept", "")
        if ref not in repo.tags or repo.polls[ref] <= repo.appears_after.get(ref, 0):
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        if "application/vnd.oci.image.index.v1+json" not in accept:
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        return httpx.Response(
            200,
            headers={
                "Docker-Content-Digest": repo.tags[ref],
                "Content-Type": "application/vnd.oci.image.index.v1+json",
            },
        )
