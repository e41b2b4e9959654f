"""``pr-preview logs``: the runbook §9 evidence of a PR's instance over SSM, masked, escaped."""

from __future__ import annotations

import argparse

from deployments.cli.common import _clients, _collect, _config, find_one_running, for_terminal


def cmd_logs(args: argparse.Namespace) -> int:
    from tasks.app.masking import mask_secrets
    from tasks.steps.diagnose import evidence_sections

    settings = _config(args)
    clients = _clients(settings)
    preview = find_one_running(clients.ec2, settings, args.pr, args.repo)
    evidence, secrets = _collect(clients, settings, preview)
    titles = {section.name: section.title for section in evidence_sections(settings)}
    for name, text in evidence.items():
        lines = for_terminal(mask_secrets(text, secrets)).rstrip().splitlines()
        print(f"==> {name}: {titles.get(name, name)} <==")
        print("\n".join(lines[-args.tail :]) if lines else "(no output)")
        print()
    return 0
