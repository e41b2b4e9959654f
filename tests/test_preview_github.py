"""The flows as the pull request sees them: one sticky comment, the deployment, the guards,
and with a GitHub App the check run.

A fake GitHub serves on a real local port (the flows build their own client from
GITHUB_API_URL and GITHUB_TOKEN, or from the App's configuration and its key in moto's
Parameter Store); the tests assert on what it received and on the comment and check runs it
ends up holding, and on the instances moto holds.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter

from flows.command import pr_command
from flows.preview import pr_preview
from flows.teardown import pr_teardown
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import BOOTSTRAP_CHECK, Reply, ScriptedInstances
from local_stack.serve import serve_handler
from tasks.cloud.aws import AwsClients
from tasks.config import PreviewConfig
from tasks.github.pull_request import marker
from tasks.run.approvals import approved_sha, forget_approval
from tests.fakes.github import FakeGitHub, app_key_pair
from tests.support import CANARIES, CANARY_DATABASE_URL, CANARY_GHCR_TOKEN, REGION
from tests.support.moto_state import live, tags

pytestmark = pytest.mark.usefixtures("prefect_server", "healthy_world")

REPO = "octo-org/app"
FORK = "outsider/app"
SHA1 = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SHA2 = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
PAYLOAD = Path(__file__).parent / "data" / "github-payloads" / "pull_request.opened.json"
APP_ID, INSTALLATION, SLUG = 4242, 777, "acme-previews"
APP_KEY_PARAMETER = "/pr-preview-app/github-app-key"


@pytest.fixture
def healthy_world(
    config: PreviewConfig, registry: FakeRegistry, scripted_ssm: ScriptedInstances
) -> None:
    """Every image is pushed and every instance boots and answers."""
    config.image = f"{registry.host}/octo-org/app"
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    for sha in (SHA1, SHA2):
        registry.push("octo-org/app", sha, private=True)
    scripted_ssm.healthy()


class Served:
    """One local HTTP server for the module; each test points it at its own fake GitHub."""

    def __init__(self) -> None:
        self.url = ""
        self.fake = FakeGitHub()
        self.before: list[Any] = []  # hooks run on each request before the fake answers
        self.times: list[float] = []
        self._lock = threading.Lock()

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            for hook in self.before:
                hook(request)
            self.times.append(time.monotonic())
            return self.fake.handle(request)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    target = Served()
    with serve_handler(target.handle) as url:
        target.url = url
        yield target


@pytest.fixture
def github(served: Served, monkeypatch: pytest.MonkeyPatch) -> FakeGitHub:
    """A fresh fake GitHub holding no pull requests yet; the flows' token is ``good-token``."""
    served.fake = FakeGitHub(base_url=served.url)
    served.before, served.times = [], []
    monkeypatch.setenv("GITHUB_API_URL", served.url)
    monkeypatch.setenv("GITHUB_TOKEN", "good-token")
    return served.fake


@pytest.fixture
def app_github(github: FakeGitHub, aws: AwsClients, monkeypatch: pytest.MonkeyPatch) -> FakeGitHub:
    """GitHub reached as a GitHub App only: its key in Parameter Store, no token anywhere."""
    monkeypatch.delenv("GITHUB_TOKEN")
    github.tokens.clear()  # no personal access token would work
    github.now = time.time()  # the flows sign and expire by the real clock
    github.add_app(APP_ID, SLUG, app_key_pair()[1], {INSTALLATION: "octo-org"})
    aws.ssm.put_parameter(Name=APP_KEY_PARAMETER, Value=app_key_pair()[0], Type="SecureString")
    monkeypatch.setenv("PR_PREVIEW_GITHUB_APP_ID", str(APP_ID))
    monkeypatch.setenv("PR_PREVIEW_GITHUB_APP_PRIVATE_KEY_PARAMETER", APP_KEY_PARAMETER)
    return github


