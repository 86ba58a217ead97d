"""VRAM estimates from safetensors headers: sums, sharding, skipped paths, bad files refuse."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.catalog import ModelSpec
from agent.config import load_config
from agent.weights_estimate import (
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    MIB,
    MIN_OVERHEAD_MB,
    WeightsEstimate,
    WeightsFormatError,
    estimate_directory,
    overhead_for,
    read_safetensors_header,
    suggest_catalog_entry,
    tensor_bytes,
)
from bus.settings import ConfigError

GIB = 1024 * MIB

Tensors = dict[str, tuple[str, list[int]]]


def write_safetensors(
    path: Path, tensors: Tensors, *, metadata: dict[str, str] | None = None
) -> int:
    """Write a real safetensors file whose data is a hole (sparse); returns the data bytes."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = tensor_bytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        header["__metadata__"] = metadata
    write_raw(path, json.dumps(header).encode(), data_bytes=offset)
    return offset


def write_raw(path: Path, header: bytes, *, data_bytes: int = 0, length: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header) if length is None else length))
        f.write(header)
        # truncate() extends with a hole: a "20 GiB" model costs no disk.
        f.truncate(8 + len(header) + data_bytes)


def test_header_is_read_and_metadata_kept(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": ("BF16", [2, 3])}, metadata={"format": "pt"})

    header = read_safetensors_header(path)

    assert header["w"] == {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}
    assert header["__metadata__"] == {"format": "pt"}


def test_mixed_dtypes_sum_parameters_and_bytes(tmp_path: Path) -> None:
    write_safetensors(
        tmp_path / "model.safetensors",
        {
            "embed": ("BF16", [1000, 64]),  # 64,000 params, 128,000 bytes
            "norm": ("F32", [64]),  # 64 params, 256 bytes
            "scale": ("F8_E4M3", [10, 10]),  # 100 params, 100 bytes
            "step": ("I64", []),  # a scalar: 1 param, 8 bytes
            "packed": ("F4", [4, 8]),  # 32 params, 16 bytes
        },
    )

    estimate = estimate_directory(tmp_path)

    assert estimate is not None
    assert estimate.files == 1
    assert estimate.parameters == 64_000 + 64 + 100 + 1 + 32
    assert estimate.weights_bytes == 128_000 + 256 + 100 + 8 + 16
    assert estimate.dtype == "BF16"
    assert estimate.dtypes == {"BF16": 64_000, "F32": 64, "F8_E4M3": 100, "I64": 1, "F4": 32}
    assert estimate.missing_shards == ()


def test_sharded_checkpoint_sums_both_files_and_checks_the_index(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": ("F16", [1024, 512])})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b": ("F16", [512])})
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    estimate = estimate_directory(tmp_path)

    assert estimate is not None
    assert (estimate.files, estimate.parameters) == (2, 1024 * 512 + 512)
    assert estimate.weights_bytes == 2 * (1024 * 512 + 512)
    assert estimate.missing_shards == ()


def test_shards_the_index_names_but_are_absent_are_reported(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": ("F16", [8])})
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    estimate = estimate_directory(tmp_path)

    assert estimate is not None
    assert estimate.missing_shards == ("model-00002-of-00002.safetensors",)
    assert "missing" in estimate.note


def test_a_malformed_index_names_the_file(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"a": ("F16", [8])})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))

    with pytest.raises(WeightsFormatError, match=r"model\.safetensors\.index\.json.*weight_map"):
        estimate_directory(tmp_path)


def test_subdirectories_count_but_hidden_ones_do_not(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "transformer" / "model.safetensors", {"w": ("BF16", [10])})
    # The hub keeps partial downloads under .cache; they must not count (or be parsed).
    write_raw(tmp_path / ".cache" / "huggingface" / "x.safetensors", b"not json")
    write_safetensors(tmp_path / ".hidden.safetensors", {"w": ("F32", [10**6])})

    estimate = estimate_directory(tmp_path)

    assert estimate is not None
    assert (estimate.files, estimate.parameters) == (1, 10)


def test_symlinks_out_of_the_directory_are_ignored(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    write_safetensors(outside / "big.safetensors", {"w": ("F32", [10**6])})
    model = tmp_path / "model"
    write_safetensors(model / "model.safetensors", {"w": ("BF16", [10])})
    (model / "linked.safetensors").symlink_to(outside / "big.safetensors")
    (model / "linked-dir").symlink_to(outside, target_is_directory=True)

    estimate = estimate_directory(model)

    assert estimate is not None
    assert (estimate.files, estimate.parameters) == (1, 10)


def test_symlinks_inside_the_directory_count_once(tmp_path: Path) -> None:
    # The hub's cache layout: snapshot files are links to blobs in the same tree.
    write_safetensors(tmp_path / "blobs" / "abc123", {"w": ("BF16", [10])})
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / "model.safetensors").symlink_to(tmp_path / "blobs" / "abc123")
    (tmp_path / "snapshots" / "again.safetensors").symlink_to(tmp_path / "blobs" / "abc123")

    estimate = estimate_directory(tmp_path)

    assert estimate is not None
    assert (estimate.files, estimate.parameters) == (1, 10)


