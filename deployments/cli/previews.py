"""``pr-preview list``: the previews, their PR, sha, instance, state (asleep: why and since
when), age, last activity and idle time (as the sweeper last read them from the instance),
time left, cost so far (running hours, and the volume while stopped) and what sleeping saved
against running around the clock."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from deployments.cli.common import _clients, _config, _duration, _scope, _short, _table

if TYPE_CHECKING:
    from tasks.app.cost import PreviewCost
    from tasks.cloud.instances import Preview
    from tasks.config import PreviewConfig

ALL_STATES = ("pending", "running", "stopping", "stopped", "shutting-down", "terminated")
# Billed by the instance-hour while running, by its volume while asleep; the cost of one
# stopped by someone else, or gone, is not known from its tags.
BILLED_STATES = ("pending", "running")
ASLEEP_STATES = ("stopping", "stopped")


def _expires(preview: Preview, now: datetime) -> str:
    shutdown_at = preview.shutdown_at
    if shutdown_at is None:
        text = "no shutdown-at" if "shutdown-at" not in preview.tags else "shutdown-at unparsable"
    elif shutdown_at <= now:
        text = f"expired {_duration(now - shutdown_at)} ago"
    else:
        text = _duration(shutdown_at - now)
    if preview.keep:
        return f"{text} (keep)"
    return f"{text} (pinned)" if preview.pinned else text


def _cost_cells(cost: PreviewCost | None) -> list[str]:
    """COST SO FAR and AT EXPIRY: ``?`` for an unknown price, ``-`` where nothing applies."""
    from tasks.app.cost import format_usd

    if cost is None:
        return ["-", "-"]
    if cost.so_far is None:
        return ["?", "?"]
    at_expiry = format_usd(cost.at_expiry) if cost.at_expiry is not None else "-"
    return [format_usd(cost.so_far), at_expiry]


def _billed(preview: Preview) -> bool:
    return preview.state in BILLED_STATES or (
        preview.state in ASLEEP_STATES and preview.sleep_state is not None
    )


def _state(preview: Preview, now: datetime) -> str:
    """``running``, or ``stopped: asleep (scheduled) 2h05m`` for a preview pr-preview stopped."""
    if preview.sleep_state and preview.state in ASLEEP_STATES:
        since = preview.slept_at
        slept = f" {_duration(now - since)}" if since else ""
        return f"{preview.state}: asleep ({preview.sleep_state}){slept}"
    return preview.state


def _activity_cells(preview: Preview, now: datetime) -> list[str]:
    """LAST ACTIVE (an SSM session or a connection to the app, as the sweeper last read it
    from the instance) and IDLE (since then, its last deploy or its wake): running PR previews
    only — a stopped one sleeps, a spare serves nobody."""
    if preview.state != "running" or preview.pr_number is None:
        return ["-", "-"]
    active_at = preview.active_at
    last = f"{_duration(now - active_at)} ago" if active_at else "never seen"
    return [last, _duration(now - preview.idle_since())]


def _cost_lines(settings: PreviewConfig, costs: list[PreviewCost]) -> list[str]:
    """The total of the billed previews' costs and the price it rests on."""
    from tasks.app.cost import PRICE_SOURCE, format_price, format_usd, hourly_price, missing_price

    price = hourly_price(settings)
    if price is None:
        return [f"Cost unknown: {missing_price(settings.instance_type, settings.region)}."]
    so_far = sum(cost.so_far or 0.0 for cost in costs)
    at_expiry = sum(cost.at_expiry or 0.0 for cost in costs)
    total = f"Total cost so far {format_usd(so_far)} · at expiry {format_usd(at_expiry)}"
    undated = sum(cost.at_expiry is None for cost in costs)
    if undated:
        total += f" (without the {undated} with no shutdown-at)"
    if settings.price_per_hour is not None:
        basis = f"Priced at {format_price(price)} (price_per_hour)."
    else:
        basis = (
            f"Priced as {settings.instance_type} in {settings.region} at {format_price(price)}:"
            f" {PRICE_SOURCE}; price_per_hour overrides it."
        )
    return [f"{total}.", basis]


