"""Pydantic models of everything the agent publishes.

Published payloads ignore fields they do not know, so an older TUI keeps
working against a newer agent; commands (``shared.commands``) are strict.
Sizes are MiB in ``*_mb`` fields, power in watts, temperatures in °C, times
ISO-8601 UTC in ``*_at``/``ts``, durations in seconds in ``*_s``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field


def utc_now() -> datetime:
    return datetime.now(UTC)


class Published(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Availability(StrEnum):
    """The plain-text payload of ``P/H/status`` (retained, and the MQTT will)."""

    ONLINE = "online"
    OFFLINE = "offline"


class GpuProcess(Published):
    pid: int
    used_mb: int | None = None
    name: str | None = None
    model: str | None = Field(default=None, description="catalog model owning this process")
    container: str | None = Field(default=None, description="Docker container name, if any")


class GpuState(Published):
    """``P/H/gpu/<index>``: one GPU, refreshed every interval and on change."""

    index: int
    uuid: str | None = None
    name: str | None = None
    memory_total_mb: int | None = None
    memory_used_mb: int | None = None
    memory_free_mb: int | None = None
    utilization_percent: int | None = None
    memory_utilization_percent: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    processes: list[GpuProcess] = Field(default_factory=list)
    alerts: list[str] = Field(
        default_factory=list, description="active alert names; 'gpu_lost' when it stopped answering"
    )
    ts: datetime


class GpuInfo(Published):
    index: int
    uuid: str | None = None
    name: str | None = None
    memory_total_mb: int | None = None


class HostInfo(Published):
    """``P/H/info``: what this agent is and can do; changes rarely."""

    host_id: str
    hostname: str
    agent_version: str
    protocol_version: str = Field(description="modelbus contract version")
    mqtt_protocol: Literal["5", "3.1.1"]
    gpu_backend: str = Field(description="'nvml' for real GPUs, 'sim' for simulated ones")
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: list[GpuInfo] = Field(default_factory=list)
    commands: list[str] = Field(default_factory=list, description="commands this agent executes")
    started_at: datetime
    ts: datetime


class LoadedModel(Published):
    """One entry of ``loaded_models``, in the shape of the original ``/models/status``."""

    model: str
    service: str | None = None
    loaded_at: datetime | None = None
    status: str


class GpuSummary(Published):
    index: int
    name: str | None = None
    memory_total_mb: int | None = None
    memory_used_mb: int | None = None
    memory_free_mb: int | None = None
    utilization_percent: int | None = None
    alerts: list[str] = Field(default_factory=list)


class HostState(Published):
    """``P/H/state``: the host summary (totals over all GPUs) plus per-GPU detail."""

    total_mb: int
    used_mb: int
    free_mb: int
    utilization_percent: int | None = None
    loaded_models: dict[str, LoadedModel] = Field(default_factory=dict)
    gpus: list[GpuSummary] = Field(default_factory=list)
    queue_length: int = 0
    active_job: str | None = None
    active_job_progress: float | None = Field(
        default=None, ge=0.0, le=1.0, description="the running swap job's progress"
    )
    ts: datetime


class ModelLifecycle(StrEnum):
    STOPPED = "stopped"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    ERROR = "error"
    CRASHED = "crashed"
    # Its server runs with its VRAM released, held in host RAM (vLLM's sleep mode,
    # SGLang's memory release): a wake brings it back faster than a start.
    SLEEPING = "sleeping"
    WAKING = "waking"


class ModelState(Published):
    """``P/H/models/<name>``; an empty retained payload when removed from the catalog."""

    name: str
    runtime: str
    state: ModelLifecycle
    gpus: list[int] = Field(default_factory=list)
    vram_estimate_mb: int | None = None
    vram_used_mb: int | None = None
    health: str | None = None
    loaded_at: datetime | None = None
    last_used_at: datetime | None = None
    last_load_s: float | None = None
    priority: int = 0
    pinned: bool = False
    description: str | None = None
    error: str | None = None
    # Gateway traffic (published at most once a second per model).
    in_flight: int = Field(default=0, description="requests being answered by it now")
    waiting: int = Field(
        default=0, description="gateway requests queued for it (for a slot, or for its load)"
    )
    requests_total: int = Field(default=0, description="requests forwarded since the agent started")
    last_request_at: datetime | None = None
    aliases: list[str] = Field(default_factory=list, description="other names requests may use")
    sleep: str | None = Field(
        default=None, description="the sleep API its server speaks (vllm, sglang); null: none"
    )
    sleep_ram_mb: int | None = Field(
        default=None, description="host RAM it holds while sleeping (measured, else estimated)"
    )
    last_wake_s: float | None = Field(default=None, description="its last wake, in seconds")
    ts: datetime


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobOrigin(StrEnum):
    """Who asked for a job: a command on the bus, a gateway request, or the agent itself
    (a restore after a failed swap, a preload, an idle ttl, a restart after a crash)."""

    BUS = "bus"
    GATEWAY = "gateway"
    AGENT = "agent"


class JobCommand(StrEnum):
    """The commands that run as jobs (``JobState.command``)."""

    LOAD = "load"
    UNLOAD = "unload"
    SWITCH = "switch"
    INSTALL = "install"


class JobPhase(StrEnum):
    QUEUED = "queued"
    EVICTING = "evicting"
    WAITING_VRAM = "waiting_vram"
    STARTING = "starting"
    LOADING = "loading"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    DONE = "done"


class ErrorCode(StrEnum):
    INVALID_PAYLOAD = "invalid_payload"
    UNKNOWN_COMMAND = "unknown_command"
    UNKNOWN_MODEL = "unknown_model"
    INSUFFICIENT_VRAM = "insufficient_vram"
    INSUFFICIENT_DISK = "insufficient_disk"
    QUEUE_FULL = "queue_full"
    NOT_FOUND = "not_found"
    BUSY = "busy"
    TIMEOUT = "timeout"
    LOAD_FAILED = "load_failed"
    DOWNLOAD_FAILED = "download_failed"
    CANCELLED = "cancelled"
    FORBIDDEN = "forbidden"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    PORT_IN_USE = "port_in_use"
    INTERNAL = "internal"


class ErrorInfo(Published):
    code: ErrorCode
    message: str
    details: dict[str, Any] | None = None


class JobRef(Published):
    """A job started for a model, e.g. one of those an ``unload all`` queued."""

    model: str
    job_id: str


class SwapTimings(Published):
    """Seconds a load or switch waited on the servers."""

    stop_s: float | None = Field(default=None, description="stopping the evicted models")
    start_s: float | None = Field(default=None, description="launching the new server")
    healthy_s: float | None = Field(default=None, description="from launch to healthy")
    sleep_s: float | None = Field(default=None, description="putting evicted models to sleep")
    wake_s: float | None = Field(default=None, description="waking the model, to healthy")


class Loaded(Published):
    """``result`` of a load or switch that succeeded."""

    timings: SwapTimings = Field(default_factory=SwapTimings)
    model: str
    gpus: list[int]
    vram_used_mb: int | None = Field(default=None, description="measured")
    load_s: float | None = Field(default=None, description="start to healthy")
    evicted: list[str] = Field(description="in the order they were stopped")
    slept: list[str] = Field(
        default_factory=list, description="the evicted models put to sleep instead of stopped"
    )
    woken: bool = Field(default=False, description="it was sleeping and was woken, not started")
    service: str = Field(description="the server's base URL")


class Unloaded(Published):
    """``result`` of an unload."""

    model: str
    freed_mb: int


class RolledBack(Published):
    """``result`` of a swap that failed or was cancelled after evicting models: the jobs
    that start them again."""

    restores: list[JobRef]


class VramEstimate(Published):
    """From the weights' safetensors metadata; an estimate until a load measures."""

    vram_mb: int
    parameters: int
    dtype: str
    weights_mb: int
    overhead_mb: int
    missing_shards: list[str] = Field(default_factory=list)
    note: str


