"""The annotators' work per annotation, measured from Label Studio's own records.

An annotation that started from a prediction (its `parent_prediction`) is compared with that
prediction by the simulation's oracle, `training.oracle.oracle_count`: the prediction's regions
against the submitted result as the truth, giving accepted, relabeled, redrawn, added and deleted
teeth. An annotation made without a prediction was drawn from scratch: every tooth is added. Each
record keeps the annotation's `lead_time` (Label Studio's seconds), the prediction's
`model_version` and the task. Cancelled (skipped) annotations are not work on teeth and get none;
nor do annotations with neither a prediction nor a `lead_time` (imported ones: Label Studio's
editor records a `lead_time` for every annotation made in it).

Two paths make the records, both through `measure`:
- the webhook: ANNOTATION_CREATED / _UPDATED / _DELETED enqueue `record_annotation` on the training
  queue (`backend.webhooks`); the worker reads the annotation and its prediction from Label Studio
  and keeps the record in MODEL_DIR/projects/<id>/work/<annotation id>.json (a deleted
  annotation's record is removed);
- an export, on demand: `from_export` (`toothseg report --export`).

`summarize` turns records into one row per model version (and the from-scratch baseline), which
`toothseg report` prints and plots and `toothseg models show` includes.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from backend.instance import Instance
from backend.registry import Registry, project_key
from training.oracle import OracleCount, oracle_count

logger = logging.getLogger(__name__)

KINDS = ("accepted", "relabeled", "redrawn", "added", "deleted")
FROM_SCRATCH = "from scratch"
"""The row of annotations made without a prediction."""


@dataclass(frozen=True)
class AnnotationWork:
    """The oracle's actions on one submitted annotation (see the module docstring)."""

    project: str
    task: int
    annotation: int
    version: str | None  # the prediction's model_version; None: drawn from scratch
    lead_time: float | None  # seconds, as Label Studio recorded them (None when it did not)
    accepted: int
    relabeled: int
    redrawn: int
    added: int
    deleted: int

    @property
    def actions(self) -> int:
        return self.relabeled + self.redrawn + self.added + self.deleted

    @property
    def teeth(self) -> int:
        """Teeth in the submitted result."""
        return self.accepted + self.relabeled + self.redrawn + self.added


def plain(obj: Any) -> dict:
    """A label-studio-sdk object (pydantic) or a dict -> a dict."""
    if obj is None or isinstance(obj, Mapping):
        return dict(obj or {})
    return obj.model_dump() if hasattr(obj, "model_dump") else obj.dict()


def measure(project: Any, annotation: Mapping[str, Any], prediction: Mapping[str, Any] | None) -> AnnotationWork | None:
    """The work record of `annotation`, started from `prediction` (None: from scratch); None for a
    cancelled annotation and for one with neither a prediction nor a lead_time (an import)."""
    from backend.formats import result_image_size, result_to_masks, tooth_regions

    if annotation.get("was_cancelled") or (prediction is None and annotation.get("lead_time") is None):
        return None
    result = list(annotation.get("result") or [])
    predicted = list((prediction or {}).get("result") or [])
    size = result_image_size(result) or result_image_size(predicted) or (None, None)
    truth = result_to_masks(result, *size)
    regions = [Instance(mask, label) for label, mask in tooth_regions(predicted, *size)]
    count: OracleCount = oracle_count(regions, truth)
    lead_time = annotation.get("lead_time")
    return AnnotationWork(
        project=project_key(project), task=int(annotation["task"]),
        annotation=int(annotation["id"]), version=(prediction or {}).get("model_version") if prediction else None,
        lead_time=None if lead_time is None else float(lead_time),
        **{kind: getattr(count, kind) for kind in KINDS})


def parent_prediction(annotation: Mapping[str, Any], predictions: Mapping[int, Mapping[str, Any]]) -> dict | None:
    """The prediction `annotation` started from: its `parent_prediction` among `predictions` (id ->
    prediction), else the copy Label Studio may keep in the annotation's `prediction` field."""
    parent = annotation.get("parent_prediction")
    if isinstance(parent, Mapping):
        parent = parent.get("id")
    if parent is not None and int(parent) in predictions:
        return dict(predictions[int(parent)])
    kept = annotation.get("prediction") or {}
    return dict(kept) if parent is not None and kept.get("result") is not None else None


