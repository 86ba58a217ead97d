"""The planner against the original VRAM budget (one 32 GB GPU) and random hosts."""

from __future__ import annotations

import math
from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.planner import (
    GpuMemory,
    Plan,
    Refusal,
    Resident,
    Target,
    plan_load,
    plan_switch,
)

TOTAL_MB = 32768  # the simulated 32 GB GPU
SIZE_MB = {
    "qwen3-vl-30b": 17408,
    "whisperx": 6144,
    "ovi-11b": 22528,
    "wan2.1-14b": 28672,
    "infinitetalk": 8192,
}


def loaded(name: str, last_used: float, **overrides: object) -> Resident:
    fields: dict[str, object] = {"gpus": (0,), "vram_mb": SIZE_MB[name], "last_used": last_used}
    fields.update(overrides)
    return Resident(name, **fields)  # type: ignore[arg-type]


def in_load_order(*names: str) -> list[Resident]:
    """Residents loaded one after the other: the first is the least recently used."""
    return [loaded(name, last_used=float(i + 1)) for i, name in enumerate(names)]


def gpu_with(residents: list[Resident], index: int = 0) -> GpuMemory:
    used = sum(r.vram_mb // len(r.gpus) for r in residents if index in r.gpus)
    return GpuMemory(index, TOTAL_MB, TOTAL_MB - used)


def target(name: str, vram_mb: int | None = None, *placements: tuple[int, ...]) -> Target:
    return Target(name, SIZE_MB[name] if vram_mb is None else vram_mb, placements or ((0,),))


def switch(residents: list[Resident], name: str, **kwargs: object) -> Plan | Refusal:
    return plan_switch([gpu_with(residents)], residents, target(name), **kwargs)  # type: ignore[arg-type]


# ---- the original budget on one 32 GB GPU ---------------------------------


@pytest.mark.parametrize(
    ("residents", "model", "evict", "free_before", "free_after"),
    [
        pytest.param([], "qwen3-vl-30b", (), 32768, 15360, id="empty-gpu-qwen-fits"),
        pytest.param(
            in_load_order("qwen3-vl-30b", "whisperx"),
            "infinitetalk",
            (),
            9216,
            1024,
            id="infinitetalk-fits-beside-qwen-and-whisperx",
        ),
        pytest.param(
            # qwen alone leaves 18432 < 22528; the next least recently used goes too.
            in_load_order("qwen3-vl-30b", "whisperx", "infinitetalk"),
            "ovi-11b",
            ("qwen3-vl-30b", "whisperx"),
            1024,
            2048,
            id="ovi-evicts-lru-until-it-fits",
        ),
        pytest.param(
            # Greedy takes infinitetalk, whisperx, qwen; qwen made whisperx unnecessary.
            in_load_order("infinitetalk", "whisperx", "qwen3-vl-30b"),
            "ovi-11b",
            ("infinitetalk", "qwen3-vl-30b"),
            1024,
            4096,
            id="ovi-gives-back-an-unneeded-eviction",
        ),
        pytest.param(
            # Equal priority and age: the larger goes first, so two models, not three.
            [loaded(n, last_used=0.0) for n in ("whisperx", "infinitetalk", "qwen3-vl-30b")],
            "ovi-11b",
            ("qwen3-vl-30b", "infinitetalk"),
            1024,
            4096,
            id="ovi-larger-first-among-equals",
        ),
        pytest.param(
            in_load_order("qwen3-vl-30b", "whisperx", "infinitetalk"),
            "wan2.1-14b",
            ("qwen3-vl-30b", "whisperx", "infinitetalk"),
            1024,
            4096,
            id="wan-needs-everything-out",
        ),
    ],
)
def test_switch_on_the_original_budget(
    residents: list[Resident],
    model: str,
    evict: tuple[str, ...],
    free_before: int,
    free_after: int,
) -> None:
    plan = switch(residents, model)
    assert isinstance(plan, Plan)
    assert plan.gpus == (0,)
    assert plan.evict == evict
    assert plan.required_mb == SIZE_MB[model]
    assert plan.free_before_mb == {0: free_before}
    assert plan.freed_mb == {0: sum(SIZE_MB[name] for name in evict)}
    assert plan.free_after_mb == {0: free_after}
    assert not plan.already_loaded


def test_pinned_whisperx_blocks_wan() -> None:
    residents = [loaded("qwen3-vl-30b", 1.0), loaded("whisperx", 2.0, pinned=True)]
    refusal = switch(residents, "wan2.1-14b")
    assert refusal == Refusal(
        code="insufficient_vram",
        message="wan2.1-14b needs 28672 MiB on GPU 0; 9216 MiB is free and evicting "
        "17408 MiB more is allowed (whisperx is pinned)",
        required_mb=28672,
        available_mb=9216,
        evictable_mb=17408,
        gpus=(0,),
    )


def test_priority_beats_least_recently_used() -> None:
    residents = [
        loaded("whisperx", 1.0, priority=1),  # oldest, but more important
        loaded("infinitetalk", 2.0, priority=0),
        loaded("qwen3-vl-30b", 3.0, priority=2),
    ]
    plan = plan_switch([gpu_with(residents)], residents, Target("tts-5gb", 5120, ((0,),)))
    assert isinstance(plan, Plan)
    assert plan.evict == ("infinitetalk",)
    assert plan.free_after_mb == {0: 1024 + 8192 - 5120}


def test_least_recently_used_among_equal_priority() -> None:
    residents = [
        loaded("infinitetalk", 2.0),
        loaded("whisperx", 1.0),  # least recently used of the two
        loaded("qwen3-vl-30b", 3.0),
    ]
    plan = plan_switch([gpu_with(residents)], residents, Target("tts-5gb", 5120, ((0,),)))
    assert isinstance(plan, Plan)
    assert plan.evict == ("whisperx",)


def test_name_settles_a_full_tie_whatever_the_input_order() -> None:
    twins = [Resident("b-twin", (0,), 6144), Resident("a-twin", (0,), 6144)]
    for residents in (twins, twins[::-1]):
        plan = plan_switch([GpuMemory(0, TOTAL_MB, 1024)], residents, Target("t", 5000, ((0,),)))
        assert isinstance(plan, Plan)
        assert plan.evict == ("a-twin",)


def test_busy_model_is_passed_over() -> None:
    residents = [
        loaded("whisperx", 1.0, busy=True),
        loaded("infinitetalk", 2.0),
        loaded("qwen3-vl-30b", 3.0),
    ]
    plan = plan_switch([gpu_with(residents)], residents, Target("tts-5gb", 5120, ((0,),)))
    assert isinstance(plan, Plan)
    assert plan.evict == ("infinitetalk",)


def test_busy_model_that_blocks_is_named() -> None:
    residents = [
        loaded("qwen3-vl-30b", 1.0, busy=True),
        loaded("whisperx", 2.0, pinned=True),
        loaded("infinitetalk", 3.0),
    ]
    refusal = switch(residents, "ovi-11b")
    assert isinstance(refusal, Refusal)
    assert (refusal.required_mb, refusal.available_mb, refusal.evictable_mb) == (22528, 1024, 8192)
    assert refusal.message.endswith("(whisperx is pinned; qwen3-vl-30b is busy)")


def test_exclusive_evicts_everything_evictable_on_the_gpu() -> None:
    residents = in_load_order("qwen3-vl-30b", "whisperx")
    plan = switch(residents, "infinitetalk", exclusive=True)
    assert isinstance(plan, Plan)
    assert plan.evict == ("qwen3-vl-30b", "whisperx")
    assert plan.free_after_mb == {0: 32768 - 8192}


def test_exclusive_leaves_pinned_models() -> None:
    residents = [loaded("qwen3-vl-30b", 1.0), loaded("whisperx", 2.0, pinned=True)]
    plan = switch(residents, "infinitetalk", exclusive=True)
    assert isinstance(plan, Plan)
    assert plan.evict == ("qwen3-vl-30b",)
    assert plan.free_after_mb == {0: 32768 - 6144 - 8192}


def test_exclusive_still_refuses_when_even_that_is_not_enough() -> None:
    residents = [loaded("qwen3-vl-30b", 1.0), loaded("whisperx", 2.0, pinned=True)]
    refusal = switch(residents, "wan2.1-14b", exclusive=True)
    assert isinstance(refusal, Refusal)
    assert (refusal.available_mb, refusal.evictable_mb) == (9216, 17408)


def test_load_fits_beside_what_is_loaded() -> None:
    residents = in_load_order("qwen3-vl-30b", "whisperx")
    plan = plan_load([gpu_with(residents)], residents, target("infinitetalk"))
    assert isinstance(plan, Plan)
    assert plan.evict == ()
    assert plan.free_after_mb == {0: 1024}


def test_load_never_evicts() -> None:
    residents = in_load_order("qwen3-vl-30b", "whisperx", "infinitetalk")
    refusal = plan_load([gpu_with(residents)], residents, target("ovi-11b"))
    assert refusal == Refusal(
        code="insufficient_vram",
        message="ovi-11b needs 22528 MiB on GPU 0; 1024 MiB is free and a load evicts "
        "nothing (a switch could free 31744 MiB more)",
        required_mb=22528,
        available_mb=1024,
        evictable_mb=0,
        gpus=(0,),
    )


def test_headroom_is_kept_free() -> None:
    residents = in_load_order("qwen3-vl-30b", "whisperx")
    # 9216 free fits infinitetalk (8192) but not with 2048 MiB to spare.
    plan = switch(residents, "infinitetalk", headroom_mb=2048)
    assert isinstance(plan, Plan)
    assert plan.evict == ("qwen3-vl-30b",)
    assert plan.free_after_mb == {0: 9216 + 17408 - 8192}


def test_headroom_is_named_in_a_refusal() -> None:
    refusal = plan_switch(
        [GpuMemory(0, TOTAL_MB, 29000)], [], target("wan2.1-14b"), headroom_mb=1024
    )
    assert isinstance(refusal, Refusal)
    assert refusal.message == (
        "wan2.1-14b needs 28672 MiB on GPU 0 plus 1024 MiB headroom; 29000 MiB is free and "
        "evicting 0 MiB more is allowed (the rest is held by processes that are not managed "
        "models)"
    )


def test_model_larger_than_the_gpu() -> None:
    refusal = plan_switch([gpu_with([])], [], Target("giant", 40000, ((0,),)))
    assert isinstance(refusal, Refusal)
    assert refusal.message.endswith("(GPU 0 has only 32768 MiB in all)")


def test_minimal_set_is_not_largest_first() -> None:
    # Greedy by order takes a, b then c; c alone suffices, so a and b are given back.
    residents = [
        Resident("a", (0,), 2000, last_used=1.0),
        Resident("b", (0,), 3000, last_used=2.0),
        Resident("c", (0,), 10000, last_used=3.0),
    ]
    plan = plan_switch([GpuMemory(0, 16000, 1000)], residents, Target("t", 10000, ((0,),)))
    assert isinstance(plan, Plan)
    assert plan.evict == ("c",)


def test_already_loaded_needs_nothing_even_when_exclusive() -> None:
    residents = in_load_order("qwen3-vl-30b", "whisperx")
    for result in (
        switch(residents, "qwen3-vl-30b", exclusive=True),
        plan_load([gpu_with(residents)], residents, target("qwen3-vl-30b")),
    ):
        assert result == Plan(
            gpus=(0,),
            evict=(),
            required_mb=17408,
            free_before_mb={0: 9216},
            freed_mb={0: 0},
            free_after_mb={0: 9216},
            already_loaded=True,
        )


# ---- several GPUs -----------------------------------------------------------


def test_split_target_over_two_gpus() -> None:
    residents = [loaded("qwen3-vl-30b", 1.0), loaded("whisperx", 2.0, gpus=(1,))]
    gpus = [gpu_with(residents, 0), gpu_with(residents, 1)]
    plan = plan_switch(gpus, residents, Target("big", 40001, ((0, 1),)))
    assert plan == Plan(
        gpus=(0, 1),
        evict=("qwen3-vl-30b",),
        required_mb=20001,  # rounded up
        free_before_mb={0: 15360, 1: 26624},
        freed_mb={0: 17408, 1: 0},
        free_after_mb={0: 12767, 1: 6623},
    )


def test_resident_spanning_two_gpus_frees_on_both() -> None:
    spanning = Resident("spanning", (0, 1), 40001, last_used=1.0)  # 20000 each, rounded down
    gpus = [GpuMemory(0, TOTAL_MB, 12768), GpuMemory(1, TOTAL_MB, 12768)]
    plan = plan_switch(gpus, [spanning], Target("t", 60000, ((0, 1),)))
    assert isinstance(plan, Plan)
    assert plan.evict == ("spanning",)
    assert plan.freed_mb == {0: 20000, 1: 20000}
    assert plan.free_after_mb == {0: 2768, 1: 2768}

    plan = plan_switch(gpus, [spanning], Target("t", 30000, ((0,),)))
    assert isinstance(plan, Plan)
    assert plan.freed_mb == {0: 20000}


def test_prefers_the_placement_needing_no_eviction() -> None:
    on_gpu0 = in_load_order("qwen3-vl-30b", "whisperx", "infinitetalk")
    gpus = [gpu_with(on_gpu0, 0), gpu_with(on_gpu0, 1)]
    plan = plan_switch(gpus, on_gpu0, Target("ovi-11b", 22528, ((0,), (1,))))
    assert isinstance(plan, Plan)
    assert (plan.gpus, plan.evict) == ((1,), ())


def test_among_evicting_placements_the_least_thrown_away_wins() -> None:
    residents = [
        Resident("on0", (0,), 20000, last_used=1.0),
        Resident("on1", (1,), 12000, last_used=1.0),
    ]
    gpus = [GpuMemory(0, TOTAL_MB, 12768), GpuMemory(1, TOTAL_MB, 20768)]
    plan = plan_switch(gpus, residents, Target("t", 25000, ((0,), (1,))))
    assert isinstance(plan, Plan)
    assert (plan.gpus, plan.evict) == ((1,), ("on1",))


def test_preference_order_breaks_a_tie() -> None:
    gpus = [GpuMemory(0, TOTAL_MB, TOTAL_MB), GpuMemory(1, TOTAL_MB, TOTAL_MB)]
    for placements, chosen in ((((1,), (0,)), (1,)), (((0,), (1,)), (0,))):
        plan = plan_switch(gpus, [], Target("t", 1000, placements))
        assert isinstance(plan, Plan)
        assert plan.gpus == chosen


def test_refusal_reports_the_placement_that_came_closest() -> None:
    residents = [Resident("pinned", (1,), 10000, pinned=True), Resident("spare", (0,), 4000)]
    gpus = [GpuMemory(0, TOTAL_MB, 1000), GpuMemory(1, TOTAL_MB, 9000)]
    refusal = plan_switch(gpus, residents, Target("t", 20000, ((0,), (1,))))
    assert refusal == Refusal(
        code="insufficient_vram",
        message="t needs 20000 MiB on GPU 1; 9000 MiB is free and evicting 0 MiB more is "
        "allowed (pinned is pinned)",
        required_mb=20000,
        available_mb=9000,
        evictable_mb=0,
        gpus=(1,),
    )


def test_multi_gpu_refusal_names_the_tightest_gpu() -> None:
    gpus = [GpuMemory(0, TOTAL_MB, 30000), GpuMemory(1, TOTAL_MB, 5000)]
    refusal = plan_switch(gpus, [], Target("t", 20000, ((0, 1),)))
    assert isinstance(refusal, Refusal)
    assert refusal.message.startswith(
        "t needs 10000 MiB on each of GPUs 0 and 1; GPU 1 has 5000 MiB free"
    )
    assert (refusal.available_mb, refusal.gpus) == (5000, (0, 1))


def test_unknown_gpu_is_refused() -> None:
    refusal = plan_switch([gpu_with([])], [], Target("t", 1000, ((3,),)))
    assert refusal == Refusal(
        code="insufficient_vram",
        message="t asks for GPU 3, which does not exist on this host (GPUs here: 0)",
        required_mb=1000,
        available_mb=0,
        evictable_mb=0,
        gpus=(3,),
    )


@pytest.mark.parametrize(
    ("placements", "message"),
    [
        ((), "t has no candidate GPUs (GPUs here: 0 and 1)"),
        (((),), "t has an empty GPU placement (GPUs here: 0 and 1)"),
        (((0, 0),), "t names a GPU twice in placement (0, 0) (GPUs here: 0 and 1)"),
        (
            ((1, 2, 3),),
            "t asks for GPUs 2 and 3, which do not exist on this host (GPUs here: 0 and 1)",
        ),
    ],
)
def test_malformed_placements_are_refused(
    placements: tuple[tuple[int, ...], ...], message: str
) -> None:
    gpus = [GpuMemory(0, TOTAL_MB, TOTAL_MB), GpuMemory(1, TOTAL_MB, TOTAL_MB)]
    refusal = plan_switch(gpus, [], Target("t", 1000, placements))
    assert isinstance(refusal, Refusal)
    assert refusal.message == message


def test_unknown_gpu_placement_is_skipped_for_a_valid_one() -> None:
    plan = plan_switch([gpu_with([])], [], Target("t", 1000, ((3,), (0,))))
    assert isinstance(plan, Plan)
    assert plan.gpus == (0,)


def test_inputs_are_not_mutated() -> None:
    residents = in_load_order("qwen3-vl-30b", "whisperx", "infinitetalk")
    gpus = [gpu_with(residents)]
    residents_copy, gpus_copy = list(residents), list(gpus)
    plan_switch(gpus, residents, target("ovi-11b"))
    assert (residents, gpus) == (residents_copy, gpus_copy)


# ---- properties over random hosts -------------------------------------------


def mib(upper: int) -> st.SearchStrategy[int]:
    """Sizes spread evenly up to ``upper`` (plain integers() crowd near zero), with a few
    odd MiB so that splitting across GPUs has to round."""
    coarse = st.sampled_from(range(0, upper, 256))
    return st.builds(lambda c, f: min(c + f, upper), coarse, st.integers(0, 255))


@st.composite
def hosts(draw: st.DrawFn) -> tuple[list[GpuMemory], list[Resident], Target, int]:
    """A host whose free memory follows from its residents, less some memory held by
    processes the planner does not know about (clamped at zero, as NVML would)."""
    gpu_count = draw(st.integers(1, 4))
    indices = list(range(gpu_count))
    names = draw(st.lists(st.sampled_from([f"m{i}" for i in range(8)]), max_size=6, unique=True))
    residents = [
        Resident(
            name,
            gpus=tuple(draw(st.lists(st.sampled_from(indices), min_size=1, unique=True))),
            vram_mb=draw(mib(20000)),
            priority=draw(st.integers(0, 2)),
            pinned=draw(st.integers(0, 4)) == 0,  # mostly evictable, so plans evict
            last_used=float(draw(st.integers(0, 4))),  # few values, so ties happen
            busy=draw(st.integers(0, 4)) == 0,
        )
        for name in names
    ]
    gpus = []
    for index in indices:
        total = 8000 + draw(mib(24768))
        used = sum(r.vram_mb // len(r.gpus) for r in residents if index in r.gpus)
        unmanaged = draw(mib(2000))
        gpus.append(GpuMemory(index, total, max(0, total - used - unmanaged)))
    # Index gpu_count sometimes names a GPU that does not exist.
    gpu_index = st.sampled_from([*indices, *indices, gpu_count])
    placement = st.lists(gpu_index, min_size=1, max_size=3, unique=True)
    target = Target(
        draw(st.sampled_from(["target", "target", "target", "m0"])),  # sometimes loaded
        vram_mb=draw(mib(40000)),
        placements=tuple(tuple(p) for p in draw(st.lists(placement, min_size=1, max_size=3))),
        priority=draw(st.integers(0, 2)),
    )
    return gpus, residents, target, draw(st.integers(0, 2048))


def evictable(residents: list[Resident], target: Target, force: bool = False) -> list[Resident]:
    """Pinned, then busy, then priority (which force overrides) protect a model."""
    return [
        r
        for r in residents
        if not (r.pinned or r.busy or r.name == target.name)
        and (force or r.priority <= target.priority)
    ]


def freed_on(gpu: int, evicted: list[Resident]) -> int:
    return sum(r.vram_mb // len(r.gpus) for r in evicted if gpu in r.gpus)


def fits(
    gpus: list[GpuMemory],
    placement: tuple[int, ...],
    evicted: list[Resident],
    vram_mb: int,
    headroom_mb: int,
) -> bool:
    free = {g.index: g.free_mb for g in gpus}
    required = math.ceil(vram_mb / len(placement))
    return all(free[g] + freed_on(g, evicted) - required >= headroom_mb for g in placement)


def valid_placements(gpus: list[GpuMemory], target: Target) -> list[tuple[int, ...]]:
    known = {g.index for g in gpus}
    return [p for p in target.placements if set(p) <= known]


def check_plan(
    plan: Plan,
    gpus: list[GpuMemory],
    residents: list[Resident],
    target: Target,
    headroom_mb: int,
    force: bool = False,
) -> list[Resident]:
    """The checks every Plan passes; returns the evicted residents."""
    by_name = {r.name: r for r in residents}
    if plan.already_loaded:
        assert target.name in by_name
        assert plan.evict == ()
        assert plan.gpus == by_name[target.name].gpus
        return []
    assert target.name not in by_name
    assert plan.gpus in valid_placements(gpus, target)
    evicted = [by_name[name] for name in plan.evict]
    assert len(set(plan.evict)) == len(plan.evict)
    assert all(r in evictable(residents, target, force) for r in evicted)
    free = {g.index: g.free_mb for g in gpus}
    required = math.ceil(target.vram_mb / len(plan.gpus))
    assert plan.required_mb == required
    assert plan.free_before_mb == {g: free[g] for g in plan.gpus}
    assert plan.freed_mb == {g: freed_on(g, evicted) for g in plan.gpus}
    assert plan.free_after_mb == {
        g: plan.free_before_mb[g] + plan.freed_mb[g] - required for g in plan.gpus
    }
    assert all(after >= headroom_mb for after in plan.free_after_mb.values())
    order = [(r.priority, r.last_used, -r.vram_mb, r.name) for r in evicted]
    assert order == sorted(order)
    return evicted


def check_refusal(refusal: Refusal, gpus: list[GpuMemory], target: Target) -> None:
    assert refusal.code == "insufficient_vram"
    assert refusal.message
    if refusal.gpus in valid_placements(gpus, target):
        assert refusal.required_mb == math.ceil(target.vram_mb / len(refusal.gpus))


@settings(max_examples=400)
@given(hosts(), st.booleans(), st.booleans(), st.randoms(use_true_random=False))
def test_switch_properties(
    host: tuple[list[GpuMemory], list[Resident], Target, int],
    exclusive: bool,
    force: bool,
    random: Random,
) -> None:
    gpus, residents, target, headroom = host
    options = {"exclusive": exclusive, "force": force, "headroom_mb": headroom}
    result = plan_switch(gpus, residents, target, **options)

    shuffled = list(residents)
    random.shuffle(shuffled)  # the order residents arrive in must not matter
    again = plan_switch(gpus, shuffled, target, **options)
    assert again == result

    if isinstance(result, Refusal):
        check_refusal(result, gpus, target)
        assert target.name not in {r.name for r in residents}
        everything = evictable(residents, target, force)
        for placement in valid_placements(gpus, target):
            assert not fits(gpus, placement, everything, target.vram_mb, headroom)
        return

    evicted = check_plan(result, gpus, residents, target, headroom, force)
    if result.already_loaded:
        return
    if exclusive:
        allowed = evictable(residents, target, force)
        on_placement = [r for r in allowed if set(r.gpus) & set(result.gpus)]
        assert set(result.evict) == {r.name for r in on_placement}
    else:
        for spared in evicted:
            rest = [r for r in evicted if r is not spared]
            assert not fits(gpus, result.gpus, rest, target.vram_mb, headroom)
        if any(fits(gpus, p, [], target.vram_mb, headroom) for p in valid_placements(gpus, target)):
            assert result.evict == ()


@settings(max_examples=300)
@given(hosts())
def test_load_properties(host: tuple[list[GpuMemory], list[Resident], Target, int]) -> None:
    gpus, residents, target, headroom = host
    result = plan_load(gpus, residents, target, headroom_mb=headroom)
    assert plan_load(gpus, residents, target, headroom_mb=headroom) == result
    if isinstance(result, Refusal):
        check_refusal(result, gpus, target)
        assert result.evictable_mb == 0
        for placement in valid_placements(gpus, target):
            assert not fits(gpus, placement, [], target.vram_mb, headroom)
        return
    check_plan(result, gpus, residents, target, headroom)
    assert result.evict == ()


def test_a_target_evicts_only_models_of_its_priority_or_lower() -> None:
    """A low-priority model may not push out more important ones; force may, except
    what is pinned; the refusal names the models that kept the memory."""
    gpu = [GpuMemory(0, total_mb=32768, free_mb=2048)]
    residents = [
        Resident("chat", (0,), 17408, priority=20, last_used=1.0),
        Resident("asr", (0,), 6144, priority=0, last_used=2.0),
        Resident("tts", (0,), 7168, priority=50, pinned=True),
    ]
    low = Target("video", 20000, ((0,),), priority=0)
    refusal = plan_switch(gpu, residents, low)
    assert isinstance(refusal, Refusal)
    assert "chat (20) has a higher priority than video (0); force: true evicts it" in (
        refusal.message
    )
    assert "tts is pinned" in refusal.message
    assert refusal.evictable_mb == 6144  # only asr was allowed
    forced = plan_switch(gpu, residents, low, force=True)
    assert isinstance(forced, Plan) and set(forced.evict) == {"chat", "asr"}
    # Equal priority is fair game, and a higher target needs no force.
    equal = plan_switch(gpu, residents, Target("video", 20000, ((0,),), priority=20))
    assert isinstance(equal, Plan) and set(equal.evict) == {"chat", "asr"}
    # exclusive empties what it may, no more.
    exclusive = plan_switch(gpu, residents, Target("small", 1000, ((0,),)), exclusive=True)
    assert isinstance(exclusive, Plan) and exclusive.evict == ("asr",)


# ---- residents that keep their GPUs to themselves -------------------------


def test_an_exclusive_resident_makes_way_even_when_memory_would_fit() -> None:
    residents = [loaded("whisperx", 1.0, exclusive=True)]
    plan = switch(residents, "infinitetalk")
    assert isinstance(plan, Plan) and plan.evict == ("whisperx",)


def test_an_exclusive_resident_stops_first_and_the_rest_only_as_needed() -> None:
    residents = [loaded("infinitetalk", 1.0), loaded("whisperx", 2.0, exclusive=True)]
    # whisperx must go; with its memory back, qwen fits beside infinitetalk.
    plan = switch(residents, "qwen3-vl-30b")
    assert isinstance(plan, Plan) and plan.evict == ("whisperx",)


def test_a_load_never_evicts_an_exclusive_resident() -> None:
    residents = [loaded("whisperx", 1.0, exclusive=True)]
    refused = plan_load([gpu_with(residents)], residents, target("infinitetalk"))
    assert isinstance(refused, Refusal)


@pytest.mark.parametrize("protection", [{"pinned": True}, {"busy": True}])
def test_an_exclusive_resident_that_may_not_go_rules_its_gpus_out(
    protection: dict[str, bool],
) -> None:
    residents = [loaded("whisperx", 1.0, exclusive=True, **protection)]
    refused = switch(residents, "infinitetalk")
    assert isinstance(refused, Refusal)
    assert "whisperx is " + ("pinned" if "pinned" in protection else "busy") in refused.message


def test_an_exclusive_resident_elsewhere_is_left_alone() -> None:
    residents = [loaded("whisperx", 1.0, exclusive=True, gpus=(1,))]
    gpus = [GpuMemory(0, TOTAL_MB, TOTAL_MB), GpuMemory(1, TOTAL_MB, TOTAL_MB - 6144)]
    plan = plan_switch(gpus, residents, target("infinitetalk"))
    assert isinstance(plan, Plan) and plan.evict == () and plan.gpus == (0,)
