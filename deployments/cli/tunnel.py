"""``pr-preview tunnel``: forward a local port to a PR's preview over SSM (runbook §6)."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable

from deployments.cli.common import (
    CliError,
    _clients,
    _config,
    _one_line,
    _pr_label,
    _say,
    _short,
    find_one_running,
)
from tasks.cloud.tunnel import tunnel_argv

SSM_PLUGIN = "session-manager-plugin"
AWS_CLI_INSTALL_URL = (
    "https://docs.aws.amazon.com/cli/latest/userguide/getting-started-install.html"
)
SSM_PLUGIN_INSTALL_URL = (
    "https://docs.aws.amazon.com/systems-manager/latest/userguide/"
    "session-manager-working-with-install-plugin.html"
)
_AWS_CLI_VERSION = re.compile(r"aws-cli/(\d+)\.(\d+)\S*")

Which = Callable[[str], str | None]
Run = Callable[..., "subprocess.CompletedProcess[str]"]


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
    settings = _config(args)
    local_port = args.local_port or settings.app_port
    aws = None if args.print else check_session_tools()
    preview = find_one_running(_clients(settings).ec2, settings, args.pr, args.repo)
    argv = tunnel_argv(
        preview.instance_id,
        settings.region,
        app_port=settings.app_port,
        local_port=local_port,
        profile=args.profile,
    )
    if args.print:
        print(shlex.join(argv))
        return 0
    _say(
        f"{_pr_label(preview.pr_number, preview.repo)} (sha {_short(preview.sha)}):"
        f" forwarding 127.0.0.1:{local_port} to {preview.instance_id}:{settings.app_port}."
        f" Open http://127.0.0.1:{local_port}/docs — Ctrl+C ends the session."
    )
    sys.stdout.flush()
    try:
        os.execv(aws or "aws", argv)
    except OSError as exc:
        raise CliError(f"could not start `{shlex.join(argv)}`: {_one_line(exc)}") from exc
    return 0  # only reached when execv is replaced (tests)
