"""agent.hub against FakeHub: the real huggingface_hub and the byte transfer, in the real child
process."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from agent.hub import (
    HubError,
    HubSettings,
    RepoFile,
    ResolvedRepo,
    download,
    part_path,
    remove_incomplete,
    resolve,
)
from agent.hub_child import filter_paths
from shared.messages import ErrorCode
from tests.support.fake_hub import FakeHub, safetensors_bytes

MiB = 1024 * 1024
TOKEN = "hf_fake_token"

SMALL_REPO = {
    "config.json": '{"architectures": ["Fake"]}',
    "tokenizer.json": "{}",
    "model.safetensors": safetensors_bytes({"w": ("F16", (64, 32))}),
    "weights/extra.bin": 3 * MiB + 17,
}


def child_pids() -> list[int]:
    """Live (not yet reaped) hub children of this process (the session's broker and
    other tests' processes are children too)."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
        if stat.rsplit(")", 1)[1].split()[1] != me:
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"agent.hub" in command:
            found.append(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    before = set(child_pids())
    yield
    assert set(child_pids()) <= before, "a hub child outlived its call"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub(tokens=(TOKEN,)) as fake:
        yield fake


def settings_for(hub: FakeHub, token: str | None = None) -> HubSettings:
    return HubSettings(endpoint=hub.endpoint, token=token, timeout_s=30, chunk_bytes=MiB)


def parts(local: Path) -> dict[str, int]:
    """Part files of unfinished downloads, relative to local_dir, and their sizes."""
    return {str(p.relative_to(local)): p.stat().st_size for p in sorted(local.rglob("*.part"))}


def etag(hub: FakeHub, repo: str, path: str) -> str:
    """What the hub's listing gives as the file's etag (sha256 for LFS, else the git blob id)."""
    return hub._repos[repo].commits[hub._repos[repo].refs["main"]][path].etag


def written(local: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(local)): p.read_bytes()
        for p in sorted(local.rglob("*"))
        if p.is_file() and ".cache" not in p.parts
    }


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def pinned(hub: FakeHub, sha: str, files: dict[str, int]) -> ResolvedRepo:
    """What resolve answers for org/m and a fresh local_dir, without spending a child on it."""
    return ResolvedRepo(
        "org/m",
        sha,
        tuple(
            RepoFile(path, size, False, etag=etag(hub, "org/m", path))
            for path, size in files.items()
        ),
    )


async def failure(resolving: Awaitable[ResolvedRepo]) -> HubError:
    with pytest.raises(HubError) as raised:
        await resolving
    return raised.value


def resolved_paths(resolved: ResolvedRepo) -> list[str]:
    return [f.path for f in resolved.files]


# --- resolve


async def test_resolve_pins_the_commit_and_lists_sizes_without_touching_local_dir(
    hub: FakeHub, tmp_path: Path
) -> None:
    sha = hub.add_repo("org/tiny", SMALL_REPO)
    local = tmp_path / "tiny"

    resolved = await resolve(settings_for(hub), "org/tiny", None, None, None, local)

    sizes = {name: len(hub.file_content("org/tiny", name)) for name in SMALL_REPO}
    assert resolved.repo == "org/tiny" and resolved.revision == sha
    assert resolved.files == tuple(
        RepoFile(n, sizes[n], False, 0, etag(hub, "org/tiny", n)) for n in sorted(sizes)
    )
    assert resolved.files[1].etag == hub.file_sha256("org/tiny", "model.safetensors")
    assert resolved.total_bytes == resolved.missing_bytes == sum(sizes.values())
    assert not local.exists()
    assert not hub.gets("weights/extra.bin")


async def test_resolve_applies_include_and_exclude(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/tiny", SMALL_REPO)
    settings = settings_for(hub)
    local = tmp_path / "tiny"

    only_json, no_bins, nothing = await asyncio.gather(
        resolve(settings, "org/tiny", "main", ["*.json"], None, local),
        resolve(settings, "org/tiny", None, None, ["*.bin", "tok*"], local),
        resolve(settings, "org/tiny", None, ["*.gguf"], None, local),
    )
    assert resolved_paths(only_json) == ["config.json", "tokenizer.json"]
    assert resolved_paths(no_bins) == ["config.json", "model.safetensors"]
    assert nothing.files == ()  # the caller decides what installing nothing means


# --- download


async def test_download_reports_progress_then_skips_what_is_complete(
    hub: FakeHub, tmp_path: Path
) -> None:
    sha = hub.add_repo("org/tiny", SMALL_REPO)
    settings = settings_for(hub)
    local = tmp_path / "tiny"
    resolved = await resolve(settings, "org/tiny", sha, None, None, local)
    hub.throttle(16 * MiB)  # long enough for a report before the end
    progress: list[int] = []

    await download(settings, resolved, None, None, local, progress.append)

    assert len(progress) >= 2, progress
    assert progress == sorted(progress) and progress[-1] == resolved.missing_bytes
    assert written(local) == {n: hub.file_content("org/tiny", n) for n in SMALL_REPO}
    assert parts(local) == {}

    # Everything is present now: a new resolve says so, and a download fetches nothing.
    hub.throttle(None)
    again = await resolve(settings, "org/tiny", None, None, None, local)
    assert again.revision == sha and all(f.present for f in again.files)
    assert again.missing_bytes == 0 and again.total_bytes == resolved.total_bytes
    hub.requests.clear()
    progress.clear()
    await download(settings, again, None, None, local, progress.append)
    assert progress == [0]
    assert not [r for r in hub.requests if "/resolve/" in r.path]  # not even a HEAD


async def test_cancel_mid_file_keeps_its_bytes_and_the_next_run_resumes_them(
    hub: FakeHub, tmp_path: Path
) -> None:
    files = {"a.safetensors": MiB, "b.safetensors": 4 * MiB}
    sha = hub.add_repo("org/m", files)
    hold = hub.hold_after("b.safetensors", 2 * MiB)
    # One file at a time, in path order: a is complete before b starts.
    settings = dataclasses.replace(settings_for(hub), max_workers=1)
    local = tmp_path / "m"
    progress: list[int] = []
    task = asyncio.create_task(
        download(settings, pinned(hub, sha, files), None, None, local, progress.append)
    )
    # a is complete and 2 MiB of b are on disk; the server holds the rest.
    await wait_until(lambda: bool(progress) and progress[-1] >= 3 * MiB)
    assert hold.reached.is_set() and (local / "a.safetensors").exists()

    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 2
    assert child_pids() == []
    assert not (local / "b.safetensors").exists()  # only the rename makes it count
    b_part = part_path(local, "b.safetensors", etag(hub, "org/m", "b.safetensors"))
    assert parts(local) == {str(b_part.relative_to(local)): 2 * MiB}
    hold.release()

    # The next run skips a, counts the part file of b as there, and asks for the rest of b.
    resolved = await resolve(settings, "org/m", None, None, None, local)
    assert [(f.path, f.present, f.partial) for f in resolved.files] == [
        ("a.safetensors", True, 0),
        ("b.safetensors", False, 2 * MiB),
    ]
    assert resolved.missing_bytes == 2 * MiB
    hub.requests.clear()
    progress.clear()
    await download(settings, resolved, None, None, local, progress.append)
    assert progress[-1] == resolved.missing_bytes
    assert not hub.gets("a.safetensors")
    assert [r.range for r in hub.gets("b.safetensors")] == [f"bytes={2 * MiB}-"]
    assert written(local) == {n: hub.file_content("org/m", n) for n in files}
    assert parts(local) == {}


async def test_a_part_file_of_another_version_is_not_resumed(hub: FakeHub, tmp_path: Path) -> None:
    files = {"model.safetensors": 2 * MiB}
    sha = hub.add_repo("org/m", files)
    local = tmp_path / "m"
    stale = part_path(local, "model.safetensors", "0" * 64)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * MiB)

    resolved = await resolve(settings_for(hub), "org/m", sha, None, None, local)
    assert [(f.present, f.partial) for f in resolved.files] == [(False, 0)]
    await download(settings_for(hub), resolved, None, None, local, lambda _n: None)

    assert [r.range for r in hub.gets("model.safetensors")] == [None]
    assert written(local) == {"model.safetensors": hub.file_content("org/m", "model.safetensors")}
    assert parts(local) == {}  # the stale one is gone too


async def test_a_child_that_dies_is_download_failed_and_keeps_its_bytes(
    hub: FakeHub, tmp_path: Path
) -> None:
    files = {"model.safetensors": 4 * MiB}
    sha = hub.add_repo("org/m", files)
    hold = hub.hold_after("model.safetensors", MiB)
    local = tmp_path / "m"
    progress: list[int] = []
    task = asyncio.create_task(
        download(settings_for(hub), pinned(hub, sha, files), None, None, local, progress.append)
    )
    await wait_until(lambda: bool(progress) and progress[-1] >= MiB)
    (child,) = child_pids()
    os.kill(child, signal.SIGKILL)  # as the OOM killer would

    with pytest.raises(HubError) as raised:
        await task
    hold.release()
    assert raised.value.code == ErrorCode.DOWNLOAD_FAILED
    assert "status -9" in raised.value.message
    assert list(parts(local).values()) == [MiB]
    assert not (local / "model.safetensors").exists()


async def test_a_dropped_connection_is_resumed_with_a_range(hub: FakeHub, tmp_path: Path) -> None:
    files = {"model.safetensors": 3 * MiB}
    sha = hub.add_repo("org/m", files)
    hub.drop_after("model.safetensors", 2 * MiB + 1000)
    local = tmp_path / "m"
    progress: list[int] = []

    await download(settings_for(hub), pinned(hub, sha, files), None, None, local, progress.append)

    ranges = [r.range for r in hub.gets("model.safetensors")]
    assert ranges == [None, f"bytes={2 * MiB + 1000}-"]
    assert (local / "model.safetensors").read_bytes() == hub.file_content(
        "org/m", "model.safetensors"
    )
    assert progress[-1] == 3 * MiB


async def test_a_server_error_is_download_failed(hub: FakeHub, tmp_path: Path) -> None:
    sha = hub.add_repo("org/m", {"config.json": "{}", "model.safetensors": MiB})
    hub.fail("model.safetensors", 500, times=20)
    local = tmp_path / "m"

    with pytest.raises(HubError) as raised:
        await download(
            settings_for(hub),
            pinned(hub, sha, {"config.json": 2, "model.safetensors": MiB}),
            None,
            None,
            local,
            lambda _n: None,
        )
    assert raised.value.code == ErrorCode.DOWNLOAD_FAILED, raised.value.message
    assert "org/m" in raised.value.message and "HTTP Error 500" in raised.value.message
    # A few attempts, not twenty.
    assert 1 < len(hub.gets("model.safetensors")) < 10
    assert not (local / "model.safetensors").exists()


# --- errors


async def test_each_hub_refusal_is_a_hub_error_with_its_code(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/tiny", {"config.json": "{}"})
    hub.add_repo("org/private", {"config.json": "{}"}, private=True)
    hub.add_repo("org/gated", {"config.json": "{}", "model.safetensors": 1000}, gated=True)
    anonymous, wrong = settings_for(hub), settings_for(hub, "hf_wrong")

    # Independent children: run them side by side.
    missing, revision, private, gated, bad_token = await asyncio.gather(
        failure(resolve(anonymous, "org/missing", None, None, None, tmp_path / "a")),
        failure(resolve(anonymous, "org/tiny", "nope", None, None, tmp_path / "b")),
        failure(resolve(anonymous, "org/private", None, None, None, tmp_path / "c")),
        failure(resolve(anonymous, "org/gated", None, None, None, tmp_path / "d")),
        failure(resolve(wrong, "org/tiny", None, None, None, tmp_path / "e")),
    )

    assert missing.code == ErrorCode.NOT_FOUND
    assert missing.message == (
        f"repository 'org/missing' was not found on {hub.endpoint}; check the id, or set a token "
        "for a private repo"
    )
    assert revision.code == ErrorCode.NOT_FOUND and "revision 'nope'" in revision.message
    assert private.code == ErrorCode.NOT_FOUND and "'org/private'" in private.message
    assert gated.code == ErrorCode.FORBIDDEN
    assert gated.message == (
        "'org/gated' is gated: accept its terms on the hub and set weights.token or HF_TOKEN"
    )
    assert bad_token.code == ErrorCode.FORBIDDEN and "HTTP 401" in bad_token.message


async def test_the_token_opens_a_gated_repo(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/gated", {"config.json": "{}", "model.safetensors": 1000}, gated=True)
    authorized = settings_for(hub, TOKEN)
    local = tmp_path / "g"

    resolved = await resolve(authorized, "org/gated", None, None, None, local)
    await download(authorized, resolved, None, None, local, lambda _n: None)

    assert written(local) == {n: hub.file_content("org/gated", n) for n in resolved_paths(resolved)}
    assert hub.gets("model.safetensors")
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)


async def test_a_cdn_redirect_gets_the_bytes_without_the_token(tmp_path: Path) -> None:
    with FakeHub(tokens=(TOKEN,), lfs_cdn=True) as hub:
        hub.add_repo("org/gated", {"config.json": "{}", "model.safetensors": 2 * MiB}, gated=True)
        hub.drop_after("model.safetensors", MiB)  # the resume goes to the CDN too
        authorized = settings_for(hub, TOKEN)
        local = tmp_path / "g"

        resolved = await resolve(authorized, "org/gated", None, None, None, local)
        await download(authorized, resolved, None, None, local, lambda _n: None)

        assert written(local) == {
            n: hub.file_content("org/gated", n) for n in resolved_paths(resolved)
        }
        cdn = [r for r in hub.requests if r.path.startswith("/__cdn/")]
        assert [(r.method, r.range) for r in cdn] == [("GET", None), ("GET", f"bytes={MiB}-")]
        assert {r.host for r in cdn} == {f"localhost:{hub.port}"}
        assert all(r.authorization is None for r in cdn)
        hub_requests = [r for r in hub.requests if r not in cdn]
        assert all(r.authorization == f"Bearer {TOKEN}" for r in hub_requests)
        assert any(r.path.endswith("/config.json") and r.method == "GET" for r in hub_requests)


async def test_a_silent_hub_times_out_the_resolve(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings = HubSettings(endpoint=endpoint, timeout_s=1)
        with pytest.raises(HubError) as raised:
            await resolve(settings, "org/m", None, None, None, tmp_path / "m")
    assert raised.value.code == ErrorCode.TIMEOUT and endpoint in raised.value.message


def test_remove_incomplete_deletes_only_the_orphans(tmp_path: Path) -> None:
    download_dir = tmp_path / ".cache" / "huggingface" / "download"
    (download_dir / "weights").mkdir(parents=True)
    for name in ("a.incomplete", "weights/b.incomplete", "a.metadata", "a.lock"):
        (download_dir / name).write_bytes(b"x")
    assert remove_incomplete(tmp_path) == 2
    assert sorted(p.name for p in download_dir.rglob("*") if p.is_file()) == [
        "a.lock",
        "a.metadata",
    ]
    assert remove_incomplete(tmp_path / "never-created") == 0


@pytest.mark.parametrize(
    ("include", "exclude", "kept"),
    [
        (None, None, ["README.md", "config.json", "onnx/model.onnx", "weights/a.safetensors"]),
        (["*.json", "weights/"], None, ["config.json", "weights/a.safetensors"]),
        (None, ["onnx/", "*.md"], ["config.json", "weights/a.safetensors"]),
        (["*"], ["*.safetensors"], ["README.md", "config.json", "onnx/model.onnx"]),
        (["nothing-matches"], None, []),
    ],
)
def test_include_and_exclude_read_as_the_hubs_allow_and_ignore_patterns(
    include: list[str] | None, exclude: list[str] | None, kept: list[str]
) -> None:
    """The hub's semantics, without its private helper: shell patterns over the whole
    path ('*' crosses '/'), a trailing '/' for a folder, exclude after include."""
    paths = ["README.md", "config.json", "onnx/model.onnx", "weights/a.safetensors"]
    assert filter_paths(paths, include, exclude) == kept
