"""One mapping, both paths: GitHub's documented deliveries → the Prefect event the triggers want.

`event_from_delivery` (self-hosted receiver) and the Prefect Cloud webhook template must give
the same event name, resource, related resources and payload for every documented payload.
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from deployments.events import (
    HANDLED_ACTIONS,
    ROUTES,
    MalformedDelivery,
    event_from_delivery,
    event_id,
)

PAYLOADS = Path(__file__).parent / "data" / "github-payloads"
TEMPLATE = Path(__file__).parents[1] / "deployments" / "prefect-webhook-template.json.j2"
DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
FORM = "application/x-www-form-urlencoded"
HANDLED_NAMES = {f"github.pull_request.{action}" for action in HANDLED_ACTIONS}


def load(file_name: str) -> tuple[str, dict[str, Any]]:
    """(X-GitHub-Event, body) of a documented delivery: the event is the name before the dot."""
    return file_name.split(".")[0], json.loads((PAYLOADS / file_name).read_text())


def all_payload_files() -> list[str]:
    return sorted(p.name for p in PAYLOADS.glob("*.json"))


def variant(file_name: str, edit: Any) -> tuple[str, dict[str, Any]]:
    event, body = load(file_name)
    body = copy.deepcopy(body)
    edit(body)
    return event, body


def merged(body: dict[str, Any]) -> None:
    body["pull_request"].update(merged=True, merged_at="2019-05-15T15:21:18Z")


def fork_head(body: dict[str, Any]) -> None:
    body["pull_request"]["head"]["repo"]["full_name"] = "forker/Hello-World"
    body["pull_request"]["head"]["repo"]["fork"] = True


def deleted_fork(body: dict[str, Any]) -> None:
    body["pull_request"]["head"]["repo"] = None


def no_sender(body: dict[str, Any]) -> None:
    del body["sender"]


def quoted_title(body: dict[str, Any]) -> None:
    body["pull_request"]["title"] = "Fix \"quotes\", <tags> & {{ braces }}\n'end'"


def converted_to_draft(body: dict[str, Any]) -> None:
    body["action"] = "converted_to_draft"
    body["pull_request"]["draft"] = True


def ready_for_review(body: dict[str, Any]) -> None:
    body["action"] = "ready_for_review"
    body["pull_request"]["draft"] = False


def opened_as_draft(body: dict[str, Any]) -> None:
    body["pull_request"]["draft"] = True


def unlabeled_preview(body: dict[str, Any]) -> None:
    body["action"] = "unlabeled"
    body["label"] = {"name": "preview", "color": "0e8a16"}


def odd_labels(body: dict[str, Any]) -> None:
    body["pull_request"]["labels"] = [{"name": "preview"}, "not-a-label", {"name": 7}, {}]


def on_pull(body_text: str, **user: Any) -> Any:
    """A new comment ``body_text`` on a pull request (GitHub marks its issue ``pull_request``)."""

    def edit(body: dict[str, Any]) -> None:
        body["issue"]["pull_request"] = {
            "url": "https://api.github.com/repos/Codertocat/Hello-World/pulls/1"
        }
        body["comment"]["body"] = body_text
        body["comment"]["user"].update(user)

    return edit


COMMENT = "issue_comment.created.json"
VARIANTS = {
    "command-extend": (COMMENT, on_pull("/preview extend 8h\r\nfor the demo, please")),
    "command-status-padded": (COMMENT, on_pull("  /preview  \n")),
    "command-unknown": (COMMENT, on_pull("/preview launch-the-missiles; rm -rf /")),
    "command-too-long": (COMMENT, on_pull("/preview stop" + " " * 300 + "x")),
    "command-by-a-bot": (COMMENT, on_pull("/preview destroy", type="Bot")),
    "command-by-our-app": (COMMENT, on_pull("/preview", login="pr-preview[bot]")),
    "comment-not-a-command": (COMMENT, on_pull("looks good; /preview later")),
    "comment-prefix-only": (COMMENT, on_pull("/previewing soon")),
    "command-on-an-issue": (COMMENT, lambda b: b["comment"].update(body="/preview")),
    "unlabeled-preview": ("pull_request.labeled.json", unlabeled_preview),
    "converted-to-draft": ("pull_request.synchronize.json", converted_to_draft),
    "ready-for-review": ("pull_request.synchronize.json", ready_for_review),
    "opened-as-draft": ("pull_request.opened.json", opened_as_draft),
    "synchronize-odd-labels": ("pull_request.synchronize.json", odd_labels),
    "closed-merged": ("pull_request.closed.json", merged),
    "opened-fork": ("pull_request.opened.json", fork_head),
    "synchronize-deleted-fork": ("pull_request.synchronize.json", deleted_fork),
    "reopened-no-sender": ("pull_request.reopened.json", no_sender),
    "opened-quoted-title": ("pull_request.opened.json", quoted_title),
}


def every_delivery() -> list[Any]:
    cases = [pytest.param(*load(name), id=name) for name in all_payload_files()]
    cases += [pytest.param(*variant(*spec), id=key) for key, spec in VARIANTS.items()]
    return cases


# -- the Python mapping ----------------------------------------------------------------------


def test_routing_table_covers_exactly_the_handled_pull_request_actions() -> None:
    assert dict(ROUTES) == {
        ("pull_request", "closed"): "github.pull_request.closed",
        ("pull_request", "converted_to_draft"): "github.pull_request.converted_to_draft",
        ("pull_request", "labeled"): "github.pull_request.labeled",
        ("pull_request", "ready_for_review"): "github.pull_request.ready_for_review",
        ("pull_request", "opened"): "github.pull_request.opened",
        ("pull_request", "reopened"): "github.pull_request.reopened",
        ("pull_request", "synchronize"): "github.pull_request.synchronize",
        ("pull_request", "unlabeled"): "github.pull_request.unlabeled",
        ("issue_comment", "created"): "github.issue_comment.command",
    }


def test_a_command_on_a_pull_request_maps_to_its_first_line_and_author() -> None:
    event = event_from_delivery(*_with_delivery(variant(*VARIANTS["command-extend"])))

    assert event == {
        "id": DELIVERY,
        "occurred": "2019-05-15T15:20:21+00:00",
        "event": "github.issue_comment.command",
        "resource": {
            "prefect.resource.id": "github.pr.Codertocat/Hello-World/1",
            "prefect.resource.name": "Codertocat/Hello-World#1",
        },
        "related": [
            {
                "prefect.resource.id": "github.repo.Codertocat/Hello-World",
                "prefect.resource.role": "repository",
                "prefect.resource.name": "Codertocat/Hello-World",
            },
            {
                "prefect.resource.id": "github.user.Codertocat",
                "prefect.resource.role": "sender",
                "prefect.resource.name": "Codertocat",
            },
        ],
        "payload": {
            "repo": "Codertocat/Hello-World",
            "pr_number": 1,
            "comment_id": 492700400,
            "commenter": "Codertocat",
            "command": "/preview extend 8h",
        },
    }


@pytest.mark.parametrize(
    "key",
    [
        "command-by-a-bot",
        "command-by-our-app",
        "comment-not-a-command",
        "comment-prefix-only",
        "command-on-an-issue",
    ],
)
def test_comments_that_are_no_command_of_a_person_on_a_pull_request_make_no_event(
    key: str,
) -> None:
    assert event_from_delivery(*_with_delivery(variant(*VARIANTS[key]))) is None


def test_a_long_command_line_is_cut_and_marked_so_that_it_parses_as_nothing() -> None:
    event = event_from_delivery(*_with_delivery(variant(*VARIANTS["command-too-long"])))

    assert event is not None
    command = event["payload"]["command"]
    assert len(command) == 201 and command.endswith("…") and command.startswith("/preview stop")


def test_opened_maps_to_the_full_event() -> None:
    assert event_from_delivery(*_with_delivery(load("pull_request.opened.json"))) == {
        "id": DELIVERY,
        "occurred": "2019-05-15T15:20:33+00:00",
        "event": "github.pull_request.opened",
        "resource": {
            "prefect.resource.id": "github.pr.Codertocat/Hello-World/2",
            "prefect.resource.name": "Codertocat/Hello-World#2",
        },
        "related": [
            {
                "prefect.resource.id": "github.repo.Codertocat/Hello-World",
                "prefect.resource.role": "repository",
                "prefect.resource.name": "Codertocat/Hello-World",
            },
            {
                "prefect.resource.id": "github.user.Codertocat",
                "prefect.resource.role": "sender",
                "prefect.resource.name": "Codertocat",
            },
        ],
        "payload": {
            "repo": "Codertocat/Hello-World",
            "pr_number": 2,
            "head_sha": "ec26c3e57ca3a959ca5aad62de7213c562f8c821",
            "action": "opened",
            "merged": False,
            "head_repo": "Codertocat/Hello-World",
            "fork": False,
            "sender": "Codertocat",
            "title": "Update the README with new information.",
            "label": None,
            "labels": ["bug"],
            "branch": "changes",
            "draft": False,
        },
    }


@pytest.mark.parametrize(
    ("key", "event", "draft"),
    [
        ("converted-to-draft", "github.pull_request.converted_to_draft", True),
        ("ready-for-review", "github.pull_request.ready_for_review", False),
        ("opened-as-draft", "github.pull_request.opened", True),
    ],
)
def test_draft_events_carry_the_prs_draft_flag(key: str, event: str, draft: bool) -> None:
    found = event_from_delivery(*_with_delivery(variant(*VARIANTS[key])))

    assert found is not None
    assert (found["event"], found["payload"]["draft"]) == (event, draft)


def test_label_events_carry_the_label_and_the_prs_labels() -> None:
    labeled = event_from_delivery(*_with_delivery(load("pull_request.labeled.json")))
    unlabeled = event_from_delivery(
        *_with_delivery(variant("pull_request.labeled.json", unlabeled_preview))
    )
    odd = event_from_delivery(*_with_delivery(variant("pull_request.synchronize.json", odd_labels)))

    assert labeled is not None and unlabeled is not None and odd is not None
    assert labeled["event"] == "github.pull_request.labeled"
    assert (labeled["payload"]["label"], labeled["payload"]["labels"]) == ("bug", ["bug"])
    assert unlabeled["event"] == "github.pull_request.unlabeled"
    assert unlabeled["payload"]["label"] == "preview"
    assert (odd["payload"]["label"], odd["payload"]["labels"]) == (None, ["preview"])


@pytest.mark.parametrize(
    ("file_name", "action"),
    [
        ("pull_request.opened.json", "opened"),
        ("pull_request.opened.with-null-body.json", "opened"),
        ("pull_request.opened.with-organization.json", "opened"),
        ("pull_request.synchronize.json", "synchronize"),
        ("pull_request.reopened.json", "reopened"),
        ("pull_request.closed.json", "closed"),
        ("pull_request.closed.with-organization.json", "closed"),
    ],
)
def test_documented_pull_request_deliveries_map_to_their_action(
    file_name: str, action: str
) -> None:
    event = event_from_delivery(*_with_delivery(load(file_name)))

    assert event is not None
    assert event["event"] == f"github.pull_request.{action}"
    assert event["resource"]["prefect.resource.id"] == "github.pr.Codertocat/Hello-World/2"
    payload = event["payload"]
    assert payload["action"] == action
    assert payload["pr_number"] == 2 and isinstance(payload["pr_number"], int)
    assert payload["head_sha"] == "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
    assert payload["fork"] is False


def test_closed_unmerged_and_merged() -> None:
    unmerged = event_from_delivery(*_with_delivery(load("pull_request.closed.json")))
    was_merged = event_from_delivery(*_with_delivery(variant("pull_request.closed.json", merged)))

    assert unmerged is not None and was_merged is not None
    assert unmerged["payload"]["merged"] is False
    assert was_merged["payload"]["merged"] is True
    assert unmerged["event"] == was_merged["event"] == "github.pull_request.closed"


def test_a_fork_head_is_marked() -> None:
    event = event_from_delivery(*_with_delivery(variant("pull_request.opened.json", fork_head)))

    assert event is not None
    assert event["payload"]["fork"] is True
    assert event["payload"]["head_repo"] == "forker/Hello-World"
    assert event["payload"]["repo"] == "Codertocat/Hello-World"
    assert event["resource"]["prefect.resource.id"] == "github.pr.Codertocat/Hello-World/2"


def test_a_deleted_fork_has_no_head_repo_and_counts_as_a_fork() -> None:
    event = event_from_delivery(
        *_with_delivery(variant("pull_request.synchronize.json", deleted_fork))
    )

    assert event is not None
    assert event["payload"]["head_repo"] is None
    assert event["payload"]["fork"] is True


def test_null_pr_body_is_fine() -> None:
    event = event_from_delivery(*_with_delivery(load("pull_request.opened.with-null-body.json")))

    assert event is not None
    assert event["payload"]["title"] == "Update the README with new information."


@pytest.mark.parametrize("file_name", ["ping.json", "push.json"], ids=str)
def test_unhandled_deliveries_make_no_event(file_name: str) -> None:
    assert event_from_delivery(*_with_delivery(load(file_name))) is None


def test_an_unknown_event_with_a_handled_action_makes_no_event() -> None:
    _, body = load("pull_request.opened.json")
    assert event_from_delivery("pull_request_review", DELIVERY, body) is None


def _drop_pr(body: dict[str, Any]) -> None:
    del body["pull_request"]


def _drop_number(body: dict[str, Any]) -> None:
    del body["pull_request"]["number"]


def _string_number(body: dict[str, Any]) -> None:
    body["pull_request"]["number"] = "2"


def _bool_number(body: dict[str, Any]) -> None:
    body["pull_request"]["number"] = True


def _drop_sha(body: dict[str, Any]) -> None:
    del body["pull_request"]["head"]["sha"]


def _empty_sha(body: dict[str, Any]) -> None:
    body["pull_request"]["head"]["sha"] = ""


def _null_base_repo(body: dict[str, Any]) -> None:
    body["pull_request"]["base"]["repo"] = None


def _drop_base_name(body: dict[str, Any]) -> None:
    del body["pull_request"]["base"]["repo"]["full_name"]


def _head_not_object(body: dict[str, Any]) -> None:
    body["pull_request"]["head"] = "main"


def _bad_login(body: dict[str, Any]) -> None:
    on_pull("/preview")(body)
    body["comment"]["user"]["login"] = "../../admin"


def _string_issue_number(body: dict[str, Any]) -> None:
    on_pull("/preview stop")(body)
    body["issue"]["number"] = "1"


def _no_comment_id(body: dict[str, Any]) -> None:
    on_pull("/preview stop")(body)
    del body["comment"]["id"]


def _odd_repository(body: dict[str, Any]) -> None:
    on_pull("/preview stop")(body)
    body["repository"]["full_name"] = "a/b/c"


MALFORMED_COMMANDS = [_bad_login, _string_issue_number, _no_comment_id, _odd_repository]


@pytest.mark.parametrize("edit", MALFORMED_COMMANDS, ids=lambda f: f.__name__.strip("_"))
def test_a_command_missing_a_field_is_malformed_on_both_paths(edit: Any) -> None:
    event_name, body = variant(COMMENT, edit)
    with pytest.raises(MalformedDelivery):
        event_from_delivery(event_name, DELIVERY, body)
    rendered = render_template(event_name, body)
    assert rendered["event"] == "github.issue_comment.malformed"
    assert "payload" not in rendered


MALFORMED = [
    _drop_pr,
    _drop_number,
    _string_number,
    _bool_number,
    _drop_sha,
    _empty_sha,
    _null_base_repo,
    _drop_base_name,
    _head_not_object,
]


@pytest.mark.parametrize("edit", MALFORMED, ids=lambda f: f.__name__.strip("_"))
def test_a_handled_delivery_missing_a_field_is_malformed(edit: Any) -> None:
    event, body = variant("pull_request.opened.json", edit)
    with pytest.raises(MalformedDelivery):
        event_from_delivery(event, DELIVERY, body)


def test_a_payload_that_is_not_an_object_is_malformed() -> None:
    with pytest.raises(MalformedDelivery):
        event_from_delivery("pull_request", DELIVERY, [])  # type: ignore[arg-type]


def test_the_delivery_guid_is_the_event_id() -> None:
    assert event_id(DELIVERY) == DELIVERY
    assert event_id(DELIVERY.upper()) == DELIVERY


def test_a_delivery_id_that_is_not_a_uuid_gets_a_stable_uuid() -> None:
    derived = event_id("delivery-42")

    assert uuid.UUID(derived).version == 5
    assert event_id("delivery-42") == derived
    assert event_id("delivery-43") != derived


def test_a_missing_delivery_id_is_malformed() -> None:
    _, body = load("pull_request.opened.json")
    with pytest.raises(MalformedDelivery):
        event_from_delivery("pull_request", "", body)


def test_occurred_is_now_when_github_gives_no_updated_at() -> None:
    event, body = variant("pull_request.opened.json", lambda b: b["pull_request"].pop("updated_at"))
    mapped = event_from_delivery(event, DELIVERY, body)

    assert mapped is not None
    age = datetime.now(UTC) - datetime.fromisoformat(mapped["occurred"])
    assert timedelta(0) <= age < timedelta(seconds=5)


@pytest.mark.parametrize(("event_name", "body"), every_delivery())
def test_every_event_is_one_the_prefect_events_api_accepts(
    event_name: str, body: dict[str, Any]
) -> None:
    from prefect.server.events.schemas.events import Event

    mapped = event_from_delivery(event_name, DELIVERY, body)
    if mapped is not None:
        Event.model_validate(mapped)


# -- the Prefect Cloud webhook template ------------------------------------------------------


def render_template(
    event_name: str,
    body: Any,
    delivery: str = DELIVERY,
    content_type: str = "application/json",
) -> dict[str, Any]:
    """Render the template as Prefect does user templates (sandboxed Jinja, chainable
    undefined) with Cloud's context: method, case-insensitive headers and the parsed body."""
    from prefect.server.utilities.user_templates import render_user_template_sync

    headers = httpx.Headers(
        {
            "Content-Type": content_type,
            "X-GitHub-Event": event_name,
            "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": "sha256=not-checked-by-cloud",
        }
    )
    rendered = render_user_template_sync(
        TEMPLATE.read_text(), {"method": "POST", "headers": headers, "body": body}
    )
    return json.loads(rendered)


