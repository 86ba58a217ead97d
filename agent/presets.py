"""Presets: the model servers operators run, so that a catalog entry is a few lines.

``preset: llama-cpp`` (llama.cpp's llama-server), ``vllm``, ``sglang`` or ``openai`` (any
OpenAI-compatible server, whose command the entry gives) fills what an entry would
otherwise spell out: the argv or the container, the health URL that says it is ready,
the stop signal, the name the server answers to and, where the server has one, the API
that puts it to sleep. The host's ``presets:`` section says where each server lives
(``command``, ``image``) and what every model of it gets (``args``, ``env``).

What a preset server is given to serve, in this order: ``weights`` (installed weights,
``<weights.dir>/<name>``; for llama-cpp the GGUF file in it), ``model_path`` (a file or
directory on this host) or ``hf_repo`` (a repo id the server downloads itself).

Pure except ``gguf_file`` (and ``expand_entries``, which calls it): it lists a directory,
as configuration loading may.
Versions whose command lines and routes these follow: llama-server as built from
llama-cpp-python 0.3.36's sources (the one the tests run: ``--model``/``--hf-repo``,
``--alias``, ``--n-gpu-layers``, ``GET /health`` 503 while loading), vLLM 0.11 (``vllm
serve``, ``--served-model-name``, ``--enable-sleep-mode`` with ``VLLM_SERVER_DEV_MODE=1``, as its
sleep-mode docs give them), SGLang 0.5 (``sglang.launch_server``, ``--enable-memory-saver``).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PresetName = Literal["llama-cpp", "vllm", "sglang", "openai"]
SleepApi = Literal["vllm", "sglang"]
# Where presets' servers listen inside their containers (the host port is the model's).
CONTAINER_MODELS_DIR = "/models"
# Ports given to preset models that name none: a stable pick from the name in this range.
PRESET_PORTS = range(20000, 30000)
# Weights not installed yet: the server is pointed at their directory, and its load fails
# saying so until they are.
_NOT_INSTALLED = "."
_SPLIT_GGUF = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class PresetSettings(BaseModel):
    """The host's settings for one preset (the ``presets:`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: list[str] | None = Field(
        default=None,
        min_length=1,
        description="the argv before the server's arguments (process runtime); "
        "default: the preset's, found on PATH",
    )
    image: str | None = Field(default=None, description="the image (docker runtime)")
    args: list[str] = Field(default_factory=list, description="added to every model's")
    env: dict[str, str] = Field(default_factory=dict, description="added to every model's")


@dataclass(frozen=True, slots=True)
class Served:
    """What a server is told to serve: a path (as the server sees it) or a repo id, and
    the volumes a container needs to see it."""

    what: str
    is_repo: bool = False
    volumes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Preset:
    """What one kind of server needs: how it is started, checked, stopped and slept."""

    name: PresetName
    command: tuple[str, ...]  # default argv prefix (process runtime); () = the entry's own
    image: str | None  # default image (docker runtime)
    health_path: str
    stop_signal: str
    # The server answers to the name it is given (the gateway sends that name).
    names_itself: bool
    sleep: SleepApi | None  # the sleep API it speaks, used unless the entry says sleep: null
    sleep_env: Mapping[str, str]  # what turning the sleep API on needs in the environment

    def served_arguments(self, served: Served, host: str, *, sleep: bool) -> list[str]:
        """The arguments naming what to serve and where to listen."""
        if self.name == "llama-cpp":
            source = ["--hf-repo" if served.is_repo else "--model", served.what]
            return [
                *source,
                *("--host", host, "--port", "${PORT}"),
                *("--alias", "${MODEL}", "--n-gpu-layers", "999"),
            ]
        if self.name == "vllm":
            listen = ["--host", host, "--port", "${PORT}", "--served-model-name", "${MODEL}"]
            return [served.what, *listen, *(["--enable-sleep-mode"] if sleep else [])]
        if self.name == "sglang":
            return [
                *("--model-path", served.what, "--host", host, "--port", "${PORT}"),
                *("--served-model-name", "${MODEL}"),
                *(["--enable-memory-saver"] if sleep else []),
            ]
        return []  # openai: the entry's command says everything


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "llama-cpp",
            ("llama-server",),
            "ghcr.io/ggml-org/llama.cpp:server-cuda",
            "/health",
            "SIGTERM",
            names_itself=False,
            sleep=None,
            sleep_env={},
        ),
        Preset(
            "vllm",
            ("vllm", "serve"),
            "vllm/vllm-openai:v0.11.0",
            "/health",
            "SIGINT",
            names_itself=True,
            sleep="vllm",
            sleep_env={"VLLM_SERVER_DEV_MODE": "1"},
        ),
        Preset(
            "sglang",
            ("python3", "-m", "sglang.launch_server"),
            "lmsysorg/sglang:v0.5.4",
            "/health",
            "SIGINT",
            names_itself=True,
            sleep="sglang",
            sleep_env={},
        ),
        Preset(
            "openai",
            (),
            None,
            "/v1/models",
            "SIGTERM",
            names_itself=False,
            sleep=None,
            sleep_env={},
        ),
    )
}
# These images start their server themselves (llama-server; vllm serve): a container gets
# the arguments only, and vLLM's names its model with --model. SGLang's image runs the
# command it is given.
_IMAGE_RUNS_SERVER = {"llama-cpp": (), "vllm": ("--model",)}


