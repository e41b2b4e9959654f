"""trigger_mode label: which label events concern previews, and which PRs carry the label.

Pure decisions over the configuration, the event and the PR as GitHub returns it; the whole
path (receiver → trigger → flow) is in tests/test_trigger_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tasks.config import ConfigError, load_config
from tasks.run.outcome import Outcome
from tasks.steps.guards import check_event, check_pull, check_trigger

PAYLOADS = Path(__file__).parent / "data" / "github-payloads"
REPO = "Codertocat/Hello-World"


def pull(labels: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = json.loads((PAYLOADS / "pull_request.opened.json").read_text())[
        "pull_request"
    ]
    found["labels"] = [{"name": name, "color": "0e8a16"} for name in labels]
    return found


@pytest.mark.parametrize(
    ("mode", "action", "label", "verdict"),
    [
        ("label", "labeled", "preview", None),
        ("label", "labeled", "Preview", None),  # GitHub's label names ignore case
        ("label", "unlabeled", "preview", None),
        ("label", "labeled", "bug", Outcome.LABEL_IGNORED),
        ("label", "unlabeled", "bug", Outcome.LABEL_IGNORED),
        ("label", "labeled", None, Outcome.LABEL_IGNORED),
        ("all", "labeled", "preview", Outcome.LABEL_IGNORED),
        ("all", "unlabeled", "preview", Outcome.LABEL_IGNORED),
        ("label", "synchronize", None, None),  # the PR's labels decide, in the guard
        ("all", "opened", None, None),
        ("all", "closed", None, None),
    ],
)
def test_which_events_concern_previews(
    mode: str, action: str, label: str | None, verdict: Outcome | None
) -> None:
    assert check_trigger(mode, "preview", action, label).verdict == verdict


def test_the_guard_reads_the_label_from_the_pull_request() -> None:
    labelled, bare = pull(["bug", "preview"]), pull(["bug"])
    sha = labelled["head"]["sha"]

    assert check_pull(labelled, REPO, sha, required_label="preview").ok
    refused = check_pull(bare, REPO, sha, required_label="preview")
    assert refused.verdict is Outcome.NOT_LABELED
    assert "does not carry the 'preview' label" in refused.reason
    assert check_pull(bare, REPO, sha).ok  # trigger_mode all: no label needed


def test_a_closed_pull_request_is_closed_before_it_is_unlabelled() -> None:
    closed = pull([]) | {"state": "closed"}
    assert check_pull(closed, REPO, closed["head"]["sha"], required_label="preview").verdict == (
        Outcome.CLOSED
    )


def test_without_a_token_the_events_labels_decide() -> None:
    assert check_event(REPO, REPO, required_label="preview", labels=["preview"]).ok
    assert check_event(REPO, REPO, required_label="preview", labels=[]).verdict == (
        Outcome.NOT_LABELED
    )
    assert check_event(REPO, REPO, required_label="preview", labels=None).ok  # run by hand


def test_a_run_that_a_label_stopped_says_so_in_its_name() -> None:
    assert Outcome.NOT_LABELED.run_name_suffix == "not-labeled"
    assert Outcome.LABEL_IGNORED.run_name_suffix == "label-ignored"
    assert Outcome.SUPERSEDED.run_name_suffix is None


def test_trigger_mode_and_label_are_checked_at_load() -> None:
    config = load_config(env={"PR_PREVIEW_TRIGGER_MODE": "label"}, use_variable=False)
    assert (config.trigger_mode, config.preview_label) == ("label", "preview")
    assert load_config(use_variable=False, env={}).trigger_mode == "all"
    with pytest.raises(ConfigError, match="trigger_mode"):
        load_config(env={"PR_PREVIEW_TRIGGER_MODE": "labels"}, use_variable=False)
    with pytest.raises(ConfigError, match="preview_label"):
        load_config(env={"PR_PREVIEW_PREVIEW_LABEL": "x" * 51}, use_variable=False)
