"""The build-image check against a fake OCI registry with GHCR's bearer-token challenge."""

from __future__ import annotations

import base64
import logging

import httpx
import pytest

from local_stack.registry import FakeRegistry
from tasks.config import PreviewConfig
from tasks.steps.check_image import (
    MANIFEST_TYPES,
    ImageNotFound,
    ImageRef,
    RegistryAuthError,
    check_image,
    image_exists,
    wait_for_image,
)
from tests.support import CANARY_GHCR_TOKEN

IMAGE = "ghcr.io/octo-org/app"
NAME = "octo-org/app"
SHA = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"


class Clock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def ghcr() -> FakeRegistry:
    """A fake GHCR answered in process (its ``transport``, no socket) that knows octo-org's
    token: unlike conftest's ``registry``, which serves over HTTP on 127.0.0.1 for instances."""
    return FakeRegistry(users={"octo-org": CANARY_GHCR_TOKEN})


def test_image_references_are_split_like_docker_does() -> None:
    assert ImageRef.parse("ghcr.io/octo-org/app").base_url == "https://ghcr.io"
    assert ImageRef.parse("ghcr.io/octo-org/app").name == "octo-org/app"
    assert ImageRef.parse("localhost:5000/app").base_url == "http://localhost:5000"
    assert ImageRef.parse("127.0.0.1:5000/team/app").base_url == "http://127.0.0.1:5000"
    assert ImageRef.parse("registry.example.com:5000/app").base_url.startswith("https://")
    assert ImageRef.parse("nginx") == ImageRef("registry-1.docker.io", "library/nginx")
    with pytest.raises(ValueError, match="tag"):
        ImageRef.parse("ghcr.io/octo-org/app:latest")


def test_public_image_gets_an_anonymous_token(ghcr: FakeRegistry) -> None:
    ghcr.push(NAME, SHA)
    assert image_exists(IMAGE, SHA, transport=ghcr.transport)

    first, token, second = ghcr.requests
    assert first.method == "HEAD" and "authorization" not in first.headers
    assert token.url.path == "/token" and "authorization" not in token.headers
    assert token.url.params["scope"] == f"repository:{NAME}:pull"
    assert token.url.params["service"] == "ghcr.io"
    assert second.headers["authorization"].startswith("Bearer ")
    assert second.headers["accept"] == ", ".join(MANIFEST_TYPES)


def test_missing_tag_is_false_not_an_error(ghcr: FakeRegistry) -> None:
    ghcr.push(NAME, "something-else")
    assert not image_exists(IMAGE, SHA, transport=ghcr.transport)


def test_private_image_uses_basic_auth_for_the_token(ghcr: FakeRegistry) -> None:
    ghcr.push(NAME, SHA, private=True)
    assert image_exists(
        IMAGE, SHA, username="octo-org", password=CANARY_GHCR_TOKEN, transport=ghcr.transport
    )
    [token_request] = ghcr.token_requests()
    scheme, _, encoded = token_request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == f"octo-org:{CANARY_GHCR_TOKEN}"
    granted = [token for token, names in ghcr.tokens.items() if NAME in names]
    manifest = ghcr.manifest_requests(SHA)[-1]
    assert manifest.headers["authorization"] == f"Bearer {granted[0]}"
    assert CANARY_GHCR_TOKEN not in manifest.headers["authorization"]


def test_rejected_credentials_fail_at_once_without_the_secret(ghcr: FakeRegistry) -> None:
    ghcr.push(NAME, SHA, private=True)
    clock = Clock()
    with pytest.raises(RegistryAuthError) as raised:
        wait_for_image(
            IMAGE,
            SHA,
            timeout_seconds=1200,
            poll_seconds=5,
            username="octo-org",
            password="ghp_WrongTokenWrongTokenWrongToken123",
            transport=ghcr.transport,
            sleep=clock.sleep,
            clock=clock,
        )
    assert "read:packages" in str(raised.value)
    assert "ghp_Wrong" not in str(raised.value)
    assert clock.sleeps == []


def test_private_image_without_credentials_is_reported_as_denied(ghcr: FakeRegistry) -> None:
    ghcr.push(NAME, SHA, private=True)
    clock = Clock()
    with pytest.raises(ImageNotFound) as raised:
        wait_for_image(
            IMAGE,
            SHA,
            timeout_seconds=60,
            poll_seconds=5,
            transport=ghcr.transport,
            sleep=clock.sleep,
            clock=clock,
        )
    assert "denied pull access" in str(raised.value)
    assert "read:packages" in str(raised.value)


