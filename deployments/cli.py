"""`pr-preview`: the runbook's day-to-day commands (§0, §6, §8, §9) as one console command.

    pr-preview tunnel 42          open PR 42's preview on http://127.0.0.1:8000 (SSM, §6.2)
    pr-preview list               the previews: PR, sha, instance, state, launched, expires in
    pr-preview logs 42            the §9 evidence of PR 42's instance, collected over SSM, masked
    pr-preview doctor [--pr 42]   preflight, and the §0 checks on PR 42's instance with a diagnosis
    pr-preview cleanup --expired  §9's manual clean-up through the TTL sweeper's own code
    pr-preview receiver | demo    the signed-webhook receiver; the moto demo

The configuration is the flows': ``PR_PREVIEW_*`` environment variables, and the Prefect
Variable ``pr-preview-config`` when ``PREFECT_API_URL`` is set. Every failure is one line
``pr-preview: error: <what to do>`` (exit 2; ``doctor`` exits 1 when a check fails); ``--debug``
adds the traceback. Importing this module has no side effects and loads no AWS or Prefect code:
each command imports what it needs, so ``pr-preview --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

    from tasks.aws import AwsClients
    from tasks.config import PreviewConfig
    from tasks.diagnose import Diagnosis
    from tasks.instances import Preview
    from tasks.preflight import Check

PROG = "pr-preview"
EXIT_WRONG = 1  # doctor: a check failed; cleanup: the operator said no
EXIT_ERROR = 2  # the command could not do its job

SSM_PLUGIN = "session-manager-plugin"
PORT_FORWARDING_DOCUMENT = "AWS-StartPortForwardingSession"
AWS_CLI_INSTALL_URL = (
    "https://docs.aws.amazon.com/cli/latest/userguide/getting-started-install.html"
)
SSM_PLUGIN_INSTALL_URL = (
    "https://docs.aws.amazon.com/systems-manager/latest/userguide/"
    "session-manager-working-with-install-plugin.html"
)
ALL_STATES = ("pending", "running", "stopping", "stopped", "shutting-down", "terminated")
_AWS_CLI_VERSION = re.compile(r"aws-cli/(\d+)\.(\d+)\S*")
_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_DENIED = ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")
_EXPIRED = ("ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidClientTokenId")

Which = Callable[[str], str | None]
Run = Callable[..., "subprocess.CompletedProcess[str]"]


class CliError(Exception):
    """What the operator should do, in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are our one-line errors instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see `{self.prog} --help`)")


# --- argument types -------------------------------------------------------------------------


def _pr_number(text: str) -> int:
    value = text.strip().lstrip("#")
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pull request number")
    return int(value)


def _repo(text: str) -> str:
    if not _REPO.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not owner/name")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


# --- shared helpers -------------------------------------------------------------------------


def _say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def _aws_profile(profile: str | None) -> Iterator[None]:
    """``--profile`` for boto3's default chain (and the AWS CLI it starts), for one command."""
    if not profile:
        yield
        return
    previous = os.environ.get("AWS_PROFILE")
    os.environ["AWS_PROFILE"] = profile
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("AWS_PROFILE", None)
        else:
            os.environ["AWS_PROFILE"] = previous


def _config(args: argparse.Namespace) -> PreviewConfig:
    """The flows' configuration; ``--region`` wins over every other layer."""
    from tasks.config import load_config

    return load_config({"region": args.region} if args.region else None, env=os.environ)


def _clients(config: PreviewConfig) -> AwsClients:
    from tasks.aws import build_clients

    return build_clients(config)


