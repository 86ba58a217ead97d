"""The shell recipes of docs/scripting.md, run as written with the real Mosquitto clients
against the broker's ACL listener and a real agent (host gpu1, prefix modelbus: the names
the shipped ACL grants)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devtools.brokers import MosquittoBroker
from shared.topics import HostTopics
from tests.conftest import TEST_USERS
from tests.support.agent_process import AgentProcess
from tests.support.bus import BusWatcher

pytestmark = pytest.mark.broker

DOC = Path(__file__).resolve().parents[2] / "docs" / "scripting.md"
RECIPE = re.compile(r"<!-- recipe: ([a-z0-9-]+) -->\n```sh\n(.*?)```", re.DOTALL)
# The names the recipes (and the shipped ACL) use.
TOPICS = HostTopics("modelbus", "gpu1")
MODEL = "whisperx"


def recipes() -> dict[str, str]:
    found = RECIPE.findall(DOC.read_text())
    named = dict(found)
    assert len(named) == len(found), "two recipes share a name"
    return named


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def recipe_env(broker: MosquittoBroker, user: str, password: str | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "MQTT_HOST": "127.0.0.1",
        "MQTT_PORT": str(broker.auth_port),
        "MQTT_USER": user,
        "MQTT_PASSWORD": TEST_USERS[user] if password is None else password,
    }


def script(name: str, *, replace: tuple[str, str] | None = None) -> str:
    """The connect recipe, then the named one, as a user would paste them."""
    known = recipes()
    body = known[name]
    if replace is not None:
        assert replace[0] in body
        body = body.replace(*replace)
    return known["connect"] + body


async def run(
    broker: MosquittoBroker,
    name: str,
    user: str = "operator",
    *,
    password: str | None = None,
    replace: tuple[str, str] | None = None,
    timeout: float = 60,
) -> Result:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script(name, replace=replace),
        env=recipe_env(broker, user, password),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


@dataclass
class Background:
    """A recipe that runs until stopped (mosquitto_sub), its output read line by line."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    async def wait_line(
        self, predicate: Callable[[str], bool], *, after: int = 0, timeout: float = 10
    ) -> str:
        async with asyncio.timeout(timeout):
            index = after
            while True:
                while index < len(self.lines):
                    if predicate(self.lines[index]):
                        return self.lines[index]
                    index += 1
                assert self.process.stdout is not None
                line = await self.process.stdout.readline()
                assert line, f"the recipe exited; it printed {self.lines}"
                self.lines.append(line.decode().rstrip("\n"))


