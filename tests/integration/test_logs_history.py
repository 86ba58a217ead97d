"""``logs`` and ``history`` against a real agent on the session Mosquitto: a simulated server
whose output grows, followed with the cursor across a restart; a stopped model's last log; a
model never run; load times from SQLite; and both over HTTP, with their roles."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from shared.messages import Reply
from shared.replies import LoadHistory, LogLines, ModelLoads
from tests.integration.test_http_commands import KEYS, OPERATOR, VIEWER, call
from tests.support.agent_process import AgentProcess
from tests.support.gateway import eventually, gateway_settings
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker

SAID = re.compile(r"^talker: line (\d+)$")


def talker() -> dict[str, Any]:
    """A model server that says a numbered line every 50 ms once ready."""
    return sim_model(2048, load_s=0.1, extra=["--say-every", "0.05"])


def said(lines: list[str]) -> list[int]:
    return [int(match[1]) for line in lines if (match := SAID.match(line))]


async def logs(host: Host, **fields: Any) -> LogLines:
    reply = await host.ask("logs", {"model": "talker", **fields})
    assert reply.status == "ok", reply
    return LogLines.model_validate(reply.data)


async def test_logs_follow_a_growing_log_across_a_restart(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    start_host({"talker": talker(), "quiet": sim_model(1024)})
    await host.online()
    # A model never run has no lines: an answer, not an error.
    never = await host.ask("logs", "quiet")
    assert never.status == "ok" and never.data["lines"] == [] and never.data["more"] is False
    unknown = await host.ask("logs", {"model": "nope"})
    assert unknown.error is not None and unknown.error.code == "unknown_model"
    bad = await host.ask("logs", {"model": "talker", "since": "not-a-cursor"})
    assert bad.error is not None and bad.error.code == "invalid_payload"
    assert "'since'" in bad.error.message

    assert (await host.ask("load", {"model": "talker", "wait": True})).status == "ok"
    # Followed three lines at a time from the last two: every line once, in order.
    first = await logs(host, lines=2)
    assert len(first.lines) == 2 and not first.restarted
    seen, cursor = list(first.lines), first.cursor
    deadline = time.monotonic() + 20
    while max(said(seen), default=0) < 25:
        assert time.monotonic() < deadline, seen
        step = await logs(host, lines=3, since=cursor)
        assert len(step.lines) <= 3 and not step.restarted
        seen += step.lines
        cursor = step.cursor
    numbers = said(seen)
    assert numbers == list(range(numbers[0], numbers[-1] + 1)), seen
    # Asked from the start, the log begins with what the server said while loading.
    everything = await logs(host, lines=1000)
    assert everything.lines[0].startswith("loading talker") and not everything.more

    assert (await host.ask("unload", {"model": "talker", "wait": True})).status == "ok"
    # Stopped: the last run's log is still there, to its last line.
    stopped = await logs(host, since=cursor)
    assert stopped.lines and stopped.lines[-1] == "stopping" and not stopped.restarted
    assert (await host.ask("load", {"model": "talker", "wait": True})).status == "ok"
    again = await logs(host, since=stopped.cursor)
    assert again.restarted and again.lines[0].startswith("loading talker")
    assert again.cursor.split(".")[0] != stopped.cursor.split(".")[0]

    # Without a response topic the reply goes to the private default topic.
    mark = len(host.bus.messages)
    await host.bus.connection.publish(
        host.topics.command("logs"), json.dumps({"model": "talker", "request_id": "d1"}), qos=1
    )
    default = await host.bus.wait_topic(
        host.topics.default_reply("logs"), lambda v: v["request_id"] == "d1", after=mark
    )
    assert f"{host.topics.base}/reply/private/" in default.topic
    # Every logs reply so far went under reply/private/, none elsewhere.
    replies = [m for m in host.bus.messages if "/reply/" in m.topic]
    logs_replies = [m for m in replies if json.loads(m.payload)["command"] == "logs"]
    assert logs_replies and all("/reply/private/" in m.topic for m in logs_replies)


async def test_history_lists_each_models_last_loads_newest_first(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    start_host({"talker": talker(), "quiet": sim_model(1024)})
    await host.online()
    empty = LoadHistory.model_validate((await host.ask("history")).data)
    assert empty.limit == 20
    assert [(entry.model, entry.loads) for entry in empty.models] == [("quiet", []), ("talker", [])]

    for _ in range(3):
        assert (await host.ask("switch", {"model": "talker", "wait": True})).status == "ok"
        assert (await host.ask("unload", {"model": "talker", "wait": True})).status == "ok"
    reply = await host.ask("history", {"model": "talker", "limit": 2})
    history = LoadHistory.model_validate(reply.data)
    assert [entry.model for entry in history.models] == ["talker"] and history.limit == 2
    loads = history.models[0].loads
    assert len(loads) == 2 and loads[0].loaded_at > loads[1].loaded_at
    assert all(0 < load.load_s < 20 and load.vram_used_mb == 2048 for load in loads)
    everyone = LoadHistory.model_validate((await host.ask("history", "")).data)
    assert [len(entry.loads) for entry in everyone.models] == [0, 3]
    unknown = await host.ask("history", {"model": "nope"})
    assert unknown.error is not None and unknown.error.code == "unknown_model"


async def test_logs_and_loads_over_http_with_their_roles(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    port, settings = gateway_settings(api_keys=KEYS)
    start_host({"talker": talker()}, http=settings)
    await host.online()
    api = f"http://127.0.0.1:{port}/api/v1"
    status, reply, _ = await call("POST", f"{api}/load?wait=true", OPERATOR, "talker")
    assert status == 200, reply

    async def some_lines() -> Any:
        return (await call("GET", f"{api}/models/talker/logs?lines=2", OPERATOR))[1]

    first = LogLines.model_validate(await eventually(some_lines, lambda v: len(v["lines"]) == 2))
    since = f"{api}/hosts/lab/models/talker/logs?since={first.cursor}&lines=1000"
    status, later, _ = await call("GET", since, OPERATOR)
    assert status == 200 and LogLines.model_validate(later).restarted is False
    # Logs can hold secrets: an operator's, not a viewer's, by any route.
    assert (await call("GET", f"{api}/models/talker/logs", VIEWER))[0] == 403
    status, refused, _ = await call("POST", f"{api}/logs", VIEWER, "talker")
    assert status == 403 and refused["error"]["code"] == "insufficient_role"
    status, posted, _ = await call("POST", f"{api}/logs", OPERATOR, {"model": "talker"})
    assert status == 200 and Reply.model_validate(posted).data["model"] == "talker"
    for query, param in (("lines=0", "lines"), ("lines=1001", "lines"), ("lines=x", "lines")):
        status, body, _ = await call("GET", f"{api}/models/talker/logs?{query}", OPERATOR)
        assert (status, body["error"]["param"]) == (400, param), query
    status, body, _ = await call("GET", f"{api}/models/talker/logs?since=a/b", OPERATOR)
    assert (status, body["error"]["code"]) == (400, "invalid_payload")
    status, body, _ = await call("GET", f"{api}/models/nope/logs", OPERATOR)
    assert (status, body["error"]["code"]) == (404, "model_not_found")

    # Load times read like status: a viewer's.
    status, loads, _ = await call("GET", f"{api}/models/talker/loads?limit=5", VIEWER)
    assert status == 200 and ModelLoads.model_validate(loads).model == "talker"
    assert len(loads["loads"]) == 1 and loads["loads"][0]["vram_used_mb"] == 2048
    status, history, _ = await call("POST", f"{api}/history", VIEWER, {"limit": 1})
    assert status == 200 and LoadHistory.model_validate(history["data"]).limit == 1
    assert (await call("GET", f"{api}/models/talker/loads?limit=101", VIEWER))[0] == 400
    assert (await call("GET", f"{api}/models/nope/loads", VIEWER))[0] == 404
    # The job history keeps its GET beside the command's POST.
    status, jobs, _ = await call("GET", f"{api}/history?limit=1", VIEWER)
    assert status == 200 and jobs[0]["model"] == "talker"
