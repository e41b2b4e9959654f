"""The one mapping from a GitHub webhook delivery to the Prefect event our triggers listen for.

The self-hosted receiver calls `event_from_delivery`; the Prefect Cloud webhook template
(`prefect-webhook-template.json.j2`) renders the same event name, resource and payload, and
tests hold the two to each other on GitHub's documented payloads.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tasks.github.commands import command_line
from tasks.inputs import is_bot, is_login, is_repo, is_sha, label_names
from tasks.run.errors import PreviewError

HANDLED_ACTIONS = frozenset(
    {
        "opened",
        "reopened",
        "synchronize",
        "closed",
        "labeled",
        "unlabeled",
        "ready_for_review",
        "converted_to_draft",
    }
)
MAX_LABELS = 100  # GitHub allows 100 labels on an issue

COMMAND_EVENT = "github.issue_comment.command"
ROUTES: Mapping[tuple[str, str], str] = {
    **{
        ("pull_request", action): f"github.pull_request.{action}"
        for action in sorted(HANDLED_ACTIONS)
    },
    ("issue_comment", "created"): COMMAND_EVENT,
}
"""(X-GitHub-Event, payload action) → Prefect event name; anything else is not emitted. A new
comment is emitted only when it is a ``/preview`` command on a pull request by a person (not a
bot): every other comment is ignored."""

DELIVERY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/pr-preview/deliveries")
"""Namespace for event ids derived from delivery ids that are not UUIDs themselves."""


class MalformedDelivery(PreviewError):
    """A delivery we route but whose payload lacks a field the flows need (answer 400)."""


def route(event_name: str, action: str | None) -> str | None:
    """The Prefect event name for an (event, action) pair, or None when we do not handle it."""
    return ROUTES.get((event_name, action or ""))


def event_id(delivery_id: str) -> str:
    """The event id for a delivery: the GUID itself, so the server drops redeliveries.

    GitHub's delivery ids are UUIDs; anything else gets a stable uuid5 so that redeliveries of
    it still collapse into one event.
    """
    if not delivery_id:
        raise MalformedDelivery("missing X-GitHub-Delivery")
    try:
        return str(uuid.UUID(delivery_id))
    except ValueError:
        return str(uuid.uuid5(DELIVERY_NAMESPACE, delivery_id))


def event_from_delivery(
    event_name: str, delivery_id: str, payload: dict[str, Any]
) -> dict[str, Any] | None:
    """The Prefect event for one GitHub delivery, or None when the flows do not handle it.

    The payload is small and flat: exactly what the deployment triggers in prefect.yaml
    template into flow parameters. Raises MalformedDelivery when a routed delivery lacks a
    field the flows need.
    """
    if not isinstance(payload, dict):
        raise MalformedDelivery("payload is not a JSON object")
    action = payload.get("action")
    name = route(event_name, action if isinstance(action, str) else None)
    if name is None:
        return None
    if name == COMMAND_EVENT:
        return _command_event(delivery_id, payload)

    pr = _field(payload, "pull_request", dict)
    number = _field(pr, "number", int, "pull_request")
    head = _field(pr, "head", dict, "pull_request")
    head_sha = _field(head, "sha", str, "pull_request.head")
    base = _field(pr, "base", dict, "pull_request")
    repo = _field(_field(base, "repo", dict, "pull_request.base"), "full_name", str, "base.repo")
    head_repo = _optional_str(head.get("repo"), "full_name")  # None: the fork was deleted
    # What the flows would refuse anyway is refused here, before it becomes an event.
    if not is_repo(repo):
        raise MalformedDelivery(f"base.repo.full_name {repo[:100]!r} is not owner/name")
    if number < 1:
        raise MalformedDelivery(f"pull_request.number {number} is not a positive integer")
    if not is_sha(head_sha):
        raise MalformedDelivery("pull_request.head.sha is not 7-40 or 64 lowercase hex digits")
    if head_repo is not None and not is_repo(head_repo):
        raise MalformedDelivery("pull_request.head.repo.full_name is not owner/name")
    sender = _optional_str(payload.get("sender"), "login")
    title = pr.get("title") if isinstance(pr.get("title"), str) else None
    label = _optional_str(payload.get("label"), "name")  # labeled/unlabeled: the label's name

    related = [
        {
            "prefect.resource.id": f"github.repo.{repo}",
            "prefect.resource.role": "repository",
            "prefect.resource.name": repo,
        }
    ]
    if sender:
        related.append(
            {
                "prefect.resource.id": f"github.user.{sender}",
                "prefect.resource.role": "sender",
                "prefect.resource.name": sender,
            }
        )
    return {
        "id": event_id(delivery_id),
        "occurred": _occurred(pr.get("updated_at")),
        "event": name,
        "resource": {
            "prefect.resource.id": f"github.pr.{repo}/{number}",
            "prefect.resource.name": f"{repo}#{number}",
        },
        "related": related,
        "payload": {
            "repo": repo,
            "pr_number": number,
            "head_sha": head_sha,
            "action": action,
            "merged": pr.get("merged") is True,
            "head_repo": head_repo,
            "fork": head_repo != repo,
            "sender": sender,
            "title": title,
            "label": label,
            "labels": label_names(pr)[:MAX_LABELS],
            "branch": head.get("ref") if isinstance(head.get("ref"), str) else None,
            "draft": pr.get("draft") is True,
        },
    }


def _command_event(delivery_id: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    """A ``/preview`` comment on a pull request: the command's line, who wrote it, where.
    None for any other comment — on an issue, by a bot, or not a command."""
    issue = payload.get("issue")
    comment = payload.get("comment")
    if not isinstance(issue, dict) or not isinstance(comment, dict):
        raise MalformedDelivery("missing or invalid field issue or comment")
    if not isinstance(issue.get("pull_request"), dict):
        return None  # a comment on an issue
    body = comment.get("body")
    user: dict[str, Any] = comment["user"] if isinstance(comment.get("user"), dict) else {}
    login = user.get("login")
    if not isinstance(body, str) or (command := command_line(body)) is None:
        return None
    if user.get("type") == "Bot" or (isinstance(login, str) and is_bot(login)):
        return None  # our own App's comments, and every other bot's
    number = _field(issue, "number", int, "issue")
    comment_id = _field(comment, "id", int, "comment")
    repo = _field(_field(payload, "repository", dict), "full_name", str, "repository")
    if not is_repo(repo):
        raise MalformedDelivery(f"repository.full_name {repo[:100]!r} is not owner/name")
    if number < 1 or comment_id < 1:
        raise MalformedDelivery("issue.number and comment.id must be positive integers")
    if not isinstance(login, str) or not is_login(login):
        raise MalformedDelivery("comment.user.login is not a GitHub login")
    return {
        "id": event_id(delivery_id),
        "occurred": _occurred(comment.get("created_at")),
        "event": COMMAND_EVENT,
        "resource": {
            "prefect.resource.id": f"github.pr.{repo}/{number}",
            "prefect.resource.name": f"{repo}#{number}",
        },
        "related": [
            {
                "prefect.resource.id": f"github.repo.{repo}",
                "prefect.resource.role": "repository",
                "prefect.resource.name": repo,
            },
            {
                "prefect.resource.id": f"github.user.{login}",
                "prefect.resource.role": "sender",
                "prefect.resource.name": login,
            },
        ],
        "payload": {
            "repo": repo,
            "pr_number": number,
            "comment_id": comment_id,
            "commenter": login,
            "command": command,
        },
    }


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str = "") -> Any:
    value = obj.get(key)
    # bool is an int subclass: a PR number of `true` is as missing as no number at all.
    if not isinstance(value, kind) or isinstance(value, bool) or value in ("", None):
        raise MalformedDelivery(f"missing or invalid field {where + '.' if where else ''}{key}")
    return value


def _optional_str(obj: object, key: str) -> str | None:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, str) and value else None


def _occurred(updated_at: object) -> str:
    """When the PR last changed (stable across redeliveries), or now if GitHub did not say."""
    if isinstance(updated_at, str):
        try:
            return datetime.fromisoformat(updated_at.replace("Z", "+00:00")).isoformat()
        except ValueError:
            pass
    return datetime.now(UTC).isoformat()
