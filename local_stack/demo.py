"""`make demo`: a pull request's preview lifecycle, started by webhooks, on this machine.

moto stands in for AWS's control plane, and every instance it launches boots for real in its
own Linux namespaces (local_stack/instance): the user data runs in bash, pulls the app's image
from a local OCI registry with the GHCR token from Parameter Store, starts the app (the sample
FastAPI app, examples/hello-api) and migrates a real PostgreSQL with alembic; the probe reaches
the real app. A local Prefect server runs the deployments of prefect.yaml with a process worker,
and the signed webhook receiver turns GitHub deliveries into Prefect events — which start the
flow runs. `pr-preview tunnel 42` then opens the PR's app as Session Manager would.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from local_stack.processes import free_port

REPO = "octo-org/hello-api"
PR_NUMBER = 42
FIRST_SHA = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SECOND_SHA = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
WEBHOOK_SECRET = "demo-webhook-secret"
GITHUB_TOKEN = "good-token"  # one the fake GitHub takes
REVIEWER = "octo-reviewer"
EXTEND = "48h"  # past the 24 h the preview has: an extend never shortens


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    say()
    say(f"━━ {text} " + "━" * max(0, 74 - len(text)))


def indent(text: str, prefix: str = "   │ ") -> str:
    return "\n".join(prefix + line for line in text.strip().splitlines())


def point_at_moto(endpoint: str) -> None:
    """boto3 in this process and in every flow run the worker starts talks to moto."""
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_DEFAULT_REGION="ap-northeast-1",
        DO_NOT_TRACK="1",
    )
    for name in ("AWS_PROFILE", "PREFECT_API_URL", "GITHUB_TOKEN", "GITHUB_API_URL"):
        os.environ.pop(name, None)


def show_containers(clients: Any, purpose: str) -> None:
    """``docker ps`` on each running preview, over SSM as an operator would ask it: the app
    runs in real containers on a real Docker Engine inside the instance."""
    from tasks.cloud.instances import find_previews
    from tasks.cloud.ssm import run_command

    for preview in find_previews(clients.ec2, purpose, states=("running",)):
        answer = run_command(
            clients.ssm,
            preview.instance_id,
            ["docker ps --format '{{.Names}}  {{.Image}}  {{.Status}}  {{.Ports}}'"],
            timeout_seconds=30,
            poll_seconds=0.2,
            comment="pr-preview demo: docker ps",
        )
        say(f"   docker ps on {preview.instance_id}:")
        for line in answer.output.strip().splitlines():
            say(f"     {line}")


def describe_fleet(clients: Any, purpose: str) -> None:
    from tasks.cloud.instances import find_previews

    states = ("pending", "running", "shutting-down", "terminated")
    previews = find_previews(clients.ec2, purpose, states=states)
    if not previews:
        say("   (no preview instances)")
    for preview in previews:
        say(
            f"   EC2 {preview.instance_id}  {preview.state:<11} PR #{preview.pr_number}"
            f"  sha {str(preview.sha)[:7]}  shutdown-at {preview.tags.get('shutdown-at')}"
        )


def shutdown_at(clients: Any) -> str:
    """The PR's preview's ``shutdown-at`` tag."""
    from tasks.cloud.instances import find_previews

    found = find_previews(clients.ec2, "pr-preview-singleton", states=("running",))
    return next((str(p.tags.get("shutdown-at")) for p in found if p.pr_number == PR_NUMBER), "-")


def sticky_versions(github: Any) -> list[str]:
    """Each body the bot wrote into the PR's sticky comment: created once, then edited."""
    from tasks.github.pull_request import marker

    return [
        str(request.body["body"])
        for request in github.sent(path_contains="/comments")
        if request.method in ("POST", "PATCH")
        and isinstance(request.body, dict)
        and str(request.body.get("body", "")).startswith(marker(REPO, PR_NUMBER))
    ]


def bot_replies(github: Any) -> list[str]:
    """What the bot answered on the PR besides its sticky comment."""
    from tasks.github.pull_request import marker

    return [
        str(c["body"])
        for c in github.comments.get((REPO.lower(), PR_NUMBER), [])
        if c["user"]["login"] != REVIEWER and not str(c["body"]).startswith(marker(REPO, PR_NUMBER))
    ]


