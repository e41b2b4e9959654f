"""Amazon ECR as the registry: the image's name says ECR, the build-image check asks ECR's API
(moto's), and an instance logs in with the password ECR hands its role — no token parameter.

The check's outcomes are the GHCR check's (``tests/test_check_image.py``): found, pushed while
the check waits, never pushed, refused, no such repository. One preview boots on a real local
instance: its ``aws ecr get-login-password`` asks moto, its ``docker login`` and pull go to an
ECR-like registry (Basic auth, the user ``AWS``) that accepts only that password, and a push is
then deployed in place the same way.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from local_stack.instance.runtime import InstanceRuntime
from local_stack.instance.world import push_sample_app
from local_stack.registry import FakeRegistry
from tasks.app.secrets import read_secrets
from tasks.app.user_data import LaunchSpec, render_spare_user_data, render_user_data
from tasks.cloud.aws import SINGLE_ATTEMPT, AwsClients, build_clients
from tasks.cloud.ecr import EcrRepository, ecr_login
from tasks.cloud.on_instance import BOOTSTRAP_DONE, STATE_DIR
from tasks.config import ConfigError, PreviewConfig, load_config
from tasks.steps.bake import render_bake_user_data
from tasks.steps.check_image import (
    ImageCheck,
    ImageNotFound,
    RegistryAuthError,
    RepositoryMissing,
    check_image,
    wait_for_image,
)
from tasks.steps.launch import launch_instance
from tasks.steps.preflight import run_preflight
from tasks.steps.update import deploy_commands, deploy_in_place
from tests.fakes.aws_faults import attach, aws_faults
from tests.support import REGION
from tests.test_check_image import Clock
from tests.test_instance_runtime import wait_for

if TYPE_CHECKING:
    from mypy_boto3_ecr import ECRClient

ACCOUNT = "123456789012"  # moto's account
HOST = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
REPO = "octo-org/app"
IMAGE = f"{HOST}/{REPO}"
SHA1 = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SHA2 = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture
def ecr(aws: AwsClients) -> ECRClient:
    """An ECR client of the test's moto as the flows build it (one attempt per call: the
    check's poll is the retry layer), with the app's repository."""
    client: ECRClient = boto3.client("ecr", region_name=REGION, config=SINGLE_ATTEMPT)
    client.create_repository(repositoryName=REPO)
    return client


def push(ecr: ECRClient, tag: str, manifest: bytes | None = None) -> str:
    """``docker push`` as ECR records it: the manifest under the tag, addressed by its sha256;
    returns the digest ECR reports."""
    body = (
        manifest or json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": []}).encode()
    )
    image = ecr.put_image(
        repositoryName=REPO,
        imageManifest=body.decode(),
        imageManifestMediaType=INDEX,
        imageTag=tag,
        imageDigest="sha256:" + hashlib.sha256(body).hexdigest(),
    )["image"]
    return str(image["imageId"]["imageDigest"])


def wait(ecr: ECRClient, clock: Clock, timeout_seconds: float = 1200) -> ImageCheck:
    return wait_for_image(
        IMAGE,
        SHA1,
        timeout_seconds=timeout_seconds,
        poll_seconds=5,
        pr_number=42,
        ecr=ecr,
        sleep=clock.sleep,
        clock=clock,
    )


# --- the image's name -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        IMAGE,
        f"{ACCOUNT}.dkr.ecr.us-gov-west-1.amazonaws.com/app",
        f"{ACCOUNT}.dkr.ecr.eu-central-1.amazonaws.com/team/sub/app",
    ],
)
def test_an_ecr_image_is_named_by_its_host(image: str) -> None:
    repository = EcrRepository.parse(PreviewConfig(image=image).image_for(REPO))
    assert repository is not None and str(repository) == image
    assert repository.account == ACCOUNT and repository.arn.startswith("arn:aws:ecr:")
    assert repository.arn.endswith(f":{ACCOUNT}:repository/{image.split('/', 1)[1]}")


@pytest.mark.parametrize(
    "image",
    [
        f"12345678901.dkr.ecr.{REGION}.amazonaws.com/app",  # 11 digits
        f"1234567890123.dkr.ecr.{REGION}.amazonaws.com/app",  # 13
        f"{ACCOUNT}.dkr.ecr.apnortheast1.amazonaws.com/app",  # not a region
        f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com:443/app",  # a port
        f"{ACCOUNT}.dkr.ecr-fips.{REGION}.amazonaws.com/app",
        f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com.cn/app",
        f"evil.{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/app",
    ],
)
def test_a_host_that_only_looks_like_ecr_fails_at_load(image: str) -> None:
    with pytest.raises(
        ConfigError, match=r"image \(from flow parameters\): .* is not an ECR image repository"
    ):
        load_config({"image": image}, env={}, use_variable=False)


def test_other_registries_are_not_ecr() -> None:
    for image in ("ghcr.io/octo-org/app", "public.ecr.aws/acme/app", "localhost:5000/app"):
        assert EcrRepository.parse(image) is None
    assert EcrRepository.parse(PreviewConfig().image_for(REPO)) is None  # ghcr.io/<repo>


# --- the check, through ECR's API -----------------------------------------------------------


def test_a_pushed_image_is_found_through_ecrs_api(
    ecr: ECRClient, caplog: pytest.LogCaptureFixture
) -> None:
    digest = push(ecr, SHA1)
    config = PreviewConfig(image=IMAGE, poll_seconds=0.01, image_wait_seconds=5)
    with caplog.at_level(logging.INFO):
        result = check_image.fn(config, REPO, 42, SHA1, None, ecr=ecr)
    assert (result.reference, result.digest, result.attempts) == (f"{IMAGE}:{SHA1}", digest, 1)
    assert result.pr_tag == "pr-42" and result.pr_tag_present is False  # informational only


def test_an_image_pushed_while_the_check_waits_is_found(ecr: ECRClient) -> None:
    clock = Clock()
    original = clock.sleep

    def sleep(seconds: float) -> None:
        original(seconds)
        if len(clock.sleeps) == 2:  # CI finishes during the second wait
            push(ecr, SHA1)

    clock.sleep = sleep  # type: ignore[method-assign]
    result = wait(ecr, clock)
    assert result.attempts == 3 and clock.sleeps == [5, 10]


def test_an_image_never_pushed_fails_after_the_wait(ecr: ECRClient) -> None:
    push(ecr, "something-else")
    clock = Clock()
    with pytest.raises(ImageNotFound) as raised:
        wait(ecr, clock, timeout_seconds=120)
    assert str(raised.value) == (
        f"image {IMAGE}:{SHA1} not found after 2 min — did the build workflow push it?"
    )
    assert sum(clock.sleeps) == 120


def test_a_missing_repository_fails_at_once_saying_how_to_create_it(aws: AwsClients) -> None:
    clock = Clock()
    with pytest.raises(RepositoryMissing) as raised:
        wait(boto3.client("ecr", region_name=REGION), clock)
    assert str(raised.value).startswith(
        f"ECR has no repository {REPO} in account {ACCOUNT} ({REGION}): create it"
        f" (aws ecr create-repository --region {REGION} --repository-name {REPO})"
    )
    assert clock.sleeps == []


def test_a_refused_check_fails_at_once_naming_the_permission(ecr: ECRClient) -> None:
    push(ecr, SHA1)
    clock = Clock()
    with aws_faults() as faults:
        attach(faults, ecr)
        faults.fail("ecr.DescribeImages", "AccessDeniedException", status=400)
        with pytest.raises(RegistryAuthError) as raised:
            wait(ecr, clock)
    assert str(raised.value) == (
        "AccessDeniedException: the flows' role may not call ecr:DescribeImages on"
        f" arn:aws:ecr:{REGION}:{ACCOUNT}:repository/{REPO}: grant it"
        " (deployments/iam/orchestrator-policy.json, CheckImagesInTheConfiguredEcrRepositories)"
    )
    assert clock.sleeps == []


def test_throttling_counts_as_not_yet(ecr: ECRClient) -> None:
    push(ecr, SHA1)
    clock = Clock()
    with aws_faults() as faults:
        attach(faults, ecr)
        faults.fail("ecr.DescribeImages", "ThrottlingException", status=400, times=2)
        result = wait(ecr, clock)
    assert result.attempts == 3
    assert faults.injected["ecr.DescribeImages"] == 2


# --- no token parameter ---------------------------------------------------------------------


def test_an_ecr_image_needs_no_token_parameter(aws: AwsClients, config: PreviewConfig) -> None:
    """The flows build an ECR client in the image's region; preflight and the run's secrets
    do without the GHCR token parameter, which is not even read."""
    config.image = f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com/{REPO}"
    aws.ssm.delete_parameter(Name=config.ghcr_token_parameter)
    with aws_faults() as faults:
        clients = build_clients(config)
        secrets = read_secrets(clients.ssm, config)
        report = run_preflight(clients, config)
    assert clients.ecr is not None and clients.ecr.meta.region_name == "eu-west-1"
    assert build_clients(PreviewConfig(region=REGION)).ecr is None  # GHCR: no ECR client
    assert secrets.ghcr_token is None and secrets.database_url
    assert faults.calls["ssm.GetParameter"] == 2  # DATABASE_URL: the run's, preflight's
    assert report.passed, report.markdown()
    assert "ghcr token parameter" not in [check.name for check in report.checks]
    [registry] = [check for check in report.checks if check.name == "registry"]
    assert registry.detail.startswith(f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com is ECR")


def test_every_login_on_an_instance_is_the_roles(tmp_path: Path) -> None:
    """Boot, a spare's base layers, a push and the bake log in with the same line; none reads
    the token parameter or builds from the tarball (which needs it)."""
    config = PreviewConfig(image=IMAGE, spare_base_tag="main", allowed_repos=[REPO])
    login = f"aws ecr get-login-password --region {REGION} | docker login --username AWS"
    login += f" --password-stdin {HOST}"
    assert ecr_login(EcrRepository(ACCOUNT, REGION, REPO)) == login
    scripts = {
        "boot": render_user_data(config, LaunchSpec(REPO, 42, SHA1)),
        "spare": render_spare_user_data(config),
        "push": "\n".join(deploy_commands(config, REPO, f"{IMAGE}:{SHA2}")),
        "bake": render_bake_user_data(config, f"{IMAGE}:main", 1),
    }
    for name, script in scripts.items():
        assert login in script, name
        assert config.ghcr_token_parameter not in script and "GHCR_TOKEN=" not in script, name
        assert "tarball" not in script and "api.github.com" not in script, name
    assert "\nstep=ecr-login\n" + login + "\n" in scripts["boot"]
    assert "\nstep=ecr-login\n" + login + "\n" in scripts["bake"]
    assert f"if {login} && docker pull {IMAGE}:main; then" in scripts["spare"]


# --- on a real instance ---------------------------------------------------------------------


def sent_credentials(registry: FakeRegistry, tag: str) -> set[str | None]:
    """What the pulls of ``tag`` presented (CI's push is not a pull)."""
    return {
        request.headers.get("authorization")
        for request in registry.manifest_requests(tag)
        if request.method in ("GET", "HEAD")
    }


def test_a_preview_in_ecr_boots_pulls_and_is_updated_in_place_on_a_real_instance(
    aws: AwsClients,
    config: PreviewConfig,
    registry: FakeRegistry,
    real_instances: InstanceRuntime,
) -> None:
    ecr: ECRClient = boto3.client("ecr", region_name=REGION)
    ecr.create_repository(repositoryName=REPO)
    token = ecr.get_authorization_token()["authorizationData"][0]["authorizationToken"]
    user, _, password = base64.b64decode(token).decode().partition(":")
    registry.auth, registry.users = "basic", {user: password}  # ECR: only what ECR handed out
    for sha, version in ((SHA1, "v1"), (SHA2, "v2")):
        push_sample_app(registry, REPO, sha, version)
        media_type, body = registry.repositories[REPO].manifests[
            registry.repositories[REPO].tags[sha]
        ]
        assert media_type == INDEX
        assert push(ecr, sha, body) == registry.repositories[REPO].tags[sha]
    # The instance's dockerd dials ECR's host name: /etc/hosts points it at the instance's
    # loopback, where port 80 is relayed to the local registry (an insecure registry falls back
    # from https to http there).
    registry.aliases.add(HOST)
    real_instances.apply({"bridge": f"127.0.0.1:80={registry.host}"})
    real_instances.apply({"env": {"PR_PREVIEW_REGISTRY_MIRRORS": f"{HOST}=http://{registry.host}"}})
    config.image = IMAGE
    aws.ssm.delete_parameter(Name=config.ghcr_token_parameter)
    # No database here (this is about the registry): the deploy migrates nothing and probes the
    # route that answers without one.
    config.migration_command, config.probe_paths = "true", ["/docs"]

    checked = check_image.fn(config, REPO, 42, SHA1, None, ecr=ecr)
    launched = launch_instance(aws.ec2, config, LaunchSpec(REPO, 42, SHA1))
    sandbox = real_instances.sandboxes[launched.instance_id]
    done, failed = sandbox.inside(BOOTSTRAP_DONE), sandbox.inside(f"{STATE_DIR}/bootstrap-failed")
    wait_for(lambda: done.exists() or failed.exists(), timeout=90)
    log = sandbox.inside("/var/log/cloud-init-output.log").read_text()
    assert done.exists(), log

    assert checked.digest == registry.repositories[REPO].tags[SHA1]
    assert "Login Succeeded" in log and password not in log
    auths = json.loads(sandbox.inside("/root/.docker/config.json").read_text())["auths"]
    assert auths == {HOST: {"auth": base64.b64encode(f"AWS:{password}".encode()).decode()}}
    basic = "Basic " + base64.b64encode(f"AWS:{password}".encode()).decode()
    # Only what ECR handed out (after a challenge, or at once once the login knows the realm).
    assert basic in sent_credentials(registry, SHA1) <= {None, basic}

    pushed = check_image.fn(config, REPO, 42, SHA2, None, ecr=ecr).digest
    updated = deploy_in_place(
        aws.ec2,
        aws.ssm,
        config,
        launched.instance_id,
        repo=REPO,
        sha=SHA2,
        digest=pushed,
        timeout_seconds=60,
    )
    assert (updated.sha, updated.image) == (SHA2, f"{IMAGE}:{SHA2}@{pushed}")
    env = sandbox.inside(f"{config.app_dir}/.env").read_text()
    assert f"APP_IMAGE={IMAGE}:{SHA2}@{pushed}" in env
    assert basic in sent_credentials(registry, pushed) <= {None, basic}  # the checked digest
