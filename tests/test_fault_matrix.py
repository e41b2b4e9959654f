"""The fault-injection matrix (issue 8): every call the flows make, failed once and for good.

One clean run of each flow is recorded first — every AWS ``service.Operation`` the flow's own
boto3 sessions attempted (``aws_faults().calls``) and every HTTP call to GitHub and the registry
by route — and that recording *is* the list of calls, so a call added later joins the matrix by
itself. Each call then fails for good, one run per (flow, call): every call's own failure path.
Transient faults (throttling or 5xx twice, then success) go into every call of one run at once:
each call must ride out its own faults, so one run per flow shows every call's retry path, at a
twentieth of the cost of a run per call.

The flows reach GitHub as a GitHub App, so its installation-token and check-run calls are rows
beside the comment and deployment calls (the token-only path is tested elsewhere). The App's key
is in a Prefect Secret block, read through the Prefect API that the matrix leaves alone, so
``ssm.GetParameter`` stays the run's own secrets read; the key's Parameter Store read and the
installation's lookup (configured here: one row fewer per flow) are tested in
``tests/test_github_app.py``.

After each run an invariant checker looks at moto's state, the fake GitHub and the run's Prefect
logs and artifacts:

- ``tags``:      no live instance without Purpose, PR and shutdown-at tags;
- ``capacity``:  never more than ``max_previews`` live previews;
- ``short-ttl``: a failed preview leaves its instance on the short TTL, or terminated;
- ``comment``:   the PR comment's last state tells the truth: a failed preview says failed; after
  a teardown it follows the instances (torn down when gone, failed while they live after a
  failed run); after a sweep it says expired exactly when the expired preview is gone. A
  permanent fault on a comment route itself exempts the run (nothing can be written);
- ``check-run``: the ``pr-preview`` check run on the PR's head sha, as GitHub holds it, tells the
  truth: after a preview run it is completed, ``success`` exactly when the preview is ready,
  ``failure`` (its summary carrying the diagnosis or the failure) when the run failed, ``neutral``
  when it rightly deployed nothing; never left queued or in progress. A teardown or a sweep ends a
  preview, not a run of a commit (``tasks.steps.report``: a teardown reports without a sha, the
  sweeper tells only comments and deployments): they leave every check run exactly as it was. A
  permanent fault on a check-run route exempts the run, and one on the installation-token route
  exempts both this and the comment (nothing at all can be written);
- ``secrets``:   no canary in user data, logs, artifacts, comments or requests to GitHub;
- ``converges``: a completed run did its job (one ready preview at the sha, PR torn down,
  expired preview gone);
- ``recovers``:  a transient fault ends in a completed run.

The matrix is printed as a table at the end of the session by ``tests/fakes/fault_matrix_report``
(rows travel in the reports' ``user_properties``, so this works under xdist); any broken
invariant fails the test of its (flow, fault). Run alone with ``pytest -m fault_matrix``.
"""

from __future__ import annotations

import copy
import gc
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends
from moto.ssm.models import ssm_backends
from prefect.blocks.system import Secret
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, LogFilter
from prefect.settings import (
    PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    temporary_settings,
)
from prefect.states import State

from flows.preview import PreviewResult, pr_preview
from flows.sweeper import ttl_sweeper
from flows.teardown import pr_teardown
from local_stack.account import create_demo_account
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import ScriptedInstances
from local_stack.serve import serve_handler
from tasks.app.user_data import LaunchSpec
from tasks.cloud.aws import AwsClients, build_clients
from tasks.cloud.db_rules import db_rules, revoke_db_rules
from tasks.cloud.run_instances import resolve_ami
from tasks.cloud.tags import format_time, parse_time
from tasks.config import PreviewConfig, load_config
from tasks.github.pull_request import CommentState, PreviewState, marker, render_comment
from tasks.steps.db_access import open_db_access
from tasks.steps.launch import launch_instance
from tests.fakes.aws_faults import AwsFaults, aws_faults
from tests.fakes.github import FakeGitHub, app_key_pair
from tests.fakes.http_faults import GITHUB_ROUTES, REGISTRY_ROUTES, FaultyRoutes
from tests.plugins.fault_matrix_report import PROPERTY
from tests.support import CANARIES, CANARY_DATABASE_URL, CANARY_GHCR_TOKEN, REGION
from tests.support.deployed import DeployedConfig
from tests.support.moto_state import LIVE_STATES, instances, live, tags, user_data

