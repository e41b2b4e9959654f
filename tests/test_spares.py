"""Warm spares (issue 15): launched and bootstrapped ahead, claimed once by a new PR under the
fleet lock, replenished and rotated by pr-spares, bounded by the sweeper, never capacity.

The flows run for real on a Prefect test server, AWS is moto, the instances are scripted
(what a shell cannot give here: a spare's Docker that stops answering).
"""

from __future__ import annotations

import fnmatch
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

import flows.preview
from flows.preview import PreviewResult, pr_preview
from flows.sleep import pr_sleep, pr_wake
from flows.spares import pr_spares
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import Reply, ScriptedInstances
from tasks.app.user_data import LaunchSpec
from tasks.cloud.aws import AwsClients
from tasks.cloud.run_instances import resolve_ami
from tasks.cloud.tags import TAG_PR, TAG_REPO, TAG_SHUTDOWN_AT, TAG_SPARE, parse_time
from tasks.config import PreviewConfig
from tasks.run.events import instance_event
from tasks.steps.spares import CLAIMED, SPARE, claim_spare, find_spares, replenish_spares
from tasks.steps.sweep import sweep
from tests.support import CANARIES, CANARY_GHCR_TOKEN
from tests.support.moto_state import live, ssm_commands, state_of, tags, user_data
from tests.support.moving_tags import moving_tags
from tests.support.run_record import record

pytestmark = pytest.mark.usefixtures("prefect_server")

PROJECT = Path(__file__).resolve().parents[1]
REPO = "octo-org/app"
SHA = "5" * 40
SPARE_CHECK = r"echo spare-ready"
SLACK = timedelta(minutes=5)


@pytest.fixture(autouse=True)
def world(config: PreviewConfig, registry: FakeRegistry, scripted_ssm: ScriptedInstances) -> None:
    config.image = f"{registry.host}/octo-org/app"
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    registry.push("octo-org/app", SHA, private=True)
    scripted_ssm.healthy()
    scripted_ssm.on(SPARE_CHECK, Reply(stdout="spare-ready\n"))


def current_ami(aws: AwsClients, config: PreviewConfig) -> str:
    return str(resolve_ami(aws.ec2, config)["ImageId"])


def make_spares(aws: AwsClients, config: PreviewConfig, count: int) -> list[str]:
    config.warm_spares = count
    made = replenish_spares(
        aws.ec2, config, ami_id=current_ami(aws, config), subnet_id=config.subnet_id
    )
    return made.launched


def live_by_id(aws: AwsClients) -> dict[str, dict[str, str]]:
    return {instance["InstanceId"]: tags(instance) for instance in live(aws)}


def test_ten_prs_opened_at_once_claim_each_of_two_spares_exactly_once(
    aws: AwsClients, config: PreviewConfig
) -> None:
    spares = make_spares(aws, config, 2)
    config.max_previews = 20

    def open_pr(number: int) -> PreviewResult:
        state = pr_preview(REPO, number, SHA, action="opened", config=config, return_state=True)
        result = state.result()
        assert isinstance(result, PreviewResult)
        return result

    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(open_pr, range(100, 110)))

    assert {result.status for result in results} == {"ready"}
    assert Counter(result.path for result in results) == {"spare": 2, "launched": 8}
    claimed = [str(result.instance_id) for result in results if result.path == "spare"]
    assert sorted(claimed) == sorted(spares)  # each spare once, no spare twice
    now = live_by_id(aws)
    by_pr = Counter(tag.get(TAG_PR) for tag in now.values())
    assert by_pr == Counter(str(number) for number in range(100, 110))  # one preview each
    for instance_id in spares:
        assert now[instance_id][TAG_SPARE] == CLAIMED
        assert now[instance_id][TAG_REPO] == REPO
        # Ready: the claimed spare got the full TTL like a launched preview.
        expires = parse_time(now[instance_id][TAG_SHUTDOWN_AT])
        assert expires is not None
        assert expires > datetime.now(UTC) + timedelta(hours=config.ttl_hours) - SLACK