class Tunnel:
    """`pr-preview tunnel 42`, run as a reviewer would, on a free local port."""

    def __init__(self, process: subprocess.Popen[str], url: str, banner: str) -> None:
        self.process, self.url, self.banner = process, url, banner


@contextmanager
def open_tunnel(api_url: str, aws: str, moto: Any) -> Iterator[Tunnel]:
    from local_stack.instance.sandbox import SHIMS

    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{SHIMS}:{os.environ['PATH']}",
        "PREFECT_API_URL": api_url,
        "AWS_ENDPOINT_URL": aws,
        "PR_PREVIEW_RUNTIME_ROOT": str(moto.instances_root),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deployments.cli",
            "tunnel",
            str(PR_NUMBER),
            "--local-port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        for _ in range(6):
            lines.append(process.stdout.readline().rstrip())
            if "Waiting for connections" in lines[-1] or process.poll() is not None:
                break
        yield Tunnel(process, f"http://127.0.0.1:{port}", "\n".join(line for line in lines if line))
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def show_app(tunnel: Tunnel, sha: str) -> list[str]:
    """What a reviewer sees through the tunnel: the app's docs and its page with the sha."""
    import httpx

    if tunnel.banner:
        say(f"   $ pr-preview tunnel {PR_NUMBER}")
        say(indent(tunnel.banner))
        tunnel.banner = ""
    try:
        docs = httpx.get(f"{tunnel.url}/docs", timeout=10)
        page = httpx.get(f"{tunnel.url}/", timeout=10)
        health = httpx.get(f"{tunnel.url}/healthz", timeout=10)
    except httpx.HTTPError as exc:
        return [f"the app is not reachable through the tunnel: {exc}"]
    say(f"   GET /docs → {docs.status_code}; GET /healthz → {health.status_code} {health.text}")
    say(f"   GET / → {page.status_code}: " + " ".join(page.text.split())[:160])
    if page.status_code != 200 or sha not in page.text:
        return [f"the app through the tunnel does not show {sha[:7]}"]
    return []


def show_runs(runs: list[dict[str, Any]], seen: set[str]) -> list[str]:
    """Print the runs not shown yet; return those that did not end Completed."""
    failed = []
    for run in runs:
        if run["id"] in seen:
            continue
        seen.add(run["id"])
        seconds = run.get("total_run_time") or 0
        say(f"   flow run {run['name']:<18} {run['state_name']:<10} {seconds:5.1f} s")
        if run["state_type"] != "COMPLETED":
            failed.append(f"{run['name']}: {run['state_name']} — {run['state']['message']}")
    return failed


