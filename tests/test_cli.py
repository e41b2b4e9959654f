"""The operator CLI against moto with scripted SSM output: what it prints and what it leaves."""

from __future__ import annotations

import io
import shlex
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from deployments import cli
from local_stack.account import DemoAccount
from tasks.app.cost import HOURLY_PRICES, PRICE_SOURCE
from tasks.app.user_data import LaunchSpec
from tasks.cloud.aws import AwsClients
from tasks.cloud.tags import TAG_KEEP, TAG_SHUTDOWN_AT, format_time, parse_time
from tasks.cloud.tunnel import tunnel_command
from tasks.config import ENV_PREFIX, PreviewConfig
from tasks.steps.launch import launch_instance
from tests.support import CANARIES, CANARY_DATABASE_URL, CANARY_GHCR_TOKEN, REGION
from tests.support.moto_state import state_of
from tests.support.ssm import PORT_CLOSED, Reply, ScriptedInstances

# One moto and one demo account for the module: every test uses its own repo (or PR number),
# and every command that lists is scoped with --repo, so tests never see each other's instances.
ONE_ACCOUNT_PER_MODULE = True  # see tests/conftest.py: aws, account, config
BUILD_CLIENTS = cli._clients

SHA = "0123abcd4567ef890123abcd4567ef890123abcd"
AWS_V2 = "aws-cli/2.15.30 Python/3.11.8 Linux/6.5.0 exe/x86_64.ubuntu.22 prompt/off"
DB_TCP_OK = Reply(stdout="DB TCP OK 172.31.39.125:5432\n")
DB_CONNECT_OK = Reply(stdout="DB CONNECT OK\n")
PORT_ERROR_CONNECT = (
    "Traceback (most recent call last):\n"
    '  File "<stdin>", line 3, in <module>\n'
    'psycopg2.ProgrammingError: invalid dsn: invalid integer value "pa" for connection'
    ' option "port"\n'
)


