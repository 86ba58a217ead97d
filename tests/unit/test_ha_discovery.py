"""The Home Assistant discovery payload, built without a broker."""

from __future__ import annotations

import json
from typing import Any

from agent.ha_discovery import EVENT_TYPES, Published, discovery_payload, with_removals
from shared.messages import GpuInfo
from shared.topics import HostTopics


def payload(prefix: str = "modelbus", models: tuple[str, ...] = ("b", "a")) -> dict[str, object]:
    return discovery_payload(
        HostTopics(prefix, "gpu1"),
        hostname="box",
        agent_version="1.2.3",
        gpus=[GpuInfo(index=0, name="RTX"), GpuInfo(index=1, name="RTX")],
        models=models,
        gpu_backend="nvml",
    )


def test_ids_hold_only_what_home_assistant_accepts() -> None:
    topics = HostTopics("lab.one/mb", "gpu1")
    assert topics.discovery_config() == "homeassistant/device/lab_one_mb_gpu1/config"
    built = payload("lab.one/mb")
    components = built["components"]
    assert isinstance(components, dict)
    for component in components.values():
        assert all(c.isalnum() or c in "_-" for c in component["unique_id"])


def test_one_component_set_per_gpu_and_the_host_entities() -> None:
    built = payload()
    components = built["components"]
    assert isinstance(components, dict)
    per_gpu = {k for k in components if k.startswith("gpu")}
    assert len(per_gpu) == 2 * 7
    assert components["active_model"]["options"] == ["a", "b"]
    assert components["events"]["event_types"] == list(EVENT_TYPES)
    assert built["availability_topic"] == "modelbus/gpu1/status"
    assert built["device"] == {
        "identifiers": ["modelbus_gpu1"],
        "name": "gpu1 (modelbus)",
        "manufacturer": "modelbus",
        "model": "GPU host on box (nvml)",
        "sw_version": "1.2.3",
        "hw_version": "RTX, RTX",
    }
    json.dumps(built)  # it goes on the bus as JSON


def test_no_select_without_a_catalog() -> None:
    components = payload(models=())["components"]
    assert isinstance(components, dict)
    assert "active_model" not in components and "unload_all" in components


def test_a_gpu_that_went_away_is_removed_once_by_its_platform_alone() -> None:
    topics = HostTopics("modelbus", "gpu1")

    def built(gpus: list[GpuInfo]) -> dict[str, Any]:
        return discovery_payload(
            topics, hostname="box", agent_version="1", gpus=gpus, models=("a",), gpu_backend="sim"
        )

    two = [GpuInfo(index=0, name="RTX"), GpuInfo(index=1, name="RTX")]
    first, published = with_removals(built(two), None)
    assert first == built(two)  # nothing known before: nothing to remove
    assert published.components["gpu1_vram_used"] == "sensor"
    # GPU 1 is gone: each of its components is sent once with its platform only...
    second, after = with_removals(built(two[:1]), published)
    gone = {key: value for key, value in second["components"].items() if key.startswith("gpu1_")}
    assert gone and all(
        value in ({"platform": "sensor"}, {"platform": "binary_sensor"}) for value in gone.values()
    )
    assert gone["gpu1_problem"] == {"platform": "binary_sensor"}
    # ...and what is remembered no longer has it, so the next payload omits it.
    assert not [key for key in after.components if key.startswith("gpu1_")]
    third, _ = with_removals(built(two[:1]), after)
    assert not [key for key in third["components"] if key.startswith("gpu1_")]
    assert Published.from_json(after.to_json()) == after
    assert Published.from_json("{not json") is None