def test_no_safetensors_means_no_estimate(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    (tmp_path / "config.json").write_text("{}")

    assert estimate_directory(tmp_path) is None


def test_files_without_tensors_mean_no_estimate(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "empty.safetensors", {}, metadata={"format": "pt"})

    assert estimate_directory(tmp_path) is None


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="nope"):
        estimate_directory(tmp_path / "nope")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "too short"),
        (b"\x10\0\0", "too short"),
        (struct.pack("<Q", 500) + b'{"w": {}}', "truncated"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "corrupt"),
        (struct.pack("<Q", 2**64 - 1) + b"{}", "corrupt"),
        (struct.pack("<Q", 5) + b"{nope", "not UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "not UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"[]", "not an object"),
    ],
)
def test_unreadable_headers_name_the_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)

    with pytest.raises(WeightsFormatError, match=problem) as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}, "unknown dtype 'Q4_K'"),
        ({"shape": [2], "data_offsets": [0, 2]}, "unknown dtype None"),
        ({"dtype": "F16", "shape": [-1], "data_offsets": [0, 2]}, "shape"),
        ({"dtype": "F16", "shape": [1.5], "data_offsets": [0, 2]}, "shape"),
        ({"dtype": "F16", "shape": [True], "data_offsets": [0, 2]}, "shape"),
        ({"dtype": "F16", "shape": "2", "data_offsets": [0, 2]}, "shape"),
        ({"dtype": "F16", "shape": [2], "data_offsets": [2, 0]}, "data_offsets"),
        ({"dtype": "F16", "shape": [2]}, "data_offsets"),
        ({"dtype": "F16", "shape": [2], "data_offsets": [0, 2]}, "takes 4"),
        ([1, 2], "non-object"),
    ],
)
def test_bad_tensor_entries_name_the_file_and_tensor(
    tmp_path: Path, entry: object, problem: str
) -> None:
    path = tmp_path / "bad.safetensors"
    write_raw(path, json.dumps({"t": entry}).encode(), data_bytes=64)

    with pytest.raises(WeightsFormatError, match=problem) as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)
    assert "'t'" in str(info.value)


def test_bad_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    write_raw(path, json.dumps({"__metadata__": {"n": 1}}).encode())

    with pytest.raises(WeightsFormatError, match="__metadata__"):
        read_safetensors_header(path)


def test_truncated_data_is_refused_in_a_directory(tmp_path: Path) -> None:
    # A download cut short: the header is whole but the tensor data is not all there.
    path = tmp_path / "model.safetensors"
    size = write_safetensors(path, {"w": ("BF16", [1000])})
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - size // 2)

    with pytest.raises(WeightsFormatError, match="truncated") as info:
        estimate_directory(tmp_path)
    assert str(path) in str(info.value)


