"""The GitHub client against a fake GitHub, and the guards against real payload shapes."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tasks.github.client import (
    GitHub,
    GitHubAuthError,
    GitHubNotFound,
    GitHubPermissionError,
    GitHubRateLimited,
    GitHubUnavailable,
    deployment_environment,
    github_from_config,
)
from tasks.github.pull_request import report_deployment
from tasks.run.retry import is_transient
from tasks.steps.guards import check_pull
from tests.fakes.github import FakeGitHub

PAYLOADS = Path("/work/shared/github-payloads")
REPO = "Codertocat/Hello-World"
TOKEN = "good-token"


def opened_pull() -> dict[str, Any]:
    """The ``pull_request`` object of GitHub's documented ``opened`` delivery."""
    if (PAYLOADS / "pull_request.opened.json").exists():
        return dict(json.loads((PAYLOADS / "pull_request.opened.json").read_text())["pull_request"])
    return {  # the same shape, trimmed, for a checkout without the shared payloads
        "number": 2,
        "state": "open",
        "merged": False,
        "head": {"sha": "ec26c3e57ca3a959ca5aad62de7213c562f8c821", "repo": {"full_name": REPO}},
        "base": {"sha": "f95f852bd8fca8fcc58a9a2d6c842781e32a215e", "repo": {"full_name": REPO}},
    }


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def fake() -> FakeGitHub:
    fake = FakeGitHub()
    fake.add_pull(REPO, opened_pull())
    return fake


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def client(fake: FakeGitHub, sleeps: Sleeps, token: str | None = TOKEN, **kw: Any) -> GitHub:
    return GitHub(
        token,
        base_url=fake.base_url,
        transport=fake.transport,
        sleep=sleeps,
        clock=lambda: fake.now,
        **kw,
    )


def test_get_pull_sends_the_token_and_reads_the_state(fake: FakeGitHub, sleeps: Sleeps) -> None:
    github = client(fake, sleeps)
    pull = github.get_pull(REPO, 2)
    assert pull["head"]["sha"] == "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
    assert github.pull_state(REPO, 2) == "open"
    assert github.pull_state(REPO, 999) is None
    request = fake.sent("GET", "/pulls/2")[0]
    assert request.authorization == f"Bearer {TOKEN}"
    assert request.headers["x-github-api-version"] == "2022-11-28"


def test_without_a_token_nothing_is_sent(fake: FakeGitHub, sleeps: Sleeps) -> None:
    github = client(fake, sleeps, token=None)
    assert not github.enabled
    assert github.pull_state(REPO, 2) is None
    assert fake.requests == []


