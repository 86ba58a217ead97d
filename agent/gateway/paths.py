"""The gateway's forwarding routes, pure: the server registers them and the OpenAPI
document describes them, from this one list."""

from __future__ import annotations

# The routes that forward a JSON body naming its model. /v1/messages is Anthropic's,
# passed through as it is to servers that speak it (llama.cpp, vLLM): no translation.
INFERENCE_ROUTES = (
    "/v1/chat/completions",
    "/chat/completions",  # the dynamic orchestrator's gateway route
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/audio/speech",
    "/v1/images/generations",
    "/v1/rerank",
    "/v1/messages",
)
# Routes whose model server path is another: the originals' names for OpenAI's.
UPSTREAM_PATHS = {"/chat/completions": "/v1/chat/completions"}
# The routes that forward a multipart form naming its model (an audio file and fields).
FORM_ROUTES = ("/v1/audio/transcriptions", "/v1/audio/translations")
# Any request to a model's own API: /upstream/<model>/<path>, forwarded verbatim.
UPSTREAM_ROUTE = "/upstream/{model}/{path:.*}"
