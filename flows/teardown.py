"""Tear down one pull request's preview when it closes (runbook §2.8)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.common import check_inputs, emit_instance_event
from tasks.aws import build_clients
from tasks.config import PreviewConfig, load_config
from tasks.retry import with_config_retries
from tasks.teardown import teardown


@dataclass
class TeardownResult:
    repo: str
    pr_number: int
    terminated: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)


@flow(name="pr-teardown", flow_run_name="pr-{pr_number}-teardown")
def pr_teardown(repo: str, pr_number: int, config: PreviewConfig | None = None) -> TeardownResult:
    """Terminate every instance of ``repo#pr_number``; other PRs and untagged instances stay."""
    check_inputs(repo, pr_number)
    settings = load_config(config)
    clients = build_clients(settings)

    # 1. Terminate exactly this PR's instances (tags Purpose, Repo, PR) and wait for them.
    removed = with_config_retries(teardown, settings)(clients.ec2, settings, repo, pr_number)
    for instance_id in removed.instance_ids:
        emit_instance_event(
            "terminated", instance_id, repo, pr_number, reason="pull request closed"
        )

    result = TeardownResult(repo, pr_number, removed.instance_ids, removed.already_gone)
    create_markdown_artifact(
        markdown=(
            f"## Teardown of {repo}#{pr_number}\n\n"
            f"terminated: {', '.join(result.terminated) or 'nothing was running'}"
        ),
        key=f"pr-{pr_number}-teardown",
        description="pr-preview teardown",
    )
    return result
