"""The modelbus terminal UI: every GPU host on the bus, live, and keys that command them.

The app never touches MQTT: :class:`tui.bridge.BusBridge` folds bus messages into the
:class:`tui.store.BusStore` and tells the app what changed; the app marks those
panels dirty and redraws them on a short clock, so a burst of telemetry costs one
redraw. Commands go back through ``bridge.send`` and their replies become notifications.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from rich.text import Text
from textual import events, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, OptionList, Static

from bus.mqtt import ConnectionSettings
from shared.messages import ModelState, Reply, utc_now
from shared.topics import CommandName
from tui.actions import (
    PlanSummary,
    describe_cancel,
    describe_reply,
    force_reason,
    job_to_cancel,
    summarize_plan,
)
from tui.bridge import BusBridge, Link, LinkState
from tui.format import ago
from tui.screens import AskScreen, ConfirmScreen, DebugScreen, DetailScreen
from tui.store import BusStore, Change, HostView
from tui.widgets.events import EventsPanel, render_events_detail
from tui.widgets.header import link_text, waiting_note
from tui.widgets.hosts import HostList
from tui.widgets.jobs import JobsTable, render_job_detail
from tui.widgets.models import ModelsTable, render_model_detail
from tui.widgets.tables import selected_key
from tui.widgets.vram_bar import GpuPanel

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
}

# From this width on the host list stands beside the dashboard.
WIDE_COLUMNS = 110


# The binding that sends each bus command: every command is a key (a test holds them to
# the contract's list).
COMMAND_BINDINGS = {
    CommandName.SWITCH: "model.switch",
    CommandName.LOAD: "model.load",
    CommandName.UNLOAD: "model.unload",
    CommandName.PLAN: "model.plan",
    CommandName.INSTALL: "weights.install",
    CommandName.UNINSTALL: "weights.uninstall",
    CommandName.CANCEL: "job.cancel",
    CommandName.STATUS: "host.status",
}


class ModelbusApp(App[int]):
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
    BINDINGS = [
        Binding("s", "switch", "Switch", id="model.switch"),
        Binding("l", "load", "Load", id="model.load"),
        Binding("u", "unload", "Unload", id="model.unload"),
        Binding("p", "plan", "Plan", id="model.plan"),
        Binding("i", "install", "Install", id="weights.install"),
        Binding("x", "uninstall", "Uninstall", show=False, id="weights.uninstall"),
        Binding("r", "status", "Ask status", show=False, id="host.status"),
        Binding("c", "cancel_job", "Cancel", id="job.cancel"),
        # Shown in the header when something was skipped; the footer has no room at 80.
        Binding("d", "debug", "Debug", show=False, id="view.debug"),
        Binding("g", "toggle_processes", "Processes", show=False, id="view.processes"),
        Binding("e", "events", "Events", show=False, id="view.events"),
        Binding("right_square_bracket", "next_host(1)", "Next host", show=False, id="host.next"),
        Binding("left_square_bracket", "next_host(-1)", "Prev host", show=False, id="host.prev"),
        Binding("q", "quit", "Quit", id="app.quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True, id="app.quit_ctrl_c"),
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
        self._dirty: set[str] = {"hosts", "gpus", "models", "jobs", "events", "link"}
        self._refused_told = False
        self._listed_hosts: set[str] = set()
        self._drew_gpus = False

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
        self.events_panel = EventsPanel(id="events")
        yield self.link_line
        with Horizontal():
            yield self.hosts
            with self.main:
                yield self.banner
                yield self.gpus
                yield self.models
                yield self.jobs
                yield self.events_panel
        yield Footer()

    def on_resize(self, event: events.Resize) -> None:
        self.hosts.display = event.size.width >= WIDE_COLUMNS

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
        self._dirty.update(("models", "jobs", "link", "hosts"))

    def _redraw(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        views = self.store.hosts()
        if self.selected_host is None and views:
            self.selected_host = views[0].host_id
            dirty.update(("gpus", "models", "jobs"))
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
            self._dirty.update(("gpus", "models", "jobs", "link"))
            self._redraw()

    def action_next_host(self, step: int) -> None:
        ids = [v.host_id for v in self.store.hosts()]
        if not ids:
            return
        current = ids.index(self.selected_host) if self.selected_host in ids else 0
        self.selected_host = ids[(current + step) % len(ids)]
        self._dirty.update(("hosts", "gpus", "models", "jobs", "link"))
        self._redraw()

    # -- commands -------------------------------------------------------------------

    def _selected_model(self) -> tuple[str, ModelState] | None:
        host = self.selected_host
        view = self.store.host(host) if host else None
        name = selected_key(self.models)
        if host is None or view is None or name is None or name not in view.models:
            self.notify("Select a model in the models table first.", severity="warning")
            return None
        return host, view.models[name]

    async def _send(
        self, host: str, command: CommandName, fields: dict[str, Any]
    ) -> Reply[Any] | None:
        if self.bridge is None:
            self.notify("Not connected to a broker.", severity="error")
            return None
        return await self.bridge.send(host, command, fields)

    def _tell(self, reply: Reply[Any] | None, host: str) -> None:
        if reply is None:
            return
        ok, sentence = describe_reply(reply)
        self.notify(
            sentence,
            title=f"{host}: {reply.command}",
            severity="information" if ok else "error",
            timeout=6 if ok else 12,
        )

    def action_load(self) -> None:
        picked = self._selected_model()
        if picked:
            self._command(picked[0], CommandName.LOAD, {"model": picked[1].name})

    @work(group="commands")
    async def _command(self, host: str, command: CommandName, fields: dict[str, Any]) -> None:
        self._tell(await self._send(host, command, fields), host)

    @work(group="commands")
    async def action_unload(self) -> None:
        picked = self._selected_model()
        if not picked:
            return
        host, model = picked
        view = self.store.host(host)
        reason = force_reason(model, view.jobs.values() if view else ())
        fields: dict[str, Any] = {"model": model.name}
        if reason is not None:
            question = f"{reason}. Force-unload it anyway?"
            if not await self.push_screen_wait(ConfirmScreen("Force unload", question)):
                self.notify(f"{model.name} left running.")
                return
            fields["force"] = True
        self._tell(await self._send(host, CommandName.UNLOAD, fields), host)

    async def _plan(self) -> tuple[str, ModelState, PlanSummary] | None:
        """Ask the selected model's host what a switch would do; None (and the error
        told) when there is no selection or no answer."""
        picked = self._selected_model()
        if not picked:
            return None
        host, model = picked
        reply = await self._send(host, CommandName.PLAN, {"model": model.name})
        if reply is None or reply.status == "error":
            self._tell(reply, host)
            return None
        return host, model, summarize_plan(model.name, reply.data)

    @work(group="commands")
    async def action_plan(self) -> None:
        planned = await self._plan()
        if planned:
            host, _, summary = planned
            self.notify(
                summary.message,
                title=f"{host}: plan",
                severity="information" if summary.fits else "warning",
            )

    @work(group="commands")
    async def action_switch(self) -> None:
        """Plan first; the operator sees what would be stopped and confirms."""
        planned = await self._plan()
        if not planned:
            return
        host, model, summary = planned
        if not summary.fits:
            self.notify(summary.message, title=f"{host}: cannot switch", severity="error")
            return
        if summary.already_loaded:
            self.notify(summary.message, title=f"{host}: switch")
            return
        title = f"Switch {host} to {model.name}"
        if not await self.push_screen_wait(ConfirmScreen(title, summary.message, yes="Switch")):
            self.notify("Switch not sent.")
            return
        self._tell(await self._send(host, CommandName.SWITCH, {"model": model.name}), host)

    @work(group="commands")
    async def action_install(self) -> None:
        host = self._chosen_host()
        if host is None:
            return
        repo = await self.push_screen_wait(
            AskScreen(f"Install weights on {host}: Hugging Face repo", "org/name")
        )
        if repo:
            self._tell(await self._send(host, CommandName.INSTALL, {"repo": repo}), host)

    @work(group="commands")
    async def action_cancel_job(self) -> None:
        """The selected job when the jobs table has focus, else the host's running one;
        confirmed first, naming it."""
        host = self.selected_host
        view = self.store.host(host) if host else None
        if host is None or view is None:
            self.notify("No host selected.", severity="warning")
            return
        job = job_to_cancel(view.jobs, selected_key(self.jobs), table_focused=self.jobs.has_focus)
        if job is None:
            where = "selected" if self.jobs.has_focus else "running or queued"
            self.notify(f"No {where} job on {host} to cancel.", severity="warning")
            return
        question = describe_cancel(job)
        if not await self.push_screen_wait(
            ConfirmScreen(f"Cancel a job on {host}", question, yes="Cancel job")
        ):
            self.notify("Cancel not sent.")
            return
        self._tell(await self._send(host, CommandName.CANCEL, {"job_id": job.job_id}), host)

    @work(group="commands")
    async def action_uninstall(self) -> None:
        """Ask which weights, confirm (the files are deleted), send ``uninstall``."""
        host = self._chosen_host()
        if host is None:
            return
        name = await self.push_screen_wait(
            AskScreen(f"Uninstall weights on {host}: their name", "as P/H/weights lists it")
        )
        if not name:
            return
        question = (
            f"Delete the weights {name!r} from {host}'s disk? Installing again downloads them."
        )
        if not await self.push_screen_wait(
            ConfirmScreen(f"Uninstall on {host}", question, yes="Delete")
        ):
            self.notify("Uninstall not sent.")
            return
        self._tell(await self._send(host, CommandName.UNINSTALL, {"name": name}), host)

    @work(group="commands")
    async def action_status(self) -> None:
        """Ask the agent itself (not the retained topics): does it answer, and what runs."""
        host = self._chosen_host()
        if host is None:
            return
        self._tell(await self._send(host, CommandName.STATUS, {}), host)

    def _chosen_host(self) -> str | None:
        """The selected host; None (and the operator told) when there is none."""
        if self.selected_host is None:
            self.notify("No host selected.", severity="warning")
        return self.selected_host

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a job or a model: it in full."""
        view = self.store.host(self.selected_host) if self.selected_host else None
        if view is None:
            return
        key = str(event.row_key.value)
        if event.data_table is self.jobs and key in view.jobs:
            self.push_screen(DetailScreen(render_job_detail(view.jobs[key])))
        elif event.data_table is self.models and key in view.models:
            self.push_screen(DetailScreen(render_model_detail(view.models[key], self._now())))

    def action_events(self) -> None:
        self.push_screen(DetailScreen(render_events_detail(self.store.events())))

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
            ("Ask the agent for its status", "does it answer, and what runs", self.action_status),
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
