"""FDI numbering of detected teeth (paper, section 2.4).

The detector may give several candidates the same tooth label. Labels are assigned jointly
with the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`) so each label is used
at most once, minimising, over candidate i and label j:

    cost[i, j] = -log p[i, j]  +  occlusal_weight * o[i, j]  +  prior_weight * min(d[i, j]^2, 9) / 2

p[i, j] is the detector's class probability. Two anatomical priors use the panoramic's geometry:

- o[i, j], the occlusal plane (`occlusal_cost`): a curve y = f(x) (quadratic) is fitted between the
  upper teeth's lower box edges and the lower teeth's upper edges, trimmed of the teeth that lie
  away from it (unerupted buds). A candidate whose centre lies on the other side of the curve than
  label j's arch costs up to 1; a crown far from the curve (more than 0.3 of its box height, fully
  at 0.6) is an unerupted permanent bud, and costs up to 1 for deciduous labels.
- d[i, j], the order along the arch: how many tooth widths candidate i's centre x lies from where
  label j is expected on its arch. Per arch (upper, lower) the expected x of a label is a line
  x = a * arch_coordinate(label) + b, which encodes the left-to-right order 18 ... 11 21 ... 28 (and
  48 ... 38) and the gaps of missing teeth; d = (x_i - a * coord_j - b) / (a * 7 mm). The lines are
  found by search (`search_arches`): over a grid of scales a (around the median box width / 7.5 mm)
  and midlines b, the pair whose Hungarian assignments of each arch's candidates cost least, plus a
  cost for upper and lower midlines apart (`MIDLINE_WEIGHT`: the two dental midlines nearly
  coincide, so an arch numbered a tooth off across its midline is pulled back by the other). A
  young detector's top labels are often shifted by a tooth where one is missing, so a line fitted
  to them keeps the shift; the search does not depend on them. The lines are then refitted by
  robust weighted least squares (`fit_arch`) to the labels the assignment gave (`REFITS` times, or
  until the assignment no longer changes). An arch with fewer than two candidates gets no prior.

`arch_search=False` fits the first lines to each candidate's top label instead of searching
(ablation). Candidates left unassigned (more than 52) are dropped. The weights and the search grid
were chosen on the candidates of trained models: `bench/bench_numbering.py`,
`bench/results/numbering.md`.

Which candidates are teeth: with tooth scores (a detector with the tooth super-class,
`backend.detector`), candidates whose tooth score is below `min_score` are dropped before the
assignment, and the class probabilities only choose the label (each row normalised to sum 1), so
a tooth whose number is uncertain is still kept; its score is the tooth score. With `anchor_score`
(SCORE_ANCHOR) above `min_score`, the candidates scoring at least it are numbered first, alone, and
the weaker ones take the labels they left: a weak duplicate sure of a label cannot push a confident
tooth off it. Without tooth scores (any YOLOv8-seg with FDI classes), a candidate is dropped when
its assigned probability is below `min_score`, and that probability is its score.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from backend import fdi

_COORD = np.array([fdi.arch_coordinate(label) for label in fdi.FDI_LABELS])
_UPPER = np.array([fdi.is_upper(label) for label in fdi.FDI_LABELS])
_DECIDUOUS = np.array([fdi.is_deciduous(label) for label in fdi.FDI_LABELS])
_TOOTH_MM = 7.0  # one typical tooth width: the unit of the positional prior
_MAX_PRIOR = 9.0  # cap of the squared distance: three tooth widths off costs as much as further
REFITS = 2
"""Times the arch lines are refitted to the assigned labels and the assignment redone."""
PRIOR_WEIGHT = 20.0
"""Weight of the order-along-the-arch prior d."""
OCCLUSAL_WEIGHT = 10.0
"""Weight of the occlusal-plane prior o."""
MIDLINE_WEIGHT = 10.0
"""Weight of the search's cost of upper and lower midlines apart (`search_arches`)."""
_BOX_MM = 7.5  # a typical tooth's box width, mm: the search's first guess of the scale
_SCALES = np.geomspace(0.6, 1.6, 25)  # search grid: scale a relative to that guess
_MIDLINES = 81  # search grid: midline b, evenly from the leftmost to the rightmost candidate
_BUD_GAP = (0.3, 0.6)  # crown-to-curve distance, box heights: a bud's cost starts, and is full


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


def _arch_misfit(cx: np.ndarray, upper: bool, a: float, b: float) -> np.ndarray:
    """(n, labels of the arch) squared distance in tooth widths from the line x = a * coord + b,
    capped, halved."""
    d = (cx[:, None] - (a * _COORD[_UPPER == upper] + b)[None, :]) / (a * _TOOTH_MM)
    return np.minimum(d**2, _MAX_PRIOR) / 2.0


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
        if fit is not None:
            cost[:, _UPPER == upper] = _arch_misfit(cx, upper, *fit)
    return cost


