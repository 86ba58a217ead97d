"""The events stream's fan-out and its wire format (GET /api/v1/events)."""

from __future__ import annotations

import asyncio

from agent.event_feed import EventFeed, FeedMessage
from agent.gateway.control import sse_data, sse_message
from shared.topics import HostTopics

TOPICS = HostTopics("modelbus", "gpu1")


async def test_listeners_get_the_hosts_topics_in_order_without_replies_or_commands() -> None:
    feed = EventFeed(TOPICS)
    with feed.listen() as everything, feed.listen(["models", "events"]) as narrowed:
        for topic in (
            "modelbus/gpu1/gpu/0",
            "modelbus/gpu1/models/qwen",
            "modelbus/gpu1/reply/me",
            "modelbus/gpu1/reply/private/logs",
            "modelbus/gpu1/cmd/switch",
            "modelbus/gpu2/models/qwen",
            "modelbus/gpu1/modelsx",
            "modelbus/gpu1/events",
        ):
            feed.published(topic, b"{}")
        names = [(await everything.next(0.1)) for _ in range(4)]
        assert [item.name if item else None for item in names] == [
            "gpu/0",
            "models/qwen",
            "modelsx",
            "events",
        ]
        assert await everything.next(0.01) is None  # nothing more: a keepalive is due
        picked = [await narrowed.next(0.1), await narrowed.next(0.1)]
        assert [item.name if item else None for item in picked] == ["models/qwen", "events"]
    feed.published("modelbus/gpu1/events", b"{}")  # no listener left: nothing kept


async def test_a_listener_that_falls_behind_is_cut_off_not_buffered() -> None:
    feed = EventFeed(TOPICS, backlog=3, max_listeners=1)
    with feed.listen() as slow:
        assert feed.full
        for index in range(5):
            feed.published(f"modelbus/gpu1/gpu/{index}", b"{}")
        assert slow.overflowed
        assert await slow.next(0.1) is None
    assert not feed.full


async def test_a_waiting_listener_wakes_on_the_next_message() -> None:
    feed = EventFeed(TOPICS)
    with feed.listen() as listener:
        waiting = asyncio.create_task(listener.next(5))
        await asyncio.sleep(0.01)
        feed.published("modelbus/gpu1/state", b'{"a":1}')
        assert await waiting == FeedMessage("state", b'{"a":1}')


def test_events_are_written_as_server_sent_events_of_json() -> None:
    assert sse_message("models/qwen", b'{"state":"ready"}', event_id=7) == (
        b'event: models/qwen\nid: 7\ndata: {"state":"ready"}\n\n'
    )
    assert sse_message("x", b"a\nb") == b"event: x\ndata: a\ndata: b\n\n"
    assert sse_data(FeedMessage("status", b"online")) == b'"online"'
    assert sse_data(FeedMessage("jobs/abc", b"")) == b"null"  # a cleared retained topic
    assert sse_data(FeedMessage("state", b'{"a":1}')) == b'{"a":1}'
