"""Model lifecycle over the real broker: a real agent process running simulated
model servers (real processes) on a simulated 32 GB GPU."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from devtools.brokers import MosquittoBroker, free_port
from shared.messages import Reply
from tests.support.bus import watch
from tests.support.host import Host
from tests.support.models import BUDGET, budget_catalog, sim_model, stale_server

pytestmark = pytest.mark.broker


async def test_switch_sequence_replays_the_vram_budget_table(start_host, host: Host) -> None:
    start_host(budget_catalog())
    await host.online()
    steps = [
        ("qwen3-vl-30b", []),
        ("whisperx", []),
        ("infinitetalk", []),  # 17 + 6 + 8 GB = 31 GB still fits in 32 GB
        ("ovi-11b", None),  # needs 22 GB: something must go
        ("wan2.1-14b", None),  # needs 28 GB: only it fits
    ]
    for name, expected_evictions in steps:
        reply = await host.ask("switch", {"model": name, "wait": True})
        assert reply.status == "ok", reply.error
        assert reply.data is not None
        result = reply.data["job"]["result"]
        if expected_evictions is not None:
            assert result["evicted"] == expected_evictions
        assert host.model(name)["state"] == "ready"
    # ovi needed 22528 with 31744 used: evicting qwen (17408) alone frees enough.
    assert host.events("swap_completed")[0]["model"] == "ovi-11b"
    final = await host.ask("status")
    assert final.data is not None
    ready = {m["name"] for m in final.data["models"] if m["state"] == "ready"}
    assert ready == {"wan2.1-14b"}
    await host.bus.wait_topic(
        host.topics.gpu(0), lambda v: v["memory_used_mb"] == BUDGET["wan2.1-14b"]
    )


async def test_plan_reports_without_changing_anything(start_host, host: Host) -> None:
    start_host(budget_catalog())
    await host.online()
    assert (await host.ask("load", {"model": "qwen3-vl-30b", "wait": True})).status == "ok"
    plan = await host.ask("plan", "wan2.1-14b")
    assert plan.status == "ok" and plan.data is not None
    assert plan.data["fits"] is True
    assert plan.data["evict"] == ["qwen3-vl-30b"]
    assert plan.data["required_mb"] == BUDGET["wan2.1-14b"]
    assert host.model("qwen3-vl-30b")["state"] == "ready"
    refused = await host.ask("load", {"model": "wan2.1-14b", "wait": True})
    assert refused.status == "error" and refused.error is not None
    assert refused.error.code == "insufficient_vram"
    assert host.model("qwen3-vl-30b")["state"] == "ready"


async def test_unknown_model_and_pinned_unload(start_host, host: Host) -> None:
    start_host({"keeper": sim_model(2048, pinned=True)})
    await host.online()
    unknown = await host.ask("load", "no-such-model")
    assert unknown.error is not None and unknown.error.code == "unknown_model"
    assert (await host.ask("load", {"model": "keeper", "wait": True})).status == "ok"
    refused = await host.ask("unload", {"model": "keeper", "wait": True})
    assert refused.error is not None and refused.error.code == "busy"
    assert host.model("keeper")["state"] == "ready"
    forced = await host.ask("unload", {"model": "keeper", "force": True, "wait": True})
    assert forced.status == "ok"
    await host.wait_model("keeper", "stopped")


async def test_job_reply_at_once_then_progress_then_done(start_host, host: Host) -> None:
    start_host({"slow": sim_model(4096, load_s=1.0)})
    await host.online()
    reply = await host.ask("load", "slow")
    assert reply.status == "ok" and reply.job_id
    job_topic = host.topics.job(reply.job_id)
    done = await host.bus.wait_topic(job_topic, lambda v: v and v["state"] == "succeeded")
    phases = [json.loads(m.payload)["phase"] for m in host.bus.on(job_topic) if m.payload]
    assert "starting" in phases and "loading" in phases
    assert json.loads(done.payload)["result"]["vram_used_mb"] == 4096
    assert host.model("slow")["vram_used_mb"] == 4096


async def test_the_model_is_ready_on_the_bus_before_the_wait_reply(start_host, host: Host) -> None:
    """On one connection, in the order the agent published them: the model's ``ready``
    and the job's end come before the reply that says the switch succeeded."""
    start_host({"quick": sim_model(2048, load_s=0.2)})
    await host.online()
    reply = await host.ask("switch", {"model": "quick", "wait": True})
    assert reply.status == "ok" and reply.job_id
    messages = host.bus.messages
    answered = next(
        i
        for i, m in enumerate(messages)
        if m.topic.startswith(f"{host.topics.base}/reply/")
        and json.loads(m.payload).get("job_id") == reply.job_id
    )
    ready = [
        i
        for i, m in enumerate(messages)
        if m.topic == host.topics.model("quick") and json.loads(m.payload)["state"] == "ready"
    ]
    ended = [
        i
        for i, m in enumerate(messages)
        if m.topic == host.topics.job(reply.job_id)
        and m.payload
        and json.loads(m.payload)["state"] == "succeeded"
    ]
    assert ready and ready[0] < answered, (ready, answered)
    assert ended and ended[0] < answered, (ended, answered)


