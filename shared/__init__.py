"""The modelbus bus contract: topics, message models and the command codec.

Both the agent and every client import this package; it imports no MQTT, GPU,
Docker, Hugging Face or terminal library, so it stays the one neutral source
of truth for the wire format.
"""

PROTOCOL_VERSION = "1"
