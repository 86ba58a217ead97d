from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import load_config
from bus.settings import ConfigError, load_bus_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None, environ={})
    assert config.prefix == "modelbus"
    assert config.broker.host == "127.0.0.1" and config.broker.port == 1883
    assert config.telemetry.interval_s == 1.0
    assert config.client_id == f"modelbus-agent-{config.host_id}"


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "host_id: from-file\nprefix: lab\nbroker:\n  url: mqtt://file:1883\n"
        "gpu:\n  backend: nvml\n",
    )
    config = load_config(
        path,
        environ={"MODELBUS_HOST_ID": "from-env", "MODELBUS_BROKER": "mqtt://env:1999"},
        overrides={"host_id": "from-flag", "gpu.backend": "sim", "prefix": None},
    )
    assert config.host_id == "from-flag"
    assert config.broker.host == "env" and config.broker.port == 1999
    assert config.prefix == "lab"
    assert config.gpu.backend == "sim"


def test_broker_urls_with_credentials_and_tls() -> None:
    config = load_config(
        None, environ={"MODELBUS_BROKER": "mqtts://agent:p%40ss@broker.lan"}, overrides={}
    )
    assert config.broker.tls
    assert config.broker.port == 8883
    assert config.broker.credentials == ("agent", "p@ss")
    assert "p@ss" not in config.broker.redacted_url()
    explicit = load_config(
        None,
        environ={"MODELBUS_BROKER": "mqtt://u:url@h", "MODELBUS_BROKER_PASSWORD": "env-secret"},
    )
    assert explicit.broker.credentials == ("u", "env-secret")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("telemetry:\n  interval_s: 0\n", "telemetry.interval_s"),
        ("host_id: Bad/Host\n", "host_id"),
        ("prefix: a/+\n", "prefix"),
        ("broker:\n  url: http://x\n", "broker.url"),
        ("broker:\n  url: mqtt://h:99999\n", "broker.url"),
        ("gpu:\n  backend: cuda\n", "gpu.backend"),
        ("gpu:\n  sim:\n    gpus: []\n", "gpu.sim.gpus"),
        ("telemetery:\n  interval_s: 1\n", "unknown field 'telemetery'"),
        ("broker:\n  reconnect_min_s: 5\n  reconnect_max_s: 1\n", "reconnect_max_s"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("a: [\n", "line 2"),
        ("http:\n  compat_open_read: sometimes\n", "http.compat_open_read"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(path) in str(caught.value)
    assert fragment in str(caught.value)


def test_environment_errors_are_reported_too() -> None:
    with pytest.raises(ConfigError, match=r"telemetry\.interval_s"):
        load_config(None, environ={"MODELBUS_TELEMETRY_INTERVAL": "soon"})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_the_agents_client_id_is_bound_to_its_secret(tmp_path: Path) -> None:
    def client_id(url: str, **broker: Any) -> str:
        return load_config(
            None, environ={}, overrides={"broker.url": url, "host_id": "gpu1", **broker}
        ).client_id

    plain = client_id("mqtt://gpu1:s3cret@broker:1883")
    assert (
        plain.startswith("modelbus-agent-gpu1-") and len(plain) == len("modelbus-agent-gpu1-") + 24
    )
    # The same secret gives the same id (the broker keeps the session across restarts)...
    assert (
        client_id("mqtt://broker:1883", **{"broker.username": "gpu1", "broker.password": "s3cret"})
        == plain
    )
    # ...another secret, user or host another: nobody can derive it without the password.
    assert client_id("mqtt://gpu1:other@broker:1883") != plain
    assert client_id("mqtt://gpu2:s3cret@broker:1883") != plain
    assert "s3cret" not in plain
    # A TLS client key is the secret when there is no password.
    key = tmp_path / "client.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nabc\n")
    keyed = client_id(
        "mqtts://broker:8883", **{"broker.key_file": str(key), "broker.cert_file": str(key)}
    )
    assert keyed.startswith("modelbus-agent-gpu1-") and keyed != plain
    # An open broker has no secret to bind to; an explicit id is used as given.
    assert client_id("mqtt://broker:1883") == "modelbus-agent-gpu1"
    assert client_id("mqtt://u:p@broker:1883", **{"broker.client_id": "mine"}) == "mine"


def test_clients_read_only_the_prefix_and_the_broker(tmp_path: Path) -> None:
    """The TUI and the client commands take --config for the broker settings: an agent's
    catalog in the same file is not theirs to validate."""
    path = write(
        tmp_path,
        "prefix: lab\nbroker:\n  url: mqtt://file:1883\nmodels:\n  broken: {runtime: nope}\n",
    )
    with pytest.raises(ConfigError):
        load_config(path, environ={})
    config = load_bus_config(path, environ={"MODELBUS_BROKER_USERNAME": "tui"})
    assert (config.prefix, config.broker.host, config.broker.credentials[0]) == (
        "lab",
        "file",
        "tui",
    )
    with pytest.raises(ConfigError, match="prefix"):
        load_bus_config(path, environ={}, overrides={"prefix": "a/#"})


# ---- the gateway's http section -------------------------------------------------------


def test_http_is_on_loopback_by_default_and_off_on_request() -> None:
    assert load_config(environ={}).http.listen == "127.0.0.1:9470"
    assert load_config(environ={"MODELBUS_HTTP_LISTEN": "off"}).http.listen is None
    assert load_config(environ={}, overrides={"http.listen": "[::1]:8123"}).http.listen


@pytest.mark.parametrize("listen", ["0.0.0.0:9470", "192.168.1.10:9470", "[::]:9470"])
def test_a_listen_beyond_loopback_needs_keys(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"reaches beyond this machine: set http\.api_keys"):
        load_config(environ={"MODELBUS_HTTP_LISTEN": listen})
    keyed = load_config(
        environ={"MODELBUS_HTTP_LISTEN": listen, "MODELBUS_HTTP_API_KEYS": "n8n:user:" + "k" * 20}
    )
    assert [(k.name, k.role) for k in keyed.http.api_keys] == [("n8n", "user")]


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ("n8n:user", "name:role:key"),
        ("n8n:boss:" + "k" * 20, "role 'boss' is not one of viewer, user, operator, admin"),
        ("n8n:user:short", "at least 16 characters"),
        (f"a:user:{'k' * 20},a:viewer:{'j' * 20}", "each key needs a name of its own"),
    ],
)
def test_bad_keys_are_refused_naming_what_is_wrong(keys: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(environ={"MODELBUS_HTTP_API_KEYS": keys})


def test_an_alias_names_one_model_only(tmp_path: Path) -> None:
    def model(**extra: Any) -> dict[str, Any]:
        return {"runtime": "process", "process": {"argv": ["x"]}, "port": 1, "vram_mb": 1, **extra}

    clash = {"a": model(aliases=["shared"]), "b": model(aliases=["shared"])}
    with pytest.raises(ConfigError, match="'shared' already names model 'a'"):
        load_config(environ={}, overrides={"models": clash})
    with pytest.raises(ConfigError, match="'a' already names model 'a'"):
        load_config(environ={}, overrides={"models": {"a": model(), "b": model(aliases=["a"])}})
    config = load_config(environ={}, overrides={"models": {"a": model(aliases=["org/a-7b"])}})
    resolved = config.catalog.resolve("org/a-7b")
    assert resolved is not None and resolved.name == "a"
    # Names the static routes beside /v1/models/{id} have taken.
    for models in ({"status": model()}, {"a": model(aliases=["switch"])}):
        with pytest.raises(ConfigError, match=r"/v1/models/.* is a route of its own"):
            load_config(environ={}, overrides={"models": models})


@pytest.mark.parametrize("gateway", [{"max_wait_s": -1}, {"idle_after_s": "soon"}, {"max_wait": 5}])
def test_a_bad_batching_policy_names_its_field(tmp_path: Path, gateway: dict[str, object]) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"gateway": gateway}))
    with pytest.raises(ConfigError, match=r"gateway\."):
        load_config(path, environ={})
