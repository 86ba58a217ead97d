"""Build the runtimes the catalog needs; Docker only when a model uses it."""

from __future__ import annotations

from agent.catalog import Catalog
from agent.config import AgentConfig
from agent.runtimes.base import Runtime


def build_runtimes(config: AgentConfig, catalog: Catalog | None = None) -> dict[str, Runtime]:
    from agent.runtimes.process import ProcessRuntime

    runtimes: dict[str, Runtime] = {"process": ProcessRuntime(config.state_dir)}
    add_runtimes(runtimes, catalog or config.catalog, config.host_id)
    return runtimes


def add_runtimes(runtimes: dict[str, Runtime], catalog: Catalog, host_id: str) -> None:
    """Add the Docker runtime once a model of ``catalog`` needs it (a reload or a catalog
    command can bring the first one)."""
    if "docker" not in runtimes and any(s.runtime == "docker" for s in catalog.models.values()):
        from agent.runtimes.docker import DockerRuntime

        runtimes["docker"] = DockerRuntime(host_id=host_id)
