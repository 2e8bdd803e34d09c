"""The record that crosses module boundaries: one tooth instance."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Box = tuple[float, float, float, float]
"""(x1, y1, x2, y2) in pixels of the original image; x2, y2 exclusive."""


def mask_box(mask: np.ndarray) -> Box:
    """Tight box (x1, y1, x2, y2) around a (H, W) boolean mask; (0, 0, 0, 0) if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    xs = np.flatnonzero(mask.any(axis=0))
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


@dataclass
class Instance:
    """One tooth: its mask at the original image size, its FDI label and a confidence.

    mask: (H, W) bool, original image pixels. box: (x1, y1, x2, y2) pixels, derived from the
    mask when not given. label: FDI string ("11"-"85"). score: confidence in [0, 1].
    """

    mask: np.ndarray
    label: str
    score: float = 1.0
    box: Box | None = field(default=None)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 2:
            raise ValueError(f"Instance mask must be (H, W), got shape {self.mask.shape}")
        if self.box is None:
            self.box = mask_box(self.mask)
        self.score = float(self.score)

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def center_x(self) -> float:
        x1, _, x2, _ = self.box
        return (x1 + x2) / 2.0
