"""The report about a dead run: it goes only to a repository that pr-preview serves."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flows.run_end import report_run_end
from tasks.config import PreviewConfig
from tests.fakes.github import FakeGitHub, served_github


@pytest.fixture
def github(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    with served_github(monkeypatch) as fake:
        yield fake


@pytest.mark.parametrize("state", ["CRASHED", "CANCELLED"])
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
