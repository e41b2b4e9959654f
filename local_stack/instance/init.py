"""PID 1 of a local instance: build its view of the machine, then boot it like cloud-init.

Started by :mod:`local_stack.instance.sandbox` inside fresh mount, network, PID, UTS and IPC
namespaces (``unshare``). In order:

1. per-instance directories are bound over the paths the scripts write (``/var/lib``,
   ``/var/log``, ``/srv``, ``/run``, ...), ``/etc/hosts`` is the instance's own, and every other
   mount becomes read-only (``/tmp`` and the socket directory stay writable);
2. loopback comes up with the instance's private address and the addresses it dials (the
   database's private IP), and the hostname is the instance's ``ip-a-b-c-d``;
3. the relays to the host's services start, and ``<sockets>/in.sock`` lets port forwarding in —
   from then on the "SSM agent" counts as registered (``<sockets>/agent-ready``);
4. the user data runs as root with bash, its output in ``/var/log/cloud-init-output.log``, and
   ``/run/cloud-init/status.json`` follows its progress for the ``cloud-init`` shim;
   — on a restart (a stopped instance started) the user data does not run again: enabled
   units start (dockerd, which restarts the containers whose policy says so; timers), and port
   forwarding is let in only ``session_delay_seconds`` after Run Command (Session Manager's
   reconnection after a start);
5. PID 1 then reaps orphans until the instance is terminated (SIGKILL from the host ends the
   namespace and every process in it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from local_stack.instance.relay import Bridge, RelayLoop

CLOUD_INIT_VERSION = "22.2.2"  # what AL2023 ships
USER_DATA_SCRIPT = "/var/lib/cloud/instance/scripts/part-001"
OUTPUT_LOG = "/var/log/cloud-init-output.log"
STATUS_FILE = "/run/cloud-init/status.json"
UNITS = Path("/var/lib/pr-preview-shim/units")  # the systemctl shim's enabled units
ENABLED_DOCKER = UNITS / "docker.enabled"


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def build_filesystem(config: dict[str, Any]) -> None:
    """Per-instance writable paths over a read-only host."""
    keep = [*config["keep_writable"]]
    for path in keep:
        run("mount", "--bind", path, path)
    for target, source in config["writable"].items():
        Path(target).mkdir(parents=True, exist_ok=True)  # on the host: only missing mountpoints
        run("mount", "--bind", source, target)
    for target, source in config["files"].items():
        run("mount", "--bind", source, target)
    # The local dnf repository: the host's Docker Engine, offered where dnf installs it from.
    for target, source in config["repository"].items():
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).touch()
        run("mount", "--bind", source, target)
    # A stock AL2023 image has no docker: the host's is hidden behind whiteouts (dnf installs
    # it), as absent as a file can be: `command -v docker` finds nothing.
    for directory, names in config["hide"].items():
        whiteouts = Path(config["whiteouts"]) / directory.strip("/").replace("/", "-")
        whiteouts.mkdir(parents=True, exist_ok=True)
        for name in names:
            if not (whiteouts / name).exists():
                os.mknod(whiteouts / name, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        run(
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={whiteouts}:{directory}",
            directory,
        )
    ours = {*keep, *config["writable"], *config["files"]}  # the repository goes read-only
    for mountpoint in mountpoints():
        if mountpoint in ours or mountpoint.startswith(("/proc", "/sys", "/dev")):
            continue
        # A mount that refuses (a special filesystem) stays as it is.
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", mountpoint],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )


def mountpoints() -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    points = [line.split()[4].replace("\\040", " ") for line in lines]
    return sorted(set(points), key=len)


def build_network(config: dict[str, Any]) -> None:
    run("ip", "link", "set", "lo", "up")
    for address in config["addresses"]:
        run("ip", "addr", "add", f"{address}/32", "dev", "lo")
    socket.sethostname(config["hostname"])


def start_relays(config: dict[str, Any]) -> RelayLoop:
    sockets = Path(config["sockets"])
    relays = RelayLoop("instance-relays")
    for index, text in enumerate(config["bridges"]):
        bridge = Bridge.parse(text)
        relays.tcp_to_unix(
            f"out-{index}", bridge.inside_host, bridge.inside_port, sockets / f"out-{index}.sock"
        )
    delay = float(config.get("session_delay_seconds") or 0) if config.get("restart") else 0.0
    if delay:
        timer = threading.Timer(delay, relays.port_chooser, ("in", sockets / "in.sock"))
        timer.daemon = True
        timer.start()
    else:
        relays.port_chooser("in", sockets / "in.sock")
    (sockets / "agent-ready").write_text(str(os.getpid()))
    return relays


def start_units(config: dict[str, Any]) -> int:
    """A restart's boot: cloud-init has nothing left to run, enabled units start (systemd)."""
    write_status("done")
    units = [["docker"]] if ENABLED_DOCKER.exists() else []
    units += [[p.name.removesuffix(".enabled")] for p in sorted(UNITS.glob("*.timer.enabled"))]
    units += [[p.name.removesuffix(".enabled")] for p in sorted(UNITS.glob("*.service.enabled"))]
    status = 0
    with open(OUTPUT_LOG, "ab", buffering=0) as log:
        for unit in units:
            status = as_root(config, ["systemctl", "start", *unit], log) or status
    return status


