"""Fine-tuning SAM on the annotators' teeth: its prompt encoder and mask decoder (issue 44).

Every annotated tooth is a (box, mask) pair. The image encoder stays frozen, so each image is
encoded once (`SamRefiner.set_image`: from the embedding cache when pre-annotation or an earlier
retrain already encoded it, keyed by the pixels' hash and the checkpoint) and every step costs
prompt-encoder and mask-decoder passes only. Each step draws `images_per_step` images and up to
`boxes_per_image` of their teeth, jitters each box as a detector's boxes vary (`JITTER` of its size
per side, as the mask refiner is trained) and compares SAM's single-mask output at its low
resolution with the annotated mask on the same grid: binary cross-entropy plus soft Dice, and the
IoU head against the IoU the mask reached (the pipeline's `SAM_MIN_IOU` reads that head). AdamW
with a one-cycle schedule.

The tuned decoder's state (`decoder_state`) holds the prompt encoder and mask decoder only: the
encoder, and so the embeddings, stay the shipped checkpoint's. The retrain job (TRAIN_SAM_STEPS > 0)
gates it (`gate_sam`): on the validation split, from the new detector's boxes, the tuned SAM's masks
against the current one's (the current version's tuned SAM, else the shipped one), by the STS
instance Dice and instance NSD. A tuned SAM that scores lower is not promoted: the new version
carries the current version's tuned SAM instead (or none: the shipped one serves). The same
validation images choose the acceptance thresholds between SAM's masks and the learned refiner's
(`backend.sam.choose`: SAM_MIN_IOU, SAM_MIN_AGREEMENT) for the SAM the version carries. The
decoder and its thresholds go into the new detector's checkpoint (`write_decoder`,
`backend.detector.SAM_DECODER_KEY`), so a version, its rollback and `toothseg models show` carry
them; the backend serves them with that version (`Runtime.refiner_for`).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backend.detector import SAM_DECODER_KEY, Detector
from backend.images import XrayImage, pixel_hash
from backend.instance import mask_box
from backend.pipeline import Pipeline, PipelineOptions
from backend.sam import SamRefiner, choose
from training.refiner_training import JITTER, add_to_checkpoint, mask_loss, one_cycle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamTuneResult:
    """teeth: training pairs; images; steps_run; seconds; stopped_by: "steps", "budget" or "no teeth"."""

    teeth: int
    images: int
    steps_run: int
    seconds: float
    stopped_by: str

    def as_dict(self) -> dict:
        return {"teeth": self.teeth, "images": self.images, "steps_run": self.steps_run,
                "seconds": round(self.seconds, 1), "stopped_by": self.stopped_by}


@dataclass
class _Image:
    """One annotated image as SAM sees it: its embedding, its teeth's boxes (k, 4) in the encoder's
    input frame, and their masks (k, 1, L, L) on the decoder's low-resolution grid."""

    features: torch.Tensor
    boxes: torch.Tensor
    targets: torch.Tensor


def _low_res_targets(masks: Sequence[np.ndarray], input_size: tuple[int, int], img_size: int,
                     low_res: int) -> torch.Tensor:
    """Annotated masks (H, W) -> the decoder's low-resolution grid: resized as the image is
    (`input_size`), zero-padded to the encoder's square input, scaled to `low_res`."""
    stack = torch.as_tensor(np.stack(masks)[:, None].astype(np.float32))
    resized = F.interpolate(stack, size=input_size, mode="bilinear", align_corners=False)
    padded = F.pad(resized, (0, img_size - input_size[1], 0, img_size - input_size[0]))
    return (F.interpolate(padded, size=(low_res, low_res), mode="area") > 0.5).float()


