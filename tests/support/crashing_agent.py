"""The real agent with one function patched to fail as a bug would: once it is online,
its telemetry loop raises. Run as ``python -m tests.support.crashing_agent agent ...``;
the product has no test-only code path for this."""

from __future__ import annotations

import asyncio
import sys

from agent import gpu_telemetry, service
from bus.mqtt import Connection
from modelbus import cli

_announced_online = service.AgentService._on_connected
_online: asyncio.Event | None = None


def _online_event() -> asyncio.Event:
    global _online
    if _online is None:
        _online = asyncio.Event()
    return _online


async def _on_connected(self: service.AgentService, connection: Connection) -> None:
    await _announced_online(self, connection)
    _online_event().set()


async def _telemetry_that_fails(self: gpu_telemetry.GpuTelemetry) -> None:
    await _online_event().wait()
    await self._client.wait_delivered(10.0)  # "online" has reached the broker
    raise RuntimeError("an unexpected error in the telemetry loop (injected by the test)")


service.AgentService._on_connected = _on_connected  # type: ignore[method-assign]
gpu_telemetry.GpuTelemetry.run = _telemetry_that_fails  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
