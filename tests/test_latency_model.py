"""The arithmetic of bench/latency_model.py: the floors issue 15 quotes, what each lever and
each change takes off them, and what a lever costs a month. No AWS, no Prefect."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bench import latency_model as model
from tasks.app.cost import HOURS_PER_MONTH, SNAPSHOT_GB_MONTH, hourly_price
from tasks.config import PreviewConfig


def test_the_cold_floor_is_the_one_issue_15_quotes() -> None:
    cold = model.new_launch()
    # RunInstances 1.5 + pending→running 16.5 + the stock user data (the SSM agent registers
    # first) + the app's start + one port check + migrate + probe: "a floor of ~72 s".
    assert cold.floor == pytest.approx(72.15)
    assert model.STOCK.app_seconds == model.STOCK.bootstrap_seconds + model.APP_START.seconds
    assert model.bootstrap_seconds() == model.STOCK.bootstrap_seconds


def test_a_baked_ami_waits_for_the_ssm_agent_not_for_dnf() -> None:
    baked = model.new_launch(model.BAKED)
    assert model.BAKED.app_seconds < model.SSM_AGENT_REGISTRATION.seconds
    # Agent ping, bootstrap check and port check each follow the agent today: 30 + 3 × 1 s.
    legs = {leg.what: leg.seconds for leg in baked.legs}
    assert legs["wait-ready SSM after it"] == 3 * model.SSM_COMMAND.seconds
    assert baked.floor == pytest.approx(56.13)
    assert baked.floor > 55, "the baked target needs changes to the flow"


def test_each_baked_change_takes_its_ssm_commands_off_the_floor() -> None:
    ssm = model.SSM_COMMAND.seconds
    today = model.new_launch(model.BAKED).floor
    one_command = model.new_launch(model.BAKED, ("F1",)).floor
    assert today - one_command == pytest.approx(2 * ssm)
    changed = model.new_launch(model.BAKED_MIGRATING, ("F1", "F2", "F3", "F4"))
    # The migration runs on boot while the agent registers; the probe rides the ready command.
    assert model.BAKED_MIGRATING.bootstrap_seconds < model.SSM_AGENT_REGISTRATION.seconds
    assert one_command - changed.floor == pytest.approx(ssm + model.MIGRATION.seconds + ssm)
    assert changed.floor == pytest.approx(49.09)


def test_migrating_on_boot_leaves_the_app_answering_before_bootstrap_is_done() -> None:
    assert model.BAKED_MIGRATING.migrated
    assert model.BAKED_MIGRATING.app_seconds == model.BAKED.app_seconds
    assert model.BAKED_MIGRATING.bootstrap_seconds == pytest.approx(
        model.BAKED.bootstrap_seconds + model.MIGRATION.seconds
    )


def test_every_launch_migrates_on_boot_so_the_cold_floor_drops_too() -> None:
    """F2 on the stock AMI: the migration lengthens the user data (the last event) by its own
    time, but the migrate command after ready is gone and the probe rides the ready command."""
    made = ("F1", "F2", "F3", "F4")
    before = model.new_launch(model.STOCK, ("F3",))
    cold = model.new_launch(model.STOCK_MIGRATING, made)
    assert model.STOCK_MIGRATING.migrated and not model.STOCK.migrated
    assert model.STOCK_MIGRATING.bootstrap_seconds > model.SSM_AGENT_REGISTRATION.seconds
    assert cold.floor == pytest.approx(67.98)
    assert before.floor - cold.floor == pytest.approx(4.17)
    assert all("(made" in change.detail for change in model.CHANGES.values())


def test_a_launch_remembers_its_boot_migrated_until_a_deploy() -> None:
    world = model.World(scale=1.0, boot=model.BAKED_MIGRATING)
    world.launched("i-baked", at=0.0)
    world.booted("i-old")
    assert world.timeline("i-baked").migrated
    assert not world.timeline("i-old").migrated


def test_a_spare_without_the_image_pulls_all_of_it() -> None:
    bare = model.spare_claim(layers=False)
    layered = model.spare_claim(layers=True)
    assert bare.floor - layered.floor == pytest.approx(
        model.IMAGE_PULL_FULL.seconds - model.IMAGE_PULL_CHANGED_LAYERS.seconds
    )
    assert layered.floor == pytest.approx(10.73)  # side by side, retired after (D4), no login (D5)
    assert model.deploy_seconds(layers=False) == pytest.approx(19.65)
    assert model.deploy_seconds() == pytest.approx(5.46)


def test_one_deploy_command_and_skipping_what_has_not_changed() -> None:
    """D1: one SSM round trip for pull, migrate, swap and probe (the app's start now follows
    the swap: the migration runs before it); D2: a push that adds no revision runs no
    migration container (the command checks the label and ``alembic current`` either way)."""
    made = ("F3", "F5", "F6")
    one = model.push_in_place((*made, "D1"))
    skipping = model.push_in_place((*made, "D1", "D2"))
    assert one.floor - skipping.floor == pytest.approx(model.MIGRATION.seconds)
    assert skipping.floor == pytest.approx(6.39)
    # No downtime: the new version starts beside the old and the proxy switches to it.
    stages = model.deploy_stages(layers=True, at_head=True)
    assert (stages.swap, stages.switch) == (
        model.SIDE_BY_SIDE_START.seconds,
        model.SWITCH.seconds,
    )
    assert skipping.floor <= 12, "issue 32: a push live in ≤ 12 s"
    assert model.spare_claim(layers=True).floor <= 15, "issue 32: a new PR on a spare ≤ 15 s"


def test_push_in_place_and_the_health_check_folded_into_the_deploy() -> None:
    assert model.push_in_place().floor == pytest.approx(12.55)
    folded = model.push_in_place(("F5",))
    assert model.push_in_place().floor - folded.floor == model.SSM_COMMAND.seconds
    assert folded.changes == ("F5",)


def test_every_change_named_by_a_composition_is_described() -> None:
    assert {"F1", "F2", "F3", "F4", "F5", "F6", "S1"} <= set(model.CHANGES)
    for measurement in (*model.MEASUREMENTS.values(), *model.REFERENCES.values()):
        assert measurement.source, "every number carries its source or ESTIMATE"


def test_a_world_boots_an_instance_by_its_image() -> None:
    world = model.World(scale=0.5, boot=model.STOCK)
    world.images["ami-0baked"] = model.BAKED
    world.launched("i-stock", at=100.0, image_id="ami-0123")
    world.launched("i-baked", at=100.0, image_id="ami-0baked")
    running = 100.0 + 0.5 * model.PENDING_TO_RUNNING.seconds
    stock, baked = world.timeline("i-stock"), world.timeline("i-baked")
    assert stock.bootstrap_at == pytest.approx(running + 0.5 * model.STOCK.bootstrap_seconds)
    assert baked.bootstrap_at == pytest.approx(running + 0.5 * model.BAKED.bootstrap_seconds)
    assert baked.app_at == pytest.approx(running + 0.5 * model.BAKED.app_seconds)
    world.booted("i-spare", layers=False)
    assert not world.timeline("i-spare").layers


def test_what_a_spare_and_a_baked_image_cost_a_month() -> None:
    config = PreviewConfig.model_validate({"region": "ap-northeast-1", "instance_type": "t3.small"})
    price = hourly_price(config)
    assert price is not None
    spares = model.spare_cost(config, 2)
    assert spares.usd == pytest.approx(2 * HOURS_PER_MONTH * price)
    assert "2 × 730 h" in spares.how
    images = model.baked_cost(3, gigabytes=8.0)
    assert images.usd == pytest.approx(3 * 8.0 * SNAPSHOT_GB_MONTH)


def test_no_price_for_the_instance_type_says_so() -> None:
    config = PreviewConfig.model_validate({"region": "eu-west-3", "instance_type": "m7i.large"})
    cost = model.spare_cost(config, 1)
    assert cost.usd is None
    assert "m7i.large" in cost.how


class _Operation:
    def __init__(self, name: str) -> None:
        self.name = name


def _answered(
    latency: model.LatencyModel, operation: str, parsed: dict[str, Any], moto: float
) -> None:
    """``operation`` came back from moto after ``moto`` seconds of moto's own time."""
    context = {"latency_model_started": time.monotonic() - moto}
    latency.after_call("after-call", _Operation(operation), parsed, context)


