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

An image pushed with layers (``push(..., layers=...)``, or through the upload API below) is a
real one a Docker Engine pulls and runs; one pushed without is only a tag to check, for the
tests whose instances are scripted. Pushing is GHCR's: ``POST /v2/<name>/blobs/uploads/`` (or a
cross-repository mount), ``PUT`` of the blob by digest (the digest is checked), ``PUT`` of the
manifests, with a token whose scope says ``push``: a user of ``users`` pushes to its own
namespace, ``ci`` (CI's push credentials, ``ci_password``) anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
IN_TOTO = "application/vnd.in-toto+json"
SAMPLE_APP_PORT = 8000
CI_USER = "ci"  # who pushes: CI's credentials (ci_password)


def image_config(
    cmd: Sequence[str],
    *,
    env: Sequence[str] = (),
    working_dir: str = "/app",
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An OCI image config (``config`` part as ``docker inspect`` shows it) for linux/amd64,
    of an image with no layers (one that is only checked, never run)."""
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Cmd": list(cmd),
            "Env": list(env),
            "WorkingDir": working_dir,
            "Labels": dict(labels or {}),
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    }


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
        return self.store_manifest_body(media_type, _canonical(document))

    def store_manifest_body(self, media_type: str, body: bytes) -> dict[str, Any]:
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
    ci_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    push_tokens: dict[str, set[str]] = field(default_factory=dict)
    uploads: dict[str, str] = field(default_factory=dict)  # upload id → repository

    aliases: set[str] = field(default_factory=set)  # other names it answers to (ECR's host)

    def _valid_user(self, user: str, password: str) -> bool:
        """A user of ``users``, or CI with its push credentials."""
        if user == CI_USER:
            return password == self.ci_password
        return user in self.users and self.users[user] == password

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
        layers: Sequence[Mapping[str, Any]] = (),
    ) -> str:
        """Publish ``name:tag``; visible from the ``after_polls + 1``-th manifest request on.

        ``config`` is the image config (see :func:`image_config`); ``layers`` the descriptors
        of blobs already uploaded to ``name``. Returns the digest of the tag's OCI index, as
        ``Docker-Content-Digest`` says.
        """
        repo = self.repositories.setdefault(name, Repository(private=private))
        repo.private = private
        document = dict(config) if config is not None else image_config([])
        missing = [layer["digest"] for layer in layers if layer["digest"] not in repo.blobs]
        if missing:
            raise ValueError(f"layers not uploaded to {name}: {missing}")
        config_descriptor = repo.store_blob(OCI_CONFIG, _canonical(document))
        image = repo.store_manifest(
            OCI_MANIFEST,
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config_descriptor,
                "layers": [dict(layer) for layer in layers],
            },
        )
        index = self._store_index(repo, image)
        repo.tags[tag] = index["digest"]
        repo.appears_after[tag] = after_polls
        return str(index["digest"])

    def _store_index(self, repo: Repository, image: Mapping[str, Any]) -> dict[str, Any]:
        """An OCI index naming the linux/amd64 manifest and an attestation, as buildx pushes."""
        attestation = repo.store_manifest(
            OCI_MANIFEST,
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": repo.store_blob(OCI_CONFIG, b"{}"),
                "layers": [repo.store_blob(IN_TOTO, _canonical({"subject": image["digest"]}))],
            },
        )
        return repo.store_manifest(
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
        if request.method == "PUT" and "/blobs/uploads/" in request.url.path:
            # Recorded without the body: a layer is hundreds of megabytes.
            self.requests.append(httpx.Request("PUT", request.url, headers=request.headers))
        else:
            self.requests.append(request)
        known = {self.host.split(":")[0], *self.aliases}
        if request.url.host not in known or request.url.scheme != self.scheme:
            raise httpx.ConnectError(f"no registry at {request.url.scheme}://{request.url.host}")
        if self.unavailable > 0:
            self.unavailable -= 1
            return httpx.Response(503, text="upstream unavailable")
        path = request.url.path
        if path == "/token":
            return self._token(request)
        if path == "/v2/":
            return self._base(request)
        if path.startswith("/v2/") and "/blobs/uploads/" in path:
            name, _, upload = path[len("/v2/") :].partition("/blobs/uploads/")
            return self._upload(request, name, upload)
        if path.startswith("/v2/") and "/manifests/" in path:
            name, _, ref = path[len("/v2/") :].partition("/manifests/")
            if request.method == "PUT":
                return self._put_manifest(request, name, ref)
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
        return set(self.repositories) if self._valid_user(user, password) else None

    def _token(self, request: httpx.Request) -> httpx.Response:
        scope = request.url.params.get("scope", "")
        parts = scope.split(":")
        name = parts[1] if len(parts) == 3 else ""
        authorized = False
        header = request.headers.get("authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if not self._valid_user(user, password):
                return httpx.Response(401, json={"errors": [{"code": "UNAUTHORIZED"}]})
            authorized = True
        repo = self.repositories.get(name)
        granted = set()
        if repo is not None and (authorized or not repo.private):
            granted.add(name)
        token = secrets.token_urlsafe(16)
        self.tokens[token] = granted
        if len(parts) == 3 and "push" in parts[2].split(",") and authorized:
            user = base64.b64decode(header[6:]).decode().partition(":")[0]
            if user == CI_USER or name.split("/")[0] == user:
                self.push_tokens[token] = {name}
        return httpx.Response(200, json={"token": token})

    def _may_push(self, request: httpx.Request, name: str) -> httpx.Response | Repository:
        """The repository (created on a first push) if the request may push to it."""
        header = request.headers.get("authorization", "")
        if self.auth == "basic":
            allowed = self._granted(request) is not None
        else:
            allowed = name in self.push_tokens.get(header.removeprefix("Bearer "), set())
        if not allowed:
            challenge = self._challenge(None)
            if self.auth != "basic":
                challenge["WWW-Authenticate"] += f',scope="repository:{name}:pull,push"'
            return httpx.Response(
                401, headers=challenge, json={"errors": [{"code": "UNAUTHORIZED"}]}
            )
        return self.repositories.setdefault(name, Repository(private=True))

    def _upload(self, request: httpx.Request, name: str, upload: str) -> httpx.Response:
        """A monolithic blob upload: ``POST`` opens it (or mounts a blob another repository
        has), ``PUT ...?digest=`` closes it with the whole body."""
        repo = self._may_push(request, name)
        if isinstance(repo, httpx.Response):
            return repo
        if request.method == "POST" and not upload:
            mount = request.url.params.get("mount", "")
            source = self.repositories.get(request.url.params.get("from", ""))
            if mount and source is not None and mount in source.blobs:
                repo.blobs[mount] = source.blobs[mount]
                return httpx.Response(201, headers={"Location": f"/v2/{name}/blobs/{mount}"})
            upload_id = str(uuid.uuid4())
            self.uploads[upload_id] = name
            return httpx.Response(
                202, headers={"Location": f"/v2/{name}/blobs/uploads/{upload_id}"}
            )
        if request.method != "PUT" or self.uploads.get(upload) != name:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UPLOAD_UNKNOWN"}]})
        digest = request.url.params.get("digest", "")
        body = request.content
        if _digest(body) != digest:
            return httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID"}]})
        del self.uploads[upload]
        repo.blobs[digest] = body
        return httpx.Response(201, headers={"Location": f"/v2/{name}/blobs/{digest}"})

    def _put_manifest(self, request: httpx.Request, name: str, ref: str) -> httpx.Response:
        repo = self._may_push(request, name)
        if isinstance(repo, httpx.Response):
            return repo
        media_type = request.headers.get("content-type", "")
        try:
            document = json.loads(request.content)
        except ValueError:
            return httpx.Response(400, json={"errors": [{"code": "MANIFEST_INVALID"}]})
        named = [document.get("config", {}), *document.get("layers", [])]
        unknown = [d.get("digest") for d in named if d and d.get("digest") not in repo.blobs]
        unknown += [
            d.get("digest")
            for d in document.get("manifests", [])
            if d.get("digest") not in repo.manifests
        ]
        if unknown:
            return httpx.Response(
                400, json={"errors": [{"code": "MANIFEST_BLOB_UNKNOWN", "detail": unknown}]}
            )
        stored = repo.store_manifest_body(media_type, request.content)
        if not ref.startswith("sha256:"):
            repo.tags[ref] = stored["digest"]
            repo.appears_after[ref] = 0
        return httpx.Response(
            201,
            headers={
                "Docker-Content-Digest": stored["digest"],
                "Location": f"/v2/{name}/manifests/{stored['digest']}",
            },
        )

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
