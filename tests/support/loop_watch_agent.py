"""The real ``modelbus agent``, with the blocking calls it makes watched: every SQLite
method, every NVML call (a fake pynvml, one 24 GB GPU), every file deletion, every start and
read of a process server's log and every request of the docker SDK records whether it ran on
the thread of a running event loop.
At exit the record goes to ``$MODELBUS_TEST_LOOP_CALLS`` as JSON:
``{"calls": {kind: count}, "on_loop": [kind.name, ...]}``.
Run as ``python -m tests.support.loop_watch_agent agent --config ...``; the product
has no test-only code for this."""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fakes.fake_nvml import MIB, FakeDevice, make_fake_nvml

_calls: Counter[str] = Counter()
_on_loop: list[str] = []


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def watched(kind: str, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        _calls[kind] += 1
        if _loop_running():
            _on_loop.append(f"{kind}.{name}")
        return function(*args, **kwargs)

    return call


def _watch_class(kind: str, cls: type, names: list[str]) -> None:
    for name in names:
        setattr(cls, name, watched(kind, name, getattr(cls, name)))


# NVML: every nvml* function of the fake module (the backend calls nothing else).
_nvml = make_fake_nvml(
    [FakeDevice(uuid="GPU-test", name="NVIDIA L4", memory_total_bytes=24576 * MIB)]
)
for _name in dir(_nvml):
    if _name.startswith("nvml") and callable(getattr(_nvml, _name)):
        setattr(_nvml, _name, watched("nvml", _name, getattr(_nvml, _name)))
sys.modules["pynvml"] = _nvml

# SQLite: every public method of the agent's database (open is called before the loop).
from agent.database import Database  # noqa: E402

_watch_class(
    "sqlite",
    Database,
    [n for n in vars(Database) if not n.startswith("_") and callable(vars(Database)[n])],
)

# A process server's log: starting a run, reading it for logs and for error reports.
from agent.runtimes.log_file import LogFile  # noqa: E402

_watch_class("logfile", LogFile, ["begin_run", "read", "tail"])

# Deleting files: the weights' tree and single files.
shutil.rmtree = watched("delete", "rmtree", shutil.rmtree)  # type: ignore[assignment]
os.unlink = watched("delete", "unlink", os.unlink)
os.remove = watched("delete", "remove", os.remove)

# The docker SDK: every HTTP request it sends to dockerd.
try:
    from docker.api.client import APIClient
except ImportError:  # pragma: no cover - docker is a dependency
    pass
else:
    _watch_class("docker", APIClient, ["send"])


@atexit.register
def _write_record() -> None:
    Path(os.environ["MODELBUS_TEST_LOOP_CALLS"]).write_text(
        json.dumps({"calls": dict(_calls), "on_loop": sorted(set(_on_loop))})
    )


if __name__ == "__main__":
    from modelbus import cli

    sys.exit(cli.main(sys.argv[1:]))
