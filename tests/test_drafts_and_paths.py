"""Drafts and path filters: which pull requests ask for a preview (issue 30).

Pure decisions over the configuration, GitHub's pull request and its changed files; the flows
around them are in tests/test_preview_github.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tasks.config import ConfigError, load_config
from tasks.inputs import is_path_glob, path_matches
from tasks.run.outcome import Outcome
from tasks.steps.guards import check_changed_files, check_event, check_pull

PAYLOADS = Path(__file__).parent / "data" / "github-payloads"
REPO = "Codertocat/Hello-World"
SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


def pull(**changes: Any) -> dict[str, Any]:
    found: dict[str, Any] = json.loads((PAYLOADS / "pull_request.opened.json").read_text())[
        "pull_request"
    ]
    return {**found, **changes}


@pytest.mark.parametrize(
    ("path", "pattern", "matches"),
    [
        ("site/guide.md", "site/", True),
        ("src/site/guide.md", "site/", True),  # no slash before the end: any depth
        ("src/site/guide.md", "/site/", False),  # anchored at the root
        ("docs", "docs/", True),
        ("README.md", "*.md", True),
        ("a/b/notes.md", "*.md", True),
        ("a/b/notes.mdx", "*.md", False),
        ("src/app/main.py", "src/**", True),
        ("src/main.py", "src/**/*.py", True),
        ("src/a/b/main.py", "src/**/*.py", True),
        ("lib/src/main.py", "src/**/*.py", False),
        ("a/b/conftest.py", "**/conftest.py", True),
        ("srcx/main.py", "src", False),
        ("a/src", "src", True),
        ("ab", "a?", True),
        ("a/b", "a?", False),
        ("a.b", "a?b", True),  # . is literal
        ("axb", "a.b", False),
    ],
)
def test_path_patterns_follow_gitignore(path: str, pattern: str, matches: bool) -> None:
    assert path_matches(path, [pattern]) is matches


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "..",
        "a/../b",
        "a//b",
        "!docs",
        "a[bc]",
        "{a,b}",
        "a\\b",
        "a**b",
        "a b",
        "docs\n",
        "$(x)",
    ],
)
def test_a_path_pattern_outside_the_strict_grammar_is_refused_at_load(pattern: str) -> None:
    assert not is_path_glob(pattern)
    with pytest.raises(ConfigError, match=r"paths_ignore \(from flow parameters\)"):
        load_config({"paths_ignore": ["docs/**", pattern]}, env={}, use_variable=False)


def test_path_filters_and_skip_drafts_load_from_the_environment() -> None:
    settings = load_config(
        env={"PR_PREVIEW_PATHS": "src/**,*.py", "PR_PREVIEW_SKIP_DRAFTS": "false"},
        use_variable=False,
    )
    assert (settings.paths, settings.paths_ignore) == (["src/**", "*.py"], [])
    assert settings.skip_drafts is False
    assert load_config(env={}, use_variable=False).skip_drafts is True


def test_only_files_that_match_paths_and_not_paths_ignore_ask_for_a_preview() -> None:
    files = ["site/a.md", "src/app.py"]
    assert check_changed_files(7, files, 2, ["src/**"], []).ok
    assert check_changed_files(7, files, 2, [], ["site/"]).ok
    ignored = check_changed_files(7, files, 2, ["src/**"], ["*.py"])
    assert ignored.verdict is Outcome.NO_MATCHING_PATHS
    assert "paths: `src/**`; paths_ignore: `*.py`" in ignored.reason
    assert "app.py" not in ignored.reason  # counts and patterns, never a file name
    # GitHub lists at most 3,000 files: an unlisted one may count, so it launches.
    assert check_changed_files(7, ["site/a.md"], 3001, [], ["site/"]).ok
    assert not check_changed_files(7, [], 0, ["src/**"], []).ok


def test_a_draft_is_skipped_after_closed_and_before_fork_and_superseded() -> None:
    draft = check_pull(pull(draft=True), REPO, SHA, skip_drafts=True)
    assert draft.verdict is Outcome.DRAFT and "ready for review" in draft.reason
    assert check_pull(pull(draft=True), REPO, SHA, skip_drafts=False).ok
    closed = check_pull(pull(draft=True, state="closed"), REPO, SHA, skip_drafts=True)
    assert closed.verdict is Outcome.CLOSED
    newer = check_pull(pull(draft=True), REPO, "0" * 40, skip_drafts=True)
    assert newer.verdict is Outcome.DRAFT
    # Without a token, the event's draft flag decides.
    assert check_event(REPO, REPO, draft=True).verdict is Outcome.DRAFT
    assert check_event(REPO, REPO, draft=False).ok
