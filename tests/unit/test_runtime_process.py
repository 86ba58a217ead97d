"""The process runtime against real processes: small Python programs as model servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.catalog import ModelSpec, ProcessLaunch
from agent.log_lines import BadCursor, LogCursor
from agent.runtimes.base import ExitStatus, Instance, RuntimeFailure
from agent.runtimes.process import LOG_TAIL_BYTES, ProcessRuntime

PORT = 18123


def polite(stop: str = "SIGTERM") -> str:
    """Ends on ``stop`` (ignoring SIGTERM if it is another); says "ready" once the handler
    is in place."""
    ignore = "" if stop == "SIGTERM" else "signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    return f"""
import signal, sys, time
{ignore}
def bye(*_):
    print("got {stop}", flush=True)
    sys.exit(0)
signal.signal(signal.{stop}, bye)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


POLITE = polite()

# Ignores SIGTERM and starts a child that ignores it too (SIG_IGN survives exec); with
# "own-group" the child moves to a process group of its own (still in the session).
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
group = 0 if sys.argv[1:] == ["own-group"] else None
child = subprocess.Popen(
    [sys.executable, "-c", "import time\\nwhile True: time.sleep(0.05)"], process_group=group
)
print(f"child {child.pid}", flush=True)
while True:
    time.sleep(0.05)
"""

SLEEPER = "import time\nprint('ready', flush=True)\ntime.sleep(120)"

REPORT_ENV = """
import json, os, sys, time
keys = ["CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "MODELBUS_MODEL", "MODELBUS_PORT",
        "MODELBUS_GPUS", "MODELBUS_BROKER_PASSWORD", "FROM_SPEC", "FROM_AGENT", "EXTRA"]
