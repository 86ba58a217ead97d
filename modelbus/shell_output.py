"""What the client commands print: replies, job progress and events, as a person reads
them in a shell (``--json`` prints the payloads instead). The replies are read through
the contract's models (``shared.replies``); one that does not match is a ClientExit."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TextIO, TypeVar

from pydantic import TypeAdapter, ValidationError

from bus.requests import Answer
from modelbus.client_session import ENDED, EXIT_ERROR, ClientExit
from shared.commands import describe_validation_error
from shared.messages import (
    Event,
    Installed,
    JobState,
    JobStatus,
    Loaded,
    Unloaded,
)
from shared.replies import (
    PLAN_RESULT,
    CatalogChanged,
    CatalogShown,
    HostStatus,
    JobAccepted,
    JobOutcome,
    JobsQueued,
    LoadHistory,
    LogLines,
    PlanFits,
    PlanRefused,
    Uninstalled,
)
from shared.topics import CommandName
from tui.format import duration_long, size_long

PROGRESS_BAR_WIDTH = 24


def format_event(host: str, event: Event) -> str:
    when = event.ts.astimezone().strftime("%H:%M:%S")
    about = " ".join(
        part
        for part in (
            f"model={event.model}" if event.model else "",
            f"gpu={event.gpu}" if event.gpu is not None else "",
            f"job={event.job_id}" if event.job_id else "",
        )
        if part
    )
    line = f"{when} {host} {event.severity.value:<8} {event.event_type}: {event.message}"
    return f"{line} [{about}]" if about else line


# -- job progress ----------------------------------------------------------------------


class JobProgress:
    """A job's updates on a terminal: one ``\\r``-redrawn bar; elsewhere (pipes, logs)
    one plain line per state or phase change and per 10 % step."""

    def __init__(self, out: TextIO, *, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self._last_key: tuple[str, str, int] | None = None
        self._drawn = 0

    def update(self, job: JobState) -> None:
        if self.tty:
            line = progress_bar(job)
            pad = max(0, self._drawn - len(line))
            self.out.write("\r" + line + " " * pad)
            self.out.flush()
            self._drawn = len(line)
            return
        if job.state in ENDED:
            return  # the summary line (or the error on stderr) says how it ended
        key = (job.state.value, job.phase.value, math.floor(job.progress * 10))
        if key != self._last_key:
            self._last_key = key
            print(progress_line(job), file=self.out, flush=True)

    def close(self) -> None:
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = 0


def _subject(job: JobState) -> str:
    return job.model or job.repo or job.job_id


def _details(job: JobState) -> list[str]:
    parts = []
    if job.bytes_total:
        parts.append(f"{size_long(job.bytes_done or 0)}/{size_long(job.bytes_total)}")
    if job.queue_position is not None and job.state is JobStatus.QUEUED:
        parts.append(f"position {job.queue_position}")
    if job.eta_s is not None and job.state not in ENDED:
        parts.append(f"ETA {duration_long(job.eta_s)}")
    return parts


def progress_bar(job: JobState, width: int = PROGRESS_BAR_WIDTH) -> str:
    filled = round(job.progress * width)
    bar = "#" * filled + "-" * (width - filled)
    parts = [
        f"{job.command} {_subject(job)}",
        f"[{bar}]",
        f"{job.progress * 100:3.0f}%",
        job.phase.value,
        *_details(job),
    ]
    return "  ".join(parts)


def progress_line(job: JobState) -> str:
    parts = [
        f"{job.command} {_subject(job)}:",
        f"{job.state.value}/{job.phase.value}",
        f"{job.progress * 100:.0f}%",
        *_details(job),
    ]
    line = " ".join(parts)
    return f"{line} - {job.message}" if job.message else line


def job_summary(job: JobState) -> str:
    took = ""
    if job.started_at and job.finished_at:
        took = f" in {duration_long((job.finished_at - job.started_at).total_seconds())}"
    line = f"{job.command} {_subject(job)}: {job.state.value}{took}"
    result = job.result
    extras = []
    if isinstance(result, Loaded):
        stopped = [name for name in result.evicted if name not in result.slept]
        if stopped:
            extras.append(f"evicted {', '.join(stopped)}")
        if result.slept:
            extras.append(f"put {', '.join(result.slept)} to sleep")
        if result.woken:
            extras.append("woken")
        extras.append(f"serving at {result.service}")
    elif isinstance(result, Unloaded):
        extras.append(f"freed {result.freed_mb} MiB")
    elif isinstance(result, Installed):
        extras.append(f"{result.size_mb} MiB in {result.path}")
    if job.message:
        line = f"{line} - {job.message}"
    return f"{line} ({'; '.join(extras)})" if extras else line


# -- replies for people ----------------------------------------------------------------


def format_reply(host: str, answer: Answer, fields: Mapping[str, Any] | None = None) -> list[str]:
    """The lines a person reads for an ``ok`` reply to a command with ``fields``."""
    reply = answer.reply
    fields = fields or {}
    subject = fields.get("model") or fields.get("repo") or fields.get("name")
    command = reply.command
    if command == CommandName.STATUS:
        return format_status(host, read_data(HostStatus.model_validate, reply.data, "status"))
    if command == CommandName.PLAN:
        return format_plan(read_data(PLAN_RESULT.validate_python, reply.data, "plan"))
    if command == CommandName.LOGS:
        return read_data(LogLines.model_validate, reply.data, "logs").lines
    if command == CommandName.HISTORY:
        return format_history(read_data(LoadHistory.model_validate, reply.data, "history"))
    if command == CommandName.CATALOG:
        return format_catalog(host, read_data(CATALOG_REPLY.validate_python, reply.data, command))
    if command == CommandName.UNINSTALL:
        gone = read_data(Uninstalled.model_validate, reply.data, "uninstall")
        return [f"uninstalled {gone.name} from {host}: freed {gone.freed_mb} MiB"]
    if command == CommandName.CANCEL:
        job = read_data(JobOutcome.model_validate, reply.data, "cancel").job
        message = f" - {job.message}" if job.message else ""
        return [f"job {job.job_id} ({job.command} {_subject(job)}): {job.state}{message}"]
    if command == CommandName.UNLOAD and reply.job_id is None:
        queued = read_data(JobsQueued.model_validate, reply.data, "unload")
        return [f"{command} {entry.model}: job {entry.job_id}" for entry in queued.jobs]
    if reply.job_id:
        accepted = read_data(JobAccepted.model_validate, reply.data, command)
        where = f", position {accepted.queue_position}" if accepted.queue_position else ""
        joined = " (joined an equal job)" if accepted.joined else ""
        what = f"{command} {subject}" if subject else command
        return [f"{what} on {host}: job {reply.job_id} {accepted.state}{where}{joined}"]
    if reply.data:
        return [json.dumps(reply.data, indent=2)]
    return [f"{command} on {host}: ok"]


Shape = TypeVar("Shape")


def read_data(parse: Callable[[Any], Shape], data: Any, what: str) -> Shape:
    """``data`` as the contract's model, or a ClientExit naming what did not match."""
    try:
        return parse(data)
    except ValidationError as exc:
        raise ClientExit(
            EXIT_ERROR,
            f"the agent's {what} reply does not match this client's protocol "
            f"({describe_validation_error(exc)}); are both the same version?",
        ) from None


