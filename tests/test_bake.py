"""The baked AMI (issue 15): the pr-preview-bake flow, launching from its images, and pruning them.

On moto the builder is scripted: its bake check answers as the user data's marker would, and when
it has "sealed" it powers off as ``InstanceInitiatedShutdownBehavior=stop`` makes it do (stopped,
in moto's backend). On the local instance runtime the real bake user data runs in bash, logs in
with the canary token from Parameter Store, pulls for real, seals and powers off; its writable
directories are then searched for every canary and every trace of the instance.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends
from moto.ec2.models.amis import AmiBackend
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.bake import pr_preview_bake
from local_stack.instance.runtime import InstanceRuntime
from local_stack.instance.sandbox import hostname_of
from local_stack.instance.world import push_sample_app
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import Call, Reply, Responder, ScriptedInstances
from tasks.app.user_data import LaunchSpec
from tasks.cloud.aws import AwsClients
from tasks.cloud.run_instances import resolve_ami, resolve_stock_ami
from tasks.cloud.tags import TAG_CREATED_AT, TAG_PURPOSE, TAG_SOURCE_AMI, parse_time
from tasks.config import PreviewConfig
from tasks.steps.bake import (
    BAKE_CHECK,
    BAKE_DIR,
    BUILDER_NAME,
    bake_image_ref,
    baked_image_tags,
    image_name,
    launch_builder_instance,
    plan_prune,
    preview_install_steps,
    prune_images,
    read_bake_failure,
    render_bake_user_data,
)
from tasks.steps.launch import launch_instance
from tests.fakes.aws_faults import aws_faults
from tests.support import CANARIES, CANARY_DATABASE_URL, CANARY_GHCR_TOKEN, REGION
from tests.support.moto_state import instances, state_of, tags, user_data
from tests.test_instance_runtime import result, send

PROJECT = Path(__file__).resolve().parents[1]
SPEC = LaunchSpec("octo-org/app", 42, "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d")
CHECK = r"echo bake-pending"
# What the flow is given in these tests: moto answers at once.
TIMEOUTS = {"bake_timeout_seconds": 10.0, "image_timeout_seconds": 10.0}


# --- moto, as AWS does it -------------------------------------------------------------------


@contextmanager
def snapshot_tags_in_moto() -> Iterator[None]:
    """CreateImage's TagSpecifications for ``snapshot``, as AWS applies them.

    moto 5.2.5 raises NotImplementedError for them; AWS tags every snapshot the image is made of.
    This passes the image's tags through and puts the snapshot's on moto's snapshot.
    """
    original = AmiBackend.create_image

    def create_image(
        backend: Any,
        instance_id: str,
        name: str,
        description: str,
        tag_specifications: list[dict[str, Any]],
    ) -> Any:
        snapshot_tags = [
            tag
            for spec in tag_specifications
            if spec["ResourceType"] == "snapshot"
            for tag in spec["Tags"]
        ]
        others = [spec for spec in tag_specifications if spec["ResourceType"] != "snapshot"]
        ami = original(backend, instance_id, name, description, others)
        for tag in snapshot_tags:
            ami.ebs_snapshot.add_tag(tag["Key"], tag["Value"])
        return ami

    AmiBackend.create_image = create_image
    try:
        yield
    finally:
        AmiBackend.create_image = original


@pytest.fixture(autouse=True)
def _snapshot_tags() -> Iterator[None]:
    with snapshot_tags_in_moto():
        yield


def moto_ec2() -> Any:
    return ec2_backends[DEFAULT_ACCOUNT_ID][REGION]


def power_off(instance_id: str) -> None:
    """The builder's own ``shutdown -h now`` with InstanceInitiatedShutdownBehavior=stop."""
    moto_ec2().stop_instances([instance_id])


def seals_after(checks: int) -> Responder:
    """A builder whose user data has sealed it by its ``checks``-th check: it powers off."""

    def respond(call: Call) -> Reply:
        if call.nth + 1 >= checks:
            power_off(call.instance_id)
        return Reply(stdout="bake-pending\n")

    return respond


