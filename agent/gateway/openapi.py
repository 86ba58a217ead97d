"""The HTTP server's OpenAPI 3.1 document, built from the contract's pydantic models: every
route with its role, parameters, body and answer. Pure; served at ``/openapi.json`` and
written to ``docs/schema/openapi.json`` by ``modelbus schema`` (CI checks it is current).
A test holds this table and the server's routes to the same set."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter

from agent import __version__
from agent.gateway.keys import Role, command_role
from agent.gateway.paths import FORM_ROUTES, INFERENCE_ROUTES, UPSTREAM_ROUTE
from shared.commands import COMMAND_MODELS
from shared.messages import GpuState, JobState, ModelState, Reply, WeightsState
from shared.replies import REPLY_DATA, HostStatus, LogLines, ModelLoads
from shared.topics import CommandName

REF = "#/components/schemas/{model}"
_PARAMETER = re.compile(r"{(\w+)(?::[^}]*)?}")
# Query parameters the routes take, described once.
QUERY = {
    "wait": "true: answer once the job has ended (200 and data.job); false: at once (202)",
    "limit": "how many, newest first: jobs 1-1000 (100), a model's loads 1-100 (20)",
    "lines": "how many lines at most (1-1000; 200): the last ones, or the first after since",
    "since": "the cursor of an earlier answer: the lines after it",
    "topics": "comma-separated levels to follow: status, info, state, gpu, models, jobs, "
    "weights, events (all when absent)",
    "target_model": "the catalog model to switch to",
}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    role: Role | None  # None: answered without a key
    summary: str
    tag: str
    body: Any = None  # the JSON body's type; "object" for a free-form one
    answer: Any = None  # the success answer's type; "object" for a free-form one
    status: int = 200
    query: tuple[str, ...] = ()
    text_body: bool = False  # the body may be bare text (a command's main argument)
    content: str = "application/json"


def routes() -> list[Route]:
    """Every route the HTTP server answers (docs/http.md, docs/gateway.md)."""
    table = [*_gateway_routes(), *_native_routes("/api/v1"), *_compat_routes()]
    table += [
        Route("GET", "/healthz", None, "liveness", "health", answer="object"),
        Route("GET", "/health", None, "liveness", "health", answer="object"),
        Route(
            "GET",
            "/metrics",
            None,
            "Prometheus metrics (docs/metrics.md)",
            "metrics",
            content="text/plain",
        ),
        Route("GET", "/openapi.json", Role.VIEWER, "this document", "docs", answer="object"),
        Route("GET", "/openapi", Role.VIEWER, "this document", "docs", answer="object"),
        Route("GET", "/docs", Role.VIEWER, "a page of every route", "docs", content="text/html"),
    ]
    return table


def _gateway_routes() -> list[Route]:
    table = [
        Route("POST", path, Role.USER, "forwarded to the model the body names, loaded first",
              "gateway", body="object", answer="object")
        for path in INFERENCE_ROUTES
    ]  # fmt: skip
    for path in FORM_ROUTES:
        table.append(
            Route("POST", path, Role.USER, "a multipart form naming its model, forwarded",
                  "gateway", answer="object", content="multipart/form-data")
        )  # fmt: skip
    table.append(
        Route("*", UPSTREAM_ROUTE, Role.USER, "the model's own API, loaded first",
              "gateway", answer="object")
    )  # fmt: skip
    table.append(Route("GET", "/v1/models", Role.VIEWER, "the catalog", "gateway", answer="object"))
    table.append(
        Route("GET", "/v1/models/{model}", Role.VIEWER, "one model, by name or alias", "gateway",
              answer="object")
    )  # fmt: skip
    return table


def _native_routes(root: str) -> list[Route]:
    table: list[Route] = []
    for prefix in (root, root + "/hosts/{host}"):
        table += [
            Route("GET", f"{prefix}/status", Role.VIEWER, "the bus's status reply", "control",
                  answer=Reply[HostStatus]),
            Route("GET", f"{prefix}/models", Role.VIEWER, "every model", "control",
                  answer=list[ModelState]),
            Route("GET", f"{prefix}/models/{{name}}", Role.VIEWER, "one model", "control",
                  answer=ModelState),
            Route("GET", f"{prefix}/models/{{name}}/logs", command_role(CommandName.LOGS),
                  "its server's output (the bus's logs)", "control", answer=LogLines,
                  query=("lines", "since")),
            Route("GET", f"{prefix}/models/{{name}}/loads", command_role(CommandName.HISTORY),
                  "its last loads (the bus's history)", "control", answer=ModelLoads,
                  query=("limit",)),
            Route("GET", f"{prefix}/gpus", Role.VIEWER, "every GPU", "control",
                  answer=list[GpuState]),
            Route("GET", f"{prefix}/jobs", Role.VIEWER, "active and recent jobs", "control",
                  answer=list[JobState]),
            Route("GET", f"{prefix}/jobs/{{job_id}}", Role.VIEWER, "one job, or from the history",
                  "control", answer=JobState),
            Route("GET", f"{prefix}/weights", Role.VIEWER, "installed weights and disk",
                  "control", answer=WeightsState),
            Route("GET", f"{prefix}/history", Role.VIEWER, "the newest jobs of the history",
                  "control", answer=list[JobState], query=("limit",)),
            Route("GET", f"{prefix}/events", Role.VIEWER,
                  "server-sent events: a snapshot, then every message the agent publishes",
                  "control", query=("topics",), content="text/event-stream"),
        ]  # fmt: skip
        for command in CommandName:
            table.append(
                Route(
                    "POST",
                    f"{prefix}/{command}",
                    command_role(command),
                    f"the bus's {command} command",
                    "commands",
                    body=COMMAND_MODELS[command],
                    answer=Reply[REPLY_DATA[command]],  # type: ignore[valid-type]
                    query=("wait",) if "wait" in COMMAND_MODELS[command].model_fields else (),
                    text_body=COMMAND_MODELS[command].main_argument is not None,
                )
            )
    return table


def _compat_routes() -> list[Route]:
    def read(path: str, summary: str, answer: Any = "object") -> Route:
        return Route("GET", path, Role.VIEWER, summary, "compatibility", answer=answer)

    def write(method: str, path: str, summary: str, role: Role = Role.OPERATOR) -> Route:
        body = None if method == "DELETE" or "switch" in path else "object"
        query = ("target_model",) if "switch" in path else ()
        return Route(method, path, role, summary, "compatibility", body, "object", query=query)

    return [
        read("/models/status", "the first orchestrator's VRAM totals and loaded models"),
        write("POST", "/models/load", "load {model, service, priority}; once loaded"),
        write("POST", "/models/unload", "unload {model, force}; once unloaded"),
        write("POST", "/ensure_model", "switch to {model}; once up", Role.USER),
        read("/status", "the dynamic orchestrator's current model, states, swap metrics"),
        read("/v1/models/status", "the smart-switching router's models and GPU memory"),
        write("POST", "/v1/models/switch", "the router's switch, ?target_model="),
        read("/weights", "the model manager's installed weights", WeightsState),
        read("/weights/usage", "storage use"),
        read("/weights/{name}/info", "one installed weights entry"),
        write("DELETE", "/weights/{name}", "uninstall"),
        write("POST", "/weights/install", "install {hfModelId, revision, files}: 202"),
        read("/weights/install/status/{job_id}", "an install's job", JobState),
        read("/jobs", "active and recent jobs", list[JobState]),
        read("/jobs/{job_id}", "one job", JobState),
        read("/history", "the newest 100 jobs", list[JobState]),
        read("/system/info", "the host, its GPUs and its disk"),
    ]


def openapi_path(path: str) -> str:
    """aiohttp's ``{path:.*}`` is OpenAPI's ``{path}``."""
    return _PARAMETER.sub(lambda m: "{" + m.group(1) + "}", path)


class _Schemas:
    """Types to JSON Schemas, each model once under components/schemas."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def of(self, kind: Any) -> dict[str, Any]:
        if kind == "object":
            return {"type": "object"}
        schema = TypeAdapter(kind).json_schema(ref_template=REF)
        self.components.update(schema.pop("$defs", {}))
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            name = re.sub(r"[^A-Za-z0-9._-]", "_", kind.__name__)
            self.components[name] = schema
            return {"$ref": REF.format(model=name)}
        return schema


