"""The real huggingface_hub against FakeHub: what snapshot_download does, proven locally.

How the tests reach the hub: huggingface_hub reads ``HF_ENDPOINT`` once, at import, into
``constants.ENDPOINT`` and ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (and its list of trusted
Hub origins), so monkeypatching the variable afterwards changes nothing. Every in-process call
therefore passes ``endpoint=hub.endpoint`` (snapshot_download forwards it to ``HfApi`` and to
each ``hf_hub_download``); the child-process tests set ``HF_ENDPOINT`` from ``hub.env()``
instead, which is what the agent gets when it runs as its own process.

Each test also gets, through ``hf_settings``: telemetry off, offline mode off, no implicit
token (a developer's ``~/.cache/huggingface/token`` must not leak into the requests), a
1 MiB download chunk instead of 10 MiB (``constants.DOWNLOAD_CHUNK_SIZE`` is read per call),
and no 1 s sleep before ``http_get`` retries a dropped connection.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import huggingface_hub
import pytest
from huggingface_hub import HfApi, constants, file_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm import tqdm

from tests.support.fake_hub import (
    FakeFile,
    FakeHub,
    blob_bytes,
    fake_safetensors,
    safetensors_bytes,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
CHUNK = 1 * MiB
TOKEN = "hf_fake_token"


@pytest.fixture(autouse=True)
def hf_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    # http_get's only use of `time` is the sleep before a retry.
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda _s: None))


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub(tokens=(TOKEN,)) as fake:
        yield fake


def files_of(tree: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(tree)): p.read_bytes()
        for p in sorted(tree.rglob("*"))
        if p.is_file() and ".cache" not in p.parts
    }


def incomplete_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.incomplete"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


SMALL_REPO = {
    "config.json": json.dumps({"architectures": ["Fake"], "hidden_size": 8}),
    "tokenizer.json": "{}",
    "model.safetensors": safetensors_bytes({"w": ("F16", (64, 32)), "b": ("F32", (32,))}),
    "weights/extra.bin": 3 * MiB + 17,
}


# --- the fake itself


def test_fake_file_reads_any_range_consistently() -> None:
    blob = FakeFile(300_000, seed=3)
    whole = blob_bytes(blob)
    assert len(whole) == 300_000
    for start, end in [(0, 1), (65_530, 65_550), (131_071, 262_145), (299_990, 400_000)]:
        assert blob.read(start, end) == whole[start:end]
    # No two 64 KiB blocks are alike, so a resume at the wrong offset cannot go unnoticed.
    blocks = {whole[i : i + 65536] for i in range(0, 262_144, 65536)}
    assert len(blocks) == 4
    assert blob_bytes(FakeFile(300_000, seed=4)) != whole


def test_safetensors_helpers_write_the_real_format() -> None:
    data = safetensors_bytes({"w": ("BF16", (2, 3)), "b": ("F32", (3,))}, {"format": "pt"})
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["w"] == {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}
    assert header["b"] == {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}
    assert len(data) == 8 + header_len + 24
    assert (8 + header_len) % 8 == 0

    big = fake_safetensors({"embed": ("F16", (32_000, 4096)), "lm_head": ("F16", (32_000, 4096))})
    assert big.size > 500 * MiB  # exists without the memory
    head = big.read(0, 100_000)
    assert json.loads(head[8 : 8 + int.from_bytes(head[:8], "little")])["lm_head"]["shape"] == [
        32_000,
        4096,
    ]


# --- snapshot_download


def test_snapshot_download_fetches_every_file_at_the_resolved_commit(
    hub: FakeHub, tmp_path: Path
) -> None:
    sha = hub.add_repo("org/tiny", SMALL_REPO)
    path = snapshot_download("org/tiny", cache_dir=tmp_path, endpoint=hub.endpoint)

    assert Path(path) == tmp_path / "models--org--tiny" / "snapshots" / sha
    assert (tmp_path / "models--org--tiny" / "refs" / "main").read_text() == sha
    got = files_of(Path(path))
    assert set(got) == set(SMALL_REPO)
    for name in SMALL_REPO:
        assert got[name] == hub.file_content("org/tiny", name), name
    # LFS files are stored under their sha256, small files under their git blob sha1.
    blobs = {p.name for p in (tmp_path / "models--org--tiny" / "blobs").iterdir()}
    assert hub.file_sha256("org/tiny", "model.safetensors") in blobs
    assert hub.file_sha256("org/tiny", "weights/extra.bin") in blobs


def test_snapshot_download_into_a_local_dir_records_the_commit(
    hub: FakeHub, tmp_path: Path
) -> None:
    sha = hub.add_repo("org/tiny", SMALL_REPO)
    local = tmp_path / "weights"
    path = snapshot_download(
        "org/tiny", local_dir=local, cache_dir=tmp_path / "cache", endpoint=hub.endpoint
    )

    assert Path(path) == local
    assert files_of(local) == {n: hub.file_content("org/tiny", n) for n in SMALL_REPO}
    metadata = (local / ".cache/huggingface/download/config.json.metadata").read_text()
    assert metadata.splitlines()[0] == sha
    assert incomplete_files(local) == []

    # A second call finds everything in place: one model info, one tree, HEADs, no GET.
    hub.requests.clear()
    snapshot_download(
        "org/tiny", local_dir=local, cache_dir=tmp_path / "cache", endpoint=hub.endpoint
    )
    assert not [r for r in hub.requests if "/resolve/" in r.path and r.method == "GET"]


def test_branches_and_shas_both_resolve(hub: FakeHub, tmp_path: Path) -> None:
    first = hub.add_repo("org/m", {"config.json": "{}"})
    dev = hub.add_repo("org/m", {"config.json": '{"v": 2}'}, revision="dev")
    second = hub.add_repo("org/m", {"config.json": '{"v": 3}', "new.txt": "hi"})

    def fetch(revision: str) -> dict[str, bytes]:
        path = snapshot_download(
            "org/m", revision=revision, cache_dir=tmp_path, endpoint=hub.endpoint
        )
        return files_of(Path(path))

    assert fetch(first) == {"config.json": b"{}"}
    assert fetch("dev") == {"config.json": b'{"v": 2}'}
    assert fetch(dev) == {"config.json": b'{"v": 2}'}
    assert fetch("main") == {"config.json": b'{"v": 3}', "new.txt": b"hi"}
    assert (tmp_path / "models--org--m" / "refs" / "main").read_text() == second


def test_allow_and_ignore_patterns_filter_the_files(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/tiny", SMALL_REPO)
    only_json = snapshot_download(
        "org/tiny", cache_dir=tmp_path / "a", endpoint=hub.endpoint, allow_patterns=["*.json"]
    )
    assert set(files_of(Path(only_json))) == {"config.json", "tokenizer.json"}

    no_bins = snapshot_download(
        "org/tiny", cache_dir=tmp_path / "b", endpoint=hub.endpoint, ignore_patterns=["*.bin"]
    )
    assert set(files_of(Path(no_bins))) == {"config.json", "tokenizer.json", "model.safetensors"}
    assert not hub.gets("weights/extra.bin")


def test_tree_listing_follows_pagination(tmp_path: Path) -> None:
    files = {f"shard-{i}.txt": f"{i}" for i in range(7)}
    with FakeHub(page_size=2) as hub:
        hub.add_repo("org/many", files)
        path = snapshot_download("org/many", cache_dir=tmp_path, endpoint=hub.endpoint)
        assert files_of(Path(path)) == {k: v.encode() for k, v in files.items()}
        assert len([r for r in hub.requests if "/tree/" in r.path]) == 4


class ProgressProbe(tqdm):  # type: ignore[type-arg]
    """Records what huggingface_hub tells each bar; ``cancel`` makes every update raise."""

    bars: ClassVar[list[ProgressProbe]] = []
    cancel: ClassVar[threading.Event] = threading.Event()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.init_kwargs = dict(kwargs)
        self.updates: list[int] = []
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
        ProgressProbe.bars.append(self)

    def update(self, n: float | None = 1) -> bool | None:
        if ProgressProbe.cancel.is_set():
            raise DownloadCancelled
        self.updates.append(int(n or 0))
        return None


class DownloadCancelled(Exception):
    pass


@pytest.fixture
def probe() -> Iterator[type[ProgressProbe]]:
    ProgressProbe.bars = []
    ProgressProbe.cancel = threading.Event()
    yield ProgressProbe


def test_tqdm_class_gets_a_files_bar_and_two_byte_bars(
    hub: FakeHub, tmp_path: Path, probe: type[ProgressProbe]
) -> None:
    hub.add_repo("org/tiny", SMALL_REPO)
    snapshot_download("org/tiny", cache_dir=tmp_path, endpoint=hub.endpoint, tqdm_class=probe)

    total_bytes = sum(len(hub.file_content("org/tiny", n)) for n in SMALL_REPO)
    by_desc = {bar.init_kwargs.get("desc"): bar for bar in probe.bars}
    assert set(by_desc) == {
        "Downloading bytes",
        "Reconstructing (incomplete total...)",
        "Fetching 4 files",
    }
    written = by_desc["Reconstructing (incomplete total...)"]
    network = by_desc["Downloading bytes"]
    files = by_desc["Fetching 4 files"]
    assert written.init_kwargs["unit"] == network.init_kwargs["unit"] == "B"
    assert "unit" not in files.init_kwargs and files.init_kwargs["total"] == 4
    # Both byte bars start at total=0; huggingface_hub grows `.total` as each file starts.
    assert written.init_kwargs["total"] == 0
    assert written.total == total_bytes
    assert sum(written.updates) == sum(network.updates) == total_bytes
    assert max(written.updates) <= CHUNK  # one update per DOWNLOAD_CHUNK_SIZE chunk
    assert files.updates == [1, 1, 1, 1]
    assert written.desc.startswith("Reconstruction complete")


# --- errors


def test_unknown_repo_raises_repository_not_found(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing", cache_dir=tmp_path, endpoint=hub.endpoint)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing", cache_dir=tmp_path, endpoint=hub.endpoint, token=TOKEN)


def test_unknown_revision_raises_revision_not_found(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/tiny", {"config.json": "{}"})
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("org/tiny", revision="nope", cache_dir=tmp_path, endpoint=hub.endpoint)


def test_gated_repo_needs_a_token(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/gated", {"config.json": "{}", "model.safetensors": 1000}, gated=True)
    info = HfApi(endpoint=hub.endpoint).model_info("org/gated")
    assert info.gated == "auto"  # the listing is public, the files are not

    with pytest.raises(GatedRepoError):
        snapshot_download("org/gated", cache_dir=tmp_path / "a", endpoint=hub.endpoint)
    path = snapshot_download(
        "org/gated", cache_dir=tmp_path / "b", endpoint=hub.endpoint, token=TOKEN
    )
    assert (Path(path) / "config.json").read_bytes() == b"{}"
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.gets("model.safetensors"))


def test_private_repo_is_not_found_without_a_token(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/private", {"config.json": "{}"}, private=True)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/private", cache_dir=tmp_path / "a", endpoint=hub.endpoint)
    path = snapshot_download(
        "org/private", cache_dir=tmp_path / "b", endpoint=hub.endpoint, token=TOKEN
    )
    assert (Path(path) / "config.json").exists()


def test_bad_token_is_a_401_not_a_missing_repo(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/tiny", {"config.json": "{}"})
    with pytest.raises(HfHubHTTPError) as raised:
        snapshot_download("org/tiny", cache_dir=tmp_path, endpoint=hub.endpoint, token="hf_bad")
    assert not isinstance(raised.value, RepositoryNotFoundError)
    assert raised.value.response.status_code == 401


# --- interruptions


def test_a_dropped_connection_is_resumed_inside_the_call_with_a_range(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.add_repo("org/m", {"model.safetensors": 8 * MiB})
    hub.drop_after("model.safetensors", 3 * MiB)
    hub.drop_after("model.safetensors", 2 * MiB)

    path = snapshot_download("org/m", cache_dir=tmp_path, endpoint=hub.endpoint)

    assert [r.range for r in hub.gets("model.safetensors")] == [
        None,
        f"bytes={3 * MiB}-",
        f"bytes={5 * MiB}-",
    ]
    assert sha256_of(Path(path) / "model.safetensors") == hub.file_sha256(
        "org/m", "model.safetensors"
    )


def test_bytes_of_an_unfinished_chunk_are_fetched_again(hub: FakeHub, tmp_path: Path) -> None:
    # httpx hands http_get whole DOWNLOAD_CHUNK_SIZE chunks: a drop mid-chunk loses that chunk.
    hub.add_repo("org/m", {"model.safetensors": 4 * MiB})
    hub.drop_after("model.safetensors", 2 * MiB + 1000)
    path = snapshot_download("org/m", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert [r.range for r in hub.gets("model.safetensors")] == [None, f"bytes={2 * MiB}-"]
    assert sha256_of(Path(path) / "model.safetensors") == hub.file_sha256(
        "org/m", "model.safetensors"
    )


def test_drops_without_progress_give_up_after_six_attempts(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/m", {"model.safetensors": 2 * MiB})
    hub.drop_after("model.safetensors", 1000, times=10)
    with pytest.raises(huggingface_hub.utils._http.httpx2.RemoteProtocolError):
        snapshot_download(
            "org/m", local_dir=tmp_path / "w", cache_dir=tmp_path, endpoint=hub.endpoint
        )
    assert len(hub.gets("model.safetensors")) == 6
    assert incomplete_files(tmp_path) == []


def test_a_failed_download_is_not_resumed_by_the_next_call(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/m", {"config.json": "{}", "model.safetensors": 6 * MiB})
    hub.drop_after("model.safetensors", 3 * MiB)
    hub.fail("model.safetensors", 500)  # the in-call retry meets a server error and gives up
    local = tmp_path / "w"

    with pytest.raises(HfHubHTTPError):
        snapshot_download("org/m", local_dir=local, cache_dir=tmp_path, endpoint=hub.endpoint)
    assert [r.range for r in hub.gets("model.safetensors")] == [None, f"bytes={3 * MiB}-"]
    assert incomplete_files(tmp_path) == []  # the partial file was deleted
    assert not (local / "model.safetensors").exists()

    hub.requests.clear()
    snapshot_download("org/m", local_dir=local, cache_dir=tmp_path, endpoint=hub.endpoint)
    assert [r.range for r in hub.gets("model.safetensors")] == [None]  # from byte 0 again
    assert sha256_of(local / "model.safetensors") == hub.file_sha256("org/m", "model.safetensors")


def run_child(hub: FakeHub, home: Path, script: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(hub.env(), HF_HOME=str(home), PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_killed_download_leaves_an_orphan_incomplete_file(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/m", {"config.json": "{}", "model.safetensors": 6 * MiB})
    hold = hub.hold_after("model.safetensors", 3 * MiB)
    local = tmp_path / "w"
    child = run_child(
        hub,
        tmp_path / "home",
        f"""
        from huggingface_hub import constants, snapshot_download
        constants.DOWNLOAD_CHUNK_SIZE = {CHUNK}
        snapshot_download("org/m", local_dir={str(local)!r}, cache_dir={str(tmp_path)!r})
        """,
    )
    try:
        assert hold.reached.wait(30), child.stderr.read() if child.poll() is not None else ""
        # HF_ENDPOINT alone (no endpoint=) brought the child here.
        assert hub.gets("model.safetensors")
        # The server has sent 3 MiB: wait until the child has written them, and has finished
        # config.json (killed mid-file, it would leave an orphan of its own).
        deadline = time.monotonic() + 10
        while not (
            (local / "config.json").exists()
            and sum(p.stat().st_size for p in incomplete_files(local)) >= 3 * MiB
        ):
            assert time.monotonic() < deadline, "the child never wrote the first 3 MiB"
            time.sleep(0.01)
    finally:
        child.kill()
        child.communicate()
        hold.release()

    (orphan,) = incomplete_files(local)
    # <local_dir>/.cache/huggingface/download/<hash>.<sha256>.<8 hex>.incomplete
    assert orphan.parent == local / ".cache/huggingface/download"
    _, etag, unique, _ = orphan.name.split(".")
    assert etag == hub.file_sha256("org/m", "model.safetensors") and len(unique) == 8
    assert orphan.stat().st_size == 3 * MiB

    hub.requests.clear()
    snapshot_download("org/m", local_dir=local, cache_dir=tmp_path, endpoint=hub.endpoint)
    assert [r.range for r in hub.gets("model.safetensors")] == [None]  # the orphan is not reused
    assert sha256_of(local / "model.safetensors") == hub.file_sha256("org/m", "model.safetensors")
    assert incomplete_files(local) == [orphan]  # nor removed


def test_raising_from_the_progress_hook_cancels_from_another_thread(
    hub: FakeHub, tmp_path: Path, probe: type[ProgressProbe]
) -> None:
    hub.add_repo("org/m", {"config.json": "{}", "model.safetensors": 6 * MiB})
    hold = hub.hold_after("model.safetensors", 3 * MiB)
    local = tmp_path / "w"
    outcome: list[BaseException | str] = []

    def download() -> None:
        try:
            outcome.append(
                snapshot_download(
                    "org/m",
                    local_dir=local,
                    cache_dir=tmp_path,
                    endpoint=hub.endpoint,
                    tqdm_class=probe,
                )
            )
        except BaseException as error:
            outcome.append(error)

    worker = threading.Thread(target=download)
    worker.start()
    assert hold.reached.wait(10)
    probe.cancel.set()
    hold.release()
    worker.join(10)

    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], DownloadCancelled)
    assert not (local / "model.safetensors").exists()
    assert incomplete_files(tmp_path) == []
    assert len(hub.gets("model.safetensors")) == 1  # no retry after the hook raised


# --- before downloading


def test_repo_size_is_known_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/tiny", SMALL_REPO)
    expected = {n: len(hub.file_content("org/tiny", n)) for n in SMALL_REPO}
    api = HfApi(endpoint=hub.endpoint)

    info = api.model_info("org/tiny", files_metadata=True)
    assert {s.rfilename: s.size for s in info.siblings or []} == expected
    lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if s.lfs is not None}
    assert set(lfs) == {"model.safetensors", "weights/extra.bin"}
    assert api.model_info("org/tiny").siblings[0].size is None  # type: ignore[index]

    tree = api.list_repo_tree("org/tiny", recursive=True)
    assert {f.path: f.size for f in tree if isinstance(f, huggingface_hub.hf_api.RepoFile)} == (
        expected
    )

    plan = snapshot_download("org/tiny", cache_dir=tmp_path, endpoint=hub.endpoint, dry_run=True)
    assert {p.filename: p.file_size for p in plan} == expected
    assert all(p.will_download for p in plan)
    assert not hub.gets("model.safetensors")


def test_safetensors_metadata_is_read_with_range_requests(hub: FakeHub) -> None:
    tensors = {"embed": ("BF16", (1000, 64)), "head": ("F32", (64, 10))}
    hub.add_repo("org/st", {"model.safetensors": fake_safetensors(tensors, {"format": "pt"})})
    meta = HfApi(endpoint=hub.endpoint).get_safetensors_metadata("org/st")
    assert meta.parameter_count == {"BF16": 64_000, "F32": 640}
    assert [r.range for r in hub.gets("model.safetensors")] == ["bytes=0-100000"]


def test_lfs_files_redirected_to_a_cdn_are_fetched_there_without_the_token(
    tmp_path: Path,
) -> None:
    with FakeHub(tokens=(TOKEN,), lfs_cdn=True) as hub:
        hub.add_repo("org/m", {"config.json": "{}", "model.safetensors": 2 * MiB}, gated=True)
        hub.drop_after("model.safetensors", MiB)
        path = snapshot_download("org/m", cache_dir=tmp_path, endpoint=hub.endpoint, token=TOKEN)
        assert sha256_of(Path(path) / "model.safetensors") == hub.file_sha256(
            "org/m", "model.safetensors"
        )
        cdn = [r for r in hub.requests if r.path.startswith("/__cdn/")]
        assert [r.range for r in cdn] == [None, f"bytes={MiB}-"]
        assert all(r.host == f"localhost:{hub.port}" and r.authorization is None for r in cdn)


def test_throttle_slows_the_body(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/m", {"model.safetensors": MiB})
    hub.throttle(4 * MiB)
    started = time.monotonic()
    snapshot_download("org/m", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert time.monotonic() - started >= 0.25


def test_no_xet_even_with_hf_xet_installed(hub: FakeHub, tmp_path: Path) -> None:
    pytest.importorskip("hf_xet")
    hub.add_repo("org/tiny", SMALL_REPO)
    snapshot_download("org/tiny", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert all(
        r.path.startswith(("/api/models/org/tiny/revision/", "/api/models/org/tiny/tree/"))
        or "/resolve/" in r.path
        for r in hub.requests
    ), hub.requests


# --- memory


def test_large_files_are_served_lazily_and_arrive_whole(hub: FakeHub, tmp_path: Path) -> None:
    # One child downloads a 20 MiB file, then a 60 MiB one: the fake hub serves them
    # lazily (its traced memory stays small) and they arrive whole. The client's peak RSS
    # is printed for reference only: memory claims are bench/install.py's (a child's RSS
    # depends on huggingface_hub's parallel chunks and is too noisy to assert here).
    hub.add_repo("org/big", {"small.safetensors": 20 * MiB, "large.safetensors": 60 * MiB})
    expected = hub.file_sha256("org/big", "large.safetensors")
    local = tmp_path / "w"
    tracemalloc.start()
    try:
        child = run_child(
            hub,
            tmp_path / "home",
            f"""
            import json
            from huggingface_hub import snapshot_download

            def peak_mib():  # VmHWM, not ru_maxrss: that one keeps the forking parent's peak
                for line in open("/proc/self/status"):
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024

            peaks = [peak_mib()]
            for name in ("small.safetensors", "large.safetensors"):
                snapshot_download(
                    "org/big", local_dir={str(local)!r}, cache_dir={str(tmp_path)!r},
                    allow_patterns=[name],
                )
                peaks.append(peak_mib())
            print(json.dumps(peaks))
            """,
        )
        out, err = child.communicate(timeout=60)
        _, server_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert child.returncode == 0, err
    imported, after_small, after_large = json.loads(out)
    report = (
        f"client peak RSS {imported:.0f} MiB imported, {after_small:.0f} MiB after 20 MiB, "
        f"{after_large:.0f} MiB after 60 MiB; server peak {server_peak / MiB:.1f} MiB traced"
    )
    print(report)
    assert server_peak < 4 * MiB, report
    assert sha256_of(local / "large.safetensors") == expected
