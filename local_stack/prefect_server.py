"""A whole pr-preview installation on one machine, for the demo and the end-to-end tests.

A Prefect server (SQLite, or PostgreSQL with ``db="postgres"``; 127.0.0.1, its own
PREFECT_HOME), the deployments of prefect.yaml with their triggers, process workers that poll
every second, and the signed webhook receiver — the self-hosted path of docs/design.md,
with nothing in between.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from local_stack.processes import die_with_parent, free_port, listens_on, stop_process

if TYPE_CHECKING:
    from local_stack.prefect_postgres import PrefectDatabase

PROJECT_DIR = Path(__file__).resolve().parent.parent
WORK_POOL = "pr-preview"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def quiet_env(home: Path, extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The environment of every Prefect process of the stack."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="true",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        # SQLite under a burst of runs: wait for the database rather than answer 503, which
        # the worker would report as a crashed run.
        PREFECT_SERVER_DATABASE_TIMEOUT="60",
        PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT="30",
        # A killed run's lock frees within its lease plus this loop (15 s by default).
        PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="5",
        # Writes nobody here reads, contending for SQLite's one writer during a push storm:
        # a "database is locked" there lost an automation's run. Runs here are never late
        # (the worker polls every second) and nothing pauses.
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED="false",
    )
    env.update(extra)
    return env


class RetryBusy(httpx.HTTPTransport):
    """429, 502 and 503 mean "busy" (SQLite locked under a push storm): wait and ask again,
    as Prefect's client does (PREFECT_CLIENT_MAX_RETRIES)."""

    BUSY = frozenset({429, 502, 503})

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(6):
            response = super().handle_request(request)
            if response.status_code not in self.BUSY or attempt == 5:
                return response
            response.close()
            time.sleep(min(8.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")


@dataclass
class PrefectStack:
    home: Path
    api_url: str
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    database: PrefectDatabase | None = None  # None: SQLite under ``home``

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def prefect(self, *args: str, timeout: float = 180) -> str:
        """Run the ``prefect`` CLI against this server from the project directory."""
        completed = subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            cwd=PROJECT_DIR,
            env={**self.env, "PWD": str(PROJECT_DIR)},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"prefect {' '.join(args)} failed:\n{completed.stdout[-2000:]}"
                f"\n{completed.stderr[-2000:]}"
            )
        return completed.stdout

    def deploy(self) -> None:
        """Create the process work pool and every deployment (and trigger) of prefect.yaml:
        the pool through the API (three CLI starts cost seconds of CPU each), the deployments
        with ``prefect deploy --all``, as an operator runs it."""
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectAlreadyExists

        from deployments.pools import process_base_job_template

        # A few runs at a time: a push storm queues instead of starving a 2-core machine.
        # Each run one interpreter: the engine itself, not a supervisor that starts it.
        pool = WorkPoolCreate(
            name=WORK_POOL,
            type="process",
            base_job_template=process_base_job_template(),
            concurrency_limit=4,
        )
        with SyncPrefectClient(self.api_url) as client, contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(pool)
        self.prefect("--no-prompt", "deploy", "--all")

    def start_worker(self, log: Path, limit: int | None = None) -> subprocess.Popen[bytes]:
        """A process worker on the pool; ``limit``: at most that many of its runs at a time."""
        handle = log.open("ab")
        at_most = ["--limit", str(limit)] if limit else []
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, *at_most],
            cwd=PROJECT_DIR,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        self.processes.append(worker)
        return worker

    def start_workers(self, count: int, limit: int | None = None) -> list[subprocess.Popen[bytes]]:
        """``count`` process workers on the one pool, each logging to ``worker-<n>.log``."""
        return [
            self.start_worker(self.home / f"worker-{n}.log", limit) for n in range(1, count + 1)
        ]

    def client(self) -> httpx.Client:
        """An API client that retries what a busy server answers (as Prefect's own does)."""
        return httpx.Client(base_url=self.api_url, timeout=30, transport=RetryBusy())

    def set_variable(self, name: str, value: Any) -> None:
        with self.client() as http:
            found = http.get(f"/variables/name/{name}")
            if found.status_code == 200:
                http.patch(f"/variables/name/{name}", json={"value": value}).raise_for_status()
            else:
                http.post("/variables/", json={"name": name, "value": value}).raise_for_status()

    def flow_runs(self, deployment: str) -> list[dict[str, Any]]:
        """Every run of deployment ``flow-name/deployment-name``, oldest first."""
        flow_name, deployment_name = deployment.split("/")
        with self.client() as http:
            found = http.get(f"/deployments/name/{flow_name}/{deployment_name}")
            found.raise_for_status()
            runs = http.post(
                "/flow_runs/filter",
                json={
                    "deployments": {"id": {"any_": [found.json()["id"]]}},
                    "sort": "EXPECTED_START_TIME_ASC",
                },
            )
            runs.raise_for_status()
            return list(runs.json())

    def wait_for_runs(
        self, deployment: str, count: int, *, timeout: float = 120
    ) -> list[dict[str, Any]]:
        """Block until ``deployment`` has ``count`` runs in a final state; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.flow_runs(deployment)
            done = [run for run in runs if run["state_type"] in TERMINAL_STATES]
            if len(done) >= count:
                return runs
            if time.monotonic() > deadline:
                states = [(run["name"], run["state_type"]) for run in runs]
                raise TimeoutError(f"{deployment}: {len(done)}/{count} runs finished: {states}")
            time.sleep(0.5)

    def artifacts(self, key: str) -> list[str]:
        """Every version of artifact ``key``, oldest first."""
        with self.client() as http:
            found = http.post(
                "/artifacts/filter",
                json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"},
            )
            found.raise_for_status()
            return [str(item["data"]) for item in reversed(found.json())]


@contextmanager
def prefect_stack(
    home: Path, extra_env: Mapping[str, str] = {}, *, db: str = "sqlite"
) -> Iterator[PrefectStack]:
    """A Prefect server on a free port, stopped (with every process started on it) at the end.

    ``db="postgres"``: its database on a PostgreSQL of its own (``prefect_postgres.py``),
    whose URL only the server's environment holds; SQLite otherwise."""
    with contextlib.ExitStack() as resources:
        database = None
        if db == "postgres":
            from local_stack.prefect_postgres import prefect_database

            database = resources.enter_context(prefect_database(home / "postgres"))
        elif db != "sqlite":
            raise ValueError(f"db must be sqlite or postgres, not {db!r}")
        yield from _serve(home, extra_env, database)


