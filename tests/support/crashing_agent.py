"""The real agent with one function patched to fail as a bug would: once it is online,
its telemetry loop raises. Run as ``python -m tests.support.crashing_agent agent ...``;
the product has no test-only code path for this."""

from __future__ import annotations

import sys

from agent import cli, service


async def _telemetry_that_fails(self: service.AgentService) -> None:
    await self.client.connected.wait()
    await self.client.wait_delivered(10.0)  # "online" has reached the broker
    raise RuntimeError("an unexpected error in the telemetry loop (injected by the test)")


service.AgentService._telemetry_loop = _telemetry_that_fails  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
