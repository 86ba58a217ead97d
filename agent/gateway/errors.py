"""The gateway's errors, in OpenAI's shape (``{"error": {"message", "type", "code"}}``)
so that the official clients raise the exception a caller expects (``NotFoundError``,
``RateLimitError``...). Pure: the server turns a GatewayError into its response."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from shared.messages import ErrorCode

# The control API's statuses for the bus's error codes (docs/http.md), one table.
COMMAND_STATUS: dict[ErrorCode, HTTPStatus] = {
    ErrorCode.INVALID_PAYLOAD: HTTPStatus.BAD_REQUEST,
    ErrorCode.UNKNOWN_COMMAND: HTTPStatus.NOT_FOUND,
    ErrorCode.UNKNOWN_MODEL: HTTPStatus.NOT_FOUND,
    ErrorCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    ErrorCode.INSUFFICIENT_VRAM: HTTPStatus.CONFLICT,
    ErrorCode.INSUFFICIENT_DISK: HTTPStatus.INSUFFICIENT_STORAGE,
    ErrorCode.QUEUE_FULL: HTTPStatus.TOO_MANY_REQUESTS,
    # busy: the host's state stands in the way (a pinned model, weights in use).
    ErrorCode.BUSY: HTTPStatus.CONFLICT,
    ErrorCode.TIMEOUT: HTTPStatus.GATEWAY_TIMEOUT,
    ErrorCode.LOAD_FAILED: HTTPStatus.BAD_GATEWAY,
    ErrorCode.DOWNLOAD_FAILED: HTTPStatus.BAD_GATEWAY,
    ErrorCode.CANCELLED: HTTPStatus.CONFLICT,
    ErrorCode.FORBIDDEN: HTTPStatus.FORBIDDEN,
    ErrorCode.PAYLOAD_TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    ErrorCode.PORT_IN_USE: HTTPStatus.CONFLICT,
    ErrorCode.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
}
# Codes a caller should retry after a while: their responses say when.
RETRY_LATER = {ErrorCode.QUEUE_FULL}


class GatewayListenError(Exception):
    """The gateway's address cannot be had; the message says what to do. Here, not in
    the server, so that an agent with HTTP off can name it without importing aiohttp."""


@dataclass(eq=False)
class GatewayError(Exception):
    status: HTTPStatus
    message: str
    code: str
    kind: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def sse_event(self) -> bytes:
        """The error as a server-sent event, for a stream that already began."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def bad_request(message: str, *, param: str | None = None) -> GatewayError:
    return GatewayError(HTTPStatus.BAD_REQUEST, message, "invalid_request", param=param)


def refused(code: ErrorCode, message: str) -> GatewayError:
    """A bus command's refusal on a route that answers its data, not its reply envelope."""
    status = COMMAND_STATUS.get(code, HTTPStatus.INTERNAL_SERVER_ERROR)
    kind = "server_error" if status >= HTTPStatus.INTERNAL_SERVER_ERROR else "invalid_request_error"
    return GatewayError(status, message, code.value, kind=kind)


def not_found(what: str) -> GatewayError:
    return GatewayError(HTTPStatus.NOT_FOUND, f"{what} does not exist here", "not_found")


def payload_too_large(
    limit_bytes: int, *, setting: str | None = "http.max_body_mb"
) -> GatewayError:
    limit = (
        f"{setting} ({limit_bytes // (1024 * 1024)} MB)"
        if setting
        else f"this route takes ({limit_bytes} bytes)"
    )
    return GatewayError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is larger than {limit}", "payload_too_large"
    )


def unknown_model(requested: str, names: list[str]) -> GatewayError:
    catalog = ", ".join(names) or "no models"
    return GatewayError(
        HTTPStatus.NOT_FOUND,
        f"the model {requested!r} does not exist here; the catalog has: {catalog}",
        "model_not_found",
        param="model",
    )


def queue_full(model: str, waiting: int, retry_after_s: float) -> GatewayError:
    seconds = max(1, round(retry_after_s))
    return GatewayError(
        HTTPStatus.TOO_MANY_REQUESTS,
        f"{waiting} requests already wait for {model} (its max_queued); retry in {seconds} s",
        "queue_full",
        kind="rate_limit_error",
        headers={"Retry-After": str(seconds)},
    )


def load_failed(model: str, job_id: str, reason: str) -> GatewayError:
    return GatewayError(
        HTTPStatus.SERVICE_UNAVAILABLE,
        f"{model} could not be loaded (job {job_id}): {reason}",
        "model_load_failed",
        kind="server_error",
    )


def upstream_failed(model: str, reason: str) -> GatewayError:
    return GatewayError(
        HTTPStatus.BAD_GATEWAY,
        f"{model}'s server failed to answer: {reason}",
        "upstream_error",
        kind="server_error",
    )


def timed_out(model: str, what: str, seconds: float) -> GatewayError:
    return GatewayError(
        HTTPStatus.GATEWAY_TIMEOUT,
        f"{model}: {what} took longer than {seconds:g} s",
        "timeout",
        kind="server_error",
    )


def busy(message: str, retry_after_s: int = 5) -> GatewayError:
    return GatewayError(
        HTTPStatus.SERVICE_UNAVAILABLE,
        message,
        "busy",
        kind="server_error",
        headers={"Retry-After": str(retry_after_s)},
    )


def unauthorized(message: str) -> GatewayError:
    return GatewayError(HTTPStatus.UNAUTHORIZED, message, "invalid_api_key")


def forbidden(caller: str, role: str, needed: str) -> GatewayError:
    return GatewayError(
        HTTPStatus.FORBIDDEN,
        f"the key {caller!r} has the role {role}; this needs {needed}",
        "insufficient_role",
        kind="permission_error",
    )
