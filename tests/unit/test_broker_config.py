"""The test broker's limits are the shipped broker's, so what the burst and size
tests see is what a deployment with mosquitto/mosquitto.conf does."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMITS = ("max_packet_size", "max_inflight_messages", "max_queued_messages", "max_queued_bytes")


def settings(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and " " in line:
            key, value = line.split(" ", 1)
            values[key] = value.strip()
    return values


def test_the_test_broker_has_the_shipped_limits() -> None:
    shipped = settings(ROOT / "mosquitto" / "mosquitto.conf")
    test = settings(ROOT / "mosquitto" / "test.conf")
    for key in LIMITS:
        assert key in shipped, key
        assert test.get(key) == shipped[key], key
