"""What sleeping costs in latency and saves in money, for one preview (issue 31).

Prints, from bench/latency_model.py (every number with its source, ESTIMATE or ASSUMPTION
marked): the floors of a push and of ``pr-preview tunnel`` waking a sleeping preview beside a
push to an awake one, and a month of one preview always on, asleep nights and weekends
(prefect.yaml's pr-sleep/pr-wake window), and stopped after ``idle_stop_minutes`` (30) idle
with a typical review pattern — each with its ratio to always on.

    python -m bench.bench_sleep [--instance-type t3.small] [--region ap-northeast-1]
"""

from __future__ import annotations

import argparse

from bench import latency_model as model
from tasks.app.cost import PRICE_SOURCE, VOLUME_SOURCE, format_usd
from tasks.config import PreviewConfig


def report(config: PreviewConfig, idle_minutes: int = model.IDLE_STOP_MINUTES) -> list[str]:
    lines = ["Latency floors (modelled real seconds):"]
    for composition in (model.push_in_place(), model.wake_by_push(), model.wake_by_tunnel()):
        lines.append(
            f"  {composition.title:34} {composition.floor:6.1f} s = {composition.describe()}"
        )
    lines += ["", f"One preview a month, {config.instance_type} in {config.region}:"]
    costs = model.monthly_costs(config, model.sleep_plans(idle_minutes))
    if costs is None:
        return [*lines, f"  no price for {config.instance_type} in {config.region}"]
    always = costs[0].usd
    lines.append(
        f"  {'plan':30} {'running h':>9} {'instance':>9} {'volume':>7} {'total':>7}  ratio"
    )
    for cost in costs:
        lines.append(
            f"  {cost.plan.name:30} {cost.plan.running_hours:9.1f}"
            f" {format_usd(cost.instance_usd):>9} {format_usd(cost.volume_usd):>7}"
            f" {format_usd(cost.usd):>7}  {always / cost.usd:4.1f}× cheaper than always on"
            f"  ({cost.plan.how})"
        )
    lines += [
        "",
        f"Review pattern: {model.REVIEW_PATTERN}.",
        f"Prices: {PRICE_SOURCE}; stopped: {VOLUME_SOURCE}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instance-type", default="t3.small")
    parser.add_argument("--region", default="ap-northeast-1")
    parser.add_argument("--idle-minutes", type=int, default=model.IDLE_STOP_MINUTES)
    args = parser.parse_args()
    config = PreviewConfig(instance_type=args.instance_type, region=args.region)
    print("\n".join(report(config, args.idle_minutes)))


if __name__ == "__main__":
    main()
