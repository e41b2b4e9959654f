"""The preview of one pull request: the runbook's workflow (§2) as a Prefect flow.

0. guards: not allowed, closed, fork (or a fork's commit not approved), superseded (before
   anything costs money)
1. preflight ∥ build-image check             (§2.3, §2.1)
2. in place when the PR's instance is healthy (a push costs seconds, not an EC2 boot); a
   sleeping one is woken first
3. terminate the old instance, make room, claim a warm spare or launch (§2.4, §3)
4. wait-ready → migrate → probe               (§2.4, §2.6); a launched instance migrates
   on boot, and the one command wait-ready sends then probes too
5. its pin follows the keep label; its name in the VPC (§11, with dns_zone_id)
6. tell the pull request                      (§2.7)
A failure after launch diagnoses the instance (§7, §9) and leaves it on the short TTL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed

from flows.coalesce import fold_or_go_on
from flows.run_end import state_hook
from tasks.app.app_env import AppFiles, branch_or_empty, preview_env
from tasks.app.secrets import read_secrets
from tasks.app.user_data import LaunchSpec
from tasks.cloud.aws import AwsClients, build_clients
from tasks.cloud.databases import PreviewDatabase, database_name
from tasks.cloud.on_instance import ProbeResult, timer_minutes
from tasks.cloud.power import WakeFailed
from tasks.cloud.ssm import CommandTimeout
from tasks.cloud.tags import format_time
from tasks.config import PreviewConfig, RunOverrides, run_config
from tasks.github.client import github_from_config
from tasks.github.pull_request import PreviewState, flow_run_url
from tasks.inputs import check_inputs
from tasks.run.budget import grace, run_budget
from tasks.run.errors import PreviewError
from tasks.run.events import emit_instance_event
from tasks.run.locks import FLEET_LOCK, LockLost, hold, pr_lock_name
from tasks.run.outcome import Outcome
from tasks.run.prefect_context import rename_run
from tasks.steps.check_image import check_image
from tasks.steps.compose import fetch_compose, service_names
from tasks.steps.database import create_database, drop_database, hand_over_database
from tasks.steps.db_access import open_db_access
from tasks.steps.diagnose import diagnose
from tasks.steps.dns import publish_name
from tasks.steps.guards import check_paths, check_trigger, guard
from tasks.steps.launch import launch
from tasks.steps.migrate import MigrationFailed, SeedFailed, migrate, seed
from tasks.steps.pin import follow_label
from tasks.steps.preflight import PreflightReport, preflight
from tasks.steps.probe import ProbeFailed, probe
from tasks.steps.report import PullRequestReport
from tasks.steps.sleep import sleeping_previews, wake
from tasks.steps.spares import claim
from tasks.steps.terminate import NoRoom, terminate, terminate_instance
from tasks.steps.update import (
    UpdateFailed,
    confirm_ttl,
    in_place_candidate,
    preview_health,
    shorten_ttl,
    show_stages,
    start_pull,
    update_in_place,
)
from tasks.steps.wait_ready import ReadyResult, wait_ready

# What an in-place deploy raises when the instance cannot take the push: relaunch instead.
# Anything else (a lost lock, the run's budget, AWS refusing a call, a bug) fails the run.
CANNOT_TAKE_THE_PUSH = (UpdateFailed, MigrationFailed, SeedFailed, ProbeFailed, CommandTimeout)


class PreviewFailed(PreviewError):
    """The preview did not become ready; the message carries the diagnosis, ``detail`` what
    the PR's comment says above it."""

    def __init__(
        self, message: str = "", *, diagnosis: str | None = None, detail: str | None = None
    ) -> None:
        self.detail = detail
        super().__init__(message, diagnosis=diagnosis)