def _serve(
    home: Path, extra_env: Mapping[str, str], database: PrefectDatabase | None
) -> Iterator[PrefectStack]:
    home.mkdir(parents=True, exist_ok=True)
    stack = None
    try:
        # A free port can be taken by another process before the server binds it (test workers
        # start servers side by side): then the server exits saying so, and starts on another.
        for _ in range(PORT_ATTEMPTS):
            stack = _start_server(home, extra_env, database)
            outcome = _wait_healthy(stack)
            if outcome == "up":
                break
            stop_process(stack.processes[0])
            if outcome != "port taken":
                raise RuntimeError(f"Prefect server did not start; see {home / 'server.log'}")
        else:
            raise RuntimeError(f"Prefect server found no free port; see {home / 'server.log'}")
        yield stack
    finally:
        for process in reversed(stack.processes if stack else []):
            stop_process(process)


PORT_ATTEMPTS = 3


def _start_server(
    home: Path, extra_env: Mapping[str, str], database: PrefectDatabase | None
) -> PrefectStack:
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = quiet_env(home, {**extra_env, "PREFECT_API_URL": api_url})
    log = (home / "server.log").open("ab")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            # SQLite needs its transactions begun IMMEDIATE (sqlite_server.py); PostgreSQL not.
            "prefect" if database else "local_stack.sqlite_server",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=PROJECT_DIR,
        env={**env, **(database.server_env() if database else {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    log.close()  # the server holds its own descriptor
    return PrefectStack(home, api_url, env, [server], database)


def _wait_healthy(stack: PrefectStack) -> str:
    """``up``, ``port taken`` (the server exited: its port was another's), or ``failed``."""
    server = stack.processes[0]
    log = stack.home / "server.log"
    port = stack.api_url.rsplit(":", 1)[1].split("/")[0]
    # A first start migrates a new database: past a minute on 2 busy cores.
    deadline = time.monotonic() + 150
    while True:
        # Asked only once it is our server that listens: until then the port may be another
        # process's (taken between free_port and the bind), which a health check would disturb.
        try:
            if (
                listens_on(server.pid, int(port))
                and httpx.get(f"{stack.api_url}/health", timeout=2).status_code == 200
            ):
                return "up"
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            # Prefect's own check before it starts, or uvicorn's bind when the port went after.
            said = log.read_text(errors="replace")
            taken = (f"Port {port} is already in use", f"bind on address ('127.0.0.1', {port})")
            return "port taken" if any(words in said for words in taken) else "failed"
        if time.monotonic() > deadline:
            return "failed"
        time.sleep(0.3)


def signed_delivery(
    receiver_url: str,
    secret: str,
    event: str,
    payload: Mapping[str, Any],
    *,
    delivery_id: str | None = None,
) -> httpx.Response:
    """POST one webhook delivery the way GitHub sends it."""
    from deployments.receiver import signature_header

    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/local",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery_id or str(uuid.uuid4()),
        "X-Hub-Signature-256": signature_header(secret, body),
    }
    return httpx.post(f"{receiver_url}/webhook", content=body, headers=headers, timeout=30)


def issue_comment_payload(
    repo: str, number: int, comment_id: int, body: str, login: str, *, bot: bool = False
) -> dict[str, Any]:
    """An ``issue_comment`` ``created`` delivery for a comment on pull request ``number``, with
    the fields GitHub sends that the mapping reads (its own time: every delivery differs)."""
    user = {"login": login, "id": 7, "type": "Bot" if bot else "User"}
    return {
        "action": "created",
        "issue": {
            "number": number,
            "pull_request": {"url": f"https://api.github.com/repos/{repo}/pulls/{number}"},
        },
        "comment": {
            "id": comment_id,
            "body": body,
            "user": user,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "author_association": "OWNER",  # says nothing about what they may do now
        },
        "repository": {"full_name": repo},
        "sender": user,
    }


def pull_request_payload(
    action: str,
    repo: str,
    number: int,
    head_sha: str,
    *,
    head_repo: str | None = None,
    merged: bool = False,
    labels: tuple[str, ...] = (),
    label: str | None = None,
) -> dict[str, Any]:
    """A ``pull_request`` delivery with the fields GitHub sends that the mapping reads;
    ``label`` is the one a ``labeled``/``unlabeled`` delivery is about."""
    owner = repo.split("/")[0]
    head_repo = head_repo or repo
    return {
        "action": action,
        **({"label": {"name": label}} if label else {}),
        "number": number,
        "pull_request": {
            "number": number,
            "state": "closed" if action == "closed" else "open",
            "title": f"Preview me (#{number})",
            "merged": merged,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "head": {"sha": head_sha, "ref": "feature", "repo": {"full_name": head_repo}},
            "base": {"sha": "0" * 40, "ref": "main", "repo": {"full_name": repo}},
            "user": {"login": owner},
            "labels": [{"name": name} for name in labels],
        },
        "repository": {"full_name": repo, "name": repo.split("/")[1], "owner": {"login": owner}},
        "sender": {"login": owner},
    }
