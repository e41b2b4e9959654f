"""``pr-preview doctor``: preflight the account (runbook §2.3) and, with ``--pr``, check the PR's
instance (§0) and diagnose what fails (§7)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from deployments.cli.common import (
    EXIT_WRONG,
    _clients,
    _collect,
    _config,
    _one_line,
    _pr_label,
    _short,
    find_one_running,
)

if TYPE_CHECKING:
    from tasks.config import PreviewConfig
    from tasks.steps.diagnose import Diagnosis
    from tasks.steps.preflight import Check

_STATUS = {"pass": "ok", "warn": "warn", "fail": "FAIL"}


def _first_line(text: str, default: str = "no output") -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else default


def _last_line(text: str, default: str = "no output") -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else default


def instance_checks(
    settings: PreviewConfig, evidence: Mapping[str, str], secrets: Sequence[str] = ()
) -> list[Check]:
    """Runbook §0 read from the §9 evidence: bootstrap, app up, DB TCP, DB connect."""
    from tasks.app.masking import mask_secrets
    from tasks.steps.preflight import Check

    def text(name: str) -> str:
        return mask_secrets(evidence.get(name, ""), secrets)

    checks: list[Check] = []
    marker = text("bootstrap-marker")
    if "bootstrap-done" in marker:
        checks.append(Check("bootstrap", "pass", "user data finished (bootstrap-done)"))
    elif "bootstrap-pending" in marker:
        checks.append(Check("bootstrap", "warn", "user data still running (bootstrap-pending)"))
    else:
        failed = [line for line in marker.splitlines() if "failed at step" in line]
        checks.append(Check("bootstrap", "fail", failed[0] if failed else _first_line(marker)))
    port = text("app-port")
    if f"APP PORT OPEN {settings.app_port}" in port:
        checks.append(Check("app up", "pass", f"127.0.0.1:{settings.app_port} accepts connections"))
    else:
        checks.append(Check("app up", "fail", _first_line(port)))
    if settings.database == "external":
        tcp = text("db-tcp")
        checks.append(Check("DB TCP", "pass" if "DB TCP OK" in tcp else "fail", _first_line(tcp)))
    connect = text("db-connect")
    if "DB CONNECT OK" in connect:
        checks.append(Check("DB connect", "pass", "psycopg2 connected inside the app container"))
    else:
        checks.append(Check("DB connect", "fail", _last_line(connect)))
    return checks


def _print_checks(checks: Sequence[Check]) -> None:
    width = max((len(check.name) for check in checks), default=0)
    for check in checks:
        print(f"  {_STATUS[check.status]:<4}  {check.name:<{width}}  {_one_line(check.detail)}")


def render_diagnosis(diagnosis: Diagnosis) -> str:
    """The diagnosis for a terminal: cause, fix, evidence lines, the other causes seen."""
    lines = [f"Diagnosis (runbook §7): {diagnosis.cause}", f"  Fix: {diagnosis.fix}"]
    if diagnosis.evidence_lines:
        lines += ["  Evidence:", *(f"    {line}" for line in diagnosis.evidence_lines)]
    for finding in diagnosis.also:
        lines.append(f"  Also seen ({finding.key}): {finding.cause}")
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    from tasks.steps.diagnose import diagnose_evidence
    from tasks.steps.preflight import run_preflight

    settings = _config(args)
    clients = _clients(settings)
    report = run_preflight(clients, settings)
    print(f"Preflight (runbook §2.3) in {settings.region}:")
    _print_checks(report.checks)
    healthy = report.passed
    if settings.database == "per-preview":
        from tasks.steps.database import database_host_checks
        from tasks.steps.preflight import Check

        found = database_host_checks(clients, settings)
        print(f"\nDatabase host {settings.db_instance_id} (database: per-preview):")
        _print_checks([Check(name, "pass" if ok else "fail", detail) for name, ok, detail in found])
        healthy = healthy and all(ok for _, ok, _ in found)
    if args.pr is not None:
        preview = find_one_running(clients.ec2, settings, args.pr, args.repo)
        evidence, secrets = _collect(clients, settings, preview)
        checks = instance_checks(settings, evidence, secrets)
        print(
            f"\nOn {preview.instance_id} ({_pr_label(preview.pr_number, preview.repo)},"
            f" sha {_short(preview.sha)}), runbook §0:"
        )
        _print_checks(checks)
        if any(check.status == "fail" for check in checks):
            healthy = False
            diagnosis = diagnose_evidence(
                evidence, secrets=secrets, instance_id=preview.instance_id
            )
            print()
            print(render_diagnosis(diagnosis))
            print(
                f"  All evidence: pr-preview logs {args.pr}"
                + (f" --repo {args.repo}" if args.repo else "")
            )
    print()
    print("All checks passed." if healthy else "Something is wrong: see the FAIL lines above.")
    return 0 if healthy else EXIT_WRONG