@contextlib.asynccontextmanager
async def background(
    broker: MosquittoBroker, name: str, user: str = "operator"
) -> AsyncIterator[Background]:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script(name),
        env=recipe_env(broker, user),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield Background(process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        await process.wait()


def reply_line(topic: str, line: str) -> dict[str, Any] | None:
    """The reply in a ``mosquitto_sub -v`` line on ``topic``, else None."""
    head, _, payload = line.partition(" ")
    if head != topic:
        return None
    reply: dict[str, Any] = json.loads(payload)
    return reply


async def until_listening(broker: MosquittoBroker, replies: Background) -> None:
    """mosquitto_sub says nothing when its subscription is in place: send status commands
    (harmless) until one of their replies shows up."""
    for _ in range(40):
        mark = len(replies.lines)
        assert (await run(broker, "pub-status")).returncode == 0
        with contextlib.suppress(TimeoutError):
            await replies.wait_line(
                lambda line: reply_line(TOPICS.reply("status"), line) is not None,
                after=mark,
                timeout=0.5,
            )
            return
    raise AssertionError("the reply watcher never showed a status reply")


def model_state(observer: BusWatcher) -> str:
    message = observer.latest(TOPICS.model(MODEL))
    assert message is not None
    state: str = json.loads(message.payload)["state"]
    return state


def test_every_recipe_is_exercised() -> None:
    assert set(recipes()) == {
        "connect",
        "watch",
        "models",
        "rr-status",
        "rr-switch",
        "rr-logs",
        "rr-311",
        "replies",
        "pub-status",
        "pub-switch",
        "pub-unload",
        "rr-forbidden",
    }


async def test_watch_recipes_show_the_retained_state(
    broker: MosquittoBroker, gpu1: AgentProcess
) -> None:
    async with background(broker, "watch") as watching:
        await watching.wait_line(lambda line: line == f"{TOPICS.status} online")
        await watching.wait_line(lambda line: line.startswith(f"{TOPICS.model(MODEL)} {{"))
    for user in ("operator", "viewer"):
        result = await run(broker, "models", user)
        assert f"{MODEL}\tstopped" in result.stdout.splitlines(), result


async def test_mosquitto_rr_recipes_command_the_host(
    broker: MosquittoBroker, gpu1: AgentProcess, observer: BusWatcher
) -> None:
    status = await run(broker, "rr-status")
    assert status.returncode == 0, status
    assert f"{MODEL}\tstopped" in status.stdout.splitlines()

    mark = len(observer.messages)
    switch = await run(broker, "rr-switch")
    assert switch.returncode == 0, switch
    service = switch.stdout.strip()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", service), switch
    # The observer is another connection: it may see the state a moment after the reply
    # (MQTT orders messages per connection; test_lifecycle checks the agent's own order).
    await observer.wait_topic(TOPICS.model(MODEL), lambda v: v and v["state"] == "ready")
    # The reply went to the MQTT 5 response topic, not to the host's reply topic.
    assert observer.on(TOPICS.reply("me"))
    assert not [m for m in observer.messages[mark:] if m.topic == TOPICS.reply("switch")]

    v311 = await run(broker, "rr-311")
    assert (v311.returncode, v311.stdout.strip()) == (0, "ok"), v311

    # The server's output, on a reply topic only operators can read.
    logs = await run(broker, "rr-logs")
    assert logs.returncode == 0, logs
    lines = logs.stdout.splitlines()
    assert lines[0].startswith(f"loading {MODEL}") and f"ready: {MODEL}" in logs.stdout, logs
    assert observer.on(TOPICS.client_reply("logs", "me"))


async def test_pub_and_sub_recipes_switch_and_unload(
    broker: MosquittoBroker, gpu1: AgentProcess, observer: BusWatcher
) -> None:
    async with background(broker, "replies") as replies:
        await until_listening(broker, replies)
        mark = len(replies.lines)
        assert (await run(broker, "pub-switch")).returncode == 0
        line = await replies.wait_line(
            lambda text: (
                (reply_line(TOPICS.reply("switch"), text) or {}).get("request_id") == "sh-1"
            ),
            after=mark,
            timeout=30,
        )
        switched = reply_line(TOPICS.reply("switch"), line)
        assert switched is not None and switched["status"] == "ok", switched
        # wait: true, so the reply came once the job had ended.
        assert switched["data"]["job"]["state"] == "succeeded"
        await observer.wait_topic(TOPICS.model(MODEL), lambda v: v and v["state"] == "ready")

        assert (await run(broker, "pub-unload")).returncode == 0
        line = await replies.wait_line(
            lambda text: (
                (reply_line(TOPICS.reply("unload"), text) or {}).get("request_id") == "sh-2"
            ),
            after=mark,
        )
        unloaded = reply_line(TOPICS.reply("unload"), line)
        assert unloaded is not None and unloaded["status"] == "ok", unloaded
        job_id = unloaded["job_id"]
    await observer.wait_topic(TOPICS.job(job_id), lambda v: v and v["state"] == "succeeded")
    await observer.wait_topic(TOPICS.model(MODEL), lambda v: v and v["state"] == "stopped")


async def test_a_viewer_cannot_command(
    broker: MosquittoBroker, gpu1: AgentProcess, observer: BusWatcher
) -> None:
    mark = len(observer.messages)
    # The broker acknowledges the publish (exit 0) and drops it.
    published = await run(broker, "pub-switch", "viewer")
    assert published.returncode == 0, published
    # A command sent after it, answered: had the switch reached the agent, it came first.
    await observer.connection.publish(
        TOPICS.command("status"), json.dumps({"request_id": "barrier"}), qos=1
    )
    barrier = await observer.wait_topic(
        TOPICS.reply("status"), lambda v: v["request_id"] == "barrier", after=mark
    )
    data = json.loads(barrier.payload)["data"]
    assert [m["state"] for m in data["models"] if m["name"] == MODEL] == ["stopped"]
    assert data["jobs"] == []
    later = observer.messages[mark:]
    assert not [m for m in later if m.topic == TOPICS.reply("switch")]
    assert not [m for m in later if m.topic.startswith(f"{TOPICS.base}/jobs/")]
    assert not [m for m in later if m.topic == TOPICS.command("switch")]
    assert model_state(observer) == "stopped"


async def test_wrong_password_is_refused_with_a_clear_message(broker: MosquittoBroker) -> None:
    result = await run(broker, "rr-status", password="wrong")
    assert "Connection error: Not authorized" in result.stderr, result
    result = await run(broker, "pub-status", password="wrong")
    assert result.returncode != 0, result
    assert "Connection error: Connection Refused: not authorised." in result.stderr, result


@pytest.mark.parametrize("response_topic", [None, TOPICS.command("unload")])
async def test_a_response_topic_outside_the_reply_tree_is_refused(
    response_topic: str | None,
    broker: MosquittoBroker,
    gpu1: AgentProcess,
    observer: BusWatcher,
) -> None:
    forbidden = response_topic or "elsewhere/x"
    replace = None if response_topic is None else ("elsewhere/x", response_topic)
    async with background(broker, "replies") as replies:
        await until_listening(broker, replies)
        mark = len(replies.lines)
        observed = len(observer.messages)
        result = await run(broker, "rr-forbidden", replace=replace)
        assert result.returncode != 0 and "Timed out" in result.stderr, result
        line = await replies.wait_line(
            lambda text: (reply_line(TOPICS.reply("status"), text) or {}).get("status") == "error",
            after=mark,
        )
    refused = reply_line(TOPICS.reply("status"), line)
    assert refused is not None and refused["error"]["code"] == "forbidden", refused
    later = observer.messages[observed:]
    assert not [m for m in later if m.topic == forbidden]
    # The command itself went to cmd/status, and nothing else was commanded.
    assert [m.topic for m in later if "/cmd/" in m.topic] == [TOPICS.command("status")]
    assert model_state(observer) == "stopped"
