"""Sleep and wake on real local instances: one preview walked through a scheduled night, an
idle stop and a push that wakes it — the real app, its real Docker Engine and data, the real
shutdown timer, behind moto's StopInstances/StartInstances (local_stack/instance/runtime.py)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from deployments.cli.tunnel import forward_when_accepted, wake_if_asleep
from flows.preview import pr_preview
from flows.sleep import PowerReport, pr_sleep, pr_wake, stop_idle_previews
from local_stack.instance.sandbox import SHIMS
from tasks.cloud.instances import find_previews
from tasks.cloud.on_instance import ACTIVITY_SCRIPT, ACTIVITY_UNIT, LAST_ACTIVITY
from tasks.cloud.ssm import run_command
from tasks.cloud.tags import parse_time
from tasks.cloud.tunnel import tunnel_argv
from tests import test_failure_table as failure_table
from tests.support import REGION
from tests.support.moto_state import state_of, tags
from tests.test_failure_table import REPO, SHA1, SHA2, World, database_tables
from tests.test_instance_runtime import free_port, instance_processes, port_forwarding

pytestmark = pytest.mark.usefixtures("prefect_server")
# The failure table's world: the sample app's images, a db-server, real instances.
database = failure_table.database
published = failure_table.published
world = failure_table.world

KEEPSAKE = "/var/lib/pr-preview-test/keepsake"
APP_PORT = shlex.quote("( sport = :8000 )")


def on_instance(world: World, instance_id: str, command: str) -> str:
    result = run_command(
        world.aws.ssm, instance_id, [command], timeout_seconds=30, poll_seconds=0.2
    )
    assert result.ok, result.output
    return result.stdout.strip()


def idle_stop(world: World, now: datetime) -> PowerReport:
    """The sweeper's idle stop, judged at ``now``."""
    live = find_previews(world.aws.ec2, world.config.purpose_tag)
    return stop_idle_previews(world.aws, world.config, live, None, now=now)


def comments(world: World, instance_id: str) -> dict[str, str]:
    sent = world.aws.ssm.list_commands(InstanceId=instance_id)["Commands"]
    return {command["CommandId"]: command["Comment"] for command in sent}


