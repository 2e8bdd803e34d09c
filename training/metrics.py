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
  is not part of these metrics: `evaluate_folder` reads Labelme files as
  `training.data.labelme.read_labelme` does (`read_regions`), whose polygon filling is documented there.

Performance: a mask is kept as its bounding box and the pixels in it (`Region`; Labelme files are
rasterised on that box alone). A pair is scored on the bounding box of its union padded by one
pixel, not on the whole image: every surface element of either mask lies inside that box. "Within
tau of the other surface" is a dilation of that surface by the disk of radius tau (the lattice
offsets whose Euclidean length is <= tau), not a distance transform: the same elements, since the
distance to the nearest element is <= tau exactly when one lies within that disk. Both NSD variants
of a pair share its crop, Dice and IoU (`score_regions`), and `evaluate_folders` reads each file once
and scores images in parallel processes.
"""
from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from functools import lru_cache, partial
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from backend.formats import polygons_to_region
from training.data.labelme import LabelmeError, read_labelme_polygons

logger = logging.getLogger(__name__)

NSD_VARIANTS: tuple[str, ...] = ("sts", "contour")
DEFAULT_TOLERANCE = 2.0
IA_IOU_THRESHOLD = 0.5
"""A label is identified when the IoU of its two masks is strictly greater than this."""

_FOUR_NEIGHBOURS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


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


@dataclass(frozen=True)
class Region:
    """A non-empty mask as a box holding it: the (h, w) bool pixels `mask` whose top-left pixel is
    (`top`, `left`) of the image (`of` gives the tightest box; a looser one scores the same)."""

    top: int
    left: int
    mask: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray) -> "Region | None":
        """The region of a full (H, W) mask; None when it is empty."""
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(mask.any(axis=0))
        return cls(int(rows[0]), int(cols[0]), mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right), bottom and right exclusive."""
        return self.top, self.left, self.top + self.mask.shape[0], self.left + self.mask.shape[1]

    def paste(self, canvas: np.ndarray, top: int, left: int) -> None:
        """OR this region into `canvas`, whose top-left pixel is (`top`, `left`) of the image."""
        y, x = self.top - top, self.left - left
        canvas[y:y + self.mask.shape[0], x:x + self.mask.shape[1]] |= self.mask


def _union_box(regions) -> tuple[int, int, int, int]:
    boxes = np.array([r.box for r in regions])
    return int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max())


def _union(regions: Sequence[Region]) -> Region | None:
    """One region holding the union of `regions` (None when there is none)."""
    if not regions:
        return None
    if len(regions) == 1:
        return regions[0]
    top, left, bottom, right = _union_box(regions)
    canvas = np.zeros((bottom - top, right - left), dtype=bool)
    for r in regions:
        r.paste(canvas, top, left)
    return Region(top, left, canvas)


def _padded_crops(a: Region | None, b: Region | None) -> tuple[np.ndarray, np.ndarray]:
    """Both masks on the bounding box of their union padded with one background pixel on every
    side (the image border counts as outside); at least one of them is not None."""
    present = [r for r in (a, b) if r is not None]
    top, left, bottom, right = _union_box(present)
    crops = []
    for r in (a, b):
        crop = np.zeros((bottom - top + 2, right - left + 2), dtype=bool)
        if r is not None:
            r.paste(crop, top - 1, left - 1)
        crops.append(crop)
    return crops[0], crops[1]


