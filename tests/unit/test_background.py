"""The agent's background tasks: owned by one TaskGroup, a failure ending only its own
task, and publishes gathered (Debounced) or spaced out (Throttled)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent.background import Background, Debounced, Throttled


async def test_a_failing_task_is_logged_and_its_siblings_go_on(
    background: Background, caplog: pytest.LogCaptureFixture
) -> None:
    done = asyncio.Event()

    async def fails() -> None:
        raise RuntimeError("boom")

    async def finishes() -> None:
        await asyncio.sleep(0.01)
        done.set()

    background.spawn(fails(), name="fails")
    background.spawn(finishes(), name="finishes")
    async with asyncio.timeout(5):
        await done.wait()
    assert "background task fails failed" in caplog.text


async def test_work_spawned_before_run_waits_for_it() -> None:
    tasks = Background()
    ran = asyncio.Event()

    async def early() -> None:
        ran.set()

    assert tasks.spawn(early(), name="early") is None
    running = asyncio.create_task(tasks.run())
    async with asyncio.timeout(5):
        await ran.wait()
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


async def test_debounced_runs_once_for_a_burst(background: Background) -> None:
    runs: list[int] = []

    async def action() -> None:
        runs.append(len(runs))

    debounced = Debounced(background, action, delay_s=0.05, name="d")
    for _ in range(20):
        debounced.trigger()
    await asyncio.sleep(0.2)
    assert runs == [0]
    debounced.trigger()  # a change after the run starts a new round
    await asyncio.sleep(0.2)
    assert runs == [0, 1]


async def test_throttled_runs_at_once_then_at_most_once_per_interval(
    background: Background,
) -> None:
    times: list[float] = []
    loop = asyncio.get_running_loop()
    first = asyncio.Event()

    async def action() -> None:
        times.append(loop.time())
        first.set()

    throttled = Throttled(background, action, interval_s=0.2, name="t")
    throttled.trigger()
    async with asyncio.timeout(5):
        await first.wait()
    assert len(times) == 1
    for _ in range(50):
        throttled.trigger()
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.4)
    # Every trigger after the first: one more run, a full interval after the first.
    assert len(times) == 2 and times[1] - times[0] >= 0.19


@pytest.fixture(autouse=True)
def _log_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
