"""The Hugging Face Hub adapter: resolve a repo to a commit and its files, and download them.

The only module of modelbus that imports ``huggingface_hub``, and only in a child process
(``python -m agent.hub resolve|download``): cancelling kills the child's process group at once,
even on a stalled connection; the agent's memory stays flat and its event loop never runs the
blocking library; the library's import cost stays out of the agent.

Child protocol: the parent writes one JSON object of arguments on the child's stdin and keeps
stdin open (the child exits when it reads EOF, so it never outlives a crashed agent). The token
travels in the environment, never in argv. The child writes JSON lines on stdout:
``{"progress": n}`` (bytes written to disk this run, at most every ``PROGRESS_INTERVAL_S`` and
once at the end of a download), then exactly one of ``{"resolved": {...}}``, ``{"done": true}``
or ``{"error": code, "message": text}``; anything the library prints goes to stderr.

Files land in ``local_dir`` (``snapshot_download(local_dir=...)``): files already complete there
are not downloaded again, but a file interrupted mid-way starts over from byte 0 (an interrupted
file leaves a ``*.incomplete`` under ``local_dir/.cache/huggingface/download``, which
``remove_incomplete`` deletes). The library's other state (cache dir, ``HF_HOME``) is kept under
``local_dir/.cache/huggingface`` too, so nothing is written to ``~/.cache``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.messages import ErrorCode

# How often the download child reports progress (when it changed).
PROGRESS_INTERVAL_S = 0.2
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
        return sum(f.size for f in self.files if not f.present)


@dataclass(frozen=True, slots=True)
class HubSettings:
    endpoint: str | None = None  # None: huggingface_hub's default, or HF_ENDPOINT
    token: str | None = None  # passed to the child in its environment, never in argv
    timeout_s: float = 60.0  # for resolve
    chunk_bytes: int = 64 << 10  # download chunk: one progress step
    # Files downloaded at once. A file interrupted mid-way restarts from byte 0, so a cancel
    # loses the partial bytes of up to this many files; 1 downloads in path order.
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
    after filtering, each marked present when complete in ``local_dir`` already."""
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
                RepoFile(path=str(path), size=int(size), present=bool(present))
                for path, size, present in body["files"]
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

    ``on_progress(bytes_written_this_run)`` is called on the event loop as the child reports.
    Cancelling kills the child, waits for it and deletes its ``*.incomplete`` files before the
    CancelledError propagates; files that finished stay (the next download skips them)."""
    args = {
        "repo": resolved.repo,
        "revision": resolved.revision,
        "include": include or None,
        "exclude": exclude or None,
        "local_dir": str(local_dir),  # the child shares our cwd
        "endpoint": settings.endpoint,
        "chunk_bytes": settings.chunk_bytes,
        "max_workers": settings.max_workers,
        "files": [[f.path, f.size] for f in resolved.files],
    }
    try:
        await _talk("download", args, _child_env(settings, local_dir), on_progress)
    except asyncio.CancelledError:
        await asyncio.to_thread(remove_incomplete, local_dir)
        raise
    except HubError as error:
        if error.code == ErrorCode.DOWNLOAD_FAILED:
            # The child may have died mid-file; a failure it caught itself cleans up already.
            await asyncio.to_thread(remove_incomplete, local_dir)
        raise


def remove_incomplete(local_dir: Path) -> int:
    """Delete the ``*.incomplete`` files an interrupted download left in ``local_dir``; how many.

    huggingface_hub never resumes them: each download of a file starts a new one."""
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
        "agent.hub",
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


# --- the child's side (python -m agent.hub resolve|download)


class _Progress:
    """Bytes written this run, from the tqdm bars huggingface_hub creates, reported by a thread.

    snapshot_download makes a files bar and two byte bars whose ``total`` grows as files start;
    the one described "Reconstructing..." counts bytes written to disk (the other, bytes off the
    network). Should a later version rename it, the first byte bar stands in."""

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        self._emit = emit
        self._lock = threading.Lock()
        self._counts: list[int] = []
        self._descs: list[str] = []
        self._units: list[str | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, name="progress", daemon=True)

    def register(self, desc: str, unit: str | None) -> int:
        with self._lock:
            self._counts.append(0)
            self._descs.append(desc)
            self._units.append(unit)
            return len(self._counts) - 1

    def add(self, bar: int, n: int) -> None:
        with self._lock:
            self._counts[bar] += n

    def value(self) -> int:
        with self._lock:
            chosen = next(
                (i for i, d in enumerate(self._descs) if d.startswith("Reconstructing")),
                next((i for i, u in enumerate(self._units) if u == "B"), None),
            )
            return 0 if chosen is None else self._counts[chosen]

    def bar_class(self) -> type[Any]:
        from tqdm import tqdm  # type: ignore[import-untyped]

        progress = self

        class Bar(tqdm):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self._modelbus_bar = progress.register(
                    str(kwargs.get("desc") or ""), kwargs.get("unit")
                )
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                progress.add(self._modelbus_bar, int(n or 0))
                return None

        return Bar

    def _report(self) -> None:
        last = -1
        while not self._stop.wait(PROGRESS_INTERVAL_S):
            if (value := self.value()) != last:
                self._emit({"progress": value})
                last = value

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._emit({"progress": self.value()})


@dataclass(frozen=True)
class _Request:
    repo: str
    revision: str | None
    include: list[str] | None
    exclude: list[str] | None
    local_dir: Path
    endpoint: str
    token: str | None

    @property
    def library_dir(self) -> Path:
        return self.local_dir / ".cache" / "huggingface"

    @property
    def cache_dir(self) -> Path:
        # snapshot_download writes refs there even with local_dir; keep them in the install.
        return self.library_dir / "hub"

    def gated(self) -> HubError:
        return HubError(
            ErrorCode.FORBIDDEN,
            f"'{self.repo}' is gated: accept its terms on the hub and set weights.token or "
            "HF_TOKEN",
        )


def _check_repo(request: _Request) -> str:
    """The commit sha of the requested revision; raises the library's error when there is none."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=request.endpoint, token=request.token or False)
    info = api.model_info(request.repo, revision=request.revision)
    if info.gated and not request.token:
        raise request.gated()
    if info.sha is None:
        raise HubError(
            ErrorCode.DOWNLOAD_FAILED,
            f"the hub at {request.endpoint} gave no commit for '{request.repo}'; retry later",
        )
    return info.sha


