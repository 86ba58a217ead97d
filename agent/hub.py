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
import errno
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
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
    """Bytes written to disk this run by the download threads, reported by one more thread."""

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        self._emit = emit
        self._lock = threading.Lock()
        self._written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, name="progress", daemon=True)

    def add(self, n: int) -> None:
        with self._lock:
            self._written += n

    def _report(self) -> None:
        last = -1
        while not self._stop.wait(PROGRESS_INTERVAL_S):
            if (value := self._written) != last:
                self._emit({"progress": value})
                last = value

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._emit({"progress": self._written})


@dataclass(frozen=True)
class _Request:
    repo: str
    revision: str | None
    include: list[str] | None
    exclude: list[str] | None
    local_dir: Path
    endpoint: str
    token: str | None

    def gated(self) -> HubError:
        return HubError(
            ErrorCode.FORBIDDEN,
            f"'{self.repo}' is gated: accept its terms on the hub and set weights.token or "
            "HF_TOKEN",
        )


@dataclass(frozen=True)
class _File:
    path: str
    size: int
    etag: str | None

    def final(self, local_dir: Path) -> Path:
        return local_dir / self.path

    def part(self, local_dir: Path) -> Path:
        return part_path(local_dir, self.path, self.etag)


def _is_complete(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size and path.is_file()
    except OSError:
        return False


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
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile as HubFile
    from huggingface_hub.utils._paths import filter_repo_objects

    sha = _check_repo(request)
    api = HfApi(endpoint=request.endpoint, token=request.token or False)
    listed = {
        entry.path: _File(entry.path, entry.size, entry.lfs.sha256 if entry.lfs else entry.blob_id)
        for entry in api.list_repo_tree(request.repo, revision=sha, recursive=True)
        if isinstance(entry, HubFile)
    }
    paths = sorted(
        filter_repo_objects(listed, allow_patterns=request.include, ignore_patterns=request.exclude)
    )
    files: list[list[Any]] = []
    # Present means the right size at the right path: a stat, not a request per file.
    for path in paths:
        file = listed[path]
        present = _is_complete(file.final(request.local_dir), file.size)
        partial = 0
        if not present:
            with contextlib.suppress(OSError):
                partial = file.part(request.local_dir).stat().st_size
            partial = partial if partial <= file.size else 0  # too long: started over
        files.append([path, file.size, present, partial, file.etag])
    emit({"resolved": {"repo": request.repo, "revision": sha, "files": files}})


class _Transfer:
    """The files of one download, fetched by a few threads, each file resumable."""

    def __init__(
        self, request: _Request, chunk_bytes: int, progress: _Progress, timeout_s: float
    ) -> None:
        import urllib.request

        self.request = request
        self.chunk_bytes = chunk_bytes
        self.progress = progress
        self.timeout_s = timeout_s
        self.stopped = threading.Event()  # another file failed: stop at the next chunk
        # The default handlers: proxies from the environment, TLS, redirects. Authorization goes
        # as an unredirected header, so a redirect never carries it anywhere.
        self.opener = urllib.request.build_opener()

    def fetch_or_stop(self, file: _File) -> None:
        try:
            self.fetch(file)
        except BaseException:
            self.stopped.set()  # the other files stop at their next chunk, part files kept
            raise

    def fetch(self, file: _File) -> None:
        from huggingface_hub import hf_hub_url

        if self.stopped.is_set():
            raise _Stopped

        local_dir = self.request.local_dir
        final, part = file.final(local_dir), file.part(local_dir)
        part.parent.mkdir(parents=True, exist_ok=True)
        _remove_other_versions(part, file)
        url = hf_hub_url(
            self.request.repo,
            file.path,
            revision=self.request.revision,
            endpoint=self.request.endpoint,
        )
        with open(part, "ab", buffering=0) as out:
            have = os.fstat(out.fileno()).st_size
            if have > file.size:
                out.truncate(0)
                have = 0
            start = have
            failures = 0
            while have < file.size:
                before = have
                try:
                    have = self._attempt(url, file, out, have, start)
                except Exception as error:
                    if self.stopped.is_set() or not _retryable(error):
                        raise
                    have = os.fstat(out.fileno()).st_size
                    failures = 0 if have > before else failures  # it moved: a fresh count
                    if failures >= len(RETRY_DELAYS_S):
                        raise
                    time.sleep(RETRY_DELAYS_S[failures])
                    failures += 1
        if have != file.size:
            raise HubError(
                ErrorCode.DOWNLOAD_FAILED,
                f"'{file.path}' of '{self.request.repo}' came to {have} bytes, not the "
                f"{file.size} the hub listed; retry the install",
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)

    def _attempt(self, url: str, file: _File, out: Any, have: int, start: int) -> int:
        """One request for the rest of ``file`` from byte ``have``; where the part file ends.

        ``start`` is where it ended when this run began: bytes below it are not counted again."""
        import urllib.request

        from huggingface_hub import get_hf_file_metadata

        if self.stopped.is_set():
            raise _Stopped
        # Asked again on each attempt: the hub's errors surface here, and a signed CDN
        # location that expired since the last attempt is renewed.
        metadata = get_hf_file_metadata(
            url, token=self.request.token or False, endpoint=self.request.endpoint
        )
        if metadata.size is not None and metadata.size != file.size:
            raise HubError(
                ErrorCode.DOWNLOAD_FAILED,
                f"'{file.path}' of '{self.request.repo}' is {metadata.size} bytes on the hub, not "
                f"the {file.size} it listed; retry the install",
            )
        request = urllib.request.Request(
            metadata.location, headers={"User-Agent": "modelbus", "Accept-Encoding": "identity"}
        )
        if have:
            request.add_header("Range", f"bytes={have}-")
        # A CDN (another origin) gets no token, as huggingface_hub does it.
        if self.request.token and _origin(metadata.location) == _origin(url):
            request.add_unredirected_header("Authorization", f"Bearer {self.request.token}")
        buffer = bytearray(self.chunk_bytes)
        view = memoryview(buffer)
        counted = max(0, have - start)
        with self.opener.open(request, timeout=self.timeout_s) as response:
            if have and response.status != 206:
                out.truncate(0)  # the range was ignored: the body is the whole file
                have = 0
            elif have and not str(response.headers.get("Content-Range", "")).startswith(
                f"bytes {have}-"
            ):
                raise HubError(
                    ErrorCode.DOWNLOAD_FAILED,
                    f"the hub answered a resume of '{file.path}' from byte {have} with "
                    f"{response.headers.get('Content-Range')!r}; retry the install",
                )
            while n := response.readinto(buffer):
                written = 0
                while written < n:
                    written += out.write(view[written:n])
                have += n
                if (new := max(0, have - start) - counted) > 0:
                    self.progress.add(new)
                    counted += new
                if self.stopped.is_set():
                    raise _Stopped
        return have


class _Stopped(Exception):
    """Another file failed: this one stops where it is (its part file kept)."""


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def _remove_other_versions(part: Path, file: _File) -> None:
    """Part files of other versions of ``file``: never resumed, so only taking disk."""
    import re

    pattern = re.compile(re.escape(Path(file.path).name) + rf"\.[0-9a-f]{{{_ETAG_CHARS}}}\.part")
    with contextlib.suppress(OSError):
        for entry in os.scandir(part.parent):
            if entry.name != part.name and pattern.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _retryable(error: BaseException) -> bool:
    from huggingface_hub import errors

    if isinstance(error, (HubError, _Stopped)):
        return False
    if isinstance(error, errors.HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        return status is not None and (status >= 500 or status in (408, 429))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return False
    # Network errors: urllib's (OSError, HTTPError included: a 403 of an expired CDN link is
    # renewed by the next attempt's HEAD), http.client's and the library's transport.
    return isinstance(error, OSError) or _from_library(error)


def _child_download(
    request: _Request,
    chunk_bytes: int,
    max_workers: int,
    files: list[_File],
    emit: Callable[[dict[str, Any]], None],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # A present file costs a stat: no request, not even the library's import.
    wanted = [f for f in files if not _is_complete(f.final(request.local_dir), f.size)]
    with _Progress(emit) as progress:
        if wanted:
            from huggingface_hub import constants

            transfer = _Transfer(request, chunk_bytes, progress, constants.HF_HUB_DOWNLOAD_TIMEOUT)
            workers = max(1, min(max_workers, len(wanted)))
            with ThreadPoolExecutor(workers, thread_name_prefix="fetch") as pool:
                futures = [pool.submit(transfer.fetch_or_stop, f) for f in wanted]
                failure: BaseException | None = None
                for future in futures:
                    error = future.exception()
                    if error is not None and not isinstance(error, _Stopped) and failure is None:
                        failure = error
            if failure is not None:
                raise failure
    missing = [f.path for f in files if not _is_complete(f.final(request.local_dir), f.size)]
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
    if any(isinstance(item, OSError) or _from_library(item) for item in chain):
        return ErrorCode.DOWNLOAD_FAILED, (
            f"fetching '{request.repo}' from {where} failed "
            f"({type(error).__name__}: {_short(error)}); check the network and retry, files "
            "already complete are kept"
        )
    return ErrorCode.INTERNAL, (
        f"the hub adapter failed unexpectedly ({type(error).__name__}: {_short(error)}); "
        "report this with the agent log"
    )


def _from_library(error: BaseException) -> bool:
    """Raised by the network stack: huggingface_hub, its HTTP client, urllib, http.client."""
    library = ("huggingface_hub", "httpx", "httpx2", "httpcore", "hf_xet", "h11", "ssl", "socket")
    return type(error).__module__.split(".")[0] in (*library, "http", "urllib")


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
            files = [
                _File(str(path), int(size), None if etag is None else str(etag))
                for path, size, etag in args["files"]
            ]
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
