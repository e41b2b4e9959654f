"""What several commands share: errors, argument types, configuration and clients, the
``--profile`` context, the table and duration formats, finding a PR's preview, collecting its
evidence, and turning an exception into one actionable line.

Nothing here loads AWS or Prefect code at import: each helper imports what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from tasks.inputs import is_repo, is_repo_pattern, is_sha
from tasks.run.errors import PreviewError

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

    from tasks.cloud.aws import AwsClients
    from tasks.cloud.instances import Preview
    from tasks.config import PreviewConfig

PROG = "pr-preview"
EXIT_WRONG = 1  # doctor: a check failed; cleanup: the operator said no
EXIT_ERROR = 2  # the command could not do its job

_EXPIRED = ("ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidClientTokenId")


class CliError(PreviewError):
    """What the operator should do, in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# --- argument types -------------------------------------------------------------------------


def _pr_number(text: str) -> int:
    value = text.strip().lstrip("#")
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pull request number")
    return int(value)


def _repo(text: str) -> str:
    if not is_repo(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not owner/name")
    return text


def _repo_pattern(text: str) -> str:
    """``owner/name`` or ``owner/*``: an ``allowed_repos`` entry."""
    if is_repo_pattern(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not owner/name or owner/*")


def _sha(text: str) -> str:
    if not is_sha(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a commit sha (hex digits)")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


# --- output ---------------------------------------------------------------------------------


def _say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def for_terminal(text: str) -> str:
    """``text`` safe to print: every control character but newline and tab, and every
    bidirectional override, shown escaped (``\\x1b``) instead of acted on by the terminal.

    What an instance prints is the pull request's code talking: an escape sequence in it could
    retitle the window, clear the screen, rewrite a line with ``\\r`` or hide text."""
    return "".join(
        ch
        if ch in "\n\t" or not (unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS)
        else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


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


def _scope(settings: PreviewConfig, repo: str | None) -> str:
    tags = f"Purpose={settings.purpose_tag}" + (f", Repo={repo}" if repo else "")
    return f"in {settings.region} ({tags})"


# --- configuration, clients, --profile ------------------------------------------------------


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


def build_clients(settings: PreviewConfig) -> AwsClients:
    """The boto3 clients of ``settings``: what ``deployments.cli._clients`` is by default."""
    from tasks.cloud.aws import build_clients as build

    return build(settings)


def _clients(settings: PreviewConfig) -> AwsClients:
    """A command's AWS clients, built by ``deployments.cli._clients`` as it is when called:
    that one name is where the clients can be replaced for every command (the tests share one
    moto's clients through it)."""
    from deployments import cli

    return cli._clients(settings)


# --- a PR's preview and its evidence --------------------------------------------------------


def find_one_running(
    ec2: EC2Client, settings: PreviewConfig, pr_number: int, repo: str | None
) -> Preview:
    """The PR's running preview by its tags (runbook §6.3), or a one-line error saying why not."""
    from tasks.cloud.instances import find_previews

    previews = find_previews(ec2, settings.purpose_tag, repo=repo, pr_number=pr_number)
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
            f"no preview for {label} in {settings.region} (tag Purpose={settings.purpose_tag}):"
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


def _collect(
    clients: AwsClients, settings: PreviewConfig, preview: Preview
) -> tuple[dict[str, str], list[str]]:
    """The §9 evidence of ``preview`` (unmasked) and the secrets to mask it with."""
    from tasks.steps.diagnose import collect_evidence, parameter_secrets

    secrets = parameter_secrets(clients.ssm, settings)
    _say(
        f"Collecting runbook §9 evidence from {preview.instance_id}"
        f" ({_pr_label(preview.pr_number, preview.repo)}, sha {_short(preview.sha)}) over SSM…"
    )
    evidence = collect_evidence(clients.ssm, settings, preview.instance_id)
    unreachable = [text for text in evidence.values() if text.startswith("(SSM could not run")]
    if evidence and len(unreachable) == len(evidence):
        raise CliError(
            f"SSM could not run commands on {preview.instance_id} {_one_line(unreachable[0])}:"
            " check that the agent is online and the instance profile's role has"
            " deployments/iam/instance-ssm-agent-policy.json (runbook §7)"
        )
    return evidence, secrets


# --- error translation ----------------------------------------------------------------------


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
    from tasks.run.retry import ACCESS_DENIED_CODES

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
        if code in ACCESS_DENIED_CODES:
            return (
                f"AWS refused {operation} ({code}): grant it to your role (runbook §7) — {message}"
            )
        if code in _EXPIRED:
            return f"AWS credentials were refused ({code}): {login}"
        return f"AWS {operation} failed: {code}: {message}"
    if isinstance(exc, errors.BotoCoreError):
        return f"AWS: {exc}"
    return None