class PresetError(ValueError):
    """An entry its preset cannot complete; the message names the field."""


def expand_entry(
    entry: Mapping[str, Any],
    settings: Mapping[PresetName, PresetSettings],
    weights_dir: Path,
    gguf: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """A catalog entry with ``preset:`` as the full entry it stands for (a plain dict for
    ``ModelSpec``); an entry without one is returned as it is. ``gguf``: the GGUF file
    found in each installed weights' directory (``gguf_file``), by weights name."""
    name = entry.get("preset")
    if name is None:
        return dict(entry)
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        raise PresetError(f"preset must be one of {', '.join(PRESETS)}, not {name!r}")
    host = settings.get(preset.name) or PresetSettings()
    full = dict(entry)
    runtime = full.setdefault("runtime", "process")
    if "process" in full or "docker" in full:
        raise PresetError(
            "an entry with a preset has no process: or docker: block; give 'command' "
            "(or 'image'), 'args' and 'env' instead"
        )
    sleep_api = full.get("sleep", preset.sleep) if "sleep" in full else preset.sleep
    full["sleep"] = sleep_api
    in_container = runtime == "docker"
    served = _served(full, preset, weights_dir, gguf or {}, in_container=in_container)
    listen_host = "0.0.0.0" if in_container else "127.0.0.1"
    arguments = [
        *preset.served_arguments(served, listen_host, sleep=sleep_api is not None),
        *host.args,
        *full.pop("args", []),
    ]
    env = {**host.env, **(preset.sleep_env if sleep_api else {}), **full.pop("env", {})}
    command = full.pop("command", None)
    image = full.pop("image", None)
    if in_container:
        image = image or host.image or preset.image
        if image is None:
            raise PresetError("the openai preset on docker needs 'image'")
        if command is None:
            runs_server = _IMAGE_RUNS_SERVER.get(preset.name)
            command = preset.command if runs_server is None else runs_server
        full["docker"] = {
            "image": image,
            "command": [*command, *arguments] or None,
            "env": env,
            "volumes": dict(served.volumes),
            "bind": "127.0.0.1",
        }
    else:
        if image is not None:
            raise PresetError("'image' is for runtime: docker")
        argv = [*(command or host.command or preset.command), *arguments]
        if not argv:
            raise PresetError("the openai preset needs 'command': the server's argv with ${PORT}")
        full["process"] = {"argv": argv, "env": env}
    full.setdefault("health_url", f"http://127.0.0.1:${{PORT}}{preset.health_path}")
    full.setdefault("stop_signal", preset.stop_signal)
    if preset.names_itself and isinstance(full.get("name"), str):
        full.setdefault("upstream_model", full["name"])
    full.pop("file", None)
    return full


def _served(
    entry: dict[str, Any],
    preset: Preset,
    weights_dir: Path,
    gguf: Mapping[str, str | None],
    *,
    in_container: bool,
) -> Served:
    if preset.name == "openai":
        return Served("")
    weights, path, repo = entry.get("weights"), entry.get("model_path"), entry.get("hf_repo")
    if weights is not None:
        chosen = entry.get("file")
        if chosen is not None and (
            not isinstance(chosen, str) or chosen.startswith("/") or ".." in Path(chosen).parts
        ):
            raise PresetError(f"file must be a path inside the weights' directory, not {chosen!r}")
        if chosen is None and preset.name == "llama-cpp":
            chosen = gguf.get(str(weights), _NOT_INSTALLED)
            if chosen is None:
                raise PresetError(
                    f"weights {weights!r} hold no .gguf file for llama-server (give 'file', "
                    "or install a GGUF repo)"
                )
        relative = Path(str(weights), str(chosen)) if chosen else Path(str(weights))
        if in_container:
            inside = f"{CONTAINER_MODELS_DIR}/{relative.as_posix()}"
            return Served(inside, volumes={str(weights_dir): f"{CONTAINER_MODELS_DIR}:ro"})
        return Served(str(weights_dir / relative))
    if path is not None:
        local = Path(str(path))
        if in_container:
            inside = f"{CONTAINER_MODELS_DIR}/{local.name}"
            return Served(inside, volumes={str(local): f"{inside}:ro"})
        return Served(str(local))
    if repo is not None:
        return Served(str(repo), is_repo=True)
    raise PresetError(
        f"preset {preset.name} needs what to serve: 'weights' (installed), 'model_path' "
        "or 'hf_repo'"
    )


def gguf_file(directory: Path) -> str | None:
    """The GGUF file llama-server should load from ``directory``: the only one, or the
    first part of a split model, never a projector (``mmproj``); None when there is none.
    Reads the directory: callers outside configuration loading run it in a thread."""
    try:
        files = sorted(
            p.relative_to(directory).as_posix()
            for p in directory.rglob("*.gguf")
            if p.is_file() and "mmproj" not in p.name.lower()
        )
    except OSError:
        return None
    firsts = [f for f in files if (m := _SPLIT_GGUF.search(f)) is None or int(m.group(1)) == 1]
    return firsts[0] if firsts else None


def assign_ports(entries: Mapping[str, dict[str, Any]], taken: Iterable[int] = ()) -> None:
    """Give each preset entry without a ``port`` one of PRESET_PORTS: a stable pick from
    its name (the same after a restart, so a running server is found again), moved on
    past ports that other entries (or ``taken``) hold. Changes ``entries`` in place."""
    used = {int(e["port"]) for e in entries.values() if isinstance(e.get("port"), int)}
    used.update(taken)
    for name in sorted(entries):
        entry = entries[name]
        if entry.get("preset") is None or "port" in entry:
            continue
        start = zlib.crc32(name.encode()) % len(PRESET_PORTS)
        for step in range(len(PRESET_PORTS)):
            port = PRESET_PORTS[(start + step) % len(PRESET_PORTS)]
            if port not in used:
                entry["port"] = port
                used.add(port)
                break


def expand_entries(
    entries: Mapping[str, Any],
    settings: Mapping[PresetName, PresetSettings],
    weights_dir: Path,
    taken_ports: Iterable[int] = (),
) -> dict[str, Any]:
    """``models:`` with every preset entry expanded (``expand_entry``) and given a port;
    anything that is not an entry of a known preset passes as it is, for ``ModelSpec``
    to judge. Lists the weights of llama-cpp entries for their GGUF file."""
    plain = {name: dict(e) for name, e in entries.items() if isinstance(e, Mapping)}
    assign_ports(plain, taken_ports)
    out: dict[str, Any] = dict(entries)
    for name, entry in plain.items():
        if entry.get("preset") is None:
            continue
        gguf: dict[str, str | None] = {}
        weights = entry.get("weights")
        if entry.get("preset") == "llama-cpp" and isinstance(weights, str) and "file" not in entry:
            directory = weights_dir / weights
            if directory.is_dir():
                gguf[weights] = gguf_file(directory)
        try:
            out[name] = expand_entry({"name": name, **entry}, settings, weights_dir, gguf)
        except PresetError as error:
            raise PresetError(f"models.{name}: {error}") from None
    return out