def test_the_model_clock_stops_while_moto_answers() -> None:
    latency = model.LatencyModel(scale=1.0)
    world = latency.new_world()
    _answered(latency, "DescribeInstances", {"Reservations": []}, moto=2.0)
    assert world.moto_seconds == pytest.approx(2.0, abs=0.05)
    assert world.at(10.0) == pytest.approx(10.0 - world.moto_seconds)
    # A boot scheduled now on the model's clock is not shortened by the moto time just spent.
    _answered(latency, "RunInstances", {"Instances": [{"InstanceId": "i-1"}]}, moto=0.0)
    assert world.timeline("i-1").running_at == pytest.approx(
        world.now() + model.PENDING_TO_RUNNING.seconds, abs=0.05
    )


def test_reading_a_command_still_running_is_not_taken_out_of_its_time() -> None:
    latency = model.LatencyModel(scale=1.0)
    world = latency.new_world()
    _answered(latency, "GetCommandInvocation", {"Status": "InProgress"}, moto=1.0)
    missing = {"Error": {"Code": "InvocationDoesNotExist"}}
    _answered(latency, "GetCommandInvocation", missing, moto=1.0)
    assert world.moto_seconds == 0.0
    _answered(latency, "GetCommandInvocation", {"Status": "Success"}, moto=1.0)
    assert world.moto_seconds == pytest.approx(1.0, abs=0.05)
    assert world.api_calls == 3