def seed_baked_image(aws: AwsClients, config: PreviewConfig, created: datetime) -> str:
    """An image as an earlier bake left it (tags on image and snapshot, EC2's CreationDate)."""
    stock = resolve_stock_ami(aws.ec2, config)["ImageId"]
    instance = aws.ec2.run_instances(
        ImageId=stock, MinCount=1, MaxCount=1, UserData="#!/bin/bash\ntrue\n"
    )["Instances"][0]
    name = image_name(created)
    tag_list = [
        {"Key": key, "Value": value}
        for key, value in baked_image_tags(config, stock, name, created).items()
    ]
    image_id: str = aws.ec2.create_image(
        InstanceId=instance["InstanceId"],
        Name=name,
        TagSpecifications=[
            {"ResourceType": "image", "Tags": tag_list},
            {"ResourceType": "snapshot", "Tags": tag_list},
        ],
    )["ImageId"]
    moto_ec2().amis[image_id].creation_date = created
    aws.ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
    return image_id


def images(aws: AwsClients, config: PreviewConfig) -> dict[str, dict[str, Any]]:
    found = aws.ec2.describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{TAG_PURPOSE}", "Values": [config.purpose_tag]}]
    )["Images"]
    return {image["ImageId"]: dict(image) for image in found}


def snapshot_of(image: dict[str, Any]) -> str:
    [mapping] = image["BlockDeviceMappings"]
    return str(mapping["Ebs"]["SnapshotId"])


def snapshot_exists(aws: AwsClients, snapshot_id: str) -> bool:
    owned = aws.ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    return snapshot_id in {snapshot["SnapshotId"] for snapshot in owned}


def builders(aws: AwsClients) -> list[dict[str, Any]]:
    return [i for i in instances(aws) if tags(i).get("Name") == BUILDER_NAME]


@pytest.fixture
def no_heartbeat() -> Iterator[None]:
    """No heartbeat thread: joining it costs up to 1 s per run (as in test_fault_matrix)."""
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


