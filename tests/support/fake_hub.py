"""A local stand-in for the Hugging Face Hub, so tests run the real huggingface_hub code.

``FakeHub`` is a threaded HTTP server on a free loopback port that speaks the endpoints
huggingface_hub 2.4.0 calls for ``snapshot_download``, ``hf_hub_download``, ``repo_info``,
``list_repo_tree``, ``file_exists`` and ``get_safetensors_metadata``:

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: model info with
  ``sha`` and ``siblings`` (sizes, ``blobId`` and ``lfs`` with ``?blobs=true``).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=``: the tree listing, paginated
  with a GitHub-style ``Link: <...>; rel="next"`` header (``page_size`` entries a page).
- ``HEAD`` and ``GET /{repo}/resolve/{rev}/{path}``: file content with ``X-Repo-Commit``,
  ``ETag`` (git blob sha1 for small files, sha256 for LFS files), ``X-Linked-Etag`` and
  ``X-Linked-Size`` for LFS files, and ``Range`` support (206 + ``Content-Range``, 416).
  With ``lfs_cdn=True`` LFS files answer 302 to ``http://localhost:PORT/__cdn/{sha256}``, a
  different origin, as the real Hub redirects to its CDN: the client then reads the metadata
  from the 302 itself and downloads from the CDN without the Authorization header.

Errors carry the ``X-Error-Code`` huggingface_hub maps to exceptions: ``RepoNotFound`` (404, or
401 for a private repo without a valid token), ``RevisionNotFound`` (404), ``EntryNotFound``
(404, with ``X-Repo-Commit``), ``GatedRepo`` (401 without a token; every token the hub knows has
access). An unknown ``Bearer`` token gets 401 "Invalid credentials in Authorization header" on
any request, as on the real Hub. The model info and tree of a gated repo are public; only its
files are not.

The hub never sends an ``X-Xet-Hash`` header nor a ``xetHash`` in listings, so huggingface_hub
downloads over plain HTTP even with hf_xet installed; ``HF_HUB_DISABLE_XET`` is not needed.

Faults are queued per file path and consumed by content GETs (never by HEADs), in order:
``drop_after`` closes the connection after some bytes of the body, ``fail`` answers an HTTP
error, ``hold_after`` stops after some bytes until the test releases it (to cancel or kill a
client at a known point without sleeping). ``throttle`` slows every body. ``requests`` logs
each request with its ``Range`` header.

Pointing huggingface_hub at the hub: it reads ``HF_ENDPOINT`` once, at import, into
``constants.ENDPOINT`` and ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, so setting the variable
later in the same process has no effect. In-process, pass ``endpoint=hub.endpoint`` to each call
(``snapshot_download``, ``hf_hub_download``, ``HfApi``); for a child process use ``hub.env()``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

# Files the real Hub stores in LFS whatever their size (its default .gitattributes), and the
# size from which it refuses a plain git file.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack")
LFS_THRESHOLD = 10 * 1024 * 1024
# How many bytes the server writes at a time; also the throttle's granularity.
SEND_CHUNK = 64 * 1024
# The period after which a FakeFile's pattern would repeat, if each block did not carry its index.
_BLOCK = 64 * 1024

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class Blob(Protocol):
    """File content the hub can serve a range of without holding it all."""

    @property
    def size(self) -> int: ...

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``."""
        ...