def test_the_template_passes_prefects_template_validation() -> None:
    from prefect.server.utilities.user_templates import validate_user_template

    validate_user_template(TEMPLATE.read_text())


@pytest.mark.parametrize(("event_name", "body"), every_delivery())
def test_the_cloud_template_makes_the_same_event_as_the_receiver(
    event_name: str, body: dict[str, Any]
) -> None:
    from prefect.events import Event

    rendered = render_template(event_name, body)
    mapped = event_from_delivery(event_name, DELIVERY, body)

    Event.model_validate(rendered)  # Cloud fills in what the template leaves out
    if mapped is None:
        assert rendered["event"].startswith("github.ignored.")
        assert not any(rendered["event"].startswith(name) for name in HANDLED_NAMES)
        return
    for key in ("event", "resource", "related", "payload"):
        assert rendered[key] == mapped[key], key
    assert "id" not in rendered  # Cloud gives each delivery, a redelivery too, a new id
    assert datetime.fromisoformat(rendered["occurred"]) == datetime.fromisoformat(
        mapped["occurred"]
    )


@pytest.mark.parametrize("edit", MALFORMED, ids=lambda f: f.__name__.strip("_"))
def test_the_cloud_template_flags_what_the_receiver_refuses(edit: Any) -> None:
    event_name, body = variant("pull_request.opened.json", edit)
    rendered = render_template(event_name, body)

    assert rendered["event"] == "github.pull_request.malformed"
    assert "payload" not in rendered  # Cloud then keeps its debugging payload: headers, body


