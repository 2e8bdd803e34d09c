"""Label efficiency of the annotation loop with a simulated oracle (`toothseg simulate`,
bench/bench_loop.py).

The experiment (`run_loop`), on synthetic panoramics (`training.synth.generate`, image i drawn
with `synth.sample_seed(seed, i)`): `seed_images` labeled images, a pool of `pool` unlabeled ones
and a fixed held-out test set of `test` images.

- Round 0: a detector trained from scratch on the seed images (`LoopConfig.first`), shared by
  every strategy; its test scores are the 20-image baseline.
- Rounds 1..`rounds`, per strategy: the strategy's previous model pre-annotates the pool, the
  strategy picks `per_round` images by task score (the mean numbering confidence of an image's
  teeth, `backend.model.task_score`): most confident first (the paper), random, or least
  confident first. The oracle corrects the picked pre-annotations to the ground truth, counting
  its work (`oracle_count`); the images join the labeled set with their ground-truth masks, the
  model is retrained warm-started from the previous round's weights (`LoopConfig.warm`) and
  scored on the test set.
- Control, "no-new-labels": the same warm-started retraining each round on the seed images only,
  so the gain that comes from the extra epochs alone is visible.
- Ablations on the seed images with the first model's budget: the paper's model, stock Proto
  (`proto_stride` 4 instead of 2), ultralytics' loss (`large_box_alpha` 0 instead of 4), arg-max
  labels instead of Hungarian numbering and YOLO masks without SAM (the last two: the same
  model, other `PipelineOptions`).

Every pre-annotation and test score uses the full pipeline (`backend.pipeline.Pipeline`:
detector, Hungarian numbering, SAM box refinement, `min_score` 0.25) with a SAM built by
`segment_anything`'s builders, random weights unless a checkpoint is given; test scores are the
STS 2024 metrics (`training.metrics`, "sts" NSD). The pool is scored by detector and numbering
alone and only the picked images go through SAM: SAM replaces masks but never adds, drops or
renumbers a tooth (`SamRefiner.refine` keeps a SAM mask only where it overlaps YOLO's), so task
scores and picks are exactly those of the full pipeline, and the oracle sees full-pipeline
pre-annotations, at a fraction of the SAM cost.

Oracle (`oracle_count`): pre-annotated regions and ground-truth teeth are matched one to one by
`scipy.optimize.linear_sum_assignment`, maximising the summed IoU over the pairs whose IoU >
`MATCH_IOU` (0.1); other pairs are never matched. A matched region with IoU >= `ACCEPT_IOU` (0.9)
is accepted if its label is the tooth's, else relabeled; a matched region with a lower IoU is
redrawn (whatever its label); a ground-truth tooth without a match is added, a region without a
match deleted. The oracle's actions are relabeled + redrawn + added + deleted.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from backend.instance import Instance, mask_box

if TYPE_CHECKING:
    from backend.images import XrayImage
    from backend.pipeline import Pipeline
    from training.dataset import LabeledImage
    from training.metrics import Scores
    from training.synth import SynthSample
    from training.train import TrainConfig

MATCH_IOU = 0.1
"""A region and a ground-truth tooth are matched only if their IoU is greater than this."""
ACCEPT_IOU = 0.9
"""A matched region with at least this IoU needs no redrawing."""

STRATEGIES: tuple[str, ...] = ("most-confident", "random", "least-confident")
CONTROL = "no-new-labels"
SEED_ROUND = "seed"
PRESETS: tuple[str, ...] = ("default", "smoke", "full")


# --- the oracle ----------------------------------------------------------------------------

@dataclass(frozen=True)
class OracleCount:
    """What the oracle did to turn pre-annotations into ground truth: numbers of regions, and the
    summed IoU of the matched region-tooth pairs."""

    accepted: int = 0
    relabeled: int = 0
    redrawn: int = 0
    added: int = 0
    deleted: int = 0
    matched_iou: float = 0.0

    @property
    def actions(self) -> int:
        """Regions the oracle had to touch: relabeled + redrawn + added + deleted."""
        return self.relabeled + self.redrawn + self.added + self.deleted

    @property
    def mean_match_iou(self) -> float:
        """Mean IoU of the matched pairs (0 without matches): how close the redrawn regions were."""
        matched = self.accepted + self.relabeled + self.redrawn
        return self.matched_iou / matched if matched else 0.0

    def __add__(self, other: OracleCount) -> OracleCount:
        return OracleCount(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def iou_matrix(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """IoU (len(a), len(b)) of two lists of (H, W) bool masks; computed on the pair's bounding
    boxes, 0 where the boxes do not overlap."""
    from training.metrics import iou

    boxes_a, boxes_b = [mask_box(m) for m in a], [mask_box(m) for m in b]
    out = np.zeros((len(a), len(b)))
    for i, (ax1, ay1, ax2, ay2) in enumerate(boxes_a):
        for j, (bx1, by1, bx2, by2) in enumerate(boxes_b):
            if max(ax1, bx1) < min(ax2, bx2) and max(ay1, by1) < min(ay2, by2):
                crop = (slice(int(min(ay1, by1)), int(max(ay2, by2))), slice(int(min(ax1, bx1)), int(max(ax2, bx2))))
                out[i, j] = iou(a[i][crop], b[j][crop])
    return out


def oracle_count(regions: Sequence[Instance], gt: Mapping[str, np.ndarray], match_iou: float = MATCH_IOU,
                 accept_iou: float = ACCEPT_IOU) -> OracleCount:
    """The oracle's work on one image: `regions` (pre-annotation; duplicate labels allowed) against
    `gt` ({FDI label: (H, W) bool mask}; empty masks ignored). Matching rule: module docstring."""
    from scipy.optimize import linear_sum_assignment

    labels = [label for label, mask in gt.items() if mask.any()]
    ious = iou_matrix([r.mask for r in regions], [gt[label] for label in labels])
    ious[ious <= match_iou] = 0.0  # not a candidate pair
    rows, cols = linear_sum_assignment(ious, maximize=True) if ious.size else ((), ())
    matches = [(i, j) for i, j in zip(rows, cols) if ious[i, j] > match_iou]
    close = [(i, j) for i, j in matches if ious[i, j] >= accept_iou]
    accepted = sum(1 for i, j in close if regions[i].label == labels[j])
    return OracleCount(accepted=accepted, relabeled=len(close) - accepted, redrawn=len(matches) - len(close),
                       added=len(labels) - len(matches), deleted=len(regions) - len(matches),
                       matched_iou=float(sum(ious[i, j] for i, j in matches)))


# --- strategies ----------------------------------------------------------------------------

def order_pool(scores: Mapping[str, float], strategy: str, rng: np.random.Generator) -> list[str]:
    """Pool keys in the order `strategy` labels them: "most-confident" (highest task score first),
    "least-confident" (lowest first), ties by key; "random" (a permutation of the sorted keys by `rng`)."""
    keys = sorted(scores)
    if strategy == "most-confident":
        return sorted(keys, key=lambda k: -scores[k])
    if strategy == "least-confident":
        return sorted(keys, key=lambda k: scores[k])
    if strategy == "random":
        return [keys[i] for i in rng.permutation(len(keys))]
    raise ValueError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")


def image_score(instances: Sequence[Instance]) -> float:
    """Task score of a pre-annotation: the mean confidence of its teeth (0 without teeth), as
    `backend.model.task_score` gives Label Studio."""
    from backend.model import task_score

    return task_score([{"score": inst.score} for inst in instances])


# --- configuration -------------------------------------------------------------------------

@dataclass(frozen=True)
class LoopConfig:
    """One loop experiment. size: image (width, height) px; seed_images, pool, test: image counts;
    per_round: images labeled per round and strategy (K); first: training of the round-0 model and
    the ablations (from scratch); warm: training of later rounds (warm-started); sam: builder in
    `backend.sam.SAM_BUILDERS`, random weights unless `sam_checkpoint`; val_fraction: labeled
    images held out for ultralytics' validation (`split_train_val`); strategies: some of
    `STRATEGIES`; min_score: the pipeline's weakest numbering probability kept; seed: data, random
    picks and the random SAM weights."""

    first: TrainConfig
    warm: TrainConfig
    size: tuple[int, int] = (640, 320)
    seed_images: int = 20
    pool: int = 20
    test: int = 10
    per_round: int = 4
    rounds: int = 3
    strategies: tuple[str, ...] = STRATEGIES
    sam: str = "vit_tiny"
    sam_checkpoint: Path | None = None
    device: str = "cpu"
    val_fraction: float = 0.15
    min_score: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.strategies) - set(STRATEGIES)
        if unknown or not self.strategies:
            raise ValueError(f"strategies must be some of {', '.join(STRATEGIES)}, got {self.strategies}")
        if min(self.seed_images - 1, self.test, self.per_round, self.rounds, self.first.epochs, self.warm.epochs) < 1:
            raise ValueError("need at least 2 seed images, 1 test image, 1 image per round, 1 round and 1 epoch")
        if self.rounds * self.per_round > self.pool:
            raise ValueError(f"{self.rounds} rounds of {self.per_round} images need a pool of at least "
                             f"{self.rounds * self.per_round}, got {self.pool}")


def preset(name: str, device: str = "cpu") -> LoopConfig:
    """A named LoopConfig. "default": about 20 min on 2 CPU cores (640x320 images at imgsz 320,
    80 epochs from scratch with lr0 0.02 and no mosaic, 10 warm epochs, 3 rounds of 4 from a pool
    of 20, 10 test images, vit_tiny SAM); "smoke": a 1-epoch run of tiny images (under a minute);
    "full": the paper's protocol for a GPU (SGD, lr0 1e-3, batch 10, 100 epochs per round,
    2048x1024 images at imgsz 1024, vit_b SAM, 4 rounds of 20 from a pool of 200, 50 test images)."""
    from training.train import TrainConfig

    if name == "default":
        scratch = TrainConfig(epochs=80, batch=4, imgsz=320, lr0=0.02, mosaic=0.0, device=device)
        return LoopConfig(first=scratch, warm=replace(scratch, epochs=10, warmup_epochs=0.0), device=device)
    if name == "smoke":
        tiny = TrainConfig(epochs=1, batch=4, imgsz=160, lr0=0.02, mosaic=0.0, warmup_epochs=0.0, device=device)
        return LoopConfig(first=tiny, warm=tiny, size=(320, 160), seed_images=4, pool=4, test=2, per_round=2,
                          rounds=2, device=device)
    if name == "full":
        paper = TrainConfig(imgsz=1024, workers=8, device=device)
        return LoopConfig(first=paper, warm=paper, size=(2048, 1024), pool=200, test=50, per_round=20, rounds=4,
                          sam="vit_b", device=device)
    raise ValueError(f"unknown preset {name!r} (one of {', '.join(PRESETS)})")


# --- records -------------------------------------------------------------------------------

@dataclass
class RoundRecord:
    """One round of one strategy: the images labeled so far, the oracle's work on this round's
    picks (summed over them), the retrained model's test scores and its training time."""

    round: int
    strategy: str
    labeled: int
    picked: tuple[str, ...]
    oracle: OracleCount
    cumulative_actions: int
    scores: Scores
    train_seconds: float

    @property
    def actions_per_image(self) -> float:
        return self.oracle.actions / len(self.picked) if self.picked else 0.0


