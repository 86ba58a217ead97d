"""A GPU's memory as the bar draws it: whose each MiB is. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.messages import GpuState


@dataclass(frozen=True, slots=True)
class Segment:
    label: str
    mb: int
    # A model being stopped whose processes are gone: memory the driver has yet to return.
    stopping: bool = False


def vram_segments(gpu: GpuState, stopping: Mapping[str, int] | None = None) -> list[Segment]:
    """The GPU's memory as bar segments: one per model (by name), ``other``, ``free``.

    ``other`` is memory of processes no model owns plus used memory no process
    accounts for. The segments always add up to ``memory_total_mb`` (the last ones
    are cut if processes claim more than the total); a GPU without a known total,
    such as a lost one, has no segments. Empty segments are left out.
    """
    total = gpu.memory_total_mb
    if total is None or total <= 0:
        return []
    by_model: dict[str, int] = {}
    unowned = 0
    for proc in gpu.processes:
        mb = max(proc.used_mb or 0, 0)
        if proc.model is None:
            unowned += mb
        else:
            by_model[proc.model] = by_model.get(proc.model, 0) + mb
    in_processes = unowned + sum(by_model.values())
    if gpu.memory_used_mb is not None:
        used = gpu.memory_used_mb
    elif gpu.memory_free_mb is not None:
        used = total - gpu.memory_free_mb
    else:
        used = in_processes
    wanted = [Segment(name, by_model[name]) for name in sorted(by_model)]
    unexplained = max(used - in_processes, 0)
    # Memory no process holds any more is, up to what it held, the stopping model's.
    for name, held in sorted((stopping or {}).items()):
        if name in by_model:
            continue
        taken = min(held, unexplained)
        unexplained -= taken
        wanted.append(Segment(name, taken, stopping=True))
    wanted.append(Segment("other", unowned + unexplained))
    segments: list[Segment] = []
    left = total
    for seg in wanted:
        mb = min(seg.mb, left)
        if mb > 0:
            segments.append(Segment(seg.label, mb, seg.stopping))
            left -= mb
    if left > 0:
        segments.append(Segment("free", left))
    return segments
