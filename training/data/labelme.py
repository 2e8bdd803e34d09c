"""STS 2024 Labelme JSON: one polygon shape per tooth part, `label` = FDI string.

Points are (x, y) pixel coordinates of the original image; masks are rasterised as the
challenge's scorer does: coordinates truncated to integers, each shape filled with
cv2.fillPoly, shapes of one label unioned. toothseg writes integer pixel-centre coordinates,
so its own files read back exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from backend import fdi
from backend.formats import mask_to_polygons, polygons_to_mask

LABELME_VERSION = "5.2.1"


class LabelmeError(ValueError):
    """A Labelme file that cannot be read as tooth polygons."""


def polygons_to_labelme(polygons: Mapping[str, list[np.ndarray]], image_path: str,
                        height: int, width: int) -> dict[str, Any]:
    """{FDI label: [(N, 2) pixel polygons]} -> a Labelme document (dict)."""
    shapes = []
    for label in sorted(polygons, key=lambda lab: fdi.CLASS_INDEX.get(lab, 999)):
        for poly in polygons[label]:
            shapes.append({
                "label": label,
                "points": np.asarray(poly, dtype=np.float64).round(2).tolist(),
                "group_id": None,
                "description": "",
                "shape_type": "polygon",
                "flags": {},
            })
    return {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": shapes,
        "imagePath": image_path,
        "imageData": None,
        "imageHeight": int(height),
        "imageWidth": int(width),
    }


def masks_to_labelme(masks: Mapping[str, np.ndarray], image_path: str, epsilon: float = 0.0) -> dict[str, Any]:
    """{FDI label: (H, W) bool mask} -> a Labelme document with one polygon per connected part."""
    if not masks:
        raise LabelmeError("no masks: cannot infer the image size")
    height, width = next(iter(masks.values())).shape
    polys = {label: mask_to_polygons(m, epsilon=epsilon) for label, m in masks.items()}
    return polygons_to_labelme({k: v for k, v in polys.items() if v}, image_path, height, width)


def labelme_polygons(doc: Mapping[str, Any], source: str = "labelme") -> tuple[dict[str, list[np.ndarray]], int, int]:
    """A Labelme document -> ({FDI label: its shapes' (N, 2) points, truncated to integers as the
    scorer does}, height, width).

    Raises LabelmeError naming `source` and the problem for a malformed document or a shape
    whose label is not an FDI tooth.
    """
    try:
        height, width = int(doc["imageHeight"]), int(doc["imageWidth"])
        shapes = list(doc["shapes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LabelmeError(f"{source}: not a Labelme document (needs shapes, imageHeight, imageWidth): {exc}") from exc
    by_label: dict[str, list[np.ndarray]] = {}
    for i, shape in enumerate(shapes):
        label = str(shape.get("label", "")).strip()
        if not fdi.is_fdi(label):
            raise LabelmeError(f"{source}: shape {i} has label {label!r}, not an FDI tooth (11-48, 51-85)")
        kind = shape.get("shape_type") or "polygon"
        if kind != "polygon":
            raise LabelmeError(f"{source}: shape {i} ({label}) is a {kind}, only polygons are supported")
        try:
            points = np.asarray(shape.get("points") or [], dtype=np.float64)
        except (TypeError, ValueError):
            points = np.zeros((0,))
        if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
            raise LabelmeError(f"{source}: shape {i} ({label}) needs at least 3 (x, y) points")
        by_label.setdefault(label, []).append(np.trunc(points))  # int32 cast, as the scorer
    return by_label, height, width


def labelme_to_masks(doc: Mapping[str, Any], source: str = "labelme") -> dict[str, np.ndarray]:
    """A Labelme document -> {FDI label: (H, W) bool mask}; shapes of one label are unioned.
    LabelmeError as `labelme_polygons`."""
    by_label, height, width = labelme_polygons(doc, source)
    return {label: polygons_to_mask(polys, height, width) for label, polys in by_label.items()}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LabelmeError(f"{path}: cannot read JSON: {exc}") from exc


def read_labelme(path: str | Path) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """Read a Labelme file -> ({FDI label: mask}, (height, width))."""
    path = Path(path)
    doc = _read_json(path)
    masks = labelme_to_masks(doc, source=str(path))
    return masks, (int(doc["imageHeight"]), int(doc["imageWidth"]))


def read_labelme_polygons(path: str | Path) -> tuple[dict[str, list[np.ndarray]], int, int]:
    """Read a Labelme file -> `labelme_polygons` (nothing rasterised). LabelmeError as there, or
    when the file is not JSON."""
    return labelme_polygons(_read_json(Path(path)), source=str(path))


def write_labelme(path: str | Path, doc: Mapping[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, indent=1))
