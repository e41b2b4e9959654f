"""The events pr-preview emits and the resources they name (docs/design.md, "events out").

``pr-preview.<name>`` about one instance (resource ``pr-preview.instance.<id>``), related to its
pull request (``github.pr.<owner>/<repo>/<number>``, the resource of the events coming in).
"""

from __future__ import annotations

from typing import Any

PR_ROLE = "pull-request"


def pr_resource(repo: str, pr_number: int) -> dict[str, str]:
    """The pull request as a Prefect resource: the id GitHub events arrive with."""
    return {
        "prefect.resource.id": f"github.pr.{repo}/{pr_number}",
        "prefect.resource.role": PR_ROLE,
        "prefect.resource.name": f"{repo}#{pr_number}",
    }


def instance_event(
    name: str,
    instance_id: str,
    repo: str | None = None,
    pr_number: int | None = None,
    **payload: Any,
) -> dict[str, Any]:
    """Keyword arguments of ``prefect.events.emit_event`` for ``pr-preview.<name>``."""
    related = []
    if repo and pr_number:
        related.append(pr_resource(repo, pr_number))
        payload = {"repo": repo, "pr_number": pr_number, **payload}
    return {
        "event": f"pr-preview.{name}",
        "resource": {
            "prefect.resource.id": f"pr-preview.instance.{instance_id}",
            "prefect.resource.name": instance_id,
        },
        "related": related,
        "payload": payload,
    }


def emit_instance_event(
    name: str, instance_id: str, repo: str, pr_number: int, **payload: Any
) -> None:
    """Emit ``pr-preview.<name>`` about one instance, related to its pull request."""
    from prefect.events import emit_event

    emit_event(**instance_event(name, instance_id, repo, pr_number, **payload))
