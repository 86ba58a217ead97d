"""The client commands' connection to the bus: one session per command (a pump that
keeps every message read, so a job update that came before its reply is found later),
which hosts are online, and how a command ends (``ClientExit``, the exit codes of
docs/client.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from bus.mqtt import (
    Connection,
    Message,
    Subscription,
)
from bus.requests import Requests
from shared.messages import (
    JobStatus,
)
from shared.topics import CommandName, parse_topic

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130

DEFAULT_REPLY_TIMEOUT_S = 30.0
# Retained ``P/+/status`` messages arrive at once after subscribing; this is how long
# to collect them when no --host was given.
DISCOVERY_WINDOW_S = 0.5
# How long a --host may take to show its retained status before the client says it has
# never announced itself (instead of waiting the whole reply timeout for nobody).
HOST_GRACE_S = 1.0
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
    # On the admin topic, P/H/admin/cmd/ (catalog entries that run anything).
    admin: bool = False


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
        self._subscribed: set[str] = set()

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
        """Subscribe to the filters not subscribed to yet (a follow asks every second)."""
        new = [f for f in dict.fromkeys(filters) if f not in self._subscribed]
        if new:
            await self.connection.subscribe([Subscription(f, qos=1) for f in new])
            self._subscribed.update(new)

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


def deadline_in(seconds: float | None) -> float | None:
    return None if seconds is None else asyncio.get_running_loop().time() + seconds


# -- hosts -----------------------------------------------------------------------------


async def host_statuses(
    session: Session, window_s: float = DISCOVERY_WINDOW_S, *, until: str | None = None
) -> dict[str, str]:
    """``{host: "online"|"offline"}`` from the retained ``P/+/status`` messages, collected
    for ``window_s`` or until host ``until`` has been seen."""
    await session.subscribe(f"{session.prefix}/+/status")
    deadline = deadline_in(window_s)
    statuses: dict[str, str] = {}

    def read(message: Message) -> None:
        parsed = parse_topic(session.prefix, message.topic)
        if parsed is not None and parsed.kind == "status" and parsed.argument is None:
            statuses[parsed.host] = message.payload.decode("utf-8", "replace").strip()

    # A second command of the same session (install --add) finds them among those read.
    for message in list(session.seen):
        read(message)
    with contextlib.suppress(TimeoutError):
        while until is None or until not in statuses:
            read(await session.next(deadline))
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
