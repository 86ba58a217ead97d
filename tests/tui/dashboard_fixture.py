"""A fixed, busy bus for the TUI's snapshot tests: every panel has something to show.

Built only from contract payloads (``shared.messages`` models, ``encode``, ``HostTopics``)
fed through ``BusStore.apply``, exactly as the bridge would, at fixed times, so every
screenshot is the same on every machine (with ``TZ=UTC``: events show local time).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agent.telemetry import host_state
from shared.messages import (
    Availability,
    ErrorCode,
    ErrorInfo,
    Event,
    GpuInfo,
    GpuProcess,
    GpuState,
    HostInfo,
    HostState,
    InstalledWeights,
    JobPhase,
    JobState,
    JobStatus,
    LoadedModel,
    ModelLifecycle,
    ModelState,
    PartialWeights,
    Severity,
    WeightsState,
    encode,
)
from shared.topics import HostTopics
from tui.bridge import Link, LinkState
from tui.store import HISTORY_S, BusStore

PREFIX = "snap/modelbus"
FIXED_NOW = datetime(2025, 6, 14, 9, 30, 0, tzinfo=UTC)
LINK = Link(LinkState.CONNECTED, "mqtt://broker.example:1883", "5")
GPU_NAME = "NVIDIA GeForce RTX 5090"
TOTAL_MB = 32607


def ago(**delta: float) -> datetime:
    return FIXED_NOW - timedelta(**delta)


def _gpu(index: int, processes: list[GpuProcess], **figures: int | float) -> GpuState:
    used = sum(p.used_mb or 0 for p in processes)
    return GpuState(
        index=index,
        uuid=f"GPU-0000000{index}",
        name=GPU_NAME,
        memory_total_mb=TOTAL_MB,
        memory_used_mb=used,
        memory_free_mb=TOTAL_MB - used,
        processes=processes,
        ts=FIXED_NOW,
        **figures,  # type: ignore[arg-type]
    )


def _info(host: str, *, gpus: int, started: datetime) -> HostInfo:
    return HostInfo(
        host_id=host,
        hostname=f"{host}.lan",
        agent_version="0.1.0",
        protocol_version="1",
        mqtt_protocol="5",
        gpu_backend="nvml",
        driver_version="575.51",
        cuda_version="12.9",
        gpus=[GpuInfo(index=i, name=GPU_NAME, memory_total_mb=TOTAL_MB) for i in range(gpus)],
        commands=["cancel", "install", "load", "plan", "status", "switch", "unload"],
        started_at=started,
        ts=started,
    )


def _host_state(
    gpus: list[GpuState], loaded: dict[str, datetime], *, queue: int, job: str | None
) -> HostState:
    return host_state(
        gpus,
        FIXED_NOW,
        loaded_models={
            name: LoadedModel(model=name, service=name, loaded_at=at, status="ready")
            for name, at in loaded.items()
        },
        queue_length=queue,
        active_job=job,
    )


def _gpu1_messages(t: HostTopics) -> list[tuple[str, bytes]]:
    gpu0 = _gpu(
        0,
        [
            GpuProcess(pid=48213, used_mb=17236, name="llama-server", model="qwen3-vl-30b"),
            GpuProcess(pid=51002, used_mb=11240, name="python", model="ovi-11b"),
            GpuProcess(pid=1432, used_mb=1536, name="jupyter-notebook"),
        ],
        utilization_percent=97,
        temperature_c=83,
        power_w=541.2,
        power_limit_w=575,
    )
    gpu1 = _gpu(
        1,
        [GpuProcess(pid=50110, used_mb=8012, name="python", model="infinitetalk")],
        utilization_percent=12,
        temperature_c=51,
        power_w=98.4,
        power_limit_w=575,
    )
    models = [
        ModelState(
            name="qwen3-vl-30b",
            runtime="process",
            state=ModelLifecycle.READY,
            gpus=[0],
            vram_estimate_mb=17408,
            vram_used_mb=17236,
            health="ok",
            loaded_at=ago(hours=2, minutes=14, seconds=5),
            last_used_at=ago(seconds=42),
            last_load_s=61.5,
            priority=10,
            pinned=True,
            in_flight=3,
            requests_total=1287,
            last_request_at=ago(seconds=1),
            ts=FIXED_NOW,
        ),
        ModelState(
            name="ovi-11b",
            runtime="process",
            state=ModelLifecycle.LOADING,
            gpus=[0],
            vram_estimate_mb=22528,
            vram_used_mb=11240,
            last_used_at=ago(days=1, hours=2),
            priority=3,
            ts=FIXED_NOW,
        ),
        ModelState(
            name="wan2.1-14b",
            runtime="docker",
            state=ModelLifecycle.STOPPED,
            vram_estimate_mb=28672,
            last_used_at=ago(hours=5, minutes=2),
            ts=FIXED_NOW,
        ),
        ModelState(
            name="infinitetalk",
            runtime="process",
            state=ModelLifecycle.ERROR,
            gpus=[1],
            vram_estimate_mb=8192,
            vram_used_mb=8012,
            error="health check failed 3 times: connection refused",
            loaded_at=ago(minutes=9),
            priority=1,
            ts=FIXED_NOW,
        ),
        ModelState(
            name="whisperx",
            runtime="process",
            state=ModelLifecycle.CRASHED,
            vram_estimate_mb=6144,
            error="exited with code 137 (out of memory?)",
            last_used_at=ago(minutes=12, seconds=30),
            priority=2,
            ts=FIXED_NOW,
        ),
    ]
    jobs = [
        JobState(
            job_id="j-0007",
            command="switch",
            model="ovi-11b",
            request_id="tui-abc-1",
            state=JobStatus.RUNNING,
            phase=JobPhase.LOADING,
            progress=0.45,
            eta_s=83,
            message="waiting for /health",
            created_at=ago(seconds=70),
            started_at=ago(seconds=68),
            ts=FIXED_NOW,
        ),
        JobState(
            job_id="j-0008",
            command="load",
            model="wan2.1-14b",
            state=JobStatus.QUEUED,
            phase=JobPhase.QUEUED,
            queue_position=1,
            created_at=ago(seconds=20),
            ts=FIXED_NOW,
        ),
        JobState(
            job_id="j-0006",
            command="load",
            model="whisperx",
            state=JobStatus.FAILED,
            phase=JobPhase.DONE,
            error=ErrorInfo(code=ErrorCode.LOAD_FAILED, message="server exited with code 137"),
            created_at=ago(seconds=95),
            started_at=ago(seconds=94),
            finished_at=ago(seconds=6),
            ts=ago(seconds=6),
        ),
        # Older ones the agent still keeps: a tall screen shows them below the rest.
        JobState(
            job_id="j-0005",
            command="install",
            repo="Qwen/Qwen3-VL-30B-A3B-Instruct",
            state=JobStatus.SUCCEEDED,
            phase=JobPhase.DONE,
            progress=1.0,
            message="installed Qwen/Qwen3-VL-30B-A3B-Instruct (58.2 GiB)",
            created_at=ago(minutes=42),
            started_at=ago(minutes=42),
            finished_at=ago(minutes=25),
            ts=ago(minutes=25),
        ),
        JobState(
            job_id="j-0003",
            command="unload",
            model="wan2.1-14b",
            state=JobStatus.SUCCEEDED,
            phase=JobPhase.DONE,
            progress=1.0,
            message="wan2.1-14b unloaded",
            created_at=ago(minutes=50),
            started_at=ago(minutes=50),
            finished_at=ago(minutes=50),
            ts=ago(minutes=50),
        ),
        JobState(
            job_id="j-0004",
            command="switch",
            model="qwen3-vl-30b",
            state=JobStatus.SUCCEEDED,
            phase=JobPhase.DONE,
            progress=1.0,
            message="qwen3-vl-30b is ready",
            created_at=ago(minutes=21),
            started_at=ago(minutes=21),
            finished_at=ago(minutes=20),
            ts=ago(minutes=20),
        ),
    ]
    events = [
        Event(
            event_type="model_loaded",
            severity=Severity.INFO,
            message="qwen3-vl-30b ready in 61.5 s",
            model="qwen3-vl-30b",
            ts=ago(minutes=20),
        ),
        Event(
            event_type="model_unloaded",
            severity=Severity.INFO,
            message="wan2.1-14b stopped to make room",
            model="wan2.1-14b",
            ts=ago(minutes=15),
        ),
        Event(
            event_type="temperature_high",
            severity=Severity.WARNING,
            message="GPU0 at 83 °C",
            gpu=0,
            ts=ago(minutes=4),
        ),
        Event(
            event_type="vram_high",
            severity=Severity.WARNING,
            message="GPU0 VRAM 96% used",
            gpu=0,
            ts=ago(minutes=2),
        ),
        Event(
            event_type="model_crashed",
            severity=Severity.CRITICAL,
            message="whisperx crashed: exited with code 137",
            model="whisperx",
            ts=ago(seconds=50),
        ),
        Event(
            event_type="job_failed",
            severity=Severity.ERROR,
            message="load whisperx failed: server exited with code 137",
            job_id="j-0006",
            ts=ago(seconds=6),
        ),
        Event(
            event_type="model_load_failed",
            severity=Severity.ERROR,
            message="infinitetalk health check failed",
            model="infinitetalk",
            ts=ago(seconds=3),
        ),
    ]
    loaded = {m.name: m.loaded_at for m in models if m.loaded_at is not None}
    messages = [
        (t.status, Availability.ONLINE.value.encode()),
        (t.info, encode(_info(t.host, gpus=2, started=ago(days=2)))),
        (t.gpu(0), encode(gpu0)),
        (t.gpu(1), encode(gpu1)),
        (t.state, encode(_host_state([gpu0, gpu1], loaded, queue=1, job="j-0007"))),
    ]
    messages += [(t.model(m.name), encode(m)) for m in models]
    messages += [(t.job(j.job_id), encode(j)) for j in jobs]
    messages += [(t.events, encode(e)) for e in events]
    messages.append((t.weights, encode(_weights())))
    return messages


def _weights() -> WeightsState:
    return WeightsState(
        weights=[
            InstalledWeights(
                name="Qwen--Qwen3-VL-30B-A3B-Instruct",
                repo="Qwen/Qwen3-VL-30B-A3B-Instruct",
                size_mb=59597,
                path="/var/lib/modelbus/weights/Qwen--Qwen3-VL-30B-A3B-Instruct",
                used_by=["qwen3-vl-30b"],
                installed_at=ago(minutes=25),
            ),
            InstalledWeights(
                name="openai--whisper-large-v3",
                repo="openai/whisper-large-v3",
                size_mb=2950,
                path="/var/lib/modelbus/weights/openai--whisper-large-v3",
                installed_at=ago(days=3),
            ),
        ],
        partial=[
            PartialWeights(
                name="Wan-AI--Wan2.1-T2V-14B",
                repo="Wan-AI/Wan2.1-T2V-14B",
                size_mb=20480,
                path="/var/lib/modelbus/weights/.partial/Wan-AI--Wan2.1-T2V-14B",
            )
        ],
        weights_dir="/var/lib/modelbus/weights",
        used_mb=83027,
        disk_total_mb=1907729,
        disk_free_mb=412876,
        ts=ago(minutes=25),
    )


def _gpu2_messages(t: HostTopics) -> list[tuple[str, bytes]]:
    last = ago(minutes=7, seconds=30)
    gpu0 = _gpu(
        0,
        [GpuProcess(pid=7001, used_mb=14000, name="python", model="flux-dev")],
        utilization_percent=0,
        temperature_c=44,
        power_w=61.0,
        power_limit_w=450,
    ).model_copy(update={"ts": last})
    models = [
        ModelState(
            name="flux-dev",
            runtime="docker",
            state=ModelLifecycle.READY,
            gpus=[0],
            vram_estimate_mb=14336,
            vram_used_mb=14000,
            loaded_at=ago(hours=3),
            last_used_at=ago(minutes=8),
            priority=4,
            ts=last,
        ),
        ModelState(
            name="whisperx",
            runtime="docker",
            state=ModelLifecycle.STOPPED,
            vram_estimate_mb=6144,
            ts=last,
        ),
    ]
    state = _host_state([gpu0], {"flux-dev": ago(hours=3)}, queue=0, job=None)
    messages = [
        (t.info, encode(_info(t.host, gpus=1, started=ago(days=9)))),
        (t.gpu(0), encode(gpu0)),
        (t.state, encode(state.model_copy(update={"ts": last}))),
    ]
    messages += [(t.model(m.name), encode(m)) for m in models]
    messages.append(
        (
            t.events,
            encode(
                Event(
                    event_type="agent_offline",
                    severity=Severity.WARNING,
                    message="agent stopped (SIGTERM)",
                    ts=last,
                )
            ),
        )
    )
    # The broker publishes the will last: the host went away after all of the above.
    messages.append((t.status, Availability.OFFLINE.value.encode()))
    return messages


# (memory used MiB, utilization %) of gpu1's GPUs over the ten minutes before the screen.
GPU1_HISTORY = [(1536, 0)] * 6 + [(18772, 35), (18772, 60)] * 4 + [(30012, 97)] * 16


def dashboard_store() -> BusStore:
    """Two hosts: ``gpu1`` online and busy, ``gpu2`` offline with its last-known state."""
    clock = [1000.0 - HISTORY_S]
    store = BusStore(PREFIX, clock=lambda: clock[0])
    gpu2 = HostTopics(PREFIX, "gpu2")
    gpu1 = HostTopics(PREFIX, "gpu1")
    # gpu1's last ten minutes, for the sparklines: a model loaded, then another, busy.
    for step, (used_mb, busy) in enumerate(GPU1_HISTORY):
        clock[0] = 1000.0 - HISTORY_S + step * HISTORY_S / len(GPU1_HISTORY)
        for index in (0, 1):
            sample = _gpu(index, [GpuProcess(pid=9, used_mb=used_mb // (index + 1))])
            sample = sample.model_copy(update={"utilization_percent": busy // (index + 1)})
            store.apply(gpu1.gpu(index), encode(sample), retained=True)  # repeats: no change
    clock[0] = 1000.0
    # gpu2's messages first so its one event is the oldest in the shared event list.
    for topic, payload in [*_gpu2_messages(gpu2), *_gpu1_messages(gpu1)]:
        change = store.apply(topic, payload, retained=not topic.endswith("/events"))
        assert change is not None, f"the store ignored {topic}"
    assert not store.skipped, store.problems
    return store
