"""What GitHub's answers mean, read from responses built in memory: nothing is sent."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tasks.github.app import GitHubApp
from tasks.github.sansio import (
    Call,
    Credential,
    GitHubAuthError,
    GitHubError,
    GitHubNotFound,
    GitHubPermissionError,
    GitHubUnavailable,
    checked_repo,
    checked_sha,
    decipher_response,
    is_rate_limit,
    message_of,
    names_app,
    rate_limit_wait,
)
from tasks.run.errors import PreviewError
from tasks.run.retry import is_transient

REPO = "octo-org/app"
NOW = 1_700_000_000.0
TOKEN = Credential("ghp_secret", "the token")
READ = Call()
WRITE = Call(write=True, permission="issues: write")
AS_APP = Call(as_app=True)


def answer(
    status: int,
    message: str | None = None,
    *,
    method: str = "GET",
    path: str = f"/repos/{REPO}/pulls/7",
    **headers: str,
) -> httpx.Response:
    body: dict[str, Any] = {"message": message} if message is not None else {}
    request = httpx.Request(method, f"https://api.github.com{path}")
    names = {key.replace("_", "-"): value for key, value in headers.items()}
    return httpx.Response(status, json=body, headers=names, request=request)


def app(installation_id: int | None = None) -> GitHubApp:
    """An App as errors see it; its key is never parsed, since nothing is signed."""
    return GitHubApp(4242, "not-a-key", installation_id, slug="acme-previews")


# --- rate limits


def test_retry_after_is_the_wait_whatever_the_status() -> None:
    assert rate_limit_wait(answer(429, Retry_After="7"), NOW) == 7.0
    assert rate_limit_wait(answer(503, Retry_After="2"), NOW) == 2.0
    assert rate_limit_wait(answer(403, Retry_After="-5"), NOW) == 0.0


def test_an_exhausted_primary_limit_waits_until_its_reset_and_a_second() -> None:
    limited = answer(
        403, "API rate limit exceeded", X_RateLimit_Remaining="0", X_RateLimit_Reset="1700000030"
    )
    assert rate_limit_wait(limited, NOW) == 31.0
    assert rate_limit_wait(limited, NOW + 100) == 1.0  # the reset has passed: a second


def test_a_secondary_limit_without_a_time_waits_a_minute() -> None:
    assert rate_limit_wait(answer(403, "You have exceeded a secondary rate limit"), NOW) == 60.0
    assert rate_limit_wait(answer(429), NOW) == 60.0
    unreadable = answer(429, Retry_After="soon", X_RateLimit_Remaining="0", X_RateLimit_Reset="x")
    assert rate_limit_wait(unreadable, NOW) == 60.0


def test_other_answers_name_no_wait() -> None:
    assert rate_limit_wait(answer(502), NOW) is None
    assert rate_limit_wait(answer(404, "Not Found"), NOW) is None


def test_a_403_is_a_rate_limit_only_when_github_says_so() -> None:
    assert is_rate_limit(answer(403, "API rate limit exceeded for installation"))
    assert is_rate_limit(answer(403, "x", X_RateLimit_Remaining="0"))
    assert is_rate_limit(answer(403, "x", Retry_After="60"))
    assert not is_rate_limit(answer(403, "Resource not accessible by integration"))
    assert not is_rate_limit(answer(403, "x", X_RateLimit_Remaining="4999"))


# --- errors for a token


def test_5xx_and_rate_limits_are_transient_and_everything_else_is_not() -> None:
    for response in (answer(502, "Bad Gateway"), answer(429), answer(403, "rate limit exceeded")):
        error = decipher_response(response, READ, TOKEN)
        assert type(error) is GitHubUnavailable and is_transient(error), response
    assert "rate limited" in str(decipher_response(answer(429), READ, TOKEN))
    for status in (400, 401, 403, 404, 422):
        assert not is_transient(decipher_response(answer(status, "no"), READ, TOKEN)), status


def test_each_status_says_what_to_do() -> None:
    rejected = decipher_response(answer(401, "Bad credentials"), READ, TOKEN)
    assert type(rejected) is GitHubAuthError and rejected.status == 401
    assert str(rejected).startswith(f"GET /repos/{REPO}/pulls/7 → 401: GitHub rejected the token")
    assert "GITHUB_TOKEN" in str(rejected)

    missing = decipher_response(answer(404, "Not Found"), READ, TOKEN)
    assert type(missing) is GitHubNotFound and "no such object, or the token lacks" in str(missing)

    post = answer(403, "Resource not accessible", method="POST")
    refused = decipher_response(post, WRITE, TOKEN)
    assert type(refused) is GitHubPermissionError
    assert "the token lacks issues: write on this repository" in str(refused)
    invisible = decipher_response(answer(404, "Not Found", method="POST"), WRITE, TOKEN)
    assert type(invisible) is GitHubPermissionError  # a write to a repository we cannot see

    odd = decipher_response(answer(422, "Validation Failed"), READ, TOKEN)
    assert type(odd) is GitHubError and str(odd).endswith("→ 422: Validation Failed")


def test_errors_are_preview_errors_whose_diagnosis_is_the_message() -> None:
    error = decipher_response(answer(404, "Not Found"), READ, TOKEN)
    assert isinstance(error, PreviewError) and error.diagnosis == str(error)


def test_a_message_never_repeats_a_credential() -> None:
    echoed = answer(422, "token ghp_secret is not valid for key -----BEGIN KEY-----")
    error = decipher_response(echoed, READ, TOKEN, secrets=["ghp_secret", "-----BEGIN KEY-----"])
    assert "ghp_secret" not in str(error) and "BEGIN KEY" not in str(error)
    assert str(error).count("****") == 2


def test_a_message_falls_back_to_the_reason_phrase() -> None:
    request = httpx.Request("GET", "https://api.github.com/user")
    assert message_of(httpx.Response(502, text="<html>", request=request)) == "Bad Gateway"
    assert message_of(httpx.Response(404, json=[], request=request)) == "Not Found"
    assert message_of(answer(404, "Not Found")) == "Not Found"


# --- errors for an App


def test_a_refused_jwt_means_the_key_or_the_clock() -> None:
    jwt = Credential("eyJ.jwt", "the JWT", repo=REPO)
    response = answer(401, "A JSON web token could not be decoded", path="/app")
    error = decipher_response(response, AS_APP, jwt, app=app())
    assert type(error) is GitHubAuthError and "new private key" in str(error)
    assert "GitHub App acme-previews (id 4242)" in str(error)
    assert not names_app(response, AS_APP, jwt)  # asking GET /app would be refused too


def test_an_installation_that_cannot_act_says_how_to_install_or_grant() -> None:
    installed = Credential("ghs_token", "the App", repo=REPO, installation=777)
    revoked = decipher_response(answer(401, "Bad credentials"), READ, installed, app=app())
    assert "install the App on the repository again" in str(revoked) and REPO in str(revoked)
    assert names_app(answer(401), READ, installed)

    jwt = Credential("eyJ.jwt", "the JWT", repo=REPO)
    lookup = answer(404, "Not Found", path=f"/repos/{REPO}/installation")
    absent = decipher_response(lookup, AS_APP, jwt, app=app(777))
    assert f"is not installed on {REPO} as installation 777" in str(absent)
    assert names_app(lookup, AS_APP, jwt)

    mint = answer(422, "permissions", method="POST", path="/app/installations/777/access_tokens")
    ungranted = decipher_response(mint, AS_APP, jwt, app=app(777))
    assert type(ungranted) is GitHubAuthError and "checks: write" in str(ungranted)


def test_an_app_lacking_a_permission_on_a_write_is_told_to_grant_it() -> None:
    installed = Credential("ghs_token", "the App (installation 777)", repo=REPO, installation=777)
    refused = decipher_response(answer(403, "no", method="POST"), WRITE, installed, app=app())
    assert type(refused) is GitHubPermissionError
    assert str(refused).endswith("accept them in its installation")
    assert not names_app(answer(403, "no"), WRITE, installed)


def test_a_rate_limit_on_the_apps_own_call_is_still_transient() -> None:
    jwt = Credential("eyJ.jwt", "the JWT", repo=REPO)
    limited = answer(403, "rate limit", path="/app", Retry_After="1")
    assert type(decipher_response(limited, AS_APP, jwt, app=app())) is GitHubUnavailable
    assert not names_app(limited, AS_APP, jwt)


# --- URL parts


@pytest.mark.parametrize("repo", ["octo-org", "../etc/passwd", "a/b/c", "a b/c"])
def test_a_repository_name_outside_githubs_characters_is_refused(repo: str) -> None:
    with pytest.raises(GitHubError, match="is not a repository name"):
        checked_repo(repo)


def test_a_sha_must_be_a_full_commit_sha() -> None:
    assert checked_sha("a" * 40) == "a" * 40
    with pytest.raises(GitHubError, match="is not a commit sha"):
        checked_sha("main")