def _child_resolve(request: _Request, emit: Callable[[dict[str, Any]], None]) -> None:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile as HubFile
    from huggingface_hub.utils._paths import filter_repo_objects

    sha = _check_repo(request)
    api = HfApi(endpoint=request.endpoint, token=request.token or False)
    sizes = {
        entry.path: entry.size
        for entry in api.list_repo_tree(request.repo, revision=sha, recursive=True)
        if isinstance(entry, HubFile)
    }
    paths = sorted(
        filter_repo_objects(sizes, allow_patterns=request.include, ignore_patterns=request.exclude)
    )
    present: set[str] = set()
    # A dry run asks the library itself what it would skip, at the cost of a HEAD per file;
    # an install that has not started has nothing to skip (and the dry run would create it).
    if paths and request.local_dir.is_dir():
        plan = snapshot_download(
            request.repo,
            revision=sha,
            local_dir=request.local_dir,
            cache_dir=request.cache_dir,
            endpoint=request.endpoint,
            token=request.token or False,
            allow_patterns=request.include,
            ignore_patterns=request.exclude,
            dry_run=True,
        )
        present = {p.filename for p in plan if not p.will_download}
    files = [[path, sizes[path], path in present] for path in paths]
    emit({"resolved": {"repo": request.repo, "revision": sha, "files": files}})


def _child_download(
    request: _Request,
    chunk_bytes: int,
    max_workers: int,
    files: list[tuple[str, int]],
    emit: Callable[[dict[str, Any]], None],
) -> None:
    from huggingface_hub import constants, snapshot_download

    # Pinned to a sha, snapshot_download skips the repo lookup, and on an error listing the tree
    # it returns a non-empty local_dir as it is: look the repo up first, for the real error.
    _check_repo(request)
    constants.DOWNLOAD_CHUNK_SIZE = chunk_bytes  # read per call
    with _Progress(emit) as progress:
        snapshot_download(
            request.repo,
            revision=request.revision,
            local_dir=request.local_dir,
            cache_dir=request.cache_dir,
            endpoint=request.endpoint,
            token=request.token or False,
            allow_patterns=request.include,
            ignore_patterns=request.exclude,
            tqdm_class=progress.bar_class(),
            max_workers=max(1, max_workers),
        )
    missing = [
        path
        for path, size in files
        if not (request.local_dir / path).is_file()
        or (request.local_dir / path).stat().st_size != size
    ]
    if missing:
        raise HubError(
            ErrorCode.DOWNLOAD_FAILED,
            f"{len(missing)} file(s) of '{request.repo}' ({', '.join(missing[:3])}) are missing "
            f"or truncated after the download; retry it",
        )
    emit({"done": True})


