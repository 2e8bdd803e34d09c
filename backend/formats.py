"""Label Studio result formats for tooth masks.

Conversions between (H, W) boolean masks and Label Studio regions:
- BrushLabels: RLE through `label_studio_sdk.converter.brush` (exact).
- PolygonLabels: outer contours in percent (0-100) of the original size, one region per
  connected part of a tooth (a tooth split in two gives two regions with the same label).
Coordinates: pixel (col, row) has its centre at ((col + 0.5) / W * 100, (row + 0.5) / H * 100)
percent; a vertex in percent maps back to pixel col = x% * W / 100 - 0.5.

The target control tag comes from the project's labeling config via `LabelInterface`.
Config label values map to FDI labels when the value is an FDI number ("11") or contains
exactly one ("Tooth 11", "11 - upper right central incisor").
"""
from __future__ import annotations

import functools
import logging
import re
import uuid
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import cv2
import numpy as np
from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.control_tags import BrushLabelsTag, PolygonLabelsTag

from backend import fdi
from backend.instance import Instance

logger = logging.getLogger(__name__)

BRUSH = "brushlabels"
POLYGON = "polygonlabels"
REGION_TYPES = (BRUSH, POLYGON)

_FDI_TOKEN = re.compile(r"(?<!\d)([1-8][1-8])(?!\d)")


class LabelConfigError(ValueError):
    """The labeling config has no control tag toothseg can write tooth masks to."""


def fdi_of_value(value: str) -> str | None:
    """The FDI label a config label value stands for, or None.

    "11" -> "11"; "Tooth 11" -> "11"; "11/21" (two numbers) -> None; "caries" -> None.
    """
    text = str(value).strip()
    if fdi.is_fdi(text):
        return text
    found = {m for m in _FDI_TOKEN.findall(text) if fdi.is_fdi(m)}
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class Target:
    """Where tooth regions go in a project: one BrushLabels or PolygonLabels control tag."""

    from_name: str
    to_name: str
    type: str  # BRUSH or POLYGON
    value_key: str  # task data key of the image, e.g. "image" for value="$image"
    fdi_to_value: Mapping[str, str] = field(default_factory=dict)

    def value_for(self, label: str) -> str | None:
        """The config's label value for an FDI label, or None if the config lacks it."""
        return self.fdi_to_value.get(label)


@functools.lru_cache(maxsize=64)
def find_target(label_config: str, prefer: str = BRUSH) -> Target:
    """Find the tooth control tag of a labeling config (BrushLabels preferred, else PolygonLabels).

    Raises LabelConfigError with a readable reason when the config has neither, or when the
    control's labels contain no FDI numbers. Cached per config text (a Target is immutable; errors
    are not cached): every `/setup` and `/predict` of a project sends the same config.
    """
    try:
        interface = LabelInterface(label_config)
    except Exception as exc:  # lxml / pydantic errors: the config itself is broken
        raise LabelConfigError(f"cannot parse the labeling config: {exc}") from exc
    controls = interface.find_tags_by_class([BrushLabelsTag, PolygonLabelsTag])
    if not controls:
        raise LabelConfigError("the labeling config has no BrushLabels or PolygonLabels control tag")
    controls.sort(key=lambda c: c.tag.lower() != prefer)
    reasons = []
    for control in controls:
        mapping: dict[str, str] = {}
        for value in control.labels or ():
            label = fdi_of_value(value)
            if label is not None and label not in mapping:
                mapping[label] = value
        if not mapping:
            reasons.append(f"{control.tag} '{control.name}' has no FDI tooth labels")
            continue
        to_name = control.to_name[0]
        image = interface.get_object(to_name)
        value_key = str(image.value).lstrip("$") if getattr(image, "value", None) else to_name
        return Target(control.name, to_name, control.tag.lower(), value_key, MappingProxyType(mapping))
    raise LabelConfigError("; ".join(reasons))


# --- brush ---------------------------------------------------------------------------------

def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool mask -> Label Studio brush RLE (RGBA-expanded, alpha 255 on the mask)."""
    # label_studio_sdk's converter package imports nltk and more (0.8 s): only where RLE is used
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)


def rle_to_mask(rle: Iterable[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> (height, width) bool mask (alpha channel >= 128)."""
    from label_studio_sdk.converter.brush import decode_rle  # as in mask_to_rle

    flat = decode_rle(list(rle))
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size} values, expected {height}x{width}x4")
    return flat.reshape(height, width, 4)[:, :, 3] >= 128


