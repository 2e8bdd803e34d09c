"""Cold start and label efficiency of the annotation loop, with a simulated oracle
(`toothseg simulate`, bench/bench_loop.py).

Every model here is trained the way the product trains it: `training.jobs.run_round` (the retrain
job after its export: dataset, split by task id, training with the product's TRAIN_* defaults
and time budget, the promotion gate, the registry), on tasks whose images lie in a local-files
folder and whose annotations are Label Studio brush regions. Only the export from Label Studio is
replaced. So "time to promotion" is the job's time from the end of its export to its decision.

Per seed (image i drawn with `synth.sample_seed(seed, i)` at `SimConfig.size`): labeled images,
a pool and a held-out test set.

- Cold start, for each size in `SimConfig.cold_sizes` (8 and 20 annotated images): the first
  model of a new project, with the product's defaults, and with each of toothseg's small-data
  changes switched off in turn: the tooth super-class and the position-keeping augmentations
  (ultralytics' mosaic, translation and scale instead) need their own training; the arch
  geometry in the numbering (and each of its parts), the Hungarian assignment, the tooth-score
  threshold (the former one instead), the refiner's mirror pass, the learned mask refiner (the
  guided filter instead) and all mask refinement are switched off at prediction time on the
  default model. Each is scored on the test set: STS metrics and the
  oracle's actions per image, which say where the remaining error comes from (added: missed
  teeth; relabeled: wrong numbers; redrawn: loose masks; deleted: extra regions).
- Loop, per strategy: round 0 is the cold-start model of the smallest size. Each round the
  strategy's current model pre-annotates its remaining pool, the strategy picks `per_round`
  images by task score (most confident first: the paper; random; least confident first), the
  oracle corrects them (its actions are counted, `training.oracle`) and the retrain job runs on
  all labeled images (warm start, the product's warm-start length), gated as in the product.
- Control, "no-new-labels": the same retrain job each round on the first labeled images only,
  given as many optimizer steps as the strategies' retrains took that round.
- Reference, "fully supervised": the whole pool and the labeled images annotated, one first
  training with the product's defaults. A strategy's label efficiency is the cumulative oracle
  actions of the first round whose test IA and instance Dice both reach `REFERENCE_SHARE`
  (0.98) of the reference's, against the actions labeling the whole pool from scratch takes
  (one per tooth).

Every number is reported over the seeds as min / median / max. A seed's results are kept in
the work folder (`seed-<n>.json`), so an interrupted run resumes with the seeds it lacks; with
`--rescore` the cold-start figures of the seeds there are measured again on their kept models
(`rescore_seed`), for a change of pre-annotation without retraining.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from training.oracle import OracleCount, oracle_count

STRATEGIES: tuple[str, ...] = ("most-confident", "random", "least-confident")
CONTROL = "no-new-labels"
REFERENCE = "fully supervised"
REFERENCE_SHARE = 0.98
PRESETS: tuple[str, ...] = ("default", "smoke", "full")

COLD_VARIANTS: dict[str, dict[str, str]] = {
    "toothseg defaults": {},
    "no tooth super-class": {"TRAIN_TOOTH_CLASS": "false"},
    "mosaic, translation and scale (ultralytics' augmentation)": {"TRAIN_MOSAIC": "1.0", "TRAIN_TRANSLATE": "0.1",
                                                                 "TRAIN_SCALE": "0.5"},
}
"""Cold-start variants that need their own training: TRAIN_* settings over the product's."""
PREDICTION_VARIANTS: dict[str, dict] = {
    "no arch geometry (class probabilities only)": {"prior_weight": 0.0, "occlusal_weight": 0.0},
    "no occlusal-plane prior": {"occlusal_weight": 0.0},
    "arch lines fitted to the top labels (no search)": {"arch_search": False},
    "upper and lower midlines searched apart": {"midline_weight": 0.0},
    "arg-max labels (no Hungarian assignment)": {"hungarian": False},
    "tooth-score threshold 0.5 (SCORE_THRESHOLD before)": {"min_score": 0.5},
    "tooth-score threshold 0.25": {"min_score": 0.25},
    "all candidates numbered together (no SCORE_ANCHOR)": {"anchor_score": None},
    "no fallback for images without a candidate over the threshold (SCORE_FALLBACK=0)": {"fallback_score": 0.0},
    "learned mask refiner without its mirror pass": {"refiner_mirror": False},
    "guided filter instead of the learned mask refiner": {"mask_refiner": False},
    "no mask refinement": {"refine_masks": False},
}
"""Cold-start variants of the default model at prediction time: PipelineOptions fields."""


