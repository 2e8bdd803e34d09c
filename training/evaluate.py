"""Score a model on labeled images with the STS metrics, and the promotion gate.

Both candidate and current model are run through the backend's pipeline (detector and Hungarian
numbering, without SAM: SAM is the same for both and would only add time) on the same validation
split. The gate decides tooth by tooth, not image by image, so that it is sound on the one or two
validation images a project of 8 annotated images has (about 28 teeth each):

- A first model (no current one) is promoted only if it saves the annotators work, better than
  nothing. On the validation images each of its regions that is a tooth (matched one to one to
  a ground-truth tooth with IoU > 0.5, as IA matches them, whatever its FDI number) saves drawing
  that tooth: the annotator keeps the mask and at most relabels it; each stray region costs a
  deletion. A one-sided sign test over those regions at `alpha` (0.05) decides: more teeth than
  stray (5 and none stray pass) promotes, more stray than teeth (12 stray and no tooth) rejects.
  A project of 8 annotated images has one validation image, whose teeth are not independent
  trials (one missed tooth shifts the numbers of its neighbours), and when it cannot decide
  either way (3 teeth and none stray; or no region at all, as on a 10-tooth radiograph of a
  mostly edentulous jaw) the model's own training images (`fit`) decide whether the training
  worked: it is promoted if it identifies (right number) at least FIT_MIN_IDENTIFIED of the teeth
  it was trained on and more of them than it draws wrong regions (the same sign test). So a
  model that has learned nothing is never promoted, and a good one is not thrown away because
  its one validation image was too hard to tell. On UFBA-425's pool (`bench/bench_real.py --on
  pool`) the gate that counted only teeth with the right number rejected 8-image first models
  with IA 0.78-0.79 on 54 unseen radiographs, for a few misnumbered teeth and no right one on
  their 11-tooth validation image. A model that is not promoted is stored
  with the reason, and the job says what to do next.
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
from training.metrics import IA_IOU_THRESHOLD, Scores, mean_scores, score_image

GATE_ALPHA = 0.05
"""Significance level of the gate's tests."""
FIT_MIN_IDENTIFIED = 0.5
"""Share of its training teeth a first model must identify when its validation cannot decide."""


@dataclass(frozen=True)
class Evaluation:
    """A model's predictions on labeled images.

    scores: mean STS scores over the images. teeth: ground-truth teeth. identified: of them, found
    with the right FDI number (IoU > 0.5). wrong: predicted teeth that are not identified. per_tooth:
    for each ground-truth tooth, image by image in label order, (Dice + identified) / 2. usable:
    predicted teeth matched one to one to a ground-truth tooth with IoU > 0.5, whatever their number
    (an annotator keeps the mask, at most relabels it); stray: the other predicted teeth (deleted).
    """

    scores: Scores
    images: int
    teeth: int
    identified: int
    wrong: int
    per_tooth: tuple[float, ...]
    usable: int
    stray: int


def evaluate_pipeline(pipeline: Pipeline, images: Sequence[DatasetItem], nsd: str = "sts") -> Evaluation:
    """`pipeline` on `images` (their masks are the ground truth)."""
    from scipy.optimize import linear_sum_assignment

    from training.oracle import iou_matrix

    scores, per_tooth = [], []
    identified = predicted = teeth = usable = 0
    for item in images:
        image = XrayImage.of(item.pixels(), item.name)
        pred = {inst.label: inst.mask for inst in pipeline.run(image)}
        scores.append(score_image(pred, item.masks, nsd=nsd))
        gt = {label: mask for label, mask in sorted(item.masks.items()) if mask.any()}
        predicted += len(pred)
        ious = iou_matrix(list(pred.values()), list(gt.values()))  # (predicted, ground truth)
        if ious.size:
            rows, cols = linear_sum_assignment(ious, maximize=True)
            usable += int((ious[rows, cols] > IA_IOU_THRESHOLD).sum())
        row_of = {label: i for i, label in enumerate(pred)}
        for j, label in enumerate(gt):
            overlap = float(ious[row_of[label], j]) if label in row_of else 0.0
            found = overlap > IA_IOU_THRESHOLD
            identified += found
            per_tooth.append((2 * overlap / (1 + overlap) + found) / 2)  # Dice = 2 IoU / (1 + IoU)
        teeth += len(gt)
    return Evaluation(mean_scores(scores), len(images), teeth, identified, predicted - identified, tuple(per_tooth),
                      usable, predicted - usable)


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