pytestmark = [pytest.mark.fault_matrix, pytest.mark.usefixtures("prefect_server")]

RecordProperty = Callable[[str, object], None]

REPO = "octo-org/app"
PR = 42
SHA1 = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SHA2 = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
PAYLOAD = Path(__file__).parent / "data" / "github-payloads" / "pull_request.opened.json"
SLACK = timedelta(minutes=5)
TRANSIENT_TIMES = 2

# The throttling answer of each service (code, HTTP status) as AWS gives it.
THROTTLING = {
    "ec2": ("RequestLimitExceeded", 503),
    "ssm": ("ThrottlingException", 400),
    "iam": ("Throttling", 400),
}
UNAVAILABLE = ("ServiceUnavailable", 503)
# GitHub sends Retry-After with many 5xx and rate limits; 0 keeps the client's retries instant.
GITHUB_FAULT_HEADERS = {"Retry-After": "0"}
COMMENT_ROUTES = frozenset(
    {
        "GET github /repos/{repo}/issues/{n}/comments",
        "POST github /repos/{repo}/issues/{n}/comments",
        "PATCH github /repos/{repo}/issues/comments/{id}",
    }
)
READY, UPDATED = "### ✅ Preview ready", "### 🔁 Preview updated in place"
TORN_DOWN, EXPIRED = "### 🧹 Preview torn down", "### ⌛ Preview expired"
# Without an installation token nothing at all can be written to GitHub.
APP_CREDENTIAL_CALLS = frozenset({"POST github /app/installations/{id}/access_tokens"})
CHECK_RUN_ROUTES = frozenset(
    {
        "POST github /repos/{repo}/check-runs",
        "PATCH github /repos/{repo}/check-runs/{id}",
        "GET github /repos/{repo}/commits/{sha}/check-runs",
    }
)
APP_ID, INSTALLATION, SLUG = 4242, 777, "acme-previews"
APP_KEY_BLOCK = "fault-matrix-github-app-key"
CHECK_RUN = "pr-preview"
INVARIANTS = (
    "tags",
    "capacity",
    "short-ttl",
    "comment",
    "check-run",
    "secrets",
    "converges",
    "recovers",
)


# --- the world every case runs in: one moto, one served GitHub and registry per module


@dataclass
class World:
    clients: AwsClients
    config: DeployedConfig
    ami_id: str
    registry: FakeRegistry
    github_routes: FaultyRoutes
    registry_routes: FaultyRoutes
    github_url: str
    prefect: SyncPrefectClient  # the checker's reader of each run's logs and artifacts
    github: FakeGitHub = field(default_factory=FakeGitHub)

    @property
    def bot_login(self) -> str:
        return self.github.apps[APP_ID].bot_login

    def reset(self) -> None:
        """Terminate every instance and forget it, forget GitHub, clear every fault and count.

        moto lists terminated instances forever, keeps their tags and every SSM command sent;
        dropping them keeps every describe (each instance's tags are a scan of all tags) and
        every SSM command (run on all instances) as cheap as in a fresh account.
        """
        ids = [i["InstanceId"] for i in live(self.clients)]
        if ids:
            self.clients.ec2.terminate_instances(InstanceIds=ids)
        ec2 = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
        ec2.reservations.clear()
        for resource in [r for r in ec2.tags if r.startswith("i-")]:
            del ec2.tags[resource]
        ssm_backends[DEFAULT_ACCOUNT_ID][REGION]._commands.clear()
        group = self.config.db_security_group_id or ""
        revoke_db_rules(self.clients.ec2, group, db_rules(self.clients.ec2, group))
        self.github = FakeGitHub(base_url=self.github_url)
        self.github.tokens.clear()  # no personal access token would work: the App only
        self.github.now = time.time()  # the flows sign and expire by the real clock
        self.github.add_app(APP_ID, SLUG, app_key_pair()[1], {INSTALLATION: "octo-org"})
        self.github_routes.reset()
        self.registry_routes.reset()