@dataclass
class AblationRecord:
    """One variant of the paper's method on the seed images: its switches, test scores and the
    seconds of its extra training (None: the paper's model, no extra training)."""

    name: str
    proto_stride: int
    large_box_alpha: float
    hungarian: bool
    use_sam: bool
    scores: Scores
    train_seconds: float | None
    note: str = ""


@dataclass
class LoopResult:
    """All rounds (round 0 once, as strategy "seed"), the control, the ablations, the run's seconds,
    and by kind of work (`WORK_KINDS`) the units done and the seconds they took."""

    config: LoopConfig
    rounds: list[RoundRecord] = field(default_factory=list)
    ablations: list[AblationRecord] = field(default_factory=list)
    seconds: float = 0.0
    work: dict[str, float] = field(default_factory=dict)
    work_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def baseline(self) -> RoundRecord:
        return next(r for r in self.rounds if r.strategy == SEED_ROUND)

    def curve(self, strategy: str) -> list[RoundRecord]:
        """Round 0, then `strategy`'s rounds in order."""
        return [self.baseline] + [r for r in self.rounds if r.strategy == strategy]


# --- progress and time estimate ------------------------------------------------------------

WORK_KINDS = ("train", "sam", "plain")
"""Units of work: training image-epochs; images through the pipeline with SAM; without SAM."""


