"""The TTL sweep (runbook §9, §11): which previews go, and making them go.

``plan_sweep`` is a pure function over what EC2 and GitHub said; everything that touches the
world (terminating, revoking db-sg rules, events, the artifact, the PR comment) is a separate
step, so a dry run is the plan alone. Tags are the state: a ``shutdown-at`` that does not parse
is reported as such and the instance is judged by its age, never by a guessed date.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.db_access import (
    DB_RULE_MARKER,
    DbRule,
    db_rule_description,
    db_rules,
    leftover_db_rules,
    revoke_db_rules,
)
from tasks.instances import (
    TAG_SHUTDOWN_AT,
    TERMINATE_BATCH,
    Preview,
    TerminateResult,
    find_previews,
    format_time,
    terminate_in_batches,
)
from tasks.retry import retry_transient

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

    from tasks.github import GitHub

logger = logging.getLogger(__name__)

Action = Literal["terminate", "keep"]
PullKey = tuple[str, int]

ARTIFACT_KEY = "ttl-sweep"
TERMINATED_EVENT = "pr-preview.terminated"
PR_ROLE = "pull-request"


class PullRequests(Protocol):
    """What the sweeper needs from GitHub: is this pull request still open?"""

    @property
    def enabled(self) -> bool: ...

    def pull_state(self, repo: str, number: int) -> str | None:
        """``"open"``, ``"closed"``, or None when GitHub does not know the pull request."""
        ...


class ExpiringComments(Protocol):
    """Optional on a ``PullRequests``: mark the PR's sticky comment as expired."""

    def mark_expired(
        self, repo: str, number: int, *, reason: str, sha: str | None, instance_id: str
    ) -> object: ...


class StickyExpiry:
    """A ``tasks.github.GitHub`` client seen through the sweeper's protocols: the PR's state,
    and its sticky comment edited to "expired" (``tasks.comment``)."""

    def __init__(self, github: GitHub, region: str) -> None:
        self.github = github
        self.region = region

    @property
    def enabled(self) -> bool:
        return self.github.enabled

    def pull_state(self, repo: str, number: int) -> str | None:
        return self.github.pull_state(repo, number)

    def mark_expired(
        self, repo: str, number: int, *, reason: str, sha: str | None, instance_id: str
    ) -> object:
        from tasks.comment import CommentState, PreviewState, render_comment, upsert_comment

        status = CommentState(
            PreviewState.EXPIRED,
            repo,
            number,
            sha=sha,
            instance_id=instance_id,
            region=self.region,
            detail=f"The TTL sweeper terminated the preview: {reason}.",
        )
        return upsert_comment(self.github, repo, number, render_comment(status))


EmitEvent = Callable[..., object]


@dataclass(frozen=True)
class Decision:
    preview: Preview
    action: Action
    reason: str

    @property
    def instance_id(self) -> str:
        return self.preview.instance_id

    @property
    def pull_key(self) -> PullKey | None:
        return _pull_key(self.preview)


def _pull_key(preview: Preview) -> PullKey | None:
    repo, number = preview.repo, preview.pr_number
    return (repo, number) if repo and number is not None else None


