"""Time to preview: the runbook's serial workflow against ours, on a latency model of real AWS.

moto stands in for EC2/SSM/IAM and the scripted SSM instance for the machine; bench/
latency_model.py makes both as slow as real AWS (each number with its source), with time scaled
down by ``--scale``. Three scenarios, each in a fresh moto world:

- new PR, fleet empty;
- new PR while another PR's preview holds the single slot (``max_previews=1``, the runbook's
  singleton): it must be terminated first;
- push to an open PR whose preview is healthy: the runbook relaunches, we update in place.

Three paths per scenario:

(a) runbook: the GitHub Actions workflow of runbook §2 as plain calls — preflight, terminate
    every preview and ``aws ec2 wait instance-terminated``, run-instances, ``aws ec2 wait
    instance-running``, poll port 8000 over SSM, migrate, probe; CLI waiter delays as botocore
    ships them (15 s / 5 s);
(b) ours: ``flows.preview.pr_preview`` on a temporary Prefect server;
(c) plain: the same steps as (b) called as plain functions (``task.fn`` and the functions the
    tasks wrap), preflight ∥ image check in two threads as the flow does.

Reported in modelled real seconds: (wall − time spent inside moto) / scale. Prefect's own cost
does not shrink with the scale, so ours = plain + overhead, overhead = (b) − (c) in wall seconds,
counted in full (an upper bound: on AWS part of it would overlap the boot).

Two absolute constants in the code do not follow ``poll_seconds`` and would be 10-20× too slow
when scaled, so the bench restores their real-scale value (× scale) for every path: the SSM
result poll (``min(poll_seconds, 0.5)`` in wait_ready, ``min(poll_seconds, 1.0)`` in migrate,
probe, update) and the terminate waiter's ``max(1, ceil(poll_seconds))`` delay.

Run: .venv/bin/python bench/bench_time_to_preview.py [--scale 0.05]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="bench-ttp-prefect-"))
os.environ.update(
    {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(PREFECT_HOME),
        "TMPDIR": str(PREFECT_HOME),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "ap-northeast-1",
    }
)
for name in list(os.environ):
    if name.startswith("PR_PREVIEW_") or name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        del os.environ[name]
for name in ("GITHUB_TOKEN", "GITHUB_API_URL", "PREFECT_API_URL"):
    os.environ.pop(name, None)

from botocore.exceptions import ClientError  # noqa: E402
from moto import mock_aws  # noqa: E402

import tasks.migrate  # noqa: E402
import tasks.probe  # noqa: E402
import tasks.terminate  # noqa: E402
import tasks.update  # noqa: E402
import tasks.wait_ready  # noqa: E402
from bench import latency_model as model  # noqa: E402
from bench.latency_model import LatencyModel, World  # noqa: E402
from local_stack.account import create_demo_account  # noqa: E402
from local_stack.registry import FakeRegistry  # noqa: E402
from local_stack.scripted_instance import MIGRATE, ScriptedInstances  # noqa: E402
from local_stack.serve import serve_handler  # noqa: E402
from tasks.aws import AwsClients, build_clients  # noqa: E402
from tasks.check_image import check_image  # noqa: E402
from tasks.config import PreviewConfig, load_config  # noqa: E402
from tasks.instances import batches, find_previews, terminate_in_batches, terminate_outdated  # noqa: E402
from tasks.launch import LaunchSpec, launch_instance  # noqa: E402
from tasks.migrate import migrate_commands, run_migrations  # noqa: E402
from tasks.on_instance import port_check  # noqa: E402
from tasks.preflight import run_preflight  # noqa: E402
from tasks.probe import probe_app, probe_command  # noqa: E402
from tasks.retry import error_code  # noqa: E402
from tasks.secrets import read_secrets  # noqa: E402
from tasks.ssm import run_command  # noqa: E402
from tasks.terminate import make_room  # noqa: E402
from tasks.update import check_health, deploy_in_place  # noqa: E402
from tasks.wait_ready import wait_until_ready  # noqa: E402

REGION = "ap-northeast-1"
REPO = "octo-org/app"
PR, OTHER_PR = 42, 41
SHA0 = "0a0b0c0d0e0f0a0b0c0d0e0f0a0b0c0d0e0f0a0b"
SHA1 = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SHA2 = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
GHCR_TOKEN = "ghp_benchTimeToPreview0123456789abcdefAB"
TARGET_NEW_PR, TARGET_PUSH, TARGET_OVERHEAD_RATIO = 90.0, 30.0, 1.5


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    sha: str
    action: str
    other_preview: bool = False  # another PR holds the single slot
    own_preview: bool = False  # this PR's preview runs a healthy older sha

    @property
    def target(self) -> float:
        return TARGET_PUSH if self.own_preview else TARGET_NEW_PR

    def floor(self, path: str) -> float:
        """The model's critical path with instant polls and no orchestration at all."""
        m = model
        ssm = m.SSM_COMMAND.seconds
        after_ready = m.MIGRATION.seconds + ssm + m.PROBE_CURL.seconds + ssm
        if self.own_preview and path != "runbook":
            return ssm + m.deploy_seconds() + ssm + after_ready
        terminate = m.SHUTTING_DOWN_TO_TERMINATED.seconds if self.needs_terminate(path) else 0.0
        boot = m.RUN_INSTANCES_API.seconds + m.PENDING_TO_RUNNING.seconds
        ready = m.bootstrap_seconds() + m.APP_START.seconds + ssm
        return terminate + boot + ready + after_ready

    def needs_terminate(self, path: str) -> bool:
        """Only the runbook waits for the old instance to be terminated before launching."""
        return path == "runbook" and (self.other_preview or self.own_preview)


