"""The TTL sweep (runbook §9, §11): which previews go, and making them go.

``plan_sweep`` is a pure function over what EC2 and GitHub said; everything that touches the
world (terminating, revoking db-sg rules, events, the artifact, the PR comment) is a separate
step, so a dry run is the plan alone. Tags are the state: a ``shutdown-at`` that does not parse
is reported as such and the instance is judged by its age, never by a guessed date.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from prefect.artifacts import create_table_artifact

from tasks.cloud.aws import AwsClients
from tasks.cloud.db_rules import DbRule, db_rules, leftover_db_rules, revoke_db_rules
from tasks.cloud.expiry import pinned_hours, renewal, set_expiry
from tasks.cloud.instances import (
    Preview,
    TerminateFailed,
    TerminateResult,
    TerminateThrottled,
    find_previews,
    terminate_in_batches,
)
from tasks.cloud.tags import TAG_SHUTDOWN_AT, TAG_WARNED_FOR, TERMINATE_BATCH, format_time
from tasks.config import PreviewConfig
from tasks.github.client import github_from_config
from tasks.github.pull_request import report_deployment
from tasks.run.events import instance_event
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

    from tasks.github.client import GitHub

logger = logging.getLogger(__name__)

Action = Literal["terminate", "keep"]
PullKey = tuple[str, int]

ARTIFACT_KEY = "ttl-sweep"
NOT_WARNED = "-"  # pr-preview:warned-for of a preview warned of no expiry (never a time)
TERMINATED_EVENT = "pr-preview.terminated"


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


class ExpiryWarnings(Protocol):
    """Optional on a ``PullRequests``: tell a PR when its preview expires and how to extend it."""

    def warn_expiry(
        self,
        repo: str,
        number: int,
        *,
        sha: str | None,
        instance_id: str,
        expires_at: datetime,
        now: datetime,
    ) -> object: ...


class StickyExpiry:
    """A ``tasks.github.client.GitHub`` client seen through the sweeper's protocols: the PR's state,
    its sticky comment edited to "expired", and the warning before that
    (``tasks.github.pull_request``)."""

    def __init__(self, github: GitHub, region: str, max_ttl_hours: float | None = None) -> None:
        self.github = github
        self.region = region
        self.max_ttl_hours = max_ttl_hours

    @property
    def enabled(self) -> bool:
        return self.github.enabled

    def pull_state(self, repo: str, number: int) -> str | None:
        return self.github.pull_state(repo, number)

    def mark_expired(
        self, repo: str, number: int, *, reason: str, sha: str | None, instance_id: str
    ) -> object:
        from tasks.github.pull_request import (
            CommentState,
            PreviewState,
            render_comment,
            upsert_comment,
        )

        status = CommentState(
            PreviewState.EXPIRED,
            repo,
            number,
            sha=sha,
            instance_id=instance_id,
            region=self.region,
            detail=f"The TTL sweeper terminated the preview: {reason}.",
        )
        comment = upsert_comment(self.github, repo, number, render_comment(status))
        # The PR's environment stops showing an active deployment of a preview that is gone.
        report_deployment(self.github, repo, number, sha or "", "inactive")
        return comment

    def warn_expiry(
        self,
        repo: str,
        number: int,
        *,
        sha: str | None,
        instance_id: str,
        expires_at: datetime,
        now: datetime,
    ) -> object:
        from tasks.github.pull_request import (
            CommentState,
            PreviewState,
            expiry_warning,
            warn_of_expiry,
        )

        status = CommentState(
            PreviewState.READY,
            repo,
            number,
            sha=sha,
            instance_id=instance_id,
            region=self.region,
            expires_at=expires_at,
        )
        warning = expiry_warning(number, expires_at, now, self.max_ttl_hours)
        return warn_of_expiry(self.github, status, warning)


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
    key = _pull_key(preview)
    closed = key is not None and pr_states.get(key) == "closed"
    if preview.pinned and not closed:
        return Decision(preview, "keep", "pinned by the keep label (pr-preview:pinned=true)")
    shutdown_at = preview.shutdown_at
    if shutdown_at is not None and shutdown_at <= now:
        return Decision(preview, "terminate", f"shutdown-at passed {_hours(now - shutdown_at)} ago")
    if closed:
        assert key is not None
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
    (default twice the TTL). Never terminate a preview tagged ``pr-preview:keep=true``, nor one
    pinned by the keep label (``pr-preview:pinned=true``) unless its PR is closed.
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


def to_warn(decisions: Iterable[Decision], now: datetime, lead_minutes: float) -> list[Decision]:
    """The previews whose PR is to hear that they expire within ``lead_minutes``: kept ones of
    a PR, not tagged keep nor pinned, not yet warned of this ``shutdown-at`` (an extend moves
    it, so the PR hears again), the newest per PR. None with a lead of 0."""
    if lead_minutes <= 0:
        return []
    horizon = now + timedelta(minutes=lead_minutes)
    newest: dict[PullKey, Decision] = {}
    for decision in decisions:
        preview, key = decision.preview, decision.pull_key
        shutdown_at = preview.shutdown_at
        if decision.action != "keep" or key is None or preview.keep or preview.pinned:
            continue
        if shutdown_at is None or not now < shutdown_at <= horizon:
            continue
        if preview.warned_for == shutdown_at:
            continue
        if key not in newest or preview.launch_time >= newest[key].preview.launch_time:
            newest[key] = decision
    return list(newest.values())


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
    # database: per-preview — what the sweeper's database step dropped (or would) and could not
    dropped_databases: list[str] = field(default_factory=list)
    failed_databases: dict[str, str] = field(default_factory=dict)
    # expiry_warning_minutes: the previews whose PR was warned (would be, in a dry run)
    warned: list[str] = field(default_factory=list)
    # the keep label: pinned previews whose expiry moved ahead, and those that could not
    renewed: list[str] = field(default_factory=list)
    failed_renewals: dict[str, str] = field(default_factory=dict)
    # dns_zone_id: the names removed (would be) because their preview is gone
    removed_names: list[str] = field(default_factory=list)
    # idle_stop_minutes — each running preview's idleness as judged, and those put to sleep
    idle: dict[str, str] = field(default_factory=dict)
    slept_idle: list[str] = field(default_factory=list)

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
            "dropped_databases": len(self.dropped_databases),
            "warned": len(self.warned),
            "renewed": len(self.renewed),
            "removed_names": len(self.removed_names),
            "slept_idle": len(self.slept_idle),
        }

    def outcome(self, decision: Decision) -> str:
        return self._outcome(decision, set(self.terminated), set(self.already_gone))

    def _outcome(self, decision: Decision, terminated: set[str], already_gone: set[str]) -> str:
        iid = decision.instance_id
        if decision.action == "keep":
            notes = []
            if iid in self.warned:
                notes.append("PR to warn" if self.dry_run else "PR warned")
            if iid in self.renewed:
                notes.append("expiry to renew" if self.dry_run else "expiry renewed")
            if iid in self.failed_renewals:
                notes.append(f"renewal failed: {self.failed_renewals[iid]}")
            return ", ".join(["kept", *notes])
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
                    "idle": self.idle.get(preview.instance_id, "-"),
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
            + (
                f", preview databases {'to drop' if self.dry_run else 'dropped'}"
                f" {counts['dropped_databases']}"
                if self.dropped_databases or self.failed_databases
                else ""
            )
            + "".join(
                f", {what} {counts[key]}"
                for key, what in (
                    ("warned", "expiry warnings" + (" to post" if self.dry_run else " posted")),
                    ("renewed", "pinned previews " + ("to renew" if self.dry_run else "renewed")),
                    ("removed_names", "names " + ("to remove" if self.dry_run else "removed")),
                )
                if counts[key]
            )
            + (f", asleep for idleness {counts['slept_idle']}" if self.idle else "")
        )

    def live_pulls(self) -> list[tuple[str, int]]:
        """(repo, PR) of every preview still running once the sweep is done."""
        return sorted({key for preview in self.live if (key := _pull_key(preview))})


def terminated_event(decision: Decision) -> dict[str, Any]:
    """Keyword arguments of ``emit_event`` for one terminated preview."""
    preview = decision.preview
    payload: dict[str, Any] = {"reason": decision.reason, "by": "ttl-sweeper", "sha": preview.sha}
    if decision.pull_key:
        return instance_event(
            "terminated", preview.instance_id, preview.repo, preview.pr_number, **payload
        )
    return instance_event("terminated", preview.instance_id, **payload)


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


# --- the steps


@step
def find_sweep_candidates(ec2: EC2Client, settings: PreviewConfig) -> list[Preview]:
    """Every live instance with our Purpose tag, across all pages."""
    return find_previews(ec2, settings.purpose_tag)


@step(retry=False)
def look_up_pull_requests(github: PullRequests, keys: list[PullKey]) -> dict[PullKey, str]:
    """Whether each PR is still open; the GitHub client retries by itself."""
    return look_up_pull_states(github, keys)


@step
def terminate_expired(
    ec2: EC2Client, settings: PreviewConfig, ids: list[str], batch_size: int = TERMINATE_BATCH
) -> TerminateResult:
    """Terminate in batches of 1,000; a failed batch is recorded and the others still run.
    Batches refused only by throttling or a 5xx fail the task so that its retries run."""
    result = terminate_in_batches(ec2, ids, batch_size=batch_size)
    if result.retryable:
        raise TerminateThrottled(
            f"terminating {len(result.retryable)} previews was throttled", result
        )
    return result


@step
def revoke_leftover_db_rules(
    ec2: EC2Client, settings: PreviewConfig, live: list[Preview], dry_run: bool = False
) -> list[DbRule]:
    """Revoke db-sg's temporary ``/32`` rules on 5432 that no live preview uses any more."""
    group_id = settings.db_security_group_id
    if not (settings.db_sg_open_public_ip and group_id):
        return []
    leftovers = leftover_db_rules(db_rules(ec2, group_id), live)
    return leftovers if dry_run else revoke_db_rules(ec2, group_id, leftovers)