report = {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in keys}}
print(json.dumps(report), flush=True)
time.sleep(120)
"""


def make_spec(
    code: str, *args: str, name: str = "m1", gpus: list[int] | None = None, **launch: Any
) -> ModelSpec:
    return ModelSpec(
        name=name,
        runtime="process",
        process=ProcessLaunch(argv=[sys.executable, "-c", code, *args], **launch),
        port=PORT,
        gpus=gpus or [0],
        vram_mb=1000,
        stop_timeout_s=0.5,
    )


def gone(pid: int) -> bool:
    """No such process, or only its zombie left (it may not have been reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


def start_time(pid: int) -> float:
    """When ``pid`` started, in epoch seconds, read from /proc without psutil."""
    boot = next(
        int(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    return boot + start_ticks(pid) / os.sysconf("SC_CLK_TCK")


async def exited(runtime: ProcessRuntime, instance: Instance) -> ExitStatus:
    deadline = time.monotonic() + 10.0
    while (status := await runtime.exit_status(instance)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{instance.model} did not exit")
        await asyncio.sleep(0.02)
    return status


async def logged(runtime: ProcessRuntime, instance: Instance, text: str) -> list[str]:
    deadline = time.monotonic() + 10.0
    while text not in "\n".join(lines := await runtime.logs(instance, 50)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {text!r} in the log")
        await asyncio.sleep(0.02)
    return lines


async def child_pid(runtime: ProcessRuntime, instance: Instance) -> int:
    line = next(line for line in await runtime.logs(instance, 50) if line.startswith("child "))
    return int(line.split()[1])


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def runtime(state_dir: Path) -> AsyncIterator[ProcessRuntime]:
    runtime = ProcessRuntime(state_dir)
    yield runtime
    # Leftovers of a failed test: the runtime's own stop is guarded against pid reuse.
    for path in sorted((state_dir / "pids").glob("*.json")):
        with contextlib.suppress(Exception):
            record = json.loads(path.read_text())
            await runtime.stop(Instance(path.stem, "process", pid=record["pid"]), 0.0)


async def test_start_passes_environment_and_expands_macros(
    runtime: ProcessRuntime, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FROM_AGENT", "inherited")
    monkeypatch.setenv("MODELBUS_BROKER_PASSWORD", "agent-secret")
    (tmp_path / "work-m1").mkdir()
    spec = make_spec(
        REPORT_ENV,
        "--port",
        "${PORT}",
        "--model=${MODEL}",
        "${GPUS}",
        "${HOST}",
        gpus=[1, 3],
        env={"FROM_SPEC": "port ${PORT}"},
        cwd=tmp_path / "work-${MODEL}",
    )

    instance = await runtime.start(spec, {"EXTRA": "extra"})

    assert instance.model == "m1" and instance.runtime == "process"
    assert instance.pid is not None and instance.pids == {instance.pid}
    assert instance.started_at == pytest.approx(time.time(), abs=5)
    assert await runtime.exit_status(instance) is None
    line = (await logged(runtime, instance, '"argv"'))[0]
    report = json.loads(line)
    assert report["argv"] == ["--port", str(PORT), "--model=m1", "1,3", "127.0.0.1"]
    assert report["cwd"] == str(tmp_path / "work-m1")
    assert report["env"] == {
        "CUDA_VISIBLE_DEVICES": "1,3",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "MODELBUS_MODEL": "m1",
        "MODELBUS_PORT": str(PORT),
        "MODELBUS_GPUS": "1,3",
        "MODELBUS_BROKER_PASSWORD": None,
        "FROM_SPEC": f"port {PORT}",
        "FROM_AGENT": "inherited",
        "EXTRA": "extra",
    }
    # Its own session and group, so that a signal to the group reaches its children.
    assert os.getpgid(instance.pid) == instance.pid == os.getsid(instance.pid)
    record = json.loads((state_dir / "pids" / "m1.json").read_text())
    assert record["pid"] == instance.pid
    assert abs(record["start_time"] - start_time(instance.pid)) < 1.5
    assert record["argv"][-5:] == report["argv"]
    assert record["started_at"] == instance.started_at
    assert await runtime.pids(instance) == {instance.pid}


async def test_logs_are_the_last_lines_of_a_bounded_tail(runtime: ProcessRuntime) -> None:
    code = "import time\nfor i in range(100_000): print(f'line {i}')\nprint('done', flush=True)\n"
    spec = make_spec(code + "time.sleep(120)")
    instance = await runtime.start(spec, {})
    await logged(runtime, instance, "done")

    assert await runtime.logs(instance, 3) == ["line 99998", "line 99999", "done"]
    everything = await runtime.logs(instance, 1_000_000)
    assert sum(len(line) + 1 for line in everything) <= LOG_TAIL_BYTES
    # The window's cut first line is dropped; every line returned is whole.
    assert all(line == "done" or line.startswith("line ") for line in everything)
    first = int(everything[0].split()[1])
    assert everything[:-1] == [f"line {i}" for i in range(first, 100_000)]
    assert await runtime.logs(instance, 0) == []


async def test_read_log_follows_a_run_and_tells_the_next_one(
    runtime: ProcessRuntime, state_dir: Path
) -> None:
    code = (
        "import sys, time\nfor i in range(5): print(f'line {i}', flush=True)\n"
        "sys.stdout.write('half'); sys.stdout.flush()\ntime.sleep(120)"
    )
    spec = make_spec(code)
    first = await runtime.start(spec, {})
    await logged(runtime, first, "half")
    last = await runtime.read_log(spec, None, 2, live=True)
    assert last.lines == ("line 3", "line 4") and not last.more and not last.restarted
    run = last.cursor.run
    start = await runtime.read_log(spec, LogCursor(run, "0"), 2, live=True)
    assert start.lines == ("line 0", "line 1") and start.more
    rest = await runtime.read_log(spec, start.cursor, 10, live=True)
    # "half" has no newline yet: it waits while its writer may still end it.
    assert rest.lines == ("line 2", "line 3", "line 4") and not rest.more
    assert (await runtime.read_log(spec, rest.cursor, 10, live=True)).lines == ()
    await runtime.stop(first, 0.5)

    # The server is gone: its last line is whole, and the log stays readable, also to a
    # restarted agent, as the same run.
    ended = await runtime.read_log(spec, rest.cursor, 10, live=False)
    assert ended.lines == ("half",) and ended.cursor.run == run and not ended.restarted
    again = await ProcessRuntime(state_dir).read_log(spec, rest.cursor, 10, live=False)
    assert again == ended

    second = await runtime.start(make_spec(SLEEPER), {})
    await logged(runtime, second, "ready")
    restarted = await runtime.read_log(spec, ended.cursor, 10, live=True)
    assert restarted.restarted and restarted.lines == ("ready",)
    assert restarted.cursor.run != run
    # Emptied under the same run (logrotate's copytruncate): read again from its start.
    (state_dir / "logs" / "m1.log").write_bytes(b"")
    emptied = await runtime.read_log(spec, restarted.cursor, 10, live=True)
    assert emptied.restarted and emptied.lines == () and emptied.cursor.position == "0"
    with pytest.raises(BadCursor):
        await runtime.read_log(spec, LogCursor(run, "1749892503-2"), 10, live=True)
    never = await runtime.read_log(make_spec(SLEEPER, name="never"), None, 10, live=False)
    assert never.lines == () and not never.more
    await runtime.stop(second, 0.5)


async def test_logs_replace_undecodable_bytes_and_restart_truncates(
    runtime: ProcessRuntime,
) -> None:
    code = "import sys, time\nsys.stdout.buffer.write(b'bad \\xff byte\\n'); sys.stdout.flush()\n"
    first = await runtime.start(make_spec(code + "print('one', flush=True)\ntime.sleep(120)"), {})
    assert await logged(runtime, first, "one") == ["bad \ufffd byte", "one"]
    await runtime.stop(first, 5)

    second = await runtime.start(make_spec(SLEEPER), {})
    assert await logged(runtime, second, "ready") == ["ready"]
    assert await runtime.logs(Instance("never-started", "process"), 5) == []


async def test_stop_sends_sigterm_and_waits_for_the_exit(
    runtime: ProcessRuntime, state_dir: Path
) -> None:
    instance = await runtime.start(make_spec(POLITE), {})
    await logged(runtime, instance, "ready")
    assert instance.pid is not None

    began = time.monotonic()
    await runtime.stop(instance, 10.0)

    assert time.monotonic() - began < 5.0
    assert gone(instance.pid)
    assert "got SIGTERM" in await runtime.logs(instance)
    assert await runtime.exit_status(instance) == ExitStatus(0, "exited with code 0")
    assert not (state_dir / "pids" / "m1.json").exists()


async def test_stop_sends_the_models_stop_signal_also_after_adoption(
    runtime: ProcessRuntime, state_dir: Path
) -> None:
    # Ignores SIGTERM, ends on SIGINT (as vLLM and SGLang prefer to be stopped).
    spec = make_spec(polite("SIGINT")).model_copy(update={"stop_signal": "SIGINT"})
    instance = await runtime.start(spec, {})
    await logged(runtime, instance, "ready")
    assert instance.stop_signal == "SIGINT"
    await runtime.stop(instance, 10.0)
    assert await runtime.exit_status(instance) == ExitStatus(0, "exited with code 0")
    assert "got SIGINT" in await runtime.logs(instance)

    second = await runtime.start(spec, {})
    await logged(runtime, second, "ready")
    (adopted,) = await ProcessRuntime(state_dir).adopt({"m1": spec})
    assert adopted.stop_signal == "SIGINT"
    await ProcessRuntime(state_dir).stop(adopted, 10.0)
    assert second.pid is not None and gone(second.pid)
    assert "got SIGINT" in await runtime.logs(second)  # asked, not killed


@pytest.mark.parametrize("child_group", ["same-group", "own-group"])
async def test_stop_kills_a_group_that_ignores_sigterm(
    runtime: ProcessRuntime, child_group: str
) -> None:
    instance = await runtime.start(make_spec(STUBBORN, child_group), {})
    await logged(runtime, instance, "child ")
    child = await child_pid(runtime, instance)
    assert instance.pid is not None
    assert await runtime.pids(instance) == {instance.pid, child}

    began = time.monotonic()
    await runtime.stop(instance, 0.5)

    assert 0.5 <= time.monotonic() - began < 5.0
    assert gone(instance.pid) and gone(child)
    assert await runtime.exit_status(instance) == ExitStatus(-9, "killed by SIGKILL")
    assert await runtime.pids(instance) == frozenset()


async def test_stop_is_idempotent(runtime: ProcessRuntime, state_dir: Path) -> None:
    instance = await runtime.start(make_spec("import sys\nsys.exit(3)"), {})
    await exited(runtime, instance)
    assert (state_dir / "pids" / "m1.json").exists()

    await runtime.stop(instance, 1.0)  # already ended on its own
    await runtime.stop(instance, 1.0)
    await ProcessRuntime(state_dir).stop(instance, 1.0)

    assert not (state_dir / "pids" / "m1.json").exists()
    assert await runtime.exit_status(instance) == ExitStatus(3, "exited with code 3")


async def test_exit_status_of_a_crash(runtime: ProcessRuntime) -> None:
    code = "import sys\nprint('out of memory', flush=True)\nsys.exit(3)"
    instance = await runtime.start(make_spec(code), {})

    assert await exited(runtime, instance) == ExitStatus(3, "exited with code 3")
    assert await runtime.logs(instance) == ["out of memory"]


async def test_exit_status_of_a_signal(runtime: ProcessRuntime) -> None:
    instance = await runtime.start(make_spec(SLEEPER), {})
    await logged(runtime, instance, "ready")
    assert instance.pid is not None

    os.kill(instance.pid, signal.SIGUSR1)

    assert await exited(runtime, instance) == ExitStatus(-signal.SIGUSR1, "killed by SIGUSR1")


async def test_missing_or_unexecutable_program_is_a_clear_failure(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-server"
    spec = make_spec("").model_copy(
        update={"name": "m2", "process": ProcessLaunch(argv=[str(missing), "--port", "${PORT}"])}
    )
    with pytest.raises(RuntimeFailure, match=r"cannot start m2: executable .*no-such-server"):
        await runtime.start(spec, {})

    plain = tmp_path / "plain-file"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    spec = spec.model_copy(update={"process": ProcessLaunch(argv=[str(plain)])})
    with pytest.raises(RuntimeFailure, match=r"cannot start m2: .*plain-file.* is not executable"):
        await runtime.start(spec, {})

    spec = make_spec(SLEEPER, cwd=tmp_path / "nowhere")
    with pytest.raises(RuntimeFailure, match=r"cannot start m1: its working directory"):
        await runtime.start(spec, {})


async def test_start_refuses_a_model_that_is_already_running(runtime: ProcessRuntime) -> None:
    instance = await runtime.start(make_spec(SLEEPER), {})

    with pytest.raises(RuntimeFailure, match=f"m1 is already running as pid {instance.pid}"):
        await runtime.start(make_spec(SLEEPER), {})
    await runtime.stop(instance, 1.0)


async def test_a_restarted_agent_adopts_and_stops_the_server(
    runtime: ProcessRuntime, state_dir: Path
) -> None:
    spec = make_spec(STUBBORN)
    original = await runtime.start(spec, {})
    await logged(runtime, original, "child ")
    child = await child_pid(runtime, original)
    assert original.pid is not None

    restarted = ProcessRuntime(state_dir)  # the agent after a restart
    other = make_spec(SLEEPER, name="m2")
    adopted = await restarted.adopt({"m1": spec, "m2": other})

    assert len(adopted) == 1
    instance = adopted[0]
    assert (instance.model, instance.runtime, instance.pid) == ("m1", "process", original.pid)
    assert instance.started_at == original.started_at
    assert instance.pids == {original.pid, child}
    assert await restarted.exit_status(instance) is None
    assert await restarted.pids(instance) == {original.pid, child}
    assert await runtime.logs(original) == await restarted.logs(instance)

    await restarted.stop(instance, 0.5)

    assert gone(original.pid) and gone(child)
    assert not (state_dir / "pids" / "m1.json").exists()
    status = await restarted.exit_status(instance)
    assert status == ExitStatus(
        None, "process ended (exit code unknown: adopted after an agent restart)"
    )


async def test_adopt_removes_stale_pid_files(runtime: ProcessRuntime, state_dir: Path) -> None:
    pid_dir = state_dir / "pids"
    pid_dir.mkdir(parents=True)
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "")
    await dead.wait()
    me = os.getpid()
    files = {
        "dead": {"pid": dead.pid, "start_time": 1.0, "started_at": 1.0},
        # A live pid that started at another time: the kernel gave it to someone else.
        "reused": {"pid": me, "start_time": start_time(me) - 60, "started_at": 1.0},
        "reused-ticks": {"pid": me, "start_ticks": start_ticks(me) - 6000, "started_at": 1.0},
        "no-start-time": {"pid": me, "start_time": None, "started_at": 1.0},
        "other-boot": {"pid": me, "start_time": start_time(me), "boot_id": "another boot"},
    }
    for name, record in files.items():
        (pid_dir / f"{name}.json").write_text(json.dumps(record))
    (pid_dir / "garbage.json").write_text("{not json")
    (pid_dir / "not-in-catalog.json").write_text(json.dumps(files["dead"]))
    specs = {name: make_spec(SLEEPER, name=name) for name in [*files, "garbage", "absent"]}

    assert await ProcessRuntime(state_dir).adopt(specs) == []

    assert sorted(p.name for p in pid_dir.iterdir()) == ["not-in-catalog.json"]
    assert not gone(me)


async def test_adopt_reads_the_pid_files_of_earlier_versions(
    runtime: ProcessRuntime, state_dir: Path
) -> None:
    """Before psutil, pid files held the start as clock ticks since boot: a server an
    older agent started is still adopted, and still told apart from a reused pid."""
    server = await asyncio.create_subprocess_exec(sys.executable, "-c", SLEEPER)
    try:
        pid_dir = state_dir / "pids"
        pid_dir.mkdir(parents=True)
        record = {"pid": server.pid, "start_ticks": start_ticks(server.pid), "started_at": 5.0}
        (pid_dir / "old.json").write_text(json.dumps(record))
        adopted = await ProcessRuntime(state_dir).adopt({"old": make_spec(SLEEPER, name="old")})
        assert [(i.model, i.pid, i.started_at) for i in adopted] == [("old", server.pid, 5.0)]
    finally:
        server.kill()
        await server.wait()


async def test_shell_metacharacters_are_passed_literally(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    marker = tmp_path / "touched"
    hostile = [f"$(touch {marker})", f"`touch {marker}`", f"; touch {marker}", "${HOME} | *"]
    code = "import json, sys, time\nprint(json.dumps(sys.argv[1:]), flush=True)\ntime.sleep(120)"
    instance = await runtime.start(make_spec(code, *hostile), {})

    line = (await logged(runtime, instance, "touch"))[0]

    assert json.loads(line) == hostile
    assert not marker.exists()