def tuning_images(refiner: SamRefiner, items: Sequence) -> list[_Image]:
    """The annotated `items` (`DatasetItem`s: pixels and {label: mask}) as SAM sees them; each
    image's embedding from `refiner`'s cache or computed once (and cached)."""
    model = refiner.predictor.model
    img_size = model.image_encoder.img_size
    low_res = 4 * model.prompt_encoder.image_embedding_size[0]
    out = []
    for item in items:
        masks = [m for m in item.masks.values() if m.any()]
        if not masks:
            continue
        pixels = item.pixels()
        with refiner.lock:
            refiner.set_image(pixels, pixel_hash(pixels))
            p = refiner.predictor
            features, original_size, input_size = p.features.detach().cpu(), p.original_size, p.input_size
            boxes = p.transform.apply_boxes_torch(
                torch.as_tensor(np.array([mask_box(m) for m in masks]), dtype=torch.float32), original_size)
        out.append(_Image(features, boxes, _low_res_targets(masks, tuple(input_size), img_size, low_res)))
    return out


def _jitter(boxes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + torch.randn(boxes.shape, generator=generator) * JITTER * size


def decode(model, features: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's single-mask low-resolution logits (k, 1, L, L) and predicted IoUs (k,) for boxes
    (k, 4) in the input frame on one image's embedding (1, C, h, w); differentiable."""
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
    logits, iou = model.mask_decoder(image_embeddings=features, image_pe=model.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=False)
    return logits, iou[:, 0]


def loss_of(logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice of the masks (the mask refiner's loss), plus the IoU head's
    squared error."""
    with torch.no_grad():
        hard = (logits > 0).float()
        inter = (hard * targets).sum((1, 2, 3))
        iou = inter / ((hard + targets).clamp(max=1).sum((1, 2, 3))).clamp(min=1)
    return mask_loss(logits, targets) + F.mse_loss(iou_pred, iou)


SECONDS_PER_STEP_CPU = 4.3
"""Measured seconds per step (1 image x 16 teeth, forward and backward) of LiteMedSAM's decoder on
a 2-core CPU (12 steps in 51 s on 20 encoded pool images): what a retrain's budget reserves, with
SECONDS_PER_IMAGE_CPU per image to encode and GATE_SECONDS_PER_IMAGE_CPU per validation image."""
SECONDS_PER_IMAGE_CPU = 1.2
GATE_SECONDS_PER_IMAGE_CPU = 6.0
"""Seconds per validation image of `gate_sam` on a 2-core CPU: the detector, the encoder once, the
decoder for the current and the tuned SAM, the scores of both and of the threshold pairs."""


def reserve_seconds(steps: int, train_images: int, val_images: int = 0) -> float:
    """Seconds of a retrain's budget kept for tuning and gating SAM (CPU figures; a GPU needs less)."""
    if steps <= 0:
        return 0.0
    return steps * SECONDS_PER_STEP_CPU + train_images * SECONDS_PER_IMAGE_CPU + val_images * GATE_SECONDS_PER_IMAGE_CPU


def tune_sam(refiner: SamRefiner, items: Sequence, steps: int, deadline: float | None = None, lr: float = 3e-4,
             images_per_step: int = 1, boxes_per_image: int = 16, seed: int = 0) -> tuple[SamTuneResult, dict | None]:
    """Tune a copy of `refiner`'s prompt encoder and mask decoder on the annotated `items` for
    `steps` optimizer steps or until `deadline` (time.monotonic seconds). Returns the result and the
    tuned `decoder_state` (None when no step ran); `refiner` itself is left as it was. The defaults
    were chosen on the pool (a one-off comparison, tuned on 20 UFBA-425 pool images, 30 pool
    validation images): 12 steps of 1 image x 16 teeth at lr 3e-4 (51 s) drew the teeth as well as
    30 steps of 2 x 16 at 1e-4 (301 s), tooth Dice 0.878 both; bench/bench_sam_tuning.py measures
    them on held-out images."""
    start = time.monotonic()
    images = tuning_images(refiner, items)
    teeth = sum(len(im.boxes) for im in images)
    if not teeth or steps <= 0:
        stopped_by = "no teeth" if not teeth else "steps"
        return SamTuneResult(teeth, len(images), 0, time.monotonic() - start, stopped_by), None
    model = copy.deepcopy(refiner.predictor.model).cpu()
    model.image_encoder.requires_grad_(False)
    trained = [*model.prompt_encoder.parameters(), *model.mask_decoder.parameters()]
    model.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=1e-4)
    schedule = one_cycle(optimizer, lr, steps)
    run, stopped_by = 0, "steps"
    for step in range(steps):
        if deadline is not None and time.monotonic() >= deadline:
            stopped_by = "budget"
            break
        optimizer.zero_grad()
        for k in torch.randint(len(images), (images_per_step,), generator=generator).tolist():
            image = images[k]  # one image's graph at a time: its gradients add up, its activations go
            pick = torch.randperm(len(image.boxes), generator=generator)[:boxes_per_image]
            logits, iou_pred = decode(model, image.features, _jitter(image.boxes[pick], generator))
            (loss_of(logits, iou_pred, image.targets[pick]) / images_per_step).backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        run = step + 1
    seconds = time.monotonic() - start
    logger.info("SAM decoder: %d steps on %d teeth of %d images in %.0f s (%s)", run, teeth, len(images), seconds,
                stopped_by)
    return SamTuneResult(teeth, len(images), run, seconds, stopped_by), decoder_state(model.eval()) if run else None


def decoder_state(model) -> dict:
    """The tuned part of a SAM: its prompt encoder's and mask decoder's weights."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()
            if name.startswith(("prompt_encoder.", "mask_decoder."))}


def write_decoder(weights: Path, state: dict, base: str, training: dict,
                  thresholds: tuple[float, float] | None = None) -> None:
    """Add a tuned decoder (`state`, tuned from the SAM checkpoint `base`; `training`: how,
    `SamTuneResult.as_dict`) and its acceptance thresholds (min_iou, min_agreement; None: the
    settings') to the detector's checkpoint at `weights` (replaced atomically)."""
    entry = {"base": base, "state": state, "training": training}
    if thresholds is not None:
        entry["thresholds"] = {"min_iou": thresholds[0], "min_agreement": thresholds[1]}
    add_to_checkpoint(weights, SAM_DECODER_KEY, entry)


THRESHOLD_PAIRS = ((0.75, 0.5), (0.0, 0.5), (0.0, 0.8), (0.75, 0.0), (0.75, 0.8), (0.85, 0.0), (0.85, 0.8),
                   (0.9, 0.0), (0.9, 0.8))
"""(SAM_MIN_IOU, SAM_MIN_AGREEMENT) pairs a version's thresholds are chosen from: bench_sam's grid less
0.85 / 0.5 and 0.9 / 0.5, which took the same masks as 0.85 / 0 and 0.9 / 0 in
bench/results/sam-tuning-pool.md; the shipped pair first, so it is kept on a tie."""


@dataclass(frozen=True)
class SamGate:
    """`gate_sam`'s decision. promote: the tuned SAM serves the new version; current, tuned: their
    mean instance Dice and instance NSD on the validation images; thresholds: (min_iou,
    min_agreement) chosen for the SAM that serves; teeth: the detector's numbered teeth scored."""

    promote: bool
    reason: str
    current: dict
    tuned: dict
    thresholds: tuple[float, float]
    teeth: int

    def as_dict(self) -> dict:
        return {"promoted": self.promote, "gate": self.reason, "current": self.current, "tuned": self.tuned,
                "thresholds": {"min_iou": self.thresholds[0], "min_agreement": self.thresholds[1]},
                "val_teeth": self.teeth}


def _sam_scores(scores: list) -> dict:
    return {"instance_dice": round(float(np.mean([s.instance_dice for s in scores])), 4),
            "instance_nsd": round(float(np.mean([s.instance_nsd for s in scores])), 4)}


def _score(means: dict) -> float:
    return (means["instance_dice"] + means["instance_nsd"]) / 2


def _val_teeth(pipeline: Pipeline, item, from_truth: bool) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """One validation image's teeth to prompt SAM with: (labels, boxes (k, 4), the served masks
    without SAM or None): the detector's numbered teeth, or (`from_truth`) the annotated teeth's
    boxes, as an annotator's boxes are."""
    if from_truth:
        labels = [label for label, mask in sorted(item.masks.items()) if mask.any()]
        return labels, np.array([mask_box(item.masks[label]) for label in labels], float).reshape(-1, 4), None
    proposal = pipeline.propose(XrayImage.of(item.pixels(), item.name))
    return [a.label for a in proposal.numbered], proposal.boxes, proposal.masks


def gate_sam(detector: Detector, current: SamRefiner, tuned: SamRefiner, val_items: Sequence,
             options: PipelineOptions) -> SamGate:
    """Tuned SAM against current SAM on the validation `val_items` (`DatasetItem`s), from the boxes of
    `detector` (numbered by the pipeline with `options`, as served; from the annotated teeth's boxes
    when it numbers none there): the STS instance Dice and instance NSD of each SAM's masks. The mean
    of both decides; a tie keeps the tuned SAM, a lower score or no validation tooth the current.
    Then, from the detector's boxes, the acceptance thresholds (`THRESHOLD_PAIRS`) that score best
    for the SAM that serves, its masks chosen against the learned refiner's (`backend.sam.choose`);
    from the annotated boxes that SAM's own thresholds stay."""
    from training.metrics import score_image

    pipeline = Pipeline(detector, None, options)
    teeth = [_val_teeth(pipeline, item, False) for item in val_items]
    source = "the detector's boxes"
    if not any(len(labels) for labels, _, _ in teeth):
        teeth = [_val_teeth(pipeline, item, True) for item in val_items]
        source = "the annotated teeth's boxes (the detector numbers none there)"
    count = sum(len(labels) for labels, _, _ in teeth)
    if not count:
        empty = {"instance_dice": 0.0, "instance_nsd": 0.0}
        return SamGate(False, f"no tooth on {len(val_items)} validation image(s): the current SAM stays",
                       empty, empty, (current.min_iou, current.min_agreement), 0)
    sam = []  # per image: {name: (masks, ious)}
    for item, (_, boxes, _) in zip(val_items, teeth):
        pixels = item.pixels()
        sam.append({name: refiner.sam_masks(pixels, pixel_hash(pixels), boxes)
                    for name, refiner in (("current", current), ("tuned", tuned))})

    def scores(masks_of) -> dict:
        return _sam_scores([score_image({label: m for label, m in zip(labels, masks_of(i)) if m.any()}, item.masks)
                            for i, (item, (labels, _, _)) in enumerate(zip(val_items, teeth))])

    means = {name: scores(lambda i, name=name: sam[i][name][0]) for name in ("current", "tuned")}
    c, t = _score(means["current"]), _score(means["tuned"])
    promote = t >= c
    versus = (f"tuned SAM (instance Dice + NSD) / 2 {t:.4f} vs current {c:.4f} from {source}, {count} teeth on "
              f"{len(val_items)} validation image(s)")
    reason = versus if promote else f"{versus}: lower, not promoted; the current SAM stays"
    serving = tuned if promote else current
    thresholds = (serving.min_iou, serving.min_agreement)
    if teeth[0][2] is not None:  # the detector's boxes: the served masks without SAM to choose against
        name = "tuned" if promote else "current"
        thresholds = max(THRESHOLD_PAIRS, key=lambda pair: _score(scores(
            lambda i: choose(*sam[i][name], teeth[i][2], *pair).masks)))
    return SamGate(promote, reason, means["current"], means["tuned"], thresholds, count)