@dataclass
class PreviewResult:
    repo: str
    pr_number: int
    sha: str
    status: str
    path: str = ""
    instance_id: str | None = None
    shutdown_at: datetime | None = None
    launched_at: datetime | None = None
    region: str = ""
    replaced: list[str] = field(default_factory=list)
    probe: str = ""
    reason: str = ""
    branch: str = ""  # the PR's head branch, when the event named one
    compose: str | None = field(default=None, repr=False)  # compose_path's file, checked
    image: str = ""  # image:sha@digest, the manifest the check saw and the instance pulled
    database: str = ""  # database: per-preview — the preview's own database and its size
    dns_name: str = ""  # dns_zone_id: pr-<n>.<repo name>.<owner>.<zone> → its private IP
    pinned: bool = False  # the PR carries the keep label: the sweeper keeps it

    def markdown(self) -> str:
        expires = format_time(self.shutdown_at) if self.shutdown_at else "—"
        rows = [
            ("status", self.status),
            ("path", self.path or "—"),
            ("sha", f"`{self.sha}`"),
            ("image", f"`{self.image}`" if self.image else "—"),
            ("database", self.database or "—"),
            ("name", self.dns_name or "—"),
            ("instance", f"`{self.instance_id or '—'}` ({self.region})"),
            ("expires at", expires),
            ("replaced", ", ".join(self.replaced) or "—"),
            ("probe", self.probe or "—"),
            ("reason", self.reason or "—"),
        ]
        lines = [f"## Preview of {self.repo}#{self.pr_number}", "", "| | |", "| --- | --- |"]
        return "\n".join(lines + [f"| {name} | {value} |" for name, value in rows])


@flow(
    name="pr-preview",
    flow_run_name="pr-{pr_number}-{head_sha:.7}",
    on_crashed=[state_hook],
    on_cancellation=[state_hook],
)
def pr_preview(
    repo: str,
    pr_number: int,
    head_sha: str,
    action: str = "synchronize",
    head_repo: str | None = None,
    config: RunOverrides | None = None,
    requested_at: datetime | None = None,
    label: str | None = None,
    labels: list[str] | None = None,
    branch: str | None = None,
    draft: bool = False,
    force: bool = False,
) -> PreviewResult:
    """Give pull request ``repo#pr_number`` a working preview of ``head_sha``.

    ``requested_at`` is when the event behind the run arrived (the trigger passes the event's
    receipt time): it orders previews for ``max_previews``. Without it, the run's scheduled
    start stands in. ``label`` (of a ``labeled`` event) and ``labels`` (the PR's, as the event
    saw them) matter with ``trigger_mode: label`` only. ``branch`` is the PR's head branch
    (``PR_BRANCH`` in the app's environment). ``draft`` is the event's view of the PR, used
    only without a GitHub token. ``force`` (``/preview redeploy``) launches a draft, or a PR
    whose changed files match no ``paths``, anyway.
    """
    check_inputs(repo, pr_number, head_sha)
    settings = run_config(config)
    requested = requested_at or flow_run.get_scheduled_start_time() or datetime.now(UTC)
    with run_budget(settings.preview_timeout_seconds()):
        return _preview(
            settings,
            repo,
            pr_number,
            head_sha,
            action,
            head_repo,
            requested,
            label,
            labels,
            branch,
            draft=draft,
            force=force,
        )


