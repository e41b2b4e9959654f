"""`make demo`: a pull request's preview lifecycle on moto, with no AWS account and no network.

Starts moto as a local server, creates the account the runbook describes (api-sg, db-sg, the
SSM instance profile, the Parameter Store entries), then runs the flows a pull request triggers:
opened, a push (synchronize), closed. Every AWS call goes to moto through AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = "octo-org/hello-api"
PR_NUMBER = 42
FIRST_SHA = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SECOND_SHA = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    say()
    say(f"━━ {text} " + "━" * max(0, 74 - len(text)))


@contextmanager
def moto_server() -> Iterator[str]:
    """moto as a real HTTP endpoint on 127.0.0.1, as a real AWS endpoint would be."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def isolate_environment(home: Path, endpoint: str) -> None:
    """Point boto3 at moto with throwaway credentials; keep Prefect's state in ``home``."""
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_DEFAULT_REGION="ap-northeast-1",
        PREFECT_HOME=str(home),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL=os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
    )
    for name in ("AWS_PROFILE", "PREFECT_API_URL"):
        os.environ.pop(name, None)


def describe_fleet(clients: Any, purpose: str) -> None:
    from tasks.instances import find_previews

    previews = find_previews(
        clients.ec2, purpose, states=("pending", "running", "shutting-down", "terminated")
    )
    if not previews:
        say("   (no preview instances)")
    for preview in previews:
        say(
            f"   {preview.instance_id}  {preview.state:<11} PR #{preview.pr_number}"
            f"  sha {str(preview.sha)[:7]}  shutdown-at {preview.tags.get('shutdown-at')}"
        )


def run(keep: bool) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pr-preview-demo-") as tmp, moto_server() as endpoint:
        isolate_environment(Path(tmp), endpoint)
        # Imported after the environment is set: Prefect reads its settings at import.
        from deployments.demo_account import create_demo_account
        from flows.preview import pr_preview
        from flows.teardown import pr_teardown
        from tasks.aws import build_clients
        from tasks.config import load_config

        banner("1. An AWS account like the runbook's, on moto")
        say(f"   moto listening on {endpoint} (AWS_ENDPOINT_URL)")
        base = load_config({"region": "ap-northeast-1"}, use_variable=False)
        clients = build_clients(base)
        account = create_demo_account(clients)
        say(f"   subnet {account.subnet_id} in default VPC {account.vpc_id}")
        say(f"   api-sg {account.api_sg_id}; db-sg {account.db_sg_id} admits api-sg on 5432")
        say(f"   instance profile {account.instance_profile}")
        say(f"   SecureStrings {account.ghcr_token_parameter}, {account.database_url_parameter}")
        config = load_config(
            {**account.config_values(), "retry_delay_seconds": 0.2, "poll_seconds": 0.2},
            use_variable=False,
        )

        banner(f"2. PR #{PR_NUMBER} opened at {FIRST_SHA[:7]} → pr_preview")
        say("   (the first flow run starts a temporary local Prefect server: ~10 s)")
        opened = pr_preview(REPO, PR_NUMBER, FIRST_SHA, action="opened", config=config)
        say(f"   {opened.status}: {opened.instance_id}, expires {opened.shutdown_at}")
        describe_fleet(clients, config.purpose_tag)

        banner(f"3. A push to PR #{PR_NUMBER}: {SECOND_SHA[:7]} → pr_preview (synchronize)")
        pushed = pr_preview(REPO, PR_NUMBER, SECOND_SHA, action="synchronize", config=config)
        say(
            f"   {pushed.status}: {pushed.instance_id};"
            f" replaced {', '.join(pushed.replaced) or '—'}"
        )
        describe_fleet(clients, config.purpose_tag)

        banner(f"4. PR #{PR_NUMBER} closed → pr_teardown")
        closed = pr_teardown(REPO, PR_NUMBER, config=config)
        say(f"   terminated: {', '.join(closed.terminated) or 'nothing'}")
        describe_fleet(clients, config.purpose_tag)

        banner("Done")
        say(f"   lifecycle demo finished in {time.monotonic() - started:.1f} s")
        if keep:
            say("   --keep: moto stays up until you press Ctrl+C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    args = parser.parse_args(argv)
    return run(keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
