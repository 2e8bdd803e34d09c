"""YOLO-seg datasets from tooth masks, and the deterministic train/val split.

Layout written (ultralytics' own): images/{train,val}/<key>.png (grey PNG), labels/{train,val}/<key>.txt
with one line per tooth: "<class> x1 y1 x2 y2 ..." (polygon, coordinates normalised to [0, 1]),
class = index in `backend.fdi.FDI_LABELS`, and data.yaml naming all 52 FDI classes (and the tooth
super-class after them, `class_names`). A tooth whose
mask has several parts becomes one polygon: the parts are joined at their closest points by
ultralytics' `merge_multi_segment` (as its COCO converter does).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterable, Sequence

import cv2
import numpy as np
import yaml
from ultralytics.data.converter import merge_multi_segment

from backend import fdi
from backend.formats import mask_to_polygons


@dataclass
class LabeledImage:
    """One training image: `key` (file stem), `pixels` (H, W) uint8 grey, {FDI label: (H, W) bool mask}."""

    key: str
    pixels: np.ndarray
    masks: dict[str, np.ndarray]


def mask_polygon(mask: np.ndarray, epsilon: float = 1.0) -> np.ndarray | None:
    """One (N, 2) pixel polygon for a tooth mask (parts merged), or None if the mask is empty."""
    parts = mask_to_polygons(mask, epsilon=epsilon)
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    parts.sort(key=lambda p: p[:, 0].min())  # left to right, so the bridges stay short
    return np.concatenate(merge_multi_segment([p.reshape(-1).tolist() for p in parts]), axis=0)


def yolo_label_lines(masks: dict[str, np.ndarray], epsilon: float = 1.0) -> list[str]:
    """{FDI label: (H, W) mask} -> YOLO-seg label lines (class, normalised polygon)."""
    lines = []
    for label in sorted(masks, key=fdi.CLASS_INDEX.__getitem__):
        mask = masks[label]
        h, w = mask.shape
        poly = mask_polygon(mask, epsilon)
        if poly is None:
            continue
        norm = np.clip((poly + 0.5) / np.array([w, h]), 0.0, 1.0)
        coords = " ".join(f"{v:.6f}" for v in norm.reshape(-1))
        lines.append(f"{fdi.CLASS_INDEX[label]} {coords}")
    return lines


def split_train_val(keys: Sequence[Hashable], val_fraction: float = 0.2) -> tuple[list, list]:
    """Deterministic split by key (task id): taking the keys in order, a key is in val when
    sha1(key) falls in the first `val_fraction` of the hash range and val does not yet hold
    max(1, floor(val_fraction * keys so far)). Task ids grow as a project does, so a task stays on
    its side and the validation set of earlier rounds stays in later ones; the cap keeps a small
    project's training split from losing more than its share to chance (8 tasks: 1 in val, 20: at
    most 4). At least one key goes to each side when there are two or more."""
    def position(key) -> float:
        return int(hashlib.sha1(str(key).encode()).hexdigest()[:12], 16) / 16**12

    ranked = sorted(keys, key=position)
    val = []
    for i, key in enumerate(sorted(keys)):
        if position(key) < val_fraction and len(val) < max(1, math.floor(val_fraction * (i + 1))):
            val.append(key)
    if len(keys) >= 2:
        if not val:
            val = ranked[:1]
        if len(val) == len(keys):
            val = val[:-1]
    val_set = set(val)
    train = [k for k in keys if k not in val_set]
    return train, [k for k in keys if k in val_set]


def class_names(tooth_class: bool = True) -> dict[int, str]:
    """The detector's classes: the 52 FDI labels in class order, then `fdi.TOOTH_CLASS` (the tooth
    super-class, which no label line names: the loss gives it to every tooth)."""
    names = list(fdi.FDI_LABELS) + ([fdi.TOOTH_CLASS] if tooth_class else [])
    return dict(enumerate(names))


def write_yolo_dataset(train: Iterable[LabeledImage], val: Iterable[LabeledImage], out: Path,
                       tooth_class: bool = True) -> Path:
    """Write a YOLO-seg dataset to `out` (classes: `class_names(tooth_class)`); returns the path of
    its data.yaml."""
    out = Path(out)
    counts = {}
    for split, items in (("train", train), ("val", val)):
        img_dir, lbl_dir = out / "images" / split, out / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        n = 0
        for item in items:
            if not cv2.imwrite(str(img_dir / f"{item.key}.png"), item.pixels):
                raise OSError(f"could not write {img_dir / item.key}.png")
            (lbl_dir / f"{item.key}.txt").write_text("\n".join(yolo_label_lines(item.masks)) + "\n")
            n += 1
        counts[split] = n
    if counts["train"] == 0 or counts["val"] == 0:
        raise ValueError(f"a YOLO dataset needs images in both splits, got {counts}")
    data = {
        "path": str(out.resolve()),
        "train": "images/train",
        "val": "images/val",
        "names": class_names(tooth_class),
        "channels": 3,
    }
    path = out / "data.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
