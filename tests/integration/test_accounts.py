"""The account model of docs/broker.md, with the shipped mosquitto/acl and the real
mosquitto clients: nobody takes an agent's session, one operator account connects as
often as it likes, and every write a role does not grant is dropped (replies included)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from devtools.brokers import MosquittoBroker
from shared.topics import HostTopics
from tests.conftest import TEST_USERS
from tests.support.agent_process import AgentProcess
from tests.support.bus import BusWatcher, watch

pytestmark = pytest.mark.broker

# The names the shipped ACL grants.
GPU1 = HostTopics("modelbus", "gpu1")


def auth(broker: MosquittoBroker, user: str) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(broker.auth_port), "-u", user, "-P", TEST_USERS[user]]


async def client(*argv: str, timeout: float = 20) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def running(*argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A client that stays connected (mosquitto_sub) until the block ends."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        await process.wait()


def broker_log_since(broker: MosquittoBroker, offset: int) -> str:
    with broker.log_file.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


async def rr_status(broker: MosquittoBroker, user: str, reply: str) -> dict[str, object]:
    code, out, err = await client(
        "mosquitto_rr",
        *auth(broker, user),
        "-t",
        GPU1.command("status"),
        "-e",
        GPU1.reply(reply),
        "-m",
        "",
        "-W",
        "10",
    )
    assert code == 0, (out, err)
    answer: dict[str, object] = json.loads(out)
    return answer


async def test_no_other_account_can_take_the_agents_session(
    broker: MosquittoBroker, gpu1: AgentProcess, observer: BusWatcher
) -> None:
    mark = len(observer.messages)
    log_start = broker.log_file.stat().st_size
    # A viewer connects with the ids an impostor would try: protocol 1's fixed agent id
    # and the agent's username, each with a persistent session, and stays connected.
    guesses = ("modelbus-agent-gpu1", "gpu1")
    impostors = [
        running(
            "mosquitto_sub",
            *auth(broker, "viewer"),
            *("-i", guess, "-c", "-q", "1", "-t", "modelbus/gpu1/cmd/+"),
        )
        for guess in guesses
    ]
    async with impostors[0], impostors[1]:
        for guess in guesses:
            await wait_log(broker, f" as {guess} (", log_start)
        answers = [await rr_status(broker, "operator", f"op-{n}") for n in range(40)]
    assert [a["status"] for a in answers] == ["ok"] * 40
    # The agent never lost its connection and never said offline.
    assert gpu1.output().count("connected to mqtt://") == 1, gpu1.output()
    later = observer.messages[mark:]
    assert not [m for m in later if m.topic == GPU1.status and m.payload == b"offline"]
    # Its real client id carries a token only its password gives, and no payload anyone
    # can read names it.
    connects = [line for line in broker.log_file.read_text().splitlines() if "u'gpu1'" in line]
    agent_id = connects[-1].split(" as ", 1)[1].split(" ", 1)[0]
    assert agent_id.startswith("modelbus-agent-gpu1-") and agent_id not in guesses
    assert not [m for m in observer.messages if agent_id.encode() in m.payload]


async def wait_log(broker: MosquittoBroker, text: str, offset: int) -> None:
    """Until the broker's log (from ``offset``) holds ``text``."""
    for _ in range(200):
        if text in broker_log_since(broker, offset):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the broker never logged {text!r}")


async def test_one_operator_account_keeps_many_connections_side_by_side(
    broker: MosquittoBroker, gpu1: AgentProcess
) -> None:
    """A TUI, a script, the CLI and n8n's two MQTT nodes, all as "operator"."""
    log_start = broker.log_file.stat().st_size
    operator = {"username": "operator", "password": TEST_USERS["operator"]}
    async with (
        # n8n: the MQTT Trigger and the MQTT node, 3.1.1, one connection each.
        watch(broker.auth_port, GPU1.reply("status"), protocol="3.1.1", **operator) as trigger,
        watch(broker.auth_port, protocol="3.1.1", **operator) as publisher,
        # a TUI-like MQTT 5 client watching the host
        watch(broker.auth_port, GPU1.everything_filter, **operator) as tui,
        # a script watching the replies
        running("mosquitto_sub", *auth(broker, "operator"), "-t", GPU1.reply_filter),
    ):
        rr = [rr_status(broker, "operator", f"side-{n}") for n in range(5)]
        cli = client(
            sys.executable,
            "-m",
            "modelbus",
            "status",
            "--json",
            "--host",
            "gpu1",
            "--broker",
            f"mqtt://operator:{TEST_USERS['operator']}@127.0.0.1:{broker.auth_port}",
        )
        mark = len(trigger.messages)
        await publisher.connection.publish(
            GPU1.command("status"), json.dumps({"request_id": "n8n-1"}), qos=1
        )
        results = await asyncio.gather(*rr, cli)
        assert all(answer["status"] == "ok" for answer in results[:5])
        code, out, err = results[5]
        assert code == 0 and json.loads(out)["status"] == "ok", (out, err)
        n8n = await trigger.wait_topic(
            GPU1.reply("status"), lambda v: v["request_id"] == "n8n-1", after=mark
        )
        assert json.loads(n8n.payload)["status"] == "ok"
        assert tui.latest(GPU1.status) is not None
    # Nobody was disconnected to make room for anybody else.
    assert "already connected, closing old connection" not in broker_log_since(broker, log_start)


