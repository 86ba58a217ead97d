"""The client commands (``modelbus status``, ``switch``, ``events``...): the bus from a shell.

One command is one short connection: a fresh client id and a clean session (MQTT 5, 3.1.1
where the broker has no 5, as :func:`bus.mqtt.connect` decides). Everything an answer can
arrive on is subscribed to *before* the command is published, so nothing slips past: the
reply topic (``P/H/reply/cli-<random>`` under MQTT 5, ``P/H/reply/<command>`` matched by
request id under 3.1.1) and, with ``--wait``, ``P/H/jobs/+``, whose updates are kept until
the reply names the job to follow. Only :mod:`bus.mqtt` talks to the broker.

Exit codes (docs/client.md): 0 ok; 1 an error reply, a failed job, a plan that cannot be
carried out, or a host that is not online; 2 usage (a value the contract refuses, here or in
an ``invalid_payload`` reply); 3 timeout; 4 broker unreachable, lost or refusing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TextIO, TypeVar

from pydantic import ValidationError

from bus.mqtt import (
    BrokerRefusedError,
    Connection,
    ConnectionSettings,
    Message,
    MqttError,
    Subscription,
    connect,
)
from bus.requests import Answer, Requests
from shared.commands import COMMAND_MODELS, describe_validation_error
from shared.messages import (
    ErrorCode,
    Event,
    Installed,
    JobState,
    JobStatus,
    Loaded,
    Unloaded,
)
from shared.replies import (
    PLAN_RESULT,
    HostStatus,
    JobAccepted,
    JobOutcome,
    JobsQueued,
    PlanFits,
    PlanRefused,
    Uninstalled,
)
from shared.topics import CommandName, HostTopics, parse_topic
from tui.format import duration_long, size_long

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130

DEFAULT_REPLY_TIMEOUT_S = 30.0
# Retained ``P/+/status`` messages arrive at once after subscribing; this is how long
# to collect them when no --host was given.
DISCOVERY_WINDOW_S = 0.5
# How long a --host may take to show its retained status before the client says it has
# never announced itself (instead of waiting the whole reply timeout for nobody).
HOST_GRACE_S = 1.0
PROGRESS_BAR_WIDTH = 24
ENDED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class ClientExit(Exception):
    """Ends a client command with an exit code and one line for stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Request:
    """One client command as the command line gave it."""

    command: CommandName
    fields: Mapping[str, Any] = field(default_factory=dict)
    host: str | None = None
    wait: bool = False
    json_output: bool = False
    timeout_s: float | None = None


# -- the session -----------------------------------------------------------------------


class Session:
    """One connection. A pump moves messages into a queue; every message read is also
    kept, in order, so a job update that came before its reply can be found later."""

    def __init__(self, connection: Connection, prefix: str) -> None:
        self.connection = connection
        self.prefix = prefix
        self.requests = Requests(prefix, "cli")
        self.seen: list[Message] = []
        self._queue: asyncio.Queue[Message | BaseException] = asyncio.Queue()
        self._pump_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Session:
        self._pump_task = asyncio.create_task(self._pump())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task

    async def _pump(self) -> None:
        try:
            async for message in self.connection.messages():
                self._queue.put_nowait(message)
        except Exception as exc:  # the reader re-raises it where it waits
            self._queue.put_nowait(exc)
        else:
            self._queue.put_nowait(ConnectionError("the broker closed the connection"))

    @property
    def protocol(self) -> str:
        return self.connection.protocol

    async def subscribe(self, *filters: str) -> None:
        await self.connection.subscribe([Subscription(f, qos=1) for f in filters])

    async def next(self, deadline: float | None) -> Message:
        """The next message; TimeoutError at ``deadline`` (the loop's clock)."""
        async with asyncio.timeout_at(deadline):
            item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self.seen.append(item)
        return item

    def last_seen(self, topic: str) -> Message | None:
        return next((m for m in reversed(self.seen) if m.topic == topic), None)


def _deadline(seconds: float | None) -> float | None:
    return None if seconds is None else asyncio.get_running_loop().time() + seconds


# -- hosts -----------------------------------------------------------------------------


