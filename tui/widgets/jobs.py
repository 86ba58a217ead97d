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
    row("message", job.message)
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
        text.append(f"{job.error.code.value}: {job.error.message}\n", style="bold red")
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
