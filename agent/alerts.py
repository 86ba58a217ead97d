"""Pure alerting: threshold rules with hysteresis over GPU states, and their events.

No I/O here: the service feeds every GPU state it samples to an ``AlertTracker``,
publishes each returned change on ``P/H/events`` (``to_event``) and puts
``AlertTracker.active`` into the GPU's ``alerts`` list.

Two kinds of alerts:

- Threshold alerts (``vram_high``, ``temperature_high``, ``power_high``) have a
  state. One starts when its value rises above ``above`` and has stayed there for
  ``for_s``; it clears when the value drops below ``clear_below``. Between the two
  (the hysteresis band) nothing changes, so a value wobbling around a threshold
  raises one event when it starts and one when it clears, never a stream.
- One-shot alerts (``model_crashed``, ``job_failed``, ``vram_leak``) are events the
  agent already emits when something happens; they never clear and are not in any
  GPU's ``alerts`` list. The config only switches them on or off
  (``AlertsConfig.allows``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.messages import Event, EventType, GpuState, Severity, utc_now

VRAM_HIGH = EventType.VRAM_HIGH.value
TEMPERATURE_HIGH = EventType.TEMPERATURE_HIGH.value
POWER_HIGH = EventType.POWER_HIGH.value
THRESHOLD_ALERTS = (VRAM_HIGH, TEMPERATURE_HIGH, POWER_HIGH)
ONE_SHOT_ALERTS = (EventType.MODEL_CRASHED, EventType.JOB_FAILED, EventType.VRAM_LEAK)
CLEARED_SUFFIX = "_cleared"


class _Strict(BaseModel):
    # agent.config imports this module, so it cannot share agent.config.Strict.
    model_config = ConfigDict(extra="forbid")


class ThresholdRule(_Strict):
    """An alert on one GPU reading: starts above ``above``, clears below ``clear_below``."""

    minimum: ClassVar[float] = 0.0
    maximum: ClassVar[float] = 100.0
    unit: ClassVar[str] = "%"

    enabled: bool = True
    above: float = Field(description="the alert starts when the value rises above this")
    clear_below: float = Field(
        description="the alert clears when the value drops below this (must be below above)"
    )
    for_s: float = Field(
        default=0.0, ge=0, le=86400, description="how long the value must stay above to start"
    )
    severity: Literal["warning", "error", "critical"] = "warning"

    @model_validator(mode="after")
    def _sane_thresholds(self) -> ThresholdRule:
        for name in ("above", "clear_below"):
            value = getattr(self, name)
            if not self.minimum <= value <= self.maximum:
                raise ValueError(
                    f"{name} ({_number(value)}) must be between {_number(self.minimum)} and "
                    f"{_number(self.maximum)} {self.unit}"
                )
        if self.clear_below >= self.above:
            raise ValueError(
                f"clear_below ({_number(self.clear_below)}) must be below above "
                f"({_number(self.above)}); set both when moving a threshold"
            )
        return self


class VramHighRule(ThresholdRule):
    """VRAM in use, in percent of the GPU's total memory."""

    above: float = Field(default=90.0, description="percent of total memory in use")
    clear_below: float = Field(default=85.0, description="percent; must be below above")


class TemperatureHighRule(ThresholdRule):
    """GPU temperature in °C."""

    maximum: ClassVar[float] = 150.0
    unit: ClassVar[str] = "°C"

    above: float = Field(default=85.0, description="°C")
    clear_below: float = Field(default=80.0, description="°C; must be below above")


class PowerHighRule(ThresholdRule):
    """Power draw in percent of the GPU's power limit; off unless enabled."""

    enabled: bool = False
    above: float = Field(default=95.0, description="percent of the power limit")
    clear_below: float = Field(default=90.0, description="percent; must be below above")


class AlertsConfig(_Strict):
    """``alerts:`` in the agent's configuration."""

    enabled: bool = Field(default=True, description="false turns every alert below off")
    vram_high: VramHighRule = Field(default_factory=VramHighRule)
    temperature_high: TemperatureHighRule = Field(default_factory=TemperatureHighRule)
    power_high: PowerHighRule = Field(default_factory=PowerHighRule)
    model_crashed: bool = Field(
        default=True, description="one-shot event when a ready model's server dies"
    )
    job_failed: bool = Field(default=True, description="one-shot event when a job fails")
    vram_leak: bool = Field(
        default=True, description="one-shot event when VRAM does not come back after an unload"
    )

    def rules(self) -> dict[str, ThresholdRule]:
        """The enabled threshold rules by alert name, in a fixed order."""
        if not self.enabled:
            return {}
        rules: dict[str, ThresholdRule] = {
            VRAM_HIGH: self.vram_high,
            TEMPERATURE_HIGH: self.temperature_high,
            POWER_HIGH: self.power_high,
        }
        return {name: rule for name, rule in rules.items() if rule.enabled}

    def allows(self, event_type: str) -> bool:
        """Whether an event of this type may be published: false for a switched-off
        alert (one-shot or threshold, started or cleared); true for any other event."""
        alert = event_type.removesuffix(CLEARED_SUFFIX)
        if alert in ONE_SHOT_ALERTS:
            return self.enabled and bool(getattr(self, alert))
        if alert in THRESHOLD_ALERTS:
            return alert in self.rules()
        return True


def vram_percent(gpu: GpuState) -> float | None:
    if gpu.memory_used_mb is None or not gpu.memory_total_mb:
        return None
    return 100.0 * gpu.memory_used_mb / gpu.memory_total_mb