@pytest.fixture(autouse=True)
def cli_environment(
    _aws_environment: None, account: DemoAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI reads the account from PR_PREVIEW_* as the flows do; no Prefect API."""
    values: dict[str, Any] = {**account.config_values(), "region": REGION, "poll_seconds": 0.01}
    for name, value in values.items():
        text = ",".join(value) if isinstance(value, list) else str(value)
        monkeypatch.setenv(f"{ENV_PREFIX}{name.upper()}", text)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


@pytest.fixture(autouse=True)
def shared_clients(aws: AwsClients, monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's clients for the CLI: a fresh boto3 session costs ~0.5 s a command. The
    --profile test puts ``build_clients`` back to see the profile reach boto3."""
    monkeypatch.setattr(cli, "_clients", lambda config: aws)


@pytest.fixture(scope="module")
def ami(module_aws: AwsClients) -> str:
    images = module_aws.ec2.describe_images(
        Owners=["amazon"], Filters=[{"Name": "name", "Values": ["al2023-ami-2023*-x86_64"]}]
    )["Images"]
    return str(images[0]["ImageId"])


def launch(
    aws: AwsClients,
    config: PreviewConfig,
    ami: str,
    repo: str,
    pr: int,
    *,
    sha: str = SHA,
    expires_in: timedelta = timedelta(hours=24),
    launched_ago: timedelta = timedelta(0),
) -> str:
    """A preview tagged as the flows tag it, its ``shutdown-at`` ``expires_in`` from now; moto
    gives it a LaunchTime ``launched_ago`` before now."""
    import moto.ec2.models.instances as moto_instances

    launched = (datetime.now(UTC) - launched_ago).replace(tzinfo=None)
    with mock.patch.object(moto_instances, "utcnow", lambda: launched):
        spec = LaunchSpec(repo, pr, sha)
        instance = launch_instance(aws.ec2, config, spec, ami_id=ami).instance_id
    shutdown_at = format_time(datetime.now(UTC) + expires_in)
    aws.ec2.create_tags(Resources=[instance], Tags=[{"Key": TAG_SHUTDOWN_AT, "Value": shutdown_at}])
    return instance


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def fake_tools(directory: Path, *, aws_version: str | None = AWS_V2, plugin: bool = True) -> str:
    """A PATH holding a fake `aws` (printing ``aws_version``) and session-manager-plugin."""

    def script(name: str, body: str) -> None:
        path = directory / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    if aws_version is not None:
        script("aws", f"echo '{aws_version}'")
    if plugin:
        script("session-manager-plugin", "exit 0")
    return str(directory)


# --- tunnel ---------------------------------------------------------------------------------


def test_tunnel_print_gives_the_exact_command_for_the_prs_instance(
    aws: AwsClients,
    config: PreviewConfig,
    ami: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    instance = launch(aws, config, ami, "octo-org/tunnel", 101)
    launch(aws, config, ami, "octo-org/tunnel", 102)

    code, out, err = run(capsys, "tunnel", "101", "--print")

    assert (code, err) == (0, "")
    assert out == tunnel_command(instance, REGION, 8000) + "\n"
    assert out == (
        f"aws ssm start-session --target {instance} --document-name"
        " AWS-StartPortForwardingSession --parameters"
        ' \'{"portNumber":["8000"],"localPortNumber":["8000"]}\''
        f" --region {REGION}\n"
    )

    monkeypatch.setattr(cli, "_clients", BUILD_CLIENTS)
    aws_config = tmp_path / "config"
    aws_config.write_text(f"[profile gym-preview]\nregion = {REGION}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_config))
    code, out, err = run(
        capsys,
        "--region",
        REGION,
        "tunnel",
        "#101",
        "--repo",
        "octo-org/tunnel",
        "--local-port",
        "18000",
        "--profile",
        "gym-preview",
        "--print",
    )

    assert code == 0, err
    assert shlex.split(out) == cli.tunnel_argv(
        instance, REGION, app_port=8000, local_port=18000, profile="gym-preview"
    )
    assert '{"portNumber":["8000"],"localPortNumber":["18000"]}' in shlex.split(out)
    assert out.rstrip().endswith(f"--region {REGION} --profile gym-preview")


def test_tunnel_without_a_preview_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "tunnel", "9999", "--print")

    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("pr-preview: error: no preview for PR #9999 in ap-northeast-1")
    assert "pr-preview list" in err


def test_tunnel_with_several_previews_lists_them_and_suggests_repo(
    aws: AwsClients, config: PreviewConfig, ami: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = launch(aws, config, ami, "octo-org/api", 103)
    second = launch(aws, config, ami, "octo-org/web", 103)

    code, out, err = run(capsys, "tunnel", "103", "--print")

    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith("pr-preview: error: 2 running previews for PR #103:")
    assert f"{first} (octo-org/api, sha 0123abc)" in err and f"{second} (octo-org/web" in err
    assert "pass --repo owner/name" in err

    code, out, _ = run(capsys, "tunnel", "103", "--repo", "octo-org/web", "--print")
    assert code == 0 and f"--target {second} " in out


@pytest.mark.parametrize(
    ("tools", "expected"),
    [
        (
            {"plugin": False},
            "the Session Manager plugin is not installed (no `session-manager-plugin` on PATH):"
            " https://docs.aws.amazon.com/systems-manager/latest/userguide/"
            "session-manager-working-with-install-plugin.html",
        ),
        (
            {"aws_version": None},
            "the AWS CLI v2 is not installed (no `aws` on PATH):"
            " https://docs.aws.amazon.com/cli/latest/userguide/getting-started-install.html",
        ),
        (
            {"aws_version": "aws-cli/1.29.0 Python/3.8.10 Linux/5.15 botocore/1.31.0"},
            "is AWS CLI 1.29.0; port forwarding needs v2: install it —"
            " https://docs.aws.amazon.com/cli/latest/userguide/getting-started-install.html",
        ),
    ],
)
def test_tunnel_checks_the_aws_cli_v2_and_the_plugin_first(
    tools: dict[str, Any],
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PATH", fake_tools(tmp_path, **tools))
    monkeypatch.setattr("os.execv", lambda *a: pytest.fail("must not start a session"))

    code, out, err = run(capsys, "tunnel", "9998")  # no preview: the tools are checked first

    assert (code, out) == (2, "")
    assert err.startswith("pr-preview: error: ") and err.count("\n") == 1
    assert expected in err


def test_tunnel_starts_the_session_with_the_aws_cli_on_path(
    aws: AwsClients,
    config: PreviewConfig,
    ami: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    instance = launch(aws, config, ami, "octo-org/session", 104)
    monkeypatch.setenv("PATH", fake_tools(tmp_path))
    started: list[tuple[str, list[str]]] = []
    monkeypatch.setattr("os.execv", lambda path, argv: started.append((path, argv)))

    code, _, err = run(capsys, "tunnel", "104", "--local-port", "8001")

    assert code == 0
    assert started == [
        (str(tmp_path / "aws"), cli.tunnel_argv(instance, REGION, app_port=8000, local_port=8001))
    ]
    assert "Open http://127.0.0.1:8001/docs" in err


# --- list -----------------------------------------------------------------------------------


LIST_COLUMNS = (
    "PR",
    "REPO",
    "SHA",
    "INSTANCE",
    "STATE",
    "LAUNCHED",
    "LAST ACTIVE",
    "IDLE",
    "EXPIRES IN",
    "COST SO FAR",
    "AT EXPIRY",
    "SAVED ASLEEP",
)


def list_rows(out: str) -> tuple[list[dict[str, str]], list[str]]:
    """The table of ``pr-preview list`` as one dict per row, and the lines after it."""
    table, footer = out.split("\n\n")
    header, *rows = table.splitlines()
    starts = [header.index(name) for name in LIST_COLUMNS]
    assert starts == sorted(starts) and header.split() == " ".join(LIST_COLUMNS).split()
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    cells = [
        {
            name: row[start:end].strip()
            for name, (start, end) in zip(LIST_COLUMNS, bounds, strict=True)
        }
        for row in rows
    ]
    return cells, footer.splitlines()


def expected_costs(aws: AwsClients, instance_id: str, now: datetime) -> tuple[float, float | None]:
    """USD so far and at expiry of ``instance_id`` from what moto holds: its LaunchTime, its
    type and its ``shutdown-at`` tag."""
    [reservation] = aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    instance = reservation["Instances"][0]
    price = HOURLY_PRICES[(REGION, instance["InstanceType"])]
    launched = instance["LaunchTime"]
    tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
    shutdown_at = parse_time(tags.get(TAG_SHUTDOWN_AT))
    so_far = (now - launched).total_seconds() / 3600 * price
    if shutdown_at is None:
        return so_far, None
    return so_far, (max(shutdown_at, now) - launched).total_seconds() / 3600 * price


def usd(amount: float | None) -> str:
    return "-" if amount is None else f"${amount:.2f}"


def test_list_shows_the_previews_sorted_by_pr(
    aws: AwsClients, config: PreviewConfig, ami: str, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = "octo-org/listed"
    twelve = launch(aws, config, ami, repo, 12, sha="feedface" + "0" * 32)
    three = launch(aws, config, ami, repo, 3, expires_in=-timedelta(hours=6))
    gone = launch(aws, config, ami, repo, 7)
    aws.ec2.terminate_instances(InstanceIds=[gone])

    code, out, _ = run(capsys, "list", "--repo", repo)

    assert code == 0
    rows, footer = list_rows(out)
    first, second = ({k: row[k] for k in LIST_COLUMNS[:5]} for row in rows)
    assert list(first.values()) == ["#3", repo, "0123abc", three, "running"]
    assert rows[0]["EXPIRES IN"] in ("expired 6h00m ago", "expired 5h59m ago")
    assert list(second.values()) == ["#12", repo, "feedfac", twelve, "running"]
    assert rows[1]["EXPIRES IN"] in ("23h59m", "1d00h")
    assert gone not in out
    assert footer[0] == f"2 previews in {REGION} (Purpose=pr-preview-singleton, Repo={repo})."

    code, out, _ = run(capsys, "list", "--repo", repo, "--all-states")
    [terminated] = [row for row in list_rows(out)[0] if row["INSTANCE"] == gone]
    assert [terminated[k] for k in LIST_COLUMNS] == [
        "#7",
        repo,
        "0123abc",
        gone,
        "terminated",
        terminated["LAUNCHED"],
        "-",
        "-",
        "-",
        "-",
        "-",
        "-",
    ]

    code, out, _ = run(capsys, "list", "--repo", "octo-org/nothing-here")
    assert (code, out) == (
        0,
        f"No previews in {REGION} (Purpose=pr-preview-singleton, Repo=octo-org/nothing-here).\n",
    )


def test_list_shows_each_previews_cost_and_the_total(
    aws: AwsClients, config: PreviewConfig, ami: str, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = "octo-org/costly"
    hours = timedelta(hours=1)
    fresh = launch(aws, config, ami, repo, 1, launched_ago=5 * hours, expires_in=19 * hours)
    overdue = launch(aws, config, ami, repo, 2, launched_ago=30 * hours, expires_in=-6 * hours)
    undated = launch(aws, config, ami, repo, 3, launched_ago=3 * hours)
    aws.ec2.delete_tags(Resources=[undated], Tags=[{"Key": TAG_SHUTDOWN_AT}])
    stopped = launch(aws, config, ami, repo, 4, launched_ago=hours)
    aws.ec2.stop_instances(InstanceIds=[stopped])

    code, out, _ = run(capsys, "list", "--repo", repo)
    now = datetime.now(UTC)

    assert code == 0
    rows, footer = list_rows(out)
    shown = {row["INSTANCE"]: (row["COST SO FAR"], row["AT EXPIRY"]) for row in rows}
    costs = {i: expected_costs(aws, i, now) for i in (fresh, overdue, undated)}
    expected = {i: (usd(so_far), usd(at_expiry)) for i, (so_far, at_expiry) in costs.items()}
    assert shown == {**expected, stopped: ("-", "-")}
    # 5 h of 24, 30 h past its shutdown-at, 3 h with no end: t3.small in Tokyo at $0.0272/h
    assert expected == {
        fresh: ("$0.14", "$0.65"),
        overdue: ("$0.82", "$0.82"),
        undated: ("$0.08", "-"),
    }
    so_far = usd(sum(cost[0] for cost in costs.values()))
    at_expiry = usd(sum(cost[1] or 0.0 for cost in costs.values()))
    assert (so_far, at_expiry) == ("$1.03", "$1.47")  # of the unrounded costs
    assert footer == [
        f"4 previews in {REGION} (Purpose=pr-preview-singleton, Repo={repo}).",
        f"Total cost so far {so_far} · at expiry {at_expiry} (without the 1 with no shutdown-at).",
        f"Priced as t3.small in {REGION} at $0.0272/h: {PRICE_SOURCE};"
        " price_per_hour overrides it.",
    ]


def test_list_shows_a_sleeping_preview_its_running_cost_and_what_sleeping_saved(
    aws: AwsClients, config: PreviewConfig, ami: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ran 2 h of its 10, asleep the last 8: the instance price for 2 h, the volume's for 8
    (gp3, 8 GiB in Tokyo), against 10 h at the instance price around the clock."""
    repo = "octo-org/sleepy"
    hours = timedelta(hours=1)
    asleep = launch(aws, config, ami, repo, 5, launched_ago=10 * hours, expires_in=14 * hours)
    slept_at = format_time(datetime.now(UTC) - 8 * hours)
    aws.ec2.create_tags(
        Resources=[asleep],
        Tags=[
            {"Key": "sleep-state", "Value": "scheduled"},
            {"Key": "slept-at", "Value": slept_at},
            {"Key": "ran-seconds", "Value": "7200"},
        ],
    )
    aws.ec2.stop_instances(InstanceIds=[asleep])

    code, out, _ = run(capsys, "list", "--repo", repo)

    assert code == 0
    [row], _ = list_rows(out)
    assert row["STATE"] in (
        "stopped: asleep (scheduled) 8h00m",
        "stopped: asleep (scheduled) 7h59m",
    )
    volume = 0.096 * 8 / 730
    so_far = 2 * 0.0272 + 8 * volume
    assert (row["COST SO FAR"], row["SAVED ASLEEP"]) == (usd(so_far), usd(10 * 0.0272 - so_far))
    assert row["AT EXPIRY"] == usd(so_far + 14 * volume)  # asleep until its shutdown-at


def test_list_prices_by_price_per_hour_or_says_the_price_is_unknown(
    aws: AwsClients,
    config: PreviewConfig,
    ami: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = "octo-org/priced"
    launch(aws, config, ami, repo, 1, launched_ago=timedelta(hours=2))

    monkeypatch.setenv(f"{ENV_PREFIX}PRICE_PER_HOUR", "0.5")
    code, out, _ = run(capsys, "list", "--repo", repo)
    assert code == 0
    [row], footer = list_rows(out)
    assert (row["COST SO FAR"], row["AT EXPIRY"]) == ("$1.00", "$13.00")  # 2 h, then 26 h
    assert footer[1:] == [
        "Total cost so far $1.00 · at expiry $13.00.",
        "Priced at $0.5000/h (price_per_hour).",
    ]

    repo = "octo-org/unpriced"
    unpriced = config.model_copy(update={"instance_type": "c7i.large"})
    launch(aws, unpriced, ami, repo, 1, launched_ago=timedelta(hours=2))
    monkeypatch.delenv(f"{ENV_PREFIX}PRICE_PER_HOUR")
    monkeypatch.setenv(f"{ENV_PREFIX}INSTANCE_TYPE", "c7i.large")
    code, out, _ = run(capsys, "list", "--repo", repo)
    assert code == 0
    [row], footer = list_rows(out)
    assert (row["COST SO FAR"], row["AT EXPIRY"]) == ("?", "?")
    assert footer[1:] == [f"Cost unknown: no price for c7i.large in {REGION}; set price_per_hour."]


# --- logs -----------------------------------------------------------------------------------


def test_logs_prints_the_evidence_with_secrets_masked(
    aws: AwsClients,
    config: PreviewConfig,
    ami: str,
    scripted_ssm: ScriptedInstances,
    capsys: pytest.CaptureFixture[str],
) -> None:
    instance = launch(aws, config, ami, "octo-org/logs", 105)
    scripted_ssm.healthy(instance_id=instance)
    scripted_ssm.on(
        r"logs --no-color --tail=200 api",
        Reply(
            stdout="".join(f"api-1  | line {n}\n" for n in range(1, 6))
            + f"api-1  | settings: DATABASE_URL={CANARY_DATABASE_URL}\n"
            + "api-1  | replica: postgresql://reader:NotInParameterStore@db-2:5432/app\n"
        ),
        instance_id=instance,
    )
    scripted_ssm.on(r"tail -n 150", Reply(stdout=f"+ echo {CANARY_GHCR_TOKEN}\n"))

    code, out, err = run(capsys, "logs", "105")

    assert code == 0
    assert f"Collecting runbook §9 evidence from {instance}" in err
    assert (
        "==> compose-logs: docker compose --project-directory /srv/app"
        " -f /srv/app/docker-compose.yml --env-file /srv/app/.env logs"
    ) in out
    assert "==> db-connect: psycopg2 connect inside the app container" in out
    assert "api-1  | line 1" in out and "APP PORT OPEN 8000" in out
    assert "api-1  | settings: DATABASE_URL=****" in out
    assert "api-1  | replica: postgresql://reader:****@db-2:5432/app" in out
    for canary in CANARIES:
        assert canary not in out and canary not in err

    code, out, _ = run(capsys, "logs", "105", "--tail", "2")
    logs = out.split("==> compose-logs")[1].split("==>")[0]
    assert "line 5" not in logs and "settings" in logs and "replica" in logs


def test_logs_shows_the_prs_terminal_escapes_instead_of_obeying_them(
    aws: AwsClients,
    config: PreviewConfig,
    ami: str,
    scripted_ssm: ScriptedInstances,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The app's output is the pull request's code talking: it must not drive the terminal."""
    instance = launch(aws, config, ami, "octo-org/logs", 108)
    scripted_ssm.healthy(instance_id=instance)
    hostile = (
        "api-1  | \x1b]0;owned\x07title \x1b[2Jcleared\n"
        "api-1  | all good\rDATABASE fine\x9b31m \u202eevil\tend\n"
    )
    scripted_ssm.on(r"logs --no-color --tail=200 api", Reply(stdout=hostile), instance_id=instance)

    code, out, _ = run(capsys, "logs", "108")

    assert code == 0
    logs = out.split("==> compose-logs")[1].split("==>")[0]
    assert "api-1  | \\x1b]0;owned\\x07title \\x1b[2Jcleared" in logs
    assert "api-1  | all good\\rDATABASE fine\\x9b31m \\u202eevil\tend" in logs
    assert not any(ch in out for ch in "\x1b\x07\r\x9b\u202e")


# --- doctor ---------------------------------------------------------------------------------


def test_doctor_passes_on_a_healthy_account_and_instance(
    aws: AwsClients,
    config: PreviewConfig,
    ami: str,
    scripted_ssm: ScriptedInstances,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "doctor")

    assert code == 0, out
    assert "Preflight (runbook §2.3) in ap-northeast-1:" in out
    assert "ok    run-instances dry run" in out and "FAIL" not in out
    assert out.rstrip().endswith("All checks passed.")

    instance = launch(aws, config, ami, "octo-org/doctor", 106)
    scripted_ssm.healthy(instance_id=instance)
    scripted_ssm.on(r"DB TCP", DB_TCP_OK, instance_id=instance)
    scripted_ssm.on(r"psycopg2", DB_CONNECT_OK, instance_id=instance)

    code, out, _ = run(capsys, "doctor", "--pr", "106")

    assert code == 0, out
    assert f"On {instance} (octo-org/doctor#106, sha 0123abc), runbook §0:" in out
    for line in (
        "ok    app up      127.0.0.1:8000 accepts connections",
        "ok    DB TCP      DB TCP OK 172.31.39.125:5432",
        "ok    DB connect  psycopg2 connected inside the app container",
    ):
        assert line in out
    assert "Diagnosis" not in out


def test_doctor_fails_with_the_diagnosis_on_a_broken_instance(
    aws: AwsClients,
    config: PreviewConfig,
    ami: str,
    scripted_ssm: ScriptedInstances,
    capsys: pytest.CaptureFixture[str],
) -> None:
    instance = launch(aws, config, ami, "octo-org/broken", 107)
    scripted_ssm.healthy(instance_id=instance)
    scripted_ssm.on(r"APP PORT OPEN", PORT_CLOSED, instance_id=instance)
    scripted_ssm.on(r"DB TCP", DB_TCP_OK, instance_id=instance)
    scripted_ssm.on(r"psycopg2", Reply(stdout=PORT_ERROR_CONNECT), instance_id=instance)

    code, out, err = run(capsys, "doctor", "--pr", "107", "--repo", "octo-org/broken")

    assert code == 1, out + err
    assert "FAIL  app up      APP PORT CLOSED 8000" in out
    assert (
        'FAIL  DB connect  psycopg2.ProgrammingError: invalid dsn: invalid integer value "****"'
        in out
    )
    assert "Diagnosis (runbook §7): DATABASE_URL does not parse" in out
    assert "Fix: URL-encode the password" in out
    assert "Also seen (app-not-listening)" in out
    assert '"pa"' not in out
    assert out.rstrip().endswith("Something is wrong: see the FAIL lines above.")


def test_doctor_fails_when_preflight_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PR_PREVIEW_INSTANCE_PROFILE", "no-such-profile")

    code, out, _ = run(capsys, "doctor")

    assert code == 1
    assert "FAIL  instance profile" in out and "no-such-profile does not exist" in out


# --- cleanup --------------------------------------------------------------------------------


class Terminal(io.StringIO):
    """stdin as a person at a terminal types it."""

    def isatty(self) -> bool:
        return True


def test_cleanup_pr_with_yes_terminates_exactly_that_prs_instances(
    aws: AwsClients, config: PreviewConfig, ami: str, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = "octo-org/cleanup"
    old = launch(aws, config, ami, repo, 20, sha="a" * 40)
    new = launch(aws, config, ami, repo, 20, sha="b" * 40)
    other = launch(aws, config, ami, repo, 21)

    code, out, _ = run(capsys, "cleanup", "--pr", "20", "--repo", repo, "--yes")

    assert code == 0, out
    assert f"terminated {old}" in out and f"terminated {new}" in out
    assert (state_of(aws, old), state_of(aws, new), state_of(aws, other)) == (
        "terminated",
        "terminated",
        "running",
    )
    assert out.rstrip().endswith("Terminated 2, already gone 0.")


def test_cleanup_asks_first_and_no_changes_nothing(
    aws: AwsClients,
    config: PreviewConfig,
    ami: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = "octo-org/asked"
    instance = launch(aws, config, ami, repo, 22)
    second = launch(aws, config, ami, repo, 22, sha="c" * 40)
    monkeypatch.setattr("sys.stdin", Terminal("n\n"))

    code, out, err = run(capsys, "cleanup", "--pr", "22", "--repo", repo)

    assert code == 1
    assert f"terminate  {repo}#22  {instance}  running" in out
    assert f"terminate  {repo}#22  {second}  running" in out
    assert err == "Terminate these 2 instances? [y/N] "
    assert out.rstrip().endswith("Nothing was terminated.")
    assert {state_of(aws, instance), state_of(aws, second)} == {"running"}

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a terminal: refuse, not read
    code, out, err = run(capsys, "cleanup", "--pr", "22", "--repo", repo)

    assert code == 2
    assert err.splitlines()[-1] == (
        "pr-preview: error: refusing to terminate without confirmation: stdin is not a"
        " terminal — rerun with --yes (or --dry-run to only list)"
    )
    assert {state_of(aws, instance), state_of(aws, second)} == {"running"}

    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    code, out, _ = run(capsys, "cleanup", "--pr", "22", "--repo", repo)
    assert code == 0
    assert {state_of(aws, instance), state_of(aws, second)} == {"terminated"}


def test_cleanup_expired_goes_by_shutdown_at_and_keeps_the_keep_tag(
    aws: AwsClients, config: PreviewConfig, ami: str, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = "octo-org/expiry"
    expired = launch(aws, config, ami, repo, 30, expires_in=-timedelta(hours=6))
    fresh = launch(aws, config, ami, repo, 31)
    kept = launch(aws, config, ami, repo, 32, expires_in=-timedelta(hours=6))
    aws.ec2.create_tags(Resources=[kept], Tags=[{"Key": TAG_KEEP, "Value": "true"}])

    code, out, _ = run(capsys, "cleanup", "--expired", "--repo", repo, "--dry-run")

    assert code == 0
    assert f"terminate  {repo}#30  {expired}" in out and "shutdown-at passed 6h" in out
    assert f"keep       {repo}#31  {fresh}" in out
    assert f"keep       {repo}#32  {kept}" in out and "tagged pr-preview:keep=true" in out
    assert "Dry run: would terminate 1 instance; nothing was changed." in out
    assert {state_of(aws, i) for i in (expired, fresh, kept)} == {"running"}

    code, out, _ = run(capsys, "cleanup", "--expired", "--repo", repo, "--yes")

    assert code == 0
    assert [state_of(aws, i) for i in (expired, fresh, kept)] == [
        "terminated",
        "running",
        "running",
    ]

    code, out, _ = run(capsys, "cleanup", "--all", "--repo", repo, "--yes")

    assert code == 0
    assert [state_of(aws, i) for i in (fresh, kept)] == ["terminated", "running"]


def test_cleanup_pr_across_repos_needs_repo(
    aws: AwsClients, config: PreviewConfig, ami: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = launch(aws, config, ami, "octo-org/one", 40)
    second = launch(aws, config, ami, "octo-org/two", 40)

    code, out, err = run(capsys, "cleanup", "--pr", "40", "--yes")

    assert (code, out) == (2, "")
    assert err == (
        "pr-preview: error: PR #40 matches previews of several repos (octo-org/one,"
        " octo-org/two): pass --repo owner/name\n"
    )
    assert {state_of(aws, first), state_of(aws, second)} == {"running"}


# --- receiver, demo, errors -----------------------------------------------------------------


def test_receiver_refuses_to_start_without_a_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    served: list[dict[str, Any]] = []
    monkeypatch.setattr("deployments.receiver.serve", lambda *args, **kwargs: served.append(kwargs))

    code, out, err = run(capsys, "receiver")

    assert (code, out, served) == (2, "", [])
    assert err == (
        "pr-preview: error: no webhook secret: set GITHUB_WEBHOOK_SECRET or --secret-block NAME"
        " (a Prefect Secret block), or pass --insecure-no-signature for a local demo\n"
    )

    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", "s3cret")
    code, _, _ = run(capsys, "receiver", "--port", "8099", "--prefect-api-url", "http://x/api")

    assert code == 0
    assert served == [
        {
            "secret": "s3cret",
            "insecure_no_signature": False,
            "prefect_api_url": "http://x/api",
            "spool_path": Path("~/.local/state/pr-preview/receiver-spool.sqlite3").expanduser(),
        }
    ]
    served.clear()
    monkeypatch.setenv("PR_PREVIEW_RECEIVER_SPOOL", "/tmp/spool.sqlite3")
    assert run(capsys, "receiver", "--prefect-api-url", "http://x/api")[0] == 0
    assert run(capsys, "receiver", "--prefect-api-url", "http://x/api", "--no-spool")[0] == 0
    assert [kwargs["spool_path"] for kwargs in served] == [Path("/tmp/spool.sqlite3"), None]


def test_demo_runs_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str] | None] = []

    def demo_main(argv: list[str] | None = None) -> int:
        calls.append(argv)
        return 0

    monkeypatch.setattr("local_stack.demo.main", demo_main)

    assert cli.main(["demo", "--keep"]) == 0
    assert calls == [["--keep"]]


def test_demo_without_a_checkout_says_where_it_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("local_stack", "local_stack.demo"):  # as after a plain `pip install .`
        monkeypatch.setitem(sys.modules, name, None)

    code, out, err = run(capsys, "demo")

    assert (code, out) == (2, "")
    assert err.startswith(
        "pr-preview: error: the demo runs from a checkout of the repository, with `make demo`"
    )
    assert err.count("\n") == 1 and "Traceback" not in err


def test_errors_are_one_line_and_debug_adds_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PR_PREVIEW_TTL_HOURS", "-1")

    code, out, err = run(capsys, "list")

    assert (code, out) == (2, "")
    assert err == (
        "pr-preview: error: invalid pr-preview configuration: ttl_hours (from"
        " PR_PREVIEW_TTL_HOURS): Input should be greater than 0 — fix the PR_PREVIEW_* variable"
        " or the Prefect Variable pr-preview-config\n"
    )

    code, _, err = run(capsys, "list", "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err

    code, _, err = run(capsys, "tunnel", "abc")
    assert code == 2
    assert err == (
        "pr-preview: error: argument pr: 'abc' is not a pull request number"
        " (see `pr-preview tunnel --help`)\n"
    )


def test_aws_refusals_become_one_actionable_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from botocore.exceptions import ClientError, NoCredentialsError

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ClientError(
            {"Error": {"Code": "UnauthorizedOperation", "Message": "You are not\nauthorized"}},
            "DescribeInstances",
        )

    monkeypatch.setattr("tasks.cloud.instances.find_previews", refuse)
    code, _, err = run(capsys, "list")
    assert code == 2
    assert err == (
        "pr-preview: error: AWS refused DescribeInstances (UnauthorizedOperation): grant it to"
        " your role (runbook §7) — You are not authorized\n"
    )

    def no_credentials(*args: Any, **kwargs: Any) -> Any:
        raise NoCredentialsError()

    monkeypatch.setattr("tasks.cloud.instances.find_previews", no_credentials)
    code, _, err = run(capsys, "list")
    assert err.startswith("pr-preview: error: no AWS credentials found: run `aws sso login`")


def test_help_is_fast_and_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")

    assert code == 0
    for command in ("tunnel", "list", "logs", "doctor", "cleanup", "receiver", "demo"):
        assert command in out


def test_extend_moves_the_expiry_and_the_timer_within_the_bound(
    aws: AwsClients,
    config: PreviewConfig,
    ami: str,
    scripted_ssm: ScriptedInstances,
    capsys: pytest.CaptureFixture[str],
) -> None:
    instance = launch(aws, config, ami, "octo-org/extend", 111, expires_in=timedelta(hours=1))

    def shutdown_at() -> datetime | None:
        [found] = aws.ec2.describe_instances(InstanceIds=[instance])["Reservations"]
        tags = {t["Key"]: t["Value"] for t in found["Instances"][0]["Tags"]}
        return parse_time(tags.get(TAG_SHUTDOWN_AT))

    before = shutdown_at()
    code, out, err = run(capsys, "extend", "111", "999h", "--repo", "octo-org/extend")
    assert code == 2 and "at most" in err and "max_ttl_hours" in err
    assert shutdown_at() == before and scripted_ssm.count(r"shutdown -h", instance) == 0

    code, out, _ = run(capsys, "extend", "111", "8h", "--repo", "octo-org/extend")
    assert code == 0, out
    moved = shutdown_at()
    assert moved is not None
    assert abs((moved - (datetime.now(UTC) + timedelta(hours=8))).total_seconds()) < 120
    assert f"expires at {format_time(moved)}" in out and instance in out
    # The on-instance timer moves with the tag (a tag alone would not stop the instance).
    assert scripted_ssm.count(r"shutdown -h \+4[78][0-9] ", instance) == 1

    # An extend never shortens: 2h when 8h are left keeps the later expiry.
    code, out, _ = run(capsys, "extend", "111", "2h", "--repo", "octo-org/extend")
    assert code == 0, out
    assert shutdown_at() == moved and f"expires at {format_time(moved)}" in out