@pytest.fixture(scope="module")
def world(prefect_server: None) -> Iterator[World]:
    """The module's world; its runs go without the flow heartbeat thread (joining it costs up to
    a second per run, and these runs last seconds) and without asking the server for a CSRF
    token each time a client starts (it has CSRF protection off, Prefect's default)."""
    with ExitStack() as stack:
        stack.enter_context(
            temporary_settings(
                {
                    PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                    PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: False,
                }
            )
        )
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
            patch.delenv(name, raising=False)
        stack.enter_context(mock_aws())
        stack.enter_context(ScriptedInstances().patched()).healthy()
        clients = build_clients(PreviewConfig.model_validate({"region": REGION}))
        account = create_demo_account(
            clients, ghcr_token=CANARY_GHCR_TOKEN, database_url=CANARY_DATABASE_URL
        )

        registry = FakeRegistry(scheme="http")
        registry_routes = FaultyRoutes("registry", REGISTRY_ROUTES, lambda: registry.handle)
        registry.host = stack.enter_context(serve_handler(registry_routes)).removeprefix("http://")
        registry.users["octo-org"] = CANARY_GHCR_TOKEN
        Secret(value=app_key_pair()[0]).save(APP_KEY_BLOCK, overwrite=True)
        for sha in (SHA1, SHA2):
            registry.push("octo-org/app", sha, private=True)

        holder: list[World] = []
        github_routes = FaultyRoutes("github", GITHUB_ROUTES, lambda: holder[0].github.handle)
        github_url = stack.enter_context(serve_handler(github_routes))

        config = load_config(
            {
                **account.config_values(),
                "region": REGION,
                "image": f"{registry.host}/octo-org/app",
                # Runbook §2.5's optional path, so its db-sg calls are in the matrix too.
                "db_sg_open_public_ip": True,
                "max_previews": 2,
                "task_retries": 2,  # TRANSIENT_TIMES faults, then the call goes through
                "retry_delay_seconds": 0,
                "poll_seconds": 0.01,
                "ready_timeout_seconds": 2,
                "migrate_timeout_seconds": 1,
                "probe_timeout_seconds": 1,
                "image_wait_seconds": 1,
                "github_app_id": APP_ID,
                "github_app_installation_id": INSTALLATION,
                "github_app_private_key_secret_block": APP_KEY_BLOCK,
            },
            env={},
            use_variable=False,
        )
        config = DeployedConfig.of(config)
        ami_id = resolve_ami(clients.ec2, config)["ImageId"]
        holder.append(
            World(
                clients,
                config,
                ami_id,
                registry,
                github_routes,
                registry_routes,
                github_url,
                stack.enter_context(get_client(sync_client=True)),
            )
        )
        # A full collection walks every object of the process, ~600k here (moto's AMIs,
        # botocore's models, the Prefect server's modules the harness imports, each failed run's
        # traceback that pytest's log capture keeps till the test ends): ~0.6 s. The runs set
        # off eight at Python's default of one per ten middle passes, two at one per hundred.
        thresholds = gc.get_threshold()
        gc.set_threshold(thresholds[0], thresholds[1], 100)
        stack.callback(gc.set_threshold, *thresholds)
        yield holder[0]


