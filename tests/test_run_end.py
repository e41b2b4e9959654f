"""The report about a dead run: it goes only to a repository that pr-preview serves."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flows.run_end import report_run_end
from local_stack.prefect_server import pull_request_payload
from tasks.config import PreviewConfig
from tasks.github.pull_request import PreviewState
from tests.fakes.github import FakeGitHub, served_github


@pytest.fixture
def github(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    with served_github(monkeypatch) as fake:
        yield fake


@pytest.mark.parametrize("state", ["CRASHED", "CANCELLING", "CANCELLED"])
def test_a_dead_run_of_a_repository_not_served_tells_nobody(
    config: PreviewConfig, github: FakeGitHub, state: str
) -> None:
    """Run parameters can name any repository; the report posts only where previews run."""
    assert not config.serves("evil-org/app")
    parameters = {"repo": "evil-org/app", "pr_number": 14, "head_sha": "f" * 40}

    told = report_run_end("pr-preview", parameters, state, run_id=None, message="killed")

    assert told is None
    assert github.requests == []
    assert github.comment_bodies("evil-org/app", 14) == []


@pytest.mark.usefixtures("prefect_server")  # the report's artifact and event
def test_a_run_being_cancelled_tells_its_pr_it_was_cancelled(
    config: PreviewConfig, github: FakeGitHub
) -> None:
    """An on_cancellation hook is handed the Cancelling state: that is the run's end too."""
    parameters = {"repo": "octo-org/app", "pr_number": 15, "head_sha": "e" * 40}
    github.add_pull(
        "octo-org/app", pull_request_payload("opened", "octo-org/app", 15, "e" * 40)["pull_request"]
    )

    told = report_run_end("pr-preview", parameters, "CANCELLING", run_id=None, message="by hand")

    assert told is not None and told.state is PreviewState.CANCELLED
    [body] = github.comment_bodies("octo-org/app", 15)
    assert "⏹ Preview run cancelled" in body and "(by hand)" in body, body
