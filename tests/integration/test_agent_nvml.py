"""The agent service on the NVML backend (a fake pynvml module with pynvml's real
exceptions, since this machine has no GPU), publishing to a real broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from agent.config import load_config
from agent.gpu.nvml import NvmlBackend
from agent.service import AgentService
from devtools.brokers import MosquittoBroker
from shared.messages import Event, GpuState, HostInfo
from shared.topics import HostTopics
from tests.fakes.fake_nvml import MIB, FakeDevice, FakeProcess, make_fake_nvml
from tests.support.bus import watch


@contextlib.asynccontextmanager
async def running(service: AgentService) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def nvml_service(broker: MosquittoBroker, prefix: str, devices: list[FakeDevice]) -> AgentService:
    config = load_config(
        None,
        environ={},
        overrides={
            "broker.url": broker.url,
            "host_id": "real-gpu",
            "prefix": prefix,
            "telemetry.interval_s": 600.0,  # only change detection can publish promptly
            "telemetry.watch_interval_s": 0.05,
            "http.listen": "off",
        },
    )
    return AgentService(config, NvmlBackend(make_fake_nvml(devices)))


async def test_nvml_telemetry_changes_and_a_lost_gpu(broker: MosquittoBroker, prefix: str) -> None:
    devices = [
        FakeDevice(uuid="GPU-a", name="NVIDIA H100", memory_total_bytes=81559 * MIB),
        FakeDevice(uuid="GPU-b", name="NVIDIA H100", memory_total_bytes=81559 * MIB),
    ]
    topics = HostTopics(prefix, "real-gpu")
    service = nvml_service(broker, prefix, devices)
    async with watch(broker.port, topics.everything_filter) as bus, running(service):
        await bus.wait_topic(topics.status, lambda v: v == "online", raw=True)
        info = HostInfo.model_validate_json((await bus.wait_topic(topics.info)).payload)
        assert (info.gpu_backend, info.driver_version, info.cuda_version) == (
            "nvml",
            "550.54.15",
            "12.4",
        )
        first = GpuState.model_validate_json((await bus.wait_topic(topics.gpu(1))).payload)
        assert first.memory_total_mb == 81559 and first.power_w == 50.0

        # A process starts on GPU 1: published by the change watch, long before the tick.
        mark = len(bus.messages)
        devices[1].memory_used_bytes = 17408 * MIB
        devices[1].processes = [FakeProcess(pid=4242, used_memory_bytes=17408 * MIB)]
        changed = await bus.wait_topic(
            topics.gpu(1), lambda v: v["memory_used_mb"] == 17408, after=mark, timeout=5
        )
        assert [
            p["pid"]
            for p in GpuState.model_validate_json(changed.payload).model_dump()["processes"]
        ] == [4242]

        # GPU 0 falls off the bus: flagged, announced once, GPU 1 keeps reporting.
        mark = len(bus.messages)
        devices[0].lost = True
        lost = await bus.wait_topic(
            topics.gpu(0), lambda v: "gpu_lost" in v["alerts"], after=mark, timeout=5
        )
        assert GpuState.model_validate_json(lost.payload).memory_used_mb is None
        event = Event.model_validate_json((await bus.wait_topic(topics.events, after=mark)).payload)
        assert (event.event_type, event.gpu, event.severity) == ("gpu_lost", 0, "critical")
        await bus.wait_topic(
            topics.state, lambda v: v["gpus"][0]["alerts"] == ["gpu_lost"], after=mark
        )
    assert service.telemetry.state is not None and service.telemetry.state.total_mb == 81559
