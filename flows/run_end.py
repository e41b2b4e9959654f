"""The truth about a run that died: crashed (its process killed), cancelled, or timed out.

A run that fails tells its pull request itself. One that is killed cannot, so this reports for
it — from the flows' ``on_crashed``/``on_cancellation`` hooks (client-side, run by a process
worker or ``flow.serve``) and from the ``pr-crash-report`` deployment that a Prefect automation
starts when a run enters Crashed (server-side: ECS and Kubernetes workers run no hooks). Both
say the same thing, so the second report only repeats the first.

It reads what the dead run left from the tags (the PR's live instances and their
``shutdown-at``: a run that died before its preview was ready left it on the short TTL), edits
the sticky comment, marks the GitHub deployment ``error`` (crashed) or ``inactive``
(cancelled) and emits ``pr-preview.failed``. It releases nothing: the dead run's locks end with
their leases.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tasks.cloud.aws import build_clients
from tasks.cloud.instances import Preview, find_previews
from tasks.cloud.tags import format_time
from tasks.config import TUNING_FIELDS, PreviewConfig, load_config
from tasks.github.client import github_from_config, latest_deployment_id
from tasks.github.pull_request import PreviewState, flow_run_url
from tasks.inputs import is_repo, is_sha
from tasks.run.events import emit_instance_event, pr_resource
from tasks.run.prefect_context import run_logger
from tasks.steps.report import PullRequestReport

logger = logging.getLogger(__name__)

# on_cancellation hooks are handed the Cancelling state (the run is not Cancelled yet).
ENDINGS = {
    "CRASHED": PreviewState.CRASHED,
    "CANCELLING": PreviewState.CANCELLED,
    "CANCELLED": PreviewState.CANCELLED,
}
ENDING_WORDS = {PreviewState.CRASHED: "crashed", PreviewState.CANCELLED: "was cancelled"}


@dataclass(frozen=True)
class RunEnd:
    """What was reported about one dead run."""

    repo: str
    pr_number: int
    state: PreviewState
    left: list[str]
    comment: str


def _pull_request(parameters: Mapping[str, Any]) -> tuple[str, int, str | None] | None:
    repo, number, sha = (
        parameters.get("repo"),
        parameters.get("pr_number"),
        parameters.get("head_sha"),
    )
    if not isinstance(repo, str) or not is_repo(repo):
        return None
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        return None
    return repo, number, sha if isinstance(sha, str) and is_sha(sha) else None


def _config(parameters: Mapping[str, Any]) -> PreviewConfig:
    """The Variable and the environment, with the dead run's tuning: as the run itself read its
    configuration, whose trusted fields no run's parameters set (``tasks.config.run_config``).
    Its stored parameters may name every field (a run started in-process stores its config
    whole), so only the tuning fields are taken from them."""
    given = parameters.get("config")
    if isinstance(given, PreviewConfig):
        given = given.model_dump(exclude_unset=True)
    values = given if isinstance(given, Mapping) else {}
    return load_config({name: value for name, value in values.items() if name in TUNING_FIELDS})


def _left_behind(previews: list[Preview]) -> str:
    if not previews:
        return "It left no instance running."
    described = ", ".join(
        f"`{p.instance_id}` (sha {str(p.sha)[:7]}, expires at "
        f"{format_time(p.shutdown_at) if p.shutdown_at else 'no readable shutdown-at'})"
        for p in previews
    )
    return (
        f"It left {described}; the instance terminates itself at that time, the TTL sweeper"
        " removes it otherwise, and the next push launches a fresh preview."
    )


def report_run_end(
    flow_name: str,
    parameters: Mapping[str, Any],
    state_type: str,
    *,
    run_id: object | None,
    message: str | None = None,
) -> RunEnd | None:
    """Tell the PR that its run ``state_type`` (CRASHED, CANCELLING or CANCELLED); None if not
    ours to say."""
    log = run_logger(logger)
    ending = ENDINGS.get(state_type.upper())
    found = _pull_request(parameters)
    if ending is None or found is None:
        log.info("no pull request to tell about this %s run", state_type.lower())
        return None
    repo, pr_number, sha = found
    settings = _config(parameters)
    if not settings.serves(repo):  # a run's parameters name the repository: check it first
        log.warning("not telling %s#%d: %s", repo, pr_number, settings.not_served(repo))
        return None
    clients = build_clients(settings)
    left = find_previews(clients.ec2, settings.purpose_tag, repo=repo, pr_number=pr_number)
    mine = [p for p in left if sha is None or p.sha == sha] or left
    what = "teardown" if flow_name == "pr-teardown" else "preview"
    why = f" ({message})" if message else ""
    detail = f"The {what} run {ENDING_WORDS[ending]}{why}. {_left_behind(left)}"

    github = github_from_config(settings, ssm=clients.ssm)
    with github:
        report = PullRequestReport(
            github,
            settings,
            repo,
            pr_number,
            sha,
            run_url=flow_run_url(settings.prefect_ui_url, run_id),
        )
        if sha is not None and ending is PreviewState.CRASHED:
            report.deployment_id = latest_deployment_id(github, repo, pr_number, sha)
        first = mine[0] if mine else None
        body = report.tell(
            ending,
            instance_id=first.instance_id if first else None,
            expires_at=first.shutdown_at if first else None,
            detail=detail,
        )
    reason = f"the {what} run {ENDING_WORDS[ending]}{why}"
    for preview in mine:
        emit_instance_event(
            "failed", preview.instance_id, repo, pr_number, sha=preview.sha, reason=reason
        )
    if not mine:
        from prefect.events import emit_event

        emit_event(
            event="pr-preview.failed",
            resource=pr_resource(repo, pr_number),
            payload={"repo": repo, "pr_number": pr_number, "sha": sha, "reason": reason},
        )
    log.info("told %s#%d: %s", repo, pr_number, reason)
    return RunEnd(repo, pr_number, ending, [p.instance_id for p in left], body)


def state_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_crashed`` / ``on_cancellation`` of the preview and teardown flows; never raises."""
    try:
        report_run_end(
            flow.name,
            flow_run.parameters or {},
            str(state.type.value),
            run_id=flow_run.id,
            message=state.message,
        )
    except Exception as exc:  # a hook must not hide the run's own end
        run_logger(logger).warning("could not tell the pull request: %s", exc)
