"""Installing weights over the real broker: a real agent process downloads from a local
fake Hugging Face hub (the real huggingface_hub code runs against it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.installer import allowed
from tests.support.agent_process import AgentProcess
from tests.support.fake_hub import FakeHub, safetensors_bytes
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker
MIB = 1024 * 1024
REPO = "acme/tiny-llm"
TENSORS = {
    "model.embed.weight": ("BF16", (1024, 512)),
    "model.layer0.weight": ("BF16", (512, 512)),
    "model.norm": ("F32", (512,)),
}


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        server.add_repo(
            REPO,
            {
                "config.json": json.dumps({"architectures": ["TinyLM"]}),
                "model-00001-of-00002.safetensors": safetensors_bytes(TENSORS),
                "model-00002-of-00002.bin": 3 * MIB,
                "README.md": "# tiny\n",
            },
        )
        server.add_repo("acme/gated", {"model.safetensors": safetensors_bytes(TENSORS)}, gated=True)
        yield server


@pytest.fixture
def weights_dir(tmp_path: Path) -> Path:
    return tmp_path / "weights"


@pytest.fixture
def start(
    start_host: Callable[..., AgentProcess], hub: FakeHub, weights_dir: Path
) -> Callable[..., AgentProcess]:
    def run(models: dict[str, Any] | None = None, **weights: Any) -> AgentProcess:
        return start_host(
            models or {},
            extra={"weights": {"dir": str(weights_dir), "endpoint": hub.endpoint, **weights}},
        )

    return run


def job_messages(host: Host, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in host.bus.on(host.topics.job(job_id)) if m.payload]


async def finished(host: Host, job_id: str, timeout: float = 30) -> dict[str, Any]:
    message = await host.bus.wait_topic(
        host.topics.job(job_id),
        lambda v: v is not None and v["state"] in ("succeeded", "failed", "cancelled"),
        timeout=timeout,
    )
    return json.loads(message.payload)


def weights(host: Host) -> dict[str, Any]:
    message = host.bus.latest(host.topics.weights)
    assert message is not None
    return json.loads(message.payload)


def part_files(root: Path) -> dict[str, int]:
    """Unfinished downloads (``.cache/modelbus/<path>.<etag>.part``) by file name, with sizes."""
    return {
        p.name.split(".part")[0].rsplit(".", 1)[0]: p.stat().st_size for p in root.rglob("*.part")
    }


def holds(path: Path, size: int) -> bool:
    return path.exists() and path.stat().st_size == size


async def on_disk(path: Path, size: int, timeout: float = 20) -> None:
    """Until ``path`` holds ``size`` bytes (files download in parallel)."""
    async with asyncio.timeout(timeout):
        # A file on disk has no event to wait on.
        while not holds(path, size):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def downloaded(hub: FakeHub, weights_dir: Path, name: str, timeout: float = 20) -> None:
    """Until ``name`` of REPO is complete on disk."""
    await on_disk(weights_dir / "tiny-llm" / name, len(hub.file_content(REPO, name)), timeout)


async def part_written(weights_dir: Path, name: str, size: int) -> Path:
    """Until the part file of ``name`` of REPO holds ``size`` bytes; its path."""
    async with asyncio.timeout(20):
        while not (found := list((weights_dir / "tiny-llm").rglob(f"{name}.*.part"))):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    await on_disk(found[0], size)
    return found[0]


async def test_install_reports_byte_progress_and_lists_the_weights(
    start: Callable[..., AgentProcess], host: Host, hub: FakeHub, weights_dir: Path
) -> None:
    start(models={"tiny": sim_model(1024, weights="tiny-llm")})
    await host.online()
    empty = await host.bus.wait_topic(host.topics.weights, lambda v: v is not None)
    assert json.loads(empty.payload)["weights"] == []
    hub.throttle(2 * MIB)  # ~2 s, so progress is seen on the way

    reply = await host.ask("install", {"repo": REPO})
    assert reply.status == "ok", reply.error
    assert reply.job_id is not None
    job = await finished(host, reply.job_id)
    assert job["state"] == "succeeded", job
    assert job["command"] == "install" and job["repo"] == REPO and job["model"] == "tiny-llm"

    progress = [m for m in job_messages(host, reply.job_id) if m["state"] == "running"]
    done = [m["bytes_done"] for m in progress if m["bytes_done"] is not None]
    assert len(done) >= 3 and done == sorted(done) and done[-1] > done[0]
    total = sum(len(hub.file_content(REPO, f)) for f in ("config.json", "README.md"))
    total += len(hub.file_content(REPO, "model-00001-of-00002.safetensors")) + 3 * MIB
    assert {m["bytes_total"] for m in progress if m["bytes_total"]} == {total}
    assert job["bytes_done"] == job["bytes_total"] == total
    assert any(m["eta_s"] is not None for m in progress)

    result = job["result"]
    assert result["revision"] == hub._repos[REPO].refs["main"]
    estimate = result["vram_estimate"]
    params = 1024 * 512 + 512 * 512 + 512
    assert estimate["parameters"] == params and estimate["dtype"] == "BF16"
    assert estimate["vram_mb"] >= 1024 and "estimate" in estimate["note"]
    assert "tiny-llm" in result["suggested_catalog_entry"]

    path = weights_dir / "tiny-llm"
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.bin"):
        assert (path / name).read_bytes() == hub.file_content(REPO, name)
    listing = await host.bus.wait_topic(
        host.topics.weights, lambda v: v is not None and v["weights"]
    )
    installed = json.loads(listing.payload)["weights"]
    assert [(w["name"], w["repo"], w["used_by"]) for w in installed] == [
        ("tiny-llm", REPO, ["tiny"])
    ]
    assert installed[0]["revision"] == result["revision"]
    assert installed[0]["path"] == str(path)
    assert json.loads(listing.payload)["disk_free_mb"] > 0


async def test_bare_text_installs_and_a_second_request_joins(
    start: Callable[..., AgentProcess], host: Host, hub: FakeHub
) -> None:
    start()
    await host.online()
    hold = hub.hold_after("model-00002-of-00002.bin", MIB)
    first = await host.ask("install", REPO)
    assert first.status == "ok" and first.job_id
    await asyncio.to_thread(hold.reached.wait, 20)
    second = await host.ask("install", {"repo": REPO})
    assert second.job_id == first.job_id
    assert second.data is not None and second.data["joined"] is True
    other_options = await host.ask("install", {"repo": REPO, "include": ["*.json"]})
    assert other_options.status == "error" and other_options.error is not None
    assert other_options.error.code == "busy"
    hold.release()
    assert (await finished(host, first.job_id))["state"] == "succeeded"


@pytest.mark.parametrize(
    ("payload", "code", "words"),
    [
        ({"repo": "acme/missing"}, "not_found", "acme/missing"),
        ({"repo": REPO, "revision": "no-such-branch"}, "not_found", "no-such-branch"),
        ({"repo": "acme/gated"}, "forbidden", "gated"),
        ({"repo": REPO, "include": ["*.gguf"]}, "not_found", "no files"),
    ],
)
async def test_hub_refusals_fail_the_job_and_install_nothing(
    start: Callable[..., AgentProcess],
    host: Host,
    weights_dir: Path,
    payload: dict[str, Any],
    code: str,
    words: str,
) -> None:
    start()
    await host.online()
    reply = await host.ask("install", {**payload, "wait": True})
    assert reply.status == "error" and reply.error is not None, reply
    assert reply.error.code == code and words in reply.error.message, reply.error
    state = weights(host)
    assert state["weights"] == []
    assert [p["name"] for p in state["partial"]] == []


async def test_gated_repo_installs_with_a_token(
    start: Callable[..., AgentProcess], host: Host
) -> None:
    start(token="hf_fake_token")
    await host.online()
    reply = await host.ask("install", {"repo": "acme/gated", "wait": True})
    assert reply.status == "ok", reply.error


async def test_refusals_before_any_download(
    start: Callable[..., AgentProcess], host: Host, hub: FakeHub
) -> None:
    start(allow=["trusted/*", "acme/gated"])
    await host.online()
    reply = await host.ask("install", {"repo": REPO})
    assert reply.status == "error" and reply.error is not None
    assert reply.error.code == "forbidden" and "weights.allow" in reply.error.message
    for bad in ({"repo": "../etc"}, {"repo": "a--b/c"}, {"repo": "acme/gated", "name": ".."}):
        refused = await host.ask("install", bad)
        assert refused.status == "error" and refused.error is not None
        assert refused.error.code == "invalid_payload", (bad, refused.error)
    assert hub.gets(".json") == []


async def test_insufficient_disk_is_checked_before_downloading(
    start: Callable[..., AgentProcess], host: Host, hub: FakeHub
) -> None:
    start(disk_reserve_mb=1024**3)  # a petabyte must stay free
    await host.online()
    reply = await host.ask("install", {"repo": REPO, "wait": True})
    assert reply.status == "error" and reply.error is not None
    assert reply.error.code == "insufficient_disk" and "GiB" in reply.error.message
    assert hub.gets("model-00002-of-00002.bin") == []


async def test_cancel_mid_download_keeps_nothing_installed_and_a_retry_resumes(
    start: Callable[..., AgentProcess], host: Host, hub: FakeHub, weights_dir: Path
) -> None:
    start()
    await host.online()
    hold = hub.hold_after("model-00002-of-00002.bin", MIB)
    reply = await host.ask("install", {"repo": REPO})
    assert reply.job_id is not None
    await asyncio.to_thread(hold.reached.wait, 20)
    await downloaded(hub, weights_dir, "model-00001-of-00002.safetensors")
    await part_written(weights_dir, "model-00002-of-00002.bin", MIB)
    cancel = await host.ask("cancel", reply.job_id)
    assert cancel.status == "ok", cancel.error
    job = await finished(host, reply.job_id)
    hold.release()
    assert job["state"] == "cancelled"
    state = await host.bus.wait_topic(host.topics.weights, lambda v: v is not None and v["partial"])
    listing = json.loads(state.payload)
    assert listing["weights"] == []
    assert [p["name"] for p in listing["partial"]] == ["tiny-llm"]
    # The cancelled file's bytes are kept for the retry; it does not count as there.
    assert part_files(weights_dir) == {"model-00002-of-00002.bin": MIB}
    assert not (weights_dir / "tiny-llm" / "model-00002-of-00002.bin").exists()

    # Again: the files that were complete are not downloaded a second time, and the cancelled
    # one is asked for from where its part file ended.
    safetensors_gets = len(hub.gets("model-00001-of-00002.safetensors"))
    retry = await host.ask("install", {"repo": REPO, "wait": True})
    assert retry.status == "ok", retry.error
    assert len(hub.gets("model-00001-of-00002.safetensors")) == safetensors_gets
    assert [r.range for r in hub.gets("model-00002-of-00002.bin")] == [None, f"bytes={MIB}-"]
    path = weights_dir / "tiny-llm" / "model-00002-of-00002.bin"
    assert path.read_bytes() == hub.file_content(REPO, "model-00002-of-00002.bin")
    assert part_files(weights_dir) == {}
    assert retry.data is not None and retry.data["job"]["result"]["downloaded_mb"] == 2
    assert [w["name"] for w in weights(host)["weights"]] == ["tiny-llm"]
    assert weights(host)["partial"] == []


async def test_a_dropped_connection_is_resumed_with_a_range_request(
    start: Callable[..., AgentProcess], host: Host, hub: FakeHub, weights_dir: Path
) -> None:
    start()
    await host.online()
    hub.drop_after("model-00002-of-00002.bin", 2 * MIB + 1000)
    reply = await host.ask("install", {"repo": REPO, "wait": True})
    assert reply.status == "ok", reply.error
    ranges = [r.range for r in hub.gets("model-00002-of-00002.bin")]
    assert len(ranges) == 2 and ranges[1] is not None and ranges[1].startswith("bytes=")
    path = weights_dir / "tiny-llm" / "model-00002-of-00002.bin"
    assert path.read_bytes() == hub.file_content(REPO, "model-00002-of-00002.bin")


async def test_a_swap_is_not_held_up_by_a_download(
    start: Callable[..., AgentProcess], host: Host, hub: FakeHub
) -> None:
    start(models={"m": sim_model(1024)})
    await host.online()
    hold = hub.hold_after("model-00002-of-00002.bin", MIB)
    install = await host.ask("install", {"repo": REPO})
    await asyncio.to_thread(hold.reached.wait, 20)
    switch = await host.ask("switch", {"model": "m", "wait": True})
    assert switch.status == "ok", switch.error
    running = job_messages(host, install.job_id or "")[-1]
    assert running["state"] == "running"
    hold.release()
    assert (await finished(host, install.job_id or ""))["state"] == "succeeded"


async def test_uninstall_refuses_what_a_loaded_model_uses_and_paths_outside(
    start: Callable[..., AgentProcess], host: Host, weights_dir: Path, tmp_path: Path
) -> None:
    start(models={"tiny": sim_model(1024, weights="tiny-llm")})
    await host.online()
    assert (await host.ask("install", {"repo": REPO, "wait": True})).status == "ok"
    assert (await host.ask("load", {"model": "tiny", "wait": True})).status == "ok"

    busy = await host.ask("uninstall", "tiny-llm")
    assert busy.status == "error" and busy.error is not None
    assert busy.error.code == "busy" and "tiny" in busy.error.message

    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (weights_dir / "evil").symlink_to(outside)
    for name, code in (("evil", "forbidden"), ("..", "invalid_payload"), ("nope", "not_found")):
        refused = await host.ask("uninstall", {"name": name})
        assert refused.status == "error" and refused.error is not None
        assert refused.error.code == code, (name, refused.error)
    assert (outside / "keep.txt").read_text() == "keep"
    bad = await host.ask("uninstall", {"name": "../precious"})
    assert bad.error is not None and bad.error.code == "invalid_payload"

    assert (await host.ask("unload", {"model": "tiny", "wait": True})).status == "ok"
    removed = await host.ask("uninstall", "tiny-llm")
    assert removed.status == "ok", removed.error
    assert removed.data is not None and removed.data["was"] == "installed"
    assert removed.data["freed_mb"] >= 3
    assert not (weights_dir / "tiny-llm").exists()
    await host.bus.wait_topic(host.topics.weights, lambda v: v is not None and not v["weights"])


async def test_an_install_interrupted_by_a_restart_resumes(
    start: Callable[..., AgentProcess], host: Host, hub: FakeHub, weights_dir: Path
) -> None:
    agent = start()
    await host.online()
    hold = hub.hold_after("model-00002-of-00002.bin", MIB)
    reply = await host.ask("install", {"repo": REPO})
    await asyncio.to_thread(hold.reached.wait, 20)
    await downloaded(hub, weights_dir, "model-00001-of-00002.safetensors")
    await part_written(weights_dir, "model-00002-of-00002.bin", MIB)
    agent.kill()  # no goodbye, no cleanup: the worst case
    hold.release()
    safetensors_gets = len(hub.gets("model-00001-of-00002.safetensors"))
    start()
    job = await finished(host, reply.job_id or "")
    assert job["state"] == "failed" and "restarted" in (job["message"] or "")
    partial = await host.bus.wait_topic(
        host.topics.weights, lambda v: v is not None and v["partial"]
    )
    assert json.loads(partial.payload)["weights"] == []
    # The killed download's bytes are kept, and the next install resumes them.
    assert part_files(weights_dir) == {"model-00002-of-00002.bin": MIB}
    again = await host.ask("install", {"repo": REPO, "wait": True})
    assert again.status == "ok", again.error
    assert len(hub.gets("model-00001-of-00002.safetensors")) == safetensors_gets
    assert hub.gets("model-00002-of-00002.bin")[-1].range == f"bytes={MIB}-"
    assert part_files(weights_dir) == {}


def test_allow_list_patterns() -> None:
    assert allowed("acme/x", [])
    assert allowed("acme/x", ["acme/*"]) and not allowed("other/x", ["acme/*"])
    assert allowed("gpt2", ["gpt2"]) and not allowed("acme/gpt2", ["gpt2"])
