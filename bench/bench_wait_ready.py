"""How late wait_ready notices a ready instance, and how many AWS calls one wait makes.

On in-process moto with the scripted instance of tests/fakes/ssm.py: the bootstrap marker
appears (and the app port opens) ``READY_AFTER`` seconds after the wait starts. Poll lag is
the time from that moment to wait_ready returning. Calls are counted with a botocore
``before-call`` handler on the clients the wait uses.

Two SSM behaviours: ``moto`` (every command finished when sent) and ``aws-like`` (each
invocation is missing for the first read and runs ``COMMAND_SECONDS``, InProgress meanwhile,
as GetCommandInvocation answers on AWS). The moment of readiness falls at a random phase of
the poll cycle (seeded), so the lag is not flattered by alignment.

Run: .venv/bin/python bench/bench_wait_ready.py
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DO_NOT_TRACK", "1")
for name, value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "ap-northeast-1",
}.items():
    os.environ.setdefault(name, value)
os.environ.pop("AWS_ENDPOINT_URL", None)

from moto import mock_aws  # noqa: E402

from tasks.cloud.aws import AwsClients, build_clients  # noqa: E402
from tasks.config import PreviewConfig  # noqa: E402
from tasks.steps.wait_ready import wait_until_ready  # noqa: E402
from tests.support.ssm import (  # noqa: E402
    BOOTSTRAP_CHECK,
    PORT_CHECK,
    Reply,
    ScriptedInstances,
    at_time,
    plain_instances,
)

READY_AFTER = 2.0
COMMAND_SECONDS = 0.6
POLLS = (0.1, 1.0)
REPEATS = 3


def count_calls(clients: AwsClients) -> Counter[str]:
    calls: Counter[str] = Counter()

    def handler(event_name: str, **_: Any) -> None:
        calls[event_name.removeprefix("before-call.")] += 1

    for client in (clients.ec2, clients.ssm):
        client.meta.events.register("before-call", handler)
    return calls


def one_wait(
    clients: AwsClients, config: PreviewConfig, poll: float, aws_like: bool, ready_after: float
) -> tuple[float, Counter[str]]:
    reads: dict[str, Any] = {"missing_reads": 1, "seconds": COMMAND_SECONDS} if aws_like else {}
    with ScriptedInstances().patched() as fake:
        (instance,) = plain_instances(clients.ec2)
        ready_at = time.monotonic() + ready_after
        fake.respond(
            BOOTSTRAP_CHECK,
            at_time(
                ready_at,
                before=Reply(stdout="bootstrap-pending\n", **reads),
                then=Reply(stdout="bootstrap-done\n", **reads),
            ),
        )
        fake.respond(
            PORT_CHECK,
            at_time(
                ready_at,
                before=Reply(stdout="APP PORT CLOSED 8000\n", exit_code=1, **reads),
                then=Reply(stdout="APP PORT OPEN 8000\n", **reads),
            ),
        )
        calls = count_calls(clients)
        wait_until_ready(
            clients.ec2,
            clients.ssm,
            config.model_copy(update={"poll_seconds": poll}),
            instance,
        )
        lag = time.monotonic() - ready_at
    return lag, calls


def main() -> None:
    rng = random.Random(7)
    with mock_aws():
        clients = build_clients(PreviewConfig.model_validate({"region": "ap-northeast-1"}))
        plain_instances(clients.ec2)  # moto loads its AMIs on the first call (~1-3 s)
        config = PreviewConfig.model_validate({"ready_timeout_seconds": 60})
        print(
            f"wait_ready on moto: bootstrap marker + app port appear {READY_AFTER:g}s (+ a random"
            f" phase) in; aws-like commands run {COMMAND_SECONDS:g}s; calls are per wait"
        )
        print(
            f"{'ssm':8} {'poll s':>6} {'lag mean s':>10} {'lag max s':>9} "
            f"{'SendCommand':>11} {'GetCmdInv':>9} {'DescribeInst':>12}"
        )
        cases = [(mode, poll) for mode in ("moto", "aws-like") for poll in POLLS]
        cases.append(("aws-like", 5.0))  # the default poll_seconds
        for mode, poll in cases:
            lags: list[float] = []
            totals: Counter[str] = Counter()
            repeats = 1 if poll >= 5 else REPEATS
            for _ in range(repeats):
                ready_after = max(READY_AFTER, poll + 1.0) + rng.uniform(0, poll)
                lag, calls = one_wait(clients, config, poll, mode == "aws-like", ready_after)
                lags.append(lag)
                totals.update(calls)
            print(
                f"{mode:8} {poll:>6g} {statistics.mean(lags):>10.3f} {max(lags):>9.3f} "
                f"{totals['ssm.SendCommand'] / repeats:>11.1f} "
                f"{totals['ssm.GetCommandInvocation'] / repeats:>9.1f} "
                f"{totals['ec2.DescribeInstances'] / repeats:>12.1f}"
            )


if __name__ == "__main__":
    main()
