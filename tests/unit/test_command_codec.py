from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.commands import (
    COMMAND_MODELS,
    MAX_COMMAND_BYTES,
    CommandError,
    HistoryCommand,
    InstallCommand,
    LoadCommand,
    LogsCommand,
    StatusCommand,
    SwitchCommand,
    decode_command,
)
from shared.messages import ErrorCode
from shared.topics import CommandName


def test_every_contract_command_has_a_model() -> None:
    assert set(COMMAND_MODELS) == set(CommandName)


def test_bare_text_is_the_main_argument() -> None:
    command = decode_command("switch", b"  qwen3-vl-30b\n")
    assert isinstance(command, SwitchCommand)
    assert command.model == "qwen3-vl-30b"
    assert command.exclusive is False and command.wait is False
    install = decode_command("install", b"Qwen/Qwen3-8B")
    assert isinstance(install, InstallCommand) and install.repo == "Qwen/Qwen3-8B"
    assert decode_command("cancel", b"job-1").model_dump()["job_id"] == "job-1"


def test_json_object_with_all_fields() -> None:
    payload = {"model": "wan2.1-14b", "gpu": 1, "priority": 5, "wait": True, "request_id": "r1"}
    command = decode_command("load", json.dumps(payload).encode())
    assert command == LoadCommand(**payload)


def test_logs_and_history_defaults_and_bare_text() -> None:
    assert decode_command("logs", b"whisperx") == LogsCommand(model="whisperx", lines=200)
    since = decode_command("logs", b'{"model": "w", "lines": 1000, "since": "18f3a.1024s"}')
    assert since == LogsCommand(model="w", lines=1000, since="18f3a.1024s")
    assert decode_command("history", b"") == HistoryCommand(limit=20)
    assert decode_command("history", b"whisperx") == HistoryCommand(model="whisperx")


def test_empty_status() -> None:
    assert decode_command("status", b"") == StatusCommand()
    assert decode_command("status", b"{}") == StatusCommand()


def error_of(command: str, payload: bytes) -> CommandError:
    with pytest.raises(CommandError) as caught:
        decode_command(command, payload)
    return caught.value


@pytest.mark.parametrize(
    ("command", "payload", "code", "fragment"),
    [
        (
            "load",
            b'{"model": "x", "colour": "red"}',
            ErrorCode.INVALID_PAYLOAD,
            "unknown field 'colour'",
        ),
        ("load", b"{}", ErrorCode.INVALID_PAYLOAD, "missing field 'model'"),
        ("load", b'{"model": "x", "gpu": "0"}', ErrorCode.INVALID_PAYLOAD, "field 'gpu'"),
        ("load", b'{"model": "x", "gpu": -1}', ErrorCode.INVALID_PAYLOAD, "field 'gpu'"),
        ("switch", b'{"model": "x", "wait": "yes"}', ErrorCode.INVALID_PAYLOAD, "field 'wait'"),
        ("load", b"Qwen/Qwen3", ErrorCode.INVALID_PAYLOAD, "field 'model'"),
        ("install", b"../../etc", ErrorCode.INVALID_PAYLOAD, "field 'repo'"),
        ("install", b"a--b/c", ErrorCode.INVALID_PAYLOAD, "'--'"),
        ("load", b"{", ErrorCode.INVALID_PAYLOAD, "not valid"),
        ("load", b"[1]", ErrorCode.INVALID_PAYLOAD, "JSON object"),
        ("load", b'"qwen"', ErrorCode.INVALID_PAYLOAD, "JSON object"),
        ("load", b"\xc3\x28", ErrorCode.INVALID_PAYLOAD, "UTF-8"),
        ("status", b"verbose", ErrorCode.INVALID_PAYLOAD, "takes no argument"),
        ("explode", b"", ErrorCode.UNKNOWN_COMMAND, "use one of load"),
        ("load", b"x" * (MAX_COMMAND_BYTES + 1), ErrorCode.PAYLOAD_TOO_LARGE, "limited"),
        ("cancel", b'{"job_id": "a/b"}', ErrorCode.INVALID_PAYLOAD, "field 'job_id'"),
        ("load", b'{"model": "x", "request_id": ""}', ErrorCode.INVALID_PAYLOAD, "request_id"),
        ("logs", b'{"model": "x", "lines": 0}', ErrorCode.INVALID_PAYLOAD, "field 'lines'"),
        ("logs", b'{"model": "x", "lines": 1001}', ErrorCode.INVALID_PAYLOAD, "field 'lines'"),
        ("logs", b'{"model": "x", "lines": "5"}', ErrorCode.INVALID_PAYLOAD, "field 'lines'"),
        ("logs", b'{"model": "x", "lines": true}', ErrorCode.INVALID_PAYLOAD, "field 'lines'"),
        ("logs", b'{"model": "x", "since": 5}', ErrorCode.INVALID_PAYLOAD, "field 'since'"),
        ("logs", b'{"model": "x", "since": "a/b"}', ErrorCode.INVALID_PAYLOAD, "field 'since'"),
        ("logs", b'{"model": "x", "since": ""}', ErrorCode.INVALID_PAYLOAD, "field 'since'"),
        ("logs", b'{"model": "x", "tail": 5}', ErrorCode.INVALID_PAYLOAD, "unknown field 'tail'"),
        ("logs", b"{}", ErrorCode.INVALID_PAYLOAD, "missing field 'model'"),
        ("logs", b"../x", ErrorCode.INVALID_PAYLOAD, "field 'model'"),
        ("history", b'{"limit": 101}', ErrorCode.INVALID_PAYLOAD, "field 'limit'"),
        ("history", b'{"limit": 0}', ErrorCode.INVALID_PAYLOAD, "field 'limit'"),
        ("history", b'{"model": "x", "n": 1}', ErrorCode.INVALID_PAYLOAD, "unknown field 'n'"),
    ],
)
def test_bad_payloads_name_what_is_wrong(
    command: str, payload: bytes, code: ErrorCode, fragment: str
) -> None:
    error = error_of(command, payload)
    assert error.code == code
    assert fragment in error.message
    assert "\n" not in error.message


def test_request_id_survives_a_validation_error() -> None:
    error = error_of("load", b'{"model": 1, "request_id": "keep-me"}')
    assert error.request_id == "keep-me"


def test_overlong_request_id_is_not_echoed() -> None:
    error = error_of("load", json.dumps({"model": 1, "request_id": "x" * 500}).encode())
    assert error.request_id is None


@given(st.binary(max_size=512), st.sampled_from([c.value for c in CommandName] + ["bogus"]))
def test_any_bytes_decode_or_fail_cleanly(payload: bytes, command: str) -> None:
    try:
        decode_command(command, payload)
    except CommandError as error:
        assert error.code in set(ErrorCode)
        assert error.message
