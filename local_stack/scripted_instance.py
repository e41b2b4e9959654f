"""A scripted preview instance behind moto's SSM Run Command.

moto answers every command with Success, exit 0 and no output. This fake decides, per command
text, what the instance "prints" — by rules: a regex over the script, then a reply or a
sequence of replies (the last one repeats), or a function of the call (for state such as "the
bootstrap marker appears after K polls"). It patches moto where the answer is made:

- ``Command.invocation_response`` (the invocation moto stores at SendCommand) for the reply;
- ``Command.get_invocation`` so a reply can first be ``InvocationDoesNotExist`` and then
  ``InProgress`` for a few reads, as on AWS;
- ``SimpleSystemManagerBackend.send_command`` to refuse an instance whose agent is "offline"
  with ``InvalidInstanceId`` (what AWS says before the agent registers), and to know which
  instances a command was really sent to: moto also runs it on every other instance of the
  region, and those invocations keep moto's blank answer and consume no rule.

Wait-ready's one command (``tasks/steps/wait_ready.py`` ``ready_command``) is a set of shell
functions, each headed by a ``# pr-preview-ready: <name>`` line, and a last block that calls
them in turn. It is answered as the instance runs it: each function by the rules for its own
text (the bootstrap check, the port check, compose's view of the app, each probe), in that
block's order, so a test scripts the checks and not the command that bundles them. It is
recorded (``calls``, ``commands``, ``count``) as the functions that ran, each under its header:
a probe the command holds but did not reach is not counted as sent.

Works in-process (``mock_aws``) and with ``ThreadedMotoServer``. Output longer than 24,000
characters is cut like ``StandardOutputContent`` on AWS.

``make demo`` boots its instances for real (``local_stack/instance``); the moto server of the
tests' shared installation (``--runtime scripted``) and the flow tests use this one, through the
``scripted_ssm`` fixture or ``ScriptedInstances().patched()`` as a context manager.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from moto.ssm import models as ssm_models
from moto.ssm.exceptions import SSMException

OUTPUT_LIMIT = 24000


@dataclass(frozen=True)
class Reply:
    """What one run of a command gives back."""

    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    status: str | None = None  # default: Success for exit 0, else Failed
    missing_reads: int = 0  # GetCommandInvocation says InvocationDoesNotExist this often first
    pending_reads: int = 0  # ... then InProgress this often; -1: never finishes
    seconds: float = 0.0  # ... and InProgress until the command has run this long

    @property
    def final_status(self) -> str:
        return self.status or ("Success" if self.exit_code == 0 else "Failed")


@dataclass(frozen=True)
class Call:
    """One command that reached one instance."""

    instance_id: str
    command: str
    comment: str
    at: float
    nth: int  # how many earlier calls this rule answered on this instance
    reply: Reply | None = None


Responder = Callable[[Call], Reply]


@dataclass
class Rule:
    pattern: re.Pattern[str]
    respond: Responder
    instance_id: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def matches(self, instance_id: str, command: str) -> bool:
        if self.instance_id is not None and self.instance_id != instance_id:
            return False
        return bool(self.pattern.search(command))


def sequence(*replies: Reply) -> Responder:
    """The n-th call gets the n-th reply; the last one repeats."""
    if not replies:
        raise ValueError("at least one reply")
    return lambda call: replies[min(call.nth, len(replies) - 1)]


def after_calls(count: int, *, before: Reply, then: Reply) -> Responder:
    """``before`` for the first ``count`` calls on an instance, ``then`` from then on."""
    return lambda call: then if call.nth >= count else before


def at_time(moment: float, *, before: Reply, then: Reply) -> Responder:
    """``before`` until ``time.monotonic()`` reaches ``moment``, ``then`` afterwards."""
    return lambda call: then if call.at >= moment else before


# What the project's scripts print on a healthy instance (tasks/steps/wait_ready.py, probe.py, ...).
# Each pattern names one script and no other.
BOOTSTRAP_CHECK = r"echo bootstrap-pending"
PORT_CHECK = r"APP PORT OPEN"
PROBE = r"curl .*http://127\.0\.0\.1:\d+/"
MIGRATE = r" run --rm "
DEPLOY = r"APP_IMAGE="
HEALTH = r"# pr-preview-health"
READY = r"# pr-preview-ready"
MIGRATED_CHECK = r"MIGRATED ON BOOT"  # the ready command's "did the boot migrate .env" function
READY_SECTION = "# pr-preview-ready: "
DEPLOY_SECTION = "# pr-preview-deploy: "
# The in-place deploy's one command as a whole: a rule on exactly this pattern answers all of it
# (the latency model does); otherwise each stage is answered by the rules for its own text.
DEPLOY_COMMAND = r"# pr-preview-deploy \("
EARLY_PULL = r"# pr-preview-early-pull"
STAGE_LINE = "pr-preview-stage"
MIGRATED_LINE = "MIGRATED ON BOOT"

BOOTSTRAP_DONE = Reply(stdout="bootstrap-done\n")
BOOTSTRAP_PENDING = Reply(stdout="bootstrap-pending\n")
PORT_OPEN = Reply(stdout="APP PORT OPEN 8000\n")
PORT_CLOSED = Reply(stdout="APP PORT CLOSED 8000\n", exit_code=1)
MIGRATED_ON_BOOT = Reply(stdout=f"{MIGRATED_LINE}\n")


def bootstrap_failed(step: str) -> Reply:
    return Reply(stdout=f"bootstrap-failed\nbootstrap failed at step: {step}\n")


def probe_answer(status_code: int, seconds: float = 0.004) -> Reply:
    """curl's ``-w '%{http_code} %{time_total}'``; 000 and exit 7 when nothing listens."""
    if status_code == 0:
        return Reply(
            stdout=f"000 {seconds:.6f}",
            stderr="curl: (7) Failed to connect to 127.0.0.1 port 8000: Connection refused",
            exit_code=7,
        )
    return Reply(stdout=f"{status_code} {seconds:.6f}")


