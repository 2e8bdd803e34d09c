"""The model registry: versions, the current one and the history, read (`Registry`) and written
(`store_version`, `promote`, `reject`, `rollback`).

Layout under MODEL_DIR, one tree per Label Studio project id:

    projects/<project>/versions/<version>/weights.pt   ultralytics checkpoint
                                          meta.json    version, parent, created, metrics,
                                                       normalisation, hyperparameters, manifest hash
                                          manifest.json
    projects/<project>/CURRENT                         the current version's name (one line)
    projects/<project>/history.jsonl                   promotions, rejections, rollbacks

A version folder is complete before it gets its name (written under a temporary name, then
renamed), and CURRENT is replaced atomically, so a reader never sees half a model. Reading
CURRENT is one small file read: `/setup` and `/predict` do it on every call to notice a new model
(the history is read only when the current version cannot be loaded: `fallback_chain`).

Writes are crash-safe: a version is assembled in a temporary folder next to its final place and
renamed into `versions/` only when complete (weights, meta, manifest, all fsynced); CURRENT is
written to a temporary file and swapped in with os.replace. A worker killed at any point leaves
either the old state or the new one, never a half-written current model. A failed write (disk
full) removes its temporary folder and leaves CURRENT untouched. Promotion compares and swaps
CURRENT under the project's lock: a candidate trained while someone rolled back does not
silently undo the rollback.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

WEIGHTS = "weights.pt"
META = "meta.json"
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
HISTORY = "history.jsonl"

_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


_PROJECT = re.compile(r"^([0-9]{1,18})(?:\.[0-9]{1,18})?$")


def project_key(project: Any) -> str:
    """Label Studio's project reference -> registry key: 12, "12" and "12.1700000000" (id and
    creation timestamp, as label-studio-ml sends it) -> "12"; a dict's "id" likewise. Anything
    else (signs, spaces, paths, other separators) is a ValueError."""
    if isinstance(project, dict):
        project = project.get("id")
    if isinstance(project, bool):
        raise ValueError(f"not a Label Studio project id: {project!r}")
    match = _PROJECT.match(str(project)) if isinstance(project, (int, str)) else None
    if match is None:
        raise ValueError(f"not a Label Studio project id: {project!r} (digits, optionally .<timestamp>)")
    return match.group(1)


@dataclass(frozen=True)
class ModelVersion:
    """One stored model version."""

    project: str
    version: str
    path: Path
    meta: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS


class Registry:
    """Read access to MODEL_DIR."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def project_dir(self, project: Any) -> Path:
        return self.root / "projects" / project_key(project)

    def current_version(self, project: Any) -> str | None:
        """The current version's name, or None before the first promotion (one small read)."""
        try:
            name = (self.project_dir(project) / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return name if _VERSION_NAME.match(name) else None

    def get(self, project: Any, version: str) -> ModelVersion:
        """A stored version; FileNotFoundError if it does not exist or is incomplete."""
        if not _VERSION_NAME.match(version):
            raise FileNotFoundError(f"no such model version: {version!r}")
        path = self.project_dir(project) / "versions" / version
        try:
            meta = json.loads((path / META).read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise FileNotFoundError(f"model version {version} of project {project_key(project)} is missing "
                                    f"or incomplete ({exc.__class__.__name__})") from None
        return ModelVersion(project_key(project), version, path, meta)

    def current(self, project: Any) -> ModelVersion | None:
        version = self.current_version(project)
        return self.get(project, version) if version else None

    def versions(self, project: Any) -> list[ModelVersion]:
        """All complete versions of a project, oldest first."""
        base = self.project_dir(project) / "versions"
        if not base.is_dir():
            return []
        out = []
        for path in base.iterdir():
            if path.is_dir() and _VERSION_NAME.match(path.name):
                try:
                    out.append(self.get(project, path.name))
                except FileNotFoundError:
                    continue
        return sorted(out, key=lambda v: (v.meta.get("created_at", ""), v.version))

    def history(self, project: Any) -> list[dict[str, Any]]:
        """Registry events (promoted, rejected, rolled back), oldest first."""
        path = self.project_dir(project) / HISTORY
        if not path.exists():
            return []
        events = []
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping an unreadable line in %s", path)
        return events

    def fallback_chain(self, project: Any) -> Iterator[str]:
        """Versions to try when loading: the current one, then earlier current ones, newest first.
        Lazy: a caller that takes the current version reads CURRENT only, not the history."""
        current = self.current_version(project)
        if current:
            yield current
        seen = {current}
        for event in reversed(self.history(project)):
            version = event.get("version")
            if event.get("event") in ("promoted", "rolled_back") and version and version not in seen:
                seen.add(version)
                yield version

    def projects(self) -> list[str]:
        base = self.root / "projects"
        return sorted(p.name for p in base.iterdir() if p.is_dir() and p.name.isdigit()) if base.is_dir() else []


# --- writing (the worker, `toothseg models`) ------------------------------------------------

def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def next_version_name(registry: Registry, project: Any) -> str:
    """v<n>-<UTC timestamp>: n counts the project's stored versions, the timestamp keeps names unique."""
    n = len(registry.versions(project)) + 1
    return f"v{n}-{datetime.now(timezone.utc).strftime('%Y%m%d%H%M%S')}"


def store_version(registry: Registry, project: Any, weights: Path, meta: dict[str, Any],
                  manifest: dict[str, Any]) -> ModelVersion:
    """Copy `weights` and write meta/manifest as a new complete version folder (not yet current)."""
    key = project_key(project)
    base = registry.project_dir(key) / "versions"
    base.mkdir(parents=True, exist_ok=True)
    version = meta.get("version") or next_version_name(registry, key)
    while (base / version).exists():
        version = f"{version}-{os.urandom(2).hex()}"
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=base))
    try:
        shutil.copyfile(weights, staging / WEIGHTS)
        with open(staging / WEIGHTS, "rb+") as f:
            os.fsync(f.fileno())
        meta = {**meta, "version": version, "project": key, "created_at": meta.get("created_at") or utc_now()}
        _fsync_write(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_write(staging / META, json.dumps(meta, indent=1).encode())
        os.rename(staging, base / version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return registry.get(key, version)


def _append_history(registry: Registry, project: str, event: dict[str, Any]) -> None:
    path = registry.project_dir(project) / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"at": utc_now(), **event}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def set_current(registry: Registry, project: Any, version: str) -> None:
    """Atomically point CURRENT at `version` (which must be a complete stored version)."""
    key = project_key(project)
    registry.get(key, version)  # raises if missing or incomplete
    directory = registry.project_dir(key)
    fd, tmp = tempfile.mkstemp(prefix=".CURRENT.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(f"{version}\n".encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / CURRENT)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _project_lock(registry: Registry, project: str):
    """An exclusive lock on the project's registry folder (fcntl lock on its `.lock` file), held
    while CURRENT is compared and swapped."""
    directory = registry.project_dir(project)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


_ANY = object()


def promote(registry: Registry, project: Any, version: str, reason: str, expected: Any = _ANY) -> bool:
    """Make `version` current. With `expected` (the version current when the candidate's training
    started, None for none): only if CURRENT still names it, compared and swapped under the project's
    lock; otherwise CURRENT stays (a rollback or another promotion happened meanwhile), the lost race
    is recorded in the history, and False is returned."""
    key = project_key(project)
    with _project_lock(registry, key):
        previous = registry.current_version(key)
        if expected is not _ANY and previous != expected:
            _append_history(registry, key, {"event": "not promoted", "version": version, "current": previous,
                                            "reason": f"CURRENT changed from {expected} to {previous} while "
                                                      f"{version} was trained (a rollback or another "
                                                      f"promotion); it stays current"})
            return False
        set_current(registry, key, version)
        _append_history(registry, key, {"event": "promoted", "version": version, "previous": previous,
                                        "reason": reason})
    return True


def reject(registry: Registry, project: Any, version: str, reason: str) -> None:
    """Record that a candidate was not promoted, and why (the current model stays)."""
    key = project_key(project)
    _append_history(registry, key, {"event": "rejected", "version": version,
                                    "current": registry.current_version(key), "reason": reason})


def rollback(registry: Registry, project: Any, version: str) -> None:
    """Make an older stored version current again (recorded in the history)."""
    key = project_key(project)
    with _project_lock(registry, key):
        previous = registry.current_version(key)
        set_current(registry, key, version)
        _append_history(registry, key, {"event": "rolled_back", "version": version, "previous": previous,
                                        "reason": "manual rollback"})