def image_score(instances) -> float:
    """Task score of a pre-annotation: the mean confidence of its teeth (0 without teeth), as
    `backend.formats.task_score` gives Label Studio."""
    from backend.formats import task_score

    return task_score([{"score": inst.score} for inst in instances])


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


# --- configuration -------------------------------------------------------------------------

@dataclass(frozen=True)
class SimConfig:
    """One simulation. size: image (width, height) px; cold_sizes: annotated images of the
    cold-start table (the loop starts from the first); pool, test: image counts; per_round: images
    labeled per round and strategy; rounds; strategies: some of STRATEGIES; seeds; cold_start,
    loop: which parts run; trained_variants: the cold-start table also trains the COLD_VARIANTS
    other than the defaults (False: only the defaults, whose prediction-time variants are still
    scored); sam / sam_checkpoint: SAM builder and weights for pre-annotations (none: YOLO masks);
    train_env: TRAIN_* settings over the environment's (empty: the product's defaults; only the
    smoke preset sets some, to run in seconds)."""

    size: tuple[int, int] = (2000, 1000)
    cold_sizes: tuple[int, ...] = (8, 20)
    pool: int = 16
    test: int = 10
    per_round: int = 8
    rounds: int = 2
    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0, 1, 2)
    cold_start: bool = True
    trained_variants: bool = True
    loop: bool = True
    device: str = "cpu"
    sam: str = "vit_b"
    sam_checkpoint: Path | None = None
    train_env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.strategies) - set(STRATEGIES)
        if unknown or not self.strategies:
            raise ValueError(f"strategies must be some of {', '.join(STRATEGIES)}, got {self.strategies}")
        if not self.cold_sizes or min(self.cold_sizes) < 2 or self.test < 1 or not self.seeds:
            raise ValueError("need at least 2 labeled images, 1 test image and 1 seed")
        if self.loop and self.rounds * self.per_round > self.pool:
            raise ValueError(f"{self.rounds} rounds of {self.per_round} images need a pool of at least "
                             f"{self.rounds * self.per_round}, got {self.pool}")

    @property
    def labeled(self) -> int:
        return max(self.cold_sizes)


def preset(name: str, device: str = "cpu") -> SimConfig:
    """A named SimConfig. "default": the product's training defaults on 2000x1000 images, cold
    start from 8 and 20 images, 2 rounds of 8 from a pool of 16, 10 test images, 3 seeds (hours on
    2 CPU cores: each training takes the product's time budget). "smoke": a mechanics check in
    about a minute (tiny images and a few training steps: not the product's defaults). "full": the
    paper's training preset for a GPU, 2048x1024 images, 4 rounds of 20 from a pool of 200."""
    if name == "default":
        return SimConfig(device=device)
    if name == "smoke":
        tiny = (("TRAIN_STEPS", "4"), ("TRAIN_WARM_STEPS", "2"), ("TRAIN_IMGSZ", "160"), ("TRAIN_WARMUP_STEPS", "0"),
                ("TRAIN_TIME_BUDGET", "0"), ("TRAIN_VAL_STEPS", "2"), ("TRAIN_REFINER_STEPS", "2"),
                ("TRAIN_REFINER_WARM_STEPS", "2"))
        return SimConfig(size=(320, 160), cold_sizes=(4,), pool=4, test=2, per_round=2, rounds=1, seeds=(0,),
                         device=device, train_env=tiny)
    if name == "full":
        return SimConfig(size=(2048, 1024), cold_sizes=(20, 50), pool=200, test=50, per_round=20, rounds=4,
                         device=device, train_env=(("TRAIN_PRESET", "paper"), ("TRAIN_IMGSZ", "1024")))
    raise ValueError(f"unknown preset {name!r} (one of {', '.join(PRESETS)})")


# --- records -------------------------------------------------------------------------------

@dataclass
class TestResult:
    """A model's figures on the test set: STS metrics (means) and the oracle's work per image."""

    ia: float
    instance_dice: float
    instance_nsd: float
    image_dice: float
    oracle: dict[str, float]  # accepted, relabeled, redrawn, added, deleted, actions: per image

    @classmethod
    def empty(cls, teeth_per_image: float) -> "TestResult":
        """No model: every tooth drawn by hand."""
        return cls(0.0, 0.0, 0.0, 0.0, {"accepted": 0.0, "relabeled": 0.0, "redrawn": 0.0,
                                       "added": teeth_per_image, "deleted": 0.0, "actions": teeth_per_image})


@dataclass
class TrainRecord:
    """One run of the retrain job: whether it promoted, its seconds and optimizer steps, and the
    test figures of the model the project serves afterwards (the candidate's if it was rejected
    are in `candidate`)."""

    name: str
    labeled: int
    promoted: bool
    seconds: float
    steps: int
    stopped_by: str
    served: TestResult
    candidate: TestResult
    reason: str = ""


