"""What the pull request shows of a preview (runbook §2 step 7, §6.2): the one sticky comment,
rendered, masked, created once and edited, and the GitHub deployment of environment ``pr-<n>``.

The bot finds its own comment again through a hidden marker, so every state of a preview edits
the same comment. The report step posts it; the sweeper edits it and marks the deployment
inactive when a preview expires.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal

from tasks.app.cost import PreviewCost, format_usd
from tasks.app.masking import mask_secrets
from tasks.cloud.tags import format_time
from tasks.cloud.tunnel import tunnel_command
from tasks.github.client import DeploymentState, GitHub, GitHubError, deployment_environment

logger = logging.getLogger(__name__)

MAX_DIAGNOSIS_CHARS = 6000


class PreviewState(StrEnum):
    LAUNCHING = "launching"
    READY = "ready"
    UPDATED = "updated"
    FAILED = "failed"
    TORN_DOWN = "torn_down"
    EXPIRED = "expired"
    REFUSED = "refused"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    STOPPED = "stopped"
    SLEEPING = "sleeping"  # stopped by the schedule or for idleness; wakes on demand
    ABSENT = "absent"
    SKIPPED = "skipped"  # paths/paths_ignore: the changed files ask for no preview
    AWAITING_APPROVAL = "awaiting_approval"  # fork_previews approve: a fork's commit not approved


_HEADLINES = {
    PreviewState.LAUNCHING: "⏳ Preview launching",
    PreviewState.READY: "✅ Preview ready",
    PreviewState.UPDATED: "🔁 Preview updated in place",
    PreviewState.FAILED: "❌ Preview failed",
    PreviewState.TORN_DOWN: "🧹 Preview torn down",
    PreviewState.EXPIRED: "⌛ Preview expired",
    PreviewState.REFUSED: "🚫 Preview refused",
    PreviewState.CRASHED: "💥 Preview run crashed",
    PreviewState.CANCELLED: "⏹ Preview run cancelled",
    PreviewState.STOPPED: "⏸ Preview stopped",
    PreviewState.SLEEPING: "😴 Preview asleep",
    PreviewState.ABSENT: "💤 No preview running",
    PreviewState.SKIPPED: "⏭ No preview needed",
    PreviewState.AWAITING_APPROVAL: "✋ Preview awaiting approval",
}


def headline(state: PreviewState) -> str:
    """The comment's headline for ``state`` (the check run's title too)."""
    return _HEADLINES[PreviewState(state)]


@dataclass(frozen=True)
class CommentState:
    """Everything the comment shows at one moment of a preview's life."""

    state: PreviewState
    repo: str
    pr_number: int
    sha: str | None = None
    instance_id: str | None = None
    region: str | None = None
    expires_at: datetime | str | None = None
    app_port: int = 8000
    diagnosis: str | None = None
    flow_run_url: str | None = None
    detail: str | None = None
    cost: PreviewCost | None = None
    services: tuple[str, ...] = ()  # what the preview runs (compose services)
    variables: tuple[str, ...] = ()  # the names the app's environment gets, never values
    secrets_path: str | None = None  # env_parameter_path: its parameters' names are not read
    database: str | None = None  # database: per-preview — its name and size
    dns_name: str | None = None  # dns_zone_id: the preview's name inside the VPC
    pinned_by: str | None = None  # the keep label that pins it, while it is on


@dataclass(frozen=True)
class CommentResult:
    action: Literal["created", "updated", "skipped"]
    comment_id: int | None
    body: str


def marker(repo: str, pr_number: int) -> str:
    """The hidden line that identifies our comment on this PR."""
    return f"<!-- pr-preview:{repo}#{int(pr_number)} -->"


def flow_run_url(prefect_ui_url: str | None, flow_run_id: object | None) -> str | None:
    """The Prefect UI page of a flow run, when the UI URL is configured."""
    if not prefect_ui_url or not flow_run_id:
        return None
    return f"{prefect_ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _expires(value: datetime | str | None) -> str | None:
    if value is None:
        return None
    return format_time(value) if isinstance(value, datetime) else str(value)


