"""Preprocessing shared by training and prediction (paper, section 2.1).

Pixels are scaled to [0, 1], then standardised with the training split's global mean and
standard deviation: x' = (x - mean) / std. The standardisation runs inside the network
(`backend.yolo_model.ToothSegModel`), so ultralytics' trainer, its validator and toothseg's
detector all apply exactly this function; `letterbox` is the detector's resize, the same as
ultralytics' predictor uses.
"""
from __future__ import annotations

import numpy as np
import torch
from ultralytics.data.augment import LetterBox


def standardise(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(B, C, H, W) pixels in [0, 1] -> (x - mean) / std, with scalar global statistics."""
    return (x - mean) / std


def pixel_statistics(images: list[np.ndarray]) -> tuple[float, float]:
    """Global (mean, std) of uint8 images' pixels scaled to [0, 1]; std floored at 1e-3."""
    total = count = 0.0
    sq = 0.0
    for img in images:
        x = np.asarray(img, dtype=np.float64) / 255.0
        total += x.sum()
        sq += np.square(x).sum()
        count += x.size
    if count == 0:
        raise ValueError("no pixels to compute normalisation statistics from")
    mean = total / count
    std = max(float(np.sqrt(max(sq / count - mean * mean, 0.0))), 1e-3)
    return float(mean), std


def letterbox(pixels: np.ndarray, imgsz: int, stride: int = 32) -> torch.Tensor:
    """(H, W) uint8 grey -> (1, 3, h, w) float tensor in [0, 1]: longest side scaled to `imgsz`,
    padded (value 114) to a multiple of `stride`, as ultralytics' predictor does."""
    rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    boxed = LetterBox((imgsz, imgsz), auto=True, stride=stride)(image=rgb)
    return torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1)))[None].float() / 255.0