@dataclass
class RoundRecord:
    """One round of one strategy (round 0: the cold-start model): the oracle's work on the round's
    picks (summed), the cumulative actions, and the retrain job's record."""

    round: int
    strategy: str
    picked: list[str]
    oracle: dict[str, float]
    cumulative_actions: float
    train: TrainRecord


@dataclass
class SeedResult:
    """Everything one seed produced."""

    seed: int
    pool_teeth: int
    cold: list[TrainRecord] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    reference: TrainRecord | None = None
    seconds: float = 0.0
    rescored: bool = False  # test figures measured again on the kept models (`rescore_seed`)

    def curve(self, strategy: str) -> list[RoundRecord]:
        return [r for r in self.rounds if r.strategy == strategy or r.round == 0]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "SeedResult":
        raw = json.loads(text)

        def record(d):
            return TrainRecord(**{**d, "served": TestResult(**d["served"]),
                                  "candidate": TestResult(**d["candidate"])})

        return cls(seed=raw["seed"], pool_teeth=raw["pool_teeth"], cold=[record(d) for d in raw["cold"]],
                   rounds=[RoundRecord(**{**r, "train": record(r["train"])}) for r in raw["rounds"]],
                   reference=record(raw["reference"]) if raw["reference"] else None, seconds=raw["seconds"],
                   rescored=bool(raw.get("rescored", False)))


# --- one seed ------------------------------------------------------------------------------

