"""moto as an AWS endpoint in a process of its own, with the scripted instance behind SSM.

moto keeps its state in module globals: a ``ThreadedMotoServer`` inside the test process shares
it with every ``mock_aws()`` of the other tests on that worker, which reset it. In its own
process the installation's account is nobody else's. ``python -m local_stack.moto_server``
prints ``MOTO_URL <url>`` once it answers and serves until stdin closes or a signal arrives.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from local_stack.prefect_server import PROJECT_DIR, die_with_parent, stop_process

READY_PREFIX = "MOTO_URL "


def serve() -> int:
    from moto.server import ThreadedMotoServer

    from local_stack.scripted_instance import ScriptedInstances

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, stop)
    host, port = server.get_host_and_port()
    try:
        with ScriptedInstances().healthy().patched():
            print(f"{READY_PREFIX}http://{host}:{port}", flush=True)
            sys.stdin.read()  # until the parent closes our stdin (or dies)
    finally:
        server.stop()
    return 0


@contextmanager
def moto_process(log: Path) -> Iterator[str]:
    """A moto server process with a healthy scripted instance; yields its endpoint URL."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "local_stack.moto_server"],
            cwd=PROJECT_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            preexec_fn=die_with_parent,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"moto server did not start ({line!r}); see {log}")
        yield line.removeprefix(READY_PREFIX)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        stop_process(process)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None).parse_args(
        argv
    )
    return serve()


if __name__ == "__main__":
    sys.exit(main())
