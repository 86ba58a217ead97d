"""Home Assistant MQTT discovery, device-based: one retained config per host.

Pure: builds the topic and the payload from what the agent knows. Home Assistant
reads the host's own retained topics (no extra publishing): ``gpu/<i>`` for the GPU
sensors, ``state`` for the active model and job progress, ``events`` for the event
entity, and ``status`` (the agent's birth and will) for availability.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.messages import GpuInfo
from shared.topics import CommandName, HostTopics

# The event types the agent emits; Home Assistant ignores others (with a warning).
EVENT_TYPES = (
    "model_loaded",
    "model_unloaded",
    "model_load_failed",
    "model_crashed",
    "swap_completed",
    "job_failed",
    "vram_leak",
    "gpu_lost",
    "weights_installed",
    "weights_uninstalled",
    "vram_high",
    "vram_high_cleared",
    "temperature_high",
    "temperature_high_cleared",
    "power_high",
    "power_high_cleared",
)


@dataclass(frozen=True, slots=True)
class Published:
    """What the agent last left retained on its discovery topic: the platform of each
    component, or ``cleared`` (an empty config) when discovery was turned off."""

    components: Mapping[str, str]
    cleared: bool = False

    def to_json(self) -> str:
        return json.dumps({"components": dict(self.components), "cleared": self.cleared})

    @classmethod
    def from_json(cls, text: str) -> Published | None:
        """None for anything unreadable: then nothing is known of what was published."""
        try:
            raw = json.loads(text)
            return cls(dict(raw["components"]), bool(raw["cleared"]))
        except (ValueError, KeyError, TypeError):
            return None


def with_removals(
    payload: dict[str, Any], previous: Published | None
) -> tuple[dict[str, Any], Published]:
    """The payload plus a platform-only entry for every component published last time
    and gone now: Home Assistant removes a component only when it is sent once like
    that; a component that merely disappears from the payload stays forever. Returns
    what is published now without those entries, so the next publish omits them."""
    components: dict[str, Any] = payload["components"]
    current = {key: component["platform"] for key, component in components.items()}
    gone = {
        key: {"platform": platform}
        for key, platform in (previous.components.items() if previous else ())
        if key not in current
    }
    return {**payload, "components": {**components, **gone}}, Published(current)


def _gpu_components(topics: HostTopics, gpu: GpuInfo, uid: str) -> dict[str, dict[str, Any]]:
    state = topics.gpu(gpu.index)
    label = f"GPU {gpu.index}"
    memory = {
        "device_class": "data_size",
        "unit_of_measurement": "MiB",
        "state_class": "measurement",
    }
    sensors: dict[str, dict[str, Any]] = {
        "vram_used": {**memory, "name": f"{label} VRAM used", "field": "memory_used_mb"},
        "vram_free": {**memory, "name": f"{label} VRAM free", "field": "memory_free_mb"},
        "vram_total": {
            **memory,
            "name": f"{label} VRAM total",
            "field": "memory_total_mb",
            "entity_category": "diagnostic",
        },
        "utilization": {
            "name": f"{label} utilization",
            "unit_of_measurement": "%",
            "state_class": "measurement",
            "field": "utilization_percent",
        },
        "temperature": {
            "name": f"{label} temperature",
            "device_class": "temperature",
            "unit_of_measurement": "°C",
            "state_class": "measurement",
            "field": "temperature_c",
        },
        "power": {
            "name": f"{label} power",
            "device_class": "power",
            "unit_of_measurement": "W",
            "state_class": "measurement",
            "field": "power_w",
        },
    }
    components: dict[str, dict[str, Any]] = {}
    for key, sensor in sensors.items():
        field = sensor.pop("field")
        object_id = f"gpu{gpu.index}_{key}"
        components[object_id] = {
            "platform": "sensor",
            "unique_id": f"{uid}_{object_id}",
            "state_topic": state,
            "value_template": f"{{{{ value_json.{field} }}}}",
            **sensor,
        }
    components[f"gpu{gpu.index}_problem"] = {
        "platform": "binary_sensor",
        "name": f"{label} problem",
        "unique_id": f"{uid}_gpu{gpu.index}_problem",
        "device_class": "problem",
        "state_topic": state,
        # alerts: vram_high, temperature_high, gpu_lost...; the names go in the attributes
        "value_template": "{{ 'ON' if value_json.alerts else 'OFF' }}",
        "json_attributes_topic": state,
        "json_attributes_template": "{{ {'alerts': value_json.alerts} | tojson }}",
    }
    return components


def discovery_payload(
    topics: HostTopics,
    *,
    hostname: str,
    agent_version: str,
    gpus: Sequence[GpuInfo],
    models: Sequence[str],
    gpu_backend: str,
) -> dict[str, Any]:
    uid = topics.device_id
    components: dict[str, dict[str, Any]] = {}
    for gpu in gpus:
        components.update(_gpu_components(topics, gpu, uid))
    if models:
        components["active_model"] = {
            "platform": "select",
            "name": "Active model",
            "unique_id": f"{uid}_active_model",
            "icon": "mdi:swap-horizontal",
            "options": sorted(models),
            # Bare text to cmd/switch is the model's name.
            "command_topic": topics.command(CommandName.SWITCH),
            "state_topic": topics.state,
            "value_template": (
                "{{ value_json.loaded_models | list | first "
                "if value_json.loaded_models else 'None' }}"
            ),
        }
    components["unload_all"] = {
        "platform": "button",
        "name": "Unload all models",
        "unique_id": f"{uid}_unload_all",
        "icon": "mdi:eject",
        "command_topic": topics.command(CommandName.UNLOAD),
        "payload_press": '{"all": true}',
    }
    components["job_progress"] = {
        "platform": "sensor",
        "name": "Job progress",
        "unique_id": f"{uid}_job_progress",
        "unit_of_measurement": "%",
        "state_topic": topics.state,
        "value_template": (
            "{{ (value_json.active_job_progress * 100) | round(0) "
            "if value_json.active_job_progress is not none else 0 }}"
        ),
        "json_attributes_topic": topics.state,
        "json_attributes_template": (
            "{{ {'job_id': value_json.active_job, 'queue_length': value_json.queue_length}"
            " | tojson }}"
        ),
    }
    components["events"] = {
        "platform": "event",
        "name": "Events",
        "unique_id": f"{uid}_events",
        "state_topic": topics.events,
        "event_types": list(EVENT_TYPES),
    }
    device: dict[str, Any] = {
        "identifiers": [uid],
        "name": f"{topics.host} (modelbus)",
        "manufacturer": "modelbus",
        "model": f"GPU host on {hostname} ({gpu_backend})",
        "sw_version": agent_version,
    }
    if gpus:
        device["hw_version"] = ", ".join(g.name or f"GPU {g.index}" for g in gpus)
    return {
        "device": device,
        "origin": {"name": "modelbus", "sw_version": agent_version},
        "availability_topic": topics.status,
        "payload_available": "online",
        "payload_not_available": "offline",
        "qos": 1,
        "components": components,
    }
