"""``pr-preview tunnel``: forward a local port to a PR's preview over SSM (runbook §6).

A sleeping preview is woken first (started, its agent answering, its shutdown timer re-armed);
Session Manager may then refuse the instance (``TargetNotConnected``) well after Run Command
takes it, so the session is started again, saying so, until it is accepted or
``session_wait_seconds`` pass."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from tasks.cloud.aws import AwsClients
    from tasks.config import PreviewConfig

SSM_PLUGIN = "session-manager-plugin"
AWS_CLI_INSTALL_URL = (
    "https://docs.aws.amazon.com/cli/latest/userguide/getting-started-install.html"
)
SSM_PLUGIN_INSTALL_URL = (
    "https://docs.aws.amazon.com/systems-manager/latest/userguide/"
    "session-manager-working-with-install-plugin.html"
)
_AWS_CLI_VERSION = re.compile(r"aws-cli/(\d+)\.(\d+)\S*")

SESSION_STARTED = "Starting session with SessionId"
NOT_CONNECTED = "TargetNotConnected"
RETRY_SECONDS = 5.0
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


def wake_if_asleep(
    clients: AwsClients, settings: PreviewConfig, pr_number: int, repo: str | None
) -> str | None:
    """Start the PR's sleeping preview when it has no running one; its id, or None."""
    from tasks.cloud.instances import find_previews
    from tasks.cloud.power import WakeFailed, wake_instance

    previews = find_previews(clients.ec2, settings.purpose_tag, repo=repo, pr_number=pr_number)
    asleep = [p for p in previews if p.state in ("stopping", "stopped") and p.sleep_state]
    if any(p.state == "running" for p in previews) or len(asleep) != 1:
        return None
    instance_id = asleep[0].instance_id
    _say(f"{_pr_label(pr_number, repo)} is asleep ({asleep[0].sleep_state}): waking {instance_id}…")
    try:
        woke = wake_instance(clients, settings, instance_id)
    except WakeFailed as exc:
        raise CliError(f"could not wake {instance_id}: {_one_line(exc)}") from exc
    _say(f"{instance_id} is running and its agent answers ({woke.seconds:.0f} s).")
    return instance_id


def forward_when_accepted(
    argv: list[str],
    *,
    wait_seconds: float,
    retry_seconds: float = RETRY_SECONDS,
    popen: Callable[..., subprocess.Popen[str]] = subprocess.Popen,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Start the session; while Session Manager answers ``TargetNotConnected`` start it again
    every ``retry_seconds``, saying so, until ``wait_seconds`` pass. Once accepted, its output
    goes to the terminal until it ends; returns its exit status."""
    deadline = clock() + wait_seconds
    attempt = 0
    while True:
        attempt += 1
        process = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stderr is not None
        for line in process.stdout:
            if SESSION_STARTED in line:
                print(line, end="", flush=True)
                for rest in process.stdout:
                    print(rest, end="", flush=True)
                return process.wait()
        error = process.stderr.read()
        code = process.wait()
        if NOT_CONNECTED not in error:
            raise CliError(f"`{shlex.join(argv)}` failed (exit {code}): {_one_line(error)[-300:]}")
        left = deadline - clock()
        if left <= 0:
            raise CliError(
                f"Session Manager still refuses the instance ({NOT_CONNECTED}) after"
                f" {wait_seconds:g} s and {attempt} attempts: try again in a minute"
            )
        pause = min(retry_seconds, left)
        _say(
            f"Session Manager does not accept the instance yet ({NOT_CONNECTED}, usual for up to"
            f" ~90 s after a start): trying again in {pause:.0f} s…"
        )
        sleep(pause)


def cmd_tunnel(args: argparse.Namespace) -> int:
    settings = _config(args)
    local_port = args.local_port or settings.app_port
    aws = None if args.print else check_session_tools()
    clients = _clients(settings)
    woken = wake_if_asleep(clients, settings, args.pr, args.repo)
    preview = find_one_running(clients.ec2, settings, args.pr, args.repo)
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
    if woken is not None:
        return forward_when_accepted(
            [aws or "aws", *argv[1:]], wait_seconds=settings.session_wait_seconds
        )
    try:
        os.execv(aws or "aws", argv)
    except OSError as exc:
        raise CliError(f"could not start `{shlex.join(argv)}`: {_one_line(exc)}") from exc
    return 0  # only reached when execv is replaced (tests)