@pytest.fixture
def github_env(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flows build their GitHub client from this and the App's configuration, as in
    production; no token anywhere. The configuration's trusted fields are in the environment
    too, where a deployment keeps them (each test starts without PR_PREVIEW_* variables)."""
    monkeypatch.setenv("GITHUB_API_URL", world.github_url)
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    world.config.deploy(monkeypatch)


# --- arranging each flow's starting point (plain calls, no faults)


def pull(number: int, sha: str, *, state: str = "open") -> dict[str, Any]:
    data = copy.deepcopy(json.loads(PAYLOAD.read_text())["pull_request"])
    data.update(number=number, state=state, merged=False)
    data["head"]["sha"] = sha
    data["head"]["repo"]["full_name"] = REPO
    data["base"]["repo"]["full_name"] = REPO
    return data


def seed_preview(world: World, pr: int, sha: str, *, expires_in: timedelta, age: timedelta) -> str:
    """A preview instance of ``pr`` at ``sha``, updated ``age`` ago, expiring ``expires_in``."""
    launched = launch_instance(
        world.clients.ec2,
        world.config,
        LaunchSpec(REPO, pr, sha),
        ami_id=world.ami_id,
        subnet_id=world.config.subnet_id,
        attempt_key=uuid.uuid4().hex,
    )
    now = datetime.now(UTC)
    world.clients.ec2.create_tags(
        Resources=[launched.instance_id],
        Tags=[
            {"Key": "shutdown-at", "Value": format_time(now + expires_in)},
            {"Key": "updated-at", "Value": format_time(now - age)},
        ],
    )
    open_db_access(world.clients.ec2, world.config, launched.instance_id)
    return launched.instance_id


def seed_ready_comment(world: World, pr: int, sha: str, instance_id: str) -> None:
    body = render_comment(
        CommentState(
            PreviewState.READY,
            REPO,
            pr,
            sha=sha,
            instance_id=instance_id,
            region=REGION,
            expires_at=datetime.now(UTC) + timedelta(hours=world.config.ttl_hours),
        )
    )
    world.github.add_comment(REPO, pr, body, user=world.bot_login)


def seed_deployment(world: World, pr: int, sha: str) -> None:
    deployment_id = 900 + pr
    world.github.deployments.setdefault(REPO, []).append(
        {"id": deployment_id, "sha": sha, "ref": sha, "environment": f"pr-{pr}"}
    )
    world.github.statuses[deployment_id] = [{"id": 1, "state": "success"}]


def seed_check_run(world: World, sha: str) -> None:
    """The ``pr-preview`` check run of the run that made the preview at ``sha``: success."""
    app = world.github.apps[APP_ID]
    world.github.check_runs.setdefault(REPO, []).append(
        {
            "id": 800 + len(world.github.check_runs.get(REPO, [])),
            "name": CHECK_RUN,
            "head_sha": sha,
            "status": "completed",
            "conclusion": "success",
            "output": {"title": READY, "summary": "the preview"},
            "details_url": None,
            "app": {"id": app.app_id, "slug": app.slug},
            "history": [("queued", None), ("in_progress", None), ("completed", "success")],
        }
    )


@dataclass
class Flow:
    """One flow's starting point, its run, and what "done" means for it."""

    name: str
    kind: str  # preview | teardown | sweeper
    head_sha: str | None
    seed: Callable[[World], dict[str, str]]
    run: Callable[[World], State[Any]]


def seed_opened(world: World) -> dict[str, str]:
    # Two other previews fill max_previews=2: opening PR 42 evicts the least recently updated.
    old = seed_preview(world, 7, SHA1, expires_in=timedelta(hours=20), age=timedelta(hours=3))
    newer = seed_preview(world, 8, SHA1, expires_in=timedelta(hours=22), age=timedelta(hours=1))
    world.github.add_pull(REPO, pull(PR, SHA1))
    return {"evicted": old, "kept": newer}


def seed_synchronize(world: World) -> dict[str, str]:
    current = seed_preview(world, PR, SHA1, expires_in=timedelta(hours=23), age=timedelta(hours=1))
    world.github.add_pull(REPO, pull(PR, SHA2))
    seed_ready_comment(world, PR, SHA1, current)
    seed_deployment(world, PR, SHA1)
    seed_check_run(world, SHA1)
    return {"current": current}


def seed_teardown(world: World) -> dict[str, str]:
    current = seed_preview(world, PR, SHA1, expires_in=timedelta(hours=23), age=timedelta(hours=1))
    world.github.add_pull(REPO, pull(PR, SHA1, state="closed"))
    seed_ready_comment(world, PR, SHA1, current)
    seed_deployment(world, PR, SHA1)
    seed_check_run(world, SHA1)
    return {"current": current}


def seed_sweeper(world: World) -> dict[str, str]:
    expired = seed_preview(world, PR, SHA1, expires_in=-timedelta(hours=1), age=timedelta(hours=2))
    open_pr = seed_preview(world, 43, SHA2, expires_in=timedelta(hours=20), age=timedelta(hours=1))
    world.github.add_pull(REPO, pull(PR, SHA1))
    world.github.add_pull(REPO, pull(43, SHA2))
    seed_ready_comment(world, PR, SHA1, expired)
    seed_ready_comment(world, 43, SHA2, open_pr)
    seed_check_run(world, SHA1)
    seed_check_run(world, SHA2)
    return {"expired": expired, "kept": open_pr}


FLOWS = {
    flow.name: flow
    for flow in (
        Flow(
            "preview-opened",
            "preview",
            SHA1,
            seed_opened,
            lambda w: pr_preview(
                REPO, PR, SHA1, action="opened", config=w.config, return_state=True
            ),
        ),
        Flow(
            "preview-synchronize",
            "preview",
            SHA2,
            seed_synchronize,
            lambda w: pr_preview(
                REPO, PR, SHA2, action="synchronize", config=w.config, return_state=True
            ),
        ),
        Flow(
            "teardown",
            "teardown",
            None,
            seed_teardown,
            lambda w: pr_teardown(REPO, PR, config=w.config, return_state=True),
        ),
        Flow(
            "sweeper",
            "sweeper",
            None,
            seed_sweeper,
            lambda w: ttl_sweeper(config=w.config, return_state=True),
        ),
    )
}


# --- one case: arrange, inject, run, check


@dataclass
class Case:
    flow: str
    call: str
    fault: str  # clean | transient | permanent
    outcome: str = ""
    detail: str = ""
    injected: int = 0
    seconds: float = 0.0
    broken: dict[str, str] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)  # faulted calls the run never made

    def row(self) -> dict[str, Any]:
        """Plain values only: the row travels from an xdist worker to the controller."""
        return {
            "flow": self.flow,
            "call": self.call,
            "fault": self.fault,
            "outcome": self.outcome,
            "detail": self.detail,
            "injected": self.injected,
            "seconds": round(self.seconds, 2),
            "broken": dict(self.broken),
        }


