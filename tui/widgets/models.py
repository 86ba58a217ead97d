"""The models table of the selected host."""

from __future__ import annotations

from datetime import datetime

from rich.text import Text
from textual.widgets import DataTable

from shared.messages import ModelLifecycle, ModelState
from shared.replies import LogLines, ModelLoads
from tui.format import ago, gib, printable
from tui.widgets.sparkline import sparkline
from tui.widgets.tables import sync_rows

# Glyph + style, so states stand out with colour and without it.
STATE_LOOK: dict[ModelLifecycle, tuple[str, str]] = {
    ModelLifecycle.READY: ("●", "bold green"),
    ModelLifecycle.LOADING: ("◐", "bold yellow"),
    ModelLifecycle.UNLOADING: ("◑", "yellow"),
    ModelLifecycle.STOPPED: ("○", "dim"),
    ModelLifecycle.ERROR: ("✖", "bold reverse red"),
    ModelLifecycle.CRASHED: ("✖", "bold reverse red"),
    ModelLifecycle.SLEEPING: ("☾", "cyan"),
    ModelLifecycle.WAKING: ("◐", "bold cyan"),
}
# Narrow headers, ages last: at 80 columns what matters most must be on screen.
# Req: gateway requests being answered now, +queued for it.
COLUMNS = ("Model", "State", "GPU", "VRAM/est", "Req", "Prio", "Up", "Idle")


def state_text(model: ModelState) -> Text:
    glyph, style = STATE_LOOK.get(model.state, ("?", ""))
    return Text(f"{glyph} {model.state.value}", style=style)


def requests_text(model: ModelState) -> Text:
    """``Req``: requests being answered, and ``+n`` queued for it in the gateway."""
    if not model.in_flight and not model.waiting:
        return Text("-", "dim")
    text = Text(str(model.in_flight), style="bold cyan")
    if model.waiting:
        text.append(f"+{model.waiting}", style="bold yellow")
    return text


def model_row(model: ModelState, now: datetime) -> list[str | Text]:
    used = gib(model.vram_used_mb)[:-1] if model.vram_used_mb else "-"
    vram = f"{used}/{gib(model.vram_estimate_mb)}"
    loaded = ago(model.loaded_at, now) if model.state is ModelLifecycle.READY else "-"
    return [
        model.name,
        state_text(model),
        ",".join(str(g) for g in model.gpus) or "-",
        vram,
        requests_text(model),
        Text.assemble(str(model.priority), (" pin", "bold") if model.pinned else ""),
        loaded,
        ago(model.last_used_at, now),
    ]


class ModelsTable(DataTable[str | Text]):
    DEFAULT_CSS = """
    ModelsTable { height: auto; max-height: 60%; }
    """

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = False
        for label in COLUMNS:
            self.add_column(label, key=label)

    def show(self, models: dict[str, ModelState], now: datetime) -> None:
        rows = [(name, model_row(models[name], now)) for name in sorted(models)]
        sync_rows(self, rows)


def render_model_detail(model: ModelState, now: datetime) -> Text:
    """Enter on a model: what the table cuts (its error in full), its traffic and loads."""
    text = Text.assemble((model.name, "bold"), "  ", state_text(model), "\n\n")

    def row(label: str, value: object) -> None:
        if value not in (None, "", [], 0):
            text.append(f"{label:>14}  ", style="dim")
            text.append(f"{value}\n")

    row("description", model.description)
    row("aliases", ", ".join(model.aliases))
    row("runtime", model.runtime)
    row("gpus", ",".join(map(str, model.gpus)))
    row("vram", f"{gib(model.vram_used_mb)} used" if model.vram_used_mb else None)
    row("estimate", gib(model.vram_estimate_mb) if model.vram_estimate_mb else None)
    row("health", model.health)
    row("priority", f"{model.priority}{' (pinned)' if model.pinned else ''}")
    row("up", ago(model.loaded_at, now) if model.loaded_at else None)
    row("last load", f"{model.last_load_s:.1f} s" if model.last_load_s is not None else None)
    row("last used", ago(model.last_used_at, now) if model.last_used_at else None)
    row("requests", model.requests_total)
    row("in flight", model.in_flight)
    row("queued", model.waiting)
    if model.error:
        text.append(f"\n{'error':>14}  ", style="dim")
        text.append(printable(model.error), style="bold red")
        text.append("\n")
    return text


def render_loads(loads: ModelLoads | str, now: datetime) -> Text:
    """A model's last loads (the ``history`` command): how long each took, oldest to
    newest as blocks, then each newest first; or why they could not be read."""
    text = Text("\nLast loads", style="bold")
    if isinstance(loads, str):
        return text.append(f"\n  {loads}\n", style="yellow")
    if not loads.loads:
        return text.append("\n  never loaded on this host (as far as its database knows)\n")
    seconds = [record.load_s for record in reversed(loads.loads)]
    longest = max(seconds)
    scale = longest or 1.0  # every load instant: flat blocks, not a division by zero
    cells = len(seconds)
    blocks = sparkline([(i, s / scale) for i, s in enumerate(seconds)], cells, cells, cells)
    text.append(f"\n  {blocks}  ", style="cyan")
    count = f"{cells} load" + ("s" if cells > 1 else "")
    text.append(f"{count}, {min(seconds):.1f} to {longest:.1f} s\n", style="dim")
    for record in loads.loads:
        vram = f"  {gib(record.vram_used_mb)}" if record.vram_used_mb else ""
        text.append(f"  {ago(record.loaded_at, now):>7} ago  {record.load_s:6.1f} s{vram}\n")
    return text


def render_log_tail(logs: LogLines | str) -> Text:
    """The last lines of a model's log, or why they could not be read."""
    text = Text("\nLast log lines", style="bold")
    if isinstance(logs, str):
        return text.append(f"\n  {logs}\n", style="yellow")
    if not logs.lines:
        return text.append("\n  none (it has not written any)\n", style="dim")
    text.append(" (L follows the whole log)\n", style="dim")
    for line in logs.lines:
        text.append(f"  {printable(line)}\n")
    return text