def _contour_surface(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundary pixels (4-neighbour rule) of a padded mask, each of weight 1."""
    boundary = mask & ~cv2.erode(mask.view(np.uint8), _FOUR_NEIGHBOURS).view(bool)
    return boundary, boundary.astype(np.float64)


def _sts_surface(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surfels of a padded mask on its corner lattice (one row and column fewer than the
    padded mask: the corners of the unpadded crop) and their marching-cubes areas."""
    m = mask.astype(np.uint8)
    code = 8 * m[:-1, :-1] + 4 * m[:-1, 1:] + 2 * m[1:, :-1] + m[1:, 1:]
    return code != 0, _SLAB_CORNER_AREA[code]


_SURFACES = {"sts": _sts_surface, "contour": _contour_surface}


@lru_cache(maxsize=8)
def _disk(tolerance: float) -> np.ndarray:
    """The lattice offsets within `tolerance` (Euclidean, inclusive), as a uint8 kernel."""
    r = int(math.floor(tolerance))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    return (np.sqrt((dx * dx + dy * dy).astype(np.float64)) <= tolerance).astype(np.uint8)


def _near(surface: np.ndarray, tolerance: float) -> np.ndarray:
    """Elements within `tolerance` of a surface element (the surface dilated by the disk)."""
    return cv2.dilate(surface.view(np.uint8), _disk(tolerance), borderType=cv2.BORDER_CONSTANT,
                      borderValue=0).view(bool)


def _surface_dice(a: np.ndarray, b: np.ndarray, variant: str, tolerance: float) -> float:
    """NSD of two padded crops (see the module docstring); both must be non-empty."""
    surface = _SURFACES[variant]
    surf_a, weight_a = surface(a)
    surf_b, weight_b = surface(b)
    close = (weight_a[surf_a & _near(surf_b, tolerance)].sum()
             + weight_b[surf_b & _near(surf_a, tolerance)].sum())
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
    return _pair_scores(Region.of(a), Region.of(b), (variant,), tolerance)[2][variant]


def _pair_scores(pred: Region | None, gt: Region | None, variants: Sequence[str],
                 tolerance: float) -> tuple[float, float, dict[str, float]]:
    """(Dice, IoU, {variant: NSD}) of two masks (None: empty), computed on their union's bounding box."""
    if pred is None and gt is None:
        return 1.0, 1.0, {v: 1.0 for v in variants}
    if pred is None or gt is None:
        return 0.0, 0.0, {v: 0.0 for v in variants}
    p, g = _padded_crops(pred, gt)
    size_p, size_g = np.count_nonzero(pred.mask), np.count_nonzero(gt.mask)
    inter = np.count_nonzero(p & g)
    return (2 * inter / (size_p + size_g), inter / (size_p + size_g - inter),
            {v: _surface_dice(p, g, v, tolerance) for v in variants})


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


def _label_regions(masks: Mapping[str, np.ndarray], side: str) -> dict[str, Region]:
    """{label: Region} of the non-empty masks; ValueError for a mask that is not 2-D."""
    out = {}
    for label, mask in masks.items():
        region = Region.of(_as_mask(mask, f"{side} mask {label!r}"))
        if region is not None:
            out[str(label)] = region
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
    _common_shape(pred, gt)
    return score_regions(_label_regions(pred, "prediction"), _label_regions(gt, "GT"), (nsd,), tolerance)[nsd]


def score_regions(pred: Mapping[str, Region], gt: Mapping[str, Region], variants: Sequence[str] = NSD_VARIANTS,
                  tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Scores]:
    """`score_image` of one image's non-empty masks as regions ({FDI label: Region}), for each NSD
    variant of `variants` at once: {variant: Scores}."""
    image_dice, image_iou, image_nsd = _pair_scores(_union(list(pred.values())), _union(list(gt.values())),
                                                    variants, tolerance)
    if gt:
        pairs = [_pair_scores(pred.get(label), region, variants, tolerance) for label, region in gt.items()]
        instance_dice, instance_iou = (float(np.mean([p[k] for p in pairs])) for k in range(2))
        instance_nsd = {v: float(np.mean([p[2][v] for p in pairs])) for v in variants}
        identified = sum(1 for p in pairs if p[1] > IA_IOU_THRESHOLD)
    else:
        instance_dice = instance_iou = 0.0 if pred else 1.0
        instance_nsd = {v: instance_dice for v in variants}
        identified = 0
    labels = set(gt) | set(pred)
    ia = identified / len(labels) if labels else 1.0
    return {v: Scores(image_dice, image_iou, image_nsd[v], instance_dice, instance_iou, instance_nsd[v], ia)
            for v in variants}


def mean_scores(scores: Sequence[Scores]) -> Scores:
    """Field-wise mean of per-image Scores; ValueError for an empty sequence."""
    if not scores:
        raise ValueError("mean_scores needs at least one Scores")
    return Scores(**{f.name: float(np.mean([getattr(s, f.name) for s in scores])) for f in fields(Scores)})


def read_regions(path: Path) -> tuple[dict[str, Region], tuple[int, int]]:
    """A Labelme file's non-empty masks as regions ({FDI label: Region}) and its (height, width):
    `training.data.labelme.read_labelme`'s pixels, each label rasterised on its own box."""
    by_label, height, width = read_labelme_polygons(path)
    regions = {}
    for label, polygons in by_label.items():
        top, left, mask = polygons_to_region(polygons, height, width)
        if mask.any():
            regions[label] = Region(top, left, mask)
    return regions, (height, width)


def _score_files(gt_path: Path, pred_path: Path | None, variants: Sequence[str],
                 tolerance: float) -> tuple[dict[str, Scores] | None, list[str]]:
    """(scores, []) of one image's pair of files, or (None, what is wrong with each unreadable one)."""
    read, errors = [], []
    for path in (gt_path, pred_path):
        try:
            read.append(read_regions(path) if path is not None else ({}, None))
        except LabelmeError as exc:
            errors.append(str(exc).replace("\n", " "))
    if errors:
        return None, errors
    (gt, gt_size), (pred, pred_size) = read
    if pred_size is not None and pred_size != gt_size:
        raise ValueError(f"{pred_path}: image size {pred_size} differs from the GT's {gt_size} ({gt_path})")
    return score_regions(pred, gt, variants, tolerance), []


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, variants: Sequence[str] = NSD_VARIANTS,
                     tolerance: float = DEFAULT_TOLERANCE, workers: int | None = None
                     ) -> dict[str, tuple[list[dict], Scores]]:
    """Score every STS Labelme JSON of `gt_dir` against the file of the same stem in `pred_dir`,
    each file read once, for each NSD variant of `variants`: {variant: (rows, mean Scores)}.

    A GT file without a prediction is scored against an empty prediction; prediction files
    without GT are ignored with a warning. Rows are sorted by stem, each {"image": stem,
    <Scores fields>, "missing_prediction": bool}. Images are scored in `workers` processes (None:
    up to one per CPU, at least 4 images each; 1: in this process).
    Raises ValueError if `gt_dir` holds no .json file or an image's sizes differ, NotADirectoryError
    if a folder does not exist, training.data.labelme.LabelmeError naming every unreadable file (one
    line each) when any is.
    """
    for variant in variants:
        _check_options(variant, tolerance)
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

    stems = list(gt_files)
    score = partial(_score_files, variants=tuple(variants), tolerance=tolerance)
    args = ([gt_files[s] for s in stems], [pred_files.get(s) for s in stems])
    if workers is None:
        workers = min(os.cpu_count() or 1, len(stems) // 4)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(score, *args, chunksize=max(1, len(stems) // (4 * workers))))
    else:
        results = list(map(score, *args))
    errors = [error for _, errs in results for error in errs]
    if errors:
        raise LabelmeError("\n".join(errors))
    out = {}
    for variant in variants:
        scores = [r[variant] for r, _ in results]
        rows = [{"image": stem, **s.as_dict(), "missing_prediction": stem not in pred_files}
                for stem, s in zip(stems, scores)]
        out[variant] = (rows, mean_scores(scores))
    return out


def evaluate_folder(pred_dir: str | Path, gt_dir: str | Path, nsd: str = "sts",
                    tolerance: float = DEFAULT_TOLERANCE, workers: int | None = None) -> tuple[list[dict], Scores]:
    """`evaluate_folders` for one NSD variant `nsd`: (rows, their mean Scores)."""
    return evaluate_folders(pred_dir, gt_dir, (nsd,), tolerance, workers)[nsd]
