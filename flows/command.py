"""A ``/preview`` command in a pull request's conversation, carried out (README, "Commands").

0. not served, a bot's comment, no GitHub to ask: nothing happens
1. who commands: write access, asked of GitHub now — anyone else gets a reply naming the rule
2. acknowledge with a reaction; a command outside the grammar gets a reply listing the commands
3. under the PR's lock: status, stop, start, extend, destroy — or, for redeploy, the PR's
   preview torn down and launched afresh by the preview flow (which takes the lock itself);
   for approve, a fork's head commit approved and previewed by the preview flow
4. the sticky comment and the check run of the preview's commit say where the preview stands
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect.states import Completed

from flows.preview import pr_preview
from tasks.cloud.aws import AwsClients, build_clients
from tasks.config import PreviewConfig, RunOverrides, run_config
from tasks.github.client import GitHub, github_from_config
from tasks.github.commands import BadCommand, Command, Verb, parse_command, usage
from tasks.github.pull_request import PreviewState
from tasks.inputs import check_inputs, is_bot, is_login, is_sha
from tasks.run.budget import run_budget
from tasks.run.locks import hold, pr_lock_name
from tasks.run.outcome import Outcome
from tasks.steps.command import (
    acknowledge,
    approve_commit,
    authorize,
    extend_preview,
    pr_previews,
    reply,
    start_preview,
    stop_preview,
)
from tasks.steps.database import drop_database
from tasks.steps.dns import preview_name, remove_name
from tasks.steps.guards import check_approval
from tasks.steps.probe import ProbeFailed, probe
from tasks.steps.report import PullRequestReport, run_report
from tasks.steps.teardown import teardown


@dataclass
class CommandResult:
    repo: str
    pr_number: int
    command: str  # canonical (``/preview extend 8h``), or as written when refused
    commenter: str
    outcome: str  # done, or why nothing was done
    instance_ids: list[str]
    shutdown_at: datetime | None = None


@flow(name="pr-command", flow_run_name="pr-{pr_number}-command-{comment_id}")
def pr_command(
    repo: str,
    pr_number: int,
    command: str,
    comment_id: int,
    commenter: str,
    config: RunOverrides | None = None,
) -> CommandResult:
    """Carry out ``command`` (a ``/preview`` comment's first line) that ``commenter`` wrote
    in comment ``comment_id`` of ``repo#pr_number``."""
    check_inputs(repo, pr_number)
    if isinstance(comment_id, bool) or not isinstance(comment_id, int) or comment_id < 1:
        raise ValueError(f"comment_id must be a positive integer, got {comment_id!r}")
    settings = run_config(config)
    result = CommandResult(repo, pr_number, command[:200], commenter, "", [])
    if not settings.serves(repo):
        return _nothing_done(result, Outcome.NOT_ALLOWED, settings.not_served(repo))
    if is_bot(commenter):
        return _nothing_done(result, Outcome.BOT, f"{commenter} is a bot: bots do not command")
    if not is_login(commenter):
        raise ValueError(f"commenter must be a GitHub login, got {commenter[:50]!r}")
    with run_budget(settings.preview_timeout_seconds()):
        return _command(settings, result, comment_id, config)


def _nothing_done(result: CommandResult, outcome: Outcome, reason: str) -> CommandResult:
    """Completed, named after why the command changed nothing."""
    get_run_logger().warning("command not carried out: %s", reason)
    result.outcome = outcome.value
    state: State[CommandResult] = Completed(name=outcome.state_name, message=reason, data=result)
    return cast(CommandResult, state)


def _command(
    settings: PreviewConfig, result: CommandResult, comment_id: int, config: RunOverrides | None
) -> CommandResult:
    repo, pr_number, commenter = result.repo, result.pr_number, result.commenter
    clients = build_clients(settings)
    github = github_from_config(settings, ssm=clients.ssm)
    with github:
        if not github.enabled:
            why = "no GitHub token: nobody's permission can be asked, so no command is carried out"
            return _nothing_done(result, Outcome.NOT_PERMITTED, why)
        me = github.identity()
        if me is not None and me.login.lower() == commenter.lower():
            return _nothing_done(result, Outcome.BOT, "our own comment: nothing to do")

        # 1. Who commands: write access, as GitHub says it now.
        allowed = authorize(github, repo, commenter)
        # 2. Acknowledged at once: 👀 for a command that will be looked at, 😕 for a refusal.
        acknowledge(github, repo, comment_id, "eyes" if allowed.ok else "confused")
        if not allowed.ok:
            reply(
                github,
                repo,
                pr_number,
                f"@{commenter} only people with write access to {repo} may command its"
                f" previews, and GitHub says your permission is `{allowed.permission}`."
                " Nothing was done; ask a maintainer to run the command.",
            )
            why = f"@{commenter} has {allowed.permission} permission, not write"
            return _nothing_done(result, Outcome.NOT_PERMITTED, why)
        try:
            parsed = parse_command(result.command, settings.max_ttl_hours)
        except BadCommand as exc:
            reply(
                github,
                repo,
                pr_number,
                f"@{commenter} {exc}; nothing was done. The commands:\n\n{usage()}",
            )
            return _nothing_done(result, Outcome.BAD_COMMAND, str(exc))
        result.command = parsed.text()
        get_run_logger().info("@%s: %s", commenter, result.command)

        # 3. Carried out.
        if parsed.verb is Verb.REDEPLOY:
            return _redeploy(clients, settings, github, result, config)
        if parsed.verb is Verb.APPROVE:
            assert parsed.sha is not None
            return _approve(settings, github, result, parsed.sha, config)
        report = run_report(github, settings, repo, pr_number)
        lease, wait = settings.lock_lease_seconds, settings.lock_wait_seconds
        with hold(pr_lock_name(repo, pr_number), lease_seconds=lease, timeout_seconds=wait):
            _under_lock(clients, settings, report, parsed, result)
    return result


def _under_lock(
    clients: AwsClients,
    settings: PreviewConfig,
    report: PullRequestReport,
    command: Command,
    result: CommandResult,
) -> None:
    """Status, stop, start, extend, destroy; each ends in the sticky comment."""
    by = f"`{command.text()}` by @{result.commenter}."
    previews = pr_previews(clients.ec2, settings, result.repo, result.pr_number)
    result.instance_ids = [p.instance_id for p in previews]
    if previews:  # the check run of the commit the preview runs tells the command's end too
        report.sha = previews[-1].sha
    if command.verb is Verb.DESTROY:
        removed = teardown(clients.ec2, settings, result.repo, result.pr_number)
        if settings.database == "per-preview":
            drop_database(clients, settings, result.repo, result.pr_number)
        try:  # a name left behind is the sweeper's to remove
            remove_name(clients, settings, result.repo, result.pr_number)
        except Exception as exc:
            get_run_logger().warning("the name of the preview not removed: %s", exc)
        report.tell(
            PreviewState.TORN_DOWN,
            instance_id=", ".join(removed.instance_ids) or None,
            detail=f"Destroyed: {by} A push or `/preview redeploy` launches a new one.",
        )
        result.outcome = "destroyed"
        return
    if not previews:
        report.tell(
            PreviewState.ABSENT,
            detail=f"{by} This pull request has no preview now; `/preview redeploy` launches one.",
        )
        result.outcome = "no preview"
        return
    preview = previews[-1]  # the newest: a PR has one outside a replacement
    report.dns_name = preview_name(clients, settings, result.repo, result.pr_number)
    report.pinned_by = settings.keep_label if preview.pinned else None
    shutdown_at = preview.shutdown_at
    state = PreviewState.STOPPED if preview.state in ("stopping", "stopped") else PreviewState.READY
    detail = by
    if command.verb is Verb.STOP and state is PreviewState.READY:
        stop_preview(clients, settings, preview)
        state, detail = PreviewState.STOPPED, f"Stopped: {by} `/preview start` starts it again."
    elif command.verb is Verb.START and state is PreviewState.STOPPED:
        start_preview(clients, settings, preview)
        shutdown_at = pr_previews(clients.ec2, settings, result.repo, result.pr_number)[
            -1
        ].shutdown_at
        try:
            probe(clients, settings, preview.instance_id)
        except ProbeFailed as exc:
            report.tell(
                PreviewState.FAILED,
                instance_id=preview.instance_id,
                expires_at=shutdown_at,
                diagnosis=f"started, but the app does not answer: {exc}",
            )
            result.outcome, result.shutdown_at = "started, app not answering", shutdown_at
            return
        state, detail = PreviewState.READY, f"Started: {by}"
    elif command.verb is Verb.EXTEND:
        assert command.hours is not None
        shutdown_at = extend_preview(clients, settings, preview, command.hours)
        detail = f"Extended: {by}"
    elif command.verb in (Verb.STOP, Verb.START):
        already = "stopped" if state is PreviewState.STOPPED else "running"
        detail = f"{by} The preview was already {already}."
    report.tell(state, instance_id=preview.instance_id, expires_at=shutdown_at, detail=detail)
    result.outcome, result.shutdown_at = str(state), shutdown_at


def _head(pull: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """The pull request's head sha (when it is one), repository and branch, as GitHub says."""
    head: dict[str, Any] = pull["head"] if isinstance(pull.get("head"), dict) else {}
    sha, ref = head.get("sha"), head.get("ref")
    head_repo: dict[str, Any] = head["repo"] if isinstance(head.get("repo"), dict) else {}
    full_name = head_repo.get("full_name")
    return (
        sha if isinstance(sha, str) and is_sha(sha) else None,
        full_name if isinstance(full_name, str) else None,
        ref if isinstance(ref, str) else None,
    )


def _approve(
    settings: PreviewConfig,
    github: GitHub,
    result: CommandResult,
    sha: str,
    config: RunOverrides | None,
) -> CommandResult:
    """Approve ``sha`` when it is the fork's head now, then preview it: the preview flow finds
    the approval and takes the PR's lock itself. A later push is not approved."""
    repo, pr_number = result.repo, result.pr_number
    pull = github.get_pull(repo, pr_number)
    verdict = check_approval(pull, repo, sha, settings.allowed_fork_repos, settings.fork_previews)
    if not verdict.ok:
        assert verdict.verdict is not None
        reply(github, repo, pr_number, f"@{result.commenter} {verdict.reason}.")
        return _nothing_done(result, verdict.verdict, verdict.reason)
    _, head_repo, branch = _head(pull)
    approve_commit(repo, pr_number, sha, result.commenter)
    launched = pr_preview(
        repo,
        pr_number,
        sha,
        action="approve",
        head_repo=head_repo,
        config=config,
        branch=branch,
    )
    result.instance_ids = [launched.instance_id] if launched.instance_id else []
    result.outcome, result.shutdown_at = f"approved: {launched.status}", launched.shutdown_at
    return result


def _redeploy(
    clients: AwsClients,
    settings: PreviewConfig,
    github: GitHub,
    result: CommandResult,
    config: RunOverrides | None,
) -> CommandResult:
    """Tear the PR's preview down under its lock, then launch its head afresh: the preview
    flow, as a subflow, takes the lock itself and tells the sticky comment."""
    repo, pr_number = result.repo, result.pr_number
    pull = github.get_pull(repo, pr_number)
    sha, head_repo, branch = _head(pull)
    if pull.get("state") != "open" or sha is None:
        reply(
            github,
            repo,
            pr_number,
            f"@{result.commenter} the pull request is not open: nothing to redeploy.",
        )
        result.outcome = "not open"
        return result
    lease, wait = settings.lock_lease_seconds, settings.lock_wait_seconds
    with hold(pr_lock_name(repo, pr_number), lease_seconds=lease, timeout_seconds=wait):
        removed = teardown(clients.ec2, settings, repo, pr_number)
    launched = pr_preview(
        repo,
        pr_number,
        sha,
        action="redeploy",
        force=True,
        head_repo=head_repo,
        config=config,
        branch=branch,
    )
    result.instance_ids = removed.instance_ids + (
        [launched.instance_id] if launched.instance_id else []
    )
    result.outcome, result.shutdown_at = f"redeployed: {launched.status}", launched.shutdown_at
    return result
