"""FDI numbering of detected teeth (paper, section 2.4).

The detector may give several candidates the same tooth label. Labels are assigned jointly
with the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`) so each label is used
at most once, minimising, over candidate i and label j:

    cost[i, j] = -log p[i, j]  +  prior_weight * min(d[i, j]^2, 9) / 2

p[i, j] is the detector's class probability. d[i, j] is the anatomical prior: how many tooth
widths candidate i's centre x lies from where label j is expected on its arch. Per arch (upper,
lower) the expected x of a label is a line x = a * arch_coordinate(label) + b fitted by robust
weighted least squares to the candidates whose top label is on that arch (weights = their top
probability), so it encodes the left-to-right order 18 ... 11 21 ... 28 (and 48 ... 38) as seen
on a panoramic image; d = (x_i - a * coord_j - b) / (a * 7 mm). The lines are then refitted to
the labels the assignment gave (`REFITS` times, or until the assignment no longer changes): a
young detector's top labels are noisy, the jointly assigned ones much less so. An arch with fewer than two
distinct top labels gets no prior. Candidates left unassigned (more than 52) are dropped.

Which candidates are teeth: with tooth scores (a detector with the tooth super-class,
`backend.detector`), candidates whose tooth score is below `min_score` are dropped before the
assignment, and the class probabilities only choose the label (each row normalised to sum 1), so
a tooth whose number is uncertain is still kept; its score is the tooth score. Without them (any
YOLOv8-seg with FDI classes), a candidate is dropped when its assigned probability is below
`min_score`, and that probability is its score.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from backend import fdi

_COORD = np.array([fdi.arch_coordinate(label) for label in fdi.FDI_LABELS])
_UPPER = np.array([fdi.is_upper(label) for label in fdi.FDI_LABELS])
_TOOTH_MM = 7.0  # one typical tooth width: the unit of the positional prior
_MAX_PRIOR = 9.0  # cap of the squared distance: three tooth widths off costs as much as further
REFITS = 2
"""Times the arch lines are refitted to the assigned labels and the assignment redone."""


@dataclass(frozen=True)
class Assignment:
    """Candidate `index` numbered `label` with probability `score`."""

    index: int
    label: str
    score: float


def fit_arch(x: np.ndarray, coord: np.ndarray, weight: np.ndarray) -> tuple[float, float] | None:
    """Robust weighted fit x ~ a * coord + b (pixels per mm, pixels); None if under-determined
    or not increasing left to right. Points off by more than 2.5 median residuals are dropped
    once and the line refitted."""
    if len(np.unique(coord)) < 2:
        return None
    keep = np.ones(len(x), bool)
    for _ in range(2):
        if len(np.unique(coord[keep])) < 2:
            return None
        a, b = np.polyfit(coord[keep], x[keep], 1, w=np.sqrt(weight[keep]))
        resid = np.abs(x - (a * coord + b))
        scale = max(float(np.median(resid[keep])), abs(a) * _TOOTH_MM / 4)
        keep = resid <= 2.5 * scale
    return (float(a), float(b)) if a > 0 else None


def position_cost(boxes: np.ndarray, probs: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """(n, 52) squared positional misfit, capped, halved; 0 for arches without a fit.

    boxes: (n, 4) x1, y1, x2, y2 pixels. probs: (n, 52) class probabilities in FDI class order.
    labels: (n,) class indices the arch lines are fitted to (default: each candidate's top class),
    weighted by their probabilities.
    """
    n = len(boxes)
    cost = np.zeros((n, len(fdi.FDI_LABELS)))
    if n == 0:
        return cost
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    top = probs.argmax(axis=1) if labels is None else np.asarray(labels, dtype=int)
    top_p = probs[np.arange(n), top]
    for upper in (True, False):
        members = _UPPER[top] == upper
        fit = fit_arch(cx[members], _COORD[top[members]], top_p[members]) if members.any() else None
        if fit is None:
            continue
        a, b = fit
        cols = _UPPER == upper
        expected = a * _COORD[cols] + b  # (k,)
        d = (cx[:, None] - expected[None, :]) / (a * _TOOTH_MM)
        cost[:, cols] = np.minimum(d**2, _MAX_PRIOR) / 2.0
    return cost


def number_teeth(boxes: np.ndarray, probs: np.ndarray, prior_weight: float = 3.0,
                 min_score: float = 0.25, tooth: np.ndarray | None = None) -> list[Assignment]:
    """Give each candidate at most one FDI label and each label at most one candidate.

    boxes: (n, 4) x1, y1, x2, y2 pixels; probs: (n, 52) class probabilities (FDI class order);
    tooth: (n,) tooth scores or None (module docstring). Returns assignments sorted by label
    order, weak candidates dropped.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(boxes), len(fdi.FDI_LABELS))
    index = np.arange(len(boxes))
    if tooth is not None:
        index = index[np.asarray(tooth, dtype=np.float64).reshape(-1) >= min_score]
        boxes, probs = boxes[index], probs[index]
        probs = np.clip(probs, 1e-9, None) / np.clip(probs, 1e-9, None).sum(axis=1, keepdims=True)
    if len(boxes) == 0:
        return []
    likelihood = -np.log(np.clip(probs, 1e-9, 1.0))
    rows, cols = linear_sum_assignment(likelihood + prior_weight * position_cost(boxes, probs))
    for _ in range(REFITS if prior_weight > 0 else 0):  # refit the arch lines to the labels just assigned
        labels = probs.argmax(axis=1)
        labels[rows] = cols
        rows, refit = linear_sum_assignment(likelihood + prior_weight * position_cost(boxes, probs, labels))
        if np.array_equal(refit, cols):
            break
        cols = refit
    if tooth is not None:
        out = [Assignment(int(index[r]), fdi.FDI_LABELS[c], float(tooth[index[r]])) for r, c in zip(rows, cols)]
    else:
        out = [Assignment(int(r), fdi.FDI_LABELS[c], float(probs[r, c]))
               for r, c in zip(rows, cols) if probs[r, c] >= min_score]
    return sorted(out, key=lambda a: fdi.CLASS_INDEX[a.label])


def argmax_labels(probs: np.ndarray, min_score: float = 0.25, tooth: np.ndarray | None = None) -> list[Assignment]:
    """The plain alternative to `number_teeth` (for ablations): each candidate keeps its top
    class, duplicates included; weak candidates dropped as there (by tooth score when given)."""
    probs = np.asarray(probs, dtype=np.float64)
    out = []
    for i, row in enumerate(probs):
        j = int(row.argmax())
        score = float(row[j]) if tooth is None else float(tooth[i])
        if score >= min_score:
            out.append(Assignment(i, fdi.FDI_LABELS[j], score))
    return out
