"""Tell the pull request about a run that crashed, from the server side.

State hooks run in the run's own process, under a runner (a process worker or ``flow.serve``);
a killed run on an ECS or Kubernetes worker gets none. The ``pr-crash-report`` deployment's
trigger in prefect.yaml (an automation on the server) starts this flow for every
``prefect.flow-run.Crashed`` event of a run tagged ``pr-preview``, so the PR hears it either way.
"""

from __future__ import annotations

from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client

from flows.run_end import report_run_end

REPORTED_FLOWS = ("pr-preview", "pr-teardown")


@flow(name="pr-crash-report", flow_run_name="crash-report-{flow_run_id:.8}")
def pr_crash_report(flow_run_id: str) -> str:
    """Report the end of flow run ``flow_run_id`` on its pull request."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        flow_name = client.read_flow(run.flow_id).name
    if flow_name not in REPORTED_FLOWS or run.state is None:
        return f"{flow_name} runs are not reported"
    ended = report_run_end(
        flow_name,
        run.parameters,
        run.state.type.value,
        run_id=run.id,
        message=run.state.message,
    )
    return f"told {ended.repo}#{ended.pr_number}: {ended.state}" if ended else "nothing to tell"
