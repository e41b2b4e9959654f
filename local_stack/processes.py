"""The local stack's child processes: a free port to give one, and a lifetime tied to ours.

Every server the stack starts (moto, PostgreSQL, the Prefect server and its workers, an
instance's sandbox) is started with ``die_with_parent`` and stopped with ``stop_process``, so a
demo or a test that dies leaves nothing running.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
from pathlib import Path

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` (or a child of it) holds a TCP socket listening on ``port`` of
    127.0.0.1 — read from /proc, so nothing is sent to whatever else may hold the port."""
    owned = set()
    for process in [pid, *_children(pid)]:
        try:
            descriptors = list(Path(f"/proc/{process}/fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                link = os.readlink(descriptor)
            except OSError:  # closed since it was listed (the listing's own, for one)
                continue
            if link.startswith("socket:["):
                owned.add(link[8:-1])
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in table:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.split(":")[1], 16) == port and inode in owned:
            return True
    return False


def _children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(child) for child in found]


def die_with_parent() -> None:
    """``preexec_fn``: the child leads a process group of its own (so stopping it takes its
    children, the worker's flow runs, along) and gets SIGTERM when its parent dies (Linux)."""
    os.setpgid(0, 0)
    _death_signal(signal.SIGTERM)


def killed_with_parent() -> None:
    """``preexec_fn`` for a child that ignores SIGTERM by design: ``unshare --fork`` leaves
    SIGTERM and SIGINT to the process it forked, so a local instance would outlive a runtime
    that died without stopping it. SIGKILL then, and ``--kill-child`` takes the instance."""
    os.setpgid(0, 0)
    _death_signal(signal.SIGKILL)


def _death_signal(signum: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signum)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then a second signal, then SIGKILL (the process worker ignores a lone SIGTERM);
    then whatever is left of its process group."""
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            if process.poll() is not None:
                return
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout / 2)
                return
            except subprocess.TimeoutExpired:
                continue
        process.kill()
        process.wait(timeout=timeout)
    finally:
        # Started with die_with_parent: the group's id is the process's own.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