async def host_statuses(
    session: Session, window_s: float = DISCOVERY_WINDOW_S, *, until: str | None = None
) -> dict[str, str]:
    """``{host: "online"|"offline"}`` from the retained ``P/+/status`` messages, collected
    for ``window_s`` or until host ``until`` has been seen."""
    await session.subscribe(f"{session.prefix}/+/status")
    deadline = _deadline(window_s)
    statuses: dict[str, str] = {}
    with contextlib.suppress(TimeoutError):
        while until is None or until not in statuses:
            message = await session.next(deadline)
            parsed = parse_topic(session.prefix, message.topic)
            if parsed is not None and parsed.kind == "status" and parsed.argument is None:
                statuses[parsed.host] = message.payload.decode("utf-8", "replace").strip()
    return statuses


async def resolve_host(session: Session, host: str | None) -> str:
    """``host`` if it is online (an error otherwise, told at once: its status is retained),
    or the one host online on the bus when none was given (a usage error otherwise)."""
    if host is not None:
        return await _online(session, host)
    statuses = await host_statuses(session)
    online = sorted(h for h, status in statuses.items() if status == "online")
    if len(online) == 1:
        return online[0]
    if online:
        raise ClientExit(
            EXIT_USAGE, f"{len(online)} hosts are online ({', '.join(online)}); pass --host HOST"
        )
    offline = sorted(statuses)
    seen = f" (offline: {', '.join(offline)})" if offline else ""
    raise ClientExit(
        EXIT_USAGE,
        f"no host is online under prefix {session.prefix!r}{seen}; pass --host HOST, "
        "or check --broker and --prefix",
    )


async def _online(session: Session, host: str) -> str:
    statuses = await host_statuses(session, HOST_GRACE_S, until=host)
    where = f"{session.prefix}/"
    others = ", ".join(f"{h} ({statuses[h]})" for h in sorted(statuses) if h != host)
    known = f"known hosts are {others}" if others else "no other host has announced itself"
    if host not in statuses:
        raise ClientExit(
            EXIT_ERROR, f"no host {host!r} on {where}: {known}; check --host, --prefix and --broker"
        )
    if statuses[host] != "online":
        raise ClientExit(
            EXIT_ERROR,
            f"{host} is {statuses[host]} on {where} (its agent stopped or lost the broker): "
            f"start its agent ({known})",
        )
    return host


# -- one command, one reply ------------------------------------------------------------


async def send(
    session: Session,
    host: str,
    command: CommandName,
    fields: Mapping[str, Any],
    deadline: float | None,
) -> Answer:
    """Publish one command and wait for its reply (TimeoutError at ``deadline``)."""
    request = session.requests.make(host, command, fields)
    # Subscribed before publishing, so the reply cannot slip past.
    await session.subscribe(request.reply_filter(session.connection.protocol))
    await session.connection.publish(
        request.topic,
        request.payload,
        qos=1,
        response_topic=request.response_topic,
        correlation_data=request.correlation_data,
    )
    while True:
        answer = request.answer(await session.next(deadline))
        if answer is not None:
            return answer


async def follow_job(
    session: Session,
    host: str,
    job_id: str,
    on_update: Callable[[JobState], None],
    deadline: float | None,
) -> tuple[JobState, dict[str, Any]]:
    """Every update of ``P/H/jobs/<job_id>`` (those already received first) until the job
    ends; TimeoutError at ``deadline``."""
    topic = HostTopics(session.prefix, host).job(job_id)
    backlog = iter([m for m in session.seen if m.topic == topic])
    while True:
        message = next(backlog, None) or await session.next(deadline)
        if message.topic != topic:
            continue
        if not message.payload:
            raise ClientExit(EXIT_ERROR, f"job {job_id} was cleared before it was seen to end")
        job = JobState.model_validate_json(message.payload)
        on_update(job)
        if job.state in ENDED:
            return job, json.loads(message.payload)


def contract_problem(request: Request) -> str | None:
    """What the contract's own model of the command refuses in ``request.fields``, as the
    agent would say it; None when the agent would accept them."""
    try:
        COMMAND_MODELS[request.command].model_validate(dict(request.fields))
    except ValidationError as exc:
        return describe_validation_error(exc)
    return None