def _preview(
    settings: PreviewConfig,
    repo: str,
    pr_number: int,
    head_sha: str,
    action: str,
    head_repo: str | None,
    requested_at: datetime,
    label: str | None = None,
    labels: list[str] | None = None,
    branch: str | None = None,
    *,
    draft: bool = False,
    force: bool = False,
) -> PreviewResult:
    logger = get_run_logger()
    result = PreviewResult(repo, pr_number, head_sha, status="skipped", region=settings.region)
    result.branch = branch_or_empty(branch)
    if not settings.serves(repo):
        # Before any client exists: no instance, no secret, no comment for a stranger's repo.
        result.status, result.reason = Outcome.NOT_ALLOWED, settings.not_served(repo)
        logger.warning("not launching: %s", result.reason)
        return _ended_as(Outcome.NOT_ALLOWED, result)
    if action == "closed":
        result.reason = "the pull request is closed: nothing is launched"
        logger.info(result.reason)
        return result
    trigger = check_trigger(settings.trigger_mode, settings.preview_label, action, label or None)
    if not trigger.ok:  # a label that asks for nothing: no client, no comment
        assert trigger.verdict is not None
        result.status, result.reason = trigger.verdict, trigger.reason
        logger.info("not launching: %s", trigger.reason)
        return _ended_as(trigger.verdict, result)
    required_label = settings.preview_label if settings.trigger_mode == "label" else None

    clients = build_clients(settings)
    github = github_from_config(settings, ssm=clients.ssm)
    secrets = read_secrets(clients.ssm, settings)
    report = PullRequestReport(
        github,
        settings,
        repo,
        pr_number,
        head_sha,
        run_url=flow_run_url(settings.prefect_ui_url, flow_run.get_id()),
        secrets=secrets.values,
    )

    # Under a backlog: cancel this PR's waiting runs that GitHub has left behind, and do not
    # wait for the PR's lock when this run is one of them.
    superseded = fold_or_go_on(github, repo, pr_number, head_sha)
    if superseded is not None:
        with github:
            report.skipped(Outcome.SUPERSEDED.state_name, superseded)
        result.status, result.reason = Outcome.SUPERSEDED, superseded
        logger.info("not launching: %s", superseded)
        return _ended_as(Outcome.SUPERSEDED, result)

    lease, wait = settings.lock_lease_seconds, settings.lock_wait_seconds
    with (
        github,
        report.check_run(),
        hold(pr_lock_name(repo, pr_number), lease_seconds=lease, timeout_seconds=wait),
    ):
        # 0. Guards: a closed PR, a draft, a fork not allow-listed (or its commit not approved),
        #    a newer push, or changed files that ask for no preview launch nothing (``force``:
        #    drafts and paths do).
        try:
            verdict = guard(
                github,
                repo,
                pr_number,
                head_sha,
                head_repo or None,
                settings.allowed_fork_repos,
                required_label,
                labels,
                skip_drafts=settings.skip_drafts and not force,
                event_draft=draft,
                fork_previews=settings.fork_previews,
            )
            pull_labels = verdict.labels  # the keep label's, after the deploy
            if verdict.ok and not force:
                verdict = check_paths(
                    github, repo, pr_number, settings.paths, settings.paths_ignore
                )
        except Exception as exc:
            with grace():
                report.tell(
                    PreviewState.FAILED, diagnosis=f"could not read the pull request: {exc}"
                )
            raise
        if not verdict.ok:
            outcome = verdict.verdict
            assert outcome is not None
            result.status, result.reason = outcome, verdict.reason
            logger.info("not launching: %s", verdict.reason)
            if outcome is Outcome.REFUSED_FORK:
                report.tell(PreviewState.REFUSED, detail=verdict.reason)
            elif outcome is Outcome.AWAITING_APPROVAL:
                report.tell(PreviewState.AWAITING_APPROVAL, detail=verdict.reason)
            elif outcome is Outcome.NO_MATCHING_PATHS:
                report.tell(PreviewState.SKIPPED, detail=verdict.reason)
            else:
                report.skipped(outcome.state_name, verdict.reason)
            return _ended_as(outcome, result)

        report.tell(PreviewState.LAUNCHING)
        try:
            if settings.compose_path:  # the repository's own, checked before anything launches
                result.compose = fetch_compose(github, settings, repo, head_sha)
            report.services = service_names(settings, result.compose)
            report.variables = tuple(sorted([*_app_env(settings, result).env, "DATABASE_URL"]))
            try:
                _deploy(clients, settings, result, secrets.ghcr_token, requested_at)
            finally:
                report.database = result.database or None
        except NoRoom as exc:
            result.status, result.reason = Outcome.NO_ROOM, str(exc)
            logger.info("not launching: %s", exc)
            report.tell(PreviewState.REFUSED, detail=f"No room for this preview: {exc}.")
            return _ended_as(Outcome.NO_ROOM, result)
        except Exception as exc:
            result.status = "failed"
            diagnosis = exc.diagnosis if isinstance(exc, PreviewError) else str(exc)
            with grace():
                report.tell(
                    PreviewState.FAILED,
                    instance_id=result.instance_id,
                    expires_at=result.shutdown_at,
                    diagnosis=diagnosis,
                    detail=exc.detail if isinstance(exc, PreviewFailed) else None,
                )
            if result.instance_id:
                emit_instance_event(
                    "failed", result.instance_id, repo, pr_number, sha=head_sha, reason=str(exc)
                )
            _published(result)
            raise

        # 5. Pinned while the PR carries the keep label; its name in the VPC (dns_zone_id).
        _pin_and_name(clients, settings, result, report, pull_labels)

        # 6. Tell the pull request where its preview is.
        state = PreviewState.UPDATED if result.path == "in-place" else PreviewState.READY
        report.tell(
            state,
            instance_id=result.instance_id,
            expires_at=result.shutdown_at,
            launched_at=result.launched_at,
        )
        emit_instance_event(
            "ready", result.instance_id or "", repo, pr_number, sha=head_sha, path=result.path
        )
        return _published(result)


