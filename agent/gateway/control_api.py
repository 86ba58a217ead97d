"""The native control API, ``/api/v1`` (docs/http.md): every bus command as a route with
the bus's payloads, reply envelope and error codes; the host's state in parts; its job
history; and a server-sent events stream of what it publishes. Each route is served at
``/api/v1/...`` and at ``/api/v1/hosts/<host>/...``, where another host is a 404 (an agent
serves its own host only)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from agent.event_feed import Listener
from agent.gateway import errors
from agent.gateway.control import HostView, job_or_404, sse_data, sse_message, weights_or_busy
from agent.gateway.handlers import (
    Handler,
    json_bytes,
    json_list,
    json_model,
    read_small,
    require,
)
from agent.gateway.keys import Role, command_role
from agent.intake import local_intake, new_request_id
from shared.commands import (
    HISTORY_LIMIT_DEFAULT,
    HISTORY_LIMIT_MAX,
    LOG_LINES_DEFAULT,
    LOG_LINES_MAX,
    MAX_COMMAND_BYTES,
)
from shared.messages import ErrorCode, ErrorInfo, Reply, encode
from shared.replies import JobAccepted, JobsQueued, LoadHistory
from shared.topics import CommandName

API = "/api/v1"
HOST_API = "/api/v1/hosts/{host}"
# The parts of the status reply served on their own, as JSON arrays.
STATUS_PARTS = ("models", "gpus", "jobs")
# The levels below P/H/ an events stream may be narrowed to (?topics=models,jobs).
EVENT_TOPICS = ("status", "info", "state", "gpu", "models", "jobs", "weights", "events")
# A comment line this often keeps proxies from closing a quiet stream.
KEEPALIVE_S = 15.0
# A stream whose client takes longer than this to take one event ends.
WRITE_TIMEOUT_S = 30.0
HISTORY_DEFAULT = 100
HISTORY_MAX = 1000
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


class ControlApi:
    def __init__(self, view: HostView, catalog_names: Callable[[], list[str]]) -> None:
        self._view = view
        self._catalog_names = catalog_names

    def add_routes(self, app: web.Application) -> None:
        for prefix in (API, HOST_API):
            router = app.router
            router.add_get(f"{prefix}/status", self._for_host(self._status))
            for part in STATUS_PARTS:
                router.add_get(f"{prefix}/{part}", self._for_host(self._status_part(part)))
            router.add_get(f"{prefix}/models/{{name}}", self._for_host(self._model))
            router.add_get(f"{prefix}/models/{{name}}/logs", self._for_host(self._model_logs))
            router.add_get(f"{prefix}/models/{{name}}/loads", self._for_host(self._model_loads))
            router.add_get(f"{prefix}/jobs/{{job_id}}", self._for_host(self._job))
            router.add_get(f"{prefix}/weights", self._for_host(self._weights))
            router.add_get(f"{prefix}/history", self._for_host(self._history))
            router.add_get(f"{prefix}/events", self._for_host(self._events))
            for command in CommandName:
                router.add_post(f"{prefix}/{command}", self._for_host(self._command(command)))

    def _for_host(self, handler: Handler) -> Handler:
        async def routed(request: web.Request) -> web.StreamResponse:
            host = request.match_info.get("host")
            if host is not None and host != self._view.host_id:
                raise errors.not_found(
                    f"host {host[:64]!r} (this agent serves {self._view.host_id!r})"
                )
            return await handler(request)

        return routed

    # ---- commands ------------------------------------------------------------

    def _command(self, command: CommandName) -> Handler:
        role = command_role(command)

        async def handler(request: web.Request) -> web.Response:
            caller = require(request, role)
            wait = _flag(request, "wait")
            body = await read_small(request, MAX_COMMAND_BYTES)
            if body is None:  # refused unread past the limit
                too_large = ErrorInfo(
                    code=ErrorCode.PAYLOAD_TOO_LARGE,
                    message=f"the payload is larger than commands may be ({MAX_COMMAND_BYTES} "
                    "bytes)",
                )
                return command_response(
                    Reply(
                        request_id=new_request_id(),
                        command=command,
                        status="error",
                        error=too_large,
                    )
                )
            admin = caller.role >= Role.ADMIN
            reply = await self._view.call(local_intake(command, body, wait=wait, admin=admin))
            return command_response(reply)

        return handler

    # ---- the host's state ------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        """The bus's ``status`` reply, envelope and all."""
        require(request, Role.VIEWER)
        reply = Reply(
            request_id=new_request_id(), command="status", status="ok", data=self._view.status()
        )
        return json_bytes(encode(reply))

    def _status_part(self, part: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            require(request, Role.VIEWER)
            return json_list(getattr(self._view.status(), part))

        return handler

    async def _model(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        name = request.match_info["name"]
        found = [model for model in self._view.status().models if model.name == name]
        if not found:
            raise errors.unknown_model(name, self._catalog_names())
        return json_model(found[0])

    async def _model_logs(self, request: web.Request) -> web.Response:
        """The bus's ``logs`` data: ``?lines=`` (200, at most 1000), ``?since=`` a cursor."""
        require(request, command_role(CommandName.LOGS))
        lines = _limit(request.query.get("lines"), LOG_LINES_DEFAULT, LOG_LINES_MAX, "lines")
        fields: dict[str, Any] = {"model": request.match_info["name"], "lines": lines}
        if "since" in request.query:
            fields["since"] = request.query["since"]
        return json_model(await self._read(CommandName.LOGS, fields))

    async def _model_loads(self, request: web.Request) -> web.Response:
        """The bus's ``history`` data for one model: ``?limit=`` (20, at most 100)."""
        require(request, command_role(CommandName.HISTORY))
        limit = _limit(request.query.get("limit"), HISTORY_LIMIT_DEFAULT, HISTORY_LIMIT_MAX)
        history = await self._read(
            CommandName.HISTORY, {"model": request.match_info["name"], "limit": limit}
        )
        assert isinstance(history, LoadHistory)
        return json_model(history.models[0])

    async def _read(self, command: CommandName, fields: dict[str, Any]) -> Any:
        """A reading command's ``data``, run as the bus runs it; its refusal as an error."""
        reply = await self._view.call(local_intake(command, json.dumps(fields).encode()))
        if reply.error is not None:
            if reply.error.code == ErrorCode.UNKNOWN_MODEL:
                raise errors.unknown_model(fields["model"], self._catalog_names())
            raise errors.refused(reply.error.code, reply.error.message)
        return reply.data

    async def _job(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        return json_model(await job_or_404(self._view, request.match_info["job_id"]))

    async def _weights(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        return json_model(weights_or_busy(self._view))

    async def _history(self, request: web.Request) -> web.Response:
        """The newest jobs of the history (SQLite), newest first: ``?limit=`` (100)."""
        require(request, Role.VIEWER)
        limit = _limit(request.query.get("limit"), HISTORY_DEFAULT, HISTORY_MAX)
        return json_list(await self._view.history(limit))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: first ``snapshot`` (the status reply's data), then every
        message the agent publishes, named by its topic below ``P/H/``. A client that
        falls too far behind gets ``overflow`` and the end of the stream (EventSource
        reconnects, and gets a fresh snapshot)."""
        require(request, Role.VIEWER)
        topics = _event_topics(request.query.get("topics"))
        if self._view.events.full:
            raise errors.busy("too many event streams follow this host; try again later")
        with self._view.events.listen(topics) as listener:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",  # nginx: pass each event on at once
                }
            )
            await response.prepare(request)
            # A client that went away ends its stream, and its listener goes with it.
            with contextlib.suppress(ConnectionResetError):
                await self._stream(response, listener)
            return response

    async def _stream(self, response: web.StreamResponse, listener: Listener) -> None:
        """Until the client goes away, stops reading (a write that cannot be sent within
        WRITE_TIMEOUT_S frees its slot) or falls too far behind."""

        async def send(data: bytes) -> None:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await response.write(data)

        with contextlib.suppress(TimeoutError):
            await send(sse_message("snapshot", encode(self._view.status()), event_id=0))
            sequence = 0
            while True:
                item = await listener.next(KEEPALIVE_S)
                if listener.overflowed:
                    note = {"message": "this stream fell too far behind and ends; reconnect"}
                    await send(sse_message("overflow", json.dumps(note).encode()))
                    return
                if item is None:
                    await send(b": keepalive\n\n")
                    continue
                sequence += 1
                await send(sse_message(item.name, sse_data(item), event_id=sequence))
                # One event at a time: many queued ones must not starve the loop.
                await asyncio.sleep(0)


def command_response(reply: Reply[Any]) -> web.Response:
    """A command's reply as the bus sends it, with its HTTP status: 202 and the job's URL
    (``Location``, ``job_url``) for a job accepted without ``wait``; an error's status
    from errors.COMMAND_STATUS."""
    headers: dict[str, str] = {}
    status = HTTPStatus.OK
    if reply.status == "error" and reply.error is not None:
        status = errors.COMMAND_STATUS.get(reply.error.code, HTTPStatus.INTERNAL_SERVER_ERROR)
        if reply.error.code in errors.RETRY_LATER:
            headers["Retry-After"] = "5"
    elif isinstance(reply.data, JobAccepted | JobsQueued):
        status = HTTPStatus.ACCEPTED
    body = encode(reply)
    if reply.job_id is not None:
        url = f"{API}/jobs/{reply.job_id}"
        fields = json.loads(body)
        fields["job_url"] = url
        body = json.dumps(fields, separators=(",", ":")).encode()
        if status == HTTPStatus.ACCEPTED:
            headers["Location"] = url
    return json_bytes(body, int(status), headers)


def _flag(request: web.Request, name: str) -> bool | None:
    value = request.query.get(name)
    if value is None:
        return None
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise errors.bad_request(f"?{name}= takes true or false, not {value[:32]!r}", param=name)


def _limit(value: str | None, default: int, most: int, param: str = "limit") -> int:
    if value is None:
        return default
    if not (value.isascii() and value.isdigit() and len(value) <= 6) or not 1 <= int(value) <= most:
        raise errors.bad_request(f"?{param}= takes a whole number from 1 to {most}", param=param)
    return int(value)


def _event_topics(value: str | None) -> list[str]:
    topics = [part.strip() for part in (value or "").split(",") if part.strip()]
    unknown = [topic for topic in topics if topic not in EVENT_TOPICS]
    if unknown:
        raise errors.bad_request(
            f"?topics= names {unknown[0][:32]!r}; it takes any of {', '.join(EVENT_TOPICS)}",
            param="topics",
        )
    return topics
