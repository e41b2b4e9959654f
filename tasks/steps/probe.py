"""Probe the app from inside the instance (runbook §0, §2.6): nothing listens on the internet.

``curl`` on the instance asks each of ``probe_paths`` in order — ``/healthz`` first, ``/docs``
when the app has no health route — and the first 2xx/3xx answer makes the preview healthy.
Until then it looks again every ``poll_seconds`` up to ``probe_timeout_seconds``. Every answer
is recorded: path, status code (0 when nothing answered), latency as curl measured it.

Given ``ready_ttl_minutes``, the command that gets the healthy answer also moves the shutdown
timer to the ready preview's full TTL, so the flow's confirm-TTL is only the tag (one SSM
round trip less on every preview's critical path).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_delay

from tasks.cloud.aws import AwsClients
from tasks.cloud.on_instance import (
    CURL_MAX_SECONDS,
    ProbeAnswer,
    ProbeResult,
    parse_answer,
    probe_command,
)
from tasks.cloud.ssm import CommandTimeout, poll_wait, run_command
from tasks.config import PreviewConfig
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)


class ProbeFailed(PreviewError):
    """No probe path answered healthy before the deadline; ``answers`` has every try."""

    def __init__(self, message: str, answers: list[ProbeAnswer]) -> None:
        self.answers = answers
        super().__init__(message)


def probe_once(
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    command_timeout: float,
    ready_ttl_minutes: int | None = None,
) -> list[ProbeAnswer]:
    """Each path in order until one the app answers about its health (healthy or not)."""
    answers: list[ProbeAnswer] = []
    for path in settings.probe_paths:
        try:
            result = run_command(
                ssm,
                instance_id,
                probe_command(settings.app_port, path, ready_ttl_minutes),
                timeout_seconds=command_timeout,
                poll_seconds=min(settings.poll_seconds, 1.0),
                comment=f"pr-preview probe {path}"[:100],
            )
        except CommandTimeout as exc:
            answers.append(ProbeAnswer(path, 0, None, str(exc)))
            continue
        answer = parse_answer(path, result.stdout, result.stderr)
        answers.append(answer)
        if answer.decisive:  # healthy, not yet (a 503 of /healthz), or no answer at all
            break
    return answers


def probe_app(
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    timeout_seconds: float | None = None,
    command_timeout_seconds: float = CURL_MAX_SECONDS + 20,
    ready_ttl_minutes: int | None = None,
) -> ProbeResult:
    """Look until a probe path answers 2xx/3xx, at most ``probe_timeout_seconds``."""
    timeout = settings.probe_timeout_seconds if timeout_seconds is None else timeout_seconds
    started = time.monotonic()
    answers: list[ProbeAnswer] = []
    attempts = 0

    def attempt() -> ProbeAnswer | None:
        nonlocal attempts
        attempts += 1
        remaining = max(0.0, timeout - (time.monotonic() - started))
        found = probe_once(
            ssm,
            settings,
            instance_id,
            command_timeout=min(command_timeout_seconds, remaining),
            ready_ttl_minutes=ready_ttl_minutes,
        )
        answers.extend(found)
        return found[-1] if found and found[-1].healthy else None

    def give_up(state: RetryCallState) -> ProbeAnswer:
        last = answers[-len(settings.probe_paths) :]
        seen = "; ".join(
            f"{answer.path} → {answer.status_code or answer.error or 'no answer'}"
            for answer in last
        )
        raise ProbeFailed(
            f"no probe path answered healthy on {instance_id} within {timeout:g}s"
            f" ({attempts} attempts; last: {seen})",
            answers,
        )

    healthy = Retrying(
        stop=stop_after_delay(timeout),
        wait=poll_wait(settings.poll_seconds, timeout),
        retry=retry_if_result(lambda answer: answer is None),
        retry_error_callback=give_up,
    )(attempt)
    assert healthy is not None
    return ProbeResult(
        instance_id=instance_id,
        path=healthy.path,
        status_code=healthy.status_code,
        latency_seconds=healthy.latency_seconds,
        attempts=attempts,
        answers=answers,
        timer_moved=healthy.timer_moved,
    )


@step
def probe(
    clients: AwsClients,
    settings: PreviewConfig,
    instance_id: str,
    ready_ttl_minutes: int | None = None,
) -> ProbeResult:
    """Prefect wrapper; ``ProbeFailed`` is final (the deadline already passed)."""
    result = probe_app(clients.ssm, settings, instance_id, ready_ttl_minutes=ready_ttl_minutes)
    run_logger(logger).info(
        "%s answered %d on %s in %s after %d attempt(s)",
        result.path,
        result.status_code,
        instance_id,
        f"{result.latency_seconds * 1000:.0f} ms" if result.latency_seconds is not None else "?",
        result.attempts,
    )
    return result
