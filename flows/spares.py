"""pr-spares: keep ``warm_spares`` running, bootstrapped instances for new pull requests.

Started by ``pr-preview.spare.claimed`` (a preview took one) and on a schedule from
``prefect.yaml``; by hand with ``prefect deployment run pr-spares/pr-spares``.

1. the AMI a launch would use now     2. under the fleet lock: rotate spares of another AMI or
type or near their TTL, launch what is missing    3. report
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from tasks.cloud.aws import build_clients
from tasks.config import RunOverrides, run_config
from tasks.run.budget import run_budget
from tasks.run.events import instance_event
from tasks.run.locks import FLEET_LOCK, hold
from tasks.steps.preflight import preflight
from tasks.steps.spares import Replenished, replenish


@flow(name="pr-spares")
def pr_spares(config: RunOverrides | None = None) -> Replenished:
    """Bring the warm spares to ``warm_spares`` (0 removes them all)."""
    settings = run_config(config)
    clients = build_clients(settings)
    with run_budget(settings.ready_timeout_seconds + settings.lock_wait_seconds):
        # 1. The account as a launch sees it, with the AMI a launch would use now.
        account = preflight(clients, settings)
        if account.ami_id is None:  # preflight fails before this; say so if it ever does not
            raise RuntimeError("preflight found no AMI to build spares from")
        # 2. One fleet change at a time: a claim never meets a spare being rotated.
        lease, wait = settings.lock_lease_seconds, settings.lock_wait_seconds
        with hold(FLEET_LOCK, lease_seconds=lease, timeout_seconds=wait):
            result = replenish(clients, settings, account.ami_id, account.subnet_id)
    # 3. What changed, for the UI and for automations.
    for instance_id in result.launched:
        emit_event(**instance_event("spare.launched", instance_id))
    for instance_id, reason in result.rotated.items():
        emit_event(**instance_event("spare.rotated", instance_id, reason=reason))
    create_markdown_artifact(markdown=result.markdown(), key="pr-spares", description="pr-spares")
    return result
