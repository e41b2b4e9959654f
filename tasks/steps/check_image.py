"""Is the image CI built for this sha in the registry yet? (runbook §2 step 1, §4)

Spoken over the OCI distribution API with httpx, so no docker daemon is needed: a ``HEAD`` on
the manifest, following the registry's ``WWW-Authenticate: Bearer`` challenge for a token —
anonymously for public images, with the GHCR user and token for private ones. An image in
Amazon ECR (``<account>.dkr.ecr.<region>.amazonaws.com/…``) is asked through ECR's API instead
(``ecr:DescribeImages`` with the flows' AWS credentials, no token). The webhook
often arrives while the image is still building, so the check polls with backoff (tenacity)
up to ``image_wait_seconds`` and then fails with a sentence that says what to look at.

The check keeps the manifest digest it saw (``Docker-Content-Digest``, else the sha256 of the
manifest's body; an index's own digest for a multi-platform image): every pull of the preview
names it (``image:sha@digest``), so a tag pushed again after the check cannot change what runs.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from tenacity import RetryCallState, Retrying, retry_if_result

from tasks.cloud.ecr import EcrRepository
from tasks.config import DIGEST_PATTERN
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.retry import ACCESS_DENIED_CODES, Transient, error_code, is_transient
from tasks.run.step import step
from tasks.run.tls import tls_context

if TYPE_CHECKING:
    from mypy_boto3_ecr import ECRClient

    from tasks.config import PreviewConfig

logger = logging.getLogger(__name__)

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
DOCKER_HUB = "registry-1.docker.io"
PLAIN_HTTP_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(PreviewError):
    """The registry answered something we cannot act on; the message says what."""


class RegistryUnavailable(RegistryError, Transient):
    """5xx or a dropped connection: worth asking again."""


class RegistryAuthError(RegistryError):
    """The registry rejected the credentials we were given."""


class RepositoryMissing(RegistryError):
    """The registry says the repository itself does not exist: waiting will not help."""


class ImageNotFound(RegistryError):
    """The image for the sha never appeared within the wait."""


@dataclass(frozen=True)
class ImageRef:
    """``ghcr.io/owner/app`` split into where to ask and what to ask for."""

    registry: str
    name: str

    @classmethod
    def parse(cls, image: str) -> ImageRef:
        image = image.split("@", 1)[0]
        first, _, rest = image.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, name = first, rest
        else:
            registry, name = DOCKER_HUB, image
            if "/" not in name:
                name = f"library/{name}"
        if ":" in name.rsplit("/", 1)[-1]:
            raise ValueError(f"image {image!r} includes a tag; pass the repository only")
        return cls(registry, name)

    @property
    def host(self) -> str:
        if self.registry.startswith("["):
            return self.registry[1:].split("]", 1)[0]
        return self.registry.rsplit(":", 1)[0] if ":" in self.registry else self.registry

    @property
    def base_url(self) -> str:
        """Plain http for a registry on this machine, as docker does; https otherwise."""
        scheme = "http" if self.host in PLAIN_HTTP_HOSTS else "https"
        return f"{scheme}://{self.registry}"


@dataclass(frozen=True)
class ImageCheck:
    """The image the preview will pull — ``digest`` is the manifest the check saw, what every
    pull names — and how long it took to appear."""

    image: str
    sha: str
    digest: str
    attempts: int
    waited_seconds: float
    pr_tag: str | None = None
    pr_tag_present: bool | None = None

    @property
    def reference(self) -> str:
        return f"{self.image}:{self.sha}"


class Registry:
    """One registry session for one image repository; keeps its bearer token between polls."""

    def __init__(
        self,
        image: str,
        *,
        username: str | None = None,
        password: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.ref = ImageRef.parse(image)
        self.image = image
        self._credentials = (username or "token", password) if password else None
        self._token: str | None = None
        self._client = httpx.Client(
            base_url=self.ref.base_url,
            transport=transport,
            timeout=timeout,
            follow_redirects=True,
            verify=tls_context(),
        )
        self.denied: str | None = None

    def __repr__(self) -> str:
        return f"Registry({self.image!r}, credentials={self._credentials is not None})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def manifest_digest(self, reference: str) -> str | None:
        """The manifest digest of ``reference``, or None when the registry has no such tag.

        ``Docker-Content-Digest`` of a ``HEAD``; a registry that does not send it is asked for
        the manifest itself, whose sha256 is its digest. A pull denied after authenticating also
        reads as None (GHCR says "denied" both for a package that does not exist yet and for one
        we may not see); ``denied`` keeps the why.
        """
        path = f"/v2/{self.ref.name}/manifests/{reference}"
        response = self._request("HEAD", path)
        if response.status_code == 401:
            self._authenticate(response)
            response = self._request("HEAD", path)
        if response.status_code in (401, 403):
            self.denied = (
                f"{self.ref.registry} denied pull access to {self.ref.name} "
                f"({'with' if self._credentials else 'without'} credentials, HTTP "
                f"{response.status_code})"
            )
            return None
        if response.status_code == 404:
            return None
        if response.status_code >= 500 or response.status_code == 429:
            raise RegistryUnavailable(
                f"HEAD {self.ref.base_url}{path} → {response.status_code}; the registry is "
                "unavailable"
            )
        if response.status_code >= 400:
            raise RegistryError(f"HEAD {self.ref.base_url}{path} → {response.status_code}")
        digest = str(response.headers.get("Docker-Content-Digest", ""))
        if DIGEST_PATTERN.fullmatch(digest):
            return digest
        return self._body_digest(path)

    def _body_digest(self, path: str) -> str:
        """The digest of the manifest ``GET`` answers: the sha256 of its bytes, as the registry
        and docker compute it."""
        response = self._request("GET", path)
        if response.status_code >= 500 or response.status_code == 429:
            raise RegistryUnavailable(f"GET {self.ref.base_url}{path} → {response.status_code}")
        if response.status_code >= 400:
            raise RegistryError(f"GET {self.ref.base_url}{path} → {response.status_code}")
        return "sha256:" + hashlib.sha256(response.content).hexdigest()

    def _request(self, method: str, path: str) -> httpx.Response:
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            return self._client.request(method, path, headers=headers)
        except httpx.TransportError as exc:
            raise RegistryUnavailable(
                f"{method} {self.ref.base_url}{path}: {type(exc).__name__}: {exc}"
            ) from exc

    def _authenticate(self, response: httpx.Response) -> None:
        """Answer a ``Bearer realm=…,service=…,scope=…`` challenge with a token."""
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, _, rest = challenge.partition(" ")
        if scheme.lower() != "bearer":
            raise RegistryAuthError(
                f"{self.ref.registry} asked for {scheme or 'no'} authentication; only Bearer "
                "token challenges are supported"
            )
        params = dict(_CHALLENGE_PARAM.findall(rest))
        realm = params.get("realm")
        if not realm:
            raise RegistryAuthError(f"{self.ref.registry} sent a Bearer challenge without realm")
        query = {"scope": params.get("scope") or f"repository:{self.ref.name}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        auth = None
        if self._credentials is not None:
            realm_url = httpx.URL(realm)
            if realm_url.scheme != "https" and realm_url.host not in PLAIN_HTTP_HOSTS:
                raise RegistryAuthError(f"refusing to send credentials over plain http to {realm}")
            auth = httpx.BasicAuth(self._credentials[0], self._credentials[1] or "")
        try:
            answer = self._client.get(realm, params=query, auth=auth)
        except httpx.TransportError as exc:
            raise RegistryUnavailable(f"token request to {realm}: {type(exc).__name__}") from exc
        if answer.status_code in (401, 403):
            if self._credentials is None:
                self._token = None
                return  # anonymous access refused: the HEAD will say denied
            raise RegistryAuthError(
                f"{realm} rejected the registry credentials (HTTP {answer.status_code}): the "
                "GHCR token is invalid, expired or lacks read:packages (runbook §4)"
            )
        if answer.status_code >= 500:
            raise RegistryUnavailable(f"token request to {realm} → {answer.status_code}")
        if answer.status_code >= 400:
            raise RegistryError(f"token request to {realm} → {answer.status_code}")
        data = answer.json()
        token = data.get("token") or data.get("access_token")
        if not token:
            raise RegistryError(f"{realm} answered without a token")
        self._token = str(token)


class EcrRegistry:
    """The build-image check's registry session, for an ECR repository: one ``DescribeImages``
    per poll, answering like :class:`Registry` (a digest, or None for "not
    pushed yet"; rejected credentials and a missing repository raise at once)."""

    def __init__(self, ecr: ECRClient, repository: EcrRepository) -> None:
        self.ecr = ecr
        self.repository = repository
        self.denied: str | None = None  # ECR says so at once: AccessDenied raises

    def __repr__(self) -> str:
        return f"EcrRegistry({str(self.repository)!r})"

    def __enter__(self) -> EcrRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def manifest_digest(self, reference: str) -> str | None:
        repo = self.repository
        try:
            details = self.ecr.describe_images(
                registryId=repo.account,
                repositoryName=repo.name,
                imageIds=[{"imageTag": reference}],
            )["imageDetails"]
        except ClientError as exc:
            code = error_code(exc)
            if code == "ImageNotFoundException":
                return None
            if code == "RepositoryNotFoundException":
                raise RepositoryMissing(
                    f"ECR has no repository {repo.name} in account {repo.account}"
                    f" ({repo.region}): create it (aws ecr create-repository --region"
                    f" {repo.region} --repository-name {repo.name}) and let the build workflow"
                    " push to it, or fix image in the configuration"
                ) from exc
            if code in ACCESS_DENIED_CODES:
                raise RegistryAuthError(
                    f"{code}: the flows' role may not call ecr:DescribeImages on {repo.arn}:"
                    " grant it (deployments/iam/orchestrator-policy.json,"
                    " CheckImagesInTheConfiguredEcrRepositories)"
                ) from exc
            if is_transient(exc):
                raise RegistryUnavailable(f"ECR DescribeImages on {repo.name}: {code}") from exc
            raise RegistryError(f"ECR DescribeImages on {repo.name}: {code}") from exc
        except BotoCoreError as exc:
            raise RegistryUnavailable(
                f"ECR DescribeImages on {repo.name}: {type(exc).__name__}"
            ) from exc
        if not details:
            return None
        digest = str(details[0].get("imageDigest") or "")
        if not DIGEST_PATTERN.fullmatch(digest):
            raise RegistryError(f"ECR DescribeImages on {repo.name}: no image digest ({digest!r})")
        return digest


def image_exists(
    image: str,
    ref: str,
    *,
    username: str | None = None,
    password: str | None = None,
    transport: httpx.BaseTransport | None = None,
) -> bool:
    """Whether ``image:ref`` is in the registry (404 → False; other failures raise)."""
    with Registry(image, username=username, password=password, transport=transport) as registry:
        return registry.manifest_digest(ref) is not None


def _minutes(seconds: float) -> str:
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:.3g} s"


