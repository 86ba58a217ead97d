from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.messages import (
    Event,
    GpuInfo,
    GpuProcess,
    GpuState,
    HostInfo,
    HostState,
    InstalledWeights,
    JobPhase,
    JobState,
    JobStatus,
    ModelLifecycle,
    ModelState,
    Severity,
    WeightsState,
)
from shared.topics import HostTopics
from tui.memory import Segment, vram_segments
from tui.store import MAX_PAYLOAD_BYTES, BusStore, Change, request_rate
from tui.widgets.models import requests_text

PREFIX = "test/store"
T0 = datetime(2025, 6, 14, 9, 0, tzinfo=UTC)
GPU1 = HostTopics(PREFIX, "gpu1")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gpu_state(index: int = 0, **changes: object) -> GpuState:
    base = GpuState(
        index=index,
        uuid="GPU-5c2e9f4a",
        name="NVIDIA GeForce RTX 5090",
        memory_total_mb=32607,
        memory_used_mb=23438,
        memory_free_mb=9169,
        utilization_percent=37,
        processes=[
            GpuProcess(pid=48213, used_mb=17236, name="llama-server", model="qwen3-vl-30b"),
            GpuProcess(pid=48890, used_mb=5890, name="python", model="whisperx"),
            GpuProcess(pid=1432, used_mb=312, name="Xorg"),
        ],
        ts=T0,
    )
    return base.model_copy(update=changes)


def host_info(host: str = "gpu1") -> HostInfo:
    return HostInfo(
        host_id=host,
        hostname=f"{host}.lan",
        agent_version="0.1.0",
        protocol_version="1",
        mqtt_protocol="5",
        gpu_backend="sim",
        gpus=[GpuInfo(index=0, name="NVIDIA GeForce RTX 5090", memory_total_mb=32607)],
        commands=["cancel", "load", "plan", "status", "switch", "unload"],
        started_at=T0,
        ts=T0,
    )


def model_state(
    name: str = "qwen3-vl-30b", state: ModelLifecycle = ModelLifecycle.READY
) -> ModelState:
    return ModelState(name=name, runtime="process", state=state, gpus=[0], ts=T0)


def job(
    job_id: str,
    state: JobStatus,
    *,
    queue_position: int | None = None,
    minutes: int = 0,
) -> JobState:
    at = T0 + timedelta(minutes=minutes)
    done = state not in (JobStatus.QUEUED, JobStatus.RUNNING)
    return JobState(
        job_id=job_id,
        command="load",
        model="whisperx",
        state=state,
        phase=JobPhase.DONE if done else JobPhase.QUEUED,
        queue_position=queue_position,
        created_at=at,
        started_at=at if state is not JobStatus.QUEUED else None,
        finished_at=at if done else None,
        ts=at,
    )


def enc(message: GpuState | HostInfo | HostState | ModelState | JobState | Event) -> bytes:
    return message.model_dump_json().encode()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> BusStore:
    return BusStore(PREFIX, clock=clock)


def test_online_then_offline(store: BusStore, clock: FakeClock) -> None:
    assert store.apply(GPU1.status, b"online", retained=True) == Change("gpu1", "status")
    assert store.hosts()[0].online is True
    assert store.hosts()[0].last_seen == 100.0
    assert store.apply(GPU1.status, b"online") is None  # unchanged
    clock.now = 130.0
    assert store.apply(GPU1.status, b"offline") == Change("gpu1", "status")
    view = store.host("gpu1")
    assert view is not None
    assert view.online is False
    assert view.last_seen == 130.0
    assert store.apply(GPU1.status, b"maybe") is None
    assert store.skipped["invalid_payload:status"] == 1


def test_gpu_state_and_info_fill_the_host_view(store: BusStore) -> None:
    state = HostState(total_mb=32607, used_mb=23438, free_mb=9169, ts=T0)
    assert store.apply(GPU1.gpu(0), enc(gpu_state())) == Change("gpu1", "gpu", "0")
    assert store.apply(GPU1.state, enc(state)) == Change("gpu1", "state")
    assert store.apply(GPU1.info, enc(host_info())) == Change("gpu1", "info")
    assert store.apply(GPU1.gpu(0), enc(gpu_state())) is None  # same sample again
    (view,) = store.hosts()
    assert view.online is None  # no status seen yet
    assert view.gpus == {0: gpu_state()}
    assert view.state == state
    assert view.info == host_info()
    assert not store.skipped


