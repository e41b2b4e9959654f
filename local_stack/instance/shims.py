"""What a local instance cannot be, played honestly: dnf, systemctl, shutdown, cloud-init, aws.

Each is a command in ``local_stack/instance/bin`` (first on the instance's PATH) that runs
``python -m local_stack.instance.shims <name> <args>``. They keep their state in the instance's
own writable paths, answer in the real tool's words and exit codes for the forms the project's
scripts use, and refuse any other form loudly (exit 2), so a script that grows a new call fails
in the tests instead of passing against a shim that nods.

- ``dnf``/``yum``: ``install`` knows what AL2023 has (docker yes, docker-compose-plugin no) and
  puts the real Docker Engine (the host's, offered in the instance's local repository) in the
  instance's own /usr/local/bin; ``PR_PREVIEW_DNF_SECONDS`` models its duration,
  ``PR_PREVIEW_DNF_OFFLINE=1`` its repository being out of reach.
- ``systemctl``: the docker unit — ``enable --now``/``start`` runs the real dockerd in the
  instance's namespaces (its own data root, overlay2), ``stop``, ``status``, ``is-active`` —
  timer units from /etc/systemd/system (``daemon-reload``, ``enable --now``, ``start``,
  ``stop``, ``is-active``): a process of the instance runs the service on the timer's schedule —
  and long-running service units there (the same verbs and ``restart``): a process of the
  instance runs ``ExecStart``, again after it ends with ``Restart=always``.
- ``shutdown -h +N``: writes ``/run/pr-preview/shutdown-at``; the host terminates the instance
  in moto when it is due (instance-initiated shutdown behaviour: terminate).
- ``cloud-init status [--long] [--wait]``: from ``/run/cloud-init/status.json``, which the
  instance's init keeps.
- ``aws``: ``ssm get-parameter``, ``ssm get-parameters-by-path`` and ``ecr get-login-password``
  (real calls to the moto server at ``AWS_ENDPOINT_URL``), and on the host ``ssm
  start-session`` with ``AWS-StartPortForwardingSession``: a relay into the instance's port through
  ``$PR_PREVIEW_RUNTIME_ROOT/<instance>/sockets/in.sock``, standing in for Session Manager.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

STATUS_FILE = Path("/run/cloud-init/status.json")
SHUTDOWN_FILE = Path("/run/pr-preview/shutdown-at")
DOCKER_SOCKET = Path("/var/run/docker.sock")
DOCKERD_PID = Path("/run/docker.pid")
MIRROR_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
MIRROR_URL = re.compile(r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?/?")
UNITS = Path("/var/lib/pr-preview-shim/units")
SYSTEM_UNITS = Path("/etc/systemd/system")
TIMERS = Path("/run/pr-preview-shim/timers")  # the started units' processes, gone at a stop
UNIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# What AL2023's repositories answer for the packages the user data asks for.
AL2023_PACKAGES = {"docker": "docker-25.0.8-1.amzn2023.0.1.x86_64"}


def refuse(tool: str, argv: list[str]) -> int:
    print(f"{tool} (local instance shim): unsupported arguments {argv!r}", file=sys.stderr)
    return 2


def dnf(argv: list[str]) -> int:
    args = [a for a in argv if a not in ("-y", "-q", "--assumeyes", "--quiet")]
    if not args or args[0] != "install":
        return refuse("dnf", argv)
    time.sleep(float(os.environ.get("PR_PREVIEW_DNF_SECONDS", "0") or 0))
    if os.environ.get("PR_PREVIEW_DNF_OFFLINE") == "1":
        print(
            "Amazon Linux 2023 repository                    0.0  B/s |   0  B     00:00\n"
            "Errors during downloading metadata for repository 'amazonlinux':\n"
            "  - Curl error (6): Couldn't resolve host name for"
            " https://al2023-repos-ap-northeast-1-de612dc2.s3.dualstack.ap-northeast-1.amazonaws.com"
            "/core/mirrors/latest/x86_64/mirror.list [Could not resolve host]\n"
            "Error: Failed to download metadata for repo 'amazonlinux': Cannot download repomd.xml:"
            " Cannot download repodata/repomd.xml: All mirrors were tried",
            file=sys.stderr,
        )
        return 1
    missing = [name for name in args[1:] if name not in AL2023_PACKAGES]
    if missing:
        for name in missing:
            print(f"No match for argument: {name}")
        print(f"Error: Unable to find a match: {' '.join(missing)}", file=sys.stderr)
        return 1
    print("Dependencies resolved.")
    for name in args[1:]:
        install(name)
        print(f"Installed:\n  {AL2023_PACKAGES[name]}")
    print("\nComplete!")
    return 0


def install(package: str) -> None:
    """Put the package's commands on the instance: /usr/local/bin is the instance's own, and
    the local repository (``sandbox.REPOSITORY``) holds the host's Docker Engine."""
    from local_stack.instance.sandbox import REPOSITORY

    source = Path(REPOSITORY) / package
    for command in sorted(source.iterdir()):
        target = Path("/usr/local/bin") / command.name
        target.unlink(missing_ok=True)
        target.symlink_to(command)


