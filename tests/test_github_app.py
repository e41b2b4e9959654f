"""A GitHub App as the client's identity, and the check run, against the fake GitHub.

The fake verifies every JWT with the App's public key and expires installation tokens by its
own clock, which the client shares: time moves by assignment, never by sleeping.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from deployments.events import event_from_delivery
from tasks.config import ConfigError, PreviewConfig, load_config
from tasks.github.app import TOKEN_PERMISSIONS, GitHubApp, GitHubAppKeyError, app_from_config
from tasks.github.client import GitHub, GitHubAuthError, GitHubPermissionError, github_from_config
from tasks.github.pull_request import PreviewState, marker, upsert_comment
from tasks.run.budget import RunTimedOut, check_budget, run_budget
from tasks.steps.report import PullRequestReport
from tests.fakes.aws_faults import attach, aws_faults
from tests.fakes.github import APP_PERMISSIONS, FakeGitHub, app_key_pair
from tests.support import CANARY_GHCR_TOKEN
from tests.test_github import Sleeps

REPO = "octo-org/app"
SHA = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
APP_ID = 4242
INSTALLATION = 777
SLUG = "acme-previews"
BOT = f"{SLUG}[bot]"


@pytest.fixture
def fake() -> FakeGitHub:
    fake = FakeGitHub()
    fake.add_pull(REPO, {"number": 7, "state": "open", "head": {"sha": SHA}})
    fake.add_app(APP_ID, SLUG, app_key_pair()[1], {INSTALLATION: "octo-org"})
    return fake


def app_client(fake: FakeGitHub, installation_id: int | None = None) -> GitHub:
    app = GitHubApp(APP_ID, app_key_pair()[0], installation_id, clock=lambda: fake.now)
    return GitHub(
        None,
        base_url=fake.base_url,
        transport=fake.transport,
        sleep=Sleeps(),
        clock=lambda: fake.now,
        app=app,
    )


def tokens_minted(fake: FakeGitHub) -> int:
    return len(fake.sent("POST", "/access_tokens"))


def bearer(request: Any) -> str:
    return str(request.authorization).removeprefix("Bearer ")


def test_the_jwt_is_rs256_backdated_short_and_verified_by_the_public_key(
    fake: FakeGitHub,
) -> None:
    app = GitHubApp(APP_ID, app_key_pair()[0], clock=lambda: fake.now)
    claims = jwt.decode(
        app.jwt(),
        app_key_pair()[1],
        algorithms=["RS256"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["iss"] == str(APP_ID)
    assert claims["iat"] == fake.now - 60
    assert fake.now < claims["exp"] <= claims["iat"] + 600

    github = app_client(fake)
    assert github.app_slug() == SLUG  # the fake accepted the signature
    [asked] = fake.sent("GET", "/app")
    assert jwt.get_unverified_header(bearer(asked))["alg"] == "RS256"

    other_key = GitHubApp(APP_ID, _another_private_key(), clock=lambda: fake.now)
    refused = GitHub(None, base_url=fake.base_url, transport=fake.transport, app=other_key)
    with pytest.raises(GitHubAuthError) as raised:
        refused.app_slug()
    message = str(raised.value)
    assert f"GitHub App id {APP_ID}" in message and "new private key" in message
    assert app_key_pair()[0] not in message


def test_the_installation_is_looked_up_once_and_its_token_renewed_before_expiry(
    fake: FakeGitHub,
) -> None:
    github = app_client(fake)  # no installation configured: looked up from the repository
    github.get_pull(REPO, 7)
    first = bearer(fake.sent("GET", "/pulls/7")[-1])
    assert fake.sent("GET", f"/repos/{REPO}/installation")[0].authorization != first
    assert first in fake.issued and fake.issued[first].installation_id == INSTALLATION

    fake.now += 54 * 60  # six minutes left: still used
    github.get_pull(REPO, 7)
    assert bearer(fake.sent("GET", "/pulls/7")[-1]) == first and tokens_minted(fake) == 1

    fake.now += 2 * 60  # four minutes left: renewed before a long step could outlive it
    github.get_pull(REPO, 7)
    second = bearer(fake.sent("GET", "/pulls/7")[-1])
    assert second != first and tokens_minted(fake) == 2

    fake.now += 3600 + 1  # the first one is long dead; the client never sends it again
    github.list_issue_comments(REPO, 7)
    assert tokens_minted(fake) == 3
    assert len(fake.sent("GET", "/installation")) == 1
    assert [r.status for r in fake.requests] == [200, 201, 200, 200, 201, 200, 201, 200]


def test_any_token_format_is_used_as_given(fake: FakeGitHub) -> None:
    odd = "v3." + "x" * 700 + "~.;"
    fake.mint = lambda: odd
    github = app_client(fake, INSTALLATION)
    github.create_issue_comment(REPO, 7, "hello")
    assert fake.sent("POST", "/issues/7/comments")[0].authorization == f"Bearer {odd}"
    assert fake.sent("GET", "/installation") == []  # configured: never looked up


def test_a_revoked_installation_fails_naming_the_app_and_what_to_do(
    fake: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    github = app_client(fake, INSTALLATION)
    github.get_pull(REPO, 7)
    token = bearer(fake.sent("GET", "/pulls/7")[-1])
    fake.revoke(INSTALLATION)

    with caplog.at_level(logging.DEBUG), pytest.raises(GitHubAuthError) as raised:
        github.get_pull(REPO, 7)
    message = str(raised.value)
    assert f"GitHub App {SLUG} (id {APP_ID})" in message
    assert "install it on the repository" in message and REPO in message
    # The 401 on the old token, one renewal refused, no retry loop.
    assert [(r.path.rsplit("/", 1)[-1], r.status) for r in fake.requests[-3:]] == [
        ("7", 401),
        ("access_tokens", 404),
        ("app", 200),
    ]
    for text in (message, repr(raised.value), repr(github), caplog.text):
        assert token not in text and app_key_pair()[0] not in text


def test_an_expired_token_is_renewed_once_on_401(fake: FakeGitHub) -> None:
    github = app_client(fake, INSTALLATION)
    github.get_pull(REPO, 7)
    [held] = fake.issued.values()
    held.expires_at = fake.now  # GitHub's clock ran ahead of ours
    github.get_pull(REPO, 7)
    assert tokens_minted(fake) == 2
    assert [r.path.rsplit("/", 1)[-1] for r in fake.requests[-3:]] == [
        "7",
        "access_tokens",
        "7",
    ]


# --- each token: one repository, the permissions a run uses


OTHER = "octo-org/other"  # another repository of the same installation


def test_each_token_is_asked_for_its_one_repository_and_the_runs_permissions(
    fake: FakeGitHub,
) -> None:
    """A token that leaks from a run (a log, a crash dump) reaches nothing else: GitHub answers
    404 for another repository of the installation, as if it did not exist."""
    fake.add_pull(OTHER, {"number": 8, "state": "open", "head": {"sha": SHA}})
    github = app_client(fake, INSTALLATION)
    github.get_pull(REPO, 7)
    github.get_pull(OTHER, 8)
    github.list_issue_comments(REPO, 7)  # the cached token of its repository

    asked = [(r.body, r.status) for r in fake.sent("POST", "/access_tokens")]
    permissions = {
        "checks": "write",
        "contents": "read",
        "deployments": "write",
        "issues": "write",
        "metadata": "read",
        "pull_requests": "read",
    }
    assert asked == [
        ({"repositories": ["app"], "permissions": permissions}, 201),
        ({"repositories": ["other"], "permissions": permissions}, 201),
    ]
    for_repo, for_other = (bearer(fake.sent("GET", f"/repos/{r}/pulls")[0]) for r in (REPO, OTHER))
    assert for_repo != for_other
    assert bearer(fake.sent("GET", "/issues/7/comments")[0]) == for_repo

    with httpx.Client(base_url=fake.base_url, transport=fake.transport) as client:
        for token, repo, number, status in (
            (for_repo, OTHER, 8, 404),
            (for_other, REPO, 7, 404),
            (for_other, OTHER, 8, 200),
        ):
            answer = client.get(
                f"/repos/{repo}/pulls/{number}", headers={"Authorization": f"Bearer {token}"}
            )
            assert (answer.status_code, fake.requests[-1].status) == (status, status), repo


def test_a_token_holds_only_the_permissions_it_was_asked_for(fake: FakeGitHub) -> None:
    app = GitHubApp(
        APP_ID,
        app_key_pair()[0],
        INSTALLATION,
        clock=lambda: fake.now,
        permissions={"metadata": "read", "pull_requests": "read"},
    )
    github = GitHub(None, base_url=fake.base_url, transport=fake.transport, app=app)
    assert github.get_pull(REPO, 7)["number"] == 7
    with pytest.raises(GitHubPermissionError) as raised:
        github.create_issue_comment(REPO, 7, "hello")
    assert raised.value.status == 403 and "issues: write" in str(raised.value)
    [refused] = fake.sent("POST", "/issues/7/comments")
    assert refused.status == 403 and fake.comment_bodies(REPO, 7) == []
    [minted] = fake.sent("POST", "/access_tokens")
    assert minted.body["permissions"] == {"metadata": "read", "pull_requests": "read"}


def test_an_app_without_a_permission_the_run_uses_is_told_which_to_grant(
    fake: FakeGitHub,
) -> None:
    """GitHub refuses a token with a permission the installation lacks (422): the run says
    which permissions to give the App rather than failing later, half-way through."""
    fake.apps[APP_ID].permissions = APP_PERMISSIONS - {"checks:write"}
    github = app_client(fake, INSTALLATION)
    with pytest.raises(GitHubAuthError) as raised:
        github.get_pull(REPO, 7)
    message = str(raised.value)
    assert "access_tokens → 422" in message and "checks: write" in message
    assert "accept them in its installation" in message and REPO in message
    assert fake.sent("GET", "/pulls/7") == []


def test_the_tokens_permissions_are_the_ones_the_readme_asks_the_app_for() -> None:
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    [listed] = re.findall(
        r"\*\*Repository permissions\*\*, exactly what the flows use: (.+?) Nothing else", readme
    )
    asked = {
        name.lower().replace(" ", "_"): "read" if level == "Read-only" else "write"
        for name, level in re.findall(r"\*([A-Z][a-z ]+): (Read-only|Read and write)\*", listed)
    }
    assert asked == dict(TOKEN_PERMISSIONS)


def test_comments_belong_to_the_apps_bot_user(fake: FakeGitHub) -> None:
    github = app_client(fake, INSTALLATION)
    planted = f"{marker(REPO, 7)}\nnot the bot"
    theirs = fake.add_comment(REPO, 7, planted, user="mallory")
    old_pat = fake.add_comment(REPO, 7, f"{marker(REPO, 7)}\nold", user="pr-preview-pat-user")

    created = upsert_comment(github, REPO, 7, "first")
    edited = upsert_comment(github, REPO, 7, "second")

    assert (created.action, edited.action) == ("created", "updated")
    assert created.comment_id == edited.comment_id not in (theirs, old_pat)
    [ours] = [c for c in fake.comments[(REPO, 7)] if c["id"] == created.comment_id]
    assert ours["user"]["login"] == BOT and ours["body"].endswith("second")
    assert fake.comment_bodies(REPO, 7)[0] == planted
    assert fake.sent("GET", "/user") == []  # an installation is no user: GET /app says who


# --- the check run through the one seam that tells the PR


def report(github: GitHub, **kw: Any) -> PullRequestReport:
    config = PreviewConfig(github_deployments=False)
    return PullRequestReport(github, config, REPO, 7, SHA, run_url="https://ui/run/1", **kw)


def test_a_ready_run_goes_queued_in_progress_success_with_the_tunnel(fake: FakeGitHub) -> None:
    pr = report(app_client(fake, INSTALLATION))
    with pr.check_run():
        pr.tell(PreviewState.LAUNCHING)
        pr.tell(PreviewState.READY, instance_id="i-0123456789abcdef0")
    [history] = fake.check_run_states(REPO, SHA)
    assert history == [("queued", None), ("in_progress", None), ("completed", "success")]
    [run] = fake.check_runs[REPO]
    assert run["name"] == "pr-preview" and run["details_url"] == "https://ui/run/1"
    assert run["output"]["title"] == "✅ Preview ready"
    summary = run["output"]["summary"]
    assert "`i-0123456789abcdef0`" in summary and "aws ssm start-session" in summary
    assert "(https://ui/run/1)" in summary and "<!--" not in summary


def test_a_run_that_raises_fails_its_check_with_secrets_masked(fake: FakeGitHub) -> None:
    pr = report(app_client(fake, INSTALLATION), secrets=[CANARY_GHCR_TOKEN])
    with pytest.raises(TimeoutError), pr.check_run():
        raise TimeoutError(f"lock not acquired; token {CANARY_GHCR_TOKEN}")
    [run] = fake.check_runs[REPO]
    assert run["history"][-1] == ("completed", "failure")
    assert "TimeoutError: lock not acquired" in run["output"]["summary"]
    assert CANARY_GHCR_TOKEN not in run["output"]["summary"]


def test_a_run_past_its_budget_still_concludes_its_check(fake: FakeGitHub) -> None:
    pr = report(app_client(fake, INSTALLATION))
    with pytest.raises(RunTimedOut), run_budget(0.05), pr.check_run():
        time.sleep(0.06)  # the run's whole budget, spent waiting
        check_budget("migrate")
    [history] = fake.check_run_states(REPO, SHA)
    assert history == [("queued", None), ("completed", "failure")]
    assert "budget" in fake.check_runs[REPO][0]["output"]["summary"]


def test_a_crash_report_concludes_the_open_check_of_the_dead_run(fake: FakeGitHub) -> None:
    dead = report(app_client(fake, INSTALLATION))
    dead.tell(PreviewState.LAUNCHING)  # the run was killed here
    other_sha = "9" * 40
    app_client(fake, INSTALLATION).create_check_run(
        REPO, other_sha, "pr-preview", status="in_progress"
    )

    later = report(app_client(fake, INSTALLATION))  # a new process: no id in hand
    later.tell(PreviewState.CRASHED, detail="The preview run crashed.")

    [history] = fake.check_run_states(REPO, SHA)
    assert history == [("in_progress", None), ("completed", "failure")]
    # Another sha's check is left alone.
    assert fake.check_run_states(REPO, other_sha) == [[("in_progress", None)]]


def test_with_a_token_only_there_is_no_check_run(fake: FakeGitHub) -> None:
    github = GitHub("good-token", base_url=fake.base_url, transport=fake.transport)
    pr = report(github)
    with pr.check_run():
        pr.tell(PreviewState.READY, instance_id="i-0123456789abcdef0")
    assert fake.check_runs == {} and fake.sent(path_contains="check-runs") == []
    assert len(fake.sent("POST", "/issues/7/comments")) == 1


def test_an_apps_webhook_delivery_maps_like_the_repository_webhooks() -> None:
    """The App's webhook replaces the repository's: same deliveries, plus the installation."""
    payloads = Path(__file__).parent / "data" / "github-payloads"
    payload = json.loads((payloads / "pull_request.opened.json").read_text())
    from_app = {**payload, "installation": {"id": INSTALLATION, "node_id": "MDIzOkludGVn"}}
    delivery = str(uuid.uuid4())
    expected = event_from_delivery("pull_request", delivery, payload)
    assert expected is not None
    assert event_from_delivery("pull_request", delivery, from_app) == expected


# --- configuration and the key's sources


def test_the_app_key_parameter_stays_out_of_the_instances_reach() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(
            {"github_app_id": 1, "github_app_private_key_parameter": "/pr-preview/app-key"},
            env={},
            use_variable=False,
        )
    assert "github_app_private_key_parameter" in str(raised.value)
    assert "/pr-preview-app/" in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        load_config({"github_app_id": 1}, env={}, use_variable=False)
    assert "exactly one private key source" in str(raised.value)
    with pytest.raises(ConfigError):
        load_config({"github_app_installation_id": 5}, env={}, use_variable=False)
    env = {
        "PR_PREVIEW_GITHUB_APP_ID": "12",
        "PR_PREVIEW_GITHUB_APP_PRIVATE_KEY_SECRET_BLOCK": "github-app-key",
    }
    config = load_config(env=env, use_variable=False)
    assert (config.github_app_id, config.github_app_installation_id) == (12, None)


def test_the_key_is_read_from_parameter_store_and_a_token_is_never_read(
    aws: Any, fake: FakeGitHub
) -> None:
    name = "/pr-preview-app/github-app-key"
    aws.ssm.put_parameter(Name=name, Value=app_key_pair()[0], Type="SecureString")
    config = PreviewConfig(github_app_id=APP_ID, github_app_private_key_parameter=name)
    env = {"GITHUB_TOKEN": "good-token"}
    github = github_from_config(
        config, env=env, transport=fake.transport, ssm=aws.ssm, clock=lambda: fake.now
    )
    assert github.checks_enabled and app_key_pair()[0] not in repr(github)
    github.get_pull(REPO, 7)
    assert all(r.authorization != "Bearer good-token" for r in fake.requests)

    aws.ssm.put_parameter(Name=name, Value="not a key", Type="SecureString", Overwrite=True)
    with pytest.raises(GitHubAppKeyError) as raised:
        app_from_config(config, ssm=aws.ssm)
    assert name in str(raised.value) and "not a key" not in str(raised.value)
    aws.ssm.delete_parameter(Name=name)
    with pytest.raises(GitHubAppKeyError) as raised:
        app_from_config(config, ssm=aws.ssm)
    assert f"no private key in the SecureString parameter {name}" in str(raised.value)


def test_a_throttled_key_read_is_tried_again_and_a_refused_one_is_not(aws: Any) -> None:
    """Without its key the run cannot tell its pull request anything: throttling is waited out."""
    name = "/pr-preview-app/github-app-key"
    aws.ssm.put_parameter(Name=name, Value=app_key_pair()[0], Type="SecureString")
    config = PreviewConfig(
        github_app_id=APP_ID,
        github_app_private_key_parameter=name,
        task_retries=2,
        retry_delay_seconds=0,
    )
    with aws_faults() as faults:
        attach(faults, aws.ssm)
        faults.fail("ssm.GetParameter", "ThrottlingException", status=400, times=2)
        app = app_from_config(config, ssm=aws.ssm)
        assert app is not None and app.private_key == app_key_pair()[0]
        assert faults.calls["ssm.GetParameter"] == 3

        faults.fail("ssm.GetParameter", "AccessDeniedException", status=400)
        with pytest.raises(GitHubAppKeyError):
            app_from_config(config, ssm=aws.ssm)
        assert faults.calls["ssm.GetParameter"] == 4  # a refusal is not tried again


def _another_private_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
