from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.alerts import AlertChange, AlertsConfig, AlertTracker, to_event
from shared.commands import describe_validation_error
from shared.messages import GpuState, Severity

TS = datetime(2026, 1, 1, tzinfo=UTC)


def gpu(index: int = 0, vram: float | None = 50, temp: int | None = 50, **kw: Any) -> GpuState:
    """A GPU of 1000 MiB, so ``vram`` is both MiB used and percent."""
    values: dict[str, Any] = {
        "index": index,
        "memory_total_mb": 1000,
        "memory_used_mb": None if vram is None else round(vram * 10),
        "temperature_c": temp,
        "power_w": 100.0,
        "power_limit_w": 400.0,
        "ts": TS,
    }
    values.update(kw)
    return GpuState(**values)


def config(**kw: Any) -> AlertsConfig:
    return AlertsConfig.model_validate(kw)


def run(tracker: AlertTracker, vrams: list[float], *, step: float = 1.0) -> list[str]:
    """Feeds GPU 0 one VRAM reading a second; returns 'start'/'clear' per change."""
    out = []
    for i, vram in enumerate(vrams):
        for change in tracker.update([gpu(vram=vram)], now=i * step):
            out.append("start" if change.started else "clear")
    return out


@pytest.mark.parametrize(
    ("vrams", "expected"),
    [
        ([50, 93], ["start"]),  # rising above: one start
        ([50, 93, 95, 99, 91], ["start"]),  # staying above: nothing more
        ([93, 87, 92, 86, 91], ["start"]),  # dropping into the band: nothing
        ([93, 87, 80], ["start", "clear"]),  # below clear_below: one clear
        ([93, 80, 93, 80], ["start", "clear", "start", "clear"]),
        ([90, 90, 85, 85], []),  # exactly at `above` is not above
        ([93, 85], ["start"]),  # exactly at `clear_below` is not below
        ([84, 89, 84, 89], []),  # flapping below `above`: never starts
    ],
)
def test_vram_hysteresis(vrams: list[float], expected: list[str]) -> None:
    assert run(AlertTracker(AlertsConfig()), vrams) == expected


@pytest.mark.parametrize(
    ("vrams", "expected"),
    [
        ([93, 93, 93, 93], []),  # held 3 s, needs 5
        ([93, 93, 93, 93, 93, 93], ["start"]),  # held 5 s at t=5
        ([93, 93, 93, 50, 93, 93, 93], []),  # a blip shorter than for_s
        ([93, 93, 93, 88, 93, 93, 93], []),  # the band also resets the wait
        ([93, 93, 93, 93, 93, 93, 80], ["start", "clear"]),  # clearing does not wait
    ],
)
def test_for_s_hold_time(vrams: list[float], expected: list[str]) -> None:
    tracker = AlertTracker(config(vram_high={"for_s": 5}))
    assert run(tracker, vrams) == expected


def test_start_change_carries_what_an_event_needs() -> None:
    tracker = AlertTracker(config(vram_high={"severity": "error"}))
    [change] = tracker.update([gpu(vram=93.4)], now=0)
    assert change == AlertChange("vram_high", 0, True, 93.4, 90.0, Severity.ERROR)
    assert tracker.active(0) == ["vram_high"]
    [cleared] = tracker.update([gpu(vram=80)], now=1)
    assert (cleared.started, cleared.value, cleared.threshold) == (False, 80, 85)
    assert tracker.active(0) == []


def test_gpus_are_independent() -> None:
    tracker = AlertTracker(AlertsConfig())
    changes = tracker.update([gpu(0, vram=95), gpu(1, vram=10)], now=0)
    assert [(c.gpu, c.started) for c in changes] == [(0, True)]
    changes = tracker.update([gpu(0, vram=95), gpu(1, vram=96)], now=1)
    assert [(c.gpu, c.started) for c in changes] == [(1, True)]
    changes = tracker.update([gpu(0, vram=10), gpu(1, vram=96)], now=2)
    assert [(c.gpu, c.started) for c in changes] == [(0, False)]
    assert (tracker.active(0), tracker.active(1)) == ([], ["vram_high"])


