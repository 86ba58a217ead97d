"""The HTTP side of the agent: one aiohttp server for the OpenAI-compatible gateway (a
request names a model; the agent loads it through the swap queue and forwards to it)."""
