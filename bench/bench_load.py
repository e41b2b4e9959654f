"""Load through the real trigger path, past one machine (issue 18).

N PRs opened and 3 pushes to each within a window (default 100 PRs, 400 deliveries in 60 s):
signed deliveries → the receiver (with its spool, as ``pr-preview receiver`` runs) → Prefect
events → deployment triggers → flow runs on process workers → moto with the scripted instance,
timed by the latency model (bench/latency_model.py: boot, SSM agent, bootstrap, deploy, migrate
and probe, × ``--scale``; moto's API answers at once). ``max_previews`` is larger than the PR
count, so every PR keeps its preview.

For each configuration — the Prefect server on SQLite or on PostgreSQL, 1 or 4 process workers
on the one pool (its concurrency limit stays the stack's 4 runs at a time) — it prints:
deliveries accepted, events stored, runs created, runs Crashed/Failed, server 5xx (uvicorn's
access log), p50/p95 webhook→run created, →run start (a run for the delivery, or for a
later delivery to its PR — which reads the PR's head from GitHub — started) and →ready (a run
that deployed ended Completed), peak RSS of the server, the workers with their flow-run
processes and PostgreSQL, the CPU each used and how busy the whole machine was, and the
bottleneck named from those numbers. A delivery not picked up when ``--timeout`` ends counts
as later than every other: a percentile that falls on one prints ``unf``. Then whether
PostgreSQL + 4 meets the targets: 0 lost deliveries, 0 Crashed, 0 5xx, one live preview per PR
at its newest sha, p95 webhook→run start ≤ 5 s.

    .venv/bin/python bench/bench_load.py          # all four, 100 PRs: ~60 min on 2 cores
    .venv/bin/python bench/bench_load.py --prs 20 --config postgres-4 --timeout 300
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = {
    "sqlite-1": ("sqlite", 1),
    "sqlite-4": ("sqlite", 4),
    "postgres-1": ("postgres", 1),
    "postgres-4": ("postgres", 4),
}
PREVIEW = "pr-preview/pr-preview"
TEARDOWN = "pr-teardown/pr-teardown"
PUSHES = 3
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = 200
TARGET_P95_START = 5.0


# --- the moto server, with the latency model behind its scripted instance ------------------


def serve_modelled_moto(scale: float) -> int:
    """The child process: moto + the scripted instance on the model's timelines. Speaks
    ``local_stack.moto_server``'s protocol (prints ``MOTO_URL``, serves until stdin closes)."""
    import logging

    from moto.ec2.models.instances import InstanceBackend
    from moto.server import ThreadedMotoServer

    from bench.latency_model import LatencyModel
    from local_stack.moto_server import READY_PREFIX
    from local_stack.scripted_instance import ScriptedInstances

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    model = LatencyModel(scale)
    fake = model.script(ScriptedInstances().healthy())
    run_instances, terminate_instances = (
        InstanceBackend.run_instances,
        InstanceBackend.terminate_instances,
    )

    def launched(backend: Any, *args: Any, **kwargs: Any) -> Any:
        reservation = run_instances(backend, *args, **kwargs)
        for instance in reservation.instances:
            model.world.launched(instance.id, time.monotonic(), instance.image_id)
            model.agent_offline_until_registered(fake, instance.id)
        return reservation

    def terminating(backend: Any, instance_ids: list[str]) -> Any:
        for instance_id in instance_ids:
            model.world.terminating(instance_id, time.monotonic())
        return terminate_instances(backend, instance_ids)

    setattr(InstanceBackend, "run_instances", launched)  # noqa: B010  (a patch)
    setattr(InstanceBackend, "terminate_instances", terminating)  # noqa: B010
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with fake.patched():
        server.start()
        host, port = server.get_host_and_port()
        print(f"{READY_PREFIX}http://{host}:{port}", flush=True)
        try:
            for _ in sys.stdin:  # the installation's brakes: nothing to brake here
                pass
        finally:
            server.stop()
    return 0


# --- what the processes use ------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            found.setdefault(parent, []).append(int(entry))
    return found


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every core since boot (/proc/stat): everyone's processes."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return float(sum(fields) - idle), float(sum(fields))


