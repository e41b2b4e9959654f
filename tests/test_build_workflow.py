"""The image build workflow we ship (deployments/github/build-image.yml), read as GitHub reads it.

``make lint`` runs actionlint over it; here: it pushes exactly the tags pr-preview waits for,
with no more permission than pushing needs, and never for a fork.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tasks.config import PreviewConfig

WORKFLOW = Path(__file__).resolve().parents[1] / "deployments" / "github" / "build-image.yml"
SAME_REPO_ONLY = "github.event.pull_request.head.repo.full_name == github.repository"


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


def test_it_pushes_the_sha_and_pr_tags_that_pr_preview_waits_for() -> None:
    repo, sha, number = "Octo-Org/Hello-API", "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d", "42"
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


def test_it_pushes_with_github_token_and_packages_write_only() -> None:
    flow = workflow()
    assert flow["permissions"] == {}  # nothing by default
    build = flow["jobs"]["build"]
    assert build["permissions"] == {"contents": "read", "packages": "write"}
    login = step(build, "docker/login-action")
    assert login["with"]["registry"] == "ghcr.io"
    assert login["with"]["password"] == "${{ secrets.GITHUB_TOKEN }}"
    secrets_used = re.findall(r"secrets\.(\w+)", WORKFLOW.read_text())
    assert set(secrets_used) == {"GITHUB_TOKEN"}


def test_no_job_runs_for_a_fork() -> None:
    flow = workflow()
    triggers = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(triggers) == {"pull_request"}  # never pull_request_target
    assert {name: job.get("if") for name, job in flow["jobs"].items()} == {"build": SAME_REPO_ONLY}