async def test_failure_modes_of_the_server(start_host, host: Host) -> None:
    start_host(
        {
            "dies": sim_model(1024, extra=["--exit-at-once"]),
            "hangs": sim_model(1024, extra=["--hang"], load_timeout_s=1.5),
            "greedy": sim_model(1024, extra=["--overuse-mb", "512"]),
        }
    )
    await host.online()
    dies = await host.ask("load", {"model": "dies", "wait": True})
    assert dies.error is not None and dies.error.code == "load_failed"
    assert "simulated startup failure" in dies.error.message
    assert host.model("dies")["state"] == "error"
    hangs = await host.ask("load", {"model": "hangs", "wait": True})
    assert hangs.error is not None and hangs.error.code == "timeout"
    # The hung server was stopped and its memory came back.
    await host.bus.wait_topic(host.topics.gpu(0), lambda v: v["memory_used_mb"] == 0)
    greedy = await host.ask("load", {"model": "greedy", "wait": True})
    assert greedy.status == "ok"
    assert host.model("greedy")["vram_used_mb"] == 1536
    assert len(host.events("model_load_failed")) == 2


async def test_crash_is_detected_and_restarted(start_host, host: Host) -> None:
    start_host({"flaky": sim_model(2048, extra=["--crash-after", "1.0"], restart="on-crash")})
    await host.online()
    assert (await host.ask("load", {"model": "flaky", "wait": True})).status == "ok"
    crashed = await host.wait_model("flaky", "crashed")
    assert "code 3" in crashed["error"]
    event = await host.wait_event("model_crashed")
    assert event["model"] == "flaky" and event["severity"] == "error"
    # restart: on-crash brings it back by itself.
    await host.bus.wait_topic(
        host.topics.model("flaky"),
        lambda v: v["state"] == "ready",
        after=len(host.bus.messages) - 1,
        timeout=20,
    )


async def test_failed_switch_rolls_back_the_evicted_model(start_host, host: Host) -> None:
    start_host(
        {
            "resident": sim_model(20000),
            "broken": sim_model(20000, extra=["--exit-at-once"]),
        }
    )
    await host.online()
    assert (await host.ask("load", {"model": "resident", "wait": True})).status == "ok"
    reply = await host.ask("switch", {"model": "broken", "wait": True})
    assert reply.error is not None and reply.error.code == "load_failed"
    assert reply.data is not None
    failed = reply.data["job"]
    # The evicted model comes back through a job of its own, named by the failed one.
    [restore] = failed["result"]["restores"]
    assert restore["model"] == "resident" and restore["job_id"] in failed["message"]
    await host.bus.wait_topic(
        host.topics.job(restore["job_id"]), lambda v: v and v["state"] == "succeeded"
    )
    restored = await host.wait_model("resident", "ready")
    assert restored["vram_used_mb"] == 20000


