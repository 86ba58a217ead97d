"""The modelbus agent: GPU telemetry and model lifecycle for one host, over MQTT."""

__version__ = "0.1.0"
