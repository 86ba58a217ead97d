"""Forwarding one request to a model's server and its answer back. Bytes pass through
unparsed: a stream's chunks reach the client as the server sends them. A client that
goes away cancels the handler, and with it the upstream request (its connection is
closed, which servers such as llama.cpp take as a cancel)."""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from agent.catalog import ModelSpec
from agent.gateway import errors

log = logging.getLogger("modelbus.gateway")

# Headers that describe one connection, not the message (RFC 9110 7.6.1), and the
# caller's credentials, which are the gateway's business, not the model server's.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "authorization",
        "x-api-key",
    }
)
_NOT_RETURNED = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "server",
        "date",
    }
)
EVENT_STREAM = "text/event-stream"
# Answers read whole before they are sent (JSON documents, short texts).
WHOLE_ANSWERS = frozenset({"application/json", "text/plain", ""})


class Upstreams:
    """One long-lived client session for every model server: its pool keeps
    connections alive between requests (a fresh TCP connect per request costs more
    than the gateway's whole overhead). aiohttp sets TCP_NODELAY on every connection,
    the server's and the client's (``BaseProtocol.connection_made``)."""

    def __init__(self, *, connect_timeout_s: float) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trust_env=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(
        self,
        request: web.Request,
        spec: ModelSpec,
        body: bytes | aiohttp.FormData | aiohttp.StreamReader,
        *,
        path: str | None = None,
    ) -> web.StreamResponse:
        """Send ``body`` to ``spec``'s server at ``path`` (the request's own path and
        query by default) and relay its answer. A form gets its own Content-Type (a new
        boundary); a body streamed through keeps the caller's Content-Length."""
        assert self._session is not None, "Upstreams.start was not called"
        url = f"http://127.0.0.1:{spec.port}{path or request.rel_url}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        if isinstance(body, aiohttp.FormData):
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        elif isinstance(body, aiohttp.StreamReader) and request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        timeout = aiohttp.ClientTimeout(
            total=spec.request_timeout_s, sock_connect=self._connect_timeout_s
        )
        try:
            upstream = await self._session.request(
                request.method, url, data=body, headers=headers, timeout=timeout
            )
        except TimeoutError:
            raise errors.timed_out(
                spec.name, "its server's answer", spec.request_timeout_s
            ) from None
        except aiohttp.ClientError as exc:
            raise errors.upstream_failed(spec.name, _describe(exc)) from None
        async with upstream:
            return await _relay(request, spec, upstream)


async def _relay(
    request: web.Request, spec: ModelSpec, upstream: aiohttp.ClientResponse
) -> web.StreamResponse:
    headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _NOT_RETURNED]
    if upstream.content_type in WHOLE_ANSWERS:
        # A whole answer (a completion, embeddings): read it, then send it, so that a
        # server dying half-way is a clean 502, not half a JSON document. Anything
        # else (a stream of events, audio, an image, a file) flows through as it comes.
        try:
            body = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _broke_off(spec, exc) from None
        return web.Response(
            status=upstream.status, reason=upstream.reason, body=body, headers=headers
        )
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    # Nginx and friends would otherwise hold the chunks back.
    response.headers["X-Accel-Buffering"] = "no"
    response.headers["Cache-Control"] = "no-cache"
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except (TimeoutError, aiohttp.ClientError) as exc:
        failure = _broke_off(spec, exc)
        log.warning("%s: the stream broke off: %s", spec.name, failure.message)
        if upstream.content_type != EVENT_STREAM:
            # A file cut short can only be told by its connection closing early.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write(failure.sse_event())
    await response.write_eof()
    return response


def _broke_off(spec: ModelSpec, exc: BaseException) -> errors.GatewayError:
    if isinstance(exc, TimeoutError):
        return errors.timed_out(spec.name, "its server's answer", spec.request_timeout_s)
    return errors.upstream_failed(spec.name, _describe(exc))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"nothing answers at {exc.host}:{exc.port} ({exc.os_error.strerror or exc})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "it closed the connection"
    return str(exc) or type(exc).__name__
