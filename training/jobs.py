"""The retraining job run by `rq worker` (paper, section 2.2: the loop's "retrain" step).

    export (label-studio-sdk) -> images and masks -> YOLO-seg dataset (split by task id)
    -> train (warm start from the current model, within the time budget) -> train the learned
    mask refiner on the new detector's candidates (`training.refiner_training`, stored in its
    weights) -> with TRAIN_SAM_STEPS, tune SAM's decoder and gate it against the current SAM
    (`training.sam_training`, stored in its weights when better) -> score candidate and current on
    the same validation split -> gate -> store the version -> promote, or keep the current model and
    record why

`run_retrain` runs these steps in order, each a function of its own. The job has a time budget
(TRAIN_TIME_BUDGET minutes, from the job's start to its decision): the detector's training gets
what the export and download leave, less a reserve for the mask refiner and the evaluation.
Progress is written to the rq job's meta (`stage`, `progress`, `detail`, the budget), which
`toothseg status` reads, to the worker's log, and to the project's ML backend in Label Studio
(`training.ops.ls_status`), where the outcome says what to do next when a model is not promoted.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from rq import get_current_job

from backend.formats import Target, find_target
from backend.images import ImageError, ImageLoader
from backend.pipeline import PipelineOptions
from backend.preprocess import pixel_statistics
from backend.registry import ModelVersion, Registry, project_key
from backend.retrain_queue import RetrainQueue
from backend.process import lower_priority
from backend.settings import Settings
from training.data.dataset_io import DatasetItem
from training.dataset import split_train_val, write_yolo_dataset
from training.evaluate import Evaluation, GateDecision, gate_weights
from training.export import AnnotatedTask, ExportError, annotated_tasks, export_annotation_keys, export_project, \
    load_labeled_images, manifest_for
from training.ops.ls_status import LabelStudioStatus
from backend.registry import promote, reject, store_version, utc_now
from training.refiner_training import RefinerResult, reserve_seconds, train_refiner
from training.sam_training import gate_sam, tune_sam, write_decoder
from training.sam_training import reserve_seconds as sam_reserve_seconds
from training.train import TrainConfig, TrainResult, train_model

logger = logging.getLogger("toothseg.retrain")

EVALUATION_RESERVE_S = 20.0
"""Seconds of the budget kept for scoring and storing (plus EVALUATION_S_PER_IMAGE per image scored: the
validation images by each model the gate compares, a first model's training images too)."""
EVALUATION_S_PER_IMAGE = 1.0


PROGRESS_STAGES = ("train", "refiner")
"""Stages that report progress many times: Label Studio's status is updated at its own interval."""


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


class Progress:
    """Stage and progress of the running job: in its rq meta, the log and Label Studio."""

    def __init__(self, project: str, budget_s: float = 0.0, label_studio: LabelStudioStatus | None = None):
        self.job = get_current_job()
        self.project = project
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.label_studio = label_studio

    def budget(self) -> str:
        """"1:10 of 9:00 budget" (or the elapsed time alone without a budget)."""
        elapsed = _clock(time.monotonic() - self.started)
        return f"{elapsed} of {_clock(self.budget_s)} budget" if self.budget_s else f"{elapsed} elapsed"

    def __call__(self, stage: str, detail: str = "", progress: float | None = None, final: bool = False) -> None:
        logger.info("project %s [%s] %s (%s)", self.project, stage, detail, self.budget())
        if self.job is not None:
            self.job.meta.update(stage=stage, detail=detail, updated_at=utc_now(), budget=self.budget())
            if progress is not None:
                self.job.meta["progress"] = round(progress, 3)
            self.job.save_meta()
        if self.label_studio is not None:
            text = detail if final else f"{stage}: {detail} ({self.budget()})"
            self.label_studio.report(text, force=final or stage not in PROGRESS_STAGES)


def _label_config(settings: Settings, project: str) -> str:
    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    try:
        client = LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key, timeout=30)
        return client.projects.get(id=int(project)).label_config
    except (ApiError, httpx.HTTPError, OSError) as exc:
        raise ExportError(f"cannot read project {project}'s labeling config from Label Studio at "
                          f"{settings.label_studio_url}: {exc.__class__.__name__}: {exc}") from None