def planned_work(config: LoopConfig) -> dict[str, float]:
    """Units of each kind of work `run_loop` does with `config`."""
    s, k, n0 = len(config.strategies), config.per_round, config.seed_images
    train = 3 * n0 * config.first.epochs  # round 0, stock Proto, ultralytics' loss
    train += sum((s * (n0 + r * k) + n0) * config.warm.epochs for r in range(1, config.rounds + 1))
    evaluations = 4 + (s + 1) * config.rounds  # round 0, arg-max, 2 ablation models, strategies, control
    plain = config.test + s * sum(config.pool - (r - 1) * k for r in range(1, config.rounds + 1))
    return {"train": float(train), "sam": float(evaluations * config.test + s * config.rounds * k),
            "plain": float(plain)}


class Progress:
    """Prints each step with the elapsed time and, once every kind of work has been measured, an
    estimate of the time left (measured seconds per unit times the units left)."""

    def __init__(self, planned: dict[str, float], log: Callable[[str], None] = print):
        self.planned = planned
        self.done = dict.fromkeys(WORK_KINDS, 0.0)
        self.seconds = dict.fromkeys(WORK_KINDS, 0.0)
        self.log = log
        self.start = time.perf_counter()

    def record(self, kind: str, units: float, seconds: float) -> None:
        self.done[kind] += units
        self.seconds[kind] += seconds

    def left(self) -> float | None:
        """Estimated seconds left; None while a kind of work with units left is not measured yet."""
        total = 0.0
        for kind in WORK_KINDS:
            remaining = max(self.planned[kind] - self.done[kind], 0.0)
            if remaining and not self.done[kind]:
                return None
            total += remaining * self.seconds[kind] / self.done[kind] if remaining else 0.0
        return total

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, message: str) -> None:
        left = self.left()
        estimate = f", ~{_clock(left)} left" if left is not None else ""
        self.log(f"[{_clock(self.elapsed())} elapsed{estimate}] {message}")


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