# --- the flow on moto ----------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_server", "no_heartbeat")
def test_a_bake_makes_a_tagged_available_image_and_terminates_its_builder(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    stock = resolve_stock_ami(aws.ec2, config)["ImageId"]
    scripted_ssm.respond(CHECK, seals_after(2))

    started = time.monotonic()
    baked = pr_preview_bake(config=config, **TIMEOUTS)
    seconds = time.monotonic() - started

    image = images(aws, config)[baked.image_id]
    assert image["State"] == "available"
    created = parse_time(tags(image)[TAG_CREATED_AT])
    assert created is not None and abs(datetime.now(UTC) - created) < timedelta(minutes=1)
    assert tags(image) == {
        "Purpose": config.purpose_tag,
        "Name": baked.image_name,
        TAG_SOURCE_AMI: stock,
        TAG_CREATED_AT: tags(image)[TAG_CREATED_AT],
    }
    assert baked.image_name.startswith("pr-preview-baked-") and image["Name"] == baked.image_name
    [snapshot] = aws.ec2.describe_snapshots(SnapshotIds=[snapshot_of(image)])["Snapshots"]
    assert tags(dict(snapshot)) == tags(image)  # DeleteSnapshot's IAM condition needs Purpose

    [builder] = builders(aws)
    assert builder["InstanceId"] == baked.builder_id and builder["ImageId"] == stock
    assert state_of(aws, baked.builder_id) == "terminated"
    assert scripted_ssm.count(CHECK, baked.builder_id) == 2  # polled until it powered off
    shutdown_at = parse_time(tags(builder)["shutdown-at"])
    assert shutdown_at is not None and shutdown_at - datetime.now(UTC) < timedelta(hours=2)
    assert tags(builder)["Purpose"] == config.purpose_tag
    behaviour = aws.ec2.describe_instance_attribute(
        InstanceId=baked.builder_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"
    assert builder["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    script = user_data(aws, baked.builder_id)
    assert not [canary for canary in CANARIES if canary in script]
    assert "--with-decryption --name" in script
    assert f"GHCR_TOKEN=$(param {config.ghcr_token_parameter})" in script
    assert "PULL_DIR=/var/tmp/pr-preview-bake\n" in script
    assert 'docker compose -f "$PULL_DIR/docker-compose.yml" pull' in script
    assert "'services:\n  app:\n    image: ghcr.io/octo-org/app:latest'" in script
    print(f"bake on moto: {seconds:.2f} s (flow run, scripted builder)")


@pytest.mark.usefixtures("prefect_server", "no_heartbeat")
def test_a_bake_deregisters_images_beyond_the_newest_kept_with_their_snapshots(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    now = datetime.now(UTC)
    oldest, older, old = (seed_baked_image(aws, config, now - timedelta(days=d)) for d in (9, 8, 7))
    seeded = images(aws, config)
    scripted_ssm.respond(CHECK, seals_after(1))
    kept = config.model_copy(update={"baked_images_kept": 3})  # the default keeps 2

    baked = pr_preview_bake(config=kept, **TIMEOUTS)

    assert set(images(aws, config)) == {older, old, baked.image_id}
    assert baked.deregistered == [oldest]
    assert baked.deleted_snapshots == [snapshot_of(seeded[oldest])]
    assert not snapshot_exists(aws, snapshot_of(seeded[oldest]))
    assert all(snapshot_exists(aws, snapshot_of(seeded[i])) for i in (older, old))


def test_prune_keeps_the_newest_available_and_never_touches_other_images(
    aws: AwsClients, config: PreviewConfig
) -> None:
    now = datetime.now(UTC)
    ids = [seed_baked_image(aws, config, now - timedelta(days=d)) for d in (4, 3, 2, 1)]
    seeded = images(aws, config)
    # Not ours: an image of this account without our Purpose tag.
    stock = resolve_stock_ami(aws.ec2, config)["ImageId"]
    other = aws.ec2.run_instances(ImageId=stock, MinCount=1, MaxCount=1)["Instances"][0]
    foreign = aws.ec2.create_image(InstanceId=other["InstanceId"], Name="someone-elses")["ImageId"]

    pruned = prune_images(aws.ec2, config)  # baked_images_kept: 2 by default

    assert config.baked_images_kept == 2
    assert pruned.images == ids[:2] and not pruned.failed
    assert set(images(aws, config)) == set(ids[2:])
    assert [snapshot_exists(aws, snapshot_of(seeded[i])) for i in ids] == [False, False, True, True]
    assert aws.ec2.describe_images(ImageIds=[foreign])["Images"]
    assert prune_images(aws.ec2, config).images == []  # nothing more to do


def test_plan_prune_removes_failed_images_and_keeps_the_newest_available() -> None:
    def image(image_id: str, state: str) -> Any:
        return {"ImageId": image_id, "State": state}

    oldest_first = [image("a", "available"), image("b", "failed"), image("c", "available")]
    oldest_first += [image("d", "available"), image("e", "failed")]

    assert [i["ImageId"] for i in plan_prune(oldest_first, 2)] == ["a", "b", "e"]
    assert [i["ImageId"] for i in plan_prune(oldest_first, 5)] == ["b", "e"]
    assert [i["ImageId"] for i in plan_prune(oldest_first[:1], 1)] == []


@pytest.mark.usefixtures("prefect_server", "no_heartbeat")
def test_a_throttled_create_image_fails_the_bake_and_terminates_the_builder(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    scripted_ssm.respond(CHECK, seals_after(1))

    with aws_faults() as faults:
        faults.fail("ec2.CreateImage", "RequestLimitExceeded")
        state = pr_preview_bake(config=config, return_state=True, **TIMEOUTS)

    assert state.is_failed()
    assert faults.injected["ec2.CreateImage"] == config.task_retries + 1  # transient: retried
    assert images(aws, config) == {}
    [builder] = builders(aws)
    assert state_of(aws, builder["InstanceId"]) == "terminated"


@pytest.mark.usefixtures("prefect_server", "no_heartbeat")
def test_an_image_that_fails_is_removed_with_its_snapshot_and_the_builder_terminated(
    aws: AwsClients,
    config: PreviewConfig,
    scripted_ssm: ScriptedInstances,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripted_ssm.respond(CHECK, seals_after(1))
    made: list[Any] = []
    create_image = AmiBackend.create_image

    def failing(backend: Any, *args: Any, **kwargs: Any) -> Any:
        ami = create_image(backend, *args, **kwargs)
        ami.state = "failed"  # what EC2 says of an image whose snapshot could not be made
        made.append(ami)
        return ami

    monkeypatch.setattr(AmiBackend, "create_image", failing)

    state = pr_preview_bake(config=config, return_state=True, **TIMEOUTS)

    assert state.is_failed() and f"image {made[0].id} failed" in str(state.message)
    assert images(aws, config) == {}
    assert not snapshot_exists(aws, made[0].ebs_snapshot.id)
    [builder] = builders(aws)
    assert state_of(aws, builder["InstanceId"]) == "terminated"


@pytest.mark.usefixtures("prefect_server", "no_heartbeat")
def test_a_bake_that_fails_on_the_builder_says_where_masks_secrets_and_terminates_it(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    evidence = (
        "bake-failed\nbake failed at step: ghcr-login\n"
        f"Error response from daemon: login attempt with {CANARY_GHCR_TOKEN} denied\n"
    )
    scripted_ssm.on(CHECK, Reply(stdout="bake-pending\n"), Reply(stdout=evidence))

    state = pr_preview_bake(config=config, return_state=True, **TIMEOUTS)

    assert state.is_failed()
    assert "bake failed at step: ghcr-login" in str(state.message)
    assert CANARY_GHCR_TOKEN not in str(state.message)
    [builder] = builders(aws)
    assert state_of(aws, builder["InstanceId"]) == "terminated"
    assert images(aws, config) == {}


@pytest.mark.usefixtures("prefect_server", "no_heartbeat")
def test_a_builder_that_never_powers_off_is_terminated_at_the_bake_timeout(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    scripted_ssm.on(CHECK, Reply(stdout="bake-pending\n"))

    state = pr_preview_bake(
        config=config, bake_timeout_seconds=0.3, image_timeout_seconds=1, return_state=True
    )

    assert state.is_failed() and "did not seal itself and power off within 0.3s" in str(
        state.message
    )
    [builder] = builders(aws)
    assert state_of(aws, builder["InstanceId"]) == "terminated"
    assert images(aws, config) == {}


# --- launching from a baked image -----------------------------------------------------------


def test_launch_from_baked_picks_the_newest_image(aws: AwsClients, config: PreviewConfig) -> None:
    now = datetime.now(UTC)
    baked = config.model_copy(update={"ami_strategy": "baked"})
    # Made within one second of each other: the created-at tag orders them.
    ids = [seed_baked_image(aws, config, now - timedelta(milliseconds=ms)) for ms in (900, 1, 500)]
    for image_id in ids:
        moto_ec2().amis[image_id].creation_date = now.replace(microsecond=0)

    launched = launch_instance(aws.ec2, baked, SPEC)

    [instance] = [i for i in instances(aws) if i["InstanceId"] == launched.instance_id]
    assert launched.ami_id == instance["ImageId"] == ids[1]
    assert resolve_ami(aws.ec2, config)["ImageId"] == resolve_stock_ami(aws.ec2, config)["ImageId"]


def test_without_a_baked_image_launch_falls_back_to_stock_with_a_warning(
    aws: AwsClients, config: PreviewConfig, caplog: pytest.LogCaptureFixture
) -> None:
    stock = resolve_stock_ami(aws.ec2, config)["ImageId"]
    baked = config.model_copy(update={"ami_strategy": "baked"})

    with caplog.at_level("WARNING", logger="tasks.cloud.run_instances"):
        launched = launch_instance(aws.ec2, baked, SPEC)

    assert launched.ami_id == stock
    [warning] = [r for r in caplog.records if r.name == "tasks.cloud.run_instances"]
    assert warning.levelname == "WARNING"
    assert "no available image tagged Purpose=pr-preview-singleton" in warning.getMessage()
    assert "Run the pr-preview-bake deployment" in warning.getMessage()


# --- what the builder runs, and the deployment ----------------------------------------------


def test_the_builder_installs_with_the_previews_own_lines(config: PreviewConfig) -> None:
    script = render_bake_user_data(config, "ghcr.io/octo-org/app:latest", 1.0)
    steps = preview_install_steps()
    assert steps.startswith("step=docker\n") and steps.endswith("docker compose version\n")
    assert "if ! command -v docker" in steps and "if ! docker compose version" in steps
    rendered = steps.replace("{{compose_url}}", "https://github.com/docker/compose/releases/")
    rendered = rendered.replace("{{docker_daemon_json}}", "/etc/docker/daemon.json")
    rendered = rendered.replace("{{container_address_pool}}", config.container_address_pool)
    assert rendered.split("https://github.com/docker/compose/releases/")[0] in script
    assert "{{" not in script
    assert "seal </dev/null" in script and "shutdown -h now" in script


@pytest.mark.parametrize(
    ("repo", "tag", "image", "message"),
    [
        (None, "latest;touch pwned", "ghcr.io/octo-org/app", "tag must be an image tag"),
        (None, "$(id)", "ghcr.io/octo-org/app", "tag must be an image tag"),
        (None, "latest", None, "set image in the configuration, or pass repo"),
        ("octo-org/app;id", "latest", None, "repo must be 'owner/name'"),
        ("stranger/app", "latest", None, "stranger/app is not in allowed_repos"),
        ("octo-org/my..app", "latest", None, "is not an image repository name"),
    ],
)
def test_what_is_pulled_is_checked_before_it_reaches_the_user_data(
    repo: str | None, tag: str, image: str | None, message: str
) -> None:
    config = PreviewConfig(image=image, allowed_repos=["octo-org/*"])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        bake_image_ref(config, repo, tag)
    assert bake_image_ref(config, "octo-org/App", "v1.2_3") == (
        f"{(image or 'ghcr.io/octo-org/app').lower()}:v1.2_3"
    )


def test_the_bake_deployment_runs_the_flow_weekly_one_at_a_time() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    document = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(document)
    [deployment] = [d for d in model.deployments if d.name == "pr-preview-bake"]
    assert deployment.entrypoint == "flows/bake.py:pr_preview_bake"
    assert pr_preview_bake.name == "pr-preview-bake"
    pr_preview_bake.validate_parameters(deployment.parameters)
    [raw] = [d for d in document["deployments"] if d["name"] == "pr-preview-bake"]
    [schedule] = raw["schedules"]
    assert schedule == {"cron": "0 3 * * 1", "timezone": "UTC", "active": True}
    limit = deployment.concurrency_limit
    assert not isinstance(limit, int) and limit is not None
    assert (limit.limit, limit.collision_strategy) == (1, "CANCEL_NEW")
    assert deployment.work_pool is not None and deployment.work_pool.name == "pr-preview"


# --- the real bake on a local instance -----------------------------------------------------


def canary_forms(username: str) -> list[bytes]:
    """Each canary as text, and the token as docker stores a login (base64 of user:token) or
    as any base64 text holding it would (three alignments)."""
    forms = [canary.encode() for canary in (*CANARIES, CANARY_DATABASE_URL)]
    forms.append(base64.b64encode(f"{username}:{CANARY_GHCR_TOKEN}".encode()))
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + CANARY_GHCR_TOKEN.encode())
        forms.append(encoded[4 if pad else 0 : -4])
    return forms


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file() and not path.is_symlink())


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout:g}s"
        time.sleep(0.1)


def test_the_real_bake_leaves_no_secret_and_no_trace_of_the_instance(
    aws: AwsClients,
    config: PreviewConfig,
    registry: FakeRegistry,
    real_instances: InstanceRuntime,
) -> None:
    """The bake user data and its seal, for real: dnf, systemctl, cloud-init and shutdown are the
    runtime's shims, ``docker login`` and the pull go to a real registry with the canary token
    that the instance reads from Parameter Store, and the flow's own check runs over SSM while
    the bake is under way.

    moto's CreateImage does not snapshot the local sandbox: the image would be made of what this
    instance's writable directories hold once it has powered off, so searching every file there
    for every canary (and for the instance's id and hostname) is the proof that nothing secret
    and nothing of this instance would be imaged. /etc is the host's, read-only, in the sandbox:
    the seal says so instead of emptying machine-id (on AWS it is emptied).
    """
    real_instances.apply({"bridge": f"{registry.host}={registry.host}"})
    # A slow dnf: the flow's check lands while the bake is still installing.
    real_instances.apply({"env": {"PR_PREVIEW_DNF_SECONDS": "3"}})
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    push_sample_app(registry, "octo-org/app", "latest", "v1", private=True)
    config.image = f"{registry.host}/octo-org/app"
    ref = bake_image_ref(config, None, "latest")
    stock = resolve_stock_ami(aws.ec2, config)["ImageId"]

    started = time.monotonic()
    builder = launch_builder_instance(
        aws.ec2, config, source_ami=stock, image_ref=ref, ttl_hours=1.0
    )
    instance_id = builder.instance_id
    check = result(aws, instance_id, send(aws, instance_id, *BAKE_CHECK))
    assert (check["Status"], check["StandardOutputContent"]) == ("Success", "bake-pending\n")
    root = real_instances.root / instance_id
    fs = root / "fs"
    assert (fs / "var/lib/amazon/ssm" / instance_id).is_dir()  # the check's own files
    wait_for(lambda: state_of(aws, instance_id) == "terminated", 120, "the builder's power-off")
    seconds = time.monotonic() - started
    print(f"bake on a local instance: {seconds:.1f} s to power-off (dnf modelled at 3 s)")

    # It baked: Docker and Compose are there, the private image was pulled with the token.
    run = fs / "run" / BAKE_DIR.removeprefix("/run/")
    seal_log = (run / "seal.log").read_text()
    assert not (run / "failed").exists(), seal_log
    assert "sealed, powering off" in seal_log
    assert (fs / "usr/local/bin/docker").is_symlink()
    pulled = json.loads((fs / "var/lib/docker/image/overlay2/repositories.json").read_text())
    names = {name for tags in pulled["Repositories"].values() for name in tags}
    assert ref in names, names

    # No secret in any file the instance could write (nor in what the runtime keeps of it).
    username = config.registry_username("octo-org/app")
    leaks = [
        (path, form)
        for path in files_under(root)
        for form in canary_forms(username)
        if form in path.read_bytes()
    ]
    assert not leaks
    assert not (fs / "root/.docker/config.json").exists()
    assert not list((fs / "srv").rglob("*.env")) and not list((fs / "srv").rglob(".env"))
    assert not (fs / "var/tmp/pr-preview-bake").exists()

    # No trace of this instance: cloud-init's state, the SSM agent's files, logs, its name.
    assert sorted(p.name for p in (fs / "var/lib/cloud").iterdir()) == []
    assert not (fs / "var/lib/amazon/ssm").exists()
    assert [p for p in files_under(fs / "var/log") if p.stat().st_size] == []
    traces = [instance_id, hostname_of(aws_private_ip(aws, instance_id))]
    named = [
        path
        for path in files_under(fs)
        for trace in traces
        if trace in str(path.relative_to(fs)) or trace.encode() in path.read_bytes()
    ]
    assert not named
    assert "/etc is read-only here: machine-id and SSH host keys left as they are" in seal_log


def aws_private_ip(aws: AwsClients, instance_id: str) -> str:
    [instance] = [i for i in instances(aws) if i["InstanceId"] == instance_id]
    return str(instance["PrivateIpAddress"])


def test_a_real_bake_that_cannot_log_in_says_so_to_the_flows_check_and_forgets_the_token(
    aws: AwsClients,
    config: PreviewConfig,
    registry: FakeRegistry,
    real_instances: InstanceRuntime,
) -> None:
    """The registry refuses the token: the bake stops at ghcr-login, the flow's check over SSM
    reads that from the marker, and the token read from Parameter Store is on no disk."""
    real_instances.apply({"bridge": f"{registry.host}={registry.host}"})
    registry.users["octo-org"] = "not-the-token-in-parameter-store"
    push_sample_app(registry, "octo-org/app", "latest", "v1", private=True)
    config.image = f"{registry.host}/octo-org/app"
    stock = resolve_stock_ami(aws.ec2, config)["ImageId"]
    builder = launch_builder_instance(
        aws.ec2,
        config,
        source_ami=stock,
        image_ref=bake_image_ref(config, None, "latest"),
        ttl_hours=1.0,
    )
    fs = real_instances.root / builder.instance_id / "fs"
    wait_for(lambda: (fs / BAKE_DIR.removeprefix("/") / "failed").exists(), 60, "the marker")

    failure = read_bake_failure(aws.ssm, config, builder.instance_id)

    assert failure is not None and failure.startswith("bake failed at step: ghcr-login\n")
    assert "unauthorized" in failure.lower()  # the registry's answer, from the log
    assert state_of(aws, builder.instance_id) == "running"  # not sealed, not imaged
    username = config.registry_username("octo-org/app")
    leaks = [
        path
        for path in files_under(real_instances.root / builder.instance_id)
        for form in canary_forms(username)
        if form in path.read_bytes()
    ]
    assert not leaks
