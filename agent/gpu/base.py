"""The GPU telemetry interface shared by the NVML and simulated backends.

Samples are immutable snapshots with units in the field names, as nvitop does:
a metric the card does not report is ``None``, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class GpuUnavailableError(RuntimeError):
    """No usable GPU backend: the message is one sentence a user can act on."""


@dataclass(frozen=True, slots=True)
class GpuProcessSample:
    pid: int
    used_mb: int | None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class GpuSample:
    index: int
    uuid: str | None
    name: str | None
    memory_total_mb: int | None
    memory_used_mb: int | None
    memory_free_mb: int | None
    utilization_percent: int | None
    memory_utilization_percent: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    processes: tuple[GpuProcessSample, ...] = ()
    # True when the device stopped answering (fell off the bus, driver reset):
    # the metrics are then None and the GPU is still listed so nobody forgets it.
    lost: bool = False


@dataclass(frozen=True, slots=True)
class DriverInfo:
    backend: str
    driver_version: str | None
    cuda_version: str | None


class ChangeSignal(Protocol):
    """A file descriptor that turns readable when GPU memory changed, so the agent
    can wait for changes instead of polling for them (polling a fast signature at
    50 Hz costs more CPU than the whole telemetry loop)."""

    def fileno(self) -> int: ...

    def drain(self) -> None:
        """Consume the pending notifications."""
        ...

    def next_due_s(self) -> float | None:
        """Seconds until a change happens that nobody will announce (memory coming
        back after a release delay), or None."""
        ...

    def close(self) -> None: ...


class GpuBackend(Protocol):
    """What the agent needs from a GPU source. Calls may block: the agent runs
    them off the event loop, under a timeout."""

    name: str

    def driver_info(self) -> DriverInfo:
        """Static facts, queried once. Raises GpuUnavailableError."""
        ...

    def sample(self) -> tuple[GpuSample, ...]:
        """A full snapshot of every GPU. Raises GpuUnavailableError only if the
        whole backend is gone; one lost GPU is reported with ``lost=True``."""
        ...

    def memory_signature(self) -> tuple[int, ...]:
        """A cheap value that changes whenever memory use or the process list
        changes, so the agent can publish at once instead of at the next tick."""
        ...

    def change_signal(self) -> ChangeSignal | None:
        """A push notification of changes, when the backend has one; otherwise the
        agent polls ``memory_signature()``."""
        ...

    def close(self) -> None: ...
