"""A flow run's start in its ECS container: Prefect's default command against the engine itself.

prefect-aws's ECS worker runs ``prefect flow-run execute`` unless the job's command says
otherwise: a supervisor interpreter that starts the engine as a second one. The process pool
names the engine (``python -m prefect.engine``, deployments/pools); the ECS pool keeps the
supervisor, which cancels a running run (the worker does not). This measures what that costs in
the ECS world of ``tests/test_ecs_pool.py`` (moto, prefect-aws's worker, the flow
image on a real Docker Engine as ECS's data plane). Sweeps (``dry_run``) one at a time,
alternating the two commands as the run's ``command`` job variable, after one warm-up run of
each (its task definition registered, the image pulled). Per run: created → container started
(the worker's poll, RegisterTaskDefinition/RunTask, the data plane's start), container started
→ Running (the interpreters' start: imports, the flow run read, the pull step, the flow
loaded), Running → Completed, Completed → container exited. Prints medians and the ratio.

    .venv/bin/python bench/bench_ecs_command.py [--runs 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT = "prefect flow-run execute"  # prefect-aws's, from Prefect's base job configuration
ENGINE = "python3 -m prefect.engine"
COMMANDS = (DEFAULT, ENGINE)
STAGES = ("created → container", "container → Running", "Running → Completed", "→ exited")


def one_run(world: object, command: str) -> dict[str, float]:
    from local_stack.ecs_tasks import wait_for
    from tests.support.ecs_world import EcsWorld

    assert isinstance(world, EcsWorld)
    run_id = world.start_run("ttl-sweeper/ttl-sweeper", {"dry_run": True}, command=command)
    final = world.wait_final(run_id, timeout=300)
    if final["state_type"] != "COMPLETED":
        raise SystemExit(f"{command}: run ended {final['state']}")
    task = world.plane.runs[world.task_of(run_id)["taskArn"]]
    wait_for(lambda: task.finished_at is not None, 60)
    assert task.started_at is not None and task.finished_at is not None
    created, running, completed = (
        datetime.fromisoformat(final[key]) for key in ("created", "start_time", "end_time")
    )
    return {
        STAGES[0]: (task.started_at - created).total_seconds(),
        STAGES[1]: (running - task.started_at).total_seconds(),
        STAGES[2]: (completed - running).total_seconds(),
        STAGES[3]: (task.finished_at - completed).total_seconds(),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=4, help="measured runs of each command")
    args = parser.parse_args()

    from tests.support.ecs_world import running_ecs_world

    rows: dict[str, list[dict[str, float]]] = {name: [] for name in COMMANDS}
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="bench-ecs-") as tmp,
        running_ecs_world(Path(tmp)) as world,
    ):
        for command in COMMANDS:
            one_run(world, command)  # warm-up: its task definition, the image on the engine
        for _ in range(args.runs):
            for command in COMMANDS:
                rows[command].append(one_run(world, command))
    print(
        f"\n{args.runs} sweeps (dry run) per command, one at a time, alternating;"
        f" {time.monotonic() - started:.0f} s in all. Medians, seconds:"
    )
    print(f"{'command':<28}" + "".join(f"{stage:>22}" for stage in STAGES) + f"{'total':>10}")
    totals = {}
    for name, found in rows.items():
        medians = [statistics.median(row[stage] for row in found) for stage in STAGES]
        totals[name] = statistics.median(sum(row.values()) for row in found)
        print(
            f"{name:<28}"
            + "".join(f"{value:>22.2f}" for value in medians)
            + f"{totals[name]:>10.2f}"
        )
    default, engine = (statistics.median(row[STAGES[1]] for row in rows[name]) for name in COMMANDS)
    print(
        f"container → Running: the engine itself takes {engine / default:.2f}× the default's"
        f" time ({engine - default:+.2f} s); created → exited {totals[ENGINE]:.2f} s against"
        f" {totals[DEFAULT]:.2f} s ({totals[ENGINE] / totals[DEFAULT]:.2f}×)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
