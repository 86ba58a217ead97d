"""A burst of commands from many clients at once, and an account of every reply.

Used by tests/integration/test_burst.py and bench/swap.py: ``clients`` connections
each publish their share of ``total`` commands as fast as the broker takes them (QoS 1,
half ``load``, a quarter ``switch``, a quarter ``status``), each with a response topic of
its own, then wait for the replies. A QoS 1 watcher on ``P/H/#`` records the jobs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field

from bus.mqtt import ConnectionSettings, Message, Subscription, connect
from shared.messages import JobStatus
from shared.topics import HostTopics
from tests.support.bus import BusWatcher

FINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
_runs = itertools.count()


@dataclass
class BurstResult:
    sent: int
    # Replies per command (a command is "client/index").
    replies: Counter[str] = field(default_factory=Counter)
    job_ids: set[str] = field(default_factory=set)
    # Reply status or error code -> count, for the record.
    outcomes: Counter[str] = field(default_factory=Counter)
    # Commands of one client whose replies came back out of the order they were sent.
    out_of_order: int = 0
    seconds: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.replies)

    @property
    def lost(self) -> int:
        return self.sent - self.answered

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.replies.values() if count > 1)


def command_for(index: int, models: list[str], rng: random.Random) -> tuple[str, dict[str, str]]:
    """Half load, a quarter switch, a quarter status."""
    kind = ("load", "load", "switch", "status")[index % 4]
    return kind, ({} if kind == "status" else {"model": rng.choice(models)})


async def burst(
    port: int,
    topics: HostTopics,
    *,
    models: list[str],
    total: int = 1000,
    clients: int = 20,
    seed: int = 0,
    reply_timeout_s: float = 30.0,
) -> BurstResult:
    run = next(_runs)
    per_client = total // clients
    result = BurstResult(sent=per_client * clients)
    loop = asyncio.get_running_loop()

    async def one(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        settings = ConnectionSettings(
            "127.0.0.1", port, f"burst-{run}-{number}", persistent_session=False, protocol="5"
        )
        reply_root = f"{topics.base}/reply/burst-{run}-{number}"
        async with connect(settings) as connection:
            await connection.subscribe([Subscription(f"{reply_root}/#")])
            messages = connection.messages()
            for index in range(per_client):
                command, fields = command_for(index, models, rng)
                await connection.publish(
                    topics.command(command),
                    json.dumps({**fields, "request_id": f"burst-{run}-{number}-{index}"}),
                    qos=1,
                    response_topic=f"{reply_root}/{index}",
                )
            last_index = -1
            seen: set[int] = set()
            async with asyncio.timeout(reply_timeout_s):
                async for message in messages:
                    index = int(message.topic.rsplit("/", 1)[1])
                    result.replies[f"{number}/{index}"] += 1
                    if index < last_index:
                        result.out_of_order += 1
                    last_index = max(last_index, index)
                    seen.add(index)
                    _record(result, message)
                    if len(seen) == per_client:
                        break

    started = loop.time()
    outcomes = await asyncio.gather(*(one(n) for n in range(clients)), return_exceptions=True)
    result.seconds = loop.time() - started
    for outcome in outcomes:
        if isinstance(outcome, TimeoutError):
            continue  # counted as lost
        if isinstance(outcome, BaseException):
            raise outcome
    return result


def _record(result: BurstResult, message: Message) -> None:
    reply = json.loads(message.payload)
    error = reply.get("error")
    result.outcomes[error["code"] if error else reply["status"]] += 1
    if reply.get("job_id"):
        result.job_ids.add(reply["job_id"])


async def wait_jobs_ended(
    bus: BusWatcher, topics: HostTopics, job_ids: set[str], *, after: int, timeout: float = 60
) -> None:
    """Until the watcher has seen each of ``job_ids`` end (messages from ``after`` on)."""
    ended: set[str] = set()
    read = after

    def all_ended() -> bool:
        nonlocal read
        ended.update(final_job_states(bus.messages[read:], topics))
        read = len(bus.messages)
        return job_ids <= ended

    await bus.wait_until(all_ended, timeout=timeout, what=f"the end of {len(job_ids)} jobs")


def final_job_states(messages: list[Message], topics: HostTopics) -> dict[str, str]:
    """The last state each job's topic showed a watcher, for jobs that ended."""
    ended: dict[str, str] = {}
    head = topics.base + "/jobs/"
    for message in messages:
        if message.topic.startswith(head) and message.payload:
            job = json.loads(message.payload)
            if job["state"] in FINAL_STATES:
                ended[job["job_id"]] = job["state"]
    return ended
