"""What the TUI knows about the bus: every host's retained state, folded from raw messages.

Pure: no MQTT, no Textual, no asyncio. The bridge feeds every message of
``all_hosts_filter(prefix)`` to :meth:`BusStore.apply` and turns the returned
:class:`Change` into a redraw of just that part of the screen.

Bad input never raises: whatever cannot be used is counted in ``BusStore.skipped``
by reason and the latest few are kept in ``BusStore.problems`` for a debug view.
"""

from __future__ import annotations

import re
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from shared.messages import (
    Availability,
    Event,
    GpuState,
    HostInfo,
    HostState,
    JobState,
    JobStatus,
    ModelLifecycle,
    ModelState,
    WeightsState,
)
from shared.topics import (
    JOB_ID_PATTERN,
    is_model_name,
    is_prefix,
    parse_topic,
)

MAX_EVENTS = 200
MAX_PROBLEMS = 50
MAX_PAYLOAD_BYTES = 256 * 1024
_MAX_DETAIL_CHARS = 200

# Kinds a watcher sees but does not show: commands and replies are other clients'
# conversations.
_IGNORED_KINDS = frozenset({"cmd", "reply"})
_SINGLE_KINDS = frozenset({"status", "info", "state", "weights", "events"})
_KEYED_KINDS = frozenset({"gpu", "models", "jobs"})
_GPU_INDEX = re.compile(r"[0-9]{1,4}")
_JOB_ID = re.compile(JOB_ID_PATTERN)
_ACTIVE_JOB_STATES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})

_M = TypeVar("_M", bound=BaseModel)
_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class Change:
    """What one message changed. ``kind`` is the topic kind (``status``, ``info``,
    ``gpu``, ``state``, ``models``, ``jobs``, ``weights``, ``events``); ``key`` is the GPU index,
    model name or job id for the keyed kinds and None otherwise."""

    host: str
    kind: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    topic: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class HostEvent:
    host: str
    event: Event


# The GPU history a host view keeps (sparklines): 10 minutes, at most this many samples.
HISTORY_S = 600.0
HISTORY_SAMPLES = 4096
GpuSample = tuple[float, float | None, float | None]

# Gateway traffic a host view keeps: at one model update a second per model, minutes of it.
TRAFFIC_SAMPLES = 600
RATE_WINDOW_S = 10.0


def request_rate(samples: Sequence[tuple[float, int]], now: float, window_s: float) -> float:
    """Requests per second over the last ``window_s``, from (time, running total) samples
    (a total that went down, an agent restarted, counts from there)."""
    if not samples:
        return 0.0
    start = now - window_s
    baseline = samples[0]
    for sample in samples:
        if sample[0] > start:
            break
        baseline = sample
    latest = samples[-1]
    if latest[0] <= start or latest[1] < baseline[1]:
        return 0.0
    span = min(window_s, now - samples[0][0])
    return (latest[1] - baseline[1]) / span if span > 0 else 0.0


@dataclass(slots=True)
class HostView:
    """One host as last seen on the bus.

    The store owns and mutates these in place (no copy per message at telemetry
    rate): screens read them and must not modify them. The payload models inside
    are frozen pydantic models and are replaced, never changed.
    """

    host_id: str
    online: bool | None = None
    info: HostInfo | None = None
    gpus: dict[int, GpuState] = field(default_factory=dict)
    state: HostState | None = None
    models: dict[str, ModelState] = field(default_factory=dict)
    jobs: dict[str, JobState] = field(default_factory=dict)
    weights: WeightsState | None = None
    last_seen: float = 0.0
    # (clock, requests forwarded by all its models) at each model update, for req/s.
    traffic: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=TRAFFIC_SAMPLES))
    # Per GPU, (clock, memory used, utilization) as fractions, for the last HISTORY_S.
    gpu_history: dict[int, deque[GpuSample]] = field(default_factory=dict)

    def requests_per_s(self, now: float, window_s: float = RATE_WINDOW_S) -> float:
        return request_rate(self.traffic, now, window_s)

    def memory_history(self, gpu: int) -> list[tuple[float, float | None]]:
        return [(moment, used) for moment, used, _ in self.gpu_history.get(gpu, ())]

    def utilization_history(self, gpu: int) -> list[tuple[float, float | None]]:
        return [(moment, busy) for moment, _, busy in self.gpu_history.get(gpu, ())]

    def stopping_on(self, gpu: int) -> dict[str, int]:
        """The models being unloaded from ``gpu`` and the MiB each held there (its
        measured use, else its estimate, shared evenly over its GPUs)."""
        held: dict[str, int] = {}
        for model in self.models.values():
            if model.state is ModelLifecycle.UNLOADING and gpu in model.gpus:
                mb = model.vram_used_mb or model.vram_estimate_mb or 0
                held[model.name] = mb // max(len(model.gpus), 1)
        return held


