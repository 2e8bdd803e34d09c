"""The model registry, write side: store versions, promote, reject, roll back.

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
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from backend.registry import CURRENT, HISTORY, MANIFEST, META, WEIGHTS, ModelVersion, Registry, project_key


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
