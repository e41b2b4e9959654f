"""The self-hosted receiver: signed GitHub deliveries in, Prefect events out.

A fake Prefect events API (httpx.MockTransport) answers like the real one — 204, duplicate
ids dropped — and records the exact bodies posted.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import os
import select
import socket
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

with warnings.catch_warnings():  # starlette 1.x nudges towards httpx2; httpx is what we have
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from deployments.events import event_from_delivery
from deployments.receiver import (
    LOGGER_NAME,
    create_app,
    resolve_secret,
    server_options,
    signature_header,
    verify_signature,
)
from deployments.spool import Spool
from local_stack.serve import serve_asgi

PAYLOADS = Path(__file__).parent / "data" / "github-payloads"
SECRET = "It's-a-Secret-to-Everybody-CANARY-7f3a"
PREFECT_API = "http://prefect.test/api"


def payload_bytes(file_name: str) -> bytes:
    return (PAYLOADS / file_name).read_bytes()


class FakePrefectEvents:
    """`POST /api/events` as the Prefect server answers it: 204, duplicate ids dropped."""

    def __init__(self) -> None:
        self.posts: list[list[dict[str, Any]]] = []
        self.authorizations: list[str | None] = []
        self.stored: dict[str, dict[str, Any]] = {}
        self.fail_with: int | Exception | None = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        if isinstance(self.fail_with, Exception):
            raise self.fail_with
        if self.fail_with is not None:
            return httpx.Response(self.fail_with, json={"detail": "boom"})
        if request.method != "POST" or request.url.path != "/api/events":
            return httpx.Response(404, json={"detail": "Not Found"})
        self.authorizations.append(request.headers.get("authorization"))
        events = json.loads(request.content)
        if not isinstance(events, list) or not all("id" in e for e in events):
            return httpx.Response(422, json={"detail": "invalid events"})
        self.posts.append(events)
        for event in events:
            self.stored.setdefault(event["id"], event)
        return httpx.Response(204)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    @property
    def posted(self) -> list[dict[str, Any]]:
        return [event for post in self.posts for event in post]


@pytest.fixture
def prefect() -> FakePrefectEvents:
    return FakePrefectEvents()


@pytest.fixture
def client(prefect: FakePrefectEvents) -> Iterator[TestClient]:
    app = create_app(SECRET, prefect_api_url=PREFECT_API, http_transport=prefect.transport)
    with TestClient(app) as test_client:
        yield test_client


def deliver(
    client: TestClient,
    event_name: str | None,
    body: bytes,
    *,
    delivery: str | None = None,
    secret: str | None = SECRET,
    signature: str | bytes | None = None,
    content_type: str = "application/json",
) -> httpx.Response:
    """POST a delivery the way GitHub does: headers, raw body, HMAC over the raw body."""
    headers: dict[str, Any] = {
        "Content-Type": content_type,
        "User-Agent": "GitHub-Hookshot/044aadd",
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "292430182",
    }
    if event_name is not None:
        headers["X-GitHub-Event"] = event_name
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    elif secret is not None:
        headers["X-Hub-Signature-256"] = signature_header(secret, body)
    return client.post("/webhook", content=body, headers=headers)


# -- signatures ------------------------------------------------------------------------------


def test_a_signed_opened_delivery_posts_exactly_the_mapped_event(
    client: TestClient, prefect: FakePrefectEvents
) -> None:
    body = payload_bytes("pull_request.opened.json")
    delivery = "72d3162e-cc78-11e3-81ab-4c9367dc0958"

    response = deliver(client, "pull_request", body, delivery=delivery)

    assert response.status_code == 200
    assert response.json() == {
        "outcome": "emitted",
        "event": "github.pull_request.opened",
        "id": delivery,
    }
    assert prefect.posts == [[event_from_delivery("pull_request", delivery, json.loads(body))]]


def test_a_signature_with_the_wrong_secret_is_refused(
    client: TestClient, prefect: FakePrefectEvents
) -> None:
    body = payload_bytes("pull_request.opened.json")

    response = deliver(client, "pull_request", body, secret="not-the-secret")

    assert response.status_code == 401
    assert prefect.posts == []


def test_a_missing_signature_is_refused(client: TestClient, prefect: FakePrefectEvents) -> None:
    response = deliver(
        client, "pull_request", payload_bytes("pull_request.opened.json"), secret=None
    )

    assert response.status_code == 401
    assert prefect.posts == []


def test_a_valid_sha1_signature_is_refused(client: TestClient, prefect: FakePrefectEvents) -> None:
    body = payload_bytes("pull_request.opened.json")
    sha1 = "sha1=" + hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()

    response = deliver(client, "pull_request", body, signature=sha1)

    assert response.status_code == 401
    assert prefect.posts == []


def test_a_signature_over_another_body_is_refused(
    client: TestClient, prefect: FakePrefectEvents
) -> None:
    body = payload_bytes("pull_request.opened.json")
    tampered = body.replace(b'"opened"', b'"closed"', 1)

    response = deliver(client, "pull_request", tampered, signature=signature_header(SECRET, body))

    assert response.status_code == 401
    assert prefect.posts == []


@pytest.mark.parametrize(
    "signature",
    ["sha256", "sha256=", "sha256=zz", "=abc", "SHA256", b"sha256=\xff\xfe", "sha512=00"],
    ids=repr,
)
def test_a_garbled_signature_is_a_401_not_a_500(client: TestClient, signature: str | bytes) -> None:
    response = deliver(
        client, "pull_request", payload_bytes("pull_request.opened.json"), signature=signature
    )

    assert response.status_code == 401


def test_verify_signature_is_a_pure_function_over_raw_bytes() -> None:
    body = b'{"zen": "Keep it logically awesome."}'
    good = signature_header("s3cret", body)

    assert good == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert verify_signature("s3cret", body, good)
    assert verify_signature("s3cret", body, good.upper().replace("SHA256=", "sha256="))
    assert not verify_signature("s3cret", body + b" ", good)
    assert not verify_signature("s3cret", body, None)
    assert not verify_signature("s3cret", body, "")


# -- routing ---------------------------------------------------------------------------------


def test_ping_is_answered_with_zen(client: TestClient, prefect: FakePrefectEvents) -> None:
    response = deliver(client, "ping", payload_bytes("ping.json"))

    assert response.status_code == 200
    assert response.json()["zen"] == "Anything added dilutes everything else."
    assert prefect.posts == []


def test_other_events_are_accepted_and_ignored(
    client: TestClient, prefect: FakePrefectEvents
) -> None:
    response = deliver(client, "push", payload_bytes("push.json"))

    assert response.status_code == 202
    assert response.json() == {"outcome": "ignored"}
    assert prefect.posts == []


def test_unhandled_pull_request_actions_are_accepted_and_ignored(
    client: TestClient, prefect: FakePrefectEvents
) -> None:
    edited = json.loads(payload_bytes("pull_request.opened.json")) | {"action": "edited"}
    response = deliver(client, "pull_request", json.dumps(edited).encode())

    assert response.status_code == 202
    assert prefect.posts == []


@pytest.mark.parametrize(
    ("file_name", "event_name"),
    [
        ("pull_request.opened.json", "github.pull_request.opened"),
        ("pull_request.opened.with-null-body.json", "github.pull_request.opened"),
        ("pull_request.synchronize.json", "github.pull_request.synchronize"),
        ("pull_request.reopened.json", "github.pull_request.reopened"),
        ("pull_request.closed.json", "github.pull_request.closed"),
        ("pull_request.closed.with-organization.json", "github.pull_request.closed"),
        ("pull_request.labeled.json", "github.pull_request.labeled"),
    ],
)
def test_handled_actions_are_emitted(
    client: TestClient, prefect: FakePrefectEvents, file_name: str, event_name: str
) -> None:
    response = deliver(client, "pull_request", payload_bytes(file_name))

    assert response.status_code == 200
    [event] = prefect.posted
    assert event["event"] == event_name
    assert event["resource"]["prefect.resource.id"] == "github.pr.Codertocat/Hello-World/2"


def test_a_merged_close_and_a_fork_head_reach_the_payload(
    client: TestClient, prefect: FakePrefectEvents
) -> None:
    closed = json.loads(payload_bytes("pull_request.closed.json"))
    closed["pull_request"]["merged"] = True
    opened = json.loads(payload_bytes("pull_request.opened.json"))
    opened["pull_request"]["head"]["repo"]["full_name"] = "forker/Hello-World"

    assert deliver(client, "pull_request", json.dumps(closed).encode()).status_code == 200
    assert deliver(client, "pull_request", json.dumps(opened).encode()).status_code == 200

    merged_event, fork_event = prefect.posted
    assert merged_event["payload"]["merged"] is True
    assert (fork_event["payload"]["fork"], fork_event["payload"]["head_repo"]) == (
        True,
        "forker/Hello-World",
    )


def test_a_form_encoded_delivery_is_read_like_json(
    client: TestClient, prefect: FakePrefectEvents
) -> None:
    raw = payload_bytes("pull_request.synchronize.json")
    body = urlencode({"payload": raw.decode()}).encode()
    delivery = str(uuid.uuid4())

    response = deliver(
        client,
        "pull_request",
        body,
        delivery=delivery,
        content_type="application/x-www-form-urlencoded",
    )

    assert response.status_code == 200
    assert prefect.posted == [event_from_delivery("pull_request", delivery, json.loads(raw))]


class Clock:
    """The spool's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(params=["no-spool", "spool"])
