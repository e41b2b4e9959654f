"""Fork approval (``fork_previews: approve``): which commit of a fork's pull request may run, and
where the approval is kept.

Pure decisions over GitHub's pull request, and the approval's Prefect Variable on the test
server; the flows around them (a fork waits, a writer approves, a push waits again) are in
tests/test_preview_github.py, and one delivery through the receiver in
tests/test_command_e2e.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.variables import Variable

from tasks.config import ConfigError, load_config
from tasks.github.client import GitHub
from tasks.run.approvals import approval_name, approved_sha, forget_approval, record_approval
from tasks.run.outcome import Outcome
from tasks.steps.guards import check_approval, check_event, check_pull, guard
from tests.fakes.github import FakeGitHub

PAYLOADS = Path(__file__).parent / "data" / "github-payloads"
REPO = "Codertocat/Hello-World"
FORK = "mallory/Hello-World"
SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
NEWER = "1" * 40


def fork_pull(sha: str = SHA, **changes: Any) -> dict[str, Any]:
    found: dict[str, Any] = json.loads((PAYLOADS / "pull_request.opened.json").read_text())[
        "pull_request"
    ]
    pull = copy.deepcopy(found)
    pull["head"]["repo"]["full_name"] = FORK
    pull["head"]["sha"] = sha
    return {**pull, **changes}


def test_fork_previews_is_refuse_unless_the_operator_says_approve() -> None:
    assert load_config(env={}, use_variable=False).fork_previews == "refuse"
    env = {"PR_PREVIEW_FORK_PREVIEWS": "approve"}
    assert load_config(env=env, use_variable=False).fork_previews == "approve"
    with pytest.raises(ConfigError, match="fork_previews"):
        load_config(env={"PR_PREVIEW_FORK_PREVIEWS": "always"}, use_variable=False)


def test_a_fork_waits_for_the_approval_of_exactly_its_head_commit() -> None:
    waiting = check_pull(fork_pull(), REPO, SHA, fork_previews="approve")
    assert waiting.verdict is Outcome.AWAITING_APPROVAL
    assert f"`/preview approve {SHA}`" in waiting.reason and FORK in waiting.reason
    assert check_pull(fork_pull(), REPO, SHA, fork_previews="approve", approved_sha=SHA).ok
    # An approval of another commit (the one before a push) covers nothing.
    newer = check_pull(fork_pull(NEWER), REPO, NEWER, fork_previews="approve", approved_sha=SHA)
    assert newer.verdict is Outcome.AWAITING_APPROVAL and NEWER in newer.reason
    # A late run of a commit gone by asks no approval of it: the newer push's run does.
    late = check_pull(fork_pull(NEWER), REPO, SHA, fork_previews="approve", approved_sha=SHA)
    assert late.verdict is Outcome.SUPERSEDED
    # Allow-listed forks, and pull requests from the repository itself, need none.
    assert check_pull(fork_pull(), REPO, SHA, [FORK], fork_previews="approve").ok
    assert check_pull(fork_pull(), REPO, SHA, [REPO], fork_previews="approve").ok
    same = fork_pull()
    same["head"]["repo"]["full_name"] = REPO
    assert check_pull(same, REPO, SHA, fork_previews="approve").ok
    # refuse (the default) refuses whatever was approved; a deleted fork is never previewed.
    refused = check_pull(fork_pull(), REPO, SHA, approved_sha=SHA)
    assert refused.verdict is Outcome.REFUSED_FORK
    gone = fork_pull()
    gone["head"]["repo"] = None
    deleted = check_pull(gone, REPO, SHA, fork_previews="approve", approved_sha=SHA)
    assert deleted.verdict is Outcome.REFUSED_FORK


def test_without_a_token_the_events_fork_waits_the_same_way() -> None:
    waiting = check_event(REPO, FORK, fork_previews="approve", head_sha=SHA)
    assert waiting.verdict is Outcome.AWAITING_APPROVAL and SHA in waiting.reason
    assert check_event(REPO, FORK, fork_previews="approve", approved=True, head_sha=SHA).ok
    assert check_event(REPO, FORK, approved=True, head_sha=SHA).verdict is Outcome.REFUSED_FORK


def test_an_approval_is_given_only_for_the_head_of_a_fork_that_needs_one() -> None:
    assert check_approval(fork_pull(), REPO, SHA, [], "approve").ok
    moved = check_approval(fork_pull(NEWER), REPO, SHA, [], "approve")
    assert moved.verdict is Outcome.NOT_THE_HEAD
    assert "not the head" in moved.reason and f"`/preview approve {NEWER}`" in moved.reason
    for pull, allowed, mode in (
        (fork_pull(state="closed"), [], "approve"),
        (fork_pull(), [FORK], "approve"),
        (fork_pull(), [], "refuse"),
    ):
        verdict = check_approval(pull, REPO, SHA, allowed, mode)
        assert verdict.verdict is Outcome.NOTHING_TO_APPROVE, verdict.reason


@pytest.fixture
def approvals(prefect_server: None) -> Iterator[None]:
    yield
    for repo, number in ((REPO, 7), (REPO, 8), ("codertocat/hello.world", 7)):
        forget_approval(repo, number)


def test_an_approval_is_a_prefect_variable_naming_its_pull_request(approvals: None) -> None:
    assert approval_name("Octo-Org/app.web", 7) == "pr-preview-approval-octo-org_app_web-7"
    assert approved_sha(REPO, 7) is None

    record_approval(REPO, 7, SHA, "wanda")
    record_approval(REPO, 7, NEWER, "wanda")  # the later approval replaces the earlier
    stored = Variable.get(approval_name(REPO, 7))
    assert isinstance(stored, dict)
    assert (stored["repo"], stored["pr"], stored["sha"], stored["by"]) == (REPO, 7, NEWER, "wanda")
    assert approved_sha(REPO.upper(), 7) == NEWER  # GitHub's names ignore case
    assert approved_sha(REPO, 8) is None

    # Another repository whose name maps to the same Variable approves nothing here.
    other = "codertocat/hello.world"
    assert approval_name(other, 7) == approval_name("Codertocat/Hello_World", 7)
    record_approval(other, 7, SHA, "wanda")
    assert approved_sha("Codertocat/Hello_World", 7) is None

    assert forget_approval(REPO, 7) is True
    assert approved_sha(REPO, 7) is None
    assert forget_approval(REPO, 7) is False


def test_the_guard_reads_the_approval_with_a_token_and_without_one(approvals: None) -> None:
    fake = FakeGitHub()
    fake.add_pull(REPO, fork_pull(number=7))
    with_token = GitHub("good-token", base_url=fake.base_url, transport=fake.transport)
    for github in (with_token, GitHub(None)):
        waiting = guard(github, REPO, 7, SHA, FORK, fork_previews="approve")
        assert waiting.verdict is Outcome.AWAITING_APPROVAL
    record_approval(REPO, 7, SHA, "wanda")
    for github in (with_token, GitHub(None)):
        assert guard(github, REPO, 7, SHA, FORK, fork_previews="approve").ok
    assert len(fake.sent("GET", "/pulls/7")) == 2