@step(retry=False)
def announce_terminations(
    report: SweepReport, emit: EmitEvent | None, github: PullRequests | None
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


@step
def mark_warned(ec2: EC2Client, settings: PreviewConfig, instance_id: str, value: str) -> None:
    """``pr-preview:warned-for``: the expiry the PR has heard of (tags are the state: the next
    sweep, or one after a restart, reads it and posts nothing again)."""
    ec2.create_tags(Resources=[instance_id], Tags=[{"Key": TAG_WARNED_FOR, "Value": value}])


@step(retry=False)
def warn_pull_request(github: ExpiryWarnings, decision: Decision, now: datetime) -> None:
    """The sticky comment gains the warning, and the PR one short comment; the client retries
    by itself."""
    preview = decision.preview
    assert decision.pull_key is not None and preview.shutdown_at is not None
    repo, number = decision.pull_key
    github.warn_expiry(
        repo,
        number,
        sha=preview.sha,
        instance_id=preview.instance_id,
        expires_at=preview.shutdown_at,
        now=now,
    )


def warn_before_expiry(
    ec2: EC2Client, settings: PreviewConfig, github: PullRequests | None, report: SweepReport
) -> list[str]:
    """Warn each PR whose preview expires within ``expiry_warning_minutes``, once per expiry:
    the expiry is claimed in its tag first, so a second sweep in the same window posts
    nothing; a warning GitHub refuses gives the claim back for the next sweep."""
    warn = getattr(github, "warn_expiry", None) if github and github.enabled else None
    due = to_warn(report.decisions, report.now, settings.expiry_warning_minutes)
    if not callable(warn) or not due:
        return []
    if report.dry_run:
        return [decision.instance_id for decision in due]
    log = run_logger(logger)
    warned = []
    for decision in due:
        preview = decision.preview
        assert preview.shutdown_at is not None
        before = preview.tags.get(TAG_WARNED_FOR, NOT_WARNED)
        try:
            mark_warned(ec2, settings, preview.instance_id, format_time(preview.shutdown_at))
        except Exception as exc:  # unclaimed: the next sweep tries again
            log.error("%s: expiry warning not claimed: %s", preview.instance_id, exc)
            continue
        try:
            warn_pull_request(cast("ExpiryWarnings", github), decision, report.now)
        except Exception as exc:  # a warning is a courtesy: the next sweep tries again
            log.warning("%s: expiry warning not posted: %s", preview.name, exc)
            with contextlib.suppress(Exception):
                mark_warned(ec2, settings, preview.instance_id, before)
            continue
        log.info("%s: warned, it expires at %s", preview.name, format_time(preview.shutdown_at))
        warned.append(preview.instance_id)
    return warned


@dataclass
class Renewals:
    renewed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


@step
def renew_pinned(
    clients: AwsClients,
    settings: PreviewConfig,
    live: list[Preview],
    now: datetime,
    dry_run: bool = False,
) -> Renewals:
    """Keep each pinned preview's expiry between half a TTL and a TTL ahead: the timer of a
    running one first, then ``shutdown-at`` (``tasks.cloud.expiry``). One that fails is
    reported and tried again by the next sweep, well before its timer fires."""
    hours = pinned_hours(settings.ttl_hours, settings.max_ttl_hours)
    done = Renewals()
    for preview in live:
        if not preview.pinned or preview.keep or _pull_key(preview) is None:
            continue
        until = renewal(preview, now, hours)
        if until is None:
            continue
        if not dry_run:
            try:
                set_expiry(clients.ec2, clients.ssm, preview, until, poll=settings.poll_seconds)
            except Exception as exc:
                run_logger(logger).error("%s: pinned, not renewed: %s", preview.name, exc)
                done.failed[preview.instance_id] = str(exc)
                continue
            run_logger(logger).info("%s: pinned, expires at %s", preview.name, until)
        done.renewed.append(preview.instance_id)
    return done


@step(retry=False)
def publish_sweep_report(report: SweepReport, key: str = ARTIFACT_KEY) -> None:
    """The decisions as a table artifact; the log says the same in one line."""
    create_table_artifact(table=report.table(), key=key, description=report.summary())
    run_logger(logger).info(report.summary())


def github_or_none(settings: PreviewConfig) -> PullRequests | None:
    """The GitHub client when one is configured; without it the sweep goes by tags alone."""
    try:
        github = github_from_config(settings)
    except Exception as exc:  # no token must not stop the TTL sweep
        run_logger(logger).warning("GitHub not configured (%s): sweeping by tags alone", exc)
        return None
    if not github.enabled:
        return None
    return StickyExpiry(github, settings.region, settings.max_ttl_hours)


def sweep(
    ec2: EC2Client,
    settings: PreviewConfig,
    *,
    dry_run: bool = False,
    github: PullRequests | None = None,
    emit: EmitEvent | None = None,
    now: datetime | None = None,
    max_age_hours: float | None = None,
    batch_size: int = TERMINATE_BATCH,
) -> SweepReport:
    """The sweep over explicit clients: list, decide, terminate, revoke, announce.

    The ttl-sweeper flow and ``pr-preview cleanup`` both run it; inside a flow run every step
    is a task run, outside one a plain call with the same retries.
    """
    now = now or datetime.now(UTC)
    log = run_logger(logger)

    # 1. Every live instance with our Purpose tag (runbook §9's describe-instances, paginated).
    previews = find_sweep_candidates(ec2, settings)

    # 2. Decide by tags; ask GitHub only about PRs whose previews the tags would keep.
    ttl, max_age = settings.ttl_hours, max_age_hours
    decisions = plan_sweep(previews, now, ttl_hours=ttl, max_age_hours=max_age)
    lookups = pulls_to_look_up(decisions) if github is not None and github.enabled else []
    if github is not None and lookups:
        pr_states = look_up_pull_requests(github, lookups)
        decisions = plan_sweep(
            previews, now, ttl_hours=ttl, max_age_hours=max_age, pr_states=pr_states
        )
    report = SweepReport(dry_run=dry_run, now=now, decisions=decisions, pr_lookups=len(lookups))
    for decision in decisions:
        if decision.action == "terminate":
            log.info(
                "%s %s: %s",
                "would terminate" if dry_run else "terminate",
                decision.instance_id,
                decision.reason,
            )

    # 3. Terminate in batches of 1,000 (runbook §9's terminate-instances).
    if report.to_terminate and not dry_run:
        try:
            result = terminate_expired(ec2, settings, report.to_terminate, batch_size)
        except TerminateFailed as exc:  # still throttled after the task's retries
            if exc.result is None:
                raise
            result = exc.result
        report.terminated, report.already_gone = result.terminated, result.already_gone
        report.failed, report.terminate_calls = result.failed, result.calls
        errors: dict[str, list[str]] = {}
        for iid, error in result.failed.items():
            errors.setdefault(error, []).append(iid)
        for error, ids in errors.items():
            log.error("terminating %d previews failed (%s…): %s", len(ids), ids[0], error)

    # 4. pr-preview.terminated per instance; the PR's sticky comment says "expired" — before
    #    the db-sg clean-up, which must not keep the PR from hearing its preview is gone.
    if report.terminated:
        announce_terminations(report, emit, github)
    # 4b. PRs whose preview expires within expiry_warning_minutes hear it once per expiry.
    report.warned = warn_before_expiry(ec2, settings, github, report)
    # 5. The temporary /32 rules on db-sg of runbook §2.5 that no live preview uses.
    report.revoked_rules = revoke_leftover_db_rules(ec2, settings, report.live, dry_run)
    for rule in report.revoked_rules:
        log.info(
            "%s db-sg rule %s (%s)",
            "would revoke" if dry_run else "revoked",
            rule.cidr,
            rule.description,
        )

    return report