def run(keep: bool, db: str = "sqlite") -> int:
    started = time.monotonic()
    from local_stack.moto_server import moto_process

    with (
        tempfile.TemporaryDirectory(prefix="pr-preview-demo-") as tmp,
        moto_process(
            Path(tmp) / "moto.log", runtime="real", instances_root=Path(tmp) / "instances"
        ) as moto,
        ExitStack() as stack_exit,
    ):
        aws = moto.url
        point_at_moto(aws)
        # Imported after the environment is set: Prefect reads its settings at import.
        from deployments.receiver import create_app
        from local_stack.account import (
            DEMO_GHCR_TOKEN,
            DEMO_OWNER,
            create_demo_account,
        )
        from local_stack.db_host import DB_HOST_IP, db_host, launch_db_host
        from local_stack.github import FakeGitHub
        from local_stack.instance.world import DB_PORT, push_sample_app
        from local_stack.prefect_server import (
            issue_comment_payload,
            prefect_stack,
            pull_request_payload,
            signed_delivery,
        )
        from local_stack.registry import FakeRegistry
        from local_stack.serve import serve_asgi, serve_handler
        from tasks.cloud.aws import build_clients
        from tasks.cloud.databases import database_name
        from tasks.config import VARIABLE_NAME, load_config

        banner("1. AWS, as the runbook describes it — on moto; the db-server on PostgreSQL")
        clients = build_clients(load_config({"region": "ap-northeast-1"}, use_variable=False))
        account = create_demo_account(clients)
        database = stack_exit.enter_context(db_host(Path(tmp) / "db-server", ""))
        db_instance = launch_db_host(clients.ec2, account.db_sg_id, database.user_data())
        moto.bridge(f"{DB_HOST_IP}:{DB_PORT}", f"{database.postgres.host}:{database.postgres.port}")
        say(f"   moto on {aws} (AWS_ENDPOINT_URL); subnet {account.subnet_id}")
        say(
            f"   db-server {db_instance}: PostgreSQL on 127.0.0.1:{database.postgres.port}, seen"
            f" by instances at {DB_HOST_IP}:{DB_PORT}; each preview gets a database and role of"
            " its own there (database: per-preview), made over SSM with sudo -u postgres psql"
        )
        say(f"   api-sg {account.api_sg_id}; db-sg {account.db_sg_id} admits api-sg on 5432")
        say(f"   instance profile {account.instance_profile}; SecureStrings in Parameter Store")

        # CI "pushed" the image; the registry wants the GHCR token, as GHCR does.
        registry = FakeRegistry(scheme="http", users={DEMO_OWNER: DEMO_GHCR_TOKEN})
        # GitHub as the flows see it: the PR, its comments, a reviewer with write access.
        github = FakeGitHub()
        github_url = stack_exit.enter_context(serve_handler(github.handle))
        github.base_url = github_url
        github.add_collaborator(REPO, REVIEWER, "write")
        os.environ.update(GITHUB_TOKEN=GITHUB_TOKEN, GITHUB_API_URL=github_url)
        say(
            f"   GitHub (a fake that answers as GitHub does) on {github_url}; @{REVIEWER} may write"
        )
        with (
            serve_handler(registry.handle) as registry_url,
            prefect_stack(Path(tmp) / "prefect", db=db) as stack,
        ):
            registry.host = registry_url.removeprefix("http://")
            moto.bridge(registry.host, registry.host)
            image = f"{registry.host}/{REPO}"
            banner("2. A local Prefect server, the deployments of prefect.yaml, a worker")
            say(f"   Prefect UI {stack.ui_url}")
            if stack.database:
                say(
                    f"   its database: PostgreSQL {stack.database.version} on 127.0.0.1:"
                    f"{stack.database.postgres.port} (the URL only in the server's environment)"
                )
            stack.set_variable(
                VARIABLE_NAME,
                {
                    **account.config_values(),
                    "db_instance_id": db_instance,
                    "image": image,
                    "poll_seconds": 0.2,
                    "retry_delay_seconds": 0.5,
                    "image_wait_seconds": 60,
                    "ready_timeout_seconds": 60,
                    "prefect_ui_url": stack.ui_url,
                    # A per-preview setting (README: Fitting your app): the comment names it.
                    "env": {"PREVIEW_URL": "http://127.0.0.1:8000/?pr={pr_number}"},
                },
            )
            say(f"   Prefect Variable {VARIABLE_NAME}: the account above, image {image}")
            stack.deploy()
            say(
                "   deployed pr-preview, pr-teardown (GitHub event triggers), pr-crash-report"
                " (Crashed runs) and ttl-sweeper (cron)"
            )
            stack.start_worker(Path(tmp) / "worker.log")
            say("   process worker polling work pool pr-preview every second")
            app = create_app(WEBHOOK_SECRET, prefect_api_url=stack.api_url)
            with serve_asgi(app) as receiver:
                say(f"   webhook receiver {receiver}/webhook (X-Hub-Signature-256 checked)")
                seen: set[str] = set()

                def deliver(action: str, sha: str) -> None:
                    payload = pull_request_payload(action, REPO, PR_NUMBER, sha)
                    github.add_pull(REPO, payload["pull_request"])
                    answer = signed_delivery(receiver, WEBHOOK_SECRET, "pull_request", payload)
                    say(f"   GitHub → receiver: pull_request.{action} → HTTP {answer.status_code}")

                def comment(body: str) -> None:
                    comment_id = github.add_comment(REPO, PR_NUMBER, body, user=REVIEWER)
                    payload = issue_comment_payload(REPO, PR_NUMBER, comment_id, body, REVIEWER)
                    answer = signed_delivery(receiver, WEBHOOK_SECRET, "issue_comment", payload)
                    say(f"   @{REVIEWER} comments {body!r}")
                    say(f"   GitHub → receiver: issue_comment.created → HTTP {answer.status_code}")

                banner(f"3. PR #{PR_NUMBER} opened at {FIRST_SHA[:7]}")
                push_sample_app(registry, REPO.lower(), FIRST_SHA, "v1", private=True)
                deliver("opened", FIRST_SHA)
                failed = show_runs(stack.wait_for_runs("pr-preview/pr-preview", 1), seen)
                describe_fleet(clients, "pr-preview-singleton")
                show_containers(clients, "pr-preview-singleton")
                tunnel = stack_exit.enter_context(open_tunnel(stack.api_url, aws, moto))
                failed += show_app(tunnel, FIRST_SHA)

                banner(f"4. A push to PR #{PR_NUMBER}: {SECOND_SHA[:7]} (synchronize)")
                push_sample_app(registry, REPO.lower(), SECOND_SHA, "v2", private=True)
                deliver("synchronize", SECOND_SHA)
                failed += show_runs(stack.wait_for_runs("pr-preview/pr-preview", 2), seen)
                describe_fleet(clients, "pr-preview-singleton")
                if not failed:
                    say("   same instance, new sha: deployed in place, no new EC2 boot")
                failed += show_app(tunnel, SECOND_SHA)
                own = database_name(REPO, PR_NUMBER)
                tables = database.postgres.execute(
                    "select string_agg(tablename, ' ' order by tablename) from pg_tables"
                    " where schemaname = 'public'",
                    database=own,
                )
                say(f"   db-server: the preview's own database {own}, tables {tables.strip()}")

                banner(f"5. A reviewer needs it longer: /preview extend {EXTEND}")
                before = shutdown_at(clients)
                comment(f"/preview extend {EXTEND}")
                failed += show_runs(stack.wait_for_runs("pr-command/pr-command", 1), seen)
                say(f"   shutdown-at {before} → {shutdown_at(clients)} (tag and instance timer)")
                for reply in bot_replies(github):
                    say(indent(reply))

                banner(f"6. PR #{PR_NUMBER} closed")
                deliver("closed", SECOND_SHA)
                failed += show_runs(stack.wait_for_runs("pr-teardown/pr-teardown", 1), seen)
                describe_fleet(clients, "pr-preview-singleton")

                banner("7. The PR's sticky comment at each state, as the bot wrote it")
                for body in sticky_versions(github):
                    say(indent(body))
                    say()

                from local_stack.instance.sandbox import SHIMS

                banner("Done" if not failed else "Failed")
                say(f"   demo finished in {time.monotonic() - started:.0f} s")
                for line in failed:
                    say(f"   ✗ {line}")
                if keep:
                    say(f"   the stack stays up: open {stack.ui_url} — Ctrl+C stops it")
                    say(
                        "   the PR is closed; the command below starts its preview again, and"
                        f" `pr-preview tunnel {PR_NUMBER}` reaches it with"
                        f" PATH={SHIMS}:$PATH PR_PREVIEW_RUNTIME_ROOT={moto.instances_root}"
                    )
                    say(
                        f"   export PREFECT_API_URL={stack.api_url} AWS_ENDPOINT_URL={aws}"
                        " AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo"
                        " AWS_DEFAULT_REGION=ap-northeast-1"
                    )
                    say(
                        "   prefect deployment run 'pr-preview/pr-preview'"
                        f" -p repo={REPO} -p pr_number={PR_NUMBER} -p head_sha={FIRST_SHA}"
                    )
                    try:
                        while True:
                            time.sleep(3600)
                    except KeyboardInterrupt:
                        pass
    return 1 if failed else 0


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end the demo as Ctrl+C does: every process it started is stopped."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    parser.add_argument(
        "--db",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the Prefect server's database (postgres: a real PostgreSQL, started here)",
    )
    args = parser.parse_args(argv)
    stop_on_signals()
    return run(keep=args.keep, db=args.db)


if __name__ == "__main__":
    sys.exit(main())