def assert_app_only(github: FakeGitHub) -> None:
    """Every request carried the App's JWT (its own endpoints) or one of its installation
    tokens; GitHub refused none; its private key went nowhere."""
    for request in github.requests:
        credential = (request.authorization or "").removeprefix("Bearer ")
        as_app = request.path.startswith("/app") or request.path.endswith("/installation")
        assert as_app or credential in github.issued, request.path
        assert request.status is not None and request.status < 400, request.path
    assert_no_secret_sent(github, app_key_pair()[0])
    sent = [json.dumps(r.body) + json.dumps(r.params) for r in github.requests]
    assert not [text for text in sent if "PRIVATE KEY" in text]


def pull(
    number: int, sha: str = SHA1, *, head_repo: str = REPO, state: str = "open"
) -> dict[str, Any]:
    """A pull request as the REST API returns it, built from the recorded webhook payload."""
    data = copy.deepcopy(json.loads(PAYLOAD.read_text())["pull_request"])
    data.update(number=number, state=state, merged=False)
    data["head"]["sha"] = sha
    data["head"]["repo"]["full_name"] = head_repo
    data["base"]["repo"]["full_name"] = REPO
    return data


def bot_comments(github: FakeGitHub, number: int) -> list[str]:
    return [body for body in github.comment_bodies(REPO, number) if marker(REPO, number) in body]


def posted_bodies(github: FakeGitHub, number: int) -> list[tuple[str, str]]:
    """(method, first line after the marker) of every comment write, in order."""
    writes = [
        r
        for r in github.requests
        if (r.method == "POST" and r.path.endswith(f"/issues/{number}/comments"))
        or (r.method == "PATCH" and "/issues/comments/" in r.path)
    ]
    return [(r.method, r.body["body"].splitlines()[1]) for r in writes]


def statuses(github: FakeGitHub, environment: str) -> list[tuple[str, list[str]]]:
    """(sha, states posted) of every deployment to ``environment``, oldest first."""
    return [
        (d["sha"], [s["state"] for s in github.statuses[d["id"]]])
        for d in github.deployments.get(REPO.lower(), [])
        if d["environment"] == environment
    ]


def ghcr_login_fails(scripted_ssm: ScriptedInstances) -> None:
    """The instance's docker login is refused (its log holds both canaries)."""
    scripted_ssm.on(
        BOOTSTRAP_CHECK,
        Reply(
            stdout="bootstrap-failed\nghcr-login\n",
            stderr=f"login with {CANARY_GHCR_TOKEN}: unauthorized\n",
        ),
    )
    scripted_ssm.on(
        r"cloud-init-output",
        Reply(
            stdout='Error response from daemon: Get "https://ghcr.io/v2/": unauthorized\n'
            f"DATABASE_URL={CANARY_DATABASE_URL}\n"
        ),
    )


def tunnel(instance_id: str) -> str:
    return (
        f"aws ssm start-session --target {instance_id} "
        "--document-name AWS-StartPortForwardingSession "
        """--parameters '{"portNumber":["8000"],"localPortNumber":["8000"]}' """
        f"--region {REGION}"
    )


def assert_no_secret_sent(github: FakeGitHub, *texts: str) -> None:
    sent = [
        json.dumps(r.body) + json.dumps(r.headers) + json.dumps(r.params) for r in github.requests
    ]
    stored = [c["body"] for comments in github.comments.values() for c in comments]
    leaked = [c for c in CANARIES for text in (*sent, *stored, *texts) if c in text]
    assert not leaked


def artifact(state: Any, key: str) -> str:
    """The body of artifact ``key`` of the flow run behind ``state``."""
    run_id: UUID = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id={"any_": [run_id]}),
            artifact_filter=ArtifactFilter(key={"any_": [key]}),
        )
    *_, latest = sorted(found, key=lambda a: a.created or 0)  # type: ignore[arg-type, return-value]
    return str(latest.data)