def _deploy(
    clients: AwsClients,
    settings: PreviewConfig,
    result: PreviewResult,
    ghcr_token: str | None,
    requested_at: datetime,
) -> None:
    """Steps 1–4; fills ``result`` as it goes so a failure still says what exists.
    ``requested_at`` (when the event arrived) orders previews by recency."""
    repo, pr_number, sha = result.repo, result.pr_number, result.sha
    logger = get_run_logger()

    # 0. A push to a sleeping preview wakes it (start, agent, timer, app answering): the push
    #    then deploys on it in place, as on any running preview — no new instance.
    _wake_for_push(clients, settings, repo, pr_number)

    # 1. The build-image check, beside what the path needs: with a running preview of an older
    #    sha, its health (an in-place deploy launches nothing, so preflight waits until a
    #    launch is needed); else preflight — waited for before the claim only without warm
    #    spares: a claimed spare launches nothing either (step 3).
    #    Every pull below names the manifest digest the check saw, not the tag.
    instance_id = in_place_candidate(clients.ec2, settings, repo, pr_number, sha)
    # database: per-preview — its database beside the image check, before anything launches.
    creating = None
    if settings.database == "per-preview":
        creating = create_database.submit(clients, settings, repo, pr_number)
    image = check_image.submit(settings, repo, pr_number, sha, ghcr_token, ecr=clients.ecr)
    try:
        if instance_id:
            checking = preview_health.submit(clients, settings, instance_id)
            digest = image.result().digest
            # The image exists: its instance starts pulling it while the health check runs.
            start_pull(clients, settings, instance_id, repo, sha, digest)
            health = checking.result()
            checked = None
        else:
            checked = preflight.submit(clients, settings, key=f"pr-{pr_number}-preflight")
            if not settings.warm_spares:
                checked.result()  # a launch's own checks fail first, as before the image's
            digest = image.result().digest
        database = creating.result() if creating is not None else None
    except Exception:
        with grace():
            _drop_new_database(clients, settings, result, creating)
        raise
    if database is not None:
        result.database = f"`{database.name}` ({database.size()})"
    result.image = settings.pinned_image(repo, sha, digest)

    # 2. In place: the PR's instance runs a healthy older sha → deploy the new one on it.
    replaced: list[str] = []
    if instance_id:
        if health.healthy:
            try:
                result.instance_id = instance_id
                _deploy_in_place(clients, settings, result, digest, database)
                result.status, result.path = "ready", "in-place"
                return
            except CANNOT_TAKE_THE_PUSH as exc:
                if isinstance(exc, UpdateFailed) and exc.kept_serving:
                    with grace():
                        raise _kept_serving(clients, settings, result, exc) from exc
                logger.warning("in-place update of %s failed (%s): relaunching", instance_id, exc)
                # Its tags may already name the new sha: launch must not take it over.
                terminate_instance(clients.ec2, settings, instance_id)
                replaced.append(instance_id)
        else:
            logger.info("%s is not healthy (%s): relaunching", instance_id, health.reason)

    # 3. Terminate this PR's old instance, evict beyond max_previews, then claim a warm spare
    #    or launch — one fleet change at a time. With warm spares, preflight (still running
    #    beside the claim) is waited for only when nothing was claimed: its checks are about
    #    launching, and a claim matches spares against the AMI it resolves itself.
    if checked is None:
        checked = preflight.submit(clients, settings, key=f"pr-{pr_number}-preflight")
    account = None if settings.warm_spares else checked.result()
    spec = LaunchSpec(repo, pr_number, sha, requested_at, result.branch, result.compose, digest)
    lease, wait = settings.lock_lease_seconds, settings.lock_wait_seconds
    with hold(FLEET_LOCK, lease_seconds=lease, timeout_seconds=wait):
        terminated = terminate(
            clients.ec2, settings, repo, pr_number, keep_sha=sha, requested_at=requested_at
        )
        result.replaced = replaced + terminated.instance_ids
        claimed = claim(clients, settings, spec, None) if settings.warm_spares else None
        if claimed is None or claimed.instance_id is None:
            account = account or checked.result()
            launched = launch(
                clients.ec2,
                settings,
                spec,
                ami_id=account.ami_id,
                subnet_id=account.subnet_id,
                attempt_key=str(flow_run.get_id() or ""),
            )
    if claimed is not None and claimed.instance_id is not None:
        _deploy_on_spare(clients, settings, result, claimed.instance_id, digest, database)
        _launches_would_fail(checked)
        return
    result.instance_id, result.shutdown_at = launched.instance_id, launched.shutdown_at
    result.launched_at = launched.launched_at
    result.path = "reused" if launched.reused else "launched"
    if not launched.reused:
        emit_instance_event(
            "launched",
            launched.instance_id,
            repo,
            pr_number,
            sha=sha,
            shutdown_at=format_time(launched.shutdown_at),
        )

    # 4. Ready only when the app answers inside the instance and the migrations ran. The user
    #    data migrated on boot (unless it could not reach the database): wait-ready's command
    #    says so and then probes as well — unless a seed must run between the two.
    try:
        if database is not None:  # before the boot reads it: only this instance may
            hand_over_database(clients, settings, database, launched.instance_id)
        seeding = _seeds(settings, database)
        ready_ttl = None if seeding else timer_minutes(settings.ttl_hours)
        ready = wait_ready(clients, settings, launched.instance_id, ready_ttl_minutes=ready_ttl)
        # Optional (runbook §2.5, off by default): the public IP/32 on db-sg before migrating.
        open_db_access(clients.ec2, settings, launched.instance_id)
        _migrate_and_probe(clients, settings, result, ready, database=database)
    except Exception as exc:
        with grace():
            raise _failed_after_launch(clients, settings, result, exc) from exc
    result.status = "ready"