def test_the_cloud_template_leaves_the_id_to_cloud_so_that_redeliver_emits_again() -> None:
    """Cloud drops an event id it has seen; GitHub's Redeliver repeats the delivery GUID."""
    for delivery in (DELIVERY, "delivery-42"):
        assert "id" not in render_template(*load("pull_request.opened.json"), delivery=delivery)


def test_the_cloud_template_copes_with_a_body_that_is_not_json() -> None:
    rendered = render_template("pull_request", "{not json")

    assert rendered["event"] == "github.delivery.malformed"


def _with_delivery(delivery: tuple[str, dict[str, Any]]) -> tuple[str, str, dict[str, Any]]:
    event_name, body = delivery
    return event_name, DELIVERY, body


# -- one corpus, both paths ------------------------------------------------------------------


def _set(path: str, value: object) -> Any:
    def edit(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = body
        for key in parents:
            target = target[key]
        target[last] = value

    return edit


SHA256_HEAD = "0123456789abcdef" * 4
EDGE_CASES: dict[str, tuple[str, Any, str]] = {
    # name: (documented delivery it edits, the edit, the outcome both paths must give)
    "sha256-head": (
        "pull_request.synchronize.json",
        _set("pull_request.head.sha", SHA256_HEAD),
        "emitted",
    ),
    "head-sha-HEAD": ("pull_request.opened.json", _set("pull_request.head.sha", "HEAD"), "refused"),
    "head-sha-63": ("pull_request.opened.json", _set("pull_request.head.sha", "a" * 63), "refused"),
    "head-sha-upper": (
        "pull_request.opened.json",
        _set("pull_request.head.sha", "A" * 40),
        "refused",
    ),
    "pr-number-0": ("pull_request.opened.json", _set("pull_request.number", 0), "refused"),
    "repo-x": (
        "pull_request.opened.json",
        _set("pull_request.base.repo.full_name", "x"),
        "refused",
    ),
    "repo-dotdot": (
        "pull_request.closed.json",
        _set("pull_request.base.repo.full_name", "../.."),
        "refused",
    ),
    "repo-three-parts": (
        "pull_request.opened.json",
        _set("pull_request.base.repo.full_name", "a/b/c"),
        "refused",
    ),
    "head-repo-x": (
        "pull_request.opened.json",
        _set("pull_request.head.repo.full_name", "x"),
        "refused",
    ),
    "edited": ("pull_request.opened.json", _set("action", "edited"), "ignored"),
}
CLOUD_DIFFERS = {"form-encoded": "form-encoded"}
"""Where Prefect Cloud's outcome differs from the receiver's (README, step 7): a template
cannot parse the JSON inside GitHub's form encoding, so Cloud flags it instead."""


def corpus() -> list[Any]:
    """Every documented delivery as JSON and form-encoded, and the edge cases, with the
    outcome the receiver gives: emitted, ignored or refused."""
    cases = []
    for name in all_payload_files():
        event_name, body = load(name)
        outcome = "emitted" if event_name == "pull_request" else "ignored"
        cases.append(pytest.param(event_name, body, "json", outcome, id=name))
        cases.append(pytest.param(event_name, body, "form-encoded", outcome, id=f"{name}-form"))
    for key, (name, edit, outcome) in EDGE_CASES.items():
        cases.append(pytest.param(*variant(name, edit), "json", outcome, id=key))
    return cases


def _receiver_outcome(event_name: str, body: dict[str, Any], encoding: str) -> tuple[str, Any]:
    import warnings

    from deployments.receiver import create_app, signature_header

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    emitted: list[dict[str, Any]] = []

    async def emit(event: dict[str, Any]) -> None:
        emitted.append(event)

    raw = json.dumps(body).encode()
    content_type = "application/json"
    if encoding == "form-encoded":
        raw, content_type = urlencode({"payload": raw.decode()}).encode(), FORM
    with TestClient(create_app("corpus-secret", emit)) as client:
        answer = client.post(
            "/webhook",
            content=raw,
            headers={
                "Content-Type": content_type,
                "X-GitHub-Event": event_name,
                "X-GitHub-Delivery": DELIVERY,
                "X-Hub-Signature-256": signature_header("corpus-secret", raw),
            },
        )
    outcome = answer.json()["outcome"]
    if answer.status_code == 400:
        return "refused", None
    assert answer.status_code in (200, 202), answer.text
    assert len(emitted) == (outcome == "emitted")
    return ("ignored" if outcome in ("ignored", "pong") else outcome), (
        emitted[0] if emitted else None
    )


def _cloud_outcome(event_name: str, body: dict[str, Any], encoding: str) -> tuple[str, Any]:
    context_body: Any = body
    if encoding == "form-encoded":  # Cloud parses a form into a flat mapping of its fields
        context_body = {"payload": json.dumps(body)}
    rendered = render_template(
        event_name,
        context_body,
        content_type=FORM if encoding == "form-encoded" else "application/json",
    )
    name = rendered["event"]
    if name in HANDLED_NAMES:
        return "emitted", rendered
    if name.startswith("github.ignored."):
        return "ignored", None
    if name in ("github.pull_request.malformed", "github.delivery.malformed"):
        assert "payload" not in rendered  # Cloud keeps its debugging payload
        return "refused", None
    if name == "github.delivery.form-encoded":
        return "form-encoded", None
    raise AssertionError(f"unexpected event {name}")


@pytest.mark.parametrize(("event_name", "body", "encoding", "expected"), corpus())
def test_the_receiver_and_the_cloud_template_give_one_table_of_outcomes(
    event_name: str, body: dict[str, Any], encoding: str, expected: str
) -> None:
    """GitHub's documented deliveries and the edges, replayed through the receiver (signed,
    over HTTP) and through the Cloud template (Prefect's own renderer)."""
    from prefect.events import Event

    by_receiver, posted = _receiver_outcome(event_name, body, encoding)
    by_cloud, rendered = _cloud_outcome(event_name, body, encoding)

    assert by_receiver == expected
    assert by_cloud == CLOUD_DIFFERS.get(encoding, expected)
    if posted is not None and rendered is not None:
        Event.model_validate(rendered)
        for key in ("event", "resource", "related", "payload"):
            assert rendered[key] == posted[key], key


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"X-GitHub-Delivery": DELIVERY}, "load"),
        ({"X-GitHub-Event": "pull_request", "X-GitHub-Delivery": DELIVERY}, "not json"),
        ({"X-GitHub-Event": "pull_request"}, "load"),
    ],
    ids=["no-event-header", "not-json", "no-delivery-id"],
)
def test_deliveries_the_receiver_refuses_are_flagged_by_the_cloud_template(
    headers: dict[str, str], body: str
) -> None:
    from prefect.server.utilities.user_templates import render_user_template_sync

    context_body: Any = load("pull_request.opened.json")[1] if body == "load" else body
    rendered = json.loads(
        render_user_template_sync(
            TEMPLATE.read_text(),
            {"method": "POST", "headers": httpx.Headers(headers), "body": context_body},
        )
    )

    assert rendered["event"] in ("github.delivery.malformed", "github.pull_request.malformed")
    assert "payload" not in rendered
