"""Which evicted models sleep and which stop, pure: no I/O, no asyncio.

A switch has chosen what to evict (planner.py); each of those can be stopped, or, when its
server can sleep, be put to sleep: its VRAM is freed all the same, but it holds host RAM
and comes back in its wake time instead of its load time. Three costs, then: VRAM (freed
either way), host RAM (a budget that sleeping models share) and the time to come back.

Rules, in order:
- A model sleeps only if it can (a sleep API, sleeping allowed) and waking is worth it:
  its learned wake time, where known, is shorter than its learned load time.
- It sleeps when its RAM fits the budget beside the models already asleep; when it does
  not, sleeping models are stopped to make room, least recently used first, but only
  models used longer ago than it (the model just evicted was in use more recently than any
  sleeper, so normally all may go). Sleepers the swap wakes or stops anyway free their RAM.
- If the room cannot be made, it is stopped, and no sleeper is stopped for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Evicted:
    """A model a swap evicts, in the order the planner stops them."""

    name: str
    can_sleep: bool
    ram_mb: int  # host RAM it would hold asleep
    last_used: float
    load_s: float | None = None  # learned
    wake_s: float | None = None  # learned


@dataclass(frozen=True, slots=True)
class Sleeper:
    """A model asleep now."""

    name: str
    ram_mb: int
    last_used: float


@dataclass(frozen=True, slots=True)
class RestPlan:
    sleep: tuple[str, ...]  # evicted models put to sleep
    stop: tuple[str, ...]  # evicted models stopped
    stop_sleepers: tuple[str, ...]  # models asleep now, stopped for the RAM (stop them first)


def plan_rest(
    evicted: Sequence[Evicted],
    sleepers: Sequence[Sleeper],
    ram_budget_mb: int,
    *,
    leaving: Sequence[str] = (),
) -> RestPlan:
    """Sleep or stop each of ``evicted``; ``leaving``: sleepers the swap wakes or stops
    anyway (their RAM comes back)."""
    asleep = sorted(
        (s for s in sleepers if s.name not in leaving), key=lambda s: (s.last_used, s.name)
    )
    held = sum(s.ram_mb for s in asleep)
    sleep: list[str] = []
    stop: list[str] = []
    stopped_sleepers: list[str] = []
    for model in evicted:
        if not _worth_sleeping(model) or model.ram_mb > ram_budget_mb:
            stop.append(model.name)
            continue
        older = [s for s in asleep if s.last_used <= model.last_used and s.name not in sleep]
        freeable = sum(s.ram_mb for s in older)
        if held + model.ram_mb - freeable > ram_budget_mb:
            stop.append(model.name)
            continue
        while held + model.ram_mb > ram_budget_mb:
            oldest = older.pop(0)
            asleep.remove(oldest)
            stopped_sleepers.append(oldest.name)
            held -= oldest.ram_mb
        sleep.append(model.name)
        held += model.ram_mb
        asleep.append(Sleeper(model.name, model.ram_mb, model.last_used))
        asleep.sort(key=lambda s: (s.last_used, s.name))
    return RestPlan(tuple(sleep), tuple(stop), tuple(stopped_sleepers))


def _worth_sleeping(model: Evicted) -> bool:
    if not model.can_sleep:
        return False
    if model.wake_s is not None and model.load_s is not None:
        return model.wake_s < model.load_s
    return True
