"""The commands that only read what the host keeps of a model: ``logs``, its server's output
as its runtime still has it, and ``history``, its last loads from the database. Neither
changes anything, so both answer at once; files, dockerd and SQLite are read off the loop
(by the runtimes, and ``asyncio.to_thread`` here)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from agent.database import Database
from agent.intake import Intake
from agent.log_lines import BadCursor, LogCursor
from agent.model_registry import ModelRecord, ModelRegistry
from agent.runtimes.base import RuntimeFailure
from shared.commands import CommandError, HistoryCommand, LogsCommand
from shared.messages import ErrorCode, Reply
from shared.replies import LoadHistory, LoadRecord, LogLines, ModelLoads
from shared.topics import CommandName

Handler = Callable[[Intake], Awaitable[Reply[Any] | None]]
# Loads one history reply holds at most (about 80 bytes each as JSON): a catalog of many
# models gets fewer per model, so that the reply stays within what a message may carry.
HISTORY_REPLY_LOADS = 2000


class ReadCommands:
    def __init__(self, registry: ModelRegistry, store: Database) -> None:
        self._registry = registry
        self._store = store

    def handlers(self) -> dict[str, Handler]:
        return {CommandName.LOGS: self._logs, CommandName.HISTORY: self._history}

    async def _logs(self, intake: Intake) -> Reply[LogLines]:
        command = intake.command
        assert isinstance(command, LogsCommand)
        record = self._record(command.model)
        runtime = self._registry.runtime(record)
        try:
            since = None if command.since is None else LogCursor.parse(command.since)
            read = await runtime.read_log(record.spec, since, command.lines, live=record.resident)
        except BadCursor:
            raise CommandError(
                ErrorCode.INVALID_PAYLOAD,
                "logs: field 'since': not a cursor of an earlier logs reply for "
                f"{command.model}; leave it out to get the last lines",
            ) from None
        except RuntimeFailure as exc:
            raise CommandError(
                ErrorCode.INTERNAL, f"cannot read the log of {command.model}: {exc}"
            ) from None
        return intake.reply_ok(
            data=LogLines(
                model=command.model,
                lines=list(read.lines),
                cursor=read.cursor.text,
                more=read.more,
                restarted=read.restarted,
                cut_lines=read.cut_lines,
            )
        )

    async def _history(self, intake: Intake) -> Reply[LoadHistory]:
        command = intake.command
        assert isinstance(command, HistoryCommand)
        if command.model is not None:
            self._record(command.model)
        names = [command.model] if command.model else sorted(self._registry.records)
        limit = min(command.limit, max(1, HISTORY_REPLY_LOADS // max(1, len(names))))
        rows = await asyncio.to_thread(self._store.recent_loads, limit, command.model)
        loads: dict[str, list[LoadRecord]] = {name: [] for name in names}
        for row in rows:
            if row.model in loads:
                loads[row.model].append(
                    LoadRecord(
                        loaded_at=datetime.fromtimestamp(row.at, UTC),
                        load_s=round(row.load_s, 3),
                        vram_used_mb=row.vram_mb,
                    )
                )
        models = [ModelLoads(model=name, loads=found) for name, found in loads.items()]
        return intake.reply_ok(data=LoadHistory(models=models, limit=limit))

    def _record(self, name: str) -> ModelRecord:
        """A model the agent knows (the catalog's, or one still running after it left)."""
        record = self._registry.records.get(name)
        if record is None:
            raise self._registry.unknown_model(name)
        return record
