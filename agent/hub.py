"""The Hugging Face Hub adapter: resolve a repo to a commit and its files, and download them.

The agent's side. The library runs only in a child process (``agent/hub_child.py``, the
only module that imports ``huggingface_hub``: ``python -m agent.hub_child resolve|download``):
cancelling kills the child's process group at once,
even on a stalled connection; the agent's memory stays flat and its event loop never runs the
blocking library; the library's import cost stays out of the agent.

Child protocol: the parent writes one JSON object of arguments on the child's stdin and keeps
stdin open (the child exits when it reads EOF, so it never outlives a crashed agent). The token
travels in the environment, never in argv. The child writes JSON lines on stdout:
``{"progress": n}`` (bytes written to disk this run, at most every ``PROGRESS_INTERVAL_S`` and
once at the end of a download), then exactly one of ``{"resolved": {...}}``, ``{"done": true}``
or ``{"error": code, "message": text}``; anything the library prints goes to stderr.

huggingface_hub does what it is good at: the commit a revision points at, the file listing
(sizes, LFS sha256), auth and its errors (gated, not found, bad token), and each file's final
location (``get_hf_file_metadata``: a HEAD, whose redirect to a CDN it does not follow). The
bytes themselves stream with urllib's ``readinto`` into one reusable buffer per file, at the
speed of a plain GET rather than that of the library's pure-Python HTTP client.

A file downloads to ``local_dir/.cache/modelbus/<path>.<etag>.part`` and counts only once renamed
to ``local_dir/<path>`` with the listed size. A part file survives a cancel, a kill or a crash:
the next download asks for the rest (``Range: bytes=<have>-``), as does a retry after a dropped
connection. The etag in its name ties the bytes to one version of the file, so a part file of
another version is never resumed. A file already at its path with the listed size is present:
no request is made for it. Sizes are verified, contents are not hashed (hashing costs more CPU
than the transfer itself: see ``bench/install.py``). The library's own state (``HF_HOME``) is kept
under ``local_dir/.cache/huggingface``, so nothing is written to ``~/.cache``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.messages import ErrorCode

# How often the download child reports progress (when it changed).
PROGRESS_INTERVAL_S = 0.2
# A file's download is tried again after these pauses (a dropped connection, a timeout, a 5xx);
# the count starts over whenever an attempt brought bytes.
RETRY_DELAYS_S = (0.0, 0.25, 1.0, 2.0)
# Where unfinished files live, under local_dir (hidden: never listed or estimated as weights).
PARTIAL_DIR = Path(".cache") / "modelbus"
# Characters of the etag in a part file's name: enough to tell versions of one path apart.
_ETAG_CHARS = 12
# The end of a dead child's stderr quoted in the error.
STDERR_TAIL_CHARS = 600
# A resolved listing of many files arrives as one line.
_LINE_LIMIT = 64 * 1024 * 1024
_DEFAULT_ENDPOINT = "https://huggingface.co"
_TOKEN_VAR = "MODELBUS_HUB_TOKEN"
# Library settings an operator may tune in the agent's environment; every other HF_* variable
# (HF_TOKEN, HF_HOME, HF_HUB_OFFLINE, cache paths) is replaced or dropped.
_KEPT_HF_VARS = (
    "HF_ENDPOINT",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "HF_HUB_DISABLE_XET",
)
_KEPT_HF_PREFIXES = ("HF_XET_",)
# The directory holding the `agent` package, for the child's import path.
_IMPORT_ROOT = str(Path(__file__).resolve().parents[1])


class HubError(Exception):
    """A resolve or download that failed; ``message`` says what was wrong and what to do."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class RepoFile:
    path: str
    size: int  # bytes
    present: bool  # already complete in local_dir: will not be downloaded
    partial: int = 0  # bytes of an unfinished download on disk: the next download resumes there
    etag: str | None = None  # LFS sha256 or git blob id: names the part file of this version


@dataclass(frozen=True, slots=True)
class ResolvedRepo:
    repo: str
    revision: str  # the commit sha (40 hex) the download is pinned to
    files: tuple[RepoFile, ...]  # after include/exclude filtering

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing_bytes(self) -> int:
        """Bytes still to fetch: part files already on disk are not missing."""
        return sum(f.size - f.partial for f in self.files if not f.present)


@dataclass(frozen=True, slots=True)
class HubSettings:
    endpoint: str | None = None  # None: huggingface_hub's default, or HF_ENDPOINT
    token: str | None = None  # passed to the child in its environment, never in argv
    timeout_s: float = 60.0  # for resolve
    chunk_bytes: int = 1 << 20  # the read buffer of each file's download: one progress step
    # Files downloaded at once (each resumes where it stopped); 1 downloads in path order.
    max_workers: int = 8


# --- the agent's side


