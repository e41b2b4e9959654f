"""A fake GitHub REST API behind ``httpx.MockTransport`` (or served over HTTP by
``local_stack.serve``): answers by URL, records every request. The tests drive it, and
``make demo`` serves it so its PR can be commented on.

It keeps pulls, issue comments, deployments and check runs in memory and behaves like the real
service where our client cares: ``per_page`` pagination with ``Link`` headers, 401 for a bad
token, 403 for a token without the permission, 404 for anything unknown, and injectable rate
limits and 5xx answers.

GitHub Apps as GitHub runs them: the ``/app`` endpoints take only a JWT, verified with the App's
public key (RS256, ``iss`` the App id, ``exp`` in the future and at most 10 minutes after
``iat``); an installation access token expires an hour after ``now`` (the fake's clock) and
answers 401 once expired or once its installation is revoked; comments an installation writes
belong to ``<slug>[bot]``; check runs take installation tokens only.

Installation tokens are scoped as GitHub scopes them: asked for ``repositories`` and
``permissions`` (422 for what the installation does not hold), a token sees only those
repositories of its installation's account (404 for any other: GitHub does not say whether it
exists) and holds only those permissions (403 for the rest; ``write`` includes ``read``).
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import zlib
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

BOT_ID = 41898282
ALL_PERMISSIONS = frozenset({"pull_requests:read", "issues:write", "deployments:write"})
# What the README's App asks for, in the fake's permission words.
APP_PERMISSIONS = ALL_PERMISSIONS | {"checks:write", "contents:read", "metadata:read"}
TOKEN_LIFETIME = 3600.0
NOT_GRANTED = "The permissions requested are not granted to this installation."
NOT_IN_INSTALLATION = (
    "There is at least one repository that does not exist or is not accessible to the parent"
    " installation."
)
JWT_MAX_LIFETIME = 600


@dataclass
class FakeApp:
    app_id: int
    slug: str
    public_key: str  # PEM
    installations: dict[int, set[str]] = field(default_factory=dict)  # id → owners (lower)
    revoked: set[int] = field(default_factory=set)
    permissions: frozenset[str] = APP_PERMISSIONS

    @property
    def bot_login(self) -> str:
        return f"{self.slug}[bot]"


@dataclass
class IssuedToken:
    app: FakeApp
    installation_id: int
    expires_at: float
    permissions: frozenset[str] = frozenset()
    repositories: frozenset[str] | None = None  # full names (lower); None: all of the account's

    def sees(self, repo: str) -> bool:
        owner, _, _ = repo.lower().partition("/")
        in_account = owner in self.app.installations.get(self.installation_id, set())
        return in_account and (self.repositories is None or repo.lower() in self.repositories)


@functools.cache
def app_key_pair() -> tuple[str, str]:
    """An App's private key and the public key GitHub keeps (PEM), made once per process."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # what GitHub hands out
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private.decode(), public.decode()


def new_format_token() -> str:
    """Not the ``ghs_`` + 36 characters of today: GitHub says not to rely on either."""
    return f"ghu2.{secrets.token_urlsafe(60)}.{secrets.token_hex(8)}"


