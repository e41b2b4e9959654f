"""A preview's name in the VPC (runbook §11, ``dns_zone_id``) on moto's Route 53: published
once the preview is ready, removed by its teardown and by the sweeper once its instance is gone,
and no other record of the zone ever touched."""

from __future__ import annotations

import dataclasses
from typing import Any

import boto3
import pytest

from deployments import cli
from flows.preview import pr_preview
from flows.sweeper import ttl_sweeper
from flows.teardown import pr_teardown
from local_stack.registry import FakeRegistry
from tasks.app.user_data import LaunchSpec
from tasks.cloud.aws import AwsClients
from tasks.cloud.dns import NotAPrivateZone, dns_label, is_ours, record_name
from tasks.cloud.tags import TAG_PINNED
from tasks.config import ConfigError, PreviewConfig, load_config
from tasks.steps.dns import preview_name, publish_name, remove_name, sweep_names
from tasks.steps.launch import launch_instance
from tests.fakes.github import FakeGitHub
from tests.support import CANARY_GHCR_TOKEN, REGION
from tests.support.moto_state import state_of, tags
from tests.support.ssm import ScriptedInstances
from tests.test_keep import pull

REPO = "octo-org/hello-api"
SHA = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
ZONE = "previews.internal."
# Records of the zone that are not ours, whatever their name looks like: never touched.
UNRELATED: list[dict[str, Any]] = [
    {"Name": f"db.{ZONE}", "Type": "A", "TTL": 300, "ResourceRecords": [{"Value": "10.0.9.9"}]},
    {
        "Name": f"pr-notes.{ZONE}",
        "Type": "A",
        "TTL": 300,
        "ResourceRecords": [{"Value": "10.0.9.8"}],
    },
    {
        "Name": f"pr-7.hello-api.octo-org.{ZONE}",
        "Type": "TXT",
        "TTL": 300,
        "ResourceRecords": [{"Value": '"owned by someone else"'}],
    },
]


def _by_name(record: dict[str, Any]) -> tuple[str, str]:
    return record["Name"], record["Type"]


@dataclasses.dataclass
class Zone:
    clients: AwsClients  # the run's clients, with Route 53
    zone_id: str

    @property
    def route53(self) -> Any:
        return self.clients.route53

    def records(self) -> list[dict[str, Any]]:
        """Every record but the zone's own NS and SOA, as Route 53 answers them."""
        found = self.route53.list_resource_record_sets(HostedZoneId=self.zone_id)
        return [r for r in found["ResourceRecordSets"] if r["Type"] not in ("NS", "SOA")]

    def unrelated(self) -> list[dict[str, Any]]:
        """The records that are not ours, as the zone holds them now."""
        names = {(r["Name"], r["Type"]) for r in UNRELATED}
        return sorted((r for r in self.records() if (r["Name"], r["Type"]) in names), key=_by_name)

    def a_records(self) -> dict[str, tuple[str, int]]:
        """Name → (address, TTL) of the zone's A records."""
        return {
            r["Name"]: (r["ResourceRecords"][0]["Value"], r["TTL"])
            for r in self.records()
            if r["Type"] == "A"
        }


def private_zone(aws: AwsClients, name: str = ZONE, *, private: bool = True) -> str:
    route53 = boto3.client("route53", region_name=REGION)
    vpc = aws.ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    extra: dict[str, Any] = {"VPC": {"VPCRegion": REGION, "VPCId": vpc}} if private else {}
    created = route53.create_hosted_zone(
        Name=name,
        CallerReference=name,
        HostedZoneConfig={"PrivateZone": private, "Comment": "previews"},
        **extra,
    )
    zone_id: str = created["HostedZone"]["Id"].rsplit("/", 1)[-1]
    return zone_id


@pytest.fixture
def zone(aws: AwsClients, config: PreviewConfig) -> Zone:
    """A private hosted zone holding records that are not ours; ``dns_zone_id`` names it."""
    zone_id = private_zone(aws)
    config.dns_zone_id = zone_id
    clients = dataclasses.replace(aws, route53=boto3.client("route53", region_name=REGION))
    clients.route53.change_resource_record_sets(  # type: ignore[union-attr]
        HostedZoneId=zone_id,
        ChangeBatch={"Changes": [{"Action": "UPSERT", "ResourceRecordSet": r} for r in UNRELATED]},
    )
    return Zone(clients, zone_id)


def launch(
    aws: AwsClients, config: PreviewConfig, pr: int, repo: str = REPO, sha: str = SHA
) -> str:
    return launch_instance(aws.ec2, config, LaunchSpec(repo, pr, sha)).instance_id


def private_ip(aws: AwsClients, instance_id: str) -> str:
    [reservation] = aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservation["Instances"][0]["PrivateIpAddress"])


