"""Training of the learned mask refiner (`backend.mask_refiner`), the retrain job's step after the detector.

The trained detector runs on the train split; its candidate boxes are matched one to one to the
annotated teeth by box IoU (`scipy.optimize.linear_sum_assignment`, pairs with IoU >= `MATCH_IOU`),
and each pair is a training example: the refiner's input on the candidate's crop (radiograph and
YOLO's probability) against the annotated mask on the same grid. Each step draws `batch` pairs,
jitters every crop window as a detector's boxes vary (`JITTER` of the box's size per side),
mirrors half of them left-right (a crop's mask does not depend on the side; numbering does, and
the refiner does not number) and varies their contrast. Loss: binary cross-entropy plus soft Dice.
AdamW with a one-cycle schedule (any length from 1 step); a warm start continues from the current
model's refiner.
The refiner's weights are written into the detector's checkpoint (`CHECKPOINT_KEY`).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backend.mask_refiner import CHECKPOINT_KEY, MaskRefiner, RefinerNet, crop_mask, crop_window

logger = logging.getLogger(__name__)

MATCH_IOU = 0.5
"""A candidate box and an annotated tooth's box make a training pair from this IoU up."""
JITTER = 0.05
"""Standard deviation of each box side's shift, as a fraction of the box's width or height."""
SECONDS_PER_STEP_CPU = 0.27
"""Measured seconds per optimizer step (batch 16) on a 2-core CPU: what the job's budget reserves."""
SECONDS_PER_IMAGE_CPU = 1.5
"""Measured seconds to detect and match one train image on a 2-core CPU."""


@dataclass(frozen=True)
class RefinerResult:
    """pairs: training examples; steps_run; seconds; stopped_by: "steps", "budget", "no pairs" or "off"."""

    pairs: int
    steps_run: int
    seconds: float
    stopped_by: str

    def as_dict(self) -> dict:
        return {"pairs": self.pairs, "steps_run": self.steps_run, "seconds": round(self.seconds, 1),
                "stopped_by": self.stopped_by}


def reserve_seconds(steps: int, train_images: int, device: str) -> float:
    """Seconds of a job's budget kept for the refiner (CPU figures; a GPU needs less)."""
    if steps <= 0:
        return 0.0
    return steps * SECONDS_PER_STEP_CPU + train_images * SECONDS_PER_IMAGE_CPU


def training_pairs(detector, images: Sequence) -> list[tuple]:
    """(candidates, candidate index, pixels, annotated mask) for every matched tooth of `images`
    (`DatasetItem`s: pixels and {label: mask})."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_iou

    from backend.instance import mask_box

    pairs = []
    for item in images:
        masks = [m for m in item.masks.values() if m.any()]
        pixels = item.pixels()
        candidates = detector.detect(pixels)
        if not masks or not len(candidates):
            continue
        gt_boxes = np.array([mask_box(m) for m in masks], dtype=np.float64)
        ious = box_iou(torch.as_tensor(candidates.boxes), torch.as_tensor(gt_boxes)).numpy()
        rows, cols = linear_sum_assignment(ious, maximize=True)
        pairs += [(candidates, int(i), pixels, masks[j]) for i, j in zip(rows, cols) if ious[i, j] >= MATCH_IOU]
    return pairs


def _jitter(box: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w, h = box[2] - box[0], box[3] - box[1]
    return box + rng.normal(0.0, JITTER, 4) * np.array([w, h, w, h])


def _batch(pairs: Sequence[tuple], rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for k in rng.integers(0, len(pairs), size):
        candidates, index, pixels, mask = pairs[k]
        window = crop_window(_jitter(candidates.boxes[index], rng))
        x = candidates.refiner_inputs([index], pixels, [window])[0]
        y = crop_mask(mask, window)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        x = np.ascontiguousarray(x)
        x[0] = x[0] * rng.uniform(0.8, 1.25) + rng.normal(0.0, 0.1)
        xs.append(x)
        ys.append(np.ascontiguousarray(y))
    return torch.as_tensor(np.stack(xs)), torch.as_tensor(np.stack(ys))[:, None]


def train_refiner(weights: Path, images: Sequence, steps: int, device: str = "cpu",
                  deadline: float | None = None, warm: MaskRefiner | None = None, batch: int = 16,
                  lr: float = 3e-3, seed: int = 0, on_step: Callable[[int, int], None] | None = None) -> RefinerResult:
    """Train a refiner for the detector `weights` on `images` (its train split) for `steps`
    optimizer steps or until `deadline` (time.monotonic seconds), starting from `warm` when given,
    and write it into `weights`. Nothing is written when no step ran."""
    from backend.detector import Detector

    start = time.monotonic()
    if steps <= 0:  # TRAIN_REFINER_STEPS=0: no refiner, and no detection pass to collect pairs for it
        return RefinerResult(0, 0, 0.0, "off")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    detector = Detector.load(weights, device=device)
    pairs = training_pairs(detector, images)
    if not pairs:
        return RefinerResult(0, 0, time.monotonic() - start, "no pairs")
    net = RefinerNet()
    prior_steps = 0
    if warm is not None:
        net.load_state_dict(warm.net.state_dict())
        prior_steps = warm.steps
    net = net.to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = one_cycle(optimizer, lr, steps)
    run, stopped_by = 0, "steps"
    for step in range(steps):
        if deadline is not None and time.monotonic() >= deadline:
            stopped_by = "budget"
            break
        x, y = _batch(pairs, rng, batch)
        x, y = x.to(device), y.to(device)
        loss = mask_loss(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        run = step + 1
        if on_step is not None:
            on_step(run, steps)
    seconds = time.monotonic() - start
    if run:
        add_to_checkpoint(weights, CHECKPOINT_KEY, MaskRefiner(net.eval(), prior_steps + run).state())
    logger.info("mask refiner: %d steps on %d pairs in %.0f s (%s)", run, len(pairs), seconds, stopped_by)
    return RefinerResult(len(pairs), run, seconds, stopped_by)


def one_cycle(optimizer: torch.optim.Optimizer, lr: float, steps: int):
    """A one-cycle schedule of `steps` steps, its warm-up at least 2.5 steps long (shorter ones
    divide by zero in torch); None (a constant rate) under 3 steps."""
    if steps < 3:
        return None
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=max(0.1, 2.5 / steps))


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice of (n, 1, H, W) mask logits against 0/1 targets."""
    p = logits.sigmoid()
    dice = (2 * (p * targets).sum((2, 3)) + 1) / (p.sum((2, 3)) + targets.sum((2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, targets) + (1 - dice).mean()


def add_to_checkpoint(weights: Path, key: str, value) -> None:
    """Set `key` in the detector's checkpoint at `weights` (replaced atomically)."""
    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
    checkpoint[key] = value
    tmp = Path(f"{weights}.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, weights)