def _classify(error: BaseException, request: _Request) -> tuple[ErrorCode, str]:
    from huggingface_hub import errors

    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    where = request.endpoint
    for item in chain:
        if isinstance(item, HubError):
            return item.code, item.message
        if isinstance(item, errors.GatedRepoError):
            return request.gated().code, request.gated().message
        if isinstance(item, errors.RepositoryNotFoundError):
            return ErrorCode.NOT_FOUND, (
                f"repository '{request.repo}' was not found on {where}; check the id, or set a "
                "token for a private repo"
            )
        if isinstance(item, errors.RevisionNotFoundError):
            return ErrorCode.NOT_FOUND, (
                f"revision '{request.revision}' of '{request.repo}' was not found on {where}; "
                "check the branch, tag or commit"
            )
        if isinstance(item, errors.RemoteEntryNotFoundError):
            return ErrorCode.NOT_FOUND, (
                f"a file of '{request.repo}' at {request.revision} was not found on {where}; "
                "resolve the repo again and retry"
            )
        status = getattr(getattr(item, "response", None), "status_code", None)
        if isinstance(item, errors.HfHubHTTPError) and status in (401, 403):
            return ErrorCode.FORBIDDEN, (
                f"the hub at {where} refused the token for '{request.repo}' "
                f"(HTTP {status}); check weights.token or HF_TOKEN"
            )
        if (isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            "No space left on device" in str(item)
        ):
            return ErrorCode.INSUFFICIENT_DISK, (
                f"the disk under {request.local_dir} is full; free space or move weights.dir "
                "to a larger disk, then retry"
            )
    library = ("huggingface_hub", "httpx", "httpcore", "hf_xet", "h11", "ssl", "socket")
    if any(
        isinstance(item, OSError) or type(item).__module__.split(".")[0] in library
        for item in chain
    ):
        return ErrorCode.DOWNLOAD_FAILED, (
            f"fetching '{request.repo}' from {where} failed "
            f"({type(error).__name__}: {_short(error)}); check the network and retry, files "
            "already complete are kept"
        )
    return ErrorCode.INTERNAL, (
        f"the hub adapter failed unexpectedly ({type(error).__name__}: {_short(error)}); "
        "report this with the agent log"
    )


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def _exit_when_orphaned() -> None:
    # The parent holds our stdin open for as long as it wants us: EOF means it is gone.
    with contextlib.suppress(Exception):
        sys.stdin.read()
    os._exit(3)


def _child_main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("resolve", "download"):
        print("usage: python -m agent.hub resolve|download  (arguments as JSON on stdin)")
        return 2
    # Protocol lines go to the real stdout; anything the library prints goes to stderr.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    lock = threading.Lock()

    def emit(message: dict[str, Any]) -> None:
        with lock:
            out.write(json.dumps(message) + "\n")
            out.flush()

    args = json.loads(sys.stdin.readline())
    threading.Thread(target=_exit_when_orphaned, name="orphan-watch", daemon=True).start()

    from huggingface_hub import constants

    request = _Request(
        repo=args["repo"],
        revision=args.get("revision"),
        include=args.get("include"),
        exclude=args.get("exclude"),
        local_dir=Path(args["local_dir"]).absolute(),
        endpoint=args.get("endpoint") or constants.ENDPOINT,
        token=os.environ.get(_TOKEN_VAR) or None,
    )
    try:
        if argv[0] == "resolve":
            _child_resolve(request, emit)
        else:
            files = [(str(path), int(size)) for path, size in args["files"]]
            workers = int(args.get("max_workers") or 8)
            _child_download(request, int(args["chunk_bytes"]), workers, files, emit)
    except Exception as error:
        code, message = _classify(error, request)
        if code == ErrorCode.INTERNAL:
            traceback.print_exc()
        emit({"error": code.value, "message": message})
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
