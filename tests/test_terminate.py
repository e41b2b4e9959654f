from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.app.user_data import LaunchSpec
from tasks.cloud.aws import AwsClients
from tasks.cloud.instances import find_previews, terminate_in_batches, terminate_outdated
from tasks.config import PreviewConfig
from tasks.steps.launch import launch_instance
from tasks.steps.teardown import teardown
from tasks.steps.terminate import NoRoom, capacity_victims, make_room
from tests.fakes.aws_faults import AwsFaults, attach
from tests.support.moto_state import live, state_of, tags

REPO = "octo-org/app"


def launch(aws: AwsClients, config: PreviewConfig, pr: int, sha: str, minutes_ago: int = 0) -> str:
    now = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    return launch_instance(aws.ec2, config, LaunchSpec(REPO, pr, sha), now=now).instance_id


def test_synchronize_replaces_only_the_prs_older_instance(
    aws: AwsClients, config: PreviewConfig
) -> None:
    old = launch(aws, config, 42, "aaaaaaa")
    other = launch(aws, config, 7, "bbbbbbb")
    result = terminate_outdated(aws.ec2, config, REPO, 42, keep_sha="ccccccc")
    new = launch(aws, config, 42, "ccccccc")
    assert result.instance_ids == [old]
    assert state_of(aws, old) == "terminated"
    assert {i["InstanceId"] for i in live(aws)} == {other, new}


def test_capacity_evicts_the_least_recently_updated(aws: AwsClients, config: PreviewConfig) -> None:
    config.max_previews = 2
    oldest = launch(aws, config, 1, "1111111", minutes_ago=30)
    newer = launch(aws, config, 2, "2222222", minutes_ago=10)
    evicted = make_room(aws.ec2, config, REPO, 3)
    assert evicted.instance_ids == [oldest]
    assert state_of(aws, oldest) == "terminated"
    assert state_of(aws, newer) == "running"
    # The PR itself never counts against its own room.
    assert make_room(aws.ec2, config, REPO, 2).instance_ids == []


def test_singleton_evicts_every_other_pr_but_keeps_pinned(
    aws: AwsClients, config: PreviewConfig
) -> None:
    a = launch(aws, config, 1, "1111111", minutes_ago=5)
    pinned = launch(aws, config, 2, "2222222", minutes_ago=50)
    aws.ec2.create_tags(Resources=[pinned], Tags=[{"Key": "pr-preview:keep", "Value": "true"}])
    victims = capacity_victims(find_previews(aws.ec2, config.purpose_tag), REPO, 3, 1)
    assert [v.instance_id for v in victims] == [a]


def test_teardown_leaves_other_prs_and_untagged_instances(
    aws: AwsClients, config: PreviewConfig
) -> None:
    mine = launch(aws, config, 42, "aaaaaaa")
    other_pr = launch(aws, config, 43, "bbbbbbb")
    ami = aws.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    untagged = aws.ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    other_repo = launch_instance(
        aws.ec2, config, LaunchSpec("octo-org/other", 42, "aaaaaaa")
    ).instance_id
    result = teardown(aws.ec2, config, REPO, 42)
    assert result.instance_ids == [mine]
    assert {i["InstanceId"] for i in live(aws)} == {other_pr, untagged, other_repo}


def test_more_than_a_hundred_previews_are_all_found(aws: AwsClients, config: PreviewConfig) -> None:
    ami = aws.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    for pr in range(1, 131):  # one reservation each: moto pages at 100 reservations
        aws.ec2.run_instances(
            ImageId=ami,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [
                        {"Key": "Purpose", "Value": config.purpose_tag},
                        {"Key": "Repo", "Value": REPO},
                        {"Key": "PR", "Value": str(pr)},
                    ],
                }
            ],
        )
    found = find_previews(aws.ec2, config.purpose_tag)
    assert len(found) == 130
    assert {p.pr_number for p in found} == set(range(1, 131))
    removed = teardown(aws.ec2, config, REPO, 77)
    assert len(removed.instance_ids) == 1 and tags(live(aws)[0])["Purpose"]


def test_terminate_in_batches_of_a_thousand_tolerates_the_gone(aws: AwsClients) -> None:
    ami = aws.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ids = [
        i["InstanceId"]
        for i in aws.ec2.run_instances(ImageId=ami, MinCount=1200, MaxCount=1200)["Instances"]
    ]
    gone = "i-0000000000deadbee"
    faults = AwsFaults()
    attach(faults, aws.ec2)
    result = terminate_in_batches(aws.ec2, [*ids, gone])
    assert faults.calls["ec2.TerminateInstances"] == 3  # 1000, then 201 → retry without the gone id
    assert sorted(result.terminated) == sorted(ids)
    assert result.already_gone == [gone]
    assert not live(aws)


def test_a_failed_batch_does_not_stop_the_others(aws: AwsClients) -> None:
    ami = aws.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ids = [
        i["InstanceId"]
        for i in aws.ec2.run_instances(ImageId=ami, MinCount=5, MaxCount=5)["Instances"]
    ]
    faults = AwsFaults()
    faults.fail("ec2.TerminateInstances", "InternalError", status=500, times=1)
    attach(faults, aws.ec2)
    result = terminate_in_batches(aws.ec2, ids, batch_size=2)
    assert sorted(result.failed) == sorted(ids[:2])
    assert sorted(result.terminated) == sorted(ids[2:])
    assert {i["InstanceId"] for i in live(aws)} == set(ids[:2])


def test_an_older_request_does_not_evict_newer_previews(
    aws: AwsClients, config: PreviewConfig
) -> None:
    config.max_previews = 2
    now = datetime.now(UTC).replace(microsecond=0)
    for pr, minutes in ((1, 10), (2, 5)):
        launch_instance(
            aws.ec2,
            config,
            LaunchSpec(REPO, pr, f"{pr}" * 7, requested_at=now - timedelta(minutes=minutes)),
        )
    previews = find_previews(aws.ec2, config.purpose_tag)
    with pytest.raises(NoRoom, match="max_previews=2"):
        capacity_victims(previews, REPO, 3, 2, requested_at=now - timedelta(minutes=20))
    [victim] = capacity_victims(previews, REPO, 3, 2, requested_at=now - timedelta(minutes=7))
    assert victim.pr_number == 1