def _pin_and_name(
    clients: AwsClients,
    settings: PreviewConfig,
    result: PreviewResult,
    report: PullRequestReport,
    labels: tuple[str, ...] | None,
) -> None:
    """The ready preview pinned or not as its labels say, and named: neither is what makes it
    ready, so a failure is logged and the sweeper's next pass heals both."""
    instance_id = result.instance_id or ""
    logger = get_run_logger()
    try:
        pinned = follow_label(
            clients, settings, instance_id, None if labels is None else list(labels)
        )
    except Exception as exc:
        logger.warning("the keep label's pin of %s not set: %s", instance_id, exc)
    else:
        result.pinned = bool(pinned)
        report.pinned_by = settings.keep_label if pinned else None
    try:
        name = publish_name(clients, settings, result.repo, result.pr_number, instance_id)
    except Exception as exc:
        logger.warning("no name in the VPC for %s: %s", instance_id, exc)
    else:
        result.dns_name = name or ""
        report.dns_name = name


def _wake_for_push(
    clients: AwsClients, settings: PreviewConfig, repo: str, pr_number: int
) -> str | None:
    """Start the PR's one sleeping preview; None (and the run launches instead) when there is
    none or it cannot wake (past its TTL, its agent or app never answering)."""
    asleep = sleeping_previews(clients, settings, repo=repo, pr_number=pr_number)
    if len(asleep) != 1:
        return None
    instance_id = asleep[0].instance_id
    try:
        wake(clients, settings, instance_id)
        probe(clients, settings, instance_id)
    except (WakeFailed, ProbeFailed) as exc:
        get_run_logger().warning("%s did not wake healthy (%s): relaunching", instance_id, exc)
        return None
    emit_instance_event("woke", instance_id, repo, pr_number, by="push")
    return instance_id


