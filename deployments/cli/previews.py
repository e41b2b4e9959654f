"""``pr-preview list``: the previews, their PR, sha, instance, state, age and time left."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from deployments.cli.common import _clients, _config, _duration, _scope, _short, _table

if TYPE_CHECKING:
    from tasks.instances import Preview

ALL_STATES = ("pending", "running", "stopping", "stopped", "shutting-down", "terminated")


def _expires(preview: Preview, now: datetime) -> str:
    shutdown_at = preview.shutdown_at
    if shutdown_at is None:
        text = "no shutdown-at" if "shutdown-at" not in preview.tags else "shutdown-at unparsable"
    elif shutdown_at <= now:
        text = f"expired {_duration(now - shutdown_at)} ago"
    else:
        text = _duration(shutdown_at - now)
    return f"{text} (keep)" if preview.keep else text


def cmd_list(args: argparse.Namespace) -> int:
    from tasks.instances import find_previews
    from tasks.tags import LIVE_STATES

    config = _config(args)
    states = ALL_STATES if args.all_states else LIVE_STATES
    previews = find_previews(
        _clients(config).ec2, config.purpose_tag, repo=args.repo, states=states
    )
    where = _scope(config, args.repo)
    if not previews:
        print(f"No previews {where}.")
        return 0
    now = datetime.now(UTC)
    previews.sort(
        key=lambda p: (p.pr_number is None, p.pr_number or 0, p.repo or "", p.launch_time)
    )
    rows = [
        [
            f"#{p.pr_number}" if p.pr_number is not None else "-",
            p.repo or "-",
            _short(p.sha),
            p.instance_id,
            p.state,
            f"{_duration(now - p.launch_time)} ago",
            _expires(p, now) if p.state in LIVE_STATES else "-",
        ]
        for p in previews
    ]
    print(_table(["PR", "REPO", "SHA", "INSTANCE", "STATE", "LAUNCHED", "EXPIRES IN"], rows))
    print(f"\n{len(previews)} preview{'s' if len(previews) != 1 else ''} {where}.")
    return 0