def cost_line(cost: PreviewCost) -> str:
    """``Cost so far $0.03 · at expiry $0.65 (t3.small at $0.0272/h)``, or why it is unknown."""
    if cost.so_far is None:
        return f"Cost unknown ({cost.price_label})"
    line = f"Cost so far {format_usd(cost.so_far)}"
    if cost.at_expiry is not None:
        line += f" · at expiry {format_usd(cost.at_expiry)}"
    return f"{line} ({cost.price_label})"


def _app_lines(status: CommentState) -> list[str]:
    """What runs and which variables it gets: names only."""
    lines = []
    if status.services:
        lines.append("Services: " + ", ".join(f"`{name}`" for name in status.services))
    if status.variables:
        names = ", ".join(f"`{name}`" for name in status.variables)
        if status.secrets_path:
            names += f" and a secret per parameter under `{status.secrets_path}`"
        lines.append(f"Variables: {names}")
    if status.database:
        lines.append(f"Database: {status.database}")
    return [*lines, ""] if lines else []


def render_comment(status: CommentState, secrets: Iterable[str | None] = ()) -> str:
    """The Markdown body for ``status``, marker first, secrets masked."""
    state = PreviewState(status.state)
    lines = [marker(status.repo, status.pr_number), f"### {headline(state)}", ""]
    if status.detail:
        lines += [status.detail, ""]

    rows = []
    if status.sha:
        rows.append(("Commit", f"`{status.sha}`"))
    if status.instance_id:
        rows.append(("Instance", f"`{status.instance_id}`"))
    if status.region:
        rows.append(("Region", f"`{status.region}`"))
    gone = state in (PreviewState.TORN_DOWN, PreviewState.EXPIRED, PreviewState.ABSENT)
    if status.dns_name and not gone:
        rows.append(("Name", f"`{status.dns_name}` (inside the VPC)"))
    expires = _expires(status.expires_at)
    if status.pinned_by and not gone:
        rows.append(
            ("Expires at", f"never while the `{status.pinned_by}` label is on (pinned; {expires})")
        )
    elif expires and not gone:
        rows.append(("Expires at", f"{expires} (the instance terminates itself)"))
    if rows:
        lines += ["| | |", "| --- | --- |"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        lines.append("")
    if status.cost and state in (PreviewState.READY, PreviewState.UPDATED):
        lines += [cost_line(status.cost), ""]
    if state in (PreviewState.READY, PreviewState.UPDATED):
        lines += _app_lines(status)

    live = state in (PreviewState.READY, PreviewState.UPDATED, PreviewState.LAUNCHING)
    if live and status.instance_id and status.region:
        command = tunnel_command(status.instance_id, status.region, status.app_port)
        docs = f"http://127.0.0.1:{status.app_port}/docs"
        when = "Once ready, open" if state is PreviewState.LAUNCHING else "Open"
        lines += [f"{when} a tunnel (AWS CLI v2 and session-manager-plugin):", ""]
        lines += ["```bash", command, "```", "", f"then browse {docs}", ""]

    if state is PreviewState.FAILED:
        diagnosis = (status.diagnosis or "no diagnosis was collected").strip()
        if len(diagnosis) > MAX_DIAGNOSIS_CHARS:
            diagnosis = "…\n" + diagnosis[-MAX_DIAGNOSIS_CHARS:]
        fence = _fence(diagnosis)
        lines += ["<details open><summary>Diagnosis</summary>", "", fence, diagnosis, fence]
        lines += ["", "</details>", ""]

    if status.flow_run_url:
        lines += [f"[Prefect flow run]({status.flow_run_url})", ""]
    return mask_secrets("\n".join(lines).rstrip() + "\n", secrets)


def find_comment(github: GitHub, repo: str, pr_number: int) -> tuple[int, str] | None:
    """Our comment's id and body, searched across every page; the oldest wins.

    Only a comment that carries the marker *and* was written by our own user (the token's, or
    the App's bot) counts: anyone can paste the marker into a comment, and editing theirs
    would hijack the status.
    """
    tag = marker(repo, pr_number)
    me = github.identity()
    for comment in github.list_issue_comments(repo, pr_number):
        body = comment.get("body") or ""
        if tag in body and (me is None or me.wrote(comment.get("user"))):
            return int(comment["id"]), body
    return None


def upsert_comment(github: GitHub, repo: str, number: int, body: str) -> CommentResult:
    """Edit our comment if it exists, else create it; ``skipped`` without a token."""
    tag = marker(repo, number)
    if tag not in body:
        body = f"{tag}\n{body}"
    if not github.enabled:
        return CommentResult("skipped", None, body)
    existing = find_comment(github, repo, number)
    if existing is None:
        created = github.create_issue_comment(repo, number, body)
        return CommentResult("created", int(created["id"]), body)
    comment_id, _ = existing
    github.update_issue_comment(repo, comment_id, body)
    return CommentResult("updated", comment_id, body)


def report_deployment(
    github: GitHub,
    repo: str,
    pr_number: int,
    sha: str,
    state: DeploymentState,
    *,
    deployment_id: int | None = None,
    log_url: str | None = None,
    environment_url: str | None = None,
    description: str | None = None,
) -> int | None:
    """Show the preview's state on the PR page through environment ``pr-<n>``.

    Creates the deployment of ``sha`` when ``deployment_id`` is None and returns its id, so the
    flow posts later states to the same one. ``inactive`` without an id marks every deployment
    of the environment inactive (teardown). A token that may not write deployments, or a GitHub
    still failing after the client's retries, is logged and ignored: the deployment is a view of
    the preview, not part of it.
    """
    if not github.enabled:
        return None
    environment = deployment_environment(pr_number)
    try:
        if deployment_id is None and state == "inactive":
            for deployment in github.list_deployments(repo, environment):
                github.create_deployment_status(
                    repo, int(deployment["id"]), "inactive", description=description
                )
            return None
        if deployment_id is None:
            deployment_id = int(github.create_deployment(repo, sha, environment)["id"])
        github.create_deployment_status(
            repo,
            deployment_id,
            state,
            environment_url=environment_url,
            log_url=log_url,
            description=description,
        )
    except GitHubError as exc:  # after the client's own retries: a view, never fatal
        logger.warning("GitHub deployment status not posted: %s", exc)
    return deployment_id


# The sweeper's warning in the sticky comment: found again by its marker, replaced in place.
EXPIRY_MARKER = "<!-- pr-preview:expiry-warning -->"


def expiry_warning(
    pr_number: int, expires_at: datetime, now: datetime, max_ttl_hours: float | None
) -> str:
    """One paragraph: when the preview expires, and the two ways to keep it longer."""
    minutes = max(0, round((expires_at - now).total_seconds() / 60))
    bound = f" (at most {max_ttl_hours:g} hours from now)" if max_ttl_hours else ""
    return (
        f"⏰ This preview expires at {format_time(expires_at)}, in {minutes} minutes. To keep it"
        f" longer{bound}, comment `/preview extend 8h` or run"
        f" `pr-preview extend {int(pr_number)} 8h`."
    )


def with_expiry_warning(body: str, warning: str) -> str:
    """``body`` with ``warning`` as a quote under its headline, replacing an earlier one."""
    lines = body.splitlines()
    if EXPIRY_MARKER in lines:  # the marker and its quote go; the blank lines around are redone
        start = lines.index(EXPIRY_MARKER)
        del lines[start : start + 2]
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("### ")), len(lines))
    head, rest = lines[:at], lines[at:]
    while rest and not rest[0].strip():
        rest.pop(0)
    return "\n".join([*head, "", EXPIRY_MARKER, f"> {warning}", "", *rest]).rstrip() + "\n"


def warn_of_expiry(github: GitHub, status: CommentState, warning: str) -> CommentResult:
    """Put ``warning`` in the sticky comment (its last content kept, ``status`` rendered when
    there is none) and post it once as a comment of its own, which notifies the PR's people."""
    existing = find_comment(github, status.repo, status.pr_number)
    if existing is None:
        body = with_expiry_warning(render_comment(status), warning)
        created = github.create_issue_comment(status.repo, status.pr_number, body)
        result = CommentResult("created", int(created["id"]), body)
    else:
        comment_id, old = existing
        body = with_expiry_warning(old, warning)
        github.update_issue_comment(status.repo, comment_id, body)
        result = CommentResult("updated", comment_id, body)
    github.create_issue_comment(status.repo, status.pr_number, warning)
    return result