# --- the names, pure


def test_a_name_is_the_pull_request_then_the_repository_then_its_owner() -> None:
    assert record_name(REPO, 42, ZONE) == "pr-42.hello-api.octo-org.previews.internal."
    assert record_name("Octo.Org/My_App.v2", 7, "previews.internal") == (
        "pr-7.my-app-v2.octo-org.previews.internal."
    )
    assert dns_label("a" * 100) == "a" * 63
    assert dns_label("--x..y--") == "x-y"
    with pytest.raises(ValueError, match="nothing for a DNS label"):
        dns_label("...")
    assert is_ours("pr-42.hello-api.octo-org.previews.internal.", ZONE)
    assert is_ours("PR-42.Hello-Api.octo-org.previews.internal", ZONE)
    for other in (
        "db.previews.internal.",
        "pr-notes.previews.internal.",
        "pr-x.hello-api.octo-org.previews.internal.",
        "pr-42.hello-api.previews.internal.",
        "pr-42.a.b.c.previews.internal.",
        "pr-42.hello-api.octo-org.elsewhere.internal.",
        "previews.internal.",
    ):
        assert not is_ours(other, ZONE), other


def test_the_zone_id_is_checked_at_load() -> None:
    assert load_config({"dns_zone_id": "Z0123456789ABCDEFGHIJ"}, env={}).dns_zone_id
    for bad in ("/hostedzone/Z01", "z0123", "Z01; rm -rf /", "Z" * 33):
        with pytest.raises(ConfigError, match="dns_zone_id"):
            load_config({"dns_zone_id": bad}, env={})


# --- the steps on moto


def test_a_ready_preview_is_named_and_a_relaunch_moves_the_name(
    aws: AwsClients, config: PreviewConfig, zone: Zone
) -> None:
    first = launch(aws, config, 42)

    name = publish_name(zone.clients, config, REPO, 42, first)

    assert name == "pr-42.hello-api.octo-org.previews.internal"
    expected = f"{name}."
    assert zone.a_records()[expected] == (private_ip(aws, first), 60)
    assert preview_name(zone.clients, config, REPO, 42) == name
    # A relaunch (a new instance, a new address): the same name, UPSERTed.
    second = launch(aws, config, 42, sha="9" * 40)
    assert private_ip(aws, second) != private_ip(aws, first)
    publish_name(zone.clients, config, REPO, 42, second)
    assert zone.a_records()[expected] == (private_ip(aws, second), 60)
    assert [r["Name"] for r in zone.records()].count(expected) == 1
    assert zone.unrelated() == sorted(UNRELATED, key=_by_name)


def test_teardown_removes_the_name_and_nothing_else(
    aws: AwsClients, config: PreviewConfig, zone: Zone
) -> None:
    instance = launch(aws, config, 42)
    other = launch(aws, config, 43)
    publish_name(zone.clients, config, REPO, 42, instance)
    publish_name(zone.clients, config, REPO, 43, other)

    assert remove_name(zone.clients, config, REPO, 42) == (
        "pr-42.hello-api.octo-org.previews.internal"
    )
    assert remove_name(zone.clients, config, REPO, 42) is None  # gone: nothing to remove

    assert set(zone.a_records()) == {
        f"db.{ZONE}",
        f"pr-notes.{ZONE}",
        f"pr-43.hello-api.octo-org.{ZONE}",
    }
    assert zone.unrelated() == sorted(UNRELATED, key=_by_name)
    assert preview_name(zone.clients, config, REPO, 42) is None


def test_the_sweeper_removes_the_names_of_previews_that_are_gone(
    aws: AwsClients, config: PreviewConfig, zone: Zone
) -> None:
    gone, stopped, running = (launch(aws, config, pr) for pr in (1, 2, 3))
    for pr, instance in ((1, gone), (2, stopped), (3, running)):
        publish_name(zone.clients, config, REPO, pr, instance)
    # Another repository's preview whose record someone removed: nothing to sweep for it.
    launch(aws, config, 1, repo="octo-org/other")
    aws.ec2.terminate_instances(InstanceIds=[gone])  # killed by hand, its teardown never ran
    aws.ec2.stop_instances(InstanceIds=[stopped])  # asleep: it keeps its private IP and name
    assert state_of(aws, gone) in ("shutting-down", "terminated")

    would = sweep_names(zone.clients, config, dry_run=True)
    assert would == ["pr-1.hello-api.octo-org.previews.internal"]
    assert f"pr-1.hello-api.octo-org.{ZONE}" in zone.a_records()  # a dry run changes nothing

    assert sweep_names(zone.clients, config) == would
    assert set(zone.a_records()) == {
        f"db.{ZONE}",
        f"pr-notes.{ZONE}",
        f"pr-2.hello-api.octo-org.{ZONE}",
        f"pr-3.hello-api.octo-org.{ZONE}",
    }
    # The TXT record of a preview's shape, with no preview, stays: only A records are ours.
    assert zone.unrelated() == sorted(UNRELATED, key=_by_name)
    assert sweep_names(zone.clients, config) == []