def test_pr_spares_fills_keeps_rotates_on_a_new_ami_and_scales_to_zero(
    aws: AwsClients, config: PreviewConfig
) -> None:
    config.warm_spares = 2
    first = pr_spares(config=config)
    assert len(first.launched) == 2 and not first.rotated
    spares = find_spares(aws.ec2, config)
    assert sorted(spare.instance_id for spare in spares) == sorted(first.launched)
    for spare in spares:
        assert TAG_PR not in spare.tags and TAG_REPO not in spare.tags
        assert spare.tags[TAG_SPARE] == SPARE
        expires = parse_time(spare.tags[TAG_SHUTDOWN_AT])
        assert expires is not None
        assert abs(expires - (spare.launch_time + timedelta(hours=config.spare_ttl_hours))) < SLACK
        script = user_data(aws, spare.instance_id)
        assert "pr-preview spare ready" in script and "compose pull" not in script
        assert not [canary for canary in CANARIES if canary in script]

    again = pr_spares(config=config)
    assert sorted(again.kept) == sorted(first.launched) and not again.launched

    # A new AMI (a bake, or AL2023's next release): every spare of the old one is rotated.
    old_ami = current_ami(aws, config)
    builder = aws.ec2.run_instances(ImageId=old_ami, MinCount=1, MaxCount=1)["Instances"][0]
    new_ami = aws.ec2.create_image(InstanceId=builder["InstanceId"], Name="al2023-next")["ImageId"]
    aws.ec2.terminate_instances(InstanceIds=[builder["InstanceId"]])
    config.ami_id = new_ami
    rotated = pr_spares(config=config)
    assert sorted(rotated.rotated) == sorted(first.launched)
    assert {state_of(aws, iid) for iid in first.launched} <= {"shutting-down", "terminated"}
    assert {spare.image_id for spare in find_spares(aws.ec2, config)} == {new_ami} != {old_ami}
    assert len(find_spares(aws.ec2, config)) == 2

    config.warm_spares = 0
    emptied = pr_spares(config=config)
    assert len(emptied.rotated) == 2 and not find_spares(aws.ec2, config)


def test_a_claimed_spare_pulls_what_the_check_saw_though_the_tag_moves(
    aws: AwsClients, config: PreviewConfig, registry: FakeRegistry
) -> None:
    [spare] = make_spares(aws, config, 1)
    with moving_tags(registry, "octo-org/app") as moving:
        image = config.image = f"{moving.host}/octo-org/app"
        moving.move(SHA)

        claimed = pr_preview(REPO, 11, SHA, action="opened", config=config)

    checked, repointed = moving.moved[SHA]
    assert (claimed.path, claimed.instance_id) == ("spare", spare)
    [deploy] = [text for text in ssm_commands(aws, spare) if "APP_IMAGE=" in text]
    assert f'echo APP_IMAGE={image}:{SHA}@{checked}; }} > "$tmp"' in deploy
    assert repointed not in deploy