def document() -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes():
        path = openapi_path(route.path)
        methods = (
            ["get", "post", "put", "patch", "delete"]
            if route.method == "*"
            else [route.method.lower()]
        )
        for method in methods:
            paths.setdefault(path, {})[method] = _operation(route, path, method, schemas)
    schemas.components["Error"] = {
        "type": "object",
        "description": "every error: error.code and error.message; a command's refusal is "
        "the bus's reply envelope, a compatibility route's has FastAPI's detail beside",
        "properties": {
            "error": {
                "type": "object",
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                "required": ["code", "message"],
            },
            "detail": {"type": "string"},
        },
        "required": ["error"],
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "modelbus agent",
            "version": __version__,
            "description": "The agent's HTTP server: the OpenAI-compatible gateway, the "
            "control API mirroring the bus, the original orchestrators' routes, metrics "
            "(docs/http.md, docs/gateway.md).",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


def _operation(route: Route, path: str, method: str, schemas: _Schemas) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": route.summary,
        "tags": [route.tag],
        "operationId": f"{method}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}",
        "x-modelbus-role": route.role.label if route.role is not None else "none",
        "security": [] if route.role is None else [{"bearer": []}, {"apiKey": []}],
    }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PARAMETER.findall(route.path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": name == "target_model",
         "description": QUERY[name], "schema": {"type": "string"}}
        for name in route.query
    ]  # fmt: skip
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None and method != "get":
        content: dict[str, Any] = {"application/json": {"schema": schemas.of(route.body)}}
        if route.text_body:
            content["text/plain"] = {"schema": {"type": "string", "description": "bare text"}}
        operation["requestBody"] = {"required": False, "content": content}
    elif route.content == "multipart/form-data":
        operation["requestBody"] = {"content": {route.content: {"schema": {"type": "object"}}}}
    answer: dict[str, Any] = {"description": route.summary}
    if route.answer is not None:
        answer["content"] = {"application/json": {"schema": schemas.of(route.answer)}}
    elif route.content != "multipart/form-data":
        answer["content"] = {route.content: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(route.status): answer}
    if route.tag == "commands":
        responses["202"] = {"description": "a job accepted: Location and job_url name it"}
    responses["default"] = {
        "description": "an error (docs/http.md, Errors)",
        "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
    }
    operation["responses"] = responses
    return operation


def docs_page(spec: dict[str, Any]) -> str:
    """``GET /docs``: every route and its role on one page, linking the document (the
    agent serves no script: an OpenAPI UI loads /openapi.json from here)."""
    rows = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            role = operation["x-modelbus-role"]
            rows.append(
                f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
                f"<td>{role}</td><td>{html.escape(operation['summary'])}</td></tr>"
            )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>modelbus agent API</title>"
        "</head><body><h1>modelbus agent API</h1><p>The OpenAPI 3.1 document: "
        "<a href='/openapi.json'>/openapi.json</a> (load it into any OpenAPI viewer).</p>"
        "<table><tr><th>method</th><th>route</th><th>role</th><th>what</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
