"""Widgets of the dashboard, one module per panel. None of them touches MQTT."""