def test_hosts_are_sorted_by_id(store: BusStore) -> None:
    for host in ("zeta", "alpha", "mid"):
        store.apply(HostTopics(PREFIX, host).status, b"online")
    assert [h.host_id for h in store.hosts()] == ["alpha", "mid", "zeta"]


def test_model_added_then_removed_by_an_empty_payload(store: BusStore) -> None:
    topic = GPU1.model("qwen3-vl-30b")
    assert store.apply(topic, enc(model_state())) == Change("gpu1", "models", "qwen3-vl-30b")
    assert store.hosts()[0].models == {"qwen3-vl-30b": model_state()}
    assert store.apply(topic, b"") == Change("gpu1", "models", "qwen3-vl-30b")
    assert store.hosts()[0].models == {}
    assert store.apply(topic, b"") is None  # already gone


def test_clearing_a_topic_of_an_unknown_host_invents_no_host(store: BusStore) -> None:
    assert store.apply(GPU1.model("whisperx"), b"") is None
    assert store.apply(GPU1.job("j1"), b"") is None
    assert store.apply(GPU1.status, b"") is None
    assert store.hosts() == []


def test_job_lifecycle_and_active_jobs_order(store: BusStore) -> None:
    assert store.apply(GPU1.job("a"), enc(job("a", JobStatus.QUEUED, queue_position=1))) == Change(
        "gpu1", "jobs", "a"
    )
    store.apply(GPU1.job("b"), enc(job("b", JobStatus.QUEUED, queue_position=2)))
    store.apply(GPU1.job("old"), enc(job("old", JobStatus.SUCCEEDED, minutes=-5)))
    store.apply(GPU1.job("new"), enc(job("new", JobStatus.FAILED, minutes=-1)))
    ids = [j.job_id for j in store.active_jobs("gpu1")]
    assert ids == ["a", "b", "new", "old"]

    # a starts, b moves up; then a finishes and is cleared after retention
    store.apply(GPU1.job("a"), enc(job("a", JobStatus.RUNNING, minutes=1)))
    store.apply(GPU1.job("b"), enc(job("b", JobStatus.QUEUED, queue_position=1)))
    assert [j.job_id for j in store.active_jobs("gpu1")] == ["a", "b", "new", "old"]
    store.apply(GPU1.job("a"), enc(job("a", JobStatus.SUCCEEDED, minutes=2)))
    assert [j.job_id for j in store.active_jobs("gpu1")] == ["b", "a", "new", "old"]
    assert store.apply(GPU1.job("a"), b"") == Change("gpu1", "jobs", "a")
    assert [j.job_id for j in store.active_jobs("gpu1")] == ["b", "new", "old"]
    assert store.active_jobs("nobody") == []


def test_events_are_capped_and_newest_first(clock: FakeClock) -> None:
    store = BusStore(PREFIX, clock=clock, max_events=3)
    other = HostTopics(PREFIX, "gpu2")
    for i in range(5):
        topic = (GPU1 if i % 2 else other).events
        event = Event(event_type="model_loaded", severity=Severity.INFO, message=f"e{i}", ts=T0)
        assert store.apply(topic, enc(event)) == Change("gpu1" if i % 2 else "gpu2", "events")
    assert [e.event.message for e in store.events()] == ["e4", "e3", "e2"]
    assert [e.event.message for e in store.events("gpu1")] == ["e3"]


def test_the_default_event_cap_is_200(store: BusStore) -> None:
    for i in range(250):
        event = Event(event_type="vram_high", severity=Severity.WARNING, message=str(i), ts=T0)
        store.apply(GPU1.events, enc(event))
    events = store.events()
    assert len(events) == 200
    assert events[0].event.message == "249"