async def resolve(
    settings: HubSettings,
    repo: str,
    revision: str | None,
    include: list[str] | None,
    exclude: list[str] | None,
    local_dir: Path,
) -> ResolvedRepo:
    """The commit ``revision`` (default: the main branch) of ``repo`` points at, and its files
    after filtering, each marked present when complete in ``local_dir`` already (its size
    matches), or with the bytes of its unfinished download."""
    args = {
        "repo": repo,
        "revision": revision,
        "include": include or None,
        "exclude": exclude or None,
        "local_dir": str(local_dir),  # the child shares our cwd
        "endpoint": settings.endpoint,
    }
    try:
        async with asyncio.timeout(settings.timeout_s):
            final = await _talk("resolve", args, _child_env(settings, local_dir), None)
    except TimeoutError:
        raise HubError(
            ErrorCode.TIMEOUT,
            f"the hub at {_endpoint_name(settings)} did not describe '{repo}' within "
            f"{settings.timeout_s:g} s; check the network and the endpoint, then retry",
        ) from None
    try:
        body = final["resolved"]
        return ResolvedRepo(
            repo=str(body["repo"]),
            revision=str(body["revision"]),
            files=tuple(
                RepoFile(
                    path=str(path),
                    size=int(size),
                    present=bool(present),
                    partial=int(partial),
                    etag=None if etag is None else str(etag),
                )
                for path, size, present, partial, etag in body["files"]
            ),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise HubError(
            ErrorCode.INTERNAL, f"the resolve process answered {final!r} ({error}); report this"
        ) from None


async def download(
    settings: HubSettings,
    resolved: ResolvedRepo,
    include: list[str] | None,
    exclude: list[str] | None,
    local_dir: Path,
    on_progress: Callable[[int], None],
) -> None:
    """Download the files of ``resolved`` missing from ``local_dir``, pinned to its commit.

    ``on_progress(bytes_written_this_run)`` is called on the event loop as the child reports
    (bytes resumed from part files are not counted: they were written before). Cancelling kills
    the child and waits for it before the CancelledError propagates; finished files stay (the
    next download skips them) and so do part files (the next download resumes them)."""
    args = {
        "repo": resolved.repo,
        "revision": resolved.revision,
        "include": include or None,
        "exclude": exclude or None,
        "local_dir": str(local_dir),  # the child shares our cwd
        "endpoint": settings.endpoint,
        "chunk_bytes": settings.chunk_bytes,
        "max_workers": settings.max_workers,
        "files": [[f.path, f.size, f.etag] for f in resolved.files],
    }
    await _talk("download", args, _child_env(settings, local_dir), on_progress)


def part_path(local_dir: Path, path: str, etag: str | None) -> Path:
    """Where the unfinished download of ``path`` (the version with ``etag``) lives."""
    suffix = f".{etag[:_ETAG_CHARS]}.part" if etag else ".part"
    return local_dir / PARTIAL_DIR / (path + suffix)


def remove_incomplete(local_dir: Path) -> int:
    """Delete the ``*.incomplete`` files huggingface_hub's own downloads (modelbus before it
    resumed files itself) left in ``local_dir``; how many. Nothing resumes them.

    Part files of modelbus's downloads are kept: the next download resumes them."""
    removed = 0
    for path in (local_dir / ".cache" / "huggingface" / "download").rglob("*.incomplete"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _endpoint_name(settings: HubSettings) -> str:
    return settings.endpoint or os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT


def _child_env(settings: HubSettings, local_dir: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGINGFACE_"))
        or key in _KEPT_HF_VARS
        or key.startswith(_KEPT_HF_PREFIXES)
    }
    env.pop(_TOKEN_VAR, None)
    library_dir = local_dir.absolute() / ".cache" / "huggingface"
    env.update(
        HF_HOME=str(library_dir / "home"),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        # The token is passed explicitly or not at all: a stray ~/.cache token never leaks.
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        # Only hub's own bars: ours get every update whatever this says.
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=os.pathsep.join(p for p in (_IMPORT_ROOT, env.get("PYTHONPATH")) if p),
    )
    if settings.endpoint:
        env["HF_ENDPOINT"] = settings.endpoint
    if settings.token:
        env[_TOKEN_VAR] = settings.token
    return env


async def _talk(
    command: str,
    args: dict[str, Any],
    env: dict[str, str],
    on_progress: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Run the child to its final line; the child is dead when this returns or raises."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.hub_child",
        command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group, killed as one
        limit=_LINE_LIMIT,
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    stderr_task = asyncio.create_task(_tail(process.stderr))
    final: dict[str, Any] | None = None
    try:
        # A child that died at once shows as a missing final line, with its stderr.
        with contextlib.suppress(ConnectionError):
            process.stdin.write(json.dumps(args).encode() + b"\n")
            await process.stdin.drain()
        while line := await process.stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if "progress" in message:
                if on_progress is not None:
                    on_progress(int(message["progress"]))
            else:
                final = message
        returncode = await process.wait()
        stderr = await stderr_task
    finally:
        stderr_task.cancel()
        process.stdin.close()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            # Shielded: a second cancel must not leave the child unreaped.
            await asyncio.shield(process.wait())
    if final is None:
        detail = " ".join(stderr.split())[-STDERR_TAIL_CHARS:] or "no output"
        raise HubError(
            ErrorCode.DOWNLOAD_FAILED,
            f"the hub {command} process exited with status {returncode} before finishing "
            f"({detail}); retry, and see the agent log if it happens again",
        )
    if "error" in final:
        try:
            code = ErrorCode(final["error"])
        except ValueError:
            code = ErrorCode.INTERNAL
        raise HubError(code, str(final.get("message") or final["error"]))
    return final


async def _tail(stream: asyncio.StreamReader) -> str:
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-4 * STDERR_TAIL_CHARS :]
    return kept.decode(errors="replace")
