"""The Hugging Face Hub adapter's child process: ``python -m agent.hub_child resolve|download``,
started by ``agent.hub`` (whose docstring describes the protocol and the files). The only
module of modelbus that imports ``huggingface_hub``, so that the library, its threads and its
memory live and die with one download."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.hub import (
    _ETAG_CHARS,
    _TOKEN_VAR,
    PROGRESS_INTERVAL_S,
    RETRY_DELAYS_S,
    HubError,
    part_path,
)
from shared.messages import ErrorCode


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


def filter_paths(
    paths: Iterable[str], include: list[str] | None, exclude: list[str] | None
) -> list[str]:
    """The paths that match an ``include`` pattern (all, when there is none) and no
    ``exclude`` pattern, as the hub's own ``allow_patterns``/``ignore_patterns`` read them:
    shell patterns over the whole path, a pattern ending in ``/`` meaning everything under
    that folder."""

    def expand(patterns: list[str]) -> list[str]:
        return [p + "*" if p.endswith("/") else p for p in patterns]

    wanted, unwanted = expand(include or []), expand(exclude or [])
    return [
        path
        for path in paths
        if (not wanted or any(fnmatch.fnmatch(path, p) for p in wanted))
        and not any(fnmatch.fnmatch(path, p) for p in unwanted)
    ]


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

    sha = _check_repo(request)
    api = HfApi(endpoint=request.endpoint, token=request.token or False)
    listed = {
        entry.path: _File(entry.path, entry.size, entry.lfs.sha256 if entry.lfs else entry.blob_id)
        for entry in api.list_repo_tree(request.repo, revision=sha, recursive=True)
        if isinstance(entry, HubFile)
    }
    paths = sorted(filter_paths(listed, request.include, request.exclude))
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
        print("usage: python -m agent.hub_child resolve|download  (arguments as JSON on stdin)")
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
