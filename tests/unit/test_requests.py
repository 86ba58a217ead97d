"""Requests and their replies, as every client makes them (bus/requests.py)."""

from __future__ import annotations

import json

from bus.mqtt import Message
from bus.requests import Requests
from shared.messages import Reply
from shared.topics import CommandName


def reply_message(topic: str, request_id: str, command: str = "status") -> Message:
    reply = Reply(request_id=request_id, command=command, status="ok")
    return Message(topic, reply.model_dump_json().encode())


def test_a_request_names_its_reply_topic_under_the_commanded_host() -> None:
    requests = Requests("modelbus", "tui")
    first = requests.make("gpu1", CommandName.SWITCH, {"model": "whisperx"})
    second = requests.make("gpu2", CommandName.STATUS)
    assert first.topic == "modelbus/gpu1/cmd/switch"
    assert json.loads(first.payload) == {"model": "whisperx", "request_id": first.request_id}
    assert first.request_id != second.request_id
    assert first.request_id.startswith(requests.name) and requests.name.startswith("tui-")
    assert first.response_topic == f"modelbus/gpu1/reply/{requests.name}"
    assert second.response_topic == f"modelbus/gpu2/reply/{requests.name}"
    assert first.correlation_data == first.request_id.encode()
    # MQTT 5: our own topic; 3.1.1: the host's shared topic for the command.
    assert first.reply_filter("5") == first.response_topic
    assert first.reply_filter("3.1.1") == "modelbus/gpu1/reply/switch"


def test_a_private_command_is_answered_under_the_private_reply_tree() -> None:
    requests = Requests("modelbus", "cli")
    logs = requests.make("gpu1", CommandName.LOGS, {"model": "whisperx"})
    assert logs.response_topic == f"modelbus/gpu1/reply/private/{requests.name}"
    assert logs.reply_filter("3.1.1") == "modelbus/gpu1/reply/private/logs"


def test_only_the_reply_to_this_request_answers_it() -> None:
    request = Requests("modelbus", "cli").make("gpu1", CommandName.STATUS)
    answer = request.answer(reply_message(request.response_topic, request.request_id))
    assert answer is not None and answer.reply.request_id == request.request_id
    assert answer.raw["status"] == "ok"
    # Under 3.1.1 the shared topic carries everyone's replies: the id tells ours.
    shared = request.answer(reply_message("modelbus/gpu1/reply/status", request.request_id))
    assert shared is not None
    assert request.answer(reply_message("modelbus/gpu1/reply/status", "someone-else")) is None
    assert request.answer(reply_message("modelbus/gpu2/reply/status", request.request_id)) is None
    assert request.answer(Message(request.response_topic, b"not json")) is None
