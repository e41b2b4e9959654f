"""The allow-list a PR's compose file is judged by, in the form Docker Compose itself reads it.

Its input is the canonical document ``docker compose config --format json`` prints: anchors,
merge keys, ``extends`` and ``${VAR:-default}`` resolved, every value typed as Compose reads it
(``privileged: "yes"`` is ``true`` there). Every key not named here is refused, at the top level,
per service and inside the entries where it matters (ports, volumes, networks, logging, deploy).
Each refusal names the service and the key and says what to write instead.

What it keeps out, whoever wrote the file: host privileges, capabilities, devices and namespaces;
the Docker socket; a port on anything but 127.0.0.1; a bind mount of the host outside one plain
directory beside the compose file (the files root runs sit in the app dir itself); networks and
volumes shared with the host or chosen by name, address or driver; log drivers that reach out from
the host's network namespace; lifecycle hooks; and anything newer Compose may add.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tasks.config import SERVICE_PATTERN

LOOPBACK = "127.0.0.1"
# How Docker spells "no new privileges"; render adds the first where a service has none.
NO_NEW_PRIVILEGES = ("no-new-privileges:true", "no-new-privileges=true", "no-new-privileges")
# A bind mount's source: one plain directory beside the compose file. No dot, so none of the
# files root keeps there (docker-compose.yml, .env, *.env); not nested, so no container that
# writes ./data can plant a link that a later ./data/x would follow onto the host.
DATA_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RESERVED_DIRS = frozenset(
    {"build"}
)  # the image built from the GitHub tarball (tasks/steps/launch.py)
KERNEL_PATHS = ("/proc", "/sys")  # a mount there undoes the runtime's protections
MAX_ULIMIT = 1_048_576
LOG_DRIVERS = frozenset({"json-file", "local"})  # others ship logs from the host's namespace
LOG_OPTIONS = frozenset({"max-size", "max-file", "compress"})
PORT_PROTOCOLS = frozenset({"tcp", "udp"})

# Per service: keys with nothing to check beyond Compose's own validation.
PLAIN_KEYS = frozenset(
    {
        "command",
        "container_name",
        "cpu_shares",
        "cpus",
        "dns",
        "dns_search",
        "domainname",
        "entrypoint",
        "expose",
        "extra_hosts",
        "hostname",
        "init",
        "mem_limit",
        "mem_reservation",
        "memswap_limit",
        "pids_limit",
        "profiles",
        "read_only",
        "restart",
        "scale",
        "shm_size",
        "stdin_open",
        "stop_grace_period",
        "stop_signal",
        "tty",
        "user",
        "cap_drop",
    }
)
NO_HOST = "a preview container gets no host privileges; remove it"
NO_SHARING = "a preview shares no namespace with the host; remove it"
# Refused keys Compose knows, each with what to write instead (any other key: remove it).
REFUSED = {
    "build": "previews run images CI built; give an image: instead (the app service gets the"
    " PR's image)",
    "privileged": NO_HOST,
    "cap_add": "a preview container keeps at most Docker's default capabilities; remove it"
    " (cap_drop is fine)",
    "devices": "a preview container gets no host devices; remove it",
    "device_cgroup_rules": "a preview container gets no host devices; remove it",
    "gpus": "a preview container gets no host devices; remove it",
    "pid": NO_SHARING,
    "ipc": NO_SHARING,
    "uts": NO_SHARING,
    "userns_mode": NO_SHARING,
    "cgroup": NO_SHARING,
    "cgroup_parent": NO_HOST,
    "sysctls": NO_HOST,
    "runtime": NO_HOST,
    "isolation": NO_HOST,
    "group_add": NO_HOST,
    "oom_kill_disable": "the host's OOM killer must be able to stop a preview; remove it",
    "oom_score_adj": "the host's OOM killer must be able to stop a preview; remove it",
    "storage_opt": NO_HOST,
    "use_api_socket": "a preview container never gets the Docker socket; remove it",
    "post_start": "lifecycle hooks can run privileged commands; run it from the image's"
    " entrypoint or command instead",
    "pre_stop": "lifecycle hooks can run privileged commands; run it from the image's"
    " entrypoint or command instead",
    "volumes_from": "share a named volume instead (volumes: [name:/path] in both services)",
    "external_links": "it links containers outside the preview; link services of this file",
    "secrets": "put secrets in Parameter Store (env_parameter_path) and name secrets.env in"
    " env_file: the service then gets them as variables",
    "develop": "previews run images: nothing syncs from the host; remove it",
    "provider": "a provider service runs a program on the host; remove it",
    "platform": "previews run on the instance's own platform; remove it",
    "mac_address": "Docker assigns addresses; remove it",
}
TOP_LEVEL = frozenset({"name", "services", "networks", "volumes", "configs"})
TOP_LEVEL_REFUSED = {
    "secrets": "top-level secrets read the host's files or variables; put secrets in Parameter"
    " Store (env_parameter_path) and name secrets.env in env_file",
    "models": "previews run no model runner; remove it",
}


def refusals(document: Mapping[str, Any], project: str) -> list[str]:
    """Every problem of the canonical ``document`` (Compose's project ``project``), in words
    for the PR's author; empty when it may run as a preview."""
    problems: list[str] = []
    for key, value in document.items():
        if key.startswith("x-"):
            continue  # extension fields: inert, and not rendered
        if key in TOP_LEVEL_REFUSED:
            problems.append(f"{key}: is refused: {TOP_LEVEL_REFUSED[key]}")
        elif key not in TOP_LEVEL:
            problems.append(f"{key}: is not allowed in a preview; remove it")
        elif key == "name" and value != project:
            problems.append(f"name: {value} is not the preview's project name {project}")
        elif key in ("networks", "volumes", "configs"):
            for entry, spec in (value or {}).items():
                check = _TOP_LEVEL_ENTRY[key]
                problems += [f"{key}.{entry}: {why}" for why in check(entry, spec, project)]
    problems += [
        f"{place(where)}: the key {key.replace('$$', '$')!r} holds a $, which Compose does"
        " not read back as written; rename it"
        for where, key in _dollar_keys(document)
    ]
    services = document.get("services") or {}
    for name, service in services.items():
        if not SERVICE_PATTERN.fullmatch(name):
            problems.append(f"{name[:100]!r} is not a service name")
            continue
        problems += [f"service {name}: {why}" for why in _service(service, document)]
    return problems


def _network(key: str, spec: Mapping[str, Any], project: str) -> Iterator[str]:
    if spec.get("external"):
        yield (
            "external: is refused: an external network is shared with the host or another"
            " project (name: host is the host's own); declare a network of this file (no"
            " external, no name)"
        )
        return
    for field, value in spec.items():
        if field == "name":
            if value != f"{project}_{key}":
                yield f"name: {value} is refused: a preview's networks are its own; remove name"
        elif field == "ipam":
            if value:
                yield (
                    "ipam: is refused: Compose picks the subnet (a chosen one can shadow the"
                    " instance's own addresses, such as 169.254.169.254); remove it"
                )
        elif field in ("driver", "driver_opts"):
            yield f"{field}: is refused: preview networks are plain bridge networks; remove it"
        elif field not in ("internal", "labels"):
            yield f"{field}: is not allowed on a preview's network; remove it"


def _volume(key: str, spec: Mapping[str, Any], project: str) -> Iterator[str]:
    if spec.get("external"):
        yield "external: is refused: a preview's volumes are its own; remove external and name"
        return
    for field, value in spec.items():
        if field == "name":
            if value != f"{project}_{key}":
                yield f"name: {value} is refused: a preview's volumes are its own; remove name"
        elif field in ("driver", "driver_opts"):
            yield (
                f"{field}: is refused: it can mount any path of the host; use a plain named"
                " volume (no driver, no driver_opts)"
            )
        elif field != "labels":
            yield f"{field}: is not allowed on a preview's volume; remove it"


def _config(key: str, spec: Mapping[str, Any], project: str) -> Iterator[str]:
    for field, value in spec.items():
        if field == "name":
            if value != f"{project}_{key}":
                yield f"name: {value} is refused: remove name"
        elif field == "file":
            yield (
                "file: is refused: only the compose file is fetched from the PR; write the"
                " config inline with content:"
            )
        elif field == "environment":
            yield "environment: is refused: it reads the host's variables; write content:"
        elif field != "content":
            yield f"{field}: is not allowed on a preview's config; remove it"


_TOP_LEVEL_ENTRY: dict[str, Callable[[str, Mapping[str, Any], str], Iterator[str]]] = {
    "networks": _network,
    "volumes": _volume,
    "configs": _config,
}


def _dollar_keys(value: Any, where: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """Mapping keys holding a ``$``: Compose doubles them on output but reads keys verbatim."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key.startswith("x-"):
                continue
            if "$" in key:
                yield where, key
            else:
                yield from _dollar_keys(item, (*where, key))
    elif isinstance(value, list):
        for item in value:
            yield from _dollar_keys(item, where)


def place(path: tuple[str, ...]) -> str:
    """Where a key is, as the messages say it: ``service api: labels``."""
    if len(path) >= 2 and path[0] == "services":
        rest = ".".join(path[2:])
        return f"service {path[1]}" + (f": {rest}" if rest else "")
    return ".".join(path) or "the top level"


def _service(service: Mapping[str, Any], document: Mapping[str, Any]) -> Iterator[str]:
    for key, value in service.items():
        if key.startswith("x-") or key in PLAIN_KEYS:
            continue
        check = _SERVICE_KEYS.get(key)
        if check is not None:
            yield from check(value, document)
        elif key in REFUSED:
            if value:  # false, [] and "" ask for nothing
                shown = _shown(value)
                yield f"{key}: {shown + ' ' if shown else ''}is refused: {REFUSED[key]}"
        else:
            yield f"{key}: is not allowed in a preview; remove it"


def _shown(value: Any) -> str:
    """A value as the PR's author wrote it, short; empty for a nested one."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | int | float):
        return str(value)[:80]
    if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        return ", ".join(map(str, value))[:80]
    if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
        return ", ".join(_device(v) for v in value)[:80]  # devices, in their long form
    return ""


def _device(value: Mapping[str, Any]) -> str:
    return ":".join(str(value[k]) for k in ("source", "target", "permissions") if k in value)


def _image(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    if not isinstance(value, str) or not value:
        yield "image: is required (previews run images, never build:)"


def _environment(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    for name, item in (value or {}).items():
        if item is None:
            yield (
                f"environment: {name} has no value, so the instance would pass root's own"
                f' {name} into the container; give it one ({name}: "" or {name}= for empty)'
            )


def _labels(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    for name in value or {}:
        if name.startswith("com.docker."):
            yield f"labels: {name} is refused: com.docker.* labels are Docker's and Compose's own"


def _network_mode(value: Any, document: Mapping[str, Any]) -> Iterator[str]:
    mode = str(value)
    if mode == "none":
        return
    if mode.startswith("service:") and mode[len("service:") :] in (document.get("services") or {}):
        return
    why = {
        "host": "a preview shares no namespace with the host",
        "bridge": "Docker's default bridge is shared with every container of the host",
    }.get(mode, "a preview's containers join only its own networks")
    yield (
        f"network_mode: {mode[:80]} is refused: {why}; remove network_mode (services join the"
        " file's networks), or write none or service:<a service of this file>"
    )


def _networks(value: Any, document: Mapping[str, Any]) -> Iterator[str]:
    declared = document.get("networks") or {}
    for name, attachment in (value or {}).items():
        if name not in declared:
            yield f"networks: {name} is not a network of this file"
        for field in attachment or {}:
            if field in ("ipv4_address", "ipv6_address", "link_local_ips", "mac_address"):
                yield f"networks.{name}.{field}: is refused: Docker assigns addresses; remove it"
            elif field != "aliases":
                yield f"networks.{name}.{field}: is not allowed in a preview; remove it"


def _ports(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    for port in value or []:
        target, published = port.get("target"), port.get("published") or ""
        host_ip, protocol = port.get("host_ip") or "", port.get("protocol") or "tcp"
        suffix = "" if protocol == "tcp" else f"/{protocol}"
        wanted = f"'{LOOPBACK}:{published or target}:{target}{suffix}'"
        if not published:
            yield (
                f"port {target}{suffix} is published on a random port of every address of the"
                f" instance: write {wanted}; previews are reached through SSM"
            )
        elif host_ip != LOOPBACK:
            where = host_ip or "every address"
            address = f"[{host_ip}]" if ":" in host_ip else host_ip
            written = f"{address}:{published}" if host_ip else published
            yield (
                f"port '{written}:{target}{suffix}' is published on {where}: write {wanted}"
                " (127.0.0.1 only); previews are reached through SSM"
            )
        elif not str(published).isdigit():
            yield f"port {published}:{target}{suffix} publishes a range: publish one port"
        if protocol not in PORT_PROTOCOLS:
            yield f"port {target}/{protocol}: only tcp and udp are allowed"
        for field in port:
            if field not in ("mode", "host_ip", "target", "published", "protocol", "name"):
                yield f"port {target}: {field}: is not allowed in a preview; remove it"
        if port.get("mode", "ingress") != "ingress":
            yield f"port {target}: mode: {port['mode']} is not allowed in a preview; remove it"


def _volumes(value: Any, document: Mapping[str, Any]) -> Iterator[str]:
    declared = document.get("volumes") or {}
    for volume in value or []:
        kind, target = volume.get("type"), str(volume.get("target", ""))
        if _covers_kernel(target):
            yield f"the mount on {target} is refused: it would cover the kernel's own files"
        allowed = {"type", "target", "read_only", kind}
        if kind == "volume":
            source = volume.get("source")
            if source is not None and source not in declared:
                yield f"volume {source} is not a volume of this file"
            options = volume.get("volume") or {}
            if "subpath" in options:
                yield (
                    f"the volume on {target}: subpath is refused (a link inside the volume can"
                    " lead out of it); mount the whole volume"
                )
            allowed |= {"source"}
            extra = set(options) - {"nocopy", "subpath"}
        elif kind == "tmpfs":
            extra = set(volume.get("tmpfs") or {}) - {"size", "mode"}
        elif kind == "bind":
            yield from _bind(str(volume.get("source", "")))
            allowed |= {"source"}
            extra = set(volume.get("bind") or {}) - {"create_host_path"}
        else:
            yield (
                f"the {kind} mount on {target} is refused: mount named volumes, tmpfs or"
                " ./<directory>"
            )
            continue
        for field in sorted((set(volume) - allowed) | extra):
            yield f"the mount on {target}: {field}: is not allowed in a preview; remove it"


def _bind(source: str) -> Iterator[str]:
    """A bind mount's source (relative to the compose file, as written): one plain directory
    beside it, never the app dir itself, a file root runs or anything outside."""
    path = posixpath.normpath(source) if source else ""
    hint = "mount ./<directory> (letters, digits, - and _) or a named volume"
    if not path or path.startswith(("/", "~", "$")) or path == ".." or path.startswith("../"):
        yield f"the bind mount of {source!r} is outside the app dir: {hint}"
    elif path == ".":
        yield (
            f"the bind mount of {source!r} is the app dir itself, where root keeps the compose"
            f" and env files it runs: {hint}"
        )
    elif "/" in path:
        yield (
            f"the bind mount of {source!r} is nested: mount ./{path.split('/')[0]} itself (a"
            " container that writes a directory could put a link where a nested path leads)"
        )
    elif path in RESERVED_DIRS:
        yield f"the bind mount of {source!r} is where the instance builds the app's image: {hint}"
    elif not DATA_DIR.fullmatch(path):
        yield (
            f"the bind mount of {source!r} names a file root keeps in the app dir (the compose"
            f" and env files): {hint}"
        )


def _tmpfs(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    for entry in value or []:
        path = str(entry).split(":", 1)[0]
        if _covers_kernel(path):
            yield f"tmpfs: {path} is refused: it would cover the kernel's own files"


def _covers_kernel(path: str) -> bool:
    path = posixpath.normpath(path) if path else path
    return path == "/dev" or any(path == k or path.startswith(k + "/") for k in KERNEL_PATHS)


def _security_opt(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    for option in value or []:
        if option not in NO_NEW_PRIVILEGES:
            yield (
                f"security_opt: {option} is refused: only no-new-privileges:true is allowed"
                " (seccomp, AppArmor and SELinux stay Docker's defaults)"
            )


def _ulimits(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    for name, limit in (value or {}).items():
        values = limit.values() if isinstance(limit, Mapping) else [limit]
        if any(not isinstance(v, int) or not 0 <= v <= MAX_ULIMIT for v in values):
            yield f"ulimits: {name} is refused: limits go from 0 to {MAX_ULIMIT}"


def _logging(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    driver = value.get("driver")
    if driver is not None and driver not in LOG_DRIVERS:
        yield (
            f"logging: driver {driver} is refused: it sends logs from the host itself; use"
            " json-file or local (or leave logging out)"
        )
    for option in value.get("options") or {}:
        if option not in LOG_OPTIONS:
            yield f"logging: option {option} is not allowed; use max-size, max-file, compress"
    for field in set(value) - {"driver", "options"}:
        yield f"logging: {field}: is not allowed in a preview; remove it"


def _healthcheck(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    fields = {"test", "interval", "timeout", "retries", "start_period", "start_interval"}
    for field in set(value) - fields - {"disable"}:
        yield f"healthcheck: {field}: is not allowed in a preview; remove it"


def _deploy(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    resources = value.get("resources") or {}
    reservations = resources.get("reservations") or {}
    if "devices" in reservations:
        yield "deploy: resources.reservations.devices is refused: a preview gets no host devices"
    for field in set(value) - {"replicas", "resources", "restart_policy", "labels", "placement"}:
        yield f"deploy: {field}: is not allowed in a preview; remove it"
    if value.get("placement"):
        yield "deploy: placement: is not allowed in a preview; remove it"
    for field in set(resources) - {"limits", "reservations"}:
        yield f"deploy: resources.{field}: is not allowed in a preview; remove it"
    for field in set(resources.get("limits") or {}) - {"cpus", "memory", "pids"}:
        yield f"deploy: resources.limits.{field}: is not allowed in a preview; remove it"
    for field in set(reservations) - {"cpus", "memory", "devices"}:
        yield f"deploy: resources.reservations.{field}: is not allowed in a preview; remove it"


def _depends_on(value: Any, document: Mapping[str, Any]) -> Iterator[str]:
    services = document.get("services") or {}
    for name, condition in (value or {}).items():
        if name not in services:
            yield f"depends_on: {name} is not a service of this file"
        for field in set(condition or {}) - {"condition", "required", "restart"}:
            yield f"depends_on: {name}: {field}: is not allowed in a preview; remove it"


def _links(value: Any, document: Mapping[str, Any]) -> Iterator[str]:
    services = document.get("services") or {}
    for link in value or []:
        if str(link).split(":", 1)[0] not in services:
            yield f"links: {link} is not a service of this file"


def _configs(value: Any, document: Mapping[str, Any]) -> Iterator[str]:
    declared = document.get("configs") or {}
    for config in value or []:
        if config.get("source") not in declared:
            yield f"configs: {config.get('source')} is not a config of this file"
        if _covers_kernel(str(config.get("target", ""))):
            yield f"configs: the target {config['target']} would cover the kernel's own files"
        for field in set(config) - {"source", "target", "uid", "gid", "mode"}:
            yield f"configs: {field}: is not allowed in a preview; remove it"


def _working_dir(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    if _covers_kernel(str(value)):
        yield (
            f"working_dir: {value} is refused: a working directory in /proc or /sys can reach"
            " the host through the runtime's own descriptors (CVE-2024-21626); use a path of"
            " the image"
        )


def _pull_policy(value: Any, _: Mapping[str, Any]) -> Iterator[str]:
    if value == "build":
        yield f"pull_policy: build is refused: {REFUSED['build']}"


_SERVICE_KEYS: dict[str, Callable[[Any, Mapping[str, Any]], Iterator[str]]] = {
    "image": _image,
    "environment": _environment,
    "labels": _labels,
    "network_mode": _network_mode,
    "networks": _networks,
    "ports": _ports,
    "volumes": _volumes,
    "tmpfs": _tmpfs,
    "security_opt": _security_opt,
    "ulimits": _ulimits,
    "logging": _logging,
    "healthcheck": _healthcheck,
    "deploy": _deploy,
    "depends_on": _depends_on,
    "links": _links,
    "configs": _configs,
    "pull_policy": _pull_policy,
    "working_dir": _working_dir,
}