def _launches_would_fail(checked: PrefectFuture[PreflightReport]) -> None:
    """After a claimed spare served the PR: preflight's verdict, which no launch waited for,
    as a warning — a launch (the next PR with no spare left) would fail on it."""
    report = checked.result(raise_on_failure=False)
    if isinstance(report, BaseException):
        get_run_logger().warning("a spare served this PR, but launches would fail: %s", report)


def _deploy_on_spare(
    clients: AwsClients,
    settings: PreviewConfig,
    result: PreviewResult,
    instance_id: str,
    digest: str,
    database: PreviewDatabase | None,
) -> None:
    """A claimed spare: deployed as a push deploys in place (pulling ``digest``, the checked
    manifest), with a launch's guarantees (the short TTL until ready, the diagnosis on failure).
    Its replacement is asked for, not waited for."""
    result.instance_id, result.path = instance_id, "spare"
    emit_instance_event("spare.claimed", instance_id, result.repo, result.pr_number, sha=result.sha)
    try:
        if database is not None:  # the deploy below reads it
            hand_over_database(clients, settings, database, instance_id)
        open_db_access(clients.ec2, settings, instance_id)
        _deploy_in_place(clients, settings, result, digest, database)
    except Exception as exc:
        with grace():
            raise _failed_after_launch(clients, settings, result, exc) from exc
    result.status = "ready"


def _deploy_in_place(
    clients: AwsClients,
    settings: PreviewConfig,
    result: PreviewResult,
    digest: str,
    database: PreviewDatabase | None,
) -> None:
    """One command on ``result.instance_id`` pulls, migrates, swaps, probes and re-arms the
    timer; each stage it reports shows as its own task run. Then the seed (when this deploy
    seeds) and the full TTL's tag."""
    instance_id = result.instance_id or ""
    seeding = _seeds(settings, database)
    ready_ttl = None if seeding else timer_minutes(settings.ttl_hours)
    try:
        updated = update_in_place(
            clients,
            settings,
            instance_id,
            result.repo,
            result.sha,
            digest,
            _app_env(settings, result),
            ready_ttl_minutes=ready_ttl,
        )
    except UpdateFailed as exc:
        show_stages(exc.stages, wait=True)
        raise
    show_stages(updated.stages)
    result.shutdown_at, result.launched_at = updated.shutdown_at, updated.launched_at
    if seeding:
        seed(clients, settings, instance_id)
    path, _, answer = updated.probe.partition(" ")
    status, _, latency = answer.partition(" ")
    result.probe = f"{path} → {status} in {float(latency or 0):.2f} s"
    result.shutdown_at = confirm_ttl(
        clients, settings, instance_id, timer_moved=updated.timer_moved
    )


def _app_env(settings: PreviewConfig, result: PreviewResult) -> AppFiles:
    env = preview_env(settings, result.repo, result.pr_number, result.sha, result.branch)
    parameter = None
    if settings.database == "per-preview":
        parameter = settings.database_parameter(database_name(result.repo, result.pr_number))
    return AppFiles(env, result.compose, parameter)


def _seeds(settings: PreviewConfig, database: PreviewDatabase | None) -> bool:
    """Whether this deploy runs ``seed_command``: with a database of the preview's own, only
    on a database just made (a clone of the template only with ``seed_on_template``) or with
    ``seed_on_every_deploy``; otherwise the seed step's own once-per-instance rule decides."""
    if not settings.seed_command:
        return False
    if database is None or settings.seed_on_every_deploy:
        return True
    return database.created and (not database.from_template or settings.seed_on_template)


def _drop_new_database(
    clients: AwsClients,
    settings: PreviewConfig,
    result: PreviewResult,
    creating: PrefectFuture[PreviewDatabase] | None,
) -> None:
    """Nothing launched: a database this run made goes again (one it kept stays)."""
    if creating is None:
        return
    try:
        made = creating.result()
    except Exception:
        return  # not made, or its own failure already said why
    if made.created:
        drop_database(clients, settings, result.repo, result.pr_number)