class SimProject:
    """A seed's synthetic images as Label Studio tasks on local files, and the retrain job on them.

    Keys: lab000... (labeled), pool000..., test000...; task ids grow in that order (labeled first),
    as Label Studio's do as a project grows. Projects are registry ids: each strategy, the control,
    the reference and each cold-start variant trains its own."""

    def __init__(self, config: SimConfig, seed: int, work: Path, log: Callable[[str], None]):
        import cv2

        from backend.formats import find_target
        from backend.label_config import render_label_config
        from training.data.synth import generate, label_studio_result, sample_seed

        self.config, self.seed, self.work, self.log = config, seed, work, log
        self.target = find_target(render_label_config())
        counts = {"lab": config.labeled, "pool": config.pool if config.loop else 0, "test": config.test}
        self.keys: dict[str, list[str]] = {}
        self.samples = {}
        self.task_ids: dict[str, int] = {}
        files = work / "files"
        files.mkdir(parents=True, exist_ok=True)
        index = 0
        for part, n in counts.items():
            self.keys[part] = [f"{part}{i:03d}" for i in range(n)]
            for key in self.keys[part]:
                sample = generate(sample_seed(seed, index), config.size)
                self.samples[key] = sample
                self.task_ids[key] = index + 1
                cv2.imwrite(str(files / f"{key}.png"), sample.image)
                index += 1
        self.results = {key: label_studio_result(self.samples[key].masks(), self.target) for key in self.samples}
        env = {**os.environ, **dict(config.train_env), "MODEL_DIR": str(work / "models"),
               "LOCAL_FILES_DOCUMENT_ROOT": str(work), "LABEL_STUDIO_URL": "", "DEVICE": config.device}
        from backend.settings import Settings
        from training.train import TrainConfig

        self.settings = Settings.from_env(env)
        self.env = env
        self.config_for = lambda extra: TrainConfig.from_env({**env, **extra}, device=config.device)
        self.test_items = [self.item(key) for key in self.keys["test"]]
        self.refiner = self._refiner()

    def _refiner(self):
        from backend.sam import EmbeddingCache, SamRefiner

        return SamRefiner.load(self.config.sam, self.config.sam_checkpoint, self.config.device,
                               EmbeddingCache(len(self.samples)), batch_size=self.settings.sam_batch_size,
                               min_iou=self.settings.sam_min_iou, min_agreement=self.settings.sam_min_agreement,
                               tile=self.settings.sam_tile)

    def item(self, key: str):
        return self.samples[key].item(key)

    def teeth(self, keys: Sequence[str]) -> int:
        return sum(len(self.samples[key].polygons) for key in keys)

    def exported(self, keys: Sequence[str]):
        """The export the retrain job would get: `keys` annotated with their ground truth."""
        from training.export import AnnotatedTask
        from training.jobs import Exported

        def url(key: str) -> str:
            return f"/data/local-files/?d=files/{key}.png"

        tasks = [AnnotatedTask(task_id=self.task_ids[k], data={self.target.value_key: url(k)},
                               annotation_id=self.task_ids[k], updated_at="2026-01-01T00:00:00+00:00",
                               ground_truth=True, result=self.results[k]) for k in keys]
        return Exported(self.target, sorted(tasks, key=lambda t: t.task_id), [])

    def pipeline(self, project: int, **options):
        from backend.detector import Detector
        from backend.pipeline import Pipeline, PipelineOptions
        from backend.registry import Registry

        current = Registry(self.settings.model_dir).current(project)
        if current is None:
            return None
        opts = PipelineOptions.from_settings(self.settings, **{"use_sam": self.refiner is not None, **options})
        return Pipeline(Detector.load(current.weights, device=self.config.device,
                                      conf=self.settings.detector_conf), self.refiner, opts)

    def run(self, project: int, name: str, keys: Sequence[str], extra_env: Mapping[str, str] | None = None,
            overrides: Mapping | None = None) -> TrainRecord:
        """The retrain job for `project` on `keys`, then the test figures of what it serves."""
        from backend.registry import Registry
        from training.jobs import Progress, run_round

        config = self.config_for(dict(extra_env or {}))
        if overrides:
            config = replace(config, **overrides)
        self.log(f"  {name}: retrain job on {len(keys)} annotated images (project {project})")
        report = Progress(str(project), config.time_budget * 60)
        summary = run_round(str(project), self.settings, self.exported(keys), f"sim-{project}-{len(keys)}", config,
                            report)
        registry = Registry(self.settings.model_dir)
        meta = registry.get(project, summary["version"]).meta
        served = self.score(project)
        candidate = served if summary["status"] == "promoted" else self.score_weights(
            registry.get(project, summary["version"]).weights)
        record = TrainRecord(name, len(keys), summary["status"] == "promoted", summary["seconds"],
                             int(meta.get("steps_run") or 0), str(meta.get("stopped_by") or ""), served, candidate,
                             summary["reason"])
        self.log(f"  {name}: {'promoted' if record.promoted else 'not promoted'} after {record.seconds:.0f} s "
                 f"({record.steps} steps, {record.stopped_by}); test IA {candidate.ia:.3f}, instance Dice "
                 f"{candidate.instance_dice:.3f}, {candidate.oracle['actions']:.1f} actions/image")
        return record

    def score(self, project: int, **options) -> TestResult:
        """Test figures of the model `project` serves (nothing served: every tooth drawn)."""
        pipeline = self.pipeline(project, **options)
        if pipeline is None:
            return TestResult.empty(self.teeth(self.keys["test"]) / len(self.keys["test"]))
        return self._score(pipeline)

    def score_weights(self, weights: Path) -> TestResult:
        from backend.detector import Detector
        from backend.pipeline import Pipeline, PipelineOptions

        opts = PipelineOptions.from_settings(self.settings, use_sam=self.refiner is not None)
        return self._score(Pipeline(Detector.load(weights, device=self.config.device,
                                                  conf=self.settings.detector_conf), self.refiner, opts))

    def _score(self, pipeline) -> TestResult:
        from backend.images import XrayImage
        from training.metrics import mean_scores, score_image

        scores, count = [], OracleCount()
        for item in self.test_items:
            instances = pipeline.run(XrayImage.of(item.pixels(), item.name))
            scores.append(score_image({i.label: i.mask for i in instances}, item.masks))
            count = count + oracle_count(instances, item.masks)
        s, n = mean_scores(scores), len(self.test_items)
        return TestResult(s.ia, s.instance_dice, s.instance_nsd, s.image_dice, per_image(count, n))

    def label(self, project: int, pool: Sequence[str], strategy: str, rng: np.random.Generator
              ) -> tuple[list[str], OracleCount]:
        """Pre-annotate `pool` with the project's model, pick this round's images by `strategy` and
        count the oracle's corrections of their pre-annotations."""
        from backend.images import XrayImage

        pipeline = self.pipeline(project)
        predictions = {}
        for key in pool:
            pixels = self.samples[key].image
            predictions[key] = pipeline.run(XrayImage.of(pixels, key)) if pipeline else []
        scores = {k: image_score(v) for k, v in predictions.items()}
        picked = order_pool(scores, strategy, rng)[:self.config.per_round]
        count = OracleCount()
        for key in picked:
            count = count + oracle_count(predictions[key], self.samples[key].masks())
        return picked, count

    def copy_current(self, source: int, target: int) -> None:
        """Start `target` from `source`'s current model (a version stored and promoted as it was);
        without one, `target` starts without a model too."""
        from backend.registry import Registry
        from backend.registry import promote, store_version

        registry = Registry(self.settings.model_dir)
        current = registry.current(source)
        if current is None:
            return
        version = store_version(registry, target, current.weights, {**current.meta, "version": None},
                                json.loads((current.path / "manifest.json").read_text()))
        promote(registry, target, version.version, f"round 0: project {source}'s {current.version}")