def pseudo_labels(settings: Settings, current_weights: Path, unlabeled: list[dict], value_key: str,
                  loader: ImageLoader, report: Progress) -> tuple[list[DatasetItem], list[dict]]:
    """The paper's semi-supervised step: confident predictions of the current model on unannotated
    tasks become training images."""
    from backend.detector import Detector
    from backend.images import task_image_url
    from backend.pipeline import Pipeline
    from backend.runtime import Runtime

    pipeline = Pipeline(Detector.load(current_weights, device=settings.device),
                        Runtime(settings).refiner() if settings.sam_preannotate else None,
                        PipelineOptions.from_settings(settings))
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
            images.append(DatasetItem(f"pseudo_{task['id']}", image.pixels, {x.label: x.mask for x in instances},
                                      f"task {task['id']} (pseudo-labels)"))
            records.append({"task_id": int(task["id"]), "score": round(score, 4), "teeth": len(instances)})
        report("pseudo-labels", f"{len(records)} of {i + 1} unannotated tasks kept", (i + 1) / len(unlabeled))
    return images, records


# --- the steps --------------------------------------------------------------------------------

@dataclass
class Exported:
    """What the export gave: the label config's target, annotated tasks and the rest."""

    target: Target
    annotated: list[AnnotatedTask]
    unlabeled: list[dict]


@dataclass
class Dataset:
    """The images of one round, split by task id, and the YOLO-seg dataset written from them."""

    train_tasks: list[AnnotatedTask]
    val_tasks: list[AnnotatedTask]
    train_images: list[DatasetItem]
    val_images: list[DatasetItem]
    skipped: list[str]
    data_yaml: Path
    mean: float
    std: float
    pseudo_records: list[dict] = field(default_factory=list)
    longest_side: int = 0  # pixels: the largest train image's longest side


def export_step(project: str, settings: Settings, report: Progress,
                covered: Callable[[Iterable[str]], None] | None = None) -> Exported:
    """Export the project; `covered` receives the `annotation_key` of every annotation in it."""
    report("export", f"exporting project {project} from {settings.label_studio_url}")
    export = export_project(settings.label_studio_url, settings.label_studio_api_key, project)
    target = find_target(_label_config(settings, project))
    annotated, unlabeled = annotated_tasks(export)
    if covered is not None:
        covered(export_annotation_keys(export))
    report("export", f"{len(annotated)} annotated tasks, {len(unlabeled)} without annotation")
    return Exported(target, annotated, unlabeled)


def dataset_step(settings: Settings, exported: Exported, work: Path, current: ModelVersion | None,
                 config: TrainConfig, report: Progress) -> Dataset:
    """Download the annotated images, split them by task id and write the YOLO-seg dataset."""
    annotated = exported.annotated
    train_ids, val_ids = split_train_val([t.task_id for t in annotated], settings.val_fraction)
    loader = ImageLoader(settings)
    images, skipped = load_labeled_images(
        annotated, loader, exported.target.value_key,
        on_progress=lambda n: report("download", f"{n} of {len(annotated)} images", n / len(annotated)))
    by_key = {img.name: img for img in images}
    train_set, val_set = set(train_ids), set(val_ids)
    train_tasks = [t for t in annotated if t.task_id in train_set and f"task_{t.task_id}" in by_key]
    val_tasks = [t for t in annotated if t.task_id in val_set and f"task_{t.task_id}" in by_key]
    train_images = [by_key[f"task_{t.task_id}"] for t in train_tasks]
    val_images = [by_key[f"task_{t.task_id}"] for t in val_tasks]
    if not train_images or not val_images:
        raise RuntimeError(f"not enough usable images: {len(train_images)} train, {len(val_images)} val "
                           f"({len(skipped)} skipped: {'; '.join(skipped[:3])})")
    pseudo_records: list[dict] = []
    if settings.pseudo_label_threshold > 0 and current is not None and exported.unlabeled:
        pseudo_images, pseudo_records = pseudo_labels(settings, current.weights, exported.unlabeled,
                                                      exported.target.value_key, loader, report)
        train_images = train_images + pseudo_images
    shutil.rmtree(work, ignore_errors=True)
    report("dataset", f"{len(train_images)} train / {len(val_images)} val images -> {work}")
    data_yaml = write_yolo_dataset(train_images, val_images, work / "dataset", tooth_class=config.tooth_class)
    pixels = [img.pixels() for img in train_images]
    mean, std = pixel_statistics(pixels)
    longest = max(max(p.shape[:2]) for p in pixels)
    return Dataset(train_tasks, val_tasks, train_images, val_images, skipped, data_yaml, mean, std, pseudo_records,
                   longest)


