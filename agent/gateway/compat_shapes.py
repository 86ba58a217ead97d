"""The original orchestrators' response shapes (``../shared/HTTP-COMPAT.md``), built from
the contract's models. Pure: the compatibility routes (``compat``) serve what these build."""

from __future__ import annotations

from typing import Any

from shared.messages import (
    HostState,
    JobState,
    Loaded,
    ModelLifecycle,
    ModelState,
    WeightsState,
)
from shared.replies import PlanFits, PlanRefused

MIB_PER_GB = 1024
# The smart-switching router's words for a model's state.
ROUTER_STATUS = {
    ModelLifecycle.STOPPED: "stopped",
    ModelLifecycle.LOADING: "loading",
    ModelLifecycle.READY: "running",
    ModelLifecycle.UNLOADING: "stopping",
    ModelLifecycle.ERROR: "error",
    ModelLifecycle.CRASHED: "error",
}


def gb(mib: int | None) -> float | None:
    return None if mib is None else round(mib / MIB_PER_GB, 2)


def compat_error(message: str, code: str) -> dict[str, Any]:
    """FastAPI's ``detail`` (what the originals answered), beside modelbus's ``error``."""
    return {"detail": message, "error": {"code": code, "message": message}}


def router_models_status(
    models: list[ModelState], state: HostState | None, weights: WeightsState | None
) -> dict[str, Any]:
    """``GET /v1/models/status``: every catalog model, and the GPUs' memory in GB."""
    downloaded: dict[str, int] = {}
    for installed in weights.weights if weights is not None else []:
        for user in installed.used_by:
            downloaded[user] = downloaded.get(user, 0) + installed.size_mb
    described: dict[str, Any] = {}
    for model in models:
        entry: dict[str, Any] = {
            "status": ROUTER_STATUS.get(model.state, model.state.value),
            "size_gb": gb(model.vram_estimate_mb),
            "description": model.description,
            "estimated_load_time_seconds": model.last_load_s,
            "downloaded_size": gb(downloaded.get(model.name)),
        }
        if model.state == ModelLifecycle.READY:
            entry["gpu_memory_used_gb"] = gb(model.vram_used_mb)
            entry["health"] = model.health or "healthy"
        described[model.name] = entry
    memory = {
        "total_gb": gb(state.total_mb) if state else None,
        "used_gb": gb(state.used_mb) if state else None,
        "available_gb": gb(state.free_mb) if state else None,
    }
    return {"models": described, "gpu": memory}


def switch_refused(refusal: PlanRefused) -> dict[str, Any]:
    """``POST /v1/models/switch`` when not enough can be freed."""
    return {
        "status": "error",
        "error": "insufficient_memory",
        "message": refusal.message,
        "required_gb": gb(refusal.required_mb),
        "available_gb": gb(refusal.available_mb),
        "freed_gb": gb(refusal.evictable_mb),
        "total_available_gb": gb(refusal.available_mb + refusal.evictable_mb),
    }


def switch_done(plan: PlanFits, job: JobState) -> dict[str, Any]:
    """``POST /v1/models/switch`` once the switch succeeded."""
    loaded = job.result if isinstance(job.result, Loaded) else None
    return {
        "status": "success",
        "model": plan.model,
        "unloaded_models": list(loaded.evicted if loaded else plan.evict),
        "start_result": job.model_dump(mode="json", exclude_none=True),
        "estimated_load_time_seconds": loaded.load_s if loaded else None,
        "memory_info": {
            "required_gb": gb(plan.required_mb),
            "available_before_gb": gb(sum(plan.free_before_mb.values())),
            "freed_gb": gb(sum(plan.freed_mb.values())),
        },
    }


def orchestrator_status(
    models: list[ModelState], state: HostState | None, swaps: dict[str, Any]
) -> dict[str, Any]:
    """The dynamic orchestrator's ``GET /status``: the current model (the one most recently
    loaded of those ready), every model's state, the queue, and swap metrics."""
    ready = [model for model in models if model.state == ModelLifecycle.READY]
    ready.sort(key=lambda model: model.loaded_at.timestamp() if model.loaded_at else 0.0)
    busy = any(
        model.state in (ModelLifecycle.LOADING, ModelLifecycle.UNLOADING) for model in models
    )
    return {
        "current_model": ready[-1].name if ready else None,
        "loaded_models": [model.name for model in ready],
        "state": "swapping" if busy else ("ready" if ready else "idle"),
        "models": {model.name: model.state.value for model in models},
        "queue_length": state.queue_length if state else 0,
        "active_job": state.active_job if state else None,
        "metrics": swaps,
    }


def weights_usage(weights: WeightsState) -> dict[str, Any]:
    """The model manager's ``GET /weights/usage``."""
    return {
        "weights_dir": weights.weights_dir,
        "used_mb": weights.used_mb,
        "disk_total_mb": weights.disk_total_mb,
        "disk_free_mb": weights.disk_free_mb,
        "weights": {installed.name: installed.size_mb for installed in weights.weights},
        "partial": {partial.name: partial.size_mb for partial in weights.partial},
    }
