from __future__ import annotations

from datetime import UTC, datetime

from agent.gpu.base import GpuProcessSample, GpuSample
from agent.telemetry import ChangeFilter, ProcessOwner, gpu_state, host_state

TS = datetime(2026, 1, 1, tzinfo=UTC)


def sample(index: int = 0, used: int = 1000, total: int = 8000, **kw: object) -> GpuSample:
    values: dict[str, object] = {
        "index": index,
        "uuid": f"GPU-{index}",
        "name": "Test GPU",
        "memory_total_mb": total,
        "memory_used_mb": used,
        "memory_free_mb": total - used,
        "utilization_percent": 40,
        "memory_utilization_percent": 10,
        "temperature_c": 50,
        "power_w": 100.5,
        "power_limit_w": 300.0,
        "processes": (GpuProcessSample(pid=10, used_mb=used, name="srv"),),
    }
    values.update(kw)
    return GpuSample(**values)  # type: ignore[arg-type]


def test_gpu_state_attributes_processes_to_models() -> None:
    owners = {10: ProcessOwner(model="qwen", container="llama")}
    state = gpu_state(sample(), TS, owners.get)
    assert state.memory_used_mb == 1000 and state.memory_free_mb == 7000
    assert state.power_w == 100.5
    assert state.processes[0].model == "qwen" and state.processes[0].container == "llama"
    assert state.alerts == []


def test_lost_gpu_is_flagged() -> None:
    lost = GpuSample(
        index=1, uuid="GPU-1", name="x", memory_total_mb=None, memory_used_mb=None,
        memory_free_mb=None, utilization_percent=None, memory_utilization_percent=None,
        temperature_c=None, power_w=None, power_limit_w=None, lost=True,
    )  # fmt: skip
    assert gpu_state(lost, TS).alerts == ["gpu_lost"]


def test_host_state_sums_answering_gpus_only() -> None:
    lost = gpu_state(sample(1, lost=True, memory_total_mb=None, utilization_percent=None), TS)
    gpus = [
        gpu_state(sample(0, used=1000), TS),
        gpu_state(sample(2, used=3000, utilization_percent=80), TS),
        lost,
    ]
    state = host_state(gpus, TS, queue_length=2, active_job="j1")
    assert (state.total_mb, state.used_mb, state.free_mb) == (16000, 4000, 12000)
    assert state.utilization_percent == 60
    assert [g.index for g in state.gpus] == [0, 2, 1]
    assert state.gpus[2].alerts == ["gpu_lost"]
    assert (state.queue_length, state.active_job) == (2, "j1")


def test_change_filter_ignores_timestamps() -> None:
    changes = ChangeFilter()
    first = gpu_state(sample(), TS)
    assert changes.changed("t", first)
    same_later = gpu_state(sample(), datetime(2026, 1, 2, tzinfo=UTC))
    assert not changes.changed("t", same_later)
    assert changes.changed("t", gpu_state(sample(used=1001), TS))
    changes.forget()
    assert changes.changed("t", gpu_state(sample(used=1001), TS))
