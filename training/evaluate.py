"""Score a model on labeled images with the STS metrics, and the promotion gate.

Both candidate and current model are run through the backend's pipeline (detector and Hungarian
numbering, without SAM: SAM is the same for both and would only add time) on the same validation
split. The gate decides tooth by tooth, not image by image, so that it is sound on the one or two
validation images a project of 8 annotated images has (about 28 teeth each):

- A first model (no current one) is promoted only if it saves the annotators work: on the
  validation images it must identify teeth (right FDI number, IoU > 0.5, as IA counts them), and
  more of them than it draws wrong regions (extra teeth, wrong numbers, loose masks), with a
  one-sided sign test over those teeth at `alpha` (0.05): 5 right and none wrong pass, 3 right
  and none wrong do not, nor does a model that finds nothing. A model that is not promoted is
  stored with the reason, and the job says what to do next.
- A later candidate is promoted unless its primary score (mean of instance Dice and IA,
  `training.metrics.Scores.primary`) is lower than the current model's by more than
  GATE_TOLERANCE (default 0.01) *and* a paired one-sided Wilcoxon signed-rank test over the
  validation teeth (each tooth's (Dice + identified) / 2, candidate against current) finds it
  worse at `alpha`. A difference that one validation image cannot tell from noise does not keep
  a model trained on more annotations from being deployed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from backend.detector import Detector
from backend.images import XrayImage
from backend.pipeline import Pipeline, PipelineOptions
from training.data.dataset_io import DatasetItem
from training.metrics import IA_IOU_THRESHOLD, Scores, dice, iou, mean_scores, score_image

GATE_ALPHA = 0.05
"""Significance level of the gate's tests."""


@dataclass(frozen=True)
class Evaluation:
    """A model's predictions on labeled images.

    scores: mean STS scores over the images. teeth: ground-truth teeth. identified: of them, found
    with the right FDI number (IoU > 0.5). wrong: predicted teeth that are not identified. per_tooth:
    for each ground-truth tooth, image by image in label order, (Dice + identified) / 2.
    """

    scores: Scores
    images: int
    teeth: int
    identified: int
    wrong: int
    per_tooth: tuple[float, ...]


def evaluate_pipeline(pipeline: Pipeline, images: Sequence[DatasetItem], nsd: str = "sts") -> Evaluation:
    """`pipeline` on `images` (their masks are the ground truth)."""
    scores, per_tooth = [], []
    identified = predicted = teeth = 0
    for item in images:
        image = XrayImage.of(item.pixels(), item.name)
        pred = {inst.label: inst.mask for inst in pipeline.run(image)}
        scores.append(score_image(pred, item.masks, nsd=nsd))
        gt = {label: mask for label, mask in item.masks.items() if mask.any()}
        predicted += len(pred)
        for label in sorted(gt):
            mask = pred.get(label)
            found = mask is not None and iou(mask, gt[label]) > IA_IOU_THRESHOLD
            identified += found
            per_tooth.append(((dice(mask, gt[label]) if mask is not None else 0.0) + found) / 2)
        teeth += len(gt)
    return Evaluation(mean_scores(scores), len(images), teeth, identified, predicted - identified, tuple(per_tooth))


def score_pipeline(pipeline: Pipeline, images: Sequence[DatasetItem], nsd: str = "sts") -> Scores:
    """Mean STS scores of `pipeline` over `images` (their masks are the ground truth)."""
    return evaluate_pipeline(pipeline, images, nsd).scores


def evaluate_weights(weights: Path, images: Sequence[DatasetItem], options: PipelineOptions | None = None,
                     device: str = "cpu") -> Evaluation:
    """Load weights as the backend does and evaluate detector + numbering with `options` (no SAM)."""
    pipeline = Pipeline(Detector.load(weights, device=device), None, options or PipelineOptions(use_sam=False))
    return evaluate_pipeline(pipeline, images)


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate: Evaluation
    current: Evaluation | None
    advice: str = ""  # what to do next when a first model is not promoted


def _sign_test(right: int, wrong: int) -> float:
    """One-sided p-value that teeth identified outnumber wrong regions only by chance."""
    from scipy.stats import binomtest

    return float(binomtest(right, right + wrong, 0.5, alternative="greater").pvalue) if right + wrong else 1.0


def _worse_p(candidate: Evaluation, current: Evaluation) -> float:
    """One-sided paired Wilcoxon p-value that the candidate is worse, tooth by tooth."""
    from scipy.stats import wilcoxon

    diff = np.array(candidate.per_tooth) - np.array(current.per_tooth)
    if len(diff) == 0 or not np.any(diff):
        return 1.0
    return float(wilcoxon(diff, alternative="less").pvalue)


def gate(candidate: Evaluation, current: Evaluation | None, tolerance: float = 0.01, alpha: float = GATE_ALPHA,
         annotated: int | None = None) -> GateDecision:
    """The promotion decision (module docstring). `annotated`: the project's annotated images, for
    the advice when a first model is not promoted."""
    c = candidate
    if current is None:
        p = _sign_test(c.identified, c.wrong)
        found = (f"identified {c.identified} of {c.teeth} validation teeth on {c.images} image(s), "
                 f"{c.wrong} wrong region(s) (sign test p={p:.2g})")
        if c.identified > 0 and p < alpha:
            return GateDecision(True, f"first model: {found}; primary {c.scores.primary:.4f}", c, None)
        so_far = f" ({annotated} so far)" if annotated else ""
        advice = (f"annotate more images{so_far} and start training again; with 8-20 annotated panoramics the "
                  f"first model usually finds most teeth")
        return GateDecision(False, f"first model not promoted: it {found}, which does not show that it saves "
                                   f"work (alpha {alpha})", c, None, advice)
    delta = c.scores.primary - current.scores.primary
    versus = f"primary {c.scores.primary:.4f} vs current {current.scores.primary:.4f} ({delta:+.4f}"
    if delta >= -tolerance:
        return GateDecision(True, f"{versus}, tolerance {tolerance})", c, current)
    p = _worse_p(c, current)
    if p >= alpha:
        return GateDecision(True, f"{versus}: below tolerance {tolerance}, but not significantly worse over "
                                  f"{len(c.per_tooth)} validation teeth (Wilcoxon p={p:.2g} >= {alpha}))", c, current)
    return GateDecision(False, f"candidate {versus}) is worse than current by more than tolerance {tolerance}, "
                               f"significantly over {len(c.per_tooth)} validation teeth (Wilcoxon p={p:.2g})",
                        c, current)
