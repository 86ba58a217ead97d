"""Estimate the VRAM a downloaded model needs from its safetensors headers.

A safetensors file starts with an 8-byte little-endian header length N, then N bytes
of UTF-8 JSON naming every tensor's dtype, shape and byte range; the tensor data
follows. Only the header is read, so estimating a 60 GB checkpoint costs a few
kilobytes of I/O. The estimate is the weights' size plus an overhead for the CUDA
context, activations and KV cache; the first load measures the real use.

Pure apart from reading files: no huggingface_hub, no safetensors package. Blocking
file I/O: async callers run these functions with ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024

#: The overhead added to the weights' size is this fraction of it...
OVERHEAD_FRACTION = 0.10
#: ...but never less than this: a CUDA context alone takes several hundred MiB.
MIN_OVERHEAD_MB = 1024
#: Real headers are kilobytes to a few MiB; a larger length means a corrupt file.
MAX_HEADER_BYTES = 100 * MIB
#: A checkpoint index names the shard of every tensor (sharded checkpoints).
INDEX_SUFFIX = ".safetensors.index.json"

_METADATA_KEY = "__metadata__"
_LENGTH = struct.Struct("<Q")

#: Bits per element of each dtype the safetensors format defines. F4 packs two
#: values per byte and F6 four per three bytes, hence bits rather than bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


class WeightsFormatError(ValueError):
    """A safetensors file (or checkpoint index) that cannot be read as one."""


@dataclass(frozen=True, slots=True)
class WeightsEstimate:
    """What the safetensors headers of one directory add up to."""

    files: int
    parameters: int
    weights_bytes: int
    dtype: str
    dtypes: dict[str, int]
    vram_estimate_mb: int
    overhead_mb: int
    note: str
    missing_shards: tuple[str, ...] = field(default=())
    """Shards a checkpoint index names that are not in the directory (relative paths)."""


def overhead_for(
    weights_bytes: int,
    *,
    overhead_fraction: float = OVERHEAD_FRACTION,
    min_overhead_mb: int = MIN_OVERHEAD_MB,
) -> tuple[int, int]:
    """``(vram_estimate_mb, overhead_mb)`` for weights of this many bytes.

    ``overhead_mb = max(min_overhead_mb, round(overhead_fraction * weights_mb))`` and
    the estimate is the weights rounded up to whole MiB plus that overhead.
    """
    if weights_bytes < 0:
        raise ValueError(f"weights_bytes must be >= 0, not {weights_bytes}")
    if not overhead_fraction >= 0:  # also refuses NaN
        raise ValueError(f"overhead_fraction must be >= 0, not {overhead_fraction}")
    if min_overhead_mb < 0:
        raise ValueError(f"min_overhead_mb must be >= 0, not {min_overhead_mb}")
    overhead_mb = max(min_overhead_mb, round(overhead_fraction * weights_bytes / MIB))
    return math.ceil(weights_bytes / MIB) + overhead_mb, overhead_mb


def tensor_bytes(dtype: str, shape: list[int]) -> int:
    """The bytes one tensor's data takes; raises ``ValueError`` for an unknown dtype."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        raise ValueError(f"unknown dtype {dtype!r}")
    return math.ceil(math.prod(shape) * bits / 8)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file, validated; the tensor data is never read.

    Every entry but ``__metadata__`` has a known ``dtype``, a ``shape`` of non-negative
    ints and ``data_offsets`` that match the shape and lie inside the file.
    """
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(_LENGTH.size)
            if len(prefix) < _LENGTH.size:
                raise _error(path, f"is {size} bytes, too short for the 8-byte header length")
            (length,) = _LENGTH.unpack(prefix)
            if length > MAX_HEADER_BYTES:
                raise _error(
                    path, f"declares a {length}-byte header (limit {MAX_HEADER_BYTES}): corrupt"
                )
            if length > size - _LENGTH.size:
                raise _error(
                    path, f"declares a {length}-byte header but is only {size} bytes: truncated"
                )
            raw = f.read(length)
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror or exc})") from exc
    if len(raw) < length:
        raise _error(path, "ended while reading the header: truncated")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(path, f"has a header that is not UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _error(path, f"has a header that is a JSON {type(header).__name__}, not an object")
    data_bytes = size - _LENGTH.size - length
    for name, entry in header.items():
        if name == _METADATA_KEY:
            _check_metadata(path, entry)
        else:
            _check_tensor(path, name, entry, data_bytes)
    return header


def estimate_directory(
    directory: Path,
    *,
    overhead_fraction: float = OVERHEAD_FRACTION,
    min_overhead_mb: int = MIN_OVERHEAD_MB,
) -> WeightsEstimate | None:
    """Sum the safetensors headers under ``directory`` into a VRAM estimate.

    Searches recursively but skips hidden files and directories (``.cache`` holds the
    hub's partial downloads) and symlinks whose target lies outside ``directory``.
    ``None`` when there is no safetensors file or no tensor to estimate from.
    """
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory")
    root = directory.resolve()
    files: dict[Path, Path] = {}  # resolved -> as found, which errors name
    indexes: list[Path] = []
    ggufs: dict[Path, Path] = {}
    for path, target in _visible_files(directory, root):
        if path.name.endswith(".safetensors"):
            files.setdefault(target, path)  # two links to one blob count once
        elif path.name.endswith(INDEX_SUFFIX):
            indexes.append(path)
        elif path.name.endswith(".gguf"):
            ggufs.setdefault(target, path)
    if not files:
        return _estimate_gguf(ggufs, overhead_fraction, min_overhead_mb) if ggufs else None
    dtypes: dict[str, int] = {}
    weights_bytes = 0
    for path in files.values():
        for name, entry in read_safetensors_header(path).items():
            if name == _METADATA_KEY:
                continue
            dtype, shape = entry["dtype"], entry["shape"]
            dtypes[dtype] = dtypes.get(dtype, 0) + math.prod(shape)
            weights_bytes += tensor_bytes(dtype, shape)
    if not dtypes:
        return None
    present = files.keys()
    missing = sorted(
        str(shard.relative_to(root))
        for index in indexes
        for shard in _shards(index)
        if shard not in present and shard.is_relative_to(root)
    )
    parameters = sum(dtypes.values())
    # Most parameters wins; ties go to the alphabetically first name, so it is stable.
    dominant = min(dtypes, key=lambda d: (-dtypes[d], d))
    vram_mb, overhead_mb = overhead_for(
        weights_bytes, overhead_fraction=overhead_fraction, min_overhead_mb=min_overhead_mb
    )
    note = (
        f"an estimate: {parameters:,} parameters × dtype size "  # noqa: RUF001 (a real times sign)
        f"({math.ceil(weights_bytes / MIB)} MiB) plus {overhead_mb} MiB overhead for "
        "CUDA context, activations and KV cache; the first load measures the real use"
    )
    if missing:
        note += (
            f". {len(missing)} shard(s) the checkpoint index names are missing, "
            "so it counts only the files present"
        )
    return WeightsEstimate(
        files=len(files),
        parameters=parameters,
        weights_bytes=weights_bytes,
        dtype=dominant,
        dtypes=dict(sorted(dtypes.items())),
        vram_estimate_mb=vram_mb,
        overhead_mb=overhead_mb,
        note=note,
        missing_shards=tuple(missing),
    )


def _estimate_gguf(
    files: dict[Path, Path], overhead_fraction: float, min_overhead_mb: int
) -> WeightsEstimate:
    """GGUF files hold their tensors as llama.cpp loads them: their size is the weights'
    (every file counts: a split model's parts and a projector are all loaded)."""
    weights_bytes = sum(path.stat().st_size for path in files)
    vram_mb, overhead_mb = overhead_for(
        weights_bytes, overhead_fraction=overhead_fraction, min_overhead_mb=min_overhead_mb
    )
    note = (
        f"an estimate: the GGUF files' size ({math.ceil(weights_bytes / MIB)} MiB) plus "
        f"{overhead_mb} MiB overhead for CUDA context and KV cache; the first load measures "
        "the real use"
    )
    return WeightsEstimate(
        files=len(files),
        parameters=0,
        weights_bytes=weights_bytes,
        dtype="gguf",
        dtypes={},
        vram_estimate_mb=vram_mb,
        overhead_mb=overhead_mb,
        note=note,
    )


def suggest_catalog_entry(
    name: str,
    repo: str,
    revision: str | None,
    estimate: WeightsEstimate | None,
    *,
    gguf: bool,
) -> dict[str, Any]:
    """A ``models:`` catalog entry for freshly installed weights: ``catalog add`` takes it
    as it is, and so does the file.

    Returns ``{name: {...}}``, JSON-serialisable: the llama-cpp preset for GGUF files, vLLM's
    otherwise, serving the installed weights. ``vram_mb`` is left out when there is no
    estimate, so the entry does not validate until the operator supplies one.
    """
    at = f" at {revision[:12]}" if revision else ""
    entry: dict[str, Any] = {
        "preset": "llama-cpp" if gguf else "vllm",
        "weights": name,
        "hf_repo": repo,
        "description": f"{repo}{at}",
    }
    if estimate is not None:
        entry["vram_mb"] = estimate.vram_estimate_mb
    return {name: entry}


def _error(path: Path, problem: str) -> WeightsFormatError:
    return WeightsFormatError(f"{path} {problem}; download it again or remove it")


def _check_metadata(path: Path, metadata: object) -> None:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _error(path, f"has a {_METADATA_KEY!r} that is not an object of strings")


def _check_tensor(path: Path, name: str, entry: object, data_bytes: int) -> None:
    if not isinstance(entry, dict):
        raise _error(path, f"has tensor {name!r} described by a non-object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _error(path, f"has tensor {name!r} with unknown dtype {dtype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise _error(path, f"has tensor {name!r} whose shape {shape!r} is not a list of ints >= 0")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_natural(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _error(
            path, f"has tensor {name!r} whose data_offsets {offsets!r} are not [start, end]"
        )
    start, end = offsets
    expected = tensor_bytes(dtype, shape)
    if end - start != expected:
        raise _error(
            path,
            f"has tensor {name!r} of {end - start} bytes, but {dtype} {shape} takes {expected}",
        )
    if end > data_bytes:
        raise _error(
            path, f"has tensor {name!r} ending at byte {end} of only {data_bytes}: truncated"
        )


def _natural(value: object) -> bool:
    # bool is an int subclass: JSON true must not pass for a dimension of 1.
    return type(value) is int and value >= 0


def _visible_files(directory: Path, root: Path) -> Iterator[tuple[Path, Path]]:
    """``(path, resolved)`` of the files under ``directory`` that count.

    Skips hidden names and links out of ``root`` (the resolved directory).
    """
    # followlinks=False: a symlinked directory is listed but never entered.
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            target = path.resolve()
            # The hub's cache layout links snapshot files to blobs; links are fine as
            # long as they stay inside the directory.
            if target.is_relative_to(root) and target.is_file():
                yield path, target


def _shards(index: Path) -> Iterator[Path]:
    """The shard files a ``*.safetensors.index.json`` names, as resolved paths."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(index, f"is not a readable JSON checkpoint index ({exc})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _error(index, "has no 'weight_map' object of tensor name -> shard file")
    for shard in sorted(set(weight_map.values())):
        yield (index.parent / shard).resolve()