async def run_request(
    session: Session, request: Request, out: TextIO, err: TextIO, deadline: float | None
) -> int:
    """``deadline`` (the loop's clock) ends the whole command when --timeout gave one."""
    host = await resolve_host(session, request.host)
    topics = HostTopics(session.prefix, host)
    name = request.command.value
    reply_deadline = deadline if deadline is not None else _deadline(DEFAULT_REPLY_TIMEOUT_S)
    # The job's own end has no limit unless --timeout gave one (a download can take hours).
    job_deadline = deadline
    # The host's status (to explain silence) is already subscribed to, with P/+/status.
    # To wait, every job of the host is subscribed to before publishing, since the job id
    # is only known from the reply.
    if request.wait:
        await session.subscribe(topics.job("+"))
    try:
        answer = await send(session, host, request.command, request.fields, reply_deadline)
    except TimeoutError:
        waited = request.timeout_s or DEFAULT_REPLY_TIMEOUT_S
        raise ClientExit(
            EXIT_TIMEOUT, f"no reply from {host} within {waited:g} s; {_why_silent(session, host)}"
        ) from None
    reply = answer.reply
    if request.json_output and not (request.wait and reply.status == "ok" and reply.job_id):
        print(json.dumps(answer.raw), file=out, flush=True)
    if reply.status == "error":
        error = reply.error
        if error is None:
            print(f"modelbus {name}: error reply without details", file=err, flush=True)
            return EXIT_ERROR
        print(f"modelbus {name}: {error.code}: {error.message}", file=err, flush=True)
        # The agent refused a value of the command: a usage error, as if refused here.
        return EXIT_USAGE if error.code is ErrorCode.INVALID_PAYLOAD else EXIT_ERROR
    if request.command is CommandName.PLAN:
        plan = _read(PLAN_RESULT.validate_python, reply.data, "plan")
        if isinstance(plan, PlanRefused):
            # A plan that cannot be carried out fails, so `plan X && switch X` does what it says.
            for line in format_plan(plan):
                print(f"modelbus {name}: {line}", file=err, flush=True)
            return EXIT_ERROR
    if not (request.wait and reply.job_id):
        if not request.json_output:
            for line in format_reply(host, answer, request.fields):
                print(line, file=out, flush=True)
        return EXIT_OK

    job_id = reply.job_id
    progress = JobProgress(out, tty=_isatty(out)) if not request.json_output else None
    try:
        job, raw_job = await follow_job(
            session, host, job_id, progress.update if progress else _ignore, job_deadline
        )
    except TimeoutError:
        if progress is not None:
            progress.close()
        raise ClientExit(
            EXIT_TIMEOUT,
            f"job {job_id} did not end within {request.timeout_s:g} s; it goes on on {host} "
            f"(modelbus cancel {job_id} stops it)",
        ) from None
    if progress is not None:
        progress.close()
    if request.json_output:
        print(json.dumps(raw_job), file=out, flush=True)
    elif job.state is JobStatus.SUCCEEDED:
        print(job_summary(job), file=out, flush=True)
    if job.state is JobStatus.SUCCEEDED:
        return EXIT_OK
    error = job.error
    what = f"{error.code}: {error.message}" if error else job.message or "no details"
    print(f"modelbus {name}: job {job_id} {job.state}: {what}", file=err, flush=True)
    return EXIT_ERROR


def _ignore(_job: JobState) -> None:
    return None


def _why_silent(session: Session, host: str) -> str:
    """Why a host that was online when the command was sent did not answer."""
    status = session.last_seen(HostTopics(session.prefix, host).status)
    if status is not None and status.payload.decode("utf-8", "replace").strip() != "online":
        return f"{host} went offline meanwhile: start its agent"
    return "its agent is online but busy or stuck; try again or raise --timeout"


# -- events ----------------------------------------------------------------------------