class BusStore:
    """Folds the messages under ``prefix`` into one :class:`HostView` per host."""

    def __init__(
        self,
        prefix: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_events: int = MAX_EVENTS,
    ) -> None:
        if not is_prefix(prefix):
            raise ValueError(f"invalid topic prefix {prefix!r}: use levels of [A-Za-z0-9._-]")
        self.prefix = prefix
        self._clock = clock
        self._hosts: dict[str, HostView] = {}
        self._events: deque[HostEvent] = deque(maxlen=max_events)
        self.skipped: Counter[str] = Counter()
        self.problems: deque[Problem] = deque(maxlen=MAX_PROBLEMS)

    # -- reading ---------------------------------------------------------------

    def now(self) -> float:
        """The store's clock (what traffic samples are timed by)."""
        return self._clock()

    def hosts(self) -> list[HostView]:
        return [self._hosts[h] for h in sorted(self._hosts)]

    def host(self, host_id: str) -> HostView | None:
        return self._hosts.get(host_id)

    def events(self, host: str | None = None) -> list[HostEvent]:
        """The latest events, newest first; only ``host``'s when given."""
        return [e for e in self._events if host is None or e.host == host]

    def active_jobs(self, host: str) -> list[JobState]:
        """Running jobs, then queued ones by queue position, then finished ones, latest first.

        The agent clears finished jobs after ``job_retention_s``, so every finished job
        still here is a recent one.
        """
        view = self._hosts.get(host)
        if view is None:
            return []
        jobs = list(view.jobs.values())
        # Timestamps as floats: a naive datetime in a payload must not break sorting.
        running = sorted(
            (j for j in jobs if j.state is JobStatus.RUNNING),
            key=lambda j: (j.started_at or j.created_at).timestamp(),
        )
        queued = sorted(
            (j for j in jobs if j.state is JobStatus.QUEUED),
            key=lambda j: (
                j.queue_position is None,
                j.queue_position or 0,
                j.created_at.timestamp(),
            ),
        )
        finished = sorted(
            (j for j in jobs if j.state not in _ACTIVE_JOB_STATES),
            key=lambda j: (j.finished_at or j.ts).timestamp(),
            reverse=True,
        )
        return running + queued + finished

    # -- writing ---------------------------------------------------------------

    def apply(self, topic: str, payload: bytes, *, retained: bool = False) -> Change | None:
        """Fold one message in; the change it made, or None when nothing changed."""
        parsed = parse_topic(self.prefix, topic)
        if parsed is None:
            return self._unparsed(topic)
        host, kind, arg = parsed.host, parsed.kind, parsed.argument
        if kind in _IGNORED_KINDS:
            return None
        if kind not in _KEYED_KINDS and kind not in _SINGLE_KINDS:
            return self._skip(topic, "unknown_kind", kind)
        if len(payload) > MAX_PAYLOAD_BYTES:
            return self._skip(topic, "oversized", f"{len(payload)} bytes")
        if kind in _SINGLE_KINDS:
            if arg is not None:
                return self._skip(topic, f"invalid_topic:{kind}", "unexpected level after kind")
            if kind == "events":
                return self._apply_event(host, topic, payload, retained=retained)
            if kind == "status":
                return self._apply_status(host, topic, payload)
            if kind == "info":
                return self._apply_info(host, topic, payload)
            if kind == "weights":
                return self._apply_whole(host, kind, WeightsState, topic, payload)
            return self._apply_whole(host, kind, HostState, topic, payload)
        if kind == "gpu":
            return self._apply_gpu(host, arg, topic, payload)
        if kind == "models":
            return self._apply_model(host, arg, topic, payload)
        return self._apply_job(host, arg, topic, payload)

    def _apply_status(self, host: str, topic: str, payload: bytes) -> Change | None:
        online: bool | None = None
        if payload:  # an empty retained status was cleared: availability unknown again
            try:
                text = payload.decode("utf-8").strip()
            except UnicodeDecodeError:
                text = ""
            if text not in (Availability.ONLINE, Availability.OFFLINE):
                return self._skip(topic, "invalid_payload:status", repr(payload[:40]))
            online = text == Availability.ONLINE
        view = self._touch(host) if payload else self._known(host)
        if view is None:
            return None
        if view.online == online:
            return None
        view.online = online
        return Change(host, "status")

    def _apply_info(self, host: str, topic: str, payload: bytes) -> Change | None:
        info = self._decode(HostInfo, "info", topic, payload) if payload else None
        if payload and info is None:
            return None
        if info is not None and info.host_id != host:
            return self._mismatch(topic, "info", host, info.host_id)
        view = self._touch(host) if payload else self._known(host)
        if view is None:
            return None
        if view.info == info:
            return None
        view.info = info
        return Change(host, "info")

    def _apply_whole(
        self, host: str, kind: str, model: type[BaseModel], topic: str, payload: bytes
    ) -> Change | None:
        """A topic whose payload replaces the view's attribute of the same name (``state``,
        ``weights``); an empty payload clears it."""
        value = self._decode(model, kind, topic, payload) if payload else None
        if payload and value is None:
            return None
        view = self._touch(host) if payload else self._known(host)
        if view is None or getattr(view, kind) == value:
            return None
        setattr(view, kind, value)
        return Change(host, kind)

    def _apply_gpu(self, host: str, arg: str | None, topic: str, payload: bytes) -> Change | None:
        if arg is None or _GPU_INDEX.fullmatch(arg) is None:
            return self._skip(topic, "invalid_topic:gpu", f"GPU index {arg!r} is not a number")
        index = int(arg)
        if not payload:
            view = self._known(host)
            return _pop(view.gpus, index, Change(host, "gpu", str(index))) if view else None
        gpu = self._decode(GpuState, "gpu", topic, payload)
        if gpu is None:
            return None
        if gpu.index != index:
            return self._mismatch(topic, "gpu", str(index), str(gpu.index))
        view = self._touch(host)
        _remember(view, gpu, self._clock())
        return _put(view.gpus, index, gpu, Change(host, "gpu", str(index)))

    def _apply_model(self, host: str, arg: str | None, topic: str, payload: bytes) -> Change | None:
        if arg is None or not is_model_name(arg):
            return self._skip(topic, "invalid_topic:models", f"bad model name {arg!r}")
        if not payload:  # the model left the catalog
            view = self._known(host)
            return _pop(view.models, arg, Change(host, "models", arg)) if view else None
        model = self._decode(ModelState, "models", topic, payload)
        if model is None:
            return None
        if model.name != arg:
            return self._mismatch(topic, "models", arg, model.name)
        view = self._touch(host)
        change = _put(view.models, arg, model, Change(host, "models", arg))
        total = sum(m.requests_total for m in view.models.values())
        if not view.traffic or view.traffic[-1][1] != total:
            view.traffic.append((self._clock(), total))
        return change

    def _apply_job(self, host: str, arg: str | None, topic: str, payload: bytes) -> Change | None:
        if arg is None or _JOB_ID.fullmatch(arg) is None:
            return self._skip(topic, "invalid_topic:jobs", f"bad job id {arg!r}")
        if not payload:  # cleared after job_retention_s
            view = self._known(host)
            return _pop(view.jobs, arg, Change(host, "jobs", arg)) if view else None
        job = self._decode(JobState, "jobs", topic, payload)
        if job is None:
            return None
        if job.job_id != arg:
            return self._mismatch(topic, "jobs", arg, job.job_id)
        return _put(self._touch(host).jobs, arg, job, Change(host, "jobs", arg))

    def _apply_event(
        self, host: str, topic: str, payload: bytes, *, retained: bool
    ) -> Change | None:
        if retained:
            # Events are never retained by agents; a retained one is replayed on every
            # connect and would show stale news as new.
            return self._skip(topic, "retained_event", "events must not be retained")
        event = self._decode(Event, "events", topic, payload)
        if event is None:
            return None
        self._touch(host)
        self._events.appendleft(HostEvent(host, event))
        return Change(host, "events")

    # -- helpers ---------------------------------------------------------------

    def _known(self, host: str) -> HostView | None:
        """The host's view, touched; None when never seen, so clearing a topic of an
        unknown host does not invent that host."""
        view = self._hosts.get(host)
        if view is not None:
            view.last_seen = self._clock()
        return view

    def _touch(self, host: str) -> HostView:
        view = self._hosts.get(host)
        if view is None:
            view = self._hosts[host] = HostView(host)
        view.last_seen = self._clock()
        return view

    def _decode(self, model: type[_M], kind: str, topic: str, payload: bytes) -> _M | None:
        try:
            return model.model_validate_json(payload)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            if errors and errors[0]["type"] == "json_invalid":
                self._skip(topic, "invalid_json", str(errors[0]["msg"]))
            else:
                where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
                msg = errors[0]["msg"] if errors else str(exc)
                self._skip(topic, f"invalid_payload:{kind}", f"{where}: {msg}")
            return None

    def _unparsed(self, topic: str) -> Change | None:
        if not topic.startswith(self.prefix + "/"):
            return self._skip(topic, "foreign_topic", "not under the prefix")
        levels = topic[len(self.prefix) + 1 :].split("/")
        # P/reply/... and P/H/reply/<deep>... are reply topics clients chose; not ours.
        if levels[0] == "reply" or (len(levels) > 1 and levels[1] in _IGNORED_KINDS):
            return None
        return self._skip(topic, "invalid_topic", "bad host id or too many levels")

    def _mismatch(self, topic: str, kind: str, in_topic: str, in_payload: str) -> Change | None:
        detail = f"topic says {in_topic!r}, payload says {in_payload!r}"
        return self._skip(topic, f"invalid_payload:{kind}", detail)

    def _skip(self, topic: str, reason: str, detail: str) -> Change | None:
        """Count and remember an unusable message; always None, the change it made."""
        self.skipped[reason] += 1
        self.problems.append(Problem(topic, reason, detail[:_MAX_DETAIL_CHARS]))
        return None


def _put(table: dict[_K, _V], key: _K, value: _V, change: Change) -> Change | None:
    if table.get(key) == value:
        return None
    table[key] = value
    return change


def _pop(table: dict[_K, _V], key: _K, change: Change) -> Change | None:
    return change if table.pop(key, None) is not None else None


def _remember(view: HostView, gpu: GpuState, now: float) -> None:
    """One sample of the GPU's history; what is older than HISTORY_S goes."""
    history = view.gpu_history.setdefault(gpu.index, deque(maxlen=HISTORY_SAMPLES))
    total = gpu.memory_total_mb
    used = gpu.memory_used_mb
    if used is None and total is not None and gpu.memory_free_mb is not None:
        used = total - gpu.memory_free_mb
    memory = used / total if used is not None and total else None
    busy = gpu.utilization_percent / 100 if gpu.utilization_percent is not None else None
    history.append((now, memory, busy))
    while history and history[0][0] < now - HISTORY_S:
        history.popleft()