def as_root(config: dict[str, Any], argv: list[str], log: BinaryIO) -> int:
    """``argv`` as root from ``/`` with the instance's environment, its output in ``log``."""
    env = {**config["env"], "HOME": "/root", "USER": "root", "LOGNAME": "root"}
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd="/",
        check=False,
    ).returncode


def write_status(status: str, **extra: Any) -> None:
    path = Path(STATUS_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "last_update": now(), **extra}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def now() -> str:
    return datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")


def boot(config: dict[str, Any], started: float) -> int:
    """Run the user data as cloud-init's scripts-user module does; returns its exit status."""
    write_status("running", stage="modules-final")
    script = Path(USER_DATA_SCRIPT)
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(Path(config["user_data_file"]).read_text())
    script.chmod(0o700)
    Path(OUTPUT_LOG).parent.mkdir(parents=True, exist_ok=True)
    delay = float(config.get("boot_seconds", 0))
    if delay:
        time.sleep(delay)
    with open(OUTPUT_LOG, "ab", buffering=0) as log:
        log.write(
            f"Cloud-init v. {CLOUD_INIT_VERSION} running 'modules:final' at {now()}."
            f" Up {time.monotonic() - started:.2f} seconds.\n".encode()
        )
        status = (
            as_root(config, ["/bin/bash", str(script)], log) if script.read_text().strip() else 0
        )
        if status != 0:
            log.write(
                f"{now()} - cc_scripts_user.py[WARNING]: Failed to run module scripts-user"
                " (scripts in /var/lib/cloud/instance/scripts)\n"
                f"{now()} - util.py[WARNING]: Running module scripts-user"
                " (<module 'cloudinit.config.cc_scripts_user'>) failed\n".encode()
            )
        log.write(
            f"Cloud-init v. {CLOUD_INIT_VERSION} finished at {now()}. Datasource DataSourceEc2."
            f"  Up {time.monotonic() - started:.2f} seconds\n".encode()
        )
    if status == 0:
        write_status("done")
    else:
        write_status(
            "error",
            errors=[
                "('scripts_user', RuntimeError('Runparts: 1 failures (part-001) in 1 attempted"
                " commands'))"
            ],
        )
    return status


def reap_forever() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(0.5)


def main(argv: list[str]) -> int:
    started = time.monotonic()
    config = json.loads(Path(argv[0]).read_text())
    build_filesystem(config)
    build_network(config)
    start_relays(config)
    if config.get("restart"):
        start_units(config)
    else:
        boot(config, started)
    reap_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