def systemctl(argv: list[str]) -> int:
    args = [a for a in argv if a != "--no-pager"]
    if args == ["daemon-reload"]:
        return 0  # unit files are read when a unit starts
    named = [a for a in args if not a.startswith("-")][1:]
    if named and all(name.endswith(".timer") for name in named):
        return timer_units(args[0], [name.removesuffix(".timer") for name in named], args)
    units = [a.removesuffix(".service") for a in args if not a.startswith("-")][1:]
    if units and "docker" not in units and all(is_service_unit(name) for name in units):
        return service_units(args[0], units, args)
    if not args or units != ["docker"]:
        if units and units != ["docker"]:
            print(f"Unit {units[0]}.service could not be found.", file=sys.stderr)
            return 4 if args[0] == "status" else 5
        return refuse("systemctl", argv)
    verb = args[0]
    if shutil.which("dockerd") is None:  # the unit comes with the package
        print("Failed to enable unit: Unit file docker.service does not exist.", file=sys.stderr)
        if verb in ("status", "is-active"):
            print("Unit docker.service could not be found.", file=sys.stderr)
            return 4
        return 1
    UNITS.mkdir(parents=True, exist_ok=True)
    if verb in ("enable", "start", "restart"):
        if verb == "restart":
            stop_dockerd()
        if verb != "enable" or "--now" in args:
            started = start_dockerd()
            if started != 0:
                return started
        if verb == "enable":
            (UNITS / "docker.enabled").touch()
            print(
                "Created symlink /etc/systemd/system/multi-user.target.wants/docker.service"
                " → /usr/lib/systemd/system/docker.service.",
                file=sys.stderr,
            )
        return 0
    if verb == "stop":
        stop_dockerd()
        return 0
    if verb in ("status", "is-active"):
        pid = dockerd_pid()
        if verb == "is-active":
            print("active" if pid else "inactive")
            return 0 if pid else 3
        enabled = "enabled" if (UNITS / "docker.enabled").exists() else "disabled"
        since = (UNITS / "docker.active").read_text() if pid else ""
        state = f"active (running) since {since}" if pid else "inactive (dead)"
        print("● docker.service - Docker Application Container Engine")
        print(f"     Loaded: loaded (/usr/lib/systemd/system/docker.service; {enabled})")
        print(f"     Active: {state}")
        if pid:
            print(f"   Main PID: {pid} (dockerd)")
        return 0 if pid else 3
    return refuse("systemctl", argv)


def timer_units(verb: str, names: list[str], args: list[str]) -> int:
    """Timer units written to /etc/systemd/system, as systemd runs them: ``enable [--now]``,
    ``start``, ``stop``, ``is-active``. A started timer is a process of the instance that runs
    its service's ``ExecStart`` after ``OnBootSec`` and then every ``OnUnitActiveSec``
    (``PR_PREVIEW_TIMER_SECONDS`` shortens both in the local stack); an enabled one starts again
    when a stopped instance is started (``init.start_units``)."""
    for name in names:
        if not UNIT_NAME.fullmatch(name) or not (SYSTEM_UNITS / f"{name}.timer").is_file():
            print(f"Unit {name}.timer could not be found.", file=sys.stderr)
            return 4 if verb in ("status", "is-active") else 5
    UNITS.mkdir(parents=True, exist_ok=True)
    if verb in ("enable", "start"):
        for name in names:
            if verb == "enable":
                enable(name, "timer", "timers.target")
            if verb == "start" or "--now" in args:
                start_timer(name)
        return 0
    if verb == "stop":
        for name in names:
            stop_loop(name, "timer")
        return 0
    if verb == "is-active":
        return is_active(names, "timer")
    return refuse("systemctl", args)


