"""`pr-preview`: the runbook's day-to-day commands (§0, §6, §8, §9) as one console command.

    pr-preview tunnel 42          open PR 42's preview on http://127.0.0.1:8000 (SSM, §6.2)
    pr-preview list               the previews: PR, sha, instance, state, launched, expires in
    pr-preview logs 42            the §9 evidence of PR 42's instance, collected over SSM, masked
    pr-preview doctor [--pr 42]   preflight, and the §0 checks on PR 42's instance with a diagnosis
    pr-preview cleanup --expired  §9's manual clean-up through the TTL sweeper's own code
    pr-preview receiver | demo    the signed-webhook receiver; the moto demo
    pr-preview setup --stack S    from the deployed stack to a working installation
    pr-preview teardown-all       every preview, spare and baked image gone: the stack deletes
    pr-preview acceptance         a real account's check: open, push, close, timed and priced

The configuration is the flows': ``PR_PREVIEW_*`` environment variables, and the Prefect
Variable ``pr-preview-config`` when ``PREFECT_API_URL`` is set. Every failure is one line
``pr-preview: error: <what to do>`` (exit 2; ``doctor`` exits 1 when a check fails); ``--debug``
adds the traceback. Importing this package has no side effects and loads no AWS or Prefect code:
each command imports what it needs, so ``pr-preview --help`` is instant.

This module is the parser and ``main``; each command is a module of its own (``tunnel``,
``previews`` for ``list``, ``logs``, ``doctor``, ``cleanup``, ``receiver``, ``demo``) and
``common`` holds what they share.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from deployments.cli.acceptance import cmd_acceptance
from deployments.cli.cleanup import cmd_cleanup
from deployments.cli.common import (
    EXIT_ERROR,
    EXIT_WRONG,
    PROG,
    CliError,
    _aws_profile,
    _one_line,
    _port,
    _positive,
    _pr_number,
    _repo,
    _repo_pattern,
    _sha,
    build_clients,
    describe_error,
    find_one_running,
)
from deployments.cli.databases import cmd_refresh_template
from deployments.cli.demo import cmd_demo
from deployments.cli.doctor import cmd_doctor, instance_checks, render_diagnosis
from deployments.cli.extend import cmd_extend
from deployments.cli.logs import cmd_logs
from deployments.cli.previews import cmd_list
from deployments.cli.receiver import DEFAULT_SPOOL, cmd_receiver
from deployments.cli.setup import cmd_setup
from deployments.cli.stack import stack_name
from deployments.cli.teardown_all import cmd_teardown_all
from deployments.cli.tunnel import check_session_tools, cmd_tunnel
from tasks.cloud.databases import DUMP_PATH_PATTERN
from tasks.cloud.tunnel import tunnel_argv
from tasks.config import PG_IDENTIFIER_PATTERN

__all__ = [
    "EXIT_ERROR",
    "EXIT_WRONG",
    "PROG",
    "CliError",
    "build_parser",
    "check_session_tools",
    "describe_error",
    "find_one_running",
    "instance_checks",
    "main",
    "render_diagnosis",
    "tunnel_argv",
]

# How every command gets its AWS clients (``common._clients`` reads this name when called):
# replace it here to give all commands other clients.
_clients = build_clients


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are our one-line errors instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            # What was not understood may be a secret typed where a file name belongs: name the
            # options only, never the values.
            options = [word for word in message.split()[2:] if word.startswith("-")]
            message = f"unrecognized arguments: {' '.join(options) or '(values not shown)'}"
        raise CliError(f"{message} (see `{self.prog} --help`)")


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


def _pg_name(value: str) -> str:
    if not PG_IDENTIFIER_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError("a PostgreSQL name: lower-case letters, digits, _")
    return value


def _host_path(value: str) -> str:
    if not DUMP_PATH_PATTERN.fullmatch(value) or "/../" in f"{value}/" or "/./" in f"{value}/":
        raise argparse.ArgumentTypeError("an absolute path of letters, digits and ._- segments")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(
        prog=PROG,
        description="Operate PR previews: open a tunnel, list, read logs, diagnose, clean up.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, handler: Callable[[argparse.Namespace], int]) -> Any:
        sub = commands.add_parser(
            name, help=help_text, description=help_text, parents=[common], allow_abbrev=False
        )
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

    extend = command(
        "extend",
        "Move a PR's preview expiry to DURATION from now (8h, 90m; at most max_ttl_hours), as"
        " /preview extend does: the shutdown-at tag and the on-instance timer.",
        cmd_extend,
    )
    extend.add_argument("pr", type=_pr_number, help="pull request number")
    extend.add_argument("duration", help="whole hours or minutes: 8h, 90m")
    repo_option(extend)

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

    refresh = command(
        "refresh-template",
        "Rebuild template_database on the database host from a database or a dump file there"
        " (database: per-preview); mask personal data in the source first (README).",
        cmd_refresh_template,
    )
    source = refresh.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-database", type=_pg_name, metavar="NAME", help="a database on the host"
    )
    source.add_argument(
        "--from-dump", type=_host_path, metavar="PATH", help="a pg_dump -Fc file on the host"
    )

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
        "--spool",
        default=os.environ.get("PR_PREVIEW_RECEIVER_SPOOL", DEFAULT_SPOOL),
        help="SQLite file that keeps accepted deliveries until Prefect takes them"
        f" (default: $PR_PREVIEW_RECEIVER_SPOOL or {DEFAULT_SPOOL})",
    )
    receiver.add_argument(
        "--no-spool",
        action="store_true",
        help="answer 502 while Prefect is down instead of keeping deliveries",
    )
    receiver.add_argument(
        "--secret-block", help="Prefect Secret block with the webhook secret (if no env var)"
    )

    setup = command(
        "setup",
        "Configure Prefect from a deployed stack (deployments/aws/pr-preview.yaml) and store"
        " the secrets; idempotent.",
        cmd_setup,
    )
    setup.add_argument("--stack", type=stack_name, required=True, help="the stack's name")
    setup.add_argument(
        "--allow",
        action="append",
        type=_repo_pattern,
        metavar="OWNER/NAME",
        help="a repository to preview (allowed_repos; owner/* for all of an owner); repeatable",
    )
    setup.add_argument("--github-app-id", type=_positive, help="the GitHub App's ID")
    setup.add_argument(
        "--github-app-key", metavar="FILE", help="the GitHub App's private key (.pem file, or -)"
    )
    setup.add_argument(
        "--ghcr-token-file", metavar="FILE", help="file holding the GHCR token (- for stdin)"
    )
    setup.add_argument(
        "--database-url-file", metavar="FILE", help="file holding the DATABASE_URL (- for stdin)"
    )
    setup.add_argument(
        "--replace-secrets", action="store_true", help="overwrite secrets that are stored already"
    )
    setup.add_argument(
        "--redeploy", action="store_true", help="run prefect deploy --all even if all exist"
    )
    setup.add_argument(
        "--dry-run", action="store_true", help="say what would change, change nothing"
    )

    teardown_all = command(
        "teardown-all",
        "Terminate every preview and spare, remove baked images and setup's secrets, so the"
        " stack deletes cleanly.",
        cmd_teardown_all,
    )
    teardown_all.add_argument("--stack", type=stack_name, required=True, help="the stack's name")
    teardown_all.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    teardown_all.add_argument("--dry-run", action="store_true", help="only list what would go")
    teardown_all.add_argument(
        "--delete-stack", action="store_true", help="then delete the stack and wait for it"
    )

    acceptance = command(
        "acceptance",
        "On a real account: open a preview, push, close; print each step's time and the cost.",
        cmd_acceptance,
    )
    acceptance.add_argument("--stack", type=stack_name, required=True, help="the stack's name")
    acceptance.add_argument("--repo", type=_repo, required=True, help="owner/name")
    acceptance.add_argument("--pr", type=_pr_number, required=True, help="a PR without a preview")
    acceptance.add_argument("--sha", type=_sha, required=True, help="the first commit's image")
    acceptance.add_argument("--second-sha", type=_sha, required=True, help="the pushed one")
    acceptance.add_argument(
        "--spend-money", action="store_true", help="confirm: this launches real instances"
    )

    demo = command("demo", "Run the lifecycle demo on moto (make demo).", cmd_demo)
    demo.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    return parser


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