# --- the experiment ------------------------------------------------------------------------

class LoopData:
    """A run's synthetic images: `keys` by part ("seed", "pool", "test": seed000, pool000, test000,
    ...), `samples` by key, drawn in that order with `synth.sample_seed(config.seed, i)`."""

    def __init__(self, config: LoopConfig):
        from training.synth import generate, sample_seed

        counts = {"seed": config.seed_images, "pool": config.pool, "test": config.test}
        self.keys: dict[str, list[str]] = {}
        self.samples: dict[str, SynthSample] = {}
        index = 0
        for part, n in counts.items():
            self.keys[part] = [f"{part}{i:03d}" for i in range(n)]
            for key in self.keys[part]:
                self.samples[key] = generate(sample_seed(config.seed, index), config.size)
                index += 1

    def item(self, key: str) -> LabeledImage:
        """The image `key` with its ground-truth masks."""
        from training.dataset import LabeledImage

        return LabeledImage(key, self.samples[key].image, self.samples[key].masks())


def _xray(pixels: np.ndarray, key: str) -> XrayImage:
    from backend.images import XrayImage, pixel_hash

    return XrayImage(pixels, pixel_hash(pixels), key)


class _Runner:
    """Trains, pre-annotates and scores for `run_loop`, timing each step in `progress`."""

    def __init__(self, config: LoopConfig, data: LoopData, work: Path, progress: Progress, show_bars: bool):
        from backend.sam import EmbeddingCache, SamRefiner, build_sam

        self.config, self.data, self.work, self.progress, self.show_bars = config, data, work, progress, show_bars
        self.test = [data.item(key) for key in data.keys["test"]]
        sam = build_sam(config.sam, config.sam_checkpoint, config.device)
        cache = EmbeddingCache(capacity=config.test + config.pool)
        self.refiner = SamRefiner(sam, f"{config.sam}-simulation", cache, batch_size=4)

    def train(self, name: str, keys: Sequence[str], config: TrainConfig, warm_start: Path | None) -> tuple[Path, float]:
        """Train on the images `keys` (split into train/val by key); returns (best weights, seconds)."""
        from tqdm import tqdm

        from backend.preprocess import pixel_statistics
        from training.dataset import split_train_val, write_yolo_dataset
        from training.train import train_model

        start = time.perf_counter()
        items = {key: self.data.item(key) for key in keys}
        train_keys, val_keys = split_train_val(list(keys), self.config.val_fraction)
        folder = self.work / name
        data_yaml = write_yolo_dataset([items[k] for k in train_keys], [items[k] for k in val_keys],
                                       folder / "dataset")
        mean, std = pixel_statistics([items[k].pixels for k in train_keys])
        with tqdm(total=config.epochs, desc=f"  {name}", unit="epoch", leave=False,
                  disable=not self.show_bars) as bar:
            result = train_model(data_yaml, folder / "run", config, mean, std, warm_start,
                                 on_epoch=lambda epoch, epochs, metrics: bar.update(epoch - bar.n))
        seconds = time.perf_counter() - start
        self.progress.record("train", len(keys) * config.epochs, seconds)
        return result.weights, seconds

    def pipeline(self, weights: Path, hungarian: bool = True, use_sam: bool = True) -> Pipeline:
        from backend.detector import Detector
        from backend.pipeline import Pipeline, PipelineOptions

        options = PipelineOptions(min_score=self.config.min_score, hungarian=hungarian, use_sam=use_sam)
        return Pipeline(Detector.load(weights, device=self.config.device), self.refiner, options)

    def evaluate(self, pipeline: Pipeline) -> Scores:
        """Mean STS scores of `pipeline` on the test set ("sts" NSD)."""
        from training.evaluate import score_pipeline

        start = time.perf_counter()
        scores = score_pipeline(pipeline, self.test, nsd="sts")
        self.progress.record("sam" if pipeline.options.use_sam else "plain", len(self.test),
                             time.perf_counter() - start)
        return scores

    def label_round(self, weights: Path, pool: Sequence[str], strategy: str, rng: np.random.Generator
                    ) -> tuple[list[str], OracleCount]:
        """Score `pool` with the model, pick this round's images by `strategy`, pre-annotate them with
        the full pipeline and count the oracle's corrections; returns (picked keys, summed counts)."""
        from backend.pipeline import Pipeline

        start = time.perf_counter()
        full = self.pipeline(weights)
        plain = Pipeline(full.detector, None, replace(full.options, use_sam=False))
        scores = {key: image_score(plain.run(_xray(self.data.samples[key].image, key))) for key in pool}
        self.progress.record("plain", len(pool), time.perf_counter() - start)
        picked = order_pool(scores, strategy, rng)[:self.config.per_round]
        start = time.perf_counter()
        count = OracleCount()
        for key in picked:
            sample = self.data.samples[key]
            count += oracle_count(full.run(_xray(sample.image, key)), sample.masks())
        self.progress.record("sam", len(picked), time.perf_counter() - start)
        return picked, count