def _arch_grid(boxes: np.ndarray, cost: np.ndarray, upper: bool, prior_weight: float, midlines: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """One arch's search grid: for each midline b of `midlines`, (the least cost of the arch's
    Hungarian assignment with the prior of line a * coord + b added to `cost`, over the scales a of
    `_SCALES` times median box width / `_BOX_MM`; that scale). The arch's candidates are those
    cheapest on one of its labels; None with fewer than two of them."""
    cols = _UPPER == upper
    members = cost[:, cols].min(axis=1) < cost[:, ~cols].min(axis=1)
    if members.sum() < 2:
        return None
    cx = (boxes[members, 0] + boxes[members, 2]) / 2.0
    scale = float(np.median(boxes[members, 2] - boxes[members, 0])) / _BOX_MM
    base = cost[members][:, cols]
    values = np.full((len(_SCALES), len(midlines)), np.inf)
    for i, a in enumerate(scale * _SCALES):
        for k, b in enumerate(midlines):
            total = base + prior_weight * _arch_misfit(cx, upper, a, b)
            rows, cols_ = linear_sum_assignment(total)
            values[i, k] = total[rows, cols_].sum()
    best = values.argmin(axis=0)
    return values[best, np.arange(len(midlines))], (scale * _SCALES)[best]


def search_arches(boxes: np.ndarray, cost: np.ndarray, prior_weight: float,
                  midline_weight: float = MIDLINE_WEIGHT) -> dict[bool, tuple[float, float]]:
    """The arch lines x = a * coord + b (pixels per mm, midline x) found by search: {upper: (a, b)}
    for the arches with two candidates or more.

    boxes: (n, 4) pixels; cost: (n, 52) the assignment's other terms. Each arch's grid
    (`_arch_grid`: 25 scales, `_MIDLINES` midlines across all candidates' x range) gives the cost of
    its assignment per midline; the two midlines are then chosen together, costing
    `midline_weight` * min((b_upper - b_lower)^2 / w^2, 9) / 2 apart (w: the median box width),
    since the dental midlines of the two arches nearly coincide (0: each arch on its own).
    """
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    midlines = np.linspace(cx.min(), cx.max(), _MIDLINES)
    grids = {upper: _arch_grid(boxes, cost, upper, prior_weight, midlines) for upper in (True, False)}
    found = {upper: g for upper, g in grids.items() if g is not None}
    if len(found) < 2 or midline_weight <= 0:
        return {upper: (float(g[1][g[0].argmin()]), float(midlines[g[0].argmin()])) for upper, g in found.items()}
    width = float(np.median(boxes[:, 2] - boxes[:, 0]))
    apart = (midlines[:, None] - midlines[None, :]) / width
    total = found[True][0][:, None] + found[False][0][None, :] + midline_weight * np.minimum(apart**2, _MAX_PRIOR) / 2
    u, v = np.unravel_index(int(total.argmin()), total.shape)
    return {True: (float(found[True][1][u]), float(midlines[u])),
            False: (float(found[False][1][v]), float(midlines[v]))}


def occlusal_cost(boxes: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(n, 52) the occlusal-plane prior o in [0, 2] (module docstring); zeros when the curve cannot
    be fitted (fewer than two candidates on either arch, or fewer than three near the curve).

    boxes: (n, 4) x1, y1, x2, y2 pixels (y down); probs: (n, 52) class probabilities, whose summed
    upper-arch and lower-arch mass says on which arch's edge a candidate is fitted.
    """
    cost = np.zeros((len(boxes), len(fdi.FDI_LABELS)))
    upper = probs[:, _UPPER].sum(axis=1) >= probs[:, ~_UPPER].sum(axis=1)
    if upper.sum() < 2 or (~upper).sum() < 2:
        return cost
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    height = np.maximum(boxes[:, 3] - boxes[:, 1], 1.0)
    edge = np.where(upper, boxes[:, 3], boxes[:, 1])  # the edge that faces the other arch
    keep = np.ones(len(boxes), bool)
    for _ in range(3):  # fit, drop the edges away from the curve (buds, the other arch's strays), refit
        coef = np.polyfit(cx[keep], edge[keep], 2 if keep.sum() >= 6 else 1)
        keep = np.abs(edge - np.polyval(coef, cx)) <= 0.3 * np.median(height)
        if keep.sum() < 3:
            return cost
    curve = np.polyval(coef, cx)
    side = ((boxes[:, 1] + boxes[:, 3]) / 2.0 - curve) / height  # > 0: centre below the curve
    cost[:, _UPPER] += np.clip(side / 0.5, 0.0, 1.0)[:, None]
    cost[:, ~_UPPER] += np.clip(-side / 0.5, 0.0, 1.0)[:, None]
    gap = np.where(side > 0, boxes[:, 1] - curve, curve - boxes[:, 3]) / height
    low, full = _BUD_GAP
    cost[:, _DECIDUOUS] += np.clip((gap - low) / (full - low), 0.0, 1.0)[:, None]
    return cost


def number_teeth(boxes: np.ndarray, probs: np.ndarray, prior_weight: float = PRIOR_WEIGHT,
                 min_score: float = 0.25, tooth: np.ndarray | None = None,
                 occlusal_weight: float = OCCLUSAL_WEIGHT, arch_search: bool = True,
                 midline_weight: float = MIDLINE_WEIGHT, anchor_score: float | None = None) -> list[Assignment]:
    """Give each candidate at most one FDI label and each label at most one candidate.

    boxes: (n, 4) x1, y1, x2, y2 pixels; probs: (n, 52) class probabilities (FDI class order);
    tooth: (n,) tooth scores or None; the weights and `arch_search`: module docstring. Returns
    assignments sorted by label order, weak candidates dropped. anchor_score (with tooth scores,
    above min_score): the candidates scoring at least this are numbered first, on their own; the
    weaker ones then take the labels left (`_number_weak`), so they cannot move a confident
    tooth's number. Without a candidate that strong, all are numbered together.
    """
    if tooth is not None and anchor_score is not None and anchor_score > min_score:
        scores = np.asarray(tooth, dtype=np.float64).reshape(-1)
        strong = number_teeth(boxes, probs, prior_weight, anchor_score, scores, occlusal_weight, arch_search,
                              midline_weight)
        weak = np.flatnonzero((scores >= min_score) & (scores < anchor_score))
        if strong and len(weak):
            out = strong + _number_weak(boxes, probs, scores, strong, weak, prior_weight, occlusal_weight)
            return sorted(out, key=lambda a: fdi.CLASS_INDEX[a.label])
        if strong:
            return strong
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
    if occlusal_weight > 0:
        likelihood = likelihood + occlusal_weight * occlusal_cost(boxes, probs)
    if prior_weight > 0 and arch_search:
        prior = np.zeros_like(likelihood)
        cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
        for upper, fit in search_arches(boxes, likelihood, prior_weight, midline_weight).items():
            prior[:, _UPPER == upper] = _arch_misfit(cx, upper, *fit)
    else:
        prior = position_cost(boxes, probs)
    rows, cols = linear_sum_assignment(likelihood + prior_weight * prior)
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


def _number_weak(boxes: np.ndarray, probs: np.ndarray, tooth: np.ndarray, strong: list[Assignment],
                 weak: np.ndarray, prior_weight: float, occlusal_weight: float) -> list[Assignment]:
    """The labels `strong` left, given to the `weak` candidates (indices) by the Hungarian algorithm
    on the same costs: -log p, the occlusal plane of all of them, and the order along the arch lines
    fitted to the strong candidates' labels."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(boxes), len(fdi.FDI_LABELS))
    rows = np.concatenate([[a.index for a in strong], weak]).astype(int)
    b = boxes[rows]
    p = np.clip(probs[rows], 1e-9, None)
    p = p / p.sum(axis=1, keepdims=True)
    cost = -np.log(p)
    if occlusal_weight > 0:
        cost = cost + occlusal_weight * occlusal_cost(b, p)
    if prior_weight > 0:
        cx = (b[:, 0] + b[:, 2]) / 2.0
        labels = np.array([fdi.CLASS_INDEX[a.label] for a in strong])
        prior = np.zeros_like(cost)
        for upper in (True, False):
            on_arch = _UPPER[labels] == upper
            fit = fit_arch(cx[:len(strong)][on_arch], _COORD[labels[on_arch]], np.ones(on_arch.sum()))
            if fit is not None:
                prior[:, _UPPER == upper] = _arch_misfit(cx, upper, *fit)
        cost = cost + prior_weight * prior
    free = np.setdiff1d(np.arange(len(fdi.FDI_LABELS)), [fdi.CLASS_INDEX[a.label] for a in strong])
    r, c = linear_sum_assignment(cost[len(strong):][:, free])
    return [Assignment(int(weak[i]), fdi.FDI_LABELS[free[j]], float(tooth[weak[i]])) for i, j in zip(r, c)]


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
