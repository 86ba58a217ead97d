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
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TextIO

from pydantic import ValidationError

from bus.mqtt import (
    BrokerRefusedError,
    ConnectionSettings,
    MqttError,
    connect,
)
from bus.requests import Answer
from modelbus.client_session import (
    DEFAULT_REPLY_TIMEOUT_S,
    ENDED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ClientExit,
    Request,
    Session,
    deadline_in,
    resolve_host,
)
from modelbus.shell_output import (
    JobProgress,
    format_event,
    format_plan,
    format_reply,
    job_summary,
    read_data,
)
from shared.commands import COMMAND_MODELS, describe_validation_error
from shared.messages import (
    ErrorCode,
    Event,
    JobState,
    JobStatus,
    Reply,
)
from shared.replies import (
    PLAN_RESULT,
    PlanRefused,
)
from shared.topics import CommandName, HostTopics, parse_topic

# -- one command, one reply ------------------------------------------------------------


async def send(
    session: Session,
    host: str,
    command: CommandName,
    fields: Mapping[str, Any],
    deadline: float | None,
    *,
    admin: bool = False,
) -> Answer:
    """Publish one command and wait for its reply (TimeoutError at ``deadline``)."""
    request = session.requests.make(host, command, fields, admin=admin)
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
    reply_deadline = deadline if deadline is not None else deadline_in(DEFAULT_REPLY_TIMEOUT_S)
    # The job's own end has no limit unless --timeout gave one (a download can take hours).
    job_deadline = deadline
    # The host's status (to explain silence) is already subscribed to, with P/+/status.
    # To wait, every job of the host is subscribed to before publishing, since the job id
    # is only known from the reply.
    if request.wait:
        await session.subscribe(topics.job("+"))
    try:
        answer = await send(
            session, host, request.command, request.fields, reply_deadline, admin=request.admin
        )
    except TimeoutError:
        raise no_reply(session, host, request.timeout_s or DEFAULT_REPLY_TIMEOUT_S) from None
    reply = answer.reply
    if request.json_output and not (request.wait and reply.status == "ok" and reply.job_id):
        print(json.dumps(answer.raw), file=out, flush=True)
    if reply.status == "error":
        return refused(name, reply, err)
    if request.command is CommandName.PLAN:
        plan = read_data(PLAN_RESULT.validate_python, reply.data, "plan")
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


async def install_and_add(
    session: Session, request: Request, out: TextIO, err: TextIO, deadline: float | None
) -> int:
    """``install --add``: the install, followed to its end, then ``catalog add`` of the
    entry its install suggests (the weights' name: --name, or the repo's last part)."""
    code = await run_request(session, request, out, err, deadline)
    if code != EXIT_OK:
        return code
    name = request.fields.get("name") or str(request.fields["repo"]).rsplit("/", 1)[-1][:64]
    add = Request(
        command=CommandName.CATALOG,
        fields={"action": "add", "weights": name},
        host=request.host,
        json_output=request.json_output,
        timeout_s=request.timeout_s,
    )
    return await run_request(session, add, out, err, deadline)


def no_reply(session: Session, host: str, waited_s: float) -> ClientExit:
    return ClientExit(
        EXIT_TIMEOUT, f"no reply from {host} within {waited_s:g} s; {_why_silent(session, host)}"
    )


def refused(name: str, reply: Reply[Any], err: TextIO) -> int:
    """Say why the agent refused the command; the exit code for it."""
    error = reply.error
    if error is None:
        print(f"modelbus {name}: error reply without details", file=err, flush=True)
        return EXIT_ERROR
    print(f"modelbus {name}: {error.code}: {error.message}", file=err, flush=True)
    # The agent refused a value of the command: a usage error, as if refused here.
    return EXIT_USAGE if error.code is ErrorCode.INVALID_PAYLOAD else EXIT_ERROR


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


# -- entry points ----------------------------------------------------------------------


RequestRunner = Callable[[Session, Request, TextIO, TextIO, float | None], Awaitable[int]]


def run_command(
    settings: ConnectionSettings,
    prefix: str,
    request: Request,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    runner: RequestRunner | None = None,
    interrupted: int = EXIT_INTERRUPTED,
) -> int:
    """Send one command (and follow its job with ``wait``), or run ``runner`` (``logs -f``,
    whose Ctrl-C is its ``interrupted`` exit code); the process's exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    name = request.command.value
    # Checked by the contract's own models before connecting: a usage error needs no broker.
    problem = contract_problem(request)
    if problem is not None:
        print(f"modelbus {name}: {problem} (see modelbus {name} --help)", file=err, flush=True)
        return EXIT_USAGE

    async def body(session: Session, deadline: float | None) -> int:
        return await (runner or run_request)(session, request, out, err, deadline)

    return run_connected(
        settings, prefix, name, body, err, timeout_s=request.timeout_s, interrupted=interrupted
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

    return run_connected(
        settings, prefix, "events", body, err, timeout_s=timeout_s, interrupted=EXIT_OK
    )


def run_connected(
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

    if timeout_s is not None and timeout_s < settings.connect_timeout_s:
        # The TCP connect runs in a worker thread that a cancel cannot stop, and the
        # interpreter waits for it at exit: its own timeout must end with ours.
        settings = dataclasses.replace(settings, connect_timeout_s=max(0.1, timeout_s))

    async def main() -> int:
        deadline = deadline_in(timeout_s)
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