def iter_blob(blob: Blob, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The bytes of ``blob`` from ``start`` to ``end``, ``SEND_CHUNK`` at a time."""
    stop = blob.size if end is None else end
    for offset in range(start, stop, SEND_CHUNK):
        yield blob.read(offset, min(offset + SEND_CHUNK, stop))


def blob_bytes(blob: Blob) -> bytes:
    """The whole content, for assertions on small files."""
    return b"".join(iter_blob(blob))


@functools.cache
def _pattern(seed: int) -> bytes:
    return random.Random(seed).randbytes(2 * _BLOCK)


@dataclass(frozen=True)
class FakeFile:
    """``size`` deterministic pseudo-random bytes, generated per range: a 1 GB file costs no
    memory. Each 64 KiB block starts with its own index, so content read at the wrong offset
    (a bad resume) never matches."""

    size: int
    seed: int = 0

    def _block(self, index: int) -> bytes:
        offset = (index * 7919) % _BLOCK
        block = bytearray(_pattern(self.seed)[offset : offset + _BLOCK])
        block[:8] = struct.pack(">Q", index)
        return bytes(block[: min(_BLOCK, self.size - index * _BLOCK)])

    def read(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        if start >= end:
            return b""
        first, last = start // _BLOCK, (end - 1) // _BLOCK
        data = b"".join(self._block(index) for index in range(first, last + 1))
        base = first * _BLOCK
        return data[start - base : end - base]


@dataclass(frozen=True)
class BytesFile:
    """Content held in memory."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, start: int, end: int) -> bytes:
        return self.data[start:end]


@dataclass(frozen=True)
class _Concat:
    head: bytes
    tail: Blob

    @property
    def size(self) -> int:
        return len(self.head) + self.tail.size

    def read(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        cut = len(self.head)
        out = self.head[start:end] if start < cut else b""
        if end > cut:
            out += self.tail.read(max(start, cut) - cut, end - cut)
        return out


TensorSpec = tuple[str, Sequence[int]]


def _safetensors_header(
    tensors: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None
) -> tuple[bytes, int]:
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        if dtype not in DTYPE_SIZES:
            raise ValueError(
                f"unknown safetensors dtype {dtype!r}; use one of {sorted(DTYPE_SIZES)}"
            )
        count = 1
        for dim in shape:
            count *= dim
        nbytes = count * DTYPE_SIZES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # The format allows trailing spaces; padding to 8 keeps the data aligned, as safetensors does.
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, offset


def safetensors_bytes(
    tensors: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None, seed: int = 0
) -> bytes:
    """A real safetensors file: ``{"w": ("F16", (4, 8))}`` gives an 8-byte little-endian header
    length, the JSON header (with ``__metadata__``) and the tensor data."""
    return blob_bytes(fake_safetensors(tensors, metadata, seed))


def fake_safetensors(
    tensors: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None, seed: int = 0
) -> Blob:
    """The same file with lazily generated tensor data, so a multi-GB checkpoint can exist."""
    header, data_size = _safetensors_header(tensors, metadata)
    return _Concat(header, FakeFile(data_size, seed))


def _sha256(blob: Blob) -> str:
    digest = hashlib.sha256()
    for chunk in iter_blob(blob):
        digest.update(chunk)
    return digest.hexdigest()


def _git_sha1(blob: Blob) -> str:
    digest = hashlib.sha1(f"blob {blob.size}\0".encode())
    for chunk in iter_blob(blob):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Entry:
    path: str
    blob: Blob
    lfs: bool
    _digests: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.blob.size

    @property
    def sha256(self) -> str:
        # Computed on first use and kept: a 1 GB file is hashed once, by streaming.
        if "sha256" not in self._digests:
            self._digests["sha256"] = _sha256(self.blob)
        return self._digests["sha256"]

    @property
    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {self.size}\n"
        ).encode()

    @property
    def blob_id(self) -> str:
        """The git object id: of the LFS pointer for LFS files, as in git."""
        if "git" not in self._digests:
            source = BytesFile(self.pointer) if self.lfs else self.blob
            self._digests["git"] = _git_sha1(source)
        return self._digests["git"]

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def listing(self) -> dict[str, object]:
        info: dict[str, object] = {
            "type": "file",
            "oid": self.blob_id,
            "size": self.size,
            "path": self.path,
        }
        if self.lfs:
            info["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return info


@dataclass
class _Repo:
    repo_id: str
    private: bool
    gated: bool
    commits: dict[str, dict[str, _Entry]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: str
    range: str | None
    authorization: str | None
    host: str | None


@dataclass
class Hold:
    """A body stopped after ``nbytes`` until ``release()``: ``reached`` is set when it stops."""

    nbytes: int
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass(frozen=True)
class _Drop:
    nbytes: int


@dataclass(frozen=True)
class _Fail:
    status: int


_Fault = _Drop | _Fail | Hold


class _Dropped(Exception):
    """The handler closes the connection without finishing the response."""


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``[start, end)`` for a single ``bytes=`` range, None when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or (not match[1] and not match[2]):
        return None
    if not match[1]:
        start, end = max(size - int(match[2]), 0), size
    else:
        start = int(match[1])
        end = min(int(match[2]) + 1, size) if match[2] else size
    return (start, end) if start < end else None


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that was cancelled or killed resets its connection: not worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class FakeHub:
    """A fake Hugging Face Hub on ``127.0.0.1``; use it as a context manager."""

    def __init__(
        self,
        *,
        tokens: Sequence[str] = ("hf_fake_token",),
        page_size: int = 1000,
        lfs_cdn: bool = False,
    ) -> None:
        self.tokens = set(tokens)
        self.page_size = page_size
        self.lfs_cdn = lfs_cdn
        self.requests: list[RequestRecord] = []
        self._repos: dict[str, _Repo] = {}
        self._faults: dict[str, deque[_Fault]] = {}
        self._holds: list[Hold] = []
        self._bytes_per_s: float | None = None
        self._lock = threading.Lock()
        self._commit_counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        for hold in self._holds:
            hold.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        assert self._server is not None, "the hub is not started"
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_endpoint(self) -> str:
        """The same server under another origin, so huggingface_hub treats it as a CDN."""
        return f"http://localhost:{self.port}"

    def env(self) -> dict[str, str]:
        """Variables a child process needs to use this hub (merge into a copy of os.environ,
        and drop HF_HUB_OFFLINE / HF_TOKEN from it)."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        }

    # --- content

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | int | Blob],
        *,
        revision: str = "main",
        gated: bool = False,
        private: bool = False,
    ) -> str:
        """Commit ``files`` to branch ``revision`` of ``repo_id`` (created if new) and return the
        commit sha. A file is bytes, str (UTF-8), an int (a ``FakeFile`` of that size) or any
        ``Blob``. The branch name and the sha both resolve afterwards, as do older shas."""
        entries: dict[str, _Entry] = {}
        for index, (path, content) in enumerate(files.items()):
            blob: Blob
            if isinstance(content, bytes):
                blob = BytesFile(content)
            elif isinstance(content, str):
                blob = BytesFile(content.encode())
            elif isinstance(content, int):
                blob = FakeFile(content, seed=index + 1)
            else:
                blob = content
            lfs = path.endswith(LFS_SUFFIXES) or blob.size >= LFS_THRESHOLD
            entries[path] = _Entry(path=path, blob=blob, lfs=lfs)
        with self._lock:
            self._commit_counter += 1
            sha = hashlib.sha1(
                f"{repo_id}\0{revision}\0{self._commit_counter}\0{sorted(entries)}".encode()
            ).hexdigest()
            repo = self._repos.setdefault(repo_id, _Repo(repo_id, private=private, gated=gated))
            repo.private, repo.gated = private, gated
            repo.commits[sha] = entries
            repo.refs[revision] = sha
        return sha

    def file_content(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """What the hub serves for a file, for byte-for-byte assertions."""
        repo = self._repos[repo_id]
        sha = repo.resolve(revision)
        assert sha is not None
        return blob_bytes(repo.commits[sha][path].blob)

    def file_sha256(self, repo_id: str, path: str, revision: str = "main") -> str:
        repo = self._repos[repo_id]
        sha = repo.resolve(revision)
        assert sha is not None
        return repo.commits[sha][path].sha256

    # --- faults

    def _queue(self, path: str, fault: _Fault, times: int) -> None:
        with self._lock:
            queue = self._faults.setdefault(path, deque())
            queue.extend([fault] * times)

    def drop_after(self, path: str, nbytes: int, *, times: int = 1) -> None:
        """The next ``times`` content GETs of ``path`` (in any repo) close the connection after
        ``nbytes`` bytes of body, having promised the full Content-Length."""
        self._queue(path, _Drop(nbytes), times)

    def fail(self, path: str, status: int = 500, *, times: int = 1) -> None:
        """The next ``times`` content GETs of ``path`` answer ``status``."""
        self._queue(path, _Fail(status), times)

    def hold_after(self, path: str, nbytes: int) -> Hold:
        """The next content GET of ``path`` stops after ``nbytes`` until ``release()``."""
        hold = Hold(nbytes)
        self._holds.append(hold)
        self._queue(path, hold, 1)
        return hold

    def throttle(self, bytes_per_s: float | None) -> None:
        """Slow every response body to about ``bytes_per_s`` (None: full speed)."""
        self._bytes_per_s = bytes_per_s

    def _next_fault(self, path: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.popleft() if queue else None

    # --- request log helpers

    def gets(self, path_suffix: str) -> list[RequestRecord]:
        """Content GETs whose path ends with ``path_suffix`` (resolve and CDN alike)."""
        return [
            r
            for r in list(self.requests)
            if r.method == "GET"
            and (r.path.endswith(path_suffix) or f"path={quote(path_suffix)}" in r.query)
        ]


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: object) -> None:
        pass  # the request log replaces stderr noise

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    # --- plumbing

    def _dispatch(self, *, head: bool) -> None:
        hub = self.fake_hub
        split = urlsplit(self.path)
        path = unquote(split.path)
        hub.requests.append(
            RequestRecord(
                method=self.command,
                path=path,
                query=split.query,
                range=self.headers.get("Range"),
                authorization=self.headers.get("Authorization"),
                host=self.headers.get("Host"),
            )
        )
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        try:
            if self._bad_token():
                self._error(401, None, "Invalid credentials in Authorization header", head=head)
            elif path.startswith("/__cdn/"):
                self._cdn(path.removeprefix("/__cdn/"), query, head=head)
            elif path.startswith("/api/models/"):
                self._api(split.path, query, head=head)
            elif "/resolve/" in path:
                self._resolve(split.path, head=head)
            else:
                self._error(404, None, "Not found", head=head)
        except _Dropped:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (cancelled or killed)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _bad_token(self) -> bool:
        token = self._token()
        return token is not None and token not in self.fake_hub.tokens

    def _send(
        self, status: int, headers: Mapping[str, str], body: bytes = b"", *, head: bool
    ) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(
        self, payload: object, *, head: bool, headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(payload).encode()
        self._send(200, {"Content-Type": "application/json", **(headers or {})}, body, head=head)

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        head: bool,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code is not None:
            headers["X-Error-Code"] = code
        self._send(status, headers, json.dumps({"error": message}).encode(), head=head)

    # --- repo lookup

    def _split_repo(self, parts: list[str]) -> tuple[_Repo | None, str, list[str]]:
        """The repo named by the first one or two segments, its id, and the remaining segments."""
        repos = self.fake_hub._repos
        if len(parts) >= 2 and f"{parts[0]}/{parts[1]}" in repos:
            return repos[f"{parts[0]}/{parts[1]}"], f"{parts[0]}/{parts[1]}", parts[2:]
        if parts and parts[0] in repos:
            return repos[parts[0]], parts[0], parts[1:]
        return None, "/".join(parts[:2]), parts[2:]

    def _can_see(self, repo: _Repo) -> bool:
        return not repo.private or self._token() in self.fake_hub.tokens

    def _repo_or_error(self, repo: _Repo | None, repo_id: str, *, head: bool) -> _Repo | None:
        if repo is None or not self._can_see(repo):
            status = 401 if self._token() is None else 404
            self._error(status, "RepoNotFound", "Repository not found", head=head)
            return None
        return repo

    def _commit_or_error(self, repo: _Repo, revision: str, *, head: bool) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        return sha

    # --- /api/models/...

    def _api(self, raw_path: str, query: Mapping[str, str], *, head: bool) -> None:
        # Split the raw (still quoted) path so a revision or folder quoted with %2F stays whole.
        raw_parts = raw_path.removeprefix("/api/models/").split("/")
        parts = [unquote(p) for p in raw_parts]
        repo, repo_id, tail = self._split_repo(parts)
        if not tail or tail[0] == "revision":
            repo = self._repo_or_error(repo, repo_id, head=head)
            if repo is None:
                return
            revision = tail[1] if len(tail) > 1 else "main"
            sha = self._commit_or_error(repo, revision, head=head)
            if sha is not None:
                blobs = query.get("blobs", "").lower() == "true"
                self._model_info(repo, sha, blobs=blobs, head=head)
        elif tail[0] == "tree" and len(tail) >= 2:
            repo = self._repo_or_error(repo, repo_id, head=head)
            if repo is None:
                return
            sha = self._commit_or_error(repo, tail[1], head=head)
            if sha is not None:
                self._tree(repo, sha, "/".join(tail[2:]), query, head=head)
        else:
            self._error(404, None, "Not found", head=head)

    def _model_info(self, repo: _Repo, sha: str, *, blobs: bool, head: bool) -> None:
        entries = repo.commits[sha]
        siblings: list[dict[str, object]] = []
        for entry in entries.values():
            sibling: dict[str, object] = {"rfilename": entry.path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": len(entry.pointer),
                    }
            siblings.append(sibling)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        self._json(
            {
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": author,
                "sha": sha,
                "lastModified": "2024-01-01T00:00:00.000Z",
                "createdAt": "2024-01-01T00:00:00.000Z",
                "private": repo.private,
                "gated": "auto" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "library_name": "transformers",
                "siblings": siblings,
                "usedStorage": sum(e.size for e in entries.values()),
            },
            head=head,
        )

    def _tree(
        self, repo: _Repo, sha: str, folder: str, query: Mapping[str, str], *, head: bool
    ) -> None:
        entries = repo.commits[sha]
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        recursive = query.get("recursive", "false").lower() == "true"
        if prefix and not any(p.startswith(prefix) for p in entries):
            self._error(404, "EntryNotFound", f"{folder} does not exist on {sha}", head=head)
            return
        listing: dict[str, dict[str, object]] = {}
        for path, entry in sorted(entries.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            # Folders are listed as entries of their own, as the Hub does, recursive or not.
            segments = rest.split("/")
            for depth in range(1, len(segments)):
                if depth > 1 and not recursive:
                    break
                folder_path = prefix + "/".join(segments[:depth])
                oid = hashlib.sha1(folder_path.encode()).hexdigest()
                listing.setdefault(
                    folder_path, {"type": "directory", "oid": oid, "size": 0, "path": folder_path}
                )
            if recursive or len(segments) == 1:
                listing[path] = entry.listing()
        items = list(listing.values())
        start = int(query.get("cursor", "0") or 0)
        page = items[start : start + self.fake_hub.page_size]
        headers: dict[str, str] = {}
        if start + self.fake_hub.page_size < len(items):
            next_query = f"recursive={str(recursive).lower()}&expand={query.get('expand', 'false')}"
            next_query += f"&cursor={start + self.fake_hub.page_size}"
            next_url = f"{self.fake_hub.endpoint}{urlsplit(self.path).path}?{next_query}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(page, head=head, headers=headers)

    # --- /{repo}/resolve/{rev}/{path}

    def _resolve(self, raw_path: str, *, head: bool) -> None:
        before, _, after = raw_path.lstrip("/").partition("/resolve/")
        repo_parts = [unquote(p) for p in before.split("/")]
        for prefix in ("models",):  # model repos have no URL prefix; tolerate an explicit one
            if repo_parts and repo_parts[0] == prefix and len(repo_parts) > 2:
                repo_parts = repo_parts[1:]
        revision_raw, _, file_raw = after.partition("/")
        revision, filename = unquote(revision_raw), unquote(file_raw)
        repo, repo_id, _ = self._split_repo(repo_parts)
        repo = self._repo_or_error(repo, repo_id, head=head)
        if repo is None:
            return
        sha = self._commit_or_error(repo, revision, head=head)
        if sha is None:
            return
        entry = repo.commits[sha].get(filename)
        if entry is None:
            self._error(
                404, "EntryNotFound", "Entry not found", head=head, extra={"X-Repo-Commit": sha}
            )
            return
        if repo.gated and self._token() is None:
            message = (
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in."
            )
            self._error(401, "GatedRepo", message, head=head, extra={"X-Repo-Commit": sha})
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.etag}"'}
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
            if self.fake_hub.lfs_cdn:
                location = (
                    f"{self.fake_hub.cdn_endpoint}/__cdn/{entry.sha256}"
                    f"?repo={quote(repo.repo_id)}&path={quote(entry.path)}"
                )
                self._send(302, {**headers, "Location": location}, head=head)
                return
        self._content(entry, headers, head=head)

    def _cdn(self, sha256: str, query: Mapping[str, str], *, head: bool) -> None:
        repo = self.fake_hub._repos.get(query.get("repo", ""))
        entry = None
        if repo is not None:
            entry = next(
                (
                    e
                    for c in repo.commits.values()
                    for e in c.values()
                    if e.lfs and e.sha256 == sha256
                ),
                None,
            )
        if entry is None:
            self._error(404, None, "NoSuchKey", head=head)
            return
        self._content(entry, {"ETag": f'"{sha256}"'}, head=head)

    def _content(self, entry: _Entry, headers: dict[str, str], *, head: bool) -> None:
        hub = self.fake_hub
        size = entry.size
        fault = None if head else hub._next_fault(entry.path)
        if isinstance(fault, _Fail):
            self._error(fault.status, None, f"injected HTTP {fault.status}", head=head)
            return
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        status, start, end = 200, 0, size
        range_header = self.headers.get("Range")
        if range_header:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                self._send(416, {**headers, "Content-Range": f"bytes */{size}"}, head=head)
                return
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        self._send(status, headers, head=True)
        if head:
            return
        self._body(entry.blob, start, end, fault)

    def _body(self, blob: Blob, start: int, end: int, fault: _Fault | None) -> None:
        sent = 0
        for chunk in iter_blob(blob, start, end):
            if isinstance(fault, (_Drop, Hold)) and sent + len(chunk) >= fault.nbytes:
                cut = fault.nbytes - sent
                self.wfile.write(chunk[:cut])
                self.wfile.flush()
                if isinstance(fault, _Drop):
                    raise _Dropped
                fault.reached.set()
                fault.released.wait()
                chunk, sent, fault = chunk[cut:], sent + cut, None
            self.wfile.write(chunk)
            sent += len(chunk)
            rate = self.fake_hub._bytes_per_s
            if rate:
                time.sleep(len(chunk) / rate)
        # A drop or hold past the end of the body applies once the body is sent.
        if isinstance(fault, _Drop):
            raise _Dropped
        if isinstance(fault, Hold):
            fault.reached.set()
            fault.released.wait()