def clocked(
    request: pytest.FixtureRequest, prefect: FakePrefectEvents, tmp_path: Path
) -> Iterator[tuple[TestClient, Clock]]:
    """A receiver on a hand-moved clock, with and without a spool file."""
    clock = Clock()
    app = create_app(
        SECRET,
        prefect_api_url=PREFECT_API,
        http_transport=prefect.transport,
        spool_path=tmp_path / "spool.sqlite3" if request.param == "spool" else None,
        retry_seconds=3600,
        clock=clock,
    )
    with TestClient(app) as test_client:
        yield test_client, clock


def test_redeliver_after_the_first_run_was_lost_emits_again_under_a_new_id(
    clocked: tuple[TestClient, Clock], prefect: FakePrefectEvents
) -> None:
    """GitHub's Redeliver sends the same GUID and body. The first event reached Prefect, but its
    run was lost; Prefect drops an event id it has seen, so the repeat needs a new one."""
    client, clock = clocked
    body = payload_bytes("pull_request.opened.json")
    delivery = str(uuid.uuid4())

    first = deliver(client, "pull_request", body, delivery=delivery)
    clock.advance(61)
    again = deliver(client, "pull_request", body, delivery=delivery)

    assert (first.status_code, first.json()["outcome"]) == (200, "emitted")
    assert (again.status_code, again.json()["outcome"]) == (200, "emitted")
    assert again.json()["repeat_of"] == delivery
    assert len(prefect.stored) == 2  # two events Prefect keeps: two runs, not one
    kept_first, kept_again = prefect.stored.values()
    assert kept_first["id"] == delivery and kept_again["id"] == again.json()["id"] != delivery
    for key in ("event", "resource", "payload"):
        assert kept_again[key] == kept_first[key]


