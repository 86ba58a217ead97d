"""Commands in, replies out: a message on ``P/H/cmd/<verb>`` is read (``intake``), run
by its handler and answered once, whatever it held. Nothing a sender writes, and no
bug in a handler, gets past one error reply; the message loop goes on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from agent.background import Background
from agent.intake import Intake, command_level, is_admin_topic, read_command, refused_intake
from bus.mqtt import MAX_PUBLISH_BYTES, Connection, Message
from bus.reconnecting import ReconnectingClient
from shared.commands import MAX_COMMAND_BYTES, CommandError
from shared.messages import ErrorCode, Reply, encode
from shared.topics import HostTopics

log = logging.getLogger("modelbus.agent")

CommandHandler = Callable[[Intake], Awaitable[Reply[Any] | None]]
# Commands received (and so acknowledged to their senders) but not yet read, at most:
# past this a command is answered ``busy`` at once instead of being executed.
MAX_WAITING_COMMANDS = 1000


class CommandDispatcher:
    def __init__(
        self,
        topics: HostTopics,
        client: ReconnectingClient,
        background: Background,
        *,
        executed: Callable[[], Awaitable[None]],
    ) -> None:
        self._topics = topics
        self._client = client
        self._background = background
        self._executed = executed
        self._handlers: dict[str, CommandHandler] = {}
        # Commands whose work may take long (deleting 40 GB of weights): they run beside
        # the intake, so the commands after them are read and answered meanwhile.
        self._beside: set[str] = set()
        # Retained commands we cleared: their empty echo is not a new command.
        self._pending_clears: set[str] = set()
        # Commands from HTTP awaiting a reply that comes later (``wait``), by id(intake).
        self._callers: dict[int, asyncio.Future[Reply[Any]]] = {}

    def register(
        self, handlers: Mapping[str, CommandHandler], *, beside: Collection[str] = ()
    ) -> None:
        self._handlers.update(handlers)
        self._beside.update(beside)

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    def is_command(self, topic: str) -> bool:
        return command_level(self._topics, topic) is not None

    async def on_message(self, connection: Connection, message: Message) -> None:
        level = command_level(self._topics, message.topic)
        if level is None:
            return
        if message.topic in self._pending_clears and not message.payload:
            self._pending_clears.discard(message.topic)
            return
        try:
            intake = read_command(
                self._topics,
                level,
                message.payload,
                retained=message.retain,
                response_topic=message.response_topic,
                correlation_data=message.correlation_data,
                max_bytes=MAX_COMMAND_BYTES,
                admin=is_admin_topic(self._topics, message.topic),
            )
        except Exception:  # a bug in reading must cost one error reply, not the agent
            log.exception("could not read a command on %.200s", message.topic)
            intake = refused_intake(
                self._topics,
                level,
                CommandError(
                    ErrorCode.INTERNAL, "the agent failed to read the command; see its log"
                ),
                correlation_data=message.correlation_data,
            )
        if message.retain:
            self._pending_clears.add(message.topic)
            self._client.publish(message.topic, b"", qos=1, retain=True)
        waiting = connection.backlog
        if intake.command is not None and waiting >= MAX_WAITING_COMMANDS:
            # Already acknowledged to its sender: it gets a refusal, never silence.
            reply: Reply[Any] | None = intake.reply_error(
                CommandError(
                    ErrorCode.BUSY,
                    f"the agent has {waiting} commands waiting to be read (at most "
                    f"{MAX_WAITING_COMMANDS}); the command was not executed, try again shortly",
                )
            )
        elif intake.command is not None and intake.command_name in self._beside:
            self._background.spawn(self._answer(intake), name=f"command-{intake.request_id}")
            return
        else:
            reply = await self._execute(intake)
        if reply is not None:
            self.send_reply(intake, reply)

    async def call(self, intake: Intake) -> Reply[Any]:
        """Execute a command that came by another way than the bus (HTTP) and return its
        one reply, however long its job takes (``wait``). The command runs in the
        background, as a bus command does: a caller that goes away (its handler
        cancelled) cancels only its wait, never the command half-way; its reply, when it
        comes, goes nowhere."""
        answer: asyncio.Future[Reply[Any]] = asyncio.get_running_loop().create_future()
        self._callers[id(intake)] = answer
        try:
            self._background.spawn(self._answer(intake), name=f"http-command-{intake.request_id}")
            return await answer
        finally:
            self._callers.pop(id(intake), None)

    async def _answer(self, intake: Intake) -> None:
        reply = await self._execute(intake)
        if reply is not None:
            self.send_reply(intake, reply)

    def send_reply(self, intake: Intake, reply: Reply[Any]) -> None:
        if reply.status == "error" and reply.error is not None:
            log.info(
                "command %s refused (%s): %s",
                intake.command_name,
                reply.error.code,
                reply.error.message,
            )
        topic = intake.route.topic
        if topic is None:
            caller = self._callers.pop(id(intake), None)
            if caller is not None and not caller.done():
                caller.set_result(reply)
            return
        try:
            payload = encode(reply)
        except ValueError:  # nothing the sender wrote should get here; if it does, say so
            log.exception("the reply to a %s command could not be encoded", intake.command_name)
            payload = encode(
                intake.reply_error(
                    CommandError(
                        ErrorCode.INTERNAL, "the agent could not encode its reply; see its log"
                    ),
                    fresh_request_id=True,
                )
            )
        if len(payload) > MAX_PUBLISH_BYTES:
            log.error("the reply to a %s command is %d bytes", intake.command_name, len(payload))
            payload = encode(
                intake.reply_error(
                    CommandError(
                        ErrorCode.INTERNAL,
                        f"the reply is {len(payload)} bytes, more than a message may carry "
                        f"({MAX_PUBLISH_BYTES}); see the agent's log",
                    )
                )
            )
        self._client.publish(
            topic,
            payload,
            qos=1,
            correlation_data=intake.route.correlation_data,
        )

    async def _execute(self, intake: Intake) -> Reply[Any] | None:
        if intake.error is not None or intake.command is None:
            return intake.reply_error()
        handler = self._handlers.get(intake.command_name)
        if handler is None:
            return intake.reply_error(
                CommandError(
                    ErrorCode.UNKNOWN_COMMAND,
                    f"this agent does not execute {intake.command_name!r} yet; "
                    f"it executes: {', '.join(self.commands)}",
                )
            )
        try:
            reply = await handler(intake)
        except CommandError as error:
            return intake.reply_error(error)
        except Exception:  # one bad command must never take the agent down
            log.exception("command %s failed", intake.command_name)
            return intake.reply_error(
                CommandError(
                    ErrorCode.INTERNAL, "the agent failed to execute the command; see its log"
                )
            )
        await self._executed()
        return reply
