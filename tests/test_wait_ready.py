"""wait_ready stage by stage on moto, the instance scripted through SSM: one command per poll
(the scripted instance answers each of its functions by the rules for that check)."""

from __future__ import annotations

import time

import pytest

import tasks.steps.wait_ready
from tasks.cloud.aws import AwsClients
from tasks.cloud.on_instance import port_check
from tasks.config import PreviewConfig
from tasks.run.budget import RunTimedOut, run_budget
from tasks.steps.wait_ready import (
    STAGES,
    AppDown,
    BootstrapFailed,
    InstanceNotRunning,
    ReadyTimeout,
    StageTimeouts,
    app_down,
    parse_ready,
    wait_until_ready,
)
from tests.support.ssm import (
    BOOTSTRAP_CHECK,
    BOOTSTRAP_DONE,
    BOOTSTRAP_PENDING,
    MIGRATED_CHECK,
    MIGRATED_ON_BOOT,
    PORT_CHECK,
    PORT_CLOSED,
    PORT_OPEN,
    PROBE,
    READY,
    Reply,
    ScriptedInstances,
    after_calls,
    bootstrap_failed,
    probe_responder,
)

SHORT = 0.15
APP_STATE = r"APP STATE"

ONE_ACCOUNT_PER_MODULE = True  # see tests/conftest.py: aws, account, config


def timeouts(config: PreviewConfig, **short: float) -> StageTimeouts:
    return StageTimeouts.from_config(config, **short)


