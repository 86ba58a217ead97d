"""Putting a model server to sleep and waking it, through the server's own routes.

vLLM's sleep mode (v0.11; the server runs with ``--enable-sleep-mode`` and
``VLLM_SERVER_DEV_MODE=1``): ``POST /sleep?level=1|2`` frees the GPU memory (level 1 keeps
the weights in host RAM, level 2 discards them), ``POST /wake_up`` takes it back, and after
a level 2 sleep ``POST /collective_rpc`` ``{"method": "reload_weights"}`` reloads the weights
and ``POST /reset_prefix_cache`` drops what the cache held. SGLang (0.5, started with
``--enable-memory-saver``): ``POST /release_memory_occupation`` and
``POST /resume_memory_occupation``, each with a JSON body ``{}``.

One request per connection, as the health probe does: the agent calls these once per
swap, on loopback, and needs no HTTP client library for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from agent.catalog import ModelSpec


class SleepFailure(Exception):
    """The server did not sleep or wake as asked; the message is for the operator."""


@dataclass(frozen=True, slots=True)
class Call:
    path: str
    body: dict[str, object] | None = None


def sleep_calls(spec: ModelSpec) -> Sequence[Call]:
    if spec.sleep == "vllm":
        return [Call(f"/sleep?level={spec.sleep_level}")]
    if spec.sleep == "sglang":
        return [Call("/release_memory_occupation", {})]
    return []


def wake_calls(spec: ModelSpec) -> Sequence[Call]:
    if spec.sleep == "vllm":
        calls = [Call("/wake_up")]
        if spec.sleep_level == 2:
            calls += [
                Call("/collective_rpc", {"method": "reload_weights"}),
                Call("/reset_prefix_cache"),
            ]
        return calls
    if spec.sleep == "sglang":
        return [Call("/resume_memory_occupation", {})]
    return []


async def put_to_sleep(spec: ModelSpec, timeout_s: float) -> None:
    await _run(spec, sleep_calls(spec), timeout_s, "sleep")


async def wake(spec: ModelSpec, timeout_s: float) -> None:
    await _run(spec, wake_calls(spec), timeout_s, "wake")


async def _run(spec: ModelSpec, calls: Sequence[Call], timeout_s: float, what: str) -> None:
    if not calls:
        raise SleepFailure(f"{spec.name} has no sleep API (catalog 'sleep')")
    base = urlsplit(spec.health)
    for call in calls:
        try:
            async with asyncio.timeout(timeout_s):
                status, text = await post(base.hostname or "127.0.0.1", base.port or 80, call)
        except TimeoutError:
            raise SleepFailure(
                f"{spec.name} did not answer POST {call.path} within {timeout_s:g} s ({what})"
            ) from None
        except OSError as error:
            raise SleepFailure(
                f"{spec.name} could not be asked to {what}: POST {call.path} failed "
                f"({error.strerror or error})"
            ) from None
        if not 200 <= status < 300:
            raise SleepFailure(
                f"{spec.name} refused to {what}: POST {call.path} answered {status}"
                + (f": {text[:200]}" if text.strip() else "")
            )


async def is_sleeping(spec: ModelSpec, timeout_s: float = 2.0) -> bool | None:
    """Whether the server says it sleeps (vLLM's ``GET /is_sleeping``); None when it cannot
    tell (no such route: SGLang has none, or no answer)."""
    if spec.sleep != "vllm":
        return None
    base = urlsplit(spec.health)
    try:
        async with asyncio.timeout(timeout_s):
            status, text = await post(
                base.hostname or "127.0.0.1", base.port or 80, Call("/is_sleeping"), method="GET"
            )
        answer = json.loads(text) if status == 200 else None
    except (OSError, TimeoutError, ValueError):
        return None
    sleeping = answer.get("is_sleeping") if isinstance(answer, dict) else None
    return sleeping if isinstance(sleeping, bool) else None


async def post(host: str, port: int, call: Call, *, method: str = "POST") -> tuple[int, str]:
    """Send ``call`` to the server; its status code and body (decoded, cut short)."""
    body = b"" if call.body is None else json.dumps(call.body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = (
            f"{method} {call.path} HTTP/1.0\r\nHost: {host}:{port}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        answer = await reader.read(65536)
        while chunk := await reader.read(65536):
            if len(answer) < 65536:
                answer += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    fields = status_line.split()
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise OSError(f"not an HTTP answer: {status_line[:80]!r}")
    _, _, content = rest.partition(b"\r\n\r\n")
    return int(fields[1]), content.decode(errors="replace")
