from __future__ import annotations

from typing import Any

import pytest

from agent.intake import command_level, local_intake, read_command
from shared.commands import LoadCommand, StatusCommand, SwitchCommand
from shared.messages import ErrorCode
from shared.topics import HostTopics

TOPICS = HostTopics("modelbus", "gpu1")


def read(level: str, payload: bytes = b"", **kwargs: object):  # type: ignore[no-untyped-def]
    return read_command(TOPICS, level, payload, max_bytes=1024, **kwargs)  # type: ignore[arg-type]


def test_command_level() -> None:
    assert command_level(TOPICS, "modelbus/gpu1/cmd/switch") == "switch"
    assert command_level(TOPICS, "modelbus/gpu2/cmd/switch") is None
    assert command_level(TOPICS, "modelbus/gpu1/state") is None


def test_valid_command_replies_on_the_default_topic() -> None:
    intake = read("switch", b"qwen")
    assert intake.command == SwitchCommand(model="qwen")
    assert intake.route.topic == "modelbus/gpu1/reply/switch"
    assert intake.error is None
    assert len(intake.request_id) == 16


def test_allowed_response_topic_and_correlation_are_used() -> None:
    intake = read(
        "status",
        b'{"request_id": "abc"}',
        response_topic="modelbus/gpu1/reply/n8n",
        correlation_data=b"c1",
    )
    assert intake.command == StatusCommand(request_id="abc")
    assert intake.request_id == "abc"
    assert intake.route.topic == "modelbus/gpu1/reply/n8n"
    assert intake.route.correlation_data == b"c1"
    reply = intake.reply_ok(data={"x": 1})
    assert (reply.status, reply.request_id, reply.command) == ("ok", "abc", "status")


def test_forbidden_response_topic_is_refused_on_the_default_topic() -> None:
    intake = read("status", response_topic="modelbus/gpu1/cmd/load")
    assert intake.command is None and intake.error is not None
    assert intake.error.code == ErrorCode.FORBIDDEN
    assert intake.route.topic == "modelbus/gpu1/reply/status"


def test_a_private_command_replies_only_under_the_private_tree() -> None:
    default = read("logs", b"whisperx")
    assert default.command is not None and default.route.topic == "modelbus/gpu1/reply/private/logs"
    mine = read("logs", b"whisperx", response_topic="modelbus/gpu1/reply/private/me")
    assert mine.command is not None and mine.route.topic == "modelbus/gpu1/reply/private/me"
    # A response topic in the host's reply tree but not the private one: refused there,
    # naming where it must be, and not executed.
    public = read(
        "logs", b'{"model": "w", "request_id": "r1"}', response_topic="modelbus/gpu1/reply/me"
    )
    assert public.command is None and public.error is not None
    assert public.error.code == ErrorCode.FORBIDDEN
    assert "modelbus/gpu1/reply/private/" in public.error.message
    assert public.route.topic == "modelbus/gpu1/reply/me" and public.request_id == "r1"
    # Outside the host's tree altogether: refused on the private default topic.
    outside = read("logs", b"whisperx", response_topic="elsewhere/x")
    assert outside.error is not None and outside.error.code == ErrorCode.FORBIDDEN
    assert outside.route.topic == "modelbus/gpu1/reply/private/logs"
    retained = read("logs", b"whisperx", retained=True)
    assert retained.route.topic == "modelbus/gpu1/reply/private/logs"
    # Any command may still be answered under the private tree.
    status = read("status", response_topic="modelbus/gpu1/reply/private/me")
    assert status.command is not None and status.route.topic == "modelbus/gpu1/reply/private/me"


def test_retained_commands_are_refused() -> None:
    intake = read("switch", b"qwen", retained=True)
    assert intake.command is None and intake.error is not None
    assert intake.error.code == ErrorCode.FORBIDDEN
    assert "retained" in intake.error.message


def test_odd_command_levels_reply_on_reply_unknown() -> None:
    intake = read("x" * 500)
    assert intake.route.topic == "modelbus/gpu1/reply/unknown"
    assert intake.error is not None and intake.error.code == ErrorCode.UNKNOWN_COMMAND
    assert len(intake.error.message) < 200


def test_error_reply_carries_code_and_message() -> None:
    intake = read("load", b'{"model": 3, "request_id": "r9"}')
    reply = intake.reply_error()
    assert reply.status == "error" and reply.request_id == "r9"
    assert reply.error is not None and reply.error.code == ErrorCode.INVALID_PAYLOAD


@pytest.mark.parametrize(
    ("level", "payload", "options"),
    [
        ("status", b'{"request_id": "sh-7"}', {"retained": True}),
        ("status", b'{"request_id": "sh-7"}', {"response_topic": "elsewhere/x"}),
        ("reboot", b'{"request_id": "sh-7"}', {}),
        ("load", b'{"request_id": "sh-7", "pad": "' + b"x" * 2000 + b'"}', {}),
    ],
)
def test_refusals_echo_the_senders_request_id(
    level: str, payload: bytes, options: dict[str, Any]
) -> None:
    """Refused before the command is read, the reply still names the sender's request."""
    intake = read(level, payload, **options)
    assert intake.error is not None and intake.command is None
    assert intake.reply_error().request_id == "sh-7"


def test_an_unreadable_request_id_is_replaced() -> None:
    for payload in (b"{broken", b'{"request_id": 42}', b'{"request_id": ""}', b"\xff", b"x"):
        intake = read("status", payload, retained=True)
        assert len(intake.request_id) == 16, payload


def test_a_command_from_http_is_read_as_the_bus_reads_it_and_replies_to_its_caller() -> None:
    intake = local_intake("switch", b"qwen")
    assert intake.command == SwitchCommand(model="qwen") and intake.route.topic is None
    waited = local_intake("switch", b'{"model": "qwen", "request_id": "r1"}', wait=True)
    assert waited.command == SwitchCommand(model="qwen", wait=True, request_id="r1")
    assert waited.request_id == "r1"
    # ?wait=false overrides the body; commands without a wait ignore it.
    assert local_intake("load", b'{"model": "q", "wait": true}', wait=False).command == (
        LoadCommand(model="q", wait=False)
    )
    assert local_intake("status", b"", wait=True).command == StatusCommand()
    refused = local_intake("unload", b'{"all": true, "request_id": "r2"}', wait=True)
    assert refused.error is not None and refused.error.code == ErrorCode.INVALID_PAYLOAD
    assert refused.request_id == "r2" and "wait" in refused.error.message
    unknown = local_intake("reboot", b"")
    assert unknown.error is not None and unknown.error.code == ErrorCode.UNKNOWN_COMMAND
