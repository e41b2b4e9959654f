"""What a preview costs: the price table, the override, per-second arithmetic, unknown types."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.app.cost import (
    HOURLY_PRICES,
    cost_between,
    format_price,
    format_usd,
    hourly_price,
    preview_cost,
)
from tasks.config import PreviewConfig

LAUNCHED = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def test_the_default_instance_type_and_region_have_a_price() -> None:
    config = PreviewConfig()
    assert (config.region, config.instance_type) == ("ap-northeast-1", "t3.small")
    assert hourly_price(config) == 0.0272


def test_the_table_is_keyed_by_region_and_instance_type() -> None:
    assert hourly_price(PreviewConfig(region="us-east-1", instance_type="t3.medium")) == 0.0416
    assert hourly_price(PreviewConfig(region="ap-northeast-1", instance_type="t3.medium")) == 0.0544
    assert all(price > 0 for price in HOURLY_PRICES.values())


def test_price_per_hour_overrides_the_table_even_for_a_type_it_lacks() -> None:
    assert hourly_price(PreviewConfig(instance_type="t3.small", price_per_hour=0.02)) == 0.02
    assert hourly_price(PreviewConfig(region="eu-west-1", instance_type="m7g.large")) is None
    override = PreviewConfig(region="eu-west-1", instance_type="m7g.large", price_per_hour=0.1)
    assert hourly_price(override) == 0.1
    assert hourly_price(PreviewConfig(price_per_hour=0.0)) == 0.0


def test_cost_is_billed_per_second_and_never_negative() -> None:
    assert cost_between(3.6, LAUNCHED, LAUNCHED + timedelta(seconds=1)) == pytest.approx(0.001)
    assert cost_between(0.0272, LAUNCHED, LAUNCHED + timedelta(minutes=90)) == pytest.approx(0.0408)
    assert cost_between(0.0272, LAUNCHED, LAUNCHED - timedelta(hours=1)) == 0.0


def test_preview_cost_so_far_runs_to_now_and_at_expiry_to_shutdown_at() -> None:
    cost = preview_cost(
        PreviewConfig(),
        LAUNCHED,
        expires_at=LAUNCHED + timedelta(hours=24),
        now=LAUNCHED + timedelta(hours=2, minutes=30),
    )
    assert cost.so_far == pytest.approx(2.5 * 0.0272)
    assert cost.at_expiry == pytest.approx(24 * 0.0272)
    assert (cost.price, cost.overridden) == (0.0272, False)
    assert cost.price_label == "t3.small at $0.0272/h"


def test_a_preview_past_its_shutdown_at_costs_at_least_what_it_has_cost() -> None:
    now = LAUNCHED + timedelta(hours=3)
    cost = preview_cost(PreviewConfig(), LAUNCHED, LAUNCHED + timedelta(hours=1), now)
    assert cost.at_expiry == cost.so_far == pytest.approx(3 * 0.0272)


def test_without_shutdown_at_only_the_cost_so_far_is_known() -> None:
    cost = preview_cost(PreviewConfig(), LAUNCHED, None, LAUNCHED + timedelta(hours=1))
    assert cost.so_far == pytest.approx(0.0272)
    assert cost.at_expiry is None


def test_naive_moments_are_read_as_utc() -> None:
    naive = LAUNCHED.replace(tzinfo=None)
    cost = preview_cost(
        PreviewConfig(), naive, naive + timedelta(hours=10), LAUNCHED + timedelta(hours=5)
    )
    assert cost.so_far == pytest.approx(5 * 0.0272)
    assert cost.at_expiry == pytest.approx(10 * 0.0272)


def test_an_override_is_named_as_the_source_of_the_price() -> None:
    config = PreviewConfig(price_per_hour=0.05)
    cost = preview_cost(config, LAUNCHED, None, LAUNCHED + timedelta(hours=4))
    assert cost.so_far == pytest.approx(0.2)
    assert cost.price_label == "t3.small at $0.0500/h from price_per_hour"


def test_an_unknown_type_has_no_amounts_and_points_at_price_per_hour() -> None:
    config = PreviewConfig(region="eu-west-1", instance_type="t3.nano")
    cost = preview_cost(config, LAUNCHED, LAUNCHED + timedelta(hours=1), LAUNCHED)
    assert (cost.price, cost.so_far, cost.at_expiry) == (None, None, None)
    assert cost.price_label == "no price for t3.nano in eu-west-1; set price_per_hour"


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (0.0, "$0.00"),
        (0.0077, "$0.0077"),
        (0.068, "$0.07"),
        (0.6528, "$0.65"),
        (1234.5, "$1,234.50"),
    ],
)
def test_usd_amounts_keep_small_costs_visible(amount: float, text: str) -> None:
    assert format_usd(amount) == text


def test_prices_show_four_decimals_per_hour() -> None:
    assert format_price(0.0272) == "$0.0272/h"
    assert format_price(0.5) == "$0.5000/h"
