"""The gateway's batching policy (agent/gateway/batching.py), and a seeded trace
replayed through it: fewer swaps than arrival order, no group past its deadline."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.gateway.batching import START_MARGIN_S, Group, Use, decide, latest_start

IDLE = Use(active=0, last_request=None)


def group(model: str, oldest: float, evicts: set[str] | None, swap_s: float = 1.0) -> Group:
    return Group(model, oldest, swap_s, None if evicts is None else frozenset(evicts))


def test_a_switch_that_evicts_nothing_is_queued_at_once() -> None:
    decision = decide(
        [group("b", 0.0, set())],
        {"a": Use(3, 0.0)},
        now=0.0,
        max_wait_s=10,
        idle_after_s=2,
        switching=False,
    )
    assert decision.release == ("b",)


def test_nothing_is_queued_behind_a_job_and_it_is_decided_again_when_that_ends() -> None:
    # c seems to fit beside b, but b's load is still starting and holds nothing yet.
    decision = decide(
        [group("c", 0.0, set()), group("d", 0.0, {"b"})],
        {},
        now=100.0,
        max_wait_s=10,
        idle_after_s=2,
        switching=True,
    )
    assert decision == type(decision)((), None)


def test_a_switch_that_cannot_fit_is_queued_at_once_to_fail_with_its_reason() -> None:
    decision = decide(
        [group("b", 0.0, None)], {}, now=0.0, max_wait_s=10, idle_after_s=2, switching=False
    )
    assert decision.release == ("b",)


def test_a_switch_that_evicts_only_idle_models_is_queued_at_once() -> None:
    decision = decide(
        [group("b", 5.0, {"a"})],
        {"a": Use(0, 1.0)},
        now=5.0,
        max_wait_s=10,
        idle_after_s=2,
        switching=False,
    )
    assert decision.release == ("b",)


def test_a_model_in_use_keeps_its_batch_until_the_deadline() -> None:
    waiting = [group("b", 0.0, {"a"})]
    busy = {"a": Use(1, 0.0)}
    early = decide(waiting, busy, now=3.0, max_wait_s=10, idle_after_s=2, switching=False)
    assert early.release == ()
    assert early.wake_at == 10.0 - START_MARGIN_S
    due = decide(waiting, busy, now=10.0, max_wait_s=10, idle_after_s=2, switching=False)
    assert due.release == ("b",)


def test_a_model_used_a_moment_ago_counts_as_in_use_until_idle_after_s() -> None:
    waiting = [group("b", 0.0, {"a"})]
    recent = {"a": Use(0, 4.0)}
    decision = decide(waiting, recent, now=5.0, max_wait_s=10, idle_after_s=2, switching=False)
    assert decision.release == ()
    assert decision.wake_at == 6.0  # when a turns idle, before b's deadline
    later = decide(waiting, recent, now=6.0, max_wait_s=10, idle_after_s=2, switching=False)
    assert later.release == ("b",)


def test_only_one_evicting_switch_is_queued_at_a_time() -> None:
    waiting = [group("b", 0.0, {"a"}), group("c", 1.0, {"a"})]
    decision = decide(
        waiting, {"a": Use(0, None)}, now=20, max_wait_s=10, idle_after_s=2, switching=False
    )
    assert decision.release == ("b",)
    while_switching = decide(
        [group("c", 1.0, {"b"})], {}, now=20, max_wait_s=10, idle_after_s=2, switching=True
    )
    assert while_switching == type(while_switching)((), None)


def test_the_first_deadline_starts_early_enough_for_the_next() -> None:
    # c's deadline is 11; b's switch (4 s) must start by 7 for c to start by 11, and
    # each switch is aimed START_MARGIN_S early.
    waiting = [group("b", 0.0, {"a"}, swap_s=4.0), group("c", 1.0, {"a"}, swap_s=4.0)]
    start_by = 7.0 - 2 * START_MARGIN_S
    assert latest_start(waiting, 10) == pytest.approx(start_by)
    busy = {"a": Use(2, 6.0)}
    early = decide(
        waiting, busy, now=start_by - 0.01, max_wait_s=10, idle_after_s=2, switching=False
    )
    assert early.release == () and early.wake_at == pytest.approx(start_by)
    now = latest_start(waiting, 10)
    due = decide(waiting, busy, now=now, max_wait_s=10, idle_after_s=2, switching=False)
    assert due.release == ("b",)


def test_max_wait_zero_is_arrival_order() -> None:
    waiting = [group("c", 2.0, {"a"}), group("b", 1.0, {"a"})]
    decision = decide(
        waiting, {"a": Use(5, 2.0)}, now=2.0, max_wait_s=0, idle_after_s=2, switching=True
    )
    assert decision.release == ("b", "c")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("bcd"), st.floats(0, 50), st.booleans(), st.floats(0.1, 5)),
        min_size=1,
        max_size=3,
        unique_by=lambda entry: entry[0],
    ),
    st.floats(0, 100),
    st.floats(0.5, 30),
    st.booleans(),
)
def test_no_group_is_held_past_its_deadline_unless_a_job_is_running(
    entries: list[tuple[str, float, bool, float]], now: float, max_wait_s: float, switching: bool
) -> None:
    waiting = [
        group(model, oldest, {"a"} if evicting else set(), swap_s)
        for model, oldest, evicting, swap_s in entries
    ]
    decision = decide(
        waiting,
        {"a": Use(1, now)},
        now=now,
        max_wait_s=max_wait_s,
        idle_after_s=2,
        switching=switching,
    )
    if switching:
        assert decision.release == () and decision.wake_at is None
        return
    for entry in waiting:
        if not entry.evicts:
            assert entry.model in decision.release
    contested = sorted((g for g in waiting if g.evicts), key=lambda g: g.oldest)
    if contested and not switching:
        overdue = now >= contested[0].oldest + max_wait_s
        assert (contested[0].model in decision.release) == (
            now >= latest_start(contested, max_wait_s)
        )
        if overdue:
            assert contested[0].model in decision.release
    if decision.wake_at is not None:
        assert decision.wake_at > now
    assert len(
        [m for m in decision.release if any(g.model == m and g.evicts for g in waiting)]
    ) <= (0 if switching else 1)


# ---- a seeded trace through the policy ---------------------------------------


@dataclass
class Simulation:
    """One GPU that holds one of three models; requests of 0.2 s each; a swap of 1 s."""

    max_wait_s: float
    loaded: str | None = None
    swapping: tuple[str, float] | None = None  # the target and when its swap ends
    waiting: dict[str, list[float]] = field(default_factory=dict)
    in_flight: list[tuple[str, float]] = field(default_factory=list)  # model, ends at
    last_request: dict[str, float] = field(default_factory=dict)
    swaps: int = 0
    waits: list[float] = field(default_factory=list)

    def step(self, now: float) -> None:
        self.in_flight = [(m, end) for m, end in self.in_flight if end > now]
        if self.swapping and self.swapping[1] <= now:
            self.loaded, self.swapping = self.swapping[0], None
        if self.loaded and self.loaded in self.waiting and not self.swapping:
            for arrival in self.waiting.pop(self.loaded):
                self._serve(self.loaded, arrival, now)
        if self.swapping:
            return
        groups = [
            group(m, arrivals[0], {self.loaded} if self.loaded else set())
            for m, arrivals in self.waiting.items()
        ]
        use = {}
        if self.loaded:
            active = sum(1 for m, _ in self.in_flight if m == self.loaded)
            use[self.loaded] = Use(active, self.last_request.get(self.loaded))
        decision = decide(
            groups, use, now=now, max_wait_s=self.max_wait_s, idle_after_s=2.0, switching=False
        )
        if decision.release:
            target = decision.release[0]
            drained = max([end for m, end in self.in_flight if m == self.loaded], default=now)
            self.swapping = (target, drained + 1.0)
            self.swaps += 1

    def arrive(self, model: str, now: float) -> None:
        if model == self.loaded and not self.swapping:
            self._serve(model, now, now)
        else:
            self.waiting.setdefault(model, []).append(now)

    def _serve(self, model: str, arrival: float, now: float) -> None:
        self.waits.append(now - arrival)
        self.in_flight.append((model, now + 0.2))
        self.last_request[model] = now


def replay(max_wait_s: float, seed: int = 7) -> Simulation:
    rng = random.Random(seed)
    arrivals = []
    at = 0.0
    for _ in range(200):
        at += rng.expovariate(4.0)  # four requests a second, interleaved over three models
        arrivals.append((at, rng.choice("abc")))
    simulation = Simulation(max_wait_s)
    now, tick = 0.0, 0.01
    pending = list(arrivals)
    while pending or simulation.waiting or simulation.swapping:
        while pending and pending[0][0] <= now:
            simulation.arrive(pending.pop(0)[1], now)
        simulation.step(now)
        now += tick
        assert now < 10_000
    return simulation


def test_a_seeded_trace_swaps_at_most_half_as_often_as_arrival_order() -> None:
    arrival_order = replay(max_wait_s=0)
    batched = replay(max_wait_s=5)
    assert batched.swaps <= arrival_order.swaps / 2, (batched.swaps, arrival_order.swaps)
    # One swap is 1 s plus the drain of 0.2 s requests; a tick of slack.
    assert max(batched.waits) <= 5 + 1.2 + 0.02, max(batched.waits)
