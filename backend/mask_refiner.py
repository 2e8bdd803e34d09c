"""The learned mask refiner: a small U-Net that redraws each detected tooth's mask at full resolution.

YOLOv8-seg's masks come from prototypes at 1/4 of the network input: on a 2000 x 1000 panoramic
at imgsz 640 one prototype cell is 12 original pixels, a quarter of a tooth's width, so a tooth's
outline is off by a few pixels everywhere (median IoU 0.86 against the annotation, 0.90 after the
guided filter: `bench/results/loop.md`). The refiner is trained per project, in the retrain job
after the detector (`training.refiner_training`), on the project's own annotations: for every
detected tooth it sees a crop around the detector's box (box plus `MARGIN` on each side,
resampled to `CROP_H` x `CROP_W`) with two channels, the radiograph (standardised per crop) and
YOLO's mask probability on the same grid, and predicts the annotated mask in that crop. Its
weights travel inside the detector's checkpoint (`CHECKPOINT_KEY`), so a model version, its
rollback and every process that loads it carry the refiner that was trained with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_KEY = "toothseg_mask_refiner"
"""Key of the refiner's state in an ultralytics checkpoint dict (absent: no refiner)."""
CROP_H, CROP_W = 128, 64
"""The refiner's input grid (rows, columns); teeth are about 3 times as tall as wide."""
MARGIN = 0.15
"""Context around a box, as a fraction of its width and height on each side."""


class RefinerNet(nn.Module):
    """A 3-level U-Net: (B, 2, CROP_H, CROP_W) radiograph and YOLO probability -> (B, 1, CROP_H, CROP_W)
    mask logits. `width`: channels of the first level (doubled per level)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width

        def block(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                                 nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True))

        w = width
        self.down1, self.down2, self.bottom = block(2, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.up2, self.up1 = block(6 * w, 2 * w), block(3 * w, w)
        self.head = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.down1(x)
        b = self.down2(F.max_pool2d(a, 2))
        c = self.bottom(F.max_pool2d(b, 2))
        b = self.up2(torch.cat([F.interpolate(c, size=b.shape[2:], mode="bilinear", align_corners=False), b], 1))
        a = self.up1(torch.cat([F.interpolate(b, size=a.shape[2:], mode="bilinear", align_corners=False), a], 1))
        return self.head(a)


def crop_window(box: Sequence[float]) -> tuple[float, float, float, float]:
    """The refiner's crop (x1, y1, x2, y2, original pixels, continuous) around a box."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    return x1 - MARGIN * w, y1 - MARGIN * h, x2 + MARGIN * w, y2 + MARGIN * h


def crop_affine(window: Sequence[float]) -> np.ndarray:
    """(2, 3) affine from original pixel indices to crop-grid indices (pixel centres map to
    pixel centres: index i covers [i, i + 1))."""
    x1, y1, x2, y2 = window
    sx, sy = CROP_W / max(x2 - x1, 1e-6), CROP_H / max(y2 - y1, 1e-6)
    return np.array([[sx, 0.0, sx * (0.5 - x1) - 0.5], [0.0, sy, sy * (0.5 - y1) - 0.5]], dtype=np.float32)


def crop_image(pixels: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """(CROP_H, CROP_W) float32 crop of an (H, W) uint8 image, standardised by the crop's own mean
    and standard deviation (zero outside the image before standardising)."""
    crop = cv2.warpAffine(pixels.astype(np.float32) / 255.0, crop_affine(window), (CROP_W, CROP_H),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return (crop - crop.mean()) / max(float(crop.std()), 1e-3)


def crop_mask(mask: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """An (H, W) bool mask on the crop grid as float32 in [0, 1] (the training target)."""
    return cv2.warpAffine(mask.astype(np.float32), crop_affine(window), (CROP_W, CROP_H), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def paste(logits: np.ndarray, window: Sequence[float], image_hw: tuple[int, int]) -> tuple[slice, slice, np.ndarray]:
    """Crop-grid logits (CROP_H, CROP_W) -> (rows, cols, bool mask) of the window's pixels in the image."""
    h, w = image_hw
    x1, y1, x2, y2 = window
    cx1, cy1 = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
    cx2, cy2 = min(int(np.ceil(x2)), w), min(int(np.ceil(y2)), h)
    shift = np.array([[0.0, 0.0, cx1], [0.0, 0.0, cy1]], dtype=np.float32)
    inverse = crop_affine(window)  # original -> crop; with WARP_INVERSE_MAP it samples the crop per pixel
    inverse[:, 2] += inverse[:, :2] @ shift[:, 2]
    full = cv2.warpAffine(logits.astype(np.float32), inverse, (max(cx2 - cx1, 0), max(cy2 - cy1, 0)),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=-1e4)
    return slice(cy1, cy2), slice(cx1, cx2), full > 0


@dataclass
class MaskRefiner:
    """A trained RefinerNet (eval mode) with the device it runs on."""

    net: RefinerNet
    steps: int = 0  # optimizer steps it was trained for (its own and its warm starts')

    def state(self) -> dict:
        """What `CHECKPOINT_KEY` holds: width, steps and the weights (CPU tensors)."""
        return {"width": self.net.width, "steps": self.steps,
                "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict, device: str | torch.device = "cpu") -> "MaskRefiner":
        net = RefinerNet(int(state["width"]))
        net.load_state_dict(state["state_dict"])
        return cls(net.to(device).eval(), int(state.get("steps") or 0))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def predict(self, inputs: np.ndarray, batch: int = 64, mirror: bool = True) -> np.ndarray:
        """(n, 2, CROP_H, CROP_W) inputs -> (n, CROP_H, CROP_W) mask logits. `mirror`: the mean of the
        logits of each crop and of its left-right mirror image (mirrored back), a test-time
        augmentation that makes the outline equivariant to mirroring (twice the refiner's cost; fewer
        teeth to redraw: `bench/results/cold_start.md`, row "without its mirror pass")."""
        out = []
        with torch.no_grad():
            for i in range(0, len(inputs), batch):
                x = torch.as_tensor(inputs[i:i + batch], device=self.device)
                logits = self.net(x)[:, 0]
                if mirror:
                    logits = (logits + self.net(x.flip(-1))[:, 0].flip(-1)) / 2
                out.append(logits.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, CROP_H, CROP_W), np.float32)
