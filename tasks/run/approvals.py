"""Which commit of a fork's pull request a maintainer approved (``fork_previews: approve``).

One Prefect Variable per pull request holds the approved sha, who approved it and when. Only
the flows write it — after GitHub said the commenter may write to the repository, and only for
the sha the pull request's head is then — so nobody who can merely push to the fork can make
or widen an approval: it names one commit, and a push moves the head off it. A closed pull
request's approval is forgotten with its lock.

Variable names allow lowercase letters, digits, ``-`` and ``_`` only, so two repositories may
share a name (``a/b.c`` and ``a/b_c``); the value names its repository and pull request, and an
approval read for any other is no approval.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tasks.run.locks import api_call
from tasks.run.prefect_context import run_logger

logger = logging.getLogger(__name__)

PREFIX = "pr-preview-approval-"
TAGS = ["pr-preview", "fork-approval"]


def approval_name(repo: str, pr_number: int) -> str:
    """``pr-preview-approval-octo-org_app-42``: the Variable of one pull request."""
    return f"{PREFIX}{re.sub(r'[^a-z0-9-]', '_', repo.lower())}-{int(pr_number)}"


def record_approval(repo: str, pr_number: int, sha: str, by: str) -> None:
    """Approve ``sha`` (and only it) for the pull request, replacing an earlier approval;
    ``by`` is the GitHub login that approved."""
    name = approval_name(repo, pr_number)
    value: dict[str, Any] = {
        "repo": repo,
        "pr": pr_number,
        "sha": sha,
        "by": by,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        api_call(
            lambda client: client.create_variable(VariableCreate(name=name, value=value, tags=TAGS))
        )
    except ObjectAlreadyExists:
        api_call(lambda client: client.update_variable(VariableUpdate(name=name, value=value)))
    run_logger(logger).info("%s#%d: %s approved by @%s", repo, pr_number, sha, by)


def approved_sha(repo: str, pr_number: int) -> str | None:
    """The sha approved for the pull request, or None. A Variable that cannot be read or does
    not name this pull request approves nothing (logged): the preview then waits."""
    name = approval_name(repo, pr_number)
    try:
        found = api_call(lambda client: client.read_variable_by_name(name))
    except Exception as exc:
        run_logger(logger).warning("approval %s not read (%s): none is assumed", name, exc)
        return None
    value = found.value if found is not None else None
    if not isinstance(value, dict):
        return None
    same_pr = str(value.get("repo", "")).lower() == repo.lower() and value.get("pr") == pr_number
    sha = value.get("sha")
    if not same_pr or not isinstance(sha, str):
        run_logger(logger).warning("approval %s names another pull request: ignored", name)
        return None
    return sha


def forget_approval(repo: str, pr_number: int) -> bool:
    """Remove the pull request's approval (it closed); False when there was none."""
    name = approval_name(repo, pr_number)
    try:
        api_call(lambda client: client.delete_variable_by_name(name))
    except ObjectNotFound:
        return False
    return True