def test_open_push_close_keep_one_comment_and_one_environment(
    aws: AwsClients, config: PreviewConfig, github: FakeGitHub
) -> None:
    github.add_pull(REPO, pull(42, SHA1))
    for n in range(130):  # our comment lands on the second page
        github.add_comment(REPO, 42, f"review remark {n}")
    config.prefect_ui_url = "https://prefect.example.com/"

    opened = pr_preview(REPO, 42, SHA1, action="opened", config=config, return_state=True)
    first = opened.result()
    [instance] = live(aws)
    instance_id = instance["InstanceId"]
    assert (first.status, first.instance_id) == ("ready", instance_id)
    assert posted_bodies(github, 42) == [
        ("POST", "### ⏳ Preview launching"),
        ("PATCH", "### ✅ Preview ready"),
    ]
    [body] = bot_comments(github, 42)
    assert f"| Commit | `{SHA1}` |" in body
    assert f"| Instance | `{instance_id}` |" in body
    assert f"| Region | `{REGION}` |" in body
    assert f"| Expires at | {tags(instance)['shutdown-at']} " in body
    assert f"```bash\n{tunnel(instance_id)}\n```" in body
    run_id = opened.state_details.flow_run_id
    assert f"(https://prefect.example.com/runs/flow-run/{run_id})" in body
    assert statuses(github, "pr-42") == [(SHA1, ["in_progress", "success"])]
    [deployment] = github.deployments[REPO]
    assert {s["log_url"] for s in github.statuses[deployment["id"]]} == {
        f"https://prefect.example.com/runs/flow-run/{run_id}"
    }
    assert github.sent("GET", "/issues/42/comments")[-1].params.get("page") == "2"

    github.pulls[(REPO, 42)] = pull(42, SHA2)
    pushed = pr_preview(REPO, 42, SHA2, action="synchronize", config=config, return_state=True)
    assert pushed.result().path == "in-place"
    assert len(github.sent("POST", "/issues/42/comments")) == 1  # never a second comment
    assert posted_bodies(github, 42)[2:] == [
        ("PATCH", "### ⏳ Preview launching"),
        ("PATCH", "### 🔁 Preview updated in place"),
    ]
    [body] = bot_comments(github, 42)
    assert f"| Commit | `{SHA2}` |" in body and f"`{instance_id}`" in body
    assert tunnel(instance_id) in body
    assert len(github.comment_bodies(REPO, 42)) == 131
    assert statuses(github, "pr-42")[-1] == (SHA2, ["in_progress", "success"])

    # A closed event while GitHub says the PR is open (stale or forged): nothing goes.
    forged = pr_teardown(REPO, 42, config=config, return_state=True)
    assert forged.name == "Still Open" and "stale or forged" in (forged.message or "")
    assert [i["InstanceId"] for i in live(aws)] == [instance_id]
    assert bot_comments(github, 42) == [body]

    github.pulls[(REPO, 42)] = pull(42, SHA2, state="closed")
    closed = pr_teardown(REPO, 42, config=config, return_state=True)
    assert closed.result().terminated == [instance_id]
    assert live(aws) == []
    [body] = bot_comments(github, 42)
    assert body.splitlines()[1] == "### 🧹 Preview torn down"
    assert "start-session" not in body and "Expires at" not in body
    assert all(states[-1] == "inactive" for _, states in statuses(github, "pr-42"))
    assert len(github.sent("POST", "/issues/42/comments")) == 1
    assert_no_secret_sent(github)


