"""The simulated model server's HTTP side: an OpenAI-style API answered by a threaded
``http.server``. ``/health`` follows the load; ``/v1/chat/completions`` and
``/v1/completions`` answer once ``answer_tokens`` tokens took their time at
``tokens_per_s``, or stream them (SSE, chunked) at that rate; ``/v1/embeddings`` returns a
small vector per input, the same for the same text. Every connection has TCP_NODELAY set,
as real servers (uvicorn, llama.cpp) do: a header and a body leaving in two writes would
otherwise wait on delayed ACKs."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

MAX_BODY_BYTES = 1 << 20
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
        else:
            self._not_found()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        answer = {
            "/v1/chat/completions": self._chat_completion,
            "/v1/completions": self._completion,
            "/v1/embeddings": self._embeddings,
        }.get(path)
        if answer is None:
            self._drain_body()
            self._not_found()
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
            self._send_json(HTTPStatus.OK, {"status": "ok"})
        else:
            body = {"status": "error", "error": "simulated health failure"}
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, body)

    def _serving(self) -> bool:
        """Whether requests are answered now; answers the request otherwise."""
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

    def _bad_request(self, message: str) -> None:
        self._send_json(HTTPStatus.BAD_REQUEST, error_body(message, "invalid_request_error", 400))

    def _body_length(self) -> int | None:
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
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            body = error_body(
                f"the body must be 0 to {MAX_BODY_BYTES} bytes with a valid Content-Length",
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
