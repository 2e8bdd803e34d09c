"""The retraining job run by `rq worker` (paper, section 2.2: the loop's "retrain" step).

    export (label-studio-sdk) -> images and masks -> YOLO-seg dataset (split by task id)
    -> train (warm start from the current model) -> score candidate and current on the same
    validation split -> store the version -> promote, or keep the current model and record why

Progress is written to the rq job's meta (`stage`, `progress`, `detail`), which
`toothseg status` reads, and to the worker's log.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from rq import get_current_job

from backend.formats import find_target
from backend.images import ImageError, ImageLoader
from backend.preprocess import pixel_statistics
from backend.registry import Registry, project_key
from backend.retrain_queue import RetrainQueue, annotation_key
from backend.runtime import lower_priority
from backend.settings import Settings
from training.dataset import LabeledImage, split_train_val, write_yolo_dataset
from training.evaluate import gate, score_weights
from training.export import ExportError, annotated_tasks, export_project, load_labeled_images, manifest_for
from training.promotion import promote, reject, store_version, utc_now
from training.train import TrainConfig, train_model

logger = logging.getLogger("toothseg.retrain")


class Progress:
    """Stage and progress of the running job, in its rq meta and in the log."""

    def __init__(self, project: str):
        self.job = get_current_job()
        self.project = project

    def __call__(self, stage: str, detail: str = "", progress: float | None = None) -> None:
        logger.info("project %s [%s] %s", self.project, stage, detail)
        if self.job is not None:
            self.job.meta.update(stage=stage, detail=detail, updated_at=utc_now())
            if progress is not None:
                self.job.meta["progress"] = round(progress, 3)
            self.job.save_meta()


def _label_config(settings: Settings, project: str) -> str:
    from label_studio_sdk import LabelStudio

    try:
        client = LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key, timeout=30)
        return client.projects.get(id=int(project)).label_config
    except Exception as exc:
        raise ExportError(f"cannot read project {project}'s labeling config from Label Studio at "
                          f"{settings.label_studio_url}: {exc.__class__.__name__}: {exc}") from None


def pseudo_labels(settings: Settings, current_weights: Path, unlabeled: list[dict], value_key: str,
                   loader: ImageLoader, report: Progress) -> tuple[list[LabeledImage], list[dict]]:
    """The paper's semi-supervised step: confident predictions of the current model on unannotated
    tasks become training images."""
    from backend.detector import Detector
    from backend.images import task_image_url
    from backend.pipeline import Pipeline, PipelineOptions
    from backend.runtime import Runtime

    pipeline = Pipeline(Detector.load(current_weights, device=settings.device), Runtime(settings).refiner(),
                        PipelineOptions(min_score=settings.score_threshold))
    images, records = [], []
    for i, task in enumerate(unlabeled):
        try:
            image = loader.load(task_image_url(task, value_key))
        except ImageError as exc:
            logger.warning("pseudo-labels: skipping task %s: %s", task.get("id"), exc.reason)
            continue
        instances = pipeline.run(image)
        score = sum(x.score for x in instances) / len(instances) if instances else 0.0
        if instances and score >= settings.pseudo_label_threshold:
            images.append(LabeledImage(f"pseudo_{task['id']}", image.pixels, {x.label: x.mask for x in instances}))
            records.append({"task_id": int(task["id"]), "score": round(score, 4), "teeth": len(instances)})
        report("pseudo-labels", f"{len(records)} of {i + 1} unannotated tasks kept", (i + 1) / len(unlabeled))
    return images, records


def run_retrain(project: str, settings: Settings, job_id: str, config: TrainConfig | None = None,
                covered: Callable[[Iterable[str]], None] | None = None) -> dict[str, Any]:
    """One round of the loop for `project`; returns a summary (also stored in the version's meta).
    `covered` receives the `annotation_key`s of the exported annotations (see RetrainQueue.run)."""
    report = Progress(project)
    registry = Registry(settings.model_dir)
    config = config or TrainConfig.from_env(**({} if os.environ.get("TRAIN_DEVICE") else {"device": settings.device}))
    started = time.perf_counter()

    report("export", f"exporting project {project} from {settings.label_studio_url}")
    export = export_project(settings.label_studio_url, settings.label_studio_api_key, project)
    target = find_target(_label_config(settings, project))
    annotated, unlabeled = annotated_tasks(export)
    if covered is not None:  # every annotation in the export, chosen or not, cancelled or not
        covered(annotation_key(a.get("id"), a.get("updated_at") or a.get("created_at"))
                for task in export for a in task.get("annotations") or [])
    report("export", f"{len(annotated)} annotated tasks, {len(unlabeled)} without annotation")
    if len(annotated) < 2:
        return {"status": "skipped", "reason": f"{len(annotated)} annotated task(s); at least 2 are needed"}

    train_ids, val_ids = split_train_val([t.task_id for t in annotated], settings.val_fraction)
    loader = ImageLoader(settings)
    images, skipped = load_labeled_images(
        annotated, loader, target.value_key,
        on_progress=lambda n: report("download", f"{n} of {len(annotated)} images", n / len(annotated)))
    by_key = {img.key: img for img in images}
    train_set, val_set = set(train_ids), set(val_ids)
    train_tasks = [t for t in annotated if t.task_id in train_set and f"task_{t.task_id}" in by_key]
    val_tasks = [t for t in annotated if t.task_id in val_set and f"task_{t.task_id}" in by_key]
    train_images = [by_key[f"task_{t.task_id}"] for t in train_tasks]
    val_images = [by_key[f"task_{t.task_id}"] for t in val_tasks]
    if not train_images or not val_images:
        raise RuntimeError(f"not enough usable images: {len(train_images)} train, {len(val_images)} val "
                           f"({len(skipped)} skipped: {'; '.join(skipped[:3])})")

    current = registry.current(project)
    pseudo_records: list[dict] = []
    if settings.pseudo_label_threshold > 0 and current is not None and unlabeled:
        pseudo_images, pseudo_records = pseudo_labels(settings, current.weights, unlabeled, target.value_key,
                                                       loader, report)
        train_images = train_images + pseudo_images

    work = (settings.work_dir or settings.model_dir / ".work") / project / job_id
    shutil.rmtree(work, ignore_errors=True)
    report("dataset", f"{len(train_images)} train / {len(val_images)} val images -> {work}")
    data_yaml = write_yolo_dataset(train_images, val_images, work / "dataset")
    mean, std = pixel_statistics([img.pixels for img in train_images])
    warm = current.weights if current is not None else settings.yolo_weights

    report("train", f"{config.epochs} epochs at imgsz {config.imgsz}, warm start from "
                    f"{current.version if current else (warm or 'scratch')}", 0.0)
    result = train_model(data_yaml, work / "run", config, mean, std, warm_start=warm,
                         on_epoch=lambda e, n, m: report("train", f"epoch {e}/{n}", e / n))

    report("evaluate", f"scoring candidate{' and ' + current.version if current else ''} on {len(val_images)} "
                       f"validation images")
    candidate_scores = score_weights(result.weights, val_images, settings.score_threshold)
    current_scores = score_weights(current.weights, val_images, settings.score_threshold) if current else None
    decision = gate(candidate_scores, current_scores, settings.gate_tolerance)

    report("promote", decision.reason)
    manifest = manifest_for(project, train_tasks, val_tasks, pseudo_records)
    meta = {
        "parent": current.version if current else None,
        "status": "promoted" if decision.promote else "rejected",
        "gate": decision.reason,
        "metrics": candidate_scores.as_dict() | {"primary": candidate_scores.primary},
        "parent_metrics": (current_scores.as_dict() | {"primary": current_scores.primary}) if current_scores else None,
        "normalisation": {"mean": mean, "std": std},
        "hyperparameters": config.as_dict(),
        "model_changes": {"proto_stride": config.proto_stride, "large_box_alpha": config.large_box_alpha,
                          "normalisation": "train split mean/std"},
        "manifest_hash": manifest["hash"],
        "counts": manifest["counts"],
        "skipped": skipped,
        "train_seconds": round(result.seconds, 1),
        "epochs_run": result.epochs_run,
        "job_id": job_id,
    }
    version = store_version(registry, project, result.weights, meta, manifest)
    if decision.promote:
        promote(registry, project, version.version, decision.reason)
    else:
        reject(registry, project, version.version, decision.reason)
    shutil.rmtree(work, ignore_errors=True)
    summary = {"status": meta["status"], "version": version.version, "reason": decision.reason,
               "primary": round(candidate_scores.primary, 4), "seconds": round(time.perf_counter() - started, 1)}
    report("done", f"{version.version} {meta['status']}: {decision.reason}", 1.0)
    return summary


def retrain(project: str, reason: str = "") -> dict[str, Any]:
    """rq entry point (enqueued by `backend.retrain_queue`), coalesced per project. A failure
    propagates to rq, which retries with backoff and finally releases the project."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    project = project_key(project)
    job = get_current_job()
    settings = Settings.from_env()
    if job is not None:
        lower_priority(settings.worker_nice)
    logger.info("project %s: retrain job %s started (%s)", project, job.id if job else "-", reason)
    if job is None:  # called directly (toothseg train): no queue to coalesce with
        return run_retrain(project, settings, f"local-{int(time.time())}")
    queue = RetrainQueue.from_settings(job.connection, settings)
    summary = queue.run(project, job, lambda covered: run_retrain(project, settings, job.id, covered=covered))
    if summary.get("status") == "promoted" and settings.preannotate_after_promotion:
        from training.preannotate import enqueue_preannotation

        enqueue_preannotation(job.connection, settings, project, summary["version"])
    return summary
