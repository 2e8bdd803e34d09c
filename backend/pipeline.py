"""The inference pipeline for one image: detector -> FDI numbering -> SAM refinement -> instances."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from backend.detector import Detector
from backend.images import XrayImage
from backend.instance import Instance, mask_box
from backend.numbering import MIDLINE_WEIGHT, OCCLUSAL_WEIGHT, PRIOR_WEIGHT, argmax_labels, number_teeth
from backend.settings import Settings
from backend.timing import StageTimer

if TYPE_CHECKING:  # segment_anything (and torchvision) load with SAM, not with the app
    from backend.sam import SamRefiner

logger = logging.getLogger(__name__)


@dataclass
class PipelineOptions:
    """min_score: weakest tooth score numbered (SCORE_THRESHOLD); anchor_score: the candidates numbered
    first, the weaker ones taking the labels left (SCORE_ANCHOR; None: all together); fallback_score:
    the weakest on an image where no candidate reaches min_score (SCORE_FALLBACK; 0: none);
    prior_weight, occlusal_weight, arch_search: the numbering's anatomical priors
    (`backend.numbering`); hungarian: False numbers each candidate by its top class (ablation);
    use_sam: refine with SAM when a refiner is loaded; refine_masks: redraw YOLO's masks on the
    image, with the model's learned mask refiner (`backend.mask_refiner`) when it has one and
    `mask_refiner` is on, else by snapping them to the image's edges
    (`backend.detector.guided_filter`); refiner_mirror: the refiner averages each crop with its mirror image."""

    min_score: float = 0.4
    anchor_score: float | None = 0.5
    fallback_score: float = 0.2
    prior_weight: float = PRIOR_WEIGHT
    occlusal_weight: float = OCCLUSAL_WEIGHT
    arch_search: bool = True
    midline_weight: float = MIDLINE_WEIGHT
    hungarian: bool = True
    use_sam: bool = True
    refine_masks: bool = True
    mask_refiner: bool = True
    refiner_mirror: bool = True

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> "PipelineOptions":
        """The options the backend serves with (SCORE_THRESHOLD, MASK_REFINE, SAM_PREANNOTATE, ...), then
        `overrides`."""
        return cls(**{"min_score": settings.score_threshold, "anchor_score": settings.score_anchor,
                      "fallback_score": settings.score_fallback, "use_sam": settings.sam_preannotate,
                      "refine_masks": settings.mask_refine, **overrides})


def image_min_score(tooth: np.ndarray | None, min_score: float, fallback_score: float) -> float:
    """The weakest tooth score one image's pre-annotation keeps: `min_score`, or `fallback_score` when
    none of the image's candidates reaches it (tooth scores only: other weights keep `min_score`)."""
    if tooth is None or fallback_score <= 0 or np.any(np.asarray(tooth) >= min_score):
        return min_score
    return min(fallback_score, min_score)


class Pipeline:
    """YOLOv8-seg candidates, numbered with the Hungarian algorithm, masks refined by SAM."""

    def __init__(self, detector: Detector, refiner: SamRefiner | None = None,
                 options: PipelineOptions | None = None):
        self.detector = detector
        self.refiner = refiner
        self.options = options or PipelineOptions()

    def run(self, image: XrayImage, timer: StageTimer | None = None) -> list[Instance]:
        """One image -> numbered tooth instances (masks at the original size), in FDI order."""
        timer = timer or StageTimer()
        proposal = self.propose(image, timer)
        masks = proposal.masks
        if self.refiner is not None and self.options.use_sam and len(proposal.boxes):
            masks = self.refiner.refine(image.pixels, image.sha1, proposal.boxes, masks, timer).masks
        return proposal.instances(masks)

    def propose(self, image: XrayImage, timer: StageTimer | None = None) -> "Proposal":
        """The detector's numbered teeth, their boxes and their masks before SAM."""
        timer = timer or StageTimer()
        opts = self.options
        with timer.stage("preprocess"):
            x = self.detector.prepare(image.pixels)
        with timer.stage("detector"):
            candidates = self.detector.forward(x, image.pixels.shape[:2])
        with timer.stage("numbering"):
            tooth = candidates.tooth if self.detector.tooth_column is not None else None
            min_score = image_min_score(tooth, opts.min_score, opts.fallback_score)
            if opts.hungarian:
                numbered = number_teeth(candidates.boxes, candidates.probs, opts.prior_weight, min_score, tooth,
                                        opts.occlusal_weight, opts.arch_search, opts.midline_weight, opts.anchor_score)
            else:
                numbered = argmax_labels(candidates.probs, min_score, tooth)
        with timer.stage("masks"):
            indices = [a.index for a in numbered]
            masks = candidates.masks(indices, image.pixels if opts.refine_masks else None, opts.mask_refiner,
                                     opts.refiner_mirror)
        boxes = candidates.boxes[indices] if indices else np.zeros((0, 4))
        return Proposal(numbered, boxes, masks)


@dataclass
class Proposal:
    """One image's numbered teeth (`backend.numbering` assignments), their detector boxes (k, 4) and
    masks (k, H, W) bool before SAM."""

    numbered: list
    boxes: np.ndarray
    masks: np.ndarray

    def instances(self, masks: np.ndarray | None = None) -> list[Instance]:
        """The teeth with `masks` (default: the proposal's own), empty masks left out."""
        masks = self.masks if masks is None else masks
        return [Instance(mask=mask, label=a.label, score=a.score, box=mask_box(mask))
                for a, mask in zip(self.numbered, masks) if mask.any()]
