"""A fake OCI registry behind ``httpx.MockTransport``, with GHCR's token dance.

``HEAD /v2/<name>/manifests/<ref>`` without a bearer token answers 401 and
``WWW-Authenticate: Bearer realm="<scheme>://<host>/token",service=…,scope=…``. ``GET /token``
hands out tokens: to anyone for a public repository, only with the right basic auth for a
private one (wrong credentials → 401). A tag can be set to appear only after N manifest polls,
as an image still being built does. Every request is recorded.

A pushed tag is a real, content-addressed image as buildx pushes it: an OCI index naming a
linux/amd64 OCI manifest (and an attestation manifest), the manifest naming the image config
blob. ``GET`` on a manifest (by tag or digest) and on ``/v2/<name>/blobs/<digest>`` serve those
bodies, so a client can pull the config the way docker does; ``GET /v2/`` is the endpoint
``docker login`` checks credentials against. With ``auth="basic"`` it answers as Amazon ECR
does instead: no token endpoint, a ``WWW-Authenticate: Basic`` challenge, and the user ``AWS``
with the password ``GetAuthorizationToken`` handed out (``users={"AWS": password}``) may pull
every repository; an unknown repository is ``NAME_UNKNOWN``.

Images carry no layers: what the local engine (``local_stack.instance.engine``) runs is the
source tree the config's ``dev.pr-preview.local.source`` label names, relative to the project
directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
IN_TOTO = "application/vnd.in-toto+json"
# The image config label naming the source tree an image runs, relative to the project dir.
SOURCE_LABEL = "dev.pr-preview.local.source"
SAMPLE_APP_PORT = 8000


def sample_app_command(port: int = SAMPLE_APP_PORT) -> list[str]:
    """How the sample app (examples/hello-api/<version>) is started in its image."""
    return ["uvicorn", "hello_api.main:app", "--host", "0.0.0.0", "--port", str(port)]


def image_config(
    cmd: Sequence[str],
    *,
    source: str | None = None,
    env: Sequence[str] = (),
    working_dir: str = "/app",
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An OCI image config (``config`` part as ``docker inspect`` shows it) for linux/amd64."""
    all_labels = dict(labels or {})
    if source is not None:
        all_labels[SOURCE_LABEL] = source
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Cmd": list(cmd),
            "Env": list(env),
            "WorkingDir": working_dir,
            "Labels": all_labels,
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    }


def sample_app_config(
    source: str, port: int = SAMPLE_APP_PORT, env: Sequence[str] = ()
) -> dict[str, Any]:
    """The image config of one version of the sample app, e.g. ``examples/hello-api/v1``;
    ``env`` is what its build baked in (``GIT_SHA=...``)."""
    return image_config(
        sample_app_command(port),
        source=source,
        env=["PYTHONUNBUFFERED=1", *env],
        labels={"org.opencontainers.image.title": "hello-api"},
    )


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


@dataclass
class Repository:
    private: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    appears_after: dict[str, int] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # digest → type, body
    blobs: dict[str, bytes] = field(default_factory=dict)

    def store_manifest(self, media_type: str, document: Mapping[str, Any]) -> dict[str, Any]:
        """Store a manifest; returns its descriptor."""
        body = _canonical(document)
        digest = _digest(body)
        self.manifests[digest] = (media_type, body)
        return {"mediaType": media_type, "digest": digest, "size": len(body)}

    def store_blob(self, media_type: str, body: bytes) -> dict[str, Any]:
        digest = _digest(body)
        self.blobs[digest] = body
        return {"mediaType": media_type, "digest": digest, "size": len(body)}


