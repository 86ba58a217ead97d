from __future__ import annotations

import random

from bus.reconnecting import Backoff


def test_backoff_grows_and_is_capped() -> None:
    backoff = Backoff(0.5, 8.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(10)]
    ceilings = [min(8.0, 0.5 * 2**i) for i in range(10)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 8.0
    backoff.reset()
    assert backoff.next_delay() <= 0.5
