"""A burst of commands with the shipped broker limits: every command is answered
exactly once, in each sender's order, and every job's final state reaches a live
QoS 1 watcher."""

from __future__ import annotations

import collections
import json
from collections.abc import Callable

import pytest

from bus.mqtt import Message
from devtools.brokers import MosquittoBroker
from tests.support.agent_process import AgentProcess
from tests.support.burst import burst, wait_jobs_ended
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker

RUNS = 5


async def test_a_burst_of_1000_commands_from_20_clients_loses_none(
    broker: MosquittoBroker, start_host: Callable[..., AgentProcess], host: Host
) -> None:
    # Three small models that fit together: loads and switches end fast, so the
    # burst makes hundreds of jobs whose every update the watcher must see.
    models = {name: sim_model(4096, load_s=0.05) for name in ("alpha", "beta", "gamma")}
    log_start = broker.log_file.stat().st_size
    agent = start_host(models)
    await host.online()
    jobs_head = host.topics.base + "/jobs/"
    for run in range(RUNS):
        mark = len(host.bus.messages)
        result = await burst(broker.port, host.topics, models=list(models), seed=run)
        summary = f"run {run}: {result}"
        assert result.sent == 1000
        assert result.lost == 0, summary
        assert result.duplicates == 0, summary
        assert result.out_of_order == 0, summary
        assert result.job_ids, summary
        # Every job a reply named ends, and the watcher sees it end.
        try:
            await wait_jobs_ended(host.bus, host.topics, result.job_ids, after=mark)
        except AssertionError as missed:
            raise AssertionError(f"{missed}; {broker_drops(broker, log_start)}") from None
        # Updates do not multiply: a job is published again only when something in it
        # changed (every queued job was once republished at each start, cancel and
        # insert: 859 messages for 37 jobs). How many changes a job has depends on how
        # long its load takes, so the count itself is not bounded here.
        assert repeated_job_updates(host.bus.messages[mark:], jobs_head) == [], summary
        kinds = collections.Counter(
            m.topic[len(host.topics.base) + 1 :].split("/")[0] for m in host.bus.messages[mark:]
        )
        print(
            f"burst run {run}: {result.answered}/{result.sent} answered in {result.seconds:.2f} s, "
            f"{len(result.job_ids)} jobs, outcomes {dict(result.outcomes)}, "
            f"the watcher saw {dict(kinds)}"
        )
    assert agent.process.poll() is None, agent.output()
    assert broker_drops(broker, log_start) == "the broker dropped nothing"


def repeated_job_updates(messages: list[Message], jobs_head: str) -> list[str]:
    """Job updates that said nothing the one before them did not (their time aside)."""
    last: dict[str, dict[str, object]] = {}
    repeated = []
    for message in messages:
        if not message.topic.startswith(jobs_head) or not message.payload:
            continue
        state = json.loads(message.payload)
        del state["ts"]
        if last.get(message.topic) == state:
            repeated.append(f"{state['job_id']} {state['state']} {state['phase']}")
        last[message.topic] = state
    return repeated


def broker_drops(broker: MosquittoBroker, log_start: int) -> str:
    with broker.log_file.open("rb") as log:
        log.seek(log_start)
        drops = [line for line in log.read().decode().splitlines() if "being dropped" in line]
    return f"the broker dropped: {drops[:5]}" if drops else "the broker dropped nothing"


async def test_commands_beyond_the_intake_limit_are_answered_busy(
    broker: MosquittoBroker, start_host: Callable[..., AgentProcess], host: Host
) -> None:
    agent = start_host(
        {"alpha": sim_model(4096, load_s=0.05)}, module="tests.support.small_intake_agent"
    )
    await host.online()
    result = await burst(broker.port, host.topics, models=["alpha"], total=400, seed=7)
    assert (result.lost, result.duplicates, result.out_of_order) == (0, 0, 0), result
    # Refused at once, never silence: some are busy, the rest ran.
    print(f"intake of 5: {dict(result.outcomes)}")
    assert result.outcomes["busy"] > 0, result.outcomes
    assert set(result.outcomes) <= {"ok", "busy", "queue_full"}, result.outcomes
    assert agent.process.poll() is None
