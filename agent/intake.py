"""Command intake, pure: a raw message on ``P/H/cmd/<command>`` becomes either a
validated command or an error, plus where its one reply must go."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from shared.commands import (
    MAX_COMMAND_BYTES,
    CommandBase,
    CommandError,
    decode_command,
    request_id_of,
    with_wait,
)
from shared.messages import ErrorCode, ErrorInfo, Reply
from shared.topics import HostTopics

# Reply topics are built from the command level of the topic; anything odd
# (a 60 KiB level, control characters) is answered on .../reply/unknown instead.
_PLAIN_COMMAND_LEVEL = re.compile(r"[A-Za-z0-9_-]{1,64}")
Data = TypeVar("Data", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class ReplyRoute:
    # None: the command came by another way than the bus (HTTP) and its reply goes back
    # to its caller, never to a topic.
    topic: str | None
    correlation_data: bytes | None = None


CALLER_ROUTE = ReplyRoute(None)


@dataclass(frozen=True, slots=True)
class Intake:
    """One received command: either ``command`` or ``error`` is set."""

    command_name: str
    request_id: str
    route: ReplyRoute
    command: CommandBase | None = None
    error: CommandError | None = None
    # It came on the admin topic (P/H/admin/cmd/, only the admin role may write there) or
    # from an admin key: it may change what the agent executes.
    admin: bool = False

    def reply_ok(self, *, job_id: str | None = None, data: Data | None = None) -> Reply[Data]:
        return Reply(
            request_id=self.request_id,
            command=self.command_name,
            status="ok",
            job_id=job_id,
            data=data,
        )

    def reply_error(
        self,
        error: CommandError | None = None,
        *,
        job_id: str | None = None,
        data: BaseModel | None = None,
        fresh_request_id: bool = False,
    ) -> Reply[Any]:
        failure = error or self.error
        assert failure is not None, "reply_error needs an error"
        return Reply(
            request_id=new_request_id() if fresh_request_id else self.request_id,
            command=self.command_name,
            status="error",
            job_id=job_id,
            data=data,
            error=ErrorInfo(code=failure.code, message=failure.message),
        )


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def command_level(topics: HostTopics, topic: str) -> str | None:
    """The ``<command>`` of ``P/H/cmd/<command>`` or ``P/H/admin/cmd/<command>``; None for
    any other topic."""
    for head in (topics.base + "/cmd/", topics.base + "/admin/cmd/"):
        if topic.startswith(head):
            level = topic[len(head) :]
            return level if "/" not in level else None
    return None


def is_admin_topic(topics: HostTopics, topic: str) -> bool:
    return topic.startswith(topics.base + "/admin/cmd/")


def refused_intake(
    topics: HostTopics,
    level: str,
    error: CommandError,
    *,
    correlation_data: bytes | None = None,
    request_id: str | None = None,
) -> Intake:
    """A command refused before it was read: answered on ``P/H/reply/<command>``
    (``P/H/reply/private/<command>`` for a private one)."""
    command_name = level if _PLAIN_COMMAND_LEVEL.fullmatch(level) else "unknown"
    return Intake(
        command_name=command_name,
        request_id=request_id or new_request_id(),
        route=ReplyRoute(topics.default_reply(command_name), correlation_data),
        error=error,
    )


def local_intake(
    command_name: str, payload: bytes, *, wait: bool | None = None, admin: bool = False
) -> Intake:
    """A command that came by HTTP, read as the bus reads one (JSON object or bare text,
    the same limits and errors); ``wait`` (``?wait=true``), where given, overrides the
    body's own for the commands that have one."""

    def read() -> CommandBase:
        command = decode_command(command_name, payload, max_bytes=MAX_COMMAND_BYTES)
        if wait is not None and "wait" in type(command).model_fields:
            return with_wait(command, wait)
        return command

    return _decoded(command_name, CALLER_ROUTE, read, admin=admin)


def read_command(
    topics: HostTopics,
    level: str,
    payload: bytes,
    *,
    retained: bool = False,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    max_bytes: int,
    admin: bool = False,
) -> Intake:
    command_name = level if _PLAIN_COMMAND_LEVEL.fullmatch(level) else "unknown"
    default_route = ReplyRoute(topics.default_reply(command_name), correlation_data)

    def failed(code: ErrorCode, message: str) -> Intake:
        return refused_intake(
            topics,
            level,
            CommandError(code, message),
            correlation_data=correlation_data,
            request_id=request_id_of(payload),
        )

    if response_topic is not None and not topics.is_allowed_response_topic(response_topic):
        return failed(
            ErrorCode.FORBIDDEN,
            f"response topic {response_topic[:128]!r} is outside {topics.base}/reply/#, "
            "where this host's replies go; the command was not executed",
        )
    root = topics.reply_root(command_name)
    if response_topic is not None and not response_topic.startswith(root):
        # Inside this host's reply tree, so the refusal (which holds nothing private) can go
        # where its sender listens.
        return Intake(
            command_name=command_name,
            request_id=request_id_of(payload) or new_request_id(),
            route=ReplyRoute(response_topic, correlation_data),
            error=CommandError(
                ErrorCode.FORBIDDEN,
                f"{command_name} replies may hold secrets and go only under {root}, which "
                f"viewers cannot read: use a response topic there, such as {root}<your "
                "name>; the command was not executed",
            ),
        )
    if retained:
        return failed(
            ErrorCode.FORBIDDEN,
            "retained commands are never executed (they would run again on every restart); "
            "publish without -r. The retained message was cleared",
        )
    route = ReplyRoute(response_topic, correlation_data) if response_topic else default_route
    return _decoded(
        command_name,
        route,
        lambda: decode_command(level, payload, max_bytes=max_bytes),
        admin=admin,
    )


def _decoded(
    command_name: str, route: ReplyRoute, read: Callable[[], CommandBase], *, admin: bool = False
) -> Intake:
    """The command ``read`` returns, or the error it raises, answered on ``route``."""
    try:
        command = read()
    except CommandError as error:
        return Intake(
            command_name=command_name,
            request_id=error.request_id or new_request_id(),
            route=route,
            error=error,
        )
    return Intake(
        command_name=command_name,
        request_id=command.request_id or new_request_id(),
        route=route,
        command=command,
        admin=admin,
    )