def _hours(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    sign, minutes = ("-", -minutes) if minutes < 0 else ("", minutes)
    return f"{sign}{minutes // 60}h{minutes % 60:02d}m"


def _decide(
    preview: Preview,
    now: datetime,
    max_age: timedelta,
    pr_states: Mapping[PullKey, str],
) -> Decision:
    if preview.keep:
        return Decision(preview, "keep", "tagged pr-preview:keep=true")
    shutdown_at = preview.shutdown_at
    if shutdown_at is not None and shutdown_at <= now:
        return Decision(preview, "terminate", f"shutdown-at passed {_hours(now - shutdown_at)} ago")
    key = _pull_key(preview)
    if key is not None and pr_states.get(key) == "closed":
        return Decision(preview, "terminate", f"PR {key[0]}#{key[1]} is closed on GitHub")
    if shutdown_at is None:
        raw = preview.tags.get(TAG_SHUTDOWN_AT)
        tag = "no shutdown-at tag" if raw is None else f"unparsable shutdown-at {raw!r}"
        age = now - preview.launch_time
        if age > max_age:
            return Decision(
                preview, "terminate", f"{tag}; launched {_hours(age)} ago, over max age"
            )
        return Decision(preview, "keep", f"{tag}; launched {_hours(age)} ago, under max age")
    return Decision(preview, "keep", f"shutdown-at in {_hours(shutdown_at - now)}")


def plan_sweep(
    previews: Iterable[Preview],
    now: datetime,
    *,
    ttl_hours: float,
    max_age_hours: float | None = None,
    pr_states: Mapping[PullKey, str] | None = None,
) -> list[Decision]:
    """Decide, for each preview, terminate or keep, and why.

    Terminate when ``shutdown-at`` has passed, when the PR is closed (``pr_states``), or when
    ``shutdown-at`` is missing or unparsable and the instance is older than ``max_age_hours``
    (default twice the TTL). Never terminate a preview tagged ``pr-preview:keep=true``.
    """
    max_age = timedelta(hours=2 * ttl_hours if max_age_hours is None else max_age_hours)
    states = pr_states or {}
    return [_decide(preview, now, max_age, states) for preview in previews]


def pulls_to_look_up(decisions: Iterable[Decision]) -> list[PullKey]:
    """The PRs whose state could still change a decision: kept previews not tagged keep."""
    keys = (
        decision.pull_key
        for decision in decisions
        if decision.action == "keep" and not decision.preview.keep
    )
    return list(dict.fromkeys(key for key in keys if key is not None))


def look_up_pull_states(github: PullRequests, keys: Iterable[PullKey]) -> dict[PullKey, str]:
    """One lookup per PR. A failed or unknown lookup is left out: no state, no guess."""
    states: dict[PullKey, str] = {}
    for repo, number in dict.fromkeys(keys):
        try:
            state = github.pull_state(repo, number)
        except Exception as exc:  # GitHub down must not stop the TTL part of the sweep
            logger.warning("state of %s#%d not read, judged by TTL only: %s", repo, number, exc)
            continue
        if state is not None:
            states[(repo, number)] = state
    return states


def ids_to_terminate(decisions: Iterable[Decision]) -> list[str]:
    return [decision.instance_id for decision in decisions if decision.action == "terminate"]


# --- The report


@dataclass
class SweepReport:
    dry_run: bool
    now: datetime
    decisions: list[Decision]
    terminated: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    terminate_calls: int = 0
    pr_lookups: int = 0
    revoked_rules: list[DbRule] = field(default_factory=list)

    @property
    def to_terminate(self) -> list[str]:
        return ids_to_terminate(self.decisions)

    @property
    def live(self) -> list[Preview]:
        """Previews still running once the sweep is done (or would be, in a dry run)."""
        return [
            decision.preview
            for decision in self.decisions
            if decision.action == "keep" or decision.instance_id in self.failed
        ]

    def counts(self) -> dict[str, int]:
        return {
            "seen": len(self.decisions),
            "to_terminate": len(self.to_terminate),
            "kept": sum(decision.action == "keep" for decision in self.decisions),
            "terminated": len(self.terminated),
            "already_gone": len(self.already_gone),
            "failed": len(self.failed),
            "terminate_calls": self.terminate_calls,
            "pr_lookups": self.pr_lookups,
            "revoked_rules": len(self.revoked_rules),
        }

    def outcome(self, decision: Decision) -> str:
        return self._outcome(decision, set(self.terminated), set(self.already_gone))

    def _outcome(self, decision: Decision, terminated: set[str], already_gone: set[str]) -> str:
        iid = decision.instance_id
        if decision.action == "keep":
            return "kept"
        if self.dry_run:
            return "would terminate (dry run)"
        if iid in self.failed:
            return f"failed: {self.failed[iid]}"
        if iid in already_gone:
            return "already gone"
        return "terminated" if iid in terminated else "not attempted"

    def table(self) -> list[dict[str, str]]:
        """One row per preview, for the table artifact."""
        terminated, already_gone = set(self.terminated), set(self.already_gone)
        rows = []
        for decision in self.decisions:
            preview = decision.preview
            shutdown_at = preview.shutdown_at
            rows.append(
                {
                    "instance": preview.instance_id,
                    "PR": f"{preview.repo}#{preview.pr_number}" if decision.pull_key else "-",
                    "sha": (preview.sha or "-")[:12],
                    "age": _hours(self.now - preview.launch_time),
                    "shutdown-at": format_time(shutdown_at)
                    if shutdown_at
                    else preview.tags.get(TAG_SHUTDOWN_AT, "-"),
                    "decision": decision.action,
                    "reason": decision.reason,
                    "outcome": self._outcome(decision, terminated, already_gone),
                }
            )
        return rows

    def summary(self) -> str:
        counts = self.counts()
        verb = "would terminate" if self.dry_run else "terminated"
        done = counts["to_terminate"] if self.dry_run else counts["terminated"]
        return (
            f"TTL sweep{' (dry run)' if self.dry_run else ''}: {counts['seen']} previews, "
            f"{verb} {done}, kept {counts['kept']}, already gone {counts['already_gone']}, "
            f"failed {counts['failed']}, db-sg rules "
            f"{'to revoke' if self.dry_run else 'revoked'} {counts['revoked_rules']}"
        )


def terminated_event(decision: Decision) -> dict[str, Any]:
    """Keyword arguments of ``emit_event`` for one terminated preview (the shape of
    ``flows.common.emit_instance_event``)."""
    preview = decision.preview
    related = []
    payload: dict[str, Any] = {"reason": decision.reason, "by": "ttl-sweeper", "sha": preview.sha}
    if decision.pull_key:
        related.append(
            {
                "prefect.resource.id": f"github.pr.{preview.repo}/{preview.pr_number}",
                "prefect.resource.role": PR_ROLE,
                "prefect.resource.name": f"{preview.repo}#{preview.pr_number}",
            }
        )
        payload = {"repo": preview.repo, "pr_number": preview.pr_number, **payload}
    return {
        "event": TERMINATED_EVENT,
        "resource": {
            "prefect.resource.id": f"pr-preview.instance.{preview.instance_id}",
            "prefect.resource.name": preview.instance_id,
        },
        "related": related,
        "payload": payload,
    }


def expired_pulls(report: SweepReport) -> dict[PullKey, Decision]:
    """PRs left with no live preview by this sweep, each with the decision of its newest one."""
    terminated = set(report.terminated)
    still_live = {d.pull_key for d in report.decisions if d.instance_id not in terminated}
    gone: dict[PullKey, Decision] = {}
    for decision in report.decisions:
        key = decision.pull_key
        if key and decision.instance_id in terminated and key not in still_live:
            newest = gone.get(key)
            if newest is None or decision.preview.launch_time >= newest.preview.launch_time:
                gone[key] = decision
    return gone


def announce_terminations(
    report: SweepReport, *, emit: EmitEvent | None, github: PullRequests | None
) -> int:
    """Emit ``pr-preview.terminated`` per terminated instance and mark the PRs' sticky
    comments expired (when the GitHub client can). Returns the number of comments marked."""
    if report.dry_run:
        return 0
    terminated = set(report.terminated)
    if emit is not None:
        for decision in report.decisions:
            if decision.instance_id in terminated:
                emit(**terminated_event(decision))
    mark = getattr(github, "mark_expired", None) if github and github.enabled else None
    if not callable(mark):
        return 0
    marked = 0
    for (repo, number), decision in expired_pulls(report).items():
        preview = decision.preview
        try:
            mark(
                repo,
                number,
                reason=decision.reason,
                sha=preview.sha,
                instance_id=preview.instance_id,
            )
            marked += 1
        except Exception as exc:  # a comment is a courtesy; the instances are already gone
            logger.warning("sticky comment of %s#%d not marked expired: %s", repo, number, exc)
    return marked


# --- Prefect tasks around the steps


@task(
    name="find-sweep-candidates",
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def find_sweep_candidates(ec2: EC2Client, purpose: str) -> list[Preview]:
    """Every live instance with our Purpose tag, across all pages."""
    return find_previews(ec2, purpose)


@task(name="look-up-pull-requests", cache_policy=NO_CACHE)
def look_up_pull_requests(github: PullRequests, keys: list[PullKey]) -> dict[PullKey, str]:
    return look_up_pull_states(github, keys)


@task(
    name="terminate-expired",
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def terminate_expired(
    ec2: EC2Client, ids: list[str], batch_size: int = TERMINATE_BATCH
) -> TerminateResult:
    """Terminate in batches of 1,000; a failed batch is recorded and the others still run.
    Batches refused only by throttling or a 5xx fail the task so that its retries run."""
    from tasks.terminate import TerminateFailed

    result = terminate_in_batches(ec2, ids, batch_size=batch_size)
    if result.retryable:
        raise TerminateFailed(
            f"terminating {len(result.retryable)} previews was throttled", result, transient=True
        )
    return result


@task(
    name="revoke-leftover-db-rules",
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def revoke_leftover_db_rules(
    ec2: EC2Client, group_id: str, live: list[Preview], dry_run: bool = False
) -> list[DbRule]:
    """Revoke db-sg's temporary ``/32`` rules on 5432 that no live preview uses any more."""
    leftovers = leftover_db_rules(db_rules(ec2, group_id), live)
    return leftovers if dry_run else revoke_db_rules(ec2, group_id, leftovers)


@task(name="announce-terminations", cache_policy=NO_CACHE)
def announce(report: SweepReport, emit: EmitEvent | None, github: PullRequests | None) -> int:
    return announce_terminations(report, emit=emit, github=github)


@task(name="publish-sweep-report", cache_policy=NO_CACHE)
def publish_sweep_report(report: SweepReport, key: str = ARTIFACT_KEY) -> None:
    """The decisions as a table artifact; the log says the same in one line."""
    create_table_artifact(table=report.table(), key=key, description=report.summary())
    get_run_logger().info(report.summary())


__all__ = [
    "ARTIFACT_KEY",
    "DB_RULE_MARKER",
    "TERMINATED_EVENT",
    "DbRule",
    "Decision",
    "ExpiringComments",
    "PullRequests",
    "StickyExpiry",
    "SweepReport",
    "announce_terminations",
    "db_rule_description",
    "leftover_db_rules",
    "look_up_pull_states",
    "plan_sweep",
    "pulls_to_look_up",
    "terminated_event",
]