def run_loop(config: LoopConfig, work: Path, log: Callable[[str], None] = print, show_bars: bool = True) -> LoopResult:
    """Run the loop experiment, its control and the ablations (module docstring); training runs
    and datasets go under `work`."""
    import torch

    from backend.runtime import set_torch_threads

    set_torch_threads(config.first.threads)
    torch.manual_seed(config.seed)  # the random SAM weights
    progress = Progress(planned_work(config), log)
    result = LoopResult(config)
    data = LoopData(config)
    runner = _Runner(config, data, Path(work), progress, show_bars)
    seed_keys = data.keys["seed"]
    n0, k = config.seed_images, config.per_round
    progress.say(f"{len(data.samples)} synthetic images {config.size[0]}x{config.size[1]}; training the round-0 "
                 f"model on {n0} images ({config.first.epochs} epochs)")
    first, first_seconds = runner.train("round0", seed_keys, config.first, None)
    baseline = runner.evaluate(runner.pipeline(first))
    result.rounds.append(RoundRecord(0, SEED_ROUND, n0, (), OracleCount(), 0, baseline, first_seconds))
    progress.say(f"round 0: IA {baseline.ia:.3f}, instance Dice {baseline.instance_dice:.3f}; ablations of the "
                 "pipeline (same model)")
    paper = config.first
    ablations = [AblationRecord(f"paper: proto stride {paper.proto_stride}, large-box alpha "
                                f"{paper.large_box_alpha:g}, Hungarian, SAM", paper.proto_stride,
                                paper.large_box_alpha, True, True, baseline, None, "round 0's model")]
    ablations.append(AblationRecord("arg-max labels instead of Hungarian numbering", paper.proto_stride,
                                    paper.large_box_alpha, False, True,
                                    runner.evaluate(runner.pipeline(first, hungarian=False)), None, "same model"))
    sam_note = "same model; SAM has random weights: checks the mechanics only" if config.sam_checkpoint is None \
        else "same model"
    ablations.append(AblationRecord("no SAM refinement (YOLO masks)", paper.proto_stride, paper.large_box_alpha,
                                    True, False, runner.evaluate(runner.pipeline(first, use_sam=False)), None,
                                    sam_note))
    progress.say(f"estimate for the whole run: {_clock(progress.elapsed() + (progress.left() or 0.0))} "
                 "(measured rates times the work left)")

    chains = {name: (first, list(seed_keys), 0) for name in (*config.strategies, CONTROL)}
    pools = {name: list(data.keys["pool"]) for name in config.strategies}
    for r in range(1, config.rounds + 1):
        for name in (*config.strategies, CONTROL):
            weights, labeled, actions = chains[name]
            picked: list[str] = []
            count = OracleCount()
            if name != CONTROL:
                progress.say(f"round {r}/{config.rounds} {name}: pre-annotating {len(pools[name])} pool images, "
                             f"picking {k}")
                picked, count = runner.label_round(weights, pools[name], name,
                                                   np.random.default_rng([config.seed, r]))
                pools[name] = [key for key in pools[name] if key not in picked]
            labeled = labeled + picked
            progress.say(f"round {r}/{config.rounds} {name}: {count.actions} oracle actions; training on "
                         f"{len(labeled)} images ({config.warm.epochs} epochs, warm start)")
            weights, seconds = runner.train(f"{name}-round{r}", labeled, config.warm, weights)
            scores = runner.evaluate(runner.pipeline(weights))
            actions += count.actions
            chains[name] = (weights, labeled, actions)
            result.rounds.append(RoundRecord(r, name, len(labeled), tuple(picked), count, actions, scores, seconds))
            progress.say(f"round {r}/{config.rounds} {name}: IA {scores.ia:.3f}, instance Dice "
                         f"{scores.instance_dice:.3f}")

    for name, changed in (("stock Proto (proto stride 4)", {"proto_stride": 4}),
                          ("ultralytics' loss (large-box alpha 0)", {"large_box_alpha": 0.0})):
        progress.say(f"ablation: {name}, {n0} images, {paper.epochs} epochs from scratch")
        variant = replace(paper, **changed)
        weights, seconds = runner.train(f"ablation-{'-'.join(changed)}", seed_keys, variant, None)
        ablations.append(AblationRecord(name, variant.proto_stride, variant.large_box_alpha, True, True,
                                        runner.evaluate(runner.pipeline(weights)), seconds, "trained like round 0"))
    result.ablations = ablations
    result.seconds = progress.elapsed()
    result.work, result.work_seconds = dict(progress.done), dict(progress.seconds)
    progress.say("done")
    return result