@dataclass
class Recorded:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    body: Any
    status: int | None = None  # what the fake answered

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
    apps: dict[int, FakeApp] = field(default_factory=dict)
    issued: dict[str, IssuedToken] = field(default_factory=dict)
    check_runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    files: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (repo, ref, path)
    pull_files: dict[tuple[str, int], list[str]] = field(default_factory=dict)  # changed files
    # (repo, login) → admin, maintain, write, triage or read; anyone else is no collaborator
    collaborators: dict[tuple[str, str], str] = field(default_factory=dict)
    mint: Any = new_format_token  # () -> str: the next installation token
    _faults: deque[httpx.Response] = field(default_factory=deque)
    _next_id: int = 1000
    _acting: IssuedToken | None = None

    # --- arranging

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def add_pull(self, repo: str, pull: dict[str, Any]) -> None:
        self.pulls[(repo.lower(), int(pull["number"]))] = pull
        self.comments.setdefault((repo.lower(), int(pull["number"])), [])

    def set_changed_files(self, repo: str, number: int, names: list[str]) -> None:
        """What the pull request changes; its ``changed_files`` count follows, as GitHub's."""
        self.pull_files[(repo.lower(), number)] = list(names)
        self.pulls[(repo.lower(), number)]["changed_files"] = len(names)

    def add_file(self, repo: str, ref: str, path: str, text: str) -> None:
        self.files[(repo.lower(), ref, path)] = text

    def add_comment(self, repo: str, number: int, body: str, user: str = "someone") -> int:
        comment_id = self._id()
        self.comments.setdefault((repo.lower(), number), []).append(
            {"id": comment_id, "body": body, "user": self.user(user), "reactions": []}
        )
        return comment_id

    def add_collaborator(self, repo: str, login: str, role: str) -> None:
        """``login`` collaborates on ``repo`` as ``role``: admin, maintain, write, triage, read."""
        if role not in ROLE_PERMISSIONS:
            raise ValueError(f"unknown role {role!r}")
        self.collaborators[(repo.lower(), login.lower())] = role

    def reactions(self, repo: str, comment_id: int) -> list[tuple[str, str]]:
        """(content, login) of each reaction on comment ``comment_id``, oldest first."""
        for (name, _), comments in self.comments.items():
            for comment in comments:
                if name == repo.lower() and comment["id"] == comment_id:
                    return [(r["content"], r["user"]["login"]) for r in comment["reactions"]]
        return []

    def add_app(
        self, app_id: int, slug: str, public_key: str, installations: dict[int, str]
    ) -> FakeApp:
        """An App and its installations (id → the owner it is installed on)."""
        app = FakeApp(
            app_id,
            slug,
            public_key,
            {number: {owner.lower()} for number, owner in installations.items()},
        )
        self.apps[app_id] = app
        return app

    def revoke(self, installation_id: int) -> None:
        """The App uninstalled: its tokens stop working and no new one is issued."""
        for app in self.apps.values():
            if installation_id in app.installations:
                app.revoked.add(installation_id)

    def check_run_states(self, repo: str, sha: str) -> list[list[tuple[str, str | None]]]:
        """Per check run on ``sha``, oldest first: every (status, conclusion) it went through."""
        return [
            run["history"]
            for run in self.check_runs.get(repo.lower(), [])
            if run["head_sha"] == sha
        ]

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
        recorded = Recorded(
            request.method,
            request.url.path,
            dict(request.url.params),
            {k.lower(): v for k, v in request.headers.items()},
            body,
        )
        self.requests.append(recorded)
        response = self._answer(request, body)
        recorded.status = response.status_code
        return response

    def _answer(self, request: httpx.Request, body: Any) -> httpx.Response:
        prefix = httpx.URL(self.base_url).path.rstrip("/")
        path = request.url.path
        if self._faults:
            return self._faults.popleft()
        if not path.startswith(prefix):
            return _error(404, "Not Found")
        path = path[len(prefix) :]

        auth = request.headers.get("authorization", "")
        token = auth.split(" ", 1)[1] if " " in auth else None
        if token is None:
            return _error(401, "Requires authentication")
        if path == "/app" or path.startswith("/app/") or path.endswith("/installation"):
            return self._as_app(request, token, path)
        if token in self.issued:
            granted, refused = self._installation(token)
            if refused is not None:
                return refused
        elif token in self.tokens:
            granted = self.tokens[token]
        else:
            return _error(401, "Bad credentials")
        self._acting = self.issued.get(token)
        repo = re.match(r"/repos/([^/]+/[^/]+)", path)
        if repo and self._acting is not None and not self._acting.sees(repo.group(1)):
            return _error(404, "Not Found")

        for pattern, method, needs, handler in self._routes():
            match = re.fullmatch(pattern, path)
            if match and request.method == method:
                if needs and not any(_holds(granted, permission) for permission in needs):
                    by = "integration" if self._acting else "personal access token"
                    return _error(403, f"Resource not accessible by {by}")
                answer: httpx.Response = handler(request, granted, body, *match.groups())
                return answer
        return _error(404, "Not Found")

    # --- GitHub Apps

    def _verify_jwt(self, token: str) -> FakeApp | httpx.Response:
        """The App whose key signed ``token``, or GitHub's 401 for a JWT it would refuse."""
        try:
            issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
            app = self.apps.get(int(str(issuer)))
        except (jwt.PyJWTError, TypeError, ValueError):
            return _error(401, "A JSON web token could not be decoded")
        if app is None:
            return _error(401, "Integration not found")
        try:  # the signature here; the times against the fake's clock below
            claims = jwt.decode(
                token,
                app.public_key,
                algorithms=["RS256"],
                options={"verify_exp": False, "verify_iat": False, "require": ["iat", "exp"]},
            )
        except jwt.PyJWTError:
            return _error(401, "A JSON web token could not be decoded")
        if int(claims["exp"]) <= self.now:
            return _error(401, "'Expiration time' claim ('exp') must be a future timestamp")
        if int(claims["iat"]) > self.now + 60:
            return _error(401, "'Issued at' claim ('iat') must be an Integer in the past")
        if int(claims["exp"]) - int(claims["iat"]) > JWT_MAX_LIFETIME:
            return _error(401, "'Expiration time' claim ('exp') is too far in the future")
        return app

    def _as_app(self, request: httpx.Request, token: str, path: str) -> httpx.Response:
        app = self._verify_jwt(token)
        if isinstance(app, httpx.Response):
            return app
        if path == "/app" and request.method == "GET":
            return httpx.Response(
                200, json={"id": app.app_id, "slug": app.slug, "name": app.slug.title()}
            )
        found = re.fullmatch(r"/repos/([^/]+)/([^/]+)/installation", path)
        if found and request.method == "GET":
            owner = found.group(1).lower()
            for number, owners in app.installations.items():
                if owner in owners and number not in app.revoked:
                    return httpx.Response(
                        200, json={"id": number, "app_id": app.app_id, "app_slug": app.slug}
                    )
            return _error(404, "Not Found")
        found = re.fullmatch(r"/app/installations/(\d+)/access_tokens", path)
        if found and request.method == "POST":
            return self._mint(app, int(found.group(1)), request)
        return _error(404, "Not Found")

    def _mint(self, app: FakeApp, number: int, request: httpx.Request) -> httpx.Response:
        """An installation token, narrowed to the ``repositories`` and ``permissions`` asked."""
        if number not in app.installations or number in app.revoked:
            return _error(404, "Not Found")
        asked = json.loads(request.content) if request.content else {}
        permissions = app.permissions
        if asked.get("permissions") is not None:
            permissions = frozenset(f"{k}:{v}" for k, v in asked["permissions"].items())
            if not all(_holds(app.permissions, wanted) for wanted in permissions):
                return _error(422, NOT_GRANTED)
        repositories = None
        if asked.get("repositories") is not None:
            names = [str(name).lower() for name in asked["repositories"]]
            if not names or any("/" in name for name in names):
                return _error(422, NOT_IN_INSTALLATION)
            repositories = frozenset(
                f"{owner}/{name}" for owner in app.installations[number] for name in names
            )
        token = self.mint()
        expires_at = self.now + TOKEN_LIFETIME
        self.issued[token] = IssuedToken(app, number, expires_at, permissions, repositories)
        stamp = datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        answer: dict[str, Any] = {
            "token": token,
            "expires_at": stamp,
            "permissions": {
                name: level for name, _, level in (p.partition(":") for p in sorted(permissions))
            },
            "repository_selection": "all" if repositories is None else "selected",
        }
        if repositories is not None:
            answer["repositories"] = [{"full_name": name} for name in sorted(repositories)]
        return httpx.Response(201, json=answer)

    def _installation(self, token: str) -> tuple[frozenset[str], httpx.Response | None]:
        issued = self.issued[token]
        if issued.expires_at <= self.now or issued.installation_id in issued.app.revoked:
            return frozenset(), _error(401, "Bad credentials")
        return issued.permissions, None

    def _author(self) -> dict[str, Any]:
        """Who the current request writes as: the App's bot, or the token's user."""
        acting = self._acting
        return self.user(acting.app.bot_login if acting else self.bot_login)

    def _routes(self) -> list[tuple[str, str, tuple[str, ...], Any]]:
        """Path, method, the permissions one of which the endpoint needs (as GitHub documents
        it per endpoint), and the handler."""
        repo = r"/repos/([^/]+/[^/]+)"
        read_comments = ("issues:read", "pull_requests:read")
        write_comments = ("issues:write", "pull_requests:write")
        deployments = ("deployments:write",)
        return [
            (r"/user", "GET", (), self._get_user),
            (repo + r"/pulls/(\d+)", "GET", ("pull_requests:read",), self._get_pull),
            (repo + r"/pulls/(\d+)/files", "GET", ("pull_requests:read",), self._list_files),
            (repo + r"/issues/(\d+)/comments", "GET", read_comments, self._list_comments),
            (repo + r"/issues/(\d+)/comments", "POST", write_comments, self._create_comment),
            (repo + r"/issues/comments/(\d+)", "PATCH", write_comments, self._update_comment),
            (
                repo + r"/issues/comments/(\d+)/reactions",
                "POST",
                write_comments,
                self._create_reaction,
            ),
            # Every installation holds metadata:read; a token reads what its user can see.
            (repo + r"/collaborators/([^/]+)/permission", "GET", (), self._get_permission),
            (repo + r"/deployments", "GET", ("deployments:read",), self._list_deployments),
            (repo + r"/deployments", "POST", deployments, self._create_deployment),
            (repo + r"/deployments/(\d+)/statuses", "POST", deployments, self._create_status),
            (repo + r"/check-runs", "POST", ("checks:write",), self._create_check_run),
            (repo + r"/check-runs/(\d+)", "PATCH", ("checks:write",), self._update_check_run),
            (
                repo + r"/commits/([0-9a-f]{7,40}|[0-9a-f]{64})/check-runs",
                "GET",
                ("checks:read",),
                self._list_check_runs,
            ),
            (repo + r"/contents/(.+)", "GET", ("contents:read",), self._get_contents),
        ]

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _known_repo(self, repo: str) -> bool:
        return any(key[0] == repo.lower() for key in self.pulls)

    def _get_user(
        self, request: httpx.Request, granted: frozenset[str], body: Any
    ) -> httpx.Response:
        if self._acting is not None:  # an installation is no user
            return _error(403, "Resource not accessible by integration")
        return httpx.Response(200, json=self.user(self.bot_login))

    def _get_contents(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, path: str
    ) -> httpx.Response:
        """The raw file (``Accept: application/vnd.github.raw+json``) at ``?ref=``."""
        text = self.files.get((repo.lower(), request.url.params.get("ref", ""), path))
        if text is None:
            return _error(404, "Not Found")
        if request.headers.get("accept") != "application/vnd.github.raw+json":
            return _error(415, "this fake serves the raw media type only")
        return httpx.Response(200, text=text)

    def _get_pull(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, number: str
    ) -> httpx.Response:
        pull = self.pulls.get((repo.lower(), int(number)))
        if pull is None:
            return _error(404, "Not Found")
        return httpx.Response(200, json=pull)

    def _list_files(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, number: str
    ) -> httpx.Response:
        """The pull request's changed files, paged as GitHub pages them (Link headers)."""
        pull = self.pulls.get((repo.lower(), int(number)))
        if pull is None:
            return _error(404, "Not Found")
        files = self.pull_files.get((repo.lower(), int(number)), [])
        return self._page(request, [{"filename": name, "status": "modified"} for name in files])

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
        comment = {"id": self._id(), "body": body["body"], "user": self._author(), "reactions": []}
        self.comments[key].append(comment)
        return httpx.Response(201, json=comment)

    def _update_comment(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, comment_id: str
    ) -> httpx.Response:
        for (name, _), comments in self.comments.items():
            for comment in comments:
                if name == repo.lower() and comment["id"] == int(comment_id):
                    comment["body"] = body["body"]
                    return httpx.Response(200, json=comment)
        return _error(404, "Not Found")

    def _create_reaction(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, comment_id: str
    ) -> httpx.Response:
        """201 for a new reaction, 200 when this user already reacted so; 422 for another
        content."""
        if not isinstance(body, dict) or body.get("content") not in REACTIONS:
            return _error(422, "Validation Failed")
        for (name, _), comments in self.comments.items():
            for comment in comments:
                if name == repo.lower() and comment["id"] == int(comment_id):
                    author = self._author()
                    for reaction in comment["reactions"]:
                        if (reaction["content"], reaction["user"]["id"]) == (
                            body["content"],
                            author["id"],
                        ):
                            return httpx.Response(200, json=reaction)
                    reaction = {"id": self._id(), "content": body["content"], "user": author}
                    comment["reactions"].append(reaction)
                    return httpx.Response(201, json=reaction)
        return _error(404, "Not Found")

    def _get_permission(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, login: str
    ) -> httpx.Response:
        """GitHub's answer: the legacy ``permission`` (maintain → write, triage → read) and the
        ``role_name``; 404 for someone who is no collaborator."""
        if not self._known_repo(repo):
            return _error(404, "Not Found")
        role = self.collaborators.get((repo.lower(), login.lower()))
        if role is None:
            return _error(404, f"{login} is not a user")
        return httpx.Response(
            200,
            json={
                "permission": ROLE_PERMISSIONS[role],
                "role_name": role,
                "user": self.user(login),
            },
        )

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
        states = {"error", "failure", "inactive", "in_progress", "queued", "pending", "success"}
        if body.get("state") not in states:
            return _error(422, "Validation Failed")
        status = {"id": self._id(), **body}
        self.statuses[int(deployment_id)].append(status)
        return httpx.Response(201, json=status)

    def _create_check_run(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str
    ) -> httpx.Response:
        if not self._known_repo(repo):
            return _error(404, "Not Found")
        if self._acting is None:
            return _error(403, "You must authenticate via a GitHub App.")
        problem = _check_run_problem(body, creating=True)
        if problem:
            return _error(422, problem)
        run = {
            "id": self._id(),
            "name": body["name"],
            "head_sha": body["head_sha"],
            "status": body.get("status", "queued"),
            "conclusion": body.get("conclusion"),
            "output": body.get("output"),
            "details_url": body.get("details_url"),
            "app": {"id": self._acting.app.app_id, "slug": self._acting.app.slug},
        }
        run["history"] = [(run["status"], run["conclusion"])]
        self.check_runs.setdefault(repo.lower(), []).append(run)
        return httpx.Response(201, json=_public(run))

    def _update_check_run(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, run_id: str
    ) -> httpx.Response:
        runs = [r for r in self.check_runs.get(repo.lower(), []) if r["id"] == int(run_id)]
        if not runs or self._acting is None:
            return _error(404, "Not Found")
        [run] = runs
        if run["app"]["id"] != self._acting.app.app_id:
            return _error(403, "Resource not accessible by integration")
        problem = _check_run_problem(body, creating=False)
        if problem:
            return _error(422, problem)
        for key in ("status", "conclusion", "output", "details_url"):
            if key in body:
                run[key] = body[key]
        if body.get("conclusion"):
            run["status"] = "completed"
        run["history"].append((run["status"], run["conclusion"]))
        return httpx.Response(200, json=_public(run))

    def _list_check_runs(
        self, request: httpx.Request, granted: frozenset[str], body: Any, repo: str, sha: str
    ) -> httpx.Response:
        if not self._known_repo(repo):
            return _error(404, "Not Found")
        params = request.url.params
        runs = [
            r
            for r in self.check_runs.get(repo.lower(), [])
            if r["head_sha"] == sha
            and params.get("check_name", r["name"]) == r["name"]
            and params.get("app_id", str(r["app"]["id"])) == str(r["app"]["id"])
        ]
        if params.get("filter", "latest") == "latest":
            latest: dict[tuple[str, int], dict[str, Any]] = {}
            for run in runs:
                latest[(run["name"], run["app"]["id"])] = run
            runs = list(latest.values())
        found = [_public(r) for r in reversed(runs)]
        return httpx.Response(200, json={"total_count": len(found), "check_runs": found})

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


