"""The Label Studio ML backend: a `LabelStudioMLBase` subclass.

Batch mode: every task's image goes through the pipeline (YOLOv8-seg, Hungarian FDI numbering,
SAM refinement) and comes back as one region per tooth for the project's BrushLabels (RLE) or
PolygonLabels control, labelled with the config's value for each FDI number.

Scores: each region's `score` is its numbering confidence (the detector's class probability of
the assigned FDI label, 0-1). The task's `score` is the mean region score (0 with no teeth).
Label Studio shows it as the prediction score column: sort it ascending to annotate the least
certain images first, descending for the most confident first (the paper's order).

Interactive mode (SAM on the annotator's prompt): when Label Studio sends `context` with a
keypoint or rectangle from a `smart` tool, SAM is prompted on the cached image embedding and the
one resulting mask is returned with the annotator's label.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
from label_studio_ml.model import LabelStudioMLBase

from backend.formats import Target, find_target, fdi_of_value, instances_to_results, mask_to_regions, task_score
from backend.images import ImageError, ImageLoader, task_image_url
from backend.runtime import get_runtime
from backend.timing import StageTimer

logger = logging.getLogger(__name__)


class ToothSegBackend(LabelStudioMLBase):
    """Constructed per request (cheap): models live in the process's `Runtime`."""

    def __init__(self, label_config: str | None = None, train_output: dict | None = None, project: str = "",
                 **kwargs: Any):
        super().__init__(label_config=label_config, train_output=train_output, **kwargs)
        self.project = project
        self.runtime = get_runtime()
        self.loader = ImageLoader(self.runtime.settings, hostname=self.hostname, access_token=self.access_token)

    @property
    def model_version(self) -> str:
        return self.runtime.version(self.project)

    def predict(self, tasks: list[dict], context: Mapping[str, Any] | None = None, **kwargs: Any) -> list[dict]:
        """Label Studio tasks -> one prediction per task, in order."""
        target = find_target(self.label_config or "")
        if context and context.get("result"):
            return [self.predict_interactive(tasks[0], target, context)] if tasks else []
        served = self.runtime.serve(self.project)
        if served.pipeline is None:
            logger.warning("project %s has no trained model yet (and no YOLO_WEIGHTS): returning empty predictions "
                           "for %d task(s); annotate some images and train", self.project, len(tasks))
        predictions = []
        for task in tasks:
            predictions.append(self._predict_task(task, target, served))
        return predictions

    def _predict_task(self, task: Mapping[str, Any], target: Target, served) -> dict:
        result: list[dict] = []
        if served.pipeline is not None:
            timer = StageTimer()
            try:
                with timer.stage("load"):
                    image = self.loader.load(task_image_url(task, target.value_key))
                instances = served.pipeline.run(image, timer)
                with timer.stage("encoding"):
                    result = instances_to_results(instances, target)
                logger.info("task %s: %d teeth (%s)", task.get("id"), len(instances), timer.summary())
            except ImageError as exc:
                logger.warning("task %s: no prediction: %s", task.get("id"), exc.reason)
        return {"result": result, "score": task_score(result), "model_version": served.version}

    def _detected_box_at(self, pixels: np.ndarray, points: np.ndarray, point_labels: np.ndarray) -> np.ndarray | None:
        """The box of the served detector's most tooth-like candidate (any score above DETECTOR_CONF)
        that holds every foreground click and no background click; None without one."""
        pipeline = self.runtime.serve(self.project).pipeline
        if pipeline is None:
            return None
        candidates = pipeline.detector.detect(pixels)
        fg, bg = points[point_labels == 1], points[point_labels == 0]

        def inside(box: np.ndarray, p: np.ndarray) -> np.ndarray:
            return (p[:, 0] >= box[0]) & (p[:, 0] <= box[2]) & (p[:, 1] >= box[1]) & (p[:, 1] <= box[3])

        for box in candidates.boxes:  # in descending tooth score
            if len(fg) and inside(box, fg).all() and not inside(box, bg).any():
                return np.asarray(box, dtype=float)
        return None

    def predict_interactive(self, task: Mapping[str, Any], target: Target, context: Mapping[str, Any]) -> dict:
        """SAM on the annotator's keypoints (foreground/background) or rectangle -> one region."""
        refiner = self.runtime.refiner_for(self.runtime.detector(self.project)[1])
        version = self.model_version
        if refiner is None:
            logger.warning("interactive request, but there are no SAM weights (SAM_CHECKPOINT for SAM_MODEL_TYPE=%s)",
                           self.runtime.settings.sam_model_type)
            return {"result": [], "score": 0.0, "model_version": version}
        try:
            image = self.loader.load(task_image_url(task, target.value_key))
        except ImageError as exc:
            logger.warning("task %s: interactive prompt failed: %s", task.get("id"), exc.reason)
            return {"result": [], "score": 0.0, "model_version": version}
        points, point_labels, box, label_value = [], [], None, None
        for region in context["result"]:
            value = region.get("value") or {}
            w = region.get("original_width") or image.width
            h = region.get("original_height") or image.height
            kind = str(region.get("type", "")).lower()
            labels = value.get("keypointlabels") or value.get("rectanglelabels") or []
            label_value = label_value or (labels[0] if labels else None)
            if kind == "keypointlabels":
                points.append([value["x"] * w / 100.0, value["y"] * h / 100.0])
                point_labels.append(1 if region.get("is_positive", True) else 0)
            elif kind == "rectanglelabels":
                x, y = value["x"] * w / 100.0, value["y"] * h / 100.0
                box = np.array([x, y, x + value["width"] * w / 100.0, y + value["height"] * h / 100.0])
        label = fdi_of_value(label_value or "")
        if label is None or target.value_for(label) is None or (not points and box is None):
            logger.warning("task %s: interactive context without a usable tooth label or prompt", task.get("id"))
            return {"result": [], "score": 0.0, "model_version": version}
        if box is None and refiner.boxes_only:  # a click, for a SAM that was trained on boxes alone
            box = self._detected_box_at(image.pixels, np.array(points), np.array(point_labels))
            if box is None:
                logger.warning("task %s: no detected tooth under the click, and %s takes boxes: draw a rectangle",
                               task.get("id"), refiner.checkpoint_id.split("-")[0])
                return {"result": [], "score": 0.0, "model_version": version}
            points = []
        mask, score = refiner.prompt(image.pixels, image.sha1, box=box,
                                     points=np.array(points) if points else None,
                                     point_labels=np.array(point_labels) if points else None)
        regions = mask_to_regions(mask, target.value_for(label), target, score=score) if mask.any() else []
        return {"result": regions, "score": task_score(regions), "model_version": version}