def test_a_redelivery_while_recent_is_a_duplicate_and_is_not_emitted(
    clocked: tuple[TestClient, Clock], prefect: FakePrefectEvents
) -> None:
    client, clock = clocked
    body = payload_bytes("pull_request.opened.json")
    delivery = str(uuid.uuid4())

    first = deliver(client, "pull_request", body, delivery=delivery)
    clock.advance(59)
    again = deliver(client, "pull_request", body, delivery=delivery)

    assert first.json()["outcome"] == "emitted"
    assert again.status_code == 200
    assert again.json()["outcome"] == "duplicate" and again.json()["id"] == delivery
    assert "reached Prefect" in again.json()["detail"]
    assert [e["id"] for e in prefect.posted] == [delivery]


def test_a_signed_body_replayed_under_a_new_delivery_id_is_a_duplicate(
    clocked: tuple[TestClient, Clock], prefect: FakePrefectEvents
) -> None:
    """The signature covers the body, not X-GitHub-Delivery: the body is the delivery."""
    client, _ = clocked
    body = payload_bytes("pull_request.opened.json")
    original = str(uuid.uuid4())

    deliver(client, "pull_request", body, delivery=original)
    replayed = deliver(client, "pull_request", body, delivery=str(uuid.uuid4()))

    assert replayed.json()["outcome"] == "duplicate" and replayed.json()["id"] == original
    assert [e["id"] for e in prefect.posted] == [original]


