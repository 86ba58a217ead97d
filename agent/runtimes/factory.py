"""Build the runtimes the catalog needs; Docker only when a model uses it."""

from __future__ import annotations

from agent.config import AgentConfig
from agent.runtimes.base import Runtime


def build_runtimes(config: AgentConfig) -> dict[str, Runtime]:
    from agent.runtimes.process import ProcessRuntime

    runtimes: dict[str, Runtime] = {"process": ProcessRuntime(config.state_dir)}
    if any(spec.runtime == "docker" for spec in config.models.values()):
        from agent.runtimes.docker import DockerRuntime

        runtimes["docker"] = DockerRuntime(host_id=config.host_id)
    return runtimes