def test_a_small_model_gets_the_minimum_overhead(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"w": ("F32", [MIB // 4])})  # 1 MiB

    estimate = estimate_directory(tmp_path)

    assert estimate is not None
    assert estimate.weights_bytes == MIB
    assert estimate.overhead_mb == MIN_OVERHEAD_MB == 1024
    assert estimate.vram_estimate_mb == 1 + 1024
    assert "1024 MiB overhead" in estimate.note
    assert "the first load measures the real use" in estimate.note


def test_a_big_model_gets_ten_percent(tmp_path: Path) -> None:
    # 20 GiB of BF16 over two sparse shards: 10 Gi parameters, no disk used.
    half = 5 * 1024**3
    write_safetensors(tmp_path / "a.safetensors", {"a": ("BF16", [half])})
    write_safetensors(tmp_path / "b.safetensors", {"b": ("BF16", [half])})

    estimate = estimate_directory(tmp_path)

    assert estimate is not None
    assert estimate.parameters == 10 * 1024**3
    assert estimate.weights_bytes == 20 * GIB
    assert estimate.overhead_mb == 2048
    assert estimate.vram_estimate_mb == 20 * 1024 + 2048


def test_overhead_is_configurable(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"w": ("F32", [MIB // 4])})

    estimate = estimate_directory(tmp_path, overhead_fraction=0.5, min_overhead_mb=0)

    assert estimate is not None
    assert (estimate.overhead_mb, estimate.vram_estimate_mb) == (0, 1)


@pytest.mark.parametrize(
    ("weights_mb", "overhead_mb"),
    [(0, 1024), (1, 1024), (10_240, 1024), (10_250, 1025), (100_000, 10_000)],
)
def test_overhead_rule(weights_mb: int, overhead_mb: int) -> None:
    assert overhead_for(weights_mb * MIB) == (weights_mb + overhead_mb, overhead_mb)


def test_partial_mebibytes_round_up() -> None:
    assert overhead_for(MIB + 1) == (2 + 1024, 1024)


@pytest.mark.parametrize(
    "kwargs",
    [{"overhead_fraction": -0.1}, {"overhead_fraction": math.nan}, {"min_overhead_mb": -1}],
)
def test_nonsense_overhead_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        overhead_for(MIB, **kwargs)


shapes = st.lists(st.integers(min_value=0, max_value=64), max_size=4)


@settings(max_examples=50, deadline=None)
@given(
    tensors=st.lists(st.tuples(st.sampled_from(["F32", "BF16", "I8", "U64"]), shapes), max_size=8)
)
def test_parameters_are_the_sum_of_shape_products(tensors: list[tuple[str, list[int]]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        write_safetensors(
            root / "model.safetensors",
            {f"t{i}": (dtype, shape) for i, (dtype, shape) in enumerate(tensors)},
        )

        estimate = estimate_directory(root)

    if not tensors:
        assert estimate is None
        return
    assert estimate is not None
    assert estimate.parameters == sum(math.prod(shape) for _, shape in tensors)
    assert estimate.weights_bytes == sum(
        math.prod(shape) * DTYPE_BITS[dtype] // 8 for dtype, shape in tensors
    )
    assert sum(estimate.dtypes.values()) == estimate.parameters


def test_dtype_sizes_match_the_format() -> None:
    assert {d: DTYPE_BITS[d] // 8 for d in ("F64", "F32", "F16", "BF16", "I64", "I32")} == {
        "F64": 8,
        "F32": 4,
        "F16": 2,
        "BF16": 2,
        "I64": 8,
        "I32": 4,
    }
    assert DTYPE_BITS["BOOL"] == DTYPE_BITS["F8_E5M2"] == DTYPE_BITS["U8"] == 8


def estimate_of(vram_mb: int) -> WeightsEstimate:
    return WeightsEstimate(
        files=1,
        parameters=1,
        weights_bytes=2,
        dtype="BF16",
        dtypes={"BF16": 1},
        vram_estimate_mb=vram_mb,
        overhead_mb=1024,
        note="an estimate",
    )


def test_suggested_entry_is_a_valid_catalog_entry(tmp_path: Path) -> None:
    suggestion = suggest_catalog_entry(
        "qwen3-8b", "Qwen/Qwen3-8B", "0123456789abcdef", estimate_of(18_000), gguf=False
    )

    assert list(suggestion) == ["qwen3-8b"]
    json.dumps(suggestion)  # it travels in a job result
    spec = _loaded(suggestion, tmp_path)["qwen3-8b"]
    assert spec.preset == "vllm" and spec.vram_mb == 18_000
    assert spec.hf_repo == "Qwen/Qwen3-8B"
    assert spec.weights == "qwen3-8b"
    assert spec.process is not None
    assert str(tmp_path / "weights" / "qwen3-8b") in spec.process.argv
    assert "0123456789ab" in (spec.description or "")


def test_gguf_weights_are_suggested_for_llama_server(tmp_path: Path) -> None:
    (tmp_path / "weights" / "m").mkdir(parents=True)
    (tmp_path / "weights" / "m" / "m-Q4_K_M.gguf").write_bytes(b"GGUF")
    suggestion = suggest_catalog_entry("m", "org/m-GGUF", None, estimate_of(900), gguf=True)
    spec = _loaded(suggestion, tmp_path)["m"]
    assert spec.preset == "llama-cpp" and spec.process is not None
    assert str(tmp_path / "weights" / "m" / "m-Q4_K_M.gguf") in spec.process.argv


def _loaded(models: dict[str, Any], tmp_path: Path) -> dict[str, ModelSpec]:
    overrides = {"models": models, "state_dir": str(tmp_path)}
    return load_config(None, environ={}, overrides=overrides).models


def test_without_an_estimate_the_operator_must_supply_vram(tmp_path: Path) -> None:
    entry = suggest_catalog_entry("m", "org/m", None, None, gguf=False)["m"]

    assert "vram_mb" not in entry
    with pytest.raises(ConfigError, match="vram_mb"):
        _loaded({"m": entry}, tmp_path)
    assert _loaded({"m": {**entry, "vram_mb": 4096}}, tmp_path)["m"].description == "org/m"


def test_gguf_files_are_estimated_from_their_size(tmp_path: Path) -> None:
    (tmp_path / "m-Q4_K_M.gguf").write_bytes(b"G" * (3 * MIB))
    (tmp_path / "mmproj-F16.gguf").write_bytes(b"G" * MIB)
    (tmp_path / "README.md").write_text("not weights")
    estimate = estimate_directory(tmp_path, overhead_fraction=0.5, min_overhead_mb=1)
    assert estimate is not None
    assert estimate.weights_bytes == 4 * MIB and estimate.files == 2
    assert estimate.vram_estimate_mb == 4 + 2 and estimate.dtype == "gguf"
