"""What a preview costs: instance-hours at the instance type's on-demand price.

The table holds Linux on-demand prices in USD per hour for the instance types a preview is
likely to use, in the regions the runbook and the AWS default use. Prices change: a team
sets ``price_per_hour`` in the configuration to override the table (a Savings Plan, another
region, another type), and the table says where its numbers come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from tasks.cloud.instances import Preview
from tasks.config import PreviewConfig

PRICE_SOURCE = (
    "AWS EC2 On-Demand pricing, Linux, shared tenancy (aws.amazon.com/ec2/pricing/on-demand),"
    " as listed in 2025"
)
# (region, instance type) → USD per instance-hour.
HOURLY_PRICES: dict[tuple[str, str], float] = {
    ("ap-northeast-1", "t3.micro"): 0.0136,
    ("ap-northeast-1", "t3.small"): 0.0272,
    ("ap-northeast-1", "t3.medium"): 0.0544,
    ("ap-northeast-1", "t3.large"): 0.1088,
    ("ap-northeast-1", "t3.xlarge"): 0.2176,
    ("us-east-1", "t3.micro"): 0.0104,
    ("us-east-1", "t3.small"): 0.0208,
    ("us-east-1", "t3.medium"): 0.0416,
    ("us-east-1", "t3.large"): 0.0832,
    ("us-east-1", "t3.xlarge"): 0.1664,
}
# EBS snapshot storage (standard tier), USD per GB-month: what a baked AMI costs while kept.
SNAPSHOT_GB_MONTH = 0.05
SNAPSHOT_SOURCE = "AWS EBS pricing, snapshots, standard tier (aws.amazon.com/ebs/pricing)"
HOURS_PER_MONTH = 730  # AWS's own monthly convention
# A stopped preview still pays for its root volume: gp3, USD per GB-month, and AL2023's 8 GiB.
VOLUME_GB_MONTH: dict[str, float] = {"ap-northeast-1": 0.096, "us-east-1": 0.08}
VOLUME_SOURCE = "AWS EBS pricing, gp3 volumes (aws.amazon.com/ebs/pricing), as listed in 2025"
ROOT_VOLUME_GB = 8


def hourly_price(settings: PreviewConfig) -> float | None:
    """USD per hour of one preview instance, or None when neither the config nor the table
    knows ``instance_type`` in ``region``."""
    if settings.price_per_hour is not None:
        return settings.price_per_hour
    return HOURLY_PRICES.get((settings.region, settings.instance_type))


def volume_hourly_price(region: str, gb: int = ROOT_VOLUME_GB) -> float:
    """USD per hour of a stopped preview's root volume (0 for a region the table lacks)."""
    return VOLUME_GB_MONTH.get(region, 0.0) * gb / HOURS_PER_MONTH


def cost_between(price: float, start: datetime, end: datetime) -> float:
    """USD for one instance running from ``start`` to ``end`` (per-second billing)."""
    return max(0.0, (end - start).total_seconds()) / 3600 * price


def format_usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 0.01 or amount == 0 else f"${amount:.4f}"


def format_price(price: float) -> str:
    return f"${price:.4f}/h"


def missing_price(instance_type: str, region: str) -> str:
    return f"no price for {instance_type} in {region}; set price_per_hour"


@dataclass(frozen=True)
class PreviewCost:
    """What one preview instance has cost by some moment, and what it will have cost when its
    ``shutdown-at`` comes. Amounts are None when the price is unknown (``at_expiry`` also
    without a ``shutdown-at``)."""

    instance_type: str
    region: str
    price: float | None
    overridden: bool
    so_far: float | None
    at_expiry: float | None

    @property
    def price_label(self) -> str:
        """``t3.small at $0.0272/h``, or where the price is missing and what to set."""
        if self.price is None:
            return missing_price(self.instance_type, self.region)
        label = f"{self.instance_type} at {format_price(self.price)}"
        return f"{label} from price_per_hour" if self.overridden else label


def preview_cost(
    settings: PreviewConfig, launched_at: datetime, expires_at: datetime | None, now: datetime
) -> PreviewCost:
    """The cost of a preview launched at ``launched_at`` (EC2's LaunchTime), as of ``now``.

    A preview still running past its ``shutdown-at`` costs until it is gone: its cost at expiry
    is never less than its cost so far.
    """
    price = hourly_price(settings)
    launched_at, now = _utc(launched_at), _utc(now)
    so_far = at_expiry = None
    if price is not None:
        so_far = cost_between(price, launched_at, now)
        if expires_at is not None:
            at_expiry = cost_between(price, launched_at, max(_utc(expires_at), now))
    return PreviewCost(
        instance_type=settings.instance_type,
        region=settings.region,
        price=price,
        overridden=settings.price_per_hour is not None,
        so_far=so_far,
        at_expiry=at_expiry,
    )


@dataclass(frozen=True)
class SleepingCost:
    """A preview's cost over its life so far, counting running hours at the instance price and
    stopped hours at its volume's, and what running around the clock would have cost."""

    cost: PreviewCost
    running_hours: float
    stopped_hours: float
    always_on: float | None

    @property
    def saved(self) -> float | None:
        if self.always_on is None or self.cost.so_far is None:
            return None
        return max(0.0, self.always_on - self.cost.so_far)


def sleeping_cost(settings: PreviewConfig, preview: Preview, now: datetime) -> SleepingCost:
    """The cost of ``preview`` as of ``now`` from its tags (tasks/cloud/power.py): until its
    ``shutdown-at`` it runs on if it runs now, and stays asleep if it sleeps now."""
    price, now = hourly_price(settings), _utc(now)
    volume = volume_hourly_price(settings.region)
    ran, slept = preview.ran_seconds(now) / 3600, preview.slept_seconds(now) / 3600
    so_far = at_expiry = always_on = None
    if price is not None:
        so_far = ran * price + slept * volume
        always_on = (ran + slept) * price
        expires_at = preview.shutdown_at
        if expires_at is not None:
            rate = price if preview.state in ("pending", "running") else volume
            at_expiry = so_far + max(0.0, (_utc(expires_at) - now).total_seconds()) / 3600 * rate
    cost = PreviewCost(
        instance_type=settings.instance_type,
        region=settings.region,
        price=price,
        overridden=settings.price_per_hour is not None,
        so_far=so_far,
        at_expiry=at_expiry,
    )
    return SleepingCost(cost, ran, slept, always_on)


def _utc(moment: datetime) -> datetime:
    """EC2 and the tags speak UTC; a naive moment is read as UTC rather than refused."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