# --- report --------------------------------------------------------------------------------

def summary(result: LoopResult) -> list[str]:
    """One line per strategy: final test IA and instance Dice against round 0 and the control, gain
    per 100 oracle actions; "beats the baseline" when the final primary score (mean of IA and
    instance Dice) is above round 0's."""
    base = result.baseline.scores
    control = result.curve(CONTROL)[-1].scores
    lines = []
    for name in result.config.strategies:
        last = result.curve(name)[-1]
        s, per = last.scores, 100.0 / max(last.cumulative_actions, 1)
        verdict = "beats" if s.primary > base.primary else "does not beat"
        lines.append(
            f"{name}: {verdict} the {result.baseline.labeled}-image baseline after {last.labeled} images and "
            f"{last.cumulative_actions} oracle actions: IA {base.ia:.3f} -> {s.ia:.3f} "
            f"({(s.ia - base.ia) * per:+.3f} per 100 actions), instance Dice {base.instance_dice:.3f} -> "
            f"{s.instance_dice:.3f} ({(s.instance_dice - base.instance_dice) * per:+.3f} per 100 actions); "
            f"{CONTROL} control (same training, no new labels): IA {control.ia:.3f}, instance Dice "
            f"{control.instance_dice:.3f}")
    return lines


def _rate(result: LoopResult, kind: str) -> str:
    """"N (X s each)": units of work of `kind` done and the seconds per unit."""
    units = result.work[kind]
    return f"{units:.0f} ({result.work_seconds[kind] / units if units else 0.0:.2f} s each)"


def _metrics(s: Scores) -> str:
    return " | ".join(f"{v:.3f}" for v in (s.image_dice, s.image_iou, s.image_nsd, s.instance_dice, s.instance_iou,
                                            s.instance_nsd, s.ia))