def cpu_seconds(pid: int) -> float:
    """The process's CPU and that of the children it reaped (flow runs, PostgreSQL backends)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


@dataclass
class Usage:
    """Peak resident memory per group of processes (each with everything below it), sampled."""

    roots: dict[str, list[int]]
    peak_mb: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        children = _children()
        for group, roots in self.roots.items():
            pids = [pid for root in roots for pid in _tree(root, children)]
            total = sum(_rss_mb(pid) for pid in pids)
            self.peak_mb[group] = max(self.peak_mb.get(group, 0.0), total)

    @contextmanager
    def sampling(self, every: float = 0.5) -> Iterator[Usage]:
        def loop() -> None:
            while not self._stop.wait(every):
                self.sample()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


# --- one configuration ----------------------------------------------------------------------


@dataclass
class Sent:
    pr: int
    sha: str
    at: float  # epoch seconds
    status: int


@dataclass
class Row:
    name: str
    sent: int
    accepted: int
    events: int
    runs: int
    crashed: int
    failed: int
    superseded: int
    unfinished: int
    server_5xx: int
    created: list[float]
    started: list[float]
    ready: list[float]
    live_ok: int
    prs: int
    peak_mb: dict[str, float]
    cpu: dict[str, float]
    wall: float
    machine_busy: float = 0.0  # share of all cores busy meanwhile, other users' work included
    finished_per_minute: float = 0.0
    durations: list[float] = field(default_factory=list)  # run start → end
    failures: list[str] = field(default_factory=list)
    bottleneck: str = ""
    folded: int = 0  # cancelled before they started (flows/coalesce.py)
    ran: int = 0  # runs that started an interpreter
    own_start: list[float] = field(default_factory=list)  # webhook → its own run started
    limits: list[int] = field(default_factory=list)  # concurrency limits: before, loaded, closed
    teardowns_ok: int = 0
    limits_left: list[str] = field(default_factory=list)
    live_after_close: int = 0


def _epoch(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else None


def _fmt(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds != float("inf") else "unf"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def deliver_all(installation: Any, prs: list[int], seconds: float) -> list[Sent]:
    """Open every PR, then push to each ``PUSHES`` times, evenly over ``seconds``."""
    plan = [(n, pr, f"{pr:04d}{n:04d}".ljust(40, "a")) for n in range(PUSHES + 1) for pr in prs]
    gap = seconds / len(plan)
    start = time.monotonic()

    def send(index: int) -> Sent:
        n, pr, sha = plan[index]
        time.sleep(max(0.0, start + index * gap - time.monotonic()))
        at = time.time()
        answer = installation.deliver("opened" if n == 0 else "synchronize", pr, sha)
        return Sent(pr, sha, at, answer.status_code)

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(send, range(len(plan))))


def all_runs(stack: Any, name: str = PREVIEW) -> list[dict[str, Any]]:
    with stack.client() as http:
        deployment = http.get(f"/deployments/name/{name}").json()["id"]
        runs: list[dict[str, Any]] = []
        while True:
            page = http.post(
                "/flow_runs/filter",
                json={
                    "deployments": {"id": {"any_": [deployment]}},
                    "sort": "EXPECTED_START_TIME_ASC",
                    "limit": PAGE,
                    "offset": len(runs),
                },
            )
            page.raise_for_status()
            runs += page.json()
            if len(page.json()) < PAGE:
                return runs


def wait_drained(
    stack: Any, expected: int, timeout: float, deployment: str = PREVIEW
) -> list[dict[str, Any]]:
    """Until ``expected`` runs of ``deployment`` exist and all have finished (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = all_runs(stack, deployment)
        done = [
            r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        ]
        if (len(runs) >= expected and len(done) == len(runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(3)


def limit_names(stack: Any) -> list[str]:
    """The server's global concurrency limits (the fleet lock, one per PR in use, …)."""
    with stack.client() as http:
        names: list[str] = []
        while True:
            page = http.post(
                "/v2/concurrency_limits/filter", json={"offset": len(names), "limit": PAGE}
            )
            page.raise_for_status()
            names += [limit["name"] for limit in page.json()]
            if len(page.json()) < PAGE:
                return sorted(names)


def events_stored(stack: Any, since: float) -> int:
    with stack.client() as http:
        counts = http.post(
            "/events/count-by/event",
            json={
                "filter": {
                    "occurred": {
                        "since": datetime.fromtimestamp(since - 60).astimezone().isoformat(),
                        "until": datetime.fromtimestamp(time.time() + 60).astimezone().isoformat(),
                    },
                    "event": {"prefix": ["github.pull_request."]},
                }
            },
        )
        counts.raise_for_status()
        return sum(int(item["count"]) for item in counts.json())


def server_5xx(log: Path) -> int:
    """Answers of 500 and above in uvicorn's access log (PREFECT_SERVER_LOGGING_LEVEL=INFO)."""
    text = log.read_text(errors="replace")
    return len(re.findall(r'HTTP/1\.1" 5\d\d', text))


def run_config(
    name: str,
    prs: int,
    seconds: float,
    scale: float,
    timeout: float,
    home: Path | None,
    close: bool = True,
) -> Row:
    from tests.support.installation import running_installation
    from tests.support.moto_state import live, tags

    db, workers = CONFIGS[name]
    moto = [sys.executable, str(Path(__file__).resolve()), "--serve-moto", str(scale)]
    os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "INFO"  # uvicorn's access log: the 5xx count
    numbers = list(range(1000, 1000 + prs))
    with (
        tempfile.TemporaryDirectory(prefix=f"bench-load-{name}-") as tmp,
        running_installation(
            home / name if home else Path(tmp),
            db=db,
            workers=workers,
            moto_command=moto,
            spool=True,
        ) as found,
    ):
        stack = found.stack
        found.configure(max_previews=prs + 10)
        roots = {
            "server": [stack.processes[0].pid],
            "workers+runs": [process.pid for process in stack.processes[1:]],
            "postgres": [stack.database.postgres.process.pid] if stack.database else [],
            "moto": [found.moto.process.pid],
        }
        limits_before = len(limit_names(stack))
        cpu_before = {group: sum(cpu_seconds(pid) for pid in pids) for group, pids in roots.items()}
        self_before = resource.getrusage(resource.RUSAGE_SELF)
        busy_before = machine_busy()
        began = time.time()
        with Usage(roots).sampling() as usage:
            sent = deliver_all(found, numbers, seconds)
            accepted = [s for s in sent if s.status in (200, 202)]
            runs = wait_drained(stack, len(accepted), timeout)
        wall = time.time() - began
        busy_after = machine_busy()
        self_after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = {
            group: sum(cpu_seconds(pid) for pid in pids) - cpu_before[group]
            for group, pids in roots.items()
        }
        cpu["bench (receiver, fakes)"] = (self_after.ru_utime + self_after.ru_stime) - (
            self_before.ru_utime + self_before.ru_stime
        )
        events = events_stored(stack, began)
        when = {s.sha: s.at for s in accepted}
        sent_by_sha = {s.sha: s for s in accepted}
        created, ready, durations, failures, own_start = [], [], [], [], []
        ran: dict[int, list[tuple[float, float]]] = {}  # PR → (delivered, started) of runs that ran
        for run in runs:
            at = when.get(run["parameters"].get("head_sha", ""))
            if at is None:
                continue
            created.append((_epoch(run["created"]) or at) - at)
            start = _epoch(run["start_time"])
            if run["run_count"] and start is not None:  # a cancelled run gets a start_time too
                ran.setdefault(sent_by_sha[run["parameters"]["head_sha"]].pr, []).append(
                    (at, start)
                )
                own_start.append(start - at)
            end = _epoch(run["end_time"])
            if run["state_name"] == "Completed" and end is not None:
                ready.append(end - at)
            if start is not None and end is not None:
                durations.append(end - start)
            if run["state_type"] in ("FAILED", "CRASHED"):
                failures.append(f"{run['name']}: {run['state_name']} {run['state']['message']}")
        # A delivery is picked up when a run for it, or for a later delivery to its PR (which
        # reads the PR's head from GitHub), starts; one never picked up counts as later than all.
        started = []
        for s in accepted:
            covering = [start for at, start in ran.get(s.pr, []) if at >= s.at]
            started.append(min(covering) - s.at if covering else float("inf"))
        newest = {pr: sha for s in accepted for pr, sha in [(s.pr, s.sha)]}
        by_pr: dict[int, list[str]] = {}
        for instance in live(found.aws):
            labels = tags(instance)
            if labels.get("PR", "").isdigit():
                by_pr.setdefault(int(labels["PR"]), []).append(labels.get("Sha", ""))
        live_ok = sum(1 for pr in numbers if by_pr.get(pr) == [newest.get(pr)])
        states = [run["state_type"] for run in runs]
        # A delivery that made no run counts as never created and never started.
        created += [float("inf")] * max(0, len(accepted) - len(created))
        ended = [e for run in runs if (e := _epoch(run["end_time"])) is not None]
        row = Row(
            name=name,
            sent=len(sent),
            accepted=len(accepted),
            events=events,
            runs=len(runs),
            crashed=states.count("CRASHED"),
            failed=states.count("FAILED"),
            superseded=sum(1 for run in runs if run["state_name"] == "Superseded"),
            folded=sum(1 for run in runs if run["state_type"] == "CANCELLED"),
            ran=sum(1 for run in runs if run["run_count"]),
            own_start=own_start,
            unfinished=sum(
                1 for s in states if s not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            ),
            server_5xx=server_5xx(stack.home / "server.log"),
            created=created,
            started=started,
            ready=ready,
            live_ok=live_ok,
            prs=prs,
            peak_mb=dict(usage.peak_mb),
            cpu=cpu,
            wall=wall,
            machine_busy=(busy_after[0] - busy_before[0]) / (busy_after[1] - busy_before[1]),
            finished_per_minute=60 * len(ended) / wall if wall else 0.0,
            durations=durations,
            failures=failures,
            limits=[limits_before, len(limit_names(stack))],
        )
        if close:
            # Every PR closes: each teardown deletes its PR's lock, so locks do not accumulate.
            for pr in numbers:
                found.deliver("closed", pr, newest[pr])
            teardowns = wait_drained(stack, prs, timeout, TEARDOWN)
            row.limits_left = limit_names(stack)
            row.limits.append(len(row.limits_left))
            row.teardowns_ok = sum(1 for run in teardowns if run["state_type"] == "COMPLETED")
            row.live_after_close = sum(
                1 for instance in live(found.aws) if tags(instance).get("PR", "").isdigit()
            )
    os.environ.pop("PREFECT_SERVER_LOGGING_LEVEL", None)
    row.bottleneck = bottleneck(row)
    return row


def bottleneck(row: Row) -> str:
    """Named from the measurements: how busy the cores were (ours and everyone's), who used
    them, and where a run waited longest."""
    cores = os.cpu_count() or 1
    total = sum(row.cpu.values())
    ours = total / (cores * row.wall) if row.wall else 0.0
    top, top_cpu = max(row.cpu.items(), key=lambda item: item[1])
    waited_trigger = _pct(row.created, 0.5)
    waited_start = _pct(row.started, 0.5) - waited_trigger
    longest = (
        "the server's reactive triggers (event → run created, one event at a time)"
        if waited_trigger > waited_start
        else "the pool's queue and process start (run created → started: 4 runs at a time,"
        " each a fresh interpreter importing Prefect)"
    )
    shares = ", ".join(
        f"{group} {seconds / total:.0%}"
        for group, seconds in sorted(row.cpu.items(), key=lambda item: -item[1])
        if total and seconds / total >= 0.03
    )
    verdict = "CPU-bound" if row.machine_busy >= 0.85 else "not CPU-bound"
    return (
        f"{verdict}: the {cores} cores {row.machine_busy:.0%} busy ({ours:.0%} ours) for"
        f" {row.wall:.0f} s; {top} used the most ({top_cpu:.0f} CPU-s; {shares}); the longest"
        f" wait is {longest}: median {_fmt(waited_trigger)} s webhook→created,"
        f" {_fmt(waited_start)} s created→started; {row.finished_per_minute:.1f} runs"
        " finished a minute"
    )


# --- printing -------------------------------------------------------------------------------


def print_table(rows: list[Row], scale: float) -> None:
    print()
    print(
        f"Load through the real trigger path: {rows[0].prs} PRs × (open + {PUSHES} pushes);"
        f" latency model × {scale}; {os.cpu_count()} cores"
    )
    header = (
        f"{'config':<11}{'accepted':>9}{'events':>7}{'runs':>5}{'crash':>6}{'fail':>5}{'5xx':>5}"
        f"{'→created p50/p95':>18}{'→start p50/p95':>16}{'→ready p50/p95':>16}"
        f"{'RSS MB srv/wrk/pg':>19}{'live@newest':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        rss = "/".join(
            f"{row.peak_mb.get(group, 0):.0f}" for group in ("server", "workers+runs", "postgres")
        )
        print(
            f"{row.name:<11}{row.accepted:>5}/{row.sent:<3}{row.events:>7}{row.runs:>5}"
            f"{row.crashed:>6}{row.failed:>5}{row.server_5xx:>5}"
            f"{_fmt(_pct(row.created, 0.5)):>9}/{_fmt(_pct(row.created, 0.95)):<8}"
            f"{_fmt(_pct(row.started, 0.5)):>8}/{_fmt(_pct(row.started, 0.95)):<7}"
            f"{_fmt(_pct(row.ready, 0.5)):>8}/{_fmt(_pct(row.ready, 0.95)):<7}"
            f"{rss:>19}{row.live_ok:>8}/{row.prs:<3}"
        )
    print()
    for row in rows:
        extra = f", {row.unfinished} unfinished" if row.unfinished else ""
        print(
            f"{row.name}: {row.superseded} superseded ({row.folded} cancelled before they"
            f" started), {row.ran} runs started{extra}; {row.bottleneck}"
        )
        if row.own_start:
            print(
                f"  webhook→its own run started (runs that ran): p50"
                f" {_pct(row.own_start, 0.5):.1f} s, p95 {_pct(row.own_start, 0.95):.1f} s"
            )
        if row.durations:
            print(
                f"  run start→end p50 {_pct(row.durations, 0.5):.1f} s,"
                f" p95 {_pct(row.durations, 0.95):.1f} s"
            )
        if len(row.limits) == 3:
            print(
                f"  concurrency limits: {row.limits[0]} before, {row.limits[1]} after the load,"
                f" {row.limits[2]} after closing every PR ({row.teardowns_ok}/{row.prs} teardowns"
                f" Completed, {row.live_after_close} previews left running): "
                + ", ".join(row.limits_left)
            )
        for failure in row.failures[:3]:
            print(f"  {failure[:300]}")
    base = next((row for row in rows if row.name == "sqlite-1"), None)
    if base and len(rows) > 1:
        print()
        for row in rows:
            if row is not base and base.finished_per_minute and base.started and row.started:
                print(
                    f"{row.name} / sqlite-1: runs finished a minute ×"
                    f" {row.finished_per_minute / base.finished_per_minute:.2f},"
                    f" p50 →start × {_pct(row.started, 0.5) / _pct(base.started, 0.5):.2f}"
                )
    target = next((row for row in rows if row.name == "postgres-4"), None)
    if target:
        lost = target.accepted - target.runs
        checks = {
            "0 lost deliveries": lost == 0 and target.accepted == target.sent,
            "0 Crashed": target.crashed == 0,
            "0 server 5xx": target.server_5xx == 0,
            "one live preview per PR at its newest sha": target.live_ok == target.prs,
            f"p95 webhook→run start ≤ {TARGET_P95_START:g} s": _pct(target.started, 0.95)
            <= TARGET_P95_START,
        }
        if len(target.limits) == 3:
            checks["concurrency limits back to their count before"] = (
                target.limits[2] <= target.limits[0] + 1  # + the fleet lock, made on first use
            )
        print()
        print(
            "postgres-4 targets: "
            + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in checks.items())
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--prs", type=int, default=100)
    parser.add_argument(
        "--seconds", type=float, help="the window the deliveries fill (default: 0.6 s per PR)"
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--scale", type=float, default=0.05, help="modelled AWS time × this")
    parser.add_argument("--timeout", type=float, default=2400, help="per configuration")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--no-close", action="store_true", help="leave the PRs open (no teardowns, no lock count)"
    )
    parser.add_argument("--home", type=Path, help="keep each configuration's logs here")
    parser.add_argument("--serve-moto", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_moto is not None:
        return serve_modelled_moto(args.serve_moto)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    seconds = args.seconds if args.seconds is not None else 0.6 * args.prs
    rows = []
    for name in args.config or list(CONFIGS):
        print(
            f"{name}: {args.prs} PRs, {args.prs * (PUSHES + 1)} deliveries in {seconds:g} s …",
            flush=True,
        )
        rows.append(
            run_config(
                name, args.prs, seconds, args.scale, args.timeout, args.home, not args.no_close
            )
        )
        print_table(rows, args.scale)
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
