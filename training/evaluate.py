"""Score a model on labeled images with the STS metrics, and the promotion gate.

The gate compares candidate and current on the same validation split with the primary score
(mean of instance-level Dice and identification accuracy, `training.metrics.Scores.primary`):
the candidate is promoted unless it is worse than the current model by more than
GATE_TOLERANCE (default 0.01). Both are run through the backend's pipeline (detector and
Hungarian numbering, without SAM: SAM is the same for both and would only add time).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from backend.detector import Detector
from backend.images import XrayImage, pixel_hash
from backend.pipeline import Pipeline, PipelineOptions
from training.dataset import LabeledImage
from training.metrics import Scores, mean_scores, score_image


def score_pipeline(pipeline: Pipeline, images: Sequence[LabeledImage], nsd: str = "sts") -> Scores:
    """Mean STS scores of `pipeline` over `images` (their masks are the ground truth)."""
    scores = []
    for item in images:
        image = XrayImage(item.pixels, pixel_hash(item.pixels), item.key)
        pred = {inst.label: inst.mask for inst in pipeline.run(image)}
        scores.append(score_image(pred, item.masks, nsd=nsd))
    return mean_scores(scores)


def score_weights(weights: Path, images: Sequence[LabeledImage], min_score: float = 0.25) -> Scores:
    """Load weights as the backend does and score detector + numbering (no SAM)."""
    pipeline = Pipeline(Detector.load(weights), None, PipelineOptions(min_score=min_score, use_sam=False))
    return score_pipeline(pipeline, images)


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate: Scores
    current: Scores | None


def gate(candidate: Scores, current: Scores | None, tolerance: float = 0.01) -> GateDecision:
    """Promote when there is no current model, or the candidate's primary score is not worse than
    the current's by more than `tolerance`."""
    if current is None:
        return GateDecision(True, f"first model: primary {candidate.primary:.4f}", candidate, None)
    delta = candidate.primary - current.primary
    if delta >= -tolerance:
        return GateDecision(True, f"primary {candidate.primary:.4f} vs current {current.primary:.4f} "
                                  f"({delta:+.4f}, tolerance {tolerance})", candidate, current)
    return GateDecision(False, f"candidate primary {candidate.primary:.4f} is worse than current "
                               f"{current.primary:.4f} by {-delta:.4f} (> tolerance {tolerance})", candidate, current)
