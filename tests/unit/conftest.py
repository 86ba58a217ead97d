"""Fixtures the unit tests share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from agent.background import Background


@pytest.fixture
async def background() -> AsyncIterator[Background]:
    """The agent's background TaskGroup, running for the test."""
    tasks = Background()
    running = asyncio.create_task(tasks.run())
    await asyncio.sleep(0)
    yield tasks
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