def per_image(count: OracleCount, images: int) -> dict[str, float]:
    """An OracleCount summed over `images` images, per image, with the actions."""
    values = {name: getattr(count, name) / images for name in ("accepted", "relabeled", "redrawn", "added", "deleted")}
    return values | {"actions": count.actions / images}


COLD_PROJECT, LOOP_PROJECT, CONTROL_PROJECT, REFERENCE_PROJECT = 100, 200, 299, 300
ORACLE_COLUMNS = ("actions", "added", "relabeled", "redrawn", "deleted")


def cold_projects(config: SimConfig):
    """(project, annotated images, variant, its TRAIN_* settings) of each cold-start training, in the
    order `run_seed` runs them (without the cold-start table: only the default from the first size;
    without `trained_variants`: only the defaults). A variant keeps its project number whether or
    not it runs, so a work folder is read the same way by either."""
    project = COLD_PROJECT
    for n in config.cold_sizes:
        for variant, env in COLD_VARIANTS.items():
            project += 1
            if (not config.cold_start and (n != config.cold_sizes[0] or env)) or (env and not config.trained_variants):
                continue
            yield project, n, variant, env


def prediction_variants(sim: SimProject, project: int, record: TrainRecord) -> list[TrainRecord]:
    """`record` (the default model's training) with the test figures of each PREDICTION_VARIANTS row."""
    out = []
    for name, options in PREDICTION_VARIANTS.items():
        served = sim.score(project, **options)
        out.append(replace(record, name=f"{record.labeled} images, {name}", served=served, candidate=served))
    return out