def aws_fault(call: str, fault: str, faults: AwsFaults) -> None:
    service = call.split(".", 1)[0]
    code, status = THROTTLING.get(service, UNAVAILABLE)
    faults.fail(call, code, status=status, times=TRANSIENT_TIMES if fault == "transient" else None)


def run_case(world: World, flow: Flow, calls: tuple[str, ...] = (), fault: str = "clean") -> Case:
    """One run of ``flow`` with ``fault`` injected into each of ``calls`` (none: a clean run)."""
    world.reset()
    seeded = flow.seed(world)
    before = {i["InstanceId"] for i in instances(world.clients)}
    checks_before = copy.deepcopy(world.github.check_runs)
    label = calls[0] if len(calls) == 1 else f"(all {len(calls)} calls)" if calls else "(clean run)"
    case = Case(flow.name, label, fault)
    times = TRANSIENT_TIMES if fault == "transient" else None
    for call in calls:
        if call.startswith(("GET ", "POST ", "PATCH ", "HEAD ", "PUT ", "DELETE ")):
            routes = world.github_routes if " github " in call else world.registry_routes
            headers = GITHUB_FAULT_HEADERS if routes is world.github_routes else {}
            routes.fail(call, 503, times=times, headers=headers)
    started = time.monotonic()
    with aws_faults() as faults:
        for call in calls:
            if "." in call.split(" ")[0]:
                aws_fault(call, fault, faults)
        configured = world.config
        if len(calls) > 1 and times:
            # A step retries as a whole: one whose k calls all fail `times` times needs k·times
            # retries before every call has had its faults (one layer of retries per call);
            # 20, the most the configuration allows, covers a step of up to ten calls.
            world.config = configured.model_copy(update={"task_retries": 20})
        try:
            state = flow.run(world)
        finally:
            world.config = configured
    case.seconds = time.monotonic() - started
    hit = faults.injected + world.github_routes.injected + world.registry_routes.injected
    case.injected = sum(hit[call] for call in calls)
    case.missed = [call for call in calls if not hit[call]]
    case.calls = sorted({*faults.calls, *world.github_routes.calls, *world.registry_routes.calls})
    case.outcome = "failed" if state.is_failed() or state.is_crashed() else "completed"
    result = state.result(raise_on_failure=False)
    if flow.kind == "preview" and not isinstance(result, BaseException):
        case.detail = f" ({result.path or result.status})"
    check(world, flow, case, result, seeded, before, run_texts(world, state), checks_before)
    return case


# --- the invariants


def bot_headline(github: FakeGitHub, pr: int) -> str | None:
    bodies = [b for b in github.comment_bodies(REPO, pr) if marker(REPO, pr) in b]
    return bodies[-1].splitlines()[1] if bodies else None


