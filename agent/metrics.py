"""Prometheus metrics (``prometheus_client``, its only user), served at ``/metrics``.

Two kinds: what happened, counted as it happens (swaps, loads, failures, jobs, install
bytes, gateway requests), and what is, read from the agent's own state at each scrape
(GPUs, models, queues), so a scrape costs nothing between scrapes and never shows a
stale copy. Names follow Prometheus's conventions (base units, ``_total``, histograms);
the GPU series carry dcgm-exporter's ``gpu`` and ``UUID`` labels, so the two join in
PromQL. Every label takes a bounded set of values: catalog names, GPU indices, enums
and HTTP status codes, never a caller's text."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from shared.messages import (
    GpuState,
    JobCommand,
    JobState,
    JobStatus,
    Loaded,
    ModelLifecycle,
    ModelState,
)

BYTES_PER_MIB = 1024 * 1024
# Seconds, for swaps, loads and jobs: a tiny model loads in a second, a 70B one in minutes.
DURATION_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
# Seconds a gateway request waited for its model: nothing, a slot, or a whole swap.
QUEUE_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
# Prometheus's text format, the version that text_format writes.
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
# The jobs that bring a model onto the GPU: what modelbus_swaps_total counts.
SWAP_COMMANDS = (JobCommand.LOAD, JobCommand.SWITCH)


@dataclass(frozen=True)
class AgentState:
    """Where a scrape reads what is (each a callable: read at the scrape, not before)."""

    gpus: Callable[[], Sequence[GpuState]]
    models: Callable[[], Sequence[ModelState]]
    queued: Callable[[], Mapping[str, int]]  # jobs waiting, by queue (swap, install)
    version: str
    protocol_version: str


class AgentMetrics:
    """The agent's registry: the counters its parts call, and a collector of its state."""

    def __init__(self, state: AgentState) -> None:
        # Not auto_describe: that would collect the agent's state at registration, before
        # the agent is all there; a scrape is the first to read it.
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry
        self._swap_results: dict[str, int] = {}
        self._last_swap_s: float | None = None
        self.swaps = Counter(
            "modelbus_swaps",
            "Load and switch jobs ended, by result (succeeded, failed, cancelled).",
            ["result"],
            registry=registry,
        )
        self.swap_duration = Histogram(
            "modelbus_swap_duration_seconds",
            "Load and switch jobs that succeeded: from start to the model answering, "
            "evictions included.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.load_duration = Histogram(
            "modelbus_model_load_duration_seconds",
            "A model's server, from launch to healthy.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.load_failures = Counter(
            "modelbus_load_failures",
            "Load and switch jobs that failed, by model and error code.",
            ["model", "reason"],
            registry=registry,
        )
        self.job_duration = Histogram(
            "modelbus_job_duration_seconds",
            "Jobs from start to end (time queued not included), by command and result.",
            ["command", "result"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.install_bytes = Counter(
            "modelbus_install_bytes",
            "Bytes that installs downloaded (files already present not counted).",
            registry=registry,
        )
        self.requests = Counter(
            "modelbus_requests",
            "Gateway requests answered, by catalog model ('' when none was named or "
            "found) and HTTP status code.",
            ["model", "code"],
            registry=registry,
        )
        self.request_queue = Histogram(
            "modelbus_request_queue_seconds",
            "How long gateway requests waited for their model (a load, a slot) before "
            "being forwarded.",
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        registry.register(_StateCollector(state))
        # Each install's bytes_done when last seen: the counter adds what came since.
        self._install_seen: dict[str, int] = {}

    # ---- what happened -----------------------------------------------------

    def job_changed(self, job: JobState) -> None:
        if job.command != JobCommand.INSTALL or job.bytes_done is None:
            return
        seen = self._install_seen.get(job.job_id)
        # The first sight of a job counts what was already on disk as seen, not fetched.
        if seen is not None and job.bytes_done > seen:
            self.install_bytes.inc(job.bytes_done - seen)
        self._install_seen[job.job_id] = max(job.bytes_done, seen or 0)

    def job_finished(self, job: JobState) -> None:
        self._install_seen.pop(job.job_id, None)
        result = job.state.value
        if job.started_at is not None and job.finished_at is not None:
            seconds = (job.finished_at - job.started_at).total_seconds()
            self.job_duration.labels(job.command.value, result).observe(seconds)
            if job.command in SWAP_COMMANDS and job.state == JobStatus.SUCCEEDED:
                self.swap_duration.observe(seconds)
        if job.command not in SWAP_COMMANDS:
            return
        self.swaps.labels(result).inc()
        self._swap_results[result] = self._swap_results.get(result, 0) + 1
        if job.started_at is not None and job.finished_at is not None:
            self._last_swap_s = (job.finished_at - job.started_at).total_seconds()
        if isinstance(job.result, Loaded) and job.result.load_s is not None:
            self.load_duration.labels(job.result.model).observe(job.result.load_s)
        if job.state == JobStatus.FAILED and job.model is not None:
            reason = job.error.code.value if job.error is not None else "unknown"
            self.load_failures.labels(job.model, reason).inc()

    def swap_summary(self) -> dict[str, Any]:
        """The swaps since start, by result, and the last one's seconds: the dynamic
        orchestrator's ``GET /status`` metrics."""
        return {
            "swaps_total": sum(self._swap_results.values()),
            "swaps_by_result": dict(self._swap_results),
            "last_swap_seconds": self._last_swap_s,
        }

    def request_admitted(self, model: str, waited_s: float) -> None:
        # One histogram for all models: per model it would be 17 series each, every
        # scrape, for a figure read as a whole (the dashboard's p95, the queue alert).
        self.request_queue.observe(waited_s)

    def request_answered(self, model: str, status: int) -> None:
        self.requests.labels(model, str(status)).inc()

    # ---- the exposition ----------------------------------------------------

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type for a scrape that sent ``Accept: accept``
        (OpenMetrics when it asks, else Prometheus's text format)."""
        encode, content_type = choose_encoder(accept or "")
        if content_type.startswith("application/openmetrics-text"):
            return encode(self.registry), content_type
        return text_format(self.registry), TEXT_FORMAT


def text_format(registry: CollectorRegistry) -> bytes:
    """Prometheus's text format, as prometheus_client's generate_latest writes it less the
    ``_created`` series (Prometheus ignores them in this format). generate_latest validates
    and escapes every name on every line (8 ms a scrape of 8 GPUs and 20 models here);
    these names are fixed and valid. promtool checks what this writes in the tests."""
    lines: list[str] = []
    for family in registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        help_text = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        lines.append(f"# HELP {name} {help_text}\n# TYPE {name} {family.type}\n")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if sample.labels:
                labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in sample.labels.items())
                lines.append(f"{sample.name}{{{labels}}} {_number(sample.value)}\n")
            else:
                lines.append(f"{sample.name} {_number(sample.value)}\n")
    return "".join(lines).encode()


def _label_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return value


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return "NaN" if math.isnan(value) else repr(float(value))


class _StateCollector(Collector):
    """What is, read from the agent at each scrape."""

    def __init__(self, state: AgentState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        yield from _gpu_metrics(self._state.gpus())
        yield from _model_metrics(self._state.models())
        queued = GaugeMetricFamily(
            "modelbus_jobs_queued", "Jobs waiting in each queue.", labels=["queue"]
        )
        for queue, count in sorted(self._state.queued().items()):
            queued.add_metric([queue], count)
        yield queued
        build = GaugeMetricFamily(
            "modelbus_build_info",
            "Always 1: the agent's version and the bus protocol it speaks.",
            labels=["version", "protocol_version"],
        )
        build.add_metric([self._state.version, self._state.protocol_version], 1)
        yield build


def _gpu_metrics(gpus: Sequence[GpuState]) -> Iterator[Metric]:
    labels = ["gpu", "UUID"]
    families = {
        "used": GaugeMetricFamily(
            "modelbus_gpu_memory_used_bytes", "GPU memory in use.", labels=labels
        ),
        "total": GaugeMetricFamily(
            "modelbus_gpu_memory_total_bytes", "GPU memory in all.", labels=labels
        ),
        "free": GaugeMetricFamily(
            "modelbus_gpu_memory_free_bytes", "GPU memory free.", labels=labels
        ),
        "utilization": GaugeMetricFamily(
            "modelbus_gpu_utilization_ratio",
            "Share of the last sample period the GPU was busy (0 to 1).",
            labels=labels,
        ),
        "temperature": GaugeMetricFamily(
            "modelbus_gpu_temperature_celsius", "GPU temperature.", labels=labels
        ),
        "power": GaugeMetricFamily("modelbus_gpu_power_watts", "GPU power draw.", labels=labels),
    }
    for gpu in gpus:
        values: dict[str, float | None] = {
            "used": _bytes(gpu.memory_used_mb),
            "total": _bytes(gpu.memory_total_mb),
            "free": _bytes(gpu.memory_free_mb),
            "utilization": (
                gpu.utilization_percent / 100 if gpu.utilization_percent is not None else None
            ),
            "temperature": gpu.temperature_c,
            "power": gpu.power_w,
        }
        key = [str(gpu.index), gpu.uuid or ""]
        for name, value in values.items():
            if value is not None:  # a reading the GPU did not give is absent, not 0
                families[name].add_metric(key, value)
    yield from families.values()


def _model_metrics(models: Sequence[ModelState]) -> Iterator[Metric]:
    loaded = GaugeMetricFamily(
        "modelbus_model_loaded",
        "1 for each GPU a ready model is on; absent for a model not loaded.",
        labels=["model", "gpu"],
    )
    state = GaugeMetricFamily(
        "modelbus_model_state",
        "1 for the state each model is in, 0 for the others.",
        labels=["model", "state"],
    )
    vram = GaugeMetricFamily(
        "modelbus_model_vram_bytes",
        "GPU memory a model's server holds, as measured (0 when stopped or asleep).",
        labels=["model"],
    )
    in_flight = GaugeMetricFamily(
        "modelbus_requests_in_flight",
        "Gateway requests a model is answering now.",
        labels=["model"],
    )
    for model in models:
        if model.state == ModelLifecycle.READY:
            for gpu in model.gpus:
                loaded.add_metric([model.name, str(gpu)], 1)
        for lifecycle in ModelLifecycle:
            state.add_metric([model.name, lifecycle.value], int(model.state == lifecycle))
        holds_none = model.state in (ModelLifecycle.STOPPED, ModelLifecycle.SLEEPING)
        held = 0 if holds_none else model.vram_used_mb
        vram.add_metric([model.name], _bytes(held) or 0)
        in_flight.add_metric([model.name], model.in_flight)
    yield from (loaded, state, vram, in_flight)


def _bytes(mib: int | None) -> float | None:
    return None if mib is None else float(mib * BYTES_PER_MIB)
