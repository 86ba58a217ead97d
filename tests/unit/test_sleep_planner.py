"""Which evicted models sleep and which stop (agent/sleep_planner.py): a table."""

from __future__ import annotations

import pytest

from agent.sleep_planner import Evicted, RestPlan, Sleeper, plan_rest


def ev(name: str, ram: int, used: float, *, sleeps: bool = True, **learned: float) -> Evicted:
    return Evicted(name, sleeps, ram, used, **learned)


@pytest.mark.parametrize(
    ("evicted", "sleepers", "budget", "leaving", "expected"),
    [
        # Room for it: it sleeps.
        ([ev("a", 10, 5)], [], 100, (), RestPlan(("a",), (), ())),
        # No sleep API: stopped.
        ([ev("a", 10, 5, sleeps=False)], [], 100, (), RestPlan((), ("a",), ())),
        # Bigger than the whole budget: stopped, nobody else is.
        ([ev("a", 200, 5)], [Sleeper("s", 50, 1)], 100, (), RestPlan((), ("a",), ())),
        # Room made by stopping the least recently used sleeper.
        (
            [ev("a", 60, 5)],
            [Sleeper("old", 50, 1), Sleeper("newer", 30, 2)],
            100,
            (),
            RestPlan(("a",), (), ("old",)),
        ),
        # Sleepers used more recently than it are never stopped for it.
        ([ev("a", 60, 1)], [Sleeper("recent", 50, 9)], 100, (), RestPlan((), ("a",), ())),
        # The sleeper being woken frees its RAM.
        ([ev("a", 60, 5)], [Sleeper("target", 50, 1)], 100, ("target",), RestPlan(("a",), (), ())),
        # Waking takes longer than loading: not worth it.
        ([ev("a", 10, 5, load_s=1.0, wake_s=2.0)], [], 100, (), RestPlan((), ("a",), ())),
        ([ev("a", 10, 5, load_s=9.0, wake_s=0.5)], [], 100, (), RestPlan(("a",), (), ())),
        # Two evicted: the first sleeps, the second does not fit beside it and is stopped
        # (the first, put to sleep by this swap, is not stopped for it).
        ([ev("a", 60, 5), ev("b", 60, 6)], [], 100, (), RestPlan(("a",), ("b",), ())),
        # Level 2 holds nothing: always fits.
        ([ev("a", 0, 5)], [Sleeper("s", 100, 1)], 100, (), RestPlan(("a",), (), ())),
    ],
)
def test_rest_plan(
    evicted: list[Evicted],
    sleepers: list[Sleeper],
    budget: int,
    leaving: tuple[str, ...],
    expected: RestPlan,
) -> None:
    assert plan_rest(evicted, sleepers, budget, leaving=leaving) == expected
