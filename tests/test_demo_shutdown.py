"""`make demo KEEP=1` runs the whole lifecycle green, and SIGTERM or SIGHUP stops it (at the
end, or while the stack is still starting) leaving nothing running, as Ctrl+C does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from local_stack.prefect_server import PROJECT_DIR

pytestmark = pytest.mark.server


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize(
    ("signum", "when"),
    [
        (signal.SIGTERM, "the stack stays up"),  # the whole demo ran; KEEP=1 holds it
        (signal.SIGHUP, "Prefect Variable"),  # still starting: the server is up, no deployment yet
    ],
)
def test_a_signal_stops_the_demo_and_every_process_it_started(signum: int, when: str) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "local_stack.demo", "--keep"],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert demo.stdout is not None
    seen = []
    deadline = time.monotonic() + 240
    for line in demo.stdout:  # until `when`: moto, PostgreSQL and the server (and more) run
        seen.append(line)
        if when in line or time.monotonic() > deadline:
            break
    output = "".join(seen)
    assert when in output, output
    if "stays up" in when:
        assert "━━ Done" in output and "✗" not in output, output
        assert output.count(" Completed ") == 4, output  # open, push, /preview extend, close
        moved = next(line for line in output.splitlines() if "(tag and instance timer)" in line)
        before, after = moved.split("shutdown-at ")[1].split(" (")[0].split(" → ")
        assert after > before, moved  # ISO times: the later sorts last
    started = descendants(demo.pid)
    assert len(started) >= 3, "the demo should have started moto, PostgreSQL and a Prefect server"

    demo.send_signal(signum)
    demo.communicate(timeout=60)

    assert demo.returncode == 128 + signum
    time.sleep(1)
    left = sorted(pid for pid in started if alive(pid))
    assert left == [], f"still running after the demo stopped: {left}"
