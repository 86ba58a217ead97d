"""The simulated model server's HTTP side: an OpenAI-style API answered by a threaded
``http.server``. ``/health`` follows the load; ``/v1/chat/completions`` and
``/v1/completions`` answer once ``answer_tokens`` tokens took their time at
``tokens_per_s``, or stream them (SSE, chunked) at that rate; ``/v1/embeddings`` returns a
small vector per input, the same for the same text. The other OpenAI routes answer in
their shapes: ``/v1/responses``, ``/v1/audio/speech`` (WAV bytes),
``/v1/audio/transcriptions`` and ``/translations`` (a multipart form, which may name its
model after the file), ``/v1/images/generations``, ``/v1/rerank``, and Anthropic's
``/v1/messages``. ``/sim/echo`` (any method) is the server's "own API": it says what it
received, for the gateway's ``/upstream/`` route. With a sleep API (``--sleep-api``), vLLM's
or SGLang's sleep routes answer as ``devtools/sim_sleep.py`` describes. Every connection has
TCP_NODELAY set, as real servers (uvicorn, llama.cpp) do: a header and a body leaving in two
writes would otherwise wait on delayed ACKs."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from devtools.sim_sleep import (
    SGLANG_ROUTES,
    SGLANG_TAGS,
    SleepApi,
    SleepConflict,
    SleepControl,
    SleepRefused,
    sglang_tags,
)

MAX_BODY_BYTES = 1 << 20
# An audio upload may be far larger than a JSON request.
MAX_FORM_BYTES = 64 << 20
EMBEDDING_DIMENSIONS = 8
DEFAULT_TOKENS_PER_S = 200.0
# None: the answer is one sentence naming the model (its words are the tokens).
DEFAULT_ANSWER_TOKENS: int | None = None


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class Status:
    phase: Phase
    progress: float


def _complain(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class SimHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    # http.server's default backlog of 5 drops the SYNs of a burst of new connections
    # (each then waits a second for its retransmit); real servers queue far more.
    request_queue_size = 256

    def __init__(
        self,
        address: tuple[str, int],
        model: str,
        *,
        tokens_per_s: float = DEFAULT_TOKENS_PER_S,
        answer_tokens: int | None = DEFAULT_ANSWER_TOKENS,
    ) -> None:
        self.model = model
        self.tokens_per_s = tokens_per_s
        self.answer_tokens = answer_tokens
        self.created = int(time.time())
        # Replaced whole, never mutated, so handler threads read it without a lock.
        self.status = Status(Phase.LOADING, 0.0)
        # Its sleep mode (sim_sleep.py), when it has one.
        self.sleep: SleepControl | None = None
        self._completions = 0
        self._completions_lock = threading.Lock()
        super().__init__(address, _Handler)

    def next_completion_id(self, kind: str) -> str:
        with self._completions_lock:
            self._completions += 1
            return f"{kind}-sim-{os.getpid()}-{self._completions}"

    def answer_words(self) -> list[str]:
        words = f"Simulated answer from {self.model}.".split()
        if self.answer_tokens is None:
            return words
        return [words[i % len(words)] for i in range(self.answer_tokens)]

    @property
    def finish_reason(self) -> str:
        return "stop" if self.answer_tokens is None else "length"


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 255 * 2 - 1, 4) for byte in digest[:EMBEDDING_DIMENSIONS]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self) -> str:
        return "modelbus-simserver/1"

    @property
    def sim(self) -> SimHttpServer:
        server = self.server
        assert isinstance(server, SimHttpServer)
        return server

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/health":
            self._health()
        elif path == "/v1/models":
            model = {
                "id": self.sim.model,
                "object": "model",
                "created": self.sim.created,
                "owned_by": "modelbus-sim",
            }
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
        elif path == "/sim/echo":
            self._echo()
        elif self.sim.sleep is not None and path in self._sleep_api.routes | {"/is_sleeping"}:
            self._sleep_get(self.sim.sleep, path)
        else:
            self._not_found()

    def do_PUT(self) -> None:
        if urlsplit(self.path).path == "/sim/echo":
            self._echo()
        else:
            self._not_found_after_body()

    def do_DELETE(self) -> None:
        self.do_PUT()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == "/sim/echo":
            self._echo()
            return
        if path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            self._transcription(translate=path.endswith("translations"))
            return
        if self.sim.sleep is not None and path in self._sleep_api.routes:
            if self._sleep_api is SleepApi.VLLM:
                self._vllm_sleep_route(self.sim.sleep, path)
            else:
                self._sglang_route(self.sim.sleep, path)
            return
        answer = {
            "/v1/chat/completions": self._chat_completion,
            "/v1/completions": self._completion,
            "/v1/embeddings": self._embeddings,
            "/v1/responses": self._response,
            "/v1/messages": self._anthropic_message,
            "/v1/audio/speech": self._speech,
            "/v1/images/generations": self._images,
            "/v1/rerank": self._rerank,
        }.get(path)
        if answer is None:
            self._not_found_after_body()
            return
        request = self._read_json()
        if request is None or not self._serving():
            return
        if not isinstance(request, dict):
            self._bad_request("send a JSON object")
            return
        answer(request)

    def _health(self) -> None:
        status = self.sim.status
        if status.phase is Phase.LOADING:
            body = {"status": "loading", "progress": round(status.progress, 2)}
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, body)
        elif status.phase is Phase.READY:
            state = None if self.sim.sleep is None else self.sim.sleep.state
            if state is None or state.serving:
                self._send_json(HTTPStatus.OK, {"status": "ok"})
                return
            # vLLM's /health asks only whether the engine is alive; SGLang's runs a one-token
            # generation, which its scheduler skips while the memory is released (sim_sleep.py).
            sglang = self._sleep_api is SleepApi.SGLANG
            code = HTTPStatus.SERVICE_UNAVAILABLE if sglang else HTTPStatus.OK
            self._send_json(code, {"status": state.name, "level": state.level})
        else:
            body = {"status": "error", "error": "simulated health failure"}
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, body)

    @property
    def _sleep_api(self) -> SleepApi:
        return SleepApi.NONE if self.sim.sleep is None else self.sim.sleep.options.api

    def _sleep_get(self, control: SleepControl, path: str) -> None:
        if self._sleep_api is SleepApi.SGLANG and path in SGLANG_ROUTES:
            self._sglang_route(control, path)  # SGLang takes GET as it takes POST
        elif self._sleep_api is SleepApi.VLLM and path == "/is_sleeping":
            self._send_json(HTTPStatus.OK, {"is_sleeping": control.is_sleeping()})
        elif self._sleep_api is SleepApi.VLLM:  # its other routes are POST only
            self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"detail": "Method Not Allowed"})
        else:
            self._not_found()

    def _vllm_sleep_route(self, control: SleepControl, path: str) -> None:
        """vLLM's dev routes (sim_sleep.py): 200 with an empty body, or JSON answers."""
        length = self._body_length()
        if length is None:
            return
        body = self.rfile.read(length) if length else b""
        if path == "/collective_rpc":
            self._collective_rpc(control, body)
            return
        if path == "/sleep":
            level = parse_qs(urlsplit(self.path).query).get("level", ["1"])[0]
            if level not in ("1", "2"):
                self._vllm_error(HTTPStatus.BAD_REQUEST, f"level must be 1 or 2, not {level!r}")
                return
            done = self._sleep_call(lambda: control.sleep(int(level)))
        elif path == "/wake_up":
            done = self._sleep_call(control.wake)  # ?tags= taken and ignored: all wakes
        else:
            done = True  # /reset_prefix_cache: the sleep already emptied it
        if done:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _collective_rpc(self, control: SleepControl, body: bytes) -> None:
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            self._vllm_error(HTTPStatus.BAD_REQUEST, f"JSON decode error: {exc}")
            return
        method = request.get("method") if isinstance(request, dict) else None
        if method is None:
            self._vllm_error(HTTPStatus.BAD_REQUEST, "Missing 'method' in request body")
            return
        if method != "reload_weights":
            self._vllm_error(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"Call to collective_rpc method failed: the simulator runs reload_weights "
                f"only, not {method!r}",
            )
            return
        results: list[None] = []
        if self._sleep_call(lambda: results.extend(control.reload_weights())):
            self._send_json(HTTPStatus.OK, {"results": results})

    def _sglang_route(self, control: SleepControl, path: str) -> None:
        """SGLang's release and resume: a JSON object in, ``null`` out (sim_sleep.py)."""
        length = self._body_length()
        if length is None:
            return
        body = self.rfile.read(length) if length else b""
        if not body.strip():
            # FastAPI's answer when the request model's body is missing.
            self._unprocessable("missing", "Field required")
            return
        try:
            tags = sglang_tags(json.loads(body))
        except (ValueError, UnicodeDecodeError) as exc:
            self._unprocessable("value_error", str(exc))
            return
        unknown = sorted(set(tags or ()) - SGLANG_TAGS)
        if unknown:
            message = f"unknown tag {unknown[0]!r}: SGLang knows {sorted(SGLANG_TAGS)}"
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": {"message": message}})
            return
        release = path == "/release_memory_occupation"
        # Tags are ignored: the whole memory is released and resumed (sim_sleep.py).
        if self._sleep_call((lambda: control.sleep(1)) if release else control.resume):
            self._send_json(HTTPStatus.OK, None)

    def _sleep_call(self, call: Callable[[], object]) -> bool:
        """Run a sleep control call; False after answering why it failed."""
        try:
            call()
        except SleepRefused as refused:
            body = error_body(str(refused), "unavailable_error", 503)
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, body)
            return False
        except SleepConflict as conflict:
            if self._sleep_api is SleepApi.VLLM:
                self._vllm_error(HTTPStatus.INTERNAL_SERVER_ERROR, str(conflict))
            else:
                body = {"error": {"message": str(conflict)}}
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, body)
            return False
        return True

    def _vllm_error(self, status: HTTPStatus, message: str) -> None:
        """vLLM's ErrorResponse, as its HTTPException handler writes it."""
        body = {"error": {"message": message, "type": status.phrase, "param": None, "code": status}}
        self._send_json(status, body)

    def _unprocessable(self, kind: str, message: str) -> None:
        detail = [{"type": kind, "loc": ["body"], "msg": message, "input": None}]
        self._send_json(HTTPStatus.UNPROCESSABLE_ENTITY, {"detail": detail})

    def _serving(self) -> bool:
        """Whether requests are answered now; answers the request otherwise."""
        state = None if self.sim.sleep is None else self.sim.sleep.state
        if state is not None and not state.serving:
            message = state.refusal(self._sleep_api)
            self._send_json(
                HTTPStatus.SERVICE_UNAVAILABLE, error_body(message, "unavailable_error", 503)
            )
            return False
        status = self.sim.status
        if status.phase is Phase.LOADING:
            body = error_body("Loading model", "unavailable_error", 503)
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, body)
            return False
        if status.phase is Phase.UNHEALTHY:
            body = error_body("simulated server failure", "server_error", 500)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, body)
            return False
        return True

    def _chat_completion(self, request: dict[str, Any]) -> None:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            self._bad_request("send a JSON object with a non-empty 'messages' list")
            return
        prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        self._answer(request, prompt, chat=True)

    def _completion(self, request: dict[str, Any]) -> None:
        prompt = request.get("prompt")
        if not isinstance(prompt, str):
            self._bad_request("send a JSON object with a 'prompt' string")
            return
        self._answer(request, prompt, chat=False)

    def _answer(self, request: dict[str, Any], prompt: str, *, chat: bool) -> None:
        words = self.sim.answer_words()
        usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": len(words),
            "total_tokens": len(prompt.split()) + len(words),
        }
        kind = "chatcmpl" if chat else "cmpl"
        answer_id = self.sim.next_completion_id(kind)
        if request.get("stream"):
            self._stream(answer_id, words, chat=chat)
            return
        # A whole answer comes once every token of it is generated.
        if self.sim.tokens_per_s > 0:
            time.sleep(len(words) / self.sim.tokens_per_s)
        content = " ".join(words)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.sim.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        self._send_json(
            HTTPStatus.OK,
            {
                "id": answer_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.sim.model,
                "choices": [choice],
                "usage": usage,
            },
        )

    def _stream(self, answer_id: str, words: list[str], *, chat: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        interval = 1.0 / self.sim.tokens_per_s if self.sim.tokens_per_s > 0 else 0.0
        started = time.monotonic()
        try:
            for index, word in enumerate(words):
                # Paced from the start, so slow writes do not slow the rate down further.
                delay = started + index * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                text = word if index == 0 else " " + word
                last = index == len(words) - 1
                self._chunk(self._event(answer_id, text, last, chat=chat))
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            # The client went away: a real server stops generating.
            self.close_connection = True
            _complain(f"stream {answer_id}: the client went away; stopped generating")

    def _event(self, answer_id: str, text: str, last: bool, *, chat: bool) -> bytes:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": self.sim.finish_reason if last else None,
        }
        if chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        chunk = {
            "id": answer_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.sim.model,
            "choices": [choice],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def _embeddings(self, request: dict[str, Any]) -> None:
        inputs = request.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            self._bad_request("send 'input' as a string or a list of strings")
            return
        data = [
            {"object": "embedding", "index": i, "embedding": embedding(text)}
            for i, text in enumerate(inputs)
        ]
        tokens = sum(len(text.split()) for text in inputs)
        self._send_json(
            HTTPStatus.OK,
            {
                "object": "list",
                "data": data,
                "model": self.sim.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def _response(self, request: dict[str, Any]) -> None:
        if not self._serving_text(request.get("input")):
            return
        text = " ".join(self.sim.answer_words())
        message = {
            "type": "message",
            "id": self.sim.next_completion_id("msg"),
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        words = len(text.split())
        body = {
            "id": self.sim.next_completion_id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "model": self.sim.model,
            "status": "completed",
            "output": [message],
            "usage": {"input_tokens": 1, "output_tokens": words, "total_tokens": words + 1},
        }
        self._send_json(HTTPStatus.OK, body)

    def _anthropic_message(self, request: dict[str, Any]) -> None:
        if not isinstance(request.get("messages"), list) or not request["messages"]:
            self._bad_request("send a JSON object with a non-empty 'messages' list")
            return
        text = " ".join(self.sim.answer_words())
        body = {
            "id": self.sim.next_completion_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": self.sim.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": len(text.split())},
        }
        self._send_json(HTTPStatus.OK, body)

    def _speech(self, request: dict[str, Any]) -> None:
        if not self._serving_text(request.get("input")):
            return
        # A silent 8 kHz mono WAV, a tenth of a second per word.
        samples = b"\0\0" * (800 * max(1, len(request["input"].split())))
        header = b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt "
        header += struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16)
        audio = header + b"data" + struct.pack("<I", len(samples)) + samples
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "audio/wav")
        self.send_header("Content-Length", str(len(audio)))
        self.end_headers()
        self.wfile.write(audio)

    def _images(self, request: dict[str, Any]) -> None:
        if not self._serving_text(request.get("prompt")):
            return
        count = request.get("n", 1)
        if not isinstance(count, int) or not 1 <= count <= 10:
            self._bad_request("'n' must be 1 to 10")
            return
        image = base64.b64encode(f"simulated image of {request['prompt']}".encode()).decode()
        body = {"created": int(time.time()), "data": [{"b64_json": image}] * count}
        self._send_json(HTTPStatus.OK, body)

    def _rerank(self, request: dict[str, Any]) -> None:
        query, documents = request.get("query"), request.get("documents")
        if not isinstance(query, str) or not isinstance(documents, list):
            self._bad_request("send a 'query' string and a 'documents' list")
            return
        words = set(query.lower().split())
        scores = [
            len(words & set(str(document).lower().split())) / max(1, len(words))
            for document in documents
        ]
        results = sorted(
            ({"index": i, "relevance_score": score} for i, score in enumerate(scores)),
            key=lambda result: -result["relevance_score"],
        )
        self._send_json(HTTPStatus.OK, {"model": self.sim.model, "results": results})

    def _transcription(self, *, translate: bool) -> None:
        """A multipart form: ``file`` and ``model`` (in either order), ``language``."""
        fields = self._read_form()
        if fields is None or not self._serving():
            return
        upload = fields.get("file")
        if not isinstance(upload, tuple):
            self._bad_request("send the audio as the form's 'file'")
            return
        filename, data = upload
        verb = "translation" if translate else "transcription"
        text = (
            f"Simulated {verb} by {self.sim.model} of {filename} ({len(data)} bytes, "
            f"sha256 {hashlib.sha256(data).hexdigest()[:16]}, model field {fields.get('model')!r})"
        )
        if fields.get("response_format") == "text":
            body = text.encode()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._send_json(HTTPStatus.OK, {"text": text})

    def _read_form(self) -> dict[str, str | tuple[str, bytes]] | None:
        """The form's fields (files as name and bytes); None after answering an error."""
        length = self._body_length(MAX_FORM_BYTES)
        if length is None:
            return None
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            self.rfile.read(length)
            self._bad_request("send a multipart/form-data body")
            return None
        raw = f"Content-Type: {content_type}\r\n\r\n".encode() + self.rfile.read(length)
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
        fields: dict[str, str | tuple[str, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if not isinstance(name, str) or not isinstance(payload, bytes):
                continue
            filename = part.get_filename()
            fields[name] = (filename, payload) if filename else payload.decode()
        return fields

    def _serving_text(self, text: object) -> bool:
        if not isinstance(text, str) or not text:
            self._bad_request("send the text to work on ('input' or 'prompt') as a string")
            return False
        return True

    def _echo(self) -> None:
        """What this request was: the gateway's /upstream/ route must pass it verbatim."""
        length = self._body_length()
        if length is None:
            return
        body = self.rfile.read(length) if length else b""
        received = {
            "model": self.sim.model,
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_bytes": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        self._send_json(HTTPStatus.OK, received)

    def _not_found_after_body(self) -> None:
        self._drain_body()
        self._not_found()

    def _bad_request(self, message: str) -> None:
        self._send_json(HTTPStatus.BAD_REQUEST, error_body(message, "invalid_request_error", 400))

    def _body_length(self, limit: int = MAX_BODY_BYTES) -> int | None:
        """The request body's length, or None after answering a request we cannot read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            body = error_body("send the body with a Content-Length", "invalid_request_error", 411)
            self._send_json(HTTPStatus.LENGTH_REQUIRED, body)
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= limit:
            self.close_connection = True
            body = error_body(
                f"the body must be 0 to {limit} bytes with a valid Content-Length",
                "invalid_request_error",
                413,
            )
            self._send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, body)
            return None
        return length

    def _drain_body(self) -> None:
        # Keep-alive: an unread body would be taken for the next request.
        length = self._body_length()
        if length:
            self.rfile.read(length)

    def _read_json(self) -> Any:
        length = self._body_length()
        if length is None:
            return None
        try:
            request = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError):
            body = error_body("the body is not valid JSON", "invalid_request_error", 400)
            self._send_json(HTTPStatus.BAD_REQUEST, body)
            return None
        return request if request is not None else {}

    def _not_found(self) -> None:
        body = error_body(f"no route for {self.command} {self.path}", "not_found_error", 404)
        self._send_json(HTTPStatus.NOT_FOUND, body)

    def _send_json(self, status: HTTPStatus, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The agent polls /health several times a second: logging it would drown the log.
        if urlsplit(self.path).path != "/health":
            shown = int(code) if isinstance(code, int) else code
            _complain(f"{self.command} {self.path} {shown}")

    def log_error(self, format: str, *args: Any) -> None:
        _complain(f"http error: {format % args}")