def test_a_broken_spare_is_terminated_and_a_booting_one_left_alone(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    broken, booting, unregistered = make_spares(aws, config, 3)
    scripted_ssm.agent_offline(unregistered)
    scripted_ssm.on(
        SPARE_CHECK, Reply(stdout="docker does not answer\n", exit_code=1), instance_id=broken
    )
    scripted_ssm.on(
        SPARE_CHECK, Reply(stdout="bootstrap not done yet\n", exit_code=3), instance_id=booting
    )

    found = claim_spare(
        aws.ec2,
        aws.ssm,
        config,
        LaunchSpec(REPO, 7, SHA),
        ami_id=current_ami(aws, config),
    )

    assert found.instance_id is None
    assert found.terminated == {broken: "docker does not answer"}
    assert found.skipped == {
        booting: "bootstrap not done yet",
        unregistered: "its SSM agent has not registered yet",
    }
    assert state_of(aws, broken) in ("shutting-down", "terminated")
    assert state_of(aws, booting) == "running"
    assert TAG_PR not in live_by_id(aws)[booting]


def test_a_new_pr_with_only_broken_spares_launches_and_tells_the_log(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    [broken] = make_spares(aws, config, 1)
    scripted_ssm.on(
        SPARE_CHECK, Reply(stdout="bootstrap failed\n", exit_code=2), instance_id=broken
    )

    result = pr_preview(REPO, 8, SHA, action="opened", config=config)

    assert result.status == "ready" and result.path == "launched"
    assert result.instance_id != broken
    assert state_of(aws, broken) in ("shutting-down", "terminated")


def test_a_spare_serves_a_new_pr_without_waiting_for_preflight_which_the_log_then_reports(
    aws: AwsClients, config: PreviewConfig
) -> None:
    """Preflight's checks are about launching: a claimed spare does not wait for them. A check
    that fails (here the instance profile) does not stop the claimed preview, and the log says
    the next launch would fail."""
    [spare] = make_spares(aws, config, 1)
    config.instance_profile = "no-such-profile"

    state = pr_preview(REPO, 12, SHA, action="opened", config=config, return_state=True)

    result = state.result()
    assert (result.status, result.path, result.instance_id) == ("ready", "spare", spare)
    assert len(live(aws)) == 1  # nothing launched
    # The run's last log line reaches the API with the log worker's next batch: look again.
    deadline = time.monotonic() + 30
    while not (found := [line for line in record(state)[0] if "launches would fail" in line]):
        assert time.monotonic() < deadline, "no 'launches would fail' in the run's logs"
        time.sleep(0.2)
    [warning] = found
    assert "no-such-profile" in warning


def test_with_no_ami_to_match_no_spare_is_claimed_and_preflight_says_why(
    aws: AwsClients, config: PreviewConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    [spare] = make_spares(aws, config, 1)
    monkeypatch.setenv("MOTO_ENABLE_AMI_VALIDATION", "true")
    config.ami_id = "ami-0123456789abcdef0"

    state = pr_preview(REPO, 13, SHA, action="opened", config=config, return_state=True)

    assert state.is_failed()
    assert "ami-0123456789abcdef0 does not exist" in str(state.message)
    assert TAG_PR not in live_by_id(aws)[spare]  # still a spare
    assert list(live_by_id(aws)) == [spare]


def test_spares_are_never_counted_against_max_previews(
    aws: AwsClients, config: PreviewConfig
) -> None:
    spares = make_spares(aws, config, 2)
    config.warm_spares = 0  # this run does not claim: the spares are only bystanders
    config.max_previews = 1

    result = pr_preview(REPO, 9, SHA, action="opened", config=config)

    assert result.status == "ready" and result.path == "launched"
    assert not result.replaced
    assert set(spares) <= set(live_by_id(aws))


def test_the_sweeper_bounds_spares_by_their_own_ttl(aws: AwsClients, config: PreviewConfig) -> None:
    spares = make_spares(aws, config, 2)
    now = datetime.now(UTC)

    before = sweep(aws.ec2, config, now=now, dry_run=True)
    after = sweep(
        aws.ec2, config, now=now + timedelta(hours=config.spare_ttl_hours, minutes=1), dry_run=True
    )

    assert not [d for d in before.decisions if d.action == "terminate"]
    assert sorted(d.instance_id for d in after.decisions if d.action == "terminate") == sorted(
        spares
    )


class Killed(BaseException):
    """The run's process died here."""


def test_a_run_killed_between_claim_and_ready_leaves_the_spare_on_the_short_ttl(
    aws: AwsClients, config: PreviewConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    [spare] = make_spares(aws, config, 1)

    def killed(*args: object, **kwargs: object) -> None:
        raise Killed("after the claim")

    deploy = flows.preview.update_in_place
    monkeypatch.setattr(flows.preview, "update_in_place", killed)
    with pytest.raises(Killed):
        pr_preview(REPO, 11, SHA, action="opened", config=config)
    monkeypatch.setattr(flows.preview, "update_in_place", deploy)

    left = live_by_id(aws)[spare]
    assert left[TAG_PR] == "11" and left[TAG_SPARE] == CLAIMED
    expires = parse_time(left[TAG_SHUTDOWN_AT])
    assert expires is not None
    assert expires <= datetime.now(UTC) + timedelta(hours=config.failure_ttl_hours) + SLACK
    # The next run for the PR converges on one ready preview at the sha.
    again = pr_preview(REPO, 11, SHA, action="synchronize", config=config)
    assert again.status == "ready"
    assert [tag[TAG_PR] for tag in live_by_id(aws).values() if tag.get(TAG_PR)] == ["11"]


def test_a_claim_starts_pr_spares_through_its_trigger_in_prefect_yaml() -> None:
    """The deployment exists as prefect deploy reads it, and its trigger matches the event
    the claim emits (name and resource), so a claimed spare is replaced."""
    from prefect.cli.deploy._models import PrefectYamlModel

    document = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(document)
    [deployment] = [d for d in model.deployments if d.name == "pr-spares"]
    assert deployment.entrypoint == "flows/spares.py:pr_spares" and pr_spares.name == "pr-spares"
    [raw] = [d for d in document["deployments"] if d["name"] == "pr-spares"]
    [trigger] = raw["triggers"]
    claimed = instance_event("spare.claimed", "i-0123456789abcdef0", REPO, 7)
    assert trigger["expect"] == [claimed["event"]]
    pattern = trigger["match"]["prefect.resource.id"]
    assert fnmatch.fnmatchcase(claimed["resource"]["prefect.resource.id"], pattern)
    assert [s["cron"] for s in raw["schedules"]] == ["*/30 * * * *"]


def test_spares_sleep_with_the_schedule_count_while_asleep_and_a_claim_at_night_starts_one(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    make_spares(aws, config, 2)
    first, second = (spare.instance_id for spare in find_spares(aws.ec2, config))  # oldest first

    # The night: both stopped with the previews, asleep for the schedule.
    night = pr_sleep(config=config)
    assert sorted(night.spares) == sorted([first, second])
    assert {state_of(aws, i) for i in (first, second)} == {"stopped"}
    assert live_by_id(aws)[first]["sleep-state"] == "scheduled"
    # Asleep, they still count: pr-spares launches no running replacement at night.
    kept = replenish_spares(aws.ec2, config, ami_id=current_ami(aws, config), subnet_id=None)
    assert (kept.launched, sorted(kept.kept)) == ([], sorted([first, second]))
    # A claim that cannot start a spare never takes a stopped one.
    spec, ami = LaunchSpec(REPO, 14, SHA), current_ami(aws, config)
    passed = claim_spare(aws.ec2, aws.ssm, config, spec, ami_id=ami)
    assert passed.instance_id is None
    assert set(passed.skipped.values()) == {"asleep, and this claim cannot wake it"}

    # A PR opened at night: the oldest spare is started (timer re-armed), checked, claimed.
    result = pr_preview(REPO, 14, SHA, action="opened", config=config)
    assert (result.status, result.path, result.instance_id) == ("ready", "spare", first)
    assert state_of(aws, first) == "running"
    assert "sleep-state" not in live_by_id(aws)[first]
    rearm = scripted_ssm.commands(first, r"shutdown -h")[0]
    check = scripted_ssm.commands(first, SPARE_CHECK)[-1]
    assert scripted_ssm.commands(first).index(rearm) < scripted_ssm.commands(first).index(check)
    assert state_of(aws, second) == "stopped"

    # The morning: the other spare is started again by the wake.
    morning = pr_wake(config=config)
    assert morning.spares == [second] and not morning.failed
    assert state_of(aws, second) == "running"
    assert "sleep-state" not in live_by_id(aws)[second]