async def test_cancel_queued_and_running_jobs(start_host, host: Host) -> None:
    start_host({"big": sim_model(8000, load_s=5.0), "small": sim_model(1000)})
    await host.online()
    running = await host.ask("load", "big")
    queued = await host.ask("load", "small")
    assert running.job_id and queued.job_id
    # Queued jobs are published (and saved) at once, with their place in the queue.
    await host.bus.wait_topic(
        host.topics.job(queued.job_id), lambda v: v and v["state"] == "queued"
    )
    cancelled = await host.ask("cancel", queued.job_id)
    assert cancelled.status == "ok" and cancelled.data is not None
    assert cancelled.data["job"]["state"] == "cancelled"
    await host.bus.wait_topic(
        host.topics.job(running.job_id), lambda v: v and v["phase"] == "loading"
    )
    stop = await host.ask("cancel", running.job_id)
    # The reply comes once the job has ended, and carries it as it ended.
    assert stop.status == "ok" and stop.data is not None
    assert stop.data["job"]["state"] == "cancelled"
    await host.bus.wait_topic(
        host.topics.job(running.job_id), lambda v: v and v["state"] == "cancelled"
    )
    await host.wait_model("big", "stopped")
    await host.bus.wait_topic(host.topics.gpu(0), lambda v: v["memory_used_mb"] == 0)
    unknown = await host.ask("cancel", "nosuchjob")
    assert unknown.error is not None and unknown.error.code == "not_found"


async def test_cancelling_a_switch_back_to_a_model_loaded_before(start_host, host: Host) -> None:
    """The demo's sequence: qwen, then wan (evicting qwen), then back to qwen, cancelled
    while it loads. The half-loaded server holds part of qwen's learned size: the stop
    waits for that, not for the whole, and wan comes back through a job of its own."""
    start_host(
        {"qwen": sim_model(17408, load_s=3.0), "wan": sim_model(28672, load_s=2.0)},
        # A stop that waited for memory never coming back would stall the whole test.
        lifecycle={"vram_wait_timeout_s": 120},
    )
    await host.online()
    for name in ("qwen", "wan"):
        assert (await host.ask("switch", {"model": name, "wait": True})).status == "ok"
    back = await host.ask("switch", "qwen")
    assert back.job_id
    await host.bus.wait_topic(
        host.topics.job(back.job_id),
        lambda v: v and v["phase"] == "loading" and v["progress"] > 0.4,
    )
    cancel = await host.ask("cancel", back.job_id, timeout=20)
    assert cancel.status == "ok" and cancel.data is not None, cancel
    ended = cancel.data["job"]
    assert ended["state"] == "cancelled" and ended["phase"] == "done"
    [restore] = ended["result"]["restores"]
    assert restore["model"] == "wan"
    assert host.model("qwen")["state"] == "stopped"
    # The restore is a job like any other: cancellable, here without waiting for its end.
    await host.bus.wait_topic(
        host.topics.job(restore["job_id"]), lambda v: v and v["phase"] == "loading"
    )
    quick = await host.ask("cancel", {"job_id": restore["job_id"], "wait": False})
    assert quick.data is not None and quick.data["job"]["state"] == "running"
    assert quick.data["job"]["message"] == "cancelling"
    await host.bus.wait_topic(
        host.topics.job(restore["job_id"]), lambda v: v and v["state"] == "cancelled", timeout=20
    )
    await host.wait_model("wan", "stopped")
    # Every job ended; nothing is left queued, no memory was reported lost.
    status = await host.ask("status")
    assert status.data is not None
    assert [j for j in status.data["jobs"] if j["state"] in ("queued", "running")] == []
    assert host.events("vram_leak") == []
    assert host.events("model_load_failed") == []