def train_step(settings: Settings, data: Dataset, work: Path, current: ModelVersion | None, config: TrainConfig,
               deadline: float | None, report: Progress, interrupt: Callable[[], bool] | None = None) -> TrainResult:
    """Train the candidate, warm-started from the current model (else YOLO_WEIGHTS, else toothseg's
    pretrained detector, else from scratch: `training.pretrain.first_training_start`), ending by
    `deadline` (time.monotonic seconds, None: no limit). `config`: with the warm-start length
    already applied (`TrainConfig.warm`) when there is a current model."""
    from training.pretrain import first_training_start

    warm = current.weights if current is not None else first_training_start(settings.yolo_weights, config)
    start = current.version if current else (warm or "scratch")
    planned = config.epochs_for(len(data.train_images))
    length = f"{config.steps} steps ({planned} epochs)" if config.steps > 0 else f"{planned} epochs"
    report("train", f"{length} at imgsz {config.imgsz}, warm start from {start}", 0.0)
    return train_model(data.data_yaml, work / "run", config, data.mean, data.std, warm_start=warm,
                       on_epoch=lambda e, n, m: report("train", f"epoch {e}/{n}", e / n),
                       val_items=data.val_images, val_options=PipelineOptions.from_settings(settings, use_sam=False),
                       deadline=deadline,
                       train_images=len(data.train_images), interrupt=interrupt)


def refiner_step(settings: Settings, data: Dataset, result: TrainResult, current: ModelVersion | None,
                 config: TrainConfig, deadline: float | None, report: Progress) -> RefinerResult:
    """Train the learned mask refiner for the candidate's detector on the train split (warm-started
    from the current model's refiner) and store it in the candidate's weights."""
    from backend.detector import Detector

    warm = Detector.load(current.weights).refiner if current is not None else None
    report("refiner", f"mask refiner: {config.refiner_steps} steps on {len(data.train_images)} train images"
                      f"{', warm start from ' + current.version if warm else ''}", 0.0)
    return train_refiner(result.weights, data.train_images, config.refiner_steps, config.device, deadline, warm,
                         seed=config.seed,
                         on_step=lambda i, n: report("refiner", f"step {i}/{n}", i / n) if i % 25 == 0 else None)


def sam_step(settings: Settings, data: Dataset, result: TrainResult, current: ModelVersion | None,
             config: TrainConfig, deadline: float | None, report: Progress) -> dict | None:
    """Tune SAM's prompt encoder and mask decoder on the train split (TRAIN_SAM_STEPS > 0; from the
    current model's tuned decoder when it has one for this SAM), gate it against the current SAM on
    the validation split (`gate_sam`) and store the SAM that wins, with the acceptance thresholds
    chosen for it, in the candidate's weights (nothing when the shipped SAM stays). Returns what the
    version's meta says of it; None when off or without SAM weights."""
    from backend.detector import Detector
    from backend.runtime import Runtime

    if config.sam_steps <= 0:
        return None
    runtime = Runtime(settings)
    shipped = runtime.refiner()
    if shipped is None:
        return None
    current_detector = Detector.load(current.weights) if current is not None else None
    start = runtime.refiner_for(current_detector)
    report("sam", f"SAM decoder: {config.sam_steps} steps on {len(data.train_images)} train images"
                  f"{', warm start from ' + current.version if start is not shipped else ''}", 0.0)
    tuned, state = tune_sam(start, data.train_images, config.sam_steps, deadline, seed=config.seed)
    if state is None:
        return tuned.as_dict()
    report("sam", f"SAM gate: tuned against current SAM on {len(data.val_images)} validation images", 1.0)
    decision = gate_sam(Detector.load(result.weights), start, start.with_decoder(state), data.val_images,
                        PipelineOptions.from_settings(settings, use_sam=False))
    logger.info("SAM gate: %s", decision.reason)
    if decision.promote:
        write_decoder(result.weights, state, shipped.checkpoint_id, tuned.as_dict(), decision.thresholds)
    elif start is not shipped:  # the current version's tuned SAM stays, with thresholds for this split
        carried = current_detector.sam_decoder
        write_decoder(result.weights, carried["state"], carried["base"], carried["training"], decision.thresholds)
    return tuned.as_dict() | decision.as_dict()