def test_a_retained_event_is_stale_and_skipped(store: BusStore) -> None:
    event = Event(event_type="gpu_lost", severity=Severity.CRITICAL, message="GPU 0 lost", ts=T0)
    assert store.apply(GPU1.events, enc(event), retained=True) is None
    assert store.events() == []
    assert store.skipped["retained_event"] == 1


def test_commands_and_replies_are_ignored_silently(store: BusStore) -> None:
    assert store.apply(GPU1.command("load"), b'{"model": "x"}') is None
    assert store.apply(GPU1.reply("load"), b"{}") is None
    assert store.apply(f"{PREFIX}/reply/client-7/abc", b"{}") is None
    assert store.apply(f"{GPU1.base}/reply/client-7/abc", b"{}") is None
    assert store.hosts() == []
    assert not store.skipped


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (GPU1.gpu(0), b"{not json", "invalid_json"),
        (GPU1.gpu(0), b"\xff\xfe", "invalid_json"),
        (
            GPU1.gpu(0),
            enc(gpu_state()).replace(b'"index":0', b'"index":"zero"'),
            "invalid_payload:gpu",
        ),
        (GPU1.gpu(1), enc(gpu_state(index=0)), "invalid_payload:gpu"),
        (f"{GPU1.base}/gpu/zero", enc(gpu_state()), "invalid_topic:gpu"),
        (f"{GPU1.base}/gpu", enc(gpu_state()), "invalid_topic:gpu"),
        (GPU1.state, b"[]", "invalid_payload:state"),
        (GPU1.info, enc(host_info("gpu2")), "invalid_payload:info"),
        (GPU1.model("whisperx"), enc(model_state("qwen3-vl-30b")), "invalid_payload:models"),
        (f"{GPU1.base}/models/a b", enc(model_state()), "invalid_topic:models"),
        (GPU1.job("j1"), b'{"job_id": "j1"}', "invalid_payload:jobs"),
        (GPU1.events, b"null", "invalid_payload:events"),
        (f"{GPU1.base}/status/extra", b"online", "invalid_topic:status"),
        (f"{GPU1.base}/telemetry", b"{}", "unknown_kind"),
        ("modelbus/gpu1/status", b"online", "foreign_topic"),
        (f"{PREFIX}2/gpu1/status", b"online", "foreign_topic"),
        (f"{PREFIX}/GPU-1/status", b"online", "invalid_topic"),
        (f"{PREFIX}/gpu1/models/a/b", b"{}", "invalid_topic"),
        (GPU1.gpu(0), b" " * (MAX_PAYLOAD_BYTES + 1), "oversized"),
    ],
)
def test_malformed_input_is_counted_never_raised(topic: str, payload: bytes, reason: str) -> None:
    store = BusStore(PREFIX)
    assert store.apply(topic, payload) is None
    assert store.skipped == {reason: 1}
    (problem,) = store.problems
    assert (problem.topic, problem.reason) == (topic, reason)
    assert problem.detail
    assert store.hosts() == []


def test_only_the_last_50_problems_are_kept(store: BusStore) -> None:
    for i in range(60):
        store.apply(f"elsewhere/{i}", b"")
    assert store.skipped["foreign_topic"] == 60
    assert len(store.problems) == 50
    assert store.problems[-1].topic == "elsewhere/59"


def test_an_invalid_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        BusStore("a/+")


_LEVEL = st.one_of(
    st.sampled_from(["gpu1", "status", "info", "state", "gpu", "models", "jobs", "events", "0"]),
    st.text(max_size=8),
)


@given(levels=st.lists(_LEVEL, min_size=0, max_size=5), payload=st.binary(max_size=300))
def test_arbitrary_topics_and_bytes_never_raise(levels: list[str], payload: bytes) -> None:
    store = BusStore(PREFIX)
    topic = "/".join([PREFIX, *levels])
    change = store.apply(topic, payload, retained=True)
    store.apply(topic, payload)
    assert change is None or change.host in {h.host_id for h in store.hosts()}


