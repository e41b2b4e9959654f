"""What a repository, a pull request number, a sha and an allow-list entry may look like."""

from __future__ import annotations

import pytest

from tasks.config import ConfigError, load_config
from tasks.inputs import check_inputs, is_repo, is_repo_pattern, is_sha, repo_allowed


@pytest.mark.parametrize("repo", ["octo-org/hello-api", "a/b", "A.B/c_d-e"])
def test_good_repositories(repo: str) -> None:
    assert is_repo(repo)


@pytest.mark.parametrize(
    "repo", ["a/b\n", "../..", "a/..", "./b", "a", "a/b/c", "a b/c", "a/$(touch x)", ""]
)
def test_bad_repositories_are_refused_whole(repo: str) -> None:
    assert not is_repo(repo)
    with pytest.raises(ValueError, match="owner/name"):
        check_inputs(repo, 1)


@pytest.mark.parametrize(
    "sha", ["abcdef1\n", "ABCDEF1", "abc", "g" * 40, "a" * 41, "a" * 63, "a" * 65, "A" * 64]
)
def test_bad_shas_are_refused_whole(sha: str) -> None:
    assert not is_sha(sha)
    with pytest.raises(ValueError, match="7-40 or 64 lowercase hex"):
        check_inputs("a/b", 1, sha)


@pytest.mark.parametrize("sha", ["abcdef1", "0" * 40, "0123456789abcdef" * 4], ids=len)
def test_sha1_and_sha256_commit_ids_are_taken(sha: str) -> None:
    """GitHub serves SHA-256 repositories: their commit ids are 64 hex digits."""
    assert is_sha(sha)
    check_inputs("a/b", 1, sha)


@pytest.mark.parametrize("number", [0, -1, True])
def test_bad_pr_numbers(number: int) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        check_inputs("a/b", number)


@pytest.mark.parametrize(
    ("repo", "patterns", "allowed"),
    [
        ("acme/shop", ["acme/shop"], True),
        ("ACME/Shop", ["acme/shop"], True),
        ("acme/shop-evil", ["acme/shop"], False),
        ("acme/shop", ["acme/*"], True),
        ("acme-evil/shop", ["acme/*"], False),
        ("evil/acme", ["acme/*"], False),
        ("acme/shop", [], False),
    ],
)
def test_allowed_repos_match_whole_segments_ignoring_case(
    repo: str, patterns: list[str], allowed: bool
) -> None:
    assert repo_allowed(repo, patterns) is allowed


def test_allow_list_entries_are_checked_at_load() -> None:
    assert is_repo_pattern("acme/*") and not is_repo_pattern("*/*")
    with pytest.raises(ConfigError, match="allowed_repos"):
        load_config({"allowed_repos": ["acme"]}, env={}, use_variable=False)
    loaded = load_config(
        {}, env={"PR_PREVIEW_ALLOWED_REPOS": "acme/*,Octo/App"}, use_variable=False
    )
    assert loaded.allowed_repos == ["acme/*", "Octo/App"]