def enable(name: str, kind: str, target: str) -> None:
    """``systemctl enable``: the unit starts again at the next start of the instance."""
    (UNITS / f"{name}.{kind}.enabled").touch()
    print(
        f"Created symlink /etc/systemd/system/{target}.wants/{name}.{kind}"
        f" → /etc/systemd/system/{name}.{kind}.",
        file=sys.stderr,
    )


def is_active(names: list[str], kind: str) -> int:
    """``systemctl is-active``: a line per unit, 0 when all run."""
    active = [loop_pid(name, kind) is not None for name in names]
    for running in active:
        print("active" if running else "inactive")
    return 0 if all(active) else 3


def is_service_unit(name: str) -> bool:
    return bool(UNIT_NAME.fullmatch(name)) and (SYSTEM_UNITS / f"{name}.service").is_file()


def service_units(verb: str, names: list[str], args: list[str]) -> int:
    """Long-running service units written to /etc/systemd/system, as systemd runs them:
    ``enable [--now]``, ``start``, ``restart``, ``stop``, ``is-active``. A started service is a
    process of the instance that runs its ``ExecStart`` and, with ``Restart=always``, runs it
    again ``RestartSec`` after it ends; an enabled one starts again when a stopped instance is
    started (``init.start_units``). ``User``/``DynamicUser`` and the sandboxing keys are not
    played: the command runs as the instance's root."""
    UNITS.mkdir(parents=True, exist_ok=True)
    if verb in ("enable", "start", "restart"):
        for name in names:
            if verb == "enable":
                enable(name, "service", "multi-user.target")
            if verb == "restart":
                stop_loop(name, "service")
            if verb != "enable" or "--now" in args:
                start_loop(name, "service")
        return 0
    if verb == "stop":
        for name in names:
            stop_loop(name, "service")
        return 0
    if verb == "is-active":
        return is_active(names, "service")
    return refuse("systemctl", args)


def unit_values(path: Path) -> dict[str, str]:
    """``Key=value`` lines of a unit file (sections flattened: the keys used differ)."""
    values = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";", "[")):
            values[key.strip()] = value.strip()
    return values


def time_span(text: str) -> float:
    """systemd's time span for the forms unit files here use: ``90``, ``30s``, ``1min``, ``2h``."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*(s|sec|m|min|h)?", text.strip())
    if match is None:
        raise ValueError(f"time span {text!r} is not one the local instance's systemd reads")
    return float(match.group(1)) * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}.get(
        match.group(2) or "s", 1
    )


def start_timer(name: str) -> None:
    start_loop(name, "timer")


def loop_pid(name: str, kind: str) -> int | None:
    """The process running the started ``kind`` (timer or service) unit ``name``, if any."""
    try:
        pid = int((TIMERS / f"{name}.{kind}.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start_loop(name: str, kind: str) -> None:
    if loop_pid(name, kind):
        return
    TIMERS.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "local_stack.instance.shims", f"{kind}-loop", name],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    (TIMERS / f"{name}.{kind}.pid").write_text(str(process.pid))


def stop_loop(name: str, kind: str) -> None:
    """SIGTERM to the unit's process group (the loop and the command it runs), as systemd's
    stop does, and wait for it to end."""
    pid = loop_pid(name, kind)
    (TIMERS / f"{name}.{kind}.pid").unlink(missing_ok=True)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def service_loop(argv: list[str]) -> int:
    """The started service ``argv[0]``: its ``ExecStart``, run again ``RestartSec`` after it
    ends when ``Restart=always``; its output in the journal's stead (``/var/log/<name>.log``)."""
    [name] = argv
    unit = unit_values(SYSTEM_UNITS / f"{name}.service")
    command = unit["ExecStart"].split()
    pause = time_span(unit.get("RestartSec", "0.1"))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the group's SIGTERM ends the child
    with Path(f"/var/log/{name}.log").open("ab") as log:
        while True:
            subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=False)
            if unit.get("Restart") != "always":
                return 0
            time.sleep(pause)