class Installed(Published):
    """``result`` of an install."""

    name: str
    repo: str
    revision: str | None = None
    path: str
    size_mb: int
    files: int
    downloaded_mb: int = Field(description="what this install fetched (the rest was there)")
    vram_estimate: VramEstimate | None = None
    suggested_catalog_entry: dict[str, dict[str, Any]] = Field(
        description="{name: entry} for the models: catalog, for an operator to finish"
    )


# Told apart by their required fields (each has one no other has).
JobResult = Loaded | Unloaded | RolledBack | Installed


class JobState(Published):
    """``P/H/jobs/<job_id>``: retained while relevant, then cleared with an empty payload."""

    job_id: str
    command: JobCommand
    origin: JobOrigin | None = None
    model: str | None = None
    repo: str | None = None
    request_id: str | None = None
    state: JobStatus
    phase: JobPhase
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    eta_s: float | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    queue_position: int | None = None
    message: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: JobResult | None = Field(
        default=None,
        description="a load or switch that succeeded: Loaded; an unload: Unloaded; a swap "
        "that failed or was cancelled after evicting: RolledBack; an install: Installed",
    )
    error: ErrorInfo | None = None
    ts: datetime


class InstalledWeights(Published):
    name: str
    repo: str
    revision: str | None = Field(default=None, description="the commit sha installed")
    size_mb: int
    path: str
    used_by: list[str] = Field(default_factory=list, description="catalog models using them")
    installed_at: datetime | None = None
    vram_estimate_mb: int | None = Field(
        default=None, description="from safetensors metadata; an estimate until a load measures"
    )


