"""What both lifecycle flows share: input checks, the events they emit, the PR resource."""

from __future__ import annotations

import re
from typing import Any

from prefect.events import emit_event

REPO_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
SHA_PATTERN = re.compile(r"^[0-9a-f]{7,40}$")


def check_inputs(repo: str, pr_number: int, head_sha: str | None = None) -> None:
    """Refuse bad flow parameters before any AWS call, saying what was expected."""
    if not REPO_PATTERN.match(repo):
        raise ValueError(f"repo must be 'owner/name', got {repo!r}")
    if pr_number < 1:
        raise ValueError(f"pr_number must be a positive integer, got {pr_number}")
    if head_sha is not None and not SHA_PATTERN.match(head_sha):
        raise ValueError(f"head_sha must be 7-40 lowercase hex digits, got {head_sha!r}")


def pr_resource(repo: str, pr_number: int) -> dict[str, str]:
    return {
        "prefect.resource.id": f"github.pr.{repo}/{pr_number}",
        "prefect.resource.role": "pull-request",
        "prefect.resource.name": f"{repo}#{pr_number}",
    }


def emit_instance_event(
    name: str, instance_id: str, repo: str, pr_number: int, **payload: Any
) -> None:
    """``pr-preview.<name>`` about one instance, related to its pull request."""
    emit_event(
        event=f"pr-preview.{name}",
        resource={
            "prefect.resource.id": f"pr-preview.instance.{instance_id}",
            "prefect.resource.name": instance_id,
        },
        related=[pr_resource(repo, pr_number)],
        payload={"repo": repo, "pr_number": pr_number, **payload},
    )
