"""The original orchestrators' routes, as compatibility aliases (``../shared/HTTP-COMPAT.md``,
docs/http.md): a script written against one of them works unchanged, given a key. Each
route runs the bus command it stands for (``HostView.call``), so roles, errors and jobs are
the control API's; the answer is in the original's shape (``compat_shapes``), an error
with FastAPI's ``detail`` beside modelbus's ``error``."""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from agent.gateway import errors
from agent.gateway.compat_shapes import (
    compat_error,
    orchestrator_status,
    router_models_status,
    switch_done,
    switch_refused,
    weights_usage,
)
from agent.gateway.control import HostView, job_or_404, models_status, weights_or_busy
from agent.gateway.handlers import (
    Handler,
    json_fields,
    json_list,
    json_model,
    json_object,
    require,
)
from agent.gateway.keys import Role
from agent.intake import local_intake
from shared.commands import MAX_COMMAND_BYTES
from shared.messages import InstalledWeights, JobState, PartialWeights, Reply, WeightsState
from shared.replies import JobAccepted, JobOutcome, PlanFits, PlanRefused, Uninstalled
from shared.topics import CommandName

# The read routes that http.compat_open_read leaves open to loopback callers (the first
# orchestrator's scripts sent no key).
COMPAT_READ_ROUTES = frozenset(
    {
        "/models/status",
        "/v1/models/status",
        "/status",
        "/weights",
        "/weights/usage",
        "/weights/{name}/info",
        "/weights/install/status/{job_id}",
        "/jobs",
        "/jobs/{job_id}",
        "/history",
        "/system/info",
        "/openapi",
        "/openapi.json",
        "/docs",
    }
)