def test_ready_after_the_bootstrap_marker_appears(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.respond(
        BOOTSTRAP_CHECK, after_calls(3, before=BOOTSTRAP_PENDING, then=BOOTSTRAP_DONE)
    )
    scripted_ssm.respond(PORT_CHECK, after_calls(2, before=PORT_CLOSED, then=PORT_OPEN))

    result = wait_until_ready(aws.ec2, aws.ssm, config, instance)

    assert [stage.stage for stage in result.stages] == list(STAGES)
    polls = {stage.stage: stage.polls for stage in result.stages}
    assert polls["ssm-agent"] == 1
    assert polls["bootstrap"] == 4
    assert polls["app-port"] == 3
    # One command per poll: the first answer proved the agent, the fourth the bootstrap, the
    # sixth the port (4 + 3 polls, one shared).
    assert scripted_ssm.commands(instance) == scripted_ssm.commands(instance, READY)
    assert len(scripted_ssm.commands(instance)) == 6
    assert not result.migrated and result.probe is None


def test_instance_that_stays_stopped_times_out_in_the_running_stage(
    aws: AwsClients, config: PreviewConfig, instance: str
):
    aws.ec2.stop_instances(InstanceIds=[instance])

    with pytest.raises(ReadyTimeout) as raised:
        wait_until_ready(
            aws.ec2, aws.ssm, config, instance, timeouts=timeouts(config, instance_running=SHORT)
        )

    assert raised.value.stage == "instance-running"
    assert "stopped" in str(raised.value)


def test_terminated_instance_fails_the_running_stage_at_once(
    aws: AwsClients, config: PreviewConfig, instance: str
):
    aws.ec2.terminate_instances(InstanceIds=[instance])

    with pytest.raises(InstanceNotRunning) as raised:
        wait_until_ready(aws.ec2, aws.ssm, config, instance)
    assert raised.value.stage == "instance-running"


def test_agent_that_never_registers_times_out_in_the_agent_stage(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.agent_offline(instance)

    with pytest.raises(ReadyTimeout) as raised:
        wait_until_ready(
            aws.ec2, aws.ssm, config, instance, timeouts=timeouts(config, ssm_agent=SHORT)
        )

    assert raised.value.stage == "ssm-agent"
    assert scripted_ssm.commands(instance) == []  # AWS refused every SendCommand


def test_agent_that_registers_late_is_waited_for(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    refusals = iter(range(3))
    scripted_ssm.agent_offline(instance, until=lambda: next(refusals, None) is None)

    result = wait_until_ready(aws.ec2, aws.ssm, config, instance)

    assert result.stages[1].stage == "ssm-agent" and result.stages[1].polls == 4


def test_an_agent_that_has_not_registered_is_asked_every_second_not_every_poll(
    aws: AwsClients,
    config: PreviewConfig,
    scripted_ssm: ScriptedInstances,
    instance: str,
    monkeypatch: pytest.MonkeyPatch,
):
    """A refused SendCommand costs one API call: the agent is asked every AGENT_POLL_SECONDS
    (1 s; 20 ms here) while the later stages keep ``poll_seconds`` (2 s here)."""
    monkeypatch.setattr(tasks.steps.wait_ready, "AGENT_POLL_SECONDS", 0.02)
    refusals = iter(range(5))
    scripted_ssm.agent_offline(instance, until=lambda: next(refusals, None) is None)
    slow = config.model_copy(update={"poll_seconds": 2.0})

    result = wait_until_ready(aws.ec2, aws.ssm, slow, instance)

    agent = result.stages[1]
    assert (agent.stage, agent.polls) == ("ssm-agent", 6)
    assert agent.seconds < slow.poll_seconds


def test_an_instance_migrated_on_boot_is_probed_by_the_same_command(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    """Migrated on boot and listening: the one command also probes (the app has no /healthz,
    /docs answers) and moves the shutdown timer — the flow has nothing left to wait for."""
    scripted_ssm.on(MIGRATED_CHECK, MIGRATED_ON_BOOT)
    scripted_ssm.respond(PROBE + "healthz", probe_responder(404))

    result = wait_until_ready(aws.ec2, aws.ssm, config, instance, ready_ttl_minutes=1440)

    assert result.migrated
    assert result.probe is not None
    assert (result.probe.path, result.probe.status_code, result.probe.timer_moved) == (
        "/docs",
        200,
        True,
    )
    assert [answer.status_code for answer in result.probe.answers] == [404, 200]
    (command,) = scripted_ssm.commands(instance)
    assert "shutdown -h +1440" in command


def test_the_probe_waits_for_the_migrations(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    """Not migrated on boot (the flow's migrate step runs first): the ready command does not
    probe, so no timer moves before the migrations ran."""
    result = wait_until_ready(aws.ec2, aws.ssm, config, instance, ready_ttl_minutes=1440)

    assert not result.migrated and result.probe is None
    assert scripted_ssm.count(PROBE, instance) == 0
    assert not [
        call for call in scripted_ssm.calls if "pr-preview-timer-moved" in call.reply.stdout
    ]


def test_the_ready_answer_is_read_from_its_marked_lines_only() -> None:
    stdout = "\n".join(
        [
            "noise: bootstrap-done is not a marker here",
            "bootstrap-done",
            "MIGRATED ON BOOT",
            "APP PORT OPEN 8000",
            "PROBE /healthz 503 0.002",
            "PROBE /docs 200 0.004 pr-preview-timer-moved",
            "PROBE /other 200 0.1",
        ]
    )

    answer = parse_ready(stdout, ["/healthz", "/docs"])

    assert (answer.bootstrap, answer.migrated, answer.port_open) == ("done", True, True)
    assert [(probe.path, probe.status_code) for probe in answer.probes] == [
        ("/healthz", 503),
        ("/docs", 200),
    ]
    assert answer.healthy_probe is not None and answer.healthy_probe.timer_moved
    failed = parse_ready("bootstrap-failed\nbootstrap failed at step: pull\n", ["/"])
    assert (failed.bootstrap, failed.failed_step, failed.port_open) == ("failed", "pull", None)


def test_bootstrap_that_never_finishes_times_out_in_the_bootstrap_stage(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.on(BOOTSTRAP_CHECK, BOOTSTRAP_PENDING)

    # A whole second (not SHORT): it polls every 10 ms, and on a loaded machine a poll over
    # moto can take a tenth of a second; a few polls must fit whatever the load.
    with pytest.raises(ReadyTimeout) as raised:
        wait_until_ready(
            aws.ec2, aws.ssm, config, instance, timeouts=timeouts(config, bootstrap=1.0)
        )

    assert raised.value.stage == "bootstrap"
    assert "no marker" in str(raised.value)
    assert scripted_ssm.count(BOOTSTRAP_CHECK, instance) > 3


def test_bootstrap_failed_marker_fails_fast_with_its_step(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.on(BOOTSTRAP_CHECK, BOOTSTRAP_PENDING, bootstrap_failed("ghcr-login"))

    with pytest.raises(BootstrapFailed) as raised:
        wait_until_ready(aws.ec2, aws.ssm, config, instance)

    assert raised.value.stage == "bootstrap"
    assert raised.value.step == "ghcr-login"
    assert str(raised.value) == "bootstrap failed at step: ghcr-login"
    assert scripted_ssm.count(BOOTSTRAP_CHECK, instance) == 2


def test_closed_app_port_times_out_in_the_port_stage(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.on(PORT_CHECK, PORT_CLOSED)

    with pytest.raises(ReadyTimeout) as raised:
        wait_until_ready(
            aws.ec2, aws.ssm, config, instance, timeouts=timeouts(config, app_port=SHORT)
        )

    assert raised.value.stage == "app-port"
    assert "127.0.0.1:8000" in str(raised.value)


@pytest.mark.parametrize("state", ["exited 1", "restarting 1"])
def test_an_app_container_that_stays_down_ends_the_wait_without_the_timeout(
    aws: AwsClients,
    config: PreviewConfig,
    scripted_ssm: ScriptedInstances,
    instance: str,
    state: str,
):
    scripted_ssm.on(PORT_CHECK, PORT_CLOSED)
    scripted_ssm.on(APP_STATE, Reply(stdout=f"APP STATE {state}\n"))
    quick = config.model_copy(update={"app_down_seconds": SHORT, "ready_timeout_seconds": 30})

    with pytest.raises(AppDown) as raised:
        wait_until_ready(aws.ec2, aws.ssm, quick, instance)

    assert raised.value.stage == "app-port"
    assert f"has been {state.split()[0]} (exit code 1)" in str(raised.value)
    assert scripted_ssm.count(PORT_CHECK, instance) >= 2


def test_a_crash_looping_app_behind_docker_s_port_proxy_ends_the_wait(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    """Docker's port proxy accepts while the app's container is between two restarts, and
    curl gets no HTTP answer: the restart count, not the port, says the app is down. Caught
    running between restarts, the container shows exit code 0 (Docker clears it on start):
    the code told is the one seen while it was down, or none."""
    scripted_ssm.on(MIGRATED_CHECK, MIGRATED_ON_BOOT)
    scripted_ssm.on(PORT_CHECK, PORT_OPEN)
    scripted_ssm.on(
        APP_STATE,
        Reply(stdout="APP STATE restarting 1 3\n"),
        Reply(stdout="APP STATE running 0 4\n"),
    )
    scripted_ssm.respond(PROBE, probe_responder(0))  # no path gives any HTTP answer
    quick = config.model_copy(update={"app_down_seconds": SHORT, "ready_timeout_seconds": 30})

    with pytest.raises(AppDown) as raised:
        wait_until_ready(aws.ec2, aws.ssm, quick, instance, ready_ttl_minutes=60)

    assert "has been restarting (exit code 1, restarted 4 times)" in str(raised.value)
    assert app_down("running 0 4") == "restarting (restarted 4 times)"
    assert app_down("running 0 4", "137") == "restarting (exit code 137, restarted 4 times)"
    assert app_down("exited 2") == "exited (exit code 2)" and app_down("running 0 1") is None


def test_a_container_that_comes_back_up_is_waited_for(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    """Down once (the database was not up yet), then running and listening: ready."""
    scripted_ssm.on(PORT_CHECK, PORT_CLOSED, PORT_CLOSED, PORT_CLOSED, PORT_OPEN)
    scripted_ssm.on(
        APP_STATE,
        Reply(stdout="APP STATE restarting 1\n"),
        Reply(stdout="APP STATE running 0\n"),
    )
    patient = config.model_copy(update={"app_down_seconds": 30.0})

    result = wait_until_ready(aws.ec2, aws.ssm, patient, instance)

    assert result.stages[-1].stage == "app-port"
    assert result.stages[-1].polls == 4


def test_the_overall_ready_timeout_bounds_every_stage(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.on(BOOTSTRAP_CHECK, BOOTSTRAP_PENDING)
    impatient = config.model_copy(update={"ready_timeout_seconds": SHORT})

    with pytest.raises(ReadyTimeout) as raised:
        wait_until_ready(aws.ec2, aws.ssm, impatient, instance)

    assert raised.value.stage == "bootstrap"
    assert raised.value.timeout_seconds <= SHORT


def test_port_check_gives_bash_the_host_and_port_as_arguments() -> None:
    script = "\n".join(port_check(8000, host="x$(reboot)"))

    assert """timeout 3 bash -c 'echo > "/dev/tcp/$1/$2"' tcp-check 'x$(reboot)' 8000""" in script
    assert "/dev/tcp/x" not in script


def test_the_runs_budget_ends_the_wait_without_a_task_timeout(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    """Called as a plain function (no Prefect task, so no task timeout): the run's budget, not
    wait-ready's own 30 s, ends a bootstrap that never finishes — and says it was the budget."""
    scripted_ssm.on(BOOTSTRAP_CHECK, BOOTSTRAP_PENDING)
    patient = config.model_copy(update={"ready_timeout_seconds": 30.0})
    started = time.monotonic()

    with run_budget(1.0), pytest.raises(RunTimedOut, match="1 s budget at step wait-ready"):
        wait_until_ready(aws.ec2, aws.ssm, patient, instance)

    assert time.monotonic() - started < 10
