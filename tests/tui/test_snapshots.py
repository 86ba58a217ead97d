"""Screenshots of the dashboard on a fixed bus (see ``dashboard_fixture``), compared
with the SVGs under ``__snapshots__``. After an intended change of the look, check the
new pictures and accept them with ``pytest tests/tui --snapshot-update``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from rich.text import Text
from textual.widget import Widget
from textual.widgets import DataTable, Static

from tests.tui.dashboard_fixture import FIXED_NOW, LINK, dashboard_store
from tui.app import ModelbusApp
from tui.widgets.events import EventsPanel
from tui.widgets.hosts import HostList
from tui.widgets.jobs import JobsTable
from tui.widgets.keybar import KeyBar
from tui.widgets.models import ModelsTable
from tui.widgets.outcome import OutcomeLine
from tui.widgets.vram_bar import GpuPanel
from tui.widgets.weights import WeightsPanel

SnapCompare = Callable[..., bool]


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Events show local wall-clock time: pin the zone so the pictures match anywhere."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture(autouse=True)
def colour(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's NO_COLOR must not change the coloured pictures."""
    monkeypatch.delenv("NO_COLOR", raising=False)


def dashboard(host: str = "gpu1", **kwargs: Any) -> ModelbusApp:
    return ModelbusApp(dashboard_store(), host=host, link=LINK, now=lambda: FIXED_NOW, **kwargs)


def test_dashboard_80x24(snap_compare: SnapCompare) -> None:
    assert snap_compare(dashboard(), terminal_size=(80, 24))


def test_dashboard_160x48(snap_compare: SnapCompare) -> None:
    """Tall enough for the finished jobs the agent keeps and for the weights panel."""
    assert snap_compare(dashboard(), terminal_size=(160, 48))


def test_processes_80x24(snap_compare: SnapCompare) -> None:
    """``g``: each GPU's processes under its bar, and whose they are."""
    assert snap_compare(dashboard(), press=["g"], terminal_size=(80, 24))


def test_offline_host_80x24(snap_compare: SnapCompare) -> None:
    """``]`` moves to gpu2, whose agent is gone: a banner, last-known state greyed."""
    assert snap_compare(dashboard(), press=["right_square_bracket"], terminal_size=(80, 24))


def test_no_color_80x24(snap_compare: SnapCompare, monkeypatch: pytest.MonkeyPatch) -> None:
    """Textual reads NO_COLOR when the app is built; glyphs must still tell states apart."""
    monkeypatch.setenv("NO_COLOR", "1")
    app = dashboard()
    assert app.no_color
    assert snap_compare(app, terminal_size=(80, 24))


async def test_every_panel_is_on_the_80x24_screen() -> None:
    app = dashboard()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen.region
        panels: dict[str, Widget] = {
            "link": app.query_one("#link"),
            "gpus": app.query_one(GpuPanel),
            "models": app.query_one(ModelsTable),
            "jobs": app.query_one(JobsTable),
            "events": app.query_one(EventsPanel),
            "outcome": app.query_one(OutcomeLine),
            "keys": app.query_one(KeyBar),
        }
        for name, widget in panels.items():
            assert widget.display, f"{name} is hidden"
            assert widget.region.area > 0, f"{name} has no room at 80x24"
            assert screen.contains_region(widget.region), f"{name} {widget.region} is off screen"

        gpus = str(app.query_one(GpuPanel).render())
        assert "GPU0 [" in gpus and "GPU1 [" in gpus
        assert "qwen3-vl-30b" in gpus  # the legend
        assert row_keys(app.query_one(ModelsTable)) == [
            "infinitetalk",
            "ovi-11b",
            "qwen3-vl-30b",
            "wan2.1-14b",
            "whisperx",
        ]
        # Running, queued, the one that failed seconds ago, then older finished ones, as
        # many as a quarter of the dashboard holds (the older ones need more room).
        assert row_keys(app.query_one(JobsTable)) == ["j-0007", "j-0008", "j-0006", "j-0004"]
        assert not app.query_one(WeightsPanel).display
        # One host at a time at 80 columns: the header names it and how to move on.
        assert not app.query_one(HostList).display
        assert app.query_one(HostList).option_count == 2
        assert "host gpu1 1/2 ([ ])" in str(app.query_one("#link").render())
        assert len(str(app.query_one(EventsPanel).render()).splitlines()) >= 3


async def test_wide_terminals_list_the_hosts_beside_the_dashboard() -> None:
    app = dashboard()
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        hosts = app.query_one(HostList)
        assert hosts.display and hosts.region.area > 0
        assert [hosts.get_option_at_index(i).id for i in range(2)] == ["gpu1", "gpu2"]


async def test_the_key_bar_fits_and_always_offers_every_key() -> None:
    """At 80 columns the most used keys, debug among them; ``?`` lists every one and
    ``q`` quits, whatever the width; at 160 columns every key is on the bar."""
    for width, expected in (
        (80, "s l u c e L d a ? q"),
        (160, "s l u c e L d g w p i x a h r [ ] ? q"),
    ):
        app = dashboard()
        async with app.run_test(size=(width, 24 if width == 80 else 48)) as pilot:
            await pilot.pause()
            bar = app.query_one(KeyBar)
            text = bar.render()
            assert text.cell_len <= bar.content_region.width, width
            keys = [span for span in text.spans if "reverse" in str(span.style)]
            assert " ".join(text.plain[k.start : k.end] for k in keys) == expected, width


async def test_the_jobs_table_never_scrolls_sideways() -> None:
    """A long message is cut with an ellipsis at the table's edge (Enter shows it all):
    a horizontal scrollbar took a row between the jobs and the events at 80x24."""
    app = dashboard()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.pause()  # the cells fitted at the first layout are measured at the next
        table = app.query_one(JobsTable)
        assert table.virtual_size.width <= table.scrollable_content_region.width
        phase = str(table.get_row("j-0006")[-1])
        assert phase.endswith("…") and len(phase) > 8, phase
        assert "server exited with code 137".startswith(phase[:-1]), phase


async def test_a_tall_screen_shows_older_finished_jobs() -> None:
    app = dashboard()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        assert row_keys(app.query_one(JobsTable)) == [
            "j-0007",
            "j-0008",
            "j-0006",
            "j-0004",
            "j-0005",
            "j-0003",
        ]


async def test_models_table_fits_at_80x24() -> None:
    app = dashboard()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        table = app.query_one(ModelsTable)
        assert table.virtual_size.width <= table.scrollable_content_region.width


async def test_header_fits_at_80x24() -> None:
    app = dashboard()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        link = app.query_one("#link", Static)
        assert isinstance(link.content, Text)
        assert link.content.cell_len <= link.content_region.width


def row_keys(table: DataTable[Any]) -> list[str | None]:
    return [row.key.value for row in table.ordered_rows]