# --- polygons ------------------------------------------------------------------------------

def mask_to_polygons(mask: np.ndarray, min_area: float = 4.0, epsilon: float = 0.0) -> list[np.ndarray]:
    """Outer contours of each connected part: a list of (N, 2) float arrays of (col, row) pixel
    centres, N >= 3. Parts covering fewer than about `min_area` pixels, and one-pixel-thin
    slivers, are dropped; `epsilon` > 0 simplifies each contour (cv2.approxPolyDP, pixels)."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if epsilon > 0:
            contour = cv2.approxPolyDP(contour, epsilon, True)
        if len(contour) < 3:
            continue
        # pixels covered ~ area inside the centre-line polygon + half its perimeter + 1
        if cv2.contourArea(contour) + cv2.arcLength(contour, True) / 2 + 1 < min_area:
            continue
        polygons.append(contour.reshape(-1, 2).astype(np.float64))
    return polygons


def polygons_to_region(polygons: Iterable[np.ndarray], height: int, width: int) -> tuple[int, int, np.ndarray]:
    """`polygons_to_mask`'s pixels in the polygons' bounding box clipped to the image: (top row, left
    column, (h, w) bool mask there); a (0, 0) mask when no pixel is inside the image. The polygons
    are filled on that box alone (cv2.fillPoly of integer points is the same shifted by integers)."""
    points = [np.round(np.asarray(poly, dtype=np.float64)).astype(np.int32).reshape(-1, 2) for poly in polygons]
    points = [p for p in points if len(p) >= 3]
    if not points:
        return 0, 0, np.zeros((0, 0), dtype=bool)
    every = np.concatenate(points)
    left, top = max(int(every[:, 0].min()), 0), max(int(every[:, 1].min()), 0)
    right, bottom = min(int(every[:, 0].max()), width - 1), min(int(every[:, 1].max()), height - 1)
    if right < left or bottom < top:
        return 0, 0, np.zeros((0, 0), dtype=bool)
    mask = np.zeros((bottom - top + 1, right - left + 1), dtype=bool)
    canvas = np.zeros(mask.shape, dtype=np.uint8)
    for pts in points:
        canvas[:] = 0
        cv2.fillPoly(canvas, [(pts - (left, top)).reshape(-1, 1, 2)], 1)
        mask |= canvas.astype(bool)
    return top, left, mask


def polygons_to_mask(polygons: Iterable[np.ndarray], height: int, width: int) -> np.ndarray:
    """Fill (N, 2) pixel-coordinate polygons (col, row; rounded to the nearest pixel) into one
    (height, width) bool mask: the union of the polygons, each filled on its own (so overlapping
    parts stay filled, as in the STS scorer)."""
    top, left, region = polygons_to_region(polygons, height, width)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:top + region.shape[0], left:left + region.shape[1]] = region
    return mask


def pixels_to_percent(points: np.ndarray, height: int, width: int) -> list[list[float]]:
    """(N, 2) pixel (col, row) -> [[x%, y%], ...] of the original size (pixel centres)."""
    p = np.asarray(points, dtype=np.float64)
    return np.stack([(p[:, 0] + 0.5) / width * 100.0, (p[:, 1] + 0.5) / height * 100.0], axis=1).round(4).tolist()


def percent_to_pixels(points: Iterable[Iterable[float]], height: int, width: int) -> np.ndarray:
    """[[x%, y%], ...] -> (N, 2) pixel (col, row) coordinates."""
    p = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
    return np.stack([p[:, 0] * width / 100.0 - 0.5, p[:, 1] * height / 100.0 - 0.5], axis=1)


# --- regions -------------------------------------------------------------------------------

def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def _base_region(target: Target, value: dict[str, Any], height: int, width: int, score: float | None) -> dict:
    region = {
        "id": _region_id(),
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": target.type,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
    }
    if score is not None:
        region["score"] = round(float(score), 4)
    return region


def mask_to_regions(mask: np.ndarray, value: str, target: Target, score: float | None = None,
                    polygon_epsilon: float = 0.7) -> list[dict]:
    """One tooth mask -> Label Studio regions for `target` with the config label `value`.

    BrushLabels: one region with the RLE. PolygonLabels: one region per connected part.
    """
    height, width = mask.shape
    if target.type == BRUSH:
        rle = mask_to_rle(mask)
        return [_base_region(target, {"format": "rle", "rle": rle, BRUSH: [value]}, height, width, score)]
    if target.type == POLYGON:
        regions = []
        for poly in mask_to_polygons(mask, epsilon=polygon_epsilon):
            points = pixels_to_percent(poly, height, width)
            value_ = {"points": points, "closed": True, POLYGON: [value]}
            regions.append(_base_region(target, value_, height, width, score))
        return regions
    raise LabelConfigError(f"unsupported region type {target.type!r}")


_warned_missing: set[tuple[str, str]] = set()


def task_score(regions: list[dict]) -> float:
    """A prediction's score for Label Studio: the mean of its regions' scores (0.0 without regions)."""
    scores = [r["score"] for r in regions if "score" in r]
    return round(float(np.mean(scores)), 4) if scores else 0.0


def instances_to_results(instances: Iterable[Instance], target: Target) -> list[dict]:
    """Tooth instances -> a Label Studio `result` list for `target`.

    FDI labels the config does not have are skipped (logged once per control and label).
    """
    result: list[dict] = []
    for inst in instances:
        value = target.value_for(inst.label)
        if value is None:
            key = (target.from_name, inst.label)
            if key not in _warned_missing:
                _warned_missing.add(key)
                logger.warning("label config control '%s' has no label for tooth %s: such regions are skipped",
                               target.from_name, inst.label)
            continue
        if not inst.mask.any():
            continue
        result.extend(mask_to_regions(inst.mask, value, target, score=inst.score))
    return result


def region_mask(region: Mapping[str, Any], height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decode one brush or polygon region to a (H, W) bool mask at the original image size."""
    h = int(region.get("original_height") or height or 0)
    w = int(region.get("original_width") or width or 0)
    if h <= 0 or w <= 0:
        raise ValueError(f"region {region.get('id')} has no original_width/original_height")
    value = region.get("value") or {}
    kind = str(region.get("type", "")).lower()
    if kind == BRUSH or "rle" in value:
        return rle_to_mask(value["rle"], h, w)
    if kind == POLYGON or "points" in value:
        return polygons_to_mask([percent_to_pixels(value["points"], h, w)], h, w)
    raise ValueError(f"region {region.get('id')} of type {kind!r} is neither brush nor polygon")


