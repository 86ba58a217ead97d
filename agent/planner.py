"""Where a model goes and what must make room for it, pure: no I/O, no asyncio.

Given the free memory measured on each GPU, the models loaded on the host and a
target model, the planner picks a placement for the target and the fewest, least
valuable models to stop first, or refuses with the numbers an operator needs.

Memory model (all MiB, all integers):
- The target needs ``ceil(vram_mb / len(placement))`` on each GPU of a placement.
- A resident uses ``vram_mb // len(gpus)`` on each of its GPUs; rounding down means
  the planner never counts on more memory coming back than the model really holds.
- A placement fits when, on each of its GPUs, ``free + freed - required >= headroom``.

Choices, in order:
- A target that is already resident needs nothing: an ``already_loaded`` plan,
  even with ``exclusive`` (a switch to the running model must not stop its neighbours).
- Evictable residents are taken lowest priority first, then least recently used,
  then largest, then by name, until the placement fits; then any that turned out
  unnecessary are handed back. Evictable means, in this precedence: never a pinned
  model, never a busy one, and only one whose priority is at most the target's
  unless ``force`` (which overrides priority, never pinned or busy).
- A resident that keeps its GPUs to itself (``exclusive``) must go from any placement
  it shares; one that may not be evicted rules that placement out.
- Among placements that fit: fewest evictions, then the least VRAM thrown away,
  then the caller's preference order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

INSUFFICIENT_VRAM = "insufficient_vram"


@dataclass(frozen=True, slots=True)
class GpuMemory:
    index: int
    total_mb: int
    free_mb: int  # measured now (NVML / simulator)


@dataclass(frozen=True, slots=True)
class Resident:
    """A model currently loaded (or loading) on this host."""

    name: str
    gpus: tuple[int, ...]  # it occupies vram_mb split evenly across these GPUs
    vram_mb: int  # measured use if known, else its estimate
    priority: int = 0  # higher = more important = evicted later
    pinned: bool = False  # never evicted
    last_used: float = 0.0  # time.time() of last use; older = evicted first among equals
    busy: bool = False  # requests in flight or a job on it right now: not evictable
    exclusive: bool = False  # keeps its GPUs to itself: nothing loads beside it


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    vram_mb: int  # learned use if known, else the estimate
    placements: tuple[tuple[int, ...], ...]  # candidate GPU sets, in preference order
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    gpus: tuple[int, ...]  # chosen placement
    evict: tuple[str, ...]  # in the order to stop them
    required_mb: int  # per GPU of the placement, rounded up; headroom not included
    free_before_mb: dict[int, int]  # per GPU of the placement
    freed_mb: dict[int, int]  # per GPU, by the evictions
    free_after_mb: dict[int, int]  # per GPU, after evictions and the load
    already_loaded: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str  # always "insufficient_vram"
    message: str  # one sentence for an operator
    required_mb: int  # per GPU, headroom not included (the message mentions it)
    available_mb: int  # on the tightest GPU of the closest placement: free now
    evictable_mb: int  # on that GPU: what evicting everything allowed would free
    gpus: tuple[int, ...]  # the placement that came closest


def plan_switch(
    gpus: Sequence[GpuMemory],
    residents: Sequence[Resident],
    target: Target,
    *,
    exclusive: bool = False,
    force: bool = False,
    headroom_mb: int = 0,
) -> Plan | Refusal:
    """Make ``target`` ready, evicting no more than it needs (or, when
    ``exclusive``, every evictable model on its GPUs); ``force`` may evict models of
    higher priority than the target."""
    mode = _Mode.EXCLUSIVE if exclusive else _Mode.MINIMAL
    return _plan(gpus, residents, target, mode, headroom_mb, force=force)


def plan_load(
    gpus: Sequence[GpuMemory],
    residents: Sequence[Resident],
    target: Target,
    *,
    headroom_mb: int = 0,
) -> Plan | Refusal:
    """Load ``target`` next to what is there, or refuse: a load never evicts."""
    return _plan(gpus, residents, target, _Mode.NO_EVICTION, headroom_mb)


# ---- internals -------------------------------------------------------------


class _Mode(Enum):
    MINIMAL = "free no more than needed"
    EXCLUSIVE = "evict everything evictable on the placement"
    NO_EVICTION = "fit as things are"


@dataclass(frozen=True, slots=True)
class _Fit:
    gpus: tuple[int, ...]
    evict: tuple[Resident, ...]
    preference: int

    def rank(self) -> tuple[int, int, int]:
        thrown_away_mb = sum(r.vram_mb for r in self.evict)
        return (len(self.evict), thrown_away_mb, self.preference)


@dataclass(frozen=True, slots=True)
class _Shortfall:
    """Why one placement cannot fit, told on its tightest GPU."""

    gpus: tuple[int, ...]
    gpu: int
    available_mb: int
    evictable_mb: int  # what this mode may evict there (0 for a load)
    switch_could_free_mb: int  # what a switch could evict there
    blockers: tuple[Resident, ...]  # pinned or busy residents on that GPU

    @property
    def best_case_mb(self) -> int:
        return self.available_mb + self.evictable_mb


def required_per_gpu_mb(vram_mb: int, placement: Sequence[int]) -> int:
    """The target's share on each GPU of ``placement``, rounded up so a split
    model never gets less than it needs."""
    return -(-vram_mb // max(len(placement), 1))


def resident_share_mb(resident: Resident) -> int:
    """What stopping ``resident`` frees on each of its GPUs, rounded down."""
    return resident.vram_mb // max(len(set(resident.gpus)), 1)


def _plan(
    gpus: Sequence[GpuMemory],
    residents: Sequence[Resident],
    target: Target,
    mode: _Mode,
    headroom_mb: int,
    *,
    force: bool = False,
) -> Plan | Refusal:
    free_mb = {g.index: g.free_mb for g in gpus}
    for resident in residents:
        if resident.name == target.name:
            return _already_loaded(resident, target, free_mb)

    evictable = sorted(
        (r for r in residents if _is_evictable(r, target, force=force)), key=_eviction_order
    )
    fits: list[_Fit] = []
    shortfalls: list[_Shortfall] = []
    invalid: list[tuple[int, ...]] = []
    for preference, placement in enumerate(target.placements):
        if not _is_valid(placement, free_mb):
            invalid.append(placement)
            continue
        required = required_per_gpu_mb(target.vram_mb, placement)
        candidates = [r for r in evictable if _touches(r, placement)]
        # Residents that keep their GPUs to themselves must make way, or nothing fits.
        must = [r for r in residents if r.exclusive and _touches(r, placement)]
        evict: tuple[Resident, ...] | None = None
        if all(r in candidates for r in must) and not (must and mode == _Mode.NO_EVICTION):
            evict = _choose_evictions(
                free_mb, placement, candidates, required, headroom_mb, mode, must=must
            )
        if evict is None:
            shortfalls.append(
                _shortfall(free_mb, residents, target, placement, candidates, mode, force=force)
            )
        else:
            fits.append(_Fit(placement, evict, preference))

    if fits:
        best = min(fits, key=_Fit.rank)
        return _make_plan(free_mb, target, best)
    if shortfalls:
        # Tell the operator about the placement that came closest; ties go to preference.
        closest = max(shortfalls, key=lambda s: s.best_case_mb)
        return _refuse_for_vram(gpus, target, closest, mode, headroom_mb)
    return _refuse_for_placement(free_mb, target, invalid)


def _is_valid(placement: tuple[int, ...], free_mb: dict[int, int]) -> bool:
    distinct = set(placement)
    return bool(placement) and len(distinct) == len(placement) and distinct <= free_mb.keys()


def _is_evictable(resident: Resident, target: Target, *, force: bool) -> bool:
    if resident.pinned or resident.busy or resident.name == target.name:
        return False
    return force or resident.priority <= target.priority


def _protects(resident: Resident, target: Target, *, force: bool) -> bool:
    """Whether ``resident`` keeps its memory from ``target`` by a rule, not by size."""
    if resident.name == target.name:
        return False
    return not _is_evictable(resident, target, force=force)


def _eviction_order(resident: Resident) -> tuple[int, float, int, str]:
    # Larger first among equals: one big model out beats two small ones out.
    return (resident.priority, resident.last_used, -resident.vram_mb, resident.name)


def _touches(resident: Resident, placement: Iterable[int]) -> bool:
    return not set(resident.gpus).isdisjoint(placement)


def _freed_mb(evict: Iterable[Resident], placement: Sequence[int]) -> dict[int, int]:
    freed = dict.fromkeys(placement, 0)
    for resident in evict:
        share = resident_share_mb(resident)
        for gpu in set(resident.gpus):
            if gpu in freed:
                freed[gpu] += share
    return freed


def _fits(
    free_mb: dict[int, int],
    placement: Sequence[int],
    evict: Iterable[Resident],
    required_mb: int,
    headroom_mb: int,
) -> bool:
    freed = _freed_mb(evict, placement)
    return all(free_mb[g] + freed[g] - required_mb >= headroom_mb for g in placement)


def _choose_evictions(
    free_mb: dict[int, int],
    placement: tuple[int, ...],
    candidates: list[Resident],
    required_mb: int,
    headroom_mb: int,
    mode: _Mode,
    *,
    must: Sequence[Resident] = (),
) -> tuple[Resident, ...] | None:
    """The residents to stop so ``placement`` fits, in stopping order, or None; those in
    ``must`` (all among ``candidates``) are stopped whatever the memory says."""

    def fits(evict: Iterable[Resident]) -> bool:
        return _fits(free_mb, placement, evict, required_mb, headroom_mb)

    if mode == _Mode.EXCLUSIVE:
        return tuple(candidates) if fits(candidates) else None
    chosen: list[Resident] = list(must)
    if fits(chosen):
        return tuple(chosen)
    if mode == _Mode.NO_EVICTION:
        return None

    for candidate in candidates:
        if candidate in must:
            continue
        chosen.append(candidate)
        if fits(chosen):
            break
    else:
        return None
    # The greedy pass may have taken small models that a later, larger one made
    # unnecessary; give back any whose absence still fits. Fit only improves with
    # more evictions, so each model kept here stays necessary in the final set.
    for candidate in reversed(chosen[:-1]):
        if candidate in must:
            continue
        without = [r for r in chosen if r is not candidate]
        if fits(without):
            chosen = without
    return tuple(chosen)


def _make_plan(free_mb: dict[int, int], target: Target, fit: _Fit) -> Plan:
    required = required_per_gpu_mb(target.vram_mb, fit.gpus)
    before = {g: free_mb[g] for g in fit.gpus}
    freed = _freed_mb(fit.evict, fit.gpus)
    after = {g: before[g] + freed[g] - required for g in fit.gpus}
    return Plan(
        gpus=fit.gpus,
        evict=tuple(r.name for r in fit.evict),
        required_mb=required,
        free_before_mb=before,
        freed_mb=freed,
        free_after_mb=after,
    )


def _already_loaded(resident: Resident, target: Target, free_mb: dict[int, int]) -> Plan:
    # Its memory is already in use and counted in the measured free: nothing changes.
    known = tuple(g for g in resident.gpus if g in free_mb)
    before = {g: free_mb[g] for g in known}
    return Plan(
        gpus=resident.gpus,
        evict=(),
        required_mb=required_per_gpu_mb(target.vram_mb, resident.gpus),
        free_before_mb=before,
        freed_mb=dict.fromkeys(known, 0),
        free_after_mb=dict(before),
        already_loaded=True,
    )


def _shortfall(
    free_mb: dict[int, int],
    residents: Sequence[Resident],
    target: Target,
    placement: tuple[int, ...],
    candidates: list[Resident],
    mode: _Mode,
    *,
    force: bool,
) -> _Shortfall:
    could_free = _freed_mb(candidates, placement)
    may_free = could_free if mode != _Mode.NO_EVICTION else dict.fromkeys(placement, 0)
    # The GPU with the least room decides (the requirement is the same on each);
    # the first one wins a tie.
    tightest = min(placement, key=lambda g: free_mb[g] + may_free[g])
    blockers = tuple(
        sorted(
            (r for r in residents if tightest in r.gpus and _protects(r, target, force=force)),
            key=lambda r: r.name,
        )
    )
    return _Shortfall(
        gpus=placement,
        gpu=tightest,
        available_mb=free_mb[tightest],
        evictable_mb=may_free[tightest],
        switch_could_free_mb=could_free[tightest],
        blockers=blockers,
    )


def _refuse_for_vram(
    gpus: Sequence[GpuMemory],
    target: Target,
    closest: _Shortfall,
    mode: _Mode,
    headroom_mb: int,
) -> Refusal:
    required = required_per_gpu_mb(target.vram_mb, closest.gpus)
    total_mb = {g.index: g.total_mb for g in gpus}[closest.gpu]
    plus_headroom = f" plus {headroom_mb} MiB headroom" if headroom_mb else ""
    if len(closest.gpus) == 1:
        need = f"{target.name} needs {required} MiB on GPU {closest.gpu}{plus_headroom}; "
        have = f"{closest.available_mb} MiB is free"
    else:
        on = _join(str(g) for g in closest.gpus)
        need = f"{target.name} needs {required} MiB on each of GPUs {on}{plus_headroom}; "
        have = f"GPU {closest.gpu} has {closest.available_mb} MiB free"

    if mode == _Mode.NO_EVICTION:
        if closest.switch_could_free_mb:
            why = f"a switch could free {closest.switch_could_free_mb} MiB more"
        else:
            why = "nothing there could be evicted either"
        message = f"{need}{have} and a load evicts nothing ({why})"
    else:
        if required + headroom_mb > total_mb:
            why = f"GPU {closest.gpu} has only {total_mb} MiB in all"
        elif closest.blockers:
            why = _blocker_reasons(closest.blockers, target)
        else:
            why = "the rest is held by processes that are not managed models"
        message = f"{need}{have} and evicting {closest.evictable_mb} MiB more is allowed ({why})"
    return Refusal(
        code=INSUFFICIENT_VRAM,
        message=message,
        required_mb=required,
        available_mb=closest.available_mb,
        evictable_mb=closest.evictable_mb,
        gpus=closest.gpus,
    )


def _refuse_for_placement(
    free_mb: dict[int, int], target: Target, placements: list[tuple[int, ...]]
) -> Refusal:
    placement = placements[0] if placements else ()
    host_gpus = _join(str(g) for g in sorted(free_mb)) or "none"
    if not placements:
        problem = "has no candidate GPUs"
    elif not placement:
        problem = "has an empty GPU placement"
    elif len(set(placement)) != len(placement):
        problem = f"names a GPU twice in placement {placement}"
    else:
        missing = [str(g) for g in placement if g not in free_mb]
        if len(missing) == 1:
            problem = f"asks for GPU {missing[0]}, which does not exist on this host"
        else:
            problem = f"asks for GPUs {_join(missing)}, which do not exist on this host"
    return Refusal(
        code=INSUFFICIENT_VRAM,
        message=f"{target.name} {problem} (GPUs here: {host_gpus})",
        required_mb=required_per_gpu_mb(target.vram_mb, placement),
        available_mb=0,
        evictable_mb=0,
        gpus=placement,
    )


def _blocker_reasons(blockers: Sequence[Resident], target: Target) -> str:
    """Why the models that protected the memory may not be evicted, in precedence order."""
    pinned = [r.name for r in blockers if r.pinned]
    busy = [r.name for r in blockers if r.busy and not r.pinned]
    higher = [f"{r.name} ({r.priority})" for r in blockers if not (r.pinned or r.busy)]
    reasons = []
    if pinned:
        reasons.append(f"{_join(pinned)} {'is' if len(pinned) == 1 else 'are'} pinned")
    if busy:
        reasons.append(f"{_join(busy)} {'is' if len(busy) == 1 else 'are'} busy")
    if higher:
        one = len(higher) == 1
        reasons.append(
            f"{_join(higher)} {'has' if one else 'have'} a higher priority than "
            f"{target.name} ({target.priority}); force: true evicts {'it' if one else 'them'}"
        )
    return "; ".join(reasons)


def _join(items: Iterable[str]) -> str:
    words = list(items)
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]