@pytest.mark.parametrize(
    ("user", "topic"),
    [
        # Agents write only their own tree: no forged status, no forged replies.
        ("gpu1", "modelbus/gpu2/status"),
        ("gpu1", "modelbus/gpu2/reply/me"),
        ("gpu1", "modelbus/reply/me"),
        # Operators command; they do not answer, and protocol 1's reply tree is closed
        # even where "modelbus/+/cmd/#" would match it.
        ("operator", "modelbus/reply/cmd/status"),
        ("operator", "modelbus/gpu1/reply/me"),
        ("operator", "modelbus/gpu1/status"),
        # Only admins command on the admin tree (catalog entries that run anything).
        ("operator", "modelbus/gpu1/admin/cmd/catalog"),
        ("gpu1", "modelbus/gpu2/admin/cmd/catalog"),
        # Viewers write nothing.
        ("viewer", "modelbus/gpu1/cmd/status"),
        ("viewer", "modelbus/gpu1/admin/cmd/catalog"),
        ("viewer", "modelbus/gpu1/reply/me"),
    ],
)
async def test_a_write_the_role_does_not_grant_is_dropped(
    user: str, topic: str, broker: MosquittoBroker, observer: BusWatcher
) -> None:
    mark = len(observer.messages)
    forged = json.dumps({"request_id": f"forged-{user}", "command": "status", "status": "ok"})
    # Acknowledged (exit 0) and thrown away: the ACL denies silently.
    code, out, err = await client(
        "mosquitto_pub", *auth(broker, user), "-q", "1", "-t", topic, "-m", forged
    )
    assert code == 0, (out, err)
    # A write the same account may do, sent after it: once it has arrived, the dropped
    # one would have arrived before it.
    allowed = {"gpu1": GPU1.reply("me"), "operator": GPU1.command("status")}.get(user)
    barrier_user = user if allowed else "operator"
    barrier_topic = allowed or GPU1.command("status")
    code, out, err = await client(
        "mosquitto_pub", *auth(broker, barrier_user), "-q", "1", "-t", barrier_topic, "-m", "{}"
    )
    assert code == 0, (out, err)
    await observer.wait_topic(barrier_topic, after=mark)
    assert not [m for m in observer.messages if m.topic == topic and m.payload == forged.encode()]


async def test_logs_replies_reach_operators_and_never_viewers(
    broker: MosquittoBroker, gpu1: AgentProcess, observer: BusWatcher
) -> None:
    """A server's output can hold secrets: its replies go under reply/private/, which the
    shipped ACL keeps from a viewer even when it reads all of modelbus/#."""
    private = "modelbus/gpu1/reply/private/"
    viewer = {"username": "viewer", "password": TEST_USERS["viewer"]}
    async with watch(broker.auth_port, "modelbus/#", **viewer) as watching:
        await watching.wait_topic(GPU1.status, raw=True)  # subscribed: the retained status came
        mark = len(observer.messages)
        # An operator asks with the real mosquitto_rr, and gets the reply.
        code, out, err = await client(
            "mosquitto_rr", *auth(broker, "operator"), "-t", GPU1.command("logs"),
            "-e", f"{private}op-logs", "-m", "whisperx", "-W", "10",
        )  # fmt: skip
        assert code == 0, (out, err)
        answer = json.loads(out)
        assert (answer["command"], answer["status"]) == ("logs", "ok")
        assert answer["data"]["model"] == "whisperx" and "cursor" in answer["data"]
        # MQTT 3.1.1 (no response topic): the private default topic.
        code, out, err = await client(
            "mosquitto_rr", *auth(broker, "operator"), "-V", "311", "-t", GPU1.command("logs"),
            "-e", f"{private}logs", "-m", '{"model": "whisperx", "request_id": "v311"}',
            "-W", "10",
        )  # fmt: skip
        assert code == 0 and json.loads(out)["request_id"] == "v311", (out, err)
        # A response topic outside reply/private/ is refused there, naming where it must be.
        code, out, err = await client(
            "mosquitto_rr", *auth(broker, "operator"), "-t", GPU1.command("logs"),
            "-e", GPU1.reply("op-public"), "-m", "whisperx", "-W", "10",
        )  # fmt: skip
        assert code == 0, (out, err)
        refused = json.loads(out)
        assert refused["status"] == "error" and refused["error"]["code"] == "forbidden"
        assert private in refused["error"]["message"] and refused["data"] is None
        # A status reply after them all reaches the viewer: had a logs reply reached it,
        # it would have come first (one publisher, one subscriber: in order).
        await rr_status(broker, "operator", "after-logs")
        await watching.wait_topic(GPU1.reply("after-logs"), after=0)
    sent = [m.topic for m in observer.messages[mark:] if m.topic.startswith(private)]
    assert sent == [f"{private}op-logs", f"{private}logs"]
    assert not [m for m in watching.messages if m.topic.startswith(private)]
    assert [m for m in watching.messages if m.topic == GPU1.reply("op-public")]


async def test_the_admin_account_commands_on_the_admin_topic(
    broker: MosquittoBroker, gpu1: AgentProcess, observer: BusWatcher
) -> None:
    """The admin role writes modelbus/<host>/admin/cmd/ (an operator's write there is dropped,
    see above) and its command is answered like any other."""
    code, out, err = await client(
        "mosquitto_rr", *auth(broker, "admin"), "-t", GPU1.admin_command("catalog"),
        "-e", GPU1.reply("admin-me"), "-m", "show", "-W", "10",
    )  # fmt: skip
    assert code == 0, (out, err)
    answer = json.loads(out)
    assert (answer["command"], answer["status"]) == ("catalog", "ok")
    assert [m["name"] for m in answer["data"]["models"]] == ["whisperx"]