def region_labels(region: Mapping[str, Any]) -> list[str]:
    """The label values of a region (brushlabels / polygonlabels / labels)."""
    value = region.get("value") or {}
    for key in (BRUSH, POLYGON, "labels"):
        if value.get(key):
            return list(value[key])
    return []


def tooth_regions(result: Iterable[Mapping[str, Any]], height: int | None = None,
                  width: int | None = None) -> list[tuple[str, np.ndarray]]:
    """(FDI label, (H, W) bool mask) of each brush or polygon region of a `result` that carries
    exactly one FDI label, in order; other regions are skipped with a debug log."""
    regions = []
    for region in result:
        kind = str(region.get("type", "")).lower()
        if kind not in REGION_TYPES:
            continue
        labels = [lab for lab in (fdi_of_value(v) for v in region_labels(region)) if lab]
        if len(labels) != 1:
            logger.debug("skipping region %s with labels %s", region.get("id"), region_labels(region))
            continue
        regions.append((labels[0], region_mask(region, height, width)))
    return regions


def result_to_masks(result: Iterable[Mapping[str, Any]], height: int | None = None,
                    width: int | None = None) -> dict[str, np.ndarray]:
    """An annotation's `result` -> {FDI label: (H, W) bool mask}.

    Brush and polygon regions (`tooth_regions`) are decoded at their original size and unioned per
    FDI label (an annotator may paint one tooth in several strokes or polygons).
    """
    masks: dict[str, np.ndarray] = {}
    for label, mask in tooth_regions(result, height, width):
        if label in masks:
            if masks[label].shape != mask.shape:
                raise ValueError(f"regions of tooth {label} disagree on the image size: "
                                 f"{masks[label].shape} vs {mask.shape}")
            masks[label] |= mask
        else:
            masks[label] = mask
    return masks


def result_image_size(result: Iterable[Mapping[str, Any]]) -> tuple[int, int] | None:
    """(height, width) recorded in the first region that has them, else None."""
    for region in result:
        if region.get("original_height") and region.get("original_width"):
            return int(region["original_height"]), int(region["original_width"])
    return None