async def test_concurrent_commands_are_each_answered_once_and_coalesced(
    start_host, host: Host, broker: MosquittoBroker, prefix: str
) -> None:
    start_host(budget_catalog(load_s=0.1))
    await host.online()
    names = list(BUDGET)

    async def client(number: int) -> list[Reply]:
        replies = []
        async with watch(broker.port, host.topics.reply(f"c{number}/#")) as mine:
            for i in range(20):
                topic = host.topics.reply(f"c{number}/{i}")
                payload = json.dumps(
                    {"model": names[(number + i) % 5], "request_id": f"{number}-{i}"}
                )
                await mine.connection.publish(
                    host.topics.command("switch"), payload, qos=1, response_topic=topic
                )
            for i in range(20):
                message = await mine.wait_topic(host.topics.reply(f"c{number}/{i}"), timeout=30)
                replies.append(Reply.model_validate_json(message.payload))
            await asyncio.sleep(0)
            assert len(mine.messages) == 20  # exactly one reply each
        return replies

    results = await asyncio.gather(*(client(n) for n in range(10)))
    replies = [reply for group in results for reply in group]
    assert len(replies) == 200
    assert all(r.status == "ok" or (r.error and r.error.code == "queue_full") for r in replies)
    accepted = [r for r in replies if r.status == "ok"]
    assert accepted
    # Equal requests joined: far fewer jobs than commands.
    assert len({r.job_id for r in accepted}) < len(accepted)
    # Swaps ran one at a time: at most one job was ever running.
    running: set[str] = set()
    peak = 0
    for message in host.bus.messages:
        if message.topic.startswith(f"{host.topics.base}/jobs/") and message.payload:
            job = json.loads(message.payload)
            if job["state"] == "running":
                running.add(job["job_id"])
            else:
                running.discard(job["job_id"])
            peak = max(peak, len(running))
    assert peak == 1
    healthy = await host.ask("status")
    assert healthy.status == "ok"


async def test_agent_killed_mid_swap_fails_the_job_and_adopts_the_server(
    start_host, host: Host
) -> None:
    models = {"slow": sim_model(4096, load_s=2.0)}
    agent = start_host(models)
    await host.online()
    reply = await host.ask("load", "slow")
    assert reply.job_id
    await host.bus.wait_topic(
        host.topics.job(reply.job_id), lambda v: v and v["phase"] == "loading"
    )
    agent.kill()
    await host.bus.wait_topic(host.topics.status, lambda v: v == "offline", raw=True)
    mark = len(host.bus.messages)
    start_host(models)
    failed = await host.bus.wait_topic(
        host.topics.job(reply.job_id), lambda v: v and v["state"] == "failed", after=mark
    )
    assert "restarted" in json.loads(failed.payload)["error"]["message"]
    # Published before the new agent's first connection, and delivered once it connected.
    event = await host.wait_event("job_failed")
    assert event["job_id"] == reply.job_id and event["severity"] == "warning"
    # The server kept loading; the new agent adopted it and saw it become ready.
    await host.bus.wait_topic(
        host.topics.model("slow"), lambda v: v and v["state"] == "ready", after=mark
    )
    await host.bus.wait_topic(
        host.topics.gpu(0),
        lambda v: any(p["model"] == "slow" and p["used_mb"] == 4096 for p in v["processes"]),
        after=mark,
    )
    unloaded = await host.ask("unload", {"model": "slow", "wait": True})
    assert unloaded.status == "ok"


async def test_preload_and_idle_ttl(start_host, host: Host) -> None:
    start_host(
        {"warm": sim_model(1024, ttl_s=1.0), "cold": sim_model(1024)},
        lifecycle={"preload": ["warm"]},
    )
    await host.online()
    await host.wait_model("warm", "ready")
    # Nobody uses it: the ttl unloads it by itself.
    await host.wait_model("warm", "stopped")
    assert host.model("cold")["state"] == "stopped"


async def test_learned_load_time_and_vram_survive_a_restart(start_host, host: Host) -> None:
    models = {"learner": sim_model(3000, load_s=0.5, extra=["--overuse-mb", "1000"])}
    agent = start_host(models)
    await host.online()
    first = await host.ask("load", {"model": "learner", "wait": True})
    assert first.status == "ok"
    assert (await host.ask("unload", {"model": "learner", "wait": True})).status == "ok"
    agent.terminate()
    mark = len(host.bus.messages)
    start_host(models)
    await host.bus.wait_topic(host.topics.status, lambda v: v == "online", raw=True, after=mark)
    # The plan uses the measured 4000 MiB, not the 3000 MiB estimate.
    plan = await host.ask("plan", "learner")
    assert plan.data is not None and plan.data["required_mb"] == 4000
    # And the next load has an ETA from the learned load time.
    reply = await host.ask("load", "learner")
    assert reply.job_id
    loading = await host.bus.wait_topic(
        host.topics.job(reply.job_id),
        lambda v: v and v["phase"] == "loading" and v["eta_s"] is not None,
    )
    assert json.loads(loading.payload)["eta_s"] <= 5


