"""The image build workflow we ship (deployments/github/build-image.yml), read as GitHub reads it.

``make lint`` runs actionlint over it; here: it pushes exactly the tags pr-preview waits for,
and on the default branch the tag a warm spare pulls, with no more permission than pushing
needs, and never for a fork.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tasks.app.user_data import render_spare_user_data
from tasks.config import PreviewConfig

WORKFLOW = Path(__file__).resolve().parents[1] / "deployments" / "github" / "build-image.yml"
SAME_REPO_ONLY = "github.event.pull_request.head.repo.full_name == github.repository"
REPO, FORK = "Octo-Org/Hello-API", "mallory/Hello-API"


def workflow() -> dict[Any, Any]:
    loaded = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(loaded, dict)
    return loaded


def step(job: dict[str, Any], action: str) -> dict[str, Any]:
    [found] = [s for s in job["steps"] if str(s.get("uses", "")).startswith(action + "@")]
    return found


def evaluate(text: str, context: dict[str, str], outputs: dict[str, str]) -> str:
    """``${{ … }}`` expressions of the kinds the tags use, as the runner would expand them."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("steps."):
            return outputs[name]
        return context[name]

    return re.sub(r"\$\{\{\s*([\w.-]+)\s*\}\}", value, text)


def expression(text: str, context: dict[str, Any]) -> Any:
    """A GitHub expression of the kinds the ``if:`` and the concurrency group use (contexts,
    strings, ``==``, ``!``, ``&&``, ``||``), as the runner evaluates it: a missing property is
    null, ``&&`` and ``||`` give an operand as Python's ``and`` and ``or`` do."""
    names = re.sub(r"\bgithub(?:\.[\w-]+)+", lambda m: repr(context.get(m.group(0))), text)
    python = re.sub(r"!(?!=)", " not ", names).replace("&&", " and ").replace("||", " or ")
    return eval(python, {"__builtins__": {}})  # our own workflow's text, not input


def pull_request_event(head_repo: str, number: int = 42) -> dict[str, Any]:
    return {
        "github.event_name": "pull_request",
        "github.repository": REPO,
        "github.ref": f"refs/pull/{number}/merge",
        "github.event.pull_request.number": number,
        "github.event.pull_request.head.repo.full_name": head_repo,
        "github.event.repository.fork": False,
        "github.event.repository.default_branch": "main",
    }


def push_event(branch: str, *, fork: bool = False) -> dict[str, Any]:
    return {
        "github.event_name": "push",
        "github.repository": FORK if fork else REPO,
        "github.ref": f"refs/heads/{branch}",
        "github.ref_name": branch,
        "github.event.repository.fork": fork,
        "github.event.repository.default_branch": "main",
    }


def jobs_run(flow: dict[Any, Any], context: dict[str, Any]) -> set[str]:
    """The jobs whose ``if:`` holds for an event the workflow's triggers let through."""
    return {name for name, job in flow["jobs"].items() if expression(job["if"], context) is True}


def test_it_pushes_the_sha_and_pr_tags_that_pr_preview_waits_for() -> None:
    repo, sha, number = REPO, "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d", "42"
    build = workflow()["jobs"]["build"]
    naming = next(s for s in build["steps"] if s.get("id") == "image")
    # The naming step lower-cases GITHUB_REPOSITORY as bash's ${VAR,,} does.
    assert naming["run"] == 'echo "name=ghcr.io/${GITHUB_REPOSITORY,,}" >> "$GITHUB_OUTPUT"'
    outputs = {"steps.image.outputs.name": f"ghcr.io/{repo.lower()}"}
    context = {
        "github.event.pull_request.head.sha": sha,
        "github.event.pull_request.number": number,
    }

    push = step(build, "docker/build-push-action")
    tags = [evaluate(line, context, outputs) for line in push["with"]["tags"].splitlines()]
    image = PreviewConfig().image_for(repo)  # what check_image polls by default
    assert tags == [f"{image}:{sha}", f"{image}:pr-{number}"]
    assert push["with"]["push"] is True
    assert push["with"]["cache-from"] == "type=gha"
    assert push["with"]["cache-to"].split(",")[0] == "type=gha"

    checkout = step(build, "actions/checkout")
    assert checkout["with"]["ref"] == "${{ github.event.pull_request.head.sha }}"