def test_fork_is_refused_with_a_comment_unless_allow_listed(
    aws: AwsClients, config: PreviewConfig, github: FakeGitHub, registry: FakeRegistry
) -> None:
    github.add_pull(REPO, pull(50, SHA1, head_repo=FORK))

    refused = pr_preview(REPO, 50, SHA1, action="opened", head_repo=FORK, config=config)
    assert refused.status == "refused_fork"
    assert live(aws) == [] and registry.manifest_requests() == []
    [body] = bot_comments(github, 50)
    assert body.splitlines()[1] == "### 🚫 Preview refused"
    assert f"comes from the fork {FORK}" in body and "allowed_fork_repos" in body
    assert github.deployments == {}

    config.allowed_fork_repos = [FORK]
    config.github_deployments = False
    allowed = pr_preview(REPO, 50, SHA1, action="opened", head_repo=FORK, config=config)
    assert allowed.status == "ready"
    assert [i["InstanceId"] for i in live(aws)] == [allowed.instance_id]
    [body] = bot_comments(github, 50)
    assert body.splitlines()[1] == "### ✅ Preview ready"
    assert len(github.sent("POST", "/issues/50/comments")) == 1
    assert github.sent(path_contains="/deployments") == []  # off by config
    assert_no_secret_sent(github)


def test_superseded_and_closed_runs_launch_nothing(
    aws: AwsClients, config: PreviewConfig, github: FakeGitHub, registry: FakeRegistry
) -> None:
    github.add_pull(REPO, pull(51, SHA2))  # a newer push landed after this run's webhook
    github.add_pull(REPO, pull(52, SHA1, state="closed"))

    stale = pr_preview(REPO, 51, SHA1, config=config, return_state=True)
    assert stale.is_completed() and stale.result().status == "superseded"
    closed = pr_preview(REPO, 52, SHA1, action="synchronize", config=config)
    assert closed.status == "closed"
    skipped = pr_preview(REPO, 52, SHA1, action="closed", config=config)
    assert skipped.status == "skipped"

    assert live(aws) == [] and registry.manifest_requests() == []
    assert github.sent("POST") == [] and github.sent("PATCH") == []
    assert github.deployments == {}


def test_rate_limit_mid_run_is_waited_out(
    aws: AwsClients, config: PreviewConfig, github: FakeGitHub, served: Served
) -> None:
    github.add_pull(REPO, pull(53, SHA1))
    github.now = time.time()
    limited: list[float] = []

    def limit_first_edit(request: httpx.Request) -> None:
        if request.method == "PATCH" and not limited:
            github.rate_limit(reset_in=1)
            limited.append(time.monotonic())

    served.before.append(limit_first_edit)
    result = pr_preview(REPO, 53, SHA1, action="opened", config=config)
    assert result.status == "ready"
    patches = [i for i, r in enumerate(github.requests) if r.method == "PATCH"]
    assert len(patches) == 2  # the 403 and its retry, after the reset
    assert served.times[patches[1]] - served.times[patches[0]] >= 1.0
    [body] = bot_comments(github, 53)
    assert body.splitlines()[1] == "### ✅ Preview ready" and result.instance_id in body
    # The cost runs from the instance's launch as moto holds it, at the type's table price.
    # 24 h at $0.0272/h; seconds old, it has cost a fraction of a cent so far.
    assert re.search(
        r"Cost so far \$0\.00\d* · at expiry \$0\.65 \(t3\.small at \$0\.0272/h\)", body
    )
    assert statuses(github, "pr-53") == [(SHA1, ["in_progress", "success"])]


