"""Train a YOLOv8-seg tooth model with ultralytics' trainer and the paper's changes.

Defaults follow the paper's protocol (Table 2): SGD, lr 1e-3, batch 10, 100 epochs, with one
optimizer step per batch: ultralytics' nominal batch `nbs` is set to the batch size, since its
default of 64 accumulates 7 batches of 10 per step, and a 20-image round would step once every
few epochs. Every
hyperparameter can be overridden by a TRAIN_* environment variable (see README) or by the
caller. Horizontal flips are off: mirroring a panoramic image swaps the patient's sides, so
an "11" would be taught where a "21" belongs.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

from training.model_changes import ModelChanges, trainer_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (names as ultralytics' train arguments).

    model_cfg: ultralytics model yaml of a first training without starting weights; imgsz: training
    and prediction size (longest side, pixels); threads: torch CPU threads (0 = all cores);
    proto_stride: mask prototype stride (4 stock, 2 paper, 1); large_box_alpha: the large-box loss
    weight (0 = ultralytics' loss); the rest are ultralytics' arguments of the same name.
    """

    model_cfg: str = "yolov8n-seg.yaml"
    epochs: int = 100
    batch: int = 10
    lr0: float = 1e-3
    optimizer: str = "SGD"
    imgsz: int = 640
    patience: int = 100
    mosaic: float = 1.0
    warmup_epochs: float = 3.0
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    threads: int = 0  # torch threads on CPU; 0 = all cores
    proto_stride: int = 2
    large_box_alpha: float = 4.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "TrainConfig":
        """Defaults, then TRAIN_<FIELD> environment variables (e.g. TRAIN_EPOCHS=5), then `overrides`."""
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(f"TRAIN_{f.name.upper()}")
            if raw not in (None, ""):
                kind = type(getattr(cls(), f.name))
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ValueError(f"TRAIN_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        return replace(cls(**values), **overrides)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    weights: Path
    seconds: float
    epochs_run: int


def train_model(data_yaml: Path, run_dir: Path, config: TrainConfig, mean: float, std: float,
                warm_start: Path | None = None,
                on_epoch: Callable[[int, int, dict], None] | None = None) -> TrainResult:
    """Train on `data_yaml`; the run's files go to `run_dir`. `warm_start`: weights to start from.
    `on_epoch(epoch, epochs, metrics)` is called after each epoch. Returns the best weights."""
    from ultralytics import YOLO

    from backend.runtime import set_torch_threads

    set_torch_threads(config.threads)
    changes = ModelChanges(proto_stride=config.proto_stride, large_box_alpha=config.large_box_alpha,
                           mean=mean, std=std)
    model = YOLO(str(warm_start) if warm_start else config.model_cfg, task="segment")
    if on_epoch is not None:
        model.add_callback("on_fit_epoch_end", lambda tr: on_epoch(
            min(tr.epoch + 1, tr.epochs), tr.epochs, {k: float(v) for k, v in (tr.metrics or {}).items()}))
    run_dir = Path(run_dir)
    start = time.perf_counter()
    model.train(
        trainer=trainer_for(changes), data=str(data_yaml), epochs=config.epochs, batch=config.batch,
        imgsz=config.imgsz, optimizer=config.optimizer, lr0=config.lr0, patience=config.patience,
        mosaic=config.mosaic, warmup_epochs=config.warmup_epochs, nbs=config.batch, seed=config.seed,
        deterministic=True, device=config.device,
        workers=config.workers, project=str(run_dir.parent), name=run_dir.name, exist_ok=True,
        mask_ratio=config.proto_stride, fliplr=0.0, plots=False, amp=False, verbose=False, val=True,
    )
    trainer = model.trainer
    best = Path(trainer.best) if Path(trainer.best).exists() else Path(trainer.last)
    return TrainResult(weights=best, seconds=time.perf_counter() - start, epochs_run=int(trainer.epoch) + 1)
