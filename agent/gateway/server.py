"""The agent's HTTP server (aiohttp): the OpenAI-compatible gateway. A request names a
catalog model (or an alias) in its JSON body; the gateway has it loaded through the
swap queue, waits its turn (``admission``) and forwards it (``proxy``). Every error is
an OpenAI-shaped body; every route needs a key with a role (``keys``)."""

from __future__ import annotations

import ipaddress
import json
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web

from agent.catalog import ModelSpec
from agent.config import HttpConfig, listen_address
from agent.gateway import errors, openapi
from agent.gateway.admission import Admission
from agent.gateway.compat import COMPAT_READ_ROUTES, CompatRoutes
from agent.gateway.control import HostView
from agent.gateway.control_api import ControlApi
from agent.gateway.forms import read_form
from agent.gateway.handlers import (
    CALLER,
    Handler,
    error_response,
    json_object,
    json_object_of,
    require,
)
from agent.gateway.keys import Caller, Keys, Role
from agent.gateway.openapi import docs_page
from agent.gateway.paths import FORM_ROUTES, INFERENCE_ROUTES, UPSTREAM_PATHS, UPSTREAM_ROUTE
from agent.gateway.proxy import Upstreams
from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics

log = logging.getLogger("modelbus.gateway")

# Where a gateway request keeps the catalog model it names ("" until one is found): the
# requests counted in the metrics are the ones that have it.
MODEL = "modelbus.model"
LOOPBACK_READER = Caller("loopback", Role.VIEWER)