class PartialWeights(Published):
    """An install that did not finish (cancelled, failed, interrupted): not installed;
    installing the same repo again resumes it, ``uninstall`` removes it."""

    name: str
    repo: str | None = None
    size_mb: int
    path: str


class WeightsState(Published):
    """``P/H/weights``: installed weights and the disk they live on."""

    weights: list[InstalledWeights] = Field(default_factory=list)
    partial: list[PartialWeights] = Field(default_factory=list)
    weights_dir: str
    used_mb: int = Field(description="installed and partial weights together")
    disk_total_mb: int | None = None
    disk_free_mb: int | None = None
    ts: datetime


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class EventType(StrEnum):
    """The events this agent raises; consumers must accept others (a newer agent's)."""

    MODEL_LOADED = "model_loaded"
    MODEL_UNLOADED = "model_unloaded"
    MODEL_LOAD_FAILED = "model_load_failed"
    MODEL_CRASHED = "model_crashed"
    MODEL_ASLEEP = "model_asleep"
    SWAP_COMPLETED = "swap_completed"
    JOB_FAILED = "job_failed"
    WEIGHTS_INSTALLED = "weights_installed"
    WEIGHTS_UNINSTALLED = "weights_uninstalled"
    VRAM_LEAK = "vram_leak"
    GPU_LOST = "gpu_lost"
    VRAM_HIGH = "vram_high"
    VRAM_HIGH_CLEARED = "vram_high_cleared"
    TEMPERATURE_HIGH = "temperature_high"
    TEMPERATURE_HIGH_CLEARED = "temperature_high_cleared"
    POWER_HIGH = "power_high"
    POWER_HIGH_CLEARED = "power_high_cleared"


class Event(Published):
    """``P/H/events`` (not retained): something happened worth telling people about."""

    # A type this version does not know stays a plain string, never a validation error.
    event_type: EventType | str
    severity: Severity
    message: str
    model: str | None = None
    gpu: int | None = None
    job_id: str | None = None
    ts: datetime = Field(default_factory=utc_now)


# What ``Reply.data`` holds; each command's shape is in ``shared.replies``.
Data = TypeVar("Data")


class Reply(Published, Generic[Data]):
    """The one answer to every command, on the response topic or ``P/H/reply/<command>``.
    ``Reply[Shape]`` types ``data`` (``shared.replies.REPLY_DATA`` names each command's);
    a plain ``Reply`` leaves it as the JSON object it is."""

    request_id: str
    command: str
    status: Literal["ok", "error"]
    job_id: str | None = None
    data: Data | None = None
    error: ErrorInfo | None = None
    ts: datetime = Field(default_factory=utc_now)


def encode(message: BaseModel) -> bytes:
    """The one way payloads are serialised: compact JSON, UTF-8."""
    return message.model_dump_json().encode()