def test_a_night_asleep_an_idle_stop_and_a_push_that_wakes_it_in_place(world: World) -> None:
    opened = pr_preview(REPO, 42, SHA1, action="opened", config=world.config, return_state=True)
    first = opened.result()
    assert (first.status, first.path) == ("ready", "launched"), opened.message
    instance_id = first.instance_id
    assert instance_id is not None
    on_instance(
        world, instance_id, f"mkdir -p {KEEPSAKE.rsplit('/', 1)[0]}; echo kept > {KEEPSAKE}"
    )
    tables = database_tables(world)

    # The night: the schedule stops it; its processes are gone, its disk stays.
    assert pr_sleep(config=world.config).changed == [instance_id]
    assert state_of(world.aws, instance_id) == "stopped"
    assert not instance_processes(instance_id)
    sent_before_wake = comments(world, instance_id)

    # The morning: started again, the same instance, healthy, its data and timer back.
    woke = pr_wake(config=world.config)
    assert woke.changed == [instance_id] and not woke.failed
    assert state_of(world.aws, instance_id) == "running"
    [reservation] = world.aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    after = tags(reservation["Instances"][0])
    assert "sleep-state" not in after
    # The activity timer is enabled: it started again with the instance.
    timer = f"systemctl is-active {ACTIVITY_UNIT}.timer"
    assert on_instance(world, instance_id, timer) == "active"
    shutdown_at = parse_time(after["shutdown-at"])
    assert shutdown_at is not None
    sandbox = world.runtime.sandboxes[instance_id]
    due = float(sandbox.inside("/run/pr-preview/shutdown-at").read_text())
    assert abs(due - shutdown_at.timestamp()) <= 60  # re-armed to the minute from the tag
    assert on_instance(world, instance_id, f"cat {KEEPSAKE}") == "kept"
    assert database_tables(world) == tables
    since_wake = [c for i, c in comments(world, instance_id).items() if i not in sent_before_wake]
    assert "pr-preview wake: re-arm the shutdown timer" in since_wake
    assert not [c for c in since_wake if c.startswith("pr-preview migrate")]
    with port_forwarding(world.runtime, instance_id) as url:
        assert SHA1 in httpx.get(url, timeout=10).text

    # Idle: the instance samples its use. A connection held open through port forwarding
    # keeps it awake through the sweeper's idle stop, even judged minutes from now; closed,
    # the same stop puts it to sleep once idle_stop_minutes have passed since that use.
    world.config.idle_stop_minutes = 5
    later = datetime.now(UTC) + timedelta(minutes=6)
    with port_forwarding(world.runtime, instance_id) as url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            held = ""
            deadline = time.monotonic() + 10
            while not held and time.monotonic() < deadline:
                held = on_instance(world, instance_id, f"ss -Htn state established {APP_PORT}")
            assert on_instance(world, instance_id, ACTIVITY_SCRIPT) == "ACTIVITY 0 1"
            awake = idle_stop(world, later)
        assert awake.changed == [] and state_of(world.aws, instance_id) == "running"
        assert awake.rows[0]["outcome"] == "in use now (0 sessions, 1 connections)"
    recorded = parse_time(on_instance(world, instance_id, f"cat {LAST_ACTIVITY}"))
    assert recorded is not None and later - recorded > timedelta(minutes=5)
    assert idle_stop(world, datetime.now(UTC)).changed == []  # used a moment ago
    assert idle_stop(world, later).changed == [instance_id]
    assert state_of(world.aws, instance_id) == "stopped"
    [reservation] = world.aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    assert tags(reservation["Instances"][0])["sleep-state"] == "idle"

    # A push wakes it and deploys the new sha on the same instance.
    pushed = pr_preview(
        REPO, 42, SHA2, action="synchronize", config=world.config, return_state=True
    )
    second = pushed.result()
    assert (second.status, second.path, second.instance_id) == (
        "ready",
        "in-place",
        instance_id,
    ), pushed.message
    assert len(world.aws.ec2.describe_instances()["Reservations"]) == 1  # no new instance
    with port_forwarding(world.runtime, instance_id) as url:
        assert SHA2 in httpx.get(url, timeout=10).text

    # Asleep once more: `pr-preview tunnel 42` wakes it and starts the session again while
    # Session Manager still refuses the instance (3 s after Run Command takes it, here).
    assert pr_sleep(config=world.config).changed == [instance_id]
    world.runtime.session_delay_seconds = 3
    assert wake_if_asleep(world.aws, world.config, 42, None) == instance_id
    port = free_port()
    argv = [str(SHIMS / "aws"), *tunnel_argv(instance_id, REGION, local_port=port)[1:]]
    sessions: list[subprocess.Popen[str]] = []

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[str]:
        env = {**os.environ, "PR_PREVIEW_RUNTIME_ROOT": str(world.runtime.root)}
        sessions.append(subprocess.Popen(*args, env=env, **kwargs))
        return sessions[-1]

    ended: list[int] = []
    forwarding = threading.Thread(
        target=lambda: ended.append(
            forward_when_accepted(argv, wait_seconds=60, retry_seconds=0.5, popen=popen)
        )
    )
    forwarding.start()
    try:
        page = ""
        deadline = time.monotonic() + 60
        while SHA2 not in page and time.monotonic() < deadline and forwarding.is_alive():
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text
            except httpx.HTTPError:
                time.sleep(0.3)
        assert SHA2 in page
        assert len(sessions) >= 2  # refused (TargetNotConnected) first, then accepted
        assert sessions[0].returncode == 254
    finally:
        for session in sessions:
            if session.poll() is None:
                session.terminate()
        forwarding.join(15)
    assert ended == [0]
