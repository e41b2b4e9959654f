"""``pr-preview receiver``: the signed GitHub webhook receiver (``deployments.receiver``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from deployments.cli.common import CliError

DEFAULT_SPOOL = "~/.local/state/pr-preview/receiver-spool.sqlite3"


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
            spool_path=None if args.no_spool else Path(args.spool).expanduser(),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    return 0
