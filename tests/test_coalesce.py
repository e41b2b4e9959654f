"""A PR's waiting runs that GitHub has left behind are cancelled (flows/coalesce.py), on a real
Prefect server and the fake GitHub: what is cancelled, what is left, what a worker took first."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.states import Pending, Running

from flows.coalesce import Folded, _cancel_waiting, fold_waiting
from tasks.github.client import GitHub
from tests.fakes.github import FakeGitHub

REPO = "octo-org/hello-api"
pytestmark = pytest.mark.usefixtures("prefect_server")


@dataclass
class Queue:
    client: SyncPrefectClient
    deployment_id: UUID
    fake: FakeGitHub

    def push(self, pr: int, sha: str, action: str = "synchronize") -> UUID:
        """A run as the trigger makes it: Scheduled, its parameters templated as strings; and
        GitHub's PR pointing at the push."""
        self.fake.add_pull(REPO, {"number": pr, "state": "open", "head": {"sha": sha * 40}})
        parameters = {"repo": REPO, "pr_number": str(pr), "head_sha": sha * 40, "action": action}
        run = self.client.create_flow_run_from_deployment(self.deployment_id, parameters=parameters)
        return run.id

    def start(self, run_id: UUID) -> Any:
        """Taken and started by a worker: what the running run knows of itself."""
        self.client.set_flow_run_state(run_id, Pending())
        self.client.set_flow_run_state(run_id, Running())
        return self.client.read_flow_run(run_id)

    def state(self, run_id: UUID) -> tuple[str, str]:
        state = self.client.read_flow_run(run_id).state
        assert state is not None
        return state.type.value, state.name or ""

    def fold(self, me: Any, token: str | None = "good-token") -> Folded:
        github = GitHub(token, transport=self.fake.transport, sleep=lambda s: None)
        return fold_waiting(github, me, REPO, 7, me.parameters["head_sha"])


@pytest.fixture
def queue() -> Iterator[Queue]:
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("pr-preview")
        deployment_id = client.create_deployment(
            flow_id=flow_id,
            name=f"coalesce-{uuid.uuid4().hex[:8]}",
            entrypoint="flows/preview.py:pr_preview",
        )
        yield Queue(client, deployment_id, FakeGitHub())


def test_the_first_run_to_start_cancels_the_waiting_runs_github_left_behind(
    queue: Queue,
) -> None:
    opened = queue.push(7, "a", action="opened")
    me = queue.start(queue.push(7, "b"))
    between, newest = queue.push(7, "c"), queue.push(7, "d")  # GitHub: the PR is at d
    other_pr = queue.push(8, "e")

    folded = queue.fold(me)

    assert folded.superseded is not None and "dddddddddddd" in folded.superseded
    assert {run.id for run in folded.cancelled} == {opened, between}
    for run_id in (opened, between):
        assert queue.state(run_id) == ("CANCELLED", "Superseded")
    state = queue.client.read_flow_run(between).state
    assert state is not None and "points at dddddddddddd" in (state.message or "")
    assert queue.state(newest) == ("SCHEDULED", "Scheduled")  # the head's run is never cancelled
    assert queue.state(other_pr) == ("SCHEDULED", "Scheduled")
    assert queue.state(me.id) == ("RUNNING", "Running")


def test_the_heads_run_is_kept_whatever_order_the_runs_were_made_in(queue: Queue) -> None:
    head = queue.push(7, "d")
    older = [queue.push(7, sha) for sha in "abc"]  # made after the head's run, older pushes
    me = queue.start(queue.push(7, "e"))
    queue.fake.add_pull(REPO, {"number": 7, "state": "open", "head": {"sha": "d" * 40}})  # back

    folded = queue.fold(me)

    assert folded.superseded is not None
    assert sorted(run.head_sha[0] for run in folded.cancelled) == ["a", "b", "c"]
    assert all(queue.state(run_id)[0] == "CANCELLED" for run_id in older)
    assert queue.state(head) == ("SCHEDULED", "Scheduled")


def test_the_runs_at_the_head_go_on_and_nothing_folds_without_github(queue: Queue) -> None:
    older = queue.push(7, "a", action="opened")
    me = queue.start(queue.push(7, "b"))
    labeled = queue.push(7, "b", action="labeled")  # the same sha: its run is not left behind

    assert queue.fold(me, token=None) == Folded()  # no token: no head to compare with
    assert queue.state(older) == ("SCHEDULED", "Scheduled")

    folded = queue.fold(me)
    assert folded.superseded is None
    assert [run.id for run in folded.cancelled] == [older]
    assert queue.state(labeled) == ("SCHEDULED", "Scheduled")


def test_a_run_a_worker_took_first_stays_the_workers(queue: Queue) -> None:
    taken = queue.push(7, "a")
    queue.client.set_flow_run_state(taken, Pending())  # the worker's claim came first

    assert _cancel_waiting(queue.client, taken, "b" * 40) is False
    assert queue.state(taken) == ("PENDING", "Pending")
    running = queue.start(queue.push(7, "c")).id
    assert _cancel_waiting(queue.client, running, "b" * 40) is False
    assert queue.state(running) == ("RUNNING", "Running")


def test_a_run_taken_but_not_cancelled_goes_back_to_the_queue(queue: Queue) -> None:
    waiting = queue.push(7, "a")

    class Refusing:
        """The server answers the take, then fails the cancel."""

        def set_flow_run_state(self, run_id: UUID, state: Any, force: bool = False) -> Any:
            if state.is_cancelled():
                raise RuntimeError("503 Service Unavailable")
            return queue.client.set_flow_run_state(run_id, state, force=force)

    with pytest.raises(RuntimeError, match="503"):
        _cancel_waiting(Refusing(), waiting, "b" * 40)
    # Not left Pending (no worker would take it, and it would hold a pool slot): a worker can.
    assert queue.state(waiting) == ("SCHEDULED", "Scheduled")