ROLE_PERMISSIONS = {
    "admin": "admin",
    "maintain": "write",
    "write": "write",
    "triage": "read",
    "read": "read",
}
REACTIONS = {"+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"}

CHECK_STATUSES = {"queued", "in_progress", "completed"}
CHECK_CONCLUSIONS = {
    "action_required",
    "cancelled",
    "failure",
    "neutral",
    "success",
    "skipped",
    "stale",
    "timed_out",
}


def _check_run_problem(body: Any, *, creating: bool) -> str | None:
    """GitHub's 422 for a check run it would refuse."""
    if not isinstance(body, dict):
        return "Invalid request."
    if creating and (not body.get("name") or not body.get("head_sha")):
        return "Invalid request: name and head_sha are required."
    status, conclusion = body.get("status"), body.get("conclusion")
    if status is not None and status not in CHECK_STATUSES:
        return f"Invalid request: status {status!r}."
    if conclusion is not None and conclusion not in CHECK_CONCLUSIONS:
        return f"Invalid request: conclusion {conclusion!r}."
    if status == "completed" and conclusion is None:
        return "Invalid request: a completed check run needs a conclusion."
    output = body.get("output")
    if output is not None and (not output.get("title") or not output.get("summary")):
        return "Invalid request: output needs a title and a summary."
    return None


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in run.items() if key != "history"}


def _holds(granted: frozenset[str], needed: str) -> bool:
    """Whether ``granted`` includes ``needed`` (``name:level``): ``write`` includes ``read``."""
    name, _, level = needed.partition(":")
    return needed in granted or (level == "read" and f"{name}:write" in granted)


def _error(status: int, message: str) -> httpx.Response:
    return httpx.Response(
        status, json={"message": message, "documentation_url": "https://docs.github.com/rest"}
    )