def test_a_wake_by_push_and_by_tunnel_add_the_published_start_and_agent_figures() -> None:
    woken = (
        model.START_INSTANCES_API.seconds
        + model.PENDING_TO_RUNNING_AFTER_START.seconds
        + model.SSM_AGENT_REGISTRATION.seconds
        + model.SSM_COMMAND.seconds
    )
    probe = model.SSM_COMMAND.seconds + model.PROBE_CURL.seconds
    assert model.wake_by_push().floor == pytest.approx(woken + probe + model.push_in_place().floor)
    # The tunnel waits out Session Manager's refusal (~90 s after the start), not the agent.
    tunnel = model.wake_by_tunnel()
    refused_until = model.START_INSTANCES_API.seconds + model.TUNNEL_REFUSED_AFTER_START.seconds
    assert tunnel.floor == pytest.approx(refused_until + model.SESSION_RETRY.seconds / 2)
    assert tunnel.floor > model.wake_by_push().floor - model.push_in_place().floor


def test_a_month_of_one_preview_asleep_costs_a_fraction_of_always_on() -> None:
    config = PreviewConfig(instance_type="t3.small", region="ap-northeast-1")
    plans = model.sleep_plans(30)
    costs = model.monthly_costs(config, plans)
    assert costs is not None
    always, scheduled, idle = costs
    assert always.usd == pytest.approx(730 * 0.0272) and always.volume_usd == 0
    # 50 of 168 hours a week running; the rest the 8 GiB gp3 volume alone.
    running = 730 * 50 / 168
    volume_hour = 0.096 * 8 / 730
    assert scheduled.usd == pytest.approx(running * 0.0272 + (730 - running) * volume_hour)
    day = (3 * (20 + 30) + 4 * (2 + 30)) / 60
    assert idle.plan.running_hours == pytest.approx(day * 730 / 168 * 5)
    assert always.usd / scheduled.usd == pytest.approx(3.08, abs=0.01)
    assert always.usd / idle.usd == pytest.approx(5.84, abs=0.01)
    # A shorter idle window stops it sooner.
    shorter = model.monthly_costs(config, model.sleep_plans(10))
    assert shorter is not None and shorter[2].usd < idle.usd
    assert (
        model.monthly_costs(config.model_copy(update={"instance_type": "c7i.large"}), plans) is None
    )