def run_texts(world: World, state: State[Any]) -> list[str]:
    """Log messages and artifact bodies of the flow run behind ``state``."""
    run_id = state.state_details.flow_run_id
    logs = world.prefect.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run_id]}))
    artifacts = world.prefect.read_artifacts(
        flow_run_filter=FlowRunFilter(id={"any_": [run_id]}),
        artifact_filter=ArtifactFilter(),
    )
    return [log.message for log in logs] + [str(a.data) for a in artifacts]


def check(
    world: World,
    flow: Flow,
    case: Case,
    result: Any,
    seeded: dict[str, str],
    before: set[str],
    run_output: list[str],
    checks_before: dict[str, list[dict[str, Any]]],
) -> None:
    """Record in ``case.broken`` every invariant the world breaks after the run;
    ``checks_before`` is the check runs the fake GitHub held before it."""
    config, broken = world.config, case.broken
    now = datetime.now(UTC)
    failed = case.outcome == "failed"
    every = instances(world.clients)
    alive = [i for i in every if i["State"]["Name"] in LIVE_STATES]
    previews = [i for i in alive if tags(i).get("Purpose") == config.purpose_tag]
    ours = [i for i in previews if tags(i).get("PR") == str(PR)]
    new_ids = [i["InstanceId"] for i in every if i["InstanceId"] not in before]

    untagged = [
        i["InstanceId"]
        for i in alive
        if not {"Purpose", "PR", "shutdown-at"} <= set(tags(i))
        or parse_time(tags(i)["shutdown-at"]) is None
    ]
    if untagged:
        broken["tags"] = f"live without Purpose/PR/shutdown-at: {untagged}"

    if len(previews) > config.max_previews:
        broken["capacity"] = f"{len(previews)} live > max_previews={config.max_previews}"

    if flow.kind == "preview" and failed:
        limit = now + timedelta(hours=config.failure_ttl_hours) + SLACK
        touched = [
            i for i in ours if i["InstanceId"] in new_ids or tags(i).get("Sha") == flow.head_sha
        ]
        long_lived = [
            f"{i['InstanceId']} shutdown-at {tags(i).get('shutdown-at')}"
            for i in touched
            if (parse_time(tags(i).get("shutdown-at")) or now + timedelta(days=999)) > limit
        ]
        if long_lived:
            broken["short-ttl"] = f"failed run left {long_lived}"

    headline = bot_headline(world.github, PR)
    permanent = case.call if case.fault == "permanent" else None
    if permanent not in COMMENT_ROUTES | APP_CREDENTIAL_CALLS:
        problem = comment_problem(flow, failed, headline, ours, seeded)
        if problem:
            broken["comment"] = problem
    if permanent not in CHECK_RUN_ROUTES | APP_CREDENTIAL_CALLS:
        problem = check_run_problem(world.github, flow, failed, result, checks_before)
        if problem:
            broken["check-run"] = problem

    texts = list(run_output)
    texts += [user_data(world.clients, iid) for iid in new_ids]
    texts += [
        json.dumps(r.body) + json.dumps(r.headers) + json.dumps(r.params)
        for r in world.github.requests
    ]
    texts += [c["body"] for comments in world.github.comments.values() for c in comments]
    leaked = sorted({canary for canary in CANARIES for text in texts if canary in text})
    if leaked:
        broken["secrets"] = f"canary {leaked[0][:12]}… leaked"

    if not failed:
        problem = convergence_problem(world, flow, result, alive, ours, seeded, now)
        if problem:
            broken["converges"] = problem

    if case.fault == "transient" and failed:
        broken["recovers"] = f"failed: {str(result)[:160]}"


def comment_problem(
    flow: Flow, failed: bool, headline: str | None, ours: list[dict[str, Any]], seeded: Any
) -> str | None:
    """What the comment claims that the run's outcome or the world contradicts, if anything."""
    shown = headline or "no comment"
    says_failed = headline is not None and "failed" in headline
    if flow.kind == "preview":
        if failed and not says_failed:
            return f"run failed, comment says {shown!r}"
        if not failed and headline not in (READY, UPDATED):
            return f"run completed, comment says {shown!r}"
    if flow.kind == "teardown":
        # The PR is closed: the comment must follow the instances, and say failed while they live.
        if ours and headline == TORN_DOWN:
            return f"{len(ours)} still live, comment says {shown!r}"
        if ours and failed and not says_failed:
            return f"run failed with {len(ours)} still live, comment says {shown!r}"
        if not ours and headline not in (TORN_DOWN,) and not says_failed:
            return f"preview gone, comment says {shown!r}"
    if flow.kind == "sweeper":
        gone = not any(i["InstanceId"] == seeded["expired"] for i in ours)
        if gone and headline != EXPIRED:
            return f"expired preview terminated, comment says {shown!r}"
        if not gone and headline == EXPIRED:
            return "comment says expired, preview still live"
    return None


