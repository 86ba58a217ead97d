"""The client commands as a user runs them: the real ``modelbus`` process against a real
agent on the session Mosquitto, checked by exit code, stdout and stderr."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from agent.broker import MosquittoBroker, free_port
from agent.client import JobProgress
from shared.messages import JobPhase, JobState, JobStatus
from tests.integration.conftest import HOST
from tests.support.agent_process import REPO_ROOT, AgentProcess
from tests.support.host import Host
from tests.support.models import budget_catalog

pytestmark = pytest.mark.broker
JOB_ID = re.compile(r"\b[0-9a-f]{12}\b")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _env() -> dict[str, str]:
    # The developer's own MODELBUS_* settings must not steer the tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELBUS_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env=_env(),
    )


async def modelbus(*args: str, timeout: float = 30) -> Result:
    process = await _spawn(*args)
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
def bus_args(broker: MosquittoBroker, prefix: str) -> tuple[str, ...]:
    return ("--broker", broker.url, "--prefix", prefix)


@pytest.fixture
async def agent(start_host: Callable[..., AgentProcess], host: Host) -> Host:
    start_host(budget_catalog())
    await host.online()
    return host


async def test_status_prints_the_host_and_its_gpu(agent: Host, bus_args: tuple[str, ...]) -> None:
    result = await modelbus("status", "--host", HOST, *bus_args)
    assert result.returncode == 0, result.stderr
    assert f"host {HOST}" in result.stdout
    assert "GPU 0 Sim GPU 0" in result.stdout
    assert "qwen3-vl-30b" in result.stdout and result.stderr == ""


async def test_status_json_is_the_reply(agent: Host, bus_args: tuple[str, ...]) -> None:
    result = await modelbus("status", "--host", HOST, "--json", *bus_args)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["status"] == "ok" and reply["data"]["info"]["host_id"] == HOST


async def test_switch_wait_prints_plain_progress_lines_and_succeeds(
    agent: Host, bus_args: tuple[str, ...]
) -> None:
    result = await modelbus("switch", "whisperx", "--wait", "--host", HOST, *bus_args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "\r" not in result.stdout  # not a terminal: plain lines
    assert any("running/" in line and "%" in line for line in lines), lines
    assert "switch whisperx: succeeded" in lines[-1]
    assert agent.model("whisperx")["state"] == "ready"


async def test_switch_wait_json_is_the_final_job(agent: Host, bus_args: tuple[str, ...]) -> None:
    result = await modelbus("switch", "whisperx", "--wait", "--json", "--host", HOST, *bus_args)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)  # nothing else on stdout
    assert job["state"] == "succeeded" and job["model"] == "whisperx"
    assert job["result"]["model"] == "whisperx"


async def test_load_of_an_unknown_model_exits_1_with_the_code(
    agent: Host, bus_args: tuple[str, ...]
) -> None:
    result = await modelbus("load", "no-such-model", "--host", HOST, *bus_args)
    assert result.returncode == 1
    assert "unknown_model" in result.stderr and "no-such-model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_unload_without_wait_prints_the_job_id(
    agent: Host, bus_args: tuple[str, ...]
) -> None:
    result = await modelbus("unload", "whisperx", "--host", HOST, *bus_args)
    assert result.returncode == 0, result.stderr
    assert JOB_ID.search(result.stdout), result.stdout


async def test_a_load_that_does_not_fit_fails_the_job_and_exits_1(
    agent: Host, bus_args: tuple[str, ...]
) -> None:
    first = await modelbus("load", "qwen3-vl-30b", "--wait", "--host", HOST, *bus_args)
    assert first.returncode == 0, first.stderr
    result = await modelbus("load", "wan2.1-14b", "--wait", "--host", HOST, *bus_args)
    assert result.returncode == 1
    assert "failed" in result.stderr and "insufficient_vram" in result.stderr


async def test_no_agent_times_out_with_exit_3(bus_args: tuple[str, ...]) -> None:
    result = await modelbus("status", "--host", "ghost", "--timeout", "0.5", *bus_args)
    assert result.returncode == 3
    assert "no reply from ghost within 0.5 s" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_a_broker_nobody_listens_on_exits_4() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    result = await modelbus("status", "--host", HOST, "--broker", url)
    assert result.returncode == 4
    assert "cannot reach the broker" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_refused_credentials_exit_4(broker: MosquittoBroker, prefix: str) -> None:
    url = f"mqtt://operator:wrong@127.0.0.1:{broker.auth_port}"
    result = await modelbus("status", "--host", HOST, "--broker", url, "--prefix", prefix)
    assert result.returncode == 4
    assert "credentials" in result.stderr and "Traceback" not in result.stderr


async def test_a_wrong_flag_exits_2_naming_it() -> None:
    result = await modelbus("switch", "whisperx", "--gpux", "1")
    assert result.returncode == 2
    assert "--gpux" in result.stderr and "modelbus switch" in result.stderr
    bad_value = await modelbus("load", "whisperx", "--gpu", "first")
    assert bad_value.returncode == 2 and "--gpu" in bad_value.stderr


async def test_events_count_1_prints_the_event_of_a_switch(
    agent: Host, bus_args: tuple[str, ...]
) -> None:
    process = await _spawn("events", "--count", "1", "--json", *bus_args)
    try:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            listening = await process.stderr.readline()
        assert b"listening" in listening
        reply = await agent.ask("switch", {"model": "whisperx"})
        assert reply.status == "ok", reply.error
        async with asyncio.timeout(20):
            stdout, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    event = json.loads(stdout)
    assert event["host"] == HOST and event["model"] == "whisperx"


async def test_events_stop_on_ctrl_c_with_exit_0(bus_args: tuple[str, ...]) -> None:
    process = await _spawn("events", *bus_args)
    try:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            assert b"listening" in await process.stderr.readline()
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0


async def test_the_only_online_host_needs_no_host_flag(
    agent: Host, bus_args: tuple[str, ...]
) -> None:
    result = await modelbus("status", *bus_args)
    assert result.returncode == 0, result.stderr
    assert f"host {HOST}" in result.stdout


async def test_no_host_online_and_no_host_flag_exits_2(bus_args: tuple[str, ...]) -> None:
    result = await modelbus("status", *bus_args)
    assert result.returncode == 2
    assert "--host" in result.stderr and "no host is online" in result.stderr


async def test_replies_are_matched_under_mqtt_3_1_1(
    agent: Host, broker: MosquittoBroker, prefix: str, tmp_path: Path
) -> None:
    config = tmp_path / "client.yaml"
    config.write_text(
        yaml.safe_dump({"prefix": prefix, "broker": {"url": broker.url, "protocol": "3.1.1"}})
    )
    status = await modelbus("status", "--config", str(config))
    assert status.returncode == 0, status.stderr
    assert f"host {HOST}" in status.stdout
    switch = await modelbus("switch", "whisperx", "--wait", "--json", "--config", str(config))
    assert switch.returncode == 0, switch.stderr
    assert json.loads(switch.stdout)["state"] == "succeeded"


def _job(**fields: object) -> JobState:
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "job_id": "abc123abc123",
        "command": "install",
        "repo": "acme/tiny",
        "state": JobStatus.RUNNING,
        "phase": JobPhase.DOWNLOADING,
        "created_at": now,
        "ts": now,
    }
    values.update(fields)
    return JobState.model_validate(values)


def test_on_a_terminal_progress_is_one_redrawn_bar_with_bytes_and_eta() -> None:
    out = io.StringIO()
    progress = JobProgress(out, tty=True)
    progress.update(_job(progress=0.25, bytes_done=256 << 20, bytes_total=1 << 30, eta_s=12))
    progress.update(_job(progress=0.5, bytes_done=512 << 20, bytes_total=1 << 30, eta_s=6))
    progress.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "50%" in text and "512.0 MiB/1.0 GiB" in text and "ETA 6.0 s" in text
    assert "downloading" in text


def test_off_a_terminal_progress_is_a_line_per_phase_and_10_percent_step() -> None:
    out = io.StringIO()
    progress = JobProgress(out, tty=False)
    for step in range(21):
        progress.update(_job(progress=step / 20))
    progress.update(_job(progress=1.0, phase=JobPhase.VERIFYING))
    lines = out.getvalue().splitlines()
    assert len(lines) == 12  # 0, 10, ... 100 % downloading, then verifying
    assert "\r" not in out.getvalue()