def test_a_push_to_the_default_branch_pushes_the_tag_a_spare_pulls_by_default() -> None:
    sha = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
    flow = workflow()
    default = PreviewConfig().spare_base_tag
    triggers = flow.get("on", flow.get(True))
    assert triggers["push"] == {"branches": [default]}  # main: spare_base_tag's default
    base = flow["jobs"]["base"]
    naming = next(s for s in base["steps"] if s.get("id") == "image")
    assert naming["run"] == 'echo "name=ghcr.io/${GITHUB_REPOSITORY,,}" >> "$GITHUB_OUTPUT"'
    outputs = {"steps.image.outputs.name": f"ghcr.io/{REPO.lower()}"}
    context = {"github.sha": sha, "github.ref_name": "main"}

    push = step(base, "docker/build-push-action")
    tags = [evaluate(line, context, outputs) for line in push["with"]["tags"].splitlines()]
    image = PreviewConfig().image_for(REPO)
    assert tags == [f"{image}:{sha}", f"{image}:main"]
    assert push["with"]["push"] is True
    assert push["with"]["cache-from"] == "type=gha"
    assert push["with"]["cache-to"].split(",")[0] == "type=gha"
    checkout = step(base, "actions/checkout")
    assert checkout["with"] == {"persist-credentials": False}  # the pushed commit
    # The default configuration's spare pulls exactly that tag.
    spare = render_spare_user_data(PreviewConfig(allowed_repos=[REPO]))
    assert f"docker pull {image}:main" in spare


def test_builds_run_one_at_a_time_per_pull_request_and_per_branch() -> None:
    concurrency = workflow()["concurrency"]
    assert concurrency["cancel-in-progress"] is True
    inner = re.fullmatch(r"build-image-\$\{\{(.+)\}\}", concurrency["group"])
    assert inner is not None
    groups = [
        expression(inner.group(1), context)
        for context in (
            pull_request_event(REPO, 42),
            pull_request_event(REPO, 43),
            push_event("main"),
            push_event("release"),
        )
    ]
    assert groups == [42, 43, "refs/heads/main", "refs/heads/release"]


def test_it_pushes_with_github_token_and_packages_write_only() -> None:
    flow = workflow()
    assert flow["permissions"] == {}  # nothing by default
    assert set(flow["jobs"]) == {"build", "base"}
    for job in flow["jobs"].values():
        assert job["permissions"] == {"contents": "read", "packages": "write"}
        login = step(job, "docker/login-action")
        assert login["with"]["registry"] == "ghcr.io"
        assert login["with"]["password"] == "${{ secrets.GITHUB_TOKEN }}"
    secrets_used = re.findall(r"secrets\.(\w+)", WORKFLOW.read_text())
    assert set(secrets_used) == {"GITHUB_TOKEN"}


def test_no_job_runs_for_a_fork() -> None:
    flow = workflow()
    triggers = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(triggers) == {"pull_request", "push"}  # never pull_request_target
    assert flow["jobs"]["build"]["if"] == SAME_REPO_ONLY
    assert jobs_run(flow, pull_request_event(REPO)) == {"build"}
    assert jobs_run(flow, pull_request_event(FORK)) == set()
    assert jobs_run(flow, push_event("main")) == {"base"}
    assert jobs_run(flow, push_event("main", fork=True)) == set()  # a fork that runs our workflow
    assert jobs_run(flow, push_event("release")) == set()  # not the default branch


def test_every_action_is_pinned_by_a_full_commit_sha_with_its_release_beside_it() -> None:
    """A tag upstream can be moved to other code; a commit sha cannot. The comment says which
    release the sha is, for the reader and for whoever updates it."""
    uses = re.findall(r"(?m)^\s*-?\s*uses:\s*(.*)$", WORKFLOW.read_text())
    steps = [s for job in workflow()["jobs"].values() for s in job["steps"] if "uses" in s]

    assert len(uses) == len(steps) == 8
    for line in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+", line), line