def run_seed(config: SimConfig, seed: int, work: Path, log: Callable[[str], None] = print) -> SeedResult:
    """The cold-start table, the loop, its control and the reference for one seed."""
    from backend.process import set_torch_threads

    set_torch_threads(0)
    start = time.perf_counter()
    work = Path(work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    sim = SimProject(config, seed, work, log)
    result = SeedResult(seed, sim.teeth(sim.keys["pool"]))
    labeled = sim.keys["lab"]
    n0 = config.cold_sizes[0]
    round0: TrainRecord | None = None
    for project, n, variant, env in cold_projects(config):
        log(f"seed {seed}: cold start from {n} images, {variant}")
        record = sim.run(project, f"{n} images, {variant}", labeled[:n], env)
        result.cold.append(record)
        if not env:
            if n == n0:
                round0 = record
                loop_source = project
            if config.cold_start:
                result.cold += prediction_variants(sim, project, record)
    if config.loop:
        result.rounds.append(RoundRecord(0, "seed", [], {}, 0.0, round0))
        names = [*config.strategies, CONTROL]
        projects = {name: LOOP_PROJECT + i for i, name in enumerate(config.strategies)} | {CONTROL: CONTROL_PROJECT}
        for name in names:
            sim.copy_current(loop_source, projects[name])
        state = {name: (list(labeled[:n0]), list(sim.keys["pool"]), 0.0) for name in names}
        for r in range(1, config.rounds + 1):
            steps = []
            for name in config.strategies:
                keys, pool, actions = state[name]
                log(f"seed {seed}: round {r}/{config.rounds} {name}: pre-annotating {len(pool)} pool images")
                picked, count = sim.label(projects[name], pool, name, np.random.default_rng([seed, r]))
                keys, pool = keys + picked, [k for k in pool if k not in picked]
                actions += count.actions
                record = sim.run(projects[name], f"round {r} {name}", keys)
                steps.append(record.steps)
                state[name] = (keys, pool, actions)
                result.rounds.append(RoundRecord(r, name, picked, per_image(count, len(picked)), actions, record))
            keys = state[CONTROL][0]
            same = int(round(statistics.mean(steps)))
            log(f"seed {seed}: round {r}/{config.rounds} {CONTROL}: {same} steps, no new labels")
            record = sim.run(CONTROL_PROJECT, f"round {r} {CONTROL}", keys,
                             overrides={"steps": same, "warm_steps": same, "time_budget": 0.0})
            result.rounds.append(RoundRecord(r, CONTROL, [], {}, 0.0, record))
        log(f"seed {seed}: {REFERENCE}: {n0 + config.pool} images annotated")
        result.reference = sim.run(REFERENCE_PROJECT, REFERENCE, list(labeled[:n0]) + list(sim.keys["pool"]))
    result.seconds = time.perf_counter() - start
    return result


def rescore_seed(config: SimConfig, saved: SeedResult, work: Path, log: Callable[[str], None] = print) -> SeedResult:
    """`saved`'s cold-start table with every test figure measured again, by the current prediction
    code, on the models its run left in `work` (the seed's folder); the training figures (time,
    steps, promotion) stay those of that run. For a change that acts at prediction time only: the
    models are not retrained, so a change of training is not measured."""
    from backend.registry import Registry
    from backend.process import set_torch_threads

    if saved.rounds:
        raise ValueError(f"seed {saved.seed}: rescoring covers the cold-start table only (a run with --no-loop)")
    set_torch_threads(0)
    sim = SimProject(config, saved.seed, Path(work).resolve(), log)
    registry = Registry(sim.settings.model_dir)
    trained = {record.name: record for record in saved.cold}
    cold = []
    for project, n, variant, env in cold_projects(config):
        name = f"{n} images, {variant}"
        versions = registry.versions(project)
        if name not in trained or not versions:
            raise ValueError(f"seed {saved.seed}: no trained model for '{name}' (project {project}) in {work}")
        log(f"seed {saved.seed}: rescoring {name}")
        record = trained[name]
        served = sim.score(project)
        candidate = served if record.promoted else sim.score_weights(versions[-1].weights)
        cold.append(replace(record, served=served, candidate=candidate))
        if not env:
            cold += prediction_variants(sim, project, cold[-1])
    return replace(saved, cold=cold, rescored=True)


# --- summary over seeds ----------------------------------------------------------------------

def spread(values: Sequence[float | None], fmt: str = "{:.3f}") -> str:
    """"median (min-max)" of the values (None: not reached, counted in a note)."""
    known = [v for v in values if v is not None]
    if not known:
        return "not reached"
    text = fmt.format(statistics.median(known))
    if len(known) > 1:
        text += f" ({fmt.format(min(known))}-{fmt.format(max(known))})"
    if len(known) < len(values):
        text += f", {len(values) - len(known)} of {len(values)} not reached"
    return text


def actions_to_reach(seed: SeedResult, strategy: str) -> float | None:
    """Cumulative oracle actions of the strategy's first round whose test IA and instance Dice reach
    REFERENCE_SHARE of the reference's (None: not within the rounds run)."""
    ref = seed.reference.served
    for r in seed.curve(strategy):
        s = r.train.served
        if s.ia >= REFERENCE_SHARE * ref.ia and s.instance_dice >= REFERENCE_SHARE * ref.instance_dice:
            return r.cumulative_actions
    return None


def format_report(config: SimConfig, results: Sequence[SeedResult], command: str, machine: str | None = None,
                  plot: str | None = None) -> str:
    """The markdown report (module docstring): setup, cold start, loop, label efficiency."""
    from backend.settings import Settings
    from training.train import TrainConfig

    train = TrainConfig.from_env({**os.environ, **dict(config.train_env)}, device=config.device)
    settings = Settings.from_env({**os.environ, **dict(config.train_env)})
    seeds = ", ".join(str(r.seed) for r in results)
    lines = ["# Cold start and label efficiency of the annotation loop (simulated oracle)", "",
             f"Command: `{command}`"]
    if machine:
        lines.append(f"Machine: {machine}")
    minutes = [r.seconds / 60 for r in results]
    rescored = ", ".join(str(r.seed) for r in results if r.rescored)
    lines += [f"Run time: {sum(minutes):.0f} min for {len(results)} seed(s) ({seeds})."
              + (f" Seed(s) {rescored}: test figures measured again (`--rescore`) on the models their run trained "
                 "(training time and steps are that run's)." if rescored else ""), "",
              f"Data: synthetic panoramics {config.size[0]}x{config.size[1]} per seed: {config.labeled} labeled, "
              f"a pool of {config.pool if config.loop else 0}, {config.test} held-out test images. Training: the "
              f"product's retrain job (`training.jobs.run_round`) with "
              + ("its defaults" if not config.train_env else f"{dict(config.train_env)} (NOT the product's defaults)")
              + f": preset {train.preset}, {train.steps} steps ({train.warm_steps} when warm-started), batch "
              f"{train.batch}, {train.optimizer} lr0 {train.lr0:g}, imgsz {train.imgsz}, proto stride "
              f"{train.proto_stride}, tooth super-class {'on' if train.tooth_class else 'off'}, mosaic "
              f"{train.mosaic:g}, translate {train.translate:g}, scale {train.scale:g}, mirror flip "
              f"{train.fliplr:g}, time budget {train.time_budget:g} min per job, mask refiner "
              f"{train.refiner_steps} steps ({train.refiner_warm_steps} warm). Pre-annotation: detector, numbering "
              "of the candidates with a tooth "
              f"score >= {settings.score_threshold:g} (SCORE_THRESHOLD; those >= {settings.score_anchor:g} numbered "
              f"first, SCORE_ANCHOR; >= {settings.score_fallback:g} on an image without any, SCORE_FALLBACK), YOLO "
              "masks redrawn by the learned mask "
              "refiner (with its mirror pass), "
              + ("no SAM (no SAM checkpoint given)" if config.sam_checkpoint is None and config.sam != "lite_medsam"
                 else f"SAM {config.sam}")
              + ". Every number: median (min-max) over the seeds.", "",
              "Oracle (`training.oracle`): regions matched to ground-truth teeth one to one by IoU; accepted at "
              "IoU >= 0.9 with the right label; relabeled: right place, wrong number; redrawn: matched, IoU < 0.9; "
              "added: a tooth without a region (missed); deleted: a region without a tooth. Actions = relabeled + "
              "redrawn + added + deleted, per image."]
    if config.cold_start or any(r.cold for r in results):
        lines += ["", "## Cold start: the first model of a new project", "",
                  "| annotated | variant | promoted | job s (to the decision) | steps | IA | inst Dice | inst NSD | "
                  "actions/img | added | relabeled | redrawn | deleted |", "|" + "---|" * 13]
        names = list(dict.fromkeys(c.name for c in results[0].cold))
        for name in names:
            rows = [next(c for c in r.cold if c.name == name) for r in results]
            n, variant = name.split(" images, ", 1)
            tests = [row.candidate for row in rows]
            cells = [n, variant, f"{sum(row.promoted for row in rows)} of {len(rows)}",
                     spread([row.seconds for row in rows], "{:.0f}"), spread([row.steps for row in rows], "{:.0f}"),
                     spread([t.ia for t in tests]), spread([t.instance_dice for t in tests]),
                     spread([t.instance_nsd for t in tests])]
            cells += [spread([t.oracle[k] for t in tests], "{:.1f}") for k in ORACLE_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Scores are the trained candidate's on the test set (a model the gate did not promote serves "
                  "nothing; the promoted column says how often that happened). Prediction-time variants reuse the "
                  "default model, so their time and steps are its own."]
    if config.loop and results[0].reference is not None:
        lines += ["", "## Loop", "",
                  "| round | strategy | labeled | picked: actions/img | cumulative actions | promoted | steps | "
                  "test IA | test inst Dice | test actions/img |", "|" + "---|" * 10]
        keys = list(dict.fromkeys((r.round, r.strategy) for r in results[0].rounds))
        def served(records: Sequence[TrainRecord]) -> list[str]:
            tests = [x.served for x in records]
            return [f"{sum(x.promoted for x in records)} of {len(records)}",
                    spread([x.steps for x in records], "{:.0f}"), spread([t.ia for t in tests]),
                    spread([t.instance_dice for t in tests]), spread([t.oracle["actions"] for t in tests], "{:.1f}")]

        for rnd, strategy in keys:
            rows = [next(x for x in r.rounds if (x.round, x.strategy) == (rnd, strategy)) for r in results]
            picked = spread([x.oracle.get("actions") for x in rows], "{:.1f}") if rows[0].oracle else "-"
            cells = [str(rnd), strategy, str(rows[0].train.labeled), picked,
                     spread([x.cumulative_actions for x in rows], "{:.0f}"), *served([x.train for x in rows])]
            lines.append("| " + " | ".join(cells) + " |")
        refs = [r.reference for r in results]
        lines.append("| " + " | ".join(["-", REFERENCE, str(refs[0].labeled), "-", "-", *served(refs)]) + " |")
        pool = [r.pool_teeth for r in results]
        lines += ["", f"## Label efficiency: oracle actions to reach {REFERENCE_SHARE:g}x the fully supervised "
                      "reference's test IA and instance Dice", "",
                  f"Labeling the whole pool from scratch: {spread(pool, '{:.0f}')} actions (one per tooth).", "",
                  "| strategy | actions to reach | share of labeling the pool from scratch |", "|---|---|---|"]
        for strategy in config.strategies:
            reach = [actions_to_reach(r, strategy) for r in results]
            share = [None if a is None else a / p for a, p in zip(reach, pool)]
            lines.append(f"| {strategy} | {spread(reach, '{:.0f}')} | {spread(share, '{:.1%}')} |")
    if plot:
        lines += ["", f"![test IA and instance Dice against cumulative oracle actions]({plot})"]
    return "\n".join(lines) + "\n"


def plot_loop(config: SimConfig, results: Sequence[SeedResult], path: Path) -> Path:
    """PNG of test IA and instance Dice (median over seeds) against cumulative oracle actions, one
    line per strategy; the control's last value and the reference dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in zip(axes, ("ia", "instance_dice"), ("IA", "instance Dice")):
        for strategy in config.strategies:
            rounds = sorted({r.round for r in results[0].curve(strategy)})
            xs = [statistics.median(next(x for x in r.curve(strategy) if x.round == k).cumulative_actions
                                    for r in results) for k in rounds]
            ys = [statistics.median(getattr(next(x for x in r.curve(strategy) if x.round == k).train.served, metric)
                                    for r in results) for k in rounds]
            ax.plot(xs, ys, marker="o", label=strategy)
        last = max(r.round for r in results[0].rounds)
        control = statistics.median(getattr(next(x for x in r.rounds if x.strategy == CONTROL and x.round == last)
                                            .train.served, metric) for r in results)
        ax.axhline(control, color="grey", linestyle="--", label=f"{CONTROL} (round {last})")
        ref = statistics.median(getattr(r.reference.served, metric) for r in results)
        ax.axhline(ref, color="black", linestyle=":", label=REFERENCE)
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
    which.add_argument("--smoke", action="store_true", help="a mechanics check in about a minute (tiny images, "
                                                            "a few training steps: not the product's defaults)")
    which.add_argument("--full", action="store_true", help="the paper's training preset, for a GPU")
    parser.add_argument("--device", default="cpu", help="torch device for training, YOLO and SAM (default cpu)")
    parser.add_argument("--seeds", type=int, nargs="+", help="data seeds (default 0 1 2)")
    parser.add_argument("--cold-sizes", type=int, nargs="+", help="annotated images of the cold-start table "
                                                                  "(default 8 20; the loop starts from the first)")
    parser.add_argument("--rounds", type=int, help="override the preset's number of rounds")
    parser.add_argument("--per-round", type=int, help="override the images labeled per round")
    parser.add_argument("--pool", type=int, help="override the pool size")
    parser.add_argument("--test", type=int, help="override the test set size")
    parser.add_argument("--no-loop", action="store_true", help="only the cold-start table")
    parser.add_argument("--no-cold-start", action="store_true", help="only the loop (round 0: the default model)")
    parser.add_argument("--defaults-only", action="store_true",
                        help="the cold-start table trains only the product's defaults (its prediction-time variants "
                             "are still scored): about 9 min per size and seed on 2 cores")
    parser.add_argument("--sam-checkpoint", type=Path, help="SAM weights for pre-annotation (default: YOLO masks)")
    parser.add_argument("--sam-model-type", default="vit_b", help="SAM builder of --sam-checkpoint (default vit_b)")
    parser.add_argument("--work", type=Path, help="work folder: training runs and each seed's results, which a "
                                                  "rerun reuses (default: a temporary folder, removed)")
    parser.add_argument("--rescore", action="store_true", help="with --work: measure the test figures of the seeds "
                                                                  "already there again, on their kept models, with the "
                                                                  "current prediction code (no retraining)")
    parser.add_argument("--out", type=Path, help="markdown report; the plot goes next to it as .png (default: "
                                                 f"{results_dir}/loop.md, loop-smoke.md or loop-full.md)")
    parser.set_defaults(results_dir=results_dir)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The preset chosen by --smoke/--full (else "default") with the command line's overrides."""
    config = preset("smoke" if args.smoke else "full" if args.full else "default", args.device)
    overrides = {name: getattr(args, name) for name in ("rounds", "per_round", "pool", "test", "sam_checkpoint")
                 if getattr(args, name) is not None}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.cold_sizes:
        overrides["cold_sizes"] = tuple(args.cold_sizes)
    return replace(config, cold_start=not args.no_cold_start, loop=not args.no_loop, sam=args.sam_model_type,
                   trained_variants=not args.defaults_only, **overrides)


def run_from_args(args: argparse.Namespace, command: str, machine: str | None = None) -> list[SeedResult]:
    """Run the seeds `args` describe (reusing those already in --work), print and write the report."""
    import tempfile

    os.environ.setdefault("YOLO_VERBOSE", "False")
    config = config_from_args(args)
    if args.rescore and not args.work:
        raise ValueError("--rescore needs --work: the folder whose seeds' models are measured again")
    suffix = "-smoke" if args.smoke else "-full" if args.full else ""
    out = Path(args.out) if args.out else Path(args.results_dir) / f"loop{suffix}.md"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="toothseg-sim-"))
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {line}", flush=True)

    results = []
    try:
        for seed in config.seeds:
            saved = work / f"seed-{seed}.json"
            if saved.exists():
                log(f"seed {seed}: results from {saved}")
                result = SeedResult.from_json(saved.read_text())
                if args.rescore:
                    result = rescore_seed(config, result, work / f"seed-{seed}", log)
                    saved.write_text(result.to_json())
                results.append(result)
                continue
            result = run_seed(config, seed, work / f"seed-{seed}", log)
            saved.write_text(result.to_json())
            results.append(result)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    png = plot_loop(config, results, out.with_suffix(".png")) if config.loop else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_report(config, results, command, machine, plot=png.name if png else None))
    print(out.read_text())
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return results