def test_temperature_rule() -> None:
    tracker = AlertTracker(AlertsConfig())
    assert tracker.update([gpu(temp=85)], now=0) == []
    [start] = tracker.update([gpu(temp=88)], now=1)
    assert (start.alert, start.value, start.threshold) == ("temperature_high", 88, 85)
    assert tracker.update([gpu(temp=81)], now=2) == []
    [clear] = tracker.update([gpu(temp=79)], now=3)
    assert (clear.alert, clear.started) == ("temperature_high", False)


def test_several_alerts_on_one_gpu_in_rule_order() -> None:
    tracker = AlertTracker(config(power_high={"enabled": True}))
    hot = gpu(vram=95, temp=90, power_w=390.0)
    changes = tracker.update([hot], now=0)
    names = ["vram_high", "temperature_high", "power_high"]
    assert [c.alert for c in changes] == names
    assert tracker.active(0) == names


@pytest.mark.parametrize(
    "settings_",
    [
        {"vram_high": {"enabled": False}},
        {"enabled": False},
    ],
)
def test_disabled_rule_never_fires(settings_: dict[str, Any]) -> None:
    tracker = AlertTracker(config(**settings_))
    assert tracker.update([gpu(vram=99)], now=0) == []
    assert tracker.active(0) == []


def test_power_is_off_by_default() -> None:
    tracker = AlertTracker(AlertsConfig())
    assert tracker.update([gpu(power_w=400.0)], now=0) == []


def test_missing_reading_changes_nothing() -> None:
    tracker = AlertTracker(AlertsConfig())
    tracker.update([gpu(temp=90)], now=0)
    assert tracker.update([gpu(temp=None)], now=1) == []
    assert tracker.active(0) == ["temperature_high"]


@pytest.mark.parametrize(
    "gone",
    [
        [gpu(0, vram=None, temp=None, memory_total_mb=None, alerts=["gpu_lost"])],  # lost
        [],  # removed
    ],
)
def test_lost_or_removed_gpu_clears_its_alerts(gone: list[GpuState]) -> None:
    tracker = AlertTracker(AlertsConfig())
    tracker.update([gpu(0, vram=95, temp=90), gpu(1, vram=95)], now=0)
    changes = tracker.update([*gone, gpu(1, vram=95)], now=1)
    assert [(c.gpu, c.alert, c.started, c.value) for c in changes] == [
        (0, "vram_high", False, None),
        (0, "temperature_high", False, None),
    ]
    assert tracker.active(0) == [] and tracker.active(1) == ["vram_high"]
    # back again: starts afresh
    assert len(tracker.update([gpu(0, vram=95), gpu(1, vram=95)], now=2)) == 1


def test_events() -> None:
    start = AlertChange("vram_high", 0, True, 93.0, 90.0, Severity.WARNING)
    event = to_event(start, TS)
    assert (event.event_type, event.severity, event.gpu, event.ts) == (
        "vram_high",
        Severity.WARNING,
        0,
        TS,
    )
    assert event.message == "GPU 0 VRAM 93 % used (above 90 %)"
    clear = AlertChange("vram_high", 0, False, 80.0, 85.0, Severity.WARNING)
    event = to_event(clear)
    assert (event.event_type, event.severity) == ("vram_high_cleared", Severity.INFO)
    assert event.message == "GPU 0 VRAM back to 80 % (below 85 %)"
    hot = to_event(AlertChange("temperature_high", 1, True, 88.0, 85.0, Severity.CRITICAL))
    assert (hot.event_type, hot.severity) == ("temperature_high", Severity.CRITICAL)
    assert hot.message == "GPU 1 at 88 °C (above 85 °C)"
    lost = to_event(AlertChange("vram_high", 2, False, None, 85.0, Severity.WARNING))
    assert lost.message == "GPU 2 VRAM alert cleared: the GPU stopped answering"
    power = to_event(AlertChange("power_high", 0, True, 97.5, 95.0, Severity.WARNING))
    assert power.message == "GPU 0 drawing 97.5 % of its power limit (above 95 %)"