def check_run_problem(
    github: FakeGitHub,
    flow: Flow,
    failed: bool,
    result: Any,
    checks_before: dict[str, list[dict[str, Any]]],
) -> str | None:
    """What the head sha's ``pr-preview`` check run claims that the run's end contradicts."""
    if flow.kind != "preview":
        # A teardown or a sweep ends a preview, not a run of a commit: no check run changes.
        if github.check_runs != checks_before:
            return f"{flow.kind} changed check runs: {check_run_histories(github)}"
        return None
    assert flow.head_sha is not None
    runs = [
        r
        for r in github.check_runs.get(REPO, [])
        if r["head_sha"] == flow.head_sha and r["name"] == CHECK_RUN
    ]
    if not runs:
        return f"no {CHECK_RUN} check run on {flow.head_sha[:7]}"
    if len(runs) > 1:
        return f"{len(runs)} check runs for one run: {check_run_histories(github)}"
    [run] = runs
    shown = f"{run['status']}/{run['conclusion']}"
    if run["status"] != "completed":
        return f"run ended, check run left {shown}"
    if failed:
        summary = (run.get("output") or {}).get("summary") or ""
        if run["conclusion"] != "failure":
            return f"run failed, check run says {shown}"
        if "Diagnosis" not in summary and type(result).__name__ not in summary:
            return f"failed check run's summary names no diagnosis or failure: {summary[:120]!r}"
        return None
    expected = "success" if result.status == "ready" else "neutral"
    if run["conclusion"] != expected:
        return f"run completed {result.status}, check run says {shown}"
    return None


def check_run_histories(github: FakeGitHub) -> list[tuple[str, list[Any]]]:
    return [(r["head_sha"][:7], r["history"]) for r in github.check_runs.get(REPO, [])]


def convergence_problem(
    world: World,
    flow: Flow,
    result: Any,
    alive: list[dict[str, Any]],
    ours: list[dict[str, Any]],
    seeded: dict[str, str],
    now: datetime,
) -> str | None:
    config = world.config
    ids = [i["InstanceId"] for i in ours]
    live_ids = {i["InstanceId"] for i in alive}
    if flow.kind in ("teardown", "sweeper"):
        rules = db_rules(world.clients.ec2, config.db_security_group_id or "")
        orphans = [r.description for r in rules if r.instance_id not in live_ids]
        if orphans:
            return f"completed but db-sg rules of gone instances left: {orphans}"
    if flow.kind == "preview":
        if result.status != "ready":
            return f"completed with status {result.status}"
        if len(ours) != 1 or tags(ours[0]).get("Sha") != flow.head_sha:
            return f"live for PR: {[(i['InstanceId'], tags(i).get('Sha')) for i in ours]}"
        expires = parse_time(tags(ours[0]).get("shutdown-at"))
        if expires is None or expires < now + timedelta(hours=config.ttl_hours) - SLACK:
            return f"ready preview on shutdown-at {tags(ours[0]).get('shutdown-at')}"
    if flow.kind == "teardown" and ours:
        return f"completed but {ids} still live"
    if flow.kind == "sweeper":
        if seeded["expired"] in live_ids:
            return f"completed but expired {seeded['expired']} still live"
        if seeded["kept"] not in live_ids:
            return f"unexpired {seeded['kept']} was terminated"
    return None


# --- the recording and the tests


RECORDED: dict[str, Case] = {}


def recorded(world: World, flow: Flow) -> Case:
    """One clean run of ``flow``; its calls are the matrix's rows (Prefect API calls aside)."""
    if flow.name not in RECORDED:
        RECORDED[flow.name] = run_case(world, flow)
    return RECORDED[flow.name]


