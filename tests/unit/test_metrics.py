"""The agent's metrics as Prometheus reads them: the exposition parsed back with
prometheus_client's own parser, each series named and labelled as docs/metrics.md says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import BYTES_PER_MIB, AgentMetrics, AgentState
from shared.messages import (
    ErrorCode,
    ErrorInfo,
    GpuState,
    JobCommand,
    JobPhase,
    JobState,
    JobStatus,
    Loaded,
    ModelLifecycle,
    ModelState,
)

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def job(command: JobCommand, state: JobStatus, **fields: Any) -> JobState:
    defaults: dict[str, Any] = {
        "job_id": f"j-{command}-{state}",
        "phase": JobPhase.DONE,
        "created_at": NOW,
        "started_at": NOW,
        "finished_at": NOW + timedelta(seconds=4),
        "ts": NOW,
        "model": "alpha",
    }
    return JobState(command=command, state=state, **{**defaults, **fields})


def loaded(model: str, load_s: float) -> Loaded:
    return Loaded(model=model, gpus=[0], load_s=load_s, evicted=[], service="http://x")


def metrics(
    gpus: list[GpuState] | None = None,
    models: list[ModelState] | None = None,
    queued: dict[str, int] | None = None,
) -> AgentMetrics:
    return AgentMetrics(
        AgentState(
            gpus=lambda: gpus or [],
            models=lambda: models or [],
            queued=lambda: queued or {"swap": 0, "install": 0},
            version="1.2.3",
            protocol_version="2",
        )
    )


def samples(agent: AgentMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = agent.exposition(None)
    assert content_type.startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(agent: AgentMetrics, name: str, **labels: str) -> float | None:
    return samples(agent).get((name, frozenset(labels.items())))


def test_swaps_loads_and_failures_are_counted_as_their_jobs_end() -> None:
    agent = metrics()
    agent.job_finished(job(JobCommand.SWITCH, JobStatus.SUCCEEDED, result=loaded("alpha", 2.5)))
    failure = ErrorInfo(code=ErrorCode.LOAD_FAILED, message="exited with 1")
    agent.job_finished(job(JobCommand.LOAD, JobStatus.FAILED, model="beta", error=failure))
    agent.job_finished(job(JobCommand.LOAD, JobStatus.CANCELLED, started_at=None))
    agent.job_finished(job(JobCommand.UNLOAD, JobStatus.SUCCEEDED))
    assert value(agent, "modelbus_swaps_total", result="succeeded") == 1
    assert value(agent, "modelbus_swaps_total", result="failed") == 1
    assert value(agent, "modelbus_swaps_total", result="cancelled") == 1
    # An unload brings no model in: no swap.
    assert sum(v for (n, _), v in samples(agent).items() if n == "modelbus_swaps_total") == 3
    assert value(agent, "modelbus_swap_duration_seconds_count") == 1
    assert value(agent, "modelbus_swap_duration_seconds_sum") == 4.0
    assert value(agent, "modelbus_swap_duration_seconds_bucket", le="5.0") == 1
    assert value(agent, "modelbus_swap_duration_seconds_bucket", le="2.5") == 0
    assert value(agent, "modelbus_model_load_duration_seconds_sum", model="alpha") == 2.5
    assert value(agent, "modelbus_load_failures_total", model="beta", reason="load_failed") == 1
    # A job cancelled while queued never started: it has no duration.
    assert (
        value(agent, "modelbus_job_duration_seconds_count", command="load", result="cancelled")
        is None
    )
    assert (
        value(agent, "modelbus_job_duration_seconds_count", command="unload", result="succeeded")
        == 1
    )


def test_install_bytes_count_what_was_fetched_not_what_was_there() -> None:
    agent = metrics()
    install = job(JobCommand.INSTALL, JobStatus.RUNNING, model=None, finished_at=None)
    for done in (100, 300, 300, 1000):
        agent.job_changed(install.model_copy(update={"bytes_done": done}))
    agent.job_finished(install.model_copy(update={"state": JobStatus.SUCCEEDED}))
    # A second install resuming at 1000 of 1500.
    second = install.model_copy(update={"job_id": "j-2"})
    for done in (1000, 1500):
        agent.job_changed(second.model_copy(update={"bytes_done": done}))
    assert value(agent, "modelbus_install_bytes_total") == 900 + 500
    assert value(agent, "modelbus_swaps_total", result="succeeded") is None


def test_gpus_carry_dcgm_exporters_labels_in_base_units() -> None:
    gpu = GpuState(
        index=0,
        uuid="GPU-1234",
        memory_total_mb=32768,
        memory_used_mb=20000,
        memory_free_mb=12768,
        utilization_percent=45,
        power_w=212.5,
        ts=NOW,
    )
    agent = metrics(gpus=[gpu])
    labels = {"gpu": "0", "UUID": "GPU-1234"}
    assert value(agent, "modelbus_gpu_memory_used_bytes", **labels) == 20000 * BYTES_PER_MIB
    assert value(agent, "modelbus_gpu_memory_total_bytes", **labels) == 32768 * BYTES_PER_MIB
    assert value(agent, "modelbus_gpu_memory_free_bytes", **labels) == 12768 * BYTES_PER_MIB
    assert value(agent, "modelbus_gpu_utilization_ratio", **labels) == 0.45
    assert value(agent, "modelbus_gpu_power_watts", **labels) == 212.5
    # A reading the GPU did not give is absent, not a 0 that would read as cold.
    assert value(agent, "modelbus_gpu_temperature_celsius", **labels) is None


def test_models_queues_and_the_build_are_read_at_the_scrape() -> None:
    models = [
        ModelState(
            name="alpha",
            runtime="process",
            state=ModelLifecycle.READY,
            gpus=[0, 1],
            vram_used_mb=4096,
            in_flight=3,
            ts=NOW,
        ),
        ModelState(name="beta", runtime="process", state=ModelLifecycle.STOPPED, ts=NOW),
        ModelState(
            name="gamma",
            runtime="process",
            state=ModelLifecycle.SLEEPING,
            vram_used_mb=2048,
            sleep="vllm",
            ts=NOW,
        ),
    ]
    agent = metrics(models=models, queued={"swap": 2, "install": 0})
    # Asleep: its server runs, its VRAM is free, it is not loaded.
    assert value(agent, "modelbus_model_state", model="gamma", state="sleeping") == 1
    assert value(agent, "modelbus_model_state", model="gamma", state="ready") == 0
    assert value(agent, "modelbus_model_vram_bytes", model="gamma") == 0
    assert value(agent, "modelbus_model_loaded", model="gamma", gpu="0") is None
    assert value(agent, "modelbus_model_loaded", model="alpha", gpu="0") == 1
    assert value(agent, "modelbus_model_loaded", model="alpha", gpu="1") == 1
    assert value(agent, "modelbus_model_loaded", model="beta", gpu="0") is None
    assert value(agent, "modelbus_model_state", model="alpha", state="ready") == 1
    assert value(agent, "modelbus_model_state", model="alpha", state="loading") == 0
    assert value(agent, "modelbus_model_state", model="beta", state="stopped") == 1
    assert value(agent, "modelbus_model_vram_bytes", model="alpha") == 4096 * BYTES_PER_MIB
    assert value(agent, "modelbus_model_vram_bytes", model="beta") == 0
    assert value(agent, "modelbus_requests_in_flight", model="alpha") == 3
    assert value(agent, "modelbus_jobs_queued", queue="swap") == 2
    assert value(agent, "modelbus_build_info", version="1.2.3", protocol_version="2") == 1
    # Read at each scrape: a model that became ready shows at the next one.
    models[1] = models[1].model_copy(update={"state": ModelLifecycle.READY, "gpus": [0]})
    assert value(agent, "modelbus_model_loaded", model="beta", gpu="0") == 1


def test_gateway_requests_by_model_and_status() -> None:
    agent = metrics()
    agent.request_admitted("alpha", 0.002)
    agent.request_admitted("alpha", 3.0)
    agent.request_answered("alpha", 200)
    agent.request_answered("alpha", 200)
    agent.request_answered("", 404)
    assert value(agent, "modelbus_requests_total", model="alpha", code="200") == 2
    assert value(agent, "modelbus_requests_total", model="", code="404") == 1
    assert value(agent, "modelbus_request_queue_seconds_count") == 2
    assert value(agent, "modelbus_request_queue_seconds_bucket", le="0.005") == 1


def test_a_scraper_asking_for_openmetrics_gets_it() -> None:
    body, content_type = metrics().exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_the_text_format_says_what_prometheus_clients_own_encoder_says() -> None:
    gpu = GpuState(index=0, uuid="GPU-1", memory_total_mb=1024, temperature_c=41, ts=NOW)
    model = ModelState(name='odd "name"\\x', runtime="process", state=ModelLifecycle.READY, ts=NOW)
    agent = metrics(gpus=[gpu], models=[model])
    agent.job_finished(job(JobCommand.LOAD, JobStatus.SUCCEEDED, result=loaded("alpha", 0.3)))
    agent.request_admitted("alpha", 0.01)

    def parsed(text: str) -> set[tuple[str, frozenset[tuple[str, str]], float]]:
        return {
            (sample.name, frozenset(sample.labels.items()), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    ours, _ = agent.exposition(None)
    theirs = generate_latest(agent.registry)
    assert parsed(ours.decode()) == parsed(theirs.decode())
    assert b"_created" not in ours and b"_created" in theirs