def _failed_after_launch(
    clients: AwsClients, settings: PreviewConfig, result: PreviewResult, error: Exception
) -> PreviewFailed:
    """Keep the instance for debugging on the short TTL, say why it failed (runbook §7, §9)."""
    logger = get_run_logger()
    instance_id = result.instance_id or ""
    if isinstance(error, LockLost):
        # Another run may own the PR now: change nothing. The launch tagged the short TTL.
        return PreviewFailed(str(error))
    summary = str(error)
    try:
        diagnosis = diagnose(
            clients,
            settings,
            instance_id,
            error=str(error),
            artifact_key=f"pr-{result.pr_number}-diagnosis",
        )
        summary = diagnosis.summary()
    except Exception as exc:
        logger.warning("no diagnosis of %s: %s", instance_id, exc)
    try:
        change = shorten_ttl(clients, settings, instance_id)
        result.shutdown_at = change.after
    except Exception as exc:
        # The short TTL could not be set: do not leave a long-lived instance behind.
        logger.error("shutdown-at of %s not shortened (%s): terminating it", instance_id, exc)
        terminate_instance(clients.ec2, settings, instance_id)
        result.shutdown_at = None
    return PreviewFailed(f"{type(error).__name__}: {error} — {summary}", diagnosis=summary or None)


def _kept_serving(
    clients: AwsClients, settings: PreviewConfig, result: PreviewResult, error: UpdateFailed
) -> PreviewFailed:
    """A push whose new version never answered beside the running one: that one keeps serving,
    untouched, and nothing is relaunched. The failure policy holds as for any failed deploy
    (diagnosis, the short TTL), and the comment says what still serves and until when."""
    failed = _failed_after_launch(clients, settings, result, error)
    expires = f" until {format_time(result.shutdown_at)}" if result.shutdown_at else ""
    failed.detail = (
        f"The new version did not answer, so it was not switched to: the previous version"
        f" (`{(error.previous_sha or 'unknown')[:12]}`) keeps serving{expires}, and"
        f" `pr-preview tunnel {result.pr_number}` reaches it. Push a fix to deploy it in place."
    )
    return failed


def _migrate_and_probe(
    clients: AwsClients,
    settings: PreviewConfig,
    result: PreviewResult,
    ready: ReadyResult | None = None,
    *,
    database: PreviewDatabase | None = None,
) -> None:
    """Migrate, seed, probe, full TTL after a launch. ``ready``: its wait-ready, whose command
    may have found the image migrated on boot and probed it."""
    instance_id = result.instance_id or ""
    if ready is None or not ready.migrated:
        migrate(clients, settings, instance_id)
    if _seeds(settings, database):
        seed(clients, settings, instance_id)
    # The command that sees the app healthy moves the on-instance timer to the full TTL.
    ready_ttl = timer_minutes(settings.ttl_hours)
    answer: ProbeResult | None = ready.probe if ready is not None else None
    if answer is None:
        answer = probe(clients, settings, instance_id, ready_ttl_minutes=ready_ttl)
    result.probe = f"{answer.path} → {answer.status_code} in {answer.latency_seconds or 0:.2f} s"
    # Ready: only now does the preview get its full TTL (it ran on the short one until here).
    result.shutdown_at = confirm_ttl(clients, settings, instance_id, timer_moved=answer.timer_moved)


def _ended_as(outcome: Outcome, result: PreviewResult) -> PreviewResult:
    """A run that rightly launched nothing: Completed, named after why (Superseded, Closed…).

    Prefect unwraps a returned state: a caller gets ``result``, the UI shows the name.
    """
    if outcome.run_name_suffix:
        rename_run(outcome.run_name_suffix)
    state: State[PreviewResult] = Completed(
        name=outcome.state_name,
        message=result.reason,
        data=_published(result),
    )
    return cast(PreviewResult, state)


def _published(result: PreviewResult) -> PreviewResult:
    create_markdown_artifact(
        markdown=result.markdown(), key=f"pr-{result.pr_number}-preview", description="pr-preview"
    )
    return result