def gate_step(settings: Settings, candidate: Path, current: ModelVersion | None, data: Dataset, annotated: int,
              report: Progress) -> GateDecision:
    """Score candidate and current model on the validation split and decide."""
    val = data.val_images
    report("evaluate", f"scoring candidate{' and ' + current.version if current else ''} on {len(val)} "
                       f"validation images")
    return gate_weights(candidate, current.weights if current else None, val, data.train_images,
                        PipelineOptions.from_settings(settings, use_sam=False), settings.device,
                        settings.gate_tolerance, annotated)


def _metrics(evaluation: Evaluation | None) -> dict[str, float] | None:
    if evaluation is None:
        return None
    return evaluation.scores.as_dict() | {"primary": evaluation.scores.primary, "teeth": evaluation.teeth,
                                          "identified": evaluation.identified, "wrong": evaluation.wrong,
                                          "usable": evaluation.usable, "stray": evaluation.stray}


def store_step(registry: Registry, project: str, job_id: str, result: TrainResult, decision: GateDecision,
               data: Dataset, current: ModelVersion | None, config: TrainConfig, report: Progress,
               refiner: RefinerResult | None = None, sam: dict | None = None) -> tuple[ModelVersion, bool, str]:
    """Store the candidate (with its mask refiner, `refiner`: how it was trained) as a version with
    its metadata, then promote or reject it: (version, promoted, why). A promotion loses to a
    rollback or promotion made while it trained."""
    manifest = manifest_for(project, data.train_tasks, data.val_tasks, data.pseudo_records)
    meta = {
        "parent": current.version if current else None,
        "status": "promoted" if decision.promote else "rejected",
        "gate": decision.reason,
        "advice": decision.advice,
        "metrics": _metrics(decision.candidate),
        "parent_metrics": _metrics(decision.current),
        "normalisation": {"mean": data.mean, "std": data.std},
        "hyperparameters": config.as_dict(),
        "model_changes": {"proto_stride": config.proto_stride, "large_box_alpha": config.large_box_alpha,
                          "tooth_class": config.tooth_class, "normalisation": "train split mean/std"},
        "manifest_hash": manifest["hash"],
        "counts": manifest["counts"],
        "skipped": data.skipped,
        "train_seconds": round(result.seconds, 1),
        "epochs_run": result.epochs_run,
        "steps_run": result.steps_run,
        "stopped_by": result.stopped_by,
        "started_from": current.version if current else result.started_from,
        "mask_refiner": refiner.as_dict() if refiner else None,
        "sam_decoder": sam,
        "job_id": job_id,
    }
    version = store_version(registry, project, result.weights, meta, manifest)
    report("promote", decision.reason)
    if not decision.promote:
        reject(registry, project, version.version, decision.reason)
        return version, False, decision.reason
    if not promote(registry, project, version.version, decision.reason, expected=current.version if current else None):
        return version, False, registry.history(project)[-1]["reason"]  # CURRENT changed during the training
    return version, True, decision.reason


def train_config(settings: Settings) -> TrainConfig:
    """The product's training configuration: TRAIN_* variables, on DEVICE unless TRAIN_DEVICE is set."""
    return TrainConfig.from_env(defaults={"device": settings.device})


