"""What a flow run left on the Prefect server: its log messages and its artifacts' bodies."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, LogFilter
from prefect.states import State


def record(state: State[Any]) -> tuple[list[str], list[str]]:
    """Log messages and artifact bodies of the flow run behind ``state``."""
    run_id: UUID = state.state_details.flow_run_id  # type: ignore[assignment]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run_id]}))
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id={"any_": [run_id]}),
            artifact_filter=ArtifactFilter(),
        )
    return [log.message for log in logs], [str(a.data) for a in artifacts]
