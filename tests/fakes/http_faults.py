"""Fault injection for the fakes served over HTTP (GitHub, the registry), by route.

``FaultyRoutes`` wraps an ``httpx.Request → httpx.Response`` handler. Every request is named by
its route — ``"GET github /repos/{repo}/pulls/{n}"`` — and counted, so a recorded run lists the
HTTP calls it made; a rule for a route answers its next N requests (or every one) with an error
before the fake sees them, so a refused call changes nothing in the fake, as on the real service.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

Handler = Callable[[httpx.Request], httpx.Response]

# (path regex, normalised pattern), first match wins; an unknown path is named as it is.
GITHUB_ROUTES = (
    (r"/user", "/user"),
    (r"/repos/[^/]+/[^/]+/pulls/\d+", "/repos/{repo}/pulls/{n}"),
    (r"/repos/[^/]+/[^/]+/issues/\d+/comments", "/repos/{repo}/issues/{n}/comments"),
    (r"/repos/[^/]+/[^/]+/issues/comments/\d+", "/repos/{repo}/issues/comments/{id}"),
    (r"/repos/[^/]+/[^/]+/deployments", "/repos/{repo}/deployments"),
    (r"/repos/[^/]+/[^/]+/deployments/\d+/statuses", "/repos/{repo}/deployments/{id}/statuses"),
    (r"/app", "/app"),
    (r"/repos/[^/]+/[^/]+/installation", "/repos/{repo}/installation"),
    (r"/app/installations/\d+/access_tokens", "/app/installations/{id}/access_tokens"),
    (r"/repos/[^/]+/[^/]+/check-runs", "/repos/{repo}/check-runs"),
    (r"/repos/[^/]+/[^/]+/check-runs/\d+", "/repos/{repo}/check-runs/{id}"),
    (r"/repos/[^/]+/[^/]+/commits/[0-9a-f]+/check-runs", "/repos/{repo}/commits/{sha}/check-runs"),
)
REGISTRY_ROUTES = (
    (r"/token", "/token"),
    (r"/v2/.+/manifests/[^/]+", "/v2/{name}/manifests/{ref}"),
)


def route_name(kind: str, routes: tuple[tuple[str, str], ...], request: httpx.Request) -> str:
    path = request.url.path
    for pattern, name in routes:
        if re.fullmatch(pattern, path):
            return f"{request.method} {kind} {name}"
    return f"{request.method} {kind} {path}"


@dataclass
class HttpFault:
    status: int
    remaining: int | None  # None: every time
    headers: dict[str, str]


@dataclass
class FaultyRoutes:
    """A handler in front of ``target()`` that counts calls per route and injects faults."""

    kind: str
    routes: tuple[tuple[str, str], ...]
    target: Callable[[], Handler]
    faults: dict[str, HttpFault] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(
        self,
        route: str,
        status: int = 503,
        *,
        times: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer ``route`` with ``status`` ``times`` times (every time when None)."""
        self.faults[route] = HttpFault(status, times, dict(headers or {}))

    def reset(self) -> None:
        with self._lock:
            self.faults.clear()
            self.calls.clear()
            self.injected.clear()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        name = route_name(self.kind, self.routes, request)
        with self._lock:
            self.calls[name] += 1
            fault = self.faults.get(name)
            if fault is not None and fault.remaining != 0:
                if fault.remaining is not None:
                    fault.remaining -= 1
                self.injected[name] += 1
                return httpx.Response(
                    fault.status, headers=fault.headers, json={"message": "injected fault"}
                )
        return self.target()(request)
