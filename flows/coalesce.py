"""Fewer runs when deliveries outpace the workers: a PR's waiting runs that GitHub has
already left behind are cancelled before they start.

Under a backlog every push to a PR waits as a Scheduled run of the ``pr-preview`` deployment,
and each would start an interpreter (seconds of CPU) only to read the PR and end Superseded.
The first of them a worker starts looks at its PR's runs still waiting (Scheduled: no worker
has taken them). When there are some, it reads the PR's head from GitHub — the same truth the
guard reads — and cancels every waiting run of another sha: each would have ended Superseded.
When its own sha is not the head either, it ends Superseded at once, before waiting for the
PR's lock.

Nothing is lost: a run at the PR's head is never cancelled (whatever order the trigger made
the runs in), and a run a worker has taken (Pending, Running) is left alone, even one taken
while this run looked (:func:`_cancel_waiting`). Without a GitHub token or App nothing is
folded (there is no head to compare with), and when the Prefect API or GitHub cannot answer
the run goes on as before: folding is an optimisation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

from tasks.run.outcome import Outcome
from tasks.run.prefect_context import run_logger

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from tasks.github.client import GitHub

logger = logging.getLogger(__name__)

PAGE = 200
SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a whole SHA-1 or SHA-256 commit id


@dataclass(frozen=True)
class Queued:
    """One waiting run of the deployment, as its trigger filled its parameters."""

    id: UUID
    repo: str
    pr_number: str
    head_sha: str

    @classmethod
    def of(cls, run_id: UUID, parameters: Mapping[str, Any]) -> Queued:
        return cls(
            run_id,
            str(parameters.get("repo") or ""),
            str(parameters.get("pr_number") or ""),
            str(parameters.get("head_sha") or ""),
        )


@dataclass
class Folded:
    """What :func:`fold_waiting` found and did."""

    superseded: str | None = None  # why this run is superseded, when GitHub says it is
    cancelled: list[Queued] = field(default_factory=list)


def fold_waiting(github: GitHub, me: FlowRun, repo: str, pr_number: int, head_sha: str) -> Folded:
    """Cancel this PR's waiting runs of a sha other than the PR's head; say whether this run
    (``me``, started, at ``head_sha``) is superseded too."""
    from prefect.client.orchestration import get_client

    folded = Folded()
    if me.deployment_id is None or not github.enabled:
        return folded
    with get_client(sync_client=True) as client:
        waiting = [
            run
            for run in _waiting(client, me.deployment_id)
            if run.repo == repo and run.pr_number == str(pr_number) and run.id != me.id
        ]
        if not waiting:
            return folded
        head = str((github.get_pull(repo, pr_number).get("head") or {}).get("sha") or "")
        if not head:
            return folded
        for run in waiting:
            if run.head_sha != head and _cancel_waiting(client, run.id, head):
                folded.cancelled.append(run)
    if head != head_sha:
        folded.superseded = (
            f"pull request #{pr_number} now points at {head[:12]}, not {head_sha[:12]}: the run"
            " for the newer push takes over (seen before this run waited for the PR's lock)"
        )
    return folded


def _cancel_waiting(client: Any, run_id: UUID, head: str) -> bool:
    """Cancel waiting run ``run_id`` unless a worker takes it first.

    A run is taken the way a worker takes it, Scheduled → Pending, which the server grants to
    one caller only (it refuses Pending → Pending and Running → Pending): a run a worker took
    meanwhile stays the worker's. Taken, it is cancelled — no process was ever started."""
    from prefect.client.schemas.objects import State
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Cancelled, Pending, Scheduled

    taken = client.set_flow_run_state(run_id, Pending(message="taken to be cancelled"))
    if taken.status != SetStateStatus.ACCEPT:
        return False
    state: State[Any] = Cancelled(
        name=Outcome.SUPERSEDED.state_name,
        message=f"superseded before it started: the pull request points at {head[:12]} now",
    )
    try:
        client.set_flow_run_state(run_id, state, force=True)
    except Exception:
        # Never leave it Pending: no worker would take it, and it would hold a pool slot.
        client.set_flow_run_state(run_id, Scheduled(), force=True)
        raise
    return True


def _waiting(client: Any, deployment_id: UUID) -> Iterator[Queued]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    waiting = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
    )
    offset = 0
    while True:
        page = client.read_flow_runs(
            flow_run_filter=waiting,
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=PAGE,
            offset=offset,
        )
        for run in page:
            yield Queued.of(run.id, run.parameters)
        if len(page) < PAGE:
            return
        offset += PAGE


def fold_or_go_on(github: GitHub, repo: str, pr_number: int, head_sha: str) -> str | None:
    """:func:`fold_waiting` for this flow run, logged: why it is superseded, if it is. A run
    started without a deployment (by hand, in tests) folds nothing."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    log = run_logger(logger)
    try:
        folded = fold_waiting(github, context.flow_run, repo, pr_number, head_sha)
    except Exception as exc:  # an optimisation: never a reason to fail the run
        log.warning("could not fold this PR's waiting runs (%s): going on", exc)
        return None
    if folded.cancelled:  # the shas are the webhooks' own: only what looks like one is logged
        shas = ", ".join(
            run.head_sha[:7] if SHA.fullmatch(run.head_sha) else "?" for run in folded.cancelled
        )
        log.info(
            "cancelled %d waiting run(s) of this PR, left behind: %s", len(folded.cancelled), shas
        )
    return folded.superseded
