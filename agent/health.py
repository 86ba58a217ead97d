"""A minimal asynchronous health probe: one HTTP GET over a fresh connection.

Model servers answer ``/health`` on loopback; a full HTTP client would cost
more than the probe itself, and we poll every 10 ms while a model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit


async def probe(url: str, timeout_s: float = 2.0) -> int | None:
    """The HTTP status code of GET ``url``, or None when nothing answered."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"health URL must be http://host:port/path, not {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            writer.write(
                f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            status_line = await reader.readline()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    fields = status_line.split()
    if len(fields) >= 2 and fields[0].startswith(b"HTTP/") and fields[1].isdigit():
        return int(fields[1])
    return None
