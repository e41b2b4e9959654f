"""What a step may ask of Prefect wherever it runs: in a flow run, or as a plain function."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any


def api_reachable(env: Mapping[str, str]) -> bool:
    """A Prefect API to read Variables and Blocks from: inside a run, or PREFECT_API_URL set."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        return True
    return bool(env.get("PREFECT_API_URL"))


def run_logger(fallback: logging.Logger) -> logging.Logger | logging.LoggerAdapter[Any]:
    """The run's logger (shown in the Prefect UI), or ``fallback`` outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return fallback


def rename_run(suffix: str) -> None:
    """Append ``suffix`` to the current flow run's name, so the runs list says why a run did
    nothing; outside a run (or when the API refuses) the name stays."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    name = f"{context.flow_run.name}-{suffix}"
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(context.flow_run.id, name=name)
    except Exception as exc:  # a cosmetic change must not fail the run
        run_logger(logging.getLogger(__name__)).warning("run not renamed to %s: %s", name, exc)