def test_a_delivery_prefect_refused_is_taken_again_at_once(prefect: FakePrefectEvents) -> None:
    """Without a spool a refused event is a 502: GitHub's Redeliver then is no duplicate."""
    app = create_app(SECRET, prefect_api_url=PREFECT_API, http_transport=prefect.transport)
    body = payload_bytes("pull_request.opened.json")
    delivery = str(uuid.uuid4())
    with TestClient(app) as client:
        prefect.fail_with = 503
        refused = deliver(client, "pull_request", body, delivery=delivery)
        prefect.fail_with = None
        again = deliver(client, "pull_request", body, delivery=delivery)

    assert refused.status_code == 502
    assert (again.status_code, again.json()["outcome"], again.json()["id"]) == (
        200,
        "emitted",
        delivery,
    )
    assert list(prefect.stored) == [delivery]


def test_a_delivery_id_that_is_not_a_guid_still_collapses(
    client: TestClient, prefect: FakePrefectEvents
) -> None:
    body = payload_bytes("pull_request.opened.json")

    deliver(client, "pull_request", body, delivery="not-a-guid")
    deliver(client, "pull_request", body, delivery="not-a-guid")

    ids = {e["id"] for e in prefect.posted}
    assert len(ids) == 1 and uuid.UUID(ids.pop()).version == 5


# -- bad input: 4xx, never 500 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"null", b"[]", b'"opened"', b"\xff\xfe{}", b"[" * 100_000],
    ids=["empty", "truncated", "null", "list", "string", "not-utf8", "deeply-nested"],
)
def test_a_body_that_is_not_a_json_object_is_a_400(
    client: TestClient, prefect: FakePrefectEvents, body: bytes
) -> None:
    response = deliver(client, "pull_request", body)

    assert response.status_code == 400
    assert prefect.posts == []


def test_a_bad_form_body_is_a_400(client: TestClient) -> None:
    response = deliver(
        client, "pull_request", b"nopayload=1", content_type="application/x-www-form-urlencoded"
    )

    assert response.status_code == 400


def test_a_handled_action_missing_fields_is_a_400(
    client: TestClient, prefect: FakePrefectEvents
) -> None:
    payload = json.loads(payload_bytes("pull_request.opened.json"))
    del payload["pull_request"]["head"]["sha"]

    response = deliver(client, "pull_request", json.dumps(payload).encode())

    assert response.status_code == 400
    assert "head" in response.json()["detail"]
    assert prefect.posts == []


def test_a_delivery_without_an_event_header_is_a_400(client: TestClient) -> None:
    response = deliver(client, None, payload_bytes("pull_request.opened.json"))

    assert response.status_code == 400


@pytest.mark.parametrize(
    "payload",
    [
        {"action": "opened"},
        {"action": "opened", "pull_request": None},
        {"action": "opened", "pull_request": {"number": "2"}},
        {"action": 5, "pull_request": []},
        {"action": "closed", "pull_request": {"number": 1, "head": {}, "base": {"repo": 1}}},
    ],
    ids=repr,
)
def test_odd_pull_request_payloads_never_make_a_500(
    client: TestClient, payload: dict[str, Any]
) -> None:
    response = deliver(client, "pull_request", json.dumps(payload).encode())

    assert 400 <= response.status_code < 500 or response.status_code == 202


def test_an_oversize_body_is_refused_by_its_content_length(prefect: FakePrefectEvents) -> None:
    app = create_app(
        SECRET, prefect_api_url=PREFECT_API, http_transport=prefect.transport, max_body_bytes=1024
    )
    with TestClient(app) as small:
        response = deliver(small, "pull_request", payload_bytes("pull_request.opened.json"))

    assert response.status_code == 413
    assert prefect.posts == []


def test_an_oversize_body_without_a_content_length_is_cut_off(prefect: FakePrefectEvents) -> None:
    app = create_app(
        SECRET, prefect_api_url=PREFECT_API, http_transport=prefect.transport, max_body_bytes=1024
    )
    body = payload_bytes("pull_request.opened.json")

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    with TestClient(app) as small:
        response = small.post(
            "/webhook",
            content=chunks(),
            headers={
                "X-GitHub-Event": "pull_request",
                "X-GitHub-Delivery": str(uuid.uuid4()),
                "X-Hub-Signature-256": signature_header(SECRET, body),
            },
        )

    assert response.status_code == 413
    assert prefect.posts == []


