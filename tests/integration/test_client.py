"""The client commands as a user runs them: the real ``modelbus`` process against a real
agent on the session Mosquitto, checked by exit code, stdout and stderr."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from bus.mqtt import Message
from devtools.brokers import MosquittoBroker, free_port
from modelbus.shell_output import JobProgress
from shared.messages import JobPhase, JobState, JobStatus
from shared.topics import HostTopics
from tests.integration.conftest import HOST
from tests.support.agent_process import REPO_ROOT, AgentProcess
from tests.support.host import Host
from tests.support.models import BUDGET, budget_catalog, sim_model

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


@contextlib.asynccontextmanager
async def spawned(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``modelbus ARGS`` running in the background, killed if the test leaves it running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "modelbus",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env=_env(),
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def modelbus(*args: str, timeout: float = 30) -> Result:
    async with spawned(*args) as process, asyncio.timeout(timeout):
        stdout, stderr = await process.communicate()
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
    async with spawned("events", "--count", "1", "--json", *bus_args) as process:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            listening = await process.stderr.readline()
        assert b"listening" in listening
        reply = await agent.ask("switch", {"model": "whisperx"})
        assert reply.status == "ok", reply.error
        async with asyncio.timeout(20):
            stdout, _ = await process.communicate()
    assert process.returncode == 0
    event = json.loads(stdout)
    assert event["host"] == HOST and event["model"] == "whisperx"


async def test_events_stop_on_ctrl_c_with_exit_0(bus_args: tuple[str, ...]) -> None:
    async with spawned("events", *bus_args) as process:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            assert b"listening" in await process.stderr.readline()
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
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


# -- logs and history ------------------------------------------------------------------

SAID = re.compile(r"^talker: line (\d+)$")


@pytest.fixture
async def talker(start_host: Callable[..., AgentProcess], host: Host) -> Host:
    """An agent with a model whose server says a numbered line every 50 ms once ready."""
    talking = sim_model(2048, load_s=0.1, extra=["--say-every", "0.05"])
    start_host({"talker": talking, "quiet": sim_model(1024)})
    await host.online()
    assert (await host.ask("load", {"model": "talker", "wait": True})).status == "ok"
    return host


async def test_logs_prints_the_last_lines_and_history_a_table(
    talker: Host, bus_args: tuple[str, ...]
) -> None:
    deadline = time.monotonic() + 20
    while True:
        result = await modelbus("logs", "talker", "-n", "3", "--host", HOST, *bus_args)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        if len(lines) == 3 and all(SAID.match(line) for line in lines):
            break
        assert time.monotonic() < deadline, lines
    numbers = [int(match[1]) for line in lines if (match := SAID.match(line))]
    assert numbers == list(range(numbers[0], numbers[0] + 3))
    too_many = await modelbus("logs", "talker", "-n", "5000", "--host", HOST, *bus_args)
    assert too_many.returncode == 2 and "'lines'" in too_many.stderr, too_many
    unknown = await modelbus("logs", "nope", "--host", HOST, *bus_args)
    assert unknown.returncode == 1 and "unknown_model" in unknown.stderr, unknown

    history = await modelbus("history", "--host", HOST, *bus_args)
    assert history.returncode == 0, history.stderr
    header, *rows = history.stdout.splitlines()
    assert header.split() == ["model", "loaded", "at", "load", "VRAM"]
    assert [row.split()[0] for row in rows] == ["quiet", "talker"]
    assert rows[0].split()[1:] == ["-", "-", "-"]
    assert rows[1].endswith(" s  2048 MiB") and rows[1].split()[1][:2] == "20"
    one = await modelbus("history", "talker", "-n", "1", "--json", "--host", HOST, *bus_args)
    data = json.loads(one.stdout)["data"]
    assert data["limit"] == 1 and [m["model"] for m in data["models"]] == ["talker"]


async def test_logs_follow_prints_new_lines_and_says_when_the_log_restarted(
    talker: Host, bus_args: tuple[str, ...]
) -> None:
    async with spawned("logs", "talker", "-f", "-n", "1", "--host", HOST, *bus_args) as process:
        stdout, stderr = process.stdout, process.stderr
        assert stdout is not None and stderr is not None

        async def line() -> str:
            async with asyncio.timeout(20):
                return (await stdout.readline()).decode().rstrip("\n")

        printed = [await line()]
        while len(said := [n for text in printed if (n := SAID.match(text))]) < 15:
            printed.append(await line())
        numbers = [int(match[1]) for match in said]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), printed

        assert (await talker.ask("unload", {"model": "talker", "wait": True})).status == "ok"
        assert (await talker.ask("load", {"model": "talker", "wait": True})).status == "ok"
        while not (text := await line()).startswith("loading talker"):
            printed.append(text)
        while text != "talker: line 2":
            text = await line()
        async with asyncio.timeout(20):
            notice = (await stderr.readline()).decode()
        assert notice.startswith("modelbus logs: the log of talker restarted"), notice
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            await process.wait()
    assert process.returncode == 0
    # Nothing of the first run was printed twice, nor skipped.
    numbers = [int(match[1]) for text in printed if (match := SAID.match(text))]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), printed


# -- every row of docs/client.md's exit-code table, with the real command ---------------


@pytest.fixture
async def stuck_agent(start_host: Callable[..., AgentProcess], host: Host) -> AsyncIterator[Host]:
    """An agent that is online (its retained status says so) but answers nothing, as a
    host swapping hard or an agent under a debugger: stopped with SIGSTOP."""
    process = start_host(budget_catalog())
    await host.online()
    process.process.send_signal(signal.SIGSTOP)
    try:
        yield host
    finally:
        process.process.send_signal(signal.SIGCONT)


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A port that accepts TCP connections and never says a word of MQTT: a hung broker,
    or a firewall that swallows packets, without depending on the network."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes the handshakes; nobody ever answers
        yield f"mqtt://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A port whose SYNs go unanswered, as behind a firewall that drops packets (the
    reported mqtt://10.255.255.1): its accept queue is full, so the kernel drops every
    new handshake and the client's TCP connect itself hangs."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())  # takes the one place in the queue
        yield f"mqtt://127.0.0.1:{listener.getsockname()[1]}"


async def test_exit_4_timeout_bounds_a_tcp_connect_that_hangs(black_hole: str) -> None:
    """paho's own connect timeout (10 s per MQTT version) must not outlast --timeout."""
    started = time.monotonic()
    result = await modelbus("status", "--host", HOST, "--broker", black_hole, "--timeout", "2")
    took = time.monotonic() - started
    assert result.returncode == 4, result.stderr
    assert "cannot reach the broker" in result.stderr and "within 2 s" in result.stderr
    # 2 s and the interpreter's start, far from the 10 s a library timeout would take.
    assert took < 8, f"took {took:.1f} s"