def from_export(project: Any, export: Iterable[Mapping[str, Any]],
                predictions: Iterable[Mapping[str, Any]]) -> list[AnnotationWork]:
    """Records of every annotation in a JSON export, `predictions` being the project's (the export
    names them by id only)."""
    by_id = {int(p["id"]): p for p in predictions}
    records = []
    for task in export:
        for annotation in task.get("annotations") or []:
            record = measure(project, {**annotation, "task": annotation.get("task") or task["id"]},
                             parent_prediction(annotation, by_id))
            if record is not None:
                records.append(record)
    return sorted(records, key=lambda r: r.annotation)


# --- the records the worker keeps ---------------------------------------------------------
class WorkStore:
    """Records in MODEL_DIR/projects/<id>/work/<annotation id>.json, one file each (atomic writes)."""

    def __init__(self, model_dir: Path | str):
        self.registry = Registry(model_dir)

    def folder(self, project: Any) -> Path:
        return self.registry.project_dir(project) / "work"

    def put(self, record: AnnotationWork) -> None:
        folder = self.folder(record.project)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".work.", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(record), f)
            os.replace(tmp, folder / f"{record.annotation}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def remove(self, project: Any, annotation: int) -> bool:
        path = self.folder(project) / f"{int(annotation)}.json"
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def records(self, project: Any) -> list[AnnotationWork]:
        folder = self.folder(project)
        out = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                out.append(AnnotationWork(**json.loads(path.read_text())))
            except (json.JSONDecodeError, TypeError) as exc:
                logger.warning("skipping unreadable work record %s: %s", path, exc)
        return sorted(out, key=lambda r: r.annotation)


def _client(settings):
    from label_studio_sdk import LabelStudio

    if not settings.label_studio_url:
        raise RuntimeError("LABEL_STUDIO_URL is not set: the worker cannot read annotations")
    return LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key, timeout=60)


def record_annotation(project: str, annotation_id: int) -> dict[str, Any]:
    """The worker's job for an annotation webhook: measure the annotation as Label Studio has it now
    and keep the record; an annotation Label Studio no longer has loses its record."""
    from label_studio_sdk.core.api_error import ApiError

    from backend.settings import Settings

    settings = Settings.from_env()
    client, store = _client(settings), WorkStore(settings.model_dir)
    try:
        annotation = plain(client.annotations.get(id=int(annotation_id)))
    except ApiError as exc:
        if exc.status_code != 404:
            raise
        return {"annotation": int(annotation_id), "removed": store.remove(project, annotation_id)}
    predictions = {}
    parent = annotation.get("parent_prediction")
    if parent is not None:
        try:
            predictions[int(parent)] = plain(client.predictions.get(id=int(parent)))
        except ApiError as exc:
            if exc.status_code != 404:
                raise
    record = measure(project, annotation, parent_prediction(annotation, predictions))
    if record is None:
        return {"annotation": int(annotation_id), "removed": store.remove(project, annotation_id)}
    store.put(record)
    return asdict(record)


def export_records(settings, project: str) -> list[AnnotationWork]:
    """The records recomputed from Label Studio's export of `project` (`toothseg report --export`)."""
    from training.export import export_project

    export = export_project(settings.label_studio_url, settings.label_studio_api_key, project)
    predictions = [plain(p) for p in _client(settings).predictions.list(project=int(project))]
    return from_export(project, export, predictions)


