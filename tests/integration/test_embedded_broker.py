"""The demo's fallback broker: amqtt in a child process, loopback only, 3.1.1 only."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bus.mqtt import connect
from devtools.brokers import BrokerError, MosquittoBroker, mosquitto_binary, port_accepts
from devtools.embedded_broker import (
    EMBEDDED_DESCRIPTION,
    MOSQUITTO_DESCRIPTION,
    EmbeddedBroker,
    start_demo_broker,
)
from shared.messages import HostInfo
from shared.topics import HostTopics
from tests.support.agent_process import REPO_ROOT, AgentProcess, write_agent_config
from tests.support.bus import client_settings, watch


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(workdir=tmp_path / "broker") as broker:
        yield broker


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing only, never reached
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


async def test_agent_comes_online_over_311_without_waiting_for_a_timeout(
    embedded: EmbeddedBroker, tmp_path: Path, prefix: str
) -> None:
    topics = HostTopics(prefix, "fallback")
    # The default 10 s connect timeout: coming online well within it shows the broker
    # refuses MQTT 5 outright rather than leaving the CONNECT unanswered.
    config = write_agent_config(
        tmp_path / "agent.yaml", broker_url=embedded.url, host_id="fallback", prefix=prefix
    )
    agent = AgentProcess(config)
    try:
        async with watch(embedded.port, topics.everything_filter, protocol="3.1.1") as bus:
            await bus.wait_topic(topics.status, lambda v: v == "online", raw=True, timeout=8)
            info = HostInfo.model_validate_json((await bus.wait_topic(topics.info)).payload)
            assert info.mqtt_protocol == "3.1.1"
            await bus.wait_topic(topics.gpu(0))
        assert "trying the next version" in agent.output()
        assert agent.terminate() == 0
    finally:
        agent.close()


async def test_a_retained_message_round_trips(embedded: EmbeddedBroker, prefix: str) -> None:
    topic = f"{prefix}/retained"
    async with connect(client_settings(embedded.port, protocol="auto")) as publisher:
        assert publisher.protocol == "3.1.1"
        await publisher.publish(topic, b"kept", qos=1, retain=True)
    # A subscriber that arrives later still gets it, flagged as retained.
    async with watch(embedded.port, topic, protocol="3.1.1") as bus:
        message = await bus.wait_topic(topic, raw=True)
        assert (message.payload, message.retain) == (b"kept", True)
        mark = len(bus.messages)
        await bus.connection.publish(topic, b"live", qos=1)
        live = await bus.wait_topic(topic, lambda v: v == "live", raw=True, after=mark)
        assert live.retain is False


async def test_several_subscribers_each_get_a_publish(
    embedded: EmbeddedBroker, prefix: str
) -> None:
    topic = f"{prefix}/fan-out"
    async with (
        watch(embedded.port, f"{prefix}/#", protocol="3.1.1") as first,
        watch(embedded.port, topic, protocol="3.1.1") as second,
        connect(client_settings(embedded.port, protocol="3.1.1")) as publisher,
    ):
        await publisher.publish(topic, b"hello", qos=1)
        await asyncio.gather(first.wait_topic(topic, raw=True), second.wait_topic(topic, raw=True))


def test_it_listens_on_loopback_only(embedded: EmbeddedBroker) -> None:
    assert embedded.url == f"mqtt://127.0.0.1:{embedded.port}"
    assert port_accepts(embedded.port)
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    assert not port_accepts(embedded.port, host=address)


def test_stop_leaves_no_process_and_frees_the_port(tmp_path: Path) -> None:
    broker = EmbeddedBroker(workdir=tmp_path / "broker")
    broker.start()
    assert broker.process is not None
    pid = broker.process.pid
    assert alive(pid)
    broker.stop()
    assert not alive(pid)
    assert not port_accepts(broker.port)
    broker.stop()  # twice is harmless
    assert (tmp_path / "broker").is_dir()  # a workdir it was given stays; its own goes


def test_own_workdir_is_removed() -> None:
    with EmbeddedBroker() as broker:
        workdir = broker.workdir
        assert workdir.is_dir()
    assert not workdir.exists()


def test_the_broker_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from devtools.embedded_broker import EmbeddedBroker\n"
            f"broker = EmbeddedBroker(workdir=Path({str(tmp_path / 'broker')!r}))\n"
            "broker.start()\n"
            "print(broker.process.pid, broker.port, flush=True)\n"
            "sys.stdin.read()\n",
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child_pid = port = None
    try:
        child_pid, port = map(int, parent.stdout.readline().split())
        assert alive(child_pid) and port_accepts(port)
        parent.kill()  # no chance to stop its broker
        parent.wait(10)
        assert wait_until(lambda: not alive(child_pid)), "the broker outlived its parent"
        assert not port_accepts(port)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child_pid is not None and alive(child_pid):
            subprocess.run(["kill", "-9", str(child_pid)], check=False)


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = EmbeddedBroker(port=port, workdir=tmp_path / "broker")
        with pytest.raises(BrokerError, match=f"port {port} on 127.0.0.1 is already in use"):
            broker.start()
        assert broker.process is None


def test_start_demo_broker_can_prefer_the_embedded_one(tmp_path: Path) -> None:
    broker, description = start_demo_broker(None, tmp_path / "broker", prefer_embedded=True)
    try:
        assert isinstance(broker, EmbeddedBroker)
        assert description == EMBEDDED_DESCRIPTION
        assert "development fallback" in description and "3.1.1" in description
        assert port_accepts(broker.port)
    finally:
        broker.stop()
    assert not port_accepts(broker.port)


@pytest.mark.broker
def test_start_demo_broker_picks_mosquitto_when_installed(tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (bash .ci/run installs it)")
    broker, description = start_demo_broker(None, tmp_path / "broker")
    try:
        assert isinstance(broker, MosquittoBroker)
        assert description == MOSQUITTO_DESCRIPTION
        assert port_accepts(broker.port)
    finally:
        broker.stop()