def temperature(gpu: GpuState) -> float | None:
    return None if gpu.temperature_c is None else float(gpu.temperature_c)


def power_percent(gpu: GpuState) -> float | None:
    if gpu.power_w is None or not gpu.power_limit_w:
        return None
    return 100.0 * gpu.power_w / gpu.power_limit_w


READINGS: dict[str, Callable[[GpuState], float | None]] = {
    VRAM_HIGH: vram_percent,
    TEMPERATURE_HIGH: temperature,
    POWER_HIGH: power_percent,
}


@dataclass(frozen=True, slots=True)
class AlertChange:
    """A threshold alert that started or cleared on one GPU: everything an event needs.

    ``value`` is the reading that caused the change; ``None`` when the alert cleared
    because the GPU was lost or is gone. ``threshold`` is ``above`` for a start and
    ``clear_below`` for a clear; ``severity`` is the rule's (``to_event`` makes a
    clear ``info``).
    """

    alert: str
    gpu: int
    started: bool
    value: float | None
    threshold: float
    severity: Severity


@dataclass(slots=True)
class _RuleState:
    active: bool = False
    pending_since: float | None = None


class AlertTracker:
    """Evaluates the threshold rules per GPU; a pure state machine driven by ``update``.

    Each alert starts exactly once until it clears. A reading of ``None`` (the GPU
    does not report it) changes nothing except resetting a pending ``for_s`` wait.
    A lost GPU (``memory_total_mb`` is ``None``) or one missing from an update clears
    its active alerts: ``gpu_lost`` takes over, and a GPU that comes back starts afresh.
    """

    def __init__(self, config: AlertsConfig) -> None:
        self._rules = config.rules()
        self._states: dict[tuple[int, str], _RuleState] = {}

    def update(self, gpus: Sequence[GpuState], now: float) -> list[AlertChange]:
        """Feed every GPU's latest state (``now`` is monotonic seconds); returns what
        started or cleared, in GPU order then rule order (cleared lost GPUs last)."""
        changes: list[AlertChange] = []
        answering = {gpu.index for gpu in gpus if gpu.memory_total_mb is not None}
        for gpu in gpus:
            if gpu.index not in answering:
                continue
            for name, rule in self._rules.items():
                change = self._evaluate(gpu.index, name, rule, READINGS[name](gpu), now)
                if change is not None:
                    changes.append(change)
        gone = sorted({index for index, _ in self._states} - answering)
        for index in gone:
            for name, rule in self._rules.items():
                state = self._states.pop((index, name), None)
                if state is not None and state.active:
                    severity = Severity(rule.severity)
                    changes.append(
                        AlertChange(name, index, False, None, rule.clear_below, severity)
                    )
        return changes

    def _evaluate(
        self, index: int, name: str, rule: ThresholdRule, value: float | None, now: float
    ) -> AlertChange | None:
        state = self._states.setdefault((index, name), _RuleState())
        if value is None:
            state.pending_since = None
            return None
        if state.active:
            if value < rule.clear_below:
                state.active = False
                return AlertChange(
                    name, index, False, value, rule.clear_below, Severity(rule.severity)
                )
            return None
        if value <= rule.above:
            state.pending_since = None
            return None
        if state.pending_since is None:
            state.pending_since = now
        if now - state.pending_since < rule.for_s:
            return None
        state.active = True
        state.pending_since = None
        return AlertChange(name, index, True, value, rule.above, Severity(rule.severity))

    def active(self, gpu_index: int) -> list[str]:
        """Names of the alerts active on this GPU, in rule order (for ``GpuState.alerts``)."""
        return [
            name
            for name in self._rules
            if (state := self._states.get((gpu_index, name))) is not None and state.active
        ]


def _number(value: float) -> str:
    return f"{round(value, 1):g}"


@dataclass(frozen=True, slots=True)
class _Wording:
    subject: str
    started: str
    cleared: str


_WORDING = {
    VRAM_HIGH: _Wording(
        "VRAM",
        "VRAM {value} % used (above {threshold} %)",
        "VRAM back to {value} % (below {threshold} %)",
    ),
    TEMPERATURE_HIGH: _Wording(
        "temperature",
        "at {value} °C (above {threshold} °C)",
        "back to {value} °C (below {threshold} °C)",
    ),
    POWER_HIGH: _Wording(
        "power",
        "drawing {value} % of its power limit (above {threshold} %)",
        "power back to {value} % of its limit (below {threshold} %)",
    ),
}


def describe(change: AlertChange) -> str:
    """The event message, e.g. ``GPU 0 VRAM 93 % used (above 90 %)``."""
    wording = _WORDING[change.alert]
    if change.value is None:
        return f"GPU {change.gpu} {wording.subject} alert cleared: the GPU stopped answering"
    template = wording.started if change.started else wording.cleared
    text = template.format(value=_number(change.value), threshold=_number(change.threshold))
    return f"GPU {change.gpu} {text}"


def to_event(change: AlertChange, ts: datetime | None = None) -> Event:
    """``P/H/events`` for a change: a start is ``<alert>`` with the rule's severity, a
    clear is ``<alert>_cleared`` with severity ``info``."""
    event_type = change.alert if change.started else change.alert + CLEARED_SUFFIX
    severity = change.severity if change.started else Severity.INFO
    return Event(
        event_type=EventType(event_type),
        severity=severity,
        message=describe(change),
        gpu=change.gpu,
        ts=ts or utc_now(),
    )