def test_a_body_at_the_limit_is_taken(prefect: FakePrefectEvents) -> None:
    body = payload_bytes("pull_request.opened.json")
    app = create_app(
        SECRET,
        prefect_api_url=PREFECT_API,
        http_transport=prefect.transport,
        max_body_bytes=len(body),
    )
    with TestClient(app) as exact:
        assert deliver(exact, "pull_request", body).status_code == 200


# -- the Prefect API -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [httpx.ConnectError("connection refused"), httpx.ReadTimeout("slow"), 500, 503, 422],
    ids=["down", "timeout", "500", "503", "422"],
)
def test_a_failing_prefect_api_is_a_502_so_github_can_redeliver(
    client: TestClient, prefect: FakePrefectEvents, failure: int | Exception
) -> None:
    prefect.fail_with = failure

    response = deliver(client, "pull_request", payload_bytes("pull_request.opened.json"))

    assert response.status_code == 502
    assert response.json()["outcome"] == "emit-failed"


def test_an_emit_callable_replaces_the_prefect_api() -> None:
    emitted: list[dict[str, Any]] = []

    async def emit(event: dict[str, Any]) -> None:
        emitted.append(event)

    with TestClient(create_app(SECRET, emit)) as app_client:
        response = deliver(app_client, "pull_request", payload_bytes("pull_request.reopened.json"))

    assert response.status_code == 200
    assert [e["event"] for e in emitted] == ["github.pull_request.reopened"]


# -- building and running --------------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, ""])
def test_no_app_without_a_secret(secret: str | None) -> None:
    with pytest.raises(ValueError, match="insecure-no-signature"):
        create_app(secret, prefect_api_url=PREFECT_API)


def test_no_app_without_somewhere_to_emit() -> None:
    with pytest.raises(ValueError, match="prefect_api_url"):
        create_app(SECRET)


def test_insecure_mode_takes_unsigned_deliveries(prefect: FakePrefectEvents) -> None:
    app = create_app(
        None,
        prefect_api_url=PREFECT_API,
        http_transport=prefect.transport,
        insecure_no_signature=True,
    )
    with TestClient(app) as insecure:
        response = deliver(
            insecure, "pull_request", payload_bytes("pull_request.opened.json"), secret=None
        )

    assert response.status_code == 200
    assert len(prefect.posted) == 1


def test_a_configured_secret_is_enforced_even_in_insecure_mode(prefect: FakePrefectEvents) -> None:
    app = create_app(SECRET, prefect_api_url=PREFECT_API, insecure_no_signature=True)
    with TestClient(app) as both:
        response = deliver(
            both, "pull_request", payload_bytes("pull_request.opened.json"), secret=None
        )

    assert response.status_code == 401