@pytest.mark.parametrize(
    ("settings_", "event_type", "allowed"),
    [
        ({}, "model_crashed", True),
        ({"model_crashed": False}, "model_crashed", False),
        ({"job_failed": False}, "job_failed", False),
        ({"vram_leak": False}, "vram_leak", False),
        ({"enabled": False}, "vram_leak", False),
        ({"enabled": False}, "model_loaded", True),
        ({}, "vram_high_cleared", True),
        ({"temperature_high": {"enabled": False}}, "temperature_high", False),
        ({}, "power_high", False),
        ({"power_high": {"enabled": True}}, "power_high_cleared", True),
    ],
)
def test_allows(settings_: dict[str, Any], event_type: str, allowed: bool) -> None:
    assert config(**settings_).allows(event_type) is allowed


@pytest.mark.parametrize(
    ("settings_", "field", "words"),
    [
        (
            {"vram_high": {"clear_below": 95}},
            "vram_high",
            "clear_below (95) must be below above (90)",
        ),
        ({"vram_high": {"above": 80}}, "vram_high", "clear_below (85) must be below above (80)"),
        (
            {"temperature_high": {"clear_below": 85}},
            "temperature_high",
            "clear_below (85) must be below",
        ),
        ({"vram_high": {"above": 120}}, "vram_high", "above (120) must be between 0 and 100 %"),
        (
            {"power_high": {"clear_below": -1}},
            "power_high",
            "clear_below (-1) must be between 0 and 100 %",
        ),
        (
            {"temperature_high": {"above": 200}},
            "temperature_high",
            "above (200) must be between 0 and 150 °C",
        ),
        ({"vram_high": {"for_s": -1}}, "vram_high.for_s", "greater than or equal to 0"),
        (
            {"vram_high": {"severity": "info"}},
            "vram_high.severity",
            "'warning', 'error' or 'critical'",
        ),
        ({"vram_high": {"abov": 95}}, "vram_high.abov", "unknown field"),
        ({"disk_full": True}, "disk_full", "unknown field"),
    ],
)
def test_impossible_rules_say_what_is_wrong(
    settings_: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        config(**settings_)
    message = describe_validation_error(caught.value)
    assert f"'{field}'" in message
    assert words in message


def test_defaults() -> None:
    defaults = AlertsConfig()
    assert (defaults.vram_high.above, defaults.vram_high.clear_below) == (90, 85)
    assert (defaults.temperature_high.above, defaults.temperature_high.clear_below) == (85, 80)
    assert not defaults.power_high.enabled
    assert defaults.model_crashed and defaults.job_failed and defaults.vram_leak


readings = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=1),  # which GPU
        st.one_of(st.none(), st.floats(min_value=0, max_value=100)),  # VRAM %, None: lost
        st.integers(min_value=0, max_value=3),  # seconds since the last update
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(readings, st.sampled_from([0.0, 2.0]))
def test_starts_and_clears_alternate(
    steps: list[tuple[int, float | None, int]], hold: float
) -> None:
    tracker = AlertTracker(config(vram_high={"for_s": hold}))
    last: dict[int, bool] = {}
    vram = {0: 0.0, 1: 0.0}
    lost = {0: False, 1: False}
    now = 0.0
    for index, value, elapsed in steps:
        now += elapsed
        lost[index] = value is None
        vram[index] = value if value is not None else vram[index]
        gpus = [
            gpu(i, memory_total_mb=None, vram=None) if lost[i] else gpu(i, vram=vram[i])
            for i in (0, 1)
        ]
        for change in tracker.update(gpus, now):
            assert change.alert == "vram_high"
            # a start first, then strictly alternating
            assert change.started != last.get(change.gpu, False)
            last[change.gpu] = change.started
            if change.value is not None:
                if change.started:
                    assert change.value > 90
                else:
                    assert change.value < 85
        for i in (0, 1):
            assert (tracker.active(i) == ["vram_high"]) == last.get(i, False)