def run_retrain(project: str, settings: Settings, job_id: str, config: TrainConfig | None = None,
                covered: Callable[[Iterable[str]], None] | None = None,
                interrupt: Callable[[], bool] | None = None) -> dict[str, Any]:
    """One round of the loop for `project`; returns a summary (also stored in the version's meta).
    `covered` receives the `annotation_key`s of the exported annotations (see RetrainQueue.run);
    `interrupt`: see `run_round`."""
    config = config or train_config(settings)
    report = Progress(project, config.time_budget * 60, LabelStudioStatus.for_project(settings, project))
    exported = export_step(project, settings, report, covered)
    if interrupt is not None and interrupt():  # an idle round (training.idle) asked to stop
        return _interrupted(None, report, "the export")
    return run_round(project, settings, exported, job_id, config, report, interrupt)


def _interrupted(work: Path | None, report: Progress, stage: str) -> dict[str, Any]:
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    report("done", f"interrupted during {stage}: nothing stored, the current model is unchanged", 1.0, final=True)
    return {"status": "interrupted", "stage": stage, "seconds": round(time.monotonic() - report.started, 1)}


def run_round(project: str, settings: Settings, exported: Exported, job_id: str, config: TrainConfig,
              report: Progress, interrupt: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Everything after the export: dataset, training within the budget (counted from
    `report.started`), gate, store. `interrupt()` (idle training, `training.idle`) is asked during
    the training and between the steps: True ends the round at once, storing nothing (status
    "interrupted")."""
    deadline = report.started + report.budget_s if report.budget_s else None
    registry = Registry(settings.model_dir)
    if len(exported.annotated) < 2:
        reason = f"{len(exported.annotated)} annotated task(s); at least 2 are needed"
        report("done", f"not trained: {reason}; annotate more images, then start training", 1.0, final=True)
        return {"status": "skipped", "reason": reason}
    current = registry.current(project)
    config = config.warm() if current is not None else config
    work = (settings.work_dir or settings.model_dir / ".work") / project / job_id
    stop = interrupt or (lambda: False)
    data = dataset_step(settings, exported, work, current, config, report)
    if stop():
        return _interrupted(work, report, "the download")
    config = config.fitted(data.longest_side)
    # scored: the validation images by candidate and current model; a first model maybe on its train images too
    scored = len(data.val_images) * 2 if current else len(data.val_images) + len(data.train_images)
    reserve = EVALUATION_RESERVE_S + EVALUATION_S_PER_IMAGE * scored
    refiner_reserve = reserve_seconds(config.refiner_steps, len(data.train_images), config.device)
    sam_reserve = sam_reserve_seconds(config.sam_steps, len(data.train_images), len(data.val_images))
    result = train_step(settings, data, work, current, config,
                        deadline and deadline - reserve - refiner_reserve - sam_reserve, report, interrupt)
    if result.stopped_by == "interrupted" or stop():
        return _interrupted(work, report, "training")
    refiner = refiner_step(settings, data, result, current, config, deadline and deadline - reserve - sam_reserve,
                           report)
    if stop():
        return _interrupted(work, report, "the mask refiner's training")
    sam = sam_step(settings, data, result, current, config, deadline and deadline - reserve, report)
    if stop():
        return _interrupted(work, report, "SAM's tuning")
    decision = gate_step(settings, result.weights, current, data, len(exported.annotated), report)
    version, promoted, reason = store_step(registry, project, job_id, result, decision, data, current, config, report,
                                           refiner, sam)
    shutil.rmtree(work, ignore_errors=True)
    status = "promoted" if promoted else "rejected"
    summary = {"status": status, "version": version.version, "reason": reason, "advice": decision.advice,
               "primary": round(decision.candidate.scores.primary, 4),
               "seconds": round(time.monotonic() - report.started, 1)}
    outcome = f"{version.version} {status} ({report.budget()}): {reason}"
    report("done", outcome + (f". Next: {decision.advice}" if decision.advice else ""), 1.0, final=True)
    return summary


def retrain(project: str, reason: str = "") -> dict[str, Any]:
    """rq entry point (enqueued by `backend.retrain_queue`), coalesced per project. A failure
    propagates to rq, which retries with backoff and finally releases the project."""
    settings = Settings.from_env()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    project = project_key(project)
    job = get_current_job()
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
    if settings.idle_training_rounds > 0 and Registry(settings.model_dir).current(project) is not None:
        from training.idle import enqueue_idle_round

        enqueue_idle_round(job.connection, settings, project, 1)  # behind the pre-annotation pass
    return summary
