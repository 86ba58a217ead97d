"""The HTTP server's OpenAPI 3.1 document: valid, current in docs/schema, and naming exactly
the routes the server answers (the route table and the server cannot drift apart)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from openapi_spec_validator import validate

from agent.config import HttpConfig
from agent.gateway.openapi import docs_page, document, openapi_path
from agent.gateway.server import GatewayServer

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"get", "post", "put", "patch", "delete"}


def served_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the server's application registers."""
    stub = cast(Any, SimpleNamespace(swap_summary=dict))
    server = GatewayServer(HttpConfig(), stub, stub, stub, stub)
    routes = set()
    for route in server.app().router.routes():
        path = openapi_path(route.resource.canonical if route.resource else "")
        methods = METHODS if route.method == "*" else {route.method.lower()}
        routes |= {(method, path) for method in methods if method != "head"}
    return routes


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = document()
    validate(spec)
    assert spec["openapi"] == "3.1.0"
    switch = spec["paths"]["/api/v1/switch"]["post"]
    assert switch["x-modelbus-role"] == "operator"
    assert set(switch["requestBody"]["content"]) == {"application/json", "text/plain"}
    assert switch["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SwitchCommand"
    }
    assert "SwitchCommand" in spec["components"]["schemas"]
    assert spec["paths"]["/healthz"]["get"]["security"] == []


def test_the_document_names_every_route_the_server_answers_and_no_other() -> None:
    documented = {
        (method, path) for path, operations in document()["paths"].items() for method in operations
    }
    assert documented == served_routes()


def test_the_committed_document_is_current() -> None:
    committed = json.loads((ROOT / "docs/schema/openapi.json").read_text())
    assert committed == json.loads(json.dumps(document()))


def test_the_docs_page_lists_every_route_with_its_role() -> None:
    page = docs_page(document())
    assert "<code>/v1/models/switch</code></td><td>operator" in page
    assert "/openapi.json" in page and "&lt;" not in page.split("<table>")[0]
