"""The simulated oracle: the annotator's work to turn pre-annotated regions into the ground truth.

Pre-annotated regions and ground-truth teeth are matched one to one by
`scipy.optimize.linear_sum_assignment`, maximising the summed IoU over the pairs whose IoU >
`MATCH_IOU` (0.1); other pairs are never matched. A matched region with IoU >= `ACCEPT_IOU` (0.9)
is accepted if its label is the tooth's, else relabeled; a matched region with a lower IoU is
redrawn (whatever its label); a ground-truth tooth without a match is added, a region without a
match deleted. The oracle's actions are relabeled + redrawn + added + deleted. Without any
pre-annotation every tooth is added: drawing an image from scratch costs as many actions as it
has teeth.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Sequence

import numpy as np

from backend.instance import Instance, mask_box

MATCH_IOU = 0.1
"""A region and a ground-truth tooth are matched only if their IoU is greater than this."""
ACCEPT_IOU = 0.9
"""A matched region with at least this IoU needs no redrawing."""


@dataclass(frozen=True)
class OracleCount:
    """What the oracle did to turn pre-annotations into ground truth: numbers of regions, and the
    summed IoU of the matched region-tooth pairs."""

    accepted: int = 0
    relabeled: int = 0
    redrawn: int = 0
    added: int = 0
    deleted: int = 0
    matched_iou: float = 0.0

    @property
    def actions(self) -> int:
        """Regions the oracle had to touch: relabeled + redrawn + added + deleted."""
        return self.relabeled + self.redrawn + self.added + self.deleted

    @property
    def mean_match_iou(self) -> float:
        """Mean IoU of the matched pairs (0 without matches): how close the redrawn regions were."""
        matched = self.accepted + self.relabeled + self.redrawn
        return self.matched_iou / matched if matched else 0.0

    def __add__(self, other: OracleCount) -> OracleCount:
        return OracleCount(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def iou_matrix(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """IoU (len(a), len(b)) of two lists of (H, W) bool masks; computed on the pair's bounding
    boxes, 0 where the boxes do not overlap."""
    from training.metrics import iou

    boxes_a, boxes_b = [mask_box(m) for m in a], [mask_box(m) for m in b]
    out = np.zeros((len(a), len(b)))
    for i, (ax1, ay1, ax2, ay2) in enumerate(boxes_a):
        for j, (bx1, by1, bx2, by2) in enumerate(boxes_b):
            if max(ax1, bx1) < min(ax2, bx2) and max(ay1, by1) < min(ay2, by2):
                crop = (slice(int(min(ay1, by1)), int(max(ay2, by2))), slice(int(min(ax1, bx1)), int(max(ax2, bx2))))
                out[i, j] = iou(a[i][crop], b[j][crop])
    return out


def oracle_count(regions: Sequence[Instance], gt: Mapping[str, np.ndarray], match_iou: float = MATCH_IOU,
                 accept_iou: float = ACCEPT_IOU) -> OracleCount:
    """The oracle's work on one image: `regions` (pre-annotation; duplicate labels allowed) against
    `gt` ({FDI label: (H, W) bool mask}; empty masks ignored). Matching rule: module docstring."""
    from scipy.optimize import linear_sum_assignment

    labels = [label for label, mask in gt.items() if mask.any()]
    ious = iou_matrix([r.mask for r in regions], [gt[label] for label in labels])
    ious[ious <= match_iou] = 0.0  # not a candidate pair
    rows, cols = linear_sum_assignment(ious, maximize=True) if ious.size else ((), ())
    matches = [(i, j) for i, j in zip(rows, cols) if ious[i, j] > match_iou]
    close = [(i, j) for i, j in matches if ious[i, j] >= accept_iou]
    accepted = sum(1 for i, j in close if regions[i].label == labels[j])
    return OracleCount(accepted=accepted, relabeled=len(close) - accepted, redrawn=len(matches) - len(close),
                       added=len(labels) - len(matches), deleted=len(regions) - len(matches),
                       matched_iou=float(sum(ious[i, j] for i, j in matches)))
