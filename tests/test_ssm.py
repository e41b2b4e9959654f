"""The SSM command runner against moto, with the scripted instance deciding what it prints."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from tasks.cloud.aws import AwsClients
from tasks.cloud.ssm import CommandTimeout, run_command
from tests.support.ssm import Reply, ScriptedInstances, plain_instances

ONE_ACCOUNT_PER_MODULE = True  # see tests/conftest.py: aws, account, config


def launch(aws: AwsClients, count: int = 1) -> list[str]:
    return plain_instances(aws.ec2, count)


def test_result_carries_exit_code_and_output(aws: AwsClients, scripted_ssm: ScriptedInstances):
    (instance,) = launch(aws)
    scripted_ssm.on(r"uname", Reply(stdout="Linux\n", stderr="warn\n", exit_code=3))

    result = run_command(aws.ssm, instance, ["uname -s"], timeout_seconds=5, poll_seconds=0.01)

    assert (result.status, result.exit_code, result.stdout, result.stderr) == (
        "Failed",
        3,
        "Linux\n",
        "warn\n",
    )
    assert not result.ok
    assert result.instance_id == instance
    assert scripted_ssm.commands(instance) == ["uname -s"]


def test_reads_its_own_instance_when_moto_runs_the_command_everywhere(
    aws: AwsClients, scripted_ssm: ScriptedInstances
):
    first, second = launch(aws, 2)
    scripted_ssm.on(r"hostname", Reply(stdout="first\n"), instance_id=first)
    scripted_ssm.on(r"hostname", Reply(stdout="second\n"), instance_id=second)

    result = run_command(aws.ssm, second, ["hostname"], timeout_seconds=5, poll_seconds=0.01)

    assert result.stdout == "second\n"
    # Only the addressed instance consumed a rule, though moto stored an invocation for both.
    assert scripted_ssm.commands(first) == []


def test_invocation_missing_then_in_progress_is_waited_out(
    aws: AwsClients, scripted_ssm: ScriptedInstances
):
    (instance,) = launch(aws)
    scripted_ssm.on(r"sleep", Reply(stdout="done\n", missing_reads=2, pending_reads=3))

    result = run_command(aws.ssm, instance, ["sleep 1"], timeout_seconds=5, poll_seconds=0.01)

    assert result.ok and result.stdout == "done\n"


def test_invocation_missing_beyond_the_grace_is_an_error(
    aws: AwsClients, scripted_ssm: ScriptedInstances
):
    (instance,) = launch(aws)
    scripted_ssm.on(r"lost", Reply(missing_reads=1000))

    with pytest.raises(ClientError) as raised:
        run_command(
            aws.ssm,
            instance,
            ["lost"],
            timeout_seconds=5,
            poll_seconds=0.01,
            not_found_grace_seconds=0.05,
        )
    assert raised.value.response["Error"]["Code"] == "InvocationDoesNotExist"


def test_a_command_that_never_finishes_times_out(aws: AwsClients, scripted_ssm: ScriptedInstances):
    (instance,) = launch(aws)
    scripted_ssm.on(r"hang", Reply(pending_reads=-1))

    with pytest.raises(CommandTimeout) as raised:
        run_command(aws.ssm, instance, ["hang"], timeout_seconds=0.1, poll_seconds=0.01)
    assert raised.value.last_status == "InProgress"
    assert raised.value.instance_id == instance


def test_unscripted_commands_answer_like_moto(aws: AwsClients, scripted_ssm: ScriptedInstances):
    (instance,) = launch(aws)

    result = run_command(aws.ssm, instance, ["true"], timeout_seconds=5, poll_seconds=0.01)

    assert result.ok and result.stdout == ""


def test_sends_run_shell_script_with_the_execution_timeout(aws: AwsClients):
    (instance,) = launch(aws)

    result = run_command(
        aws.ssm, instance, ["true"], timeout_seconds=12.5, poll_seconds=0.01, comment="x" * 300
    )

    command = aws.ssm.list_commands(CommandId=result.command_id)["Commands"][0]
    assert command["DocumentName"] == "AWS-RunShellScript"
    assert command["Parameters"] == {"commands": ["true"], "executionTimeout": ["13"]}
    assert len(command["Comment"]) == 100