async def stream_events(
    session: Session,
    host: str | None,
    *,
    count: int | None,
    json_output: bool,
    timeout_s: float | None,
    deadline: float | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """``deadline`` (the loop's clock, from the start of the command) ends the listening."""
    topic = HostTopics(session.prefix, host).events if host else f"{session.prefix}/+/events"
    await session.subscribe(topic)
    # On stderr so stdout stays the events only; scripts (and tests) can wait for it.
    print(f"modelbus events: listening on {topic} (Ctrl-C to stop)", file=err, flush=True)
    printed = 0
    while count is None or printed < count:
        try:
            message = await session.next(deadline)
        except TimeoutError:
            if count is None:
                return EXIT_OK
            raise ClientExit(
                EXIT_TIMEOUT, f"{printed} of {count} event(s) within {timeout_s:g} s"
            ) from None
        parsed = parse_topic(session.prefix, message.topic)
        if parsed is None or parsed.kind != "events" or parsed.argument is not None:
            continue
        try:
            event = Event.model_validate_json(message.payload)
        except ValidationError:
            continue
        if json_output:
            line = json.dumps({"host": parsed.host, **json.loads(message.payload)})
        else:
            line = format_event(parsed.host, event)
        print(line, file=out, flush=True)
        printed += 1
    return EXIT_OK


def format_event(host: str, event: Event) -> str:
    when = event.ts.astimezone().strftime("%H:%M:%S")
    about = " ".join(
        part
        for part in (
            f"model={event.model}" if event.model else "",
            f"gpu={event.gpu}" if event.gpu is not None else "",
            f"job={event.job_id}" if event.job_id else "",
        )
        if part
    )
    line = f"{when} {host} {event.severity.value:<8} {event.event_type}: {event.message}"
    return f"{line} [{about}]" if about else line


# -- entry points ----------------------------------------------------------------------


def run_command(
    settings: ConnectionSettings,
    prefix: str,
    request: Request,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Send one command (and follow its job with ``wait``); the process's exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    name = request.command.value
    # Checked by the contract's own models before connecting: a usage error needs no broker.
    problem = contract_problem(request)
    if problem is not None:
        print(f"modelbus {name}: {problem} (see modelbus {name} --help)", file=err, flush=True)
        return EXIT_USAGE

    async def body(session: Session, deadline: float | None) -> int:
        return await run_request(session, request, out, err, deadline)

    return _run(
        settings, prefix, name, body, err, timeout_s=request.timeout_s, interrupted=EXIT_INTERRUPTED
    )


def run_events(
    settings: ConnectionSettings,
    prefix: str,
    *,
    host: str | None,
    count: int | None,
    json_output: bool,
    timeout_s: float | None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print events as they arrive until ``count`` were printed or Ctrl-C (exit 0)."""
    out = out or sys.stdout
    err = err or sys.stderr

    async def body(session: Session, deadline: float | None) -> int:
        return await stream_events(
            session,
            host,
            count=count,
            json_output=json_output,
            timeout_s=timeout_s,
            deadline=deadline,
            out=out,
            err=err,
        )

    return _run(settings, prefix, "events", body, err, timeout_s=timeout_s, interrupted=EXIT_OK)


def _run(
    settings: ConnectionSettings,
    prefix: str,
    name: str,
    body: Callable[[Session, float | None], Awaitable[int]],
    err: TextIO,
    *,
    timeout_s: float | None,
    interrupted: int,
) -> int:
    """Connect, run ``body`` and map what ended it to an exit code. ``timeout_s`` bounds
    the whole command, connecting included: a broker that accepts the TCP connection and
    never answers would otherwise hold it for a connect timeout per MQTT version."""

    async def main() -> int:
        deadline = _deadline(timeout_s)
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout_at(deadline):
                    connection = await stack.enter_async_context(connect(settings))
            except TimeoutError:
                reason = f"no MQTT answer within {timeout_s:g} s"
                raise ClientExit(EXIT_UNREACHABLE, _unreachable(settings, reason)) from None
            session = await stack.enter_async_context(Session(connection, prefix))
            return await body(session, deadline)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        if interrupted != EXIT_OK:
            print(f"modelbus {name}: interrupted", file=err, flush=True)
        return interrupted
    except ClientExit as exc:
        print(f"modelbus {name}: {exc.message}", file=err, flush=True)
        return exc.code
    except BrokerRefusedError as exc:
        print(f"modelbus {name}: {exc}", file=err, flush=True)
        return EXIT_UNREACHABLE
    except (ConnectionError, OSError) as exc:
        print(f"modelbus {name}: {_unreachable(settings, exc)}", file=err, flush=True)
        return EXIT_UNREACHABLE
    except MqttError as exc:
        print(f"modelbus {name}: {_unreachable(settings, exc)}", file=err, flush=True)
        return EXIT_UNREACHABLE


def _unreachable(settings: ConnectionSettings, exc: BaseException | str) -> str:
    return (
        f"cannot reach the broker at {settings.describe()} ({exc}); is it running? "
        "(set it with --broker, MODELBUS_BROKER or --config)"
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- job progress ----------------------------------------------------------------------


class JobProgress:
    """A job's updates on a terminal: one ``\\r``-redrawn bar; elsewhere (pipes, logs)
    one plain line per state or phase change and per 10 % step."""

    def __init__(self, out: TextIO, *, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self._last_key: tuple[str, str, int] | None = None
        self._drawn = 0

    def update(self, job: JobState) -> None:
        if self.tty:
            line = progress_bar(job)
            pad = max(0, self._drawn - len(line))
            self.out.write("\r" + line + " " * pad)
            self.out.flush()
            self._drawn = len(line)
            return
        if job.state in ENDED:
            return  # the summary line (or the error on stderr) says how it ended
        key = (job.state.value, job.phase.value, math.floor(job.progress * 10))
        if key != self._last_key:
            self._last_key = key
            print(progress_line(job), file=self.out, flush=True)

    def close(self) -> None:
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = 0


def _subject(job: JobState) -> str:
    return job.model or job.repo or job.job_id


def _details(job: JobState) -> list[str]:
    parts = []
    if job.bytes_total:
        parts.append(f"{size_long(job.bytes_done or 0)}/{size_long(job.bytes_total)}")
    if job.queue_position is not None and job.state is JobStatus.QUEUED:
        parts.append(f"position {job.queue_position}")
    if job.eta_s is not None and job.state not in ENDED:
        parts.append(f"ETA {duration_long(job.eta_s)}")
    return parts


def progress_bar(job: JobState, width: int = PROGRESS_BAR_WIDTH) -> str:
    filled = round(job.progress * width)
    bar = "#" * filled + "-" * (width - filled)
    parts = [
        f"{job.command} {_subject(job)}",
        f"[{bar}]",
        f"{job.progress * 100:3.0f}%",
        job.phase.value,
        *_details(job),
    ]
    return "  ".join(parts)


def progress_line(job: JobState) -> str:
    parts = [
        f"{job.command} {_subject(job)}:",
        f"{job.state.value}/{job.phase.value}",
        f"{job.progress * 100:.0f}%",
        *_details(job),
    ]
    line = " ".join(parts)
    return f"{line} - {job.message}" if job.message else line


def job_summary(job: JobState) -> str:
    took = ""
    if job.started_at and job.finished_at:
        took = f" in {duration_long((job.finished_at - job.started_at).total_seconds())}"
    line = f"{job.command} {_subject(job)}: {job.state.value}{took}"
    result = job.result
    extras = []
    if isinstance(result, Loaded):
        if result.evicted:
            extras.append(f"evicted {', '.join(result.evicted)}")
        extras.append(f"serving at {result.service}")
    elif isinstance(result, Unloaded):
        extras.append(f"freed {result.freed_mb} MiB")
    elif isinstance(result, Installed):
        extras.append(f"{result.size_mb} MiB in {result.path}")
    if job.message:
        line = f"{line} - {job.message}"
    return f"{line} ({'; '.join(extras)})" if extras else line


# -- replies for people ----------------------------------------------------------------


def format_reply(host: str, answer: Answer, fields: Mapping[str, Any] | None = None) -> list[str]:
    """The lines a person reads for an ``ok`` reply to a command with ``fields``."""
    reply = answer.reply
    fields = fields or {}
    subject = fields.get("model") or fields.get("repo") or fields.get("name")
    command = reply.command
    if command == CommandName.STATUS:
        return format_status(host, _read(HostStatus.model_validate, reply.data, "status"))
    if command == CommandName.PLAN:
        return format_plan(_read(PLAN_RESULT.validate_python, reply.data, "plan"))
    if command == CommandName.UNINSTALL:
        gone = _read(Uninstalled.model_validate, reply.data, "uninstall")
        return [f"uninstalled {gone.name} from {host}: freed {gone.freed_mb} MiB"]
    if command == CommandName.CANCEL:
        job = _read(JobOutcome.model_validate, reply.data, "cancel").job
        message = f" - {job.message}" if job.message else ""
        return [f"job {job.job_id} ({job.command} {_subject(job)}): {job.state}{message}"]
    if command == CommandName.UNLOAD and reply.job_id is None:
        queued = _read(JobsQueued.model_validate, reply.data, "unload")
        return [f"{command} {entry.model}: job {entry.job_id}" for entry in queued.jobs]
    if reply.job_id:
        accepted = _read(JobAccepted.model_validate, reply.data, command)
        where = f", position {accepted.queue_position}" if accepted.queue_position else ""
        joined = " (joined an equal job)" if accepted.joined else ""
        what = f"{command} {subject}" if subject else command
        return [f"{what} on {host}: job {reply.job_id} {accepted.state}{where}{joined}"]
    if reply.data:
        return [json.dumps(reply.data, indent=2)]
    return [f"{command} on {host}: ok"]


Shape = TypeVar("Shape")


def _read(parse: Callable[[Any], Shape], data: Any, what: str) -> Shape:
    """``data`` as the contract's model, or a ClientExit naming what did not match."""
    try:
        return parse(data)
    except ValidationError as exc:
        raise ClientExit(
            EXIT_ERROR,
            f"the agent's {what} reply does not match this client's protocol "
            f"({describe_validation_error(exc)}); are both the same version?",
        ) from None


def _mb(value: int | None) -> str:
    return "?" if value is None else str(value)


def format_status(host: str, status: HostStatus) -> list[str]:
    lines = []
    i = status.info
    versions = ", ".join(
        part
        for part in (
            f"agent {i.agent_version}",
            f"MQTT {i.mqtt_protocol}",
            f"{i.gpu_backend} GPUs",
            f"driver {i.driver_version}" if i.driver_version else "",
            f"CUDA {i.cuda_version}" if i.cuda_version else "",
        )
        if part
    )
    lines.append(f"host {host} ({i.hostname}): {versions}")
    if status.state is not None:
        s = status.state
        lines.append(
            f"VRAM {s.used_mb}/{s.total_mb} MiB used, {s.free_mb} MiB free; "
            f"queue {s.queue_length}" + (f", running job {s.active_job}" if s.active_job else "")
        )
    for g in status.gpus:
        util = f", {g.utilization_percent}% util" if g.utilization_percent is not None else ""
        temp = f", {g.temperature_c} °C" if g.temperature_c is not None else ""
        alerts = f", alerts: {', '.join(g.alerts)}" if g.alerts else ""
        lines.append(
            f"  GPU {g.index} {g.name or '?'}: {_mb(g.memory_used_mb)}/{_mb(g.memory_total_mb)} "
            f"MiB used{util}{temp}{alerts}"
        )
    if status.models:
        lines.append("models:")
        width = max(len(m.name) for m in status.models)
        for m in status.models:
            vram = m.vram_used_mb if m.vram_used_mb is not None else m.vram_estimate_mb
            flags = " pinned" if m.pinned else ""
            gpus = ",".join(map(str, m.gpus)) or "-"
            error = f" - {m.error}" if m.error else ""
            lines.append(
                f"  {m.name:<{width}}  {m.state.value:<9} GPU {gpus}  {_mb(vram)} MiB"
                f"  {m.runtime}{flags}{error}"
            )
    if status.jobs:
        lines.append("jobs:")
        lines.extend(f"  {j.job_id} {progress_line(j)}" for j in status.jobs)
    return lines


def format_plan(plan: PlanFits | PlanRefused) -> list[str]:
    model = plan.model
    if isinstance(plan, PlanRefused):
        return [f"{model} does not fit: {plan.message}"]
    gpus = ", ".join(str(g) for g in plan.gpus) or "?"
    if plan.already_loaded:
        return [f"{model} is already loaded (GPU {gpus}); a switch would change nothing"]
    lines = [
        f"a switch to {model} fits on GPU {gpus}"
        + (f", stopping {', '.join(plan.evict)}" if plan.evict else ", stopping nothing")
    ]
    for gpu in sorted(plan.free_before_mb, key=lambda k: int(k) if k.isdigit() else 0):
        freed = plan.freed_mb.get(gpu, 0)
        left = plan.free_after_mb.get(gpu, "?")
        lines.append(
            f"  GPU {gpu}: needs {plan.required_mb} MiB; free {plan.free_before_mb[gpu]} MiB"
            f" + freed {freed} MiB -> {left} MiB left"
        )
    return lines
