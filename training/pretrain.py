"""The detector a project's first training starts from: pretrained on toothseg's synthetic panoramics.

No weights for teeth can be downloaded (and ultralytics' COCO weights know no tooth), so toothseg
makes its own start: `toothseg pretrain` trains the "small" preset's detector on many synthetic
panoramics (`training.data.synth`) and writes the weights next to a record of how they were made
(`<weights>.json`: the command's arguments, the architecture, seconds, sha256). The file that
ships, `training/weights/synthetic-pretrained.pt`, was made by `toothseg pretrain` with its
defaults (about 30 minutes on 2 cores).

A first training (no current model) starts from YOLO_WEIGHTS when it names a file; else from the
shipped weights when TRAIN_PRETRAINED is on (the default) and the training's architecture (model
yaml, mask prototype stride, tooth super-class) is the one they were trained with; else from random
weights. The shipped weights only start trainings: they never pre-annotate a project.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # training.train imports ultralytics: `toothseg --help` does not need it
    from training.train import TrainConfig

logger = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent / "weights" / "synthetic-pretrained.pt"
"""The pretrained detector that ships with toothseg (made by `toothseg pretrain`, its defaults)."""

DEFAULTS = dict(images=400, seed=20000, size=(512, 512), imgsz=512, steps=3000)
"""`toothseg pretrain`'s defaults: 400 synthetic panoramics at 512x512 (the size of UFBA-425's
radiographs), imgsz 512, 3000 optimizer steps without a time budget (the same model on any machine)."""


def architecture(config: TrainConfig) -> dict:
    """What a training's starting weights must share with it: the model yaml, the mask prototype
    stride and the tooth super-class."""
    return dict(model_cfg=config.model_cfg, proto_stride=config.proto_stride, tooth_class=config.tooth_class)


def record_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def read_record(weights: Path) -> dict:
    """The record `pretrain` wrote next to `weights`."""
    return json.loads(record_path(weights).read_text())


def pretrain(out: Path, images: int = DEFAULTS["images"], seed: int = DEFAULTS["seed"],
             size: tuple[int, int] = DEFAULTS["size"], imgsz: int = DEFAULTS["imgsz"],
             steps: int = DEFAULTS["steps"]) -> dict:
    """Train the "small" preset's detector on `images` synthetic panoramics of `size` (seeds `seed`,
    `seed`+1, ...) for `steps` optimizer steps at `imgsz`; write the weights to `out` and the record
    to `out` with the suffix .json (the training's own files go to a temporary folder). Returns the
    record."""
    from training.data.synth import train_synthetic_detector
    from training.train import TrainConfig

    if images < 2 or steps < 1:
        raise ValueError(f"pretrain needs at least 2 images and 1 step (got {images} images, {steps} steps)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="toothseg-pretrain-") as tmp:
        weights = train_synthetic_detector(Path(tmp), n=images, seed=seed, size=size, imgsz=imgsz, steps=steps)
        shutil.copyfile(weights, out)
    # train_synthetic_detector trains the small preset's architecture
    record = dict(images=images, seed=seed, size=list(size), imgsz=imgsz, steps=steps,
                  architecture=architecture(TrainConfig()), seconds=round(time.perf_counter() - start, 1),
                  sha256=hashlib.sha256(out.read_bytes()).hexdigest())
    record_path(out).write_text(json.dumps(record, indent=2) + "\n")
    return record


def first_training_start(yolo_weights: Path | None, config: TrainConfig,
                         shipped: Path = SHIPPED) -> Path | None:
    """The weights a project's first training starts from: `yolo_weights` (YOLO_WEIGHTS) when it
    exists, else `shipped` when `config.pretrained` and the architectures agree, else None (random
    weights)."""
    if yolo_weights is not None:
        if Path(yolo_weights).exists():
            return Path(yolo_weights)
        logger.warning("YOLO_WEIGHTS %s does not exist: it cannot start the first training", yolo_weights)
    if not config.pretrained:
        return None
    if not Path(shipped).exists():
        logger.warning("toothseg's pretrained detector %s is missing: the first training starts from random weights",
                       shipped)
        return None
    made_for = read_record(shipped)["architecture"]
    if made_for != architecture(config):
        logger.info("the first training starts from random weights: the pretrained detector's architecture %s "
                    "is not this training's %s", made_for, architecture(config))
        return None
    return Path(shipped)
