"""Choose and build the GPU backend the configuration asks for."""

from __future__ import annotations

from agent.config import AgentConfig
from agent.gpu.base import GpuBackend


def open_backend(config: AgentConfig) -> GpuBackend:
    if config.gpu.backend == "sim":
        from agent.gpu.sim import SimBackend, SimGpuSpec

        sim = config.gpu.sim
        specs = [
            SimGpuSpec(
                name=gpu.name,
                memory_total_mb=gpu.memory_total_mb,
                foreign_mb=gpu.foreign_mb,
                power_limit_w=gpu.power_limit_w,
            )
            for gpu in sim.gpus
        ]
        return SimBackend(config.sim_state_file, specs, release_delay_s=sim.release_delay_s)
    from agent.gpu.nvml import NvmlBackend

    return NvmlBackend()