def _regions(e: Evaluation) -> str:
    return (f"{e.usable} of its {e.usable + e.stray} region(s) on {e.images} validation image(s) are teeth "
            f"(identified with the right number: {e.identified} of {e.teeth}), {e.stray} stray")


def first_model_verdict(candidate: Evaluation, alpha: float = GATE_ALPHA) -> bool | None:
    """What a first model's validation shows: True (it saves work), False (it costs work), None
    (it cannot tell; then `gate` needs the model's `fit` on its training images)."""
    if candidate.usable > 0 and _sign_test(candidate.usable, candidate.stray) < alpha:
        return True
    if _sign_test(candidate.stray, candidate.usable) < alpha:
        return False
    return None


def _first_model_gate(c: Evaluation, fit: Evaluation | None, alpha: float, annotated: int | None) -> GateDecision:
    verdict = first_model_verdict(c, alpha)
    found = f"{_regions(c)} (sign test p={_sign_test(c.usable, c.stray):.2g})"
    if verdict:
        return GateDecision(True, f"first model: {found}; primary {c.scores.primary:.4f}", c, None)
    so_far = f" ({annotated} so far)" if annotated else ""
    advice = (f"annotate more images{so_far} and start training again; with 8-20 annotated panoramics the "
              f"first model usually finds most teeth")
    if verdict is False:
        return GateDecision(False, f"first model not promoted: {found}: more stray regions than teeth, it "
                                   f"would cost work (alpha {alpha})", c, None, advice)
    undecided = f"{found}, which cannot tell whether it saves work (alpha {alpha})"
    if fit is None:
        return GateDecision(False, f"first model not promoted: {undecided}", c, None, advice)
    learned = (fit.identified >= FIT_MIN_IDENTIFIED * fit.teeth
               and fit.identified > 0 and _sign_test(fit.identified, fit.wrong) < alpha)
    on_train = (f"on its {fit.images} training image(s) it identified {fit.identified} of {fit.teeth} teeth, "
                f"{fit.wrong} wrong region(s)")
    if learned:
        return GateDecision(True, f"first model: {undecided}; {on_train}: the training worked; primary "
                                  f"{c.scores.primary:.4f}", c, None)
    return GateDecision(False, f"first model not promoted: {undecided}, and {on_train}, less than "
                               f"{FIT_MIN_IDENTIFIED:.0%} or not more than wrong: it has not learned the teeth",
                        c, None, advice)


def gate(candidate: Evaluation, current: Evaluation | None, tolerance: float = 0.01, alpha: float = GATE_ALPHA,
         annotated: int | None = None, fit: Evaluation | None = None) -> GateDecision:
    """The promotion decision (module docstring). `annotated`: the project's annotated images, for
    the advice when a first model is not promoted. `fit`: a first model on its own training images,
    used only when its validation cannot decide (`first_model_verdict` is None)."""
    c = candidate
    if current is None:
        return _first_model_gate(c, fit, alpha, annotated)
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


def gate_weights(candidate: Path, current: Path | None, val: Sequence[DatasetItem], train: Sequence[DatasetItem],
                 options: PipelineOptions, device: str = "cpu", tolerance: float = 0.01,
                 annotated: int | None = None) -> GateDecision:
    """`gate` on weights: candidate (and current) scored on the validation images `val`; a first
    model whose validation cannot decide is also scored on its training images `train`."""
    candidate_eval = evaluate_weights(candidate, val, options, device)
    current_eval = evaluate_weights(current, val, options, device) if current is not None else None
    fit = None
    if current is None and first_model_verdict(candidate_eval) is None:
        fit = evaluate_weights(candidate, train, options, device)
    return gate(candidate_eval, current_eval, tolerance, annotated=annotated, fit=fit)
