"""STS 2024 challenge metrics for tooth segmentation on panoramic X-rays.

Inputs are per-image dicts {FDI label: (H, W) bool mask}, one for the prediction and one for
the ground truth (GT), all masks of one image the same size. Distances are in pixels
(spacing 1). Conventions shared by every metric below:

- A label whose mask is empty counts as absent (a Labelme polygon always fills at least one
  pixel, so this only matters for masks built in code).
- Empty inputs never give NaN: both masks empty -> Dice = IoU = NSD = 1.0; exactly one
  empty -> 0.0.

Image level: all teeth of a side are unioned into one foreground mask; Dice, IoU and NSD of
the two foregrounds.

Instance level: for each GT label, the predicted mask with the same label (an empty mask if
the prediction lacks it); Dice, IoU and NSD of that pair, averaged over the GT labels only
(extra predicted labels do not enter these averages, they lower IA). With no GT label the
instance metrics are 1.0 if the prediction is empty too, else 0.0.

IA (identification accuracy): the number of labels of GT ∪ prediction whose two masks have
IoU > 0.5 (strictly; a label on one side only has IoU 0), divided by |GT labels ∪ predicted
labels|; 1.0 when both sides have no label. This follows the official script, which matches
by FDI label; the challenge's README speaks of IoU >= 0.5 and greedy matching, the script
does neither.

Primary score (`Scores.primary`, used by the retraining gate): (instance Dice + IA) / 2.

Dice = 2|A∩B| / (|A| + |B|), IoU = |A∩B| / |A∪B|.

NSD (normalized surface Dice) at tolerance tau (default 2 pixels, inclusive: d <= tau)
between surfaces S_A, S_B with element weights w:

    NSD = (sum of w over S_A within tau of S_B + sum of w over S_B within tau of S_A)
          / (sum of w over S_A + sum of w over S_B)

with the distance from an element to the nearest element of the other surface (Euclidean,
from scipy.ndimage.distance_transform_edt). Two surface definitions, chosen by `variant`:

- "contour": the 2-D boundary. S = foreground pixels with at least one 4-neighbour (up,
  down, left, right) outside the mask, pixels beyond the image border counting as outside;
  every element weighs 1, so NSD counts boundary pixels. Distances are between pixel centres.

- "sts": what the official STS 2024 2-D scorer computes. It (STS-challenge/STS,
  STS2024/evaluation/2d/compute_metrics.py) rasterises each Labelme shape with cv2.fillPoly,
  adds a leading axis to make every mask a one-slice 3-D volume and calls
  compute_surface_distances(..., spacing_mm=[1, 1, 1]) and
  compute_surface_dice_at_tolerance(..., tolerance_mm=2) of its copy of DeepMind's
  surface-distance code (STS2024/evaluation/2d/SurfaceDice.py; same algorithm as
  google-deepmind/surface-distance, surface_distance/metrics.py). That algorithm places
  surface elements ("surfels") on the lattice of voxel corners: each corner gets the 8-bit
  code of the 2x2x2 voxels around it, every corner whose code is neither 0 nor 255 is a
  surfel, its weight is the marching-cubes surface area inside that 2x2x2 cell (a 256-entry
  table), and distances are the Euclidean distance transform between surfel corners.
  For a one-slice volume this reduces exactly to the following 2-D computation, which is
  what this module implements:

  * Surfels are the corners of the (H+1, W+1) pixel-corner lattice that touch at least one
    foreground pixel. Because the volume is one voxel thick, no 2x2x2 cell is full, so
    interior corners are surfels too (the whole mask, not only its contour, is "surface").
  * Each surfel's weight depends on its 2x2 pixel pattern only. In the scorer's cell one
    face holds the pattern and the opposite face is empty (outside the slice); the
    marching-cubes surface in it has area
        1 foreground pixel:              one corner triangle          sqrt(3)/8       ~ 0.2165
        2 pixels sharing an edge:        a 1 x sqrt(2)/2 rectangle    sqrt(2)/2       ~ 0.7071
        2 pixels on a diagonal:          two corner triangles         sqrt(3)/4       ~ 0.4330
        3 pixels:                        three triangles              1/2 + 3sqrt(3)/8 ~ 1.1495
        4 pixels:                        the mid-plane square         1
    These are the only entries of the scorer's table a one-slice volume can reach (codes c
    and 16c, c = 1..15, for the corner layers in front of and behind the slice); they were
    checked entry by entry against the table (google-deepmind/surface-distance,
    surface_distance/lookup_tables.py, which the STS copy shares) with spacing (1, 1, 1).
  * Each surfel occurs twice in the scorer, once per corner layer, with the same weight and
    the same distance (the other layer's copy of a surfel is 1 voxel away across the slice,
    never nearer than the in-plane surfels), so the factor 2 cancels in the ratio.

  Where this may differ from the official scorer: (1) empty masks: the scorer returns NaN
  when both masks are empty (and crashes on numpy >= 2, which removed np.Inf, when exactly
  one is); here 1.0 and 0.0 as above. (2) Floating-point summation order (the scorer sorts
  surfels by distance before summing): differences of order 1e-15. (3) The scorer rounds
  each per-image value to 4 decimals in its CSV; nothing is rounded here. (4) Rasterisation
  is not part of these metrics: `evaluate_folder` reads Labelme files with
  `training.data.labelme.read_labelme`, whose polygon filling is documented there.

Performance: distance transforms run on the bounding box of the pair's union padded by one
pixel, not on the whole image. This is exact: every surface element of either mask lies
inside that box, so the distance to the nearest one is the same in the box as in the image.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from training.data.labelme import read_labelme

logger = logging.getLogger(__name__)

NSD_VARIANTS: tuple[str, ...] = ("sts", "contour")
DEFAULT_TOLERANCE = 2.0
IA_IOU_THRESHOLD = 0.5
"""A label is identified when the IoU of its two masks is strictly greater than this."""

_FOUR_NEIGHBOURS = ndimage.generate_binary_structure(2, 1)


def _slab_corner_areas() -> np.ndarray:
    """Surfel area by 2x2 pattern code (8 = top-left, 4 = top-right, 2 = bottom-left,
    1 = bottom-right pixel) of a corner of a one-slice volume; see the module docstring."""
    corner_triangle = math.sqrt(3.0) / 8.0
    areas = np.zeros(16, dtype=np.float64)
    for code in range(1, 16):
        count = code.bit_count()
        if count == 1:
            areas[code] = corner_triangle
        elif count == 2:
            diagonal = code in (0b1001, 0b0110)
            areas[code] = 2.0 * corner_triangle if diagonal else math.sqrt(2.0) / 2.0
        elif count == 3:
            areas[code] = 0.5 + 3.0 * corner_triangle
        else:
            areas[code] = 1.0
    return areas


_SLAB_CORNER_AREA = _slab_corner_areas()


# --- pair metrics --------------------------------------------------------------------------

def _as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {array.shape}")
    return array.astype(bool, copy=False)


def _as_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_mask(a, "first mask"), _as_mask(b, "second mask")
    if a.shape != b.shape:
        raise ValueError(f"masks have different shapes: {a.shape} and {b.shape}")
    return a, b


def _check_options(variant: str, tolerance: float) -> None:
    if variant not in NSD_VARIANTS:
        raise ValueError(f"unknown NSD variant {variant!r}: expected one of {', '.join(NSD_VARIANTS)}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"NSD tolerance must be a finite number >= 0, got {tolerance!r}")


def _ratio(part: int, whole: int) -> float:
    """part / whole, with 0 / 0 = 1.0 (both masks empty)."""
    return 1.0 if whole == 0 else part / whole


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice 2|A∩B| / (|A| + |B|) of two (H, W) bool masks; 1.0 if both are empty."""
    a, b = _as_pair(a, b)
    return _ratio(2 * np.count_nonzero(a & b), np.count_nonzero(a) + np.count_nonzero(b))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU |A∩B| / |A∪B| of two (H, W) bool masks; 1.0 if both are empty."""
    a, b = _as_pair(a, b)
    return _ratio(np.count_nonzero(a & b), np.count_nonzero(a | b))


def _crop_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Both masks cut to the bounding box of their union and padded with one background
    pixel on every side (the image border counts as outside); None if both are empty."""
    union = a | b
    rows = np.flatnonzero(union.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(union.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return np.pad(a[box], 1), np.pad(b[box], 1)


def _contour_surface(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundary pixels (4-neighbour rule) of a padded mask, each of weight 1."""
    boundary = mask & ~ndimage.binary_erosion(mask, structure=_FOUR_NEIGHBOURS)
    return boundary, boundary.astype(np.float64)


def _sts_surface(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surfels of a padded mask on its corner lattice (one row and column fewer than the
    padded mask: the corners of the unpadded crop) and their marching-cubes areas."""
    m = mask.astype(np.uint8)
    code = 8 * m[:-1, :-1] + 4 * m[:-1, 1:] + 2 * m[1:, :-1] + m[1:, 1:]
    return code != 0, _SLAB_CORNER_AREA[code]


def _surface_dice(a: np.ndarray, b: np.ndarray, variant: str, tolerance: float) -> float:
    """NSD of two padded crops (see the module docstring); both must be non-empty."""
    surface = _sts_surface if variant == "sts" else _contour_surface
    surf_a, weight_a = surface(a)
    surf_b, weight_b = surface(b)
    dist_to_b = ndimage.distance_transform_edt(~surf_b)
    dist_to_a = ndimage.distance_transform_edt(~surf_a)
    close = (weight_a[surf_a & (dist_to_b <= tolerance)].sum()
             + weight_b[surf_b & (dist_to_a <= tolerance)].sum())
    total = weight_a[surf_a].sum() + weight_b[surf_b].sum()
    return float(close / total)


def nsd(a: np.ndarray, b: np.ndarray, tolerance: float = DEFAULT_TOLERANCE, variant: str = "sts") -> float:
    """Normalized surface Dice of two (H, W) bool masks at `tolerance` pixels (inclusive).

    `variant` "sts" reproduces the official STS 2024 scorer, "contour" uses the 2-D
    boundary pixels (module docstring). Symmetric in a and b; 1.0 if both are empty,
    0.0 if exactly one is.
    """
    _check_options(variant, tolerance)
    a, b = _as_pair(a, b)
    return _pair_scores(a, b, variant, tolerance)[2]


def _pair_scores(pred: np.ndarray, gt: np.ndarray, variant: str, tolerance: float) -> tuple[float, float, float]:
    """(Dice, IoU, NSD) of two same-shape bool masks, computed on their union's bounding box."""
    crops = _crop_pair(pred, gt)
    if crops is None:
        return 1.0, 1.0, 1.0
    p, g = crops
    size_p, size_g = np.count_nonzero(p), np.count_nonzero(g)
    inter = np.count_nonzero(p & g)
    surface_dice = _surface_dice(p, g, variant, tolerance) if size_p and size_g else 0.0
    return 2 * inter / (size_p + size_g), inter / (size_p + size_g - inter), surface_dice


# --- per-image scores ----------------------------------------------------------------------

@dataclass(frozen=True)
class Scores:
    """STS 2024 metrics of one image (or their mean over images); all in [0, 1]."""

    image_dice: float
    image_iou: float
    image_nsd: float
    instance_dice: float
    instance_iou: float
    instance_nsd: float
    ia: float

    @property
    def primary(self) -> float:
        """The retraining gate's single score: (instance_dice + ia) / 2, in [0, 1].

        Instance Dice rewards the shape of each correctly numbered tooth, IA the share of
        teeth found with the right FDI number, so a model cannot win by shapes alone.
        """
        return (self.instance_dice + self.ia) / 2.0

    def as_dict(self) -> dict[str, float]:
        """The seven metric fields, by field name (`primary` not included)."""
        return asdict(self)


def _label_masks(masks: Mapping[str, np.ndarray], side: str) -> dict[str, np.ndarray]:
    """{label: bool mask} of the non-empty masks; ValueError for a mask that is not 2-D."""
    out = {}
    for label, mask in masks.items():
        m = _as_mask(mask, f"{side} mask {label!r}")
        if m.any():
            out[str(label)] = m
    return out


def _common_shape(pred: Mapping[str, np.ndarray], gt: Mapping[str, np.ndarray]) -> tuple[int, int] | None:
    shapes = {(side, label): np.shape(mask) for side, masks in (("prediction", pred), ("GT", gt))
              for label, mask in masks.items()}
    distinct = set(shapes.values())
    if len(distinct) > 1:
        listed = ", ".join(f"{side} {label!r}: {shape}" for (side, label), shape in shapes.items())
        raise ValueError(f"all masks of an image must have the same shape, got {listed}")
    return distinct.pop() if distinct else None


def score_image(pred: Mapping[str, np.ndarray], gt: Mapping[str, np.ndarray], nsd: str = "sts",
                tolerance: float = DEFAULT_TOLERANCE) -> Scores:
    """STS 2024 scores of one image from {FDI label: (H, W) bool mask} dicts.

    `nsd` picks the NSD variant ("sts" or "contour"), `tolerance` its distance in pixels.
    Raises ValueError if the masks do not all have the same (H, W) shape.
    """
    _check_options(nsd, tolerance)
    shape = _common_shape(pred, gt)
    pred_masks, gt_masks = _label_masks(pred, "prediction"), _label_masks(gt, "GT")
    if shape is None:  # no mask on either side: nothing to miss, nothing extra
        return Scores(*(1.0,) * len(fields(Scores)))
    empty = np.zeros(shape, dtype=bool)

    def union(masks: dict[str, np.ndarray]) -> np.ndarray:
        return np.logical_or.reduce(list(masks.values())) if masks else empty

    image = _pair_scores(union(pred_masks), union(gt_masks), nsd, tolerance)

    if gt_masks:
        pairs = {label: _pair_scores(pred_masks.get(label, empty), mask, nsd, tolerance)
                 for label, mask in gt_masks.items()}
        instance = tuple(float(np.mean([p[k] for p in pairs.values()])) for k in range(3))
        identified = sum(1 for p in pairs.values() if p[1] > IA_IOU_THRESHOLD)
    else:
        instance = (0.0, 0.0, 0.0) if pred_masks else (1.0, 1.0, 1.0)
        identified = 0
    labels = set(gt_masks) | set(pred_masks)
    ia = identified / len(labels) if labels else 1.0
    return Scores(*image, *instance, ia)


def mean_scores(scores: Sequence[Scores]) -> Scores:
    """Field-wise mean of per-image Scores; ValueError for an empty sequence."""
    if not scores:
        raise ValueError("mean_scores needs at least one Scores")
    return Scores(**{f.name: float(np.mean([getattr(s, f.name) for s in scores])) for f in fields(Scores)})


def evaluate_folder(pred_dir: str | Path, gt_dir: str | Path, nsd: str = "sts",
                    tolerance: float = DEFAULT_TOLERANCE) -> tuple[list[dict], Scores]:
    """Score every STS Labelme JSON of `gt_dir` against the file of the same stem in `pred_dir`.

    A GT file without a prediction is scored against an empty prediction; prediction files
    without GT are ignored with a warning. Returns (rows sorted by stem, each
    {"image": stem, <Scores fields>, "missing_prediction": bool}, their mean Scores).
    Raises ValueError if `gt_dir` holds no .json file or an image's sizes differ, NotADirectoryError
    if a folder does not exist, training.data.labelme.LabelmeError for an unreadable file.
    """
    _check_options(nsd, tolerance)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder in (pred_dir, gt_dir):
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder}: not a folder")
    gt_files = {p.stem: p for p in sorted(gt_dir.glob("*.json"))}
    if not gt_files:
        raise ValueError(f"{gt_dir}: no Labelme .json files to evaluate")
    pred_files = {p.stem: p for p in sorted(pred_dir.glob("*.json"))}
    extra = sorted(set(pred_files) - set(gt_files))
    if extra:
        logger.warning("%d prediction file(s) in %s have no ground truth and are ignored: %s",
                       len(extra), pred_dir, ", ".join(extra))

    rows, scores = [], []
    for stem, gt_path in gt_files.items():
        gt, gt_size = read_labelme(gt_path)
        pred_path = pred_files.get(stem)
        pred: dict[str, np.ndarray] = {}
        if pred_path is not None:
            pred, pred_size = read_labelme(pred_path)
            if pred_size != gt_size:
                raise ValueError(f"{pred_path}: image size {pred_size} differs from the GT's {gt_size} ({gt_path})")
        s = score_image(pred, gt, nsd=nsd, tolerance=tolerance)
        scores.append(s)
        rows.append({"image": stem, **s.as_dict(), "missing_prediction": pred_path is None})
    return rows, mean_scores(scores)