def per_flow(*faults: str) -> list[Any]:
    """Parameters grouped by flow: one xdist worker runs a flow's recording and its matrix."""
    return [
        pytest.param(name, *fault, marks=pytest.mark.xdist_group(f"fault-matrix-{name}"))
        for name in FLOWS
        for fault in ([(f,) for f in faults] or [()])
    ]


@pytest.mark.parametrize("flow_name", per_flow())
def test_clean_run_is_recorded(
    world: World, github_env: None, record_property: RecordProperty, flow_name: str
) -> None:
    clean = recorded(world, FLOWS[flow_name])
    record_property(PROPERTY, clean.row())
    assert clean.outcome == "completed" and not clean.broken, clean.broken
    assert any("." in call for call in clean.calls), "no AWS call recorded"
    assert any(" github " in call for call in clean.calls), "no GitHub call recorded"


@pytest.mark.parametrize(("flow_name", "fault"), per_flow("transient", "permanent"))
def test_fault_matrix(
    world: World, github_env: None, record_property: RecordProperty, flow_name: str, fault: str
) -> None:
    """A permanent fault, one call at a time: each call's own failure path. Transient faults, on
    every call of the run at once: each call must ride out its own two faults, so one run shows
    every call's retry path (and a retry that repeats a call's side effect shows in the state)."""
    flow = FLOWS[flow_name]
    calls = tuple(recorded(world, flow).calls)
    batches = [calls] if fault == "transient" else [(call,) for call in calls]
    broken = []
    for batch in batches:
        case = run_case(world, flow, batch, fault)
        record_property(PROPERTY, case.row())
        if case.missed:
            case.broken["injected"] = f"the fault was never hit: {case.missed}"
        broken += [f"{case.call}: {name}: {why}" for name, why in case.broken.items()]
    assert not broken, "\n".join(broken)


@pytest.mark.xdist_group("fault-matrix-teardown")
def test_the_checker_sees_every_broken_invariant(world: World) -> None:
    """The checker is not vacuous: a world that breaks each invariant is reported for each."""
    flow = FLOWS["preview-synchronize"]
    world.reset()
    seeded = flow.seed(world)
    before = {i["InstanceId"] for i in instances(world.clients)}
    checks_before = copy.deepcopy(world.github.check_runs)
    # What a broken run could leave: an untagged instance whose user data holds a secret, the
    # run's preview on the full TTL beside the old one, two more previews, a ✅ comment, the
    # run's check run still in progress.
    world.clients.ec2.run_instances(
        ImageId=world.ami_id, MinCount=1, MaxCount=1, UserData=f"token={CANARY_GHCR_TOKEN}"
    )
    seed_preview(world, PR, SHA2, expires_in=timedelta(hours=23), age=timedelta(0))
    seed_preview(world, 9, SHA1, expires_in=timedelta(hours=23), age=timedelta(0))
    seed_check_run(world, SHA2)
    left_open = world.github.check_runs[REPO][-1]
    left_open.update(status="in_progress", conclusion=None)

    failed = Case(flow.name, "ec2.Example", "transient", outcome="failed")
    check(world, flow, failed, RuntimeError("x"), seeded, before, ["log line"], checks_before)
    assert set(failed.broken) == set(INVARIANTS) - {"converges"}, failed.broken

    completed = Case(flow.name, "ec2.Example", "permanent", outcome="completed")
    ready = PreviewResult(REPO, PR, SHA2, status="ready")
    leak = [f"DATABASE_URL={CANARY_DATABASE_URL}"]
    check(world, flow, completed, ready, seeded, before, leak, checks_before)
    assert set(completed.broken) == {"tags", "capacity", "check-run", "secrets", "converges"}, (
        completed.broken
    )

    # A teardown that touched a check run; a preview that concluded its own as it should.
    teardown = Case("teardown", "ec2.Example", "permanent", outcome="completed")
    check(world, FLOWS["teardown"], teardown, None, seeded, before, [], checks_before)
    assert "check-run" in teardown.broken, teardown.broken
    left_open.update(status="completed", conclusion="success")
    concluded = Case(flow.name, "ec2.Example", "permanent", outcome="completed")
    check(world, flow, concluded, ready, seeded, before, [], checks_before)
    assert "check-run" not in concluded.broken, concluded.broken
