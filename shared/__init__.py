"""The modelbus bus contract: topics, message models and the command codec.

Both the agent and every client import this package; it imports no MQTT, GPU,
Docker, Hugging Face or terminal library, so it stays the one neutral source
of truth for the wire format.
"""

# 2: response topics are confined to the commanded host's P/H/reply/# (no more P/reply/#),
# and a status reply lists the active jobs and the 20 most recently finished.
# 3: models may be "sleeping" (their VRAM freed, kept warm in host RAM) and "waking".
PROTOCOL_VERSION = "3"
