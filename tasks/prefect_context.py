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