async def test_sighup_reloads_the_catalog_and_leaves_running_models_alone(
    start_host, host: Host, tmp_path: Path
) -> None:
    import signal

    models = {"runs": sim_model(2048), "goes": sim_model(1024)}
    agent = start_host(models)
    await host.online()
    assert (await host.ask("load", {"model": "runs", "wait": True})).status == "ok"
    config_file = tmp_path / "agent.yaml"
    original = config_file.read_text()

    # A broken file changes nothing and the agent keeps serving.
    config_file.write_text("models: [\n")
    agent.process.send_signal(signal.SIGHUP)
    assert (await host.ask("status")).status == "ok"

    import yaml

    config = yaml.safe_load(original)
    config["models"]["runs"]["vram_mb"] = 4096  # changed while running
    del config["models"]["goes"]
    config["models"]["new"] = sim_model(512)
    config_file.write_text(yaml.safe_dump(config))
    mark = len(host.bus.messages)
    agent.process.send_signal(signal.SIGHUP)
    await host.bus.wait_topic(
        host.topics.model("new"), lambda v: v["state"] == "stopped", after=mark
    )
    removed = await host.bus.wait_topic(host.topics.model("goes"), after=mark, raw=True)
    assert removed.payload == b""  # an empty retained payload: the topic is gone
    # The running model was left alone, still with the estimate it was started with.
    runs = host.model("runs")
    assert runs["state"] == "ready" and runs["vram_estimate_mb"] == 2048
    assert "catalog not reloaded" in agent.output()
    assert (await host.ask("load", {"model": "new", "wait": True})).status == "ok"


async def test_failing_health_counts_as_a_crash(start_host, host: Host) -> None:
    start_host({"sick": sim_model(1024, extra=["--fail-health-after", "0.3"])})
    await host.online()
    assert (await host.ask("load", {"model": "sick", "wait": True})).status == "ok"
    crashed = await host.wait_model("sick", "crashed")
    assert "health check failed" in crashed["error"]
    # The hung server was stopped: its memory is free again.
    await host.bus.wait_topic(host.topics.gpu(0), lambda v: v["memory_used_mb"] == 0)


def slow_release(seconds: float) -> dict[str, Any]:
    """A simulated driver that returns a stopped server's memory ``seconds`` later."""
    sim = {"release_delay_s": seconds, "gpus": [{"memory_total_mb": 32768}]}
    return {"gpu": {"backend": "sim", "sim": sim}}


async def test_memory_that_does_not_come_back_is_reported(start_host, host: Host) -> None:
    # The simulated driver takes 3 s to return memory; the agent waits 0.5 s.
    start_host(
        {"sticky": sim_model(3000)},
        lifecycle={"vram_wait_timeout_s": 0.5},
        extra=slow_release(3.0),
    )
    await host.online()
    assert (await host.ask("load", {"model": "sticky", "wait": True})).status == "ok"
    assert (await host.ask("unload", {"model": "sticky", "wait": True})).status == "ok"
    leak = await host.wait_event("vram_leak")
    assert leak["model"] == "sticky" and leak["severity"] == "warning"
    assert "did not come back" in leak["message"]


async def test_a_model_stays_unloading_until_its_memory_is_back(start_host, host: Host) -> None:
    """Its processes are gone but the driver still holds its memory: watchers keep its name
    on that memory (the TUI drew it as "other") until the job sees it back."""
    start_host(
        {"slowfree": sim_model(3000)},
        extra=slow_release(1.5),
    )
    await host.online()
    assert (await host.ask("load", {"model": "slowfree", "wait": True})).status == "ok"
    mark = len(host.bus.messages)
    reply = await host.ask("unload", "slowfree")
    assert reply.job_id is not None
    await host.bus.wait_topic(
        host.topics.job(reply.job_id), lambda v: v and v["phase"] == "waiting_vram", after=mark
    )
    latest = host.bus.latest(host.topics.model("slowfree"))
    assert latest is not None and json.loads(latest.payload)["state"] == "unloading"
    await host.bus.wait_topic(
        host.topics.model("slowfree"), lambda v: v and v["state"] == "stopped", after=mark
    )
    states = [
        json.loads(m.payload)["state"]
        for m in host.bus.messages[mark:]
        if m.topic == host.topics.model("slowfree") and m.payload
    ]
    assert states[-1] == "stopped" and states.count("stopped") == 1, states


