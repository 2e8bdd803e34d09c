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
writes it into the new detector's checkpoint (`write_decoder`, `backend.detector.SAM_DECODER_KEY`),
so a version, its rollback and `toothseg models show` carry it; the backend serves it with that
version (`Runtime.refiner_for`).
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

from backend.detector import SAM_DECODER_KEY
from backend.images import pixel_hash
from backend.instance import mask_box
from backend.sam import SamRefiner
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


SECONDS_PER_STEP_CPU = 8.5
"""Measured seconds per step (2 images x 16 teeth, forward and backward) of LiteMedSAM's decoder on
a 2-core CPU (bench/results/sam-tuning-pool.md: 30 steps and 20 images encoded in 278 s): what a
retrain's budget reserves, with SECONDS_PER_IMAGE_CPU per image to encode."""
SECONDS_PER_IMAGE_CPU = 1.2


def reserve_seconds(steps: int, train_images: int) -> float:
    """Seconds of a retrain's budget kept for tuning SAM (CPU figures; a GPU needs less)."""
    return steps * SECONDS_PER_STEP_CPU + train_images * SECONDS_PER_IMAGE_CPU if steps > 0 else 0.0


def tune_sam(refiner: SamRefiner, items: Sequence, steps: int, deadline: float | None = None, lr: float = 1e-4,
             images_per_step: int = 2, boxes_per_image: int = 16, seed: int = 0) -> tuple[SamTuneResult, dict | None]:
    """Tune a copy of `refiner`'s prompt encoder and mask decoder on the annotated `items` for
    `steps` optimizer steps or until `deadline` (time.monotonic seconds). Returns the result and the
    tuned `decoder_state` (None when no step ran); `refiner` itself is left as it was."""
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
        loss = torch.zeros(())
        for k in torch.randint(len(images), (images_per_step,), generator=generator).tolist():
            image = images[k]
            pick = torch.randperm(len(image.boxes), generator=generator)[:boxes_per_image]
            logits, iou_pred = decode(model, image.features, _jitter(image.boxes[pick], generator))
            loss = loss + loss_of(logits, iou_pred, image.targets[pick]) / images_per_step
        optimizer.zero_grad()
        loss.backward()
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


def write_decoder(weights: Path, state: dict, base: str, result: SamTuneResult) -> None:
    """Add a tuned decoder (`state`, tuned from the SAM checkpoint `base`) to the detector's
    checkpoint at `weights` (replaced atomically)."""
    add_to_checkpoint(weights, SAM_DECODER_KEY, {"base": base, "state": state, "training": result.as_dict()})
