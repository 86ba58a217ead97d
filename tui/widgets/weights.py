"""The selected host's installed weights (``P/H/weights``): name, size, which models use
them, when installed; partial downloads below them; the disk they live on above.
Shown with ``w``; ``i`` installs, ``x`` uninstalls the selected row, ``a`` adds it to the
catalog."""

from __future__ import annotations

from datetime import datetime

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from shared.messages import WeightsState
from tui.format import ago, gib, size
from tui.widgets.tables import selected_key, sync_rows

COLUMNS = ("Weights", "Size", "Used by", "Installed", "Repo")
# A partial download's row key: its name, marked so it cannot be taken for installed weights.
PARTIAL_MARK = "partial:"


def disk_summary(weights: WeightsState | None) -> Text:
    """The line above the table: the disk's free space and what weights take of it."""
    if weights is None:
        return Text("This host has not published its weights yet.", style="dim")
    text = Text.assemble(("Disk ", "bold"), weights.weights_dir)
    if weights.disk_free_mb is not None and weights.disk_total_mb:
        text.append(f"  {gib(weights.disk_free_mb)} free of {gib(weights.disk_total_mb)}")
    text.append(f"  weights {gib(weights.used_mb)}")
    installed, partial = len(weights.weights), len(weights.partial)
    text.append(f"  {installed} installed", style="dim")
    if partial:
        text.append(f", {partial} partial (i resumes, x removes)", style="yellow")
    return text


def weights_rows(weights: WeightsState | None, now: datetime) -> list[tuple[str, list[str | Text]]]:
    if weights is None:
        return []
    rows: list[tuple[str, list[str | Text]]] = []
    for entry in sorted(weights.weights, key=lambda w: w.name):
        used_by = ", ".join(entry.used_by) or Text("unused", style="dim")
        installed = ago(entry.installed_at, now) if entry.installed_at else "-"
        rows.append((entry.name, [entry.name, _mb(entry.size_mb), used_by, installed, entry.repo]))
    for part in sorted(weights.partial, key=lambda w: w.name):
        rows.append(
            (
                PARTIAL_MARK + part.name,
                [
                    Text(part.name, style="yellow"),
                    Text(_mb(part.size_mb), style="yellow"),
                    Text("partial download", style="yellow"),
                    "-",
                    part.repo or "-",
                ],
            )
        )
    return rows


class WeightsTable(DataTable[str | Text]):
    DEFAULT_CSS = """
    WeightsTable { height: auto; max-height: 10; overflow-x: hidden; }
    """

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for label in COLUMNS:
            self.add_column(label, key=label)


class WeightsPanel(Vertical):
    DEFAULT_CSS = """
    WeightsPanel { height: auto; display: none; }
    WeightsPanel.-shown { display: block; }
    WeightsPanel > Static { height: 1; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        self.summary = Static()
        self.table = WeightsTable()
        yield self.summary
        yield self.table

    @property
    def shown(self) -> bool:
        return self.has_class("-shown")

    def show(self, weights: WeightsState | None, now: datetime) -> None:
        self.summary.update(disk_summary(weights))
        sync_rows(self.table, weights_rows(weights, now))

    def selected(self) -> str | None:
        """The name of the weights (installed or partial) under the cursor."""
        key = selected_key(self.table)
        return key.removeprefix(PARTIAL_MARK) if key else None


def _mb(mb: int) -> str:
    return size(mb * 1024 * 1024)
