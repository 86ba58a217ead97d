"""The weights directory: what is installed, what is half there, and safe paths.

Layout under ``weights.dir``::

    <name>/                     the files of one install (snapshot_download's local_dir)
    .modelbus/<name>.json       its manifest: written last, so only a finished install has one
    .modelbus/<name>.pending    written first: repo of an install that has not finished

A directory without a manifest is *partial*: never reported as installed; installing
the same repo again resumes it (files already complete are kept), ``uninstall`` removes it.
Blocking file I/O: callers run these methods with ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.commands import CommandError
from shared.messages import ErrorCode, InstalledWeights, PartialWeights, WeightsState, utc_now
from shared.topics import MODEL_NAME_PATTERN

MIB = 1024 * 1024
_NAME = re.compile(MODEL_NAME_PATTERN)
_META_DIR = ".modelbus"


class Manifest(BaseModel):
    """What an install wrote when it finished."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    repo: str
    revision: str
    requested_revision: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    size_bytes: int
    files: int
    installed_at: datetime
    vram_estimate_mb: int | None = None


@dataclass(frozen=True, slots=True)
class Partial:
    name: str
    repo: str | None
    size_bytes: int
    path: Path


def default_name(repo: str) -> str:
    """``Qwen/Qwen3-VL-30B`` installs as ``Qwen3-VL-30B`` unless a name is given."""
    return repo.rsplit("/", 1)[-1][:64]


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path``, symlinks not followed."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


class WeightsDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def _meta(self) -> Path:
        return self.root / _META_DIR

    def ensure(self) -> None:
        self._meta.mkdir(parents=True, exist_ok=True)

    # -- names and paths --------------------------------------------------------

    def path_for(self, name: str) -> Path:
        """The directory of ``name``, refusing anything that could reach outside the
        weights directory: bad names, ``.``/``..``, symlinks, paths that resolve elsewhere."""
        if not _NAME.fullmatch(name) or name in (".", "..") or name.startswith("."):
            raise CommandError(
                ErrorCode.INVALID_PAYLOAD,
                f"{name!r} is not a weights name: use 1-64 of [A-Za-z0-9._-], "
                "not starting with '.'",
            )
        path = self.root / name
        if path.is_symlink():
            raise CommandError(
                ErrorCode.FORBIDDEN, f"{path} is a symbolic link; modelbus does not follow them"
            )
        root = self.root.resolve()
        if path.resolve().parent != root:
            raise CommandError(ErrorCode.FORBIDDEN, f"{name!r} resolves outside {root}")
        return path

    def _manifest_path(self, name: str) -> Path:
        return self._meta / f"{name}.json"

    def _pending_path(self, name: str) -> Path:
        return self._meta / f"{name}.pending"

    # -- reading ----------------------------------------------------------------

    def manifest(self, name: str) -> Manifest | None:
        try:
            return Manifest.model_validate_json(self._manifest_path(name).read_bytes())
        except (OSError, ValidationError):
            return None

    def installed(self) -> list[Manifest]:
        manifests = []
        for path in sorted(self._meta.glob("*.json")) if self._meta.is_dir() else []:
            manifest = self.manifest(path.stem)
            if manifest is not None and (self.root / manifest.name).is_dir():
                manifests.append(manifest)
        return manifests

    def partial(self) -> list[Partial]:
        """Directories an install started and did not finish."""
        found: list[Partial] = []
        if not self.root.is_dir():
            return found
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            if name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                continue
            if self._manifest_path(name).exists():
                continue
            try:
                repo: str | None = self._pending_path(name).read_text().strip() or None
            except OSError:
                repo = None
            found.append(Partial(name, repo, tree_size(entry), entry))
        return found

    def pending_repo(self, name: str) -> str | None:
        try:
            return self._pending_path(name).read_text().strip() or None
        except OSError:
            return None

    def state(self, used_by: dict[str, list[str]]) -> WeightsState:
        """``used_by``: weights name -> catalog models that use them."""
        weights = [
            InstalledWeights(
                name=m.name,
                repo=m.repo,
                revision=m.revision,
                size_mb=round(m.size_bytes / MIB),
                path=str(self.root / m.name),
                used_by=sorted(used_by.get(m.name, [])),
                installed_at=m.installed_at,
                vram_estimate_mb=m.vram_estimate_mb,
            )
            for m in self.installed()
        ]
        partial = [
            PartialWeights(
                name=p.name, repo=p.repo, size_mb=round(p.size_bytes / MIB), path=str(p.path)
            )
            for p in self.partial()
        ]
        total = disk_free = None
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(self.root)
            total, disk_free = usage.total // MIB, usage.free // MIB
        used = sum(w.size_mb for w in weights) + sum(p.size_mb for p in partial)
        return WeightsState(
            weights=weights,
            partial=partial,
            weights_dir=str(self.root),
            used_mb=used,
            disk_total_mb=total,
            disk_free_mb=disk_free,
            ts=utc_now(),
        )

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # -- writing ----------------------------------------------------------------

    def begin(self, name: str, repo: str) -> Path:
        """Mark ``name`` as an install in progress (its manifest, if any, goes: until
        this install finishes, the directory is partial)."""
        self.ensure()
        path = self.path_for(name)
        self._pending_path(name).write_text(repo + "\n")
        with contextlib.suppress(FileNotFoundError):
            self._manifest_path(name).unlink()
        path.mkdir(exist_ok=True)
        return path

    def commit(self, manifest: Manifest) -> None:
        """Written last and atomically: from now on the weights count as installed."""
        target = self._manifest_path(manifest.name)
        temporary = target.with_suffix(".json.tmp")
        temporary.write_text(manifest.model_dump_json(indent=2))
        os.replace(temporary, target)
        with contextlib.suppress(FileNotFoundError):
            self._pending_path(manifest.name).unlink()

    def remove(self, name: str) -> int:
        """Delete ``name`` (installed or partial); the bytes freed."""
        path = self.path_for(name)
        size = tree_size(path) if path.is_dir() else 0
        # The manifest goes first: a crash halfway leaves a partial, never a
        # half-deleted install reported as installed.
        for marker in (self._manifest_path(name), self._pending_path(name)):
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
        if path.is_dir():
            shutil.rmtree(path)
        return size


def manifest_for(
    name: str,
    repo: str,
    revision: str,
    *,
    requested_revision: str | None,
    include: list[str] | None,
    exclude: list[str] | None,
    path: Path,
    files: int,
    vram_estimate_mb: int | None,
) -> Manifest:
    return Manifest(
        name=name,
        repo=repo,
        revision=revision,
        requested_revision=requested_revision,
        include=include,
        exclude=exclude,
        size_bytes=tree_size(path),
        files=files,
        installed_at=utc_now(),
        vram_estimate_mb=vram_estimate_mb,
    )