def test_localhost_registry_is_spoken_to_over_http() -> None:
    registry = FakeRegistry(host="localhost:5000", scheme="http")
    registry.push("app", SHA)
    assert image_exists("localhost:5000/app", SHA, transport=registry.transport)
    assert {str(r.url.scheme) for r in registry.requests} == {"http"}
    assert registry.requests[1].url.host == "localhost"  # the token realm, same host


def test_image_appears_after_some_polls(ghcr: FakeRegistry) -> None:
    digest = ghcr.push(NAME, SHA, after_polls=3)
    ghcr.push(NAME, "pr-42")
    clock = Clock()
    result = wait_for_image(
        IMAGE,
        SHA,
        timeout_seconds=1200,
        poll_seconds=5,
        max_poll_seconds=12,
        pr_number=42,
        transport=ghcr.transport,
        sleep=clock.sleep,
        clock=clock,
    )
    assert result.digest == digest and result.attempts == 4
    assert clock.sleeps == [5, 10, 12]  # doubling, capped
    assert result.waited_seconds == 27
    assert result.pr_tag == "pr-42" and result.pr_tag_present is True
    assert len(ghcr.token_requests()) == 1  # the token is kept between polls


def test_image_never_appears_names_the_failure(ghcr: FakeRegistry) -> None:
    ghcr.create(NAME)
    clock = Clock()
    with pytest.raises(ImageNotFound) as raised:
        wait_for_image(
            IMAGE,
            SHA,
            timeout_seconds=1200,
            poll_seconds=5,
            transport=ghcr.transport,
            sleep=clock.sleep,
            clock=clock,
        )
    assert str(raised.value) == (
        f"image ghcr.io/octo-org/app:{SHA} not found after 20 min — did the build workflow push it?"
    )
    assert sum(clock.sleeps) == 1200 and max(clock.sleeps) <= 60
    polls = [r for r in ghcr.manifest_requests(SHA) if "authorization" in r.headers]
    assert len(polls) == len(clock.sleeps) + 1  # one poll at the deadline, none after


def test_registry_hiccups_count_as_not_yet(ghcr: FakeRegistry) -> None:
    ghcr.push(NAME, SHA)
    ghcr.unavailable = 2
    clock = Clock()
    result = wait_for_image(
        IMAGE,
        SHA,
        timeout_seconds=60,
        poll_seconds=1,
        transport=ghcr.transport,
        sleep=clock.sleep,
        clock=clock,
    )
    assert result.attempts == 3 and clock.sleeps == [1, 2]


def test_check_image_task_uses_the_config_and_hides_the_token(
    ghcr: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    ghcr.push(NAME, SHA, private=True, after_polls=1)
    config = PreviewConfig(image=IMAGE, poll_seconds=0.01, image_wait_seconds=5)
    with caplog.at_level(logging.DEBUG):
        result = check_image.fn(
            config, "Octo-Org/App", 42, SHA, CANARY_GHCR_TOKEN, transport=ghcr.transport
        )
    assert result.reference == f"{IMAGE}:{SHA}" and result.attempts == 2
    assert result.pr_tag_present is False  # informational only
    assert ghcr.token_requests()[0].headers["authorization"].startswith("Basic ")
    assert CANARY_GHCR_TOKEN not in caplog.text


@pytest.mark.parametrize("header", [None, "", "sha256:not-a-digest"], ids=["none", "empty", "bad"])
def test_without_a_usable_digest_header_the_digest_is_the_manifests_sha256(
    ghcr: FakeRegistry, header: str | None
) -> None:
    """Some registries and mirrors send no Docker-Content-Digest: the check reads the manifest
    (the index, for a multi-platform image) and takes the sha256 of its bytes, as docker does."""
    index_digest = ghcr.push(NAME, SHA)

    def answer(request: httpx.Request) -> httpx.Response:
        response = ghcr.handle(request)
        sent = response.headers.pop("Docker-Content-Digest", None)
        if sent is not None and header is not None:
            response.headers["Docker-Content-Digest"] = header
        return response

    result = wait_for_image(
        IMAGE, SHA, timeout_seconds=0, poll_seconds=1, transport=httpx.MockTransport(answer)
    )

    assert result.digest == index_digest
    [get] = [r for r in ghcr.manifest_requests(SHA) if r.method == "GET"]
    assert get.headers["accept"] == ", ".join(MANIFEST_TYPES)