def wait_for_image(
    image: str,
    sha: str,
    *,
    timeout_seconds: float,
    poll_seconds: float,
    max_poll_seconds: float = 60.0,
    pr_number: int | None = None,
    username: str | None = None,
    password: str | None = None,
    transport: httpx.BaseTransport | None = None,
    ecr: ECRClient | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> ImageCheck:
    """Poll for ``image:sha`` with doubling intervals (capped) until it exists or time runs out.

    Registry hiccups (5xx, dropped connections, throttling) count as "not yet"; rejected
    credentials and a repository the registry says does not exist fail at once. An ECR image is
    asked through ``ecr`` (an ECR client of the image's region). ``:pr-<n>`` is looked at once
    afterwards, for the log only.
    """
    start = clock()
    deadline = start + timeout_seconds
    cap = max(poll_seconds, max_poll_seconds)
    last_problem: list[str] = []

    with _lookup(image, username, password, transport, ecr) as registry:

        def attempt() -> str | None:
            try:
                return registry.manifest_digest(sha)
            except RegistryUnavailable as exc:
                last_problem[:] = [str(exc)]
                return None

        def wait(state: RetryCallState) -> float:
            backoff = min(cap, poll_seconds * 2.0 ** (state.attempt_number - 1))
            return max(0.0, min(backoff, deadline - clock()))

        def stop(state: RetryCallState) -> bool:
            return clock() >= deadline

        def before_sleep(state: RetryCallState) -> None:
            logger.info(
                "image %s:%s not there yet (attempt %d); waiting %.1f s",
                image,
                sha,
                state.attempt_number,
                state.upcoming_sleep,
            )

        retrying = Retrying(
            sleep=sleep,
            stop=stop,
            wait=wait,
            retry=retry_if_result(lambda digest: digest is None),
            before_sleep=before_sleep,
            retry_error_callback=lambda state: None,
        )
        digest = retrying(attempt)
        attempts = int(retrying.statistics.get("attempt_number", 1))
        if digest is None:
            why = " — did the build workflow push it?"
            if registry.denied:
                why += f" ({registry.denied}; check the GHCR token has read:packages)"
            elif last_problem:
                why += f" (last registry error: {last_problem[0]})"
            raise ImageNotFound(
                f"image {image}:{sha} not found after {_minutes(timeout_seconds)}{why}"
            )

        pr_tag = f"pr-{pr_number}" if pr_number is not None else None
        pr_tag_present = None
        if pr_tag is not None:
            try:
                pr_tag_present = registry.manifest_digest(pr_tag) is not None
            except RegistryError as exc:
                logger.info("tag %s:%s not checked: %s", image, pr_tag, exc)
            if pr_tag_present is False:
                logger.info("tag %s:%s is missing (informational, runbook §2)", image, pr_tag)

    return ImageCheck(
        image=image,
        sha=sha,
        digest=digest,
        attempts=attempts,
        waited_seconds=clock() - start,
        pr_tag=pr_tag,
        pr_tag_present=pr_tag_present,
    )


def _lookup(
    image: str,
    username: str | None,
    password: str | None,
    transport: httpx.BaseTransport | None,
    ecr: ECRClient | None,
) -> Registry | EcrRegistry:
    """The registry session for ``image``: ECR's API for an ECR repository, else OCI."""
    repository = EcrRepository.parse(image)
    if repository is None:
        return Registry(image, username=username, password=password, transport=transport)
    if ecr is None:
        raise ValueError(f"{image} is in ECR: the check needs an ECR client of {repository.region}")
    return EcrRegistry(ecr, repository)


@step(retry=False)
def check_image(
    settings: PreviewConfig,
    repo: str,
    pr_number: int,
    sha: str,
    ghcr_token: str | None,
    *,
    transport: httpx.BaseTransport | None = None,
    ecr: ECRClient | None = None,
) -> ImageCheck:
    """Wait for the image of ``sha``; the poll is the retry layer, so no task retries.

    ``ghcr_token`` (from Parameter Store) is used for the registry token request only and is
    never logged; an ECR image needs none, it is asked through ``ecr`` (``AwsClients.ecr``).
    """
    log = run_logger(logger)
    image = settings.image_for(repo)
    result = wait_for_image(
        image,
        sha,
        timeout_seconds=settings.image_wait_seconds,
        poll_seconds=settings.poll_seconds,
        pr_number=pr_number,
        username=settings.registry_username(repo) if ghcr_token else None,
        password=ghcr_token,
        transport=transport,
        ecr=ecr,
    )
    log.info(
        "image %s found after %d attempt(s), %.0f s: the preview pulls %s",
        result.reference,
        result.attempts,
        result.waited_seconds,
        result.digest,
    )
    return result
