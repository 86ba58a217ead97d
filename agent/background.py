"""The agent's short tasks (a publish gathered over a moment, a finished job's clear
after its retention, a queued job's announcement) in one TaskGroup that the service
runs: nothing outlives a shutdown, and nothing runs unowned.

A failure in one of them is logged and ends only that task: a TaskGroup would
otherwise cancel every sibling, and with them the agent."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("modelbus.agent")


class Background:
    def __init__(self) -> None:
        self._group: asyncio.TaskGroup | None = None
        # Work spawned before ``run`` (a preload's announcement at start) waits for it.
        self._early: list[tuple[Coroutine[Any, Any, None], str]] = []

    def spawn(self, work: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None] | None:
        """The task running ``work``; None while it waits for ``run``."""
        if self._group is None:
            self._early.append((work, name))
            return None
        return self._group.create_task(_logged(work, name), name=name)

    async def run(self) -> None:
        """Own the tasks until cancelled; cancelling this cancels every one of them."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            for work, name in self._early:
                group.create_task(_logged(work, name), name=name)
            self._early.clear()
            try:
                await asyncio.Event().wait()
            finally:
                self._group = None

    def close(self) -> None:
        """Drop what never started (the service stopped before ``run``)."""
        for work, _ in self._early:
            work.close()
        self._early.clear()


class Debounced:
    """``action`` once, ``delay_s`` after the first of any number of ``trigger`` calls:
    a burst of changes costs one publish, not one per change."""

    def __init__(
        self,
        background: Background,
        action: Callable[[], Awaitable[None]],
        *,
        delay_s: float | Callable[[], float],
        name: str,
    ) -> None:
        self._background = background
        self._action = action
        self._delay_s = delay_s
        self._name = name
        self._pending = False
        self._task: asyncio.Task[None] | None = None

    def trigger(self) -> None:
        if not self._pending:
            self._pending = True
            self._task = self._background.spawn(self._later(), name=self._name)

    async def _later(self) -> None:
        try:
            delay = self._delay_s() if callable(self._delay_s) else self._delay_s
            await asyncio.sleep(delay)
        finally:
            # Changes from here on start a new round: the action may not see them.
            self._pending = False
        await self._action()


async def _logged(work: Coroutine[Any, Any, None], name: str) -> None:
    try:
        await work
    except Exception:
        log.exception("background task %s failed", name)


class Throttled:
    """``action`` at most once per ``interval_s``: at once when the last run is that long
    ago, else once at the end of the interval for all the triggers until then. Traffic
    (a request starting or ending) then costs the bus one message a second per model."""

    def __init__(
        self,
        background: Background,
        action: Callable[[], Awaitable[None]],
        *,
        interval_s: float,
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._background = background
        self._action = action
        self._interval_s = interval_s
        self._name = name
        self._clock = clock
        self._last = -math.inf
        self._pending = False

    def trigger(self) -> None:
        if self._pending:
            return
        self._pending = True
        wait_s = max(0.0, self._last + self._interval_s - self._clock())
        self._background.spawn(self._run(wait_s), name=self._name)

    async def _run(self, wait_s: float) -> None:
        try:
            if wait_s:
                await asyncio.sleep(wait_s)
        finally:
            self._pending = False
        self._last = self._clock()
        await self._action()
