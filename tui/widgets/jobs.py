"""Running and queued jobs with progress; finished ones are dimmed, then left out."""

from __future__ import annotations

from datetime import datetime

from rich.text import Text
from textual.widgets import DataTable

from shared.messages import JobState, JobStatus
from tui.format import duration, size
from tui.widgets.tables import sync_rows

# How long a finished job stays on screen (the agent keeps it retained longer).
FADE_AFTER_S = 20.0
PROGRESS_CELLS = 12
COLUMNS = ("Job", "State", "Progress", "ETA", "Phase")
_FINISHED_LOOK = {
    JobStatus.SUCCEEDED: ("✔", "dim green"),
    JobStatus.FAILED: ("✖", "bold red"),
    JobStatus.CANCELLED: ("⊘", "dim"),
}


def progress_bar(fraction: float, cells: int = PROGRESS_CELLS) -> str:
    filled = round(max(0.0, min(fraction, 1.0)) * cells)
    return "━" * filled + "╌" * (cells - filled) + f" {fraction * 100:3.0f}%"


def visible_jobs(jobs: list[JobState], now: datetime) -> list[JobState]:
    """Active jobs and those finished less than FADE_AFTER_S ago."""
    return [
        job
        for job in jobs
        if job.finished_at is None or (now - job.finished_at).total_seconds() < FADE_AFTER_S
    ]


def job_row(job: JobState) -> list[str | Text]:
    title = f"{job.command} {job.model or job.repo or ''}".strip()
    if job.state in _FINISHED_LOOK:
        glyph, style = _FINISHED_LOOK[job.state]
        message = job.error.message if job.error else (job.message or "")
        return [
            Text(title, style="dim"),
            Text(f"{glyph} {job.state.value}", style=style),
            "",
            "",
            Text(message[:40], style="dim"),
        ]
    if job.state is JobStatus.RUNNING:
        detail = job.message or ""
        if job.bytes_total:  # downloads: how much of how much
            detail = f"{size(job.bytes_done or 0)}/{size(job.bytes_total)} {detail}"
        return [
            Text(title, style="bold"),
            Text(f"▶ {job.phase.value}"),
            progress_bar(job.progress),
            duration(job.eta_s),
            detail[:48],
        ]
    position = f"#{job.queue_position}" if job.queue_position else ""
    return [title, Text(f"… queued {position}"), "", "", (job.message or "")[:40]]


class JobsTable(DataTable[str | Text]):
    DEFAULT_CSS = """
    JobsTable { height: auto; max-height: 7; }
    JobsTable.-empty { display: none; }
    """

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for label in COLUMNS:
            self.add_column(label, key=label)
        self.add_class("-empty")

    def show(self, jobs: list[JobState], now: datetime) -> None:
        shown = visible_jobs(jobs, now)
        sync_rows(self, [(job.job_id, job_row(job)) for job in shown])
        self.set_class(not shown, "-empty")