# --- per model version ----------------------------------------------------------------------
def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _mean(values: list[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def summarize(records: Iterable[AnnotationWork], registry: Registry | None = None) -> list[dict[str, Any]]:
    """One row per model version whose predictions annotations started from, the from-scratch
    baseline first, then the versions in the registry's order (others after, by name): annotations,
    median and mean actions per image overall and by kind, median lead_time and the share of teeth
    accepted unchanged. `state` is the version's registry status (current, promoted, ...)."""
    groups: dict[str, list[AnnotationWork]] = {}
    for record in records:
        groups.setdefault(record.version or FROM_SCRATCH, []).append(record)
    project = next((g[0].project for g in groups.values()), None)
    known = {v.version: v for v in registry.versions(project)} if registry is not None and project else {}
    current = registry.current_version(project) if registry is not None and project else None
    order = [FROM_SCRATCH] + list(known) + sorted(set(groups) - set(known) - {FROM_SCRATCH})
    rows = []
    for name in [n for n in order if n in groups]:
        group = groups[name]
        row: dict[str, Any] = {
            "version": name, "state": "-" if name == FROM_SCRATCH else "current" if name == current else
            (known[name].meta.get("status") or "stored") if name in known else "unknown",
            "annotations": len(group),
            "actions_median": _median([r.actions for r in group]), "actions_mean": _mean([r.actions for r in group]),
        }
        for kind in KINDS:
            row[f"{kind}_median"] = _median([getattr(r, kind) for r in group])
            row[f"{kind}_mean"] = _mean([getattr(r, kind) for r in group])
        row["lead_time_median"] = _median([r.lead_time for r in group if r.lead_time is not None])
        teeth = sum(r.teeth for r in group)
        row["accepted_share"] = sum(r.accepted for r in group) / teeth if teeth else None
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The report's table: per version, median / mean per image of each count."""
    if not rows:
        return "no annotations measured yet"

    def pair(row, key) -> str:
        return f"{row[key + '_median']:g} / {row[key + '_mean']:.2f}"

    header = ["version", "state", "annotations", "actions", *KINDS, "lead_time median s", "accepted share"]
    table = [header, ["", "", "", *["median / mean per image"] + [""] * len(KINDS), "", ""]]
    for row in rows:
        lead, share = row["lead_time_median"], row["accepted_share"]
        table.append([row["version"], row["state"], str(row["annotations"]), pair(row, "actions"),
                      *[pair(row, kind) for kind in KINDS], "-" if lead is None else f"{lead:g}",
                      "-" if share is None else f"{share:.1%}"])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def describe_version(rows: list[dict[str, Any]], version: str) -> str:
    """One line on `version`'s row for `toothseg models show`."""
    row = next((r for r in rows if r["version"] == version), None)
    if row is None:
        return f"annotator work: no annotation has started from {version}'s predictions yet"
    lead, share = row["lead_time_median"], row["accepted_share"]
    return (f"annotator work: {row['annotations']} annotations started from its predictions; actions per image "
            f"median {row['actions_median']:g}, mean {row['actions_mean']:.2f} (added {row['added_mean']:.2f}, "
            f"relabeled {row['relabeled_mean']:.2f}, redrawn {row['redrawn_mean']:.2f}, deleted "
            f"{row['deleted_mean']:.2f}); lead_time median {'-' if lead is None else f'{lead:g} s'}; "
            f"teeth accepted unchanged {'-' if share is None else f'{share:.1%}'}")


def plot_rows(rows: list[dict[str, Any]], records: Iterable[AnnotationWork], out: Path, title: str = "") -> Path:
    """PNG: actions and seconds per image (each annotation a dot, medians as bars) against version,
    the from-scratch baseline first; promoted versions are marked on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.ops.history import save_figure

    records = list(records)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.4 * len(rows) + 2), 6.5), dpi=100, sharex=True)
    x = {row["version"]: i for i, row in enumerate(rows)}
    for ax, what, label in ((axes[0], "actions", "actions per image"), (axes[1], "lead_time", "seconds per image")):
        for row in rows:
            values = [getattr(r, what) for r in records if (r.version or FROM_SCRATCH) == row["version"]
                      and getattr(r, what) is not None]
            xi = x[row["version"]]
            jitter = [xi + 0.25 * ((i % 5) - 2) / 2 for i in range(len(values))]
            ax.plot(jitter, values, "o", color="tab:blue", alpha=0.5, markersize=4)
            if values:
                ax.hlines(statistics.median(values), xi - 0.3, xi + 0.3, color="black", linewidth=2)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    promoted = [row["version"] for row in rows if row["state"] in ("current", "promoted")]
    for version in promoted:
        for ax in axes:
            ax.axvline(x[version] - 0.5, color="tab:green", linestyle="--", linewidth=1)
        axes[0].annotate("promoted", (x[version] - 0.45, 1), xycoords=("data", "axes fraction"), va="top",
                         fontsize=8, color="tab:green")
    axes[1].set_xticks(list(x.values()), [v.split("-")[0] if v != FROM_SCRATCH else v for v in x])
    axes[1].set_xlabel("model version of the pre-annotation (black: median; dots: annotations)")
    axes[0].set_title(title or "annotator work per model version")
    return save_figure(fig, out)
