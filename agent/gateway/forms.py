"""A multipart form (an audio transcription's) read off the request before it is
forwarded: the ``model`` field may come after a file of many megabytes, so files are
spooled to disk as they arrive, never held in memory, and the form is sent upstream
again from there, its ``model`` renamed where the catalog says so."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agent.gateway import errors

# Plain fields (model, language, prompt...) are short.
MAX_FIELD_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024


@dataclass
class _File:
    name: str
    filename: str
    content_type: str
    data: IO[bytes]


@dataclass
class Form:
    fields: list[tuple[str, str]] = field(default_factory=list)
    files: list[_File] = field(default_factory=list)

    @property
    def model(self) -> str:
        for name, value in self.fields:
            if name == "model" and value.strip():
                return value
        raise errors.bad_request("the form names no 'model'", param="model")

    def upstream(self, model: str | None) -> aiohttp.FormData:
        """The form to send on, in the order it came; ``model`` renamed when given."""
        data = aiohttp.FormData(quote_fields=False)
        for name, value in self.fields:
            data.add_field(name, model if name == "model" and model else value)
        for part in self.files:
            part.data.seek(0)
            data.add_field(
                part.name, part.data, filename=part.filename, content_type=part.content_type
            )
        return data

    def __enter__(self) -> Form:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for part in self.files:
            part.data.close()


async def read_form(request: web.Request, limit_bytes: int) -> Form:
    """The request's multipart form; GatewayError (400, 413) when it is not one or is
    over ``limit_bytes`` in all."""
    if not request.content_type.startswith("multipart/"):
        raise errors.bad_request("send the audio as multipart/form-data (file and model)")
    form = Form()
    try:
        reader = await request.multipart()
        total = 0
        while (part := await reader.next()) is not None:
            if not isinstance(part, aiohttp.BodyPartReader) or not part.name:
                raise errors.bad_request("a form part has no name")
            if part.filename is None:
                value = bytearray()
                while chunk := await part.read_chunk(CHUNK_BYTES):
                    value += chunk
                    if len(value) > MAX_FIELD_BYTES:
                        raise errors.bad_request(f"the form field {part.name!r} is too long")
                total += len(value)
                form.fields.append((part.name, bytes(value).decode(part.get_charset("utf-8"))))
                continue
            # On disk as it arrives (a real file: its size is known when it is sent on).
            spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed by Form.__exit__)
            content_type = part.headers.get("Content-Type", "application/octet-stream")
            form.files.append(_File(part.name, part.filename, content_type, spool))
            while chunk := await part.read_chunk(CHUNK_BYTES):
                total += len(chunk)
                if total > limit_bytes:
                    raise errors.payload_too_large(limit_bytes)
                spool.write(chunk)
    except errors.GatewayError:
        form.__exit__(None, None, None)
        raise
    except (ValueError, UnicodeDecodeError, aiohttp.ClientError, HttpProcessingError) as exc:
        # A hostile or truncated body: the caller's fault, answered 400.
        form.__exit__(None, None, None)
        raise errors.bad_request(f"the multipart form cannot be read: {exc}") from None
    return form
