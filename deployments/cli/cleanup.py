"""``pr-preview cleanup``: runbook §9's manual clean-up through the TTL sweeper's own code.

``--expired`` decides with the sweeper's ``plan_sweep``; ``--pr`` and ``--all`` decide by the
request. Terminating and revoking the db-sg rules no live preview uses are the sweeper's steps
(``tasks.steps.sweep``), with the same retries.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from deployments.cli.common import (
    EXIT_WRONG,
    CliError,
    _clients,
    _config,
    _duration,
    _one_line,
    _pr_label,
    _scope,
    _table,
)

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

    from tasks.cloud.instances import TerminateResult
    from tasks.config import PreviewConfig


def _confirm(question: str) -> bool:
    if not sys.stdin or not sys.stdin.isatty():
        raise CliError(
            "refusing to terminate without confirmation: stdin is not a terminal —"
            " rerun with --yes (or --dry-run to only list)"
        )
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _terminate(ec2: EC2Client, settings: PreviewConfig, ids: list[str]) -> TerminateResult:
    """The sweeper's terminate step; batches still throttled after its retries are failures."""
    from tasks.cloud.instances import TerminateFailed
    from tasks.steps.sweep import terminate_expired

    try:
        return terminate_expired(ec2, settings, ids)
    except TerminateFailed as exc:
        if exc.result is None:
            raise
        return exc.result


def cmd_cleanup(args: argparse.Namespace) -> int:
    from tasks.cloud.instances import find_previews
    from tasks.steps.sweep import (
        Decision,
        find_sweep_candidates,
        ids_to_terminate,
        plan_sweep,
        revoke_leftover_db_rules,
    )

    settings = _config(args)
    clients = _clients(settings)
    now = datetime.now(UTC)
    previews = find_previews(clients.ec2, settings.purpose_tag, repo=args.repo, pr_number=args.pr)
    if args.pr is not None and args.repo is None and len({p.repo for p in previews}) > 1:
        repos = ", ".join(
            sorted(p.repo or "no Repo tag" for p in {p.repo: p for p in previews}.values())
        )
        raise CliError(
            f"PR #{args.pr} matches previews of several repos ({repos}): pass --repo owner/name"
        )
    if args.expired:
        decisions = plan_sweep(previews, now, ttl_hours=settings.ttl_hours)
    else:
        reason = f"requested: --pr {args.pr}" if args.pr is not None else "requested: --all"
        decisions = [
            Decision(p, "keep", "tagged pr-preview:keep=true (use --pr to remove it)")
            if args.all and p.keep
            else Decision(p, "terminate", reason)
            for p in previews
        ]
    targets = ids_to_terminate(decisions)
    scope = _scope(settings, args.repo)
    if not decisions:
        print(f"No previews {scope}: nothing to terminate.")
        return 0
    decisions.sort(
        key=lambda d: (d.action != "terminate", d.preview.pr_number or 0, d.preview.repo or "")
    )
    rows = [
        [
            d.action,
            _pr_label(d.preview.pr_number, d.preview.repo),
            d.instance_id,
            d.preview.state,
            f"{_duration(now - d.preview.launch_time)} ago",
            d.reason,
        ]
        for d in decisions
    ]
    print(_table(["ACTION", "PR", "INSTANCE", "STATE", "LAUNCHED", "REASON"], rows))
    print()
    if not targets:
        print(f"Nothing to terminate {scope}.")
        return 0
    count = f"{len(targets)} instance{'s' if len(targets) != 1 else ''}"
    if args.dry_run:
        print(f"Dry run: would terminate {count}; nothing was changed.")
        return 0
    question = f"Terminate these {count}?" if len(targets) > 1 else "Terminate this instance?"
    if not args.yes and not _confirm(question):
        print("Nothing was terminated.")
        return EXIT_WRONG
    result = _terminate(clients.ec2, settings, targets)
    for iid in result.terminated:
        print(f"terminated {iid}")
    for iid in result.already_gone:
        print(f"already gone {iid}")
    # The sweeper's step 4: db-sg /32 rules (runbook §2.5) that no live preview, of any PR, uses.
    live = find_sweep_candidates(clients.ec2, settings)
    for rule in revoke_leftover_db_rules(clients.ec2, settings, live):
        print(f"revoked db-sg rule {rule.cidr} ({rule.description})")
    if result.failed:
        first = next(iter(result.failed.values()))
        raise CliError(
            f"{len(result.failed)} of {len(targets)} instances were not terminated"
            f" ({_one_line(first)}): check the role's ec2:TerminateInstances and rerun"
        )
    print(f"Terminated {len(result.terminated)}, already gone {len(result.already_gone)}.")
    return 0
