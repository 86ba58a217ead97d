from __future__ import annotations

import pytest

from shared.topics import (
    PRIVATE_COMMANDS,
    CommandName,
    HostTopics,
    all_hosts_filter,
    is_host_id,
    is_model_name,
    parse_topic,
    sanitize_host_id,
)


def test_every_topic_of_a_host() -> None:
    t = HostTopics("modelbus", "gpu1")
    assert t.status == "modelbus/gpu1/status"
    assert t.info == "modelbus/gpu1/info"
    assert t.state == "modelbus/gpu1/state"
    assert t.weights == "modelbus/gpu1/weights"
    assert t.events == "modelbus/gpu1/events"
    assert t.gpu(3) == "modelbus/gpu1/gpu/3"
    assert t.model("qwen3-vl-30b") == "modelbus/gpu1/models/qwen3-vl-30b"
    assert t.job("j1") == "modelbus/gpu1/jobs/j1"
    assert t.command("switch") == "modelbus/gpu1/cmd/switch"
    assert t.reply("switch") == "modelbus/gpu1/reply/switch"
    assert t.command_filter == "modelbus/gpu1/cmd/+"
    assert t.discovery_config() == "homeassistant/device/modelbus_gpu1/config"
    assert all_hosts_filter("modelbus") == "modelbus/+/#"


def test_nested_prefix_flattens_in_discovery_ids() -> None:
    assert HostTopics("lab/mb", "h").discovery_config() == "homeassistant/device/lab_mb_h/config"
    assert HostTopics("a.b", "h").discovery_config("ha") == "ha/device/a_b_h/config"


@pytest.mark.parametrize("host", ["GPU1", "a/b", "", "x" * 65, "reply", "gpu+", "gpu#"])
def test_invalid_host_ids_are_refused(host: str) -> None:
    assert not is_host_id(host)
    with pytest.raises(ValueError, match="host id"):
        HostTopics("modelbus", host)


@pytest.mark.parametrize("prefix", ["", "a/", "/a", "a//b", "a/+", "#", "a b"])
def test_invalid_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        HostTopics(prefix, "gpu1")


def test_model_names_are_slugs_without_slashes() -> None:
    assert is_model_name("Qwen3-VL_30b.q4")
    assert not is_model_name("Qwen/Qwen3")
    assert not is_model_name("")
    with pytest.raises(ValueError):
        HostTopics("modelbus", "gpu1").model("a/b")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("GPU-Box.local", "gpu-box"), ("my host", "my-host"), ("...", "host"), ("reply", "host")],
)
def test_sanitize_host_id(raw: str, expected: str) -> None:
    assert sanitize_host_id(raw) == expected


def test_response_topics_must_stay_in_the_reply_tree() -> None:
    t = HostTopics("modelbus", "gpu1")
    assert t.is_allowed_response_topic("modelbus/gpu1/reply/me")
    assert t.is_allowed_response_topic("modelbus/gpu1/reply/n8n/42")
    for bad in [
        # Protocol 1's fleet-wide tree: any agent could write there, and forge replies.
        "modelbus/reply/n8n/42",
        "modelbus/gpu1/reply",
        "modelbus/gpu1/reply/",
        "modelbus/gpu1/state",
        "modelbus/reply",
        "modelbus/reply/",
        "modelbus/gpu2/reply/x",
        "modelbus/reply/+",
        "modelbus/reply/#",
        "other/reply/x",
        "modelbus/replyx/y",
        "homeassistant/status",
        "modelbus/reply//x",
        "",
    ]:
        assert not t.is_allowed_response_topic(bad), bad


def test_private_replies_have_a_tree_of_their_own() -> None:
    t = HostTopics("modelbus", "gpu1")
    assert t.reply_root("logs") == "modelbus/gpu1/reply/private/"
    assert t.default_reply(CommandName.LOGS) == "modelbus/gpu1/reply/private/logs"
    assert t.client_reply(CommandName.LOGS, "cli-1") == "modelbus/gpu1/reply/private/cli-1"
    for command in set(CommandName) - PRIVATE_COMMANDS:
        assert t.default_reply(command) == t.reply(command)
        assert t.client_reply(command, "cli-1") == "modelbus/gpu1/reply/cli-1"
    # The private tree lies inside the host's reply tree.
    assert t.is_allowed_response_topic(t.client_reply("logs", "me"))


def test_parse_topic() -> None:
    parsed = parse_topic("modelbus", "modelbus/gpu1/gpu/0")
    assert parsed is not None
    assert (parsed.host, parsed.kind, parsed.argument) == ("gpu1", "gpu", "0")
    status = parse_topic("modelbus", "modelbus/gpu1/status")
    assert status is not None and status.argument is None
    assert parse_topic("modelbus", "other/gpu1/status") is None
    assert parse_topic("modelbus", "modelbus/reply/x") is None
    assert parse_topic("modelbus", "modelbus/gpu1/a/b/c") is None
