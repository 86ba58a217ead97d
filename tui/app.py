"""The modelbus terminal UI: every GPU host on the bus, live, and keys that command them.

The app never touches MQTT: :class:`tui.bridge.BusBridge` folds bus messages into the
:class:`tui.store.BusStore` and tells the app what changed; the app marks those
panels dirty and redraws them on a short clock, so a burst of telemetry costs one
redraw. Commands go back through ``bridge.send`` (``tui.command_keys``) and their
answers go to the outcome line above the footer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from rich.text import Text
from textual import events, work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.notifications import SeverityLevel
from textual.screen import Screen
from textual.widgets import DataTable, OptionList, Static

from bus.mqtt import ConnectionSettings
from shared.messages import utc_now
from tui.bridge import BusBridge, Link, LinkState
from tui.command_keys import CommandKeys
from tui.format import ago
from tui.screens import DebugScreen, DetailScreen
from tui.store import BusStore, Change, HostView
from tui.widgets.events import EventsPanel, render_events_detail
from tui.widgets.header import link_text, waiting_note
from tui.widgets.hosts import HostList
from tui.widgets.jobs import JobsTable, render_job_detail
from tui.widgets.keybar import Key, KeyBar
from tui.widgets.models import ModelsTable, render_loads, render_log_tail, render_model_detail
from tui.widgets.outcome import OutcomeLine, Said, render_said
from tui.widgets.vram_bar import GpuPanel
from tui.widgets.weights import WeightsPanel

# Redraw at most this often: telemetry from many hosts arrives in bursts.
REDRAW_INTERVAL_S = 0.25
# Ages ("loaded 3m ago") and fading jobs move with the clock, not with messages.
CLOCK_INTERVAL_S = 1.0
# Availability changes show at once; a host's VRAM figures in the list (its
# ``state``, every second from every host) follow the clock.
_HOST_LIST_KINDS = frozenset({"status", "info"})
# What to redraw when the selected host's topic changes (its state shows in the list).
_PANEL_OF_KIND = {
    "gpu": "gpus",
    "status": "gpus",
    "info": "gpus",
    "models": "models",
    "jobs": "jobs",
    "weights": "weights",
}
# Every panel that shows the selected host.
_HOST_PANELS = ("gpus", "models", "jobs", "weights", "link")

# From this width on the host list stands beside the dashboard.
WIDE_COLUMNS = 110
# What Enter on a model asks its agent for beside what the bus already said.
DETAIL_LOADS = 10
DETAIL_LOG_LINES = 15
# From this height on the weights panel is shown without asking (w toggles it).
TALL_ROWS = 40


class ModelbusApp(CommandKeys):
    TITLE = "modelbus"
    CSS = """
    #link { height: 1; padding: 0 1; background: $panel; }
    #banner { height: auto; padding: 0 1; background: $error 30%; display: none; }
    #banner.-shown { display: block; }
    #main.-offline > GpuPanel, #main.-offline > ModelsTable, #main.-offline > JobsTable {
        text-opacity: 50%;
    }
    #main { height: 1fr; }
    """
    # The key bar's order: what fits at 80 columns comes first; ? lists them all and
    # quitting is always shown.
    BINDINGS = [
        Binding("s", "switch", "switch", tooltip="plan, confirm, switch", id="model.switch"),
        Binding("l", "load", "load", tooltip="beside what runs", id="model.load"),
        Binding("u", "unload", "unload", tooltip="asks before forcing", id="model.unload"),
        Binding(
            "c",
            "cancel_job",
            "cancel",
            tooltip="the running job, or the one selected",
            id="job.cancel",
        ),
        Binding(
            "e", "events", "events", tooltip="all events and answers, in full", id="view.events"
        ),
        Binding(
            "L", "logs", "logs", tooltip="the selected model's output, followed", id="model.logs"
        ),
        Binding("d", "debug", "debug", tooltip="messages skipped as unusable", id="view.debug"),
        Binding(
            "g",
            "toggle_processes",
            "procs",
            tooltip="each GPU's processes, and whose",
            id="view.processes",
        ),
        Binding(
            "w",
            "toggle_weights",
            "weights",
            tooltip="installed weights and the disk",
            id="view.weights",
        ),
        Binding("p", "plan", "plan", tooltip="what a switch would stop", id="model.plan"),
        Binding("i", "install", "install", tooltip="Hugging Face weights", id="weights.install"),
        Binding(
            "x",
            "uninstall",
            "uninstall",
            tooltip="delete weights (asks first)",
            id="weights.uninstall",
        ),
        Binding(
            "a",
            "add_to_catalog",
            "add",
            tooltip="add the selected weights to the catalog",
            id="weights.add",
        ),
        Binding(
            "h", "history", "history", tooltip="the selected model's last loads", id="model.history"
        ),
        Binding("r", "status", "status", tooltip="ask the agent itself", id="host.status"),
        Binding(
            "left_square_bracket",
            "next_host(-1)",
            "host",
            key_display="[",
            tooltip="previous host",
            id="host.prev",
        ),
        Binding(
            "right_square_bracket",
            "next_host(1)",
            "host",
            key_display="]",
            tooltip="next host",
            id="host.next",
        ),
        Binding(
            "question_mark", "keys", "keys", key_display="?", tooltip="this list", id="app.keys"
        ),
        Binding("q", "quit", "quit", id="app.quit"),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True, id="app.quit_ctrl_c"),
    ]

    def __init__(
        self,
        store: BusStore,
        *,
        host: str | None = None,
        link: Link | None = None,
        now: Callable[[], datetime] = utc_now,
        redraw_interval_s: float = REDRAW_INTERVAL_S,
    ) -> None:
        super().__init__()
        self.store = store
        self.bridge: BusBridge | None = None
        self.selected_host = host
        self.link = link or Link(LinkState.CONNECTING, "the broker")
        self._now = now
        self._redraw_interval_s = redraw_interval_s
        self._dirty: set[str] = {"hosts", "events", *_HOST_PANELS}
        self._refused_told = False
        self._listed_hosts: set[str] = set()
        self._drew_gpus = False
        self._weights_toggled = False

    # -- wiring ---------------------------------------------------------------------

    def attach(self, bridge: BusBridge) -> None:
        """Use ``bridge`` for the bus; call before ``run``."""
        self.bridge = bridge

    def compose(self) -> ComposeResult:
        # Kept as attributes: App.query_one searches the screen on top, which is a
        # dialog while one is open, and redraws go on behind dialogs.
        self.link_line = Static(id="link")
        self.hosts = HostList(id="hosts")
        self.main = Vertical(id="main")
        self.banner = Static(id="banner")
        self.gpus = GpuPanel(id="gpus")
        self.models = ModelsTable(id="models")
        self.jobs = JobsTable(id="jobs")
        self.weights = WeightsPanel(id="weights")
        self.events_panel = EventsPanel(id="events")
        self.outcome = OutcomeLine(id="outcome")
        yield self.link_line
        with Horizontal():
            yield self.hosts
            with self.main:
                yield self.banner
                yield self.gpus
                yield self.models
                yield self.jobs
                yield self.weights
                yield self.events_panel
        yield self.outcome
        shown = [b for b in self.BINDINGS if isinstance(b, Binding) and b.show]
        keys = {b.id: Key(b.key_display or b.key, b.description) for b in shown}
        always = [keys.pop(name) for name in ("app.keys", "app.quit")]
        yield KeyBar(list(keys.values()), always, id="keys")

    def on_resize(self, event: events.Resize) -> None:
        self.hosts.display = event.size.width >= WIDE_COLUMNS
        if not self._weights_toggled:  # until w says otherwise, shown where there is room
            self._show_weights(event.size.height >= TALL_ROWS)

    def on_mount(self) -> None:
        self.models.focus()
        self.set_interval(self._redraw_interval_s, self._redraw)
        self.set_interval(CLOCK_INTERVAL_S, self._clock_tick)
        self._redraw()
        if self.bridge is not None:
            self.run_worker(self.bridge.run(), name="bus", group="bus", exit_on_error=True)

    # -- from the bridge (same event loop) ------------------------------------------

    def bus_changed(self, change: Change) -> None:
        if change.kind in _HOST_LIST_KINDS or change.host not in self._listed_hosts:
            self._dirty.add("hosts")
        if change.kind == "events":
            self._dirty.add("events")
        elif change.host == self.selected_host or self.selected_host is None:
            panel = _PANEL_OF_KIND.get(change.kind)
            if panel is not None:
                self._dirty.add(panel)
        if change.kind == "status":
            self._dirty.add("link")
        if not self._drew_gpus and change.kind == "gpu":
            # The first bars are worth drawing at once, not at the next tick.
            self._drew_gpus = True
            self.call_next(self._redraw)

    def link_changed(self, link: Link) -> None:
        self.link = link
        self._dirty.update(("link", "gpus"))
        self.gpus.waiting = waiting_note(link)
        if link.state is LinkState.REFUSED and not self._refused_told:
            self._refused_told = True
            self.notify(link.detail, title="Broker refused the connection", severity="error",
                        timeout=30)  # fmt: skip

    # -- drawing --------------------------------------------------------------------

    def _clock_tick(self) -> None:
        self._dirty.update(("models", "jobs", "link", "hosts", "weights"))

    def _redraw(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        views = self.store.hosts()
        if self.selected_host is None and views:
            self.selected_host = views[0].host_id
            dirty.update(_HOST_PANELS)
        view = self.store.host(self.selected_host) if self.selected_host else None
        now = self._now()
        if "link" in dirty:
            self.link_line.update(
                link_text(
                    self.link,
                    views,
                    self.selected_host,
                    sum(self.store.skipped.values()),
                    self.store.now(),
                )
            )
            self._show_offline(view, now)
        if "hosts" in dirty:
            self.hosts.show(views, self.selected_host)
            self._listed_hosts = {v.host_id for v in views}
        if "gpus" in dirty:
            self.gpus.show(view, self.store.now())
            self._show_offline(view, now)
        if "models" in dirty:
            self.models.show(view.models if view else {}, now)
        if "jobs" in dirty:
            jobs = self.store.active_jobs(view.host_id) if view else []
            self.jobs.show(jobs, now)
        if "weights" in dirty and self.weights.shown:
            self.weights.show(view.weights if view else None, now)
        if "events" in dirty:
            self.events_panel.show(self.store.events())

    def _show_offline(self, view: HostView | None, now: datetime) -> None:
        offline = view is not None and view.online is False
        self.main.set_class(offline, "-offline")
        banner = self.banner
        banner.set_class(offline, "-shown")
        if offline and view is not None:
            since = view.state.ts if view.state else None
            banner.update(
                Text(
                    f"{view.host_id} is OFFLINE: its agent is gone. Last known state "
                    f"(from {ago(since, now)} ago) is shown greyed.",
                    style="bold",
                )
            )

    # -- hosts ----------------------------------------------------------------------

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        host = event.option.id
        if host is not None and host != self.selected_host:
            self.selected_host = host
            self._dirty.update(_HOST_PANELS)
            self._redraw()

    def action_next_host(self, step: int) -> None:
        ids = [v.host_id for v in self.store.hosts()]
        if not ids:
            return
        current = ids.index(self.selected_host) if self.selected_host in ids else 0
        self.selected_host = ids[(current + step) % len(ids)]
        self._dirty.update(("hosts", *_HOST_PANELS))
        self._redraw()

    # -- commands -------------------------------------------------------------------

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a job or a model: it in full."""
        view = self.store.host(self.selected_host) if self.selected_host else None
        if view is None:
            return
        key = str(event.row_key.value)
        if event.data_table is self.jobs and key in view.jobs:
            self.push_screen(DetailScreen(render_job_detail(view.jobs[key])))
        elif event.data_table is self.models and key in view.models:
            detail = DetailScreen(render_model_detail(view.models[key], self._now()))
            self.push_screen(detail)
            self._complete_model_detail(detail, view.host_id, key)

    @work(group="details")
    async def _complete_model_detail(self, detail: DetailScreen, host: str, model: str) -> None:
        """What the agent is asked for: the model's last loads and log lines."""
        loads = await self.model_loads(host, model, limit=DETAIL_LOADS)
        logs = await self.model_logs(host, model, lines=DETAIL_LOG_LINES)
        if detail.is_attached:
            detail.extend(render_loads(loads, self._now()) + render_log_tail(logs))

    def action_events(self) -> None:
        said = render_said(list(self.outcome.said))
        events = render_events_detail(self.store.events())
        self.push_screen(DetailScreen(Text("\n").join([said, events])))

    def action_keys(self) -> None:
        """Every key with what it does (Textual's key panel); ``?`` again hides it."""
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def action_toggle_weights(self) -> None:
        """Show the weights panel and move into it; from inside it, hide it."""
        self._weights_toggled = True
        if self.weights.shown and self.weights.table.has_focus:
            self._show_weights(False)
            self.models.focus()
            return
        self._show_weights(True)
        self.weights.table.focus()

    def _show_weights(self, shown: bool) -> None:
        self.weights.set_class(shown, "-shown")
        self._dirty.add("weights")
        self._redraw()

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        """On the outcome line, not as a toast over the panels (``e`` keeps them all)."""
        self.outcome.say(Said(self._now(), severity, title, message))

    def action_toggle_processes(self) -> None:
        self.gpus.processes = not self.gpus.processes
        self.gpus.set_class(self.gpus.processes, "-processes")
        self._dirty.add("gpus")
        self._redraw()

    def action_debug(self) -> None:
        self.push_screen(DebugScreen(self.store))

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for title, help_text, action in (
            ("Switch to the selected model", "plan, confirm, then switch", self.action_switch),
            ("Load the selected model", "start it next to what runs", self.action_load),
            ("Unload the selected model", "stop it (asks before forcing)", self.action_unload),
            ("Plan a switch", "what a switch would stop, changing nothing", self.action_plan),
            ("Install weights", "download a Hugging Face repo", self.action_install),
            ("Uninstall weights", "delete installed weights (asks first)", self.action_uninstall),
            (
                "Add weights to the catalog",
                "the entry their install suggests",
                self.action_add_to_catalog,
            ),
            ("Ask the agent for its status", "does it answer, and what runs", self.action_status),
            ("Follow the selected model's log", "its server's output, live", self.action_logs),
            ("The selected model's last loads", "how long each took", self.action_history),
            (
                "Cancel a job",
                "the running one, or the one selected in the jobs table",
                self.action_cancel_job,
            ),
            ("Show skipped messages", "the debug view of bad bus input", self.action_debug),
            (
                "GPU processes",
                "every process using GPU memory, and whose",
                self.action_toggle_processes,
            ),
        ):
            yield SystemCommand(title, help_text, action)


def build_app(settings: ConnectionSettings, prefix: str, *, host: str | None = None) -> ModelbusApp:
    """The app wired to a bridge on ``settings``; ``run()`` it."""
    store = BusStore(prefix)
    app = ModelbusApp(store, host=host, link=Link(LinkState.CONNECTING, settings.describe()))
    app.attach(BusBridge(settings, store, on_change=app.bus_changed, on_link=app.link_changed))
    return app