async def test_a_running_model_removed_from_the_catalog_can_still_be_unloaded(
    start_host, host: Host, tmp_path: Path
) -> None:
    import signal

    import yaml

    agent = start_host({"old": sim_model(1024)})
    await host.online()
    assert (await host.ask("load", {"model": "old", "wait": True})).status == "ok"
    config_file = tmp_path / "agent.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["models"] = {"fresh": sim_model(512)}
    config_file.write_text(yaml.safe_dump(config))
    mark = len(host.bus.messages)
    agent.process.send_signal(signal.SIGHUP)
    await host.bus.wait_topic(host.topics.model("fresh"), after=mark)
    refused = await host.ask("load", "old")
    assert refused.error is not None and refused.error.code == "unknown_model"
    assert (await host.ask("unload", {"model": "old", "wait": True})).status == "ok"
    gone = await host.bus.wait_topic(
        host.topics.model("old"), lambda v: v is None, after=mark, raw=False
    )
    assert gone.payload == b""


async def test_a_port_already_in_use_fails_the_load_at_once(start_host, host: Host) -> None:
    """A stale server on the model's port once answered its health check, and the switch
    reported success for a server that then died with "address already in use"."""
    spec = sim_model(2048)
    start_host({"wan": spec})
    await host.online()
    with stale_server(spec["port"]) as stale:
        reply = await host.ask("switch", {"model": "wan", "wait": True})
        assert reply.status == "error" and reply.error is not None, reply
        assert reply.error.code == "port_in_use"
        assert str(spec["port"]) in reply.error.message
        assert f"pid {stale.pid}" in reply.error.message
        assert stale.poll() is None  # somebody else's: left alone
    assert host.model("wan")["state"] in ("stopped", "error")
    assert host.events("model_loaded") == []
    # Once the port is free, the same switch works.
    again = await host.ask("switch", {"model": "wan", "wait": True})
    assert again.status == "ok", again


async def test_a_health_check_answered_by_another_process_is_not_ready(
    start_host, host: Host
) -> None:
    """Ready means the server just started answers, not whoever holds the health URL."""
    elsewhere = free_port()
    spec = sim_model(2048, health_url=f"http://127.0.0.1:{elsewhere}/health", load_timeout_s=2)
    start_host({"misdirected": spec})
    await host.online()
    with stale_server(elsewhere) as stale:
        reply = await host.ask("load", {"model": "misdirected", "wait": True})
        assert reply.error is not None and reply.error.code == "timeout", reply
        assert f"answered by pid {stale.pid}" in reply.error.message
    assert host.events("model_loaded") == []


async def test_a_switch_evicts_more_important_models_only_with_force(
    start_host, host: Host
) -> None:
    start_host({"chat": sim_model(20000, priority=20), "video": sim_model(20000)})
    await host.online()
    assert (await host.ask("load", {"model": "chat", "wait": True})).status == "ok"
    plan = await host.ask("plan", "video")
    assert plan.data is not None and plan.data["fits"] is False
    assert "chat (20) has a higher priority than video (0)" in plan.data["message"]
    refused = await host.ask("switch", {"model": "video", "wait": True})
    assert refused.error is not None and refused.error.code == "insufficient_vram"
    assert "force: true evicts it" in refused.error.message
    assert host.model("chat")["state"] == "ready"
    forced_plan = await host.ask("plan", {"model": "video", "force": True})
    assert forced_plan.data is not None and forced_plan.data["evict"] == ["chat"]
    forced = await host.ask("switch", {"model": "video", "force": True, "wait": True})
    assert forced.status == "ok", forced
    assert forced.data is not None and forced.data["job"]["result"]["evicted"] == ["chat"]
