"""The outbox: order kept, a topic's retained value replaced while it waits, bounds
that drop the oldest, and unacknowledged messages put back in front."""

from __future__ import annotations

import logging

import pytest

from bus.mqtt import ConnectionSettings
from bus.outbox import Outbox, Outgoing
from bus.reconnecting import ReconnectingClient


def drain(outbox: Outbox) -> list[tuple[str, bytes]]:
    taken = []
    while (message := outbox.take()) is not None:
        taken.append((message.topic, message.payload))
    return taken


def test_messages_leave_in_the_order_they_came() -> None:
    outbox = Outbox(max_messages=10, max_bytes=1000)
    for n in range(3):
        outbox.put(Outgoing("events", f"e{n}".encode(), qos=1))
    assert drain(outbox) == [("events", b"e0"), ("events", b"e1"), ("events", b"e2")]
    assert len(outbox) == 0 and outbox.bytes == 0


def test_a_waiting_retained_value_is_replaced_in_its_place() -> None:
    outbox = Outbox(max_messages=10, max_bytes=1000)
    outbox.put(Outgoing("jobs/a", b"queued", retain=True))
    outbox.put(Outgoing("events", b"e", qos=1))
    outbox.put(Outgoing("jobs/a", b"running", retain=True))
    outbox.put(Outgoing("jobs/a", b"", retain=True))  # cleared
    assert drain(outbox) == [("jobs/a", b""), ("events", b"e")]
    # Once taken, a new value for the topic waits behind what came before it.
    outbox.put(Outgoing("jobs/a", b"queued", retain=True))
    outbox.put(Outgoing("events", b"f", qos=1))
    assert outbox.take() is not None
    outbox.put(Outgoing("jobs/a", b"done", retain=True))
    assert drain(outbox) == [("events", b"f"), ("jobs/a", b"done")]


def test_when_full_the_oldest_waiting_messages_are_dropped_and_counted() -> None:
    outbox = Outbox(max_messages=3, max_bytes=1000)
    dropped = [outbox.put(Outgoing("t", bytes([n]))) for n in range(5)]
    assert dropped == [0, 0, 0, 1, 1] and outbox.dropped == 2
    assert drain(outbox) == [("t", b"\x02"), ("t", b"\x03"), ("t", b"\x04")]
    by_bytes = Outbox(max_messages=100, max_bytes=25)
    for n in range(3):
        by_bytes.put(Outgoing("topic", b"x" * 5 + bytes([n])))  # 11 bytes each
    assert by_bytes.dropped == 1 and by_bytes.bytes == 22
    assert [payload[-1] for _, payload in drain(by_bytes)] == [1, 2]


def test_unacknowledged_messages_go_back_in_front_unless_a_newer_value_waits() -> None:
    outbox = Outbox(max_messages=10, max_bytes=1000)
    sent = [Outgoing("events", b"e1", qos=1), Outgoing("jobs/a", b"running", retain=True)]
    outbox.put(Outgoing("jobs/a", b"done", retain=True))
    outbox.put(Outgoing("events", b"e2", qos=1))
    outbox.put_back(sent)
    assert drain(outbox) == [("events", b"e1"), ("jobs/a", b"done"), ("events", b"e2")]


async def test_a_client_offline_keeps_the_newest_and_counts_what_it_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = ReconnectingClient(
        ConnectionSettings("127.0.0.1", 1, "offline-test"),
        queue_while_offline=True,
        outbox_max_messages=3,
        name="outbox-test",
    )
    with caplog.at_level(logging.WARNING, logger="modelbus.outbox-test"):
        for n in range(5):
            assert client.publish("events", f"e{n}", qos=1)
    assert (client.waiting, client.dropped) == (3, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # One counted line for the burst of drops, not one per message.
    assert len(warnings) == 1 and "dropped 1 of the oldest" in warnings[0], warnings
    # Without an offline queue a publish is refused, not kept.
    plain = ReconnectingClient(ConnectionSettings("127.0.0.1", 1, "plain"), name="plain")
    assert not plain.publish("events", "e", qos=1) and plain.waiting == 0