class CompatRoutes:
    def __init__(
        self,
        view: HostView,
        catalog_names: Callable[[], list[str]],
        resolve: Callable[[str], str | None],
        swaps: Callable[[], dict[str, Any]],
    ) -> None:
        self._view = view
        self._catalog_names = catalog_names
        self._resolve = resolve  # a model's name from its name or an alias
        self._swaps = swaps

    def add_routes(self, app: web.Application) -> None:
        routes = [
            # The model orchestrator's (its n8n pattern: status, load, the model, unload).
            ("GET", "/models/status", self._models_status),
            ("POST", "/models/load", self._load),
            ("POST", "/models/unload", self._unload),
            # The dynamic orchestrator's (its /chat/completions is the gateway's).
            ("POST", "/ensure_model", self._ensure_model),
            ("GET", "/status", self._status),
            # The smart-switching router's: before /v1/models/{id}, which they would match.
            ("GET", "/v1/models/status", self._router_status),
            ("POST", "/v1/models/switch", self._router_switch),
            # The model manager's.
            ("GET", "/weights", self._weights),
            ("GET", "/weights/usage", self._weights_usage),
            ("GET", "/weights/{name}/info", self._weights_info),
            ("DELETE", "/weights/{name}", self._weights_delete),
            ("POST", "/weights/install", self._weights_install),
            ("GET", "/weights/install/status/{job_id}", self._job),
            ("GET", "/jobs", self._jobs),
            ("GET", "/jobs/{job_id}", self._job),
            ("GET", "/history", self._history),
            ("GET", "/system/info", self._system_info),
        ]
        router = app.router
        add = {"GET": router.add_get, "POST": router.add_post, "DELETE": router.add_delete}
        for method, path, handler in routes:
            add[method](path, _detailed(handler))

    async def _command(
        self, command: CommandName, fields: dict[str, Any], *, wait: bool | None = None
    ) -> Reply[Any]:
        return await self._view.call(local_intake(command, json.dumps(fields).encode(), wait=wait))

    # ---- the model orchestrator ------------------------------------------------

    async def _models_status(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        return json_object(models_status(self._view.state()))

    async def _load(self, request: web.Request) -> web.Response:
        """Body ``{"model", "service", "priority"}`` (``service`` is the catalog's to say):
        answered once loaded, with the model's entry."""
        require(request, Role.OPERATOR)
        fields = await _body(request)
        model = _model_named(fields)
        command = {"model": model} | (
            {"priority": fields["priority"]} if "priority" in fields else {}
        )
        reply = await self._command(CommandName.LOAD, command, wait=True)
        job = _waited(reply)
        if job is None:
            return _refused(reply)
        result = job.result
        return json_object(
            {
                "model": model,
                "service": getattr(result, "service", None),
                "loaded_at": job.finished_at.isoformat() if job.finished_at else None,
                "status": "loaded",
            }
        )

    async def _unload(self, request: web.Request) -> web.Response:
        """Body ``{"model", "force"}``: answered once unloaded."""
        require(request, Role.OPERATOR)
        fields = await _body(request)
        model = _model_named(fields)
        command = {"model": model} | ({"force": fields["force"]} if "force" in fields else {})
        service = self._service_of(model)
        reply = await self._command(CommandName.UNLOAD, command, wait=True)
        job = _waited(reply)
        if job is None:
            return _refused(reply)
        freed = getattr(job.result, "freed_mb", 0)
        return json_object(
            {
                "status": "unload_requested",
                "model": model,
                "service": service,
                "note": f"unloaded by job {job.job_id}; {freed} MiB freed",
            }
        )

    def _service_of(self, model: str) -> str | None:
        entry = self._view.state()
        loaded = entry.loaded_models.get(model) if entry is not None else None
        return loaded.service if loaded is not None else None

    # ---- the dynamic orchestrator ----------------------------------------------

    async def _ensure_model(self, request: web.Request) -> web.Response:
        """Body ``{"model"}``: make it loaded (a switch, evicting only what it must),
        answered once it is. A user's, as a gateway request that loads its model is."""
        require(request, Role.USER)
        model = _model_named(await _body(request))
        reply = await self._command(CommandName.SWITCH, {"model": model}, wait=True)
        job = _waited(reply)
        if job is None:
            return _refused(reply)
        evicted = getattr(job.result, "evicted", [])
        return json_object(
            {"status": "ready", "model": model, "evicted": evicted, "job_id": job.job_id}
        )

    async def _status(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        status = self._view.status()
        return json_object(orchestrator_status(status.models, status.state, self._swaps()))

    # ---- the smart-switching router --------------------------------------------

    async def _router_status(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        status = self._view.status()
        return json_object(router_models_status(status.models, status.state, status.weights))

    async def _router_switch(self, request: web.Request) -> web.Response:
        """``?target_model=<name>``: already loaded, refused for memory, or switched (and
        answered once the model is up)."""
        require(request, Role.OPERATOR)
        name = request.query.get("target_model", "").strip()
        if not name:
            return _compat_response(
                400, "give the model as ?target_model=<name>", "invalid_payload"
            )
        resolved = self._resolve(name)
        if resolved is None:
            names = ", ".join(self._catalog_names())
            message = f"model {name[:64]!r} not found; available models: {names}"
            return _compat_response(404, message, "unknown_model")
        name = resolved
        planned = await self._command(CommandName.PLAN, {"model": name})
        plan = planned.data
        if isinstance(plan, PlanRefused):
            return json_object(switch_refused(plan), status=HTTPStatus.CONFLICT)
        if not isinstance(plan, PlanFits):
            return _refused(planned)
        if plan.already_loaded:
            return json_object(
                {"status": "already_loaded", "model": name, "message": f"{name} is running"}
            )
        reply = await self._command(CommandName.SWITCH, {"model": name}, wait=True)
        job = _waited(reply)
        if job is None:
            return _refused(reply, {"status": "error"})
        return json_object(switch_done(plan, job))

    # ---- the model manager ---------------------------------------------------

    async def _weights(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        return json_model(self._weights_state())

    async def _weights_usage(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        return json_object(weights_usage(self._weights_state()))

    async def _weights_info(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        name = request.match_info["name"]
        state = self._weights_state()
        found: InstalledWeights | PartialWeights | None = next(
            (entry for entry in state.weights if entry.name == name), None
        )
        if found is None:
            found = next((entry for entry in state.partial if entry.name == name), None)
        if found is not None:
            return json_model(found)
        return _compat_response(404, f"no weights named {name[:64]!r} are installed", "not_found")

    async def _weights_delete(self, request: web.Request) -> web.Response:
        require(request, Role.OPERATOR)
        reply = await self._command(CommandName.UNINSTALL, {"name": request.match_info["name"]})
        if not isinstance(reply.data, Uninstalled):
            return _refused(reply)
        return json_object({"status": "deleted", **reply.data.model_dump(mode="json")})

    async def _weights_install(self, request: web.Request) -> web.Response:
        """Body ``{"hfModelId", "revision", "files"}``: a 202 with the job to follow.
        A ``token`` is not taken: the agent downloads with its own (``weights.hf_token``)."""
        require(request, Role.OPERATOR)
        fields = await _body(request)
        repo = fields.get("hfModelId")
        if not isinstance(repo, str):
            return _compat_response(400, "the body names no 'hfModelId'", "invalid_payload")
        command: dict[str, Any] = {"repo": repo}
        if "revision" in fields:
            command["revision"] = fields["revision"]
        if "files" in fields:
            command["include"] = fields["files"]
        reply = await self._command(CommandName.INSTALL, command, wait=False)
        if not isinstance(reply.data, JobAccepted) or reply.job_id is None:
            return _refused(reply)
        answer: dict[str, Any] = {
            "job_id": reply.job_id,
            "status": reply.data.state.value,
            "status_url": f"/weights/install/status/{reply.job_id}",
        }
        if "token" in fields:
            answer["note"] = "the token was not used: the agent downloads with its own"
        return json_object(answer, status=HTTPStatus.ACCEPTED)

    async def _jobs(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        return json_list(self._view.status().jobs)

    async def _job(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        return json_model(await job_or_404(self._view, request.match_info["job_id"]))

    async def _history(self, request: web.Request) -> web.Response:
        """The newest 100 jobs (installs, loads, switches, unloads), newest first."""
        require(request, Role.VIEWER)
        return json_list(await self._view.history(100))

    async def _system_info(self, request: web.Request) -> web.Response:
        require(request, Role.VIEWER)
        status = self._view.status()
        weights = status.weights
        return json_object(
            {
                "host": status.info.model_dump(mode="json"),
                "gpus": [gpu.model_dump(mode="json") for gpu in status.gpus],
                "disk": weights_usage(weights) if weights is not None else None,
            }
        )

    def _weights_state(self) -> WeightsState:
        return weights_or_busy(self._view)


def _detailed(handler: Handler) -> Handler:
    """Every error the route raises after the key check answers FastAPI's ``detail``
    beside ``error``, as the routes' own refusals do."""

    async def answered(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except errors.GatewayError as error:
            return web.json_response(
                compat_error(error.message, error.code),
                status=int(error.status),
                headers=error.headers,
            )

    return answered


async def _body(request: web.Request) -> dict[str, Any]:
    return await json_fields(request, max_bytes=MAX_COMMAND_BYTES)


def _model_named(fields: dict[str, Any]) -> str:
    model = fields.get("model")
    if not isinstance(model, str) or not model.strip():
        raise errors.bad_request("the body names no 'model'", param="model")
    return model


def _waited(reply: Reply[Any]) -> JobState | None:
    """The job a waited-for command ended with, if it succeeded."""
    if reply.status == "ok" and isinstance(reply.data, JobOutcome):
        return reply.data.job
    return None


def _refused(reply: Reply[Any], extra: dict[str, Any] | None = None) -> web.Response:
    error = reply.error
    if error is None:  # an ok reply of a shape the route did not expect: a bug
        return _compat_response(500, "the agent answered unexpectedly; see its log", "internal")
    status = errors.COMMAND_STATUS.get(error.code, HTTPStatus.INTERNAL_SERVER_ERROR)
    body = compat_error(error.message, error.code.value) | (extra or {})
    if reply.job_id is not None:
        body["job_id"] = reply.job_id
    return json_object(body, status=status)


def _compat_response(status: int, message: str, code: str) -> web.Response:
    return json_object(compat_error(message, code), status=status)