def probe_reply(status_code: int, command: str) -> Reply:
    """``probe_answer``, and, where ``command`` moves the shutdown timer on a healthy answer
    (``tasks.steps.probe``), the line that says it did."""
    answer = probe_answer(status_code)
    if 200 <= status_code < 400 and "shutdown -h" in command:
        return Reply(stdout=f"{answer.stdout}\npr-preview-timer-moved\n")
    return answer


def probe_responder(status_code: int) -> Responder:
    return lambda call: probe_reply(status_code, call.command)


class ScriptedInstances:
    """The instances' behaviour, as rules; newest rule first, so tests override defaults."""

    def __init__(self) -> None:
        self._rules: list[Rule] = []
        self._lock = threading.RLock()
        self._local = threading.local()
        self._reads: dict[tuple[str, str], list[int]] = {}
        self._done_at: dict[tuple[str, str], float] = {}
        self._offline: dict[str, Callable[[], bool]] = {}
        self.calls: list[Call] = []
        self.default = Reply()

    # --- scripting
    def on(self, pattern: str, *replies: Reply, instance_id: str | None = None) -> Rule:
        """Commands whose text matches ``pattern`` get ``replies`` in turn (the last repeats)."""
        return self.respond(pattern, sequence(*replies), instance_id=instance_id)

    def respond(
        self, pattern: str, responder: Responder, *, instance_id: str | None = None
    ) -> Rule:
        rule = Rule(re.compile(pattern), responder, instance_id)
        with self._lock:
            self._rules.insert(0, rule)
        return rule

    def agent_offline(self, instance_id: str, *, until: Callable[[], bool] | None = None) -> None:
        """SendCommand to ``instance_id`` fails with InvalidInstanceId until ``until()`` holds."""
        with self._lock:
            self._offline[instance_id] = until or (lambda: False)

    def healthy(self, *, instance_id: str | None = None, port: int = 8000) -> ScriptedInstances:
        """Script a preview whose every check passes (as a base for overrides)."""
        self.on(BOOTSTRAP_CHECK, BOOTSTRAP_DONE, instance_id=instance_id)
        self.on(PORT_CHECK, Reply(stdout=f"APP PORT OPEN {port}\n"), instance_id=instance_id)
        self.respond(PROBE, probe_responder(200), instance_id=instance_id)
        self.on(
            MIGRATE,
            Reply(stdout="INFO  [alembic.runtime.migration] Will assume transactional DDL.\n"),
            instance_id=instance_id,
        )
        self.on(HEALTH, Reply(stdout="healthy\n"), instance_id=instance_id)
        return self

    # --- reading back
    def commands(self, instance_id: str | None = None, pattern: str | None = None) -> list[str]:
        with self._lock:
            return [
                call.command
                for call in self.calls
                if (instance_id is None or call.instance_id == instance_id)
                and (pattern is None or re.search(pattern, call.command))
            ]

    def count(self, pattern: str, instance_id: str | None = None) -> int:
        return len(self.commands(instance_id, pattern))

    # --- moto hooks
    def _reply_for(self, instance_id: str, command: str, comment: str) -> Reply:
        with self._lock:
            now = time.monotonic()
            if READY_SECTION in command:
                (reply, command), nth = self._ready(instance_id, command, comment, now), 0
            elif DEPLOY_SECTION in command:
                (reply, command), nth = self._deploy(instance_id, command, comment, now), 0
            else:
                reply, nth = self._match(instance_id, command, comment, now)
            self.calls.append(Call(instance_id, command, comment, now, nth, reply))
            return reply

    def _match(self, instance_id: str, command: str, comment: str, now: float) -> tuple[Reply, int]:
        """The newest rule for ``command`` answers (and counts the call), else the default."""
        for rule in self._rules:
            if rule.matches(instance_id, command):
                nth = rule.counts.get(instance_id, 0)
                rule.counts[instance_id] = nth + 1
                return rule.respond(Call(instance_id, command, comment, now, nth)), nth
        return self.default, 0

    def _ready(self, instance_id: str, command: str, comment: str, now: float) -> tuple[Reply, str]:
        """Wait-ready's one command, run as its last block runs its functions: the bootstrap
        check; once done, the migrated-on-boot check and the port check; compose's view of the
        app when the port is closed, else (migrated on boot) each probe until one is healthy,
        and the app's state when none was.
        Returns the reply and the text of the functions that ran."""
        sections: dict[str, list[str]] = {}
        name = ""
        for line in command.splitlines():
            if line.startswith(READY_SECTION):
                name = line.removeprefix(READY_SECTION)
                sections[name] = []
            elif name:
                sections[name].append(line)
        parts: list[Reply] = []
        ran: list[str] = []

        def run(section: str) -> Reply:
            text = "\n".join(sections[section])
            reply, _ = self._match(instance_id, text, comment, now)
            parts.append(reply)
            ran.append(f"{READY_SECTION}{section}\n{text}")
            return reply

        out = [run("bootstrap").stdout]
        if out[0].strip().split("\n")[0].strip() == "bootstrap-done":
            migrated = MIGRATED_LINE in run("migrated").stdout.splitlines()
            out.append(f"{MIGRATED_LINE}\n" if migrated else "")
            port = run("app-port")
            out.append(port.stdout)
            if port.exit_code != 0:
                out.append(run("app-state").stdout)
            elif migrated:
                probes = [name for name in sections if name.startswith("probe ")]
                for section in probes:
                    answer = " ".join(run(section).stdout.split())
                    out.append(f"PROBE {section.removeprefix('probe ')} {answer}\n")
                    if re.match(r"[23]\d\d ", answer):
                        break
                    if not re.match(r"(404|405)( |$)", answer):
                        # Not healthy, or no answer (ProbeAnswer.decisive): no more paths.
                        out.append(run("app-state").stdout)
                        break
                else:
                    if probes:  # none healthy: compose's view of the app, as the command asks
                        out.append(run("app-state").stdout)
        reads = [part.pending_reads for part in parts]  # -1 (never finishes) wins
        stdout = "".join(text if text.endswith("\n") or not text else text + "\n" for text in out)
        reply = Reply(
            stdout=stdout,
            stderr="".join(part.stderr for part in parts),
            missing_reads=max(part.missing_reads for part in parts),
            pending_reads=-1 if -1 in reads else max(reads),
            seconds=max(part.seconds for part in parts),
        )
        return reply, "\n".join(ran)

    def _deploy(
        self, instance_id: str, command: str, comment: str, now: float
    ) -> tuple[Reply, str]:
        """The in-place deploy's one command (tasks/steps/update.py ``deploy_commands``): a
        rule on :data:`DEPLOY_COMMAND` answers it whole; else its stages run in order, each
        answered by the rules for its own text (the pull by ``DEPLOY``, the migration by
        ``MIGRATE``, the probe by ``PROBE``), each reported by its stage line, up to the first
        that fails. Returns the reply and the text of the stages that ran."""
        for rule in self._rules:
            if rule.pattern.pattern == DEPLOY_COMMAND and rule.matches(instance_id, command):
                nth = rule.counts.get(instance_id, 0)
                rule.counts[instance_id] = nth + 1
                return rule.respond(Call(instance_id, command, comment, now, nth)), command
        sections: dict[str, list[str]] = {}
        name = ""
        for line in command.splitlines():
            if line.startswith(DEPLOY_SECTION):
                name = line.removeprefix(DEPLOY_SECTION)
                sections[name] = []
            elif name:
                sections[name].append(line)
        out: list[str] = []
        parts: list[Reply] = []
        ran: list[str] = []
        for section, lines in sections.items():
            text = "\n".join(lines)
            reply, _ = self._match(instance_id, text, comment, now)
            parts.append(reply)
            ran.append(f"{DEPLOY_SECTION}{section}\n{text}")
            seconds = f"{reply.seconds:.3f}"
            if reply.exit_code != 0:
                out += [reply.stdout, reply.stderr, f"{STAGE_LINE} {section} failed {seconds}"]
                break
            detail = ""
            if section == "probe":
                paths = re.search(r"for path in (.+); do", text)
                path = shlex.split(paths.group(1))[0] if paths else "/"
                detail = f" {path} {' '.join(reply.stdout.split()[:2])}"
            elif section == "ttl" and "shutdown -h" in text:
                detail = " shutdown timer moved"
            elif section == "ttl":
                out.append(f"{STAGE_LINE} ttl skipped {seconds}")
                continue
            out += [
                reply.stdout if section == "migrate" else "",
                f"{STAGE_LINE} {section} ok {seconds}{detail}",
            ]
        failed = any(part.exit_code != 0 for part in parts)
        reads = [part.pending_reads for part in parts]
        reply = Reply(
            stdout="".join(
                text if text.endswith("\n") or not text else text + "\n" for text in out
            ),
            stderr="",
            exit_code=1 if failed else 0,
            missing_reads=max((part.missing_reads for part in parts), default=0),
            pending_reads=-1 if -1 in reads else max(reads, default=0),
            seconds=sum(part.seconds for part in parts),
        )
        return reply, "\n".join(ran)

    def _send_command(self, original: Callable[..., Any]) -> Callable[..., Any]:
        fake = self

        def send_command(backend: Any, *args: Any, **kwargs: Any) -> Any:
            instance_ids = list(kwargs.get("instance_ids") or [])
            targets = kwargs.get("targets") or []
            with fake._lock:
                offline = [
                    iid for iid in instance_ids if iid in fake._offline and not fake._offline[iid]()
                ]
            if offline:
                raise SSMException(
                    "InvalidInstanceId",
                    f"Instances [{offline}] not in a valid state for account {backend.account_id}",
                )
            fake._local.targeted = None if targets else set(instance_ids)
            try:
                return original(backend, *args, **kwargs)
            finally:
                fake._local.targeted = set()

        return send_command

    def _invocation_response(self, original: Callable[..., Any]) -> Callable[..., Any]:
        fake = self

        def invocation_response(command: Any, instance_id: str, plugin_name: str) -> Any:
            response = original(command, instance_id, plugin_name)
            targeted: set[str] | None = getattr(fake._local, "targeted", set())
            if targeted is not None and instance_id not in targeted:
                return response  # moto's side effect on an instance nobody addressed
            text = "\n".join(command.parameters.get("commands", []))
            reply = fake._reply_for(instance_id, text, command.comment)
            status = reply.final_status
            response.update(
                {
                    "ResponseCode": reply.exit_code,
                    "Status": status,
                    "StatusDetails": status,
                    "StandardOutputContent": reply.stdout[:OUTPUT_LIMIT],
                    "StandardErrorContent": reply.stderr[:OUTPUT_LIMIT],
                }
            )
            with fake._lock:
                fake._reads[(command.command_id, instance_id)] = [
                    reply.missing_reads,
                    reply.pending_reads,
                ]
                fake._done_at[(command.command_id, instance_id)] = time.monotonic() + reply.seconds
            return response

        return invocation_response

    def _get_invocation(self, original: Callable[..., Any]) -> Callable[..., Any]:
        fake = self

        def get_invocation(command: Any, instance_id: str, plugin_name: str | None) -> Any:
            invocation = original(command, instance_id, plugin_name)
            with fake._lock:
                reads = fake._reads.get((command.command_id, instance_id))
                if reads and reads[0] > 0:
                    reads[0] -= 1
                    raise SSMException(
                        "InvocationDoesNotExist",
                        "An error occurred (InvocationDoesNotExist) when calling the"
                        " GetCommandInvocation operation",
                    )
                running = time.monotonic() < fake._done_at.get((command.command_id, instance_id), 0)
                if reads and (reads[1] != 0 or running):
                    if reads[1] > 0:
                        reads[1] -= 1
                    return {
                        **invocation,
                        "Status": "InProgress",
                        "StatusDetails": "InProgress",
                        "ResponseCode": -1,
                        "StandardOutputContent": "",
                        "StandardErrorContent": "",
                    }
            return invocation

        return get_invocation

    @contextlib.contextmanager
    def patched(self) -> Iterator[ScriptedInstances]:
        """Patch moto for the duration of the block."""
        backend = ssm_models.SimpleSystemManagerBackend
        command = ssm_models.Command
        saved = (backend.send_command, command.invocation_response, command.get_invocation)
        backend.send_command = self._send_command(saved[0])  # type: ignore[method-assign]
        command.invocation_response = self._invocation_response(saved[1])  # type: ignore[method-assign]
        command.get_invocation = self._get_invocation(saved[2])  # type: ignore[method-assign]
        try:
            yield self
        finally:
            backend.send_command, command.invocation_response, command.get_invocation = saved  # type: ignore[method-assign]
