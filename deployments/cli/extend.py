"""``pr-preview extend <pr> <duration>``: move a preview's expiry, as ``/preview extend`` does."""

from __future__ import annotations

import argparse

from deployments.cli.common import CliError, _clients, _config, _pr_label, _short


def cmd_extend(args: argparse.Namespace) -> int:
    from tasks.cloud.instances import find_previews
    from tasks.cloud.tags import format_time
    from tasks.github.commands import BadCommand, parse_command
    from tasks.steps.command import extend_preview

    settings = _config(args)
    try:
        # The comment command's grammar and bound (max_ttl_hours), for the same words.
        hours = parse_command(f"/preview extend {args.duration}", settings.max_ttl_hours).hours
    except BadCommand as exc:
        raise CliError(str(exc)) from None
    assert hours is not None
    clients = _clients(settings)
    previews = find_previews(
        clients.ec2,
        settings.purpose_tag,
        repo=args.repo,
        pr_number=args.pr,
        states=("running", "stopped"),
    )
    if not previews:
        raise CliError(f"no running or stopped preview for PR #{args.pr}")
    repos = sorted({p.repo or "-" for p in previews})
    if len(repos) > 1:
        raise CliError(f"PR #{args.pr} has previews in {', '.join(repos)}: pass --repo")
    for preview in previews:
        until = extend_preview(clients, settings, preview, hours)
        print(
            f"{_pr_label(preview.pr_number, preview.repo)} (sha {_short(preview.sha)},"
            f" {preview.instance_id}, {preview.state}): expires at {format_time(until)}"
        )
    return 0