def _mb(value: int | None) -> str:
    return "?" if value is None else str(value)


def format_status(host: str, status: HostStatus) -> list[str]:
    lines = []
    i = status.info
    versions = ", ".join(
        part
        for part in (
            f"agent {i.agent_version}",
            f"MQTT {i.mqtt_protocol}",
            f"{i.gpu_backend} GPUs",
            f"driver {i.driver_version}" if i.driver_version else "",
            f"CUDA {i.cuda_version}" if i.cuda_version else "",
        )
        if part
    )
    lines.append(f"host {host} ({i.hostname}): {versions}")
    if status.state is not None:
        s = status.state
        lines.append(
            f"VRAM {s.used_mb}/{s.total_mb} MiB used, {s.free_mb} MiB free; "
            f"queue {s.queue_length}" + (f", running job {s.active_job}" if s.active_job else "")
        )
    for g in status.gpus:
        util = f", {g.utilization_percent}% util" if g.utilization_percent is not None else ""
        temp = f", {g.temperature_c} °C" if g.temperature_c is not None else ""
        alerts = f", alerts: {', '.join(g.alerts)}" if g.alerts else ""
        lines.append(
            f"  GPU {g.index} {g.name or '?'}: {_mb(g.memory_used_mb)}/{_mb(g.memory_total_mb)} "
            f"MiB used{util}{temp}{alerts}"
        )
    if status.models:
        lines.append("models:")
        width = max(len(m.name) for m in status.models)
        for m in status.models:
            vram = m.vram_used_mb if m.vram_used_mb is not None else m.vram_estimate_mb
            flags = " pinned" if m.pinned else ""
            gpus = ",".join(map(str, m.gpus)) or "-"
            error = f" - {m.error}" if m.error else ""
            lines.append(
                f"  {m.name:<{width}}  {m.state.value:<9} GPU {gpus}  {_mb(vram)} MiB"
                f"  {m.runtime}{flags}{error}"
            )
    if status.jobs:
        lines.append("jobs:")
        lines.extend(f"  {j.job_id} {progress_line(j)}" for j in status.jobs)
    return lines