async def test_exit_0_a_plan_that_fits(agent: Host, bus_args: tuple[str, ...]) -> None:
    result = await modelbus("plan", "whisperx", "--host", HOST, *bus_args)
    assert result.returncode == 0, result.stderr
    assert "a switch to whisperx fits on GPU 0" in result.stdout and result.stderr == ""


async def test_exit_1_a_plan_that_does_not_fit(
    start_host: Callable[..., AgentProcess], host: Host, bus_args: tuple[str, ...]
) -> None:
    start_host(budget_catalog(), memory_total_mb=16384)
    await host.online()
    result = await modelbus("plan", "wan2.1-14b", "--host", HOST, *bus_args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("modelbus plan: wan2.1-14b does not fit"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    as_json = await modelbus("plan", "wan2.1-14b", "--json", "--host", HOST, *bus_args)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["data"]["fits"] is False


async def test_exit_1_a_plan_of_an_unknown_model_lists_the_catalog_as_load_does(
    agent: Host, bus_args: tuple[str, ...]
) -> None:
    for command in ("load", "plan"):
        result = await modelbus(command, "nosuch-model", "--host", HOST, *bus_args)
        assert result.returncode == 1, result.stderr
        assert "unknown_model" in result.stderr and "nosuch-model" in result.stderr
        missing = [name for name in BUDGET if name not in result.stderr]
        assert missing == [], f"{command}: {result.stderr}"
        assert len(result.stderr.strip().splitlines()) == 1


async def test_exit_1_a_host_nobody_announced_fails_at_once_naming_the_known_hosts(
    agent: Host, bus_args: tuple[str, ...], prefix: str
) -> None:
    result = await modelbus("status", "--host", "nosuch-host", *bus_args, timeout=45)
    assert result.returncode == 1, result.stderr
    assert f"no host 'nosuch-host' on {prefix}/" in result.stderr
    assert f"known hosts are {HOST} (online)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_exit_1_an_offline_host_fails_at_once_saying_so(
    start_host: Callable[..., AgentProcess], host: Host, bus_args: tuple[str, ...]
) -> None:
    process = start_host(budget_catalog())
    await host.online()
    assert process.terminate() == 0
    await host.bus.wait_topic(host.topics.status, lambda v: v == "offline", raw=True)
    result = await modelbus("switch", "whisperx", "--host", HOST, *bus_args, timeout=45)
    assert result.returncode == 1, result.stderr
    assert f"{HOST} is offline" in result.stderr and "start its agent" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_exit_2_a_value_out_of_the_contracts_range_is_refused_before_sending(
    agent: Host, bus_args: tuple[str, ...]
) -> None:
    result = await modelbus("load", "whisperx", "--priority", "5000", "--host", HOST, *bus_args)
    assert result.returncode == 2, result.stderr
    assert "'priority'" in result.stderr and "1000" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # The contract's own models decide, so no broker is needed to say so.
    offline = await modelbus("switch", "Not A Model", "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert offline.returncode == 2, offline.stderr
    assert "'model'" in offline.stderr


async def test_exit_2_an_invalid_payload_reply_from_the_agent(
    agent: Host, bus_args: tuple[str, ...]
) -> None:
    result = await modelbus("load", "whisperx", "--gpu", "5", "--host", HOST, *bus_args)
    assert result.returncode == 2, result.stderr
    assert "invalid_payload" in result.stderr and "no GPU 5" in result.stderr


async def test_exit_2_a_bad_config_file(tmp_path: Path) -> None:
    result = await modelbus("status", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "missing.yaml" in result.stderr and "Traceback" not in result.stderr


async def test_exit_3_an_online_host_that_does_not_answer(
    stuck_agent: Host, bus_args: tuple[str, ...]
) -> None:
    result = await modelbus("status", "--host", HOST, "--timeout", "1", *bus_args)
    assert result.returncode == 3, result.stderr
    assert f"no reply from {HOST} within 1 s" in result.stderr
    assert "online but busy or stuck" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_exit_3_a_waited_job_that_has_not_ended_within_the_timeout(
    start_host: Callable[..., AgentProcess], host: Host, bus_args: tuple[str, ...]
) -> None:
    start_host({"slow": sim_model(1024, load_s=30)})
    await host.online()
    result = await modelbus("load", "slow", "--wait", "--timeout", "3", "--host", HOST, *bus_args)
    assert result.returncode == 3, result.stderr
    assert "did not end within 3 s" in result.stderr and "modelbus cancel" in result.stderr


async def test_exit_1_a_waited_job_that_was_cancelled(
    start_host: Callable[..., AgentProcess], host: Host, bus_args: tuple[str, ...]
) -> None:
    start_host({"slow": sim_model(1024, load_s=30)})
    await host.online()
    mark = len(host.bus.messages)
    async with spawned("load", "slow", "--wait", "--host", HOST, *bus_args) as process:

        def running(message: Message) -> bool:
            return (
                message.topic.startswith(host.topics.job(""))
                and bool(message.payload)
                and json.loads(message.payload)["state"] == "running"
            )

        job_id = json.loads((await host.bus.wait_for(running, after=mark, timeout=20)).payload)[
            "job_id"
        ]
        cancelled = await host.ask("cancel", {"job_id": job_id})
        assert cancelled.status == "ok", cancelled
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    assert process.returncode == 1, stderr
    assert f"job {job_id} cancelled" in stderr.decode()


async def test_exit_2_several_hosts_online_and_no_host_flag(
    host: Host, bus_args: tuple[str, ...]
) -> None:
    for name in ("gpu-a", "gpu-b"):
        status = HostTopics(host.prefix, name).status
        await host.bus.connection.publish(status, "online", qos=1, retain=True)
    result = await modelbus("status", *bus_args)
    assert result.returncode == 2, result.stderr
    assert "2 hosts are online (gpu-a, gpu-b); pass --host HOST" in result.stderr


async def test_exit_4_timeout_bounds_connecting_to_a_broker_that_never_answers(
    silent_broker: str,
) -> None:
    result = await modelbus("status", "--host", HOST, "--broker", silent_broker, "--timeout", "2")
    assert result.returncode == 4, result.stderr
    # Said only when --timeout ran out while connecting (each MQTT version's own connect
    # timeout, 10 s, ran out before): the timeout bounded the connect.
    assert "cannot reach the broker" in result.stderr and "within 2 s" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_exit_4_the_connection_is_lost(own_broker: MosquittoBroker, prefix: str) -> None:
    async with spawned("events", "--broker", own_broker.url, "--prefix", prefix) as process:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            assert b"listening" in await process.stderr.readline()
        own_broker.stop()
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    assert process.returncode == 4, stderr
    assert b"broker" in stderr and b"Traceback" not in stderr


async def test_exit_130_interrupted_while_waiting(
    stuck_agent: Host, bus_args: tuple[str, ...]
) -> None:
    async with spawned("status", "--host", HOST, *bus_args) as process:
        await stuck_agent.bus.wait_topic(stuck_agent.topics.command("status"), timeout=20)
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    assert process.returncode == 130
    assert stderr.decode().strip() == "modelbus status: interrupted"


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
