"""The preview of one pull request: the runbook's workflow (§2) as a Prefect flow."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from flows.common import check_inputs, emit_instance_event
from tasks.aws import build_clients
from tasks.config import PreviewConfig, load_config
from tasks.instances import format_time
from tasks.launch import LaunchSpec, launch
from tasks.preflight import preflight
from tasks.retry import with_config_retries
from tasks.terminate import terminate


@dataclass
class PreviewResult:
    repo: str
    pr_number: int
    sha: str
    status: str
    instance_id: str | None = None
    shutdown_at: datetime | None = None
    region: str = ""
    replaced: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        expires = format_time(self.shutdown_at) if self.shutdown_at else "—"
        return "\n".join(
            [
                f"## Preview of {self.repo}#{self.pr_number}: {self.status}",
                "",
                "| | |",
                "| --- | --- |",
                f"| sha | `{self.sha}` |",
                f"| instance | `{self.instance_id or '—'}` ({self.region}) |",
                f"| expires at | {expires} |",
                f"| replaced | {', '.join(self.replaced) or '—'} |",
            ]
        )


@flow(name="pr-preview", flow_run_name="pr-{pr_number}-{head_sha:.7}")
def pr_preview(
    repo: str,
    pr_number: int,
    head_sha: str,
    action: str = "synchronize",
    config: PreviewConfig | None = None,
) -> PreviewResult:
    """Give pull request ``repo#pr_number`` a preview of ``head_sha`` on its own EC2 instance."""
    check_inputs(repo, pr_number, head_sha)
    settings = load_config(config)
    logger = get_run_logger()
    result = PreviewResult(repo, pr_number, head_sha, status="skipped", region=settings.region)
    if action == "closed":
        logger.info("%s#%d is closed: nothing is launched", repo, pr_number)
        return result
    clients = build_clients(settings)

    # 1. Preflight: AMI, subnet, security groups, instance profile, DryRun (runbook §2.3).
    report = with_config_retries(preflight, settings)(
        clients, settings, key=f"pr-{pr_number}-preflight"
    )

    # 2. Terminate this PR's instances at older shas, and evict beyond max_previews (§2.4).
    replaced = with_config_retries(terminate, settings)(
        clients.ec2, settings, repo, pr_number, keep_sha=head_sha
    )
    result.replaced = replaced.instance_ids

    # 3. Launch with the TTL tag, IMDSv2 and the bootstrap user data (§2.4, §3).
    launched = with_config_retries(launch, settings)(
        clients.ec2,
        settings,
        LaunchSpec(repo, pr_number, head_sha),
        ami_id=report.ami_id,
        subnet_id=report.subnet_id,
        attempt_key=str(flow_run.get_id() or ""),
    )
    result.instance_id, result.shutdown_at = launched.instance_id, launched.shutdown_at
    result.status = "reused" if launched.reused else "launched"
    if not launched.reused:
        emit_instance_event(
            "launched",
            launched.instance_id,
            repo,
            pr_number,
            sha=head_sha,
            shutdown_at=format_time(launched.shutdown_at),
        )

    create_markdown_artifact(
        markdown=result.markdown(), key=f"pr-{pr_number}-preview", description="pr-preview"
    )
    return result
