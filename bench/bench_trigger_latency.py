"""Event → flow-run-start latency on a local Prefect server (issue 6).

Sends signed `pull_request.closed` deliveries (the cheapest flow) through the receiver, one at
a time, and measures per delivery: receiver answer, flow run created (trigger fired), and flow
run started by the process worker (PREFECT_WORKER_QUERY_SECONDS=1). Prints median and max.

    .venv/bin/python bench/bench_trigger_latency.py [--deliveries 12]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = "octo-org/hello-api"
SECRET = "bench-secret"


def parse(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deliveries", type=int, default=12)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="ap-northeast-1",
        DO_NOT_TRACK="1",
    )
    os.environ.pop("PREFECT_API_URL", None)
    from deployments.receiver import create_app
    from local_stack.account import create_demo_account
    from local_stack.prefect_server import prefect_stack, pull_request_payload, signed_delivery
    from local_stack.serve import serve_asgi
    from tasks.cloud.aws import build_clients
    from tasks.config import VARIABLE_NAME, PreviewConfig

    account = create_demo_account(build_clients(PreviewConfig()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, prefect_stack(Path(tmp)) as stack:
        stack.set_variable(VARIABLE_NAME, account.config_values())
        stack.deploy()
        stack.start_worker(Path(tmp) / "worker.log")
        with serve_asgi(create_app(SECRET, prefect_api_url=stack.api_url)) as receiver:
            # Warm-up: the first run pays for the worker's first poll and imports.
            payload = pull_request_payload("closed", REPO, 1, "a" * 40)
            signed_delivery(receiver, SECRET, "pull_request", payload)
            stack.wait_for_runs("pr-teardown/pr-teardown", 1, timeout=120)
            for n in range(args.deliveries):
                payload = pull_request_payload("closed", REPO, 100 + n, "b" * 40)
                sent = time.time()
                answer = signed_delivery(receiver, SECRET, "pull_request", payload)
                answered = time.time()
                assert answer.status_code == 200, answer.text
                runs = stack.wait_for_runs("pr-teardown/pr-teardown", n + 2, timeout=120)
                run = runs[-1]
                rows.append(
                    (
                        answered - sent,
                        parse(run["created"]) - sent,
                        parse(run["start_time"]) - sent,
                    )
                )
    moto.stop()

    print(f"event → flow run latency, local Prefect server, {len(rows)} deliveries")
    print(f"{'stage':<34}{'median s':>10}{'max s':>10}")
    for index, name in enumerate(
        [
            "receiver answered (event posted)",
            "flow run created (trigger)",
            "flow run started (worker)",
        ]
    ):
        values = [row[index] for row in rows]
        print(f"{name:<34}{statistics.median(values):>10.2f}{max(values):>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