def test_healthz_and_methods(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/webhook").status_code == 405


def test_resolve_secret_prefers_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.blocks.system import Secret
    from pydantic import SecretStr

    def load(name: str) -> Secret[str]:
        assert name == "github-webhook-secret"
        return Secret(value=SecretStr("from-the-block"))

    monkeypatch.setattr(Secret, "load", staticmethod(load))

    assert resolve_secret({"GITHUB_WEBHOOK_SECRET": "from-env"}, "github-webhook-secret") == (
        "from-env"
    )
    assert resolve_secret({}, "github-webhook-secret") == "from-the-block"
    assert resolve_secret({"GITHUB_WEBHOOK_SECRET": ""}, None) is None
    assert resolve_secret({}) is None


# -- logs ------------------------------------------------------------------------------------


def test_one_log_line_per_delivery_and_never_the_secret(
    client: TestClient, prefect: FakePrefectEvents, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    opened = payload_bytes("pull_request.opened.json")
    delivery = "72d3162e-cc78-11e3-81ab-4c9367dc0958"

    deliver(client, "pull_request", opened, delivery=delivery)
    deliver(client, "pull_request", opened, secret="wrong")
    deliver(client, "ping", payload_bytes("ping.json"))
    deliver(client, "push", payload_bytes("push.json"))
    deliver(client, "pull_request", b"{")
    prefect.fail_with = 503
    deliver(client, "pull_request", payload_bytes("pull_request.reopened.json"))

    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME]
    assert len(lines) == 6
    assert lines[0].startswith(
        f"delivery={delivery} event=pull_request action=opened "
        "pr=Codertocat/Hello-World#2 outcome=emitted status=200"
    )
    assert [line.split(" outcome=")[1].split()[0] for line in lines] == [
        "emitted",
        "bad-signature",
        "pong",
        "ignored",
        "malformed",
        "emit-failed",
    ]
    everything = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert SECRET not in everything


# -- what the receiver refuses at the edge, and how it reaches Prefect --------------------------


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("head", "sha"), "main; rm -rf /"),
        (("head", "sha"), "abcdef1\n"),
        (("base", "repo", "full_name"), "../.."),
        (("number",), 0),
    ],
)
def test_a_signed_delivery_the_flows_would_refuse_gets_400_and_no_event(
    client: TestClient, prefect: FakePrefectEvents, where: tuple[str, ...], value: object
) -> None:
    payload = json.loads(payload_bytes("pull_request.opened.json"))
    target = payload["pull_request"]
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value

    response = deliver(client, "pull_request", json.dumps(payload).encode())

    assert response.status_code == 400
    assert prefect.posts == []


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PREFECT_API_KEY": "pnu_cloudkey"}, "Bearer pnu_cloudkey"),
        ({"PREFECT_API_AUTH_STRING": "admin:pass"}, "Basic YWRtaW46cGFzcw=="),
        ({}, None),
    ],
)
def test_events_reach_prefect_with_the_credentials_prefects_client_would_send(
    prefect: FakePrefectEvents, env: dict[str, str], expected: str | None
) -> None:
    app = create_app(SECRET, prefect_api_url=PREFECT_API, http_transport=prefect.transport, env=env)
    with TestClient(app) as client:
        response = deliver(client, "pull_request", payload_bytes("pull_request.opened.json"))

    assert response.status_code == 200
    assert prefect.authorizations == [expected]


def test_the_default_body_cap_is_one_mebibyte(prefect: FakePrefectEvents) -> None:
    app = create_app(SECRET, prefect_api_url=PREFECT_API, http_transport=prefect.transport)
    padded = json.loads(payload_bytes("pull_request.opened.json"))
    padded["pull_request"]["body"] = "x" * (1024 * 1024)
    with TestClient(app) as client:
        response = deliver(client, "pull_request", json.dumps(padded).encode())
    assert response.status_code == 413
    assert prefect.posts == []


# -- the spool: nothing lost while Prefect is down ----------------------------------------------


def opened(number: int) -> bytes:
    payload = json.loads(payload_bytes("pull_request.opened.json"))
    payload["pull_request"]["number"] = payload["number"] = number
    return json.dumps(payload).encode()