def test_without_a_token_the_comment_is_an_artifact(
    aws: AwsClients, config: PreviewConfig, github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GITHUB_TOKEN")
    state = pr_preview(REPO, 54, SHA1, action="opened", config=config, return_state=True)
    result = state.result()
    assert state.is_completed() and result.status == "ready"
    body = artifact(state, "pr-54-comment")
    assert body.startswith(marker(REPO, 54)) and body.splitlines()[1] == "### ✅ Preview ready"
    assert tunnel(result.instance_id or "") in body
    assert github.requests == []
    assert_no_secret_sent(github, body)


def test_failed_preview_comments_the_diagnosis_and_fails_the_deployment(
    aws: AwsClients, config: PreviewConfig, github: FakeGitHub, scripted_ssm: ScriptedInstances
) -> None:
    github.add_pull(REPO, pull(55, SHA1))
    ghcr_login_fails(scripted_ssm)
    state = pr_preview(REPO, 55, SHA1, config=config, return_state=True)
    assert state.is_failed()
    [instance] = live(aws)  # kept on the short TTL for debugging
    [body] = bot_comments(github, 55)
    assert body.splitlines()[1] == "### ❌ Preview failed"
    assert "<summary>Diagnosis</summary>" in body and "read:packages" in body
    assert f"`{instance['InstanceId']}`" in body
    assert f"| Expires at | {tags(instance)['shutdown-at']} " in body
    assert statuses(github, "pr-55") == [(SHA1, ["in_progress", "failure"])]
    assert_no_secret_sent(github)


def test_github_rate_limited_beyond_patience_does_not_fail_the_preview(
    aws: AwsClients, config: PreviewConfig, github: FakeGitHub, served: Served
) -> None:
    github.add_pull(REPO, pull(56, SHA1))
    github.now = time.time()
    limited: list[str] = []

    def limit_for_an_hour_once_ready(request: httpx.Request) -> None:
        ready = request.method == "PATCH" or (
            request.url.path.endswith("/statuses") and b"in_progress" not in request.content
        )
        if ready and request.method not in limited:
            github.rate_limit(reset_in=3600)  # longer than the client may wait
            limited.append(request.method)

    served.before.append(limit_for_an_hour_once_ready)
    state = pr_preview(REPO, 56, SHA1, action="opened", config=config, return_state=True)
    assert state.is_completed() and state.result().status == "ready"
    assert limited == ["PATCH", "POST"]
    body = artifact(state, "pr-56-comment")  # the ready comment, kept where people can read it
    assert body.splitlines()[1] == "### ✅ Preview ready"
    assert tunnel(state.result().instance_id or "") in body
    assert statuses(github, "pr-56") == [(SHA1, ["in_progress"])]


def test_a_repository_not_allowed_gets_nothing_and_is_told_nothing(
    aws: AwsClients, config: PreviewConfig, github: FakeGitHub, registry: FakeRegistry
) -> None:
    stranger = "evil-user/anything"
    github.add_pull(stranger, pull(60, SHA1, head_repo=stranger))
    sent_before = len(github.requests)

    state = pr_preview(stranger, 60, SHA1, action="opened", config=config, return_state=True)

    assert state.is_completed() and state.name == "Not Allowed"
    assert "allowed_repos" in (state.message or "") and "octo-org/*" in (state.message or "")
    assert state.result().status == "not_allowed"
    assert live(aws) == [] and registry.manifest_requests() == []
    assert len(github.requests) == sent_before  # no comment, no deployment, not even a read

    config.allowed_repos = []
    nothing = pr_preview(REPO, 61, SHA1, action="opened", config=config, return_state=True)
    assert nothing.name == "Not Allowed" and "to allowed_repos" in (nothing.message or "")
    assert live(aws) == []

    teardown = pr_teardown(stranger, 60, config=config, return_state=True)
    assert teardown.name == "Not Allowed" and teardown.result().terminated == []


def test_another_users_comment_with_our_marker_is_never_edited(
    aws: AwsClients, config: PreviewConfig, github: FakeGitHub, registry: FakeRegistry
) -> None:
    """Anyone can paste the hidden marker; only the token's own comment is the status."""
    github.add_pull(REPO, pull(62, SHA1))
    planted = f"{marker(REPO, 62)}\nI am the preview status now"
    theirs = github.add_comment(REPO, 62, planted, user="mallory")

    assert pr_preview(REPO, 62, SHA1, action="opened", config=config).status == "ready"

    [untouched] = [c for c in github.comments[(REPO, 62)] if c["id"] == theirs]
    assert untouched["body"] == planted
    [ours] = bot_comments(github, 62)[1:]
    assert ours.splitlines()[1] == "### ✅ Preview ready"
    assert not [r for r in github.sent("PATCH") if r.path.endswith(f"/comments/{theirs}")]


def test_an_app_alone_previews_a_pull_request_and_its_check_tells_each_state(
    aws: AwsClients, config: PreviewConfig, app_github: FakeGitHub
) -> None:
    github = app_github
    github.add_pull(REPO, pull(70, SHA1))
    planted = github.add_comment(REPO, 70, f"{marker(REPO, 70)}\nnot the bot", user="mallory")

    ready = pr_preview(REPO, 70, SHA1, action="opened", config=config)
    assert ready.status == "ready"
    [instance] = live(aws)
    [history] = github.check_run_states(REPO, SHA1)
    assert history == [("queued", None), ("in_progress", None), ("completed", "success")]
    [run] = github.check_runs[REPO]
    assert (run["name"], run["app"]["id"]) == ("pr-preview", APP_ID)
    assert run["output"]["title"] == "✅ Preview ready"
    summary = run["output"]["summary"]
    assert f"| Instance | `{instance['InstanceId']}` |" in summary
    assert f"| Expires at | {tags(instance)['shutdown-at']} " in summary
    assert tunnel(instance["InstanceId"]) in summary
    [ours] = [c for c in github.comments[(REPO, 70)] if c["id"] != planted]
    assert ours["user"]["login"] == f"{SLUG}[bot]"
    assert ours["body"].splitlines()[1] == "### ✅ Preview ready"
    assert statuses(github, "pr-70") == [(SHA1, ["in_progress", "success"])]
    assert len(github.sent("GET", "/installation")) == 1  # looked up from the repository

    # A newer push lands before this (late) run of SHA1 reads the pull request.
    github.pulls[(REPO, 70)] = pull(70, SHA2)
    stale = pr_preview(REPO, 70, SHA1, config=config, return_state=True)
    assert stale.name == "Superseded"
    assert github.check_run_states(REPO, SHA1)[-1] == [("queued", None), ("completed", "neutral")]
    neutral = github.check_runs[REPO][-1]["output"]
    assert neutral["title"] == "Superseded" and "the run for the newer push" in neutral["summary"]
    assert [i["InstanceId"] for i in live(aws)] == [instance["InstanceId"]]
    assert_app_only(github)


def test_an_apps_check_run_fails_with_the_diagnosis_and_is_neutral_for_a_fork(
    aws: AwsClients,
    config: PreviewConfig,
    app_github: FakeGitHub,
    scripted_ssm: ScriptedInstances,
) -> None:
    github = app_github
    github.add_pull(REPO, pull(71, SHA1))
    ghcr_login_fails(scripted_ssm)
    state = pr_preview(REPO, 71, SHA1, config=config, return_state=True)
    assert state.is_failed()
    [history] = github.check_run_states(REPO, SHA1)
    assert history == [("queued", None), ("in_progress", None), ("completed", "failure")]
    [run] = github.check_runs[REPO]
    assert run["output"]["title"] == "❌ Preview failed"
    assert "<summary>Diagnosis</summary>" in run["output"]["summary"]
    assert "read:packages" in run["output"]["summary"]  # the fix, from the failure table
    assert statuses(github, "pr-71") == [(SHA1, ["in_progress", "failure"])]

    # A fork not allow-listed: refused, said in the comment and as a neutral check.
    github.add_pull(REPO, pull(72, SHA2, head_repo=FORK))
    refused = pr_preview(REPO, 72, SHA2, action="opened", head_repo=FORK, config=config)
    assert refused.status == "refused_fork"
    assert github.check_run_states(REPO, SHA2) == [[("queued", None), ("completed", "neutral")]]
    assert github.check_runs[REPO][-1]["output"]["title"] == "🚫 Preview refused"
    assert len(live(aws)) == 1  # only the failed preview, kept for debugging
    assert_app_only(github)


def test_a_draft_waits_for_ready_for_review_and_goes_when_it_is_a_draft_again(
    aws: AwsClients, config: PreviewConfig, app_github: FakeGitHub
) -> None:
    github = app_github
    github.add_pull(REPO, {**pull(80, SHA1), "draft": True})

    drafted = pr_preview(REPO, 80, SHA1, action="opened", config=config, return_state=True)
    assert drafted.is_completed() and drafted.name == "Draft"
    assert live(aws) == [] and bot_comments(github, 80) == []
    assert github.check_run_states(REPO, SHA1) == [[("queued", None), ("completed", "neutral")]]
    summary = github.check_runs[REPO][-1]["output"]["summary"]
    assert "ready for review" in summary and "`/preview redeploy`" in summary

    github.pulls[(REPO, 80)]["draft"] = False
    ready = pr_preview(REPO, 80, SHA1, action="ready_for_review", config=config)
    assert ready.status == "ready"
    assert [i["InstanceId"] for i in live(aws)] == [ready.instance_id]

    # An event that says draft while GitHub says ready for review is stale: nothing goes.
    stale = pr_teardown(REPO, 80, config=config, action="converted_to_draft", return_state=True)
    assert stale.name == "Not Draft" and "stale" in (stale.message or "")
    assert [i["InstanceId"] for i in live(aws)] == [ready.instance_id]

    github.pulls[(REPO, 80)]["draft"] = True
    gone = pr_teardown(REPO, 80, config=config, action="converted_to_draft")
    assert gone.terminated == [ready.instance_id] and live(aws) == []
    [body] = bot_comments(github, 80)
    assert body.splitlines()[1] == "### 🧹 Preview torn down"
    assert "converted to a draft" in body
    assert_app_only(github)


def test_changed_files_that_ask_for_nothing_launch_nothing_until_redeploy_forces_it(
    aws: AwsClients, config: PreviewConfig, github: FakeGitHub
) -> None:
    config.paths_ignore = ["site/", "*.md"]
    config.github_deployments = False
    github.add_pull(REPO, pull(81, SHA1))
    # 130 files: two pages of GitHub's files API at 100 a page.
    names = [f"site/page-{n}.txt" for n in range(129)] + ["src/README.md"]
    github.set_changed_files(REPO, 81, names)

    skipped = pr_preview(REPO, 81, SHA1, action="opened", config=config, return_state=True)
    assert skipped.is_completed() and skipped.name == "No Matching Paths"
    assert live(aws) == []
    pages = [r.params.get("page", "1") for r in github.sent("GET", "/pulls/81/files")]
    assert pages == ["1", "2"]
    [body] = bot_comments(github, 81)
    assert body.splitlines()[1] == "### ⏭ No preview needed"
    assert "None of the 130 files" in body and "paths_ignore: `site/`, `*.md`" in body
    assert "`/preview redeploy`" in body and "page-1" not in body  # no file name is echoed

    # /preview redeploy from someone with write access launches it anyway — as a draft, too.
    github.pulls[(REPO, 81)]["draft"] = True
    github.add_collaborator(REPO, "wanda", "write")
    comment = github.add_comment(REPO, 81, "/preview redeploy", user="wanda")
    done = pr_command(REPO, 81, "/preview redeploy", comment, "wanda", config=config)
    assert done.outcome == "redeployed: ready"
    [instance] = live(aws)
    assert tags(instance)["PR"] == "81"
    [body] = bot_comments(github, 81)
    assert body.splitlines()[1] == "### ✅ Preview ready"

    # A change that counts launches without being asked.
    github.pulls[(REPO, 82)] = {**pull(82, SHA2), "draft": False}
    github.comments[(REPO, 82)] = []
    github.set_changed_files(REPO, 82, ["site/guide.txt", "src/app.py"])
    assert pr_preview(REPO, 82, SHA2, action="opened", config=config).status == "ready"


@pytest.fixture
def forgets_approvals() -> Iterator[None]:
    """The approvals a test records go with it (a closed PR's teardown forgets them too)."""
    yield
    forget_approval(REPO, 90)


def test_a_forks_commit_waits_for_a_writers_approval_and_a_later_push_waits_again(
    aws: AwsClients, config: PreviewConfig, app_github: FakeGitHub, forgets_approvals: None
) -> None:
    github = app_github
    config.fork_previews = "approve"
    github.add_pull(REPO, pull(90, SHA1, head_repo=FORK))
    github.add_collaborator(REPO, "wanda", "write")
    github.add_collaborator(REPO, "rhea", "read")

    def command(text: str, login: str) -> Any:
        comment = github.add_comment(REPO, 90, text, user=login)
        return pr_command(REPO, 90, text, comment, login, config=config, return_state=True)

    def sticky() -> str:
        [body] = bot_comments(github, 90)
        return body

    # The fork's PR waits: no instance, a comment saying who may approve what, a neutral check.
    waiting = pr_preview(
        REPO, 90, SHA1, action="opened", head_repo=FORK, config=config, return_state=True
    )
    assert waiting.is_completed() and waiting.name == "Awaiting Approval"
    assert live(aws) == []
    assert sticky().splitlines()[1] == "### ✋ Preview awaiting approval"
    assert f"`/preview approve {SHA1}`" in sticky() and "write access to octo-org/app" in sticky()
    assert github.check_run_states(REPO, SHA1) == [[("queued", None), ("completed", "neutral")]]
    assert github.check_runs[REPO][-1]["output"]["title"] == "✋ Preview awaiting approval"

    # A reader's approval approves nothing.
    refused = command(f"/preview approve {SHA1}", "rhea")
    assert refused.name == "Not Permitted"
    assert live(aws) == [] and approved_sha(REPO, 90) is None

    # A writer's approval of the head: recorded for that sha, and its preview runs.
    approved = command(f"/preview approve {SHA1}", "wanda")
    assert approved.is_completed() and approved.result().outcome == "approved: ready"
    [instance] = live(aws)
    assert tags(instance)["Sha"] == SHA1 and tags(instance)["PR"] == "90"
    assert approved_sha(REPO, 90) == SHA1
    assert sticky().splitlines()[1] == "### ✅ Preview ready"
    assert github.check_run_states(REPO, SHA1)[-1][-1] == ("completed", "success")

    # A command ends in the check run of the preview's commit too.
    assert command("/preview stop", "wanda").is_completed()
    assert github.check_run_states(REPO, SHA1)[-1] == [("completed", "neutral")]
    assert github.check_runs[REPO][-1]["output"]["title"] == "⏸ Preview stopped"

    # The fork pushes: the approval does not cover the new commit, which waits again.
    github.pulls[(REPO, 90)] = pull(90, SHA2, head_repo=FORK)
    pushed = pr_preview(
        REPO, 90, SHA2, action="synchronize", head_repo=FORK, config=config, return_state=True
    )
    assert pushed.name == "Awaiting Approval"
    assert [tags(i)["Sha"] for i in live(aws)] == [SHA1]  # nothing of SHA2 runs
    assert f"`/preview approve {SHA2}`" in sticky()

    # Approving the commit before the push now does nothing, and says so.
    stale = command(f"/preview approve {SHA1}", "wanda")
    assert stale.name == "Not The Head"
    [answer] = [b for b in github.comment_bodies(REPO, 90) if b.startswith("@wanda")]
    assert "not the head" in answer and f"`/preview approve {SHA2}`" in answer
    assert [tags(i)["Sha"] for i in live(aws)] == [SHA1] and approved_sha(REPO, 90) == SHA1

    # Closed: the preview goes, and so does the approval.
    github.pulls[(REPO, 90)] = pull(90, SHA2, head_repo=FORK, state="closed")
    assert pr_teardown(REPO, 90, config=config).terminated == [instance["InstanceId"]]
    assert approved_sha(REPO, 90) is None
    assert_app_only(github)
