"""What each command key does: every bus command the operator can send, asked and
confirmed where it stops or deletes something, its answer told on the outcome line.

A base of the app (``tui.app.ModelbusApp``), which gives it the store, the bridge
and the panels; kept apart so the app's module is its layout and its redraws.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import App

from shared.messages import ModelState, Reply, utc_now
from shared.replies import LoadHistory, LogLines, ModelLoads
from shared.topics import CommandName
from tui.actions import (
    PlanSummary,
    describe_cancel,
    describe_reply,
    force_reason,
    job_to_cancel,
    reply_data,
    summarize_plan,
)
from tui.bridge import BusBridge
from tui.screens import AskScreen, ConfirmScreen, DetailScreen, LogScreen
from tui.store import BusStore
from tui.widgets.jobs import JobsTable
from tui.widgets.models import ModelsTable, render_loads
from tui.widgets.tables import selected_key
from tui.widgets.weights import WeightsPanel

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
    CommandName.LOGS: "model.logs",
    CommandName.HISTORY: "model.history",
    CommandName.CATALOG: "weights.add",
}


# How many of a model's last loads ``h`` shows (the agent keeps 100).
HISTORY_SHOWN = 20


class CommandKeys(App[int]):
    """The command actions; the app composes the panels named here."""

    store: BusStore
    bridge: BusBridge | None
    selected_host: str | None
    models: ModelsTable
    jobs: JobsTable
    weights: WeightsPanel

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
        """Ask for a repo (a partial download selected in the weights panel offers its
        own, to resume it), send ``install``."""
        host = self._chosen_host()
        if host is None:
            return
        repo = await self.push_screen_wait(
            AskScreen(
                f"Install weights on {host}: Hugging Face repo",
                "org/name",
                value=self._selected_partial_repo(host) or "",
            )
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
        """The weights selected in the weights panel, else ask which; confirm (the files
        are deleted), send ``uninstall``."""
        host = self._chosen_host()
        name = await self._weights_named(host, f"Uninstall weights on {host}: their name")
        if host is None or not name:
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
    async def action_add_to_catalog(self) -> None:
        """The installed weights selected in the weights panel (else ask which) into the
        catalog, as their install suggested: ``catalog add`` with ``weights``."""
        host = self._chosen_host()
        name = await self._weights_named(host, f"Add to {host}'s catalog: installed weights")
        if host is not None and name:
            fields = {"action": "add", "weights": name}
            self._tell(await self._send(host, CommandName.CATALOG, fields), host)

    async def _weights_named(self, host: str | None, question: str) -> str | None:
        """The weights selected in the weights panel, else the name the operator gives."""
        if host is None:
            return None
        name = self.weights.selected() if self.weights.table.has_focus else None
        if name is None:
            name = await self.push_screen_wait(AskScreen(question, "as P/H/weights lists it"))
        return name or None

    @work(group="commands")
    async def action_status(self) -> None:
        """Ask the agent itself (not the retained topics): does it answer, and what runs."""
        host = self._chosen_host()
        if host is None:
            return
        self._tell(await self._send(host, CommandName.STATUS, {}), host)

    def action_logs(self) -> None:
        """The selected model's log, followed live."""
        picked = self._selected_model()
        if picked:
            host, model = picked[0], picked[1].name
            self.push_screen(
                LogScreen(
                    f"{model} on {host}: its server's output",
                    lambda since: self.model_logs(host, model, since=since),
                )
            )

    @work(group="commands")
    async def action_history(self) -> None:
        """The selected model's last loads, as the agent's database has them."""
        picked = self._selected_model()
        if picked:
            host, model = picked[0], picked[1].name
            title = Text(f"{model} on {host}", style="bold")
            loads = await self.model_loads(host, model, limit=HISTORY_SHOWN)
            self.push_screen(DetailScreen(title + render_loads(loads, utc_now())))

    async def model_logs(
        self, host: str, model: str, *, lines: int = 200, since: str | None = None
    ) -> LogLines | str:
        """``logs`` of ``model``: its lines, or why there are none."""
        fields: dict[str, Any] = {"model": model, "lines": lines}
        if since is not None:
            fields["since"] = since
        return reply_data(await self._send(host, CommandName.LOGS, fields), LogLines)

    async def model_loads(self, host: str, model: str, *, limit: int) -> ModelLoads | str:
        """``history`` of ``model``: its last loads, or why there are none."""
        fields = {"model": model, "limit": limit}
        history = reply_data(await self._send(host, CommandName.HISTORY, fields), LoadHistory)
        if isinstance(history, str):
            return history
        return next(
            (m for m in history.models if m.model == model), ModelLoads(model=model, loads=[])
        )

    def _selected_partial_repo(self, host: str) -> str | None:
        """The repo of the partial download under the weights panel's cursor, if any."""
        view = self.store.host(host)
        name = self.weights.selected() if self.weights.table.has_focus else None
        if view is None or view.weights is None or name is None:
            return None
        return next((p.repo for p in view.weights.partial if p.name == name), None)

    def _chosen_host(self) -> str | None:
        """The selected host; None (and the operator told) when there is none."""
        if self.selected_host is None:
            self.notify("No host selected.", severity="warning")
        return self.selected_host