def test_deliveries_wait_in_the_spool_and_reach_prefect_in_order_once(
    prefect: FakePrefectEvents, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.sqlite3"
    app = create_app(
        SECRET,
        prefect_api_url=PREFECT_API,
        http_transport=prefect.transport,
        spool_path=spool,
        retry_seconds=3600,  # this test drains by delivering, not by the timer
    )
    prefect.fail_with = 503
    ids = [str(uuid.uuid4()) for _ in range(3)]
    with TestClient(app) as client:
        answers = [
            deliver(client, "pull_request", opened(n), delivery=d)
            for n, d in zip((1, 2, 3), ids, strict=True)
        ]
        again = deliver(client, "pull_request", opened(2), delivery=ids[1])  # a redelivery
        assert [a.status_code for a in answers] == [202, 202, 202] and again.status_code == 202
        assert again.json()["outcome"] == "duplicate" and again.json()["id"] == ids[1]
        assert "still waits for Prefect" in again.json()["detail"]
        assert {a.json()["outcome"] for a in answers} == {"spooled"}
        assert prefect.posted == []

        prefect.fail_with = None
        fourth = deliver(client, "pull_request", opened(4))

    assert fourth.status_code == 200 and fourth.json()["outcome"] == "emitted"
    numbers = [event["payload"]["pr_number"] for event in prefect.posted]
    assert numbers == [1, 2, 3, 4]  # arrival order, the redelivery kept once
    assert [event["id"] for event in prefect.posted[:3]] == ids


def test_the_spool_survives_a_restart_and_drains_when_prefect_answers(
    prefect: FakePrefectEvents, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.sqlite3"

    def app() -> Any:
        return create_app(
            SECRET,
            prefect_api_url=PREFECT_API,
            http_transport=prefect.transport,
            spool_path=spool,
            retry_seconds=0.05,
        )

    prefect.fail_with = 503
    with TestClient(app()) as client:
        assert deliver(client, "pull_request", opened(7)).status_code == 202
    assert prefect.posted == [] and oct(spool.stat().st_mode & 0o777) == "0o600"

    prefect.fail_with = None
    with TestClient(app()):  # a new receiver process on the same spool
        deadline = time.monotonic() + 5
        while not prefect.posted and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [event["payload"]["pr_number"] for event in prefect.posted] == [7]


def test_without_a_spool_a_prefect_outage_is_a_502(prefect: FakePrefectEvents) -> None:
    app = create_app(SECRET, prefect_api_url=PREFECT_API, http_transport=prefect.transport)
    prefect.fail_with = 503
    with TestClient(app) as client:
        assert deliver(client, "pull_request", opened(8)).status_code == 502


@dataclass
class Trickle:
    """One slow client: what it sends at once, then one byte of ``drip`` every ``every`` s."""

    opening: bytes
    drip: bytes
    every: float = 0.5
    held: float = -1.0  # seconds until the server closed the connection; -1: it never did
    answer: bytes = b""

    def run(self, address: tuple[str, int], give_up_after: float) -> None:
        started = time.monotonic()
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(self.opening)
            for byte in itertools.cycle(self.drip):
                if time.monotonic() - started > give_up_after:
                    return
                try:
                    if select.select([sock], [], [], self.every)[0]:
                        data = sock.recv(4096)
                        if not data:
                            break
                        self.answer += data
                        continue
                    sock.sendall(bytes([byte]))
                except OSError:  # reset or broken pipe: the server hung up
                    break
        self.held = time.monotonic() - started


@pytest.mark.server  # real uvicorn and ~10 s of real time
def test_slow_clients_are_cut_off_while_a_good_delivery_answers_at_once(
    prefect: FakePrefectEvents,
) -> None:
    """Against real uvicorn with the receiver's own settings: twenty clients trickle their
    headers and twenty their body, a byte every half second, all at once."""
    app = create_app(SECRET, prefect_api_url=PREFECT_API, http_transport=prefect.transport)
    body = payload_bytes("pull_request.opened.json")
    headers_then = b"POST /webhook HTTP/1.1\r\nHost: receiver\r\nX-GitHub-Event: pull_request\r\n"
    slow_headers = [Trickle(headers_then, b"X-Slow: " + b"a" * 64) for _ in range(20)]
    slow_bodies = [
        Trickle(
            headers_then + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10],
            body[10:],
        )
        for _ in range(20)
    ]
    with serve_asgi(app, **server_options()) as url:
        host, port = url.removeprefix("http://").split(":")
        threads = [
            threading.Thread(target=slow.run, args=((host, int(port)), 20.0))
            for slow in slow_headers + slow_bodies
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # let them all connect and start trickling (not a correctness wait)
        started = time.monotonic()
        good = httpx.post(
            f"{url}/webhook",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-GitHub-Event": "pull_request",
                "X-GitHub-Delivery": str(uuid.uuid4()),
                "X-Hub-Signature-256": signature_header(SECRET, body),
            },
            timeout=10,
        )
        good_took = time.monotonic() - started
        for thread in threads:
            thread.join(timeout=25)

    assert good.status_code == 200 and good_took < 1.0, good_took
    assert [event["event"] for event in prefect.posted] == ["github.pull_request.opened"]
    held = [slow.held for slow in slow_headers + slow_bodies]
    assert all(0 < seconds < 15 for seconds in held), held
    assert all(s.answer.startswith(b"HTTP/1.1 408 ") for s in slow_headers + slow_bodies)
    assert all(b"headers did not arrive within 5 s" in s.answer for s in slow_headers)
    assert all(b"the body did not arrive within 10 s" in s.answer for s in slow_bodies)


def test_requests_past_the_connection_limit_are_refused_at_once(
    prefect: FakePrefectEvents,
) -> None:
    app = create_app(SECRET, prefect_api_url=PREFECT_API, http_transport=prefect.transport)
    with serve_asgi(app, **server_options(max_connections=4)) as url:
        held = [httpx.Client(base_url=url, timeout=5) for _ in range(3)]
        try:
            # each answered, then kept alive: the server counts three open connections
            assert [client.get("/healthz").status_code for client in held] == [200] * 3
            started = time.monotonic()
            refused = httpx.get(f"{url}/healthz", timeout=5)
            refused_took = time.monotonic() - started
        finally:
            for client in held:
                client.close()
        deadline = time.monotonic() + 5
        while (after := httpx.get(f"{url}/healthz", timeout=5)).status_code != 200:
            assert time.monotonic() < deadline, "the limit was not released"

    assert refused.status_code == 503 and refused.headers["connection"] == "close"
    assert refused_took < 1.0
    assert after.json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"header_timeout_seconds": 0}, "header_timeout_seconds"),
        ({"max_connections": 1}, "max_connections"),
    ],
)
def test_server_options_refuse_settings_that_cannot_work(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        server_options(**options)


# -- the spool's neighbours: its files, its age ---------------------------------------------------


def test_the_spool_and_its_wal_files_are_private_from_the_start(tmp_path: Path) -> None:
    """SQLite gives -wal and -shm the mode of the database file when it creates them."""
    path = tmp_path / "state" / "pr-preview" / "spool.sqlite3"
    previous = os.umask(0o022)
    try:
        spool = Spool(path)
        spool.admit({"id": str(uuid.uuid4()), "event": "x"}, "0" * 64)
        modes = {
            p.name: oct(p.stat().st_mode & 0o777)
            for p in (path.parent, path, *(path.with_name(path.name + s) for s in ("-wal", "-shm")))
        }
        spool.close()
    finally:
        os.umask(previous)

    assert modes == {
        "pr-preview": "0o700",
        "spool.sqlite3": "0o600",
        "spool.sqlite3-wal": "0o600",
        "spool.sqlite3-shm": "0o600",
    }


def test_posted_deliveries_are_pruned_and_pending_ones_kept(tmp_path: Path) -> None:
    clock = Clock()
    spool = Spool(tmp_path / "spool.sqlite3", keep=timedelta(days=7), clock=clock)
    old = spool.admit({"id": str(uuid.uuid4())}, "a" * 64)
    spool.mark_posted(old.seq)
    waiting = spool.admit({"id": str(uuid.uuid4())}, "b" * 64)
    clock.advance(timedelta(days=7, seconds=1).total_seconds())
    recent = spool.admit({"id": str(uuid.uuid4())}, "c" * 64)
    spool.mark_posted(recent.seq)

    assert spool.prune() == 1
    assert spool.count() == 2
    assert [item.seq for item in spool.pending()] == [waiting.seq]
    assert spool.posted(str(recent.event["id"])) and not spool.posted(str(old.event["id"]))
    spool.close()


def test_the_receiver_prunes_its_spool_as_it_runs(
    prefect: FakePrefectEvents, tmp_path: Path
) -> None:
    clock = Clock()
    path = tmp_path / "spool.sqlite3"
    app = create_app(
        SECRET,
        prefect_api_url=PREFECT_API,
        http_transport=prefect.transport,
        spool_path=path,
        retry_seconds=0.05,
        clock=clock,
    )
    with TestClient(app) as client:
        assert deliver(client, "pull_request", opened(1)).status_code == 200
        clock.advance(timedelta(days=8).total_seconds())
        deadline = time.monotonic() + 5
        while _rows(path) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _rows(path) == 0


def test_a_spool_written_before_bodies_were_recorded_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    with closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TABLE deliveries (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT"
            " NULL UNIQUE, event TEXT NOT NULL, accepted_at TEXT NOT NULL, posted_at TEXT)"
        )
        db.execute(
            "INSERT INTO deliveries (event_id, event, accepted_at)"
            " VALUES ('e1', '{\"id\": \"e1\"}', '2026-01-01T00:00:00+00:00')"
        )
        db.commit()

    spool = Spool(path)
    fresh = spool.admit({"id": "e2"}, "d" * 64)

    assert [item.event["id"] for item in spool.pending()] == ["e1", "e2"]
    assert fresh.outcome == "new"
    spool.close()


def _rows(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT count(*) FROM deliveries").fetchone()[0])
