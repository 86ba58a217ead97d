"""The log view on its own, fed by a fetch of the test's: what it shows, that a bad
answer cannot make it spin, and that closing it while an answer is on its way is safe."""

from __future__ import annotations

import asyncio

from textual.app import App, ComposeResult
from textual.widgets import Log, Static

from shared.replies import LogLines
from tui.screens import LogScreen


class Host(App[None]):
    def compose(self) -> ComposeResult:
        yield Static("under the log view")


async def test_lines_come_in_order_cleaned_and_a_restart_is_marked() -> None:
    answers = [
        LogLines(model="m", lines=["one", "two \x1b[2Jcleared?"], cursor="r1.10", more=True),
        LogLines(model="m", lines=["three\x1b]52;c;ZXZpbA==\x07"], cursor="r1.20"),
        LogLines(model="m", lines=["again"], cursor="r2.5", restarted=True),
    ]
    asked: list[str | None] = []

    async def fetch(since: str | None) -> LogLines | str:
        asked.append(since)
        return answers.pop(0) if answers else LogLines(model="m", lines=[], cursor=since or "")

    app = Host()
    async with app.run_test() as pilot:
        screen = LogScreen("m: log", fetch, interval_s=0.05)
        await app.push_screen(screen)
        log = screen.query_one(Log)
        async with asyncio.timeout(10):
            while len(log.lines) < 5 or len(asked) < 4:
                await pilot.pause(0.05)
        assert list(log.lines[:5]) == [
            "one",
            "two cleared?",
            "three",
            "── the server restarted: its new log from the start ──",
            "again",
        ]
        # "more" asked again at once with the new cursor; then each answer's cursor.
        assert asked[:4] == [None, "r1.10", "r1.20", "r2.5"]


async def test_more_without_a_moving_cursor_does_not_spin_and_errors_are_shown() -> None:
    calls = 0

    async def fetch(since: str | None) -> LogLines | str:
        nonlocal calls
        calls += 1
        if calls == 1:
            return LogLines(model="m", lines=["x"], cursor="r1.1", more=True)
        if calls == 2:
            return LogLines(model="m", lines=[], cursor="r1.1", more=True)
        return "logs refused (unknown_model): no model 'm'"

    app = Host()
    async with app.run_test() as pilot:
        screen = LogScreen("m: log", fetch, interval_s=0.2)
        await app.push_screen(screen)
        await pilot.pause(0.5)
        # One at once, one for "more", then one per interval: not hundreds.
        assert calls <= 6, calls
        assert "unknown_model" in str(screen.query_one("#log-title", Static).render())


async def test_closing_while_an_answer_is_on_its_way_is_safe() -> None:
    answered = asyncio.Event()
    release = asyncio.Event()

    async def fetch(since: str | None) -> LogLines | str:
        answered.set()
        await release.wait()
        return LogLines(model="m", lines=["late"], cursor="r1.4")

    app = Host()
    async with app.run_test() as pilot:
        screen = LogScreen("m: log", fetch, interval_s=0.05)
        await app.push_screen(screen)
        await answered.wait()
        await pilot.press("escape")
        release.set()
        await pilot.pause(0.2)
        assert app.is_running and app.screen is not screen