def _duration(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    if minutes < 1:
        return "<1m"
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days}d{hours:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def _short(sha: str | None) -> str:
    return (sha or "-")[:7]


def _pr_label(pr_number: int | None, repo: str | None) -> str:
    if pr_number is None:
        return repo or "-"
    return f"{repo}#{pr_number}" if repo else f"PR #{pr_number}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _scope(config: PreviewConfig, repo: str | None) -> str:
    tags = f"Purpose={config.purpose_tag}" + (f", Repo={repo}" if repo else "")
    return f"in {config.region} ({tags})"


def _expires(preview: Preview, now: datetime) -> str:
    shutdown_at = preview.shutdown_at
    if shutdown_at is None:
        text = "no shutdown-at" if "shutdown-at" not in preview.tags else "shutdown-at unparsable"
    elif shutdown_at <= now:
        text = f"expired {_duration(now - shutdown_at)} ago"
    else:
        text = _duration(shutdown_at - now)
    return f"{text} (keep)" if preview.keep else text


def find_one_running(
    ec2: EC2Client, config: PreviewConfig, pr_number: int, repo: str | None
) -> Preview:
    """The PR's running preview by its tags (runbook §6.3), or a one-line error saying why not."""
    from tasks.instances import find_previews

    previews = find_previews(ec2, config.purpose_tag, repo=repo, pr_number=pr_number)
    running = [preview for preview in previews if preview.state == "running"]
    label = _pr_label(pr_number, repo)
    if not running:
        if previews:
            states = ", ".join(f"{p.instance_id} is {p.state}" for p in previews)
            raise CliError(
                f"no running preview for {label} ({states}): wait for it to start,"
                " then try again (`pr-preview list` shows the state)"
            )
        raise CliError(
            f"no preview for {label} in {config.region} (tag Purpose={config.purpose_tag}):"
            " is the PR open and deployed? `pr-preview list` shows what runs"
        )
    if len(running) > 1:
        listing = ", ".join(
            f"{p.instance_id} ({p.repo or 'no Repo tag'}, sha {_short(p.sha)})" for p in running
        )
        if len({p.repo for p in running}) > 1:
            hint = "pass --repo owner/name to pick one"
        else:
            hint = f"{running[0].instance_id} is older and probably being replaced: try again soon"
        raise CliError(f"{len(running)} running previews for {label}: {listing} — {hint}")
    return running[0]


# --- tunnel (runbook §6) --------------------------------------------------------------------


def tunnel_argv(
    instance_id: str,
    region: str,
    app_port: int,
    local_port: int | None = None,
    profile: str | None = None,
) -> list[str]:
    """Runbook §6.2's ``aws ssm start-session`` for this instance, as an argument vector.

    ``shlex.join`` of it is the command ``tasks.comment.tunnel_command`` puts in the PR comment.
    """
    parameters = f'{{"portNumber":["{app_port}"],"localPortNumber":["{local_port or app_port}"]}}'
    argv = [
        "aws",
        "ssm",
        "start-session",
        "--target",
        instance_id,
        "--document-name",
        PORT_FORWARDING_DOCUMENT,
        "--parameters",
        parameters,
        "--region",
        region,
    ]
    return [*argv, "--profile", profile] if profile else argv


def _run_version(aws: str, run: Run) -> str:
    try:
        done = run([aws, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CliError(
            f"`{aws} --version` failed ({_one_line(exc)}): reinstall the AWS CLI v2 —"
            f" {AWS_CLI_INSTALL_URL}"
        ) from exc
    return f"{done.stdout or ''}\n{done.stderr or ''}"


def check_session_tools(which: Which = shutil.which, run: Run = subprocess.run) -> str:
    """The AWS CLI v2 and the Session Manager plugin (runbook §6.1); returns the CLI's path.

    Both are checked before anything is asked of AWS, and one error names all that is missing.
    """
    problems: list[str] = []
    aws = which("aws")
    if aws is None:
        problems.append(
            f"the AWS CLI v2 is not installed (no `aws` on PATH): {AWS_CLI_INSTALL_URL}"
        )
    else:
        output = _run_version(aws, run)
        match = _AWS_CLI_VERSION.search(output)
        if match is None:
            first = output.strip().splitlines()[0] if output.strip() else "no output"
            problems.append(
                f"`aws --version` does not say aws-cli/2.x ({_one_line(first)}): install the"
                f" AWS CLI v2 — {AWS_CLI_INSTALL_URL}"
            )
        elif int(match.group(1)) < 2:
            problems.append(
                f"`aws` at {aws} is AWS CLI {match.group(0).removeprefix('aws-cli/')}; port"
                f" forwarding needs v2: install it — {AWS_CLI_INSTALL_URL}"
            )
    if which(SSM_PLUGIN) is None:
        problems.append(
            f"the Session Manager plugin is not installed (no `{SSM_PLUGIN}` on PATH):"
            f" {SSM_PLUGIN_INSTALL_URL}"
        )
    if problems:
        raise CliError("; ".join(problems))
    assert aws is not None
    return aws


def cmd_tunnel(args: argparse.Namespace) -> int:
    config = _config(args)
    local_port = args.local_port or config.app_port
    aws = None if args.print else check_session_tools()
    preview = find_one_running(_clients(config).ec2, config, args.pr, args.repo)
    argv = tunnel_argv(
        preview.instance_id, config.region, config.app_port, local_port, args.profile
    )
    if args.print:
        print(shlex.join(argv))
        return 0
    _say(
        f"{_pr_label(preview.pr_number, preview.repo)} (sha {_short(preview.sha)}):"
        f" forwarding 127.0.0.1:{local_port} to {preview.instance_id}:{config.app_port}."
        f" Open http://127.0.0.1:{local_port}/docs — Ctrl+C ends the session."
    )
    sys.stdout.flush()
    try:
        os.execv(aws or "aws", argv)
    except OSError as exc:
        raise CliError(f"could not start `{shlex.join(argv)}`: {_one_line(exc)}") from exc
    return 0  # only reached when execv is replaced (tests)


# --- list -----------------------------------------------------------------------------------


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


# --- logs (runbook §9) ----------------------------------------------------------------------


def _collect(
    clients: AwsClients, config: PreviewConfig, preview: Preview
) -> tuple[dict[str, str], list[str]]:
    """The §9 evidence of ``preview`` (unmasked) and the secrets to mask it with."""
    from tasks.diagnose import collect_evidence, parameter_secrets

    secrets = parameter_secrets(clients.ssm, config)
    _say(
        f"Collecting runbook §9 evidence from {preview.instance_id}"
        f" ({_pr_label(preview.pr_number, preview.repo)}, sha {_short(preview.sha)}) over SSM…"
    )
    evidence = collect_evidence(clients.ssm, preview.instance_id, config)
    unreachable = [text for text in evidence.values() if text.startswith("(SSM could not run")]
    if evidence and len(unreachable) == len(evidence):
        raise CliError(
            f"SSM could not run commands on {preview.instance_id} {_one_line(unreachable[0])}:"
            " check that the agent is online and the instance profile has"
            " AmazonSSMManagedInstanceCore (runbook §7)"
        )
    return evidence, secrets


def cmd_logs(args: argparse.Namespace) -> int:
    from tasks.diagnose import evidence_sections
    from tasks.masking import mask_secrets

    config = _config(args)
    clients = _clients(config)
    preview = find_one_running(clients.ec2, config, args.pr, args.repo)
    evidence, secrets = _collect(clients, config, preview)
    titles = {section.name: section.title for section in evidence_sections(config)}
    for name, text in evidence.items():
        lines = mask_secrets(text, secrets).rstrip().splitlines()
        print(f"==> {name}: {titles.get(name, name)} <==")
        print("\n".join(lines[-args.tail :]) if lines else "(no output)")
        print()
    return 0


# --- doctor (runbook §0, §2.3, §7) ----------------------------------------------------------

_STATUS = {"pass": "ok", "warn": "warn", "fail": "FAIL"}


def _first_line(text: str, default: str = "no output") -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else default


def _last_line(text: str, default: str = "no output") -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else default


def instance_checks(
    evidence: Mapping[str, str], config: PreviewConfig, secrets: Sequence[str] = ()
) -> list[Check]:
    """Runbook §0 read from the §9 evidence: bootstrap, app up, DB TCP, DB connect."""
    from tasks.masking import mask_secrets
    from tasks.preflight import Check

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
    if f"APP PORT OPEN {config.app_port}" in port:
        checks.append(Check("app up", "pass", f"127.0.0.1:{config.app_port} accepts connections"))
    else:
        checks.append(Check("app up", "fail", _first_line(port)))
    if config.database == "external":
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
    from tasks.diagnose import diagnose_evidence
    from tasks.preflight import run_preflight

    config = _config(args)
    clients = _clients(config)
    report = run_preflight(clients, config)
    print(f"Preflight (runbook §2.3) in {config.region}:")
    _print_checks(report.checks)
    healthy = report.passed
    if args.pr is not None:
        preview = find_one_running(clients.ec2, config, args.pr, args.repo)
        evidence, secrets = _collect(clients, config, preview)
        checks = instance_checks(evidence, config, secrets)
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


# --- cleanup (runbook §9, through the TTL sweeper's code) -----------------------------------


def _confirm(question: str) -> bool:
    if not sys.stdin or not sys.stdin.isatty():
        raise CliError(
            "refusing to terminate without confirmation: stdin is not a terminal —"
            " rerun with --yes (or --dry-run to only list)"
        )
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_cleanup(args: argparse.Namespace) -> int:
    from tasks.instances import find_previews, terminate_in_batches
    from tasks.sweep import Decision, ids_to_terminate, plan_sweep

    config = _config(args)
    clients = _clients(config)
    now = datetime.now(UTC)
    previews = find_previews(clients.ec2, config.purpose_tag, repo=args.repo, pr_number=args.pr)
    if args.pr is not None and args.repo is None and len({p.repo for p in previews}) > 1:
        repos = ", ".join(
            sorted(p.repo or "no Repo tag" for p in {p.repo: p for p in previews}.values())
        )
        raise CliError(
            f"PR #{args.pr} matches previews of several repos ({repos}): pass --repo owner/name"
        )
    if args.expired:
        decisions = plan_sweep(previews, now, ttl_hours=config.ttl_hours)
    else:
        reason = f"requested: --pr {args.pr}" if args.pr is not None else "requested: --all"
        decisions = [
            Decision(p, "keep", "tagged pr-preview:keep=true (use --pr to remove it)")
            if args.all and p.keep
            else Decision(p, "terminate", reason)
            for p in previews
        ]
    targets = ids_to_terminate(decisions)
    scope = _scope(config, args.repo)
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
    result = terminate_in_batches(clients.ec2, targets)
    for iid in result.terminated:
        print(f"terminated {iid}")
    for iid in result.already_gone:
        print(f"already gone {iid}")
    _revoke_leftover_db_rules(clients, config)
    if result.failed:
        first = next(iter(result.failed.values()))
        raise CliError(
            f"{len(result.failed)} of {len(targets)} instances were not terminated"
            f" ({_one_line(first)}): check the role's ec2:TerminateInstances and rerun"
        )
    print(f"Terminated {len(result.terminated)}, already gone {len(result.already_gone)}.")
    return 0


def _revoke_leftover_db_rules(clients: AwsClients, config: PreviewConfig) -> None:
    """The sweeper's step 4: db-sg ``/32`` rules (runbook §2.5) no live preview uses."""
    if not (config.db_sg_open_public_ip and config.db_security_group_id):
        return
    from tasks.db_access import leftover_db_rules
    from tasks.instances import find_previews
    from tasks.sweep import db_rules, revoke_db_rules

    group = config.db_security_group_id
    live = find_previews(clients.ec2, config.purpose_tag)
    for rule in revoke_db_rules(
        clients.ec2, group, leftover_db_rules(db_rules(clients.ec2, group), live)
    ):
        print(f"revoked db-sg rule {rule.cidr} ({rule.description})")


# --- receiver, demo -------------------------------------------------------------------------


def cmd_receiver(args: argparse.Namespace) -> int:
    from deployments.receiver import SECRET_ENV, resolve_secret, serve

    try:
        secret = resolve_secret(os.environ, args.secret_block)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from exc
    if not secret and not args.insecure_no_signature:
        raise CliError(
            f"no webhook secret: set {SECRET_ENV} or --secret-block NAME (a Prefect Secret"
            " block), or pass --insecure-no-signature for a local demo"
        )
    try:
        serve(
            args.host,
            args.port,
            secret=secret,
            insecure_no_signature=args.insecure_no_signature,
            prefect_api_url=args.prefect_api_url,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from local_stack import demo

    return demo.main(["--keep"] if args.keep else [])


# --- the parser and main --------------------------------------------------------------------


def _common_options() -> _Parser:
    """Options every command takes, before or after its name."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--region", default=argparse.SUPPRESS, help="AWS region (default: the config's region)"
    )
    common.add_argument(
        "--profile",
        default=argparse.SUPPRESS,
        help="AWS profile, e.g. an SSO profile (default: boto3's chain, AWS_PROFILE)",
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(
        prog=PROG,
        description="Operate PR previews: open a tunnel, list, read logs, diagnose, clean up.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, handler: Callable[[argparse.Namespace], int]) -> Any:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    def repo_option(sub: Any) -> None:
        sub.add_argument("--repo", type=_repo, help="owner/name (the Repo tag)")

    tunnel = command(
        "tunnel", "Forward a local port to a PR's preview over SSM (runbook §6).", cmd_tunnel
    )
    tunnel.add_argument("pr", type=_pr_number, help="pull request number")
    repo_option(tunnel)
    tunnel.add_argument("--local-port", type=_port, help="local port (default: the app port, 8000)")
    tunnel.add_argument(
        "--print", action="store_true", help="print the aws command instead of running it"
    )

    listing = command("list", "List the previews.", cmd_list)
    repo_option(listing)
    listing.add_argument(
        "--all-states", action="store_true", help="include shutting-down and terminated ones"
    )

    logs = command("logs", "Print the runbook §9 evidence of a PR's instance.", cmd_logs)
    logs.add_argument("pr", type=_pr_number, help="pull request number")
    repo_option(logs)
    logs.add_argument(
        "--tail",
        type=_positive,
        default=200,
        help="last lines per section (default 200; the api log is collected to 200 lines)",
    )

    doctor = command(
        "doctor",
        "Preflight the account and, with --pr, check the PR's instance (exit 1 if wrong).",
        cmd_doctor,
    )
    doctor.add_argument("--pr", type=_pr_number, help="also check this PR's instance")
    repo_option(doctor)

    cleanup = command(
        "cleanup", "Terminate previews through the TTL sweeper's code (runbook §9).", cmd_cleanup
    )
    which = cleanup.add_mutually_exclusive_group(required=True)
    which.add_argument("--pr", type=_pr_number, help="every preview of this PR")
    which.add_argument(
        "--expired", action="store_true", help="previews past shutdown-at (the sweeper's rule)"
    )
    which.add_argument(
        "--all", action="store_true", help="every preview not tagged pr-preview:keep=true"
    )
    repo_option(cleanup)
    cleanup.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    cleanup.add_argument("--dry-run", action="store_true", help="only list what would go")

    receiver = command("receiver", "Run the signed GitHub webhook receiver.", cmd_receiver)
    receiver.add_argument("--host", default="127.0.0.1")
    receiver.add_argument("--port", type=_port, default=8080)
    receiver.add_argument(
        "--insecure-no-signature",
        action="store_true",
        help="accept unsigned deliveries (local demo only)",
    )
    receiver.add_argument("--prefect-api-url", help="default: the PREFECT_API_URL setting")
    receiver.add_argument(
        "--secret-block", help="Prefect Secret block with the webhook secret (if no env var)"
    )

    demo = command("demo", "Run the lifecycle demo on moto (make demo).", cmd_demo)
    demo.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    return parser


def describe_error(exc: BaseException) -> str:
    """One actionable line for an exception that escaped a command."""
    from tasks.config import ConfigError

    if isinstance(exc, ConfigError):
        return f"{exc} — fix the PR_PREVIEW_* variable or the Prefect Variable pr-preview-config"
    botocore_exceptions = sys.modules.get("botocore.exceptions")
    if botocore_exceptions is not None:
        found = _describe_botocore(exc, botocore_exceptions)
        if found:
            return found
    return f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)"


def _describe_botocore(exc: BaseException, errors: Any) -> str | None:
    login = "run `aws sso login` (with --profile if you use one) or set AWS credentials"
    if isinstance(exc, errors.NoCredentialsError):
        return f"no AWS credentials found: {login}"
    if isinstance(exc, errors.ProfileNotFound):
        return f"{exc}: check ~/.aws/config or create it with `aws configure sso`"
    sso_errors = tuple(
        getattr(errors, name)
        for name in ("TokenRetrievalError", "SSOTokenLoadError", "UnauthorizedSSOTokenError")
        if hasattr(errors, name)
    )
    if sso_errors and isinstance(exc, sso_errors):
        return f"the AWS SSO session has expired or is missing: {login}"
    if isinstance(exc, errors.EndpointConnectionError):
        return f"cannot reach AWS ({exc}): check the network, the region and AWS_ENDPOINT_URL"
    if isinstance(exc, errors.ClientError):
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), _one_line(error.get("Message", ""))
        operation = getattr(exc, "operation_name", "the call")
        if code in _DENIED:
            return (
                f"AWS refused {operation} ({code}): grant it to your role (runbook §7) — {message}"
            )
        if code in _EXPIRED:
            return f"AWS credentials were refused ({code}): {login}"
        return f"AWS {operation} failed: {code}: {message}"
    if isinstance(exc, errors.BotoCoreError):
        return f"AWS: {exc}"
    return None


def _configure_logging(debug: bool) -> None:
    if debug:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        for name in ("tasks", "flows", "deployments"):
            logging.getLogger(name).setLevel(logging.DEBUG)


def main(argv: list[str] | None = None) -> int:
    """The ``pr-preview`` console script."""
    arguments = sys.argv[1:] if argv is None else argv
    debug = "--debug" in arguments
    try:
        args = build_parser().parse_args(arguments)
        for name, default in (("region", None), ("profile", None), ("debug", False)):
            if not hasattr(args, name):
                setattr(args, name, default)
        debug = args.debug
        _configure_logging(debug)
        with _aws_profile(args.profile):
            return int(args.handler(args))
    except CliError as exc:
        if debug and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(describe_error(exc))}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
