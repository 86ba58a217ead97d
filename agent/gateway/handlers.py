"""What every route module of the HTTP server shares: who the caller is, the role a
route needs, and JSON bodies written from the contract's models."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from agent.gateway import errors
from agent.gateway.keys import Caller, Role
from shared.messages import encode

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Where the authenticated caller is kept on a request.
CALLER = "modelbus.caller"


def require(request: web.Request, role: Role) -> Caller:
    caller: Caller = request[CALLER]
    if caller.role < role:
        raise errors.forbidden(caller.name, caller.role.label, role.label)
    return caller


def json_bytes(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def json_model(item: BaseModel, status: int = 200) -> web.Response:
    return json_bytes(encode(item), status)


def json_list(items: Sequence[BaseModel]) -> web.Response:
    return json_bytes(b"[" + b",".join(encode(item) for item in items) + b"]")


def json_object(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_compact)


def error_response(error: errors.GatewayError) -> web.Response:
    return web.json_response(error.body(), status=int(error.status), headers=error.headers)


async def read_small(request: web.Request, max_bytes: int) -> bytes | None:
    """The body, or None once it is longer than ``max_bytes``: read no further than that
    (a chunked body has no Content-Length to refuse it by)."""
    if request.content_length is not None and request.content_length > max_bytes:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def json_fields(request: web.Request, *, max_bytes: int) -> dict[str, Any]:
    """A small JSON object body (an empty body is an empty object)."""
    body = await read_small(request, max_bytes)
    if body is None:
        raise errors.payload_too_large(max_bytes, setting=None)
    return json_object_of(body) if body.strip() else {}


def json_object_of(body: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        raise errors.bad_request("the body is not JSON") from None
    if not isinstance(fields, dict):
        raise errors.bad_request("the body must be a JSON object")
    return fields


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