SCENARIOS = (
    Scenario("new-empty", "new PR, fleet empty", SHA1, "opened"),
    Scenario("new-evict", "new PR, evicts the singleton", SHA1, "opened", other_preview=True),
    Scenario("push", "push to an open PR", SHA2, "synchronize", own_preview=True),
)


@dataclass
class Run:
    path: str
    scenario: Scenario
    wall: float
    moto: float
    api_calls: int
    outcome: str
    scale: float
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def net_wall(self) -> float:
        """Wall time less the time moto itself spent answering (not part of the model)."""
        return self.wall - self.moto

    @property
    def modelled(self) -> float:
        return self.net_wall / self.scale


# --- keeping absolute constants faithful under the scale ------------------------------------


@contextlib.contextmanager
def faithful_polls(scale: float) -> Iterator[None]:
    """SSM result polls and the terminate waiter at their real-scale value × scale."""
    caps = {tasks.wait_ready: 0.5, tasks.migrate: 1.0, tasks.probe: 1.0, tasks.update: 1.0}
    saved: dict[Any, Any] = {module: module.run_command for module in caps}
    for module, cap in caps.items():
        module.run_command = _with_poll(saved[module], cap * scale)  # type: ignore[attr-defined]
    saved_wait = tasks.terminate.wait_terminated

    def wait_terminated(ec2: Any, ids: Any, *, timeout_seconds: float, poll_seconds: float) -> None:
        for batch in batches(list(ids)):
            ec2.get_waiter("instance_terminated").wait(
                InstanceIds=batch,
                WaiterConfig={
                    "Delay": poll_seconds,
                    "MaxAttempts": 1 + int(timeout_seconds // poll_seconds),
                },
            )

    tasks.terminate.wait_terminated = wait_terminated
    try:
        yield
    finally:
        for module, original in saved.items():
            module.run_command = original
        tasks.terminate.wait_terminated = saved_wait


def _with_poll(original: Callable[..., Any], poll: float) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs["poll_seconds"] = poll
        return original(*args, **kwargs)

    return run


# --- worlds ---------------------------------------------------------------------------------


@dataclass
class Setup:
    clients: AwsClients
    config: PreviewConfig
    fake: ScriptedInstances
    world: World


def scaled_config(values: dict[str, Any], scale: float) -> PreviewConfig:
    """The defaults' timings × scale (poll 5 s, retry delay 2 s, timeouts)."""
    defaults = PreviewConfig.model_validate({})
    knobs = (
        "poll_seconds",
        "retry_delay_seconds",
        "ready_timeout_seconds",
        "migrate_timeout_seconds",
        "probe_timeout_seconds",
        "terminate_timeout_seconds",
        "image_wait_seconds",
    )
    timings = {knob: getattr(defaults, knob) * scale for knob in knobs}
    return load_config({**values, **timings}, env={}, use_variable=False)


@contextlib.contextmanager
def world_for(scenario: Scenario, latency: LatencyModel, registry: FakeRegistry) -> Iterator[Setup]:
    """A fresh moto account, the scripted instance and the scenario's existing previews."""
    with mock_aws(), ScriptedInstances().patched() as fake:
        world = latency.new_world()
        clients = build_clients(PreviewConfig.model_validate({"region": REGION}))
        account = create_demo_account(clients, ghcr_token=GHCR_TOKEN)
        config = scaled_config(
            {
                **account.config_values(),
                "region": REGION,
                "image": f"{registry.host}/octo-org/app",
            },
            latency.scale,
        )
        latency.script(fake)
        existing = []
        if scenario.other_preview:
            existing.append(LaunchSpec(REPO, OTHER_PR, SHA0))
        if scenario.own_preview:
            existing.append(LaunchSpec(REPO, PR, SHA1))
        for spec in existing:
            launched = launch_instance(clients.ec2, config, spec)
            world.booted(launched.instance_id)
        world.events.clear()
        world.moto_seconds, world.api_calls = 0.0, 0
        yield Setup(clients, config, fake, world)


# --- the three paths ------------------------------------------------------------------------


def runbook_path(setup: Setup, scenario: Scenario, scale: float) -> str:
    """Runbook §2 (GitHub Actions): one step after the other, CLI waiters, fixed sleeps."""
    ec2, ssm, config = setup.clients.ec2, setup.clients.ssm, setup.config
    waiter_delay = model.CLI_WAITER_DELAY.seconds * scale
    command_poll = model.CLI_COMMAND_WAITER_DELAY.seconds * scale
    report = run_preflight(setup.clients, config)
    if not report.passed:
        raise RuntimeError(f"preflight failed: {report.failures}")
    # 4. Upsert: terminate every singleton preview and wait, then run-instances.
    old = [preview.instance_id for preview in find_previews(ec2, config.purpose_tag)]
    if old:
        terminate_in_batches(ec2, old)
        ec2.get_waiter("instance_terminated").wait(
            InstanceIds=old,
            WaiterConfig={"Delay": waiter_delay, "MaxAttempts": 40},  # type: ignore[typeddict-item]
        )
    launched = launch_instance(
        ec2,
        config,
        LaunchSpec(REPO, PR, scenario.sha),
        ami_id=report.ami_id,
        subnet_id=report.subnet_id,
    )
    instance_id = launched.instance_id
    ec2.get_waiter("instance_running").wait(
        InstanceIds=[instance_id],
        WaiterConfig={"Delay": waiter_delay, "MaxAttempts": 40},  # type: ignore[typeddict-item]
    )

    def shell(commands: list[str]) -> bool:
        try:
            result = run_command(
                ssm, instance_id, commands, timeout_seconds=60 * scale, poll_seconds=command_poll
            )
        except ClientError as exc:
            if error_code(exc) == "InvalidInstanceId":  # the agent has not registered yet
                return False
            raise
        return result.ok

    def until(commands: list[str], what: str, attempts: int) -> None:
        for _ in range(attempts):
            if shell(commands):
                return
            time.sleep(model.RUNBOOK_PORT_POLL.seconds * scale)
        raise RuntimeError(f"runbook: {what} did not succeed")

    # 6. Wait until 8000/TCP opens, migrate (with retries), probe /docs.
    until(port_check(config.app_port), "port 8000", attempts=60)
    until(migrate_commands(config), "migration", attempts=5)
    until(probe_command(config.app_port, "/docs"), "probe", attempts=3)
    return "relaunched" if scenario.own_preview else "launched"


def plain_path(setup: Setup, scenario: Scenario) -> str:
    """Our flow's steps (flows/preview.py ``_deploy``) as plain calls."""
    clients, config = setup.clients, setup.config
    ec2, ssm = clients.ec2, clients.ssm
    secrets = read_secrets(ssm, config)
    with ThreadPoolExecutor(max_workers=2) as pool:
        checked = pool.submit(run_preflight, clients, config)
        image = pool.submit(check_image.fn, config, REPO, PR, scenario.sha, secrets.ghcr_token)
        report = checked.result()
        image.result()
    if not report.passed:
        raise RuntimeError(f"preflight failed: {report.failures}")
    current = [
        preview
        for preview in find_previews(
            ec2, config.purpose_tag, repo=REPO, pr_number=PR, states=("running",)
        )
        if preview.sha != scenario.sha
    ]
    if len(current) == 1:
        instance_id = current[0].instance_id
        if check_health(ec2, ssm, instance_id, config).healthy:
            deploy_in_place(ec2, ssm, instance_id, config, repo=REPO, sha=scenario.sha)
            run_migrations(ssm, instance_id, config)
            probe_app(ssm, instance_id, config)
            return "in-place"
    # As the flow's terminate step: TerminateInstances frees the slot; no wait for terminated.
    terminate_outdated(ec2, config, REPO, PR, keep_sha=scenario.sha, wait=False)
    make_room(ec2, config, REPO, PR, wait=False)
    launched = launch_instance(
        ec2,
        config,
        LaunchSpec(REPO, PR, scenario.sha),
        ami_id=report.ami_id,
        subnet_id=report.subnet_id,
    )
    wait_until_ready(ec2, ssm, launched.instance_id, config)
    run_migrations(ssm, launched.instance_id, config)
    probe_app(ssm, launched.instance_id, config)
    return "launched"


def flow_path(setup: Setup, scenario: Scenario) -> str:
    from flows.preview import pr_preview

    result = pr_preview(REPO, PR, scenario.sha, action=scenario.action, config=setup.config)
    if result.status != "ready":
        raise RuntimeError(f"flow ended {result.status}: {result.reason}")
    return result.path


def timed(
    path: str,
    scenario: Scenario,
    latency: LatencyModel,
    registry: FakeRegistry,
    body: Callable[[Setup], str],
) -> Run:
    with world_for(scenario, latency, registry) as setup:
        with faithful_polls(latency.scale):
            started = time.monotonic()
            outcome = body(setup)
            wall = time.monotonic() - started
        run = Run(
            path,
            scenario,
            wall,
            setup.world.moto_seconds,
            setup.world.api_calls,
            outcome,
            latency.scale,
        )
        run.phases = phases(setup, started, latency.scale)
    return run


def phases(setup: Setup, started: float, scale: float) -> dict[str, float]:
    """When (wall ÷ scale after the start) the run launched, migrated and probed healthy."""
    found: dict[str, float] = {}
    for at, what in setup.world.events:
        key = what.split()[0]
        found.setdefault(key, (at - started) / scale)
    for call in setup.fake.calls:
        if call.at < started:
            continue
        if "migrate" not in found and MIGRATE.strip() in call.command:
            found["migrate"] = (call.at - started) / scale
        if call.reply is not None and call.reply.exit_code == 0 and "curl" in call.command:
            found.setdefault("probe-ok", (call.at - started) / scale)
    return found


# --- report ---------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_report(runs: dict[tuple[str, str], Run], scale: float, prefect_seconds: float) -> None:
    print()
    print(f"Time to preview — modelled real seconds = (wall − moto) ÷ scale, scale {scale:g}")
    print("ours = plain path + orchestration overhead (real seconds, not scaled)")
    header = (
        f"{'scenario':30} {'floor':>6} {'runbook':>8} {'ours':>7} {'runbook/ours':>12}"
        f" {'target':>7}  verdict   runbook path → our path"
    )
    print(header)
    print("-" * len(header))
    for scenario in SCENARIOS:
        serial = runs[("runbook", scenario.key)]
        plain = runs[("plain", scenario.key)]
        flow = runs[("flow", scenario.key)]
        overhead = flow.net_wall - plain.net_wall
        ours = plain.modelled + overhead
        print(
            f"{scenario.title:30} {scenario.floor('ours'):>6.1f} {serial.modelled:>8.1f}"
            f" {ours:>7.1f} {serial.modelled / ours:>11.2f}× {f'≤{scenario.target:g}':>7}"
            f"  {verdict(ours <= scenario.target):7}   {serial.outcome} → {flow.outcome}"
        )
    print()
    print("Orchestration overhead — our steps through Prefect vs the same steps as plain calls")
    header = (
        f"{'scenario':30} {'plain':>7} {'flow':>7} {'overhead':>9} {'flow/plain':>10}"
        f" {'target':>7}  verdict   {'wall plain/flow s':>18} {'AWS calls p/f':>14}"
    )
    print(header)
    print("-" * len(header))
    for scenario in SCENARIOS:
        plain = runs[("plain", scenario.key)]
        flow = runs[("flow", scenario.key)]
        overhead = flow.net_wall - plain.net_wall
        ours = plain.modelled + overhead
        ratio = ours / plain.modelled
        print(
            f"{scenario.title:30} {plain.modelled:>7.1f} {ours:>7.1f} {overhead:>8.2f}s"
            f" {ratio:>9.2f}× {'≤' + format(TARGET_OVERHEAD_RATIO, 'g') + '×':>7}"
            f"  {verdict(ratio <= TARGET_OVERHEAD_RATIO):7}"
            f"   {plain.wall:>7.2f} / {flow.wall:<7.2f} {plain.api_calls:>6} / {flow.api_calls:<6}"
        )
    print()
    print("Lag behind the model's floor (modelled s; floor = every poll instant, no orchestration)")
    for scenario in SCENARIOS:
        for path in ("runbook", "plain"):
            run = runs[(path, scenario.key)]
            floor = scenario.floor(path)
            marks = ", ".join(f"{name} @{at:.1f}" for name, at in run.phases.items())
            print(
                f"  {scenario.title:30} {path:8} {run.modelled:6.1f} − floor {floor:5.1f}"
                f" = {run.modelled - floor:+5.1f}   ({marks})"
            )
    print()
    print(f"Prefect test server start-up: {prefect_seconds:.1f} s (not in any number above)")


def print_model(scale: float) -> None:
    print(f"Latency model (modelled real seconds; wall = × {scale:g})")
    for name, measurement in model.MEASUREMENTS.items():
        print(f"  {name:38} {measurement.seconds:6.2f}  {measurement.source}")
    print(
        f"  → running → bootstrap-done {model.bootstrap_seconds():.1f} s, app answers"
        f" {model.APP_START.seconds:g} s later; in-place deploy {model.deploy_seconds():.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.05, help="wall ÷ modelled time")
    args = parser.parse_args()
    scale: float = args.scale
    print_model(scale)

    from prefect.testing.utilities import prefect_test_harness

    latency = LatencyModel(scale)
    registry = FakeRegistry(scheme="http")
    registry.users["octo-org"] = GHCR_TOKEN
    for sha in (SHA0, SHA1, SHA2):
        registry.push("octo-org/app", sha, private=True)
    runs: dict[tuple[str, str], Run] = {}
    try:
        with serve_handler(registry.handle) as url, latency.installed():
            registry.host = url.removeprefix("http://")
            started = time.monotonic()
            with prefect_test_harness(server_startup_timeout=60):
                prefect_seconds = time.monotonic() - started
                warm = timed(
                    "flow", SCENARIOS[0], latency, registry, lambda s: flow_path(s, SCENARIOS[0])
                )
                print(f"\nwarm-up flow run (not counted): {warm.wall:.2f} s wall")
                for scenario in SCENARIOS:
                    for path, body in (
                        ("runbook", lambda s, sc=scenario: runbook_path(s, sc, scale)),
                        ("plain", lambda s, sc=scenario: plain_path(s, sc)),
                        ("flow", lambda s, sc=scenario: flow_path(s, sc)),
                    ):
                        run = timed(path, scenario, latency, registry, body)
                        runs[(path, scenario.key)] = run
                        print(
                            f"  {scenario.key:10} {path:8} {run.outcome:10} wall {run.wall:6.2f} s"
                            f" (moto {run.moto:5.2f} s, {run.api_calls} AWS calls)"
                            f" → {run.modelled:6.1f} modelled s"
                        )
        print_report(runs, scale, prefect_seconds)
    finally:
        shutil.rmtree(PREFECT_HOME, ignore_errors=True)


if __name__ == "__main__":
    main()
