"""What the lifecycle needs from a way of running model servers.

Two runtimes implement it: ``process`` (a local process group) and ``docker``
(containers through the Docker SDK). Both can adopt the servers they started
before an agent restart, so the agent never loses track of VRAM it owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from agent.catalog import ModelSpec
from agent.log_lines import LogCursor, LogRead


class RuntimeFailure(Exception):
    """A runtime could not do what was asked; the message is for the operator."""


@dataclass(frozen=True, slots=True)
class Instance:
    """One running model server, as much as the agent needs to find it again."""

    model: str
    runtime: str
    pid: int | None = None
    container_id: str | None = None
    container_name: str | None = None
    started_at: float = 0.0  # time.time()
    # Processes that belong to it (the group leader and children; a container's
    # processes), for attributing GPU memory to the model.
    pids: frozenset[int] = field(default_factory=frozenset)
    # What asks it to stop (the catalog's stop_signal when it was started or adopted).
    stop_signal: str = "SIGTERM"


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """Why an instance is no longer running."""

    code: int | None
    reason: str


class Runtime(Protocol):
    name: str
    # Whether the server's own processes listen on its port (a process group does;
    # Docker publishes a container's port through dockerd, and refuses a taken one).
    listens_itself: bool

    async def start(self, spec: ModelSpec, extra_env: dict[str, str]) -> Instance:
        """Start the server for ``spec``; returns once it was launched (not healthy)."""
        ...

    async def stop(self, instance: Instance, timeout_s: float) -> None:
        """Ask it to stop (SIGTERM / docker stop), kill after ``timeout_s``; idempotent."""
        ...

    async def exit_status(self, instance: Instance) -> ExitStatus | None:
        """None while it runs; why it stopped otherwise."""
        ...

    async def logs(self, instance: Instance, lines: int = 20) -> list[str]:
        """Its last output lines, for error reports; never raises (an empty list when
        they cannot be read), and never blocks the event loop."""
        ...

    async def read_log(
        self, spec: ModelSpec, since: LogCursor | None, lines: int, *, live: bool
    ) -> LogRead:
        """The ``logs`` command's answer: the last ``lines`` lines of the model's server
        output, or the first after ``since`` (log_lines.py). The last run's output is
        answered as long as the runtime still has it; a model never run has no lines.
        ``live``: a server runs now (its last line may still be written). Raises
        BadCursor for a ``since`` of another kind, RuntimeFailure when the output cannot
        be read; never blocks the event loop."""
        ...

    async def adopt(self, specs: dict[str, ModelSpec]) -> list[Instance]:
        """Instances this runtime started earlier (pid files, container labels) that are
        still running, for models still in the catalog."""
        ...

    async def pids(self, instance: Instance) -> frozenset[int]:
        """The host pids that belong to the instance now."""
        ...