@given(
    kind=st.sampled_from(
        ["status", "info", "state", "weights", "events", "gpu/0", "models/m", "jobs/j"]
    ),
    payload=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
            max_leaves=10,
        ).map(lambda v: json.dumps(v).encode()),
    ),
)
def test_arbitrary_payloads_on_every_kind_never_raise(kind: str, payload: bytes) -> None:
    store = BusStore(PREFIX)
    store.apply(f"{GPU1.base}/{kind}", payload)
    for host in store.hosts():
        store.active_jobs(host.host_id)
        for gpu in host.gpus.values():
            vram_segments(gpu)


def procs(*spec: tuple[str | None, int | None]) -> list[GpuProcess]:
    return [GpuProcess(pid=i, used_mb=mb, model=model) for i, (model, mb) in enumerate(spec)]


@pytest.mark.parametrize(
    ("gpu", "expected"),
    [
        pytest.param(
            gpu_state(),
            [
                Segment("qwen3-vl-30b", 17236),
                Segment("whisperx", 5890),
                Segment("other", 312),
                Segment("free", 9169),
            ],
            id="protocol-example",
        ),
        pytest.param(
            gpu_state(
                memory_total_mb=24000,
                memory_used_mb=10000,
                processes=procs(("b", 3000), ("a", 1000), ("b", 2000), (None, 500)),
            ),
            # b grouped; other = 500 unowned + 3500 not in any process
            [
                Segment("a", 1000),
                Segment("b", 5000),
                Segment("other", 4000),
                Segment("free", 14000),
            ],
            id="grouped-by-model-and-unattributed",
        ),
        pytest.param(
            gpu_state(memory_total_mb=8000, memory_used_mb=None, memory_free_mb=6000, processes=[]),
            [Segment("other", 2000), Segment("free", 6000)],
            id="used-from-free",
        ),
        pytest.param(
            gpu_state(memory_total_mb=8000, memory_used_mb=1000, processes=procs(("m", 1500))),
            [Segment("m", 1500), Segment("free", 6500)],
            id="processes-claim-more-than-used",
        ),
        pytest.param(
            gpu_state(
                memory_total_mb=1000, memory_used_mb=1000, processes=procs(("m", 900), (None, 400))
            ),
            [Segment("m", 900), Segment("other", 100)],
            id="cut-to-the-total",
        ),
        pytest.param(
            gpu_state(memory_total_mb=4000, memory_used_mb=0, processes=procs(("m", None))),
            [Segment("free", 4000)],
            id="process-without-memory",
        ),
        pytest.param(
            gpu_state(
                memory_total_mb=None,
                memory_used_mb=None,
                memory_free_mb=None,
                processes=[],
                alerts=["gpu_lost"],
            ),
            [],
            id="lost-gpu",
        ),
    ],
)
def test_vram_segments(gpu: GpuState, expected: list[Segment]) -> None:
    segments = vram_segments(gpu)
    assert segments == expected
    if gpu.memory_total_mb is not None:
        assert sum(s.mb for s in segments) == gpu.memory_total_mb


def test_a_hosts_requests_per_second_come_from_its_models_totals() -> None:
    assert request_rate([], 100.0, 10.0) == 0.0
    samples = [(0.0, 100), (2.0, 120), (4.0, 140), (9.0, 190)]
    assert request_rate(samples, 10.0, 10.0) == pytest.approx(9.0)  # 90 over 10 s
    assert request_rate(samples, 12.0, 10.0) == pytest.approx(7.0)  # from (2.0, 120)
    assert request_rate(samples, 30.0, 10.0) == 0.0  # nothing for longer than the window
    assert request_rate([(0.0, 50), (1.0, 3)], 2.0, 10.0) == 0.0  # the agent restarted
    assert request_rate([(0.0, 7)], 1.0, 10.0) == 0.0  # one sample: no rate yet


