"""How the TTL sweep scales: sweep time and AWS calls for N expired previews, on in-process moto.

    .venv/bin/python bench/bench_sweeper.py [--sizes 100 1000 2000] [--tags full|minimal]
                                            [--per-launch 10]

Each size gets a fresh moto account with N expired previews (``--per-launch`` instances per
RunInstances; not timed) and one sweep through ``flows.sweeper.sweep`` (the flow's plain inner
function, so no Prefect server is involved). API calls are counted with a botocore
``before-call`` handler, the time inside each operation with ``after-call``; "sweep's own s" is
the rest, our code. Expect ⌈N/1000⌉ TerminateInstances calls and ⌈reservations/100⌉
DescribeInstances pages (moto pages at 100 reservations).

moto itself is superlinear here: it filters every reservation for each page and looks tags up
by scanning, so one preview per RunInstances (``--per-launch 1``, as launches make them) takes
minutes at 2,000. The default of 10 keeps ``make bench`` near a minute.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REGION = "ap-northeast-1"
PURPOSE = "pr-preview-singleton"


@dataclass
class Row:
    previews: int
    create_seconds: float
    sweep_seconds: float
    describe_pages: int
    describe_seconds: float
    terminate_calls: int
    terminate_seconds: float
    terminated: int

    @property
    def own_seconds(self) -> float:
        """The sweep's own work: everything but waiting for moto to answer."""
        return self.sweep_seconds - self.describe_seconds - self.terminate_seconds

    @property
    def per_preview_ms(self) -> float:
        return 1000 * self.sweep_seconds / self.previews


class CallCounter:
    """Counts API calls per operation and the time spent in each."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self._started: dict[str, float] = {}

    def attach(self, client: Any) -> None:
        client.meta.events.register_first("before-call.ec2", self._before)
        client.meta.events.register("after-call.ec2", self._after)

    def _before(self, model: Any, **_: Any) -> None:
        self.calls[model.name] += 1
        self._started[model.name] = time.perf_counter()

    def _after(self, model: Any, **_: Any) -> None:
        self.seconds[model.name] += time.perf_counter() - self._started.pop(model.name)


def tags_for(number: int, expired_at: datetime, kind: str) -> list[Any]:
    from tasks.cloud.tags import format_time

    tags = {"Purpose": PURPOSE, "shutdown-at": format_time(expired_at)}
    if kind == "full":
        tags |= {
            "Repo": "octo-org/app",
            "PR": str(number),
            "Sha": f"{number:040x}",
            "Name": f"pr-{number}-preview",
        }
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def measure(size: int, kind: str, per_launch: int) -> Row:
    from moto import mock_aws

    from tasks.cloud.aws import build_clients
    from tasks.config import load_config
    from tasks.steps.sweep import sweep

    config = load_config({"region": REGION}, env={}, use_variable=False)
    now = datetime.now(UTC)
    with mock_aws():
        ec2 = build_clients(config).ec2
        started = time.perf_counter()
        for first in range(0, size, per_launch):
            count = min(per_launch, size - first)
            ec2.run_instances(
                ImageId="ami-0123456789abcdef0",
                MinCount=count,
                MaxCount=count,
                TagSpecifications=[
                    {
                        "ResourceType": "instance",
                        "Tags": tags_for(first // per_launch + 1, now - timedelta(hours=1), kind),
                    }
                ],
            )
        created = time.perf_counter() - started

        counter = CallCounter()
        counter.attach(ec2)
        started = time.perf_counter()
        report = sweep(ec2, config, now=now)
        swept = time.perf_counter() - started

    assert len(report.terminated) == size, report.summary()
    return Row(
        previews=size,
        create_seconds=created,
        sweep_seconds=swept,
        describe_pages=counter.calls["DescribeInstances"],
        describe_seconds=counter.seconds["DescribeInstances"],
        terminate_calls=counter.calls["TerminateInstances"],
        terminate_seconds=counter.seconds["TerminateInstances"],
        terminated=len(report.terminated),
    )


def render(rows: list[Row]) -> str:
    header = (
        "| previews | sweep s | ms/preview | DescribeInstances pages (s) "
        "| TerminateInstances calls (s) | ⌈N/1000⌉ | sweep's own s | terminated | setup s |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        lines.append(
            f"| {row.previews:,} | {row.sweep_seconds:.2f} | {row.per_preview_ms:.2f} "
            f"| {row.describe_pages} ({row.describe_seconds:.2f}) "
            f"| {row.terminate_calls} ({row.terminate_seconds:.2f}) "
            f"| {math.ceil(row.previews / 1000)} | {row.own_seconds:.3f} "
            f"| {row.terminated:,} | {row.create_seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 2000])
    parser.add_argument(
        "--tags",
        choices=["full", "minimal"],
        default="full",
        help="full: the six launch tags; minimal: Purpose and shutdown-at only",
    )
    parser.add_argument(
        "--per-launch",
        type=int,
        default=10,
        help="instances per RunInstances call (moto pages DescribeInstances at 100 reservations)",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `make bench`
    for name, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": REGION,
        "DO_NOT_TRACK": "1",
    }.items():
        os.environ.setdefault(name, value)
    os.environ.pop("AWS_ENDPOINT_URL", None)

    rows = []
    for size in args.sizes:
        rows.append(measure(size, args.tags, args.per_launch))
        print(f"{size:>6} previews swept in {rows[-1].sweep_seconds:.2f} s", flush=True)
    print()
    print(
        f"TTL sweep on in-process moto, all previews expired, tags: {args.tags}, "
        f"{args.per_launch} instance(s) per RunInstances"
    )
    print(render(rows))


if __name__ == "__main__":
    main()
