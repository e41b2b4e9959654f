"""What the Docker Engine costs on a real local instance: the rows the latency model once guessed.

Boots one preview on a real local instance (local_stack/instance: bash, a per-instance dockerd,
Docker Compose v2) behind moto, with the sample app (examples/hello-api v1 and v2, two alembic
revisions) in the local registry and a real PostgreSQL as its database — no Prefect server:
the launch's user data does what it does for a preview. Then, on the instance, over SSM, it
times each operation with bash's ``$EPOCHREALTIME`` around the command itself (so the SSM round
trip is not in the figure), ``--repeat`` times, and prints the median of each with what was run:

  container start          ``docker run --rm --network none --entrypoint true IMAGE``
  compose up -d recreate   APP_IMAGE flipped between the v1 and v2 digests (both present),
                           ``docker compose up -d``; then until ``/healthz`` answers (app start)
  compose run --rm start   ``docker compose run --rm -T api true``
  alembic upgrade N revs   ``compose run --rm -T api alembic upgrade head`` after ``downgrade``
                           of N (0: already at head) — the whole migration container
  alembic current (exec)   ``docker compose exec -T api alembic current``: the database's
                           revision, read in the running app container
  image label              ``docker image inspect -f '{{index .Config.Labels ...}}' IMAGE``
  pull M MB                ``docker pull IMAGE@digest`` after ``docker rmi`` of every image
                           (all layers) and with v1 present (v2's own layer only)
  pull of a present digest ``docker pull`` of an image already there (asks the registry)

and a push while a reviewer polls ``GET /`` every 100 ms through port forwarding (a new
connection each time), counting the requests that got no 200: the app recreated by ``docker
compose up -d`` (the swap before the app port's proxy), then pr-preview's deploy of v2 beside v1
(tasks/steps/update.py) — the "requests failed during a push" row.

Run: .venv/bin/python bench/bench_engine.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.update(
    {
        "DO_NOT_TRACK": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "ap-northeast-1",
    }
)
for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "PREFECT_API_URL"):
    os.environ.pop(name, None)

REPO = "octo-org/app"
V1_SHA, V2_SHA = "1" * 40, "2" * 40
TIME = 't() { local name=$1 s; shift; s=$EPOCHREALTIME; "$@" >/dev/null 2>&1 || { echo "FAILED $name"; return 1; }; echo "T $name $s $EPOCHREALTIME"; }'  # noqa: E501


T = TypeVar("T")
Poll = tuple[int, int, list[str]]


@dataclass(frozen=True)
class Figure:
    name: str
    seconds: float
    runs: int
    how: str


def timings(stdout: str) -> dict[str, list[float]]:
    """``T <name> <start> <end>`` lines → seconds per name."""
    found: dict[str, list[float]] = {}
    for line in stdout.splitlines():
        words = line.split()
        if len(words) == 4 and words[0] == "T":
            found.setdefault(words[1], []).append(float(words[3]) - float(words[2]))
        elif words[:1] == ["FAILED"]:
            raise RuntimeError(f"{line}\n{stdout[-2000:]}")
    return found


Push = tuple[str, int, int, list[str], dict[str, list[float]]]


def polled(runtime_root: Path, instance_id: str, action: Callable[[], T]) -> tuple[Poll, T]:
    """``action()`` while a reviewer polls ``GET /`` every 100 ms through port forwarding (the
    local stack's Session Manager), a new connection each time: (polled, failed, versions seen
    in order) and what ``action`` returned."""
    import httpx

    from local_stack.instance.sandbox import SHIMS

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    parameters = f'{{"portNumber":["8000"],"localPortNumber":["{port}"]}}'
    argv = [str(SHIMS / "aws"), "ssm", "start-session", "--target", instance_id]
    argv += ["--document-name", "AWS-StartPortForwardingSession", "--parameters", parameters]
    env = {**os.environ, "PR_PREVIEW_RUNTIME_ROOT": str(runtime_root)}
    session = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
                found = re.search(r'id="version">([^<]+)<', page.text)
                answers.append((page.status_code, found.group(1) if found else ""))
            except httpx.HTTPError as exc:
                answers.append((0, type(exc).__name__))
            stop.wait(0.1)

    try:
        assert session.stdout is not None
        lines = [session.stdout.readline() for _ in range(4)]
        if not any(f"Port {port} opened" in line for line in lines):
            raise RuntimeError(f"port forwarding did not start: {lines}")
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            result = action()
        finally:
            stop.set()
            poller.join(15)
    finally:
        session.terminate()
        session.wait(10)
    failed = sum(status != 200 for status, _ in answers)
    versions = list(dict.fromkeys(v for status, v in answers if status == 200))
    return (len(answers), failed, versions), result


def measure(repeat: int, root: Path) -> tuple[list[Figure], dict[str, float], list[Push]]:
    from moto import mock_aws
    from moto.server import ThreadedMotoServer

    from local_stack.account import DEMO_DB_PASSWORD, DEMO_GHCR_TOKEN, create_demo_account
    from local_stack.images import ImageBuilder
    from local_stack.instance.world import (
        PROJECT_DIR,
        SAMPLE_APP,
        db_server,
        push_sample_app,
        world_runtime,
    )
    from local_stack.registry import FakeRegistry
    from local_stack.serve import serve_handler
    from tasks.app.user_data import LaunchSpec
    from tasks.cloud.aws import build_clients
    from tasks.cloud.on_instance import ALEMBIC_HEADS_LABEL, BOOTSTRAP_DONE, compose_command
    from tasks.cloud.ssm import run_command
    from tasks.config import PreviewConfig, load_config
    from tasks.steps.launch import launch_instance
    from tasks.steps.update import SWITCH_LOG, deploy_in_place

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    registry = FakeRegistry(scheme="http")
    try:
        with (
            mock_aws(),
            serve_handler(registry.handle) as registry_url,
            db_server(root / "db", role="app", password=DEMO_DB_PASSWORD, database="app") as db,
        ):
            registry.host = registry_url.removeprefix("http://")
            runtime = world_runtime(root / "instances", (host, port), db, registry.host)
            with runtime.patched():
                clients = build_clients(PreviewConfig(region="ap-northeast-1"))
                account = create_demo_account(clients, database_url=db.database_url)
                registry.users["octo-org"] = DEMO_GHCR_TOKEN
                config = load_config(
                    {
                        **account.config_values(),
                        "region": "ap-northeast-1",
                        "image": f"{registry.host}/{REPO}",
                    },
                    use_variable=False,
                )
                v1 = push_sample_app(registry, REPO, V1_SHA, "v1", private=True)
                v2 = push_sample_app(registry, REPO, V2_SHA, "v2", private=True)
                launched = launch_instance(
                    clients.ec2, config, LaunchSpec(REPO, 1, V1_SHA, digest=v1)
                )
                instance_id = launched.instance_id

                def run(lines: list[str], timeout: float = 600) -> str:
                    result = run_command(
                        clients.ssm,
                        instance_id,
                        ["set -u", TIME, *lines],
                        timeout_seconds=timeout,
                        poll_seconds=0.1,
                    )
                    if not result.ok:
                        raise RuntimeError(f"exit {result.exit_code}: {result.output[-3000:]}")
                    return result.stdout

                pushes: list[tuple[str, int, int, list[str], dict[str, list[float]]]] = []
                switch_log = shlex.quote(f"{config.app_dir}/{SWITCH_LOG}")
                wait_retired = f"until grep -q {RETIRED} {switch_log}; do sleep 0.1; done"
                retired = [
                    f"timeout 60 bash -c {shlex.quote(wait_retired)}",
                    f"cat {switch_log}",
                ]
                deadline = time.monotonic() + 300
                while not runtime.agent_ready(instance_id) or "done" not in run(
                    [f"test -f {BOOTSTRAP_DONE} && echo done || true"]
                ):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the instance did not bootstrap in 300 s")
                    time.sleep(0.5)
                q = shlex.quote
                img1 = q(config.pinned_image(REPO, V1_SHA, v1))
                img2 = q(config.pinned_image(REPO, V2_SHA, v2))
                by_digest = q(f"{config.image}@{v2}")
                compose = compose_command(config.app_dir)
                app_dir = q(config.app_dir)
                label = q(f'{{{{index .Config.Labels "{ALEMBIC_HEADS_LABEL}"}}}}')
                healthz = f"http://127.0.0.1:{config.app_port}/healthz"
                # Any HTTP answer: v2's /healthz says 503 until the database is at its head.
                wait_app = (
                    "until [ \"$(curl -s -o /dev/null -w '%{http_code}' --max-time 2"
                    f' {healthz})" != 000 ]; do sleep 0.05; done'
                )

                def set_image(ref: str) -> str:
                    return (
                        f"sed -i 's|^APP_IMAGE=.*|APP_IMAGE='{ref}'|' {app_dir}/.env"
                        f" && grep -q APP_IMAGE= {app_dir}/.env"
                    )

                lines = [f"cd {app_dir}", f"docker pull {img2} >/dev/null"]
                for _ in range(repeat):
                    lines += [
                        "t container-start docker run --rm --network none --entrypoint true"
                        f" {img2}",
                        f"t image-label docker image inspect -f {label} {img2}",
                        f"t image-present docker image inspect {by_digest}",
                        f"t pull-present docker pull {img2}",
                        f"t run-start {compose} run --rm -T {config.app_service} true",
                    ]
                for ref in [img2, img1] * repeat:
                    lines += [
                        set_image(ref),
                        f"t compose-up {compose} up -d",
                        f"t app-start timeout 60 bash -c {q(wait_app)}",
                    ]
                lines += [
                    set_image(img2),
                    f"{compose} up -d",
                    f"t app-start-v2 timeout 60 bash -c {q(wait_app)}",
                ]
                alembic = f"{compose} run --rm -T {config.app_service} alembic"
                for _ in range(repeat):
                    lines += [
                        f"t alembic-0 {alembic} upgrade head",
                        f"t alembic-current {compose} exec -T {config.app_service} alembic current",
                        f"{alembic} downgrade -1 >/dev/null 2>&1",
                        f"t alembic-1 {alembic} upgrade head",
                        f"{alembic} downgrade base >/dev/null 2>&1",
                        f"t alembic-2 {alembic} upgrade head",
                    ]
                engine = run(lines)
                pulls = [f"{compose} down >/dev/null 2>&1"]
                for _ in range(repeat):
                    pulls += [
                        "docker rmi -f $(docker images -aq) >/dev/null 2>&1 || true",
                        f"t pull-full docker pull {img1}",
                        f"t pull-top docker pull {img2}",
                    ]
                found = timings(engine)
                # A push while a reviewer polls through port forwarding, as the swap was (the
                # app recreated: v2 → v1) and as it is (pr-preview's deploy: v1 → v2 beside it).
                recreate = [set_image(img1), f"t push-recreate {compose} up -d"]
                recreate.append(f"t push-recreate-start timeout 60 bash -c {q(wait_app)}")
                for _ in range(repeat):
                    polls, seconds = polled(runtime.root, instance_id, lambda: run(recreate))
                    pushes.append(("recreate (before)", *polls, timings(seconds)))
                    deployed = polled(
                        runtime.root,
                        instance_id,
                        lambda: deploy_in_place(
                            clients.ec2,
                            clients.ssm,
                            config,
                            instance_id,
                            repo=REPO,
                            sha=V2_SHA,
                            digest=v2,
                        ),
                    )
                    (polled_n, failed_n, versions), result = deployed
                    stage_seconds = {f"push-{s.name}": [s.seconds] for s in result.stages}
                    # The old version is retired after the command (holding the deploy lock).
                    stage_seconds["push-retire (after)"] = [retire_seconds(run(retired))]
                    pushes.append(("side by side", polled_n, failed_n, versions, stage_seconds))
                for name, values in timings(run(pulls)).items():
                    found.setdefault(name, []).extend(values)
    finally:
        server.stop()
    builder = ImageBuilder()
    app_layer = builder._app_layer(PROJECT_DIR / SAMPLE_APP / "v2").size
    full = builder.base().size + builder.python_deps().size + app_layer
    mb = {"full": full / 1e6, "top": app_layer / 1e6}
    how = {
        "container-start": "docker run --rm --network none --entrypoint true IMAGE",
        "image-label": "docker image inspect -f '{{index .Config.Labels ...}}' IMAGE",
        "image-present": "docker image inspect IMAGE@digest (is it here?)",
        "pull-present": "docker pull IMAGE@digest of an image already here",
        "run-start": "docker compose run --rm -T api true",
        "compose-up": "APP_IMAGE flipped v1↔v2 (both present), docker compose up -d",
        "app-start": "after compose up -d: until curl /healthz gets any HTTP answer (uvicorn up)",
        "app-start-v2": "v2 only: until curl /healthz gets any HTTP answer",
        "alembic-0": "compose run --rm -T api alembic upgrade head, at head (0 revisions)",
        "alembic-1": "the same after downgrade -1 (1 revision)",
        "alembic-2": "the same after downgrade base (2 revisions)",
        "alembic-current": "docker compose exec -T api alembic current (running container)",
        "pull-full": f"docker pull of v1 after docker rmi of every image ({mb['full']:.0f} MB,"
        " 3 uncompressed layers, loopback registry)",
        "pull-top": f"docker pull of v2 with v1 present (its app layer, {mb['top']:.2f} MB)",
    }
    figures = [
        Figure(name, statistics.median(values), len(values), how.get(name, ""))
        for name, values in found.items()
    ]
    return figures, mb, pushes


RETIRED = "' retire ok '"  # the switch log's last line (tasks/steps/update.py)


def retire_seconds(log: str) -> float:
    """The background retirement's seconds, from its stage line in the switch log."""
    [line] = [line for line in log.splitlines() if " retire ok " in line]
    return float(line.split()[3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    started = time.monotonic()
    figures, _, pushes = measure(args.repeat, root)
    day = datetime.now(UTC).date().isoformat()
    print(f"\nbench/bench_engine.py on a real local instance, {day}, median of --repeat")
    print(f"{'operation':<18}{'seconds':>9}{'runs':>6}  how")
    for figure in figures:
        print(f"{figure.name:<18}{figure.seconds:>9.3f}{figure.runs:>6}  {figure.how}")
    print("\nA push while a reviewer polls GET / every 100 ms through port forwarding")
    print(f"{'push':<18}{'polled':>7}{'failed':>7}  versions  seconds")
    for how, count, failed, versions, seconds in pushes:
        shown = ", ".join(f"{name} {values[0]:.2f}" for name, values in seconds.items())
        print(f"{how:<18}{count:>7}{failed:>7}  {' → '.join(versions):<8}  {shown}")
    failed_sides = [failed for how, _, failed, _, _ in pushes if how == "side by side"]
    print(
        f"\nrequests failed during a push: {sum(failed_sides)}"
        f" (over {len(failed_sides)} pushes; the app recreated instead:"
        f" {sum(f for how, _, f, _, _ in pushes if how != 'side by side')})"
    )
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