class GatewayServer:
    def __init__(
        self,
        config: HttpConfig,
        lifecycle: Lifecycle,
        admission: Admission,
        metrics: AgentMetrics,
        view: HostView,
    ) -> None:
        self.config = config
        self._lifecycle = lifecycle
        self._admission = admission
        self._metrics = metrics
        self._view = view
        self._keys = Keys(config.api_keys)
        # Answered without a key: a liveness probe, and a scrape where so configured.
        self._open_paths = {"/healthz", "/health"} | (
            {"/metrics"} if config.metrics_open else set()
        )
        self._upstreams = Upstreams(connect_timeout_s=config.connect_timeout_s)
        self.port: int | None = None  # bound, once running (a port 0 in listen picks one)
        self._runner: web.AppRunner | None = None
        self._document: dict[str, Any] | None = None

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.max_body_mb * 1024 * 1024,
            middlewares=[self._counted, self._errors, self._auth],
        )
        for path in INFERENCE_ROUTES:
            app.router.add_post(path, self._inference)
        for path in FORM_ROUTES:
            app.router.add_post(path, self._form)
        app.router.add_route("*", UPSTREAM_ROUTE, self._upstream)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/health", self._healthz)
        app.router.add_get("/metrics", self._metrics_route)
        # The control API (docs/http.md), and the original orchestrators' routes; these
        # before /v1/models/{model}, which /v1/models/status would match.
        ControlApi(self._view, self._catalog_names).add_routes(app)
        CompatRoutes(
            self._view, self._catalog_names, self._resolve_name, self._metrics.swap_summary
        ).add_routes(app)
        app.router.add_get("/openapi.json", self._openapi)
        app.router.add_get("/openapi", self._openapi)  # the model manager's
        app.router.add_get("/docs", self._docs)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)
        return app

    async def start(self) -> None:
        """Listen; raises GatewayListenError with a sentence when the address is taken."""
        assert self.config.listen is not None
        host, port = listen_address(self.config.listen)
        await self._upstreams.start()
        # handler_cancellation: a client that disconnects cancels its handler, and so
        # its upstream request or its place in a queue.
        # A short shutdown: requests still running when the agent stops see their
        # connection close (the agent's own shutdown must not wait on a long stream).
        self._runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await self.close()
            raise errors.GatewayListenError(
                f"the gateway cannot listen on {self.config.listen} ({exc.strerror or exc}): "
                "set http.listen (or --http-listen) to a free address, or 'off'"
            ) from None
        self.port = self._runner.addresses[0][1] if self._runner.addresses else port
        log.info("gateway listening on http://%s:%d", host, self.port)

    async def serve(self) -> None:
        """Serve (and queue the switches requests ask for) until cancelled, then close
        every connection."""
        try:
            await self._admission.switches.run()
        finally:
            await self.close()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._upstreams.close()

    # ---- middleware ------------------------------------------------------

    @web.middleware
    async def _counted(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Counts each gateway request by its model and the status it was answered with."""
        response = await handler(request)
        model = request.get(MODEL)
        if model is not None:
            self._metrics.request_answered(model, response.status)
        return response

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except errors.GatewayError as error:
            return error_response(error)
        except web.HTTPRequestEntityTooLarge:
            return error_response(errors.payload_too_large(self.config.max_body_mb << 20))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(
                errors.GatewayError(HTTPStatus(exc.status), exc.reason, "http_error")
            )
        except Exception:  # one request must never take the gateway down
            log.exception("%s %s failed", request.method, request.path)
            return error_response(
                errors.GatewayError(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    "the gateway failed on this request; see the agent's log",
                    "internal",
                    kind="server_error",
                )
            )

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in self._open_paths:
            return await handler(request)
        caller = self._keys.caller(request.headers)
        if caller is None and self._open_to_loopback(request):
            caller = LOOPBACK_READER
        if caller is None:
            raise errors.unauthorized(
                "a valid API key is needed: Authorization: Bearer <key> or X-API-Key: <key>"
            )
        request[CALLER] = caller
        return await handler(request)

    def _open_to_loopback(self, request: web.Request) -> bool:
        """http.compat_open_read: the original routes' reads need no key from this machine
        (the first orchestrator's scripts sent none)."""
        if not self.config.compat_open_read or request.method != "GET":
            return False
        route = request.match_info.route.resource
        return route is not None and route.canonical in COMPAT_READ_ROUTES and _loopback(request)

    # ---- routes ----------------------------------------------------------

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        require(request, Role.USER)
        request[MODEL] = ""
        body = await request.read()
        requested, fields = _model_of(body)
        spec = self._resolve(requested, request)
        if spec.upstream_model is not None and spec.upstream_model != requested:
            body = json.dumps({**fields, "model": spec.upstream_model}).encode()
        # The dynamic orchestrator's /chat/completions is the model server's /v1/...
        renamed = UPSTREAM_PATHS.get(request.path)
        query = request.rel_url.raw_query_string
        path = renamed + (f"?{query}" if query else "") if renamed else None
        async with self._admission.admit(spec):
            return await self._upstreams.forward(request, spec, body, path=path)

    async def _form(self, request: web.Request) -> web.StreamResponse:
        require(request, Role.USER)
        request[MODEL] = ""
        with await read_form(request, self.config.max_body_mb << 20) as form:
            spec = self._resolve(form.model, request)
            async with self._admission.admit(spec):
                return await self._upstreams.forward(
                    request, spec, form.upstream(spec.upstream_model)
                )

    async def _upstream(self, request: web.Request) -> web.StreamResponse:
        """The model's own API (WhisperX's REST, a video model's), loaded first: method,
        path, query, headers and body as they came."""
        require(request, Role.USER)
        request[MODEL] = ""
        spec = self._resolve(request.match_info["model"], request)
        path = "/" + request.match_info["path"]
        if request.query_string:
            path += "?" + request.query_string
        async with self._admission.admit(spec):
            body = request.content if request.body_exists else b""
            return await self._upstreams.forward(request, spec, body, path=path)

    async def _models(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        catalog = self._lifecycle.catalog
        data = [self._describe(catalog.models[name]) for name in catalog.names()]
        return web.json_response({"object": "list", "data": data})

    async def _model(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        return web.json_response(self._describe(self._resolve(request.match_info["model"])))

    async def _openapi(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        return json_object(self._openapi_document())

    async def _docs(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        return web.Response(text=docs_page(self._openapi_document()), content_type="text/html")

    def _openapi_document(self) -> dict[str, Any]:
        if self._document is None:
            self._document = openapi.document()  # built once: it takes ~0.1 s
        return self._document

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _metrics_route(self, request: web.Request) -> web.Response:
        if not self.config.metrics_open:
            require(request, Role.VIEWER)
        body, content_type = self._metrics.exposition(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _resolve_name(self, requested: str) -> str | None:
        spec = self._lifecycle.catalog.resolve(requested)
        return spec.name if spec is not None else None

    def _catalog_names(self) -> list[str]:
        return self._lifecycle.catalog.names()

    def _resolve(self, requested: str, counted: web.Request | None = None) -> ModelSpec:
        """The catalog model ``requested`` names; a request being ``counted`` is counted
        under it."""
        spec = self._lifecycle.catalog.resolve(requested)
        if spec is None:
            raise errors.unknown_model(requested, self._lifecycle.catalog.names())
        if counted is not None:
            counted[MODEL] = spec.name
        return spec

    def _describe(self, spec: ModelSpec) -> dict[str, Any]:
        record = self._lifecycle.models.get(spec.name)
        loaded_at = record.loaded_at if record is not None else None
        return {
            "id": spec.name,
            "object": "model",
            "created": int(loaded_at or 0),
            "owned_by": "modelbus",
            "aliases": list(spec.aliases),
            "state": record.state.value if record is not None else "stopped",
            "in_flight": record.in_flight if record is not None else 0,
            "waiting": self._admission.waiting(spec.name),
            "description": spec.description,
        }


def _loopback(request: web.Request) -> bool:
    """A caller on this machine (IPv4-mapped addresses included, for a listen on [::])."""
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _model_of(body: bytes) -> tuple[str, dict[str, Any]]:
    """The ``model`` a JSON body names, and the body's fields."""
    fields = json_object_of(body)
    model = fields.get("model")
    if not isinstance(model, str) or not model.strip():
        raise errors.bad_request("the body names no 'model'", param="model")
    return model, fields
