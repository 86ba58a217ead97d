"""Runs a real model server (llama.cpp's llama-server) as a catalog model on simulated
GPUs: a real server holds no simulated memory, so this wrapper holds the model's
``vram_mb`` in the simulator, in the server's name and pid, for as long as the server
lives. The agent then sees what it would see on a real card, and a switch between two
real servers really evicts one for the other.

``python -m tests.support.vram_holder MIB -- ARGV...`` (or ``-- ARGV...`` with the MiB in
``MODELBUS_HOLD_MB``, as a preset's ``command`` shared by several models needs): the agent's
process runtime passes ``MODELBUS_SIM_STATE``, ``MODELBUS_GPUS`` and ``MODELBUS_MODEL``.
Signals are passed on to the server; the wrapper exits with the server's exit code. When
the server dies the simulator reclaims its memory, as a driver would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from devtools.gpu_sim import SimGpuClient


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"] and "MODELBUS_HOLD_MB" in os.environ:
        argv = [os.environ["MODELBUS_HOLD_MB"], *argv]
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m tests.support.vram_holder [MIB] -- ARGV...", file=sys.stderr)
        return 2
    total_mb, command = int(argv[0]), argv[2:]
    gpus = [int(g) for g in os.environ.get("MODELBUS_GPUS", "0").split(",")]
    model = os.environ.get("MODELBUS_MODEL", Path(command[0]).name)
    client = SimGpuClient(Path(os.environ["MODELBUS_SIM_STATE"]))
    server = subprocess.Popen(command)

    def pass_on(signum: int, frame: FrameType | None) -> None:
        server.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, pass_on)
    share, remainder = divmod(total_mb, len(gpus))
    for i, gpu in enumerate(gpus):
        client.set_usage(gpu, share + (1 if i < remainder else 0), name=model, pid=server.pid)
    code = server.wait()
    client.close()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
