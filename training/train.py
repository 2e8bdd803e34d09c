"""Train a YOLOv8-seg tooth model with ultralytics' trainer and toothseg's changes.

Two presets (`TRAIN_PRESET`), every value overridable by a TRAIN_* environment variable (see
README) or by the caller:

- "small" (the default), chosen by measurement for projects of 5-50 annotated images on a CPU
  (`bench/bench_loop.py`): the length is given in optimizer steps, not epochs (with 7
  training images an epoch is a handful of steps), the batch is small so those steps are many,
  the learning rate is high enough to train from scratch, the tooth super-class is on, and the
  augmentations keep positions meaningful (no mosaic, small translation and scaling: FDI numbers
  depend on where a tooth is on the arch). A time budget (`time_budget`, minutes) ends training
  early enough for the job to promote within it: after each epoch the epochs that still fit are
  estimated, and the learning-rate schedule is compressed to end with them.
- "paper": the paper's protocol (Table 2) for large projects on a GPU: SGD, lr 1e-3, batch 10,
  100 epochs, ultralytics' augmentations with mosaic, no time budget.

In both, one optimizer step per batch: ultralytics' nominal batch `nbs` is set to the batch size,
since its default of 64 accumulates several batches per step. Horizontal flips (`fliplr`, half
of the images by default: chosen on the real radiographs' pool, `bench/results/real-selection.md`)
mirror the image and swap each tooth's FDI class with its mirror tooth
(`training.model_changes.MirrorFlip`): ultralytics' own flip would teach an "11" where a "21"
belongs. A project whose images are smaller than `imgsz` trains at their own size
(`TrainConfig.fitted`). Validation (best.pt, early stopping) uses the STS primary score on the
validation images when they are given (`training.model_changes`); with fewer than
`best_min_val_images` of them (3: a project of under about 15 annotated images) the last epoch is
returned instead of best.pt: one image's score ranks epochs by chance.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

from training.model_changes import ModelChanges, trainer_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (names as ultralytics' train arguments where it has them).

    preset: the named defaults (PRESETS) the other values started from; model_cfg: ultralytics
    model yaml of a first training without starting weights; steps: optimizer steps (0: train
    `epochs` epochs); epochs: used when steps is 0; warmup_steps: learning-rate warm-up (0: use
    warmup_epochs); imgsz: training and prediction size (longest side, pixels); time_budget:
    minutes the training may take (0: no limit); warm_steps: optimizer steps of a training that
    starts from the project's current model (0: as steps); threads: torch CPU threads (0 = all cores);
    proto_stride: mask prototype stride (4 stock, 2 paper, 1); large_box_alpha: the large-box
    loss weight (0 = ultralytics' loss); tooth_class: the tooth super-class; cache: ultralytics'
    image cache ("ram", "disk" or ""); refiner_steps: optimizer steps of the learned mask refiner
    after the detector (`training.refiner_training`; 0: none, masks fall back to the guided filter);
    refiner_warm_steps: its steps when warm-started; sam_steps: optimizer steps tuning SAM's prompt
    encoder and mask decoder on the train split after the refiner, gated against the current SAM on
    the validation split (`training.sam_training`; 0: off, the shipped SAM serves);
    best_min_val_images: the fewest validation images whose score picks the returned epoch
    (best.pt), fewer return the last epoch's weights; pretrained: a first training without
    YOLO_WEIGHTS starts from toothseg's detector pretrained on synthetic panoramics
    (`training.pretrain`), else from random weights;
    the rest are ultralytics' arguments of the same name.
    """

    preset: str = "small"
    model_cfg: str = "yolov8n-seg.yaml"
    steps: int = 1500
    warm_steps: int = 500
    epochs: int = 0
    batch: int = 2
    lr0: float = 0.01
    optimizer: str = "SGD"
    imgsz: int = 640
    patience: int = 1000
    mosaic: float = 0.0
    translate: float = 0.05
    scale: float = 0.2
    fliplr: float = 0.5
    warmup_steps: int = 100
    warmup_epochs: float = 0.0
    close_mosaic: int = 0
    val_steps: int = 30
    best_min_val_images: int = 3
    time_budget: float = 9.0
    cache: str = "ram"
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    threads: int = 0  # torch threads on CPU; 0 = all cores
    proto_stride: int = 4
    large_box_alpha: float = 4.0
    tooth_class: bool = True
    refiner_steps: int = 200
    refiner_warm_steps: int = 100
    sam_steps: int = 0
    pretrained: bool = True

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, defaults: dict | None = None,
                 **overrides) -> "TrainConfig":
        """The preset named by TRAIN_PRESET (or `overrides["preset"]`; default "small"), then
        `defaults` (e.g. the serving DEVICE), then TRAIN_<FIELD> environment variables (e.g.
        TRAIN_STEPS=800), then `overrides`."""
        env = os.environ if env is None else env
        name = overrides.get("preset") or env.get("TRAIN_PRESET") or "small"
        base = replace(preset(name), **(defaults or {}))
        values = {}
        for f in fields(cls):
            raw = env.get(f"TRAIN_{f.name.upper()}")
            if f.name != "preset" and raw not in (None, ""):
                kind = type(getattr(base, f.name))
                try:
                    values[f.name] = _parse(kind, raw)
                except ValueError:
                    raise ValueError(f"TRAIN_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        return replace(base, **values, **{k: v for k, v in overrides.items() if k != "preset"})

    def as_dict(self) -> dict:
        return asdict(self)

    def changes(self, mean: float, std: float) -> ModelChanges:
        return ModelChanges(proto_stride=self.proto_stride, large_box_alpha=self.large_box_alpha,
                            tooth_class=self.tooth_class, mean=mean, std=std)

    def warm(self) -> "TrainConfig":
        """The configuration of a training warm-started from the project's current model."""
        warm = replace(self, refiner_steps=self.refiner_warm_steps) if self.refiner_steps > 0 else self
        return replace(warm, steps=self.warm_steps) if self.warm_steps > 0 and self.steps > 0 else warm

    def fitted(self, longest_side: int, stride: int = 32) -> "TrainConfig":
        """The configuration for images whose longest side is `longest_side` pixels: imgsz no larger
        than that, rounded up to the stride. An upscaled image adds pixels, not detail, and each
        step costs more of the budget (512x512 radiographs at imgsz 640: 1.56 times the pixels)."""
        fit = max(math.ceil(longest_side / stride) * stride, stride)
        return replace(self, imgsz=fit) if fit < self.imgsz else self

    def epochs_for(self, train_images: int) -> int:
        """Epochs that give `steps` optimizer steps on `train_images` images (or `epochs`)."""
        if self.steps <= 0:
            return max(self.epochs, 1)
        return max(math.ceil(self.steps / max(math.ceil(train_images / self.batch), 1)), 1)


def _parse(kind: type, raw: str):
    if kind is bool:
        if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(raw)
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return kind(raw)


PRESETS: dict[str, dict] = {
    "small": {},
    "paper": dict(steps=0, warm_steps=0, epochs=100, batch=10, lr0=1e-3, optimizer="SGD", mosaic=1.0,
                  translate=0.1, scale=0.5, warmup_steps=0, warmup_epochs=3.0, close_mosaic=10, val_steps=1,
                  patience=100, time_budget=0.0, cache="", proto_stride=2),
}
"""Named training defaults: "small" is TrainConfig's own defaults, "paper" the paper's Table 2."""


PREDATING: dict[str, object] = {"fliplr": 0.0, "best_min_val_images": 0, "pretrained": False}
"""Settings added after trainings were first recorded (registry meta "hyperparameters"), each with
the value that gives the behaviour from before it existed: a record without it trained so."""


def recorded(hyperparameters: dict) -> dict:
    """A training's recorded hyperparameters, completed with `PREDATING` for settings it predates."""
    return {**PREDATING, **hyperparameters} if hyperparameters else {}


def preset(name: str) -> TrainConfig:
    """The TrainConfig of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown TRAIN_PRESET {name!r} (one of {', '.join(PRESETS)})")
    return TrainConfig(preset=name, **PRESETS[name])


def _count_files(folder: Path) -> int:
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


@dataclass
class TrainResult:
    weights: Path
    seconds: float
    epochs_run: int
    steps_run: int
    epochs_planned: int
    stopped_by: str  # "steps", "budget", "patience" or "interrupted"
    started_from: str = "scratch"  # the warm-start weights, or "scratch"


class _Budget:
    """ultralytics callback: after each epoch, set the run's length (and its learning-rate schedule)
    to the planned epochs or to those that still fit before `deadline` (time.monotonic seconds),
    whichever is fewer; the estimate uses the mean epoch time so far."""

    def __init__(self, deadline: float | None, planned: int):
        self.deadline = deadline
        self.planned = planned
        self.cut = False

    def __call__(self, trainer) -> None:
        if self.deadline is None or trainer.stop:
            return
        done = trainer.epoch + 1 - trainer.start_epoch
        per_epoch = (time.time() - trainer.train_time_start) / max(done, 1)
        fits = trainer.epoch + 1 + int(max(self.deadline - time.monotonic(), 0.0) // per_epoch)
        epochs = max(min(fits, self.planned), trainer.epoch + 1)
        self.cut = fits < self.planned
        if epochs != trainer.epochs:
            trainer.epochs = trainer.args.epochs = epochs
            trainer._setup_scheduler()
            trainer.scheduler.last_epoch = trainer.epoch
            trainer.stop = trainer.epoch + 1 >= epochs


class _Interrupt:
    """ultralytics callback: after each batch, stop the run when `interrupt()` says so (asked at most
    every `every_s` seconds): the epoch ends there and training returns."""

    def __init__(self, interrupt: Callable[[], bool], every_s: float = 1.0):
        self.interrupt = interrupt
        self.every_s = every_s
        self.asked = 0.0
        self.hit = False

    def __call__(self, trainer) -> None:
        now = time.monotonic()
        if self.hit or now - self.asked < self.every_s:
            return
        self.asked = now
        if self.interrupt():
            self.hit = trainer.stop = True


def train_model(data_yaml: Path, run_dir: Path, config: TrainConfig, mean: float, std: float,
                warm_start: Path | None = None,
                on_epoch: Callable[[int, int, dict], None] | None = None,
                val_items: Sequence = (), val_options=None,
                deadline: float | None = None, train_images: int | None = None,
                interrupt: Callable[[], bool] | None = None) -> TrainResult:
    """Train on `data_yaml`; the run's files go to `run_dir`. `warm_start`: weights to start from.
    `on_epoch(epoch, epochs, metrics)` is called after each epoch. `val_items` (`DatasetItem`s):
    score epochs with the STS metrics through the pipeline with `val_options` (a PipelineOptions;
    default: the pipeline's defaults without SAM), else ultralytics' mAP. `deadline` (time.monotonic
    seconds): end training by then (default: `config.time_budget` minutes from now).
    `train_images`: size of the train split (read from the dataset when None). `interrupt()`: asked
    between batches (about once a second); True stops the training there (stopped_by
    "interrupted"). Returns the weights
    of the epoch the validation score ranks first (best.pt), or of the last epoch when there are
    fewer than `config.best_min_val_images` validation images."""
    from ultralytics import YOLO

    from backend.process import set_torch_threads

    set_torch_threads(config.threads)
    if deadline is None and config.time_budget > 0:
        deadline = time.monotonic() + config.time_budget * 60
    if train_images is None:
        train_images = _count_files(Path(data_yaml).parent / "images" / "train")
    epochs = config.epochs_for(train_images)
    steps_per_epoch = max(math.ceil(train_images / config.batch), 1)
    warmup_epochs = config.warmup_steps / steps_per_epoch if config.warmup_steps > 0 else config.warmup_epochs
    model = YOLO(str(warm_start) if warm_start else config.model_cfg, task="segment")
    budget = _Budget(deadline, epochs)
    model.add_callback("on_fit_epoch_end", budget)
    stopper = _Interrupt(interrupt) if interrupt is not None else None
    if stopper is not None:
        model.add_callback("on_train_batch_end", stopper)
    if on_epoch is not None:
        model.add_callback("on_fit_epoch_end", lambda tr: on_epoch(
            min(tr.epoch + 1, tr.epochs), tr.epochs, {k: float(v) for k, v in (tr.metrics or {}).items()}))
    run_dir = Path(run_dir)
    start = time.perf_counter()
    model.train(
        trainer=trainer_for(config.changes(mean, std), val_items, val_options,
                            math.ceil(config.val_steps / steps_per_epoch)), data=str(data_yaml),
        epochs=epochs, batch=config.batch, imgsz=config.imgsz, optimizer=config.optimizer, lr0=config.lr0,
        patience=config.patience, mosaic=config.mosaic, translate=config.translate, scale=config.scale,
        warmup_epochs=warmup_epochs, nbs=config.batch, seed=config.seed, deterministic=True,
        device=config.device, workers=config.workers, cache=config.cache or False, project=str(run_dir.parent),
        name=run_dir.name, exist_ok=True, mask_ratio=config.proto_stride, fliplr=config.fliplr,
        close_mosaic=config.close_mosaic, plots=False, amp=False, verbose=False, val=True,
    )
    trainer = model.trainer
    val_images = len(val_items) if val_items else _count_files(Path(data_yaml).parent / "images" / "val")
    best = Path(trainer.best) if Path(trainer.best).exists() else Path(trainer.last)
    if val_images < config.best_min_val_images and Path(trainer.last).exists():
        # one or two images cannot rank epochs (bench/results/real-selection.md); the
        # time-compressed schedule ends on the most trained epoch
        best = Path(trainer.last)
    epochs_run = int(trainer.epoch) + 1
    stopped_by = ("interrupted" if stopper is not None and stopper.hit else
                  "budget" if budget.cut else "steps" if epochs_run >= epochs else "patience")
    return TrainResult(weights=best, seconds=time.perf_counter() - start, epochs_run=epochs_run,
                       steps_run=epochs_run * steps_per_epoch, epochs_planned=epochs, stopped_by=stopped_by,
                       started_from=str(warm_start) if warm_start else "scratch")
