"""Export a project's annotations from Label Studio (label-studio-sdk) into training images.

One annotation per task: cancelled ("skipped") annotations are ignored; of the rest, a ground
truth annotation wins, then the most recently updated one. Images are downloaded with the same
loader as the backend (auth, allowlist, limits), regions decoded to one mask per FDI label.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import httpx

from backend.formats import result_image_size, result_to_masks
from backend.images import ImageError, ImageLoader, task_image_url
from backend.retrain_queue import annotation_key
from training.data.dataset_io import DatasetItem

logger = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """Label Studio could not be reached or refused the export (the job fails and rq retries it)."""


@dataclass(frozen=True)
class AnnotatedTask:
    """A task with its chosen annotation."""

    task_id: int
    data: Mapping[str, Any]
    annotation_id: int
    updated_at: str
    ground_truth: bool
    result: list[dict]


def choose_annotation(annotations: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The annotation to train on: not cancelled; ground truth first, then the latest updated."""
    usable = [a for a in annotations if not a.get("was_cancelled")]
    if not usable:
        return None
    return max(usable, key=lambda a: (bool(a.get("ground_truth")),
                                      str(a.get("updated_at") or a.get("created_at") or ""), int(a.get("id") or 0)))


def annotated_tasks(export: Iterable[Mapping[str, Any]]) -> tuple[list[AnnotatedTask], list[Mapping[str, Any]]]:
    """Label Studio's JSON export -> (tasks with a usable annotation, tasks without one)."""
    annotated, unlabeled = [], []
    for task in export:
        chosen = choose_annotation(task.get("annotations") or [])
        if chosen is None:
            unlabeled.append(task)
            continue
        annotated.append(AnnotatedTask(
            task_id=int(task["id"]), data=task.get("data") or {}, annotation_id=int(chosen.get("id") or 0),
            updated_at=str(chosen.get("updated_at") or chosen.get("created_at") or ""),
            ground_truth=bool(chosen.get("ground_truth")), result=list(chosen.get("result") or []),
        ))
    annotated.sort(key=lambda t: t.task_id)
    return annotated, unlabeled


def export_annotation_keys(export: Iterable[Mapping[str, Any]]) -> list[str]:
    """The `annotation_key` of every annotation in an export (chosen or not, cancelled or not): what
    a retrain on it covers of the webhook events (`backend.webhooks` records the same key)."""
    return [annotation_key(a.get("id"), a.get("updated_at") or a.get("created_at"))
            for task in export for a in task.get("annotations") or []]


def export_project(base_url: str, api_key: str, project: int | str, timeout: float = 120.0) -> list[dict]:
    """The project's full JSON export (all tasks, annotations included) through label-studio-sdk."""
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    if not base_url:
        raise ExportError("LABEL_STUDIO_URL is not set: the worker cannot export annotations")
    try:
        client = LabelStudio(base_url=base_url, api_key=api_key, timeout=timeout)
        return list(client.projects.exports.as_json(int(project), timeout=int(timeout)))
    except ApiError as exc:
        raise ExportError(f"Label Studio at {base_url} refused the export of project {project}: "
                          f"HTTP {exc.status_code} {exc.body}") from None
    except (httpx.HTTPError, OSError) as exc:
        raise ExportError(f"Label Studio at {base_url} is unreachable: {exc.__class__.__name__}: {exc}") from None


def load_labeled_images(tasks: Iterable[AnnotatedTask], loader: ImageLoader, value_key: str,
                        on_progress: Callable[[int], None] | None = None) -> tuple[list[DatasetItem], list[str]]:
    """Download each task's image and decode its regions -> (labeled images, skip reasons).

    A task is skipped (with a reason) when its image cannot be loaded, or its regions were drawn
    on an image of another size."""
    images, skipped = [], []
    for i, task in enumerate(tasks):
        try:
            image = loader.load(task_image_url({"data": task.data}, value_key))
            size = result_image_size(task.result) or (image.height, image.width)
            if size != (image.height, image.width):
                raise ImageError(f"regions were drawn on a {size[1]}x{size[0]} image, the image is "
                                 f"{image.width}x{image.height}")
            masks = result_to_masks(task.result, image.height, image.width)
        except (ImageError, ValueError) as exc:
            skipped.append(f"task {task.task_id}: {exc}")
            logger.warning("skipping task %s: %s", task.task_id, exc)
            continue
        images.append(DatasetItem(f"task_{task.task_id}", image.pixels, masks, f"task {task.task_id}"))
        if on_progress:
            on_progress(i + 1)
    return images, skipped


def manifest_for(project: str, train: list[AnnotatedTask], val: list[AnnotatedTask],
                 pseudo: list[dict] | None = None) -> dict[str, Any]:
    """What a model was trained on: task and annotation ids with update times, the split, a hash."""
    entries = [{"task_id": t.task_id, "annotation_id": t.annotation_id, "updated_at": t.updated_at,
                "ground_truth": t.ground_truth, "split": split}
               for split, group in (("train", train), ("val", val)) for t in group]
    pseudo = pseudo or []
    digest = hashlib.sha256(json.dumps([entries, pseudo], sort_keys=True).encode()).hexdigest()
    return {"project": project, "tasks": entries, "pseudo_labels": pseudo, "hash": digest,
            "counts": {"train": len(train), "val": len(val), "pseudo": len(pseudo)}}