METRIC_HEADER = "img Dice | img IoU | img NSD | inst Dice | inst IoU | inst NSD | IA"


def format_report(result: LoopResult, command: str, machine: str | None = None, plot: str | None = None) -> str:
    """The markdown report: command, machine, setup, per-round table, ablation table, summary."""
    c = result.config
    sam = f"{c.sam}, {'random weights' if c.sam_checkpoint is None else c.sam_checkpoint.name}"

    def training(t: TrainConfig) -> str:
        return (f"{t.epochs} epochs, {t.optimizer} lr0 {t.lr0:g}, batch {t.batch}, mosaic {t.mosaic:g}, "
                f"warm-up {t.warmup_epochs:g} epochs")

    lines = ["# Label efficiency of the annotation loop (simulated oracle)", "", f"Command: `{command}`"]
    if machine:
        lines.append(f"Machine: {machine}")
    lines += [
        f"Run time: {result.seconds / 60:.1f} min: {_rate(result, 'train')} training image-epochs, "
        f"{_rate(result, 'sam')} images through detector + SAM (test images scored included), "
        f"{_rate(result, 'plain')} images through the detector alone.", "",
        f"Data: synthetic panoramics {c.size[0]}x{c.size[1]} (seed {c.seed}): {c.seed_images} labeled seed images, "
        f"a pool of {c.pool}, a held-out test set of {c.test}; {c.per_round} images labeled per round and strategy, "
        f"{c.rounds} rounds. YOLOv8n-seg at imgsz {c.first.imgsz} on {c.device}, proto stride "
        f"{c.first.proto_stride}, large-box alpha {c.first.large_box_alpha:g}, {c.val_fraction:.0%} of the labeled "
        f"images held out for validation. Round 0 from scratch: {training(c.first)}. Later rounds warm-started from "
        f"the previous round: {training(c.warm)}. Pipeline: detector, Hungarian numbering, SAM ({sam}), teeth "
        f"below {c.min_score:g} confidence dropped; the pool is ordered by task score (mean tooth confidence).",
        "",
        f"Oracle: regions and ground-truth teeth matched one to one by linear_sum_assignment on IoU (a match needs "
        f"IoU > {MATCH_IOU:g}); accepted: IoU >= {ACCEPT_IOU:g} and the right label; relabeled: IoU >= "
        f"{ACCEPT_IOU:g}, wrong label; redrawn: matched with IoU < {ACCEPT_IOU:g}; added: a tooth without a "
        "region; deleted: a region without a tooth. Actions = relabeled + redrawn + added + deleted. Counts are per "
        "image labeled in the round, match IoU the mean IoU of the matched pairs; scores are the test set's "
        "(STS 2024 metrics, \"sts\" NSD).",
        "",
        "## Per round",
        "",
        f"| round | strategy | labeled | actions/img | relabeled | redrawn | added | deleted | accepted | "
        f"match IoU | cum. actions | {METRIC_HEADER} | train s |",
        "|" + "---|" * 19,
    ]
    for r in result.rounds:
        n = max(len(r.picked), 1)
        o = r.oracle
        lines.append(f"| {r.round} | {r.strategy} | {r.labeled} | {r.actions_per_image:.1f} | "
                     f"{o.relabeled / n:.1f} | {o.redrawn / n:.1f} | {o.added / n:.1f} | {o.deleted / n:.1f} | "
                     f"{o.accepted / n:.1f} | {o.mean_match_iou:.2f} | {r.cumulative_actions} | "
                     f"{_metrics(r.scores)} | {r.train_seconds:.0f} |")
    lines += ["", f"## Ablations ({c.seed_images} seed images, round 0's training)", "",
              f"| variant | proto stride | large-box alpha | numbering | SAM | {METRIC_HEADER} | primary | "
              f"Δ primary | train s | note |",
              "|" + "---|" * 16]
    paper = result.ablations[0].scores.primary
    for a in result.ablations:
        seconds = f"{a.train_seconds:.0f}" if a.train_seconds is not None else "-"
        lines.append(f"| {a.name} | {a.proto_stride} | {a.large_box_alpha:g} | "
                     f"{'Hungarian' if a.hungarian else 'arg-max'} | {'yes' if a.use_sam else 'no'} | "
                     f"{_metrics(a.scores)} | {a.scores.primary:.3f} | {a.scores.primary - paper:+.3f} | {seconds} | "
                     f"{a.note} |")
    lines += ["", "Primary = (instance Dice + IA) / 2, the retraining gate's score.", "", "## Summary", ""]
    lines += [f"- {line}" for line in summary(result)]
    if plot:
        lines += ["", f"![IA and instance Dice against cumulative oracle actions]({plot})"]
    return "\n".join(lines) + "\n"