def test_model_traffic_is_sampled_into_the_hosts_rate(store: BusStore, clock: FakeClock) -> None:
    for second, (qwen, whisper) in enumerate(((10, 0), (20, 5), (20, 5), (40, 15))):
        clock.now = 100.0 + 2 * second
        for name, total in (("qwen3-vl-30b", qwen), ("whisperx", whisper)):
            model = model_state(name).model_copy(update={"requests_total": total})
            store.apply(GPU1.model(name), enc(model))
    view = store.host("gpu1")
    assert view is not None
    # Unchanged totals add no sample; the rate reads 45 requests over the 6 s seen.
    assert [total for _, total in view.traffic] == [10, 20, 25, 45, 55]
    assert view.requests_per_s(store.now()) == pytest.approx((55 - 10) / 6)


def test_the_req_column_shows_requests_answered_and_queued() -> None:
    busy = model_state().model_copy(update={"in_flight": 2, "waiting": 5})
    assert requests_text(busy).plain == "2+5"
    assert requests_text(model_state()).plain == "-"
    assert requests_text(model_state().model_copy(update={"waiting": 1})).plain == "0+1"


def test_a_stopping_models_memory_keeps_its_name_until_it_is_back() -> None:
    # whisperx's process is gone; the driver still shows 6 GiB used that no process holds.
    gpu = gpu_state(
        memory_used_mb=6144 + 1024,
        processes=[GpuProcess(pid=9, used_mb=1024)],
    )
    assert vram_segments(gpu)[:1] == [Segment("other", 7168)]
    segments = vram_segments(gpu, {"whisperx": 6144})
    assert segments[:2] == [Segment("whisperx", 6144, stopping=True), Segment("other", 1024)]
    # Once the driver gave most of it back, only what is still held is named.
    partly = gpu_state(memory_used_mb=2048, processes=[])
    assert vram_segments(partly, {"whisperx": 6144})[0] == Segment("whisperx", 2048, stopping=True)


def test_a_host_names_the_models_being_stopped_on_each_gpu(store: BusStore) -> None:
    for name, gpus, used in (("a", [0], 4000), ("b", [0, 1], 8000), ("c", [1], 100)):
        model = model_state(name, ModelLifecycle.UNLOADING).model_copy(
            update={"gpus": gpus, "vram_used_mb": used}
        )
        store.apply(GPU1.model(name), enc(model))
    store.apply(GPU1.model("d"), enc(model_state("d")))  # ready: not stopping
    view = store.host("gpu1")
    assert view is not None
    assert view.stopping_on(0) == {"a": 4000, "b": 4000}
    assert view.stopping_on(1) == {"b": 4000, "c": 100}


def test_each_gpus_last_ten_minutes_are_kept_for_its_sparklines(
    store: BusStore, clock: FakeClock
) -> None:
    for second in range(0, 800, 100):
        clock.now = 100.0 + second
        gpu = gpu_state(memory_used_mb=16304, utilization_percent=second // 10)
        store.apply(GPU1.gpu(0), enc(gpu))
    view = store.host("gpu1")
    assert view is not None
    memory = view.memory_history(0)
    # 700 s of samples: the oldest, more than HISTORY_S (600 s) old, is gone.
    assert [moment for moment, _ in memory] == [200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0]
    assert memory[0][1] == pytest.approx(16304 / gpu_state().memory_total_mb)  # type: ignore[operator]
    assert [busy for _, busy in view.utilization_history(0)][-1] == pytest.approx(0.7)
    assert view.memory_history(5) == []


def test_a_hosts_weights_are_kept_and_cleared(store: BusStore) -> None:
    weights = WeightsState(
        weights=[
            InstalledWeights(
                name="acme--big", repo="acme/big", size_mb=8, path="/w/acme--big", used_by=["m"]
            )
        ],
        weights_dir="/w",
        used_mb=8,
        disk_total_mb=100,
        disk_free_mb=60,
        ts=T0,
    )
    assert store.apply(GPU1.weights, enc(weights), retained=True) == Change("gpu1", "weights")
    assert store.apply(GPU1.weights, enc(weights)) is None  # the same again
    view = store.host("gpu1")
    assert view is not None and view.weights == weights
    assert store.apply(GPU1.weights, b"[]") is None
    assert store.skipped["invalid_payload:weights"] == 1
    assert view.weights == weights  # a bad message changes nothing
    assert store.apply(GPU1.weights, b"") == Change("gpu1", "weights")
    assert view.weights is None
