"""The real local instance: what a preview costs on this machine, and the latency model on it.

Runs the preview flow (on a temporary Prefect server) against moto with instances that boot for
real (local_stack/instance): user data in bash, the sample app pulled from the local registry,
alembic against a real PostgreSQL, the probe against the real app. Two passes in one run:

  local     as fast as this machine goes
  modelled  the shims sleep what AWS would take of what a host cannot be here
            (bench/latency_model.py: dnf install docker, the boot), scaled by ``--scale``:
            through the instance's environment (PR_PREVIEW_DNF_SECONDS) and the runtime's
            boot_seconds. Pulls, compose up and the migration container run on the real
            Docker Engine in both passes, so they cost what they cost on this machine.

and prints, per pass: new PR → ready, push → ready (in place), the user data's own time (from
cloud-init's log), and the round trip of one SSM command (p50 of 20). The ratio modelled/local
says how much of a real preview's time the machine itself adds.

Run: .venv/bin/python bench/bench_local_instance.py [--scale 0.1] [--prs 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="bench-local-prefect-"))
os.environ.update(
    {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(PREFECT_HOME),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "ap-northeast-1",
    }
)
for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "GITHUB_TOKEN", "PREFECT_API_URL"):
    os.environ.pop(name, None)

from bench import latency_model as model  # noqa: E402

REPO = "octo-org/app"


@dataclass
class Pass:
    name: str
    new_pr: list[float]
    push: list[float]
    user_data: list[float]
    ssm_round_trip: float


def user_data_seconds(log: str) -> float:
    """From cloud-init's own 'Up N seconds' lines: finished minus started."""
    ups = [float(value) for value in re.findall(r"Up (\d+\.\d+) seconds", log)]
    return ups[-1] - ups[0] if len(ups) >= 2 else float("nan")


def one_pass(name: str, scale: float, prs: int, root: Path) -> Pass:

    from moto import mock_aws
    from moto.server import ThreadedMotoServer

    from flows.preview import pr_preview
    from local_stack.account import DEMO_DB_PASSWORD, create_demo_account
    from local_stack.instance.world import db_server, push_sample_app, world_runtime
    from local_stack.registry import FakeRegistry
    from local_stack.serve import serve_handler
    from tasks.cloud.aws import build_clients
    from tasks.cloud.ssm import run_command
    from tasks.config import (
        TRUSTED_FIELDS,
        TUNING_FIELDS,
        PreviewConfig,
        as_environment,
        load_config,
    )

    modelled = name == "modelled"
    env = {}
    boot = 0.0
    if modelled:
        env = {"PR_PREVIEW_DNF_SECONDS": f"{model.DNF_INSTALL_DOCKER.seconds * scale:.3f}"}
        boot = (model.PENDING_TO_RUNNING.seconds + model.BOOT_TO_CLOUD_INIT.seconds) * scale
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    registry = FakeRegistry(scheme="http")
    try:
        with (
            mock_aws(),
            serve_handler(registry.handle) as registry_url,
            db_server(
                root / name / "db", role="app", password=DEMO_DB_PASSWORD, database="app"
            ) as database,
        ):
            registry.host = registry_url.removeprefix("http://")
            runtime = world_runtime(
                root / name / "instances",
                (host, port),
                database,
                registry.host,
                env=env,
                boot_seconds=boot,
            )
            with runtime.patched():
                clients = build_clients(PreviewConfig(region="ap-northeast-1"))
                account = create_demo_account(clients, database_url=database.database_url)
                registry.users["octo-org"] = "ghp_demoToken0000000000000000000000000000"
                config = load_config(
                    {
                        **account.config_values(),
                        "region": "ap-northeast-1",
                        "image": f"{registry.host}/{REPO}",
                        "poll_seconds": 0.2,
                        "retry_delay_seconds": 0.2,
                        "max_previews": prs + 1,
                    },
                    use_variable=False,
                )
                # As a deployment runs: the trusted fields in the environment, tuning as `config`.
                trusted = {name: getattr(config, name) for name in TRUSTED_FIELDS}
                os.environ.update(as_environment(trusted))
                tuning = config.model_dump(include=set(config.model_fields_set & TUNING_FIELDS))
                new_pr, push, user_data = [], [], []
                for pr in range(1, prs + 1):
                    first, second = f"{pr:02d}" * 20, f"{pr + 50:02d}" * 20
                    push_sample_app(registry, REPO, first, "v1", private=True)
                    push_sample_app(registry, REPO, second, "v2", private=True)
                    started = time.perf_counter()
                    ready = pr_preview(REPO, pr, first, action="opened", config=tuning)
                    new_pr.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    pr_preview(REPO, pr, second, action="synchronize", config=tuning)
                    push.append(time.perf_counter() - started)
                    log = runtime.sandboxes[ready.instance_id].inside(
                        "/var/log/cloud-init-output.log"
                    )
                    user_data.append(user_data_seconds(log.read_text()))
                trips = []
                for _ in range(20):
                    started = time.perf_counter()
                    run_command(
                        clients.ssm,
                        ready.instance_id,
                        ["true"],
                        timeout_seconds=30,
                        poll_seconds=0.02,
                    )
                    trips.append(time.perf_counter() - started)
            return Pass(name, new_pr, push, user_data, statistics.median(trips))
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--prs", type=int, default=2)
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    root = Path(tempfile.mkdtemp(prefix="bench-local-"))
    with prefect_test_harness(server_startup_timeout=60):
        passes = [one_pass(name, args.scale, args.prs, root) for name in ("local", "modelled")]
    print(f"\nReal local instances, {args.prs} PR(s) per pass; modelled delays × {args.scale}")
    header = f"{'pass':<10}{'new PR → ready':>16}{'push → ready':>14}{'user data':>11}"
    print(header + f"{'SSM trip':>10}")
    for each in passes:
        print(
            f"{each.name:<10}{statistics.median(each.new_pr):>14.1f} s"
            f"{statistics.median(each.push):>12.1f} s{statistics.median(each.user_data):>9.1f} s"
            f"{each.ssm_round_trip * 1000:>7.0f} ms"
        )
    local, modelled = passes
    new_ratio = statistics.median(modelled.new_pr) / statistics.median(local.new_pr)
    push_ratio = statistics.median(modelled.push) / statistics.median(local.push)
    print(f"\nmodelled/local: new PR {new_ratio:.2f}×, push {push_ratio:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