@dataclass
class FakeRegistry:
    host: str = "ghcr.io"
    scheme: str = "https"
    users: dict[str, str] = field(default_factory=dict)
    repositories: dict[str, Repository] = field(default_factory=dict)
    tokens: dict[str, set[str]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    unavailable: int = 0
    auth: str = "bearer"  # "basic": as Amazon ECR authenticates

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def push(
        self,
        name: str,
        tag: str,
        *,
        private: bool = False,
        after_polls: int = 0,
        config: Mapping[str, Any] | None = None,
    ) -> str:
        """Publish ``name:tag``; visible from the ``after_polls + 1``-th manifest request on.

        ``config`` is the image config (see :func:`image_config`); without one the image runs
        nothing. Returns the digest of the tag's OCI index, as ``Docker-Content-Digest`` says.
        """
        repo = self.repositories.setdefault(name, Repository(private=private))
        repo.private = private
        document = dict(config) if config is not None else image_config([])
        config_descriptor = repo.store_blob(OCI_CONFIG, _canonical(document))
        image = repo.store_manifest(
            OCI_MANIFEST,
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config_descriptor,
                "layers": [],
            },
        )
        attestation = repo.store_manifest(
            OCI_MANIFEST,
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": repo.store_blob(OCI_CONFIG, b"{}"),
                "layers": [repo.store_blob(IN_TOTO, _canonical({"subject": image["digest"]}))],
            },
        )
        index = repo.store_manifest(
            OCI_INDEX,
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {**image, "platform": {"architecture": "amd64", "os": "linux"}},
                    {
                        **attestation,
                        "platform": {"architecture": "unknown", "os": "unknown"},
                        "annotations": {
                            "vnd.docker.reference.digest": image["digest"],
                            "vnd.docker.reference.type": "attestation-manifest",
                        },
                    },
                ],
            },
        )
        repo.tags[tag] = index["digest"]
        repo.appears_after[tag] = after_polls
        return str(index["digest"])

    def push_app(
        self,
        name: str,
        tag: str,
        source: str,
        *,
        private: bool = False,
        after_polls: int = 0,
        port: int = SAMPLE_APP_PORT,
        env: Sequence[str] = (),
    ) -> str:
        """Publish one version of the sample app: ``source`` is its tree relative to the
        project dir (``examples/hello-api/v1``), which the local engine runs with uvicorn."""
        config = sample_app_config(source, port, env)
        return self.push(name, tag, private=private, after_polls=after_polls, config=config)

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
        path = request.url.path
        if path == "/token":
            return self._token(request)
        if path == "/v2/":
            return self._base(request)
        if path.startswith("/v2/") and "/manifests/" in path:
            name, _, ref = path[len("/v2/") :].partition("/manifests/")
            return self._manifest(request, name, ref)
        if path.startswith("/v2/") and "/blobs/" in path:
            name, _, digest = path[len("/v2/") :].partition("/blobs/")
            return self._blob(request, name, digest)
        return httpx.Response(404, json={"errors": [{"code": "NOT_FOUND"}]})

    def _challenge(self, name: str | None, error: str | None = None) -> dict[str, str]:
        if self.auth == "basic":
            return {
                "WWW-Authenticate": f'Basic realm="{self.scheme}://{self.host}/",service="ecr.amazonaws.com"'
            }
        value = f'Bearer realm="{self.scheme}://{self.host}/token",service="{self.host}"'
        if name is not None:
            value += f',scope="repository:{name}:pull"'
        if error:
            value += f',error="{error}"'
        return {"WWW-Authenticate": value}

    def _bearer(self, request: httpx.Request) -> str | None:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.startswith("Bearer ") else None
        return token if token in self.tokens else None

    def _granted(self, request: httpx.Request) -> set[str] | None:
        """The repositories the request's credentials may pull; None without valid ones."""
        header = request.headers.get("authorization", "")
        if self.auth != "basic":
            token = self._bearer(request)
            return None if token is None else self.tokens[token]
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return set(self.repositories) if self.users.get(user) == password else None

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

    def _base(self, request: httpx.Request) -> httpx.Response:
        """``/v2/``: the API version check, where ``docker login`` proves its token."""
        if request.method not in ("HEAD", "GET"):
            return httpx.Response(405)
        if self._granted(request) is None:
            return httpx.Response(
                401, headers=self._challenge(None), json={"errors": [{"code": "UNAUTHORIZED"}]}
            )
        return httpx.Response(
            200, headers={"Docker-Distribution-API-Version": "registry/2.0"}, json={}
        )

    def _access(self, request: httpx.Request, name: str) -> httpx.Response | Repository:
        """The repository if the request's token may pull it, else the registry's refusal."""
        granted = self._granted(request)
        if granted is None:
            return httpx.Response(401, headers=self._challenge(name))
        if self.auth == "basic" and name not in self.repositories:
            message = f"The repository with name '{name}' does not exist in the registry"
            return httpx.Response(
                404, json={"errors": [{"code": "NAME_UNKNOWN", "message": message}]}
            )
        if name not in granted:
            # GHCR: "denied" both for private repos we may not see and for unknown ones
            return httpx.Response(403, json={"errors": [{"code": "DENIED"}]})
        return self.repositories[name]

    def _manifest(self, request: httpx.Request, name: str, ref: str) -> httpx.Response:
        if request.method not in ("HEAD", "GET"):
            return httpx.Response(405)
        repo = self._access(request, name)
        if isinstance(repo, httpx.Response):
            return repo
        repo.polls[ref] = repo.polls.get(ref, 0) + 1
        accept = request.headers.get("accept", "")
        if ref.startswith("sha256:"):
            digest = ref
        elif (
            ref not in repo.tags
            or repo.polls[ref] <= repo.appears_after.get(ref, 0)
            or OCI_INDEX not in accept  # a HEAD that would not take the index finds nothing
        ):
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        else:
            digest = repo.tags[ref]
        if digest not in repo.manifests:
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        media_type, body = repo.manifests[digest]
        headers = {"Docker-Content-Digest": digest, "Content-Type": media_type}
        if request.method == "HEAD":
            return httpx.Response(200, headers=headers)
        return httpx.Response(200, headers=headers, content=body)

    def _blob(self, request: httpx.Request, name: str, digest: str) -> httpx.Response:
        if request.method not in ("HEAD", "GET"):
            return httpx.Response(405)
        repo = self._access(request, name)
        if isinstance(repo, httpx.Response):
            return repo
        if digest not in repo.blobs:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        headers = {"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return httpx.Response(200, headers=headers)
        return httpx.Response(200, headers=headers, content=repo.blobs[digest])