def _names(settings: PreviewConfig, previews: list[Preview]) -> dict[str, str]:
    """Instance id → its PR's name in the zone, for the previews whose record exists."""
    from tasks.cloud.dns import fqdn, our_records, record_name, zone_name

    route53 = _clients(settings).route53
    zone_id = settings.dns_zone_id
    if route53 is None or zone_id is None:
        return {}
    zone = zone_name(route53, zone_id)
    held = {fqdn(record["Name"]).lower() for record in our_records(route53, zone_id, zone)}
    names = {}
    for preview in previews:
        if preview.repo and preview.pr_number is not None:
            name = record_name(preview.repo, preview.pr_number, zone)
            if name in held:
                names[preview.instance_id] = name.rstrip(".")
    return names


def cmd_list(args: argparse.Namespace) -> int:
    from tasks.app.cost import format_usd, sleeping_cost
    from tasks.cloud.instances import find_previews
    from tasks.cloud.tags import LIVE_STATES

    settings = _config(args)
    states = ALL_STATES if args.all_states else LIVE_STATES
    previews = find_previews(
        _clients(settings).ec2, settings.purpose_tag, repo=args.repo, states=states
    )
    where = _scope(settings, args.repo)
    if not previews:
        print(f"No previews {where}.")
        return 0
    now = datetime.now(UTC)
    previews.sort(
        key=lambda p: (p.pr_number is None, p.pr_number or 0, p.repo or "", p.launch_time)
    )
    lives = {p.instance_id: sleeping_cost(settings, p, now) for p in previews if _billed(p)}
    costs = {instance_id: life.cost for instance_id, life in lives.items()}
    saved = {
        instance_id: format_usd(life.saved) if life.saved is not None else "?"
        for instance_id, life in lives.items()
    }
    rows = [
        [
            f"#{p.pr_number}" if p.pr_number is not None else "-",
            p.repo or "-",
            _short(p.sha),
            p.instance_id,
            _state(p, now),
            f"{_duration(now - p.launch_time)} ago",
            *_activity_cells(p, now),
            _expires(p, now) if p.state in LIVE_STATES else "-",
            *_cost_cells(costs.get(p.instance_id)),
            saved.get(p.instance_id, "-"),
        ]
        for p in previews
    ]
    header = ["PR", "REPO", "SHA", "INSTANCE", "STATE", "LAUNCHED", "LAST ACTIVE", "IDLE"]
    header += ["EXPIRES IN"]
    header += ["COST SO FAR", "AT EXPIRY", "SAVED ASLEEP"]
    if settings.database == "per-preview":  # each preview's own database and its size
        from tasks.cloud.databases import database_name, human_size
        from tasks.steps.database import preview_databases

        sizes = preview_databases(_clients(settings), settings)
        header.append("DATABASE")
        for preview, row in zip(previews, rows, strict=True):
            name = None
            if preview.repo and preview.pr_number is not None:
                name = database_name(preview.repo, preview.pr_number)
            size = sizes.get(name or "")
            row.append(f"{name} ({human_size(size)})" if name and size is not None else "-")
    if settings.dns_zone_id:  # each preview's name in the VPC, where the zone holds it
        header.append("NAME")
        names = _names(settings, previews)
        for preview, row in zip(previews, rows, strict=True):
            row.append(names.get(preview.instance_id, "-"))
    print(_table(header, rows))
    print(f"\n{len(previews)} preview{'s' if len(previews) != 1 else ''} {where}.")
    for line in _cost_lines(settings, list(costs.values())):
        print(line)
    if settings.idle_stop_minutes is not None:
        print(
            f"The sweeper puts a preview to sleep after {settings.idle_stop_minutes} min idle"
            " (idle_stop_minutes); LAST ACTIVE is as of its last read."
        )
    return 0