def test_bad_token_is_not_retried_and_never_shown(
    fake: FakeGitHub, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "ghp_NotAValidTokenButSecretAnyway1234567890"
    github = client(fake, sleeps, token=secret)
    with caplog.at_level(logging.DEBUG), pytest.raises(GitHubAuthError) as raised:
        github.get_pull(REPO, 2)
    assert len(fake.requests) == 1
    assert sleeps.calls == []
    assert "401" in str(raised.value) and "Bad credentials" in str(raised.value)
    assert not is_transient(raised.value)
    for text in (str(raised.value), repr(raised.value), repr(github), caplog.text):
        assert secret not in text


def test_not_found_is_not_retried(fake: FakeGitHub, sleeps: Sleeps) -> None:
    github = client(fake, sleeps)
    with pytest.raises(GitHubNotFound):
        github.get_pull("nobody/nothing", 1)
    assert len(fake.requests) == 1


def test_a_write_without_permission_names_the_permission(fake: FakeGitHub, sleeps: Sleeps) -> None:
    fake.tokens["read-only"] = frozenset({"pull_requests:read"})
    github = client(fake, sleeps, token="read-only")
    with pytest.raises(GitHubPermissionError) as raised:
        github.create_issue_comment(REPO, 2, "hello")
    assert "pull-requests: write / issues: write" in str(raised.value)
    with pytest.raises(GitHubPermissionError) as raised:
        github.create_deployment(REPO, "abc", "pr-2")
    assert "deployments: write" in str(raised.value)
    with pytest.raises(GitHubPermissionError):  # 404 on a write: the repository is invisible
        client(fake, sleeps).create_issue_comment("other/repo", 1, "hello")
    assert len(fake.sent("POST")) == 3
    assert sleeps.calls == []


def test_primary_rate_limit_waits_until_reset(fake: FakeGitHub, sleeps: Sleeps) -> None:
    fake.rate_limit(reset_in=42)
    github = client(fake, sleeps, max_wait_seconds=120)
    assert github.get_pull(REPO, 2)["number"] == 2
    assert sleeps.calls == [43.0]  # until X-RateLimit-Reset, plus one second of margin
    assert len(fake.requests) == 2


def test_rate_limit_longer_than_allowed_fails_at_once(fake: FakeGitHub, sleeps: Sleeps) -> None:
    fake.rate_limit(reset_in=3600)
    github = client(fake, sleeps, max_wait_seconds=60)
    with pytest.raises(GitHubRateLimited) as raised:
        github.get_pull(REPO, 2)
    assert sleeps.calls == []
    assert len(fake.requests) == 1
    assert is_transient(raised.value)  # a later task run may succeed


def test_429_honours_retry_after(fake: FakeGitHub, sleeps: Sleeps) -> None:
    fake.inject(429, headers={"Retry-After": "7"}, message="secondary rate limit")
    assert client(fake, sleeps).get_pull(REPO, 2)["number"] == 2
    assert sleeps.calls == [7.0]


def test_5xx_is_retried_then_given_up(fake: FakeGitHub, sleeps: Sleeps) -> None:
    fake.inject(502, times=2)
    assert client(fake, sleeps).get_pull(REPO, 2)["number"] == 2
    assert len(fake.requests) == 3 and len(sleeps.calls) == 2

    fake.requests.clear()
    fake.inject(503, times=10)
    with pytest.raises(GitHubUnavailable) as raised:
        client(fake, sleeps, max_retries=2).get_pull(REPO, 2)
    assert len(fake.requests) == 3
    assert is_transient(raised.value)


def test_comments_are_read_across_pages(fake: FakeGitHub, sleeps: Sleeps) -> None:
    for i in range(250):
        fake.add_comment(REPO, 2, f"comment {i}")
    comments = client(fake, sleeps).list_issue_comments(REPO, 2)
    assert [c["body"] for c in comments] == [f"comment {i}" for i in range(250)]
    pages = fake.sent("GET", "/comments")
    assert [(r.params.get("per_page"), r.params.get("page")) for r in pages] == [
        ("100", None),
        ("100", "2"),
        ("100", "3"),
    ]


def test_deployment_and_statuses(fake: FakeGitHub, sleeps: Sleeps) -> None:
    github = client(fake, sleeps)
    sha = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
    deployment = github.create_deployment(REPO, sha, deployment_environment(2))
    github.create_deployment_status(REPO, deployment["id"], "in_progress", log_url="https://ui/r")
    github.create_deployment_status(
        REPO, deployment["id"], "success", environment_url="https://ui/r", log_url="https://ui/r"
    )
    created = fake.sent("POST", "/deployments")[0].body
    assert created == {
        "ref": sha,
        "environment": "pr-2",
        "auto_merge": False,
        "required_contexts": [],
        "transient_environment": True,
        "production_environment": False,
    }
    states = [s["state"] for s in fake.statuses[deployment["id"]]]
    assert states == ["in_progress", "success"]
    assert fake.statuses[deployment["id"]][1]["environment_url"] == "https://ui/r"
    assert [d["id"] for d in github.list_deployments(REPO, "pr-2")] == [deployment["id"]]


def test_github_from_config_reads_the_environment(sleeps: Sleeps) -> None:
    from tasks.config import PreviewConfig

    fake = FakeGitHub(base_url="https://ghe.example.com/api/v3")
    fake.add_pull(REPO, opened_pull())
    env = {"GITHUB_TOKEN": TOKEN, "GITHUB_API_URL": "https://ghe.example.com/api/v3"}
    github = github_from_config(PreviewConfig(), env=env, transport=fake.transport)
    assert github.enabled and TOKEN not in repr(github)
    assert github.pull_state(REPO, 2) == "open"
    assert str(fake.requests[0].path) == "/api/v3/repos/Codertocat/Hello-World/pulls/2"

    assert not github_from_config(PreviewConfig(), env={}).enabled


def test_github_from_config_prefers_the_secret_block(prefect_server: None) -> None:
    from prefect.blocks.system import Secret

    from tasks.config import PreviewConfig

    Secret(value="block-token").save("github-token-test", overwrite=True)
    fake = FakeGitHub(tokens={"block-token": frozenset({"pull_requests:read"})})
    fake.add_pull(REPO, opened_pull())
    config = PreviewConfig(github_token_secret_block="github-token-test")
    env = {"PREFECT_API_URL": "set", "GITHUB_TOKEN": "env-token"}
    github = github_from_config(config, env=env, transport=fake.transport)
    assert github.pull_state(REPO, 2) == "open"
    assert fake.requests[0].authorization == "Bearer block-token"

    missing = PreviewConfig(github_token_secret_block="no-such-block")
    github = github_from_config(missing, env=env, transport=fake.transport)
    assert github.enabled  # a missing block is not fatal: GITHUB_TOKEN is used


# --- guards


def test_same_repo_pull_at_its_head_is_ok() -> None:
    pull = opened_pull()
    result = check_pull(pull, REPO, pull["head"]["sha"], [])
    assert result.ok and result.verdict is None


def test_fork_is_refused_unless_allow_listed() -> None:
    pull = copy.deepcopy(opened_pull())
    pull["head"]["repo"]["full_name"] = "mallory/Hello-World"
    sha = pull["head"]["sha"]
    refused = check_pull(pull, REPO, sha, [])
    assert refused.verdict == "refused_fork" and "mallory/Hello-World" in refused.reason
    assert check_pull(pull, REPO, sha, ["Mallory/hello-world"]).ok
    assert check_pull(pull, REPO, sha, [REPO]).ok


def test_deleted_fork_is_a_fork() -> None:
    pull = copy.deepcopy(opened_pull())
    pull["head"]["repo"] = None
    result = check_pull(pull, REPO, pull["head"]["sha"], ["someone/else"])
    assert result.verdict == "refused_fork" and "deleted" in result.reason


def test_closed_pull_is_never_launched() -> None:
    pull = json.loads((PAYLOADS / "pull_request.closed.json").read_text())["pull_request"]
    assert check_pull(pull, REPO, pull["head"]["sha"], []).verdict == "closed"


def test_superseded_push_is_detected_through_the_api(fake: FakeGitHub, sleeps: Sleeps) -> None:
    event_sha = opened_pull()["head"]["sha"]
    newer = copy.deepcopy(opened_pull())
    newer["head"]["sha"] = "1" * 40
    fake.add_pull(REPO, newer)
    pull = client(fake, sleeps).get_pull(REPO, 2)
    result = check_pull(pull, REPO, event_sha, [])
    assert result.verdict == "superseded" and "111111111111" in result.reason


def test_pull_of_another_repository_is_an_error() -> None:
    with pytest.raises(ValueError, match="belongs to"):
        check_pull(opened_pull(), "octo-org/app", "abc", [])


def test_report_deployment_follows_a_preview_to_teardown(fake: FakeGitHub, sleeps: Sleeps) -> None:
    github = client(fake, sleeps)
    sha = opened_pull()["head"]["sha"]
    first = report_deployment(github, REPO, 2, sha, "in_progress", log_url="https://ui/run/1")
    assert first is not None
    assert report_deployment(github, REPO, 2, sha, "success", deployment_id=first) == first
    second = report_deployment(github, REPO, 2, "2" * 40, "failure")
    assert report_deployment(github, REPO, 2, sha, "inactive") is None

    assert [s["state"] for s in fake.statuses[first]] == ["in_progress", "success", "inactive"]
    assert [s["state"] for s in fake.statuses[second or 0]] == ["failure", "inactive"]
    assert fake.statuses[first][0]["log_url"] == "https://ui/run/1"
    assert report_deployment(client(fake, sleeps, token=None), REPO, 2, sha, "success") is None


def test_report_deployment_without_permission_is_not_fatal(
    fake: FakeGitHub, sleeps: Sleeps
) -> None:
    fake.tokens["read-only"] = frozenset({"pull_requests:read"})
    github = client(fake, sleeps, token="read-only")
    assert report_deployment(github, REPO, 2, "abc", "in_progress") is None
    assert fake.deployments == {}
