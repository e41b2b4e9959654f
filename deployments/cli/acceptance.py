"""``pr-preview acceptance --stack NAME --repo o/r --pr N --sha A --second-sha B --spend-money``:
what only a real account can show — IAM evaluating the policies, the SSM agent coming online, an
EC2 boot — in one timed, priced run.

    1. open: the preview of ``--sha`` (the ``pr-preview`` flow, action ``opened``);
    2. push: ``--second-sha`` deployed on it (action ``synchronize``);
    3. close: the ``pr-teardown`` flow.

It prints each step's time and what the instances cost (instance-hours at the configured or
listed price, each start billed a minute at least). It refuses to start without AWS credentials
and ``--spend-money``; whatever happens (a failed step, Ctrl+C, SIGTERM) it terminates every
instance of ``repo#pr`` before it returns.
"""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING

from deployments.cli.common import EXIT_WRONG, CliError, _clients, _config, _one_line
from deployments.cli.stack import cloudformation, read_outputs

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

    from tasks.config import PreviewConfig

MINIMUM_BILLED_SECONDS = 60  # EC2 bills every start a minute at least


@dataclass
class Step:
    name: str
    seconds: float = 0.0
    outcome: str = "not run"


def check_credentials(region: str) -> str:
    """Who the run acts as, or an error: a real account costs money, so no guessing."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        identity = boto3.session.Session().client("sts", region_name=region).get_caller_identity()
    except (BotoCoreError, ClientError) as exc:
        raise CliError(
            f"no usable AWS credentials ({_one_line(exc)}): run `aws sso login` or set"
            " AWS_PROFILE, then try again — acceptance starts nothing without them"
        ) from None
    return identity["Arn"]


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP) stop the run the way Ctrl+C does, so the clean-up still runs."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def instances_of(
    ec2: EC2Client, settings: PreviewConfig, repo: str, pr: int
) -> dict[str, datetime]:
    """Every instance of ``repo#pr`` in any state but terminated, by id → launch time."""
    from tasks.cloud.instances import find_previews

    return {
        p.instance_id: p.launch_time
        for p in find_previews(ec2, settings.purpose_tag, repo=repo, pr_number=pr)
    }


def clean_up(ec2: EC2Client, settings: PreviewConfig, repo: str, pr: int) -> list[str]:
    """Terminate whatever of ``repo#pr`` is still there (direct calls: no flow, no lock)."""
    from tasks.cloud.instances import terminate_in_batches

    left = list(instances_of(ec2, settings, repo, pr))
    if left:
        terminate_in_batches(ec2, left)
    return left


def billed_cost(price: float | None, spans: dict[str, tuple[datetime, datetime]]) -> float | None:
    """What the instances cost: each at least a minute, at ``price`` per hour."""
    if price is None:
        return None
    seconds = sum(
        max(MINIMUM_BILLED_SECONDS, (end - start).total_seconds()) for start, end in spans.values()
    )
    return price * seconds / 3600


def run_step(step: Step, action: Callable[[], str]) -> None:
    started = time.monotonic()
    try:
        step.outcome = action()
    finally:
        step.seconds = time.monotonic() - started


def cmd_acceptance(args: argparse.Namespace) -> int:
    from flows.preview import pr_preview
    from flows.teardown import pr_teardown
    from tasks.app.cost import format_usd, hourly_price

    if not args.spend_money:
        raise CliError(
            "acceptance launches real EC2 instances in your account (minutes, cents): rerun"
            " with --spend-money to confirm"
        )
    settings = _config(args)
    who = check_credentials(settings.region)
    read_outputs(cloudformation(settings.region), args.stack)
    clients = _clients(settings)
    repo, pr = args.repo, args.pr
    if instances_of(clients.ec2, settings, repo, pr):
        raise CliError(
            f"{repo}#{pr} already has a preview: pick a pull request without one (--pr), or"
            f" `pr-preview cleanup --pr {pr} --repo {repo}` first"
        )
    print(f"Acceptance of stack {args.stack} in {settings.region} as {who}, {repo}#{pr}")

    def opened() -> str:
        result = pr_preview(repo, pr, args.sha, action="opened")
        if result.status != "ready":
            raise CliError(f"open: {result.status} {result.reason}")
        return f"{result.path} on {result.instance_id}"

    def pushed() -> str:
        result = pr_preview(repo, pr, args.second_sha, action="synchronize")
        if result.status != "ready":
            raise CliError(f"push: {result.status} {result.reason}")
        return f"{result.path} on {result.instance_id}"

    def closed() -> str:
        result = pr_teardown(repo, pr)
        return f"terminated {', '.join(result.terminated) or 'nothing'}"

    steps = [Step("open"), Step("push"), Step("close")]
    actions = [opened, pushed, closed]
    seen: dict[str, datetime] = {}
    failure: BaseException | None = None
    try:
        with sigterm_as_interrupt():
            for step, action in zip(steps, actions, strict=True):
                try:
                    run_step(step, action)
                finally:
                    seen.update(instances_of(clients.ec2, settings, repo, pr))
    except (Exception, KeyboardInterrupt) as exc:
        failure = exc
    finally:
        seen.update(instances_of(clients.ec2, settings, repo, pr))
        left = clean_up(clients.ec2, settings, repo, pr)
    ended = datetime.now(UTC)

    print(f"\n{'STEP':<6} {'SECONDS':>8}  OUTCOME")
    for step in steps:
        print(f"{step.name:<6} {step.seconds:>8.1f}  {step.outcome}")
    price = hourly_price(settings)
    cost = billed_cost(price, {iid: (launched, ended) for iid, launched in seen.items()})
    priced = (
        format_usd(cost)
        if cost is not None
        else f"unknown (set price_per_hour for {settings.instance_type})"
    )
    print(f"\n{len(seen)} instance(s) of {settings.instance_type}: {priced} at most")
    if left:
        print(f"cleaned up: terminated {', '.join(left)}")
    if isinstance(failure, KeyboardInterrupt):
        print("Interrupted: everything it launched is terminated.")
        return 130
    if failure is not None:
        print(f"FAILED: {_one_line(failure)}")
        return EXIT_WRONG
    print("Acceptance passed.")
    return 0
