"""Running and queued jobs with progress; then the finished ones the agent still keeps,
newest first, dimmed, as many as the table's room holds (the recent ones always)."""

from __future__ import annotations

from datetime import datetime

from rich.text import Text
from textual.widget import Widget
from textual.widgets import DataTable

from shared.messages import JobState, JobStatus
from tui.format import duration, printable, size
from tui.widgets.tables import fit_last_column, sync_rows

# A job finished this recently is shown however little room there is.
FADE_AFTER_S = 20.0
# The jobs table takes at most this share of the dashboard's height; the events panel
# takes what the panels leave.
MAX_HEIGHT_SHARE = 0.25
PROGRESS_CELLS = 12
# The Job column at most: the phase needs the rest at 80 columns.
TITLE_CELLS = 20
# The width assumed before the table is laid out.
UNKNOWN_WIDTH = 1000
COLUMNS = ("Job", "State", "Progress", "ETA", "Phase")
_FINISHED_LOOK = {
    JobStatus.SUCCEEDED: ("✔", "dim green"),
    JobStatus.FAILED: ("✖", "bold red"),
    JobStatus.CANCELLED: ("⊘", "dim"),
}


def progress_bar(fraction: float, cells: int = PROGRESS_CELLS) -> str:
    filled = round(max(0.0, min(fraction, 1.0)) * cells)
    return "━" * filled + "╌" * (cells - filled) + f" {fraction * 100:3.0f}%"


def visible_jobs(jobs: list[JobState], now: datetime, room: int = 0) -> list[JobState]:
    """Active jobs and those finished less than FADE_AFTER_S ago, then older finished
    ones (``jobs`` come newest first) while they fit in ``room`` rows."""
    shown: list[JobState] = []
    for job in jobs:
        recent = job.finished_at is None or (now - job.finished_at).total_seconds() < FADE_AFTER_S
        if recent or len(shown) < room:
            shown.append(job)
    return shown


def job_title(job: JobState) -> str:
    """``switch qwen3-vl-30b``; a long repo keeps its end (``install …VL-30B-Instruct``)."""
    subject = job.model or job.repo or ""
    room = TITLE_CELLS - len(job.command) - 1
    if len(subject) > room:
        subject = "…" + subject[-(room - 1) :]
    return f"{job.command} {subject}".strip()


def job_row(job: JobState) -> list[str | Text]:
    title = job_title(job)
    if job.state in _FINISHED_LOOK:
        glyph, style = _FINISHED_LOOK[job.state]
        message = printable(job.error.message if job.error else (job.message or ""))
        return [
            Text(title, style="dim"),
            Text(f"{glyph} {job.state.value}", style=style),
            "",
            "",
            Text(message, style="dim"),
        ]
    if job.state is JobStatus.RUNNING:
        detail = printable(job.message or "")
        if job.bytes_total:  # downloads: how much of how much
            detail = f"{size(job.bytes_done or 0)}/{size(job.bytes_total)} {detail}"
        return [
            Text(title, style="bold"),
            Text(f"▶ {job.phase.value}"),
            progress_bar(job.progress),
            duration(job.eta_s),
            detail,
        ]
    position = f"#{job.queue_position}" if job.queue_position else ""
    return [title, Text(f"… queued {position}"), "", "", printable(job.message or "")]


class JobsTable(DataTable[str | Text]):
    DEFAULT_CSS = f"""
    JobsTable {{ height: auto; max-height: {MAX_HEIGHT_SHARE:.0%}; overflow-x: hidden; }}
    JobsTable.-empty {{ display: none; }}
    """

    def on_mount(self) -> None:
        self._shown: tuple[list[JobState], datetime] | None = None
        self.cursor_type = "row"
        for label in COLUMNS:
            self.add_column(label, key=label)
        self.add_class("-empty")

    def show(self, jobs: list[JobState], now: datetime) -> None:
        self._shown = (jobs, now)
        shown = visible_jobs(jobs, now, self._room())
        rows = [(job.job_id, job_row(job)) for job in shown]
        sync_rows(self, fit_last_column(COLUMNS, rows, self._width()))
        self.set_class(not shown, "-empty")

    def on_resize(self) -> None:
        if self._shown is not None:
            self.show(*self._shown)

    def _room(self) -> int:
        """The rows its share of the dashboard holds, below the header."""
        height = self.parent.content_size.height if isinstance(self.parent, Widget) else 0
        return max(0, int(height * MAX_HEIGHT_SHARE) - 1)

    def _width(self) -> int:
        """The table's width; its container's while hidden (it is, until a first job);
        before the first layout, room for all (a resize fits it then)."""
        width = self.scrollable_content_region.width
        if not width and isinstance(self.parent, Widget):
            width = self.parent.content_size.width
        return width or UNKNOWN_WIDTH


def render_job_detail(job: JobState) -> Text:
    """Enter on a job: everything the table cuts, the error, the timings and the result."""
    text = Text(f"{job.command.value} {job.model or job.repo or ''}".strip(), style="bold")
    text.append(f"  job {job.job_id}\n\n")

    def row(label: str, value: object) -> None:
        if value not in (None, "", [], {}):
            text.append(f"{label:>12}  ", style="dim")
            text.append(f"{value}\n")

    row("state", f"{job.state.value} ({job.phase.value}, {job.progress:.0%})")
    row("origin", job.origin.value if job.origin else None)
    row("request", job.request_id)
    row("queued", f"#{job.queue_position}" if job.queue_position else None)
    row("message", printable(job.message) if job.message else None)
    if job.bytes_total:
        row("download", f"{size(job.bytes_done or 0)} of {size(job.bytes_total)}")
    row("eta", duration(job.eta_s) if job.eta_s is not None else None)
    row("created", job.created_at.isoformat(timespec="seconds"))
    row("started", job.started_at.isoformat(timespec="seconds") if job.started_at else None)
    row("finished", job.finished_at.isoformat(timespec="seconds") if job.finished_at else None)
    if job.started_at and job.finished_at:
        row("took", duration((job.finished_at - job.started_at).total_seconds()))
    if job.error is not None:
        text.append(f"\n{'error':>12}  ", style="dim")
        text.append(f"{job.error.code.value}: {printable(job.error.message)}\n", style="bold red")
        for key, value in (job.error.details or {}).items():
            row(str(key), value)
    if job.result is not None:
        text.append("\n")
        for key, value in job.result.model_dump(mode="json", exclude_none=True).items():
            row(key.replace("_", " "), _readable(value))
    return text


def _readable(value: object) -> object:
    """A result's field as one line: seconds rounded, lists joined, none said so."""
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, dict):  # the timings: stop_s, start_s, healthy_s
        return ", ".join(f"{k} {_readable(v)}" for k, v in value.items()) or "none"
    return value
