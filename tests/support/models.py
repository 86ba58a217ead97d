"""Catalog entries for tests: simulated model servers with short load times."""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from devtools.brokers import free_port

_ports = itertools.count()


def sim_model(
    vram_mb: int, *, load_s: float = 0.2, extra: list[str] | None = None, **spec: Any
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "devtools.simserver", "--port", "${PORT}", "--model", "${MODEL}"]
    argv += ["--gpus", "${GPUS}", "--vram-mb", str(vram_mb), "--load-s", str(load_s)]
    argv += extra or []
    entry: dict[str, Any] = {
        "runtime": "process",
        "process": {"argv": argv},
        "port": free_port(),
        "vram_mb": vram_mb,
        "stop_timeout_s": 5,
        "load_timeout_s": 20,
    }
    entry.update(spec)
    return entry


# The original VRAM budget table (MiB) on one 32 GB GPU.
BUDGET = {
    "qwen3-vl-30b": 17408,
    "whisperx": 6144,
    "ovi-11b": 22528,
    "wan2.1-14b": 28672,
    "infinitetalk": 8192,
}


def budget_catalog(load_s: float = 0.2) -> dict[str, Any]:
    return {name: sim_model(mb, load_s=load_s) for name, mb in BUDGET.items()}


# A server left over from elsewhere: answers 200 to everything, as a healthy model would.
_STALE_SERVER = """
import http.server, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"stale")
    def log_message(self, *args): pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok)
print("listening", flush=True)
server.serve_forever()
"""


def plain_http_model(vram_mb: int) -> dict[str, Any]:
    """A server that answers 200 on every path and draws no simulated memory: a model
    for an agent on another GPU backend than the simulator (NVML, say)."""
    return {
        "runtime": "process",
        "process": {"argv": [sys.executable, "-c", _STALE_SERVER, "${PORT}"]},
        "port": free_port(),
        "vram_mb": vram_mb,
        "stop_timeout_s": 5,
        "load_timeout_s": 20,
    }


@contextlib.contextmanager
def stale_server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not the agent's, holding ``port`` and answering health checks."""
    process = subprocess.Popen(
        [sys.executable, "-c", _STALE_SERVER, str(port)], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == b"listening\n"
        yield process
    finally:
        process.kill()
        process.wait(10)
