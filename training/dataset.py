"""The detector's training data: the deterministic train/val split of a project's tasks, the
detector's classes, and the YOLO-seg dataset written from `DatasetItem`s.

Layout written (ultralytics' own, by `training.data.dataset_io.YoloWriter`): images/{train,val}/<name>.png
(grey PNG), labels/{train,val}/<name>.txt with one line per tooth: "<class> x1 y1 x2 y2 ..."
(polygon normalised to [0, 1], class = index in `backend.fdi.FDI_LABELS`; a tooth of several parts
is one polygon), and data.yaml naming all 52 FDI classes and the tooth super-class after them
(`class_names`).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Hashable, Iterable, Sequence

from backend import fdi
from training.data.dataset_io import DatasetItem, YoloWriter

TRAIN_POLYGON_EPSILON = 1.0
"""Douglas-Peucker tolerance (pixels) of the training labels' polygons: ultralytics resamples every
polygon to a fixed number of points anyway, so a pixel of simplification only makes the files small."""


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


def write_yolo_dataset(train: Iterable[DatasetItem], val: Iterable[DatasetItem], out: Path,
                       tooth_class: bool = True) -> Path:
    """Write a YOLO-seg dataset to `out` (classes: `class_names(tooth_class)`); returns the path of
    its data.yaml. ValueError unless both splits hold images; DatasetError (a ValueError) for two
    items of one name or masks not at their image's size. The items' images are arrays (a retrain's
    downloads): a file would be copied as it is."""
    with YoloWriter(out, names=class_names(tooth_class), epsilon=TRAIN_POLYGON_EPSILON) as writer:
        for split, items in (("train", train), ("val", val)):
            for item in items:
                writer.add(item, split)
    counts = {split: writer.counts.get(split, 0) for split in ("train", "val")}
    if not all(counts.values()):
        raise ValueError(f"a YOLO dataset needs images in both splits, got {counts}")
    return writer.out / "data.yaml"