def timer_loop(argv: list[str]) -> int:
    """The started timer ``argv[0]``: its service's command on the timer's schedule, its
    output in the journal's stead (``/var/log/<name>.log``)."""
    [name] = argv
    timer = unit_values(SYSTEM_UNITS / f"{name}.timer")
    command = unit_values(SYSTEM_UNITS / f"{name}.service")["ExecStart"]
    scaled = os.environ.get("PR_PREVIEW_TIMER_SECONDS")
    first = float(scaled) if scaled else time_span(timer.get("OnBootSec", "0"))
    every = float(scaled) if scaled else time_span(timer["OnUnitActiveSec"])
    time.sleep(first)
    with Path(f"/var/log/{name}.log").open("ab") as log:
        while True:
            subprocess.run(
                command.split(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=False
            )
            time.sleep(every)


def dockerd_argv() -> list[str]:
    """The docker unit's command line on a local instance: its own data and exec roots, no
    iptables (the instance's network namespace has no firewall to program), no default bridge
    (compose makes its own networks), and the local registries where the instance's
    environment names them (``PR_PREVIEW_REGISTRY_MIRRORS``: ``host=http://addr:port,...``;
    ``docker.io`` becomes a registry mirror, any other host an insecure registry that
    /etc/hosts points at this instance's loopback, where a bridge relays it)."""
    argv = [
        "dockerd",
        "--data-root=/var/lib/docker",
        "--exec-root=/run/docker",
        "--pidfile=" + str(DOCKERD_PID),
        "--host=unix://" + str(DOCKER_SOCKET),
        "--storage-driver=overlay2",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        "--log-level=warn",
    ]
    instance = os.environ.get("PR_PREVIEW_INSTANCE_ID", "")
    if instance:
        argv.append(f"--cgroup-parent=/pr-preview-{instance}")
    for host, url in registry_mirrors().items():
        if host == "docker.io":
            argv.append(f"--registry-mirror={url}")
        else:
            argv.append(f"--insecure-registry={host}")
    return argv


def registry_mirrors() -> dict[str, str]:
    """``PR_PREVIEW_REGISTRY_MIRRORS`` as host → URL; a host that is not a plain DNS name, or a
    URL that is not http(s), is refused: both end up on dockerd's command line and in
    /etc/hosts."""
    mirrors = {}
    for entry in filter(None, os.environ.get("PR_PREVIEW_REGISTRY_MIRRORS", "").split(",")):
        host, _, url = entry.partition("=")
        if not MIRROR_HOST.fullmatch(host) or not MIRROR_URL.fullmatch(url):
            raise ValueError(f"PR_PREVIEW_REGISTRY_MIRRORS: {entry!r} is not host=http://addr:port")
        mirrors[host] = url
    return mirrors


def start_dockerd(timeout: float = 60.0) -> int:
    """Start dockerd as the unit would, and wait until its API answers."""
    if dockerd_pid():
        return 0
    DOCKER_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    # A registry dockerd reaches by name: that name is this instance's loopback, where a
    # bridge relays it to the local registry.
    with Path("/etc/hosts").open("a") as hosts:
        for host in registry_mirrors().keys() - {"docker.io"}:
            hosts.write(f"127.0.0.1 {host}\n")
    log = Path("/var/log/docker.log")
    with log.open("ab") as output:
        process = subprocess.Popen(
            dockerd_argv(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(
                "Job for docker.service failed because the control process exited with error"
                f" code.\n{log.read_text()[-2000:]}",
                file=sys.stderr,
            )
            return 1
        if DOCKER_SOCKET.exists() and _api_answers():
            (UNITS / "docker.active").write_text(
                datetime.now(UTC).strftime("%a %Y-%m-%d %H:%M:%S UTC")
            )
            return 0
        time.sleep(0.05)
    print("Job for docker.service failed: dockerd did not answer in time.", file=sys.stderr)
    return 1


def _api_answers() -> bool:
    """dockerd's ``/_ping`` answers 200: the socket exists before the API serves."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(2)
        probe.connect(str(DOCKER_SOCKET))
        probe.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        return probe.recv(64).split(b" ")[1:2] == [b"200"]
    return False


def dockerd_pid() -> int | None:
    try:
        pid = int(DOCKERD_PID.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def stop_dockerd(timeout: float = 15.0) -> None:
    pid = dockerd_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while dockerd_pid() == pid and time.monotonic() < deadline:
        time.sleep(0.1)
    (UNITS / "docker.active").unlink(missing_ok=True)


def shutdown(argv: list[str]) -> int:
    args = list(argv)
    if args[:1] == ["-c"]:
        SHUTDOWN_FILE.unlink(missing_ok=True)
        return 0
    if args[:1] not in (["-h"], ["-P"], ["--poweroff"]) or len(args) < 2:
        return refuse("shutdown", argv)
    when = args[1]
    if when == "now":
        minutes = 0
    elif when.startswith("+") and when[1:].isdigit():
        minutes = int(when[1:])
    else:
        return refuse("shutdown", argv)
    due = datetime.now(UTC) + timedelta(minutes=minutes)
    SHUTDOWN_FILE.parent.mkdir(parents=True, exist_ok=True)
    SHUTDOWN_FILE.write_text(str(due.timestamp()))
    print(
        f"Shutdown scheduled for {due.strftime('%a %Y-%m-%d %H:%M:%S UTC')},"
        " use 'shutdown -c' to cancel.",
        file=sys.stderr,
    )
    return 0


def cloud_init(argv: list[str]) -> int:
    if argv[:1] != ["status"]:
        return refuse("cloud-init", argv)
    while True:
        try:
            status = json.loads(STATUS_FILE.read_text())
        except (OSError, ValueError):
            status = {"status": "not started"}
        if "--wait" not in argv or status["status"] not in ("running", "not started"):
            break
        time.sleep(0.5)
    print(f"status: {status['status']}")
    if "--long" in argv:
        print("boot_status_code: enabled-by-generator")
        if "last_update" in status:
            print(f"last_update: {status['last_update']}")
        print("detail:\nDataSourceEc2Local")
        errors = status.get("errors", [])
        print("errors:" + ("".join(f"\n\t- {e}" for e in errors) if errors else " []"))
    return 1 if status["status"] == "error" else 0


def aws(argv: list[str]) -> int:
    if argv == ["--version"]:
        print("aws-cli/2.22.0 Python/3.11 Linux (pr-preview local stack: a shim on boto3)")
        return 0
    options, positional = parse_options(argv)
    if positional == ["ssm", "get-parameter"]:
        return get_parameter(options)
    if positional == ["ssm", "get-parameters-by-path"]:
        return get_parameters_by_path(options)
    if positional == ["ssm", "start-session"]:
        return start_session(options)
    if positional == ["ecr", "get-login-password"] and set(options) <= {"--region"}:
        return get_login_password(options)
    return refuse("aws", argv)


def parse_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    positional: list[str] = []
    flags = {"--with-decryption", "--no-with-decryption", "--recursive"}
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in flags:
            options[arg] = "true"
        elif arg.startswith("--"):
            options[arg] = argv[index + 1] if index + 1 < len(argv) else ""
            index += 1
        else:
            positional.append(arg)
        index += 1
    return options, positional


def get_parameter(options: dict[str, str]) -> int:
    import boto3
    from botocore.exceptions import ClientError, EndpointConnectionError

    if options.get("--query") not in (None, "Parameter.Value") or options.get(
        "--output", "text"
    ) not in ("text", "json"):
        return refuse("aws", [f"{k} {v}" for k, v in options.items()])
    client = boto3.client("ssm", region_name=options.get("--region"))
    try:
        answer = client.get_parameter(
            Name=options["--name"], WithDecryption="--with-decryption" in options
        )
    except ClientError as exc:
        return cli_error(exc, "GetParameter")
    except EndpointConnectionError as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 255
    value = answer["Parameter"]["Value"]
    if options.get("--query") == "Parameter.Value":
        print(value if options.get("--output", "text") == "text" else json.dumps(value))
    else:
        print(json.dumps({"Parameter": answer["Parameter"]}, default=str, indent=4))
    return 0


def get_parameters_by_path(options: dict[str, str]) -> int:
    """The names under ``--path`` (``--query 'Parameters[].Name' --output text`` only), one
    line per page, tab-separated, as the CLI prints them."""
    import boto3
    from botocore.exceptions import ClientError

    if options.get("--query") != "Parameters[].Name" or options.get("--output") != "text":
        return refuse("aws", [f"{k} {v}" for k, v in options.items()])
    client = boto3.client("ssm", region_name=options.get("--region"))
    pages = client.get_paginator("get_parameters_by_path").paginate(
        Path=options["--path"], Recursive="--recursive" in options
    )
    try:
        for page in pages:
            print("\t".join(parameter["Name"] for parameter in page["Parameters"]))
    except ClientError as exc:
        return cli_error(exc, "GetParametersByPath")
    return 0


def get_login_password(options: dict[str, str]) -> int:
    """ECR's docker password, as the CLI prints it: GetAuthorizationToken's token is base64 of
    ``AWS:<password>``; only the password is printed, for ``docker login --password-stdin``."""
    import base64

    import boto3
    from botocore.exceptions import ClientError, EndpointConnectionError

    client = boto3.client("ecr", region_name=options.get("--region"))
    try:
        answer = client.get_authorization_token()
    except ClientError as exc:
        return cli_error(exc, "GetAuthorizationToken")
    except EndpointConnectionError as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 255
    token = answer["authorizationData"][0]["authorizationToken"]
    print(base64.b64decode(token).decode().partition(":")[2])
    return 0


def cli_error(exc: ClientError, operation: str) -> int:
    """What the AWS CLI prints for an error answer, and its exit code."""
    error = exc.response["Error"]
    print(
        f"\nAn error occurred ({error.get('Code')}) when calling the {operation} operation:"
        f" {error.get('Message')}",
        file=sys.stderr,
    )
    return 254


def start_session(options: dict[str, str]) -> int:
    """Session Manager port forwarding, as a local relay into the instance's namespace."""
    from local_stack.instance.relay import RelayLoop

    target = options.get("--target", "")
    if options.get("--document-name") != "AWS-StartPortForwardingSession":
        return refuse("aws", ["start-session without AWS-StartPortForwardingSession"])
    parameters = json.loads(options.get("--parameters", "{}"))
    port = int(parameters["portNumber"][0])
    local_port = int(parameters.get("localPortNumber", [str(port)])[0])
    root = Path(os.environ.get("PR_PREVIEW_RUNTIME_ROOT", ""))
    sock = (root / target / "sockets").resolve() / "in.sock"
    if not target.startswith("i-") or "/" in target or not sock.exists():
        print(
            "\nAn error occurred (TargetNotConnected) when calling the StartSession operation:"
            f" {target} is not connected.",
            file=sys.stderr,
        )
        return 254
    session = f"local-{int(time.time())}-{os.getpid():x}"
    relays = RelayLoop("port-forwarding")
    try:
        relays.tcp_to_port_chooser("session", "127.0.0.1", local_port, sock, port)
    except OSError as exc:
        print(f"\nUnable to start port forwarding on 127.0.0.1:{local_port}: {exc}")
        return 1
    print(f"\nStarting session with SessionId: {session}")
    print(f"Port {local_port} opened for sessionId {session}.")
    print("Waiting for connections...\n", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while sock.exists():
            time.sleep(0.5)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        relays.stop()
    print(f"\n\nExiting session with sessionId: {session}.\n")
    return 0


def session_manager_plugin(argv: list[str]) -> int:
    """Only present so `pr-preview tunnel` finds it: ``aws ssm start-session`` relays itself."""
    print("1.2.707.0 (pr-preview local stack: port forwarding is a local relay)")
    return 0


TOOLS = {
    "session-manager-plugin": session_manager_plugin,
    "dnf": dnf,
    "yum": dnf,
    "systemctl": systemctl,
    "shutdown": shutdown,
    "cloud-init": cloud_init,
    "aws": aws,
    "timer-loop": timer_loop,
    "service-loop": service_loop,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TOOLS:
        print(f"usage: python -m local_stack.instance.shims {{{','.join(TOOLS)}}} ...")
        return 2
    return TOOLS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