CATALOG_REPLY: TypeAdapter[CatalogShown | CatalogChanged] = TypeAdapter(
    CatalogShown | CatalogChanged
)


def format_catalog(host: str, reply: CatalogShown | CatalogChanged) -> list[str]:
    if isinstance(reply, CatalogChanged):
        return [f"catalog on {host}: {change}" for change in reply.changes] or [
            f"catalog on {host}: {reply.name} unchanged"
        ]
    lines = [f"{'MODEL':24} {'SOURCE':6} {'PRESET':9} {'PORT':>5} {'GPUS':5} {'VRAM':>7}  SERVES"]
    for model in reply.models:
        spec = model.spec
        serves = spec.get("weights") or spec.get("model_path") or spec.get("hf_repo") or "-"
        lines.append(
            f"{model.name:24} {model.source:6} {spec.get('preset') or '-':9} "
            f"{spec.get('port', '?'):>5} {','.join(map(str, spec.get('gpus', [0]))):5} "
            f"{spec.get('vram_mb', '?'):>7}  {serves}"
        )
    lines.append(f"entries added over the bus are kept in {reply.file} on {host}")
    return lines


def format_plan(plan: PlanFits | PlanRefused) -> list[str]:
    model = plan.model
    if isinstance(plan, PlanRefused):
        return [f"{model} does not fit: {plan.message}"]
    gpus = ", ".join(str(g) for g in plan.gpus) or "?"
    if plan.already_loaded:
        return [f"{model} is already loaded (GPU {gpus}); a switch would change nothing"]
    stopped = [name for name in plan.evict if name not in plan.sleep]
    lines = [
        f"a switch to {model} fits on GPU {gpus}"
        + (f", stopping {', '.join(stopped)}" if stopped else "")
        + (f", putting {', '.join(plan.sleep)} to sleep" if plan.sleep else "")
        + ("" if plan.evict else ", stopping nothing")
    ]
    if plan.stop_sleeping:
        lines.append(f"  and stopping sleeping {', '.join(plan.stop_sleeping)} for host RAM")
    for gpu in sorted(plan.free_before_mb, key=lambda k: int(k) if k.isdigit() else 0):
        freed = plan.freed_mb.get(gpu, 0)
        left = plan.free_after_mb.get(gpu, "?")
        lines.append(
            f"  GPU {gpu}: needs {plan.required_mb} MiB; free {plan.free_before_mb[gpu]} MiB"
            f" + freed {freed} MiB -> {left} MiB left"
        )
    return lines


def format_history(history: LoadHistory) -> list[str]:
    """One row per load, newest first within each model; a model never loaded gets dashes."""
    rows = [("model", "loaded at", "load", "VRAM")]
    for entry in history.models:
        rows += [
            (
                entry.model,
                load.loaded_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
                f"{load.load_s:.1f} s",
                f"{_mb(load.vram_used_mb)} MiB",
            )
            for load in entry.loads
        ] or [(entry.model, "-", "-", "-")]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return [
        f"{model:<{widths[0]}}  {when:<{widths[1]}}  {took:>{widths[2]}}  {vram:>{widths[3]}}"
        for model, when, took, vram in rows
    ]
