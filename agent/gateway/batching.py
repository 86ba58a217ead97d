"""When a waiting request's switch may be queued: the gateway's batching policy, pure.

Requests for a model that is not loaded wait here before their switch is queued. A
switch that evicts nothing, or evicts only models nobody is using, is queued at once.
One that would evict a model in use (requests in flight or waiting for it, or one
within ``idle_after_s``) waits, so that the loaded model keeps answering its own
requests in one batch instead of swapping back and forth in arrival order (A B A A C
becomes A A A B C). No group waits past its deadline, its oldest request's arrival
plus ``max_wait_s``: the earliest deadline goes first (EDF), and early enough that
the swaps after it still meet theirs. Nothing is released while a job is queued or
running (one evicting switch at a time): the next is decided once it ended, on the
memory it left. ``max_wait_s`` 0 is arrival order: every switch is queued at once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# What a switch costs beyond its model's learned load time (deciding, queueing, stopping
# what it evicts): deadlines are aimed this much early, per switch.
START_MARGIN_S = 0.1


@dataclass(frozen=True)
class Group:
    """The requests waiting for one model's switch."""

    model: str
    oldest: float  # when its longest-waiting request arrived (monotonic seconds)
    swap_s: float  # how long its switch is expected to take (its learned load time)
    # What its switch would evict; None when it cannot fit at all (its switch fails
    # with the planner's reason, which is best told at once).
    evicts: frozenset[str] | None


@dataclass(frozen=True)
class Use:
    """How busy a loaded model is."""

    active: int  # requests in flight or waiting for it
    last_request: float | None  # monotonic seconds of its last request's start


@dataclass(frozen=True)
class Decision:
    release: tuple[str, ...]  # the models whose switch to queue now
    wake_at: float | None  # when to decide again at the latest (None: on a change)


def decide(
    groups: Sequence[Group],
    use: Mapping[str, Use],
    *,
    now: float,
    max_wait_s: float,
    idle_after_s: float,
    switching: bool,
) -> Decision:
    """Which groups' switches to queue now. ``switching``: a job that changes the GPU
    is queued or running already (an evicting switch waits for it to end)."""
    ordered = sorted(groups, key=lambda group: group.oldest)
    if max_wait_s <= 0:
        return Decision(tuple(group.model for group in ordered), None)
    if switching:
        # The swap queue runs one job at a time, so nothing is gained by queueing behind
        # it, and what fits is best judged on what that job leaves (a model it is still
        # starting holds no memory yet). Decided again when it ended.
        return Decision((), None)
    release: list[str] = []
    contested: list[Group] = []
    wakes: list[float] = []
    for group in ordered:
        if not group.evicts:
            release.append(group.model)  # fits beside what runs, or never fits
            continue
        if switching:
            contested.append(group)  # one evicting switch at a time
            continue
        busy_until = _busy_until(group.evicts, use, now, idle_after_s)
        if busy_until is None:
            release.append(group.model)  # evicts only what nobody uses
            switching = True
        else:
            contested.append(group)
            wakes.append(busy_until)  # inf while a request is active: a change wakes us
    if contested and not switching:
        start_by = latest_start(contested, max_wait_s)
        if now >= start_by:
            release.append(contested[0].model)
        else:
            wakes.append(start_by)
    finite = [at for at in wakes if at != float("inf")]
    return Decision(tuple(release), min(finite) if finite and not switching else None)


def latest_start(contested: Sequence[Group], max_wait_s: float) -> float:
    """The latest moment the first group's switch may be queued so that it and each
    group after it (in deadline order, one swap each) start by their deadlines, with
    ``START_MARGIN_S`` to spare per switch."""
    latest = float("inf")
    ahead = START_MARGIN_S  # the time from queueing the first switch to this group's start
    for group in contested:
        latest = min(latest, group.oldest + max_wait_s - ahead)
        ahead += group.swap_s + START_MARGIN_S
    return latest


def _busy_until(
    names: frozenset[str], use: Mapping[str, Use], now: float, idle_after_s: float
) -> float | None:
    """When the last of ``names`` turns idle if no request comes: None when all are idle
    now, infinity while one has a request in flight or waiting."""
    until: float | None = None
    for name in names:
        entry = use.get(name)
        if entry is None:
            continue
        if entry.active:
            return float("inf")
        if entry.last_request is not None and now - entry.last_request < idle_after_s:
            idle_at = entry.last_request + idle_after_s
            until = idle_at if until is None else max(until, idle_at)
    return until