def test_without_a_zone_nothing_is_asked_of_route53(aws: AwsClients, config: PreviewConfig) -> None:
    instance = launch(aws, config, 42)
    assert config.dns_zone_id is None and aws.route53 is None
    assert publish_name(aws, config, REPO, 42, instance) is None
    assert remove_name(aws, config, REPO, 42) is None
    assert preview_name(aws, config, REPO, 42) is None
    assert sweep_names(aws, config) == []


def test_a_public_zone_is_refused(aws: AwsClients, config: PreviewConfig, zone: Zone) -> None:
    config.dns_zone_id = private_zone(aws, "example.com.", private=False)
    instance = launch(aws, config, 42)
    with pytest.raises(NotAPrivateZone, match=r"public zone example\.com\."):
        publish_name(zone.clients, config, REPO, 42, instance)
    held = zone.route53.list_resource_record_sets(HostedZoneId=config.dns_zone_id)
    assert {r["Type"] for r in held["ResourceRecordSets"]} == {"NS", "SOA"}


# --- the flows, on a Prefect server


@pytest.mark.usefixtures("prefect_server")
def test_the_flows_name_a_ready_preview_remove_it_at_teardown_and_sweep_what_is_left(
    aws: AwsClients,
    config: PreviewConfig,
    zone: Zone,
    registry: FakeRegistry,
    scripted_ssm: ScriptedInstances,
    github_api: FakeGitHub,
) -> None:
    github = github_api
    config.image = f"{registry.host}/octo-org/hello-api"
    config.max_previews = 2
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    registry.push("octo-org/hello-api", SHA, private=True)
    scripted_ssm.healthy()
    github.add_pull(REPO, pull(42, "keep", repo=REPO))  # labelled keep before it launched
    github.add_pull(REPO, pull(43, repo=REPO))

    first = pr_preview(REPO, 42, SHA, action="opened", config=config)
    second = pr_preview(REPO, 43, SHA, action="opened", config=config)

    names = {pr: f"pr-{pr}.hello-api.octo-org.previews.internal" for pr in (42, 43)}
    assert (first.status, first.dns_name, second.dns_name) == ("ready", names[42], names[43])
    assert first.instance_id and second.instance_id
    records = zone.a_records()
    assert records[f"{names[42]}."] == (private_ip(aws, first.instance_id), 60)
    assert records[f"{names[43]}."] == (private_ip(aws, second.instance_id), 60)
    [comment] = [b for b in github.comment_bodies(REPO, 42) if b.startswith("<!--")]
    assert f"| Name | `{names[42]}` (inside the VPC) |" in comment
    # The keep label was on before the preview existed: the deploy pinned it.
    assert first.pinned and "never while the `keep` label is on" in comment
    [reservation] = aws.ec2.describe_instances(InstanceIds=[first.instance_id])["Reservations"]
    assert tags(reservation["Instances"][0])[TAG_PINNED] == "true"

    github.pulls[(REPO, 42)]["state"] = "closed"
    assert pr_teardown(REPO, 42, config=config).dns_name == names[42]
    assert set(zone.a_records()) == {f"db.{ZONE}", f"pr-notes.{ZONE}", f"{names[43]}."}

    # PR 43's instance is killed by hand: the sweeper removes its name, and nothing else.
    aws.ec2.terminate_instances(InstanceIds=[second.instance_id])
    report = ttl_sweeper(config=config)
    assert report.removed_names == [names[43]]
    assert set(zone.a_records()) == {f"db.{ZONE}", f"pr-notes.{ZONE}"}
    assert zone.unrelated() == sorted(UNRELATED, key=_by_name)


def test_list_shows_each_previews_name_and_a_pinned_one(
    aws: AwsClients,
    config: PreviewConfig,
    zone: Zone,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the configuration: the environment
    monkeypatch.setattr(cli, "_clients", lambda settings: zone.clients)
    named = launch(aws, config, 42)
    publish_name(zone.clients, config, REPO, 42, named)
    pinned = launch(aws, config, 43)
    aws.ec2.create_tags(Resources=[pinned], Tags=[{"Key": TAG_PINNED, "Value": "true"}])

    assert cli.main(["list", "--repo", REPO]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "NAME"
    [first] = [line for line in lines if line.startswith("#42 ")]
    [second] = [line for line in lines if line.startswith("#43 ")]
    assert first.endswith("pr-42.hello-api.octo-org.previews.internal") and named in first
    assert second.endswith(" -") and "(pinned)" in second
