"""The model registry, read side (the worker writes through `training.promotion`).

Layout under MODEL_DIR, one tree per Label Studio project id:

    projects/<project>/versions/<version>/weights.pt   ultralytics checkpoint
                                          meta.json    version, parent, created, metrics,
                                                       normalisation, hyperparameters, manifest hash
                                          manifest.json
    projects/<project>/CURRENT                         the current version's name (one line)
    projects/<project>/history.jsonl                   promotions, rejections, rollbacks

A version folder is complete before it gets its name (written under a temporary name, then
renamed), and CURRENT is replaced atomically, so a reader never sees half a model. Reading
CURRENT is one small file read: `/setup` does it on every call to notice a new model.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    @property
    def normalisation(self) -> tuple[float, float]:
        """(mean, std) of the training split's pixels scaled to [0, 1]."""
        norm = self.meta.get("normalisation") or {}
        return float(norm.get("mean", 0.0)), float(norm.get("std", 1.0))


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

    def fallback_chain(self, project: Any) -> list[str]:
        """Versions to try when loading: the current one, then earlier current ones, newest first."""
        chain: list[str] = []
        current = self.current_version(project)
        if current:
            chain.append(current)
        for event in reversed(self.history(project)):
            version = event.get("version")
            if event.get("event") in ("promoted", "rolled_back") and version and version not in chain:
                chain.append(version)
        return chain

    def projects(self) -> list[str]:
        base = self.root / "projects"
        return sorted(p.name for p in base.iterdir() if p.is_dir() and p.name.isdigit()) if base.is_dir() else []