def plot_loop(result: LoopResult, path: Path) -> Path:
    """PNG of test IA and instance Dice against cumulative oracle actions, one line per strategy,
    the control's final value dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in zip(axes, ("ia", "instance_dice"), ("IA", "instance Dice")):
        for name in result.config.strategies:
            curve = result.curve(name)
            ax.plot([r.cumulative_actions for r in curve], [getattr(r.scores, metric) for r in curve], marker="o",
                    label=name)
        ax.axhline(getattr(result.curve(CONTROL)[-1].scores, metric), color="grey", linestyle="--",
                   label=f"{CONTROL} (final)")
        ax.set_xlabel("cumulative oracle actions")
        ax.set_ylabel(f"test {title}")
        ax.set_title(f"{title} vs oracle work")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- command line --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, results_dir: Path = Path(".")) -> None:
    """The options of `toothseg simulate` and bench/bench_loop.py; reports go to `results_dir`
    unless --out is given."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--smoke", action="store_true", help="tiny 1-epoch run (under a minute), to check the mechanics")
    which.add_argument("--full", action="store_true", help="the paper's protocol, for a GPU (about an hour or more)")
    parser.add_argument("--device", default="cpu", help="torch device for training, YOLO and SAM (default cpu)")
    parser.add_argument("--rounds", type=int, help="override the preset's number of rounds")
    parser.add_argument("--per-round", type=int, help="override the images labeled per round (K)")
    parser.add_argument("--pool", type=int, help="override the pool size")
    parser.add_argument("--test", type=int, help="override the test set size")
    parser.add_argument("--epochs", type=int, help="override the epochs of round 0 and the ablation trainings")
    parser.add_argument("--warm-epochs", type=int, help="override the epochs of the warm-started rounds")
    parser.add_argument("--sam-checkpoint", type=Path, help="SAM weights for the preset's builder (default: random)")
    parser.add_argument("--seed", type=int, default=0, help="data and random-pick seed (default 0)")
    parser.add_argument("--work", type=Path, help="keep training runs here (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, help="markdown report; the plot goes next to it as .png (default: "
                                                 f"{results_dir}/loop.md, loop-smoke.md or loop-full.md)")
    parser.set_defaults(results_dir=results_dir)


def config_from_args(args: argparse.Namespace) -> LoopConfig:
    """The preset chosen by --smoke/--full (else "default") with the command line's overrides."""
    config = preset("smoke" if args.smoke else "full" if args.full else "default", args.device)
    overrides = {name: getattr(args, name) for name in ("rounds", "per_round", "pool", "test", "sam_checkpoint")
                 if getattr(args, name) is not None}
    if args.epochs is not None:
        overrides["first"] = replace(config.first, epochs=args.epochs)
    if args.warm_epochs is not None:
        overrides["warm"] = replace(config.warm, epochs=args.warm_epochs)
    return replace(config, seed=args.seed, **overrides)


def run_from_args(args: argparse.Namespace, command: str, machine: str | None = None) -> LoopResult:
    """Run the experiment `args` describe, print the report and write it (markdown and PNG)."""
    import os

    os.environ.setdefault("YOLO_VERBOSE", "False")
    config = config_from_args(args)
    suffix = "-smoke" if args.smoke else "-full" if args.full else ""
    out = Path(args.out) if args.out else Path(args.results_dir) / f"loop{suffix}.md"
    planned = planned_work(config)
    print(f"plan: {int(planned['train'])} training image-epochs, {int(planned['sam'])} images through detector + "
          f"SAM, {int(planned['plain'])} through the detector alone; a time estimate follows once each is measured",
          flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="toothseg-loop-"))
    try:
        result = run_loop(config, work, log=lambda line: print(line, flush=True))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    png = plot_loop(result, out.with_suffix(".png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_report(result, command, machine, plot=png.name))
    print(out.read_text())
    print(f"wrote {out} and {png}")
    return result
